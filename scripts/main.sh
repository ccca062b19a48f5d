#!/usr/bin/env bash
# The main job: until the seed walk-through lands, the cache throughput benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python benchmarks/cache_throughput.py "$@"
