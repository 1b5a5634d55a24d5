"""Betty's BERT data-reweighting example (examples/bert_data_reweighting), ported against ``lib``.

Follows Betty's ``main.py`` (problems, configs, engine, validation), ``model.py``
(``BertModel`` wrapper and the meta-weight ``MLP``, with dropout as there) and ``utils.py``
(``split_dataset``, ``correct_predictions``, ``set_seed``). Instead of the pretrained
``roberta-large`` (``RobertaForSequenceClassification.from_pretrained``) the wrapper holds
:class:`TinyRobertaForSequenceClassification`, a randomly initialised model written here
with the layout of Hugging Face's Roberta classifier (word/position/token-type embeddings,
LayerNorm, dropout 0.1, post-LN GELU encoder layers with a key-padding mask, the
``<s>``-token classification head dense-tanh-dropout-out_proj, cross-entropy over 2 labels),
shrunk to hidden size 8, 2 heads, FFN 16, 1 layer; the vocabulary stays roberta's 50265.
``transformers`` is not installed, so its ``get_linear_schedule_with_warmup`` is copied as a
``LambdaLR``. Removed: argparse (defaults are :data:`DEFAULTS`), reading SST-2 from .tsv files
and tokenizing (synthetic token ids in the tokenizer's layout: a first token, then ids, padded
with 0 to ``max_seq_len`` = 50, attention mask 1/0, token types 0), ``torch.save`` of the
datasets and of the checkpoints in ``validation()``, CUDA moves. The loaders keep
``shuffle=True`` with their own seeded ``torch.Generator``s (so data order never depends on
when a library first iterates them). Shrunk: batch 120 -> 4, train_iters 750 -> 20,
warmup 250 -> 5, valid_step 50 -> 10, synthetic SST-2 of 600 sentences.
"""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

VOCAB, PAD_IDX, MAX_POS = 50265, 1, 514  # roberta-large's vocabulary, padding index, position table


