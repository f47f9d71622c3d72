"""The finetune flow: one ingredient on the device slot of the worker that runs it (the GPU work pool)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from model_soups.config import RunConfig
from model_soups.pipeline import this_process_slot
from tasks.pipeline import finetune


@flow(name="finetune")
def finetune_ingredient(config: RunConfig, spec: dict[str, Any], pretrained: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune one ingredient of a model-soup run; the result goes to the storage root, keyed by its id."""
    return finetune(config, pretrained, spec, this_process_slot())
