# slimserve: `make test` and `make demo` work on a fresh machine (Python 3.11, no GPU).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/tiny.yaml
STAMP := $(VENV)/.installed

.PHONY: venv test demo artifacts lint format clean-artifacts help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)  ## create .venv and install slimserve with [dev]

test: $(STAMP)  ## run the whole test suite (what CI runs)
	$(BIN)/python -m pytest -q

artifacts: $(STAMP)  ## build the default profile's variants (slimserve build)
	$(BIN)/slimserve build --config $(CONFIG)

demo: artifacts  ## build the default artifacts and show what was built
	@echo "built the variants above; serving and the dashboard arrive with their issues"

lint: $(STAMP)  ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## ruff format + autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-artifacts:  ## remove built artifacts (keeps .venv)
	rm -rf artifacts
