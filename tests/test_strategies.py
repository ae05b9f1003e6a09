"""Flower's other strategies: FedProx in the client's training, FedAvgM / FedAdam / FedYogi on
the server, their state in checkpoints, and the fmnist-strategies preset's smoke runs.

The runs here go through the real ServerApp round loop (`run_server`) and the real ClientApp,
with the messages delivered in-process by `InProcessGrid` instead of Ray, so every strategy's
smoke profile runs in a few seconds; test_federation.py runs the same apps in Flower's
simulation.
"""

from __future__ import annotations

from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from fedpara import task
from fedpara.config import PRESETS, ExperimentConfig, get_preset
from fedpara.messages import ARRAYS, CHANGE, METRICS, NUM_EXAMPLES, PARTITION_ID, ROUND


class InProcessGrid:
    """A Grid whose nodes are the ClientApp called in this process, one Context per node.

    `blocks`: how many partitions each node holds, in order (default: one each, the node
    config a simulation gives; a node holding more gets "partitions-held")."""

    def __init__(self, num_partitions: int, blocks: list[int] | None = None) -> None:
        self.contexts = {}
        first = 0
        for i, count in enumerate(blocks or [1] * num_partitions):
            node_config = {"partition-id": first, "num-partitions": num_partitions}
            if count != 1:
                node_config["partitions-held"] = count
            self.contexts[100 + i] = Context(run_id=1, node_id=100 + i, state=RecordDict(),
                                             node_config=node_config, run_config={})
            first += count
        self.sent: list[Message] = []
        self.answered: list[Message] = []  # every reply, in the order the nodes gave them
        self.waiting: dict[str, Message] = {}
        self.per_pull: int | None = None
        self.pulls = 0

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        """Answer each message at once; the replies wait to be pulled (ids as Flower's
        in-memory grid makes them)."""
        from fedpara.client_app import app

        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(m)
            self.waiting[m.metadata.message_id] = app(m, self.contexts[m.metadata.dst_node_id])
            self.answered.append(self.waiting[m.metadata.message_id])
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        """At most `per_pull` of the replies asked for (all by default)."""
        ready = [i for i in message_ids if i in self.waiting][: self.per_pull]
        self.pulls += 1
        return [self.waiting.pop(i) for i in ready]


