"""Masked server optimizers: FedAvgM, FedAdam, FedYogi and FedAdagrad on the masked
pseudo-gradient.

Adaptive federated optimization (Reddi et al., "Adaptive Federated Optimization",
ICLR 2021, Alg. 2) treats ``Δ_k = A_k − W_k`` — the aggregate of the round minus the
global model — as a pseudo-gradient and feeds it to a server optimizer; FedAvgM (Hsu
et al. 2019) is SGD with momentum on ``−Δ_k``. With sub-models an entry may have no
holder in a round: its ``Δ`` is 0 only because nobody trained it. Applied naively (as
Flower's FedAdam would on the full aggregate), momentum keeps moving such an entry and
the second moment decays. Here an entry's value AND its optimizer state (first moment
``m``, second moment ``v``, step count ``t``) change only in the rounds in which some
node held it; held entries follow Flower's own update rule exactly, so the full mask
reproduces ``flwr.serverapp.strategy.FedAdam`` & co. (tests/test_server_opt.py).

Only the model's parameters are optimized. Buffers (BatchNorm's running mean and
variance, ``num_batches_tracked``, any other non-parameter state) take the aggregate as
is, the mean over their holders, and keep no optimizer state: a running statistic is an
average of the nodes' statistics, not a weight to step (stepped, the deployed eval-mode
model diverges while its weights learn). Which keys are parameters is
:attr:`MaskedServerOptimizer.parameter_keys`, set by the strategy from its model; Flower's
own strategies see only an ``ArrayRecord`` and step the buffers too, so with BatchNorm
running statistics the full mask equals Flower's strategy on the parameters only.
Without ``parameter_keys`` every floating-point tensor is optimized and integer ones take
the aggregate as is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

SERVER_OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")


def _check(name: str, value: float, lo: float, hi: float = math.inf, *, closed_hi: bool = False) -> float:
    v = float(value)
    if not (lo <= v < hi or (closed_hi and v == hi)) or not math.isfinite(v):
        raise ValueError(f"{name} must be in [{lo}, {hi}{']' if closed_hi else ')'}, got {value!r}")
    return v


class MaskedServerOptimizer:
    """Base: ``step(current, aggregated, held)`` → the new global state.

    The state (per tensor key: ``m``, ``v``, ``t``, ...) is created lazily, at the
    tensor's shape and dtype, and changed only at held entries.

    Attributes
    ----------
    parameter_keys : frozenset[str] or None
        The ``state_dict`` keys of the model's parameters: only these are optimized, every
        other key (a buffer) takes the aggregate as is and has no optimizer state. None
        (the default, until a strategy sets it from its model): every floating-point
        tensor is optimized.
    """

    name = ""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.parameter_keys: frozenset[str] | None = None

    def set_parameter_keys(self, keys: Iterable[str] | None) -> MaskedServerOptimizer:
        """Optimize only ``keys`` (the model's parameters); the rest take the aggregate.

        Returns the optimizer itself. Optimizer state of any other key (e.g. from a
        checkpoint written when buffers were stepped) is dropped.
        """
        self.parameter_keys = None if keys is None else frozenset(keys)
        if self.parameter_keys is not None:
            self.state = {k: v for k, v in self.state.items() if k in self.parameter_keys}
        return self

    def is_parameter(self, key: str, tensor: torch.Tensor) -> bool:
        """Whether ``key`` is optimized: a parameter (see :attr:`parameter_keys`), or any
        floating-point tensor while the parameters are unknown."""
        if not tensor.is_floating_point():
            return False
        return self.parameter_keys is None or key in self.parameter_keys

    def step(self, current: Mapping[str, torch.Tensor], aggregated: Mapping[str, torch.Tensor],
             held: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One server step.

        Parameters
        ----------
        current : Mapping[str, torch.Tensor]
            ``W_k``, the global state the round's slices were cut from.
        aggregated : Mapping[str, torch.Tensor]
            ``A_k``, the masked aggregate (same keys and shapes).
        held : Mapping[str, torch.Tensor]
            Per key a bool tensor broadcastable to the key's shape: True where at least
            one valid reply held the entry (:meth:`MaskedAggregator.held`). A missing
            key means nothing held.

        Returns
        -------
        dict[str, torch.Tensor]
            ``W_{k+1}``: the optimizer's update at held entries, ``W_k`` elsewhere; a
            buffer (not in :attr:`parameter_keys`, or not floating-point) is ``A_k``'s.
        """
        out = {}
        with torch.no_grad():
            for key, w in current.items():
                a = aggregated[key]
                h = held.get(key)
                if not self.is_parameter(key, w):
                    out[key] = a.clone()
                    continue
                if h is None or not bool(h.any()):
                    out[key] = w.clone()
                    continue
                h = h.expand(w.shape)
                new = self._update(key, w, a.to(w.dtype), h)
                out[key] = torch.where(h, new, w)
        return out

    def _slot(self, key: str, name: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        slots = self.state.setdefault(key, {})
        if name not in slots:
            slots[name] = torch.zeros_like(like, dtype=dtype or like.dtype)
        return slots[name]

    def _put(self, key: str, name: str, value: torch.Tensor) -> torch.Tensor:
        """Replace a state tensor (never written into: see :meth:`snapshot`)."""
        self.state.setdefault(key, {})[name] = value
        return value

    def snapshot(self) -> dict[str, dict[str, torch.Tensor]]:
        """The state as it is now, for :meth:`restore` (e.g. when the strategy keeps the
        model of a round whose step is not finite). No tensor is copied: :meth:`step`
        replaces state tensors and never writes into them."""
        return {key: dict(slots) for key, slots in self.state.items()}

    def restore(self, snapshot: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Go back to the state of :meth:`snapshot`, as if the steps since were not taken."""
        self.state = {key: dict(slots) for key, slots in snapshot.items()}

    def _update(self, key: str, w: torch.Tensor, a: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{"<key>/<slot>": tensor}`` (for checkpoints)."""
        return {f"{key}/{slot}": t for key, slots in self.state.items() for slot, t in slots.items()}

    def load_state_dict(self, flat: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (state of a key that is not in
        :attr:`parameter_keys`, a buffer stepped by an older version, is left out)."""
        self.state = {}
        for name, t in flat.items():
            key, _, slot = name.rpartition("/")
            if self.parameter_keys is None or key in self.parameter_keys:
                self.state.setdefault(key, {})[slot] = t.clone()

    def settings(self) -> dict[str, float]:
        """The hyperparameters, for logs."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v:g}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


class MaskedFedAvgM(MaskedServerOptimizer):
    """FedAvgM (Hsu, Qi & Brown 2019, Alg. 1) on held entries, Flower's convention:
    ``g = W_k − A_k``, ``u ← μ·u + g``, ``W_{k+1} = W_k − η·u``.

    Parameters
    ----------
    server_learning_rate : float
        η > 0 (Flower's ``server_learning_rate``, default 1).
    server_momentum : float
        μ ∈ [0, 1) (Flower's ``server_momentum``).

    Raises
    ------
    ValueError
        Naming the parameter, if out of range.
    """

    name = "fedavgm"

    def __init__(self, server_learning_rate: float = 1.0, server_momentum: float = 0.9) -> None:
        super().__init__()
        self.server_learning_rate = _check("server_learning_rate", server_learning_rate, 0.0)
        if self.server_learning_rate == 0:
            raise ValueError("server_learning_rate must be > 0, got 0")
        self.server_momentum = _check("server_momentum", server_momentum, 0.0, 1.0)

    def settings(self):
        return {"server_learning_rate": self.server_learning_rate, "server_momentum": self.server_momentum}

    def _update(self, key, w, a, held):
        g = w - a
        if self.server_momentum > 0:
            u = self._slot(key, "momentum", w)
            g = self._put(key, "momentum", torch.where(held, self.server_momentum * u + g, u))
        return w - self.server_learning_rate * g


class _FedOpt(MaskedServerOptimizer):
    """Shared part of FedAdam/FedYogi/FedAdagrad (Reddi et al. 2021, Alg. 2):
    ``Δ = A_k − W_k``, ``m ← β₁·m + (1 − β₁)·Δ``, ``W_{k+1} = W_k + η·m / (√v + τ)``."""

    def __init__(self, eta: float, beta_1: float, beta_2: float, tau: float) -> None:
        super().__init__()
        self.eta = _check("eta", eta, 0.0)
        if self.eta == 0:
            raise ValueError("eta must be > 0, got 0")
        self.beta_1 = _check("beta_1", beta_1, 0.0, 1.0)
        self.beta_2 = _check("beta_2", beta_2, 0.0, 1.0)
        self.tau = _check("tau", tau, 0.0)

    def settings(self):
        return {"eta": self.eta, "beta_1": self.beta_1, "beta_2": self.beta_2, "tau": self.tau}

    def _update(self, key, w, a, held):
        delta = a - w
        m = self._slot(key, "m", w)
        v = self._slot(key, "v", w)
        m = self._put(key, "m", torch.where(held, self.beta_1 * m + (1 - self.beta_1) * delta, m))
        v = self._put(key, "v", torch.where(held, self._second_moment(v, delta), v))
        return w + self._step_size(key, w, held) * m / (v.sqrt() + self.tau)

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _step_size(self, key, w, held) -> float | torch.Tensor:
        return self.eta


class MaskedFedAdam(_FedOpt):
    """FedAdam (Reddi et al. 2021, Alg. 2) on held entries:
    ``v ← β₂·v + (1 − β₂)·Δ²`` and a bias-corrected step
    ``η·√(1 − β₂^{t+1}) / (1 − β₁^{t+1})`` where ``t`` counts the rounds in which the
    entry was held (Flower's FedAdam uses the server round with the same ``+1``; with
    the full mask the two agree).

    Parameters
    ----------
    eta, beta_1, beta_2, tau : float
        Server learning rate η > 0, moments β₁, β₂ ∈ [0, 1), adaptivity τ ≥ 0
        (Flower's defaults: 0.1, 0.9, 0.99, 1e-3).
    """

    name = "fedadam"

    def __init__(self, eta: float = 1e-1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3):
        super().__init__(eta, beta_1, beta_2, tau)

    def _second_moment(self, v, delta):
        return self.beta_2 * v + (1 - self.beta_2) * delta.square()

    def _step_size(self, key, w, held):
        t = self._put(key, "t", self._slot(key, "t", w, torch.int64) + held.to(torch.int64))
        e = (t + 1).to(torch.float64)
        size = self.eta * torch.sqrt(1 - self.beta_2 ** e) / (1 - self.beta_1 ** e)
        return size.to(w.dtype)


class MaskedFedYogi(_FedOpt):
    """FedYogi (Reddi et al. 2021, Alg. 2) on held entries:
    ``v ← v − (1 − β₂)·Δ²·sign(v − Δ²)``.

    Parameters
    ----------
    eta, beta_1, beta_2, tau : float
        Flower's defaults: 0.01, 0.9, 0.99, 1e-3.
    """

    name = "fedyogi"

    def __init__(self, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3):
        super().__init__(eta, beta_1, beta_2, tau)

    def _second_moment(self, v, delta):
        d2 = delta.square()
        return v - (1 - self.beta_2) * d2 * torch.sign(v - d2)


class MaskedFedAdagrad(_FedOpt):
    """FedAdagrad (Reddi et al. 2021, Alg. 2) on held entries: ``β₁ = 0``,
    ``v ← v + Δ²``.

    Parameters
    ----------
    eta, tau : float
        Flower's defaults: 0.1, 1e-3.
    """

    name = "fedadagrad"

    def __init__(self, eta: float = 1e-1, tau: float = 1e-3):
        super().__init__(eta, 0.0, 0.0, tau)

    def settings(self):
        return {"eta": self.eta, "tau": self.tau}

    def _second_moment(self, v, delta):
        return v + delta.square()


def make_server_optimizer(name: str, *, lr: float | None = None, momentum: float = 0.9, beta_2: float = 0.99,
                          tau: float = 1e-3) -> MaskedServerOptimizer | None:
    """The masked optimizer called ``name`` (``"none"``: None).

    Parameters
    ----------
    name : {"none", "fedavgm", "fedadam", "fedyogi", "fedadagrad"}
    lr : float, optional
        Server learning rate (η); None: Flower's default for that optimizer.
    momentum : float
        μ of FedAvgM, β₁ of FedAdam/FedYogi (unused by FedAdagrad).
    beta_2, tau : float
        FedAdam/FedYogi's β₂ and τ (FedAdagrad's τ).

    Raises
    ------
    ValueError
        Naming ``server-optimizer`` and the allowed values, or the bad parameter.
    """
    if name == "none":
        return None
    if name == "fedavgm":
        return MaskedFedAvgM(1.0 if lr is None else lr, momentum)
    if name == "fedadam":
        return MaskedFedAdam(1e-1 if lr is None else lr, momentum, beta_2, tau)
    if name == "fedyogi":
        return MaskedFedYogi(1e-2 if lr is None else lr, momentum, beta_2, tau)
    if name == "fedadagrad":
        return MaskedFedAdagrad(1e-1 if lr is None else lr, tau)
    raise ValueError(f"server-optimizer must be one of {('none',) + SERVER_OPTIMIZERS}, got {name!r}")
