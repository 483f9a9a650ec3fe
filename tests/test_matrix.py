"""End-to-end option matrix: every protocol and every option the README advertises, run
through ``strategy.start`` on the in-process grid (Flower's protobuf serde both ways, the
real ClientApp), asserting that the honest replies are accepted and the model learns.

Why: a speed-up once changed one aggregator's ``add`` signature and the robust rules then
rejected every reply, unseen, because no test ran a strategy with them end to end. Unit
tests of an aggregator or a sampler cannot catch such a break between the pieces; a cell
here does, since each one counts the replies the strategy accepted.

Axes (the README's protocol table, "Server optimizers", "Rogue nodes", "BatchNorm"):

* protocol: SubnetFedAvg, Dropout, MultiSampleDropout, FederatedDropout (bernoulli and
  even sampling), IST, HeteroFL, FedRolex, FjORD, RandomPath (a residual model),
  CoreAlternation; and every registered protocol (``fl_subnet.strategies.PROTOCOLS``)
  built by ``build_strategy`` from a run config, as the App builds it (``<name>@run-config``),
  so a new protocol module gets its cell without an edit here;
* aggregation: mean, median, trimmed-mean, centered-clip, bucketing, geometric-median, multi-krum;
* defences: max_update_ratio, max_ratio_to_median, screen reject / clip, max_num_examples, min_cosine;
* BatchNorm policy on a model with BatchNorm: averaged, static with calibration_batches;
* server optimizer: none, MaskedFedAvgM / FedAdam / FedYogi / FedAdagrad, and the
  composition ``class X(FederatedDropout, FedAdam)``.

Not a full cross product: every protocol with the default options, then every other option
value crossed with at least two protocols, one full-mask-like (SubnetFedAvg, the nested
capacity protocols, RandomPath's full width, ...) and one sparse (IST, the dropouts);
``test_matrix_covers_every_option`` keeps it so. Besides: BatchNorm without running
statistics (``mlp-bn``), a transformer, and the README's other knobs once each.

Each cell asserts, for every round: ``num-replies`` equals the number of nodes the round
sampled (train messages counted at the grid) and ``num-rejected`` is 0 (``num-clipped`` is
0 too, except in the cells whose defence clips honest replies by design, where it must be
positive); the server optimizer in use is the one asked for; the final arrays are finite;
and the central loss on the union of the nodes' data falls by at least ``LEARN_MARGIN``
(eval mode: the deployed model, BatchNorm on its running statistics). Cells with a defence
that screens nothing also check the README's "an honest run is bit-identical".

A cell that fails because of a bug gets ``marks=pytest.mark.xfail(strict=True, reason=...)``
in its ``cell(...)`` line, never a weaker assertion (one known now: ``BN_AVERAGED_STATS_YOGI``).
Stepping BatchNorm's running statistics with the server optimizer (as Flower's FedAdam
does) turns the ``bn-averaged-server-*`` cells red: the deployed eval-mode model diverges.
Removing the ``checked`` passthrough of ``_RobustAggregator.add`` (the original bug) turns
all 24 median / trimmed-mean cells red and no other.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi
from torch.utils.data import TensorDataset

import strategy_helpers as mlp_problem
from fl_subnet.clients import make_client_app
from fl_subnet.core.paths import progressive_schedule
from fl_subnet.core.server_opt import MaskedFedAdagrad, MaskedFedAdam, MaskedFedAvgM, MaskedFedYogi
from fl_subnet.core.slicing import torch_threads
from fl_subnet.experiments.config import RunConfig
from fl_subnet.experiments.inprocess_grid import InProcessGrid
from fl_subnet.models import CNNBN, MLP, MHATransformer, PreActResNet
from fl_subnet.strategies import PROTOCOLS as REGISTERED
from fl_subnet.strategies import build_strategy
from fl_subnet.strategies.defences import Defences
from fl_subnet.strategies import (IST, CoreAlternation, Dropout, FederatedDropout, FedRolex, FjORD, HeteroFL,
                                  MultiSampleDropout, RandomPath, SubnetFedAvg)
from fl_subnet.wire import arrays_to_state

NUM_NODES = 4
# lr 0.3: every passing cell's central loss falls by >= 0.11, twice the margin (at 0.1 several fell by 0.05-0.07)
TRAIN = {"local-steps": 3, "lr": 0.3, "batch-size": 8, "loss": "cross-entropy", "seed": 1}
LEARN_MARGIN = 0.05  # the central cross-entropy falls by more (it starts at 1.09-1.18, the transformer's at 0.73)


# ------------------------------------------------------------------------ the README's composition
class DropoutAdam(FederatedDropout, FedAdam):
    """README, "Server optimizers": fl-subnet's strategy first, Flower's second."""


class ISTYogi(IST, FedYogi):
    pass


class FedAvgMomentum(SubnetFedAvg, FedAvgM):
    pass


class HeteroFLAdagrad(HeteroFL, FedAdagrad):
    pass


class RandomPathMomentum(RandomPath, FedAvgM):
    pass


# ------------------------------------------------------------------------ models and data
IMAGE = (1, 8, 8)
IMAGE_CLASSES = 3


def cnn_bn():
    """CNNBN: conv1-3 channel groups with BatchNorm (weight, bias, running statistics)."""
    return CNNBN(1, IMAGE_CLASSES, width=4)


def resnet():
    """One stage of 4 pre-activation blocks, all with an identity shortcut: B = 4 depth
    blocks (BatchNorm in every block)."""
    return PreActResNet(1, IMAGE_CLASSES, widths=(6,), blocks_per_stage=4)


def load_images(context):
    """Node ``pid``'s images: class-dependent mean intensity plus noise, 16 + 4·pid rows."""
    pid = int(context.node_config["partition-id"])
    g = torch.Generator().manual_seed(200 + pid)
    n = 16 + 4 * pid
    y = torch.randint(0, IMAGE_CLASSES, (n,), generator=g)
    x = 0.6 * torch.randn(n, *IMAGE, generator=g) + 0.5 * (y.float() - 1.0).view(n, 1, 1, 1)
    return TensorDataset(x, y), TensorDataset(x[:8], y[:8])


