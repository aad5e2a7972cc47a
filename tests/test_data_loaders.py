"""Dataset loaders: every format loads correctly, and bad input fails loudly or is filtered.

All inputs are tiny files written under ``tmp_path``; one test reads the real MovieLens 100K
from ``/work/shared/datasets/ml-100k`` when it is present.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
import types
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedrec.cli import app as fedrec_app
from shared.data.cleaning import Catalog, CleaningReport, LoadedDataset, format_item_text
from shared.data.dataset import RecDataset, build_dataset
from shared.data.generic import load_generic
from shared.data.movielens import ML100K_GENRES, load_ml1m, load_ml100k, load_ml_latest
from shared.data.registry import (
    DATASET_NAMES,
    detect_layout,
    load_dataset,
    load_dataset_with_report,
)
from shared.errors import ConfigError, DataError, DatasetNotFoundError

REAL_ML100K = Path("/work/shared/datasets/ml-100k")

MakeDir = Callable[[Path], Path]
Loader = Callable[[Path], LoadedDataset]

U_GENRE = "unknown|0\nAction|1\nAnimation|2\nChildren's|3\nComedy|4\n\n"
# id | title | release | video release | URL | unknown Action Animation Children's Comedy
U_ITEM = (
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1|1|1\n"
    "2|Café Society (1995)|01-Jan-1995||http://x|0|1|0|0|0\n"
    "3|unknown||||1|0|0|0|0\n"
    "4|Cold Movie (1990)|01-Jan-1990||http://x|0|0|0|0|1\n"
)
# user item rating timestamp; user 10 has a tie at t=5 (item 2 is first in the file)
U_DATA = "10\t3\t4\t9\n10\t2\t3\t5\n2\t1\t5\t1\n10\t1\t1\t5\n2\t2\t2\t3\n2\t3\t2\t2\n"


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def ml100k_dir(root: Path, data: str = U_DATA, items: str = U_ITEM) -> Path:
    write(root / "u.data", data, "latin-1")
    write(root / "u.item", items, "latin-1")
    write(root / "u.genre", U_GENRE, "latin-1")
    return root


def ml1m_dir(root: Path, ratings: str | None = None) -> Path:
    write(
        root / "movies.dat",
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Amélie (2001)::Comedy|Romance\n"
        "3::Heat (1995)::Action|Crime|Thriller\n",
        "latin-1",
    )
    default = (
        "1::1::5::978300760\n1::2::3::978302109\n1::3::3::978301968\n"
        "2::3::4::978298413\n2::1::4::1\n2::2::4::978298400\n"
    )
    write(root / "ratings.dat", ratings if ratings is not None else default, "latin-1")
    return root


def ml_latest_dir(root: Path, ratings: str | None = None) -> Path:
    write(
        root / "movies.csv",
        "movieId,title,genres\n"
        '1,"American President, The (1995)",Comedy|Drama|Romance\n'
        "2,Jumanji (1995),Adventure|Children|Fantasy\n"
        "5,Some Doc (2015),(no genres listed)\n",
    )
    default = (
        "userId,movieId,rating,timestamp\n"
        "1,1,4.0,964982703\n1,2,3.5,964981247\n1,5,0.5,964982224\n"
        "7,2,4.5,1\n7,1,2.0,2\n7,5,5.0,2\n"
    )
    write(root / "ratings.csv", ratings if ratings is not None else default)
    return root


def generic_dir(root: Path, interactions: str | None = None, items: str | None = None) -> Path:
    write(
        root / "items.csv",
        items
        if items is not None
        else "item,text,title,genres\n"
        'b1,"A book about cats, and dogs.",Cats & Dogs,Fiction|Pets\n'
        "b2,Space opera epic.,Stars,Sci-Fi\n"
        "b3,Cookbook.,Food,\n"
        "b4,Never read.,Cold,\n",
    )
    write(
        root / "interactions.csv",
        interactions
        if interactions is not None
        else "user,item,timestamp,rating\n"
        "alice,b2,100,5\nalice,b1,50,4\nalice,b3,100,3\n"
        "bob,b3,10,1\nbob,b1,20,2\nbob,b2,30,3\n",
    )
    return root


def seq_raw(ds: RecDataset, user: str) -> list[str]:
    """The raw item ids of a user's sequence."""
    u = ds.user_ids.index(user)
    return [ds.item_ids[i] for i in ds.sequences[u]]


# --------------------------------------------------------------------------- formats


def test_ml100k_loads_dense_ids_order_and_text(tmp_path: Path) -> None:
    loaded = load_ml100k(ml100k_dir(tmp_path))
    ds = loaded.dataset
    assert ds.name == "ml-100k"
    assert ds.user_ids == ["2", "10"]  # numeric order, raw ids kept
    assert ds.item_ids == ["1", "2", "3", "4"]  # catalog (file) order
    assert seq_raw(ds, "2") == ["1", "3", "2"]
    assert seq_raw(ds, "10") == ["2", "1", "3"]  # tie at t=5 keeps file order
    assert ds.timestamps[1].tolist() == [5, 5, 9]
    assert all(s.dtype == np.int64 for s in ds.sequences)
    assert ds.item_text[0] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert ds.item_text[1] == "Café Society (1995). Genres: Action."  # latin-1 decoded
    assert ds.item_categories[2] == []  # "unknown" means no genre
    assert ds.item_titles[3] == "Cold Movie (1990)"
    assert loaded.report.cold_items == 1 and ds.n_items == 4  # cold item stays


def test_ml100k_without_u_genre_uses_standard_genres(tmp_path: Path) -> None:
    root = ml100k_dir(tmp_path)
    (root / "u.genre").unlink()
    items = "1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join("0001110000000000000") + "\n"
    write(root / "u.item", items, "latin-1")
    write(root / "u.data", "1\t1\t5\t1\n", "latin-1")
    ds = load_ml100k(root, min_user_interactions=1).dataset
    assert ds.item_categories == [["Animation", "Children's", "Comedy"]]


def test_a_u_genre_index_given_twice_is_refused_naming_both_lines(tmp_path: Path) -> None:
    """A second name for one index (an edited u.genre, here Comedy's 4 given to Horror on a
    line of its own) silently replaced the first: every comedy's text said Horror."""
    root = ml100k_dir(tmp_path)
    write(root / "u.genre", U_GENRE.rstrip("\n") + "\nHorror|4\n", "latin-1")
    with pytest.raises(DataError, match=r"u.genre, line 6: index 4 .*'Horror'.* line 5.*'Comedy'"):
        load_ml100k(root)


def test_ml1m_loads(tmp_path: Path) -> None:
    loaded = load_ml1m(ml1m_dir(tmp_path))
    ds = loaded.dataset
    assert ds.user_ids == ["1", "2"]
    assert ds.item_ids == ["1", "2", "3"]
    assert seq_raw(ds, "1") == ["1", "3", "2"]
    assert seq_raw(ds, "2") == ["1", "2", "3"]
    assert ds.item_text[1] == "Amélie (2001). Genres: Comedy, Romance."
    assert ds.item_categories[2] == ["Action", "Crime", "Thriller"]
    assert loaded.report.interactions == 6


