"""Stored runs: load a history if it is the same experiment, else train; per-client scores.

    from fedpara.results import load_or_train, planned_traffic_gib, run_command
    history, status = load_or_train(config, "results", train=False)  # never trains
    if history is None:
        print(status, run_command(config), planned_traffic_gib(config))

A stored history counts for `config` only if it was made with the same experiment: the file is
`History.default_path(config, results_dir)` (preset, variant, profile and any changed setting
are in its name) and
every field of its stored config equals `config`'s, except the fields in `MAY_DIFFER`, which say
where and how a run executed, not what it computed. The config stored in the history is the
truth: a history made by `python -m fedpara.run`, by `flwr run` or by a notebook is accepted alike.

Personalized runs are scored by each client on its own held-out data, but a history only keeps
the weighted mean. `score_clients` recomputes every client's accuracy from the run's final
checkpoint (the global arrays plus each client's personal arrays) and checks that the weighted
mean equals the history's last accuracy; `ClientScores` stores the result next to the history.

An experiment chapter opens with one call, `open_chapter(presets, chapter=..., profile=...)`:
it finds the repository, the results and data folders (for the smoke profile of CIFAR and
FEMNIST, unless a data folder is given, tiny fake data: the same rehearsal on every machine,
whether or not it has the real data), builds the config of every preset x variant, loads each
stored history or trains it, and returns a `Chapter` with the configs, the runs, the tables a
chapter shows (`summary`, `protocol`, `plan`) and the Markdown notice above its results.

Two single-seed runs are compared with one rule, `final_gap`: the difference of their final
accuracies counts only when it is larger than the larger of their jitters (`jitter`: the
standard deviation of a run's accuracy over its last `JITTER_WINDOW` rounds). Where the same
runs exist for several seeds, `final_by_seed` collects their final accuracies.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpara.config import (
    EXECUTION_FIELDS,
    PRESETS,
    STRATEGY_FIELDS,
    ExperimentConfig,
    differing_fields,
    get_preset,
)
from fedpara.history import FINAL_WINDOW, History, check_window
from fedpara.storage import write_atomic

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "FAKE_DATA_WRITERS",
    "JITTER_WINDOW",
    "MAY_DIFFER",
    "PROTOCOL_FIELDS",
    "Chapter",
    "ClientScores",
    "Gap",
    "client_accuracies",
    "client_scores_path",
    "differing_fields",
    "final_gap",
    "find_root",
    "load_client_scores",
    "load_or_train",
    "how_to_run",
    "jitter",
    "open_chapter",
    "planned_traffic_gib",
    "run_summary",
    "run_command",
    "same_experiment",
    "score_clients",
]

# where and how a run executed, not what it computed (one definition, in fedpara.config)
MAY_DIFFER = EXECUTION_FIELDS
STATUSES = ("stored", "trained", "not run yet", "stored run has other settings")


def same_experiment(stored: Mapping[str, Any], config: ExperimentConfig) -> bool:
    """True when a stored config (a dict) describes the same experiment as `config`."""
    return not differing_fields(stored, config)


def run_command(config: ExperimentConfig) -> str:
    """The shell command that makes this config's history: a preset's variant and profile,
    with `--set field=value` for each setting changed from the preset's (the history's name
    carries them, `ExperimentConfig.run_name`)."""
    if config.preset == "custom":
        raise ValueError("config.preset='custom': only a preset's config has a one-line command")
    changes = "".join(f" --set {k}={_set_value(v)}"
                      for k, v in config.changes_from_preset().items())
    return (f"python -m fedpara.run --preset {config.preset} --variant {config.variant_name} "
            f"--profile {config.profile}{changes}")


def _set_value(value) -> str:
    """A field value as `--set` reads it, quoted for the shell when it needs to be."""
    import shlex

    return shlex.quote(("true" if value else "false") if isinstance(value, bool) else str(value))


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
    `retrain=True` with `train=True` trains even when a matching history is stored; with
    `train=False` it changes nothing (a matching stored history is returned).
    """
    path = History.default_path(config, results_dir)
    stored = History.load(path) if path.exists() else None
    if stored is not None and not (train and retrain) and same_experiment(stored.config, config):
        return stored, "stored"
    if not train:
        return None, "not run yet" if stored is None else "stored run has other settings"
    from fedpara.experiment import run_experiment  # imports Flower and Ray: only when training

    history = run_experiment(config, progress=progress)
    history.save(path)
    return history, "trained"


