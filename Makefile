# Two commands do everything on a fresh machine: `make run` (quick-start search) and `make test`.
# Each creates the virtualenv, installs normsearch and fetches the data it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# a bundled search space by name (`normsearch spaces` lists them) or a YAML path
CONFIG ?= quickstart
RUN_DIR ?= runs/quickstart
# CPU build of PyTorch for this project's machines. A GPU user overrides this, e.g.
#   make run TORCH='torch torchvision'        (PyPI's default Linux wheels are CUDA builds)
TORCH ?= torch==2.13.0 torchvision==0.28.0
PYTEST_ARGS ?=

.PHONY: install data run test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]' $(TORCH)
	touch $@

install: $(VENV)/.installed

data:
	@bash scripts/get_data.sh

run: install data
	$(BIN)/normsearch run $(CONFIG) --run-dir $(RUN_DIR)
	$(BIN)/normsearch export $(RUN_DIR)

test: install data
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
