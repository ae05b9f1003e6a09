"""Run one experiment in-process: `run_experiment(config) -> History`.

    from fedpara import get_preset, run_experiment
    history = run_experiment(get_preset("fmnist-noniid", variant="fedpara", profile="smoke"))

The ClientApp and a ServerApp built for `config` run through `flwr.simulation.run_simulation`
(Ray), one virtual SuperNode per client. `run_simulation` returns nothing, so the ServerApp
hands its history back through a callback. Ray's and Flower's logs are quiet unless
`verbose=True`; a tqdm bar shows each round's accuracy and the cumulative traffic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

from fedpara.checkpoints import check_fresh_start, check_resumable
from fedpara.config import ExperimentConfig
from fedpara.history import GIB, History, RoundRecord

if TYPE_CHECKING:
    from fedpara.server_app import RoundCallback


@contextlib.contextmanager
def _quiet_logs(verbose: bool) -> Iterator[None]:
    """Flower's logger at ERROR (it warns that run_simulation is deprecated) and Ray's
    warnings off, unless verbose."""
    logger = logging.getLogger("flwr")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def backend_config(config: ExperimentConfig, verbose: bool = False) -> dict:
    """Ray resources per client and Ray's own log level."""
    num_gpus = config.client_num_gpus
    device = config.device
    if num_gpus == 0 and (device.startswith("cuda") or device == "auto"):
        import torch

        if torch.cuda.is_available():  # Ray hides GPUs from actors that reserve none
            num_gpus = 1.0
    return {
        "client_resources": {"num_cpus": config.client_num_cpus, "num_gpus": num_gpus},
        "init_args": {
            "logging_level": "INFO" if verbose else "ERROR",
            "log_to_driver": verbose,
        },
    }


def _check_simulation_device(device: str) -> None:
    """Refuse `cuda:N` with N >= 1: Ray shows each client only the GPU it gives it (as cuda:0,
    through CUDA_VISIBLE_DEVICES), so every client would fail to find cuda:N."""
    index = device.removeprefix("cuda:")
    if device.startswith("cuda:") and index.isdigit() and int(index) >= 1:
        raise ValueError(
            f"device={device!r}: in a Flower simulation Ray gives each client the GPU it "
            f"chooses and shows it as cuda:0, so no client can use {device}. To run on GPU "
            f"{index} alone, start with CUDA_VISIBLE_DEVICES={index} and device=cuda (or auto)")


def check_machine(config: ExperimentConfig) -> None:
    """Refuse, with a ValueError naming the field, what this machine cannot run: a device it
    lacks, `cuda:N` in a simulation, or Ray resources per client beyond its CPUs or GPUs (Ray
    would wait for them for ever). Loads nothing."""
    from fedpara import task

    task.resolve_device(config.device)  # first: a device this machine lacks, named as such
    _check_simulation_device(config.device)
    cpus = _ray_cpus()
    if config.client_num_cpus > cpus:
        raise ValueError(f"client_num_cpus={config.client_num_cpus:g} is more than this "
                         f"machine's {cpus} CPUs: Ray could start no client; allowed: up to "
                         f"{cpus}")
    gpus = backend_config(config)["client_resources"]["num_gpus"]
    if gpus > 0:
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus > have:
            raise ValueError(f"client_num_gpus={config.client_num_gpus:g} asks Ray for "
                             f"{gpus:g} GPU(s) per client and this machine has {have}: Ray "
                             f"could start no client; allowed: "
                             + (f"up to {have}" if have else "0 (with device=cpu)"))


def _ray_cpus() -> int:
    """The CPUs Ray will offer its workers: its own count (the machine's, lowered by a cgroup
    quota), else the machine's. Not this process's affinity, which Ray does not read."""
    try:
        from ray._private.utils import get_num_cpus

        return int(get_num_cpus())
    except Exception:  # noqa: BLE001 -- Ray missing or its private helper moved
        return os.cpu_count() or 1


def check_can_start(config: ExperimentConfig, *, resume: bool = False) -> None:
    """Everything `run_experiment` checks before Ray starts, each failing with its own message
    (inside the simulation every client would fail, with a long log): the config, this
    machine (`check_machine`), the checkpoints, the folder they go to, the dataset (loaded, or
    downloaded, and kept in this process's cache) and the split of it among the clients."""
    from fedpara import task
    from fedpara.storage import check_writable

    if not isinstance(config, ExperimentConfig):
        raise TypeError(f"config must be an ExperimentConfig (e.g. get_preset({config!r}) for "
                        f"a preset's), got {type(config).__name__}")
    config.validate()  # a config built by hand and mutated is checked again before any work
    check_machine(config)
    check_resumable(config, resume)
    if config.checkpoint_dir:
        check_writable(config.checkpoint_dir, "checkpoint_dir")
    task.load_splits(config)
    task.client_indices(config)  # an impossible split (SplitError)
    if not resume and config.checkpoint_dir:  # a fresh run deletes only its own checkpoints
        check_fresh_start(config)


def run_experiment(config: ExperimentConfig, *, resume: bool = False, verbose: bool = False,
                   progress: bool = True, on_round: RoundCallback | None = None) -> History:
    """Run `config` as a Flower simulation on this machine and return its per-round history.

    resume: continue from the newest checkpoint in `config.checkpoint_dir` (if any).
    verbose: show Flower's and Ray's logs. progress: a tqdm bar per round.
    on_round: called in the server after each round with (record, history so far).
    Before Ray starts, `check_can_start`.
    """
    check_can_start(config, resume=resume)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0" if verbose else "1")

    from flwr.simulation import run_simulation

    from fedpara.client_app import app as client_app
    from fedpara.server_app import make_server_app

    finished: list[History] = []
    bar = _progress_bar(config, enabled=progress)

    def round_done(record: RoundRecord, history: History) -> None:
        if bar is not None:
            _show_round(bar, record)
        if on_round is not None:
            on_round(record, history)

    server_app = make_server_app(config, resume=resume, on_round=round_done,
                                 on_finish=finished.append)
    try:
        with _quiet_logs(verbose):
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=config.num_clients,
                backend_config=backend_config(config, verbose),
                verbose_logging=verbose,
            )
    finally:
        if bar is not None:
            bar.close()
    if not finished:
        raise RuntimeError("the simulation ended without a history (see the log above; "
                           "rerun with verbose=True for Flower's and Ray's logs)")
    return finished[0]


def _show_round(bar, record: RoundRecord) -> None:
    """Move the progress bar to the end of `record`'s round, with its accuracy and traffic."""
    if bar.n == 0 and record.round > 1:  # resumed: jump to where the checkpoint was
        bar.update(record.round - 1)
    bar.set_postfix(acc=f"{record.accuracy:.4f}", GiB=f"{record.cum_bytes / GIB:.4f}")
    bar.update(1)


def _progress_bar(config: ExperimentConfig, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.rounds, desc=f"{config.preset}/{config.variant_name}", unit="round")
