# Two entry points, both self-contained on a fresh machine:
#   make quickstart   create .venv, install, run SFT then GRPO on arithmetic on CPU (about 9 minutes)
#   make test         create .venv, install .[dev], run the default test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: quickstart test test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m experiments.grpo_gain

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m slow

bench: $(STAMP)
	$(PY) -m benchmarks.decode
	$(PY) -m benchmarks.forward_backward
	$(PY) -m benchmarks.sft
	$(PY) -m benchmarks.grpo_step

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
