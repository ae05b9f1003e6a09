"""The fast training path: its switches, its correctness against the plain path, the benchmark
scripts, and the GPU check (run here on the CPU in its tiny mode, with Flower made unimportable).

Torch runs on one thread: the machine is shared, and two threads under load are much slower.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import types
import weakref
from pathlib import Path

import pytest
import torch

from fedpara import layers, task
from fedpara.config import ExperimentConfig, get_preset
from fedpara.models import build_model

ROOT = Path(__file__).resolve().parents[1]
FAST_MATH = task.Speed(bf16=True, channels_last=True)  # the CUDA options, forced on the CPU


pytestmark = pytest.mark.usefixtures("one_thread")
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"  # mallopt's home


def _load_throughput():
    path = ROOT / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cnn_config(**changes) -> ExperimentConfig:
    values = dict(dataset="fashion-mnist", model="cnn", parameterization="fedpara", gamma=0.1,
                  device="cpu")
    return ExperimentConfig(**{**values, **changes})


def batch_list(n_batches: int = 3, batch: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(n_batches)
    ]


# the switches ----------------------------------------------------------------------------------


def test_fast_options_per_device():
    # the captured step on CUDA, in float32: under the graph bf16 autocast measured no faster,
    # and eager it measured slower (book/performance.md)
    assert task.Speed.default("cuda") == task.Speed(bf16=False, channels_last=True,
                                                    cudnn_benchmark=True, graph=True)
    assert task.Speed.default("cuda:1", fast=False) == task.PLAIN
    # a CPU keeps the plain arithmetic (fp32, contiguous: same numbers); it only keeps its memory
    assert task.Speed.default("cpu") == task.Speed(retain_memory=True)
    assert task.Speed.default("cpu", fast=False) == task.PLAIN
    assert task.Speed.default("mps") == task.PLAIN


@pytest.mark.parametrize(("speed", "calls"), [(None, 1), (task.PLAIN, 0)])
def test_train_on_a_cpu_keeps_freed_memory_on_the_fast_path_only(speed, calls, monkeypatch):
    seen = []
    monkeypatch.setattr(task, "retain_freed_memory", lambda: seen.append(1) or True)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    batches = task.TensorBatches(x, y, batch_size=16, shuffle=False)
    task.train(task.init_model(cnn_config()), batches, epochs=1, lr=0.1, speed=speed)
    assert len(seen) == calls


# Allocations shaped like a FedPara step's: dense-sized tensors kept a few "layers" long, then
# freed together; minor page faults counted before and after the setting, and a FedPara CNN
# trained before and after it. In a fresh process: the setting cannot be undone, and the test
# process may have it already (CPU training on the fast path sets it).
_FAULTS_SCRIPT = """
import json, resource, torch
from fedpara import task
from fedpara.config import ExperimentConfig
from fedpara.task import retain_freed_memory
def trained():
    config = ExperimentConfig(dataset="fashion-mnist", model="cnn", parameterization="fedpara",
                              gamma=0.1, device="cpu")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))
               for _ in range(3)]
    torch.manual_seed(0)
    model = task.init_model(config)
    loss = task.train(model, batches, epochs=1, lr=0.1, speed=task.PLAIN, seed=3).loss
    return loss, model.state_dict()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def steps():
    kept = []
    for _ in range(90):
        a, b = torch.ones(2_400_000), torch.ones(2_400_000)
        kept.append(a * b)
        if len(kept) > 4:
            kept.clear()
        del a, b
def counted():
    steps()  # the allocator's state settles
    before = faults()
    steps()
    return faults() - before
before, default = trained(), counted()
unasked = task.freed_memory_retained()  # asking applies nothing
applied = retain_freed_memory()
after = trained()
print(json.dumps({"default": default, "unasked": unasked, "applied": applied,
                  "again": retain_freed_memory(), "known": task.freed_memory_retained(),
                  "retained": counted(), "same_loss": before[0] == after[0],
                  "same_weights": all(torch.equal(a, b) for a, b in
                                      zip(before[1].values(), after[1].values(), strict=True))}))
