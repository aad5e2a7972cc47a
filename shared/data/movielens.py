"""Loaders for the MovieLens layouts: 100K, 1M, and ml-latest / ml-latest-small / 25M.

Each loader reads the ratings (every rating is one implicit interaction, whatever its value)
and the movie list, builds the item text ``"Title. Genres: A, B."`` (MovieLens has no
descriptions; ``tags.csv`` is user-generated, so it is not used as item text), and hands both
to :func:`shared.data.cleaning.finalize` for the documented filters. The genre markers
``unknown`` (100K) and ``(no genres listed)`` (ml-latest) mean "no genre" and are dropped.
"""

from __future__ import annotations

import codecs
import io
import logging
from pathlib import Path

from shared.data.cleaning import (
    DEFAULT_MIN_USER_INTERACTIONS,
    Catalog,
    ColumnKinds,
    LoadedDataset,
    RawInteractions,
    csv_rows,
    finalize,
    format_item_text,
    parse_int,
    read_numeric_table,
    require_file,
    warn_if_cut,
)
from shared.errors import DataError
from shared.io import readable_path

logger = logging.getLogger(__name__)

ML100K_GENRES: tuple[str, ...] = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
"""The 19 genre flags of ``u.item``, used when ``u.genre`` is absent."""

NO_GENRE_MARKERS = frozenset({"unknown", "(no genres listed)"})
"""Genre values that mean the movie has no genre."""

ML100K_RATING_COLUMNS: ColumnKinds = {
    "user id": int,
    "item id": int,
    "rating": float,
    "timestamp": int,
}
ML1M_RATING_COLUMNS: ColumnKinds = {
    "UserID": int,
    "MovieID": int,
    "Rating": float,
    "Timestamp": int,
}
ML_LATEST_RATING_COLUMNS: ColumnKinds = {
    "userId": int,
    "movieId": int,
    "rating": float,
    "timestamp": int,
}
ML_LATEST_MOVIE_COLUMNS = ("movieId", "title", "genres")
ML100K_RATINGS = 100_000
"""Rows of ``u.data`` in the MovieLens 100K release."""
RELEASE_RATINGS: dict[str, tuple[str, int]] = {
    "ml-100k": ("MovieLens 100K", ML100K_RATINGS),
    "ml-1m": ("MovieLens 1M", 1_000_209),
    "ml-25m": ("MovieLens 25M", 25_000_095),
}
"""The ratings of each fixed release (ml-latest and ml-latest-small are republished with
other counts, so they have none)."""
_ML100K_FIXED_ITEM_FIELDS = 5  # id | title | release date | video release date | IMDb URL


def load_ml100k(
    data_dir: str | Path,
    *,
    name: str = "ml-100k",
    min_user_interactions: int = DEFAULT_MIN_USER_INTERACTIONS,
) -> LoadedDataset:
    """Load MovieLens 100K: ``u.data`` (tab-separated), ``u.item`` and ``u.genre`` (latin-1)."""
    root = Path(data_dir)
    ratings = require_file(root / "u.data", name)
    catalog = read_ml100k_items(require_file(root / "u.item", name), _ml100k_genres(root))
    cols = read_numeric_table(ratings, sep="\t", columns=ML100K_RATING_COLUMNS, has_header=False)
    raw = RawInteractions(ratings, cols["user id"], cols["item id"], cols["timestamp"])
    warn_if_partial(name, raw)
    return finalize(name, raw, catalog, min_user_interactions)


def load_ml1m(
    data_dir: str | Path,
    *,
    name: str = "ml-1m",
    min_user_interactions: int = DEFAULT_MIN_USER_INTERACTIONS,
) -> LoadedDataset:
    """Load MovieLens 1M: ``ratings.dat`` and ``movies.dat`` (``::``-separated, latin-1)."""
    root = Path(data_dir)
    ratings = require_file(root / "ratings.dat", name)
    catalog = read_ml1m_movies(require_file(root / "movies.dat", name))
    cols = read_numeric_table(ratings, sep="::", columns=ML1M_RATING_COLUMNS, has_header=False)
    raw = RawInteractions(ratings, cols["UserID"], cols["MovieID"], cols["Timestamp"])
    warn_if_partial(name, raw)
    return finalize(name, raw, catalog, min_user_interactions)


