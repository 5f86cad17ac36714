# The course's commands. Each sets up .venv first (scripts/setup-venv.sh: quick when nothing changed).
#
#   make course            run week 0's lesson notebook (WEEK=3 for week 3; PRESET=local|t4|a100|a100-80|auto)
#   make test              the whole test suite: unit tests, exercise drift, every course/ and solutions/ notebook
#   make unit              the tests under tests/ only, without executing the notebook folders
#   make exercises         regenerate exercises/ from solutions/ (nbgrader)
#   make lab               open JupyterLab on the repository
#   make bench             measure the course's loops against TRL's, the KV cache, memory (build/bench.md)
#
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu picks PyTorch's CPU-only build on a machine without a GPU.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
WEEK ?= 0
PRESET ?= auto
SEED ?= 0
OUT ?= build
PYTEST_ARGS ?=
BENCH_ARGS ?=

# What notebooks see while the tests run: the CPU preset, no hub, the venv's own Jupyter kernel.
TEST_ENV := COURSE_PRESET=local HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	JUPYTER_PREFER_ENV_PATH=1 PYDEVD_DISABLE_FILE_VALIDATION=1
# Notebook folders that exist (git keeps no empty folder); nbval executes each notebook cell by cell, lax mode.
NOTEBOOK_DIRS := $(wildcard course solutions)
NBVAL_ARGS := --nbval-lax --nbval-current-env --nbval-cell-timeout=900 --nbval-kernel-startup-timeout=120

.PHONY: help venv models course test unit exercises lab bench clean

help:
	@echo "make course [WEEK=0] [PRESET=auto]   run a week's lesson notebook into $(OUT)/weekNN/ (notebook + HTML)"
	@echo "make test                            the whole test suite, notebooks included (local preset)"
	@echo "make unit                            the tests under tests/ only (no notebook folders executed)"
	@echo "make exercises                       regenerate exercises/ from solutions/"
	@echo "make lab                             open JupyterLab"
	@echo "make bench [BENCH_ARGS=\"--only memory\"]  timings and memory ratios into $(OUT)/bench.md (minutes; --only: one section)"

venv:
	@scripts/setup-venv.sh

# The tiny Agora tokenizer and models, built once into the cache (COURSE_CACHE, default ~/.cache/agora-course).
models: venv
	HF_HUB_OFFLINE=1 $(PY) -m helpers.zoo build

course: venv
	$(VENV)/bin/course-run $(WEEK) --preset $(PRESET) --seed $(SEED) --out $(OUT)

test: venv
	$(TEST_ENV) $(PY) -m helpers.zoo build
	rc=0; $(TEST_ENV) $(PY) -m pytest tests $(NOTEBOOK_DIRS) $(NBVAL_ARGS) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; that is a failure here" >&2; fi; \
	exit $$rc

unit: venv
	$(TEST_ENV) $(PY) -m helpers.zoo build
	$(TEST_ENV) $(PY) -m pytest tests $(PYTEST_ARGS)

exercises: venv
	$(PY) tools/generate_exercises.py

lab: venv
	$(VENV)/bin/jupyter lab

# Ratios measured in one run (python -m helpers.bench --help); --notebooks adds seconds per notebook (slow).
bench: venv
	$(TEST_ENV) $(PY) -m helpers.bench --out $(OUT)/bench.md $(BENCH_ARGS)

clean:
	rm -rf $(OUT)