def test_ml1m_movies_resaved_as_utf8_keep_their_titles(tmp_path: Path) -> None:
    """The format is latin-1; a copy converted to UTF-8 must not load as 'AmÃ©lie'."""
    root = ml1m_dir(tmp_path)
    movies = root / "movies.dat"
    movies.write_text(movies.read_text(encoding="latin-1"), encoding="utf-8")
    assert load_ml1m(root).dataset.item_text[1] == "Amélie (2001). Genres: Comedy, Romance."


def test_latin1_lines_end_only_at_line_breaks(tmp_path: Path) -> None:
    from shared.data.movielens import _lines

    path = tmp_path / "movies.dat"
    path.write_bytes(b"1::A\x85B::X\r\n\n2::C::Y\r3::D\xe9::Z\n")  # 0x85: NEL once decoded
    assert _lines(path, "latin-1") == [(1, "1::A\x85B::X"), (3, "2::C::Y"), (4, "3::D\u00e9::Z")]


@pytest.mark.parametrize(
    ("make", "load", "name"),
    [
        (ml100k_dir, load_ml100k, "u.item"),
        (ml1m_dir, load_ml1m, "movies.dat"),
    ],
)
def test_a_utf16_movie_list_is_refused_by_name(
    tmp_path: Path, make: MakeDir, load: Loader, name: str
) -> None:
    """Read as latin-1, its NUL bytes failed line 1 with a misleading complaint."""
    path = make(tmp_path) / name
    path.write_text(path.read_text(encoding="latin-1"), encoding="utf-16")
    with pytest.raises(DataError, match=rf"{name} is UTF-16 text; re-save it as UTF-8"):
        load(tmp_path)


def test_ml_latest_loads_quoted_titles_and_no_genres(tmp_path: Path) -> None:
    ds = load_ml_latest(ml_latest_dir(tmp_path), name="ml-latest-small").dataset
    assert ds.name == "ml-latest-small"
    assert ds.item_ids == ["1", "2", "5"]
    assert ds.item_titles[0] == "American President, The (1995)"
    assert ds.item_text[0] == "American President, The (1995). Genres: Comedy, Drama, Romance."
    assert ds.item_text[2] == "Some Doc (2015)."
    assert ds.item_categories[2] == []
    assert seq_raw(ds, "1") == ["2", "5", "1"]
    assert seq_raw(ds, "7") == ["2", "1", "5"]  # tie at t=2 keeps file order


def test_ml_latest_movies_not_in_utf8_is_a_clear_error(tmp_path: Path) -> None:
    root = ml_latest_dir(tmp_path)
    movies = root / "movies.csv"
    movies.write_bytes(movies.read_text().replace("Some Doc", "Am\u00e9lie").encode("latin-1"))
    with pytest.raises(
        DataError, match=r"movies.csv, line \d+: not UTF-8 text \(byte 0xe9\).*re-save"
    ):
        load_ml_latest(root, name="ml-latest-small")


@pytest.mark.parametrize("name", ["interactions.csv", "items.csv", "ratings.csv"])
def test_a_file_that_is_not_utf8_names_its_line(tmp_path: Path, name: str) -> None:
    """Generic files and ml-latest ratings (read by numpy) fail like the movie list: file,
    line and byte, not a UnicodeDecodeError traceback."""
    root = ml_latest_dir(tmp_path / "ml") if name == "ratings.csv" else generic_dir(tmp_path)
    path = root / name
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b",", b",\xff", 1)
    path.write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=rf"{name}, line 3: not UTF-8 text \(byte 0xff\)"):
        if name == "ratings.csv":
            load_ml_latest(root, name="ml-latest-small")
        else:
            load_generic(root)


def test_an_id_beyond_64_bits_names_its_line(tmp_path: Path) -> None:
    ratings = "userId,movieId,rating,timestamp\n1,1,4.0,10\n1,2,3.0,11\n" + (
        "12345678901234567890,5,3.0,12\n"
    )
    root = ml_latest_dir(tmp_path, ratings)
    with pytest.raises(DataError, match=r"ratings.csv, line 4: column 'userId' .*64-bit"):
        load_ml_latest(root, name="ml-latest-small")


def test_a_timestamp_beyond_64_bits_is_told_to_be_seconds_not_an_id(tmp_path: Path) -> None:
    """The overflow message gave id advice (map ids, load as generic) for a time column."""
    ratings = "userId,movieId,rating,timestamp\n1,1,4.0,10\n1,2,3.0,12345678901234567890\n"
    with pytest.raises(DataError, match=r"line 3: column 'timestamp' .*64-bit") as err:
        load_ml_latest(ml_latest_dir(tmp_path / "ml", ratings), name="ml-latest-small")
    assert "integer seconds" in str(err.value) and "ids" not in str(err.value)
    rows = "user,item,timestamp\nu,b1,1\nu,b2,99999999999999999999\n"
    with pytest.raises(DataError, match=r"line 3: .*64-bit integer; give the time as integer"):
        load_generic(generic_dir(tmp_path / "g", interactions=rows))


def test_a_quoted_ratings_header_as_r_writes_it_loads(tmp_path: Path) -> None:
    """R's write.csv quotes the column names; the header was split on commas and refused."""
    ratings = (
        '"userId","movieId","rating","timestamp"\n'
        "1,1,4.0,964982703\n1,2,3.5,964981247\n1,5,0.5,964982224\n"
    )
    root = ml_latest_dir(tmp_path, ratings)
    ds = load_ml_latest(root, name="ml-latest-small", min_user_interactions=1).dataset
    assert seq_raw(ds, "1") == ["2", "5", "1"]


def test_generic_loads_string_ids(tmp_path: Path) -> None:
    loaded = load_generic(generic_dir(tmp_path))
    ds = loaded.dataset
    assert ds.user_ids == ["alice", "bob"]
    assert ds.item_ids == ["b1", "b2", "b3", "b4"]
    assert seq_raw(ds, "alice") == ["b1", "b2", "b3"]  # tie at 100: file order
    assert seq_raw(ds, "bob") == ["b3", "b1", "b2"]
    assert ds.item_text[0] == "Cats & Dogs. Genres: Fiction, Pets. A book about cats, and dogs."
    assert ds.item_titles[0] == "Cats & Dogs"
    assert ds.item_categories[:3] == [["Fiction", "Pets"], ["Sci-Fi"], []]
    assert loaded.report.cold_items == 1


