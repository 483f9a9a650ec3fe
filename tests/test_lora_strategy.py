"""A frozen base with trainable LoRA adapters through the Flower layer: strategies, ClientApp
and the wire, with real peft adapters on fl-subnet's own transformer (random weights,
nothing downloaded), every message through Flower's serde (InProcessGrid).

Only the adapters are the global model, travel and are aggregated; the base is built on
each node and never crosses the wire; its fingerprint travels in every message and a node
holding another base is refused.
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch.utils.data import TensorDataset

from fl_subnet.clients import make_client_app, train_local
from fl_subnet.clients import frozen as node_frozen
from fl_subnet.core.frozen import base_fingerprint, frozen_keys, trainable_keys, trainable_state
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.models import MLP
from fl_subnet.models.transformer import HandAttentionTransformer
from fl_subnet.strategies import HeteroFL, SubnetFedAvg
from fl_subnet.wire import BASE_FINGERPRINT, arrays_to_state, mask_from_config
from fl_subnet.wire.packed import PACKED_PREFIX, is_packed, slice_layout, unpack_state

# transformers 5.23 warns about an attribute peft 0.21 reads; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

RANK, ALPHA = 8, 16
TARGETS = ["q_proj", "v_proj", "fc1"]
VOCAB, SEQ = 16, 8
NUM_NODES = 3


def make_factory(dim: int = 32, ffn: int = 64, rank: int = RANK, *, nudge: bool = False,
                 base_dtype: torch.dtype | None = None):
    """A factory of one peft model: fl-subnet's transformer (2 blocks) as the frozen base,
    LoRA of rank ``rank`` on ``q_proj``, ``v_proj`` and ``fc1``, everything drawn from
    seed 0 (``lora_B`` random too, so every rank gets a gradient). ``nudge``: one value of
    the base (the classifier's first weight) moved by 1e-3. ``base_dtype``: the base cast
    to it before the adapters are added (peft keeps the adapters in float32)."""

    def factory():
        torch.manual_seed(0)
        base = HandAttentionTransformer(vocab_size=VOCAB, seq_len=SEQ, dim=dim, num_heads=4, ffn=ffn)
        if nudge:
            with torch.no_grad():
                base.head.weight.view(-1)[0] += 1e-3
        if base_dtype is not None:
            base = base.to(base_dtype)
        config = LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
        return get_peft_model(base, config)
    return factory


# module-level factories: a node builds and fingerprints each base once per process (keyed by factory)
FACTORY = make_factory()
NUDGED = make_factory(nudge=True)
WIDE = make_factory(dim=256, ffn=512, rank=32)
BF16 = make_factory(base_dtype=torch.bfloat16)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are small and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_data(context):
    """Node ``pid``'s data: ``16 + 8·pid`` sequences (unequal sizes, so ``num-examples``
    weighting matters), label 1 when the first token is above 7."""
    pid = int(context.node_config["partition-id"])
    g = torch.Generator().manual_seed(10 + pid)
    x = torch.randint(0, VOCAB, (16 + 8 * pid, SEQ), generator=g)
    y = (x[:, 0] > VOCAB // 2 - 1).long()
    return TensorDataset(x, y), TensorDataset(x[:8], y[:8])


def train_config(**over):
    cfg = {"local-steps": 3, "lr": 0.05, "batch-size": 8, "loss": "cross-entropy", "seed": 1}
    cfg.update(over)
    return ConfigRecord(cfg)


def full_arrays(factory=FACTORY) -> ArrayRecord:
    return ArrayRecord(factory().state_dict())


def central_loss(arrays: ArrayRecord, factory=FACTORY, num_nodes: int = NUM_NODES) -> float:
    """Cross-entropy of the base plus the adapters in ``arrays`` on every node's training data."""
    model = factory()
    assert not model.load_state_dict(arrays_to_state(arrays), strict=False).unexpected_keys
    parts = [load_data(SimpleNamespace(node_config={"partition-id": i}))[0].tensors for i in range(num_nodes)]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model.eval()(x), y))


def peft_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}


class Capture:
    """A ``train_fn`` that trains with :func:`train_local` and records, per node, the
    adapters it received and trained (peft's ``get_peft_model_state_dict``, numpy),
    ``num-examples`` and the kept rank; it also checks that only trainable parameters got
    a gradient and that the frozen tensors are this process's base, untouched."""

    def __init__(self, factory=FACTORY):
        self.factory = factory
        self.replies: list[tuple[dict[str, np.ndarray], int, int]] = []
        self.received: list[dict[str, np.ndarray]] = []

    def __call__(self, model, data, cfg, seed, **kw):
        self.received.append(peft_numpy(model))
        n, loss = train_local(model, data, cfg, seed, **kw)
        for name, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad == (".lora_" in name), name
        base = node_frozen.local_base(self.factory)
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in base.frozen.items())
        rank = next(t.shape[0] for k, t in state.items() if ".lora_A." in k)
        self.replies.append((peft_numpy(model), int(n), int(rank)))
        return n, loss


