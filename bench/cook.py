"""The time after the last fine-tune against the fine-tune stage, for the text recipe's default search, side by side
with the code of an earlier commit (`--methods` cooks only the soups named).

One command, three flow runs against one Prefect server started here:
  1. the current code runs the whole flow on fresh storage: its fine-tune stage, and the time after its last
     fine-tune ended (the evaluations left, cooking every default soup, publishing);
  2. the code of `--before` (a git worktree of that commit), then
  3. the current code again, each on its own copy of that storage without the soups and run folders: both reuse the
     same fine-tunes and evaluations and cook every soup afresh, so their time after the fine-tunes is compared
     under the same conditions.
The soups of 2 and 3 are compared by sha256, and every task-vector soup's chosen candidate by its val accuracy.

With `--replay ROOT` it runs nothing: for every stored task-vector soup under ROOT made with `soup.search: grid` (as
every run before 2026-12-04 was), it replays `soups.coarse_to_fine` on the scores its trajectory recorded, and
counts the soups whose choice would change and the evaluations it would take.

    python bench/cook.py --train ../shared/data/sst2/train.tsv --test ../shared/data/sst2/dev.tsv --before da3755b
    python bench/cook.py --replay /tmp/q-digits

Without `--before` it makes the full run alone: the fine-tune stage and the time after it, on this machine's devices
(`bench/gpu.sh cook` runs it so on a GPU, with `--model` a MiniLM of random weights, since the packaged 90 MB
checkpoint does not travel there; the time does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import groupby
from pathlib import Path

import torch
import yaml
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort
from prefect.server.api.server import SubprocessASGIServer

from model_soups.config import StorageConfig
from model_soups.manifest import Manifest
from model_soups.records import SearchStep, SoupRecord
from model_soups.soups import coarse_to_fine
from model_soups.storage import Store
from pipeline import union_seconds  # bench/pipeline.py

CHECKOUT = Path(__file__).resolve().parents[1]


def text_config(root: str, args: argparse.Namespace) -> dict:
    """The text recipe's default search as bench/quality.py runs it: n fine-tunes of --max-train sentences, one
    epoch each, every default soup method."""
    total = args.max_train + args.val
    return {"experiment": "cook-bench", "storage": {"root": root},
            "recipe": {"name": "text", "options": {
                "train": str(Path(args.train).resolve()), "test": str(Path(args.test).resolve()),
                "text_column": "sentence", "max_train_examples": total, "val_fraction": args.val / total,
                "max_length": 64, **({"model": str(Path(args.model).resolve())} if args.model else {})}},
            "sweep": {"n": args.n, "seed": 0, "params": {"epochs": [1], "lr": {"low": 1e-5, "high": 1e-4, "log": True}}},
            **({"soup": {"methods": args.methods, "final": "greedy" if "greedy" in args.methods else args.methods[0]}}
               if args.methods else {})}


def flow_run(config: dict, code: Path, api_url: str, log: Path) -> dict:
    """`soup run` of `config` by the code checked out at `code`, against the server at `api_url`; its timings."""
    folder = Path(tempfile.mkdtemp(prefix="soup-cook-bench-"))
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PREFECT_API_URL": api_url,  # `code` first; what else the path holds (bench/gpu.sh's wheels) after it
           "PYTHONPATH": os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])])}
    started = time.time()
    command = [sys.executable, "-c", "import sys, model_soups; print('code:', model_soups.__file__, flush=True); "
               "from flows.cli import main; sys.exit(main(sys.argv[1:]))", "run", str(folder / "config.yaml")]
    with open(log, "w") as out, subprocess.Popen(command, cwd=code, env=env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:  # the flow's own log is the progress
            out.write(line)
            print(f"  [{log.stem}] {line}", end="", flush=True)
    if process.returncode != 0:
        raise SystemExit(f"{log}: `soup run` failed with exit code {process.returncode}")
    first = open(log).readline()
    if not first.startswith(f"code: {code}"):
        raise SystemExit(f"{log}: ran the wrong checkout ({first.strip()}), not {code}")
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])), limit=200)
    finetunes = [t for t in tasks if t.name.startswith("finetune-")]
    last = max(t.end_time for t in finetunes)
    after = lambda prefix: union_seconds([(max(t.start_time, last), t.end_time) for t in tasks  # noqa: E731
                                          if t.name.startswith(prefix) and t.end_time > last])
    return {"wall_s": time.time() - started, "flow_s": (run.end_time - run.start_time).total_seconds(),
            "finetune_stage_s": (last - min(t.start_time for t in finetunes)).total_seconds(),
            "after_last_finetune_s": (run.end_time - last).total_seconds(),
            "evaluating_after_s": after("evaluate-"), "cooking_after_s": after("cook-"), "publishing_s": after(("publish", "show-run")),
            "root": config["storage"]["root"], "log": str(log)}


def soups_of(root: str) -> dict[str, SoupRecord]:
    store = Store(StorageConfig(root=root))
    runs = store.url("cook-bench", "runs")
    manifest = Manifest.read(store, f"{store.children(runs)[-1]}/manifest.json")
    return {method: SoupRecord.read(store, soup.record) for method, soup in manifest.soups.items()}


def without_soups(root: str, into: str) -> str:
    """A copy of the experiment at `root` with its fine-tunes and evaluations, without soups and run folders."""
    source, target = Path(root.removeprefix("file://")) / "cook-bench", Path(into) / "cook-bench"
    shutil.copytree(source, target, ignore=lambda folder, names: [n for n in names if folder == str(source)
                                                                   and n in ("soups", "runs")])
    return f"file://{into}"


def chosen(record: SoupRecord):
    return next((step for step in record.trajectory if getattr(step, "chosen", False)), None)


def replay(root: str) -> None:
    """What coarse-to-fine would have chosen, from the recorded scores of grid searches stored under `root`."""
    same, changed, grid, fine = 0, [], 0, 0
    for path in sorted(Path(root.removeprefix("file://")).glob("*/soups/*/record.json")):
        record = SoupRecord.model_validate_json(path.read_text())
        steps = record.trajectory
        if not steps or not isinstance(steps[0], SearchStep):
            continue
        scored = []  # (position in the trajectory, val) of what coarse-to-fine scores, line by line
        for _, line in groupby(enumerate(steps), key=lambda item: (item[1].top_k, item[1].drop)):
            line = list(line)
            by_scale = sorted(range(len(line)), key=lambda i: line[i][1].scale)
            chosen = coarse_to_fine(len(line), lambda p: line[by_scale[p]][1].soup_val)
            scored += [line[by_scale[p]] for p in chosen]
            grid, fine = grid + len(line), fine + len(chosen)
        best = max(scored, key=lambda item: (item[1].soup_val, -item[0]))[0]
        was = next(i for i, step in enumerate(steps) if step.chosen)
        if best == was:
            same += 1
        else:
            changed.append(f"{record.method} {record.key}: {steps[was].scale:g} (val {steps[was].soup_val:.4f}) -> "
                           f"{steps[best].scale:g} (val {steps[best].soup_val:.4f})")
    print(f"{root}: {same + len(changed)} grid searches; coarse-to-fine chooses the same candidate in {same}, another in "
          f"{len(changed)}; {fine} evaluations instead of {grid}")
    for line in changed:
        print(f"  {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train")
    parser.add_argument("--test")
    parser.add_argument("--before", help="the commit whose cooking is compared (e.g. da3755b); without it, the full run alone")
    parser.add_argument("--model", help="the text recipe's model folder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--out", default="bench/results/cook_text.json", help="where the results go as JSON")
    parser.add_argument("--methods", nargs="+", metavar="METHOD", help="cook only these soups (default: every default "
                        "soup), e.g. greedy: the time after the fine-tunes when only the published soup is cooked")
    parser.add_argument("--replay", metavar="ROOT", help="only replay coarse-to-fine on the grid searches stored there")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-train", type=int, default=6000)
    parser.add_argument("--val", type=int, default=1000)
    args = parser.parse_args()
    if args.replay:
        return replay(args.replay)
    if not (args.train and args.test):
        parser.error("give --train and --test (or --replay ROOT)")
    work = Path(tempfile.mkdtemp(prefix="soup-cook-bench-"))
    before = work / "before"
    if args.before:
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=CHECKOUT, check=True,
                       capture_output=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        full = flow_run(text_config(f"file://{work}/full", args), CHECKOUT, server.api_url, work / "full.log")
        print(f"full run: fine-tune stage {full['finetune_stage_s']:.0f} s, after it {full['after_last_finetune_s']:.0f} s",
              flush=True)
        runs = {"full run, this code": full}
        if args.before:
            runs[f"cook only, {args.before}"] = flow_run(text_config(without_soups(full["root"], str(work / "old")), args),
                                                         before, server.api_url, work / "old.log")
            runs["cook only, this code"] = flow_run(text_config(without_soups(full["root"], str(work / "new")), args),
                                                    CHECKOUT, server.api_url, work / "new.log")
    finally:
        server.stop()
        if args.before:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=CHECKOUT, capture_output=True)
    stage = full["finetune_stage_s"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    soups = "the soups " + ", ".join(args.methods) if args.methods else "every default soup"
    print(f"\nText recipe, {args.n} MiniLM fine-tunes of {args.max_train} sentences (one epoch, val {args.val}), "
          f"{soups}, {device}\n")
    print("| run | fine-tune stage s | after the last fine-tune s | of it: evaluating s | cooking s | publishing s "
          "| after / fine-tune stage |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['finetune_stage_s']:.0f} | {r['after_last_finetune_s']:.0f} | {r['evaluating_after_s']:.0f} | "
              f"{r['cooking_after_s']:.0f} | {r['publishing_s']:.0f} | {r['after_last_finetune_s'] / stage:.3f} |")
    print(f"\nafter / fine-tune stage = {full['after_last_finetune_s'] / stage:.3f} (goal <= 0.10)")
    results = {"device": device, "full": full, "command": " ".join(sys.argv)}
    if args.before:
        old, new = runs[f"cook only, {args.before}"], runs["cook only, this code"]
        results.update(before=old, now=new, soups=compare_soups(old["root"], new["root"]))
        worse = [r["method"] for r in results["soups"]
                 if r["chosen_val_now"] is not None and r["chosen_val_now"] < r["chosen_val_before"]]
        print(f"cooking alone, before {old['after_last_finetune_s']:.0f} s, now {new['after_last_finetune_s']:.0f} s; "
              f"chosen val lower than before: {worse or 'none'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))


def compare_soups(old_root: str, new_root: str) -> list[dict]:
    """Each soup of two cook-only runs: byte-identical or not, candidate evaluations, and the chosen val; printed."""
    old_soups, new_soups = soups_of(old_root), soups_of(new_root)
    rows = []
    for method in new_soups:
        a, b = old_soups[method], new_soups[method]
        was, now = chosen(a), chosen(b)
        rows.append({"method": method, "identical": a.sha256 == b.sha256,
                     "candidates_before": a.candidate_evaluations, "candidates_now": b.candidate_evaluations,
                     "chosen_val_before": was.soup_val if was else None, "chosen_val_now": now.soup_val if now else None,
                     "test_before": a.metrics["test"].accuracy, "test_now": b.metrics["test"].accuracy})
    print("\n| soup | byte-identical | candidates before | now | chosen val before | now | test before | now |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        val = lambda x: "" if x is None else f"{100 * x:.2f}"  # noqa: E731
        print(f"| {r['method']} | {r['identical']} | {r['candidates_before']} | {r['candidates_now']} | "
              f"{val(r['chosen_val_before'])} | {val(r['chosen_val_now'])} | {val(r['test_before'])} | {val(r['test_now'])} |")
    return rows


if __name__ == "__main__":
    main()