def test_generic_minimal_columns(tmp_path: Path) -> None:
    root = generic_dir(
        tmp_path,
        interactions="timestamp,item,user\n1,x,u\n2,y,u\n3,z,u\n",  # any column order
        items="item,text\nx,Item X\ny,Item Y\nz,Item Z\n",
    )
    ds = load_generic(root).dataset
    assert seq_raw(ds, "u") == ["x", "y", "z"]
    assert ds.item_titles == ["Item X", "Item Y", "Item Z"]
    assert ds.item_categories == [[], [], []]
    write(root / "items.csv", "item,text,title\nx,Item X,Ex\ny,Item Y,\nz,Item Z, \n")
    assert load_generic(root).dataset.item_titles == ["Ex", "Item Y", "Item Z"]  # empty: text


def test_generic_item_text_holds_title_genres_and_description(tmp_path: Path) -> None:
    """PROTOCOL.md: item text is the title plus the genres (and any description), built as
    for MovieLens; only a row with neither title nor genres keeps its text verbatim."""
    items = (
        "item,text,title,genres\n"
        "x,A long tale,Ex,Drama|Crime\n"  # all three
        "y,Item Y,,Comedy\n"  # no title: the text stands in for it
        "z,Item Z,Item Z,\n"  # text equal to the title is not repeated
        "w,Just text,,\n"  # neither: verbatim
    )
    root = generic_dir(
        tmp_path, interactions="user,item,timestamp\nu,x,1\nu,y,2\nu,z,3\n", items=items
    )
    ds = load_generic(root, min_user_interactions=1).dataset
    assert ds.item_text == [
        "Ex. Genres: Drama, Crime. A long tale.",
        "Item Y. Genres: Comedy.",
        "Item Z.",
        "Just text",
    ]
    write(root / "items.csv", "item,text,genres\nx,Item X,Sci-Fi\ny,Item Y,\nz,Item Z,\n")
    assert load_generic(root).dataset.item_text[0] == "Item X. Genres: Sci-Fi."


def test_format_item_text() -> None:
    assert format_item_text("Heat (1995)", ["Action", "Crime"]) == (
        "Heat (1995). Genres: Action, Crime."
    )
    assert format_item_text("Why?", [], "  A plot ") == "Why? A plot."
    assert format_item_text("T", []) == "T."


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("make", "load", "missing"),
    [
        (ml100k_dir, load_ml100k, "u.data"),
        (ml100k_dir, load_ml100k, "u.item"),
        (ml1m_dir, load_ml1m, "ratings.dat"),
        (ml_latest_dir, load_ml_latest, "movies.csv"),
        (generic_dir, load_generic, "interactions.csv"),
        (generic_dir, load_generic, "items.csv"),
    ],
)
def test_missing_file_names_path_and_fix(
    tmp_path: Path, make: MakeDir, load: Loader, missing: str
) -> None:
    root = make(tmp_path)
    (root / missing).unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        load(root)
    assert str(root / missing) in str(err.value)
    assert "--data-dir" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_wrong_header_names_file_expected_and_found(tmp_path: Path) -> None:
    root = ml_latest_dir(tmp_path, "user,movie,rating,timestamp\n1,1,4.0,1\n")
    with pytest.raises(DataError) as err:
        load_ml_latest(root)
    msg = str(err.value)
    assert "ratings.csv" in msg
    assert "userId,movieId,rating,timestamp" in msg
    assert "user,movie,rating,timestamp" in msg


def test_generic_unknown_column_is_an_error(tmp_path: Path) -> None:
    root = generic_dir(tmp_path, interactions="user,item,timestamp,ratting\nu,b1,1,5\n")
    with pytest.raises(DataError, match=r"interactions\.csv.*unexpected \['ratting'\]"):
        load_generic(root)


def test_headerless_wrong_column_count_names_line(tmp_path: Path) -> None:
    root = ml100k_dir(tmp_path, data="1\t1\t5\t1\n1\t2\t5\n")
    with pytest.raises(DataError, match=r"u\.data, line 2: expected 4 columns .* found 3"):
        load_ml100k(root)


@pytest.mark.parametrize(
    ("ratings", "line"),
    [
        ("1\t1\t5\t1\n1\t2\t5\t2\n2\t1\t5\t1\n", 1),  # tab-separated: u.data's layout
        ("1::1::5::1\n1\t2::5::2\n2::1::5::1\n", 2),  # one row mixing both
        ("1::1::5::1\n1::2::5::2\n2::1::5::1\t\r\n", 3),  # a stray tab (numpy's message)
    ],
)
def test_a_tab_in_ml1m_ratings_is_refused_naming_its_line(
    tmp_path: Path, ratings: str, line: int
) -> None:
    """ML-1M separates by '::' only: a tab loaded as a separator (a tab-separated copy read
    as ML-1M), or failed with numpy's message and no line."""
    with pytest.raises(DataError, match=rf"ratings\.dat, line {line}: holds a tab.*'::'"):
        load_ml1m(ml1m_dir(tmp_path, ratings))


@pytest.mark.parametrize(
    ("make", "load", "bad_file", "content"),
    [
        (ml100k_dir, load_ml100k, "u.data", "1\t1\t5\t1\n1\t2\t5\t1\n1\t3\t5\tnoon\n"),
        (ml1m_dir, load_ml1m, "ratings.dat", "1::1::5::1\n1::2::5::1\n1::3::5::x\n"),
        (
            ml_latest_dir,
            load_ml_latest,
            "ratings.csv",
            "userId,movieId,rating,timestamp\n1,1,4.0,1\n1,2,4.0,2021-01-01\n",
        ),
        (
            generic_dir,
            load_generic,
            "interactions.csv",
            "user,item,timestamp\nu,b1,1\nu,b2,yesterday\n",
        ),
    ],
)
def test_non_numeric_timestamp_names_file_and_line(
    tmp_path: Path, make: MakeDir, load: Loader, bad_file: str, content: str
) -> None:
    root = make(tmp_path)
    write(root / bad_file, content, "latin-1")
    with pytest.raises(DataError) as err:
        load(root)
    msg = str(err.value)
    assert f"{bad_file}, line 3" in msg
    assert "timestamp" in msg.lower()


@pytest.mark.parametrize(
    ("make", "load", "bad_file", "content", "line"),
    [
        # the quote opens in the last column: it swallowed every later row, silently
        (
            generic_dir,
            load_generic,
            "items.csv",
            'item,text\nb1,One\nb2,"Two unclosed\nb3,Three\nb4,Four\n',
            3,
        ),
        # in a middle column: it was reported at the file's end, without naming the quote
        (
            ml_latest_dir,
            load_ml_latest,
            "movies.csv",
            'movieId,title,genres\n1,Heat (1995),Drama\n2,"Open, Title (1999),Drama\n'
            "5,Other (2000),Comedy\n",
            3,
        ),
        # past the csv module's field limit: it was a traceback
        (
            ml_latest_dir,
            load_ml_latest,
            "movies.csv",
            'movieId,title,genres\n1,"' + "x" * 140_000 + '",Drama\n',
            2,
        ),
        (
            generic_dir,
            load_generic,
            "interactions.csv",
            'user,item,timestamp\nu,b1,1\nu,"b2,2\nu,b3,3\n',
            3,
        ),
    ],
)
def test_a_quote_never_closed_names_the_line_where_its_row_starts(
    tmp_path: Path, make: MakeDir, load: Loader, bad_file: str, content: str, line: int
) -> None:
    root = make(tmp_path)
    write(root / bad_file, content)
    with pytest.raises(DataError) as err:
        load(root)
    assert f"{bad_file}, line {line}: a quoted field starts in this row and is never closed" in (
        str(err.value)
    )


