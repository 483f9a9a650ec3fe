"""Capacity tiers after training (fl_subnet.tiers): the extracted tier equals slicing the
leading ⌈r·size⌉ rows/columns by hand, its forward equals the full model's with the units
beyond the prefix removed (and scaled by 1/r with scale=True), a saved tier loads from the
model factory alone, and a HeteroFL run reports each tier's accuracy and writes its file."""

import json
import logging
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from fl_subnet.checkpoint import MODEL_FILE, load_model, save_model
from fl_subnet.clients.train import evaluate_model
from fl_subnet.models import MLP
from fl_subnet.models.cnn import CNNBN, FlowerCNN
from fl_subnet.tiers import (evaluate_tiers, extract_submodel, extract_tier, load_submodel, read_header,
                                save_submodel, tier_file)

CAPACITIES = [0.25, 0.3, 0.5, 1.0]


def mlp():
    return MLP(64, [32, 16], 10)


def cnn():
    return FlowerCNN(1, 10, 8)  # conv1 6, conv2 16 (2x2 each after pooling), fc1 120, fc2 84


def cnn_bn():
    return CNNBN(1, 10, 8)


def trained(factory, seed=0):
    torch.manual_seed(seed)
    model = factory()
    with torch.no_grad():  # non-zero biases and running statistics, so nothing is trivially equal
        for name, t in model.state_dict().items():
            if name.endswith("running_mean"):
                t.normal_()
            elif name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))
    return model.eval()


def k(size, r):
    return math.ceil(round(r * size, 9))  # HeteroFL: int(np.ceil(rate * size))


def hand_mlp(state, r):
    a, b = k(32, r), k(16, r)
    return {"1.weight": state["1.weight"][:a], "1.bias": state["1.bias"][:a],
            "3.weight": state["3.weight"][:b, :a], "3.bias": state["3.bias"][:b],
            "5.weight": state["5.weight"][:, :b], "5.bias": state["5.bias"]}


def hand_cnn(state, r):
    c1, c2, f1, f2 = k(6, r), k(16, r), k(120, r), k(84, r)
    return {"conv1.weight": state["conv1.weight"][:c1], "conv1.bias": state["conv1.bias"][:c1],
            "conv2.weight": state["conv2.weight"][:c2, :c1], "conv2.bias": state["conv2.bias"][:c2],
            # flatten is channel-major: channel c holds columns 4c .. 4c+3 (2x2 pixels)
            "fc1.weight": state["fc1.weight"][:f1, :4 * c2], "fc1.bias": state["fc1.bias"][:f1],
            "fc2.weight": state["fc2.weight"][:f2, :f1], "fc2.bias": state["fc2.bias"][:f2],
            "fc3.weight": state["fc3.weight"][:, :f2], "fc3.bias": state["fc3.bias"]}


# consumer weight of each group: (key, positions per unit along dim 1), to zero/scale by hand
CONSUMERS = {
    "mlp": [("3.weight", 32, 1), ("5.weight", 16, 1)],
    "cnn": [("conv2.weight", 6, 1), ("fc1.weight", 16, 4), ("fc2.weight", 120, 1), ("fc3.weight", 84, 1)],
    "cnn-bn": [("conv2.weight", 8, 1), ("conv3.weight", 8, 1), ("fc.weight", 16, 1)],
}
MODELS = {"mlp": (mlp, torch.randn(5, 64)), "cnn": (cnn, torch.randn(5, 1, 8, 8)),
          "cnn-bn": (cnn_bn, torch.randn(5, 1, 8, 8))}


def reference(factory, name, r, scale):
    """The full model with the units beyond each prefix removed: their outgoing weights
    zeroed (and the kept ones times 1/r with scale), built by hand."""
    model = trained(factory)
    state = model.state_dict()
    with torch.no_grad():
        for key, size, per_unit in CONSUMERS[name]:
            w = state[key]
            keep = k(size, r) * per_unit
            w[:, keep:] = 0
            if scale:
                w[:, :keep] /= r
    return model.eval()


@pytest.mark.parametrize("r", CAPACITIES)
@pytest.mark.parametrize("name,hand", [("mlp", hand_mlp), ("cnn", hand_cnn)])
def test_extraction_equals_slicing_by_hand(name, hand, r):
    factory, x = MODELS[name]
    model = trained(factory)
    tier = extract_tier(model, factory, r, example_input=x[:1])
    want = hand(model.state_dict(), r)
    assert set(tier.state) == set(want)
    for key, t in want.items():
        assert torch.equal(tier.state[key], t), (key, tuple(tier.state[key].shape), tuple(t.shape))


