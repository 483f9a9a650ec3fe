"""LoRA with heterogeneous ranks on a synthetic task, over several seeds (docs/lora.md,
"Heterogeneous ranks on a synthetic task").

Setting (:mod:`fl_subnet.experiments.lora_task`): a tiny BERT classifier built from a
config (random weights, nothing downloaded) is pre-trained centrally on task A (a majority
vote over token groups), then fine-tuned federatedly on task B (half of every group's
tokens moved to the next group) by :data:`NUM_NODES` nodes with Dirichlet(α =
:data:`DIRICHLET_ALPHA`) label skew, every node in every round. Nodes ``i mod 3`` = 0, 1, 2
hold LoRA ranks 4, 8 and 16 (capacities 0.25 / 0.5 / 1 of ``r_max = 16``, ``lora_alpha =
32``: every node keeps the scale ``alpha / r_max``). Every variant runs through
``strategy.start`` on the in-process grid with fl-subnet's ClientApp (Flower's serde both
ways; only the trainable tensors travel, the base is built on each node).

Variants (:data:`VARIANTS`), on the same nodes, data and seeds:

* ``full-ft-fedavg``: every weight of the pre-trained model trained and sent
  (``SubnetFedAvg``): the reference for the bytes.
* ``lora-r8-all``: one rank for all, ``r = 8`` on every node (``SubnetFedAvg`` over the
  adapters and the head): FlowerTune's setting (Flower's LLM leaderboard fine-tunes with
  one LoRA rank for every node, ``r = 32``, FedAvg over ``get_peft_model_state_dict``).
* ``hetlora-holder-mean``: HetLoRA's truncation (Cho et al., EMNLP 2024): a node of rank
  ``r_k`` gets the first ``r_k`` ranks of the global adapter (``HeteroFL`` with the tiers'
  capacities, nested prefixes), each rank averaged over the nodes that held it.
* ``zero-pad-mean``: the naive baseline: each node's adapter zero-padded to ``r_max`` and
  averaged over all nodes (``denominator="zero-pad"``), so a rank held by a third of the nodes
  shrinks to a third of their mean.
* ``all-nodes-mean``: the masked mean with ``denominator = "all"``: over every node, a
  node that did not hold a rank counting with the global value of it (not 0), so a rank
  held by a third of the nodes moves a third of its holders' mean step.
* ``product-space``: FlexLoRA's aggregation (Bai et al., NeurIPS 2024): the weighted mean
  of the products ``B_k A_k``, redistributed by SVD (``aggregation = "product-space"``).
* ``rank-dropout``: federated dropout over ranks (Caldas et al. 2018): each node trains a
  random half of every adapter's ranks (``FederatedDropout``, ``keep_prob = 0.5`` for
  every node: it takes one keep probability, not one per node).

No variant scales the kept ranks (``scale=False``: neither HeteroFL's ``1/r`` scaler nor
dropout's ``1/ξ``): every node keeps the scale ``alpha / r_max`` (docs/lora.md, "The scale
of a node's adapter"), so a node's adapter is a slice of the global one and the global
adapter's truncations are what the tiers trained. ``lora-r8-all`` uses ``lora_alpha = 16``,
the same scale ``alpha / r = 2`` (FlowerTune's templates: ``r = 32``, ``lora_alpha = 64``).

Every variant weights replies by ``num-examples``; the LoRA variants train the adapters
and the head (``modules_to_save``) with one learning rate, full fine-tuning with its own
(:data:`LR`). Per run: the global model's final test accuracy on task B at full rank,
MB sent (``bytes-down + bytes-up`` of every round), the accuracy after every round against
the MB sent so far, and each tier's adapter extracted and evaluated **alone**: the global
adapter truncated to the tier's first ``r`` ranks (:func:`tier_accuracy`: the compact
model the spec builds for that prefix mask, the base plus the truncated adapter and the
head), for every LoRA variant whose ``r_max`` allows the rank.

Output: one JSON line per variant on stdout (:mod:`bench.common`'s shape: ``metric``
"accuracy", ``median`` of the final accuracy over the seeds, plus ``runs``); ``--out``
writes ``{"variants": {variant: {seed: {...}}}, "setting": ..., "pretrain": ...,
"machine": ...}`` (default docs/lora.json); ``--write-docs`` renders its table into
docs/lora.md between ``<!-- lora-table:start -->`` and ``<!-- lora-table:end -->``
(:func:`render_table`) and draws docs/lora-accuracy-vs-mb.png (:func:`plot`).

Usage::

    OMP_NUM_THREADS=1 python bench/lora.py --quick --out /tmp/lora.json  # 1 seed, 2 rounds
    OMP_NUM_THREADS=1 python bench/lora.py --write-docs                  # 3 seeds, 7 variants
    python bench/lora.py --render-only --write-docs                      # the table from docs/lora.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (add_docs_options, bench_logging, between, emit, machine, output_file, quiet_runs,  # noqa: E402
                          record, replace_between, run_line)

log = logging.getLogger("bench.lora")

#: variant → what it is (the table's reading aid; the strategies are built by :func:`make_strategy`).
VARIANTS: dict[str, str] = {
    "full-ft-fedavg": "full fine-tuning, FedAvg",
    "lora-r8-all": "one rank for all (r = 8), FedAvg",
    "hetlora-holder-mean": "ranks 4/8/16, nested prefixes, mean over holders",
    "zero-pad-mean": "ranks 4/8/16, zero-padded mean over all nodes",
    "all-nodes-mean": "ranks 4/8/16, mean over all nodes, a non-holder counting the global value",
    "product-space": "ranks 4/8/16, FlexLoRA's SVD of the mean product",
    "rank-dropout": "random half of the 16 ranks per node, mean over holders",
}
QUICK_VARIANTS = ("full-ft-fedavg", "lora-r8-all", "hetlora-holder-mean", "product-space")
SEEDS, QUICK_SEEDS = (0, 1, 2), (0,)
ROUNDS, QUICK_ROUNDS = 20, 2
NUM_NODES, PER_NODE, TEST_SIZE = 9, 200, 2000
DIRICHLET_ALPHA = 0.5
R_MAX, ONE_RANK = 16, 8
RANKS = (4, 8, 16)
TIERS = tuple(r / R_MAX for r in RANKS)
LOCAL_STEPS, BATCH_SIZE, MOMENTUM = 10, 32, 0.9
#: learning rate of the adapters (and head), and of full fine-tuning.
LR = {"lora": 0.06, "full": 0.01}
KEEP_PROB = 0.5
PRETRAIN_STEPS, QUICK_PRETRAIN_STEPS = 600, 100
MARK_START, MARK_END = "<!-- lora-table:start -->", "<!-- lora-table:end -->"
DOCS = ROOT / "docs" / "lora.md"
JSON_OUT = ROOT / "docs" / "lora.json"
PLOT = ROOT / "docs" / "lora-accuracy-vs-mb.png"
REFERENCE = "full-ft-fedavg"
#: The variant the others are compared with seed by seed (one rank for all).
BASELINE = "lora-r8-all"


# ------------------------------------------------------------------------ the strategies
def make_strategy(variant: str, factory: Callable, seed: int):
    """The strategy of ``variant`` over ``factory``'s model (every node every round, replies
    weighted by ``num-examples``, no federated evaluation)."""
    from fl_subnet.strategies import FederatedDropout, HeteroFL, SubnetFedAvg

    common = dict(fraction_train=1.0, min_train_nodes=NUM_NODES, min_available_nodes=NUM_NODES,
                  fraction_evaluate=0.0, seed=seed, weighted=True, local_steps=LOCAL_STEPS)
    if variant in ("full-ft-fedavg", "lora-r8-all"):
        return SubnetFedAvg(factory, **common)
    if variant == "hetlora-holder-mean":
        return HeteroFL(factory, TIERS, scale=False, order_by_partition=True, **common)
    if variant == "zero-pad-mean":
        return HeteroFL(factory, TIERS, scale=False, order_by_partition=True, denominator="zero-pad", **common)
    if variant == "all-nodes-mean":
        return HeteroFL(factory, TIERS, scale=False, order_by_partition=True, denominator="all", **common)
    if variant == "product-space":
        return HeteroFL(factory, TIERS, scale=False, order_by_partition=True, aggregation="product-space",
                        **common)
    if variant == "rank-dropout":
        return FederatedDropout(factory, KEEP_PROB, scale=False, **common)
    raise ValueError(f"unknown variant {variant!r}; one of {tuple(VARIANTS)}")


def rank_of(variant: str) -> int | None:
    """The global adapter's rank of ``variant`` (None: full fine-tuning)."""
    return None if variant == "full-ft-fedavg" else ONE_RANK if variant == "lora-r8-all" else R_MAX


