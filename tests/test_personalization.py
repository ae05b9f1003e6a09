"""fedpara.personalization: the refresh gap, the factor movement and the verdict, on histories
written by hand (no training)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest

from fedpara.history import History, RoundRecord
from fedpara.personalization import (
    control,
    factor_movement,
    plot_factor_movement,
    plot_refresh_gap,
    refresh_gap,
    seed_verdict,
    verdict,
)


def record(r, accuracy=0.5, gib=1.0, **fields):
    return RoundRecord(round=r, accuracy=accuracy, loss=1.0, bytes_up=0, bytes_down=0,
                       cum_bytes=int(gib * 2**30 * r), wall_seconds=1.0, **fields)


def test_refresh_gap_pairs_each_trained_client_with_its_refreshed_score():
    history = History(config={})
    # round 1: clients 0 and 2 trained; the evaluation scores 0, 2 (and nobody else yet)
    history.append(record(1, clients=[0, 2], client_accuracy_after_training=[0.9, 0.7],
                          scored_clients=[0, 2], client_accuracy=[0.5, 0.3]))
    # round 2: client 1 trained; the evaluation scores everyone who has trained
    history.append(record(2, clients=[1], client_accuracy_after_training=[1.0],
                          scored_clients=[0, 1, 2], client_accuracy=[0.5, 0.6, 0.3]))
    history.append(record(3))  # an old-style record without the fields: left out
    gap = refresh_gap(history)
    fig = plot_refresh_gap({"run": history}, smooth=2)
    line = next(l for l in fig.axes[0].lines if l.get_label() == "run")
    assert list(line.get_xdata()) == [2] and line.get_ydata()[0] == pytest.approx(40.0)
    assert gap["round"] == [1, 2]
    assert gap["after_training"] == pytest.approx([0.8, 1.0])
    assert gap["after_refresh"] == pytest.approx([0.4, 0.6])  # the same clients only


def test_factor_movement_averages_each_branch_over_the_last_rounds():
    history = History(config={"algorithm": "pfedpara"})
    for r, scale in ((1, 100.0), (2, 1.0), (3, 3.0)):
        history.append(record(r, parameter_change={
            "classifier.0.x1": 0.04 * scale, "classifier.0.y1": 0.02 * scale,
            "classifier.0.x2": 0.002 * scale, "classifier.0.y2": 0.004 * scale,
            "head.weight": 0.5}))  # a dense layer: not a FedPara branch
    moves = factor_movement(history, last=2)
    assert list(moves) == ["classifier.0"]
    assert moves["classifier.0"]["W1"] == pytest.approx(0.03 * 2)  # mean of rounds 2 and 3
    assert moves["classifier.0"]["W2"] == pytest.approx(0.003 * 2)
    for bad in (0, True):  # True is an int to Python, not a count of rounds
        with pytest.raises(ValueError, match="last"):
            factor_movement(history, last=bad)
    lowrank = History(config={"algorithm": "fedavg"}, records=history.records)
    assert factor_movement(lowrank) == {}  # x1/x2 of a low-rank layer are not a W1/W2 split
    fig = plot_factor_movement(moves, title="t")
    assert fig.axes[0].get_yscale() == "log"
    with pytest.raises(ValueError, match="empty"):
        plot_factor_movement({})
    assert plot_refresh_gap({"a": history}).axes  # nothing to draw is not an error
    with pytest.raises(ValueError, match="smooth"):
        plot_refresh_gap({"a": history}, smooth=0)


def histories(accuracies, gib):
    out = {}
    for name, acc in accuracies.items():
        # the presets' learning-rate multiplier of the personal factors
        h = History(config={"local_lr_scale": 30.0 if name == "pfedpara-lr30" else 1.0})
        for r in (1, 2, 3):
            h.append(record(r, accuracy=acc, gib=gib.get(name, 1.0)))
        out[name] = h
    return out


def test_verdict_names_the_best_variant_and_what_it_beats():
    runs = histories({"pfedpara": 0.70, "pfedpara-lr30": 0.85, "fedper": 0.80, "local": 0.60,
                      "fedavg": 0.75}, gib={"pfedpara": 0.25, "pfedpara-lr30": 0.25})
    text = verdict("p", runs)
    assert "`pfedpara-lr30` at 85.0%" in text and "0.25 times" in text
    assert "is above all three" in text
    runs["fedper"] = histories({"fedper": 0.90}, {})["fedper"]
    text = verdict("p", runs)
    assert ("is above local-only and FedAvg and below FedPer, 5.0 percentage points behind the "
            "best of them, in this seed") in text
    # a difference within the larger jitter of the two runs is no finding
    runs["fedavg"] = histories({"fedavg": 0.853}, {})["fedavg"]
    runs["fedavg"].records[0].accuracy = 0.84  # a jitter of about 0.6 points
    text = verdict("p", runs)
    assert ("is above local-only, level with FedAvg (within the larger jitter of the two runs) "
            "and below FedPer") in text
    del runs["local"]
    assert verdict("p", runs) == ""  # a competitor without a run: no verdict


def test_verdict_measures_the_gap_to_the_best_competitor_ahead_and_traffic_to_fedavgs():
    runs = histories({"pfedpara": 0.70, "fedper": 0.80, "local": 0.60, "fedavg": 0.75},
                     gib={"pfedpara": 0.5, "fedper": 0.25})
    text = verdict("p", runs)
    assert "0.50 times FedAvg's traffic" in text
    assert ("is above local-only and below FedPer and FedAvg, 10.0 percentage points behind "
            "the best of them, in this seed") in text
    # level with one, above the others, below none: not "above all three"
    runs = histories({"pfedpara": 0.80, "fedper": 0.80, "local": 0.60, "fedavg": 0.75}, gib={})
    text = verdict("p", runs)
    assert ("`pfedpara` is above local-only and FedAvg and level with FedPer (within the "
            "larger jitter of the two runs), in this seed.") in text
    assert "above all three" not in text


def test_control_splits_fedpers_lead_into_capacity_and_split():
    runs = histories({"pfedpara": 0.70, "pfedpara-product": 0.81, "pfedpara-lr30": 0.90,
                      "fedper": 0.84, "fedper-fedpara": 0.80}, gib={})
    text = control("p", runs)
    assert "capacity is worth +4.0 points to FedPer (beyond the larger jitter" in text
    # pfedpara-lr30 is best, but trains W2 at 30 times the rate: not the split's doing
    assert "81.0% for `pfedpara-product`, the best pFedPara variant at the same learning" in text
    assert "`pfedpara-product` is 1.0 points above FedPer" in text and "works better" in text
    del runs["pfedpara-product"]
    assert "`pfedpara` is 10.0 points below FedPer" in control("p", runs)
    del runs["fedper-fedpara"]
    assert control("p", runs) == ""


def test_control_calls_a_difference_within_the_jitter_no_finding():
    def run(accuracies):  # the last rounds of a single-seed run, as recorded
        h = History(config={"local_lr_scale": 1.0})
        for r, acc in enumerate(accuracies, start=1):
            h.append(record(r, accuracy=acc))
        return h

    # the final accuracies (last 3 rounds) differ by 0.3 points; the control run's jitter
    # (std over its last 10 rounds) is 0.8 points: no finding either way
    runs = {"fedper": run([0.90] * 10),
            "fedper-fedpara": run([0.87, 0.89, 0.87, 0.89, 0.87, 0.89, 0.87, 0.88, 0.88, 0.88]),
            "pfedpara-product": run([0.883] * 10)}
    text = control("p", runs)
    assert "within the larger jitter of the two runs" in text
    assert "does not separate" in text and "better" not in text and "worse" not in text
    # FedPer's two models: 2.0 points apart, beyond the 0.8-point jitter
    assert "capacity is worth +2.0 points to FedPer" in text
    # within the jitter, the capacity is not credited with anything either
    runs["fedper"] = run([0.885] * 10)
    text = control("p", runs)
    assert "FedPer's two models are 0.5 points apart, within the larger jitter" in text
    assert "capacity is worth" not in text
    # an exact tie is a tie, even with no jitter at all
    tie = {"fedper": run([0.9] * 4), "fedper-fedpara": run([0.8] * 4),
           "pfedpara": run([0.8] * 4)}
    text = control("p", tie)
    assert "`pfedpara` and FedPer are 0.0 points apart" in text and "better" not in text
    # beyond the jitter, the sentence says which part works better, and by how much
    tie["pfedpara"] = run([0.85] * 4)
    text = control("p", tie)
    assert "`pfedpara` is 5.0 points above FedPer, more than the larger jitter" in text
    assert "works better than keeping the head" in text


def test_an_unscored_run_gives_no_sentence():
    runs = histories({"pfedpara": 0.70, "pfedpara-product": float("nan"), "fedper": 0.84,
                      "fedper-fedpara": 0.80, "local": 0.6, "fedavg": 0.75}, gib={})
    assert "`pfedpara` at 70.0%" in verdict("p", runs)  # the NaN variant is not the best
    assert "for `pfedpara`," in control("p", runs)
    runs["fedper"] = histories({"fedper": float("nan")}, {})["fedper"]
    assert verdict("p", runs) == "" and control("p", runs) == ""


def test_seed_verdict_gives_each_methods_mean_and_range_and_counts_seeds_by_side():
    runs = {0: histories({"pfedpara": 0.70, "pfedpara-lr30": 0.86, "fedper": 0.80,
                          "local": 0.60, "fedavg": 0.75}, gib={}),
            1: histories({"pfedpara": 0.72, "pfedpara-lr30": 0.78, "fedper": 0.82,
                          "local": 0.62, "fedavg": 0.80}, gib={}),
            4: histories({"pfedpara": 0.74, "pfedpara-lr30": 0.84, "fedper": 0.81,
                          "local": 0.58, "fedavg": 0.84}, gib={})}
    text = seed_verdict("p", runs)
    # the best on average (82.7%), though not in seed 1
    assert text.startswith("Over seeds 0, 1 and 4 of `p` (mean final accuracy, and the lowest "
                           "to the highest seed): the best pFedPara variant on average is "
                           "`pfedpara-lr30` at 82.7% (78.0% to 86.0%); FedPer 81.0% (80.0% to "
                           "82.0%), FedAvg 79.7% (75.0% to 84.0%), local-only 60.0% (58.0% to "
                           "62.0%).")
    # constant runs have no jitter: every gap counts, and an exact tie (seed 4) is level
    assert text.endswith("`pfedpara-lr30` is above FedPer in 2, below it in 1; above "
                         "local-only in 3; above FedAvg in 1, level with it in 1, below it in 1 "
                         "(of 3 seeds).")


def test_seed_verdict_needs_two_seeds_with_every_method_scored():
    one = histories({"pfedpara": 0.70, "fedper": 0.80, "local": 0.60, "fedavg": 0.75}, gib={})
    assert seed_verdict("p", {0: one}) == "" and seed_verdict("p", {}) == ""
    two = {0: one, 1: dict(one)}
    assert "`pfedpara` is below FedPer in 2" in seed_verdict("p", two)
    del two[1]["local"]  # a method missing in one seed is left out, so no verdict
    assert seed_verdict("p", two) == ""
    two[1] = {**one, "fedavg": histories({"fedavg": float("nan")}, {})["fedavg"]}
    assert seed_verdict("p", two) == ""
