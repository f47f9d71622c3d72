"""The ingredient tasks: prepare (plan, storage check, pretrained start), one fine-tune on a device slot or as a
run on the GPU pool, and `fan_out`, which keeps every device slot busy until all ingredients are done."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from prefect import get_client, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.futures import as_completed
from prefect.states import Crashed

from model_soups import ingredients
from model_soups.config import RunConfig
from model_soups.context import RunContext
from model_soups.processes import device_slots
from model_soups.records import DeviceSlot, FailedIngredient, IngredientRecord, PretrainedRecord
from model_soups.storage import StorageUnavailable
from model_soups.sweep import IngredientSpec
from tasks import QUIET, artifact_key
from tasks.evaluation import Evaluations


def unless_storage_is_down(task, task_run, state) -> bool:
    """Retry a failed fine-tune, except when storage did not answer (it has had its own retries with backoff) or a
    supplied checkpoint was refused for what it is (mismatched, NaN, malformed: it would be refused again)."""
    return not isinstance(state.data, (StorageUnavailable, *ingredients.REFUSED))


class MissingDeployment(RuntimeError):
    """A deployment that work-pool mode starts runs of is not on the Prefect server."""


def check_deployments(config: RunConfig) -> None:
    """In work-pool mode, the deployments this run will start runs of exist: found now, not after the fine-tunes."""
    execution = config.execution
    wanted = {"execution.finetune_deployment": execution.finetune_deployment}
    if execution.cook_on == "device-pool":
        wanted["execution.cook_deployment"] = execution.cook_deployment
    missing = []
    with get_client(sync_client=True) as client:
        for field, name in wanted.items():
            try:
                client.read_deployment_by_name(name)
            except ObjectNotFound:
                missing.append(f"{field} {name!r}")
    if missing:
        raise MissingDeployment(f"no deployment {' and '.join(missing)} on the Prefect server at "
                                f"{client.api_url}: deploy them (`prefect deploy --all` in the checkout, with its "
                                "prefect.yaml) or name the deployments to use")


@task(name="prepare", **QUIET)
def prepare(ctx: RunContext) -> PretrainedRecord:
    """Check cheaply what the run will need (the config was checked when the run's context was made): the storage
    root, and in work-pool mode its deployments; then build or reuse the pretrained start."""
    log, config, plan = get_run_logger().info, ctx.config, ctx.plan
    ctx.store.check_writable(config.experiment)
    if config.execution.fanout == "work-pool":
        check_deployments(config)
    pretrained = ingredients.ensure_pretrained(ctx, log)
    rounds = f" and {config.sweep.n} fine-tunes in soup-aware rounds" if config.sweep.strategy == "soup-aware" else ""
    log(f"{len(plan.specs)} ingredients{rounds}, splits {plan.splits}")
    return pretrained


@task(name="finetune", task_run_name="finetune-{spec.id}", retry_delay_seconds=2, retry_condition_fn=unless_storage_is_down,
      **QUIET)
def finetune(ctx: RunContext, pretrained: PretrainedRecord, spec: IngredientSpec, slot: DeviceSlot) -> IngredientRecord:
    """One ingredient in its own process on one device slot; a verified stored result is reused."""
    log = get_run_logger().info
    if spec.checkpoint:
        return ingredients.register_checkpoint(ctx.store, ctx.layout, spec, pretrained)
    meta = ingredients.train_ingredient(ctx, pretrained, spec, slot, log)
    log(f"ingredient {spec.id}: {'reused' if meta.reused else 'trained'} ({meta.status})")
    return meta


@task(name="finetune-on-pool", task_run_name="finetune-{spec.id}", retry_delay_seconds=2,
      retry_condition_fn=unless_storage_is_down, **QUIET)
def finetune_on_pool(ctx: RunContext, pretrained: PretrainedRecord, spec: IngredientSpec) -> IngredientRecord:
    """One ingredient as a run of the finetune deployment on the GPU pool; its result is read from storage.

    This waits in the orchestrating process and holds no slot of the GPU pool. A run whose fine-tune stops
    renewing its lease (its worker or machine died) is marked Crashed, and the task's retry starts another.
    With execution.cook_on: device-pool the pool also checks the checkpoint: the fine-tune run reuses a stored result
    only once it verifies there, and verifies what it trained, so this process reads no checkpoint.
    """
    log, config, store, layout = get_run_logger().info, ctx.config, ctx.store, ctx.layout
    pool_verifies = config.execution.cook_on == "device-pool"
    before = None  # what the pool found stored: the same record after its run means that run reused it
    if not spec.checkpoint and pool_verifies:
        before = ingredients.recorded_ingredient(store, layout, spec.id)
    elif not spec.checkpoint:
        meta = ingredients.stored_ingredient(store, layout, spec.id)
        if meta is not None:
            log(f"ingredient {spec.id}: reused ({meta.status})")
            return meta
    run = run_deployment(config.execution.finetune_deployment, timeout=0, as_subflow=True,
                         flow_run_name=f"finetune-{spec.id}",
                         parameters={"config": config.model_dump(mode="json"), "spec": spec.model_dump(mode="json"),
                                     "pretrained": pretrained.model_dump(mode="json")})
    log(f"ingredient {spec.id}: flow run {run.name} submitted to {config.execution.finetune_deployment}")
    with get_client(sync_client=True) as client:
        while not run.state.is_final():
            time.sleep(config.execution.poll_s)
            run = client.read_flow_run(run.id)
            running_for = (datetime.now(timezone.utc) - run.start_time).total_seconds() if run.start_time else 0.0
            if run.state.is_running() and ingredients.lease_lost(store, layout, spec.id, running_for, config.execution.lease_s):
                message = f"fine-tune of {spec.id} stopped renewing its lease: its worker or machine died"
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                raise RuntimeError(f"flow run {run.name}: {message}")
    if not run.state.is_completed():
        raise RuntimeError(f"flow run {run.name} ended {run.state.type.value}: {run.state.message}")
    meta = (IngredientRecord.read(store, layout.meta(spec.id)) if spec.checkpoint or pool_verifies
            else ingredients.stored_ingredient(store, layout, spec.id))
    if meta is None:
        raise RuntimeError(f"flow run {run.name} completed but ingredient {spec.id} has no verified result in storage")
    reused = before is not None and meta == before
    if reused:
        log(f"ingredient {spec.id}: reused by flow run {run.name}, which verified it ({meta.status})")
    return meta.model_copy(update={"reused": reused})


def fan_out(ctx: RunContext, pretrained: PretrainedRecord, specs: list[IngredientSpec], in_flight: int,
            evaluations: Evaluations) -> tuple[list[IngredientRecord], list[FailedIngredient]]:
    """Fine-tune every ingredient: on this machine's device slots, one fine-tune each, or as runs on the GPU
    work pool, at most `in_flight` at once there (each waits in a thread of the flow's task runner). Each completed
    ingredient is handed to `evaluations` as soon as it is verified. Returns the completed ones in sweep order,
    and those left out with why."""
    logger, config = get_run_logger(), ctx.config
    progress = create_progress_artifact(0.0, key=artifact_key(config, "finetune-progress"),
                                        description=f"{len(specs)} fine-tunes")
    completed, failed = [], []
    running: dict = {}
    pending = list(specs)
    if config.execution.fanout == "work-pool":
        logger.info(f"fine-tuning {len(specs)} ingredients as runs of {config.execution.finetune_deployment}")
        free = [None] * min(in_flight, len(specs))  # no device slots here: the pool's workers have them
    else:
        free = device_slots(config.execution.device_slots)
        logger.info(f"fine-tuning {len(specs)} ingredients on {len(free)} device slots: {[s.name for s in free]}")
    local = finetune.with_options(retries=config.execution.retries)
    on_pool = finetune_on_pool.with_options(retries=config.execution.retries)
    while pending or running:
        while free and pending:  # keep every device slot busy with one fine-tune
            spec, slot = pending.pop(0), free.pop(0)
            future = (on_pool.submit(ctx, pretrained, spec) if config.execution.fanout == "work-pool"
                      else local.submit(ctx, pretrained, spec, slot))
            running[future] = (spec, slot)
        future = next(as_completed(list(running)))
        spec, slot = running.pop(future)
        free.append(slot)
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, StorageUnavailable):
            raise outcome  # not the ingredient's fault: stop, and let a re-run resume from what is stored
        if isinstance(outcome, IngredientRecord) and outcome.status == "completed":
            completed.append(outcome)
            evaluations.ready(outcome)
        else:
            if isinstance(outcome, IngredientRecord):  # diverged: a stored result
                status, reason = outcome.status, outcome.reason
            else:  # an exception after the retries; FinetuneFailed carries a one-line reason
                status, reason = "failed", getattr(outcome, "reason", f"{type(outcome).__name__}: {outcome}")
            logger.warning(f"ingredient {spec.id} left out of the soup: {status}: {reason}")
            failed.append(FailedIngredient(id=spec.id, status=status, reason=str(reason), hparams=spec.hparams))
        update_progress_artifact(progress, 100.0 * (len(completed) + len(failed)) / len(specs))
    order = {spec.id: i for i, spec in enumerate(specs)}
    return sorted(completed, key=lambda m: order[m.id]), failed
