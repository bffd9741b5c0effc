# Set-up and run targets. torch is installed FIRST and pinned to the local CPU wheel by default;
# a GPU user picks their own build:  make test TORCH_SPEC="torch==2.5.1 --index-url ..."
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "Installing into $(VENV) (torch first: $(TORCH_SPEC)); about a minute on a fresh machine"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	WANDB_MODE=offline $(BIN)/python -m recipes.digits_debugging

test: install
	WANDB_MODE=offline $(BIN)/python -m pytest --durations=10

lint: install
	$(BIN)/ruff check lightning_influence recipes tests benchmarks

clean:
	rm -rf $(VENV) outputs multirun wandb lightning_logs
