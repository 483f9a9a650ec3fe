"""ClientApp handlers: build the compact sub-model, train it, reply with its tensors."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import Dataset

from fl_subnet.core.device import model_device, resolve_device
from fl_subnet.core.label_split import check_labels
from fl_subnet.wire import METRICS_KEY, arrays_to_state, read_train
from fl_subnet.wire.records import LABELS_KEY

from .compact import receive, reply_arrays, width_schedule
from .frozen import full_model, message_base

from .train import TrainConfig, config_int, evaluate_model, train_local

log = logging.getLogger(__name__)

DataFn = Callable[[Context], tuple[Dataset, Dataset | None]]
TrainFn = Callable[[nn.Module, Dataset, TrainConfig, int], tuple[int, float]]
LabelsFn = Callable[[Context], Sequence[int] | None]


def partition_reply(msg: Message, context: Context, labels: Sequence[int] | None = None) -> Message:
    """The reply to a strategy's node QUERY (``order_by_partition=True``): this node's
    ``partition-id`` and ``capacity`` (width share in (0, 1], for HeteroFL/FedRolex)
    from its node config (``--node-config "partition-id=0 capacity=0.25"``), each only if set,
    and ``labels``, the labels its training data holds, if given (HeteroFL's label split,
    ``label_split=True``: the server then masks the node's other logits and averages each
    classifier row over the nodes holding its label; a node reporting none holds all).

    Raises
    ------
    ValueError
        Naming ``labels``, if they are not a non-empty list of distinct ints >= 0.

    Add it to your own ClientApp, and pass ``order_by_partition=True`` to the strategy
    (off by default, since a plain ClientApp cannot answer), to let the strategy order
    nodes reproducibly and learn declared capacities::

        @app.query()
        def query(msg, context):
            return partition_reply(msg, context)
    """
    pid = context.node_config.get("partition-id")
    cap = context.node_config.get("capacity")
    held = check_labels(labels, key=LABELS_KEY)
    metrics = MetricRecord()
    if isinstance(pid, int) and not isinstance(pid, bool):
        metrics["partition-id"] = int(pid)
    if isinstance(cap, (int, float)) and not isinstance(cap, bool):
        metrics["capacity"] = float(cap)
    if held:
        metrics[LABELS_KEY] = list(held)
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)


def node_device(context: Context) -> torch.device:
    """The device this node trains and evaluates on: its node config's ``device``
    (``--node-config "device='cuda:1'"``) if set, else the run config's ``device``, else
    ``"auto"`` (``cuda`` if this machine has CUDA, else ``cpu``); see
    :func:`fl_subnet.core.device.resolve_device`.

    Raises
    ------
    ValueError
        Naming ``device`` (and whether the node or the run config set it), if it is not
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, or names a CUDA device this
        node lacks.
    """
    if "device" in context.node_config:
        return resolve_device(context.node_config["device"], key="node-config key 'device'")
    if "device" in context.run_config:
        return resolve_device(context.run_config["device"], key="run-config key 'device'")
    return resolve_device("auto")


def _takes(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes the keyword ``name`` (read once per function: every train
    message asks)."""
    try:
        return _takes_cached(fn, name)
    except TypeError:  # an unhashable callable
        return _read_takes(fn, name)


@functools.lru_cache(maxsize=256)
def _takes_cached(fn: Callable, name: str) -> bool:
    return _read_takes(fn, name)


