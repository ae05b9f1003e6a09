"""Checkpoints, "same experiment" and the module layering, without Flower, Ray or data.

The federation tests (test_federation.py) write and resume real checkpoints in a simulation;
these check the pieces on their own: fedpara.checkpoints, config.differing_fields, and that the
leaf modules (config, messages) import nothing from the library.
"""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from fedpara import config as config_module
from fedpara.checkpoints import (
    ForeignCheckpoints,
    check_fresh_start,
    check_resumable,
    checkpoint_path,
    clear_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fedpara.config import EXECUTION_FIELDS, ExperimentConfig, differing_fields, get_preset
from fedpara.history import History, RoundRecord

PACKAGE = Path(config_module.__file__).parent
CONFIG = ExperimentConfig(num_clients=4, clients_per_round=2, rounds=3, seed=5)


def fedpara_imports(module: str) -> set[str]:
    """The fedpara modules `fedpara/<module>.py` imports, at any depth of its code."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from .layers import ...
                found.add(node.module or "")
            elif node.module and node.module.startswith("fedpara"):
                name = node.module.removeprefix("fedpara").lstrip(".")
                found.update([name] if name else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("fedpara.") for a in node.names
                         if a.name.startswith("fedpara"))
    return found


# the layering --------------------------------------------------------------------------------


def test_config_and_messages_are_leaves():
    assert fedpara_imports("config") == set()
    assert fedpara_imports("messages") == set()


def test_the_allowed_names_have_one_definition():
    import fedpara.accounting
    import fedpara.data
    import fedpara.models
    import fedpara.partition  # `from fedpara import partition` is the function
    import fedpara.transport

    assert fedpara.accounting.ALGORITHMS is config_module.ALGORITHMS
    assert fedpara.data.DATASETS is config_module.DATASETS
    assert fedpara.models.MODELS is config_module.MODELS
    assert fedpara.models.PARAMETERIZATIONS is config_module.PARAMETERIZATIONS
    assert sys.modules["fedpara.partition"].SCHEMES is config_module.SCHEMES
    assert fedpara.transport.TRANSPORTS is config_module.TRANSPORTS


def test_the_apps_share_the_message_keys_and_the_server_reads_no_client_code():
    assert "messages" in fedpara_imports("client_app") & fedpara_imports("server_app")
    assert "client_app" not in fedpara_imports("server_app")
    assert "server_app" not in fedpara_imports("checkpoints")


def test_the_server_strategy_is_a_plain_class():
    pytest.importorskip("flwr")
    from flwr.serverapp.strategy import Strategy

    from fedpara.server_app import FedParaStrategy

    assert not issubclass(FedParaStrategy, Strategy)


def test_checkpoints_import_torch_only_to_read_or_write_one():
    """results.py finds checkpoints on a machine that only reads histories (no torch, no flwr)."""
    tree = ast.parse((PACKAGE / "checkpoints.py").read_text())
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    modules = {a.name for n in top_level if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in top_level if isinstance(n, ast.ImportFrom)}
    assert not {m for m in modules if m.split(".")[0] in ("torch", "flwr", "ray")}


# the same experiment -------------------------------------------------------------------------


def test_execution_fields_never_make_another_experiment():
    moved = CONFIG.replace(data_dir="/elsewhere", device="cpu", results_dir="r", checkpoint_dir="c",
                           checkpoint_every=3, client_num_cpus=2.0, client_num_gpus=0.5,
                           fast_batches=False)
    assert set(EXECUTION_FIELDS) <= set(CONFIG.to_dict())
    assert differing_fields(moved.to_dict(), CONFIG) == []
    assert differing_fields(CONFIG.replace(engine="cohort").to_dict(), CONFIG) == []
    assert differing_fields(CONFIG.replace(lr=0.05, rounds=4).to_dict(), CONFIG) == ["lr", "rounds"]
    assert differing_fields(CONFIG.replace(lr=0.05, rounds=4).to_dict(), CONFIG,
                            also=("rounds",)) == ["lr"]


def test_a_field_missing_from_a_stored_config_counts_as_its_default():
    older = {k: v for k, v in CONFIG.to_dict().items() if k != "transport"}
    assert differing_fields(older, CONFIG) == []
    assert differing_fields(older, CONFIG.replace(transport="float16")) == ["transport"]


# checkpoints ---------------------------------------------------------------------------------


def write(config: ExperimentConfig, server_round: int, keep: int = 2):
    history = History(config=config.to_dict())
    for r in range(1, server_round + 1):
        history.append(RoundRecord(round=r, accuracy=0.5, loss=1.0, bytes_up=1, bytes_down=1,
                                   cum_bytes=2 * r, wall_seconds=0.1))
    arrays = {"w": torch.full((2, 3), float(server_round)), "n": torch.tensor([server_round])}
    local = {1: {"head.bias": torch.ones(2) * server_round}}
    return save_checkpoint(config, server_round, arrays, local, {9, 2}, history, keep=keep)


def test_a_checkpoint_reads_back_and_only_the_latest_two_are_kept(tmp_path):
    config = CONFIG.replace(checkpoint_dir=str(tmp_path))
    assert latest_checkpoint(tmp_path) is None and latest_checkpoint("") is None
    paths = [write(config, r) for r in (1, 2, 3)]
    assert paths == [checkpoint_path(tmp_path, r) for r in (1, 2, 3)]
    assert sorted(tmp_path.iterdir()) == paths[1:]  # no temporary files left either
    assert latest_checkpoint(tmp_path) == paths[-1]
    state = load_checkpoint(paths[-1], config)
    assert list(state) == ["round", "config", "run_name", "global", "local", "trained",
                           "strategy", "history"]
    assert state["run_name"] == config.run_name
    assert state["strategy"] == {}  # FedAvg carries nothing between rounds
    # sorted: the set {9, 2} iterates 9 first
    assert state["round"] == 3 and state["trained"] == [2, 9]
    assert state["config"] == config.to_dict()
    assert torch.equal(state["global"]["w"], torch.full((2, 3), 3.0))
    assert state["global"]["n"].dtype == torch.int64
    assert torch.equal(state["local"][1]["head.bias"], torch.full((2,), 3.0))
    assert len(History.from_dict(state["history"])) == 3
    clear_checkpoints(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_are_ordered_by_round_number_past_round_99999(tmp_path):
    config = CONFIG.replace(checkpoint_dir=str(tmp_path), rounds=100_001)
    history = History(config=config.to_dict())  # the records do not matter here
    paths = [save_checkpoint(config, r, {"w": torch.zeros(1)}, {}, set(), history)
             for r in (99_999, 100_000, 100_001)]
    assert sorted(tmp_path.iterdir()) == sorted(paths[1:])  # the two latest rounds are kept
    assert latest_checkpoint(tmp_path) == paths[-1] == checkpoint_path(tmp_path, 100_001)


@pytest.mark.parametrize("keep", [0, -1, 1.5, True])
def test_a_checkpoint_must_keep_itself(tmp_path, keep):
    config = CONFIG.replace(checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"keep=.* must be an integer >= 1"):
        write(config, 1, keep=keep)
    assert list(tmp_path.iterdir()) == []  # refused before anything is written
    with pytest.raises(ValueError, match=r"keep=-1 must be an integer >= 0"):
        clear_checkpoints(tmp_path, keep=-1)


def test_resume_takes_more_rounds_and_other_machines_but_not_another_experiment(tmp_path):
    config = CONFIG.replace(checkpoint_dir=str(tmp_path))
    path = write(config, 2)
    assert load_checkpoint(path, config.replace(rounds=10, device="cpu"))["round"] == 2
    with pytest.raises(ValueError, match="different experiment: fields lr, seed differ"):
        load_checkpoint(path, config.replace(lr=0.5, seed=1))
    with pytest.raises(ValueError, match="round 2 > rounds=1"):
        load_checkpoint(path, config.replace(rounds=1))
    check_resumable(config, resume=True)
    check_resumable(CONFIG, resume=False)
    with pytest.raises(ValueError, match="resume=True needs config.checkpoint_dir"):
        check_resumable(CONFIG, resume=True)


def test_a_fresh_run_deletes_only_its_own_experiments_checkpoints(tmp_path):
    """A fresh run clears its folder; a folder holding another experiment's checkpoints (any
    field but where the run executed, rounds included) is refused, so a run with changed
    settings pointed at a preset's folder cannot wipe that run's checkpoints."""
    config = CONFIG.replace(checkpoint_dir=str(tmp_path))
    check_fresh_start(config.replace(checkpoint_dir=str(tmp_path / "none")))  # no folder yet
    path = write(config, 2)
    check_fresh_start(config.replace(device="cpu", data_dir="/elsewhere"))  # the same experiment
    for other in (config.replace(rounds=4), config.replace(lr=0.5, seed=1)):
        with pytest.raises(ValueError, match="another experiment .* which a fresh run would"):
            check_fresh_start(other)
    assert path.exists()
    path.write_bytes(path.read_bytes()[:100])  # cut short: nobody's, it may go
    check_fresh_start(config.replace(rounds=4))


def test_a_presets_own_rerun_clears_an_older_definition_of_it(tmp_path):
    """After a preset's definition changed, its own folder holds checkpoints that differ from
    the preset's run now: that run may clear them; a changed run may not."""
    config = get_preset("fmnist-noniid", variant="fedpara", profile="smoke",
                        checkpoint_dir=str(tmp_path))
    older = dataclasses.replace(config, lr=config.lr * 2)  # as an older definition made it:
    path = write(older, 1)
    state = torch.load(path, weights_only=True)
    assert state["run_name"] == "fedpara-smoke+lr=0.2"  # the preset's own run under it had
    torch.save({**state, "run_name": "fedpara-smoke"}, path)  # no changes to name
    check_fresh_start(config)
    with pytest.raises(ValueError, match="fields lr, rounds differ"):
        check_fresh_start(config.replace(rounds=5))
    with pytest.raises(ValueError, match="another experiment"):  # another preset's own run
        check_fresh_start(get_preset("fmnist-gamma", variant="fedpara-0.2", profile="smoke",
                                     checkpoint_dir=str(tmp_path)))
    assert path.exists()