@pytest.fixture
def identity(monkeypatch):
    """What a Flower run sets before messages can be made and answered."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def run_in_process(config: ExperimentConfig, blocks: list[int] | None = None, **kwargs):
    from fedpara.server_app import run_server

    grid = InProcessGrid(config.num_clients, blocks)
    return run_server(grid, config, **kwargs), grid


def strategy_config(data_dir, variant="fedpara-fedadam", **changes) -> ExperimentConfig:
    return get_preset("fmnist-strategies", variant=variant, profile="smoke", device="cpu",
                      data_dir=str(data_dir), **changes)


# config --------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    (dict(strategy="scaffold"), "strategy='scaffold' is not supported; allowed: fedavg, fedprox"),
    (dict(strategy="fedprox", proximal_mu=-0.1), "proximal_mu=-0.1 must be >= 0"),
    (dict(strategy="fedadam", server_lr=0.0), "server_lr=0.0 must be > 0"),
    (dict(strategy="fedavgm", server_lr=-1.0), "server_lr=-1.0 must be > 0"),
    (dict(strategy="fedavgm", server_momentum=1.0), "server_momentum=1.0 must be in"),
    (dict(proximal_mu=0.1), "proximal_mu=0.1 applies to strategy 'fedprox' only"),
    (dict(strategy="fedprox", server_lr=0.5), "server_lr=0.5 applies to strategy 'fedavgm' or"),
    (dict(strategy="fedadam", server_lr=0.01, server_momentum=0.9),
     "server_momentum=0.9 applies to strategy"),
    (dict(strategy="fedadam"), "server_lr=1.0 is fedadam's eta.*allowed for it: 0 < server_lr < 1"),
    (dict(strategy="fedyogi", server_lr=2.0), "allowed for it: 0 < server_lr < 1"),
    (dict(strategy="fedavgm", transport="bfloat16"), "transport='bfloat16' is supported with "
                                                     "strategy fedavg or fedprox only"),
    (dict(engine="cohort", fast_batches=False), "engine='cohort' needs fast_batches=True"),
    (dict(engine="batched"), "engine='batched' is not supported; allowed: client, cohort"),
    (dict(algorithm="local", evaluation="clients", strategy="fedavgm"), "allowed for it: fedavg"),
])
def test_bad_strategy_settings_name_the_field_and_the_allowed_values(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ExperimentConfig(num_clients=4).replace(**changes)


def test_the_preset_pairs_each_strategy_with_both_models_at_one_setting():
    preset = PRESETS["fmnist-strategies"]
    configs = [get_preset("fmnist-strategies", variant=v) for v in preset.variants]
    reference = get_preset("fmnist-noniid", variant="fedpara")
    for strategy in ("fedprox", "fedavgm", "fedadam"):
        pair = [c for c in configs if c.strategy == strategy]
        assert sorted(c.parameterization for c in pair) == ["fedpara", "original"]
        settings = {(c.proximal_mu, c.server_lr, c.server_momentum) for c in pair}
        assert len(settings) == 1  # the same setting for both models
    # apart from the strategy, the protocol is fmnist-noniid's (whose runs are the FedAvg ones)
    same = get_preset("fmnist-strategies", variant="fedpara-fedprox").replace(
        strategy="fedavg", proximal_mu=0.0, preset="fmnist-noniid", variant="fedpara")
    assert same == reference


# FedProx in the client -------------------------------------------------------------------------


def test_fedprox_adds_mu_times_the_distance_to_the_start_to_each_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    mu, lr = 0.5, 0.1
    proximal = task.Proximal.of(model, mu, ["weight"])  # the bias is not pulled
    with torch.no_grad():  # move away from the anchor so the term is not zero
        model.weight.add_(1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    moved = {k: v.clone() for k, v in model.state_dict().items()}

    reference = torch.nn.Linear(3, 2)
    reference.load_state_dict(moved)
    loss = torch.nn.functional.cross_entropy(reference(x), y) + mu / 2 * (
        reference.weight - start["weight"]).pow(2).sum()
    loss.backward()

    task.train_step(model, optimizer, x, y, proximal=proximal)
    assert torch.allclose(model.weight, moved["weight"] - lr * reference.weight.grad, atol=1e-6)
    assert torch.allclose(model.bias, moved["bias"] - lr * reference.bias.grad, atol=1e-6)


def test_fedprox_keeps_local_training_closer_to_the_global_model(fmnist_dir, one_thread):
    config = strategy_config(fmnist_dir, variant="original-fedprox")
    data = task.client_data(config, 0, seed=1)
    start = task.init_model(config)
    keys = task.split_keys(start, config.algorithm)[0]

    def distance(mu):
        model = task.init_model(config)
        task.train(model, data.train, epochs=1, lr=0.1, seed=1, proximal_mu=mu,
                   proximal_to=keys)
        return sum((p - q).pow(2).sum() for p, q in
                   zip(model.parameters(), start.parameters(), strict=True)).sqrt().item()

    free, pulled = distance(0.0), distance(5.0)
    assert pulled < 0.8 * free
    with pytest.raises(ValueError, match="proximal_mu"):
        task.train(task.init_model(config), data.train, epochs=1, lr=0.1, proximal_mu=-1.0)


# the server's strategies -----------------------------------------------------------------------


def _replies(states, examples):
    return [Message(content=RecordDict({
        ARRAYS: ArrayRecord(state),
        METRICS: MetricRecord({NUM_EXAMPLES: n, "train-loss": 1.0, PARTITION_ID: p,
                               CHANGE: [0.1]})}),
        dst_node_id=p + 10, message_type="train")
        for p, (state, n) in enumerate(zip(states, examples, strict=True))]


@pytest.mark.parametrize("strategy, settings", [
    ("fedavg", {}),
    ("fedprox", {"proximal_mu": 0.1}),
    ("fedavgm", {"server_lr": 0.5, "server_momentum": 0.0}),
    ("fedadam", {"server_lr": 0.01}),
    ("fedyogi", {"server_lr": 0.01}),
])
def test_each_strategy_applies_its_own_rule_to_the_clients_mean(fmnist_dir, identity, strategy,
                                                                 settings):
    from fedpara.server_app import FedParaStrategy

    defaults = dict(strategy=strategy, proximal_mu=0.0, server_lr=1.0, server_momentum=0.0)
    config = strategy_config(fmnist_dir).replace(**{**defaults, **settings})
    server = FedParaStrategy(config)
    server.nodes = {p: p + 10 for p in range(config.num_clients)}
    model = task.init_model(config)
    old = task.get_arrays(model, task.split_keys(model, "fedavg")[0])
    messages = server.configure_train(1, ArrayRecord(old))
    assert [m.metadata.dst_node_id - 10 for m in messages] == server.sample(1)
    told = dict(messages[0].content[ROUND])
    assert told.get("proximal-mu") == settings.get("proximal_mu")

    torch.manual_seed(2)
    states = [{k: v + torch.randn_like(v) * 0.01 for k, v in old.items()} for _ in range(2)]
    new, _ = server.aggregate_train(1, _replies(states, (300, 100)))
    new = new.to_torch_state_dict()
    for key, value in old.items():
        mean = (0.75 * states[0][key].double() + 0.25 * states[1][key].double()).numpy()
        delta = mean - value.double().numpy()
        if strategy == "fedavgm":
            expected = value.double().numpy() + 0.5 * delta
        elif strategy in ("fedadam", "fedyogi"):
            # first round, from zero moments: m = 0.1 delta and v = 0.01 delta² (Yogi's
            # v - 0.01 delta² sign(v - delta²) is the same from v = 0)
            m, v = 0.1 * delta, 0.01 * delta**2
            # Flower's FedAdam corrects the step for the moments' bias, its FedYogi does not
            eta = 0.01 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2) if strategy == "fedadam" else 0.01
            expected = value.double().numpy() + eta * m / (np.sqrt(v) + 1e-3)
        else:
            expected = mean
        assert new[key].dtype == torch.float32
        np.testing.assert_allclose(new[key].numpy(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi"])
def test_the_servers_mean_is_bit_for_bit_flowers_on_float64_replies(fmnist_dir, identity,
                                                                    strategy):
    """`aggregate_train` averages with Flower's arithmetic outside Flower's `Array`s; the new
    global arrays equal, bit for bit, Flower's strategy handed every reply in float64 (what
    the ServerApp did before) and cast back to float32. Three clients of unequal weight, in
    shuffled order, two rounds (the server optimizers' state carries over)."""
    from fedpara.server_app import FedParaStrategy, flower_strategy

    settings = {"fedprox": {"proximal_mu": 0.1},
                # a rate below 1: the step depends on the arrays FedAvgM steps from
                "fedavgm": {"server_momentum": 0.9, "server_lr": 0.5},
                "fedadam": {"server_lr": 0.05}, "fedyogi": {"server_lr": 0.05}}.get(strategy, {})
    defaults = dict(proximal_mu=0.0, server_lr=1.0, server_momentum=0.0)
    config = strategy_config(fmnist_dir).replace(strategy=strategy,
                                                 **{**defaults, **settings})
    server = FedParaStrategy(config)
    server.nodes = {p: p + 10 for p in range(config.num_clients)}
    reference = flower_strategy(config)
    model = task.init_model(config)
    arrays = task.get_arrays(model, task.split_keys(model, "fedavg")[0])
    torch.manual_seed(3)
    for server_round in (1, 2):
        ours = server.configure_train(server_round, ArrayRecord(arrays))[0]
        theirs = list(reference.configure_train(server_round, ArrayRecord(arrays),
                                                ours.content[ROUND], _AllNodes([10])))[0]
        assert dict(theirs.content[ROUND]) == dict(ours.content[ROUND])
        states = [{k: v + torch.randn_like(v) * 0.1 for k, v in arrays.items()}
                  for _ in range(3)]
        replies = _replies(states, (7, 300, 41))[::-1]
        new, _ = server.aggregate_train(server_round, replies)
        in_float64 = _replies([{k: v.double() for k, v in s.items()} for s in states],
                              (7, 300, 41))
        expected, _ = reference.aggregate_train(server_round, in_float64)
        expected = {k: torch.from_numpy(v.numpy()).float() for k, v in expected.items()}
        if hasattr(reference, "current_arrays"):  # what FedParaStrategy keeps (float32)
            reference.current_arrays = ArrayRecord(expected)
        new = new.to_torch_state_dict()
        assert list(new) == list(expected)
        for key, value in expected.items():
            assert new[key].dtype == torch.float32
            assert torch.equal(new[key], value), key
        changed = [not torch.equal(new[k], arrays[k]) for k in arrays]
        assert sum(changed) == len(changed)  # every array moved: the comparison is not vacuous
        arrays = new


def test_weighted_mean_needs_one_state_per_weight():
    from fedpara.task import weighted_mean

    for states in ([{"w": torch.ones(2)}] * 2, [{"w": torch.ones(2)}] * 4):
        with pytest.raises(ValueError, match=r"more or fewer clients' arrays than weights \(3\)"):
            weighted_mean(states, [1.0, 2.0, 3.0])
    states = [{"w": torch.full((2,), float(i), dtype=torch.float64)} for i in (1, 4)]
    mean = weighted_mean(iter(states), [3.0, 1.0])
    assert mean["w"].dtype == torch.float64 and mean["w"].tolist() == [1.75, 1.75]
    assert [s["w"].tolist() for s in states] == [[1.0, 1.0], [4.0, 4.0]]  # inputs untouched


def test_the_server_average_refuses_missing_or_disagreeing_replies_and_rounds_integers(identity):
    from fedpara.server_app import FedParaStrategy
    from fedpara.task import weighted_mean

    server = FedParaStrategy(ExperimentConfig())
    with pytest.raises(RuntimeError, match="no client replied to the training of round 1"):
        server.aggregate_train(1, [])
    state = {"w": torch.ones(2), "count": torch.tensor(1, dtype=torch.int64)}
    new, _ = server.aggregate_train(1, _replies([state] * 6, [1] * 6))
    # six sixths of 1 add up to 0.9999999999999999: an integer is rounded back, not truncated
    assert new.to_torch_state_dict()["count"].item() == 1
    with pytest.raises(ValueError, match="client 2 of 2 sent other keys than client 1: count"):
        weighted_mean([state, {"w": torch.ones(2)}], [1, 1])
    with pytest.raises(ValueError, match=r"client 2 of 2 sent w of shape \(1,\), client 1 \(2,\)"):
        weighted_mean([state, {**state, "w": torch.ones(1)}], [1, 1])
    with pytest.raises(ValueError, match=r"examples must sum to more than 0, got \[0\]"):
        weighted_mean([state], [0])


def test_a_clients_training_error_fails_the_round_with_its_reason(identity):
    from flwr.app import Error

    from fedpara.server_app import FedParaStrategy

    server = FedParaStrategy(ExperimentConfig())
    [ok, asked] = _replies([{"w": torch.ones(2)}] * 2, [1, 1])
    failed = Message(Error(code=0, reason="CUDA out of memory"), reply_to=asked)
    with pytest.raises(RuntimeError, match="1 client.*failed during training in round 4: "
                                           "node 11: CUDA out of memory$"):
        server.aggregate_train(4, [ok, failed])


def test_errors_are_grouped_by_reason_and_an_expired_message_names_round_timeout(identity):
    """The SuperLink answers each message that outlived its time to live with Flower's
    MESSAGE_UNAVAILABLE error, itself as the sender: one line for all of them, naming the
    limit; other errors keep their nodes."""
    from flwr.app import Error
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

    from fedpara.server_app import _raise_errors

    def error(node, code, reason):
        asked = Message(content=RecordDict(), dst_node_id=node, message_type="train")
        return Message(Error(code=code, reason=reason), reply_to=asked)

    unavailable = "Error: Message Unavailable"
    replies = [error(7, 2, "CUDA out of memory"), error(8, 2, "CUDA out of memory"),
               error(SUPERLINK_NODE_ID, ErrorCode.MESSAGE_UNAVAILABLE, unavailable),
               error(SUPERLINK_NODE_ID, ErrorCode.MESSAGE_UNAVAILABLE, unavailable)]
    expected = ("4 client(s) failed during training in round 2: node 7, node 8: CUDA out of "
                "memory; 2 × the SuperLink: Error: Message Unavailable [no reply within "
                "round-timeout=45 s; with checkpoint-dir set, resume=true continues from the "
                "last checkpoint]")
    with pytest.raises(RuntimeError) as raised:
        _raise_errors(replies, "training in round 2", 45.0)
    assert str(raised.value) == expected
    with pytest.raises(RuntimeError, match=r"within Flower's default time to live, 12 hours "
                                           r"\(round-timeout=0\)"):
        _raise_errors(replies[2:], "evaluation in round 1")


def test_client_evaluation_pools_correct_predictions_and_examples_over_clients(identity):
    from fedpara.messages import CORRECT, LOSS
    from fedpara.server_app import FedParaStrategy

    server = FedParaStrategy(ExperimentConfig())
    replies = [Message(content=RecordDict({METRICS: MetricRecord(
        {NUM_EXAMPLES: n, CORRECT: k, LOSS: loss, PARTITION_ID: p})}), dst_node_id=p + 10,
        message_type="evaluate")
        for p, n, k, loss in ((2, 300, 270, 0.5), (0, 100, 50, 2.0), (1, 0, 0, 0.0))]
    fields = server.aggregate_evaluate(1, replies)
    assert fields["accuracy"] == pytest.approx(320 / 400)  # not the clients' mean, 0.7
    assert fields["loss"] == pytest.approx((300 * 0.5 + 100 * 2.0) / 400)
    assert fields["scored_clients"] == [0, 2]  # a client without held-out data is not scored
    assert fields["client_accuracy"] == pytest.approx([0.5, 0.9])
    assert (fields["eval_examples"], fields["eval_clients"]) == (400, 3)


def test_exchange_refuses_a_push_the_superlink_did_not_take_whole(identity):
    from fedpara.messages import QUERY_PARTITION
    from fedpara.server_app import exchange

    class ShortPush:  # what Flower's deployment grid returns when a push fails
        pull_interval = 0.01

        def __init__(self, ids):
            self.ids = ids

        def push_messages(self, messages):
            return self.ids

    queries = [Message(content=RecordDict(), dst_node_id=node, message_type=QUERY_PARTITION)
               for node in (1, 2)]
    for ids, pushed in (([], 0), (["a", None], 1)):
        with pytest.raises(RuntimeError, match=f"the SuperLink accepted {pushed} of 2 messages"):
            exchange(ShortPush(ids), queries)


class _AllNodes:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


# runs -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_runs(fmnist_dir, tmp_path_factory):
    """Every variant of fmnist-strategies at its smoke profile through the real apps, and
    fmnist-noniid's two FedAvg runs at the same profile (the reference)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        configs = {v: strategy_config(fmnist_dir, variant=v)
                   for v in PRESETS["fmnist-strategies"].variants}
        for kind in ("fedpara", "original"):
            configs[f"{kind}-fedavg"] = get_preset("fmnist-noniid", variant=kind, profile="smoke",
                                                   device="cpu", data_dir=str(fmnist_dir))
        return {variant: (config, *run_in_process(config)) for variant, config in configs.items()}
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
        torch.set_num_threads(torch_threads)


def test_every_strategy_smoke_run_completes_and_fedpara_sends_a_third_or_less(smoke_runs):
    for variant, (config, history, _) in smoke_runs.items():
        assert len(history) == config.rounds
        assert all(np.isfinite([r.accuracy, r.loss, r.train_loss]).all()
                   for r in history.records), variant
        if variant.startswith("fedpara"):
            other = smoke_runs[variant.replace("fedpara", "original", 1)][1]
            assert history.records[-1].cum_bytes < other.records[-1].cum_bytes / 3


def test_the_server_strategies_change_the_global_model_fedprox_the_local_training(smoke_runs):
    """Round 1 starts every run of a model from the same arrays and clients, so its training
    loss is FedAvg's unless the clients train differently (FedProx); round 2 starts from what
    the strategy made of round 1, so FedAvgM and FedAdam move it."""
    for variant, (config, history, _) in smoke_runs.items():
        reference = smoke_runs[variant.split("-")[0] + "-fedavg"][1].records
        first, second = (r.train_loss for r in history.records[:2])
        if config.strategy in ("fedavgm", "fedadam"):
            assert first == reference[0].train_loss and second != reference[1].train_loss
        elif config.strategy == "fedprox":
            assert first != reference[0].train_loss
            assert first == pytest.approx(reference[0].train_loss, rel=0.01)  # mu is small


def test_fedprox_clients_are_told_mu_and_no_other_strategy_tells_them(smoke_runs):
    for config, _, grid in smoke_runs.values():
        training = [m for m in grid.sent if m.metadata.message_type == "train"]
        told = {m.content[ROUND].get("proximal-mu") for m in training}
        assert told == ({config.proximal_mu} if config.strategy == "fedprox" else {None})


def test_pfedpara_local_factors_never_reach_an_adaptive_strategy(fmnist_dir, identity,
                                                                  monkeypatch):
    import fedpara.server_app
    from fedpara.transport import unpack

    built = []

    class Recorded(fedpara.server_app.FedParaStrategy):  # the run's own strategy, kept
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(fedpara.server_app, "FedParaStrategy", Recorded)
    config = get_preset("fmnist-personal", variant="pfedpara", profile="smoke", device="cpu",
                        data_dir=str(fmnist_dir), strategy="fedadam", server_lr=0.01)
    history, grid = run_in_process(config)
    model = task.init_model(config)
    global_keys, local_keys = task.split_keys(model, "pfedpara")
    assert any(k.endswith(".x2") for k in local_keys)
    trained = [m for m in grid.sent if m.metadata.message_type == "train"]
    replies = [m for m in grid.answered if m.metadata.message_type == "train"]
    assert trained and len(replies) == len(trained)
    for message in trained + replies:  # the arrays both ways, packed (transport)
        assert list(unpack(message.content[ARRAYS].to_torch_state_dict())) == global_keys
    assert all(np.isfinite(r.accuracy) for r in history.records)
    # what FedAdam holds after the run: its moments and model over the global factors only
    [strategy] = built
    adam = strategy.flower
    assert set(adam.current_arrays) == set(adam.m_t) == set(adam.v_t) == set(global_keys)


@pytest.mark.parametrize("variant", ["fedpara-fedadam", "original-fedavgm"])
def test_a_resumed_run_continues_the_servers_optimizer(fmnist_dir, identity, tmp_path, variant,
                                                       one_thread):
    from fedpara.checkpoints import checkpoint_path

    config = strategy_config(fmnist_dir, variant=variant, rounds=3, checkpoint_every=1,
                             checkpoint_dir=str(tmp_path), eval_samples=500,
                             client_samples=200)
    uninterrupted, _ = run_in_process(config)
    state = torch.load(checkpoint_path(tmp_path, 3), weights_only=True)
    assert state["strategy"]  # momentum or moments, by global key
    assert all(set(v) == set(state["global"]) for v in state["strategy"].values())
    checkpoint_path(tmp_path, 3).unlink()
    resumed, grid = run_in_process(config, resume=True)
    assert {m.metadata.group_id for m in grid.sent if m.metadata.message_type == "train"} == {"3"}
    assert [r.accuracy for r in resumed.records] == [r.accuracy for r in uninterrupted.records]
    assert [r.train_loss for r in resumed.records] == [r.train_loss for r in uninterrupted.records]
    assert [r.cum_bytes for r in resumed.records] == [r.cum_bytes for r in uninterrupted.records]
    final = torch.load(checkpoint_path(tmp_path, 3), weights_only=True)
    for key, value in state["global"].items():
        assert torch.equal(final["global"][key], value)


def test_the_last_round_is_checkpointed_whatever_checkpoint_every(fmnist_dir, identity, tmp_path,
                                                                 one_thread):
    """And a fresh run first clears its folder of an earlier run of the same experiment: that
    run's round 7 would otherwise count among the two newest checkpoints kept."""
    from fedpara.checkpoints import checkpoint_path, save_checkpoint
    from fedpara.history import History

    config = strategy_config(fmnist_dir, variant="fedpara-fedprox", rounds=3, checkpoint_every=2,
                             checkpoint_dir=str(tmp_path), eval_samples=200, client_samples=100)
    save_checkpoint(config, 7, {}, {}, set(), History(config=config.to_dict()))
    run_in_process(config)
    assert sorted(tmp_path.iterdir()) == [checkpoint_path(tmp_path, r) for r in (2, 3)]


# the cohort engine -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["fedpara-fedprox", "original-fedadam"])
def test_a_cohort_round_equals_its_clients_trained_apart(fmnist_dir, identity, one_thread,
                                                         monkeypatch, variant):
    """engine="cohort" sends one node the round's partitions in one message; the history
    (traffic per client, losses, accuracy) is the per-client engine's to float tolerance."""
    import fedpara.worker

    from fedpara import task

    config = strategy_config(fmnist_dir, variant=variant, client_samples=150, eval_samples=500)
    apart, apart_grid = run_in_process(config)
    seeds = []  # the seeds (dropout) each cohort was given: its clients' own, of its round
    real = fedpara.worker.train_cohort
    monkeypatch.setattr(fedpara.worker, "train_cohort",
                        lambda *a, **k: seeds.append(k["seeds"]) or real(*a, **k))
    together, grid = run_in_process(config.replace(engine="cohort"))
    assert seeds == [[task.client_seed(config.seed, r.round, p) for p in r.clients]
                     for r in apart.records]
    training = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(training) == config.rounds  # one message a round, not clients_per_round
    assert [m.content["round"]["cohort"] for m in training] == [
        r.clients for r in apart.records]
    for a, b in zip(apart.records, together.records, strict=True):
        assert (a.bytes_up, a.bytes_down, a.cum_bytes) == (b.bytes_up, b.bytes_down, b.cum_bytes)
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-4)
        assert b.loss == pytest.approx(a.loss, rel=1e-3)
        assert b.parameter_change.keys() == a.parameter_change.keys()
    # what each client sent back, round by round: the cohort's entry for a partition is the
    # arrays that partition's own client trained (parameter_change, a ratio of small norms,
    # magnifies float noise, so the arrays are compared instead)
    from fedpara.messages import cohort_key
    from fedpara.transport import from_wire

    def arrays(record):
        return from_wire(record.to_torch_state_dict(), config.transport)

    trained = [r for r in apart_grid.answered if r.metadata.message_type == "train"]
    cohorts = [r for r in grid.answered if r.metadata.message_type == "train"]
    assert len(trained) == sum(len(r.clients) for r in apart.records)
    for record, cohort in zip(apart.records, cohorts, strict=True):
        for p in record.clients:
            alone = trained.pop(0)
            assert int(alone.content[METRICS][PARTITION_ID]) == p
            mine = arrays(cohort.content[cohort_key(ARRAYS, p)])
            theirs = arrays(alone.content[ARRAYS])
            assert mine.keys() == theirs.keys()
            # ‖mine − theirs‖ / ‖theirs‖ over the client's arrays: the cohort sums in another
            # order, and rounds of float32 SGD amplify that unevenly, so on some CPUs a few
            # single elements drift far past any elementwise tolerance the whole meets; leaving
            # FedProx's term out of the cohort's update moves the arrays past this bound
            gap = (sum(float((mine[k] - v).double().square().sum()) for k, v in theirs.items())
                   / sum(float(v.double().square().sum()) for v in theirs.values())) ** 0.5
            assert gap <= 1e-5, (record.round, p, gap)
    with pytest.raises(ValueError, match="engine='client'"):
        config.replace(algorithm="fedper", evaluation="clients", engine="cohort")