# comparing two single-seed runs --------------------------------------------------------------

JITTER_WINDOW = 10  # rounds: a run's jitter is the std of its accuracy over its last 10 rounds


def jitter(history: History, last: int = JITTER_WINDOW) -> float:
    """A run's round-to-round jitter: the standard deviation of its accuracy over its last
    `last` rounds, skipping rounds that scored nothing (NaN when none did).

    It is one run's noise around its own curve, not the spread a rerun with another seed
    (another partition, initialization or client schedule) would show.
    """
    check_window(last, "last")
    scored = [r.accuracy for r in history.records[-last:] if not math.isnan(r.accuracy)]
    if not scored:
        return math.nan
    mean = sum(scored) / len(scored)
    return math.sqrt(sum((a - mean) ** 2 for a in scored) / len(scored))


@dataclass(frozen=True)
class Gap:
    """One run's final accuracy minus another's, against the larger of their jitters."""

    difference: float  # first minus second, a fraction (0.012 is 1.2 points)
    noise: float  # the larger of the two runs' jitters, a fraction

    @property
    def ahead(self) -> int:
        """1 when the first run is ahead by more than the noise, -1 when the second is, 0 when
        the difference is within the noise (an exact tie included) or cannot be computed."""
        if not abs(self.difference) > self.noise:  # NaN: not shown to differ
            return 0
        return 1 if self.difference > 0 else -1

    @property
    def within(self) -> bool:
        return self.ahead == 0


def final_gap(first: History, second: History, window: int = FINAL_WINDOW,
              last: int = JITTER_WINDOW) -> Gap:
    """The book's rule for two single-seed runs: `first`'s final accuracy (the mean of its last
    `window` rounds) minus `second`'s, and the larger of their jitters over the last `last`
    rounds; the difference counts (`Gap.ahead`) only when it is larger than that jitter."""
    return Gap(difference=first.mean_accuracy(window) - second.mean_accuracy(window),
               noise=max(jitter(first, last), jitter(second, last)))


# several seeds of the same runs -------------------------------------------------------------


def final_by_seed(by_seed: Mapping[int, Mapping[str, History]], window: int = FINAL_WINDOW
                  ) -> dict[str, dict[int, float]]:
    """Each run's final accuracy (the mean of its last `window` rounds) in every seed:
    name -> {seed: accuracy}, for the names stored in every seed given, in the order of the
    lowest seed's runs. A rerun with another seed draws another partition, initialization and
    client schedule, so the spread of these numbers is what one seed's result can be off by.
    (`complete_seeds` first leaves out a seed that lacks some of the lowest seed's runs.)"""
    if not by_seed:
        raise ValueError("by_seed is empty: give {seed: {name: History}} for at least one seed")
    check_window(window)
    seeds = sorted(by_seed)
    common = [name for name in by_seed[seeds[0]] if all(name in by_seed[s] for s in seeds)]
    return {name: {s: by_seed[s][name].mean_accuracy(window) for s in seeds} for name in common}


def complete_seeds(by_seed: Mapping[int, Mapping[str, History]], reference: int | None = None
                   ) -> dict[int, Mapping[str, History]]:
    """The seeds of `by_seed` that hold every run seed `reference` holds (default: the lowest
    seed; a chapter's own seed), in order: a seed whose runs are only partly made is left out
    whole, so that every comparison over seeds is over the same seeds, rather than dropping
    runs from all of them. {} when the reference seed holds no run."""
    if not by_seed:
        return {}
    reference = min(by_seed) if reference is None else reference
    if reference not in by_seed:
        raise ValueError(f"reference={reference!r} is not a seed of by_seed; allowed: "
                         f"{', '.join(map(str, sorted(by_seed)))}")
    needed = set(by_seed[reference])
    if not needed:
        return {}
    return {s: runs for s, runs in sorted(by_seed.items()) if needed <= set(runs)}


