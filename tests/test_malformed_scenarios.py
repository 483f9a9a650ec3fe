"""Every malformed scenario file is one clean error: ``fl-subnet run FILE`` exits 2 with one
line on stderr naming the key (or the file), no traceback, and nothing trained.

Most cases call ``cli.main`` in this process (a subprocess costs ~4 s of torch import);
a handful run the real command in subprocesses, started together.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fl_subnet.experiments import cli

TINY = """
strategy = "fedavg"
num-server-rounds = 1
num-nodes = 2
local-steps = 1
dataset = "digits"
partitioning = "iid"
hidden = "8"
"""

# (id, scenario text, what stderr must name: the key). Each text is the whole file: the
# other keys keep their (valid) defaults.
KEY_CASES = [
    # unknown choices
    ("strategy-unknown", 'strategy = "fedprox"', "strategy"),
    ("dataset-path-nul", 'dataset-path = "a\\u0000b"', "dataset-path"),
    ("num-classes-negative", "num-classes = -1", "num-classes"),
    ("base-model-not-a-string", "base-model = 3", "base-model"),
    ("pretrain-steps-negative", "pretrain-steps = -1", "pretrain-steps"),
    ("lora-rank-negative", "lora-rank = -4", "lora-rank"),
    ("lora-alpha-zero", "lora-alpha = 0.0", "lora-alpha"),
    ("lora-targets-semicolon", 'lora-targets = "query;value"', "lora-targets"),
    ("strategy-not-a-string", "strategy = 1", "strategy"),
    ("model-unknown", 'model = "vit"', "model"),
    ("dataset-unknown", 'dataset = "imagenet"', "dataset"),
    ("partitioning-unknown", 'partitioning = "zipf"', "partitioning"),
    ("data-scope-unknown", 'data-scope = "global"', "data-scope"),
    ("batchnorm-unknown", 'batchnorm = "batch"', "batchnorm"),
    ("ist-scaling-unknown", 'ist-scaling = "q"', "ist-scaling"),
    ("lr-scaling-unknown", 'lr-scaling = "cubic"', "lr-scaling"),
    ("partition-mode-unknown", 'partition-mode = "random"', "partition-mode"),
    ("untouched-unknown", 'untouched = "drop"', "untouched"),
    ("loss-unknown", 'loss = "hinge"', "loss"),
    ("aggregation-unknown", 'aggregation = "krum"', "aggregation"),
    ("capacity-tiers-above-one", 'capacity-tiers = "0.5,2"', "capacity-tiers"),
    ("screen-unknown", 'screen = "drop"', "screen"),
    ("trim-fraction-half", "trim-fraction = 0.5", "trim-fraction"),
    ("clip-radius-negative", "clip-radius = -1.0", "clip-radius"),
    ("clip-iterations-zero", "clip-iterations = 0", "clip-iterations"),
    ("bucket-size-zero", "bucket-size = 0", "bucket-size"),
    ("weiszfeld-iterations-zero", "weiszfeld-iterations = 0", "weiszfeld-iterations"),
    ("weiszfeld-smoothing-zero", "weiszfeld-smoothing = 0.0", "weiszfeld-smoothing"),
    ("krum-rogues-below-auto", "krum-rogues = -2", "krum-rogues"),
    ("min-cosine-above-one", "min-cosine = 1.5", "min-cosine"),
    ("max-update-ratio-negative", "max-update-ratio = -1.0", "max-update-ratio"),
    ("max-ratio-to-median-nan", "max-ratio-to-median = nan", "max-ratio-to-median"),
    ("max-num-examples-negative", "max-num-examples = -5", "max-num-examples"),
    ("round-timeout-zero", "round-timeout = 0", "round-timeout"),
    ("max-failed-rounds-negative", "max-failed-rounds = -1", "max-failed-rounds"),
    ("node-wait-timeout-inf", "node-wait-timeout = inf", "node-wait-timeout"),
    ("median-with-zeroed-units", 'aggregation = "median"\nuntouched = "zero"', "aggregation"),
    ("server-optimizer-unknown", 'server-optimizer = "adam"', "server-optimizer"),
    ("dropout-sampling-unknown", 'dropout-sampling = "uniform"', "dropout-sampling"),
    ("min-holders-zero", "min-holders = 0", "min-holders"),
    ("min-holders-with-fedavg", "min-holders = 2", "min-holders"),
    ("min-holders-ist-too-few-nodes", 'strategy = "ist"\nnum-subnets = 4\nnum-nodes = 10\nmin-holders = 3', "min-holders"),
    ("server-lr-negative", "server-lr = -0.1", "server-lr"),
    ("server-momentum-one", "server-momentum = 1.0", "server-momentum"),
    ("fjord-widths-zero", 'fjord-widths = "0,0.5,1"', "fjord-widths"),
    ("fjord-bn-unknown", 'strategy = "fjord"\nfjord-bn = "each"', "fjord-bn"),
    ("fjord-bn-with-heterofl", 'strategy = "heterofl"\nfjord-bn = "per-width"', "fjord-bn"),
    ("fjord-bn-with-static-batchnorm", 'strategy = "fjord"\nmodel = "cnn-bn"\nbatchnorm = "static"\n'
     'fjord-bn = "per-width"', "fjord-bn"),
    ("fjord-distill-with-fedavg", "fjord-distill = true", "fjord-distill"),
    ("fjord-tier-below-widths", 'strategy = "fjord"\ncapacity-tiers = "0.1,1.0"', "capacity-tiers"),
    ("path-length-decreasing", 'path-length = "1.0,0.5"', "path-length"),
    ("path-scale-unknown", 'path-scale = "sqrt"', "path-scale"),
    ("label-split-as-string", 'label-split = "yes"', "label-split"),
    ("label-split-with-fedavg", "label-split = true", "label-split"),
    ("blocks-per-stage-zero", "blocks-per-stage = 0", "blocks-per-stage"),
    ("random-path-without-blocks", 'strategy = "random-path"\nmodel = "mlp"', "random-path"),
    ("core-fraction-zero", "core-fraction = 0.0", "core-fraction"),
    ("core-period-one", "core-period = 1", "core-period"),
    ("device-unknown", 'device = "tpu"', "device"),
    ("device-as-int", "device = 0", "device"),
    ("device-cuda-beyond-count", 'device = "cuda:9999"', "device"),  # no machine here has 10,000 GPUs
    ("amp-unknown", 'amp = "fp8"', "amp"),
    ("amp-fp16-on-cpu", 'device = "cpu"\namp = "fp16"', "amp"),
    # the machine decides: fl-subnet runs every node here, so it refuses what this machine lacks
    *([("device-cuda-without-cuda", 'device = "cuda"', "device"),
       ("amp-fp16-without-cuda", 'amp = "fp16"', "amp")] if not torch.cuda.is_available() else []),
    # wrong types: no silent coercion
    ("int-as-string", 'num-server-rounds = "3"', "num-server-rounds"),
    ("int-as-bool", "num-nodes = true", "num-nodes"),
    ("int-fractional", "num-nodes = 2.5", "num-nodes"),
    ("float-as-string", 'lr = "0.1"', "lr"),
    ("float-as-bool", "lr = true", "lr"),
    ("bool-as-int", "loss-average = 1", "loss-average"),
    ("string-as-int", "out-dir = 3", "out-dir"),
    ("resume-from-as-int", "resume-from = 5", "resume-from"),
    ("hidden-as-int", "hidden = 128", "hidden"),
    ("array", "num-nodes = [1, 2]", "num-nodes"),
    ("date", "seed = 1979-05-27", "seed"),
    ("datetime", "lr = 1979-05-27T07:32:00Z", "lr"),
    ("inline-table", "lr = { value = 0.1 }", "lr"),
    ("table-for-scalar", "[keep-prob]\nvalue = 0.5", "keep-prob"),
    # ranges, NaN and infinities
    ("rounds-zero", "num-server-rounds = 0", "num-server-rounds"),
    ("rounds-huge", "num-server-rounds = 1000000", "num-server-rounds"),
    ("nodes-negative", "num-nodes = -1", "num-nodes"),
    ("nodes-huge", "num-nodes = 100000", "num-nodes"),
    ("local-steps-huge", "local-steps = 99999999999", "local-steps"),
    ("local-epochs-huge", "local-epochs = 1000000", "local-epochs"),
    ("num-subnets-zero", "num-subnets = 0", "num-subnets"),
    ("batch-size-negative", "batch-size = -1", "batch-size"),
    ("batch-size-huge", "batch-size = 10000000", "batch-size"),
    ("num-samples-huge", "num-samples = 100000000", "num-samples"),
    ("input-dim-huge", "input-dim = 1000000", "input-dim"),
    ("lr-inf", "lr = inf", "lr"),
    ("lr-overflow-to-inf", "lr = 1e400", "lr"),
    ("lr-nan", "lr = nan", "lr"),
    ("lr-negative", "lr = -0.1", "lr"),
    ("momentum-minus-inf", "momentum = -inf", "momentum"),
    ("weight-decay-nan", "weight-decay = nan", "weight-decay"),
    ("dirichlet-alpha-zero", "dirichlet-alpha = 0.0", "dirichlet-alpha"),
    ("keep-prob-zero", "keep-prob = 0", "keep-prob"),
    ("keep-prob-above-one", "keep-prob = 1.5", "keep-prob"),
    ("keep-prob-nan", "keep-prob = nan", "keep-prob"),
    ("fraction-train-above-one", "fraction-train = 1.01", "fraction-train"),
    ("fraction-evaluate-minus-inf", "fraction-evaluate = -inf", "fraction-evaluate"),
    ("seed-negative", "seed = -1", "seed"),
    ("seed-2-pow-32", "seed = 0x1_0000_0000", "seed"),
    ("hidden-empty-width", 'hidden = "128,,64"', "hidden"),
    ("hidden-zero", 'hidden = "0"', "hidden"),
    ("hidden-words", 'hidden = "wide"', "hidden"),
    # keys that do not fit together
    ("classes-beyond-digits", "classes-per-partition = 11", "classes-per-partition"),
    ("classes-beyond-sequence",
     'dataset = "synthetic-sequence"\nmodel = "transformer"\npartitioning = "pathological"\n'
     "classes-per-partition = 3", "classes-per-partition"),
    ("ist-more-subnets-than-nodes", 'strategy = "ist"\nnum-nodes = 2\nnum-subnets = 4', "num-subnets"),
    ("msd-more-subnets-than-nodes", 'strategy = "multisample-dropout"\nnum-nodes = 3', "num-subnets"),
    ("nodes-beyond-digits-rows", "num-nodes = 1438", "num-nodes"),
    ("nodes-beyond-num-samples",
     'dataset = "synthetic-regression"\npartitioning = "iid"\nnum-samples = 5\nnum-nodes = 6', "num-nodes"),
    ("conv-model-on-vectors", 'model = "cnn"\ndataset = "synthetic-sequence"', "model"),
    ("transformer-on-images", 'model = "transformer"', "model"),
    ("shallow-relu-two-widths", 'model = "shallow-relu"\nhidden = "128,64"', "hidden"),
    ("regression-non-iid", 'dataset = "synthetic-regression"', "partitioning"),
    ("mse-on-classes", 'loss = "mse"', "loss"),
    ("no-local-work", "local-steps = 0\nlocal-epochs = 0", "local-steps"),
    # unknown keys
    ("unknown-key", "bogus-key = 1", "bogus-key"),
    ("snake-case-key", "num_nodes = 3", "num_nodes"),
    ("pyproject-section", "[tool.flwr.app.config]\nlr = 0.1", "tool"),
]

# (id, file content: str, bytes, None = missing, "DIR" = a directory). stderr must name the file.
FILE_CASES = [
    ("missing", None),
    ("directory", "DIR"),
    ("not-utf8", b"\xff\xfe\x00\x01garbage"),
    ("binary-garbage", bytes(range(256)) * 4),
    ("utf16", 'lr = 0.1\n'.encode("utf-16")),
    ("control-chars", b"\x00\x01\x02\x03"),
    ("prose", "this is not a scenario, just some words"),
    ("json", '{"lr": 0.1, "strategy": "ist"}'),
    ("unterminated-string", 'strategy = "ist'),
    ("trailing-garbage", "lr = 0.1 oops"),
    ("key-given-twice", 'strategy = "fedavg"\nstrategy = "ist"'),
    ("too-large", "# " + "x" * (cli.MAX_SCENARIO_BYTES + 10)),
]

SUBPROCESS_CASES = ["missing", "directory", "not-utf8", "lr-inf", "ist-more-subnets-than-nodes"]


def _make(tmp: Path, name: str, content) -> Path:
    path = tmp / f"{name}.toml"
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content + "\n")
    return path


def _cases():
    for case_id, text, key in KEY_CASES:
        yield case_id, text, key, False
    for case_id, content in FILE_CASES:
        yield case_id, content, None, True


def test_table_is_large_and_covers_every_key():
    from fl_subnet.experiments.config import RunConfig

    assert len(KEY_CASES) + len(FILE_CASES) >= 40
    named = {key for _, _, key in KEY_CASES}
    missing = set(RunConfig.keys()) - named
    assert not missing, f"keys without a malformed case: {missing}"


def _check(rc: int, out: str, err: str, expect: str, out_dir: Path) -> None:
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err  # one clear line
    assert lines[0].startswith("fl-subnet: error: ")
    assert expect in lines[0], lines[0]
    assert not (out_dir / "metrics.json").exists()


@pytest.mark.parametrize("case_id,content,key,file_level", list(_cases()), ids=[c[0] for c in _cases()])
def test_malformed_scenario_in_process(tmp_path, capsys, monkeypatch, case_id, content, key, file_level):
    path = _make(tmp_path, case_id, content)
    monkeypatch.setattr(cli, "run_one", lambda *a, **k: pytest.fail("training started"))
    out_dir = tmp_path / "out"
    rc = cli.main(["run", str(path), "--out", str(out_dir)])
    captured = capsys.readouterr()
    _check(rc, captured.out, captured.err, str(path) if file_level else key, out_dir)
    if not file_level:
        assert path.name in captured.err  # the file, too
    if case_id == "ist-more-subnets-than-nodes":
        assert "num-subnets (4) must not exceed num-nodes (2)" in captured.err
    if case_id == "lr-inf":
        assert "lr must be a finite number > 0, got inf" in captured.err


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory):
    """Run the real ``fl-subnet`` command on a few cases, one per CPU at a time (each start
    imports torch: ~4 s)."""
    tmp = tmp_path_factory.mktemp("malformed")
    contents = {c[0]: c[1] for c in _cases()}

    def run(case_id):
        path = _make(tmp, case_id, contents[case_id])
        out_dir = tmp / f"out-{case_id}"
        proc = subprocess.run(
            [sys.executable, "-m", "fl_subnet.experiments.cli", "run", str(path), "--out", str(out_dir)],
            cwd=tmp, capture_output=True, text=True, timeout=60)
        return case_id, (path, out_dir, proc.returncode, proc.stdout, proc.stderr)

    with ThreadPoolExecutor(max_workers=min(len(SUBPROCESS_CASES), os.cpu_count() or 1)) as pool:
        return dict(pool.map(run, SUBPROCESS_CASES))


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_malformed_scenario_subprocess(subprocess_results, case_id):
    keys = {c[0]: c[2] for c in _cases()}
    path, out_dir, rc, out, err = subprocess_results[case_id]
    _check(rc, out, err, keys[case_id] or str(path), out_dir)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\ufeff# a UTF-8 byte-order mark\n"])
def test_empty_scenario_runs_the_defaults(tmp_path, capsys, monkeypatch, text):
    path = tmp_path / "empty.toml"
    path.write_text(text, encoding="utf-8")
    called = []

    def fake_run(values, out_dir, *a, **k):
        called.append(values)
        return {"out-dir": str(out_dir), "strategy": "fedavg", "rounds": 5, "final-eval-acc": None,
                "final-full-train-loss": 1.0, "total-mb": 0.0, "seconds": 0.0}

    monkeypatch.setattr(cli, "run_one", fake_run)
    assert cli.main(["run", str(path), "--out", str(tmp_path / "o")]) == 0
    assert called == [{}]  # every key at its default
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv,expect", [
    (["--set", "lr=inf"], "lr must be a finite number > 0, got inf"),
    (["--set", "bogus=1"], "--set: unknown run-config key 'bogus'"),
    (["--set", "noequals"], "--set expects key=value"),
    (["--rounds", "0"], "num-server-rounds"),
])
def test_bad_overrides(tmp_path, capsys, monkeypatch, argv, expect):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    monkeypatch.setattr(cli, "run_one", lambda *a, **k: pytest.fail("training started"))
    assert cli.main(["run", str(path), *argv]) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err


def test_compare_runs_the_valid_scenarios(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text(TINY)
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.replace("num-nodes = 2", "num-nodes = 2.5"))
    missing = tmp_path / "missing.toml"
    out = tmp_path / "cmp"
    assert cli.main(["compare", str(good), str(bad), str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml: num-nodes must be an integer" in err and "missing.toml: no such scenario file" in err
    assert "Traceback" not in err
    assert (out / "good" / "metrics.json").exists() and not (out / "bad").exists()
    assert [s["out-dir"] for s in json.loads((out / "summary.json").read_text())] == [str((out / "good").resolve())]


def test_sweep_skips_the_invalid_values(tmp_path, capsys):
    base = tmp_path / "ist.toml"
    base.write_text(TINY.replace('"fedavg"', '"ist"') + "num-subnets = 2\n")
    out = tmp_path / "sw"
    assert cli.main(["sweep", str(base), "--vary", "num-subnets=1,3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "num-subnets=3: " in err and "num-subnets (3) must not exceed num-nodes (2)" in err
    assert json.loads((out / "sweep.json").read_text())["values"] == [1]


def test_sweep_of_a_bad_file_reports_it_once(tmp_path, capsys):
    base = tmp_path / "bad.toml"
    base.write_text("lr = ")
    assert cli.main(["sweep", str(base), "--vary", "num-subnets=1,2,3"]) == 2
    err = capsys.readouterr().err
    assert err.count("not valid TOML") == 1


def test_sweep_varies_keys_together(tmp_path, capsys):
    base = tmp_path / "ist.toml"
    base.write_text(TINY.replace('"fedavg"', '"ist"') + "num-subnets = 2\n")
    out = tmp_path / "sw"
    assert cli.main(["sweep", str(base), "--vary", "num-subnets=2,3", "--vary", "num-nodes=2,3",
                     "--out", str(out)]) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert result["key"] == "num-subnets+num-nodes" and result["values"] == ["2/2", "3/3"]
    for name, nodes in (("ist-num-subnets-2-num-nodes-2", 2), ("ist-num-subnets-3-num-nodes-3", 3)):
        assert json.loads((out / name / "config.json").read_text())["num-nodes"] == nodes
    assert set(result["flattened"]) == set(result["floors"]) == {"ist-num-subnets-2-num-nodes-2",
                                                                 "ist-num-subnets-3-num-nodes-3"}


@pytest.mark.parametrize("vary,message", [
    (["num-subnets=1,2", "num-nodes=2"], "as many values each, got num-subnets: 2, num-nodes: 1"),
    (["num-subnets=1,2", "num-subnets=3,4"], "num-subnets given twice"),
    (["num-subnets"], "--vary expects KEY=V1,V2,..."),
])
def test_sweep_refuses_mismatched_vary(tmp_path, capsys, vary, message):
    base = tmp_path / "ist.toml"
    base.write_text(TINY)
    assert cli.main(["sweep", str(base), *[a for v in vary for a in ("--vary", v)]]) == 2
    assert message in capsys.readouterr().err
