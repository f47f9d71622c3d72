"""`soup demo` under each CPU capability torch dispatches to, each on fresh storage: does the headline hold?

torch picks its CPU kernels at run time (AVX-512, AVX2 or plain; ATEN_CPU_CAPABILITY forces one), and their float
arithmetic differs in the last bits, so the fine-tunes, and what the greedy soup keeps, differ from CPU to CPU.
oneDNN, which runs the convolutions, picks its own kernels (ONEDNN_MAX_CPU_ISA caps them), so --onednn adds
more of the arithmetic another CPU would do. The headline holds when the greedy soup keeps at least 3 fine-tunes
and is above the best fine-tune on mean OOD. A capability this CPU lacks is reported, not run (its kernels would
die of an illegal instruction).

With `--seeds`, each variant runs once per sweep seed (`sweep.seed`: other fine-tunes, as another CPU's arithmetic
makes other fine-tunes), and the table ends with how often the headline held. The seeds of one variant share its
storage, and so the start it pretrained there.

    python bench/demo_cpu.py [--capabilities default avx2 avx512] [--onednn SSE41 AVX2] [--seeds 0 1 2] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from model_soups import report
from model_soups.storage import Store
from model_soups.config import StorageConfig

# the CPU flags torch's kernels of each capability use (aten/src/ATen/cpu/vec)
NEEDS = {"default": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}
MIN_KEPT = 3


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def run_demo(capability: str, onednn: str, seed: int | None, root: str, overrides: list[str]) -> dict:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    if onednn != "native":
        env["ONEDNN_MAX_CPU_ISA"] = onednn
    said = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env=env, capture_output=True, text=True, check=True).stdout.strip()
    command = [sys.executable, "-m", "flows.cli", "demo", "--set", f"storage.root={root}"]
    for assignment in overrides + ([f"sweep.seed={seed}"] if seed is not None else []):
        command += ["--set", assignment]
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"soup demo under ATEN_CPU_CAPABILITY={capability} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    run_url = re.search(r"^run folder: (\S+)", done.stdout, re.MULTILINE).group(1)
    table = report.summary(report.read_results(Store(StorageConfig(root=run_url)), run_url))
    rows = {kind: {split: float(table.loc[kind, split]) for split in ("val", "test", "ood_mean")}
            for kind in table.index}
    kept = int(table.loc["greedy_soup", "n_ingredients"])
    greedy, best = rows["greedy_soup"], rows["best_individual"]
    return {"capability": capability, "onednn": onednn, "seed": seed, "torch_says": said, "seconds": seconds,
            "run": run_url, "greedy_kept": kept, "rows": rows, "holds": kept >= MIN_KEPT and greedy["ood_mean"] > best["ood_mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capabilities", nargs="+", default=list(NEEDS), choices=list(NEEDS))
    parser.add_argument("--onednn", nargs="+", default=["native"], metavar="ISA",
                        help="ONEDNN_MAX_CPU_ISA values (SSE41, AVX, AVX2, AVX512_CORE...) to cross with the capabilities; "
                        "native: oneDNN's own choice (the default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a demo config override, as `soup demo --set` (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[None], metavar="SEED",
                        help="sweep seeds, one demo each (default: the demo's own)")
    parser.add_argument("--out", default="bench/results/demo_cpu.json", help="where the results go as JSON")
    parser.add_argument("--root", default=None, help="where each capability's fresh storage goes (default: a temporary folder)")
    args = parser.parse_args()
    folder = args.root or tempfile.mkdtemp(prefix="soup-demo-cpu-")
    flags, results = cpu_flags(), []
    for capability in args.capabilities:
        missing = NEEDS[capability] - flags
        if missing:
            print(f"{capability}: not run, this CPU lacks {' '.join(sorted(missing))}", flush=True)
            results.append({"capability": capability, "skipped": f"CPU lacks {' '.join(sorted(missing))}"})
            continue
        for onednn in args.onednn:
            root = f"file://{folder}/{capability}-{onednn}-{int(time.time())}"  # its seeds share the start pretrained there
            for seed in args.seeds:
                result = run_demo(capability, onednn, seed, root, args.overrides)
                print(f"{capability}, oneDNN {result['onednn']}, sweep seed {seed}: greedy soup kept "
                      f"{result['greedy_kept']}, {result['seconds']:.0f} s", flush=True)
                results.append(result)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    print(f"\n`soup demo {' '.join('--set ' + o for o in args.overrides)}` on {model}, each capability on fresh storage "
          f"(accuracy in %; holds: the greedy soup keeps >= {MIN_KEPT} and beats the best fine-tune on mean OOD)\n")
    print("| ATEN_CPU_CAPABILITY | oneDNN ISA | sweep seed | torch ran | greedy kept | best val / test / OOD | "
          "greedy val / test / OOD | greedy - best OOD | holds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "skipped" in r:
            print(f"| {r['capability']} | | | not run: {r['skipped']} | | | | | |")
            continue
        best, greedy = r["rows"]["best_individual"], r["rows"]["greedy_soup"]
        cells = [" / ".join(f"{row[s]:.2f}" for s in ("val", "test", "ood_mean")) for row in (best, greedy)]
        seed = "demo's" if r["seed"] is None else r["seed"]
        print(f"| {r['capability']} | {r['onednn']} | {seed} | {r['torch_says']} | {r['greedy_kept']} | {cells[0]} | {cells[1]} | "
              f"{greedy['ood_mean'] - best['ood_mean']:+.2f} | {'yes' if r['holds'] else 'NO'} |")
    ran = [r for r in results if "skipped" not in r]
    print(f"\nthe headline held in {sum(r['holds'] for r in ran)} of {len(ran)} runs; greedy soup sizes "
          f"{[r['greedy_kept'] for r in ran]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu": model, "overrides": args.overrides,
                                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