# ---------------------------------------------------------------------------- one seed
class Seed:
    """What every variant of one seed shares: the pre-trained base, task B's node and test
    sets, and one model factory per rank (one object each, so that a node builds and
    fingerprints each base once per process)."""

    def __init__(self, seed: int, pretrain_steps: int) -> None:
        import torch

        from fl_subnet.experiments import lora_task as task

        self.seed = seed
        t0 = time.perf_counter()
        self.state, self.pretrain = task.pretrain(seed, steps=pretrain_steps)
        self.pretrain["seconds"] = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(20_000 + seed)
        self.nodes = [task.make_task("b", labels, gen)
                      for labels in task.dirichlet_split(NUM_NODES, PER_NODE, DIRICHLET_ALPHA, gen)]
        self.test = task.make_task("b", task.balanced(TEST_SIZE, gen), gen)
        #: Per node, how many training sequences of each class it holds.
        self.label_counts = [torch.bincount(d.tensors[1], minlength=task.NUM_CLASSES).tolist() for d in self.nodes]
        self.factories = {None: task.full_factory(self.state, seed)}
        # one scale for every LoRA variant: lora_alpha / r = 32 / 16 (FlowerTune's 64 / 32)
        for r in {R_MAX, ONE_RANK}:
            self.factories[r] = task.lora_factory(self.state, seed, r, alpha=task.LORA_ALPHA * r / R_MAX)

    def load_data(self, context):
        """Node ``partition-id``'s task-B training set (no local test set)."""
        return self.nodes[int(context.node_config["partition-id"])], None