# nodes holding several partitions (one GPU node can hold a whole federation) -----------------


def same_rounds(a, b) -> None:
    for x, y in zip(a.records, b.records, strict=True):
        assert (x.clients, x.bytes_up, x.bytes_down, x.train_loss, x.accuracy, x.loss) == (
            y.clients, y.bytes_up, y.bytes_down, y.train_loss, y.accuracy, y.loss)


@pytest.mark.parametrize("preset, variant, engine", [
    ("fmnist-personal", "pfedpara", "client"),  # personal state per partition on one node
    ("fmnist-strategies", "fedpara-fedprox", "client"),
    ("fmnist-noniid", "fedpara", "cohort"),
])
def test_one_node_holding_every_partition_runs_the_federation_of_one_node_each(
        fmnist_dir, identity, one_thread, tmp_path, preset, variant, engine):
    from fedpara.checkpoints import checkpoint_path

    config = get_preset(preset, variant=variant, profile="smoke", device="cpu",
                        data_dir=str(fmnist_dir), engine=engine, rounds=2, client_samples=150,
                        eval_samples=300, checkpoint_every=1)
    runs = {}
    for blocks in (None, [config.num_clients], [3, config.num_clients - 3]):
        ckpt = tmp_path / str(blocks)
        runs[str(blocks)] = (run_in_process(config.replace(checkpoint_dir=str(ckpt)), blocks),
                             torch.load(checkpoint_path(ckpt, 2), weights_only=True))
    (reference, _), first_state = runs.pop("None")
    for (history, grid), state in runs.values():
        same_rounds(reference, history)
        assert len(grid.contexts) < config.num_clients
        assert state["local"].keys() == first_state["local"].keys()
        for p, arrays in first_state["local"].items():  # pFedPara: each partition's own W2
            for key, value in arrays.items():
                assert torch.equal(state["local"][p][key], value)
    if config.personalized:  # the personal arrays of the clients that have trained, no others
        assert first_state["local"] and set(first_state["local"]) == set(first_state["trained"])
        assert len(first_state["trained"]) < config.num_clients


