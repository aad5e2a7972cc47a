"""The one contract every recommender implements, baselines and neural models alike.

A model is fitted on training sequences and then scores the whole catalog *from a history*.
Scoring from a history (rather than from a user id) is what makes fold-in for few-shot users,
on-device scoring and the evaluation protocol the same call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from shared.data.dataset import IntArray
from shared.errors import DataError

ScoreArray = npt.NDArray[np.float32]


class Scorer(Protocol):
    """Anything that scores the catalog for a batch of histories."""

    @property
    def n_items(self) -> int: ...

    def score(self, histories: Sequence[IntArray]) -> ScoreArray:
        """Return a (len(histories), n_items) array; higher is better."""
        ...


class Recommender(ABC):
    """Base class: ``fit`` on training sequences, ``score`` histories."""

    name: str = "recommender"

    def __init__(self) -> None:
        self._n_items = 0

    @property
    def n_items(self) -> int:
        return self._n_items

    @abstractmethod
    def fit(self, sequences: Sequence[IntArray], n_items: int) -> Recommender:
        """Learn from users' chronological training sequences over ``n_items`` items."""

    @abstractmethod
    def score(self, histories: Sequence[IntArray]) -> ScoreArray:
        """Score every item for each history; shape (len(histories), n_items)."""


def check_histories(
    histories: Sequence[IntArray] | Sequence[Sequence[int]], n_items: int, what: str = "history"
) -> None:
    """Refuse (:class:`DataError`, naming the first bad one) histories that are not 1-D
    integer ids of the ``n_items``-item catalog; an empty history of any dtype passes.

    Without it a negative id was read by numpy's indexing as one from the catalog's end (a
    silently different history), an id past the catalog was torch's bare 'index out of
    range in self', and a float id was cut to an int. ``what`` names a history in the
    message (e.g. "training sequence")."""
    arrays = [np.asarray(h) for h in histories]
    for row, h in enumerate(arrays):
        if h.size and (h.ndim != 1 or h.dtype.kind not in "iu"):
            raise DataError(
                f"{what} #{row} is not a 1-D sequence of integer item ids (shape "
                f"{list(h.shape)}, dtype {h.dtype}); map raw ids through the model's catalog"
            )
    filled = [h for h in arrays if h.size]
    if not filled:
        return
    flat = np.concatenate(filled)
    if int(flat.min()) >= 0 and int(flat.max()) < n_items:
        return
    row = next(r for r, h in enumerate(arrays) if h.size and (h.min() < 0 or h.max() >= n_items))
    h = arrays[row]
    raise DataError(
        f"{what} #{row} has item ids outside [0, {n_items}) (min {int(h.min())}, max "
        f"{int(h.max())}), the model's catalog; map raw ids through the same catalog"
    )


def history_matrix(histories: Sequence[IntArray], n_items: int) -> npt.NDArray[np.float32]:
    """Binary (len(histories), n_items) matrix of the items in each history (checked with
    :func:`check_histories`)."""
    check_histories(histories, n_items)
    x = np.zeros((len(histories), n_items), dtype=np.float32)
    for row, h in enumerate(histories):
        if len(h):
            x[row, np.asarray(h, dtype=np.int64)] = 1.0
    return x
