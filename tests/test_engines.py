"""The GPU engine's two halves, checked on the CPU against `task.train`, the reference:
a round's clients trained together (fedpara/cohort.py) and the captured step's copy-in,
replay and copy-out logic run eagerly (fedpara/graphed.py; the capture itself needs CUDA and
is checked by benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import copy

import pytest
import torch

from fedpara import graphed, task
from fedpara.cohort import train_cohort
from fedpara.data import TensorBatches
from fedpara.graphed import GraphedTrainer
from fedpara.models import build_model

SIZES = (50, 37, 13)  # unequal clients: 4, 3 and 1 batches of 16, each ending short


def _model(parameterization: str, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", num_classes=10, in_channels=1, parameterization=parameterization,
                       gamma=0.1).to(dtype)


def _clients(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 1, 12, 12, generator=g, dtype=dtype),
             torch.randint(0, 10, (n,), generator=g)) for n in SIZES]


def _batches(client, i):
    return TensorBatches(*client, 16, shuffle=True, generator=torch.Generator().manual_seed(i))


def _eager_trainer(base, client, speed=task.PLAIN, **settings) -> GraphedTrainer:
    """A graphed trainer for `base` on a client's batch shape, its step run eagerly (CPU)."""
    return GraphedTrainer(base, client[0][:16], client[1][:16], device="cpu", speed=speed,
                          capture=False, **settings)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _assert_same_parameters(model, reference, rtol=1e-10, atol=1e-12):
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("parameterization", ["fedpara", "original"])
@pytest.mark.parametrize("proximal_mu", [0.0, 0.1])
def test_clients_trained_together_equal_clients_trained_apart(parameterization, proximal_mu):
    """Float64, dropout-free CNN: K together == K apart to rounding, padding and all."""
    base, clients = _model(parameterization), _clients()
    apart = [copy.deepcopy(base) for _ in SIZES]
    expected = [task.train(apart[i], _batches(c, i), epochs=2, lr=0.1, seed=3,
                           proximal_mu=proximal_mu) for i, c in enumerate(clients)]
    together = [copy.deepcopy(base) for _ in SIZES]
    got = train_cohort(together, [_batches(c, i) for i, c in enumerate(clients)], epochs=2,
                       lr=0.1, seeds=[3] * 3, proximal_mu=proximal_mu)
    for i in range(len(SIZES)):
        assert got[i].num_examples == expected[i].num_examples == SIZES[i]
        assert got[i].loss == pytest.approx(expected[i].loss, rel=1e-6)
        _assert_same_parameters(together[i], apart[i], rtol=1e-12)
    # and the clients really trained, each its own way
    assert not torch.equal(next(together[0].parameters()), next(together[1].parameters()))


def test_a_cohort_rejects_mixed_architectures_and_bad_settings():
    models = [_model("fedpara"), _model("original")]
    batches = [_batches(c, i) for i, c in enumerate(_clients()[:2])]
    with pytest.raises(ValueError, match="one architecture"):
        train_cohort(models, batches, epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="equal length"):
        train_cohort(models[:1], batches, epochs=1, lr=0.1)
    for lr in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"lr={lr} must be a finite number > 0"):
            train_cohort(models[:1], batches[:1], epochs=1, lr=lr)
    with pytest.raises(ValueError, match="epochs=0 must be an integer >= 1"):
        train_cohort(models[:1], batches[:1], epochs=0, lr=0.1)
    with pytest.raises(ValueError, match=r"batches\[0\] is a one-shot generator"):
        train_cohort(models[:1], [(b for b in batches[0])], epochs=2, lr=0.1)


@pytest.mark.parametrize(("lr_scale", "message"), [
    ({"nope.weight": 2.0}, "lacks: nope.weight"),
    ({"first": -1.0}, "must be finite numbers > 0"),
    ({"first": float("inf")}, "must be finite numbers > 0"),
])
def test_both_engines_refuse_an_lr_scale_task_train_refuses(lr_scale, message):
    base = _model("original")
    first = next(n for n, _ in base.named_parameters())
    lr_scale = {first if k == "first" else k: v for k, v in lr_scale.items()}
    client = _clients()[0]
    with pytest.raises(ValueError, match=message):
        task.train(copy.deepcopy(base), _batches(client, 0), epochs=1, lr=0.1, lr_scale=lr_scale)
    with pytest.raises(ValueError, match=message):
        train_cohort([copy.deepcopy(base)], [_batches(client, 0)], epochs=1, lr=0.1,
                     lr_scale=lr_scale)
    with pytest.raises(ValueError, match=message):
        _eager_trainer(base, client, lr_scale=lr_scale)


