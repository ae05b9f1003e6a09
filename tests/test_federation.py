"""Federated training on Flower: config, history, local training, the apps and the simulation.

The simulations run on real Fashion-MNIST (the `fmnist_dir` fixture). Ray costs ~12 s and
~2 GiB per simulation, so three module-scoped runs serve all the assertions that need one:
a FedAvg run of a FedPara MLP (the smoke run, on the cohort engine), and a pFedPara run under
FedAvgM that is then interrupted and resumed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpara import task
from fedpara.accounting import payload_bytes
from fedpara.config import PRESETS, PROFILES, ExperimentConfig, get_preset, parse_overrides
from fedpara.history import History, RoundRecord

ROUNDS_COMPARED = ("round", "accuracy", "loss", "bytes_up", "bytes_down", "cum_bytes",
                   "train_loss", "clients", "eval_examples", "eval_clients", "untrained_clients",
                   "eval_bytes_down")


def smoke_config(data_dir, **changes) -> ExperimentConfig:
    """4 clients, 2 rounds, a FedPara MLP with FedAvg, on real Fashion-MNIST."""
    values = dict(dataset="fashion-mnist", model="mlp", parameterization="fedpara", gamma=0.1,
                  algorithm="fedavg", num_clients=4, clients_per_round=2, rounds=2,
                  partition="iid", lr=0.1, batch_size=32, device="cpu", data_dir=str(data_dir),
                  client_samples=3000, preset="test", profile="smoke")
    values.update(changes)
    return ExperimentConfig(**values)


# config ------------------------------------------------------------------------------------


def test_every_preset_variant_and_profile_is_a_valid_config():
    for name, preset in PRESETS.items():
        for variant in preset.variants:
            configs = {p: get_preset(name, variant=variant, profile=p) for p in PROFILES}
            assert configs["smoke"].rounds <= configs["quick"].rounds <= configs["full"].rounds
            assert all(c.preset == name and c.variant == variant for c in configs.values())


def test_presets_follow_the_papers_protocol():
    c10 = get_preset("cifar10-noniid", variant="fedpara")
    assert (c10.num_clients, c10.clients_per_round, c10.rounds, c10.gamma) == (100, 16, 200, 0.1)
    assert (c10.partition, c10.alpha, c10.batch_size, c10.lr, c10.lr_decay) == (
        "dirichlet", 0.5, 64, 0.1, 0.992)
    c100 = get_preset("cifar100-iid", variant="fedpara")
    assert (c100.num_clients, c100.clients_per_round, c100.rounds, c100.gamma) == (50, 8, 400, 0.4)
    # E = 10 local epochs for the IID splits, E = 5 for the non-IID ones
    assert (c100.local_epochs, c10.local_epochs) == (10, 5)
    assert (get_preset("cifar10-iid").local_epochs, get_preset("cifar100-noniid").local_epochs) == (
        10, 5)
    personal = get_preset("fmnist-personal", variant="pfedpara")
    assert (personal.algorithm, personal.partition, personal.shards_per_client) == (
        "pfedpara", "shard", 2)
    assert personal.evaluation == "clients"


@pytest.mark.parametrize("changes, field", [
    (dict(model="resnet"), "model"),
    (dict(dataset="imagenet"), "dataset"),
    (dict(algorithm="fedprox"), "algorithm"),
    (dict(partition="random"), "partition"),
    (dict(clients_per_round=5), "clients_per_round"),
    (dict(gamma=0.0), "gamma"),
    (dict(gamma=1.5), "gamma"),
    (dict(lr_decay=0.0), "lr_decay"),
    (dict(algorithm="pfedpara", parameterization="original", evaluation="clients"),
     "parameterization"),
    (dict(algorithm="fedper"), "evaluation"),
    (dict(device="gpu"), "device"),
    (dict(nonlinear=True, parameterization="lowrank"), "nonlinear"),
    (dict(rounds=0), "rounds"),
    (dict(checkpoint_every=0), "checkpoint_every"),  # rounds % 0 would end the run mid-way
    (dict(color="red"), "color"),
    (dict(algorithm="pfedpara", evaluation="clients", personal_split="diagonal"),
     "personal_split"),
    (dict(algorithm="pfedpara", evaluation="clients", local_lr_scale=0.0), "local_lr_scale"),
    (dict(algorithm="pfedpara", evaluation="clients", local_lr_scale=-2.0), "local_lr_scale"),
    (dict(algorithm="pfedpara", evaluation="clients", local_lr_scale=float("nan")),
     "local_lr_scale"),
    (dict(personal_split="product"), "personal_split"),
    (dict(algorithm="fedper", evaluation="clients", local_lr_scale=10.0), "local_lr_scale"),
    # NaN passes every comparison and inf trains to NaN: both are refused by name
    (dict(lr=float("nan")), "lr"),
    (dict(lr=float("inf")), "lr"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(alpha=float("inf")), "alpha"),
    (dict(client_num_cpus=float("nan")), "client_num_cpus"),
    (dict(client_num_gpus=float("inf")), "client_num_gpus"),
    (dict(seed=2**63), "seed"),  # a Flower run config holds signed 64-bit integers
    (dict(round_timeout=-1.0), "round_timeout=-1.0 must be a finite number of seconds >= 0"),
    (dict(round_timeout=float("inf")), "round_timeout"),  # a TTL Flower could not store
    (dict(partition="natural"), "partition='natural'.*iid, dirichlet, shard"),  # no writers
    (dict(dataset="cifar10", model="mlp", partition="natural"), "partition"),
    (dict(dataset="mnist", model="vgg16"), "model='vgg16' needs 32×32.*cifar10, cifar100"),
])
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        ExperimentConfig(num_clients=4).replace(**changes)


def test_a_config_built_by_hand_gets_its_fields_types():
    """As from_dict and replace: "false" is False (bool("false") would be True), a Path a
    string; a value that is not of its field's type is refused by name."""
    config = ExperimentConfig(nonlinear="false", parameterization="fedpara", rounds="5",
                              lr=1, data_dir=Path("data"))
    assert (config.nonlinear, config.rounds, config.lr, config.data_dir) == (False, 5, 1.0, "data")
    assert type(config.lr) is float
    for bad, message in [({"rounds": 2.5}, "rounds=2.5 is not a valid int"),
                         ({"rounds": True}, "rounds=True is not a valid int"),
                         ({"nonlinear": "no"}, "nonlinear='no' is not a valid bool")]:
        with pytest.raises(ValueError, match=message):
            ExperimentConfig(**bad)