def tier_accuracy(spec, model, rank: int, test) -> float:
    """Accuracy on ``test`` of ``model``'s adapters truncated to their first ``rank`` ranks
    (of ``r_max``), alone: the compact model ``spec`` builds for the prefix mask (the frozen
    base, every adapter's first ``rank`` ranks at the scale ``alpha / r_max``, the head)."""
    from fl_subnet.core.lora import rank_capacity
    from fl_subnet.core.samplers import NestedPrefixSampler
    from fl_subnet.experiments.lora_task import accuracy

    mask = NestedPrefixSampler().sample(spec.groups, 0, 1, [rank_capacity(rank, spec.groups)])[0]
    compact = spec.build(spec.gather(model.state_dict(), mask), mask)
    assert all(t.shape[0] == rank for k, t in compact.state_dict().items() if ".lora_A." in k)
    return accuracy(compact, test)[0]


def run_variant_seed(variant: str, data: Seed, rounds: int) -> dict[str, object]:
    """One run of ``variant`` on ``data``'s seed: final accuracy and loss at full rank, MB,
    the accuracy after every round against the cumulative MB, each tier alone."""
    from flwr.app import ArrayRecord, ConfigRecord

    from fl_subnet.clients import make_client_app
    from fl_subnet.experiments.inprocess_grid import InProcessGrid
    from fl_subnet.experiments.lora_task import accuracy, num_parameters
    from fl_subnet.wire import arrays_to_state

    t0 = time.perf_counter()
    random.seed(data.seed)  # Flower's node sampling
    rank = rank_of(variant)
    factory = data.factories[rank]
    strategy = make_strategy(variant, factory, data.seed)
    model = factory()
    curve: dict[int, tuple[float, float]] = {}

    def evaluate_fn(server_round, arrays):
        model.load_state_dict(arrays_to_state(arrays), strict=False)
        curve[server_round] = accuracy(model, data.test)
        return None

    lr = LR["full" if rank is None else "lora"]
    config = ConfigRecord({"lr": lr, "local-steps": LOCAL_STEPS, "batch-size": BATCH_SIZE, "momentum": MOMENTUM,
                           "loss": "cross-entropy", "seed": data.seed})
    grid = InProcessGrid(make_client_app(factory, data.load_data), NUM_NODES)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(factory().state_dict()), num_rounds=rounds,
                            train_config=config, evaluate_fn=evaluate_fn)
    metrics = result.train_metrics_clientapp
    rejected = sum(int(metrics[r]["num-rejected"]) for r in metrics)
    if rejected or any(int(metrics[r]["num-replies"]) != NUM_NODES for r in metrics):
        raise RuntimeError(f"{variant} seed {data.seed}: {rejected} replies rejected")
    mb = [(float(metrics[r]["bytes-down"]) + float(metrics[r]["bytes-up"])) / 1e6 for r in sorted(metrics)]
    down = sum(float(metrics[r]["bytes-down"]) for r in metrics) / 1e6
    cumulative = [0.0]
    for m in mb:
        cumulative.append(cumulative[-1] + m)
    model.load_state_dict(arrays_to_state(result.arrays), strict=False)
    acc, loss = accuracy(model, data.test)
    out: dict[str, object] = {
        "full-acc": acc, "full-loss": loss, "total-mb": cumulative[-1], "mb-down": down,
        "mb-up": cumulative[-1] - down, "rounds": len(mb), "trainable-params": num_parameters(model),
        "curve": [[cumulative[r], curve[r][0]] for r in sorted(curve)]}
    for r in RANKS:
        out[f"tier-{r}-acc"] = (tier_accuracy(strategy.spec, model, r, data.test)
                                if rank is not None and r <= rank else None)
    if rank is not None:  # the full-rank truncation is the global model itself
        full = out[f"tier-{rank}-acc"]
        if abs(full - acc) > 1e-9:
            raise RuntimeError(f"{variant}: the rank-{rank} compact model gives {full}, the global model {acc}")
    out["seconds"] = time.perf_counter() - t0
    return out


