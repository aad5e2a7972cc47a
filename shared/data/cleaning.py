"""Validation and the documented, logged filters that every dataset loader applies.

Loaders parse their files into :class:`RawInteractions` (raw ids, file order) plus a
:class:`Catalog` (every item with its text), then call :func:`finalize`. It applies these
filters, in this order, logs each one with its counts, and builds the :class:`RecDataset`:

1. **Unknown items** -- interactions whose item is not in the catalog are dropped (logged as a
   warning): an item without text can be neither embedded nor recommended.
2. **Exact duplicates** -- rows with the same user, item *and* timestamp are dropped, keeping
   the first in file order: a copy of the test item in training would leak the answer.
3. **Repeats** -- a later interaction with an item the user already had is dropped, keeping
   the earliest: the protocol never recommends a seen item, so a repeated test item would be
   scored a hit that no recommendation list can contain, and one in training leaks the answer.
4. **Short users** -- users with fewer than ``min_user_interactions`` interactions (default 3:
   leave-one-out needs one train, one validation and one test item) are dropped.

Items nobody interacted with stay in the catalog: they are the cold items. Malformed input
(missing files, wrong columns, non-numeric values) is never guessed around: it raises a
:class:`DataError` that names the file, the line and what was expected, so a loader never
produces a silently wrong dataset. The counts are returned as a :class:`CleaningReport`.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import re
import shlex
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.config import is_int
from shared.data.dataset import IntArray, RecDataset, build_dataset
from shared.errors import ConfigError, DataError, DatasetNotFoundError
from shared.io import readable_path

logger = logging.getLogger(__name__)

DEFAULT_MIN_USER_INTERACTIONS = 3
"""Leave-one-out needs a train, a validation and a test interaction per user."""

ColumnKinds = Mapping[str, type[int] | type[float]]
"""Expected columns of a numeric table, in file order: name -> ``int`` or ``float``."""


@dataclass(frozen=True)
class CleaningReport:
    """How many rows each filter removed, so a CLI can show what happened to the data."""

    dataset: str
    source: str
    rows_read: int
    users_read: int
    unknown_items_dropped: int
    duplicates_dropped: int
    min_user_interactions: int
    short_users_dropped: int
    short_user_interactions_dropped: int
    users: int
    items: int
    cold_items: int
    interactions: int
    filtered: bool = True
    """False when the data was used as generated, without the filters (synthetic)."""
    repeats_dropped: int = 0
    """Later interactions with an item the user already had (see the module doc)."""

    def as_dict(self) -> dict[str, int | str | bool]:
        """Plain dict (JSON-ready) of every count."""
        return asdict(self)

    def lines(self) -> list[str]:
        """Human-readable summary, one line per filter."""
        head = (
            f"{self.dataset}: read {self.rows_read} interactions of {self.users_read} users "
            f"from {readable_path(self.source)}"
        )
        kept = (
            f"  kept {self.users} users, {self.items} items ({self.cold_items} cold: never "
            f"interacted with), {self.interactions} interactions"
        )
        if not self.filtered:
            return [head, "  no filters applied (generated data)", kept]
        return [
            head,
            f"  dropped {self.unknown_items_dropped} interactions with items not in the catalog",
            f"  dropped {self.duplicates_dropped} exact duplicates (same user, item, timestamp)",
            f"  dropped {self.repeats_dropped} repeats (an item the user already had; the "
            "earliest is kept)",
            f"  dropped {self.short_users_dropped} users with fewer than "
            f"{self.min_user_interactions} interactions "
            f"({self.short_user_interactions_dropped} interactions)",
            kept,
        ]

    def __str__(self) -> str:
        return "\n".join(self.lines())

    @classmethod
    def unfiltered(cls, dataset: RecDataset, source: str) -> CleaningReport:
        """Report for a dataset that was built without filtering (e.g. synthetic data)."""
        seen = {int(i) for seq in dataset.sequences for i in seq}
        return cls(
            dataset=dataset.name,
            source=source,
            rows_read=dataset.n_interactions,
            users_read=dataset.n_users,
            unknown_items_dropped=0,
            duplicates_dropped=0,
            min_user_interactions=0,
            short_users_dropped=0,
            short_user_interactions_dropped=0,
            users=dataset.n_users,
            items=dataset.n_items,
            cold_items=dataset.n_items - len(seen),
            interactions=dataset.n_interactions,
            filtered=False,
        )


@dataclass(frozen=True)
class LoadedDataset:
    """A loaded dataset together with the report of what cleaning removed."""

    dataset: RecDataset
    report: CleaningReport


@dataclass(frozen=True)
class Catalog:
    """Every item of a dataset, in file order; ``ids`` must be unique. Items whose text is
    empty (no title, no genres, no description) are logged as a warning, whatever the layout:
    the language model gives them all one embedding."""

    path: Path
    ids: list[str]
    titles: list[str]
    categories: list[list[str]]
    texts: list[str]
    lines: list[int] = field(default_factory=list)
    """The file line of each item (empty: unknown), for the errors: ids are normalised
    (MovieLens' ``"007"`` is ``"7"``), so an id alone may not be found in the file."""

    def __post_init__(self) -> None:
        n = len(self.ids)
        columns = (self.titles, self.categories, self.texts) + ((self.lines,) if self.lines else ())
        if any(len(column) != n for column in columns):
            raise DataError(f"{self.path}: catalog columns differ in length")
        if n == 0:
            raise DataError(f"{self.path}: the item file lists no items")
        if len(set(self.ids)) != n:
            dupes = sorted(i for i, count in Counter(self.ids).items() if count > 1)
            where = ""
            if self.lines:
                at = [
                    str(line) for i, line in zip(self.ids, self.lines, strict=True) if i == dupes[0]
                ]
                where = f", {dupes[0]!r} on lines {', '.join(at[:-1])} and {at[-1]}"
            raise DataError(
                f"{self.path}: item ids must be unique, but {len(dupes)} repeat "
                f"(e.g. {dupes[:5]}{where}); fix the file so every item appears once"
            )
        empty = [i for i, text in zip(self.ids, self.texts, strict=True) if not text.strip()]
        if empty:
            logger.warning(
                "%s: %d of %d items have an empty text (e.g. items %s)",
                readable_path(self.path),
                len(empty),
                n,
                empty[:5],
            )


@dataclass(frozen=True)
class RawInteractions:
    """Interaction columns in raw ids and file order, as parsed from ``path``.

    ``user``/``item`` hold integers: the ids themselves (MovieLens), turned into their decimal
    strings only when the dataset is built, or, with ``user_names``/``item_names`` (generic
    format), codes: row ``r``'s id is ``names[column[r]]``, the table holding each distinct
    id once, sorted (as ``np.unique`` gives them), so codes sort and compare as the ids do.
    A string per row (a Python object, or a fixed-width numpy cell) costs tens of bytes; an
    integer costs 8.
    """

    path: Path
    user: IntArray
    item: IntArray
    timestamp: IntArray
    user_names: npt.NDArray[np.str_] | None = None
    item_names: npt.NDArray[np.str_] | None = None

    def __len__(self) -> int:
        return len(self.user)

    def select(self, keep: npt.NDArray[np.bool_]) -> RawInteractions:
        """The rows where ``keep`` is true, order preserved (``self`` when that is every row:
        the columns are never written to, and a copy of ml-25m's costs 600 MB)."""
        if keep.all():
            return self
        return RawInteractions(
            self.path,
            self.user[keep],
            self.item[keep],
            self.timestamp[keep],
            self.user_names,
            self.item_names,
        )


# --------------------------------------------------------------------------- validation


def require_file(path: Path, dataset: str) -> Path:
    """``path`` if it is a file, else a :class:`DatasetNotFoundError` saying how to fix it."""
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{dataset}: required file {path} not found. Pass --data-dir PATH pointing at the "
            f"folder that holds the dataset's files, or download it (ml-100k, ml-1m and "
            f"ml-latest-small are downloaded automatically when --data-dir is omitted)."
        )
    return path


