"""Real faults in fine-tune processes: each is retried as configured, then left out with its reason."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prefect import get_client

from flows.model_soup import model_soup
from model_soups.config import parse_config
from model_soups.ingredients import has_result, stored_ingredient
from model_soups.storage import open_storage
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
    store, layout = open_storage(config.storage, config.experiment)
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


def test_a_run_that_cannot_finish_publishing_is_never_listed_as_published_and_the_rerun_completes_that_folder(
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
    assert not (half / "lease.json").exists()  # the failed publish let go of its folder
    assert main(["runs", "half", "--root", str(root)]) == 1  # not listed, but named as not published
    assert f"not (yet) published (no manifest.json): {half.name}" in capsys.readouterr().err
    assert main(["report", str(half)]) == 2 and "not a published run folder" in capsys.readouterr().err
    trained = {p: p.stat().st_mtime_ns for p in (root / "half" / "ingredients").rglob("*.safetensors")}

    state = model_soup(config=config, return_state=True)
    paths = state.result()
    assert paths["run"] == f"file://{half}"  # the same config's rerun completes the half folder, not a new one
    with get_client(sync_client=True) as client:  # and its flow run takes the folder's name
        assert client.read_flow_run(state.state_details.flow_run_id).name == f"half-{half.name}"
    assert [p.name for p in (root / "half" / "runs").iterdir()] == [half.name]
    assert all(run_file(paths, name).is_file() for name in ("manifest.json", "report.html", "figures/id_vs_ood.png"))
    assert not (half / "publishing.json").exists() and not (half / "lease.json").exists()
    assert json.loads((half / "manifest.json").read_text())["run_id"] == half.name
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in trained.items())  # nothing trained again
    capsys.readouterr()
    assert main(["runs", "half", "--root", str(root)]) == 0
    listed = capsys.readouterr()
    assert listed.out.count("| greedy |") == 1 and "not (yet) published" not in listed.err


@pytest.fixture
def read_only_mount(tmp_path):
    """A file system of its own, to be remounted read-only: tests run as root, and root ignores permission bits."""
    import subprocess

    mount = tmp_path / "mount"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): it needs root, as CI has")
    try:
        yield mount, lambda: subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_read_only_root_is_a_storage_error_naming_the_cause_and_loses_nothing(read_only_mount, tmp_path, capsys):
    import yaml

    from flows.cli import main
    from model_soups.config import StorageConfig
    from model_soups.storage import StorageUnavailable, Store

    mount, make_read_only = read_only_mount
    store = Store(StorageConfig(root=f"file://{mount}"))
    kept = store.url("exp", "record.json")
    store.write_json(kept, {"kept": True})
    make_read_only()
    cannot = r"cannot be written: {} file://\S+ failed \(OSError: Read-only file system\)\. Nothing stored is lost"
    with pytest.raises(StorageUnavailable, match=cannot.format("writing")):
        store.write_json(store.url("exp", "other.json"), {})
    with pytest.raises(StorageUnavailable, match=cannot.format("creating")):
        store.create_exclusive(store.url("exp", "ingredients", "a", "lease.json"), b"{}")
    with pytest.raises(StorageUnavailable, match=r"cannot be written: deleting"):
        store.delete(kept)
    assert store.read_json(kept) == {"kept": True} and [p.name for p in mount.rglob("*")] == ["exp", "record.json"]

    config = tmp_path / "config.yaml"  # the CLI refuses it in its preflight, before any run starts: one line, no trace
    config.write_text(yaml.safe_dump(small_digits(f"file://{mount}", experiment="exp")))
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^soup: storage file://{mount} {cannot.format('writing')}", err, re.M) and "Traceback" not in err