@pytest.mark.parametrize("r", [0.25, 0.3, 1.0])
def test_extracted_mlp_is_a_plain_narrow_mlp(r):
    """The tier computes what a freshly built MLP(64, [⌈32r⌉, ⌈16r⌉], 10) loaded with the
    hand-sliced weights computes, and evaluate_tiers reports that model's accuracy."""
    model = trained(mlp)
    narrow = MLP(64, [k(32, r), k(16, r)], 10)
    narrow.load_state_dict(hand_mlp(model.state_dict(), r))
    x, y = torch.randn(200, 64), torch.randint(0, 10, (200,))
    sub = extract_submodel(model, mlp, r)
    with torch.no_grad():
        assert torch.allclose(sub(x), narrow(x), atol=1e-6)
        acc = float((narrow(x).argmax(1) == y).float().mean())
    got = evaluate_tiers(model, mlp, [r], TensorDataset(x, y))
    assert got[f"tier-{r:g}-acc"] == pytest.approx(acc)
    assert got[f"tier-{r:g}-params"] == sum(t.numel() for t in narrow.state_dict().values())


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("r", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("name", ["mlp", "cnn", "cnn-bn"])
def test_forward_equals_full_model_with_units_beyond_the_prefix_zeroed(name, r, scale):
    factory, x = MODELS[name]
    sub = extract_submodel(trained(factory), factory, r, example_input=x[:1], scale=scale)
    with torch.no_grad():
        want = reference(factory, name, r, scale)(x)
        got = sub(x)
    assert not sub.training
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), float((got - want).abs().max())
    if r < 1:  # the reference is not the plain full model: the test can tell tiers apart
        with torch.no_grad():
            assert not torch.allclose(trained(factory)(x), want, atol=1e-3)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("scale", [False, True])
def test_save_load_round_trip_is_bitwise(tmp_path, name, scale):
    factory, x = MODELS[name]
    model = trained(factory)
    path = tmp_path / "tier.safetensors"
    save_submodel(path, model, factory, 0.5, example_input=x[:1], scale=scale, meta={"note": "hi"})
    loaded = load_submodel(path, factory)  # the model factory alone
    extracted = extract_submodel(model, factory, 0.5, example_input=x[:1], scale=scale)
    with torch.no_grad():
        assert torch.equal(loaded(x), extracted(x))
    header = read_header(path)
    assert header["capacity"] == 0.5 and header["scale"] is scale and header["note"] == "hi"
    assert header["example-shape"] == ",".join(map(str, x[:1].shape))
    sizes = {"mlp": {"1": 32, "3": 16}, "cnn": {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}}[name]
    assert header["indices"] == {g: list(range(k(n, 0.5))) for g, n in sizes.items()}
    assert header["scales"] == {g: (2.0 if scale else 1.0) for g in sizes}


def test_load_errors_name_the_problem(tmp_path):
    path = tmp_path / "tier.safetensors"
    save_submodel(path, trained(mlp), mlp, 0.25)
    with pytest.raises(ValueError, match="unit group '1' of size 32"):
        load_submodel(path, lambda: MLP(64, [40, 16], 10))
    with pytest.raises(ValueError, match=r"tensor '1.weight' has shape \(8, 64\)"):
        load_submodel(path, _wider_input)
    full = tmp_path / "full.safetensors"
    save_model(full, mlp().state_dict())
    with pytest.raises(ValueError, match="not an fl-subnet sub-model file"):
        load_submodel(full, mlp)
    with pytest.raises(FileNotFoundError):
        load_submodel(tmp_path / "missing.safetensors", mlp)
    with pytest.raises(ValueError, match="capacity"):
        extract_submodel(trained(mlp), mlp, 1.5)


def _wider_input():
    return MLP(65, [32, 16], 10)  # same groups, another input width: the tensors do not fit


def test_static_batchnorm_calibration_recomputes_the_tiers_statistics():
    """With calibration batches, the tier's running statistics are those of the tier's
    own activations: equal to a plain BatchNorm pass over the narrow model's features."""
    model = trained(cnn_bn)
    batches = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    sub = extract_submodel(model, cnn_bn, 0.5, example_input=batches[0][:1], calibration_batches=batches)
    c1 = k(8, 0.5)
    with torch.no_grad():  # conv1 of the tier = the first c1 filters: its BN mean by hand
        feats = torch.cat([torch.nn.functional.conv2d(b, model.conv1.weight[:c1], model.conv1.bias[:c1], padding=1)
                           for b in batches])
    assert torch.allclose(sub.state_dict()["bn1.running_mean"], feats.mean((0, 2, 3)), atol=1e-5)
    assert not torch.allclose(sub.state_dict()["bn2.running_mean"], model.bn2.running_mean[:c1])


