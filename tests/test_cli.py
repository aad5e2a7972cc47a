"""The fedrec CLI: help everywhere, one-line user errors, JSON output, recs.csv export."""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from typer.testing import CliRunner

from fedrec.cli import app
from shared.errors import ConfigError

runner = CliRunner()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["data"],
        ["evaluate"],
        ["evaluate", "baselines"],
        ["bandits"],
        ["bandits", "evaluate"],
        ["simulate"],
        ["client"],
        ["client", "init"],
    ],
)
def test_help_everywhere(args: list[str]) -> None:
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def _commands_with(option: str) -> list[list[str]]:
    """The command paths (``["server", "status"]``) whose command takes ``option``."""
    import click
    import typer

    found: list[list[str]] = []

    def walk(command: click.Command, path: list[str]) -> None:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])
        elif any(option in param.opts for param in command.params):
            found.append(path)

    walk(typer.main.get_command(app), [])
    return found


def test_every_report_command_takes_format_table_or_json_and_refuses_others() -> None:
    """One spelling for machine-readable output everywhere (``simulate`` and ``server status``
    took ``--json``, which stays as a hidden alias), checked before any work starts."""
    commands = _commands_with("--format")
    expected = [["simulate"], ["server", "status"], ["evaluate", "model"], ["data", "info"]]
    for path in [*expected, ["client", "status"]]:  # the last two printed JSON only
        assert path in commands
    assert sorted(_commands_with("--json")) == [["server", "status"], ["simulate"]]
    for path in commands:
        result = runner.invoke(app, [*path, "--format", "xml"])
        assert result.exit_code == 2, (path, result.output)
        assert "'xml' is not one of 'table', 'json'" in result.output, path


def test_every_report_command_prints_a_table_by_default() -> None:
    """The same default everywhere: ``table`` (``data info`` and ``client status`` printed
    JSON whatever was asked, the others a table)."""
    import click
    import typer

    root = typer.main.get_command(app)
    for path in _commands_with("--format"):
        command: click.Command = root
        for name in path:
            assert isinstance(command, click.Group)
            command = command.commands[name]
        (option,) = (p for p in command.params if "--format" in p.opts)
        assert option.default == "table", path


