#!/usr/bin/env bash
# The whole test suite: lint, types, then pytest (real vLLM on the CPU included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/system_deps.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check lmc_connector tests benchmarks examples
.venv/bin/ruff format --check lmc_connector tests benchmarks examples
.venv/bin/mypy
# The walk-through's trained model: trained once per checkout (about two minutes), with
# progress here rather than inside a test's time limit; reused afterwards.
.venv/bin/python -m examples.tiny_model .models/trained-llama --trained
.venv/bin/python -m pytest "$@"
