"""Training throughput of VGG16-GN, the baseline's way against the fast path, and what it means
for the wall time of each full CIFAR preset.

    python benchmarks/throughput.py                      # CUDA if present, else the CPU
    python benchmarks/throughput.py --device cpu --threads 1 --samples 192 --repeats 3 --gammas 0.1
    python benchmarks/throughput.py --parallel 1 2 4     # also: clients side by side on one device
    python benchmarks/throughput.py --smoke-rounds 3 --smoke-only   # a 3-round FedAvg, both paths

One measurement is one client's local epoch: `--samples` CIFAR-shaped random uint8 images (500 is
a CIFAR-10 client of the paper's 100-client split) at batch 64 through `fedpara.task.train`, from
the start of the epoch (loader workers starting, optimizer built) to the last step's loss on the
host. The paths:

  baseline            the Flower baseline's way: a torchvision DataLoader over PIL images with
                      RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize and
                      2 workers (its dataset.py), fp32, contiguous memory
  plain               fedpara's plain path (`fast_batches=False`): its DataLoader, fp32, contiguous
  fast                fedpara's fast path, eager: the images on the device (TensorBatches), and on
                      CUDA channels-last and cuDNN autotuning, float32 (task.Speed.default
                      without its graph)
  fast-nchw, fast-no-autotune              (CUDA) the fast path with one switch off
  fast+bf16                                the fast path with bf16 autocast
  fast+channels-last                       (CPU) the fast path with channels-last
  fast-fp32           the fast path with bf16 off (files from before float32 was the default,
                      when "fast" meant bf16 autocast on CUDA)
  graph               (CUDA) the fast path in fp32 with the step replayed as a CUDA graph
                      (task.Speed.graph, fedpara/graphed.py): task.Speed.default on CUDA
  graph+bf16          (CUDA) the graph path with bf16 autocast
  default             not measured separately: the path `run_experiment` takes by default on
                      the device (task.Speed.default), copied under this name for comparisons
                      across commits

On a CPU the fast path keeps freed memory mapped (`task.retain_freed_memory`). That setting
belongs to the whole process and cannot be undone, so when a measured path has it, it is set
before the first epoch and every path runs with it (`settings.retained_freed_memory`);
benchmarks/memory_retention.py times processes with and without it.

`--cohort K` (CUDA by default) trains K clients of `--samples` images each together
(fedpara/cohort.py, its step captured as a CUDA graph there) against the same K one after the
other on the default path: `round_images_per_second[model]`; on CUDA the cohort without its
capture is timed too (`images_per_second_together_eager`), and the captured cohort with cuDNN's
autotuning on (`images_per_second_together_autotuned`; the cohort's default leaves cuDNN's
heuristics to choose the merged convolutions' algorithms). With dropout off it also checks the
two ways agree (the cohort as run by default against the clients apart in fp32, eager), and that
two graphed epochs agree with two eager ones (`engine_checks`: the mean losses), each as
`difference` (‖a − b‖ / ‖b‖ over the parameters, and the worst tensor) next to its
`noise_floor`: the same training from a start one float ulp away. Models go in the order of
`--cohort-models`, the file rewritten after each, so a run stopped by a time limit keeps the
models it finished.

Models: the original VGG16-GN and FedPara for each of `--gammas` (10 classes). Models and paths
are interleaved, the order reversed every repeat; images/s are medians of the repeats' images/s,
and the ratios are medians of the ratios within each repeat (robust to the load of a shared
machine). Each (model, path) pair gets one warm-up epoch first; a graph path captures its step
there. fedpara.graphed keeps fewer captures than a full CUDA run has (model, graph path) pairs,
so the run keeps all of its own (`graph_cache`) and no timed epoch captures one
(`graph_captures_while_timed` counts any that did: 0 in a sound run).
Two ratios also get an interval that says whether the run can tell the two apart (the sign
test's, `paired_interval`): fast against plain, and FedPara against the original on the default
path.

The data paths alone (baseline, plain, fast: the same images, batches moved to the device, no
model) are timed as well.

Per-round overhead, measured on the fast path for each model: building a client (init_model and
its batches), one trip of the model between server and client (state_dict copies, NumPy
serialization plus SHA-256 as Flower's `Array` does, deserialization into a model), the server's
weighted average per client (`task.weighted_mean`, as the ServerApp), and the evaluation on the
10,000 test images. Then

    wall(preset) = rounds × [clients × (setup + 2·trip + average + epochs·samples / throughput)
                             + evaluation]

(a round's clients trained together get the global model in one message: clients + 1 trips
instead of 2·clients, `round_seconds`).

Flower's own messaging (Ray, protobuf, chunking) is not included: it cannot run here without flwr.

`--parallel K ...` trains `--parallel-work` client-epochs split over K processes sharing the
device (a stand-in, without Ray, for Flower's fractional `client-num-gpus`), against K = 1.
`--smoke-rounds N` runs N rounds of a plain FedAvg loop over fedpara.task (no Flower) on fake
CIFAR-10 files, for the fast and the plain path, and records both accuracy trajectories.

Imports torch, torchvision, numpy, PIL and fedpara's training path only (no flwr, no Ray).
Writes benchmarks/results/throughput-<device>.json (`--out` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import io
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_checks  # noqa: E402
from layer_overhead import device_name, slug, sync, timings, write_json  # noqa: E402

from fedpara import graphed, task  # noqa: E402
from fedpara.config import ExperimentConfig, get_preset  # noqa: E402
from fedpara.data import ImageDataset, dataset_info, load_dataset, make_loader  # noqa: E402
from fedpara.fakedata import write_fake_cifar  # noqa: E402
from fedpara.models import build_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LR = 1e-3  # small: the labels are random and only the time matters
BASELINE_WORKERS = 2  # the Flower baseline's CIFAR train loaders (dataset.py)
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000  # images per split: what a full preset trains and scores
PRESETS = ("cifar10-iid", "cifar10-noniid", "cifar100-iid", "cifar100-noniid")

# Dense bf16 tensor-core peaks (FLOP/s, without sparsity) as NVIDIA's datasheets give them
# (written down from memory, not checked on this project's machines), by a substring of
# torch.cuda.get_device_name; the first match wins.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("NVIDIA L4", 121e12),
)

PATHS = ("baseline", "plain", "fast", "fast-fp32", "fast-nchw", "fast-no-autotune", "fast+bf16",
         "fast+channels-last", "graph", "graph+bf16")
DEFAULT_PATHS = {
    "cuda": ("baseline", "plain", "fast", "fast+bf16", "fast-nchw", "fast-no-autotune", "graph",
             "graph+bf16"),
    "cpu": ("baseline", "plain", "fast", "fast+bf16", "fast+channels-last"),
}


# helpers ------------------------------------------------------------------------------------


def peak_bf16_flops(name: str) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when it is not in PEAK_BF16."""
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def _load() -> float | None:
    """The machine's 1-minute load average (other processes skew CPU timings)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def cpu_bf16_flags() -> list[str]:
    """The CPU's bfloat16 instruction sets named in /proc/cpuinfo (what CPU autocast can use)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return sorted(flags & {"avx512_bf16", "amx_bf16", "avx_ne_convert"})


