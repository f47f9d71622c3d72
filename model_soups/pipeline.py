"""The pipeline's steps as plain functions over storage references. Prefect tasks wrap these one to one.

Every step reads its inputs from the storage root and writes its outputs there, and each one reuses what
is already stored and verified, so a re-run resumes where the last one stopped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
import torch

from model_soups import merge, report, soups
from model_soups.config import ConfigError, RunConfig
from model_soups.evaluate import metrics, predict
from model_soups.merge import Ingredient
from model_soups.recipes import Recipe, SplitData, get_recipe, stable_hash
from model_soups.storage import (CorruptCheckpoint, Layout, Lease, Store, StorageError, StorageUnavailable, load_npz,
                                 npz_bytes)
from model_soups.sweep import IngredientSpec, expand
from model_soups.train import BUSY_EXIT_CODE, STORAGE_EXIT_CODE, versions

Log = Callable[[str], None]
KINDS = {"uniform": "uniform_soup", "greedy": "greedy_soup", "learned": "learned_soup"}


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
    return Plan(recipe, fingerprint, specs, recipe.splits())


def open_storage(config: RunConfig) -> tuple[Store, Layout]:
    store = Store(config.storage)
    return store, Layout(store, config.experiment)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + os.urandom(2).hex()


def device_slots(setting: int | str) -> list[dict[str, str]]:
    """One environment per slot: a CUDA device each, or a CPU slot with one thread each."""
    gpus = torch.cuda.device_count()
    count = (gpus or len(os.sched_getaffinity(0))) if setting == "auto" else int(setting)
    if gpus:
        return [{"name": f"cuda:{i % gpus}", "CUDA_VISIBLE_DEVICES": str(i % gpus)} for i in range(count)]
    return [{"name": f"cpu:{i}", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            for i in range(count)]


def this_process_slot() -> dict[str, str]:
    """The slot a worker was pinned to when it started (SOUP_SLOT names it); its environment is inherited."""
    device = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {"name": os.environ.get("SOUP_SLOT") or f"{socket.gethostname()}:{'cuda ' + device if device else 'cpu'}"}


def lease_lost(store: Store, layout: Layout, ingredient_id: str, running_for_s: float, lease_s: float) -> bool:
    """True when a fine-tune that should be running has no live lease: its process or machine died."""
    if running_for_s < lease_s or layout.has_result(ingredient_id):
        return False
    lease = Lease(store, layout.lease(ingredient_id), lease_s)
    record = lease.holder()
    return record is None or lease.is_stale(record)


# -- pretrained --------------------------------------------------------------------------------------
def ensure_pretrained(store: Store, layout: Layout, plan: Plan, log: Log) -> dict[str, Any]:
    url = layout.pretrained(plan.fingerprint)
    record_url = url.replace(".safetensors", ".json")
    if store.exists(record_url):
        record = store.read_json(record_url)
        try:
            with store.open_checkpoint(url, record["sha256"]) as reader:
                reader.verify()
            log(f"pretrained {url}: reused")
            return record
        except CorruptCheckpoint as error:
            log(f"pretrained {url}: {error}; rebuilding")
    started = time.time()
    state = plan.recipe.make_pretrained()
    sha = store.save_checkpoint(url, state, {"fingerprint": plan.fingerprint})
    record = {"url": url, "sha256": sha, "fingerprint": plan.fingerprint, "seconds": round(time.time() - started, 2)}
    store.write_json(record_url, record)
    log(f"pretrained {url}: built in {record['seconds']}s")
    return record


# -- ingredients -------------------------------------------------------------------------------------
def completed_ingredient(store: Store, layout: Layout, ingredient_id: str, log: Log) -> dict[str, Any] | None:
    """The stored result of an ingredient if it is finished and its checkpoint verifies; else None."""
    meta_url = layout.meta(ingredient_id)
    if not store.exists(meta_url):
        return None
    try:
        meta = store.read_json(meta_url)
        if meta["status"] == "failed":  # a crash, hang or out-of-memory may not happen again: try again
            log(f"ingredient {ingredient_id}: an earlier attempt failed ({meta['reason']}); training it again")
            return None
        if meta["status"] != "completed":
            return meta  # diverged is a result too: the same seed would diverge again
        with store.open_checkpoint(meta["checkpoint"], meta["sha256"]) as reader:
            reader.verify()
        return meta
    except StorageUnavailable:
        raise
    except (StorageError, KeyError) as error:
        log(f"ingredient {ingredient_id}: stored result is unusable ({error}); training it again")
        store.delete(meta_url)
        store.delete(layout.checkpoint(ingredient_id))
        return None


def finetune_job(config: RunConfig, pretrained: dict[str, Any], spec: IngredientSpec, slot: str) -> dict[str, Any]:
    return {"id": spec.id, "slot": slot, "hparams": spec.hparams, "experiment": config.experiment, "lease_s": config.execution.lease_s,
            "storage": config.storage.revealed(), "recipe": config.recipe.model_dump(),
            "pretrained_url": pretrained["url"], "pretrained_sha256": pretrained["sha256"]}


class IngredientBusy(RuntimeError):
    """Another process holds the ingredient's lease."""


