# The README's two commands. Each creates .venv on its own.
PY ?= python3
VENV := .venv
WORKDIR ?= runs/demo
PRESET ?= default

.PHONY: demo test setup setup-test

# Installed from the lock files (requirements/lock.sh makes them): every version and hash pinned,
# so two fresh machines get the same packages, and so the same embedded corpora and demo numbers.
$(VENV)/.installed: pyproject.toml requirements/demo.lock
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --require-hashes --no-deps -r requirements/demo.lock
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

# torch's CPU build (the hf extra's pin) is installed on its own: the lock holds no CUDA packages.
$(VENV)/.installed-test: $(VENV)/.installed requirements/test.lock
	$(VENV)/bin/pip install -q --require-hashes --no-deps -r requirements/test.lock
	$(VENV)/bin/pip install -q --no-deps torch==2.13.0
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/moesaic demo --workdir $(WORKDIR) --config moesaic/configs/demo.py:preset=$(PRESET)

test: $(VENV)/.installed-test
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest tests -n auto --dist loadfile
