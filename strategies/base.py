"""The subnetwork strategy: one mask per node per round, compact slices down, masked
aggregation up (docs/design.md; Liao & Kyrillidis, TMLR 2022, Alg. 1 and Fig. 1)."""

from __future__ import annotations

import functools
import logging
from collections import deque
import time
from logging import INFO
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log as flwr_log
from torch import nn

from fl_subnet.core.aggregate import first_non_finite
from fl_subnet.core.robust_direction import BUCKET_SIZE, CLIP_ITERATIONS, make_center, update_point
from fl_subnet.core.robust_distance import (KRUM_ROGUES_AUTO, WEISZFELD_ITERATIONS, WEISZFELD_SMOOTHING,
                                           geometric_median, update_cosines)
from fl_subnet.core.rules import AGGREGATION_RULES, AggregationRule, make_rule
from fl_subnet.core.slicing import SERVER_THREADS, torch_threads
from fl_subnet.core.robust import update_ratio
from fl_subnet.core.batchnorm import batchnorm_layers, check_policy, recompute_bn_stats
from fl_subnet.core.spec import analyze
from fl_subnet.core.masks import Mask, coverage
from fl_subnet.core.flat import flat_map_of
from fl_subnet.wire.packed import PACKED_PREFIX, RAW_STYPE, decode_slice, gather_packed, is_packed, slice_layout
from fl_subnet.wire import (BATCHNORM_KEY, arrays_to_state, example_to_config, mask_to_config, pop_to_arrays,
                             state_to_arrays)
from fl_subnet.wire.records import FJORD_BN_RECORD
from fl_subnet.core.samplers import MaskSampler

from fl_subnet.core.server_opt import MaskedServerOptimizer

from .defences import NO_DEFENCES, Defences
from .frozen_base import FrozenBase
from .compose import check_composition, refuse_dp_wrapper, server_optimizer_of
from .lr_scaling import LR_SCALINGS, lr_factor
from .nodes import NodeSampling, NotEnoughNodes  # noqa: F401  (NotEnoughNodes: part of this module's API)
from .replies import ReplyError, parse_reply, payload_bytes
from fl_subnet.exceptions import TrainingStalled  # noqa: F401  (re-exported: raised here)

log = logging.getLogger(__name__)


AGGREGATIONS = tuple(AGGREGATION_RULES)
COMPACT_HINT = ("their ClientApp must train the sub-model the message carries: build it with "
                "`model = fl_subnet.clients.compact_model(msg, Net)` instead of `Net()` + `load_state_dict(...)` "
                "(README: 'Switch your own Flower app to fl-subnet')")