def check_min_user_interactions(value: int) -> int:
    """Validate the short-user threshold (an integer >= 1)."""
    if not is_int(value) or value < 1:
        raise ConfigError(f"min-user-interactions must be an integer >= 1, got {value!r}")
    return value


def column_index(
    path: Path, found: Sequence[str], required: Sequence[str], optional: Sequence[str] = ()
) -> dict[str, int]:
    """Map header names to positions; reject missing, unknown or repeated columns.

    Unknown columns are an error rather than ignored: a misspelt ``rating``/``timestamp``
    column would otherwise silently change the data.
    """
    names = [c.strip() for c in found]
    missing = [c for c in required if c not in names]
    unknown = [c for c in names if c not in required and c not in optional]
    repeated = sorted({c for c in names if names.count(c) > 1})
    if missing or unknown or repeated:
        expected = ",".join(required) + "".join(f"[,{c}]" for c in optional)
        problems = [f"missing {missing}"] if missing else []
        problems += [f"unexpected {unknown}"] if unknown else []
        problems += [f"repeated {repeated}"] if repeated else []
        raise DataError(
            f"{path}: expected the header {expected!r} but found {','.join(names)!r} "
            f"({'; '.join(problems)})"
        )
    return {name: i for i, name in enumerate(names)}


def csv_rows(
    path: Path, required: Sequence[str], optional: Sequence[str] = ()
) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line, {column: value})`` for every row of the UTF-8 CSV file ``path`` that is not
    blank, after its header is checked (:func:`column_index`); ``line`` is where the row
    starts (a quoted field may span lines).

    Quoting is read strictly: a quote that is never closed would otherwise swallow every
    later row into one field and load a silently shorter file. It, and a field past the csv
    module's size limit (the same slip in a large file), is a :class:`DataError` naming the
    line where that row starts."""
    warn_if_cut(path)
    expected = ",".join(required) + "".join(f"[,{c}]" for c in optional)
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)
        start = 1
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty; expected a header line {expected!r}")
            index = column_index(path, header, required, optional)
            while True:
                start = reader.line_num + 1
                row = next(reader, None)
                if row is None:
                    return
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(index):
                    raise DataError(
                        f"{path}, line {start}: expected {len(index)} columns "
                        f"({','.join(index)}), found {len(row)}: {row[:6]}"
                    )
                yield start, {name: row[i] for name, i in index.items()}
        except UnicodeDecodeError:
            raise not_decodable(path, "utf-8") from None
        except csv.Error as err:
            raise DataError(f"{path}, line {start}: {_csv_problem(err)}") from None


def _csv_problem(err: csv.Error) -> str:
    text = str(err)
    if "end of data" in text or "field limit" in text:
        return (
            "a quoted field starts in this row and is never closed (or runs past "
            f"{csv.field_size_limit():,} characters); close the quote, or double a quote "
            'that is part of the text ("")'
        )
    return f'malformed quoting ({text}); a quote inside a quoted field must be doubled ("")'


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""The range of the integer columns' array type."""


