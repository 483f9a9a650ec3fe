"""The local work of a client: τ SGD steps (or E epochs) on its compact sub-model."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fl_subnet.core.device import AMP_MODES, autocast, grad_scaler, model_device, resolve_device
from fl_subnet.core.label_split import check_labels, mask_logits
from fl_subnet.core.ordered import WidthSchedule, fjord_kd_loss
from fl_subnet.wire.records import LABELS_KEY

LOSSES = ("cross-entropy", "mse")


def config_int(config: Mapping[str, object], key: str, default: int) -> int:
    """``config[key]`` as an int (``default`` when absent).

    Raises
    ------
    ValueError
        Naming the key, if the value is not an integer (a bool, ``"x"``, ``2.5``).
    """
    raw = config.get(key, default)
    try:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError
        return int(raw)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"config key '{key}' must be an integer, got {str(raw)[:80]!r}") from None


def config_float(config: Mapping[str, object], key: str, default: float) -> float:
    """``config[key]`` as a finite float (``default`` when absent).

    Raises
    ------
    ValueError
        Naming the key, if the value is not a finite number (``"abc"``, ``nan``, a bool).
    """
    raw = config.get(key, default)
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = float(raw)
    except (TypeError, ValueError, OverflowError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"config key '{key}' must be a finite number, got {str(raw)[:80]!r}")
    return value


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings, read from the ConfigRecord a node receives.

    Attributes
    ----------
    local_steps : int
        τ SGD steps (``local-steps``); 0 means run ``local_epochs`` instead.
    local_epochs : int
        E passes over the local data (``local-epochs``), used when τ = 0.
    lr, momentum, weight_decay : float
        ``torch.optim.SGD`` settings (``lr``, ``momentum``, ``weight-decay``).
    batch_size : int
        Mini-batch size (``batch-size``); 0 means full batch (the paper's GD).
    loss : {"cross-entropy", "mse"}
        ``mse`` is ½·mean squared error (Liao & Kyrillidis, §2).
    seed : int
        Seeds the batch order together with the server round and partition.
    labels : tuple[int, ...]
        HeteroFL's label split (``labels``, sorted): the labels this node holds; the
        logits of the others are set to 0 before the loss
        (:func:`fl_subnet.core.label_split.mask_logits`). Empty: no masking.
    amp : {"none", "bf16", "fp16"}
        Mixed precision of the forward passes (``amp``, :func:`fl_subnet.core.device.autocast`):
        none, bfloat16 autocast (CPU or CUDA), or float16 autocast with a gradient scaler
        (CUDA only). The key is absent from the train config when it is ``none``.
    """

    local_steps: int = 1
    local_epochs: int = 1
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    loss: str = "cross-entropy"
    seed: int = 0
    labels: tuple[int, ...] = ()
    amp: str = "none"

    #: Most local steps / epochs a node accepts from a server message (more is refused,
    #: naming the key, instead of running until the node is killed).
    MAX_LOCAL_STEPS, MAX_LOCAL_EPOCHS = 10**6, 10**4

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> "TrainConfig":
        """Build from kebab-case config keys; missing keys take the defaults.

        Raises
        ------
        ValueError
            Naming the key, for a value that is not a number (an integer for counts), a
            negative count, more than :attr:`MAX_LOCAL_STEPS` local steps or
            :attr:`MAX_LOCAL_EPOCHS` local epochs, a non-positive or non-finite lr, an
            unknown loss, or ``labels`` that are not a non-empty list of distinct ints
            >= 0 (or given with a loss other than cross-entropy), or an ``amp`` that is not
            one of ``("none", "bf16", "fp16")``.
        """
        d = cls()
        cfg = cls(
            local_steps=config_int(config, "local-steps", d.local_steps),
            local_epochs=config_int(config, "local-epochs", d.local_epochs),
            lr=config_float(config, "lr", d.lr),
            momentum=config_float(config, "momentum", d.momentum),
            weight_decay=config_float(config, "weight-decay", d.weight_decay),
            batch_size=config_int(config, "batch-size", d.batch_size),
            loss=str(config.get("loss", d.loss)),
            seed=config_int(config, "seed", d.seed),
            labels=check_labels(config.get(LABELS_KEY), key=LABELS_KEY),
            amp=config.get("amp", d.amp),
        )
        for key, value, most in (("local-steps", cfg.local_steps, cls.MAX_LOCAL_STEPS),
                                 ("local-epochs", cfg.local_epochs, cls.MAX_LOCAL_EPOCHS)):
            if value > most:
                raise ValueError(f"{key} must be <= {most} (the most a node accepts), got {value}")
        for key, value in (("local-steps", cfg.local_steps), ("local-epochs", cfg.local_epochs),
                           ("batch-size", cfg.batch_size)):
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        if cfg.local_steps == 0 and cfg.local_epochs == 0:
            raise ValueError("local-steps and local-epochs cannot both be 0")
        if not cfg.lr > 0:
            raise ValueError(f"lr must be > 0, got {cfg.lr}")
        if not isinstance(cfg.amp, str) or cfg.amp not in AMP_MODES:
            raise ValueError(f"config key 'amp' must be one of {AMP_MODES}, got {str(cfg.amp)[:80]!r}")
        if cfg.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
        if cfg.labels and cfg.loss != "cross-entropy":
            raise ValueError(f"{LABELS_KEY} (HeteroFL's label split) masks classification logits: it needs loss "
                             f"'cross-entropy', got {cfg.loss!r}")
        return cfg


