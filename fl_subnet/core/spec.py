"""The analysis result: a model's unit groups and how to cut, build and check sub-models.

Built once per process (server and client) by :func:`analyze` and reused for every
message (:func:`cached_spec`).
"""

from __future__ import annotations

import copy
import functools
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .analysis.depth import find_depth_blocks
from .analysis.resolve import AnalysisError, Resolved, resolve
from .analysis.trace import trace
from .compact import build_compact_graph, build_compact_module
from .frozen import trainable_keys
from .groups import UnitGroup
from .lora import find_lora_groups
from .masks import Mask
from .slicing import Slicer

log = logging.getLogger(__name__)
Example = torch.Tensor | tuple[torch.Tensor, ...]


def as_factory(model_or_factory: nn.Module | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A no-argument factory: a factory as is, a model instance as a deep-copying factory.

    Raises
    ------
    TypeError
        If the argument is neither an ``nn.Module`` nor a callable returning one.
    """
    if isinstance(model_or_factory, nn.Module):
        instance = model_or_factory
        return lambda: copy.deepcopy(instance)
    if callable(model_or_factory):
        return model_or_factory
    raise TypeError(f"expected an nn.Module or a factory returning one, got {type(model_or_factory).__name__}")


class SubnetSpec:
    """Unit groups of one architecture plus gather / scatter / build / verify.

    Attributes
    ----------
    groups : list[UnitGroup]
        The groups masked by this spec (the defaults, adjusted by ``include`` /
        ``exclude``); samplers draw masks over these.
    all_groups : list[UnitGroup]
        Every group a mask may name (also those left full by default).
    excluded, pinned : dict[str, str]
        Groups left full by default, and unit spaces that can never be masked, with why.
    slicer : Slicer
        Over ``all_groups`` and ``blocks``.
    blocks : list[DepthBlock]
        Skippable residual branches (depth groups), each with a ``.name`` a mask can
        list in ``Mask.skip`` (random-path / depth training).
    model_name : str
        The analysed model's class name (for messages).
    declared : bool
        Whether the groups were declared by the model's ``unit_groups()`` or are the
        ranks of its LoRA layers, not traced.
    lora : bool
        Whether the groups are the ranks of the model's LoRA layers
        (:mod:`fl_subnet.core.lora`); then only trainable adapters are cut, never the base.
    left_out : tuple[str, ...]
        Groups the caller's ``exclude=`` left full.
    trainable : tuple[str, ...] or None
        When the model has a frozen parameter (``requires_grad=False``: a frozen base,
        e.g. under LoRA adapters), the ``state_dict`` keys of its trainable parameters
        in ``state_dict`` order (:func:`fl_subnet.core.frozen.trainable_keys`): the only
        tensors the strategies send, receive and aggregate (docs/lora.md). None when
        every parameter is trainable: every tensor travels.
    """

    model_name: str = "the model"
    declared: bool = False
    lora: bool = False
    left_out: tuple[str, ...] = ()
    trainable: tuple[str, ...] | None = None

    def __init__(self, factory: Callable[[], nn.Module], all_groups: Sequence[UnitGroup],
                 groups: Sequence[UnitGroup], resolved: Resolved | None = None, graph=None) -> None:
        self.factory = factory
        self.all_groups = list(all_groups)
        self.groups = list(groups)
        self.resolved = resolved
        self.graph = graph
        self.blocks = find_depth_blocks(graph) if graph is not None else []
        self._blocks = {b.name: b for b in self.blocks}
        self.slicer = Slicer(self.all_groups, {b.name: b.keys for b in self.blocks})
        self.excluded = dict(resolved.excluded) if resolved else {}
        self.pinned = dict(resolved.pinned) if resolved else {}

    def nothing_to_mask(self, who: str) -> str:
        """Why this spec has no unit group to mask, and what to do: the message of the
        ``ValueError`` a masking strategy (``who``) raises for such a model."""
        if self.declared:
            found = ((f"the LoRA layers of {self.model_name} gave " if self.lora else
                      f"{self.model_name}.unit_groups() declared ")
                     + (f"the groups {[g.name for g in self.all_groups]}, all left full by exclude="
                        f"{list(self.left_out)}" if self.all_groups else "no group"))
            if self.lora and self.pinned:
                found += f" (adapters left whole: {self.pinned})"
        else:
            found = f"the analysis of {self.model_name} found 0 unit groups to mask"
            details = [f"{', '.join(map(repr, self.left_out))} left full by exclude={list(self.left_out)}"] \
                if self.left_out else []
            for name, why in self.excluded.items():
                if name in self.left_out or not any(g.name == name for g in self.all_groups):
                    continue
                details.append(f"'{name}' left full by default ({why}): " + (
                    "a sub-model would normalize over its kept units only, so include="
                    f"['{name}'] fails the verification" if why.startswith("normalized") or "; normalized" in why
                    else f"mask it with include=['{name}']"))
            details += [f"'{name}' can never be masked ({why})" for name, why in self.pinned.items()]
            if not details:
                details = ["it has no Linear, conv or attention layer whose units feed another layer"]
            found += ": " + "; ".join(details)
        return (f"{who} masks unit groups, but {found}. Nothing would be masked: every node would train the "
                f"full model. Opt groups in with include=[...] or out with exclude=[...] (fl_subnet.analyze), or "
                f"declare the groups by hand with a model.unit_groups() method (docs/any-architecture.md); "
                f"to train the full model on every node, use SubnetFedAvg")

    @functools.cached_property
    def state_meta(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every ``state_dict`` key of the full model → its shape and dtype (the model
        built once on the ``meta`` device: no memory for its tensors)."""
        with torch.device("meta"):
            model = self.factory()
        return {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items()}

    @functools.cached_property
    def parameter_keys(self) -> frozenset[str]:
        """The ``state_dict`` keys of the full model's parameters (every name of a tied
        one); the other keys are buffers (BatchNorm's running statistics, ...)."""
        with torch.device("meta"):
            model = self.factory()
        return frozenset(name for name, _ in model.named_parameters(remove_duplicate=False))

    def gather(self, full_state: Mapping[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
        """The compact slice of ``full_state`` under ``mask`` (see :meth:`Slicer.gather`)."""
        return self.slicer.gather(full_state, mask)

    def scatter(self, compact: Mapping[str, torch.Tensor], mask: Mask,
                into: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``into`` with the entries ``mask`` keeps overwritten by ``compact``."""
        return self.slicer.scatter(compact, mask, into)

    def build(self, compact_state: Mapping[str, torch.Tensor], mask: Mask) -> nn.Module:
        """The compact ``nn.Module`` holding exactly ``compact_state`` (never allocates the
        full model, except once per process for an untraced model with buffers outside its
        ``state_dict``: :func:`~fl_subnet.core.compact.build_compact_module`); in training
        mode. Its ``state_dict`` keys equal the full model's.

        Raises
        ------
        ValueError
            If the state's keys differ from the model's.
        """
        if self.graph is None:
            return build_compact_module(self.factory, compact_state, self.all_groups, mask)
        return build_compact_graph(self.graph, self.resolved, compact_state, self.slicer, mask,
                                   blocks=self._blocks)

    def reference(self, full_state: Mapping[str, torch.Tensor], mask: Mask) -> nn.Module:
        """The full-size model with the dropped units' contributions removed (their
        positions multiplied by 0, kept ones by the mask's scale, where they are mixed)."""
        if self.graph is None:
            raise NotImplementedError("reference() needs a traced model")
        return build_compact_graph(self.graph, self.resolved, self.slicer.gather(full_state, Mask({}, skip=mask.skip))
                                   if mask.skip else full_state, self.slicer, mask, full=True, blocks=self._blocks)

    def verify(self, model: nn.Module, example: Example, *, seed: int = 0, keep_prob: float = 0.5,
               atol: float = 1e-5, rtol: float = 1e-4) -> float:
        """Check, in eval mode, that the compact forward under a random mask equals the full
        forward with the dropped units removed; returns the largest difference.

        Raises
        ------
        AnalysisError
            Naming the groups whose compact forward differs (or fails).
        """
        if self.graph is None or not self.groups:
            return 0.0
        state = {k: v.detach() for k, v in model.state_dict().items()}
        gen = torch.Generator().manual_seed(seed)

        def draw(names):
            idx = {}
            for g in self.groups:
                if g.name in names:
                    keep = torch.nonzero(torch.rand(g.size, generator=gen) < keep_prob).flatten()
                    idx[g.name] = keep if keep.numel() else torch.tensor([0])
            return Mask(idx, {n: 1.0 / keep_prob for n in idx})

        def diff(mask):
            with torch.no_grad():
                ref = _first(self.reference(state, mask).eval()(*_args(example)))
                out = _first(self.build(self.gather(state, mask), mask).eval()(*_args(example)))
            if ref.shape != out.shape:
                raise ValueError(f"output shape {tuple(out.shape)} != {tuple(ref.shape)}")
            if not torch.allclose(out, ref, atol=atol, rtol=rtol):
                raise ValueError(f"max |compact - reference| = {float((out - ref).abs().max()):.3g}")
            return float((out - ref).abs().max())

        try:
            return diff(draw({g.name for g in self.groups}))
        except Exception:  # noqa: BLE001 — find the culprit groups, then raise
            bad = []
            for g in self.groups:
                try:
                    diff(draw({g.name}))
                except Exception as err:  # noqa: BLE001
                    bad.append(f"'{g.name}' ({g.kind}): {err}")
            raise AnalysisError(
                "the compact forward differs from the full forward with the dropped units removed "
                f"for group(s) {'; '.join(bad) or '(only in combination)'}; leave them full with "
                f"exclude=[...] or declare groups with model.unit_groups() (docs/any-architecture.md)") from None


def _args(example: Example) -> tuple:
    return example if isinstance(example, tuple) else (example,)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def analyze(model_or_factory: nn.Module | Callable[[], nn.Module], example_input: Example | None = None,
            *, include: Sequence[str] = (), exclude: Sequence[str] = (), verify: bool = True,
            seed: int = 0) -> SubnetSpec:
    """Find a model's unit groups by tracing it, and (by default) prove them right.

    The model is traced with torch.fx through per-layer rules: the hidden neurons of a
    Linear, the channels of a conv (with its BatchNorm), attention heads and FFN neurons
    become groups. Left full, with the reason in :attr:`SubnetSpec.excluded` (by default;
    ``include=`` can opt a residual stream in) or :attr:`SubnetSpec.pinned` (never):
    input features, output classes, residual streams, dims a softmax / LayerNorm /
    GroupNorm normalizes over, and units an op without a rule touches. A model that
    defines ``unit_groups() -> list[UnitGroup]`` is not traced: its declared groups are
    used as they are (not verified; see :class:`~fl_subnet.core.groups.UnitGroup` for an
    example, and docs/any-architecture.md). Recurrent layers (``nn.LSTM``, ``nn.GRU``,
    ``nn.RNN``) have no rule: such a model must declare its groups. A model with LoRA
    layers (a peft ``PeftModel``, or adapters injected into any model) is not traced
    either: its groups are the ranks of its trainable adapters
    (:func:`fl_subnet.core.lora.find_lora_groups`; docs/lora.md), its frozen base has none.

    Parameters
    ----------
    model_or_factory : nn.Module or Callable[[], nn.Module]
        The full model, or a factory building it.
    example_input : torch.Tensor or tuple of tensors, optional
        One input batch (any device; only its shape and dtype are used for the analysis,
        its values for the verification). Optional only for models whose first layer is
        an ``nn.Linear`` (a ``(1, in_features)`` input is assumed).
    include, exclude : Sequence[str]
        Group names to mask in addition to / instead of the defaults (hidden neurons,
        conv channels inside blocks, FFN neurons, attention heads; residual streams,
        normalized dims, input features and output classes stay full).
    verify : bool
        Run :meth:`SubnetSpec.verify` on a real model (built by the factory).
    seed : int
        Seeds the verification's mask.

    Returns
    -------
    SubnetSpec

    Raises
    ------
    AnalysisError
        (a ``NotImplementedError``) If a group to be masked passes through a layer with
        no rule, or the verification fails; the message names the module and the group.
        Also for a model with a recurrent layer or that torch.fx cannot trace, unless it
        declares ``unit_groups()``.
    ValueError
        If ``include``/``exclude`` names an unknown group or one that cannot be masked.

    Notes
    -----
    A spec with no group to mask is returned as is (FedAvg needs none); the masking
    strategies refuse it with a ``ValueError`` that says what was found
    (:meth:`SubnetSpec.nothing_to_mask`).

    Examples
    --------
    >>> import torch
    >>> from fl_subnet import analyze
    >>> from fl_subnet.models import FlowerCNN
    >>> spec = analyze(FlowerCNN, torch.zeros(1, 1, 8, 8), exclude=["conv1"])
    >>> [(g.name, g.size) for g in spec.groups]
    [('conv2', 16), ('fc1', 120), ('fc2', 84)]
    >>> spec.pinned["fc3"]
    'output: reaches the model output'
    """
    factory = as_factory(model_or_factory)
    with torch.device("meta"):
        skeleton = factory()
    frozen = any(not p.requires_grad for p in skeleton.parameters())
    trainable = tuple(trainable_keys(skeleton)) if frozen else None
    with torch.device("cpu"):  # index tables on the CPU even inside a caller's meta context
        spec = _analyze(model_or_factory, factory, skeleton, example_input, include, exclude, verify, seed)
    spec.trainable = trainable
    return spec


def _analyze(model_or_factory, factory, skeleton, example_input, include, exclude, verify, seed) -> SubnetSpec:
    lora = find_lora_groups(skeleton)
    custom = getattr(skeleton, "unit_groups", None)
    if lora is not None or callable(custom):
        groups = lora.groups if lora is not None else list(custom())
        spec = SubnetSpec(factory, groups, [g for g in groups if g.name not in set(exclude)])
        spec.declared = True
        spec.lora = lora is not None
        spec.pinned = dict(lora.pinned) if lora is not None else {}
        spec.model_name = type(skeleton).__name__
        spec.left_out = tuple(g.name for g in groups if g.name in set(exclude))
        if lora is not None:
            log.info("analyze: %s: %d LoRA rank groups masked, %d adapters left whole", spec.model_name,
                     len(spec.groups), len(spec.pinned))
        return spec
    example = example_input if example_input is not None else default_example(skeleton)
    prop = trace(skeleton, example)
    resolved = resolve(prop, frozenset(exclude))
    by_name = {g.name: g for g in resolved.groups}
    for name in [*include, *exclude]:
        if name not in by_name and not (name in exclude and name in resolved.pinned):
            why = resolved.pinned.get(name)
            raise ValueError(f"unit group '{name}' " + (f"cannot be masked ({why})" if why else
                             f"is unknown; groups: {sorted(by_name)}"))
    chosen = [g for g in resolved.groups
              if (g.name in resolved.default or g.name in include) and g.name not in exclude]
    spec = SubnetSpec(factory, resolved.groups, chosen, resolved, prop.gm)
    spec.model_name = type(skeleton).__name__
    spec.left_out = tuple(g.name for g in resolved.groups if g.name in exclude)
    if verify:
        real = model_or_factory if isinstance(model_or_factory, nn.Module) else factory()
        spec.verify(real, _real_example(example, seed), seed=seed)
    log.info("analyze: %s: %d groups masked (%s), %d left full", type(skeleton).__name__, len(chosen),
             ", ".join(g.name for g in chosen), len(resolved.groups) - len(chosen))
    return spec


def _real_example(example: Example, seed: int) -> Example:
    """``example`` itself, or (for meta tensors) random floats / zero ids of its shape."""
    if isinstance(example, tuple):
        return tuple(_real_example(t, seed) for t in example)
    if example.device.type != "meta":
        return example
    if example.is_floating_point():
        return torch.randn(example.shape, generator=torch.Generator().manual_seed(seed), dtype=example.dtype)
    return torch.zeros(example.shape, dtype=example.dtype)


def default_example(model: nn.Module) -> torch.Tensor:
    """``(2, in_features)`` for a model whose first ruled layer is an ``nn.Linear`` (two
    rows: a BatchNorm without running statistics normalises by the batch, even in eval).

    Raises
    ------
    ValueError
        For any other model: pass ``example_input``.
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return torch.zeros(2, m.in_features, device="meta")
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention)):
            break
    raise ValueError(f"pass example_input= (one input batch) to analyze {type(model).__name__}")


_CACHE: "OrderedDict[tuple, SubnetSpec]" = OrderedDict()
#: Analyses kept per process (least recently used dropped first): a node meets one model and
#: input shape per run, and a server that sends a new ``example-shape`` each round cannot
#: grow the cache without bound.
MAX_CACHED_SPECS = 8


def cached_spec(factory: Callable[[], nn.Module], example_shape: tuple[int, ...] | None,
                example_dtype: str | None, **options) -> SubnetSpec:
    """The spec of ``factory`` for inputs of this shape/dtype, analysed once per process
    (without verification: the server verified it)."""
    key = (factory, example_shape, example_dtype, tuple(sorted((k, tuple(v)) for k, v in options.items())))
    spec = _CACHE.get(key)
    if spec is None:
        example = None if example_shape is None else torch.zeros(
            example_shape, dtype=getattr(torch, example_dtype or "float32"), device="meta")
        spec = _CACHE[key] = analyze(factory, example, verify=False, **options)
        while len(_CACHE) > MAX_CACHED_SPECS:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return spec
