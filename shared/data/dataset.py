"""The one typed dataset every loader produces and every model consumes.

Implicit feedback (``../shared/PROTOCOL.md``): every rating is one interaction. Users get
dense ids ``0..n-1`` in the order of their sorted raw ids (numerically when all are
integers), items in the order of the catalog (the item file), which the catalog fingerprint
pins; raw ids are kept so exports (``recs.csv``) speak the dataset's own language.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.errors import DataError

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Interactions:
    """Flat interaction log, already in dense ids.

    Rows are in file order; ``timestamp`` is seconds (any monotone unit works) and ``rating``
    is kept only for reference (the protocol treats every row as a positive).
    """

    user: IntArray
    item: IntArray
    timestamp: IntArray
    rating: FloatArray | None = None

    def __post_init__(self) -> None:
        n = len(self.user)
        if len(self.item) != n or len(self.timestamp) != n:
            raise DataError(
                f"interaction columns differ in length: user={n}, item={len(self.item)}, "
                f"timestamp={len(self.timestamp)}"
            )
        if self.rating is not None and len(self.rating) != n:
            raise DataError(f"rating column has {len(self.rating)} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.user)


@dataclass(frozen=True)
class RecDataset:
    """Users' chronological item sequences plus item text, in dense ids.

    ``sequences[u]`` holds user ``u``'s items sorted by time with a *stable* sort, so ties keep
    file order (the protocol's leave-one-out depends on it); ``timestamps[u]`` is aligned.
    """

    name: str
    user_ids: list[str]
    item_ids: list[str]
    item_text: list[str]
    sequences: list[IntArray]
    timestamps: list[IntArray]
    item_titles: list[str] = field(default_factory=list)
    item_categories: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.item_text) != len(self.item_ids):
            raise DataError(
                f"{self.name}: {len(self.item_ids)} items but {len(self.item_text)} texts"
            )
        if len(self.sequences) != len(self.user_ids) or len(self.timestamps) != len(self.user_ids):
            raise DataError(f"{self.name}: sequences/timestamps do not match the user count")
        n_items = len(self.item_ids)
        for u, seq in enumerate(self.sequences):
            if len(seq) and (seq.min() < 0 or seq.max() >= n_items):
                raise DataError(f"{self.name}: user {self.user_ids[u]} references unknown items")

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def fingerprint(self) -> str:
        """Content hash: same data gives the same key for caches of trained models."""
        h = hashlib.sha256(self.name.encode())
        h.update(str(self.n_users).encode())
        h.update(str(self.n_items).encode())
        for seq in self.sequences:
            h.update(np.ascontiguousarray(seq, dtype=np.int64).tobytes())
            h.update(b"|")
        for t in self.item_text:
            h.update(t.encode())
            h.update(b"\x00")
        return h.hexdigest()[:16]

    def summary(self) -> dict[str, float | int | str]:
        lengths = np.array([len(s) for s in self.sequences]) if self.sequences else np.zeros(1)
        return {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "density": self.n_interactions / max(1, self.n_users * self.n_items),
            "median_seq_len": float(np.median(lengths)),
        }


def build_dataset(
    name: str,
    raw_user: list[str] | npt.NDArray[np.str_] | IntArray,
    raw_item: list[str] | npt.NDArray[np.str_] | IntArray,
    timestamp: IntArray,
    item_ids: list[str],
    item_text: list[str],
    item_titles: list[str] | None = None,
    item_categories: list[list[str]] | None = None,
    *,
    user_names: npt.NDArray[np.str_] | None = None,
    item_names: npt.NDArray[np.str_] | None = None,
) -> RecDataset:
    """Turn raw-id interaction columns into a :class:`RecDataset`.

    ``item_ids``/``item_text`` define the catalog (in that order); every interaction item must
    be in it (loaders filter and log unknown items before calling this). Raw ids are strings,
    or integers (MovieLens), each then the id of its decimal string; integer columns are kept
    as they are, never turned into fixed-width strings (``<U21``: 84 bytes a row, several GB
    per column for ml-25m's 25M ratings). With ``user_names``/``item_names`` that column
    holds integer codes into the table instead, each distinct id once, sorted (see
    :class:`~shared.data.cleaning.RawInteractions`); the dataset is the same as from the ids.
    """
    item_dense = _catalog_positions(name, _id_column(raw_item), item_ids, item_names)
    user_ids, user_dense = _dense_ids(_id_column(raw_user), user_names)
    order = np.lexsort((timestamp, user_dense))  # a stable sort: ties in time keep row order
    bounds = [0, *np.cumsum(np.bincount(user_dense, minlength=len(user_ids))).tolist()]
    del user_dense  # each sorted column is built, split and freed in turn: 8 bytes a row each
    sequences = _split(item_dense[order], bounds)
    del item_dense
    timestamps = _split(np.asarray(timestamp, dtype=np.int64)[order], bounds)
    return RecDataset(
        name=name,
        user_ids=user_ids,
        item_ids=list(item_ids),
        item_text=list(item_text),
        sequences=sequences,
        timestamps=timestamps,
        item_titles=list(item_titles) if item_titles is not None else [],
        item_categories=list(item_categories) if item_categories is not None else [],
    )


def _split(column: IntArray, bounds: list[int]) -> list[IntArray]:
    """``column[bounds[u]:bounds[u + 1]]`` for every user ``u``, each its own array."""
    return [column[start:end].copy() for start, end in itertools.pairwise(bounds)]


def _as_integer(raw: str) -> int | None:
    """``raw`` as an integer when it is one written in ASCII digits (an optional leading
    ``-``), else None: ``"³"`` passes ``str.isdigit`` but is no number to sort by."""
    digits = raw[1:] if raw.startswith("-") else raw
    return int(raw) if digits.isascii() and digits.isdigit() else None


def _id_column(raw: list[str] | npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``raw`` as an array of integer ids, or else of their strings (not copied when it
    already is one)."""
    column = np.asarray(raw)
    return column if column.dtype.kind in "iu" else column.astype(str, copy=False)


def _catalog_positions(
    name: str,
    raw: npt.NDArray[Any],
    item_ids: list[str],
    names: npt.NDArray[np.str_] | None = None,
) -> IntArray:
    """The catalog position of every raw item id (``names[raw]`` when ``names`` is given:
    codes); an id not in ``item_ids`` (the first in row order) is a :class:`DataError`. Each
    distinct id is looked up once, not each row."""
    uniq, codes = np.unique(raw, return_inverse=True) if names is None else (names, raw)
    index = {iid: i for i, iid in enumerate(item_ids)}
    positions = np.asarray([index.get(str(v), -1) for v in uniq.tolist()], dtype=np.int64)
    dense = positions[codes]
    if len(dense) and dense.min() < 0:
        first = str(uniq[codes[int(np.argmax(dense < 0))]])  # '8', not np.str_('8')
        raise DataError(f"{name}: interaction references item {first!r} that is not in the catalog")
    return dense


def _dense_ids(
    raw: npt.NDArray[Any], names: npt.NDArray[np.str_] | None = None
) -> tuple[list[str], IntArray]:
    """Dense ids ordered by raw id (numerically when all raw ids are integers, as they are
    in an integer column). With ``names`` (distinct and sorted), ``raw`` holds codes into it:
    the ids are ``names[raw]``, and only the names in use get a dense id."""
    if names is None:
        uniq, inverse = np.unique(raw, return_inverse=True)
    else:  # as np.unique(names[raw]): names already sorted, so keep those in use, in order
        used = np.bincount(raw, minlength=len(names)) > 0
        uniq, inverse = names[used], (np.cumsum(used) - 1)[raw]
    if uniq.dtype.kind not in "iu":
        numbers = [_as_integer(u) for u in uniq.tolist()]
        integers = [n for n in numbers if n is not None]
        if len(integers) == len(numbers):  # Python ints: any size, no overflow
            order = np.asarray(sorted(range(len(uniq)), key=integers.__getitem__), dtype=np.intp)
            rank = np.empty_like(order)
            rank[order] = np.arange(len(order))
            uniq, inverse = uniq[order], rank[inverse]
    return [str(u) for u in uniq.tolist()], inverse.astype(np.int64, copy=False)