def mlp_bn():
    """IST's own model: ``Linear → BatchNorm1d (no running statistics) → ReLU``."""
    return MLP(mlp_problem.D_IN, mlp_problem.HIDDEN, mlp_problem.D_OUT, norm=True)


SEQ_LEN, VOCAB = 8, 16


def transformer():
    """Pre-LN MHA encoder: 2 heads of width 8 and 16 FFN units per block, 2 blocks
    (4 depth blocks: each attention and FFN branch)."""
    return MHATransformer(VOCAB, SEQ_LEN, dim=16, num_heads=2, ffn=16, depth=2, num_classes=2)


def load_sequences(context):
    """Node ``pid``'s token sequences, labelled 1 iff more than half the tokens are high."""
    pid = int(context.node_config["partition-id"])
    g = torch.Generator().manual_seed(300 + pid)
    n = 24 + 4 * pid
    x = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=g)
    y = (2 * (x >= VOCAB // 2).sum(1) > SEQ_LEN).long()
    return TensorDataset(x, y), TensorDataset(x[:8], y[:8])


@dataclass(frozen=True)
class Problem:
    factory: object
    load_data: object
    example_input: torch.Tensor | None

    def union(self, num_nodes=NUM_NODES):
        parts = [self.load_data(SimpleNamespace(node_config={"partition-id": i}))[0].tensors
                 for i in range(num_nodes)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def central_loss(self, state: dict) -> float:
        """Cross-entropy of the full model ``state`` (eval mode: BatchNorm on its running
        statistics, as deployed) on every node's training data."""
        model = self.factory()
        model.load_state_dict(state)
        model.eval()
        x, y = self.union()
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))


PROBLEMS = {
    "mlp": Problem(mlp_problem.factory, mlp_problem.load_data, None),
    "cnn-bn": Problem(cnn_bn, load_images, torch.zeros(1, *IMAGE)),
    "resnet": Problem(resnet, load_images, torch.zeros(1, *IMAGE)),
    "mlp-bn": Problem(mlp_bn, mlp_problem.load_data, None),
    "transformer": Problem(transformer, load_sequences, torch.zeros(1, SEQ_LEN, dtype=torch.long)),
}


# ------------------------------------------------------------------------ protocols
@dataclass(frozen=True)
class Protocol:
    build: object  # build(factory, **options) -> strategy
    sampled: int = NUM_NODES  # nodes per round
    rounds: int = 3
    optimizer: str | None = None  # the masked server optimizer a composed class must end up with


PROTOCOLS = {
    "fedavg": Protocol(lambda f, **kw: SubnetFedAvg(f, **kw)),
    # one node, one dropout step per round (τ = 1 is the protocol): more rounds instead
    "dropout": Protocol(lambda f, **kw: Dropout(f, 0.75, **kw), sampled=1, rounds=8),
    "multisample-dropout": Protocol(lambda f, **kw: MultiSampleDropout(f, 0.75, 3, local_steps=3, **kw),
                                     sampled=3),
    "federated-dropout": Protocol(lambda f, **kw: FederatedDropout(f, 0.75, **kw)),
    "federated-dropout-even": Protocol(lambda f, **kw: FederatedDropout(f, 0.75, sampling="even", **kw)),
    # IST's nodes train at an lr scaled down with their sub-network's output scale: τ = 5
    "ist": Protocol(lambda f, **kw: IST(f, 2, local_steps=5, **kw)),
    "heterofl": Protocol(lambda f, **kw: HeteroFL(f, capacity_tiers=(0.5, 1.0), **kw)),
    "fedrolex": Protocol(lambda f, **kw: FedRolex(f, capacity_tiers=(0.5, 1.0), **kw)),
    "fjord": Protocol(lambda f, **kw: FjORD(f, capacity_tiers=(0.5, 1.0), **kw)),
    "random-path": Protocol(lambda f, path_length=3, **kw: RandomPath(f, path_length, **kw)),  # 3 of 4 blocks
    "core-alternation": Protocol(lambda f, **kw: CoreAlternation(f, 0.5, 2, **kw)),  # core, full, core
    # the README's composition: protocol first, Flower's optimizer second
    "federated-dropout+FedAdam": Protocol(lambda f, **kw: DropoutAdam(f, keep_prob=0.75, eta=0.05, beta_1=0.9, **kw),
                                    optimizer="MaskedFedAdam"),
    "ist+FedYogi": Protocol(lambda f, **kw: ISTYogi(f, 2, local_steps=5, eta=0.05, beta_1=0.9, **kw),
                            optimizer="MaskedFedYogi"),
    "fedavg+FedAvgM": Protocol(lambda f, **kw: FedAvgMomentum(f, server_learning_rate=1.0, server_momentum=0.5,
                                                               **kw), optimizer="MaskedFedAvgM"),
    "heterofl+FedAdagrad": Protocol(lambda f, **kw: HeteroFLAdagrad(f, capacity_tiers=(0.5, 1.0), eta=0.05, **kw),
                                    optimizer="MaskedFedAdagrad"),
    "random-path+FedAvgM": Protocol(lambda f, **kw: RandomPathMomentum(f, 3, server_momentum=0.5, **kw),
                                    optimizer="MaskedFedAvgM"),
}
FULL_LIKE = {"fedavg", "heterofl", "fedrolex", "fjord", "random-path", "core-alternation", "fedavg+FedAvgM",
             "heterofl+FedAdagrad", "random-path+FedAvgM"}
SPARSE = {"dropout", "multisample-dropout", "federated-dropout", "federated-dropout-even", "ist", "federated-dropout+FedAdam",
          "ist+FedYogi"}
# RandomPath needs depth blocks
DEFAULT_PROBLEM = {"random-path": "resnet", "random-path+FedAvgM": "resnet", "random-path@run-config": "resnet"}


# ------------------------------------------------------------------------ every registered protocol
# Built by build_strategy from a run config, as the App builds it: a protocol registered in a
# new module (strategies.registry) gets its end-to-end cell here without editing this file.
RUN_CONFIG = dict(num_nodes=NUM_NODES, num_server_rounds=3, keep_prob=0.75, num_subnets=2,
                  capacity_tiers="0.5,1.0", path_length="0.75", local_steps=5, seed=1)
RUN_CONFIG_OVER = {"dropout": dict(num_server_rounds=8),  # one node a round: more rounds
                   "random-path": dict(model="resnet", blocks_per_stage=2)}  # validation only: the cell's model


def registered(name: str) -> Protocol:
    cfg = RunConfig(strategy=name, **{**RUN_CONFIG, **RUN_CONFIG_OVER.get(name, {})})

    def build(f, fraction_evaluate=0.0, **kw):  # the run config's fraction-evaluate is 0 already
        return build_strategy(cfg, f, **kw)

    problem = PROBLEMS[DEFAULT_PROBLEM.get(name, "mlp")]
    sampled = build(problem.factory, example_input=problem.example_input).num_train_nodes or NUM_NODES
    return Protocol(build, sampled=sampled, rounds=cfg.num_server_rounds)


RUN_CONFIG_CELLS = {f"{name}@run-config": registered(name) for name in REGISTERED}
PROTOCOLS.update(RUN_CONFIG_CELLS)


# ------------------------------------------------------------------------ cells
@dataclass(frozen=True)
class Cell:
    protocol: str
    problem: str
    options: dict = field(default_factory=dict)
    rounds: int = 3
    sampled: int = NUM_NODES
    clips: bool = False  # the defence clips honest replies by design: num-clipped > 0 each round
    calibrate: bool = False  # batchnorm="static": the union of the nodes' inputs as calibration_batches
    grid: dict = field(default_factory=dict)  # InProcessGrid options (node_configs)
    evaluate_fn: bool = False  # Flower's central evaluate_fn hook, called every round
    # README: "With the defences on, an honest run is bit-identical (nothing is screened)":
    # the final model equals the same cell's without the defence options
    bit_identical: bool = False


SERVER_OPTS = {
    "FedAvgM": lambda: MaskedFedAvgM(server_learning_rate=1.0, server_momentum=0.5),
    # FedEcover's server step size (FederatedDropout's docstring), with sampling="even"
    "FedAvgM-FedEcover": lambda: MaskedFedAvgM(server_learning_rate=1.5, server_momentum=0.0),
    "FedAdam": lambda: MaskedFedAdam(eta=0.05),
    "FedAdam-flower-defaults": lambda: MaskedFedAdam(),  # η = 0.1, β₁ = 0.9, β₂ = 0.99, τ = 1e-3
    "FedYogi": lambda: MaskedFedYogi(eta=0.05),
    "FedAdagrad": lambda: MaskedFedAdagrad(eta=0.05),
}

SCREEN_REJECT = dict(max_update_ratio=1.0, max_ratio_to_median=3.0, screen="reject")  # honest: nothing screened
SCREEN_CLIP_MEDIAN = dict(max_ratio_to_median=1.0, screen="clip")  # the replies above the round's median: clipped
SCREEN_CLIP_ABS = dict(max_update_ratio=0.08, screen="clip")  # below the honest ratios: every reply clipped
CAP = dict(max_num_examples=30)  # the MLP problem's partitions have 20, 25, 30, 35 examples: one capped
CAP_LARGEST = dict(max_num_examples=35)  # the README's advice: the largest partition (nothing capped)
DEFENCES = ("max_update_ratio", "max_ratio_to_median", "screen", "max_num_examples", "min_cosine")

CELLS: list = []


def cell(tag, protocol, *, problem=None, rounds=None, sampled=None, marks=(), **kw):
    """Add a cell, test id ``<protocol>-<problem>-<tag>``; ``marks``: an xfail for a known bug."""
    proto = PROTOCOLS[protocol]
    problem = problem or DEFAULT_PROBLEM.get(protocol, "mlp")
    c = Cell(protocol, problem, rounds=rounds or proto.rounds, sampled=sampled or proto.sampled, **kw)
    CELLS.append(pytest.param(c, id=f"{protocol}-{problem}-{tag}", marks=marks))


# 1. every protocol with the default options (mean, no defence, no server optimizer)
for name in PROTOCOLS:
    cell("default", name)

# 2. aggregation rules
for rule in ("median", "trimmed-mean"):
    for name in ("fedavg", "federated-dropout", "ist", "heterofl", "fjord", "random-path"):
        cell(rule, name, options=dict(aggregation=rule))
cell("median", "dropout", options=dict(aggregation="median"))  # one holder per entry
cell("median", "federated-dropout-even", options=dict(aggregation="median"))
cell("median", "core-alternation", options=dict(aggregation="median"))
cell("median", "federated-dropout+FedAdam", options=dict(aggregation="median"))
cell("trimmed-mean", "fedrolex", options=dict(aggregation="trimmed-mean"))
cell("trimmed-mean-0.4", "multisample-dropout", options=dict(aggregation="trimmed-mean", trim_fraction=0.4))
# the rules that look at whole updates: one full-like and one sparse protocol each; IST for
# Multi-Krum, the rule docs/attacks.md measures best for it
for rule in ("centered-clip", "bucketing", "geometric-median", "multi-krum"):
    for name in ("fedavg", "federated-dropout"):
        cell(rule, name, options=dict(aggregation=rule))
cell("multi-krum", "ist", options=dict(aggregation="multi-krum"))

# 3. defences (max_ratio_to_median needs >= 3 replies: not with Dropout's one node)
for name in ("fedavg", "federated-dropout", "ist", "fedrolex", "core-alternation", "random-path"):
    cell("screen-reject", name, options=SCREEN_REJECT, bit_identical=True)
    cell("screen-clip-median", name, options=SCREEN_CLIP_MEDIAN, clips=True)
for name in ("fedavg", "ist", "random-path"):
    cell("screen-clip-abs", name, options=SCREEN_CLIP_ABS, clips=True)
cell("screen-reject", "dropout", options=dict(max_update_ratio=1.0, screen="reject"), bit_identical=True)
cell("screen-clip-median", "ist+FedYogi", options=SCREEN_CLIP_MEDIAN, clips=True)
for name in ("fedavg", "federated-dropout", "ist", "fjord", "multisample-dropout"):
    cell("max-num-examples", name, options=CAP)
for name in ("fedavg", "federated-dropout"):  # direction screening: honest updates point with the centre
    cell("min-cosine", name, options=dict(min_cosine=0.0, aggregation="centered-clip"))
for name in ("fedavg", "ist"):
    cell("max-num-examples-largest", name, options=dict(**SCREEN_REJECT, **CAP_LARGEST), bit_identical=True)
# the robust rules are unweighted: capping a weight changes nothing there
cell("all-defences-median", "federated-dropout", options=dict(aggregation="median", **SCREEN_REJECT, **CAP),
     bit_identical=True)
cell("all-defences-trimmed", "fedavg", options=dict(aggregation="trimmed-mean", **SCREEN_CLIP_MEDIAN, **CAP),
     clips=True)
cell("median-screen-clip-abs", "ist", options=dict(aggregation="median", **SCREEN_CLIP_ABS), clips=True)

# 4. BatchNorm policy on a model with BatchNorm (random-path: the ResNet's, averaged by default above)
for name in ("fedavg", "federated-dropout", "ist", "heterofl", "core-alternation"):
    cell("bn-averaged", name, problem="cnn-bn")
    cell("bn-static", name, problem="cnn-bn", options=dict(batchnorm="static"), calibrate=True)
cell("bn-static", "random-path", options=dict(batchnorm="static"), calibrate=True)
cell("bn-static-median", "federated-dropout", problem="cnn-bn", options=dict(batchnorm="static", aggregation="median"),
     calibrate=True)
cell("bn-averaged-trimmed-mean", "ist", problem="cnn-bn", options=dict(aggregation="trimmed-mean"))
cell("bn-per-width", "fjord", problem="cnn-bn", options=dict(bn="per-width"))  # FjORD's ODBatchNorm2d
cell("bn-per-width-median", "fjord", problem="cnn-bn", options=dict(bn="per-width", aggregation="median"))
cell("bn-static-FedAdam", "federated-dropout", problem="cnn-bn", options=dict(server_optimizer="FedAdam",
                                                                         batchnorm="static"), calibrate=True)

# BatchNorm without running statistics (IST's model), and screening with BatchNorm's integer buffers
for name in ("ist", "federated-dropout"):
    cell("default", name, problem="mlp-bn")
    cell("bn-static", name, problem="mlp-bn", options=dict(batchnorm="static"), calibrate=True)
cell("bn-averaged-screen-clip-median", "federated-dropout", problem="cnn-bn", options=SCREEN_CLIP_MEDIAN, clips=True)
cell("bn-static-screen-reject", "ist", problem="cnn-bn", options=dict(batchnorm="static", **SCREEN_REJECT),
     calibrate=True, bit_identical=True)

# 5. server optimizers (argument) and the composition (protocols above)
for opt in ("FedAvgM", "FedAdam", "FedYogi", "FedAdagrad"):
    for name in ("fedavg", "federated-dropout", "ist"):
        cell(f"server-{opt}", name, options=dict(server_optimizer=opt))
cell("server-FedAdam", "heterofl", options=dict(server_optimizer="FedAdam"))
cell("server-FedYogi", "fjord", options=dict(server_optimizer="FedYogi"))
cell("server-FedAvgM", "random-path", options=dict(server_optimizer="FedAvgM"))
cell("server-FedAdagrad", "core-alternation", options=dict(server_optimizer="FedAdagrad"))
cell("server-FedAvgM-FedEcover", "federated-dropout-even", options=dict(server_optimizer="FedAvgM-FedEcover"))

# BatchNorm "averaged" + a server optimizer: the running statistics take the nodes' average, only the
# parameters are stepped (stepped statistics made the eval-mode model diverge: 1.11 -> 4.6 / 1.13 -> 10.1 /
# 1.13 -> 163; now 1.11 -> 0.92, 1.13 -> 0.31, and the known limitation below); "static" is the contrast
BN_AVERAGED_STATS_YOGI = pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "batchnorm='averaged' with FedYogi (eta 0.05) on the ResNet: the running statistics are the nodes' "
    "average, which describe the nodes' averaged model, but Yogi's step of about eta on every weight moves "
    "the weights far from that model: per round the plain aggregate (weights and statistics) scores "
    "1.04 0.78 0.59 0.53 0.60 0.68, the stepped weights with the averaged statistics 0.95 0.73 1.21 4.04 "
    "7.51 2.78, while the same weights score 0.31 in train mode or with recalibrated statistics "
    "(batchnorm='static' learns: 0.29)"))
