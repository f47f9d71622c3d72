"""The model_soup flow: sweep -> fine-tunes over device slots -> evaluations -> soups -> publish."""

from __future__ import annotations

import re

from prefect import flow, get_client, get_run_logger, runtime
from prefect.task_runners import ThreadPoolTaskRunner

from model_soups.config import NAME_PATTERN, RunConfig
from model_soups.context import RunContext, fewest_ingredients
from model_soups.cooking import val_accuracies
from model_soups.ingredients import new_run_id, start_as_model, without_duplicates
from tasks.cooking import cook_here, cook_on_pool
from tasks.evaluation import Evaluations
from tasks.ingredients import fan_out, prepare
from tasks.publishing import publish, show_run
from tasks.sweep import soup_aware, stop_early

# Threads mostly wait here: fine-tunes run in their own processes (throttled to the device slots) or on a pool.
THREADS = 32
RESERVED = 8  # threads a work-pool fan-out leaves free, so that evaluations and soups never queue behind waiting fine-tunes


class TooFewIngredients(RuntimeError):
    """Fewer ingredients survived than execution.min_ingredients or a cooked soup method needs."""


def run_name() -> str:
    """`<experiment>-<run_id>`: the flow run carries the name of the run folder it publishes."""
    config = runtime.flow_run.parameters.get("config") or RunConfig()
    experiment = config.experiment if isinstance(config, RunConfig) else config.get("experiment", RunConfig().experiment)
    return f"{experiment}-{new_run_id()}"


def this_run(config: RunConfig) -> str:
    """The run id in this flow run's name, and tags to find the run by experiment and recipe in the UI."""
    name, prefix = runtime.flow_run.name or "", f"{config.experiment}-"
    run_id = name.removeprefix(prefix)
    if not name.startswith(prefix) or not re.fullmatch(NAME_PATTERN, run_id):
        run_id = new_run_id()  # a name given by hand that is no run id
    tags = {*runtime.flow_run.tags, f"experiment:{config.experiment}", f"recipe:{config.recipe.name}"}
    with get_client(sync_client=True) as client:
        client.update_flow_run(runtime.flow_run.id, tags=sorted(tags))
    return run_id


def rename(config: RunConfig, run_id: str) -> None:
    with get_client(sync_client=True) as client:
        client.update_flow_run(runtime.flow_run.id, name=f"{config.experiment}-{run_id}")


@flow(name="model-soup", flow_run_name=run_name, task_runner=ThreadPoolTaskRunner(max_workers=THREADS))
def model_soup(config: RunConfig = RunConfig()) -> dict[str, str]:
    """Fine-tune a sweep of ingredients, evaluate them, cook the soups and publish the soup and a report."""
    logger = get_run_logger()
    run_id = this_run(config)
    ctx = RunContext.of(config)  # the plan (a bad config fails here, before anything runs) and the storage, made once
    pretrained, specs = prepare(ctx), ctx.plan.specs
    evaluations = Evaluations(ctx)  # each model's evaluations, started once: pipelined, as soon as it is verified
    start = start_as_model(pretrained)  # the pretrained start, evaluated as the report's reference point
    on_pool = config.execution.cook_on == "device-pool"  # then the pool evaluates the start, beside the soups
    if not on_pool:
        evaluations.ready(start)
    stop = None
    if config.sweep.stop is not None:  # rounds, until the greedy soup stops gaining
        metas, failed, stop = stop_early(ctx, pretrained, specs, THREADS - RESERVED, evaluations)
    else:
        metas, failed = fan_out(ctx, pretrained, specs, THREADS - RESERVED, evaluations) if specs else ([], [])
    if config.sweep.strategy == "soup-aware":  # rounds, each chosen for what it adds to the greedy soup
        more, left_out = soup_aware(ctx, pretrained, THREADS - RESERVED, evaluations)
        metas, failed = metas + more, failed + left_out
    metas, duplicates = without_duplicates(metas)
    for duplicate in duplicates:
        logger.warning(f"ingredient {duplicate.id} left out of the soup: {duplicate.reason}")
    failed += duplicates
    reused = sum(1 for m in metas if m.reused)
    supplied = sum(1 for m in metas if not m.reused and m.source == "existing checkpoint")
    logger.info(f"{len(metas)} ingredients ready ({reused} reused, {supplied} supplied, "
                f"{len(metas) - reused - supplied} trained), {len(failed)} left out")
    fewest, why = fewest_ingredients(config)
    if len(metas) < fewest:
        raise TooFewIngredients(f"only {len(metas)} ingredients survived, {why}; failures: {[f.model_dump() for f in failed]}")

    if not on_pool:
        evaluations.start(start)  # not pipelined: now, beside the ingredients
    evaluated = evaluations.results(metas)  # sweep order, split order
    logger.info(f"{len(evaluated)} evaluations ({sum(e.reused for e in evaluated)} reused)")

    if on_pool:  # the cook run evaluates the start, cooks and publishes there: this run reads no checkpoint
        cooked = cook_on_pool.with_options(retries=config.execution.retries)(ctx, pretrained, metas, failed, evaluated,
                                                                             run_id, stop)
    else:
        cooked = cook_here(ctx, pretrained, metas, val_accuracies(evaluated))
        cooked.start = evaluations.results([start])
    logger.info(f"{len(cooked.soups)} soups ({cooked.soups_reused} reused)")
    paths = show_run(ctx, cooked.run if on_pool else publish(ctx, pretrained, metas, failed, evaluated, cooked, run_id, stop))
    if not paths["run"].endswith(f"/{run_id}"):  # it completed a half-published folder: the run takes its name
        rename(config, paths["run"].rsplit("/", 1)[1])
    if failed:
        logger.warning(f"soup made without {len(failed)} failed ingredient(s): {[f.id for f in failed]}")
    reads = ctx.store.checkpoints_read
    logger.info(f"this flow run read {sum(reads.values())} checkpoint(s) from storage ({len(reads)} distinct)")
    logger.info(f"run folder {paths['run']}")
    return paths
