"""What crosses a step or a process, each defined once and validated when it is read back from storage.

A stored record that no longer validates is treated like a missing one: the work is done again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from model_soups.config import RecipeConfig, StorageConfig
from model_soups.recipes.base import stable_hash
from model_soups.storage import Lease, StorageError, StorageUnavailable, Store

BUILD_LEASE_S = 60.0  # a build (pretrained start, evaluation, soup) whose lease is not renewed for this long is dead
BUSY_EXIT_CODE = 75  # EX_TEMPFAIL: another process holds this ingredient's lease, or has just finished it
LEASE_POLL_S = 1.0  # how often a process waiting for another's build looks for its record
logger = logging.getLogger(__name__)
STORAGE_EXIT_CODE = 69  # EX_UNAVAILABLE: the storage endpoint did not answer, even after retries

Scalar = str | int | float | bool | None
Hparams = dict[str, Scalar]  # one fine-tune's hyperparameters, as the recipe's Hyperparameters model checked them
JsonObject = dict[str, JsonValue]  # free-form by design: a recipe's own options, the run config as given


class Record(BaseModel):
    """A JSON record, written with the sha256 of its own content (`record_sha256`): one that changed since (a flipped
    digit still reads as valid JSON) is refused like a missing one, and made again."""

    # extra fields are ignored, so records written by an older version of this code still read
    model_config = ConfigDict(extra="ignore")
    reused: bool = Field(False, exclude=True, description="read back from storage rather than made by this run")

    @classmethod
    def read(cls, store: Store, url: str):
        data = store.read_json(url)
        recorded = data.pop("record_sha256", None) if isinstance(data, dict) else None
        if recorded is not None and recorded != stable_hash(data, 64):  # written before records carried one: None
            raise StorageError(f"{url}: its content does not match the sha256 written with it (changed or damaged)")
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise StorageError(f"{url}: not a valid {cls.__name__} ({error.error_count()} problems: "
                               f"{error.errors()[0]['loc']} {error.errors()[0]['msg']})") from None

    def write(self, store: Store, url: str) -> None:
        data = self.model_dump(mode="json")
        store.write_json(url, {**data, "record_sha256": stable_hash(data, 64)})


R = TypeVar("R", bound=Record)


def reuse_or_build(store: Store, url: str, kind: type[R], verify: Callable[[R], None], build: Callable[[], R],
                   what: str, discard: Callable[[], None] = lambda: None, lease_s: float | None = None) -> R:
    """The record stored at `url` (marked `reused`) if it reads and `verify` passes; else `discard()` what is
    there and `build()`.

    `verify` raises a StorageError to refuse a record (a checkpoint that fails its sha256, say). Storage that
    does not answer is not a reason to rebuild: that error goes up, and a re-run resumes.

    With `lease_s`, the build holds a lease beside the record (`<name>.lease`), so that what two runs on one
    root both need (the pretrained start, an evaluation, a soup) is made once: the second waits for the first's
    record and reuses it, and builds it itself only if the first failed or died (its lease went stale).
    """
    waiting, said = False, set()
    while True:
        record = stored_record(store, url, kind, verify, what, discard, said)
        if record is not None:
            return record
        if lease_s is None:
            return build()
        lease = Lease(store, f"{url.rsplit('.', 1)[0]}.lease", lease_s)
        if lease.acquire():
            try:  # it may have been finished between the look above and the lease
                record = stored_record(store, url, kind, verify, what, discard, said)
                return record if record is not None else build()
            finally:
                lease.release()
        if not waiting:
            logger.info(f"{what}: being made by another process; waiting for its result")
            waiting = True
        time.sleep(LEASE_POLL_S)


def stored_record(store: Store, url: str, kind: type[R], verify: Callable[[R], None], what: str,
                  discard: Callable[[], None], said: set[str]) -> R | None:
    """The record at `url` if it reads and verifies; else None, with a warning for each new reason (in `said`)."""
    if not store.exists(url):
        return None
    try:
        record = kind.read(store, url)
        verify(record)
        return record.model_copy(update={"reused": True})
    except StorageUnavailable:
        raise
    except StorageError as error:
        if str(error) not in said:
            said.add(str(error))
            logger.warning(f"{what}: {error}; making it again")
        discard()
        return None


class PretrainedRecord(Record):
    url: str
    sha256: str
    fingerprint: str
    seconds: float = 0.0


class IngredientRecord(Record):
    """meta.json: written after the checkpoint, so it is the completion record. A failed attempt leaves one too,
    saying why; the next run tries that ingredient again."""

    id: str
    status: Literal["completed", "diverged", "failed"]
    reason: str = ""
    hparams: Hparams = Field(default_factory=dict)
    checkpoint: str | None = None
    sha256: str | None = None
    source: Literal["fine-tune", "existing checkpoint"] = "fine-tune"
    recipe: JsonObject = Field(default_factory=dict)
    pretrained_url: str | None = None
    pretrained_sha256: str | None = None
    steps: int = 0
    curve: list[tuple[int, float]] = Field(default_factory=list)
    seconds: float = 0.0
    device: str = ""
    slot: str = ""
    versions: dict[str, str] = Field(default_factory=dict)
    failures: int = 0
    failed_at: str | None = None

    @model_validator(mode="after")
    def _completed_has_checkpoint(self) -> "IngredientRecord":
        if self.status == "completed" and not (self.checkpoint and self.sha256):
            raise ValueError("a completed ingredient needs its checkpoint and sha256")
        return self


class DeviceSlot(BaseModel):
    """Where one fine-tune process runs: a name for logs and records, and the environment it is given (the CUDA
    device it sees, or one CPU thread)."""

    model_config = ConfigDict(frozen=True)
    name: str
    env: dict[str, str] = Field(default_factory=dict)


class FinetuneJob(BaseModel):
    """What `python -m model_soups.train` reads on stdin: one ingredient to fine-tune."""

    id: str
    slot: str
    hparams: Hparams
    experiment: str
    lease_s: float
    storage: StorageConfig
    recipe: RecipeConfig
    pretrained: PretrainedRecord

    def to_stdin(self) -> str:
        """As JSON with the storage secrets in clear: it travels over a pipe, never a command line or a log."""
        return json.dumps({**self.model_dump(mode="json"), "storage": self.storage.revealed()})


class Metrics(BaseModel):
    accuracy: float
    nll: float
    ece: float
    n: int


class EvaluationRecord(Record, Metrics):
    """evals/<id>/<split>.json; the logits and labels are beside it in <split>.npz."""

    id: str
    split: str
    checkpoint_sha256: str
    logits_sha256: str | None = None  # of <split>.npz: a reused evaluation's logits are checked against it
    seconds: float = 0.0


@dataclass(frozen=True)
class TaskMerge:
    """theta_0 + scale * combine(tau_1..tau_N): how a task-vector soup merges its ingredients' deltas."""

    combine: Literal["mean", "sum", "ties", "model_stock"]
    scale: float = 1.0
    top_k: float | None = None  # TIES trim: the % of each delta's entries kept, by magnitude, per tensor
    drop: float | None = None  # DARE: the probability an entry of a delta is dropped
    seed: int = 0


