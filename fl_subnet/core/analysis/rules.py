"""Per-layer and per-op rules: how units flow through each layer, and which (tensor, dim)
of its parameters they index. The one place that knows layer kinds (the compact builder
reads :data:`RESIZE` from here too).

A rule gets the :class:`~fl_subnet.core.analysis.trace.Propagation`, the fx node and its
inputs' values (a list of dim labels for a tensor, :class:`Param` for a parameter read
with ``get_attr``, anything else for constants) and returns the output's value.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .labels import EMPTY, reshape_labels


@dataclass(frozen=True)
class Param:
    """A parameter or buffer read by ``get_attr``: its ``state_dict`` key and shape."""

    key: str
    shape: tuple[int, ...]


ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Tanh,
    nn.Sigmoid, nn.ELU, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
)
POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
UNARY_FUNCS = {F.relu, F.relu6, F.gelu, F.silu, F.mish, F.leaky_relu, F.elu, F.hardswish, F.softplus,
               F.dropout, torch.relu, torch.tanh, torch.sigmoid, F.sigmoid, F.tanh, torch.exp, torch.neg,
               torch.abs, operator.neg}
UNARY_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float", "double", "half", "to",
                 "detach", "exp", "neg", "abs", "type_as", "relu_", "sigmoid_", "tanh_"}
POOL_FUNCS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
              F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d}
BINARY = {operator.add: True, operator.iadd: True, operator.sub: True, operator.isub: True,
          torch.add: True, torch.sub: True, operator.mul: False, operator.imul: False, torch.mul: False,
          operator.truediv: False, torch.div: False}
BINARY_METHODS = {"add": True, "add_": True, "sub": True, "sub_": True, "mul": False, "mul_": False,
                  "div": False, "div_": False}
RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
RESHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten}
MATMUL = {operator.matmul, torch.matmul, torch.bmm}
SOFTMAX = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax, torch.amin}


# ---------------------------------------------------------------- module rules
def linear_like(p, node, x, weight: str, bias: str | None, out_features: int, name: str):
    """``y = x Wᵀ + b``: W's dim 1 consumes x's last dim; a new space of ``out_features``."""
    p.consume(node, 0, len(x) - 1, x[-1])
    p.couple(weight, 1, x[-1])
    sid, lab = p.new_space(out_features, name, "neurons")
    p.couple(weight, 0, lab)
    if bias is not None:
        p.couple(bias, 0, lab)
    return [*x[:-1], lab]


def _linear(p, node, m: nn.Linear, x):
    t = node.target
    return linear_like(p, node, x, f"{t}.weight", f"{t}.bias" if m.bias is not None else None,
                       m.out_features, t)


def _conv(p, node, m: nn.Conv2d, x):
    t = node.target
    bias = f"{t}.bias" if m.bias is not None else None
    if m.groups == 1:
        p.consume(node, 0, 1, x[1])
        p.couple(f"{t}.weight", 1, x[1])
        _, lab = p.new_space(m.out_channels, t, "channels")
        p.couple(f"{t}.weight", 0, lab)
        if bias:
            p.couple(bias, 0, lab)
        return [x[0], lab] + [EMPTY] * (len(x) - 2)
    if m.groups == m.in_channels == m.out_channels:  # depthwise: channel c → channel c
        p.couple(f"{t}.weight", 0, x[1])
        if bias:
            p.couple(bias, 0, x[1])
        return [x[0], x[1]] + [EMPTY] * (len(x) - 2)
    p.spaces.flag_label(x[1], "op", f"'{t}' ({type(m).__name__}, groups={m.groups})")
    _, lab = p.new_space(m.out_channels, t, "channels")
    p.spaces.flag_label(lab, "op", f"'{t}' ({type(m).__name__}, groups={m.groups})")
    return [x[0], lab] + [EMPTY] * (len(x) - 2)


def _batchnorm(p, node, m: nn.modules.batchnorm._BatchNorm, x):
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, name, None) is not None:
            p.couple(f"{node.target}.{name}", 0, x[1])
    return list(x)


def _layernorm(p, node, m: nn.LayerNorm, x):
    k = len(m.normalized_shape)
    for i in range(k):
        lab = x[len(x) - k + i]
        if lab:
            p.spaces.flag_label(lab, "normalized", f"'{node.target}' (LayerNorm) normalizes over it")
            for name in ("weight", "bias"):
                if getattr(m, name, None) is not None:
                    p.couple(f"{node.target}.{name}", i, lab)
    return list(x)


def _groupnorm(p, node, m: nn.GroupNorm, x):
    if x[1]:
        p.spaces.flag_label(x[1], "normalized", f"'{node.target}' (GroupNorm) normalizes over it")
        for name in ("weight", "bias"):
            if getattr(m, name, None) is not None:
                p.couple(f"{node.target}.{name}", 0, x[1])
    return list(x)


def _embedding(p, node, m: nn.Embedding, idx):
    _, lab = p.new_space(m.embedding_dim, node.target, "features")
    p.couple(f"{node.target}.weight", 1, lab)
    return [*idx, lab]


def _mha(p, node, m: nn.MultiheadAttention, q, k=None, v=None, *rest):
    """Heads of ``nn.MultiheadAttention``: q/k/v rows (packed, repeated 3×) and the
    output projection's columns of each head form one unit."""
    t, e, h, d = node.target, m.embed_dim, m.num_heads, m.head_dim
    for x in (q, k, v):
        if isinstance(x, list):
            p.consume(node, 0, len(x) - 1, x[-1]) if x is q else None
            p.couple(f"{t}.in_proj_weight", 1, x[-1])
    if isinstance(k, list) and isinstance(v, list):
        p.unite(q[-1], k[-1], node)
        p.unite(q[-1], v[-1], node)
    heads = torch.arange(h)
    rows = (torch.arange(3).view(1, 3, 1) * e + heads.view(h, 1, 1) * d + torch.arange(d).view(1, 1, d))
    sid, _ = p.new_space(h, t, "heads")
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        p.spaces.flag(sid, "op", f"'{t}' (MultiheadAttention with kdim/vdim, bias_k or add_zero_attn)")
    p.couple_table(f"{t}.in_proj_weight", 0, sid, heads, rows.reshape(h, -1))
    if m.in_proj_bias is not None:
        p.couple_table(f"{t}.in_proj_bias", 0, sid, heads, rows.reshape(h, -1))
    p.couple_table(f"{t}.out_proj.weight", 1, sid, heads, (heads.view(h, 1) * d + torch.arange(d)))
    _, out = p.new_space(e, f"{t}.out_proj", "neurons")
    p.couple(f"{t}.out_proj.weight", 0, out)
    if m.out_proj.bias is not None:
        p.couple(f"{t}.out_proj.bias", 0, out)
    return ([*q[:-1], out], None)


