# make install | demo | test | test-fast | lint | bench
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(BIN)/observer-tasks demo

test: install
	$(BIN)/pytest

# Everything but the slow fault tests (process kills, Redis restarts).
test-fast: install
	$(BIN)/pytest -m 'not slow'

lint: install
	$(BIN)/ruff check observer_tasks tests benchmarks celeryconfig.py
	$(BIN)/mypy observer_tasks celeryconfig.py

bench: install
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
