"""Checks and clipping for client updates, as pure functions.

Used on both sides: the client glue checks what its task produced before sending it,
and the server strategy checks every update it receives before aggregating (in plain
FedAvg; under SecAgg+ it only sees the sum, so it checks that instead). Errors carry a
short machine-readable ``code`` and a message that names the array and the problem.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from shared.errors import DataError

NON_FINITE = "non-finite"
COUNT_MISMATCH = "count-mismatch"
SHAPE_MISMATCH = "shape-mismatch"
DTYPE_MISMATCH = "dtype-mismatch"
NOT_FLOAT = "not-float"
NOT_AN_ARRAY = "not-an-array"


class InvalidUpdateError(DataError):
    """An update (or parameter list) is unusable; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _label(what: str, index: int, names: Sequence[str] | None) -> str:
    if names is not None and index < len(names):
        return f"{what} array {index} ('{names[index]}')"
    return f"{what} array {index}"


def check_float_arrays(
    arrays: Sequence[object], *, what: str = "update", names: Sequence[str] | None = None
) -> None:
    """Raise unless every element is a NumPy array with a floating dtype."""
    for i, arr in enumerate(arrays):
        if not isinstance(arr, np.ndarray):
            raise InvalidUpdateError(
                NOT_AN_ARRAY, f"{_label(what, i, names)} is a {type(arr).__name__}, not an ndarray"
            )
        if not np.issubdtype(arr.dtype, np.floating):
            raise InvalidUpdateError(
                NOT_FLOAT, f"{_label(what, i, names)} has dtype {arr.dtype}, expected a float dtype"
            )


def check_structure(
    arrays: Sequence[npt.NDArray[np.generic]],
    reference: Sequence[npt.NDArray[np.generic]],
    *,
    what: str = "update",
    names: Sequence[str] | None = None,
    check_dtype: bool = True,
) -> None:
    """Raise unless ``arrays`` matches ``reference`` in count, shapes and dtypes."""
    if len(arrays) != len(reference):
        raise InvalidUpdateError(
            COUNT_MISMATCH, f"{what} has {len(arrays)} arrays, expected {len(reference)}"
        )
    check_float_arrays(arrays, what=what, names=names)
    for i, (arr, ref) in enumerate(zip(arrays, reference, strict=True)):
        if arr.shape != ref.shape:
            raise InvalidUpdateError(
                SHAPE_MISMATCH,
                f"{_label(what, i, names)} has shape {arr.shape}, expected {ref.shape}",
            )
        if check_dtype and arr.dtype != ref.dtype:
            raise InvalidUpdateError(
                DTYPE_MISMATCH,
                f"{_label(what, i, names)} has dtype {arr.dtype}, expected {ref.dtype}",
            )


def check_finite(
    arrays: Sequence[npt.NDArray[np.floating]],
    *,
    what: str = "update",
    names: Sequence[str] | None = None,
) -> None:
    """Raise if any array contains NaN or +/-inf."""
    for i, arr in enumerate(arrays):
        if not np.all(np.isfinite(arr)):
            n_nan = int(np.count_nonzero(np.isnan(arr)))
            n_inf = int(np.count_nonzero(np.isinf(arr)))
            raise InvalidUpdateError(
                NON_FINITE,
                f"{_label(what, i, names)} contains {n_nan} NaN and {n_inf} inf values",
            )


def validate_update(
    arrays: Sequence[npt.NDArray[np.floating]],
    reference: Sequence[npt.NDArray[np.floating]],
    *,
    what: str = "update",
    names: Sequence[str] | None = None,
    check_dtype: bool = True,
) -> None:
    """All checks: same count/shapes/dtypes as ``reference``, float, and finite."""
    check_structure(arrays, reference, what=what, names=names, check_dtype=check_dtype)
    check_finite(arrays, what=what, names=names)


def find_problem(
    arrays: Sequence[npt.NDArray[np.floating]],
    reference: Sequence[npt.NDArray[np.floating]],
    *,
    what: str = "update",
    check_dtype: bool = True,
) -> InvalidUpdateError | None:
    """Non-raising :func:`validate_update`: the first problem found, or ``None``."""
    try:
        validate_update(arrays, reference, what=what, check_dtype=check_dtype)
    except InvalidUpdateError as exc:
        return exc
    return None


