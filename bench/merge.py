"""Uniform soup of N safetensors checkpoints: this project's merge against what people use.

Methods, each in a fresh process on the same inputs, outputs checked equal to this project's merge:
  model_soups     model_soups.merge.weighted_average: local files mapped and summed side by side a block at a
                  time; an object store's checkpoints streamed one after the other
  model_soups+sha256  the same, each checkpoint's sha256 checked as the pipeline checks it (local disk only; on S3
                  the hash is taken as the bytes stream past)
  safetensors-mmap  safetensors' safe_open on each local file, get_tensor summed into the first's tensors
  load-all        load every state dict, then average (what most code does)
  running-average the official repository's loop, reimplemented: soup * n/(n+1) + new/(n+1)
  raw-read        read the same bytes through fsspec in 4 MiB chunks: the floor
  fresh-soup      allocate one model's worth of memory and write it once: what a merge's soup costs before
                  anything is added into it, and a read into a reused buffer never pays (page faults)
  mergekit        `mergekit-pytorch` with `merge_method: linear` on the raw safetensors (local disk only; it
                  reads no S3), timed as the merge alone (after its imports) and as the whole command;
                  needs the bench extra: pip install -e '.[bench]' (make bench does it)

Peak private memory is the child's RssAnon, sampled by the parent (RSS would count the page cache of
memory-mapped safetensors). Local figures are with a warm page cache (each method reads the files once
before it is timed), the median of 3 fresh processes; S3 figures go over HTTP to a moto server on 127.0.0.1,
one process each. Every child starts torch's thread pool (one small sum) before it is timed: a process's
start, not a merge.

    python bench/merge.py                          # the comparison table, local disk and S3 (--local-only: local)
    python bench/merge.py --growth                 # peak memory of the merge for N = 2..16, ~100 MB model
                                                   # (--dtype bfloat16: of bf16 checkpoints, summed in fp32)
    python bench/merge.py --learned                # peak memory of the learned soup for N = 4..32, against the code
                                                   # of --before (a commit: its learned soup held all N in memory)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from model_soups.config import StorageConfig
from model_soups.storage import Store

CHILD = r"""
import json, sys, time, torch, fsspec
from safetensors.torch import load, save_file
from model_soups.config import StorageConfig
from model_soups.merge import Ingredient, weighted_average
from model_soups.storage import CHUNK, Store
method, root, endpoint, out, urls = sys.argv[1], sys.argv[2], sys.argv[3] or None, sys.argv[4], sys.argv[5:]
urls, shas = [u.split("#")[0] for u in urls], [u.split("#")[1] if "#" in u else None for u in urls]
store = Store(StorageConfig(root=root, endpoint_url=endpoint))
if method == "mergekit":
    import os, shutil
    from mergekit.scripts.merge_raw_pytorch import main as mergekit_pytorch  # imports are not timed
def read(url):
    return store.read_bytes(url)
def average(states):
    return {k: (sum(s[k].float() for s in states) / len(states)).to(states[0][k].dtype) if states[0][k].is_floating_point()
            else states[0][k] for k in states[0]}
torch.ones(1 << 17).add_(1)  # the thread pool starts: a process's start, not the merge
print("ready", flush=True); sys.stdin.readline()
started = time.time()
if method == "mergekit":
    mergekit_pytorch.main([out + ".yaml", out + ".d"], standalone_mode=False)
    soup = None
if method.startswith("model_soups"):
    soup = weighted_average(store, [Ingredient(str(i), u, sha) for i, (u, sha) in enumerate(zip(urls, shas))])
