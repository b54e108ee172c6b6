# The README's commands. Each creates ./.venv (if missing) and installs lct into it.
# make test: every tier (CI, .ci/run); make test-fast: without the `proc`, `slow` and `demo` tiers
# (no process started, nothing trained; pyproject's markers), the loop while editing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo test test-fast

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test]"
	$(BIN)/python -m lct.deepspeed_ops

demo: install
	$(BIN)/python -m lct.demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q --durations=25 $(TEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q --durations=15 -m "not proc and not slow and not demo" $(TEST_ARGS)
