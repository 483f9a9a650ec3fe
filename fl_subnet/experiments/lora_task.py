"""A synthetic fine-tuning scenario for LoRA with heterogeneous ranks, offline on a CPU.

A tiny BERT sequence classifier (``transformers.BertForSequenceClassification`` built
from a config: random weights, nothing downloaded) is pre-trained centrally on task A,
then fine-tuned federatedly on a shifted task B (bench/lora.py, docs/lora.md,
"Heterogeneous ranks on a synthetic task").

The tasks
---------
Sequences of :data:`SEQ_LEN` tokens: a ``[CLS]`` token (id 0) followed by content tokens
drawn from ids ``2 … 17`` (16 ids). A task maps every content token to one of
:data:`NUM_CLASSES` groups of 4 tokens; a sequence's label is the group that holds
**strictly the most** of its content tokens (a majority vote over token groups).

* Task A groups ids by blocks: ``{2, 3, 4, 5}``, ``{6, …, 9}``, ``{10, …, 13}``,
  ``{14, …, 17}``.
* Task B moves half of every block to the next group: group ``g`` of task B holds the
  first two ids of block ``g`` and the last two of block ``g − 1`` (mod 4). Half of what
  the pre-trained model learned about each token is wrong for task B, so the frozen
  base plus a new head does not solve it: the attention's token features must move.

A sequence of class ``c`` is drawn by picking each content token from group ``c`` with
probability :data:`BIAS` (else uniformly from all 16 ids) and keeping it only when group
``c`` then holds strictly the most tokens, so the classes are balanced and the label is
the rule's, without ties. Everything is drawn with ``torch.Generator`` from a seed.

Nodes
-----
:func:`dirichlet_split` gives each node a share of every class drawn from
``Dirichlet(α)`` (label skew, Hsu et al. 2019), per node the same number of sequences.

The model
---------
:func:`build_classifier` builds the BERT (hidden 32, 2 layers, 4 heads, dropout 0) wrapped
in :class:`LogitsOnly`, whose forward returns the logits (what
:func:`fl_subnet.clients.train_local` expects). :func:`pretrain` trains all of it on task A
(AdamW). :func:`lora_factory` returns a factory of the peft model: the pre-trained weights,
frozen, with LoRA of rank ``r`` on every layer's attention ``query`` and ``value``
(``lora_alpha`` :data:`LORA_ALPHA`) and a trainable copy of the classifier head (peft's
``modules_to_save``, which travels whole and is averaged over every node);
:func:`full_factory` the same pre-trained model with every weight trainable (full
fine-tuning).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset

log = logging.getLogger(__name__)

#: Token ids: ``[CLS]``, then the content ids ``FIRST … FIRST + NUM_TOKENS - 1``.
CLS, FIRST, NUM_TOKENS = 0, 2, 16
VOCAB = FIRST + NUM_TOKENS
#: Sequence length (``[CLS]`` included) and number of classes (token groups).
SEQ_LEN, NUM_CLASSES = 16, 4
#: Probability that a content token of a class-``c`` sequence is drawn from group ``c``.
BIAS = 0.3
#: The BERT's size.
HIDDEN, LAYERS, HEADS, FFN = 32, 2, 4, 64
#: LoRA's targets and ``lora_alpha`` (the scale is ``lora_alpha / r_max`` on every node,
#: docs/lora.md, "The scale of a node's adapter").
TARGETS = ("query", "value")
LORA_ALPHA = 32
TASKS = ("a", "b")


def groups(task: str) -> torch.Tensor:
    """The group of every token id under ``task`` (``-1`` for ``[CLS]`` and the unused id 1).

    Raises
    ------
    ValueError
        If ``task`` is not ``"a"`` or ``"b"``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    out = torch.full((VOCAB,), -1, dtype=torch.long)
    ids = torch.arange(NUM_TOKENS)
    block, within = ids // 4, ids % 4
    out[FIRST:] = block if task == "a" else (block + (within >= 2).long()) % NUM_CLASSES
    return out


