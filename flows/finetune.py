"""The finetune flow: one ingredient on the device slot of the worker that runs it (the GPU work pool)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from model_soups.config import RunConfig
from model_soups.pipeline import this_process_slot
from model_soups.recipes import get_recipe
from tasks.pipeline import evaluate, finetune


@flow(name="finetune")
def finetune_ingredient(config: RunConfig, spec: dict[str, Any], pretrained: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune one ingredient of a model-soup run; the result goes to the storage root, keyed by its id.

    With execution.evaluate_on = finetune-worker it is also evaluated here, on this worker's device, and the
    orchestrating run then finds every evaluation stored.
    """
    meta = finetune(config, pretrained, spec, this_process_slot())
    if config.execution.evaluate_on == "finetune-worker" and meta["status"] == "completed":
        for split in get_recipe(config.recipe.name, config.recipe.options).splits():
            evaluate(config, meta, split)
    return meta
