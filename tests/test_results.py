"""fedpara.results: which stored history counts, planned traffic, per-client scores."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpara import task
from fedpara.accounting import payload_bytes
from fedpara.config import get_preset
from fedpara.history import History, RoundRecord
from fedpara.results import (
    ClientScores,
    Gap,
    client_accuracies,
    client_scores_path,
    differing_fields,
    final_gap,
    jitter,
    load_client_scores,
    load_or_train,
    planned_traffic_gib,
    run_command,
    same_experiment,
    score_clients,
)

CONFIG = get_preset("fmnist-noniid", variant="fedpara", profile="smoke")


def stored(config, tmp_path, **changes) -> History:
    """A one-round history of `config` (with some config fields changed) at its stored path."""
    history = History(config={**config.to_dict(), **changes})
    history.append(RoundRecord(round=1, accuracy=0.5, loss=1.0, bytes_up=1, bytes_down=1,
                               cum_bytes=2, wall_seconds=0.1))
    history.save(History.default_path(config, tmp_path))
    return history


def curve(accuracies) -> History:
    history = History(config={})
    for r, accuracy in enumerate(accuracies, start=1):
        history.append(RoundRecord(round=r, accuracy=accuracy, loss=1.0, bytes_up=1,
                                   bytes_down=1, cum_bytes=2 * r, wall_seconds=0.1))
    return history


def test_jitter_is_the_std_of_the_last_rounds_that_scored():
    history = curve([0.1] * 5 + [0.5, 0.7, float("nan"), 0.5, 0.7])
    assert jitter(history, last=5) == pytest.approx(0.1)  # the NaN round is skipped
    assert jitter(history) == pytest.approx(float(np.nanstd(history.column("accuracy"))))
    assert math.isnan(jitter(curve([float("nan")] * 3)))
    for bad in (0, True):
        with pytest.raises(ValueError, match="last"):
            jitter(history, last=bad)


def test_final_gap_counts_a_difference_only_beyond_the_larger_jitter():
    steady, noisy = curve([0.80] * 10), curve([0.79, 0.81] * 5)  # jitter 0 and 1 point
    within = final_gap(curve([0.805] * 10), noisy)
    assert within.difference == pytest.approx(0.805 - (0.81 + 0.79 + 0.81) / 3)
    assert within.noise == pytest.approx(0.01) and within.ahead == 0 and within.within
    assert final_gap(curve([0.82] * 10), noisy).ahead == 1
    assert final_gap(noisy, curve([0.82] * 10)).ahead == -1
    # a tie (the jitter of a constant 0.8 is a rounding error, 1e-16, not 0)
    assert final_gap(steady, curve([0.80] * 10)).ahead == 0
    assert Gap(0.0, 0.0).ahead == 0  # an exact tie is a tie, even without any jitter
    assert final_gap(steady, curve([0.801] * 10)).ahead == -1  # no jitter: any difference
    assert Gap(float("nan"), 0.0).ahead == 0  # nothing to compare: no finding


def test_final_by_seed_keeps_the_runs_every_seed_has_in_the_first_seeds_order():
    from fedpara.results import final_by_seed

    by_seed = {2: {"b": curve([0.1, 0.5, 0.6, 0.7]), "a": curve([0.4] * 4)},
               0: {"b": curve([0.2] * 4), "a": curve([0.3] * 4), "c": curve([0.9] * 4)}}
    assert final_by_seed(by_seed) == {"b": {0: pytest.approx(0.2), 2: pytest.approx(0.6)},
                                      "a": {0: pytest.approx(0.3), 2: pytest.approx(0.4)}}
    assert list(final_by_seed(by_seed)) == ["b", "a"]  # seed 0's order; "c" is in one seed
    assert list(final_by_seed(by_seed)["b"]) == [0, 2]
    assert final_by_seed(by_seed, window=1)["b"][2] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="by_seed is empty"):
        final_by_seed({})


def test_seed_table_gives_each_runs_seeds_mean_and_range():
    from fedpara.results import seed_table

    table = seed_table({"p": {"a": {0: 0.5, 2: 0.8}, "b": {0: 0.7, 2: 0.6}}, "q": {}})
    assert list(table.index) == [("p", "a"), ("p", "b")]
    assert list(table.columns) == ["seed 0", "seed 2", "mean", "lowest", "highest"]
    assert list(table.loc[("p", "a")]) == pytest.approx([0.5, 0.8, 0.65, 0.5, 0.8])
    assert list(table.loc[("p", "b")]) == pytest.approx([0.7, 0.6, 0.65, 0.6, 0.7])
    with pytest.raises(ValueError, match="finals holds no run"):
        seed_table({"q": {}})
    with pytest.raises(ValueError, match=r"finals\['p'\]\['a'\] is empty"):
        seed_table({"p": {"a": {}}})
    nan = float("nan")  # the summary columns are over the seeds that scored
    row = seed_table({"p": {"a": {0: nan, 1: 0.6, 2: 0.8}}}).loc[("p", "a")]
    assert math.isnan(row["seed 0"]) and list(row[1:]) == pytest.approx([0.6, 0.8, 0.7, 0.6,
                                                                          0.8])


def test_seed_spread_is_the_mean_then_the_lowest_and_highest_seed():
    from fedpara.results import seed_spread

    assert seed_spread({0: 0.821, 1: 0.818, 2: 0.828}) == "82.2% (81.8% to 82.8%)"
    assert seed_spread({5: 0.5}) == "50.0% (50.0% to 50.0%)"
    nan = float("nan")  # a seed that scored nothing is named, not averaged (in any position)
    assert seed_spread({0: nan, 1: 0.8, 2: 0.7}) == (
        "75.0% (70.0% to 80.0%), not scored in seed 0")
    assert seed_spread({0: 0.8, 1: nan, 2: nan}) == (
        "80.0% (80.0% to 80.0%), not scored in seed 1 and 2")
    assert seed_spread({0: nan}) == "not scored"
    from fedpara.results import seed_mean

    assert seed_mean({0: nan, 1: 0.8, 2: 0.7}) == pytest.approx(0.75)
    assert math.isnan(seed_mean({0: nan})) and math.isnan(seed_mean({}))
    with pytest.raises(ValueError, match="accuracy is empty"):
        seed_spread({})


def test_a_seed_with_only_some_of_the_runs_is_left_out_whole():
    from fedpara.results import complete_seeds

    run = curve([0.5])
    by_seed = {2: {"a": run, "b": run}, 0: {"a": run, "b": run, "c": run}, 1: {"a": run},
               3: {"b": run, "a": run, "c": run}}
    assert {s: sorted(r) for s, r in complete_seeds(by_seed).items()} == {
        0: ["a", "b", "c"], 3: ["a", "b", "c"]}  # the lowest seed's runs, in seed order
    assert list(complete_seeds(by_seed, reference=2)) == [0, 2, 3]
    assert complete_seeds({}) == {} and complete_seeds({4: {}, 5: {"a": run}}) == {}
    with pytest.raises(ValueError, match=r"reference=7 is not a seed of by_seed; allowed: 0, 1"):
        complete_seeds({0: {}, 1: {}}, reference=7)


def test_seed_agreement_says_what_the_outcomes_over_seeds_have_in_common():
    from fedpara.results import listed, seed_agreement

    assert seed_agreement([0, 0]) == "level in every seed"
    assert seed_agreement([1, 1, 1]) == seed_agreement([-1]) == "the same side in every seed"
    assert seed_agreement([1, 0, 1]) == seed_agreement([0, -1]) == (
        "the same side wherever a seed separates them")
    assert seed_agreement([1, -1]) == seed_agreement([-1, 0, 1]) == (
        "different sides in different seeds")
    for bad in ([], [2]):
        with pytest.raises(ValueError, match="sides=.*expected outcomes in -1, 0, 1"):
            seed_agreement(bad)
    assert listed([1]) == "1" and listed(["a", "b"]) == "a and b"
    assert listed(["a", "b", "c"]) == "a, b and c"
    with pytest.raises(ValueError, match="items is empty"):
        listed([])


def test_signed_differences_never_read_minus_zero():
    from fedpara.results import signed
    assert signed(1.234) == "+1.2" and signed(-0.36) == "-0.4"
    assert signed(-0.033) == signed(0.04) == signed(-0.0) == "0.0"  # not "-0.0" or "+0.0"
    assert signed(-0.033, 2) == "-0.03" and signed(0.004, 2) == "0.00"


def test_sides_over_seeds_counts_each_seed_by_the_single_seed_rule():
    from fedpara.results import sides_over_seeds

    steady, noisy = curve([0.80] * 10), curve([0.79, 0.81] * 5)  # jitter 0 and 1 point
    by_seed = {0: {"a": curve([0.85] * 10), "b": steady},  # above
               1: {"a": curve([0.805] * 10), "b": noisy},  # within the jitter: level
               2: {"a": curve([0.70] * 10), "b": steady},  # below
               3: {"a": curve([0.90] * 10), "b": steady},  # above
               4: {"a": curve([0.10] * 10)}}  # no "b": left out
    assert sides_over_seeds(by_seed, "a", "b") == (
        "above `b` in 2, level with it in 1, below it in 1")
    assert sides_over_seeds(by_seed, "b", "a", called="A") == (
        "above A in 1, level with it in 1, below it in 2")
    only_below = {s: by_seed[s] for s in (2,)}
    assert sides_over_seeds(only_below, "a", "b", called="B") == "below B in 1"
    with pytest.raises(ValueError, match="no seed holds both 'a' and 'c'"):
        sides_over_seeds(by_seed, "a", "c")
    from fedpara.results import sides_by_seed

    assert sides_by_seed(by_seed, "a", "b") == {0: 1, 1: 0, 2: -1, 3: 1}
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=r"window=.* must be an integer >= 1"):
            sides_by_seed(by_seed, "a", "b", window=bad)


def test_a_chapters_seeds_parameter_is_read_as_distinct_integers_or_refused_by_name():
    from fedpara.results import parse_seeds

    assert parse_seeds("2, 1,,2 ") == [1, 2] and parse_seeds([3, "0"]) == [0, 3]
    assert parse_seeds("") == parse_seeds(None) == [] and parse_seeds(3) == [3]
    for bad in ("1;2", "-1", "1.5", "one", -2):
        with pytest.raises(ValueError, match=r"seeds=.*allowed: comma-separated integers >= 0"):
            parse_seeds(bad)


def test_a_runs_summary_shows_its_final_accuracy_and_total_traffic():
    from fedpara.results import run_summary

    history = History(config=CONFIG.to_dict(), hardware={"commit": "0123456789ab+modified"})
    for r, accuracy in enumerate([0.1, 0.2, 0.6, 0.7, 0.8], start=1):  # half a GiB a round
        history.append(RoundRecord(round=r, accuracy=accuracy, loss=1.0, bytes_up=2**28,
                                   bytes_down=2**28, cum_bytes=r * 2**29, wall_seconds=6.0))
    row = run_summary(CONFIG, history, "stored")
    assert row["final accuracy"] == round((0.6 + 0.7 + 0.8) / 3, 4)  # the last FINAL_WINDOW
    assert row["traffic (GiB)"] == 2.5 and row["MiB / round"] == 512.0
    assert row["rounds run"] == 5 and row["training time (min)"] == 0.5
    assert row["commit"] == "0123456789ab+modified"


def test_where_and_how_may_differ_but_not_what():
    cli = CONFIG.replace(data_dir="/elsewhere", checkpoint_dir="checkpoints/x", device="cpu")
    assert same_experiment(cli.to_dict(), CONFIG)
    assert differing_fields(CONFIG.replace(rounds=3, lr=0.05).to_dict(), CONFIG) == ["lr", "rounds"]


def test_a_field_added_after_the_run_counts_as_its_default():
    older = CONFIG.to_dict()
    del older["seed"]  # as if the run predates the field: it ran with what the default does
    assert same_experiment(older, CONFIG)
    assert differing_fields(older, CONFIG.replace(seed=3)) == ["seed"]


def test_load_or_train_without_training(tmp_path):
    assert load_or_train(CONFIG, tmp_path, train=False) == (None, "not run yet")
    stored(CONFIG, tmp_path, gamma=0.5)
    assert load_or_train(CONFIG, tmp_path, train=False) == (None, "stored run has other settings")
    made = stored(CONFIG, tmp_path, data_dir="/other/data")  # e.g. a CLI run elsewhere
    history, status = load_or_train(CONFIG, tmp_path, train=False)
    assert status == "stored" and history.created == made.created


def test_retrain_without_training_still_shows_the_stored_run(tmp_path):
    made = stored(CONFIG, tmp_path)
    history, status = load_or_train(CONFIG, tmp_path, train=False, retrain=True)
    assert status == "stored" and history.created == made.created


def test_command_and_planned_traffic():
    assert run_command(CONFIG) == (
        "python -m fedpara.run --preset fmnist-noniid --variant fedpara --profile smoke")
    # 2 directions x clients x rounds x the float32 payload of every parameter (FedAvg)
    model = task.init_model(CONFIG)
    payload = 4 * sum(p.numel() for p in model.parameters())
    expected = 2 * CONFIG.clients_per_round * CONFIG.rounds * payload / 2**30
    assert planned_traffic_gib(CONFIG) == pytest.approx(expected) and expected > 0
    # a 16-bit wire halves it; pFedPara sends only the global factors
    assert planned_traffic_gib(CONFIG.replace(transport="bfloat16")) == pytest.approx(
        expected / 2)
    pfedpara = get_preset("fmnist-personal", variant="pfedpara")
    shared = payload_bytes(task.init_model(pfedpara), "pfedpara")
    assert planned_traffic_gib(pfedpara) == pytest.approx(
        2 * pfedpara.clients_per_round * pfedpara.rounds * shared / 2**30)
    assert shared < payload_bytes(task.init_model(pfedpara), "fedavg")
    personal = get_preset("fmnist-personal", variant="local")
    assert planned_traffic_gib(personal) == 0.0  # local-only training sends nothing
    with pytest.raises(ValueError, match="preset"):
        run_command(CONFIG.replace(preset="custom"))


def test_the_command_of_a_changed_run_makes_the_history_the_chapter_reads(tmp_path,
                                                                         monkeypatch):
    """A config with settings changed from its preset's: the command carries them, so the
    history it writes has the name the chapter looks for."""
    from fedpara.run import _parser, build_config

    changed = CONFIG.replace(seed=1, data_dir="/data/x", partition="iid")
    command = run_command(changed)
    assert command.endswith("--profile smoke --set partition=iid --set seed=1")
    monkeypatch.chdir(tmp_path)
    rebuilt = build_config(_parser().parse_args(command.split()[3:]))
    assert History.default_path(rebuilt) == History.default_path(changed)
    assert run_command(CONFIG.replace(data_dir="/y")) == run_command(CONFIG)  # where, not what


def test_client_scores_round_trip(tmp_path):
    scores = ClientScores(config=CONFIG.to_dict(), round=2, correct={0: 3, 5: 0, 7: 1},
                          examples={0: 4, 5: 0, 7: 2})
    assert scores.accuracies() == {0: 0.75, 7: 0.5}  # no held-out data: not scored
    assert scores.weighted_accuracy == pytest.approx(4 / 6)
    loaded = ClientScores.load(scores.save(tmp_path / "s.json"))
    assert loaded == scores


def test_score_clients_from_a_checkpoint(tmp_path, fmnist_dir):
    config = get_preset("fmnist-personal", variant="pfedpara", profile="smoke",
                        data_dir=str(fmnist_dir), device="cpu",
                        checkpoint_dir=str(tmp_path / "ckpt"))
    model = task.init_model(config)
    global_keys, local_keys = task.split_keys(model, config.algorithm)
    assert local_keys, "pFedPara keeps its W2 factors on the client"
    # client 3 has personal factors of its own, client 6 the initial ones
    generator = torch.Generator().manual_seed(1)
    personal = {k: v + torch.randn(v.shape, generator=generator)
                for k, v in task.get_arrays(model, local_keys).items()}
    state = {"round": config.rounds, "config": config.to_dict(), "trained": [3, 6],
             "global": task.get_arrays(model, global_keys),
             "local": {3: personal, 6: task.get_arrays(model, local_keys)}}
    checkpoint = tmp_path / "ckpt" / f"round-{config.rounds:05d}.pt"
    checkpoint.parent.mkdir()
    torch.save(state, checkpoint)

    scores = score_clients(config, checkpoint)
    assert sorted(scores.examples) == [3, 6]  # only clients that trained are scored
    for partition_id, arrays in ((3, personal), (6, {})):
        expected = task.init_model(config)
        task.set_arrays(expected, arrays)
        result = task.evaluate(expected, task.client_data(config, partition_id).holdout)
        assert (scores.correct[partition_id], scores.examples[partition_id]) == (
            result.correct, result.num_examples)

    # stored next to a history whose last accuracy they reproduce; refused for another run
    history = History(config=config.to_dict())
    for r in range(1, config.rounds + 1):
        history.append(RoundRecord(round=r, accuracy=scores.weighted_accuracy, loss=1.0,
                                   bytes_up=1, bytes_down=1, cum_bytes=2 * r, wall_seconds=0.1))
    assert load_client_scores(config, history, tmp_path / "results") == scores
    assert client_scores_path(config, tmp_path / "results").exists()
    # stored scores of another round are not these, even with the same mean: recomputed
    ClientScores(config=scores.config, round=config.rounds - 1, correct=scores.correct,
                 examples=scores.examples).save(client_scores_path(config, tmp_path / "results"))
    assert load_client_scores(config, history, tmp_path / "results") == scores
    history.records[-1].accuracy += 0.01
    assert load_client_scores(config, history, tmp_path / "results") is None

    with pytest.raises(ValueError, match="gamma"):
        score_clients(config.replace(gamma=0.25), checkpoint)
    torch.save({**state, "round": 1}, tmp_path / "ckpt" / "round-00001.pt")  # mid-run
    with pytest.raises(ValueError, match="last round"):
        score_clients(config, tmp_path / "ckpt" / "round-00001.pt")


def test_client_accuracies_prefer_the_history_then_stored_scores(tmp_path):
    config = get_preset("fmnist-personal", variant="fedper", profile="smoke")
    history = History(config=config.to_dict())
    for r in range(1, config.rounds + 1):
        history.append(RoundRecord(round=r, accuracy=0.75, loss=1.0, bytes_up=1, bytes_down=1,
                                   cum_bytes=2 * r, wall_seconds=0.1))
    assert client_accuracies(config, history, tmp_path) is None  # neither: no spread to show
    ClientScores(config=config.to_dict(), round=config.rounds, correct={1: 1, 4: 2},
                 examples={1: 2, 4: 2}).save(client_scores_path(config, tmp_path))
    assert client_accuracies(config, history, tmp_path) == {1: 0.5, 4: 1.0}
    last = history.records[-1]  # a history that records per-client accuracies comes first
    last.scored_clients, last.client_accuracy = [2, 3], [0.7, 0.8]
    assert client_accuracies(config, history, tmp_path) == {2: 0.7, 3: 0.8}


# open_chapter: the setup every experiment chapter shares ------------------------------------


def _repository(tmp_path):
    """A folder that looks like the repository root to find_root (it holds _toc.yml)."""
    (tmp_path / "_toc.yml").write_text("root: intro\n")
    return tmp_path


def test_open_chapter_without_runs_shows_the_plan(tmp_path):
    from fedpara.config import PRESETS
    from fedpara.results import find_root, open_chapter

    root = _repository(tmp_path)
    (root / "book").mkdir()
    assert find_root(root / "book") == root
    page = open_chapter("fmnist-noniid", chapter="fashion_mnist", profile="smoke",
                        root=root / "book", device="cpu")
    assert list(page.configs) == [("fmnist-noniid", v) for v in PRESETS["fmnist-noniid"].variants]
    assert page.results_dir == root / "results" and page.data_dir == str(root / "data")
    assert not page.fake_data and page.histories == {} and len(page.missing) == 3
    config = page.configs["fmnist-noniid", "fedpara"]
    assert config.checkpoint_dir == str(root / "checkpoints" / "fmnist-noniid" / "fedpara-smoke")
    assert page.plan.loc[("fmnist-noniid", "fedpara"), "planned traffic (GiB)"] == pytest.approx(
        planned_traffic_gib(config), abs=1e-4)
    assert page.plan.loc[("fmnist-noniid", "fedpara"), "command"] == run_command(config)
    assert page.plan.loc[("fmnist-noniid", "fedpara"), "MiB up per client and round"] == (
        pytest.approx(payload_bytes(task.init_model(config)) / 2**20, abs=1e-3))
    assert "planned traffic (GiB)" in page.summary.columns
    assert not page.summary.isna().any().any()
    assert page.protocol.loc["rounds", ("fmnist-noniid", "fedpara")] == config.rounds
    assert "shards_per_client" not in page.protocol.index  # applies to none of them
    assert page.protocol.loc["gamma", ("fmnist-noniid", "original")] == ""
    notice = page.notice("This machine has no GPU.")
    assert "**No runs yet.**" in notice and "This machine has no GPU." in notice
    assert "make execute CHAPTER=fashion_mnist PROFILE=smoke" in notice
    assert "FAKE DATA" not in notice and "warning" not in notice
    assert not (root / "results").exists(), "train=False never writes"


def test_open_chapter_shows_a_stored_run_and_the_runs_still_missing(tmp_path):
    from fedpara.results import open_chapter

    root = _repository(tmp_path)
    results = root / "elsewhere"
    made = stored(CONFIG, results, device="cuda")  # where it ran may differ
    page = open_chapter(["fmnist-noniid"], chapter="fashion_mnist", profile="smoke",
                        variants="fedpara,original", root=root, results_dir=results,
                        checkpoints=False)
    assert list(page.configs) == [("fmnist-noniid", "fedpara"), ("fmnist-noniid", "original")]
    assert page.configs["fmnist-noniid", "fedpara"].checkpoint_dir == ""
    assert page.runs["fmnist-noniid", "fedpara"][1] == "stored"
    assert page.histories_of("fmnist-noniid")["fedpara"].created == made.created
    assert [c.variant for c in page.missing] == ["original"]
    summary = page.summary
    assert summary.loc[("fmnist-noniid", "fedpara"), "final accuracy"] == 0.5
    assert summary.loc[("fmnist-noniid", "original"), "final accuracy"] == ""  # not nan
    assert summary.loc[("fmnist-noniid", "fedpara"), "planned traffic (GiB)"] == ""
    notice = page.notice()
    assert "No runs yet" not in notice and "a test of the machinery, not a result" in notice
    assert "--variant original --profile smoke" in notice
    assert "--variant fedpara" not in notice


def test_a_chapter_reopened_with_another_seed_reads_that_seeds_runs(tmp_path):
    from fedpara.results import Chapter, histories_by_seed, open_chapter

    root = _repository(tmp_path)
    results = root / "elsewhere"
    stored(CONFIG, results)
    other = CONFIG.replace(seed=3)
    made = stored(other, results)
    lowrank = stored(get_preset("fmnist-noniid", variant="lowrank", profile="smoke", seed=3),
                     results)
    page = open_chapter("fmnist-noniid", chapter="fashion_mnist", profile="smoke",
                        variants="fedpara,lowrank", root=root, results_dir=results,
                        checkpoints=False, rounds=1)
    assert page.seed == 0 and list(page.histories_of("fmnist-noniid")) == []  # rounds=1 differs
    page = open_chapter("fmnist-noniid", chapter="fashion_mnist", profile="smoke",
                        variants="fedpara,lowrank", root=root, results_dir=results,
                        checkpoints=False)
    before = sorted(p.name for p in results.iterdir())
    again = page.with_seed(3)
    assert again.seed == 3 and list(again.configs) == list(page.configs)
    assert again.results_dir == results and again.options["checkpoints"] is False
    assert again.histories_of("fmnist-noniid")["fedpara"].created == made.created
    assert again.histories_of("fmnist-noniid")["lowrank"].created == lowrank.created
    assert again.missing == [] and [c.variant for c in page.missing] == ["lowrank"]
    # open_chapter's overrides are kept: the seed-3 runs were made without rounds=1
    nothing = open_chapter("fmnist-noniid", chapter="fashion_mnist", profile="smoke",
                           variants="fedpara", root=root, results_dir=results,
                           checkpoints=False, rounds=1).with_seed(3)
    assert nothing.seed == 3 and nothing.histories == {} and nothing.options["rounds"] == 1
    by_seed = histories_by_seed([page, again, nothing.with_seed(5)])
    assert {p: {s: list(r) for s, r in runs.items()} for p, runs in by_seed.items()} == {
        "fmnist-noniid": {0: ["fedpara"], 3: ["fedpara", "lowrank"]}}  # seed 5: no run
    # the first page's runs are what every seed must hold: none there, no seed to compare
    assert histories_by_seed([nothing.with_seed(5), page]) == {"fmnist-noniid": {}}
    by_seed = histories_by_seed([again, page])  # seed 0 lacks lowrank: left out whole
    assert {s: list(r) for s, r in by_seed["fmnist-noniid"].items()} == {
        3: ["fedpara", "lowrank"]}
    with pytest.raises(ValueError, match="pages: seed 3 is given twice"):
        histories_by_seed([again, again])
    # with_seeds: this page first, its own seed not opened twice, the others in order
    pages = page.with_seeds("3, 0, 5")
    assert [p.seed for p in pages] == [0, 3, 5] and pages[0] is page
    assert [p.seed for p in page.with_seeds("")] == [0]
    # the notice names each other seed with runs to make, and only those
    notice = page.other_seeds_notice(pages)
    assert notice.startswith("**Seed 5.** ") and "--set seed=5" in notice
    assert "**Seed 0.**" not in notice and "**Seed 3.**" not in notice
    assert page.other_seeds_notice(pages[:2]) == ""  # seed 3 holds both runs
    # the seeds given to open_chapter are checked there, and are with_seeds' default
    chosen = open_chapter("fmnist-noniid", chapter="fashion_mnist", profile="smoke",
                          variants="fedpara", root=root, results_dir=results,
                          checkpoints=False, seeds="5,3")
    assert [p.seed for p in chosen.with_seeds()] == [0, 3, 5]
    assert [p.seed for p in chosen.with_seeds("")] == [0]
    assert [p.seed for p in chosen.with_seed(3).with_seeds()] == [3, 5]  # seeds kept
    with pytest.raises(ValueError, match="seeds='1,x': allowed: comma-separated integers"):
        open_chapter("fmnist-noniid", chapter="fashion_mnist", profile="smoke",
                     root=root, results_dir=results, train=True, seeds="1,x")
    assert sorted(p.name for p in results.iterdir()) == before  # nothing trained first
    bare = Chapter(name="x", profile="smoke", root=root, results_dir=results, data_dir="",
                   fake_data=False, configs=page.configs, runs=page.runs)
    with pytest.raises(ValueError, match="not made by open_chapter"):
        bare.with_seed(1)


def test_open_chapter_uses_fake_data_for_a_smoke_run(tmp_path):
    from fedpara.results import open_chapter

    root = _repository(tmp_path)
    page = open_chapter("cifar10-iid", chapter="cifar10", profile="smoke", variants="fedpara",
                        root=root)
    fake = root / "_build" / "fake-data"
    assert page.fake_data and page.data_dir == str(fake)
    assert (fake / "cifar-10-batches-py" / "test_batch").is_file()
    assert page.results_dir == fake / "results", "smoke histories on fake data stay apart"
    assert "FAKE DATA" in page.notice()
    full = open_chapter("cifar10-iid", chapter="cifar10", root=root, variants="fedpara")
    assert not full.fake_data and full.results_dir == root / "results"


def test_open_chapter_uses_a_given_data_dir_even_for_a_smoke_run(tmp_path):
    from fedpara.results import open_chapter

    root = _repository(tmp_path)
    page = open_chapter("cifar10-iid", chapter="cifar10", profile="smoke", variants="fedpara",
                        root=root, data_dir=root / "cifar")
    assert not page.fake_data and page.data_dir == str(root / "cifar")
    assert page.configs["cifar10-iid", "fedpara"].data_dir == str(root / "cifar")
    assert page.results_dir == root / "results" and "FAKE DATA" not in page.notice()
    assert not (root / "_build").exists(), "no fake data written"
    with pytest.raises(ValueError, match="fake_data=True.*data_dir"):
        open_chapter("cifar10-iid", chapter="cifar10", profile="smoke", root=root,
                     data_dir=root / "cifar", fake_data=True)


def test_open_chapter_rejects_unknown_presets_and_variants(tmp_path):
    from fedpara.results import open_chapter

    root = _repository(tmp_path)
    with pytest.raises(ValueError, match="presets"):
        open_chapter("no-such-preset", chapter="x", root=root)
    with pytest.raises(ValueError, match="variants"):
        open_chapter("fmnist-noniid", chapter="x", variants="no-such-variant", root=root)
    with pytest.raises(ValueError, match="fake-data writer"):
        open_chapter("fmnist-noniid", chapter="x", fake_data=True, root=root)


def test_stored_runs_group_by_two_config_fields():
    """The strategies chapter's view of the committed runs: strategy -> model -> history."""
    from fedpara.results import find_root, open_chapter

    root = find_root(Path(__file__).parent)
    page = open_chapter("fmnist-strategies,fmnist-noniid", chapter="strategies",
                        variants="fedpara,original,fedpara-fedadam,original-fedadam",
                        root=root, checkpoints=False, progress=False)
    grouped = page.grouped("strategy", "parameterization")
    assert {s: sorted(models) for s, models in grouped.items()} == {
        "fedavg": ["fedpara", "original"], "fedadam": ["fedpara", "original"]}
    assert grouped["fedadam"]["fedpara"] is page.histories["fmnist-strategies", "fedpara-fedadam"]
