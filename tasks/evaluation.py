"""The evaluate task (one model on one split), and `Evaluations`: every evaluation of a run, each started once."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.futures import PrefectFuture

from model_soups.context import RunContext
from model_soups.evaluate import evaluate_ingredient
from model_soups.records import EvaluationRecord, IngredientRecord
from tasks import QUIET


@task(name="evaluate", task_run_name="evaluate-{meta.id}-{split}", retries=1, **QUIET)
def evaluate(ctx: RunContext, meta: IngredientRecord, split: str) -> EvaluationRecord:
    return evaluate_ingredient(ctx.store, ctx.layout, ctx.recipe, meta, split, get_run_logger().info)


class Evaluations:
    """The evaluations of a run's models on every split, submitted once per model: as soon as a fine-tune is verified
    (`ready`, when execution.pipeline), or when its val accuracy or results are first asked for."""

    def __init__(self, ctx: RunContext):
        self.ctx, self.splits, self.pipelined = ctx, ctx.plan.splits, ctx.config.execution.pipeline
        self.futures: dict[str, list[PrefectFuture]] = {}

    def start(self, meta: IngredientRecord) -> None:
        if meta.id not in self.futures:
            self.futures[meta.id] = [evaluate.submit(self.ctx, meta, split) for split in self.splits]

    def ready(self, meta: IngredientRecord) -> None:
        """A model is verified: start its evaluations now if they are pipelined, while other fine-tunes still run."""
        if self.pipelined:
            self.start(meta)

    def val_accuracy(self, meta: IngredientRecord) -> float:
        self.start(meta)
        return self.futures[meta.id][self.splits.index("val")].result().accuracy

    def results(self, metas: list[IngredientRecord]) -> list[EvaluationRecord]:
        """Every split of every model in `metas`, in that order and split order."""
        for meta in metas:
            self.start(meta)
        return [future.result() for meta in metas for future in self.futures[meta.id]]
