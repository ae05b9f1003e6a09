"""What a fresh ClientApp process pays before it trains: imports, the dataset, the clients' split.

    python benchmarks/client_start.py --repeats 4

In a Flower deployment every message starts a new ClientApp process on the node (the
simulation keeps its processes), so these costs come once per message: once a round with the
cohort engine, once per client and round otherwise. Each repeat starts two cold Python processes
that do what a ClientApp does first (`import fedpara.client_app`, `task.load_splits`,
`task.client_data` for one client of cifar10-noniid on full-size fake CIFAR-10 files): one
computing the split with flwr-datasets, one reading it from $FEDPARA_SPLITS (`fedpara.partition`),
interleaved. Reports the medians per phase and writes benchmarks/results/client_start-<device>.json.
A node with a long-lived `fedpara.worker` (node config `worker=<socket>`) pays these once, in the
worker: its ClientApp processes import Flower and `fedpara.client_app` only, not torch.

    python benchmarks/client_start.py --cohort 16 --device cuda --splits benchmarks/device-splits

`--cohort K` times instead what a fresh process pays for one round of the cohort engine
(`engine="cohort"`, fedpara/worker.py's `_train_cohort`) on `--device`, without Flower (the
GPU machine has none): importing torch and fedpara's training path, the device's start (CUDA's
context), the dataset, K clients' batches, K models built and moved, the round's training
(`cohort.train_cohort` with its defaults: on CUDA the step's capture happens here), and the
replies' arrays copied to the host; then a second round in the same process, which a process
that lived on would pay instead of all of the above. Each repeat is one fresh process, timed
from its start to its exit as well (`process_seconds`: the interpreter's own start and exit
included). The clients are cifar10-noniid's first K at round 1; `--splits` is
$FEDPARA_SPLITS (stored by benchmarks/prepare_device.sh for the GPU machine, which has no
flwr-datasets to compute it). Writes client_start-cohort-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cli_checks  # noqa: E402
from layer_overhead import device_name, slug  # noqa: E402

from fedpara.config import get_preset  # noqa: E402
from fedpara.fakedata import write_fake_cifar  # noqa: E402
from fedpara.partition import SPLITS_ENV  # noqa: E402
from fedpara.storage import write_atomic  # noqa: E402

PHASES = ("import_seconds", "dataset_seconds", "split_and_batches_seconds")

# what the ClientApp does before training, timed, in a fresh interpreter
CHILD = """
import json, sys, time
t0 = time.perf_counter()
import fedpara.client_app
from fedpara import task
from fedpara.config import ExperimentConfig
t1 = time.perf_counter()
config = ExperimentConfig.from_dict(json.loads(sys.argv[1]))
task.load_splits(config)
t2 = time.perf_counter()
task.client_data(config, 0)
t3 = time.perf_counter()
print(json.dumps({"import_seconds": t1 - t0, "dataset_seconds": t2 - t1,
                  "split_and_batches_seconds": t3 - t2,
                  "imported_flwr_datasets": "flwr_datasets" in sys.modules}))
"""

ROUND_PHASES = ("import_seconds", "device_seconds", "dataset_seconds", "client_data_seconds",
                "models_seconds", "first_round_seconds", "replies_seconds",
                "second_round_seconds")

# one round of the cohort engine in a fresh interpreter, timed phase by phase
ROUND_CHILD = """
import json, sys, time
t = [time.perf_counter()]
import torch
from fedpara import task
from fedpara.cohort import train_cohort
from fedpara.config import ExperimentConfig
t.append(time.perf_counter())
config = ExperimentConfig.from_dict(json.loads(sys.argv[1]))
k = int(sys.argv[2])
device = task.resolve_device(config.device)
def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)
torch.zeros(1, device=device); sync()
t.append(time.perf_counter())
task.load_splits(config)
t.append(time.perf_counter())
seeds = [task.client_seed(config.seed, 1, p) for p in range(k)]
data = [task.client_data(config, p, seed=s) for p, s in enumerate(seeds)]
t.append(time.perf_counter())
models = [task.init_model(config).to(device) for _ in range(k)]
sync()
t.append(time.perf_counter())
def round_(lr):
    train_cohort(models, [d.train for d in data], epochs=config.local_epochs, lr=lr,
                 device=device, seeds=seeds)
    sync()
