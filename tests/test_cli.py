"""The command line: `python -m fedpara.run --preset ... --profile smoke` end to end, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest

from fedpara.config import ExperimentConfig, get_preset
from fedpara.history import History
from fedpara.run import main


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "fedpara.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_runs_a_smoke_preset_and_writes_its_history(fmnist_dir, tmp_path):
    done = run_cli("--preset", "fmnist-noniid", "--variant", "fedpara", "--profile", "smoke",
                   "--set", f"data_dir={fmnist_dir}", "--set", "device=cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    path = tmp_path / "results" / "fmnist-noniid" / "fedpara-smoke.json"
    history = History.load(path)
    config = get_preset("fmnist-noniid", variant="fedpara", profile="smoke")
    assert len(history) == config.rounds
    assert history.config["model"] == "cnn" and history.config["parameterization"] == "fedpara"
    assert all(r.eval_examples == config.eval_samples and r.bytes_up > 0 for r in history.records)
    assert str(path.relative_to(tmp_path)) in done.stdout  # says where the history went
    # checkpoints went to the default place, so --resume can pick them up
    assert list((tmp_path / "checkpoints" / "fmnist-noniid" / "fedpara-smoke").glob("round-*.pt"))
    assert "round" in done.stderr  # the progress bar (tqdm writes to stderr)


@pytest.mark.parametrize("args, message", [
    (["--preset", "fmnist-noniid", "--set", "clients_per_round=50"], "clients_per_round"),
    (["--preset", "fmnist-noniid", "--set", "gamma=2"], "gamma"),
    (["--preset", "fmnist-noniid", "--variant", "pfedpara"], "variant"),
    (["--preset", "fmnist-personal", "--set", "parameterization=original",
      "--variant", "pfedpara"], "parameterization"),
    (["--preset", "nope"], "preset"),
    (["--preset", "fmnist-noniid", "--set", "colour=red"], "colour"),
])
def test_bad_config_exits_with_status_2_before_loading_data(args, message, tmp_path, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err
    assert not (tmp_path / "data").exists()


def test_bad_config_from_the_shell_exits_2(tmp_path):
    done = run_cli("--preset", "fmnist-noniid", "--set", "model=resnet", cwd=tmp_path)
    assert done.returncode == 2
    assert "model='resnet'" in done.stderr and "vgg16, mlp, cnn" in done.stderr


def test_list_names_every_preset(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("cifar10-iid", "cifar100-noniid", "femnist-personal", "fmnist-personal"):
        assert name in out


def test_run_config_file_matches_the_preset(tmp_path, capsys):
    path = tmp_path / "run.toml"
    assert main(["--preset", "cifar10-noniid", "--variant", "fedpara", "--profile", "quick",
                 "--set", "seed=4", "--write-run-config", str(path)]) == 0
    with open(path, "rb") as f:
        run_config = tomllib.load(f)
    config = ExperimentConfig.from_run_config(run_config)
    expected = get_preset("cifar10-noniid", variant="fedpara", profile="quick", seed=4)
    assert config == expected.replace(checkpoint_dir="checkpoints/cifar10-noniid/fedpara-quick")
    # every key is one `flwr run` accepts: declared in pyproject's [tool.flwr.app.config]
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    assert set(run_config) <= set(declared)
