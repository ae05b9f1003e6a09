"""fedpara.plots: traffic to a target, accuracy at a budget, the equal-traffic/accuracy comparisons."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from fedpara.history import GIB, History, RoundRecord  # noqa: E402
from fedpara.plots import (  # noqa: E402
    accuracy_within,
    equal_accuracy,
    equal_traffic,
    final_accuracy,
    gib_to_reach,
    plot_client_accuracies,
    plot_curves,
    plot_seed_spread,
    round_to_reach,
    rounds_within,
)


def make_history(accuracies: list[float], bytes_per_round: int) -> History:
    history = History(config={"preset": "demo"})
    for i, accuracy in enumerate(accuracies, start=1):
        history.append(RoundRecord(round=i, accuracy=accuracy, loss=1.0,
                                   bytes_up=bytes_per_round // 2, bytes_down=bytes_per_round // 2,
                                   cum_bytes=i * bytes_per_round, wall_seconds=1.0))
    return history


# a cheap run (0.1 GiB a round) and an expensive one (1 GiB a round) that learns a little faster
CHEAP = make_history([0.2, 0.5, 0.6, 0.7, 0.75, 0.8], GIB // 10)
DEAR = make_history([0.3, 0.6, 0.8, 0.85, 0.86, 0.87], GIB)


def test_traffic_and_round_to_reach_a_target():
    assert round_to_reach(CHEAP, 0.7) == 4
    assert gib_to_reach(CHEAP, 0.7) == pytest.approx(0.4)
    assert gib_to_reach(DEAR, 0.7) == pytest.approx(3.0)
    assert round_to_reach(CHEAP, 0.2) == 1  # reached exactly counts
    assert round_to_reach(CHEAP, 0.9) is None and math.isnan(gib_to_reach(CHEAP, 0.9))


def test_nan_rounds_never_reach_a_target():
    history = make_history([math.nan, 0.4], GIB)
    assert round_to_reach(history, 0.1) == 2


def test_accuracy_within_a_budget():
    assert accuracy_within(DEAR, 2.0) == pytest.approx(0.6)  # rounds 1-2 fit in 2 GiB
    assert accuracy_within(DEAR, 2.5) == pytest.approx(0.6)
    assert accuracy_within(DEAR, 3.0, window=2) == pytest.approx(0.7)  # mean of rounds 2-3
    assert math.isnan(accuracy_within(DEAR, 0.5))  # round 1 alone costs 1 GiB
    assert accuracy_within(CHEAP, 0.6) == pytest.approx(0.8)  # all six rounds (float sums)
    assert [rounds_within(DEAR, b) for b in (0.5, 2.0, 2.5, 6.0)] == [0, 2, 2, 6]
    assert rounds_within(CHEAP, 0.6) == 6


def test_accuracy_within_rounds_that_never_scored_is_nan_without_a_warning():
    import warnings

    unscored_end = make_history([0.5, math.nan, math.nan], GIB)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy's "Mean of empty slice" would fail the test
        assert math.isnan(accuracy_within(unscored_end, 10.0, window=2))
        assert accuracy_within(unscored_end, 10.0, window=3) == 0.5


def test_equal_traffic_uses_the_cheapest_runs_total():
    result = equal_traffic({"cheap": CHEAP, "dear": DEAR})
    assert result["budget_gib"] == pytest.approx(0.6)
    assert result["cheap"] == pytest.approx(0.8)
    assert math.isnan(result["dear"])  # the expensive run had not finished one round
    result = equal_traffic({"cheap": CHEAP, "dear": DEAR}, budget_gib=2.0)
    assert result["dear"] == pytest.approx(0.6)


def test_equal_accuracy_uses_the_weaker_runs_final_accuracy():
    result = equal_accuracy({"cheap": CHEAP, "dear": DEAR})
    assert result["target"] == pytest.approx(0.8)
    assert result["cheap"] == pytest.approx(0.6) and result["dear"] == pytest.approx(3.0)
    assert final_accuracy(DEAR, window=3) == pytest.approx((0.85 + 0.86 + 0.87) / 3)


def test_a_run_reaches_its_own_final_accuracy():
    # accuracies are counts over 10,000 test images: the mean of three 0.7013 is 0.7013000000000001
    weak = make_history([0.5, 0.6, 0.7013, 0.7013, 0.7013], GIB)
    assert final_accuracy(weak, window=3) > 0.7013
    assert round_to_reach(weak, final_accuracy(weak, window=3)) == 3
    result = equal_accuracy({"weak": weak, "dear": DEAR}, window=3)
    assert result["weak"] == pytest.approx(3.0) and result["dear"] == pytest.approx(3.0)


def test_equal_accuracy_defaults_to_the_runs_that_scored():
    unscored = make_history([0.5, math.nan, math.nan, math.nan], GIB)
    for order in (("dear", "unscored"), ("unscored", "dear")):
        runs = {name: {"dear": DEAR, "unscored": unscored}[name] for name in order}
        result = equal_accuracy(runs, window=3)
        assert result["target"] == pytest.approx(0.86) and math.isnan(result["unscored"])
    with pytest.raises(ValueError, match="target"):
        equal_accuracy({"unscored": unscored}, window=3)


@pytest.mark.parametrize("call, match", [
    (lambda: round_to_reach(CHEAP, 80), "target"),
    (lambda: final_accuracy(CHEAP, window=0), "window"),
    (lambda: final_accuracy(CHEAP, window=True), "window"),
    (lambda: accuracy_within(CHEAP, -1.0), "budget_gib"),
    (lambda: accuracy_within(CHEAP, math.nan), "budget_gib"),
    (lambda: equal_traffic({"cheap": CHEAP}, budget_gib=math.nan), "budget_gib"),
    (lambda: equal_traffic({}), "empty"),
    (lambda: equal_traffic({"cheap": CHEAP, "none": History(config={})}),
     r"histories\['none'\] has no rounds"),
    (lambda: equal_accuracy({"cheap": CHEAP, "none": History(config={})}, target=0.5),
     r"histories\['none'\] has no rounds"),
    # a window is checked even when a target makes it unused
    (lambda: equal_accuracy({"cheap": CHEAP}, target=0.5, window=0), "window"),
    (lambda: final_accuracy(History(config={})), "no rounds"),
    (lambda: plot_curves({"cheap": CHEAP}, targets=[0.7, 80]), "targets"),
])
def test_bad_input_names_the_parameter(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_plots_label_their_axes_with_units():
    fig = plot_curves({"cheap": CHEAP, "dear": DEAR}, title="demo", targets=[0.7])
    left, right = fig.axes
    assert "GiB" in left.get_xlabel() and "%" in left.get_ylabel()
    assert right.get_xlabel() == "round"
    assert [line.get_label() for line in left.get_lines()][:2] == ["cheap", "dear"]
    assert max(left.get_lines()[1].get_ydata()) == pytest.approx(87.0)  # percent
    ax = plot_client_accuracies({"a": [0.5, 0.7], "b": [0.9]})
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    assert "%" in ax.get_ylabel()


def test_the_seed_spread_draws_each_seed_and_the_mean_in_percent():
    ax = plot_seed_spread({"a": {0: 0.5, 1: 0.7}, "b": {0: 0.9, 1: 0.8}}, title="t")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    seeds = [c for c in ax.collections if c.get_label().startswith("seed")]
    assert [c.get_label() for c in seeds] == ["seed 0", "seed 1"]
    assert [list(c.get_offsets()[:, 1]) for c in seeds] == [[50, 90], [70, 80]]
    means = [c for c in ax.collections if c not in seeds]
    assert [segment[0][1] for c in means for segment in c.get_segments()] == pytest.approx(
        [60, 85])
    assert "%" in ax.get_ylabel() and ax.get_title() == "t"
    with pytest.raises(ValueError, match="finals is empty"):
        plot_seed_spread({})


def test_plots_draw_each_runs_data_in_percent():
    fig = plot_curves({"cheap": CHEAP, "dear": DEAR}, targets=[0.7])
    left, right = fig.axes
    cheap = left.get_lines()[0]
    assert list(cheap.get_xdata()) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])  # GiB
    assert list(cheap.get_ydata()) == pytest.approx([20, 50, 60, 70, 75, 80])
    assert list(right.get_lines()[0].get_xdata()) == [1, 2, 3, 4, 5, 6]  # rounds
    for ax in (left, right):
        targets = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
        assert [list(line.get_ydata()) for line in targets] == [[70.0, 70.0]]
    ax = plot_client_accuracies({"a": [0.5, 0.7], "b": [0.9]})
    dots = [sorted(c.get_offsets()[:, 1]) for c in ax.collections]
    assert dots == [pytest.approx([50.0, 70.0]), pytest.approx([90.0])]


def test_a_run_that_sends_nothing_fits_any_budget():
    local = make_history([0.4, 0.6], 0)  # local-only training: no traffic at all
    assert rounds_within(local, 0.0) == 2
    result = equal_traffic({"local": local, "dear": DEAR})
    assert result["budget_gib"] == 0.0 and result["local"] == pytest.approx(0.6)
    assert math.isnan(result["dear"])


def test_a_placeholder_figure_only_says_its_text():
    import matplotlib.pyplot as plt

    from fedpara.plots import placeholder

    fig = placeholder("No stored runs.", width=5)
    (ax,) = fig.axes
    assert not ax.axison and [t.get_text() for t in ax.texts] == ["No stored runs."]
    assert fig.get_size_inches()[0] == 5
    plt.close(fig)