round_(config.round_lr(1))
t.append(time.perf_counter())
keys = list(models[0].state_dict())
replies = [{n: a.numpy() for n, a in task.get_arrays(m, keys).items()} for m in models]
t.append(time.perf_counter())
round_(config.round_lr(2))
t.append(time.perf_counter())
names = %r
print(json.dumps(dict(zip(names, (b - a for a, b in zip(t, t[1:]))))))
""" % (ROUND_PHASES,)


def cohort_round(args: argparse.Namespace, tmp: Path) -> dict:
    """`--cohort K`: fresh processes, each paying one cohort round's start and a second round."""
    from fedpara.task import resolve_device

    device = resolve_device(args.device)
    data = tmp / "data"
    write_fake_cifar(data, "cifar10", n_train=args.train_images, n_test=10_000)  # as
    # benchmarks/deployment_rounds.py writes them: the same labels, so the same stored split
    config = get_preset("cifar10-noniid", variant="fedpara", profile="full").replace(
        data_dir=str(data), device=args.device, local_epochs=1, engine="cohort")
    env = {**os.environ, SPLITS_ENV: str((args.splits or tmp / "splits").resolve()),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    samples = []
    for repeat in range(args.repeats + 1):  # the first stores the split (if new), untimed
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", ROUND_CHILD, json.dumps(config.to_dict()),
                               str(args.cohort)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"the round's process failed (status {done.returncode})")
        if repeat:
            samples.append({**json.loads(done.stdout),
                            "process_seconds": time.perf_counter() - start})
    phases = (*ROUND_PHASES, "process_seconds")
    medians = {phase: statistics.median(s[phase] for s in samples) for phase in phases}
    return {
        "benchmark": "client_start",
        "device": device_name(device),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "setting": f"one cohort-engine round of cifar10-noniid/fedpara (E = 1) for its first "
                   f"{args.cohort} clients, fake CIFAR-10 files of {args.train_images} "
                   f"training images, on {device.type}",
        "clients": args.cohort,
        "repeats": args.repeats,
        "samples": samples,
        "median_seconds": medians,
        # what a process that lived on would not pay again: everything but the second round
        "start_seconds": medians["process_seconds"] - medians["second_round_seconds"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--train-images", type=int, default=50_000)
    p.add_argument("--cohort", type=int, default=0, metavar="K",
                   help="time one cohort-engine round of K clients instead (see above)")
    p.add_argument("--device", default="auto", help="--cohort's device (default: CUDA if "
                   "present, else the CPU)")
    p.add_argument("--splits", type=Path, default=None,
                   help="--cohort's $FEDPARA_SPLITS (default: a new folder, computed)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cli_checks.at_least(p, args, 1, "repeats", "train_images")
    cli_checks.at_least(p, args, 0, "cohort")
    cli_checks.device(p, args.device)
    cli_checks.out(p, args.out)
    if args.cohort:
        with tempfile.TemporaryDirectory(prefix="fedpara-client-start-") as tmp:
            record = cohort_round(args, Path(tmp))
        name = f"client_start-cohort-{slug(record['device'])}.json"
        out = args.out or ROOT / "benchmarks" / "results" / name
        write_atomic(out, (json.dumps(record, indent=2) + "\n").encode())
        print("  ".join(f"{k.removesuffix('_seconds')} {v:.2f} s"
                        for k, v in record["median_seconds"].items()))
        print(f"what a process that lived on would not pay again: "
              f"{record['start_seconds']:.2f} s; wrote {out}")
        return record
    with tempfile.TemporaryDirectory(prefix="fedpara-client-start-") as tmp:
        data = Path(tmp) / "data"
        write_fake_cifar(data, "cifar10", n_train=args.train_images, n_test=1000)
        config = get_preset("cifar10-noniid", variant="fedpara", profile="full").replace(
            data_dir=str(data), device="cpu")
        splits = Path(tmp) / "splits"
        samples: dict[str, list[dict]] = {"computed": [], "stored": []}
        for repeat in range(args.repeats + 1):  # the first stores the split, untimed
            for how in ("computed", "stored") if repeat % 2 else ("stored", "computed"):
                env = {k: v for k, v in os.environ.items() if k != SPLITS_ENV}
                if how == "stored":
                    env[SPLITS_ENV] = str(splits)
                done = subprocess.run([sys.executable, "-c", CHILD,
                                       json.dumps(config.to_dict())],
                                      env=env, capture_output=True, text=True, check=True)
                if repeat:
                    samples[how].append(json.loads(done.stdout))
    medians = {how: {phase: statistics.median(s[phase] for s in rows) for phase in PHASES}
               for how, rows in samples.items()}
    record = {
        "benchmark": "client_start",
        "device": device_name(torch.device("cpu")),
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "setting": "cifar10-noniid (100 clients, Dirichlet 0.5), fake CIFAR-10 files of "
                   f"{args.train_images} training images, client 0, CPU tensors",
        "repeats": args.repeats,
        "samples": samples,
        "median_seconds": medians,
        "split_saved_seconds": medians["computed"]["split_and_batches_seconds"]
        - medians["stored"]["split_and_batches_seconds"],
        "flwr_datasets_imported": {how: rows[0]["imported_flwr_datasets"]
                                   for how, rows in samples.items()},
    }
    name = f"client_start-{slug(record['device'])}.json"
    out = args.out or ROOT / "benchmarks" / "results" / name
    write_atomic(out, (json.dumps(record, indent=2) + "\n").encode())
    for how, phases in medians.items():
        print(f"split {how:8s} " + "  ".join(f"{k.removesuffix('_seconds')} {v:.2f} s"
                                               for k, v in phases.items()))
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
