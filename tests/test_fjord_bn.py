"""FjORD's per-width BatchNorm statistics, option ``fjord-bn = "per-width"``.

Checked against: a plain-torch port of FjORD's ``ODBatchNorm2d`` (Flower's FjORD
baseline, ``baselines/fjord/fjord/od/layers/batch_norm.py``: one ``BatchNorm2d(affine=
False)`` per width over the first ⌈p·n⌉ channels, ``out * weight[:k] + bias[:k]``) with
the ordered-dropout convolutions written as weight slices (each width's running
statistics after a run of batches at drawn widths, to 1e-6); the server's average of
width p over the nodes with p_max ≥ p, weighted by ``num-examples`` (the baseline's
``fjord_average``, branch ``layer_p``), by hand; the option off sends nothing more; bad
statistics in a reply are left out and the round goes on; bad settings refused naming
the key; a short run through ``strategy.start`` and Flower's serde accepts every reply,
learns, and evaluates each tier with its own statistics.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import nn
from torch.utils.data import TensorDataset

from fl_subnet import analyze
from fl_subnet.clients import make_client_app, train_local
from fl_subnet.core.ordered import build_ordered, ordered_width, set_width, set_width_stats, width_stats
from fl_subnet.core.samplers import NestedPrefixSampler
from fl_subnet.experiments.config import RunConfig
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.strategies import FjORD
from fl_subnet.wire import arrays_to_state
from fl_subnet.wire.records import FJORD_BN_RECORD, width_stats_from_record, width_stats_to_record
from models_extra import TinyBN

C1, C2, CLASSES = TinyBN.C1, TinyBN.C2, TinyBN.CLASSES
WIDTHS = (0.25, 0.5, 0.75, 1.0)
EXAMPLE = torch.zeros(2, 1, 6, 6)


def ceil_prefix(size: int, p: float) -> int:
    """The reference's ``int(np.ceil(num_features * p))`` (at least 1), written apart from
    samplers.prefix_size."""
    return max(1, int(math.ceil(p * size - 1e-9)))


def od_forward(params, stats, x, p):
    """FjORD's forward at width p: ``ODConv2d`` keeps the first ⌈p·out⌉ filters reading the
    kept inputs; ``ODBatchNorm2d`` normalises with ``bn[str(k)]`` (its own running
    statistics, updated in place here, momentum 0.1) then ``out * weight[:k] + bias[:k]``."""
    k1, k2 = ceil_prefix(C1, p), ceil_prefix(C2, p)
    h = F.conv2d(x, params["conv1.weight"][:k1], params["conv1.bias"][:k1], padding=1)
    h = F.batch_norm(h, stats[p]["bn1.running_mean"], stats[p]["bn1.running_var"], training=True, momentum=0.1)
    h = F.relu(h * params["bn1.weight"][:k1, None, None] + params["bn1.bias"][:k1, None, None])
    h = F.conv2d(h, params["conv2.weight"][:k2, :k1], params["conv2.bias"][:k2], padding=1)
    h = F.batch_norm(h, stats[p]["bn2.running_mean"], stats[p]["bn2.running_var"], training=True, momentum=0.1)
    h = F.relu(h * params["bn2.weight"][:k2, None, None] + params["bn2.bias"][:k2, None, None])
    return F.linear(h.mean(dim=(2, 3)), params["fc.weight"][:, :k2], params["fc.bias"])


def random_stats(widths, gen):
    """Distinct positive statistics per width: ``{p: {key: (⌈p·n⌉,)}}``."""
    out = {}
    for p in widths:
        out[p] = {}
        for key, n in (("bn1", C1), ("bn2", C2)):
            k = ceil_prefix(n, p)
            out[p][f"{key}.running_mean"] = torch.randn(k, generator=gen)
            out[p][f"{key}.running_var"] = torch.rand(k, generator=gen) + 0.5
    return out


def non_trivial_state(seed=0):
    torch.manual_seed(seed)
    model = TinyBN()
    with torch.no_grad():  # affine parameters away from 1 / 0, so the port's slicing matters
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model.state_dict()


@pytest.mark.parametrize("p_max", [0.5, 0.75, 1.0])
def test_node_statistics_equal_the_odbatchnorm_port(p_max):
    spec = analyze(TinyBN, EXAMPLE)
    full = non_trivial_state()
    mask = NestedPrefixSampler(1.0, scale=False).sample(spec.groups, 0, 1, capacities=[p_max])[0]
    model = build_ordered(spec, spec.gather(full, mask), mask)
    allowed = [w for w in WIDTHS if w <= p_max]
    gen = torch.Generator().manual_seed(1)
    start = random_stats(allowed, gen)
    set_width_stats(model, start)
    ref = {p: {k: t.clone() for k, t in s.items()} for p, s in start.items()}
    params = full
    draws = torch.randint(len(allowed), (9,), generator=gen).tolist()
    with torch.no_grad():
        for i in draws:
            p = allowed[i]
            x = torch.randn(5, 1, 6, 6, generator=gen)
            set_width(model, p)
            out = model(x)
            torch.testing.assert_close(out, od_forward(params, ref, x, p), atol=1e-5, rtol=1e-5)
        set_width(model, None)
    got = width_stats(model)
    assert sorted(got) == allowed
    for p in allowed:
        for key in ref[p]:
            torch.testing.assert_close(got[p][key], ref[p][key], atol=1e-6, rtol=1e-6)
    assert {p for p in allowed if any(not torch.equal(got[p][k], start[p][k]) for k in start[p])} == \
        {allowed[i] for i in draws}  # a width never drawn keeps what it was sent
    # between batches the model's own buffers are the max width's statistics
    for key in ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"):
        torch.testing.assert_close(model.state_dict()[key], ref[p_max][key])


def test_shared_statistics_differ_from_the_port():
    """Without set_width_stats the widths share one set (the default): after batches at
    two widths the prefix statistics are not the per-width port's (the test above is not
    passing by accident)."""
    spec = analyze(TinyBN, EXAMPLE)
    full = non_trivial_state()
    mask = NestedPrefixSampler(1.0, scale=False).sample(spec.groups, 0, 1, capacities=[1.0])[0]
    model = build_ordered(spec, spec.gather(full, mask), mask)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in (0.5, 1.0, 0.5):
            set_width(model, p)
            model(torch.randn(5, 1, 6, 6, generator=gen))
        set_width(model, None)
    assert width_stats(model) is None
    ref = {p: {f"bn{i}.running_{s}": full[f"bn{i}.running_{s}"][:ceil_prefix(n, p)].clone()
               for i, n in ((1, C1), (2, C2)) for s in ("mean", "var")} for p in (0.5, 1.0)}
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in (0.5, 1.0, 0.5):
            od_forward(full, ref, torch.randn(5, 1, 6, 6, generator=gen), p)
    assert not torch.allclose(model.state_dict()["bn1.running_mean"][:4], ref[0.5]["bn1.running_mean"])


def test_record_round_trip_and_errors():
    stats = random_stats((0.25, 1.0), torch.Generator().manual_seed(0))
    back = width_stats_from_record(width_stats_to_record(stats))
    assert sorted(back) == [0.25, 1.0]
    for p in stats:
        for k in stats[p]:
            assert torch.equal(back[p][k], stats[p][k])
    with pytest.raises(ValueError, match="fjord-bn"):
        width_stats_from_record(ArrayRecord({"wide/bn1.running_mean": Array(torch.ones(2).numpy())}))
    with pytest.raises(ValueError, match="fjord-bn"):
        width_stats_from_record(ArrayRecord({"1.5/bn1.running_mean": Array(torch.ones(2).numpy())}))
    spec = analyze(TinyBN, EXAMPLE)
    mask = NestedPrefixSampler(1.0, scale=False).sample(spec.groups, 0, 1, capacities=[0.5])[0]
    model = build_ordered(spec, spec.gather(TinyBN().state_dict(), mask), mask)
    good = random_stats((0.25, 0.5), torch.Generator().manual_seed(0))
    bad_shape = {**good, 0.5: {**good[0.5], "bn1.running_mean": torch.zeros(3)}}
    with pytest.raises(ValueError, match="width 0.5, 'bn1.running_mean': expected shape"):
        set_width_stats(model, bad_shape)
    nan = {**good, 0.25: {**good[0.25], "bn2.running_var": torch.full((2,), float("nan"))}}
    with pytest.raises(ValueError, match="NaN"):
        set_width_stats(model, nan)
    with pytest.raises(ValueError, match="max width"):
        set_width_stats(model, {0.25: good[0.25]})


# ------------------------------------------------------------------------------- the server
def _load(context):
    n = 2 * int(context.node_config["partition-id"]) + 3  # 3, 5, 7 examples: unequal weights
    gen = torch.Generator().manual_seed(n)
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=gen), torch.randint(CLASSES, (n,), generator=gen)), None


def _fill(model, data, cfg, seed, before_step=None):
    """Writes value 10·n + p into every statistic of width p (n = the node's examples)."""
    n = len(data)
    with torch.no_grad():
        for p in before_step.widths:
            with ordered_width(model, p):
                for name, buf in model.named_buffers():
                    if name.endswith(("running_mean", "running_var")):
                        buf.fill_(10 * n + p)
    return n, 0.0


def _strategy(**kwargs):
    return FjORD(TinyBN, capacity_tiers=(0.25, 0.5, 1.0), widths=WIDTHS, bn="per-width", example_input=EXAMPLE,
                 fraction_evaluate=0.0, min_available_nodes=3, **kwargs)


def _round(strategy, train_fn=_fill, spoil=None):
    torch.manual_seed(0)
    init = TinyBN().state_dict()
    grid = InProcessGrid(make_client_app(TinyBN, _load, train_fn), 3)
    config = ConfigRecord({"local-steps": 2, "lr": 0.05, "batch-size": 0, "loss": "cross-entropy", "seed": 3})
    messages = list(strategy.configure_train(1, ArrayRecord(init), config, grid))
    replies = list(grid.send_and_receive(messages))
    if spoil is not None:
        spoil(replies)
    arrays, metrics = strategy.aggregate_train(1, replies)
    return messages, replies, arrays_to_state(arrays), metrics


def test_server_averages_each_width_over_its_holders_by_hand():
    """Nodes of p_max 0.25 / 0.5 / 1.0 with 3 / 5 / 7 examples write 10·n + p into width
    p's statistics: width 0.25 → (3·30.25 + 5·50.25 + 7·70.25)/15, width 0.5 → (5·50.5 +
    7·70.5)/12, widths 0.75 and 1.0 → 70.75 and 71 (only the full node holds them); the
    model's own statistics are width 1.0's."""
    strategy = _strategy()
    messages, replies, out, metrics = _round(strategy)
    assert metrics["num-replies"] == 3 and metrics["num-rejected"] == 0
    sent = {m.metadata.dst_node_id: sorted(width_stats_from_record(m.content[FJORD_BN_RECORD])) for m in messages}
    assert sorted(sent.values()) == [[0.25], [0.25, 0.5], list(WIDTHS)]
    want = {0.25: (3 * 30.25 + 5 * 50.25 + 7 * 70.25) / 15, 0.5: (5 * 50.5 + 7 * 70.5) / 12, 0.75: 70.75, 1.0: 71.0}
    for p, value in want.items():
        for key, t in strategy.width_stats[p].items():
            k = ceil_prefix(C1 if key.startswith("bn1") else C2, p)
            torch.testing.assert_close(t[:k], torch.full((k,), value))
    for key in ("bn1.running_mean", "bn2.running_var"):
        torch.testing.assert_close(out[key], torch.full_like(out[key], 71.0))
    # a tier is evaluated with its width's statistics
    tier = strategy.tier_state(0.5, out)
    torch.testing.assert_close(tier["bn1.running_mean"][:4], torch.full((4,), want[0.5]))
    torch.testing.assert_close(tier["bn1.running_mean"][4:], out["bn1.running_mean"][4:])
    torch.testing.assert_close(tier["conv1.weight"], out["conv1.weight"])
    # the statistics travel both ways and count as bytes
    extra_down = sum(len(a.data) for m in messages for a in m.content[FJORD_BN_RECORD].values())
    extra_up = sum(len(a.data) for r in replies for a in r.content[FJORD_BN_RECORD].values())
    assert extra_down > 0 and extra_up == extra_down
    shared = FjORD(TinyBN, capacity_tiers=(0.25, 0.5, 1.0), widths=WIDTHS, bn="shared", example_input=EXAMPLE,
                   fraction_evaluate=0.0, min_available_nodes=3)
    plain_messages, plain_replies, _, plain = _round(shared, lambda m, d, c, s, before_step=None: (len(d), 0.0))
    assert all(FJORD_BN_RECORD not in m.content.array_records for m in plain_messages + plain_replies)
    assert metrics["bytes-down"] - plain["bytes-down"] == extra_down
    assert metrics["bytes-up"] - plain["bytes-up"] == extra_up


def test_bad_statistics_are_left_out_and_the_round_goes_on(caplog):
    """The full node's reply carries a negative variance and the 0.25 node's none: their
    statistics are left out (logged), their weights still count, the 0.5 node's alone
    make widths 0.25 and 0.5, and widths 0.75 and 1.0 keep what was sent."""
    def spoil(replies):
        by_widths = {len(width_stats_from_record(r.content[FJORD_BN_RECORD])): r for r in replies}
        stats = width_stats_from_record(by_widths[len(WIDTHS)].content[FJORD_BN_RECORD])
        stats[1.0]["bn1.running_var"][0] = -1.0
        by_widths[len(WIDTHS)].content[FJORD_BN_RECORD] = width_stats_to_record(stats)
        del by_widths[1].content.array_records[FJORD_BN_RECORD]

    strategy = _strategy()
    with caplog.at_level("WARNING"):
        _, _, out, metrics = _round(strategy, spoil=spoil)
    assert metrics["num-replies"] == 3 and metrics["num-rejected"] == 0
    assert "negative variance" in caplog.text and "has no 'fjord-bn'" in caplog.text
    for p in (0.25, 0.5):
        torch.testing.assert_close(strategy.width_stats[p]["bn1.running_mean"][:ceil_prefix(C1, p)],
                                   torch.full((ceil_prefix(C1, p),), 50 + p))
    init = TinyBN().state_dict()
    for p in (0.75, 1.0):
        torch.testing.assert_close(strategy.width_stats[p]["bn2.running_var"], init["bn2.running_var"])
    torch.testing.assert_close(out["bn2.running_var"], init["bn2.running_var"])


def test_auto_is_per_width_where_it_applies():
    """``auto`` (the default): per width with averaged BatchNorm on a model with running
    statistics; shared with static BatchNorm and on a model without BatchNorm."""
    assert FjORD(TinyBN, widths=WIDTHS, example_input=EXAMPLE).bn == "per-width"
    assert FjORD(TinyBN, widths=WIDTHS, example_input=EXAMPLE, batchnorm="static",
                 calibration_batches=[EXAMPLE]).bn == "shared"
    plain = FjORD(lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3)), widths=WIDTHS,
                  example_input=EXAMPLE)
    assert plain.bn == "shared" and plain.node_records(0, None) == {}
    assert RunConfig().fjord_bn == "auto"