class SubnetStrategy(NodeSampling, FedAvg):
    """Flower strategy that trains a model through per-node sub-models.

    Each server round it samples nodes, gives node slot ``i`` the mask
    ``sampler.sample(...)[i]``, sends it only the compact slice of the global model
    (ArrayRecord) plus the mask and training config (ConfigRecord), and folds the
    trained slices back with :class:`~fl_subnet.core.aggregate.MaskedAggregator`.
    Federated evaluation sends the full model, as in Flower's FedAvg.

    Parameters
    ----------
    model_factory : Callable[[], nn.Module]
        Builds the full architecture (a model instance is accepted too and deep-copied);
        analysed once here (:func:`fl_subnet.analyze`, on the ``meta`` device) and
        verified on one real instance before any round.
    sampler : MaskSampler
        Draws the masks; seeded by (seed, server round, slot).
    num_train_nodes : int, optional
        Exactly this many nodes per round (e.g. 1 for dropout, p for IST); by default
        Flower's ``fraction_train`` / ``min_train_nodes`` rule.
    local_steps : int, optional
        τ, sent as ``local-steps`` (the client runs ``local-epochs`` if it is 0/None).
    untouched, denominator, precision : str
        Passed to :class:`MaskedAggregator`.
    weighted : bool
        Weight replies by ``weighted_by_key`` (``num-examples``); else a count mean.
    seed : int
        Seeds the node sampling (masks use the sampler's own seed).
    order_by_partition : bool
        Order nodes by the ``partition-id`` they report to a one-off QUERY message
        (node ids are random per run), so that the same seed pairs the same data with
        the same mask in a simulation, a deployment and the in-process grid. Needs a
        ClientApp that answers it (fl-subnet's ``make_client_app``, or one whose
        ``@app.query()`` returns :func:`fl_subnet.clients.partition_reply`); a plain
        ClientApp would log an error per node, so it is off by default (nodes are
        then ordered by node id). fl-subnet's own App turns it on. Nodes that do not
        answer (asked once per run) are ordered after the others, by node id.
    example_input : torch.Tensor or tuple, optional
        One input batch; needed unless the model's first layer is an ``nn.Linear``.
        Its shape and dtype travel to the nodes (``example-shape``, ``example-dtype``).
    include, exclude : Sequence[str]
        Unit groups to mask besides / instead of the defaults (see :func:`fl_subnet.analyze`).
    batchnorm : {"averaged", "static"}
        BatchNorm policy (:mod:`fl_subnet.core.batchnorm`). ``averaged``: the nodes'
        running statistics are aggregated per entry over holders like any tensor.
        ``static`` (HeteroFL, Diao et al. ICLR 2021 §3.2): nodes normalise by batch
        statistics and leave the running ones untouched (sent as ``batchnorm`` in the
        train config); after each aggregation the server recomputes the full model's
        statistics on ``calibration_batches``.
    calibration_batches : Iterable[torch.Tensor], optional
        Re-iterable input batches (a list, a DataLoader yielding inputs) the server
        holds; required by ``batchnorm="static"`` when the model has BatchNorm layers.
    aggregation : {"mean", "median", "trimmed-mean", "centered-clip", "bucketing", "geometric-median", "multi-krum"}
        ``mean``: the (weighted) mean over the holders of each entry (default).
        ``median`` / ``trimmed-mean``: coordinate-wise median / β-trimmed mean over the
        holders of each entry, unweighted (Yin et al., ICML 2018), robust to a minority
        of rogue nodes among an entry's holders. ``centered-clip`` / ``bucketing``:
        centered clipping of whole updates, alone or on bucket means, unweighted
        (Karimireddy et al., ICML 2021 and ICLR 2022;
        :mod:`fl_subnet.core.robust_direction`). ``geometric-median`` / ``multi-krum``: the
        geometric median of whole updates (RFA, Pillutla et al. 2022) or the mean of the
        ``n − f`` replies of lowest Krum score (Blanchard et al. 2017), unweighted
        (:mod:`fl_subnet.core.robust_distance`).
    trim_fraction : float
        β of ``trimmed-mean``: ⌊β·h⌋ values dropped at each end of an entry's h holders.
    clip_radius : float
        τ of ``centered-clip`` / ``bucketing``; 0: the round's median distance of the
        updates to the clipping's start.
    clip_iterations : int
        L of ``centered-clip`` / ``bucketing``.
    bucket_size : int
        s of ``bucketing``; the shuffle is drawn from ``seed`` and the server round.
    weiszfeld_iterations, weiszfeld_smoothing : int, float
        T and ν of ``geometric-median`` (smoothed Weiszfeld).
    krum_rogues : int
        f of ``multi-krum``: the ``n − f`` replies of lowest Krum score are averaged; -1:
        ⌊(n − 3)/2⌋, as many as Krum tolerates.
    defences : Defences, optional
        Bounds every reply must meet before the rule folds it in: norm screening
        (``max_update_ratio``, ``max_ratio_to_median``, ``screen``) and the weight cap
        (``max_num_examples``), :class:`~fl_subnet.strategies.defences.Defences`. Off by
        default: the aggregation is then exactly Flower's FedAvg rule on the held
        entries; with defences on, a run in which nothing is screened or capped is
        bit-identical to one without them.
    node_wait_timeout : float
        Seconds to wait for enough connected nodes before :class:`NotEnoughNodes`.
    max_failed_rounds : int, optional
        Stop the run (:class:`TrainingStalled`) after this many consecutive rounds
        without a valid reply (default 3; ``None``: never).
    lr_scaling : {"auto", "none", "linear", "square"}
        How a node's ``lr`` (the train config's, sent per node) follows the output scale
        ``s`` of its sub-model (1/ξ for dropout, 1/r for HeteroFL, p for IST):
        ``square`` multiplies it by 1/s², ``linear`` by 1/s, ``none`` leaves it
        (:meth:`lr_factor` says why). ``auto``: the protocol's default
        (:attr:`default_lr_scaling`: ``square``; ``none`` for :class:`Dropout` and
        :class:`MultiSampleDropout`, one step per mask as in the paper). It acts only
        on masks with a scale above 1 and only where the ClientApp trains with the
        message's ``lr`` (Flower's templates and fl-subnet's ClientApp do).
    server_optimizer : MaskedServerOptimizer, optional
        A server optimizer applied to the masked pseudo-gradient after aggregation
        (:mod:`fl_subnet.core.server_opt`: FedAvgM, FedAdam, FedYogi, FedAdagrad; Reddi
        et al., ICLR 2021): entries no valid reply held keep their value and optimizer
        state. Also set by composing with Flower's optimizer strategies,
        ``class X(FederatedDropout, FedAdam)`` (:mod:`strategies.compose`), which then
        take their hyperparameters (``eta``, ``beta_1``, ...) as keyword arguments.
    base_fingerprint : str, optional
        For a model with a frozen base (a parameter with ``requires_grad=False``, e.g. a
        peft model): the base's :func:`fl_subnet.core.frozen.base_fingerprint`, if known;
        by default computed once here from one CPU build of ``model_factory``. Such a
        model is trained through its trainable tensors only
        (:mod:`strategies.frozen_base`, docs/lora.md): the global state, the messages, the
        replies, the aggregate and ``start``'s ``result.arrays`` hold the trainable keys;
        ``initial_arrays`` may hold the full ``state_dict`` or only the trainable part
        (the trainable keys are taken); every train and evaluate config carries the
        fingerprint as ``base-fingerprint``. Ignored (with a warning) for a model whose
        parameters are all trainable, which trains as before.
    **fedavg_kwargs
        Flower FedAvg options: ``fraction_train``, ``fraction_evaluate``,
        ``min_train_nodes``, ``min_evaluate_nodes``, ``min_available_nodes``,
        ``weighted_by_key``, ``arrayrecord_key``, ``configrecord_key``, ...

    Raises
    ------
    ValueError
        If a masking protocol (:attr:`masks_units`) gets a model with no unit group to
        mask, naming what the analysis found and left full (and why), ``include=`` /
        ``exclude=`` and ``model.unit_groups()``; or for an invalid option (naming it).
    NotImplementedError
        (:class:`~fl_subnet.AnalysisError`) If the model cannot be analysed (see
        :func:`fl_subnet.analyze`).

    Notes
    -----
    Per-round train metrics (in Flower's ``Result.train_metrics_clientapp``): the
    nodes' metrics averaged weighted by ``num-examples`` (fl-subnet's ClientApp sends
    ``train-loss``), plus the server's own, not averaged: ``bytes-down`` and
    ``bytes-up`` (serialized arrays and mask bytes, summed over nodes), ``coverage``
    (fraction of units held by at least one valid reply), ``num-replies``,
    ``num-rejected``, ``num-clipped``, ``model-kept`` (1 when the round left the global
    model unchanged: no valid reply, or a new model or server-optimizer state that would
    hold NaN or Inf; else 0) and ``round-seconds`` (wall time of the round).
    """

    protocol: str | None = None  # the run-config name, set by strategies.registry.register_protocol
    needs_depth_blocks = False  # True: the model must have skippable residual blocks (random paths)

    @classmethod
    def check_run_config(cls, cfg) -> None:
        """Raise ``ValueError`` naming the key if a run config does not suit this protocol
        (beyond the checks every run config gets); none by default."""

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        sampler: MaskSampler,
        *,
        num_train_nodes: int | None = None,
        local_steps: int | None = None,
        untouched: str = "keep",
        denominator: str = "holders",
        precision: str = "float32",
        weighted: bool = True,
        seed: int = 0,
        order_by_partition: bool = False,
        example_input: torch.Tensor | tuple | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        batchnorm: str = "averaged",
        calibration_batches: Iterable[torch.Tensor] | None = None,
        aggregation: str = "mean",
        trim_fraction: float = 0.25,
        clip_radius: float = 0.0,
        clip_iterations: int = CLIP_ITERATIONS,
        bucket_size: int = BUCKET_SIZE,
        weiszfeld_iterations: int = WEISZFELD_ITERATIONS,
        weiszfeld_smoothing: float = WEISZFELD_SMOOTHING,
        krum_rogues: int = KRUM_ROGUES_AUTO,
        defences: Defences | None = None,
        max_failed_rounds: int | None = 3,
        lr_scaling: str = "auto",
        node_wait_timeout: float = 300.0,
        server_optimizer: MaskedServerOptimizer | None = None,
        base_fingerprint: str | None = None,
        **fedavg_kwargs,
    ) -> None:
        if num_train_nodes is not None:
            if num_train_nodes < 1:
                raise ValueError(f"num_train_nodes must be >= 1, got {num_train_nodes!r}")
            fedavg_kwargs.setdefault("min_train_nodes", num_train_nodes)
            fedavg_kwargs.setdefault("min_available_nodes", num_train_nodes)
        super().__init__(**fedavg_kwargs)
        composed = server_optimizer_of(self)
        if composed is not None and server_optimizer is not None:
            raise ValueError(f"{type(self).__name__} is already a {composed.name} strategy (Flower base class); "
                             f"do not pass server_optimizer={server_optimizer!r} too")
        self.server_optimizer = server_optimizer if server_optimizer is not None else composed
        self.spec = analyze(model_factory, example_input, include=include, exclude=exclude, seed=seed)
        #: The frozen base (trainable keys, fingerprint) of a model with frozen parameters, else None.
        self.frozen: FrozenBase | None = FrozenBase.of(self.spec, base_fingerprint)
        if self.server_optimizer is not None:  # it steps the parameters; buffers take the aggregate
            self.server_optimizer.set_parameter_keys(self.spec.parameter_keys)
        if self.masks_units and not self.spec.groups:
            raise ValueError(self.spec.nothing_to_mask(type(self).__name__))
        self.groups = self.spec.groups
        self.slicer = self.spec.slicer
        self._example_config = example_to_config(example_input)
        self.batchnorm = check_policy(batchnorm)
        self.calibration_batches = calibration_batches
        self.model_factory = self.spec.factory
        if self.batchnorm == "static":
            if self.frozen is not None:
                raise ValueError("batchnorm='static' recomputes the full model's BatchNorm statistics on the server, "
                                 "but this model's base is frozen (its buffers stay on the nodes): use "
                                 "batchnorm='averaged'")
            self._example_config[BATCHNORM_KEY] = "static"
            with torch.device("meta"):
                has_bn = bool(batchnorm_layers(self.spec.factory()))
            if calibration_batches is None and has_bn:
                raise ValueError("batchnorm='static' needs calibration_batches: the server recomputes the "
                                 "BatchNorm statistics of the full model on them after each round")
        self.sampler = sampler
        self.num_train_nodes = num_train_nodes
        self.local_steps = local_steps
        self.untouched = untouched
        self.denominator = denominator
        self.precision = precision
        make_rule("mean", {}, self.slicer, untouched=untouched, denominator=denominator,
                  precision=precision)  # validates the mean's options, which the masks always use
        if aggregation in AGGREGATION_RULES and aggregation != "mean" and (denominator != "holders"
                                                                          or untouched != "keep"):
            raise ValueError(f"aggregation {aggregation!r} needs denominator='holders' and untouched='keep'")
        self.aggregation = aggregation
        self.trim_fraction = float(trim_fraction)
        #: The rule's options besides the state (fl_subnet.core.rules.make_rule).
        self.rule_options = dict(trim_fraction=self.trim_fraction, clip_radius=clip_radius,
                                 clip_iterations=clip_iterations, bucket_size=bucket_size,
                                 weiszfeld_iterations=weiszfeld_iterations, weiszfeld_smoothing=weiszfeld_smoothing,
                                 krum_rogues=krum_rogues)
        make_rule(aggregation, {}, self.slicer, untouched=untouched, denominator=denominator, precision=precision,
                  **self.rule_options)  # validates the rule and its options
        #: centered-clip / bucketing: the previous round's aggregate update, where the next
        #: round's clipping starts (Karimireddy et al. 2021, Alg. 2); saved with every
        #: checkpoint (clip-center-<r>.safetensors).
        self.clip_center: dict[str, torch.Tensor] | None = None
        if defences is not None and not isinstance(defences, Defences):
            raise TypeError(f"defences must be a Defences, got {type(defences).__name__}")
        self.defences = defences if defences is not None else NO_DEFENCES
        #: Update ratios of the replies accepted in earlier rounds (screening on), the
        #: latest Defences.HISTORY: the median bound of a round with too few replies.
        self.ratio_history: deque[float] = deque(maxlen=Defences.HISTORY)
        if max_failed_rounds is not None and (isinstance(max_failed_rounds, bool) or not isinstance(
                max_failed_rounds, int) or max_failed_rounds < 1):
            raise ValueError(f"max_failed_rounds must be an integer >= 1 or None, got {max_failed_rounds!r}")
        self.max_failed_rounds = max_failed_rounds
        if lr_scaling not in LR_SCALINGS:
            raise ValueError(f"lr-scaling must be one of {LR_SCALINGS}, got {lr_scaling!r}")
        self.lr_scaling = self.default_lr_scaling if lr_scaling == "auto" else lr_scaling
        self._warned_no_lr = False
        self._failed_rounds = 0
        self._flat = None  # FlatMap of the global model, when it has many small tensors
        self.weighted = weighted
        self.seed = int(seed)
        self.order_by_partition = order_by_partition
        self.query_timeout = 600.0
        self.node_wait_timeout = float(node_wait_timeout)
        self.round_offset = 0
        self._init_nodes()
        self.capacity_tiers: tuple[float, ...] = ()
        self._sent: dict[int, Mask] = {}
        self._out: dict[int, Message] = {}
        self._state: dict[str, torch.Tensor] = {}
        self._decoded: tuple = (None, {}, {})  # (ArrayRecord, its Arrays and bytes, its state)
        self._bytes_down = 0
        self._t_round = 0.0
        self.last_train_metrics: MetricRecord | None = None

    #: Whether the protocol masks unit groups: it then refuses a model with none to mask
    #: (``ValueError`` from the constructor, naming what the analysis found), since every
    #: node would silently train the full model. False for the full mask (SubnetFedAvg)
    #: and for depth-only protocols (RandomPath).
    masks_units: bool = True

    #: The protocol's ``lr_scaling`` when given ``"auto"``: ``square`` (a node's lr ×1/s²,
    #: see :meth:`lr_factor`); ``none`` for the one-step dropout protocols of the paper.
    default_lr_scaling: str = "square"

    #: torch intra-op threads while the server cuts and folds slices (configure_train,
    #: aggregate_train; restored after): see :data:`fl_subnet.core.slicing.SERVER_THREADS`.
    #: ``None`` leaves torch's setting.
    server_threads: int | None = SERVER_THREADS

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_composition(cls, SubnetStrategy)

    def summary(self) -> None:
        """Log the protocol's settings (sampler, local steps, aggregation, defences,
        server optimizer), then Flower's (``super().summary()``)."""
        flwr_log(INFO, "\t├──> fl-subnet %s:", type(self).__name__)
        for key, value in self.settings().items():
            flwr_log(INFO, "\t│\t├── %s: %s", key, value)
        super().summary()

    def settings(self) -> dict[str, object]:
        """The protocol's knobs, as logged by :meth:`summary`."""
        sampler = self.sampler
        knobs = {k: v for k, v in vars(sampler).items() if not k.startswith("_")}
        out: dict[str, object] = {
            "sampler": f"{type(sampler).__name__}({', '.join(f'{k}={v}' for k, v in knobs.items())})",
            "unit groups": f"{len(self.groups)} ({sum(g.size for g in self.groups)} units)",
            "depth blocks": len(self.spec.blocks),
            "local steps": self.local_steps if self.local_steps is not None else "local-epochs",
            "weighted": self.weighted, "aggregation": self.aggregation, "batchnorm": self.batchnorm,
            "lr scaling": self.lr_scaling,
        }
        own = {"trimmed-mean": ("trim_fraction",), "centered-clip": ("clip_radius", "clip_iterations"),
               "bucketing": ("clip_radius", "clip_iterations", "bucket_size"),
               "geometric-median": ("weiszfeld_iterations", "weiszfeld_smoothing"),
               "multi-krum": ("krum_rogues",)}.get(self.aggregation, ())
        if own:
            out["aggregation"] += " (" + ", ".join(f"{k.replace('_', '-')}={self.rule_options[k]}" for k in own) + ")"
        if self.capacity_tiers:
            out["capacity tiers"] = ",".join(f"{t:g}" for t in self.capacity_tiers)
        d = self.defences
        if d.screening:
            out["screening"] = (f"{d.screen}: max-update-ratio={d.max_update_ratio}, "
                                f"max-ratio-to-median={d.max_ratio_to_median}")
        if d.max_num_examples is not None:
            out["max num-examples"] = d.max_num_examples
        out["server optimizer"] = repr(self.server_optimizer) if self.server_optimizer is not None else "none (FedAvg)"
        return out

    def start(self, *, first_round: int = 1, num_rounds: int = 3, **kwargs):
        """Flower's ``Strategy.start``, optionally continuing a run from ``first_round``.

        Parameters
        ----------
        first_round : int
            The first server round to run (``1``: a new run). Rounds ``first_round``
            .. ``num_rounds`` are run with their own numbers (masks, node sample, client
            seeds and logs), so a run continued from a checkpoint of round
            ``first_round - 1`` ends with the model of an uninterrupted run. Flower's
            ``Result`` and ``evaluate_fn`` see rounds counted from 1 as usual; add
            :attr:`round_offset` for the run's numbering.
        num_rounds : int
            The run's total number of server rounds.
        **kwargs
            ``grid``, ``initial_arrays``, ``timeout`` (seconds per round),
            ``train_config``, ``evaluate_config``, ``evaluate_fn`` as Flower's. With a
            frozen base (:attr:`frozen`), ``initial_arrays`` may be the full
            ``state_dict`` or its trainable part: only the trainable keys are kept, and
            ``evaluate_fn`` and the returned ``result.arrays`` see those only.

        Raises
        ------
        ValueError
            If ``first_round`` is not in ``[1, num_rounds]``, or (frozen base)
            ``initial_arrays`` lacks a trainable key or holds a key the model has not.
        """
        if self.frozen is not None and isinstance(kwargs.get("initial_arrays"), ArrayRecord):
            kwargs["initial_arrays"] = self.frozen.restrict(kwargs["initial_arrays"], "initial_arrays")
        if isinstance(first_round, bool) or not isinstance(first_round, int) or not 1 <= first_round <= num_rounds:
            raise ValueError(f"first_round must be an integer in [1, num-server-rounds={num_rounds}], "
                             f"got {first_round!r}")
        self.round_offset = first_round - 1
        return super().start(num_rounds=num_rounds - self.round_offset, **kwargs)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """Flower's federated evaluation of the full model as deployed (:meth:`deployed_state`);
        with a frozen base, its trainable tensors and the ``base-fingerprint``."""
        if self.frozen is not None:
            arrays = self.frozen.restrict(arrays)
            config = ConfigRecord({**config, **self.frozen.config()})
        state = self._decode(arrays)  # read-only views: no copy when nothing changes
        deployed = self.deployed_state(state)
        if deployed is not state:
            arrays = state_to_arrays(deployed)
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def deployed_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full model as evaluated and deployed, from the trained global ``state``:
        ``state`` itself unless the protocol scales the full model at evaluation (IST with
        ``scaling="eval"``)."""
        return state

    # ------------------------------------------------------------------ training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One Message per sampled node with its own compact slice and mask."""
        refuse_dp_wrapper(self)
        with torch_threads(self.server_threads):
            return self._configure_train(server_round, arrays, config, grid)

    def _configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                         grid: Grid) -> list[Message]:
        server_round += self.round_offset
        self._t_round = time.perf_counter()
        self._sent = {}
        self._layouts = {}  # id(mask) → (mask, its slice's packing layout), computed once a round
        sliced: dict[int, tuple[Mask, ArrayRecord]] = {}  # id(mask) → the slice of a mask several nodes share
        self._out = {}
        if self.fraction_train == 0.0 and self.num_train_nodes is None:
            return []
        if self.frozen is not None:  # only the trainable tensors are the global model
            arrays = self.frozen.restrict(arrays)
        nodes = self.sample_train_nodes(server_round, grid)
        if getattr(self.sampler, "node_aware", False):
            masks = self.sampler.sample(self.groups, server_round, len(nodes),
                                        capacities=[self.capacity_of(n) for n in nodes])
        else:
            masks = self.sampler.sample(self.groups, server_round, len(nodes))
        self._state = self._decode(arrays)
        self._full_meta = {k: (tuple(t.shape), t.dtype) for k, t in self._state.items()}
        self._flat = flat_map_of(self.slicer, self._full_meta, self._flat)  # many small tensors: one index
        whole = None  # the float tensors end to end, made for the round's first sub-model
        messages, self._bytes_down = [], 0
        # A full mask's slice is the global model itself: nodes with one get the
        # ArrayRecord as received (no gather, no re-serialization), and nodes whose
        # config is also the same share one RecordDict, as Flower's FedAvg does (its
        # objects are then serialized once for all of them).
        shared: tuple[dict, RecordDict] | None = None
        for node_id, mask in zip(nodes, masks):
            full = self.slicer.is_full(mask)  # validates the mask
            extra = {**self._example_config, **mask_to_config(mask, self.spec.all_groups, self.groups),
                     **self._node_lr(config, mask), **self.node_config(node_id, mask),
                     **(self.frozen.config() if self.frozen is not None else {})}
            records = self.node_records(node_id, mask)
            if full and shared is not None and shared[0] == extra and not records:
                content = shared[1]
            else:
                if not full and self._flat is not None and whole is None:
                    whole = self._flat.concat(self._state)
                if full:
                    slice_arrays = arrays
                elif id(mask) in sliced:  # IST: the nodes of one part share its Mask and its slice
                    slice_arrays = sliced[id(mask)][1]
                else:
                    slice_arrays = gather_packed(self.slicer, self._state, mask, self._node_layout(node_id, mask),
                                                 self._flat, whole)
                    sliced[id(mask)] = (mask, slice_arrays)  # (the mask held: its id stays its own)
                node_config = ConfigRecord(dict(config))  # Strategy.start reuses `config`
                node_config["server-round"] = server_round
                if self.local_steps is not None:
                    node_config["local-steps"] = int(self.local_steps)
                for key, value in extra.items():
                    node_config[key] = value
                content = RecordDict({self.arrayrecord_key: slice_arrays,
                                      self.configrecord_key: node_config, **records})
                if full and not records:
                    shared = (extra, content)
            self._bytes_down += payload_bytes(content[self.arrayrecord_key], content[self.configrecord_key])
            self._bytes_down += sum(payload_bytes(r) for r in records.values())
            messages.append(Message(content=content, message_type=MessageType.TRAIN,
                                    dst_node_id=node_id))
            self._sent[node_id] = mask
            self._out[node_id] = messages[-1]
        log.info("configure_train: round %d, %d nodes, coverage %.3f, %.2f MB down",
                 server_round, len(nodes), coverage(masks, self.groups), self._bytes_down / 1e6)
        return messages

    def lr_factor(self, mask: Mask) -> float:
        """The factor on a node's ``lr`` for ``mask`` under :attr:`lr_scaling`
        (:func:`strategies.lr_scaling.lr_factor`, which says why)."""
        return lr_factor(mask, self.lr_scaling)

    def _node_lr(self, config: ConfigRecord, mask: Mask) -> dict[str, object]:
        """``{"lr": config's lr × lr_factor(mask)}`` when the factor is not 1, else ``{}``."""
        factor = self.lr_factor(mask)
        if factor == 1.0:
            return {}
        if "lr" not in config:
            if not self._warned_no_lr:
                self._warned_no_lr = True
                log.warning("lr-scaling %r: the train config has no 'lr', so the nodes' step size cannot follow "
                            "their sub-models' output scale (x%.3g); send train_config=ConfigRecord({'lr': ...}) "
                            "and train with the message's lr", self.lr_scaling, 1.0 / factor)
            return {}
        return {"lr": float(config["lr"]) * factor}

    def node_config(self, node: int, mask: Mask) -> dict[str, object]:
        """Protocol-specific train-config entries for ``node`` (sent with its mask and
        counted in ``bytes-down``); none by default. FjORD sends the node's widths."""
        return {}

    def node_records(self, node: int, mask: Mask) -> dict[str, ArrayRecord]:
        """Protocol-specific ArrayRecords sent to ``node`` besides its slice (counted in
        ``bytes-down``); none by default. FjORD's per-width BatchNorm statistics
        (``fjord-bn``)."""
        return {}

    def aggregate_records(self, server_round: int, replies: list[tuple[int, RecordDict, float]]) -> None:
        """Fold what the accepted replies carry besides their slice, ``(node, content,
        weight)`` each (the weight after the cap, 1 when unweighted), before
        :meth:`after_aggregation`; nothing by default. FjORD's per-width statistics."""

    def reply_rows(self, node: int) -> dict[str, torch.Tensor] | None:
        """The rows (dim 0, full positions) of some tensors that ``node``'s reply alone
        contributes to the aggregate (``MaskedAggregator.add(rows=)``); None (default):
        every entry it holds. HeteroFL's label split returns the classifier rows of the
        node's labels."""
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Masked aggregation of the valid replies; malformed or screened ones are logged
        (with the node and the reason) and skipped.

        Each reply is parsed and checked against the mask sent to its node; with
        screening on, its update norm relative to the global slice is compared with
        ``defences.max_update_ratio`` and with ``defences.max_ratio_to_median`` times the
        round's median; its weight is capped at ``defences.max_num_examples``; then the rule
        (``aggregation``) folds the rest in. Returns ``(None, metrics)`` when no reply is
        valid, or when the new model (after the server optimizer and BatchNorm
        recalibration) or the server optimizer's new state would hold NaN or Inf (one
        error line names the round and the first such key; the optimizer state is
        restored; ``model-kept`` is 1; the round had valid replies, so it does not count
        towards ``max_failed_rounds``): Flower then keeps the model. Never raises because
        of a reply's content.
        """
        with torch_threads(self.server_threads):
            return self._aggregate_train(server_round, replies)

    def _aggregate_train(self, server_round: int, replies: Iterable[Message]
                         ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        tally = _Tally(server_round + self.round_offset)
        agg = self._aggregator(tally.server_round)
        parsed = self._parse_replies(replies, agg, tally)
        folded = self._fold(parsed, agg, tally)
        metrics = self._round_metrics(folded, tally)
        if not folded:
            return self._no_valid_reply(tally, metrics)
        self._failed_rounds = 0
        aggregate = agg.finalize()
        self.aggregate_records(tally.server_round, [
            (r.node, r.msg.content, self.defences.weight(r.weight) if self.weighted else 1.0) for r in folded])
        saved = self.server_optimizer.snapshot() if self.server_optimizer is not None else None
        new_state = self.after_aggregation(aggregate, agg.held())
        where = self._non_finite(aggregate, new_state, saved is not None, len(folded))
        if where is not None:  # a round must never make the model (or the optimizer state) NaN or Inf
            if saved is not None:
                self.server_optimizer.restore(saved)
            log.error("aggregate_train: round %d: NaN or Inf in %s: kept the current model", tally.server_round,
                      where)
            metrics["model-kept"] = 1
            return None, metrics
        self.clip_center = make_center(agg, self.clip_center)
        del aggregate
        out = pop_to_arrays(new_state)  # each tensor dropped once copied: one new model held, not two
        self._remember(out, arrays_to_state(out, copy=False))  # W_{k+1}: read-only views of its bytes
        return out, metrics

    def _parse_replies(self, replies: Iterable[Message], agg, tally: "_Tally") -> list["_Reply"]:
        """Step 1: every reply parsed and checked against the mask sent to its node (a bad
        one is rejected with its reason), with its update ratio when screening is on."""
        by_id = {m.metadata.message_id: n for n, m in self._out.items() if m.metadata.message_id}
        parsed: list[_Reply] = []
        seen: set[int] = set()
        for msg in replies:
            node = by_id.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            try:
                if msg.has_error():
                    reason = str(msg.error.reason)
                    if "size mismatch" in reason or PACKED_PREFIX in reason or f"'{RAW_STYPE}'" in reason:
                        # the ClientApp loaded the slice into a full-size model (Flower's
                        # to_torch_state_dict refuses the packed arrays' raw stype)
                        tally.full_size.append(node)
                    raise ReplyError(f"error reply: {msg.error.reason}")
                if node in seen:
                    raise ReplyError("duplicate reply")
                mask = self._sent.get(node)
                if mask is None:
                    raise ReplyError("unknown node (no mask was sent to it this round)")
                compact, weight, size = parse_reply(msg.content, self.weighted_by_key,
                                                    functools.partial(self._node_layout, node, mask))
                if self.frozen is not None:
                    self.frozen.check_reply(compact)  # the base never travels
                packed = is_packed(next(a for k, a in msg.content.array_records.items()
                                        if k != FJORD_BN_RECORD))  # exactly one (parse_reply)
                if not packed and self._is_full_size(compact, mask):  # a packed reply has the layout's shapes
                    tally.full_size.append(node)
                agg.check(compact, mask)
                base = self.slicer.gather(self._state, mask) if self.defences.screening else None
                ratio = update_ratio(compact, base) if base is not None else 0.0
            except Exception as err:  # noqa: BLE001 — a reply must never crash the ServerApp
                tally.reject(node, err)
                continue
            seen.add(node)
            parsed.append(_Reply(node, msg, mask, compact, weight, size, ratio, base))
        return parsed

    def _fold(self, parsed: list["_Reply"], agg, tally: "_Tally") -> list["_Reply"]:
        """Step 2: the defences (screening against the round's bound, the weight cap), then
        the aggregation rule ``agg`` folds each remaining reply in. Returns those replies."""
        ratios = [r.ratio for r in parsed if r.ratio is not None]
        bound = self.defences.bound(ratios, self.ratio_history)
        if self.defences.max_ratio_to_median is not None and parsed and not self.defences.median_pool(
                ratios, self.ratio_history):
            log.warning("aggregate_train: round %d: %d replies and %d earlier ratios: max-ratio-to-median needs %d, "
                        "so this round is not screened against the median", tally.server_round, len(ratios),
                        len(self.ratio_history), self.defences.MIN_REPLIES_FOR_MEDIAN)
        parsed = self._screen_directions(parsed, tally)
        folded: list[_Reply] = []
        for r in parsed:
            try:
                compact, clipped = self.defences.apply(r.compact, r.base, r.ratio, bound)
                if clipped:
                    tally.clipped += 1
                    log.warning("aggregate_train: round %d: clipped the update of node %d (norm ratio %.3g > %.3g)",
                                tally.server_round, r.node, r.ratio, bound)
                weight = self.defences.weight(r.weight)
                if weight != r.weight:
                    log.warning("aggregate_train: round %d: node %d reports %s %g, capped at %d", tally.server_round,
                                r.node, self.weighted_by_key, r.weight, self.defences.max_num_examples)
                rows = self.reply_rows(r.node)  # HeteroFL's label split: the classifier rows of its labels
                agg.add(compact, r.mask, weight if self.weighted else 1.0, checked=True,  # checked in step 1
                        **({"rows": rows} if rows else {}))
            except Exception as err:  # noqa: BLE001
                tally.reject(r.node, err)
                continue
            folded.append(r)
        # a clipped reply enters the history at the bound it was clipped to
        self.ratio_history.extend(r.ratio if bound is None else min(r.ratio, bound) for r in folded
                                  if r.ratio is not None)
        return folded

    def _screen_directions(self, parsed: list["_Reply"], tally: "_Tally") -> list["_Reply"]:
        """Direction screening (``defences.min_cosine``): the replies whose update's cosine
        to the geometric median of the round's updates is below the bound are rejected;
        off, or with fewer than ``Defences.MIN_REPLIES_FOR_MEDIAN`` replies, all pass."""
        bound = self.defences.min_cosine
        if bound is None or not parsed:
            return parsed
        if len(parsed) < self.defences.MIN_REPLIES_FOR_MEDIAN:
            log.warning("aggregate_train: round %d: %d replies: min-cosine needs %d, so this round is not screened "
                        "by direction", tally.server_round, len(parsed), self.defences.MIN_REPLIES_FOR_MEDIAN)
            return parsed
        points = [update_point(self._state, self.slicer, r.compact, r.mask) for r in parsed]
        numels = {k: t.numel() for k, t in self._state.items() if t.is_floating_point()}
        center, _ = geometric_median(points, numels, self.rule_options["weiszfeld_iterations"],
                                     self.rule_options["weiszfeld_smoothing"])
        kept = []
        for r, cos in zip(parsed, update_cosines(points, center)):
            if cos < bound:
                tally.reject(r.node, f"update points away from the round's robust centre: cosine {cos:.3f} < "
                                     f"min-cosine {bound:g}")
            else:
                kept.append(r)
        return kept

    def _round_metrics(self, folded: list["_Reply"], tally: "_Tally") -> MetricRecord:
        """Step 3: the nodes' metrics (Flower's ``train_metrics_aggr_fn``) and the server's."""
        valid = [r.msg.content for r in folded]
        metrics = MetricRecord()
        if valid:
            try:
                metrics = self.train_metrics_aggr_fn(valid, self.weighted_by_key)
            except Exception as err:  # noqa: BLE001
                log.warning("aggregate_train: client metrics not aggregated: %s", err)
        metrics["bytes-down"] = int(self._bytes_down)
        metrics["bytes-up"] = int(sum(r.size for r in folded))
        metrics["coverage"] = coverage([r.mask for r in folded], self.groups) if folded else 0.0
        metrics["num-replies"] = len(valid)
        metrics["num-rejected"] = tally.rejected
        metrics["num-clipped"] = tally.clipped
        metrics["model-kept"] = 0 if valid else 1
        metrics["round-seconds"] = time.perf_counter() - self._t_round
        self.last_train_metrics = metrics
        if tally.full_size:
            nodes = sorted(set(tally.full_size))
            log.error("aggregate_train: round %d: %d node(s) %s sent or expected the full-size model instead of "
                      "their compact slice: %s", tally.server_round, len(nodes), nodes, COMPACT_HINT)
        return metrics

    def _no_valid_reply(self, tally: "_Tally", metrics: MetricRecord) -> tuple[None, MetricRecord]:
        """The failure policy: the model stays; after ``max_failed_rounds`` such rounds in a
        row the run stops (:class:`TrainingStalled`)."""
        self._failed_rounds += 1
        log.warning("aggregate_train: round %d: no valid reply, model unchanged (%d round(s) in a row)",
                    tally.server_round, self._failed_rounds)
        if self.max_failed_rounds is not None and self._failed_rounds >= self.max_failed_rounds:
            hint = f" Nodes sent or expected the full-size model: {COMPACT_HINT}." if tally.full_size else ""
            raise TrainingStalled(
                f"no node produced a valid train reply in {self._failed_rounds} consecutive rounds "
                f"(max_failed_rounds).{hint} Last round: {'; '.join(tally.reasons[:3]) or 'no replies'}")
        return None, metrics

    def after_aggregation(self, aggregate: dict[str, torch.Tensor], held: dict[str, torch.Tensor]
                          ) -> dict[str, torch.Tensor]:
        """The post-aggregation hook: the server optimizer's step on the masked
        pseudo-gradient (entries no reply held keep their value and state), then the static
        BatchNorm recalibration. Override it (calling ``super()``) to add a server step."""
        new_state = aggregate
        if self.server_optimizer is not None:
            new_state = self.server_optimizer.step(self._state, new_state, held)
        self._stepped = new_state
        if self.batchnorm == "static" and self.calibration_batches is not None:
            new_state = self._recalibrate(new_state)
        return new_state

    def _non_finite(self, aggregate: dict, new_state: dict, stepped: bool, num_valid: int) -> str | None:
        """Where the round made a NaN or Inf, or None: the new model (the aggregate of the
        ``num_valid`` replies, the server step, the recalibration), else the server
        optimizer's new state."""
        bad = first_non_finite(new_state)
        if bad is None:
            bad_state = first_non_finite(self.server_optimizer.state_dict()) if stepped else None
            return None if bad_state is None else f"the server optimizer's state '{bad_state}'"
        if first_non_finite({bad: aggregate[bad]}) is not None:
            return f"'{bad}' in the aggregate of the {num_valid} valid replies"
        if stepped and first_non_finite({bad: self._stepped[bad]}) is not None:
            return f"'{bad}' after the server optimizer's step"
        return f"'{bad}' after the BatchNorm recalibration"

    def slice_state(self, arrays: ArrayRecord, node_id: int) -> dict[str, torch.Tensor]:
        """The compact slice in ``arrays`` (of this round's train message to ``node_id``,
        or of that node's reply), packed or one array per tensor, as a ``state_dict``.

        Raises
        ------
        KeyError
            If no train message went to ``node_id`` this round.
        ValueError
            If the arrays do not match the node's slice.
        """
        return decode_slice(arrays, functools.partial(self._node_layout, node_id, self._sent[node_id]))

    def _node_layout(self, node: int, mask: Mask):
        """The packing layout of ``mask``'s slice of this round's global model, for the
        node it was sent to (computed once a round per mask object, for the messages and
        replies of every node it went to)."""
        hit = self._layouts.get(id(mask))
        if hit is None:  # nodes that share a mask object (IST's parts) share its layout
            hit = self._layouts[id(mask)] = (mask, slice_layout(self.slicer, mask, self._full_meta, self._flat))
        return hit[1]

    def _decode(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """The global state of ``arrays``: the state :meth:`aggregate_train` built it from
        when ``arrays`` is that record, unchanged (no decoding), else read-only tensors
        over the record's bytes (no copy; the strategy never writes to ``W_k``)."""
        record, items, state = self._decoded
        if arrays is record and len(arrays) == len(items) and all(
                arrays.get(k) is a and a.data is data for k, (a, data) in items.items()):
            return dict(state)
        state = arrays_to_state(arrays, copy=False)
        self._remember(arrays, state)
        return state

    def _remember(self, arrays: ArrayRecord, state: dict[str, torch.Tensor]) -> None:
        self._decoded = (arrays, {k: (a, a.data) for k, a in arrays.items()}, state)

    def _is_full_size(self, compact: dict, mask: Mask) -> bool:
        """Whether a reply holds the full model although its mask cut a smaller slice."""
        wanted = self.slicer.compact_shapes(mask, {k: tuple(full.shape) for k, full in self._state.items()})
        shapes = [(tuple(t.shape), tuple(full.shape), wanted[k])
                  for k, full in self._state.items() if isinstance(t := compact.get(k), torch.Tensor)]
        return bool(shapes) and all(got == full for got, full, _ in shapes) and any(
            want != full for _, full, want in shapes)

    def _aggregator(self, server_round: int = 0) -> AggregationRule:
        """This round's aggregation rule over the current global model."""
        return make_rule(self.aggregation, self._state, self.slicer, untouched=self.untouched,
                         denominator=self.denominator, precision=self.precision, flat=self._flat,
                         seed=self.seed, server_round=server_round, center=self.clip_center,
                         **self.rule_options)

    def _recalibrate(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Static BatchNorm: the full model's running statistics, recomputed on the
        server's calibration batches (parameters unchanged)."""
        model = self.model_factory()
        model.load_state_dict(state)
        recompute_bn_stats(model, self.calibration_batches)
        return {k: v.detach() for k, v in model.state_dict().items()}


class _Reply(NamedTuple):
    """A parsed reply: its node, message, the mask sent, the compact state, its weight and
    bytes, and (screening on) its update ratio against the global slice ``base``."""

    node: int
    msg: Message
    mask: Mask
    compact: dict
    weight: float
    size: int
    ratio: float
    base: dict | None


class _Tally:
    """A round's count of rejected and clipped replies, with the reasons."""

    def __init__(self, server_round: int) -> None:
        self.server_round = server_round
        self.rejected = 0
        self.clipped = 0
        self.reasons: list[str] = []
        self.full_size: list[int] = []

    def reject(self, node: int, why: object) -> None:
        self.rejected += 1
        text = str(why)
        self.reasons.append(f"node {node}: {text[:200]}{'...' if len(text) > 200 else ''}")
        log.warning("aggregate_train: round %d: rejected reply from node %d: %s", self.server_round, node, why)
