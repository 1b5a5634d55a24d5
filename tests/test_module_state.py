"""Module state and everything a trace read: BatchNorm running statistics, train/eval mode,
configs edited mid-run, replaced parameters. Each change mid-run is checked against eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import corpus
import mlocompile as mlo

pytestmark = pytest.mark.usefixtures("float64")
BN = corpus.Model("bn", lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)))
DROPOUT = corpus.Model("dropout", lambda: nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3)))


@pytest.fixture(autouse=True)
def _models(monkeypatch):
    monkeypatch.setitem(corpus.MODELS, "bn", BN)
    monkeypatch.setitem(corpus.MODELS, "dropout", DROPOUT)


def state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in [*net.named_parameters(), *net.named_buffers()]}


def run(model: str, method: str, backend: str, steps: int = 3, **kw):
    engine, net, lam = corpus.build(model, method, backend, **kw)
    for i in range(steps):
        torch.manual_seed(i)
        engine.train_step()
    return engine, net, lam


@pytest.mark.parametrize("method", corpus.METHODS)
def test_batchnorm_running_statistics_advance_once_per_training_step(method):
    runs = {b: run("bn", method, b) for b in ("eager", "fx")}
    (_, eager_net, _), (_, fx_net, _) = runs["eager"], runs["fx"]
    # each train_step: the lower's step and the upper's (whose loss runs the lower's net in train
    # mode) each ran one forward; hypergradient re-evaluations (darts ±ε, linearizations, itd
    # replays) read the statistics and never advanced them
    assert int(fx_net[1].num_batches_tracked) == 6
    for k, v in state(eager_net).items():
        assert torch.equal(state(fx_net)[k], v), k


def test_running_statistics_follow_pytorch_batchnorm():
    engine, net, _ = corpus.build("bn", "darts", "fx")
    plain = copy.deepcopy(net)
    x, xv = engine.peek_batch("lower")[0], engine.peek_batch("upper")[0]
    engine.train_step()  # the lower's step (a forward on x), then the upper's (the lower's net on xv)
    with torch.no_grad():
        plain(x)
        for p, q in zip(plain.parameters(), net.parameters()):
            p.copy_(q)  # the upper's forward ran at the updated lower weights
        plain(xv)
    torch.testing.assert_close(net[1].running_mean, plain[1].running_mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(net[1].running_var, plain[1].running_var, rtol=1e-12, atol=1e-15)


class ReadsItsStatistics(nn.Module):
    """BatchNorm run twice per forward (the second update starts from the first's), then its running
    mean read by the loss: a deferred update must have run before each read."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn, self.out = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.bn(self.lin(x)))
        return self.out(h.relu()) * (1 + self.bn.running_mean.sum())


@pytest.mark.parametrize("backend", ["eager", "fx"])
def test_statistics_read_in_the_forward_are_current(backend, monkeypatch):
    monkeypatch.setitem(corpus.MODELS, "reads", corpus.Model("reads", ReadsItsStatistics))
    engine, net, _ = corpus.build("reads", "darts", backend)
    plain = copy.deepcopy(net)
    x = engine.peek_batch("lower")[0]
    xv, tv = engine.peek_batch("upper")
    engine.train_step()
    with torch.no_grad():
        plain(x)  # the lower's step
        for p, q in zip(plain.parameters(), net.parameters()):
            p.copy_(q)
        upper_loss = torch.nn.functional.cross_entropy(plain(xv), tv)  # the upper's forward reads the updated mean
    for k, v in plain.named_buffers():
        torch.testing.assert_close(dict(net.named_buffers())[k], v, rtol=1e-12, atol=1e-15)
    assert float(engine.runner.runs["upper"].last_loss) == pytest.approx(float(upper_loss), rel=1e-12)


def test_dropped_reevaluations_trace_no_statistics_update(monkeypatch):
    """Only the forwards whose buffers a step keeps trace the running-statistics update: the upper's own
    (the lower's net on its batch), not darts's two re-evaluations of the lower loss."""
    import mlocompile.compiler as compiler

    counts: dict[str, int] = {}
    trace = compiler.trace_step

    def counting(fn, flat, title, dynamic=frozenset(), **options):
        traced = trace(fn, flat, title, dynamic, **options)
        counts[title] = sum(n.target is torch.ops.aten.var.correction for n in traced.gm.graph.nodes)
        return traced

    monkeypatch.setattr(compiler, "trace_step", counting)
    engine, _, _ = corpus.build("bn", "darts", "fx")
    engine.train_step()
    assert counts == {"step_lower": 1, "step_upper": 1}


@pytest.mark.parametrize("model", ["bn", "dropout"])
def test_eval_mode_mid_run_retraces_and_matches_eager(model):
    grads = {}
    for backend in ("eager", "fx"):
        engine, net, _ = run(model, "neumann", backend)
        train = engine.gradients("upper")["p"]  # traced in train mode first
        net.eval()
        grads[backend] = (engine.gradients("upper")["p"], engine.gradients("upper")["p"], train)
    eager, fx = grads["eager"], grads["fx"]
    assert torch.equal(fx[0], eager[0])
    assert torch.equal(fx[0], fx[1])  # eval mode: no dropout, no batch statistics: deterministic
    if model == "bn":
        assert not torch.allclose(fx[0], fx[2])  # running statistics, not the batch's, are used now


def test_eval_mode_batchnorm_uses_running_statistics_and_leaves_them():
    engine, net, _ = run("bn", "darts", "fx")
    net.eval()
    before = state(net)
    engine.train_step()
    assert torch.equal(net[1].running_mean, before["1.running_mean"])
    assert int(net[1].num_batches_tracked) == int(before["1.num_batches_tracked"])


@pytest.mark.parametrize(
    ("field", "value"),
    [("type", "neumann"), ("type", "itd"), ("neumann_iterations", 4), ("darts_alpha", 0.5), ("cg_iterations", 3)],
)
def test_config_change_mid_run_retraces_and_matches_eager(field, value):
    method = "cg" if field == "cg_iterations" else "neumann" if field == "neumann_iterations" else "darts"
    grads = {}
    for backend in ("eager", "fx"):
        engine, _, _ = run("mlp", method, backend, steps=2)
        before = engine.gradients("upper")["p"]
        setattr(engine.lower.config, field, value)
        grads[backend] = (before, engine.gradients("upper")["p"])
        engine.train_step()
        grads[backend] += (engine.upper.module.p.detach().clone(),)
    for a, b in zip(grads["fx"], grads["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(grads["fx"][0], grads["fx"][1])  # the change took effect


def test_memory_budget_change_mid_run_retraces():
    engine, _, _ = run("mlp", "itd", "fx", unroll=4, steps=2)
    before = engine.gradients("upper")["p"]
    traced = len(engine.compiler._traced)
    engine.config.memory_budget = 0.5
    after = engine.gradients("upper")["p"]
    assert len(engine.compiler._traced) == traced + 1
    segmented = engine.compiler.latest["step_upper_accumulate"].gm
    assert any("mlo.segment" in n.meta for n in segmented.graph.nodes)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-15)


def test_replaced_parameter_is_a_clear_error():
    engine, net, _ = run("mlp", "darts", "fx", steps=1)
    net[0].weight = nn.Parameter(torch.zeros(8, 6))
    with pytest.raises(mlo.MLOError, match=r"problem 'lower': trainable parameter\(s\) \['0.weight'\] were replaced"):
        engine.train_step()


def test_parameter_changed_in_place_is_used():
    runs = {}
    for backend in ("eager", "fx"):
        engine, net, _ = run("mlp", "darts", backend, steps=1)
        with torch.no_grad():
            net[0].weight.mul_(0.5)
        engine.train_step()
        runs[backend] = state(net)
    for k, v in runs["eager"].items():
        assert torch.equal(runs["fx"][k], v), k


def test_sync_batchnorm_is_a_clear_error():
    net = nn.Sequential(nn.Linear(6, 8), nn.SyncBatchNorm(8), nn.Linear(8, 3))
    lam = corpus.Vec(torch.zeros(corpus.N_SAMPLES))
    train, valid = corpus.data(corpus.MODELS["mlp"])
    lower = corpus.Lower("lower", None, net, torch.optim.SGD(net.parameters(), lr=0.1), train_data_loader=train)
    upper = corpus.Upper("upper", None, lam, torch.optim.SGD(lam.parameters(), lr=1.0), train_data_loader=valid)
    with pytest.raises(mlo.MLOError, match="SyncBatchNorm is not supported.*use nn.BatchNorm1d"):
        mlo.Engine([upper, lower], mlo.EngineConfig(), {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})


class ValueReadingLower(corpus.Lower):
    """A lower loss with Python control flow on a tensor's value."""

    def training_step(self, batch):
        loss = super().training_step(batch)
        if loss.item() > 1e6:  # never true here; reading the value is the point
            loss = loss * 0
        return loss


def test_eager_runs_a_loss_that_reads_values(monkeypatch):
    plain = run("mlp", "darts", "eager", steps=2)[1]
    monkeypatch.setattr(corpus, "Lower", ValueReadingLower)
    _, net, _ = run("mlp", "darts", "eager", steps=2)  # dependency checks run the loss eagerly
    for k, v in state(plain).items():
        assert torch.equal(state(net)[k], v), k


def test_tracing_a_value_read_names_the_line_and_the_fix(monkeypatch):
    monkeypatch.setattr(corpus, "Lower", ValueReadingLower)
    engine, _, _ = corpus.build("mlp", "darts", "fx")
    with pytest.raises(mlo.TraceError, match=r"test_module_state.py:\d+: if loss.item\(\) > 1e6.*compile='eager'"):
        engine.train_step()


@pytest.mark.parametrize("backend", ["eager", "fx"])
def test_transformer_dropout_draws_what_plain_pytorch_draws(backend, monkeypatch):
    # under torch.func, F.dropout on CPU draws other masks than plain PyTorch for the same seed
    # (after a batch-first attention block); the loss must be plain PyTorch's, bit for bit
    spec = corpus.Model("transformer_dropout", lambda: corpus.Transformer(dropout=0.1), "sequence")
    monkeypatch.setitem(corpus.MODELS, spec.name, spec)
    engine, net, lam = corpus.build(spec.name, "darts", backend, log_every=1)
    plain = copy.deepcopy(net)
    x, t, idx = engine.peek_batch("lower")
    torch.manual_seed(5)
    engine.train_step()
    torch.manual_seed(5)
    per = torch.nn.functional.cross_entropy(plain(x), t, reduction="none")
    want = (torch.sigmoid(lam.p.detach().new_tensor(torch.linspace(-1.0, 1.0, corpus.N_SAMPLES))[idx]) * per).mean()
    got = next(r["loss"] for r in engine.history if r["tag"] == "lower")
    assert got == want.item()