def fedavg_rule(replies) -> dict[str, np.ndarray]:
    """Flower's FedAvg rule, ``sum(n_i x_i) / sum(n_i)``, in float64 numpy."""
    total = sum(n for _, n, _ in replies)
    return {k: sum(n * s[k].astype(np.float64) for s, n, _ in replies) / total for k in replies[0][0]}


def peft_state_of(arrays: ArrayRecord, factory=FACTORY) -> dict[str, np.ndarray]:
    model = factory()
    model.load_state_dict(arrays_to_state(arrays), strict=False)
    return {k: v.numpy() for k, v in get_peft_model_state_dict(model).items()}


def fedavg(factory=FACTORY, num_nodes=NUM_NODES, **kw):
    kw.setdefault("fraction_evaluate", 0.0)
    return SubnetFedAvg(factory, min_available_nodes=num_nodes, min_train_nodes=num_nodes, **kw)


def heterofl(factory=FACTORY, tiers=(0.25, 0.5, 1.0), **kw):
    kw.setdefault("fraction_evaluate", 0.0)
    return HeteroFL(factory, tiers, fraction_train=1.0, min_available_nodes=len(tiers), min_train_nodes=len(tiers),
                    **kw)


# -------------------------------------------------------- (a) one rank for all = FedAvg
def test_one_rank_for_all_equals_flower_fedavg_of_peft_state_dicts():
    capture = Capture()
    strategy = fedavg()
    assert strategy.spec.lora and strategy.frozen is not None
    assert strategy.frozen.fingerprint == base_fingerprint(FACTORY())
    grid = InProcessGrid(make_client_app(FACTORY, load_data, train_fn=capture), NUM_NODES)
    result = strategy.start(grid=grid, initial_arrays=full_arrays(), num_rounds=1, train_config=train_config())

    assert set(result.arrays) == set(trainable_keys(FACTORY()))      # the adapters, nothing else
    assert len(capture.replies) == NUM_NODES and {r for _, _, r in capture.replies} == {RANK}
    assert len({n for _, n, _ in capture.replies}) == NUM_NODES       # unequal weights
    got, ref = peft_state_of(result.arrays), fedavg_rule(capture.replies)
    assert set(got) == set(ref) and len(got) == 2 * 2 * len(TARGETS)
    for key, value in got.items():
        assert np.abs(value - ref[key]).max() <= 1e-6, key
    start = peft_state_of(full_arrays())
    assert all(np.array_equal(sent[k], start[k]) for sent in capture.received for k in start)  # as sent
    assert all(not np.allclose(got[k], start[k]) for k in got)       # training happened