"""


def test_retain_freed_memory_stops_repeated_page_faults_and_changes_no_number():
    if not GLIBC:
        pytest.skip("glibc's allocator only")
    done = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120, check=True)
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["applied"] is True and counts["again"] is True
    assert counts["unasked"] is False and counts["known"] is True
    # by default, 9.6 MB blocks freed go back to the kernel and fault in again, page by page
    # (how many depends on where the heap lands); kept mapped, the steps reuse their memory
    assert counts["default"] > 10_000, counts
    assert counts["retained"] < counts["default"] / 10, counts
    # where the memory comes from changes no number
    assert counts["same_loss"] and counts["same_weights"], counts


@pytest.mark.parametrize("fast_batches", [True, False])
def test_train_on_a_cpu_uses_the_plain_arithmetic_by_default(fast_batches, monkeypatch, fmnist):
    seen = []
    step = task.train_step
    monkeypatch.setattr(task, "train_step",
                        lambda *a, **kw: seen.append(kw["bf16"]) or step(*a, **kw))
    config = cnn_config(fast_batches=fast_batches)
    batches = task.make_batches(fmnist[0], range(32), config, torch.device("cpu"), train=True,
                                seed=0)
    task.train(task.init_model(config), batches, epochs=1, lr=0.1)
    assert seen == [False]


def test_each_fedpara_weight_is_composed_once_per_step(monkeypatch):
    model = task.init_model(cnn_config())
    fedpara_layers = [m for m in model.modules() if isinstance(m, layers.FedParaConv2d)]
    calls = []
    forward = layers._FedParaWeight.forward
    monkeypatch.setattr(layers._FedParaWeight, "forward",
                        staticmethod(lambda ctx, *a: calls.append(1) or forward(ctx, *a)))
    task.train(model, batch_list(n_batches=2), epochs=1, lr=0.1, speed=FAST_MATH)
    assert len(fedpara_layers) > 0
    assert len(calls) == 2 * len(fedpara_layers)  # 2 steps, one composition per layer and step


def test_channels_last_changes_the_layout_not_the_result():
    batches = batch_list()
    plain, fast = task.init_model(cnn_config()), task.init_model(cnn_config())
    r_plain = task.train(plain, batches, epochs=1, lr=0.1, speed=task.PLAIN)
    r_fast = task.train(fast, batches, epochs=1, lr=0.1, speed=task.Speed(channels_last=True))
    assert r_fast.loss == pytest.approx(r_plain.loss, rel=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
        assert q.is_contiguous(), f"{name} left in channels-last"


def test_bf16_autocast_changes_the_arithmetic_a_little():
    batches = batch_list()
    plain, fast = task.init_model(cnn_config()), task.init_model(cnn_config())
    r_plain = task.train(plain, batches, epochs=1, lr=0.1, speed=task.PLAIN)
    r_fast = task.train(fast, batches, epochs=1, lr=0.1, speed=task.Speed(bf16=True))
    assert r_fast.loss != r_plain.loss  # autocast is really on
    assert r_fast.loss == pytest.approx(r_plain.loss, rel=1e-2)
    for p in fast.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()  # weights stay fp32


def test_arrays_leave_contiguous_whatever_the_layout():
    model = task.init_model(cnn_config()).to(memory_format=torch.channels_last)
    arrays = task.get_arrays(model, task.split_keys(model, "fedavg")[0])
    assert all(a.is_contiguous() for a in arrays.values())


def test_init_model_copies_one_seeded_initialization():
    config = cnn_config(seed=3)
    before = torch.random.get_rng_state()
    a, b = task.init_model(config), task.init_model(config)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's stream is untouched
    torch.manual_seed(3)
    fresh = build_model("cnn", num_classes=10, in_channels=1, parameterization="fedpara", gamma=0.1)
    for (name, p), q, r in zip(a.state_dict().items(), b.state_dict().values(),
                               fresh.state_dict().values(), strict=True):
        assert torch.equal(p, q) and torch.equal(p, r), name
    with torch.no_grad():
        next(a.parameters()).add_(1.0)  # copies are independent
    assert not torch.equal(next(a.parameters()), next(b.parameters()))
    assert not torch.equal(next(task.init_model(config.replace(seed=4)).parameters()),
                           next(b.parameters()))


# correctness on real data ---------------------------------------------------------------------


def test_fast_path_follows_the_plain_trajectory_on_fashion_mnist(fmnist_dir):
    """Three FedAvg rounds without Flower: fast path (device tensors + bf16 + channels-last,
    forced on the CPU) against the plain DataLoader fp32 path.

    With the same batches, bf16 and channels-last move the accuracy by a few thousandths. The
    plain path draws its batches in another order, which alone moves the accuracy at this size
    by up to about 0.07 (seed 0 vs seed 1); the two paths must agree within 0.1 and both learn.
    """
    fedavg = _load_throughput().fedavg
    config = cnn_config(num_clients=10, clients_per_round=2, rounds=3, batch_size=16, lr=0.1,
                        client_samples=400, eval_samples=1000, data_dir=str(fmnist_dir))
    fast = [r["accuracy"] for r in fedavg(config, speed=FAST_MATH)]
    same_batches = [r["accuracy"] for r in fedavg(config, speed=task.PLAIN)]
    plain = [r["accuracy"] for r in fedavg(config.replace(fast_batches=False))]
    assert len(fast) == len(plain) == 3
    assert max(abs(a - b) for a, b in zip(fast, same_batches, strict=True)) <= 0.02
    assert abs(fast[-1] - plain[-1]) <= 0.1
    assert min(fast[-1], plain[-1]) > 0.3  # chance is 0.1


# the benchmarks --------------------------------------------------------------------------------


def test_projection_adds_training_and_overheads():
    throughput = _load_throughput()
    over = {"client_setup_seconds": 0.5, "trip_seconds": 0.25, "average_seconds_per_client": 0.0,
            "eval_seconds_per_image": 1e-4}
    proj = throughput.project(1000.0, over, "cifar10-iid")
    # rounds x (clients x (0.5 + 2 x 0.25 + epochs x 500 images / 1000) + 10,000 x 1e-4), with
    # the preset's own rounds, clients and epochs (500 images: 50,000 over 100 clients)
    c = get_preset("cifar10-iid")
    per_client = 0.5 + 0.5 + c.local_epochs * 500 / 1000
    assert proj["seconds"] == pytest.approx(c.rounds * (c.clients_per_round * per_client + 1.0))
    assert proj["seconds_per_round"] == pytest.approx(proj["seconds"] / c.rounds)
    assert proj["training_fraction"] == pytest.approx(
        c.rounds * c.clients_per_round * c.local_epochs * 500 / 1000 / proj["seconds"])
    # a client_samples above a client's share adds no images (the share is what it holds)
    assert throughput.project_config(1000.0, over, get_preset(
        "cifar10-iid", profile="full").replace(client_samples=5000)) == proj
    # a run of its own (the deployment check's): fewer rounds, epochs, images and test images
    run = c.replace(rounds=3, local_epochs=1, client_samples=100, eval_samples=2000)
    small = throughput.project_config(1000.0, over, run)
    assert small["seconds_per_round"] == pytest.approx(
        c.clients_per_round * (0.5 + 0.5 + 100 / 1000) + 2000 * 1e-4)
    assert small["seconds"] == pytest.approx(3 * small["seconds_per_round"])
    # a cohort gets the global model once: one trip down for all, one up for each client
    together = throughput.project_config(1000.0, over, run, cohort=True)
    assert small["seconds_per_round"] - together["seconds_per_round"] == pytest.approx(
        (c.clients_per_round - 1) * 0.25)
    assert throughput.preset_model("cifar100-iid", "fedpara") == "fedpara-0.4"
    assert throughput.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert throughput.peak_bf16_flops("AMD EPYC, 2 cores") is None


def test_the_paired_interval_is_the_sign_tests_order_statistics():
    interval = _load_throughput().paired_interval
    # ratios 1..n in shuffled repeats: the interval is read off the sorted ratios
    five = interval([3.0, 1.0, 5.0, 2.0, 4.0], [1.0] * 5)
    # n = 5: only [min, max] reaches 90 %, with coverage 1 - 2/32
    assert (five["low"], five["high"], five["repeats"]) == (1.0, 5.0, 5)
    assert five["coverage"] == pytest.approx(1 - 2 / 32)
    # n = 9: P(count < 2) = 10/512 <= 0.05 < P(count < 3) = 46/512, so the 2nd and 8th ratios
    nine = interval([float(i) for i in (9, 2, 7, 4, 5, 6, 3, 8, 1)], [1.0] * 9)
    assert (nine["low"], nine["high"]) == (2.0, 8.0)
    assert nine["coverage"] == pytest.approx(1 - 2 * 10 / 512)
    assert nine["coverage"] >= 0.9
    # a stricter level widens it; the ratios are numerator / denominator of the same repeat
    assert interval(list(range(1, 10)), [1.0] * 9, level=0.99)["low"] == 1.0
    halves = interval([1.0, 1.0, 1.0], [2.0, 4.0, 1.0])
    assert (halves["low"], halves["high"]) == (0.25, 1.0)
    assert halves["coverage"] == pytest.approx(0.75)  # 3 repeats cannot reach 90 %
    with pytest.raises(ValueError, match="at least 2 repeats"):
        interval([1.0], [1.0])


def test_gpu_check_runs_on_a_cpu_without_flower(tmp_path):
    """The GPU machine has no flwr, Ray or datasets: the whole check must run without them."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nfor name in ('flwr', 'ray', 'datasets', 'flwr_datasets'):\n"
        "    sys.modules[name] = None  # import raises ImportError\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_TINY": "1",
           "PYTHON": sys.executable, "PYTHONPATH": str(blocker),
           "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "flwr not installed" in (out / "environment.txt").read_text()
    # no flwr and no wheels: the deployment step says why it did not run (tests/test_flwr_run.py
    # runs it)
    assert "== deployment: skipped (no flwr and no " in done.stdout
    [throughput_json] = out.glob("throughput-*.json")
    record = json.loads(throughput_json.read_text())
    assert set(record["images_per_second"]) == {"original", "fedpara-0.1"}
    assert record["ratio_fast_to_baseline"]["fedpara-0.1"] > 0
    assert record["projected_full_presets"]["cifar10-iid/fedpara"]["fast"]["seconds"] > 0
    assert record["flops_per_image"]["fedpara-0.1"] > record["flops_per_image"]["original"] > 1e9
    # the keys compared across commits, with the default path and a round's clients together
    for model in ("original", "fedpara-0.1"):
        assert record["images_per_second"][model]["default"] == record["images_per_second"][
            model][record["default_path"]]
        assert record["round_images_per_second"][model] > 0
        # two clients together end where they end apart (fp32, dropout off): within float
        # rounding, as measured in the same run (a start one ulp away)
        cohort = record["cohort"][model]
        assert 0 < cohort["noise_floor"]["relative_difference"] < 1e-4
        assert cohort["together_vs_apart"]["relative_difference"] < max(
            10 * cohort["noise_floor"]["relative_difference"], 1e-6)
        assert cohort["together_vs_apart"]["largest_tensor"]  # a parameter's name
        # the round's images: every client's, over the time they trained together
        assert record["round_images_per_second"][model] == pytest.approx(
            cohort["clients"] * cohort["samples_per_client"] / cohort["seconds_together"])
    assert record["time_ratio_fedpara_to_original"]["fedpara-0.1"]["default"] > 0
    assert record["graph_captures_while_timed"] == 0
    # the median of two repeats' ratios lies in their [min, max] interval
    for key, ratio in (("ratio_fast_to_plain", record["ratio_fast_to_plain"]["fedpara-0.1"]),
                       ("time_ratio_fedpara_to_original",
                        record["time_ratio_fedpara_to_original"]["fedpara-0.1"]["default"])):
        interval = record[f"{key}_interval"]["fedpara-0.1"]
        assert interval["repeats"] == 2 and interval["coverage"] == pytest.approx(0.5)
        assert interval["low"] <= ratio <= interval["high"]
    projected = record["projected_full_presets"]["cifar10-noniid/fedpara"]
    assert projected["default"]["seconds"] > 0
    # a cohort of 2 is no CIFAR preset's round (16 or 8 clients): no cohort projection
    assert "cohort" not in projected
    [smoke_json] = out.glob("gpu-smoke-*.json")
    smoke = json.loads(smoke_json.read_text())["smoke"]
    assert len(smoke["fast"]) == len(smoke["plain"]) == 1
    assert 0 <= smoke["fast"][0]["accuracy"] <= 1
    [overhead_json] = out.glob("layer_overhead-*.json")
    overhead = json.loads(overhead_json.read_text())
    assert overhead["device_type"] == "cpu"
    # both ran as CPU training does by default: with freed memory kept (where glibc allows it)
    assert overhead["retained_freed_memory"] is GLIBC
    assert record["settings"]["retained_freed_memory"] is GLIBC


def test_client_start_times_a_cold_clientapp_with_the_split_computed_and_stored(tmp_path):
    out = tmp_path / "client_start.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "client_start.py"),
                           "--repeats", "1", "--train-images", "10000", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["flwr_datasets_imported"] == {"computed": True, "stored": False}
    for how in ("computed", "stored"):
        assert len(record["samples"][how]) == 1
        assert all(v > 0 for v in record["median_seconds"][how].values())
    # what reading the stored split saves: computing it takes longer by that much
    medians = record["median_seconds"]
    assert record["split_saved_seconds"] == pytest.approx(
        medians["computed"]["split_and_batches_seconds"]
        - medians["stored"]["split_and_batches_seconds"])