elif method == "safetensors-mmap":  # the usual local loop: safe_open maps each file, get_tensor copies a tensor out
    from safetensors import safe_open
    sums = {}
    for url in urls:
        with safe_open(store.path(url), "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                sums[k] = t if k not in sums else sums[k].add_(t) if t.is_floating_point() else sums[k]
    soup = {k: v.div_(len(urls)) if v.is_floating_point() else v for k, v in sums.items()}
elif method == "load-all":
    soup = average([load(read(u)) for u in urls])
elif method == "running-average":
    soup = None
    for n, url in enumerate(urls):
        new = load(read(url))
        soup = new if soup is None else {k: soup[k] * (n / (n + 1)) + new[k] / (n + 1) if new[k].is_floating_point()
                                          else soup[k] for k in new}
elif method == "fresh-soup":
    soup = None
    torch.empty(store.fs.size(store.path(urls[0])) // 4).fill_(0)
elif method == "raw-read":
    soup = None
    for url in urls:
        with store.fs.open(store.path(url), "rb", block_size=CHUNK) as handle:
            while handle.read(CHUNK):
                pass
seconds = time.time() - started
if method == "mergekit":
    os.replace(out + ".d/model.safetensors", out)
    shutil.rmtree(out + ".d")
if soup is not None and out != "-":
    save_file({k: v.contiguous() for k, v in soup.items()}, out)
print(json.dumps({"seconds": seconds}), flush=True)
sys.stdin.readline()
"""


LEARNED_CHILD = r"""
import json, sys, time
code, mode, root, width, steps, per_step, urls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7:]
sys.path.insert(0, code)  # this checkout, or a worktree of an earlier commit
import torch
import torch.nn.functional as F
from model_soups import soups
from model_soups.config import SoupOptions, StorageConfig
from model_soups.merge import Ingredient
try:
    from model_soups.recipes.base import get_recipe
except ImportError:  # before recipes/base.py
    from model_soups.recipes import get_recipe
from model_soups.soups import SoupContext, learned_soup
from model_soups.storage import Store
assert learned_soup.__code__.co_filename.startswith(code), learned_soup.__code__.co_filename
store = Store(StorageConfig(root=root))
recipe = get_recipe("digits", {"width": width})
ingredients = [Ingredient(f"m{i}", url) for i, url in enumerate(urls)]
with store.open_checkpoint(urls[0]) as reader:
    reference = reader.info
common = (store, ingredients, {i.id: 0.5 for i in ingredients}, reference)
rest = dict(model=recipe.build_model(), val=recipe.load_split("val"), eval_batch_size=32, score=None)
if hasattr(soups, "COOKS"):  # a method's body receives its own options
    from model_soups.methods import LearnedOptions
    ctx = SoupContext(*common, accumulate=torch.float32, rule=">=", **rest)
    cook = lambda: learned_soup(ctx, LearnedOptions(steps=steps, models_per_step=per_step))
else:  # before: methods read theirs from the soup options in the context
    options = SoupOptions(learned={"steps": steps, "models_per_step": per_step}) if "learned" in \
        SoupOptions.model_fields else SoupOptions(learned_steps=steps)  # before that: common options learned_steps
    ctx = SoupContext(*common, options=options, **rest)
    cook = lambda: learned_soup(ctx)
print("ready", flush=True); sys.stdin.readline()
started = time.time()
if mode == "step":  # the floor: one forward and backward pass of the model on one val batch, nothing else
    F.cross_entropy(ctx.model.eval()(**ctx.val.batch(slice(0, 32))), ctx.val.labels[:32]).backward()
else:
    cook()
print(json.dumps({"seconds": time.time() - started}), flush=True)
sys.stdin.readline()
"""


def rss_anon_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc; this benchmark needs Linux")


def measure(method: str, store: Store, urls: list[str], out: str) -> dict:
    return measure_child([CHILD, method, store.root, store.endpoint or "", out, *urls])


def measure_child(argv: list[str]) -> dict:
    """Peak RssAnon of a child script (`python -c argv[0] argv[1:]`) between its "ready" and its result line."""
    child = subprocess.Popen([sys.executable, "-c", *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    baseline = peak = rss_anon_kb(child.pid)
    child.stdin.write("go\n")
    child.stdin.flush()
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ)
    line = ""
    while not line:
        peak = max(peak, rss_anon_kb(child.pid))
        if selector.select(timeout=0.002):
            line = child.stdout.readline()
    child.stdin.write("end\n")
    child.stdin.flush()
    child.wait()
    return {"seconds": json.loads(line)["seconds"], "private_mb": (peak - baseline) / 1024,
            "process_peak_mb": peak / 1024, "process_baseline_mb": baseline / 1024}


def measure_command(argv: list[str]) -> dict:
    """A whole command, imports included: wall seconds and peak RssAnon of its process."""
    started = time.time()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while child.poll() is None:
        try:
            peak = max(peak, rss_anon_kb(child.pid))
        except (FileNotFoundError, RuntimeError):
            break
        time.sleep(0.002)
    if child.wait() != 0:
        raise RuntimeError(f"{argv[0]} failed with {child.returncode}")
    return {"seconds": time.time() - started, "private_mb": peak / 1024, "process_peak_mb": peak / 1024,
            "process_baseline_mb": 0.0}


def write_mergekit_config(urls: list[str], store: Store, out: str) -> None:
    """`<out>.yaml`: a linear merge, weight 1 each (mergekit normalizes the weights), of the raw safetensors files."""
    models = [{"model": store.path(u), "parameters": {"weight": 1.0}} for u in urls]
    Path(out + ".yaml").write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": models}))


def mergekit_command(out: str) -> dict:
    result = measure_command([str(Path(sys.executable).with_name("mergekit-pytorch")), out + ".yaml", out + ".d"])
    os.replace(out + ".d/model.safetensors", out)
    shutil.rmtree(out + ".d")
    return result


def make_checkpoints(store: Store, prefix: str, count: int, megabytes: float, width: int,
                     dtype: torch.dtype = torch.float32) -> list[str]:
    """Transformer-like layout: square matrices with bias vectors, plus an integer buffer."""
    layers = max(1, round(megabytes * 2**20 / dtype.itemsize / (4 * width * width)))
    torch.manual_seed(0)
    base = {f"layers.{layer}.{name}.{kind}": (torch.randn((width, width) if kind == "weight" else (width,)) * 0.02).to(dtype)
            for layer in range(layers) for name in "qkvo" for kind in ("weight", "bias")}
    base["step"] = torch.tensor(1000)
    urls = []
    for i in range(count):
        url = store.url(prefix, f"ingredient-{i}.safetensors")
        if not store.exists(url):
            store.save_checkpoint(url, {k: v + (0.001 * torch.randn(v.shape)).to(dtype) if v.is_floating_point() else v
                                        for k, v in base.items()})
        urls.append(url)
    return urls


FLOORS = ("raw-read", "fresh-soup")  # timed, but no soup to compare


def compare(store: Store, where: str, urls: list[str], model_mb: float, scratch: Path) -> list[dict]:
    rows, reference = [], None
    methods = ["raw-read", "fresh-soup", "model_soups", "load-all", "running-average"]
    if where == "local":
        methods[2:2] = ["model_soups+sha256", "safetensors-mmap"]
        shas = [store.sha256(u) for u in urls]
    if where == "local" and importlib.util.find_spec("mergekit") is not None:
        methods += ["mergekit", "mergekit-command"]
    for method in methods:
        out = str(scratch / f"{method}.safetensors")
        if method.startswith("mergekit"):
            write_mergekit_config(urls, store, out)
        args = [f"{u}#{sha}" for u, sha in zip(urls, shas)] if method == "model_soups+sha256" else urls
        runs = []
        for _ in range(3 if where == "local" else 1):
            if where == "local":
                measure("raw-read", store, urls, "-")  # warm the page cache for every method alike
            runs.append(mergekit_command(out) if method == "mergekit-command" else
                        measure(method, store, args, out if method not in FLOORS else "-"))
        result = {**sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2],  # the median run
                  "private_mb": max(r["private_mb"] for r in runs), "all_seconds": [r["seconds"] for r in runs]}
        if method not in FLOORS:
            from safetensors.torch import load_file

            soup = load_file(out)
            if reference is None:
                reference = soup
            result["max_abs_diff"] = max(float((soup[k].double() - reference[k].double()).abs().max()) for k in reference)
        gigabytes = model_mb * len(urls) / 1024
        rows.append({"where": where, "n": len(urls), "model_mb": model_mb, "method": method, **result,
                     "gb_per_s": gigabytes / result["seconds"], "private_mem_over_model": result["private_mb"] / model_mb})
    floor, fresh = rows[0]["seconds"], rows[1]["seconds"]
    for row in rows:
        row["read_bandwidth_ratio"] = floor / row["seconds"]
        row["over_read_and_fresh_soup"] = (floor + fresh) / row["seconds"]
    return rows


def comparison(args) -> None:
    from moto.server import ThreadedMotoServer

    folder = Path(args.dir or tempfile.mkdtemp(prefix="soup-merge-bench-"))
    scratch = folder / "outputs"
    scratch.mkdir(parents=True, exist_ok=True)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    stores = {"local": Store(StorageConfig(root=f"file://{folder}")),
              "s3": Store(StorageConfig(root="s3://merge-bench/x", endpoint_url=f"http://{host}:{port}"))}
    stores["s3"].fs.mkdir("merge-bench")
    cases = [(n, args.small_mb, 256) for n in (4, 16, 64)] + [(8, args.large_mb, 1024)]
    rows = []
    for where, store in stores.items():
        if args.local_only and where != "local":
            continue
        for n, megabytes, width in cases:
            urls = make_checkpoints(store, f"m{megabytes}", n, megabytes, width)
            rows += compare(store, where, urls, round(megabytes * 1.0, 1), scratch)
            print(f"done: {where} N={n} {megabytes} MB", file=sys.stderr)
    server.stop()
    print("\nUniform soup of N checkpoints (fp32); local: warm page cache; s3: moto over HTTP on 127.0.0.1\n")
    print("| where | N | model MB | method | seconds | GB/s | x raw read | x raw read + fresh soup | private MB | / model | "
          "max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['where']} | {r['n']} | {r['model_mb']:.0f} | {r['method']} | {r['seconds']:.2f} | {r['gb_per_s']:.2f} | "
              f"{r['read_bandwidth_ratio']:.2f} | {r['over_read_and_fresh_soup']:.2f} | {r['private_mb']:.0f} | "
              f"{r['private_mem_over_model']:.2f} | {r.get('max_abs_diff', float('nan')):.1e} |")
    goals = [r for r in rows if r["method"] == "model_soups" and r["where"] == "local"
             and (r["n"], r["model_mb"]) in {(64, args.small_mb), (8, args.large_mb)}]
    summary = {"read_bandwidth_ratio": min(r["read_bandwidth_ratio"] for r in goals),
               "peak_private_mem_over_model": max(r["private_mem_over_model"] for r in goals)}
    for r in goals:
        print(f"\nlocal merge, {r['n']} x {r['model_mb']:.0f} MB: {r['read_bandwidth_ratio']:.2f} of a raw read (goal >= 0.8; "
              f"{r['over_read_and_fresh_soup']:.2f} of a raw read plus a fresh soup), "
              f"{r['private_mem_over_model']:.2f} model sizes of private memory (goal <= 1.2)", end="")
    print()
    if not any(r["method"] == "mergekit" for r in rows):
        print("mergekit: not installed, so not measured (pip install -e '.[bench]')")
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/merge.json").write_text(json.dumps({"rows": rows, **summary}, indent=2))


def growth(args) -> None:
    folder = args.dir or tempfile.mkdtemp(prefix="soup-merge-growth-")
    store = Store(StorageConfig(root=f"file://{folder}"))
    dtype = getattr(torch, args.dtype)
    urls = make_checkpoints(store, f"growth-{args.dtype}", 16, 100, 1024, dtype)
    rows = [{"n": n, **measure("model_soups", store, urls[:n], "-")} for n in (2, 4, 8, 16)]
    print(f"\nUniform merge, ~100 MB {args.dtype} model, local disk: peak private memory (RssAnon) of a fresh process\n")
    print("| N | seconds | process baseline MB | process peak MB | added by the merge MB | added / model |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['seconds']:.2f} | {r['process_baseline_mb']:.0f} | {r['process_peak_mb']:.0f} | "
              f"{r['private_mb']:.0f} | {r['private_mb'] / 100:.2f} |")
    change = rows[-1]["process_peak_mb"] / rows[0]["process_peak_mb"] - 1
    print(f"\npeak private memory from N=2 to N=16: {100 * change:+.1f}%")
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    name = "merge_growth.json" if dtype == torch.float32 else f"merge_growth_{args.dtype}.json"
    Path("bench/results", name).write_text(json.dumps({"rows": rows, "change": change}, indent=2))


def learned(args) -> None:
    """The learned soup's peak private memory as N grows, this checkout against --before, on one digits net, next to
    the floor any gradient step pays: one forward and backward pass of the model on one val batch."""
    folder = args.dir or tempfile.mkdtemp(prefix="soup-learned-memory-")
    store = Store(StorageConfig(root=f"file://{folder}"))
    from model_soups.recipes.digits import DigitsNet

    torch.manual_seed(0)
    start = DigitsNet(args.width).state_dict()
    urls = []
    for i in range(max(args.n)):
        url = store.url("learned", f"w{args.width}-ingredient-{i}.safetensors")
        if not store.exists(url):
            store.save_checkpoint(url, {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in start.items()})
        urls.append(url)
    model_mb = sum(v.numel() * v.element_size() for v in start.values()) / 2**20
    before = Path(folder) / f"code-{args.before}"
    if not before.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], check=True, capture_output=True)
    rows = []
    try:
        for code, label in ((str(before), f"before ({args.before}): all N stacked"),
                            (str(Path(__file__).resolve().parents[1]), f"now: {args.per_step} per step, streamed")):
            for n in args.n:
                argv = [str(args.width), str(args.steps), str(args.per_step), *urls[:n]]
                result = measure_child([LEARNED_CHILD, code, "learned", store.root, *argv])
                floor = measure_child([LEARNED_CHILD, code, "step", store.root, *argv])["private_mb"]
                rows.append({"code": label, "n": n, **result, "one_step_mb": floor, "model_mb": model_mb})
                print(f"{label}, N={n}: {result['private_mb']:.0f} MB added (one pass {floor:.0f}), "
                      f"{result['seconds']:.1f} s", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], capture_output=True)
    print(f"\nLearned soup, {args.steps} steps of 32 val images, digits net of width {args.width} ({model_mb:.1f} MB fp32), "
          "local disk: peak private memory (RssAnon) added in a fresh process, by the learned soup and by one forward "
          "and backward pass of the model on one such batch (its activations and gradient: what any gradient step "
          "pays)\n")
    print("| code | N | seconds | added MB | added / model | one pass MB | beyond one pass / model |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['code']} | {r['n']} | {r['seconds']:.1f} | {r['private_mb']:.0f} | {r['private_mb'] / model_mb:.2f} | "
              f"{r['one_step_mb']:.0f} | {(r['private_mb'] - r['one_step_mb']) / model_mb:.2f} |")
    now = [r for r in rows if r["code"].startswith("now")]
    print(f"\nnow, N={now[0]['n']} to N={now[-1]['n']}: at most {max(r['private_mb'] for r in now) / model_mb:.2f} model "
          f"sizes added, {max(r['private_mb'] - r['one_step_mb'] for r in now) / model_mb:.2f} beyond one pass")
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/learned_memory.json").write_text(json.dumps({"rows": rows}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--growth", action="store_true", help="only the N = 2..16 memory-growth table")
    parser.add_argument("--learned", action="store_true", help="only the learned soup's memory table, N = --n")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the checkpoints' dtype in --growth (sums are float32)")
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--width", type=int, default=384, help="digits net width of --learned (384: ~16 MB)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--per-step", type=int, default=4, help="soup.learned.models_per_step of --learned")
    parser.add_argument("--before", default="eab220f", help="the commit --learned compares with")
    parser.add_argument("--small-mb", type=float, default=8)
    parser.add_argument("--large-mb", type=float, default=500)
    parser.add_argument("--local-only", action="store_true", help="the comparison on local disk only, not on S3")
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary folder)")
    args = parser.parse_args()
    learned(args) if args.learned else growth(args) if args.growth else comparison(args)


if __name__ == "__main__":
    main()
