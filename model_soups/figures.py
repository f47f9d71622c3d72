"""The report's figures, each a PNG drawn from what a run folder stores (results.csv, the manifest, records).

Methods are shown in families, the same order everywhere: the references (the pretrained start, the best
fine-tune), each family of soups in the registry's order (weight averages, task-vector merges), then the
ensembles, which cost N forward passes at inference. The published soup is marked wherever it appears.
"""

from __future__ import annotations

import io
import itertools
from collections import defaultdict
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402

from model_soups.methods import SOUP_METHODS  # noqa: E402

if TYPE_CHECKING:
    from model_soups.records import GreedyStep, SearchStep

REFERENCES = {"pretrained": "#000000", "best_individual": "#555555"}
SOUPS = {"uniform": "#1f77b4", "greedy": "#d62728", "learned": "#9467bd", "wiseft": "#ffd700", "wiseft_best": "#aec7e8",
         "task_arithmetic": "#bcbd22", "ties": "#e377c2", "dare": "#8c564b", "dare_ties": "#ff7f0e",
         "model_stock": "#1b9e77"}
SPARE = ["#7570b3", "#e7298a", "#66a61e", "#a6761d", "#666666"]  # in turn, for a new method not given one above
ENSEMBLES = {"ensemble": "#2ca02c", "greedy_ensemble": "#17becf"}
_spare = itertools.cycle(SPARE)
COLORS = {**REFERENCES, **{m.kind: SOUPS.get(m.name) or next(_spare) for m in SOUP_METHODS.values()}, **ENSEMBLES}
METHOD_KINDS = list(COLORS)
FAMILIES = {"start and best fine-tune": list(REFERENCES)}
for _method in SOUP_METHODS.values():
    FAMILIES.setdefault(_method.family + "s", []).append(_method.kind)
FAMILIES["ensembles (N forward passes)"] = list(ENSEMBLES)
MARKERS = {"pretrained": "X", "best_individual": "D", "ensemble": "s", "greedy_ensemble": "s"}


def shown(kind: str) -> str:
    return kind.replace("_", " ").replace("best individual", "best fine-tune").replace("pretrained", "pretrained start")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def figure_id_vs_ood(results: pd.DataFrame, published: str) -> bytes | None:
    """Test accuracy against mean accuracy under shift, as the paper's figure: the ingredients, the pretrained
    start, every method, the published soup (`published`, a kind) large and labelled. Methods with the same two
    accuracies are drawn side by side, a few points apart on the page (never at another value), and named in a
    note below the plot."""
    acc = results.pivot_table(index=["kind", "model"], columns="split", values="accuracy", aggfunc="first") * 100
    ood = [c for c in acc.columns if str(c).startswith("ood:")]
    if not ood or "test" not in acc.columns:
        return None
    acc["ood_mean"] = acc[ood].mean(axis=1)
    figure, axis = plt.subplots(figsize=(7.5, 5.5))
    if "ingredient" in acc.index.get_level_values(0):
        ing = acc.loc["ingredient"]
        axis.scatter(ing["test"], ing["ood_mean"], c="#bbbbbb", s=25, label="fine-tunes", zorder=2)
    points = {kind: acc.loc[kind].iloc[0] for kind in METHOD_KINDS if kind in acc.index.get_level_values(0)}
    same: dict[tuple[float, float], list[str]] = defaultdict(list)
    for kind, row in points.items():
        same[(round(row["test"], 6), round(row["ood_mean"], 6))].append(kind)
    for kind, row in points.items():  # in the legend's order
        group = same[(round(row["test"], 6), round(row["ood_mean"], 6))]
        mine, k = kind == published, group.index(kind)
        shift = offset_copy(axis.transData, fig=figure, x=(k - (len(group) - 1) / 2) * 9, units="points")
        axis.scatter(row["test"], row["ood_mean"], transform=shift, c=COLORS[kind],
                     s=380 if mine else 80, marker=MARKERS.get(kind, "*" if "soup" in kind else "o"),
                     edgecolors="black", linewidths=1.6 if mine else 0.5, zorder=5 if mine else 3,
                     label=shown(kind) + (" (published)" if mine else ""))
    # the side-by-side offsets are on the page, so the axes' limits come from the values themselves
    axis.update_datalim([(row["test"], row["ood_mean"]) for row in points.values()])
    axis.margins(0.08)
    axis.autoscale_view()
    if published in points:
        label_published(axis, points[published], f"published: {shown(published)}", [
            (row["test"], row["ood_mean"]) for row in points.values()] + (
            list(zip(ing["test"], ing["ood_mean"])) if "ingredient" in acc.index.get_level_values(0) else []))
    axis.set_xlabel("test accuracy (%)")
    axis.set_ylabel(f"mean accuracy over {len(ood)} distribution shifts (%)")
    axis.set_title("In distribution vs under distribution shift")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    axis.grid(alpha=0.3)
    coincident = [" = ".join(shown(k) for k in group) for group in same.values() if len(group) > 1]
    if coincident:
        axis.text(0, -0.14, "Same accuracies, drawn side by side: " + "; ".join(coincident), transform=axis.transAxes,
                  fontsize=8, va="top", wrap=True)
    return _png(figure)


