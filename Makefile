# `make train` and `make test` bootstrap .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# One stamp per set of extras: a venv made for training gains the test extras on `make test`.
BASE := $(VENV)/.installed-base
TESTS := $(VENV)/.installed-tests

.PHONY: train test lint bench notebooks clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(BASE): setup.py | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e .
	touch $@

# dev: pytest, ruff and the notebook runner; hf: torch (CPU) and transformers for the parity tests;
# deepseek: DeepSeek's tokenizer (data.tokenizer=deepseek).
$(TESTS): setup.py | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e ".[dev,hf,deepseek]"
	touch $@

train: $(BASE)
	$(PY) -m deepseek_jax.train --config=configs/tiny.py --workdir=runs/tiny

# Lint first (ruff, configured in pyproject.toml), so CI enforces it. pytest exits 5 when it collects no
# test: that is a failure here, never a pass. The 15 slowest tests are listed at the end. Two pytest-xdist
# workers: most tests are bound by XLA's compiler, which uses one core, so two workers take the suite from
# about 16 to 8.5 minutes on a 2-core machine (worksteal: a worker that runs out takes tests from the other;
# measured 505 s against 547 s with whole files per worker, and 569 s with three workers). TEST_WORKERS=0
# runs it in one process.
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist worksteal tests

lint: $(TESTS)
	$(VENV)/bin/ruff check deepseek_jax tests experiments configs

bench: $(BASE)
	$(PY) experiments/bench_train.py

# Full-size runs; executed copies (with outputs) go to runs/notebooks/, the stored ones stay clean.
notebooks: $(TESTS)
	$(PY) experiments/run_notebooks.py

clean:
	rm -rf $(VENV) runs
