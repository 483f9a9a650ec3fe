"""Analysis time and per-message client overhead of fl_subnet vs a plain FedAvg client.

Measures, in one process and with ``time.perf_counter``, for each model (ResNet-18
shaped ``resnet18_shaped()``, 11,172,170 parameters; ``CNNBN``; ``MHATransformer``):

* ``analyze_seconds`` / ``analyze_verify_seconds``: ``fl_subnet.analyze(factory,
  example)`` with ``verify=False`` / ``verify=True`` (what a strategy constructor runs).
* ``cached_spec_first_seconds`` / ``cached_spec_cached_seconds``: the client's
  ``cached_spec(factory, shape, dtype)`` on a fresh key (a miss: analysis on the
  ``meta`` device) and on a warm key (a dictionary hit).
* ``build_compact_seconds``: ``spec.build(compact_state, mask)``, the per-message work
  of an fl_subnet client, with ``compact_state = spec.gather(full_state, mask)`` under a
  Bernoulli(ξ = ``--keep-prob``) mask (``BernoulliSampler``, round 1, slot 0).
* ``plain_load_compact_seconds``: a plain client that already has a module of the
  compact shapes: ``copy.deepcopy(template)`` + ``load_state_dict(compact_state)``, where
  ``template`` is ``factory()`` with every tensor swapped for an empty one of the compact
  shape (a plain ``nn.Module``: deep-copying the ``GraphModule`` that ``build`` returns
  would recompile its code, and turns its non-persistent scale buffers persistent).
* ``fedavg_full_construct_and_load_seconds``: what Flower's FedAvg client template does
  per message with the full model: ``factory()`` + ``load_state_dict(full_state)``.

* ``cold_process``: in a fresh interpreter (a Flower SuperNode in ``subprocess``
  isolation starts one ``flwr-clientapp`` process per message, so the cache never hits
  there): seconds to ``import torch``, ``fl_subnet``, then the first ``cached_spec`` call
  (one run, includes the lazy imports its tracing triggers), then ``factory()``.

Every time is the median of ``--repeats`` runs after one untimed warm-up (except the
cache miss, which has none by definition). Byte counts are ``sum(numel * element_size)``
over the state dicts (parameters and buffers). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import flwr
import torch

import fl_subnet
from fl_subnet.core.samplers import BernoulliSampler
from fl_subnet.core.spec import cached_spec
from fl_subnet.models import CNNBN, MHATransformer, resnet18_shaped

log = logging.getLogger("bench.analysis")

SEED = 0
SERVER_ROUND = 1

# name -> (factory, example input)
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[], torch.Tensor]]] = {
    "resnet18_shaped": (resnet18_shaped, lambda: torch.zeros(1, 3, 32, 32)),
    "CNNBN": (CNNBN, lambda: torch.zeros(1, 1, 8, 8)),
    "MHATransformer": (MHATransformer, lambda: torch.zeros(1, 8, dtype=torch.long)),
}


def median_time(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median wall time in seconds of ``repeats`` calls of ``fn()``, after one untimed
    call when ``warmup``."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Payload of a state dict: ``sum(numel * element_size)``."""
    return sum(t.numel() * t.element_size() for t in state.values())


