"""``server.npy.load_npy`` reads what ``np.save`` wrote, like ``np.load`` without pickle."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from flwr.common import bytes_to_ndarray, ndarray_to_bytes

from server.npy import load_npy


def _save(array: npt.NDArray[Any], version: tuple[int, int] | None = None) -> bytes:
    if version is None:
        return ndarray_to_bytes(array)
    stream = io.BytesIO()
    np.lib.format.write_array(stream, array, version=version, allow_pickle=False)
    return stream.getvalue()


CASES: list[npt.NDArray[Any]] = [
    np.random.default_rng(0).integers(0, 2**32, (64, 48)),  # a masked vector's dtype
    np.random.default_rng(1).normal(size=(50, 64)).astype(np.float32),
    np.asfortranarray(np.arange(35.0).reshape(5, 7)),
    np.arange(6, dtype=">i4"),  # big-endian
    np.array(3.5),  # 0-d
    np.zeros((0, 3), dtype=np.int8),  # empty
    np.array([(1, 2.0)], dtype=[("a", "<i2"), ("b", "<f8")]),  # structured
]


@pytest.mark.parametrize("array", CASES, ids=lambda a: f"{a.dtype}{a.shape}")
@pytest.mark.parametrize("version", [None, (1, 0), (2, 0)])
def test_reads_what_numpy_wrote_like_np_load(
    array: npt.NDArray[Any], version: tuple[int, int] | None
) -> None:
    blob = _save(array, version)
    ours, numpys = load_npy(blob), bytes_to_ndarray(blob)
    assert ours.dtype == numpys.dtype and ours.shape == numpys.shape
    assert ours.tobytes(order="A") == numpys.tobytes(order="A")
    assert ours.flags.f_contiguous == numpys.flags.f_contiguous
    assert ours.flags.writeable  # like np.load's, and a private copy:
    np.copyto(ours, np.zeros_like(ours))
    assert load_npy(blob).tobytes(order="A") == numpys.tobytes(order="A")


def test_same_header_twice_reads_each_blobs_own_data() -> None:
    first, second = np.arange(12).reshape(3, 4), np.arange(12, 24).reshape(3, 4)
    assert np.array_equal(load_npy(_save(first)), first)
    assert np.array_equal(load_npy(_save(second)), second)


def test_refuses_malformed_blobs_and_objects() -> None:
    blob = _save(np.arange(10, dtype=np.int64))
    with pytest.raises(ValueError, match=r"not an \.npy blob"):
        load_npy(b"\x00" + blob[1:])
    with pytest.raises(ValueError, match=r"not an \.npy blob"):
        load_npy(blob[:6] + b"\x09" + blob[7:])  # unknown format version
    with pytest.raises(ValueError, match="header says 80"):
        load_npy(blob[:-8])  # a truncated data part
    with pytest.raises(ValueError, match="truncated"):
        load_npy(blob[:20])  # a truncated header
    stream = io.BytesIO()
    np.save(stream, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        load_npy(stream.getvalue())


@pytest.mark.parametrize(
    ("old", "new"),
    [(b"{", b"\xef"), (b" 'shape'", b"B'shape'")],  # an unclosed bracket; a bytes key
)
def test_a_header_that_is_no_dict_literal_is_a_value_error(old: bytes, new: bytes) -> None:
    """numpy's header parse let tokenize's TokenError and a TypeError (sorting a bytes key
    among the str ones) through, where load_npy promises ValueError for a malformed blob."""
    blob = _save(np.arange(3, dtype=np.int64), (1, 0))
    end = 10 + int.from_bytes(blob[8:10], "little")
    damaged = blob[:10] + blob[10:end].replace(old, new, 1) + blob[end:]
    assert len(damaged) == len(blob)
    with pytest.raises(ValueError, match=r"malformed \.npy header"):
        load_npy(damaged)
