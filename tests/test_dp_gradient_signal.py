"""The DP gradient-signal benchmark's measurements: per-example gradients that add up to the
batch gradient, and a per-tensor report checked on a hand-computed case."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import numpy as np
import pytest
import torch

from shared.federated.local_training import next_item_examples
from shared.models.sequence import next_item_cross_entropy
from shared.models.student import StudentConfig, StudentModel


@pytest.fixture(scope="module")
def bench(load_bench: Callable[[str], ModuleType]) -> ModuleType:
    return load_bench("dp_gradient_signal")


def test_the_report_on_a_hand_computed_case(bench: ModuleType) -> None:
    # three examples; tensor a has 2 scalars, b has 1; norms 5, 1, 2; clip 2.5 halves the first
    grads = {
        "a": torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 2.0]]),
        "b": torch.tensor([[4.0], [1.0], [0.0]]),
    }
    report = bench.signal_report(
        grads, max_grad_norm=2.5, noise_multiplier=2.0, examples_per_round=10.0
    )
    assert report["examples"] == 3
    assert report["clipped_fraction"] == pytest.approx(1 / 3, abs=1e-4)
    # clipped mean: a = (0.5, 2/3), b = 1; the noise's std is 2 * 2.5 = 5
    assert report["round_signal_norm"] == pytest.approx(10 * math.sqrt(0.25 + 4 / 9 + 1), abs=0.1)
    assert report["round_noise_norm"] == pytest.approx(5 * math.sqrt(3), abs=0.1)
    a, b = report["tensors"]["a"], report["tensors"]["b"]
    assert a["round_snr"] == pytest.approx(10 * math.sqrt(0.25 + 4 / 9) / (5 * math.sqrt(2)), 1e-3)
    assert b["round_snr"] == pytest.approx(10 * 1 / 5, 1e-3)
    assert a["norm_share"] == pytest.approx((9 / 25 + 0 + 1) / 3, abs=1e-4)
    assert b["norm_share"] == pytest.approx((16 / 25 + 1 + 0) / 3, abs=1e-4)
    assert (a["norm_median"], b["norm_median"]) == (2.0, 1.0)
    assert (a["scalars"], b["scalars"]) == (2, 1)


def test_per_example_gradients_add_up_to_the_batch_gradient(bench: ModuleType) -> None:
    rng = np.random.default_rng(0)
    config = StudentConfig(dim=8, text_dim=4, id_dim=4, max_len=5, adapter_rank=2)
    model = StudentModel(
        rng.normal(size=(12, 4)).astype(np.float32),
        rng.normal(size=(12, 4)).astype(np.float32),
        config,
    )
    model.set_trainable(["global"])
    items, mask, targets = next_item_examples(np.array([0, 3, 5, 7, 2, 9, 11]), 5, pad_to=5)

    grads = bench.per_example_gradients(model, (items, mask, targets), batch_size=4)

    model.eval()  # the batch gradient of the summed loss, without dropout
    model.zero_grad(set_to_none=True)
    loss = next_item_cross_entropy(model(items, mask), items, mask, targets) * len(targets)
    loss.backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == set(trained)
    for name, param in trained.items():
        assert param.grad is not None
        assert grads[name].shape == (len(targets), param.numel())
        summed = grads[name].sum(dim=0).reshape(param.shape)
        torch.testing.assert_close(summed, param.grad, rtol=1e-4, atol=1e-5)
    # not all alike: each example has its own gradient
    assert not torch.allclose(grads["head_id.weight"][0], grads["head_id.weight"][1])
