# The two commands a fresh machine needs: `make book` and `make test` (both install first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -e .
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	touch $(STAMP)

test: $(STAMP)
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python -m pytest -q tests

# The book. `make book` builds the HTML into _build/html: explanatory chapters are executed
# (and cached) by the build; experiment chapters are rendered from book/generated/ (never re-run).
# `make execute` reruns the experiment notebooks with papermill, then rebuilds the book:
#   make execute [PROFILE=full|quick|smoke] [CHAPTER=fashion_mnist] [PARAMS="-p device cuda"]
# `make colab` writes the repository url and branch of _config.yml into the README's chapter table
# and the chapters' install cells, refreshes the committed .ipynb twin of every chapter, and
# re-renders the executed experiment copies whose source changed (the notebooks Colab opens).
PROFILE ?= full
CHAPTER ?=
PARAMS  ?=
NOTEBOOK_SOURCES = $(wildcard book/*.md book/experiments/*.md)

.PHONY: book execute colab

book: $(STAMP)
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python scripts/execute_notebooks.py --render
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/jupyter-book build --all -W --keep-going .

execute: $(STAMP)
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python scripts/execute_notebooks.py --profile $(PROFILE) \
		$(if $(CHAPTER),--chapter $(CHAPTER)) $(PARAMS)
	$(MAKE) book

colab: $(STAMP)
	$(BIN)/python scripts/sync_repository.py
	$(BIN)/jupytext --update --to ipynb $(NOTEBOOK_SOURCES)
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python scripts/execute_notebooks.py --render
