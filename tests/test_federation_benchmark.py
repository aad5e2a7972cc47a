"""The federation benchmark's pooling of several protocol splits: the pooled figures are
those of every split's users side by side, computed by hand here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from shared.eval.protocol import CaseRanks


@pytest.fixture(scope="module")
def bench(load_bench: Callable[[str], ModuleType]) -> ModuleType:
    return load_bench("federation_benchmark")


def _ranks(*values: float, users: tuple[int, ...] | None = None) -> CaseRanks:
    ranks = np.array(values, dtype=np.float64)
    who = None if users is None else np.array(users, dtype=np.int64)
    return CaseRanks(sampled=ranks, full=ranks * 10, users=who)


def _split(federated: CaseRanks, adapted: CaseRanks, ease: CaseRanks, eps: float) -> dict[str, Any]:
    ranks = {
        "federated/student (federated)": federated,
        "federated/student int8 onnx": federated,
        "fewshot k=1/student (adapted)": adapted,
        "fewshot k=1/ease fold-in": ease,
    }
    summary = {"epsilon_record_max": eps, "epsilon_user": None, "client_updates_per_second": eps}
    return {"ranks": {"record-dp": ranks}, "variants": {"record-dp": summary}}


def test_pooled_figures_are_every_splits_users_side_by_side(bench: ModuleType) -> None:
    inf = np.inf
    one = _split(
        _ranks(0, 3, inf, users=(0, 1, 2)),
        _ranks(0, 0.5, users=(10, 11)),
        _ranks(inf, inf, users=(10, 11)),
        eps=5.0,
    )
    two = _split(
        _ranks(12, 1, users=(0, 3)),
        _ranks(0.2, inf, 0.4, users=(10, 12, 13)),  # user 10 is cold in both splits
        _ranks(0, inf, inf, users=(10, 12, 13)),
        eps=7.0,
    )
    pooled = bench._pooled_section([one, two])
    row = pooled["variants"]["record-dp"]
    # federated: sampled ranks 0, 3, inf, 12, 1 -> 3 hits of 5; full ranks x10 -> 0 and 10
    assert row["federated"]["users"] == 5
    assert row["federated"]["sampled_hr@10"] == pytest.approx(3 / 5, abs=1e-4)
    assert row["federated"]["full_hr@10"] == pytest.approx(1 / 5, abs=1e-4)
    assert row["int8 onnx"] == row["federated"]  # the shipped model's row, pooled too
    ndcg = (1 + 1 / np.log2(5) + 1 / np.log2(3)) / 5
    assert row["federated"]["sampled_ndcg@10"] == pytest.approx(ndcg, abs=1e-4)
    # few-shot, K = 1: adapted hits 4 of 5 (full: ranks 0, 5, 2, 4), EASE fold-in 1 of 5
    adapted = row["fewshot"]["student (adapted)"]["k=1"]
    assert adapted["sampled_hr@10"] == adapted["full_hr@10"] == pytest.approx(4 / 5)
    ease = pooled["baselines_and_pretrained"]["fewshot"]["ease fold-in"]["k=1"]
    assert ease["sampled_hr@10"] == pytest.approx(1 / 5)
    assert row["epsilon_record_max"] == 7.0  # the most any split spent
    assert row["client_updates_per_second_median"] == 6.0
    check = pooled["checks"]["record-dp"]
    assert check["epsilon <= 8"] and check["few-shot beats EASE fold-in at every K"]
    assert check["int8 sampled_hr@10 >= 0.70"] is False  # 3 / 5
    paired = check["paired differences hr@10 (95% interval over users)"]["fewshot"]["k=1"]
    # five cases of four users: the interval resamples users (user 10 with both cases)
    assert (paired["sampled_hr@10"]["users"], paired["sampled_hr@10"]["cases"]) == (4, 5)
    assert paired["sampled_hr@10"]["mean"] == pytest.approx(4 / 5 - 1 / 5)


def test_few_shot_must_beat_ease_on_full_ranking_too(bench: ModuleType) -> None:
    """The check read sampled HR only: on ml-100k's pooled splits it said 'beats at every
    K' while the student trailed EASE fold-in on full ranking at K = 3."""
    split = _split(_ranks(0), _ranks(0, 5), _ranks(2, 0.5), eps=1.0)  # full: 0, 50 vs 20, 5
    check = bench._pooled_section([split])["checks"]["record-dp"]
    assert check["few-shot beats EASE fold-in at every K"] is False
    assert check["few-shot beats EASE fold-in at every K beyond noise"] is False