def _plain(value: str) -> bool:
    """Python's ``int``/``float`` also take ``1_000`` and digits of other scripts, which the
    fast numeric reader (``np.loadtxt``) does not: a number here is plain ASCII."""
    return value.isascii() and "_" not in value


def parse_int(value: str, path: Path, line: int, column: str) -> int:
    """``int(value)`` of a plain number (:func:`_plain`), or a :class:`DataError` naming
    file, line and column."""
    try:
        if not _plain(value):
            raise ValueError(value)
        number = int(value)
    except ValueError:
        raise DataError(
            f"{path}, line {line}: column {column!r} must be an integer"
            f"{' (e.g. Unix seconds)' if 'time' in column.lower() else ''}, found {value!r}"
        ) from None
    if not INT64_MIN <= number <= INT64_MAX:
        fix = (
            "give the time as integer seconds (e.g. Unix seconds), which fit in 64 bits"
            if "time" in column.lower()
            else "map such ids to smaller numbers (or load the file as 'generic', which takes "
            "string ids)"
        )
        raise DataError(
            f"{path}, line {line}: column {column!r} holds {value!r}, which does not fit a "
            f"64-bit integer; {fix}"
        )
    return number


def parse_float(value: str, path: Path, line: int, column: str) -> float:
    """``float(value)`` of a plain number (:func:`_plain`), or a :class:`DataError` naming
    file, line and column."""
    try:
        if not _plain(value):
            raise ValueError(value)
        return float(value)
    except ValueError:
        raise DataError(
            f"{path}, line {line}: column {column!r} must be a number, found {value!r}"
        ) from None