def test_client_start_times_a_fresh_process_cohort_round_phase_by_phase(tmp_path):
    """--cohort K: fresh processes, each timing its start phase by phase and a second round;
    the split computed by the first (untimed) process is the one the others read back."""
    out, splits = tmp_path / "client_start_cohort.json", tmp_path / "splits"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "client_start.py"),
                           "--cohort", "2", "--repeats", "1", "--device", "cpu",
                           "--train-images", "10000", "--splits", str(splits),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["clients"] == 2 and record["device"] and len(record["samples"]) == 1
    [sample] = record["samples"]
    client_start = _load_benchmark("client_start")
    assert set(sample) == {*client_start.ROUND_PHASES, "process_seconds"}
    assert all(v >= 0 for v in sample.values()) and sample["first_round_seconds"] > 0
    # the process's own clock holds every phase it timed
    assert sample["process_seconds"] > sum(sample[p] for p in client_start.ROUND_PHASES)
    assert record["start_seconds"] == pytest.approx(
        sample["process_seconds"] - sample["second_round_seconds"])
    assert len(list(splits.glob("split-*.npz"))) == 1  # stored once, read back


def test_the_aggregation_benchmark_times_both_paths_and_checks_they_agree(tmp_path):
    out = tmp_path / "aggregation.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aggregation.py"),
                           "--preset", "fmnist-noniid", "--clients", "3", "--repeats", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert set(record["models"]) == {"original", "fedpara-0.1", "lowrank-0.1"}
    for model in record["models"].values():  # the script compared the paths bit for bit
        assert {p: len(t) for p, t in model["seconds"].items()} == {"flower_float64": 1,
                                                                     "weighted_mean": 1}
        assert model["speedup"] > 0 and model["model_bytes"] > 0
        # one repeat: the speedup is the old path's time over the new one's, per client by 3
        seconds = model["seconds"]
        assert model["speedup"] == pytest.approx(
            seconds["flower_float64"][0] / seconds["weighted_mean"][0])
        assert model["median_seconds_per_client"] == pytest.approx(
            {path: t[0] / 3 for path, t in seconds.items()})
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aggregation.py"),
                          "--clients", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--clients must be >= 1, got 0" in bad.stderr


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_a_fedpara_layer_adds_few_operations_to_a_convolution(channels_last):
    """The composition stays a handful of large products: forward + backward of a 512-channel
    FedPara layer runs at most 25 operations more than the same nn.Conv2d; each is at least one
    kernel launch on a GPU (`benchmarks/layers_before_after.py` compares revisions)."""
    count = _load_benchmark("layers_before_after").compute_ops
    x = torch.randn(2, 512, 4, 4)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dense = count(torch.nn.Conv2d(512, 512, 3, padding=1), x)
    fedpara = count(layers.FedParaConv2d(512, 512, 3, padding=1, gamma=0.1), x)
    assert dense.get("aten::convolution_backward") == fedpara.get("aten::convolution_backward") == 1
    assert 0 < sum(fedpara.values()) - sum(dense.values()) <= 25, (fedpara, dense)


def test_the_before_after_benchmark_compares_a_revision_with_the_tree(tmp_path):
    out = tmp_path / "before_after.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "layers_before_after.py"),
                           "--baseline", "HEAD", "--repeats", "1", "--batch", "1",
                           "--channels-last", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["channels_last"] is True
    for what in ("compose", "layer"):
        assert set(record[what]["median_seconds"]) == {"baseline", "current"}
        assert record[what]["ratio_paired_median"] > 0
        # one repeat: the paired ratio is the current time over the baseline's
        medians = record[what]["median_seconds"]
        assert record[what]["ratio_paired_median"] == pytest.approx(
            medians["current"] / medians["baseline"])
    ops = record["layer_ops"]
    assert ops["layer"] == "512→512 channels, forward + backward"
    for side in ("baseline", "current"):
        assert ops[side]["total"] == sum(ops[side]["by_op"].values()) > 0


