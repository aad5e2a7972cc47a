"""The public-subspace DP benchmark's two steps, on hand-computed cases: the basis from public
gradients and the clipped, noised release in the full space or the subspace."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_bench: Callable[[str], ModuleType]) -> ModuleType:
    return load_bench("subspace_dp")


def test_the_basis_spans_the_public_gradients_main_directions(bench: ModuleType) -> None:
    generator = torch.Generator().manual_seed(0)
    planted = torch.linalg.qr(torch.randn(30, 2, generator=generator)).Q.T  # 2 x 30
    # uncorrelated weights (orthogonal columns), the first direction with the larger spread
    weights = torch.linalg.qr(torch.randn(200, 2, generator=generator)).Q * torch.tensor(
        [10.0, 5.0]
    )
    grads = weights @ planted + 0.01 * torch.randn(200, 30, generator=generator)

    basis = bench.public_basis(grads, 2)

    assert basis.shape == (2, 30)
    torch.testing.assert_close(basis @ basis.T, torch.eye(2), atol=1e-5, rtol=0)
    # each planted direction lies in the basis's span: its projection keeps its unit norm
    assert torch.allclose((planted @ basis.T).norm(dim=1), torch.ones(2), atol=1e-3)
    # the first direction is the one with the larger spread
    assert abs(float(basis[0] @ planted[0])) > 0.999


def test_the_basis_of_averages_is_the_basis_of_the_averaged_rows(bench: ModuleType) -> None:
    grads = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 4.0]])
    # pairs average to (2, 0, 0) and (0, 0, 3): the larger is the third axis
    basis = bench.public_basis(grads, 1, group=2)
    assert torch.allclose(basis.abs(), torch.tensor([[0.0, 0.0, 1.0]]), atol=1e-5)
    assert torch.allclose(
        bench.public_basis(grads, 1).abs(), torch.tensor([[0.0, 0.0, 1.0]]), atol=1e-5
    )
    with pytest.raises(ValueError, match=r"k must be in 1\.\.2"):
        bench.public_basis(grads, 3, group=2)


def test_the_release_clips_in_the_space_it_noises(bench: ModuleType) -> None:
    grads = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5 and 1
    quiet = torch.Generator().manual_seed(0)

    full, stats = bench.noisy_sum(grads, None, clip=2.5, noise_multiplier=0.0, generator=quiet)
    torch.testing.assert_close(full, torch.tensor([1.5, 3.0]))  # (3, 4) halved, plus (0, 1)
    assert stats == {
        "signal_norm": pytest.approx(45**0.5 / 2),
        "noise_norm": 0.0,
        "median_example_norm": 1.0,
    }

    # on the first axis the examples are 3 and 0: the first is clipped to 2.5 there
    axis = torch.tensor([[1.0, 0.0]])
    projected, stats = bench.noisy_sum(grads, axis, clip=2.5, noise_multiplier=0.0, generator=quiet)
    torch.testing.assert_close(projected, torch.tensor([2.5, 0.0]))
    assert stats["median_example_norm"] == 0.0  # torch's median of (3, 0) is the lower one


def test_the_noise_has_std_multiplier_times_clip_on_released_coordinates_only(
    bench: ModuleType,
) -> None:
    grads = torch.zeros(1, 20_000)
    generator = torch.Generator().manual_seed(1)
    full, _ = bench.noisy_sum(grads, None, clip=2.5, noise_multiplier=2.0, generator=generator)
    assert float(full.std()) == pytest.approx(5.0, rel=0.03)

    basis = torch.eye(20_000)[:3]  # three released coordinates
    projected, stats = bench.noisy_sum(
        grads, basis, clip=2.5, noise_multiplier=2.0, generator=generator
    )
    assert int((projected != 0).sum()) == 3 and stats["noise_norm"] > 0


def test_the_captured_fraction_of_the_clipped_sum(bench: ModuleType) -> None:
    grads = torch.tensor([[6.0, 8.0], [0.0, 1.0]])  # norms 10 and 1; clip 5 halves the first
    # clipped sum (3, 5): the first axis holds 3 / sqrt(34) of it, the second 5 / sqrt(34)
    first, second = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert bench.captured_fraction(grads, first, 5.0) == pytest.approx(3 / 34**0.5)
    assert bench.captured_fraction(grads, second, 5.0) == pytest.approx(5 / 34**0.5)
    assert bench.captured_fraction(grads, torch.eye(2), 5.0) == pytest.approx(1.0)


@pytest.mark.parametrize("text", ["64", "a:5", "-1:5", "64:0", "64:nan"])
def test_a_variant_is_k_colon_clip(bench: ModuleType, text: str) -> None:
    assert bench._parse_variant("64:5") == (64, 5.0)
    with pytest.raises(argparse.ArgumentTypeError, match=r"K:CLIP|K must be"):
        bench._parse_variant(text)
