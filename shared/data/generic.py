"""Loader for the generic format: any implicit-feedback data set as two CSV files.

``interactions.csv`` -- header ``user,item,timestamp`` plus an optional ``rating`` column;
ids are arbitrary strings, timestamps integers in any monotone unit (e.g. Unix seconds).
``items.csv`` -- header ``item,text`` plus optional ``title`` and ``genres`` (``A|B``) columns.
The language-model text is built as the MovieLens loaders build it (PROTOCOL.md: the title
plus the genres and any description), by :func:`format_item_text`: ``"Title. Genres: A, B."``
followed by ``text`` as the description. Without a title (no column, or an empty cell) the
text stands in for it; an item with neither a title nor genres keeps its ``text`` verbatim.
``title`` (default: the text) and ``genres`` also fill ``item_titles`` and
``item_categories``. Both files are UTF-8 (a byte-order mark is accepted). Unknown columns are
an error, so a misspelt column never goes unnoticed.
"""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np
import numpy.typing as npt

from shared.data.cleaning import (
    DEFAULT_MIN_USER_INTERACTIONS,
    Catalog,
    LoadedDataset,
    RawInteractions,
    csv_rows,
    finalize,
    format_item_text,
    parse_float,
    parse_int,
    require_file,
)
from shared.data.movielens import split_genres
from shared.errors import DataError

INTERACTIONS_FILE = "interactions.csv"
ITEMS_FILE = "items.csv"
INTERACTION_COLUMNS = ("user", "item", "timestamp")
INTERACTION_OPTIONAL_COLUMNS = ("rating",)
ITEM_COLUMNS = ("item", "text")
ITEM_OPTIONAL_COLUMNS = ("title", "genres")


def load_generic(
    data_dir: str | Path,
    *,
    name: str = "generic",
    min_user_interactions: int = DEFAULT_MIN_USER_INTERACTIONS,
    interactions_file: str = INTERACTIONS_FILE,
    items_file: str = ITEMS_FILE,
) -> LoadedDataset:
    """Load ``interactions.csv`` + ``items.csv`` from ``data_dir`` and apply the filters."""
    root = Path(data_dir)
    interactions = require_file(root / interactions_file, name)
    catalog = read_generic_items(require_file(root / items_file, name))
    raw = read_generic_interactions(interactions)
    return finalize(name, raw, catalog, min_user_interactions)


def read_generic_items(path: Path) -> Catalog:
    """Parse ``items.csv`` into a catalog (file order; the catalog warns of empty texts).

    The item text is :func:`item_text` of the row, so ``title`` and ``genres`` reach the
    language model as they do for MovieLens."""
    ids: list[str] = []
    texts: list[str] = []
    titles: list[str] = []
    categories: list[list[str]] = []
    lines: list[int] = []
    for line, row in csv_rows(path, ITEM_COLUMNS, ITEM_OPTIONAL_COLUMNS):
        ids.append(_required(row, "item", path, line))
        lines.append(line)
        text, title = row["text"].strip(), row.get("title", "").strip()
        genres = split_genres(row.get("genres", ""))
        texts.append(item_text(text, title, genres))
        titles.append(title or text)  # empty: the text
        categories.append(genres)
    return Catalog(path, ids, titles, categories, texts, lines)


def item_text(text: str, title: str, genres: list[str]) -> str:
    """The language-model text of one ``items.csv`` row: :func:`format_item_text` of the
    title (else the text), the genres and the text as description (not repeated when it is the
    title); ``text`` verbatim when the row has neither a title nor genres, as before those
    columns were read."""
    if not title and not genres:
        return text
    description = text if title and text != title else ""
    return format_item_text(title or text, genres, description)


def read_generic_interactions(path: Path) -> RawInteractions:
    """Parse ``interactions.csv``; non-integer timestamps and non-numeric ratings raise.

    Each user and item id is interned as it is read: a row keeps an 8-byte code, each
    distinct id one string (:class:`RawInteractions`' names), not a string per row."""
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    user_codes, item_codes, stamps = array("q"), array("q"), array("q")
    for line, row in csv_rows(path, INTERACTION_COLUMNS, INTERACTION_OPTIONAL_COLUMNS):
        user = _required(row, "user", path, line)
        item = _required(row, "item", path, line)
        stamps.append(parse_int(row["timestamp"].strip(), path, line, "timestamp"))
        if "rating" in row:
            parse_float(row["rating"].strip(), path, line, "rating")  # validated, then unused
        user_codes.append(users.setdefault(user, len(users)))
        item_codes.append(items.setdefault(item, len(items)))
    user_column, user_names = _sorted_codes(user_codes, users)
    item_column, item_names = _sorted_codes(item_codes, items)
    return RawInteractions(
        path,
        user_column,
        item_column,
        np.frombuffer(stamps, dtype=np.int64),
        user_names,
        item_names,
    )


def _sorted_codes(
    codes: array[int], table: dict[str, int]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.str_]]:
    """``codes`` (first-seen order, ``table``'s) renumbered into the distinct, sorted names
    :class:`RawInteractions` wants, with those names. The names are a numpy string array, as
    the id column was: ids that numpy holds as one string (it drops trailing NULs) are one."""
    names, rank = np.unique(np.asarray(list(table), dtype=str), return_inverse=True)
    return rank[np.frombuffer(codes, dtype=np.int64)], names


def _required(row: dict[str, str], column: str, path: Path, line: int) -> str:
    """The stripped value of ``column``; an empty id is an error, not a new id ``""``."""
    value = row[column].strip()
    if not value:
        raise DataError(f"{path}, line {line}: column {column!r} is empty")
    return value