def random_cifar(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n random CIFAR-shaped images, uint8 (n, 32, 32, 3), and labels (n,) in 0..9."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def model_names(gammas: list[float]) -> list[str]:
    return ["original", *(f"fedpara-{g:g}" for g in gammas)]


def config_for(name: str, device: torch.device, batch: int, fast: bool = True
               ) -> ExperimentConfig:
    """A CIFAR-10 VGG16 config for model `name` ('original' or 'fedpara-<gamma>')."""
    fedpara = name.startswith("fedpara-")
    return ExperimentConfig(
        dataset="cifar10", model="vgg16", batch_size=batch, device=str(device),
        parameterization="fedpara" if fedpara else "original",
        gamma=float(name.split("-", 1)[1]) if fedpara else 0.1, fast_batches=fast,
    )


class PILImages(Dataset):
    """CIFAR as torchvision serves it: a PIL image per sample through the transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def baseline_loader(images: np.ndarray, labels: np.ndarray, batch: int, workers: int
                    ) -> DataLoader:
    info = dataset_info("cifar10")
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(info.mean, info.std)])
    return DataLoader(PILImages(images, labels, transform), batch_size=batch, shuffle=True,
                      num_workers=workers)


def path_batches(path: str, split: ImageDataset, name: str, device: torch.device, batch: int,
                 workers: int):
    """(batches, task.Speed) of one path over a client's training images."""
    if path == "baseline":
        return baseline_loader(split.data, split.labels, batch, workers), task.PLAIN
    if path == "plain":
        return make_loader(split, None, batch, shuffle=True, seed=0), task.PLAIN
    batches = task.make_batches(split, None, config_for(name, device, batch), device, train=True,
                                seed=0)
    speed = dataclasses.replace(task.Speed.default(device), graph=False)  # the eager fast path
    switch = {"fast": {}, "fast-fp32": {"bf16": False}, "fast-nchw": {"channels_last": False},
              "fast-no-autotune": {"cudnn_benchmark": False}, "fast+bf16": {"bf16": True},
              "fast+channels-last": {"channels_last": True},
              "graph": {"bf16": False, "graph": True},
              "graph+bf16": {"bf16": True, "graph": True}}[path]
    return batches, dataclasses.replace(speed, **switch)


def paired(numerator: list[float], denominator: list[float]) -> float:
    """Median over repeats of numerator[i] / denominator[i] (measured in the same repeat)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def paired_interval(numerator: list[float], denominator: list[float], level: float = 0.9
                    ) -> dict:
    """A distribution-free interval for the median of the per-repeat ratios (the sign test's):
    the k-th smallest and k-th largest ratio, with k the largest such that a Binomial(n, 1/2)
    count falls below k with probability at most (1 - level) / 2. Its coverage,
    1 - 2·P(count < k), is at least `level`; with too few repeats for `level` (fewer than 5 at
    0.9) it is [min, max] and its coverage is below `level`. A ratio of 1 outside the interval
    is a difference that this run shows; inside it, the run does not tell the two apart.
    """
    ratios = sorted(a / b for a, b in zip(numerator, denominator, strict=True))
    n = len(ratios)
    if n < 2:
        raise ValueError(f"an interval needs at least 2 repeats, got {n}")
    below = [math.comb(n, i) / 2**n for i in range(n + 1)]  # P(count = i)
    k = 1
    while k + 1 <= n // 2 and sum(below[:k + 1]) <= (1 - level) / 2:
        k += 1
    return {"low": ratios[k - 1], "high": ratios[n - k], "coverage": 1 - 2 * sum(below[:k]),
            "repeats": n}


def epoch_seconds(model, batches, speed, device: torch.device) -> float:
    """Wall time of one local epoch through task.train (it ends on the host, so it is synced)."""
    sync(device)
    start = time.perf_counter()
    task.train(model, batches, epochs=1, lr=LR, device=device, speed=speed)
    sync(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def graph_cache(trainers: int):
    """fedpara.graphed's cache of captured steps holding at least `trainers` of them (the timed
    (model, graph path) pairs: one evicted would be captured again inside a timed epoch), and
    emptied afterwards (each capture holds device memory)."""
    size = graphed._CACHE_SIZE
    graphed._CACHE_SIZE = max(size, trainers)
    try:
        yield
    finally:
        graphed._CACHE_SIZE = size
        graphed._CACHE.clear()


def new_captures(before: list) -> int:
    """How many of graphed's cached trainers are not in `before` (each captured its step).
    `before` holds the earlier ones alive, so a new trainer cannot reuse a freed one's id."""
    return sum(all(t is not b for b in before) for t in graphed._CACHE.values())


def data_seconds(batches, device: torch.device) -> float:
    """Wall time of one pass over `batches` alone, each batch on the device: the data path."""
    sync(device)
    start = time.perf_counter()
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    sync(device)
    return time.perf_counter() - start


def step_flops(name: str, batch: int) -> int:
    """FLOPs of one forward + backward of the model on a batch (FlopCounterMode, meta tensors).

    For FedPara this includes composing the weights and rebuilding them in the backward.
    """
    config = config_for(name, torch.device("cpu"), batch)
    with torch.device("meta"):  # shapes only: nothing is computed or allocated
        model = build_model("vgg16", num_classes=10, parameterization=config.parameterization,
                            gamma=config.gamma)
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()


def epoch_flops(name: str, samples: int, batch: int) -> int:
    full, rest = divmod(samples, batch)
    return full * step_flops(name, batch) + (step_flops(name, rest) if rest else 0)


# per-round overhead --------------------------------------------------------------------------


def _serialize(arrays) -> list[bytes]:
    """What Flower's Array does to each tensor: np.save into bytes (and a SHA-256 object id)."""
    blobs = []
    for tensor in arrays.values():
        buffer = io.BytesIO()
        np.save(buffer, tensor.numpy(), allow_pickle=False)
        blob = buffer.getvalue()
        hashlib.sha256(blob).digest()
        blobs.append(blob)
    return blobs


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    return statistics.median(timings(fn, repeats, device))


def overheads(name: str, split: ImageDataset, test: ImageDataset, device: torch.device,
              batch: int, repeats: int) -> dict:
    """Seconds per client (setup, one trip, average) and per test image (evaluation)."""
    config = config_for(name, device, batch)
    model = task.init_model(config).to(device)  # also builds init_model's cached template
    keys, _ = task.split_keys(model, "fedavg")

    def setup():
        task.init_model(config)
        task.make_batches(split, None, config, device, train=True, seed=0)

    def trip():
        arrays = task.get_arrays(model, keys)
        blobs = _serialize(arrays)
        back = {k: torch.from_numpy(np.load(io.BytesIO(b), allow_pickle=False))
                for k, b in zip(keys, blobs, strict=True)}
        task.set_arrays(model, back)

    clients = [task.get_arrays(model, keys) for _ in range(4)]

    def average():  # as the ServerApp: the float64 mean in client order, back to float32
        mean = task.weighted_mean(clients, [1.0] * len(clients))
        return {k: v.to(clients[0][k].dtype).numpy() for k, v in mean.items()}

    eval_batches = task.make_batches(test, None, config, device, train=False, seed=0)
    return {
        "client_setup_seconds": _median_seconds(setup, repeats, device),
        "trip_seconds": _median_seconds(trip, repeats, device),
        "average_seconds_per_client": _median_seconds(average, repeats, device) / len(clients),
        "eval_seconds_per_image": _median_seconds(
            lambda: task.evaluate(model, eval_batches, device=device), repeats, device
        ) / len(test),
        "model_bytes": sum(a.numel() * a.element_size() for a in clients[0].values()),
    }


def project(throughput: float, over: dict, preset: str, cohort: bool = False) -> dict:
    """Wall time of a full preset from an images/s figure and the measured overheads."""
    return project_config(throughput, over, get_preset(preset, profile="full"), cohort=cohort)


def project_config(throughput: float, over: dict, c: ExperimentConfig,
                   train_images: int = CIFAR_TRAIN, test_images: int = CIFAR_TEST,
                   cohort: bool = False) -> dict:
    """Wall time of the run `c` describes, from an images/s figure and the measured overheads:
    per client, setup + a trip each way + its share of the average + its epochs; per round, the
    clients one after the other (or together, `cohort`: `throughput` is then the round's
    images/s, and the global model travels down once for all of them) and the evaluation of
    the test set."""
    samples = train_images / c.num_clients  # images per client (on average for non-IID splits)
    if 0 < c.client_samples < samples:
        samples = c.client_samples
    tests = min(c.eval_samples, test_images) if c.eval_samples > 0 else test_images
    per_round = round_seconds(over, c.clients_per_round, c.clients_per_round * samples,
                              c.local_epochs, throughput, tests, cohort=cohort)
    return {"seconds": c.rounds * per_round, "rounds": c.rounds, "clients": c.clients_per_round,
            "epochs": c.local_epochs, "samples_per_client": samples,
            "seconds_per_round": per_round,
            "training_fraction": c.clients_per_round * c.local_epochs * samples / throughput
            / per_round}


def round_seconds(over: dict, clients: int, images: float, epochs: int, throughput: float,
                  tests: int, cohort: bool = False) -> float:
    """One round: each client's setup, trip each way and share of the average, `epochs` passes
    over the round's `images` at `throughput` images/s, and scoring `tests` test images. A
    `cohort` (engine="cohort") receives the global model in one message: one trip down for
    all its clients, one up for each."""
    trips = clients + 1 if cohort else 2 * clients
    per_client = over["client_setup_seconds"] + over["average_seconds_per_client"]
    return (clients * per_client + trips * over["trip_seconds"] + epochs * images / throughput
            + tests * over["eval_seconds_per_image"])


# reading a stored file (book/performance.md and book/run_it_yourself.md) --------------------


def default_path(record: dict) -> str:
    """The path of a stored file that ran what `task.Speed.default` runs today: the file's own
    default path where its default had today's settings, else the path with the switches that
    differ: "fast-fp32" in files from when the CUDA fast path autocast to bfloat16, "graph" in
    files from before the captured step was the CUDA default."""
    now = vars(task.Speed.default(record["device_type"]))
    stored = record["settings"]["speed_default"]
    then = {**vars(task.Speed()), **stored}  # older: no "graph"
    # a file from before `retain_memory` existed is compared on the switches it knew: keeping
    # freed memory is not a path of its own (benchmarks/memory_retention.py measures it)
    differ = {key for key in now if now[key] != then[key]
              and (key in stored or key != "retain_memory")}
    if not differ:
        return record.get("default_path") or "fast"
    if differ <= {"bf16", "graph"}:
        if now["graph"]:
            return "graph+bf16" if now["bf16"] else "graph"
        return "fast+bf16" if now["bf16"] else "fast-fp32"
    raise ValueError(f"{record['device']}: no path of this file ran today's default {now}")


def path_projection(record: dict, key: str, path: str) -> dict:
    """A stored file's projection of `key` ("preset/variant") on `path`. A path it timed but
    did not project (the fast path's variants) is its fast path's projection with the training
    time scaled by their images/s: the same rounds, clients and overheads."""
    row = record["projected_full_presets"][key]
    if path in row:
        return row[path]
    fast, ips = row["fast"], record["images_per_second"][row["model"]]
    training = fast["seconds"] * fast["training_fraction"] * ips["fast"] / ips[path]
    return _with_training(fast, fast["seconds"] * (1 - fast["training_fraction"]), training)


def at_epochs(proj: dict, epochs: int) -> dict:
    """`proj` with `epochs` local epochs instead of the ones it assumed: its training time
    scaled, evaluation and the per-client overheads as they were."""
    training = proj["seconds"] * proj["training_fraction"]
    return {**_with_training(proj, proj["seconds"] - training, training * epochs / proj["epochs"]),
            "epochs": epochs}


def _with_training(proj: dict, other: float, training: float) -> dict:
    seconds = other + training
    return {**proj, "seconds": seconds, "seconds_per_round": seconds / proj["rounds"],
            "training_fraction": training / seconds}


def projection(record: dict, preset: str, variant: str, path: str | None = None, *,
               scale_epochs: bool = False) -> dict:
    """A stored file's projection of the full `preset` on today's default path (unless `path`
    is given). One that assumed other local epochs than the preset has now is another
    protocol's wall time: refused, or with `scale_epochs` rescaled by `at_epochs`."""
    proj = path_projection(record, f"{preset}/{variant}", path or default_path(record))
    epochs = get_preset(preset, variant=variant, profile="full").local_epochs
    if proj["epochs"] == epochs:
        return proj
    if scale_epochs:
        return at_epochs(proj, epochs)
    raise ValueError(f"{record['device']}: the projection of {preset}/{variant} assumed "
                     f"{proj['epochs']} local epochs, the preset now has {epochs}")


def _check_model_name(p: argparse.ArgumentParser, option: str, name: str) -> None:
    """A model of `model_names`: "original" or "fedpara-<gamma>" with gamma in (0, 1]."""
    gamma = name.removeprefix("fedpara-")
    try:
        ok = name == "original" or (gamma != name and 0 < float(gamma) <= 1)
    except ValueError:
        ok = False
    if not ok:
        p.error(f"{option} {name}: allowed: original, or fedpara-G with G in (0, 1] "
                f"(e.g. fedpara-0.1)")


def preset_model(preset: str, variant: str) -> str:
    c = get_preset(preset, variant=variant, profile="full")
    return "original" if variant == "original" else f"fedpara-{c.gamma:g}"


# clients side by side ----------------------------------------------------------------------


def parallel_worker(rank: int, name: str, device: str, samples: int, batch: int, epochs: int,
                    threads: int | None, barrier, results) -> None:
    """One process: a model and a client's images on the device, then `epochs` client-epochs."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    images, labels = random_cifar(samples, seed=rank)
    split = ImageDataset("cifar10", images, labels, train=True)
    model = task.init_model(config_for(name, device, batch))
    batches, speed = path_batches("fast", split, name, device, batch, 0)
    epoch_seconds(model, batches, speed, device)  # warm-up (cuDNN autotuning, allocator)
    barrier.wait()
    start = time.time()
    for _ in range(epochs):
        task.train(model, batches, epochs=1, lr=LR, device=device, speed=speed)
    sync(device)
    results.put((start, time.time()))


def parallel_clients(k: int, name: str, device: torch.device, samples: int, batch: int,
                     work: int, threads: int | None) -> dict:
    """Images/s of `work` client-epochs spread over k processes on the same device."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    load_before = _load()
    barrier, results = ctx.Barrier(k), ctx.Queue()
    shares = [work // k + (i < work % k) for i in range(k)]
    procs = [ctx.Process(target=parallel_worker, args=(i, name, str(device), samples, batch,
                                                      shares[i], threads, barrier, results))
             for i in range(k)]
    for p in procs:
        p.start()
    try:  # a worker that dies leaves the others at the barrier: stop them all then
        spans = [results.get(timeout=600) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"parallel workers exited with {[p.exitcode for p in procs]}")
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    return {"processes": k, "client_epochs": work, "seconds": wall,
            "images_per_second": work * samples / wall, "load_average": [load_before, _load()]}


# a round's clients together ------------------------------------------------------------------


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _client_batches(k: int, samples: int, name: str, device: torch.device, batch: int):
    """k clients' fast-path batches over their own random images (seeded per client)."""
    out = []
    for i in range(k):
        split = ImageDataset("cifar10", *random_cifar(samples, seed=100 + i), train=True)
        out.append(task.make_batches(split, None, config_for(name, device, batch), device,
                                     train=True, seed=i))
    return out


@torch.no_grad()
def difference(models_a, models_b) -> dict:
    """How far two trainings of the same models ended apart: ‖a − b‖ / ‖b‖ over all their
    parameters, and the largest per-tensor max|a − b| / max|b| with its parameter's name.

    The per-tensor figure is dominated by tensors still near zero (biases a few small steps
    have barely moved), where the same absolute rounding is a large fraction; compare either
    with the `noise_floor` of the same run."""
    squares, norms, worst = 0.0, 0.0, (-1.0, "")
    for a, b in zip(models_a, models_b, strict=True):
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            gap = (p - q).double()
            squares += float(gap.square().sum())
            norms += float(q.double().square().sum())
            worst = max(worst, (float(gap.abs().max() / q.abs().max().clamp_min(1e-30)), name))
    return {"relative_difference": math.sqrt(squares / norms) if norms else math.nan,
            "largest_tensor_relative_difference": worst[0], "largest_tensor": worst[1]}


def _moved_one_ulp(models):
    """The models with every parameter moved to the next float towards +inf: a start that
    differs from theirs by float rounding alone."""
    with torch.no_grad():
        for model in models:
            for p in model.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, math.inf)))
    return models