def labels_of(tokens: torch.Tensor, task: str) -> torch.Tensor:
    """The group holding strictly the most content tokens of each row of ``tokens``
    (``(n, SEQ_LEN)``), or ``-1`` where two groups tie for the most."""
    g = groups(task)[tokens]
    counts = torch.stack([(g == c).sum(1) for c in range(NUM_CLASSES)], dim=1)
    top = counts.max(1)
    unique = (counts == top.values[:, None]).sum(1) == 1
    return torch.where(unique, top.indices, torch.full_like(top.indices, -1))


def make_task(task: str, labels: torch.Tensor, generator: torch.Generator) -> TensorDataset:
    """Sequences of ``task`` whose labels are ``labels`` (one sequence per entry, in order).

    Each class-``c`` row is drawn as the module docstring says (tokens of group ``c`` with
    probability :data:`BIAS`, else uniform; redrawn until group ``c`` holds strictly the
    most), so :func:`labels_of` of the result is ``labels``.
    """
    g = groups(task)
    members = [torch.nonzero(g == c).flatten() for c in range(NUM_CLASSES)]
    n = int(labels.numel())
    tokens = torch.empty((n, SEQ_LEN), dtype=torch.long)
    tokens[:, 0] = CLS
    todo = torch.arange(n)
    while todo.numel():
        c = labels[todo]
        uniform = torch.randint(FIRST, VOCAB, (todo.numel(), SEQ_LEN - 1), generator=generator)
        pick = torch.randint(0, 4, (todo.numel(), SEQ_LEN - 1), generator=generator)
        biased = torch.stack(members)[c][torch.arange(todo.numel())[:, None], pick]
        use = torch.rand((todo.numel(), SEQ_LEN - 1), generator=generator) < BIAS
        tokens[todo, 1:] = torch.where(use, biased, uniform)
        todo = todo[labels_of(tokens[todo], task) != c]
    return TensorDataset(tokens, labels.clone().long())


