"""What symbolic traces run instead of PyTorch code that reads a symbolic size as an integer.

A size read as an integer (C++ ``tensor.sizes()``, ``int(s)``) fixes its symbol to the
traced value: the graph then serves that size only, and every batch size traces again.
Each rule here computes what PyTorch computes with the sizes left symbolic:

- ``F.linear`` on a 3-D input (``_FlatLinear``, a ``TorchFunctionMode``): under
  ``torch.func.grad``, ``at::linear`` reads the input's sizes.
- Three autograd formulas that C++ runs with integer sizes, replaced through the Python
  dispatcher (which make_fx's symbolic mode enables) by ``SYMBOLIC_KERNELS``. What reads
  the batch size in PyTorch (found by printing the stack at each
  ``ShapeEnv._set_replacement`` of a symbol by a number):

  * ``_convolution_double_backward`` (Convolution.cpp) expands the bias term to
    ``gO.sizes()`` and reads ``input.sizes()`` for the ``output_padding`` of the
    transposed convolution that gives ``gI``. A composite op: its kernel here is ATen's,
    op for op, so a step traces the same aten ops as at fixed sizes.
  * ``batchnorm_double_backward`` (FunctionsManual.cpp, the derivative of
    ``native_batch_norm_backward``) counts ``M`` from ``input.size(0)``, and
    ``embedding_dense_double_backward_symint`` (the derivative of
    ``embedding_dense_backward``) reads the indices' sizes. Both are C++ functions no
    dispatcher reaches, so the kernels here replace the first-order op itself, by aten ops
    whose own derivatives keep sizes symbolic, where an enclosing transform will
    differentiate it (a Hessian-vector product: neumann, cg, itd); elsewhere (darts, a
    lower step) ATen's fused kernel stays.

  NOTE: a ``torch.autograd.Function`` cannot do this: steps trace under
  ``torch.func.functionalize``, which has no rule for one (``custom_function_call``'s
  Functionalize rule in torch/_functorch/autograd_function.py raises "NYI").

The kernels are installed only while a symbolic trace runs (``keep_sizes_symbolic``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch._C import DispatchKey
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch._ops import OpOverload
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten

SymbolicKernel = Callable[..., Any]
# op -> (the dispatch key its kernel takes over, the kernel)
SYMBOLIC_KERNELS: dict[OpOverload, tuple[DispatchKey, SymbolicKernel]] = {}


def register_symbolic_kernel(op: OpOverload, key: DispatchKey) -> Callable[[SymbolicKernel], SymbolicKernel]:
    """Register ``fn`` as what symbolic traces run for ``op`` at dispatch key ``key``."""

    def deco(fn: SymbolicKernel) -> SymbolicKernel:
        SYMBOLIC_KERNELS[op] = (key, fn)
        return fn

    return deco


@contextmanager
def keep_sizes_symbolic() -> Iterator[None]:
    """Run the rules of this module for the duration of a symbolic trace, and remove them after it.

    Requires: make_fx's symbolic mode (its Python dispatcher) inside the block.
    Ensures: PyTorch's kernels are as they were before, on exit.
    """
    installed = []
    try:
        for op, (key, fn) in SYMBOLIC_KERNELS.items():
            if key not in op.py_kernels:  # NOTE: someone else's Python kernel for this key wins
                op.py_kernels[key] = fn
                op._dispatch_cache.clear()  # the Python dispatcher caches the kernel it resolved per key
                installed.append((op, key))
        with _FlatLinear():
            yield
    finally:
        for op, key in installed:
            del op.py_kernels[key]
            op._dispatch_cache.clear()


class _FlatLinear(TorchFunctionMode):
    """``F.linear`` on inputs of more than 2 dims, as the aten ops ``at::linear`` itself runs.

    Under ``torch.func.grad``, ``at::linear`` reads a 3-D input's sizes as integers,
    which fixes a symbolic sequence length (every ``nn.Linear`` of a transformer
    would retrace per length). The same computation written here keeps it symbolic:
    a contiguous input with a bias is flattened to 2-D for one ``addmm`` and viewed
    back, anything else is ``matmul`` with the transposed weight plus the bias, which
    are the ops (and so the numbers) ``at::linear`` produces.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear or func is torch._C._nn.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(x, torch.Tensor) and x.dim() > 2:
                if bias is not None and x.is_contiguous():
                    out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight.t())
                    return out.view(*x.shape[:-1], weight.shape[0])
                out = torch.matmul(x, weight.t())
                return out if bias is None else out + bias
        return func(*args, **kwargs)


