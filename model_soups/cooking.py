"""Cooking: each soup method's soup, scored and published exactly as evaluated, and the output ensembles."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from model_soups import merge, soups
from model_soups.config import SoupOptions
from model_soups.context import RunContext
from model_soups.ensembles import ensemble_logits, greedy_ensemble
from model_soups.evaluate import evaluate_and_store, metrics, predict, recompute_batchnorm, store_logits
from model_soups.merge import Ingredient
from model_soups.methods import SOUP_METHODS
from model_soups.pantry import Pantry
from model_soups.processes import this_device
from model_soups.recipes.base import Recipe, SplitData, stable_hash
from model_soups.records import (BUILD_LEASE_S, EvaluationRecord, IngredientRecord, PretrainedRecord, SoupRecord,
                                 reuse_or_build)
from model_soups.storage import Layout, StorageError, Store

Log = Callable[[str], None]


def ingredients_of(metas: list[IngredientRecord]) -> list[Ingredient]:
    return [Ingredient(m.id, m.checkpoint, m.sha256) for m in metas]


def val_accuracies(evaluations: list[EvaluationRecord]) -> dict[str, float]:
    return {e.id: e.accuracy for e in evaluations if e.split == "val"}


def soup_key(soup_options: SoupOptions, pretrained: PretrainedRecord, metas: list[IngredientRecord],
             val_accuracy: dict[str, float], method: str, base: SoupRecord | None = None) -> str:
    """A soup is determined by its method, the common soup options, its own options, its ingredients and the soup
    it builds on: that is its storage key. Another method's options do not change it."""
    sections = {name for name, m in SOUP_METHODS.items() if m.options is not None}
    options = soup_options.model_dump(exclude={"methods", "final", "ensembles", "search", *sections})
    if SOUP_METHODS[method].searches:
        options["search"] = soup_options.search
    if method in sections:
        options[method] = getattr(soup_options, method).model_dump()
    ingredients = sorted((m.id, m.sha256, val_accuracy[m.id]) for m in metas)
    return stable_hash({"method": method, "options": options, "pretrained": pretrained.sha256, "ingredients": ingredients,
                        **({"base": base.key} if base is not None else {})})


def batchnorm_subset(recipe: Recipe, examples: int) -> SplitData:
    """The fixed train examples on which every multi-ingredient soup, candidates included, re-estimates BatchNorm."""
    train = recipe.dataset("train")
    if len(train) <= examples:
        return train
    return train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:examples].sort().values)


def pantry_for(ctx: RunContext, pretrained: PretrainedRecord, metas: list[IngredientRecord]) -> Pantry:
    """What one cooking run reads its checkpoints through: each read from storage and checked once, held in memory
    within `execution.cook_memory_mb`, whichever soups use it."""
    return Pantry(ctx.store, [Ingredient("pretrained", pretrained.url, pretrained.sha256), *ingredients_of(metas)],
                  ctx.config.execution.cook_memory_mb)


def delta_cosines(pantry: Pantry, pretrained: PretrainedRecord, metas: list[IngredientRecord]) -> list[list[float]]:
    """The pairwise cosines of the ingredients' deltas from the pretrained start, read through the cooking's pantry."""
    start = Ingredient("pretrained", pretrained.url, pretrained.sha256)
    return merge.delta_cosines(pantry, start, ingredients_of(metas)).round(6).tolist()


def cook_soup(ctx: RunContext, pantry: Pantry, pretrained: PretrainedRecord, metas: list[IngredientRecord],
              val_accuracy: dict[str, float], method: str, log: Log, base: SoupRecord | None = None) -> SoupRecord:
    """Cook one soup and evaluate it on every split; the same soup, already stored and verified, is reused. A method
    that builds on another soup (`SoupMethod.builds_on`) is given that soup's record as `base`. Its checkpoints are
    read through `pantry`, which the soups of one cooking run share."""
    if (SOUP_METHODS[method].builds_on is not None) != (base is not None):
        raise ValueError(f"the {method} soup is cooked with the record of the soup it builds on, and only it")
    store, layout = ctx.store, ctx.layout
    key = soup_key(ctx.config.soup, pretrained, metas, val_accuracy, method, base)

    def verify(record: SoupRecord) -> None:
        with store.open_checkpoint(record.checkpoint, record.sha256):
            pass
        for split in ctx.plan.splits:  # its logits, kept for paired comparisons (bench/quality.py)
            url, recorded = layout.soup_logits(key, split), record.logits_sha256.get(split)
            if recorded is None:
                raise StorageError(f"{layout.soup_record(key)}: written before soup logits carried a sha256")
            store.verify_sha256(url, recorded)

    record = reuse_or_build(store, layout.soup_record(key), SoupRecord, verify,
                            lambda: _cook(ctx, pantry, pretrained, metas, val_accuracy, method, key, log, base),
                            f"{method} soup {key}", lease_s=BUILD_LEASE_S)
    if record.reused:
        log(f"{method} soup {key}: reused")
    return record


