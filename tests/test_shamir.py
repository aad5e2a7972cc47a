"""Shamir secret sharing in Flower's SecAgg+ layout (server/shamir.py) and its use by the
SecAgg+ workflow and client mod."""

from __future__ import annotations

import contextlib
import importlib
import os
import random

import numpy as np
import pytest
from Crypto.Protocol.SecretSharing import Shamir
from flwr.common.secure_aggregation import secaggplus_utils as flwr_utils
from flwr.common.secure_aggregation.crypto import shamir as flwr_shamir
from flwr.server.workflow.secure_aggregation import secaggplus_workflow as flwr_workflow
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    generate_key_pairs,
    private_key_to_bytes,
)

from client.client_app import make_client_app
from server import shamir
from server.npy import load_npy
from server.secagg import full_seed_masks, parsed_private_key, use_fast_secagg_helpers
from server.server_app import make_server_app, run_in_process

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


def _fold_collision(seed: bytes) -> bytes:
    """Another seed of the same length whose 4-byte words XOR to the same 32-bit value:
    Flower's ``pseudo_rand_gen`` seeds its generator with that XOR, so both give one mask."""
    flip = bytes([0x5A, 0xC3, 0x11, 0x80])
    return bytes(b ^ flip[i % 4] if i < 8 else b for i, b in enumerate(seed))


def test_masks_depend_on_the_whole_seed_not_a_32_bit_fold() -> None:
    seed = os.urandom(32)
    other = _fold_collision(seed)
    assert flwr_utils.pseudo_rand_gen(seed, 2**32, [(8,)])[0].tolist() == (
        flwr_utils.pseudo_rand_gen(other, 2**32, [(8,)])[0].tolist()
    )  # Flower's: 2**32 masks in all, which a curious server can enumerate
    dims = [(3, 4), (), (5,)]
    masks = full_seed_masks(seed, 2**32, dims)
    assert [m.shape for m in masks] == dims
    assert all(m.dtype == np.int64 and m.min() >= 0 and m.max() < 2**32 for m in masks)
    assert [m.tolist() for m in masks] == [m.tolist() for m in full_seed_masks(seed, 2**32, dims)]
    assert masks[0].tolist() != full_seed_masks(other, 2**32, dims)[0].tolist()
    small = full_seed_masks(seed, 2**8, [(1000,)])[0]
    assert small.min() >= 0 and small.max() < 2**8 and len(set(small.tolist())) > 200


def test_a_secagg_round_masks_with_no_32_bit_seeded_generator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flower 1.42's masks come from ``RandomState(seed32)``: every mask of a round is one
    of 2**32, so an honest-but-curious server can strip a client's pairwise masks offline
    and read its update. The round's masks (client and server side) use the whole seed."""
    seeded: list[object] = []

    class Recording(np.random.RandomState):
        def __init__(self, seed: object = None) -> None:
            if seed is not None:
                seeded.append(seed)
            super().__init__(seed)  # type: ignore[arg-type]

    monkeypatch.setattr(np.random, "RandomState", Recording)
    reports: list[object] = []
    config = {"num-rounds": 1, "secagg": True, "eval-fraction": 0.0}
    run_in_process(
        make_server_app(config, on_round_end=reports.append),
        make_client_app(),
        4,
        run_config=config,
    )
    assert len(reports) == 1 and reports[0].fit.updated  # type: ignore[attr-defined]
    assert seeded == []