def test_data_info_prints_a_table_or_the_same_json_as_before() -> None:
    """``data info`` for people by default (its summary and its cleaning report's lines);
    ``--format json`` is the JSON it printed before, key for key."""
    table = runner.invoke(app, ["data", "info"])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].startswith("synthetic: 1000 users, 600 items, ")
    assert "read " in lines[1] and "no filters applied (generated data)" in table.stdout
    assert "{" not in table.stdout
    result = runner.invoke(app, ["data", "info", "--format", "json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert list(out) == ["summary", "cleaning"] and out["summary"]["users"] == 1000
    assert result.stdout == json.dumps(out, indent=2) + "\n"


def test_field_lines_show_every_field_of_a_json_object() -> None:
    """``client status``'s table: each field, nested objects and lists of named objects as
    indented blocks, ``null`` as ``-``, a field this version does not know included."""
    from fedrec.options import field_lines

    body = {
        "model_version": None,
        "rounds_joined": 2,
        "privacy": {"epsilon_spent": 0.5, "error": None},
        "processes": [{"name": "supernode", "running": True, "restarts": 0}],
        "tags": ["a", "b"],
        "new_field": "x",
    }
    assert field_lines(body) == [
        "model version: -",
        "rounds joined: 2",
        "privacy:",
        "  epsilon spent: 0.5",
        "  error:         -",
        "processes:",
        "  supernode",
        "    running:  true",
        "    restarts: 0",
        "tags:          a, b",
        "new field:     x",
    ]


def _fedrec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedrec.cli", *args], capture_output=True, text=True, check=False
    )


def test_user_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    proc = _fedrec("data", "info", "--dataset", "ml-100k", "--data-dir", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "--data-dir" in lines[0]


def test_unknown_dataset_names_the_choices() -> None:
    proc = _fedrec("data", "info", "--dataset", "ml-9m")
    assert proc.returncode == 2
    assert "synthetic" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_run_config_is_refused() -> None:
    proc = _fedrec("evaluate", "baselines", "--run-config", "nonsense=1", "--no-text")
    assert proc.returncode == 2
    assert "nonsense" in proc.stderr


@pytest.mark.parametrize(
    ("args", "meant"),
    [
        (["evaluate", "baselines", "--no-text", "--run-config", "n-negative=50"], "n-negatives"),
        (["evaluate", "model", "m.onnx", "--run-config", "cold_user_fraktion=0.1"], "cold-user"),
        (["bandits", "evaluate", "--run-config", "mmr-lamda=0.5"], "mmr-lambda"),
    ],
)
def test_a_misspelt_run_config_key_gets_the_key_meant(args: list[str], meant: str) -> None:
    """`fedrec simulate`, `server start` and a device's --config suggest the key meant;
    `evaluate` and `bandits` listed a dozen keys and left the reader to find it."""
    result = runner.invoke(app, args)
    assert isinstance(result.exception, ConfigError)
    assert f"did you mean {meant}" in str(result.exception)


def test_evaluate_baselines_json_and_export(tmp_path: Path, ml100k_dir: Path) -> None:
    out = tmp_path / "report.json"
    recs = tmp_path / "recs.csv"
    result = runner.invoke(
        app,
        [
            "evaluate",
            "baselines",
            "--dataset",
            "ml-100k",
            "--data-dir",
            str(ml100k_dir),
            "--no-text",
            "--no-cold-items",
            "--cold-user-fraction",
            "0",
            "-o",
            str(out),
            "--export",
            str(recs),
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    ease = report["results"]["ease"]["loo"]["all"]
    assert ease["users"] == 943
    # The issue's sanity reference: full ranking 0.140 / 0.073, sampled 0.645 / 0.393.
    assert ease["full_hr@10"] == pytest.approx(0.140, abs=0.01)
    assert ease["full_ndcg@10"] == pytest.approx(0.073, abs=0.01)
    assert ease["sampled_ndcg@10"] == pytest.approx(0.393, abs=0.01)
    assert ease["sampled_hr@10"] == pytest.approx(0.645, abs=0.015)
    pop = report["results"]["pop"]["loo"]["all"]
    assert pop["sampled_hr@10"] == pytest.approx(0.402, abs=0.01)
    assert pop["sampled_ndcg@10"] == pytest.approx(0.223, abs=0.01)
    rows = recs.read_text().splitlines()
    assert rows[0] == "user,item,rank" and len(rows) == 1 + 943 * 100
    # Anyone can recompute the full-ranking HR@10 from recs.csv and the test items.
    from shared.data.registry import load_dataset
    from shared.eval.splits import SplitConfig, split_users

    ds = load_dataset("ml-100k", ml100k_dir)
    split = split_users(ds, SplitConfig(cold_user_fraction=0.0))
    top10: dict[str, set[str]] = {}
    for line in rows[1:]:
        user, item, rank = line.split(",")
        if int(rank) <= 10:
            top10.setdefault(user, set()).add(item)
    hits = [ds.item_ids[split.test[u]] in top10[ds.user_ids[u]] for u in range(ds.n_users)]
    assert sum(hits) / len(hits) == pytest.approx(ease["full_hr@10"], abs=1e-9)


def test_evaluate_baselines_on_synthetic_default_prints_a_table() -> None:
    result = runner.invoke(app, ["evaluate", "baselines", "--no-text", "--run-config", "shots=1,3"])
    assert result.exit_code == 0, result.output
    assert "ease" in result.output and "fewshot" in result.output
    # a line per stage on stderr (on ml-100k it took a minute in silence); stdout: the report
    for stage in ("pop: fitting", "itemknn: fitting", "ease: fitting", "cold-start items"):
        assert stage in result.stderr and stage not in result.stdout


def test_a_data_dir_without_a_dataset_is_refused_not_read_as_synthetic() -> None:
    """Without --dataset the default is the generated synthetic world: a folder given with
    it was meant for a dataset, and figures of the synthetic world must not pass for it."""
    result = runner.invoke(app, ["evaluate", "baselines", "--data-dir", "/some/copy"])
    assert result.exit_code != 0
    assert "add --dataset (e.g. ml-100k) for that folder" in str(result.exception or "") + (
        result.output
    )


def test_flowers_info_lines_reach_the_terminal_only_with_verbose(tmp_path: Path) -> None:
    """Flower's logger gets its level when Flower is first imported, after the CLI has set
    up logging; the CLI's choice must still hold (the live progress display stays clean)."""
    tiny = "synthetic-users=120 synthetic-items=60 teacher-epochs=1 student-epochs=1 eval-size=5"
    args = ["simulate", "--backend", "inprocess", "--rounds", "1", "--cohort-size", "4"]
    args += ["--run-dir", str(tmp_path), "--run-config", tiny, "--json"]
    quiet = _fedrec(*args, "--name", "quiet")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "configure_fit" not in quiet.stderr
    verbose = _fedrec("--verbose", *args, "--name", "verbose")
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    assert verbose.stderr.count("configure_fit: strategy sampled 4 clients") == 1


def test_simulate_summary_prints_the_paired_differences(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedrec.commands.simulate import _print_summary

    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: no cell is wrapped

    m = {"sampled_hr@10": 0.6, "sampled_ndcg@10": 0.4, "full_hr@10": 0.2, "full_ndcg@10": 0.1}
    d_up = {"mean": 0.03, "low": 0.01, "high": 0.05, "level": 0.95, "users": 9}
    d_flat = {"mean": 0.0, "low": -0.02, "high": 0.02, "level": 0.95, "users": 9}
    summary = {
        "final": {"student": {"federated": m}},
        "paired": {"federated": {"a - b": {"sampled_hr@10": d_up, "full_hr@10": d_flat}}},
        "meta": {"run directory": "runs/x"},
    }
    _print_summary(summary)
    out = capsys.readouterr().out
    assert "A better" in out and "within noise" in out and "+0.030" in out
    # a summary without comparisons (e.g. rebuilt from an older summary.json) still prints
    del summary["paired"]
    _print_summary(summary)
    assert "A better" not in capsys.readouterr().out


@pytest.mark.parametrize("columns", ["20", "60"])
def test_a_narrow_terminal_wraps_the_tables_lines_but_cuts_no_figure_or_name(
    columns: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a 20-column terminal every figure of `fedrec simulate`'s summary (and of
    `evaluate baselines`) read "0.…" or "…", and at 60 the models "student (federated)"
    and "student (federated + personal)" both read "student (federa…"."""
    from fedrec.commands.evaluate import _print_table
    from fedrec.commands.simulate import _print_summary

    monkeypatch.setenv("COLUMNS", columns)
    m = {"sampled_hr@10": 0.6, "sampled_ndcg@10": 0.4, "full_hr@10": 0.2, "full_ndcg@10": 0.1}
    models = ("student (federated)", "student (federated + personal)")
    summary = {
        "final": {model: {"federated": m, "public": m} for model in models},
        "meta": {"run directory": "runs/x"},
    }
    _print_summary(summary)
    out = capsys.readouterr().out
    assert "…" not in out and out.count("0.6000") == 4 and "personal)" in out
    row = {"users": 5, "sampled_hr@10": 0.25, "sampled_ndcg@10": 0.125}
    row |= {"full_hr@10": 0.5, "full_ndcg@10": 0.375}
    report = {"dataset": {"name": "synthetic"}, "results": {"pop": {"loo": {"all": row}}}}
    _print_table(report, 10)
    out = capsys.readouterr().out
    assert "…" not in out and "loo/sampled" in out and "loo/full" in out
    assert all(figure in out for figure in ("0.2500", "0.1250", "0.5000", "0.3750"))


def test_the_summary_names_its_report_on_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into a pipe or a log Rich draws 80 columns: a longer report path was broken over two
    lines ("report: " alone, then the path), so `fedrec simulate | tail -1` got half of it."""
    from fedrec.commands.simulate import _print_summary

    monkeypatch.setenv("COLUMNS", "40")
    root = "/home/someone/experiments/federated recommender/runs/ml-100k-20261202-074504"
    m = {"sampled_hr@10": 0.6, "sampled_ndcg@10": 0.4, "full_hr@10": 0.2, "full_ndcg@10": 0.1}
    _print_summary({"final": {"pop": {"federated": m}}, "meta": {"run directory": root}})
    assert capsys.readouterr().out.splitlines()[-1] == f"report: {root}/report.md"


def test_client_start_passes_the_refit_flags_to_the_learner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedrec.commands.client as client_commands
    from client.device.training import LearnerConfig
    from server.pki import create_pki

    seen: list[LearnerConfig | None] = []
    monkeypatch.setattr(
        client_commands, "_run_daemon", lambda *args, **kwargs: seen.append(args[-1])
    )
    bundle = tmp_path / "bundle.pt"
    bundle.write_bytes(b"x")
    common = ["client", "start", "--state-dir", str(tmp_path / "d"), "--server", "127.0.0.1:1"]
    common += ["--root-cert", str(create_pki(tmp_path / "certs").ca_cert), "--bundle", str(bundle)]
    for flags in ([], ["--no-exclude-seen", "--personal-steps", "3"], ["--exclude-seen"]):
        result = runner.invoke(app, [*common, *flags])
        assert result.exit_code == 0, result.output
    assert [(c.exclude_seen, c.personal_steps) for c in seen if c] == [
        (None, None),  # the federation's
        (False, 3),
        (True, None),
    ]


def test_client_start_refuses_one_port_for_the_api_and_the_supernode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from client.device.identity import init_identity
    from server.pki import create_pki

    state = tmp_path / "d"
    init_identity(state)
    bundle = tmp_path / "bundle.pt"
    bundle.write_bytes(b"x")
    args = ["client", "start", "--state-dir", str(state), "--server", "127.0.0.1:1"]
    args += ["--root-cert", str(create_pki(tmp_path / "certs").ca_cert), "--bundle", str(bundle)]
    assert _main(monkeypatch, *args, "--port", "18783", "--supernode-port", "18783") == 2
    err = capsys.readouterr().err
    assert "--supernode-port 18783 is also the local API's port (--port)" in err
    assert not (state / "api.json").exists()  # refused before anything started
    assert _main(monkeypatch, *args, "--config", "max-batch") == 2
    assert "--config entry 'max-batch' is not of the form key=value" in capsys.readouterr().err


def test_folder_and_output_options_refuse_the_wrong_kind_of_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    assert _main(monkeypatch, "client", "init", "--state-dir", str(afile)) == 2
    assert f"{afile} is a file, not a folder" in capsys.readouterr().err
    for output, message in (
        ("", ". is a folder; give the output a file name inside it"),
        (str(tmp_path), f"{tmp_path} is a folder; give the output a file name inside it"),
        (str(afile / "x.json"), f"{afile} is a file, not a folder; give another output path"),
        # openapi has no --format json: its own way to standard output is named
        ("/dev/stdout", "for standard output, leave out --output)"),
    ):
        assert _main(monkeypatch, "client", "openapi", "-o", output) == 2
        assert message in capsys.readouterr().err
    schema = tmp_path / "new" / "api.json"  # its folder is made, as for every report
    written = runner.invoke(app, ["client", "openapi", "-o", str(schema)])
    assert written.exit_code == 0, written.output
    assert json.loads(schema.read_text())["openapi"]
    assert schema.stat().st_mode & 0o777 == 0o644  # a report, not a secret


def test_the_privacy_delta_flag_says_it_caps_the_delta_training_uses() -> None:
    """A device trains at the smaller of the server's delta and its own privacy-delta
    (:func:`client.client_app.deployment_run_config`, as the README says), yet the flag's
    help said only that /status reports epsilon at it: an owner could loosen or tighten the
    delta the device actually spends by without knowing."""
    shown = runner.invoke(app, ["client", "start", "--help"], env={"COLUMNS": "400"}).output
    line = next(row for row in shown.splitlines() if "--privacy-delta " in row)
    assert "caps the server's delta" in line


@pytest.mark.parametrize("command", ["serve-api", "start"])
def test_every_daemon_setting_is_a_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    import dataclasses

    from client.device.config import DaemonConfig
    from client.device.daemon import Daemon
    from fedrec.device_settings import DAEMON_SETTINGS_HELP, NOT_FLAGS
    from shared.bandits.policies import BanditConfig

    fields = [f.name for f in dataclasses.fields(DaemonConfig) if f.name not in NOT_FLAGS]
    fields += [f"bandit_{f.name}" for f in dataclasses.fields(BanditConfig)]
    documented = [name for topic in DAEMON_SETTINGS_HELP.values() for name in topic]
    assert sorted(documented) == sorted(fields)  # each setting once, none missing
    shown = runner.invoke(app, ["client", command, "--help"], env={"COLUMNS": "250"}).output
    for name in fields:
        assert f"--{name.replace('_', '-')} " in shown, name

    seen: list[DaemonConfig] = []

    class Stop(Exception):
        pass

    def capture(state_dir: Path, passphrase: Any = None, config: Any = None) -> Any:
        seen.append(config)
        raise Stop

    monkeypatch.setattr(Daemon, "open", staticmethod(capture))
    state = tmp_path / "d"
    assert runner.invoke(app, ["client", "init", "--state-dir", str(state)]).exit_code == 0
    base = ["client", command, "--state-dir", str(state)]
    if command == "start":  # the federation's files: checked before the daemon opens
        from server.pki import create_pki

        bundle = tmp_path / "bundle.pt"
        bundle.write_bytes(b"x")
        ca = create_pki(tmp_path / "certs").ca_cert
        base += ["--server", "127.0.0.1:9093", "--root-cert", str(ca), "--bundle", str(bundle)]
    args = [*base, "--config", "candidate-pool=300 max-batch=50 bandit-policy=thompson"]
    args += ["--candidate-pool", "250", "--bandit-mmr-lambda", "0.9", "--no-allow-remote"]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, Stop), result.output
    (config,) = seen
    assert (config.candidate_pool, config.max_batch) == (250, 50)  # the flag wins
    assert (config.exploration.policy, config.exploration.mmr_lambda) == ("thompson", 0.9)
    assert config.exploration.top_n == BanditConfig.top_n  # untyped flags change nothing
    refused = runner.invoke(app, [*base, "--bandit-top-n", "500"])
    assert "bandit-top-n (500) exceeds candidate-pool (200)" in str(refused.exception)
    assert len(seen) == 1  # refused before the daemon opens


def test_flags_are_named_in_their_own_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "s"
    assert runner.invoke(app, ["server", "init", "--state-dir", str(state)]).exit_code == 0
    for flag in ("--rounds", "--min-clients"):
        result = runner.invoke(app, ["server", "start", "--state-dir", str(state), flag, "0"])
        assert result.exit_code == 2 and f"Invalid value for '{flag}'" in result.output
    ml = ["data", "info", "--dataset", "ml-100k", "--data-dir", str(tmp_path), "--seed", "3"]
    assert _main(monkeypatch, *ml) == 2  # a seed that would change nothing
    assert "--seed seeds the synthetic world" in capsys.readouterr().err
    # the synthetic world is the synthetic world in any case ('Synthetic' refused --seed)
    typed = runner.invoke(app, ["data", "info", "--dataset", "Synthetic", "--seed", "3"])
    assert typed.exit_code == 0, typed.output
    assert typed.output.startswith("synthetic: ")


def test_the_api_names_why_it_cannot_listen(tmp_path: Path) -> None:
    import socket

    from client.device.daemon import DaemonConfig
    from client.device.identity import init_identity

    init_identity(tmp_path / "d")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        assert "another program holds it; pick another port" in _bind_error(
            tmp_path / "d", DaemonConfig(port=taken)
        )
        remote = DaemonConfig(host="192.0.2.1", allow_remote=True)  # not this machine's
        assert "give an address of this machine with --host" in _bind_error(tmp_path / "d", remote)
    finally:
        holder.close()


def _bind_error(state: Path, config: Any) -> str:
    from client.device.daemon import Daemon

    with Daemon.open(state, config=config) as daemon:
        try:
            daemon.bind_socket().close()
        except ConfigError as exc:
            return str(exc)
    raise AssertionError(f"bound {config.host}:{config.port}")


def _fedrec_into_a_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """``fedrec ARGS | head -0``: its standard output is a pipe whose reader has gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "fedrec.cli", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "args",
    [["data", "info", "--format", "json"], ["--help"]],
    ids=["click-echo", "rich"],
)
def test_output_whose_reader_went_away_ends_quietly_with_status_141(args: list[str]) -> None:
    """``fedrec data info | head -1``: Click (its echo) and Rich (tables, ``--help``) exited 1
    when the reader closed the pipe, a failure under ``set -o pipefail``. It now ends as
    ``cat`` or ``git`` do there, 128 + SIGPIPE, and says nothing (no traceback, no
    "Exception ignored ... BrokenPipeError" from the flush at exit)."""
    from fedrec.cli import CLOSED_OUTPUT_STATUS

    proc = _fedrec_into_a_closed_pipe(*args)
    assert proc.returncode == CLOSED_OUTPUT_STATUS == 141, proc.stderr
    assert proc.stderr == ""


def test_a_broken_pipe_that_is_not_the_output_stays_an_error() -> None:
    """Only a standard stream whose reader went away ends a command quietly: a broken pipe
    to a child process or a socket, with the output still open, is the command's error."""
    from fedrec.app import OutputClosed, _reader_gone

    with pytest.raises(BrokenPipeError), _reader_gone():
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")
    with pytest.raises(SystemExit), _reader_gone():  # an exit of its own, not Rich's
        raise SystemExit(1)
    closed = mock.patch("fedrec.app._stream_closed", return_value=True)
    with pytest.raises(OutputClosed), closed, _reader_gone():
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def _main(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    """Run the console entry point as a user would; returns its exit code."""
    from fedrec.cli import main

    monkeypatch.setattr(sys, "argv", ["fedrec", *argv])
    with pytest.raises(SystemExit) as exit_:
        main()
    return int(exit_.value.code or 0)


def test_a_path_that_cannot_be_used_is_one_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    code = _main(monkeypatch, "server", "init", "--state-dir", str(not_a_folder / "srv"))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: Not a directory") and str(not_a_folder) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_verbose_after_the_command_says_where_it_goes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _main(monkeypatch, "data", "info", "-v")
    err = capsys.readouterr().err
    assert code == 2
    assert "No such option '-v' here; it goes before the command: fedrec -v COMMAND" in err


def test_a_full_disk_is_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno
    import os

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    code = _main(monkeypatch, "server", "init", "--state-dir", str(tmp_path / "srv"))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: No space left on device: ") and str(tmp_path / "srv") in err
    assert err.strip().endswith("free space on that disk and retry")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_output_to_a_full_disk_is_one_line_not_a_traceback() -> None:
    """`fedrec data info > report.json` on a full disk (here /dev/full): the write to
    standard output raised an OSError naming no file, shown as a traceback, exit status 1."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "fedrec.cli", "data", "info"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: No space left on device; free space on that disk and retry\n"


def test_a_removed_current_folder_is_one_line(tmp_path: Path) -> None:
    """`cd` into a folder that is then deleted: `fedrec simulate` aborted in torch's import
    ("Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so") and `evaluate baselines
    --export recs.csv` ended in a traceback from os.getcwd; now one line saying to cd."""
    gone = tmp_path / "gone"
    gone.mkdir()

    def enter_and_remove() -> None:
        os.chdir(gone)
        os.rmdir(gone)

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "fedrec.cli", "simulate", "--rounds", "1"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        preexec_fn=enter_and_remove,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        "error: the current folder no longer exists (removed after the shell entered it); "
        "cd to an existing folder and run the command again\n"
    )


def test_closed_standard_descriptors_are_opened_on_dev_null(tmp_path: Path) -> None:
    """`fedrec ... >&-`: the first file the command opened (the device store, a key) took
    number 1, so what the SuperNode child or a library wrote to standard output went into it."""
    probe = (
        "import os, sys\n"
        "from fedrec.cli import _open_closed_std_fds\n"
        "_open_closed_std_fds()\n"
        f"opened = open({str(tmp_path / 'store.db')!r}, 'wb')\n"
        "print(opened.fileno(), os.path.realpath('/proc/self/fd/1'), file=sys.stderr)\n"
        "os.write(1, b'a child writing to standard output')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        stderr=subprocess.PIPE,
        text=True,
        check=False,
        preexec_fn=lambda: os.close(1),
    )
    assert proc.returncode == 0, proc.stderr
    number, stdout = proc.stderr.split()
    assert int(number) > 2 and stdout == os.devnull
    assert (tmp_path / "store.db").read_bytes() == b""


def test_a_progress_reader_that_went_away_does_not_end_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedrec evaluate baselines -o report.json 2>&1 >/dev/null | head -1`: the second
    progress line met the closed pipe and ended the command, exit status 1, before it
    wrote its report."""
    import io

    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    from fedrec.cli import main

    report = tmp_path / "report.json"
    args = ["evaluate", "baselines", "--no-text", "--no-cold-items", "--run-config", "shots=1"]
    monkeypatch.setattr(sys, "argv", ["fedrec", *args, "--format", "json", "-o", str(report)])
    monkeypatch.setattr(sys, "stderr", ClosedPipe())
    main()  # returns: exit status 0
    assert json.loads(report.read_text())["results"]


@pytest.mark.parametrize(
    ("env", "colored"), [({}, True), ({"NO_COLOR": "1"}, False), ({"TERM": "dumb"}, False)]
)
def test_the_error_line_is_colored_only_where_colors_are_wanted(
    env: dict[str, str],
    colored: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On a terminal the error line is red, but NO_COLOR (no-color.org) and TERM=dumb asked
    for none: it still came with ANSI escapes, which such a terminal prints as garbage (the
    tables and usage errors, drawn by Rich, honoured both)."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert _main(monkeypatch, "data", "info", "--dataset", "ml-9m") == 2
    err = capsys.readouterr().err
    assert ("\x1b[" in err) is colored, repr(err)
    assert "error: unknown dataset 'ml-9m'" in err


def test_a_user_error_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _main(monkeypatch, "simulate", "--run-config", "epsilon-budget=0")
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "error: privacy budget epsilon must be a finite number > 0, got 0.0"


def test_a_client_training_setting_past_its_bound_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _main(monkeypatch, "simulate", "--run-config", "local-epochs=5000")
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: local-epochs must be <= 1,000, got 5000: ")


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("max-round-steps=0", "error: max-round-steps must be an integer >= 1 "),
        ("max-round-epsilon=nan", "error: max-round-epsilon must be a finite number > 0 "),
        ("max-round-epsilon=-1", "error: max-round-epsilon must be a finite number > 0 "),
    ],
)
def test_a_round_cap_that_bounds_nothing_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], setting: str, expected: str
) -> None:
    code = _main(monkeypatch, "simulate", "--run-config", setting)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(expected), err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["bandits", "evaluate", "--users", "0"], "--users must be >= 1"),
        (
            [
                "evaluate",
                "baselines",
                "--no-text",
                "--export-model",
                "foo",
                "--export",
                "{tmp}/r.csv",
            ],
            "--export-model 'foo' is not one of pop, itemknn, ease",
        ),
        (["evaluate", "baselines", "--no-text", "--export", "{tmp}"], "is a folder"),
        (["evaluate", "baselines", "--export-model", "pop"], "give --export FILE too"),
        (["bandits", "evaluate", "-o", "{tmp}/file"], "file is a file, not a folder"),
        (["bandits", "evaluate", "-o", "{tmp}/file/sub"], "in the way of"),
        # refused for another reason: the output folder it would write is not left behind
        (["evaluate", "baselines", "-o", "{tmp}/new/sub/r.json", "-d", "bogus"], "bogus"),
        (["bandits", "evaluate", "-o", "{tmp}/new/sub", "--users", "0"], "--users must be"),
        (["bandits", "evaluate", "-o", "{tmp}/out", "--tag", "a/b"], "--tag becomes a file"),
        # every policy is compared: a policy key was accepted, ignored and reported
        (["bandits", "evaluate", "--run-config", "policy=thompson"], "policy does not apply"),
        (["bandits", "evaluate", "--seed", "-1"], "--seed must be an integer >= 0"),
    ],
)
def test_outputs_and_counts_are_checked_before_the_run(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    """Refused at once, not after minutes of work (or run with another value silently)."""
    (tmp_path / "file").write_text("")
    proc = _fedrec(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written


def test_install_model_names_the_file_it_refuses(tmp_path: Path) -> None:
    state = tmp_path / "device"
    assert _fedrec("client", "init", "--state-dir", str(state)).returncode == 0
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"\x08\x07" + b"not onnx" * 100)
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps([f"i{k}" for k in range(5)]))

    def install(model: Path, catalog: Path) -> subprocess.CompletedProcess[str]:
        args = ["--state-dir", str(state), "--model", str(model), "--catalog", str(catalog)]
        return _fedrec("client", "install-model", *args)

    proc = install(broken, catalog)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {broken}: ")
    binary = install(broken, broken)
    assert binary.returncode == 2 and "cannot read the catalog" in binary.stderr
    assert "Traceback" not in binary.stderr


