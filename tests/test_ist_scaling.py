"""IST's output-scaling options (issue: IST as its authors use it)."""

import functools

import pytest
import torch

from fl_subnet.core.masks import full_mask
from fl_subnet.strategies import IST
from fl_subnet.strategies.ist import IST_SCALINGS
from fl_subnet.wire import arrays_to_state, mask_from_config

from strategy_helpers import factory, grid, initial_arrays, train_config


def test_choices_equal_the_run_configs():
    from fl_subnet.experiments.config import CHOICES

    assert CHOICES["ist-scaling"] == IST_SCALINGS


def test_p_lr_scales_the_outputs_by_p_and_the_nodes_lr_by_one_over_p():
    s = IST(factory, 4, scaling="p-lr", num_train_nodes=4, min_available_nodes=4, fraction_evaluate=0.0)
    msgs = list(s.configure_train(1, initial_arrays(), train_config(lr=0.2), grid(4)))
    assert {m.content["config"]["lr"] for m in msgs} == {0.05}
    assert {mask_from_config(m.content["config"], s.spec.all_groups).scale[g.name]
            for m in msgs for g in s.groups} == {4.0}
    plain = IST(factory, 4, scaling="p", lr_scaling="none", num_train_nodes=4, min_available_nodes=4,
                fraction_evaluate=0.0)
    msgs = list(plain.configure_train(1, initial_arrays(), train_config(lr=0.2), grid(4)))
    assert {m.content["config"]["lr"] for m in msgs} == {0.2}
    square = IST(factory, 4, scaling="p", num_train_nodes=4, min_available_nodes=4, fraction_evaluate=0.0)
    msgs = list(square.configure_train(1, initial_arrays(), train_config(lr=0.2), grid(4)))
    assert {m.content["config"]["lr"] for m in msgs} == {0.2 / 16}  # the base default: lr / p**2


def test_eval_scaling_trains_unscaled_and_deploys_the_one_over_p_model():
    """Nodes train unscaled (scale 1 on the wire); the deployed state, loaded into the
    user's own class, computes the reference model with every split unit ×1/p; federated
    evaluation sends that deployed state."""
    p = 2
    s = IST(factory, p, scaling="eval", num_train_nodes=p, min_available_nodes=p, fraction_evaluate=1.0,
            min_evaluate_nodes=p)
    g = grid(p)
    arrays = initial_arrays()
    msgs = list(s.configure_train(1, arrays, train_config(), g))
    assert {mask_from_config(m.content["config"], s.spec.all_groups).scale[gr.name]
            for m in msgs for gr in s.groups} == {1.0}
    assert all("scale" not in m.content["config"] for m in msgs)  # scale 1 is not sent
    arrays, _ = s.aggregate_train(1, g.send_and_receive(msgs))
    state = arrays_to_state(arrays)
    deployed = s.deployed_state(state)
    x = torch.randn(5, 8)
    mask = full_mask(s.spec.all_groups)
    ref = s.spec.reference(state, type(mask)(mask.indices, {gr.name: 1 / p for gr in s.groups})).eval()
    model = factory()
    model.load_state_dict(deployed)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), atol=1e-6, rtol=1e-5)
    evals = list(s.configure_evaluate(1, arrays, train_config(), g))
    sent = arrays_to_state(evals[0].content["arrays"])
    assert all(torch.equal(sent[k], deployed[k]) for k in deployed)
    assert any(not torch.equal(sent[k], state[k]) for k in state)


def test_eval_scaling_refuses_a_model_whose_scale_cannot_be_folded():
    from fl_subnet.models.transformer import MHATransformer

    with pytest.raises(ValueError, match="cannot fold an output scale"):
        IST(functools.partial(MHATransformer, 16, 20, num_classes=2), 2, scaling="eval",
            example_input=torch.zeros(1, 20, dtype=torch.long))


