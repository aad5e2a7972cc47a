"""The few-shot tuning benchmark's report from its pooled ranks (the runs and the adapted
students replaced by hand-made ranks)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

from shared.eval.protocol import CaseRanks


def _ranks(*values: float) -> CaseRanks:
    ranks = np.array(values, dtype=np.float64)
    return CaseRanks(ranks, ranks, np.arange(len(ranks), dtype=np.int64))


def _fake_runs(
    bench: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    dataset: str,
    groups: Callable[[list[str]], dict[str, dict[str, CaseRanks]]],
) -> None:
    """Finished runs of ``dataset`` whose every case set ranks as ``groups(labels)`` says."""
    config = SimpleNamespace(adapt_steps=10, adapt_lr=0.001, dataset=dataset)
    monkeypatch.setattr(
        bench,
        "load_finished_run",
        lambda root, data_dir: SimpleNamespace(config=config, server_round=3),
    )

    def rank_run(run: Any, settings: Any, shots: Any) -> dict[str, Any]:
        labels = ["ease fold-in", *(bench._label(s) for s in settings)]
        return {name: groups(labels) for name in bench.CASES}

    monkeypatch.setattr(bench, "_rank_run", rank_run)


def test_a_k_that_no_cold_user_reaches_is_left_out_of_the_paired_differences(
    load_bench: Callable[[str], ModuleType],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """Cold users with no more than K interactions give K no case: the benchmark compared
    that K anyway and ended, after ranking every setting, with 'no paired cases to compare'."""
    bench = load_bench("fewshot_tuning")
    _fake_runs(
        bench,
        monkeypatch,
        "synthetic",
        lambda labels: {
            "k=3": {m: _ranks(0.0, 20.0, 5.0) for m in labels},
            "k=50": {m: _ranks() for m in labels},
        },
    )
    monkeypatch.setattr(sys, "argv", ["fewshot_tuning.py", str(tmp_path), "--shots", "3", "50"])
    bench.main()
    out = json.loads(capsys.readouterr().out)
    for against in out["cold_paired_hr@10"].values():
        assert set(against) == {"k=3"}
        assert against["k=3"]["sampled_hr@10"]["mean"] == 0.0
    assert out["metrics"]["cold"]["ease fold-in"]["k=50"]["users"] == 0  # still listed


@pytest.mark.parametrize(("dataset", "users"), [("synthetic", 6), ("ml-100k", 3)])
def test_runs_of_synthetic_worlds_keep_their_users_apart(
    load_bench: Callable[[str], ModuleType],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    dataset: str,
    users: int,
) -> None:
    """Runs of the synthetic dataset on two seeds are two worlds, each numbering its users
    from 0: pooled under their own numbers, user 0 of both was resampled as one user."""
    bench = load_bench("fewshot_tuning")
    _fake_runs(
        bench,
        monkeypatch,
        dataset,
        lambda labels: {"k=3": {m: _ranks(0.0, 20.0, 5.0) for m in labels}},
    )
    runs = [str(tmp_path / "seed1"), str(tmp_path / "seed2")]
    monkeypatch.setattr(sys, "argv", ["fewshot_tuning.py", *runs, "--shots", "3"])
    bench.main()
    out = json.loads(capsys.readouterr().out)
    for against in out["cold_paired_hr@10"].values():
        assert against["k=3"]["full_hr@10"]["users"] == users
        assert against["k=3"]["full_hr@10"]["cases"] == 6
