"""The soup methods' bodies: one `@soup_method` function per method declared in methods.py.

Every soup method receives a `SoupContext` and its own options, and returns a `Soup`: which ingredients, with
which weights (global or per tensor), applied by the streamed `merge.weighted_average`; or, for the task-vector
methods (WiSE-FT, task arithmetic, TIES, DARE, Model Stock), which ingredients and which `TaskMerge` of their
deltas from the pretrained start (`task_vectors`).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from itertools import groupby
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from model_soups import task_vectors
from model_soups.config import SoupOptions
from model_soups.learned import SubsetAdam, by_length, project_gradients, stream
from model_soups.merge import Checkpoints, Ingredient, mean_of, weighted_average, weighted_sum
from model_soups.methods import (SOUP_METHODS, DareOptions, DareTiesOptions, LearnedOptions, TaskArithmeticOptions,
                                 TiesOptions, WiseFTBestOptions, WiseFTOptions)
from model_soups.recipes.base import SplitData, logits_of
from model_soups.records import GreedyStep, SearchStep, Step, StockStep, TaskMerge
from model_soups.storage import TensorInfo


def accumulation(configured: str, reference: Mapping[str, TensorInfo]) -> torch.dtype:
    """The dtype of running sums: `soup.accumulate`, or float64 where the checkpoints hold float64 (never below
    their own precision)."""
    return torch.float64 if any(info.dtype == torch.float64 for info in reference.values()) else getattr(torch, configured)


@dataclass
class Soup:
    method: str
    ingredients: list[Ingredient]
    weights: list[float] | dict[str, list[float]]
    trajectory: list[Step] = field(default_factory=list)
    task: TaskMerge | None = None  # theta_0 + scale * combine(deltas of the ingredients), instead of the weights
    scored: int | None = None  # the call of `SoupContext.score` (from 0) that scored these very weights, if one did

    @property
    def members(self) -> int:
        """The models mixed: the ingredients, and the pretrained start in a task-vector merge."""
        return len(self.ingredients) + (self.task is not None)


@dataclass
class SoupContext:
    """What a soup method may use. `ranked` is sorted by val accuracy, best first; `pretrained` is the start every
    ingredient was fine-tuned from; `base` holds the ingredients of the soup a method builds on (`builds_on`).
    `store` opens every checkpoint: in a cooking run its `Pantry`, which reads and checks each one once."""

    store: Checkpoints
    ranked: list[Ingredient]
    val_accuracy: Mapping[str, float]
    reference: Mapping[str, TensorInfo]
    accumulate: torch.dtype  # of running sums (soup.accumulate)
    rule: str  # soup.rule: a greedy soup takes an ingredient when val is >= (or >) the soup's so far
    score: Callable[[dict[str, torch.Tensor], int], float]  # val accuracy of a soup of k ingredients, as published
    model: torch.nn.Module
    val: SplitData
    eval_batch_size: int = 256
    pretrained: Ingredient | None = None
    base: list[Ingredient] | None = None
    device: str = "cpu"  # where the learned soup fits its weights
    search: str = "grid"  # soup.search: how `search` walks each line of a grid


Cook = Callable[[SoupContext, Any], Soup]  # a method's body: what every method may use, and its own options
COOKS: dict[str, Cook] = {}


def soup_method(name: str):
    def register(cook: Cook) -> Cook:
        if name not in SOUP_METHODS:
            raise ValueError(f"soup method {name!r} is not declared in model_soups/methods.py")
        COOKS[name] = cook
        return cook
    return register


def cook(method: str, ctx: SoupContext, soup_options: SoupOptions) -> Soup:
    """One method's soup, its body given its own section of `soup_options` (None for a method without options)."""
    declared = SOUP_METHODS[method]
    return COOKS[method](ctx, getattr(soup_options, method) if declared.options is not None else None)


def accepts(score: float, best: float, rule: str) -> bool:
    return score >= best if rule == ">=" else score > best


def rank(ingredients: Sequence[Ingredient], val_accuracy: Mapping[str, float]) -> list[Ingredient]:
    return sorted(ingredients, key=lambda i: -val_accuracy[i.id])  # stable: ties keep sweep order


