"""The Flower ClientApp: one client's local training and evaluation (Message API, flwr 1.42).

Run through `fedpara.run_experiment` (simulation) or `flwr run .` (simulation or deployment).
Each node reads which partitions it holds from its node config (`partition-id`,
`num-partitions`, and optionally `partitions-held`): the simulation sets the first two, one
partition per node; a real SuperNode gets them from `--node-config "partition-id=0
num-partitions=2"`, or holds a block of partitions, for example all of them on one GPU node:
`--node-config "partition-id=0 num-partitions=100 partitions-held=100"`. Each message names
the partition it is for (`ADDRESS`).

A client keeps its personal part (FedPer's head; for pFedPara everything but the W1 factors,
that is the W2 factors, the biases and any norm; the whole model for local-only training) in
`context.state`, which Flower keeps per node for the length of a run, under one key per
partition (`cohort_key(LOCAL, p)`); only the global keys travel. The record keys and query
names are `fedpara.messages`'.

The handlers here only translate: a message becomes a request of plain data, whose reply
`fedpara.worker.handle` computes with torch. By default that happens in this process; with the
node config `worker=<socket path>` a long-lived worker on the same machine does it
(`python -m fedpara.worker`), so that the process Flower starts for each message imports
neither torch nor fedpara's training path and finds the device and the data ready. This module
imports no torch itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpara.config import ExperimentConfig
from fedpara.messages import (
    ADDRESS,
    ARRAYS,
    COHORT,
    EXPERIMENT,
    GET_LOCAL_ACTION,
    LOCAL,
    LR,
    METRICS,
    NUM_PARTITIONS,
    PARTITION_ACTION,
    PARTITION_ID,
    PARTITIONS_HELD,
    PROXIMAL_MU,
    ROUND,
    SERVER_ROUND,
    SET_LOCAL_ACTION,
    WORKER,
    cohort_key,
)

app = ClientApp()


# helpers ---------------------------------------------------------------------------------


def _setup(msg: Message, context: Context) -> tuple[ExperimentConfig, int]:
    """The experiment config sent by the server and the partition the message is for."""
    config = ExperimentConfig.from_run_config(dict(msg.content.config_records[EXPERIMENT]))
    held, num_partitions = _held(context)
    if num_partitions != config.num_clients:
        raise ValueError(
            f"this node has num-partitions={num_partitions} but the experiment has "
            f"num_clients={config.num_clients}; start the federation with that many partitions"
        )
    return config, _addressed(msg, held)


def _held(context: Context) -> tuple[range, int]:
    """The partitions this node holds and the federation's number of partitions."""
    node = context.node_config
    try:
        first, num_partitions = int(node[PARTITION_ID]), int(node[NUM_PARTITIONS])
    except KeyError:
        raise ValueError(
            "node_config lacks partition-id / num-partitions: start the SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<N>" (optionally partitions-held=<k>)'
        ) from None
    count = int(node.get(PARTITIONS_HELD, 1))
    if count < 1 or not 0 <= first <= first + count <= num_partitions:
        raise ValueError(
            f"node_config partition-id={first} partitions-held={count} num-partitions="
            f"{num_partitions}: a node holds partition-id .. partition-id + partitions-held - 1, "
            f"which must lie in 0..{num_partitions - 1}, with partitions-held >= 1"
        )
    return range(first, first + count), num_partitions


def _addressed(msg: Message, held: range) -> int:
    """The partition `msg` is for (ADDRESS; a one-partition node's own if it names none)."""
    address = msg.content.config_records.get(ADDRESS)
    if address is None and len(held) == 1:
        return held[0]
    partition_id = int(address[PARTITION_ID]) if address is not None else None
    if partition_id not in held:
        raise ValueError(f"a message for partition {partition_id} reached a node holding "
                         f"partitions {held.start}..{held.stop - 1}")
    return partition_id


def _arrays(record: ArrayRecord | None) -> dict | None:
    """An ArrayRecord's arrays as NumPy, by name (what a request carries)."""
    return None if record is None else {k: record[k].numpy() for k in record.keys()}


