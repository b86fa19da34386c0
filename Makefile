# Two commands on a fresh machine: `make run` and `make test`. `make help` lists the rest.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
UV_VERSION := 0.13.9
KERNEL := mlops-notebooks

export PATH := $(BIN):$(PATH)
export BENTOML_HOME := $(CURDIR)/.bentoml
export BENTOML_DO_NOT_TRACK := True
export WHYLOGS_NO_ANALYTICS := True
export OMP_NUM_THREADS ?= 1
export PYTHONWARNINGS ?= ignore::UserWarning:papermill.iorw

.PHONY: help setup setup-spark data run test check lock clean review serve audit lab

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-8s %s\n", $$1, $$2}'

setup: $(VENV)/.setup-done $(VENV)/.git-notebooks-done ## create .venv from requirements.lock, install the package, the Jupyter kernel and the notebook git drivers

# --compile-bytecode: every stage, kernel, server worker and CLI call is a new Python process;
# where bytecode is not written at import (PYTHONDONTWRITEBYTECODE, a read-only venv) each
# would compile its imports from source again (several seconds of CPU for bentoml + pandas).
$(VENV)/.setup-done: requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 (see README)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	"$(BIN)"/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	"$(BIN)"/uv pip sync --quiet --compile-bytecode --python "$(BIN)"/python requirements.lock
	"$(BIN)"/uv pip install --quiet --python "$(BIN)"/python --no-deps -e .
	"$(BIN)"/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python 3 ($(KERNEL))" >/dev/null
	@touch $@
	@echo "setup done: .venv (Python $$("$(BIN)"/python -c 'import platform; print(platform.python_version())')), kernel $(KERNEL)"

data: setup ## obtain data/: pull from the DVC remote, else regenerate and verify against data.dvc
	"$(BIN)"/mlops data obtain

run: data ## run the whole pipeline (dvc repro), push outputs to the DVC remote, print a summary
	@start=$$(date +%s); \
	"$(BIN)"/mlops params check && \
	"$(BIN)"/dvc repro && \
	{ "$(BIN)"/dvc push --quiet || echo "note: dvc push failed; outputs are still in the local cache"; } && \
	"$(BIN)"/mlops summary && \
	echo "make run: pipeline finished in $$(( $$(date +%s) - start ))s"

# The optional Spark engine (features.engine: spark): pyspark and py4j, pinned in
# requirements-spark.lock against requirements.lock. Java comes from the system.
setup-spark: $(VENV)/.spark-done ## add the optional Spark engine to .venv (requirements-spark.lock)

$(VENV)/.spark-done: $(VENV)/.setup-done requirements-spark.lock
	"$(BIN)"/uv pip install --quiet --compile-bytecode --python "$(BIN)"/python --no-deps -r requirements-spark.lock
	@touch $@

test: setup setup-spark ## run the whole test suite (with the optional Spark engine)
	"$(BIN)"/python -m pytest

check: setup ## ruff (format + lint), mypy on pipelines/, the layer contract, notebooks carry no outputs, dependency audit
	"$(BIN)"/ruff format --check pipelines bentos tests benchmarks
	"$(BIN)"/ruff check pipelines bentos tests benchmarks
	"$(BIN)"/mypy pipelines
	"$(BIN)"/lint-imports --no-cache
	"$(BIN)"/mlops notebooks check
	$(PIP_AUDIT_RUN)
	"$(BIN)"/python -m pipelines.cli.audit $(AUDIT_REPORT)

lock: ## re-resolve requirements.lock (and requirements-spark.lock, the spark extra) from pyproject.toml, every dependency pinned with hashes
	"$(BIN)"/uv pip compile pyproject.toml --extra dev --python-version 3.11 --generate-hashes --quiet -o requirements.lock
	"$(BIN)"/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['spark'], sep='\n')" \
	  | "$(BIN)"/uv pip compile - -c requirements.lock --python-version 3.11 --generate-hashes --quiet -o requirements-spark.lock

# Repo-local git config for notebooks: nbstripout strips outputs on commit, nbdime diffs and
# merges them (the attributes are in .gitattributes). Re-run when .gitattributes changes.
$(VENV)/.git-notebooks-done: $(VENV)/.setup-done .gitattributes
	@if git rev-parse --git-dir >/dev/null 2>&1; then "$(BIN)"/mlops notebooks git-setup; fi
	@touch $@

BASE ?= main
review: setup ## review report of the working tree vs BASE (default main): reports/review/review.{md,html}
	"$(BIN)"/mlops review --base $(BASE)

PORT ?= 8888
lab: setup ## JupyterLab on 127.0.0.1:PORT (token printed), project root, kernel mlops-notebooks
	"$(BIN)"/mlops notebooks lab --port $(PORT)

serve: setup ## serve the built release bento on 127.0.0.1:3000 (docs/serving.md)
	MLOPS_PROJECT_ROOT="$(CURDIR)" "$(BIN)"/bentoml serve \
	  $$("$(BIN)"/python -c "import json; print(json.load(open('build/bento/bento.json'))['bento_tag'])") --port 3000

clean: ## remove the virtual environment and local BentoML store (data and DVC cache stay)
	rm -rf $(VENV) .bentoml

# Known vulnerabilities in the pinned dependencies (PyPI advisory service). Accepted findings are
# listed with their reason in docs/reliability.md and ignored here by id.
AUDIT_IGNORE :=
# pip-audit runs in uv's isolated tool environment at a pinned version: it cannot share the
# project's lock (pip-audit >= 2.10 needs platformdirs >= 4, whylogs 1.6.4 caps it below 4).
PIP_AUDIT := pip-audit==2.10.1
AUDIT_REPORT := build/audit/pip-audit.json
# pip-audit exits 1 on a finding; pipelines.cli.audit reads its report and gives the verdict.
PIP_AUDIT_RUN = mkdir -p $(dir $(AUDIT_REPORT)) && rm -f $(AUDIT_REPORT) && { "$(BIN)"/uv tool run --quiet --from $(PIP_AUDIT) pip-audit --requirement requirements.lock --require-hashes --disable-pip --vulnerability-service pypi --progress-spinner off --format json --output $(AUDIT_REPORT) $(foreach id,$(AUDIT_IGNORE),--ignore-vuln $(id)) || true; }
audit: setup ## pip-audit of requirements.lock (hash-checked); fails on a vulnerability or an unaudited package
	$(PIP_AUDIT_RUN)
	"$(BIN)"/python -m pipelines.cli.audit $(AUDIT_REPORT) --require-audited
