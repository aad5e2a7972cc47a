"""`fedrec simulate` end to end on a tiny synthetic world (in-process runtime): every stage
runs, the run directory holds what the README promises, and a rerun resumes."""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedrec.cli import app
from shared.errors import ConfigError, DataError
from shared.eval.metrics import hit_rate_at_k
from shared.io import write_json_atomic
from simulation import pipeline
from simulation.pipeline import ClientEpsilons, _save_ranks, load_ranks, run_ranks

TINY = (
    "synthetic-users=150 synthetic-items=80 teacher-epochs=1 student-epochs=1 eval-size=5 shots=1,3"
)


def test_simulate_tiny_world_end_to_end_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [
        "simulate",
        "--backend",
        "inprocess",
        "--rounds",
        "2",
        "--cohort-size",
        "6",
        "--run-dir",
        str(tmp_path),
        "--name",
        "tiny",
        "--run-config",
        f"{TINY} eval-negatives=19",  # the per-round evaluation's, not the final one's
        "--format",
        "json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # evaluation (minutes on ml-100k) says which model it is on
    said = [line.split(" ", 1)[1] for line in result.stderr.splitlines() if line[:1].isdigit()]
    for model in ("teacher", "student (federated + personal)", "few-shot student (adapted)"):
        assert f"evaluate: {model}" in said, said
    run = tmp_path / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["clients_ok"] + r["clients_declined"] == 6 for r in summary["rounds"])
    assert summary["rounds"][-1]["epsilon_record"] > 0
    # the report names the settings of the mechanisms that ran, and only those
    meta = summary["meta"]
    assert meta["noise multiplier"] > 0 and meta["max grad norm"] > 0
    assert "user-level noise multiplier" not in meta
    final = summary["final"]
    for model in ("ease (all)", "teacher", "student (federated)", "student int8 onnx"):
        assert 0 <= final[model]["federated"]["sampled_hr@10"] <= 1
    assert set(summary["fewshot"]["student (adapted)"]) == {"k=1", "k=3"}
    # `fedrec evaluate model` on the published model reproduces the run's figures at the
    # run's K (it scored K 5 and 10 too, the command's own default); --shots still chooses
    published = ["evaluate", "model", str(run / "models" / "model-v2.int8.onnx")]
    evaluated = CliRunner().invoke(app, [*published, "--format", "json"])
    assert evaluated.exit_code == 0, evaluated.output
    (entry,) = json.loads(evaluated.stdout)["results"].values()
    assert set(entry["fewshot"]) == {"k=1", "k=3"}
    assert "K 1 3 (the run's shots)" in evaluated.stderr
    for population in ("public", "federated"):
        assert entry["loo"][population] == final["student int8 onnx"][population], population
    asked = CliRunner().invoke(app, [*published, "--shots", "5", "--format", "json"])
    assert asked.exit_code == 0, asked.output
    (entry,) = json.loads(asked.stdout)["results"].values()
    assert set(entry["fewshot"]) == {"k=5"}
    assert summary["artifact"]["int8_bytes"] < summary["artifact"]["fp32_bytes"]
    assert (run / "report.md").read_text().startswith("# Federated simulation report")
    for png in ("accuracy_per_round", "epsilon_per_round", "fewshot_vs_k", "comparison"):
        assert (run / "plots" / f"{png}.png").exists()
    assert any((run / "tensorboard").iterdir())
    assert len(list((run / "checkpoints").glob("round-*.npz"))) == 2
    # the deployable bundle is the model alone, readable by a container's user; the
    # simulation's own holds the virtual clients' data and stays its owner's
    import stat

    from shared.federated.bundle import load_bundle

    deployable, simulated = load_bundle(run / "deploy-bundle.pt"), load_bundle(run / "bundle.pt")
    assert deployable.clients is None and simulated.clients is not None
    assert deployable.item_ids == simulated.item_ids
    # both record the data and split pretrained on, and so does the published model
    from shared.data.provenance import DataProvenance
    from shared.ondevice.runtime import OnDeviceModel

    recorded = (deployable.trained_on, simulated.trained_on)
    # with the data's content fingerprint, which the run's config.json records too
    content = json.loads((run / "config.json").read_text())["data"]["fingerprint"]
    world = DataProvenance(
        "synthetic", 42, 0.1, 0.2, synthetic_users=150, synthetic_items=80, data_fingerprint=content
    )
    assert recorded == (world,) * 2
    assert OnDeviceModel(run / "models" / "model-v2.int8.onnx").metadata.trained_on == recorded[0]
    assert stat.S_IMODE((run / "deploy-bundle.pt").stat().st_mode) == 0o644
    assert stat.S_IMODE((run / "bundle.pt").stat().st_mode) == 0o600
    ledgers = list((run / "clients").glob("client-*/ledger.json"))
    assert ledgers
    # every case's rank is kept, so runs can be compared user by user; it matches the summary
    ranks = load_ranks(run / "ranks.npz")
    int8 = ranks["federated/student int8 onnx"]
    # with each case's user (pooled splits resample users), as a file without them gets
    # from the run's split
    older = {key: replace(r, users=None) for key, r in ranks.items()}
    _save_ranks(run / "ranks-older.npz", older)
    (run / "ranks.npz").rename(run / "ranks-new.npz")
    (run / "ranks-older.npz").rename(run / "ranks.npz")
    rebuilt = run_ranks(run)
    (run / "ranks-new.npz").replace(run / "ranks.npz")
    assert set(rebuilt) == set(ranks)
    for key, r in ranks.items():
        assert r.users is not None and len(r.users) == len(r.sampled), key
        np.testing.assert_array_equal(rebuilt[key].users, r.users)  # type: ignore[arg-type]
    assert len(int8.full) == final["student int8 onnx"]["federated"]["users"]
    assert hit_rate_at_k(int8.full) == final["student int8 onnx"]["federated"]["full_hr@10"]
    adapted = ranks["fewshot k=3/student (adapted)"]
    assert (
        hit_rate_at_k(adapted.sampled)
        == (summary["fewshot"]["student (adapted)"]["k=3"]["sampled_hr@10"])
    )
    assert "fewshot k=1/ease fold-in" in ranks
    # a benchmark re-evaluating the finished run rebuilds the very model it evaluated
    from shared.eval.protocol import EvalConfig, case_ranks, fewshot_cases
    from simulation.pipeline import AdaptedStudent, load_finished_run

    finished = load_finished_run(run)
    assert finished.server_round == 2
    cfg = finished.config
    again_adapted = AdaptedStudent(
        finished.model, cfg.adapt_steps, cfg.adapt_lr, finished.adapter_init, cfg.exclude_seen
    )
    redone = case_ranks(again_adapted, fewshot_cases(finished.split, 3), EvalConfig(seed=cfg.seed))
    np.testing.assert_array_equal(redone.full, adapted.full)
    np.testing.assert_array_equal(redone.sampled, adapted.sampled)
    with pytest.raises(DataError, match="not a `fedrec simulate` run directory"):
        load_finished_run(tmp_path)
    # and anyone can recompute the device model's full-ranking HR@10 from recs.csv
    from shared.config import from_flat, parse_run_config
    from simulation.config import SimulationConfig
    from simulation.pipeline import load_split

    dataset, split = load_split(from_flat(SimulationConfig, parse_run_config(TINY)))

    def full_hr_from(recs: Path, population: str = "federated") -> float:
        listed: dict[tuple[str, str], int] = {}
        for line in recs.read_text().splitlines()[1:]:
            user, item, rank = line.split(",")
            listed[(user, item)] = int(rank)
        users = split.evaluable(split.population(population))
        hits = [
            listed.get((dataset.user_ids[u], dataset.item_ids[split.test[u]]), 999) <= 10
            for u in users
        ]
        return sum(hits) / len(hits)

    # a device installs the published model with the catalog written next to it
    catalog = json.loads((run / "models" / "catalog.json").read_text())
    assert catalog == list(dataset.item_ids)
    expected = final["student int8 onnx"]["federated"]["full_hr@10"]
    assert full_hr_from(run / "recs.csv") == pytest.approx(expected, abs=1e-12)
    assert not list(run.glob("recs-*.csv"))  # only the device model's by default
    # the report says which differences are beyond the noise of this many users
    paired = summary["paired"]
    assert set(paired) == {"federated", "fewshot k=1", "fewshot k=3"}
    fed = paired["federated"]["student (federated) - student (pretrained)"]["full_hr@10"]
    assert fed["users"] == final["student (federated)"]["federated"]["users"]
    assert fed["mean"] == pytest.approx(
        final["student (federated)"]["federated"]["full_hr@10"]
        - final["student (pretrained)"]["federated"]["full_hr@10"]
    )
    assert fed["low"] <= fed["mean"] <= fed["high"]
    assert "student (adapted) - ease fold-in" in paired["fewshot k=3"]
    assert "## Paired differences" in (run / "report.md").read_text()

    # A rerun of the same run directory resumes from the checkpoint: no round is repeated.
    # It may export other models' top 100 (an output setting), each matching its figures.
    # Its pretraining may come out another student (the cache not found, e.g. another
    # cache-dir, and trained again with another thread count): it continues from its own.
    import simulation.pipeline as pipeline

    started_from = load_bundle(run / "bundle.pt").student.state_dict()
    pretrain = pipeline.pretrain

    def elsewhere(*a: Any, **kw: Any) -> Any:
        pre = pretrain(*a, **kw)
        ids = pre.student.model.items.ids.weight  # a frozen table: no checkpoint holds it
        ids.data = ids.data.flip(0)
        return pre

    monkeypatch.setattr(pipeline, "pretrain", elsewhere)
    exports = ["--export-recs", "teacher", "--export-recs", "student-personal"]
    exports += ["--export-recs", "student-adapted"]
    again = CliRunner().invoke(app, [*args, *exports])
    assert again.exit_code == 0, again.output
    monkeypatch.undo()
    summary2 = json.loads((run / "summary.json").read_text())
    for path in ("bundle.pt", "deploy-bundle.pt"):
        kept = load_bundle(run / path).student.state_dict()
        assert all(torch.equal(kept[k], v) for k, v in started_from.items()), path
    for model in ("student (pretrained)", "student (federated)"):
        assert summary2["final"][model] == summary["final"][model], model
    for name, model in (
        ("teacher", "teacher"),
        ("student-personal", "student (federated + personal)"),
    ):
        for population in ("public", "federated"):
            figure = summary2["final"][model][population]["full_hr@10"]
            assert full_hr_from(run / f"recs-{name}.csv", population) == pytest.approx(figure)
    assert not (run / "recs.csv").exists()  # not asked for: the older model's list is gone
    # the adapted student has few-shot figures only: one file per K, support set scored
    assert not (run / "recs-student-adapted.csv").exists()
    for k in (1, 3):
        listed = {}
        for line in (run / f"recs-student-adapted-fewshot-k{k}.csv").read_text().splitlines()[1:]:
            user, item, rank = line.split(",")
            listed[(user, item)] = int(rank)
        seqs = [split.full_sequences[int(u)] for u in split.cold_users]
        hits = [
            listed.get((dataset.user_ids[u], dataset.item_ids[seq[k]]), 999) <= 10
            for u, seq in zip(split.cold_users, seqs, strict=True)
            if len(seq) > k
        ]
        figure = summary2["fewshot"]["student (adapted)"][f"k={k}"]
        assert len(hits) == figure["users"]
        assert sum(hits) / len(hits) == pytest.approx(figure["full_hr@10"], abs=1e-12)
    assert [r["round"] for r in summary2["rounds"]] == [1, 2]
    assert summary2["meta"]["pretraining cached"] is True
    # its time is the whole run's: the first process's federation counts too
    assert (summary["meta"]["processes"], summary2["meta"]["processes"]) == (1, 2)
    first = summary["rounds"][-1]["elapsed_seconds"]
    assert summary["meta"]["federation seconds"] >= first - 0.05
    assert summary2["meta"]["federation seconds"] >= first - 0.05
    assert summary2["meta"]["total seconds"] > first
    # its throughput is that of the logged rounds, not of a process that trained none
    assert summary2["meta"]["client updates per second"] > 0
    # 'auto' chose a reading on validation; the cache remembers which
    assert summary["meta"]["teacher order"] in ("sequence", "set")
    assert summary2["meta"]["teacher order"] == summary["meta"]["teacher order"]
    # a rerun asking for fewer rounds than the run trained reports (and publishes) what was
    # trained: it used to say 1 round and write the round-2 model as model-v1
    fewer = [*args[:4], "1", *args[5:]]
    assert CliRunner().invoke(app, fewer).exit_code == 0
    summary3 = json.loads((run / "summary.json").read_text())
    assert (summary3["meta"]["rounds"], summary3["meta"]["rounds requested"]) == (2, 1)
    assert summary3["artifact"]["path"].endswith("model-v2.int8.onnx")
    assert (run / "recs.csv").exists() and not list(run.glob("recs-*.csv"))  # the default

    # ... but not under other settings: those checkpoints and ledgers were trained with DP
    other = CliRunner().invoke(app, [*args, "--no-dp"])
    assert other.exit_code != 0
    message = str(other.exception)
    assert "holds a run with other settings" in message and "dp True -> False" in message
    assert "--name" in message
    assert len(list((run / "checkpoints").glob("round-*.npz"))) == 2
    assert json.loads((run / "config.json").read_text())["simulation"]["dp"] is True


