#!/usr/bin/env bash
# The whole test suite: lint, types, then pytest (real vLLM on the CPU included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check lmc_connector tests benchmarks examples
.venv/bin/ruff format --check lmc_connector tests benchmarks examples
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
