"""A checkpoint is verified before a run continues from it, and a run may be resumed with
other defences: the ServerApp's ``resume-from`` continues a saved run.

Each damage below used to be resumed silently: NaN weights were re-saved as later rounds,
a flipped exponent bit ran on until the loss diverged, an edited ``server-round`` skipped
rounds, a deleted ``metrics.json`` dropped the earlier rows. Each is now refused naming
the file and the reason, and nothing in the folder is written.
"""

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from fl_subnet.checkpoint import (DIGEST_KEY, MODEL_FILE, STATE_FILE, CheckpointError, checkpoint_digest,
                                  load_checkpoint, load_model, save_checkpoint, save_model)
from fl_subnet.experiments.config import RESUMABLE_KEYS, RunConfig
from test_resume import VALUES, run


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    run(out, 2)
    return out


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name, data in folder_bytes(src).items():
        (dst / name).write_bytes(data)
    return dst


def assert_refused(folder: Path, match: str) -> None:
    """Resuming (as ``fl-subnet run --resume`` and the ServerApp's ``resume-from`` do)
    raises CheckpointError matching ``match`` and writes nothing there."""
    from fl_subnet.experiments.cli import run_one

    before = folder_bytes(folder)
    with pytest.raises(CheckpointError, match=match):
        run_one({**VALUES, "num-server-rounds": 4}, folder, resume=True)
    with pytest.raises(CheckpointError, match=match):
        server_app_run({**VALUES, "num-server-rounds": 4, "resume-from": str(folder)})
    assert folder_bytes(folder) == before


def test_digest_covers_every_tensor_byte_and_the_header():
    """Independent check: the digest is sha256 over the canonical header JSON then each
    tensor's name, dtype, shape and bytes; one flipped bit or header field changes it."""
    import hashlib

    state = {"b": torch.tensor([1.5, -2.0]), "a": torch.arange(6, dtype=torch.int64).reshape(2, 3),
             "s": torch.tensor(3.0, dtype=torch.float64)}
    meta = {"server-round": 2, "config": {"lr": 0.1}}
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in ("a", "b", "s"):
        t = state[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    assert checkpoint_digest(state, meta) == h.hexdigest()
    assert checkpoint_digest(state, {**meta, DIGEST_KEY: "x"}) == h.hexdigest()  # the digest itself left out
    flipped = dict(state, b=torch.tensor([1.5, -2.0]).view(torch.int32).bitwise_xor(1 << 30).view(torch.float32))
    assert checkpoint_digest(flipped, meta) != h.hexdigest()
    assert checkpoint_digest(state, {**meta, "server-round": 3}) != h.hexdigest()


def test_nan_weights_are_not_resumed(two_rounds, tmp_path):
    folder = copy_run(two_rounds, tmp_path / "nan")
    state, meta = load_checkpoint(folder)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)
    state[name][0, 0] = float("nan")
    save_checkpoint(folder, state, meta)  # a consistent digest: the finiteness check must catch it
    assert_refused(folder, f"tensor '{name}' holds NaN or Inf")


def test_a_flipped_exponent_bit_is_refused(two_rounds, tmp_path):
    folder = copy_run(two_rounds, tmp_path / "bit")
    path = folder / MODEL_FILE
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 + header_len + 3] ^= 0x20  # an exponent bit of the first float32 (little-endian high byte)
    path.write_bytes(bytes(data))
    state = load_model(path)  # still a loadable file of finite values
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    assert_refused(folder, "digest does not match")


def test_an_edited_server_round_is_refused(two_rounds, tmp_path):
    folder = copy_run(two_rounds, tmp_path / "header")
    state, meta = load_checkpoint(folder)
    save_model(folder / MODEL_FILE, state, {**meta, "server-round": 3})  # the header edited, digest kept
    assert_refused(folder, "digest does not match")
    folder = copy_run(two_rounds, tmp_path / "json")
    (folder / STATE_FILE).write_text(json.dumps({**meta, "server-round": 3}))
    assert_refused(folder, "header says server-round 2 but checkpoint.json says 3")


@pytest.mark.parametrize("readable", ["missing", "one round behind"])
def test_a_kill_between_the_model_file_and_its_readable_copy_resumes(two_rounds, tmp_path, readable, caplog):
    """checkpoint.json is written after the model file: a SIGKILL between the two leaves it
    missing (round 0) or one round behind. The verified model file wins, with a warning."""
    folder = copy_run(two_rounds, tmp_path / "window")
    state, meta = load_checkpoint(folder)
    if readable == "missing":
        (folder / STATE_FILE).unlink()
    else:
        (folder / STATE_FILE).write_text(json.dumps({**meta, "server-round": 1}))
    assert load_checkpoint(folder)[1]["server-round"] == 2
    assert any("stopped between the two writes" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["deleted", "gap"])
def test_missing_metrics_rows_are_refused(two_rounds, tmp_path, damage):
    folder = copy_run(two_rounds, tmp_path / damage)
    if damage == "deleted":
        (folder / "metrics.json").unlink()
        assert_refused(folder, "metrics.json is missing")
    else:
        rows = json.loads((folder / "metrics.json").read_text())
        (folder / "metrics.json").write_text(json.dumps([rows[0], rows[2]]))
        assert_refused(folder, r"holds rounds \[0, 2\]")