def histories_by_seed(pages: Iterable[Chapter]) -> dict[str, dict[int, dict[str, History]]]:
    """preset -> seed -> variant -> History, from the same chapter opened with several seeds
    (`Chapter.with_seed`), in seed order. A seed is left out of a preset when it lacks some of
    the first page's runs of it (`complete_seeds`); a preset the first page holds no run of
    maps to {}."""
    found: dict[str, dict[int, dict[str, History]]] = {}
    for page in pages:
        for preset in page.presets:
            found.setdefault(preset, {})
            if page.seed in found[preset]:
                raise ValueError(f"pages: seed {page.seed} is given twice; open each page with "
                                 f"another seed (Chapter.with_seed)")
            found[preset][page.seed] = page.histories_of(preset)
    return {preset: complete_seeds(runs, reference=next(iter(runs)))
            for preset, runs in found.items()}


def _scored(accuracy: Mapping[int, float]) -> list[float]:
    return [a for a in accuracy.values() if not math.isnan(a)]


def seed_mean(accuracy: Mapping[int, float]) -> float:
    """The mean of one run's final accuracies over seeds (a row of `final_by_seed`), over the
    seeds that scored (NaN when none did)."""
    scored = _scored(accuracy)
    return math.fsum(scored) / len(scored) if scored else math.nan


def seed_table(finals: Mapping[str, Mapping[str, Mapping[int, float]]]) -> pd.DataFrame:
    """One row per (preset, name) of `finals` (preset -> `final_by_seed`'s result): the final
    accuracy in each seed, then the mean, the lowest and the highest of those that scored
    (NaN when none did)."""
    import pandas as pd

    rows = []
    for preset, by_name in finals.items():
        for name, accuracy in by_name.items():
            if not accuracy:
                raise ValueError(f"finals[{preset!r}][{name!r}] is empty: give {{seed: "
                                 f"accuracy}} for at least one seed")
            scored = _scored(accuracy) or [math.nan]
            rows.append({"preset": preset, "variant": name,
                         **{f"seed {s}": a for s, a in accuracy.items()},
                         "mean": seed_mean(accuracy), "lowest": min(scored),
                         "highest": max(scored)})
    if not rows:
        raise ValueError("finals holds no run: give {preset: {name: {seed: accuracy}}}")
    return pd.DataFrame(rows).set_index(["preset", "variant"])


def seed_spread(accuracy: Mapping[int, float]) -> str:
    """One run's final accuracy over seeds (a row of `final_by_seed`) as "82.1% (81.8% to
    82.8%)": the mean, then the lowest and the highest seed; a seed that scored nothing (NaN)
    is named, not averaged."""
    if not accuracy:
        raise ValueError("accuracy is empty: give {seed: final accuracy}")
    scored = _scored(accuracy)
    unscored = [str(s) for s, a in accuracy.items() if math.isnan(a)]
    text = (f"{seed_mean(accuracy):.1%} ({min(scored):.1%} to {max(scored):.1%})"
            if scored else "not scored")
    if scored and unscored:
        text += f", not scored in seed {listed(unscored)}"
    return text


def sides_by_seed(by_seed: Mapping[int, Mapping[str, History]], first: str, second: str,
                  window: int = FINAL_WINDOW) -> dict[int, int]:
    """Seed -> `final_gap(first, second).ahead` in that seed (1: `first` ahead by more than
    the larger jitter, -1: `second` is, 0: level), over the seeds that hold both runs."""
    check_window(window)
    sides = {s: final_gap(runs[first], runs[second], window).ahead
             for s, runs in sorted(by_seed.items()) if first in runs and second in runs}
    if not sides:
        raise ValueError(f"no seed holds both {first!r} and {second!r}")
    return sides


