# Two commands do all the set-up on a fresh machine: `make quickstart`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first, pinned: here it resolves to the CPU wheel on disk, elsewhere to the
# platform's build. An unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: venv quickstart test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

quickstart: venv
	$(BIN)/haipai fit --config configs/quickstart.yaml

test: venv
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) lightning_logs .haipai_cache