def label_published(axis, row: pd.Series, text: str, others: list[tuple[float, float]]) -> None:
    """The published soup's label, placed where it covers the fewest other points inside the plot: each candidate
    place is drawn and measured, and the best one kept."""
    renderer = axis.figure.canvas.get_renderer()
    drawn = axis.transData.transform(others)
    best = None
    for reach in (1.0, 2.2, 3.5, 5.0):
        for dx, dy in ((-1, -1), (1, -1), (-1, 1), (1, 1), (0, -1), (0, 1), (-1, 0), (1, 0)):
            label = axis.annotate(
                text, (row["test"], row["ood_mean"]), xytext=(dx * 16 * reach, dy * 20 * reach),
                textcoords="offset points", ha={-1: "right", 0: "center", 1: "left"}[dx],
                va={-1: "top", 0: "center", 1: "bottom"}[dy], fontsize=9, fontweight="bold",
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.7},
                arrowprops={"arrowstyle": "-", "color": "black", "lw": 0.8}, zorder=6)
            box = label.get_window_extent(renderer)  # the text, laid out; its white box pads it a little
            outside = not (axis.bbox.x0 <= box.x0 and box.x1 <= axis.bbox.x1 and axis.bbox.y0 <= box.y0
                           and box.y1 <= axis.bbox.y1)
            covered = sum(1 for x, y in drawn if box.x0 - 6 <= x <= box.x1 + 6 and box.y0 - 6 <= y <= box.y1 + 6)
            cost = (outside, covered, reach)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, label)
            else:
                label.remove()


def figure_greedy(trajectory: list[GreedyStep]) -> bytes | None:
    if not trajectory:
        return None
    steps = np.arange(1, len(trajectory) + 1)
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    axis.plot(steps, [100 * t.individual_val for t in trajectory], "o", c="#999999", label="ingredient alone")
    for accepted, color, label in ((True, "#2ca02c", "added"), (False, "#d62728", "rejected")):
        points = [(s, 100 * t.soup_val) for s, t in zip(steps, trajectory) if t.accepted == accepted]
        if points:
            axis.scatter(*zip(*points), c=color, s=50, zorder=3, label=f"soup with it ({label})")
    kept = np.maximum.accumulate([t.soup_val if t.accepted else -1 for t in trajectory]) * 100
    axis.step(steps, kept, where="post", c="black", lw=1, label="greedy soup")
    axis.set_xlabel("ingredient, in order of val accuracy")
    axis.set_ylabel("val accuracy (%)")
    axis.set_title("Greedy soup: each ingredient tried once")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _png(figure)


