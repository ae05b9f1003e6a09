"""The Flower ServerApp: sampling, aggregation, evaluation, measured traffic and checkpoints.

`flwr run .` loads `app` from here (pyproject's `[tool.flwr.app.components]`), reads the run
config into an `ExperimentConfig` and saves the history under `results-dir`;
`fedpara.run_experiment` builds its own app with `make_server_app(config, ...)` and takes the
history back in-process (`run_simulation` returns nothing).

One round:
1. sample exactly `clients_per_round` partitions, reproducibly from (seed, round);
2. send them the global keys' arrays (all of them for FedAvg, all but the head for FedPer, the
   W1 factors and the rest for pFedPara, none for local-only training) and get theirs back;
3. average them weighted by training examples, in partition order (deterministic);
4. score: the global model on the test set here ("server"), or every client that has
   trained on its own held-out data ("clients"), weighted by examples; clients that never
   trained are counted, not scored;
5. record the bytes of the arrays that actually went each way; checkpoint every N rounds.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedpara import task
from fedpara.client_app import (
    ARRAYS,
    CHANGE,
    EXPERIMENT,
    LOCAL,
    METRICS,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    OWN_CORRECT,
    OWN_EXAMPLES,
    PARTITION_ID,
    QUERY_GET_LOCAL,
    QUERY_PARTITION,
    QUERY_SET_LOCAL,
    ROUND,
)
from fedpara.config import ExperimentConfig
from fedpara.history import History, RoundRecord, hardware_info, write_atomic
from fedpara.transport import decode, encode

log = logging.getLogger("fedpara")
RoundCallback = Callable[[RoundRecord, History], None]
# fields that may differ between a checkpoint and the run resuming it
_RESUMABLE_CHANGES = {"rounds", "checkpoint_dir", "checkpoint_every", "results_dir", "device",
                      "client_num_cpus", "client_num_gpus", "fast_batches"}
_NODE_WAIT_SECONDS = 600.0


def array_bytes(content: RecordDict) -> int:
    """Raw bytes of every array in a message's content (shape x itemsize, no framing)."""
    return sum(
        int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize
        for record in content.array_records.values()
        for array in record.values()
    )


def _raise_errors(replies: list[Message], what: str) -> None:
    failed = [m for m in replies if m.has_error()]
    if failed:
        reasons = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed)
        raise RuntimeError(f"{len(failed)} client(s) failed during {what}: {reasons}")


