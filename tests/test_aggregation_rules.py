"""One contract, every aggregation rule (fl_subnet/core/rules.py): the same checks run
against each rule of AGGREGATION_RULES, so a rule whose interface drifts (as when a
speed-up once passed ``checked=True`` to rules that did not take it) fails here."""

from __future__ import annotations

import re

import pytest
import torch

from fl_subnet.core.masks import Mask
from fl_subnet.core.rules import AGGREGATION_RULES, make_rule
from fl_subnet.core.spec import analyze
from fl_subnet.models import MLP

#: every rule of one element-wise contract; "product-space" replaces a LoRA adapter's factors
#: by an SVD of the mean product (identical replies give the same product, not the same
#: factors) and needs rank groups: tests/test_lora_rule.py
RULES = sorted(set(AGGREGATION_RULES) - {"product-space"})


@pytest.fixture(scope="module")
def spec():
    return analyze(lambda: MLP(4, [6], 3), torch.randn(2, 4))


@pytest.fixture
def state():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in MLP(4, [6], 3).state_dict().items()}


def group(spec):
    (g,) = spec.groups
    return g


def mask_of(spec, kept):
    return Mask({group(spec).name: torch.tensor(kept)})


def reply(spec, state, mask, value):
    """A compact reply whose every float entry is ``value``."""
    return {k: torch.full_like(t, value) for k, t in spec.slicer.gather(state, mask).items()}


@pytest.mark.parametrize("rule", RULES)
def test_identical_replies_give_that_reply_on_held_entries_and_keep_the_rest(rule, spec, state):
    agg = make_rule(rule, state, spec.slicer)
    mask = mask_of(spec, [0, 2, 3])
    for weight in (1.0, 2.0, 5.0):
        agg.add(reply(spec, state, mask, 0.5), mask, weight)
    assert agg.num_replies == 3
    out, held = agg.finalize(), agg.held()
    for key, full in state.items():
        h = held[key].expand_as(full).to(torch.bool)  # held() broadcasts over the unmasked dims
        assert torch.all(out[key][h] == 0.5), (rule, key)
        assert torch.equal(out[key][~h], full[~h]), (rule, key)  # no holder: the value stays
    rows = held["1.weight"].expand_as(state["1.weight"])[:, 0]  # (6, 1) or the full shape (Multi-Krum)
    assert rows[[0, 2, 3]].all() and not rows[[1, 4, 5]].any()


@pytest.mark.parametrize("rule", RULES)
def test_checked_true_after_check_equals_checked_false(rule, spec, state):
    masks = [mask_of(spec, [0, 1]), mask_of(spec, [1, 2, 3]), mask_of(spec, [5])]
    outs = []
    for checked in (False, True):
        agg = make_rule(rule, state, spec.slicer)
        for i, m in enumerate(masks):
            r = reply(spec, state, m, float(i))
            if checked:
                agg.check(r, m)
            agg.add(r, m, 1.0, checked=checked)
        outs.append(agg.finalize())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in state)


@pytest.mark.parametrize("rule", RULES)
def test_a_bad_reply_is_refused_naming_the_key_and_leaves_no_trace(rule, spec, state):
    agg = make_rule(rule, state, spec.slicer)
    mask = mask_of(spec, [0, 1])
    bad = reply(spec, state, mask, 1.0)
    bad["1.weight"] = bad["1.weight"][:1]  # one row where the mask keeps two
    with pytest.raises(ValueError, match="1.weight"):
        agg.check(bad, mask)
    with pytest.raises(ValueError, match="1.weight"):
        agg.add(bad, mask)
    missing = reply(spec, state, mask, 1.0)
    del missing["3.bias"]
    with pytest.raises(ValueError, match="3.bias"):
        agg.add(missing, mask)
    assert agg.num_replies == 0
    out = agg.finalize()
    assert all(torch.equal(out[k], state[k]) for k in state)


@pytest.mark.parametrize("rule", RULES)
def test_a_single_holder_gives_its_value(rule, spec, state):
    """An entry held by one reply takes that reply's value under every rule (reassembly)."""
    agg = make_rule(rule, state, spec.slicer)
    a, b = mask_of(spec, [0, 1, 2]), mask_of(spec, [3, 4, 5])
    agg.add(reply(spec, state, a, 1.0), a, 3.0)
    agg.add(reply(spec, state, b, -2.0), b, 1.0)
    out = agg.finalize()
    assert torch.all(out["1.weight"][:3] == 1.0) and torch.all(out["1.weight"][3:] == -2.0)
    assert torch.all(out["3.weight"][:, :3] == 1.0) and torch.all(out["3.weight"][:, 3:] == -2.0)


@pytest.mark.parametrize("rule", RULES)
def test_hand_computed_values_on_a_shared_entry(rule, spec, state):
    """Three holders of one entry with values 0, 1, 8 and weights 1, 1, 2: the mean is
    the weighted mean (17/4), the median the middle value (1); the trimmed mean at
    β = 1/3 drops one value at each end (1); centered clipping with a radius nothing
    reaches (and bucketing with buckets of one) is the unweighted mean (3); the geometric
    median of three points on a line is the middle one (1); Multi-Krum with n = 3 tolerates
    f = 0 rogues and averages all three (3)."""
    agg = make_rule(rule, state, spec.slicer, trim_fraction=1 / 3, clip_radius=1e30, bucket_size=1,
                    weiszfeld_iterations=200, weiszfeld_smoothing=1e-12)
    m = mask_of(spec, [0])
    for value, weight in ((0.0, 1.0), (1.0, 1.0), (8.0, 2.0)):
        agg.add(reply(spec, state, m, value), m, weight)
    want = {"mean": 17 / 4, "median": 1.0, "trimmed-mean": 1.0, "centered-clip": 3.0, "bucketing": 3.0,
            "geometric-median": 1.0, "multi-krum": 3.0}[rule]
    assert float(agg.finalize()["1.weight"][0, 0]) == pytest.approx(want, rel=1e-6)


def test_unknown_rule_is_refused_naming_the_choices(spec, state):
    with pytest.raises(ValueError, match=re.escape(f"aggregation must be one of {tuple(AGGREGATION_RULES)}")):
        make_rule("mode", state, spec.slicer)
