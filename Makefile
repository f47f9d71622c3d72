# Everything runs from .venv, which this Makefile builds itself.
VENV   := .venv
PY     := $(VENV)/bin/python
SHELL  := /bin/bash
STAMP  := $(VENV)/.installed-stamp
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 60
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: demo test test-fast screenshot ui bench stack stack-down install lock check-lock clean

install: $(STAMP)

# Exactly the locked versions (requirements.lock, made by `make lock`), then this project without dependencies.
$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Resolve pyproject.toml's ranges afresh in a scratch venv and record what was installed: a version that moves
# (SQLAlchemy 2.1 once broke the nightly schedule) becomes a reviewed diff of requirements.lock.
# torch first, pinned: a CPU wheel of 2.13.0 is on this machine; an open range would fetch a CUDA build.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.13.0
	# naming torch again keeps pip's resolver from swapping in a newer (CUDA) build while it backtracks
	$(LOCK_VENV)/bin/python -m pip install -q -e '.[text,test]' torch==2.13.0
	{ echo "# made by make lock from pyproject.toml (extras text, test); install with make install"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable; } > requirements.lock
	rm -rf $(LOCK_VENV)

# The venv holds exactly the lock: nothing more, nothing less, no other version.
check-lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | diff <(grep -v '^#' requirements.lock) - \
	  && echo "$(VENV) matches requirements.lock"

demo: $(STAMP)
	$(VENV)/bin/soup demo

test: $(STAMP)
	$(PY) -m pytest -q

# the library, config and merge tests: no flow runs, no Prefect server, no stack (markers in pyproject.toml)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not server and not stack"

# A venv of its own for the benchmarks: the lock plus the bench extra (mergekit, for bench/merge.py's comparison
# column), constrained to the lock, so .venv stays exactly the lock.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed-stamp: pyproject.toml requirements.lock
	python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q -r requirements.lock
	$(BENCH_VENV)/bin/python -m pip install -q -e '.[bench]' -c requirements.lock
	touch $@

BPY := $(BENCH_VENV)/bin/python
bench: $(BENCH_VENV)/.installed-stamp
	$(BPY) bench/merge.py --growth
	$(BPY) bench/merge.py
	$(BPY) bench/pipeline.py $(if $(wildcard ../shared/data/sst2/train.tsv),--text-train ../shared/data/sst2/train.tsv)
	$(BPY) bench/pipeline.py --overlap
	$(BPY) bench/quality.py digits --root file://$(CURDIR)/.bench-quality-digits
	$(BPY) bench/wiseft.py --root file://$(CURDIR)/.bench-quality-digits
	$(BPY) bench/sweep.py --root file://$(CURDIR)/.bench-quality-digits
	$(BPY) bench/load.py
	$(if $(wildcard ../shared/data/sst2/train.tsv),$(BPY) bench/cook.py --train ../shared/data/sst2/train.tsv --test ../shared/data/sst2/dev.tsv --before da3755b)

# A Prefect server, an S3 endpoint and workers on 127.0.0.1; then: source .stack/env && prefect deploy --all
stack: $(STAMP)
	infra/stack.sh up

stack-down:
	infra/stack.sh down

# the report artifact as the Prefect UI shows it (a server, a small demo run, headless Chromium): report-artifact.png
screenshot: $(STAMP)
	$(PY) infra/screenshot_report.py report-artifact.png

ui: $(STAMP)
	$(VENV)/bin/prefect server start --host 127.0.0.1

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(BENCH_VENV) .prefect soup-runs .bench-quality-digits