def test_settings_are_checked_naming_the_key():
    with pytest.raises(ValueError, match="fjord-bn must be one of"):
        FjORD(TinyBN, widths=WIDTHS, bn="each", example_input=EXAMPLE)
    with pytest.raises(ValueError, match="fjord-bn = 'per-width' needs batchnorm = 'averaged'"):
        FjORD(TinyBN, widths=WIDTHS, bn="per-width", example_input=EXAMPLE, batchnorm="static",
              calibration_batches=[EXAMPLE])
    with pytest.raises(ValueError, match="no BatchNorm running statistics"):
        FjORD(lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3)), widths=WIDTHS,
              bn="per-width", example_input=EXAMPLE)
    with pytest.raises(ValueError, match="fjord-bn needs strategy 'fjord'"):
        RunConfig(strategy="heterofl", fjord_bn="per-width")
    with pytest.raises(ValueError, match="needs batchnorm = 'averaged'"):
        FjORD.check_run_config(RunConfig(strategy="fjord", model="cnn-bn", fjord_bn="per-width", batchnorm="static"))


def test_a_short_run_accepts_every_reply_learns_and_each_tier_has_its_statistics():
    torch.manual_seed(0)
    init = ArrayRecord(TinyBN().state_dict())

    def load(context):
        g = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
        y = torch.randint(CLASSES, (60,), generator=g)  # the class sets the image's brightness
        return TensorDataset(torch.randn(60, 1, 6, 6, generator=g) + 1.5 * (y.float() - 1)[:, None, None, None], y), None

    strategy = _strategy()
    grid = InProcessGrid(make_client_app(TinyBN, load, train_local), 3)
    config = ConfigRecord({"local-steps": 8, "lr": 0.1, "batch-size": 20, "loss": "cross-entropy", "seed": 0})
    result = strategy.start(grid=grid, initial_arrays=init, num_rounds=4, train_config=config)
    rounds = result.train_metrics_clientapp
    assert [rounds[r]["num-replies"] for r in sorted(rounds)] == [3] * 4
    assert all(rounds[r]["num-rejected"] == 0 for r in rounds)
    x, y = zip(*(load(type("C", (), {"node_config": {"partition-id": i}})())[0].tensors for i in range(3)))
    x, y = torch.cat(x), torch.cat(y)
    model = TinyBN()
    model.load_state_dict(arrays_to_state(init))
    model.eval()
    with torch.no_grad():
        before = float(F.cross_entropy(model(x), y))
        model.load_state_dict(arrays_to_state(result.arrays))
        after = float(F.cross_entropy(model(x), y))
    assert after < 0.9 * before, (before, after)
    stats = strategy.width_stats
    assert not torch.allclose(stats[0.25]["bn1.running_mean"][:2], stats[1.0]["bn1.running_mean"][:2])
    full = arrays_to_state(result.arrays)
    torch.testing.assert_close(full["bn1.running_mean"], stats[1.0]["bn1.running_mean"])


