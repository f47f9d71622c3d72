"""The paper's table for this project: best individual vs soups vs ensembles, with paired statistics.

Runs the real model_soup flow (local storage, temporary Prefect server) and then reads the stored
per-example logits of every ingredient and soup, so that each difference to the best individual comes
with its paired standard error and its discordant counts.

    python bench/quality.py digits [--seeds 0 1 2 3 4] [--n 2 4 8 16]
    python bench/quality.py text --train URL --test URL [--ood name=URL ...] [--n 2 4 8] [--max-train 6000] [--val 1000]
        e.g. --train ../shared/data/sst2/train.tsv --test ../shared/data/sst2/dev.tsv

--stop RULE (JSON, e.g. '{}' for the defaults or '{"patience": 3}') also runs each seed's sweep with that sweep.stop
and compares its greedy soup, example by example, with the full sweep's, next to the fine-tunes it used.

With several --n, the largest is the full sweep (every method); each smaller n is the first n fine-tunes of the
same sweep (random search draws them in order, so they are reused from storage), cooked as Model Stock and the
greedy soup and compared, example by example, with the greedy soup of the full sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")

from model_soups.config import parse_config  # noqa: E402
from model_soups.methods import SOUP_METHODS  # noqa: E402
from model_soups.manifest import Manifest  # noqa: E402
from model_soups.records import SoupRecord  # noqa: E402
from model_soups.storage import Layout, Store  # noqa: E402

METHODS = ["best_individual", *(m.kind for m in SOUP_METHODS.values()), "ensemble", "greedy_ensemble"]


def correct_per_example(store: Store, layout: Layout, manifest: Manifest, kind: str, split: str) -> np.ndarray:
    """Per-example correctness of one method on one split, from stored logits."""
    from model_soups.ensembles import ensemble_logits, greedy_ensemble
    from model_soups.soups import rank
    from model_soups.merge import Ingredient

    def stored(ingredient_id: str, s: str) -> dict:
        return store.read_arrays(layout.evaluation(ingredient_id, s, "npz"))

    if kind == "best_individual":
        data = stored(manifest.best_individual, split)
    elif kind.endswith("_soup"):
        key = manifest.soups[kind.removesuffix("_soup")].record.rsplit("/", 2)[-2]
        data = store.read_arrays(layout.soup_logits(key, split))
    else:
        val_accuracy = {i.id: i.val_accuracy for i in manifest.ingredients}
        ranked = [i.id for i in rank([Ingredient(i, "") for i in val_accuracy], val_accuracy)]
        members = ranked
        if kind == "greedy_ensemble":
            val = {i: stored(i, "val") for i in ranked}
            members = greedy_ensemble(ranked, {i: v["logits"] for i, v in val.items()}, val[ranked[0]]["labels"],
                                      manifest.config["soup"]["rule"])
        parts = [stored(i, split) for i in members]
        data = {"logits": ensemble_logits([p["logits"] for p in parts]), "labels": parts[0]["labels"]}
    return data["logits"].argmax(1) == data["labels"]


def paired(method: np.ndarray, best: np.ndarray) -> dict[str, float]:
    """Difference in accuracy (points), its paired standard error, and the discordant counts."""
    diff = method.astype(float) - best.astype(float)
    return {"diff_pp": 100 * diff.mean(), "se_pp": 100 * diff.std(ddof=1) / np.sqrt(len(diff)),
            "method_only_right": int(((diff > 0)).sum()), "best_only_right": int((diff < 0).sum()), "n": len(diff)}


def ood_correct(store, layout, manifest, kind, ood_splits) -> np.ndarray:
    """Mean correctness over the OOD splits per example (shifts of the same images), else concatenated."""
    per_split = [correct_per_example(store, layout, manifest, kind, s).astype(float) for s in ood_splits]
    if len({len(p) for p in per_split}) == 1:
        return np.mean(per_split, axis=0)
    return np.concatenate(per_split)


def store_of(run_url: str) -> Store:
    """The store of a run folder `<root>/<experiment>/runs/<id>`."""
    return Store(parse_config({"storage": {"root": run_url.rsplit("/runs/", 1)[0].rsplit("/", 1)[0]}}).storage)


def read_manifest(run_url: str) -> Manifest:
    return Manifest.read(store_of(run_url), f"{run_url}/manifest.json")


def evaluate_run(run_url: str) -> dict:
    store = store_of(run_url)
    manifest = read_manifest(run_url)
    layout = Layout(store, manifest.experiment)
    ood = [s for s in splits_of(store, manifest) if s.startswith("ood:")]
    table = {}
    for kind in METHODS:
        row = {"val": 100 * correct_per_example(store, layout, manifest, kind, "val").mean()}
        for name, correct in [("test", correct_per_example(store, layout, manifest, kind, "test"))] + (
                [("ood", ood_correct(store, layout, manifest, kind, ood))] if ood else []):
            best = (correct_per_example(store, layout, manifest, "best_individual", "test") if name == "test"
                    else ood_correct(store, layout, manifest, "best_individual", ood))
            row[name] = 100 * correct.mean()
            row[f"{name}_vs_best"] = paired(correct, best)
        table[kind] = row
    for name in ["test"] + (["ood"] if ood else []):  # WiSE-FT of the greedy soup against that soup
        greedy = (correct_per_example(store, layout, manifest, "greedy_soup", "test") if name == "test"
                  else ood_correct(store, layout, manifest, "greedy_soup", ood))
        wiseft = (correct_per_example(store, layout, manifest, "wiseft_soup", "test") if name == "test"
                  else ood_correct(store, layout, manifest, "wiseft_soup", ood))
        table["wiseft_soup"][f"{name}_vs_greedy"] = paired(wiseft, greedy)
    for method, soup in manifest.soups.items():  # how many ingredients, and what a task-vector method chose on val
        table[f"{method}_soup"]["n_ingredients"] = len(soup.ingredients)
        record = SoupRecord.read(store, soup.record)
        task = {k: v for k, v in asdict(record.task).items() if v is not None} if record.task else None
        if task and task["combine"] == "model_stock":  # no choice on val: the median of its t per tensor
            task["t"] = statistics.median(step.t for step in record.trajectory)
        table[f"{method}_soup"]["task"] = task
    test = [store.read_arrays(layout.evaluation(i.id, "test", "npz")) for i in manifest.ingredients]
    table["all"] = {"n_ingredients": len(manifest.ingredients), "val_size": len(correct_per_example(
        store, layout, manifest, "best_individual", "val")),
        "ingredients_test": [100 * float((d["logits"].argmax(1) == d["labels"]).mean()) for d in test]}
    return table


FEW = ["model_stock_soup", "greedy_soup"]


def few_ingredient_rows(store: Store, layout: Layout, full: list[Manifest], subsets: dict[int, list[Manifest]]) -> dict:
    """For each sweep size (the subsets' and the full one's) and method in FEW, per run: test and mean-OOD accuracy
    and their paired difference to the full sweep's greedy soup of the same seed."""
    rows = {}
    for n, runs in sorted({**subsets, len(full[0].ingredients): full}.items()):
        for kind in FEW:
            rows[(n, kind)] = [{**versus_full_greedy(store, layout, manifest, kind, reference),
                                "n_ingredients": len(manifest.soups[kind.removesuffix("_soup")].ingredients)}
                               for manifest, reference in zip(runs, full)]
    return rows


