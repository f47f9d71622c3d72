"""Metrics and logits for one model on one split."""

from __future__ import annotations

import numpy as np
import torch

from model_soups.recipes import SplitData, logits_of

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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, negative log-likelihood and expected calibration error (15 equal-width bins)."""
    log_probs = log_softmax(logits.astype(np.float64))
    probs = np.exp(log_probs)
    predictions = probs.argmax(axis=1)
    correct = predictions == labels
    confidence = probs.max(axis=1)
    bins = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
    ece = sum(
        abs(correct[bins == b].mean() - confidence[bins == b].mean()) * (bins == b).mean()
        for b in range(ECE_BINS) if (bins == b).any()
    )
    return {
        "accuracy": float(correct.mean()),
        "nll": float(-log_probs[np.arange(len(labels)), labels].mean()),
        "ece": float(ece),
        "n": int(len(labels)),
    }
