"""The cook flow: everything of a model-soup run that reads a checkpoint after the fine-tunes, on the device of the
worker that runs it (the GPU pool): the soups, the pretrained start's evaluations and the run folder."""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from model_soups.config import RunConfig
from model_soups.context import RunContext
from model_soups.cooking import val_accuracies
from model_soups.ingredients import start_as_model
from model_soups.records import EvaluationRecord, FailedIngredient, IngredientRecord, PretrainedRecord
from model_soups.sweep import SweepStop
from tasks.cooking import cook_here
from tasks.evaluation import evaluate
from tasks.publishing import publish

THREADS = 32


@flow(name="cook", task_runner=ThreadPoolTaskRunner(max_workers=THREADS))  # every soup and evaluation at once
def cook_soups(config: RunConfig, pretrained: PretrainedRecord, metas: list[IngredientRecord],
               failed: list[FailedIngredient], evaluations: list[EvaluationRecord], run_id: str,
               stop: SweepStop | None = None) -> None:
    """Cook every soup of soup.methods, reading each checkpoint once, evaluate the pretrained start (the report's
    reference point) and publish the run folder, on this worker's device. What was made (`Cooked`) goes to storage,
    where the model-soup run that started this one (execution.cook_on: device-pool) reads it."""
    ctx = RunContext.of(config)
    start = [evaluate.submit(ctx, start_as_model(pretrained), split) for split in ctx.plan.splits]
    cooked = cook_here(ctx, pretrained, metas, val_accuracies(evaluations))
    cooked.start = [future.result() for future in start]
    cooked.run = publish(ctx, pretrained, metas, failed, evaluations, cooked, run_id, stop)
    cooked.write(ctx.store, ctx.layout.cooked(run_id))
