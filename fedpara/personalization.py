"""Reading the personalization mechanism out of stored runs: what averaging does to a client.

    from fedpara.personalization import refresh_gap, factor_movement, plot_refresh_gap
    gap = refresh_gap(history)          # per round: own accuracy after training vs after refresh
    moves = factor_movement(history)    # per layer: how far training moved W1's vs W2's factors

A personalized round has two moments a client can be scored at on its own held-out data:
right after its local training (`RoundRecord.client_accuracy_after_training`) and after the
server's average has replaced the shared part of its model (the round's client evaluation,
`RoundRecord.client_accuracy`). The gap between them is what averaging takes away from the
client. `parameter_change` holds how far local training moved each parameter, relative to its
norm, averaged over the round's clients. Imports without Flower or torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fedpara.history import FINAL_WINDOW, History, check_window
from fedpara.results import final_by_seed, final_gap, listed, seed_spread, sides_over_seeds

__all__ = [
    "PFEDPARA_VARIANTS",
    "factor_movement",
    "plot_factor_movement",
    "plot_refresh_gap",
    "control",
    "refresh_gap",
    "seed_verdict",
    "verdict",
]

# the pFedPara variants of the personalization presets (fedpara.config), the paper's first
PFEDPARA_VARIANTS = ("pfedpara", "pfedpara-lr30", "pfedpara-product")
COMPETITORS = ("fedper", "local", "fedavg")
_NAMES = {"fedper": "FedPer", "local": "local-only", "fedavg": "FedAvg"}

# pFedPara's factors by branch: W1 is sent and averaged, W2 stays on the client
_BRANCH = re.compile(r"^(?P<layer>.+)\.(?P<factor>[xyt])(?P<branch>[12])$")


def refresh_gap(history: History) -> dict[str, list[float]]:
    """Per round, the mean own held-out accuracy of that round's trained clients right after
    local training and after the round's refresh (the same clients, unweighted means).

    Returns {"round", "after_training", "after_refresh"}; rounds recorded before these fields
    existed (or with server evaluation) are left out.
    """
    out: dict[str, list[float]] = {"round": [], "after_training": [], "after_refresh": []}
    for r in history.records:
        if not r.client_accuracy_after_training or not r.scored_clients:
            continue
        refreshed = dict(zip(r.scored_clients, r.client_accuracy, strict=True))
        pairs = [(a, refreshed[c]) for c, a in zip(r.clients, r.client_accuracy_after_training,
                                                   strict=True)
                 if c in refreshed and not math.isnan(a)]
        if not pairs:
            continue
        out["round"].append(r.round)
        out["after_training"].append(float(np.mean([a for a, _ in pairs])))
        out["after_refresh"].append(float(np.mean([b for _, b in pairs])))
    return out


def factor_movement(history: History, last: int | None = None) -> dict[str, dict[str, float]]:
    """Per FedPara layer, the mean relative change of its W1 factors and of its W2 factors over
    a round's local training, averaged over the last `last` rounds (all when None).

    Returns {layer: {"W1": ..., "W2": ...}} (the mean over the branch's factors x, y[, t]);
    empty unless the run is pFedPara's (W1 sent, W2 kept): a low-rank layer's factors have the
    same names but no such split.
    """
    if last is not None and (not isinstance(last, int) or isinstance(last, bool) or last < 1):
        raise ValueError(f"last={last!r} must be None or an integer >= 1 (rounds averaged)")
    if history.config.get("algorithm") != "pfedpara":
        return {}
    records = [r for r in history.records if r.parameter_change]
    if last is not None:
        records = records[-last:]
    sums: dict[str, dict[str, list[float]]] = {}
    for r in records:
        for name, change in r.parameter_change.items():
            match = _BRANCH.match(name)
            if match:
                layer = sums.setdefault(match["layer"], {"W1": [], "W2": []})
                layer[f"W{match['branch']}"].append(change)
    return {layer: {w: float(np.mean(v)) for w, v in branches.items() if v}
            for layer, branches in sums.items()}


def plot_refresh_gap(histories: Mapping[str, History], *, smooth: int = 5,
                     title: str | None = None, ax: Axes | None = None,
                     legend: bool = True) -> Figure:
    """What the refresh takes from a client, one line per run against rounds: own held-out
    accuracy right after local training minus after the refresh (percentage points; below 0
    the refresh helped), as a `smooth`-round moving mean."""
    check_window(smooth, "smooth")
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 3.8), layout="constrained")
    else:
        fig = ax.figure
    for name, history in histories.items():
        gap = refresh_gap(history)
        if len(gap["round"]) < smooth:
            continue
        lost = 100 * (np.array(gap["after_training"]) - np.array(gap["after_refresh"]))
        mean = np.convolve(lost, np.ones(smooth) / smooth, mode="valid")
        ax.plot(gap["round"][smooth - 1:], mean, label=name)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("lost to the refresh (points)")
    ax.grid(alpha=0.3)
    if legend and ax.lines[1:]:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def plot_factor_movement(movement: Mapping[str, Mapping[str, float]], *,
                         title: str | None = None, ax: Axes | None = None,
                         legend: bool = True) -> Figure:
    """Bars per layer: relative change of the W1 factors (sent) and the W2 factors (kept)
    over one round of local training, on a log axis."""
    if not movement:
        raise ValueError("movement is empty: the run has no FedPara layers or no recorded changes")
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 3.8), layout="constrained")
    else:
        fig = ax.figure
    layers = list(movement)
    x = np.arange(len(layers))
    for offset, branch, label in ((-0.2, "W1", "W1 factors (sent, averaged)"),
                                  (0.2, "W2", "W2 factors (kept on the client)")):
        values = [movement[layer].get(branch, np.nan) for layer in layers]
        ax.bar(x + offset, values, width=0.4, label=label, color="C0" if branch == "W1" else "C1")
    ax.set_xticks(x, layers)
    ax.set_yscale("log")
    ax.set_ylabel("relative change in one round")
    ax.grid(alpha=0.3, axis="y")
    if legend:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def verdict(preset: str, histories: Mapping[str, History], window: int = FINAL_WINDOW) -> str:
    """One Markdown sentence group: the best pFedPara variant of a personalization preset
    against FedPer, local-only and FedAvg (final accuracy = the mean of the last `window`
    rounds), with its traffic relative to FedAvg's. Each comparison follows
    `fedpara.results.final_gap`: a difference within the larger of the two runs' jitters is
    no finding. "" unless all of them have a history."""
    mine = [v for v in PFEDPARA_VARIANTS if v in histories]
    if "pfedpara" not in mine or not set(COMPETITORS) <= set(histories):
        return ""
    acc = {v: h.mean_accuracy(window) for v, h in histories.items()}
    if any(math.isnan(acc[v]) for v in ("pfedpara", *COMPETITORS)):
        return ""  # an unscored run: no comparison to state
    best = max((v for v in mine if not math.isnan(acc[v])), key=lambda v: acc[v])
    traffic = (histories[best].cumulative_gib()[-1]
               / histories["fedavg"].cumulative_gib()[-1])
    side = {o: final_gap(histories[best], histories[o], window).ahead for o in COMPETITORS}
    text = (f"On `{preset}` the best pFedPara variant is `{best}` at {acc[best]:.1%} (the "
            f"paper's form, `pfedpara`: {acc['pfedpara']:.1%}), with {traffic:.2f} times "
            f"FedAvg's traffic; FedPer reaches {acc['fedper']:.1%}, FedAvg {acc['fedavg']:.1%} "
            f"and local-only {acc['local']:.1%}. ")
    above, level, below = ([_NAMES[o] for o in COMPETITORS if side[o] == s] for s in (1, 0, -1))
    if not level and not below:
        return text + f"`{best}` is above all three."
    parts = ([f"above {' and '.join(above)}"] if above else []) + (
        [f"level with {' and '.join(level)} (within the larger jitter of the two runs)"]
        if level else [])
    if below:
        gap = 100 * (max(acc[o] for o in COMPETITORS if side[o] < 0) - acc[best])
        parts.append(f"below {' and '.join(below)}, {gap:.1f} percentage points behind the "
                     f"best of them")
    return text + f"`{best}` is " + ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") \
        + parts[-1] + ", in this seed."


def control(preset: str, histories: Mapping[str, History], window: int = FINAL_WINDOW) -> str:
    """One Markdown sentence: how much of FedPer's lead over the best pFedPara variant comes from
    the smaller FedPara model and how much from the choice of the personal part, read from the
    control run `fedper-fedpara` (FedPer on pFedPara's model). Only pFedPara variants trained
    at the control's learning rates are compared with it (`pfedpara-lr30` trains W2 at 30
    times the rate: its gain would not be the split's). Both readings (FedPer on the two
    models, and the two personal parts on one model) follow `fedpara.results.final_gap`: a
    difference within the larger of the two runs' jitters is no finding. "" without those
    runs."""
    if not {"fedper", "fedper-fedpara"} <= set(histories):
        return ""
    acc = {v: h.mean_accuracy(window) for v, h in histories.items()}
    scale = histories["fedper-fedpara"].config.get("local_lr_scale", 1.0)
    mine = [v for v in PFEDPARA_VARIANTS if v in histories and not math.isnan(acc[v])
            and histories[v].config.get("local_lr_scale", 1.0) == scale]
    if not mine or math.isnan(acc["fedper"]) or math.isnan(acc["fedper-fedpara"]):
        return ""
    best = max(mine, key=lambda v: acc[v])
    dense = final_gap(histories["fedper"], histories["fedper-fedpara"], window)
    if dense.ahead:
        capacity = (f"the dense model's capacity is worth {100 * dense.difference:+.1f} points "
                    f"to FedPer (beyond the larger jitter of the two runs, "
                    f"{100 * dense.noise:.1f} points)")
    else:
        capacity = (f"FedPer's two models are {100 * abs(dense.difference):.1f} points apart, "
                    f"within the larger jitter of the two runs ({100 * dense.noise:.1f} "
                    "points): this seed does not show the dense model's capacity to matter")
    gap = final_gap(histories[best], histories["fedper-fedpara"], window)
    split, noise = 100 * gap.difference, 100 * gap.noise
    if gap.ahead:
        word = "above" if gap.ahead > 0 else "below"
        same_model = (f"on the same model `{best}` is {abs(split):.1f} points {word} FedPer, "
                      f"more than the larger jitter of the two runs ({noise:.1f} points): in "
                      "this seed, keeping $W_2$ and the biases of every layer personal works "
                      + ("better" if gap.ahead > 0 else "worse") + " than keeping the head")
    else:
        same_model = (f"on the same model `{best}` and FedPer are {abs(split):.1f} points "
                      f"apart, within the larger jitter of the two runs ({noise:.1f} points): "
                      "this seed does not separate keeping $W_2$ and the biases of every "
                      "layer personal from keeping the head")
    return (f"On `{preset}`, FedPer reaches {acc['fedper']:.1%} with the dense model and "
            f"{acc['fedper-fedpara']:.1%} with pFedPara's FedPara model, against "
            f"{acc[best]:.1%} for `{best}`, the best pFedPara variant at the same learning "
            f"rates: {capacity}; {same_model}.")


def seed_verdict(preset: str, by_seed: Mapping[int, Mapping[str, History]],
                 window: int = FINAL_WINDOW) -> str:
    """`verdict` over several seeds: the pFedPara variant with the best mean final accuracy
    against FedPer, local-only and FedAvg, each method's mean and range over the seeds, and in
    how many seeds the variant is above, level with or below each of them (`final_gap`'s rule
    within each seed). "" unless at least two seeds hold `pfedpara` and the three others."""
    if len(by_seed) < 2:
        return ""
    finals, seeds = final_by_seed(by_seed, window), sorted(by_seed)
    if "pfedpara" not in finals or not set(COMPETITORS) <= set(finals):
        return ""
    if any(math.isnan(a) for v in ("pfedpara", *COMPETITORS) for a in finals[v].values()):
        return ""
    mean = {v: float(np.mean(list(a.values()))) for v, a in finals.items()}
    best = max((v for v in PFEDPARA_VARIANTS if v in finals and not math.isnan(mean[v])),
               key=lambda v: mean[v])

    phrases = [sides_over_seeds(by_seed, best, o, window, called=_NAMES[o]) for o in COMPETITORS]
    return (f"Over seeds {listed(seeds)} of `{preset}` (mean final accuracy, "
            f"and the lowest to the highest seed): the best pFedPara variant on average is "
            f"`{best}` at {seed_spread(finals[best])}; FedPer {seed_spread(finals['fedper'])}, "
            f"FedAvg {seed_spread(finals['fedavg'])}, local-only {seed_spread(finals['local'])}. "
            f"Seed by seed, by the rule of a single seed (a gap "
            f"within the larger jitter of the two runs is level), `{best}` is "
            + "; ".join(phrases) + f" (of {len(seeds)} seeds).")