def _record(arrays: Mapping) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _request(msg: Message, context: Context, kind: str, partition_id: int) -> dict[str, Any]:
    """The plain-data request for `fedpara.worker.handle` (its layout is described there)."""
    request = {"kind": kind, "experiment": dict(msg.content.config_records[EXPERIMENT]),
               "partition": partition_id, "arrays": _arrays(msg.content.array_records[ARRAYS]),
               # the partition's personal arrays (the cohort engine runs FedAvg: none)
               "local": None if kind == "cohort" else _arrays(
                   context.state.array_records.get(cohort_key(LOCAL, partition_id)))}
    if kind == "cohort":
        request["partitions"] = [int(p) for p in msg.content.config_records[ROUND][COHORT]]
    if kind != "evaluate":
        round_config = msg.content.config_records[ROUND]
        request.update(server_round=int(round_config[SERVER_ROUND]), lr=float(round_config[LR]),
                       proximal_mu=float(round_config.get(PROXIMAL_MU, 0.0)))  # FedProx only
    return request


def _handle(request: dict[str, Any], context: Context) -> dict[str, Any]:
    """The request's reply: from the node's worker if its node config names one, else computed
    here (importing torch and the training path on first use)."""
    address = context.node_config.get(WORKER)
    if address is None:
        from fedpara.worker import handle

        return handle(request)
    from multiprocessing.connection import Client

    try:
        conn = Client(str(address), family="AF_UNIX")
    except OSError as err:
        raise RuntimeError(
            f"node config {WORKER}={address!r}: no fedpara worker answers there ({err}). Start "
            f"one on this machine first (python -m fedpara.worker --address {address}), or "
            f"start the SuperNode without {WORKER} to train in the ClientApp itself") from None
    with conn:
        conn.send(request)
        status, reply = conn.recv()
    if status != "ok":
        raise RuntimeError(f"the fedpara worker at {address} failed on this message:\n{reply}")
    return reply


# handlers --------------------------------------------------------------------------------


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this client's partition (or, for engine="cohort", on every partition the
    message names, together); reply with the global keys' arrays."""
    _, partition_id = _setup(msg, context)
    if COHORT in msg.content.config_records[ROUND]:
        records = {}
        reply = _handle(_request(msg, context, "cohort", partition_id), context)
        for p, arrays, metrics in reply["clients"]:
            records[cohort_key(ARRAYS, p)] = _record(arrays)
            records[cohort_key(METRICS, p)] = MetricRecord(metrics)
        return Message(content=RecordDict(records), reply_to=msg)
    reply = _handle(_request(msg, context, "train", partition_id), context)
    if reply["local"] is not None:  # keep the personal part, send the global part
        context.state[cohort_key(LOCAL, partition_id)] = _record(reply["local"])
    return Message(content=RecordDict({ARRAYS: _record(reply["arrays"]),
                                       METRICS: MetricRecord(reply["metrics"])}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this client's model (global + personal parts) on its own held-out data."""
    _, partition_id = _setup(msg, context)
    reply = _handle(_request(msg, context, "evaluate", partition_id), context)
    return Message(content=RecordDict({METRICS: MetricRecord(reply["metrics"])}), reply_to=msg)


@app.query(PARTITION_ACTION)
def query_partition(msg: Message, context: Context) -> Message:
    """Tell the server which partitions this node holds (node ids are random, partitions not)."""
    held, num_partitions = _held(context)
    metrics = MetricRecord({PARTITION_ID: held.start, PARTITIONS_HELD: len(held),
                            NUM_PARTITIONS: num_partitions})
    return Message(content=RecordDict({METRICS: metrics}), reply_to=msg)


@app.query(GET_LOCAL_ACTION)
def query_get_local(msg: Message, context: Context) -> Message:
    """Hand a client's personal arrays to the server's checkpoint (not FL traffic)."""
    partition_id = _addressed(msg, _held(context)[0])
    local = context.state.array_records.get(cohort_key(LOCAL, partition_id), ArrayRecord())
    return Message(content=RecordDict({LOCAL: local,
                                       METRICS: MetricRecord({PARTITION_ID: partition_id})}),
                   reply_to=msg)


@app.query(SET_LOCAL_ACTION)
def query_set_local(msg: Message, context: Context) -> Message:
    """Restore a client's personal arrays from a checkpoint (resume)."""
    partition_id = _addressed(msg, _held(context)[0])
    context.state[cohort_key(LOCAL, partition_id)] = msg.content.array_records[LOCAL]
    return Message(content=RecordDict({METRICS: MetricRecord({PARTITION_ID: partition_id})}),
                   reply_to=msg)
