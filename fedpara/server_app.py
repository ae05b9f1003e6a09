"""The Flower ServerApp: sampling, aggregation, evaluation, measured traffic and checkpoints.

`flwr run .` loads `app` from here (pyproject's `[tool.flwr.app.components]`), reads the run
config into an `ExperimentConfig` and saves the history under `results-dir`;
`fedpara.run_experiment` builds its own app with `make_server_app(config, ...)` and takes the
history back in-process (`run_simulation` returns nothing).

One round:
1. sample exactly `clients_per_round` partitions, reproducibly from (seed, round);
2. send them the global keys' arrays (all of them for FedAvg, all but the head for FedPer,
   only the W1 factors for pFedPara, none for local-only training) and get theirs back;
3. aggregate them with the configured Flower strategy (`flower_strategy`: FedAvg, FedProx,
   FedAvgM, FedAdam or FedYogi from `flwr.serverapp.strategy`), weighted by training examples,
   the replies in partition order (deterministic): the weighted mean with Flower's arithmetic
   in float64 (`task.weighted_mean`), then the server optimizer's step, if any, by Flower;
4. score: the global model on the test set here ("server"), or each client on its own
   held-out data ("clients"), weighted by examples: every client under FedAvg, every client
   that has trained under the personalized algorithms (those that never trained are counted,
   not scored);
5. record the bytes of the training messages' arrays that actually went each way (client
   evaluation's downloads apart, as `eval_bytes_down`); checkpoint every N rounds.

Why `FedParaStrategy` wraps Flower's strategy instead of subclassing it: the round loop here is
`run_server`, not `Strategy.start` (flwr 1.42), because `start` does not fit it.
`start` always counts rounds from 1 (a resumed run starts after its checkpoint), sends one
fixed train config (the learning rate decays per round), offers no hook after a round (the
checkpoint, which also asks the clients for their personal arrays, and the `on_round`
callback), and keeps the messages it sends out of reach of the caller (the history records
their measured bytes). So `FedParaStrategy` keeps the per-round state (which node holds which
partition, who has trained), addresses the round's partitions, and hands Flower's strategy
the two calls that are its algorithm: `configure_train` (what the clients are told, e.g.
FedProx's mu; the arrays FedOpt remembers) and `aggregate_train` (the new global arrays).
The record keys and query names both apps use are `fedpara.messages`'; checkpoints are
written and read by `fedpara.checkpoints`. Every exchange with the nodes goes through `exchange`,
Flower's push-then-pull loop with a shorter wait between pulls on a deployment.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
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
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as flower
from torch import Tensor

from fedpara import task
from fedpara.checkpoints import (
    check_fresh_start,
    check_resumable,
    clear_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fedpara.config import STRATEGIES, ExperimentConfig, as_bool
from fedpara.history import History, RoundRecord, hardware_info
from fedpara.messages import (
    ADDRESS,
    ARRAYS,
    CHANGE,
    COHORT,
    CORRECT,
    EXPERIMENT,
    LOCAL,
    LOSS,
    LR,
    METRICS,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    OWN_CORRECT,
    OWN_EXAMPLES,
    PARTITION_ID,
    PARTITIONS_HELD,
    QUERY_GET_LOCAL,
    QUERY_PARTITION,
    QUERY_SET_LOCAL,
    ROUND,
    SERVER_ROUND,
    TRAIN_LOSS,
    cohort_key,
)
from fedpara.storage import check_writable
from fedpara.transport import from_wire, to_wire

log = logging.getLogger("fedpara")
RoundCallback = Callable[[RoundRecord, History], None]
_NODE_WAIT_SECONDS = 600.0
_QUERY_MIN_TTL = 30.0  # a node that connects late still gets this long to answer discovery
_POLL_SECONDS = 1.0  # between pulls for replies, on a grid without its own pull_interval
POLL_ENV = "FEDPARA_POLL_SECONDS"  # overrides it, on every grid


def array_bytes(content: RecordDict) -> int:
    """Raw bytes of every array in a message's content (shape x itemsize, no framing)."""
    return sum(
        int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize
        for record in content.array_records.values()
        for array in record.values()
    )