def l2_norm(arrays: Sequence[npt.NDArray[np.floating]]) -> float:
    """Global L2 norm over all arrays (as if flattened and concatenated), in float64.

    Finite float64 values whose squares overflow (above about 1e154) are rescaled by the
    largest magnitude first: their norm is finite, and read as inf it made
    :func:`clip_update_l2` scale the update to zero instead of onto the bound."""
    total = 0.0
    with np.errstate(over="ignore"):
        for arr in arrays:
            total += float(np.sum(np.square(arr, dtype=np.float64)))
    if math.isinf(total):
        peak = max((float(np.max(np.abs(arr))) for arr in arrays if arr.size), default=0.0)
        if 0 < peak < math.inf:  # an inf entry's norm is inf
            total = sum(float(np.sum(np.square(arr / peak, dtype=np.float64))) for arr in arrays)
            return peak * math.sqrt(total)
    return math.sqrt(total)


def _scaled(
    arrays: Sequence[npt.NDArray[np.floating]], scale: float
) -> list[npt.NDArray[np.floating]]:
    """``arrays`` times ``scale``, computed in float64 and stored in each array's dtype
    (a float32 times a float32 ``scale`` below about 1e-38 was 0: the update was zeroed)."""
    return [(arr.astype(np.float64) * scale).astype(arr.dtype) for arr in arrays]


def _epsilon(dtype: np.dtype[np.generic]) -> float:
    """The relative rounding step of ``dtype`` (float64's for a non-float dtype, which
    rounds toward zero and so never above the bound)."""
    if np.issubdtype(dtype, np.floating):
        return float(np.finfo(dtype).eps)  # type: ignore[type-var]
    return float(np.finfo(np.float64).eps)


def clip_update_l2(
    arrays: Sequence[npt.NDArray[np.floating]], max_norm: float
) -> tuple[list[npt.NDArray[np.floating]], float]:
    """Scale the update down so its global L2 norm is at most ``max_norm``.

    Returns ``(clipped arrays, norm before clipping)``. Dtypes are preserved and the
    direction is unchanged; updates already within the bound are returned as copies.
    The bound holds for the arrays returned, after rounding to their dtype: a clipped
    float32 update came out up to about 1e-7 above it, and the bound is what a client's
    influence (the user-level DP sensitivity) is argued from.
    Raises :class:`InvalidUpdateError` for non-finite updates (they cannot be clipped)
    and ``ValueError`` for a non-positive ``max_norm``.
    """
    if not max_norm > 0 or not math.isfinite(max_norm):
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm}")
    check_finite(arrays)
    norm = l2_norm(arrays)
    if norm <= max_norm:
        return [np.array(arr, copy=True) for arr in arrays], norm
    scale = max_norm / norm
    clipped = _scaled(arrays, scale)
    # rounding to the dtype can leave the result a few ulps above the bound: shrink by
    # the coarsest dtype's epsilon until it is not (once, in practice)
    shrink = 1.0 - max(_epsilon(arr.dtype) for arr in arrays)
    while l2_norm(clipped) > max_norm:
        scale *= shrink
        clipped = _scaled(arrays, scale)
    return clipped, norm


def median_clip_bound(norms: Sequence[float], multiple: float) -> float:
    """The data-adaptive L2 bound of one round's updates: ``multiple`` times the lower
    median of their ``norms`` (norm bounding, Sun et al. 2019, "Can you really backdoor
    federated learning?", with the bound taken from the round itself).

    The *lower* median (the middle norm; of an even count the smaller of the two middle
    ones) so that fewer than half of the updates never move it past an honest norm: of two
    updates, the larger is bounded by the smaller's multiple (their mean would grow with
    the larger and bound nothing). Of one update it is that update's own norm, which a
    ``multiple`` >= 1 never clips: a lone update has nothing to be compared with.
    Raises ``ValueError`` for no norms."""
    if not norms:
        raise ValueError("a median clip bound needs at least one update norm")
    ordered = sorted(norms)
    return multiple * ordered[(len(ordered) - 1) // 2]