def test_quoted_fields_over_several_lines_still_load(tmp_path: Path) -> None:
    items = 'item,text\nb1,"One\nline two"\nb2,"Two ""quoted"""\nb3,Three\nb4,Four\n'
    ds = load_generic(generic_dir(tmp_path, items=items)).dataset
    assert ds.item_text[ds.item_ids.index("b1")].startswith("One\nline two")
    assert 'Two "quoted"' in ds.item_text[ds.item_ids.index("b2")]


def test_a_byte_order_mark_on_a_numeric_table_is_read_past(tmp_path: Path) -> None:
    plain = load_ml100k(ml100k_dir(tmp_path / "plain")).dataset
    root = ml100k_dir(tmp_path / "bom")
    (root / "u.data").write_bytes(b"\xef\xbb\xbf" + U_DATA.encode())
    bom = load_ml100k(root).dataset.sequences
    assert len(bom) == len(plain.sequences)
    assert all(np.array_equal(a, b) for a, b in zip(bom, plain.sequences, strict=True))
    (root / "u.data").write_bytes(U_DATA.encode("utf-16"))
    with pytest.raises(DataError, match=r"u\.data is UTF-16 text; re-save it as UTF-8"):
        load_ml100k(root)
    latest = ml_latest_dir(tmp_path / "latest")
    (latest / "ratings.csv").write_bytes(b"\xef\xbb\xbf" + (latest / "ratings.csv").read_bytes())
    assert load_ml_latest(latest).dataset.n_users == 2
    write(latest / "ratings.csv", "")
    with pytest.raises(DataError, match=r"ratings\.csv is empty; expected the header 'userId,"):
        load_ml_latest(latest)


def test_a_blank_line_above_a_tables_header_is_not_called_an_empty_file(tmp_path: Path) -> None:
    """A ratings.csv whose rows sat below a blank first line was refused as "empty"."""
    latest = ml_latest_dir(tmp_path)
    ratings = latest / "ratings.csv"
    ratings.write_text("\r\n" + ratings.read_text())
    with pytest.raises(DataError) as caught:
        load_ml_latest(latest)
    assert "is empty" not in str(caught.value)
    assert re.search(r"ratings\.csv, line 1: blank, but the header 'userId,", str(caught.value))
    write(ratings, " \n\n")  # blank lines only: nothing to read
    with pytest.raises(DataError, match=r"ratings\.csv is empty; expected the header 'userId,"):
        load_ml_latest(latest)


@pytest.mark.parametrize("value", ["1_000", "\u0661\u0662"])  # Python's int() takes both
def test_a_number_numpy_rejects_is_named_with_its_line(tmp_path: Path, value: str) -> None:
    root = ml100k_dir(tmp_path)
    (root / "u.data").write_bytes(f"1\t1\t5\t1\n1\t2\t5\t{value}\n".encode())
    with pytest.raises(DataError, match=r"u\.data, line 2: column 'timestamp' must be an integer"):
        load_ml100k(root)
    rows = f"user,item,timestamp\nu,b1,1\nu,b2,{value}\nu,b3,3\n"
    with pytest.raises(DataError, match=r"interactions\.csv, line 3: column 'timestamp'"):
        load_generic(generic_dir(tmp_path / "g", interactions=rows))


def test_generic_non_numeric_rating_names_line(tmp_path: Path) -> None:
    root = generic_dir(tmp_path, interactions="user,item,timestamp,rating\nu,b1,1,five\n")
    with pytest.raises(DataError, match=r"line 2: column 'rating' must be a number"):
        load_generic(root)


def test_generic_empty_id_and_empty_file(tmp_path: Path) -> None:
    root = generic_dir(tmp_path, interactions="user,item,timestamp\n ,b1,1\n")
    with pytest.raises(DataError, match=r"line 2: column 'user' is empty"):
        load_generic(root)
    write(root / "interactions.csv", "")
    with pytest.raises(DataError, match="is empty; expected a header"):
        load_generic(root)
    write(root / "interactions.csv", "user,item,timestamp\n")
    with pytest.raises(DataError, match="holds no interactions"):
        load_generic(root)


def test_duplicates_and_repeats_dropped_and_counted(tmp_path: Path) -> None:
    """A repeat (an item the user already had, at a later time) is dropped too: the protocol
    never recommends a seen item, so a repeated test item would count as a hit that no
    recommendation list contains. The earliest interaction stays, wherever it is in the file."""
    rows = "user,item,timestamp\nu,b1,1\nu,b2,2\nu,b1,1\nu,b3,3\nu,b1,4\nu,b2,2\n"
    rows += "v,b2,9\nv,b1,5\nv,b2,6\nv,b3,7\n"
    loaded = load_generic(generic_dir(tmp_path, interactions=rows))
    assert loaded.report.duplicates_dropped == 2
    assert loaded.report.repeats_dropped == 2
    assert seq_raw(loaded.dataset, "u") == ["b1", "b2", "b3"]
    assert seq_raw(loaded.dataset, "v") == ["b1", "b2", "b3"]  # b2 kept at 6, not at 9
    assert "dropped 2 repeats" in str(loaded.report)


def test_unknown_items_dropped_counted_and_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = "user,item,timestamp\nu,b1,1\nu,zz,2\nu,b2,3\nu,b3,4\nu,yy,5\n"
    with caplog.at_level(logging.WARNING, logger="shared.data.cleaning"):
        loaded = load_generic(generic_dir(tmp_path, interactions=rows))
    assert loaded.report.unknown_items_dropped == 2
    assert loaded.report.rows_read == 5 and loaded.report.interactions == 3
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "dropped 2 of 5" in warning.getMessage() and "yy" in warning.getMessage()


def test_short_users_dropped_counted_and_configurable(tmp_path: Path) -> None:
    rows = "user,item,timestamp\na,b1,1\na,b2,2\na,b3,3\nb,b1,1\nb,b2,2\nc,b4,1\n"
    root = generic_dir(tmp_path, interactions=rows)
    report = load_generic(root).report
    assert (report.short_users_dropped, report.short_user_interactions_dropped) == (2, 3)
    assert (report.users, report.interactions, report.items) == (1, 3, 4)
    assert report.cold_items == 1  # b4 lost its only user but stays in the catalog
    ds = load_generic(root, min_user_interactions=1).dataset
    assert ds.user_ids == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="min-user-interactions"):
        load_generic(root, min_user_interactions=0)


