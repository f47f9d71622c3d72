"""The model_soup flow: sweep -> fine-tunes over device slots -> evaluations -> soups -> publish."""

from __future__ import annotations

from prefect import flow, get_run_logger, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from model_soups.config import RunConfig
from model_soups.cooking import val_accuracies
from model_soups.ingredients import new_run_id
from tasks.cooking import cook_soup
from tasks.evaluation import evaluate
from tasks.ingredients import fan_out, prepare
from tasks.publishing import publish

# Threads mostly wait here: fine-tunes run in their own processes (throttled to the device slots) or on a pool.
THREADS = 16


class TooFewIngredients(RuntimeError):
    """Fewer ingredients survived than execution.min_ingredients."""


@flow(name="model-soup", task_runner=ThreadPoolTaskRunner(max_workers=THREADS))
def model_soup(config: RunConfig = RunConfig()) -> dict[str, str]:
    """Fine-tune a sweep of ingredients, evaluate them, cook the soups and publish the soup and a report."""
    logger = get_run_logger()
    run_id = new_run_id()
    pretrained, specs, splits = prepare(config)

    metas, failed = fan_out(config, pretrained, specs)
    reused = sum(1 for m in metas if m.reused)
    logger.info(f"{len(metas)} ingredients ready ({reused} reused, {len(metas) - reused} trained), {len(failed)} left out")
    if len(metas) < config.execution.min_ingredients:
        raise TooFewIngredients(f"only {len(metas)} ingredients survived, execution.min_ingredients is "
                                f"{config.execution.min_ingredients}; failures: {[f.model_dump() for f in failed]}")

    pairs = [(meta, split) for meta in metas for split in splits]
    evaluations = evaluate.map(unmapped(config), [m for m, _ in pairs], [s for _, s in pairs]).result()
    logger.info(f"{len(evaluations)} evaluations ({sum(e.reused for e in evaluations)} reused)")
    val_accuracy = val_accuracies(evaluations)

    soups = [cook_soup.submit(config, pretrained, metas, val_accuracy, method) for method in config.soup.methods]
    soup_records = [future.result() for future in soups]
    logger.info(f"{len(soup_records)} soups ({sum(r.reused for r in soup_records)} reused)")
    paths = publish(config, pretrained, metas, failed, evaluations, soup_records, run_id)
    if failed:
        logger.warning(f"soup made without {len(failed)} failed ingredient(s): {[f.id for f in failed]}")
    logger.info(f"run folder {paths['run']}")
    return paths
