# Everything runs from .venv, which this Makefile builds itself.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 60
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: demo test ui bench stack stack-down install clean

install: $(STAMP)

# torch first, pinned: a CPU wheel of 2.13.0 is on this machine; an open range would fetch a CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	# naming torch again keeps pip's resolver from swapping in a newer (CUDA) build while it backtracks
	$(PY) -m pip install -q -e '.[text,test]' torch==2.13.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/soup demo

test: $(STAMP)
	$(PY) -m pytest -q

# the bench extra adds mergekit, for bench/merge.py's comparison column
$(VENV)/.bench-stamp: $(STAMP)
	$(PY) -m pip install -q -e '.[text,test,bench]' torch==2.13.0
	touch $@

bench: $(VENV)/.bench-stamp
	$(PY) bench/merge.py --growth
	$(PY) bench/merge.py
	$(PY) bench/pipeline.py $(if $(wildcard ../shared/data/sst2/train.tsv),--text-train ../shared/data/sst2/train.tsv)
	$(PY) bench/quality.py digits
	$(PY) bench/load.py

# A Prefect server, an S3 endpoint and workers on 127.0.0.1; then: source .stack/env && prefect deploy --all
stack: $(STAMP)
	infra/stack.sh up

stack-down:
	infra/stack.sh down

ui: $(STAMP)
	$(VENV)/bin/prefect server start --host 127.0.0.1

clean:
	rm -rf $(VENV) .prefect soup-runs