class FedParaStrategy(FedAvg):
    """FedAvg over the global keys, with exact reproducible sampling by partition id.

    `nodes` maps partition id -> node id (node ids are random per run; partitions are not),
    filled in by `discover_nodes`. Aggregation keeps dtypes and sums in partition order.
    """

    def __init__(self, config: ExperimentConfig) -> None:
        super().__init__(
            fraction_train=config.clients_per_round / config.num_clients,
            min_train_nodes=config.clients_per_round,
            min_available_nodes=config.num_clients,
            weighted_by_key=NUM_EXAMPLES,
            arrayrecord_key=ARRAYS,
        )
        self.config = config
        self.nodes: dict[int, int] = {}
        self.trained: set[int] = set()  # partitions that have trained at least once

    # messages -----------------------------------------------------------------------------

    def _experiment_record(self) -> ConfigRecord:
        return ConfigRecord(self.config.to_run_config())

    def _message(self, partition_id: int, message_type: str, records: dict[str, Any],
                 server_round: int) -> Message:
        content = RecordDict({EXPERIMENT: self._experiment_record(), **records})
        return Message(content=content, dst_node_id=self.nodes[partition_id],
                       message_type=message_type, group_id=str(server_round))

    def sample(self, server_round: int) -> list[int]:
        """The partitions that train in `server_round`: a function of (seed, round) only."""
        rng = np.random.default_rng([self.config.seed, server_round])
        chosen = rng.choice(self.config.num_clients, self.config.clients_per_round, replace=False)
        return sorted(int(p) for p in chosen)

    def _wire(self, arrays: ArrayRecord) -> ArrayRecord:
        """The global arrays as sent: rounded to the config's transport format."""
        if self.config.transport == "float32":
            return arrays
        return ArrayRecord(encode(arrays.to_torch_state_dict(), self.config.transport))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        round_config = ConfigRecord({"server-round": server_round, **config})
        wire = self._wire(arrays)
        return [
            self._message(p, MessageType.TRAIN, {ARRAYS: wire, ROUND: round_config}, server_round)
            for p in self.sample(server_round)
        ]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Example-weighted mean of the returned arrays, decoded from the transport format;
        float64 sums, float32 (integer entries: their own dtype) results."""
        replies = list(replies)
        _raise_errors(replies, f"training in round {server_round}")
        contents = sorted((m.content for m in replies), key=lambda c: c[METRICS][PARTITION_ID])
        weights = np.array([float(c[METRICS][NUM_EXAMPLES]) for c in contents])
        weights /= weights.sum()
        self.trained.update(int(c[METRICS][PARTITION_ID]) for c in contents)
        states = [decode(c[ARRAYS].to_torch_state_dict(), self.config.transport)
                  for c in contents]
        aggregated = ArrayRecord()
        for key in states[0]:
            arrays = [state[key].numpy() for state in states]
            mean = sum(w * a.astype(np.float64) for w, a in zip(weights, arrays, strict=True))
            aggregated[key] = Array(np.asarray(mean).astype(arrays[0].dtype))
        train_loss = float(sum(w * float(c[METRICS]["train-loss"])
                               for w, c in zip(weights, contents, strict=True)))
        metrics = MetricRecord({"train-loss": train_loss})
        # how far local training moved each tracked parameter, the mean over the clients
        changes = np.array([list(c[METRICS][CHANGE]) for c in contents], dtype=np.float64)
        metrics[CHANGE] = changes.mean(axis=0).tolist()
        if all(OWN_CORRECT in c[METRICS] for c in contents):  # client evaluation
            correct = [int(c[METRICS][OWN_CORRECT]) for c in contents]
            seen = [int(c[METRICS][OWN_EXAMPLES]) for c in contents]
            metrics["own-accuracy"] = sum(correct) / sum(seen) if sum(seen) else float("nan")
            metrics["own-client-accuracy"] = [k / n if n else float("nan")
                                              for k, n in zip(correct, seen, strict=True)]
        return aggregated, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Client evaluation: every client for FedAvg, those that have trained otherwise."""
        if self.config.evaluation != "clients":
            return []
        partitions = sorted(self.trained) if self.config.personalized else sorted(self.nodes)
        wire = self._wire(arrays)
        return [self._message(p, MessageType.EVALUATE, {ARRAYS: wire}, server_round)
                for p in partitions]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        """Held-out accuracy and loss over clients, weighted by their examples."""
        replies = list(replies)
        _raise_errors(replies, f"evaluation in round {server_round}")
        metrics = sorted((m.content[METRICS] for m in replies), key=lambda m: m[PARTITION_ID])
        examples = sum(int(m[NUM_EXAMPLES]) for m in metrics)
        scored = [m for m in metrics if int(m[NUM_EXAMPLES]) > 0]
        return MetricRecord({
            "accuracy": sum(float(m["correct"]) for m in metrics) / examples if examples else
            float("nan"),
            "loss": sum(float(m["loss"]) * int(m[NUM_EXAMPLES]) for m in scored) / examples
            if examples else float("nan"),
            "examples": examples,
            "clients": len(metrics),
            "scored-clients": [int(m[PARTITION_ID]) for m in scored],
            "client-accuracy": [float(m["correct"]) / int(m[NUM_EXAMPLES]) for m in scored],
        })

    # node discovery and per-client state ---------------------------------------------------

    def discover_nodes(self, grid: Grid, timeout: float = _NODE_WAIT_SECONDS) -> None:
        """Wait for `num_clients` nodes and ask each which partition it holds."""
        n = self.config.num_clients
        deadline = time.monotonic() + timeout
        while len(node_ids := sorted(grid.get_node_ids())) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(node_ids)} of num_clients={n} nodes connected "
                                   f"after {timeout:.0f} s")
            time.sleep(0.5)
        queries = [Message(content=RecordDict(), dst_node_id=node, message_type=QUERY_PARTITION)
                   for node in node_ids]
        replies = list(grid.send_and_receive(queries))
        _raise_errors(replies, "node discovery")
        nodes: dict[int, int] = {}
        for reply in replies:
            m = reply.content[METRICS]
            if int(m[NUM_PARTITIONS]) != n:
                raise ValueError(
                    f"a node reports num-partitions={int(m[NUM_PARTITIONS])} but the experiment "
                    f"has num_clients={n}: run the federation with exactly {n} nodes "
                    f"(simulation: --federation-config \"num-supernodes={n}\")"
                )
            nodes[int(m[PARTITION_ID])] = reply.metadata.src_node_id
        if sorted(nodes) != list(range(n)):
            raise ValueError(f"nodes hold partitions {sorted(nodes)}; expected 0..{n - 1}, "
                             f"each exactly once (check each SuperNode's partition-id)")
        self.nodes = nodes

    def gather_local(self, grid: Grid) -> dict[int, dict[str, torch.Tensor]]:
        """Each trained client's personal arrays, for a checkpoint."""
        if not self.config.personalized or not self.trained:
            return {}
        queries = [self._message(p, QUERY_GET_LOCAL, {}, 0) for p in sorted(self.trained)]
        replies = list(grid.send_and_receive(queries))
        _raise_errors(replies, "checkpointing")
        partition_of = {node: p for p, node in self.nodes.items()}
        return {partition_of[r.metadata.src_node_id]: r.content[LOCAL].to_torch_state_dict()
                for r in replies}

    def restore_local(self, grid: Grid, local: dict[int, dict[str, torch.Tensor]]) -> None:
        """Send each client its personal arrays back from a checkpoint."""
        queries = [self._message(p, QUERY_SET_LOCAL, {LOCAL: ArrayRecord(dict(arrays))}, 0)
                   for p, arrays in sorted(local.items())]
        if queries:
            _raise_errors(list(grid.send_and_receive(queries)), "restoring client state")