def test_every_engine_refuses_proximal_names_the_model_lacks():
    base, client = _model("original"), _clients()[0]
    names = [n for n, _ in base.named_parameters()]
    wrong = [*names[1:], names[0] + "x"]  # one misspelt name would silently leave FedProx's term
    message = f"proximal_to names entries the model lacks: {names[0]}x"
    with pytest.raises(ValueError, match=message):
        task.train(copy.deepcopy(base), _batches(client, 0), epochs=1, lr=0.1, proximal_mu=0.1,
                   proximal_to=wrong)
    with pytest.raises(ValueError, match=message):
        train_cohort([copy.deepcopy(base)], [_batches(client, 0)], epochs=1, lr=0.1,
                     proximal_mu=0.1, proximal_to=wrong)
    with pytest.raises(ValueError, match=message):
        _eager_trainer(base, client, proximal_mu=0.1, proximal_to=wrong)


def test_a_refused_setting_leaves_the_model_and_the_generator_as_they_were():
    """task.train checks the names in lr_scale and proximal_to before it seeds the generator
    or moves the model (channels-last on CUDA, train mode)."""
    base, client = _model("original").eval(), _clients()[0]
    state, rng = copy.deepcopy(base.state_dict()), torch.get_rng_state()
    speed = task.Speed(channels_last=True)
    for settings in (dict(lr_scale={"nope": 2.0}),
                     dict(proximal_mu=0.1, proximal_to=iter(["nope"]))):
        with pytest.raises(ValueError, match="lacks"):
            task.train(base, _batches(client, 0), epochs=1, lr=0.1, seed=9, speed=speed,
                       **settings)
        assert torch.equal(torch.get_rng_state(), rng) and not base.training
        assert all(p.is_contiguous() for p in base.parameters())
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())


def test_a_name_given_twice_in_proximal_to_is_one_term():
    base, client = _model("original"), _clients()[0]
    names = [n for n, _ in base.named_parameters()]
    once, twice = copy.deepcopy(base), copy.deepcopy(base)
    for model, anchored in ((once, names), (twice, names + names[:1])):
        with torch.no_grad():  # away from the anchor, so that the term is not zero
            next(model.parameters()).add_(0.5)
        task.train(model, _batches(client, 0), epochs=1, lr=0.1, seed=3, proximal_mu=0.5,
                   proximal_to=anchored)
    assert _same(once, twice)


def test_a_cohort_refuses_models_it_would_train_differently():
    """BatchNorm's statistics and frozen parameters are not what the stacked program trains."""
    client = _clients()[0]
    norm = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2),
                               torch.nn.Flatten(), torch.nn.LazyLinear(10)).double()
    norm(client[0][:2])  # materialize the lazy layer
    with pytest.raises(ValueError, match="without buffers.*has 1.running_mean"):
        train_cohort([norm], [_batches(client, 0)], epochs=1, lr=0.1)
    frozen = _model("original")
    first = next(frozen.parameters()).requires_grad_(False)
    name = next(n for n, p in frozen.named_parameters() if p is first)
    with pytest.raises(ValueError, match=f"frozen .requires_grad=False.: {name}"):
        train_cohort([frozen], [_batches(client, 0)], epochs=1, lr=0.1)
    with pytest.raises(ValueError, match=r"one seed per model \(1\), got 0"):
        train_cohort([_model("original")], [_batches(client, 0)], epochs=1, lr=0.1, seeds=[])


