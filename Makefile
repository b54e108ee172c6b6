# The two commands of the README. Both create ./.venv (if missing) and install lct into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test]"
	$(BIN)/python -m lct.deepspeed_ops

demo: install
	$(BIN)/python -m lct.demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q --durations=25 $(TEST_ARGS)