def test_install_model_without_catalog_says_the_installed_one_is_damaged(tmp_path: Path) -> None:
    """A damaged catalog.json was reported as "no catalog installed" (the real cause only in
    the log line before), so the user looked for a catalog that was there."""
    state = tmp_path / "device"
    assert _fedrec("client", "init", "--state-dir", str(state)).returncode == 0
    (state / "catalog.json").write_text('["a", "b"')
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not onnx")
    proc = _fedrec("client", "install-model", "--state-dir", str(state), "--model", str(model))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.splitlines()[-1]
    assert error.startswith("error: the installed catalog is damaged: cannot read the catalog")
    assert "no catalog installed" not in error and "--catalog catalog.json" in error


def test_bandit_plots_are_written_and_stale_ones_removed(tmp_path: Path) -> None:
    from fedrec.commands.bandits import PLOTS

    run = ["bandits", "evaluate", "--world", "synthetic", "--users", "4", "--steps", "3"]
    run += ["--seed", "1", "-o", str(tmp_path), "--format", "json"]
    first = runner.invoke(app, run)
    assert first.exit_code == 0, first.output
    json.loads(first.stdout)  # the report alone on stdout; the progress went to stderr
    assert "synthetic seed 1 (1 of 1) ..." in first.stderr  # it was silent until the end
    pngs = {f"bandits-synthetic-{name}.png" for name in PLOTS["synthetic"]}
    assert {p.name for p in tmp_path.glob("*.png")} == pngs
    again = runner.invoke(app, [*run, "--no-plots"])
    assert again.exit_code == 0, again.output
    assert not list(tmp_path.glob("*.png"))  # they belonged to the earlier report
    assert (tmp_path / "bandits-synthetic.json").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["client", "init", "--state-dir", ""],
        ["server", "init", "--state-dir", ""],
        ["data", "info", "-d", "ml-100k", "--data-dir", ""],
        ["simulate", "-d", "ml-100k", "--data-dir", " "],
        ["simulate", "--run-dir", ""],
        ["bandits", "evaluate", "--world", "ml-100k", "--data-dir", ""],
    ],
)
def test_an_empty_folder_option_is_refused_not_taken_as_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "must not be empty" in result.output
    assert list(tmp_path.iterdir()) == []  # nothing written in the current folder