def sides_over_seeds(by_seed: Mapping[int, Mapping[str, History]], first: str, second: str,
                     window: int = FINAL_WINDOW, *, called: str = "") -> str:
    """In how many seeds run `first` is above, level with and below run `second` by
    `final_gap`'s rule within each seed, over the seeds that hold both: e.g. "above FedPer in
    2, level with it in 1" (`called`: how to name `second`; default `second` in backticks)."""
    sides = list(sides_by_seed(by_seed, first, second, window).values())
    said = [f"{word} {{}} in {sides.count(side)}"
            for side, word in ((1, "above"), (0, "level with"), (-1, "below"))
            if sides.count(side)]
    return ", ".join([said[0].format(called or f"`{second}`"),
                      *(phrase.format("it") for phrase in said[1:])])


def seed_agreement(sides: Iterable[int]) -> str:
    """What a comparison's outcomes over seeds (`sides_by_seed`'s values) have in common, in
    words: "level in every seed", "the same side in every seed", "the same side wherever a
    seed separates them" (one side ahead in some seeds, level in the others) or "different
    sides in different seeds"."""
    outcomes = set(sides)
    if not outcomes or not outcomes <= {-1, 0, 1}:
        raise ValueError(f"sides={sorted(outcomes)}: expected outcomes in -1, 0, 1")
    if outcomes == {0}:
        return "level in every seed"
    if len(outcomes) == 1:
        return "the same side in every seed"
    if {-1, 1} <= outcomes:
        return "different sides in different seeds"
    return "the same side wherever a seed separates them"


def listed(items: Iterable[Any]) -> str:
    """"a", "a and b", "a, b and c"."""
    items = [str(item) for item in items]
    if not items:
        raise ValueError("items is empty")
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def signed(value: float, digits: int = 1) -> str:
    """A difference for prose, with its sign: "+1.2", "-0.3", and "0.0" for one that rounds to
    zero at `digits` decimals (where f"{value:+.1f}" would write "-0.0" or "+0.0")."""
    text = f"{value:+.{digits}f}"
    return text[1:] if float(text) == 0 else text


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
    """`<results_dir>/<preset>/clients/<run_name>.json`, next to the history."""
    return Path(results_dir) / config.preset / "clients" / f"{config.run_name}.json"


def score_clients(config: ExperimentConfig, checkpoint: str | Path) -> ClientScores:
    """Score every client the run scored, from a checkpoint of its last round.

    As the ServerApp does: a personalized run's clients that have trained, each with the global
    arrays and its own personal arrays; a FedAvg run's every client with the global model.
    Raises ValueError if the checkpoint is of another experiment or not of the last round.
    """
    from fedpara import task
    from fedpara.checkpoints import load_checkpoint

    state = load_checkpoint(checkpoint, config, last_round=True)
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
    from fedpara.checkpoints import checkpoint_path

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
    (no run) the traffic it will cost. Accuracy is a fraction (final accuracy: the mean of the
    last `FINAL_WINDOW` rounds, fedpara.history); traffic in GiB; time in minutes.
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
        "final accuracy": round(history.mean_accuracy(), 4),
        "traffic (GiB)": round(history.cumulative_gib()[-1], 4),
        "MiB / round": round((first.bytes_up + first.bytes_down) / 2**20, 3),
        "training time (min)": round(history.wall_seconds / 60, 1),
        "device": hardware.get("device_name"),
        "cores": hardware.get("cpu_count"),
        "torch": hardware.get("torch"), "flwr": hardware.get("flwr"),
        "fedpara": hardware.get("fedpara"), "commit": hardware.get("commit"),
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


# one call to open an experiment chapter ------------------------------------------------------

# Tiny fake datasets in the real on-disk formats (fedpara.fakedata), written for smoke runs of
# the CIFAR and FEMNIST chapters: a smoke run rehearses the machinery in seconds, the same on
# every machine, whether or not it has the real data. The sizes give every smoke client its
# samples: CIFAR-10 100 clients x 64, CIFAR-100 50 clients x 100, FEMNIST 12 writers x 25 images.
def _fake_cifar10(folder: Path, seed: int) -> None:
    from fedpara.fakedata import write_fake_cifar

    write_fake_cifar(folder, "cifar10", n_train=6400, n_test=256, seed=seed)


