"""Unit spaces and the labels that say where their units sit in each tensor dimension.

A *space* is a set of ``n`` atoms created by one producer (the ``out_features`` of a
Linear, the ``out_channels`` of a conv, the heads of an attention layer). Spaces that
must be kept or dropped together (a residual add, the ``q·kᵀ`` contraction of attention)
are merged (union–find). A space's *block* ``b`` groups consecutive atoms into one unit
(``n/b`` units): viewing a Linear's output as ``(heads, head_dim)`` sets ``b = head_dim``.

A *label* of one tensor dimension is a tuple of :class:`Segment` s: segment ``(space,
atoms, pos)`` says that atom ``atoms[i]`` of ``space`` occupies positions ``pos[i, :]``
of that dimension. Positions covered by no segment belong to no unit (always kept).
Every index map of the design (identity, block after a flatten, offset after a concat,
repeat in a packed q/k/v) is such a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Why a space cannot be masked. Hard reasons: no correct slice exists. Soft reasons: it
# could be masked, but by default it is not (residual streams, normalized dims).
HARD = ("input", "output", "structure", "op")
SOFT = ("residual", "normalized")


@dataclass
class Space:
    """One unit space (a union–find node); use :class:`Spaces` to read merged values."""

    id: int
    n: int
    name: str
    kind: str
    parent: int
    block: int = 1
    reasons: dict[str, str] = field(default_factory=dict)  # reason kind -> detail


@dataclass(frozen=True, eq=False)
class Segment:
    """Atoms ``atoms`` (shape ``(m,)``) of space ``space`` at positions ``pos`` ``(m, r)``."""

    space: int
    atoms: torch.Tensor
    pos: torch.Tensor

    def same_map(self, other: "Segment") -> bool:
        return (self.atoms.shape == other.atoms.shape and self.pos.shape == other.pos.shape
                and bool(torch.equal(self.atoms, other.atoms)) and bool(torch.equal(self.pos, other.pos)))


Label = tuple[Segment, ...]  # one tensor dimension; () = no unit lives there
EMPTY: Label = ()


class Spaces:
    """All spaces of one analysis, with union–find."""

    def __init__(self) -> None:
        self.items: list[Space] = []

    def new(self, n: int, name: str, kind: str) -> int:
        sid = len(self.items)
        self.items.append(Space(sid, int(n), name, kind, sid))
        return sid

    def find(self, sid: int) -> int:
        while self.items[sid].parent != sid:
            self.items[sid].parent = self.items[self.items[sid].parent].parent
            sid = self.items[sid].parent
        return sid

    def root(self, sid: int) -> Space:
        return self.items[self.find(sid)]

    def flag(self, sid: int, reason: str, detail: str) -> None:
        self.root(sid).reasons.setdefault(reason, detail)

    def flag_label(self, label: Label, reason: str, detail: str) -> None:
        for seg in label:
            self.flag(seg.space, reason, detail)

    def set_block(self, sid: int, block: int, where: str) -> None:
        sp = self.root(sid)
        b = math.lcm(sp.block, int(block))
        if sp.n % b:
            sp.reasons.setdefault("structure", f"{where}: {sp.n} units do not split into blocks of {b}")
        else:
            sp.block = b

    def union(self, a: int, b: int, where: str) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra.id == rb.id:
            return
        if ra.n != rb.n:
            ra.reasons.setdefault("structure", f"{where}: couples {ra.name} ({ra.n}) with {rb.name} ({rb.n})")
            rb.reasons.setdefault("structure", f"{where}: couples {rb.name} ({rb.n}) with {ra.name} ({ra.n})")
            return
        first, second = (ra, rb) if ra.id < rb.id else (rb, ra)
        second.parent = first.id
        for k, v in second.reasons.items():
            first.reasons.setdefault(k, v)
        self.set_block(first.id, second.block, where)


def unite(spaces: Spaces, a: Label, b: Label, where: str, residual: bool = False) -> Label:
    """Declare that dimension labels ``a`` and ``b`` carry the same units; returns the label.

    Two labelled dims whose tables agree merge their spaces; a labelled dim meeting an
    unlabelled one (e.g. the model input) cannot drop units; tables that disagree cannot
    be sliced consistently. Both cases flag the spaces so that they stay full.
    """
    if not a and not b:
        return EMPTY
    if not a or not b:
        spaces.flag_label(a or b, "input", f"{where}: meets a tensor whose units cannot be dropped")
        return a or b
    if len(a) != len(b) or not all(x.same_map(y) for x, y in zip(a, b)):
        spaces.flag_label(a, "structure", f"{where}: operands index units differently")
        spaces.flag_label(b, "structure", f"{where}: operands index units differently")
        return a
    for x, y in zip(a, b):
        spaces.union(x.space, y.space, where)
        if residual:
            spaces.flag(x.space, "residual", f"{where}: residual add")
    return a


def identity_label(sid: int, n: int) -> Label:
    """Atom ``i`` at position ``i`` (a fresh producer's output dim)."""
    ar = torch.arange(n)
    return (Segment(sid, ar, ar.view(-1, 1)),)


def shift(label: Label, offset: int) -> Label:
    return tuple(Segment(s.space, s.atoms, s.pos + offset) for s in label)


def _compress(pos: torch.Tensor) -> torch.Tensor:
    """Drop repeated positions within each row when every row keeps the same count."""
    if pos.shape[1] <= 1:
        return pos
    srt = pos.sort(dim=1).values
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    counts = first.sum(1)
    if bool((counts == counts[0]).all()):
        return srt[first].view(pos.shape[0], int(counts[0]))
    return pos


def reshape_groups(in_shape: list[int], out_shape: list[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input dims with runs of output dims of equal product (a view's map).

    Size-1 dims are left out of every run. ``None`` if the shapes do not pair up.
    """
    ia = [d for d, s in enumerate(in_shape) if s != 1]
    ja = [d for d, s in enumerate(out_shape) if s != 1]
    groups, p, q = [], 0, 0
    while p < len(ia) and q < len(ja):
        gi, gj = [ia[p]], [ja[q]]
        pi, pj = in_shape[ia[p]], out_shape[ja[q]]
        p, q = p + 1, q + 1
        while pi != pj:
            if pi < pj and p < len(ia):
                gi.append(ia[p]); pi *= in_shape[ia[p]]; p += 1  # noqa: E702
            elif pj < pi and q < len(ja):
                gj.append(ja[q]); pj *= out_shape[ja[q]]; q += 1  # noqa: E702
            else:
                return None
        groups.append((gi, gj))
    return groups if p == len(ia) and q == len(ja) else None


def reshape_labels(spaces: Spaces, labels: list[Label], in_shape: list[int],
                   out_shape: list[int], where: str) -> list[Label]:
    """Labels of a ``view``/``reshape``/``flatten``/``unflatten`` output.

    Merged dims compose their positions row-major (a channel before a flatten owns the
    block ``c·h·w … (c+1)·h·w − 1``); split dims unravel them. When a split puts several
    atoms at one position of the outer dim (a Linear's output viewed as heads), the space
    is coarsened so that those atoms form one unit.
    """
    pairs = reshape_groups(list(in_shape), list(out_shape))
    out: list[Label] = [EMPTY] * len(out_shape)
    for d, size in enumerate(in_shape):
        if size == 1 and labels[d]:
            spaces.flag_label(labels[d], "structure", f"{where}: a single-unit dim is reshaped")
    if pairs is None:
        for lab in labels:
            spaces.flag_label(lab, "structure", f"{where}: reshape not understood")
        return out
    for gi, gj in pairs:
        labelled = [d for d in gi if labels[d]]
        if not labelled:
            continue
        sizes = [in_shape[d] for d in gi]
        strides = [math.prod(sizes[k + 1:]) for k in range(len(sizes))]
        first = labels[labelled[0]]
        ok = all(len(labels[d]) == 1 and len(first) == 1
                 and spaces.find(labels[d][0].space) == spaces.find(first[0].space)
                 and torch.equal(labels[d][0].atoms, first[0].atoms) for d in labelled)
        if len(labelled) > 1 and not ok:
            for d in labelled:
                spaces.flag_label(labels[d], "structure", f"{where}: merges dims of different units")
            continue
        merged: list[Segment] = []
        for seg_index in range(len(labels[labelled[0]])):
            base = labels[labelled[0]][seg_index]
            m = base.atoms.numel()
            flat = torch.zeros(m, 1, dtype=torch.int64)
            for k, d in enumerate(gi):
                if labels[d]:
                    p = labels[d][seg_index if len(labelled) == 1 else 0].pos
                else:
                    p = torch.arange(in_shape[d]).view(1, -1).expand(m, -1)
                flat = (flat.unsqueeze(2) + (p * strides[k]).unsqueeze(1)).reshape(m, -1)
            merged.append(Segment(base.space, base.atoms, flat))
        osizes = [out_shape[d] for d in gj]
        ostrides = [math.prod(osizes[k + 1:]) for k in range(len(osizes))]
        coarsened = False
        for k, d in enumerate(gj):
            segs = []
            for seg in merged:
                coord = _compress((seg.pos // ostrides[k]) % osizes[k])
                full_row = coord.shape[1] == osizes[k] and osizes[k] > 1
                if full_row or osizes[k] == 1:
                    continue  # every atom covers the whole dim: it carries no unit
                if not coarsened and coord.shape[1] == 1:
                    _coarsen(spaces, seg, coord[:, 0], where)
                segs.append(Segment(seg.space, seg.atoms, coord))
            if segs:
                out[d] = tuple(segs)
                coarsened = True
    return out


def _coarsen(spaces: Spaces, seg: Segment, coord: torch.Tensor, where: str) -> None:
    """Atoms sharing one outer position must form aligned consecutive blocks: one unit each."""
    order = seg.atoms.argsort()
    atoms, c = seg.atoms[order], coord[order]
    m = c.numel()
    runs = torch.nonzero(c[1:] != c[:-1]).flatten()
    block = int(runs[0]) + 1 if runs.numel() else m
    if block == 1:
        return
    rows = c.view(-1, block) if m % block == 0 else None
    a = atoms.view(-1, block) if rows is not None else None
    if (rows is None or not bool((rows == rows[:, :1]).all()) or rows[:, 0].unique().numel() != rows.shape[0]
            or not bool((a[:, 0] % block == 0).all()) or not bool((a - a[:, :1] == torch.arange(block)).all())):
        spaces.flag(seg.space, "structure", f"{where}: a view splits units unevenly")
        return
    spaces.set_block(seg.space, block, where)
