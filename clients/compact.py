"""Turn an incoming train message into the compact ``nn.Module`` — for any ClientApp.

A Flower user's own ``@app.train()`` handler keeps its shape: where Flower's template
builds ``Net()`` and loads the message's arrays, it calls :func:`compact_model` instead;
the user's training loop runs on the returned module, and ``model.state_dict()`` is
already the compact reply the strategy expects (same keys, compact shapes)::

    model = compact_model(msg, Net)          # instead of Net() + load_state_dict(...)
    train_loss = train(model, trainloader, epochs, lr, device)
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": ...})

A message without mask keys (a plain FedAvg message) gives the full model.

A FjORD message (train config key ``fjord-widths``) gives a model whose width can be
lowered per batch; :func:`width_schedule` samples the widths in the user's own loop. With
``fjord-distill`` true (FjORD+KD) the schedule's ``distill`` asks the loop for a teacher
pass at the node's max width (``schedule.teacher()``) and the KD loss
(:func:`fl_subnet.core.ordered.fjord_kd_loss`) for the drawn width.

A FjORD message with per-width BatchNorm statistics (a second ArrayRecord ``fjord-bn``)
gives each width its own running statistics (:func:`fl_subnet.core.ordered.set_width_stats`);
:func:`reply_arrays` sends them back.

A HeteroFL/FedRolex message with the label split on (train config key ``labels``) names
the labels this node holds: :attr:`Received.labels`; mask the logits of the others before
the loss with :func:`fl_subnet.core.label_split.mask_logits` (``loss =
criterion(mask_logits(model(x), got.labels), y)``).

A message of a model with a frozen base (train config key ``base-fingerprint``, e.g. a
peft model with LoRA adapters) carries only the trainable tensors: the node's own base,
built once per process by the factory, is checked against the fingerprint (a node holding
another base raises a ``ValueError`` naming ``base-fingerprint``) and completes the
compact model (:mod:`fl_subnet.clients.frozen`). Reply with :func:`reply_arrays`, which
sends the trainable tensors only (``model.state_dict()`` would hold the base too, and the
server would reject it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from flwr.app import ArrayRecord, Message, RecordDict
from torch import nn

from fl_subnet.core.batchnorm import check_policy, use_batch_statistics
from fl_subnet.core.label_split import check_labels
from fl_subnet.core.masks import Mask, full_mask
from fl_subnet.core.ordered import WidthSchedule, build_ordered, set_width_stats, width_generator, width_stats
from fl_subnet.core.spec import SubnetSpec, cached_spec
from fl_subnet.wire.packed import Layout, is_packed, pack_state, slice_layout, unpack_state
from fl_subnet.wire import (BATCHNORM_KEY, arrays_to_state, example_from_config,
                            has_mask, mask_from_config, read_train, state_to_arrays, widths_from_config)
from fl_subnet.wire.records import (FJORD_BN_RECORD, FJORD_DISTILL, LABELS_KEY, width_stats_from_record,
                                    width_stats_to_record)

from .frozen import LocalBase, full_model, message_base


@dataclass
class Received:
    """What a train message carries, decoded.

    Attributes
    ----------
    model : nn.Module
        The compact sub-model in training mode (its parameters are the slice sent).
    mask : Mask
        The node's mask (kept units per group, output scales).
    spec : SubnetSpec or None
        The analysis of the architecture (cached per process); None for a plain message
        (no mask, no example shape: Flower's own FedAvg), whose model is the factory's
        full model with the arrays loaded, and its mask empty.
    arrays_key : str
        Name of the message's ArrayRecord: reply under the same key.
    config : Mapping[str, object]
        The message's ConfigRecord (``lr``, ``local-steps``, ``server-round``, mask bits…).
    widths : tuple[float, ...]
        FjORD's allowed per-batch widths (``fjord-widths``), empty otherwise; when set,
        ``model`` was built by :func:`fl_subnet.core.ordered.build_ordered`.
    layout : Layout or None
        The packing layout of the slice (:mod:`fl_subnet.wire.packed`) when it came packed
        (a sub-model), else None (a full model, one array per tensor):
        :func:`reply_arrays` replies in the same format.
    labels : tuple[int, ...]
        HeteroFL's label split (train config ``labels``, sorted): the labels this node
        holds, whose logits alone enter the loss
        (:func:`fl_subnet.core.label_split.mask_logits`); empty when the split is off.
    base : LocalBase or None
        With a frozen base (config ``base-fingerprint``): this node's base, checked
        against the message; ``model`` holds its frozen tensors and the received
        trainable ones, and :func:`reply_arrays` sends ``base.trainable`` only. None
        otherwise.
    """

    model: nn.Module
    mask: Mask
    spec: SubnetSpec | None
    arrays_key: str
    config: Mapping[str, object]
    widths: tuple[float, ...] = ()
    layout: Layout | None = None
    labels: tuple[int, ...] = ()
    base: LocalBase | None = None


def receive(msg: Message | RecordDict, model_factory: Callable[[], nn.Module]) -> Received:
    """Decode a train message into its compact sub-model and the rest of its content.

    Parameters
    ----------
    msg : Message or RecordDict
        The train message (or its ``content``): one ArrayRecord (the compact slice,
        whatever its key) and one ConfigRecord (mask bits, example shape, training
        config).
    model_factory : Callable[[], nn.Module]
        Builds the FULL architecture, e.g. the user's ``Net`` class. It is analysed
        once per process on the ``meta`` device (never allocated at full size).

    Returns
    -------
    Received

    Raises
    ------
    TypeError
        If ``model_factory`` is a model instance rather than a callable returning one.
    ValueError
        Naming the key, for a malformed message (no ArrayRecord, a bad mask, example
        shape, ``labels`` or ``fjord-bn`` record), or if the arrays do not match the mask;
        naming ``base-fingerprint``, if this node's frozen base differs from the
        server's (then before anything else is decoded).
    """
    if isinstance(model_factory, nn.Module):
        raise TypeError("receive() needs a model factory (e.g. the class Net), not a model instance "
                        f"({type(model_factory).__name__}): pass Net, not Net()")
    content = msg.content if isinstance(msg, Message) else msg
    arrays_key, arrays, config = read_train(content)
    base = message_base(config, model_factory)  # frozen base: ValueError naming 'base-fingerprint'
    labels = check_labels(config.get(LABELS_KEY), key=LABELS_KEY)  # label split: ValueError naming 'labels'
    shape, dtype = example_from_config(config)
    masked = has_mask(config)
    if not masked and shape is None and not is_packed(arrays) and not widths_from_config(config):
        # a plain message (Flower's own FedAvg): the full model, as the template builds it;
        # no analysis (a model whose first layer is not an nn.Linear needs an example input)
        if base is None:
            model = model_factory()
            model.load_state_dict(arrays_to_state(arrays))
        else:
            model = full_model(model_factory, arrays_to_state(arrays), base)
        model.train()
        return Received(model, Mask({}), None, arrays_key, config, labels=labels, base=base)
    spec = cached_spec(model_factory, shape, dtype)  # analysed once per process
    mask = mask_from_config(config, spec.all_groups) if masked else full_mask(spec.all_groups)
    spec.slicer.skipped_keys(mask)  # a depth block this model lacks: ValueError naming it
    widths = widths_from_config(config)  # FjORD: ValueError naming 'fjord-widths'
    meta = spec.state_meta if base is None else base.meta  # a frozen base: the trainable tensors travel
    layout = slice_layout(spec.slicer, mask, meta) if is_packed(arrays) else None
    state = arrays_to_state(arrays) if layout is None else unpack_state(arrays, layout)
    if base is not None:
        state = base.with_base(state, spec.slicer, mask)
    # FjORD gates the groups the server masked (none for a message without mask keys)
    model = build_ordered(spec, state, mask, gated=mask.indices if masked else ()) if widths \
        else spec.build(state, mask)
    static = check_policy(str(config.get(BATCHNORM_KEY, "averaged"))) == "static"
    if FJORD_BN_RECORD in content.array_records:  # FjORD's per-width BatchNorm statistics
        if not widths or static:
            raise ValueError(f"the message carries '{FJORD_BN_RECORD}' (per-width BatchNorm statistics) but "
                             + ("no 'fjord-widths'" if not widths else "static BatchNorm (batchnorm = 'static')"))
        stats = width_stats_from_record(content.array_records[FJORD_BN_RECORD])
        missing = sorted(set(widths) - set(stats))
        if missing or max(stats) != max(widths):
            raise ValueError(f"'{FJORD_BN_RECORD}' holds the statistics of widths {sorted(stats)}, but "
                             f"'fjord-widths' allows {list(widths)}")
        try:
            set_width_stats(model, stats)
        except ValueError as err:
            raise ValueError(f"'{FJORD_BN_RECORD}': {err}") from None
    if static:
        use_batch_statistics(model)
    return Received(model, mask, spec, arrays_key, config, widths, layout, labels, base)


def compact_model(msg: Message | RecordDict, model_factory: Callable[[], nn.Module]) -> nn.Module:
    """The compact sub-model of a train message (see :func:`receive`), in training mode.

    Its ``state_dict()`` has the full model's keys with compact shapes: reply with
    ``ArrayRecord(model.state_dict())`` under the message's ArrayRecord key (Flower's
    template uses ``"arrays"``, the strategies' default).
    """
    return receive(msg, model_factory).model


def distill_from_config(config: Mapping[str, object]) -> bool:
    """FjORD+KD's switch ``fjord-distill`` of a train config (absent: False).

    Raises
    ------
    ValueError
        Naming ``fjord-distill``, if the value is not a bool, or is true while the
        config carries no ``fjord-widths`` (self-distillation is FjORD's).
    """
    raw = config.get(FJORD_DISTILL, False)
    if not isinstance(raw, bool):
        raise ValueError(f"config key '{FJORD_DISTILL}' must be a bool, got {str(raw)[:80]!r}")
    if raw and not widths_from_config(config):
        raise ValueError(f"config key '{FJORD_DISTILL}' is true but the config has no 'fjord-widths': "
                         "self-distillation needs FjORD's per-batch widths")
    return raw


def width_schedule(received: Received, partition: int = 0) -> WidthSchedule:
    """FjORD's per-batch width sampler for a received train message (Horváth et al.,
    NeurIPS 2021, §3: ``p ~ U`` over the allowed widths up to the node's ``p_max``).

    The draws come from a generator seeded by the config's ``seed``, its
    ``server-round`` and ``partition`` only (:func:`fl_subnet.core.ordered.width_generator`).
    For a message without ``fjord-widths`` the schedule is inactive (calling it does
    nothing), so the same loop serves every strategy. In your own ClientApp::

        got = receive(msg, Net)
        model = got.model
        with width_schedule(got, context.node_config["partition-id"]) as next_width:
            for step, (x, y) in enumerate(trainloader):
                next_width(step)            # before the forward: this batch's width
                loss = criterion(model(x), y)
                ...
        # after the block the model is back at its max width: reply with model.state_dict()

    With ``fjord-distill`` true (FjORD+KD, ``next_width.distill``) each batch first
    trains the max width with the cross-entropy, then the drawn width on
    :func:`~fl_subnet.core.ordered.fjord_kd_loss`, one optimizer step for both::

                next_width(step)
                opt.zero_grad()
                with next_width.teacher():  # p_max
                    full = model(x)
                    criterion(full, y).backward()
                loss = fjord_kd_loss(model(x), full)
                loss.backward()
                opt.step()

    fl-subnet's ClientApp passes it as ``before_step`` to
    :func:`~fl_subnet.clients.train.train_local`.

    Parameters
    ----------
    received : Received
        From :func:`receive`.
    partition : int
        This node's partition id (node config ``partition-id``).

    Returns
    -------
    WidthSchedule
        Call it with the step index before each batch; use it as a context manager.

    Raises
    ------
    ValueError
        If an allowed width exceeds the slice the node received (naming the group), or
        ``fjord-distill`` is not a bool or is true without ``fjord-widths`` (naming it).
    """
    distill = distill_from_config(received.config)
    gen = width_generator(int(received.config.get("seed", 0)), int(received.config.get("server-round", 0)),
                          int(partition))
    return WidthSchedule(received.model, received.widths, gen, distill=distill)


def reply_arrays(received: Received, model: nn.Module | None = None) -> dict[str, ArrayRecord]:
    """``{arrays_key: ArrayRecord(compact state)}`` for the reply's RecordDict: packed
    like the received slice (one array per dtype kind) when it came packed, else one
    array per tensor. ``ArrayRecord(model.state_dict())`` is a valid reply too, about
    200 bytes per tensor larger, except with a frozen base (:attr:`Received.base`): the
    reply then holds the trainable tensors only. With FjORD's per-width statistics it
    also holds them, under ``fjord-bn``.

    Raises
    ------
    ValueError
        If the model's state no longer has the received slice's keys and shapes.
    """
    model = received.model if model is None else model
    state = model.state_dict()
    if received.base is not None:  # the base never travels
        trainable = set(received.base.trainable)
        state = {k: v for k, v in state.items() if k in trainable}
    arrays = state_to_arrays(state) if received.layout is None else pack_state(state, received.layout)
    out = {received.arrays_key: arrays}
    stats = width_stats(model) if received.widths else None
    if stats is not None:
        out[FJORD_BN_RECORD] = width_stats_to_record(stats)
    return out


__all__ = ["Received", "receive", "compact_model", "reply_arrays", "width_schedule", "distill_from_config"]
