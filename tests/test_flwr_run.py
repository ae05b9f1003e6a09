"""The same apps under `flwr run .`: the local simulation federation, and a loopback deployment.

Offline and private: the app runs in this environment
(FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1, no `uv sync`), with its own FLWR_HOME and
RAY_TMPDIR, no update check, and its own ports for the local SuperLink, which `flwr run` leaves
running detached: the test stops it by PID. `flwr run` exits 0 even when the run failed, so the
run's status comes from `flwr ls`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("VENV_BIN", REPO / ".venv" / "bin"))

pytestmark = pytest.mark.skipif(not (BIN / "flwr").exists(), reason=f"no flwr in {BIN}")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def listening_pid(port: int) -> int | None:
    """PID of the process listening on 127.0.0.1:`port` (from `ss`), if any."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True,
                         text=True).stdout
    for part in out.split("pid=")[1:]:
        return int(part.split(",")[0])
    return None


def test_flwr_run_on_the_local_simulation_federation(fmnist_dir, tmp_path):
    http_port, control_port = free_ports(2)
    flwr_home = tmp_path / "flwr-home"
    results = tmp_path / "results"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "FLWR_HOME": str(flwr_home),
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp"),  # Ray's socket paths are short
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "UV_OFFLINE": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
    }
    run_config = (f"rounds=2 client-samples=1000 eval-samples=2000 device='cpu' "
                  f"data-dir='{fmnist_dir}' results-dir='{results}'")
    try:
        done = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "--stream", "--run-config", run_config,
             "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        listed = subprocess.run([str(BIN / "flwr"), "ls", "--format", "json"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
        runs = json.loads(listed.stdout)["runs"]
    finally:
        pid = listening_pid(http_port)
        if pid is not None and str(flwr_home) in Path(f"/proc/{pid}/cmdline").read_text():
            os.killpg(pid, signal.SIGTERM)  # the SuperLink leads its own session
            for _ in range(50):
                if listening_pid(http_port) is None:
                    break
                time.sleep(0.2)

    assert [r["status"] for r in runs] == ["finished:completed"], done.stdout[-3000:]
    history = json.loads((results / "custom" / "fedpara-smoke.json").read_text())
    assert [r["round"] for r in history["records"]] == [1, 2]
    assert history["config"]["num_clients"] == 2 and history["config"]["client_samples"] == 1000
    assert "history saved to" in done.stdout
    assert listening_pid(http_port) is None  # torn down


