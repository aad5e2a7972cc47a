"""Shared fixtures: tiny hand-made datasets and models, and the real ML-100K path (read in
place)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from shared.data.dataset import RecDataset, build_dataset

if TYPE_CHECKING:
    from shared.models.student import StudentModel

# A suite started in the background of a non-interactive shell (`pytest &`, nohup) inherits
# SIGINT ignored, and so would every process it starts: the tests of what Ctrl-C does then
# failed ("the signal did not stop the run"). They run under Python's own handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ML100K = Path(
    os.environ.get(
        "FEDREC_ML100K", Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k"
    )
)


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Caches go to a per-session temp dir so tests never touch the user's cache."""
    monkeypatch.setenv("FEDREC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@contextlib.contextmanager
def flower_log(
    caplog: pytest.LogCaptureFixture, level: int = logging.INFO
) -> Iterator[pytest.LogCaptureFixture]:
    """``caplog`` with the records of Flower's logger (the apps' and the workflow's log) at
    ``level``: that logger does not pass its records on to the root logger's handlers, where
    ``caplog`` listens, so in a full run (once Flower has configured it) ``caplog`` saw none,
    and an earlier test may have left the logger above ``level``."""
    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.addHandler(caplog.handler)
    try:
        with caplog.at_level(level, logger=FLOWER_LOGGER.name):
            yield caplog
    finally:
        FLOWER_LOGGER.removeHandler(caplog.handler)


@pytest.fixture
def ml100k_dir() -> Path:
    if not (ML100K / "u.data").exists():
        pytest.skip(f"MovieLens 100K not found at {ML100K}")
    return ML100K


def make_dataset(
    n_users: int = 40, n_items: int = 30, length: int = 12, seed: int = 0
) -> RecDataset:
    """Small random dataset with block structure (users like items of their group)."""
    rng = np.random.default_rng(seed)
    users, items, ts = [], [], []
    for u in range(n_users):
        group = u % 3
        pool = np.arange(n_items)[np.arange(n_items) % 3 == group]
        chosen = rng.choice(pool, size=min(length, len(pool)), replace=False)
        extra = rng.choice(n_items, size=2, replace=False)
        for t, i in enumerate(np.concatenate([chosen, extra])):
            users.append(f"u{u}")
            items.append(f"i{i}")
            ts.append(1000 + t)
    item_ids = [f"i{i}" for i in range(n_items)]
    text = [f"item {i} group {i % 3}" for i in range(n_items)]
    return build_dataset("toy", users, items, np.array(ts), item_ids, text)


@pytest.fixture
def toy_dataset() -> RecDataset:
    return make_dataset()


def dependency_floor(name: str) -> str:
    """The lower bound ``name>=X`` that pyproject.toml declares for a runtime dependency: what
    a fresh install may resolve to, so the code must work with it."""
    import re
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pattern = re.compile(rf"{re.escape(name)}(?:\[[^\]]*\])?>=([\d.]+)(?:,.*)?")
    floors = [
        match.group(1)
        for dep in project["project"]["dependencies"]
        if (match := pattern.fullmatch(dep.split(";")[0].strip()))
    ]
    assert len(floors) == 1, f"pyproject.toml declares no single {name}>=X: {floors}"
    return floors[0]


def tiny_student(n_items: int, dim: int = 16) -> StudentModel:
    """A seeded, untrained student of width ``dim`` over ``n_items`` items (8-d tables)."""
    import torch

    from shared.models.student import StudentConfig, StudentModel

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    return StudentModel(
        rng.normal(size=(n_items, 8)).astype(np.float32),
        rng.normal(size=(n_items, 8)).astype(np.float32),
        StudentConfig(dim=dim, max_len=10, text_dim=8, id_dim=8),
    )


def _write_tiny_bundle(path: Path, n_items: int) -> list[str]:
    """:func:`tiny_student` (16-d) saved as a pretrained bundle at ``path`` (item ids
    ``item-0``...); returns the item ids."""
    from shared.federated.bundle import save_bundle

    item_ids = [f"item-{i}" for i in range(n_items)]
    save_bundle(path, tiny_student(n_items), None, item_ids)
    return item_ids


@pytest.fixture
def write_tiny_bundle() -> Callable[[Path, int], list[str]]:
    """Writes a tiny student bundle: ``write_tiny_bundle(path, n_items) -> item ids``."""
    return _write_tiny_bundle


def _load_bench(name: str) -> ModuleType:
    """The benchmark script ``bench/<name>.py`` as a module (``bench/`` is not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_bench() -> Callable[[str], ModuleType]:
    """Import a benchmark script by name, for tests of its helpers."""
    return _load_bench


class CapturedPipeline:
    """``simulation.pipeline.run_pipeline`` replaced (:func:`captured_pipeline`): each call
    records the config the command built in :attr:`seen` and raises :class:`Stop`, so a CLI
    test sees what ``fedrec simulate`` would run and nothing runs."""

    class Stop(Exception):
        """The stand-in pipeline was reached."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def __call__(self, config: Any, progress: Any = None) -> dict[str, Any]:
        self.seen.append(config)
        raise self.Stop


@pytest.fixture
def captured_pipeline(monkeypatch: pytest.MonkeyPatch) -> CapturedPipeline:
    import simulation.pipeline

    captured = CapturedPipeline()
    monkeypatch.setattr(simulation.pipeline, "run_pipeline", captured)
    return captured