def plain_compact_module(factory: Callable[[], torch.nn.Module],
                         compact_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``factory()`` with each parameter / buffer replaced by an empty tensor shaped as in
    ``compact_state``: a plain module that ``load_state_dict(compact_state)`` accepts."""
    model = factory()
    for key, t in compact_state.items():
        owner, _, attr = key.rpartition(".")
        mod = model.get_submodule(owner)
        if attr in mod._parameters:
            mod._parameters[attr] = torch.nn.Parameter(torch.empty_like(t), t.is_floating_point())
        else:
            mod._buffers[attr] = torch.empty_like(t)
    return model


COLD = """
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from fl_subnet.core.spec import cached_spec
from {module} import {qualname} as factory
torch.set_num_threads({threads})
t2 = time.perf_counter()
cached_spec(factory, {shape!r}, {dtype!r})
t3 = time.perf_counter()
factory()
t4 = time.perf_counter()
print(json.dumps({{"import_torch_seconds": t1 - t0, "import_fl_subnet_seconds": t2 - t1,
                  "cached_spec_seconds": t3 - t2, "factory_seconds": t4 - t3}}))
"""


def cold_process(factory: Callable[[], torch.nn.Module], shape: tuple[int, ...], dtype: str,
                 threads: int) -> dict[str, float]:
    """First-message costs in a fresh interpreter (see the module docstring); one run."""
    code = COLD.format(module=factory.__module__, qualname=factory.__qualname__, shape=shape,
                       dtype=dtype, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_model(name: str, repeats: int, keep_prob: float, verify: bool, cold: bool) -> dict[str, object]:
    """Analysis time and per-message client overhead of one model.

    Parameters
    ----------
    name : str
        A key of ``MODELS``.
    repeats : int
        Timed repetitions per measurement.
    keep_prob : float
        Bernoulli keep probability ξ of the mask.
    verify, cold : bool
        Also time ``analyze(..., verify=True)`` / a fresh process (else ``None``).

    Returns
    -------
    dict
        The JSON entry for this model.
    """
    factory, make_example = MODELS[name]
    example = make_example()
    log.info("%s: analyze (verify=False) x%d", name, repeats)
    analyze_s = median_time(lambda: fl_subnet.analyze(factory, example, verify=False), repeats)
    analyze_verify_s = None
    if verify:
        log.info("%s: analyze (verify=True) x%d", name, repeats)
        analyze_verify_s = median_time(lambda: fl_subnet.analyze(factory, example), repeats)

    shape, dtype = tuple(example.shape), str(example.dtype).removeprefix("torch.")
    # A fresh wrapper per call is a fresh cache key, hence a miss (the cache keeps them: small).
    first_s = median_time(lambda: cached_spec(lambda: factory(), shape, dtype), repeats, warmup=False)
    cold_s = cold_process(factory, shape, dtype, torch.get_num_threads()) if cold else None
    spec = cached_spec(factory, shape, dtype)
    cached_s = median_time(lambda: cached_spec(factory, shape, dtype), repeats)

    torch.manual_seed(SEED)
    full_model = factory()
    full_state = {k: v.detach().clone() for k, v in full_model.state_dict().items()}
    mask = BernoulliSampler(keep_prob, seed=SEED).sample(spec.groups, SERVER_ROUND, 1)[0]
    compact_state = spec.gather(full_state, mask)
    log.info("%s: build / plain load / FedAvg full load x%d", name, repeats)
    build_s = median_time(lambda: spec.build(compact_state, mask), repeats)
    template = plain_compact_module(factory, compact_state)

    def plain_load() -> None:
        copy.deepcopy(template).load_state_dict(compact_state)

    def fedavg_full() -> None:
        factory().load_state_dict(full_state)

    plain_s = median_time(plain_load, repeats)
    fedavg_s = median_time(fedavg_full, repeats)
    full_bytes, compact_bytes = state_bytes(full_state), state_bytes(compact_state)
    return {
        "name": name,
        "example_shape": list(shape),
        "example_dtype": dtype,
        "num_params": sum(p.numel() for p in full_model.parameters()),
        "num_groups": len(spec.groups),
        "groups_kept_fraction": {g.name: len(mask.kept(g)) / g.size for g in spec.groups},
        "analyze_seconds": analyze_s,
        "analyze_verify_seconds": analyze_verify_s,
        "client": {
            "cached_spec_first_seconds": first_s,
            "cached_spec_cached_seconds": cached_s,
            "build_compact_seconds": build_s,
            "plain_load_compact_seconds": plain_s,
            "fedavg_full_construct_and_load_seconds": fedavg_s,
            "build_over_plain": build_s / plain_s,
            "build_over_fedavg_full": build_s / fedavg_s,
            "compact_state_bytes": compact_bytes,
            "full_state_bytes": full_bytes,
            "compact_over_full_bytes": compact_bytes / full_bytes,
        },
        "cold_process": cold_s,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Parse arguments, run every model's benchmark, return the JSON object."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--keep-prob", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 repeat, small models only (ResNet-18 only with --resnet, unverified), "
                   "cold process for the first model only")
    p.add_argument("--resnet", action="store_true", help="with --quick: include ResNet-18 (no verify)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    names = list(MODELS) if (not args.quick or args.resnet) else ["CNNBN", "MHATransformer"]

    models = []
    for i, name in enumerate(names):
        verify = not (args.quick and name == "resnet18_shaped")
        models.append(bench_model(name, repeats, args.keep_prob, verify, cold=not args.quick or i == 0))
        m, c = models[-1], models[-1]["client"]
        log.info("%s: analyze %.3f s, build %.4f s, plain %.4f s, ratio %.2f", name, m["analyze_seconds"],
                 c["build_compact_seconds"], c["plain_load_compact_seconds"], c["build_over_plain"])
    return {
        "repeats": repeats,
        "keep_prob": args.keep_prob,
        "quick": args.quick,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "models": models,
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