def test_an_override_the_run_never_reads_is_refused():
    """It would only give the same computation another name (run_name adds +field=value)."""
    with pytest.raises(ValueError, match="gamma=0.5 has no effect with "
                                         "parameterization='original'.*preset's 0.1"):
        get_preset("fmnist-noniid", variant="original", gamma=0.5)
    with pytest.raises(ValueError, match="alpha=0.1 has no effect with partition='iid'"):
        get_preset("fmnist-noniid", partition="iid", alpha=0.1)
    with pytest.raises(ValueError, match="shards_per_client=3 has no effect with "
                                         "partition='dirichlet'"):
        get_preset("fmnist-noniid", shards_per_client=3)
    # where the run reads them, or left at the preset's value, they are accepted
    assert get_preset("fmnist-noniid", variant="fedpara", gamma=0.5).gamma == 0.5
    assert get_preset("fmnist-noniid", variant="original", gamma=0.1).run_name == (
        get_preset("fmnist-noniid", variant="original").run_name)
    assert get_preset("fmnist-noniid", partition="dirichlet", alpha=0.1).alpha == 0.1
    assert get_preset("fmnist-personal", shards_per_client=3).shards_per_client == 3


def test_resources_this_machine_lacks_are_refused_before_ray_starts():
    """Ray would wait for ever for a client it cannot place."""
    from fedpara.experiment import check_machine

    from ray._private.utils import get_num_cpus

    cpus = int(get_num_cpus())  # what Ray offers (not this process's affinity)
    config = get_preset("fmnist-noniid", profile="smoke", device="cpu")
    check_machine(config.replace(client_num_cpus=cpus))
    with pytest.raises(ValueError, match=f"client_num_cpus={cpus + 1} is more than this "
                                         f"machine's {cpus} CPUs.*allowed: up to {cpus}"):
        check_machine(config.replace(client_num_cpus=cpus + 1))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"client_num_gpus={gpus + 1} .*this machine has {gpus}"):
        check_machine(config.replace(client_num_gpus=gpus + 1))


def test_every_client_may_train_each_round():
    assert ExperimentConfig(num_clients=3, clients_per_round=3).clients_per_round == 3


def test_bad_preset_names_list_the_allowed_ones():
    with pytest.raises(ValueError, match="fmnist-noniid"):
        get_preset("mnist-noniid")
    with pytest.raises(ValueError, match="original, lowrank|fedpara, lowrank"):
        get_preset("cifar10-iid", variant="pfedpara")
    with pytest.raises(ValueError, match="smoke"):
        get_preset("cifar10-iid", profile="tiny")


def test_run_config_round_trip_uses_kebab_case():
    config = get_preset("femnist-personal", variant="fedper", profile="quick", seed=3)
    run_config = config.to_run_config()
    assert "clients-per-round" in run_config and "clients_per_round" not in run_config
    assert all(isinstance(v, (bool, int, float, str)) for v in run_config.values())
    assert ExperimentConfig.from_run_config(run_config) == config
    # TOML has no int/float distinction for whole numbers: values are cast to the field's type
    assert ExperimentConfig.from_run_config({**run_config, "gamma": 1, "rounds": 7.0}).gamma == 1.0


def test_command_line_overrides_are_typed():
    assert parse_overrides(["rounds=5", "lr=0.05", "fast-batches=false", "device=cpu"]) == {
        "rounds": 5, "lr": 0.05, "fast_batches": False, "device": "cpu"}
    assert parse_overrides(["nonlinear=1", "fast-batches=0"]) == {
        "nonlinear": True, "fast_batches": False}
    with pytest.raises(ValueError, match="rounds"):
        parse_overrides(["rounds=five"])
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["rounds"])


def test_replace_casts_as_the_run_config_does():
    """Server and clients must build the same config: `replace` casts like `from_run_config`
    (before, nonlinear="false" stayed a truthy string on the server and False on the clients)."""
    config = get_preset("fmnist-noniid", variant="fedpara", profile="smoke")
    changed = config.replace(nonlinear="false", gamma="0.2", rounds=3.0)
    assert (changed.nonlinear, changed.gamma, changed.rounds) == (False, 0.2, 3)
    assert ExperimentConfig.from_run_config(changed.to_run_config()) == changed
    for bad, message in [({"rounds": 2.5}, "expected an integer"),
                         ({"rounds": True}, "expected an integer"),
                         ({"gamma": True}, "expected a number"),
                         ({"gamma": "x"}, "expected a number"),
                         ({"nonlinear": 2}, "allowed: true, false, 1, 0"),
                         ({"device": 0}, "expected a string")]:
        (key,) = bad
        with pytest.raises(ValueError, match=f"{key}=.*{message}"):
            config.replace(**bad)
        with pytest.raises(ValueError, match=message):
            ExperimentConfig.from_run_config({key.replace("_", "-"): bad[key]})
    assert config.replace(data_dir=Path("/data")).data_dir == "/data"  # a path is a string
    with pytest.raises(ValueError, match="profile: not a field to override"):
        parse_overrides(["profile=quick"])
    with pytest.raises(ValueError, match="preset: not a field to override"):
        get_preset("fmnist-noniid", preset="mine")  # silently kept "fmnist-noniid" before


