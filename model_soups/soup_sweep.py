"""A soup-aware sweep: fine-tunes chosen round by round for what they add to the greedy soup.

The first round draws `sweep.initial` hyperparameter sets at random. Every later round asks Optuna's TPE
sampler (ask-and-tell) for `sweep.batch` more, and the value told for each is its gain to the greedy soup of
the rounds before: how much that soup's val NLL falls when the candidate joins it (`sweep.objective: nll`,
the default), or how much its val accuracy rises (`accuracy`: at 98% on 600 examples, a gain of a few
examples or none, too coarse for the sampler to learn from). A fine-tune that fails or diverges counts -1.
In the first round, the soup is its best fine-tune alone. So the sampler learns which hyperparameters make
good *ingredients*, which is not the same as good models: a fine-tune that lands far from the others scores
well alone and averages badly.

Each round is stored (sweeps/<key>/round-NNN.json) with its proposals before they are fine-tuned, and with
their values once scored. Every round rebuilds the study from the stored rounds and asks with a sampler
seeded by (sweep seed, round), so a re-run asks exactly what the first run asked and resumes where it
stopped.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from model_soups.config import Range, SearchSpace
from model_soups.context import Plan
from model_soups.recipes.base import Recipe, stable_hash
from model_soups.records import IngredientRecord, SweepRound, SweepTrial
from model_soups.sweep import IngredientSpec, ingredient_id, search_space, short, validate_hparams

FAILED = -1.0  # the value told for a fine-tune that failed or diverged: worse than any gain

optuna.logging.set_verbosity(logging.WARNING)


def sweep_key(sweep: SearchSpace, plan: Plan) -> str:
    """A sweep is its search space, sizes and seed, over one recipe and pretrained start."""
    return stable_hash({"sweep": sweep.model_dump(exclude={"checkpoints", "stop"}), "recipe": plan.recipe.describe(),
                        "fingerprint": plan.fingerprint})


def distributions(sweep: SearchSpace, recipe: Recipe) -> dict[str, BaseDistribution]:
    def one(values: list[Any] | Range) -> BaseDistribution:
        if isinstance(values, Range):
            return FloatDistribution(values.low, values.high, log=values.log)
        return CategoricalDistribution(values)
    return {name: one(values) for name, values in search_space(sweep, recipe).items()}


def round_size(sweep: SearchSpace, index: int, asked: int) -> int:
    """How many fine-tunes round `index` proposes, `asked` having been proposed before it."""
    return min(sweep.initial if index == 0 else sweep.batch, sweep.n - asked)


def propose(sweep: SearchSpace, plan: Plan, history: list[SweepRound]) -> SweepRound:
    """The next round's proposals, from the scored rounds before it (see the module's docstring)."""
    if history and not history[-1].scored:
        raise ValueError(f"round {history[-1].index} is not scored yet; score it before proposing the next")
    recipe, index, space = plan.recipe, len(history), distributions(sweep, plan.recipe)
    size = round_size(sweep, index, sum(len(r.trials) for r in history))
    seed = sweep.seed * 10_000 + index
    sampler = (optuna.samplers.RandomSampler(seed=seed) if index == 0 else
               optuna.samplers.TPESampler(seed=seed, n_startup_trials=0, constant_liar=True, multivariate=True))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for past in (trial for r in history for trial in r.trials):
        study.add_trial(optuna.trial.create_trial(params=past.params, distributions=space, value=past.value))
    known = {t.id for r in history for t in r.trials}
    trials: list[SweepTrial] = []
    for attempt in range(size * 20):  # a proposal already fine-tuned is skipped (told as a failure) and asked again
        if len(trials) == size:
            break
        if attempt == size * 5:  # TPE keeps to what it knows: explore the rest of a small space at random
            study.sampler = optuna.samplers.RandomSampler(seed=seed)
        trial = study.ask(space)
        hparams = validate_hparams(recipe, {k: short(v) if isinstance(space[k], FloatDistribution) else v
                                            for k, v in trial.params.items()})
        spec_id = ingredient_id(recipe, plan.fingerprint, hparams)
        if spec_id in known:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        known.add(spec_id)
        trials.append(SweepTrial(id=spec_id, hparams=hparams, params=trial.params))
    return SweepRound(index=index, trials=trials)


def score(proposed: SweepRound, members: list[IngredientRecord], joined: list[IngredientRecord],
          val_accuracy: dict[str, float],
          gains_of: Callable[[list[IngredientRecord], list[IngredientRecord]], tuple[list[str], float, dict[str, float]]],
          ) -> SweepRound:
    """The round with each proposal's gain to the greedy soup of `members` (the rounds before; in the first round,
    its best fine-tune alone, which gains 0). `gains_of(soup, candidates)` gives that soup, its val and each
    candidate's gain. A proposal that failed is told FAILED; so is every one when none completed."""
    members = members or sorted(joined, key=lambda m: -val_accuracy[m.id])[:1]
    if not members:
        return proposed.model_copy(update={"trials": [t.model_copy(update={"value": FAILED}) for t in proposed.trials],
                                           "soup_val": 0.0})
    soup, soup_val, gains = gains_of(members, [m for m in joined if m not in members])
    gains |= {m.id: 0.0 for m in members if m in joined}
    trials = [t.model_copy(update={"value": gains.get(t.id, FAILED)}) for t in proposed.trials]
    return proposed.model_copy(update={"trials": trials, "soup": soup, "soup_val": soup_val})


def specs(round_: SweepRound) -> list[IngredientSpec]:
    return [IngredientSpec(id=t.id, hparams=t.hparams) for t in round_.trials]


def done(sweep: SearchSpace, history: list[SweepRound]) -> bool:
    return sum(len(r.trials) for r in history) >= sweep.n or bool(history and not history[-1].trials)
