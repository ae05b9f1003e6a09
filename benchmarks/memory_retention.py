"""What keeping freed memory mapped changes on a CPU: VGG16-GN steps, FedPara γ=0.1 vs original,
in processes with and without `fedpara.task.retain_freed_memory`.

    python benchmarks/memory_retention.py                 # 4 pairs of processes
    python benchmarks/memory_retention.py --pairs 6 --repeats 12

The setting is process-wide and cannot be undone, so one process cannot time both sides: the
run starts pairs of child processes, one without the setting and one with it (the order flips
every pair), and each child times both models the way `benchmarks/layer_overhead.py` does
(forward + backward + SGD step on random 32×32 images at batch 64, models interleaved, the
order flipping every repeat). Each child reports its median step per model, the median of its
paired FedPara/original ratios and the minor page faults per step (getrusage: here mostly
pages the kernel maps in zero-filled). Linux (POSIX getrusage); the setting needs glibc. The summary compares the two sides over the children:
medians of the children's medians. Writes benchmarks/results/memory_retention-<device>.json
(`--out` to choose).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_checks  # noqa: E402
from layer_overhead import RESULTS, build, device_name, slug, step, write_json  # noqa: E402

from fedpara.task import retain_freed_memory  # noqa: E402

MODELS = ("original", "fedpara")


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child(args: argparse.Namespace) -> dict:
    """Time both models in this process, with the setting applied first if `args.retain`."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    applied = retain_freed_memory() if args.retain else False
    torch.manual_seed(0)
    device = torch.device("cpu")
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    models = {m: build(m, args.gamma, device, False) for m in MODELS}
    for m in MODELS:  # warm-up: the allocator reaches its steady state
        for _ in range(2):
            step(*models[m], x, y, False)
    seconds = {m: [] for m in MODELS}
    page_faults = {m: 0 for m in MODELS}
    for r in range(args.repeats):
        for m in MODELS if r % 2 == 0 else reversed(MODELS):
            before, start = faults(), time.perf_counter()
            for _ in range(args.steps):
                step(*models[m], x, y, False)
            seconds[m].append((time.perf_counter() - start) / args.steps)
            page_faults[m] += faults() - before
    steps = args.repeats * args.steps
    return {
        "retain": args.retain,
        "applied": applied,
        "threads": torch.get_num_threads(),
        "median_step_seconds": {m: statistics.median(s) for m, s in seconds.items()},
        "time_ratio_paired_median": statistics.median(
            f / o for f, o in zip(seconds["fedpara"], seconds["original"], strict=True)),
        "minor_faults_per_step": {m: n / steps for m, n in page_faults.items()},
    }


def summarize(children: list[dict]) -> dict:
    """Per side ("off", "on"): medians over its children; and off/on per model."""
    sides = {}
    for name, retain in (("off", False), ("on", True)):
        runs = [c for c in children if c["retain"] == retain]
        sides[name] = {
            "children": len(runs),
            "median_step_seconds": {m: statistics.median(c["median_step_seconds"][m]
                                                         for c in runs) for m in MODELS},
            "time_ratio_fedpara_to_original": statistics.median(
                c["time_ratio_paired_median"] for c in runs),
            "minor_faults_per_step": {m: statistics.median(c["minor_faults_per_step"][m]
                                                           for c in runs) for m in MODELS},
        }
    sides["step_time_on_to_off"] = {
        m: sides["on"]["median_step_seconds"][m] / sides["off"]["median_step_seconds"][m]
        for m in MODELS}
    return sides


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--pairs", type=int, default=4, help="pairs of child processes (off, on)")
    p.add_argument("--repeats", type=int, default=8, help="interleaved rounds per child")
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/memory_retention-<device>.json)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--retain", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cli_checks.at_least(p, args, 1, "pairs", "repeats", "steps", "batch")
    cli_checks.threads(p, args.threads)
    cli_checks.gammas(p, "--gamma", args.gamma)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    cli_checks.out(p, args.out)

    common = ["--repeats", str(args.repeats), "--steps", str(args.steps), "--batch",
              str(args.batch), "--gamma", str(args.gamma)]
    if args.threads is not None:
        common += ["--threads", str(args.threads)]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    children = []
    for i in range(args.pairs):
        for retain in (False, True) if i % 2 == 0 else (True, False):
            command = [sys.executable, __file__, "--child", *common,
                       *(["--retain"] if retain else [])]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"child process failed ({' '.join(command)}):\n"
                                   f"{done.stderr[-2000:]}")
            children.append(json.loads(done.stdout.strip().splitlines()[-1]))
            side = "on " if retain else "off"
            c = children[-1]
            print(f"pair {i + 1}/{args.pairs} {side}: steps "
                  + ", ".join(f"{m} {c['median_step_seconds'][m]:.3f} s" for m in MODELS)
                  + f"; ratio {c['time_ratio_paired_median']:.3f}; faults/step "
                  + ", ".join(f"{c['minor_faults_per_step'][m]:.0f}" for m in MODELS),
                  flush=True)
    if not any(c["applied"] for c in children if c["retain"]):
        print("note: this C library is not glibc; the setting changed nothing")
    device = device_name(torch.device("cpu"))
    record = {
        "benchmark": "memory_retention",
        "device": device,
        "device_type": "cpu",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # other processes on the machine skew CPU timings: 1-minute load average around the run
        "load_average": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "model": "vgg16-gn, 10 classes",
        "gamma": args.gamma,
        "batch": args.batch,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "children": children,
        "summary": summarize(children),
    }
    print(json.dumps(record["summary"], indent=1))
    out = args.out or RESULTS / f"memory_retention-{slug(device)}.json"
    write_json(out, record)
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
