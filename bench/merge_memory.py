"""Peak private memory of the streamed uniform merge for N = 2, 4, 8, 16 checkpoints of a ~100 MB model.

Each merge runs in a fresh process; the parent samples that process's RssAnon from /proc every few ms.
RssAnon is private (anonymous) memory only: plain RSS would also count the page cache of the files read,
which grows with N and says nothing about what the merge itself holds.

    python bench/merge_memory.py [--mb 100] [--counts 2 4 8 16] [--dir /tmp/soup-bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from model_soups.config import StorageConfig
from model_soups.storage import Store

CHILD = """
import sys, time, torch
from model_soups.config import StorageConfig
from model_soups.merge import Ingredient, weighted_average
from model_soups.storage import Store
store = Store(StorageConfig(root=sys.argv[1]))
urls = sys.argv[3:]
print("ready", flush=True); sys.stdin.readline()
started = time.time()
soup = weighted_average(store, [Ingredient(str(i), u) for i, u in enumerate(urls)])
print(f"done {time.time() - started:.3f} {sum(t.numel() * t.element_size() for t in soup.values())}", flush=True)
sys.stdin.readline()
"""


def rss_anon_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc; this benchmark needs Linux")


def make_checkpoints(store: Store, count: int, megabytes: float) -> list[str]:
    """A transformer-like layout: a few large matrices, many small vectors, fp32, plus an integer buffer."""
    torch.manual_seed(0)
    width = 1024
    layers = max(1, int(megabytes * 2**20 / 4 / (4 * width * width)))
    shapes = {}
    for layer in range(layers):
        for name in ("q", "k", "v", "o"):
            shapes[f"layers.{layer}.{name}.weight"] = (width, width)
            shapes[f"layers.{layer}.{name}.bias"] = (width,)
    base = {name: torch.randn(shape) * 0.02 for name, shape in shapes.items()}
    base["step"] = torch.tensor(1000)
    urls = []
    for i in range(count):
        url = store.url(f"ingredient-{i}.safetensors")
        if not store.exists(url):
            store.save_checkpoint(url, {k: v + 0.001 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.items()})
        urls.append(url)
    return urls


def measure(store: Store, urls: list[str]) -> dict[str, float]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, store.root, "-", *urls], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    baseline = rss_anon_kb(child.pid)
    child.stdin.write("go\n")
    child.stdin.flush()
    peak = baseline
    line = ""
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ)
    while not line:
        peak = max(peak, rss_anon_kb(child.pid))
        if selector.select(timeout=0.002):
            line = child.stdout.readline()
    peak = max(peak, rss_anon_kb(child.pid))
    child.stdin.write("end\n")
    child.stdin.flush()
    child.wait()
    _, seconds, soup_bytes = line.split()
    return {"seconds": float(seconds), "baseline_mb": baseline / 1024, "peak_mb": peak / 1024,
            "merge_mb": (peak - baseline) / 1024, "model_mb": int(soup_bytes) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary folder)")
    args = parser.parse_args()
    folder = args.dir or tempfile.mkdtemp(prefix="soup-bench-")
    store = Store(StorageConfig(root=f"file://{folder}"))
    urls = make_checkpoints(store, max(args.counts), args.mb)
    rows = []
    for n in args.counts:
        row = {"n": n, **measure(store, urls[:n])}
        rows.append(row)
    print(f"\nStreamed uniform merge, {rows[0]['model_mb']:.0f} MB model (fp32), local disk, peak RssAnon of a fresh process\n")
    print("| N | seconds | process baseline MB | peak MB | held by the merge MB | peak / model size |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['seconds']:.2f} | {r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | {r['merge_mb']:.0f} | "
              f"{r['merge_mb'] / r['model_mb']:.2f} |")
    growth = rows[-1]["peak_mb"] / rows[0]["peak_mb"] - 1
    print(f"\npeak growth from N={rows[0]['n']} to N={rows[-1]['n']}: {100 * growth:+.1f}%")
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/merge_memory.json").write_text(json.dumps({"rows": rows, "peak_growth": growth}, indent=2))


if __name__ == "__main__":
    main()