def loss_fn(name: str, out: torch.Tensor, y: torch.Tensor, labels: tuple[int, ...] = ()) -> torch.Tensor:
    """Mean loss of a batch: cross-entropy, or ½·MSE (targets of shape ``out.shape``).

    ``labels`` (HeteroFL's label split): the labels the node holds; the other logits of
    ``out`` ``(N, C)`` are set to 0 before the cross-entropy, as HeteroFL's models do
    (``out.masked_fill(label_mask == 0, 0)``, :func:`fl_subnet.core.label_split.mask_logits`).

    Raises
    ------
    ValueError
        Naming ``labels``, if a label is outside ``[0, C)``.
    """
    if name == "mse":
        return 0.5 * (out - y.view_as(out)).pow(2).mean()
    return F.cross_entropy(mask_logits(out, labels) if labels else out, y)


def make_loader(data: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """A DataLoader with a seeded order; ``batch_size`` 0 means the whole set at once."""
    size = len(data) if batch_size == 0 else batch_size
    gen = torch.Generator().manual_seed(int(seed))
    return DataLoader(data, batch_size=max(size, 1), shuffle=shuffle, generator=gen)


def train_local(model: nn.Module, data: Dataset, cfg: TrainConfig, seed: int = 0, *,
                before_step: Callable[[int], object] | None = None,
                device: str | torch.device | None = None) -> tuple[int, float]:
    """Train ``model`` in place on ``data``.

    Parameters
    ----------
    model : nn.Module
        The compact sub-model; only parameters with ``requires_grad`` are updated.
    data : Dataset
        Yields ``(x, y)`` pairs.
    cfg : TrainConfig
        τ steps if ``cfg.local_steps`` > 0 (cycling through the data), else E epochs;
        ``cfg.labels`` (label split) masks the logits of the other labels in the loss.
    seed : int
        Batch-order seed (e.g. derived from run seed, server round and partition).
    before_step : Callable[[int], object], optional
        Called with the step index (0, 1, …) before each batch's forward, e.g. FjORD's
        per-batch width (:func:`fl_subnet.clients.compact.width_schedule`). An active
        :class:`~fl_subnet.core.ordered.WidthSchedule` with ``distill`` (FjORD+KD,
        Horváth et al. NeurIPS 2021 §3.3; train config ``fjord-distill``) makes each
        step a teacher pass at the max width ``p_max`` with the cross-entropy, then the
        drawn width on :func:`~fl_subnet.core.ordered.fjord_kd_loss` against the
        teacher's detached logits, the two gradients summed into one optimizer step, as
        Flower's FjORD baseline (``baselines/fjord/fjord/models.py``, ``train``).
    device : str or torch.device, optional
        Where to train: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a
        ``torch.device`` (:func:`fl_subnet.core.device.resolve_device`). The model is
        moved there in place and stays there (move it back with ``model.cpu()`` if
        needed); each batch is moved there. None (default): the model's current device,
        so a model already on the GPU trains there and a CPU model on the CPU.

    Returns
    -------
    tuple[int, float]
        ``num-examples`` (size of the local set) and the mean training loss over the
        steps taken (with FjORD+KD the width-``p`` pass's KD loss, as the baseline
        reports). A batch of a single row is skipped (not counted as a step) when the
        model has an ``nn.BatchNorm1d``, which cannot normalise one row in training.

    Raises
    ------
    ValueError
        Naming ``fjord-distill``, if distillation is asked for with a loss other than
        cross-entropy; naming ``device``, for a device this machine lacks (``cuda``
        without CUDA); naming ``amp``, for ``fp16`` on a device other than CUDA.

    Notes
    -----
    ``cfg.amp`` (``bf16``/``fp16``) runs each forward pass and loss under
    ``torch.autocast`` on the training device (backward and the optimizer step outside
    it, the parameters stay float32); ``fp16`` also scales the loss with a
    ``torch.amp.GradScaler``, which skips a step whose gradients overflowed.
    """
    distill = isinstance(before_step, WidthSchedule) and before_step.active and before_step.distill
    if distill and cfg.loss != "cross-entropy":
        raise ValueError(f"fjord-distill (FjORD's self-distillation) needs loss 'cross-entropy', got {cfg.loss!r}")
    if device is None:
        dev = model_device(model)
    else:
        dev = resolve_device(device)
        if any(t.device != dev for t in itertools.chain(model.parameters(), model.buffers())):
            model.to(dev)  # (Module.to walks every module even when nothing moves)
    scaler = grad_scaler(dev, cfg.amp)  # None but for fp16; ValueError naming 'amp' where it cannot run
    amp = autocast(dev, cfg.amp)  # reusable: a nullcontext, or torch.autocast

    def backward(value: torch.Tensor) -> None:
        (value if scaler is None else scaler.scale(value)).backward()

    loader = make_loader(data, cfg.batch_size, shuffle=True, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.local_steps > 0:
        batches = itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), cfg.local_steps)
    else:
        batches = itertools.chain.from_iterable(itertools.repeat(loader, cfg.local_epochs))
    model.train()
    # the loss summed on the device in float64 (as Python's float sum would): no host sync per step
    total, steps = torch.zeros((), dtype=torch.float64, device=dev), 0
    # BatchNorm1d cannot normalise a batch of one row in training: skip such a trailing batch
    singletons_fail = any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    for x, y in batches:
        if singletons_fail and len(x) < 2:
            continue
        x, y = x.to(dev), y.to(dev)  # no copy when already there
        if before_step is not None:
            before_step(steps)
        if distill:  # FjORD+KD: teacher p_max on the labels, then width p on its soft outputs
            opt.zero_grad()
            with before_step.teacher():
                with amp:
                    full = model(x)
                    teacher_loss = loss_fn(cfg.loss, full, y, cfg.labels)
                backward(teacher_loss)
            with amp:
                student = model(x)
                loss = fjord_kd_loss(mask_logits(student, cfg.labels) if cfg.labels else student,
                                     mask_logits(full, cfg.labels) if cfg.labels else full)
            backward(loss)
        else:
            with amp:
                loss = loss_fn(cfg.loss, model(x), y, cfg.labels)
            opt.zero_grad()
            backward(loss)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        total += loss.detach().double()
        steps += 1
    return len(data), (float(total) / steps if steps else math.nan)


