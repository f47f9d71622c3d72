"""WiSE-FT along its whole alpha path, on every split: why it does or does not help under distribution shift.

The pipeline chooses alpha on val only. This reads the stored full-sweep runs of `bench/quality.py` (the first
of each sweep seed: their manifests, soups and the pretrained start) and evaluates (1-alpha)*theta_0 +
alpha*theta for alpha = 0, 0.1, ..., 1 on val, test and every shift, for the greedy soup and for the best fine-tune: if the start is less robust than
the fine-tunes, no alpha below 1 can raise OOD accuracy.

    python bench/wiseft.py --root file:///tmp/q-digits [--experiment quality-digits]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from model_soups.config import parse_config
from model_soups.evaluate import predict
from model_soups.merge import Ingredient
from model_soups.recipes.base import get_recipe
from model_soups.methods import ALPHAS
from model_soups.manifest import Manifest
from model_soups.storage import RunFolder, Store
from model_soups.task_vectors import TaskMerge, apply, start, task_vector


def path(store: Store, manifest: Manifest, on: str) -> dict[float, dict[str, float]]:
    """Accuracy (%) on every split of WiSE-FT of `on` (greedy: the greedy soup; best: the best fine-tune) per alpha."""
    config = parse_config(manifest.config)
    recipe = get_recipe(config.recipe.name, config.recipe.options)
    by_id = {i.id: Ingredient(i.id, i.checkpoint, i.sha256) for i in manifest.ingredients}
    members = [by_id[i] for i in manifest.soups["greedy"].ingredients] if on == "greedy" else [by_id[manifest.best_individual]]
    pretrained = Ingredient("pretrained", manifest.pretrained.url, manifest.pretrained.sha256)
    with store.open_checkpoint(pretrained.url) as reader:
        reference = reader.info
    theta0 = start(store, pretrained, torch.float32, reference)
    tau = task_vector(store, theta0, members, TaskMerge("mean"), torch.float32, reference)
    model = recipe.build_model().eval()
    out = {}
    for alpha in ALPHAS:
        model.load_state_dict(apply(theta0, tau, alpha, reference))
        out[alpha] = {split: 100 * float((predict(model, recipe.dataset(split), recipe.eval_batch_size).argmax(1)
                                          == recipe.dataset(split).labels.numpy()).mean()) for split in recipe.splits()}
        shifts = [v for k, v in out[alpha].items() if k.startswith("ood:")]
        if shifts:
            out[alpha]["ood_mean"] = float(np.mean(shifts))
    return out


def full_sweeps(manifests: list[Manifest]) -> list[Manifest]:
    """The first run of each sweep seed among those that fine-tuned the whole sweep: not the first-n subsets of
    `--n` nor the stopped sweeps of `--stop`, which bench/quality.py stores next to them."""
    whole = [m for m in manifests if m.config["sweep"].get("stop") is None]
    largest = max(len(m.ingredients) for m in whole)
    first: dict[int, Manifest] = {}
    for m in whole:
        if len(m.ingredients) == largest:
            first.setdefault(m.config["sweep"]["seed"], m)
    return list(first.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="the --root a bench/quality.py run used")
    parser.add_argument("--experiment", default="quality-digits")
    args = parser.parse_args()
    store = Store(parse_config({"storage": {"root": args.root}}).storage)
    manifests = full_sweeps([Manifest.read(store, RunFolder(run).manifest)
                             for run in sorted(store.children(store.url(args.experiment, "runs")))])
    result = {"runs": [m.run_id for m in manifests], "command": " ".join(sys.argv)}
    for on in ("greedy", "best"):
        paths = [path(store, m, on) for m in manifests]
        columns = [c for c in ("val", "test", "ood_mean") if c in paths[0][ALPHAS[0]]]
        print(f"\nWiSE-FT of the {'greedy soup' if on == 'greedy' else 'best fine-tune'}: accuracy (%) per alpha, "
              f"mean over {len(paths)} runs ({', '.join(columns)}); alpha 0 is the pretrained start\n")
        print("| alpha | " + " | ".join(columns) + " |")
        print("|---|" + "---|" * len(columns))
        for alpha in ALPHAS:
            print(f"| {alpha:g} | " + " | ".join(f"{statistics.mean(p[alpha][c] for p in paths):.2f}" for c in columns) + " |")
        result[on] = {str(alpha): {c: [p[alpha][c] for p in paths] for c in columns} for alpha in ALPHAS}
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path(f"bench/results/wiseft_{args.experiment}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