def versus_full_greedy(store: Store, layout: Layout, manifest: Manifest, kind: str, reference: Manifest) -> dict:
    """One method of `manifest` against the greedy soup of `reference` (the full sweep of the same seed: the same
    examples): test and mean-OOD accuracy, and the paired differences."""
    ood = [s for s in splits_of(store, reference) if s.startswith("ood:")]
    row = {}
    for name in ["test"] + (["ood"] if ood else []):
        mine, theirs = ((correct_per_example(store, layout, m, k, "test") if name == "test"
                         else ood_correct(store, layout, m, k, ood)) for m, k in ((manifest, kind), (reference, "greedy_soup")))
        row[name], row[f"{name}_vs_full_greedy"] = 100 * mine.mean(), paired(mine, theirs)
    return row


def splits_of(store: Store, manifest: Manifest) -> list[str]:
    return list(SoupRecord.read(store, manifest.soups["greedy"].record).metrics)


def print_few(rows: dict, full_n: int) -> dict:
    """The few-ingredient table, and the first n at which each method comes within one paired SE of the full greedy
    soup (mean difference + mean paired SE >= 0), on test and on mean OOD."""
    has_ood = "ood" in next(iter(rows.values()))[0]
    names = ["test"] + (["ood"] if has_ood else [])
    print(f"\nFew ingredients: Model Stock and the greedy soup of the first n fine-tunes against the greedy soup of all "
          f"{full_n} (accuracy %, mean ± std over seeds; difference: mean (paired SE, per run, averaged))\n")
    print("| n | method | test | test - greedy of all | " + ("mean OOD | OOD - greedy of all | " if has_ood else "")
          + "ingredients kept |")
    print("|---|---|---|---|" + ("---|---|" if has_ood else "") + "---|")
    summary = {"rows": {f"{n}/{kind}": runs for (n, kind), runs in rows.items()}, "first_within_one_se": {}}
    for (n, kind), runs in rows.items():
        line = f"| {n} | {kind.removesuffix('_soup')} |"
        for name in names:
            d = [r[f"{name}_vs_full_greedy"] for r in runs]
            line += (f" {fmt([r[name] for r in runs])} | {statistics.mean(x['diff_pp'] for x in d):+.2f} "
                     f"({statistics.mean(x['se_pp'] for x in d):.2f}) |")
        print(line + f" {fmt([r['n_ingredients'] for r in runs])} |")
    for kind in FEW:
        for name in names:
            within = [n for (n, k), runs in sorted(rows.items()) if k == kind and n < full_n
                      and statistics.mean(r[f"{name}_vs_full_greedy"]["diff_pp"] + r[f"{name}_vs_full_greedy"]["se_pp"]
                                          for r in runs) >= 0]
            first = within[0] if within else None
            summary["first_within_one_se"][f"{kind}/{name}"] = first
            print(f"{kind.removesuffix('_soup')} on {'mean OOD' if name == 'ood' else name}: "
                  + (f"first within one paired SE of the greedy soup of all {full_n} at n = {first}" if first else
                     f"not within one paired SE of the greedy soup of all {full_n} at any smaller n"))
    return summary


