"""Stored runs: load a history if it is the same experiment, else train; per-client scores.

    from fedpara.results import load_or_train, planned_traffic_gib, run_command
    history, status = load_or_train(config, "results", train=False)  # never trains
    if history is None:
        print(status, run_command(config), planned_traffic_gib(config))

A stored history counts for `config` only if it was made with the same experiment: the file is
`History.default_path(config, results_dir)` (preset, variant and profile are in its name) and
every field of its stored config equals `config`'s, except the fields in `MAY_DIFFER`, which say
where and how a run executed, not what it computed. The config stored in the history is the
truth: a history made by `python -m fedpara.run`, by `flwr run` or by a notebook is accepted alike.

Personalized runs are scored by each client on its own held-out data, but a history only keeps
the weighted mean. `score_clients` recomputes every client's accuracy from the run's final
checkpoint (the global arrays plus each client's personal arrays) and checks that the weighted
mean equals the history's last accuracy; `ClientScores` stores the result next to the history.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedpara.config import ExperimentConfig
from fedpara.history import History, write_atomic

__all__ = [
    "MAY_DIFFER",
    "ClientScores",
    "client_accuracies",
    "client_scores_path",
    "differing_fields",
    "load_client_scores",
    "load_or_train",
    "how_to_run",
    "planned_traffic_gib",
    "run_summary",
    "run_command",
    "same_experiment",
    "score_clients",
]

# where and how a run executed, not what it computed
MAY_DIFFER = frozenset({
    "data_dir", "device", "results_dir", "checkpoint_dir", "checkpoint_every",
    "client_num_cpus", "client_num_gpus", "fast_batches",
})
STATUSES = ("stored", "trained", "not run yet", "stored run has other settings")


def differing_fields(stored: Mapping[str, Any], config: ExperimentConfig) -> list[str]:
    """Names of the fields (outside MAY_DIFFER) where a stored config differs from `config`.

    A field missing from the stored config was added to ExperimentConfig after the run was made;
    it counts as its default value (new fields default to the behaviour that existed before).
    """
    defaults = {f.name: f.default for f in fields(ExperimentConfig)}
    return sorted(k for k, v in config.to_dict().items()
                  if k not in MAY_DIFFER and stored.get(k, defaults[k]) != v)


def same_experiment(stored: Mapping[str, Any], config: ExperimentConfig) -> bool:
    """True when a stored config (a dict) describes the same experiment as `config`."""
    return not differing_fields(stored, config)


def run_command(config: ExperimentConfig) -> str:
    """The shell command that makes this config's history (a preset's variant and profile)."""
    if config.preset == "custom":
        raise ValueError("config.preset='custom': only a preset's config has a one-line command")
    return (f"python -m fedpara.run --preset {config.preset} --variant {config.variant_name} "
            f"--profile {config.profile}")


def planned_traffic_gib(config: ExperimentConfig) -> float:
    """What the run will move, up + down, in GiB, from the model alone (nothing is trained)."""
    from fedpara.accounting import comm_cost_gib
    from fedpara.task import init_model

    return comm_cost_gib(init_model(config), config.clients_per_round, config.rounds,
                         config.algorithm, config.transport)


def load_or_train(config: ExperimentConfig, results_dir: str | Path, *, train: bool,
                  retrain: bool = False, progress: bool = True) -> tuple[History | None, str]:
    """(history, status): the stored history of `config` if it is the same experiment, else a
    new run when `train` is True (saved to the stored path), else (None, why there is none).

    status is one of "stored", "trained", "not run yet", "stored run has other settings".
    `retrain=True` trains even when a matching history is stored.
    """
    path = History.default_path(config, results_dir)
    stored = History.load(path) if path.exists() else None
    if stored is not None and not retrain and same_experiment(stored.config, config):
        return stored, "stored"
    if not train:
        return None, "not run yet" if stored is None else "stored run has other settings"
    from fedpara.experiment import run_experiment  # imports Flower and Ray: only when training

    history = run_experiment(config, progress=progress)
    history.save(path)
    return history, "trained"


# per-client scores ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientScores:
    """Each scored client's correct predictions and held-out examples after round `round`."""

    config: dict[str, Any]
    round: int
    correct: dict[int, int]  # partition id -> correct predictions on its held-out data
    examples: dict[int, int]  # partition id -> its held-out examples

    def accuracies(self) -> dict[int, float]:
        """Partition id -> accuracy in [0, 1] (clients without held-out data are left out)."""
        return {p: self.correct[p] / n for p, n in self.examples.items() if n > 0}

    @property
    def weighted_accuracy(self) -> float:
        """Correct over examples, all clients pooled (what the history records)."""
        total = sum(self.examples.values())
        return sum(self.correct.values()) / total if total else float("nan")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = {"config": self.config, "round": self.round,
                "clients": {str(p): {"correct": self.correct[p], "examples": self.examples[p]}
                            for p in sorted(self.examples)}}
        write_atomic(path, json.dumps(data, indent=1).encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> ClientScores:
        with open(path) as f:
            data = json.load(f)
        clients = {int(p): v for p, v in data["clients"].items()}
        return cls(config=data["config"], round=int(data["round"]),
                   correct={p: int(v["correct"]) for p, v in clients.items()},
                   examples={p: int(v["examples"]) for p, v in clients.items()})


def client_scores_path(config: ExperimentConfig, results_dir: str | Path = "results") -> Path:
    """`<results_dir>/<preset>/clients/<variant>-<profile>.json`, next to the history."""
    return (Path(results_dir) / config.preset / "clients"
            / f"{config.variant_name}-{config.profile}.json")


def score_clients(config: ExperimentConfig, checkpoint: str | Path) -> ClientScores:
    """Score every client the run scored, from a checkpoint of its last round.

    As the ServerApp does: a personalized run's clients that have trained, each with the global
    arrays and its own personal arrays; a FedAvg run's every client with the global model.
    Raises ValueError if the checkpoint is of another experiment or not of the last round.
    """
    import torch

    from fedpara import task

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    differing = differing_fields(state["config"], config)
    if differing:
        raise ValueError(f"checkpoint {checkpoint} is of another experiment: "
                         f"{', '.join(differing)} differ")
    if state["round"] != config.rounds:
        raise ValueError(f"checkpoint {checkpoint} is of round {state['round']}; "
                         f"expected the last round, {config.rounds}")
    device = task.resolve_device(config.device)
    clients = sorted(state["trained"]) if config.personalized else range(config.num_clients)
    correct, examples = {}, {}
    for partition_id in clients:
        model = task.init_model(config)
        task.set_arrays(model, state["global"])
        task.set_arrays(model, state["local"].get(partition_id, {}))
        data = task.client_data(config, partition_id, device=device)
        result = task.evaluate(model, data.holdout, device=device)
        correct[partition_id], examples[partition_id] = result.correct, result.num_examples
    return ClientScores(config=config.to_dict(), round=state["round"], correct=correct,
                        examples=examples)


def load_client_scores(config: ExperimentConfig, history: History,
                       results_dir: str | Path = "results") -> ClientScores | None:
    """The stored per-client scores of `history`'s run, else scores computed from the run's final
    checkpoint in `config.checkpoint_dir` (and stored), else None.

    Scores count only if they are of the same experiment and reproduce the history's last
    accuracy (to 1e-6), so scores of another run of the same config are never shown.
    """
    def matches(scores: ClientScores) -> bool:
        return (same_experiment(scores.config, config) and scores.round == len(history)
                and abs(scores.weighted_accuracy - history.final_accuracy) < 1e-6)

    path = client_scores_path(config, results_dir)
    if path.exists():
        scores = ClientScores.load(path)
        if matches(scores):
            return scores
    if not config.checkpoint_dir:
        return None
    from fedpara.server_app import checkpoint_path  # imports Flower: only when scoring

    checkpoint = checkpoint_path(config.checkpoint_dir, config.rounds)
    if not checkpoint.exists():
        return None
    try:
        scores = score_clients(config, checkpoint)
    except ValueError:
        return None
    if not matches(scores):
        return None
    scores.save(path)
    return scores


# what a chapter shows about its runs ---------------------------------------------------------


def run_summary(config: ExperimentConfig, history: History | None, status: str) -> dict[str, Any]:
    """One table row: the protocol, then what the stored run measured and where it ran, or
    (no run) the traffic it will cost. Accuracy is a fraction; traffic in GiB; time in minutes.
    Values are rounded for display (4 decimals; MiB 3, minutes 1)."""
    row: dict[str, Any] = {
        "preset": config.preset, "variant": config.variant_name, "history": status,
        "profile": config.profile, "rounds": config.rounds,
        "clients / round": config.clients_per_round, "clients": config.num_clients,
        "wire format": config.transport,
    }
    if history is None:
        row["planned traffic (GiB)"] = round(planned_traffic_gib(config), 4)
        return row
    hardware = history.hardware
    first = history.records[0]
    row.update({
        "rounds run": len(history),
        "final accuracy": round(history.final_accuracy, 4),
        "traffic (GiB)": round(history.cumulative_gib()[-1], 4),
        "MiB / round": round((first.bytes_up + first.bytes_down) / 2**20, 3),
        "training time (min)": round(history.wall_seconds / 60, 1),
        "device": hardware.get("device_name"),
        "cores": hardware.get("cpu_count"),
        "torch": hardware.get("torch"), "flwr": hardware.get("flwr"),
        "fedpara": hardware.get("fedpara"),
        "date": history.created[:10],
    })
    return row


def how_to_run(configs: list[ExperimentConfig], chapter: str) -> str:
    """Markdown: the commands that make the missing runs of a chapter (its profile)."""
    if not configs:
        return ""
    profiles = sorted({c.profile for c in configs})
    commands = "\n".join(run_command(c) for c in configs)
    return (f"No stored {'/'.join(profiles)}-profile history for: "
            f"{', '.join(f'{c.preset}/{c.variant_name}' for c in configs)}. To produce them, run\n\n"
            f"```bash\nmake execute CHAPTER={chapter} PROFILE={profiles[0]}\n```\n\n"
            f"or one run at a time:\n\n```bash\n{commands}\n```\n\n"
            "The table gives the traffic each run will cost (2 × clients per round × payload × "
            "rounds), computed from the models without training.")


def client_accuracies(config: ExperimentConfig, history: History,
                      results_dir: str | Path = "results") -> dict[int, float] | None:
    """Partition id -> accuracy on its own held-out data after the last round, or None.

    From the history's last record when it holds per-client accuracies (`scored_clients`,
    `client_accuracy`: histories of newer runs), else from `load_client_scores`.
    """
    last = history.records[-1] if history.records else None
    ids, accuracies = getattr(last, "scored_clients", None), getattr(last, "client_accuracy", None)
    if ids and accuracies and len(ids) == len(accuracies):
        return {int(p): float(a) for p, a in zip(ids, accuracies, strict=True)}
    scores = load_client_scores(config, history, results_dir)
    return scores.accuracies() if scores is not None else None
