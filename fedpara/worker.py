"""A client's training and evaluation on plain data, in the ClientApp or in a long-lived worker.

    python -m fedpara.worker --address /tmp/fedpara-worker.sock     # on a SuperNode's machine
    flower-supernode ... --node-config "partition-id=0 num-partitions=100 partitions-held=100 \
        worker='/tmp/fedpara-worker.sock'"

The ClientApp (`fedpara.client_app`) turns each Flower message into a *request* of plain data
(the experiment's run config, the round's settings, the partitions, NumPy arrays) and turns the
*reply* back into records. `handle(request)` does the work in between, with torch: build the
model from the arrays sent, train or evaluate, and return the arrays and metrics to send back.

Flower's deployment runtime starts a new ClientApp process for every message. Without a worker,
each one imports torch and fedpara's training path, starts the device (CUDA's context) and reads
the dataset before it trains, and forgets all of it when the reply leaves: on a GPU that costs
more than a round's training (`benchmarks/client_start.py` measures it). A worker is one process
per machine that keeps all of that between messages: the imports, the device, the datasets and
clients' splits (`task`'s caches) and the captured CUDA-graph steps (`graphed`, `cohort`). The
node config `worker=<socket path>` makes the node's ClientApps forward their requests to it; the
ClientApp then never imports torch. The results are the same either way: the same function runs
on the same data, seeded the same way.

The worker listens on a Unix socket (`multiprocessing.connection`) and serves one request at a
time (one device). Requests travel as pickles, and reading a pickle can run code, so the socket
is created readable and writable by its user only: no other user's process can send one. It
runs until stopped (SIGINT or SIGTERM), then removes its socket.
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import socket
import stat
import sys
import time
import traceback
from collections.abc import Mapping
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpara import task
from fedpara.cohort import train_cohort
from fedpara.config import ExperimentConfig
from fedpara.messages import CHANGE, CORRECT, LOSS, NUM_EXAMPLES, OWN_CORRECT, OWN_EXAMPLES
from fedpara.messages import PARTITION_ID, TRAIN_LOSS
from fedpara.transport import from_wire, to_wire

# a request: {"kind": "train" | "cohort" | "evaluate", "experiment": run config (dict),
#   "partition": int (train, evaluate) or "partitions": [int] (cohort), "arrays": {name: ndarray}
#   as sent by the server, "local": {name: ndarray} or None (the partition's personal arrays),
#   and for training "server_round", "lr", "proximal_mu"}
# a reply: train {"arrays", "metrics", "local"}; cohort {"clients": [(partition, arrays,
#   metrics)]}; evaluate {"metrics"}. Arrays are {name: ndarray}, metrics MetricRecord values.
KINDS = ("train", "cohort", "evaluate")


def handle(request: Mapping[str, Any]) -> dict[str, Any]:
    """The reply to one request (see above); the work the ClientApp's handlers describe."""
    kind = request["kind"]
    if kind not in KINDS:
        raise ValueError(f"request kind={kind!r}; allowed: {', '.join(KINDS)}")
    config = ExperimentConfig.from_run_config(dict(request["experiment"]))
    sent = from_wire(_tensors(request["arrays"]), config.transport)
    if kind == "cohort":
        return _train_cohort(config, sent, request)
    partition_id = int(request["partition"])
    model = task.init_model(config)
    task.set_arrays(model, sent)
    if request.get("local") is not None:  # the personal part this client kept
        task.set_arrays(model, _tensors(request["local"]))
    device = task.resolve_device(config.device)
    if kind == "evaluate":
        data = task.client_data(config, partition_id)
        result = task.evaluate(model, data.holdout, device=device)
        return {"metrics": {NUM_EXAMPLES: result.num_examples, LOSS: result.loss,
                            CORRECT: result.correct, PARTITION_ID: partition_id}}
    return _train(config, model.to(device), device, partition_id, request)


def _tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}


def _numpy(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: t.numpy() for k, t in tensors.items()}


def _train(config: ExperimentConfig, model, device, partition_id: int,
           request: Mapping[str, Any]) -> dict[str, Any]:
    """One client: train on its partition; its global arrays, metrics and personal arrays."""
    before = task.snapshot(model)  # on the device: the changes cost one sync per client
    # every random draw is seeded by (seed, round, client). FedProx pulls the arrays that came
    # from the server (the global keys) towards where they started.
    global_keys, local_keys = task.split_keys(model, config.algorithm)
    seed = task.client_seed(config.seed, int(request["server_round"]), partition_id)
    data = task.client_data(config, partition_id, seed=seed)
    result = task.train(model, data.train, epochs=config.local_epochs,
                        lr=float(request["lr"]), device=device, seed=seed,
                        lr_scale=task.lr_scales(model, config),
                        proximal_mu=float(request["proximal_mu"]), proximal_to=global_keys)
    arrays, metrics = _reply(config, model, before, result, data, partition_id, global_keys,
                             device)
    local = _numpy(task.get_arrays(model, local_keys)) if local_keys else None
    return {"arrays": arrays, "metrics": metrics, "local": local}


