"""Shared fixtures: tiny hand-made datasets and the real ML-100K path (read in place)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from shared.data.dataset import RecDataset, build_dataset

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