def _fake_cifar100(folder: Path, seed: int) -> None:
    from fedpara.fakedata import write_fake_cifar

    write_fake_cifar(folder, "cifar100", n_train=5000, n_test=256, seed=seed)


def _fake_femnist(folder: Path, seed: int) -> None:
    from fedpara.fakedata import write_fake_femnist

    write_fake_femnist(folder, n_writers=12, per_writer=25, seed=seed)


FAKE_DATA_WRITERS: dict[str, Callable[[Path, int], None]] = {
    "cifar10": _fake_cifar10, "cifar100": _fake_cifar100, "femnist": _fake_femnist,
}


def write_fake_data(datasets: Iterable[str], folder: str | Path, seed: int) -> Path:
    """Write the fake files of `datasets` (names in FAKE_DATA_WRITERS) into `folder` and
    return it: the data folder of a smoke run on fake data."""
    datasets = set(datasets)
    missing_writers = sorted(str(d) for d in datasets - set(FAKE_DATA_WRITERS))
    if missing_writers:
        raise ValueError(f"fake data: no fake-data writer for {missing_writers}; "
                         f"available: {', '.join(FAKE_DATA_WRITERS)}")
    folder = Path(folder)
    for dataset in sorted(datasets):
        FAKE_DATA_WRITERS[dataset](folder, seed)
    return folder


# the fields of a config that say what a run computes, for `Chapter.protocol`
PROTOCOL_FIELDS = (
    "dataset", "model", "algorithm", "parameterization", "gamma", "personal_split",
    "local_lr_scale", "strategy", "proximal_mu", "server_lr", "server_momentum", "partition",
    "alpha",
    "shards_per_client", "num_clients", "clients_per_round", "rounds", "local_epochs",
    "batch_size", "lr", "lr_decay", "evaluation", "transport",
)


def find_root(start: str | Path | None = None) -> Path:
    """The repository root: the first of `start` (default: the working directory) and its
    parents that holds the book's `_toc.yml`; `start` itself when none does."""
    start = Path(start or Path.cwd()).resolve()
    return next((p for p in (start, *start.parents) if (p / "_toc.yml").is_file()), start)


def _names(value: str | Sequence[str]) -> list[str]:
    """"a,b" or ["a", "b"] -> ["a", "b"] (blanks dropped)."""
    items = value.split(",") if isinstance(value, str) else value
    return [item.strip() for item in items if item.strip()]


def parse_seeds(seeds: int | str | Sequence[int | str] | None) -> list[int]:
    """A chapter's `seeds` parameter, "1,2", [1, 2] or 1 (what `papermill -p seeds 1` passes),
    as sorted distinct seeds ("" or None, an empty YAML value, = none)."""
    if seeds is None:
        return []
    if isinstance(seeds, int):
        seeds = [seeds]
    items = _names(seeds if isinstance(seeds, str) else [str(s) for s in seeds])
    if not all(item.isdigit() for item in items):
        raise ValueError(f"seeds={seeds!r}: allowed: comma-separated integers >= 0, e.g. "
                         f"'1,2', or '' for none")
    return sorted({int(item) for item in items})