def test_simulate_refuses_more_gpu_per_client_than_the_machine_has(tmp_path: Path) -> None:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    args = ["simulate", "--num-gpus-per-client", str(gpus + 1), "--run-dir", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert f"this machine has {gpus} CUDA GPU(s)" in str(result.exception)
    assert not any(tmp_path.iterdir())


def test_an_unreachable_ray_address_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was reported clearly, but only after the data, the text encoding and pretraining."""
    import socket

    import simulation.pipeline

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed

    def no_data(*args: Any) -> Any:
        raise AssertionError("the data was loaded before the Ray address was checked")

    monkeypatch.setattr(simulation.pipeline, "load_split", no_data)
    args = ["simulate", "--ray-address", f"127.0.0.1:{port}", "--run-dir", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in str(result.exception)
    assert not any(tmp_path.iterdir())  # nothing left behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_this_process_lacks_is_refused_for_pretraining_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pretraining runs in this process and trains on ``device``. Under Ray only the
    setting's form is checked (the clients see their GPU shares on the cluster), so a CUDA
    device this process lacks would have failed only after the data and the text encoding."""
    import server.server_app
    import simulation.pipeline

    def no_data(*args: Any) -> Any:
        raise AssertionError("the data was loaded before the pretraining device was checked")

    monkeypatch.setattr(server.server_app, "check_ray_reachable", lambda *args: None)
    monkeypatch.setattr(simulation.pipeline, "load_split", no_data)
    args = ["simulate", "--ray-address", "127.0.0.1:6379", "--num-gpus-per-client", "0.5"]
    result = CliRunner().invoke(app, [*args, "--device", "cuda", "--run-dir", str(tmp_path)])
    assert result.exit_code != 0
    message = str(result.exception)
    assert message.startswith("pretraining runs in this process: device 'cuda' asked for CUDA")
    assert "use device=auto" in message
    assert not any(tmp_path.iterdir())  # nothing left behind


def test_the_item_text_is_encoded_on_the_pretraining_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The language model encoded the item text on the CPU whatever ``device`` said, while
    the teacher and the distillation after it trained on the resolved device."""
    import simulation.pipeline

    class Encoded(Exception):
        pass

    seen: list[str] = []

    def encode(texts: Any, config: Any) -> Any:
        seen.append(config.device)
        raise Encoded

    monkeypatch.setattr(simulation.pipeline, "_pretrain_device", lambda config: "cuda:1")
    monkeypatch.setattr(simulation.pipeline, "encode_items", encode)
    args = ["simulate", "--backend", "inprocess", "--run-dir", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--run-config", TINY])
    assert isinstance(result.exception, Encoded), result.output
    assert seen == ["cuda:1"]


def test_every_setting_is_a_flag_listed_under_its_topic(
    tmp_path: Path, captured_pipeline: Any
) -> None:
    import dataclasses

    from simulation.config import SimulationConfig
    from simulation.config_help import SETTINGS_HELP

    fields = [f.name for f in dataclasses.fields(SimulationConfig)]
    documented = [name for topic in SETTINGS_HELP.values() for name in topic]
    assert sorted(documented) == sorted(fields)  # each setting once, none missing
    shown = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "250"}).output
    for name in fields:
        assert f"--{name.replace('_', '-')} " in shown, name
    assert "User-level DP (server noise)" in shown

    seen: list[SimulationConfig] = captured_pipeline.seen
    Stop = captured_pipeline.Stop
    args = ["simulate", "--run-dir", str(tmp_path), "--adapt-lr", "0.01", "--shots", "1"]
    args += ["--shots", "5", "--no-exclude-seen", "--teacher-prior", "--server-optimizer", "adam"]
    args += ["--run-config", "adapt-lr=0.5 batch-size=32 exclude-seen=true"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, Stop), result.output
    (config,) = seen
    expected = dataclasses.replace(
        SimulationConfig(run_dir=str(tmp_path)),
        adapt_lr=0.01,  # the flag wins over --run-config
        shots=(1, 5),
        exclude_seen=False,
        teacher_prior=True,
        server_optimizer="adam",
        batch_size=32,  # from --run-config
    )
    assert config == expected
    seen.clear()  # --run-config may be repeated: the entries add up, a repeated key is refused
    args = ["simulate", "--run-dir", str(tmp_path), "--run-config", "batch-size=32"]
    result = CliRunner().invoke(app, [*args, "--run-config", "lr=0.5 exclude-seen=false"])
    assert isinstance(result.exception, Stop), result.output
    assert (seen[0].batch_size, seen[0].lr, seen[0].exclude_seen) == (32, 0.5, False)
    twice = CliRunner().invoke(app, [*args, "--run-config", "batch-size=64"])
    assert "'batch-size' is given twice" in str(twice.exception)
    assert len(seen) == 1
    both = CliRunner().invoke(app, [*args, "--run-config", "batch_size=64"])
    assert "gives 'batch-size' twice (batch-size and batch_size)" in str(both.exception)
    refused = CliRunner().invoke(app, ["simulate", "--run-dir", str(tmp_path), "--adapt-lr", "-1"])
    assert "adapt-lr must be a positive number, got -1.0" in str(refused.exception)
    assert len(seen) == 1  # refused before the pipeline
    # a flag wins over a snake_case --run-config key too (it was refused as given twice)
    snake = ["simulate", "--run-dir", str(tmp_path), "--run-config", "cohort_size=3"]
    result = CliRunner().invoke(app, [*snake, "--cohort-size", "4"])
    assert isinstance(result.exception, Stop), result.output
    assert seen[-1].cohort_size == 4


def test_simulate_rejects_bad_config(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["simulate", "--rounds", "0", "--run-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "rounds must be between 1 and 1,000,000, got 0" in str(result.exception or result.output)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--run-config", "epsilon-budget=0"], "epsilon must be a finite number > 0"),
        (["--run-config", "user-dp=true user-dp-clip=0"], "'user-dp-clip' must be > 0"),
        (["--run-config", "secagg-reconstruction-threshold=10"], "must be < secagg-num-shares"),
        (["--name", "../elsewhere"], "inside run-dir) becomes a file"),
        (["--data-dir", "/some/copy"], "add --dataset"),
        (["--run-config", "max-grad-norm=inf"], "max-grad-norm must be finite with DP on"),
        (["--run-config", "rounds=true"], "rounds must be int, got True"),
        # a typo for 22 rounds, or an exponent: refused before anything is trained
        (["--run-config", "rounds=1e22"], "rounds must be between 1 and 1,000,000"),
        (["--run-config", "cold-user-fraction=1.0"], "cold-user-fraction must be in [0, 1)"),
        # a world held in memory: a typo of 10**10 users allocated until the machine gave out
        (["--run-config", "synthetic-users=1e10"], "synthetic-users must be between 1 and 100,000"),
        (["--run-config", "synthetic-items=1e9"], "synthetic-items must be between 2 and 20,000"),
        # each within its bound, but generating the world would take some 84 GB
        (
            ["--run-config", "synthetic-users=100000 synthetic-items=20000"],
            "synthetic-users x synthetic-items must be at most 100,000,000, got 100,000 x "
            "20,000 = 2,000,000,000",
        ),
        (["--shots", "3", "--shots", "3"], "shots must be distinct, got (3, 3)"),
        (["--run-config", "shots=[]"], "shots must list at least one K"),
        (["--export-recs", "int8"], "export-recs: unknown model 'int8'; choose among student-int8"),
        # Ray would build an empty actor pool and wait for ever
        (["--num-gpus-per-client", "nan"], "must be a finite number >= 0, got nan"),
        (["--run-config", "num-cpus-per-client=inf"], "must be a finite number > 0, got inf"),
        (["--run-config", "rounds='3"], "No closing quotation"),
        (["--run-config", "text-model=/no/such/model"], "'/no/such/model' (from text-model)"),
    ],
)
def test_simulate_refuses_bad_privacy_and_secagg_settings_before_any_work(
    tmp_path: Path, extra: list[str], expected: str
) -> None:
    """Settings the server or clients would refuse stop the command at once: before data,
    text encoding and pretraining, and without leaving a run directory behind."""
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["simulate", "--run-dir", str(runs), *extra])
    assert result.exit_code != 0
    assert expected in str(result.exception or result.output)
    assert not runs.exists() or not any(runs.iterdir())
    assert not (tmp_path / "elsewhere").exists()


def test_a_run_that_fails_on_bad_data_leaves_no_run_directory(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    missing = tmp_path / "no-such-copy"
    result = CliRunner().invoke(
        app,
        ["simulate", "--dataset", "ml-100k", "--data-dir", str(missing), "--run-dir", str(runs)],
    )
    assert result.exit_code != 0
    assert str(missing) in str(result.exception or result.output)
    assert not runs.exists()  # nor the parent folder the run had created
    runs.mkdir()
    (runs / "earlier").mkdir()
    result = CliRunner().invoke(
        app,
        ["simulate", "--dataset", "ml-100k", "--data-dir", str(missing), "--run-dir", str(runs)],
    )
    assert result.exit_code != 0
    assert [p.name for p in runs.iterdir()] == ["earlier"]  # a folder it did not create stays
    (runs / "earlier" / "notes.txt").write_text("mine")
    args = ["--data-dir", str(missing), "--run-dir", str(runs), "--name", "earlier"]
    result = CliRunner().invoke(app, ["simulate", "--dataset", "ml-100k", *args])
    assert result.exit_code != 0
    # run inside it, it takes away what it added (config.json, checkpoints/, plots/, ...)
    assert [p.name for p in (runs / "earlier").iterdir()] == ["notes.txt"]


def test_an_unusable_run_dir_is_a_clear_error(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    result = CliRunner().invoke(
        app, ["simulate", "--run-dir", str(not_a_folder)], env={"COLUMNS": "250"}
    )
    assert result.exit_code == 2  # refused with the flag's usage, before any work
    assert "Invalid value for '--run-dir'" in result.output
    assert f"{not_a_folder} is a file, not a folder" in result.output
    # the same folder through --run-config, which no flag type checks
    result = CliRunner().invoke(app, ["simulate", "--run-config", f"run-dir='{not_a_folder}'"])
    assert isinstance(result.exception, ConfigError)
    assert "cannot create the run directory" in str(result.exception)
    assert "--run-dir" in str(result.exception)


def test_every_federation_knob_of_the_simulation_reaches_server_and_clients(
    tmp_path: Path,
) -> None:
    """The run config the simulation hands to Flower carries each client-training and
    server-optimiser setting (a knob missing there would silently run with its default)."""
    from dataclasses import replace

    from server.server_app import ServerConfig
    from server.server_optimizer import ServerOptimizerSettings
    from shared.federated.student_task import StudentTask
    from simulation.config import SimulationConfig
    from simulation.pipeline import _server_run_config
    from simulation.run_dir import RunDirectory

    config = SimulationConfig(
        noise_shares=10,
        noise_multiplier=3.0,
        batch_size=256,
        lr=1.0,
        max_grad_norm=0.5,
        personal_steps=2,
        personal_lr=0.01,
        server_optimizer="adam",
        server_lr=0.002,
        server_beta1=0.8,
        server_beta2=0.95,
        server_tau=1e-4,
    )
    run_config = _server_run_config(config, RunDirectory(tmp_path / "run"), tmp_path / "b.pt", 40)
    server = ServerConfig.from_run_config(run_config)
    assert server.server_optimizer_settings == ServerOptimizerSettings(
        "adam", 0.002, 0.8, 0.95, 1e-4
    )
    assert server.noise_shares == 10 and server.secagg
    client = StudentTask.from_run_config(run_config).train_config
    assert client == replace(config.local_train_config(), seed=client.seed)


def test_throughput_counts_every_logged_round_but_each_process_first(tmp_path: Path) -> None:
    """A resumed run reports the client updates per second of all its rounds, not of the
    (possibly empty) last process; the first round of each process pays start-up."""
    from simulation.pipeline import _updates_per_second
    from simulation.run_dir import RunDirectory

    run = RunDirectory(tmp_path / "run")
    assert _updates_per_second(run) == 0.0
    run.log("federate", 1)
    run.log("round", 1, round=1, clients_ok=10, round_seconds=50.0, fit_seconds=4.0)
    assert _updates_per_second(run) == 10 / 4.0  # only a cold round: the clients' fit time
    run.log("round", 2, round=2, clients_ok=10, round_seconds=2.0, fit_seconds=1.0)
    run.log("federate", 3)  # a restart
    run.log("round", 3, round=3, clients_ok=8, round_seconds=40.0, fit_seconds=3.0)
    run.log("round", 4, round=4, clients_ok=6, round_seconds=1.0, fit_seconds=0.5)
    assert _updates_per_second(run) == (10 + 6) / (2.0 + 1.0)
    run.log("federate", 5)  # a rerun with nothing left to train changes nothing
    assert _updates_per_second(run) == (10 + 6) / (2.0 + 1.0)


def test_ctrl_c_during_the_federation_exits_at_once_and_the_run_resumes(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole foreground process group. The Ray engine's threads would keep
    the interpreter alive for ever; the command says where to resume and exits (130), leaving
    no process of its group behind."""
    import os
    import signal
    import subprocess
    import sys

    metrics = tmp_path / "tiny" / "metrics.jsonl"
    args = ["--run-dir", str(tmp_path), "--name", "tiny", "--cohort-size", "6"]
    command = [sys.executable, "-m", "fedrec.cli", "simulate", *args, "--rounds", "500"]
    proc = subprocess.Popen(
        [*command, "--run-config", f"{TINY} num-cpus-per-client=1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, as a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        _wait_for_a_round(proc, metrics)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert "rerun the same command (its options and --run-config" in err
    assert f"with --name tiny (and --run-dir {tmp_path}) to resume" in err
    # the hint is the last word: the engine's threads, whose actors the interrupt stopped,
    # log nothing after it (no tracebacks, no errors)
    assert len(err[err.index("interrupted: ") :].strip().splitlines()) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    # Flower's warning that the simulation API is deprecated is not passed on to the user
    assert "DEPRECATED FEATURE" not in err, err[-3000:]
    _assert_group_ends(proc.pid)
    done = sum('"event": "round"' in line for line in metrics.read_text().splitlines())
    again = ["simulate", *args, "--backend", "inprocess", "--rounds", str(done + 1)]
    resumed = CliRunner().invoke(app, [*again, "--run-config", TINY, "--json"])
    assert resumed.exit_code == 0, resumed.output
    rounds = json.loads((tmp_path / "tiny" / "summary.json").read_text())["rounds"]
    assert [r["round"] for r in rounds][-1] == done + 1


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_the_interrupt_handler_silences_the_engine_and_stops_the_run(
    signame: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After Ctrl-C or SIGTERM the simulation engine's threads see their Ray actors die and
    would log each one, with tracebacks, under the resume hint: the handler silences Flower's
    and Ray's loggers at once (not only once the run has unwound) and stops the run."""
    import logging
    import signal

    from fedrec.commands import simulate

    engine = [logging.getLogger(name) for name in ("flwr", "ray")]
    levels = [logger.level for logger in engine]
    stopping = simulate._Stopping()
    monkeypatch.setattr(simulate, "_stopping", stopping)
    try:
        for logger in engine:
            logger.setLevel(logging.INFO)
        with pytest.raises(KeyboardInterrupt):
            simulate._interrupt(getattr(signal, signame), None)
        # asked directly: Ray's logger does not hand its records to the root logger (caplog)
        silenced = [
            name
            for name in ("flwr", "flwr.simulation", "ray", "ray.actor")
            if not logging.getLogger(name).isEnabledFor(logging.CRITICAL)
        ]
        heard = logging.getLogger("fedrec").isEnabledFor(logging.ERROR)
    finally:  # setLevel, not the attribute: it also clears the loggers' cached answers
        for logger, level in zip(engine, levels, strict=True):
            logger.setLevel(level)
        if stopping.watchdog is not None:
            stopping.watchdog.cancel()  # it would end this test process
    assert silenced == ["flwr", "flwr.simulation", "ray", "ray.actor"]
    assert heard  # only the engine's loggers
    assert stopping.terminated is (signame == "SIGTERM")  # exit status 143, else 130
    assert stopping.watchdog is not None


def test_a_sigterm_during_evaluation_still_gets_the_resume_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulation engine put SIGTERM's default action back when it ended, so a `kill`
    (or `timeout`) during evaluation, minutes on ml-100k, left silently with no hint."""
    import signal

    import simulation.pipeline
    from fedrec.commands import simulate

    seen: list[Any] = []

    def pipeline(config: Any, progress: Any) -> dict[str, Any]:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what the engine leaves behind
        progress("evaluate", {})
        seen.append(signal.getsignal(signal.SIGTERM))
        raise simulation.pipeline.RunInterrupted(tmp_path, resumable=True)

    monkeypatch.setattr(simulation.pipeline, "run_pipeline", pipeline)

    def leave(stop: Any) -> None:
        seen.append(stop)
        raise SystemExit(143)

    monkeypatch.setattr(simulate, "_exit_interrupted", leave)
    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(app, ["simulate", "--run-dir", str(tmp_path)])
    assert result.exit_code == 143, result.output
    assert seen[0] is simulate._interrupt
    assert signal.getsignal(signal.SIGTERM) == before  # restored once the command is done


@pytest.mark.parametrize("finished_a_round", [True, False])
def test_a_run_that_outlives_its_interrupt_is_left_by_the_watchdog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, finished_a_round: bool
) -> None:
    """If the interrupt gets lost in the engine's code, the command still leaves, with the
    same resume hint, a bounded time after the signal."""
    import signal
    import threading

    from fedrec.commands import simulate

    stopping = simulate._Stopping()
    stopping.root = tmp_path / "run"
    (stopping.root / "checkpoints").mkdir(parents=True)
    if finished_a_round:
        (stopping.root / "checkpoints" / "round-00000001.npz").write_bytes(b"")
    left = threading.Event()
    said: list[Any] = []

    def leave(stop: Any) -> None:
        said.append(stop)
        left.set()

    monkeypatch.setattr(simulate, "_stopping", stopping)
    monkeypatch.setattr(simulate, "STOP_WATCHDOG_S", 0.2)
    monkeypatch.setattr(simulate, "_exit_interrupted", leave)
    with pytest.raises(KeyboardInterrupt):
        simulate._interrupt(signal.SIGTERM, None)
    with pytest.raises(KeyboardInterrupt):  # a second signal starts no second watchdog
        simulate._interrupt(signal.SIGINT, None)
    assert left.wait(10.0)
    time.sleep(0.4)
    (stop,) = said
    assert (stop.root, stop.resumable) == (stopping.root, finished_a_round)
    assert stopping.terminated


@pytest.mark.parametrize("stdout_closed", [False, True])
def test_an_interrupt_after_the_progress_reader_went_away_still_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stdout_closed: bool
) -> None:
    """`fedrec simulate 2>&1 | head -5`, then Ctrl-C (or `kill`): the goodbye line met the
    closed pipe, and its BrokenPipeError skipped Ray's shutdown and the immediate exit, so
    the interpreter waited for the engine's threads (for ever, as before the exit at once).
    A standard output closed from the start (`>&-`: None) failed the same way."""
    from fedrec.commands import simulate
    from simulation.pipeline import RunInterrupted

    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    def leave(status: int) -> None:
        raise SystemExit(status)

    monkeypatch.setattr(simulate, "_stopping", simulate._Stopping())
    monkeypatch.setattr(sys, "stderr", ClosedPipe())
    monkeypatch.setattr(sys, "stdout", None if stdout_closed else ClosedPipe())
    monkeypatch.setattr(simulate.os, "_exit", leave)
    with pytest.raises(SystemExit) as exited:
        simulate._exit_interrupted(RunInterrupted(tmp_path, resumable=True))
    assert exited.value.code == 130


def _assert_group_ends(group: int) -> None:
    """No process of ``group`` is left: Ray's own stop within seconds of ray.shutdown()."""
    import subprocess
    import time

    for _ in range(30):
        left = subprocess.run(["pgrep", "-a", "-g", str(group)], capture_output=True, text=True)
        if not left.stdout.strip():
            return
        time.sleep(1)
    raise AssertionError(f"processes left in group {group}:\n{left.stdout}")


def test_sigterm_stops_a_ray_run_like_ctrl_c(tmp_path: Path) -> None:
    """kill / timeout / docker stop send SIGTERM: the run stops as on Ctrl-C, with the
    resume hint, and exits 143, also once Ray runs (starting Ray replaced the handler with
    Ray's own, which aborted with a stack dump)."""
    import signal
    import subprocess
    import sys

    metrics = tmp_path / "t" / "metrics.jsonl"
    args = ["--run-dir", str(tmp_path), "--name", "t", "--cohort-size", "6", "--rounds", "500"]
    args += ["--run-config", f"{TINY} num-cpus-per-client=1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedrec.cli", "simulate", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, to see that Ray's processes end with it
    )
    try:
        _wait_for_a_round(proc, metrics)
        proc.send_signal(signal.SIGTERM)  # the command alone, as kill does
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=30)
            raise AssertionError(f"still running 60 s after SIGTERM:\n{err[-4000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "rerun the same command (its options and --run-config" in err
    assert f"with --name t (and --run-dir {tmp_path}) to resume" in err
    _assert_group_ends(proc.pid)


def test_each_round_reads_only_the_client_ledgers_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round's line gives the largest and the mean epsilon of every ledger, and every
    ledger was read and parsed after every round, though a round charges only its cohort:
    0.76 s a round with 20,000 ledgers. A ledger is read again only once it was rewritten."""
    reads: list[str] = []
    ledger_epsilon = pipeline._ledger_epsilon

    def counted(path: Path) -> float | None:
        reads.append(path.parent.name)
        return ledger_epsilon(path)

    monkeypatch.setattr(pipeline, "_ledger_epsilon", counted)
    state = tmp_path / "clients"
    epsilons = ClientEpsilons(state)
    assert epsilons.summary() == {"epsilon_record": None, "epsilon_record_mean": None}
    for client, eps in enumerate((1.0, 2.0, 3.0)):
        write_json_atomic(state / f"client-{client}" / "ledger.json", {"epsilon": eps})
    (state / "client-3").mkdir()  # sampled, declined before any ledger was written
    assert epsilons.summary() == {"epsilon_record": 3.0, "epsilon_record_mean": 2.0}
    assert sorted(reads) == ["client-0", "client-1", "client-2"]
    reads.clear()
    assert epsilons.summary()["epsilon_record"] == 3.0 and reads == []
    write_json_atomic(state / "client-1" / "ledger.json", {"epsilon": 5.0})  # its next round
    assert epsilons.summary() == {"epsilon_record": 5.0, "epsilon_record_mean": 3.0}
    assert reads == ["client-1"]


def test_a_round_checkpointed_but_not_logged_is_logged_from_its_checkpoint(
    tmp_path: Path,
) -> None:
    """A process killed between the server's checkpoint and the metrics line lost that
    round from every report, and the resume counted its first (cold) round as warm."""
    args = ["simulate", "--backend", "inprocess", "--cohort-size", "6", "--run-dir"]
    args += [str(tmp_path), "--name", "cut", "--run-config", TINY, "--json", "--rounds"]
    assert CliRunner().invoke(app, [*args, "2"]).exit_code == 0
    metrics = tmp_path / "cut" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    round_2 = next(i for i, line in enumerate(lines) if '"event": "round", "step": 2' in line)
    logged = json.loads(lines[round_2])
    metrics.write_text("\n".join(lines[:round_2]) + "\n")  # as if killed right after it
    resumed = CliRunner().invoke(app, [*args, "3"])
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert summary["rounds"][1]["backfilled"] is True
    assert summary["rounds"][1]["clients_ok"] == 6
    # its epsilon from the clients' ledgers, as they stood after it (it was left empty), and
    # its time in the earlier process's federation time (it counted in neither)
    assert summary["rounds"][1]["epsilon_record"] == pytest.approx(logged["epsilon_record"])
    assert summary["rounds"][1]["epsilon_record_mean"] == pytest.approx(
        logged["epsilon_record_mean"]
    )
    first = json.loads(lines[round_2 - 1]) if '"step": 1' in lines[round_2 - 1] else None
    before = (first or {}).get("elapsed_seconds", 0.0) + logged["round_seconds"]
    assert summary["meta"]["federation seconds"] >= before - 0.01
    federate = [json.loads(x) for x in metrics.read_text().splitlines() if '"federate"' in x]
    assert federate[-1]["step"] == 3  # this process started at round 3


def test_a_round_logged_from_its_checkpoint_keeps_its_user_level_epsilon(
    tmp_path: Path,
) -> None:
    """The checkpoint records the user-level epsilon after its round (``epsilon-user``): a
    round logged from it had none, so a run killed right after its last checkpoint reported
    no user-level privacy spent (the summary's only record of it)."""
    from server.checkpoint import CheckpointStore
    from simulation.pipeline import _log_checkpointed_rounds
    from simulation.run_dir import RunDirectory

    run = RunDirectory(tmp_path / "run")
    try:
        metrics = {"clients-ok": 4, "updated": True, "epsilon-user": 0.75, "round-seconds": 1.0}
        CheckpointStore(run.checkpoints).save(1, [np.zeros(3)], {}, {"ledger": 1}, metrics)
        _log_checkpointed_rounds(run)
        (logged,) = run.records("round")
    finally:
        run.close()
    assert logged["backfilled"] is True and logged["clients_ok"] == 4
    assert logged["epsilon_user"] == 0.75


def test_a_published_model_version_is_never_replaced(tmp_path: Path) -> None:
    """Round 2's checkpoint lost, the round ran again and trained another model: the
    ServerApp kept the model-v2 published before (devices may hold it), but the end of the
    run wrote the new final model over it. It is evaluated from an unpublished file now."""
    args = ["simulate", "--backend", "inprocess", "--rounds", "2", "--cohort-size", "6"]
    args += ["--run-dir", str(tmp_path), "--name", "lost", "--json", "--run-config"]
    args += [f"{TINY} publish-each-round=true"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    run = tmp_path / "lost"
    models = run / "models"
    published = {p.name: p.read_bytes() for p in models.glob("model-v*.int8.onnx")}
    assert sorted(published) == ["model-v1.int8.onnx", "model-v2.int8.onnx"]
    assert json.loads(first.stdout)["artifact"]["path"] == str(models / "model-v2.int8.onnx")
    arrays = run / "checkpoints" / "round-00000002.npz"
    arrays.write_bytes(arrays.read_bytes()[:50])  # round 2's checkpoint is lost
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert {p.name: p.read_bytes() for p in models.glob("model-v*.int8.onnx")} == published
    final = Path(json.loads(again.stdout)["artifact"]["path"])
    assert final == run / "unpublished" / "round-2.int8.onnx"
    assert final.read_bytes() != published["model-v2.int8.onnx"]  # the rerun's own model
    assert (final.parent / "catalog.json").read_text() == (models / "catalog.json").read_text()
    assert not list(run.glob(".final-model-*"))


def test_a_rerun_evaluates_and_labels_the_round_its_checkpoint_holds(tmp_path: Path) -> None:
    """Round 2's checkpoint lost and the rerun asked for 1 round: nothing trains, and the
    model evaluated is round 1's checkpoint. It was reported as 2 rounds (the log's newest
    line) and written as the final model of round 2 (unpublished, 'the round ran again')."""
    args = ["simulate", "--backend", "inprocess", "--cohort-size", "6", "--run-dir"]
    args += [str(tmp_path), "--name", "lost", "--run-config", TINY, "--json", "--rounds"]
    assert CliRunner().invoke(app, [*args, "2"]).exit_code == 0
    run = tmp_path / "lost"
    arrays = run / "checkpoints" / "round-00000002.npz"
    arrays.write_bytes(arrays.read_bytes()[:50])  # round 2's checkpoint is lost
    again = CliRunner().invoke(app, [*args, "1"])
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["meta"]["rounds"] == 1
    assert [r["round"] for r in summary["rounds"]] == [1]
    assert summary["artifact"]["path"] == str(run / "models" / "model-v1.int8.onnx")
    assert not (run / "unpublished").exists()
    # asked for round 2 again, it runs from round 1's checkpoint: its first round is cold
    again = CliRunner().invoke(app, [*args, "2"])
    assert again.exit_code == 0, again.output
    federate = [
        r["step"]
        for r in map(json.loads, (run / "metrics.jsonl").open())
        if r["event"] == "federate"
    ]
    assert federate[-1] == 2


def test_a_final_model_kept_unpublished_is_built_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final model's version is out with another model: the int8 model built to compare
    with it is the one written to unpublished/ (it was built a second time to be written)."""
    from types import SimpleNamespace

    import shared.compression.artifact as artifact
    from shared.models.student import StudentConfig, StudentModel
    from simulation.pipeline import _publish_final

    def student(seed: int) -> StudentModel:
        rng = np.random.default_rng(seed)
        tables = [rng.normal(size=(6, 8)).astype(np.float32) for _ in range(2)]
        return StudentModel(*tables, StudentConfig(dim=16, max_len=10, text_dim=8, id_dim=8))

    ids = [f"i{k}" for k in range(6)]
    run: Any = SimpleNamespace(root=tmp_path)
    published = _publish_final(student(0), ids, run, 2, 0.0)
    assert published.path == tmp_path / "models" / "model-v2.int8.onnx"
    before = published.path.read_bytes()
    builds = []
    build = artifact.build_student_artifact

    def counted(*args: Any, **kwargs: Any) -> artifact.StudentArtifact:
        builds.append(build(*args, **kwargs))
        return builds[-1]

    monkeypatch.setattr(artifact, "build_student_artifact", counted)
    kept = _publish_final(student(1), ids, run, 2, 0.0)
    assert kept.path == tmp_path / "unpublished" / "round-2.int8.onnx"
    assert len(builds) == 1 and kept.path.read_bytes() == builds[0].int8 != before
    assert published.path.read_bytes() == before
    assert json.loads((kept.path.parent / "catalog.json").read_text()) == ids


def test_prune_sparsity_reaches_the_published_model(tmp_path: Path) -> None:
    """`prune-sparsity` prunes every weight matrix the int8 graph executes, each to that
    fraction of zeros; the artifact's report says what it got."""
    args = ["simulate", "--backend", "inprocess", "--rounds", "1", "--cohort-size", "6"]
    args += ["--run-dir", str(tmp_path), "--run-config", f"{TINY} prune-sparsity=0.5", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    artifact = json.loads(result.stdout)["artifact"]
    assert artifact["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert Path(artifact["path"]).exists()


def test_a_run_that_failed_after_training_frees_its_folder_for_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library caller (a benchmark, a notebook) may retry in the same process: the failed
    run's lock on the folder is released, not held until garbage collection."""
    import simulation.pipeline as pipeline

    def broken_report(summary: Any, root: Path) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(pipeline, "write_report", broken_report)
    args = ["simulate", "--backend", "inprocess", "--rounds", "1", "--cohort-size", "4"]
    args += ["--run-dir", str(tmp_path), "--name", "r", "--run-config", TINY]
    failed = CliRunner().invoke(app, args)
    assert isinstance(failed.exception, OSError)
    monkeypatch.undo()
    again = CliRunner().invoke(app, [*args, "--json"])
    assert again.exit_code == 0, again.output  # it was refused: "in use by another run"
    assert json.loads(again.stdout)["meta"]["rounds"] == 1


def test_cache_dir_and_text_model_reach_the_item_text_encoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cache-dir` holds the text embeddings beside the pretraining, and `text-model` picks
    the language model that encodes the item text (here a copy of the bundled one)."""
    import shutil

    from shared.text import bundled_model_dir, model_cache_key

    default_root = tmp_path / "default-cache"
    monkeypatch.setenv("FEDREC_CACHE_DIR", str(default_root))
    model = tmp_path / "my-lm"
    shutil.copytree(bundled_model_dir(), model)
    (model / "tokenizer_config.json").write_text(  # its files differ: another model key
        (model / "tokenizer_config.json")
        .read_text()
        .replace('"do_lower_case": true', '"do_lower_case": false')
    )
    cache = tmp_path / "my-cache"
    keys = f"{TINY} cache-dir={cache} text-model={model}"
    args = ["simulate", "--backend", "inprocess", "--rounds", "1", "--cohort-size", "4"]
    result = CliRunner().invoke(app, [*args, "--run-dir", str(tmp_path), "--run-config", keys])
    assert result.exit_code == 0, result.output
    shard = cache / "embeddings" / f"{model_cache_key(model, 128)}.npz"
    assert shard.exists() and model_cache_key(model, 128) != model_cache_key(
        bundled_model_dir(), 128
    )
    assert list((cache / "pretrained").iterdir())
    assert not default_root.exists()


def _wait_for_a_round(proc: Any, metrics: Path) -> None:
    """Until the simulation in ``proc`` has logged a finished round (4 minutes at most)."""
    import time

    deadline = time.monotonic() + 240
    while not (metrics.exists() and '"round"' in metrics.read_text()):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "no round finished"
        time.sleep(0.5)


def test_progress_into_a_log_is_a_line_per_stage_and_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into a log (docker, CI, a file) the bar showed nothing until the end, so minutes of
    evaluation looked hung; there each stage and round is now a line of its own."""
    import simulation.pipeline

    def pipeline(config: Any, progress: Any) -> dict[str, Any]:
        progress("run", {"dir": str(tmp_path)})
        progress("federate", {"clients": 9, "rounds": 2})
        row = {"clients_ok": 6, "clients_declined": 0, "clients_failed": 0, "epsilon_record": 1.5}
        progress("round", {"round": 1, **row})
        progress("evaluate", {})
        progress("evaluate", {"model": "student (federated + personal)"})
        raise ConfigError("stop here")  # the lines are what this test is about

    monkeypatch.setattr(simulation.pipeline, "run_pipeline", pipeline)
    result = CliRunner().invoke(app, ["simulate", "--rounds", "2", "--run-dir", str(tmp_path)])
    said = [line.split(" ", 1)[1] for line in result.stderr.splitlines() if line[:1].isdigit()]
    assert said[:2] == [f"run: {tmp_path}", "federate: clients=9 rounds=2"]
    assert said[2].startswith("round 1/2: ok 6 declined 0 failed 0 |")
    assert said[2].endswith("max client eps 1.500")
    assert said[3] == "evaluate: every model on the protocol's test items"
    assert said[4] == "evaluate: student (federated + personal)"
    quiet = CliRunner().invoke(app, ["simulate", "--no-progress", "--run-dir", str(tmp_path)])
    assert not [line for line in quiet.stderr.splitlines() if line[:1].isdigit()]


def test_a_progress_reader_that_goes_away_ends_the_display_not_the_run(tmp_path: Path) -> None:
    """`fedrec simulate 2>&1 >summary.txt | head -5` (or quitting `less`): the next progress
    line met a closed pipe, and Rich's SystemExit ended the federation's server thread
    there. A 2-round Ray run stopped after round 1, was evaluated and reported as finished,
    exit status 0, and its summary table went to /dev/null. Every round now runs, and the
    summary reaches standard output."""
    import os
    import subprocess

    script = (  # the pipeline replaced before it is imported: torch and Flower take seconds
        "import os, sys, time, types\n"
        "def pipeline(config, progress):\n"
        "    progress('run', {'dir': 'runs/x'})\n"
        "    while not os.path.exists('gone'):  # the reader goes away\n"
        "        time.sleep(0.01)\n"
        "    row = {'clients_ok': 1, 'clients_declined': 0, 'clients_failed': 0}\n"
        "    for r in (1, 2, 3):\n"
        "        progress('round', {'round': r, **row})\n"
        "    m = dict.fromkeys(['sampled_hr@10', 'sampled_ndcg@10', 'full_hr@10',\n"
        "                       'full_ndcg@10'], 0.25)\n"
        "    return {'final': {'pop': {'all': m}}, 'meta': {'run directory': 'runs/x'}}\n"
        "fake = types.ModuleType('simulation.pipeline')\n"
        "fake.run_pipeline = pipeline\n"
        "fake.RunInterrupted = type('RunInterrupted', (KeyboardInterrupt,), {})\n"
        "sys.modules['simulation.pipeline'] = fake\n"
        "from fedrec.cli import main\n"
        "sys.argv = ['fedrec', 'simulate', '--rounds', '3']\n"
        "main()\n"
    )
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root}
    with open(tmp_path / "summary.txt", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.PIPE,
        )
        assert proc.stderr is not None
        assert b"run: runs/x" in proc.stderr.readline()
        proc.stderr.close()
        (tmp_path / "gone").touch()
        assert proc.wait(timeout=60) == 0
    assert (tmp_path / "summary.txt").read_text().splitlines()[-1] == "report: runs/x/report.md"


def test_the_run_clock_keeps_running_through_evaluation() -> None:
    """The bar is full once the last round is done; evaluation then takes minutes on
    ml-100k, and rich's elapsed column stopped at the last round (the run looked hung)."""
    from rich.progress import Progress, TimeElapsedColumn

    from fedrec.commands.simulate import _RunClock

    now = [0.0]
    with Progress(get_time=lambda: now[0], disable=True) as bar:
        task_id = bar.add_task("round", total=2)
        now[0] = 5.0
        bar.update(task_id, completed=2)  # the rounds are done
        now[0] = 65.0  # evaluating
        task = bar.tasks[0]
        assert str(TimeElapsedColumn().render(task)) == "0:00:05"
        assert str(_RunClock().render(task)) == "0:01:05"


def test_noise_shares_beyond_the_datasets_clients_is_refused_before_pretraining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config check knows the cohort asked for, not the clients the dataset has (the
    cohort is capped at them): it used to fail after pretraining, quoting a cohort-size the
    user never gave."""
    import simulation.pipeline

    def no_pretraining(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pretrained before the check")

    monkeypatch.setattr(simulation.pipeline, "pretrain", no_pretraining)
    args = ["simulate", "--run-dir", str(tmp_path), "--synthetic-users", "40", "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--noise-shares", "40", "--cohort-size", "50"])
    assert isinstance(result.exception, ConfigError), result.output
    assert "'noise-shares' (40) exceeds the 29 federated clients of this dataset" in str(
        result.exception
    )
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_a_resume_on_other_data_is_refused_before_pretraining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun with every setting the same resumed a run whose data had changed (an edited
    data-dir file, a new download): pretraining missed its cache and trained on the new data,
    the run warned of "another number of threads" and went on from its old student with the
    new clients' data, failing on the catalog only if that changed size. A refused rerun
    leaves the run's settings as they were: it recorded its own (here more rounds and
    another adapt-steps) before the data check, and re-evaluations of the finished run
    (``load_finished_run``) then adapted with settings its figures were not made with."""
    import simulation.pipeline
    from shared.config import from_flat, parse_run_config, to_flat
    from simulation.config import RESUMABLE_KEYS, SimulationConfig
    from simulation.pipeline import load_split
    from simulation.run_dir import RunDirectory

    def no_encoding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("encoded")  # the stage after the check, before pretraining

    monkeypatch.setattr(simulation.pipeline, "encode_items", no_encoding)
    keys = "synthetic-users=40 synthetic-items=30"
    config = from_flat(SimulationConfig, parse_run_config(keys))
    fingerprint = load_split(config)[0].fingerprint()
    # the data changed, the same, or not recorded (by older code): not compared
    for name, recorded in (("changed", "0123456789abcdef"), ("same", fingerprint), ("old", None)):
        refused = name == "changed"
        args = ["simulate", "--run-dir", str(tmp_path), "--name", name, "--no-progress"]
        args += ["--rounds", "9", "--run-config", f"{keys} adapt-steps=50"]
        earlier = RunDirectory(tmp_path / name)  # a run that trained a round on it
        earlier.claim("simulation", to_flat(config), RESUMABLE_KEYS)
        if recorded is not None:
            earlier.claim_data(recorded, "synthetic")
        (earlier.checkpoints / "round-000001.npz").write_bytes(b"x")
        earlier.close()
        result = CliRunner().invoke(app, args)
        if refused:
            assert isinstance(result.exception, ConfigError), result.output
            assert f"fingerprint {recorded}, now {fingerprint}" in str(result.exception)
            assert "other data than synthetic holds now" in str(result.exception)
        else:  # resumed (up to the stage patched out here), the data now recorded
            assert "encoded" in str(result.exception), result.output
        stored = json.loads((tmp_path / name / "config.json").read_text())
        assert stored["data"] == {"fingerprint": recorded if refused else fingerprint}
        ran = {"rounds": 9, "adapt-steps": 50}
        before = {"rounds": config.rounds, "adapt-steps": config.adapt_steps}
        assert {k: stored["simulation"][k] for k in ran} == (before if refused else ran)


def test_a_rerun_may_raise_the_round_caps_a_decline_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client past max-round-epsilon or max-round-steps declines, naming the fix: raise the
    cap in the run config. A rerun of that run with the cap raised was refused as a run with
    other settings, so the fix could not be applied to the run it was for."""
    import simulation.pipeline
    from shared.config import from_flat, parse_run_config, to_flat
    from simulation.config import RESUMABLE_KEYS, SimulationConfig
    from simulation.run_dir import RunDirectory

    def no_encoding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("encoded")  # the stage after the settings check

    monkeypatch.setattr(simulation.pipeline, "encode_items", no_encoding)
    keys = "synthetic-users=40 synthetic-items=30"
    config = from_flat(SimulationConfig, parse_run_config(keys))
    earlier = RunDirectory(tmp_path / "capped")
    earlier.claim("simulation", to_flat(config), RESUMABLE_KEYS)
    (earlier.checkpoints / "round-000001.npz").write_bytes(b"x")
    earlier.close()
    raised = f"{keys} max-round-epsilon=20 max-round-steps=5000"
    args = ["simulate", "--run-dir", str(tmp_path), "--name", "capped", "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--run-config", raised])
    assert "encoded" in str(result.exception), result.output  # past the settings check
    stored = json.loads((tmp_path / "capped" / "config.json").read_text())["simulation"]
    assert (stored["max-round-epsilon"], stored["max-round-steps"]) == (20.0, 5000)
    # a setting that shapes training is still refused
    result = CliRunner().invoke(app, [*args, "--run-config", f"{keys} local-epochs=3"])
    assert isinstance(result.exception, ConfigError), result.output


def test_a_finished_run_is_not_re_evaluated_on_other_data(tmp_path: Path) -> None:
    """The benchmarks re-evaluating a finished run (``load_finished_run``, also with another
    ``--data-dir``) loaded the data its settings name without comparing it with the content
    fingerprint the run recorded: a checkpoint trained on other data was evaluated on
    today's users and items, its figures reported as the run's."""
    from server.checkpoint import CheckpointStore
    from shared.errors import ModelFileError
    from simulation.pipeline import load_finished_run

    for name, recorded, fingerprint, root in _runs_recording_fingerprints(tmp_path):
        CheckpointStore(root / "checkpoints").save(1, [np.zeros(1)], {}, None)
        if name == "changed":
            with pytest.raises(ConfigError, match=f"fingerprint {recorded}, now {fingerprint}"):
                load_finished_run(root)
        else:  # the data checked (or not recorded): on to the model, which this run lacks
            with pytest.raises(ModelFileError, match=r"bundle\.pt does not exist"):
                load_finished_run(root)


def _runs_recording_fingerprints(tmp_path: Path) -> list[tuple[str, str | None, str, Path]]:
    """Three run folders of a tiny synthetic config: ``(name, recorded fingerprint, the
    data's fingerprint now, folder)`` for a run that recorded another fingerprint
    (``changed``), the data's own (``same``) and none (``old``, older code)."""
    from shared.config import from_flat, parse_run_config, to_flat
    from simulation.config import RESUMABLE_KEYS, SimulationConfig
    from simulation.pipeline import load_split
    from simulation.run_dir import RunDirectory

    config = from_flat(SimulationConfig, parse_run_config("synthetic-users=40 synthetic-items=30"))
    fingerprint = load_split(config)[0].fingerprint()
    runs = []
    for name, recorded in (("changed", "0123456789abcdef"), ("same", fingerprint), ("old", None)):
        root = tmp_path / name
        run = RunDirectory(root)
        run.claim("simulation", to_flat(config), RESUMABLE_KEYS)
        if recorded is not None:
            run.claim_data(recorded, "synthetic")
        run.close()
        runs.append((name, recorded, fingerprint, root))
    return runs


def test_ranks_without_users_are_not_given_another_datas_users(tmp_path: Path) -> None:
    """``run_ranks`` gives a ranks file of older code its cases' users from the run's split,
    rebuilt from the data its settings name, which it compared only by the number of cases:
    data that changed since (as many federated users, other ones) gave other users."""
    from shared.eval.protocol import CaseRanks, loo_cases
    from simulation.config import SimulationConfig
    from simulation.pipeline import load_split, stored_config

    for name, recorded, fingerprint, root in _runs_recording_fingerprints(tmp_path):
        config = stored_config(root)
        assert isinstance(config, SimulationConfig)
        _, split = load_split(config)
        n = len(loo_cases(split, split.population("federated"), "test"))
        _save_ranks(root / "ranks.npz", {"federated/pop": CaseRanks(np.zeros(n), np.zeros(n))})
        if name == "changed":
            with pytest.raises(ConfigError, match=f"fingerprint {recorded}, now {fingerprint}"):
                run_ranks(root)
        else:
            users = run_ranks(root)["federated/pop"].users
            assert users is not None and len(users) == n


def test_a_run_fingerprints_its_data_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resume check and the pretraining cache key each hashed every interaction and item
    text of the dataset; a run computes the fingerprint once and passes it on."""
    import simulation.pipeline
    import simulation.pretrain
    from shared.data.dataset import RecDataset
    from simulation.config import SimulationConfig

    calls: list[str] = []
    fingerprint = RecDataset.fingerprint

    def counted(self: RecDataset) -> str:
        calls.append(self.name)
        return fingerprint(self)

    def keyed(*args: Any, **kwargs: Any) -> Any:
        raise ConfigError("stop here")  # the pretraining cache key has been computed

    monkeypatch.setattr(RecDataset, "fingerprint", counted)
    monkeypatch.setattr(
        simulation.pipeline, "encode_items", lambda text, cfg: np.zeros((len(text), 8))
    )
    monkeypatch.setattr(simulation.pretrain, "Validation", keyed)
    config = SimulationConfig(
        synthetic_users=40, run_dir=str(tmp_path), cache_dir=str(tmp_path), progress=False
    )
    with pytest.raises(ConfigError, match="stop here"):
        simulation.pipeline.run_pipeline(config)
    assert calls == ["synthetic"]


def test_secagg_settings_beyond_the_datasets_clients_are_refused_before_pretraining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SecAgg+ share count or threshold above the clients the dataset has passed the config
    check (against the cohort asked for) and was refused by the ServerApp after pretraining
    (minutes on ml-100k), quoting a cohort-size the user never gave."""
    import simulation.pipeline

    def no_pretraining(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pretrained before the check")

    monkeypatch.setattr(simulation.pipeline, "pretrain", no_pretraining)
    args = ["simulate", "--run-dir", str(tmp_path), "--synthetic-users", "40", "--no-progress"]
    args += ["--cohort-size", "50", "--secagg-num-shares", "41"]
    result = CliRunner().invoke(app, [*args, "--secagg-reconstruction-threshold", "35"])
    assert isinstance(result.exception, ConfigError), result.output
    message = str(result.exception)
    assert "the 29 federated clients of this dataset (cohort-size 50 is capped at them)" in message
    assert "secagg-reconstruction-threshold" in message
    assert list(tmp_path.iterdir()) == []  # nothing left behind


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--synthetic-users", "2"],
            "the split leaves no public user with two or more training items (synthetic-users 2,"
            " public-fraction 0.2, cold-user-fraction 0.1): the teacher and the student pretrain"
            " on them; raise synthetic-users or raise public-fraction",
        ),
        (
            ["--synthetic-users", "3", "--public-fraction", "0.99"],
            "the split leaves no federated user: of the 3 users, 0 are cold and the other 3 "
            "public (cold-user-fraction 0.1, public-fraction 0.99)",
        ),
        (
            ["--synthetic-users", "2", "--public-fraction", "0.5"],
            "SecAgg+ needs at least 2 federated clients and the split leaves 1 (",
        ),
    ],
)
def test_a_split_the_run_cannot_train_on_is_refused_before_pretraining_naming_its_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], message: str
) -> None:
    """These used to fail after pretraining, in the teacher ("no training sequence has two or
    more items") or with a cohort-size or noise-shares the user never gave."""
    import simulation.pipeline

    def no_pretraining(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pretrained before the check")

    monkeypatch.setattr(simulation.pipeline, "pretrain", no_pretraining)
    args = ["simulate", "--run-dir", str(tmp_path), "--no-progress", *flags]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ConfigError), result.output
    assert str(result.exception).startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_a_run_in_which_no_round_changed_the_model_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every client declines for budget: the run used to exit 0 reporting an N-round
    federation whose model was the pretrained one, without a word."""
    import logging

    import shared.eval.protocol

    monkeypatch.setattr(shared.eval.protocol, "_WARNED_SHORT_POOLS", set())  # a fresh process

    args = ["simulate", "--run-dir", str(tmp_path), "--name", "spent", "--no-progress"]
    args += ["--backend", "inprocess", "--synthetic-users", "40", "--synthetic-items", "60"]
    args += ["--teacher-epochs", "2", "--student-epochs", "2", "--rounds", "2"]
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(app, [*args, "--epsilon-budget", "0.05"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "spent" / "summary.json").read_text())
    assert summary["meta"]["rounds that changed the model"] == 0
    assert [r["updated"] for r in summary["rounds"]] == [False, False]
    assert "no round changed the global model" in caplog.text
    shorts = [r for r in caplog.records if "fewer than 99 items" in r.getMessage()]
    assert len(shorts) == 1  # a 60-item catalog's sampled metric: said once, not per model


def test_earlier_processes_time_counts_rounds_logged_before_elapsed_seconds(
    tmp_path: Path,
) -> None:
    """A run directory an older version interrupted has rounds without elapsed_seconds: its
    federation time is the sum of their round_seconds, not 0. A finished process's
    evaluation counts too (a rerun's total seconds used to shrink by it), and so does every
    process's pretraining (a resumed run's report gave only its own cache load, 0 s)."""
    from simulation.pipeline import _earlier_processes
    from simulation.run_dir import RunDirectory

    run = RunDirectory(tmp_path / "run")
    run.log("pretrain", 0, seconds=5.0)  # an older process: no elapsed_seconds
    run.log("round", 1, round=1, round_seconds=2.0)
    run.log("round", 2, round=2, round_seconds=3.0)
    run.log("pretrain", 0, seconds=1.0)  # a newer one
    run.log("round", 3, round=3, round_seconds=4.0, elapsed_seconds=9.0)
    run.log("evaluate", 3, seconds=6.0)  # it finished: its evaluation counts too
    run.log("pretrain", 0, seconds=0.5)  # this process
    earlier = _earlier_processes(run)
    assert (earlier.processes, earlier.federation) == (2, 5.0 + 9.0)
    assert earlier.pretraining == 5.0 + 1.0  # this process's own 0.5 is not earlier
    assert earlier.total == pytest.approx(5.0 + 5.0 + 1.0 + 9.0 + 6.0)
    run.close()


def test_every_exportable_model_has_a_source_and_a_file() -> None:
    from simulation.config import RECS_MODELS, SimulationConfig
    from simulation.pipeline import _FEWSHOT_RECS_SOURCES, _RECS_SOURCES, recs_file

    assert set(_RECS_SOURCES) | set(_FEWSHOT_RECS_SOURCES) == set(RECS_MODELS)
    assert len({recs_file(m) for m in RECS_MODELS}) == len(RECS_MODELS)
    assert SimulationConfig(export_recs=("all",)).recs_exports() == RECS_MODELS
    assert SimulationConfig(export_recs=("pop", "teacher", "pop")).recs_exports() == (
        "teacher",
        "pop",
    )
    assert SimulationConfig(export_recs=()).recs_exports() == ()
    # the CLI cannot give an empty list: `--export-recs none` is one
    assert SimulationConfig(export_recs=("none",)).recs_exports() == ()
    with pytest.raises(ConfigError, match="'none' cannot be given with models"):
        SimulationConfig(export_recs=("none", "pop"))


def test_a_dataset_name_in_any_case_is_that_dataset(tmp_path: Path) -> None:
    """'Synthetic' used to fall through to the registry's default world (seed 42, default
    size), silently ignoring --seed and the synthetic-* sizes."""
    from simulation.config import SimulationConfig
    from simulation.pipeline import load_split

    small = {"seed": 7, "synthetic_users": 60, "synthetic_items": 50}
    typed = SimulationConfig(dataset=" Synthetic", **small)  # type: ignore[arg-type]
    assert typed.dataset == "synthetic"
    dataset, _ = load_split(typed)
    expected, _ = load_split(SimulationConfig(**small))  # type: ignore[arg-type]
    assert (dataset.n_users, dataset.n_items) == (60, 50)
    assert dataset.fingerprint() == expected.fingerprint()
    with pytest.raises(Exception, match="unknown dataset 'ml-9m'; valid names: ml-100k"):
        SimulationConfig(dataset="ml-9m")


def test_a_home_folder_in_run_config_paths_is_expanded() -> None:
    """Quoted in --run-config, `~` reaches the config unexpanded: the text embeddings went to
    the home folder (the encoder expands it) and the pretrained models and runs to a literal
    `./~` folder."""
    from simulation.config import SimulationConfig

    cfg = SimulationConfig(run_dir="~/fedrec-runs", cache_dir="~/fedrec-cache")
    assert cfg.run_dir == str(Path.home() / "fedrec-runs")
    assert cfg.cache_dir == str(Path.home() / "fedrec-cache")
    ml = SimulationConfig(dataset="ml-100k", data_dir="~/data/ml-100k")
    assert ml.data_dir == str(Path.home() / "data" / "ml-100k")


def test_a_resume_compares_the_text_model_folder_not_its_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`text-model` was compared as typed: the same folder spelled `./lm/` was refused as
    another setting, and `lm` typed in another working directory, another encoder, resumed
    the run. It is one absolute folder now, as data-dir is."""
    import shutil

    import simulation.pipeline as pipeline
    from shared.text import bundled_model_dir

    for where in ("a", "b"):
        shutil.copytree(bundled_model_dir(), tmp_path / where / "lm")
    runs = tmp_path / "runs"

    class Stop(Exception):
        pass

    def stages(config: Any, run: Any, started: float, progress: Any) -> None:
        from shared.config import to_flat

        run.record_settings("simulation", to_flat(config))  # as the stages do, once checked
        (run.checkpoints / "round-1.npz").write_bytes(b"")  # a round's progress: resumable
        raise Stop(config.text_model)

    monkeypatch.setattr(pipeline, "_run_stages", stages)

    def rerun(cwd: Path, text_model: str) -> BaseException | None:
        monkeypatch.chdir(cwd)
        keys = f"text-model={text_model}"
        args = ["simulate", "--backend", "inprocess", "--run-dir", str(runs), "--name", "x"]
        return CliRunner().invoke(app, [*args, "--run-config", keys]).exception

    first = rerun(tmp_path / "a", "lm")
    assert isinstance(first, Stop) and first.args == (str(tmp_path / "a" / "lm"),)
    for spelled in ("./lm/", str(tmp_path / "a" / "lm")):
        assert isinstance(rerun(tmp_path / "a", spelled), Stop), spelled
    refused = rerun(tmp_path / "b", "lm")
    assert isinstance(refused, ConfigError)
    assert "holds a run with other settings (text-model" in str(refused)


class _Resumed(Exception):
    """Raised in place of a rerun's stages: its settings check let it resume."""


def _previous_release_reruns(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    runs: dict[str, dict[str, Any]],
    dropped: Sequence[str],
) -> Callable[[str, str], BaseException | None]:
    """Run directories as the previous release left them, one per ``runs`` entry (name:
    settings): a round's checkpoint, and a config.json without the ``dropped`` settings
    (added since). Returns a rerun of one of them with ``--run-config`` keys: what it raised,
    :class:`_Resumed` (with its config) when the check of its settings let it resume."""
    import simulation.pipeline as pipeline
    from shared.config import to_flat
    from simulation.config import SimulationConfig

    def stages(config: SimulationConfig, run: Any, started: float, progress: Any) -> None:
        raise _Resumed(config)

    monkeypatch.setattr(pipeline, "_run_stages", stages)
    root = tmp_path / "runs"
    for name, settings in runs.items():
        old = to_flat(SimulationConfig(name=name, run_dir=str(root), **settings))
        for key in dropped:
            del old[key]
        (root / name / "checkpoints").mkdir(parents=True)
        (root / name / "checkpoints" / "round-00000001.json").write_text("{}")
        (root / name / "config.json").write_text(json.dumps({"simulation": old}))

    def rerun(name: str, keys: str) -> BaseException | None:
        args = ["simulate", "--backend", "inprocess", "--run-dir", str(root), "--name", name]
        return CliRunner().invoke(app, [*args, "--run-config", keys]).exception

    return rerun


def test_a_run_from_before_median_clipping_resumes_only_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run directory written before `update-clip-median-multiple` existed has no such key:
    its plain FedAvg rounds clipped no update to a median multiple. A rerun compared the key
    with today's default (5), so resuming it with the default switched the clipping on in the
    middle of the run and recorded 5 for all of it, while `update-clip-median-multiple=0`,
    what its rounds ran with, was refused as a change. Under SecAgg+ it clips nothing."""
    runs = {"plain": {"secagg": False}, "secagg": {"secagg": True}}
    rerun = _previous_release_reruns(tmp_path, monkeypatch, runs, ["update-clip-median-multiple"])
    refused = rerun("plain", "secagg=false")
    assert isinstance(refused, ConfigError)
    assert "other settings (update-clip-median-multiple 0.0 -> 5.0)" in str(refused)
    resumed = rerun("plain", "secagg=false update-clip-median-multiple=0")
    assert isinstance(resumed, _Resumed)
    assert resumed.args[0].update_clip_median_multiple == 0
    for keys in ("secagg=true", "update-clip-median-multiple=0"):  # it clips nothing there
        assert isinstance(rerun("secagg", keys), _Resumed), keys


def test_a_run_from_before_the_round_caps_resumes_with_any_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run directory written before `max-round-steps` and `max-round-epsilon` existed
    trained every round uncapped. Resumed with today's defaults, a run whose rounds spend
    more (here 14 epsilon a round at noise 0.5) has every client decline; the fix the
    decline names, raising the cap in the run config, was refused as a change of a setting
    the run never recorded ("max-round-epsilon 6.0 -> 100.0")."""
    runs = {"old": {"noise_multiplier": 0.5, "epsilon_budget": 1000.0}}
    rerun = _previous_release_reruns(
        tmp_path, monkeypatch, runs, ["max-round-steps", "max-round-epsilon"]
    )
    settings = "noise-multiplier=0.5 epsilon-budget=1000"
    for caps in ("", "max-round-epsilon=100", "max-round-steps=5000", "max-round-epsilon=2"):
        resumed = rerun("old", f"{settings} {caps}")
        assert isinstance(resumed, _Resumed), (caps, resumed)


def test_the_stored_settings_of_a_run_from_before_median_clipping_say_it_ran_without(
    tmp_path: Path,
) -> None:
    """`stored_config` filled a setting the run did not record with today's default: a
    plain run from before `update-clip-median-multiple` read as clipped at 5, and the
    federation benchmark's --reuse-runs refused its no-DP references (run, like those runs,
    with 0) as "run with other update-clip-median-multiple"."""
    from shared.config import to_flat
    from simulation.config import SimulationConfig
    from simulation.pipeline import stored_config

    for name, secagg, ran_with in (("plain", False, 0.0), ("secagg", True, 5.0)):
        root = tmp_path / name
        root.mkdir()
        old = to_flat(SimulationConfig(secagg=secagg, dp=False))
        for key in ("update-clip-median-multiple", "max-round-steps", "max-round-epsilon"):
            del old[key]  # as the previous release wrote it
        (root / "config.json").write_text(json.dumps({"simulation": old}))
        stored = stored_config(root)
        assert stored is not None
        assert stored.update_clip_median_multiple == ran_with, name
        assert stored.max_round_steps == SimulationConfig.max_round_steps
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    flat = to_flat(SimulationConfig(secagg=False, update_clip_median_multiple=7.0))
    (recorded / "config.json").write_text(json.dumps({"simulation": flat}))
    stored = stored_config(recorded)
    assert stored is not None and stored.update_clip_median_multiple == 7.0


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stderr", "progress", "bars"),
    [(io.StringIO, True, False), (_Terminal, True, True), (_Terminal, False, False)],
)
def test_pretraining_bars_are_drawn_on_a_terminal_only(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stderr: type[io.StringIO],
    progress: bool,
    bars: bool,
) -> None:
    """Into a log or a pipe the README promises a line per stage and round, but the text
    encoder's weight-loading bar and the teacher's and student's epoch bars (tqdm, redrawn
    with carriage returns) were written there too: one line of thousands of redraws."""
    import simulation.pipeline
    from simulation.config import SimulationConfig

    seen: dict[str, bool] = {}

    def encoder(text_model: str, cache: Path, show: bool = False, device: str = "cpu") -> None:
        seen["encoder"] = show

    def pretrain(*args: Any, progress: bool = False, **kwargs: Any) -> Any:
        seen["pretrain"] = progress
        raise ConfigError("stop here")

    monkeypatch.setattr(simulation.pipeline, "encoder_config", encoder)
    monkeypatch.setattr(
        simulation.pipeline, "encode_items", lambda text, cfg: np.zeros((len(text), 8))
    )
    monkeypatch.setattr(simulation.pipeline, "pretrain", pretrain)
    monkeypatch.setattr(sys, "stderr", stderr())
    config = SimulationConfig(
        synthetic_users=40, run_dir=str(tmp_path), cache_dir=str(tmp_path), progress=progress
    )
    with pytest.raises(ConfigError, match="stop here"):
        simulation.pipeline.run_pipeline(config)
    assert seen == {"encoder": bars, "pretrain": bars}
