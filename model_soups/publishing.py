"""Publishing: the run folder with the final soup, results, the manifest and the report."""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from model_soups import report
from model_soups.context import RunContext
from model_soups.cooking import ensemble_rows, val_accuracies
from model_soups.manifest import Cosines, Manifest, ManifestIngredient, ManifestSoup, Publishing
from model_soups.recipes.base import Recipe, stable_hash
from model_soups.records import (BUILD_LEASE_S, Cooked, EvaluationRecord, FailedIngredient, IngredientRecord,
                                 PretrainedRecord, SoupRecord)
from model_soups.storage import Layout, Lease, RunFolder, StorageError, StorageUnavailable, Store
from model_soups.sweep import SweepStop
from model_soups.train import versions

PUBLISHING = "publishing.json"  # a run folder's `Publishing` record, there until its manifest is written


def result_rows(metas: list[IngredientRecord], evaluations: list[EvaluationRecord], soup_records: list[SoupRecord],
                best: str, start: list[EvaluationRecord]) -> list[dict]:
    """results.csv's rows: the pretrained start, every ingredient (with its hyperparameters as `hp_*` columns), the
    best one again as best_individual, and every soup."""
    rows = [{"model": "pretrained", "kind": "pretrained", "split": e.split, "accuracy": e.accuracy, "nll": e.nll,
             "ece": e.ece, "n": e.n, "n_ingredients": 0} for e in start]
    hparams = {m.id: {f"hp_{name}": value for name, value in m.hparams.items()} for m in metas}
    for e in evaluations:
        row = {"model": e.id, "split": e.split, "accuracy": e.accuracy, "nll": e.nll, "ece": e.ece, "n": e.n, "n_ingredients": 1,
               **hparams[e.id]}
        rows.append({**row, "kind": "ingredient"})
        if e.id == best:
            rows.append({**row, "kind": "best_individual"})
    for record in soup_records:
        rows += [{"model": record.kind, "kind": record.kind, "split": split, **m.model_dump(),
                  "n_ingredients": len(record.ingredients)} for split, m in record.metrics.items()]
    return rows


def publish(ctx: RunContext, pretrained: PretrainedRecord, metas: list[IngredientRecord], failed: list[FailedIngredient],
            evaluations: list[EvaluationRecord], cooked: Cooked, run_id: str, log: Callable[[str], None],
            stop: SweepStop | None = None) -> RunFolder:
    """The run folder, published: a new one, or a half-published one of the same config and soups, completed."""
    content = stable_hash({"config": ctx.config.model_dump(mode="json"), "soups": sorted(r.key for r in cooked.soups)})
    run, lease = claim_run_folder(ctx.store, ctx.layout, run_id, content, log)
    try:
        write_run_folder(ctx, run, pretrained, metas, failed, evaluations, cooked, stop)
        ctx.store.delete(run.file(PUBLISHING))
    finally:
        lease.release()
    log(f"published {run.url}")
    return run


def claim_run_folder(store: Store, layout: Layout, run_id: str, content: str,
                     log: Callable[[str], None]) -> tuple[RunFolder, Lease]:
    """The folder to publish into, leased while it is written: a half-published folder of the same config and soups
    (a run that stopped while publishing, whose lease is gone), which is completed, or else a new one, `run_id`.
    `publishing.json` says what a folder is being written for until its manifest is there."""
    for url in store.children(layout.runs()):
        half = RunFolder(url)
        if store.exists(half.manifest):
            continue
        try:
            if Publishing.read(store, half.file(PUBLISHING)).content != content:
                continue
        except StorageUnavailable:
            raise
        except StorageError:  # none (written before this code), or unreadable: not a folder this run can complete
            continue
        lease = Lease(store, half.file("lease.json"), BUILD_LEASE_S)
        if lease.acquire():
            log(f"completing {half.url}: a run of the same config and soups stopped while publishing it")
            return half, lease
    run = layout.run(run_id)
    lease = Lease(store, run.file("lease.json"), BUILD_LEASE_S)
    if not lease.acquire():
        raise StorageError(f"{run.url}: another process is publishing run {run_id}")
    Publishing(run_id=run_id, content=content).write(store, run.file(PUBLISHING))
    return run, lease


