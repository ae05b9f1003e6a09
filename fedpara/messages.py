"""What the ServerApp and the ClientApp say to each other: record keys, metric names, queries.

    from fedpara.messages import ARRAYS, METRICS, NUM_EXAMPLES

Both apps import these names from here, so a key is spelled once. Plain strings: this module
imports nothing (Flower's `MessageType.QUERY` is the string "query").

A training message holds EXPERIMENT, ROUND and ARRAYS; its reply ARRAYS and METRICS
(NUM_EXAMPLES, TRAIN_LOSS, PARTITION_ID, CHANGE, and with client evaluation OWN_CORRECT and
OWN_EXAMPLES). With engine="cohort" one training message carries ROUND[COHORT], the round's
partitions, and its reply one "arrays.<p>" and one "metrics.<p>" record per partition
(`cohort_key`). An evaluation message holds EXPERIMENT and ARRAYS; its reply METRICS
(NUM_EXAMPLES, LOSS, CORRECT, PARTITION_ID). Every message the server sends to a partition
also holds ADDRESS[PARTITION_ID]: a SuperNode may hold several partitions (node config
"partition-id=<first> partitions-held=<count>"), and the message says which one it is for.
"""

from __future__ import annotations

# record keys
ARRAYS = "arrays"  # ArrayRecord: the global keys' arrays, server <-> client
LOCAL = "local"  # ArrayRecord: a client's personal arrays (context.state; checkpoints only)
EXPERIMENT = "experiment"  # ConfigRecord: the ExperimentConfig as Flower run config
ROUND = "round"  # ConfigRecord: SERVER_ROUND, LR and what the strategy adds (PROXIMAL_MU)
METRICS = "metrics"  # MetricRecord of a reply
ADDRESS = "address"  # ConfigRecord: the PARTITION_ID a message is for

# ROUND's entries
SERVER_ROUND = "server-round"
LR = "lr"
COHORT = "cohort"  # engine="cohort": the partitions one node trains together (a list of ints)
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx.configure_train (its key); absent otherwise


def cohort_key(record: str, partition_id: int) -> str:
    """A record key for one partition: a cohort reply's "arrays.3" and "metrics.3", and the
    personal arrays a node keeps for partition 3 in its state, "local.3"."""
    return f"{record}.{partition_id}"


# METRICS' entries
NUM_EXAMPLES = "num-examples"  # training examples (weights the average) or held-out examples
PARTITION_ID = "partition-id"  # also the node-config key a SuperNode is started with
NUM_PARTITIONS = "num-partitions"  # also a node-config key
PARTITIONS_HELD = "partitions-held"  # also an optional node-config key (default 1): a node
# holds partitions partition-id, ..., partition-id + partitions-held - 1
WORKER = "worker"  # an optional node-config key: the socket of the node's fedpara.worker
TRAIN_LOSS = "train-loss"
CHANGE = "relative-change"  # per tracked parameter: how far local training moved it
OWN_CORRECT = "own-correct"  # client evaluation: held-out hits right after local training
OWN_EXAMPLES = "own-examples"
LOSS = "loss"  # evaluation: mean held-out loss
CORRECT = "correct"  # evaluation: held-out hits

# queries: the ClientApp registers `@app.query(action)`, the ServerApp sends "query.<action>"
PARTITION_ACTION = "partition"  # which partition does this node hold?
GET_LOCAL_ACTION = "get_local"  # hand the personal arrays to a checkpoint
SET_LOCAL_ACTION = "set_local"  # restore them from a checkpoint
QUERY_PARTITION = f"query.{PARTITION_ACTION}"
QUERY_GET_LOCAL = f"query.{GET_LOCAL_ACTION}"
QUERY_SET_LOCAL = f"query.{SET_LOCAL_ACTION}"
