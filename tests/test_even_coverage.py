"""FedEcover's even-coverage masks for federated dropout."""

import numpy as np
import pytest
import torch

from fl_subnet.core.coverage import EvenCoverageSampler
from fl_subnet.core.groups import UnitGroup
from fl_subnet.core.masks import coverage
from fl_subnet.core.samplers import BernoulliSampler
from fl_subnet.strategies import FederatedDropout
from fl_subnet.strategies.federated_dropout import DROPOUT_SAMPLINGS

from strategy_helpers import factory

GROUPS = [UnitGroup("a", 10, ()), UnitGroup("b", 7, ())]


def _counts(masks, g):
    c = torch.zeros(g.size, dtype=torch.int64)
    for m in masks:
        c[m.kept(g)] += 1
    return c


@pytest.mark.parametrize("xi, n", [(0.5, 4), (0.3, 5), (0.25, 3), (1.0, 2), (0.1, 20)])
def test_every_unit_is_held_evenly_and_every_node_keeps_k(xi, n):
    masks = EvenCoverageSampler(xi, seed=3).sample(GROUPS, 7, n)
    for g in GROUPS:
        k = max(1, int(np.ceil(xi * g.size - 1e-9)))
        assert all(len(m.kept(g)) == k and len(set(m.kept(g).tolist())) == k for m in masks)
        c = _counts(masks, g)
        assert int(c.max()) - int(c.min()) <= 1
        assert int(c.sum()) == n * k
        assert int(c.min()) == (n * k) // g.size


def test_equals_a_numpy_deal_around_one_permutation():
    """Slot i keeps π[(i·k + j) mod size], j < k, π the round's permutation (from the
    sampler's own generator): a numpy re-implementation of the deal."""
    s = EvenCoverageSampler(0.3, seed=1)
    masks = s.sample(GROUPS, 4, 6)
    from fl_subnet.core.samplers import generator_for

    gen = generator_for(1, 4, -3)
    perms = {g.name: torch.randperm(g.size, generator=gen).numpy() for g in GROUPS}
    for g in GROUPS:
        k = int(np.ceil(0.3 * g.size - 1e-9))
        for i, m in enumerate(masks):
            want = np.sort(perms[g.name][(i * k + np.arange(k)) % g.size])
            assert m.kept(g).tolist() == want.tolist()


def test_covers_more_than_bernoulli_at_the_same_keep_probability():
    """With n·ξ ≥ 1 every unit is covered each round; Bernoulli leaves ≈ (1 − ξ)^n out."""
    even = [coverage(EvenCoverageSampler(0.25, seed=0).sample(GROUPS, r, 4), GROUPS) for r in range(50)]
    bern = [coverage(BernoulliSampler(0.25, seed=0).sample(GROUPS, r, 4), GROUPS) for r in range(50)]
    assert min(even) == 1.0
    assert np.mean(bern) == pytest.approx(1 - 0.75 ** 4, abs=0.06)


def test_deterministic_by_seed_and_round_and_scaled():
    a = EvenCoverageSampler(0.5, seed=2).sample(GROUPS, 3, 4)
    b = EvenCoverageSampler(0.5, seed=2).sample(GROUPS, 3, 4)
    c = EvenCoverageSampler(0.5, seed=2).sample(GROUPS, 4, 4)
    assert all(torch.equal(x.kept(g), y.kept(g)) for x, y in zip(a, b) for g in GROUPS)
    assert any(not torch.equal(x.kept(g), y.kept(g)) for x, y in zip(a, c) for g in GROUPS)
    assert a[0].scale == {"a": 2.0, "b": 2.0}
    assert EvenCoverageSampler(0.5, scale=False).sample(GROUPS, 1, 1)[0].scale == {"a": 1.0, "b": 1.0}


def test_federated_dropout_option_and_run_config():
    from fl_subnet.experiments.config import CHOICES, RunConfig
    from fl_subnet.experiments.experiment import factory_for
    from fl_subnet.strategies.registry import build_strategy

    assert CHOICES["dropout-sampling"] == DROPOUT_SAMPLINGS
    assert isinstance(FederatedDropout(factory, 0.5, sampling="even").sampler, EvenCoverageSampler)
    with pytest.raises(ValueError, match="dropout-sampling must be one of"):
        FederatedDropout(factory, 0.5, sampling="odd")
    cfg = RunConfig(strategy="federated-dropout", dropout_sampling="even")
    assert isinstance(build_strategy(cfg, factory_for(cfg)).sampler, EvenCoverageSampler)
