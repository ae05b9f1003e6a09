"""Checkpoints of a federated run: where they are, writing and reading them, whose they are.

    from fedpara.checkpoints import checkpoint_path, latest_checkpoint, load_checkpoint
    state = load_checkpoint(latest_checkpoint(config.checkpoint_dir), config)

A checkpoint is `<checkpoint_dir>/round-NNNNN.pt`, one `torch.save`d dict: "round", "config"
(`ExperimentConfig.to_dict()`), "run_name" (`ExperimentConfig.run_name` when it was written:
whether it was a preset's own run then), "global" (the global keys' arrays), "local" (partition
id -> that client's personal arrays), "trained" (the partitions that have trained, sorted),
"strategy" (what the server's strategy carries between rounds: FedAvgM's momentum, FedAdam's
and FedYogi's moments; empty for FedAvg and FedProx) and "history" (`History.to_dict()`).
It is read only for the experiment that wrote it: `config.differing_fields` decides, the same
rule that decides whether a stored history counts.

No RNG state is stored because none is carried between rounds: sampling draws from
(seed, round) and each client's training from (seed, round, partition id).

Imports neither Flower nor, until a checkpoint is written or read, torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpara.config import PRESETS, ExperimentConfig, differing_fields
from fedpara.storage import write_atomic

if TYPE_CHECKING:
    import torch

    from fedpara.history import History

__all__ = ["RESUMABLE_FIELDS", "ForeignCheckpoints", "check_fresh_start", "check_resumable",
           "checkpoint_path",
           "clear_checkpoints", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

# beyond the execution fields, what a resumed run may change: it may run for more rounds
RESUMABLE_FIELDS = frozenset({"rounds"})
_PATTERN = "round-*.pt"


def checkpoint_path(directory: str | Path, server_round: int) -> Path:
    """`<directory>/round-NNNNN.pt`: the checkpoint written after round `server_round`."""
    return Path(directory) / f"round-{server_round:05d}.pt"


def _by_round(directory: str | Path) -> list[Path]:
    """The checkpoints in `directory`, oldest round first (by number: past round 99999 the
    names are longer, and a sort by name would put round 100000 first)."""
    found = []
    for path in Path(directory).glob(_PATTERN):
        number = path.stem.removeprefix("round-")
        if number.isdigit():
            found.append((int(number), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint of the latest round in `directory`; None if none (or no directory)."""
    found = _by_round(directory) if directory else []
    return found[-1] if found else None


def _check_keep(keep: int, least: int) -> None:
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < least:
        raise ValueError(f"keep={keep!r} must be an integer >= {least} (checkpoints kept)")


def clear_checkpoints(directory: str | Path, keep: int = 0) -> None:
    """Delete the checkpoints in `directory` but the latest `keep`."""
    _check_keep(keep, 0)
    found = _by_round(directory)
    for old in found[:len(found) - keep]:
        old.unlink()


def check_resumable(config: ExperimentConfig, resume: bool) -> None:
    """A resumed run needs a checkpoint folder: refuse resume=True without one."""
    if resume and not config.checkpoint_dir:
        raise ValueError("resume=True needs config.checkpoint_dir (where checkpoints are written)")


class ForeignCheckpoints(ValueError):
    """A fresh run's checkpoint folder holds another experiment's checkpoints."""


def check_fresh_start(config: ExperimentConfig) -> None:
    """Before a fresh (not resumed) run deletes the checkpoints in `config.checkpoint_dir`: raise
    ForeignCheckpoints (a ValueError), deleting nothing, if any of them is another
    experiment's (any field but the execution ones differs, `rounds` included), so that a
    run with changed settings pointed at a preset's folder cannot wipe that run's
    checkpoints. Three kinds may go: a checkpoint that does not read back (it says nothing
    about its owner), older checkpoints that differ only in `rounds` from a newer one of
    this experiment (written before it was resumed for more rounds), and, when `config` is a
    preset's own run, a checkpoint written as the own run of the same preset, variant and
    profile under an older definition of that preset (what a rerun after the preset changed
    finds); a run with changed settings that was pointed at the preset's folder is still
    another experiment."""
    import pickle

    import torch

    own_run = (config.preset in PRESETS and config.variant in PRESETS[config.preset].variants
               and not config.changes_from_preset())
    names = ("preset", "variant", "profile")
    own_seen = False  # a newer checkpoint of this very experiment was found
    for path in reversed(_by_round(config.checkpoint_dir) if config.checkpoint_dir else []):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            stored = state["config"]
        except (OSError, EOFError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError):
            continue
        differing = differing_fields(stored, config)
        own_seen = own_seen or not differing
        if not differing or (own_seen and set(differing) <= RESUMABLE_FIELDS):
            continue  # ours, or written before ours was resumed for more rounds
        # a checkpoint from before "run_name" was stored counts as the preset's own run
        if (own_run and all(stored.get(k) == getattr(config, k) for k in names)
                and state.get("run_name", config.run_name) == config.run_name):
            continue  # the preset's own run, and an older definition of it in its folder
        raise ForeignCheckpoints(
            f"{config.checkpoint_dir} holds the checkpoints of another experiment ({path.name}:"
            f" fields {', '.join(differing)} differ), which a fresh run would delete; give this"
            f" run its own checkpoint_dir, or delete them yourself")


def save_checkpoint(config: ExperimentConfig, server_round: int,
                    global_arrays: Mapping[str, torch.Tensor],
                    local: Mapping[int, Mapping[str, torch.Tensor]], trained: set[int],
                    history: History, keep: int = 2, *,
                    strategy_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None
                    ) -> Path:
    """Write the checkpoint of round `server_round` to `config.checkpoint_dir` atomically and
    keep only the latest `keep` (>= 1) there."""
    _check_keep(keep, 1)
    import torch

    state = {
        "round": server_round,
        "config": config.to_dict(),
        "run_name": config.run_name,
        "global": global_arrays,
        "local": local,
        "trained": sorted(trained),
        "strategy": dict(strategy_state or {}),
        "history": history.to_dict(),
    }
    path = checkpoint_path(config.checkpoint_dir, server_round)
    write_atomic(path, lambda f: torch.save(state, f))  # streamed: no second copy in memory
    clear_checkpoints(config.checkpoint_dir, keep=keep)
    return path


def load_checkpoint(path: str | Path, config: ExperimentConfig, *, last_round: bool = False
                    ) -> dict[str, Any]:
    """Read a checkpoint and check that it belongs to `config`'s experiment.

    last_round=False (resuming): `config` may run for more rounds than the run that wrote it, and
    the checkpoint must not be past `config.rounds`. last_round=True (scoring a finished run):
    `rounds` must match too, and the checkpoint must be of the last round.
    Raises ValueError naming the fields that differ, or the round.
    """
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    differing = differing_fields(state["config"], config,
                                 also=() if last_round else RESUMABLE_FIELDS)
    if differing:
        hint = "" if last_round else "; use another checkpoint_dir"
        raise ValueError(f"checkpoint {path} is from a different experiment: fields "
                         f"{', '.join(differing)} differ{hint}")
    if last_round and state["round"] != config.rounds:
        raise ValueError(f"checkpoint {path} is of round {state['round']}; "
                         f"expected the last round, {config.rounds}")
    if state["round"] > config.rounds:
        raise ValueError(f"checkpoint {path} is at round {state['round']} > rounds={config.rounds}")
    return state