def test_learning_rate_decays_per_round_and_is_never_zero():
    config = ExperimentConfig(lr=0.1, lr_decay=0.992)
    assert config.round_lr(1) == 0.1
    assert config.round_lr(3) == pytest.approx(0.1 * 0.992**2)
    # the Flower baseline's FedPer used decay 0, so its lr was 0 from round 2
    with pytest.raises(ValueError, match="lr_decay"):
        config.replace(lr_decay=0.0)


# history -----------------------------------------------------------------------------------


def _record(r: int, cum: int) -> RoundRecord:
    return RoundRecord(round=r, accuracy=0.5 + r / 10, loss=1.0 / r, bytes_up=10, bytes_down=10,
                       cum_bytes=cum, wall_seconds=1.5, train_loss=0.9, clients=[0, 1],
                       accuracy_after_training=0.9, client_accuracy_after_training=[0.8, 1.0],
                       parameter_change={"head.x1": 0.01, "head.x2": 0.002})


def test_the_progress_bar_counts_rounds_and_a_resumed_run_starts_at_its_checkpoint():
    import io

    from tqdm import tqdm

    from fedpara.experiment import _show_round

    fresh, resumed = (tqdm(total=5, file=io.StringIO()) for _ in range(2))
    _show_round(fresh, _record(1, 20))
    _show_round(fresh, _record(2, 3 * 2**30))
    assert fresh.n == 2 and fresh.postfix == "GiB=3.0000, acc=0.7000"  # tqdm sorts keys
    _show_round(resumed, _record(4, 20))  # the checkpoint held rounds 1-3
    _show_round(resumed, _record(5, 40))
    assert resumed.n == 5


def test_history_saves_atomically_and_loads_back(tmp_path):
    config = get_preset("fmnist-noniid", variant="lowrank", profile="smoke")
    history = History(config=config.to_dict(), hardware={"device": "cpu"})
    history.append(_record(1, 20))
    history.append(_record(2, 40))
    path = history.save(History.default_path(config, tmp_path))
    assert path == tmp_path / "fmnist-noniid" / "lowrank-smoke.json"
    assert [p.name for p in path.parent.iterdir()] == ["lowrank-smoke.json"]  # no temp file left
    loaded = History.load(path)
    assert loaded.records == history.records and loaded.config == config.to_dict()
    assert loaded.hardware == {"device": "cpu"} and loaded.created == history.created
    assert loaded.column("accuracy") == [0.6, 0.7]
    assert loaded.cumulative_gib() == [20 / 2**30, 40 / 2**30]
    with pytest.raises(ValueError, match="round"):
        history.append(_record(4, 60))
    # a round where nothing was scored (NaN) is stored as JSON null and read back as NaN,
    # also inside a list of per-client scores
    history.records[0].accuracy = float("nan")
    history.records[0].client_accuracy_after_training = [float("nan"), 1.0]
    assert "NaN" not in history.save(path).read_text()
    again = History.load(path).records[0]
    assert math.isnan(again.accuracy) and math.isnan(again.client_accuracy_after_training[0])
    assert math.isnan(History.load(path).records[0].accuracy)


# local training without Flower ------------------------------------------------------------


def test_arrays_round_trip_through_the_global_keys(fmnist_dir):
    config = smoke_config(fmnist_dir, algorithm="pfedpara", evaluation="clients", gamma=0.5)
    model = task.init_model(config)
    global_keys, local_keys = task.split_keys(model, "pfedpara")
    assert local_keys and set(global_keys).isdisjoint(local_keys)
    other = task.init_model(config.replace(seed=1))
    task.set_arrays(other, task.get_arrays(model, global_keys))
    for key in global_keys:
        assert torch.equal(other.state_dict()[key], model.state_dict()[key])
    assert not torch.equal(other.state_dict()[local_keys[0]], model.state_dict()[local_keys[0]])
    with pytest.raises(ValueError, match="lacks"):
        task.set_arrays(other, {"no.such.key": torch.zeros(1)})


def test_local_training_learns_and_counts_examples_not_batches(fmnist_dir):
    config = smoke_config(fmnist_dir, client_samples=1000)
    model = task.init_model(config)
    data = task.client_data(config, 0, seed=0)
    before = task.evaluate(model, data.holdout)
    result = task.train(model, data.train, epochs=1, lr=0.1, seed=0)
    after = task.evaluate(model, data.holdout)
    assert result.num_examples == data.num_train == 1000  # examples, not 32 batches (defect 5)
    assert after.num_examples == data.num_holdout > 0
    assert after.loss < before.loss and after.accuracy > 0.35  # chance: 0.1
    # the loss is per example: the mean of per-batch sums, whatever the batch size
    x, y = next(iter(data.holdout))
    per_example = torch.nn.functional.cross_entropy(model(x), y).item()
    assert task.evaluate(model, [(x, y)]).loss == pytest.approx(per_example, rel=1e-5)


def test_fast_batches_and_dataloader_serve_the_same_client(fmnist_dir):
    config = smoke_config(fmnist_dir, client_samples=200)
    fast = task.client_data(config, 1, seed=0)
    plain = task.client_data(config.replace(fast_batches=False), 1, seed=0)
    assert fast.num_train == plain.num_train == 200
    xf = torch.cat([x for x, _ in fast.holdout])
    xp = torch.cat([x for x, _ in plain.holdout])
    assert torch.allclose(xf, xp)


def test_local_training_imports_without_flower():
    """A machine with torch but no flwr trains too: task.py must not need Flower."""
    code = ("import sys; sys.modules['flwr'] = None; sys.modules['ray'] = None; "
            "import fedpara.task, fedpara.history, fedpara.config, fedpara.checkpoints, "
            "fedpara.messages")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# the apps, called in-process (no Ray) -------------------------------------------------------