def _differentiated_outside() -> bool:
    """Whether a transform enclosing the current one will differentiate what the current one computes.

    A first-order backward op runs at the level of the ``torch.func.grad`` that called it
    (the top of functorch's stack) and its C++ derivative is used only by an enclosing
    grad/vjp/jvp (``torch.func.grad`` always records one, for nothing, at its own level).
    """
    outer = retrieve_all_functorch_interpreters()[:-1]
    return any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in outer)


def _expand(param: list[Any], dim: int) -> list[Any]:
    return list(param) * dim if len(param) == 1 else list(param)


@register_symbolic_kernel(aten._convolution_double_backward.default, DispatchKey.CompositeImplicitAutograd)
def _convolution_double_backward(
    ggI: torch.Tensor | None,
    ggW: torch.Tensor | None,
    ggb: torch.Tensor | None,
    gO: torch.Tensor,
    weight: torch.Tensor,
    input: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    transposed: bool,
    output_padding: list[int],
    groups: int,
    output_mask: list[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``at::_convolution_double_backward`` (aten/src/ATen/native/Convolution.cpp) op for op, with symbolic sizes.

    Returns ``(ggO, gI, gW)``: the gradients of the first backward's outputs with respect to
    its grad_output, input and weight.
    """
    dim = weight.dim() - 2
    stride, padding, dilation, output_padding = (_expand(p, dim) for p in (stride, padding, dilation, output_padding))
    if not transposed and input.dim() > 4:  # ATen infers a grouped 3-D convolution's groups from the shapes
        groups = input.shape[1] // weight.shape[1] if weight.shape[1] > 0 else -1
    conv = aten.convolution.default
    nonempty = input.numel() != 0

    # ggO = conv(ggI, w) + conv(i, ggW) + ggb
    ggO = None
    if nonempty:
        if ggI is not None:
            w = weight.contiguous() if weight.is_cuda else weight
            ggO = conv(ggI, w, None, stride, padding, dilation, transposed, output_padding, groups)
        if ggW is not None:
            ggW = ggW.contiguous() if ggW.is_cuda else ggW
            term = conv(input, ggW, None, stride, padding, dilation, transposed, output_padding, groups)
            ggO = term if ggO is None else ggO + term
    if ggb is not None:
        view = [1] * gO.dim()
        view[1] = ggb.shape[0]
        expanded = ggb.contiguous().view(view).expand(gO.shape)  # NOTE: ATen's gO.sizes() fixes the batch here
        ggO = expanded if ggO is None else ggO + expanded

    # gW = conv(ggI, gO), accumulated over the batch: batch and channels swapped, stride and dilation swapped
    gW = None
    if ggI is not None and nonempty:
        gOt, ggIt = gO.transpose(0, 1), ggI.transpose(0, 1)

        def weight_grad(o: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            a, b = (o, i) if transposed else (i, o)
            return conv(a, b, None, dilation, padding, stride, False, output_padding, 1)

        if groups == 1:
            gWt = weight_grad(gOt.contiguous() if gOt.is_cuda else gOt, ggIt)
        else:
            parts = []
            for g in range(groups):
                n_i, n_o = ggIt.shape[0] // groups, gOt.shape[0] // groups
                ggIt_g, gOt_g = ggIt.narrow(0, n_i * g, n_i), gOt.narrow(0, n_o * g, n_o)
                parts.append(weight_grad(gOt_g.contiguous() if gOt_g.is_cuda else gOt_g, ggIt_g))
            gWt = torch.cat(parts, 1)
        gW = gWt.transpose(0, 1)
        for d in range(2, gW.dim()):  # the forward kernels pad symmetrically: narrow to the weight's size
            if gW.shape[d] > weight.shape[d]:
                gW = gW.narrow(d, 0, weight.shape[d])

    # gI = convT(gO, ggW), or conv(gO, ggW) for a transposed convolution
    gI = None
    if ggW is not None and nonempty:
        gOc = gO.contiguous() if gO.is_cuda else gO
        if transposed:
            gI = conv(gOc, ggW, None, stride, padding, dilation, False, output_padding, groups)
            for d in range(2, gI.dim()):
                if gI.shape[d] > input.shape[d]:
                    gI = gI.narrow(d, 0, input.shape[d])
        else:
            gi_output_padding = list(output_padding)
            for d in range(dim):  # NOTE: ATen reads input.sizes() here, which fixes the batch too
                k, n_in, n_out = weight.shape[2 + d], input.shape[2 + d], gO.shape[2 + d]
                expected = (k - 1) * dilation[d] - 2 * padding[d] + (stride[d] * (n_out - 1) + 1)
                if expected != n_in:
                    gi_output_padding[d] = n_in - expected
            gI = conv(gOc, ggW, None, stride, padding, dilation, True, gi_output_padding, groups)
    return ggO, gI, gW


@register_symbolic_kernel(aten.native_batch_norm_backward.default, DispatchKey.Autograd)
def _batch_norm_backward(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    save_mean: torch.Tensor | None,
    save_invstd: torch.Tensor | None,
    train: bool,
    eps: float,
    output_mask: list[bool],
) -> Any:
    """Batch norm's backward as ATen's CPU kernel computes it, in aten ops, where it will be differentiated.

    In training the saved statistics are functions of the input: they enter as their saved
    values (the same numbers as ATen's kernel uses) with the derivative of the mean and
    inverse standard deviation recomputed from the input, which ``batchnorm_double_backward``
    differentiates too. Reduced-precision inputs (statistics kept in float32) take ATen's path.
    """
    args = (grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train, eps, output_mask)
    same_dtype = all(t is None or t.dtype == input.dtype for t in (grad_out, weight, save_mean, running_mean))
    if not (_differentiated_outside() and same_dtype and input.dtype in (torch.float32, torch.float64)):
        return _aten(aten.native_batch_norm_backward.default, DispatchKey.Autograd, *args)
    dims = [0, *range(2, input.dim())]
    shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
    if train:
        assert save_mean is not None and save_invstd is not None
        mean_ = input.mean(dims)
        invstd_ = ((input - mean_.view(shape)).pow(2).mean(dims) + eps).rsqrt()
        mean, invstd = save_mean + (mean_ - mean_.detach()), save_invstd + (invstd_ - invstd_.detach())
    else:
        assert running_mean is not None and running_var is not None
        mean, invstd = running_mean, (running_var + eps).rsqrt()
    centered = input - mean.view(shape)
    grad_sum = grad_out.sum(dims)
    dot = (centered * grad_out).sum(dims)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        scale = (invstd if weight is None else invstd * weight).view(shape)
        if train:
            n = input.numel() // input.shape[1]
            proj = (dot * invstd * invstd / n).view(shape)
            grad_input = (grad_out - (grad_sum / n).view(shape) - centered * proj) * scale
        else:
            grad_input = grad_out * scale
    if output_mask[1]:
        grad_weight = dot * invstd
    if output_mask[2]:
        grad_bias = grad_sum
    return grad_input, grad_weight, grad_bias


@register_symbolic_kernel(aten.embedding_dense_backward.default, DispatchKey.Autograd)
def _embedding_dense_backward(
    grad_output: torch.Tensor, indices: torch.Tensor, num_weights: int, padding_idx: int, scale_grad_by_freq: bool
) -> torch.Tensor:
    """The embedding's weight gradient as one accumulating ``index_put`` (in index order, as ATen's CPU kernel
    adds rows: the same numbers), where it will be differentiated: its derivative is a gather of rows."""
    args = (grad_output, indices, num_weights, padding_idx, scale_grad_by_freq)
    if not _differentiated_outside() or scale_grad_by_freq:
        return _aten(aten.embedding_dense_backward.default, DispatchKey.Autograd, *args)  # type: ignore[no-any-return]
    flat = indices.reshape(-1)
    rows = grad_output.reshape(flat.shape[0], grad_output.shape[-1])
    if padding_idx >= 0:
        rows = rows.masked_fill((flat == padding_idx).unsqueeze(-1), 0)
    return rows.new_zeros((num_weights, rows.shape[-1])).index_put((flat,), rows, accumulate=True)


def _aten(op: OpOverload, key: DispatchKey, *args: Any) -> Any:
    """Call PyTorch's own kernel of ``op`` at ``key`` (what the Python dispatcher calls when no Python kernel is
    registered)."""
    return op._op_dk(key, *args)