def load_ml_latest(
    data_dir: str | Path,
    *,
    name: str = "ml-latest",
    min_user_interactions: int = DEFAULT_MIN_USER_INTERACTIONS,
) -> LoadedDataset:
    """Load ml-latest, ml-latest-small or ml-25m: ``ratings.csv`` and ``movies.csv`` (UTF-8)."""
    root = Path(data_dir)
    ratings = require_file(root / "ratings.csv", name)
    catalog = read_ml_latest_movies(require_file(root / "movies.csv", name))
    cols = read_numeric_table(
        ratings, sep=",", columns=ML_LATEST_RATING_COLUMNS, has_header=True, encoding="utf-8-sig"
    )
    raw = RawInteractions(ratings, cols["userId"], cols["movieId"], cols["timestamp"])
    warn_if_partial(name, raw)
    return finalize(name, raw, catalog, min_user_interactions)


def warn_if_partial(name: str, raw: RawInteractions) -> None:
    """Warn when dataset ``name``, a fixed release (:data:`RELEASE_RATINGS`), holds another
    number of ratings: a partial or edited copy loads under the release's name, and figures
    on it would be taken for the release's."""
    if name not in RELEASE_RATINGS or len(raw) == RELEASE_RATINGS[name][1]:
        return
    release, count = RELEASE_RATINGS[name]
    logger.warning(
        "%s holds %d ratings, the %s release %d: a partial or edited copy? "
        "Figures on it are not comparable with published %s results",
        readable_path(raw.path),
        len(raw),
        release,
        count,
        name,
    )


# --------------------------------------------------------------------------- movie lists


def read_ml100k_items(path: Path, genres: tuple[str, ...]) -> Catalog:
    """Parse ``u.item``: id | title | release | video release | IMDb URL | one flag per genre."""
    builder = _CatalogBuilder(path)
    n_fields = _ML100K_FIXED_ITEM_FIELDS + len(genres)
    for number, line in _lines(path, "latin-1"):
        fields = line.split("|")
        if len(fields) != n_fields:
            origin = (
                f"; the genre count comes from {path.with_name('u.genre')}, so if this line "
                "is intact that file is cut or edited"
                if len(fields) > _ML100K_FIXED_ITEM_FIELDS and genres != ML100K_GENRES
                else ""
            )
            raise DataError(
                f"{path}, line {number}: expected {n_fields} '|'-separated fields (id, title, "
                f"release date, video release date, IMDb URL and {len(genres)} genre flags), "
                f"found {len(fields)}{origin}"
            )
        flags = fields[_ML100K_FIXED_ITEM_FIELDS:]
        bad = [f for f in flags if f.strip() not in ("0", "1")]
        if bad:
            raise DataError(f"{path}, line {number}: genre flags must be 0 or 1, found {bad[0]!r}")
        names = [g for g, flag in zip(genres, flags, strict=True) if flag.strip() == "1"]
        builder.add(parse_int(fields[0], path, number, "movie id"), fields[1], names, number)
    return builder.build()


def read_ml1m_movies(path: Path) -> Catalog:
    """Parse ``movies.dat``: ``MovieID::Title::Genres`` with genres ``A|B``."""
    builder = _CatalogBuilder(path)
    for number, line in _lines(path, "latin-1"):
        head, sep, rest = line.partition("::")
        title, sep2, genres = rest.rpartition("::")
        if not sep or not sep2:
            raise DataError(
                f"{path}, line {number}: expected 3 '::'-separated fields "
                f"(MovieID, Title, Genres), found {line[:80]!r}"
            )
        builder.add(parse_int(head, path, number, "MovieID"), title, split_genres(genres), number)
    return builder.build()


