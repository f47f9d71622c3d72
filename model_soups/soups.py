"""Soup methods (one registry), ensembles from stored logits, and the best individual.

Every soup method returns a `Soup`: which ingredients, with which weights (global or per tensor). The
weights are then applied by the streamed `merge.weighted_average`, so every soup is cooked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import log_softmax
from torch.func import functional_call

from model_soups.merge import Ingredient, mean_of, weighted_sum
from model_soups.recipes import SplitData, logits_of
from model_soups.storage import Store, TensorInfo

if TYPE_CHECKING:  # the config takes its list of soup methods from this module's registry
    from model_soups.config import SoupOptions

ACCUMULATE = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Soup:
    method: str
    ingredients: list[Ingredient]
    weights: list[float] | dict[str, list[float]]
    trajectory: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SoupContext:
    """What a soup method may use. `ranked` is sorted by val accuracy, best first."""

    store: Store
    ranked: list[Ingredient]
    val_accuracy: Mapping[str, float]
    reference: Mapping[str, TensorInfo]
    options: SoupOptions
    score: Callable[[dict[str, torch.Tensor], int], float]  # val accuracy of a soup of k ingredients, as published
    model: torch.nn.Module
    val: SplitData
    eval_batch_size: int = 256


@dataclass(frozen=True)
class SoupMethod:
    name: str
    cook: Callable[[SoupContext], Soup]
    color: str  # in the report's figures

    @property
    def kind(self) -> str:
        """Its `kind` in results.csv."""
        return f"{self.name}_soup"


# The one registry: the config's allowed methods, results.csv's kinds and the report's colours all come from it.
SOUP_METHODS: dict[str, SoupMethod] = {}


def soup_method(name: str, color: str):
    def register(cook: Callable[[SoupContext], Soup]) -> Callable[[SoupContext], Soup]:
        SOUP_METHODS[name] = SoupMethod(name, cook, color)
        return cook
    return register


def accepts(score: float, best: float, rule: str) -> bool:
    return score >= best if rule == ">=" else score > best


def rank(ingredients: Sequence[Ingredient], val_accuracy: Mapping[str, float]) -> list[Ingredient]:
    return sorted(ingredients, key=lambda i: -val_accuracy[i.id])  # stable: ties keep sweep order


@soup_method("uniform", color="#1f77b4")
def uniform_soup(ctx: SoupContext) -> Soup:
    return Soup("uniform", list(ctx.ranked), [1.0] * len(ctx.ranked))


@soup_method("greedy", color="#d62728")
def greedy_soup(ctx: SoupContext) -> Soup:
    """Recipe 1 of the paper: add the next-best ingredient if val accuracy does not drop. N-1 evaluations."""
    accumulate = ACCUMULATE[ctx.options.accumulate]
    best, *rest = ctx.ranked
    chosen, total, best_score = [best], weighted_sum(ctx.store, [best], None, accumulate, ctx.reference), ctx.val_accuracy[best.id]
    trajectory = [{"ingredient": best.id, "individual_val": best_score, "soup_val": best_score, "accepted": True, "size": 1}]
    for ingredient in rest:
        candidate = weighted_sum(ctx.store, [ingredient], None, accumulate, ctx.reference, onto=total)
        average = {name: mean_of(value, float(len(chosen) + 1), ctx.reference[name].dtype) for name, value in candidate.items()}
        score = ctx.score(average, len(chosen) + 1)
        accepted = accepts(score, best_score, ctx.options.rule)
        if accepted:
            chosen, total, best_score = chosen + [ingredient], candidate, score
        trajectory.append({"ingredient": ingredient.id, "individual_val": ctx.val_accuracy[ingredient.id],
                           "soup_val": score, "accepted": accepted, "size": len(chosen)})
    return Soup("greedy", chosen, [1.0] * len(chosen), trajectory)


@soup_method("learned", color="#9467bd")
def learned_soup(ctx: SoupContext) -> Soup:
    """Mixing weights (softmax of logits, global or one set per tensor) fitted on val by gradient descent."""
    loaded = [weighted_sum(ctx.store, [i], None, torch.float32, ctx.reference) for i in ctx.ranked]
    stacks = {name: torch.stack([state[name] for state in loaded]) for name in loaded[0] if loaded[0][name].is_floating_point()}
    fixed = {name: value for name, value in loaded[0].items() if name not in stacks}
    del loaded
    rows = {name: (i if ctx.options.learned_granularity == "per-layer" else 0) for i, name in enumerate(stacks)}
    alpha = torch.zeros(max(rows.values()) + 1, len(ctx.ranked), requires_grad=True)
    optimizer = torch.optim.Adam([alpha], lr=0.05)
    parameters = dict(ctx.model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    ctx.model.eval()
    for _ in range(ctx.options.learned_steps):
        index = torch.randperm(len(ctx.val), generator=generator)[: ctx.eval_batch_size]
        weights = torch.softmax(alpha, dim=1)
        # BatchNorm statistics follow the current weights but take no gradient
        state = {**mix(stacks, {name: weights[row] if name in parameters else weights[row].detach()
                                for name, row in rows.items()}), **fixed}
        logits = logits_of(functional_call(ctx.model, state, args=(), kwargs=ctx.val.batch(index)))
        loss = F.cross_entropy(logits, ctx.val.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights = torch.softmax(alpha.detach(), dim=1)
    return Soup("learned", list(ctx.ranked), {name: weights[rows[name]].tolist() for name in stacks} | {
        name: [1.0] + [0.0] * (len(ctx.ranked) - 1) for name in fixed})


def mix(stacks: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sum_i w_i * theta_i per tensor, differentiable in w (stacks hold [N, *shape])."""
    return {name: torch.tensordot(weights[name], stack, dims=1) for name, stack in stacks.items()}


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


def ensemble_logits(logits: Sequence[np.ndarray]) -> np.ndarray:
    """Log of the mean predicted probability of the members: an output ensemble, as log-probabilities."""
    probs = np.mean([np.exp(log_softmax(x.astype(np.float64), axis=1)) for x in logits], axis=0)
    return np.log(np.clip(probs, 1e-300, None))


def greedy_ensemble(ranked: Sequence[str], val_logits: Mapping[str, np.ndarray], labels: np.ndarray, rule: str = ">=") -> list[str]:
    """The greedy recipe applied to output ensembles, from stored val logits: no forward pass."""

    def accuracy(members: list[str]) -> float:
        return float((ensemble_logits([val_logits[m] for m in members]).argmax(1) == labels).mean())

    chosen = [ranked[0]]
    best = accuracy(chosen)
    for member in ranked[1:]:
        score = accuracy(chosen + [member])
        if accepts(score, best, rule):
            chosen, best = chosen + [member], score
    return chosen