def _flatten_module(p, node, m: nn.Flatten, x):
    return reshape_labels(p.spaces, x, p.shape(node.args[0]), p.shape(node), node.name)


def _pass(p, node, m, x, *rest):
    return list(x)


def _pool(p, node, m, x, *rest):
    return [x[0], x[1]] + [EMPTY] * (len(x) - 2) if len(x) > 2 else list(x)


def _softmax_module(p, node, m: nn.Softmax, x):
    return p.softmax(node, x, m.dim)


MODULE_RULES: dict[type[nn.Module], Callable] = {
    nn.Linear: _linear, nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv,
    nn.BatchNorm1d: _batchnorm, nn.BatchNorm2d: _batchnorm, nn.BatchNorm3d: _batchnorm,
    nn.LayerNorm: _layernorm, nn.GroupNorm: _groupnorm, nn.Embedding: _embedding,
    nn.MultiheadAttention: _mha, nn.Flatten: _flatten_module, nn.Softmax: _softmax_module,
    **{t: _pass for t in ELEMENTWISE_MODULES}, **{t: _pool for t in POOL_MODULES},
}


def module_rule(module: nn.Module) -> Callable | None:
    """The rule of ``module``'s class (or its nearest ruled base class), else None."""
    for cls in type(module).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls]
    return None


# ------------------------------------------------- size attributes of compact modules
def _resize_linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def _resize_conv(m: nn.Conv2d) -> None:
    m.out_channels = m.weight.shape[0]
    m.in_channels = m.weight.shape[1] * m.groups
    if m.groups > 1:  # depthwise stays depthwise
        m.groups = m.in_channels = m.out_channels


def _resize_bn(m) -> None:
    for name in ("weight", "running_mean"):
        t = getattr(m, name, None)
        if t is not None:
            m.num_features = t.shape[0]


def _resize_ln(m: nn.LayerNorm) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _resize_gn(m: nn.GroupNorm) -> None:
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


def _resize_embedding(m: nn.Embedding) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


RESIZE: dict[type[nn.Module], Callable[[nn.Module], None]] = {
    nn.Linear: _resize_linear, nn.Conv1d: _resize_conv, nn.Conv2d: _resize_conv, nn.Conv3d: _resize_conv,
    nn.BatchNorm1d: _resize_bn, nn.BatchNorm2d: _resize_bn, nn.BatchNorm3d: _resize_bn,
    nn.LayerNorm: _resize_ln, nn.GroupNorm: _resize_gn, nn.Embedding: _resize_embedding,
}


def register_resize(cls: type[nn.Module], rule: Callable[[nn.Module], None]) -> None:
    """Register how a compact module of class ``cls`` (and its subclasses without a rule
    of their own) sets its size attributes from its compact tensors, in :data:`RESIZE`.

    The compact builder calls ``rule(module)`` once its tensors are set, for every module
    of the class (:func:`fl_subnet.core.compact.build_compact_module`). A layer kind whose
    class cannot be imported here registers itself where it is found (LoRA layers:
    :func:`fl_subnet.core.lora.find_lora_groups`).
    """
    RESIZE[cls] = rule
