"""Real faults in fine-tune processes: each is retried as configured, then left out with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.model_soup import model_soup
from model_soups.config import parse_config
from model_soups.ingredients import has_result, open_storage, stored_ingredient
from tests.conftest import small_digits

pytestmark = pytest.mark.slow

FAULTS = {2: "crash", 3: "hang", 4: "oom", 5: "nan", 6: "crash-once"}
REASONS = {"crash": "crashed: killed by SIGKILL", "hang": "hung: still running after execution.timeout_s=25s",
           "oom": "out of memory", "nan": "loss became nan"}


@pytest.fixture(scope="module")
def faulty_run(prefect_server, tmp_path_factory):
    root, markers = tmp_path_factory.mktemp("fault-storage"), tmp_path_factory.mktemp("fault-markers")
    data = small_digits(f"file://{root}", experiment="faults", seed=list(range(7)))
    data["recipe"] = {"name": "tests.faulty_recipe:FaultyDigits",
                      "options": {**data["recipe"]["options"], "faults": FAULTS, "marker_dir": str(markers)}}
    data["sweep"]["strategy"] = "grid"
    data["execution"].update(retries=1, timeout_s=25, min_ingredients=3)
    config = parse_config(data)
    paths = model_soup(config=config)  # returns only if the flow run ends Completed
    metas = {}
    for meta_file in (root / "faults" / "ingredients").glob("*/meta.json"):
        meta = json.loads(meta_file.read_text())
        metas[meta["hparams"]["seed"]] = meta
    return config, paths, metas, markers


def run_file(paths: dict, name: str) -> Path:
    return Path(paths["run"].removeprefix("file://")) / name


def test_the_soup_is_made_from_the_ingredients_that_survived(faulty_run):
    _, paths, metas, markers = faulty_run
    manifest = json.loads(run_file(paths, "manifest.json").read_text())
    survivors = {i["id"] for i in manifest["ingredients"]}
    assert survivors == {metas[seed]["id"] for seed in (0, 1, 6)}
    assert set(manifest["soups"]["greedy"]["ingredients"]) <= survivors
    assert (markers / "crashed-6").exists()  # seed 6 crashed once and was retried successfully
    assert metas[6]["status"] == "completed"


@pytest.mark.parametrize("seed", [2, 3, 4, 5])
def test_each_fault_is_left_out_with_its_reason_in_meta_manifest_and_report(faulty_run, seed):
    config, paths, metas, _ = faulty_run
    fault, meta = FAULTS[seed], metas[seed]
    assert REASONS[fault] in meta["reason"]
    if fault == "nan":
        assert meta["status"] == "diverged"  # a result, not retried: the same seed diverges again
    else:
        assert meta["status"] == "failed" and meta["failures"] == config.execution.retries + 1
    manifest = json.loads(run_file(paths, "manifest.json").read_text())
    (failed,) = [f for f in manifest["failed"] if f["id"] == meta["id"]]
    assert REASONS[fault] in failed["reason"]
    report = run_file(paths, "report.md").read_text()
    assert meta["id"] in report and REASONS[fault] in report


def test_a_failed_attempt_is_not_a_result_and_is_tried_again(faulty_run, tmp_path, caplog):
    config, _, metas, _ = faulty_run
    store, layout = open_storage(config)
    with caplog.at_level("WARNING", logger="model_soups"):
        assert stored_ingredient(store, layout, metas[2]["id"]) is None
    (said,) = caplog.records
    assert said.levelname == "WARNING" and "an earlier attempt failed (crashed: killed by SIGKILL" in said.message
    assert not has_result(store, layout, metas[2]["id"])
    assert has_result(store, layout, metas[5]["id"])  # diverged is final


def test_a_full_disk_fails_the_run_as_storage_blames_no_ingredient_leaves_no_part_and_a_rerun_resumes(
        prefect_server, tmp_path):
    """RLIMIT_FSIZE makes every larger file write fail with EFBIG, as a full disk or a quota would: in this process
    (evaluations) and in the fine-tune processes it starts, which inherit the limit."""
    import resource

    from model_soups.storage import StorageUnavailable

    root = tmp_path / "store"
    first = parse_config(small_digits(f"file://{root}", experiment="full", n=3))
    model_soup(config=first)
    stored = {p: p.stat().st_mtime_ns for p in (root / "full").rglob("*") if p.is_file()}
    more = parse_config(small_digits(f"file://{root}", experiment="full", n=5))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # a checkpoint here is 9 KB
    try:
        with pytest.raises(StorageUnavailable, match=rf"storage file://{root} cannot be written: writing "
                           r"file://\S+/model.safetensors failed \(OSError: File too large\)\. Nothing stored is lost"):
            model_soup(config=more)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not [p for p in root.rglob("*") if ".partial-" in p.name]  # no half-written file left behind
    metas = [json.loads(p.read_text()) for p in (root / "full" / "ingredients").glob("*/meta.json")]
    assert len(metas) == 3 and all(m["status"] == "completed" for m in metas)  # no ingredient blamed for the disk
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in stored.items())  # nothing stored was touched

    paths = model_soup(config=more)  # space again: the rerun trains only the two that are missing
    manifest = json.loads(run_file(paths, "manifest.json").read_text())
    assert len(manifest["ingredients"]) == 5 and not manifest["failed"]
    for path, mtime in stored.items():
        if "/ingredients/" in str(path):
            assert path.stat().st_mtime_ns == mtime, path


def test_a_run_that_cannot_finish_publishing_is_never_listed_as_published_and_the_rerun_publishes_it_whole(
        prefect_server, tmp_path, capsys):
    import resource

    from flows.cli import main
    from model_soups.storage import StorageUnavailable

    root = tmp_path / "store"
    config = parse_config(small_digits(f"file://{root}", experiment="half", n=3))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, hard))  # checkpoints and logits fit; the report's figures do not
    try:
        with pytest.raises(StorageUnavailable, match=r"writing file://\S+/figures/\w+\.png failed \(OSError: File too"):
            model_soup(config=config)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    (half,) = (root / "half" / "runs").iterdir()
    assert (half / "soup.safetensors").is_file() and not (half / "manifest.json").exists()  # the manifest comes last
    assert main(["runs", "half", "--root", str(root)]) == 1  # not listed
    assert main(["report", str(half)]) == 2 and "not a published run folder" in capsys.readouterr().err
    trained = {p: p.stat().st_mtime_ns for p in (root / "half" / "ingredients").rglob("*.safetensors")}

    paths = model_soup(config=config)
    assert all(run_file(paths, name).is_file() for name in ("manifest.json", "report.html", "figures/id_vs_ood.png"))
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in trained.items())  # nothing trained again
    capsys.readouterr()
    assert main(["runs", "half", "--root", str(root)]) == 0
    assert capsys.readouterr().out.count("| greedy |") == 1  # the complete run only
