"""How long a deployment's ServerApp and SuperExecs should wait before they look again.

    python benchmarks/server_poll.py                      # the default settings, 3 runs each
    python benchmarks/server_poll.py --settings 3:1 1:0.2 --repeats 2

Two of the waits in a Flower 1.42 deployment are ours to set:
- the ServerApp's wait between pulls for replies: Flower's `Grid.send_and_receive` waits 3 s on a
  deployment, `fedpara.server_app.exchange` waits `$FEDPARA_POLL_SECONDS` (default 1 s);
- the SuperExecs' wait before they look again for a ServerApp or ClientApp process to start:
  Flower's `FLWR_SUPEREXEC_TASK_POLL_INTERVAL` (default 1 s; `scripts/local_deployment.sh` sets
  0.2 s unless it is set already).
A shorter wait sees work sooner, but every look is a request that a daemon answers, and on a
small machine that CPU is taken from the node that trains. Each setting SERVER:SUPEREXEC (in
seconds) runs the same small deployment (`benchmarks/deployment_rounds.py`: one SuperLink, one
SuperNode holding all of cifar10-noniid's partitions, the cohort engine); the settings are
interleaved, their order flipped every repeat, and the medians of the rounds after the first are
compared. The rounds train almost nothing (2 clients of 8 images), so what is measured is the
deployment's own waiting. Writes server_poll-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cli_checks  # noqa: E402
import deployment_rounds  # noqa: E402
from layer_overhead import slug  # noqa: E402

from fedpara.storage import write_atomic  # noqa: E402

SUPEREXEC_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's; it accepts 0.01 to 60 s
# a round that trains next to nothing: the deployment's waiting is what is left
SMALL = ["--set", "clients_per_round=2", "--set", "client_samples=8", "--set", "local_epochs=1",
         "--set", "eval_samples=16", "--train-images", "10000", "--test-images", "100"]
# Flower's own waits; the ServerApp's new one; both new; both as short as the simulation's
DEFAULT_SETTINGS = ["3:1", "1:1", "1:0.2", "0.1:0.2"]


def parse_setting(text: str) -> tuple[float, float]:
    """'SERVER:SUPEREXEC' in seconds -> (server, superexec), both checked."""
    try:
        server, superexec = (float(x) for x in text.split(":"))
    except ValueError:
        raise SystemExit(f"--settings: {text!r} is not SERVER:SUPEREXEC in seconds "
                         f"(e.g. 1:0.2)") from None
    if not 0 < server < math.inf or not 0.01 <= superexec <= 60:
        raise SystemExit(f"--settings: {text!r}: the server's wait must be a positive number "
                         f"of seconds, the SuperExec's between 0.01 and 60 s")
    return server, superexec


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS,
                   help="SERVER:SUPEREXEC waits in seconds (Flower's own: 3:1)")
    p.add_argument("--repeats", type=int, default=3, help="runs per setting, interleaved")
    p.add_argument("--rounds", type=int, default=5, help="rounds per run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--wheels", type=Path, default=None, help="flwr's wheels, if not installed")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/server_poll-<device>.json)")
    args = p.parse_args(argv)
    settings = [parse_setting(x) for x in args.settings]
    if args.repeats < 1 or args.rounds < 2:
        raise SystemExit(f"--repeats must be >= 1 and --rounds >= 2 (the first round is not "
                         f"compared), got {args.repeats} and {args.rounds}")
    cli_checks.device(p, args.device)
    cli_checks.out(p, args.out)
    common = ["--device", args.device, "--rounds", str(args.rounds), *SMALL,
              *(["--wheels", str(args.wheels)] if args.wheels else [])]
    runs: dict[tuple[float, float], list[dict]] = {s: [] for s in settings}
    load = []
    saved = os.environ.get(SUPEREXEC_ENV)
    try:
        with tempfile.TemporaryDirectory(prefix="fedpara-server-poll-") as tmp:
            for repeat in range(args.repeats):
                for server, superexec in settings if repeat % 2 == 0 else settings[::-1]:
                    print(f"== repeat {repeat + 1}/{args.repeats}: the server waits {server:g} s, "
                          f"the SuperExecs {superexec:g} s", flush=True)
                    os.environ[SUPEREXEC_ENV] = repr(superexec)  # the deployment inherits it
                    record = deployment_rounds.main([
                        *common, "--poll-seconds", repr(server),
                        "--out", str(Path(tmp) / f"{server!r}-{superexec!r}-{repeat}.json")])
                    runs[server, superexec].append(deployment_rounds.run_summary(record))
                    load.append(os.getloadavg()[0])
    finally:
        os.environ.pop(SUPEREXEC_ENV, None)
        if saved is not None:
            os.environ[SUPEREXEC_ENV] = saved
    device = record["device"]
    result = {
        "benchmark": "server_poll",
        "device": device,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "setting": ("cifar10-noniid/fedpara through Flower's deployment runtime (1 SuperLink, "
                    "1 SuperNode holding all 100 partitions, cohort engine"
                    + (", its ClientApps forwarding to a fedpara.worker" if record.get("worker")
                       else "") + "), 2 clients x 8 "
                    "images a round, 16 test images, fake CIFAR-10 of 10,000 training images"),
        "rounds_per_run": args.rounds,
        "repeats": args.repeats,
        "load_average_after_each_run": load,
        "settings": [{
            "server_poll_seconds": server,
            "superexec_poll_seconds": superexec,
            "runs": measured,
            # over the runs' medians of the rounds after the first
            "median_round_seconds": statistics.median(
                r["median_round_seconds_after_first"] for r in measured),
        } for (server, superexec), measured in runs.items()],
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"server_poll-{slug(device)}.json"
    write_atomic(out, (json.dumps(result, indent=2) + "\n").encode())
    for s in result["settings"]:
        print(f"server {s['server_poll_seconds']:g} s, SuperExecs "
              f"{s['superexec_poll_seconds']:g} s: a round takes {s['median_round_seconds']:.2f} "
              f"s (median)")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