for name, problem, opt, rounds, marks in (("fedavg", "cnn-bn", "FedAdam-flower-defaults", 8, ()),
                                          ("federated-dropout", "resnet", "FedAdam-flower-defaults", 8, ()),
                                          ("random-path", "resnet", "FedYogi", 6, BN_AVERAGED_STATS_YOGI)):
    cell(f"bn-averaged-server-{opt}", name, problem=problem, rounds=rounds, options=dict(server_optimizer=opt),
         marks=marks)
    cell(f"bn-static-server-{opt}", name, problem=problem, rounds=rounds, calibrate=True,
         options=dict(server_optimizer=opt, batchnorm="static"))

# 6. a transformer: heads and FFN units as unit groups, attention/FFN branches as depth blocks
for name in ("fedavg", "federated-dropout", "ist", "heterofl", "random-path"):
    cell("default", name, problem="transformer")
cell("median", "random-path", problem="transformer", options=dict(aggregation="median"))

# 7. other advertised knobs, once each
cell("fraction-train-0.5", "fedavg", options=dict(fraction_train=0.5), sampled=2)
cell("fraction-train-0.5", "federated-dropout", options=dict(fraction_train=0.5), sampled=2)
cell("federated-evaluation", "federated-dropout", options=dict(fraction_evaluate=1.0))
cell("unweighted", "federated-dropout", options=dict(weighted=False))
cell("no-scale", "federated-dropout", options=dict(scale=False))
cell("loss-average", "multisample-dropout", options=dict(loss_average=True))
for scaling in ("none", "p", "eval"):
    cell(f"scaling-{scaling}", "ist", options=dict(scaling=scaling))
