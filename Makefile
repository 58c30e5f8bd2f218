# Entry points for people and CI. Every target that runs code bootstraps first (quick when
# nothing changed), so `make test` works on a fresh Debian machine.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
RULES := infra/prometheus/alerts.yml
RULES_TEST := infra/prometheus/alerts_test.yml
# Narrow a run: make test TESTS=tests/unit
TESTS ?= tests

.PHONY: help bootstrap demo test lint bench stack-down

help: ## List targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

bootstrap: ## Install OS packages and the .venv (idempotent)
	infra/bootstrap.sh

demo: bootstrap ## Run the end-to-end demo
	$(VENV)/bin/rtpipe demo

test: bootstrap ## Unit, integration and model tests (starts its own stack), then alert rules
	$(PY) -m pytest -q -x --durations=15 $(TESTS)
	promtool check rules $(RULES)
	promtool test rules $(RULES_TEST)

lint: ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy stages training infra bench

bench: bootstrap ## Throughput and latency benchmarks (bench/RESULTS.md)
	$(VENV)/bin/rtpipe bench

stack-down: ## Stop the stack of RTPIPE_HOME (default .rtpipe); e.g. RTPIPE_HOME=.rtpipe/test-29000
	$(PY) -m infra.cli down