def test_the_dp_cost_passes_only_when_its_interval_is_within_ten_percent(
    bench: ModuleType,
) -> None:
    """A point estimate of 4% with an interval reaching past 10% was reported as met."""
    hits = np.where(np.arange(100) < 50, 0.0, np.inf)  # no DP: 50 of 100
    dp = hits.copy()
    dp[[0, 1, 2, 3]] = np.inf  # 4 fewer: relative cost 8%
    dp[[60, 61]] = 0.0  # 2 more elsewhere: point cost 4%, the interval much wider
    users = np.arange(100)
    ranks = {
        name: {"federated/student (federated)": CaseRanks(r, r, users)}
        for name, r in (("no-dp-fedadam", hits), ("record-dp-split", dp))
    }
    variants = {
        name: {"epsilon_user": None, "epsilon_record_max": 1.0, "fewshot": {}} for name in ranks
    }
    check = bench._checks(variants, ranks)["record-dp-split"]
    assert check["relative sampled_hr@10 cost vs no-dp-fedadam"] == pytest.approx(0.04)
    assert check["dp cost <= 10% (point estimate)"] is True
    assert check["dp cost <= 10%"] is False


def test_the_relative_dp_cost_interval_is_the_ratio_over_the_paired_draws(
    bench: ModuleType,
) -> None:
    """The cost's interval divided the difference's bounds by the no-DP model's point HR,
    leaving out that HR's own spread: a DP model hitting nothing (a cost of exactly 100% on
    every draw of users) was reported a 50%..160% cost."""
    base = np.where(np.arange(100) < 10, 0.0, np.inf)  # no DP: 10 of 100
    dp = np.full(100, np.inf)  # hits nothing
    ranks = {
        name: {"federated/student (federated)": CaseRanks(r, r, np.arange(100))}
        for name, r in (("no-dp-fedadam", base), ("record-dp-split", dp))
    }
    paired = bench._paired(ranks, "record-dp-split")["global - no-dp-fedadam global"]
    for metric in ("sampled_hr@10", "full_hr@10"):
        assert paired[metric]["relative_cost"] == pytest.approx([1.0, 1.0])
        assert paired[metric]["low"] < -0.1 < paired[metric]["high"] < 0  # the difference's


def test_pooling_keeps_only_cases_every_split_has(bench: ModuleType) -> None:
    one = {"v": {"a": _ranks(1, 2), "b": _ranks(3)}}
    two = {"v": {"a": _ranks(4)}}
    pooled = bench._pool([one, two])
    assert set(pooled["v"]) == {"a"}
    np.testing.assert_array_equal(pooled["v"]["a"].sampled, [1, 2, 4])
    np.testing.assert_array_equal(pooled["v"]["a"].full, [10, 20, 40])


def test_each_variant_starts_from_a_fresh_run_directory(bench: ModuleType, tmp_path: Path) -> None:
    """An earlier benchmark's run directory would be resumed by the simulation (or refused
    under other settings), so the benchmark replaces it; nothing else is touched."""
    old = tmp_path / "runs" / "ml-100k-no-dp"
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "round-000100.npz").write_bytes(b"x")
    neighbour = tmp_path / "runs" / "mine"
    neighbour.mkdir()
    bench._fresh(old)
    bench._fresh(tmp_path / "runs" / "never-made")
    assert not old.exists() and neighbour.exists()


def test_a_variant_reports_the_public_users_too(bench: ModuleType) -> None:
    """The protocol reports every figure for the federated users and separately for the
    public ones; the benchmark kept only the federated rows of the simulation's summary."""

    def figures(hr: float) -> dict[str, float]:
        return {"users": 10.0, "sampled_hr@10": hr, "full_hr@10": hr / 4}

    final = {
        model: {"federated": figures(0.5 + i / 10), "public": figures(0.4 + i / 10)}
        for i, model in enumerate(bench._STUDENT_ROWS.values())
    }
    summary = {
        "final": final,
        "rounds": [],
        "meta": {"federation seconds": 1.0, "client updates per second": 2.0},
    }
    row = bench._variant_summary("record-dp", summary)
    assert row["federated"]["sampled_hr@10"] == 0.5
    assert row["public users"]["federated"]["sampled_hr@10"] == 0.4
    assert row["public users"]["int8 onnx"]["full_hr@10"] == pytest.approx(0.6 / 4)