def noise_floor(train, models, batches) -> dict:
    """`difference` between `train` from the models' start and from that start moved by one
    ulp (`_moved_one_ulp`), on the same batches: how far float rounding alone moves these
    trainings apart, the scale against which the engines' agreement is read."""
    start = [copy.deepcopy(m) for m in models]
    train(models, batches())
    train(_moved_one_ulp(start), batches())
    return difference(start, models)


def cohort_round(name: str, k: int, samples: int, batch: int, device: torch.device,
                 repeats: int) -> dict:
    """Images/s of k clients trained together (cohort.train_cohort) and one after the other
    (task.train, fast path), and how far apart the two leave the same clients (dropout off)."""
    from fedpara.cohort import train_cohort

    config = config_for(name, device, batch)
    batches = _client_batches(k, samples, name, device, batch)
    speed = task.Speed.default(device)

    def together(data=batches, graph=None):  # None: the cohort's default (captured on CUDA)
        models = [_no_dropout(task.init_model(config)).to(device) for _ in range(k)]
        sync(device)
        start = time.perf_counter()
        train_cohort(models, data, epochs=1, lr=LR, device=device, graph=graph)
        sync(device)
        return time.perf_counter() - start, models

    def together_eager():
        return together(graph=False)

    def together_autotuned():  # cuDNN times its algorithms for the merged convolutions
        with task._cudnn_benchmark(True):
            return together()

    def apart(data=batches, run_speed=speed):
        models = [_no_dropout(task.init_model(config)).to(device) for _ in range(k)]
        sync(device)
        start = time.perf_counter()
        for model, b in zip(models, data, strict=True):
            task.train(model, b, epochs=1, lr=LR, device=device, speed=run_speed)
        sync(device)
        return time.perf_counter() - start, models

    # the eager cohort timed too where the default captures its step (CUDA)
    eager = task.Speed.default(device).graph
    timed = [(together, []), (apart, [])] + ([(together_eager, []), (together_autotuned, [])]
                                             if eager else [])
    for fn, _ in timed:  # warm-up (and the captures)
        fn()
    for r in range(repeats):
        for fn, out in timed[:: 1 if r % 2 == 0 else -1]:
            out.append(fn()[0])
    t_together, t_apart = timed[0][1], timed[1][1]
    # agreement: the same batches from fresh generators, fp32 on both sides (bf16 autocast,
    # where a fast path has it on, would dominate the difference), against the float-rounding
    # floor of two clients
    plain = dataclasses.replace(speed, bf16=False)
    _, ours = together(_client_batches(k, samples, name, device, batch))
    _, reference = apart(_client_batches(k, samples, name, device, batch), plain)

    def train_apart(models, data):
        for model, b in zip(models, data, strict=True):
            task.train(model, b, epochs=1, lr=LR, device=device, speed=plain)

    floor = noise_floor(train_apart,
                        [_no_dropout(task.init_model(config)).to(device) for _ in range(2)],
                        lambda: _client_batches(2, samples, name, device, batch))
    return {
        "clients": k, "samples_per_client": samples,
        "seconds_together": statistics.median(t_together),
        "seconds_apart": statistics.median(t_apart),
        "images_per_second_together": k * samples / statistics.median(t_together),
        "images_per_second_apart": k * samples / statistics.median(t_apart),
        "speedup": paired(t_apart, t_together),
        **({"seconds_together_eager": statistics.median(timed[2][1]),
            "images_per_second_together_eager": k * samples / statistics.median(timed[2][1]),
            "seconds_together_autotuned": statistics.median(timed[3][1]),
            "images_per_second_together_autotuned": k * samples / statistics.median(timed[3][1])}
           if eager else {}),
        "together_vs_apart": difference(ours, reference),
        "noise_floor": floor,
    }