def test_a_resumed_run_restores_each_partitions_state_on_a_shared_node(
        fmnist_dir, identity, one_thread, tmp_path):
    from fedpara.checkpoints import checkpoint_path

    config = get_preset("fmnist-personal", variant="pfedpara", profile="smoke", device="cpu",
                        data_dir=str(fmnist_dir), rounds=3, client_samples=150,
                        eval_samples=300, checkpoint_every=1, checkpoint_dir=str(tmp_path))
    blocks = [config.num_clients]
    uninterrupted, _ = run_in_process(config, blocks)
    checkpoint_path(tmp_path, 3).unlink()
    # a fresh node (no state), and a round_timeout the first run did not have (where and how
    # a run executes may change on resume)
    resumed, grid = run_in_process(config.replace(round_timeout=45.0), blocks, resume=True)
    same_rounds(uninterrupted, resumed)
    # round_timeout is the time to live of every message of a round, whatever it asks
    from flwr.app.constants import DEFAULT_TTL

    from fedpara.messages import QUERY_PARTITION

    ttl = {m.metadata.message_type: m.metadata.ttl for m in grid.sent}
    discovery = ttl.pop(QUERY_PARTITION)  # lives until the discovery's deadline, see below
    assert 500 < discovery <= 600
    assert ttl == {"query.set_local": 45.0, "train": 45.0, "evaluate": 45.0,
                   "query.get_local": 45.0}
    _, first = run_in_process(config.replace(rounds=1, checkpoint_dir=""))  # 0: the default
    assert {m.metadata.ttl for m in first.sent if m.metadata.message_type != QUERY_PARTITION
            } == {DEFAULT_TTL}