def _reply(config: ExperimentConfig, model, before, result: task.TrainResult,
           data: task.ClientData, partition_id: int, global_keys: list[str], device
           ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One trained client's arrays (in the transport format) and metrics."""
    metrics = {NUM_EXAMPLES: result.num_examples, TRAIN_LOSS: result.loss,
               PARTITION_ID: partition_id,
               # how far training moved each parameter (task.tracked_parameters order)
               CHANGE: task.relative_changes(before, model)}
    if config.evaluation == "clients":  # the model right after local training, on own data
        own = task.evaluate(model, data.holdout, device=device)
        metrics[OWN_CORRECT], metrics[OWN_EXAMPLES] = own.correct, own.num_examples
    return _numpy(to_wire(task.get_arrays(model, global_keys), config.transport)), metrics


def _train_cohort(config: ExperimentConfig, sent: Mapping[str, torch.Tensor],
                  request: Mapping[str, Any]) -> dict[str, Any]:
    """engine="cohort": the round's partitions trained together from the same global arrays
    (cohort.train_cohort), each with the data and seed it would have alone. The partitions need
    not be this node's own (it loads the whole dataset, and FedAvg's clients keep no state):
    the engine emulates many clients on one machine, it does not keep data with separate
    owners."""
    device = task.resolve_device(config.device)
    server_round = int(request["server_round"])
    partitions = [int(p) for p in request["partitions"]]
    seeds = [task.client_seed(config.seed, server_round, p) for p in partitions]
    models, before, data = [], [], []
    for p, seed in zip(partitions, seeds, strict=True):
        model = task.init_model(config)
        task.set_arrays(model, sent)
        models.append(model.to(device))
        before.append(task.snapshot(model))
        data.append(task.client_data(config, p, seed=seed))
    global_keys, _ = task.split_keys(models[0], config.algorithm)
    results = train_cohort(models, [d.train for d in data], epochs=config.local_epochs,
                           lr=float(request["lr"]), device=device,
                           lr_scale=task.lr_scales(models[0], config),
                           proximal_mu=float(request["proximal_mu"]), proximal_to=global_keys,
                           seeds=seeds)
    return {"clients": [
        (p, *_reply(config, model, old, result, d, p, global_keys, device))
        for p, model, old, result, d in zip(partitions, models, before, results, data,
                                            strict=True)]}


# the long-lived process ------------------------------------------------------------------


def serve(address: str | os.PathLike, *, announce=print) -> None:
    """Answer requests on the Unix socket `address` until SIGINT or SIGTERM (see the top).

    Refuses an address where something other than a stale socket of a stopped worker lies, or
    where a worker already listens. Each request gets ("ok", reply) or ("error", traceback):
    a request that fails does not stop the worker.
    """
    path = Path(address)
    _clear_stale_socket(path)
    old_umask = os.umask(0o077)  # the socket file: its user only
    try:
        listener = Listener(str(path), family="AF_UNIX")
    finally:
        os.umask(old_umask)

    def stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    announce(f"fedpara worker (pid {os.getpid()}, torch {torch.__version__}) listening on "
             f"{path}", flush=True)
    try:
        while True:
            with listener.accept() as conn:
                try:
                    request = conn.recv()
                except (EOFError, OSError, pickle.UnpicklingError) as err:
                    # a caller that left, or sent no request: the next one is served
                    announce(f"dropped a connection without a request ({err!r})", flush=True)
                    continue
                start = time.perf_counter()
                try:
                    reply = ("ok", handle(request))
                except Exception:  # the ClientApp raises it, with this traceback
                    reply = ("error", traceback.format_exc())
                announce(f"{'served' if reply[0] == 'ok' else 'failed'} {_describe(request)} "
                         f"in {time.perf_counter() - start:.2f} s", flush=True)
                try:
                    conn.send(reply)
                except OSError as err:  # the ClientApp stopped waiting (Flower ended the run)
                    announce(f"could not send a reply ({err!r})", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        listener.close()  # removes the socket file


def _describe(request) -> str:
    """'train partition 3, round 2' / 'cohort partitions [0, 5], round 1' (for the log)."""
    if not isinstance(request, Mapping):
        return "a request that is not a mapping"
    kind = request.get("kind")
    parts = (f"partitions {list(request.get('partitions', []))}" if kind == "cohort"
             else f"partition {request.get('partition')}")
    when = f", round {request['server_round']}" if "server_round" in request else ""
    return f"{kind} {parts}{when}"


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket left by a worker that died; refuse anything else at `path`."""
    if not path.exists() and not path.is_symlink():
        if not path.parent.is_dir():
            raise ValueError(f"address={str(path)!r}: folder {str(path.parent)!r} does not exist")
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise ValueError(f"address={str(path)!r} is a file that is not a socket; choose a new "
                         "path for the worker's socket")
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # nobody listens: a stopped worker's leftover
        return
    finally:
        probe.close()
    raise ValueError(f"address={str(path)!r}: a worker already listens there")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedpara.worker",
                                description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True,
                   help="path of the Unix socket to listen on; give the SuperNode the same "
                        "path as node config worker='<path>'")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads={args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    try:
        serve(args.address)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
