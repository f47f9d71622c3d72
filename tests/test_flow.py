"""The model_soup flow on local storage: publishes everything, reuses what is stored, survives bad ingredients."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from prefect import get_client
from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, FlowRunFilterName, LogFilter,
                                            LogFilterFlowRunId)
from prefect.logging.handlers import APILogHandler

from flows.model_soup import TooFewIngredients, model_soup
from model_soups.config import ConfigError, StorageConfig, parse_config
from model_soups.methods import SOUP_METHODS
from model_soups.storage import Store
from tasks.ingredients import MissingDeployment
from tests.conftest import small_digits

pytestmark = pytest.mark.slow

RUN_FILES = ["soup.safetensors", "manifest.json", "results.csv", "results.parquet", "report.md", "report.html"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flow-storage")


@pytest.fixture(scope="module")
def first_run(prefect_server, root):
    config = parse_config(small_digits(f"file://{root}", experiment="flow", n=4))
    return config, model_soup(config=config)


def local(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def stored_mtimes(root: Path, folder: str) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in (root / "flow" / folder).rglob("*") if p.is_file()}


def test_run_folder_holds_soup_manifest_results_and_report(first_run):
    config, paths = first_run
    run = local(paths["run"])
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert len(manifest["ingredients"]) == 4 and manifest["final"] == "greedy"
    store = Store(StorageConfig(root=paths["run"]))
    assert manifest["files"]["soup.safetensors"] == store.sha256(paths["soup"])
    for ingredient in manifest["ingredients"]:
        assert store.sha256(ingredient["checkpoint"]) == ingredient["sha256"]
    page = (run / "report.html").read_text()
    assert '<img alt="greedy" src="data:image/png;base64,' in page  # one self-contained file
    assert page.count("<table>") == 5 and "<code>greedy</code>" not in page and "<strong>greedy</strong>" in page


def test_the_flow_run_is_named_after_its_run_folder_and_tagged_with_experiment_and_recipe(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    _, paths = first_run
    name = f"flow-{paths['run'].rsplit('/', 1)[1]}"
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    assert {"experiment:flow", "recipe:digits"} <= set(run.tags)


def test_every_method_is_reported_on_test_and_every_ood_split(first_run):
    _, paths = first_run
    results = pd.read_csv(local(paths["run"]) / "results.csv")
    assert {"model", "kind", "split", "accuracy", "nll", "ece", "n_ingredients"} <= set(results.columns)
    ingredients = results[results.kind == "ingredient"]
    assert ingredients.hp_lr.notna().all()  # accuracy against learning rate, no join
    as_written = pd.read_csv(local(paths["run"]) / "results.csv", dtype=str)
    assert as_written[as_written.kind == "ingredient"].hp_seed.str.fullmatch(r"\d+").all()  # whole numbers stay whole
    report = (local(paths["run"]) / "report.md").read_text()
    assert "| test_nll | test_ece |" in report and "| hyperparameters |" in report
    assert re.search(r"\| [0-9a-f]{16} \| [^|\n]*\blr 0\.\d+", report)  # each ingredient's learning rate, in words
    expected_splits = {"val", "test", "ood:rotate", "ood:noise", "ood:thick"}
    kinds = ["pretrained", "ingredient", "best_individual", *(m.kind for m in SOUP_METHODS.values()), "ensemble",
             "greedy_ensemble"]
    for kind in kinds:
        assert set(results[results.kind == kind].split) == expected_splits, kind
    assert "| chosen on val |" in report and "| λ " in report and "![Task-vector soups" in report


def test_every_task_vector_soup_publishes_the_candidate_it_chose_as_scored(first_run):
    _, paths = first_run
    manifest = json.loads((local(paths["run"]) / "manifest.json").read_text())
    tasks = {m: s for m, s in manifest["soups"].items() if s["task"] and s["task"]["combine"] != "model_stock"}
    assert set(tasks) == {"wiseft", "wiseft_best", "task_arithmetic", "ties", "dare", "dare_ties"}
    assert manifest["soups"]["wiseft"]["ingredients"] == manifest["soups"]["greedy"]["ingredients"]
    for method, soup in tasks.items():
        record = json.loads(local(soup["record"]).read_text())
        (chosen,) = [t for t in record["trajectory"] if t["chosen"]]
        assert record["metrics"]["val"]["accuracy"] == chosen["soup_val"] == max(t["soup_val"] for t in record["trajectory"])
        assert {k: chosen[k] for k in record["task"]} == record["task"], method


def test_model_stock_is_cooked_from_every_fine_tune_without_a_val_evaluation(first_run):
    _, paths = first_run
    manifest = json.loads((local(paths["run"]) / "manifest.json").read_text())
    soup = manifest["soups"]["model_stock"]
    assert (soup["task"]["combine"], soup["task"]["scale"]) == ("model_stock", 1.0) and soup["candidate_evaluations"] == 0
    assert len(soup["ingredients"]) == len(manifest["ingredients"])
    ratios = [step["t"] for step in json.loads(local(soup["record"]).read_text())["trajectory"]]
    assert ratios and all(0 <= t <= 1 for t in ratios)
    report = (local(paths["run"]) / "report.md").read_text()
    assert f"t {np.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}), no val" in report


def test_greedy_soup_val_accuracy_is_at_least_the_best_individual(first_run):
    _, paths = first_run
    results = pd.read_csv(local(paths["run"]) / "results.csv")
    val = results[results.split == "val"].set_index("kind").accuracy
    assert val["greedy_soup"] >= val["best_individual"]
    manifest = json.loads((local(paths["run"]) / "manifest.json").read_text())
    assert manifest["soups"]["greedy"]["candidate_evaluations"] == 4 - 1


def test_published_soup_is_the_greedy_average_of_its_ingredients(first_run):
    _, paths = first_run
    manifest = json.loads((local(paths["run"]) / "manifest.json").read_text())
    store = Store(StorageConfig(root=paths["run"]))
    chosen = [i for i in manifest["ingredients"] if i["id"] in manifest["soups"]["greedy"]["ingredients"]]
    states = [store.load_checkpoint(i["checkpoint"]) for i in chosen]
    soup = store.load_checkpoint(paths["soup"], manifest["files"]["soup.safetensors"])
    name = "head.weight"
    assert torch.allclose(soup[name].double(), sum(s[name].double() for s in states) / len(states), atol=1e-6)


def test_artifacts_are_published_with_stable_keys(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="flow-")))}
    assert {"flow-results", "flow-report", "flow-soup", "flow-report-html", "flow-finetune-progress"} <= set(artifacts)
    # the report shows whole in the UI: every figure inside it, no relative link left to break
    report = artifacts["flow-report"].data
    assert report.count("](data:image/png;base64,") == 5 and "](figures/" not in report
    for key in ("flow-soup", "flow-report-html"):
        assert "a browser does not open file:// links" in artifacts[key].description


def test_second_run_reuses_every_ingredient_evaluation_and_soup(first_run, root, caplog):
    config, paths = first_run
    before = {folder: stored_mtimes(root, folder) for folder in ("pretrained", "ingredients", "evals", "soups")}
    with caplog.at_level("INFO"):
        again = model_soup(config=config)
    # cooking on the orchestrator: this run verified and read the pretrained start, 4 ingredients and the final soup
    reads = re.search(r"this flow run read (\d+) checkpoint\(s\) from storage \((\d+) distinct\)", caplog.text)
    assert reads and int(reads[1]) >= int(reads[2]) >= 6, caplog.text[-2000:]
    assert again["run"] != paths["run"]
    assert {folder: stored_mtimes(root, folder) for folder in before} == before
    first, second = (json.loads((local(p["run"]) / "manifest.json").read_text()) for p in (paths, again))
    # the same stored soup, published again (each run's copy names its own run id in its metadata)
    assert first["soups"]["greedy"] == second["soups"]["greedy"]
    assert first["files"]["soup.safetensors"] != second["files"]["soup.safetensors"]


def test_pipelined_evaluation_starts_before_the_last_fine_tune_ends_and_cooks_byte_identical_soups(first_run, tmp_path):
    config, paths = first_run  # pipelined, the default
    barrier = parse_config({**small_digits(f"file://{tmp_path}", experiment="flow", n=4),
                            "execution": {"device_slots": 2, "retries": 1, "pipeline": False}})
    state = model_soup(config=barrier, return_state=True)
    again = state.result()
    first, second = (json.loads((local(p["run"]) / "manifest.json").read_text()) for p in (paths, again))
    assert set(first["soups"]) == set(barrier.soup.methods)
    for method in first["soups"]:  # the same bytes, cooked from the same ingredients in the same order
        assert first["soups"][method]["sha256"] == second["soups"][method]["sha256"], method
    assert (local(paths["run"]) / "results.csv").read_bytes() == (local(again["run"]) / "results.csv").read_bytes()

    def task_runs(flow_run_id):
        with get_client(sync_client=True) as client:
            return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200)

    def order(runs):
        last_finetune = max(t.end_time for t in runs if t.name.startswith("finetune-"))
        return min(t.start_time for t in runs if t.name.startswith("evaluate-")) < last_finetune

    assert not order(task_runs(state.state_details.flow_run_id))  # the barrier: every evaluation after the last fine-tune
    with get_client(sync_client=True) as client:
        pipelined = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[
            f"flow-{local(paths['run']).name}"])))[0]
    assert order(task_runs(pipelined.id))


def truncate_checkpoint(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])


def drop_meta(folder: Path) -> None:  # the upload stopped between the checkpoint and its completion record
    (folder / "meta.json").unlink()


def wrong_sha256(folder: Path) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "sha256": "0" * 64}))


@pytest.mark.parametrize("damage", [truncate_checkpoint, drop_meta, wrong_sha256])
def test_interrupted_upload_is_detected_and_the_ingredient_trained_again(first_run, root, damage):
    config, _ = first_run
    victim = sorted((root / "flow" / "ingredients").iterdir())[0]
    checkpoint_before = (victim / "model.safetensors").stat().st_mtime_ns
    damage(victim)
    state = model_soup(config=config, return_state=True)
    paths = state.result()
    assert (victim / "model.safetensors").stat().st_mtime_ns != checkpoint_before  # trained and written again
    if damage is not drop_meta:  # a record was there and refused: said as a warning in the task's log
        APILogHandler().flush()
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        (said,) = [log for log in logs if log.level == logging.WARNING]
        assert said.message.startswith(f"ingredient {victim.name}: ") and said.message.endswith("; making it again")
        assert said.task_run_id is not None  # in the log of the task that found it
    meta = json.loads((victim / "meta.json").read_text())
    store = Store(StorageConfig(root=f"file://{root}"))
    assert store.sha256(meta["checkpoint"]) == meta["sha256"]
    manifest = json.loads((local(paths["run"]) / "manifest.json").read_text())
    (entry,) = [i for i in manifest["ingredients"] if i["id"] == victim.name]
    assert entry["sha256"] == meta["sha256"]  # the soup was made from the verified checkpoint, never the bad one


def test_a_flipped_byte_in_stored_logits_is_found_named_in_a_warning_and_the_evaluation_made_again(first_run, root,
                                                                                                  caplog):
    """An ingredient's evaluation, a soup's own logits (kept for paired comparisons), and a record whose number
    changed but which still reads as JSON."""
    config, paths = first_run
    manifest = json.loads((local(paths["run"]) / "manifest.json").read_text())
    evals = sorted((root / "flow" / "evals").glob("[0-9a-f]*/"))
    victims = [evals[0] / "val.npz", root / "flow" / "soups" / manifest["soups"]["greedy"]["record"].split("/")[-2] / "test.npz"]
    for victim in victims:
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    record = evals[1] / "test.json"
    victims.append(record)
    changed = json.loads(record.read_text())
    record.write_text(json.dumps({**changed, "accuracy": changed["accuracy"] / 2}))  # its record_sha256 kept
    before = pd.read_csv(local(paths["run"]) / "results.csv")
    with caplog.at_level("WARNING", logger="model_soups"):
        again = model_soup(config=config)
    for victim in victims:
        (said,) = [r.message for r in caplog.records if str(victim) in r.message]
        assert "(changed or damaged)" in said and said.endswith("making it again"), said
    remade = json.loads((local(again["run"]) / "manifest.json").read_text())
    assert remade["soups"]["greedy"]["sha256"] == manifest["soups"]["greedy"]["sha256"]  # the same soup, cooked again
    after = pd.read_csv(local(again["run"]) / "results.csv")
    changed = before.merge(after, on=["model", "kind", "split"], suffixes=("", "_after")).query("accuracy != accuracy_after")
    assert changed.empty, changed[["model", "kind", "split", "accuracy", "accuracy_after"]]  # the same logits again


def test_nan_ingredient_is_left_out_and_named_in_the_report(first_run, root, tmp_path):
    config, paths = first_run
    store = Store(StorageConfig(root=f"file://{root}"))
    manifest = json.loads((local(paths["run"]) / "manifest.json").read_text())
    state = store.load_checkpoint(manifest["ingredients"][0]["checkpoint"])
    state["head.bias"][3] = float("nan")
    nan_url = store.url("outside", "nan.safetensors")
    store.save_checkpoint(nan_url, state)
    with_nan = config.model_copy(update={"sweep": config.sweep.model_copy(update={"checkpoints": [nan_url]})})
    state = model_soup(config=with_nan, return_state=True)
    paths = state.result()
    manifest = json.loads((local(paths["run"]) / "manifest.json").read_text())
    (failed,) = manifest["failed"]
    assert failed["id"].startswith("ckpt-") and "head.bias" in failed["reason"] and "NaN" in failed["reason"]
    assert len(manifest["ingredients"]) == 4
    assert failed["id"] in (local(paths["run"]) / "report.md").read_text()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    (refused,) = [run for run in runs if run.name == f"finetune-{failed['id']}"]
    assert refused.run_count == 1 and config.execution.retries == 1  # refused once, not retried: it would be again


def test_a_byte_identical_copy_of_an_ingredient_is_left_out_naming_both_and_counted_as_supplied(first_run, root, caplog):
    config, paths = first_run
    manifest = json.loads((local(paths["run"]) / "manifest.json").read_text())
    original = manifest["ingredients"][1]
    copy = root / "outside" / "copy.safetensors"
    copy.parent.mkdir(exist_ok=True)
    copy.write_bytes(local(original["checkpoint"]).read_bytes())
    with_copy = config.model_copy(update={"sweep": config.sweep.model_copy(update={"checkpoints": [f"file://{copy}"]})})
    with caplog.at_level("INFO"):
        paths = model_soup(config=with_copy)
    manifest = json.loads((local(paths["run"]) / "manifest.json").read_text())
    (failed,) = manifest["failed"]
    assert len(manifest["ingredients"]) == 4 and failed["id"].startswith("ckpt-")
    assert failed["reason"] == (f"duplicate: file://{copy} is the same file (sha256 {original['sha256'][:12]}...) as "
                                f"ingredient {original['id']}'s, and would count twice")
    assert "4 ingredients ready (4 reused, 0 supplied, 0 trained), 1 left out" in caplog.text


def test_existing_checkpoint_joins_the_soup_without_training(first_run, root):
    config, paths = first_run
    store = Store(StorageConfig(root=f"file://{root}"))
    manifest = json.loads((local(paths["run"]) / "manifest.json").read_text())
    outside = store.url("outside", "earlier-search.safetensors")
    store.save_checkpoint(outside, store.load_checkpoint(manifest["ingredients"][1]["checkpoint"]))
    with_existing = config.model_copy(update={"sweep": config.sweep.model_copy(update={"checkpoints": [outside]})})
    paths = model_soup(config=with_existing)
    manifest = json.loads((local(paths["run"]) / "manifest.json").read_text())
    existing = [i for i in manifest["ingredients"] if i["checkpoint"] == outside]
    assert len(manifest["ingredients"]) == 5 and len(existing) == 1 and existing[0]["id"].startswith("ckpt-")
    results = pd.read_csv(local(paths["run"]) / "results.csv")
    assert set(results[results.model == existing[0]["id"]].split) == {"val", "test", "ood:rotate", "ood:noise", "ood:thick"}


def test_too_few_surviving_ingredients_fails_the_run(first_run, tmp_path):
    config, _ = first_run
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")  # planned as a fifth ingredient, left out when it is read
    data = config.model_dump(mode="json")
    data["sweep"]["checkpoints"] = [f"file://{broken}"]
    data["execution"]["min_ingredients"] = 5
    with pytest.raises(TooFewIngredients, match="only 4 ingredients survived, execution.min_ingredients is 5"):
        model_soup(config=parse_config(data))


def test_a_missing_deployment_is_named_before_any_fine_tune(prefect_server, tmp_path):
    data = small_digits(f"file://{tmp_path}", experiment="undeployed", n=2)
    data["execution"] = {"fanout": "work-pool", "cook_on": "device-pool"}
    with pytest.raises(MissingDeployment, match=r"no deployment execution.finetune_deployment 'finetune/gpu' and "
                                                r"execution.cook_deployment 'cook/gpu' on the Prefect server .*prefect deploy --all"):
        model_soup(config=parse_config(data))
    assert not (tmp_path / "undeployed" / "ingredients").exists()


def test_a_sweep_that_plans_fewer_ingredients_than_the_run_needs_is_refused_before_training(first_run):
    config, _ = first_run
    strict = config.model_copy(update={"execution": config.execution.model_copy(update={"min_ingredients": 5})})
    with pytest.raises(ConfigError, match=r"the sweep plans 4 ingredient\(s\), but execution.min_ingredients is 5"):
        model_soup(config=strict)


def test_cli_rebuilds_the_report_from_a_run_folder_or_a_run_id_and_inspects_the_soup(first_run, root, capsys):
    from flows.cli import main

    _, paths = first_run
    report = local(paths["report.md"])
    report.unlink()
    assert main(["report", paths["run"]]) == 0
    assert report.is_file()
    run_id = paths["run"].rsplit("/", 1)[1]  # as `soup runs` prints it
    for given in (["--experiment", "flow"], []):  # without one, the only experiment under the root that has it
        report.unlink()
        assert main(["report", run_id, "--root", str(root), *given]) == 0 and report.is_file()
    capsys.readouterr()
    assert main(["report", run_id, "--root", str(root), "--experiment", "other"]) == 2
    assert f"no published run '{run_id}' in experiment 'other' under file://{root}" in capsys.readouterr().err
    assert main(["report", paths["soup"]]) == 2  # a sentence, not a traceback
    assert capsys.readouterr().err == (f"soup: {paths['soup']} is a file, not a run folder: soup report takes a run "
                                       "folder (.../runs/<run_id>) or a run id from `soup runs <experiment>`; "
                                       "`soup inspect` describes a checkpoint\n")
    assert main(["inspect", paths["soup"]]) == 0
    out = capsys.readouterr().out
    assert "head.weight" in out and "sha256" in out and "\r" not in out and "%|" not in out  # the bar is not in stdout


def test_cli_lists_an_experiments_runs_with_the_final_soups_accuracy(first_run, root, capsys):
    from flows.cli import main

    _, paths = first_run
    assert main(["runs", "flow", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    results = pd.read_csv(local(paths["run"]) / "results.csv")
    test = results[(results.kind == "greedy_soup") & (results.split == "test")].accuracy.iloc[0]
    line = next(line for line in out.splitlines() if paths["run"].rsplit("/", 1)[1] in line)
    assert "| greedy |" in line and f"| {100 * test:.2f} |" in line and "| as published |" in line
    assert main(["runs", "no-such-experiment", "--root", str(root)]) == 1


def test_cli_inspect_and_runs_say_when_a_published_file_changed_since_its_manifest(first_run, root, capsys):
    from flows.cli import main

    _, paths = first_run
    soup = local(paths["soup"])
    assert main(["inspect", str(soup)]) == 0
    assert f"matches the sha256 recorded in {paths['run']}/manifest.json" in capsys.readouterr().out
    published = soup.read_bytes()
    flipped = bytearray(published)
    flipped[-5] ^= 0x01  # one bit of one weight
    try:
        soup.write_bytes(bytes(flipped))
        assert main(["inspect", str(soup)]) == 1
        assert f"{paths['soup']} has changed since it was recorded: {paths['run']}/manifest.json says sha256" in \
            capsys.readouterr().err
        assert main(["runs", "flow", "--root", str(root)]) == 0
        line = next(line for line in capsys.readouterr().out.splitlines() if soup.parent.name in line)
        assert "CHANGED since published: soup.safetensors" in line
    finally:
        soup.write_bytes(published)


def test_cli_push_refuses_a_run_without_a_hugging_face_folder(first_run, capsys):
    from flows.cli import main

    _, paths = first_run  # digits: no transformers model, so no hf/ folder to push
    assert main(["push", paths["run"], "--repo", "me/soup"]) == 2
    assert "has no Hugging Face folder (hf/): only recipes that wrap a transformers model" in capsys.readouterr().err


def test_cli_refuses_a_bad_override_before_running(capsys, tmp_path):
    from flows.cli import main

    assert main(["demo", "--set", f"storage.root=file://{tmp_path}", "--set", "soup.rule=maybe"]) == 2
    assert "soup.rule" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_a_run_takes_its_config_apart_once_storage_recipe_and_plan_are_each_made_once(prefect_server, tmp_path,
                                                                                      monkeypatch):
    """One run context per process (model_soups/context.py), handed down to every task: no stage opens the storage,
    builds the recipe or plans the sweep again. The fine-tunes run in processes of their own."""
    import sys

    from model_soups import context, storage
    from model_soups.recipes import base

    calls: dict[str, int] = {}
    for name, home in (("open_storage", storage), ("get_recipe", base), ("make_plan", context)):
        original = getattr(home, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        for module_name, module in list(sys.modules.items()):  # every module of ours that imported it
            if module_name.split(".")[0] in ("model_soups", "tasks", "flows") and getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, counted)
    model_soup(config=parse_config(small_digits(f"file://{tmp_path}", experiment="once", n=2)))
    assert calls == {"open_storage": 1, "get_recipe": 1, "make_plan": 1}
