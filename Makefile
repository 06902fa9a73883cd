# make install | demo | test | test-fast | lint | bench | chaos
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint bench chaos clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(BIN)/observer-tasks demo

# Three pytest-xdist processes, each with its own databases, vhost and ports (tests/conftest.py); then, alone,
# the tests marked serial (they restart a server the others share, or time calls against their cap). N=0 runs
# everything in one process.
N ?= 3
XDIST = $(if $(filter 0,$(N)),-p no:xdist,-n $(N) --dist worksteal)
test: install
	$(BIN)/pytest $(XDIST) -m 'not serial'
	$(BIN)/pytest -p no:xdist -m serial

# Everything but the slow fault tests (process kills, Redis restarts).
test-fast: install
	$(BIN)/pytest $(XDIST) -m 'not slow and not serial'

lint: install
	$(BIN)/ruff check observer_tasks tests benchmarks celeryconfig.py
	$(BIN)/mypy observer_tasks celeryconfig.py

bench: install
	$(PY) benchmarks/bench.py

# The seeded chaos soak and its independent checker (docs/reliability.md, "The chaos soak"): prints the fault
# schedule, then the checker's table; exits non-zero when any figure is not zero. Ports 7100-7199 (CHAOS_PORTS),
# RabbitMQ vhost h1 (CHAOS_AMQP_URL); KEEP=dir keeps the run's logs and records there.
# E.g. make chaos SEED=3 MINUTES=10 BROKER=amqp DOWN_AFTER_MS=30000
SEED ?= 1
MINUTES ?= 2
BROKER ?= redis
DOWN_AFTER_MS ?= 5000
KEEP ?=
chaos: install
	$(PY) -m tests.chaos --seed $(SEED) --minutes $(MINUTES) --broker $(BROKER) --down-after-ms $(DOWN_AFTER_MS) \
	  $(if $(KEEP),--keep $(KEEP))

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
