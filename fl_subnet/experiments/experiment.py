"""What a RunConfig means in practice: data, model, strategy, evaluation, one run.

Shared by the ServerApp (``flwr run``), the ClientApp and the ``fl-subnet`` command,
so that the three see exactly the same data, model and strategy.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid
from torch.utils.data import TensorDataset

from .config import (CONV1D_MODELS, CONV_MODELS, DATASET_INFO, IMAGE_DATASETS, RESUMABLE_KEYS, SIGNAL_DATASETS,
                     TOKEN_DATASETS, RunConfig)
from fl_subnet.core.device import check_amp, resolve_device
from fl_subnet.wire import arrays_to_state
from .zoo import model_factory
from fl_subnet.exceptions import RunFailed  # noqa: F401  (re-exported: raised here)

log = logging.getLogger(__name__)

#: (input features, classes) of every data set of fixed width, from the run config's
#: :data:`~fl_subnet.experiments.config.DATASET_INFO` (the synthetic sets take ``input-dim``).
DIMS = {name: (info.features, info.classes) for name, info in DATASET_INFO.items() if info.features is not None}
#: (C, H, W) of each image data set, as the conv models read its flat features.
IMAGE_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32),
                "mnist-5k": (1, 28, 28)}
if set(IMAGE_SHAPES) != set(IMAGE_DATASETS) or any(
        math.prod(shape) != DIMS[name][0] for name, shape in IMAGE_SHAPES.items()):  # pragma: no cover
    raise AssertionError(f"IMAGE_SHAPES {IMAGE_SHAPES} must give every image data set {IMAGE_DATASETS} "
                         "its DATASET_INFO features")
#: (C, L) of each 1-D signal data set, as the 1-D conv models (``cnn1d``) read its flat features.
SIGNAL_SHAPES = {"mnist1d": (1, 40)}
if set(SIGNAL_SHAPES) != set(SIGNAL_DATASETS) or any(
        math.prod(shape) != DIMS[name][0] for name, shape in SIGNAL_SHAPES.items()):  # pragma: no cover
    raise AssertionError(f"SIGNAL_SHAPES {SIGNAL_SHAPES} must give every signal data set {SIGNAL_DATASETS} "
                         "its DATASET_INFO features")


#: The full model as evaluated, for strategies that scale it at evaluation (IST ``ist-scaling = "eval"``).
DEPLOYED_FILE = "model-deployed.safetensors"


def data_dims(cfg: RunConfig) -> tuple[int, int]:
    """(input features, outputs) of the configured data set."""
    if cfg.dataset == "synthetic-sequence":
        return cfg.input_dim, 2
    if cfg.dataset == "text":
        return cfg.input_dim, cfg.num_classes
    return DIMS.get(cfg.dataset, (cfg.input_dim, 1))


def _conv_shape(cfg: RunConfig) -> tuple[int, ...] | None:
    """``(C, H, W)`` for a 2-D conv model, ``(C, L)`` for a 1-D one, else None."""
    if cfg.model in CONV_MODELS:
        return IMAGE_SHAPES[cfg.dataset]
    if cfg.model in CONV1D_MODELS:
        return SIGNAL_SHAPES[cfg.dataset]
    return None


def input_shape(cfg: RunConfig) -> tuple[int, ...]:
    """Shape of one model input (no batch dim): ``(C, H, W)`` for the 2-D conv models,
    ``(C, L)`` for the 1-D ones (``cnn1d``), else ``(d,)``."""
    return _conv_shape(cfg) or (data_dims(cfg)[0],)


def as_model_input(cfg: RunConfig, x: torch.Tensor) -> torch.Tensor:
    """Flat float features ``(N, d)`` as the model takes them: images ``(N, C, H, W)``
    for the 2-D conv models, signals ``(N, C, L)`` for the 1-D ones, int64 token ids
    ``(N, T)`` for the sequence models (``transformer``, ``hf-classifier``), else unchanged."""
    shape = _conv_shape(cfg)
    if shape is not None:
        return x.reshape(len(x), *shape)
    if cfg.model in ("transformer", "hf-classifier") and cfg.dataset in TOKEN_DATASETS:
        return x.long()
    return x


def example_input(cfg: RunConfig) -> torch.Tensor:
    """A two-row input batch of the right shape and dtype (for the analysis: a BatchNorm
    without running statistics, as in ``mlp-bn``, needs more than one row)."""
    return as_model_input(cfg, torch.zeros(2, data_dims(cfg)[0]))


def data_kwargs(cfg: RunConfig) -> dict[str, int]:
    """Loader keywords of the configured data set (size of the synthetic sets; the folder,
    tokenizer and length of ``text``)."""
    if cfg.dataset == "synthetic-regression":
        return {"n": cfg.num_samples, "d": cfg.input_dim}
    if cfg.dataset == "synthetic-sequence":
        return {"n": cfg.num_samples, "seq_len": cfg.input_dim}
    if cfg.dataset == "shifted-majority":
        return {"n": cfg.num_samples}
    if cfg.dataset == "text":
        return {"path": cfg.dataset_path, "tokenizer": cfg.base_model, "seq_len": cfg.input_dim}
    return {}


def factory_for(cfg: RunConfig) -> Callable[[], torch.nn.Module]:
    """The full-model factory of ``cfg``."""
    d_in, d_out = data_dims(cfg)
    if cfg.model == "hf-classifier":
        from .hf_model import classifier_factory, pad_token_id

        return classifier_factory(cfg, d_out, pad_token_id(cfg.base_model) if cfg.dataset == "text" else None)
    return model_factory(cfg, _conv_shape(cfg) or d_in, d_out)


def _dataset(cfg: RunConfig, x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    return TensorDataset(as_model_input(cfg, x), y)


def node_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[TensorDataset, TensorDataset | None]:
    """One node's (train, local test) sets: its partition, or all data (``data-scope=all``)."""
    from .data import load_centralized_train, load_partition

    if cfg.data_scope == "all":
        return _dataset(cfg, *load_centralized_train(cfg.dataset, data_seed=cfg.seed, **data_kwargs(cfg))), None
    tx, ty, vx, vy = load_partition(
        cfg.dataset, partition_id, num_partitions, cfg.partitioning, cfg.dirichlet_alpha, seed=cfg.seed,
        classes_per_partition=cfg.classes_per_partition, data_seed=cfg.seed, **data_kwargs(cfg))
    return _dataset(cfg, tx, ty), (_dataset(cfg, vx, vy) if len(vx) else None)


