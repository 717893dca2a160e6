# The README's two commands. Each creates .venv on its own.
PY ?= python3
VENV := .venv
WORKDIR ?= runs/demo
PRESET ?= default

.PHONY: demo test setup setup-test

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(VENV)/bin/pip install -q -e '.[test,hf]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/moesaic demo --workdir $(WORKDIR) --preset $(PRESET)

test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest tests