# ----------------------------------------------------------- (b) HeteroFL nested ranks
def test_heterofl_nested_ranks_every_reply_accepted_and_loss_falls():
    capture = Capture()
    strategy = heterofl()
    grid = InProcessGrid(make_client_app(FACTORY, load_data, train_fn=capture), NUM_NODES)
    initial = full_arrays()
    rounds = 4
    models = {}  # the global adapters after each round (0: the initial ones), peft names

    def evaluate_fn(server_round, arrays):
        models[server_round] = peft_state_of(arrays)

    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds,
                            train_config=train_config(lr=0.2), evaluate_fn=evaluate_fn)
    for r in range(1, rounds + 1):
        m = result.train_metrics_clientapp[r]
        assert m["num-replies"] == NUM_NODES and m["num-rejected"] == 0 and m["model-kept"] == 0, (r, m)
    # ranks 2, 4 and 8 of r = 8, every round
    ranks = [r for _, _, r in capture.replies]
    assert [sorted(ranks[i:i + NUM_NODES]) for i in range(0, len(ranks), NUM_NODES)] == [[2, 4, 8]] * rounds
    for i, (sent, k) in enumerate(zip(capture.received, ranks)):    # the first k ranks of the global adapters
        server = models[i // NUM_NODES]
        for key, value in sent.items():
            assert np.array_equal(value, server[key][:k] if ".lora_A." in key else server[key][:, :k]), (i, key)
    before, after = central_loss(initial), central_loss(result.arrays)
    assert after < before, (before, after)


# ---------------------------------------------------------------------------- (c) bytes
def adapter_bytes(rank: int, dim: int = 256, ffn: int = 512, depth: int = 2) -> int:
    """float32 bytes of rank-``rank`` LoRA adapters on q_proj, v_proj (dim → dim) and fc1
    (dim → ffn) of each block: ``A`` (rank, in) and ``B`` (out, rank) each."""
    per_block = rank * (dim + dim) * 2 + rank * (dim + ffn)
    return 4 * per_block * depth


def test_a_round_carries_adapter_bytes_only():
    tiers, big_rank = (0.25, 0.5, 1.0), 32
    strategy = heterofl(WIDE, tiers)
    grid = InProcessGrid(make_client_app(WIDE, load_data), len(tiers))
    result = strategy.start(grid=grid, initial_arrays=full_arrays(WIDE), num_rounds=1,
                            train_config=train_config(**{"local-steps": 1}))
    m = result.train_metrics_clientapp[1]
    assert m["num-replies"] == len(tiers)
    expected = sum(adapter_bytes(round(t * big_rank)) for t in tiers)  # ranks 8, 16, 32
    for key in ("bytes-down", "bytes-up"):
        assert abs(m[key] - expected) <= 0.01 * expected, (key, m[key], expected)
    base_bytes = sum(v.numel() * v.element_size() for k, v in WIDE().state_dict().items()
                     if k in set(frozen_keys(WIDE())))
    assert m["bytes-down"] < 0.2 * len(tiers) * base_bytes            # the base (≈ 9x the adapters) is not there


# ------------------------------------------------- (d) no base tensor in any message
class InspectingGrid(InProcessGrid):
    """An InProcessGrid that keeps every message it pushes and every reply it returns."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.down, self.up = [], []

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        self.down.extend(zip(ids, messages))
        return ids

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.up.extend(replies)
        return replies


def check_no_base(grid: InspectingGrid, spec, factory=FACTORY) -> int:
    """Assert that no message of ``grid`` holds a base tensor: no array is named after a
    frozen key, a packed slice decodes to trainable keys only (its size checked against
    the trainable layout of its mask), and the arrays of a message hold no more bytes than
    the full-rank adapters plus one ``.npy`` header per tensor. Returns the messages seen."""
    model = factory()
    frozen, trainable = set(frozen_keys(model)), trainable_keys(model)
    meta = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if k in set(trainable)}
    most = sum(4 * math.prod(shape) + 128 for shape, _ in meta.values())
    fingerprint = base_fingerprint(model)
    masks, seen = {}, 0
    for message_id, msg in grid.down:
        config = next(iter(msg.content.config_records.values()))
        assert config[BASE_FINGERPRINT] == fingerprint, msg.metadata.message_type
        if "mask" in config:
            masks[message_id] = mask_from_config(config, spec.all_groups)
    for direction, msg, mask in [("down", m, masks.get(i)) for i, m in grid.down] + [
            ("up", r, masks.get(r.metadata.reply_to_message_id)) for r in grid.up if not r.has_error()]:
        seen += 1
        size = 0
        for record in msg.content.array_records.values():
            assert not set(record) & frozen, (direction, sorted(set(record) & frozen)[:3])
            if is_packed(record):
                assert all(str(k).startswith(PACKED_PREFIX) for k in record)
                state = unpack_state(record, slice_layout(spec.slicer, mask, meta))  # sizes checked
            else:
                state = arrays_to_state(record)
            assert set(state) <= set(trainable), (direction, sorted(set(state) - set(trainable))[:3])
            size += sum(len(a.data) for a in record.values())
        assert size <= most, (direction, size, most)
    return seen


def test_every_message_in_both_directions_holds_no_base_tensor():
    strategy = heterofl(fraction_evaluate=1.0, min_evaluate_nodes=NUM_NODES)
    grid = InspectingGrid(make_client_app(FACTORY, load_data), NUM_NODES)
    result = strategy.start(grid=grid, initial_arrays=full_arrays(), num_rounds=2, train_config=train_config())
    assert result.evaluate_metrics_clientapp[2]["eval-loss"] > 0      # the nodes evaluated base + adapters
    kinds = {m.metadata.message_type for _, m in grid.down}
    assert kinds == {"train", "evaluate"}
    assert not any(r.has_error() for r in grid.up)
    # 2 rounds x 3 nodes x (train + evaluate) messages, and as many replies
    assert check_no_base(grid, strategy.spec) == 2 * 2 * NUM_NODES * 2


# ------------------------------------------------------------ (e) another base refused
def test_a_node_holding_another_base_is_refused_and_the_round_goes_on(caplog):
    capture = Capture()

    def factory_of(context):
        return NUDGED if context.node_config["partition-id"] == 2 else FACTORY

    grid = InspectingGrid(make_client_app(None, load_data, train_fn=capture, context_factory=factory_of), NUM_NODES)
    strategy = fedavg()
    with caplog.at_level(logging.WARNING, logger="fl_subnet.strategies.base"):
        result = strategy.start(grid=grid, initial_arrays=full_arrays(), num_rounds=1, train_config=train_config())
    good, bad = base_fingerprint(FACTORY()), base_fingerprint(NUDGED())
    assert good != bad
    errors = [r for r in grid.up if r.has_error()]
    assert len(errors) == 1
    reason = str(errors[0].error.reason)
    assert BASE_FINGERPRINT in reason and good[:12] in reason and bad[:12] in reason, reason
    assert any(BASE_FINGERPRINT in r.getMessage() and "rejected reply" in r.getMessage() for r in caplog.records)
    m = result.train_metrics_clientapp[1]
    assert m["num-replies"] == 2 and m["num-rejected"] == 1 and m["model-kept"] == 0
    # the round is the FedAvg of the two nodes holding the server's base
    assert len(capture.replies) == 2
    got, ref = peft_state_of(result.arrays), fedavg_rule(capture.replies)
    assert all(np.abs(got[k] - ref[k]).max() <= 1e-6 for k in got)


def test_a_reply_holding_the_base_is_rejected_naming_it(caplog):
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fl_subnet.clients import receive

    app = ClientApp()

    @app.train()
    def train(msg, context):  # Flower's template reply: the whole state_dict, base included
        model = receive(msg, FACTORY).model
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)

    strategy = fedavg(max_failed_rounds=None)
    with caplog.at_level(logging.WARNING, logger="fl_subnet.strategies.base"):
        result = strategy.start(grid=InProcessGrid(app, NUM_NODES), initial_arrays=full_arrays(), num_rounds=1,
                                train_config=train_config())
    assert result.train_metrics_clientapp[1]["num-rejected"] == NUM_NODES
    assert sum("tensors of the frozen base" in r.getMessage() for r in caplog.records) == NUM_NODES


# ------------------------------------------------ (f) full-state or adapter-only start
@pytest.mark.parametrize("make", [fedavg, heterofl], ids=["fedavg", "heterofl"])
def test_full_state_and_adapter_only_initial_arrays_give_the_same_run(make):
    runs, seen = [], []

    def evaluate_fn(server_round, arrays):  # the server-side evaluation sees the adapters only, from round 0
        seen.append((server_round, set(arrays)))

    for initial in (full_arrays(), ArrayRecord(trainable_state(FACTORY()))):
        grid = InProcessGrid(make_client_app(FACTORY, load_data), NUM_NODES)
        result = make().start(grid=grid, initial_arrays=initial, num_rounds=2, train_config=train_config(),
                              evaluate_fn=evaluate_fn)
        runs.append(arrays_to_state(result.arrays))
    trainable = set(trainable_keys(FACTORY()))
    assert seen == [(r, trainable) for r in (0, 1, 2)] * 2
    assert set(runs[0]) == set(runs[1]) == trainable
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_initial_arrays_that_are_not_the_model_are_refused():
    grid = InProcessGrid(make_client_app(FACTORY, load_data), NUM_NODES)
    peft_names = ArrayRecord({k: v.detach() for k, v in get_peft_model_state_dict(FACTORY()).items()})
    with pytest.raises(ValueError, match=r"initial_arrays:.*get_peft_model_state_dict.*missing trainable"):
        fedavg().start(grid=grid, initial_arrays=peft_names, num_rounds=1, train_config=train_config())


# ------------------------------------------------------- the node's base, once a process
def test_a_node_builds_and_fingerprints_its_base_once_per_process(monkeypatch):
    calls = []

    def counting(model):
        calls.append(type(model).__name__)
        return base_fingerprint(model)

    node_frozen.clear_bases()
    monkeypatch.setattr(node_frozen, "base_fingerprint", counting)
    strategy = fedavg(fraction_evaluate=1.0, min_evaluate_nodes=NUM_NODES)
    grid = InProcessGrid(make_client_app(FACTORY, load_data), NUM_NODES)
    result = strategy.start(grid=grid, initial_arrays=full_arrays(), num_rounds=2, train_config=train_config())
    assert result.evaluate_metrics_clientapp[2]["eval-loss"] > 0      # 3 nodes evaluated, twice
    assert len(calls) == 1                                           # 12 messages, one build and hash


def test_a_bfloat16_base_trains_float32_adapters_and_sends_only_them():
    strategy = heterofl(BF16, (0.5, 1.0))
    assert strategy.frozen.fingerprint == base_fingerprint(BF16())
    assert {v.dtype for k, v in BF16().state_dict().items() if ".lora_" not in k} == {torch.bfloat16}
    grid = InspectingGrid(make_client_app(BF16, load_data), 2)
    initial = ArrayRecord(trainable_state(BF16()))                  # numpy has no bfloat16: the adapters only
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=2, train_config=train_config(lr=0.2))
    m = result.train_metrics_clientapp[2]
    assert m["num-replies"] == 2 and m["num-rejected"] == 0
    assert {v.dtype for v in arrays_to_state(result.arrays).values()} == {torch.float32}
    assert check_no_base(grid, strategy.spec, BF16) == 2 * 2 * 2
    assert m["bytes-up"] == sum(adapter_bytes(r, dim=32, ffn=64) for r in (4, 8)) + 12 * 128  # rank 8 per tensor


# ------------------------------------------------------------- no frozen base: unchanged
def test_a_model_without_frozen_parameters_sends_every_tensor_and_no_fingerprint():
    factory = lambda: MLP(8, [16], 3)  # noqa: E731
    strategy = SubnetFedAvg(factory, min_available_nodes=2, min_train_nodes=2)
    assert strategy.frozen is None and strategy.spec.trainable is None
    torch.manual_seed(0)
    arrays = ArrayRecord(factory().state_dict())
    grid = InProcessGrid(make_client_app(factory, load_data), 2)
    for msg in strategy.configure_train(1, arrays, train_config(), grid):
        assert BASE_FINGERPRINT not in msg.content["config"] and msg.content["arrays"] is arrays


# ------------------------------------------- a frozen layer cut by a group (no LoRA)
def frozen_first_layer():
    """An MLP 8 → 16 → 3 whose first layer is frozen: its hidden units are a group that
    cuts the frozen ``1.weight`` rows and the trainable ``3.weight`` columns."""
    torch.manual_seed(0)
    model = MLP(8, [16], 3)
    model[1].requires_grad_(False)
    return model


def test_a_group_that_cuts_a_frozen_layer_cuts_it_on_the_node():
    from strategy_helpers import load_data as mlp_data
    from fl_subnet.strategies import FederatedDropout

    strategy = FederatedDropout(frozen_first_layer, 0.5, local_steps=2, num_train_nodes=NUM_NODES,
                                fraction_evaluate=1.0, min_evaluate_nodes=NUM_NODES)
    assert not strategy.spec.lora and strategy.spec.trainable == ("3.weight", "3.bias")
    grid = InspectingGrid(make_client_app(frozen_first_layer, mlp_data), NUM_NODES)
    initial = ArrayRecord(frozen_first_layer().state_dict())
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=2, train_config=train_config(lr=0.1))
    for r in (1, 2):
        m = result.train_metrics_clientapp[r]
        assert m["num-replies"] == NUM_NODES and m["num-rejected"] == 0, m
    assert not any(r.has_error() for r in grid.up)
    assert check_no_base(grid, strategy.spec, frozen_first_layer) == 2 * 2 * NUM_NODES * 2
    new, start = arrays_to_state(result.arrays), arrays_to_state(initial)
    assert set(new) == {"3.weight", "3.bias"} and not torch.equal(new["3.weight"], start["3.weight"])


# ------------------------------------------------------------ docs/lora.md, "Running it"
def test_docs_running_it_app_runs(tmp_path, monkeypatch):
    import pathlib
    import re

    from flwr.app import Context, RecordDict

    docs = pathlib.Path(__file__).resolve().parents[1] / "docs" / "lora.md"
    text = docs.read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "server_app" in b)
    namespace: dict = {}
    exec(compile(block, f"{docs.name} Running it", "exec"), namespace)  # noqa: S102
    monkeypatch.chdir(tmp_path)
    grid = InspectingGrid(namespace["client_app"], NUM_NODES)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={"num-server-rounds": 2})
    namespace["main"](grid, context)
    saved = torch.load(tmp_path / "adapters.pt")
    model = namespace["classifier"]()
    assert set(saved) == set(trainable_keys(model))
    assert not any(r.has_error() for r in grid.up) and len(grid.up) == 2 * NUM_NODES
    assert not model.load_state_dict(saved, strict=False).unexpected_keys