@functools.lru_cache(maxsize=8)
def _config_of(items: tuple) -> RunConfig:
    return RunConfig.from_mapping({k: v for k, _, v in items})


def context_config(context: Context) -> RunConfig:
    """The validated RunConfig of a ClientApp's ``context.run_config``, built once per
    distinct run config (a RunConfig is frozen; validating it is most of a node query's
    cost and a fair share of a small train message's).

    Raises
    ------
    ValueError
        As :meth:`RunConfig.from_mapping`, naming the key.
    """
    try:
        items = tuple((k, type(v), v) for k, v in sorted(context.run_config.items()))  # True and 1 differ
        hash(items)
    except TypeError:  # an unhashable value: validated afresh (and refused) each call
        return RunConfig.from_mapping(context.run_config)
    return _config_of(items)


def context_data(context: Context) -> tuple[TensorDataset, TensorDataset | None]:
    """``node_data`` for a ClientApp's context (run config + ``partition-id``)."""
    cfg = context_config(context)
    pid = int(context.node_config.get("partition-id", 0))
    n = int(context.node_config.get("num-partitions", cfg.num_nodes))
    return node_data(cfg, pid, n)


def local_device(cfg: RunConfig) -> torch.device:
    """The device ``cfg`` trains on when every node runs on this machine (``fl-subnet``'s
    in-process runs): ``device`` resolved here, ``amp`` checked against it.

    Raises
    ------
    ValueError
        Naming ``device`` (a CUDA device this machine lacks) or ``amp`` (``fp16`` without CUDA).
    """
    device = resolve_device(cfg.device, key="device")
    check_amp(cfg.amp, device)
    return device


def evaluation_device(cfg: RunConfig) -> torch.device:
    """Where the server's central evaluation runs: ``device`` resolved on the server's
    machine. A ``device`` the server lacks (it names the nodes' hardware, e.g. ``cuda`` with
    a CPU-only SuperLink host) evaluates on the CPU, logged once."""
    try:
        return resolve_device(cfg.device, key="device")
    except ValueError as err:
        log.warning("central evaluation runs on the CPU: %s", err)
        return torch.device("cpu")