def test_everything_filtered_is_an_error(tmp_path: Path) -> None:
    root = generic_dir(tmp_path, interactions="user,item,timestamp\nu,b1,1\nu,b2,2\n")
    with pytest.raises(DataError, match="no interactions left after cleaning") as err:
        load_generic(root)
    # the hint's command works as written (without --dataset it meant the synthetic world)
    hint = re.search(r"`fedrec (data info .*) --min-user-interactions N` shows", str(err.value))
    assert hint is not None, str(err.value)
    args = [*shlex.split(hint.group(1)), "--min-user-interactions", "1", "--format", "json"]
    result = CliRunner().invoke(fedrec_app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["summary"]["interactions"] == 2  # what 1 would keep


def test_duplicate_catalog_ids_are_an_error(tmp_path: Path) -> None:
    root = generic_dir(tmp_path, items="item,text\nb1,One\nb2,Two\nb1,Again\n")
    with pytest.raises(DataError, match=r"items\.csv: item ids must be unique.*'b1'"):
        load_generic(root)


def test_u_item_wrong_field_count(tmp_path: Path) -> None:
    root = ml100k_dir(tmp_path, items="1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1\n")
    with pytest.raises(DataError, match=r"u\.item, line 1: expected 10 '\|'-separated fields"):
        load_ml100k(root)


def test_cleaning_report_is_printable(tmp_path: Path) -> None:
    report = load_ml100k(ml100k_dir(tmp_path)).report
    text = str(report)
    assert "read 6 interactions of 2 users" in text and "1 cold" in text
    assert report.as_dict()["interactions"] == 6
    assert len(report.lines()) == 6


# --------------------------------------------------------------------------- registry


def test_dataset_names() -> None:
    assert set(DATASET_NAMES) == {
        "ml-100k",
        "ml-1m",
        "ml-latest-small",
        "ml-latest",
        "ml-25m",
        "generic",
        "synthetic",
    }


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(DataError) as err:
        load_dataset("netflix", "/nonexistent")
    assert "netflix" in str(err.value)
    assert all(n in str(err.value) for n in DATASET_NAMES)


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("ml-100k", ml100k_dir),
        ("ml-1m", ml1m_dir),
        ("ml-latest-small", ml_latest_dir),
        ("ml-latest", ml_latest_dir),
        ("ml-25m", ml_latest_dir),
        ("generic", generic_dir),
    ],
)
def test_registry_loads_each_layout(tmp_path: Path, name: str, make: MakeDir) -> None:
    make(tmp_path / "data")
    loaded = load_dataset_with_report(name, tmp_path / "data", download=False)
    assert loaded.dataset.name == name
    assert loaded.report.interactions == loaded.dataset.n_interactions > 0


def test_registry_finds_named_subfolder(tmp_path: Path) -> None:
    ml100k_dir(tmp_path / "ml-100k")
    assert load_dataset("ml-100k", tmp_path).n_users == 2


def test_detect_layout(tmp_path: Path) -> None:
    assert detect_layout(ml1m_dir(tmp_path / "a")) == "ml-1m"
    assert detect_layout(generic_dir(tmp_path / "b")) == "generic"
    assert detect_layout(tmp_path) is None


def test_registry_layout_mismatch(tmp_path: Path) -> None:
    ml1m_dir(tmp_path)
    with pytest.raises(DataError, match=r"holds the ml-1m layout .*not ml-100k's"):
        load_dataset("ml-100k", tmp_path)


def test_a_partial_copy_beside_another_layout_is_told_what_it_lacks(tmp_path: Path) -> None:
    """A folder holding ml-latest's files and ml-1m's ratings.dat without its movies.dat was
    said to hold "the ml-latest layout, not ml-1m's; choose the matching dataset name": the
    missing file of the dataset asked for went unnamed."""
    ml_latest_dir(tmp_path)
    write(tmp_path / "ratings.dat", "1::1::5::978300760\n")
    with pytest.raises(DatasetNotFoundError, match=r"ml-1m: .* lacks movies\.dat \(found"):
        load_dataset("ml-1m", tmp_path)
    (tmp_path / "ratings.dat").unlink()  # nothing of ml-1m's: the other layout is named
    with pytest.raises(DataError, match=r"holds the ml-latest layout .*not ml-1m's"):
        load_dataset("ml-1m", tmp_path)


def test_registry_missing_or_empty_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset("ml-1m", tmp_path / "nope")
    write(tmp_path / "README.txt", "hi")
    with pytest.raises(DatasetNotFoundError, match=r"lacks ratings\.dat and movies\.dat"):
        load_dataset("ml-1m", tmp_path)
    write(tmp_path / "ratings.dat", "1::1::5::978300760\n")
    with pytest.raises(DatasetNotFoundError, match=r"lacks movies\.dat \(found"):
        load_dataset("ml-1m", tmp_path)  # only the missing one is named
    with pytest.raises(DatasetNotFoundError, match="or omit it to download"):
        load_dataset("ml-1m", tmp_path)  # downloadable
    generic = tmp_path / "generic"
    write(generic / "interactions.csv", "user,item,timestamp\n1,a,1\n")
    with pytest.raises(DatasetNotFoundError, match=r"lacks items\.csv") as err:
        load_dataset("generic", generic)
    assert "download" not in str(err.value)  # nothing to download for generic data


def test_registry_without_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="needs --data-dir"):
        load_dataset("generic", cache_dir=tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"ml-25m\.zip"):
        load_dataset("ml-25m", cache_dir=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="downloading is disabled"):
        load_dataset("ml-100k", cache_dir=tmp_path, download=False)


def test_registry_uses_cache_dir(tmp_path: Path) -> None:
    ml_latest_dir(tmp_path / "ml-25m")  # e.g. unzipped there by hand
    assert load_dataset("ml-25m", cache_dir=tmp_path, download=False).n_users == 2


def test_errors_name_the_file_at_fault(tmp_path: Path) -> None:
    """An incomplete cached copy says to delete it (omitting --data-dir was already done); a
    cut u.genre is named when u.item's genre flags stop matching it; a broken link is a
    broken link, not a missing file that the listing then shows."""
    (tmp_path / "cache" / "ml-100k").mkdir(parents=True)
    write(tmp_path / "cache" / "ml-100k" / "u.data", U_DATA)
    with pytest.raises(DatasetNotFoundError, match=r"cached copy .* is incomplete \(it lacks "):
        load_dataset("ml-100k", cache_dir=tmp_path / "cache")
    root = ml100k_dir(tmp_path / "genre")
    lines = (root / "u.genre").read_text(encoding="latin-1").splitlines()
    write(root / "u.genre", "\n".join(lines[:3]) + "\n", "latin-1")
    with pytest.raises(DataError, match=r"u.item, line 1: .*comes from .*u.genre"):
        load_ml100k(root)
    root = ml100k_dir(tmp_path / "link")
    (root / "u.data").unlink()
    (root / "u.data").symlink_to(tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match=r"has u\.data as a broken link"):
        load_dataset("ml-100k", root)


