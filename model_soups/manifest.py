"""What a published run folder records (`runs/<run_id>/`): its manifest, the ingredients' delta cosines, and while it
is being written, what for. Read and written as every record is (`records.Record`)."""

from __future__ import annotations

from pydantic import BaseModel

from model_soups.records import FailedIngredient, GreedyStep, Hparams, JsonObject, PretrainedRecord, Record, TaskMerge
from model_soups.sweep import SweepStop


class ManifestIngredient(BaseModel):
    id: str
    checkpoint: str
    sha256: str
    hparams: Hparams
    val_accuracy: float


class ManifestSoup(BaseModel):
    ingredients: list[str]
    checkpoint: str
    sha256: str
    record: str
    weights: list[float] | dict[str, list[float]]
    batchnorm: str
    candidate_evaluations: int
    task: TaskMerge | None = None


class Cosines(Record):
    """runs/<run_id>/cosine.json: the cosine similarity of every two ingredients' deltas from the pretrained start."""

    ids: list[str]
    matrix: list[list[float]]


class Publishing(Record):
    """runs/<run_id>/publishing.json, while the folder is being written (until its manifest is): what it is for, so
    that a rerun of the same config and soups completes a folder whose publishing stopped halfway."""

    run_id: str
    content: str  # a hash of the config and the soups' keys


class Manifest(Record):
    """runs/<run_id>/manifest.json: what was published, from what, with every file's sha256."""

    experiment: str
    run_id: str
    created: str
    final: str
    soup: str
    soup_ingredients: int
    recipe: JsonObject
    fingerprint: str
    pretrained: PretrainedRecord
    ingredients: list[ManifestIngredient]
    failed: list[FailedIngredient]
    best_individual: str
    soups: dict[str, ManifestSoup]
    greedy_trajectory: list[GreedyStep]
    sweep_stop: SweepStop | None = None
    files: dict[str, str]
    config: JsonObject
    versions: dict[str, str]