@soup_method("uniform")
def uniform_soup(ctx: SoupContext, o: None = None) -> Soup:
    return Soup("uniform", list(ctx.ranked), [1.0] * len(ctx.ranked))


@soup_method("greedy")
def greedy_soup(ctx: SoupContext, o: None = None) -> Soup:
    """Recipe 1 of the paper: add the next-best ingredient if val accuracy does not drop. N-1 evaluations."""
    best, *rest = ctx.ranked
    chosen, total, best_score = [best], weighted_sum(ctx.store, [best], None, ctx.accumulate, ctx.reference), ctx.val_accuracy[best.id]
    trajectory = [GreedyStep(ingredient=best.id, individual_val=best_score, soup_val=best_score, accepted=True, size=1)]
    scored = None
    for call, ingredient in enumerate(rest):  # one score each
        candidate, score = with_one_more(ctx, total, len(chosen), ingredient)
        accepted = accepts(score, best_score, ctx.rule)
        if accepted:
            chosen, total, best_score, scored = chosen + [ingredient], candidate, score, call
        trajectory.append(GreedyStep(ingredient=ingredient.id, individual_val=ctx.val_accuracy[ingredient.id],
                                     soup_val=score, accepted=accepted, size=len(chosen)))
    return Soup("greedy", chosen, [1.0] * len(chosen), trajectory, scored=scored)


def with_one_more(ctx: SoupContext, total: Mapping[str, torch.Tensor], size: int,
                  ingredient: Ingredient) -> tuple[dict[str, torch.Tensor], float]:
    """A running sum of `size` ingredients with one more added, and the val score of that average."""
    candidate = weighted_sum(ctx.store, [ingredient], None, ctx.accumulate, ctx.reference, onto=total)
    average = {name: mean_of(value, float(size + 1), ctx.reference[name].dtype) for name, value in candidate.items()}
    return candidate, ctx.score(average, size + 1)