@torch.no_grad()
def evaluate_model(model: nn.Module, data: Dataset, loss: str, batch_size: int = 512, *,
                   device: str | torch.device | None = None) -> dict[str, float]:
    """``eval-loss`` (mean over examples) and, for classification, ``eval-acc``.

    Parameters
    ----------
    model : nn.Module
        Evaluated in eval mode.
    data : Dataset
        Yields ``(x, y)`` pairs.
    loss : {"cross-entropy", "mse"}
    batch_size : int
        Rows per forward pass.
    device : str or torch.device, optional
        Where to evaluate (as :func:`train_local`'s ``device``: the model is moved there in
        place, each batch too); None: the model's current device.

    Raises
    ------
    ValueError
        Naming ``device``, for a device this machine lacks.
    """
    if device is None:
        dev = model_device(model)
    else:
        dev = resolve_device(device)
        model.to(dev)
    model.eval()
    n, total, correct = 0, 0.0, 0
    for x, y in DataLoader(data, batch_size=batch_size):
        x, y = x.to(dev), y.to(dev)
        out = model(x)
        total += float(loss_fn(loss, out, y)) * len(x)
        if loss == "cross-entropy":
            correct += int((out.argmax(1) == y).sum())
        n += len(x)
    metrics = {"eval-loss": total / max(n, 1)}
    if loss == "cross-entropy":
        metrics["eval-acc"] = correct / max(n, 1)
    return metrics
