"""Random paths through a model's depth blocks: RaPTr's progressive subnetworks and
ResIST's partition of the residual blocks among the nodes of a round.

A *path* keeps some of the model's B depth blocks (:attr:`SubnetSpec.blocks`, skippable
residual branches) and skips the others (``Mask.skip``: a skipped branch is the
identity, its tensors are neither sent nor returned). Width stays full: every unit of
every group is kept. Masks come from ``generator_for(seed, server_round, slot)`` only
(docs/design.md, "Exact semantics"). With ``scale="raptr"`` a path's kept middle blocks
carry a factor on their residual branch (``Mask.block_scale``) so that the expected
residual sum over the random paths equals the full model's.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .masks import Mask
from .samplers import MaskSampler, generator_for

PATH_MODES = ("random", "partition")
#: Output scaling of a path's kept blocks (run-config key ``path-scale``): ``none`` (a
#: kept block runs as in the full model) or ``raptr`` (:meth:`RandomPathSampler.block_factor`).
PATH_SCALES = ("none", "raptr")

Length = int | float  # an int counts blocks; a float is a fraction of the B blocks


def _check_length(value: object, key: str = "path-length") -> Length:
    """An int ≥ 1 (a count of blocks) or a float in (0, 1] (a fraction of them)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{key} must be an integer >= 1 (blocks kept) or a number in (0, 1] "
                         f"(fraction of the blocks), got {value!r}")
    if isinstance(value, numbers.Integral):
        if value < 1:
            raise ValueError(f"{key} must be an integer >= 1 (blocks kept), got {value!r}")
        return int(value)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{key} as a fraction of the blocks must be in (0, 1], got {value!r}")
    return float(value)


def resolve_length(length: Length, num_blocks: int, key: str = "path-length") -> int:
    """Blocks a path keeps: a count as is, a fraction ``f`` as ``⌈f·B⌉``, never fewer
    than the first and last block (``min(2, B)``).

    Parameters
    ----------
    length : int or float
        A count of blocks (int) or a fraction of the ``num_blocks`` (float in (0, 1]).
    num_blocks : int
        B, the model's depth blocks.

    Raises
    ------
    ValueError
        Naming ``key`` if a count is outside ``[min(2, B), B]``.
    """
    low = min(2, num_blocks)
    if isinstance(length, int):
        if not low <= length <= num_blocks:
            raise ValueError(f"{key} must keep between {low} (the first and the last block) and {num_blocks} "
                             f"blocks of this model, got {length}")
        return length
    return max(low, min(num_blocks, math.ceil(length * num_blocks - 1e-9)))


