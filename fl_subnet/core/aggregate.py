"""Masked aggregation: fold trained compact slices back into the full model.

For every entry ``e`` of every tensor (docs/design.md, "Exact semantics"; Liao & Kyrillidis 2022, Alg. 1,
the per-neuron weights η of Figure 1)::

    W_{k+1}[e] = Σ_{c holds e} n_c · W_c[e] / Σ_{c holds e} n_c

and an entry that no client held keeps ``W_k[e]`` (``untouched="zero"`` reproduces the
authors' reference code, which zeroes such neurons). Integer tensors (e.g. BatchNorm's
``num_batches_tracked``) are not averaged: they take the maximum over holders.

A reply may also be restricted to some rows (dim 0) of some tensors (``add(..., rows=)``):
its other rows of those tensors count as not held by it, in the sum and in the
denominator alike. HeteroFL's label split uses it for the classifier's rows of the labels
a node holds (:mod:`fl_subnet.core.label_split`; HeteroFL's ``Federation.combine``).
"""

from __future__ import annotations

import math
import os
import string
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping

import torch

from .flat import FlatMap
from .masks import Mask
from .slicing import Slicer, flat_positions, torch_threads

UNTOUCHED_MODES = ("keep", "zero")
DENOMINATORS = ("holders", "all", "zero-pad")
_WORKERS = max(1, min(4, os.cpu_count() or 1))
#: Entries of one row chunk of :meth:`MaskedAggregator.finalize`'s running sums and
#: denominators (1 MiB each in float32, 2 MiB in float64: small enough that the allocator
#: hands their memory back, or reuses it, between chunks).
CHUNK_ENTRIES = 1 << 18
#: A tensor of at most this many entries is summed whole (one chunk; 32 MiB in float64):
#: chunking it would save little memory and cost one pass over every reply per chunk.
WHOLE_ENTRIES = 1 << 22
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


