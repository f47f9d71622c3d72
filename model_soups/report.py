"""Results tables, figures and the report, all generated from the files stored in a run folder.

`build_report` reads only `results.csv`, `manifest.json` and `cosine.json`, so `soup report RUN_URL`
redraws everything without recomputing anything.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any, Sequence

import jinja2
import numpy as np
import pandas as pd
from markdown_it import MarkdownIt

from model_soups.figures import (METHOD_KINDS, figure_cosines, figure_greedy, figure_id_vs_ood, figure_searches,
                                 figure_splits)
from model_soups.manifest import Cosines, Manifest, ManifestSoup
from model_soups.methods import SOUP_METHODS
from model_soups.records import GreedyStep, Scalar, SearchStep, SoupRecord, Step, TaskMerge
from model_soups.storage import RunFolder, Store
from model_soups.sweep import SweepStop

COLUMNS = ["model", "kind", "split", "accuracy", "nll", "ece", "n_ingredients"]


def results_frame(rows: list[dict[str, Scalar]]) -> pd.DataFrame:
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


def cosine_order(cosine: Cosines, manifest: Manifest) -> tuple[list[str], list[list[float]], list[str]]:
    """The cosine matrix reordered by val accuracy, best first, with `id (lr)` labels."""
    by_id = {i.id: i for i in manifest.ingredients}
    order = sorted(range(len(cosine.ids)), key=lambda k: -by_id[cosine.ids[k]].val_accuracy if cosine.ids[k] in by_id else 0)
    ids = [cosine.ids[k] for k in order]
    matrix = [[cosine.matrix[a][b] for b in order] for a in order]
    labels = [f"{i[:6]} ({by_id[i].hparams['lr']:.1e})" if i in by_id and "lr" in by_id[i].hparams else i[:6] for i in ids]
    return ids, matrix, labels


def methods_details(results: pd.DataFrame, soups: dict[str, ManifestSoup] | None = None,
                    trajectories: dict[str, list[Step]] | None = None) -> pd.DataFrame:
    """Next to `summary`'s accuracies, in a table of its own so that each fits a page: how many ingredients each
    method averaged, the test split's NLL and ECE (calibration), and what each task-vector soup chose on val
    (`soups`: the manifest's; `trajectories`: their records')."""
    table = summary(results)[["n_ingredients"]]
    test = results[(results.kind != "ingredient") & (results.split == "test")].groupby("kind").first()
    for column in ("nll", "ece"):
        if column in test:
            table[f"test_{column}"] = test[column].reindex(table.index)
    chosen = {SOUP_METHODS[m].kind: chosen_merge(m, s.task, (trajectories or {}).get(m, []))
              for m, s in (soups or {}).items() if s.task}
    if chosen:
        table["chosen on val"] = [chosen.get(kind, "") for kind in table.index]
    return table


def chosen_merge(method: str, task: TaskMerge, trajectory: Sequence[Step] = ()) -> str:
    """alpha for WiSE-FT, lambda for the other task-vector merges, with TIES's k and DARE's p; Model Stock's t is
    no choice on val but the deltas' angle, per tensor: its median and range."""
    if task.combine == "model_stock":
        ratios = [step.t for step in trajectory]
        return f"t {np.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}), no val" if ratios else "no val"
    words = [f"{'α' if method.startswith('wiseft') else 'λ'} {task.scale:g}"]
    words += [f"k {task.top_k:g}%"] if task.top_k is not None else []
    words += [f"p {task.drop:g}"] if task.drop is not None else []
    return ", ".join(words)