class FinetuneFailed(RuntimeError):
    """A fine-tune process crashed, hung past its timeout or ran out of memory; `reason` says which, in one line."""

    def __init__(self, ingredient_id: str, reason: str, output: str = ""):
        super().__init__(f"ingredient {ingredient_id}: {reason}" + (f"\n{output}" if output else ""))
        self.reason = reason


OUT_OF_MEMORY = re.compile(r"OutOfMemoryError|out of memory|can't allocate memory|not enough memory|MemoryError")


def train_ingredient(config: RunConfig, pretrained: dict[str, Any], spec: IngredientSpec, slot: dict[str, str],
                     log: Log) -> dict[str, Any]:
    """The stored ingredient if it is done, else train it; wait while another process is training it."""
    store, layout = open_storage(config)
    deadline = time.time() + config.execution.timeout_s
    while True:
        meta = completed_ingredient(store, layout, spec.id, log)
        if meta is not None:
            return {**meta, "reused": True}
        try:
            run_finetune_process(finetune_job(config, pretrained, spec, slot["name"]), slot, config.execution.timeout_s, log)
            break
        except IngredientBusy:
            if time.time() > deadline:
                raise TimeoutError(f"ingredient {spec.id}: still being trained elsewhere after {config.execution.timeout_s}s") from None
            log(f"ingredient {spec.id}: another process is training it; waiting for its result")
            time.sleep(min(5.0, config.execution.lease_s / 3))
        except FinetuneFailed as failure:
            meta = completed_ingredient(store, layout, spec.id, log)  # it may have stored its result before dying
            if meta is not None:
                return {**meta, "reused": False}
            record_failure(store, layout, spec, failure.reason, slot["name"], log)
            raise
    meta = completed_ingredient(store, layout, spec.id, log)
    if meta is None:
        raise RuntimeError(f"ingredient {spec.id}: the fine-tune process ended without a verified result")
    return {**meta, "reused": False}


