"""The cook-soup task: one soup method over the ingredients."""

from __future__ import annotations

from prefect import get_run_logger, task

from model_soups import cooking
from model_soups.context import RunContext
from model_soups.pantry import Pantry
from model_soups.records import IngredientRecord, PretrainedRecord, SoupRecord
from tasks import QUIET


@task(name="cook-soup", task_run_name="cook-{method}-soup", **QUIET)
def cook_soup(ctx: RunContext, pantry: Pantry, pretrained: PretrainedRecord, metas: list[IngredientRecord],
              val_accuracy: dict[str, float], method: str, base: SoupRecord | None = None) -> SoupRecord:
    return cooking.cook_soup(ctx, pantry, pretrained, metas, val_accuracy, method, get_run_logger().info, base)
