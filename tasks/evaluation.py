"""The evaluate task: one ingredient on one split."""

from __future__ import annotations

from prefect import get_run_logger, task

from model_soups.context import RunContext
from model_soups.evaluate import evaluate_ingredient
from model_soups.records import EvaluationRecord, IngredientRecord
from tasks import QUIET


@task(name="evaluate", task_run_name="evaluate-{meta.id}-{split}", retries=1, **QUIET)
def evaluate(ctx: RunContext, meta: IngredientRecord, split: str) -> EvaluationRecord:
    return evaluate_ingredient(ctx.store, ctx.layout, ctx.recipe, meta, split, get_run_logger().info)
