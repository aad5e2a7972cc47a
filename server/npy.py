"""NumPy ``.npy`` blobs read with their header parsed once per layout.

Flower ships arrays as ``.npy`` bytes and reads them back with ``np.load``, which parses
the header (a Python dict literal) with ``ast.literal_eval`` every time: about 50 us a
blob. In the SecAgg+ collect stage the server reads every client's masked vector, one
blob per parameter tensor (15 for the student): 750 header parses per round at cohort
50, on the round's critical path. The headers repeat (same dtype and shape every round),
so :func:`load_npy` parses each distinct header once and reads the data with
``np.frombuffer``. Same result as ``np.load(..., allow_pickle=False)``; object arrays and
malformed blobs are refused with ``ValueError``.
"""

from __future__ import annotations

import io
import math
import threading
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["load_npy", "parameters_to_arrays"]

_MAGIC = b"\x93NUMPY"
#: Bytes before the header for each format version: magic, version, header length.
_PREAMBLE = {1: 10, 2: 12, 3: 12}


#: numpy reads a header with ``ast.literal_eval``; CPython 3.11 builds ASTs with state
#: shared between threads, and two threads parsing at once can fail with "SystemError: AST
#: constructor recursion depth mismatch" (seen with a simulation's client threads): one
#: parse at a time.
_PARSE_LOCK = threading.Lock()


@lru_cache(maxsize=1024)
def _layout(header: bytes) -> tuple[np.dtype[Any], tuple[int, ...], bool]:
    """dtype, shape and Fortran order of a complete ``.npy`` header (preamble included)."""
    with _PARSE_LOCK:
        return _parse_layout(header)


def _parse_layout(header: bytes) -> tuple[np.dtype[Any], tuple[int, ...], bool]:
    stream = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(stream)
    try:
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except ValueError:
        raise
    except Exception as exc:  # numpy lets tokenize's TokenError, a TypeError... through
        raise ValueError(f"malformed .npy header ({type(exc).__name__}: {exc})") from None
    if dtype.hasobject:
        raise ValueError("refusing an .npy blob of Python objects (it would need pickle)")
    return dtype, tuple(shape), bool(fortran)


def load_npy(blob: bytes) -> npt.NDArray[Any]:
    """The array stored in ``blob`` (``.npy`` format), as a writable array."""
    if len(blob) < 10 or blob[:6] != _MAGIC or blob[6] not in _PREAMBLE:
        raise ValueError("not an .npy blob (bad magic string or version)")
    preamble = _PREAMBLE[blob[6]]
    if len(blob) < preamble:
        raise ValueError("truncated .npy blob")
    length_bytes = blob[8:preamble]
    offset = preamble + int.from_bytes(length_bytes, "little")
    if len(blob) < offset:
        raise ValueError("truncated .npy blob")
    dtype, shape, fortran = _layout(bytes(blob[:offset]))
    count = math.prod(shape)
    if len(blob) - offset != count * dtype.itemsize:
        raise ValueError(
            f".npy blob holds {len(blob) - offset} data bytes, its header says "
            f"{count * dtype.itemsize}"
        )
    flat = np.frombuffer(blob, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


class _Tensors(Protocol):
    """What :func:`parameters_to_arrays` reads of Flower's ``Parameters``."""

    @property
    def tensors(self) -> list[bytes]: ...


def parameters_to_arrays(parameters: _Tensors) -> list[npt.NDArray[Any]]:
    """Flower's ``parameters_to_ndarrays`` with :func:`load_npy`: the arrays of a
    ``Parameters``, their headers parsed one at a time however many threads read (a
    simulation's server and client threads share one interpreter)."""
    return [load_npy(t) for t in parameters.tensors]
