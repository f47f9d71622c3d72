"""The soup-aware sweep: Optuna proposals replayed from storage, rounds scored by their gain to the greedy soup,
Prefect-visible, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId,
                                            FlowRunFilterName)
from prefect.client.schemas.sorting import ArtifactSort

from flows.model_soup import model_soup
from model_soups import soup_sweep
from model_soups.config import ConfigError, parse_config
from model_soups.context import make_plan
from model_soups.records import SweepRound
from tests.conftest import small_digits


def sweep_config(root: str, n: int = 5, **sweep) -> dict:
    data = small_digits(root, experiment="aware", n=n, max_steps=[8, 12, 16, 20])
    data["sweep"].update(strategy="soup-aware", initial=2, batch=2, **sweep)
    return data


def scored(round_: SweepRound, values: list[float]) -> SweepRound:
    return round_.model_copy(update={"trials": [t.model_copy(update={"value": v}) for t, v in zip(round_.trials, values)]})


def test_proposals_are_a_function_of_the_stored_history_and_rounds_have_the_configured_sizes(tmp_path):
    config = parse_config(sweep_config(f"file://{tmp_path}", n=5))
    plan = make_plan(config)
    assert plan.specs == []  # nothing is known before the first round
    first = soup_sweep.propose(config.sweep, plan, [])
    assert len(first.trials) == 2 and first == soup_sweep.propose(config.sweep, plan, [])
    history = [scored(first, [0.0, 0.02])]
    second = soup_sweep.propose(config.sweep, plan, history)
    assert len(second.trials) == 2 and second == soup_sweep.propose(config.sweep, plan, history)
    assert not {t.id for t in second.trials} & {t.id for t in first.trials}  # nothing is fine-tuned twice
    # the values told matter: the sampler proposes otherwise when the other ingredient was the helpful one
    assert second != soup_sweep.propose(config.sweep, plan, [scored(first, [0.02, -0.5])])
    history.append(scored(second, [0.01, -0.01]))
    third = soup_sweep.propose(config.sweep, plan, history)
    assert len(third.trials) == 1 and soup_sweep.done(config.sweep, history + [third])
    with pytest.raises(ValueError, match="round 0 is not scored yet"):
        soup_sweep.propose(config.sweep, plan, [first])


def test_a_space_with_fewer_settings_than_fine_tunes_stops_when_it_is_exhausted(tmp_path):
    data = sweep_config(f"file://{tmp_path}", n=8)
    data["sweep"]["params"] = {"lr": [1e-3], "seed": [0, 1, 2]}
    for name, values in make_plan(parse_config(data)).recipe.default_search.items():  # every other one fixed
        data["sweep"]["params"].setdefault(name, [values[0]] if isinstance(values, list) else [values["low"]])
    config = parse_config(data)
    plan = make_plan(config)
    history = []
    while not soup_sweep.done(config.sweep, history):
        proposed = soup_sweep.propose(config.sweep, plan, history)
        history.append(scored(proposed, [0.0] * len(proposed.trials)))
    assert sorted(t.hparams["seed"] for r in history for t in r.trials) == [0, 1, 2] and not history[-1].trials


def test_bad_sweep_sizes_are_refused():
    with pytest.raises(ConfigError, match="sweep.initial"):
        parse_config({"sweep": {"strategy": "soup-aware", "initial": 0}})
    with pytest.raises(ConfigError, match="sweep.strategy"):
        parse_config({"sweep": {"strategy": "bayes"}})


@pytest.mark.slow
def test_rounds_are_fine_tuned_scored_shown_and_resumed_from_storage(prefect_server, tmp_path):
    config = parse_config(sweep_config(f"file://{tmp_path}", n=5))
    paths = model_soup(config=config)
    manifest = json.loads(Path(paths["run"].removeprefix("file://"), "manifest.json").read_text())
    rounds = sorted(Path(tmp_path, "aware", "sweeps").rglob("round-*.json"))
    stored = [SweepRound.model_validate_json(p.read_text()) for p in rounds]
    assert [len(r.trials) for r in stored] == [2, 2, 1] and all(r.scored for r in stored)
    assert sorted(i["id"] for i in manifest["ingredients"]) == sorted(t.id for r in stored for t in r.trials)
    assert stored[0].soup and all(-1 <= t.value <= 1 for r in stored for t in r.trials)
    with get_client(sync_client=True) as client:  # the rounds, as a table in the UI
        (table,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["aware-sweep-rounds"])),
                                         sort=ArtifactSort.CREATED_DESC, limit=1)  # its latest version
        flow_run = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[
            "aware-" + Path(paths["run"]).name])))[0]
        names = {t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))}
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [row["round"] for row in rows] == [0, 1, 2] and rows[1]["greedy soup before"] >= 1
    assert {"propose-round-0", "score-round-0", "propose-round-2", "score-round-2"} <= names
    # an interrupted sweep: its last round was proposed but never fine-tuned or scored
    last = stored[-1]
    rounds[-1].write_text(json.dumps(last.model_copy(update={"trials": [t.model_copy(update={"value": None})
                                                                         for t in last.trials]}).model_dump(mode="json")))
    for trial in last.trials:
        for path in Path(tmp_path, "aware", "ingredients", trial.id).iterdir():
            path.unlink()
    again = model_soup(config=config)
    resumed = [SweepRound.model_validate_json(p.read_text()) for p in rounds]
    assert resumed == stored  # the same proposals, fine-tuned again and scored to the same values
    second = json.loads(Path(again["run"].removeprefix("file://"), "manifest.json").read_text())
    assert [i["sha256"] for i in second["ingredients"]] == [i["sha256"] for i in manifest["ingredients"]]