def test_registry_passes_min_user_interactions(tmp_path: Path) -> None:
    ml100k_dir(tmp_path)  # both users have 3 interactions
    assert load_dataset("ml-100k", tmp_path, min_user_interactions=3).n_users == 2
    with pytest.raises(DataError, match="fewer than 4 interactions"):
        load_dataset("ml-100k", tmp_path, min_user_interactions=4)


def test_synthetic_delegates_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, int] = {}
    dataset = build_dataset(
        "synthetic",
        ["u", "u", "u"],
        ["a", "b", "a"],
        np.array([1, 2, 3]),
        ["a", "b", "c"],
        ["A.", "B.", "C."],
    )

    class Config:
        def __init__(self, seed: int) -> None:
            seen["seed"] = seed

    def generate_world(config: Config) -> types.SimpleNamespace:
        return types.SimpleNamespace(dataset=dataset)

    fake = types.ModuleType("shared.data.synthetic")
    fake.SyntheticConfig = Config  # type: ignore[attr-defined]
    fake.generate_world = generate_world  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "shared.data.synthetic", fake)
    loaded = load_dataset_with_report("synthetic", synthetic_seed=7)
    assert seen == {"seed": 7}
    assert loaded.dataset is dataset
    assert isinstance(loaded.report, CleaningReport)
    assert loaded.report.cold_items == 1 and loaded.report.interactions == 3
    assert not loaded.report.filtered and "no filters applied" in str(loaded.report)


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (REAL_ML100K / "u.data").is_file(), reason="ML-100K not present")
def test_real_ml100k() -> None:
    loaded = load_dataset_with_report("ml-100k", REAL_ML100K, download=False)
    ds = loaded.dataset
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (943, 1682, 100000)
    assert ds.item_text[ds.item_ids.index("1")].startswith("Toy Story (1995)")
    assert loaded.report.duplicates_dropped == loaded.report.unknown_items_dropped == 0
    assert all(np.all(np.diff(t) >= 0) for t in ds.timestamps)


def test_numeric_looking_ids_of_any_size_or_script_load(tmp_path: Path) -> None:
    """Generic ids are strings: integers of any size sort numerically, and ids that only
    look numeric ("³" passes str.isdigit, "--5") sort as text instead of crashing."""
    rows = "user,item,timestamp\n"
    for user in ("99999999999999999999", "3", "-1"):
        rows += "".join(f"{user},b{i},{i}\n" for i in (1, 2, 3))
    assert load_generic(generic_dir(tmp_path / "big", interactions=rows)).dataset.user_ids == [
        "-1",
        "3",
        "99999999999999999999",
    ]
    rows = "user,item,timestamp\n" + "".join(
        f"{user},b{i},{i}\n" for user in ("³", "--5", "2") for i in (1, 2, 3)
    )
    ds = load_generic(generic_dir(tmp_path / "odd", interactions=rows)).dataset
    assert sorted(ds.user_ids) == ["--5", "2", "³"] and ds.n_users == 3


def test_a_copy_cut_mid_row_or_short_of_the_release_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A u.data cut mid-row still parses (its last timestamp shortened): the loader says the
    file does not end with a line break, and that the copy is not the 100,000-row release."""
    with caplog.at_level(logging.WARNING, logger="shared.data"):
        load_ml100k(ml100k_dir(tmp_path / "whole"))
    assert "line break" not in caplog.text
    assert "holds 6 ratings, the MovieLens 100K release 100000" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shared.data"):
        load_ml100k(ml100k_dir(tmp_path / "cut", data=U_DATA + "2\t4\t1\t88"))
    assert "does not end with a line break: its last row may be cut short" in caplog.text


def test_a_movie_list_cut_mid_row_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """movies.dat cut inside its last genre list still parses (``Action|Crime|Thr``: a genre
    "Thr" in the item's text, "Thriller" lost); the rating tables and movies.csv warned about
    a file without a final line break, the '::' and '|' movie lists did not."""
    root = ml1m_dir(tmp_path)
    movies = root / "movies.dat"
    with caplog.at_level(logging.WARNING, logger="shared.data"):
        load_ml1m(root)
    assert "line break" not in caplog.text
    movies.write_bytes(movies.read_bytes() + b"4::Cut (1999)::Action|Crime|Thr")
    with caplog.at_level(logging.WARNING, logger="shared.data"):
        load_ml1m(root)
    assert f"{movies} does not end with a line break: its last row may be cut short" in (
        caplog.text
    )


@pytest.mark.parametrize(
    ("make", "load", "movies", "content"),
    [
        (
            ml1m_dir,
            load_ml1m,
            "movies.dat",
            "1::A (1995)::Drama\n2::::(no genres listed)\n3::C (1990)::\n",
        ),
        (
            ml_latest_dir,
            load_ml_latest,
            "movies.csv",
            "movieId,title,genres\n1,A (1995),Drama\n2, ,(no genres listed)\n5,E (1990),\n",
        ),
    ],
)
def test_a_movie_without_title_or_genres_is_warned_about(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    make: MakeDir,
    load: Loader,
    movies: str,
    content: str,
) -> None:
    """A MovieLens movie with neither a title nor a genre has an empty language-model text
    (every such movie gets the same embedding); items.csv warned about it, the MovieLens
    movie lists loaded it silently."""
    root = make(tmp_path)
    write(root / movies, content, "latin-1")
    with caplog.at_level(logging.WARNING, logger="shared.data"):
        ds = load(root).dataset
    assert ds.item_text[ds.item_ids.index("2")] == ""
    assert f"{root / movies}: 1 of 3 items have an empty text (e.g. items ['2'])" in caplog.text


@pytest.mark.parametrize(
    ("make", "load", "ratings", "blank"),
    [
        (ml1m_dir, load_ml1m, "ratings.dat", "\t"),  # was "holds a tab ... another layout"
        (ml100k_dir, load_ml100k, "u.data", "  "),
        (ml_latest_dir, load_ml_latest, "ratings.csv", " \t"),
    ],
)
def test_a_line_of_only_spaces_or_tabs_in_a_rating_table_is_skipped_as_blank(
    tmp_path: Path, make: MakeDir, load: Loader, ratings: str, blank: str
) -> None:
    """Empty lines were skipped but a line holding only whitespace (an editor's trailing
    line) was refused, with a misleading fix for ML-1M (a tab-separated copy of another
    layout); the movie lists and CSV readers skip such lines. Line numbers stay the file's."""
    plain = load(make(tmp_path / "plain")).dataset
    root = make(tmp_path / "odd")
    path = root / ratings
    lines = path.read_text(encoding="latin-1").splitlines(keepends=True)
    lines.insert(len(lines) - 2, blank + "\n")
    path.write_text("".join(lines) + blank + "\r\n", encoding="latin-1")
    odd = load(root).dataset
    assert odd.user_ids == plain.user_ids
    assert all(np.array_equal(a, b) for a, b in zip(odd.sequences, plain.sequences, strict=True))
    path.write_text("".join(lines) + "x\n", encoding="latin-1")
    with pytest.raises(DataError, match=rf"{re.escape(ratings)}, line {len(lines) + 1}: "):
        load(root)


def test_a_repeated_movie_id_names_the_lines_that_give_it(tmp_path: Path) -> None:
    """Ids are normalised ("03" is movie 3), so the repeat the error named ('3') could not be
    found by searching the file for it; the lines that give it are named."""
    root = ml1m_dir(tmp_path)
    write(root / "movies.dat", "1::A (1995)::Drama\n2::B::Drama\n\n3::C::Drama\n03::D::Drama\n")
    with pytest.raises(DataError) as caught:
        load_ml1m(root)
    assert "item ids must be unique, but 1 repeat" in str(caught.value)
    assert "'3' on lines 4 and 5" in str(caught.value)
    root = generic_dir(tmp_path / "g", items="item,text\nb1,One\nb2,Two\nb1,Again\n")
    with pytest.raises(DataError, match=r"items\.csv: item ids .*'b1' on lines 2 and 4"):
        load_generic(root)


@pytest.mark.parametrize(
    ("make", "load", "release"),
    [
        (ml1m_dir, load_ml1m, "the MovieLens 1M release 1000209"),
        (ml_latest_dir, load_ml_latest, "the MovieLens 25M release 25000095"),
    ],
)
def test_a_fixed_release_short_of_its_ratings_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, make: MakeDir, load: Loader, release: str
) -> None:
    """A partial ml-1m or ml-25m copy (a head of ratings.dat, say) loaded silently under the
    release's name, as ml-100k's no longer did; ml-latest(-small) is republished with other
    counts, so it is not checked."""
    root = make(tmp_path)
    name = "ml-1m" if load is load_ml1m else "ml-25m"
    with caplog.at_level(logging.WARNING, logger="shared.data"):
        load_dataset(name, root)
    assert f"holds 6 ratings, {release}: a partial or edited copy?" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shared.data"):
        load_dataset("ml-latest-small" if name == "ml-25m" else "ml-1m", root)
        load(root)  # the loader's default name (ml-1m, ml-latest)
    assert ("partial or edited copy" in caplog.text) is (name == "ml-1m")


