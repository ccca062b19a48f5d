#!/usr/bin/env bash
# The main job: the seed walk-through (compress and decompress the KV cache) against a real vLLM.
# Extra arguments go to the walk-through: --model DIR, --method fp8, --free-ports, --log-dir DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system_deps.sh
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m examples.walkthrough "$@"