@soup_method("learned")
def learned_soup(ctx: SoupContext, o: LearnedOptions) -> Soup:
    """Mixing weights (a softmax per tensor, or one global) fitted on val by Adam, a few ingredients per step.

    The gradient of the loss in the weight of ingredient i is a projection, w_i * <dL/dtheta, theta_i - theta> per
    tensor (theta the mix), so no ingredient is held. Each step draws `models_per_step` ingredients (MEHL-Soup's
    batch of models), runs one forward and backward pass of the mixed model, projects each tensor's gradient on
    those ingredients' tensor as soon as backward has made it (then frees it), and updates the mix in place by
    reading the drawn ingredients again. The others keep their logits, so their share of the mix only rescales.
    A batch of sequences runs in parts of similar length (`learned.by_length`), whose gradients add up in .grad
    until the last part's backward projects them. Memory is the model plus one tensor's gradient (the whole
    gradient between parts of sequences) and one read tensor, whatever N, besides what the pantry holds
    (`execution.cook_memory_mb`; with none held, each read comes from local disk); with models_per_step >= N every
    step is the full gradient.
    """
    n = len(ctx.ranked)
    model = ctx.model.to(ctx.device).eval()
    state = model.state_dict(keep_vars=True)
    tensors = {name: t for name, t in state.items() if t.is_floating_point()}
    rows = {name: i if o.granularity == "per-layer" else 0 for i, name in enumerate(tensors)}
    alpha = torch.zeros(max(rows.values(), default=0) + 1, n, dtype=torch.float64)
    adam = SubsetAdam(alpha, o.lr)
    batches, draws = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    labels = ctx.val.labels.to(ctx.device)
    scratch = torch.empty(max(info.end - info.begin for info in ctx.reference.values()), dtype=torch.uint8)  # one read
    store, ranked = ctx.store, ctx.ranked
    with torch.no_grad():  # the uniform soup
        for t in tensors.values():
            t.zero_()
        for j, name, tensor in stream(store, ranked, state, scratch):
            if name in tensors:
                tensors[name].add_(tensor.to(ctx.device, tensors[name].dtype), alpha=1 / n)
            elif j == 0:  # integer buffers: the first ingredient's
                state[name].copy_(tensor)

    def backward(part: torch.Tensor, batch: int) -> None:
        """Backward of the batch's mean loss over the examples of `part`."""
        inputs = {name: value.to(ctx.device) for name, value in ctx.val.batch(part).items()}
        loss = F.cross_entropy(logits_of(model(**inputs)), labels[part.to(ctx.device)])
        (loss * (len(part) / batch)).backward()

    for _ in range(o.steps):
        step = list(range(n)) if o.models_per_step >= n else \
            sorted(torch.randperm(n, generator=draws)[: o.models_per_step].tolist())
        index = torch.randperm(len(ctx.val), generator=batches)[: ctx.eval_batch_size]
        *first, last = by_length(ctx.val, index)
        for part in first:  # their gradients add up in .grad; the last part's backward projects the sum
            backward(part, len(index))
        with ExitStack() as files:
            readers = [files.enter_context(store.open_checkpoint(ranked[i].url)) for i in step]
            with project_gradients(model, rows, len(alpha), readers, scratch) as (mixed, projected):
                backward(last, len(index))
        before = torch.softmax(alpha, dim=1)
        start = torch.logsumexp(alpha, dim=1)
        # dL/dalpha_i = w_i * (<g, theta_i> - <g, theta>) per row
        adam.step(step, before[:, step] * (projected - mixed[:, None]))
        after = torch.softmax(alpha, dim=1)
        # the ingredients left out keep their logits, so their terms only rescale, by `keep`: the mix is updated
        # in place from the step's members alone (and rebuilt from them when they are all N)
        keep = torch.zeros(len(alpha), dtype=torch.float64) if len(step) == n else \
            torch.exp(start - torch.logsumexp(alpha, dim=1))
        add = after[:, step] - keep[:, None] * before[:, step]
        with torch.no_grad():
            for name, t in tensors.items():
                t.mul_(float(keep[rows[name]]))
            for j, name, tensor in stream(store, [ranked[i] for i in step], tensors, scratch):
                tensors[name].add_(tensor.to(ctx.device, tensors[name].dtype), alpha=float(add[rows[name], j]))
    weights = torch.softmax(alpha, dim=1)
    return Soup("learned", list(ctx.ranked), {name: weights[rows[name]].tolist() for name in tensors} | {
        name: [1.0] + [0.0] * (n - 1) for name, info in ctx.reference.items() if not info.dtype.is_floating_point})


def search(ctx: SoupContext, method: str, ingredients: list[Ingredient], merges: list[TaskMerge]) -> Soup:
    """Score candidate merges on val and keep the best (the first of equals, in the order given). Candidates that
    differ only in `scale` form a line, which shares one pass over the checkpoints; each line is searched as
    `ctx.search` says (every candidate, or `coarse_to_fine` along its scales). Each candidate scored is one
    evaluation; the trajectory holds those scored, in the order given."""
    accumulate = ctx.accumulate
    theta0 = task_vectors.start(ctx.store, ctx.pretrained, accumulate, ctx.reference)
    trajectory: list[SearchStep] = []
    candidates: list[TaskMerge] = []
    calls: list[int] = []  # the score call of each candidate in the trajectory
    for shape, line in groupby(merges, key=lambda m: replace(m, scale=1.0)):
        line = list(line)
        tau = task_vectors.task_vector(ctx.store, theta0, ingredients, shape, accumulate, ctx.reference)
        by_scale = sorted(range(len(line)), key=lambda i: line[i].scale)
        called: dict[int, int] = {}

        def score(position: int) -> float:
            called[by_scale[position]] = len(calls) + len(called)
            scale = line[by_scale[position]].scale
            return ctx.score(task_vectors.apply(theta0, tau, scale, ctx.reference), len(ingredients) + 1)

        scored = ({p: score(p) for p in range(len(line))} if ctx.search == "grid" else
                  coarse_to_fine(len(line), score))
        scores = {by_scale[p]: value for p, value in scored.items()}
        trajectory += [SearchStep(**asdict(line[i]), soup_val=scores[i]) for i in sorted(scores)]
        candidates += [line[i] for i in sorted(scores)]
        calls += [called[i] for i in sorted(scores)]
        del tau
    best = max(range(len(trajectory)), key=lambda i: (trajectory[i].soup_val, -i))
    trajectory[best] = trajectory[best].model_copy(update={"chosen": True})
    return Soup(method, list(ingredients), [1.0] * len(ingredients), trajectory, candidates[best], scored=calls[best])


