"""Multi-head attention that keeps a subset of heads (the compact ``nn.MultiheadAttention``).

``nn.MultiheadAttention`` ties its inner width to ``embed_dim`` (``in_proj_weight`` is
``(3·embed_dim, embed_dim)``), so it cannot hold fewer heads than the residual stream
has ``embed_dim / head_dim`` of. This module computes the same function with any number
of heads of the original ``head_dim`` (scores scaled by ``1/√head_dim`` as in the full
model), under the same parameter names, so a compact slice of an ``nn.MultiheadAttention``
loads into it key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SubnetMultiheadAttention(nn.Module):
    """Self/cross attention with ``num_heads`` heads of ``head_dim``, packed q/k/v.

    Parameters
    ----------
    embed_dim : int
        Width E of the query/key/value inputs and of the output.
    num_heads : int
        Heads kept, ``h ≥ 0``.
    head_dim : int
        Width of one head (of the full model).
    bias : bool
        Whether ``in_proj_bias`` and ``out_proj.bias`` exist.
    batch_first : bool
        Inputs are ``(N, L, E)`` when True, else ``(L, N, E)``.
    dropout : float
        Attention dropout probability (training only).
    head_scale : torch.Tensor, optional
        Shape ``(h,)``: factor applied to each head's output before ``out_proj`` (the
        mask's output scale, 0 to drop a head in a full-size reference). Not part of
        the state dict.

    Notes
    -----
    Parameters: ``in_proj_weight`` ``(3·h·head_dim, E)`` (q rows, then k, then v),
    ``in_proj_bias`` ``(3·h·head_dim,)``, ``out_proj.weight`` ``(E, h·head_dim)``,
    ``out_proj.bias`` ``(E,)``. ``forward`` returns ``(output, weights)`` like
    ``nn.MultiheadAttention`` (weights averaged over heads when ``average_attn_weights``).
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0,
                 head_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, float(dropout)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        self.register_buffer("head_scale", head_scale, persistent=False)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, lq, _ = query.shape
        h, d = self.num_heads, self.head_dim
        w = self.in_proj_weight.chunk(3)
        b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        q, k, v = (F.linear(x, wi, bi).view(n, x.shape[1], h, d).transpose(1, 2)
                   for x, wi, bi in zip((query, key, value), w, b))
        scores = q @ k.transpose(-2, -1) / d ** 0.5
        if attn_mask is not None:
            am = attn_mask.view(n, h, lq, -1) if attn_mask.dim() == 3 else attn_mask
            scores = scores.masked_fill(am, float("-inf")) if am.dtype == torch.bool else scores + am
        if is_causal and attn_mask is None:
            causal = torch.ones(lq, k.shape[2], dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(n, 1, 1, -1)
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
        attn = scores.softmax(-1)
        weights = attn
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        out = attn @ v  # (n, h, lq, d)
        if self.head_scale is not None:
            out = out * self.head_scale.view(1, h, 1, 1).to(out.dtype)
        out = self.out_proj(out.transpose(1, 2).reshape(n, lq, h * d))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, (weights.mean(1) if average_attn_weights else weights)

    @classmethod
    def like(cls, mha: nn.MultiheadAttention, num_heads: int,
             head_scale: torch.Tensor | None = None) -> "SubnetMultiheadAttention":
        """An empty (meta) module shaped as ``mha`` with ``num_heads`` of its heads.

        Raises
        ------
        NotImplementedError
            For ``nn.MultiheadAttention`` options without a rule here (separate
            ``kdim``/``vdim`` projections, ``bias_k``/``bias_v``, ``add_zero_attn``).
        """
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise NotImplementedError(
                "fl_subnet masks heads of nn.MultiheadAttention only with packed q/k/v "
                "(kdim = vdim = embed_dim), no bias_k/bias_v and add_zero_attn=False")
        with torch.device("meta"):
            return cls(mha.embed_dim, num_heads, mha.head_dim, bias=mha.in_proj_bias is not None,
                       batch_first=mha.batch_first, dropout=mha.dropout, head_scale=head_scale)