# --------------------------------------------------------------- a HeteroFL run (in-process grid)
HETEROFL = {"strategy": "heterofl", "capacity-tiers": "0.25,0.5,1.0", "num-nodes": 3, "num-server-rounds": 2,
            "dataset": "digits", "model": "mlp", "hidden": "64,32", "partitioning": "iid", "local-steps": 40,
            "lr": 0.1, "batch-size": 32, "seed": 0,
            # the 0.25 tier learns past 0.3 in 2 rounds at the lr given (the default takes it x1/16)
            "lr-scaling": "none"}


@pytest.fixture(scope="module")
def heterofl_run(tmp_path_factory):
    from fl_subnet.experiments.cli import run_one

    out = tmp_path_factory.mktemp("heterofl")
    summary = run_one(dict(HETEROFL), out)
    return out, summary


def test_heterofl_run_reports_each_tiers_accuracy_and_writes_loadable_files(heterofl_run):
    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.experiments.experiment import CentralEvaluation, factory_for

    out, summary = heterofl_run
    cfg = RunConfig.from_mapping(HETEROFL)
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["server-round"] for r in rows] == [0, 1, 2]
    last = rows[-1]
    test = CentralEvaluation(cfg, None).test
    state = load_model(out / MODEL_FILE)  # the final global model
    header = (out / "metrics.csv").read_text().splitlines()[0]
    for r in (0.25, 0.5, 1.0):
        key = f"tier-{r:g}-acc"
        assert key in last and summary[key] == last[key] and key in header
        assert last[key] > 0.3, (key, last[key])  # 10 classes: chance is 0.1
        loaded = load_submodel(out / tier_file(r), factory_for(cfg))  # loads from the factory alone
        assert evaluate_model(loaded, test, "cross-entropy")["eval-acc"] == last[key]
        narrow = hand_mlp_run(state, r)  # an independent narrow MLP with hand-sliced weights
        assert evaluate_model(narrow, test, "cross-entropy")["eval-acc"] == pytest.approx(last[key])
    assert last["tier-1-acc"] == pytest.approx(last["eval-acc"])  # the full tier is the global model
    assert "tier-0.25-acc" not in rows[1]  # final round only


def test_a_strategy_without_tiers_reports_the_configs_tiers(tmp_path):
    """FedAvg in a run that names capacity tiers reports its own nested prefixes (what a
    small node would be given), computed like HeteroFL's: a hand-sliced narrow MLP."""
    from fl_subnet.experiments.cli import run_one
    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.experiments.experiment import CentralEvaluation

    values = {**HETEROFL, "strategy": "fedavg", "num-server-rounds": 1, "capacity-tiers": "0.5,1.0"}
    summary = run_one(dict(values), tmp_path)
    state = load_model(tmp_path / MODEL_FILE)
    test = CentralEvaluation(RunConfig.from_mapping(values), None).test
    assert summary["tier-0.5-acc"] == pytest.approx(evaluate_model(hand_mlp_run(state, 0.5), test,
                                                                   "cross-entropy")["eval-acc"])
    assert "tier-0.25-acc" not in summary and summary["tier-1-acc"] == pytest.approx(summary["final-eval-acc"])


def hand_mlp_run(state, r):
    a, b = k(64, r), k(32, r)
    narrow = MLP(64, [a, b], 10)
    narrow.load_state_dict({"1.weight": state["1.weight"][:a], "1.bias": state["1.bias"][:a],
                            "3.weight": state["3.weight"][:b, :a], "3.bias": state["3.bias"][:b],
                            "5.weight": state["5.weight"][:, :b], "5.bias": state["5.bias"]})
    return narrow


def test_cli_extract_writes_the_tier_and_logs_its_accuracy(heterofl_run, tmp_path, caplog):
    from fl_subnet.experiments.cli import main

    out, summary = heterofl_run
    target = tmp_path / "small.safetensors"
    with caplog.at_level(logging.INFO, logger="fl_subnet.experiments.cli"):
        assert main(["extract", str(out), "--capacity", "0.25", "--out", str(target)]) == 0
    assert f"test accuracy {summary['tier-0.25-acc']:.4f}" in caplog.text
    mine, harness = load_model(target), load_model(out / tier_file(0.25))
    assert set(mine) == set(harness) and all(torch.equal(mine[key], harness[key]) for key in mine)
    assert read_header(target)["config"]["strategy"] == "heterofl"


def test_cli_extract_bad_input(tmp_path, capsys):
    from fl_subnet.experiments.cli import main

    assert main(["extract", str(tmp_path), "--capacity", "0.5"]) == 2
    assert "no model file" in capsys.readouterr().err