def poll_seconds(grid: Grid) -> float:
    """How long `exchange` waits between pulls on `grid`: $FEDPARA_POLL_SECONDS if set, else
    the grid's own `pull_interval` where it has one (the simulation's in-memory grid: 0.1 s),
    else 1 s (a deployment's grid)."""
    raw = os.environ.get(POLL_ENV)
    if raw is None:
        return float(getattr(grid, "pull_interval", _POLL_SECONDS))
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"${POLL_ENV}={raw!r}: must be a positive number of seconds "
                         f"(unset: {_POLL_SECONDS:g} s on a deployment, the simulation's own "
                         f"interval in a simulation)")
    return value


def exchange(grid: Grid, messages: Iterable[Message]) -> list[Message]:
    """Push `messages` and wait for every reply, like Flower's `Grid.send_and_receive`.

    The difference is the wait between pulls (`poll_seconds`). Flower 1.42's grid for a
    deployment (`flwr/superlink/grid/http_grid.py`) waits 3 s, so a reply sits 1.5 s on
    average before the ServerApp sees it, in every exchange of every round; this loop waits
    1 s there. Each pull is a request that costs the SuperLink CPU, so the wait is not made
    as short as the simulation's: `benchmarks/server_poll.py` measures whole deployment
    rounds with several waits.
    """
    wait = poll_seconds(grid)
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    if len(ids) != len(messages) or any(not i for i in ids):  # a deployment's grid gives [] or
        pushed = sum(1 for i in ids if i)  # None entries for messages it could not push
        raise RuntimeError(f"the SuperLink accepted {pushed} of {len(messages)} messages")
    waiting = set(ids)
    replies: list[Message] = []
    while waiting:
        pulled = list(grid.pull_messages(waiting))
        replies.extend(pulled)
        waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
        if waiting:
            time.sleep(wait)
    return replies


