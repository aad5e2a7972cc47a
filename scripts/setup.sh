#!/usr/bin/env bash
# Idempotent install into ./.venv: torch first (pinned), then the project with dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup.sh: fedrec needs Python >= 3.11, and '$PY' is not one." >&2
    echo "Give another interpreter: PYTHON=python3.11 ./scripts/setup.sh" >&2
    exit 2
fi
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    # none yet, or one whose creation failed half-way (no ensurepip: Debian's python3-venv
    # missing), which every later run would otherwise reuse and fail on: made again
    "$PY" -m venv --clear .venv
fi
stamp=.venv/.fedrec-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch first, pinned: an unpinned range would resolve to a multi-GB CUDA build. Where
    # the registry's torch==2.13.0 is a CUDA build (plain PyPI on Linux), set
    # TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU one.
    .venv/bin/python -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
    .venv/bin/python -m pip install -q -e ".[dev]"
    touch "$stamp"
fi