def not_decodable(path: Path, encoding: str) -> DataError:
    """The error for a file that does not decode as ``encoding``: its first bad line and
    byte, and the fix (every text layout this project reads is UTF-8 unless it is one of
    MovieLens' latin-1 originals)."""
    codec = "UTF-8" if encoding.replace("-", "").lower().startswith("utf8") else encoding
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as err:
                return DataError(
                    f"{path}, line {number}: not {codec} text (byte {raw[err.start]:#04x}); "
                    f"re-save the file as {codec}"
                )
    return DataError(f"{path} is not {codec} text; re-save the file as {codec}")


def read_numeric_table(
    path: Path, *, sep: str, columns: ColumnKinds, has_header: bool, encoding: str = "latin-1"
) -> dict[str, npt.NDArray[Any]]:
    """Read an all-numeric delimited file into one array per column (fast: ``np.loadtxt``).

    ``columns`` lists the expected columns in file order. With ``has_header`` the first line
    must name exactly those columns, in any order, quoted or not. Any malformed row raises a
    :class:`DataError` with the file, the line number and what was expected; blank lines (also
    of only spaces or tabs) are skipped; multi-character separators (ML-1M's ``::``) are
    supported.
    """
    names = list(columns)
    encoding = _numeric_encoding(path, encoding)
    try:
        if has_header:
            with path.open(encoding=encoding) as f:
                line = f.readline().rstrip("\r\n")
                below = not line.strip() and any(rest.strip() for rest in f)
            if below:  # not empty: rows under a blank line 1, where the header must be
                raise DataError(
                    f"{path}, line 1: blank, but the header {sep.join(names)!r} must be the "
                    "first line; remove the blank lines above it"
                )
            if not line.strip():
                raise DataError(f"{path} is empty; expected the header {sep.join(names)!r}")
            index = column_index(path, _header_fields(line, sep), names)
            names = sorted(names, key=index.__getitem__)  # file order
        dtype = np.dtype(
            [(f"c{i}", np.int64 if columns[n] is int else np.float64) for i, n in enumerate(names)]
        )
        try:
            table = _loadtxt(path, sep=sep, dtype=dtype, skip=int(has_header), encoding=encoding)
        except (UnicodeDecodeError, DataError):
            raise
        except ValueError as err:
            raise _diagnose(path, sep, names, columns, int(has_header), encoding, err) from None
    except UnicodeDecodeError:
        raise not_decodable(path, encoding) from None
    warn_if_cut(path)
    return {n: table[f"c{i}"] for i, n in enumerate(names)}  # views: no copy of the table


def _header_fields(line: str, sep: str) -> list[str]:
    """The column names of a header line. A one-character separator is read with the csv
    module, so quoted names (``"userId","movieId"``, as R's ``write.csv`` writes them) are
    accepted; a longer separator (only headerless layouts use one) is split on as is."""
    if len(sep) == 1:
        return next(csv.reader([line], delimiter=sep), [])
    return line.split(sep)


def _numeric_encoding(path: Path, encoding: str) -> str:
    """``encoding``, or ``utf-8-sig`` for a file that starts with UTF-8's byte-order mark
    (an editor's addition: the numbers are ASCII either way); UTF-16 is refused."""
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path} is UTF-16 text; re-save it as UTF-8 (or plain ASCII)")
    return encoding