@pytest.mark.parametrize("command", ["server", "client"])
def test_a_state_dir_under_home_written_as_a_tilde_is_the_home_folders(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    """``--state-dir=~/fedrec`` (the shell leaves a tilde after ``=`` alone) made a folder
    named ``~`` in the current one, where the next command, whose ``~`` the shell expanded,
    did not look; --data-dir and the run's folders already read ``~`` as the home folder."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    result = runner.invoke(app, [command, "init", "--state-dir=~/fedrec"])
    assert result.exit_code == 0, result.output
    assert list(work.iterdir()) == []  # no folder named '~'
    assert (home / "fedrec").is_dir()
    # a user that does not exist: a usage error, not pathlib's RuntimeError
    unknown = ["init", "--state-dir=~no-such-user-x/fedrec"]
    assert _main(monkeypatch, command, *unknown) == 2
    assert "~no-such-user-x names no home folder" in capsys.readouterr().err


def test_a_file_option_under_home_written_as_a_tilde_is_the_home_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--output=~/api.json`` wrote ``./~/api.json``, and ``--catalog=~/catalog.json`` was
    looked for there, as the state-dir's tilde was: a file option reads ``~`` too."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "catalog.json").write_text(json.dumps(["a", "b", "c"]))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    result = runner.invoke(app, ["client", "openapi", "--output=~/api.json"])
    assert result.exit_code == 0, result.output
    assert json.loads((home / "api.json").read_text())["openapi"]
    init = ["client", "init", "--state-dir", str(home / "d"), "--catalog=~/catalog.json"]
    result = runner.invoke(app, init)
    assert result.exit_code == 0, result.output
    assert list(work.iterdir()) == []  # no folder named '~'
    unknown = runner.invoke(app, ["client", "openapi", "--output=~no-such-user-x/api.json"])
    assert unknown.exit_code == 2  # a usage error, not pathlib's RuntimeError


def test_bad_init_input_writes_nothing(tmp_path: Path) -> None:
    """A bad --host or an empty --passphrase-env is refused before any file is written, so
    the retry is not blocked by a half-made state directory (or a random key is not made
    where a passphrase was meant)."""
    server = runner.invoke(
        app, ["server", "init", "--state-dir", str(tmp_path / "s"), "--host", "bad host!"]
    )
    assert server.exit_code != 0 and "neither an IP address nor a DNS name" in str(server.exception)
    for bad, message in (
        ("999.1.1.1", "looks like an IPv4 address"),
        ("", "is empty"),
        ("0.0.0.0", "'0.0.0.0' is a listen-on-all address, not one devices can connect to"),
        ("[::]", "'[::]' is a listen-on-all address"),
        ("224.0.0.1", "is a multicast address"),
    ):
        args = ["server", "init", "--state-dir", str(tmp_path / "s"), "--host", bad]
        assert message in str(runner.invoke(app, args).exception)
    assert not (tmp_path / "s").exists()
    device = runner.invoke(
        app, ["client", "init", "--state-dir", str(tmp_path / "d"), "--passphrase-env", ""]
    )
    assert device.exit_code != 0 and "takes the *name*" in str(device.exception)
    assert list(tmp_path.iterdir()) == []
    retry = runner.invoke(app, ["server", "init", "--state-dir", str(tmp_path / "s")])
    assert retry.exit_code == 0, retry.output


def test_data_info_refuses_loading_options_for_the_generated_world(tmp_path: Path) -> None:
    """The synthetic world is generated unfiltered: a filter given for it was silently
    ignored (the output said 0 whatever was asked)."""
    for extra in (["--min-user-interactions", "50"], ["--data-dir", str(tmp_path)]):
        result = runner.invoke(app, ["data", "info", *extra])
        assert result.exit_code != 0
        assert "add --dataset (e.g. ml-100k)" in str(result.exception)
    plain = runner.invoke(app, ["data", "info", "--format", "json"])
    assert plain.exit_code == 0 and json.loads(plain.stdout)["summary"]["name"] == "synthetic"


def test_the_entry_point_exits_with_a_commands_own_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fedrec server start` returned 1 (no round changed the model) or 130 (a signal) through
    typer.Exit, and the process exited 0: Click returns that status without standalone mode."""
    import sys

    import typer

    from fedrec import cli

    @cli.app.command("exit-with-3", hidden=True)
    def _exit_with_3() -> None:
        raise typer.Exit(3)

    try:
        monkeypatch.setattr(sys, "argv", ["fedrec", "exit-with-3"])
        with pytest.raises(SystemExit) as exited:
            cli.main()
        assert exited.value.code == 3
    finally:
        cli.app.registered_commands.pop()


def test_ctrl_c_in_a_command_says_aborted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C in a command that installs no handler of its own (`fedrec simulate` before it
    claims its run directory, `fedrec evaluate ...`): Typer turns the KeyboardInterrupt into
    a silent exit status 130, so the command ended with no word at all."""
    import os
    import signal
    import time

    from fedrec import cli

    @cli.app.command("interrupted", hidden=True)
    def _interrupted() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the signal interrupts this at once

    previous = signal.getsignal(signal.SIGINT)
    try:
        assert _main(monkeypatch, "interrupted") == 130
    finally:
        cli.app.registered_commands.pop()
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert err.strip() == "aborted"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_ctrl_c_while_the_commands_are_imported_says_aborted(tmp_path: Path) -> None:
    """Ctrl-C in the first second of any `fedrec` command, while its modules were imported
    (before Click and the command's own handler run), printed a Python traceback and no
    "aborted". The signal is sent once NumPy's extension is loaded: part of those imports,
    none of the entry point's."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "fedrec.cli", "client", "status", "--state-dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        maps = Path(f"/proc/{proc.pid}/maps")
        while "_multiarray_umath" not in maps.read_text() and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and err == "aborted\n", err[-2000:]


def _untrained_student(n_items: int) -> Any:
    """A seeded, untrained 16-d student over ``n_items`` items (for publishing a model)."""
    import numpy as np

    from shared.models.student import StudentConfig, StudentModel

    rng = np.random.default_rng(0)
    return StudentModel(
        rng.normal(size=(n_items, 8)).astype(np.float32),
        rng.normal(size=(n_items, 8)).astype(np.float32),
        StudentConfig(dim=16, max_len=10, text_dim=8, id_dim=8),
    )


def test_evaluate_model_scores_a_published_artifact_on_its_split(tmp_path: Path) -> None:
    """A published int8 model evaluated offline: the figures are the protocol's (recomputable
    from its recs.csv), per population and K; a model of another catalog is refused."""

    from shared.compression.artifact import publish_student
    from shared.data.registry import load_dataset
    from shared.eval.protocol import EvalConfig, evaluate_split
    from shared.eval.splits import SplitConfig, split_users
    from shared.ondevice.runtime import OnDeviceModel

    ds = load_dataset("synthetic", None, synthetic_seed=5)
    student = _untrained_student(ds.n_items)
    model = tmp_path / "models" / "model-v3.int8.onnx"
    publish_student(student, ds.item_ids, model, version="3")
    out, recs = tmp_path / "report.json", tmp_path / "recs.csv"
    args = ["evaluate", "model", str(model), "--seed", "5", "--shots", "1", "--shots", "3"]
    result = runner.invoke(app, [*args, "-o", str(out), "--export", str(recs), "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["model"]["version"] == "3" and report["model"]["quantization"] != "none"
    (entry,) = report["results"].values()
    assert set(entry["loo"]) == {"public", "federated", "all"}
    assert set(entry["fewshot"]) == {"k=1", "k=3"}
    split = split_users(ds, SplitConfig(seed=5))
    direct = evaluate_split(OnDeviceModel(model), split, ("federated",), config=EvalConfig(seed=5))
    assert entry["loo"]["federated"] == direct["federated"]
    ranks = {}
    for line in recs.read_text().splitlines()[1:]:
        user, item, rank = line.split(",")
        ranks[(user, item)] = int(rank)
    for population in ("public", "federated"):
        users = split.evaluable(split.population(population))
        hits = [ranks.get((ds.user_ids[u], ds.item_ids[split.test[u]]), 999) <= 10 for u in users]
        assert sum(hits) / len(hits) == pytest.approx(entry["loo"][population]["full_hr@10"])
    # and the few-shot ones from the file of each K (the cold user's support set scored)
    for k in (1, 3):
        ranks = {}
        for line in (tmp_path / f"recs-fewshot-k{k}.csv").read_text().splitlines()[1:]:
            user, item, rank = line.split(",")
            ranks[(user, item)] = int(rank)
        seqs = [split.full_sequences[int(u)] for u in split.cold_users]
        hits = [
            ranks.get((ds.user_ids[u], ds.item_ids[seq[k]]), 999) <= 10
            for u, seq in zip(split.cold_users, seqs, strict=True)
            if len(seq) > k
        ]
        assert len(hits) == entry["fewshot"][f"k={k}"]["users"]
        assert sum(hits) / len(hits) == pytest.approx(entry["fewshot"][f"k={k}"]["full_hr@10"])
    assert not (tmp_path / "recs-fewshot-k5.csv").exists()  # the Ks evaluated only
    # the table names the model; another dataset's catalog is refused before any scoring
    assert "model-v3.int8.onnx" in runner.invoke(app, [*args, "--shots", "5"]).output
    shuffled = tmp_path / "other" / "model-v1.int8.onnx"
    publish_student(student, ds.item_ids[::-1], shuffled, version="1")
    other = runner.invoke(app, ["evaluate", "model", str(shuffled), "--seed", "5"])
    assert isinstance(other.exception, ConfigError)
    assert "was exported for another catalog" in str(other.exception)
    assert "--dataset, --data-dir" in str(other.exception)
    bad = runner.invoke(app, [*args, "--shots", "1"])
    assert "--shots must be distinct" in str(bad.exception)


@pytest.mark.parametrize("key", ["cold-item-fraction", "cold_item_min_interactions"])
def test_evaluate_model_refuses_the_cold_item_settings_it_does_not_use(
    tmp_path: Path, key: str
) -> None:
    """It runs no cold-item evaluation, yet took these and recorded them in its report."""
    model = tmp_path / "model-v1.int8.onnx"  # refused before the model is read
    result = runner.invoke(app, ["evaluate", "model", str(model), "--run-config", f"{key}=2"])
    assert isinstance(result.exception, ConfigError), result.output
    message = str(result.exception)
    assert message.startswith(f"unknown --run-config keys: {key.replace('_', '-')};"), message
    assert "cold-item" not in message.split("valid:")[1] and "n-negatives" in message


def test_evaluate_model_of_a_server_uses_the_data_and_split_its_metadata_records(
    tmp_path: Path,
) -> None:
    """A deployment's published model has no run config.json: a wrong --seed guessed for it
    was scored silently on its training users. A model whose bundle recorded its data and
    split is now scored on them, and another asked for is refused; a model without them
    (an older bundle's) is scored on the options given, as before."""

    from shared.compression.artifact import publish_student
    from shared.data.provenance import DataProvenance
    from shared.data.registry import load_dataset

    ds = load_dataset("synthetic", None, synthetic_seed=5)
    student = _untrained_student(ds.n_items)
    model = tmp_path / "artifacts" / "model-v4.int8.onnx"  # a server's, not a run's models/
    trained_on = DataProvenance("synthetic", 5, 0.1, 0.3)
    publish_student(student, ds.item_ids, model, version="4", trained_on=trained_on)
    result = runner.invoke(app, ["evaluate", "model", str(model), "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["split"]["seed"], report["split"]["public_fraction"]) == (5, 0.3)
    assert report["model"]["trained_on"]["seed"] == 5
    same = ["--seed", "5", "--public-fraction", "0.3", "--dataset", "synthetic"]
    assert runner.invoke(app, ["evaluate", "model", str(model), *same]).exit_code == 0
    for other in (
        ["--seed", "42"],
        ["--dataset", "ml-100k"],
        ["--public-fraction", "0.2"],
        ["--run-config", "cold-user-fraction=0.3"],
    ):
        refused = runner.invoke(app, ["evaluate", "model", str(model), *other])
        assert isinstance(refused.exception, ConfigError), other
        message = str(refused.exception)
        assert "records the data and split it was pretrained with" in message
        assert "on another split than asked" in message and "(recorded: " in message
    # a world of another size (the catalog check tells items, not users): its own world
    sized = tmp_path / "sized" / "model-v4.int8.onnx"
    small = DataProvenance("synthetic", 5, 0.1, 0.3, synthetic_users=300, synthetic_items=600)
    publish_student(student, ds.item_ids, sized, version="4", trained_on=small)
    result = runner.invoke(app, ["evaluate", "model", str(sized), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dataset"]["users"] == 300
    assert report["dataset"]["users"] == 1000  # the default world's, recorded without sizes
    older = tmp_path / "older" / "model-v4.int8.onnx"
    publish_student(student, ds.item_ids, older, version="4")
    args = ["evaluate", "model", str(older), "--format", "json"]
    for given, seed in (([], 42), (["--seed", "7"], 7)):
        result = runner.invoke(app, [*args, *given])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["split"]["seed"] == seed and report["model"]["trained_on"] is None


def test_evaluate_model_recording_the_synthetic_world_refuses_a_data_dir_as_such(
    tmp_path: Path,
) -> None:
    """A server's model recording the synthetic world, given --data-dir, was refused with the
    loader's advice "add --dataset (e.g. ml-100k) for that folder": doing so was refused in
    turn (the recorded dataset differs). Dropping the folder is the fix, as for a run's."""
    from shared.compression.artifact import publish_student
    from shared.data.provenance import DataProvenance
    from shared.data.registry import load_dataset

    ds = load_dataset("synthetic", None, synthetic_seed=5)
    model = tmp_path / "artifacts" / "model-v4.int8.onnx"
    trained_on = DataProvenance("synthetic", 5, 0.1, 0.3)
    publish_student(
        _untrained_student(ds.n_items), ds.item_ids, model, version="4", trained_on=trained_on
    )
    refused = runner.invoke(app, ["evaluate", "model", str(model), "--data-dir", str(tmp_path)])
    assert isinstance(refused.exception, ConfigError), refused.output
    message = str(refused.exception)
    assert "add --dataset" not in message, message
    assert "on the synthetic world" in message and f"drop --data-dir {tmp_path}" in message


def _small_published_model(tmp_path: Path) -> Path:
    """A server's int8 model of a 100-user synthetic world, which its metadata records."""
    from shared.compression.artifact import publish_student
    from shared.data.provenance import DataProvenance
    from shared.data.registry import load_dataset

    ds = load_dataset("synthetic", None, synthetic_seed=5, synthetic_users=100, synthetic_items=60)
    model = tmp_path / "artifacts" / "model-v4.int8.onnx"
    trained_on = DataProvenance("synthetic", 5, 0.1, 0.3, synthetic_users=100, synthetic_items=60)
    publish_student(
        _untrained_student(ds.n_items), ds.item_ids, model, version="4", trained_on=trained_on
    )
    return model


@pytest.mark.parametrize("interrupted", [False, True])
def test_evaluate_export_leaves_no_fewshot_list_of_an_older_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupted: bool
) -> None:
    """--export replaced recs.csv and the few-shot lists of the Ks it evaluated, and left
    those of other Ks from an earlier export (another model, another split) next to them,
    as if of this one; Ctrl-C between recs.csv and its few-shot lists left them all. The
    older lists are now gone before the new files are written; other files stay."""
    import shared.eval.protocol as protocol

    model = _small_published_model(tmp_path)
    recs = tmp_path / "recs.csv"
    older = {recs: "older", tmp_path / "notes.txt": "mine", tmp_path / "recs-fewshot-kx.csv": "x"}
    older.update({tmp_path / f"recs-fewshot-k{k}.csv": "older" for k in (1, 3, 10)})
    for path, text in older.items():
        path.write_text(text)
    if interrupted:  # Ctrl-C once recs.csv is written, before its first few-shot list
        written = protocol.export_recs

        def export_recs(*args: Any, **kwargs: Any) -> int:
            if Path(args[3]) != recs:
                raise KeyboardInterrupt
            return written(*args, **kwargs)

        monkeypatch.setattr(protocol, "export_recs", export_recs)
    args = ["evaluate", "model", str(model), "--shots", "1", "--export", str(recs)]
    result = runner.invoke(app, args)
    assert bool(result.exit_code) == interrupted, result.output  # Click: Aborted!, status 1
    assert recs.read_text().startswith("user,item,rank\n")
    fewshot = {p.name for p in tmp_path.glob("recs-fewshot-k*.csv")}
    assert fewshot == {"recs-fewshot-kx.csv", *([] if interrupted else ["recs-fewshot-k1.csv"])}
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("flag", ["--output", "--export"])
def test_evaluate_refuses_a_dash_for_an_output_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str
) -> None:
    """`-o -` (standard output, by the usual convention) wrote the report to a file named
    "-" in the current folder, and `--export -` wrote "-" and "--fewshot-k1" there (a name
    `rm` takes for an option), printing nothing to say so."""
    model = _small_published_model(tmp_path / "published")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["evaluate", "model", str(model), flag, "-"])
    assert isinstance(result.exception, ConfigError), result.output
    assert "for standard output, use the command's --format json" in str(result.exception)
    assert [p.name for p in tmp_path.iterdir()] == ["published"]


@pytest.mark.parametrize("command", ["evaluate", "tune"])
def test_bandits_refuse_a_dash_for_the_output_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """`fedrec bandits evaluate -o -` took "-" (standard output, by the usual convention)
    for a folder: it ran the whole comparison and wrote the report and plots into a new
    folder named "-" in the current one."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["bandits", command, "-o", "-"])
    assert isinstance(result.exception, ConfigError), result.output
    assert "'-' is not standard output here" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_model_refuses_another_split_asked_in_snake_case(tmp_path: Path) -> None:
    """``--run-config cold_user_fraction=0.3`` (snake case, which every other key accepts)
    escaped the recorded-split check and was silently replaced by the recorded 0.1."""
    from shared.compression.artifact import publish_student
    from shared.data.provenance import DataProvenance
    from shared.data.registry import load_dataset

    ds = load_dataset("synthetic", None, synthetic_seed=5)
    model = tmp_path / "artifacts" / "model-v4.int8.onnx"
    trained_on = DataProvenance("synthetic", 5, 0.1, 0.3)
    publish_student(
        _untrained_student(ds.n_items), ds.item_ids, model, version="4", trained_on=trained_on
    )
    args = ["evaluate", "model", str(model), "--run-config"]
    refused = runner.invoke(app, [*args, "cold_user_fraction=0.3"])
    assert isinstance(refused.exception, ConfigError), refused.output
    assert "cold-user-fraction 0.3 (recorded: 0.1)" in str(refused.exception)
    twice = runner.invoke(app, [*args, "seed=5 public_fraction=0.3 public-fraction=0.3"])
    assert isinstance(twice.exception, ConfigError)
    assert "'public-fraction' is given twice" in str(twice.exception)


def test_evaluate_model_of_a_run_with_unreadable_settings_says_what_to_do(
    tmp_path: Path,
) -> None:
    """A run's config.json that cannot be read was refused with simulate's advice ("pass
    another --name to start a fresh run"), which `evaluate model` has no use for."""
    model = tmp_path / "run" / "models" / "model-v1.int8.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"not read: the settings are refused first")
    for settings in ("{not json", "[]"):
        (tmp_path / "run" / "config.json").write_text(settings)
        refused = runner.invoke(app, ["evaluate", "model", str(model)])
        assert isinstance(refused.exception, ConfigError)
        message = str(refused.exception)
        assert "--name" not in message, message
        assert "copy the model out of the run's models/ folder" in message


def test_evaluate_model_of_a_run_whose_data_folder_moved_asks_for_data_dir(
    tmp_path: Path,
) -> None:
    """The loader's advice for a folder that is gone ("or omit it to download the dataset")
    was wrong for a run's model: leaving --data-dir out reads the run's recorded folder."""
    from shared.compression.artifact import publish_student
    from shared.config import to_flat
    from shared.errors import DatasetNotFoundError
    from simulation.config import SimulationConfig

    gone = tmp_path / "moved-away"
    config = SimulationConfig(dataset="ml-100k", data_dir=str(gone), backend="inprocess")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"simulation": to_flat(config)}))
    model = run / "models" / "model-v2.int8.onnx"
    publish_student(_untrained_student(30), [str(i) for i in range(30)], model, version="2")
    refused = runner.invoke(app, ["evaluate", "model", str(model)])
    assert isinstance(refused.exception, DatasetNotFoundError)
    said = str(refused.exception)
    assert str(gone) in said and "pass --data-dir PATH to a copy of ml-100k" in said
    assert "omit it" not in said
    elsewhere = runner.invoke(app, ["evaluate", "model", str(model), "--data-dir", str(gone)])
    assert isinstance(elsewhere.exception, DatasetNotFoundError)  # the loader's own words
    assert "does not exist" in str(elsewhere.exception)


def test_evaluate_model_of_a_run_uses_the_runs_data_and_split(tmp_path: Path) -> None:
    """The synthetic catalog is the same whatever its seed, so a model trained on seed 5's
    world passed the catalog check under the default --seed 42 and was scored on another
    world; a run's model is now scored on the data and split in its run's config.json."""

    from shared.compression.artifact import publish_student
    from shared.config import to_flat
    from simulation.config import SimulationConfig
    from simulation.pipeline import load_split

    config = SimulationConfig(seed=5, synthetic_users=60, synthetic_items=50, backend="inprocess")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"simulation": to_flat(config)}))
    dataset, split = load_split(config)
    student = _untrained_student(dataset.n_items)
    model = run / "models" / "model-v2.int8.onnx"
    publish_student(student, dataset.item_ids, model, version="2")
    result = runner.invoke(app, ["evaluate", "model", str(model), "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["dataset"]["users"], report["split"]["seed"]) == (60, 5)
    (entry,) = report["results"].values()
    assert entry["loo"]["federated"]["users"] == len(split.evaluable(split.federated_users))
    assert runner.invoke(app, ["evaluate", "model", str(model), "--seed", "5"]).exit_code == 0
    for other in (["--seed", "42"], ["--dataset", "ml-100k"], ["--public-fraction", "0.5"]):
        refused = runner.invoke(app, ["evaluate", "model", str(model), *other])
        assert isinstance(refused.exception, ConfigError)
        assert "on another split than asked" in str(refused.exception)
    # with --data-dir too: the dataset is named as the one that differs (the run's config
    # used to refuse the folder first, telling the user to add the --dataset they had given)
    folder = ["--data-dir", str(tmp_path)]
    refused = runner.invoke(app, ["evaluate", "model", str(model), "--dataset", "ml-100k", *folder])
    assert isinstance(refused.exception, ConfigError)
    assert "dataset 'ml-100k' (the run's: 'synthetic')" in str(refused.exception)
    refused = runner.invoke(app, ["evaluate", "model", str(model), *folder])
    assert isinstance(refused.exception, ConfigError)
    assert "on the synthetic world" in str(refused.exception)
    assert "drop --data-dir" in str(refused.exception)


def test_evaluate_model_of_a_run_scores_at_the_runs_shots(tmp_path: Path) -> None:
    """A run made with shots=2 had its model scored at K 1, 3, 5 and 10 (the command's own
    default), not the K of the run's figures; it is now scored at the run's K and says so.
    --shots still chooses, and a run whose config.json records no shots (older than the
    setting) keeps the default, saying why."""
    from shared.compression.artifact import publish_student
    from shared.config import to_flat
    from simulation.config import SimulationConfig
    from simulation.pipeline import load_run_dataset

    config = SimulationConfig(
        seed=5, synthetic_users=60, synthetic_items=50, backend="inprocess", shots=(2,)
    )
    run = tmp_path / "run"
    run.mkdir()
    settings = to_flat(config)
    (run / "config.json").write_text(json.dumps({"simulation": settings}))
    dataset = load_run_dataset(config)
    model = run / "models" / "model-v2.int8.onnx"
    publish_student(_untrained_student(dataset.n_items), dataset.item_ids, model, version="2")
    args = ["evaluate", "model", str(model), "--format", "json"]

    def scored(*given: str) -> tuple[list[str], dict[str, Any], str]:
        result = runner.invoke(app, [*args, *given])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        (entry,) = report["results"].values()
        return list(entry["fewshot"]), report["eval"], result.stderr

    ks, used, said = scored()
    assert ks == ["k=2"] and used["shots"] == [2]
    assert used["source"] == {"shots": "the run's shots", "seed": "the run's"}
    assert "evaluation settings: K 2 (the run's shots); HR@10 / NDCG@10 against 99" in said
    ks, used, said = scored("--shots", "4", "--run-config", "n-negatives=19")
    assert ks == ["k=4"] and used["n_negatives"] == 19 and "K 4 (--shots)" in said
    del settings["shots"]
    (run / "config.json").write_text(json.dumps({"simulation": settings}))
    ks, used, said = scored()
    assert ks == ["k=1", "k=3", "k=5", "k=10"]
    assert "the default: the run's config.json records no shots" in said


def test_evaluate_model_of_a_run_refuses_data_that_changed_since(tmp_path: Path) -> None:
    """A run's model was scored on whatever its data folder held now: data changed since the
    run (same catalog, so the catalog check passed) gave another split, and the model was
    tested on what it had trained on, silently. The content fingerprint the run recorded is
    now compared, as a finished run's re-evaluation and ranks already did."""
    from shared.compression.artifact import publish_student
    from shared.config import to_flat
    from shared.data.registry import load_dataset
    from simulation.config import SimulationConfig

    data = _generic_data(tmp_path)
    config = SimulationConfig(dataset="generic", data_dir=str(data), backend="inprocess")
    ds = load_dataset("generic", data)
    run = tmp_path / "run"
    run.mkdir()
    settings = {"data": {"fingerprint": ds.fingerprint()}, "simulation": to_flat(config)}
    (run / "config.json").write_text(json.dumps(settings))
    model = run / "models" / "model-v1.int8.onnx"
    publish_student(_untrained_student(ds.n_items), ds.item_ids, model, version="1")
    args = ["evaluate", "model", str(model), "--shots", "1"]
    assert runner.invoke(app, args).exit_code == 0
    _generic_data(tmp_path, reversed_time=True)
    refused = runner.invoke(app, args)
    assert isinstance(refused.exception, ConfigError), refused.output
    message = str(refused.exception)
    assert "trained on other data than generic" in message and "content fingerprint" in message


def _generic_data(tmp_path: Path, reversed_time: bool = False) -> Path:
    """A small generic-layout dataset in ``tmp_path/data`` (40 users, 12 items); with
    ``reversed_time`` the same users and items in another order: each user's last item (the
    split's test) is another one, and the catalog is the same."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "items.csv").write_text("item,text\n" + "".join(f"i{i},t{i}\n" for i in range(12)))
    rows = [
        (u, (u * 5 + j) % 12, 9 - j if reversed_time else j) for u in range(40) for j in range(6)
    ]
    (data / "interactions.csv").write_text(
        "user,item,timestamp\n" + "".join(f"u{u},i{i},{t}\n" for u, i, t in rows)
    )
    return data


def test_evaluate_model_of_a_server_refuses_data_that_changed_since(tmp_path: Path) -> None:
    """A server's published model records the data and split it was pretrained with, but
    not the data's content: a changed copy of the same catalog passed the catalog check and
    its split tested the model on what it had trained on, silently. Its metadata now records
    the content fingerprint, compared with the data read; a record without one (an older
    bundle's) is scored as before."""
    from shared.compression.artifact import publish_student
    from shared.data.provenance import DataProvenance
    from shared.data.registry import load_dataset

    data = _generic_data(tmp_path)
    ds = load_dataset("generic", data)
    model = tmp_path / "artifacts" / "model-v1.int8.onnx"  # a server's, not a run's models/
    args = ["evaluate", "model", str(model), "--data-dir", str(data), "--shots", "1"]
    trained_on = DataProvenance("generic", 42, 0.1, 0.2, data_fingerprint=ds.fingerprint())
    older = DataProvenance("generic", 42, 0.1, 0.2)
    student = _untrained_student(ds.n_items)
    for record in (trained_on, older):
        publish_student(student, ds.item_ids, model, version="1", trained_on=record)
        result = runner.invoke(app, [*args, "--format", "json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["model"]["trained_on"] == asdict(record)
    _generic_data(tmp_path, reversed_time=True)
    assert runner.invoke(app, args).exit_code == 0  # the older record: not compared
    publish_student(student, ds.item_ids, model, version="1", trained_on=trained_on)
    refused = runner.invoke(app, args)
    assert isinstance(refused.exception, ConfigError), refused.output
    message = str(refused.exception)
    assert f"its content fingerprint {ds.fingerprint()}, now " in message
    assert "trained on other data than generic" in message and "--data-dir" in message


def test_evaluate_model_refuses_another_runs_model_in_a_runs_models_folder(
    tmp_path: Path,
) -> None:
    """A model in a run's models/ folder was scored on that run's data and split whatever
    its metadata recorded: another run's model (seed 7) copied there was tested on seed 5's
    world, silently. A record without the world's size (an older bundle's) still passes."""
    from dataclasses import replace

    from shared.compression.artifact import publish_student
    from shared.config import to_flat
    from shared.data.provenance import DataProvenance
    from simulation.config import SimulationConfig
    from simulation.pipeline import load_run_dataset

    config = SimulationConfig(seed=5, synthetic_users=60, synthetic_items=50, backend="inprocess")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"simulation": to_flat(config)}))
    dataset = load_run_dataset(config)
    student = _untrained_student(dataset.n_items)
    model = run / "models" / "model-v2.int8.onnx"
    args = ["evaluate", "model", str(model), "--shots", "1"]
    own = config.data_provenance()
    for trained_on in (own, DataProvenance("synthetic", 5, 0.1, 0.2)):
        publish_student(student, dataset.item_ids, model, version="2", trained_on=trained_on)
        result = runner.invoke(app, [*args, "--format", "json"])
        assert result.exit_code == 0, result.output
        # the report shows what the model records (it showed null for a run's model)
        assert json.loads(result.stdout)["model"]["trained_on"] == asdict(trained_on)
    publish_student(student, dataset.item_ids, model, version="2", trained_on=replace(own, seed=7))
    refused = runner.invoke(app, args)
    assert isinstance(refused.exception, ConfigError), refused.output
    message = str(refused.exception)
    assert "seed 7 (the run's: 5)" in message and "another run's model" in message
    # another run's model of other content (the same split): named by its fingerprint
    settings = {"data": {"fingerprint": dataset.fingerprint()}, "simulation": to_flat(config)}
    (run / "config.json").write_text(json.dumps(settings))
    for fingerprint, passes in ((dataset.fingerprint(), True), ("0123abcd", False)):
        other = replace(own, data_fingerprint=fingerprint)
        publish_student(student, dataset.item_ids, model, version="2", trained_on=other)
        result = runner.invoke(app, args)
        assert (result.exit_code == 0) is passes, result.output
    assert isinstance(result.exception, ConfigError)
    message = str(result.exception)
    assert "data-fingerprint '0123abcd' (the run's: " in message, message
    assert "another run's model" in message


@pytest.mark.parametrize(
    ("command", "hint"),
    [
        (["client", "status"], "`fedrec client init --state-dir {}`"),
        (["client", "status", "--init"], "`fedrec client start --state-dir {}`"),
        (["server", "status"], "`fedrec server init --state-dir {}`"),
    ],
)
def test_a_command_an_error_suggests_can_be_pasted_with_its_path(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    hint: str,
) -> None:
    """A state directory whose path has a space (or another character the shell reads)
    was put into the suggested command as it is: pasted, the command got two arguments."""
    import shlex

    from client.device.identity import init_identity

    state = tmp_path / "my device é"
    state.mkdir()
    if "--init" in command:  # an identity, no daemon
        command.remove("--init")
        init_identity(state)
    code = _main(monkeypatch, *command, "--state-dir", str(state))
    err = capsys.readouterr().err
    assert code == 2, err
    assert hint.format(shlex.quote(str(state))) in err, err


@pytest.mark.parametrize("timeout", ["nan", "inf", "1e308"])
def test_client_status_refuses_a_timeout_no_socket_takes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    timeout: str,
) -> None:
    """NaN passes Click's min=0.1, and a huge or infinite wait overflows the socket's: each
    reached `socket.settimeout` and ended in a traceback (exit 1) once a daemon answered."""
    from client.device.identity import init_identity

    state = tmp_path / "d"
    init_identity(state)
    code = _main(monkeypatch, "client", "status", "--state-dir", str(state), "--timeout", timeout)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "--timeout" in err and "no daemon is running" not in err  # refused before that


def test_renew_cert_refuses_a_lifetime_beyond_the_cas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`renew-cert --valid-days 100000000` ended in an OverflowError traceback (a date past
    the year 9999); the certificate never outlives its CA (3650 days) anyway."""
    import inspect

    from fedrec.commands.server import CA_VALID_DAYS
    from server.pki import create_pki, load_cert
    from server.state import init_state_dir

    assert inspect.signature(create_pki).parameters["ca_valid_days"].default == CA_VALID_DAYS
    layout = init_state_dir(tmp_path / "s", ["server"])
    before = layout.pki.server_cert.read_bytes()
    renew = ["server", "renew-cert", "--state-dir", str(layout.state_dir), "--valid-days"]
    assert _main(monkeypatch, *renew, "100000000") == 2
    err = capsys.readouterr().err
    assert "Invalid value for '--valid-days'" in err and "Traceback" not in err, err
    assert layout.pki.server_cert.read_bytes() == before  # nothing was issued
    assert runner.invoke(app, [*renew, "3650"]).exit_code == 0  # the CA's whole lifetime
    ca, server = load_cert(layout.pki.ca_cert), load_cert(layout.pki.server_cert)
    assert server.not_valid_after_utc <= ca.not_valid_after_utc


@pytest.mark.parametrize(
    "entries",
    [
        ["max-batch=7 max_batch=5"],
        ["privacy_epsilon=1", "privacy-epsilon=8"],
        ["bandit-policy=greedy bandit_policy=thompson"],
    ],
)
def test_a_device_setting_given_in_both_spellings_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], entries: list[str]
) -> None:
    """`--config 'max-batch=7 max_batch=5'` named one setting twice and the last one won
    silently, where a key given twice is refused (README, --help)."""
    args = [arg for entry in entries for arg in ("--config", entry)]
    assert _main(monkeypatch, "client", "openapi", *args) == 2
    err = capsys.readouterr().err
    assert "--config gives '" in err and "twice" in err and "Traceback" not in err, err


def test_version_prints_the_installed_version(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedrec --version` was an unknown option (exit 2): what a user reports a bug with."""
    from importlib.metadata import version

    from fedrec.cli import main

    monkeypatch.setattr(sys, "argv", ["fedrec", "--version", "simulate"])  # before any command
    try:
        main()
    except SystemExit as exit_:
        assert not exit_.code
    assert capsys.readouterr().out == f"fedrec {version('fedrec')}\n"


@pytest.mark.parametrize("flag", ["--export", "--output"])
def test_evaluate_model_refuses_to_write_over_the_model_it_evaluates(
    tmp_path: Path, flag: str
) -> None:
    """--export (or --output) naming the model file itself replaced the published model with
    recs.csv (or the JSON report) once it was scored: the model was lost."""
    model = tmp_path / "models" / "model-v3.int8.onnx"  # refused before the model is read
    model.parent.mkdir()
    model.write_bytes(b"the published model")
    before = model.read_bytes()
    spelled = tmp_path / "models" / ".." / "models" / model.name  # the same file, otherwise
    args = ["evaluate", "model", str(model), "--seed", "5", "--shots", "1", flag, str(spelled)]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, ConfigError), result.output
    assert f"{flag} names the model being evaluated" in str(result.exception)
    assert model.read_bytes() == before