def test_num_examples_counts_the_samples_a_pass_trains_on():
    x, y = _clients()[1]  # 37 samples: two full batches of 16 and one of 5
    model = _model("original")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16,
                                         drop_last=True)
    for batches in (TensorBatches(x, y, 16, drop_last=True), loader):
        assert task.train(model, batches, epochs=1, lr=0.1).num_examples == 32
    subset = torch.utils.data.SubsetRandomSampler(range(20))  # 20 of the 37: one full batch
    for drop_last, trained in ((True, 16), (False, 20)):
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16,
                                             sampler=subset, drop_last=drop_last)
        assert task.train(model, loader, epochs=1, lr=0.1).num_examples == trained
    assert task.train(model, TensorBatches(x, y, 16), epochs=1, lr=0.1).num_examples == 37


@pytest.mark.parametrize("parameterization", ["fedpara", "original"])
def test_the_graphed_step_run_eagerly_is_task_train(parameterization):
    """One trainer serves client after client: weights copied in, trained, copied out; the
    short last batch trains too; per-parameter learning rates and FedProx as in task.train."""
    base, clients = _model(parameterization), _clients()
    names = [n for n, _ in base.named_parameters()]
    lr_scale = {names[0]: 3.0}
    x0, y0 = clients[0][0][:16], clients[0][1][:16]
    trainer = GraphedTrainer(base, x0, y0, device="cpu", speed=task.PLAIN, lr_scale=lr_scale,
                             proximal_mu=0.05, proximal_to=names[1:], capture=False)
    for i, client in enumerate(clients):
        reference, model = copy.deepcopy(base), copy.deepcopy(base)
        expected = task.train(reference, _batches(client, i), epochs=2, lr=0.1, seed=i,
                              lr_scale=lr_scale, proximal_mu=0.05, proximal_to=names[1:])
        loss, seen = trainer.train(model, _batches(client, i), epochs=2, lr=0.1, seed=i)
        assert seen == 2 * SIZES[i]
        assert loss == pytest.approx(expected.loss, rel=1e-6)
        _assert_same_parameters(model, reference)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedTrainer(base, x0, y0, device="cpu", speed=task.PLAIN, capture=True)


def test_a_graphed_trainer_refuses_a_model_of_other_settings_or_dtype():
    """Tensors of the same shapes are not enough: FedPara's tanh (nonlinear) and the dtype
    change the step."""
    def fedpara(nonlinear, dtype=torch.float64):
        return build_model("cnn", num_classes=10, in_channels=1, parameterization="fedpara",
                           gamma=0.1, nonlinear=nonlinear).to(dtype)

    client = _clients()[0]
    trainer = _eager_trainer(fedpara(False), client)
    for model in (fedpara(True), fedpara(False, torch.float32)):
        with pytest.raises(ValueError, match="not of the architecture this trainer captured"):
            trainer.train(model, _batches(client, 0), epochs=1, lr=0.1)
    trainer.train(fedpara(False), _batches(client, 0), epochs=1, lr=0.1)


def test_trainer_for_reads_proximal_names_given_as_an_iterator_once(monkeypatch):
    monkeypatch.setattr(graphed, "_CACHE", {})
    base, client = _model("original"), _clients()[0]
    names = [n for n, _ in base.named_parameters()]
    settings = dict(device=torch.device("cpu"), speed=task.PLAIN, proximal_mu=0.1)
    first = graphed.trainer_for(base, client[0][:16], client[1][:16], proximal_to=iter(names),
                                **settings)
    assert len(first.proximal.params) == len(names)
    again = graphed.trainer_for(base, client[0][:16], client[1][:16], proximal_to=names,
                                **settings)
    assert again is first  # the same names, so the same cached trainer