class CentralEvaluation:
    """Flower ``evaluate_fn``: the global model on the global test and train sets.

    Called by ``Strategy.start`` before round 1 (round 0) and after every round. It
    returns ``eval-loss``, ``eval-acc`` (classification) and ``full-train-loss`` (the
    full model's loss on the union of all training data: the quantity of Liao &
    Kyrillidis' theorems), and passes one metrics row per round to ``on_round``
    together with the strategy's train metrics of that round (bytes, coverage, ...).
    The model is evaluated on ``device`` (default :func:`evaluation_device`: the run
    config's ``device`` on this machine).
    """

    def __init__(self, cfg: RunConfig, strategy, on_round: Callable[[dict], None] | None = None, *,
                 checkpoint_dir: str | Path | None = None, resume_meta: dict | None = None,
                 train_set: TensorDataset | None = None, device: torch.device | str | None = None):
        from .data import load_centralized_test

        self.cfg = cfg
        self.device = evaluation_device(cfg) if device is None else resolve_device(device)
        self.checkpoint_dir = checkpoint_dir
        self.resuming = bool(resume_meta)
        self.replies = 0  # valid replies over the rounds of this process
        self.last_loss = float("nan")
        self.strategy = strategy
        self.on_round = on_round
        self.factory = factory_for(cfg)
        kw = data_kwargs(cfg)
        self.test = _dataset(cfg, *load_centralized_test(cfg.dataset, data_seed=cfg.seed, **kw))
        self.train = train_set if train_set is not None else self.train_set(cfg)
        self.t0 = time.perf_counter() - float((resume_meta or {}).get("seconds", 0.0))
        self.cumulative = int((resume_meta or {}).get("cumulative-bytes", 0))

    @staticmethod
    def train_set(cfg: RunConfig) -> TensorDataset:
        """The union of all training partitions (the full model's training loss)."""
        from .data import load_centralized_train

        return _dataset(cfg, *load_centralized_train(cfg.dataset, data_seed=cfg.seed, **data_kwargs(cfg)))

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        from fl_subnet.checkpoint import save_checkpoint
        from fl_subnet.clients.train import evaluate_model

        from .results import config_dict

        model = self.factory()
        state = arrays_to_state(arrays)
        deployed = self.strategy.deployed_state(state) if self.strategy is not None else state
        # the full model as evaluated (IST scaling "eval": 1/p folded in); with a frozen base the
        # state holds the trainable tensors only, loaded over the base the factory built
        frozen = getattr(self.strategy, "frozen", None) is not None
        model.load_state_dict(deployed, strict=not frozen)
        loss = self.cfg.loss_name
        test = evaluate_model(model, self.test, loss, device=self.device)
        train = evaluate_model(model, self.train, loss, device=self.device)
        metrics = MetricRecord({**test, "full-train-loss": train["eval-loss"]})
        tm = getattr(self.strategy, "last_train_metrics", None) if server_round > 0 else None
        tm = dict(tm) if tm is not None else {}
        self.last_loss = train["eval-loss"]
        if server_round == 0 and self.resuming:  # the checkpoint's round: already recorded
            return metrics
        server_round += getattr(self.strategy, "round_offset", 0)
        self.replies += int(tm.get("num-replies", 0))
        down, up = int(tm.get("bytes-down", 0)), int(tm.get("bytes-up", 0))
        self.cumulative += down + up
        row = {
            "server-round": server_round, "strategy": self.cfg.strategy,
            "train-loss": float(tm.get("train-loss", float("nan"))),
            "full-train-loss": train["eval-loss"], "eval-loss": test["eval-loss"],
            "eval-acc": test.get("eval-acc", float("nan")),
            "bytes-down": down, "bytes-up": up, "cumulative-bytes": self.cumulative,
            "coverage": float(tm.get("coverage", float("nan"))),
            "num-replies": int(tm.get("num-replies", 0)), "num-rejected": int(tm.get("num-rejected", 0)),
            "model-kept": int(tm.get("model-kept", 0)),  # 1: the round's aggregate was not finite
            "seconds": time.perf_counter() - self.t0,
        }
        log.info("round %d: full-train-loss %.4g, eval-loss %.4g, eval-acc %.4f, %.2f MB so far",
                 server_round, row["full-train-loss"], row["eval-loss"], row["eval-acc"],
                 self.cumulative / 1e6)
        if server_round == self.cfg.num_server_rounds:
            row.update(self.tier_metrics(model.state_dict() if frozen else state))
        if self.on_round is not None:
            self.on_round(row)  # the metrics first: a kill before the checkpoint redoes this round
        if self.checkpoint_dir is not None:
            if deployed is not state:  # the model to use; model.safetensors holds the training state
                from fl_subnet.checkpoint import save_model

                save_model(Path(self.checkpoint_dir) / DEPLOYED_FILE, deployed, {"server-round": server_round})
            opt = getattr(self.strategy, "server_optimizer", None)
            meta = {"server-round": server_round, "cumulative-bytes": self.cumulative, "seconds": row["seconds"],
                    "config": config_dict(self.cfg)}
            history = list(getattr(self.strategy, "ratio_history", ()))
            if history:  # the median bound's earlier ratios (Defences.bound), for a resume that screens alike
                meta["ratio-history"] = history
            save_checkpoint(self.checkpoint_dir, state, meta,
                            optimizer_state=opt.state_dict() if opt is not None else None,
                            clip_center=getattr(self.strategy, "clip_center", None),
                            width_stats=getattr(self.strategy, "width_stats", None))
        return metrics

    def tier_metrics(self, state: dict) -> dict[str, float]:
        """``tier-<r>-acc``/``-loss``/``-params`` of each capacity tier of the strategy
        (HeteroFL, FedRolex, FjORD, core alternation; :mod:`fl_subnet.tiers`), each
        sub-model evaluated alone on the test set and, with a checkpoint folder, saved
        there as ``tier-<r>.safetensors``. A strategy without tiers reports the
        ``capacity-tiers`` of the run config if it names any (the nested prefixes of its
        model), else ``{}``."""
        from fl_subnet.tiers import capacity_tiers, evaluate_tiers

        from .results import config_dict

        tiers = capacity_tiers(self.strategy)
        if not tiers and self.cfg.capacity_tiers != "1.0":
            # a strategy without tiers (FedAvg, IST, dropout) in a run that names capacity tiers: report
            # the nested prefixes of its model too, the sub-models a small node would be given
            tiers = tuple(sorted(set(self.cfg.tiers())))
        if not tiers:
            return {}
        calibration = _batches(self.train, self.cfg.batch_size) if self.cfg.batchnorm == "static" else None
        return evaluate_tiers(state, self.factory, tiers, self.test, loss=self.cfg.loss_name,
                              example_input=example_input(self.cfg), spec=getattr(self.strategy, "spec", None),
                              calibration_batches=calibration, out_dir=self.checkpoint_dir,
                              meta={"config": config_dict(self.cfg)},
                              tier_state=getattr(self.strategy, "tier_state", None))

    def check_outcome(self) -> None:
        """Raise :class:`RunFailed` if no round had a valid reply or the loss diverged."""
        if self.replies == 0:
            raise RunFailed("no node produced a valid train reply in any round: the model is untrained "
                            "(see the 'rejected reply' log lines for each node's reason)")
        if not math.isfinite(self.last_loss):
            raise RunFailed(f"the run diverged: final full-train-loss is {self.last_loss} "
                            "(lower lr, or screen updates)")