@pytest.fixture
def call_client(monkeypatch):
    """Call the ClientApp on one message, as a SuperNode would, without Ray."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpara import client_app
    from fedpara.messages import ARRAYS, EXPERIMENT, ROUND

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what a run sets before messages exist
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)

    def call(config, message_type, arrays, *, partition_id=0, state=None, server_round=1,
             proximal_mu=None):
        told = {"server-round": server_round, "lr": 0.05}
        if proximal_mu is not None:  # what Flower's FedProx adds to the round's config
            told["proximal-mu"] = proximal_mu
        records = {EXPERIMENT: ConfigRecord(config.to_run_config()),
                   ARRAYS: ArrayRecord(arrays),
                   ROUND: ConfigRecord(told)}
        message = Message(content=RecordDict(records), dst_node_id=7, message_type=message_type)
        context = Context(run_id=1, node_id=7, state=state if state is not None else RecordDict(),
                          node_config={"partition-id": partition_id,
                                       "num-partitions": config.num_clients}, run_config={})
        reply = client_app.app(message, context)
        assert not reply.has_error(), reply.error.reason
        return reply.content, context

    return call


@pytest.mark.parametrize("algorithm, parameterization, kept", [
    ("fedper", "original", ["head.weight", "head.bias"]),
    ("pfedpara", "fedpara", None),  # the W2 factors of every layer
])
def test_personalized_client_sends_only_the_global_part(
        fmnist_dir, call_client, algorithm, parameterization, kept):
    from fedpara.messages import ARRAYS, LOCAL, cohort_key
    from fedpara.server_app import array_bytes
    from fedpara.transport import unpack

    config = smoke_config(fmnist_dir, algorithm=algorithm, parameterization=parameterization,
                          gamma=0.5, evaluation="clients", client_samples=200)
    model = task.init_model(config)
    global_keys, local_keys = task.split_keys(model, algorithm)
    content, context = call_client(config, "train", task.get_arrays(model, global_keys))
    assert len(content[ARRAYS]) == 1  # packed: one flat float32 array (fedpara.transport)
    assert list(unpack(content[ARRAYS].to_torch_state_dict())) == global_keys
    assert array_bytes(content) == payload_bytes(model, algorithm) < payload_bytes(model)
    assert list(context.state[cohort_key(LOCAL, 0)].keys()) == local_keys
    if kept is not None:
        assert local_keys == kept
    else:  # pFedPara keeps the second factor pair (W2) and the bias of every layer
        assert local_keys == [k for k in model.state_dict()
                              if k.rsplit(".", 1)[-1] in ("x2", "y2", "bias")]


def test_a_client_trains_as_task_train_with_its_seed_lr_scale_and_proximal_keys(
        fmnist_dir, call_client, one_thread):
    """pFedPara under FedProx: the client's seed for (seed, round, partition), its W2 factors
    at local_lr_scale times the rate, and FedProx pulling the global keys only (not the
    personal part it keeps)."""
    from fedpara.messages import LOCAL, METRICS, OWN_CORRECT, OWN_EXAMPLES, cohort_key

    config = smoke_config(fmnist_dir, algorithm="pfedpara", gamma=0.5, evaluation="clients",
                          client_samples=200, local_lr_scale=3.0, strategy="fedprox",
                          proximal_mu=1.0)
    model = task.init_model(config)
    global_keys, local_keys = task.split_keys(model, "pfedpara")
    content, context = call_client(config, "train", task.get_arrays(model, global_keys),
                                   partition_id=1, server_round=2, proximal_mu=1.0)
    seed = task.client_seed(config.seed, 2, 1)
    data = task.client_data(config, 1, seed=seed)
    task.train(model, data.train, epochs=config.local_epochs,
               lr=0.05, seed=seed, lr_scale=task.lr_scales(model, config), proximal_mu=1.0,
               proximal_to=global_keys)
    kept = context.state[cohort_key(LOCAL, 1)].to_torch_state_dict()
    assert list(kept) == local_keys
    for key in local_keys:
        torch.testing.assert_close(kept[key], model.state_dict()[key], msg=key)
    # its own score right after training: on its held-out data, not on what it trained on
    own = task.evaluate(model, data.holdout)
    metrics = content[METRICS]
    assert (metrics[OWN_CORRECT], metrics[OWN_EXAMPLES]) == (own.correct, data.num_holdout)
    assert data.num_holdout != data.num_train


def test_personal_state_persists_between_rounds(fmnist_dir, call_client):
    from fedpara.messages import ARRAYS, LOCAL, cohort_key

    config = smoke_config(fmnist_dir, algorithm="local", parameterization="original",
                          evaluation="clients", client_samples=300)
    model = task.init_model(config)
    content, context = call_client(config, "train", {})
    assert len(content[ARRAYS]) == 0  # local-only training sends nothing
    first = context.state[cohort_key(LOCAL, 0)].to_torch_state_dict()
    # the next round starts from the kept model, not from the initial one
    content, context = call_client(config, "evaluate", {}, state=context.state, server_round=2)
    task.set_arrays(model, first)
    expected = task.evaluate(model, task.client_data(config, 0).holdout)
    assert content["metrics"]["correct"] == expected.correct


def test_a_bfloat16_client_trains_on_the_rounded_model_and_replies_in_16_bits(
        fmnist_dir, call_client, one_thread):
    from fedpara.messages import ARRAYS
    from fedpara.server_app import array_bytes
    from fedpara.transport import decode, encode, from_wire

    config = smoke_config(fmnist_dir, client_samples=300)
    model = task.init_model(config)
    arrays = task.get_arrays(model, task.split_keys(model, "fedavg")[0])
    rounded = decode(encode(arrays, "bfloat16"), "bfloat16")
    half, _ = call_client(config.replace(transport="bfloat16"), "train",
                          encode(arrays, "bfloat16"))
    full, _ = call_client(config, "train", rounded)  # float32 wire, same rounded start
    assert array_bytes(half) * 2 == array_bytes(full) == payload_bytes(model)
    assert array_bytes(half) == payload_bytes(model, transport="bfloat16")
    got = from_wire(half[ARRAYS].to_torch_state_dict(), "bfloat16")
    expected = decode(encode(from_wire(full[ARRAYS].to_torch_state_dict(), "float32"),
                             "bfloat16"), "bfloat16")
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not all(torch.equal(got[k], rounded[k]) for k in expected)  # it did train


def test_the_server_averages_decoded_arrays_and_keeps_float32(fmnist_dir, call_client):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from fedpara.messages import ARRAYS, CHANGE, METRICS, NUM_EXAMPLES, PARTITION_ID
    from fedpara.server_app import FedParaStrategy, array_bytes
    from fedpara.transport import decode, encode

    config = smoke_config(fmnist_dir, transport="float16")
    strategy = FedParaStrategy(config)
    strategy.nodes = {p: p + 10 for p in range(config.num_clients)}
    model = task.init_model(config)
    global_arrays = task.get_arrays(model, task.split_keys(model, "fedavg")[0])
    messages = strategy.configure_train(1, ArrayRecord(global_arrays))
    sent = messages[0].content[ARRAYS].to_torch_state_dict()
    assert all(v.dtype == torch.float16 for v in sent.values())
    assert array_bytes(messages[0].content) == payload_bytes(global_arrays, transport="float16")

    torch.manual_seed(1)
    states = [{k: v + torch.randn_like(v) * 0.01 for k, v in global_arrays.items()}
              for _ in range(2)]
    examples = (300, 100)
    replies = [Message(content=RecordDict({
        ARRAYS: ArrayRecord(encode(state, "float16")),
        METRICS: MetricRecord({NUM_EXAMPLES: n, "train-loss": 1.0 + p, PARTITION_ID: p,
                               CHANGE: [0.1 * (p + 1), 0.5]})}),
        dst_node_id=p + 10, message_type="train")
        for p, (state, n) in enumerate(zip(states, examples, strict=True))]
    aggregated, fields = strategy.aggregate_train(1, replies)
    assert fields["train_loss"] == pytest.approx(0.75 * 1.0 + 0.25 * 2.0)
    assert fields["parameter_change"] == pytest.approx([0.15, 0.5])  # plain mean over clients
    assert "accuracy_after_training" not in fields  # server evaluation: no own scores
    mean = aggregated.to_torch_state_dict()
    decoded = [decode(encode(state, "float16"), "float16") for state in states]
    for key, value in mean.items():
        expected = (0.75 * decoded[0][key].double() + 0.25 * decoded[1][key].double()).float()
        assert value.dtype == torch.float32
        assert torch.equal(value, expected)  # Flower's FedAvg, handed float64: the float64 mean


# a long-lived worker (fedpara.worker) ----------------------------------------------------------


@pytest.fixture
def worker(tmp_path):
    """A real worker process on one torch thread, listening on a socket in tmp_path."""
    address = tmp_path / "worker.sock"
    proc = subprocess.Popen([sys.executable, "-m", "fedpara.worker", "--address", str(address),
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not address.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the worker did not start: {proc.communicate()[1][-3000:]}")
        time.sleep(0.1)
    yield address, proc
    proc.terminate()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "listening on" in out and not address.exists()  # it removed its socket


# A fresh process that sends a ClientApp the messages a spec (JSON) lists, as a SuperNode
# would, and stores what came back: the arrays of each reply and of the node's kept state
# (npz), the metrics, and whether the process imported torch (JSON on stdout).
CLIENT_CHILD = """
import json, sys
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedpara import client_app

TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0
spec = json.loads(open(sys.argv[1]).read())
arrays, metrics, state = {}, {}, RecordDict()
for n, step in enumerate(spec["steps"]):
    with np.load(step["sent"]) as z:
        sent = ArrayRecord({k: Array(z[k]) for k in z.files})
    content = RecordDict({"experiment": ConfigRecord(step["run_config"]), "arrays": sent,
                          "round": ConfigRecord(step["round"])})
    message = Message(content=content, dst_node_id=7, message_type=step["type"])
    context = Context(run_id=1, node_id=7, state=state, run_config={},
                      node_config={"partition-id": step["partition"],
                                   "num-partitions": step["num_partitions"], **spec["node"]})
    reply = client_app.app(message, context)
    assert not reply.has_error(), reply.error.reason
    for name, record in reply.content.array_records.items():
        arrays.update({f"{n}/{name}/{k}": record[k].numpy() for k in record.keys()})
    metrics.update({f"{n}/{name}": dict(r) for name, r in reply.content.metric_records.items()})
for name, record in state.array_records.items():
    arrays.update({f"state/{name}/{k}": record[k].numpy() for k in record.keys()})
np.savez(sys.argv[2], **arrays)
print(json.dumps({"metrics": metrics, "torch": "torch" in sys.modules}))
"""


def test_a_worker_answers_as_the_clientapp_itself(fmnist_dir, worker, tmp_path):
    """The same messages, answered in a fresh ClientApp process and by a worker: the same
    bits, and with the worker the ClientApp imports no torch. pFedPara with client evaluation
    (personal arrays kept between rounds), an evaluation message, and a cohort. (Both sides run
    in fresh one-thread processes: torch's CPU kernels can round differently in a process
    that has run at another thread count before.)"""
    address, _ = worker
    personal = smoke_config(fmnist_dir, algorithm="pfedpara", gamma=0.5, evaluation="clients",
                            client_samples=200)
    cohort = smoke_config(fmnist_dir, client_samples=200, engine="cohort")
    steps = []
    for config, kind, partition, told in (
            (personal, "train", 1, {"server-round": 1, "lr": 0.05}),
            (personal, "train", 1, {"server-round": 2, "lr": 0.05}),  # with the kept part
            (personal, "evaluate", 1, {}),
            (cohort, "train", 0, {"server-round": 1, "lr": 0.05, "cohort": [0, 3]})):
        model = task.init_model(config)
        sent = tmp_path / f"sent-{len(steps)}.npz"
        keys = task.split_keys(model, config.algorithm)[0]
        np.savez(sent, **{k: v.numpy() for k, v in task.get_arrays(model, keys).items()})
        steps.append({"run_config": config.to_run_config(), "type": kind, "round": told,
                      "partition": partition, "num_partitions": config.num_clients,
                      "sent": str(sent)})
    answers = {}
    for how, node in (("here", {}), ("worker", {"worker": str(address)})):
        spec = tmp_path / f"{how}.json"
        spec.write_text(json.dumps({"steps": steps, "node": node}))
        done = subprocess.run([sys.executable, "-c", CLIENT_CHILD, str(spec),
                               str(tmp_path / f"{how}.npz")], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        with np.load(tmp_path / f"{how}.npz") as z:
            answers[how] = (json.loads(done.stdout.splitlines()[-1]),
                            {k: z[k] for k in z.files})
    (here, here_arrays), (there, there_arrays) = answers["here"], answers["worker"]
    assert here["torch"] is True and there["torch"] is False
    assert here["metrics"] == there["metrics"]
    assert here_arrays.keys() == there_arrays.keys()
    for k in here_arrays:
        np.testing.assert_array_equal(here_arrays[k], there_arrays[k], err_msg=k)
    # what was compared: both trainings, the kept part, the evaluation, the cohort's two
    assert {k.split("/")[0] + "/" + k.split("/")[1] for k in here_arrays} == {
        "0/arrays", "1/arrays", "state/local.1", "3/arrays.0", "3/arrays.3"}
    assert set(here["metrics"]) == {"0/metrics", "1/metrics", "2/metrics", "3/metrics.0",
                                    "3/metrics.3"}
    assert here["metrics"]["0/metrics"]["train-loss"] != here["metrics"]["1/metrics"][
        "train-loss"]  # round 2 trained with its own seed


def test_worker_errors_name_the_node_config_and_keep_the_worker(fmnist_dir, worker, tmp_path):
    from flwr.app import Context, RecordDict
    from multiprocessing.connection import Client

    from fedpara import client_app
    from fedpara.worker import main, serve

    address, proc = worker
    assert address.stat().st_mode & 0o077 == 0  # its user's only: requests are pickles
    missing = tmp_path / "nobody.sock"
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={"worker": str(missing)})
    with pytest.raises(RuntimeError, match=r"node config worker=.*nobody\.sock.*no fedpara "
                                           r"worker answers there"):
        client_app._handle({"kind": "train"}, context)
    # a request the worker cannot answer: its traceback comes back; the worker serves on
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={"worker": str(address)})
    with pytest.raises(RuntimeError, match=r"(?s)worker at .* failed.*request kind='fit'; "
                                           r"allowed: train, cohort, evaluate"):
        client_app._handle({"kind": "fit"}, context)
    with Client(str(address), family="AF_UNIX") as conn:  # still there
        conn.send({"kind": "nope"})
        assert conn.recv()[0] == "error"
    assert proc.poll() is None
    # where a worker cannot listen: a plain file, a folder that is missing, a live worker
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    for bad, says in ((plain, "is a file that is not a socket"),
                      (tmp_path / "no" / "w.sock", "does not exist"),
                      (address, "a worker already listens there")):
        with pytest.raises(ValueError, match=says):
            serve(bad)
    assert plain.read_text() == "x" and address.exists()
    assert main(["--address", str(plain)]) == 2


# the simulation ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fedpara_run(fmnist_dir, tmp_path_factory):
    """The shared smoke simulation: FedAvg on a FedPara MLP, 4 clients, 2 per round, 2 rounds,
    with the cohort engine: each round's 2 clients train together on one node, in one message
    through Flower's simulation, and are still counted and aggregated per client."""
    from fedpara.experiment import run_experiment

    config = smoke_config(fmnist_dir, engine="cohort")
    return config, run_experiment(config, progress=False)