@pytest.mark.parametrize("command", [["baselines", "--no-text"], ["model", "m.onnx"]])
def test_evaluate_refuses_a_report_over_a_fewshot_export(
    tmp_path: Path, command: list[str]
) -> None:
    """--export also writes the few-shot lists next to recs.csv: an --output naming one of
    them would have replaced that list with the JSON report once the work was done."""
    args = ["evaluate", *command, "--export", str(tmp_path / "recs.csv")]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "recs-fewshot-k3.csv")])
    assert isinstance(result.exception, ConfigError), result.output
    assert "--export and --output both name" in str(result.exception)
    assert "recs-fewshot-k3.csv" in str(result.exception)
    assert not list(tmp_path.iterdir())  # before any work


def test_a_reports_command_is_the_command_line_as_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command a report records was joined with spaces: `--run-config "k=5 seed=3"`
    was recorded as `--run-config k=5 seed=3`, which, typed again, is another command
    (seed=3 an extra argument, refused); each argument is now quoted as the shell needs."""
    import shlex

    from fedrec.commands import bandits, evaluate

    typed = ["evaluate", "baselines", "--run-config", "k=5 seed=3", "-o", "my report.json"]
    monkeypatch.setattr(sys, "argv", ["/usr/bin/fedrec", *typed])
    report: dict[str, Any] = {}
    evaluate._emit(report, tmp_path / "report.json", "json", 10)
    assert shlex.split(report["command"]) == ["fedrec", *typed]
    typed = ["-v", "bandits", "tune", "--run-config", "top-n=50 seed=3"]
    monkeypatch.setattr(sys, "argv", ["/usr/bin/fedrec", *typed])
    assert shlex.split(bandits._command_line("tune")) == ["fedrec", *typed[1:]]


# --------------------------------------------------------------------------- docs vs CLI

_ROOT = Path(__file__).resolve().parents[1]

#: `docker compose run` options that take a value (the next token is not the service).
_COMPOSE_RUN_VALUE_OPTIONS = frozenset({"-v", "--volume", "-e", "--env", "--entrypoint", "-w"})


def _documented_command_lines() -> list[tuple[str, str]]:
    """``(source, text)`` for every snippet of the docs that may hold a command: the README's
    and docs/'s fenced blocks and inline code, and the docker files' comment lines (their
    setup steps), with shell line continuations joined."""
    sources = {p.relative_to(_ROOT).as_posix(): p.read_text() for p in [_ROOT / "README.md"]}
    sources.update({f"docs/{p.name}": p.read_text() for p in sorted((_ROOT / "docs").glob("*.md"))})
    snippets: list[tuple[str, str]] = []
    for name, text in sources.items():
        fenced = re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL)
        inline = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
        snippets.extend((name, " ".join(span.split())) for span in inline)  # one line each
        for block in fenced:
            joined = re.sub(r"\\\n\s*", " ", block)
            snippets.extend((name, line) for line in joined.splitlines())
    for path in sorted((_ROOT / "docker").iterdir()):
        comments = [line.lstrip("#") for line in path.read_text().splitlines() if line[:1] == "#"]
        joined = re.sub(r"\\\n\s*", " ", "\n".join(comments))
        snippets.extend((f"docker/{path.name}", line) for line in joined.splitlines())
    return snippets


def _shell_words(text: str) -> list[str]:
    """The words of one command, up to a redirection, pipe, list operator or comment."""
    import shlex

    words: list[str] = []
    for word in shlex.split(text, comments=True):
        if word in {">", "|", "&&", ";", "||"} or word.startswith(">"):
            break
        words.append(word)
    return words


def _documented_fedrec_argvs() -> list[tuple[str, list[str]]]:
    """Every `fedrec ...` invocation the docs give, as its argv after ``fedrec``: typed out,
    or run through the images' ``fedrec`` entrypoint by ``docker compose run SERVICE ...``."""
    found: list[tuple[str, list[str]]] = []
    for source, line in _documented_command_lines():
        # `fedrec` then a command or an option (not an image tag: `-t fedrec .`)
        for match in re.finditer(r"(?:^|[\s(`])fedrec\s+([a-z-][^`]*)", line):
            found.append((source, _shell_words(match.group(1))))
        for match in re.finditer(r"\brun\s+(-.*)", line):  # docker compose run OPTIONS SERVICE
            words, i = _shell_words(match.group(1)), 0
            while i < len(words) and words[i].startswith("-"):
                if words[i] == "--entrypoint":  # another program than fedrec
                    break
                i += 2 if words[i] in _COMPOSE_RUN_VALUE_OPTIONS else 1
            else:
                found.append((source, words[i + 1 :]))
    found.extend(_docker_fedrec_argvs())
    return found