def _cook(ctx: RunContext, pantry: Pantry, pretrained: PretrainedRecord, metas: list[IngredientRecord],
          val_accuracy: dict[str, float], method: str, key: str, log: Log, base: SoupRecord | None) -> SoupRecord:
    store, layout, recipe = ctx.store, ctx.layout, ctx.recipe
    soup_ctx, scorer = soup_context(ctx, pantry, pretrained, metas, val_accuracy, f"{method} soup", log, base)
    started = time.time()
    soup = soups.cook(method, soup_ctx, ctx.config.soup)
    state = soups.soup_state(pantry, soup, soup_ctx.pretrained, soup_ctx.reference, soup_ctx.accumulate)
    batchnorm = scorer.as_published(state, soup.members)
    model = scorer.model
    model.eval()
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}  # the model may sit on a GPU
    url = layout.soup(key)
    sha = store.save_checkpoint(url, state, {"method": method})
    # logits are kept, as for ingredients, for paired comparisons later; on val, those of the candidate that scored
    # these very weights when there was one (the same model and the same forward pass: no second one)
    evaluated = {split: store_logits(store, layout.soup_logits(key, split), scorer.logits[soup.scored], scorer.val)
                 if split == "val" and soup.scored is not None else
                 evaluate_and_store(store, layout.soup_logits(key, split), model, recipe.dataset(split),
                                    recipe.eval_batch_size) for split in recipe.splits()}
    split_metrics = {split: result for split, (result, _) in evaluated.items()}
    record = SoupRecord(method=method, kind=SOUP_METHODS[method].kind, key=key, checkpoint=url, sha256=sha,
                        ingredients=[i.id for i in soup.ingredients], trajectory=soup.trajectory, weights=soup.weights,
                        task=soup.task,
                        candidate_evaluations=scorer.evaluations, candidate_seconds=round(scorer.seconds, 4),
                        seconds=round(time.time() - started, 3), batchnorm=batchnorm, metrics=split_metrics,
                        logits_sha256={split: sha for split, (_, sha) in evaluated.items()})
    record.write(store, layout.soup_record(key))
    log(f"{method} soup {key}: {len(soup.ingredients)} ingredients, val {split_metrics['val'].accuracy:.4f}, "
        f"{scorer.evaluations} candidate evaluations")
    return record


class Scorer:
    """Val accuracy of a soup's weights, loaded exactly as they are published (`SoupContext.score`)."""

    def __init__(self, recipe: Recipe, soup_options: SoupOptions, what: str, log: Log):
        self.recipe, self.what, self.log = recipe, what, log
        self.val, self.model = recipe.dataset("val"), recipe.build_model()
        self.batchnorm_data = (batchnorm_subset(recipe, soup_options.recompute_bn_examples) if soup_options.recompute_bn
                               else None)
        self.evaluations, self.seconds = 0, 0.0
        self.nll = float("nan")  # of the last soup scored
        self.logits: list[np.ndarray] = []  # on val, of every soup scored, in order

    def as_published(self, state: dict[str, torch.Tensor], n_ingredients: int) -> str:
        """Load `state` into the model exactly as it is published; returns what happened to BatchNorm statistics.
        One ingredient keeps its own statistics, which are exact for its weights."""
        self.model.load_state_dict(state)
        if (self.batchnorm_data is not None and n_ingredients > 1
                and recompute_batchnorm(self.model, self.batchnorm_data, self.recipe.eval_batch_size)):
            return f"recomputed on {len(self.batchnorm_data)} train examples"
        return "averaged" if n_ingredients > 1 else "the ingredient's own"

    def __call__(self, state: dict[str, torch.Tensor], n_ingredients: int) -> float:
        self.evaluations += 1
        started = time.time()
        self.as_published(state, n_ingredients)
        logits = predict(self.model, self.val, self.recipe.eval_batch_size, this_device())
        self.logits.append(logits)
        scored = metrics(logits, self.val.labels.numpy())
        accuracy, self.nll = scored.accuracy, scored.nll
        self.seconds += time.time() - started
        self.log(f"{self.what}: candidate {self.evaluations} val accuracy {accuracy:.4f}")
        return accuracy


