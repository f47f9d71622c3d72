"""The pipeline's own cost: fine-tune stage speedup with device slots, orchestration overhead, greedy cost.

Each configuration runs the real model_soup flow on the demo config with fresh storage. The overhead
fraction is the share of the flow run's wall time in which no task run was running: what orchestration
costs between tasks. Inside the fine-tune tasks, the time outside the training loop (process start,
imports, storage checks, writing the checkpoint) is reported per fine-tune. Starting the temporary
Prefect server is reported apart.

    python bench/pipeline.py [--n 10]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")

from prefect import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402

from flows.model_soup import model_soup  # noqa: E402
from model_soups.config import parse_config  # noqa: E402
from model_soups.storage import Layout, Store  # noqa: E402


def run(slots: int, n: int) -> dict:
    root = "file://" + tempfile.mkdtemp(prefix=f"soup-pipeline-{slots}-")
    config = parse_config({"storage": {"root": root}, "sweep": {"n": n}, "execution": {"device_slots": slots}})
    called = time.time()
    state = model_soup(config=config, return_state=True)
    returned = time.time()
    paths = state.result()
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])), limit=200)
    finetunes = [t for t in task_runs if t.name.startswith("finetune-")]
    stage_s = (max(t.end_time for t in finetunes) - min(t.start_time for t in finetunes)).total_seconds()
    wall_s = (flow_run.end_time - flow_run.start_time).total_seconds()

    store = Store(config.storage)
    layout = Layout(store, config.experiment)
    manifest = store.read_json(f"{paths['run']}/manifest.json")
    train_s = sum(store.read_json(layout.meta(i["id"]))["seconds"] for i in manifest["ingredients"])
    greedy = store.read_json(manifest["soups"]["greedy"]["record"])
    busy_s = union_seconds([(t.start_time, t.end_time) for t in task_runs])
    return {"slots": slots, "n": n, "flow_wall_s": wall_s, "tasks_busy_s": busy_s,
            "overhead_fraction": (wall_s - busy_s) / wall_s, "server_and_setup_s": (returned - called) - wall_s,
            "finetune_stage_s": stage_s, "train_loop_s": train_s,
            "per_finetune_overhead_s": (stage_s * slots - train_s) / n,
            "greedy_candidate_evaluations": greedy["candidate_evaluations"],
            "greedy_seconds_per_evaluation": greedy["candidate_seconds"] / max(1, greedy["candidate_evaluations"])}


def union_seconds(intervals) -> float:
    """Time during which at least one task run was running."""
    total, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += (stop - start).total_seconds()
            end = stop
        elif stop > end:
            total += (stop - end).total_seconds()
            end = stop
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    args = parser.parse_args()
    one, two = run(1, args.n), run(2, args.n)
    speedup = one["finetune_stage_s"] / two["finetune_stage_s"]
    print(f"\nPipeline cost, demo config (digits, {args.n} ingredients), {os.cpu_count()} CPU cores\n")
    print("| device slots | flow wall s | some task running s | overhead fraction | fine-tune stage s | "
          "training loops s | per fine-tune overhead s | temporary server + setup s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in (one, two):
        print(f"| {r['slots']} | {r['flow_wall_s']:.1f} | {r['tasks_busy_s']:.1f} | {r['overhead_fraction']:.3f} | "
              f"{r['finetune_stage_s']:.1f} | {r['train_loop_s']:.1f} | {r['per_finetune_overhead_s']:.1f} | "
              f"{r['server_and_setup_s']:.1f} |")
    print(f"\nspeedup_2_slots = {speedup:.2f} (fine-tune stage wall time, 1 slot / 2 slots)")
    print(f"overhead_fraction = {one['overhead_fraction']:.3f} (1 slot: share of the flow's wall time with no task running)")
    print(f"per fine-tune overhead = {one['per_finetune_overhead_s']:.1f} s (process start, imports, storage checks, "
          "checkpoint write; inside the task, outside the training loop)")
    print(f"greedy soup: {one['greedy_candidate_evaluations']} candidate evaluations for N = {args.n}, "
          f"{1000 * one['greedy_seconds_per_evaluation']:.1f} ms each")
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/pipeline.json").write_text(json.dumps(
        {"runs": [one, two], "speedup_2_slots": speedup, "overhead_fraction": one["overhead_fraction"]}, indent=2))


if __name__ == "__main__":
    main()