def test_a_checkpoint_without_a_digest_loads_with_a_warning(two_rounds, tmp_path, caplog):
    """Written by an older fl-subnet: still resumed (finiteness and round still checked)."""
    folder = copy_run(two_rounds, tmp_path / "old")
    state, meta = load_checkpoint(folder)
    del meta[DIGEST_KEY]
    save_model(folder / MODEL_FILE, state, meta)
    (folder / STATE_FILE).write_text(json.dumps(meta))
    assert load_checkpoint(folder)[1]["server-round"] == 2
    assert any("without a digest" in r.getMessage() for r in caplog.records)


def test_resume_may_switch_defences_on_but_not_change_the_experiment(two_rounds, tmp_path):
    folder = copy_run(two_rounds, tmp_path / "defended")
    run(folder, 3, resume=True, **{"max-ratio-to-median": 3.0, "max-num-examples": 500, "round-timeout": 600.0})
    assert load_checkpoint(folder)[1]["config"]["max-ratio-to-median"] == 3.0
    assert [r["server-round"] for r in json.loads((folder / "metrics.json").read_text())] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"\['keep-prob'\] differ.*may change only"):
        run(folder, 4, resume=True, **{"keep-prob": 0.25, "max-ratio-to-median": 3.0})
    assert {"max-ratio-to-median", "aggregation", "num-server-rounds"} <= RESUMABLE_KEYS
    assert "lr" not in RESUMABLE_KEYS and "seed" not in RESUMABLE_KEYS


def server_app_run(values: dict) -> None:
    """The fl-subnet ServerApp's main, as ``flwr run`` calls it, on the in-process grid."""
    import fl_subnet.app.client_app
    from fl_subnet.app.server_app import main
    from fl_subnet.experiments.inprocess_grid import InProcessGrid

    grid = InProcessGrid(fl_subnet.app.client_app.app, values["num-nodes"], run_config=values)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=values)
    main(grid, context)


def test_server_app_resume_from_continues_to_the_uninterrupted_model(tmp_path):
    """``resume-from`` in the run config: the ServerApp continues the saved run in its
    folder and ends with the model and rows of the uninterrupted run."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    server_app_run({**VALUES, "num-server-rounds": 3, "out-dir": str(full)})
    server_app_run({**VALUES, "num-server-rounds": 2, "out-dir": str(cut)})
    server_app_run({**VALUES, "num-server-rounds": 3, "resume-from": str(cut)})
    a, b = load_model(full / MODEL_FILE), load_model(cut / MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = (json.loads((d / "metrics.json").read_text()) for d in (full, cut))
    assert [r["server-round"] for r in rows_b] == [0, 1, 2, 3]
    assert [r["eval-acc"] for r in rows_a] == [r["eval-acc"] for r in rows_b]
    assert json.loads((cut / "config.json").read_text())["resume-from"] == str(cut)
    with pytest.raises(FileNotFoundError, match="resume-from: .* holds no checkpoint"):
        server_app_run({**VALUES, "resume-from": str(tmp_path / "nothing")})


def test_resume_from_is_refused_by_the_command_line_runner(tmp_path):
    from fl_subnet.experiments.cli import run_one

    with pytest.raises(ValueError, match="resume-from is the ServerApp's key"):
        run_one({**VALUES, "resume-from": str(tmp_path)}, tmp_path / "out")
    assert RunConfig.from_mapping({**VALUES, "resume-from": ""}).resume_from == ""
    assert math.isfinite(RunConfig().round_timeout)


def test_a_centered_clipping_run_resumes_to_the_uninterrupted_model(tmp_path):
    """Centered clipping starts each round from the previous round's aggregate update;
    the checkpoint keeps it (clip-center-<r>.safetensors), so a resumed run is exact. (One
    iteration: with more, an iteration that clips no reply returns the plain mean, which
    no longer depends on the start.)"""
    from fl_subnet.checkpoint import load_clip_center

    over = {"aggregation": "centered-clip", "clip-iterations": 1}
    run(tmp_path / "full", 3, **over)
    run(tmp_path / "cut", 2, **over)
    center = load_clip_center(tmp_path / "cut", 2)
    assert center and any(bool(v.abs().sum() > 0) for v in center.values())
    stripped = copy_run(tmp_path / "cut", tmp_path / "stripped")
    (stripped / "clip-center-2.safetensors").unlink()
    run(tmp_path / "cut", 3, resume=True, **over)
    run(stripped, 3, resume=True, **over)
    assert sorted(p.name for p in (tmp_path / "cut").glob("clip-center-*")) == ["clip-center-3.safetensors"]
    full, cut, without = (load_model(d / MODEL_FILE) for d in (tmp_path / "full", tmp_path / "cut", stripped))
    assert all(torch.equal(full[k], cut[k]) for k in full)
    assert not all(torch.equal(full[k], without[k]) for k in full)  # the centre mattered
