"""Prefect tasks: thin wrappers over `model_soups.pipeline`, adding retries, logging and artifacts.

Result caching is off on purpose: reuse is decided by the storage root, where every ingredient and
evaluation is verified against its sha256 before it is reused. Prefect's cache could not see a corrupt or
deleted checkpoint, and it would not be shared by machines that only share the bucket.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

from prefect import get_client, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.deployments import run_deployment
from prefect.states import Crashed

from model_soups import pipeline, report
from model_soups.config import RunConfig
from model_soups.recipes import get_recipe
from model_soups.storage import StorageUnavailable
from model_soups.sweep import IngredientSpec

QUIET = {"cache_policy": NONE, "persist_result": False}


def unless_storage_is_down(task, task_run, state) -> bool:
    """Retry a failed fine-tune, except when storage did not answer: it has had its own retries with backoff."""
    return not isinstance(state.data, StorageUnavailable)


def artifact_key(config: RunConfig, name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"{config.experiment}-{name}".lower())


@task(name="prepare", **QUIET)
def prepare(config: RunConfig) -> dict[str, Any]:
    """Check the config and the storage root cheaply, then build or reuse the pretrained start."""
    log = get_run_logger().info
    plan = pipeline.make_plan(config)
    store, layout = pipeline.open_storage(config)
    store.check_writable(config.experiment)
    pretrained = pipeline.ensure_pretrained(store, layout, plan, log)
    log(f"{len(plan.specs)} ingredients, splits {plan.splits}")
    return {"pretrained": pretrained, "specs": [asdict(s) for s in plan.specs], "splits": plan.splits}


@task(name="finetune", task_run_name="finetune-{spec[id]}", retry_delay_seconds=2, retry_condition_fn=unless_storage_is_down,
      **QUIET)
def finetune(config: RunConfig, pretrained: dict[str, Any], spec: dict[str, Any], slot: dict[str, str]) -> dict[str, Any]:
    """One ingredient in its own process on one device slot; a verified stored result is reused."""
    log = get_run_logger().info
    spec = IngredientSpec(**spec)
    if spec.checkpoint:
        store, layout = pipeline.open_storage(config)
        return pipeline.register_checkpoint(store, layout, spec, pretrained)
    meta = pipeline.train_ingredient(config, pretrained, spec, slot, log)
    log(f"ingredient {spec.id}: {'reused' if meta['reused'] else 'trained'} ({meta['status']})")
    return meta


@task(name="evaluate", task_run_name="evaluate-{meta[id]}-{split}", retries=1, **QUIET)
def evaluate(config: RunConfig, meta: dict[str, Any], split: str) -> dict[str, Any]:
    store, layout = pipeline.open_storage(config)
    recipe = get_recipe(config.recipe.name, config.recipe.options)
    return pipeline.evaluate_ingredient(store, layout, recipe, meta, split, get_run_logger().info)


@task(name="cook-soup", task_run_name="cook-{method}-soup", **QUIET)
def cook_soup(config: RunConfig, pretrained: dict[str, Any], metas: list[dict[str, Any]],
              val_accuracy: dict[str, float], method: str) -> dict[str, Any]:
    recipe = get_recipe(config.recipe.name, config.recipe.options)
    return pipeline.cook_soup(config, recipe, pretrained, metas, val_accuracy, method, get_run_logger().info)


@task(name="publish", **QUIET)
def publish(config: RunConfig, pretrained: dict[str, Any], metas: list[dict[str, Any]], failed: list[dict[str, Any]],
            evaluations: list[dict[str, Any]], soup_records: list[dict[str, Any]], run_id: str) -> dict[str, str]:
    """Write the soup, manifest, results and report; publish them as Prefect artifacts."""
    recipe = get_recipe(config.recipe.name, config.recipe.options)
    paths = pipeline.publish(config, recipe, pretrained, metas, failed, evaluations, soup_records, run_id, get_run_logger().info)
    store, _ = pipeline.open_storage(config)
    table = report.summary(report.read_results(store, paths["run"])).round(2).reset_index()
    create_table_artifact(key=artifact_key(config, "results"), table=table.to_dict(orient="records"),
                          description=f"Accuracy (%) per method, run {run_id}")
    create_markdown_artifact(key=artifact_key(config, "report"), markdown=store.read_bytes(paths["report.md"]).decode(),
                             description=f"Model soup report, run {run_id}")
    create_link_artifact(key=artifact_key(config, "soup"), link=paths["soup"], link_text=f"soup.safetensors ({run_id})")
    create_link_artifact(key=artifact_key(config, "report-html"), link=paths["report.html"], link_text=f"report.html ({run_id})")
    return paths


@task(name="finetune-on-pool", task_run_name="finetune-{spec[id]}", retry_delay_seconds=2,
      retry_condition_fn=unless_storage_is_down, **QUIET)
def finetune_on_pool(config: RunConfig, pretrained: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """One ingredient as a run of the finetune deployment on the GPU pool; its result is read from storage.

    This waits in the orchestrating process and holds no slot of the GPU pool. A run whose fine-tune stops
    renewing its lease (its worker or machine died) is marked Crashed, and the task's retry starts another.
    """
    log = get_run_logger().info
    store, layout = pipeline.open_storage(config)
    if not spec["checkpoint"]:
        meta = pipeline.completed_ingredient(store, layout, spec["id"], log)
        if meta is not None:
            log(f"ingredient {spec['id']}: reused ({meta['status']})")
            return {**meta, "reused": True}
    run = run_deployment(config.execution.finetune_deployment, timeout=0, as_subflow=True,
                         flow_run_name=f"finetune-{spec['id']}",
                         parameters={"config": config.model_dump(mode="json"), "spec": spec, "pretrained": pretrained})
    log(f"ingredient {spec['id']}: flow run {run.name} submitted to {config.execution.finetune_deployment}")
    with get_client(sync_client=True) as client:
        while not run.state.is_final():
            time.sleep(config.execution.poll_s)
            run = client.read_flow_run(run.id)
            running_for = (datetime.now(timezone.utc) - run.start_time).total_seconds() if run.start_time else 0.0
            if run.state.is_running() and pipeline.lease_lost(store, layout, spec["id"], running_for, config.execution.lease_s):
                message = f"fine-tune of {spec['id']} stopped renewing its lease: its worker or machine died"
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                raise RuntimeError(f"flow run {run.name}: {message}")
    if not run.state.is_completed():
        raise RuntimeError(f"flow run {run.name} ended {run.state.type.value}: {run.state.message}")
    meta = pipeline.completed_ingredient(store, layout, spec["id"], log) if not spec["checkpoint"] else store.read_json(layout.meta(spec["id"]))
    if meta is None:
        raise RuntimeError(f"flow run {run.name} completed but ingredient {spec['id']} has no verified result in storage")
    return {**meta, "reused": False}