def _cast(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An averaged array back in its clients' dtype: integer entries (e.g. BatchNorm's
    `num_batches_tracked`) rounded to the nearest integer, not truncated (a mean of equal
    counts can land just below them)."""
    return value.to(dtype) if dtype.is_floating_point else value.round().to(dtype)


def _raise_errors(replies: list[Message], what: str, round_timeout: float = 0.0, *,
                  limit: str = "") -> None:
    """Stop the run if any reply is an error, naming each node and Flower's reason; a message
    that found no reply within its time to live says so, naming that limit (`limit`, else
    `round_timeout`, else Flower's 12 hours)."""
    failed = [m for m in replies if m.has_error()]
    if failed:
        limit = limit or (f"round-timeout={round_timeout:g} s" if round_timeout else
                          "Flower's default time to live, 12 hours (round-timeout=0)")
        # the same reason once, with its senders (an expired message's error reply comes from
        # the SuperLink itself, one per message that went unanswered)
        senders: dict[str, list[str]] = {}
        for m in failed:
            node = m.metadata.src_node_id
            sender = "the SuperLink" if node == SUPERLINK_NODE_ID else f"node {node}"
            senders.setdefault(m.error.reason + _expired_hint(m, limit), []).append(sender)
        reasons = "; ".join(f"{_count(names)}: {reason}" for reason, names in senders.items())
        raise RuntimeError(f"{len(failed)} client(s) failed during {what}: {reasons}")


def _count(names: list[str]) -> str:
    """'node 3, node 5' or '4 × the SuperLink'."""
    if len(set(names)) == 1 and len(names) > 1:
        return f"{len(names)} × {names[0]}"
    return ", ".join(names)


def _expired_hint(reply: Message, limit: str) -> str:
    if reply.error.code != ErrorCode.MESSAGE_UNAVAILABLE:
        return ""
    return (f" [no reply within {limit}; with checkpoint-dir set, resume=true continues from "
            f"the last checkpoint]")


def flower_strategy(config: ExperimentConfig) -> flower.FedAvg:
    """Flower's own implementation of `config.strategy`, set up for one `FedParaStrategy`.

    It sees only the global keys' arrays (FedPara's factors like any other array; pFedPara's
    local factors and FedPer's head never reach it), weighs clients by NUM_EXAMPLES, and reads
    and writes the ARRAYS and ROUND records of the messages. It samples every node of the
    cohort it is shown (`_Cohort`: the distinct nodes holding the round's partitions, as few
    as one); the round's metrics are read by `FedParaStrategy`.
    """
    if config.strategy not in STRATEGIES:
        raise ValueError(f"strategy={config.strategy!r}; allowed: {', '.join(STRATEGIES)}")
    common = dict(fraction_train=1.0, fraction_evaluate=1.0,
                  min_train_nodes=1, min_evaluate_nodes=0,
                  min_available_nodes=1, weighted_by_key=NUM_EXAMPLES,
                  arrayrecord_key=ARRAYS, configrecord_key=ROUND,
                  train_metrics_aggr_fn=_no_metrics, evaluate_metrics_aggr_fn=_no_metrics)
    if config.strategy == "fedprox":
        return flower.FedProx(**common, proximal_mu=config.proximal_mu)
    if config.strategy == "fedavgm":
        return flower.FedAvgM(**common, server_learning_rate=config.server_lr,
                              server_momentum=config.server_momentum)
    if config.strategy == "fedadam":
        return flower.FedAdam(**common, eta=config.server_lr, eta_l=config.lr)
    if config.strategy == "fedyogi":
        return flower.FedYogi(**common, eta=config.server_lr, eta_l=config.lr)
    return flower.FedAvg(**common)


def _no_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """The strategy's metric aggregation: none (FedParaStrategy reads the round's metrics)."""
    return MetricRecord()


class _Cohort:
    """The grid as Flower's `configure_train` sees it: only the nodes of the round's sampled
    partitions, so the strategy addresses exactly the reproducible (seed, round) sample."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


# server-side state a strategy carries between rounds (FedAvgM's momentum, FedOpt's moments),
# saved in checkpoints so a resumed run continues the same optimizer
_STRATEGY_STATE = ("momentum_vector", "m_t", "v_t")
# strategies whose new global model is the clients' weighted mean (FedProx differs from FedAvg
# only in what it tells the clients)
_MEAN_IS_THE_RESULT = ("fedavg", "fedprox")


class FedParaStrategy:
    """One round's exchanges, with exact reproducible sampling by partition id, aggregated by
    `config.strategy` (Flower's implementation, `self.flower`).

    `nodes` maps partition id -> node id (node ids are random per run; partitions are not),
    filled in by `discover_nodes`; `trained` holds the partitions that have trained at least
    once. `train_round` and `evaluate_round` run a round's two exchanges on a grid and return
    the fields of its `RoundRecord`; the `configure_*` / `aggregate_*` methods build and read
    the messages. Aggregation keeps dtypes and sums in partition order.
    """

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.nodes: dict[int, int] = {}
        self.trained: set[int] = set()
        self.flower = flower_strategy(config)

    # messages -----------------------------------------------------------------------------

    def _message(self, partition_id: int, message_type: str, records: dict[str, Any],
                 server_round: int) -> Message:
        content = RecordDict({EXPERIMENT: ConfigRecord(self.config.to_run_config()),
                              ADDRESS: ConfigRecord({PARTITION_ID: partition_id}), **records})
        return Message(content=content, dst_node_id=self.nodes[partition_id],
                       message_type=message_type, group_id=str(server_round),
                       ttl=self.config.round_timeout or None)

    def sample(self, server_round: int) -> list[int]:
        """The partitions that train in `server_round`: a function of (seed, round) only."""
        rng = np.random.default_rng([self.config.seed, server_round])
        chosen = rng.choice(self.config.num_clients, self.config.clients_per_round, replace=False)
        return sorted(int(p) for p in chosen)

    def _wire(self, arrays: ArrayRecord) -> ArrayRecord:
        """The global arrays as sent: rounded to the config's transport format and packed
        (`transport.to_wire`)."""
        return ArrayRecord(to_wire(arrays.to_torch_state_dict(), self.config.transport))

    def configure_train(self, server_round: int, arrays: ArrayRecord) -> list[Message]:
        """The training messages of `server_round`: one per sampled partition.

        Flower's strategy configures them (it adds its own entries to ROUND, e.g. FedProx's
        "proximal-mu", and FedOpt remembers `arrays`); the arrays go out in the transport format.
        """
        round_config = ConfigRecord({SERVER_ROUND: server_round,
                                     LR: self.config.round_lr(server_round)})
        sampled = self.sample(server_round)
        configured = self.flower.configure_train(  # one per node (a node may hold several)
            server_round, arrays, round_config, _Cohort(sorted({self.nodes[p] for p in sampled})))
        by_node = {m.metadata.dst_node_id: m.content for m in configured}
        wires: dict[int, ArrayRecord] = {}  # encoded once per distinct record (Flower shares one)
        messages = []
        for p in sampled:
            content = by_node[self.nodes[p]]
            record = content.array_records[ARRAYS]
            if id(record) not in wires:
                wires[id(record)] = self._wire(record)
            records = {ARRAYS: wires[id(record)], ROUND: content.config_records[ROUND]}
            messages.append(self._message(p, MessageType.TRAIN, records, server_round))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord, dict[str, Any]]:
        """The new global arrays: the returned arrays, decoded from the transport format,
        averaged in float64 in partition order (`task.weighted_mean`: Flower's FedAvg
        arithmetic), then stepped by Flower's server optimizer for FedAvgM, FedAdam and
        FedYogi; each result cast back to its decoded dtype (float32).

        Also the round's `RoundRecord` fields from the replies' metrics: `train_loss`,
        `parameter_change` (a list, `task.tracked_parameters` order: the mean over the clients)
        and, with client evaluation, `accuracy_after_training` and its per-client values.
        """
        replies = list(replies)
        if not replies:
            raise RuntimeError(f"no client replied to the training of round {server_round}")
        _raise_errors(replies, f"training in round {server_round}",
                      self.config.round_timeout)
        replies.sort(key=lambda m: int(m.content[METRICS][PARTITION_ID]))
        contents = [m.content for m in replies]
        examples = [float(c[METRICS][NUM_EXAMPLES]) for c in contents]
        weights = np.array(examples) / sum(examples)
        self.trained.update(int(c[METRICS][PARTITION_ID]) for c in contents)
        dtypes: dict[str, torch.dtype] = {}

        def decoded():
            for content in contents:
                state = from_wire(content[ARRAYS].to_torch_state_dict(), self.config.transport)
                dtypes.update((key, value.dtype) for key, value in state.items())
                yield state

        mean = task.weighted_mean(decoded(), examples)
        if self.config.strategy in _MEAN_IS_THE_RESULT:
            result = {key: _cast(value, dtypes[key]).numpy() for key, value in mean.items()}
        else:  # Flower's server step from the mean, handed over as one reply of weight 1
            result = self._server_step(server_round, mean, replies[0], dtypes)
        aggregated = ArrayRecord({key: Array(value) for key, value in result.items()})
        if isinstance(getattr(self.flower, "current_arrays", None), ArrayRecord):
            # FedAvgM steps from its current arrays: the global model as kept and sent (float32)
            self.flower.current_arrays = aggregated
        # how far local training moved each tracked parameter, the mean over the clients
        changes = np.array([list(c[METRICS][CHANGE]) for c in contents], dtype=np.float64)
        fields: dict[str, Any] = {
            "train_loss": float(sum(w * float(c[METRICS][TRAIN_LOSS])
                                    for w, c in zip(weights, contents, strict=True))),
            "parameter_change": changes.mean(axis=0).tolist(),
        }
        if all(OWN_CORRECT in c[METRICS] for c in contents):  # client evaluation
            correct = [int(c[METRICS][OWN_CORRECT]) for c in contents]
            seen = [int(c[METRICS][OWN_EXAMPLES]) for c in contents]
            fields["accuracy_after_training"] = (sum(correct) / sum(seen) if sum(seen)
                                                 else float("nan"))
            fields["client_accuracy_after_training"] = [
                k / n if n else float("nan") for k, n in zip(correct, seen, strict=True)]
        return aggregated, fields

    def _server_step(self, server_round: int, mean: Mapping[str, Tensor], reply: Message,
                     dtypes: Mapping[str, torch.dtype]) -> dict[str, np.ndarray]:
        """Flower's FedAvgM / FedAdam / FedYogi step from the clients' float64 mean. Their
        `aggregate_train` first averages the replies with FedAvg's; given the mean as a single
        reply of weight 1, that average is the mean itself (x * 1.0 == x), and the step that
        follows is Flower's own code."""
        carrier = Message(content=RecordDict({
            ARRAYS: ArrayRecord({key: Array(value.numpy()) for key, value in mean.items()}),
            METRICS: MetricRecord({NUM_EXAMPLES: 1})}),
            dst_node_id=reply.metadata.dst_node_id, message_type=MessageType.TRAIN,
            group_id=str(server_round))
        result, _ = self.flower.aggregate_train(server_round, [carrier])
        return {key: _cast(torch.from_numpy(np.asarray(result[key].numpy())), dtype).numpy()
                for key, dtype in dtypes.items()}

    def cohort_message(self, messages: list[Message], server_round: int) -> Message:
        """engine="cohort": the round's training messages as one, to the node of the first
        sampled partition, naming all of them in ROUND[COHORT] (the arrays once)."""
        first = messages[0].content
        round_config = ConfigRecord({**first.config_records[ROUND],
                                     COHORT: self.sample(server_round)})
        partition = self.sample(server_round)[0]
        return self._message(partition, MessageType.TRAIN,
                             {ARRAYS: first.array_records[ARRAYS], ROUND: round_config},
                             server_round)

    def split_cohort(self, replies: list[Message], server_round: int) -> list[Message]:
        """A cohort's one reply as the per-client replies it stands for (what the strategy
        aggregates and the traffic counts)."""
        _raise_errors(replies, f"cohort training in round {server_round}",
                      self.config.round_timeout)
        content = replies[0].content
        return [
            Message(content=RecordDict({ARRAYS: content[cohort_key(ARRAYS, p)],
                                        METRICS: content[cohort_key(METRICS, p)]}),
                    dst_node_id=self.nodes[p], message_type=MessageType.TRAIN,
                    group_id=str(server_round))
            for p in self.sample(server_round)
        ]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord) -> list[Message]:
        """Client evaluation: every client for FedAvg, those that have trained otherwise."""
        if self.config.evaluation != "clients":
            return []
        partitions = sorted(self.trained) if self.config.personalized else sorted(self.nodes)
        wire = self._wire(arrays)
        return [self._message(p, MessageType.EVALUATE, {ARRAYS: wire}, server_round)
                for p in partitions]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> dict[str, Any]:
        """Held-out accuracy and loss over clients, weighted by their examples, and the
        per-client accuracies: the round's `RoundRecord` fields."""
        replies = list(replies)
        _raise_errors(replies, f"evaluation in round {server_round}",
                      self.config.round_timeout)
        metrics = sorted((m.content[METRICS] for m in replies), key=lambda m: m[PARTITION_ID])
        examples = sum(int(m[NUM_EXAMPLES]) for m in metrics)
        scored = [m for m in metrics if int(m[NUM_EXAMPLES]) > 0]
        return {
            "accuracy": sum(float(m[CORRECT]) for m in metrics) / examples if examples else
            float("nan"),
            "loss": sum(float(m[LOSS]) * int(m[NUM_EXAMPLES]) for m in scored) / examples
            if examples else float("nan"),
            "eval_examples": examples,
            "eval_clients": len(metrics),
            "scored_clients": [int(m[PARTITION_ID]) for m in scored],
            "client_accuracy": [float(m[CORRECT]) / int(m[NUM_EXAMPLES]) for m in scored],
        }

    # one round's exchanges ----------------------------------------------------------------

    def train_round(self, grid: Grid, server_round: int, arrays: ArrayRecord
                    ) -> tuple[ArrayRecord, dict[str, Any]]:
        """Train the sampled clients and average what they send: the new global arrays and
        the round's training fields, with the bytes that went each way."""
        messages = self.configure_train(server_round, arrays)
        if self.config.engine == "cohort":  # one node trains them all; counted per client
            cohort = self.cohort_message(messages, server_round)
            replies = self.split_cohort(exchange(grid, [cohort]), server_round)
        else:
            replies = exchange(grid, messages)
        bytes_down = sum(array_bytes(m.content) for m in messages)
        bytes_up = sum(array_bytes(r.content) for r in replies if not r.has_error())
        aggregated, fields = self.aggregate_train(server_round, replies)
        return aggregated, {**fields, "bytes_down": bytes_down, "bytes_up": bytes_up}

    def evaluate_round(self, grid: Grid, server_round: int, arrays: ArrayRecord
                       ) -> dict[str, Any]:
        """Client evaluation of `arrays`: the round's evaluation fields and the bytes sent."""
        messages = self.configure_evaluate(server_round, arrays)
        fields = self.aggregate_evaluate(server_round, exchange(grid, messages))
        return {**fields, "eval_bytes_down": sum(array_bytes(m.content) for m in messages)}

    # the strategy's own state ------------------------------------------------------------

    def strategy_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """What Flower's strategy carries between rounds (FedAvgM's momentum, FedOpt's first
        and second moments), by global key: empty for FedAvg and FedProx."""
        state = {}
        for name in _STRATEGY_STATE:
            value = getattr(self.flower, name, None)
            if value is None:
                continue
            if isinstance(value, list):  # FedAvgM's momentum: in the global keys' order
                value = dict(zip(self.flower.current_arrays.keys(), value, strict=True))
            state[name] = {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
        return state

    def restore_strategy_state(self, state: dict[str, dict[str, torch.Tensor]],
                               arrays: ArrayRecord) -> None:
        """Put `strategy_state()`'s output back; `arrays` are the global arrays it went with."""
        if hasattr(self.flower, "momentum_vector"):  # FedAvgM steps from the current arrays
            self.flower.current_arrays = arrays
        for name, value in state.items():
            arrays_of = {k: v.numpy() for k, v in value.items()}
            setattr(self.flower, name, list(arrays_of.values()) if name == "momentum_vector"
                    else arrays_of)

    # node discovery and per-client state ---------------------------------------------------

    def discover_nodes(self, grid: Grid, timeout: float = _NODE_WAIT_SECONDS) -> None:
        """Wait until the connected nodes hold all `num_clients` partitions, asking each new
        node which it holds (a simulated node holds one, a SuperNode may hold a block)."""
        n = self.config.num_clients
        deadline = time.monotonic() + timeout
        nodes: dict[int, int] = {}
        asked: set[int] = set()
        while True:
            new = sorted(set(grid.get_node_ids()) - asked)
            if new:
                # each query lives until the wait's deadline (at least _QUERY_MIN_TTL s), so
                # a ClientApp that hangs cannot hold discovery past it; not round-timeout,
                # since a ClientApp's first start (imports, data) can outlast a round's limit
                ttl = max(deadline - time.monotonic(), _QUERY_MIN_TTL)
                queries = [Message(content=RecordDict(), dst_node_id=node,
                                   message_type=QUERY_PARTITION, ttl=ttl) for node in new]
                replies = exchange(grid, queries)
                _raise_errors(replies, "node discovery",
                              limit=f"node discovery's wait ({timeout:g} s from its start, "
                                    f"at least {_QUERY_MIN_TTL:g} s per query)")
                asked.update(new)
                for reply in replies:
                    self._add_node(nodes, reply.content[METRICS], reply.metadata.src_node_id)
            if len(nodes) == n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {len(asked)} connected nodes hold {len(nodes)} of "
                                   f"num_clients={n} partitions after {timeout:.0f} s")
            time.sleep(0.5)
        self.nodes = dict(sorted(nodes.items()))

    def _add_node(self, nodes: dict[int, int], m: MetricRecord, node: int) -> None:
        """Record the partitions one node reports, checking them against the experiment."""
        n = self.config.num_clients
        if int(m[NUM_PARTITIONS]) != n:
            raise ValueError(
                f"a node reports num-partitions={int(m[NUM_PARTITIONS])} but the experiment "
                f"has num_clients={n}: run the federation with exactly {n} partitions "
                f"(simulation: --federation-config \"num-supernodes={n}\")"
            )
        first = int(m[PARTITION_ID])
        for p in range(first, first + int(m.get(PARTITIONS_HELD, 1))):
            if p in nodes:
                raise ValueError(f"partition {p} is held by two nodes; expected 0..{n - 1}, "
                                 f"each exactly once (check each SuperNode's partition-id and "
                                 f"partitions-held)")
            nodes[p] = node

    def gather_local(self, grid: Grid) -> dict[int, dict[str, torch.Tensor]]:
        """Each trained client's personal arrays, for a checkpoint."""
        if not self.config.personalized or not self.trained:
            return {}
        queries = [self._message(p, QUERY_GET_LOCAL, {}, 0) for p in sorted(self.trained)]
        replies = exchange(grid, queries)
        _raise_errors(replies, "checkpointing", self.config.round_timeout)
        return {int(r.content[METRICS][PARTITION_ID]): r.content[LOCAL].to_torch_state_dict()
                for r in replies}

    def restore_local(self, grid: Grid, local: dict[int, dict[str, torch.Tensor]]) -> None:
        """Send each client its personal arrays back from a checkpoint."""
        queries = [self._message(p, QUERY_SET_LOCAL, {LOCAL: ArrayRecord(dict(arrays))}, 0)
                   for p, arrays in sorted(local.items())]
        if queries:
            _raise_errors(exchange(grid, queries), "restoring client state",
                          self.config.round_timeout)