def run_finetune_process(job: dict[str, Any], slot: dict[str, str], timeout_s: float, log: Log) -> None:
    """Run `python -m model_soups.train` on one device slot; raise with its last output if it fails."""
    env = {**os.environ, **{k: v for k, v in slot.items() if k != "name"}}
    process = subprocess.Popen([sys.executable, "-m", "model_soups.train"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    killed = threading.Event()
    timer = threading.Timer(timeout_s, lambda: (killed.set(), process.kill()))
    timer.start()
    tail: deque[str] = deque(maxlen=15)
    try:
        process.stdin.write(json.dumps(job))  # credentials travel over stdin, never on the command line
        process.stdin.close()
        for line in process.stdout:
            tail.append(line.rstrip())
            if line.startswith(("step ", job["id"])):
                log(f"{job['id']} [{slot['name']}] {line.rstrip()}")
        code = process.wait()
    finally:
        timer.cancel()
    output = "\n".join(tail)
    last = next((line for line in reversed(tail) if line.strip()), "no output")
    if killed.is_set():
        reason = f"hung: still running after execution.timeout_s={timeout_s:g}s on {slot['name']}, killed"
        raise FinetuneFailed(job["id"], reason, output)
    if code == BUSY_EXIT_CODE:
        raise IngredientBusy(job["id"])
    if code == STORAGE_EXIT_CODE:
        raise StorageUnavailable(last)
    if code < 0:
        name = signal.Signals(-code).name
        cause = " (the kernel's out-of-memory killer, or someone stopped it)" if -code == signal.SIGKILL else ""
        raise FinetuneFailed(job["id"], f"crashed: killed by {name}{cause} on {slot['name']}", output)
    if code != 0:
        kind = "out of memory" if OUT_OF_MEMORY.search(output) else f"crashed: exit code {code}"
        raise FinetuneFailed(job["id"], f"{kind} on {slot['name']}: {last}", output)


def record_failure(store: Store, layout: Layout, spec: IngredientSpec, reason: str, slot: str, log: Log) -> None:
    """meta.json says why the last attempt failed and how many have; the next attempt or run tries again."""
    url = layout.meta(spec.id)
    try:
        previous = store.read_json(url) if store.exists(url) else {}
        failures = previous.get("failures", 0) + 1 if previous.get("status") == "failed" else 1
        store.write_json(url, {"id": spec.id, "status": "failed", "reason": reason, "failures": failures, "slot": slot,
                               "hparams": spec.hparams, "failed_at": datetime.now(timezone.utc).isoformat()})
    except StorageError as error:
        log(f"ingredient {spec.id}: could not record its failure ({error})")


def register_checkpoint(store: Store, layout: Layout, spec: IngredientSpec, pretrained: dict[str, Any]) -> dict[str, Any]:
    """Bring-your-own ingredient: check it against the pretrained model and record it, without training."""
    with store.open_checkpoint(pretrained["url"]) as base, store.open_checkpoint(spec.checkpoint) as reader:
        merge.check_compatible(base.info, reader.info, spec.checkpoint)
        for name, tensor in reader.tensors():
            merge.check_finite(name, tensor, spec.checkpoint)
    meta = {"id": spec.id, "status": "completed", "reason": "", "checkpoint": spec.checkpoint,
            "sha256": store.sha256(spec.checkpoint), "source": "existing checkpoint", "hparams": {}}
    store.write_json(layout.meta(spec.id), meta)
    return meta


# -- evaluation --------------------------------------------------------------------------------------
def evaluation_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(recipe: Recipe, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = recipe.build_model()
    model.load_state_dict(state)
    return model.eval()


def evaluate_ingredient(store: Store, layout: Layout, recipe: Recipe, meta: dict[str, Any], split: str, log: Log) -> dict[str, Any]:
    """Metrics of one ingredient on one split; logits and labels are stored for ensembles."""
    json_url, npz_url = (layout.evaluation(meta["id"], split, s) for s in ("json", "npz"))
    if store.exists(json_url) and store.exists(npz_url):
        stored = store.read_json(json_url)
        if stored.get("checkpoint_sha256") == meta["sha256"]:
            return {**stored, "reused": True}
    started = time.time()
    model = load_model(recipe, store.load_checkpoint(meta["checkpoint"], meta["sha256"]))
    data = recipe.load_split(split)
    logits = predict(model, data, recipe.eval_batch_size, evaluation_device())
    store.write_bytes(npz_url, npz_bytes(logits=logits, labels=data.labels.numpy()))
    result = {"id": meta["id"], "split": split, "checkpoint_sha256": meta["sha256"], **metrics(logits, data.labels.numpy()),
              "seconds": round(time.time() - started, 4)}
    store.write_json(json_url, result)
    log(f"ingredient {meta['id']} on {split}: accuracy {result['accuracy']:.4f}")
    return {**result, "reused": False}


# -- soups -------------------------------------------------------------------------------------------
def ingredients_of(metas: list[dict[str, Any]]) -> list[Ingredient]:
    return [Ingredient(m["id"], m["checkpoint"], m["sha256"]) for m in metas]


def soup_key(config: RunConfig, pretrained: dict[str, Any], metas: list[dict[str, Any]],
             val_accuracy: dict[str, float], method: str) -> str:
    """A soup is determined by its method, the soup options and its ingredients: that is its storage key."""
    options = config.soup.model_dump(exclude={"methods", "final", "ensembles"})
    ingredients = sorted((m["id"], m["sha256"], val_accuracy[m["id"]]) for m in metas)
    return stable_hash({"method": method, "options": options, "pretrained": pretrained["sha256"], "ingredients": ingredients})


def cook_soup(config: RunConfig, recipe: Recipe, pretrained: dict[str, Any], metas: list[dict[str, Any]],
              val_accuracy: dict[str, float], method: str, log: Log) -> dict[str, Any]:
    """Cook one soup and evaluate it on every split; the same soup, already stored and verified, is reused."""
    store, layout = open_storage(config)
    key = soup_key(config, pretrained, metas, val_accuracy, method)
    record_url = layout.soup(key, "record.json")
    if store.exists(record_url):
        record = store.read_json(record_url)
        try:
            with store.open_checkpoint(record["checkpoint"], record["sha256"]):
                pass
            log(f"{method} soup {key}: reused")
            return {**record, "reused": True}
        except StorageError as error:
            log(f"{method} soup {key}: stored soup is unusable ({error}); cooking it again")
    with store.open_checkpoint(pretrained["url"]) as base:
        reference = base.info
    val = recipe.load_split("val")
    model = recipe.build_model()
    batchnorm_data = batchnorm_subset(recipe, config.soup.recompute_bn_examples) if config.soup.recompute_bn else None
    evaluations, evaluation_s = 0, 0.0

    def as_published(state: dict[str, torch.Tensor], n_ingredients: int) -> str:
        """Load `state` into `model` exactly as it is published; returns what happened to BatchNorm statistics.
        One ingredient keeps its own statistics, which are exact for its weights."""
        model.load_state_dict(state)
        if batchnorm_data is not None and n_ingredients > 1 and soups.recompute_batchnorm(model, batchnorm_data, recipe.eval_batch_size):
            return f"recomputed on {len(batchnorm_data)} train examples"
        return "averaged" if n_ingredients > 1 else "the ingredient's own"

    def score(state: dict[str, torch.Tensor], n_ingredients: int) -> float:
        nonlocal evaluations, evaluation_s
        evaluations += 1
        started = time.time()
        as_published(state, n_ingredients)
        accuracy = float((predict(model, val, recipe.eval_batch_size, evaluation_device()).argmax(1) == val.labels.numpy()).mean())
        evaluation_s += time.time() - started
        log(f"{method} soup: candidate {evaluations} val accuracy {accuracy:.4f}")
        return accuracy

    ctx = soups.SoupContext(store, soups.rank(ingredients_of(metas), val_accuracy), val_accuracy, reference,
                            config.soup, score, model, val, recipe.eval_batch_size)
    started = time.time()
    soup = soups.SOUP_METHODS[method](ctx)
    state = merge.weighted_average(store, soup.ingredients, soup.weights, soups.ACCUMULATE[config.soup.accumulate], reference)
    batchnorm = as_published(state, len(soup.ingredients))
    model.eval()
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}  # the model may sit on a GPU
    url = layout.soup(key, "soup.safetensors")
    sha = store.save_checkpoint(url, state, {"method": method})
    split_metrics = {}
    for split in recipe.splits():  # logits are kept, as for ingredients, for paired comparisons later
        data = recipe.load_split(split)
        logits = predict(model, data, recipe.eval_batch_size, evaluation_device())
        store.write_bytes(layout.soup(key, f"{split.replace(':', '_')}.npz"), npz_bytes(logits=logits, labels=data.labels.numpy()))
        split_metrics[split] = metrics(logits, data.labels.numpy())
    record = {"method": method, "kind": KINDS[method], "key": key, "checkpoint": url, "sha256": sha,
              "ingredients": [i.id for i in soup.ingredients], "trajectory": soup.trajectory,
              "weights": soup.weights, "candidate_evaluations": evaluations, "candidate_seconds": round(evaluation_s, 4),
              "seconds": round(time.time() - started, 3),
              "batchnorm": batchnorm, "metrics": split_metrics}
    store.write_json(record_url, record)
    log(f"{method} soup {key}: {len(soup.ingredients)} ingredients, val {split_metrics['val']['accuracy']:.4f}, "
        f"{evaluations} candidate evaluations")
    return {**record, "reused": False}


def batchnorm_subset(recipe: Recipe, examples: int) -> SplitData:
    """The fixed train examples on which every multi-ingredient soup, candidates included, re-estimates BatchNorm."""
    train = recipe.load_split("train")
    if len(train) <= examples:
        return train
    return train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:examples].sort().values)