@pytest.mark.parametrize("args, message", [
    (["--set", "bogus=1"], "--set: unknown config field.*bogus"),
    (["--throughput", "missing.json"], "--throughput missing.json: cannot read it"),
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["--wheels", "."], "--wheels .: no .whl files there"),
    (["--poll-seconds", "0"], "--poll-seconds must be a finite number of seconds > 0, got 0.0"),
    (["--threads", "0"], "--threads must be >= 1"),
    # less than the deployment's daemons need to stop
    (["--timeout", "14"], "--timeout must be a finite number of seconds > 15, got 14.0"),
])
def test_the_deployment_check_refuses_bad_input_before_writing_any_data(args, message,
                                                                          monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import deployment_rounds

    def no_data(*args, **kwargs):
        raise AssertionError("fake data written before the input was checked")

    monkeypatch.setattr(deployment_rounds, "write_fake_cifar", no_data)
    with pytest.raises(SystemExit) as exit_:
        deployment_rounds.main(["--device", "cpu", *args])
    # a message of its own (status 1), or argparse's (status 2, on stderr)
    assert re.search(message, str(exit_.value.code) + capsys.readouterr().err)


@pytest.mark.parametrize("args, message", [
    (["--settings", "1:1", "0:1"], "--settings: '0:1': the server's wait must be a positive"),
    (["--settings", "1:0.001"], "the SuperExec's between 0.01 and 60 s"),
    (["--settings", "1"], "--settings: '1' is not SERVER:SUPEREXEC in seconds"),
    (["--settings", "a:b"], "--settings: 'a:b' is not SERVER:SUPEREXEC"),
    (["--rounds", "1"], "--rounds >= 2 .the first round is not compared., got 3 and 1"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_the_poll_benchmark_refuses_bad_input_before_any_run(args, message, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import deployment_rounds
    import server_poll

    def no_run(*args, **kwargs):
        raise AssertionError("a deployment started before the input was checked")

    monkeypatch.setattr(deployment_rounds, "main", no_run)
    with pytest.raises(SystemExit, match=message):
        server_poll.main(args)


def test_the_deployment_check_counts_its_setup_in_its_timeout(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import deployment_rounds

    def no_deployment(*args, **kwargs):
        raise AssertionError("deployed with no time left to stop it within --timeout")

    # a setup (here: writing the data) that leaves less than the daemons' time to stop
    monkeypatch.setattr(deployment_rounds, "write_fake_cifar", lambda *a, **k: time.sleep(1.5))
    monkeypatch.setattr(deployment_rounds, "deploy", no_deployment)
    budget = deployment_rounds.STOP_SECONDS + 1
    with pytest.raises(SystemExit, match=f"--timeout {budget} s was spent on the setup"):
        deployment_rounds.main(["--device", "cpu", "--timeout", str(budget)])


def test_a_terminated_deployment_check_stops_the_deployment_it_started(tmp_path):
    """An outer `timeout` signals the check, not the deployment's own session: the check
    passes the signal on, so the deployment's exit trap runs and its daemon is gone."""
    fake_root = tmp_path / "root"
    (fake_root / "scripts").mkdir(parents=True)
    (fake_root / "scripts" / "local_deployment.sh").write_text(  # a daemon and an exit trap
        "sleep 300 & echo $! > daemon.pid\n"
        "trap 'kill $(cat daemon.pid); echo stopped > trap.ran; exit 143' TERM\n"
        "echo started > ready\nwait\n")
    check = subprocess.Popen([sys.executable, "-c", (
        "import sys; sys.path.insert(0, sys.argv[1]); import deployment_rounds as d; "
        "from pathlib import Path; d.ROOT = Path(sys.argv[2]); d.deploy('', {}, 300)"),
        str(ROOT / "benchmarks"), str(fake_root)], cwd=fake_root, stderr=subprocess.PIPE,
        text=True)
    for _ in range(200):  # up to 20 s for the fake deployment to start its daemon
        if (fake_root / "ready").exists():
            break
        time.sleep(0.1)
    daemon = int((fake_root / "daemon.pid").read_text())
    check.terminate()
    _, err = check.communicate(timeout=60)
    assert check.returncode != 0 and "stopped by signal 15" in err
    assert (fake_root / "trap.ran").read_text() == "stopped\n"
    status = Path(f"/proc/{daemon}/status")
    for _ in range(100):  # killed: gone, or a zombie until its new parent reaps it
        if not status.exists() or "zombie" in status.read_text():
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the fake deployment's daemon {daemon} still runs")


def test_the_deployment_check_names_the_servers_poll_variable():
    """deployment_rounds.py spells the variable itself (it runs where flwr is not importable)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import deployment_rounds

    from fedpara.server_app import POLL_ENV

    assert deployment_rounds.POLL_ENV == POLL_ENV


def test_the_graph_check_compares_graphed_and_eager_in_both_precisions():
    """benchmarks/throughput.graph_check on a CPU, where `Speed.graph` has no graph to replay:
    both runs take the same eager step, so they must end bit for bit equal; bf16 autocast
    must really change the arithmetic (other losses than in float32)."""
    graph_check = _load_throughput().graph_check
    cpu = torch.device("cpu")
    fp32 = graph_check("fedpara-0.1", 8, 4, cpu)
    bf16 = graph_check("fedpara-0.1", 8, 4, cpu, bf16=True)
    for check in (fp32, bf16):
        assert check["graph_vs_eager"]["relative_difference"] == 0
        assert check["graph_loss"] == check["eager_loss"] > 0
    assert fp32["noise_floor"]["relative_difference"] > 0
    assert bf16["graph_loss"] != fp32["graph_loss"]


def _graph_captures_as_on_cuda(throughput, monkeypatch) -> list:
    """Drive fedpara.graphed's cache as `task.train` does on CUDA (a graph path takes the
    cached trainer for its batch shape), with the trainer's eager step on the CPU; the list
    returned gets an entry for every trainer built (every capture). The cache starts empty."""
    from fedpara import graphed

    monkeypatch.setattr(graphed, "_CACHE", {})
    built = []

    class Counting(graphed.GraphedTrainer):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(graphed, "GraphedTrainer", Counting)
    epoch = throughput.epoch_seconds

    def as_on_cuda(model, batches, speed, device):
        if speed.graph:  # task.train's CUDA branch: the cached trainer for this batch shape
            shape = (batches.batch_size, *batches.x.shape[1:])
            graphed.trainer_for(model, batches.x.new_empty(shape),
                                batches.y.new_empty(shape[:1]), device=device, speed=speed)
        return epoch(model, batches, speed, device)

    monkeypatch.setattr(throughput, "epoch_seconds", as_on_cuda)
    return built


def test_the_throughput_benchmark_captures_no_graph_inside_a_timed_epoch(tmp_path, monkeypatch):
    """On CUDA `task.train` takes a graph path's captured step from fedpara.graphed's cache,
    which holds fewer captures than a full run has (model, graph path) pairs: one evicted would
    be captured again inside a timed epoch. Here the cache is driven as `task.train` drives it
    on CUDA, with the trainer's eager step (capture=False) on the CPU."""
    from fedpara import graphed

    throughput = _load_throughput()
    built = _graph_captures_as_on_cuda(throughput, monkeypatch)
    record = throughput.main(["--device", "cpu", "--paths", "graph", "graph+bf16", "--gammas",
                              "0.1", "0.4", "--repeats", "3", "--samples", "4", "--batch", "4",
                              "--eval-samples", "4", "--threads", "1", "--cohort", "0",
                              "--out", str(tmp_path / "throughput.json")])
    pairs = 3 * 2  # three models, two graph paths: more than the cache keeps by default
    assert pairs > graphed._CACHE_SIZE
    assert len(built) == pairs  # each captured once, in its warm-up epoch
    assert record["graph_captures_while_timed"] == 0
    assert graphed._CACHE == {}  # the run's captures are freed when it ends


def test_the_throughput_benchmark_writes_the_cohort_model_by_model(tmp_path, monkeypatch):
    """A run stopped by a time limit in its second cohort model keeps the first one's round
    images/s, which the deployment step needs."""
    throughput = _load_throughput()
    done = []

    def cohort_round(name, k, *args):
        if done:
            raise KeyboardInterrupt  # the time limit
        done.append(name)
        return {"clients": k, "samples_per_client": 4, "images_per_second_together": 10.0}

    monkeypatch.setattr(throughput, "cohort_round", cohort_round)
    out = tmp_path / "throughput.json"
    with pytest.raises(KeyboardInterrupt):
        throughput.main(["--device", "cpu", "--paths", "fast", "--gammas", "0.1", "--repeats",
                         "1", "--samples", "4", "--batch", "4", "--eval-samples", "4",
                         "--threads", "1", "--cohort", "2", "--cohort-models", "fedpara-0.1",
                         "original", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["round_images_per_second"] == {"fedpara-0.1": 10.0}
    assert list(record["cohort"]) == ["fedpara-0.1"]


def _throughput_file(path: Path, cohort: dict) -> Path:
    over = {"client_setup_seconds": 0.01, "trip_seconds": 0.02,
            "average_seconds_per_client": 0.0, "eval_seconds_per_image": 1e-5}
    path.write_text(json.dumps({"device": "test", "settings": {"batch": 64}, "cohort": cohort,
                                "overheads": {"fedpara-0.1": over}}))
    return path


def test_the_deployment_check_takes_the_cohort_rate_from_the_cohort(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import deployment_rounds

    config = get_preset("cifar10-noniid", variant="fedpara", profile="full").replace(
        engine="cohort")
    cohort = {"clients": config.clients_per_round, "samples_per_client": 500,
              "images_per_second_together": 1000.0}
    # a file without round_images_per_second (written apart before the cohort was per model)
    good = _throughput_file(tmp_path / "good.json", {"fedpara-0.1": cohort})
    assert deployment_rounds.projection(config, good, 50_000, 10_000)[
        "images_per_second"] == 1000.0
    none = _throughput_file(tmp_path / "none.json", {})
    with pytest.raises(SystemExit, match="has no cohort of 16 clients for fedpara-0.1 .a "
                                         "throughput run stopped before its cohort"):
        deployment_rounds.projection(config, none, 50_000, 10_000)


def test_the_layer_benchmark_measures_each_variants_memory_alone(tmp_path, monkeypatch):
    """On CUDA the peak counts whatever is on the device: each variant is measured with no other
    variant's model built. On a CPU the estimate is per model, so its numbers are those of a
    model measured on its own; cuDNN autotuning, a CUDA switch, is recorded off."""
    overhead = _load_benchmark("layer_overhead")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored afterwards
    models, alive = [], []
    build, memory_bytes = overhead.build, overhead.memory_bytes

    def tracked_build(*args):
        model, opt = build(*args)
        models.append(weakref.ref(model))
        return model, opt

    def counting(*args):
        gc.collect()
        alive.append(sum(m() is not None for m in models))
        return memory_bytes(*args)

    monkeypatch.setattr(overhead, "build", tracked_build)
    monkeypatch.setattr(overhead, "memory_bytes", counting)
    record = overhead.main(["--device", "cpu", "--repeats", "1", "--steps", "1", "--batch", "2",
                            "--threads", "1", "--variants", "original", "fedpara",
                            "--out", str(tmp_path / "overhead.json")])
    assert alive == [1, 1]
    assert record["cudnn_benchmark"] is False
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    for variant in ("original", "fedpara"):
        model, opt = build(variant, 0.1, torch.device("cpu"), False)
        assert record["memory"][variant] == memory_bytes(model, opt, x, y, False)


GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def test_the_gpu_checks_time_limits_add_up_to_what_it_promises():
    script = GPU_CHECK.read_text()
    limits = {name: int(v) for name, v in re.findall(r"\b([A-Z]+_LIMIT)=(\d+)\b", script)}
    assert set(limits) == {"ENV_LIMIT", "THROUGHPUT_LIMIT", "SMOKE_LIMIT", "OVERHEAD_LIMIT",
                           "DEPLOY_LIMIT"}
    total = sum(limits.values())
    assert total <= 360  # the device has 15 minutes for everything, machine start included
    header = script.split("\nset -uo pipefail")[0]
    assert f"{total} s" in header and "6 minutes" in header
    # the probe and every step run under those limits, none under a number of its own
    assert not re.search(r"timeout \d|^ *step \w+ \d", script, re.MULTILINE)


def test_the_gpu_check_runs_the_layer_benchmark_with_the_fast_paths_settings():
    tiny, full = re.findall(r"OVERHEAD=\(([^)]*)\)", GPU_CHECK.read_text())
    flags = set(full.split())
    speed = task.Speed.default("cuda")
    assert ("--bf16" in flags) == speed.bf16
    assert ("--channels-last" in flags) == speed.channels_last
    assert ("--cudnn-benchmark" in flags) == speed.cudnn_benchmark


# the training-speed appendix -------------------------------------------------------------------


def run_appendix(results: Path, root: Path, monkeypatch) -> tuple[dict, list[str], dict]:
    """Every code cell of book/performance.md, with `results` as its benchmarks/results (in a
    repository stand-in at `root`): what it glued, the Markdown it displayed, its names."""
    pytest.importorskip("pandas")
    jupytext = pytest.importorskip("jupytext")
    ipython_display = pytest.importorskip("IPython.display")
    (root / "benchmarks").mkdir(parents=True)
    (root / "_toc.yml").write_text("")
    shutil.copytree(results, root / "benchmarks" / "results")
    for script in (ROOT / "benchmarks").glob("*.py"):  # the page loads one of them
        (root / "benchmarks" / script.name).symlink_to(script)
    glued, shown = {}, []
    myst_nb = types.ModuleType("myst_nb")
    myst_nb.glue = lambda name, value, display=True: glued.__setitem__(name, value)
    monkeypatch.setitem(sys.modules, "myst_nb", myst_nb)
    monkeypatch.setattr(ipython_display, "display", lambda *objs, **kwargs: shown.extend(
        o.data for o in objs if isinstance(o, ipython_display.Markdown)))
    monkeypatch.chdir(root)
    namespace: dict = {}
    for cell in jupytext.read(ROOT / "book" / "performance.md").cells:
        if cell.cell_type == "code":
            exec(compile(cell.source, "performance.md", "exec"), namespace)
    return glued, shown, namespace


RESULTS = ROOT / "benchmarks" / "results"


def test_a_stored_projection_is_read_on_todays_path_and_rescaled_to_new_epochs_only_if_asked():
    """The functions both chapters read the throughput files with (benchmarks/throughput.py):
    a path timed but not projected is the fast path's projection with its training time scaled
    by the images/s; a projection made for fewer epochs than the preset has now is refused,
    or with `scale_epochs` gets its training time (and only that) scaled to the new epochs."""
    throughput = _load_throughput()
    epochs = get_preset("cifar10-iid", variant="fedpara", profile="full").local_epochs
    fast = {"seconds": 1000.0, "rounds": 200, "epochs": epochs // 2, "training_fraction": 0.6,
            "seconds_per_round": 5.0}
    record = {"device": "a CPU", "device_type": "cpu",
              "settings": {"speed_default": vars(task.Speed.default("cpu"))},
              "projected_full_presets": {"cifar10-iid/fedpara": {"model": "fedpara-0.1",
                                                                 "fast": fast}},
              "images_per_second": {"fedpara-0.1": {"fast": 100.0, "fast+bf16": 200.0}}}
    assert throughput.default_path(record) == "fast"
    bf16 = throughput.path_projection(record, "cifar10-iid/fedpara", "fast+bf16")
    assert bf16["seconds"] == pytest.approx(400 + 300)
    assert bf16["training_fraction"] == pytest.approx(300 / 700)
    with pytest.raises(ValueError, match=f"assumed {epochs // 2} local epochs, the preset now "
                                         f"has {epochs}"):
        throughput.projection(record, "cifar10-iid", "fedpara")
    scaled = throughput.projection(record, "cifar10-iid", "fedpara", scale_epochs=True)
    training = 600 * epochs / (epochs // 2)
    assert scaled["epochs"] == epochs and scaled["rounds"] == 200
    assert scaled["seconds"] == pytest.approx(400 + training)
    assert scaled["seconds_per_round"] == pytest.approx((400 + training) / 200)
    assert scaled["training_fraction"] == pytest.approx(training / (400 + training))
    assert fast["seconds"] == 1000.0  # the record is left as it was


def test_the_appendix_quotes_todays_default_path_and_the_cuda_version(tmp_path, monkeypatch):
    """Today's CUDA default replays the step as a captured graph. In a file from before that
    (the H200 file on record, whose default was the eager fast path, or an older one whose fast
    path autocast to bf16) the page quotes the file's "graph" row as the default and its eager
    fast path ("fast", or "fast-fp32" in a bf16-era file) beside it, and CUDA's version."""
    glued, _, page = run_appendix(RESULTS, tmp_path / "repo", monkeypatch)
    cuda = re.search(r"^cuda (\d\S*)$", (RESULTS / "environment.txt").read_text(), re.M)
    assert glued["gpu_cuda"] == cuda.group(1)  # not "available True"
    # which paths those are, for a file of each era
    assert task.Speed.default("cuda").graph and not task.Speed.default("cuda").bf16
    bf16_era = {"bf16": True, "channels_last": True, "cudnn_benchmark": True}  # no "graph" yet
    eager_era = {**bf16_era, "bf16": False, "graph": False}
    for speed_default, stored, default, eager in (
            (bf16_era, None, "graph", "fast-fp32"), (eager_era, "fast", "graph", "fast"),
            ({**eager_era, "graph": True}, "graph", "graph", "fast")):
        record = {"device": "a GPU", "device_type": "cuda", "default_path": stored,
                  "settings": {"speed_default": speed_default}}
        assert (page["default_path"](record), page["eager_path"](record)) == (default, eager)
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("throughput-*.json"))]
    gpu = next(r for r in records if r["device"] == glued["gpu_device_full"])
    stored = gpu["settings"]["speed_default"]
    path = gpu["default_path"] if stored.get("graph") else "graph"
    eager = "fast-fp32" if stored["bf16"] else "fast"
    assert glued["gpu_default_path"] == path
    # a file whose own default was another path says so
    assert (glued["gpu_file_default_note"] == "") == (gpu.get("default_path") == path)
    times, ips = gpu["epoch_seconds"], gpu["images_per_second"]

    def paired(model, slow, fast):
        return statistics.median(
            a / b for a, b in zip(times[model][slow], times[model][fast], strict=True))

    assert glued["gpu_fast_vs_baseline"] == pytest.approx(paired("fedpara-0.1", "baseline", path))
    assert glued["gpu_graph_vs_eager"] == pytest.approx(paired("fedpara-0.1", eager, path))
    assert glued["gpu_graph_vs_eager_original"] == pytest.approx(paired("original", eager, path))
    assert glued["gpu_graph_vs_eager"] > 1  # the page says the graph makes the step faster
    ratios = gpu["time_ratio_fedpara_to_original"]["fedpara-0.1"]
    assert glued["gpu_fedpara_time_ratio_fast"] == pytest.approx(ratios[path])
    assert glued["gpu_fedpara_time_ratio_eager"] == pytest.approx(ratios[eager])
    assert glued["gpu_ips_fedpara_fast"] == ips["fedpara-0.1"][path]
    assert glued["gpu_ips_fedpara_eager"] == ips["fedpara-0.1"][eager]
    assert glued["gpu_ips_original_eager"] == ips["original"][eager]
    # float32 over bf16 on the eager step: a median of ratios within a repeat, as the page's
    # other ratios; and bf16 under the graph, over the models
    bf16 = "fast" if eager == "fast-fp32" else "fast+bf16"
    assert glued["gpu_fp32_gain_original"] == pytest.approx(paired("original", bf16, eager))
    gains = [paired(model, "graph", "graph+bf16") for model in times]
    assert f"{min(gains):.2f}–{max(gains):.2f} times as fast" in glued["gpu_graph_bf16_text"]
    # graphed and eager trained alike: the losses and the difference against its noise floor
    check = gpu["engine_checks"]["fedpara-0.1"]
    for quoted in (f"{check['graph_loss']:.4f} graphed", f"{check['eager_loss']:.4f} eager",
                   f"{check['graph_vs_eager']['relative_difference']:.1e} apart",
                   f"against {check['noise_floor']['relative_difference']:.1e}"):
        assert quoted in glued["gpu_graph_check_text"]
    # the wall times on each path, as the benchmark projects them
    project = _load_throughput().project
    for preset, variant in (("cifar10-noniid", "fedpara"), ("cifar100-noniid", "original")):
        model = gpu["projected_full_presets"][f"{preset}/{variant}"]["model"]
        for name, on in (("default", path), ("eager", eager), ("baseline", "baseline")):
            expected = project(ips[model][on], gpu["overheads"][model], preset)["seconds"] / 60
            assert glued[f"gpu_minutes_{preset.split('-')[0]}_{variant}_{name}"] == pytest.approx(
                expected)
    assert glued["gpu_minutes_cifar10_fedpara_default"] < glued["gpu_minutes_cifar10_fedpara_eager"]
    fractions = gpu["fraction_of_bf16_peak"]
    assert glued["gpu_peak_fraction_original"] == fractions["original"][path]
    assert glued["gpu_peak_fraction_max"] == max(
        f for row in fractions.values() for p, f in row.items() if p.startswith("fast"))
    assert glued["gpu_peak_fraction_all"] == max(f for row in fractions.values()
                                                 for f in row.values())
    assert glued["gpu_peak_fraction_all"] >= glued["gpu_peak_fraction_original"]
    # the CPU file's fast path is today's: its stored ratios are the ones quoted
    cpu = next(r for r in records if r["device_type"] == "cpu")
    assert glued["cpu_default_path"] == "fast"
    assert glued["cpu_fast_vs_baseline"] == pytest.approx(
        cpu["ratio_fast_to_baseline"]["fedpara-0.1"])


# the goals of the appendix's overview, for one H100-class GPU
GOALS = {"fedpara_images_per_second": 10_000, "round_images_per_second": 30_000,
         "fedpara_time_ratio": 1.3, "cifar10_minutes": 10, "cifar100_minutes": 15,
         "deployment_tolerance": 0.2}


def _goals_met(results: Path) -> tuple[list[bool], dict]:
    """The goals, checked from the files in `results` on today's default path ("graph" for a
    GPU file from before it was the default); the GPU file and its deployment, if any."""
    [gpu] = [json.loads(p.read_text()) for p in results.glob("throughput-*.json")
             if json.loads(p.read_text())["device_type"] == "cuda"]
    path = gpu["default_path"] if gpu["settings"]["speed_default"].get("graph") else "graph"
    ips, project = gpu["images_per_second"], _load_throughput().project
    met = [ips["fedpara-0.1"][path] >= GOALS["fedpara_images_per_second"],
           gpu["round_images_per_second"]["fedpara-0.1"] >= GOALS["round_images_per_second"],
           gpu["time_ratio_fedpara_to_original"]["fedpara-0.1"][path]
           <= GOALS["fedpara_time_ratio"]]
    for dataset in ("cifar10", "cifar100"):
        preset = f"{dataset}-noniid"
        model = gpu["projected_full_presets"][f"{preset}/fedpara"]["model"]
        minutes = project(ips[model][path], gpu["overheads"][model], preset)["seconds"] / 60
        met.append(minutes <= GOALS[f"{dataset}_minutes"])
    deployed = [d for d in (json.loads(p.read_text()) for p in results.glob("deployment-*.json"))
                if d["device"] == gpu["device"]]
    for d in deployed:
        met.append(abs(d["measured_to_projected"] - 1) <= GOALS["deployment_tolerance"])
    return met, gpu


def test_the_appendix_checks_the_goals_against_the_files(tmp_path, monkeypatch):
    """The goals table and its count, recomputed from the stored files; then with the
    deployment missing (one goal fewer) and with one that came within the tolerance."""
    glued, shown, page = run_appendix(RESULTS, tmp_path / "stored", monkeypatch)
    assert page["TARGETS"] == GOALS
    met, gpu = _goals_met(RESULTS)
    assert glued["gpu_goals_checked"] == len(met)
    assert glued["gpu_goals_met"] == (sum(met) if any(met) else "none")
    [said] = [text for text in shown if "Not met:" in text or "Every goal checked" in text]
    assert said.startswith("None of the goals is met." if not any(met) else "Met: ")
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    removed = 0
    for path in results.glob("deployment-*.json"):
        if json.loads(path.read_text())["device"] == gpu["device"]:
            path.unlink()
            removed += 1
    fewer, _ = _goals_met(results)
    glued, shown, _ = run_appendix(results, tmp_path / "no-deployment", monkeypatch)
    assert glued["gpu_goals_checked"] == len(fewer) == len(met) - removed == 5
    assert any("No deployment was measured on this GPU model" in text for text in shown)
    # a deployment within 20 % of its projection meets its goal, and the page names it
    record = json.loads(next(RESULTS.glob("deployment-*.json")).read_text())
    record.update(device=gpu["device"], measured_to_projected=1.1)
    (results / "deployment-a-gpu.json").write_text(json.dumps(record))
    again, _ = _goals_met(results)
    glued, shown, _ = run_appendix(results, tmp_path / "within", monkeypatch)
    assert glued["gpu_goals_met"] == sum(again) >= 1
    [said] = [text for text in shown if "Not met:" in text or "Every goal checked" in text]
    assert said.startswith("Met: deployment round / its projection")


def test_the_appendix_reads_a_file_measured_with_the_graph_as_default(tmp_path, monkeypatch):
    """A GPU file measured once the captured graph was the default (its settings say so, its
    default path is "graph") and with the clients together also timed eagerly, and a fresh
    process's cohort round timed on the GPU (client_start.py --cohort): the page quotes the
    file without the note on an older default, shows both rates of the clients, and reads the
    process's start against the deployment's rounds."""
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    phases = {"import_seconds": 3.0, "device_seconds": 1.5, "dataset_seconds": 0.5,
              "first_round_seconds": 4.0, "second_round_seconds": 1.0, "process_seconds": 10.0}
    (results / "client_start-cohort-nvidia-h200.json").write_text(json.dumps({
        "benchmark": "client_start", "device": "NVIDIA H200", "clients": 16,
        "setting": "one cohort-engine round", "median_seconds": phases, "start_seconds": 9.0}))
    [path] = [p for p in results.glob("throughput-*.json")
              if json.loads(p.read_text())["device_type"] == "cuda"]
    record = json.loads(path.read_text())
    record["settings"]["speed_default"] = vars(task.Speed.default("cuda"))
    record["default_path"] = "graph"
    cohort = record["cohort"]["fedpara-0.1"]
    cohort["images_per_second_together_eager"] = cohort["images_per_second_together"] / 2
    path.write_text(json.dumps(record))
    glued, shown, _ = run_appendix(results, tmp_path / "repo", monkeypatch)
    assert glued["gpu_default_path"] == "graph" and glued["gpu_file_default_note"] == ""
    assert glued["gpu_ips_fedpara_eager"] == record["images_per_second"]["fedpara-0.1"]["fast"]
    [said] = [text for text in shown if "clients of" in text and "trained together" in text]
    assert (f"{cohort['images_per_second_together']:,.0f} images/s, their merged step replayed "
            f"as a captured graph ({cohort['images_per_second_together_eager']:,.0f} images/s "
            "eagerly)") in said
    [deployed] = [json.loads(p.read_text()) for p in RESULTS.glob("deployment-*.json")
                  if json.loads(p.read_text())["device"] == "NVIDIA H200"]
    extra = (deployed["median_round_seconds_after_first"]
             - deployed["median_projected_seconds_after_first"])
    [said] = [text for text in shown if text.startswith("On NVIDIA H200, a round took")]
    assert "`benchmarks/client_start.py --cohort 16` timed such a process" in said
    assert "import 3.0 s, device 1.5 s, dataset 0.5 s, first round 4.0 s" in said
    assert ("9.0 s, is what a process that lived on would not pay again; "
            + (f"that accounts for about 9.0 s of the {extra:.1f} s." if 9.0 < extra
               else f"that is more than the {extra:.1f} s between the medians.")) in said


def test_the_appendix_reads_what_keeping_freed_memory_changed_from_its_file(tmp_path,
                                                                           monkeypatch):
    [path] = RESULTS.glob("memory_retention-*.json")
    sides = json.loads(path.read_text())["summary"]
    glued, shown, _ = run_appendix(RESULTS, tmp_path / "stored", monkeypatch)
    # the stored CPU throughput file kept freed memory on every path, and the page says so
    assert glued["cpu_retention_note"].startswith("Every path of this file ran with freed memory")
    [said] = [text for text in shown if "With freed memory kept" in text]
    assert (f"a FedPara step took {sides['step_time_on_to_off']['fedpara']:.2f} times as long"
            in said)
    assert (f"went from {sides['off']['time_ratio_fedpara_to_original']:.2f} to "
            f"{sides['on']['time_ratio_fedpara_to_original']:.2f}") in said
    # without the file the page says how to make it
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    (results / path.name).unlink()
    # and a CPU file from where it could not be kept (not glibc: macOS, musl) says nothing of it
    for throughput in results.glob("throughput-*.json"):
        record = json.loads(throughput.read_text())
        if record["device_type"] == "cpu":
            record["settings"]["retained_freed_memory"] = False
            throughput.write_text(json.dumps(record))
    glued, shown, _ = run_appendix(results, tmp_path / "missing", monkeypatch)
    assert glued["cpu_retention_note"] == ""
    assert not any("With freed memory kept" in text for text in shown)
    assert any(text.startswith("No `memory_retention-<device>.json` is stored yet")
               for text in shown)


def test_the_memory_retention_benchmark_times_processes_of_both_kinds(tmp_path):
    pytest.importorskip("resource")  # POSIX getrusage
    out = tmp_path / "retention.json"
    script = str(ROOT / "benchmarks" / "memory_retention.py")
    done = subprocess.run([sys.executable, script, "--pairs", "1", "--repeats", "2", "--steps",
                           "1", "--batch", "2", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert [c["retain"] for c in record["children"]] == [False, True]  # the order of pair 1
    off, on = record["children"]
    assert not off["applied"] and on["applied"] is GLIBC
    assert record["summary"]["step_time_on_to_off"]["fedpara"] == pytest.approx(
        on["median_step_seconds"]["fedpara"] / off["median_step_seconds"]["fedpara"])
    assert record["summary"]["off"]["minor_faults_per_step"] == off["minor_faults_per_step"]
    # bad input is refused, naming the parameter, before any process starts
    bad = subprocess.run([sys.executable, script, "--pairs", "0", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--pairs must be >= 1, got 0" in bad.stderr
    bad = subprocess.run([sys.executable, script, "--gamma", "1.5", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--gamma must be in (0, 1], got 1.5" in bad.stderr


def test_the_appendix_builds_after_a_gpu_check_rerun(tmp_path, monkeypatch):
    """What a rerun of the GPU check (without GPU_CHECK_PARALLEL) leaves: throughput files
    without `parallel_clients`, where the page says so instead of failing, and a layer
    benchmark run with today's eager fast path's settings, which the page says it was."""
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    for path in results.glob("throughput-*.json"):
        record = json.loads(path.read_text())
        record.pop("parallel_clients", None)
        path.write_text(json.dumps(record))
    speed = task.Speed.default("cuda")
    for path in results.glob("layer_overhead-*.json"):
        record = json.loads(path.read_text())
        if record["device_type"] == "cuda":
            record.update(bf16=speed.bf16, channels_last=speed.channels_last,
                          cudnn_benchmark=speed.cudnn_benchmark)
            path.write_text(json.dumps(record))
    glued, shown, _ = run_appendix(results, tmp_path / "repo", monkeypatch)
    assert any(text.startswith("No GPU throughput file on record has the eager processes side "
                               "by side") for text in shown)
    # the layer benchmark times eager steps: it is read against the eager fast path's settings
    assert glued["gpu_layer_settings"].startswith("the eager fast path's settings (float32,")


def test_the_throughput_benchmark_computes_its_figures_from_the_timed_epochs(tmp_path,
                                                                             monkeypatch):
    """Epoch times given (the warm-up's far off, three skewed repeats): images/s are medians of
    the repeats' images/s, ratios medians of the ratios within a repeat (slow over fast, FedPara
    over the original: neither a mean, nor a ratio of medians, nor inverted), the default path is
    the fast one, the intervals the sign test's, and the projections `project` of those images/s
    with the overheads' medians, per client and per test image."""
    throughput = _load_throughput()
    times = {  # (model, path): the warm-up, then the three repeats
        ("original", "baseline"): [99.0, 4.0, 4.0, 9.0],
        ("original", "plain"): [99.0, 2.0, 3.0, 5.0],
        ("original", "fast"): [99.0, 1.0, 1.0, 4.0],
        ("fedpara-0.1", "baseline"): [99.0, 6.0, 8.0, 8.0],
        ("fedpara-0.1", "plain"): [99.0, 3.0, 9.0, 4.0],
        ("fedpara-0.1", "fast"): [99.0, 3.0, 2.0, 6.0],
    }
    left = {key: iter(t) for key, t in times.items()}
    which, path_batches = {}, throughput.path_batches

    def tagged(path, split, name, *args):
        batches, speed = path_batches(path, split, name, *args)
        which[id(batches)] = (name, path)
        return batches, speed

    data = iter([5.0, 1.0, 2.0] * 3)  # each data path's three passes
    monkeypatch.setattr(throughput, "path_batches", tagged)
    monkeypatch.setattr(throughput, "epoch_seconds", lambda m, b, s, d: next(left[which[id(b)]]))
    monkeypatch.setattr(throughput, "data_seconds", lambda b, d: next(data))
    # each overhead's three timings (its function run once)
    monkeypatch.setattr(throughput, "timings",
                        lambda fn, repeats, device: (fn(), [3.0, 1.0, 1.5])[1])
    out = tmp_path / "throughput.json"
    record = throughput.main(["--device", "cpu", "--paths", "baseline", "plain", "fast",
                              "--workers", "0", "--gammas", "0.1", "--repeats", "3",
                              "--samples", "6", "--batch", "4", "--eval-samples", "4",
                              "--threads", "1", "--cohort", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == record
    for (model, path), t in times.items():
        assert record["epoch_seconds"][model][path] == t[1:]  # the warm-up left out
    ips = record["images_per_second"]
    assert ips["original"] == pytest.approx({"baseline": 1.5, "plain": 2.0, "fast": 6.0,
                                             "default": 6.0})
    assert ips["fedpara-0.1"] == pytest.approx({"baseline": 0.75, "plain": 1.5, "fast": 2.0,
                                                "default": 2.0})
    assert record["default_path"] == "fast"
    assert record["data_seconds_per_epoch"] == {"baseline": 2.0, "plain": 2.0, "fast": 2.0}
    assert record["ratio_fast_to_baseline"] == pytest.approx({"original": 4.0, "fedpara-0.1": 2.0})
    assert record["ratio_fast_to_plain"] == pytest.approx({"original": 2.0, "fedpara-0.1": 1.0})
    assert list(record["time_ratio_fedpara_to_original"]) == ["fedpara-0.1"]
    assert record["time_ratio_fedpara_to_original"]["fedpara-0.1"] == pytest.approx(
        {"baseline": 1.5, "plain": 1.5, "fast": 2.0, "default": 2.0})
    assert record["ratio_fast_to_plain_interval"]["original"] == pytest.approx(
        {"low": 1.25, "high": 3.0, "coverage": 0.75, "repeats": 3})
    assert record["time_ratio_fedpara_to_original_interval"]["fedpara-0.1"] == pytest.approx(
        {"low": 1.5, "high": 3.0, "coverage": 0.75, "repeats": 3})
    assert record["graph_captures_while_timed"] == 0
    # FLOPs: an epoch of 6 images at batch 4 is a step of 4 and a step of 2
    for model in ("original", "fedpara-0.1"):
        epoch = throughput.step_flops(model, 4) + throughput.step_flops(model, 2)
        assert record["flops_per_epoch"][model] == epoch
        assert record["flops_per_image"][model] == pytest.approx(epoch / 6)
        assert record["achieved_flops_per_second"][model] == pytest.approx(
            {p: epoch / 6 * ips[model][p] for p in ("baseline", "plain", "fast")})
        over = record["overheads"][model]
        assert {k: v for k, v in over.items() if k != "model_bytes"} == pytest.approx(
            {"client_setup_seconds": 1.5, "trip_seconds": 1.5,
             "average_seconds_per_client": 1.5 / 4, "eval_seconds_per_image": 1.5 / 4})
    projected = record["projected_full_presets"]
    assert {"cifar10-iid/original", "cifar10-noniid/fedpara"} <= set(projected)
    for key, proj in projected.items():
        preset, model = key.split("/")[0], proj["model"]
        assert set(proj) == {"model", "baseline", "plain", "fast", "default"}
        for path in ("baseline", "plain", "fast", "default"):
            assert proj[path] == pytest.approx(throughput.project(
                ips[model][path], record["overheads"][model], preset)), (key, path)


def test_the_throughput_benchmark_counts_graphs_captured_inside_timed_epochs(tmp_path,
                                                                            monkeypatch):
    """With the cache left at its size, smaller than the (model, graph path) pairs: trainers
    evicted are captured again inside timed epochs, and each of those is counted."""
    from fedpara import graphed

    throughput = _load_throughput()
    built = _graph_captures_as_on_cuda(throughput, monkeypatch)
    monkeypatch.setattr(graphed, "_CACHE_SIZE", 2)
    monkeypatch.setattr(throughput, "graph_cache", lambda trainers: contextlib.nullcontext())
    record = throughput.main(["--device", "cpu", "--paths", "graph", "graph+bf16", "--gammas",
                              "0.1", "--repeats", "2", "--samples", "4", "--batch", "4",
                              "--eval-samples", "4", "--threads", "1", "--cohort", "0",
                              "--out", str(tmp_path / "throughput.json")])
    pairs = 2 * 2
    assert len(built) > pairs  # some captured again
    assert record["graph_captures_while_timed"] == len(built) - pairs  # all but the warm-ups'


def test_the_layer_benchmarks_cpu_memory_counts_weights_gradients_and_saved_tensors():
    """Two linear layers (10 -> 1000 -> 2, float32) on one image: the weights' 48,000 bytes
    twice (gradients), and what backward keeps: the 40-byte input, the 4,000-byte hidden layer
    and a few bytes of logits; the second weight, which backward also keeps, is a parameter
    and not counted again."""
    overhead = _load_benchmark("layer_overhead")
    model = torch.nn.Sequential(torch.nn.Linear(10, 1000, bias=False),
                                torch.nn.Linear(1000, 2, bias=False))
    x, y = torch.randn(1, 10), torch.tensor([1])
    memory = overhead.memory_bytes(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y,
                                   False)
    assert memory["parameter_bytes"] == 48_000
    assert 4040 <= memory["saved_for_backward_bytes"] < 4200
    assert memory["peak_bytes"] == 2 * 48_000 + memory["saved_for_backward_bytes"]


def test_the_layer_benchmark_counts_a_steps_multiply_adds():
    """A training step is about 3 forward convolutions; FedPara's composition 8 products of
    out x R x in*taps (2 forward, 2 rebuilt in backward, 4 gradients)."""
    overhead = _load_benchmark("layer_overhead")
    fedpara = layers.FedParaConv2d(8, 16, 3, padding=1, gamma=0.5)
    model = torch.nn.Sequential(fedpara, torch.nn.Conv2d(16, 4, 3))
    counts = overhead.multiply_adds(model, torch.randn(2, 8, 6, 6))
    conv = 3 * (2 * 6 * 6 * 16 * 8 * 9 + 2 * 4 * 4 * 4 * 16 * 9)
    compose = 8 * 16 * 8 * 9 * fedpara.rank
    assert counts == {"conv_step": conv, "compose_step": compose,
                      "compose_fraction": compose / conv}


def test_the_layer_benchmark_divides_by_steps_and_pairs_its_ratios_by_repeat(tmp_path,
                                                                            monkeypatch):
    """A fake clock that each training step advances by its variant's cost in that repeat: the
    record's per-step seconds are the costs (the repeat's time / --steps), and the three ratios
    are the ratio of medians, the median of the per-repeat ratios and the ratio of minima."""
    import types

    overhead = _load_benchmark("layer_overhead")
    costs = {"original": [1.0, 2.0, 4.0], "fedpara": [1.2, 3.0, 5.0]}  # seconds per step
    clock, calls = [0.0], {v: 0 for v in costs}

    def step(model, opt, x, y, bf16):
        calls[model.variant] += 1  # call 1 is the warm-up; then --steps calls per repeat
        if calls[model.variant] > 1:
            clock[0] += costs[model.variant][(calls[model.variant] - 2) // 2]

    def build(variant, gamma, device, channels_last):
        model = torch.nn.Linear(1, 1)
        model.variant = variant
        return model, None

    monkeypatch.setattr(overhead, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(overhead, "step", step)
    monkeypatch.setattr(overhead, "build", build)
    monkeypatch.setattr(overhead, "memory_alone",
                        lambda v, args, x, y: {"peak_bytes": {"original": 100, "fedpara": 80}[v]})
    monkeypatch.setattr(overhead, "multiply_adds", lambda model, x: {})
    monkeypatch.setattr(overhead, "arithmetic_rates", lambda model, x, device: {})
    monkeypatch.setattr(overhead, "compose_seconds", lambda layers, how, device: 0.0)
    record = overhead.main(["--repeats", "3", "--steps", "2", "--batch", "2", "--device", "cpu",
                            "--variants", "original", "fedpara", "--out", str(tmp_path / "o.json")])
    assert calls == {"original": 7, "fedpara": 7}
    for v, cost in costs.items():
        assert record["step_seconds"][v] == pytest.approx(cost)
    assert record["median_step_seconds"] == pytest.approx({"original": 2.0, "fedpara": 3.0})
    assert record["time_ratio"] == {"fedpara": pytest.approx(3.0 / 2.0)}
    assert record["time_ratio_paired_median"] == {"fedpara": pytest.approx(1.25)}  # 1.2, 1.5, 1.25
    assert record["time_ratio_of_minima"] == {"fedpara": pytest.approx(1.2)}
    assert record["memory_ratio"] == {"fedpara": pytest.approx(0.8)}
    assert json.loads((tmp_path / "o.json").read_text())["step_seconds"] == record["step_seconds"]


@pytest.mark.parametrize(("flags", "calls"), [([], 1), (["--retain-memory"], 1),
                                             (["--no-retain-memory"], 0)])
def test_the_layer_benchmark_keeps_freed_memory_as_training_does_unless_told(flags, calls,
                                                                            tmp_path,
                                                                            monkeypatch):
    """On a CPU the benchmark applies the fast path's setting by default, `--no-retain-memory`
    leaves glibc's default, and the record says the process's real state either way (an earlier
    CPU training in the same process may have set it)."""
    overhead = _load_benchmark("layer_overhead")
    seen = []
    monkeypatch.setattr(task, "retain_freed_memory", lambda: seen.append(1) or True)
    monkeypatch.setattr(task, "freed_memory_retained", lambda: "the process's state")
    record = overhead.main(["--device", "cpu", "--repeats", "1", "--steps", "1", "--batch", "2",
                            "--threads", "1", "--variants", "original", *flags,
                            "--out", str(tmp_path / "o.json")])
    assert len(seen) == calls
    assert record["retained_freed_memory"] == "the process's state"


_NOT_A_DEVICE = "--device: device='gpu' is not a device name"


@pytest.mark.parametrize(("script", "argv", "message", "expensive"), [
    ("layer_overhead", ["--repeats", "0"], "--repeats must be >= 1, got 0", "build"),
    ("layer_overhead", ["--threads", "0"], "--threads must be >= 1", "build"),
    ("layer_overhead", ["--variants", "original", "fedpara", "fedpara"],
     "--variants names fedpara more than once", "build"),
    ("layer_overhead", ["--gamma", "0"], "--gamma must be in (0, 1], got 0.0", "build"),
    ("layer_overhead", ["--device", "gpu"], _NOT_A_DEVICE, "build"),
    ("layer_overhead", ["--device", "cpu", "--cudnn-benchmark"],
     "--cudnn-benchmark is for CUDA only; --device is cpu", "build"),
    ("layer_overhead", ["--device", "cpu", "--out", "a-file/o.json"],
     "the folder of --out='a-file' cannot be written: a-file is a file, not a folder", "build"),
    ("throughput", ["--cohort", "-1"], "--cohort must be >= 0, got -1", "measure_throughput"),
    ("throughput", ["--cohort-models", "foo"], "--cohort-models foo: allowed: original, or "
                                               "fedpara-G", "measure_throughput"),
    ("throughput", ["--parallel-model", "fedpara-2"], "--parallel-model fedpara-2: allowed",
     "measure_throughput"),
    ("throughput", ["--workers", "-1"], "--workers must be >= 0", "measure_throughput"),
    ("throughput", ["--gammas", "0.1", "nan"], "--gammas must be in (0, 1], got nan",
     "measure_throughput"),
    ("throughput", ["--smoke-only"], "--smoke-only needs --smoke-rounds", "smoke"),
    ("deployment_rounds", ["--timeout", "nan"],
     "--timeout must be a finite number of seconds > 15, got nan", "flower_bin"),
    ("deployment_rounds", ["--train-images", "0"], "--train-images must be >= 1, got 0",
     "flower_bin"),
    ("deployment_rounds", ["--variant", "nope"], "--variant nope: not one of cifar10-noniid's",
     "flower_bin"),
    ("deployment_rounds", ["--device", "gpu"], _NOT_A_DEVICE, "flower_bin"),
    ("client_start", ["--train-images", "0"], "--train-images must be >= 1, got 0",
     "write_fake_cifar"),
    ("server_poll", ["--device", "gpu"], _NOT_A_DEVICE, "deployment_rounds"),
    ("aggregation", ["--clients", "0"], "--clients must be >= 1, got 0", "measure"),
    ("layers_before_after", ["--baseline", "no-such-revision"],
     "--baseline no-such-revision: no fedpara/layers.py at that git revision", "load_layers"),
    ("layers_before_after", ["--batch", "0"], "--batch must be >= 1, got 0", "load_layers"),
])
def test_benchmarks_refuse_bad_input_by_name_before_any_work(script, argv, message, expensive,
                                                             tmp_path, monkeypatch, capsys):
    """argparse's refusal (exit status 2, the option named): a GPU session is short, and a
    benchmark that fails after its models are built, or its data written, has spent it."""
    module = _load_benchmark(script)
    assert hasattr(module, expensive)
    monkeypatch.setattr(module, expensive, lambda *a, **k: pytest.fail(f"{expensive} ran"))
    (tmp_path / "a-file").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_layer_overheads_json_replaces_a_file_without_writing_into_it(tmp_path):
    """The benchmarks' records are written aside and renamed over the old file (a run stopped
    mid-write leaves the previous record): another link to the old file keeps its contents."""
    write_json = _load_benchmark("layer_overhead").write_json
    out, old = tmp_path / "record.json", tmp_path / "old.json"
    write_json(out, {"run": 1})
    os.link(out, old)
    write_json(out, {"run": 2})
    assert json.loads(out.read_text()) == {"run": 2}
    assert json.loads(old.read_text()) == {"run": 1}


def test_the_worker_comparison_sets_the_worker_flag_itself(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import deployment_rounds
    import worker_rounds

    def no_run(*args, **kwargs):
        raise AssertionError("a deployment started before the input was checked")

    monkeypatch.setattr(deployment_rounds, "main", no_run)
    for flag in ("--worker", "--no-worker", "--out"):
        with pytest.raises(SystemExit, match="2"):
            worker_rounds.main(["--", "--rounds", "2", flag])
    with pytest.raises(SystemExit, match="2"):
        worker_rounds.main(["--repeats", "0"])


def test_the_appendix_reads_the_worker_comparison_and_a_deployment_with_a_worker(
        tmp_path, monkeypatch):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    runs = [{"worker": w, "repeat": r, "round_wall_seconds": walls,
             "median_round_seconds_after_first": statistics.median(walls[1:]),
             "run_seconds": 100.0}
            for r, (w, walls) in enumerate([(False, [30.0, 26.0, 27.0, 25.0]),
                                            (True, [25.0, 20.0, 21.0, 22.0]),
                                            (True, [24.0, 19.0, 23.0, 20.0]),
                                            (False, [31.0, 28.0, 24.0, 29.0])])]
    medians = {"no-worker": statistics.median([26.0, 28.0]),
               "worker": statistics.median([21.0, 20.0])}
    (results / "worker_rounds-a-test-cpu.json").write_text(json.dumps({
        "benchmark": "worker_rounds", "device": "A test CPU", "hardware": {"device": "cpu"},
        "date": "2026-12-04T00:00:00+00:00", "preset": "cifar10-noniid", "variant": "fedpara",
        "engine": "client", "clients_per_round": 2, "local_epochs": 1, "runs": runs,
        "median_round_seconds_after_first": medians,
        "seconds_saved_per_round": medians["no-worker"] - medians["worker"],
        "worker_to_no_worker": medians["worker"] / medians["no-worker"]}))
    for path in results.glob("deployment-*.json"):  # the GPU's record, as if with a worker
        record = json.loads(path.read_text())
        if record["hardware"]["device"].startswith("cuda"):
            record["worker"] = True
            path.write_text(json.dumps(record))
    _, shown, _ = run_appendix(results, tmp_path / "repo", monkeypatch)
    [said] = [text for text in shown if text.startswith("On A test CPU")]
    assert ("a round took 27.0 s without a worker and 20.5 s with one" in said
            and "6.5 s less, 0.76 times the time" in said and "2 runs each way" in said)
    assert ("without a worker, run by run: 30.0, 26.0, 27.0, 25.0; 31.0, 28.0, 24.0, 29.0 s; "
            "with one: 25.0, 20.0, 21.0, 22.0; 24.0, 19.0, 23.0, 20.0 s.") in said
    [gpu] = [text for text in shown if "long-lived `fedpara.worker`" in text]
    assert "initialised CUDA" in gpu and "pays its start every time" not in gpu
    assert not any(text.startswith("No comparison with and without a worker") for text in shown)
