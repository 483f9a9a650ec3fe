"""Adaptive rogue nodes against fl-subnet's defences, on digits (docs/attacks.md).

Norm screening alone does not stop an attacker who reads the run config. Setting:
digits, the ClientApp data of ``tests/test_poisoning.py`` (iid partitions of 10, fixed),
``MLP(64, [64], 10)``, lr 0.1, 10 local steps, batch 32, 15 rounds, all 10 nodes sampled
every round, through the in-process grid; protocols FedAvg (``SubnetFedAvg``),
federated dropout (``FederatedDropout``, ξ = 0.5) and IST with 5 or 3 sub-networks over
the 10 nodes (``IST``; p = 5: every part has 2 holders, p = 3: 3 or 4).

Nodes 0 and 1 collude. They read the run config (``max-ratio-to-median`` = 3,
``max-num-examples``), train honestly, then send an update of ratio
``TARGET_FRACTION × 3 = 1.8`` times their own honest ratio (0.6 of the screening bound
when the honest median is like theirs, so screening never rejects it) and claim
``num-examples`` at the cap (the largest partition):

* ``ipm``: inner-product manipulation (Xie, Koyejo & Gupta, UAI 2020) with the
  colluders' mean standing in for the honest mean: ``Δ = −c · mean_q Δ_q`` over the
  colluders ``q``, each ``Δ_q`` the honest update of colluder ``q``'s data on the
  received slice, trained with the batch-order seed node ``q`` itself uses that round
  (so under FedAvg both rogues send the same update); ``c`` sets ``‖Δ‖`` to 1.8 × the
  mean of ``‖Δ_q‖``;
* ``sign-flip``: ``Δ = −1.8 · Δ_own``;
* ``label-flip``: label flipping (Fang et al., USENIX Security 2020; Tolpegin et al.,
  ESORICS 2020), scaled: the rogue trains the received slice on its own data with every
  label ``y`` replaced by ``9 − y`` (same batch order), and sends that update scaled to
  1.8 × the norm of its honest update.

Defences (:data:`DEFENCES`): none; screening (``max-ratio-to-median`` 3,
``max-num-examples`` = the largest partition); screening + ``centered-clip``; screening +
``bucketing``; screening + coordinate-wise ``median``; ``centered-clip`` alone (the run
config's default); ``screening-clip`` (``screen = "clip"``: an update over the bound is
scaled down to it, the clipping to the round's median norm). For each protocol × defence the
final test accuracy of the honest run (10 nodes), of each attack, and of the run in which
nodes 0 and 1 are absent (not connected; the other 8 keep their partitions: the best a defence can do),
over ``--seeds`` (the strategy's seed and the train config's ``seed``; the initial model
and the partition stay fixed).

Output: one JSON line per protocol × defence × scenario (:mod:`bench.common`'s shape:
``metric`` "accuracy", ``median`` over seeds, plus ``mean``, ``sd``, ``values``, the
rounds' ``num-rejected`` and, for attacks, ``bound_use``: the largest rogue ratio over
the round's screening bound, 3 × the median of the 10 replies' ratios); ``--out`` writes
them into one JSON file, ``--write-docs`` renders its table into docs/attacks.md between
``<!-- attacks:start -->`` and ``<!-- attacks:end -->`` (:func:`render_table`).

Usage::

    python bench/attacks.py --quick                 # 1 seed, 3 rounds, FedAvg only
    python bench/attacks.py --out docs/attacks.json --write-docs
    python bench/attacks.py --render-only --out docs/attacks.json --write-docs
    python bench/attacks.py --defences centered-clip --merge --out docs/attacks.json --write-docs
    python bench/attacks.py --defences screening-clip --merge --out docs/attacks.json --write-docs
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import between, emit, machine, record, replace_between, run_line  # noqa: E402
from fl_subnet.clients import make_client_app  # noqa: E402
from fl_subnet.clients.train import evaluate_model, train_local  # noqa: E402
from fl_subnet.core.robust import update_ratio  # noqa: E402
from fl_subnet.experiments.data import load_centralized_test, load_partition  # noqa: E402
from fl_subnet.experiments.inprocess_grid import InProcessGrid  # noqa: E402
from fl_subnet.models import MLP  # noqa: E402
from fl_subnet.strategies import IST, FederatedDropout, SubnetFedAvg  # noqa: E402
from fl_subnet.strategies.defences import Defences  # noqa: E402
from fl_subnet.wire import arrays_to_state  # noqa: E402

log = logging.getLogger("bench.attacks")

NODES = 10
ROGUES = (0, 1)
ROUNDS, QUICK_ROUNDS = 15, 3
SEEDS, QUICK_SEEDS = (0, 1, 2), (0,)
KEEP_PROB = 0.5
MAX_RATIO_TO_MEDIAN = 3.0
#: The rogues' update ratio as a fraction of the screening bound (c = 0.6 × 3 = 1.8).
TARGET_FRACTION = 0.6
TRAIN = {"local-steps": 10, "lr": 0.1, "batch-size": 32, "loss": "cross-entropy"}
PROTOCOLS = ("fedavg", "dropout", "ist", "ist-3")
#: IST's sub-networks p per protocol: over the 10 nodes of a round (slot i trains part
#: i mod p) "ist" has 5 parts of 2 holders each, "ist-3" 3 parts of 3 or 4 holders (the
#: redundancy; with 10 parts each unit would have one holder, whose value no rule can check).
NUM_SUBNETS = {"ist": 5, "ist-3": 3}
#: defence name → aggregation rule; every one but "none" screens and caps the weight.
DEFENCES = {"none": "mean", "screening": "mean", "screening+centered-clip": "centered-clip",
            "screening+bucketing": "bucketing", "screening+median": "median",
            "centered-clip": "centered-clip",  # the run config's default, no screening
            "screening-clip": "mean",  # screen = "clip": each update cut to the bound, 3 × the round's median
            "geometric-median": "geometric-median", "multi-krum": "multi-krum",
            # direction screening (min-cosine) before the rule, no norm screening
            "centered-clip+direction": "centered-clip", "mean+direction": "mean"}
#: ``min-cosine`` of the "+direction" defences: an update at more than 90° from the round's
#: geometric median is rejected.
MIN_COSINE = 0.0
SCENARIOS = ("honest", "ipm", "sign-flip", "label-flip", "absent")
ATTACKS = ("ipm", "sign-flip", "label-flip")
CLASSES = 10
#: The targets, in accuracy: an attack costs FedAvg and federated dropout at most 5 points and IST,
#: whose parts have several holders here, at most 10; a defence costs an honest run at most 0.5.
ATTACK_COST_TARGET, IST_ATTACK_COST_TARGET, HONEST_COST_TARGET = 0.05, 0.10, 0.005


def attack_target(protocol: str) -> float:
    """The attack-cost target of ``protocol`` (IST with redundancy: 10 points)."""
    return IST_ATTACK_COST_TARGET if protocol in NUM_SUBNETS else ATTACK_COST_TARGET
MARK_START, MARK_END = "<!-- attacks:start -->", "<!-- attacks:end -->"
DOCS = ROOT / "docs" / "attacks.md"


def factory() -> MLP:
    return MLP(64, [64], 10)


class Partition(TensorDataset):
    partition_id = -1


@functools.lru_cache(maxsize=NODES)
def _partition_tensors(pid: int) -> tuple[torch.Tensor, torch.Tensor]:
    tx, ty, _, _ = load_partition("digits", pid, NODES, "iid", seed=0)
    return tx, ty


def partition(pid: int) -> Partition:
    """Node ``pid``'s iid digits partition of :data:`NODES` (as tests/test_poisoning.py's
    ``digits_loader``), knowing its partition id."""
    data = Partition(*_partition_tensors(pid))
    data.partition_id = pid
    return data


def load_data(context: Context):
    return partition(int(context.node_config["partition-id"])), None


def largest_partition() -> int:
    """``max-num-examples``: the largest partition (what an operator would set)."""
    return max(len(partition(i)) for i in range(NODES))


def _floating(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if v.is_floating_point()}


def _norm(delta: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(d.double().square().sum()) for d in delta.values()))


class Nodes:
    """The nodes' train function for one run: honest everywhere, the rogues attack.

    Records every node's update ratio per round (``ratios[round][pid]``, as the server
    computes it: the reply against the slice it was sent), so that :meth:`bound_use` can
    replay the server's bound, 3 × the median of the round's ratios.
    """

    def __init__(self, scenario: str, cap: int) -> None:
        self.scenario, self.cap = scenario, cap
        self.rounds: dict[int, int] = {}
        self.ratios: dict[int, dict[int, float]] = {}

    def __call__(self, model, train_set, cfg, seed):
        pid = train_set.partition_id
        rogue = pid in ROGUES
        rnd = self.rounds[pid] = self.rounds.get(pid, 0) + 1  # every node trains every round
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        n, loss = train_local(model, train_set, cfg, seed)
        if rogue and self.scenario in ATTACKS:
            self._attack(model, start, cfg, rnd, pid)
            n = self.cap
        self.ratios.setdefault(rnd, {})[pid] = update_ratio(model.state_dict(), start)
        return n, loss

    def _attack(self, model, start, cfg, rnd: int, pid: int) -> None:
        base = _floating(start)
        own = {k: v.detach() - base[k] for k, v in _floating(model.state_dict()).items()}
        if self.scenario == "sign-flip":
            direction, size = own, _norm(own)
        elif self.scenario == "label-flip":  # the update of flipped labels, at 1.8 × the honest norm
            other = copy.deepcopy(model)
            other.load_state_dict(start)
            x, y = _partition_tensors(pid)
            flipped = Partition(x, CLASSES - 1 - y)
            flipped.partition_id = pid
            train_local(other, flipped, cfg, node_seed(cfg.seed, rnd, pid))
            direction = {k: base[k] - v for k, v in _floating(other.state_dict()).items()}  # base - scale·d below
            size = _norm(own)
        else:  # ipm: the colluders' honest updates on this slice, each with its node's own seed
            deltas = []
            for q in ROGUES:
                if q == pid:
                    deltas.append(own)
                    continue
                other = copy.deepcopy(model)
                other.load_state_dict(start)
                train_local(other, partition(q), cfg, node_seed(cfg.seed, rnd, q))
                deltas.append({k: v - base[k] for k, v in _floating(other.state_dict()).items()})
            direction = {k: sum(d[k] for d in deltas) / len(deltas) for k in base}
            size = statistics.fmean(_norm(d) for d in deltas)
        scale = MAX_RATIO_TO_MEDIAN * TARGET_FRACTION * size / max(_norm(direction), 1e-12)
        state = model.state_dict()
        with torch.no_grad():
            for k, d in direction.items():
                state[k].copy_(base[k] - scale * d)

    def bound_use(self) -> float:
        """The largest rogue ratio over its round's screening bound (3 × the median of the
        round's ratios, torch's lower middle, as :meth:`Defences.bound`)."""
        worst = 0.0
        for ratios in self.ratios.values():
            bound = MAX_RATIO_TO_MEDIAN * float(torch.tensor(list(ratios.values()), dtype=torch.float64).median())
            worst = max([worst] + [ratios[p] / bound for p in ROGUES if p in ratios])
        return worst


def node_seed(run_seed: int, rnd: int, pid: int) -> int:
    """The batch-order seed node ``pid`` trains with in round ``rnd`` (clients/app.py)."""
    return hash((run_seed, rnd, pid)) & 0x7FFFFFFF


def build_strategy(protocol: str, defence: str, seed: int, cap: int, nodes: int = NODES):
    kwargs = dict(seed=seed, fraction_evaluate=0.0, min_available_nodes=nodes, aggregation=DEFENCES[defence])
    if defence.startswith("screening"):
        kwargs["defences"] = Defences(max_ratio_to_median=MAX_RATIO_TO_MEDIAN, max_num_examples=cap,
                                      screen="clip" if defence == "screening-clip" else "reject")
    elif defence.endswith("+direction"):
        kwargs["defences"] = Defences(min_cosine=MIN_COSINE)
    if protocol == "dropout":
        return FederatedDropout(factory, KEEP_PROB, **kwargs)
    if protocol in NUM_SUBNETS:  # every node of the round trains, several per part
        return IST(factory, NUM_SUBNETS[protocol], local_steps=TRAIN["local-steps"], num_train_nodes=nodes,
                   **kwargs)
    return SubnetFedAvg(factory, **kwargs)


@functools.lru_cache(maxsize=1)
def _test_set() -> TensorDataset:
    return TensorDataset(*load_centralized_test("digits"))


def accuracy(state: Mapping[str, torch.Tensor]) -> float:
    model = factory()
    model.load_state_dict(state)
    return float(evaluate_model(model, _test_set(), "cross-entropy")["eval-acc"])


def run_one(protocol: str, defence: str, scenario: str, seed: int, rounds: int, cap: int) -> dict[str, object]:
    """One run: final test accuracy, rejected replies per round, the rogues' bound use."""
    torch.manual_seed(0)  # the initial model is fixed; the seed moves the masks and batch orders
    init = ArrayRecord(factory().state_dict())
    present = [i for i in range(NODES) if scenario != "absent" or i not in ROGUES]
    strategy = build_strategy(protocol, defence, seed, cap, len(present))
    nodes = Nodes(scenario, cap)
    app = make_client_app(factory, load_data, nodes)
    # the absent scenario: the rogues' nodes are not connected; the others keep their partitions and ids
    grid = InProcessGrid(app, len(present), node_configs=[{"partition-id": i, "num-partitions": NODES} for i in present],
                         node_ids=[1001 + i for i in present])
    cfg = ConfigRecord({**TRAIN, "seed": seed})
    result = strategy.start(grid=grid, initial_arrays=init, num_rounds=rounds, train_config=cfg)
    rejected = [int(result.train_metrics_clientapp[r].get("num-rejected", 0)) for r in range(1, rounds + 1)]
    out = {"accuracy": accuracy(arrays_to_state(result.arrays)), "rejected": rejected}
    if scenario in ATTACKS:
        out["bound_use"] = nodes.bound_use()
    return out