def print_stop(rule: str, stopped: list[Manifest], full: list[Manifest], store: Store, layout: Layout) -> dict:
    """Fine-tunes a sweep.stop run used and its greedy soup against the full sweep's, per seed and on average."""
    rows = []
    for manifest, reference in zip(stopped, full):
        rows.append({"fine_tunes": manifest.sweep_stop.fine_tuned, "planned": manifest.sweep_stop.planned,
                     "greedy_size": len(manifest.soups["greedy"].ingredients),
                     **versus_full_greedy(store, layout, manifest, "greedy_soup", reference)})
    has_ood = "ood" in rows[0]
    print(f"\nsweep.stop {rule}: the greedy soup of the stopped sweep against the greedy soup of all "
          f"{rows[0]['planned']} (accuracy %; difference (paired SE))\n")
    print("| seed run | fine-tunes used | greedy keeps | test | test - full greedy | "
          + ("mean OOD | OOD - full greedy |" if has_ood else ""))
    print("|---|---|---|---|---|" + ("---|---|" if has_ood else ""))
    for i, r in enumerate(rows + [None]):
        if r is None:  # the mean over the runs
            r = {"fine_tunes": statistics.mean(x["fine_tunes"] for x in rows), "planned": rows[0]["planned"],
                 "greedy_size": statistics.mean(x["greedy_size"] for x in rows),
                 **{k: statistics.mean(x[k] for x in rows) for k in ("test", "ood") if k in rows[0]},
                 **{f"{k}_vs_full_greedy": {"diff_pp": statistics.mean(x[f"{k}_vs_full_greedy"]["diff_pp"] for x in rows),
                                            "se_pp": statistics.mean(x[f"{k}_vs_full_greedy"]["se_pp"] for x in rows)}
                    for k in ("test", "ood") if k in rows[0]}}
        label = "mean" if i == len(rows) else str(i)
        line = f"| {label} | {r['fine_tunes']:g} of {r['planned']} | {r['greedy_size']:g} |"
        for k in ["test"] + (["ood"] if has_ood else []):
            d = r[f"{k}_vs_full_greedy"]
            line += f" {r[k]:.2f} | {d['diff_pp']:+.2f} ({d['se_pp']:.2f}) |"
        print(line)
    return {"rule": rule, "runs": rows}


def run_flow(config: dict) -> str:
    from flows.model_soup import model_soup

    return model_soup(config=parse_config(config))["run"]


