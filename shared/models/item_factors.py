"""Item factors from co-occurrence: a cheap, closed-form collaborative item space.

Used where a model needs item vectors that already reflect who-watched-what before any
gradient step: the teacher's ID table starts from them (``TeacherConfig.id_init``), and the
exploration policies use them as item features (``shared.bandits.features``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from shared.errors import ConfigError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

IdInit = Literal["cooccurrence", "random"]
"""How a model's ID table starts: from :func:`cooccurrence_factors` or at random."""
ID_INITS: tuple[str, ...] = get_args(IdInit)
DEFAULT_ID_INIT: IdInit = "cooccurrence"
"""The teacher's and the simulation's default."""

MAX_DENSE_ITEMS = 20_000
"""Largest catalog whose item-item Gram matrix is formed densely (20k^2 doubles = 3.2 GB)."""


def unit_mean_square(x: FloatArray) -> FloatArray:
    """``x`` scaled so its rows have mean squared norm 1 (unchanged if all zero)."""
    ms = float(np.mean(np.sum(x * x, axis=1))) if len(x) else 0.0
    return x / math.sqrt(ms) if ms > 0 else x


def cooccurrence_factors(sequences: Sequence[IntArray], n_items: int, dim: int) -> FloatArray:
    """Top eigenvectors of the popularity-normalised item-item co-occurrence matrix.

    The binary user-item matrix ``X`` is column-normalised by ``1/sqrt(popularity)`` (so the
    leading factors are tastes, not popularity) and the items get ``V sqrt(S)`` from
    ``X^T X = V S V^T``, rows scaled to unit mean square. Signs are fixed (each factor's
    largest loading is positive), so the result is deterministic. ``dim`` >= ``n_items``
    leaves the extra columns zero. Items nobody interacted with get zero rows.
    """
    if dim < 0:
        raise ConfigError(f"factor dim must be >= 0, got {dim}")
    if n_items > MAX_DENSE_ITEMS:
        raise ConfigError(
            f"co-occurrence factors form a dense {n_items} x {n_items} matrix; catalogs above "
            f"{MAX_DENSE_ITEMS} items need another initialisation (teacher id-init=random)"
        )
    out = np.zeros((n_items, dim))
    k = min(dim, n_items - 1)
    if k <= 0:
        return out
    gram = np.zeros((n_items, n_items))
    for seq in sequences:
        items = np.unique(np.asarray(seq, dtype=np.int64))
        gram[np.ix_(items, items)] += 1.0
    scale = 1.0 / np.sqrt(np.maximum(np.diag(gram), 1.0))
    gram *= scale[:, None] * scale[None, :]
    vals, vecs = np.linalg.eigh(gram)
    top = np.argsort(-vals, kind="stable")[:k]
    factors = vecs[:, top] * np.sqrt(np.maximum(vals[top], 0.0))
    signs = np.sign(factors[np.argmax(np.abs(factors), axis=0), np.arange(k)])
    signs[signs == 0] = 1.0
    out[:, :k] = factors * signs
    return unit_mean_square(out)
