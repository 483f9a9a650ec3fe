"""A real local deployment over TLS, with SuperNode authentication, all on loopback.

The test makes its own CA and server certificate (``tls_certs``), starts a SuperLink
with ``--ssl-*`` files and ``--enable-supernode-auth``, registers two SuperNode public
keys with ``flwr supernode register``, starts the two SuperNodes with
``--root-certificates`` and ``--auth-supernode-private-key`` and runs one round of the
app with ``flwr run`` through a ``root-certificates`` connection. It also checks that
the SuperLink serves TLS only, and that a SuperNode with an unregistered key, or one
that does not trust the CA, is turned away. Slow like ``test_deployment.py``: each
message starts a ClientApp process that imports torch.
"""

import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flower_processes import (
    Processes,
    binary,
    flower_env,
    flwr_run,
    free_ports,
    http_ok,
    missing_binaries,
    wait_until,
)
from tls_certs import TlsFiles, write_supernode_keys, write_tls_files

NUM_NODES = 2
CONNECTION = "fl-subnet-tls"
OVERRIDES = {"strategy": "ist", "num-subnets": 2, "num-server-rounds": 1, "num-nodes": NUM_NODES,
             "lr": 0.5, "local-steps": 50, "seed": 0}

pytestmark = pytest.mark.slow


def write_tls_flower_config(flwr_home: Path, address: str, ca_cert: Path) -> Path:
    """``$FLWR_HOME/config.toml``: the default connection trusts ``ca_cert`` (TLS)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n'
                    f'[superlink.{CONNECTION}]\naddress = "{address}"\n'
                    f'root-certificates = "{ca_cert}"\n')
    return path


def https_status(url: str, context: ssl.SSLContext | None) -> int | str:
    """HTTP status of ``url``, or the error's text (certificate, connection...)."""
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))


def start_tls_superlink(procs: Processes, port: int, tls: TlsFiles) -> None:
    """A SuperLink serving its Fleet, Control and Runtime APIs over HTTPS on ``port``."""
    procs.start("superlink", [
        binary("flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
        "--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
        "--ssl-keyfile", str(tls.server_key), "--enable-supernode-auth",
        "--disable-runtime-dependency-installation"])
    trusting = ssl.create_default_context(cafile=str(tls.ca_cert))
    wait_until(lambda: https_status(f"https://127.0.0.1:{port}/health", trusting) == 200, 60,
               "the SuperLink (https)", check=lambda: procs.check_alive("superlink"))


def register_supernodes(env: dict[str, str], public_keys: list[Path]) -> list[int]:
    """``flwr supernode register <key.pub>`` for each key (in parallel): the node ids."""
    calls = [subprocess.Popen([binary("flwr"), "supernode", "register", str(key), CONNECTION,
                               "--format", "json"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key in public_keys]
    node_ids = []
    try:
        for call in calls:
            output, errors = call.communicate(timeout=60)
            assert call.returncode == 0, output + errors
            node_ids.append(int(json.loads(output[output.index("{"):])["node-id"]))
    finally:
        for call in calls:
            if call.poll() is None:
                call.kill()
                call.wait()
    return node_ids


def read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


@pytest.mark.skipif(bool(missing_binaries("flwr", "flower-superlink", "flower-supernode")),
                    reason="Flower executables not installed")
def test_tls_deployment_with_supernode_auth(tmp_path):
    out_dir = tmp_path / "out"
    home = tmp_path / "flwr-home"
    tls = write_tls_files(tmp_path / "certs")
    port, *node_ports = free_ports(1 + NUM_NODES + 2)
    node_ports, rejected_ports = node_ports[:NUM_NODES], node_ports[NUM_NODES:]
    write_tls_flower_config(home, f"127.0.0.1:{port}", tls.ca_cert)
    overrides = {**OVERRIDES, "out-dir": str(out_dir)}
    procs = Processes(tmp_path / "logs", flower_env(home))
    # SuperNodes expected to fail; kept apart as flwr_run requires all of `procs` alive.
    rejected = Processes(tmp_path / "logs-rejected", procs.env)
    try:
        start_tls_superlink(procs, port, tls)

        # TLS only: plain HTTP gets no answer, HTTPS without the test CA is refused.
        assert not http_ok(f"http://127.0.0.1:{port}/health")
        untrusting = ssl.create_default_context()
        assert "CERTIFICATE_VERIFY_FAILED" in str(
            https_status(f"https://127.0.0.1:{port}/health", untrusting))

        keys = [write_supernode_keys(tmp_path / "keys", f"supernode-{i}") for i in range(NUM_NODES)]
        node_ids = register_supernodes(procs.env, [public for _, public in keys])
        intruder_key, _ = write_supernode_keys(tmp_path / "keys", "intruder")  # never registered

        # `--isolation process`: these never get to run a ClientApp, so no SuperExec child.
        rejected.start("unregistered-key", [
            binary("flower-supernode"), "--root-certificates", str(tls.ca_cert),
            "--superlink", f"127.0.0.1:{port}", "--port", str(rejected_ports[0]),
            "--auth-supernode-private-key", str(intruder_key), "--isolation", "process"])
        # A registered key, but only the system trust store: refused for TLS alone.
        rejected.start("untrusted-ca", [
            binary("flower-supernode"), "--superlink", f"127.0.0.1:{port}",
            "--port", str(rejected_ports[1]), "--auth-supernode-private-key", str(keys[0][0]),
            "--isolation", "process"])

        for i, ((private, _), node_port) in enumerate(zip(keys, node_ports, strict=True)):
            procs.start(f"supernode-{i}", [
                binary("flower-supernode"), "--root-certificates", str(tls.ca_cert),
                "--superlink", f"127.0.0.1:{port}", "--port", str(node_port),
                "--auth-supernode-private-key", str(private),
                "--node-config", f"partition-id={i} num-partitions={NUM_NODES}"])

        for name, proc, log in rejected.procs:
            wait_until(lambda p=proc: p.poll() is not None, 60, f"the {name} SuperNode to give up")
            assert proc.returncode != 0, name
        unregistered, untrusted = (read(log) for _, _, log in rejected.procs)
        assert "Failed to activate SuperNode" in unregistered, unregistered
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted, untrusted
        superlink_log = procs.log_dir / "superlink.log"
        assert "No SuperNode found with the given public key" in read(superlink_log)

        # Each registered SuperNode is activated under the id its public key got.
        for i, node_id in enumerate(node_ids):
            log = procs.log_dir / f"supernode-{i}.log"
            wait_until(lambda log=log, node_id=node_id: f"SuperNode ID: {node_id}" in read(log),
                       60, f"supernode-{i} to be activated", check=procs.check_alive)

        started = time.monotonic()
        flwr_run(procs, CONNECTION, overrides, out_dir, timeout=300)
        print(f"one TLS round: {time.monotonic() - started:.1f} s")
        rows = json.loads((out_dir / "metrics.json").read_text())
        assert json.loads((out_dir / "summary.json").read_text())["rounds"] == 1
        assert [r["server-round"] for r in rows] == [0, 1]
        assert rows[1]["bytes-down"] > 0 and rows[1]["bytes-up"] > 0, rows
        assert (out_dir / "model.safetensors").is_file()
        # Both registered nodes replied through the authenticated Fleet API over HTTPS.
        text = read(superlink_log)
        assert "Uvicorn running on https://127.0.0.1" in text
        for node_id in node_ids:
            assert f"Push replies from node_id={node_id}" in text
    except BaseException:
        print(procs.tails())
        print(rejected.tails())
        raise
    finally:
        rejected.stop_all()
        procs.stop_all()
