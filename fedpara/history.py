"""What a federated run produced: one record per round, with its config and hardware, as JSON.

    history = History.load("results/fmnist-noniid/fedpara-full.json")
    history.column("accuracy"), history.cumulative_gib()

Imports without Flower or torch (the book reads histories on any machine).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from fedpara.storage import write_atomic

GIB = 2**30
FINAL_WINDOW = 3  # rounds: the book's "final accuracy" is the mean of the last 3 (noisy curves)


@dataclass
class RoundRecord:
    """One round. Bytes count the arrays in the messages (raw tensor bytes, no framing).

    accuracy/loss: for server evaluation, the global model on the test set; for client
    evaluation, the mean over evaluated clients weighted by their held-out examples.
    """

    round: int
    accuracy: float
    loss: float
    bytes_up: int  # clients -> server, summed over this round's training clients
    bytes_down: int  # server -> clients for training
    cum_bytes: int  # up + down, all rounds so far
    wall_seconds: float  # this round, training + aggregation + evaluation
    train_loss: float = float("nan")  # mean local training loss, weighted by examples
    clients: list[int] = field(default_factory=list)  # partition ids that trained
    eval_examples: int = 0
    # client evaluation: the clients asked to evaluate; those with held-out examples are
    # `scored_clients` (a client with none is asked but not scored)
    eval_clients: int = 0
    untrained_clients: int = 0  # never trained so far: not scored, reported apart
    eval_bytes_down: int = 0  # global arrays sent for client evaluation (not in cum_bytes)
    scored_clients: list[int] = field(default_factory=list)  # partition ids, held-out data > 0
    client_accuracy: list[float] = field(default_factory=list)  # their accuracies, same order
    # client evaluation: the round's trained clients (`clients` order) on their own held-out
    # data right after local training, before the server's average replaces the shared part
    accuracy_after_training: float = float("nan")  # weighted by held-out examples
    client_accuracy_after_training: list[float] = field(default_factory=list)
    # ‖θ_after − θ_before‖ / ‖θ_before‖ of each parameter but the biases over a round's local
    # training, the mean over the round's clients (fedpara.task.tracked_parameters)
    parameter_change: dict[str, float] = field(default_factory=dict)


def check_window(value: int, name: str = "window") -> None:
    """A count of last rounds (averaged, or whose jitter is measured): an integer >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1 (rounds averaged)")


def source_commit(package: str | Path | None = None) -> str | None:
    """The git commit of the fedpara source that is running (or of the package folder
    `package`), with "+modified" when its files differ from that commit; None when the package
    is not a tracked part of a git checkout (an installed wheel, a copy without .git) or git is
    not there."""
    package = Path(package or Path(__file__).parent).resolve()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()

    try:
        if not git("ls-files", "--", "__init__.py"):  # e.g. a copy inside an ignored .venv
            return None
        head, changed = git("rev-parse", "--short=12", "HEAD"), git("status", "--porcelain",
                                                                    "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+modified" if changed else "")


def hardware_info(device: str | None = None) -> dict[str, Any]:
    """Device name, core count, library versions and the source's git commit, for the
    record."""

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    name = platform.processor() or platform.machine()
    try:  # the CPU model is more telling than "x86_64"
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    if device and device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(torch.device(device))
        else:  # a deployment's server without a GPU; its nodes have one
            name = f"{name} (this host has no CUDA device)"
    return {
        "device": device or "cpu",
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "flwr": version("flwr"),
        "fedpara": version("fedpara"),
        "commit": source_commit(),
    }


@dataclass
class History:
    """Per-round records of one run, with the config (a dict) and the hardware that ran it."""

    config: dict[str, Any]
    hardware: dict[str, Any] = field(default_factory=dict)
    records: list[RoundRecord] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def append(self, record: RoundRecord) -> None:
        expected = len(self.records) + 1
        if record.round != expected:
            raise ValueError(
                f"record.round={record.round}; expected {expected} (rounds are 1, 2, ...)"
            )
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    # reading ----------------------------------------------------------------------------

    def column(self, name: str) -> list[Any]:
        """One field over rounds, e.g. `column("accuracy")`."""
        names = [f.name for f in fields(RoundRecord)]
        if name not in names:
            raise ValueError(f"name={name!r}; allowed: {', '.join(names)}")
        return [getattr(r, name) for r in self.records]

    def cumulative_gib(self) -> list[float]:
        """Traffic up + down after each round, in GiB (2**30 bytes)."""
        return [r.cum_bytes / GIB for r in self.records]

    @property
    def final_accuracy(self) -> float:
        """The last round's accuracy (see `mean_accuracy` for the book's final accuracy)."""
        return self.records[-1].accuracy if self.records else float("nan")

    def mean_accuracy(self, last: int = FINAL_WINDOW) -> float:
        """Mean accuracy of the last `last` rounds, skipping rounds that scored nothing (NaN
        when none did): the book's "final accuracy" with the default window."""
        check_window(last, "last")
        scored = [r.accuracy for r in self.records[-last:] if not math.isnan(r.accuracy)]
        return sum(scored) / len(scored) if scored else float("nan")

    @property
    def wall_seconds(self) -> float:
        return sum(r.wall_seconds for r in self.records)

    # storage ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; NaN (nothing was scored) and ±inf (a diverged run) become null,
        which reads back as NaN."""
        def clean(value: Any) -> Any:
            if isinstance(value, list):
                return [clean(v) for v in value]
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            return None if isinstance(value, float) and not math.isfinite(value) else value

        return {
            "config": self.config,
            "hardware": self.hardware,
            "created": self.created,
            "records": [{k: clean(v) for k, v in asdict(r).items()} for r in self.records],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        def nan(value: Any) -> Any:
            if isinstance(value, list):
                return [nan(v) for v in value]
            if isinstance(value, dict):
                return {k: nan(v) for k, v in value.items()}
            return float("nan") if value is None else value

        def record(values: dict[str, Any]) -> RoundRecord:
            return RoundRecord(**{k: nan(v) for k, v in values.items()})

        return cls(
            config=data["config"],
            hardware=data.get("hardware", {}),
            records=[record(r) for r in data["records"]],
            created=data.get("created", ""),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temp file in the same folder, then os.replace)."""
        path = Path(path)
        write_atomic(path, json.dumps(self.to_dict(), indent=1, allow_nan=False).encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> History:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @staticmethod
    def default_path(config: Any, results_dir: str | os.PathLike = "results") -> Path:
        """`<results_dir>/<preset>/<run_name>.json` for an ExperimentConfig: run_name is
        `<variant>-<profile>`, plus `+field=value` for each setting changed from the preset's."""
        return Path(results_dir) / config.preset / f"{config.run_name}.json"

