"""Output ensembles from stored logits: the mean predicted probability of the members, and the greedy recipe applied
to them. No forward pass: each model's logits were stored when it was evaluated."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy.special import log_softmax

from model_soups.evaluate import metrics
from model_soups.soups import accepts


def ensemble_logits(logits: Sequence[np.ndarray]) -> np.ndarray:
    """Log of the mean predicted probability of the members: an output ensemble, as log-probabilities."""
    probs = np.mean([np.exp(log_softmax(x.astype(np.float64), axis=1)) for x in logits], axis=0)
    return np.log(np.clip(probs, 1e-300, None))


def greedy_ensemble(ranked: Sequence[str], val_logits: Mapping[str, np.ndarray], labels: np.ndarray, rule: str = ">=") -> list[str]:
    """The greedy recipe applied to output ensembles, from stored val logits: no forward pass."""

    def accuracy(members: list[str]) -> float:
        return metrics(ensemble_logits([val_logits[m] for m in members]), labels).accuracy

    chosen = [ranked[0]]
    best = accuracy(chosen)
    for member in ranked[1:]:
        score = accuracy(chosen + [member])
        if accepts(score, best, rule):
            chosen, best = chosen + [member], score
    return chosen

