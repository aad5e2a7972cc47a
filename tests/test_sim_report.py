"""Run directory and report: metrics survive a torn line, plots and markdown are written."""

import io
from pathlib import Path
from typing import Any

import pytest

from shared.errors import ConfigError
from simulation.report import write_report
from simulation.run_dir import RunDirectory


def _metrics(hr: float) -> dict[str, float]:
    return {
        "sampled_hr@10": hr,
        "sampled_ndcg@10": hr / 2,
        "full_hr@10": hr / 3,
        "full_ndcg@10": hr / 6,
        "users": 10,
    }


def test_run_directory_logs_jsonl_and_skips_a_torn_line(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    run.write_config({"rounds": 2})
    run.log("round", 1, loss=0.5, clients=3)
    run.log("round", 2, loss=0.4, clients=3)
    with run.metrics_path.open("a") as fh:
        fh.write('{"event": "round", "step": 3, "lo')  # crash mid-write
    run.close()
    records = list(run.records("round"))
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["loss"] == 0.4
    assert (run.root / "config.json").exists()
    assert any(run.tensorboard.iterdir())


def test_a_line_that_parses_but_is_no_record_is_skipped_like_a_torn_one(tmp_path: Path) -> None:
    """What a crash leaves in a file's last block can parse as JSON without being a record
    (``7``, ``[]``, ``null``): the resumed run read it back as one and failed with an
    AttributeError; the server's progress file skips such a line, and so does this."""
    run = RunDirectory(tmp_path / "run")
    run.log("round", 1, loss=0.5)
    with run.metrics_path.open("ab") as fh:
        fh.write(b"7\n[]\nnull\n")
    run.close()
    again = RunDirectory(tmp_path / "run")
    again.log("round", 2, loss=0.4)  # reads the earlier records first
    again.close()
    assert [r["step"] for r in again.records("round")] == [1, 2]


def test_a_line_of_bytes_that_are_not_utf8_spoils_only_itself(tmp_path: Path) -> None:
    """What a crash leaves in a file's last block need not be UTF-8: reading the whole file
    strictly raised UnicodeDecodeError, and the resumed run (which reads its rounds back)
    failed; the progress file of the server is read the same forgiving way."""
    run = RunDirectory(tmp_path / "run")
    run.log("round", 1, loss=0.5)
    with run.metrics_path.open("ab") as fh:
        fh.write(b'{"event": "round", "step": 2, "lo\xff\xfe')
    run.log("round", 3, loss=0.3)
    run.close()
    assert [r["step"] for r in run.records("round")] == [1, 3]


def _tensorboard_scalars(run: RunDirectory) -> dict[str, list[tuple[int, float]]]:
    """Each tag's (step, value) points as TensorBoard's loader shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.tensorboard))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tmp_path: Path) -> None:
    """A resumed process logged its pretraining again at step 0 and the rounds after the
    checkpoint it resumed from again: TensorBoard drew two points at those steps (the line
    going back). Each step is shown once now, with the values of the process that ran it."""
    first = RunDirectory(tmp_path / "run")
    first.log("pretrain", 0, seconds=9.0)
    for server_round in (1, 2, 3):  # round 3's checkpoint is lost in the crash
        first.log("round", server_round, loss=1.0 / server_round)
    first.close()
    again = RunDirectory(tmp_path / "run")
    again.log("pretrain", 0, seconds=0.5)  # the cache, this time
    again.resume_at(3)  # the newest checkpoint is round 2's
    for server_round in (3, 4):
        again.log("round", server_round, loss=0.1 * server_round)
    again.close()
    scalars = _tensorboard_scalars(again)
    assert scalars["pretrain/seconds"] == [(0, 9.0)]
    assert [s for s, _ in scalars["round/loss"]] == [1, 2, 3, 4]
    assert scalars["round/loss"][2][1] == pytest.approx(0.3)  # the rerun round's value
    # metrics.jsonl keeps every line (reports take a round's last one)
    assert [r["step"] for r in again.records("round")] == [1, 2, 3, 3, 4]


@pytest.mark.parametrize("writes_before", [0, 3])
def test_a_tensorboard_file_that_cannot_be_written_stops_tensorboard_not_the_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    writes_before: int,
) -> None:
    """On a full disk TensorBoard's writer thread failed: `fedrec simulate` ended with exit
    status 1 in two tracebacks (the thread's, 'Exception in thread Thread-1', cut off at
    exit, and the main thread's, '[Errno 28] No space left on device' naming no file).
    TensorBoard is a view of metrics.jsonl: it stops with a warning, the run goes on, and
    its thread prints nothing."""
    import errno
    import logging
    import os
    import threading

    from tensorboard.summary.writer.record_writer import RecordWriter

    printed: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", printed.append)
    real_write = RecordWriter.write
    count = {"writes": 0}

    def full(self: RecordWriter, data: bytes) -> None:
        count["writes"] += 1
        if count["writes"] > writes_before:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, data)

    monkeypatch.setattr(RecordWriter, "write", full)
    run = RunDirectory(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="simulation.run_dir"):
        for server_round in (1, 2, 3):
            run.log("round", server_round, loss=1.0 / server_round)
        run.resume_at(1)
        run.log("round", 1, loss=0.5)
    run.close()
    assert [r["step"] for r in run.records("round")] == [1, 2, 3, 1]
    warned = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(warned) == 1 and "metrics.jsonl keeps every record" in warned[0]
    assert printed == []


def test_a_kill_between_summary_and_report_leaves_no_stale_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun killed after writing summary.json kept the last run's report.md beside it,
    its figures passing for the new summary's. Now there is no report until one is written
    from the summary it stands next to."""
    import json

    from simulation import pipeline

    (tmp_path / "summary.json").write_text(json.dumps({"rounds": [], "meta": {"rounds": 1}}))
    (tmp_path / "report.md").write_text("# Federated simulation report\n\nrounds: 1\n")

    def killed(summary: dict[str, Any], out_dir: str | Path) -> Path:
        raise KeyboardInterrupt  # the process ends between the two writes

    monkeypatch.setattr(pipeline, "write_report", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.write_summary_and_report({"rounds": [], "meta": {"rounds": 2}}, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["meta"]["rounds"] == 2
    assert not (tmp_path / "report.md").exists()
    monkeypatch.undo()  # the next run writes both, the report from its summary
    summary = {"rounds": [], "meta": {"rounds": 2}, "final": {}, "fewshot": {}}
    report = pipeline.write_summary_and_report(summary, tmp_path)
    assert report == tmp_path / "report.md" and report.exists()


def test_a_run_directory_resumes_only_under_the_settings_it_was_trained_with(
    tmp_path: Path,
) -> None:
    run = RunDirectory(tmp_path / "run")
    settings = {"seed": 42, "dp": True, "rounds": 2, "backend": "ray"}
    run.claim("simulation", settings, may_change={"rounds", "backend"})
    # no round has run yet: nothing to protect, any settings may take the directory over
    run.claim("simulation", {**settings, "seed": 7}, may_change={"rounds"})
    run.claim("simulation", settings, may_change={"rounds"})
    (run.checkpoints / "round-000001.npz").write_bytes(b"x")

    resumable = {"rounds", "backend"}
    run.claim("simulation", {**settings, "rounds": 5, "backend": "inprocess"}, resumable)
    stored = run.stored_config()
    assert stored is not None and stored["simulation"]["rounds"] == 5
    with pytest.raises(ConfigError) as err:
        run.claim("simulation", {**settings, "seed": 1, "dp": False}, {"rounds", "backend"})
    assert "seed 42 -> 1" in str(err.value) and "dp True -> False" in str(err.value)
    # a setting only one side knows (added or removed by an upgrade) does not block a resume
    run.claim("simulation", {**settings, "new-knob": 2.0}, resumable)
    with pytest.raises(ConfigError, match="seed 42 -> 7"):
        run.claim("simulation", {**settings, "new-knob": 2.0, "seed": 7}, resumable)
    stored = run.stored_config()
    assert stored is not None and stored["simulation"]["seed"] == 42  # the refusal kept it


@pytest.mark.parametrize("config", [None, "{}", '{"simulation": [1]}'])
def test_a_run_with_progress_but_no_recorded_settings_is_not_resumed(
    tmp_path: Path, config: str | None
) -> None:
    """With its config.json gone (or without its settings), a run directory's checkpoints
    and ledgers were resumed under whatever settings the rerun gave (another seed, no DP):
    nothing was left to compare them with. It is refused, saying why."""
    run = RunDirectory(tmp_path / "run")
    (run.checkpoints / "round-00000001.npz").write_bytes(b"x")
    if config is not None:
        (run.root / "config.json").write_text(config)
    with pytest.raises(ConfigError, match="not the settings they were trained with"):
        run.claim("simulation", {"seed": 7, "dp": False}, may_change={"rounds"})
    assert (run.root / "config.json").exists() == (config is not None)  # left as it was


def test_a_setting_an_older_run_did_not_record_is_compared_with_its_default(
    tmp_path: Path,
) -> None:
    run = RunDirectory(tmp_path / "run")
    older = {"seed": 42, "rounds": 2}  # written before the text-model setting existed
    run.claim("simulation", older, may_change={"rounds"})
    (run.checkpoints / "round-000001.npz").write_bytes(b"x")
    defaults = {"seed": 42, "rounds": 10, "text-model": ""}
    with pytest.raises(ConfigError, match="text-model '' -> '/my/lm'"):
        run.claim("simulation", {**older, "text-model": "/my/lm"}, {"rounds"}, defaults)
    run.claim("simulation", {**older, "text-model": ""}, {"rounds"}, defaults)  # it ran so
    stored = run.stored_config()
    assert stored is not None and stored["simulation"]["text-model"] == ""


def test_a_run_that_stored_another_spelling_of_its_dataset_resumes(tmp_path: Path) -> None:
    """Runs written before dataset names were made canonical stored 'ML-100K'; the same
    command (now read as 'ml-100k') was refused as a run with other settings."""
    from shared.data.registry import dataset_key

    run = RunDirectory(tmp_path / "run")
    run.claim("simulation", {"dataset": "ML-100K", "seed": 42}, may_change=())
    (run.checkpoints / "round-000001.npz").write_bytes(b"x")
    canonical = {"dataset": dataset_key}
    run.claim("simulation", {"dataset": "ml-100k", "seed": 42}, (), None, canonical)
    with pytest.raises(ConfigError, match="dataset 'ml-100k' -> 'ml-1m'"):
        run.claim("simulation", {"dataset": "ml-1m", "seed": 42}, (), None, canonical)


def test_a_run_without_progress_leaves_nothing_behind(tmp_path: Path) -> None:
    fresh = RunDirectory(tmp_path / "runs" / "fresh")
    fresh.write_config({"simulation": {}})
    fresh.log("pretrain", 0, seconds=1.0)
    assert fresh.discard_if_empty() and not (tmp_path / "runs").exists()

    trained = RunDirectory(tmp_path / "trained")
    (trained.root / "clients" / "client-0").mkdir(parents=True)  # a device's ledger lives here
    assert not trained.discard_if_empty() and trained.root.exists()
    trained.close()

    # a folder that was there before: only what the run added goes, the user's files stay
    old = tmp_path / "old"
    (old / "plots").mkdir(parents=True)
    (old / "plots" / "mine.png").write_bytes(b"png")
    (old / "notes.txt").write_text("mine")
    existing = RunDirectory(old)
    existing.write_config({"simulation": {}})
    existing.log("pretrain", 0, seconds=1.0)
    (old / "bundle.pt").write_bytes(b"every federated user's sequences")
    assert existing.discard_if_empty()
    assert sorted(p.relative_to(old).as_posix() for p in old.rglob("*")) == [
        "notes.txt",
        "plots",
        "plots/mine.png",
    ]


def test_a_run_directory_with_an_unreadable_config_is_refused(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    (run.root / "config.json").write_text("{torn")
    with pytest.raises(ConfigError, match="--name"):
        run.claim("simulation", {"seed": 1}, may_change=())


def test_report_writes_markdown_and_plots(tmp_path: Path) -> None:
    n = {"level": 0.95, "users": 40}  # as PairedDifference.as_dict writes them
    summary = {
        "meta": {"dataset": "synthetic", "rounds": 2},
        "rounds": [
            {
                "round": 1,
                "valid_sampled_hr@10": 0.3,
                "valid_full_hr@10": 0.1,
                "epsilon_record": 1.0,
                "epsilon_user": None,
            },
            {
                "round": 2,
                "valid_sampled_hr@10": 0.4,
                "valid_full_hr@10": 0.12,
                "epsilon_record": 1.5,
                "epsilon_user": None,
            },
        ],
        "final": {"ease": {"federated": _metrics(0.6)}, "student": {"federated": _metrics(0.7)}},
        "fewshot": {"student": {"k=1": _metrics(0.5), "k=3": _metrics(0.6)}},
        "paired": {
            "federated": {
                "student - ease": {
                    "sampled_hr@10": {"mean": 0.03, "low": 0.001, "high": 0.06, **n},
                    "full_hr@10": {"mean": -0.01, "low": -0.04, "high": 0.02, **n},
                }
            },
            "fewshot k=1": {
                "student - ease": {
                    "sampled_hr@10": {"mean": -0.05, "low": -0.09, "high": -0.01, **n},
                    "full_hr@10": {"mean": 0.0, "low": 0.0, "high": 0.0, **n},
                }
            },
        },
    }
    path = write_report(summary, tmp_path)
    text = path.read_text()
    assert "| student | federated | 0.7000" in text
    assert (
        "| federated | student - ease | +0.030 [+0.001, +0.060], A better | "
        "-0.010 [-0.040, +0.020], within noise |" in text
    )
    assert "| fewshot k=1 | student - ease | -0.050 [-0.090, -0.010], B better |" in text
    # few-shot is reported as PROTOCOL.md has it: HR and NDCG, sampled and full (NDCG was
    # only in summary.json)
    assert (
        "| model | K | users | sampled HR@10 | sampled NDCG@10 | full HR@10 | full NDCG@10 |"
        in text.split("## Few-shot")[1]
    )
    assert "| student | k=1 | 10 | 0.5000 | 0.2500 | 0.1667 | 0.0833 |" in text
    # the round table says what its columns are (the max-client epsilon was read as a mean)
    assert "- `epsilon_record`: record-level epsilon, the most any client has spent" in text
    assert "`clients_ok`" not in text  # only the columns the table has
    for name in ("accuracy_per_round", "epsilon_per_round", "fewshot_vs_k", "comparison"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert f"plots/{name}.png" in text


def test_a_k_no_cold_user_reaches_is_reported_as_no_figure_not_as_zero(tmp_path: Path) -> None:
    """A K larger than every cold user's history was shown as HR@10 0.0000 for 0 users and
    plotted as a fall to 0; a report where no K has a user embedded an empty plot."""
    none = {**_metrics(0.0), "users": 0}
    summary = {
        "meta": {"dataset": "synthetic", "rounds": 1},
        "rounds": [{"round": 1, "valid_sampled_hr@10": 0.3, "epsilon_record": None}],
        "final": {"student": {"federated": _metrics(0.7)}},
        "fewshot": {"student": {"k=1": _metrics(0.5), "k=500": none}, "pop": {"k=500": none}},
    }
    text = write_report(summary, tmp_path / "a").read_text()
    assert "| student | k=1 | 10 | 0.5000 |" in text
    assert (
        "| student | k=500 | 0 | n/a (no user) | n/a (no user) | n/a (no user) | n/a (no user) |"
        in text
    )
    assert "0.0000" not in text.split("Few-shot")[1].split("\n\n")[1]
    assert (tmp_path / "a" / "plots" / "fewshot_vs_k.png").exists()  # student's k=1
    summary["fewshot"] = {"pop": {"k=500": none}}
    text = write_report(summary, tmp_path / "b").read_text()
    assert not (tmp_path / "b" / "plots" / "fewshot_vs_k.png").exists()
    assert "fewshot_vs_k.png" not in text


def test_one_run_uses_a_run_directory_at_a_time(tmp_path: Path) -> None:
    """Two runs in one folder interleaved their metrics.jsonl and overwrote each other's
    checkpoints; the second is refused (naming the first's pid) until the first ends."""
    import os
    import subprocess
    import sys

    first = RunDirectory(tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()}\)"):
        RunDirectory(tmp_path / "run")
    other = [sys.executable, "-c", "from simulation.run_dir import RunDirectory as R; R('run')"]
    busy = subprocess.run(other, cwd=tmp_path, capture_output=True, text=True)
    assert busy.returncode != 0 and "in use by another run" in busy.stderr
    first.close()
    RunDirectory(tmp_path / "run").close()


def test_default_run_names_started_in_one_second_do_not_collide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simulation import pipeline
    from simulation.config import SimulationConfig

    monkeypatch.setattr(pipeline.time, "strftime", lambda fmt: "synthetic-20261129-120000")
    config = SimulationConfig(run_dir=str(tmp_path))
    first = pipeline._run_root(config)
    first.mkdir()
    second = pipeline._run_root(config)
    assert (first.name, second.name) == ("synthetic-20261129-120000", "synthetic-20261129-120000-2")
    assert pipeline._run_root(SimulationConfig(run_dir=str(tmp_path), name="x")).name == "x"


def test_unnamed_runs_started_together_each_get_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three `fedrec simulate` started with `&` in one second all found the `dataset-time`
    folder free; the one that lost the race for its lock was refused as "in use by another
    run ... pass another --name", for a name it never gave. It takes the next folder."""
    from simulation import pipeline
    from simulation.config import SimulationConfig

    monkeypatch.setattr(pipeline.time, "strftime", lambda fmt: "synthetic-20261129-120000")
    config = SimulationConfig(run_dir=str(tmp_path))
    taken = RunDirectory(pipeline._run_root(config))  # the other run, started together
    looked = iter([taken.root])  # what this run's _run_root saw before the other took it
    real_root = pipeline._run_root
    monkeypatch.setattr(pipeline, "_run_root", lambda c: next(looked, None) or real_root(c))
    monkeypatch.setattr(pipeline, "_run_stages", lambda c, run, *rest: {"root": run.root})
    try:
        summary = pipeline.run_pipeline(config)
    finally:
        taken.close()
    assert summary["root"].name == "synthetic-20261129-120000-2"
    named = SimulationConfig(run_dir=str(tmp_path), name=taken.root.name)
    holder = RunDirectory(taken.root)  # a run given a name still waits for its folder
    try:
        with pytest.raises(ConfigError, match="in use by another run"):
            pipeline.run_pipeline(named)
    finally:
        holder.close()


def test_a_data_dir_spelled_otherwise_resumes_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--data-dir data/` and the same folder given as `./data` or absolute were refused as
    a run with other settings: the path was compared as text."""
    from simulation.config import SimulationConfig, data_dir_key

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "other").mkdir()
    given = SimulationConfig(dataset="ml-100k", data_dir="data/")
    assert given.data_dir == SimulationConfig(dataset="ml-100k", data_dir="./data").data_dir
    assert given.data_dir == str(tmp_path / "data")
    run = RunDirectory(tmp_path / "run")
    run.claim("simulation", {"data-dir": "./data", "seed": 1}, {"rounds"})  # as stored before
    (run.checkpoints / "round-000001.npz").write_bytes(b"x")
    canonical = {"data-dir": data_dir_key}
    run.claim("simulation", {"data-dir": given.data_dir, "seed": 1}, {"rounds"}, None, canonical)
    other = SimulationConfig(dataset="ml-100k", data_dir="other").data_dir
    with pytest.raises(ConfigError, match="data-dir"):
        run.claim("simulation", {"data-dir": other, "seed": 1}, {"rounds"}, None, canonical)


def test_a_plot_the_summary_no_longer_has_is_removed(tmp_path: Path) -> None:
    """A resumed run may change ``shots`` (an evaluation setting): when no cold user reaches
    the new K, the few-shot plot of the earlier process stayed in plots/, showing figures
    this run's summary and report do not have."""
    summary = {
        "meta": {"dataset": "synthetic", "rounds": 1},
        "rounds": [{"round": 1, "valid_sampled_hr@10": 0.3, "epsilon_record": None}],
        "final": {"student": {"federated": _metrics(0.7)}},
        "fewshot": {"student": {"k=1": _metrics(0.5)}},
    }
    write_report(summary, tmp_path)
    assert (tmp_path / "plots" / "fewshot_vs_k.png").exists()
    summary["fewshot"] = {"student": {"k=500": {**_metrics(0.0), "users": 0}}}
    text = write_report(summary, tmp_path).read_text()
    assert "fewshot_vs_k.png" not in text
    assert not (tmp_path / "plots" / "fewshot_vs_k.png").exists()
    assert (tmp_path / "plots" / "accuracy_per_round.png").exists()


def test_a_plot_interrupted_while_written_leaves_the_earlier_one_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed while saving a plot (a resumed run rewrites them all) left a truncated
    PNG that the earlier report.md links; plots are replaced atomically, as the report is."""
    from matplotlib.figure import Figure

    summary = {
        "meta": {"dataset": "synthetic", "rounds": 1},
        "rounds": [{"round": 1, "valid_sampled_hr@10": 0.3, "epsilon_record": None}],
        "final": {"student": {"federated": _metrics(0.7)}},
    }
    write_report(summary, tmp_path)
    png = tmp_path / "plots" / "accuracy_per_round.png"  # the first one saved
    before = png.read_bytes()
    save = Figure.savefig

    def killed(self: Figure, fname: Any, **kwargs: Any) -> None:
        buf = io.BytesIO()
        save(self, buf, **kwargs)
        data = buf.getvalue()[:20]  # the first bytes are out when the process dies
        if isinstance(fname, str | Path):
            Path(fname).write_bytes(data)
        else:
            fname.write(data)
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", killed)
    with pytest.raises(KeyboardInterrupt):
        write_report(summary, tmp_path)
    assert png.read_bytes() == before


def test_the_epsilon_plot_names_the_delta_of_each_epsilon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An epsilon means nothing without its delta: the round table named it, but the
    epsilon plot's legend said only "record-level" / "user-level", so the picture alone
    (what a slide or an issue shows) gave no guarantee at all."""
    import simulation.report

    legends: dict[str, list[str]] = {}
    save = simulation.report._save

    def keep_legend(fig: Any, path: Path) -> None:
        legend = fig.axes[0].get_legend()
        legends[path.name] = [t.get_text() for t in legend.get_texts()] if legend else []
        save(fig, path)

    monkeypatch.setattr(simulation.report, "_save", keep_legend)
    rounds = [
        {"round": 1, "epsilon_record": 1.0, "epsilon_record_mean": 0.5, "epsilon_user": 2.0},
        {"round": 2, "epsilon_record": 1.5, "epsilon_record_mean": 0.7, "epsilon_user": 2.5},
    ]
    summary = {
        "meta": {"dataset": "synthetic", "delta": 1e-5, "user-level delta": 0.002},
        "rounds": rounds,
    }
    write_report(summary, tmp_path / "a")
    assert legends["epsilon_per_round.png"] == [
        "record-level, max over clients, at delta 1e-05",
        "record-level, mean over clients, at delta 1e-05",
        "user-level, at delta 0.002",
    ]
    # a summary written before the deltas were recorded: the labels as they were
    summary["meta"] = {"dataset": "synthetic"}
    write_report(summary, tmp_path / "b")
    assert legends["epsilon_per_round.png"][0] == "record-level, max over clients"


def test_tensorboard_logs_are_not_writable_by_other_users_under_umask_000(
    tmp_path: Path,
) -> None:
    """SummaryWriter made its folder with os.makedirs and its event file with open: 0777
    and 0666 under ``umask 000``, where the run's other folders are at most 0775 and its
    metrics log 0664 (any local user could replace or rewrite the run's curves)."""
    import os
    import stat

    old = os.umask(0o000)
    try:
        run = RunDirectory(tmp_path / "run")
        run.log("round", 1, loss=0.5)
        run.close()
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.root.rglob("*")}
    assert {name for name, mode in modes.items() if mode & 0o002} == set(), modes
    assert modes["tensorboard"] == stat.S_IMODE(run.root.stat().st_mode) == 0o775
    events = [m for name, m in modes.items() if name.startswith("events.out.tfevents.")]
    assert events == [0o664]