# ------------------------------------------- every layout against a straightforward reading

PIN_LAYOUTS = ("ml-100k", "ml-1m", "ml-latest", "generic", "generic-text")


def _pin_files(root: Path, layout: str, seed: int) -> tuple[list[tuple[str, str, int]], Catalog]:
    """Write a small random copy of ``layout`` with every case the filters and the id order
    meet (unknown items, exact duplicates, repeats, ties in time, short users, ids of mixed
    width, zero-padded MovieLens ids); returns its rows as (user, item, timestamp) raw ids in
    file order, and its catalog, both as read here without the loaders."""
    rng = np.random.default_rng(seed)
    movies = [(m, f"Film {m}, The ({1990 + m})", ["Comedy", "Drama"][: m % 3]) for m in range(26)]
    movies[0] = (40, "Café 40", ["Action"])
    text_ids = layout == "generic-text"
    users = ["a", "b10", "b9", "c", "Z"] if text_ids else ["1", "2", "9", "10", "007", "1234567"]
    rows = []
    for _ in range(160):
        user = str(rng.choice(users))
        item = int(rng.choice([*(m for m, _, _ in movies), 97]))  # 97: not in the catalog
        rows.append((user, str(item), int(rng.integers(0, 6)), float(rng.integers(1, 11) / 2)))
    rows += [rows[3], rows[10], rows[10], ("e" if text_ids else "5", "1", 1, 1.0)]
    if layout == "ml-100k":
        items = [[str(m), t, "01-Jan-1995", "", "http://x"] for m, t, _ in movies]
        flags = [["1" if f in g else "0" for f in ML100K_GENRES] for _, _, g in movies]
        lines = ["|".join(fields + f) for fields, f in zip(items, flags, strict=True)]
        write(root / "u.item", "".join(f"{line}\n" for line in lines), "latin-1")
        write(root / "u.data", "".join(f"{u}\t{i}\t{r:.0f}\t{t}\n" for u, i, t, r in rows))
    elif layout == "ml-1m":
        lines = [f"{m}::{t}::{'|'.join(g)}\n" for m, t, g in movies]
        write(root / "movies.dat", "".join(lines), "latin-1")
        write(root / "ratings.dat", "".join(f"{u}::{i}::{r:.0f}::{t}\n" for u, i, t, r in rows))
    elif layout == "ml-latest":
        lines = [f'{m},"{t}",{"|".join(g) or "(no genres listed)"}\n' for m, t, g in movies]
        write(root / "movies.csv", "movieId,title,genres\n" + "".join(lines))
        lines = [f"{u},{i},{r},{t}\n" for u, i, t, r in rows]
        write(root / "ratings.csv", "userId,movieId,rating,timestamp\n" + "".join(lines))
    else:
        write(root / "items.csv", "item,text\n" + "".join(f'm{m},"{t}"\n' for m, t, _ in movies))
        lines = [f"{u},m{i},{t},{r}\n" for u, i, t, r in rows]
        write(root / "interactions.csv", "user,item,timestamp,rating\n" + "".join(lines))
    generic = layout.startswith("generic")
    catalog = Catalog(
        root,
        [f"m{m}" if generic else str(m) for m, _, _ in movies],
        [t for _, t, _ in movies],
        [[] if generic else g for _, _, g in movies],
        [t if generic else format_item_text(t, g) for _, t, g in movies],
    )
    ids = [(u if generic else str(int(u)), f"m{i}" if generic else i, t) for u, i, t, _ in rows]
    return ids, catalog