@pytest.mark.parametrize("nodes, partitions, overrides", [
    (2, 2, ""),  # one partition each, as on separate machines
    # two nodes holding blocks of 3 and 2; pFedPara keeps each partition's W2 on its node
    (2, 5, "clients-per-round=3 algorithm='pfedpara' evaluation='clients'"),
    # one node trains each round's cohort, in a fedpara.worker its ClientApps forward to
    (1, 4, "clients-per-round=3 engine='cohort'"),
], ids=["one-partition-each", "blocks-pfedpara", "one-node-cohort-worker"])
def test_loopback_deployment(fmnist_dir, tmp_path, nodes, partitions, overrides):
    """A SuperLink and SuperNodes holding `partitions` partitions on loopback (~1 min each)."""
    script = REPO / "scripts" / "local_deployment.sh"
    worker = "engine='cohort'" in overrides
    env = {**os.environ, "NODES": str(nodes), "PARTITIONS": str(partitions),
           "RESULTS_DIR": str(tmp_path / "results"), "WORKER": str(int(worker))}
    done = subprocess.run(
        [str(script), f"rounds=1 client-samples=500 data-dir='{fmnist_dir}' {overrides}"],
        cwd=REPO, capture_output=True, text=True, timeout=500, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "runs: ['finished:completed']" in done.stdout
    assert "loopback deployment: OK" in done.stdout
    # the worker trained every round (one cohort message each), or no worker ran
    assert ("worker: served 1 requests, failed 0" in done.stdout) == worker
    [path] = (tmp_path / "results").rglob("*.json")
    history = json.loads(path.read_text())
    config, records = history["config"], history["records"]
    assert config["num_clients"] == partitions
    # the run's settings are the ones asked for (a dropped override would pass unnoticed below)
    assert config["engine"] == ("cohort" if "engine='cohort'" in overrides else "client")
    assert (config["algorithm"] == "pfedpara") == ("algorithm='pfedpara'" in overrides)
    assert len(records) == config["rounds"]
    for record in records:  # every sampled partition trained, and its traffic was counted
        assert len(record["clients"]) == config["clients_per_round"]
        assert record["bytes_up"] > 0 and record["bytes_up"] % config["clients_per_round"] == 0
    if config["algorithm"] == "pfedpara":  # scored on their own data, with their kept part
        assert records[-1]["eval_clients"] >= config["clients_per_round"]


def test_deployment_rounds_on_a_node_without_flwr_datasets(tmp_path):
    """benchmarks/deployment_rounds.py as on the GPU machine: the split stored beforehand
    (--prepare), then a deployment whose processes cannot import datasets or flwr-datasets, one
    SuperNode holding all 100 partitions and training each round's cohort; its rounds' wall
    time is compared with a projection from a throughput record."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import deployment_rounds

    splits = tmp_path / "splits"
    tiny = ["--device", "cpu", "--set", "clients_per_round=2", "--set", "client_samples=8",
            "--set", "local_epochs=1", "--set", "eval_samples=16", "--train-images", "10000",
            "--test-images", "100", "--splits", str(splits)]
    deployment_rounds.main([*tiny, "--prepare"])
    [stored] = splits.glob("split-dirichlet-100-*.npz")
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nfor name in ('datasets', 'flwr_datasets'):\n"
        "    sys.modules[name] = None  # import raises ImportError\n")
    over = {"client_setup_seconds": 0.5, "trip_seconds": 0.25,
            "average_seconds_per_client": 0.0, "eval_seconds_per_image": 1e-3}
    throughput = tmp_path / "throughput.json"
    throughput.write_text(json.dumps({  # what benchmarks/throughput.py writes, the keys used
        "device": "test", "overheads": {"fedpara-0.1": over}, "settings": {"batch": 64},
        "cohort": {"fedpara-0.1": {"clients": 2, "samples_per_client": 500}},
        "round_images_per_second": {"fedpara-0.1": 80.0},
        "images_per_second": {"fedpara-0.1": {"default": 40.0}}}))
    out = tmp_path / "deployment.json"
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    done = subprocess.run(
        [str(BIN / "python"), str(REPO / "benchmarks" / "deployment_rounds.py"), *tiny,
         "--rounds", "2", "--throughput", str(throughput), "--poll-seconds", "0.5",
         "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [p.name for p in splits.glob("*.npz")] == [stored.name]  # read, not recomputed
    record = json.loads(out.read_text())
    assert record["engine"] == "cohort" and record["config"]["num_clients"] == 100
    assert record["server_poll_seconds"] == 0.5
    assert len(record["round_wall_seconds"]) == 2
    assert record["median_round_seconds_after_first"] == record["round_wall_seconds"][1]
    projection = record["projection"]
    # the average client: 2 clients x (0.5 setup + 8 images / 80 images/s), 3 trips of 0.25 s
    # (the cohort's one message down, a reply per client up) + 16 x 1e-3 s
    assert projection["path"] == "cohort"
    assert projection["seconds_per_round"] == pytest.approx(2 * (0.5 + 0.1) + 0.75 + 0.016)
    # the sampled clients: 8 images each, padded by the cohort engine to one batch of 64 each,
    # trained at the measurement's rate per padded slot (its clients: 500 images in 512 slots)
    assert record["round_client_sizes"] == [[8, 8], [8, 8]]
    assert projection["slots_per_image"] == 512 / 500
    per_round = 2 * 0.5 + 0.75 + 2 * 64 / (80 * 512 / 500) + 0.016
    assert record["projected_round_seconds"] == pytest.approx([per_round, per_round])
    assert record["measured_to_projected"] == pytest.approx(
        record["round_wall_seconds"][1] / per_round)
