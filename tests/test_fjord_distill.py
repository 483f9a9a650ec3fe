"""FjORD+KD (Horváth et al., NeurIPS 2021, §3.3): self-distillation from each node's own
max-width sub-model, option ``fjord-distill``.

Checked against: a plain-torch port of Flower's FjORD baseline (``baselines/fjord/fjord/
models.py``, ``train``, branch ``know_distill``), with the reference's ordered-dropout
layers written as weight slices ``W[:⌈p·out⌉, :in]``, on the same batch, widths and
seed (updated parameters to 1e-6); with the option off, training bit-identical to the
loop without it; bad values refused naming the key; a short run through
``strategy.start`` and Flower's serde that accepts every reply and lowers the loss.
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch.utils.data import TensorDataset

from fl_subnet import analyze
from fl_subnet.clients import make_client_app, receive, train_local
from fl_subnet.clients.compact import distill_from_config, width_schedule
from fl_subnet.clients.train import TrainConfig, make_loader
from fl_subnet.core.ordered import WidthSchedule, fjord_kd_loss, width_generator
from fl_subnet.core.samplers import NestedPrefixSampler
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.models import MLP
from fl_subnet.strategies import FjORD
from fl_subnet.wire import FJORD_WIDTHS, arrays_to_state, mask_to_config
from fl_subnet.wire.records import FJORD_DISTILL

SIZES = (6, 10, 7, 3)  # MLP(6, [10, 7], 3): Flatten, Linear 1, ReLU, Linear 3, ReLU, Linear 5
mlp = functools.partial(MLP, SIZES[0], list(SIZES[1:3]), SIZES[3])
WIDTHS = (0.2, 0.4, 0.6, 0.8, 1.0)


def ceil_prefix(size: int, p: float) -> int:
    """The reference's ⌈p·size⌉ (at least 1), written independently of samplers.prefix_size."""
    return max(1, int(math.ceil(p * size - 1e-9)))


def reference_forward(params, x, p):
    """Flower's FjORD baseline's ordered-dropout forward on this MLP: every hidden layer keeps
    its first ⌈p·out⌉ outputs and reads the kept inputs; the classifier keeps every class."""
    k1, k3 = ceil_prefix(SIZES[1], p), ceil_prefix(SIZES[2], p)
    h = x.flatten(1)
    h = F.relu(F.linear(h, params["1.weight"][:k1], params["1.bias"][:k1]))
    h = F.relu(F.linear(h, params["3.weight"][:k3, :k1], params["3.bias"][:k3]))
    return F.linear(h, params["5.weight"][:, :k3], params["5.bias"])


def reference_steps(state, x, y, widths, p_max, lr, momentum):
    """The baseline's ``train`` loop, ``know_distill=True``, one full batch per step:

        optimizer.zero_grad()
        full_output = net(images, sampler=max_sampler)
        full_loss = criterion(full_output, target); full_loss.backward()
        target = full_output.detach().softmax(dim=1)
        partial_loss = criterion(net(images, sampler=sampler), target); partial_loss.backward()
        optimizer.step()
    """
    params = {k: v.detach().clone().requires_grad_(True) for k, v in state.items()}
    opt = torch.optim.SGD(list(params.values()), lr=lr, momentum=momentum)
    criterion = torch.nn.CrossEntropyLoss()
    losses = []
    for p in widths:
        opt.zero_grad()
        target = y
        full_output = reference_forward(params, x, p_max)
        full_loss = criterion(full_output, target)
        full_loss.backward()
        target = full_output.detach().softmax(dim=1)
        partial_loss = criterion(reference_forward(params, x, p), target)
        partial_loss.backward()
        opt.step()
        losses.append(float(partial_loss.detach()))
    return {k: v.detach() for k, v in params.items()}, losses


def fjord_message(state, p_max, distill, seed=3, server_round=1):
    """A FjORD train message for the node of max width ``p_max`` (what the strategy sends)."""
    spec = analyze(mlp, torch.zeros(1, SIZES[0]), verify=False)
    (mask,) = NestedPrefixSampler(scale=False).sample(spec.groups, 1, 1, capacities=[p_max])
    config = {**mask_to_config(mask, spec.groups), "server-round": server_round, "seed": seed,
              FJORD_WIDTHS: ",".join(repr(w) for w in WIDTHS if w <= p_max)}
    if distill is not None:
        config[FJORD_DISTILL] = distill
    return RecordDict({"arrays": ArrayRecord(spec.gather(state, mask)), "config": ConfigRecord(config)})


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, SIZES[0], generator=g), torch.randint(0, SIZES[3], (n,), generator=g)