def graph_check(name: str, samples: int, batch: int, device: torch.device,
                bf16: bool = False) -> dict:
    """Two client epochs graphed and eager (fp32, or both under bf16 autocast; dropout off, the
    same batches and start): both mean losses, and their `difference` against its
    `noise_floor` (in bf16, a start one float32 ulp away mostly rounds to the same numbers, so
    that floor says little there)."""
    config = config_for(name, device, batch)
    results = {}

    def train(models, data, graph=False):
        speed = dataclasses.replace(task.Speed.default(device), bf16=bf16, graph=graph)
        return task.train(models[0], data[0], epochs=2, lr=0.01, device=device, speed=speed,
                          seed=0).loss

    for label, graph in (("graph", True), ("eager", False)):
        model = _no_dropout(task.init_model(config)).to(device)
        loss = train([model], _client_batches(1, samples, name, device, batch), graph)
        results[label] = (model, loss)
    floor = noise_floor(train, [_no_dropout(task.init_model(config)).to(device)],
                        lambda: _client_batches(1, samples, name, device, batch))
    return {"graph_loss": results["graph"][1], "eager_loss": results["eager"][1],
            "graph_vs_eager": difference([results["graph"][0]], [results["eager"][0]]),
            "noise_floor": floor}


# FedAvg without Flower -----------------------------------------------------------------------