def ingredients_tables(results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Accuracy per split of every ingredient, and the hyperparameters that vary in the sweep as one line of text
    per ingredient (it wraps, where a column each would run off the page); both best val first."""
    rows = results[results.kind == "ingredient"]
    table = rows.pivot_table(index="model", columns="split", values="accuracy") * 100
    splits = ["val", "test"] + sorted(c for c in table.columns if c not in ("val", "test"))
    table = table[[c for c in splits if c in table.columns]]
    table = table.sort_values("val", ascending=False) if "val" in table else table
    hparams = whole_numbers(rows.groupby("model")[[c for c in rows.columns if c.startswith("hp_")]].first())
    varying = [c for c in hparams.columns if hparams[c].nunique(dropna=False) > 1]
    words = hparams.loc[table.index, varying].apply(lambda row: ", ".join(
        f"{name.removeprefix('hp_')} {value:.3g}" if isinstance(value, float) else f"{name.removeprefix('hp_')} {value}"
        for name, value in row.items() if not pd.isna(value)), axis=1)
    return table, pd.DataFrame({"hyperparameters": words}, index=table.index)


ONE_INGREDIENT = "The greedy soup is the best fine-tune: no other ingredient kept val accuracy."


def stop_summary(stop: SweepStop | None) -> str:
    """How far a sweep with sweep.stop went (the manifest's `sweep_stop`), and what it saved."""
    if stop is None:
        return ""
    if not stop.saved:
        return (f" The sweep ran all {stop.planned} planned fine-tunes in {len(stop.rounds)} round(s): the greedy soup "
                "never stopped gaining long enough to stop it.")
    return (f" The sweep stopped after {len(stop.rounds)} rounds, when the greedy soup stopped gaining on val: "
            f"{stop.fine_tuned} of {stop.planned} planned fine-tunes, **{stop.saved} saved**.")


def what_happened(results: pd.DataFrame, trajectory: list[GreedyStep]) -> str:
    """The val set's size and resolution, and what the greedy soup did, in words."""
    val = results[results.split == "val"]
    size = int(val["n"].iloc[0]) if "n" in val and len(val) else 0
    words = [f"Val has {size} examples: one example is {100 / size:.2f} points." if size else ""]
    kept = [t for t in trajectory if t.accepted]
    if len(kept) == 1:
        words.append(ONE_INGREDIENT)
    elif kept:
        words.append(f"The greedy soup kept {len(kept)} of {len(trajectory)} ingredients: val {100 * kept[-1].soup_val:.2f} "
                     f"against {100 * kept[0].soup_val:.2f} for the best fine-tune.")
    return " ".join(w for w in words if w)


def read_results(store: Store, run_url: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(store.read_bytes(RunFolder(run_url).file("results.csv"))))


def build_report(store: Store, run_url: str, manifest: Manifest | None = None) -> dict[str, str]:
    """Write report.md, report.html and figures/*.png into the run folder; return their URLs. `manifest`: the one
    about to be written (publishing writes it last), else the stored one."""
    run = RunFolder(run_url)
    results = read_results(store, run_url)
    manifest = manifest if manifest is not None else Manifest.read(store, run.manifest)
    cosine_url = run.file("cosine.json")
    cosine = Cosines.read(store, cosine_url) if store.exists(cosine_url) else Cosines(ids=[], matrix=[])
    trajectory = manifest.greedy_trajectory
    trajectories = {method: SoupRecord.read(store, soup.record).trajectory for method, soup in manifest.soups.items()
                    if soup.task}
    searches = {method: steps for method, steps in trajectories.items() if steps and isinstance(steps[0], SearchStep)}
    published = SOUP_METHODS[manifest.final].kind
    figures = {
        "id_vs_ood": ("In distribution vs distribution shift", figure_id_vs_ood(results, published)),
        "greedy": ("Greedy soup trajectory", figure_greedy(trajectory)),
        "searches": ("Task-vector soups: val accuracy of each candidate", figure_searches(searches)),
        "splits": ("Accuracy per split and method", figure_splits(summary(results), published)),
        "cosine": ("Cosine similarity of fine-tune deltas", figure_cosines(*cosine_order(cosine, manifest))),
    }
    figures = {name: item for name, item in figures.items() if item[1] is not None}
    for name, (_, png) in figures.items():
        store.write_bytes(run.figure(name), png)

    final = manifest.final
    ingredients = ingredients_tables(results)
    sections = [
        ("Summary", f"Experiment `{manifest.experiment}`, run `{manifest.run_id}`: {len(manifest.ingredients)} "
                    f"ingredients of recipe `{manifest.recipe['recipe']}`. Published soup: **{final}** "
                    f"({manifest.soup_ingredients} ingredients). Accuracy in percent; `val` chose, `test` and "
                    f"`ood:*` did not. {what_happened(results, trajectory)}{stop_summary(manifest.sweep_stop)}"),
        ("Methods: accuracy (%)", markdown_table(summary(results).drop(columns="n_ingredients"))),
        ("Methods: ingredients, calibration on test, choices on val",
         markdown_table(methods_details(results, manifest.soups, trajectories))),
        ("Greedy soup trajectory", markdown_table(pd.DataFrame([t.model_dump() for t in trajectory]).assign(
            individual_val=lambda f: f.individual_val * 100, soup_val=lambda f: f.soup_val * 100)) if trajectory else "not cooked"),
        ("Ingredients: accuracy (%)", markdown_table(ingredients[0])),
        ("Ingredients: hyperparameters that vary", markdown_table(ingredients[1])),
        ("Failed or diverged ingredients", "\n".join(f"- `{f.id}`: {f.status}: {f.reason}" for f in manifest.failed) or "none"),
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


def model_card(manifest: Manifest, results: pd.DataFrame, metadata: dict[str, str]) -> str:
    """README.md of the published Hugging Face folder, in the Hub's format: YAML metadata (`metadata` from the
    recipe: base_model, license), then the soup."""
    final = manifest.final
    table = summary(results)
    soup = manifest.soups[final]
    weights = soup.weights if isinstance(soup.weights, list) else None
    val = {i.id: i.val_accuracy for i in manifest.ingredients}
    rows = [f"| `{i}` | {100 * val[i]:.2f} |" + (f" {weights[k]:.3g} |" if weights else " per tensor |")
            for k, i in enumerate(soup.ingredients)]
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: text-classification",
        *(f"{name}: {value}" for name, value in metadata.items()), "tags:", "- model-soup", f"- {final}-soup", "---", "",
        f"# Model soup: {manifest.experiment}, run {manifest.run_id}", "",
        f"The {final} soup of {len(soup.ingredients)} fine-tunes of one pretrained model: their weights averaged into "
        "one model, at no extra inference cost ([Wortsman et al., Model soups, ICML 2022](https://arxiv.org/abs/2203.05482)). "
        f"Published by model-soups from a sweep of {len(manifest.ingredients)} fine-tunes.", "",
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
