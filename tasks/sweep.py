"""The soup-aware sweep's rounds as Prefect tasks: propose, fine-tune (`fan_out`), score; a table of the rounds."""

from __future__ import annotations

from typing import Callable

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from model_soups import soup_sweep
from model_soups.config import RunConfig
from model_soups.cooking import greedy_gains
from model_soups.ingredients import make_plan, open_storage
from model_soups.records import FailedIngredient, IngredientRecord, PretrainedRecord, SweepRound
from tasks import QUIET, artifact_key
from tasks.ingredients import fan_out


@task(name="propose-round", task_run_name="propose-round-{index}", **QUIET)
def propose_round(config: RunConfig, key: str, index: int, history: list[SweepRound]) -> SweepRound:
    """The round's proposals: read back when stored (a re-run), else asked of the sampler and stored first."""
    store, layout = open_storage(config)
    url = layout.sweep_round(key, index)
    if store.exists(url):
        stored = SweepRound.read(store, url)
        get_run_logger().info(f"round {index}: {len(stored.trials)} proposals read back from storage")
        return stored.model_copy(update={"reused": True})
    plan = make_plan(config)
    proposed = soup_sweep.propose(config, plan.recipe, plan.fingerprint, history)
    proposed.write(store, url)
    get_run_logger().info(f"round {index}: proposed {[t.hparams for t in proposed.trials]}")
    return proposed


@task(name="score-round", task_run_name="score-round-{proposed.index}", **QUIET)
def score_round(config: RunConfig, key: str, pretrained: PretrainedRecord, proposed: SweepRound,
                members: list[IngredientRecord], joined: list[IngredientRecord], val_accuracy: dict[str, float]) -> SweepRound:
    """Each proposal's gain to the greedy soup of `members` (the rounds before; in the first round, its best)."""
    if proposed.scored:
        return proposed
    log = get_run_logger().info
    store, layout = open_storage(config)
    plan = make_plan(config)
    if not members:  # the first round: the soup is its best fine-tune alone
        members = sorted(joined, key=lambda m: -val_accuracy[m.id])[:1]
    if not members:  # nothing completed yet: every proposal failed
        return proposed.model_copy(update={"trials": [t.model_copy(update={"value": soup_sweep.FAILED}) for t in proposed.trials],
                                           "soup_val": 0.0})
    soup, soup_val, gains = greedy_gains(config, plan.recipe, pretrained, members, [m for m in joined if m not in members],
                                         val_accuracy, log)
    gains |= {m.id: 0.0 for m in members if m in joined}
    trials = [t.model_copy(update={"value": gains.get(t.id, soup_sweep.FAILED)}) for t in proposed.trials]
    scored = proposed.model_copy(update={"trials": trials, "soup": soup, "soup_val": soup_val})
    scored.write(store, layout.sweep_round(key, proposed.index))
    log(f"round {proposed.index}: greedy soup of {len(soup)} at val {soup_val:.4f}; gains "
        + ", ".join(f"{t.id[:8]} {t.value:+.4f}" for t in trials))
    return scored


def soup_aware(config: RunConfig, pretrained: PretrainedRecord, in_flight: int,
               ready: Callable[[IngredientRecord], None],
               val_of: Callable[[IngredientRecord], float]) -> tuple[list[IngredientRecord], list[FailedIngredient]]:
    """Rounds of propose, fine-tune (evaluations start as each is verified: `ready`), score, until sweep.n
    fine-tunes; a table artifact shows every round. Returns the completed ingredients and those left out."""
    logger = get_run_logger()
    plan = make_plan(config)
    key = soup_sweep.sweep_key(config, plan.recipe, plan.fingerprint)
    logger.info(f"soup-aware sweep {key}: {config.sweep.n} fine-tunes, {config.sweep.initial} at random, then rounds of "
                f"{config.sweep.batch}")
    history: list[SweepRound] = []
    metas: list[IngredientRecord] = []
    failed: list[FailedIngredient] = []
    while not soup_sweep.done(config, history):
        proposed = propose_round(config, key, len(history), history)
        joined, left_out = fan_out(config, pretrained, soup_sweep.specs(proposed), in_flight, ready)
        val_accuracy = {m.id: val_of(m) for m in metas + joined}
        history.append(score_round(config, key, pretrained, proposed, metas, joined, val_accuracy))
        metas, failed = metas + joined, failed + left_out
        gain = "fall in val NLL" if config.sweep.objective == "nll" else "rise in val accuracy"
        create_table_artifact(key=artifact_key(config, "sweep-rounds"), description=(
            f"soup-aware sweep {key}: each round's fine-tunes, scored by their gain to the greedy soup of the rounds "
            f"before ({gain} when one joins it; -1: failed)"), table=[
            {"round": r.index, "fine-tunes": len(r.trials), "greedy soup before": len(r.soup),
             "its val accuracy %": round(100 * r.soup_val, 2), f"best gain ({gain})": round(max(t.value for t in r.trials), 4),
             "proposals (id gain)": "; ".join(f"{t.id[:8]} {t.value:+.4f}" for t in r.trials)} for r in history])
    return metas, failed