def balanced(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` labels, as equal per class as ``n`` allows, in random order."""
    return torch.arange(n)[torch.randperm(n, generator=generator)] % NUM_CLASSES


def dirichlet_split(num_nodes: int, per_node: int, alpha: float, generator: torch.Generator) -> list[torch.Tensor]:
    """Each node's labels: ``per_node`` of them, the class shares drawn from
    ``Dirichlet(alpha)`` per node (label skew; Hsu, Qi & Brown, arXiv:1909.06335, 2019).

    Raises
    ------
    ValueError
        If ``alpha`` is not > 0 or a count is below 1.
    """
    if not alpha > 0 or num_nodes < 1 or per_node < 1:
        raise ValueError(f"need alpha > 0, num_nodes >= 1 and per_node >= 1, got {alpha}, {num_nodes}, {per_node}")
    concentration = torch.full((NUM_CLASSES,), float(alpha))
    out = []
    for _ in range(num_nodes):
        # Dirichlet = normalised Gamma(α) variates; torch.distributions draws from the global
        # generator, so its sampler (torch._standard_gamma) is called with ours
        gam = torch._standard_gamma(concentration, generator=generator)
        shares = gam / gam.sum()
        out.append(torch.multinomial(shares, per_node, replacement=True, generator=generator))
    return out


class LogitsOnly(nn.Module):
    """A ``transformers`` sequence classifier whose forward takes the token ids and returns
    the logits (``model(input_ids=x).logits``; with ``pad_token_id``, the ids equal to it
    are masked out of the attention: padded text rows).

    Declares no unit group (:meth:`unit_groups`): full fine-tuning masks nothing, and
    torch.fx cannot trace the BERT. A peft model around it is analysed by its LoRA rank
    groups, which :func:`fl_subnet.analyze` looks for first.
    """

    def __init__(self, model: nn.Module, pad_token_id: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.pad_token_id = pad_token_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_token_id is None:
            return self.model(input_ids=x).logits
        return self.model(input_ids=x, attention_mask=(x != self.pad_token_id).long()).logits

    def unit_groups(self) -> list:
        return []


def build_classifier(seed: int) -> LogitsOnly:
    """The tiny BERT classifier, its weights drawn from ``seed`` (no download)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=FFN, max_position_embeddings=SEQ_LEN, type_vocab_size=1,
                        num_labels=NUM_CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return LogitsOnly(BertForSequenceClassification(config))


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, batch_size: int = 1024) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on ``data``, in eval mode."""
    model.eval()
    x, y = data.tensors
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch_size):
        out = model(x[i:i + batch_size])
        correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
        loss += float(nn.functional.cross_entropy(out, y[i:i + batch_size], reduction="sum"))
    return correct / len(y), loss / len(y)


def pretrain(seed: int, steps: int = 600, batch_size: int = 64, lr: float = 5e-3,
             num_examples: int = 4096) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Pre-train :func:`build_classifier` ``(seed)`` centrally on task A.

    AdamW (weight decay 0.01) for ``steps`` steps of ``batch_size`` over ``num_examples``
    balanced task-A sequences drawn from ``seed``.

    Returns
    -------
    (state, info) : tuple[dict[str, torch.Tensor], dict[str, float]]
        The trained ``state_dict`` and ``{"task-a-acc": …, "task-b-acc": …}``: its accuracy
        on 2,000 fresh task-A sequences and, before any fine-tuning, on 2,000 task-B ones.
    """
    model = build_classifier(seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    train = make_task("a", balanced(num_examples, gen), gen)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    x, y = train.tensors
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_a = make_task("a", balanced(2000, gen), gen)
    test_b = make_task("b", balanced(2000, gen), gen)
    info = {"task-a-acc": accuracy(model, test_a)[0], "task-b-acc": accuracy(model, test_b)[0]}
    log.info("pre-trained seed %d on task A: %d steps, task A %.3f, task B (zero-shot) %.3f", seed, steps,
             info["task-a-acc"], info["task-b-acc"])
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, info


def _load(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model``, unless it was built on the ``meta`` device (the
    strategies and nodes build the model there for its shapes and fill it themselves)."""
    if not next(model.parameters()).is_meta:
        model.load_state_dict(state)


def full_factory(state: dict[str, torch.Tensor], seed: int) -> Callable[[], nn.Module]:
    """A factory of the pre-trained classifier with every weight trainable."""

    def factory() -> nn.Module:
        model = build_classifier(seed)
        _load(model, state)
        return model

    return factory


def lora_factory(state: dict[str, torch.Tensor], seed: int, rank: int,
                 targets: Sequence[str] = TARGETS, alpha: float = LORA_ALPHA) -> Callable[[], nn.Module]:
    """A factory of the peft model: the pre-trained classifier frozen, LoRA of rank
    ``rank`` on ``targets`` (peft's default init: ``A`` Kaiming-uniform, ``B`` zero, drawn
    from ``seed``) and a trainable copy of the classifier head (``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    def factory() -> nn.Module:
        model = build_classifier(seed)
        _load(model, state)
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(1_000 + seed)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), modules_to_save=["classifier"])
        return get_peft_model(model, config)

    return factory


def num_parameters(model: nn.Module, trainable: bool = True) -> int:
    """Parameters of ``model`` (only the trainable ones by default)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def megabytes(nbytes: float) -> float:
    """``nbytes`` in MB (10⁶ bytes)."""
    return nbytes / 1e6


__all__ = ["groups", "labels_of", "make_task", "balanced", "dirichlet_split", "LogitsOnly", "build_classifier",
           "accuracy", "pretrain", "full_factory", "lora_factory", "num_parameters", "megabytes",
           "VOCAB", "SEQ_LEN", "NUM_CLASSES", "TARGETS", "LORA_ALPHA"]