def figure_searches(trajectories: dict[str, list[SearchStep]]) -> bytes | None:
    """Val accuracy of every candidate of each task-vector soup along its scale (alpha or lambda), one line per
    TIES k or DARE p; the chosen one starred."""
    if not trajectories:
        return None
    columns = min(3, len(trajectories))
    rows = -(-len(trajectories) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axis, (method, trajectory) in zip(axes.flat, trajectories.items()):
        lines = pd.DataFrame([step.model_dump(exclude_none=True) for step in trajectory]).assign(
            soup_val=lambda f: 100 * f.soup_val)
        line_of = [c for c in ("top_k", "drop") if c in lines]
        for value, group in lines.groupby(line_of) if line_of else [((), lines)]:
            label = ", ".join(f"{'k' if c == 'top_k' else 'p'} {v:g}" for c, v in zip(line_of, np.atleast_1d(value)))
            axis.plot(group["scale"], group["soup_val"], "o-", ms=3, lw=1, label=label or None)
        best = lines[lines.chosen]
        axis.scatter(best["scale"], best["soup_val"], marker="*", s=150, c=COLORS[SOUP_METHODS[method].kind],
                     edgecolors="black", linewidths=0.5, zorder=3)
        top = float(best["soup_val"].iloc[0])
        axis.set_ylim(top - 4, top + 1)  # the neighbourhood of the choice; candidates far below leave the panel
        axis.set_title(method.replace("_", " "), fontsize=10)
        axis.set_xlabel("α" if method.startswith("wiseft") else "λ")
        axis.grid(alpha=0.3)
        if line_of:
            axis.legend(fontsize=7)
    for axis in axes[:, 0]:
        axis.set_ylabel("val accuracy (%)")
    for axis in list(axes.flat)[len(trajectories):]:
        axis.set_visible(False)
    figure.suptitle("Task-vector soups: val accuracy of each candidate near the chosen one (★)")
    figure.tight_layout()
    return _png(figure)


def figure_splits(table: pd.DataFrame, published: str) -> bytes:
    """One panel per split, methods down the side in their families, a dot at each accuracy: the axis is zoomed on
    the fine-tune and the methods, so differences of a point can be read (dots need no zero baseline); a pretrained
    start far below them sits at the left edge with its value. The dashed line is the best fine-tune; the published
    soup is the large star."""
    table = table.drop(columns=["n_ingredients"], errors="ignore")
    rows = [(family, kind) for family, kinds in FAMILIES.items() for kind in kinds if kind in table.index]
    figure, axes = plt.subplots(1, len(table.columns), figsize=(2.3 * len(table.columns) + 2.2, 0.3 * len(rows) + 1.6),
                                sharey=True, squeeze=False)
    y = np.arange(len(rows))[::-1]
    for axis, split in zip(axes[0], table.columns):
        values = table.loc[[kind for _, kind in rows], split].to_numpy(dtype=float)
        zoomed = [v for (_, kind), v in zip(rows, values) if kind != "pretrained"] or list(values)
        low, high = np.nanmin(zoomed), np.nanmax(zoomed)
        pad = max(0.5, 0.08 * (high - low))
        for yy, (_, kind), value in zip(y, rows, values):
            mine = kind == published
            if value < low - pad:  # the start, far below every fine-tune: at the edge, with its value
                axis.scatter(low - pad, yy, c=COLORS[kind], s=45, marker="<", clip_on=False, zorder=3)
                axis.annotate(f"{value:.1f}", (low - pad, yy), xytext=(6, 0), textcoords="offset points",
                              va="center", fontsize=7)
                continue
            axis.scatter(value, yy, c=COLORS[kind], s=170 if mine else 45, marker="*" if mine else "o",
                         edgecolors="black", linewidths=1.2 if mine else 0.4, zorder=3)
        if "best_individual" in table.index:
            axis.axvline(table.loc["best_individual", split], color="#555555", ls="--", lw=0.8, zorder=1)
        axis.set_xlim(low - pad, high + pad)
        axis.set_title(split.replace("ood_mean", "mean of ood"), fontsize=10)
        axis.grid(alpha=0.3, axis="x")
        axis.tick_params(axis="x", labelsize=8)
    families = [family for family, _ in rows]
    for k in range(1, len(rows)):
        if families[k] != families[k - 1]:
            for axis in axes[0]:
                axis.axhline((y[k] + y[k - 1]) / 2, color="#999999", lw=0.6)
    axes[0][0].set_yticks(y, [shown(kind) for _, kind in rows], fontsize=8)
    for tick, (_, kind) in zip(axes[0][0].get_yticklabels(), rows):
        if kind == published:
            tick.set_fontweight("bold")
    axes[0][0].set_ylim(-0.6, len(rows) - 0.4)
    figure.suptitle("Accuracy (%) per split and method, by family; dashed: the best fine-tune, ★: published")
    figure.supxlabel("accuracy (%), each panel zoomed on its methods", fontsize=9)
    figure.tight_layout()
    return _png(figure)


def figure_cosines(ids: list[str], matrix: list[list[float]], labels: list[str] | None = None) -> bytes | None:
    """The cosine matrix of the fine-tune deltas, ingredients in the order given (best val first)."""
    if len(ids) < 2:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 5.5))
    image = axis.imshow(np.array(matrix), cmap="viridis", vmin=min(0.0, np.min(matrix)), vmax=1)
    labels = labels or [i[:6] for i in ids]
    axis.set_xticks(range(len(ids)), labels, rotation=90, fontsize=7)
    axis.set_yticks(range(len(ids)), labels, fontsize=7)
    axis.set_xlabel("ingredient (id, learning rate), best val accuracy first")
    figure.colorbar(image, label=r"$\cos(\theta_i - \theta_0,\ \theta_j - \theta_0)$")
    axis.set_title("Cosine similarity of fine-tune deltas")
    return _png(figure)