def warn_if_cut(path: Path) -> None:
    """Warn when a non-empty file does not end with a line break: a copy cut mid-row still
    parses, its last row holding a shortened number (a timestamp, an id)."""
    with path.open("rb") as f:
        if f.seek(0, io.SEEK_END) == 0:
            return
        f.seek(-1, io.SEEK_END)
        if f.read(1) in b"\r\n":
            return
    logger.warning(
        "%s does not end with a line break: its last row may be cut short (an interrupted "
        "copy?); if so its values are wrong, so copy the file again",
        readable_path(path),
    )


_WHITESPACE_LINE = re.compile(r"^[ \t\f\v]+$", re.MULTILINE)
"""A line holding only spaces or tabs (``text`` with universal newlines)."""


def _blank_whitespace_lines(text: str) -> str:
    """``text`` with every line of only spaces or tabs emptied (the line count kept, so line
    numbers stay the file's): ``np.loadtxt`` skips empty lines but read such a line as a row
    of one column, while the movie lists and CSV readers skip it as blank."""
    return _WHITESPACE_LINE.sub("", text)


def _loadtxt(
    path: Path, *, sep: str, dtype: np.dtype[Any], skip: int, encoding: str
) -> npt.NDArray[Any]:
    """``np.loadtxt`` without comment handling; a long ``sep`` is rewritten to a tab first.

    A tab already in the file is refused first (:func:`_refuse_tab`): after the rewrite it
    would read as a separator, so a tab-separated copy (e.g. ML-100K's ``u.data`` layout
    under ML-1M's name) or a row mixing both loaded as if it were the ``::`` format, and a
    stray tab at a row's end was a numpy message without a line number. Lines of only
    spaces or tabs are skipped as blank (:func:`_blank_whitespace_lines`): a file refused
    is read once more without them, so a file without such lines pays nothing."""
    text = path.read_text(encoding=encoding) if len(sep) > 1 else None
    try:
        return _parse_table(path, text, sep, dtype, skip, encoding)
    except UnicodeDecodeError:
        raise
    except (DataError, ValueError):
        original = text if text is not None else path.read_text(encoding=encoding)
        blanked = _blank_whitespace_lines(original)
        if blanked == original:
            raise
    return _parse_table(path, blanked, sep, dtype, skip, encoding)


def _parse_table(
    path: Path, text: str | None, sep: str, dtype: np.dtype[Any], skip: int, encoding: str
) -> npt.NDArray[Any]:
    """:func:`_loadtxt` of ``text`` (``path``'s content), or of ``path`` itself when ``text``
    is None (a one-character ``sep`` only)."""
    if text is None:
        return _loadtxt_from(path, sep, dtype, skip, encoding)
    if len(sep) > 1:
        _refuse_tab(path, text, sep)
        text, sep = text.replace(sep, "\t"), "\t"
    # decoded as numpy reads it: a StringIO would hold the whole text as 4 bytes a character
    lines = io.TextIOWrapper(io.BytesIO(text.encode()), encoding="utf-8", newline="\n")
    del text
    return _loadtxt_from(lines, sep, dtype, skip, encoding)


