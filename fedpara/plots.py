"""Reading and plotting histories: accuracy against traffic, traffic to a target, client spread.

    from fedpara.plots import plot_curves, gib_to_reach, equal_traffic, equal_accuracy
    fig = plot_curves({"fedpara": h1, "original": h2}, title="fmnist-noniid, full profile")
    gib_to_reach(h1, 0.80)                     # GiB when the accuracy first reached 80 %
    equal_traffic({"fedpara": h1, "original": h2})   # accuracy of each at the smaller budget
    equal_accuracy({"fedpara": h1, "original": h2})  # GiB each needed for the weaker's accuracy

Accuracies are fractions in [0, 1] (plots show percent); traffic is cumulative up + down bytes
as recorded in each round, shown in GiB (2**30 bytes). Imports without Flower or torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedpara.history import History, check_window

__all__ = [
    "accuracy_within",
    "equal_accuracy",
    "equal_traffic",
    "final_accuracy",
    "gib_to_reach",
    "placeholder",
    "plot_client_accuracies",
    "plot_curves",
    "plot_seed_spread",
    "round_to_reach",
    "rounds_within",
]


def _check_nonempty(history: History, name: str = "history") -> None:
    if len(history) == 0:
        raise ValueError(f"{name} has no rounds")


def _check_accuracy(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"{name}={value!r} must be an accuracy in [0, 1] (a fraction, not %)")


def round_to_reach(history: History, target: float) -> int | None:
    """The first round whose accuracy is >= `target` (a fraction), or None if none is.

    An accuracy short of `target` by a relative 1e-12 counts as reaching it: a target computed
    as a mean of equal accuracies (`final_accuracy`) can exceed them by a rounding error.
    """
    _check_nonempty(history)
    _check_accuracy("target", target)
    for record in history.records:
        if record.accuracy >= target * (1 - 1e-12):  # NaN (nothing scored) never reaches it
            return record.round
    return None


def gib_to_reach(history: History, target: float) -> float:
    """Cumulative traffic (GiB) after the first round with accuracy >= `target`; NaN if never."""
    reached = round_to_reach(history, target)
    return history.cumulative_gib()[reached - 1] if reached is not None else math.nan


def final_accuracy(history: History, window: int = 1) -> float:
    """Mean accuracy of the last `window` rounds (non-IID curves are noisy: use a few; the book
    uses `fedpara.history.FINAL_WINDOW`), as `History.mean_accuracy` computes it."""
    _check_nonempty(history)
    check_window(window)
    return history.mean_accuracy(window)


def rounds_within(history: History, budget_gib: float) -> int:
    """How many of the run's first rounds fit in `budget_gib` of cumulative traffic (a relative
    1e-12 of slack absorbs the rounding of summed GiB)."""
    _check_nonempty(history)
    if not math.isfinite(budget_gib) or budget_gib < 0:
        raise ValueError(f"budget_gib={budget_gib} must be a finite number >= 0 (GiB)")
    gib = np.asarray(history.cumulative_gib())
    return int(np.searchsorted(gib, budget_gib * (1 + 1e-12), side="right"))


def accuracy_within(history: History, budget_gib: float, window: int = 1) -> float:
    """Mean accuracy of the last `window` rounds whose cumulative traffic is <= `budget_gib`.

    What the run had reached when it had spent that budget; NaN if even round 1 costs more.
    """
    check_window(window)
    spent = rounds_within(history, budget_gib)
    if spent == 0:
        return math.nan
    accuracy = np.asarray(history.column("accuracy")[:spent][-window:], dtype=float)
    # NaN (nothing scored) when none of them scored, without NumPy's empty-slice warning
    return float(np.nanmean(accuracy)) if not np.isnan(accuracy).all() else math.nan


def equal_traffic(histories: Mapping[str, History], budget_gib: float | None = None,
                  window: int = 1) -> dict[str, float]:
    """Accuracy of each run at the same traffic: by default the smallest total of the runs
    (the cheapest run's budget). Returns {"budget_gib": ..., name: accuracy, ...}."""
    if not histories:
        raise ValueError("histories is empty")
    for name, history in histories.items():
        _check_nonempty(history, f"histories[{name!r}]")
    if budget_gib is None:
        budget_gib = min(h.cumulative_gib()[-1] for h in histories.values())
    result = {"budget_gib": float(budget_gib)}
    for name, history in histories.items():
        result[name] = accuracy_within(history, budget_gib, window)
    return result


def equal_accuracy(histories: Mapping[str, History], target: float | None = None,
                   window: int = 1) -> dict[str, float]:
    """Traffic (GiB) each run needed to first reach the same accuracy: by default the lowest
    `final_accuracy(window)` of the runs that scored in those rounds (an accuracy all of them
    attain, or nearly so). Returns {"target": ..., name: GiB or NaN if never reached, ...}."""
    if not histories:
        raise ValueError("histories is empty")
    check_window(window)
    for name, history in histories.items():
        _check_nonempty(history, f"histories[{name!r}]")
    if target is None:
        finals = [final_accuracy(h, window) for h in histories.values()]
        scored = [accuracy for accuracy in finals if not math.isnan(accuracy)]
        if not scored:
            raise ValueError(f"target=None: no run scored in its last {window} round(s), so "
                             "there is no final accuracy to default to; give a target")
        target = min(scored)
    result = {"target": float(target)}
    for name, history in histories.items():
        result[name] = gib_to_reach(history, target)
    return result


# plots ---------------------------------------------------------------------------------------


def plot_curves(histories: Mapping[str, History], *, title: str | None = None,
                targets: Sequence[float] = (), ylabel: str = "test accuracy (%)") -> Figure:
    """Two panels: accuracy against cumulative traffic (GiB) and against rounds.

    `targets` (fractions) are drawn as dotted horizontal lines, e.g. the paper's targets.
    """
    if not histories:
        raise ValueError("histories is empty")
    for i, target in enumerate(targets):
        _check_accuracy(f"targets[{i}]", target)
    # sized for a book page (about 8 inches of column): one legend below both panels
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.5, 3.9))
    for name, history in histories.items():
        _check_nonempty(history, f"histories[{name!r}]")
        accuracy = 100 * np.asarray(history.column("accuracy"), dtype=float)
        marker = "o" if len(history) <= 20 else None
        left.plot(history.cumulative_gib(), accuracy, marker=marker, label=name)
        right.plot(history.column("round"), accuracy, marker=marker, label=name)
    for target in targets:
        for ax in (left, right):
            ax.axhline(100 * target, color="0.5", linestyle=":", linewidth=1)
    left.set(xlabel="cumulative traffic, up + down (GiB)", ylabel=ylabel)
    right.set(xlabel="round", ylabel=ylabel)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    rows = math.ceil(len(histories) / 4)
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncols=min(4, len(histories)),
               fontsize=9, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07 + 0.05 * rows, 1, 1))
    return fig


