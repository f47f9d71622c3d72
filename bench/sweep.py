"""Soup-aware sweep against random search at the same number of fine-tunes, on digits.

For each sweep seed, the real model_soup flow runs twice on one storage root: `sweep.strategy: random` and
`soup-aware` (Optuna TPE, rounds told each proposal's gain to the greedy soup), both with n fine-tunes over
the recipe's default search space. A fine-tune both strategies propose is trained once. The figure of merit
is the greedy soup's test and mean OOD accuracy; each difference (soup-aware - random) comes with its
paired standard error over the test examples.

    python bench/sweep.py [--seeds 0 1 2] [--n 16] [--initial 4] [--batch 4] [--objective nll|accuracy] [--root R]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from quality import correct_per_example, ood_correct, paired, paired_summary, run_flow, splits_of

from model_soups.config import parse_config
from model_soups.manifest import Manifest
from model_soups.storage import Layout, Store


def greedy(run_url: str) -> dict:
    """The greedy soup's per-example correctness on test and mean OOD, its val, its size, and the best individual's."""
    store = Store(parse_config({"storage": {"root": run_url.rsplit("/runs/", 1)[0].rsplit("/", 1)[0]}}).storage)
    manifest = Manifest.read(store, f"{run_url}/manifest.json")
    layout = Layout(store, manifest.experiment)
    ood = [s for s in splits_of(store, manifest) if s.startswith("ood:")]
    out = {"size": len(manifest.soups["greedy"].ingredients), "run": run_url}
    for kind in ("greedy_soup", "best_individual"):
        out[kind] = {"val": correct_per_example(store, layout, manifest, kind, "val"),
                     "test": correct_per_example(store, layout, manifest, kind, "test"),
                     "ood": ood_correct(store, layout, manifest, kind, ood)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--initial", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--objective", choices=["nll", "accuracy"], default="nll", help="sweep.objective of the soup-aware runs")
    parser.add_argument("--root", default=None, help="storage root; bench/quality.py's digits root reuses its random runs")
    args = parser.parse_args()
    root = args.root or "file://" + tempfile.mkdtemp(prefix="soup-sweep-")
    rows, diffs = [], {"test": [], "ood": []}
    for seed in args.seeds:
        runs = {}
        for strategy in ("random", "soup-aware"):
            sweep = {"n": args.n, "seed": seed, "strategy": strategy}
            if strategy == "soup-aware":
                sweep |= {"initial": args.initial, "batch": args.batch, "objective": args.objective}
            runs[strategy] = greedy(run_flow({"experiment": "quality-digits", "storage": {"root": root}, "sweep": sweep}))
        for strategy, r in runs.items():
            rows.append({"seed": seed, "strategy": strategy, "size": r["size"], "run": r["run"],
                         **{f"{split}": 100 * float(r["greedy_soup"][split].mean()) for split in ("val", "test", "ood")},
                         **{f"best_{split}": 100 * float(r["best_individual"][split].mean()) for split in ("val", "test", "ood")}})
        for split in ("test", "ood"):
            diffs[split].append(paired(runs["soup-aware"]["greedy_soup"][split], runs["random"]["greedy_soup"][split]))

    print(f"\nSoup-aware sweep vs random search, digits, {args.n} fine-tunes each (soup-aware: {args.initial} at random, "
          f"then rounds of {args.batch}, objective: val {args.objective} gain), sweep seeds {args.seeds}; the greedy soup's "
          "accuracy (%)\n")
    print("| seed | strategy | greedy val | greedy test | greedy mean OOD | greedy size | best individual val | best test | best mean OOD |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['strategy']} | {r['val']:.2f} | {r['test']:.2f} | {r['ood']:.2f} | {r['size']} | "
              f"{r['best_val']:.2f} | {r['best_test']:.2f} | {r['best_ood']:.2f} |")
    result = {"rows": rows, "seeds": args.seeds, "n": args.n, "objective": args.objective, "command": " ".join(sys.argv)}
    print()
    for split in ("test", "ood"):
        paired_summary(result, f"soup_aware_minus_random_{split}", diffs[split], per_seed_se=True)
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path(f"bench/results/sweep_digits_{args.objective}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