def _read_takes(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return name == "before_step"  # no signature to read: try the call (device: keep the CPU)
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _takes_before_step(fn: Callable) -> bool:
    return _takes(fn, "before_step")


_warned_cpu: set[str] = set()


def _warn_cpu_once(train_fn: Callable, device: torch.device) -> None:
    name = getattr(train_fn, "__qualname__", repr(train_fn))
    if name not in _warned_cpu:
        _warned_cpu.add(name)
        log.warning("train_fn %r takes no device= argument: it trains on the CPU, not on this node's device %s "
                    "(add a device= keyword, as fl_subnet.clients.train_local has, to train there)", name, device)


def make_client_app(model_factory: Callable[[], nn.Module] | None, load_data: DataFn,
                    train_fn: TrainFn = train_local, *,
                    context_factory: Callable[[Context], Callable[[], nn.Module]] | None = None,
                    labels: LabelsFn | None = None) -> ClientApp:
    """A Flower ClientApp that trains whatever compact slice the server sends.

    Parameters
    ----------
    model_factory : Callable[[], nn.Module] or None
        Builds the full architecture (called on the ``meta`` device for training).
        ``None`` when ``context_factory`` is given.
    load_data : Callable[[Context], tuple[Dataset, Dataset | None]]
        The node's ``(train, test)`` sets of ``(x, y)`` pairs, e.g. chosen by
        ``context.node_config["partition-id"]``.
    train_fn : Callable, optional
        ``train_fn(model, train_set, cfg, seed) -> (num_examples, train_loss)``;
        defaults to :func:`~fl_subnet.clients.train.train_local` (SGD, τ steps or E
        epochs). If it takes a ``device=`` keyword it is passed the node's device
        (:func:`node_device`: node config ``device``, else run config ``device``, else
        ``"auto"``) and trains there (the reply is moved back to the CPU); a ``train_fn``
        without it trains on the CPU (logged once when the node has another device).
        Evaluation runs on the node's device. For FjORD messages (``fjord-widths``) it is also passed
        ``before_step=``, the per-batch width sampler (:func:`width_schedule`), to call
        with the step index before each batch. With HeteroFL's label split the config's
        ``labels`` name the node's labels: mask the other logits before the loss
        (:func:`fl_subnet.core.label_split.mask_logits`; ``train_local`` does).
    context_factory : Callable[[Context], Callable[[], nn.Module]], optional
        Returns the model factory for a message's context (e.g. from its run config).
    labels : Callable[[Context], Sequence[int] | None], optional
        The labels this node's training data holds (e.g. the distinct ``y`` of its
        partition), reported to the node query for HeteroFL's label split
        (``label_split=True``); None (or returning None): none reported, the node holds
        every label.

    Returns
    -------
    ClientApp
        Train replies hold the compact tensors (``arrays``) and ``num-examples``,
        ``train-loss`` (``metrics``); evaluate replies ``num-examples``,
        ``eval-loss`` and, for classification, ``eval-acc``.

    Notes
    -----
    A model with a frozen base (messages with ``base-fingerprint``, e.g. a peft model;
    docs/lora.md): the factory builds the full model with its base (loaded from the
    node's disk, in bfloat16 if it likes) once per process
    (:func:`fl_subnet.clients.frozen.local_base`); every train and evaluate message's
    fingerprint is checked against it (another base: an error reply naming
    ``base-fingerprint``), the compact model is that base plus the received trainable
    slice, only its trainable parameters get gradients and optimizer state
    (:func:`~fl_subnet.clients.train.train_local` optimizes those only), and the reply
    holds the trainable tensors only.
    """
    if (model_factory is None) == (context_factory is None):
        raise ValueError("give exactly one of model_factory and context_factory")
    if isinstance(model_factory, nn.Module):
        raise TypeError("make_client_app needs a model factory (e.g. the class Net), not a model instance "
                        f"({type(model_factory).__name__}): pass Net, not Net()")

    def factory_of(context: Context) -> Callable[[], nn.Module]:
        return model_factory if context_factory is None else context_factory(context)

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        device = node_device(context)  # before any work: ValueError naming 'device' on the wrong node
        got = receive(msg, factory_of(context))
        config, model = got.config, got.model
        cfg = TrainConfig.from_config(config)
        train_set, _ = load_data(context)
        round_ = config_int(config, "server-round", 0)
        partition = int(context.node_config.get("partition-id", 0))
        seed = hash((cfg.seed, round_, partition)) & 0x7FFFFFFF
        log.info("node %d round %d: received %d bytes of arrays, widths %s", context.node_id, round_,
                 sum(len(a.data) for a in read_train(msg.content)[1].values()),  # what this node got, per group
                 ",".join(f"{g}={len(i)}" for g, i in sorted(got.mask.indices.items())))
        extra: dict[str, object] = {}
        if _takes(train_fn, "device"):
            extra["device"] = device
        elif device.type != "cpu":
            _warn_cpu_once(train_fn, device)
        with width_schedule(got, partition) as schedule:  # FjORD's per-batch widths, else inactive
            if schedule.active:
                if not _takes_before_step(train_fn):
                    raise TypeError(f"the server runs FjORD (train config 'fjord-widths') but train_fn "
                                    f"{getattr(train_fn, '__name__', train_fn)!r} takes no before_step= "
                                    "argument: call before_step(step) before each batch's forward")
                n, loss = train_fn(model, train_set, cfg, seed, before_step=schedule, **extra)
            else:
                n, loss = train_fn(model, train_set, cfg, seed, **extra)
        if model_device(model).type != "cpu":
            model.cpu()  # the reply's tensors (and FjORD's per-width statistics) from CPU memory
        if schedule.active:
            log.info("node %d round %d: FjORD widths %s, %d steps", context.node_id, round_, schedule.widths,
                     len(schedule.history))
        log.info("node %d round %d: %d examples, train-loss %.4f on %s", context.node_id, round_, n, loss,
                 extra.get("device", "cpu"))
        content = RecordDict({
            **reply_arrays(got, model),
            METRICS_KEY: MetricRecord({"num-examples": int(n), "train-loss": float(loss)}),
        })
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        device = node_device(context)
        _, arrays, config = read_train(msg.content)
        factory = factory_of(context)
        base = message_base(config, factory)  # frozen base: ValueError naming 'base-fingerprint'
        cfg = TrainConfig.from_config(config)
        if base is None:
            model = factory()
            model.load_state_dict(arrays_to_state(arrays))
        else:  # the trainable tensors on this node's own base
            model = full_model(factory, arrays_to_state(arrays), base)
        _, test_set = load_data(context)
        metrics: dict[str, float | int] = {"num-examples": 0}
        if test_set is not None and len(test_set):
            metrics = {"num-examples": len(test_set), **evaluate_model(model, test_set, cfg.loss, device=device)}
        return Message(content=RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Report this node's ``partition-id`` (so the server can order nodes stably),
        ``capacity`` and ``labels``."""
        return partition_reply(msg, context, labels(context) if labels is not None else None)

    return app


__all__ = ["make_client_app", "partition_reply", "node_device"]