cell("partition-iid", "ist", options=dict(partition_mode="iid"))
cell("declared-capacities", "heterofl", options=dict(order_by_partition=True),  # the query learns them
     grid=dict(node_configs=[{"partition-id": i, "num-partitions": NUM_NODES, "capacity": c}
                             for i, c in enumerate((0.25, 0.5, 0.75, 1.0))]))
cell("core-scale", "core-alternation", options=dict(scale=True))
cell("num-train-nodes-2", "ist", options=dict(num_train_nodes=2), sampled=2)  # classic IST: exactly p nodes
cell("federated-evaluation", "ist", options=dict(scaling="eval", fraction_evaluate=1.0))  # the deployed model
cell("federated-evaluation-bn-static", "heterofl", problem="cnn-bn",
     options=dict(batchnorm="static", fraction_evaluate=1.0), calibrate=True)
cell("evaluate-fn", "federated-dropout", evaluate_fn=True)
cell("evaluate-fn", "random-path", evaluate_fn=True)
cell("schedule", "random-path", options=dict(path_length=None, schedule=progressive_schedule([0.5, 0.75, 1.0], 3)))
cell("partition", "random-path", options=dict(path_length=None, mode="partition"))


# ------------------------------------------------------------------------ running a cell
class CountingGrid(InProcessGrid):
    """The in-process grid, counting the train messages of each round as pushed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_pushed: list[int] = []

    def push_messages(self, messages):
        messages = list(messages)
        train = sum(m.metadata.message_type == MessageType.TRAIN for m in messages)
        if train:
            self.train_pushed.append(train)
        return super().push_messages(messages)


def _train_config(**over):
    cfg = dict(TRAIN)
    cfg.update(over)
    return ConfigRecord(cfg)


def run_cell(c: Cell):
    problem = PROBLEMS[c.problem]
    options = dict(c.options)
    options.setdefault("fraction_evaluate", 0.0)
    if "server_optimizer" in options:
        options["server_optimizer"] = SERVER_OPTS[options["server_optimizer"]]()
    if any(k in options for k in DEFENCES):  # the cells name the defences' fields; the strategy takes one object
        options["defences"] = Defences(**{k: options.pop(k) for k in DEFENCES if k in options})
    if c.calibrate:
        x, _ = problem.union()
        options["calibration_batches"] = list(x.split(32))
    random.seed(0)  # Flower's node sampling
    torch.manual_seed(0)
    strategy = PROTOCOLS[c.protocol].build(problem.factory, example_input=problem.example_input, **options)
    torch.manual_seed(0)
    init = ArrayRecord(problem.factory().state_dict())
    grid = CountingGrid(make_client_app(problem.factory, problem.load_data), NUM_NODES, **c.grid)
    extra = {}
    if c.evaluate_fn:
        grid.central = []

        def evaluate_fn(server_round, arrays):
            loss = problem.central_loss(strategy.deployed_state(arrays_to_state(arrays)))
            grid.central.append((server_round, loss))
            return MetricRecord({"central-loss": loss})

        extra["evaluate_fn"] = evaluate_fn
    result = strategy.start(grid=grid, initial_arrays=init, num_rounds=c.rounds, train_config=_train_config(),
                            **extra)
    return strategy, grid, init, result


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models: a second intra-op thread only adds contention on a busy 2-core machine
    (5-20x slower here)."""
    with torch_threads(1):
        yield


