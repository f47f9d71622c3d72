"""The pipeline's own cost: fine-tune stage speedup with device slots, orchestration overhead, greedy cost.

Each configuration runs the real model_soup flow on the demo config with fresh storage. Compute is what
the library spends inside its steps (recorded in meta.json, evaluation and soup records); overhead is the
flow run's wall time minus that compute, with one device slot so that nothing overlaps. Starting the
temporary Prefect server is reported apart.

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
        task_runs = client.read_task_runs(flow_run_filter={"id": {"any_": [flow_run.id]}}, limit=1000)
    finetunes = [t for t in task_runs if t.name.startswith("finetune-")]
    stage_s = (max(t.end_time for t in finetunes) - min(t.start_time for t in finetunes)).total_seconds()
    wall_s = (flow_run.end_time - flow_run.start_time).total_seconds()

    store = Store(config.storage)
    layout = Layout(store, config.experiment)
    manifest = store.read_json(f"{paths['run']}/manifest.json")
    ids = [i["id"] for i in manifest["ingredients"]]
    pretrained_s = manifest["pretrained"]["seconds"]
    train_s = sum(store.read_json(layout.meta(i))["seconds"] for i in ids)
    splits = list(store.read_json(next(iter(manifest["soups"].values()))["record"])["metrics"])
    eval_s = sum(store.read_json(layout.evaluation(i, s, "json"))["seconds"] for i in ids for s in splits)
    records = {m: store.read_json(s["record"]) for m, s in manifest["soups"].items()}
    soup_s = sum(r["seconds"] for r in records.values())
    publish_s = sum((t.end_time - t.start_time).total_seconds() for t in task_runs if t.name.startswith("publish"))
    compute_s = pretrained_s + train_s + eval_s + soup_s + publish_s
    greedy = records["greedy"]
    return {"slots": slots, "n": n, "finetune_stage_s": stage_s, "flow_wall_s": wall_s,
            "server_and_setup_s": (returned - called) - wall_s, "compute_s": compute_s, "train_s": train_s,
            "eval_s": eval_s, "soup_s": soup_s, "publish_s": publish_s, "pretrained_s": pretrained_s,
            "overhead_fraction": (wall_s - compute_s) / wall_s,
            "greedy_candidate_evaluations": greedy["candidate_evaluations"],
            "greedy_seconds_per_evaluation": greedy["candidate_seconds"] / max(1, greedy["candidate_evaluations"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    args = parser.parse_args()
    one, two = run(1, args.n), run(2, args.n)
    speedup = one["finetune_stage_s"] / two["finetune_stage_s"]
    print(f"\nPipeline cost, demo config (digits, {args.n} ingredients), {os.cpu_count()} CPU cores\n")
    print("| device slots | fine-tune stage s | flow wall s | library compute s | overhead fraction | server + setup s |")
    print("|---|---|---|---|---|---|")
    for r in (one, two):
        print(f"| {r['slots']} | {r['finetune_stage_s']:.1f} | {r['flow_wall_s']:.1f} | {r['compute_s']:.1f} | "
              f"{r['overhead_fraction']:.3f} | {r['server_and_setup_s']:.1f} |")
    print(f"\nspeedup_2_slots = {speedup:.2f} (fine-tune stage, 1 slot / 2 slots)")
    print(f"overhead_fraction = {one['overhead_fraction']:.3f} (1 slot: flow wall time minus library compute, over wall time)")
    print(f"greedy soup: {one['greedy_candidate_evaluations']} candidate evaluations for N = {args.n}, "
          f"{1000 * one['greedy_seconds_per_evaluation']:.1f} ms each")
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/pipeline.json").write_text(json.dumps(
        {"runs": [one, two], "speedup_2_slots": speedup, "overhead_fraction": one["overhead_fraction"]}, indent=2))


if __name__ == "__main__":
    main()