def fmt(values: list[float]) -> str:
    return f"{values[0]:.2f}" if len(values) == 1 else f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def paired_summary(result: dict, name: str, diffs: list[dict], per_seed_se: bool = False) -> None:
    """A difference over the runs: its mean, its paired SE (per run, averaged) and each run's, into `result`, printed."""
    result[name] = statistics.mean(d["diff_pp"] for d in diffs)
    result[f"{name}_paired_se"] = statistics.mean(d["se_pp"] for d in diffs)
    result[f"{name}_per_seed"] = [d["diff_pp"] for d in diffs]
    print(f"{name} = {result[name]:+.2f} pp (paired SE {result[f'{name}_paired_se']:.2f}, per run, averaged); per seed: "
          + ", ".join(f"{d['diff_pp']:+.2f}" + (f" (SE {d['se_pp']:.2f})" if per_seed_se else "") for d in diffs))


def chosen(tasks: list[dict | None]) -> str:
    """What a task-vector method chose on val in each run: lambda (alpha for WiSE-FT), k %, p; Model Stock's median t
    per tensor (from the deltas' angle, not val)."""
    if not any(tasks):
        return ""
    if tasks[0]["combine"] == "model_stock":
        return "median t " + "; ".join(f"{t['t']:.2f}" for t in tasks)
    return "; ".join(f"{t['scale']:g}" + (f" k{t['top_k']:g}" if "top_k" in t else "") + (f" p{t['drop']:g}" if "drop" in t else "")
                     for t in tasks)


