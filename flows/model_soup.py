"""The model_soup flow: sweep -> fine-tunes over device slots -> evaluations -> soups -> publish."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from model_soups.config import RunConfig
from model_soups.pipeline import device_slots, new_run_id
from model_soups.storage import StorageUnavailable
from tasks.pipeline import artifact_key, cook_soup, evaluate, finetune, finetune_on_pool, prepare, publish

# Threads mostly wait here: fine-tunes run in their own processes (throttled to the device slots) or on a pool.
THREADS = 16


class TooFewIngredients(RuntimeError):
    """Fewer ingredients survived than execution.min_ingredients."""


def run_finetunes(config: RunConfig, pretrained: dict[str, Any], specs: list[dict[str, Any]]) -> tuple[list, list]:
    """Fine-tune every ingredient: on this machine's device slots, or as runs on the GPU work pool."""
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, key=artifact_key(config, "finetune-progress"),
                                        description=f"{len(specs)} fine-tunes")
    completed, failed = [], []
    running: dict = {}
    if config.execution.fanout == "work-pool":
        on_pool = finetune_on_pool.with_options(retries=config.execution.retries)
        logger.info(f"fine-tuning {len(specs)} ingredients as runs of {config.execution.finetune_deployment}")
        running = {on_pool.submit(config, pretrained, spec): (spec, None) for spec in specs}
        free, pending = [], []
    else:
        free, pending = device_slots(config.execution.device_slots), list(specs)
        logger.info(f"fine-tuning {len(specs)} ingredients on {len(free)} device slots: {[s['name'] for s in free]}")
    local = finetune.with_options(retries=config.execution.retries)
    while pending or running:
        while free and pending:  # keep every device slot busy with one fine-tune
            spec, slot = pending.pop(0), free.pop(0)
            running[local.submit(config, pretrained, spec, slot)] = (spec, slot)
        future = next(as_completed(list(running)))
        spec, slot = running.pop(future)
        if slot is not None:
            free.append(slot)
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, StorageUnavailable):
            raise outcome  # not the ingredient's fault: stop, and let a re-run resume from what is stored
        if isinstance(outcome, dict) and outcome["status"] == "completed":
            completed.append(outcome)
        else:
            if isinstance(outcome, dict):  # diverged: a stored result
                status, reason = outcome["status"], outcome.get("reason")
            else:  # an exception after the retries; FinetuneFailed carries a one-line reason
                status, reason = "failed", getattr(outcome, "reason", f"{type(outcome).__name__}: {outcome}")
            logger.warning(f"ingredient {spec['id']} left out of the soup: {status}: {reason}")
            failed.append({"id": spec["id"], "status": status, "reason": str(reason), "hparams": spec["hparams"]})
        update_progress_artifact(progress, 100.0 * (len(completed) + len(failed)) / len(specs))
    order = {spec["id"]: i for i, spec in enumerate(specs)}
    return sorted(completed, key=lambda m: order[m["id"]]), failed


@flow(name="model-soup", task_runner=ThreadPoolTaskRunner(max_workers=THREADS))
def model_soup(config: RunConfig = RunConfig()) -> dict[str, str]:
    """Fine-tune a sweep of ingredients, evaluate them, cook the soups and publish the soup and a report."""
    logger = get_run_logger()
    run_id = new_run_id()
    prepared = prepare(config)
    pretrained, splits = prepared["pretrained"], prepared["splits"]

    metas, failed = run_finetunes(config, pretrained, prepared["specs"])
    reused = sum(1 for m in metas if m.get("reused"))
    logger.info(f"{len(metas)} ingredients ready ({reused} reused, {len(metas) - reused} trained), {len(failed)} left out")
    if len(metas) < config.execution.min_ingredients:
        raise TooFewIngredients(f"only {len(metas)} ingredients survived, execution.min_ingredients is "
                                f"{config.execution.min_ingredients}; failures: {failed}")

    pairs = [(meta, split) for meta in metas for split in splits]
    evaluations = evaluate.map(unmapped(config), [m for m, _ in pairs], [s for _, s in pairs]).result()
    logger.info(f"{len(evaluations)} evaluations ({sum(e['reused'] for e in evaluations)} reused)")
    val_accuracy = {e["id"]: e["accuracy"] for e in evaluations if e["split"] == "val"}

    soups = [cook_soup.submit(config, pretrained, metas, val_accuracy, method) for method in config.soup.methods]
    soup_records = [future.result() for future in soups]
    logger.info(f"{len(soup_records)} soups ({sum(r['reused'] for r in soup_records)} reused)")
    paths = publish(config, pretrained, metas, failed, evaluations, soup_records, run_id)
    if failed:
        logger.warning(f"soup made without {len(failed)} failed ingredient(s): {[f['id'] for f in failed]}")
    logger.info(f"run folder {paths['run']}")
    return paths