class MaskedAggregator:
    """Accumulate ``(compact state, mask, weight)`` replies, then :meth:`finalize`.

    Parameters
    ----------
    global_state : Mapping[str, torch.Tensor]
        ``W_k``; not modified.
    slicer : Slicer
        Coupling table of the model's unit groups.
    untouched : {"keep", "zero"}
        What entries that no client held become: ``keep`` their value (default) or
        ``zero`` (only the reference code of Liao & Kyrillidis; kills those neurons).
    denominator : {"holders", "all", "zero-pad"}
        ``holders``: mean over the clients that held the entry (default). ``all``: mean
        over every client, a non-holder counting with the unchanged ``W_k[e]``; with one
        local step this is one step on the loss averaged over the masks (multi-sample
        dropout, Inoue 2019, Eq. 1). ``zero-pad``: mean over every client, a non-holder
        counting with 0 (each reply zero-padded to the full shape: the naive baseline
        of heterogeneous LoRA ranks, which HetLoRA, Cho et al. EMNLP 2024, starts from),
        ``Σ_{c holds e} n_c W_c[e] / Σ_c n_c``, computed in float64; an entry no client
        held falls back as ``untouched`` says.
    precision : {"float32", "float64"}
        Dtype of the running sums (never below the tensor's own). ``float32`` is what
        Flower's FedAvg does and the fastest; an entry with a single holder then comes
        back within one ulp. ``float64`` makes it bit-exact (``n·x/n == x``): use it
        where exact reassembly matters (IST). Either way the mean of finite replies is
        finite and in the tensor's dtype: a key whose float32 sums overflowed (values
        near the maximum, e.g. two float32 or bfloat16 replies of 3e38) is summed again
        in float64 from the same replies, and every key is summed in float64 when the
        weights do not fit float32 (their total above its maximum, or one below its
        smallest normal number). Without overflow the result is unchanged, at the cost
        of one finiteness check (a sum) per key.

    Notes
    -----
    :meth:`add` validates a reply and keeps a reference to its tensors (do not modify
    them afterwards); :meth:`finalize` scatters them key by key, on up to 4 threads,
    with one ``index_add_`` per reply and key over the compact entries — or, given a
    ``flat`` map (:class:`~fl_subnet.core.flat.FlatMap`, for models of many small
    tensors), with one ``index_add_`` per reply over all float tensors at once; the per-entry
    denominators are computed once in :meth:`finalize` as small products of the
    per-group holder indicators (``Σ_c n_c 1[i∈R_c] 1[j∈C_c]``), never per entry. A
    reply's row restriction (``rows=``) shrinks its ``R_c`` of those tensors: its sum
    skips the other rows (multiplied by 0), its indicator lists only the allowed rows.
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor], slicer: Slicer,
                 untouched: str = "keep", denominator: str = "holders",
                 precision: str = "float32", flat: FlatMap | None = None) -> None:
        if untouched not in UNTOUCHED_MODES:
            raise ValueError(f"untouched must be one of {UNTOUCHED_MODES}, got {untouched!r}")
        if denominator not in DENOMINATORS:
            raise ValueError(f"denominator must be one of {DENOMINATORS}, got {denominator!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        self.denominator = denominator
        self.precision = PRECISIONS[precision]
        self.state = dict(global_state)
        self.slicer = slicer
        self.untouched = untouched
        self._num: dict[str, torch.Tensor] = {}  # integer tensors: running max
        self._pending: list[dict[str, torch.Tensor]] = []  # float slices, scattered in finalize
        self._masks: list[Mask] = []
        self._kept: list[dict[str, list[tuple[int, torch.Tensor]]]] = []  # per reply: key -> (dim, positions)
        self._weights: list[float] = []
        self._rows: list[dict[str, torch.Tensor]] = []  # per reply: key -> full rows (dim 0) it contributes
        self._indicators: dict[tuple, torch.Tensor] = {}  # holder indicators, per finalize
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._flat_sum: torch.Tensor | None = None  # flat path: Σ n_c W_c and Σ n_c 1[c holds e], (N,)
        self._flat_den: torch.Tensor | None = None
        self._weights_fit = True  # the weights and their total fit the sums' dtype (else see finalize)
        self._total_weight = 0.0
        # the flat path needs the map of exactly these float tensors, of one dtype
        self.flat = flat if flat is not None and flat.matches(self.state) else None

    @property
    def num_replies(self) -> int:
        return len(self._weights)

    def check(self, compact: Mapping[str, torch.Tensor], mask: Mask) -> None:
        """Validate a reply against the slice its mask implies.

        Raises
        ------
        ValueError
            Naming the key: missing or extra keys, wrong shape or dtype. (NaN/Inf is
            checked by :meth:`add`, before anything is accumulated.)
        """
        expected = set(self.state) - self.slicer.skipped_keys(mask)
        missing = sorted(expected - set(compact))
        extra = sorted(set(compact) - expected)
        if missing or extra:
            raise ValueError(f"reply keys differ from the model: missing {missing}, extra {extra}")
        if self._shapes is None:
            self._shapes = {k: tuple(v.shape) for k, v in self.state.items()}
        wanted = (self.flat or self.slicer).compact_shapes(mask, self._shapes)
        for key, full in self.state.items():
            if key not in expected:
                continue
            t = compact[key]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"'{key}' is not a tensor ({type(t).__name__})")
            want = wanted[key]
            if tuple(t.shape) != want:
                raise ValueError(f"'{key}' has shape {tuple(t.shape)}, expected {want}")
            if t.dtype != full.dtype:
                raise ValueError(f"'{key}' has dtype {t.dtype}, expected {full.dtype}")

    def add(self, compact: Mapping[str, torch.Tensor], mask: Mask, weight: float = 1.0,
            checked: bool = False, rows: Mapping[str, torch.Tensor] | None = None) -> None:
        """Add one client's trained compact slice.

        Parameters
        ----------
        compact : Mapping[str, torch.Tensor]
            Tensor ``key`` of shape ``slicer.compact_shape(key, ...)``.
        mask : Mask
            The mask the slice was cut with.
        weight : float
            ``n_c`` (the client's ``num-examples``), or 1 for a count mean.
        checked : bool
            The caller already ran :meth:`check` on these keys and shapes (the
            strategy checks every reply before screening it): not checked again.
        rows : Mapping[str, torch.Tensor], optional
            Float key → int ``(k,)`` positions along its dim 0, in the full tensor's
            coordinates: of those tensors the reply contributes only these rows (the
            other rows count as not held by it, in the sum and the denominator; a row
            no reply contributes keeps ``W_k``, or becomes 0 with ``untouched="zero"``
            for a coupled key). None: every row it holds (the default). HeteroFL's
            label split (:func:`fl_subnet.core.label_split.row_restriction`).

        Raises
        ------
        ValueError
            If the mask, a tensor, the weight or ``rows`` (naming ``rows`` and the key)
            is invalid; nothing is accumulated then.
        """
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight (num-examples) must be finite and > 0, got {weight!r}")
        self.slicer.validate(mask)
        if not checked or self._shapes is None:
            self.check(compact, mask)
        rows = self._check_rows(rows, compact)
        w = float(weight)
        # Check every float tensor now, so a rejected reply leaves no trace; the scatter
        # itself happens in finalize() (the flat path adds the reply at once, after the checks).
        values = None
        with torch_threads():
            if self.flat is not None:
                values = self.flat.concat(compact, compact) if any(k in compact for k in self.flat.keys) else None
            if values is None or not _all_finite(values):
                for key, full in self.state.items():
                    t = compact.get(key)
                    if t is not None and full.is_floating_point() and not _all_finite(t):
                        raise ValueError(f"'{key}' contains NaN or Inf")
        if self.flat is not None:  # the integer keys' positions only (for their max)
            kept = {k: self.slicer.kept(mask, k, self._shapes[k]) for k, full in self.state.items()
                    if not full.is_floating_point() and k in compact}
        else:
            kept = self.slicer.kept_all(mask, self._shapes)  # cached per mask
        for key, full in self.state.items():
            if not full.is_floating_point() and key in compact:
                self._add_int(key, full, compact[key], mask, kept.get(key, []))
        self._total_weight += w
        if self._weights_fit and self.precision != torch.float64:
            info = torch.finfo(self.precision)  # else finalize() sums in float64 instead
            self._weights_fit = info.tiny <= w and self._total_weight <= info.max
        if values is not None and self._weights_fit:
            self._add_flat(values, mask, w, rows)
        self._pending.append({k: compact[k] for k in self.state if self.state[k].is_floating_point() and k in compact})
        self._rows.append(rows)
        self._masks.append(mask)
        self._kept.append(kept)
        self._weights.append(w)

    def _check_rows(self, rows: Mapping[str, torch.Tensor] | None,
                    compact: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``rows`` of :meth:`add` as key → sorted, unique int64 positions ``(k,)``.

        Raises
        ------
        ValueError
            Naming ``rows`` and the key: not a float key of the reply, a tensor without
            dims, or positions that are not integers in ``[0, size of dim 0)``.
        """
        if not rows:
            return {}
        out = {}
        for key, positions in rows.items():
            full = self.state.get(key)
            if full is None or not full.is_floating_point() or full.dim() == 0 or key not in compact:
                raise ValueError(f"rows: '{key}' is not a float tensor with dims of this reply")
            idx = torch.as_tensor(positions)
            if idx.dim() != 1 or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
                raise ValueError(f"rows: '{key}' needs a 1-D tensor of integer positions, got {str(positions)[:80]}")
            idx = torch.unique(idx.to(torch.int64))  # sorted
            if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= full.shape[0]):
                raise ValueError(f"rows: '{key}' positions must be in [0, {full.shape[0]}), got {idx.tolist()[:8]}")
            out[key] = idx
        return out

    def _sum_rows(self, key: str, r0: int, r1: int) -> torch.Tensor:
        """Σ_c n_c · W_c[key] over rows ``r0:r1`` (dim 0) of the full tensor, every added reply.

        Returns
        -------
        torch.Tensor
            ``(r1 - r0, *full.shape[1:])`` (``full.shape`` for a 0-dim tensor), in the
            sums' dtype: the running sum is only ever as large as one row chunk
            (:func:`row_chunks`), never the whole tensor.

        Notes
        -----
        Every entry gets the same arithmetic, in the same order of replies, whatever the
        chunk: each reply's operation is chosen from its kept positions over the *whole*
        tensor. A multi-dim ``index_add_`` adds slices with ``add_(alpha)`` (one fused
        multiply-add per entry), as do the uncut and one-cut-dim shortcuts; a 1-D
        ``index_add_``, a flat one (two or more coupled dims) and ``add_(t * w)``
        round ``w·t``, then add. Only how many rows one call covers changes.
        """
        full = self.state[key]
        dtype = self._acc_dtype(full)
        if full.dim() == 0 or (r0, r1) == (0, full.shape[0]) and full.dim() == 1:
            return self._sum_whole(key)
        acc = torch.zeros((r1 - r0, *full.shape[1:]), dtype=dtype)
        for compact, kept_of, w, rows_of in zip(self._pending, self._kept, self._weights, self._rows):
            if key not in compact:  # a depth block this reply skipped
                continue
            t = compact[key]
            kept = kept_of.get(key, [])
            by_dim = dict(kept)
            rows = by_dim.get(0)
            if rows is not None and rows.numel() != full.shape[0] and (r0, r1) == (0, full.shape[0]):
                lo, hi, rows_c = 0, rows.numel(), rows  # one chunk: every compact row, at its position
            elif rows is not None and rows.numel() != full.shape[0]:  # cut rows: the compact rows in r0:r1
                lo, hi = torch.searchsorted(rows, torch.tensor([r0, r1], dtype=rows.dtype)).tolist()
                rows_c = rows[lo:hi] - r0
            else:  # uncut rows: compact row i is full row i
                lo, hi, rows_c = r0, r1, None
            if hi <= lo:
                continue
            t = t[lo:hi].to(dtype)
            if key in rows_of:  # the rows outside the restriction add 0 (t * 0 = 0: finite, checked)
                keep = _allowed_rows(rows, rows_of[key], full.shape[0])[lo:hi]
                t = t * keep.view([-1] + [1] * (t.dim() - 1)).to(t.dtype)
            if not kept:
                acc.add_(t, alpha=w)
            elif len(kept) == 1:
                d, idx = kept[0]
                if idx.numel() == full.shape[d]:
                    acc.add_(t, alpha=w)
                elif d == 0:
                    acc.index_add_(0, rows_c, t, alpha=w)
                elif acc.numel() < 256 * full.shape[d]:
                    # small slices (e.g. columns of a 10-row matrix): one index_add_ per
                    # kept position is mostly call overhead; the same slice add_, done
                    # on the gathered slices at once, gives the same bits
                    part = acc.index_select(d, idx)
                    part.add_(t, alpha=w)
                    acc.index_copy_(d, idx, part)
                else:
                    acc.index_add_(d, idx, t, alpha=w)
            elif all(idx.numel() == full.shape[d] for d, idx in kept):
                acc.add_(t * w)
            else:
                if rows_c is not None:
                    by_dim[0] = rows_c
                else:
                    by_dim.pop(0, None)
                acc.view(-1).index_add_(0, flat_positions(list(by_dim.items()), acc.shape, torch.int64),
                                        t.reshape(-1), alpha=w)
        return acc

    def _sum_whole(self, key: str) -> torch.Tensor:
        """:meth:`_sum_rows` of a 0-dim or 1-D tensor, whole (one chunk)."""
        full = self.state[key]
        acc = torch.zeros_like(full, dtype=self._acc_dtype(full))
        for compact, kept_of, w, rows_of in zip(self._pending, self._kept, self._weights, self._rows):
            if key not in compact:
                continue
            t = compact[key].to(acc.dtype)
            kept = kept_of.get(key, [])
            if key in rows_of:
                keep = _allowed_rows(dict(kept).get(0), rows_of[key], full.shape[0])
                t = t * keep.to(t.dtype)
            if not kept:
                acc.add_(t, alpha=w)
            elif kept[0][1].numel() != full.shape[0]:
                acc.index_add_(0, kept[0][1], t, alpha=w)  # 1-D: rounds w·t, then adds
            else:
                acc.add_(t * w)
        return acc

    def _mean_key(self, key: str, weights: torch.Tensor) -> torch.Tensor:
        """The new value of float tensor ``key``: ``(Σ_c n_c W_c) / (Σ_c n_c 1[c holds e])``
        where some reply held ``e``, the fallback elsewhere (``W_k``, or 0 with
        ``untouched="zero"`` for a coupled key); ``denominator="all"`` mixes in ``W_k``.

        Built row chunk by row chunk (:func:`row_chunks`) into one new tensor of the
        key's shape and dtype: the sums and denominators only ever hold one chunk.
        """
        full = self.state[key]
        if self.denominator != "all" and not self._has(key):  # a depth block nobody trained
            return full.clone()
        zero = self.untouched == "zero" and key in self.slicer.coupled
        total = weights.sum()
        out = torch.empty(full.shape, dtype=full.dtype)
        for r0, r1 in row_chunks(full.shape):
            num = self._sum_rows(key, r0, r1)
            den = self._denominator(key, full, weights, (r0, r1))
            part = full if full.dim() == 0 else full[r0:r1]
            if self.denominator == "all":
                value = ((num.to(torch.float64) + part.to(torch.float64) * (total - den)) / total).to(full.dtype)
            elif self.denominator == "zero-pad":
                value = torch.where(den > 0, (num.to(torch.float64) / total).to(full.dtype),
                                    torch.zeros_like(part) if zero else part)
            else:
                held = den > 0
                mean = num.div_(torch.where(held, den, torch.ones_like(den)).to(num.dtype)).to(full.dtype)
                value = torch.where(held, mean, torch.zeros_like(part) if zero else part)
            if full.dim() == 0:
                out.copy_(value)
            else:
                out[r0:r1] = value
        return out

    def _add_flat(self, values: torch.Tensor, mask: Mask, w: float,
                  rows: Mapping[str, torch.Tensor] | None = None) -> None:
        """The flat path's :meth:`_sum_rows` and :meth:`_denominator` of every float key at
        once, for one reply: its float tensors laid end to end (``values``) added at its
        mask's flat positions with one ``index_add_``, and ``w`` with another (``add_``
        for a full mask); a row restriction drops the positions of the other rows first."""
        if self._flat_sum is None:
            self._flat_sum = torch.zeros(self.flat.numel, dtype=self._acc_dtype(self.state[self.flat.keys[0]]))
            self._flat_den = torch.zeros(self.flat.numel, dtype=self.precision)
        values = values.to(self._flat_sum.dtype)
        full = self.slicer.is_full(mask)
        if full and not rows:
            self._flat_sum.add_(values, alpha=w)
            self._flat_den.add_(w)
        else:
            kept = torch.arange(self.flat.numel) if full else self.flat.kept(mask)
            if rows:
                kept, values = self._flat_restrict(kept, values, rows)
            self._flat_sum.index_add_(0, kept, values, alpha=w)
            self._flat_den.index_add_(0, kept, self._flat_den.new_ones(1).expand(kept.numel()), alpha=w)

    def _flat_restrict(self, kept: torch.Tensor, values: torch.Tensor, rows: Mapping[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kept, values)`` without the entries of the restricted keys' other rows: a
        key's entries are a contiguous, ascending run of ``kept`` (found by bisection);
        its row of a flat position ``p`` is ``(p - offset) // (entries per row)``."""
        keep = torch.ones(kept.numel(), dtype=torch.bool)
        for key, allowed in rows.items():
            shape, offset = self.flat.shapes[key], self.flat.offsets[key]
            n = math.prod(shape)
            if n == 0:
                continue
            lo, hi = torch.searchsorted(kept, torch.tensor([offset, offset + n], dtype=kept.dtype)).tolist()
            ok = torch.zeros(shape[0], dtype=torch.bool)
            ok[allowed] = True
            keep[lo:hi] = ok[(kept[lo:hi].to(torch.int64) - offset) // (n // shape[0])]
        return kept[keep], values[keep]

    def _flat_sums(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(Σ_c n_c W_c, Σ_c n_c 1[c holds e]) of every float key, full-size (the flat path)."""
        if self._flat_sum is None:
            zero = torch.zeros(self.flat.numel, dtype=self.precision)
            return self.flat.split(zero.clone()), self.flat.split(zero)
        return self.flat.split(self._flat_sum.clone()), self.flat.split(self._flat_den)

    def _has(self, key: str) -> bool:
        return any(key in p for p in self._pending)

    def _acc_dtype(self, full: torch.Tensor) -> torch.dtype:
        return torch.promote_types(full.dtype, self.precision)

    def _add_int(self, key, full, t, mask, kept) -> None:
        acc = self._num.get(key)
        if acc is None:
            acc = self._num[key] = full.clone()
            first = True
        else:
            first = False
        if not kept:
            acc.copy_(t if first else torch.maximum(acc, t))
        else:
            flat = flat_positions(kept, full.shape, torch.int64)
            acc.view(-1).scatter_reduce_(0, flat, t.reshape(-1), "amax", include_self=not first)

    def _denominator(self, key: str, full: torch.Tensor, weights: torch.Tensor,
                     rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Σ_c n_c · 1[c holds e] for every entry, as a product of per-dim indicators
        (a reply's row restriction of ``key`` cuts its indicator along dim 0).

        Returns a tensor broadcastable to ``full`` (``(out, 1)`` for a matrix whose rows
        are units, ``()`` for an uncoupled tensor), in the sums' precision; ``rows``
        ``(r0, r1)``: only those rows of dim 0 (the other dims' sizes unchanged).
        """
        weights = weights * torch.tensor([key in p for p in self._pending], dtype=weights.dtype)
        coupled = self.slicer.coupled.get(key, {})
        restricted = [rows_of.get(key) for rows_of in self._rows]
        restrict = any(r is not None for r in restricted)
        dims = sorted(set(coupled) | ({0} if restrict else set()))
        if not dims:
            return weights.sum()
        inds = []
        for d in dims:
            if restrict and d == 0:  # per reply: its kept rows (all if uncut) within its restriction
                positions = []
                for kept_of, r in zip(self._kept, restricted):
                    p = dict(kept_of.get(key, [])).get(0) if 0 in coupled else None
                    p = torch.arange(full.shape[0]) if p is None else p.to(torch.int64)
                    positions.append(p if r is None else p[torch.isin(p, r)])
                inds.append(_indicator(positions, int(full.shape[0]), self.precision))
                continue
            positions = [dict(kept_of[key])[d] for kept_of in self._kept]
            # keys coupled to the same group share their position tensors: build the
            # holder indicator once per distinct list
            cache_key = (int(full.shape[d]), tuple(id(p) for p in positions))
            ind = self._indicators.get(cache_key)
            if ind is None:
                ind = self._indicators[cache_key] = _indicator(positions, int(full.shape[d]), self.precision)
            inds.append(ind)
        if rows is not None and dims and dims[0] == 0:
            inds[0] = inds[0][:, rows[0]:rows[1]]
        letters = string.ascii_letters[1:1 + len(dims)]
        spec = "a," + ",".join("a" + c for c in letters) + "->" + letters
        den = torch.einsum(spec, weights, *inds)
        view = [1] * full.dim()
        for d, size in zip(dims, den.shape):
            view[d] = size
        return den.reshape(view)

    def held(self) -> dict[str, torch.Tensor]:
        """Which entries some added reply held, per float tensor key.

        Returns
        -------
        dict[str, torch.Tensor]
            Key → bool tensor broadcastable to the key's shape (e.g. ``(out, 1)`` for a
            matrix whose rows are units, ``()`` for an uncoupled tensor): True where at
            least one reply held the entry. A depth block no reply carried is all False.
            Used by the masked server optimizers (:mod:`fl_subnet.core.server_opt`),
            which must move only held entries.
        """
        if not self._weights_fit:
            return self._in_float64().held()
        self._indicators = {}
        if self.flat is not None:
            return {key: den > 0 for key, den in self._flat_sums()[1].items()}
        ones = torch.ones(len(self._weights), dtype=self.precision)
        return {key: self._held_key(key, full, ones) for key, full in self.state.items() if full.is_floating_point()}

    def _held_key(self, key: str, full: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
        """:meth:`held` of one key: ``den > 0``, the denominators computed one row chunk
        at a time where they vary along dim 0 (no full-size float64 tensor)."""
        if 0 not in self.slicer.coupled.get(key, {}) and not any(key in r for r in self._rows):
            return self._denominator(key, full, ones) > 0  # constant along dim 0: (1, ...) or ()
        return torch.cat([self._denominator(key, full, ones, rows) > 0 for rows in row_chunks(full.shape)])

    def finalize(self) -> dict[str, torch.Tensor]:
        """The new global state ``W_{k+1}`` (new tensors; ``W_k`` if no reply was added)."""
        if not self._weights:
            return {k: v.clone() for k, v in self.state.items()}
        with torch_threads():
            if not self._weights_fit:  # the weights overflow (or underflow) the sums' dtype
                return self._in_float64()._finalize()
            return self._finalize()

    def _finalize(self, only: set[str] | None = None) -> dict[str, torch.Tensor]:
        weights = torch.tensor(self._weights, dtype=self.precision)
        float_keys = sorted((k for k, v in self.state.items()
                             if v.is_floating_point() and (only is None or k in only)),
                            key=lambda k: -self.state[k].numel())
        self._indicators = {}
        if self.flat is not None:
            sums, dens = self._flat_sums()
            means = {key: self._flat_mean(key, sums[key], dens[key], weights) for key in float_keys}
        else:
            # Keys are independent: build them on a few threads (torch releases the GIL).
            with ThreadPoolExecutor(max_workers=min(_WORKERS, max(len(float_keys), 1))) as pool:
                means = dict(zip(float_keys, pool.map(lambda k: self._mean_key(k, weights), float_keys)))
        out = {}
        for key, full in self.state.items():
            if only is not None and key not in only:
                continue
            if full.is_floating_point():
                out[key] = means.pop(key)
            else:
                out[key] = self._num.get(key, full).clone()  # nobody held it: unchanged
        if only is None:
            redo = self._overflowed(out)
            if redo:
                out.update(self._in_float64()._finalize(redo))
        return out

    def _flat_mean(self, key: str, num: torch.Tensor, den: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """:meth:`_mean_key` on the flat path, from the key's full-size sums ``num`` and
        denominators ``den`` (views of the flat accumulators)."""
        full = self.state[key]
        if self.denominator == "all":
            total = weights.sum()
            return ((num.to(torch.float64) + full.to(torch.float64) * (total - den)) / total).to(full.dtype)
        if not self._has(key):  # a depth block nobody trained
            return full.clone()
        held = den > 0
        fallback = torch.zeros_like(full) if (self.untouched == "zero" and key in self.slicer.coupled) else full
        if self.denominator == "zero-pad":
            return torch.where(held, (num.to(torch.float64) / weights.sum()).to(full.dtype), fallback)
        mean = num.div_(torch.where(held, den, torch.ones_like(den)).to(num.dtype)).to(full.dtype)
        return torch.where(held, mean, fallback)

    def _overflowed(self, out: Mapping[str, torch.Tensor]) -> set[str]:
        """The float keys whose mean in ``out`` is not finite although their sums ran
        below float64: every replied value is finite, so their sums overflowed (none at
        ``float64`` precision)."""
        if self.precision == torch.float64:
            return set()
        return {k for k, v in self.state.items() if v.is_floating_point() and not _all_finite(out[k])}

    def _in_float64(self) -> MaskedAggregator:
        """A per-tensor aggregator over the same replies (not copied) that sums and
        divides in float64."""
        exact = MaskedAggregator(self.state, self.slicer, self.untouched, self.denominator, "float64")
        exact._shapes = self._shapes
        exact._pending, exact._masks, exact._weights = self._pending, self._masks, self._weights
        exact._rows = self._rows
        # the flat path kept the integer keys' positions only
        exact._kept = self._kept if self.flat is None else [self.slicer.kept_all(m, self._shapes) for m in self._masks]
        exact._num = self._num
        return exact


def first_non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """The first key of ``state`` whose floating-point tensor holds a NaN or ±Inf entry
    (in the mapping's order), or None when every one is finite (integer tensors always
    are). One sum per tensor (:func:`_all_finite`)."""
    for key, t in state.items():
        if t.is_floating_point() and not _all_finite(t):
            return key
    return None


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of a float tensor is finite: its sum in its own dtype is
    finite (a NaN or ±Inf entry makes any sum non-finite); only when that sum
    overflows is it redone in float64, where finite entries cannot overflow."""
    return math.isfinite(float(t.sum())) or math.isfinite(float(t.sum(dtype=torch.float64)))


def row_chunks(shape: tuple[int, ...] | torch.Size, entries: int | None = None) -> list[tuple[int, int]]:
    """Row ranges ``(r0, r1)`` along dim 0 that split a tensor of ``shape`` into chunks of
    at most ``entries`` entries (:data:`CHUNK_ENTRIES`), or of one row where a row is
    larger. A 0-dim or 1-D tensor is one chunk (``(0, 0)`` and ``(0, n)``), and so is, with
    the default ``entries``, a tensor of at most :data:`WHOLE_ENTRIES` entries."""
    if len(shape) == 0:
        return [(0, 0)]
    rows = int(shape[0])
    if len(shape) == 1 or rows == 0 or (entries is None and math.prod(shape) <= WHOLE_ENTRIES):
        return [(0, rows)]
    step = max(1, (CHUNK_ENTRIES if entries is None else entries) // max(1, math.prod(shape[1:])))
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


def _allowed_rows(positions: torch.Tensor | None, allowed: torch.Tensor, length: int) -> torch.Tensor:
    """Bool ``(k,)`` over a compact tensor's rows: whether each row's full position (
    ``positions``, the kept rows along dim 0; None: uncut, rows ``0..length-1``) is in
    ``allowed``."""
    if positions is None:
        keep = torch.zeros(length, dtype=torch.bool)
        keep[allowed] = True
        return keep
    return torch.isin(positions.to(torch.int64), allowed)


def _indicator(positions: list[torch.Tensor], length: int, dtype: torch.dtype) -> torch.Tensor:
    """``(len(positions), length)`` 0/1 matrix: row ``i`` is 1 at ``positions[i]``."""
    ind = torch.zeros(len(positions), length, dtype=dtype)
    if positions:
        ind.view(-1)[torch.cat([p + i * length for i, p in enumerate(positions)])] = 1.0
    return ind