def plot_client_accuracies(accuracies: Mapping[str, Sequence[float]], *, ax: Axes | None = None,
                           title: str | None = None) -> Axes:
    """One box per run of its clients' accuracies (fractions, shown in %), each client a dot."""
    if not accuracies:
        raise ValueError("accuracies is empty")
    if ax is None:
        _, ax = plt.subplots(figsize=(1.6 * len(accuracies) + 2.5, 3.6))
    names = list(accuracies)
    values = [100 * np.asarray(accuracies[n], dtype=float) for n in names]
    ax.boxplot(values, showfliers=False, widths=0.5)
    jitter = np.random.default_rng(0)
    for i, v in enumerate(values, start=1):
        ax.scatter(i + jitter.uniform(-0.15, 0.15, len(v)), v, s=8, alpha=0.5, color="C0")
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set(ylabel="accuracy on own held-out data (%)", xlabel="algorithm")
    if title:
        ax.set_title(title)
    return ax


def plot_seed_spread(finals: Mapping[str, Mapping[int, float]], *, ax: Axes | None = None,
                     title: str | None = None) -> Axes:
    """Each run's final accuracy in every seed (`results.final_by_seed`; fractions, shown in
    %): one marker per seed, a bar at the mean over seeds."""
    if not finals:
        raise ValueError("finals is empty")
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 * len(finals) + 2.5, 3.4))
    names = list(finals)
    seeds = sorted({s for values in finals.values() for s in values})
    markers = "os^Dvx*"
    for k, seed in enumerate(seeds):
        x = [i + 0.08 * (k - (len(seeds) - 1) / 2) for i, n in enumerate(names)
             if seed in finals[n]]
        y = [100 * finals[n][seed] for n in names if seed in finals[n]]
        ax.scatter(x, y, marker=markers[k % len(markers)], s=22, label=f"seed {seed}",
                   color=f"C{k}", zorder=3)
    for i, n in enumerate(names):
        ax.hlines(100 * np.nanmean(list(finals[n].values())), i - 0.3, i + 0.3, color="0.3",
                  lw=1.5, label="mean over seeds" if i == 0 else None)
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="final accuracy (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def placeholder(text: str, width: float = 7.5) -> Figure:
    """A figure that only says `text`: what a chapter shows (and glues, so that every glued
    figure exists) where the runs a plot needs are not stored yet."""
    fig, ax = plt.subplots(figsize=(width, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    return fig