def test_a_run_that_cannot_start_is_refused_before_any_node_is_asked(fmnist_dir, identity,
                                                                     tmp_path):
    """A resume without a checkpoint folder, or from another experiment's checkpoint, and a
    fresh run in a folder of another experiment's checkpoints: refused before any message."""
    from fedpara.checkpoints import ForeignCheckpoints, save_checkpoint
    from fedpara.history import History
    from fedpara.server_app import run_server

    config = strategy_config(fmnist_dir, variant="fedpara-fedprox", checkpoint_dir=str(tmp_path))
    other = config.replace(lr=config.lr / 2)
    save_checkpoint(other, 1, {}, {}, set(), History(config=other.to_dict()))
    for run, resume, error, message in (
            (config.replace(checkpoint_dir=""), True, ValueError, "resume=True needs config.che"),
            (config, True, ValueError, "different experiment: fields lr differ"),
            (config, False, ForeignCheckpoints, "another experiment .*fields lr differ")):
        grid = InProcessGrid(config.num_clients)
        with pytest.raises(error, match=message):
            run_server(grid, run, resume=resume)
        assert grid.sent == []


def test_node_discoverys_queries_live_until_its_deadline_and_say_so_when_unanswered(
        fmnist_dir, identity):
    """A ClientApp that hangs on the partition query cannot hold discovery past its wait:
    each query's time to live is what is left of the wait (at least 30 s), and the SuperLink's
    MESSAGE_UNAVAILABLE reply is reported with that wait, not with round-timeout."""
    from flwr.app import Error
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

    from fedpara.server_app import FedParaStrategy

    config = strategy_config(fmnist_dir, variant="fedpara-fedprox", round_timeout=5.0)
    n = config.num_clients
    grid = InProcessGrid(n, [n])
    FedParaStrategy(config).discover_nodes(grid, timeout=200)
    (query,) = grid.sent
    assert 190 < query.metadata.ttl <= 200
    grid = InProcessGrid(n, [n])
    FedParaStrategy(config).discover_nodes(grid, timeout=0.1)
    assert [m.metadata.ttl for m in grid.sent] == [30.0]  # a late node still gets 30 s

    class Expiring(InProcessGrid):
        """ClientApps that never answer: the SuperLink replies for them once a query's time
        to live has run out, itself as the sender."""

        def push_messages(self, messages) -> list[str]:
            for m in messages:
                m.metadata.__dict__["_message_id"] = str(uuid4())
                self.sent.append(m)
            return [m.metadata.message_id for m in messages]

        def pull_messages(self, message_ids) -> list[Message]:
            replies = []
            for m in self.sent:
                if m.metadata.message_id in message_ids:
                    asked = Message(content=RecordDict(), dst_node_id=SUPERLINK_NODE_ID,
                                    message_type=m.metadata.message_type)
                    asked.metadata.__dict__["_message_id"] = m.metadata.message_id
                    replies.append(Message(Error(code=ErrorCode.MESSAGE_UNAVAILABLE,
                                                 reason="Unavailable"), reply_to=asked))
            return replies

    grid = Expiring(n, [n])
    with pytest.raises(RuntimeError, match=r"1 client\(s\) failed during node discovery: the "
                                           r"SuperLink: Unavailable \[no reply within node "
                                           r"discovery's wait \(200 s from its start, at least "
                                           r"30 s per query\)"):
        FedParaStrategy(config).discover_nodes(grid, timeout=200)


