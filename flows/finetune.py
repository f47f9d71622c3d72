"""The finetune flow: one ingredient on the device slot of the worker that runs it (the GPU work pool)."""

from __future__ import annotations

from prefect import flow

from model_soups.config import RunConfig
from model_soups.context import RunContext
from model_soups.processes import this_process_slot
from model_soups.records import IngredientRecord, PretrainedRecord
from model_soups.sweep import IngredientSpec
from tasks.evaluation import evaluate
from tasks.ingredients import finetune


@flow(name="finetune")
def finetune_ingredient(config: RunConfig, spec: IngredientSpec, pretrained: PretrainedRecord) -> IngredientRecord:
    """Fine-tune one ingredient of a model-soup run; the result goes to the storage root, keyed by its id.

    With execution.evaluate_on = finetune-worker it is also evaluated here, on this worker's device, and the
    orchestrating run then finds every evaluation stored.
    """
    ctx = RunContext.of(config)
    meta = finetune(ctx, pretrained, spec, this_process_slot())
    if config.execution.evaluate_on == "finetune-worker" and meta.status == "completed":
        for split in ctx.plan.splits:
            evaluate(ctx, meta, split)
    return meta
