"""The run context: what every stage of a run needs, made once per process from its RunConfig (the plan, the
storage) and handed down, so that no stage takes the config apart again."""

from __future__ import annotations

from dataclasses import dataclass

from model_soups.config import ConfigError, RunConfig
from model_soups.methods import SOUP_METHODS
from model_soups.recipes.base import Recipe, get_recipe
from model_soups.storage import Layout, Store, open_storage
from model_soups.sweep import IngredientSpec, expand


@dataclass
class Plan:
    """Everything decided before any training: checked cheaply, so bad input costs no GPU time."""

    recipe: Recipe
    fingerprint: str
    specs: list[IngredientSpec]
    splits: list[str]


def make_plan(config: RunConfig) -> Plan:
    recipe = get_recipe(config.recipe.name, config.recipe.options)
    fingerprint = recipe.fingerprint()
    specs = expand(config.sweep, recipe, fingerprint)
    if config.soup.final not in config.soup.methods:
        raise ConfigError(f"soup.final: {config.soup.final!r} is not among soup.methods {config.soup.methods}")
    planned = len(specs) + (config.sweep.n if config.sweep.strategy == "soup-aware" else 0)
    unmet = [(why, lower) for needed, why, lower in ingredient_needs(config) if planned < needed]
    if unmet:
        grid = "sweep.strategy grid trains one ingredient per combination of sweep.params, and there are none. " if (
            config.sweep.strategy == "grid" and not config.sweep.params) else ""
        raise ConfigError(f"the sweep plans {planned} ingredient(s), but {' and '.join(why for why, _ in unmet)}. "
                          f"{grid}Give more (sweep.n, more values in sweep.params, or sweep.checkpoints), or "
                          f"{' and '.join(lower for _, lower in unmet)}")
    return Plan(recipe, fingerprint, specs, recipe.splits())


def ingredient_needs(config: RunConfig) -> list[tuple[int, str, str]]:
    """What sets the fewest ingredients a run may cook from: execution.min_ingredients (2 unless lowered on purpose)
    and each cooked soup method's own minimum (Model Stock needs two fine-tunes); each with why and how to lower it."""
    least = config.execution.min_ingredients
    needs = [(least, f"execution.min_ingredients is {least}",
              "set execution.min_ingredients: 1 to train a single model on purpose")]
    return needs + [(SOUP_METHODS[name].min_ingredients,
                     f"soup method {name} needs at least {SOUP_METHODS[name].min_ingredients} (soup.methods)",
                     f"leave {name} out of soup.methods") for name in config.soup.methods]


def fewest_ingredients(config: RunConfig) -> tuple[int, str]:
    """The fewest ingredients a run may cook from, and why."""
    needed, why, _ = max(ingredient_needs(config), key=lambda need: need[0])
    return needed, why


@dataclass(frozen=True)
class RunContext:
    """One run's config, plan and storage, made once per process (`RunContext.of`) and handed to every task and
    library call: the plan's one recipe loads each split once, and nothing takes the config apart again."""

    config: RunConfig
    plan: Plan
    store: Store
    layout: Layout

    @classmethod
    def of(cls, config: RunConfig) -> RunContext:
        """The plan (checked cheaply, before anything is trained) and the storage root of `config`."""
        plan = make_plan(config)
        return cls(config, plan, *open_storage(config.storage, config.experiment))

    @property
    def recipe(self) -> Recipe:
        return self.plan.recipe
