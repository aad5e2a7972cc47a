"""The centralized-reference benchmark's reading of federation runs: each run's int8 and
personal-adapter ranks, labelled by the run's variant and keyed by its split seed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from shared.errors import DataError
from shared.eval.protocol import CaseRanks
from simulation.pipeline import _save_ranks


@pytest.fixture(scope="module")
def bench(load_bench: Callable[[str], ModuleType]) -> ModuleType:
    return load_bench("centralized_reference")


def _run(root: Path, variant: str, seed: int, first_rank: float, stamp: str = "") -> Path:
    """A finished federation run directory as the federation benchmark names it (``stamp``:
    the time an earlier version appended)."""
    path = root / f"ml-100k-{variant}-seed{seed}{stamp}"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"simulation": {"seed": seed}}))
    ranks, users = np.array([first_rank, 50.0, np.inf]), np.arange(3)
    _save_ranks(
        path / "ranks.npz",
        {
            "federated/student int8 onnx": CaseRanks(ranks, ranks, users),
            "federated/student (federated + personal)": CaseRanks(ranks + 1, ranks + 1, users),
            "federated/teacher": CaseRanks(ranks * 0, ranks * 0, users),
        },
    )
    return path


def test_runs_are_read_by_split_seed_and_labelled_by_variant(
    bench: ModuleType, tmp_path: Path
) -> None:
    paths = [  # the benchmark's names now and before (a time appended), read alike
        _run(tmp_path, variant, seed, rank, "-20261129-155549" if seed == 1 else "")
        for variant, rank in (("no-dp-fedadam", 3.0), ("record-dp-split", 7.0))
        for seed in (42, 1)
    ]
    runs = bench.federation_runs(paths)
    assert sorted(runs) == [1, 42]
    assert sorted(runs[42]) == [
        "ml-100k-no-dp-fedadam: int8",
        "ml-100k-no-dp-fedadam: personal",
        "ml-100k-record-dp-split: int8",
        "ml-100k-record-dp-split: personal",
    ]
    np.testing.assert_array_equal(runs[1]["ml-100k-record-dp-split: int8"].full, [7, 50, np.inf])
    np.testing.assert_array_equal(runs[1]["ml-100k-no-dp-fedadam: personal"].sampled[0], 4)


def test_runs_that_cannot_be_paired_are_refused(bench: ModuleType, tmp_path: Path) -> None:
    twice = [_run(tmp_path / "a", "record-dp-split", 42, 1.0)]
    twice.append(_run(tmp_path / "b", "record-dp-split", 42, 2.0))
    with pytest.raises(DataError, match="two runs of variant 'ml-100k-record-dp-split'"):
        bench.federation_runs(twice)
    uneven = [_run(tmp_path / "c", "no-dp-fedadam", 42, 1.0)]
    uneven.append(_run(tmp_path / "c", "record-dp-split", 1, 1.0))
    with pytest.raises(DataError, match="cover different split seeds"):
        bench.federation_runs(uneven)


@pytest.mark.parametrize(("dataset", "users"), [("synthetic", 6), ("ml-100k", 3)])
def test_pooled_synthetic_splits_keep_each_worlds_users_apart(
    bench: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    dataset: str,
    users: int,
) -> None:
    """Each seed of the synthetic dataset is a world of its own, numbering its users from 0:
    pooled under their own numbers, user 0 of two worlds was resampled as one user."""
    import sys

    paths = [_run(tmp_path, "record-dp-split", seed, 7.0) for seed in (42, 1)]
    ranks = np.array([0.0, 50.0, np.inf])

    def central(*args: object) -> tuple[dict[str, CaseRanks], dict[str, object]]:
        r = CaseRanks(ranks, ranks, np.arange(3))
        return {bench.CENTRAL: r, bench.EASE_ALL: r}, {}

    monkeypatch.setattr(bench, "central_ranks", central)
    monkeypatch.setattr(bench.torch, "set_num_threads", lambda n: None)
    argv = ["centralized_reference.py", "--dataset", dataset, "--seeds", "42", "1", "--runs"]
    monkeypatch.setattr(sys, "argv", [*argv, *map(str, paths)])
    bench.main()
    out = json.loads(capsys.readouterr().out)
    paired = out["pooled_over_paired_splits"]["paired_differences_hr@10"]["federated"]
    for row in paired.values():
        assert (row["full_hr@10"]["users"], row["full_hr@10"]["cases"]) == (users, 6)