def test_eval_scaling_run_evaluates_and_saves_the_deployed_model(tmp_path):
    """The harness evaluates the deployed model and writes it as model-deployed.safetensors;
    its accuracy equals the metrics' final eval-acc."""
    from fl_subnet.checkpoint import load_model
    from fl_subnet.clients.train import evaluate_model
    from fl_subnet.experiments.cli import run_one
    from fl_subnet.experiments.config import RunConfig
    from fl_subnet.experiments.experiment import DEPLOYED_FILE, CentralEvaluation, factory_for

    values = {"strategy": "ist", "ist-scaling": "eval", "num-subnets": 2, "num-nodes": 2, "num-server-rounds": 2,
              "hidden": "32", "local-steps": 5, "seed": 1}
    summary = run_one(dict(values), tmp_path)
    cfg = RunConfig.from_mapping(values)
    model = factory_for(cfg)()
    model.load_state_dict(load_model(tmp_path / DEPLOYED_FILE))
    acc = evaluate_model(model, CentralEvaluation(cfg, None).test, "cross-entropy")["eval-acc"]
    assert acc == summary["final-eval-acc"]
    trained = factory_for(cfg)()
    trained.load_state_dict(load_model(tmp_path / "model.safetensors"))
    assert evaluate_model(trained, CentralEvaluation(cfg, None).test, "cross-entropy")["eval-loss"] != pytest.approx(
        evaluate_model(model, CentralEvaluation(cfg, None).test, "cross-entropy")["eval-loss"])


def test_mlp_bn_is_ists_reference_model_and_its_batchnorm_follows_the_units():
    """``mlp-bn``: Linear → BatchNorm1d (no running statistics) → ReLU; the BatchNorm's
    affine parameters are sliced with their layer's units, and the compact model of a
    part equals the full model restricted by hand (BatchNorm per unit is separable)."""
    from fl_subnet.core.masks import Mask
    from fl_subnet.core.spec import analyze
    from fl_subnet.models import MLP

    f = functools.partial(MLP, 6, [8], 3, norm=True)
    spec = analyze(f)
    (g,) = spec.groups
    torch.manual_seed(0)
    model = f()
    keep = torch.tensor([1, 4, 6])
    compact = spec.gather(model.state_dict(), Mask({g.name: keep}))
    assert compact["2.weight"].shape == (3,) and "2.running_mean" not in compact
    x = torch.randn(10, 6)
    with torch.no_grad():
        h = model[2](model[1](x))[:, keep].relu()  # BatchNorm of the full layer, then keep the units
        want = h @ model[4].weight[:, keep].T + model[4].bias
        got = spec.build(compact, Mask({g.name: keep}))(x)
    torch.testing.assert_close(got, want)


def test_a_single_row_batch_is_skipped_with_batchnorm1d():
    """10 rows in batches of 3: the trailing batch of one row cannot be normalised; the
    node skips it (3 steps per epoch, not 4) instead of failing."""
    from torch.utils.data import TensorDataset

    from fl_subnet.clients.train import TrainConfig, train_local
    from fl_subnet.models import MLP

    data = TensorDataset(torch.randn(10, 6), torch.randint(0, 3, (10,)))
    steps = []
    n, loss = train_local(MLP(6, [8], 3, norm=True), data, TrainConfig(local_steps=0, local_epochs=1, batch_size=3),
                          before_step=steps.append)
    assert n == 10 and steps == [0, 1, 2] and loss == loss
    steps.clear()
    train_local(MLP(6, [8], 3), data, TrainConfig(local_steps=0, local_epochs=1, batch_size=3), before_step=steps.append)
    assert steps == [0, 1, 2, 3]  # without BatchNorm1d every batch counts


def test_eval_scaling_refuses_batchnorm_models():
    """The folded 1/p would be normalised away by the BatchNorm (and its statistics were
    not taken under it): measured on digits with the CNN+BN, accuracy fell to 0.20."""
    from fl_subnet.models import CNNBN

    with pytest.raises(ValueError, match=r"ist-scaling 'eval' cannot be used with BatchNorm layers \(3 × BatchNorm2d"):
        IST(functools.partial(CNNBN, 1, 10), 2, scaling="eval", example_input=torch.zeros(2, 1, 8, 8))

