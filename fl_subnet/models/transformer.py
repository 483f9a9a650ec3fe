"""Two small pre-LN transformer encoder classifiers over token sequences.

:class:`HandAttentionTransformer` writes self-attention out with separate
``q_proj``/``k_proj``/``v_proj``/``o_proj`` linears; :class:`MHATransformer` uses
``nn.MultiheadAttention``. Both are traceable by ``torch.fx.symbolic_trace``.
"""

from __future__ import annotations

import torch
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with separate projections.

    Parameters
    ----------
    dim : int
        Model width ``C`` (a multiple of ``num_heads``).
    num_heads : int
        Number of heads ``H``; each has ``dim // num_heads`` features.

    Notes
    -----
    Input ``(N, T, C)``; output ``(N, T, C)``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the ``T`` positions of ``(N, T, C)``."""
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        att = att.softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(y)


class FeedForward(nn.Module):
    """``fc1 → GELU → fc2``: input ``(..., dim)``, output ``(..., dim)``.

    Parameters
    ----------
    dim : int
        Model width.
    ffn : int
        Hidden width.
    """

    def __init__(self, dim: int, ffn: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ffn, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the two-layer MLP position-wise."""
        return self.fc2(self.act(self.fc1(x)))


class HandBlock(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))`` then ``x + ffn(ln2(x))`` with :class:`SelfAttention`."""

    def __init__(self, dim: int, num_heads: int, ffn: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, T, dim)`` to ``(N, T, dim)``."""
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class MHABlock(nn.Module):
    """Pre-LN block as :class:`HandBlock` but with ``nn.MultiheadAttention``."""

    def __init__(self, dim: int, num_heads: int, ffn: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, T, dim)`` to ``(N, T, dim)``."""
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ffn(self.ln2(x))


class _EncoderClassifier(nn.Module):
    """Embedding + learned positions → blocks → LayerNorm → mean over T → linear head."""

    block_cls: type[nn.Module] = HandBlock

    def __init__(
        self,
        vocab_size: int = 16,
        seq_len: int = 8,
        dim: int = 32,
        num_heads: int = 4,
        ffn: int = 64,
        depth: int = 2,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[self.block_cls(dim, num_heads, ffn) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map ``(N, T)`` token ids (``T == seq_len``) to ``(N, num_classes)`` logits."""
        x = self.embed(tokens) + self.pos
        x = self.ln(self.blocks(x))
        return self.head(x.mean(1))


class HandAttentionTransformer(_EncoderClassifier):
    """Transformer encoder classifier with hand-written attention (:class:`SelfAttention`).

    Parameters
    ----------
    vocab_size, seq_len, dim, num_heads, ffn, depth, num_classes : int
        Vocabulary, sequence length ``T``, model width, heads, FFN width, blocks, classes.

    Notes
    -----
    Input ``(N, T)`` LongTensor of token ids; output ``(N, num_classes)`` logits.
    """

    block_cls = HandBlock


class MHATransformer(_EncoderClassifier):
    """Transformer encoder classifier using ``nn.MultiheadAttention(batch_first=True)``.

    Parameters
    ----------
    vocab_size, seq_len, dim, num_heads, ffn, depth, num_classes : int
        Vocabulary, sequence length ``T``, model width, heads, FFN width, blocks, classes.

    Notes
    -----
    Input ``(N, T)`` LongTensor of token ids; output ``(N, num_classes)`` logits.
    """

    block_cls = MHABlock
