"""The evaluate task: one ingredient on one split."""

from __future__ import annotations

from prefect import get_run_logger, task

from model_soups.config import RunConfig
from model_soups.evaluate import evaluate_ingredient
from model_soups.ingredients import open_storage
from model_soups.recipes.base import get_recipe
from model_soups.records import EvaluationRecord, IngredientRecord
from tasks import QUIET


@task(name="evaluate", task_run_name="evaluate-{meta.id}-{split}", retries=1, **QUIET)
def evaluate(config: RunConfig, meta: IngredientRecord, split: str) -> EvaluationRecord:
    store, layout = open_storage(config)
    recipe = get_recipe(config.recipe.name, config.recipe.options)
    return evaluate_ingredient(store, layout, recipe, meta, split, get_run_logger().info)
