"""Co-occurrence item factors (teacher ID initialisation, bandit features) on hand-built data."""

from __future__ import annotations

import numpy as np
import pytest

from shared.errors import ConfigError
from shared.models.item_factors import cooccurrence_factors, unit_mean_square
from shared.models.teacher import TeacherConfig


def _two_blocks() -> list[np.ndarray]:
    """Users watch either {0, 1, 2} or {3, 4, 5}; item 6 is never watched."""
    return [np.array([0, 1, 2])] * 3 + [np.array([5, 4, 3])] * 2


def test_items_watched_together_get_the_same_factors_and_blocks_are_orthogonal() -> None:
    f = cooccurrence_factors(_two_blocks(), 7, 2)
    assert f.shape == (7, 2)
    np.testing.assert_allclose(f[0], f[1], atol=1e-9)
    np.testing.assert_allclose(f[0], f[2], atol=1e-9)
    np.testing.assert_allclose(f[3], f[5], atol=1e-9)
    assert abs(float(f[0] @ f[3])) < 1e-9  # nobody watched across the blocks
    assert np.all(f[6] == 0.0)  # an item nobody watched carries no collaborative signal
    # The normalised Gram of a block of 3 items is all ones / 1 (each item watched by the
    # same users): one eigenvalue 3, so every row of a block has norm sqrt(3) before the
    # final scaling, and the scaling makes the mean squared row norm 1.
    assert np.mean(np.sum(f * f, axis=1)) == pytest.approx(1.0)
    assert np.linalg.norm(f[0]) == pytest.approx(np.linalg.norm(f[3]))


def test_popularity_is_normalised_away() -> None:
    """Item 0 is watched 10x more than item 1, but they are always watched together."""
    seqs = [np.array([0, 1])] * 2 + [np.array([0, 2])] * 18
    f = cooccurrence_factors(seqs, 3, 1)
    # Without the 1/sqrt(popularity) normalisation item 0's loading would dominate.
    assert f[0, 0] > 0 and f[2, 0] > f[1, 0] > 0


def test_extra_dimensions_are_zero_and_results_are_deterministic() -> None:
    f = cooccurrence_factors(_two_blocks(), 7, 10)
    assert f.shape == (7, 10)
    assert np.all(f[:, 6:] == 0.0)  # at most n_items - 1 factors
    np.testing.assert_array_equal(f, cooccurrence_factors(_two_blocks(), 7, 10))
    assert cooccurrence_factors(_two_blocks(), 7, 0).shape == (7, 0)


def test_bad_sizes_are_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=">= 0"):
        cooccurrence_factors(_two_blocks(), 7, -1)
    with pytest.raises(ConfigError, match="id-init=random"):
        cooccurrence_factors([], 20_001, 4)
    with pytest.raises(ConfigError, match="id_init"):
        TeacherConfig(id_init="svd")  # type: ignore[arg-type]


def test_unit_mean_square_leaves_zeros_alone() -> None:
    assert np.all(unit_mean_square(np.zeros((3, 2))) == 0.0)
    x = unit_mean_square(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.mean(np.sum(x * x, axis=1)) == pytest.approx(1.0)