def measure(variants: Sequence[str], seeds: Sequence[int], rounds: int,
            pretrain_steps: int) -> tuple[dict[str, dict[str, dict]], dict[str, dict]]:
    """Every seed × variant (one pre-training per seed); one JSON line per variant (emitted)."""
    results: dict[str, dict[str, dict]] = {v: {} for v in variants}
    pretrained: dict[str, dict] = {}
    for seed in seeds:
        data = Seed(seed, pretrain_steps)
        pretrained[str(seed)] = dict(data.pretrain, **{"node-label-counts": data.label_counts})
        log.info("seed %d: pre-trained in %.0f s, task A %.3f, task B before fine-tuning %.3f", seed,
                 data.pretrain["seconds"], data.pretrain["task-a-acc"], data.pretrain["task-b-acc"])
        for variant in variants:
            run = results[variant][str(seed)] = run_variant_seed(variant, data, rounds)
            log.info("%s seed %d: full %.4f, tiers %s, %.2f MB, %.0f s", variant, seed, run["full-acc"],
                     " / ".join("-" if run[f"tier-{r}-acc"] is None else f"{run[f'tier-{r}-acc']:.4f}"
                                for r in RANKS), run["total-mb"], run["seconds"])
    for variant, runs in results.items():
        setting = {"variant": variant, "seeds": list(seeds), "rounds": rounds}
        emit(record("lora", setting, [r["full-acc"] for r in runs.values()], metric="accuracy", runs=runs))
    return results, pretrained


# --------------------------------------------------------------------------- the table
def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pct(runs: Mapping[str, Mapping[str, object]], field: str) -> str:
    values = [r[field] for r in runs.values()]
    if any(v is None for v in values):
        return "–"
    m, sd = mean_sd(values)
    return f"{100 * m:.1f} ± {100 * sd:.1f}"


def _mb(runs: Mapping[str, Mapping[str, object]]) -> float:
    return statistics.fmean(r["total-mb"] for r in runs.values())


def paired(variants: Mapping[str, Mapping[str, Mapping[str, object]]], variant: str, base: str,
           field: str) -> list[float]:
    """``variant`` − ``base`` in ``field``, seed by seed (the seeds both ran); a seed gives both
    the same pre-trained base, node data and adapter initialisation."""
    a, b = variants[variant], variants[base]
    return [a[s][field] - b[s][field] for s in a if s in b and a[s][field] is not None and b[s][field] is not None]


def _delta(diffs: Sequence[float]) -> str:
    """Mean ± sd of paired differences in points; † when every seed's difference has the same
    sign (and none is 0); – for none."""
    if not diffs:
        return "–"
    m, sd = mean_sd(diffs)
    same = len(diffs) > 1 and (all(d > 0 for d in diffs) or all(d < 0 for d in diffs))
    return f"{100 * m:+.1f} ± {100 * sd:.1f}" + (" †" if same else "")