class GreedyStep(BaseModel):
    """One ingredient tried by the greedy soup, in order of val accuracy."""

    ingredient: str
    individual_val: float
    soup_val: float  # the soup's val accuracy with this ingredient in it
    accepted: bool
    size: int  # ingredients in the soup after this step


class SearchStep(BaseModel):
    """One candidate merge of a task-vector soup's search on val."""

    combine: str
    scale: float
    top_k: float | None = None
    drop: float | None = None
    seed: int = 0
    soup_val: float
    chosen: bool = False


class StockStep(BaseModel):
    """Model Stock's ratio for one tensor: no choice on val, but the angle between the deltas."""

    tensor: str
    cosine: float
    t: float


Step = GreedyStep | SearchStep | StockStep


class SoupRecord(Record):
    """soups/<key>/record.json: one cooked soup, with its metrics on every split."""

    method: str
    kind: str
    key: str
    checkpoint: str
    sha256: str
    ingredients: list[str]
    trajectory: list[Step] = Field(default_factory=list)
    weights: list[float] | dict[str, list[float]]
    task: TaskMerge | None = None  # a task-vector merge, as chosen on val
    candidate_evaluations: int = 0
    candidate_seconds: float = 0.0
    seconds: float = 0.0
    batchnorm: str = ""
    metrics: dict[str, Metrics]
    logits_sha256: dict[str, str] = Field(default_factory=dict)  # per split, of soups/<key>/<split>.npz


class Cooked(Record):
    """What one cooking run made: every soup, the pairwise cosines of the fine-tune deltas (read from the same
    checkpoints, in the order of the ingredients given), where and how it read them; and on the device pool, the
    pretrained start's evaluations and the run folder it published."""

    soups: list[SoupRecord]
    soups_reused: int  # of them, already stored and verified
    cosines: list[list[float]]
    where: str
    pantry: str
    start: list[EvaluationRecord] = Field(default_factory=list)  # the pretrained start's, when it was evaluated there
    run: str = ""  # the run folder, when it was published there


class SweepTrial(BaseModel):
    """One proposal of a soup-aware sweep: the ingredient, Optuna's raw parameters (replayed into the study on
    every round, so a re-run asks exactly what the first run asked) and, once scored, its value."""

    id: str
    hparams: Hparams
    params: dict[str, Scalar]
    value: float | None = None


class SweepRound(Record):
    """sweeps/<key>/round-NNN.json: written with the proposals before any fine-tune starts, and again with each
    proposal's gain to the greedy soup of the rounds before (`soup`, `soup_val`)."""

    index: int
    trials: list[SweepTrial]
    soup: list[str] = Field(default_factory=list)
    soup_val: float | None = None

    @property
    def scored(self) -> bool:
        return all(t.value is not None for t in self.trials)


class FailedIngredient(BaseModel):
    id: str
    status: str
    reason: str
    hparams: Hparams = Field(default_factory=dict)