def progressive_schedule(fractions: Sequence[float], num_rounds: int,
                         key: str = "path-length") -> tuple[tuple[int, float], ...]:
    """RaPTr's stages over a run: stage ``i`` of ``S`` starts at round ``1 + ⌊i·R/S⌋``.

    Parameters
    ----------
    fractions : Sequence[float]
        The fraction of the blocks kept in each stage, non-decreasing, each in (0, 1].
    num_rounds : int
        R, the run's server rounds (≥ S).

    Returns
    -------
    tuple[tuple[int, float], ...]
        ``((round_from, fraction), ...)`` for :class:`RandomPathSampler`'s ``schedule``.

    Raises
    ------
    ValueError
        Naming ``key``: an empty list, a fraction outside (0, 1], a decreasing list, or
        more stages than rounds.
    """
    stages = [_check_length(float(f) if isinstance(f, numbers.Integral) and not isinstance(f, bool) else f, key)
              for f in fractions]
    if not stages:
        raise ValueError(f"{key} needs at least one stage")
    if len(stages) > int(num_rounds):
        raise ValueError(f"{key} has {len(stages)} stages but the run has only {num_rounds} server rounds "
                         "(num-server-rounds): every stage needs at least one round")
    return tuple((1 + i * int(num_rounds) // len(stages), f) for i, f in enumerate(stages))


class RandomPathSampler(MaskSampler):
    """Each node keeps a random path of L of the model's B depth blocks; width stays full.

    ``mode="random"`` (RaPTr: Panigrahi et al., "Efficient Stagewise Pretraining via
    Progressive Subnetworks", 2024, Alg. 1): node slot ``i`` of round ``k`` keeps the
    first and the last block and ``L − 2`` of the ``B − 2`` middle blocks drawn uniformly
    without replacement from ``generator_for(seed, k, i)`` (each middle block is kept
    with probability ``(L − 2)/(B − 2)``); the stage ``schedule`` lengthens L over the
    rounds, up to the full model (L = B).

    ``scale="raptr"`` (mode ``random`` only) rescales the kept middle blocks: a kept
    middle block ``y = x + f(x)`` trains as ``y = x + s·f(x)`` with
    ``s = (B − 2)/(L − 2)`` (:meth:`block_factor`), the first and last block at 1. RaPTr
    rescales the outputs of the layers a path keeps so that the subnetwork stays
    comparable to the full network; its exact factor (paper or code) could not be
    checked against a source here, so this is the rule that makes a path unbiased for
    the residual sum, with RaPTr's always-kept set at 1: each middle block is kept with
    probability ``q = (L − 2)/(B − 2)``, so ``E[ζ_i·s·f_i(x)] = f_i(x)`` at a given
    input ``x`` (inverted dropout's argument, Srivastava et al. 2014, applied to whole
    branches: stochastic depth's ``1/keep-probability`` moved from test to training
    time). The full model (L = B) and a path of only the two ends (L = 2, nothing
    drawn) carry no factor; the global model is evaluated whole, factor 1.

    ``mode="partition"`` (ResIST: Dun et al., "ResIST: Layer-wise decomposition of
    ResNets for distributed training", UAI 2022): the ``p`` nodes of a round split
    the middle blocks among themselves (one permutation per round from
    ``generator_for(seed, k, -1)``, part sizes differing by at most one), so each middle
    block is held by exactly one node and the first and last by all; ``path_length`` and
    ``schedule`` are not used.

    Parameters
    ----------
    path_length : int or float, optional
        L for every round: a count of blocks (int) or a fraction of B (float in (0, 1],
        ``⌈f·B⌉``); at least the first and last block are kept.
    schedule : Sequence[tuple[int, int | float]], optional
        RaPTr's stages ``((round_from, L), ...)``: the first stage from round 1,
        ``round_from`` strictly increasing, L non-decreasing (counts or fractions as for
        ``path_length``; see :func:`progressive_schedule`). Exactly one of
        ``path_length`` and ``schedule`` in mode ``random``.
    blocks : Sequence[str], optional
        Depth block names in graph order (``[b.name for b in spec.blocks]``); may be
        given later with :meth:`bind`.
    mode : {"random", "partition"}
    seed : int
        Run seed.
    scale : {"none", "raptr"}
        ``none``: a kept block runs unscaled; ``raptr``: the kept middle blocks' branches
        ×(B − 2)/(L − 2) (mode ``random`` only).

    Raises
    ------
    ValueError
        Naming the key (``path-length``, ``schedule``, ``path-mode``, ``path-scale``) for
        a malformed length, schedule, mode or scale (or ``raptr`` with mode
        ``partition``), or a count outside ``[2, B]`` once the blocks are known.
    """

    def __init__(self, path_length: Length | None = None, *, schedule: Sequence[tuple[int, Length]] | None = None,
                 blocks: Sequence[str] | None = None, mode: str = "random", seed: int = 0,
                 scale: str = "none") -> None:
        super().__init__(seed)
        if mode not in PATH_MODES:
            raise ValueError(f"path-mode must be one of {PATH_MODES}, got {mode!r}")
        if not isinstance(scale, str) or scale not in PATH_SCALES:
            raise ValueError(f"path-scale must be one of {PATH_SCALES}, got {scale!r}")
        if scale != "none" and mode == "partition":
            raise ValueError(f"path-scale {scale!r} needs path-mode 'random' (RaPTr's random paths); ResIST's "
                             "partition keeps each middle block on exactly one node, with no keep probability")
        self.mode, self.scale = mode, scale
        if mode == "partition":
            if path_length is not None or schedule is not None:
                raise ValueError("path-length / schedule are not used by path-mode 'partition' (ResIST: the "
                                 "nodes of a round split the middle blocks); leave them out")
            self.schedule: tuple[tuple[int, Length], ...] = ()
        else:
            if (path_length is None) == (schedule is None):
                raise ValueError("give exactly one of path-length (blocks kept in every round) and schedule "
                                 "(RaPTr's stages ((round_from, length), ...))")
            self.schedule = ((1, _check_length(path_length)),) if schedule is None else self._check_schedule(schedule)
        self.blocks: tuple[str, ...] | None = None
        if blocks is not None:
            self.bind(blocks)

    @staticmethod
    def _check_schedule(schedule) -> tuple[tuple[int, Length], ...]:
        try:
            stages = [tuple(s) for s in schedule]
        except TypeError:
            raise ValueError(f"schedule must be a sequence of (round_from, length) pairs, got {schedule!r}") from None
        if not stages or any(len(s) != 2 for s in stages):
            raise ValueError(f"schedule must be a non-empty sequence of (round_from, length) pairs, got {schedule!r}")
        out = []
        for start, length in stages:
            if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 1:
                raise ValueError(f"schedule round_from must be an integer >= 1, got {start!r}")
            out.append((int(start), _check_length(length, "schedule length")))
        if out[0][0] != 1:
            raise ValueError(f"schedule must start at round 1, got round_from {out[0][0]}")
        if any(b[0] <= a[0] for a, b in zip(out, out[1:])):
            raise ValueError(f"schedule round_from must be strictly increasing, got {[s[0] for s in out]}")
        kinds = {type(length) for _, length in out}
        if len(kinds) == 1 and any(b[1] < a[1] for a, b in zip(out, out[1:])):
            raise ValueError(f"schedule lengths must not decrease (RaPTr lengthens the path), got "
                             f"{[s[1] for s in out]}")
        return tuple(out)

    def bind(self, blocks: Sequence[str]) -> "RandomPathSampler":
        """Set the model's depth blocks (graph order) and check the lengths against B.

        Raises
        ------
        ValueError
            Naming ``blocks`` if there are none or a name repeats, ``path-length`` if a
            count is outside ``[min(2, B), B]``, ``schedule`` if the resolved lengths decrease.
        """
        names = tuple(str(b) for b in blocks)
        if not names:
            raise ValueError("blocks: the model has no depth blocks (skippable residual branches)")
        if len(set(names)) != len(names):
            raise ValueError(f"blocks must be unique names, got {list(names)}")
        lengths = [resolve_length(length, len(names)) for _, length in self.schedule]
        if any(b < a for a, b in zip(lengths, lengths[1:])):
            raise ValueError(f"schedule lengths must not decrease (RaPTr lengthens the path), got {lengths} "
                             f"blocks of {len(names)}")
        self.blocks = names
        return self

    def _bound(self) -> tuple[str, ...]:
        if self.blocks is None:
            raise RuntimeError("RandomPathSampler has no depth blocks: call bind([b.name for b in spec.blocks])")
        return self.blocks

    def length(self, server_round: int) -> int:
        """L, the blocks every node keeps in ``server_round`` (mode ``random``).

        Raises
        ------
        ValueError
            In mode ``partition`` (the path length depends on the number of nodes).
        """
        num_blocks = len(self._bound())
        if self.mode == "partition":
            raise ValueError("path-mode 'partition' has no fixed path length (it splits the middle blocks)")
        current = self.schedule[0][1]
        for start, length in self.schedule:
            if server_round >= start:
                current = length
        return resolve_length(current, num_blocks)

    def block_factor(self, server_round: int) -> float:
        """The factor on a kept middle block's branch in ``server_round``:
        ``(B − 2)/(L − 2)`` with ``scale="raptr"`` (1/q, q the probability that a path
        keeps a given middle block), 1 with ``scale="none"``, for the full path
        (L = B) and for a path of the two ends only (L = 2)."""
        if self.scale == "none":
            return 1.0
        middle, drawn = len(self._bound()) - 2, self.length(server_round) - 2
        return middle / drawn if drawn > 0 else 1.0

    def kept_blocks(self, server_round: int, num_masks: int) -> list[list[int]]:
        """Per slot, the sorted positions (in ``blocks``) of the blocks it keeps."""
        blocks = self._bound()
        num_blocks = len(blocks)
        middle = num_blocks - 2
        ends = [0, num_blocks - 1] if num_blocks > 1 else [0]
        if middle <= 0:
            return [list(range(num_blocks)) for _ in range(num_masks)]
        if self.mode == "partition":
            gen = generator_for(self.seed, server_round, -1)
            part = torch.empty(middle, dtype=torch.int64)
            part[torch.randperm(middle, generator=gen)] = torch.arange(middle) * max(num_masks, 1) // middle
            return [sorted(ends + (1 + torch.nonzero(part == slot).flatten()).tolist()) for slot in range(num_masks)]
        take = self.length(server_round) - 2
        out = []
        for slot in range(num_masks):
            gen = generator_for(self.seed, server_round, slot)
            chosen = torch.randperm(middle, generator=gen)[:take] + 1
            out.append(sorted(ends + chosen.tolist()))
        return out

    def sample(self, groups, server_round, num_masks):
        """One mask per slot: every unit of ``groups`` kept (scale 1), ``skip`` = the
        blocks off the slot's path, ``block_scale`` = :meth:`block_factor` on each kept
        middle block when it is not 1."""
        blocks = self._bound()
        factor = self.block_factor(server_round) if self.mode == "random" else 1.0
        masks = []
        for kept in self.kept_blocks(server_round, num_masks):
            on_path = {blocks[i] for i in kept}
            middle = [blocks[i] for i in kept if 0 < i < len(blocks) - 1]
            masks.append(Mask({g.name: torch.arange(g.size) for g in groups},
                              skip=frozenset(b for b in blocks if b not in on_path),
                              block_scale={b: factor for b in middle} if factor != 1.0 else {}))
        return masks