def read_ml_latest_movies(path: Path) -> Catalog:
    """Parse ``movies.csv`` (``movieId,title,genres``; titles may be quoted and hold commas)."""
    builder = _CatalogBuilder(path)
    for line, row in csv_rows(path, ML_LATEST_MOVIE_COLUMNS):
        movie = parse_int(row["movieId"], path, line, "movieId")
        builder.add(movie, row["title"], split_genres(row["genres"]), line)
    return builder.build()


def split_genres(value: str) -> list[str]:
    """``"A|B"`` -> ``["A", "B"]``; no-genre markers and blanks are dropped."""
    parts = (g.strip() for g in value.split("|"))
    return [g for g in parts if g and g not in NO_GENRE_MARKERS]


class _CatalogBuilder:
    """Collects movies row by row and turns them into a :class:`Catalog`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids: list[str] = []
        self.titles: list[str] = []
        self.categories: list[list[str]] = []
        self.lines: list[int] = []

    def add(self, movie_id: int, title: str, genres: list[str], line: int) -> None:
        """Record one movie (of file line ``line``); ids are normalised to their decimal
        string (``"007"`` -> ``"7"``)."""
        self.ids.append(str(movie_id))
        self.lines.append(line)
        self.titles.append(title.strip())
        self.categories.append([g for g in genres if g not in NO_GENRE_MARKERS])

    def build(self) -> Catalog:
        texts = [format_item_text(t, g) for t, g in zip(self.titles, self.categories, strict=True)]
        return Catalog(self.path, self.ids, self.titles, self.categories, texts, self.lines)


def _ml100k_genres(root: Path) -> tuple[str, ...]:
    """Genre names from ``u.genre`` (``name|index``), or the standard 19 if it is absent."""
    path = root / "u.genre"
    if not path.is_file():
        logger.info(
            "%s not found; using the standard 19 MovieLens 100K genres", readable_path(path)
        )
        return ML100K_GENRES
    by_index: dict[int, str] = {}
    line_of: dict[int, int] = {}
    for number, line in _lines(path, "latin-1"):
        genre, sep, idx = line.rpartition("|")
        if not sep:
            raise DataError(f"{path}, line {number}: expected 'name|index', found {line!r}")
        index = parse_int(idx, path, number, "index")
        if index in by_index:  # a second name would silently replace the first
            raise DataError(
                f"{path}, line {number}: index {index} names {genre!r}, but line "
                f"{line_of[index]} already gave it to {by_index[index]!r}; every genre index "
                "must appear once"
            )
        by_index[index], line_of[index] = genre, number
    if sorted(by_index) != list(range(len(by_index))) or not by_index:
        raise DataError(
            f"{path}: genre indices must run 0..n-1 without gaps, found {sorted(by_index)}"
        )
    return tuple(by_index[i] for i in range(len(by_index)))


def _lines(path: Path, encoding: str) -> list[tuple[int, str]]:
    """Non-blank lines of a small text file with their 1-based line numbers.

    ``encoding`` is the format's (MovieLens 100K and 1M ship latin-1), but a copy re-saved as
    UTF-8 is read as UTF-8: text with accented letters in latin-1 is almost never valid
    UTF-8, so the two are told apart, and a UTF-8 copy no longer loads with garbled titles.
    A UTF-16 copy (an editor's "Unicode") is refused by name, as the rating tables refuse it:
    read as latin-1, its NUL bytes made line 1 fail with a misleading complaint (genre flags
    "must be 0 or 1", or no '::' found). A file without a final line break is warned about
    (:func:`warn_if_cut`), as the rating tables are: ``movies.dat`` cut inside its last genre
    list still parses, with a shortened genre in that movie's text.
    """
    warn_if_cut(path)
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path} is UTF-16 text; re-save it as UTF-8 (or {encoding})")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode(encoding)
    # as a file opened with newline="": lines end at \n, \r or \r\n only (str.splitlines
    # would also break at \x85, a byte latin-1 titles may hold)
    lines = io.StringIO(text, newline="")
    rows = [(n, line.rstrip("\r\n")) for n, line in enumerate(lines, start=1)]
    return [(n, line) for n, line in rows if line.strip()]
