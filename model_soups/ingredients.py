"""Ingredients: the pretrained start, fine-tunes (trained, or reused when stored and verified) and
bring-your-own checkpoints. Every step reads and writes the storage root, so a re-run resumes."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from typing import Callable

from model_soups import merge
from model_soups.context import RunContext
from model_soups.processes import FinetuneFailed, IngredientBusy, run_finetune_process
from model_soups.records import (BUILD_LEASE_S, DeviceSlot, FailedIngredient, FinetuneJob, IngredientRecord,
                                 PretrainedRecord, reuse_or_build)
from model_soups.storage import CorruptCheckpoint, Layout, Lease, StorageError, StorageUnavailable, Store
from model_soups.sweep import IngredientSpec

Log = Callable[[str], None]


def start_as_model(pretrained: PretrainedRecord) -> IngredientRecord:
    """The pretrained start, to be evaluated like an ingredient: the report's reference point, where every
    fine-tune began (the paper's zero-shot model)."""
    return IngredientRecord(id=f"pretrained-{pretrained.fingerprint[:8]}", status="completed", checkpoint=pretrained.url,
                            sha256=pretrained.sha256)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + os.urandom(2).hex()


def verify_checkpoint(store: Store, url: str, sha256: str) -> None:
    with store.open_checkpoint(url, sha256) as reader:
        reader.verify()


def ensure_pretrained(ctx: RunContext, log: Log) -> PretrainedRecord:
    store, layout, plan = ctx.store, ctx.layout, ctx.plan
    url = layout.pretrained(plan.fingerprint)

    def build() -> PretrainedRecord:
        started = time.time()
        sha = store.save_checkpoint(url, plan.recipe.make_pretrained(), {"fingerprint": plan.fingerprint})
        record = PretrainedRecord(url=url, sha256=sha, fingerprint=plan.fingerprint, seconds=round(time.time() - started, 2))
        record.write(store, layout.pretrained_record(plan.fingerprint))
        log(f"pretrained {url}: built in {record.seconds}s")
        return record

    record = reuse_or_build(store, layout.pretrained_record(plan.fingerprint), PretrainedRecord,
                            lambda r: verify_checkpoint(store, r.url, r.sha256), build, f"pretrained {url}",
                            lease_s=BUILD_LEASE_S)
    if record.reused:
        log(f"pretrained {url}: reused")
    return record


def stored_ingredient(store: Store, layout: Layout, ingredient_id: str) -> IngredientRecord | None:
    """The stored result of an ingredient if it is finished and its checkpoint verifies; else None."""

    failed_before = False

    def verify(meta: IngredientRecord) -> None:
        nonlocal failed_before
        if meta.status == "failed":  # a crash, hang or out-of-memory may not happen again: try again
            failed_before = True
            raise StorageError(f"an earlier attempt failed ({meta.reason})")
        if meta.status == "completed":  # diverged is a result too: the same seed would diverge again
            verify_checkpoint(store, meta.checkpoint, meta.sha256)

    def discard() -> None:
        """A bad record must not read as a result (`has_result`) to the next fine-tune; a failure record stays,
        counting the attempts."""
        if not failed_before:
            store.delete(layout.meta(ingredient_id))
            store.delete(layout.checkpoint(ingredient_id))

    return reuse_or_build(store, layout.meta(ingredient_id), IngredientRecord, verify, lambda: None,
                          f"ingredient {ingredient_id}", discard)


def recorded_ingredient(store: Store, layout: Layout, ingredient_id: str) -> IngredientRecord | None:
    """The stored record of an ingredient as it reads, its checkpoint not read; None if there is none that reads."""
    try:
        return IngredientRecord.read(store, layout.meta(ingredient_id))
    except StorageUnavailable:
        raise
    except StorageError:
        return None


def has_result(store: Store, layout: Layout, ingredient_id: str) -> bool:
    """A result is stored for the ingredient (completed or diverged); a failed attempt is not a result."""
    record = recorded_ingredient(store, layout, ingredient_id)
    return record is not None and record.status != "failed"


def lease_lost(store: Store, layout: Layout, ingredient_id: str, running_for_s: float, lease_s: float) -> bool:
    """True when a fine-tune that should be running has no live lease: its process or machine died."""
    if running_for_s < lease_s or has_result(store, layout, ingredient_id):
        return False
    lease = Lease(store, layout.lease(ingredient_id), lease_s)
    record = lease.holder()
    return record is None or lease.is_stale(record)


def train_ingredient(ctx: RunContext, pretrained: PretrainedRecord, spec: IngredientSpec, slot: DeviceSlot,
                     log: Log) -> IngredientRecord:
    """The stored ingredient if it is done, else train it; wait while another process is training it."""
    config, store, layout = ctx.config, ctx.store, ctx.layout
    job = FinetuneJob(id=spec.id, slot=slot.name, hparams=spec.hparams, experiment=config.experiment,
                      lease_s=config.execution.lease_s, storage=config.storage, recipe=config.recipe, pretrained=pretrained)
    deadline = time.time() + config.execution.timeout_s
    while True:
        meta = stored_ingredient(store, layout, spec.id)
        if meta is not None:
            return meta
        try:
            run_finetune_process(job, slot, config.execution.timeout_s, log)
            break
        except IngredientBusy:
            if time.time() > deadline:
                raise TimeoutError(f"ingredient {spec.id}: still being trained elsewhere after {config.execution.timeout_s}s") from None
            log(f"ingredient {spec.id}: another process is training it; waiting for its result")
            time.sleep(min(5.0, config.execution.lease_s / 3))
        except FinetuneFailed as failure:
            meta = stored_ingredient(store, layout, spec.id)  # it may have stored its result before dying
            if meta is not None:
                return meta.model_copy(update={"reused": False})
            record_failure(store, layout, spec, failure.reason, slot.name, log)
            raise
    meta = stored_ingredient(store, layout, spec.id)
    if meta is None:
        raise RuntimeError(f"ingredient {spec.id}: the fine-tune process ended without a verified result")
    return meta.model_copy(update={"reused": False})


def record_failure(store: Store, layout: Layout, spec: IngredientSpec, reason: str, slot: str, log: Log) -> None:
    """meta.json says why the last attempt failed and how many have; the next attempt or run tries again."""
    url = layout.meta(spec.id)
    try:
        previous = IngredientRecord.read(store, url) if store.exists(url) else None
        failures = previous.failures + 1 if previous is not None and previous.status == "failed" else 1
        IngredientRecord(id=spec.id, status="failed", reason=reason, failures=failures, slot=slot, hparams=spec.hparams,
                         failed_at=datetime.now(timezone.utc).isoformat()).write(store, url)
    except StorageError as error:
        log(f"ingredient {spec.id}: could not record its failure ({error})")


def folder_shards(store: Store, url: str) -> list[str] | None:
    """The safetensors files of a Hugging Face model folder, sharded (model.safetensors.index.json) or not; None
    when `url` is no such folder."""
    index = f"{url}/model.safetensors.index.json"
    if store.exists(index):
        return sorted({f"{url}/{name}" for name in store.read_json(index)["weight_map"].values()})
    return [f"{url}/model.safetensors"] if store.exists(f"{url}/model.safetensors") else None


# what a supplied checkpoint is refused for: it would be refused the same way again, so it is not retried
REFUSED = (merge.CheckpointMismatch, merge.NonFiniteCheckpoint, CorruptCheckpoint)


def without_duplicates(metas: list[IngredientRecord]) -> tuple[list[IngredientRecord], list[FailedIngredient]]:
    """The ingredients with each file once: a second ingredient with the same sha256 (a supplied copy of a stored
    fine-tune, say) would count twice in every soup, so it is left out, named next to the one it copies."""
    first: dict[str, IngredientRecord] = {}
    kept, dropped = [], []
    for meta in metas:
        if meta.sha256 in first:
            dropped.append(FailedIngredient(
                id=meta.id, status="failed", hparams=meta.hparams, reason=f"duplicate: {meta.checkpoint} is the same file "
                f"(sha256 {meta.sha256[:12]}...) as ingredient {first[meta.sha256].id}'s, and would count twice"))
        else:
            first[meta.sha256] = meta
            kept.append(meta)
    return kept, dropped


def register_checkpoint(store: Store, layout: Layout, spec: IngredientSpec, pretrained: PretrainedRecord) -> IngredientRecord:
    """Bring-your-own ingredient: check it against the pretrained model and record it, without training.
    A Hugging Face model folder is joined into one checkpoint in the ingredient's own place first."""
    url = spec.checkpoint
    if (shards := folder_shards(store, url)) is not None:
        state = {name: tensor for shard in shards for name, tensor in store.load_checkpoint(shard).items()}
        url = layout.checkpoint(spec.id)
        store.save_checkpoint(url, state, {"source": spec.checkpoint})
    with store.open_checkpoint(pretrained.url) as base, store.open_checkpoint(url) as reader:
        merge.check_compatible(base.info, reader.info, spec.checkpoint)
        for name, tensor in reader.tensors():
            merge.check_finite(name, tensor, spec.checkpoint)
    meta = IngredientRecord(id=spec.id, status="completed", checkpoint=url, sha256=store.sha256(url),
                            source="existing checkpoint")
    meta.write(store, layout.meta(spec.id))
    return meta
