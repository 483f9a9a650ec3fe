"""How fl-subnet's strategies compose with Flower's own.

* ``class DropoutAdam(FederatedDropout, FedAdam)`` — fl-subnet's strategy first — is the
  supported way to combine a protocol with Flower's server optimizers (FedAvgM, FedAdam,
  FedYogi, FedAdagrad): the constructor cooperates (``eta=...``, ``beta_1=...`` reach
  Flower's ``__init__`` through ``super()``), Flower's ``summary()`` runs after the
  protocol's, and the optimizer step runs on the MASKED pseudo-gradient with the Flower
  instance's hyperparameters (:func:`server_optimizer_of`, :mod:`fl_subnet.core.server_opt`):
  an entry no node held keeps its value and its optimizer state.
* The other order, a Flower strategy whose hooks would wrap the protocol's (or any class
  whose ``configure_train``/``aggregate_train`` the protocol would skip), is refused when
  the class is defined (:func:`check_composition`), naming the fix: Flower's
  FedAdam would move untouched entries through its momentum, and its constructor cannot
  take the model.
* Flower's differential-privacy wrappers are refused at the first ``configure_train``
  (:func:`refuse_dp_wrapper`): server-side clipping subtracts the full model from compact
  replies, and the noise is calibrated for a mean over all sampled nodes while a masked
  entry is averaged over its holders only (sensitivity ``C/h``, not ``C/n``), so the
  privacy guarantee would not hold.
"""

from __future__ import annotations

import sys

from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from fl_subnet.core.server_opt import (MaskedFedAdagrad, MaskedFedAdam, MaskedFedAvgM, MaskedFedYogi,
                                       MaskedServerOptimizer)

#: Flower strategies that may follow an fl-subnet strategy in the MRO (their hooks are
#: replaced by the masked optimizer step; their constructor and summary cooperate).
COMPOSABLE = (FedAvgM, FedAdam, FedYogi, FedAdagrad, FedOpt, FedAvg, Strategy)
_HOOKS = ("configure_train", "aggregate_train")


def server_optimizer_of(strategy: object) -> MaskedServerOptimizer | None:
    """The masked form of the Flower server optimizer ``strategy`` also is, with its
    hyperparameters (None if it is none, or FedAvgM with learning rate 1 and no momentum)."""
    if isinstance(strategy, FedAdam):
        return MaskedFedAdam(strategy.eta, strategy.beta_1, strategy.beta_2, strategy.tau)
    if isinstance(strategy, FedYogi):
        return MaskedFedYogi(strategy.eta, strategy.beta_1, strategy.beta_2, strategy.tau)
    if isinstance(strategy, FedAdagrad):
        return MaskedFedAdagrad(strategy.eta, strategy.tau)
    if isinstance(strategy, FedOpt):
        raise TypeError(f"{type(strategy).__name__} derives from Flower's FedOpt but is not FedAdam, FedYogi "
                        "or FedAdagrad: fl-subnet has no masked form of its update")
    if isinstance(strategy, FedAvgM) and strategy.server_opt:
        return MaskedFedAvgM(strategy.server_learning_rate, strategy.server_momentum)
    return None


def check_composition(cls: type, base: type) -> None:
    """Refuse a class whose MRO would skip or wrap the protocol's hooks.

    Parameters
    ----------
    cls : type
        A subclass of ``base`` being defined.
    base : type
        :class:`~strategies.base.SubnetStrategy`.

    Raises
    ------
    TypeError
        If a Flower strategy precedes ``base`` in ``cls.__mro__`` (its hooks would wrap
        the protocol's and its ``__init__`` cannot take the model), or a class after
        ``base`` other than :data:`COMPOSABLE` defines a hook the protocol never calls.
    """
    mro = cls.__mro__
    at = mro.index(base)
    for k in mro[:at]:
        if k.__module__.startswith("flwr.") and issubclass(k, Strategy):
            raise TypeError(
                f"{cls.__name__}: Flower's {k.__name__} comes before fl-subnet's {base.__name__} in the class's "
                f"bases, so its hooks would run on the full model (a server optimizer would move entries no "
                f"node held through its momentum) and its __init__ cannot take the model. Put the fl-subnet "
                f"strategy first, e.g. `class {cls.__name__}({mro[at - 1].__name__ if at > 1 else base.__name__}"
                f", {k.__name__})`: fl-subnet then runs {k.__name__}'s update on the masked pseudo-gradient")
    for k in mro[at + 1:]:
        if k in COMPOSABLE or k is object or not issubclass(k, Strategy):
            continue
        overridden = [h for h in _HOOKS if h in vars(k)]
        if overridden:
            hint = ("use `aggregation=\"median\"` or `\"trimmed-mean\"` (masked, over each entry's holders)"
                    if k.__name__ in ("FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan") else
                    "pass its train config through `Strategy.start(train_config=...)`" if k.__name__ == "FedProx"
                    else "override the hook in a class placed BEFORE the fl-subnet strategy and call super()")
            raise TypeError(
                f"{cls.__name__}: {k.__name__}.{'/'.join(overridden)} would never run, because fl-subnet's "
                f"{base.__name__} builds the per-node slices and the masked aggregate itself. fl-subnet composes "
                f"with {', '.join(c.__name__ for c in COMPOSABLE[:4])}; for {k.__name__}: {hint}")


def refuse_dp_wrapper(strategy: object) -> None:
    """Raise if ``strategy.configure_train`` was called by one of Flower's
    differential-privacy wrappers (``DifferentialPrivacy*Clipping``) while the strategy
    trains sub-models (with the full mask, FedAvg, the wrappers work as on Flower's FedAvg).

    Raises
    ------
    TypeError
        Explaining why the wrapper's guarantee does not hold for masked aggregation.
    """
    from fl_subnet.core.samplers import FullSampler

    if isinstance(getattr(strategy, "sampler", None), FullSampler):
        return
    frame = sys._getframe(1)
    while frame is not None and frame.f_locals.get("self") is strategy:  # the strategy's own hooks
        frame = frame.f_back
    caller = frame.f_locals.get("self") if frame is not None else None
    if caller is None or not type(caller).__name__.startswith("DifferentialPrivacy"):
        return
    raise TypeError(
        f"{type(caller).__name__} cannot wrap fl-subnet's {type(strategy).__name__}: the nodes reply with compact "
        f"slices (server-side clipping subtracts the full model from them), and its noise is calibrated for a "
        f"mean over all {getattr(caller, 'num_sampled_clients', 'n')} sampled nodes while a masked entry is "
        f"averaged over the nodes that held it (sensitivity clip/h, not clip/n), so the privacy guarantee would "
        f"not hold. Flower's DP wrappers work with full-model training: fl-subnet's SubnetFedAvg or Flower's FedAvg.")