@pytest.mark.parametrize("c", CELLS)
def test_cell_accepts_every_honest_reply_and_learns(c: Cell):
    problem = PROBLEMS[c.problem]
    strategy, grid, init, result = run_cell(c)
    assert grid.train_pushed == [c.sampled] * c.rounds, grid.train_pushed
    for rnd in range(1, c.rounds + 1):
        m = result.train_metrics_clientapp[rnd]
        assert m["num-replies"] == c.sampled and m["num-rejected"] == 0, (rnd, dict(m))
        if c.clips:
            assert m["num-clipped"] >= 1, (rnd, dict(m))  # the defence acted: its path ran
        else:
            assert m["num-clipped"] == 0, (rnd, dict(m))
    opt = c.options.get("server_optimizer")  # the server optimizer in use: the one asked for
    want = type(SERVER_OPTS[opt]()).__name__ if opt else PROTOCOLS[c.protocol].optimizer
    assert type(strategy.server_optimizer).__name__ == want if want else strategy.server_optimizer is None
    if c.evaluate_fn:  # round 0 (the initial model), then after every round
        assert [r for r, _ in grid.central] == list(range(c.rounds + 1)), grid.central
        assert result.evaluate_metrics_serverapp[c.rounds]["central-loss"] == grid.central[-1][1]
    if c.options.get("fraction_evaluate"):
        for rnd in range(1, c.rounds + 1):
            m = result.evaluate_metrics_clientapp[rnd]
            assert math.isfinite(m["eval-loss"]) and 0.0 <= m["eval-acc"] <= 1.0, (rnd, dict(m))
    declared = [cfg["capacity"] for cfg in c.grid.get("node_configs", []) if "capacity" in cfg]
    if declared:
        assert sorted(strategy.declared_capacities.values()) == sorted(declared)
    state = arrays_to_state(result.arrays)
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    # the model as deployed (IST scaling="eval" folds 1/p into it; else the state itself)
    before = problem.central_loss(strategy.deployed_state(arrays_to_state(init)))
    after = problem.central_loss(strategy.deployed_state(state))
    assert math.isfinite(after) and after < before - LEARN_MARGIN, (before, after)
    if c.bit_identical:
        plain = replace(c, options={k: v for k, v in c.options.items() if k not in DEFENCES})
        reference = arrays_to_state(run_cell(plain)[3].arrays)
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in state), [
            k for k in state if not torch.equal(state[k], reference[k])]