def _loadtxt_from(
    source: Path | io.TextIOWrapper, delimiter: str, dtype: np.dtype[Any], skip: int, encoding: str
) -> npt.NDArray[Any]:
    """``np.loadtxt`` of ``source`` with this module's settings (no comments, 1-d)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
        return np.loadtxt(
            source,
            delimiter=delimiter,
            dtype=dtype,
            skiprows=skip,
            ndmin=1,
            comments=None,
            encoding=encoding,
        )


def _refuse_tab(path: Path, text: str, sep: str) -> None:
    """A :class:`DataError` naming the first line of ``text`` (``path``'s content, newlines
    already universal) that holds a tab, for a table whose columns ``sep`` separates."""
    at = text.find("\t")
    if at < 0:
        return
    number = text.count("\n", 0, at) + 1
    line = text.split("\n", number)[number - 1]
    raise DataError(
        f"{path}, line {number}: holds a tab, but this file's columns are separated by "
        f"{sep!r} (found {line[:80]!r}); a tab-separated copy is another layout (ML-100K's "
        f"u.data is one): convert it, every tab to {sep!r}, or load it as that layout"
    )


def _diagnose(
    path: Path,
    sep: str,
    names: Sequence[str],
    columns: ColumnKinds,
    skip: int,
    encoding: str,
    err: ValueError,
) -> DataError:
    """Find the first bad line of a table ``np.loadtxt`` rejected and describe it."""
    with path.open(encoding=encoding) as f:
        for number, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if number <= skip or not line.strip(" \t\f\v"):  # blank lines are skipped
                continue
            fields = line.split(sep)
            if len(fields) != len(names):
                return DataError(
                    f"{path}, line {number}: expected {len(names)} columns "
                    f"({', '.join(names)}) separated by {sep!r}, found {len(fields)}: "
                    f"{line[:80]!r}"
                )
            for name, value in zip(names, fields, strict=True):
                parse = parse_int if columns[name] is int else parse_float
                parse(value, path, number, name)
    return DataError(f"{path}: could not parse the file ({err})")


# --------------------------------------------------------------------------- item text


def format_item_text(title: str, genres: Sequence[str], description: str = "") -> str:
    """The language-model text of an item: ``"Title. Genres: A, B."`` plus any description."""
    parts = [_sentence(title)]
    if genres:
        parts.append(f"Genres: {', '.join(genres)}.")
    parts.append(_sentence(description))
    return " ".join(p for p in parts if p)


def _sentence(text: str) -> str:
    """``text`` stripped and ending in sentence punctuation (empty stays empty)."""
    text = text.strip()
    return text if not text or text[-1] in ".!?" else text + "."


# --------------------------------------------------------------------------- filters


def finalize(
    name: str,
    raw: RawInteractions,
    catalog: Catalog,
    min_user_interactions: int = DEFAULT_MIN_USER_INTERACTIONS,
) -> LoadedDataset:
    """Apply the filters of this module (logged, counted) and build the dataset."""
    check_min_user_interactions(min_user_interactions)
    if len(raw) == 0:
        raise DataError(f"{name}: {raw.path} holds no interactions")
    rows_read, users_read = len(raw), len(np.unique(raw.user))
    raw, unknown = drop_unknown_items(name, raw, catalog)
    raw, duplicates, repeats = drop_duplicates_and_repeats(name, raw)
    raw, short_users, short_rows = drop_short_users(name, raw, min_user_interactions)
    if len(raw) == 0:
        raise DataError(
            f"{name}: no interactions left after cleaning {raw.path} ({unknown} with unknown "
            f"items, {duplicates} duplicates, {repeats} repeats, {short_rows} of users with "
            f"fewer than "
            f"{min_user_interactions} interactions); check the files (`fedrec data info "
            f"--dataset {name} --data-dir {shlex.quote(str(raw.path.parent))} "
            "--min-user-interactions N` shows "
            "what a lower threshold would keep)"
        )
    dataset = build_dataset(
        name,
        raw.user,
        raw.item,
        raw.timestamp,
        catalog.ids,
        catalog.texts,
        catalog.titles,
        catalog.categories,
        user_names=raw.user_names,
        item_names=raw.item_names,
    )
    report = CleaningReport(
        dataset=name,
        source=str(raw.path),
        rows_read=rows_read,
        users_read=users_read,
        unknown_items_dropped=unknown,
        duplicates_dropped=duplicates,
        min_user_interactions=min_user_interactions,
        short_users_dropped=short_users,
        short_user_interactions_dropped=short_rows,
        users=dataset.n_users,
        items=dataset.n_items,
        cold_items=dataset.n_items - len(np.unique(raw.item)),
        interactions=dataset.n_interactions,
        repeats_dropped=repeats,
    )
    logger.info("%s", report)
    return LoadedDataset(dataset, report)


def drop_unknown_items(
    name: str, raw: RawInteractions, catalog: Catalog
) -> tuple[RawInteractions, int]:
    """Drop interactions whose item is not in the catalog; warn with examples."""
    ids, names = np.asarray(catalog.ids), raw.item_names
    if names is not None:  # codes: each distinct id is looked up once
        known = np.isin(names, ids)[raw.item]
    else:
        known = np.isin(raw.item, ids.astype(raw.item.dtype))
    dropped = int((~known).sum())
    if dropped:
        unknown = np.unique(raw.item[~known])
        examples = _examples(unknown if names is None else names[unknown])  # names: sorted
        logger.warning(
            "%s: dropped %d of %d interactions whose item is not in %s (e.g. items %s)",
            name,
            dropped,
            len(raw),
            readable_path(catalog.path),
            examples,
        )
    else:
        logger.info("%s: all %d interactions reference catalog items", name, len(raw))
    return raw.select(known), dropped


def drop_duplicates_and_repeats(
    name: str, raw: RawInteractions
) -> tuple[RawInteractions, int, int]:
    """Drop rows repeating an earlier (user, item, timestamp), the first occurrence staying,
    then later interactions with an item the user already had, the earliest staying (ties in
    time: the first in file order); returns (rest, duplicates, repeats). One sort by (user,
    item, time) finds both (:func:`_duplicate_masks`)."""
    duplicate, repeat = _duplicate_masks(raw)
    duplicates, repeats = int(duplicate.sum()), int(repeat.sum())
    logger.info(
        "%s: dropped %d exact duplicate interactions (same user, item, timestamp) of %d",
        name,
        duplicates,
        len(raw),
    )
    if repeats:
        logger.warning(
            "%s: dropped %d of %d interactions repeating an item the user already had (the "
            "earliest is kept: recommendations never include a seen item)",
            name,
            repeats,
            len(raw) - duplicates,
        )
    return raw.select(~(duplicate | repeat)), duplicates, repeats


def _duplicate_masks(
    raw: RawInteractions,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Two row masks: the rows whose (user, item, timestamp) already appeared earlier in the
    file (duplicates), and the other rows whose (user, item) appeared at an earlier or the
    same time (repeats).

    In the order sorted by (user, item, time, file order), a row is a duplicate when its
    predecessor has its user, item and time, and a repeat when that predecessor has its user
    and item only. The sorted key columns are compared one at a time, not stacked: on
    ml-25m's 25M rows each int64 copy is 200 MB."""
    duplicate = np.zeros(len(raw), dtype=bool)
    repeat = np.zeros(len(raw), dtype=bool)
    if len(raw) < 2:
        return duplicate, repeat
    order = np.lexsort((raw.timestamp, raw.item, raw.user))  # stable: equal keys keep file order
    same_pair = np.ones(len(raw) - 1, dtype=bool)
    for column in (raw.user, raw.item):
        ordered = column[order]
        same_pair &= ordered[1:] == ordered[:-1]
    ordered = raw.timestamp[order]
    same_time = same_pair & (ordered[1:] == ordered[:-1])
    duplicate[order[1:][same_time]] = True
    repeat[order[1:][same_pair & ~same_time]] = True
    return duplicate, repeat


def drop_short_users(
    name: str, raw: RawInteractions, min_interactions: int
) -> tuple[RawInteractions, int, int]:
    """Drop users with fewer than ``min_interactions`` rows; returns (rest, users, rows)."""
    _, inverse, counts = np.unique(raw.user, return_inverse=True, return_counts=True)
    keep = counts[inverse] >= min_interactions
    users, rows = int((counts < min_interactions).sum()), int((~keep).sum())
    logger.info(
        "%s: dropped %d users with fewer than %d interactions (%d interactions)",
        name,
        users,
        min_interactions,
        rows,
    )
    return raw.select(keep), users, rows


def _examples(values: Iterable[Any], limit: int = 5) -> list[str]:
    """A few values as strings, for log and error messages."""
    out: list[str] = []
    for v in values:
        if len(out) == limit:
            break
        out.append(str(v))
    return out