def test_a_seed_fixes_dropout_in_every_engine():
    """VGG's dropout: the same seed gives the same masks, in each engine (the eager graphed
    step draws the ones task.train draws; a cohort draws its own, but reproducibly)."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 32),
                               torch.nn.Dropout(0.5), torch.nn.Linear(32, 10)).double()
    client = _clients()[1]
    trainer = _eager_trainer(base, client)

    def apart(seed):
        model = copy.deepcopy(base)
        task.train(model, _batches(client, 0), epochs=1, lr=0.5, seed=seed)
        return model

    def together(seed):
        model = copy.deepcopy(base)
        train_cohort([model], [_batches(client, 0)], epochs=1, lr=0.5, seeds=[seed])
        return model

    def replayed(seed):
        model = copy.deepcopy(base)
        trainer.train(model, _batches(client, 0), epochs=1, lr=0.5, seed=seed)
        return model

    for engine in (apart, together, replayed):
        assert _same(engine(5), engine(5)), engine.__name__
        assert not _same(engine(5), engine(6)), engine.__name__
    assert _same(replayed(5), apart(5))


def test_a_cohort_takes_task_trains_lr_scale_and_proximal_names():
    """lr_scale and proximal_to are task.train's in the cohort too: one parameter at 3 times
    the rate and left out of FedProx's term, clients of unequal size."""
    base, clients = _model("original"), _clients()
    names = [n for n, _ in base.named_parameters()]
    settings = dict(lr_scale={names[0]: 3.0}, proximal_mu=0.5, proximal_to=names[1:])
    apart = [copy.deepcopy(base) for _ in SIZES]
    for i, client in enumerate(clients):
        task.train(apart[i], _batches(client, i), epochs=2, lr=0.1, seed=3, **settings)
    together = [copy.deepcopy(base) for _ in SIZES]
    train_cohort(together, [_batches(c, i) for i, c in enumerate(clients)], epochs=2, lr=0.1,
                 seeds=[3] * 3, **settings)
    for a, b in zip(together, apart, strict=True):
        _assert_same_parameters(a, b, rtol=1e-12)


def test_a_graphed_trainer_anchors_fedprox_at_each_clients_own_start():
    """One trainer serves round after round: FedProx pulls each client towards the weights it
    started from (that round's global model), not towards the template's."""
    base, client = _model("original"), _clients()[0]
    trainer = _eager_trainer(base, client, proximal_mu=0.5)
    generator = torch.Generator().manual_seed(4)
    for moved in (False, True):
        start = copy.deepcopy(base)
        if moved:  # a later round's global model
            with torch.no_grad():
                for p in start.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        reference, model = copy.deepcopy(start), copy.deepcopy(start)
        task.train(reference, _batches(client, 0), epochs=1, lr=0.1, seed=1, proximal_mu=0.5)
        trainer.train(model, _batches(client, 0), epochs=1, lr=0.1, seed=1)
        _assert_same_parameters(model, reference)


def test_trainer_for_keeps_one_trainer_per_step_setting(monkeypatch):
    monkeypatch.setattr(graphed, "_CACHE", {})
    base, client = _model("original"), _clients()[0]
    first = next(n for n, _ in base.named_parameters())

    def trainer(**step):
        return graphed.trainer_for(base, client[0][:16], client[1][:16],
                                   device=torch.device("cpu"), speed=task.PLAIN, **step)

    plain, scaled, pulled = trainer(), trainer(lr_scale={first: 3.0}), trainer(proximal_mu=0.1)
    assert len({id(plain), id(scaled), id(pulled)}) == 3
    assert sorted(scale for scale, _, _ in scaled.groups) == [1.0, 3.0]
    assert pulled.proximal is not None and plain.proximal is None
    assert trainer(lr_scale={first: 3.0}) is scaled


def test_trainer_for_evicts_the_least_recently_used_trainer(monkeypatch):
    monkeypatch.setattr(graphed, "_CACHE", {})
    monkeypatch.setattr(graphed, "_CACHE_SIZE", 2)
    base, (x, y) = _model("original"), _clients()[0]

    def trainer(batch):  # one trainer per batch shape
        return graphed.trainer_for(base, x[:batch], y[:batch], device=torch.device("cpu"),
                                   speed=task.PLAIN)

    first, second = trainer(16), trainer(8)
    assert trainer(16) is first  # used again: now the most recently used
    third = trainer(4)  # the cache is full: the least recently used (second) goes
    assert len(graphed._CACHE) == 2
    assert trainer(16) is first and trainer(4) is third
    assert trainer(8) is not second