def measure(protocols: Sequence[str], defences: Sequence[str], seeds: Sequence[int], rounds: int,
            scenarios: Sequence[str] = SCENARIOS) -> list[dict[str, object]]:
    """Every protocol × defence × scenario over ``seeds``: one measurement each (emitted)."""
    cap = largest_partition()
    out = []
    for protocol in protocols:
        for defence in defences:
            for scenario in scenarios:
                t0 = time.perf_counter()
                runs = [run_one(protocol, defence, scenario, s, rounds, cap) for s in seeds]
                accs = [r["accuracy"] for r in runs]
                setting = {"protocol": protocol, "defence": defence, "scenario": scenario, "rounds": rounds,
                           "nodes": NODES, "rogues": len(ROGUES), "seeds": list(seeds)}
                extra: dict[str, object] = {
                    "mean": statistics.fmean(accs), "sd": statistics.pstdev(accs), "accuracies": accs,
                    "num_rejected": [sum(r["rejected"]) for r in runs], "seconds": time.perf_counter() - t0}
                if scenario in ATTACKS:
                    extra["bound_use"] = max(r["bound_use"] for r in runs)
                m = record("attacks", setting, accs, metric="accuracy", **extra)
                log.info("%s / %s / %s: %.4f ± %.4f (rejected %s) in %.0f s", protocol, defence, scenario,
                         extra["mean"], extra["sd"], extra["num_rejected"], extra["seconds"])
                emit(m)
                out.append(m)
    return out