def test_a_presets_own_rerun_keeps_a_changed_runs_checkpoints_in_its_folder(tmp_path):
    """The older-definition exemption is for checkpoints written as the preset's own run: a
    run with changed settings that was pointed at the preset's folder is another experiment."""
    config = get_preset("fmnist-noniid", variant="fedpara", profile="smoke",
                        checkpoint_dir=str(tmp_path))
    path = write(config.replace(lr=config.lr * 2), 1)
    with pytest.raises(ForeignCheckpoints, match="fields lr differ"):
        check_fresh_start(config)
    assert path.exists()


def test_a_fresh_run_checks_every_checkpoint_not_only_the_latest(tmp_path):
    """An unreadable latest checkpoint says nothing about its owner; the older ones still do."""
    config = CONFIG.replace(checkpoint_dir=str(tmp_path))
    latest = [write(config.replace(lr=0.5), r) for r in (1, 2)][-1]
    latest.write_bytes(latest.read_bytes()[:100])
    with pytest.raises(ForeignCheckpoints, match="round-00001.pt: fields lr differ"):
        check_fresh_start(config)
    latest.unlink()
    checkpoint_path(tmp_path, 1).write_bytes(b"not a checkpoint")
    check_fresh_start(config)  # nothing readable: nobody's, they may go