def test_node_discovery_checks_that_the_nodes_hold_each_partition_once(fmnist_dir, identity):
    from fedpara.server_app import FedParaStrategy

    config = strategy_config(fmnist_dir, variant="fedpara-fedprox")
    n = config.num_clients
    grid = InProcessGrid(n, [2, n - 2])
    grid.contexts[101].node_config["partition-id"] = 1  # holds 1.., overlapping node 100's
    with pytest.raises(ValueError, match="partition 1 is held by two nodes.*partitions-held"):
        FedParaStrategy(config).discover_nodes(grid, timeout=0.1)
    with pytest.raises(RuntimeError, match=f"hold {n - 1} of num_clients={n} partitions"):
        FedParaStrategy(config).discover_nodes(InProcessGrid(n, [n - 1]), timeout=0.1)
    grid = InProcessGrid(n, [n])
    grid.contexts[100].node_config["partitions-held"] = n + 1
    with pytest.raises(ValueError, match=f"partitions-held={n + 1}.*must lie in 0..{n - 1}"):
        FedParaStrategy(config).discover_nodes(grid, timeout=0.1)
    # a node of a federation of another size: refused by the server when it reports it, and
    # by the client when a message of this experiment reaches it
    grid = InProcessGrid(n + 1)
    with pytest.raises(ValueError, match=f"reports num-partitions={n + 1}.*num_clients={n}"):
        FedParaStrategy(config).discover_nodes(grid, timeout=0.1)
    from flwr.app import ConfigRecord

    from fedpara.client_app import app
    from fedpara.messages import ADDRESS, EXPERIMENT

    content = RecordDict({EXPERIMENT: ConfigRecord(config.to_run_config()),
                          ADDRESS: ConfigRecord({PARTITION_ID: 0}), ARRAYS: ArrayRecord()})
    with pytest.raises(ValueError, match=f"this node has num-partitions={n + 1}"):
        app(Message(content=content, dst_node_id=100, message_type="evaluate"),
            grid.contexts[100])