def soup_context(ctx: RunContext, pantry: Pantry, pretrained: PretrainedRecord, metas: list[IngredientRecord],
                 val_accuracy: dict[str, float], what: str, log: Log,
                 base: SoupRecord | None = None) -> tuple[soups.SoupContext, Scorer]:
    """What a soup method is given, ingredients ranked by val accuracy, and the scorer behind its `score`."""
    with pantry.open_checkpoint(pretrained.url) as reader:
        reference = reader.info
    options = ctx.config.soup
    scorer = Scorer(ctx.recipe, options, what, log)
    ranked = soups.rank(ingredients_of(metas), val_accuracy)
    by_id = {i.id: i for i in ranked}
    accumulate = soups.accumulation(options.accumulate, reference)
    soup_ctx = soups.SoupContext(pantry, ranked, val_accuracy, reference, accumulate,
                                 options.rule, scorer, scorer.model, scorer.val, ctx.recipe.eval_batch_size,
                                 pretrained=Ingredient("pretrained", pretrained.url, pretrained.sha256),
                                 base=[by_id[i] for i in base.ingredients] if base else None, device=this_device(),
                                 search=options.search)
    return soup_ctx, scorer


def greedy_gains(ctx: RunContext, pretrained: PretrainedRecord, members: list[IngredientRecord],
                 candidates: list[IngredientRecord], val_accuracy: dict[str, float],
                 log: Log) -> tuple[list[str], float, dict[str, float]]:
    """The greedy soup of `members`, its val accuracy, and for each candidate what it gains when it joins that soup
    (a soup-aware sweep's objective, `sweep.objective`): val accuracy, or the fall in val NLL."""
    with pantry_for(ctx, pretrained, members + candidates) as checkpoints:
        soup_ctx, scorer = soup_context(ctx, checkpoints, pretrained, members, val_accuracy, "sweep", log)
        soup = soups.greedy_soup(soup_ctx)
        reference = soup_ctx.reference
        total = merge.weighted_sum(checkpoints, soup.ingredients, None, soup_ctx.accumulate, reference)
        size = len(soup.ingredients)
        soup_val = scorer({name: merge.mean_of(value, float(size), reference[name].dtype) for name, value in total.items()}, size)
        soup_nll, gains = scorer.nll, {}
        for candidate in ingredients_of(candidates):
            _, score = soups.with_one_more(soup_ctx, total, size, candidate)
            gains[candidate.id] = score - soup_val if ctx.config.sweep.objective == "accuracy" else soup_nll - scorer.nll
    return [i.id for i in soup.ingredients], soup_val, gains


def ensemble_rows(store: Store, layout: Layout, metas: list[IngredientRecord], splits: list[str],
                  val_accuracy: dict[str, float], rule: str) -> list[dict]:
    """Ensemble and greedy ensemble from stored logits: no forward pass."""
    stored = {(m.id, s): store.read_arrays(layout.evaluation(m.id, s, "npz")) for m in metas for s in splits}
    ranked = [i.id for i in soups.rank(ingredients_of(metas), val_accuracy)]
    greedy = greedy_ensemble(ranked, {i: stored[(i, "val")]["logits"] for i in ranked}, stored[(ranked[0], "val")]["labels"], rule)
    rows = []
    for kind, members in (("ensemble", ranked), ("greedy_ensemble", greedy)):
        for split in splits:
            labels = stored[(ranked[0], split)]["labels"]
            logits = ensemble_logits([stored[(m, split)]["logits"] for m in members])
            rows.append({"model": kind, "kind": kind, "split": split, **metrics(logits, labels).model_dump(),
                         "n_ingredients": len(members)})
    return rows
