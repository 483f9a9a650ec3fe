"""HeteroFL's label split: a node trains and updates only the classifier rows of the labels
it holds.

When the data is split non-IID by label, HeteroFL's official code (Diao, Ding & Tarokh,
ICLR 2021, §4 "non-IID"; github.com/diaoenmao/HeteroFL-Computation-and-Communication-
Efficient-Federated-Learning-for-Heterogeneous-Clients, commit 311c889) does two things:

1. on the node, the logits of the labels it does not hold are set to 0 before the
   cross-entropy (``src/models/conv.py`` and ``resnet.py``, ``forward``)::

       label_mask = torch.zeros(cfg['classes_size'], device=out.device)
       label_mask[input['label_split']] = 1
       out = out.masked_fill(label_mask == 0, 0)

   (:func:`mask_logits`);
2. on the server, ``Federation.combine`` (``src/fed.py``) adds a node's output-layer
   weight rows and bias entries to the sum and to the count only for the labels it holds
   (``param_idx[m][k][0] = param_idx[m][k][0][label_split]``), so each output row is
   averaged over the nodes that hold its label, and a row no node holds keeps its value.
   :func:`row_restriction` gives these rows to
   :meth:`fl_subnet.core.aggregate.MaskedAggregator.add` (``rows=``).

The output layer is the module producing the model's output in the traced graph
(:func:`output_layer`); the reference names it by key (``'linear'`` in the key, or the
last ``weight``/``bias``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx

log = logging.getLogger(__name__)

#: Nodes walked back from the graph's output to find the layer producing it.
MAX_WALK = 16


class OutputLayer(NamedTuple):
    """The classifier: its weight key, its bias key (None without bias) and its classes
    (the weight's dim 0)."""

    weight: str
    bias: str | None
    classes: int


def output_layer(spec, name: str | None = None, *, key: str = "label-split") -> OutputLayer:
    """The layer producing a model's logits.

    Parameters
    ----------
    spec : SubnetSpec
        The model's analysis (:func:`fl_subnet.analyze`): its traced graph
        (``spec.graph``) and ``spec.state_meta``.
    name : str, optional
        The module's name (``"fc3"``), for a model whose groups are declared
        (``unit_groups()``, no traced graph) or whose output is not a layer's.
    key : str
        The option named in errors.

    Returns
    -------
    OutputLayer
        ``<module>.weight`` of shape ``(C, ...)``, ``<module>.bias`` of shape ``(C,)`` if
        the module has one, and ``C``. Found by walking back from the graph's output node
        through single-input nodes (a scale ``x * s``, a ``squeeze``) to the first
        ``call_module`` with a ``weight`` in the state, or ``F.linear`` of a parameter.

    Raises
    ------
    ValueError
        Naming ``key``: no traced graph and no ``name``, a graph whose output is not one
        tensor produced by such a layer, or a ``name`` without a float ``weight``.
    """
    meta = spec.state_meta
    if name is not None:
        found = _layer(meta, f"{name}.weight", f"{name}.bias")
        if found is None:
            raise ValueError(f"{key}: output layer {name!r} has no '{name}.weight' in the model's state")
        return found
    gm = getattr(spec, "graph", None)
    if gm is None:
        raise ValueError(f"{key}: {spec.model_name} declares its unit groups (no traced graph), so its output "
                         "layer is unknown: pass output_layer='<module name>'")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    node = out.args[0]
    for _ in range(MAX_WALK):
        if not isinstance(node, fx.Node):
            break
        if node.op == "call_module":
            found = _layer(meta, f"{node.target}.weight", f"{node.target}.bias")
            if found is not None:
                return found
        if node.op == "call_function" and node.target is F.linear and len(node.args) > 1 and isinstance(
                node.args[1], fx.Node) and node.args[1].op == "get_attr":
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            bias_key = str(bias.target) if isinstance(bias, fx.Node) and bias.op == "get_attr" else None
            found = _layer(meta, str(node.args[1].target), bias_key)
            if found is not None:
                return found
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        if len(inputs) != 1:
            break
        node = inputs[0]
    raise ValueError(f"{key}: cannot find the layer producing {spec.model_name}'s logits in its traced graph "
                     "(a module with a weight, or F.linear, feeding the output): pass output_layer='<module name>'")


def _layer(meta: Mapping[str, tuple[tuple[int, ...], torch.dtype]], weight: str, bias: str | None
           ) -> OutputLayer | None:
    if weight not in meta or len(meta[weight][0]) < 1 or not meta[weight][1].is_floating_point:
        return None
    classes = int(meta[weight][0][0])
    if bias is not None and (bias not in meta or tuple(meta[bias][0]) != (classes,)):
        bias = None
    return OutputLayer(weight, bias, classes)


def check_labels(value: object, classes: int | None = None, *, key: str = "labels") -> tuple[int, ...]:
    """A node's label set, validated: sorted, unique ints in ``[0, classes)``.

    Parameters
    ----------
    value : Sequence[int] or None
        The labels as given (a list from a ConfigRecord or MetricRecord, a tuple, a 1-D
        tensor of ints); ``None`` means none reported (the node holds every label).
    classes : int, optional
        ``C``, the output layer's size; unchecked when None.
    key : str
        The key named in errors.

    Returns
    -------
    tuple[int, ...]
        ``()`` for ``None``.

    Raises
    ------
    ValueError
        Naming ``key``: not a non-empty sequence of ints (a bool, a float, a string), a
        negative or repeated label, or one ``>= classes``.
    """
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool or value.dim() != 1:
            raise ValueError(f"{key} must be a 1-D sequence of integer labels, got a tensor of {value.dtype} "
                             f"and shape {tuple(value.shape)}")
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value or any(
            isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ValueError(f"{key} must be a non-empty list of integer labels, got {str(value)[:80]!r}")
    labels = tuple(int(v) for v in value)
    if len(set(labels)) != len(labels):
        raise ValueError(f"{key} must not repeat a label, got {str(list(labels))[:80]}")
    bad = [v for v in labels if v < 0 or (classes is not None and v >= classes)]
    if bad:
        where = f"[0, {classes})" if classes is not None else ">= 0"
        raise ValueError(f"{key} must hold labels in {where}, got {bad[:5]}")
    return tuple(sorted(labels))


def mask_logits(logits: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """The logits with every label the node does not hold set to 0 (HeteroFL's code,
    ``src/models/*.py``: ``out.masked_fill(label_mask == 0, 0)``).

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, C)`` (any leading dims; the classes last).
    labels : Sequence[int]
        The labels the node holds; empty: all (``logits`` returned as is).

    Returns
    -------
    torch.Tensor
        ``(N, C)``: a masked label's logit is 0, so it still counts ``exp(0)`` in the
        softmax's denominator but gets no gradient (as in the reference; not ``-inf``).

    Raises
    ------
    ValueError
        Naming ``labels``, if a label is outside ``[0, C)``.
    """
    if not len(labels):
        return logits
    classes = int(logits.shape[-1])
    labels = check_labels(list(labels), classes)
    label_mask = torch.zeros(classes, device=logits.device)
    label_mask[list(labels)] = 1
    return logits.masked_fill(label_mask == 0, 0)


def row_restriction(layer: OutputLayer, labels: Sequence[int]) -> dict[str, torch.Tensor] | None:
    """The output layer's rows a node's reply contributes to the aggregate: ``{weight key:
    labels, bias key: labels}`` as int64 ``(k,)`` positions along dim 0, for
    :meth:`MaskedAggregator.add` (``rows=``); None when ``labels`` is empty (all rows)."""
    if not len(labels):
        return None
    idx = torch.tensor(sorted(labels), dtype=torch.int64)
    rows = {layer.weight: idx}
    if layer.bias is not None:
        rows[layer.bias] = idx
    return rows


__all__ = ["OutputLayer", "output_layer", "check_labels", "mask_logits", "row_restriction"]
