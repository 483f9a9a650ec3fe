"""The neural tangent kernel (NTK) Gram matrix of a scenario's model at initialisation,
and the step size the convergence theory allows.

Liao & Kyrillidis (TMLR 2022, §3–4) analyse GD on ``L(W) = ||f(W, X) − y||²`` over
masked sub-networks in the over-parameterised regime, where training stays close to
the linearisation ``f(W) ≈ f(W₀) + J (W − W₀)``. There one GD step on the mean squared
error ``(1/n) Σᵢ (f(W, xᵢ) − yᵢ)²`` maps the residual ``r`` to ``(I − η G) r`` with

    G = (2/n) J Jᵀ,   J = ∂f(W₀, X)/∂W  (shape (n, #trained parameters)),

so ``η = c / λ_max(G)`` (``0 < c < 2``) is the step the theory allows for the full
model; a sub-network whose outputs are scaled by ``s = 1/ξ`` has a Gram matrix ``≈ s·G``
and needs ``η = c / (s · λ_max(G))`` — for IST with p sub-networks, ``c / (p · λ_max)``:
``ist-scaling = "p-lr"`` with ``lr = c / λ_max``.
"""

from __future__ import annotations

import torch
from torch import nn


def ntk_gram(model: nn.Module, x: torch.Tensor, *, loss: str = "mse") -> torch.Tensor:
    """``G = (2/n) J Jᵀ`` of ``model`` at its current parameters on the ``n`` inputs ``x``.

    Parameters
    ----------
    model : nn.Module
        A model with one output per example (shape ``(n, 1)`` or ``(n,)``); the
        Jacobian is taken with respect to its trainable parameters (``requires_grad``).
    x : Tensor, shape (n, ...)
        The training inputs.
    loss : {"mse"}
        The training loss the Gram matrix is normalised for (the mean squared error).

    Returns
    -------
    Tensor, shape (n, n), float64

    Raises
    ------
    ValueError
        If the model has more than one output per example, or ``loss`` is not "mse".
    """
    from torch.func import functional_call, jacrev, vmap

    if loss != "mse":
        raise ValueError(f"ntk_gram: loss must be 'mse' (the squared loss of the theory), got {loss!r}")
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        out = model(x[:1])
    if out.numel() != 1:
        raise ValueError(f"ntk_gram: the model has {out.numel()} outputs per example; the theory's Gram "
                         "matrix is for one (a regression model such as ShallowReLU)")

    def f(p, xi):
        return functional_call(model, (p, buffers), (xi.unsqueeze(0),)).reshape(())

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)  # {name: (n, *shape)}
    j = torch.cat([v.reshape(x.shape[0], -1) for v in jac.values()], dim=1).double()
    return (2.0 / x.shape[0]) * (j @ j.T)


def ntk_lambda_max(model: nn.Module, x: torch.Tensor) -> float:
    """Largest eigenvalue of :func:`ntk_gram` (the step size ``c/λ_max`` is stable for c < 2)."""
    return float(torch.linalg.eigvalsh(ntk_gram(model, x))[-1])


def ntk_lambda_max_of(cfg) -> float:
    """``λ_max`` of the Gram matrix of ``cfg``'s model at initialisation on its whole
    training set (the union of the nodes' data, as with ``data-scope = "all"``).

    Parameters
    ----------
    cfg : RunConfig
        A regression scenario (``dataset = "synthetic-regression"``).
    """
    from .experiment import CentralEvaluation, factory_for

    x = CentralEvaluation.train_set(cfg).tensors[0]
    return ntk_lambda_max(factory_for(cfg)(), x)
