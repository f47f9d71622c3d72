"""Sweeps in rounds: the soup-aware sweep's (propose, fine-tune with `fan_out`, score) and a planned sweep that stops
when the greedy soup stops gaining (sweep.stop); a table artifact of the rounds for each."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from model_soups import soup_sweep, sweep
from model_soups.context import RunContext
from model_soups.cooking import greedy_gains, pantry_for
from model_soups.records import FailedIngredient, IngredientRecord, PretrainedRecord, SweepRound, reuse_or_build
from model_soups.sweep import IngredientSpec, StopRound, SweepStop
from tasks import QUIET, artifact_key
from tasks.cooking import cook_soup
from tasks.evaluation import Evaluations
from tasks.ingredients import fan_out


@task(name="propose-round", task_run_name="propose-round-{index}", **QUIET)
def propose_round(ctx: RunContext, key: str, index: int, history: list[SweepRound]) -> SweepRound:
    """The round's proposals: read back when stored (a re-run), else asked of the sampler and stored first."""
    log, url = get_run_logger().info, ctx.layout.sweep_round(key, index)

    def propose() -> SweepRound:
        proposed = soup_sweep.propose(ctx.config.sweep, ctx.plan, history)
        proposed.write(ctx.store, url)
        log(f"round {index}: proposed {[t.hparams for t in proposed.trials]}")
        return proposed

    round_ = reuse_or_build(ctx.store, url, SweepRound, lambda stored: None, propose, f"sweep round {index}")
    if round_.reused:
        log(f"round {index}: {len(round_.trials)} proposals read back from storage")
    return round_


@task(name="score-round", task_run_name="score-round-{proposed.index}", **QUIET)
def score_round(ctx: RunContext, key: str, pretrained: PretrainedRecord, proposed: SweepRound,
                members: list[IngredientRecord], joined: list[IngredientRecord], val_accuracy: dict[str, float]) -> SweepRound:
    """Each proposal's gain to the greedy soup of `members` (the rounds before; in the first round, its best)."""
    if proposed.scored:
        return proposed
    log = get_run_logger().info
    scored = soup_sweep.score(proposed, members, joined, val_accuracy, lambda soup, candidates: greedy_gains(
        ctx, pretrained, soup, candidates, val_accuracy, log))
    if scored.soup:  # not when every proposal failed: a re-run tries the round's fine-tunes and scores it again
        scored.write(ctx.store, ctx.layout.sweep_round(key, proposed.index))
        log(f"round {proposed.index}: greedy soup of {len(scored.soup)} at val {scored.soup_val:.4f}; gains "
            + ", ".join(f"{t.id[:8]} {t.value:+.4f}" for t in scored.trials))
    return scored


def soup_aware(ctx: RunContext, pretrained: PretrainedRecord, in_flight: int,
               evaluations: Evaluations) -> tuple[list[IngredientRecord], list[FailedIngredient]]:
    """Rounds of propose, fine-tune (handing each to `evaluations` as it is verified), score, until sweep.n
    fine-tunes; a table artifact shows every round. Returns the completed ingredients and those left out."""
    logger, config = get_run_logger(), ctx.config
    key = soup_sweep.sweep_key(config.sweep, ctx.plan)
    logger.info(f"soup-aware sweep {key}: {config.sweep.n} fine-tunes, {config.sweep.initial} at random, then rounds of "
                f"{config.sweep.batch}")
    history: list[SweepRound] = []
    metas: list[IngredientRecord] = []
    failed: list[FailedIngredient] = []
    while not soup_sweep.done(config.sweep, history):
        proposed = propose_round(ctx, key, len(history), history)
        joined, left_out = fan_out(ctx, pretrained, soup_sweep.specs(proposed), in_flight, evaluations)
        val_accuracy = {m.id: evaluations.val_accuracy(m) for m in metas + joined}
        history.append(score_round(ctx, key, pretrained, proposed, metas, joined, val_accuracy))
        metas, failed = metas + joined, failed + left_out
        gain = "fall in val NLL" if config.sweep.objective == "nll" else "rise in val accuracy"
        create_table_artifact(key=artifact_key(config, "sweep-rounds"), description=(
            f"soup-aware sweep {key}: each round's fine-tunes, scored by their gain to the greedy soup of the rounds "
            f"before ({gain} when one joins it; -1: failed)"), table=[
            {"round": r.index, "fine-tunes": len(r.trials), "greedy soup before": len(r.soup),
             "its val accuracy %": round(100 * r.soup_val, 2), f"best gain ({gain})": round(max(t.value for t in r.trials), 4),
             "proposals (id gain)": "; ".join(f"{t.id[:8]} {t.value:+.4f}" for t in r.trials)} for r in history])
    return metas, failed


def stop_early(ctx: RunContext, pretrained: PretrainedRecord, specs: list[IngredientSpec], in_flight: int,
               evaluations: Evaluations) -> tuple[list[IngredientRecord], list[FailedIngredient], SweepStop]:
    """Fine-tune the planned sweep in rounds (sweep.stop). After each round the greedy soup of every completed
    ingredient is cooked (a stored soup is reused, so a re-run resumes and stops where the first run did), and the
    sweep stops once it has stopped gaining on val. Returns the completed ingredients, those left out, and the rounds."""
    logger, config = get_run_logger(), ctx.config
    rule = config.sweep.stop
    metas: list[IngredientRecord] = []
    failed: list[FailedIngredient] = []
    rounds: list[StopRound] = []
    for index, batch in enumerate(sweep.stop_rounds(specs, rule)):
        joined, left_out = fan_out(ctx, pretrained, batch, in_flight, evaluations)
        metas, failed = metas + joined, failed + left_out
        members, soup_val = [], 0.0
        if metas:  # only completed ingredients: a failed one never joins a soup
            with pantry_for(ctx, pretrained, metas) as checkpoints:
                soup = cook_soup(ctx, checkpoints, pretrained, metas, {m.id: evaluations.val_accuracy(m) for m in metas},
                                 "greedy")
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
