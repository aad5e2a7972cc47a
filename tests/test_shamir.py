"""Shamir secret sharing in Flower's SecAgg+ layout (server/shamir.py) and its use by the
SecAgg+ workflow and client mod."""

from __future__ import annotations

import contextlib
import importlib
import random

import pytest
from Crypto.Protocol.SecretSharing import Shamir
from flwr.common.secure_aggregation.crypto import shamir as flwr_shamir
from flwr.server.workflow.secure_aggregation import secaggplus_workflow as flwr_workflow
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    generate_key_pairs,
    private_key_to_bytes,
)

from server import shamir
from server.npy import load_npy
from server.secagg import parsed_private_key, use_fast_secagg_helpers

flwr_client_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")


@pytest.mark.parametrize("seed", range(6))
def test_shares_interchange_with_flowers_and_any_threshold_subset_recovers(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        secret = rng.randbytes(rng.choice([1, 15, 16, 32, 241]))  # seeds and PEM keys
        threshold = rng.randint(2, 5)
        num = rng.randint(threshold, 8)
        ours = shamir.create_shares(secret, threshold, num)
        theirs = flwr_shamir.create_shares(secret, threshold, num)
        assert [len(s) for s in ours] == [len(s) for s in theirs]
        assert [s[:4] for s in ours] == [s[:4] for s in theirs]
        for shares in (ours, theirs):
            subset = rng.sample(shares, rng.randint(threshold, num))
            assert shamir.combine_shares(subset) == secret
            assert flwr_shamir.combine_shares(subset) == secret


def test_each_chunk_matches_pycryptodome_combine() -> None:
    rng = random.Random(7)
    for indices in [(1, 2), (2, 5, 3), (1, 2, 3, 4, 5), (7, 1, 4)]:
        chunks = [rng.randbytes(16) for _ in indices]
        expected = Shamir.combine(list(zip(indices, chunks, strict=True)), ssss=False)
        # a lone chunk carries no padding: compare before unpadding
        weights = shamir._lagrange_weights_at_zero(indices)
        tables = [shamir._times_table(w) for w in weights]
        value = 0
        for chunk, table in zip(chunks, tables, strict=True):
            for position in range(16):
                value ^= table[position][chunk[15 - position]]
        assert value.to_bytes(16, "big") == expected


def test_combine_refuses_malformed_share_lists() -> None:
    shares = shamir.create_shares(b"k" * 32, 2, 3)
    with pytest.raises(ValueError, match="no shares"):
        shamir.combine_shares([])
    with pytest.raises(ValueError, match="lengths"):
        shamir.combine_shares([shares[0], shares[1][:-16]])
    with pytest.raises(ValueError, match="lengths"):
        shamir.combine_shares([shares[0][:10], shares[1][:10]])
    with pytest.raises(ValueError, match="repeated or zero"):
        shamir.combine_shares([shares[0], shares[0]])
    with pytest.raises(ValueError, match="repeated or zero"):
        shamir.combine_shares([b"\0\0\0\0" + shares[0][4:], shares[1]])
    other = shamir.create_shares(b"z" * 32, 2, 3)
    mixed = [shares[0], other[1]]
    with contextlib.suppress(ValueError):  # usually: the mix is not a padded secret
        assert shamir.combine_shares(mixed) not in (b"k" * 32, b"z" * 32)


def test_split_refuses_a_threshold_outside_one_to_num_and_one_share_can_suffice() -> None:
    for threshold, num in ((0, 3), (4, 3), (-1, 2)):
        with pytest.raises(ValueError, match="threshold"):
            shamir.create_shares(b"secret", threshold, num)
    shares = shamir.create_shares(b"secret", 1, 3)
    assert all(shamir.combine_shares([share]) == b"secret" for share in shares)


def test_flower_secagg_modules_use_the_fast_helpers() -> None:
    use_fast_secagg_helpers()
    use_fast_secagg_helpers()  # idempotent
    assert flwr_workflow.combine_shares is shamir.combine_shares
    assert flwr_workflow.bytes_to_ndarray is load_npy
    assert flwr_client_mod.create_shares is shamir.create_shares
    assert flwr_client_mod.bytes_to_private_key is parsed_private_key
    assert flwr_shamir.combine_shares is not shamir.combine_shares  # Flower's own is kept


def test_a_parsed_key_is_flowers_parse_remembered() -> None:
    private, _ = generate_key_pairs()
    pem = private_key_to_bytes(private)
    parsed = parsed_private_key(pem)
    assert parsed is parsed_private_key(pem)  # parsed once
    assert parsed.private_numbers() == bytes_to_private_key(pem).private_numbers()