def _batches(dataset: TensorDataset, batch_size: int) -> list[torch.Tensor]:
    """The inputs of ``dataset`` in batches of ``batch_size`` (0: one batch), in order."""
    x = dataset.tensors[0]
    size = batch_size or len(x)
    return [x[i:i + size] for i in range(0, len(x), size)]


def run_server(grid: Grid, cfg: RunConfig, on_round: Callable[[dict], None] | None = None, *,
               checkpoint_dir: str | Path | None = None, resume: bool = False):
    """Run ``cfg`` on ``grid``: the body of the ServerApp and of ``fl-subnet run``.

    Parameters
    ----------
    grid : Grid
        Flower's Grid (a simulation, a deployment, or the in-process grid).
    cfg : RunConfig
    on_round : Callable[[dict], None], optional
        Receives one metrics row per round (round 0 = the initial model).
    checkpoint_dir : str or Path, optional
        After every round the global model and the state to continue are saved there
        (:func:`fl_subnet.checkpoint.save_checkpoint`: ``model.safetensors``,
        ``checkpoint.json``), atomically.
    resume : bool
        Continue from the checkpoint in ``checkpoint_dir``, verified on load
        (:func:`fl_subnet.checkpoint.load_checkpoint`); its run config must equal ``cfg``
        but for :data:`~fl_subnet.experiments.config.RESUMABLE_KEYS` (rounds, timeouts,
        defences). The rounds after it are run with their own numbers, so with the same
        config the final model equals an uninterrupted run's.

    Returns
    -------
    flwr.serverapp.strategy.Result or None
        None if the checkpoint already holds the last round.

    Raises
    ------
    RunFailed
        If no round had a valid reply, or the final full-model loss is not finite.
    ValueError
        If the checkpoint belongs to another run config (naming the keys).
    fl_subnet.checkpoint.CheckpointError
        (a ``ValueError``) If the checkpoint fails verification; nothing is written.
    ModuleNotFoundError
        Before anything runs, if a package the data set, the plots or the model need is
        missing (:func:`fl_subnet.experiments.extras.require`: names the extra to install).
    """
    from fl_subnet.checkpoint import load_checkpoint
    from fl_subnet.strategies import build_strategy

    from .extras import require, run_packages
    from .results import config_dict

    require(run_packages(cfg.dataset, cfg.model), what=f"the run config (dataset {cfg.dataset!r}, model {cfg.model!r})")

    factory = factory_for(cfg)
    torch.manual_seed(cfg.seed)
    initial_state = factory().state_dict()
    meta: dict = {}
    if resume:
        if checkpoint_dir is None:
            raise ValueError("resume needs a checkpoint_dir")
        initial_state, meta = load_checkpoint(checkpoint_dir)
        # a key the checkpoint predates counts with its default (new keys never change old runs)
        saved, now = {**config_dict(RunConfig()), **meta.get("config", {})}, config_dict(cfg)
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        differ = [k for k in changed if k not in RESUMABLE_KEYS]
        if differ:
            raise ValueError(f"cannot resume {checkpoint_dir}: run-config key(s) {differ} differ from the "
                             f"checkpoint's ({', '.join(f'{k}={saved.get(k)!r}' for k in differ)}); a resumed "
                             f"run may change only {sorted(RESUMABLE_KEYS)}")
        log.info("resuming %s after server round %d%s", checkpoint_dir, meta["server-round"],
                 "".join(f"; {k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed
                         if k not in ("out-dir", "resume-from")))
    first_round = int(meta.get("server-round", 0)) + 1
    if first_round > cfg.num_server_rounds:
        log.info("nothing to do: the checkpoint holds round %d of %d", first_round - 1, cfg.num_server_rounds)
        return None
    train = CentralEvaluation.train_set(cfg)
    # static BatchNorm: the server recomputes the statistics on the training data
    calibration = _batches(train, cfg.batch_size) if cfg.batchnorm == "static" else None
    strategy = build_strategy(cfg, factory, example_input=example_input(cfg), calibration_batches=calibration)
    if resume and strategy.server_optimizer is not None:
        from fl_subnet.checkpoint import load_optimizer_state

        saved_opt = load_optimizer_state(checkpoint_dir, first_round - 1)
        if saved_opt is None:
            raise ValueError(f"cannot resume {checkpoint_dir}: no server-optimizer state of round {first_round - 1}")
        strategy.server_optimizer.load_state_dict(saved_opt)
    if resume:
        history = meta.get("ratio-history", [])
        if not isinstance(history, list) or not all(isinstance(r, (int, float)) and math.isfinite(r) and r >= 0
                                                    for r in history):
            raise ValueError(f"cannot resume {checkpoint_dir}: 'ratio-history' in its header must be a list of "
                             "finite numbers >= 0")
        strategy.ratio_history.extend(float(r) for r in history)
        from fl_subnet.checkpoint import load_clip_center

        # centered clipping starts from the previous round's aggregate update (none saved: from 0)
        strategy.clip_center = load_clip_center(checkpoint_dir, first_round - 1)
        if getattr(strategy, "bn", None) == "per-width":  # FjORD's per-width BatchNorm statistics
            from fl_subnet.checkpoint import load_width_stats

            strategy.restore_width_stats(load_width_stats(checkpoint_dir, first_round - 1))
            if strategy.width_stats is None:
                log.warning("resume: %s has no per-width statistics of round %d: every width starts from the "
                            "model's own", checkpoint_dir, first_round - 1)
    evaluate = CentralEvaluation(cfg, strategy, on_round, checkpoint_dir=checkpoint_dir, resume_meta=meta,
                                 train_set=train)
    from fl_subnet.strategies.base import NotEnoughNodes, TrainingStalled

    try:
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_state), first_round=first_round,
                                num_rounds=cfg.num_server_rounds, timeout=cfg.round_timeout,
                                train_config=ConfigRecord(cfg.train_config()),
                                evaluate_config=ConfigRecord(cfg.train_config()), evaluate_fn=evaluate)
    except (TrainingStalled, NotEnoughNodes) as err:
        raise RunFailed(str(err)) from err
    evaluate.check_outcome()
    return result
