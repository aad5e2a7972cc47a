"""What produced a result: the command, the code version and the libraries, recorded with every
benchmark's JSON so that a figure can be traced to the code that measured it and rerun; and
the one-line error handling the benchmark scripts share.

A committed result without these could not be told apart from one measured by older code
(the federation emulator's early results no longer reproduce at later commits: the clients'
DP randomness and batching changed under them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shared.errors import ConfigError, FedRecError
from shared.eval.splits import check_seed
from shared.io import installed_version

__all__ = [
    "LIBRARIES",
    "code_version",
    "provenance",
    "require_counts",
    "require_seeds",
    "run_bench",
]

LIBRARIES = ("torch", "flwr", "opacus", "onnx", "onnxruntime", "transformers", "numpy", "ray")
"""The libraries whose versions move the figures (training, DP accounting, export, runtime)."""

_REPO = Path(__file__).resolve().parents[1]


def code_version() -> dict[str, Any]:
    """The git commit of this checkout and whether it had uncommitted changes to tracked
    files (``None`` for both outside a git checkout, e.g. an installed wheel)."""
    commit: str | None = None
    dirty: bool | None = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(_REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        commit = head.stdout.strip() or None
        status = subprocess.run(
            ["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        dirty = bool(status.stdout.strip())
    return {"commit": commit, "dirty": dirty}


_AT_IMPORT = code_version()
"""The code version when the benchmark started (its modules were loaded then): a commit made
while a long benchmark runs must not be recorded as what measured it."""


def provenance(script: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command (``python SCRIPT ARGS``, shell-quoted), the code version it started with,
    the library versions and the machine of a benchmark run."""
    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "command": shlex.join(["python", script, *args]),
        "code": dict(_AT_IMPORT),
        "libraries": {name: installed_version(name) for name in LIBRARIES},
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }


def require_counts(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Refuse (``parser.error``, exit 2) any of the options ``names`` (``dest`` names, e.g.
    ``"batch_size"`` for ``--batch-size``) below 1: a count of nothing to run or measure."""
    for name in names:
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def require_seeds(parser: argparse.ArgumentParser, seeds: Sequence[int]) -> None:
    """Refuse (``parser.error``, exit 2) ``--seeds`` that repeat one (its splits or worlds
    would be counted twice in a pooled figure) or that a split cannot take
    (:func:`shared.eval.splits.check_seed`)."""
    if len(set(seeds)) != len(seeds):
        parser.error(f"--seeds must be distinct, got {list(seeds)}")
    for seed in seeds:
        try:
            check_seed(seed)
        except ConfigError as err:
            parser.error(f"--seeds: {err}")


def run_bench(main: Callable[[], int | None]) -> int:
    """Run a benchmark's ``main``: a :class:`FedRecError` (bad input, a missing data folder,
    a refused setting) ends it with ``error: ...`` on one line and exit status 2, as the
    ``fedrec`` commands do, instead of a traceback."""
    try:
        return int(main() or 0)
    except FedRecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