@dataclass
class Chapter:
    """What an experiment chapter works with: its configs, their runs, and tables about them.

    Made by `open_chapter`. `configs` and `runs` are keyed by (preset, variant), in the order
    of the presets and of each preset's variants; `runs[key]` is `load_or_train`'s
    (history or None, status).
    """

    name: str  # the chapter, as `make execute CHAPTER=<name>` knows it
    profile: str
    root: Path
    results_dir: Path
    data_dir: str
    fake_data: bool
    configs: dict[tuple[str, str], ExperimentConfig]
    runs: dict[tuple[str, str], tuple[History | None, str]]
    options: dict[str, Any] = field(default_factory=dict, repr=False)  # open_chapter's arguments

    @property
    def seed(self) -> int:
        return next(iter(self.configs.values())).seed

    def with_seed(self, seed: int) -> Chapter:
        """This chapter opened again with another `seed`: the same presets, variants, profile,
        folders and settings (and it trains its missing runs only if this one was opened with
        train=True). With `histories_by_seed`, the runs of several seeds side by side."""
        if not self.options:
            raise ValueError("this Chapter was not made by open_chapter: open the other seed "
                             "with open_chapter(..., seed=seed)")
        return open_chapter(**{**self.options, "seed": seed})

    def with_seeds(self, seeds: int | str | Sequence[int | str] | None = None
                   ) -> list[Chapter]:
        """This chapter first, then the same chapter opened with each other seed of `seeds`
        (`parse_seeds`: "1,2", [1, 2], "" for none; default: the `seeds` given to
        `open_chapter`; this chapter's own seed is not opened twice). What
        `histories_by_seed` takes."""
        if seeds is None:
            seeds = self.options.get("seeds", "")
        return [self, *(self.with_seed(s) for s in parse_seeds(seeds) if s != self.seed)]

    def other_seeds_notice(self, pages: Iterable[Chapter]) -> str:
        """Markdown, "**Seed N.** " and that page's `notice()`, for each of `pages` opened with
        another seed than this chapter's that has runs still to make ("" when none has): this
        chapter's own notice is shown at its top, the other seeds' where they are compared."""
        return "\n\n".join(f"**Seed {page.seed}.** {page.notice()}" for page in pages
                            if page.seed != self.seed and page.missing)

    @property
    def presets(self) -> list[str]:
        return list(dict.fromkeys(preset for preset, _ in self.configs))

    @property
    def histories(self) -> dict[tuple[str, str], History]:
        """The runs that have a history (stored or just trained)."""
        return {key: history for key, (history, _) in self.runs.items() if history is not None}

    def histories_of(self, preset: str) -> dict[str, History]:
        """Variant -> history, for one preset (what `fedpara.plots.plot_curves` takes)."""
        return {variant: h for (p, variant), h in self.histories.items() if p == preset}

    def grouped(self, outer: str, inner: str) -> dict[Any, dict[Any, History]]:
        """The runs that have a history, by the values of two config fields, e.g.
        `grouped("strategy", "parameterization")["fedprox"]["fedpara"]`."""
        groups: dict[Any, dict[Any, History]] = {}
        for key, history in self.histories.items():
            config = self.configs[key]
            groups.setdefault(getattr(config, outer), {})[getattr(config, inner)] = history
        return groups

    @property
    def missing(self) -> list[ExperimentConfig]:
        """The configs without a history: the runs still to make."""
        return [config for key, config in self.configs.items() if self.runs[key][0] is None]

    @cached_property
    def summary(self) -> pd.DataFrame:
        """One row per run (`run_summary`), indexed by (preset, variant); blanks are "" where
        a column applies to other runs only (a stored run has no planned traffic, and so on).
        Show `summary.T` for one column per run."""
        import pandas as pd

        rows = [run_summary(config, *self.runs[key]) for key, config in self.configs.items()]
        table = pd.DataFrame(rows).set_index(["preset", "variant"])
        return table.astype(object).where(table.notna(), "")

    @cached_property
    def protocol(self) -> pd.DataFrame:
        """The settings each run computes with (`PROTOCOL_FIELDS`), one row per field and one
        column per (preset, variant), read from the configs. A setting that does not apply to
        a run is "" (alpha without a Dirichlet split, gamma for the original model, ...); one
        that applies to none of them is left out."""
        import pandas as pd

        def applies(config: ExperimentConfig, name: str) -> bool:
            return {"alpha": config.partition == "dirichlet",
                    "shards_per_client": config.partition == "shard",
                    "gamma": config.parameterization != "original",
                    "personal_split": config.algorithm == "pfedpara",
                    "local_lr_scale": config.algorithm == "pfedpara",
                    **{field: config.strategy in strategies
                       for field, strategies in STRATEGY_FIELDS.items()}}.get(name, True)

        columns = {key: {name: getattr(c, name) if applies(c, name) else ""
                         for name in PROTOCOL_FIELDS}
                   for key, c in self.configs.items()}
        table = pd.DataFrame(columns)
        table.columns.names = ["preset", "variant"]
        return table[(table != "").any(axis=1)]  # a setting that applies to no run: left out

    @cached_property
    def plan(self) -> pd.DataFrame:
        """What each run will cost before it is made: one row per (preset, variant) with the
        rounds, clients per round, MiB a client sends up per round, the planned traffic of the
        whole run (up + down, GiB; `planned_traffic_gib`) and its command."""
        import pandas as pd

        rows = []
        for (preset, variant), config in self.configs.items():
            total = planned_traffic_gib(config)
            per_client = total * 2**30 / (2 * config.clients_per_round * config.rounds)
            rows.append({"preset": preset, "variant": variant, "rounds": config.rounds,
                         "clients / round": config.clients_per_round,
                         "MiB up per client and round": round(per_client / 2**20, 3),
                         "planned traffic (GiB)": round(total, 4),
                         "command": run_command(config)})
        return pd.DataFrame(rows).set_index(["preset", "variant"])

    def notice(self, why_missing: str = "") -> str:
        """Markdown for the top of the results: a danger box for fake data, a warning for a
        shortened (quick or smoke) profile, and, for the runs not made yet, the paragraph
        "No runs yet" (`why_missing` says why) with the commands that make them."""
        parts = []
        if self.fake_data:
            datasets = ", ".join(sorted({c.dataset for c in self.configs.values()}))
            parts.append(
                f":::{{danger}}\n**FAKE DATA.** These runs used tiny {datasets} files written "
                f"for them in the real on-disk format (`fedpara.fakedata`, in `{self.data_dir}`):"
                " a template image per class plus noise. Nothing on this page is a result about "
                f"{datasets}; it only shows that the chapter's machinery works.\n:::")
        if self.profile != "full" and self.histories:
            kind = ("a test of the machinery, not a result" if self.profile == "smoke"
                    else "shortened runs")
            parts.append(f":::{{warning}}\nThese are **{self.profile}**-profile runs: {kind}. "
                         "The full profile is what the chapter is about.\n:::")
        if not self.histories:
            parts.append(f"**No runs yet.** No {self.profile}-profile run of "
                         f"{', '.join(f'`{p}`' for p in self.presets)} is stored in "
                         f"`{self._shown(self.results_dir)}`. {why_missing}".rstrip())
        if self.missing:
            parts.append(how_to_run(self.missing, self.name))
        return "\n\n".join(parts)

    def _shown(self, path: Path) -> str:
        """A path relative to the repository root when it lies inside it."""
        path = Path(path).resolve()
        return path.relative_to(self.root).as_posix() + "/" if path.is_relative_to(
            self.root) else str(path)


