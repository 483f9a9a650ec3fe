"""The run config's pre-trained transformer (``model = "hf-classifier"``), with or without
LoRA adapters.

A ``transformers`` sequence classifier whose forward takes token ids ``(N, T)`` (int64)
and returns logits ``(N, classes)`` (:class:`~fl_subnet.experiments.lora_task.LogitsOnly`):

* ``base-model = ""``: the tiny BERT of :mod:`fl_subnet.experiments.lora_task` (built from
  a config, nothing downloaded), pre-trained centrally on its task A for
  ``pretrain-steps`` AdamW steps from ``seed`` (:func:`pretrained_state`), the base that
  ``dataset = "shifted-majority"`` (task B) fine-tunes.
* ``base-model = "<folder>"``: a model written by ``save_pretrained`` (its config and
  weights; ``AutoModelForSequenceClassification`` with the data set's number of classes,
  a new head where the checkpoint has none), or a hub name when the machine is online.

With ``lora-rank`` > 0 the base is frozen and peft's LoRA adapters of rank ``lora-rank``
(``lora_alpha`` = ``lora-alpha``) go on the modules named in ``lora-targets``, with a
trainable copy of the classification head (peft's ``modules_to_save``): only those travel
(docs/lora.md). With ``lora-rank = 0`` every weight is trained (full fine-tuning).

Every process builds the same base: the pre-training runs on one thread (the same float
operations in every process of a machine) and its result is kept in the partition cache
folder (:mod:`fl_subnet.experiments.partition_cache`), so a fresh ``flwr-clientapp``
process per message reads it instead of training again; a base loaded from a folder is
read once per process. A node whose base differs anyway (another machine's float
rounding, another checkpoint) is refused by the base fingerprint, naming it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Names of the classification head in ``transformers``' sequence classifiers (BERT-like:
#: ``classifier``; Llama-, GPT-2-like: ``score``), made trainable next to the adapters.
HEAD_NAMES = ("classifier", "score")


@functools.lru_cache(maxsize=4)
def pretrained_state(seed: int, steps: int) -> dict[str, torch.Tensor]:
    """The tiny BERT pre-trained on task A (:func:`fl_subnet.experiments.lora_task.pretrain`,
    ``steps`` steps from ``seed``), once per process and through the partition cache.

    Returns
    -------
    dict[str, torch.Tensor]
        Its ``state_dict`` (do not modify: shared by the callers of this process).
    """
    from importlib.metadata import version

    from . import lora_task
    from .partition_cache import through_cache

    names = tuple(lora_task.build_classifier(seed).state_dict())

    def compute() -> tuple[torch.Tensor, ...]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the same reductions in every process of this machine
        try:
            state, info = lora_task.pretrain(seed, steps=steps)
        finally:
            torch.set_num_threads(threads)
        log.info("hf-classifier: pre-trained the base on task A (seed %d, %d steps): task A accuracy %.3f",
                 seed, steps, info["task-a-acc"])
        return tuple(state[k].contiguous() for k in names)

    fields = {"steps": int(steps), "torch": torch.__version__, "transformers": version("transformers")}
    tensors = through_cache("pretrained", "shifted-majority-bert", {"seed": int(seed)}, (lora_task.__file__,),
                            fields, names, compute)
    return dict(zip(names, tensors, strict=True))


@functools.lru_cache(maxsize=2)
def _loaded(base_model: str, num_labels: int):
    """``(config, state_dict)`` of ``base_model`` as a sequence classifier with
    ``num_labels`` classes, read once per process."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=num_labels)
    return model.config, {k: v.detach() for k, v in model.state_dict().items()}


def _base(base_model: str, seed: int, num_labels: int, pretrain_steps: int, pad_token_id: int | None) -> nn.Module:
    """The base classifier with its pre-trained weights (left empty on the ``meta`` device)."""
    from . import lora_task

    if not base_model:
        model = lora_task.build_classifier(seed)
        if num_labels != lora_task.NUM_CLASSES:
            raise ValueError(f"the built-in base (base-model = \"\") has {lora_task.NUM_CLASSES} classes; the data "
                             f"set has {num_labels}: set base-model to a model folder")
        state = pretrained_state(seed, pretrain_steps)
    else:
        from transformers import AutoModelForSequenceClassification

        config, state = _loaded(base_model, num_labels)
        torch.manual_seed(seed)
        model = lora_task.LogitsOnly(AutoModelForSequenceClassification.from_config(config),
                                     pad_token_id=pad_token_id)
        state = {f"model.{k}": v for k, v in state.items()}
    if not next(model.parameters()).is_meta:
        model.load_state_dict(state)
    return model


def head_name(model: nn.Module) -> str:
    """The name of ``model``'s classification head (:data:`HEAD_NAMES`).

    Raises
    ------
    ValueError
        Naming ``base-model`` if the model has none of them.
    """
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"base-model: the classifier has no head named {' or '.join(HEAD_NAMES)}: cannot make it "
                     "trainable next to the LoRA adapters")


def classifier(base_model: str, seed: int, num_labels: int, pretrain_steps: int, lora_rank: int,
               lora_alpha: float, lora_targets: tuple[str, ...], pad_token_id: int | None = None) -> nn.Module:
    """One build of the run config's ``hf-classifier`` (module docstring).

    Raises
    ------
    ValueError
        Naming ``lora-targets`` if no module of the base matches them (peft's own error,
        reworded), or ``base-model`` as :func:`head_name`.
    """
    model = _base(base_model, seed, num_labels, pretrain_steps, pad_token_id)
    if lora_rank == 0:
        return model
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1_000 + seed)
    config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(lora_targets),
                        modules_to_save=[head_name(model.model)])
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(f"lora-targets {','.join(lora_targets)!r}: {err}") from None


def classifier_factory(cfg, num_labels: int, pad_token_id: int | None = None) -> Callable[[], nn.Module]:
    """A no-argument factory of ``cfg``'s ``hf-classifier`` with ``num_labels`` classes."""
    targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
    return functools.partial(classifier, cfg.base_model, cfg.seed, num_labels, cfg.pretrain_steps, cfg.lora_rank,
                             cfg.lora_alpha, targets, pad_token_id)


def pad_token_id(base_model: str) -> int | None:
    """The pad token id of ``base_model``'s tokenizer (the attention mask of a padded text
    row), or None for the built-in base (whose sequences are never padded)."""
    if not base_model:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model).pad_token_id


__all__ = ["HEAD_NAMES", "pretrained_state", "head_name", "classifier", "classifier_factory", "pad_token_id"]
