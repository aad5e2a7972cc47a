"""Shamir secret sharing in Flower's SecAgg+ byte layout, with fast reconstruction.

SecAgg+ shares two secrets per client (its mask seed and its key), and in the unmask
stage the server reconstructs one secret per participant: 50 per round at cohort 50.
Flower 1.42 combines with PyCryptodome's ``Shamir.combine``, which inverts field elements
and multiplies 128-bit polynomials bit by bit in Python: about 3 ms per secret, plus a
thread pool started per call. This module computes the same values faster, by the
structure of the problem:

* the secret is the polynomial at 0, ``sum_j y_j * l_j`` with Lagrange weights ``l_j``
  that depend only on the share *indices*, which are the same for most secrets of a
  round (all neighbours alive): they are computed once per index set and cached;
* multiplying by a fixed weight is linear over GF(2), so it is a lookup per byte of
  ``y_j`` in a table built once per weight.

The field and encodings are PyCryptodome's (GF(2^128) modulo x^128 + x^7 + x^2 + x + 1,
a 16-byte big-endian element per 16-byte chunk) and the share layout Flower's (4-byte
little-endian index, then the chunk shares of the PKCS#7-padded secret), so shares move
freely between these functions and Flower's or PyCryptodome's own; the tests check it.
Splitting evaluates the polynomials at the small indices directly: a product by an
index of a few bits is a few shifts, where PyCryptodome's generic product takes 128 steps.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

from Crypto.Util.Padding import pad, unpad

__all__ = ["combine_shares", "create_shares"]

#: Bytes of one Shamir chunk (PyCryptodome shares 16-byte secrets) and of a share's index.
CHUNK = 16
INDEX = 4
_BITS = 8 * CHUNK
#: x^128 + x^7 + x^2 + x + 1, PyCryptodome's modulus (bit i = coefficient of x^i).
_MODULUS = (1 << _BITS) | 0x87
_ByteTables = tuple[tuple[int, ...], ...]


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Split ``secret`` into ``num`` shares, any ``threshold`` of which recover it.

    Per 16-byte chunk, a polynomial of degree ``threshold - 1`` with the chunk as its
    constant term and uniformly random other coefficients (``os.urandom``), evaluated
    at the indices 1 to ``num``: PyCryptodome's ``Shamir.split`` without ``ssss``.
    """
    if not 1 <= threshold <= num < 1 << (8 * INDEX):
        raise ValueError(f"need 1 <= threshold <= num shares, got {threshold} and {num}")
    padded = pad(secret, CHUNK)
    shares = [bytearray(index.to_bytes(INDEX, "little")) for index in range(1, num + 1)]
    for start in range(0, len(padded), CHUNK):
        constant = int.from_bytes(padded[start : start + CHUNK], "big")
        randoms = [int.from_bytes(os.urandom(CHUNK), "big") for _ in range(threshold - 1)]
        for index, share in enumerate(shares, start=1):
            value = 0
            for coefficient in randoms:  # Horner, highest degree first
                value = _multiply(value, index) ^ coefficient
            share += (_multiply(value, index) ^ constant).to_bytes(CHUNK, "big")
    return [bytes(share) for share in shares]


def combine_shares(share_list: Sequence[bytes]) -> bytes:
    """Recover the secret from at least ``threshold`` shares made by :func:`create_shares`.

    Raises ``ValueError`` for no shares, shares of different lengths, a repeated index,
    or shares that do not decode to a padded secret (too few, or of different secrets).
    """
    if not share_list:
        raise ValueError("Failed to combine shares: no shares given")
    length = len(share_list[0])
    if (
        length < INDEX + CHUNK
        or (length - INDEX) % CHUNK
        or any(len(share) != length for share in share_list)
    ):
        raise ValueError("Failed to combine shares: shares of different or invalid lengths")
    # sorted, so that the weights of an index set are computed once whatever the order
    ordered = sorted(share_list, key=lambda share: int.from_bytes(share[:INDEX], "little"))
    indices = tuple(int.from_bytes(share[:INDEX], "little") for share in ordered)
    if len(set(indices)) != len(indices) or 0 in indices:
        raise ValueError(f"Failed to combine shares: repeated or zero share index in {indices}")
    tables = [_times_table(weight) for weight in _lagrange_weights_at_zero(indices)]
    padded = bytearray()
    for start in range(INDEX, length, CHUNK):
        value = 0
        for share, table in zip(ordered, tables, strict=True):
            chunk = share[start : start + CHUNK]
            for position in range(CHUNK):
                value ^= table[position][chunk[CHUNK - 1 - position]]
        padded += value.to_bytes(CHUNK, "big")
    try:
        return unpad(bytes(padded), CHUNK)
    except ValueError:
        raise ValueError("Failed to combine shares") from None


def _times_x(value: int) -> int:
    value <<= 1
    return value ^ _MODULUS if value >> _BITS else value


def _multiply(a: int, b: int) -> int:
    """``a * b`` in the field; the steps grow with the bit length of ``b``."""
    product = 0
    while b:
        if b & 1:
            product ^= a
        a = _times_x(a)
        b >>= 1
    return product


def _inverse(a: int) -> int:
    """``a^(2^128 - 2)``, the inverse of a non-zero element (Fermat)."""
    result, power, exponent = 1, a, (1 << _BITS) - 2
    while exponent:
        if exponent & 1:
            result = _multiply(result, power)
        power = _multiply(power, power)
        exponent >>= 1
    return result


@lru_cache(maxsize=64)
def _lagrange_weights_at_zero(indices: tuple[int, ...]) -> tuple[int, ...]:
    """``l_j = prod_{m != j} x_m / (x_j - x_m)`` (subtraction is XOR in GF(2^k))."""
    weights = []
    for j, x_j in enumerate(indices):
        numerator, denominator = 1, 1
        for m, x_m in enumerate(indices):
            if m != j:
                numerator = _multiply(numerator, x_m)
                denominator = _multiply(denominator, x_j ^ x_m)
        weights.append(_multiply(numerator, _inverse(denominator)))
    return tuple(weights)


@lru_cache(maxsize=64)
def _times_table(factor: int) -> _ByteTables:
    """``table[p][b] = factor * (b * x^(8p))``: one lookup per byte of the other operand."""
    powers = [factor]
    for _ in range(_BITS - 1):
        powers.append(_times_x(powers[-1]))
    tables = []
    for position in range(CHUNK):
        row = [0] * 256
        for byte in range(1, 256):
            low = byte & -byte
            row[byte] = row[byte ^ low] ^ powers[8 * position + low.bit_length() - 1]
        tables.append(tuple(row))
    return tuple(tables)