def open_chapter(
    presets: str | Sequence[str],
    *,
    chapter: str,
    profile: str = "full",
    variants: str | Sequence[str] = "",
    data_dir: str | Path = "",
    device: str = "auto",
    seed: int = 0,
    seeds: int | str | Sequence[int | str] = "",
    train: bool = False,
    retrain: bool = False,
    results_dir: str | Path = "",
    fake_data: bool | None = None,
    checkpoints: bool = True,
    progress: bool = True,
    root: str | Path | None = None,
    **overrides: Any,
) -> Chapter:
    """Everything an experiment chapter does before its first result, in one call.

        page = open_chapter("fmnist-noniid,fmnist-personal", chapter="fashion_mnist",
                            profile=profile, variants=variants, data_dir=data_dir,
                            device=device, seed=seed, train=train, retrain=retrain,
                            results_dir=results_dir)
        display(Markdown(page.notice()))   # fake data / shortened profile / runs to make
        page.summary.T                     # one column per run: what ran, where
        plot_curves(page.histories_of("fmnist-noniid"))

    - `presets`: comma-separated names (or a list) of `fedpara.config.PRESETS`; every variant
      of each (`PRESETS[name].variants`), or those in `variants` ("a,b" or a list; empty: all).
      A name in `variants` that no preset has is skipped; none left raises ValueError.
    - `chapter`: the chapter's name for `make execute CHAPTER=...` (in the commands shown).
    - `seeds`: the other seeds the chapter compares its runs over (its `seeds` parameter,
      `parse_seeds`), checked here, before any run is trained; `Chapter.with_seeds()` opens
      them.
    - `root`: the repository, by default found from the working directory (`find_root`).
    - `results_dir`: where histories are read and written; "" = `<root>/results`.
    - `data_dir`: "" = $FEDPARA_DATA, else `<root>/data` (or the fake data, see `fake_data`).
    - `fake_data`: None = for the smoke profile of datasets in `FAKE_DATA_WRITERS` when no
      `data_dir` is given, even where the real data is present (a smoke run is a rehearsal
      that runs the same on every machine); a given `data_dir` is used as it is.
      True writes that dataset's tiny fake files to `<root>/_build/fake-data` and uses them
      (and, unless `results_dir` is given, `<root>/_build/fake-data/results`), so smoke
      histories never land next to real ones; True with a `data_dir` raises ValueError.
    - `checkpoints`: True puts each run's checkpoints where `python -m fedpara.run` does,
      `<results_dir>/../checkpoints/<preset>/<run_name>/` (per-client scores of
      personalized runs are computed from the last one); False: none.
    - `train=False` never trains: runs without a matching stored history stay missing.
      `train=True` trains those (`retrain=True`: all), saving each history where it is read;
      `retrain` without `train` changes nothing.
    - `overrides`: further config fields for every run (e.g. `rounds=3`); a run made with them
      is another experiment, so only a history made with them too counts.
    """
    parse_seeds(seeds)  # a bad value fails now, not after the first seed's training
    options = dict(presets=presets, chapter=chapter, profile=profile, variants=variants,
                   seeds=seeds, data_dir=data_dir, device=device, train=train, retrain=retrain,
                   results_dir=results_dir, fake_data=fake_data, checkpoints=checkpoints,
                   progress=progress, root=root, **overrides)
    root = find_root(root)
    preset_names = _names(presets)
    unknown = [name for name in preset_names if name not in PRESETS]
    if not preset_names or unknown:
        raise ValueError(f"presets={presets!r}: expected names of {', '.join(PRESETS)}")
    datasets = {PRESETS[name].base.get("dataset") for name in preset_names}
    if fake_data is None:
        fake_data = profile == "smoke" and not data_dir and datasets <= set(FAKE_DATA_WRITERS)
    if fake_data and data_dir:
        raise ValueError(f"fake_data=True writes and uses its own data folder, but "
                         f"data_dir={str(data_dir)!r} was given: give one of them")
    if fake_data:
        data_dir = write_fake_data(datasets, root / "_build" / "fake-data", seed)
        results_dir = results_dir or data_dir / "results"
    results = Path(results_dir) if results_dir else root / "results"
    data_dir = str(data_dir or os.environ.get("FEDPARA_DATA") or root / "data")
    chosen = set(_names(variants))
    configs = {}
    for preset in preset_names:
        for variant in PRESETS[preset].variants:
            if chosen and variant not in chosen:
                continue
            config = get_preset(preset, variant=variant, profile=profile, seed=seed,
                                data_dir=data_dir, device=device, **overrides)
            if checkpoints and "checkpoint_dir" not in overrides:
                config = config.replace(checkpoint_dir=str(results.parent / "checkpoints"
                                                           / preset / config.run_name))
            configs[preset, variant] = config
    if not configs:
        raise ValueError(f"variants={variants!r}: none of them is a variant of {presets!r}")
    runs = {key: load_or_train(config, results, train=train, retrain=retrain,
                               progress=progress)
            for key, config in configs.items()}
    return Chapter(name=chapter, profile=profile, root=root, results_dir=results,
                   data_dir=data_dir, fake_data=bool(fake_data), configs=configs, runs=runs,
                   options=options)