def test_exchange_waits_for_every_reply_however_they_are_pulled(fmnist_dir, identity,
                                                               monkeypatch):
    from fedpara.messages import QUERY_PARTITION
    from fedpara.server_app import POLL_ENV, exchange, poll_seconds

    grid = InProcessGrid(3)
    assert poll_seconds(grid) == 1.0  # a grid without its own pull_interval
    grid.pull_interval = 0.25
    assert poll_seconds(grid) == 0.25
    monkeypatch.setenv(POLL_ENV, "0.01")
    assert poll_seconds(grid) == 0.01
    queries = [Message(content=RecordDict(), dst_node_id=node, message_type=QUERY_PARTITION)
               for node in grid.get_node_ids()]
    grid.per_pull = 1  # one reply per pull, as when they come back at different times
    replies = exchange(grid, queries)
    assert grid.pulls == 3 and not grid.waiting
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(
        q.metadata.message_id for q in queries)
    assert sorted(int(r.content[METRICS][PARTITION_ID]) for r in replies) == [0, 1, 2]
    for bad in ("0", "-1", "soon", "nan", "inf"):
        monkeypatch.setenv(POLL_ENV, bad)
        with pytest.raises(ValueError, match=f"FEDPARA_POLL_SECONDS='{bad}': must be a "
                                             "positive number of seconds"):
            exchange(grid, queries)
    assert len(grid.sent) == 3  # refused before anything was pushed


