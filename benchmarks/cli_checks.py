"""Command-line checks the benchmarks share.

    args = p.parse_args(argv)
    cli_checks.at_least(p, args, 1, "repeats", "batch")
    device = cli_checks.device(p, args.device)
    cli_checks.out(p, args.out)

Each refuses a bad value through `p.error`: argparse's usage line and one message naming the
option and what it allows, exit status 2, before the benchmark builds a model, writes data or
starts a process (a GPU session is short: a run that fails late has spent it).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedpara import task  # noqa: E402
from fedpara.storage import NotWritableError, check_writable  # noqa: E402


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def at_least(p: argparse.ArgumentParser, args: argparse.Namespace, minimum: int,
             *names: str) -> None:
    """Each named option (left out = None passes) is an integer >= `minimum`."""
    for name in names:
        value = getattr(args, name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is not None and v < minimum:
                p.error(f"{_option(name)} must be >= {minimum}, got {v}")


def threads(p: argparse.ArgumentParser, value: int | None) -> None:
    """--threads: a positive count, or left out for torch's default (0 would be ignored)."""
    if value is not None and value < 1:
        p.error(f"--threads must be >= 1 (or left out for torch's default), got {value}")


def gammas(p: argparse.ArgumentParser, option: str, values: float | Iterable[float]) -> None:
    """FedPara's gamma: each in (0, 1]."""
    for value in [values] if isinstance(values, float | int) else values:
        if not (math.isfinite(value) and 0 < value <= 1):
            p.error(f"{option} must be in (0, 1], got {value}")


def positive_seconds(p: argparse.ArgumentParser, option: str, value: float | None,
                     more_than: float = 0.0) -> None:
    """A finite number of seconds > `more_than` (nan would switch a time limit off)."""
    if value is not None and not (math.isfinite(value) and value > more_than):
        p.error(f"{option} must be a finite number of seconds > {more_than:g}, got {value}")


def unique(p: argparse.ArgumentParser, option: str, values: list) -> None:
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        p.error(f"{option} names {', '.join(repeated)} more than once")


def device(p: argparse.ArgumentParser, name: str) -> torch.device:
    """The device `name` on this machine (fedpara.task.resolve_device: "auto" allowed), or the
    error naming the devices it has."""
    try:
        return task.resolve_device(name)
    except ValueError as err:
        p.error(f"--device: {err}")


def cuda_only(p: argparse.ArgumentParser, dev: torch.device, option: str, given: bool) -> None:
    """An option that means something on CUDA only, refused on another device rather than
    recorded as if it had run."""
    if given and dev.type != "cuda":
        p.error(f"{option} is for CUDA only; --device is {dev}")


def out(p: argparse.ArgumentParser, path: Path | None) -> None:
    """--out's folder can be written (found now, not when the results are saved)."""
    if path is not None:
        try:
            check_writable(Path(path).parent, "the folder of --out")
        except NotWritableError as err:
            p.error(str(err).splitlines()[0])
