"""Deployment rounds with and without a long-lived `fedpara.worker`, interleaved on one machine.

    python benchmarks/worker_rounds.py --repeats 2 -- --engine client --rounds 4 \
        --set clients_per_round=2 --set local_epochs=1 --set eval_samples=1000

Runs `benchmarks/deployment_rounds.py` (the arguments after `--`) `--repeats` times each way:
with `--no-worker`, every message starts a ClientApp process that imports torch, starts the
device and loads the data before it trains; with `--worker`, the SuperNode's ClientApps forward
their work to one process that keeps all of that. The two ways alternate, and the order flips
every repeat, so that both see the same machine. Reports each run's round wall times and the
median, over the runs of each way, of their medians after the first round (the first also pays
the worker's own start), and the seconds a round saved. Writes
benchmarks/results/worker_rounds-<device>.json (`--out` to choose).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cli_checks  # noqa: E402
import deployment_rounds  # noqa: E402
from layer_overhead import device_name, slug  # noqa: E402

from fedpara.storage import write_atomic  # noqa: E402

WAYS = ("no-worker", "worker")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    passed = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2, help="runs each way")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/worker_rounds-<device>.json)")
    args = p.parse_args(own)
    cli_checks.at_least(p, args, 1, "repeats")
    cli_checks.out(p, args.out)
    for flag in ("--worker", "--no-worker", "--out", "--prepare"):
        if flag in passed:
            p.error(f"{flag} after --: this script sets it for each run")

    runs = []
    with tempfile.TemporaryDirectory(prefix="fedpara-worker-rounds-") as tmp:
        for repeat in range(args.repeats):
            for way in (WAYS if repeat % 2 == 0 else WAYS[::-1]):
                print(f"== repeat {repeat + 1}, {way}", flush=True)
                record = deployment_rounds.main(
                    [*passed, f"--{way}", "--out", str(Path(tmp) / f"{way}-{repeat}.json")])
                runs.append({"worker": record["worker"], "repeat": repeat,
                             **deployment_rounds.run_summary(record)})
    medians = {way: statistics.median(r["median_round_seconds_after_first"] for r in runs
                                      if r["worker"] == (way == "worker")) for way in WAYS}
    from fedpara.task import resolve_device

    config = record["config"]
    result = {
        "benchmark": "worker_rounds",
        "device": record["device"],
        "hardware": record["hardware"],
        "python": record["python"],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "deployment_rounds_arguments": passed,
        "preset": record["preset"], "variant": record["variant"], "engine": record["engine"],
        "clients_per_round": config["clients_per_round"],
        "local_epochs": config["local_epochs"],
        "model": config["model"],
        "fake_images": record["fake_images"],
        "threads": record["threads"],
        "runs": runs,
        # the median over each way's runs of their medians after the first round
        "median_round_seconds_after_first": medians,
        "seconds_saved_per_round": medians["no-worker"] - medians["worker"],
        "worker_to_no_worker": medians["worker"] / medians["no-worker"],
    }  # fmt: skip
    device = resolve_device(config["device"])
    name = f"worker_rounds-{slug(device_name(device))}.json"
    out = args.out or ROOT / "benchmarks" / "results" / name
    write_atomic(out, (json.dumps(result, indent=2) + "\n").encode())
    print(f"median round after the first: {medians['no-worker']:.2f} s without a worker, "
          f"{medians['worker']:.2f} s with one ({result['worker_to_no_worker']:.2f}); wrote {out}")
    return result


if __name__ == "__main__":
    main()