def test_the_graphed_step_carries_buffers_in_and_out():
    """BatchNorm's running statistics are the client's: copied in, updated as task.train
    updates them, copied back."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
                               torch.nn.Flatten(), torch.nn.Linear(400, 10)).double()
    client = _clients()[0]
    trainer = _eager_trainer(base, client)
    start = copy.deepcopy(base)
    start[1].running_mean.fill_(0.5)  # a later round's statistics, not the template's
    reference, model = copy.deepcopy(start), copy.deepcopy(start)
    task.train(reference, _batches(client, 0), epochs=1, lr=0.1, seed=1)
    trainer.train(model, _batches(client, 0), epochs=1, lr=0.1, seed=1)
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


def test_the_graphed_step_takes_task_trains_bf16_autocast():
    """`speed.bf16` autocasts the trainer's step as it does task.train's (float32 weights)."""
    base, client = _model("fedpara", torch.float32), _clients(torch.float32)[0]
    bf16 = task.Speed(bf16=True)
    trainer = _eager_trainer(base, client, speed=bf16)
    reference, model, plain = (copy.deepcopy(base) for _ in range(3))
    expected = task.train(reference, _batches(client, 0), epochs=1, lr=0.1, seed=1, speed=bf16)
    fp32 = task.train(plain, _batches(client, 0), epochs=1, lr=0.1, seed=1)
    loss, _ = trainer.train(model, _batches(client, 0), epochs=1, lr=0.1, seed=1)
    # float32 steps that round an ulp apart from task.train's optimizer, which bf16 then
    # amplifies: near task.train's bf16 run, far from its float32 one
    assert abs(loss - expected.loss) < abs(fp32.loss - expected.loss) / 5
    assert _gap(model, reference) < _gap(plain, reference) / 5


def _gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """‖a − b‖ / ‖b‖ over all parameters."""
    pairs = [(p.detach(), q.detach()) for p, q in zip(a.parameters(), b.parameters(),
                                                        strict=True)]
    return (sum(float((p - q).double().square().sum()) for p, q in pairs)
            / sum(float(q.double().square().sum()) for _, q in pairs)) ** 0.5


def test_a_kept_cohort_step_serves_round_after_round(monkeypatch):
    """The captured cohort step's logic, run eagerly (the capture needs CUDA): kept across
    calls, a round's clients copied into its own tensors and back out, its learning rate and
    losses reset; each round ends where the uncaptured cohort ends, the short last step
    included."""
    from fedpara import cohort

    monkeypatch.setattr(cohort, "_check_capture", lambda device: None)
    monkeypatch.setattr(cohort._CohortStep, "_capture", lambda self: None)
    monkeypatch.setattr(cohort, "_CACHE", {})
    base, clients = _model("fedpara"), _clients()
    for r, lr in enumerate((0.1, 0.05)):  # two rounds, each from the start (not where the
        # kept step's tensors were left)
        kept, fresh = ([copy.deepcopy(base) for _ in SIZES] for _ in range(2))
        got = train_cohort(kept, [_batches(c, 10 * r + i) for i, c in enumerate(clients)],
                           epochs=1, lr=lr, graph=True)
        want = train_cohort(fresh, [_batches(c, 10 * r + i) for i, c in enumerate(clients)],
                            epochs=1, lr=lr, graph=False)
        assert [g.loss for g in got] == pytest.approx([w.loss for w in want], rel=1e-12)
        for a, b in zip(kept, fresh, strict=True):
            _assert_same_parameters(a, b, rtol=1e-12)
    [step] = cohort._CACHE.values()  # one step served both rounds
    assert all(p is not q for p, q in zip(step.params.values(), kept[0].parameters()))
    assert not _same(kept[0], base)  # and it trained
    other = [_model("original") for _ in SIZES]  # another architecture: a step of its own
    train_cohort(other, [_batches(c, i) for i, c in enumerate(clients)], epochs=1, lr=0.1,
                 graph=True)
    assert len(cohort._CACHE) == 2


def test_a_captured_cohort_step_needs_cuda():
    base, clients = _model("fedpara"), _clients()
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="graph=True .* needs a CUDA device, got device=cpu"):
        train_cohort([model], [_batches(clients[0], 0)], epochs=1, lr=0.1, graph=True)
    assert _same(model, base)
