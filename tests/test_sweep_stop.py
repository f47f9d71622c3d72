"""sweep.stop: a planned sweep fine-tuned in rounds that stops when the greedy soup stops gaining; it resumes from
storage, and a failed fine-tune never joins a soup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.model_soup import model_soup
from model_soups.config import ConfigError, StopRule, parse_config
from model_soups.sweep import StopRound
from model_soups.sweep import IngredientSpec, stalled, stop_rounds
from tests.conftest import small_digits


def rounds_of(*gains: float) -> list[StopRound]:
    return [StopRound(index=i, fine_tunes=["x"], soup=["x"], soup_val=0.9, gain=g) for i, g in enumerate(gains)]


def test_a_planned_sweep_is_cut_into_a_first_round_then_batches_in_sweep_order():
    specs = [IngredientSpec(id=str(i)) for i in range(9)]
    cut = stop_rounds(specs, StopRule(first=4, batch=2))
    assert [[s.id for s in r] for r in cut] == [["0", "1", "2", "3"], ["4", "5"], ["6", "7"], ["8"]]
    assert [len(r) for r in stop_rounds(specs[:3], StopRule(first=4))] == [3]


def test_the_sweep_stops_after_patience_rounds_in_a_row_below_min_gain_and_the_first_round_never_counts():
    rule = StopRule(patience=2, min_gain=0.002)
    assert not stalled(rounds_of(0.98), rule)
    assert not stalled(rounds_of(0.98, 0.0), rule)
    assert stalled(rounds_of(0.98, 0.0, 0.001), rule)
    assert not stalled(rounds_of(0.98, 0.0, 0.005), rule)  # a gain resets the count
    assert stalled(rounds_of(0.98, 0.0, 0.005, -0.003, 0.0), rule)  # a re-ranked soup can lose: no gain either


def test_stopping_early_is_refused_for_a_soup_aware_sweep():
    with pytest.raises(ConfigError, match="sweep.stop: a soup-aware sweep plans its own rounds"):
        parse_config({"sweep": {"strategy": "soup-aware", "stop": {}}})


def stopping(root: str, experiment: str, seeds: list[int], **recipe) -> dict:
    """A grid of `seeds` that stops after its second round: no round can raise val accuracy by a whole 100 points."""
    data = small_digits(root, experiment=experiment, seed=seeds)
    data["sweep"].update(strategy="grid", stop={"first": 2, "batch": 2, "patience": 1, "min_gain": 1.0})
    data["soup"]["methods"] = ["greedy", "uniform"]
    data["recipe"]["options"].update(recipe)
    return data


def manifest_of(paths: dict) -> dict:
    return json.loads((Path(paths["run"].removeprefix("file://")) / "manifest.json").read_text())


@pytest.mark.slow
def test_a_sweep_stops_when_the_soup_stops_gaining_and_a_rerun_resumes_without_training(prefect_server, tmp_path):
    config = parse_config(stopping(f"file://{tmp_path}", "stop", [1, 2, 3, 4, 5, 6]))
    paths = model_soup(config=config)
    stop = manifest_of(paths)["sweep_stop"]
    assert stop["planned"] == 6 and [len(r["fine_tunes"]) for r in stop["rounds"]] == [2, 2]
    trained = sorted((tmp_path / "stop" / "ingredients").glob("*/meta.json"))
    assert len(trained) == 4 and len(manifest_of(paths)["ingredients"]) == 4  # the last round never started
    report = Path(paths["report.md"].removeprefix("file://")).read_text()
    assert "The sweep stopped after 2 rounds, when the greedy soup stopped gaining on val: 4 of 6 planned fine-tunes, " \
           "**2 saved**." in report

    stored = {p: p.stat().st_mtime_ns for p in (tmp_path / "stop").glob("ingredients/*/*")}
    soups = {p: p.stat().st_mtime_ns for p in (tmp_path / "stop").glob("soups/*/*")}
    again = model_soup(config=config)
    assert manifest_of(again)["sweep_stop"] == stop
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "stop").glob("ingredients/*/*")} == stored  # nothing retrained
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "stop").glob("soups/*/*")} == soups  # every soup reused


@pytest.mark.slow
def test_a_fine_tune_that_fails_in_a_round_never_joins_a_soup(prefect_server, tmp_path):
    data = stopping(f"file://{tmp_path}", "stop-faulty", [1, 5, 3, 4, 6])
    data["recipe"] = {"name": "tests.faulty_recipe:FaultyDigits", "options": {**data["recipe"]["options"],
                                                                             "faults": {5: "nan"}}}
    data["execution"]["retries"] = 0
    paths = model_soup(config=parse_config(data))
    manifest = manifest_of(paths)
    (failed,) = manifest["failed"]
    assert failed["hparams"]["seed"] == 5 and "loss became nan" in failed["reason"]
    assert [len(r["fine_tunes"]) for r in manifest["sweep_stop"]["rounds"]] == [2, 2]
    assert failed["id"] in manifest["sweep_stop"]["rounds"][0]["fine_tunes"]
    for record in (tmp_path / "stop-faulty" / "soups").glob("*/record.json"):  # every soup cooked, each round's too
        assert failed["id"] not in json.loads(record.read_text())["ingredients"]
    assert all(failed["id"] not in r["soup"] for r in manifest["sweep_stop"]["rounds"])