# --------------------------------------------------------------------------- the table
def _cells(measurements: Sequence[Mapping[str, object]]) -> dict[tuple[str, str, str], Mapping[str, object]]:
    return {(m["setting"]["protocol"], m["setting"]["defence"], m["setting"]["scenario"]): m for m in measurements}


def _pct(m: Mapping[str, object] | None) -> str:
    if m is None:
        return "—"
    return f"{100 * m['mean']:.1f} ± {100 * m['sd']:.1f}"


def render_table(data: Mapping[str, object]) -> str:
    """The Markdown table of docs/attacks.md from the JSON that ``--out`` writes.

    One row per protocol × defence; accuracy in % (mean ± sd over the seeds); attack cost
    = accuracy with the rogues absent − the worse attacked accuracy (means); honest cost =
    the honest run without defences − the honest run with this defence; rejected: replies
    screened out over all attacked runs; bound use: the largest rogue ratio / its round's
    screening bound.
    """
    measurements = data["measurements"]
    cells = _cells(measurements)
    protocols = list(dict.fromkeys(m["setting"]["protocol"] for m in measurements))
    defences = list(dict.fromkeys(m["setting"]["defence"] for m in measurements))
    first = measurements[0]["setting"]
    lines = [f"Final test accuracy (%), mean ± sd over seeds {first['seeds']}, {first['rounds']} rounds, "
             f"{first['nodes']} nodes of which {first['rogues']} rogue. Targets: attack cost ≤ "
             f"{100 * ATTACK_COST_TARGET:g} points (IST, whose parts have several holders here: ≤ "
             f"{100 * IST_ATTACK_COST_TARGET:g}), honest cost ≤ {100 * HONEST_COST_TARGET:g} points.", "",
             "| protocol | defence | honest (10) | IPM | sign flip | label flip | rogues absent (8) | attack cost "
             "| honest cost | rejected | bound use |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for protocol in protocols:
        for defence in defences:
            def get(scenario: str, protocol=protocol, defence=defence) -> Mapping[str, object] | None:
                return cells.get((protocol, defence, scenario))

            honest, absent = get("honest"), get("absent")
            attacked = [get(a) for a in ATTACKS if get(a) is not None]
            cost = "—"
            if absent is not None and attacked:
                c = absent["mean"] - min(m["mean"] for m in attacked)
                cost = f"{100 * c:.1f}" + ("" if c <= attack_target(protocol) else " ✗")
            base = cells.get((protocol, "none", "honest"))
            hcost = "—"
            if honest is not None and base is not None:
                h = base["mean"] - honest["mean"]
                hcost = f"{100 * h:.1f}" + ("" if h <= HONEST_COST_TARGET else " ✗")
            rejected = sum(sum(m["num_rejected"]) for m in attacked)
            use = max((m["bound_use"] for m in attacked), default=float("nan"))
            lines.append(f"| {protocol} | {defence} | {_pct(honest)} | {_pct(get('ipm'))} | {_pct(get('sign-flip'))} "
                         f"| {_pct(get('label-flip'))} | {_pct(absent)} | {cost} | {hcost} | {rejected} | {use:.2f} |")
    lines += run_line(data, "python bench/attacks.py")
    return "\n".join(lines) + "\n"


def write_docs(data: Mapping[str, object], path: Path = DOCS) -> None:
    """Replace the table between the markers of ``path`` with :func:`render_table`."""
    replace_between(path, MARK_START, MARK_END, render_table(data))


def docs_table(path: Path = DOCS) -> str:
    """The table currently between the markers of ``path``."""
    return between(path, MARK_START, MARK_END)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"{len(QUICK_SEEDS)} seed, {QUICK_ROUNDS} rounds, FedAvg only")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {list(SEEDS)}")
    p.add_argument("--rounds", type=int, default=None, help=f"default {ROUNDS}")
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=None)
    p.add_argument("--defences", nargs="+", choices=list(DEFENCES), default=None)
    p.add_argument("--out", type=Path, default=None, help="write the JSON here (e.g. docs/attacks.json)")
    p.add_argument("--write-docs", action="store_true", help="render the table into docs/attacks.md")
    p.add_argument("--render-only", action="store_true", help="run nothing: render --out's JSON into the docs")
    p.add_argument("--merge", action="store_true",
                   help="keep --out's measurements of the cells not measured now (e.g. with --defences X)")
    args = p.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    logging.getLogger("flwr").setLevel(logging.ERROR)  # Flower's per-run banners and per-round summaries
    if args.render_only:
        if args.out is None:
            p.error("--render-only needs --out")
        data = json.loads(args.out.read_text())
        write_docs(data)
        return data
    torch.set_num_threads(1)
    seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    protocols = args.protocols or (("fedavg",) if args.quick else PROTOCOLS)
    defences = args.defences or list(DEFENCES)
    t0 = time.perf_counter()
    measurements = measure(protocols, defences, seeds, rounds)
    data = {"bench": "attacks", "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(["python bench/attacks.py", *(argv if argv is not None else sys.argv[1:])]),
            "setting": {"data": "digits iid", "model": "MLP(64, [64], 10)", **TRAIN, "keep_prob": KEEP_PROB,
                        "nodes": NODES, "rogues": list(ROGUES), "max_ratio_to_median": MAX_RATIO_TO_MEDIAN,
                        "max_num_examples": largest_partition(), "target_fraction": TARGET_FRACTION,
                        "rounds": rounds, "seeds": list(seeds)},
            "wall_seconds": time.perf_counter() - t0, "machine": machine(), "measurements": measurements}
    if args.merge and args.out is not None and args.out.is_file():
        old = json.loads(args.out.read_text())
        fresh = set(_cells(measurements))
        data["measurements"] = [m for m in old["measurements"] if (m["setting"]["protocol"], m["setting"]["defence"],
                                                                    m["setting"]["scenario"]) not in fresh] + measurements
        data["command"] = f"{old['command']}; {data['command']}"
        data["wall_seconds"] += old["wall_seconds"]
    log.info("%d measurements in %.0f s", len(measurements), data["wall_seconds"])
    if args.out is not None:
        args.out.write_text(json.dumps(data, indent=1) + "\n")
    if args.write_docs:
        write_docs(data)
    return data


if __name__ == "__main__":
    main()
