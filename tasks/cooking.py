"""The cooking: every soup method over the ingredients, here (`cook_here`), or as one run of the cook deployment on
the device pool (`cook_on_pool`, flows/cook.py), which reads the checkpoints on its own device and publishes while
this run waits."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.deployments import run_deployment

from model_soups import cooking
from model_soups.context import RunContext
from model_soups.methods import SOUP_METHODS
from model_soups.pantry import Pantry
from model_soups.processes import this_device, this_process_slot
from model_soups.records import (Cooked, EvaluationRecord, FailedIngredient, IngredientRecord, PretrainedRecord,
                                 SoupRecord)
from model_soups.sweep import SweepStop
from tasks import QUIET


@task(name="cook-soup", task_run_name="cook-{method}-soup", **QUIET)
def cook_soup(ctx: RunContext, pantry: Pantry, pretrained: PretrainedRecord, metas: list[IngredientRecord],
              val_accuracy: dict[str, float], method: str, base: SoupRecord | None = None) -> SoupRecord:
    return cooking.cook_soup(ctx, pantry, pretrained, metas, val_accuracy, method, get_run_logger().info, base)


def cook_here(ctx: RunContext, pretrained: PretrainedRecord, metas: list[IngredientRecord],
              val_accuracy: dict[str, float]) -> Cooked:
    """Every soup of soup.methods in this flow run, each method a task, all through one pantry: each checkpoint read
    and checked once. Methods that build on another soup (WiSE-FT of the greedy soup) are cooked once that soup is.
    The deltas' cosines (the report's figure) are read from the same pantry."""
    methods = ctx.config.soup.methods
    with cooking.pantry_for(ctx, pretrained, metas) as checkpoints:
        first = {m: cook_soup.submit(ctx, checkpoints, pretrained, metas, val_accuracy, m) for m in methods
                 if SOUP_METHODS[m].base(ctx.config.soup) is None}
        then = {m: cook_soup.submit(ctx, checkpoints, pretrained, metas, val_accuracy, m,
                                    first[SOUP_METHODS[m].base(ctx.config.soup)]) for m in methods if m not in first}
        soups = [{**first, **then}[m].result() for m in methods]
        cosines = cooking.delta_cosines(checkpoints, pretrained, metas)
        pantry = checkpoints.summary()
    get_run_logger().info(f"cooking read its checkpoints through the pantry: {pantry}")
    return Cooked(soups=soups, soups_reused=sum(s.reused for s in soups), cosines=cosines,
                  where=f"{this_process_slot().name} ({this_device()})", pantry=pantry)


@task(name="cook-on-pool", **QUIET)
def cook_on_pool(ctx: RunContext, pretrained: PretrainedRecord, metas: list[IngredientRecord],
                 failed: list[FailedIngredient], evaluations: list[EvaluationRecord], run_id: str,
                 stop: SweepStop | None = None) -> Cooked:
    """Every soup, the pretrained start's evaluations and the run folder, made by one run of the cook deployment
    (execution.cook_deployment) on a worker of the device pool; what it made is read from storage. This waits in
    the orchestrating process and reads no checkpoint."""
    log, config = get_run_logger().info, ctx.config
    deployment = config.execution.cook_deployment
    log(f"cooking {len(config.soup.methods)} soups and publishing as a run of {deployment}")
    run = run_deployment(deployment, timeout=None, poll_interval=config.execution.poll_s, as_subflow=True,
                         flow_run_name=f"cook-{run_id}", parameters={
                             "config": config.model_dump(mode="json"), "pretrained": pretrained.model_dump(mode="json"),
                             "metas": [m.model_dump(mode="json") for m in metas],
                             "failed": [f.model_dump(mode="json") for f in failed],
                             "evaluations": [e.model_dump(mode="json") for e in evaluations], "run_id": run_id,
                             "stop": stop.model_dump(mode="json") if stop is not None else None})
    if not run.state.is_completed():
        raise RuntimeError(f"flow run {run.name} of {deployment} ended {run.state.type.value}: {run.state.message} "
                           "(the soups it finished are stored, and a retry or re-run reuses them)")
    cooked = Cooked.read(ctx.store, ctx.layout.cooked(run_id))
    log(f"flow run {run.name} cooked the soups on {cooked.where}, reading its checkpoints through the pantry: "
        f"{cooked.pantry}")
    return cooked
