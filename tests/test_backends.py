"""Storage backends are one registry (model_soups/storage/backends.py): a backend of one's own runs the flow with
no change outside storage/, and nothing outside storage/ branches on a protocol."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from flows.model_soup import model_soup
from model_soups.config import ConfigError, parse_config
from model_soups.manifest import Manifest
from model_soups.records import IngredientRecord, SoupRecord
from model_soups.storage import Layout, Store
from tests.conftest import small_digits

CHECKOUT = Path(__file__).resolve().parents[1]
BRANCHING = re.compile(r"\.protocol\b|==\s*[\"'](file|s3|memory)[\"']|startswith\([\"'](file|s3|memory)://")


def test_nothing_outside_storage_branches_on_a_protocol():
    found = [f"{path.relative_to(CHECKOUT)}:{number}: {line.strip()}"
             for folder in ("model_soups", "flows", "tasks") for path in sorted((CHECKOUT / folder).rglob("*.py"))
             if "storage" not in path.relative_to(CHECKOUT).parts
             for number, line in enumerate(path.read_text().splitlines(), 1) if BRANCHING.search(line)]
    assert not found, found


def test_a_root_only_one_process_sees_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="memory://x: only the process that writes it sees it"):
        parse_config(small_digits("memory://x"))


def test_a_data_file_is_read_through_a_store_and_a_bad_location_is_named_with_the_fix(tmp_path):
    from model_soups.recipes.tables import read_file

    (tmp_path / "train.tsv").write_text("sentence\tlabel\nfine\t1\n")
    assert read_file(str(tmp_path / "train.tsv"), "train").startswith(b"sentence")
    with pytest.raises(ConfigError, match=r"recipe.options \(train\): cannot read .*/nope.tsv: .*not found"):
        read_file(str(tmp_path / "nope.tsv"), "train")
    with pytest.raises(ConfigError, match=r"https:// is not a storage backend \(file, s3, memory\); give a path, a file:// or"):
        read_file("https://example.org/train.tsv", "train")


@pytest.mark.slow
def test_a_backend_of_ones_own_runs_the_flow_with_no_change_outside_storage(prefect_server, tmp_path, monkeypatch):
    monkeypatch.setenv("SOUP_STORAGE_BACKENDS", "tests.toy_storage")  # the fine-tune processes import it too
    monkeypatch.setenv("PYTHONPATH", str(CHECKOUT))
    import tests.toy_storage  # noqa: F401 - registers toy:// in this process

    root = f"toy://{tmp_path}"
    config = parse_config(small_digits(root, experiment="toy", n=3))
    paths = model_soup(config=config)
    assert paths["run"].startswith(f"{root}/toy/runs/")
    store = Store(config.storage)
    manifest = Manifest.read(store, f"{paths['run']}/manifest.json")
    assert len(manifest.ingredients) == 3 and manifest.pretrained.url.startswith(root)
    for ingredient in manifest.ingredients:  # written by the fine-tune processes, through the toy backend
        assert ingredient.checkpoint.startswith(root) and store.sha256(ingredient.checkpoint) == ingredient.sha256
        meta = IngredientRecord.read(store, Layout(store, "toy").meta(ingredient.id))
        assert meta.status == "completed" and meta.source == "fine-tune" and meta.slot.startswith(("cpu:", "cuda:"))
    for name, sha in manifest.files.items():
        assert store.sha256(f"{paths['run']}/{name}") == sha, name
    greedy = SoupRecord.read(store, manifest.soups["greedy"].record)
    assert greedy.metrics["test"].accuracy > 0.5 and store.sha256(greedy.checkpoint) == greedy.sha256
    assert not list(tmp_path.rglob("*.partial-*"))  # no local rename trick: the toy backend is not `local`


TOY_METHOD_RUN = """
import json, sys
import tests.toy_method  # declares and defines top_two, before the config is imported
from flows.model_soup import model_soup
from model_soups.config import parse_config
from tests.conftest import small_digits

data = small_digits(sys.argv[1], experiment="toy-method", n=3)
data["soup"] = {"methods": ["greedy", "top_two"], "final": "top_two", "ensembles": False}
print(json.dumps(model_soup(config=parse_config(data))))
"""


@pytest.mark.slow
def test_a_soup_method_of_ones_own_runs_the_flow_and_is_published_with_no_change_to_the_package(prefect_server, tmp_path):
    """The method lives in a test module alone (tests/toy_method.py): the flow cooks it, scores it, publishes it as
    the final soup, and the report and results.csv show it."""
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(CHECKOUT)}
    done = subprocess.run([sys.executable, "-c", TOY_METHOD_RUN, f"file://{tmp_path}"], capture_output=True, text=True,
                          env=env, cwd=CHECKOUT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    paths = json.loads(done.stdout.strip().splitlines()[-1])
    store = Store(parse_config({"storage": {"root": f"file://{tmp_path}"}}).storage)
    manifest = Manifest.read(store, f"{paths['run']}/manifest.json")
    best_two = [i.id for i in sorted(manifest.ingredients, key=lambda i: -i.val_accuracy)[:2]]
    toy = manifest.soups["top_two"]
    assert manifest.final == "top_two" and sorted(toy.ingredients) == sorted(best_two) and toy.weights == [1.0, 1.0]
    assert store.sha256(paths["soup"]) == manifest.files["soup.safetensors"] and store.sha256(toy.checkpoint) == toy.sha256
    record = SoupRecord.read(store, toy.record)
    assert record.kind == "top_two_soup" and record.metrics["val"].n > 0
    run = Path(paths["run"].removeprefix("file://"))
    assert "top_two_soup" in (run / "results.csv").read_text() and "top_two_soup" in (run / "report.md").read_text()
