"""Capacity tiers after training: cut, save, load and evaluate the small sub-models.

A width-heterogeneous run (HeteroFL, FedRolex, FjORD, a core-alternation run) trains one
global model whose *tier* of capacity ``r`` is the nested prefix of every unit group:
the first ``⌈r·size⌉`` units (:func:`~fl_subnet.core.samplers.prefix_size`; FjORD's
ordered-dropout sub-model of width ``p``, Horváth et al. NeurIPS 2021, is the same). That is
HeteroFL's sub-model of "model rate" ``r`` (Diao, Ding & Tarokh, ICLR 2021, §3.1): its
reference code builds a rate-``r`` model with ``int(np.ceil(r * size))`` channels per
layer and copies the leading rows/columns of the global parameters into it. This module
cuts that sub-model out of a trained state (:func:`extract_submodel`), writes it as one
safetensors file a user can load without the training code's objects
(:func:`save_submodel` / :func:`load_submodel`: the header holds the kept units of every
group, so the model factory alone rebuilds the compact module), and measures each tier
on a test set (:func:`evaluate_tiers`).

The 1/r scaler
--------------
HeteroFL multiplies a sub-model's kept outputs by ``1/r`` *while training* (§3.2,
"Scaler"); its reference code (``src/modules/modules.py``) makes the scaler the identity
in eval mode, so a deployed sub-model and the global model run without it. ``scale``
therefore defaults to ``False`` here; ``scale=True`` gives the training-time forward
(the function a node of that tier optimised), as :class:`~fl_subnet.strategies.HeteroFL`
with ``scale=True`` sends it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from fl_subnet.checkpoint import load_model, save_model
from fl_subnet.core.batchnorm import batchnorm_layers, recompute_bn_stats
from fl_subnet.core.masks import Mask
from fl_subnet.core.samplers import NestedPrefixSampler, check_keep_prob
from fl_subnet.core.spec import SubnetSpec, analyze
from fl_subnet.wire import example_from_config, example_to_config

log = logging.getLogger(__name__)

#: ``format`` of a sub-model file's header.
FORMAT = "fl-subnet-submodel"
FORMAT_VERSION = 1

ModelOrState = nn.Module | Mapping[str, torch.Tensor] | str | Path


class Tier(NamedTuple):
    """One extracted tier.

    Attributes
    ----------
    capacity : float
        ``r`` in (0, 1].
    state : dict[str, torch.Tensor]
        The compact ``state_dict`` (the full model's keys, compact shapes).
    mask : Mask
        The kept units of every group (the first ``⌈r·size⌉``) and the output scales.
    spec : SubnetSpec
        The analysis of the full architecture (builds the compact module).
    """

    capacity: float
    state: dict[str, torch.Tensor]
    mask: Mask
    spec: SubnetSpec

    def module(self) -> nn.Module:
        """The compact ``nn.Module`` holding :attr:`state`, in eval mode."""
        return self.spec.build(self.state, self.mask).eval()


def tier_key(capacity: float, metric: str) -> str:
    """Result key of a tier's metric: ``tier_key(0.25, "acc") == "tier-0.25-acc"``,
    ``tier_key(1.0, "acc") == "tier-1-acc"`` (the capacity in ``%g`` format)."""
    return f"tier-{float(capacity):g}-{metric}"


def tier_mask(spec: SubnetSpec, capacity: float, *, scale: bool = False) -> Mask:
    """The nested prefix of width ``capacity`` of every masked group of ``spec``.

    ``NestedPrefixSampler`` (HeteroFL, §3.1) for one node of capacity ``capacity``:
    group ``g`` keeps units ``0 .. ⌈r·size_g⌉ − 1``, scaled by ``1/r`` if ``scale``.

    Raises
    ------
    ValueError
        If ``capacity`` is not in (0, 1] (naming ``capacity``).
    """
    r = check_keep_prob(capacity, "capacity")
    return NestedPrefixSampler(1.0, scale=scale).sample(spec.groups, 0, 1, capacities=[r])[0]


def _full_state(model_or_state: ModelOrState) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        return {k: v.detach() for k, v in model_or_state.state_dict().items()}
    if isinstance(model_or_state, (str, Path)):
        return load_model(model_or_state)
    if isinstance(model_or_state, Mapping):
        return dict(model_or_state)
    raise TypeError("expected a trained model, its state_dict or the path of a saved model, got "
                    f"{type(model_or_state).__name__}")


def spec_for(model_factory: Callable[[], nn.Module], example_input=None, *, include: Sequence[str] = (),
             exclude: Sequence[str] = ()) -> SubnetSpec:
    """The analysis the tiers are cut with (:func:`fl_subnet.analyze`, verified); pass the
    ``include``/``exclude`` the run was trained with (the strategies' default: none)."""
    return analyze(model_factory, example_input, include=include, exclude=exclude)


def _cut(spec: SubnetSpec, state: Mapping[str, torch.Tensor], capacity: float, scale: bool,
         calibration_batches: Iterable[torch.Tensor] | None) -> Tier:
    mask = tier_mask(spec, capacity, scale=scale)
    compact = spec.slicer.gather(state, mask)
    if calibration_batches is not None:
        module = spec.build(compact, mask)
        if batchnorm_layers(module):
            recompute_bn_stats(module, calibration_batches)
            compact = {k: v.detach() for k, v in module.state_dict().items()}
    return Tier(float(capacity), compact, mask, spec)


def extract_tier(model_or_state: ModelOrState, model_factory: Callable[[], nn.Module], capacity: float, *,
                 example_input=None, scale: bool = False, include: Sequence[str] = (),
                 exclude: Sequence[str] = (), calibration_batches: Iterable[torch.Tensor] | None = None,
                 spec: SubnetSpec | None = None) -> Tier:
    """The tier of width ``capacity`` of a trained model: compact state, mask and spec.

    Parameters
    ----------
    model_or_state : nn.Module, Mapping[str, torch.Tensor], str or Path
        The trained global (full) model, its ``state_dict``, or a ``.safetensors`` file
        of it (e.g. a run's ``model.safetensors``).
    model_factory : Callable[[], nn.Module]
        Builds the full architecture (analysed on the ``meta`` device).
    capacity : float
        ``r`` in (0, 1]: every masked group keeps its first ``⌈r·size⌉`` units.
    example_input : torch.Tensor, optional
        One input batch (needed unless the model starts with an ``nn.Linear``).
    scale : bool
        Multiply the kept units' outputs by ``1/r`` (HeteroFL's training-time scaler).
        Default False: HeteroFL evaluates without it (see the module docstring).
    include, exclude : Sequence[str]
        Groups masked besides / instead of the defaults, as in training.
    calibration_batches : Iterable[torch.Tensor], optional
        Inputs on which to recompute the sub-model's BatchNorm statistics (HeteroFL's
        static BatchNorm, §3.2: the statistics of *this* sub-model); ignored without
        BatchNorm layers. Default: the global model's statistics, sliced.
    spec : SubnetSpec, optional
        A ready analysis of ``model_factory`` (skips the analysis).

    Returns
    -------
    Tier

    Raises
    ------
    ValueError
        If ``capacity`` is outside (0, 1], or the state does not fit the architecture.
    TypeError
        If ``model_or_state`` is none of the accepted types.
    """
    spec = spec if spec is not None else spec_for(model_factory, example_input, include=include, exclude=exclude)
    return _cut(spec, _full_state(model_or_state), capacity, scale, calibration_batches)


def extract_submodel(model_or_state: ModelOrState, model_factory: Callable[[], nn.Module], capacity: float,
                     **kwargs) -> nn.Module:
    """The compact ``nn.Module`` of the tier of width ``capacity`` (eval mode).

    HeteroFL's sub-model (Diao et al., ICLR 2021, §3.1): tensor ``W`` of shape
    ``(out, in)`` becomes ``W[:⌈r·out⌉, :⌈r·in⌉]`` on every masked dim (input features and
    output classes are never masked). Its forward equals the full model's with the units
    beyond the prefix removed (and, with ``scale=True``, the kept ones scaled by ``1/r``).
    Keyword arguments as :func:`extract_tier`.

    Raises
    ------
    ValueError, TypeError
        As :func:`extract_tier`.
    """
    return extract_tier(model_or_state, model_factory, capacity, **kwargs).module()


def save_submodel(path: str | Path, model_or_state: ModelOrState | Tier, model_factory=None,
                  capacity: float | None = None, *, example_input=None, meta: Mapping[str, object] | None = None,
                  **kwargs) -> Tier:
    """Write the tier of width ``capacity`` as one safetensors file (atomically).

    The tensors are the compact ``state_dict``; the header (``fl-subnet`` metadata, see
    :func:`fl_subnet.checkpoint.save_model`) holds ``format``, ``capacity``, ``scale``,
    the kept unit indices and output scale of every group, and the example input's shape
    and dtype, so :func:`load_submodel` rebuilds the module from the model factory alone.

    Parameters
    ----------
    path : str or Path
        The file to write (``.safetensors``).
    model_or_state : nn.Module, Mapping, str, Path or Tier
        As :func:`extract_tier`, or an already extracted :class:`Tier`.
    model_factory, capacity
        As :func:`extract_tier` (unused for a :class:`Tier`).
    example_input : torch.Tensor, optional
        Also recorded in the header (needed to load models that start with a conv).
    meta : Mapping, optional
        Extra JSON-serialisable header entries (e.g. the run config).
    **kwargs
        ``scale``, ``include``, ``exclude``, ``calibration_batches``, ``spec``.

    Returns
    -------
    Tier
        What was written.
    """
    if isinstance(model_or_state, Tier):
        tier = model_or_state
    else:
        if model_factory is None or capacity is None:
            raise TypeError("save_submodel needs model_factory and capacity (or an extracted Tier)")
        tier = extract_tier(model_or_state, model_factory, capacity, example_input=example_input, **kwargs)
    groups = {g.name: g for g in tier.spec.all_groups}
    header = {
        **dict(meta or {}),
        "format": FORMAT, "format-version": FORMAT_VERSION, "capacity": tier.capacity,
        "scale": any(tier.mask.scale_of(groups[n]) != 1.0 for n in tier.mask.indices),
        "indices": {n: idx.tolist() for n, idx in tier.mask.indices.items()},
        "group-sizes": {n: groups[n].size for n in tier.mask.indices},
        "scales": {n: tier.mask.scale_of(groups[n]) for n in tier.mask.indices},
        "skip": sorted(tier.mask.skip),
        **example_to_config(example_input),
    }
    save_model(path, tier.state, header)
    log.info("save_submodel: tier %.4g (%d parameters) -> %s", tier.capacity,
             sum(v.numel() for v in tier.state.values()), path)
    return tier


def read_header(path: str | Path) -> dict:
    """The ``fl-subnet`` header of a sub-model file (see :func:`save_submodel`).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If it is not a safetensors file, or not a sub-model file (e.g. a full model).
    """
    from safetensors import safe_open

    load_model(path)  # FileNotFoundError / ValueError naming the path
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("fl-subnet")
    header = json.loads(raw) if raw else {}
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: not an fl-subnet sub-model file (its header has no format {FORMAT!r}); a run's "
                         "model.safetensors holds the full model: load it with fl_subnet.checkpoint.load_model, "
                         "or cut a tier with save_submodel / `fl-subnet extract`")
    return header


def load_submodel(path: str | Path, model_factory: Callable[[], nn.Module]) -> nn.Module:
    """The compact module saved by :func:`save_submodel`, in eval mode.

    Only ``model_factory`` (the full architecture, e.g. the class ``Net``) is needed:
    it is analysed on a ``meta`` input of the recorded example shape, the recorded
    indices become the mask, and every tensor's shape is checked against the compact
    shape the architecture gives for that mask.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        Naming the path and the tensor or group: not a sub-model file, a group the
        architecture lacks or of another size, or a tensor of another shape (the file
        was cut from a different model).
    """
    header = read_header(path)
    state = load_model(path)
    shape, dtype = example_from_config(header)
    example = None if shape is None else torch.zeros(shape, dtype=getattr(torch, dtype), device="meta")
    spec = analyze(model_factory, example, verify=False)
    groups = {g.name: g for g in spec.all_groups}
    for name, size in header["group-sizes"].items():
        if name not in groups or groups[name].size != size:
            have = groups[name].size if name in groups else None
            raise ValueError(f"{path}: unit group '{name}' of size {size} does not match the model factory's "
                             f"({'no such group' if have is None else f'size {have}'}; groups: "
                             f"{sorted(groups)})")
    mask = Mask({n: torch.tensor(idx, dtype=torch.int64) for n, idx in header["indices"].items()},
                {n: float(s) for n, s in header["scales"].items()}, frozenset(header.get("skip", ())))
    mask.validate(spec.all_groups)
    with torch.device("meta"):
        full = spec.factory().state_dict()
    expected = {k: spec.slicer.compact_shape(k, v.shape, mask) for k, v in full.items()
                if k not in spec.slicer.skipped_keys(mask)}
    if set(expected) != set(state):
        raise ValueError(f"{path}: tensors {sorted(set(state) ^ set(expected))} differ from the model "
                         "factory's sub-model")
    for key, want in expected.items():
        if tuple(state[key].shape) != want:
            raise ValueError(f"{path}: tensor '{key}' has shape {tuple(state[key].shape)}, the model factory's "
                             f"tier {header['capacity']} has {want}: the file was cut from another model")
    return spec.build(state, mask).eval()


def evaluate_tiers(model_or_state: ModelOrState, model_factory: Callable[[], nn.Module],
                   capacities: Iterable[float], test_set, *, loss: str = "cross-entropy", example_input=None,
                   scale: bool = False, calibration_batches: Iterable[torch.Tensor] | None = None,
                   out_dir: str | Path | None = None, meta: Mapping[str, object] | None = None,
                   spec: SubnetSpec | None = None,
                   tier_state: Callable[[float, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
                   ) -> dict[str, float]:
    """Loss and accuracy of each tier's sub-model on ``test_set``.

    Each tier is cut (:func:`extract_tier`, one analysis for all) and evaluated alone with
    :func:`fl_subnet.clients.train.evaluate_model`.

    Parameters
    ----------
    model_or_state, model_factory, example_input, scale, calibration_batches, spec
        As :func:`extract_tier`.
    capacities : Iterable[float]
        The tiers, each in (0, 1] (duplicates are evaluated once).
    test_set : Dataset
        ``(x, y)`` pairs, ``x`` as the model takes it.
    loss : {"cross-entropy", "mse"}
        ``eval-acc`` is reported for cross-entropy only.
    out_dir : str or Path, optional
        Also write each tier as ``tier-<r>.safetensors`` there (:func:`save_submodel`).
    meta : Mapping, optional
        Extra header entries of those files.
    tier_state : Callable[[float, dict], dict], optional
        ``(capacity, full state) -> full state`` the tier is cut from (e.g.
        :meth:`fl_subnet.strategies.FjORD.tier_state`: the tier's own per-width BatchNorm
        statistics); default: every tier is cut from the same state.

    Returns
    -------
    dict[str, float]
        ``tier-<r>-loss``, ``tier-<r>-acc`` (classification) and ``tier-<r>-params``
        (parameters and buffers of the sub-model) for every tier, e.g. ``tier-0.25-acc``.
    """
    from fl_subnet.clients.train import evaluate_model

    state = _full_state(model_or_state)
    spec = spec if spec is not None else spec_for(model_factory, example_input)
    calib = list(calibration_batches) if calibration_batches is not None else None
    out: dict[str, float] = {}
    for r in dict.fromkeys(float(c) for c in capacities):
        tier = _cut(spec, state if tier_state is None else tier_state(r, state), r, scale, calib)
        metrics = evaluate_model(tier.module(), test_set, loss)
        out[tier_key(r, "loss")] = metrics["eval-loss"]
        if "eval-acc" in metrics:
            out[tier_key(r, "acc")] = metrics["eval-acc"]
        out[tier_key(r, "params")] = sum(v.numel() for v in tier.state.values())
        if out_dir is not None:
            save_submodel(Path(out_dir) / tier_file(r), tier, example_input=example_input, meta=meta)
        log.info("tier %.4g: %d parameters, eval-loss %.4g%s", r, out[tier_key(r, "params")], metrics["eval-loss"],
                 f", eval-acc {metrics['eval-acc']:.4f}" if "eval-acc" in metrics else "")
    return out


def tier_file(capacity: float) -> str:
    """File name of a tier in a run folder: ``tier-0.25.safetensors``, ``tier-1.safetensors``."""
    return f"tier-{float(capacity):g}.safetensors"


def capacity_tiers(strategy) -> tuple[float, ...]:
    """The capacity tiers a trained run should report, sorted: a strategy's
    ``capacity_tiers`` (HeteroFL, FedRolex) together with the capacities nodes declared
    in their node config, or its ``core_fraction`` (core alternation); ``()`` for a
    strategy without tiers."""
    tiers = [float(t) for t in getattr(strategy, "capacity_tiers", ()) or ()]
    if tiers:  # nodes that declared `capacity` in their node config (SubnetStrategy.capacity_of)
        tiers += [float(c) for c in getattr(strategy, "declared_capacities", {}).values()]
    core = getattr(strategy, "core_fraction", None)
    if core is not None:
        tiers.append(float(core))
    return tuple(sorted({t for t in tiers if math.isfinite(t)}))


__all__ = ["Tier", "tier_mask", "extract_tier", "extract_submodel", "save_submodel", "load_submodel",
           "read_header", "evaluate_tiers", "tier_key", "tier_file", "capacity_tiers", "spec_for"]