# ---------------------------------------------------------------------------- the reference's loss
@pytest.mark.parametrize("p_max", [1.0, 0.8, 0.6])
@pytest.mark.parametrize("steps,momentum", [(1, 0.0), (4, 0.9)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_client_steps_equal_the_reference_port(p_max, steps, momentum, seed):
    torch.manual_seed(seed)
    full = mlp().state_dict()
    got = receive(fjord_message(full, p_max, True, seed=seed), mlp)
    compact = {k: v.clone() for k, v in got.model.state_dict().items()}
    x, y = batch(seed=seed)
    cfg = TrainConfig(local_steps=steps, lr=0.3, momentum=momentum, batch_size=0, seed=seed)
    with width_schedule(got, partition=2) as schedule:
        assert schedule.distill
        _, loss = train_local(got.model, TensorDataset(x, y), cfg, seed, before_step=schedule)
    allowed = tuple(w for w in WIDTHS if w <= p_max)
    gen = width_generator(seed, 1, 2)  # the node's draws: (seed, server-round, partition) alone
    drawn = [allowed[int(torch.randint(len(allowed), (1,), generator=gen))] for _ in range(steps)]
    assert schedule.history == drawn
    want, losses = reference_steps(compact, x, y, drawn, p_max, cfg.lr, momentum)
    out = got.model.state_dict()
    for key, value in want.items():
        torch.testing.assert_close(out[key], value, atol=1e-6, rtol=0, msg=key)
    assert loss == pytest.approx(sum(losses) / steps, abs=1e-6)  # the baseline reports partial_loss
    assert any(not torch.equal(out[k], compact[k]) for k in out)


def test_kd_loss_is_the_kl_divergence_plus_the_teachers_entropy():
    """Independent hand form: −mean Σ q_t log q_s = KL(q_t ‖ q_s) + H(q_t); gradient only to the student."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g, requires_grad=True), torch.randn(5, 4, generator=g, requires_grad=True)
    q_t, log_q_s = torch.softmax(t.detach(), 1), torch.log_softmax(s.detach(), 1)
    kl = (q_t * (q_t.log() - log_q_s)).sum(1).mean()
    entropy = -(q_t * q_t.log()).sum(1).mean()
    loss = fjord_kd_loss(s, t)
    assert float(loss.detach()) == pytest.approx(float(kl + entropy), abs=1e-6)
    loss.backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="fjord-distill"):
        fjord_kd_loss(s, t[:, :3])


# ---------------------------------------------------------------------------- option off: unchanged
@pytest.mark.parametrize("flag", [None, False])
def test_off_is_bit_identical_to_the_plain_fjord_loop(flag):
    """train_local with the flag absent or false ≡ the plain FjORD loop (width, CE, step)."""
    torch.manual_seed(0)
    full = mlp().state_dict()
    g = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(40, SIZES[0], generator=g), torch.randint(0, 3, (40,), generator=g))
    cfg = TrainConfig(local_steps=7, lr=0.2, momentum=0.9, weight_decay=1e-3, batch_size=8, seed=1)
    got = receive(fjord_message(full, 0.8, flag), mlp)
    with width_schedule(got, 1) as schedule:
        assert not schedule.distill
        n, loss = train_local(got.model, data, cfg, 11, before_step=schedule)

    plain = receive(fjord_message(full, 0.8, None), mlp)  # today's loop, written out
    with width_schedule(plain, 1) as sched:
        model = plain.model
        opt = torch.optim.SGD(list(model.parameters()), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        loader = make_loader(data, cfg.batch_size, shuffle=True, seed=11)
        batches = [b for _ in range(2) for b in loader][:cfg.local_steps]
        total = 0.0
        model.train()
        for step, (x, y) in enumerate(batches):
            sched(step)
            step_loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            step_loss.backward()
            opt.step()
            total += float(step_loss)
    assert schedule.history == sched.history
    assert loss == total / cfg.local_steps and n == 40
    for key, value in model.state_dict().items():
        assert torch.equal(got.model.state_dict()[key], value), key


def test_strategy_sends_the_flag_only_when_on():
    def nothing(model, data, cfg, s, before_step=None):
        seen.append(before_step.distill)
        return len(data), 0.0

    def load(context):
        return TensorDataset(torch.randn(4, SIZES[0]), torch.zeros(4, dtype=torch.long)), None

    for distill in (False, True):
        seen = []
        strategy = FjORD(mlp, capacity_tiers=(0.4, 1.0), distill=distill, fraction_evaluate=0.0,
                         min_available_nodes=2)
        grid = InProcessGrid(make_client_app(mlp, load, nothing), 2)
        messages = list(strategy.configure_train(1, ArrayRecord(mlp().state_dict()), ConfigRecord({"lr": 0.1}), grid))
        list(grid.send_and_receive(messages))
        for msg in messages:
            config = msg.content["config"]
            assert (FJORD_DISTILL in config) == distill and config.get(FJORD_DISTILL, False) is distill
        assert seen == [distill, distill]


# ---------------------------------------------------------------------------- bad values
def test_bad_values_are_refused_naming_the_key():
    from fl_subnet.experiments.config import RunConfig

    with pytest.raises(ValueError, match="fjord-distill needs strategy 'fjord'"):
        RunConfig.from_mapping({"strategy": "heterofl", "fjord-distill": True})
    with pytest.raises(ValueError, match="fjord-distill"):
        RunConfig.from_mapping({"strategy": "fjord", "fjord-distill": "yes"})
    with pytest.raises(ValueError, match="fjord-distill"):
        RunConfig.from_mapping({"strategy": "fjord", "fjord-distill": True, "dataset": "synthetic-regression",
                                  "partitioning": "iid"})
    assert RunConfig.from_mapping({"strategy": "fjord", "fjord-distill": True}).fjord_distill is True
    with pytest.raises(ValueError, match=r"distill \(fjord-distill\) must be a bool"):
        FjORD(mlp, distill=1)
    for bad in ("true", 1, None):
        with pytest.raises(ValueError, match="'fjord-distill' must be a bool"):
            distill_from_config({FJORD_DISTILL: bad, FJORD_WIDTHS: "0.5,1.0"})
    with pytest.raises(ValueError, match="'fjord-distill' is true but the config has no 'fjord-widths'"):
        distill_from_config({FJORD_DISTILL: True})
    assert distill_from_config({}) is False
    torch.manual_seed(0)
    got = receive(fjord_message(mlp().state_dict(), 1.0, "true"), mlp)
    with pytest.raises(ValueError, match="'fjord-distill'"):
        width_schedule(got, 0)
    got = receive(fjord_message(mlp().state_dict(), 1.0, True), mlp)
    with width_schedule(got, 0) as schedule, pytest.raises(ValueError, match="fjord-distill.*cross-entropy"):
        x, _ = batch()
        train_local(got.model, TensorDataset(x, torch.randn(16, 3)), TrainConfig(loss="mse"), before_step=schedule)
    with pytest.raises(ValueError, match="fjord-distill"):
        WidthSchedule(mlp(), (), width_generator(0, 0, 0), distill=True)


# ---------------------------------------------------------------------------- a short run
def _data(context):
    pid = int(context.node_config["partition-id"])
    g = torch.Generator().manual_seed(100 + pid)
    x = torch.randn(60, SIZES[0], generator=g)
    w = torch.Generator().manual_seed(7)
    y = (x @ torch.randn(SIZES[0], SIZES[3], generator=w)).argmax(1)  # the same linear rule on every node
    return TensorDataset(x, y), None


def _central_loss(arrays):
    model = mlp()
    model.load_state_dict(arrays_to_state(arrays))
    xs, ys = zip(*(_data(type("C", (), {"node_config": {"partition-id": i}})())[0].tensors for i in range(3)))
    with torch.no_grad():
        return float(F.cross_entropy(model(torch.cat(xs)), torch.cat(ys)))


def test_a_short_run_accepts_every_reply_and_the_loss_falls():
    seen = []

    def spy(model, data, cfg, seed, before_step=None):
        seen.append((before_step.distill, len(before_step.history)))
        out = train_local(model, data, cfg, seed, before_step=before_step)
        seen[-1] += (len(before_step.history),)
        return out

    torch.manual_seed(0)
    init = ArrayRecord(mlp().state_dict())
    strategy = FjORD(mlp, capacity_tiers=(0.4, 0.6, 1.0), distill=True, fraction_evaluate=0.0,
                     min_available_nodes=3)
    grid = InProcessGrid(make_client_app(mlp, _data, spy), 3)
    config = ConfigRecord({"local-steps": 10, "lr": 0.2, "batch-size": 10, "loss": "cross-entropy", "seed": 0})
    result = strategy.start(grid=grid, initial_arrays=init, num_rounds=4, train_config=config)
    rounds = result.train_metrics_clientapp
    assert [rounds[r]["num-replies"] for r in sorted(rounds)] == [3] * 4
    assert all(rounds[r]["num-rejected"] == 0 for r in rounds)
    assert seen == [(True, 0, 10)] * 12
    before, after = _central_loss(init), _central_loss(result.arrays)
    assert after < 0.8 * before, (before, after)