def test_matrix_covers_every_option():
    """Every protocol alone, and every other option value with >= 2 protocols, one of
    them full-mask-like and one sparse."""
    cells = [p.values[0] for p in CELLS]
    assert len({p.id for p in CELLS}) == len(CELLS)  # one named test id per cell
    assert set(PROTOCOLS) == FULL_LIKE | SPARSE | set(RUN_CONFIG_CELLS)
    assert {n.split('@')[0] for n in RUN_CONFIG_CELLS} == set(REGISTERED)
    assert {c.protocol for c in cells if not c.options and c.problem == DEFAULT_PROBLEM.get(c.protocol, "mlp")
            } == set(PROTOCOLS)

    def covered(pred):
        names = {c.protocol for c in cells if pred(c)}
        return bool(names & FULL_LIKE and names & SPARSE)

    for rule in ("median", "trimmed-mean", "centered-clip", "bucketing", "geometric-median", "multi-krum"):
        assert covered(lambda c: c.options.get("aggregation") == rule), rule
    for key in ("max_update_ratio", "max_ratio_to_median", "max_num_examples", "min_cosine"):
        assert covered(lambda c: key in c.options), key
    for mode in ("reject", "clip"):
        assert covered(lambda c: c.options.get("screen") == mode), mode
    for policy in ("averaged", "static"):
        assert covered(lambda c: c.problem in ("cnn-bn", "resnet")
                       and c.options.get("batchnorm", "averaged") == policy), policy
    for opt in ("FedAvgM", "FedAdam", "FedYogi", "FedAdagrad"):
        assert covered(lambda c: c.options.get("server_optimizer") == opt), opt
    composed = {name for name, proto in PROTOCOLS.items() if "+" in name and proto.optimizer}
    assert len(composed & FULL_LIKE) >= 2 and len(composed & SPARSE) >= 2, composed


def test_central_loss_is_strategy_helpers_one():
    """The MLP cells' loss is strategy_helpers.central_loss (the image and sequence cells'
    is the same computation on their own data)."""
    arrays = mlp_problem.initial_arrays(seed=3)
    assert PROBLEMS["mlp"].central_loss(arrays_to_state(arrays)) == mlp_problem.central_loss(arrays, NUM_NODES)
