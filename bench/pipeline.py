"""The pipeline's own cost: fine-tune stage speedup with device slots, orchestration overhead, greedy cost.

Each configuration runs the real model_soup flow on the demo config with fresh storage. The overhead
fraction is the share of the flow run's wall time in which no task run was running: what orchestration
costs between tasks. Inside the fine-tune tasks, the time outside the training loop (process start,
imports, storage checks, writing the checkpoint) is reported per fine-tune. Starting the temporary
Prefect server is reported apart.

With `--text-train`, it also times text fine-tune steps (all-MiniLM-L6-v2, batch 32, one thread) three
ways, interleaved step by step so that the machine's noise hits all three alike: padded to the split's
longest sentence (what the text recipe did before), padded per batch, and with length-grouped batches.

With `--overlap`, it runs the demo config on `--slots` device slots (auto, as the demo: one per CUDA device, else
one per core), evaluating after the last fine-tune
(the barrier) and as each fine-tune's checkpoint is verified (pipelined), in interleaved pairs, and reports
both wall times, the evaluation stage, how much of it ran while fine-tunes did, and whether the soups are
byte-identical. With 2 slots on 2 cores, evaluation competes with fine-tuning for the same cores; with 1,
one core is left to the orchestrator, as GPU fine-tunes leave it its CPU.

    python bench/pipeline.py [--n 10] [--text-train ../shared/data/sst2/train.tsv] [--no-flow] [--overlap]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")

from prefect import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402

from flows.model_soup import model_soup  # noqa: E402
from model_soups.config import parse_config  # noqa: E402
from model_soups.context import RunContext  # noqa: E402
from model_soups.ingredients import ensure_pretrained  # noqa: E402
from model_soups.processes import device_slots  # noqa: E402
from model_soups.recipes.base import SplitData, get_recipe  # noqa: E402
from model_soups.manifest import Manifest  # noqa: E402
from model_soups.records import IngredientRecord, SoupRecord  # noqa: E402
from model_soups.storage import Layout, Store  # noqa: E402
from model_soups.train import batches  # noqa: E402


class CpuSampler:
    """The busy share of all the machine's cores, read from /proc/stat every `every` seconds in a thread (Linux).
    `core_seconds(a, b, busy)` sums busy (or idle) core-seconds between two times; None where there is no /proc/stat."""

    def __init__(self, every: float = 0.2):
        self.samples: list[tuple[float, float, float]] = []  # (end time, seconds, busy share of all cores)
        self.available, self.cores = Path("/proc/stat").exists(), os.cpu_count()
        if self.available:  # divide by the cores /proc/stat sums over, which need not be os.cpu_count()
            self.cores = sum(line.startswith("cpu") and line[3].isdigit() for line in Path("/proc/stat").read_text().splitlines())
            threading.Thread(target=self._sample, args=(every,), daemon=True).start()

    @staticmethod
    def _read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    def _sample(self, every: float) -> None:
        (total, idle), at = self._read(), time.time()
        while True:
            time.sleep(every)
            (total2, idle2), at2 = self._read(), time.time()
            self.samples.append((at2, at2 - at, 1 - (idle2 - idle) / max(1, total2 - total)))
            total, idle, at = total2, idle2, at2

    def core_seconds(self, start: float, end: float, busy: bool = True) -> float | None:
        if not self.available:
            return None
        return sum(seconds * self.cores * (share if busy else 1 - share) for at, seconds, share in self.samples if start < at <= end)


DEVICE = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def run(slots: int, n: int, pipeline: bool = True, root: str | None = None, cpu: CpuSampler | None = None) -> dict:
    root = root or "file://" + tempfile.mkdtemp(prefix=f"soup-pipeline-{slots}-")
    config = parse_config({"storage": {"root": root}, "sweep": {"n": n},
                           "execution": {"device_slots": slots, "pipeline": pipeline}})
    called = time.time()
    state = model_soup(config=config, return_state=True)
    returned = time.time()
    paths = state.result()
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])), limit=200)
    finetunes = [t for t in task_runs if t.name.startswith("finetune-")]
    stage_s = (max(t.end_time for t in finetunes) - min(t.start_time for t in finetunes)).total_seconds()
    evaluations = [(t.start_time, t.end_time) for t in task_runs if t.name.startswith("evaluate-")]
    last_finetune = max(t.end_time for t in finetunes)
    wall_s = (flow_run.end_time - flow_run.start_time).total_seconds()

    store = Store(config.storage)
    layout = Layout(store, config.experiment)
    manifest = Manifest.read(store, f"{paths['run']}/manifest.json")
    train_s = sum(IngredientRecord.read(store, layout.meta(i.id)).seconds for i in manifest.ingredients)
    greedy = SoupRecord.read(store, manifest.soups["greedy"].record)
    busy_s = union_seconds([(t.start_time, t.end_time) for t in task_runs])
    stage = (min(t.start_time for t in finetunes).timestamp(), last_finetune.timestamp())
    evaluating = (min(a for a, _ in evaluations).timestamp(), max(b for _, b in evaluations).timestamp())
    return {"slots": slots, "n": n, "pipeline": pipeline, "flow_wall_s": wall_s, "tasks_busy_s": busy_s,
            # the evaluation stage: time in which some evaluation ran; and the part of it before the last fine-tune ended
            "evaluation_s": union_seconds(evaluations),
            "evaluation_overlapping_finetunes_s": union_seconds([(a, min(b, last_finetune)) for a, b in evaluations if a < last_finetune]),
            "evaluation_after_finetunes_s": union_seconds([(max(a, last_finetune), b) for a, b in evaluations if b > last_finetune]),
            "soups": {method: soup["sha256"] for method, soup in manifest["soups"].items()},
            "prepare_s": union_seconds([(t.start_time, t.end_time) for t in task_runs if t.name.startswith("prepare")]),
            "cooking_s": union_seconds([(t.start_time, t.end_time) for t in task_runs if t.name.startswith("cook-")]),
            "overhead_fraction": (wall_s - busy_s) / wall_s, "server_and_setup_s": (returned - called) - wall_s,
            "finetune_stage_s": stage_s, "train_loop_s": train_s,
            # CPU arithmetic: what the fine-tune stage leaves idle, and what the evaluations take (both in core-seconds)
            "cores": cpu.cores if cpu else os.cpu_count(),
            "finetune_stage_idle_core_s": cpu.core_seconds(*stage, busy=False) if cpu else None,
            "evaluation_busy_core_s": cpu.core_seconds(*evaluating) if cpu else None,
            "per_finetune_overhead_s": (stage_s * slots - train_s) / n,
            "greedy_candidate_evaluations": greedy.candidate_evaluations,
            "greedy_seconds_per_evaluation": greedy.candidate_seconds / max(1, greedy.candidate_evaluations)}


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


def text_step_seconds(train_url: str, rounds: int, batch_size: int = 32, warmup: int = 2) -> dict:
    """Seconds per training step of MiniLM on one thread: split-wide padding, per-batch padding, length-grouped."""
    torch.set_num_threads(1)
    recipe = get_recipe("text", {"train": train_url, "text_column": "sentence", "max_train_examples": 7000,
                                 "val_fraction": 1 / 7, "max_length": 64})
    train = recipe.load_split("train")
    split_wide = SplitData(train.inputs, train.labels)  # no lengths: every batch keeps the split's width
    modes = {"split-wide padding": (split_wide, batches(len(train), batch_size, torch.Generator().manual_seed(0))),
             "per-batch padding": (train, batches(len(train), batch_size, torch.Generator().manual_seed(0))),
             "length-grouped": (train, batches(len(train), batch_size, torch.Generator().manual_seed(0), train.lengths))}
    model = recipe.build_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    tokens: dict[str, list[int]] = {mode: [] for mode in modes}
    for step in range(warmup + rounds):
        for mode, (data, order) in modes.items():
            index = order[step]
            inputs = data.batch(index)
            started = time.perf_counter()
            loss = F.cross_entropy(model(**inputs), data.labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step >= warmup:
                seconds[mode].append(time.perf_counter() - started)
                tokens[mode].append(inputs["input_ids"].numel())
    base = statistics.median(seconds["split-wide padding"])
    return {mode: {"median_step_s": statistics.median(seconds[mode]), "ratio_to_split_wide": statistics.median(seconds[mode]) / base,
                   "mean_tokens_per_batch": statistics.mean(tokens[mode]), "steps": rounds}
            for mode in modes} | {"split_max_length": int(train.inputs["input_ids"].shape[1]),
                                  "mean_length": float(train.lengths.float().mean())}


def print_text_steps(result: dict) -> None:
    print(f"\nText fine-tune step, all-MiniLM-L6-v2, batch 32, 1 thread, {result['split-wide padding']['steps']} "
          f"interleaved steps each; the split's longest sentence is {result['split_max_length']} tokens, "
          f"the mean {result['mean_length']:.1f}\n")
    print("| batches | median s per step | x split-wide padding | tokens per batch (with padding) |")
    print("|---|---|---|---|")
    for mode in ("split-wide padding", "per-batch padding", "length-grouped"):
        r = result[mode]
        print(f"| {mode} | {r['median_step_s']:.3f} | {r['ratio_to_split_wide']:.2f} | {r['mean_tokens_per_batch']:.0f} |")
    print(f"\nper_batch_padding_ratio = {result['per-batch padding']['ratio_to_split_wide']:.2f} (goal <= 0.7), "
          f"length_grouped_ratio = {result['length-grouped']['ratio_to_split_wide']:.2f} (goal <= 0.35)")


def overlap_runs(n: int, repeats: int, slots: int) -> list[tuple[dict, dict]]:
    """(barrier, pipelined) pairs, interleaved, on one root whose pretrained start is built once beforehand; before
    each run everything else is deleted, so both train and evaluate every ingredient afresh."""
    root = "file://" + tempfile.mkdtemp(prefix="soup-overlap-")
    config = parse_config({"storage": {"root": root}, "sweep": {"n": n}})
    ensure_pretrained(RunContext.of(config), print)
    cpu = CpuSampler()
    pairs = []
    for _ in range(repeats):
        pair = []
        for pipeline in (False, True):
            for folder in ("ingredients", "evals", "soups", "runs"):
                shutil.rmtree(Path(root.removeprefix("file://")) / config.experiment / folder, ignore_errors=True)
            pair.append(run(slots, n, pipeline, root, cpu))
        pairs.append(tuple(pair))
    return pairs


def print_overlap(barrier: dict, pipelined: dict) -> dict:
    """Barrier vs pipelined evaluation on the same config: wall times, the evaluation stage, the overlap."""
    print(f"\nEvaluation pipelined with fine-tuning, demo config (digits, {barrier['n']} ingredients, "
          f"{barrier['slots']} device slots, {os.cpu_count()} CPU cores{', ' + DEVICE if torch.cuda.is_available() else ''}), "
          "fresh storage each\n")
    print("| evaluation | flow wall s | prepare s | fine-tune stage s | evaluation stage s | of it while fine-tunes ran s "
          "| after the last fine-tune s | cooking s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in (("barrier", barrier), ("pipelined", pipelined)):
        print(f"| {name} | {r['flow_wall_s']:.1f} | {r['prepare_s']:.1f} | {r['finetune_stage_s']:.1f} | {r['evaluation_s']:.1f} | "
              f"{r['evaluation_overlapping_finetunes_s']:.1f} | {r['evaluation_after_finetunes_s']:.1f} | {r['cooking_s']:.1f} |")
    bound = barrier["flow_wall_s"] - 0.8 * barrier["evaluation_s"]
    identical = barrier["soups"] == pipelined["soups"]
    print(f"\npipelined wall {pipelined['flow_wall_s']:.1f} s vs barrier wall {barrier['flow_wall_s']:.1f} s - 0.8 x its "
          f"evaluation stage {barrier['evaluation_s']:.1f} s = {bound:.1f} s: {'met' if pipelined['flow_wall_s'] <= bound else 'NOT met'}")
    print(f"saved {barrier['flow_wall_s'] - pipelined['flow_wall_s']:.1f} s; "
          f"soups byte-identical (sha256 of every method's stored soup): {identical}")
    most = most_saved(barrier)
    if most is not None:
        cores, idle, busy = barrier["cores"], barrier["finetune_stage_idle_core_s"], barrier["evaluation_busy_core_s"]
        print(f"CPU arithmetic (the barrier run): its fine-tune stage left {idle:.1f} core-s idle "
              f"({100 * idle / (cores * barrier['finetune_stage_s']):.0f}% of {cores} cores x {barrier['finetune_stage_s']:.1f} s); "
              f"its evaluation stage kept {busy:.1f} core-s busy. Pipelined, what does not fit in the idle core-seconds "
              f"stretches the fine-tune stage by about {max(0.0, busy - idle) / cores:.1f} s, so on this machine pipelining "
              f"can save at most about {most:.1f} s; the criterion needs {0.8 * barrier['evaluation_s']:.1f} s")
    return {"barrier": barrier, "pipelined": pipelined, "bound_s": bound, "met": pipelined["flow_wall_s"] <= bound,
            "soups_identical": identical, "most_saved_s": most}


def most_saved(barrier: dict) -> float | None:
    """The most pipelining can save: the barrier's evaluation stage, less the time its evaluation work would stretch the
    fine-tune stage by, for the core-seconds that do not fit in what that stage leaves idle (None without /proc/stat)."""
    idle, busy = barrier["finetune_stage_idle_core_s"], barrier["evaluation_busy_core_s"]
    if idle is None or busy is None:
        return None
    return barrier["evaluation_s"] - max(0.0, busy - idle) / barrier["cores"]


def slots_setting(value: str) -> int | str:
    """--slots as execution.device_slots takes it: 'auto' or a positive count."""
    if value == "auto" or (value.isdigit() and int(value) > 0):
        return value if value == "auto" else int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: give 'auto' or a positive number of device slots, e.g. --slots 1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--text-train", help="SST-2 style TSV (sentence, label) for the text step timing")
    parser.add_argument("--text-rounds", type=int, default=30)
    parser.add_argument("--no-flow", action="store_true", help="only the text step timing")
    parser.add_argument("--overlap", action="store_true", help="only barrier vs pipelined evaluation")
    parser.add_argument("--slots", default="auto", type=slots_setting, help="--overlap: device slots, as execution.device_slots (auto: the demo's; "
                        "1 of 2 CPU cores leaves one to the orchestrator)")
    parser.add_argument("--repeats", type=int, default=3, help="--overlap: interleaved (barrier, pipelined) pairs")
    args = parser.parse_args()
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    if args.text_train:
        text = text_step_seconds(args.text_train, args.text_rounds)
        print_text_steps(text)
        Path("bench/results/pipeline_text.json").write_text(json.dumps(text, indent=2))
    if args.no_flow:
        return
    if args.overlap:
        slots = len(device_slots(args.slots))
        pairs = [print_overlap(barrier, pipelined) for barrier, pipelined in overlap_runs(args.n, args.repeats, slots)]
        saved = [p["barrier"]["flow_wall_s"] - p["pipelined"]["flow_wall_s"] for p in pairs]
        stage = [p["barrier"]["evaluation_s"] for p in pairs]
        most = [p["most_saved_s"] for p in pairs if p["most_saved_s"] is not None]
        print(f"\nover {len(pairs)} interleaved pairs: saved {statistics.median(saved):.1f} s (median; each "
              f"{', '.join(f'{x:.1f}' for x in saved)}), barrier evaluation stage {statistics.median(stage):.1f} s "
              f"(median), so the criterion needs {0.8 * statistics.median(stage):.1f} s; criterion met in "
              f"{sum(p['met'] for p in pairs)} of {len(pairs)}; soups byte-identical in "
              f"{sum(p['soups_identical'] for p in pairs)} of {len(pairs)}"
              + (f"; the CPU arithmetic allows at most {statistics.median(most):.1f} s (median)" if most else ""))
        Path(f"bench/results/pipeline_overlap_{slots}slots{'_' + DEVICE.split()[-1] if torch.cuda.is_available() else ''}.json").write_text(json.dumps(
            {"pairs": pairs, "saved_s": saved, "command": " ".join(sys.argv)}, indent=2, default=str))
        return
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
    Path("bench/results/pipeline.json").write_text(json.dumps(
        {"runs": [one, two], "speedup_2_slots": speedup, "overhead_fraction": one["overhead_fraction"]}, indent=2))


if __name__ == "__main__":
    main()