def render_table(data: Mapping[str, object]) -> str:
    """The Markdown table of docs/lora.md from the JSON that ``--out`` writes.

    One row per variant: the global model's final test accuracy on task B at full rank,
    each tier's adapter alone (the first 4 / 8 / 16 ranks; – where the variant's rank is
    smaller or it has no adapter), in %, mean ± sample sd over the seeds; MB sent (down +
    up over the run, mean over the seeds) and its share of full fine-tuning's. Then, for
    every other variant, its difference to :data:`BASELINE` seed by seed (:func:`paired`)
    in points, mean ± sd, † where every seed agrees in sign.
    """
    variants: Mapping[str, Mapping[str, Mapping[str, object]]] = data["variants"]
    setting = data["setting"]
    pre = data["pretrain"]
    a, _ = mean_sd([p["task-a-acc"] for p in pre.values()])
    b, _ = mean_sd([p["task-b-acc"] for p in pre.values()])
    ref = _mb(variants[REFERENCE]) if REFERENCE in variants else None
    lines = [f"Task B test accuracy (%) after {setting['rounds']} rounds, mean ± sd over seeds {setting['seeds']} "
             f"(the pre-trained model: task A {100 * a:.1f} %, task B {100 * b:.1f} % before fine-tuning):", "",
             "| variant | full rank | rank 4 alone | rank 8 alone | rank 16 alone | MB sent | MB vs full fine-tuning |",
             "|---|---|---|---|---|---|---|"]
    for variant, runs in variants.items():
        mb = _mb(runs)
        share = f"{mb / ref:.3f}" if ref else "–"
        cells = " | ".join(_pct(runs, f) for f in ("full-acc", *(f"tier-{r}-acc" for r in RANKS)))
        lines.append(f"| {variant} | {cells} | {mb:.2f} | {share} |")
    others = [v for v in variants if v != BASELINE]
    if BASELINE in variants and others:
        lines += ["", f"Against {BASELINE} (one rank for all), seed by seed (the same seed: the same pre-trained base "
                      "and nodes), in points, mean ± sd of the differences; † every seed moved the same way:", "",
                  "| variant | full rank | rank 4 alone | rank 8 alone |", "|---|---|---|---|"]
        for variant in others:
            cells = " | ".join(_delta(paired(variants, variant, BASELINE, f))
                               for f in ("full-acc", "tier-4-acc", "tier-8-acc"))
            lines.append(f"| {variant} | {cells} |")
    lines += run_line(data, "python bench/lora.py")
    return "\n".join(lines) + "\n"


def mean_curve(runs: Mapping[str, Mapping[str, object]]) -> tuple[list[float], list[float], list[float]]:
    """Round by round, the mean cumulative MB, mean accuracy and its sd over the seeds."""
    curves = [r["curve"] for r in runs.values()]
    n = min(len(c) for c in curves)
    mb = [statistics.fmean(c[i][0] for c in curves) for i in range(n)]
    stats = [mean_sd([c[i][1] for c in curves]) for i in range(n)]
    return mb, [m for m, _ in stats], [sd for _, sd in stats]