def test_smoke_run_has_one_record_per_round(fedpara_run):
    config, history = fedpara_run
    assert [r.round for r in history.records] == [1, 2]
    assert all(len(r.clients) == config.clients_per_round for r in history.records)
    assert history.config == config.to_dict()
    assert history.hardware["torch"] == torch.__version__.split("+")[0]  # the package's version
    assert history.hardware["flwr"] == "1.42.0"
    from fedpara.history import source_commit

    assert history.hardware["commit"] == source_commit()  # None outside a git checkout


def test_measured_traffic_equals_the_accounting(fedpara_run):
    config, history = fedpara_run
    payload = payload_bytes(task.init_model(config), "fedavg")
    for r in history.records:
        assert r.bytes_up == r.bytes_down == config.clients_per_round * payload
    assert history.records[-1].cum_bytes == 2 * config.rounds * config.clients_per_round * payload


def test_accuracy_after_two_rounds_is_clearly_above_chance(fedpara_run):
    _, history = fedpara_run
    assert history.records[-1].eval_examples == 10_000  # the full test set, on the server
    assert history.records[-1].accuracy > 0.6  # chance is 0.1
    assert history.records[-1].loss < history.records[0].loss + 0.5


def test_the_simulation_trains_the_strategys_sample(fedpara_run):
    """The partitions each round of the Ray simulation trained are `FedParaStrategy.sample`'s
    (test_strategies checks the sample itself without a simulation)."""
    from fedpara.server_app import FedParaStrategy

    config, history = fedpara_run
    assert [r.clients for r in history.records] == [FedParaStrategy(config).sample(r)
                                                    for r in (1, 2)]


