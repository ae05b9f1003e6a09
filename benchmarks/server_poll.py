"""How long the ServerApp should wait between pulls for replies in a deployment.

    python benchmarks/server_poll.py                      # 3, 1 and 0.1 s, twice each, ~10 min
    python benchmarks/server_poll.py --polls 3 1 --repeats 3

Flower 1.42's deployment grid pulls replies every 3 s; `fedpara.server_app.exchange` pulls every
`poll_seconds` ($FEDPARA_POLL_SECONDS). A shorter wait sees a reply sooner, but every pull is a
request the SuperLink answers, and on a small machine that CPU is taken from the node that
trains. This runs the same small deployment (`benchmarks/deployment_rounds.py`: one SuperLink,
one SuperNode holding all of cifar10-noniid's partitions, the cohort engine) once per wait, the
waits interleaved and their order flipped every repeat, and compares the medians of the rounds
after the first. The rounds are deliberately small (a few images per client), so that what is
measured is the deployment's own waiting and not the training. Writes
server_poll-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import deployment_rounds  # noqa: E402
from throughput import slug  # noqa: E402

from fedpara.storage import write_atomic  # noqa: E402

# a round that trains next to nothing: the deployment's waiting is what is left
SMALL = ["--set", "clients_per_round=2", "--set", "client_samples=8", "--set", "local_epochs=1",
         "--set", "eval_samples=16", "--train-images", "10000", "--test-images", "100"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--polls", type=float, nargs="+", default=[3.0, 1.0, 0.1],
                   help="the waits to compare, in seconds (3: Flower's own)")
    p.add_argument("--repeats", type=int, default=2, help="runs per wait, interleaved")
    p.add_argument("--rounds", type=int, default=5, help="rounds per run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--wheels", type=Path, default=None, help="flwr's wheels, if not installed")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/server_poll-<device>.json)")
    args = p.parse_args(argv)
    if not args.polls or any(not 0 < x < float("inf") for x in args.polls):
        raise SystemExit(f"--polls must be positive numbers of seconds, got {args.polls}")
    if args.repeats < 1 or args.rounds < 2:
        raise SystemExit(f"--repeats must be >= 1 and --rounds >= 2 (the first round is not "
                         f"compared), got {args.repeats} and {args.rounds}")
    common = ["--device", args.device, "--rounds", str(args.rounds), *SMALL,
              *(["--wheels", str(args.wheels)] if args.wheels else [])]
    runs: dict[str, list[dict]] = {repr(x): [] for x in args.polls}
    load = []
    with tempfile.TemporaryDirectory(prefix="fedpara-server-poll-") as tmp:
        for repeat in range(args.repeats):
            order = args.polls if repeat % 2 == 0 else args.polls[::-1]
            for wait in order:
                out = Path(tmp) / f"{wait!r}-{repeat}.json"
                print(f"== repeat {repeat + 1}/{args.repeats}, poll every {wait:g} s", flush=True)
                record = deployment_rounds.main([*common, "--poll-seconds", repr(wait),
                                                 "--out", str(out)])
                runs[repr(wait)].append({
                    "round_wall_seconds": record["round_wall_seconds"],
                    "median_round_seconds_after_first": record[
                        "median_round_seconds_after_first"],
                    "run_seconds": record["run_seconds"],
                })
                load.append(os.getloadavg()[0])
    device = record["device"]
    medians = {k: statistics.median(r["median_round_seconds_after_first"] for r in v)
               for k, v in runs.items()}
    result = {
        "benchmark": "server_poll",
        "device": device,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "setting": ("cifar10-noniid/fedpara through Flower's deployment runtime (1 SuperLink, "
                    "1 SuperNode holding all 100 partitions, cohort engine), 2 clients x 8 "
                    "images a round, 16 test images, fake CIFAR-10 of 10,000 training images"),
        "rounds_per_run": args.rounds,
        "repeats": args.repeats,
        "load_average_after_each_run": load,
        "runs": runs,
        "median_round_seconds": medians,  # over the runs' medians after the first round
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"server_poll-{slug(device)}.json"
    write_atomic(out, (json.dumps(result, indent=2) + "\n").encode())
    for k, v in medians.items():
        print(f"poll every {float(k):g} s: a round takes {v:.2f} s (median)")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
