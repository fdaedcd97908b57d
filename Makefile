# Two commands set up everything on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install serve test test-fast test-gpu lint format clean bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints.txt pins the versions the suite was run with (torch 2.14.1 comes from local disk here)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	mkdir -p data
	$(BIN)/optim-service migrate
	$(BIN)/optim-service serve --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -n auto -q

# the engine and the service in this process (no server processes, no kill -9): a few minutes
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n auto -q -m "not slow" tests/engine tests/service

# on a CUDA host: the device-parametrized tests (engine parity per entry and implementation, kill -9 resume)
# on the GPU, with timm's bitsandbytes entries installed (pip install -e '.[cuda]')
test-gpu: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[cuda,dev]'
	$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here')"
	$(BIN)/python -m pytest -n 4 -q -m cuda tests/engine tests/faults/test_durability.py

# what hosting the optimizer costs, against in-process and the alternatives (~15 min; see bench/README.md)
bench: $(STAMP)
	$(BIN)/python bench/run.py

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