def _docker_fedrec_argvs() -> list[tuple[str, list[str]]]:
    """What the images' ``fedrec`` entrypoint runs: each Dockerfile's CMD and each compose
    service's ``command:``."""
    import yaml

    found: list[tuple[str, list[str]]] = []
    for path in sorted((_ROOT / "docker").glob("*Dockerfile")):
        cmd = re.search(r"^CMD (\[.*\])$", path.read_text(), re.MULTILINE)
        assert cmd is not None, path
        found.append((f"docker/{path.name} CMD", json.loads(cmd.group(1))))
    compose = yaml.safe_load((_ROOT / "docker" / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        found.append((f"docker/compose.yaml {name}", [str(word) for word in service["command"]]))
    return found


def _option_names(command: Any) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        names.update(getattr(param, "opts", []), getattr(param, "secondary_opts", []))
    return names


def _config_keys(path: tuple[str, ...]) -> set[str] | None:
    """The keys the ``--run-config`` / ``--config`` of `fedrec PATH` takes (``None``: not
    checked here)."""
    from client.device.config import DaemonConfig
    from fedrec.commands.evaluate import COLD_ITEM_KEYS
    from server.superlink import run_config_keys
    from shared.bandits.policies import BanditConfig
    from shared.config import field_names
    from shared.eval.baseline_benchmark import BaselineConfig
    from shared.eval.protocol import EvalConfig
    from shared.eval.splits import SplitConfig
    from simulation.config import SimulationConfig

    if path == ("simulate",):
        return field_names(SimulationConfig)
    if path == ("server", "start"):
        return set(run_config_keys())
    if path[0] == "client":
        bandit = {f"bandit-{key}" for key in field_names(BanditConfig)}
        return field_names(DaemonConfig) | bandit
    split = field_names(SplitConfig) | field_names(EvalConfig)
    if path == ("evaluate", "baselines"):
        return split | field_names(BaselineConfig)
    if path == ("evaluate", "model"):
        return split - COLD_ITEM_KEYS
    if path[0] == "bandits":  # seed and policy are refused: the evaluation sets them
        return field_names(BanditConfig) - {"seed", "policy"}
    return None


def _placeholder(word: str) -> bool:
    """A word the docs put where a value goes that stands for one (`--rounds N`, `$BUNDLE`)
    or for more of the same (`...`, the `/` of `--personal-steps / --personal-lr`)."""
    return word in {"/", "..."} or "$" in word or word.isupper()


def test_every_fedrec_command_and_option_the_docs_give_exists() -> None:
    """The README, docs/ and the docker files' setup comments spell out `fedrec` commands (the
    compose file's `command:` lists are checked in test_docker). A command, option or
    --run-config / --config key renamed in the CLI and left in the docs failed only when a
    user typed it: each is looked up here (``--[no-]x`` stands for both spellings), and a
    number or choice an option is given must be one it takes."""
    import click
    import typer

    from fedrec.options import parsed_entries

    root = typer.main.get_command(app)
    checked: list[str] = []
    for source, argv in _documented_fedrec_argvs():
        shown = f"{source}: `fedrec {' '.join(argv)}`"
        command: Any = root
        path: list[str] = []
        words = list(argv)
        while words and isinstance(command, click.Group):
            word = words.pop(0)
            if word.startswith("-"):  # the root's own options (`fedrec -v simulate`)
                assert word in _option_names(root), f"{shown}: no {word}"
            elif word in command.commands:
                command = command.commands[word]
                path.append(word)
            else:
                pytest.fail(f"{shown}: no command {word!r}")
        if isinstance(command, click.Group):
            continue  # a mention of a command group, such as `fedrec server`
        options = _option_names(command)
        for i, word in enumerate(words):
            if not word.startswith("--") and not re.fullmatch(r"-[a-zA-Z]", word):
                continue  # an argument or an option's value
            name = word.split("=", 1)[0]
            spellings = [name.replace("[no-]", ""), name.replace("[no-]", "no-")]
            for spelling in spellings if "[no-]" in name else [name]:
                assert spelling in options, f"{shown}: no {spelling}"
                checked.append(spelling)
            param = next((p for p in command.params if name in getattr(p, "opts", [])), None)
            value = words[i + 1] if i + 1 < len(words) else None
            if "=" in word:  # `--rounds=30`
                value = word.split("=", 1)[1]
            kind: Any = getattr(param, "type", None)
            numeric = isinstance(
                kind, click.types.IntParamType | click.types.FloatParamType | click.Choice
            )
            if numeric and not (
                value is None or value.startswith("-") or _placeholder(value)
            ):  # a number or a choice: the value given must be one (`--rounds ten` is not)
                try:
                    kind.convert(value, param, None)
                except click.BadParameter as exc:
                    pytest.fail(f"{shown}: {name} {value}: {exc.message}")
            keys = _config_keys(tuple(path))
            if name in {"--run-config", "--config"} and keys is not None and i + 1 < len(words):
                for key in parsed_entries([words[i + 1]], flag=name):
                    assert key in keys, f"{shown}: {name} has no key {key!r}"
                    checked.append(key)
    assert len(checked) > 80  # the docs' commands were found


@functools.cache
def _bench_options(script: Path) -> dict[str, tuple[type | None, bool]]:
    """The options a ``bench/`` script's parser declares, read from its source (importing
    the scripts would load torch and Flower): ``--name -> (int or float or None, takes
    several values)``, with the ``--no-`` spelling of a ``BooleanOptionalAction`` and the
    shared ones of :func:`simulation.pretrain.add_pretrain_arguments` where it calls it."""
    import ast

    sources = [script.read_text()]
    if "add_pretrain_arguments(" in sources[0]:
        sources.append((_ROOT / "simulation" / "pretrain.py").read_text())
    options: dict[str, tuple[type | None, bool]] = {"--help": (None, False), "-h": (None, False)}
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if not (
                isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
            ):
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            kind = {"int": int, "float": float}.get(getattr(keywords.get("type"), "id", ""))
            several = "nargs" in keywords
            negated = getattr(keywords.get("action"), "attr", "") == "BooleanOptionalAction"
            for arg in node.args:
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("-"):
                    assert isinstance(arg.value, str)
                    options[arg.value] = (kind, several)
                    if negated:
                        options["--no-" + arg.value[2:]] = (None, False)
    return options


def _shell_loop_lines(line: str) -> list[str]:
    """``for c in 10 30; do CMD $c; done`` as the commands it runs; any other line as is."""
    loop = re.fullmatch(r"\s*for (\w+) in ([^;]+); do (.*); done\s*", line)
    if loop is None:
        return [line]
    var, values, body = loop.groups()
    return [body.replace(f"${var}", value) for value in values.split()]


def test_every_bench_command_and_result_file_the_docs_give_exists() -> None:
    """The README and docs/ give the commands behind every committed benchmark result and
    name the results: a benchmark option renamed or a result file moved, and the docs sent
    readers to a flag that failed or a file that was not there. Each `python bench/X.py ...`
    must name an existing script and only options its parser declares, with a number where
    it takes one, and every `bench/results/...` file named (braces expanded, `*` globbed)
    must be committed."""
    import glob

    scripts, options_checked, files_checked = set(), 0, 0
    for source, text in _documented_command_lines():
        for line in _shell_loop_lines(text):
            for match in re.finditer(r"(?<![\w/])bench/(\w+)\.py((?:\s+[^\s`]+)*)", line):
                script = _ROOT / "bench" / f"{match.group(1)}.py"
                shown = f"{source}: `{match.group(0).strip()}`"
                assert script.is_file(), f"{shown}: no {script.relative_to(_ROOT)}"
                scripts.add(script.name)
                options = _bench_options(script)
                words = _shell_words(match.group(2))
                for i, word in enumerate(words):
                    if not word.startswith("-") or re.fullmatch(r"-[\d.]+", word):
                        continue  # an argument or an option's value
                    assert word in options, f"{shown}: {script.name} has no {word}"
                    options_checked += 1
                    kind, several = options[word]
                    values: list[str] = []
                    for value in words[i + 1 :]:
                        if value.startswith("--") or (values and not several):
                            break
                        values.append(value)
                    for value in values:
                        if kind is None:
                            break
                        try:
                            _placeholder(value) or kind(value)
                        except ValueError:
                            pytest.fail(f"{shown}: {word} takes {kind.__name__}s, not {value}")
            for named in re.findall(r"bench/results/[\w.{},*+-]+", line):
                named = named.rstrip(".,")
                for path in _brace_expanded(named):
                    assert glob.glob(str(_ROOT / path)), f"{source}: {path} is not committed"
                    files_checked += 1
    assert len(scripts) > 10 and options_checked > 150 and files_checked > 60  # all were found


def _brace_expanded(text: str) -> list[str]:
    """The shell's brace expansion: ``a-{b,c}.json`` is ``a-b.json`` and ``a-c.json``."""
    match = re.search(r"\{([^{}]*)\}", text)
    if match is None:
        return [text]
    head, tail = text[: match.start()], text[match.end() :]
    return [
        path for alt in match.group(1).split(",") for path in _brace_expanded(head + alt + tail)
    ]


def test_data_info_shows_a_path_the_locale_cannot_decode_readably(tmp_path: Path) -> None:
    """A data folder whose name is not valid in the locale's encoding (byte 0xff, e.g.
    under ``LC_ALL=C``): Python holds that byte as a lone surrogate, which ``data info``
    printed as ``?`` (C locale) or as the raw invalid byte (UTF-8). It shows ``\\xff``."""
    from tests.test_data_loaders import ml100k_dir

    try:
        folder = ml100k_dir(tmp_path / os.fsdecode(b"caf\xff"))
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    args = ["data", "info", "-d", "ml-100k", "--data-dir", str(folder)]
    table = runner.invoke(app, [*args, "--min-user-interactions", "1"])
    assert table.exit_code == 0, table.output
    assert f"from {tmp_path}/caf\\xff/u.data" in table.stdout
    assert not re.search("[\udc80-\udcff]", table.stdout)
    report = runner.invoke(app, [*args, "--min-user-interactions", "1", "--format", "json"])
    source = json.loads(report.stdout)["cleaning"]["source"]  # the path itself, for programs
    assert os.fsencode(source) == os.fsencode(folder / "u.data")


def test_client_status_shows_a_state_dir_the_locale_cannot_decode_readably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``client status``'s table starts with the state folder's path: one whose name is
    not valid in the locale's encoding (byte 0xff) ended the command in a
    UnicodeEncodeError traceback under a strict output encoding (the JSON it printed
    before escaped it), or printed it as ``?``. It shows ``\\xff``, as ``data info`` does;
    ``--format json`` is the API's answer, unchanged."""
    import io
    import urllib.request
    from types import SimpleNamespace

    import client.device.identity as identity

    try:
        state = tmp_path / os.fsdecode(b"phone\xff")
        state.mkdir()
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    answer = {"events": 3, "privacy": {"epsilon_spent": 0.5}}
    api = SimpleNamespace(url="http://127.0.0.1:1", pid=1)
    monkeypatch.setattr(identity, "running_api", lambda state_dir: api)
    token = SimpleNamespace(api_token=lambda: "t")
    monkeypatch.setattr(identity.DeviceIdentity, "load", lambda state_dir: token)
    opened = SimpleNamespace(open=lambda request, timeout: io.BytesIO(json.dumps(answer).encode()))
    monkeypatch.setattr(urllib.request, "build_opener", lambda *handlers: opened)
    table = runner.invoke(app, ["client", "status", "--state-dir", str(state)])
    assert table.exit_code == 0, table.output
    assert table.stdout.splitlines() == [
        f"device {tmp_path}/phone\\xff",
        "  events:  3",
        "  privacy:",
        "    epsilon spent: 0.5",
    ]
    report = runner.invoke(app, ["client", "status", "--state-dir", str(state), "--format", "json"])
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout) == answer


def _folder_the_locale_cannot_decode(tmp_path: Path) -> Path:
    """``caf\\xff`` (with a file ``file`` in it) under ``tmp_path``: byte 0xff is not UTF-8,
    so Python holds it as the lone surrogate ``\\udcff``."""
    try:
        folder = tmp_path / os.fsdecode(b"caf\xff")
        folder.mkdir()
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    (folder / "file").write_text("")
    return folder


def test_an_error_naming_a_path_the_locale_cannot_decode_shows_it_readably(
    tmp_path: Path,
) -> None:
    """An error naming a folder whose name is not valid in the locale's encoding printed the
    byte as ``\\udcff`` (stderr's backslashreplace), ``?`` or the raw byte, and a strict
    output encoding could end it in a UnicodeEncodeError. The one-line error shows ``\\xff``,
    as ``data info``'s table does."""
    folder = _folder_the_locale_cannot_decode(tmp_path)
    args = ["data", "info", "-d", "ml-100k", "--data-dir", str(folder)]
    proc = subprocess.run(
        [sys.executable, "-m", "fedrec.cli", *args],
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8", "NO_COLOR": "1"},
        check=False,
    )
    err = proc.stderr.decode("utf-8", "surrogateescape")
    assert proc.returncode == 2, err
    assert err.startswith("error: ml-100k: ") and len(err.strip().splitlines()) == 1, err
    assert f"{tmp_path}/caf\\xff lacks u.data" in err
    assert "\\udc" not in err and not re.search("[\udc80-\udcff]", err)
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["data", "info", "--data-dir", "{folder}"],  # quotes the path with repr: 'caf\\udcff'
        ["server", "init", "--state-dir", "{folder}/file/srv"],  # an OSError's file name
        ["data", "info", "-d", "ml-100k", "--data-dir", "{folder}/file"],  # Click's usage error
    ],
)
def test_every_error_line_shows_a_path_the_locale_cannot_decode_readably(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
) -> None:
    """The error printer escapes the byte whatever form the message holds it in: the
    surrogate itself, repr's ``\\udcff`` escape of it, an OSError's file name, or a usage
    error of Click's (``--data-dir`` naming a file)."""
    folder = _folder_the_locale_cannot_decode(tmp_path)
    code = _main(monkeypatch, *(arg.format(folder=folder) for arg in args))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    if args[-1] != "{folder}/file":  # not Click's usage error: the CLI's one-line error
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert f"{tmp_path}/caf\\xff" in err
    assert "\\udc" not in err and not re.search("[\udc80-\udcff]", err)