def coarse_to_fine(n: int, score: Callable[[int], float]) -> dict[int, float]:
    """Scores of some of the points 0..n-1 of a line sorted by scale: every other point and the last, then the best
    one's unscored neighbours, climbing on while a neighbour scores higher. Wherever the score rises then falls
    along the line, the best point is the one scoring every point finds, for about n/2 + 2 scores."""
    scores = {p: score(p) for p in sorted({*range(0, n, 2), n - 1})}
    while True:
        best = max(scores, key=lambda p: (scores[p], -p))
        fresh = [p for p in (best - 1, best + 1) if 0 <= p < n and p not in scores]
        if not fresh:
            return scores
        scores.update({p: score(p) for p in fresh})


@soup_method("wiseft")
def wiseft_soup(ctx: SoupContext, o: WiseFTOptions) -> Soup:
    return search(ctx, "wiseft", ctx.base, [TaskMerge("mean", a) for a in o.alpha])


@soup_method("wiseft_best")
def wiseft_best(ctx: SoupContext, o: WiseFTBestOptions) -> Soup:
    return search(ctx, "wiseft_best", ctx.ranked[:1], [TaskMerge("mean", a) for a in o.alpha])


@soup_method("task_arithmetic")
def task_arithmetic(ctx: SoupContext, o: TaskArithmeticOptions) -> Soup:
    return search(ctx, "task_arithmetic", ctx.ranked, [TaskMerge("sum", x) for x in o.scale])


@soup_method("ties")
def ties(ctx: SoupContext, o: TiesOptions) -> Soup:
    return search(ctx, "ties", ctx.ranked, [TaskMerge("ties", x, top_k=k) for k in o.top_k for x in o.scale])


@soup_method("dare")
def dare(ctx: SoupContext, o: DareOptions) -> Soup:
    return search(ctx, "dare", ctx.ranked, [TaskMerge("sum", x, drop=p, seed=o.seed) for p in o.drop for x in o.scale])


@soup_method("dare_ties")
def dare_ties(ctx: SoupContext, o: DareTiesOptions) -> Soup:
    return search(ctx, "dare_ties", ctx.ranked, [TaskMerge("ties", x, drop=p, seed=o.seed) for p in o.drop for x in o.scale])


@soup_method("model_stock")
def model_stock(ctx: SoupContext, o: None = None) -> Soup:
    merge, stock, accumulate = TaskMerge("model_stock"), {}, ctx.accumulate
    theta0 = task_vectors.start(ctx.store, ctx.pretrained, accumulate, ctx.reference)
    task_vectors.task_vector(ctx.store, theta0, ctx.ranked, merge, accumulate, ctx.reference, stock)
    trajectory = [StockStep(tensor=name, cosine=cosine, t=t) for name, (cosine, t) in stock.items()]
    return Soup("model_stock", list(ctx.ranked), [1.0] * len(ctx.ranked), trajectory, merge)


def soup_state(store: Checkpoints, soup: Soup, pretrained: Ingredient | None, reference: Mapping[str, TensorInfo],
               accumulate: torch.dtype) -> dict[str, torch.Tensor]:
    """The soup's weights, computed exactly as its method scored them."""
    if soup.task is None:
        return weighted_average(store, soup.ingredients, soup.weights, accumulate, reference)
    theta0 = task_vectors.start(store, pretrained, accumulate, reference)
    tau = task_vectors.task_vector(store, theta0, soup.ingredients, soup.task, accumulate, reference)
    return task_vectors.apply(theta0, tau, soup.task.scale, reference)