# -- a tiny randomly initialised RobertaForSequenceClassification ---------------------------------
class TinyRobertaForSequenceClassification(nn.Module):
    def __init__(self, hidden=8, heads=2, ffn=16, layers=1, num_labels=2, dropout=0.1):
        super().__init__()
        self.num_labels = num_labels
        self.word_embeddings = nn.Embedding(VOCAB, hidden, padding_idx=PAD_IDX)
        self.position_embeddings = nn.Embedding(MAX_POS, hidden, padding_idx=PAD_IDX)
        self.token_type_embeddings = nn.Embedding(1, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, dim_feedforward=ffn, dropout=dropout, activation="gelu", batch_first=True, layer_norm_eps=1e-5
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.dense = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, num_labels)
        for m in self.modules():  # Roberta's _init_weights: N(0, 0.02), zero biases, padding rows zero
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None):
        # create_position_ids_from_input_ids
        mask = input_ids.ne(PAD_IDX).int()
        position_ids = (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + PAD_IDX
        h = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        h = self.dropout(self.LayerNorm(h + self.position_embeddings(position_ids)))
        h = self.encoder(h, src_key_padding_mask=attention_mask == 0)
        # RobertaClassificationHead on the <s> token
        x = self.dropout(h[:, 0, :])
        x = self.dropout(torch.tanh(self.dense(x)))
        logits = self.out_proj(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return (loss, logits) if loss is not None else (logits,)


# -- model.py -------------------------------------------------------------------------------------
class BertModel(nn.Module):
    def __init__(self, model_name, requires_grad=True):
        super().__init__()
        # Betty: RobertaForSequenceClassification.from_pretrained(model_name, num_labels=2) and its tokenizer
        self.bert = TinyRobertaForSequenceClassification(num_labels=2)
        self.requires_grad = requires_grad
        for param in self.bert.parameters():
            param.requires_grad = requires_grad

    def forward(self, batch_seqs, batch_seq_masks, batch_seq_segments, labels):
        loss, logits = self.bert(
            input_ids=batch_seqs,
            attention_mask=batch_seq_masks,
            token_type_ids=batch_seq_segments,
            labels=labels,
        )[:2]
        if labels is None:
            return logits
        probabilities = nn.functional.softmax(logits, dim=-1)
        return loss, logits, probabilities


class HiddenLayer(nn.Module):
    def __init__(self, input_size, output_size):
        super().__init__()
        self.fc = nn.Linear(input_size, output_size)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.fc(x))


class MLP(nn.Module):
    def __init__(self, in_size=1, hidden_size=100, num_layers=1):
        super().__init__()
        self.first_hidden_layer = HiddenLayer(in_size, hidden_size)
        self.rest_hidden_layers = nn.Sequential(*[HiddenLayer(hidden_size, hidden_size) for _ in range(num_layers - 1)])
        self.output_layer = nn.Linear(hidden_size, 1)

    def forward(self, x):
        x = self.first_hidden_layer(x)
        x = self.rest_hidden_layers(x)
        x = F.dropout(x, p=0.2, training=self.training)
        x = self.output_layer(x)
        return torch.sigmoid(x) * 2


# -- utils.py -------------------------------------------------------------------------------------
def set_seed(seed=1):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def correct_predictions(output_probabilities, targets):
    _, out_classes = output_probabilities.max(dim=1)
    correct = (out_classes == targets).sum()
    return correct.item()


def split_dataset(dataset, imbalance_factor=10, num_meta_total=200):
    num_classes = 2
    num_meta = int(num_meta_total / num_classes)
    index_to_meta = []
    index_to_train = []
    imbalanced_num_list = []
    sample_num = int((len(dataset.labels) - num_meta_total) / num_classes)
    for class_index in range(num_classes):
        imbalanced_num = sample_num / (imbalance_factor ** (class_index / (num_classes - 1)))
        imbalanced_num_list.append(int(imbalanced_num))
    for class_index in range(num_classes):
        index_to_class = [index for index, label in enumerate(dataset.labels) if label == class_index]
        np.random.shuffle(index_to_class)
        index_to_meta.extend(index_to_class[:num_meta])
        index_to_class_for_train = index_to_class[num_meta:]
        index_to_class_for_train = index_to_class_for_train[: imbalanced_num_list[class_index]]
        index_to_train.extend(index_to_class_for_train)
    meta_dataset = copy.deepcopy(dataset)
    dataset.input_ids = dataset.input_ids[index_to_train]
    dataset.attention_mask = dataset.attention_mask[index_to_train]
    dataset.token_type_ids = dataset.token_type_ids[index_to_train]
    dataset.labels = dataset.labels[index_to_train]
    meta_dataset.input_ids = meta_dataset.input_ids[index_to_meta]
    meta_dataset.attention_mask = meta_dataset.attention_mask[index_to_meta]
    meta_dataset.token_type_ids = meta_dataset.token_type_ids[index_to_meta]
    meta_dataset.labels = meta_dataset.labels[index_to_meta]
    return dataset, meta_dataset


class SyntheticSentences(Dataset):
    """DataPrecessForSentence's tensors for synthetic sentences: the label is which of two token
    sets the sentence draws more from (a first token, 5-49 ids, zero padding to max_seq_len)."""

    def __init__(self, n, seed, max_seq_len=50):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.zeros(n, max_seq_len, dtype=torch.long)
        self.attention_mask = torch.zeros(n, max_seq_len, dtype=torch.long)
        self.token_type_ids = torch.zeros(n, max_seq_len, dtype=torch.long)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        for i in range(n):
            length = int(torch.randint(5, max_seq_len, (1,), generator=g))
            ids = torch.randint(4, VOCAB, (length,), generator=g)
            cue = torch.rand(length, generator=g) < 0.3  # 30% of the tokens name the label
            ids = torch.where(cue, 1000 * (1 + self.labels[i]) + (ids % 50), ids)
            self.input_ids[i, 0] = 3  # tokenize("[CLS]") is roberta's <unk>
            self.input_ids[i, 1 : length + 1] = ids[: max_seq_len - 1]
            self.attention_mask[i, : length + 1] = 1

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        return self.input_ids[idx], self.attention_mask[idx], self.token_type_ids[idx], self.labels[idx]


def get_linear_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps, last_epoch=-1):
    """transformers' schedule (transformers is not installed): linear warm-up, then linear decay."""

    def lr_lambda(current_step: int):
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        return max(0.0, float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda, last_epoch)


# -- main.py --------------------------------------------------------------------------------------
DEFAULTS: dict[str, Any] = dict(
    baseline=False,
    precision="fp32",
    strategy="default",
    seed=0,
    meta_net_hidden_size=500,
    meta_net_num_layers=1,
    model_name="roberta-large",
    lr=1e-5,
    weight_decay=5e-3,
    hypergradient="darts",
    meta_lr=1e-5,
    meta_weight_decay=0,
    batch_size=4,  # 120
    imbalance_factor=20,
    max_seq_len=50,
    train_iters=20,  # 750
    warmup_iters=5,  # 250
    valid_step=10,  # 50
    unroll_steps=5,
    n_sentences=600,  # SST-2's 67349
)


