"""What a fresh ClientApp process pays before it trains: imports, the dataset, the clients' split.

    python benchmarks/client_start.py --repeats 4

In a Flower deployment every message starts a new ClientApp process on the node (the
simulation keeps its processes), so these costs come once per message: once a round with the
cohort engine, once per client and round otherwise. Each repeat starts two cold Python processes
that do what a ClientApp does first (`import fedpara.client_app`, `task.load_splits`,
`task.client_data` for one client of cifar10-noniid on full-size fake CIFAR-10 files): one
computing the split with flwr-datasets, one reading it from $FEDPARA_SPLITS (`fedpara.partition`),
interleaved. Reports the medians per phase and writes benchmarks/results/client_start-<device>.json.
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--train-images", type=int, default=50_000)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cli_checks.at_least(p, args, 1, "repeats", "train_images")
    cli_checks.out(p, args.out)
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