def test_history_of_a_run_survives_json(fedpara_run, tmp_path):
    _, history = fedpara_run
    path = history.save(tmp_path / "h.json")
    # repr, not ==: a server-evaluated round leaves accuracy_after_training NaN, and NaN != NaN
    assert repr(History.load(path).records) == repr(history.records)
    # valid JSON for other readers: Python would read NaN and Infinity, which JSON has not
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


@pytest.fixture(scope="module")
def pfedpara_run(fmnist_dir, tmp_path_factory):
    """pFedPara, 2 shards per client, 3 rounds with a checkpoint after each round, aggregated
    by Flower's FedAvgM (server momentum: state the checkpoints must carry for a resume)."""
    from fedpara.experiment import run_experiment

    checkpoints = tmp_path_factory.mktemp("checkpoints")
    config = smoke_config(fmnist_dir, algorithm="pfedpara", gamma=0.5, evaluation="clients",
                          partition="shard", num_clients=6, clients_per_round=2, rounds=3,
                          lr=0.05, client_samples=500, checkpoint_dir=str(checkpoints),
                          checkpoint_every=1, strategy="fedavgm", server_momentum=0.5)
    return config, run_experiment(config, progress=False)


def test_pfedpara_uploads_only_the_global_half(pfedpara_run):
    config, history = pfedpara_run
    model = task.init_model(config)
    payload = payload_bytes(model, "pfedpara")
    assert payload < 0.6 * payload_bytes(model, "fedavg")
    for r in history.records:
        assert r.bytes_up == r.bytes_down == config.clients_per_round * payload


def test_personalized_evaluation_scores_only_clients_that_trained(pfedpara_run):
    config, history = pfedpara_run
    trained = set()
    for r in history.records:
        trained.update(r.clients)
        assert r.eval_clients == len(trained)
        assert r.untrained_clients == config.num_clients - len(trained)
        assert 0 < r.eval_examples and not math.isnan(r.accuracy)
        # per-client scores, for the spread over clients; the mean is weighted by examples
        assert r.scored_clients == sorted(trained) and len(r.client_accuracy) == len(trained)
        assert min(r.client_accuracy) <= r.accuracy <= max(r.client_accuracy)
    # smoke-sized: after averaging W1 over clients of other classes, still well above chance
    assert history.records[-1].accuracy > 0.25
    # the server scores nothing here, so it records the device the config names for the nodes
    assert history.hardware["device"] == config.device == "cpu"


def test_personalized_rounds_record_the_mechanism(pfedpara_run):
    """Own accuracy right after local training, per trained client, and how far training
    moved each factor: what the personalization chapter plots."""
    config, history = pfedpara_run
    tracked = task.tracked_parameters(task.init_model(config))
    assert any(k.endswith(".x2") for k in tracked) and not any(k.endswith("bias") for k in tracked)
    for r in history.records:
        assert len(r.client_accuracy_after_training) == len(r.clients)
        assert min(r.client_accuracy_after_training) <= r.accuracy_after_training <= max(
            r.client_accuracy_after_training)
        assert list(r.parameter_change) == tracked
        assert all(0 < v < 10 for v in r.parameter_change.values())
    # local training fits a client's own two classes: better than the refreshed model on average
    last = history.records[-1]
    refreshed = dict(zip(last.scored_clients, last.client_accuracy, strict=True))
    after = dict(zip(last.clients, last.client_accuracy_after_training, strict=True))
    assert sum(after.values()) / len(after) > sum(refreshed[c] for c in after) / len(after)


def test_resumed_run_equals_the_uninterrupted_run(pfedpara_run, tmp_path):
    """Interrupted after round 2 (round 3's checkpoint never written), then resumed."""
    from fedpara.checkpoints import checkpoint_path
    from fedpara.experiment import run_experiment

    config, uninterrupted = pfedpara_run
    shutil.copytree(config.checkpoint_dir, tmp_path, dirs_exist_ok=True)
    checkpoint_path(tmp_path, 3).unlink()
    assert checkpoint_path(tmp_path, 2).exists()

    trained = []
    resumed = run_experiment(config.replace(checkpoint_dir=str(tmp_path)), resume=True,
                             progress=False, on_round=lambda r, _: trained.append(r.round))
    assert trained == [3]  # a run from scratch would give the same rows: it must not be one

    def rows(history):
        return [{k: getattr(r, k) for k in ROUNDS_COMPARED} for r in history.records]

    assert rows(resumed) == rows(uninterrupted)
    final = torch.load(checkpoint_path(tmp_path, 3), weights_only=True)
    reference = torch.load(checkpoint_path(config.checkpoint_dir, 3), weights_only=True)
    for key, value in reference["global"].items():
        assert torch.equal(final["global"][key], value)
    # FedAvgM's momentum travelled through the checkpoint, by global key (pFedPara's W1 only)
    assert set(reference["strategy"]["momentum_vector"]) == set(reference["global"])
    assert reference["local"].keys() == final["local"].keys()
    for client, arrays in reference["local"].items():
        assert all(torch.equal(final["local"][client][k], v) for k, v in arrays.items())


def test_resume_refuses_a_checkpoint_of_another_experiment(pfedpara_run):
    from fedpara.checkpoints import latest_checkpoint, load_checkpoint

    config, _ = pfedpara_run
    path = latest_checkpoint(config.checkpoint_dir)
    assert load_checkpoint(path, config)["round"] == 3
    with pytest.raises(ValueError, match="lr"):
        load_checkpoint(path, config.replace(lr=0.2))
    # where it ran, and more rounds to come, do not make another experiment
    assert load_checkpoint(path, config.replace(device="cpu", rounds=5))["round"] == 3