def print_table(tables: list[dict], title: str) -> dict:
    has_ood = "ood" in tables[0]["best_individual"]
    print(f"\n{title}\n")
    print("| method | val | test | test - best (paired SE) [method only / best only right] |"
          + (" mean OOD | OOD - best (paired SE) |" if has_ood else "") + " ingredients | chosen on val, per seed |")
    print("|---|---|---|---|" + ("---|---|" if has_ood else "") + "---|---|")
    summary = {}
    for kind in METHODS:
        rows = [t[kind] for t in tables]
        line = f"| {kind} | {fmt([r['val'] for r in rows])} | {fmt([r['test'] for r in rows])} | "
        d = [r["test_vs_best"] for r in rows]
        line += (f"{fmt([x['diff_pp'] for x in d])} ({statistics.mean(x['se_pp'] for x in d):.2f}) "
                 f"[{sum(x['method_only_right'] for x in d)} / {sum(x['best_only_right'] for x in d)}] |")
        if has_ood:
            o = [r["ood_vs_best"] for r in rows]
            line += f" {fmt([r['ood'] for r in rows])} | {fmt([x['diff_pp'] for x in o])} ({statistics.mean(x['se_pp'] for x in o):.2f}) |"
        sizes = [r.get("n_ingredients", 1 if kind == "best_individual" else t["all"]["n_ingredients"])
                 for r, t in zip(rows, tables)]
        everything = all(size == t["all"]["n_ingredients"] for size, t in zip(sizes, tables))
        line += f" {'greedy' if kind == 'greedy_ensemble' else f'all {sizes[0]}' if everything else fmt(sizes)} |"
        line += f" {chosen([r.get('task') for r in rows])} |"
        print(line)
        summary[kind] = rows
    greedy = [t["greedy_soup"] for t in tables]
    result = {"runs": tables, "val_size": tables[0]["all"]["val_size"]}
    result["uniform_minus_median_test_per_seed"] = [t["uniform_soup"]["test"] - statistics.median(t["all"]["ingredients_test"])
                                                    for t in tables]
    result["uniform_minus_median_test"] = statistics.mean(result["uniform_minus_median_test_per_seed"])
    result["greedy_size_per_seed"] = [g["n_ingredients"] for g in greedy]
    result["greedy_size"] = statistics.mean(result["greedy_size_per_seed"])
    print(f"\nval: {result['val_size']} examples, one example is {100 / result['val_size']:.2f} points")
    for split in ["test"] + (["ood"] if has_ood else []):
        paired_summary(result, f"greedy_minus_best_{split}", [g[f"{split}_vs_best"] for g in greedy])
    print(f"uniform_minus_median_test = {result['uniform_minus_median_test']:+.2f} pp; per seed: "
          + ", ".join(f"{d:+.2f}" for d in result["uniform_minus_median_test_per_seed"]))
    for split in ["test"] + (["ood"] if has_ood else []):
        paired_summary(result, f"wiseft_minus_greedy_{split}", [t["wiseft_soup"][f"{split}_vs_greedy"] for t in tables])
    result["wiseft_alpha_per_seed"] = [t["wiseft_soup"]["task"]["scale"] for t in tables]
    print(f"greedy_size = {result['greedy_size']:.1f} of {tables[0]['all']['n_ingredients']}; per seed: {result['greedy_size_per_seed']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=["digits", "text"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="sweep seeds (one run each)")
    parser.add_argument("--n", type=int, nargs="+", default=None, help="fine-tunes per run, the largest the full sweep "
                        "(digits 16, text 8); smaller ones: the first n of it, cooked as Model Stock and greedy")
    parser.add_argument("--root", default=None, help="storage root (default: a temporary folder)")
    parser.add_argument("--stop", nargs="+", default=[], metavar="RULE", help="sweep.stop rules (JSON) to compare with "
                        "the full sweep")
    parser.add_argument("--train")
    parser.add_argument("--test")
    parser.add_argument("--ood", nargs="*", default=[], metavar="NAME=URL")
    parser.add_argument("--text-column", default="sentence")
    parser.add_argument("--max-train", type=int, default=6000, help="text: training sentences (val is held out besides)")
    parser.add_argument("--val", type=int, default=1000, help="text: sentences held out from train as val")
    parser.add_argument("--epochs", type=int, default=1, help="text: epochs of every fine-tune")
    args = parser.parse_args()
    root = args.root or "file://" + tempfile.mkdtemp(prefix=f"soup-quality-{args.recipe}-")
    sizes = sorted(set(args.n or [16 if args.recipe == "digits" else 8]))
    if sizes[0] < 2:
        sys.exit("quality.py --n: every size needs at least 2 fine-tunes (Model Stock's minimum)")
    full_n, tables, full_manifests, subsets = sizes[-1], [], [], {n: [] for n in sizes[:-1]}
    rules = [json.dumps(json.loads(rule)) for rule in args.stop]
    stopped: dict[str, list[dict]] = {rule: [] for rule in rules}
    for seed in args.seeds:
        if args.recipe == "digits":
            config = {"experiment": "quality-digits", "storage": {"root": root},
                      "sweep": {"n": full_n, "seed": seed}}
        else:
            if not (args.train and args.test):
                sys.exit("quality.py text: give --train and --test (e.g. ../shared/data/sst2/train.tsv and dev.tsv)")
            total = args.max_train + args.val
            options = {"train": args.train, "test": args.test, "text_column": args.text_column,
                       "max_train_examples": total, "val_fraction": args.val / total, "max_length": 64,
                       "ood": dict(item.split("=", 1) for item in args.ood)}
            config = {"experiment": "quality-text", "storage": {"root": root},
                      "recipe": {"name": "text", "options": options},
                      "sweep": {"n": full_n, "seed": seed, "params": {
                          "epochs": [args.epochs], "lr": {"low": 1e-5, "high": 1e-4, "log": True}}},
                      "soup": {"learned": {"steps": 50}}}
        run = run_flow(config)
        tables.append(evaluate_run(run))
        full_manifests.append(read_manifest(run))
        for n in subsets:  # the first n fine-tunes of the same sweep: reused, only their soups are cooked
            few = {**config, "sweep": {**config["sweep"], "n": n},
                   "soup": {**config.get("soup", {}), "methods": ["greedy", "model_stock"], "ensembles": False}}
            subsets[n].append(read_manifest(run_flow(few)))
        for rule in rules:  # the same sweep in rounds, stopped when its greedy soup stops gaining
            early = {**config, "sweep": {**config["sweep"], "stop": json.loads(rule)},
                     "soup": {**config.get("soup", {}), "methods": ["greedy"], "ensembles": False}}
            stopped[rule].append(read_manifest(run_flow(early)))
    title = (f"Quality, {args.recipe} recipe, {tables[0]['all']['n_ingredients']} ingredients per run, "
             f"sweep seeds {args.seeds} (accuracy %, mean ± std over seeds)")
    result = print_table(tables, title)
    store = store_of(run)
    layout = Layout(store, full_manifests[0].experiment)
    if subsets:
        result["few_ingredients"] = print_few(few_ingredient_rows(store, layout, full_manifests, subsets), full_n)
    result["stop"] = [print_stop(rule, stopped[rule], full_manifests, store, layout) for rule in rules]
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path(f"bench/results/quality_{args.recipe}.json").write_text(json.dumps(
        {**result, "seeds": args.seeds, "command": " ".join(sys.argv)}, indent=2, default=float))


if __name__ == "__main__":
    main()