# checkpoints -------------------------------------------------------------------------------


def checkpoint_path(directory: str | Path, server_round: int) -> Path:
    return Path(directory) / f"round-{server_round:05d}.pt"


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = sorted(Path(directory).glob("round-*.pt")) if directory else []
    return found[-1] if found else None


def save_checkpoint(config: ExperimentConfig, server_round: int, arrays: ArrayRecord,
                    strategy: FedParaStrategy, grid: Grid, history: History, keep: int = 2
                    ) -> Path:
    """Global model, clients' personal arrays, who has trained and the history, atomically.

    No RNG state is stored because none is carried between rounds: sampling draws from
    (seed, round) and each client's training from (seed, round, partition id).
    """
    state = {
        "round": server_round,
        "config": config.to_dict(),
        "global": arrays.to_torch_state_dict(),
        "local": strategy.gather_local(grid),
        "trained": sorted(strategy.trained),
        "history": history.to_dict(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = checkpoint_path(config.checkpoint_dir, server_round)
    write_atomic(path, buffer.getvalue())
    for old in sorted(Path(config.checkpoint_dir).glob("round-*.pt"))[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path, config: ExperimentConfig) -> dict[str, Any]:
    """Read a checkpoint and check it belongs to the same experiment."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["config"]
    differing = sorted(k for k, v in config.to_dict().items()
                       if k not in _RESUMABLE_CHANGES and saved.get(k) != v)
    if differing:
        raise ValueError(f"checkpoint {path} is from a different experiment: fields "
                         f"{', '.join(differing)} differ; use another checkpoint_dir")
    if state["round"] > config.rounds:
        raise ValueError(f"checkpoint {path} is at round {state['round']} > rounds={config.rounds}")
    return state


# the run -----------------------------------------------------------------------------------


def run_server(grid: Grid, config: ExperimentConfig, *, resume: bool = False,
               on_round: RoundCallback | None = None) -> History:
    """Run `config.rounds` rounds on `grid` (resuming from the last checkpoint if asked)."""
    device = task.resolve_device(config.device)
    strategy = FedParaStrategy(config)
    strategy.discover_nodes(grid)

    model = task.init_model(config)
    global_keys, _ = task.split_keys(model, config.algorithm)
    arrays = ArrayRecord(task.get_arrays(model, global_keys))
    history = History(config=config.to_dict(), hardware=hardware_info(str(device)))
    first_round = 1

    path = latest_checkpoint(config.checkpoint_dir) if resume else None
    if path is not None:
        state = load_checkpoint(path, config)
        arrays = ArrayRecord(state["global"])
        history.records = History.from_dict(state["history"]).records
        strategy.trained = set(state["trained"])
        strategy.restore_local(grid, state["local"])
        first_round = state["round"] + 1
        log.info("resumed from %s", path)
    elif config.checkpoint_dir:  # a fresh run: older checkpoints here belong to an older run
        for old in Path(config.checkpoint_dir).glob("round-*.pt"):
            old.unlink()

    test_batches = task.test_data(config) if config.evaluation == "server" else None
    cum_bytes = history.records[-1].cum_bytes if history.records else 0
    for server_round in range(first_round, config.rounds + 1):
        start = time.perf_counter()
        # 1-3. train the sampled clients and average what they send
        messages = list(strategy.configure_train(
            server_round, arrays, ConfigRecord({"lr": config.round_lr(server_round)}), grid))
        replies = list(grid.send_and_receive(messages))
        bytes_down = sum(array_bytes(m.content) for m in messages)
        bytes_up = sum(array_bytes(r.content) for r in replies if not r.has_error())
        arrays, train_metrics = strategy.aggregate_train(server_round, replies)

        # 4. score the round
        eval_messages = list(
            strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        per_client: dict[str, Any] = {}
        if config.evaluation == "server":
            task.set_arrays(model, arrays.to_torch_state_dict())
            result = task.evaluate(model, test_batches, device=device)
            accuracy, loss, examples, scored = result.accuracy, result.loss, result.num_examples, 0
        else:
            metrics = strategy.aggregate_evaluate(
                server_round, grid.send_and_receive(eval_messages))
            accuracy, loss = float(metrics["accuracy"]), float(metrics["loss"])
            examples, scored = int(metrics["examples"]), int(metrics["clients"])
            per_client = {"scored_clients": list(metrics["scored-clients"]),
                          "client_accuracy": list(metrics["client-accuracy"])}
        untrained = config.num_clients - len(strategy.trained) if config.personalized else 0
        tracked = dict(zip(task.tracked_parameters(model), train_metrics[CHANGE], strict=True))
        if "own-accuracy" in train_metrics:
            per_client.update(
                accuracy_after_training=float(train_metrics["own-accuracy"]),
                client_accuracy_after_training=list(train_metrics["own-client-accuracy"]))

        # 5. record, checkpoint, report
        cum_bytes += bytes_up + bytes_down
        record = RoundRecord(
            round=server_round, accuracy=accuracy, loss=loss, bytes_up=bytes_up,
            bytes_down=bytes_down, cum_bytes=cum_bytes,
            wall_seconds=time.perf_counter() - start,
            train_loss=float(train_metrics["train-loss"]), clients=strategy.sample(server_round),
            eval_examples=examples, eval_clients=scored, untrained_clients=untrained,
            eval_bytes_down=sum(array_bytes(m.content) for m in eval_messages),
            parameter_change=tracked,
            **per_client,
        )
        history.append(record)
        if config.checkpoint_dir and (server_round % config.checkpoint_every == 0
                                      or server_round == config.rounds):
            save_checkpoint(config, server_round, arrays, strategy, grid, history)
        if on_round is not None:
            on_round(record, history)
    return history


def make_server_app(config: ExperimentConfig | None = None, *, resume: bool = False,
                    on_round: RoundCallback | None = None,
                    on_finish: Callable[[History], None] | None = None) -> ServerApp:
    """A ServerApp running `config` (default: read from Flower's run config).

    Without `on_finish` the history is saved to `History.default_path(config, results_dir)`.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context) -> None:
        run_config = dict(context.run_config)
        resume_run = bool(run_config.pop("resume", resume))
        experiment = config or ExperimentConfig.from_run_config(run_config)
        history = run_server(grid, experiment, resume=resume_run, on_round=on_round)
        if on_finish is not None:
            on_finish(history)
        else:
            path = history.save(History.default_path(experiment, experiment.results_dir))
            print(f"fedpara: {len(history)} rounds, final accuracy {history.final_accuracy:.4f}; "
                  f"history saved to {path}")

    return server_app


app = make_server_app()
