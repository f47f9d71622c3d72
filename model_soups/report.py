"""Results tables, figures and the report, all generated from the files stored in a run folder.

`build_report` reads only `results.csv`, `manifest.json` and `cosine.json`, so `soup report RUN_URL`
redraws everything without recomputing anything.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from markdown_it import MarkdownIt  # noqa: E402

from model_soups.records import SweepStop  # noqa: E402
from model_soups.soups import SOUP_METHODS  # noqa: E402
from model_soups.storage import RunFolder, Store  # noqa: E402

COLUMNS = ["model", "kind", "split", "accuracy", "nll", "ece", "n_ingredients"]
COLORS = {"best_individual": "#444444", **{m.kind: m.color for m in SOUP_METHODS.values()},
          "ensemble": "#2ca02c", "greedy_ensemble": "#17becf"}
METHOD_KINDS = list(COLORS)


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = whole_numbers(pd.DataFrame(rows))
    return frame[COLUMNS + [c for c in frame.columns if c not in COLUMNS]]


def whole_numbers(frame: pd.DataFrame) -> pd.DataFrame:
    """Hyperparameter columns that hold only whole numbers (epochs, seed) as integers, blank where missing."""
    for column in [c for c in frame.columns if c.startswith("hp_")]:
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.notna().any() and values.notna().sum() == frame[column].notna().sum() and (values.dropna() % 1 == 0).all():
            frame[column] = values.astype("Int64")
    return frame


def summary(results: pd.DataFrame) -> pd.DataFrame:
    """One row per method: val, test and mean OOD accuracy (percent), ingredients used."""
    methods = results[results.kind != "ingredient"]
    table = methods.pivot_table(index="kind", columns="split", values="accuracy", aggfunc="first") * 100
    ood = [c for c in table.columns if str(c).startswith("ood:")]
    if ood:
        table["ood_mean"] = table[ood].mean(axis=1)
    table["n_ingredients"] = methods.groupby("kind")["n_ingredients"].first()
    order = [k for k in METHOD_KINDS if k in table.index]
    ordered = ["val", "test"] + (["ood_mean"] if ood else []) + ood + ["n_ingredients"]
    return table.loc[order, [c for c in ordered if c in table.columns]]


def markdown_table(frame: pd.DataFrame, digits: int = 2) -> str:
    frame = frame if frame.index.name is None and not isinstance(frame.index, pd.MultiIndex) else frame.reset_index()
    cells = [[_number(v, digits) for v in row] for row in frame.itertuples(index=False)]
    head = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def _number(value: Any, digits: int) -> str:
    """Accuracies with `digits` decimals; small values (a learning rate, an ECE) with 3 significant digits."""
    if not isinstance(value, float) or np.isnan(value):
        return "" if isinstance(value, float) else str(value)
    return f"{value:.{digits}f}" if value == 0 or abs(value) >= 0.1 else f"{value:.3g}"


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def figure_id_vs_ood(results: pd.DataFrame) -> bytes | None:
    acc = results.pivot_table(index=["kind", "model"], columns="split", values="accuracy", aggfunc="first") * 100
    ood = [c for c in acc.columns if str(c).startswith("ood:")]
    if not ood or "test" not in acc.columns:
        return None
    acc["ood_mean"] = acc[ood].mean(axis=1)
    figure, axis = plt.subplots(figsize=(6, 4.5))
    if "ingredient" in acc.index.get_level_values(0):
        ing = acc.loc["ingredient"]
        axis.scatter(ing["test"], ing["ood_mean"], c="#999999", s=25, label="ingredients")
    for kind in METHOD_KINDS:
        if kind in acc.index.get_level_values(0):
            row = acc.loc[kind].iloc[0]
            axis.scatter(row["test"], row["ood_mean"], c=COLORS[kind], s=90, marker="*" if "soup" in kind else "D",
                         label=kind.replace("_", " "), edgecolors="black", linewidths=0.5)
    axis.set_xlabel("test accuracy (%)")
    axis.set_ylabel(f"mean accuracy over {len(ood)} distribution shifts (%)")
    axis.set_title("In distribution vs under distribution shift")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    axis.grid(alpha=0.3)
    return _png(figure)


def figure_greedy(trajectory: list[dict[str, Any]]) -> bytes | None:
    if not trajectory:
        return None
    steps = np.arange(1, len(trajectory) + 1)
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    axis.plot(steps, [100 * t["individual_val"] for t in trajectory], "o", c="#999999", label="ingredient alone")
    for accepted, color, label in ((True, "#2ca02c", "added"), (False, "#d62728", "rejected")):
        points = [(s, 100 * t["soup_val"]) for s, t in zip(steps, trajectory) if t["accepted"] == accepted]
        if points:
            axis.scatter(*zip(*points), c=color, s=50, zorder=3, label=f"soup with it ({label})")
    kept = np.maximum.accumulate([t["soup_val"] if t["accepted"] else -1 for t in trajectory]) * 100
    axis.step(steps, kept, where="post", c="black", lw=1, label="greedy soup")
    axis.set_xlabel("ingredient, in order of val accuracy")
    axis.set_ylabel("val accuracy (%)")
    axis.set_title("Greedy soup: each ingredient tried once")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _png(figure)


def figure_searches(trajectories: dict[str, list[dict[str, Any]]]) -> bytes | None:
    """Val accuracy of every candidate of each task-vector soup along its scale (alpha or lambda), one line per
    TIES k or DARE p; the chosen one starred."""
    if not trajectories:
        return None
    columns = min(3, len(trajectories))
    rows = -(-len(trajectories) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axis, (method, trajectory) in zip(axes.flat, trajectories.items()):
        lines = pd.DataFrame(trajectory).assign(soup_val=lambda f: 100 * f.soup_val)
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


def figure_splits(results: pd.DataFrame) -> bytes:
    table = summary(results).drop(columns=["n_ingredients", "ood_mean"], errors="ignore")
    figure, axis = plt.subplots(figsize=(8.5, 3.8))
    width = 0.8 / max(1, len(table.index))
    for i, kind in enumerate(table.index):
        axis.bar(np.arange(len(table.columns)) + i * width, table.loc[kind], width, label=kind.replace("_", " "),
                 color=COLORS.get(kind))
    axis.set_xticks(np.arange(len(table.columns)) + width * (len(table.index) - 1) / 2, table.columns)
    axis.set_ylim(0, 100)  # from zero: bar heights are then proportional to accuracy
    axis.set_ylabel("accuracy (%)")
    axis.set_title("Accuracy per split and method")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    axis.grid(alpha=0.3, axis="y")
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


def cosine_order(cosine: dict[str, Any], manifest: dict[str, Any]) -> tuple[list[str], list[list[float]], list[str]]:
    """The cosine matrix reordered by val accuracy, best first, with `id (lr)` labels."""
    by_id = {i["id"]: i for i in manifest["ingredients"]}
    order = sorted(range(len(cosine["ids"])), key=lambda k: -by_id.get(cosine["ids"][k], {}).get("val_accuracy", 0))
    ids = [cosine["ids"][k] for k in order]
    matrix = [[cosine["matrix"][a][b] for b in order] for a in order]
    labels = [f"{i[:6]} ({by_id[i]['hparams']['lr']:.1e})" if "lr" in by_id.get(i, {}).get("hparams", {}) else i[:6]
              for i in ids]
    return ids, matrix, labels


def methods_table(results: pd.DataFrame, soups: dict[str, dict] | None = None,
                  trajectories: dict[str, list[dict[str, Any]]] | None = None) -> pd.DataFrame:
    """`summary` with the test split's NLL and ECE (calibration next to accuracy), and what each task-vector soup
    chose on val (`soups`: the manifest's; `trajectories`: their records')."""
    table = summary(results)
    test = results[(results.kind != "ingredient") & (results.split == "test")].groupby("kind").first()
    for column in ("nll", "ece"):
        if column in test:
            table[f"test_{column}"] = test[column].reindex(table.index)
    chosen = {SOUP_METHODS[m].kind: chosen_merge(m, s["task"], (trajectories or {}).get(m, []))
              for m, s in (soups or {}).items() if s.get("task")}
    if chosen:
        table["chosen on val"] = [chosen.get(kind, "") for kind in table.index]
    return table


def chosen_merge(method: str, task: dict[str, Any], trajectory: list[dict[str, Any]] = ()) -> str:
    """alpha for WiSE-FT, lambda for the other task-vector merges, with TIES's k and DARE's p; Model Stock's t is
    no choice on val but the deltas' angle, per tensor: its median and range."""
    if task["combine"] == "model_stock":
        ratios = [step["t"] for step in trajectory]
        return f"t {np.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}), no val" if ratios else "no val"
    words = [f"{'α' if method.startswith('wiseft') else 'λ'} {task['scale']:g}"]
    words += [f"k {task['top_k']:g}%"] if "top_k" in task else []
    words += [f"p {task['drop']:g}"] if "drop" in task else []
    return ", ".join(words)


