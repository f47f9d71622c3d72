"""Sweeps in rounds: the soup-aware sweep's (propose, fine-tune with `fan_out`, score) and a planned sweep that stops
when the greedy soup stops gaining (sweep.stop); a table artifact of the rounds for each."""

from __future__ import annotations

from typing import Callable

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from model_soups import soup_sweep, sweep
from model_soups.config import RunConfig
from model_soups.cooking import greedy_gains
from model_soups.ingredients import make_plan, open_storage
from model_soups.records import FailedIngredient, IngredientRecord, PretrainedRecord, StopRound, SweepRound, SweepStop
from model_soups.sweep import IngredientSpec
from tasks import QUIET, artifact_key
from tasks.cooking import cook_soup
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


def stop_early(config: RunConfig, pretrained: PretrainedRecord, specs: list[IngredientSpec], in_flight: int,
               ready: Callable[[IngredientRecord], None],
               val_of: Callable[[IngredientRecord], float]) -> tuple[list[IngredientRecord], list[FailedIngredient], SweepStop]:
    """Fine-tune the planned sweep in rounds (sweep.stop). After each round the greedy soup of every completed
    ingredient is cooked (a stored soup is reused, so a re-run resumes and stops where the first run did), and the
    sweep stops once it has stopped gaining on val. Returns the completed ingredients, those left out, and the rounds."""
    logger = get_run_logger()
    rule = config.sweep.stop
    metas: list[IngredientRecord] = []
    failed: list[FailedIngredient] = []
    rounds: list[StopRound] = []
    for index, batch in enumerate(sweep.stop_rounds(specs, rule)):
        joined, left_out = fan_out(config, pretrained, batch, in_flight, ready)
        metas, failed = metas + joined, failed + left_out
        members, soup_val = [], 0.0
        if metas:  # only completed ingredients: a failed one never joins a soup
            soup = cook_soup(config, pretrained, metas, {m.id: val_of(m) for m in metas}, "greedy")
            members, soup_val = soup.ingredients, soup.metrics["val"].accuracy
        gain = soup_val - (rounds[-1].soup_val if rounds else 0.0)
        rounds.append(StopRound(index=index, fine_tunes=[s.id for s in batch], soup=members, soup_val=soup_val, gain=gain))
        logger.info(f"stop round {index}: {len(batch)} fine-tunes ({len(left_out)} left out); greedy soup of "
                    f"{len(members)} at val {soup_val:.4f} ({gain:+.4f})")
        create_table_artifact(key=artifact_key(config, "sweep-stop"), description=(
            f"sweep.stop: the greedy soup after each round of fine-tunes; the sweep stops after {rule.patience} round(s) "
            f"in a row that each gain less than {100 * rule.min_gain:g} val points (the first round never counts)"), table=[
            {"round": r.index, "fine-tunes": len(r.fine_tunes), "greedy soup keeps": len(r.soup),
             "its val accuracy %": round(100 * r.soup_val, 2), "gain (points)": round(100 * r.gain, 2) if r.index else ""}
            for r in rounds])
        if sweep.stalled(rounds, rule):
            break
    stop = SweepStop(planned=len(specs), rounds=rounds)
    logger.info(f"sweep.stop: {stop.fine_tuned} of {stop.planned} planned fine-tunes in {len(rounds)} rounds, "
                f"{stop.saved} saved")
    return metas, failed, stop