def plot(data: Mapping[str, object], path: Path = PLOT):
    """Test accuracy on task B against MB sent, round by round (mean over the seeds, the
    seeds' sd shaded), one line per variant, MB on a log axis; written to ``path`` (PNG).
    Returns the matplotlib ``Figure``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for variant, runs in data["variants"].items():
        mb, acc, sd = mean_curve(runs)
        xs, ys, es = mb[1:], [100 * v for v in acc[1:]], [100 * v for v in sd[1:]]  # round 0: 0 MB
        line, = ax.plot(xs, ys, marker=".", markersize=3, label=variant)
        ax.fill_between(xs, [y - e for y, e in zip(ys, es)], [y + e for y, e in zip(ys, es)],
                        color=line.get_color(), alpha=0.15, linewidth=0)
    start = statistics.fmean(p["task-b-acc"] for p in data["pretrain"].values())
    ax.axhline(100 * start, color="grey", linestyle=":", linewidth=1, label="before fine-tuning")
    ax.set_xscale("log")
    ax.set_xlabel("MB sent (down + up, cumulative)")
    ax.set_ylabel("task B test accuracy (%)")
    seeds = data["setting"]["seeds"]
    ax.set_title(f"LoRA ranks 4 / 8 / 16 on a synthetic task, {len(seeds)} seeds (bench/lora.py)", fontsize="medium")
    ax.legend(loc="lower right", fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def write_docs(data: Mapping[str, object], path: Path = DOCS, figure: Path = PLOT) -> None:
    """Replace the table between the markers of ``path`` with :func:`render_table`, and
    draw :func:`plot` to ``figure``."""
    replace_between(path, MARK_START, MARK_END, render_table(data))
    plot(data, figure)


def docs_table(path: Path = DOCS) -> str:
    """The table currently between the markers of ``path``."""
    return between(path, MARK_START, MARK_END)


def check(data: Mapping[str, object]) -> None:
    """Every run has accuracies in [0, 1] (or None where a tier does not apply) and MB > 0."""
    for variant, runs in data["variants"].items():
        for seed, run in runs.items():
            for field in ("full-acc", *(f"tier-{r}-acc" for r in RANKS)):
                v = run[field]
                if v is None and field != "full-acc":
                    continue
                if v is None or not math.isfinite(v) or not 0.0 <= v <= 1.0:
                    raise ValueError(f"{variant} seed {seed}: {field} = {v!r}")
            if not run["total-mb"] > 0:
                raise ValueError(f"{variant} seed {seed}: total-mb = {run['total-mb']!r}")


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"{len(QUICK_SEEDS)} seed, {QUICK_ROUNDS} rounds, {QUICK_PRETRAIN_STEPS} pre-training steps, "
                        f"variants {', '.join(QUICK_VARIANTS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {list(SEEDS)}")
    p.add_argument("--rounds", type=int, default=None, help=f"default {ROUNDS}")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None, help="default: all")
    add_docs_options(p, JSON_OUT, ROOT, "docs/lora.md and draw the plot")
    args = p.parse_args(list(argv) if argv is not None else None)
    bench_logging(log)
    out = output_file(args, JSON_OUT)
    if args.render_only:
        data = json.loads((out or JSON_OUT).read_text())
        write_docs(data)
        return data
    import warnings

    quiet_runs()
    # transformers 5.23 warns about an attribute peft 0.21 reads; not ours to fix
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    variants = args.variants or (QUICK_VARIANTS if args.quick else tuple(VARIANTS))
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    pretrain_steps = QUICK_PRETRAIN_STEPS if args.quick else PRETRAIN_STEPS
    t0 = time.perf_counter()
    results, pretrained = measure(variants, seeds, rounds, pretrain_steps)
    from fl_subnet.experiments import lora_task as task

    data = {"bench": "lora", "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(["python bench/lora.py", *(argv if argv is not None else sys.argv[1:])]),
            "setting": {"model": f"BertForSequenceClassification (hidden {task.HIDDEN}, {task.LAYERS} layers, "
                                 f"{task.HEADS} heads, ffn {task.FFN}, vocab {task.VOCAB}, length {task.SEQ_LEN})",
                        "lora": f"query, value; r_max {R_MAX}, lora_alpha {task.LORA_ALPHA}; head trainable "
                                f"(modules_to_save)",
                        "pretrain-steps": pretrain_steps, "num-nodes": NUM_NODES, "per-node": PER_NODE,
                        "test-size": TEST_SIZE, "dirichlet-alpha": DIRICHLET_ALPHA, "ranks": list(RANKS),
                        "local-steps": LOCAL_STEPS, "batch-size": BATCH_SIZE, "momentum": MOMENTUM, "lr": dict(LR),
                        "keep-prob": KEEP_PROB, "rounds": rounds, "seeds": list(seeds)},
            "wall_seconds": time.perf_counter() - t0, "machine": machine(), "pretrain": pretrained,
            "variants": results}
    check(data)
    log.info("%d runs in %.0f s", len(variants) * len(seeds), data["wall_seconds"])
    if out is not None:
        out.write_text(json.dumps(data, indent=1) + "\n")
    if args.write_docs:
        write_docs(data)
    return data


if __name__ == "__main__":
    main()