# the run -----------------------------------------------------------------------------------


def run_server(grid: Grid, config: ExperimentConfig, *, resume: bool = False,
               on_round: RoundCallback | None = None) -> History:
    """Run `config.rounds` rounds on `grid` (resuming from the last checkpoint if asked)."""
    # the server's own device matters only when it scores the model; otherwise (a deployment's
    # server may have no GPU) the history records the device the config names ("auto" as this
    # host resolves it)
    device = task.resolve_device(config.device) if config.evaluation == "server" else None
    named = device or (task.resolve_device("auto") if config.device == "auto" else config.device)
    check_resumable(config, resume)
    if config.checkpoint_dir:  # found now, not at the first checkpoint
        check_writable(config.checkpoint_dir, "checkpoint_dir")
    # the checkpoint is read and checked before any node is asked (a deployment may wait long
    # for its nodes): a fresh run deletes its own checkpoints only, another experiment's are
    # refused; a resumed run must find its own experiment's
    path = latest_checkpoint(config.checkpoint_dir) if resume else None
    state = load_checkpoint(path, config) if path is not None else None
    if path is None and config.checkpoint_dir:
        check_fresh_start(config)
    strategy = FedParaStrategy(config)
    strategy.discover_nodes(grid)

    model = task.init_model(config)
    global_keys, _ = task.split_keys(model, config.algorithm)
    tracked = task.tracked_parameters(model)
    arrays = ArrayRecord(task.get_arrays(model, global_keys))
    history = History(config=config.to_dict(), hardware=hardware_info(str(named)))
    first_round = 1

    if state is not None:
        arrays = ArrayRecord(state["global"])
        history.records = History.from_dict(state["history"]).records
        strategy.trained = set(state["trained"])
        strategy.restore_strategy_state(state.get("strategy", {}), arrays)
        strategy.restore_local(grid, state["local"])
        first_round = state["round"] + 1
        log.info("resumed from %s", path)
    elif config.checkpoint_dir:  # a fresh run: older checkpoints of this experiment go
        clear_checkpoints(config.checkpoint_dir)

    test_batches = task.test_data(config) if config.evaluation == "server" else None
    cum_bytes = history.records[-1].cum_bytes if history.records else 0
    for server_round in range(first_round, config.rounds + 1):
        start = time.perf_counter()
        # 1-3. train the sampled clients and average what they send
        arrays, fields = strategy.train_round(grid, server_round, arrays)
        fields["parameter_change"] = dict(zip(tracked, fields["parameter_change"], strict=True))

        # 4. score the round
        if config.evaluation == "server":
            task.set_arrays(model, arrays.to_torch_state_dict())
            result = task.evaluate(model, test_batches, device=device)
            fields.update(accuracy=result.accuracy, loss=result.loss,
                          eval_examples=result.num_examples, eval_clients=0, eval_bytes_down=0)
        else:
            fields.update(strategy.evaluate_round(grid, server_round, arrays))
        untrained = config.num_clients - len(strategy.trained) if config.personalized else 0

        # 5. record, checkpoint, report
        cum_bytes += fields["bytes_up"] + fields["bytes_down"]
        record = RoundRecord(round=server_round, cum_bytes=cum_bytes,
                             wall_seconds=time.perf_counter() - start,
                             clients=strategy.sample(server_round), untrained_clients=untrained,
                             **fields)
        history.append(record)
        if config.checkpoint_dir and (server_round % config.checkpoint_every == 0
                                      or server_round == config.rounds):
            save_checkpoint(config, server_round, arrays.to_torch_state_dict(),
                            strategy.gather_local(grid), strategy.trained, history,
                            strategy_state=strategy.strategy_state())
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
        resume_run = as_bool("resume", run_config.pop("resume", resume))
        experiment = config or ExperimentConfig.from_run_config(run_config)
        if on_finish is None:  # the history is saved here at the end: found now, not then
            check_writable(History.default_path(experiment, experiment.results_dir).parent,
                           "the history's folder under results_dir")
        history = run_server(grid, experiment, resume=resume_run, on_round=on_round)
        if on_finish is not None:
            on_finish(history)
        else:
            path = history.save(History.default_path(experiment, experiment.results_dir))
            print(f"fedpara: {len(history)} rounds, final accuracy {history.final_accuracy:.4f}; "
                  f"history saved to {path}")

    return server_app


app = make_server_app()