def build(lib: SimpleNamespace, train_iters: int | None = None, engine_config: dict[str, Any] | None = None, **kw):
    args = SimpleNamespace(**{**DEFAULTS, **kw})
    if train_iters is not None:
        args.train_iters = train_iters
    set_seed(args.seed)

    bertmodel = BertModel(model_name=args.model_name, requires_grad=True)
    train_data = SyntheticSentences(args.n_sentences, seed=11, max_seq_len=args.max_seq_len)
    train_data, meta_data = split_dataset(train_data, imbalance_factor=args.imbalance_factor)
    train_loader = DataLoader(
        train_data, shuffle=True, batch_size=args.batch_size, generator=torch.Generator().manual_seed(1)
    )
    # lib.AdamW: torch.optim.AdamW; for Betty a subclass taking the `decoupled_weight_decay` that current
    # torch puts in AdamW.defaults (Betty rebuilds the optimizer as AdamW(params, **defaults) and fails)
    optimizer = lib.AdamW(bertmodel.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, num_training_steps=args.train_iters, num_warmup_steps=args.warmup_iters
    )

    meta_net = MLP(in_size=1, hidden_size=args.meta_net_hidden_size, num_layers=args.meta_net_num_layers)
    meta_loader = DataLoader(
        meta_data, shuffle=True, batch_size=args.batch_size, generator=torch.Generator().manual_seed(2)
    )
    meta_optimizer = torch.optim.Adam(meta_net.parameters(), lr=args.meta_lr, weight_decay=args.meta_weight_decay)

    dev_data = SyntheticSentences(16, seed=12, max_seq_len=args.max_seq_len)
    dev_loader = DataLoader(dev_data, shuffle=True, batch_size=args.batch_size, generator=torch.Generator().manual_seed(3))

    class Finetune(lib.ImplicitProblem):
        def training_step(self, batch):
            seqs, masks, segments, labels = batch
            _, logits, probs = self.module(seqs, masks, segments, labels)
            loss_vector = F.cross_entropy(logits.view(-1, 2), labels, reduction="none")
            if args.baseline:
                loss = torch.mean(loss_vector)
            else:
                loss_vector_reshape = torch.reshape(loss_vector, (-1, 1))
                weight = self.reweight(loss_vector_reshape.detach())
                loss = torch.mean(weight * loss_vector_reshape)
            return loss

    class Reweight(lib.ImplicitProblem):
        def training_step(self, batch):
            seqs, masks, segments, labels = batch
            loss, *_ = self.finetune(seqs, masks, segments, labels)
            return loss

    best_acc = [-1.0]

    class BERTEngine(lib.Engine):
        @torch.no_grad()
        def validation(self):
            running_loss = 0.0
            running_accuracy = 0.0
            all_prob = []
            all_labels = []
            for batch_seqs, batch_seq_masks, batch_seq_segments, batch_labels in dev_loader:
                loss, logits, probabilities = self.finetune(batch_seqs, batch_seq_masks, batch_seq_segments, batch_labels)
                running_loss += loss.item()
                running_accuracy += correct_predictions(probabilities, batch_labels)
                all_prob.extend(probabilities[:, 1].cpu().numpy())
                all_labels.extend(batch_labels)
            valid_loss = running_loss / len(dev_loader)
            valid_accuracy = running_accuracy / (len(dev_loader.dataset))
            if best_acc[0] < valid_accuracy:
                best_acc[0] = valid_accuracy
            # Betty: torch.save of both problems' state_dicts to save/ (removed: no files)
            self.valid_losses = getattr(self, "valid_losses", []) + [valid_loss]
            return {"loss": valid_loss, "acc": valid_accuracy, "best_acc": best_acc[0]}

    engine_config = lib.EngineConfig(
        **{
            "train_iters": args.train_iters,
            "valid_step": args.valid_step,
            "strategy": args.strategy,
            **(engine_config or {}),  # the test's: Betty's strategy="cpu", mlocompile's backend
        }
    )
    finetune_config = lib.Config(
        type=args.hypergradient,
        precision=args.precision,
        retain_graph=True,
        log_step=args.valid_step,
        unroll_steps=args.unroll_steps,
    )
    reweight_config = lib.Config(type="darts", precision=args.precision)

    finetune = Finetune(
        name="finetune",
        module=bertmodel,
        optimizer=optimizer,
        scheduler=scheduler,
        train_data_loader=train_loader,
        config=finetune_config,
    )
    reweight = Reweight(
        name="reweight",
        module=meta_net,
        optimizer=meta_optimizer,
        train_data_loader=meta_loader,
        config=reweight_config,
    )
    if args.baseline:
        problems = [finetune]
        u2l, l2u = {}, {}
    else:
        problems = [reweight, finetune]
        u2l = {reweight: [finetune]}
        l2u = {finetune: [reweight]}
    dependencies = {"l2u": l2u, "u2l": u2l}
    return BERTEngine(config=engine_config, problems=problems, dependencies=dependencies)