def ensemble_rows(store: Store, layout: Layout, metas: list[dict[str, Any]], splits: list[str],
                  val_accuracy: dict[str, float], rule: str) -> list[dict[str, Any]]:
    """Ensemble and greedy ensemble from stored logits: no forward pass."""
    stored = {(m["id"], s): load_npz(store.read_bytes(layout.evaluation(m["id"], s, "npz"))) for m in metas for s in splits}
    ranked = [i.id for i in soups.rank(ingredients_of(metas), val_accuracy)]
    greedy = soups.greedy_ensemble(ranked, {i: stored[(i, "val")]["logits"] for i in ranked}, stored[(ranked[0], "val")]["labels"], rule)
    rows = []
    for kind, members in (("ensemble", ranked), ("greedy_ensemble", greedy)):
        for split in splits:
            labels = stored[(ranked[0], split)]["labels"]
            logits = soups.ensemble_logits([stored[(m, split)]["logits"] for m in members])
            rows.append({"model": kind, "kind": kind, "split": split, **metrics(logits, labels), "n_ingredients": len(members)})
    return rows


# -- publish -----------------------------------------------------------------------------------------
def publish(config: RunConfig, recipe: Recipe, pretrained: dict[str, Any], metas: list[dict[str, Any]],
            failed: list[dict[str, Any]], evaluations: list[dict[str, Any]], soup_records: list[dict[str, Any]],
            run_id: str, log: Log) -> dict[str, str]:
    store, layout = open_storage(config)
    val_accuracy = {e["id"]: e["accuracy"] for e in evaluations if e["split"] == "val"}
    best = max(metas, key=lambda m: val_accuracy[m["id"]])["id"]
    rows = []
    for e in evaluations:
        row = {"model": e["id"], "split": e["split"], **{k: e[k] for k in ("accuracy", "nll", "ece", "n")}, "n_ingredients": 1}
        rows.append({**row, "kind": "ingredient"})
        if e["id"] == best:
            rows.append({**row, "kind": "best_individual"})
    for record in soup_records:
        rows += [{"model": record["kind"], "kind": record["kind"], "split": split, **m, "n_ingredients": len(record["ingredients"])}
                 for split, m in record["metrics"].items()]
    if config.soup.ensembles:
        rows += ensemble_rows(store, layout, metas, recipe.splits(), val_accuracy, config.soup.rule)
    results = report.results_frame(rows)
    store.write_bytes(layout.run(run_id, "results.csv"), results.to_csv(index=False).encode())
    store.write_bytes(layout.run(run_id, "results.parquet"), results.to_parquet(index=False))

    ids = [m["id"] for m in metas]
    cosines = merge.delta_cosines(store, Ingredient("pretrained", pretrained["url"], pretrained["sha256"]), ingredients_of(metas))
    store.write_json(layout.run(run_id, "cosine.json"), {"ids": ids, "matrix": np.round(cosines, 6).tolist()})

    final = next(r for r in soup_records if r["method"] == config.soup.final)
    soup_url = layout.run(run_id, "soup.safetensors")
    store.copy(final["checkpoint"], soup_url)
    files = {name: store.sha256(layout.run(run_id, name)) for name in ("soup.safetensors", "results.csv", "results.parquet", "cosine.json")}
    greedy = next((r for r in soup_records if r["method"] == "greedy"), None)
    manifest = {
        "experiment": config.experiment, "run_id": run_id, "created": datetime.now(timezone.utc).isoformat(),
        "final": config.soup.final, "soup": soup_url, "soup_ingredients": len(final["ingredients"]),
        "recipe": recipe.describe(), "fingerprint": pretrained["fingerprint"], "pretrained": pretrained,
        "ingredients": [{"id": m["id"], "checkpoint": m["checkpoint"], "sha256": m["sha256"], "hparams": m.get("hparams", {}),
                         "val_accuracy": val_accuracy[m["id"]]} for m in metas],
        "failed": failed, "best_individual": best,
        "soups": {r["method"]: {"ingredients": r["ingredients"], "checkpoint": r["checkpoint"], "sha256": r["sha256"],
                                "record": layout.soup(r["key"], "record.json"), "weights": r["weights"],
                                "batchnorm": r["batchnorm"], "candidate_evaluations": r["candidate_evaluations"]}
                  for r in soup_records},
        "greedy_trajectory": greedy["trajectory"] if greedy else [],
        "files": files, "config": config.model_dump(mode="json"), "versions": versions(),
    }
    store.write_json(layout.run(run_id, "manifest.json"), manifest)
    paths = report.build_report(store, layout.run(run_id))
    log(f"published {layout.run(run_id)}")
    return {"run": layout.run(run_id), "soup": soup_url, **paths}