def test_mean_accuracy_skips_unscored_rounds_and_short_histories(tmp_path):
    history = History(config={})
    for r, acc in enumerate((0.2, 0.4, float("nan"), 0.9), start=1):
        history.append(_record(r, 20 * r))
        history.records[-1].accuracy = acc
    assert history.mean_accuracy() == pytest.approx((0.4 + 0.9) / 2)  # the last 3, NaN skipped
    assert history.mean_accuracy(10) == pytest.approx((0.2 + 0.4 + 0.9) / 3)
    assert history.mean_accuracy(1) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="last"):
        history.mean_accuracy(0)
    # a diverged run (inf) still saves, as null, and reads back as NaN
    history.records[-1].parameter_change = {"head.x1": float("inf")}
    history.records[-1].train_loss = float("-inf")
    again = History.load(history.save(tmp_path / "h.json")).records[-1]
    assert math.isnan(again.parameter_change["head.x1"]) and math.isnan(again.train_loss)


def test_a_round_that_outlasts_round_timeout_stops_the_run_with_flowers_error(fmnist_dir):
    """round_timeout is each message's time to live in Flower: a client that has not answered
    by then gets Flower's own error reply from the SuperLink, and the run stops with it (not
    after Flower's 12 hours). Each of round 1's two clients trains 3 epochs of its 15,000
    images, far more than 0.2 s of work on any CPU (node discovery keeps Flower's default)."""
    from fedpara.experiment import run_experiment

    config = smoke_config(fmnist_dir, rounds=1, round_timeout=0.2, client_samples=0,
                          local_epochs=3)
    with pytest.raises(RuntimeError, match=r"2 client\(s\) failed during "
                       r"training in round 1: 2 × the SuperLink: Error: Message Unavailable.*"
                       r"\[no reply within round-timeout=0.2 s"):
        run_experiment(config, progress=False)


@pytest.mark.parametrize("device", ["cuda:1", "cuda:3"])
def test_a_simulation_refuses_a_gpu_index_its_clients_cannot_see(device, monkeypatch):
    """Ray shows each client only its own GPU, as cuda:0: cuda:N (N >= 1) would fail in every
    client, so it is refused before anything starts, with the way to choose a GPU. (On a
    machine with that GPU: here one that takes every device name.)"""
    monkeypatch.setattr(task, "resolve_device", torch.device)
    config = get_preset("fmnist-noniid", variant="fedpara", profile="smoke", device=device)
    from fedpara.experiment import run_experiment

    index = device.split(":")[1]
    with pytest.raises(ValueError, match=f"CUDA_VISIBLE_DEVICES={index} and device=cuda"):
        run_experiment(config)


def test_a_run_that_cannot_start_is_refused_before_ray_starts(fmnist_dir, tmp_path, monkeypatch):
    """A resume without a checkpoint folder, and a fresh run in a folder of another
    experiment's checkpoints, fail with their own error before the simulation (inside it the
    server would fail after Ray's ~12 s start, as "ended without a history")."""
    import flwr.simulation

    from fedpara.checkpoints import ForeignCheckpoints, save_checkpoint
    from fedpara.experiment import run_experiment

    def no_simulation(**kwargs):
        raise AssertionError("the simulation was started")

    monkeypatch.setattr(flwr.simulation, "run_simulation", no_simulation)
    config = smoke_config(fmnist_dir, checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match="resume=True needs config.checkpoint_dir"):
        run_experiment(config.replace(checkpoint_dir=""), resume=True, progress=False)
    other = config.replace(lr=config.lr / 2)
    save_checkpoint(other, 1, {}, {}, set(), History(config=other.to_dict()))
    with pytest.raises(ForeignCheckpoints, match="fields lr differ"):
        run_experiment(config, progress=False)
    mutated = smoke_config(fmnist_dir)
    object.__setattr__(mutated, "rounds", 0)  # a frozen config changed by hand after its checks
    with pytest.raises(ValueError, match="rounds"):
        run_experiment(mutated, progress=False)
    object.__setattr__(mutated, "rounds", "7")  # and given a value of another type
    with pytest.raises(ValueError, match="rounds='7' is not a valid int"):
        run_experiment(mutated, progress=False)
    with pytest.raises(TypeError, match=r"ExperimentConfig \(e.g. get_preset\('fmnist-noniid'\)"):
        run_experiment("fmnist-noniid", progress=False)
    # a split the dataset cannot give, and a checkpoint folder that cannot be written
    from fedpara.task import SplitError

    with pytest.raises(SplitError, match="partition='shard' with num_clients=4, "
                                         "shards_per_client=20000 cannot split fashion-mnist"):
        run_experiment(config.replace(partition="shard", shards_per_client=20_000),
                       progress=False)
    from fedpara.storage import NotWritableError

    (tmp_path / "a-file").write_text("")
    with pytest.raises(NotWritableError, match="checkpoint_dir=.*a-file is a file, not a folder"):
        run_experiment(config.replace(checkpoint_dir=str(tmp_path / "a-file" / "ck")),
                       progress=False)


def test_each_client_reserves_the_configured_cpus_and_gpus():
    from fedpara.experiment import backend_config

    config = get_preset("fmnist-noniid", variant="fedpara", profile="smoke", device="cpu",
                        client_num_cpus=2.0, client_num_gpus=0.5)
    backend = backend_config(config)
    assert backend["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert backend_config(config.replace(client_num_gpus=0.0))["client_resources"] == {
        "num_cpus": 2.0, "num_gpus": 0.0}  # a CPU run reserves no GPU
    assert backend["init_args"]["logging_level"] == "ERROR"
