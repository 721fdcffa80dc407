# `make train` and `make test` bootstrap .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= dev

.PHONY: venv train test bench notebooks lint clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

train: $(STAMP)
	$(PY) -m deepseek_jax.train --config=configs/tiny.py --workdir=runs/tiny

# pytest exits 5 when it collects no test: that is a failure here, never a pass.
test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) experiments/bench_train.py

clean:
	rm -rf $(VENV) runs
