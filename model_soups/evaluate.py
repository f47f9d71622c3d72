"""Metrics and logits for one model on one split, and the one way they are stored: logits and labels as
npz (ensembles and paired comparisons read them back; no second forward pass), metrics as JSON; and BatchNorm
statistics re-estimated on train data before a soup is scored."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
from scipy.special import log_softmax

from model_soups.processes import this_device
from model_soups.recipes.base import Recipe, SplitData, logits_of
from model_soups.records import BUILD_LEASE_S, EvaluationRecord, IngredientRecord, Metrics, reuse_or_build
from model_soups.storage import Layout, StorageError, Store

ECE_BINS = 15


@torch.no_grad()
def predict(model: torch.nn.Module, data: SplitData, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    model.to(device).eval()
    # sequences go shortest first, so each batch is padded only to its own longest; logits come back in order
    order = torch.arange(len(data)) if data.lengths is None else torch.argsort(data.lengths, stable=True)
    logits = None
    for index in order.split(batch_size):
        inputs = {name: value.to(device) for name, value in data.batch(index).items()}
        out = logits_of(model(**inputs)).float().cpu()
        logits = torch.empty(len(data), *out.shape[1:]) if logits is None else logits
        logits[index] = out
    return logits.numpy()


def metrics(logits: np.ndarray, labels: np.ndarray) -> Metrics:
    """Accuracy, negative log-likelihood and expected calibration error (15 equal-width bins): the one place each is
    computed, for evaluations, soup candidates and ensembles alike. `logits` may be log-probabilities (ensembles)."""
    log_probs = log_softmax(logits.astype(np.float64), axis=1)
    probs = np.exp(log_probs)
    correct = logits.argmax(axis=1) == labels  # the logits' own argmax: a tie is broken the same way everywhere
    confidence = probs.max(axis=1)
    bins = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
    ece = sum(
        abs(correct[bins == b].mean() - confidence[bins == b].mean()) * (bins == b).mean()
        for b in range(ECE_BINS) if (bins == b).any()
    )
    return Metrics(accuracy=float(correct.mean()), nll=float(-log_probs[np.arange(len(labels)), labels].mean()),
                   ece=float(ece), n=int(len(labels)))


def evaluate_and_store(store: Store, logits_url: str, model: torch.nn.Module, data: SplitData,
                       batch_size: int) -> tuple[Metrics, str]:
    """The model's metrics on `data`, with its logits and labels stored at `logits_url`, and that file's sha256."""
    return store_logits(store, logits_url, predict(model, data, batch_size, this_device()), data)


def store_logits(store: Store, logits_url: str, logits: np.ndarray, data: SplitData) -> tuple[Metrics, str]:
    """The metrics of `logits` on `data`, with the logits and labels stored at `logits_url`, and that file's sha256."""
    sha = store.write_arrays(logits_url, logits=logits, labels=data.labels.numpy())
    return metrics(logits, data.labels.numpy()), sha


def load_model(recipe: Recipe, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = recipe.build_model()
    model.load_state_dict(state)
    return model.eval()


def evaluate_ingredient(store: Store, layout: Layout, recipe: Recipe, meta: IngredientRecord, split: str,
                        log: Callable[[str], None]) -> EvaluationRecord:
    """Metrics of one ingredient on one split, reused when stored for the same checkpoint."""
    json_url, npz_url = (layout.evaluation(meta.id, split, suffix) for suffix in ("json", "npz"))

    def verify(stored: EvaluationRecord) -> None:
        if stored.checkpoint_sha256 != meta.sha256:
            raise StorageError(f"{json_url}: evaluates another checkpoint ({stored.checkpoint_sha256[:12]}...)")
        if stored.logits_sha256 is None:
            raise StorageError(f"{json_url}: written before logits carried a sha256")
        store.verify_sha256(npz_url, stored.logits_sha256)  # a missing file: "not found"

    def build() -> EvaluationRecord:
        started = time.time()
        model = load_model(recipe, store.load_checkpoint(meta.checkpoint, meta.sha256))
        result, logits_sha = evaluate_and_store(store, npz_url, model, recipe.dataset(split), recipe.eval_batch_size)
        record = EvaluationRecord(id=meta.id, split=split, checkpoint_sha256=meta.sha256, **result.model_dump(),
                                  logits_sha256=logits_sha, seconds=round(time.time() - started, 4))
        record.write(store, json_url)
        log(f"ingredient {meta.id} on {split}: accuracy {record.accuracy:.4f}")
        return record

    return reuse_or_build(store, json_url, EvaluationRecord, verify, build, f"evaluation {meta.id} on {split}",
                          lease_s=BUILD_LEASE_S)


class _KeywordInputs(torch.nn.Module):
    """`update_bn` calls `model(batch)`; our models take their inputs as keyword arguments."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        return self.model(**inputs)


def recompute_batchnorm(model: torch.nn.Module, data: SplitData, batch_size: int = 256) -> bool:
    """Re-estimate BatchNorm running statistics on `data` with `torch.optim.swa_utils.update_bn` (a cumulative
    average over all batches); False when the model has no BatchNorm."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    device = next(model.parameters()).device
    batches = ({name: value.to(device) for name, value in data.batch(slice(start, start + batch_size)).items()}
               for start in range(0, len(data), batch_size))
    torch.optim.swa_utils.update_bn(batches, _KeywordInputs(model))
    model.eval()
    return True