def fedavg(config: ExperimentConfig, *, speed: task.Speed | None = None) -> list[dict]:
    """`config.rounds` rounds of FedAvg over fedpara.task alone (no Flower, no flwr-datasets).

    IID split of the training set (a seeded permutation cut into `num_clients` parts, each
    trimmed to `client_samples` if set); each round `clients_per_round` clients drawn from
    (seed, round) train from the global model with the round's lr, their arrays are averaged
    weighted by examples (`task.weighted_mean`, as the ServerApp), and the global model is
    scored on the first `eval_samples` test images. Returns one record per round.
    """
    device = task.resolve_device(config.device)
    train_set, _ = task.load_splits(config)
    parts = np.array_split(np.random.default_rng(config.seed).permutation(len(train_set)),
                           config.num_clients)
    if config.client_samples:
        parts = [np.sort(p[: config.client_samples]) for p in parts]
    model = task.init_model(config)
    keys, _ = task.split_keys(model, "fedavg")
    global_arrays = task.get_arrays(model, keys)
    test = task.test_data(config, device)
    records = []
    for server_round in range(1, config.rounds + 1):
        sync(device)
        start = time.perf_counter()
        rng = np.random.default_rng([config.seed, server_round])
        chosen = sorted(rng.choice(config.num_clients, config.clients_per_round, replace=False))
        replies, losses = [], []
        for pid in chosen:
            client = task.init_model(config)
            task.set_arrays(client, global_arrays)
            seed = task.client_seed(config.seed, server_round, int(pid))
            batches = task.make_batches(train_set, parts[pid], config, device, train=True,
                                        seed=seed)
            result = task.train(client, batches, epochs=config.local_epochs,
                                lr=config.round_lr(server_round), device=device, seed=seed,
                                speed=speed)
            replies.append((result.num_examples, task.get_arrays(client, keys)))
            losses.append(result.loss)
        mean = task.weighted_mean((a for _, a in replies), [n for n, _ in replies])
        global_arrays = {k: v.to(global_arrays[k].dtype) for k, v in mean.items()}
        task.set_arrays(model, global_arrays)
        scored = task.evaluate(model, test, device=device)
        sync(device)
        records.append({"round": server_round, "accuracy": scored.accuracy, "loss": scored.loss,
                        "train_loss": float(np.mean(losses)),
                        "seconds": time.perf_counter() - start})
    return records