def test_a_resumed_run_ends_with_the_uninterrupted_model_and_statistics(tmp_path):
    """FjORD with per-width statistics on the CNN with BatchNorm, digits: the statistics are
    saved with every checkpoint (fjord-bn-<round>.safetensors), and a run resumed after
    round 2 ends with the uninterrupted run's model and statistics, bit for bit."""
    from fl_subnet.checkpoint import load_model, load_width_stats
    from test_resume import run

    over = {"strategy": "fjord", "model": "cnn-bn", "fjord-bn": "per-width", "capacity-tiers": "0.5,1.0",
            "fjord-widths": "0.5,1.0", "num-nodes": 2}
    run(tmp_path / "full", 3, **over)
    run(tmp_path / "cut", 2, **over)
    assert sorted(p.name for p in (tmp_path / "cut").glob("fjord-bn-*")) == ["fjord-bn-2.safetensors"]
    run(tmp_path / "cut", 3, resume=True, **over)
    a, b = load_model(tmp_path / "full" / "model.safetensors"), load_model(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_width_stats(tmp_path / "full", 3), load_width_stats(tmp_path / "cut", 3)
    assert sorted(sa) == [0.5, 1.0] and all(torch.equal(sa[w][k], sb[w][k]) for w in sa for k in sa[w])
    assert not torch.equal(sa[0.5]["bn1.running_mean"][:8], sa[1.0]["bn1.running_mean"][:8])
