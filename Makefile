# The two commands of the project: `make run` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

.PHONY: run test test-all
# The embedded model (trimode/embedded, trained by `trimode train`) in all three modes (and quadratic
# self-spec): prompts of the tasks it was trained on and a Python continuation, each with its tokens
# per forward.
run: $(BIN)/.installed
	@for mode in ar diffusion selfspec; do \
		echo "== $$mode"; \
		$(BIN)/trimode generate --mode $$mode --chat --max-tokens 48 "Sort: 42 7 19 3 88 15" "Add: 457 + 268" || exit 1; \
		$(BIN)/trimode generate --mode $$mode --max-tokens 48 "def read_lines(path):" || exit 1; \
	done
	@echo "== selfspec, quadratic (one forward per cycle)"
	@$(BIN)/trimode generate --mode selfspec --spec quadratic --block-length 8 --chat --max-tokens 48 \
		"Sort: 42 7 19 3 88 15" "Add: 457 + 268"

# pytest runs in two workers (pytest-xdist) of one torch thread each: the tiny models' matmuls gain
# little from a second thread, and half the suite waits on servers and subprocesses, so two
# single-threaded workers take some two thirds of one two-threaded run's time on 2 cores. mypy (about
# 30 s of CPU from a cold cache) runs beside them at the lowest priority, on what they leave idle
# (their timing checks must not feel it); both must pass.
test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@nice -n 19 $(BIN)/mypy > $(VENV)/mypy.log 2>&1 & types=$$!; \
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow" -n 2 --dist worksteal; tests=$$?; \
	wait $$types; typed=$$?; echo "mypy: $$(tail -1 $(VENV)/mypy.log)"; \
	if [ $$typed -ne 0 ]; then cat $(VENV)/mypy.log; fi; \
	[ $$tests -eq 0 ] && [ $$typed -eq 0 ]

test-all: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[dev,test]'
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q
