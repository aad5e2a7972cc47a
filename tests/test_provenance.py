"""What every benchmark result records about how it was made, and the benchmarks' one-line
errors (``simulation.provenance``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.errors import ConfigError
from simulation.provenance import provenance, run_bench

REPO = Path(__file__).resolve().parents[1]


def test_a_result_records_its_command_code_and_libraries() -> None:
    record = provenance("bench/x.py", ["--run-config", "noise-multiplier=3 lr=1", "--out", "a b"])
    assert record["command"] == (
        "python bench/x.py --run-config 'noise-multiplier=3 lr=1' --out 'a b'"
    )  # quoted: it can be pasted back into a shell
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if head.returncode == 0:  # a git checkout (CI clones one)
        commit = record["code"]["commit"]
        assert re.fullmatch(r"[0-9a-f]{40}", commit)
        # HEAD when this process started: the checkout's HEAD or an ancestor of it
        ancestor = ["git", "-C", str(REPO), "merge-base", "--is-ancestor", commit, "HEAD"]
        assert subprocess.run(ancestor).returncode == 0
        assert isinstance(record["code"]["dirty"], bool)
    import torch

    assert torch.__version__.startswith(record["libraries"]["torch"].split("+")[0])
    assert record["libraries"]["flwr"] and record["host"]["cpus"] >= 1


def test_a_benchmark_refusing_its_input_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def refused() -> int:
        raise ConfigError("--cohort must be >= 2, got 1")

    assert run_bench(refused) == 2
    err = capsys.readouterr().err
    assert err == "error: --cohort must be >= 2, got 1\n"
    assert run_bench(lambda: None) == 0 and run_bench(lambda: 3) == 3


def test_a_benchmark_script_with_a_missing_data_folder_fails_in_one_line(tmp_path: Path) -> None:
    script = REPO / "bench" / "sampled_metric_spread.py"
    done = subprocess.run(
        [sys.executable, str(script), "--data-dir", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert re.fullmatch(r"error: .*missing.*\n", done.stderr, flags=re.S), done.stderr
    assert "Traceback" not in done.stderr


def test_the_code_version_is_the_one_the_benchmark_started_with(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import simulation.provenance as prov

    started = prov.provenance("bench/x.py", [])["code"]
    monkeypatch.setattr(prov, "code_version", lambda: {"commit": "later", "dirty": False})
    assert prov.provenance("bench/x.py", [])["code"] == started  # a commit made meanwhile


def test_a_count_below_one_is_refused_naming_its_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    from simulation.provenance import require_counts

    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--per-user", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    require_counts(parser, parser.parse_args([]), "per_user", "rounds")  # both fine
    with pytest.raises(SystemExit) as stopped:
        require_counts(parser, parser.parse_args(["--per-user", "0"]), "per_user", "rounds")
    assert stopped.value.code == 2
    assert "bench: error: --per-user must be >= 1, got 0" in capsys.readouterr().err


def test_seeds_that_repeat_or_no_split_can_take_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    from simulation.provenance import require_seeds

    parser = argparse.ArgumentParser(prog="bench")
    require_seeds(parser, [42, 1, 0])  # fine
    for seeds, message in (
        ([42, 1, 42], "--seeds must be distinct, got [42, 1, 42]"),
        ([42, -1], "--seeds: seed must be an integer in [0, 2**63 - 1], got -1"),
        ([2**63], "--seeds: seed must be an integer in [0, 2**63 - 1], got 9223372036854775808"),
    ):
        with pytest.raises(SystemExit) as stopped:
            require_seeds(parser, seeds)
        assert stopped.value.code == 2
        assert f"bench: error: {message}" in capsys.readouterr().err
