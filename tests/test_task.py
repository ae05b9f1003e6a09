"""fedpara.task without Flower: pFedPara's learning-rate multiplier and the per-round diagnostics."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedpara import task
from fedpara.config import ExperimentConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def pfedpara_config(**changes) -> ExperimentConfig:
    values = dict(dataset="fashion-mnist", model="mlp", parameterization="fedpara", gamma=0.5,
                  algorithm="pfedpara", evaluation="clients", device="cpu")
    return ExperimentConfig(**{**values, **changes})


def test_lr_scales_name_the_local_factors_only():
    config = pfedpara_config(local_lr_scale=30.0)
    model = task.init_model(config)
    scales = task.lr_scales(model, config)
    assert set(scales) == {f"{layer}.{f}" for layer in ("classifier.0", "classifier.2", "head")
                           for f in ("x2", "y2")}
    assert set(scales.values()) == {30.0}
    assert task.lr_scales(model, pfedpara_config()) == {}  # a multiplier of 1 changes nothing


def test_a_step_with_lr_scale_is_sgd_with_that_learning_rate_per_parameter():
    config = pfedpara_config(local_lr_scale=7.0)
    model = task.init_model(config)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    task.train(model, [(x, y)], epochs=1, lr=0.05, lr_scale=task.lr_scales(model, config))
    for (name, p), g in zip(model.named_parameters(), grads, strict=True):
        lr = 0.05 * (7.0 if name.rsplit(".", 1)[1] in ("x2", "y2") else 1.0)
        torch.testing.assert_close(p.detach(), before[name] - lr * g)


def test_the_product_split_builds_layers_without_the_plus_one():
    paper = task.init_model(pfedpara_config())
    product = task.init_model(pfedpara_config(personal_split="product"))
    assert all(m.plus_one for m in paper.modules() if hasattr(m, "plus_one") and m.personalized)
    layers = [m for m in product.modules() if getattr(m, "personalized", False)]
    assert layers and not any(m.plus_one for m in layers)
    # the same factors are sent either way
    assert task.split_keys(paper, "pfedpara") == task.split_keys(product, "pfedpara")


def test_bad_lr_scale_names_the_problem():
    model = task.init_model(pfedpara_config())
    with pytest.raises(ValueError, match="lacks"):
        task.train(model, [], epochs=1, lr=0.1, lr_scale={"nope.x2": 2.0})
    for multiplier in (0.0, float("inf")):
        with pytest.raises(ValueError, match="> 0"):
            task.train(model, [], epochs=1, lr=0.1, lr_scale={"head.x2": multiplier})


@pytest.mark.parametrize(("settings", "message"), [
    (dict(lr=float("nan")), "lr=nan must be a finite number > 0"),
    (dict(lr=float("inf")), "lr=inf must be a finite number > 0"),
    (dict(lr=0.0), "lr=0.0 must be a finite number > 0"),
    (dict(epochs=0), "epochs=0 must be an integer >= 1"),
    (dict(epochs=2.5), "epochs=2.5 must be an integer >= 1"),
    (dict(epochs=True), "epochs=True must be an integer >= 1"),
    (dict(proximal_mu=float("inf")), "proximal_mu=inf must be a finite number >= 0"),
])
def test_train_refuses_settings_it_cannot_train_with(settings, message):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    before = [p.detach().clone() for p in model.parameters()]
    batches = [(torch.randn(2, 1, 2, 2), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match=message):
        task.train(model, batches, **{"epochs": 1, "lr": 0.1, **settings})
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_train_refuses_a_one_shot_iterator_of_batches():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    batches = [(torch.randn(2, 1, 2, 2), torch.tensor([0, 1]))] * 2
    with pytest.raises(ValueError, match="batches is a one-shot generator.*allowed: a list"):
        task.train(model, (b for b in batches), epochs=3, lr=0.1)
    with pytest.raises(ValueError, match="one-shot list_iterator"):
        task.train(model, iter(batches), epochs=1, lr=0.1)
    assert task.train(model, batches, epochs=3, lr=0.1).num_examples == 4


def test_set_arrays_refuses_an_array_that_would_broadcast_and_writes_nothing():
    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"weight has shape \(4,\), the model's \(3, 4\)"):
        task.set_arrays(model, {"bias": torch.ones(3), "weight": torch.arange(4.0)})
    with pytest.raises(ValueError, match=r"bias has shape \(\), the model's \(3,\)"):
        task.set_arrays(model, {"bias": torch.tensor(7.0)})
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    task.set_arrays(model, {"bias": torch.ones(3).numpy()})
    assert torch.equal(model.bias, torch.ones(3))


def test_relative_changes_follow_the_tracked_parameters():
    model = task.init_model(pfedpara_config())
    before = task.snapshot(model)
    assert list(before) == task.tracked_parameters(model)
    assert all(v == 0 for v in task.relative_changes(before, model))
    with torch.no_grad():
        model.head.x1.mul_(1.5)  # moves head.x1 by half its norm, nothing else
    changes = dict(zip(before, task.relative_changes(before, model), strict=True))
    assert changes.pop("head.x1") == pytest.approx(0.5)
    assert set(changes.values()) == {0.0}


def test_a_device_this_machine_lacks_is_refused_with_the_ones_it_has():
    assert task.resolve_device("cpu") == torch.device("cpu")
    assert task.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, on any machine
    with pytest.raises(ValueError, match=f"device='{missing}' is not available on this "
                                         f"machine; allowed here: auto, cpu"):
        task.resolve_device(missing)
    for other in ("xpu", "meta", "cpu:3"):  # names torch parses, but not devices a run uses
        with pytest.raises(ValueError, match=f"device='{other}' is not available"):
            task.resolve_device(other)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_the_hardware_record_of_a_cuda_run_written_on_a_host_without_cuda():
    # a deployment's server may have no GPU while its nodes train on one
    from fedpara.history import hardware_info

    record = hardware_info("cuda")
    assert record["device"] == "cuda" and "this host has no CUDA device" in record["device_name"]


def test_a_run_records_the_git_commit_of_its_source(tmp_path):
    """The commit, "+modified" when the package's files differ from it; None for a package
    git does not track (an installed copy, even inside a checkout's ignored .venv)."""
    import subprocess

    from fedpara.history import hardware_info, source_commit

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t",
                               "-c", "user.email=t@example.org", *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    package = tmp_path / "fedpara"
    package.mkdir()
    (package / "__init__.py").write_text("")
    assert source_commit(package) is None  # no repository
    git("init", "-q")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    installed = tmp_path / ".venv" / "site-packages" / "fedpara"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "--short=12", "HEAD")
    assert source_commit(package) == head
    assert source_commit(installed) is None  # ignored: not the checkout's source
    (tmp_path / "README").write_text("outside the package")
    assert source_commit(package) == head
    (package / "layers.py").write_text("x = 1\n")
    assert source_commit(package) == head + "+modified"
    recorded = hardware_info("cpu")["commit"]  # this repository's own source
    assert recorded == source_commit()
    if (Path(task.__file__).parents[1] / ".git").exists():  # a checkout (CI's clean clone is)
        assert re.fullmatch(r"[0-9a-f]{12}(\+modified)?", recorded), recorded


def test_each_seed_round_and_client_trains_with_its_own_seed():
    # the seed of a client's shuffling, augmentation and dropout: a client that drew the same
    # seed every round would see its batches in the same order every round
    seeds = [task.client_seed(s, r, p) for s in (0, 1) for r in (1, 2, 3) for p in (0, 1, 2)]
    assert len(set(seeds)) == len(seeds) == 18
    # and the same in every process: a Ray worker, a SuperNode, a resumed run (no hash())
    script = "from fedpara import task; print(task.client_seed(0, 2, 1))"
    for hash_seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": hash_seed}, check=True)
        assert int(done.stdout) == task.client_seed(0, 2, 1)


def test_the_seed_of_train_fixes_dropout():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 16), torch.nn.Dropout(0.5),
                               torch.nn.Linear(16, 3))
    batches = [(torch.randn(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2]))]

    def trained(seed):
        model = copy.deepcopy(base)
        task.train(model, batches, epochs=2, lr=0.5, seed=seed)
        return [p.detach() for p in model.parameters()]

    first, again, other = trained(5), trained(5), trained(6)
    assert all(torch.equal(p, q) for p, q in zip(first, again, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(first, other, strict=True))