def _reference(
    name: str, rows: list[tuple[str, str, int]], catalog: Catalog, min_interactions: int = 3
) -> RecDataset:
    """The dataset the module docs of ``shared.data.cleaning`` and ``dataset`` describe, built
    row by row in plain Python: unknown items, exact duplicates (the first stays), repeats
    (the earliest stays, ties: the first in the file) and short users dropped; users in the
    order of their raw ids (numerically when all are integers), items in catalog order, each
    sequence sorted by time with ties in file order."""
    position = {item: i for i, item in enumerate(catalog.ids)}
    kept = [row for row in rows if row[1] in position]
    kept = [row for n, row in enumerate(kept) if row not in kept[:n]]
    earliest: dict[tuple[str, str], int] = {}
    for n, (user, item, stamp) in enumerate(kept):
        first = earliest.setdefault((user, item), n)
        if stamp < kept[first][2]:
            earliest[(user, item)] = n
    kept = [row for n, row in enumerate(kept) if earliest[row[:2]] == n]
    count = Counter(user for user, _, _ in kept)
    kept = [row for row in kept if count[row[0]] >= min_interactions]
    users = sorted({user for user, _, _ in kept})
    if all(re.fullmatch(r"-?[0-9]+", user) for user in users):
        users.sort(key=int)
    history = {
        user: sorted((s, n, i) for n, (u, i, s) in enumerate(kept) if u == user) for user in users
    }
    return RecDataset(
        name,
        users,
        catalog.ids,
        catalog.texts,
        [np.array([position[i] for _, _, i in history[u]], dtype=np.int64) for u in users],
        [np.array([s for s, _, _ in history[u]], dtype=np.int64) for u in users],
        catalog.titles,
        catalog.categories,
    )


@pytest.mark.parametrize("layout", PIN_LAYOUTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_every_layout_loads_as_a_plain_reading_of_its_files(
    tmp_path: Path, layout: str, seed: int
) -> None:
    """Pins what the loaders produce (ids, order, sequences, timestamps, texts, fingerprint)
    against a straightforward row-by-row reading, whatever the loaders do to stay fast and
    small on ml-25m's 25M rows (integer id columns are never turned into strings)."""
    rows, catalog = _pin_files(tmp_path, layout, seed)
    name = {"ml-latest": "ml-25m", "generic-text": "generic"}.get(layout, layout)
    ds = load_dataset(name, tmp_path)
    expected = _reference(name, rows, catalog)
    assert ds.user_ids == expected.user_ids
    assert ds.item_ids == expected.item_ids
    assert ds.item_text == expected.item_text
    assert ds.item_titles == expected.item_titles
    assert ds.item_categories == expected.item_categories
    for got, want in zip(
        ds.sequences + ds.timestamps, expected.sequences + expected.timestamps, strict=True
    ):
        assert got.dtype == want.dtype and got.tolist() == want.tolist()
    assert ds.fingerprint() == expected.fingerprint()


def test_integer_id_columns_build_the_dataset_their_strings_build() -> None:
    """build_dataset takes integer id columns as the ids' decimal strings (MovieLens' are
    never turned into strings: 84 bytes a row), and names the first unknown item in row
    order."""
    users = np.array([10, -3, 2, 10, 2, -3, 10], dtype=np.int64)
    items = np.array([7, 5, 5, 1, 7, 7, 5], dtype=np.int64)
    stamps = np.array([3, 1, 2, 3, 0, 1, 2], dtype=np.int64)
    catalog, texts = ["5", "1", "7", "9"], ["e.", "a.", "g.", "i."]
    as_ints = build_dataset("x", users, items, stamps, catalog, texts)
    as_text = build_dataset(
        "x", users.astype(str).tolist(), items.astype(str), stamps, catalog, texts
    )
    assert as_ints.user_ids == as_text.user_ids == ["-3", "2", "10"]
    assert [s.tolist() for s in as_ints.sequences] == [s.tolist() for s in as_text.sequences]
    assert [s.tolist() for s in as_ints.sequences] == [[0, 2], [2, 0], [0, 2, 1]]
    assert as_ints.fingerprint() == as_text.fingerprint()
    for column in (np.array([1, 8, 3, 8]), np.array(["1", "8", "3", "8"])):
        with pytest.raises(DataError, match=r"^x: interaction references item '8' that is not in"):
            build_dataset("x", np.arange(4), column, np.arange(4), ["1", "2"], ["a.", "b."])


def test_coded_id_columns_build_the_dataset_their_strings_build() -> None:
    """build_dataset takes codes into sorted tables of distinct ids (the generic reader's
    interned columns) as the ids themselves: users ordered numerically when every id in use
    is an integer, unused names left out, the first unknown item in row order named."""
    user_names, item_names = np.array(["-3", "10", "2", "x"]), np.array(["1", "5", "7", "8"])
    users = np.array([1, 0, 2, 1, 2, 0, 1], dtype=np.int64)  # "x" is not in use
    items = np.array([2, 1, 1, 0, 2, 2, 1], dtype=np.int64)
    stamps = np.array([3, 1, 2, 3, 0, 1, 2], dtype=np.int64)
    catalog, texts = ["5", "1", "7", "9"], ["e.", "a.", "g.", "i."]
    coded = build_dataset(
        "x", users, items, stamps, catalog, texts, user_names=user_names, item_names=item_names
    )
    plain = build_dataset("x", user_names[users], item_names[items], stamps, catalog, texts)
    assert coded.user_ids == plain.user_ids == ["-3", "2", "10"]
    assert [s.tolist() for s in coded.sequences] == [s.tolist() for s in plain.sequences]
    assert coded.fingerprint() == plain.fingerprint()
    with pytest.raises(DataError, match=r"^x: interaction references item '8' that is not in"):
        build_dataset(
            "x",
            np.arange(4),
            np.array([0, 3, 1, 3]),
            np.arange(4),
            ["1", "5"],
            ["a.", "b."],
            item_names=item_names,
        )


def test_loader_warnings_show_a_path_the_locale_cannot_decode_readably(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A data folder whose name is not valid in the locale's encoding (byte 0xff, e.g.
    under ``LC_ALL=C``): the loaders' warnings printed the lone surrogate Python
    holds for that byte (``?`` in a C-locale log, a raw invalid byte under UTF-8, an
    encoding error on a strict stream). They show ``\\xff``, as ``fedrec data info`` does."""
    try:
        odd = tmp_path / os.fsdecode(b"caf\xff")
        odd.mkdir()
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    root = ml100k_dir(odd / "ml", data=U_DATA + "2\t4\t1\t88")  # cut mid-row, not the release
    items = "item,text\nb1,One\nb2, \nb3,Three\n"  # b2: an empty text
    rows = "user,item,timestamp\nu,b1,1\nu,zz,2\nu,b3,3\nu,b2,4\n"  # zz: not in items.csv
    generic = generic_dir(odd / "g", interactions=rows, items=items)
    with caplog.at_level(logging.WARNING, logger="shared.data"):
        load_ml100k(root)
        load_generic(generic)
    shown = [r.getMessage() for r in caplog.records if "caf" in r.getMessage()]
    assert not [m for m in shown if re.search("[\udc80-\udcff]", m)]
    readable = f"{tmp_path}/caf\\xff"
    for line in (
        f"{readable}/ml/u.data does not end with a line break",
        f"{readable}/ml/u.data holds 7 ratings, the MovieLens 100K release 100000",
        f"{readable}/g/items.csv: 1 of 3 items have an empty text",
        f"whose item is not in {readable}/g/items.csv (e.g. items ['zz'])",
    ):
        assert any(line in m for m in shown), (line, shown)
