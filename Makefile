# mibi-node: `make demo` and `make test` each work alone on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The tested builds of torch; CPU-only machines run them fine.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test serve lint bench peers clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt $(TORCH)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

peers:
	bash scripts/install-peers.sh

demo: venv
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

serve: venv
	$(BIN)/mibi-node serve

lint: venv
	$(BIN)/ruff check mibi_node training tests benchmarks scripts
	$(BIN)/ruff format --check mibi_node training tests benchmarks scripts
	$(BIN)/mypy

bench: venv
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
