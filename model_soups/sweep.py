"""Search space -> ingredient specs with stable ids."""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model_soups.config import ConfigError, Range, SearchSpace, StopRule, describe_validation_error
from model_soups.recipes.base import Recipe, stable_hash
from model_soups.records import Hparams
from model_soups.storage import as_url


class IngredientSpec(BaseModel):
    """One ingredient: fine-tuned from the pretrained start with `hparams`, or an existing checkpoint."""

    model_config = ConfigDict(frozen=True)
    id: str
    hparams: Hparams = Field(default_factory=dict)
    checkpoint: str | None = None


class StopRound(BaseModel):
    """One round of a sweep that stops when the soup stops gaining (sweep.stop)."""

    index: int
    fine_tunes: list[str]  # the ingredients launched in this round
    soup: list[str]  # the greedy soup of every completed ingredient so far
    soup_val: float
    gain: float  # soup_val minus the round before's (the first round: its soup_val)


class SweepStop(BaseModel):
    """Where a sweep with sweep.stop ended: its rounds, and how many of the planned fine-tunes it ran."""

    planned: int
    rounds: list[StopRound]

    @property
    def fine_tuned(self) -> int:
        return sum(len(r.fine_tunes) for r in self.rounds)

    @property
    def saved(self) -> int:
        return self.planned - self.fine_tuned


def ingredient_id(recipe: Recipe, fingerprint: str, hparams: Hparams) -> str:
    return stable_hash({"recipe": recipe.describe(), "fingerprint": fingerprint, "hparams": hparams})


def search_space(space: SearchSpace, recipe: Recipe) -> dict[str, list[Any] | Range]:
    """The hyperparameters searched, checked. A random or soup-aware search varies the recipe's defaults too,
    unless overridden; a grid spans only what is given."""
    defaults = SearchSpace(params=recipe.default_search).params if space.strategy != "grid" else {}
    params = {**defaults, **space.params}
    allowed = recipe.Hyperparameters.model_fields
    for name, values in params.items():
        if name not in allowed:
            raise ConfigError(f"sweep.params.{name}: not a hyperparameter of recipe {recipe.name!r}; allowed: {', '.join(allowed)}")
        if isinstance(values, list) and not values:
            raise ConfigError(f"empty sweep: sweep.params.{name} has no values; give at least one")
    return params


def expand(space: SearchSpace, recipe: Recipe, fingerprint: str) -> list[IngredientSpec]:
    """The ingredients known before any training: a grid's or a random search's, and existing checkpoints. A
    soup-aware search proposes its fine-tunes round by round (`soup_sweep`): only its checkpoints are here."""
    params = search_space(space, recipe)
    if space.strategy == "soup-aware":
        samples = []
    elif space.strategy == "grid":
        ranges = [name for name, values in params.items() if not isinstance(values, list)]
        if ranges:
            raise ConfigError(f"sweep.params.{ranges[0]}: a range needs strategy 'random'; a grid takes a list of values")
        names = list(params)
        samples = [dict(zip(names, combo)) for combo in itertools.product(*(params[n] for n in names))]
    else:
        rng = random.Random(space.seed)
        samples = [{name: _draw(values, rng) for name, values in params.items()} for _ in range(space.n)]

    specs: dict[str, IngredientSpec] = {}
    for sample in samples:
        hparams = validate_hparams(recipe, sample)
        spec_id = ingredient_id(recipe, fingerprint, hparams)
        specs.setdefault(spec_id, IngredientSpec(id=spec_id, hparams=hparams))
    for url in map(as_url, space.checkpoints):  # a plain or relative path is a file:// URL
        spec_id = "ckpt-" + hashlib.sha256(url.encode()).hexdigest()[:12]
        specs.setdefault(spec_id, IngredientSpec(id=spec_id, checkpoint=url))
    if not specs and space.strategy != "soup-aware":
        raise ConfigError("empty sweep: no ingredients. Give sweep.n >= 1, sweep.params with values, or sweep.checkpoints")
    return list(specs.values())


def validate_hparams(recipe: Recipe, sample: Hparams) -> Hparams:
    try:
        hparams = recipe.Hyperparameters.model_validate(sample)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, recipe.Hyperparameters, "invalid sweep.params", "sweep.params.")) from None
    if hparams.mixup > 0 and not recipe.supports_mixup:
        raise ConfigError(f"sweep.params.mixup: recipe {recipe.name!r} does not support mixup; use 0")
    if hparams.augment > 0 and not recipe.supports_augment:
        raise ConfigError(f"sweep.params.augment: recipe {recipe.name!r} has no augmentation; use 0")
    return hparams.model_dump()


def _draw(values: list[Any] | Range, rng: random.Random) -> Any:
    if isinstance(values, list):
        return rng.choice(values)
    if values.log:
        return short(math.exp(rng.uniform(math.log(values.low), math.log(values.high))))
    return short(rng.uniform(values.low, values.high))


def short(value: float) -> float:
    return float(f"{value:.3g}")  # short, stable values make readable ids and reports


def stop_rounds(specs: list[IngredientSpec], rule: StopRule) -> list[list[IngredientSpec]]:
    """The planned ingredients in sweep order, cut into rounds: `rule.first`, then `rule.batch` at a time."""
    cuts = [0, *range(min(rule.first, len(specs)), len(specs), rule.batch), len(specs)]
    return [specs[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


def stalled(rounds: list[StopRound], rule: StopRule) -> bool:
    """The last `rule.patience` rounds (the first never counts) each raised the greedy soup's val accuracy by less
    than `rule.min_gain`: the sweep stops."""
    gains = [r.gain for r in rounds[1:]]
    return len(gains) >= rule.patience and all(gain < rule.min_gain for gain in gains[-rule.patience:])