def write_run_folder(ctx: RunContext, run: RunFolder, pretrained: PretrainedRecord, metas: list[IngredientRecord],
                     failed: list[FailedIngredient], evaluations: list[EvaluationRecord], cooked: Cooked,
                     stop: SweepStop | None) -> None:
    config, recipe, store, layout = ctx.config, ctx.recipe, ctx.store, ctx.layout
    soup_records = cooked.soups
    run_id = run.run_id
    val_accuracy = val_accuracies(evaluations)
    best = max(metas, key=lambda m: val_accuracy[m.id]).id
    rows = result_rows(metas, evaluations, soup_records, best, cooked.start)
    if config.soup.ensembles:
        rows += ensemble_rows(store, layout, metas, recipe.splits(), val_accuracy, config.soup.rule)
    results = report.results_frame(rows)
    store.write_bytes(run.file("results.csv"), results.to_csv(index=False).encode())
    store.write_bytes(run.file("results.parquet"), results.to_parquet(index=False))

    Cosines(ids=[m.id for m in metas], matrix=cooked.cosines).write(store, run.file("cosine.json"))  # read when cooked

    final = next(r for r in soup_records if r.method == config.soup.final)
    state = store.load_checkpoint(final.checkpoint, final.sha256)
    store.save_checkpoint(run.soup, state, {  # the published file says what it is and where it came from
        "method": final.method, "experiment": config.experiment, "run_id": run_id,
        "ingredients": json.dumps([[m.id, m.sha256] for m in metas if m.id in final.ingredients])})
    greedy = next((r for r in soup_records if r.method == "greedy"), None)
    manifest = Manifest(
        experiment=config.experiment, run_id=run_id, created=datetime.now(timezone.utc).isoformat(),
        final=config.soup.final, soup=run.soup, soup_ingredients=len(final.ingredients), recipe=recipe.describe(),
        fingerprint=pretrained.fingerprint, pretrained=pretrained,
        ingredients=[ManifestIngredient(id=m.id, checkpoint=m.checkpoint, sha256=m.sha256, hparams=m.hparams,
                                        val_accuracy=val_accuracy[m.id]) for m in metas],
        failed=failed, best_individual=best,
        soups={r.method: ManifestSoup(ingredients=r.ingredients, checkpoint=r.checkpoint, sha256=r.sha256,
                                      record=layout.soup_record(r.key), weights=r.weights, batchnorm=r.batchnorm,
                                      candidate_evaluations=r.candidate_evaluations, task=r.task) for r in soup_records},
        greedy_trajectory=greedy.trajectory if greedy else [], sweep_stop=stop,
        files={name: store.sha256(run.file(name)) for name in RunFolder.FILES},
        config=config.model_dump(mode="json"), versions=versions(),
    )
    report.build_report(store, run.url, manifest)
    export_pretrained(store, run, recipe, state, manifest)
    manifest.write(store, run.manifest)  # last: a run folder is published once its manifest is there, and complete


def export_pretrained(store: Store, run: RunFolder, recipe: Recipe, state: dict[str, torch.Tensor],
                      manifest: Manifest) -> None:
    """The soup as a Hugging Face folder, `hf/` in the run folder, with a model card; none for a recipe whose model
    is not a transformers model."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        card_metadata = recipe.export_pretrained(state, folder)
        if card_metadata is None:
            return
        card = report.model_card(manifest, report.read_results(store, run.url), card_metadata)
        (folder / "README.md").write_text(card)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                store.write_bytes(run.file(f"hf/{path.relative_to(folder)}"), path.read_bytes())