def test_a_message_for_a_partition_the_node_does_not_hold_is_refused(fmnist_dir, identity):
    from flwr.app import ConfigRecord

    from fedpara.client_app import app
    from fedpara.messages import ADDRESS, EXPERIMENT

    config = strategy_config(fmnist_dir, variant="fedpara-fedprox")
    grid = InProcessGrid(config.num_clients, [2, config.num_clients - 2])
    content = RecordDict({EXPERIMENT: ConfigRecord(config.to_run_config()),
                          ADDRESS: ConfigRecord({PARTITION_ID: 5}), ARRAYS: ArrayRecord()})
    with pytest.raises(ValueError, match="message for partition 5 reached a node holding "
                                         "partitions 0..1"):
        app(Message(content=content, dst_node_id=100, message_type="evaluate"),
            grid.contexts[100])


def test_the_sample_is_exact_sorted_and_a_function_of_seed_and_round():
    """Without a simulation (test_federation checks that Ray's smoke run trains it): exactly
    clients_per_round distinct partitions, sorted, the same for the same (seed, round), other
    ones for another round or another seed."""
    from fedpara.server_app import FedParaStrategy

    config = ExperimentConfig(num_clients=100, clients_per_round=16, rounds=50, seed=3)
    samples = [FedParaStrategy(config).sample(r) for r in range(1, 51)]
    assert all(len(set(s)) == len(s) == 16 and s == sorted(s) for s in samples)
    assert all(0 <= p < 100 for s in samples for p in s)
    assert samples == [FedParaStrategy(config).sample(r) for r in range(1, 51)]
    assert len({tuple(s) for s in samples}) > 40  # the round changes the sample
    other = FedParaStrategy(config.replace(seed=4))
    assert sum(other.sample(r) != s for r, s in enumerate(samples, start=1)) > 40  # the seed too


def test_own_accuracy_after_training_pools_hits_over_the_trained_clients(identity):
    """accuracy_after_training is hits over examples of every trained client (as evaluation's
    accuracy), not the mean of the clients' accuracies; the per-client values in partition
    order, NaN for a client without held-out data."""
    from fedpara.messages import OWN_CORRECT, OWN_EXAMPLES
    from fedpara.server_app import FedParaStrategy

    server = FedParaStrategy(ExperimentConfig())
    replies = _replies([{"w": torch.ones(2)}] * 3, [10, 10, 10])
    for reply, (k, n) in zip(replies, ((90, 100), (10, 300), (0, 0)), strict=True):
        reply.content[METRICS][OWN_CORRECT], reply.content[METRICS][OWN_EXAMPLES] = k, n
    _, fields = server.aggregate_train(1, replies[::-1])
    assert fields["accuracy_after_training"] == pytest.approx(100 / 400)  # not (0.9 + 1/30) / 2
    per_client = fields["client_accuracy_after_training"]
    assert per_client[:2] == pytest.approx([0.9, 10 / 300]) and np.isnan(per_client[2])
    assert server.trained == {0, 1, 2}


def test_a_personalized_runs_records_match_the_messages_it_sent(fmnist_dir, identity, one_thread):
    """A pFedPara run through the real apps in-process (test_federation checks these fields in
    Ray's simulation only): each round's clients are the (seed, round) sample and are told
    that round's learning rate; traffic is counted per client each way, client evaluation's
    downloads apart, and cumulated; the clients scored are those that have trained so far, the
    others are counted as untrained."""
    from fedpara.accounting import payload_bytes
    from fedpara.messages import ADDRESS, LR
    from fedpara.server_app import FedParaStrategy

    config = get_preset("fmnist-personal", variant="pfedpara", profile="smoke", device="cpu",
                        data_dir=str(fmnist_dir), rounds=3, client_samples=150, lr_decay=0.5)
    history, grid = run_in_process(config)
    payload = payload_bytes(task.init_model(config), "pfedpara")
    sampler = FedParaStrategy(config)
    trained, cum = set(), 0
    for r in history.records:
        sent = [m for m in grid.sent if m.metadata.group_id == str(r.round)]
        training = [m for m in sent if m.metadata.message_type == "train"]
        scoring = [m for m in sent if m.metadata.message_type == "evaluate"]
        assert r.clients == sampler.sample(r.round) == [
            int(m.content[ADDRESS][PARTITION_ID]) for m in training]
        assert [m.content[ROUND][LR] for m in training] == [config.lr * 0.5 ** (r.round - 1)] * 2
        trained.update(r.clients)
        assert [int(m.content[ADDRESS][PARTITION_ID]) for m in scoring] == sorted(trained)
        assert r.scored_clients == sorted(trained) and r.eval_clients == len(trained)
        assert r.untrained_clients == config.num_clients - len(trained) > 0
        assert r.bytes_up == r.bytes_down == len(r.clients) * payload
        assert r.eval_bytes_down == len(trained) * payload
        cum += r.bytes_up + r.bytes_down
        assert r.cum_bytes == cum
    assert len(trained) > len(history.records[0].clients)  # later rounds scored more clients
