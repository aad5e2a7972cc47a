"""bench/synthetic_worlds.py's pooling of several generated worlds: each world's users are
their own people in the pooled paired intervals."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import numpy as np
import pytest

from shared.eval.protocol import CaseRanks


@pytest.fixture(scope="module")
def bench(load_bench: Callable[[str], ModuleType]) -> ModuleType:
    return load_bench("synthetic_worlds")


def _world(hits_a: list[float], hits_b: list[float]) -> dict[str, dict[str, CaseRanks]]:
    users = np.arange(len(hits_a), dtype=np.int64)  # every world numbers its users from 0
    return {
        name: {
            pop: CaseRanks(np.array(r, dtype=np.float64), np.array(r, dtype=np.float64), users)
            for pop in ("public", "federated")
        }
        for name, r in (("teacher", hits_a), ("ease (public users)", hits_b))
    }


def test_pooled_worlds_resample_every_worlds_users_apart(bench: ModuleType) -> None:
    """User 0 of world 3 and user 0 of world 7 are two people: pooled under their own
    numbers, the intervals drew them as one (a third of the users, each with every world's
    case), so the pooled 'users' was one world's count."""
    inf = np.inf
    one = _world([0, 0, inf], [inf, 0, inf])
    two = _world([inf, 0, 0], [inf, inf, 0])
    pooled = bench.pool_worlds([one, two], ["teacher", "ease (public users)"])
    assert pooled["teacher"]["federated"].users is not None
    assert len(set(pooled["teacher"]["federated"].users.tolist())) == 6
    d = bench.differences(pooled)["federated"]["teacher - ease (public users)"]["full_hr@10"]
    assert (d["users"], d["cases"]) == (6, 6)
    assert d["mean"] == pytest.approx(2 / 6)
    # the ranks themselves are the worlds' side by side, in order
    assert pooled["teacher"]["public"].full.tolist() == [0, 0, inf, inf, 0, 0]
