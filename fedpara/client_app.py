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
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpara import task
from fedpara.cohort import train_cohort
from fedpara.config import ExperimentConfig
from fedpara.messages import (
    ADDRESS,
    ARRAYS,
    CHANGE,
    COHORT,
    CORRECT,
    EXPERIMENT,
    GET_LOCAL_ACTION,
    LOCAL,
    LOSS,
    LR,
    METRICS,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    OWN_CORRECT,
    OWN_EXAMPLES,
    PARTITION_ACTION,
    PARTITION_ID,
    PARTITIONS_HELD,
    PROXIMAL_MU,
    ROUND,
    SERVER_ROUND,
    SET_LOCAL_ACTION,
    TRAIN_LOSS,
    cohort_key,
)
from fedpara.transport import from_wire, to_wire

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


def _client_model(config: ExperimentConfig, msg: Message, context: Context, partition_id: int):
    """The initial model, overwritten by the global arrays sent and the personal ones kept."""
    model = task.init_model(config)
    sent = msg.content.array_records[ARRAYS].to_torch_state_dict()
    task.set_arrays(model, from_wire(sent, config.transport))
    local = context.state.array_records.get(cohort_key(LOCAL, partition_id))
    if local is not None:
        task.set_arrays(model, local.to_torch_state_dict())
    return model


# handlers --------------------------------------------------------------------------------


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this client's partition (or, for engine="cohort", on every partition the
    message names, together); reply with the global keys' arrays."""
    config, partition_id = _setup(msg, context)
    round_config = msg.content.config_records[ROUND]
    server_round, lr = int(round_config[SERVER_ROUND]), float(round_config[LR])
    proximal_mu = float(round_config.get(PROXIMAL_MU, 0.0))  # FedProx only
    if COHORT in round_config:
        return _train_cohort(msg, config, [int(p) for p in round_config[COHORT]],
                             server_round, lr, proximal_mu)

    # 1. the model: global arrays from the server, personal ones from the last round
    device = task.resolve_device(config.device)
    model = _client_model(config, msg, context, partition_id).to(device)
    before = task.snapshot(model)  # on the device: the changes cost one sync per client
    # 2. train locally; every random draw is seeded by (seed, round, client). FedProx pulls
    # the arrays that came from the server (the global keys) towards where they started.
    global_keys, local_keys = task.split_keys(model, config.algorithm)
    seed = task.client_seed(config.seed, server_round, partition_id)
    data = task.client_data(config, partition_id, seed=seed)
    result = task.train(model, data.train, epochs=config.local_epochs, lr=lr, device=device,
                        seed=seed, lr_scale=task.lr_scales(model, config),
                        proximal_mu=proximal_mu, proximal_to=global_keys)
    # 3. keep the personal part, send the global part
    if local_keys:
        context.state[cohort_key(LOCAL, partition_id)] = ArrayRecord(
            task.get_arrays(model, local_keys))
    arrays, metrics = _reply_records(config, model, before, result, data, partition_id,
                                     global_keys, device)
    return Message(content=RecordDict({ARRAYS: arrays, METRICS: metrics}), reply_to=msg)


def _reply_records(config: ExperimentConfig, model, before, result: task.TrainResult,
                   data: task.ClientData, partition_id: int, global_keys: list[str], device
                   ) -> tuple[ArrayRecord, MetricRecord]:
    """One trained client's reply: its global arrays (in the transport format) and metrics."""
    metrics = MetricRecord(
        {NUM_EXAMPLES: result.num_examples, TRAIN_LOSS: result.loss, PARTITION_ID: partition_id,
         # how far training moved each parameter (task.tracked_parameters order)
         CHANGE: task.relative_changes(before, model)}
    )
    if config.evaluation == "clients":  # the model right after local training, on own data
        own = task.evaluate(model, data.holdout, device=device)
        metrics[OWN_CORRECT], metrics[OWN_EXAMPLES] = own.correct, own.num_examples
    arrays = ArrayRecord(to_wire(task.get_arrays(model, global_keys), config.transport))
    return arrays, metrics


def _train_cohort(msg: Message, config: ExperimentConfig, partitions: list[int],
                  server_round: int, lr: float, proximal_mu: float) -> Message:
    """engine="cohort": the round's partitions trained together from the same global arrays
    (cohort.train_cohort), each with the data and seed it would have alone; one reply holding
    each partition's arrays and metrics under `cohort_key`. The partitions need not be this
    node's own (it loads the whole dataset, and FedAvg's clients keep no state): the engine
    emulates many clients on one machine, it does not keep data with separate owners."""
    device = task.resolve_device(config.device)
    sent = from_wire(msg.content.array_records[ARRAYS].to_torch_state_dict(), config.transport)
    models, before, data = [], [], []
    for p in partitions:
        model = task.init_model(config)
        task.set_arrays(model, sent)
        models.append(model.to(device))
        before.append(task.snapshot(model))
        data.append(task.client_data(config, p, seed=task.client_seed(config.seed,
                                                                      server_round, p)))
    global_keys, _ = task.split_keys(models[0], config.algorithm)
    results = train_cohort(models, [d.train for d in data], epochs=config.local_epochs, lr=lr,
                           device=device, lr_scale=task.lr_scales(models[0], config),
                           proximal_mu=proximal_mu, proximal_to=global_keys,
                           seeds=[task.client_seed(config.seed, server_round, p)
                                  for p in partitions])
    records = {}
    for p, model, old, result, d in zip(partitions, models, before, results, data, strict=True):
        arrays, metrics = _reply_records(config, model, old, result, d, p, global_keys, device)
        records[cohort_key(ARRAYS, p)], records[cohort_key(METRICS, p)] = arrays, metrics
    return Message(content=RecordDict(records), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this client's model (global + personal parts) on its own held-out data."""
    config, partition_id = _setup(msg, context)
    model = _client_model(config, msg, context, partition_id)
    data = task.client_data(config, partition_id)
    result = task.evaluate(model, data.holdout, device=task.resolve_device(config.device))
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: result.num_examples,
            LOSS: result.loss,
            CORRECT: result.correct,
            PARTITION_ID: partition_id,
        }
    )
    return Message(content=RecordDict({METRICS: metrics}), reply_to=msg)


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
