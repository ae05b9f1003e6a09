"""The Flower ClientApp: one client's local training and evaluation (Message API, flwr 1.42).

Run through `fedpara.run_experiment` (simulation) or `flwr run .` (simulation or deployment).
Each node reads which partition it holds from its node config (`partition-id`,
`num-partitions`): the simulation sets them, a real SuperNode gets them from
`--node-config "partition-id=0 num-partitions=2"`.

A client keeps its personal part (FedPer's head; for pFedPara everything but the W1 factors,
that is the W2 factors, the biases and any norm; the whole model for local-only training) in `context.state`, which Flower keeps per node for the length of a run;
only the global keys travel. The record keys and query names are `fedpara.messages`'.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpara import task
from fedpara.cohort import train_cohort
from fedpara.config import ExperimentConfig
from fedpara.messages import (
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
    PROXIMAL_MU,
    ROUND,
    SERVER_ROUND,
    SET_LOCAL_ACTION,
    TRAIN_LOSS,
    cohort_key,
)
from fedpara.transport import decode, encode

app = ClientApp()


# helpers ---------------------------------------------------------------------------------


def _setup(msg: Message, context: Context) -> tuple[ExperimentConfig, int]:
    """The experiment config sent by the server and this node's partition id."""
    config = ExperimentConfig.from_run_config(dict(msg.content.config_records[EXPERIMENT]))
    partition_id, num_partitions = _partition(context)
    if num_partitions != config.num_clients:
        raise ValueError(
            f"this node has num-partitions={num_partitions} but the experiment has "
            f"num_clients={config.num_clients}; start the federation with that many nodes"
        )
    return config, partition_id


def _partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config[PARTITION_ID]), int(context.node_config[NUM_PARTITIONS])
    except KeyError:
        raise ValueError(
            "node_config lacks partition-id / num-partitions: start the SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<N>"'
        ) from None


def _client_model(config: ExperimentConfig, msg: Message, context: Context):
    """The initial model, overwritten by the global arrays sent and the personal ones kept."""
    model = task.init_model(config)
    sent = msg.content.array_records[ARRAYS].to_torch_state_dict()
    task.set_arrays(model, decode(sent, config.transport))
    if LOCAL in context.state.array_records:
        task.set_arrays(model, context.state.array_records[LOCAL].to_torch_state_dict())
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
    model = _client_model(config, msg, context).to(device)
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
        context.state[LOCAL] = ArrayRecord(task.get_arrays(model, local_keys))
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
    arrays = ArrayRecord(encode(task.get_arrays(model, global_keys), config.transport))
    return arrays, metrics


def _train_cohort(msg: Message, config: ExperimentConfig, partitions: list[int],
                  server_round: int, lr: float, proximal_mu: float) -> Message:
    """engine="cohort": the round's partitions trained together from the same global arrays
    (cohort.train_cohort), each with the data and seed it would have alone; one reply holding
    each partition's arrays and metrics under `cohort_key`."""
    device = task.resolve_device(config.device)
    sent = decode(msg.content.array_records[ARRAYS].to_torch_state_dict(), config.transport)
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
    model = _client_model(config, msg, context)
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
    """Tell the server which partition this node holds (node ids are random, partitions not)."""
    partition_id, num_partitions = _partition(context)
    metrics = MetricRecord({PARTITION_ID: partition_id, NUM_PARTITIONS: num_partitions})
    return Message(content=RecordDict({METRICS: metrics}), reply_to=msg)


@app.query(GET_LOCAL_ACTION)
def query_get_local(msg: Message, context: Context) -> Message:
    """Hand this client's personal arrays to the server's checkpoint (not FL traffic)."""
    local = context.state.array_records.get(LOCAL, ArrayRecord())
    return Message(content=RecordDict({LOCAL: local}), reply_to=msg)


@app.query(SET_LOCAL_ACTION)
def query_set_local(msg: Message, context: Context) -> Message:
    """Restore this client's personal arrays from a checkpoint (resume)."""
    context.state[LOCAL] = msg.content.array_records[LOCAL]
    partition_id, _ = _partition(context)
    return Message(content=RecordDict({METRICS: MetricRecord({PARTITION_ID: partition_id})}),
                   reply_to=msg)
