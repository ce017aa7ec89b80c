# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision builds that install from this machine's disk; GPU users may override, e.g.
# `make test TORCH_SPEC=torch` to keep the build they have.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# timm otherwise waits on the network for the HF hub.
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/qtvit demo

# The default suite stays within ~12 minutes on 2 CPU cores; longer end-to-end checks carry
# @pytest.mark.slow and run with `make test-slow`.
test: setup lint
	$(BIN)/python -m pytest -q -m "not slow" --durations=25

test-slow: setup
	$(BIN)/python -m pytest -q -m slow --durations=25

lint: setup
	$(BIN)/ruff check qtvit tests

bench: setup
	$(BIN)/qtvit bench attention --output bench_attention.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