def ingredients_table(results: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per split of every ingredient, best val first, with the hyperparameters that vary in the sweep."""
    rows = results[results.kind == "ingredient"]
    table = rows.pivot_table(index="model", columns="split", values="accuracy") * 100
    splits = ["val", "test"] + sorted(c for c in table.columns if c not in ("val", "test"))
    table = table[[c for c in splits if c in table.columns]]
    hparams = whole_numbers(rows.groupby("model")[[c for c in rows.columns if c.startswith("hp_")]].first())
    varying = [c for c in hparams.columns if hparams[c].nunique(dropna=False) > 1]
    table = table.join(hparams[varying].rename(columns=lambda c: c.removeprefix("hp_")))
    return table.sort_values("val", ascending=False) if "val" in table else table


ONE_INGREDIENT = "The greedy soup is the best fine-tune: no other ingredient kept val accuracy."


def stop_summary(stop: dict[str, Any] | None) -> str:
    """How far a sweep with sweep.stop went (the manifest's `sweep_stop`), and what it saved."""
    if not stop:
        return ""
    stop = SweepStop.model_validate(stop)
    if not stop.saved:
        return (f" The sweep ran all {stop.planned} planned fine-tunes in {len(stop.rounds)} round(s): the greedy soup "
                "never stopped gaining long enough to stop it.")
    return (f" The sweep stopped after {len(stop.rounds)} rounds, when the greedy soup stopped gaining on val: "
            f"{stop.fine_tuned} of {stop.planned} planned fine-tunes, **{stop.saved} saved**.")


def what_happened(results: pd.DataFrame, trajectory: list[dict[str, Any]]) -> str:
    """The val set's size and resolution, and what the greedy soup did, in words."""
    val = results[results.split == "val"]
    size = int(val["n"].iloc[0]) if "n" in val and len(val) else 0
    words = [f"Val has {size} examples: one example is {100 / size:.2f} points." if size else ""]
    kept = [t for t in trajectory if t["accepted"]]
    if len(kept) == 1:
        words.append(ONE_INGREDIENT)
    elif kept:
        words.append(f"The greedy soup kept {len(kept)} of {len(trajectory)} ingredients: val {100 * kept[-1]['soup_val']:.2f} "
                     f"against {100 * kept[0]['soup_val']:.2f} for the best fine-tune.")
    return " ".join(w for w in words if w)


def read_results(store: Store, run_url: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(store.read_bytes(RunFolder(run_url).file("results.csv"))))


def build_report(store: Store, run_url: str) -> dict[str, str]:
    """Write report.md, report.html and figures/*.png into the run folder; return their URLs."""
    run = RunFolder(run_url)
    results = read_results(store, run_url)
    manifest = store.read_json(run.manifest)
    cosine_url = run.file("cosine.json")
    cosine = store.read_json(cosine_url) if store.exists(cosine_url) else {"ids": [], "matrix": []}
    trajectory = manifest.get("greedy_trajectory", [])
    trajectories = {method: store.read_json(soup["record"])["trajectory"] for method, soup in manifest["soups"].items()
                    if soup.get("task")}
    searches = {method: steps for method, steps in trajectories.items() if steps and "soup_val" in steps[0]}  # chosen on val
    figures = {
        "id_vs_ood": ("In distribution vs distribution shift", figure_id_vs_ood(results)),
        "greedy": ("Greedy soup trajectory", figure_greedy(trajectory)),
        "searches": ("Task-vector soups: val accuracy of each candidate", figure_searches(searches)),
        "splits": ("Accuracy per split and method", figure_splits(results)),
        "cosine": ("Cosine similarity of fine-tune deltas", figure_cosines(*cosine_order(cosine, manifest))),
    }
    figures = {name: item for name, item in figures.items() if item[1] is not None}
    for name, (_, png) in figures.items():
        store.write_bytes(run.figure(name), png)

    failed = manifest.get("failed", [])
    final = manifest["final"]
    sections = [
        ("Summary", f"Experiment `{manifest['experiment']}`, run `{manifest['run_id']}`: {len(manifest['ingredients'])} "
                    f"ingredients of recipe `{manifest['recipe']['recipe']}`. Published soup: **{final}** "
                    f"({manifest['soup_ingredients']} ingredients). Accuracy in percent; `val` chose, `test` and "
                    f"`ood:*` did not. {what_happened(results, trajectory)}{stop_summary(manifest.get('sweep_stop'))}"),
        ("Methods", markdown_table(methods_table(results, manifest.get("soups"), trajectories))),
        ("Greedy soup trajectory", markdown_table(pd.DataFrame(trajectory).assign(
            individual_val=lambda f: f.individual_val * 100, soup_val=lambda f: f.soup_val * 100)) if trajectory else "not cooked"),
        ("Ingredients", markdown_table(ingredients_table(results))),
        ("Failed or diverged ingredients", "\n".join(f"- `{f['id']}`: {f['status']}: {f['reason']}" for f in failed) or "none"),
    ]
    markdown = ["# Model soup report", ""]
    for title, body in sections:
        markdown += [f"## {title}", "", body, ""]
    figure_links = ["## Figures", ""] + [f"![{title}](figures/{name}.png)" for name, (title, _) in figures.items()]
    store.write_bytes(run.file("report.md"), "\n".join(markdown + figure_links).encode())
    # the same markdown as HTML, with the figures inside the page: report.html is one self-contained file
    page = HTML.render(body=MARKDOWN.render("\n".join(markdown)), figures=[
        (name, title, base64.b64encode(png).decode()) for name, (title, png) in figures.items()])
    store.write_bytes(run.file("report.html"), page.encode())
    return {"report.md": run.file("report.md"), "report.html": run.file("report.html")}


def embedded_markdown(store: Store, run_url: str) -> str:
    """report.md with its figures inside it as data URIs: what the Prefect UI's markdown artifact can show, where a
    relative link has nothing to point to."""
    run = RunFolder(run_url)

    def inline(match: re.Match) -> str:
        return f"](data:image/png;base64,{base64.b64encode(store.read_bytes(run.figure(match.group(1)))).decode()})"

    return re.sub(r"\]\(figures/([\w-]+)\.png\)", inline, store.read_bytes(run.file("report.md")).decode())


def model_card(manifest: dict[str, Any], results: pd.DataFrame) -> str:
    """README.md of the published Hugging Face folder, in the Hub's format: YAML metadata, then the soup."""
    final = manifest["final"]
    table = summary(results)
    soup = manifest["soups"][final]
    weights = soup["weights"] if isinstance(soup["weights"], list) else None
    val = {i["id"]: i["val_accuracy"] for i in manifest["ingredients"]}
    rows = [f"| `{i}` | {100 * val[i]:.2f} |" + (f" {weights[k]:.3g} |" if weights else " per tensor |")
            for k, i in enumerate(soup["ingredients"])]
    base = manifest["recipe"]["options"].get("model") or "sentence-transformers/all-MiniLM-L6-v2"
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: text-classification", f"base_model: {base}",
        "tags:", "- model-soup", f"- {final}-soup", "---", "",
        f"# Model soup: {manifest['experiment']}, run {manifest['run_id']}", "",
        f"The {final} soup of {len(soup['ingredients'])} fine-tunes of one pretrained model: their weights averaged into "
        "one model, at no extra inference cost ([Wortsman et al., Model soups, ICML 2022](https://arxiv.org/abs/2203.05482)). "
        f"Published by model-soups from a sweep of {len(manifest['ingredients'])} fine-tunes.", "",
        "```python", "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
        "model = AutoModelForSequenceClassification.from_pretrained(FOLDER, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(FOLDER)", "```", "",
        "## Accuracy (%)", "", "`val` chose the ingredients; `test` and `ood:*` did not.", "", markdown_table(table), "",
        "## Ingredients", "", "| ingredient | val accuracy | weight |", "|---|---|---|", *rows, ""])


MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")
HTML = jinja2.Environment(autoescape=True).from_string("""<!doctype html>
<html><head><meta charset="utf-8"><title>Model soup report</title><style>
body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}
</style></head><body>
{{ body | safe }}
{% for name, title, png in figures %}<h2>{{ title }}</h2><img alt="{{ name }}" src="data:image/png;base64,{{ png }}">
{% endfor %}</body></html>
""")