def smoke(rounds: int, clients: int, samples: int, batch: int, device: torch.device,
          data_dir: Path) -> dict:
    """A few FedAvg rounds of VGG16 FedPara γ=0.1 on fake CIFAR-10 files: fast vs plain path."""
    write_fake_cifar(data_dir, "cifar10", n_train=clients * samples, n_test=max(samples, 64),
                     seed=0)
    config = ExperimentConfig(dataset="cifar10", model="vgg16", parameterization="fedpara",
                              gamma=0.1, num_clients=clients, clients_per_round=clients,
                              rounds=rounds, local_epochs=1, batch_size=batch, lr=0.05,
                              data_dir=str(data_dir), device=str(device))
    load_dataset("cifar10", data_dir, download=False)  # fail here, clearly, if the files are bad
    return {
        "data": f"fake CIFAR-10 ({clients} clients x {samples} images; fedpara.fakedata)",
        "config": config.to_dict(),
        "fast": fedavg(config),
        "plain": fedavg(config.replace(fast_batches=False)),
    }


# main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64, help="images per step (the paper's 64)")
    p.add_argument("--samples", type=int, default=500, help="images per client epoch")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--gammas", type=float, nargs="+", default=[0.1, 0.4])
    p.add_argument("--paths", nargs="+", choices=PATHS, default=None,
                   help="default: the device's DEFAULT_PATHS")
    p.add_argument("--workers", type=int, default=BASELINE_WORKERS, help="baseline's workers")
    p.add_argument("--eval-samples", type=int, default=CIFAR_TEST,
                   help="test images timed for the evaluation overhead (scaled to 10,000)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--parallel", type=int, nargs="*", default=[],
                   help="process counts for the side-by-side clients measurement (e.g. 1 2 4)")
    p.add_argument("--parallel-work", type=int, default=16, help="client-epochs in that test")
    p.add_argument("--parallel-model", default="fedpara-0.1")
    p.add_argument("--cohort", type=int, default=None,
                   help="clients trained together (default: 16 on CUDA, 0 = skip elsewhere)")
    p.add_argument("--cohort-models", nargs="+", default=None,
                   help="models for --cohort (default: all of --gammas and the original)")
    p.add_argument("--smoke-rounds", type=int, default=0, help="FedAvg rounds on fake CIFAR-10")
    p.add_argument("--smoke-clients", type=int, default=4, help="clients (all train each round)")
    p.add_argument("--smoke-samples", type=int, default=500, help="images per smoke client")
    p.add_argument("--smoke-only", action="store_true", help="skip the throughput measurement")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/throughput-<device>.json)")
    args = p.parse_args(argv)
    cli_checks.at_least(p, args, 1, "batch", "samples", "repeats", "eval_samples",
                        "parallel_work", "smoke_clients", "smoke_samples", "parallel")
    cli_checks.at_least(p, args, 0, "smoke_rounds", "cohort", "workers")
    if args.smoke_only and not args.smoke_rounds:
        p.error("--smoke-only needs --smoke-rounds N (N >= 1)")
    cli_checks.threads(p, args.threads)
    cli_checks.gammas(p, "--gammas", args.gammas)
    for option, names in (("--cohort-models", args.cohort_models or []),
                          ("--parallel-model", [args.parallel_model])):
        for name in names:
            _check_model_name(p, option, name)
    device = cli_checks.device(p, args.device)  # graph paths run eager off CUDA (task.train)
    cli_checks.out(p, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev_name = device_name(device)
    record = {
        "benchmark": "throughput",
        "device": dev_name,
        "device_type": device.type,
        "device_slug": slug(dev_name),
        "threads": torch.get_num_threads(),
        "cpu_bf16_flags": cpu_bf16_flags(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    name = "gpu-smoke" if args.smoke_only else "throughput"
    out = args.out or RESULTS / f"{name}-{record['device_slug']}.json"
    # the JSON is rewritten after each part, so a run stopped by a time limit keeps what it has
    if not args.smoke_only:
        record.update(measure_throughput(args, device, dev_name))
        write_json(out, record)
    cohort = args.cohort if args.cohort is not None else (16 if device.type == "cuda" else 0)
    if cohort and not args.smoke_only:
        record["cohort"], record["round_images_per_second"] = {}, {}
        for n in args.cohort_models or model_names(args.gammas):  # written model by model
            try:
                rounds = cohort_round(n, cohort, args.samples, args.batch, device, args.repeats)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # recorded, not fatal:
                # the graph check and the other models still run
                print(f"{n}: the cohort failed: {err}", file=sys.stderr)
                rounds = {"error": f"{type(err).__name__}: {err}"[:2000]}
            record["cohort"][n] = rounds
            if "error" not in rounds:
                record["round_images_per_second"][n] = rounds["images_per_second_together"]
                for key, proj in record["projected_full_presets"].items():
                    # only where the measured cohort is the preset's round (same clients per
                    # round); clients there are of equal size, so a non-IID round's padding
                    # is not included
                    preset = key.split("/")[0]
                    if proj["model"] == n and get_preset(preset).clients_per_round == cohort:
                        proj["cohort"] = project(rounds["images_per_second_together"],
                                                 record["overheads"][n], preset, cohort=True)
            write_json(out, record)
            if device.type == "cuda":
                record.setdefault("engine_checks", {})[n] = {
                    **graph_check(n, args.samples, args.batch, device),
                    "bf16": graph_check(n, args.samples, args.batch, device, bf16=True)}
                write_json(out, record)
    if args.parallel:
        record["parallel_clients"] = [
            parallel_clients(k, args.parallel_model, device, args.samples, args.batch,
                             args.parallel_work, args.threads) for k in args.parallel]
        write_json(out, record)
    if args.smoke_rounds:
        with tempfile.TemporaryDirectory() as tmp:
            record["smoke"] = smoke(args.smoke_rounds, args.smoke_clients, args.smoke_samples,
                                    args.batch, device, Path(tmp))
    report(record)
    write_json(out, record)
    print(f"wrote {out}")
    return record


def measure_throughput(args: argparse.Namespace, device: torch.device, dev_name: str) -> dict:
    """Everything but the smoke run: images/s per model and path, overheads, projections."""
    paths = tuple(args.paths or DEFAULT_PATHS["cuda" if device.type == "cuda" else "cpu"])
    names = model_names(args.gammas)

    torch.manual_seed(0)
    images, labels = random_cifar(args.samples, seed=0)
    split = ImageDataset("cifar10", images, labels, train=True)
    test = ImageDataset("cifar10", *random_cifar(args.eval_samples, seed=1), train=False)
    models = {n: task.init_model(config_for(n, device, args.batch)) for n in names}
    batches = {(n, p): path_batches(p, split, n, device, args.batch, args.workers)
               for n in names for p in paths}
    # process-wide and for good once a path has set it: set before any path runs, so that every
    # path is timed the same way (benchmarks/memory_retention.py measures it on its own)
    if any(s.retain_memory for _, s in batches.values()):
        task.retain_freed_memory()
    retained = task.freed_memory_retained()
    load_before = _load()

    times: dict[str, dict[str, list[float]]] = {n: {p: [] for p in paths} for n in names}
    order = list(batches)
    captured = 0  # graphs captured inside timed epochs (none: graph_cache keeps them all)
    with graph_cache(sum(speed.graph for _, speed in batches.values())):
        # warm-up (cuDNN autotuning, allocator, first worker start, a graph path's capture),
        # then interleaved repeats
        for (n, _), (b, s) in batches.items():
            epoch_seconds(models[n], b, s, device)
        for r in range(args.repeats):
            for n, p in order if r % 2 == 0 else reversed(order):
                before = list(graphed._CACHE.values())
                times[n][p].append(epoch_seconds(models[n], *batches[n, p], device))
                captured += new_captures(before)
                print(f"  repeat {r + 1}/{args.repeats} {n:12s} {p:18s} "
                      f"{times[n][p][-1]:.3f} s", flush=True)
    if captured:
        print(f"WARNING: {captured} graph(s) captured inside timed epochs: those graph paths' "
              "times include a capture", file=sys.stderr)
    ips = {n: {p: statistics.median(args.samples / s for s in t) for p, t in times[n].items()}
           for n in names}
    # what task.Speed.default runs: the path with its settings (run_experiment's default)
    default = next((p for p in paths if p not in ("baseline", "plain")
                    and batches[names[0], p][1] == task.Speed.default(device)), None)
    if default:
        for n in names:
            ips[n]["default"] = ips[n][default]
    # the data path alone: the same images, no model (the fast variants share one data path)
    data_paths = [p for p in ("baseline", "plain", "fast") if p in paths]
    data = {p: statistics.median(data_seconds(batches[names[0], p][0], device)
                                 for _ in range(args.repeats)) for p in data_paths}

    flops = {n: epoch_flops(n, args.samples, args.batch) for n in names}
    peak = peak_bf16_flops(dev_name) if device.type == "cuda" else None
    achieved = {n: {p: flops[n] * ips[n][p] / args.samples for p in paths} for n in names}
    over = {n: overheads(n, split, test, device, args.batch, args.repeats) for n in names}
    load_after = _load()

    record = {
        "load_average": [load_before, load_after],
        "settings": {"batch": args.batch, "samples_per_epoch": args.samples,
                     "repeats": args.repeats, "baseline_workers": args.workers,
                     "models": names, "paths": list(paths), "eval_samples": args.eval_samples,
                     "speed_default": dataclasses.asdict(task.Speed.default(device)),
                     "retained_freed_memory": retained},
        "epoch_seconds": times,
        "images_per_second": ips,
        "data_seconds_per_epoch": data,
        # speed ratios: medians of the per-repeat ratios (robust to a shared machine's drift)
        "ratio_fast_to_baseline": {n: paired(times[n]["baseline"], times[n]["fast"])
                                   for n in names if {"fast", "baseline"} <= set(paths)},
        "ratio_fast_to_plain": {n: paired(times[n]["plain"], times[n]["fast"])
                                for n in names if {"fast", "plain"} <= set(paths)},
        # how far this run can tell the two paths apart (paired_interval)
        "ratio_fast_to_plain_interval": {n: paired_interval(times[n]["plain"], times[n]["fast"])
                                         for n in names
                                         if {"fast", "plain"} <= set(paths) and args.repeats > 1},
        # time of FedPara per image over the original's, per path
        "time_ratio_fedpara_to_original": {
            n: {p: paired(times[n][p], times["original"][p]) for p in paths}
            | ({"default": paired(times[n][default], times["original"][default])}
               if default else {})
            for n in names[1:]},
        "time_ratio_fedpara_to_original_interval": {
            n: paired_interval(times[n][default], times["original"][default])
            for n in names[1:] if default and args.repeats > 1},
        "default_path": default,
        "graph_captures_while_timed": captured,
        "flops_per_epoch": flops,
        "flops_per_image": {n: flops[n] / args.samples for n in names},
        "achieved_flops_per_second": achieved,
        "peak_bf16_flops_per_second": peak,
        "fraction_of_bf16_peak": {n: {p: a / peak for p, a in achieved[n].items()}
                                  for n in names} if peak else None,
        "overheads": over,
    }  # fmt: skip
    projections = {}
    for preset in PRESETS:
        for variant in ("original", "fedpara"):
            name = preset_model(preset, variant)
            if name in names:
                projections[f"{preset}/{variant}"] = {
                    "model": name,
                    **{p: project(ips[name][p], over[name], preset)
                       for p in (*paths, "default") if p in ips[name]},
                }
    record["projected_full_presets"] = projections
    return record


def report(record: dict) -> None:
    print(f"\n{record['device']} ({record['device_type']}, {record['threads']} thread(s)), "
          f"torch {record['torch']}")
    if "images_per_second" in record:
        report_throughput(record)
    if "smoke" in record:
        for path in ("fast", "plain"):
            accs = ", ".join(f"{r['accuracy']:.3f}" for r in record["smoke"][path])
            print(f"smoke FedAvg {path:5s} accuracy by round: {accs}")


def report_throughput(record: dict) -> None:
    print("training images per second:")
    paths = record["settings"]["paths"]
    print(f"{'model':14s}" + "".join(f"{p:>20s}" for p in paths))
    for n, row in record["images_per_second"].items():
        print(f"{n:14s}" + "".join(f"{row[p]:20.1f}" for p in paths))
    print("data path alone, seconds per epoch: " + ", ".join(
        f"{p} {v:.4f}" for p, v in record["data_seconds_per_epoch"].items()))
    for key in ("ratio_fast_to_baseline", "ratio_fast_to_plain"):
        print(f"{key}: " + ", ".join(f"{n} {v:.2f}" for n, v in record[key].items()))
    for n, row in record["time_ratio_fedpara_to_original"].items():
        print(f"time ratio {n}/original: " + ", ".join(f"{p} {v:.2f}" for p, v in row.items()))
    for key in ("ratio_fast_to_plain_interval", "time_ratio_fedpara_to_original_interval"):
        for n, i in record.get(key, {}).items():
            print(f"{key} {n}: {i['low']:.3f}-{i['high']:.3f} "
                  f"(coverage {i['coverage']:.0%}, {i['repeats']} repeats)")
    if record["fraction_of_bf16_peak"]:
        for n, row in record["fraction_of_bf16_peak"].items():
            print(f"fraction of bf16 peak, {n}: {row.get('fast', math.nan):.2%} (fast)")
    print("projected wall time of the full presets (minutes):")
    for key, proj in record["projected_full_presets"].items():
        cells = ", ".join(f"{p} {v['seconds'] / 60:.1f}" for p, v in proj.items() if p != "model")
        print(f"  {key:28s} {cells}")
    for n, row in record.get("cohort", {}).items():
        if "error" in row:
            print(f"{n}: the cohort failed: {row['error']}")
            continue
        eager = (f" (eager {row['images_per_second_together_eager']:.1f})"
                 if "images_per_second_together_eager" in row else "")
        print(f"{n}: {row['clients']} clients together {row['images_per_second_together']:.1f} "
              f"img/s{eager}, apart {row['images_per_second_apart']:.1f} img/s; relative difference "
              f"{row['together_vs_apart']['relative_difference']:.2e} (float rounding alone: "
              f"{row['noise_floor']['relative_difference']:.2e})")
    for n, checks in record.get("engine_checks", {}).items():
        for precision, row in (("fp32", checks), ("bf16", checks.get("bf16"))):
            if row is None:  # records from before the bf16 check
                continue
            print(f"{n}, {precision}: graphed vs eager loss {row['graph_loss']:.5f} / "
                  f"{row['eager_loss']:.5f}, relative difference "
                  f"{row['graph_vs_eager']['relative_difference']:.2e} (float rounding alone: "
                  f"{row['noise_floor']['relative_difference']:.2e})")
    for row in record.get("parallel_clients", []):
        print(f"{row['processes']} process(es) side by side: {row['images_per_second']:.1f} img/s")


if __name__ == "__main__":
    main()
