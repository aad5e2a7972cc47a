#!/usr/bin/env bash
# Idempotent install into ./.venv: torch first (pinned), then the project with dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.fedrec-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch first, pinned: an unpinned range would resolve to a multi-GB CUDA build. Where
    # the registry's torch==2.13.0 is a CUDA build (plain PyPI on Linux), set
    # TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU one.
    .venv/bin/python -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
    .venv/bin/python -m pip install -q -e ".[dev]"
    touch "$stamp"
fi