def test_the_median_round_time_of_an_even_count_is_the_middle_pair_s_mean(
    bench: ModuleType,
) -> None:
    """With an even number of timed rounds (round 1, the warm-up, left out) the benchmark
    took the upper of the middle two."""
    rounds = [{"round": r, "round_seconds": s} for r, s in enumerate([9.0, 1.0, 2.0, 4.0, 8.0], 1)]
    summary = {
        "final": {},
        "rounds": rounds,
        "meta": {"federation seconds": 1.0, "client updates per second": 2.0},
    }
    assert bench._variant_summary("no-dp", summary)["seconds_per_round_median"] == 3.0


def test_the_throughput_ratio_compares_equal_work_only(
    load_bench: Callable[[str], ModuleType],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A SecAgg+ run whose rounds trained fewer clients (declines, failures) gave a ratio as
    if the work were equal; updates per second mixed a median count with a median time."""
    import json

    bench = load_bench("federation_throughput")

    def case(args: Any, runtime: str, cohort: int, secagg: bool) -> dict[str, Any]:
        partial = secagg and cohort == 50  # SecAgg+ at 50 trains 20 of 50 clients
        return {
            "runtime": runtime,
            "cohort": cohort,
            "secagg": secagg,
            "seconds_per_round": 2.0 if secagg else 1.0,
            "client_updates_per_s": 10.0 if secagg else 40.0,
            "equal_work": not partial,
        }

    monkeypatch.setattr(bench, "run_case", case)
    assert bench.main(["--cohorts", "50", "200", "--runtime", "inprocess"]) == 0
    document = json.loads(capsys.readouterr().out)
    # plain ran first at cohort 50, SecAgg+ first at 200: neither always first
    order = [(r["cohort"], r["secagg"], r["ran"]) for r in document["results"]]
    assert order == [(50, False, 1), (50, True, 2), (200, True, 1), (200, False, 2)]
    assert document["secagg_over_plain_round_time"] == {"inprocess/200": 2.0}
    assert document["pairs_not_compared_unequal_work"] == ["inprocess/50 repeat 0"]
    assert document["checks"] == {
        "client updates per second >= 10 (every case)": True,
        "secagg round <= 2.0x plain at cohort 200 (inprocess/200)": True,
    }


def test_a_few_shot_k_without_cases_is_left_out_of_the_checks(bench: ModuleType) -> None:
    """The simulation keeps a K that no cold user's history reaches (``shots=...,50``) as a
    group without cases; the benchmark compared it anyway and ended, after every variant had
    trained, with 'no paired cases to compare' (and its 'beats EASE at every K' check read
    such a K's 0 against 0 as a loss)."""
    none = CaseRanks(np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64))
    split = _split(_ranks(0), _ranks(0, 1, users=(10, 11)), _ranks(50, 50, users=(10, 11)), 1.0)
    split["ranks"]["record-dp"].update(
        {"fewshot k=50/student (adapted)": none, "fewshot k=50/ease fold-in": none}
    )
    split["variants"]["record-dp"]["fewshot"] = {}
    check = bench._checks(split["variants"], split["ranks"])["record-dp"]
    assert check["few-shot beats EASE fold-in at every K"] is True
    paired = check["paired differences hr@10 (95% interval over users)"]["fewshot"]
    assert set(paired) == {"k=1"}
    pooled = bench._pooled_section([split, split])
    assert pooled["variants"]["record-dp"]["fewshot"]["student (adapted)"]["k=50"]["users"] == 0
    assert set(
        pooled["checks"]["record-dp"]["paired differences hr@10 (95% interval over users)"][
            "fewshot"
        ]
    ) == {"k=1"}


def test_the_throughput_checks_read_the_unrounded_figures(
    load_bench: Callable[[str], ModuleType],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The checks say they test the unrounded figures, but took the ratio of round times
    rounded to 0.1 ms and the updates per second rounded to 0.01: rounds of 1.34 and 1.99 ms
    (1.49x, within the limit) read 1.3 and 2.0 ms (1.54x), and 9.996 updates/s passed '>= 10'."""
    import json
    from types import SimpleNamespace

    bench = load_bench("federation_throughput")
    fit_seconds = {False: 0.0, True: 0.0}  # per round, by SecAgg+
    seen: dict[str, Any] = {}

    def server_app(run_config: Any, reports: list[Any], call_log: Any) -> None:
        seen.update(reports=reports, secagg=run_config["secagg"])
        # plain rounds timed without the default median-norm clipping, as the results were
        assert run_config["update-clip-median-multiple"] == 0.0

    def run_in_process(server: Any, client: Any, cohort: int, **_: Any) -> None:
        fit = SimpleNamespace(ok=cohort, declined=0, failed=0, client_metrics={})
        for server_round in (1, 2, 3):
            seconds = fit_seconds[seen["secagg"]]
            seen["reports"].append(
                SimpleNamespace(server_round=server_round, fit=fit, fit_seconds=seconds)
            )

    monkeypatch.setattr(bench, "make_bench_server_app", server_app)
    monkeypatch.setattr(bench, "make_client_app", lambda run_config: None)
    monkeypatch.setattr(bench, "run_in_process", run_in_process)

    fit_seconds.update({False: 0.00134, True: 0.00199})
    assert bench.main(["--cohorts", "50", "--runtime", "inprocess"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [r["seconds_per_round"] for r in document["results"]] == [0.0013, 0.002]  # shown
    assert document["secagg_over_plain_round_time"] == {"inprocess/50": 1.4851}
    assert document["checks"]["secagg round <= 1.5x plain at cohort 50 (inprocess/50)"] is True

    fit_seconds.update({False: 50 / 9.996})
    assert bench.main(["--cohorts", "50", "--runtime", "inprocess", "--modes", "plain"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["results"][0]["client_updates_per_s"] == 10.0  # shown
    assert document["checks"]["client updates per second >= 10 (every case)"] is False


def test_pooled_synthetic_splits_resample_every_worlds_users_apart(bench: ModuleType) -> None:
    """Each split seed of the synthetic dataset is a world of its own, numbering its users
    from 0: pooled under their own numbers, user 0 of two worlds was drawn as one user, and
    the paired differences counted one world's users."""
    one = _split(_ranks(0, 3, users=(0, 1)), _ranks(0, users=(5,)), _ranks(50, users=(5,)), 1.0)
    two = _split(_ranks(50, 1, users=(0, 1)), _ranks(0, users=(5,)), _ranks(0, users=(5,)), 1.0)
    one["ranks"]["no-dp"] = two["ranks"]["no-dp"] = one["ranks"]["record-dp"]
    one["variants"]["no-dp"] = two["variants"]["no-dp"] = one["variants"]["record-dp"]
    for run in (one, two):
        run["configs"] = {name: {"dataset": "synthetic"} for name in run["ranks"]}
    checks = bench._pooled_section([one, two])["checks"]["record-dp"]
    paired = checks["paired differences hr@10 (95% interval over users)"]
    assert paired["fewshot"]["k=1"]["sampled_hr@10"]["users"] == 2
    assert paired["global - no-dp global"]["full_hr@10"]["users"] == 4
    for run in (one, two):  # a real dataset: the splits' user 0 is one person
        run["configs"] = {name: {"dataset": "ml-100k"} for name in run["ranks"]}
    checks = bench._pooled_section([one, two])["checks"]["record-dp"]
    paired = checks["paired differences hr@10 (95% interval over users)"]
    assert paired["fewshot"]["k=1"]["sampled_hr@10"]["users"] == 1


def test_the_non_private_references_run_without_the_default_median_clipping(
    bench: ModuleType,
) -> None:
    """The plain path clips each update to 5x its round's median norm by default (a defence
    against a hostile device): the benchmark's no-DP references would then bound honest but
    uneven updates, the reference DP's cost is measured against; the SecAgg+ variants are
    never clipped that way."""
    import argparse

    from simulation.config import SimulationConfig

    args = argparse.Namespace(
        dataset="synthetic", data_dir="", rounds=2, cohort=50, teacher_epochs=1,
        student_epochs=1, backend="inprocess", run_dir="runs/bench", run_config="",
        variants=list(bench.VARIANTS),
    )  # fmt: skip
    configs = bench._split_configs(args, 42, "")
    assert SimulationConfig().update_clip_median_multiple > 0
    plain = {name for name, c in configs.items() if not c.secagg}
    assert plain == set(bench.NO_DP)
    for name in plain:
        assert configs[name].update_clip_median_multiple == 0, name
