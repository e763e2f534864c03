# The two commands of the project: `make run` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TINY := .cache/tiny

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(TINY)/config.json: $(BIN)/.installed
	$(BIN)/trimode make-checkpoint --preset tiny --draft-lora-rank 8 --out $(TINY)

.PHONY: run test test-all
# Until the embedded trained model ships, `run` uses a tiny checkpoint with RANDOM weights: the text
# is gibberish; what it shows is the three modes on one weight set and their forward counts.
run: $(TINY)/config.json
	@echo "NOTE: $(TINY) is a random-weight tiny checkpoint (no trained model is embedded yet): expect gibberish."
	@for mode in ar diffusion selfspec; do \
		$(BIN)/trimode generate --model $(TINY) --mode $$mode --max-tokens 64 --block-length 8 \
			"def fibonacci(n):" "import os" || exit 1; \
	done

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(BIN)/.installed
	$(BIN)/python -m pytest -q
