"""The fine-tuning loop: AdamW, warmup + cosine, label smoothing, mixup, augmentation, AMP on CUDA.

`python -m model_soups.train` runs one ingredient from a JSON job on stdin; the pipeline starts it as a
separate process pinned to one device slot, so a crash or an out-of-memory kills one ingredient only.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from model_soups.ingredients import has_result
from model_soups.processes import this_device
from model_soups.recipes.base import Hyperparameters, Recipe, get_recipe, logits_of
from model_soups.records import BUSY_EXIT_CODE, STORAGE_EXIT_CODE, FinetuneJob, IngredientRecord
from model_soups.storage import Layout, Lease, Store, StorageUnavailable


@dataclass
class TrainResult:
    status: str  # "completed" or "diverged"
    state: dict[str, torch.Tensor] | None
    steps: int
    curve: list[tuple[int, float]] = field(default_factory=list)
    reason: str = ""


def finetune(
    recipe: Recipe,
    pretrained: dict[str, torch.Tensor],
    hp: Hyperparameters,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> TrainResult:
    torch.manual_seed(hp.seed)
    generator = torch.Generator().manual_seed(hp.seed)
    mixup_rng = np.random.default_rng(hp.seed)
    model = recipe.build_model()
    model.load_state_dict(pretrained)
    model.to(device).train()
    train = recipe.dataset("train")
    steps_per_epoch = math.ceil(len(train) / hp.batch_size)
    total = steps_per_epoch * hp.epochs if hp.max_steps is None else min(hp.max_steps, steps_per_epoch * hp.epochs)
    warmup = int(hp.warmup_fraction * total)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    curve: list[tuple[int, float]] = []
    report_every = max(1, total // 10)
    step = 0
    while step < total:
        for index in batches(len(train), hp.batch_size, generator, train.lengths if recipe.group_by_length else None):
            if step >= total:
                break
            inputs, labels = train.batch(index), train.labels[index]
            if hp.augment > 0:
                inputs = recipe.augment(inputs, hp.augment, generator)
            inputs = {name: value.to(device) for name, value in inputs.items()}
            labels = labels.to(device)
            lam, partner = 1.0, None
            if hp.mixup > 0:
                lam = float(mixup_rng.beta(hp.mixup, hp.mixup))
                partner = torch.randperm(len(labels), generator=generator).to(device)
                inputs = {n: lam * v + (1 - lam) * v[partner] if v.is_floating_point() else v for n, v in inputs.items()}
            with autocast:
                logits = logits_of(model(**inputs))
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # the loss in float32 or above
            loss = lam * F.cross_entropy(logits, labels, label_smoothing=hp.label_smoothing)
            if partner is not None:
                loss = loss + (1 - lam) * F.cross_entropy(logits, labels[partner], label_smoothing=hp.label_smoothing)
            if not torch.isfinite(loss):
                return TrainResult("diverged", None, step, curve, f"loss became {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % report_every == 0 or step == total:
                curve.append((step, round(loss.item(), 5)))
                log(f"step {step}/{total} loss {loss.item():.4f}")
    state = {name: value.detach().cpu() for name, value in model.state_dict().items()}
    bad = [name for name, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        return TrainResult("diverged", None, step, curve, f"weights became non-finite in {bad[0]!r}")
    return TrainResult("completed", state, step, curve)


def batches(n: int, batch_size: int, generator: torch.Generator, lengths: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One epoch of shuffled batches. With `lengths`, grouped by length as transformers' `group_by_length` does:
    shuffle, sort within mega-batches of 50 batches, cut, then shuffle the batches, so little is padding."""
    order = torch.randperm(n, generator=generator)
    if lengths is None:
        return list(order.split(batch_size))
    grouped = [chunk[torch.argsort(lengths[chunk], descending=True, stable=True)] for chunk in order.split(50 * batch_size)]
    cut = [batch for chunk in grouped for batch in chunk.split(batch_size)]
    return [cut[i] for i in torch.randperm(len(cut), generator=generator)]


def versions() -> dict[str, str]:
    import safetensors

    return {"torch": torch.__version__, "safetensors": safetensors.__version__, "python": sys.version.split()[0]}


def run_job(job: FinetuneJob, log: Callable[[str], None] = print) -> IngredientRecord | None:
    """Fine-tune one ingredient under its lease; None if another process is training it or has just finished it."""
    store = Store(job.storage)
    layout = Layout(store, job.experiment)
    lease = Lease(store, layout.lease(job.id), job.lease_s)
    if not lease.acquire():
        log(f"{job.id}: busy, another process holds {layout.lease(job.id)}")
        return None
    try:
        # checked again under the lease: another process may have finished it since the caller looked
        if has_result(store, layout, job.id):
            log(f"{job.id}: finished by another process meanwhile")
            return None
        return _train_and_store(job, store, layout, log)
    finally:
        lease.release()


def _train_and_store(job: FinetuneJob, store: Store, layout: Layout, log: Callable[[str], None]) -> IngredientRecord:
    """Checkpoint first, then meta.json: the meta file is the completion record, with the checkpoint's sha256."""
    recipe = get_recipe(job.recipe.name, job.recipe.options)
    hp = recipe.Hyperparameters.model_validate(job.hparams)
    device = this_device()
    pretrained = store.load_checkpoint(job.pretrained.url, job.pretrained.sha256)
    started = time.time()
    result = finetune(recipe, pretrained, hp, device, log)
    checkpoint = layout.checkpoint(job.id) if result.state is not None else None
    sha = store.save_checkpoint(checkpoint, result.state, {"ingredient": job.id}) if checkpoint else None
    meta = IngredientRecord(
        id=job.id, status=result.status, reason=result.reason, hparams=hp.model_dump(), checkpoint=checkpoint, sha256=sha,
        recipe=recipe.describe(), pretrained_url=job.pretrained.url, pretrained_sha256=job.pretrained.sha256,
        steps=result.steps, curve=result.curve, seconds=round(time.time() - started, 3), device=device, slot=job.slot,
        versions=versions())
    meta.write(store, layout.meta(job.id))
    log(f"{job.id}: {result.status} after {result.steps} steps in {meta.seconds:.1f}s {result.reason}")
    return meta


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    job = FinetuneJob.model_validate_json(sys.stdin.read())
    try:
        result = run_job(job, log=lambda line: print(line, flush=True))
    except StorageUnavailable as error:
        print(error, flush=True)
        sys.exit(STORAGE_EXIT_CODE)
    if result is None:
        sys.exit(BUSY_EXIT_CODE)


if __name__ == "__main__":
    main()