def test_a_newer_checkpoint_of_this_experiment_vouches_only_for_more_rounds(tmp_path):
    """Older checkpoints may differ from a newer one of this experiment in `rounds` only."""
    config = CONFIG.replace(checkpoint_dir=str(tmp_path))
    write(config.replace(lr=0.5), 1, keep=5)
    write(config, 2, keep=5)
    with pytest.raises(ForeignCheckpoints, match="round-00001.pt: fields lr differ"):
        check_fresh_start(config)


def test_a_fresh_rerun_of_a_run_resumed_for_more_rounds_may_clear_its_folder(tmp_path):
    """A run of 2 rounds resumed to 4 leaves a round-2 checkpoint that says rounds=2 next to
    the round-4 one: both are the rerun's own; alone, the rounds=2 one is another run's."""
    config = CONFIG.replace(checkpoint_dir=str(tmp_path), rounds=4)
    write(config.replace(rounds=2), 2)
    with pytest.raises(ForeignCheckpoints, match="fields rounds differ"):
        check_fresh_start(config)
    write(config, 4)
    check_fresh_start(config)


def test_scoring_needs_the_last_round_of_the_same_run(tmp_path):
    config = CONFIG.replace(checkpoint_dir=str(tmp_path))
    last = write(config, 3)
    assert load_checkpoint(last, config, last_round=True)["round"] == 3
    with pytest.raises(ValueError, match="rounds differ"):  # a longer run's checkpoint
        load_checkpoint(last, config.replace(rounds=5), last_round=True)
    middle = write(config.replace(checkpoint_dir=str(tmp_path / "other")), 2)
    with pytest.raises(ValueError, match="expected the last round, 3"):
        load_checkpoint(middle, config, last_round=True)
