"""Server checkpoints (atomic, verified, resumable), artifact publication, user-level DP.

End-to-end tests use the in-process runner with the toy task, which is deterministic
(data from ``(seed, client)``, cohorts from ``(seed, round)``, replies aggregated in
send order), so a resumed run can be compared bit for bit with an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from flwr.app import Context, Message
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant

from client.client_app import make_client_app
from server.checkpoint import ArtifactPublisher, CheckpointStore, write_npz_artifact
from server.server_app import ServerConfig, make_server_app, run_in_process
from server.strategy import RoundReport
from server.user_dp import UserDPSettings, UserLevelDP
from shared.errors import ConfigError, DataError, ModelFileError
from shared.federated import ToyLinearConfig, ToyLinearTask, clip_update_l2, register_task
from shared.privacy.ledger import RDP_ORDERS
from shared.published import record_published
from tests.conftest import flower_log


def _eps(acc: RDPAccountant, delta: float) -> float:
    """Epsilon at the ledger's Renyi orders (what the server reports)."""
    return float(acc.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))


Arrays = list[npt.NDArray[Any]]
RunConfig = dict[str, bool | int | float | str]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Instruction messages need a process task identity (Flower's runtimes set it)."""
    try:
        _ = TaskIdentity.run_id
    except RuntimeError:
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 1
        TaskIdentity.task_id = 1


def _run(
    run_config: RunConfig,
    num_nodes: int,
    *,
    hook: Callable[[RoundReport], None] | None = None,
    extra_mods: Sequence[Any] = (),
) -> list[RoundReport]:
    reports: list[RoundReport] = []

    def on_round_end(report: RoundReport) -> None:
        reports.append(report)
        if hook is not None:
            hook(report)

    run_in_process(
        make_server_app(run_config, on_round_end=on_round_end),
        make_client_app(extra_mods=extra_mods),
        num_nodes,
        run_config=run_config,
    )
    return reports


def _params(seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=1).astype(np.float32)]


def _temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def _round_recorder(seen: list[int]) -> Callable[..., Message]:
    """Client mod recording the ``server-round`` of every plain train instruction."""

    def mod(
        msg: Message, ctx: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        if msg.metadata.message_type == "train" and "fitins.config" in msg.content.config_records:
            value = msg.content.config_records["fitins.config"].get("server-round")
            if isinstance(value, int):
                seen.append(value)
        return call_next(msg, ctx)

    return mod


# ------------------------------------------------------------------ checkpoint store


def test_store_roundtrip_keeps_the_newest_n_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    assert store.latest() is None
    for r in range(1, 5):
        store.save(r, _params(r), {"seed": r}, {"history": [[1.0, 0.5, r]]}, {"loss": 1.0 / r})
    assert store.rounds() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "round-00000003.json",
        "round-00000003.npz",
        "round-00000004.json",
        "round-00000004.npz",
    ]
    latest = store.latest()
    assert latest is not None and latest.server_round == 4
    for got, want in zip(latest.parameters, _params(4), strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype
    assert latest.strategy_state == {"seed": 4}
    assert latest.ledger_state == {"history": [[1.0, 0.5, 4]]}
    assert latest.metrics == {"loss": 0.25}
    manifest = json.loads((tmp_path / "round-00000004.json").read_text())
    assert len(manifest["sha256"]) == 64 and manifest["round"] == 4
    # Non-finite metrics become null (strict JSON); unserializable state is refused.
    store.save(5, _params(), {}, None, {"loss": float("nan")})
    assert store.load(5).metrics == {"loss": None} and store.load(5).ledger_state is None
    with pytest.raises(ConfigError, match="strategy state is not strict-JSON"):
        store.save(6, _params(), {"rng": object()}, None)
    assert store.rounds() == [4, 5]
    assert _temp_files(tmp_path) == []


def test_store_removes_stale_temp_files_and_orphan_arrays(tmp_path: Path) -> None:
    (tmp_path / ".round-00000007.npz.abc.tmp").write_bytes(b"half a write")
    (tmp_path / ".user-dp-journal.json.x1y2.tmp").write_bytes(b"half a journal")
    store = CheckpointStore(tmp_path)
    assert _temp_files(tmp_path) == []
    (tmp_path / "round-00000009.npz").write_bytes(b"crashed before its manifest")
    assert store.latest() is None  # no manifest = no checkpoint
    store.save(1, _params(), {}, None)
    assert store.rounds() == [1] and not (tmp_path / "round-00000009.npz").exists()


def _truncate_arrays(path: Path) -> None:
    npz = path.with_suffix(".npz")
    npz.write_bytes(npz.read_bytes()[:50])


def _flip_a_byte(path: Path) -> None:
    npz = path.with_suffix(".npz")
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))


def _garble_manifest(path: Path) -> None:
    path.write_text(path.read_text()[:40])


def _drop_arrays(path: Path) -> None:
    path.with_suffix(".npz").unlink()


def _size_past_any_float(path: Path) -> None:
    path.write_text(path.read_text().replace('"size": ', '"size": 1e400, "was": ', 1))


def _nested_too_deep(path: Path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


def _wrong_version(path: Path) -> None:
    manifest = json.loads(path.read_text())
    manifest["version"] = 99
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_truncate_arrays, "do not match their manifest"),
        (_flip_a_byte, "do not match their manifest"),
        (_garble_manifest, "is unreadable"),
        (_drop_arrays, "are unreadable"),
        (_wrong_version, "has version 99"),
        # both raised past the checks (OverflowError, RecursionError): a traceback, and no
        # fall-back to the checkpoint before
        (_size_past_any_float, "is malformed"),
        (_nested_too_deep, "is unreadable"),
    ],
)
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    corrupt: Callable[[Path], None],
    message: str,
) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    for r in (1, 2, 3):
        store.save(r, _params(r), {"r": r}, None)
    corrupt(tmp_path / "round-00000003.json")
    with caplog.at_level(logging.WARNING, logger="server.checkpoint"):
        latest = store.latest()
    assert latest is not None and latest.server_round == 2
    np.testing.assert_array_equal(latest.parameters[0], _params(2)[0])
    assert "skipping invalid checkpoint of round 3" in caplog.text and message in caplog.text
    with pytest.raises(DataError, match=message):
        store.load(3)


def test_saving_never_prunes_the_new_checkpoint_for_skipped_newer_ones(tmp_path: Path) -> None:
    """Unreadable checkpoints of later rounds (a resume skipped them) must not count toward
    ``keep``: counted, they made the save of round 4 delete round 4 itself."""
    store = CheckpointStore(tmp_path, keep=3)
    for r in (1, 2, 3):
        store.save(r, _params(r), {}, None)
    for r in (7, 8, 9):
        (tmp_path / f"round-{r:08d}.json").write_text("{not a checkpoint")
    latest = store.latest()
    assert latest is not None and latest.server_round == 3
    store.save(4, _params(4), {}, None)
    latest = store.latest()
    assert latest is not None and latest.server_round == 4
    assert store.rounds() == [2, 3, 4, 7, 8, 9]  # round 1 pruned; the skipped ones left alone


def test_all_checkpoints_invalid_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for r in (1, 2):
        store.save(r, _params(r), {}, None)
        _truncate_arrays(tmp_path / f"round-{r:08d}.json")
    with pytest.raises(DataError, match=r"all 2 checkpoint.*refusing to start over"):
        store.latest()


def test_a_checkpoint_pruned_while_it_is_read_is_not_reported_invalid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedrec server status` beside a server with checkpoint-keep=1: the server saved round
    2 and pruned round 1 between the reader listing round 1 and loading it, and the reader
    said every checkpoint was invalid and a restart would refuse to start."""
    writer = CheckpointStore(tmp_path, keep=1)
    writer.save(1, _params(1), {}, None)
    reader = CheckpointStore(tmp_path, tidy=False)
    load = reader.load
    loaded: list[int] = []

    def load_while_the_server_saves(server_round: int) -> Any:
        if not loaded:  # the server finishes its next round right after the listing
            writer.save(server_round + 1, _params(2), {}, None)
        loaded.append(server_round)
        return load(server_round)

    monkeypatch.setattr(reader, "load", load_while_the_server_saves)
    latest = reader.latest()
    assert latest is not None and latest.server_round == 2
    assert loaded == [1, 2]

    # a checkpoint that keeps vanishing is not taken for "none here" (a fresh start)
    monkeypatch.setattr(reader, "load", lambda r: (_ for _ in ()).throw(DataError("gone")))
    monkeypatch.setattr(reader, "_rounds_on_disk", lambda: [7])
    with pytest.raises(DataError, match="kept changing while they were read"):
        reader.latest()


def test_store_rejects_bad_keep() -> None:
    with pytest.raises(ConfigError, match="'checkpoint-keep' must be an integer >= 1"):
        CheckpointStore("unused", keep=0)


# ------------------------------------------------------------------ config


def test_server_config_reads_the_new_keys() -> None:
    cfg = ServerConfig.from_run_config(
        {
            "checkpoint-dir": "/tmp/ck",
            "checkpoint-keep": 5,
            "artifact-dir": "/tmp/art",
            "user-dp": True,
            "user-dp-clip": 0.5,
            "user-dp-noise-multiplier": 1.2,
            "user-dp-delta": 1e-4,
            "user-dp-epsilon-budget": 8,
            "population-size": 100,
            "secagg": True,
        }
    )
    assert (cfg.checkpoint_dir, cfg.checkpoint_keep, cfg.artifact_dir) == ("/tmp/ck", 5, "/tmp/art")
    assert cfg.user_dp and cfg.user_dp_epsilon_budget == 8.0 and cfg.population_size == 100
    assert cfg.effective_clip_norm == 0.5
    assert cfg.secagg_settings is not None and cfg.secagg_settings.max_weight == 1.0
    assert ServerConfig.from_run_config(cfg.to_run_config()) == cfg


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ({"checkpoint-keep": 0}, "'checkpoint-keep' must be >= 1"),
        ({"checkpoint-keep": 1.5}, "checkpoint-keep must be int, got 1.5"),
        ({"artifact-keep": -1}, r"'artifact-keep' must be >= 0 \(the newest published .*0: keep"),
        ({"artifact-keep": 2.5}, "artifact-keep must be int, got 2.5"),
        (
            {"artifact-kep": 3},
            "unknown server setting 'artifact-kep'; did you mean 'artifact-keep'",
        ),
        ({"user-dp": True, "user-dp-clip": 0.0}, "'user-dp-clip' must be > 0 with user-dp"),
        (
            {"user-dp": True, "user-dp-clip": 1.0, "user-dp-noise-multiplier": 0},
            "'user-dp-noise-multiplier' must be > 0",
        ),
        ({"user-dp": True, "user-dp-clip": 1.0, "user-dp-delta": 1.0}, "'user-dp-delta'"),
        (
            {"user-dp": True, "user-dp-clip": 1.0, "update-clip-norm": 2.0},
            "'update-clip-norm' .* differs from 'user-dp-clip'",
        ),
        ({"user-dp": True, "user-dp-clip": 1.0, "population-size": 1}, "'population-size'"),
        ({"user-dp-budget": 3.0}, "unknown server setting 'user-dp-budget'"),
    ],
)
def test_server_config_rejects_bad_new_values(run_config: RunConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig.from_run_config(run_config)


# ------------------------------------------------------------------ checkpoint + resume


def test_checkpoint_written_every_round_atomically(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    seen: list[tuple[int, list[int]]] = []

    def hook(report: RoundReport) -> None:  # runs after the server saved the round
        store = CheckpointStore(ck, keep=2)
        latest = store.latest()
        assert latest is not None and latest.server_round == report.server_round
        for got, want in zip(latest.parameters, report.parameters, strict=True):
            np.testing.assert_array_equal(got, want)
        assert latest.metrics["clients-ok"] == report.fit.ok
        assert _temp_files(ck) == []
        seen.append((report.server_round, store.rounds()))

    config: RunConfig = {"num-rounds": 3, "checkpoint-dir": str(ck), "checkpoint-keep": 2}
    _run(config, num_nodes=3, hook=hook)
    assert seen == [(1, [1]), (2, [1, 2]), (3, [2, 3])]
    assert _temp_files(ck) == []


RESUME_CONFIG: RunConfig = {
    "num-rounds": 4,
    "cohort-size": 3,
    "eval-size": 2,
    "seed": 11,
    "toy-heterogeneity": 0.5,
}


def test_killed_run_resumes_with_the_remaining_rounds_and_same_result(tmp_path: Path) -> None:
    reference = _run(RESUME_CONFIG, num_nodes=5)
    assert [r.server_round for r in reference] == [1, 2, 3, 4]

    config = {**RESUME_CONFIG, "checkpoint-dir": str(tmp_path / "ck")}

    def kill_after_round_2(report: RoundReport) -> None:
        if report.server_round == 2:
            raise RuntimeError("killed after round 2")

    with pytest.raises(RuntimeError, match="killed after round 2"):
        _run(config, num_nodes=5, hook=kill_after_round_2)
    assert CheckpointStore(tmp_path / "ck").rounds() == [1, 2]

    fit_rounds: list[int] = []
    resumed = _run(config, num_nodes=5, extra_mods=[_round_recorder(fit_rounds)])
    assert [r.server_round for r in resumed] == [3, 4]
    assert sorted(set(fit_rounds)) == [3, 4]  # clients see the continued numbering
    assert [r.fit.sampled for r in resumed] == [3, 3]
    for got, want in zip(resumed[-1].parameters, reference[-1].parameters, strict=True):
        np.testing.assert_array_equal(got, want)
    assert CheckpointStore(tmp_path / "ck").rounds() == [2, 3, 4]

    # A finished run restarted with the same directory has nothing left to do.
    assert _run(config, num_nodes=5) == []


def test_a_resumed_fedadam_run_takes_the_steps_of_an_uninterrupted_one(tmp_path: Path) -> None:
    """Adam's moments and step count (its bias correction) come back from the checkpoint: 2
    rounds + kill + 2 resumed rounds end with the parameters and optimiser state, bit for
    bit, of 4 rounds straight."""
    config = {**RESUME_CONFIG, "server-optimizer": "adam", "server-lr": 0.05}
    straight = _run({**config, "checkpoint-dir": str(tmp_path / "straight")}, num_nodes=5)

    def kill_after_round_2(report: RoundReport) -> None:
        if report.server_round == 2:
            raise RuntimeError("killed")

    resumed_config = {**config, "checkpoint-dir": str(tmp_path / "ck")}
    with pytest.raises(RuntimeError, match="killed"):
        _run(resumed_config, num_nodes=5, hook=kill_after_round_2)
    resumed = _run(resumed_config, num_nodes=5)
    assert [r.server_round for r in resumed] == [3, 4]
    for got, want in zip(resumed[-1].parameters, straight[-1].parameters, strict=True):
        np.testing.assert_array_equal(got, want)
    a, b = (
        CheckpointStore(tmp_path / "straight").latest(),
        CheckpointStore(tmp_path / "ck").latest(),
    )
    assert a is not None and b is not None
    assert a.strategy_state["server_optimizer"]["steps"] == 4
    assert b.strategy_state == a.strategy_state  # the moments too (base64 of their float64s)


def test_resume_skips_a_corrupt_newest_checkpoint_and_reruns_that_round(tmp_path: Path) -> None:
    reference = _run({**RESUME_CONFIG, "num-rounds": 3}, num_nodes=5)
    ck = tmp_path / "ck"
    config = {**RESUME_CONFIG, "num-rounds": 3, "checkpoint-dir": str(ck)}

    def kill_after_round_2(report: RoundReport) -> None:
        if report.server_round == 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        _run(config, num_nodes=5, hook=kill_after_round_2)
    _truncate_arrays(ck / "round-00000002.json")
    resumed = _run(config, num_nodes=5)
    assert [r.server_round for r in resumed] == [2, 3]
    for got, want in zip(resumed[-1].parameters, reference[-1].parameters, strict=True):
        np.testing.assert_array_equal(got, want)
    assert CheckpointStore(ck).latest() is not None


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    ck = str(tmp_path / "ck")
    _run({"num-rounds": 1, "checkpoint-dir": ck, "eval-fraction": 0.0}, num_nodes=2)
    with pytest.raises(ConfigError, match="does not fit task 'toy-linear'"):
        _run(
            {"num-rounds": 2, "checkpoint-dir": ck, "eval-fraction": 0.0, "toy-dim": 3},
            num_nodes=2,
        )


# ------------------------------------------------------------------ publication


class PublishingToyTask(ToyLinearTask):
    """The toy task plus the optional ArtifactPublisher protocol (npz artifacts)."""

    def publish_artifact(
        self, parameters: Sequence[npt.NDArray[np.floating]], version: int, out_dir: Path
    ) -> Path:
        return write_npz_artifact(parameters, version, out_dir, stem="toy")


def _publishing_run(name: str, task: type[ToyLinearTask], tmp_path: Path) -> RunConfig:
    """Register ``task`` as ``name``; a 3-round run config that checkpoints and publishes
    into ``tmp_path / 'ck'`` and ``tmp_path / 'artifacts'``."""
    register_task(name, lambda rc: task(ToyLinearConfig.from_run_config(rc)), replace=True)
    return {
        "task": name,
        "num-rounds": 3,
        "eval-fraction": 0.0,
        "artifact-dir": str(tmp_path / "artifacts"),
        "checkpoint-dir": str(tmp_path / "ck"),
    }


def test_publisher_writes_a_versioned_artifact_per_round(tmp_path: Path) -> None:
    assert isinstance(PublishingToyTask(), ArtifactPublisher)
    assert not isinstance(ToyLinearTask(), ArtifactPublisher)
    out = tmp_path / "artifacts"
    config = _publishing_run("toy-publishing", PublishingToyTask, tmp_path)
    reports = _run(config, num_nodes=3)
    assert sorted(p.name for p in out.glob("*.npz")) == ["toy-v1.npz", "toy-v2.npz", "toy-v3.npz"]
    for report in reports:
        with np.load(out / f"toy-v{report.server_round}.npz") as npz:
            for i, arr in enumerate(report.parameters):
                np.testing.assert_array_equal(npz[f"arr_{i:04d}"], arr)
        meta = json.loads((out / f"toy-v{report.server_round}.json").read_text())
        assert meta["version"] == report.server_round and len(meta["sha256"]) == 64
    assert _temp_files(out) == []
    # The plain toy task has no publisher: artifact-dir is ignored (with a warning).
    plain = {**config, "task": "toy-linear", "checkpoint-dir": "", "num-rounds": 1}
    _run({**plain, "artifact-dir": str(tmp_path / "none")}, num_nodes=2)
    assert not (tmp_path / "none").exists()


def test_a_rerun_round_never_republishes_a_version_under_another_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Round 3's checkpoint is unreadable, so the run resumes from round 2 and trains round 3
    again, to another model (on devices: fresh noise, new data). It used to overwrite the
    toy-v3 that devices may hold: one version number, two models."""
    out = tmp_path / "artifacts"
    config = _publishing_run("toy-publishing", PublishingToyTask, tmp_path)
    _run(config, num_nodes=3)
    published = (out / "toy-v3.npz").read_bytes()
    _truncate_arrays(tmp_path / "ck" / "round-00000003.json")
    with caplog.at_level(logging.WARNING):
        rerun = _run({**config, "num-rounds": 4, "toy-lr": 0.5}, num_nodes=3)
    assert [r.server_round for r in rerun] == [3, 4]
    assert (out / "toy-v3.npz").read_bytes() == published
    with np.load(out / "toy-v3.npz") as npz:  # the rerun's round 3 is another model
        assert not np.array_equal(npz["arr_0000"], rerun[0].parameters[0])
    assert "model version 3 is not published" in caplog.text
    with np.load(out / "toy-v4.npz") as npz:  # publication goes on after the lost rounds
        np.testing.assert_array_equal(npz["arr_0000"], rerun[-1].parameters[0])


def test_a_run_without_a_checkpoint_numbers_its_versions_after_those_published(
    tmp_path: Path,
) -> None:
    """`fedrec server init --force` keeps the record of published versions (versions 1-3
    here, their files gone) and wipes the checkpoints. The new run published its round 1
    as version 1 again, another model under a number devices may hold (refused once the
    record was kept, so nothing was published until its rounds passed the old versions).
    It publishes after the highest recorded version, and its checkpoints keep that base: a
    resume goes on from it even if versions were recorded meanwhile."""
    out = tmp_path / "artifacts"
    out.mkdir()
    record_published(out, "model-v3.int8.onnx", "3", "a" * 64)
    config = {**_publishing_run("toy-publishing", PublishingToyTask, tmp_path), "num-rounds": 2}
    reports = _run(config, num_nodes=3)
    assert sorted(p.name for p in out.glob("*.npz")) == ["toy-v4.npz", "toy-v5.npz"]
    for report in reports:
        meta = json.loads((out / f"toy-v{report.server_round + 3}.json").read_text())
        assert meta["version"] == report.server_round + 3
    latest = CheckpointStore(tmp_path / "ck").latest()
    assert latest is not None and latest.extra["version-base"] == 3
    record_published(out, "model-v9.int8.onnx", "9", "b" * 64)
    resumed = _run({**config, "num-rounds": 3}, num_nodes=3)
    assert [r.server_round for r in resumed] == [3]
    with np.load(out / "toy-v6.npz") as npz:
        np.testing.assert_array_equal(npz["arr_0000"], resumed[-1].parameters[0])
    # a damaged base is refused naming its file, before anything runs
    from server.server_app import check_resume

    latest = CheckpointStore(tmp_path / "ck").latest()
    assert latest is not None
    data = json.loads(latest.manifest_path.read_text())
    data["extra"]["version-base"] = -1
    latest.manifest_path.write_text(json.dumps(data))
    server = ServerConfig.from_run_config({**config, "num-rounds": 5})
    with pytest.raises(DataError, match=r"round-00000003\.json has a malformed 'version-base'"):
        check_resume(server, ToyLinearTask().initial_parameters())


def test_an_unreadable_record_of_versions_is_refused_before_a_run_without_a_checkpoint(
    tmp_path: Path,
) -> None:
    """A run that starts without a checkpoint numbers its versions after the record's highest
    and refuses to start when the record cannot be read; `server start` launched it anyway,
    and the user saw only a failed run, its reason in the ServerApp's log."""
    from server.server_app import check_resume

    out = tmp_path / "artifacts"
    (out / "published.jsonl").mkdir(parents=True)  # there, but not a readable file
    config = _publishing_run("toy-publishing", PublishingToyTask, tmp_path)
    server = ServerConfig.from_run_config(config)
    with pytest.raises(ModelFileError, match=r"published\.jsonl is unreadable"):
        check_resume(server, ToyLinearTask().initial_parameters())
    (out / "published.jsonl").rmdir()
    check_resume(server, ToyLinearTask().initial_parameters())  # no record yet: fine


def test_a_withheld_version_stays_withheld_after_another_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, then the process dies right after the rerun round 3's checkpoint. The next
    start resumes from that (valid) checkpoint and republishes its model, in case the
    process died before publishing it: no checkpoint on disk said version 3 was out with
    another model any more, so toy-v3 was overwritten."""
    out = tmp_path / "artifacts"
    config = _publishing_run("toy-publishing", PublishingToyTask, tmp_path)
    _run(config, num_nodes=3)
    published = (out / "toy-v3.npz").read_bytes()
    _truncate_arrays(tmp_path / "ck" / "round-00000003.json")
    real_save = CheckpointStore.save

    def dies_after_saving_round_3(
        self: CheckpointStore, server_round: int, *a: Any, **k: Any
    ) -> Path:
        path = real_save(self, server_round, *a, **k)
        if server_round == 3:
            raise RuntimeError("killed after the checkpoint of round 3")
        return path

    rerun = {**config, "num-rounds": 4, "toy-lr": 0.5}
    with monkeypatch.context() as patch:
        patch.setattr(CheckpointStore, "save", dies_after_saving_round_3)
        with pytest.raises(RuntimeError, match="killed after the checkpoint"):
            _run(rerun, num_nodes=3)
    assert CheckpointStore(tmp_path / "ck").latest().server_round == 3  # type: ignore[union-attr]
    resumed = _run(rerun, num_nodes=3)
    assert [r.server_round for r in resumed] == [4]
    assert (out / "toy-v3.npz").read_bytes() == published
    with np.load(out / "toy-v4.npz") as npz:
        np.testing.assert_array_equal(npz["arr_0000"], resumed[-1].parameters[0])
    latest = CheckpointStore(tmp_path / "ck").latest()
    assert latest is not None and latest.extra["withheld-versions"] == [3]
    # a damaged list is refused naming its file, before anything runs
    from server.server_app import check_resume

    data = json.loads(latest.manifest_path.read_text())
    data["extra"]["withheld-versions"] = "3"
    latest.manifest_path.write_text(json.dumps(data))
    server = ServerConfig.from_run_config({**rerun, "num-rounds": 5})
    with pytest.raises(DataError, match=r"round-00000004\.json has a malformed 'withheld-"):
        check_resume(server, ToyLinearTask().initial_parameters())


class FailingPublisherToyTask(ToyLinearTask):
    """A publisher whose round-2 artifact fails its check (e.g. the int8 agreement gate)."""

    def publish_artifact(
        self, parameters: Sequence[npt.NDArray[np.floating]], version: int, out_dir: Path
    ) -> Path:
        if version == 2:
            raise ModelFileError("int8 top-10 agreement 0.80 < 0.97: not published")
        return write_npz_artifact(parameters, version, out_dir, stem="toy")


def test_a_failed_publication_is_logged_and_the_run_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "artifacts"
    config = _publishing_run("toy-failing-publisher", FailingPublisherToyTask, tmp_path)
    with caplog.at_level(logging.ERROR):
        reports = _run(config, num_nodes=3)
    assert [r.server_round for r in reports] == [1, 2, 3]  # training was not stopped
    assert sorted(p.name for p in out.glob("*.npz")) == ["toy-v1.npz", "toy-v3.npz"]
    assert "model version 2 was NOT published (int8 top-10 agreement" in caplog.text
    assert CheckpointStore(tmp_path / "ck").rounds() == [1, 2, 3]


class Int8NamedToyTask(ToyLinearTask):
    """Publishes the toy model's bytes as ``model-v{N}.int8.onnx`` through the student
    task's publication (:func:`publish_artifact_once`); version 4 fails while
    ``FAIL_VERSION_4`` is set (e.g. the int8 agreement gate)."""

    FAIL_VERSION_4 = True

    def publish_artifact(
        self, parameters: Sequence[npt.NDArray[np.floating]], version: int, out_dir: Path
    ) -> Path:
        from shared.compression.artifact import StudentArtifact, publish_artifact_once
        from shared.published import artifact_file_name

        if version == 4 and self.FAIL_VERSION_4:
            raise ModelFileError("int8 top-10 agreement 0.80 < 0.97: not published")
        data = b"".join(np.asarray(a).tobytes() for a in parameters)
        built = StudentArtifact(int8=data, fp32_bytes=len(data), agreement=1.0, sparsity=0.0)
        path = out_dir / artifact_file_name(version)
        publish_artifact_once(built, ["a"], path, version=str(version))
        return path


def test_the_server_keeps_the_newest_artifact_keep_models_and_records_every_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server kept every published model for ever (one per round: months of rounds filled
    its disk). With artifact-keep=2 the older ones go after each publication, never after a
    failed one; a resumed run republishes its checkpoint's model and goes on."""
    from shared.published import RECORD_FILE, artifact_versions, published_digests

    out = tmp_path / "artifacts"
    config = {
        **_publishing_run("toy-int8-named", Int8NamedToyTask, tmp_path),
        "num-rounds": 4,
        "artifact-keep": 2,
    }
    assert [r.server_round for r in _run(config, num_nodes=3)] == [1, 2, 3, 4]
    # version 4 failed: nothing removed after it, v2 and v3 stay
    assert sorted(artifact_versions(out)) == [2, 3]
    assert sorted(published_digests(out)) == [f"model-v{v}.int8.onnx" for v in (1, 2, 3)]
    monkeypatch.setattr(Int8NamedToyTask, "FAIL_VERSION_4", False)
    resumed = _run({**config, "num-rounds": 6}, num_nodes=3)
    assert [r.server_round for r in resumed] == [5, 6]  # v4 republished from its checkpoint
    assert sorted(artifact_versions(out)) == [5, 6]
    assert len((out / RECORD_FILE).read_text().splitlines()) == 6  # every version, once
    # 0 keeps them all (the simulation's run directories)
    _run({**config, "num-rounds": 8, "artifact-keep": 0}, num_nodes=3)
    assert sorted(artifact_versions(out)) == [5, 6, 7, 8]


def test_a_checkpoint_of_another_bundle_is_never_resumed(tmp_path: Path) -> None:
    """A checkpoint did not say which bundle it was trained from: a server restarted with
    another bundle of the same shape resumed it, and republished its model versions with the
    other bundle's catalog."""
    from server.server_app import check_resume

    ck = tmp_path / "ck"
    first = {"num-rounds": 2, "eval-fraction": 0.0, "checkpoint-dir": str(ck)}
    assert len(_run({**first, "bundle-sha256": "a" * 64}, num_nodes=3)) == 2
    latest = CheckpointStore(ck).latest()
    assert latest is not None and latest.extra["bundle-sha256"] == "a" * 64
    other = {**first, "num-rounds": 3, "bundle-sha256": "b" * 64}
    with pytest.raises(ConfigError, match=r"trained from bundle aaaaaaaaaaaa\.\.\., this run's"):
        _run(other, num_nodes=3)
    initial = ToyLinearTask().initial_parameters()
    with pytest.raises(ConfigError, match="trained from bundle"):  # refused before launch too
        check_resume(ServerConfig.from_run_config(other), initial, "b" * 64)
    # the same bundle resumes
    assert [r.server_round for r in _run({**other, "bundle-sha256": "a" * 64}, num_nodes=3)] == [3]


# ------------------------------------------------------------------ user-level DP


def _dp_config(overrides: RunConfig | None = None) -> RunConfig:
    config: RunConfig = {
        "num-rounds": 1,
        "eval-fraction": 0.0,
        "user-dp": True,
        "user-dp-clip": 0.5,
        "user-dp-noise-multiplier": 1.0,
        "secagg-timeout": 10.0,
    }
    config.update(overrides or {})
    return config


def _flat(arrays: Sequence[npt.NDArray[Any]]) -> npt.NDArray[np.float64]:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


@pytest.mark.parametrize("secagg", [False, True])
def test_user_dp_noise_std_is_z_c_over_sampled_cohort(secagg: bool) -> None:
    # toy-lr 0: every client update is exactly zero, so the new model is pure noise.
    # Client 1 fails: 5 sampled, 4 aggregated - the noise stays calibrated to m = 5.
    z, c, m = 1.3, 0.5, 5
    config = _dp_config(
        {
            "secagg": secagg,
            "toy-lr": 0.0,
            "toy-dim": 6000,
            "toy-empty-clients": "1",
            "user-dp-noise-multiplier": z,
            "user-dp-clip": c,
        }
    )
    (report,) = _run(config, num_nodes=m)
    assert (report.fit.sampled, report.fit.ok, report.fit.failed) == (5, 4, 1)
    noise = _flat(report.parameters)
    expected = z * c / m
    assert abs(float(np.mean(noise))) < 4 * expected / np.sqrt(noise.size)
    assert float(np.std(noise)) == pytest.approx(expected, rel=0.05)
    assert report.epsilon_user is not None and report.epsilon_user > 0


@pytest.mark.parametrize("secagg", [False, True])
def test_user_dp_noise_is_over_the_expected_cohort_whatever_the_poisson_draw(
    secagg: bool,
) -> None:
    """m in z C / m is the expected cohort (cohort-size), not the number the Poisson draw
    sampled: dividing by the draw would tie the noise to who was sampled. With 12 of 16
    expected the draws vary round to round; each round's noise stays z C / 12 (and the
    above test, where all were sampled, cannot tell the two apart)."""
    z, c, m = 1.3, 0.5, 12
    config = _dp_config(
        {
            "num-rounds": 3,
            "secagg": secagg,
            "toy-lr": 0.0,
            "toy-dim": 6000,
            "population-size": 16,
            "cohort-size": m,
            "min-available-clients": 16,
            "user-dp-noise-multiplier": z,
            "user-dp-clip": c,
            "user-dp-epsilon-budget": 0.0,
        }
    )
    reports = _run(config, num_nodes=16)
    previous = np.zeros_like(_flat(reports[0].parameters))
    for report in reports:
        assert report.fit.updated and report.fit.ok == report.fit.sampled
        step = _flat(report.parameters) - previous
        previous = _flat(report.parameters)
        assert float(np.std(step)) == pytest.approx(z * c / m, rel=0.05), report.fit.sampled


@pytest.mark.parametrize(
    ("secagg", "decline"),
    [(False, "0,1,2,3"), (True, "0,1,2,3"), (True, "0,1,2")],
    ids=["plain-all-declined", "secagg-all-declined", "secagg-too-short-to-unmask"],
)
def test_user_dp_a_round_with_nothing_to_sum_still_releases_the_noise(
    secagg: bool, decline: str
) -> None:
    """A charged round whose clients all declined (or whose secure sum is too short to
    unmask) must release the mechanism's output for an empty sum, N(0, (z C / m)^2): an
    exactly unchanged model tells, with certainty, that no one contributed, where the
    neighbouring dataset with one more contributor gives a noisy model."""
    z, c, m = 1.3, 0.5, 4
    config = _dp_config(
        {
            "secagg": secagg,
            "toy-dim": 6000,
            "toy-decline-clients": decline,
            "user-dp-noise-multiplier": z,
            "user-dp-clip": c,
            "user-dp-epsilon-budget": 0.0,
        }
    )
    (report,) = _run(config, num_nodes=m)
    assert report.fit.ok == 0 and report.fit.sampled == m
    assert report.fit.updated
    noise = _flat(report.parameters)  # the toy model starts at zero
    assert float(np.std(noise)) == pytest.approx(z * c / m, rel=0.05)
    assert report.fit.update_norm == pytest.approx(float(np.linalg.norm(noise)), rel=1e-3)


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
@pytest.mark.parametrize("secagg", [False, True])
def test_user_dp_aggregate_is_the_uniform_mean_of_clipped_updates(secagg: bool) -> None:
    task = ToyLinearTask()
    params = task.initial_parameters()
    clip = 0.5
    # Tiny noise: the aggregate is sum(clip(u_i)) / m with every weight 1 (toy clients
    # have different num_examples, so num_examples weighting would differ visibly).
    config = _dp_config(
        {
            "secagg": secagg,
            "user-dp-noise-multiplier": 1e-9,
            "user-dp-clip": clip,
            "user-dp-epsilon-budget": 0.0,  # no budget: this noise spends any within one round
        }
    )
    (report,) = _run(config, num_nodes=4)
    total = np.zeros(_flat(params).size)
    for client in range(4):
        out = task.fit(client, params, {})
        update = [
            (a.astype(np.float32) - p).astype(np.float32)
            for a, p in zip(out.arrays, params, strict=True)
        ]
        clipped, norm = clip_update_l2(update, clip)
        assert norm > clip  # clipping is active in this test
        total += _flat(clipped)
    expected = total / 4
    tol = 1e-6 if not secagg else 4 * 4 * (2 * 8.0 / 2**22)  # SecAgg+ quantization
    np.testing.assert_allclose(_flat(report.parameters), expected, rtol=0, atol=tol)
    assert report.fit.update_norm == pytest.approx(float(np.linalg.norm(expected)), rel=1e-3)


def _below(n: int, q: float, k: int) -> float:
    """P(Binomial(n, q) < k), summed by hand."""
    return sum(math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(k))


def _user_epsilon(acc: RDPAccountant, delta: float, risk: float) -> float:
    """The module doc's epsilon: the RDP bound at delta less (1 + e^eps(delta/2)) * risk."""
    slack = (1 + math.exp(_eps(acc, delta / 2))) * risk
    assert 0 < slack <= delta / 2
    return _eps(acc, delta - slack)


def test_user_dp_epsilon_each_round_matches_an_opacus_accountant(tmp_path: Path) -> None:
    # Poisson cohorts of expected m = 9 from n = 12: a round is skipped when nobody is
    # sampled (min-cohort 1), which the guarantee charges out of delta
    z, n, m = 1.1, 12, 9
    config = _dp_config(
        {
            "num-rounds": 3,
            "cohort-size": m,
            "min-cohort": 1,
            "user-dp-noise-multiplier": z,
            "checkpoint-dir": str(tmp_path / "ck"),
        }
    )
    reports = _run(config, num_nodes=n)
    risk = _below(n - 1, m / n, 1)  # (1/4)^11 a round
    acc = RDPAccountant()
    for rounds, report in enumerate(reports, start=1):
        acc.step(noise_multiplier=z, sample_rate=m / n)
        expected = _user_epsilon(acc, 1 / n, rounds * risk)
        assert report.epsilon_user == pytest.approx(expected, rel=1e-9)
        assert expected > _eps(acc, 1 / n)  # the risk costs a little
    eps = [r.epsilon_user for r in reports if r.epsilon_user is not None]
    assert len(eps) == 3 and eps == sorted(eps) and len(set(eps)) == 3
    # The ledger is in the checkpoint, and resuming keeps accounting from it.
    latest = CheckpointStore(tmp_path / "ck").latest()
    assert latest is not None and latest.ledger_state is not None
    assert latest.ledger_state["ledger"]["history"] == [[z, m / n, 3]]
    assert latest.ledger_state["round_risk"] == pytest.approx(3 * risk, rel=1e-9)
    assert latest.metrics["epsilon-user"] == pytest.approx(eps[-1])
    more = _run({**config, "num-rounds": 5}, num_nodes=n)
    assert [r.server_round for r in more] == [4, 5]
    acc.step(noise_multiplier=z, sample_rate=m / n)
    acc.step(noise_multiplier=z, sample_rate=m / n)
    assert more[-1].epsilon_user == pytest.approx(_user_epsilon(acc, 1 / n, 5 * risk), rel=1e-9)


def test_user_dp_cohorts_too_small_for_any_guarantee_are_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two of six expected: a round has fewer than min-cohort (2) clients too often for
    delta 1/6, so the run ends before its first round, saying what to raise."""
    with caplog.at_level(logging.WARNING):
        reports = _run(_dp_config({"num-rounds": 2, "cohort-size": 2}), num_nodes=6)
    assert reports == []
    assert "cohorts of 2 of 6 are too small for user-level DP" in caplog.text
    assert "Sample more clients a round (cohort-size" in caplog.text
    # all six every round: nothing is ever skipped, so the same run trains
    assert len(_run(_dp_config({"num-rounds": 2, "cohort-size": 6}), num_nodes=6)) == 2


def test_user_dp_explicit_delta_and_population() -> None:
    """With 45 of a population of 50 connected, each is sampled at m / 50 (the rate the
    ledger charges, whoever is connected), so a round's cohort is about 45 * 0.8."""
    z, m, nodes, population, delta = 0.9, 40, 45, 50, 1e-3
    config = _dp_config(
        {
            "num-rounds": 2,
            "cohort-size": m,
            "min-cohort": 1,
            "user-dp-noise-multiplier": z,
            "population-size": population,
            "user-dp-delta": delta,
        }
    )
    reports = _run(config, num_nodes=nodes)
    assert all(r.fit.sampled <= nodes for r in reports)
    acc = RDPAccountant()
    acc.history = [(z, m / population, 2)]
    risk = 2 * _below(nodes - 1, m / population, 1)
    assert reports[-1].epsilon_user == pytest.approx(_user_epsilon(acc, delta, risk), rel=1e-9)
    with pytest.raises(ConfigError, match="5 nodes are connected but 'population-size' is 4"):
        _run({**config, "population-size": 4}, num_nodes=5)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"delta": -0.1}, "'user-dp-delta' must be in \\[0, 1\\) \\(0: 1 / population\\)"),
        ({"delta": math.nan}, "'user-dp-delta' must be in"),
        ({"epsilon_budget": math.nan}, "'user-dp-epsilon-budget' must be a finite number >= 0"),
        ({"epsilon_budget": -1.0}, "'user-dp-epsilon-budget' must be a finite number >= 0"),
    ],
)
def test_user_dp_settings_refuse_a_negative_or_nan_delta_or_budget(
    values: dict[str, float], message: str
) -> None:
    """Only 0 means the default (1 / population, no budget): a NaN budget became no budget
    at all, and a negative or NaN delta 1 / population, without a word."""
    with pytest.raises(ConfigError, match=message):
        UserDPSettings.create(noise_multiplier=1.0, clip_norm=0.1, population=10, **values)


def _epsilon(z: float, q: float, steps: int, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = [(z, q, steps)]
    return float(_eps(acc, delta))


def test_user_dp_run_stops_cleanly_before_the_budget_would_be_exceeded(tmp_path: Path) -> None:
    z, n = 1.0, 4
    two, three = _epsilon(z, 1.0, 2, 1 / n), _epsilon(z, 1.0, 3, 1 / n)
    budget = (two + three) / 2  # affords exactly two rounds
    ck = tmp_path / "ck"
    config = _dp_config(
        {
            "num-rounds": 5,
            "user-dp-noise-multiplier": z,
            "user-dp-epsilon-budget": budget,
            "checkpoint-dir": str(ck),
        }
    )
    reports = _run(config, num_nodes=n)  # no exception: a clean end
    assert [r.server_round for r in reports] == [1, 2]
    assert reports[-1].epsilon_user == pytest.approx(two) and two <= budget
    # Restarting does not train further: the ledger in the checkpoint is spent.
    assert _run(config, num_nodes=n) == []
    # A budget too small for even one round trains nothing.
    tiny = _epsilon(z, 1.0, 1, 1 / n) / 2
    assert _run(_dp_config({"user-dp-epsilon-budget": tiny}), num_nodes=n) == []


def test_user_dp_run_ends_when_too_few_of_the_population_are_connected_for_a_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop's check planned each round with the whole population connected, the
    strategy's with the clients connected: with 4 of 8 connected, a Poisson cohort at 6 / 8
    falls below min-cohort too often for delta, so the strategy refused every round the loop
    allowed, each reported as fit aborted with the model unchanged, until the run's rounds
    were used up. The strategy's verdict (the one the guarantee needs) now ends the run, its
    checkpoint and ledger as they were."""
    ck = tmp_path / "ck"
    config = _dp_config({"population-size": 8, "cohort-size": 6, "checkpoint-dir": str(ck)})
    assert [r.server_round for r in _run(config, num_nodes=8)] == [1]
    journal = (ck / "user-dp-journal.json").read_text()
    with flower_log(caplog, logging.INFO):
        reports = _run({**config, "num-rounds": 3}, num_nodes=4)
    assert reports == []
    assert "run stopped after round 1: round 2: cohorts of 6 of 8 are too small" in caplog.text
    assert "4 of the population of 8 connected" in caplog.text
    assert "fit aborted" not in caplog.text
    assert CheckpointStore(ck).rounds() == [1]
    assert (ck / "user-dp-journal.json").read_text() == journal  # nothing charged


def test_user_dp_with_secagg_finishes_and_reports_epsilon() -> None:
    n, m = 12, 10
    config = _dp_config(
        {"secagg": True, "num-rounds": 2, "cohort-size": m, "eval-size": 3, "eval-fraction": 1.0}
    )
    reports = _run(config, num_nodes=n)
    assert [r.server_round for r in reports] == [1, 2]
    assert all(r.fit.secure_aggregation and r.fit.updated for r in reports)
    # Flower's SecAgg+ halts a round of fewer clients than its reconstruction threshold
    # (3 by default): the chance of that counts in the guarantee
    risk = _below(n - 1, m / n, 3)
    # the sensitivity is the clip plus SecAgg+'s rounding of the toy model's values
    settings = ServerConfig.from_run_config(config).secagg_settings
    assert settings is not None
    slack = settings.rounding_slack(sum(a.size for a in ToyLinearTask().initial_parameters()))
    acc = RDPAccountant()
    for rounds, report in enumerate(reports, start=1):
        acc.step(noise_multiplier=1.0 * 0.5 / (0.5 + slack), sample_rate=m / n)
        assert report.epsilon_user == pytest.approx(_user_epsilon(acc, 1 / n, rounds * risk))
        assert report.fit.as_metrics()["epsilon-user"] == report.epsilon_user
        assert report.evaluate is not None and report.evaluate.ok > 0


def test_user_dp_spend_of_a_round_that_crashed_before_its_checkpoint_stays_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 2 is charged and its aggregate released (to evaluation), then the server dies
    before round 2's checkpoint: the journal keeps round 2's spend, so the resumed run's
    epsilon counts it, plus round 2 again."""
    z, n = 1.1, 5
    m = n  # every client every round: no skipped rounds, so epsilon is the plain RDP bound
    ck = tmp_path / "ck"
    config = _dp_config(
        {
            "num-rounds": 3,
            "cohort-size": m,
            "user-dp-noise-multiplier": z,
            "checkpoint-dir": str(ck),
        }
    )
    real_save = CheckpointStore.save

    def save_dies_in_round_2(self: CheckpointStore, server_round: int, *a: Any, **k: Any) -> Path:
        if server_round == 2:
            raise RuntimeError("killed before the checkpoint of round 2")
        return real_save(self, server_round, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(CheckpointStore, "save", save_dies_in_round_2)
        with pytest.raises(RuntimeError, match="killed before the checkpoint"):
            _run(config, num_nodes=n)
    assert CheckpointStore(ck).rounds() == [1]
    resumed = _run(config, num_nodes=n)
    assert [r.server_round for r in resumed] == [2, 3]
    charged = 4  # rounds 1, 2 (crashed), 2 again and 3
    assert resumed[-1].epsilon_user == pytest.approx(_epsilon(z, m / n, charged, 1 / n))
    latest = CheckpointStore(ck).latest()
    assert latest is not None and latest.ledger_state is not None
    assert latest.ledger_state["ledger"]["history"] == [[z, m / n, charged]]


def test_user_dp_resuming_an_older_checkpoint_keeps_the_newer_spend(tmp_path: Path) -> None:
    z, n = 1.0, 4
    ck = tmp_path / "ck"
    config = _dp_config({"num-rounds": 2, "user-dp-noise-multiplier": z, "checkpoint-dir": str(ck)})
    assert len(_run(config, num_nodes=n)) == 2
    _truncate_arrays(ck / "round-00000002.json")  # round 2's model was sent out all the same
    rerun = _run(config, num_nodes=n)
    assert [r.server_round for r in rerun] == [2]
    assert rerun[-1].epsilon_user == pytest.approx(_epsilon(z, 1.0, 3, 1 / n))
    # an unreadable journal is refused, never taken as "nothing spent"
    (ck / "user-dp-journal.json").write_text("{")
    with pytest.raises(DataError, match=r"user-level DP journal .* refusing to resume"):
        _run({**config, "num-rounds": 3}, num_nodes=n)


def test_user_dp_resume_keeps_a_journals_spend_while_epsilon_still_reads_zero(
    tmp_path: Path,
) -> None:
    """Epsilon is clamped at 0 while little is spent (large noise, a large delta): a crash
    after round 2 was charged but before its checkpoint left a journal whose epsilon equals
    the checkpoint's, 0, and the resume kept the checkpoint's shorter history, forgetting
    round 2's spend (the rerun round and every later one were then under-counted)."""
    settings = UserDPSettings.create(noise_multiplier=5.0, clip_norm=0.5, population=5)
    journal = tmp_path / "user-dp-journal.json"
    crashed = UserLevelDP(settings, journal=journal)
    crashed.charge_round(1, 5)
    checkpointed = crashed.state_dict()
    crashed.charge_round(2, 5)  # sent out, then the server died before round 2's checkpoint
    assert crashed.epsilon() == 0.0  # two spends at z 5, q 1, delta 1/5 still read 0
    resumed = UserLevelDP(settings, journal=journal)
    assert resumed.resume(checkpointed, 1) == 1
    assert resumed.ledger.history == crashed.ledger.history
    resumed.charge_round(2, 5)
    assert resumed.epsilon() == pytest.approx(_epsilon(5.0, 1.0, 3, 1 / 5))
    assert resumed.epsilon() > 0


def test_user_dp_resumed_with_fewer_nodes_keeps_the_runs_delta(tmp_path: Path) -> None:
    """The default delta is 1 / the nodes connected when the run first starts. A restart that
    counted fewer took a larger delta, so the same spending read as a smaller epsilon and a
    spent budget allowed more rounds; the run's delta now holds for the whole run."""
    from server.server_app import check_resume

    z, ck = 1.0, tmp_path / "ck"
    config = _dp_config(
        {
            "num-rounds": 2,
            "cohort-size": 6,
            "min-cohort": 1,
            "user-dp-noise-multiplier": z,
            "user-dp-epsilon-budget": 0.0,  # none: the rounds below all run
            "checkpoint-dir": str(ck),
        }
    )
    assert len(_run(config, num_nodes=8)) == 2
    resumed = _run({**config, "num-rounds": 3}, num_nodes=6)
    assert [r.server_round for r in resumed] == [3]
    latest = CheckpointStore(ck).latest()
    assert latest is not None and latest.ledger_state is not None
    assert latest.ledger_state["delta"] == pytest.approx(1 / 8)
    assert json.loads((ck / "user-dp-journal.json").read_text())["delta"] == pytest.approx(1 / 8)

    def epsilon_at(population: int) -> float:
        accountant = UserLevelDP(
            UserDPSettings.create(noise_multiplier=z, clip_norm=0.5, population=population)
        )
        accountant.load_state_dict(latest.ledger_state)  # type: ignore[union-attr, arg-type]
        return accountant.epsilon()

    assert resumed[-1].epsilon_user == pytest.approx(epsilon_at(8))
    assert epsilon_at(6) < epsilon_at(8)  # what the restart used to report
    # an explicit delta larger than the run's is refused, before launch and at start
    other = {**config, "num-rounds": 4, "user-dp-delta": 0.2}
    with pytest.raises(ConfigError, match=r"accounted at delta 0\.125.*0\.2 is larger"):
        check_resume(ServerConfig.from_run_config(other), ToyLinearTask().initial_parameters())
    with pytest.raises(ConfigError, match=r"accounted at delta 0\.125"):
        _run(other, num_nodes=6)
    # more nodes counted at a restart: the delta shrinks (a stronger statement), never grows
    more = _run({**config, "num-rounds": 4}, num_nodes=10)
    assert [r.server_round for r in more] == [4]
    latest = CheckpointStore(ck).latest()
    assert latest is not None and latest.ledger_state is not None
    assert latest.ledger_state["delta"] == pytest.approx(1 / 10)
    assert json.loads((ck / "user-dp-journal.json").read_text())["delta"] == pytest.approx(0.1)
    from server.server_app import user_dp_for_run

    server = ServerConfig.from_run_config({**config, "num-rounds": 5})
    assert user_dp_for_run(server, 8, latest, 10).settings.delta == pytest.approx(0.1)  # not 1/8
    smaller = ServerConfig.from_run_config({**config, "user-dp-delta": 0.05})
    assert user_dp_for_run(smaller, 8, latest, 10).settings.delta == 0.05  # stronger: taken


def test_a_user_dp_start_reads_its_journal_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start read the journal for the run's delta, then again to resume from it (and the
    pre-launch check again to check it): once is enough, the server being its one writer."""
    import server.user_dp as user_dp_module
    from server.server_app import check_resume

    ck = tmp_path / "ck"
    config = _dp_config({"cohort-size": 6, "min-cohort": 1, "checkpoint-dir": str(ck)})
    assert len(_run(config, num_nodes=8)) == 1
    reads: list[str] = []
    read_json = user_dp_module.read_json

    def counted(path: Path, **kwargs: Any) -> Any:
        reads.append(Path(path).name)
        return read_json(path, **kwargs)

    monkeypatch.setattr(user_dp_module, "read_json", counted)
    resumed = {**config, "num-rounds": 2}
    check_resume(ServerConfig.from_run_config(resumed), ToyLinearTask().initial_parameters())
    assert reads == ["user-dp-journal.json"]
    reads.clear()
    # 6 nodes: 1/6 is a larger delta than the run's 1/8, which it keeps
    assert [r.server_round for r in _run(resumed, num_nodes=6)] == [2]
    assert reads == ["user-dp-journal.json"]
    journal = json.loads((ck / "user-dp-journal.json").read_text())
    assert journal["delta"] == pytest.approx(1 / 8) and len(journal["rounds"]) == 2


def test_user_dp_resume_refuses_a_non_private_checkpoint(tmp_path: Path) -> None:
    ck = str(tmp_path / "ck")
    _run({"num-rounds": 1, "eval-fraction": 0.0, "checkpoint-dir": ck}, num_nodes=3)
    with pytest.raises(ConfigError, match="trained without user-level DP"):
        _run(_dp_config({"num-rounds": 2, "checkpoint-dir": ck}), num_nodes=3)


def test_user_level_dp_unit_noise_and_state_roundtrip() -> None:
    settings = UserDPSettings.create(noise_multiplier=2.0, clip_norm=0.25, population=10)
    assert settings.delta == pytest.approx(0.1) and settings.epsilon_budget is None
    assert settings.noise_std(5) == pytest.approx(0.1)
    dp = UserLevelDP(settings, rng=np.random.default_rng(0))
    mean = dp.noisy_mean([np.full(200_000, 5.0)], cohort=5)[0]
    assert float(np.mean(mean)) == pytest.approx(1.0, abs=1e-3)
    assert float(np.std(mean)) == pytest.approx(0.1, rel=0.01)
    dp.charge_round(1, 5)
    assert dp.ledger.history[-1].sample_rate == 0.5  # m / population
    with pytest.raises(
        DataError, match=r"already charged.*resume from the checkpoint of the round before"
    ):
        dp.charge_round(1, 5)
    with pytest.raises(ConfigError, match="exceeds the population of 10"):
        dp.charge_round(2, 11)
    restored = UserLevelDP(settings)
    restored.load_state_dict(json.loads(json.dumps(dp.state_dict())))
    assert restored.epsilon() == pytest.approx(dp.epsilon())
    assert restored.epsilon_after(1) == pytest.approx(dp.epsilon())
    with pytest.raises(DataError, match="user-level DP state has version"):
        restored.load_state_dict({"version": 7})
    with pytest.raises(DataError, match="not a JSON object"):
        restored.load_state_dict([1, 2])  # type: ignore[arg-type]


class _FakeClients:
    """A client manager with ``n`` connected clients (ids -> proxies are plain strings)."""

    def __init__(self, n: int) -> None:
        self.clients = {str(1000 + i): f"proxy-{i}" for i in range(n)}

    def num_available(self) -> int:
        return len(self.clients)

    def all(self) -> dict[str, str]:
        return self.clients


def test_user_dp_cohorts_are_secret_while_plain_cohorts_follow_the_seed() -> None:
    """Amplification by sampling assumes nobody but the server can tell who was sampled; the
    seed is in the run config, so under user-level DP the cohorts come from secret
    randomness. Without it they stay a function of (seed, round), for reproducible runs."""
    from typing import cast

    from flwr.common import ndarrays_to_parameters
    from flwr.server.client_manager import ClientManager

    from server.server_app import build_strategy

    manager = cast(ClientManager, _FakeClients(40))
    params = [np.zeros(3)]
    settings = UserDPSettings.create(noise_multiplier=1.0, clip_norm=0.1, population=40)

    def round_one_cohort(user_dp: bool) -> tuple[object, ...]:
        """The first round's cohort of a fresh run (as a restarted server would draw it)."""
        config = ServerConfig(cohort_size=20, seed=3, user_dp=user_dp, population_size=40)
        strategy = build_strategy(
            config, params, user_dp=UserLevelDP(settings) if user_dp else None
        )
        fit = strategy.configure_fit(1, ndarrays_to_parameters(params), manager)
        return tuple(client for client, _ in fit)

    draws = {round_one_cohort(False) for _ in range(2)}
    assert len(draws) == 1  # the seed fixes the cohort
    cohorts = {round_one_cohort(True) for _ in range(6)}
    assert len(cohorts) > 1  # 2^40 possible cohorts: six equal draws would be a bug


def _user_dp_strategy(
    n: int, m: int, z: float = 8.0, connected: int | None = None, **server: Any
) -> tuple[Any, UserLevelDP, Callable[[int], list[str]]]:
    """A strategy under user-level DP over ``n`` fake clients, and a function that draws
    round ``r``'s cohort (noise multiplier ``z``: large, so that hundreds of rounds stay
    within any budget; ``connected`` clients, default all ``n``)."""
    from typing import cast

    from flwr.common import ndarrays_to_parameters
    from flwr.server.client_manager import ClientManager

    from server.server_app import build_strategy

    params = [np.zeros(3)]
    settings = UserDPSettings.create(noise_multiplier=z, clip_norm=0.1, population=n)
    user_dp = UserLevelDP(settings)
    config = ServerConfig(cohort_size=m, user_dp=True, population_size=n, **server)
    strategy = build_strategy(config, params, user_dp=user_dp)
    manager = cast(ClientManager, _FakeClients(n if connected is None else connected))

    def draw(server_round: int) -> list[str]:
        fit = strategy.configure_fit(server_round, ndarrays_to_parameters(params), manager)
        return [cast(str, client) for client, _ in fit]

    return strategy, user_dp, draw


def test_user_level_dp_keeps_its_fixed_clip_and_no_median_clip() -> None:
    """Under user-level DP every update is clipped to C (the noise is calibrated to it), not
    to a multiple of the round's median norm: an update 90 times the median but within C is
    the client's to send, as it was; one past C is clipped to C."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.compat.grid_client_proxy import GridClientProxy

    strategy, _, _ = _user_dp_strategy(10, 4, z=1e-9, min_cohort=1)
    updates = [np.array([0.001, 0, 0])] * 3 + [np.array([0, 0.09, 0]), np.array([0, 5.0, 0])]
    results = [
        (
            GridClientProxy(node_id=i, grid=None, run_id=0),  # type: ignore[arg-type]
            FitRes(Status(Code.OK, ""), ndarrays_to_parameters([u]), 1, {}),
        )
        for i, u in enumerate(updates)
    ]
    params, metrics = strategy.aggregate_fit(1, results, [])
    assert params is not None
    # the sum over the 5 replies (no configure_fit here, so no expected cohort recorded)
    np.testing.assert_allclose(
        parameters_to_ndarrays(params)[0], [0.003 / 5, (0.09 + 0.1) / 5, 0], atol=1e-6
    )
    assert (metrics["clients-clipped"], metrics["update-clip-bound"]) == (1, 0.1)


def test_user_dp_cohorts_are_poisson_samples_charged_at_their_rate() -> None:
    """Opacus' RDP bound is for Poisson sampling: each client is in a round independently
    with q = m / n, so cohort sizes vary around m (a fixed-size cohort, drawn before, is a
    mechanism that bound does not cover); every round is charged at q, and the mean is
    taken over the expected m whatever the size."""
    n, m, rounds = 40, 20, 400
    strategy, user_dp, draw = _user_dp_strategy(n, m, min_cohort=1)
    sizes = [len(draw(r)) for r in range(1, rounds + 1)]
    # Binomial(40, 1/2): mean 20, variance 10 (a fixed-size cohort has variance 0)
    assert abs(np.mean(sizes) - m) < 4 * math.sqrt(10 / rounds)
    assert 10 / 2 < np.var(sizes) < 10 * 2
    assert [s.sample_rate for s in user_dp.ledger.history] == [m / n]
    assert user_dp.ledger.history[0].steps == rounds
    assert set(strategy._denominator.values()) == {m}
    assert [strategy.sampled_in_round(r) for r in range(1, rounds + 1)] == sizes
    # half the population connected: each still at q = 1/2, so cohorts of about 10, with
    # the mean still taken over m = 20 (the rate, not who is there, sets the noise)
    strategy, user_dp, draw = _user_dp_strategy(n, m, min_cohort=1, connected=20)
    fewer = [len(draw(r)) for r in range(1, 101)]
    assert abs(np.mean(fewer) - 10) < 4 * math.sqrt(5 / 100)
    assert [s.sample_rate for s in user_dp.ledger.history] == [m / n]
    assert set(strategy._denominator.values()) == {m}


def test_user_dp_a_poisson_cohort_too_small_to_aggregate_is_skipped_but_charged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n, m = 40, 20
    # SecAgg+ with reconstruction threshold 4: Flower halts a round of fewer clients
    strategy, user_dp, draw = _user_dp_strategy(
        n, m, secagg=True, secagg_num_shares=7, secagg_reconstruction_threshold=4
    )
    assert strategy.least_cohort() == 4
    monkeypatch.setattr(UserLevelDP, "sample_cohort", lambda self, c, size, rng=None: c[:3])
    assert draw(1) == []
    assert strategy.sampled_in_round(1) == 0
    stats = strategy.fit_stats[1]  # reported as skipped, not as an aborted round
    assert stats.sampled == 3 and "round skipped" in stats.failures[0]
    assert user_dp.ledger.history[0].steps == 1  # the draw happened: charged
    assert user_dp.round_risk == pytest.approx(_below(n - 1, m / n, 4), rel=1e-9)
    monkeypatch.setattr(UserLevelDP, "sample_cohort", lambda self, c, size, rng=None: c[:4])
    assert len(draw(2)) == 4


def test_user_dp_a_poisson_cohort_secagg_cannot_complete_is_skipped_and_its_chance_charged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a fractional secagg-num-shares and an integer threshold, some cohorts above the
    least one give each client fewer neighbours than the threshold (0.085 shares at threshold
    9: 18 to 88 clients have 3 to 7), and Flower halts them. A Poisson cohort of such a size
    was sent out and its round released the noise alone, while one client more or less
    released the whole sum: that chance was missing from the skip risk charged out of delta.
    (The quantization range caps cohorts at 200 clients, whose 17 shares the threshold is
    still a strict majority of: the server refuses settings where it is not.)"""
    n, m = 200, 150
    server = {
        "secagg": True,
        "secagg_num_shares": 0.085,
        "secagg_reconstruction_threshold": 9,
        "secagg_quantization_range": 2**32 // 201 + 1,
    }
    strategy, user_dp, draw = _user_dp_strategy(n, m, **server)
    assert strategy.least_cohort() == 9
    monkeypatch.setattr(UserLevelDP, "sample_cohort", lambda self, c, size, rng=None: c[:20])
    assert draw(1) == []  # never sent: SecAgg+ would halt it
    stats = strategy.fit_stats[1]
    assert stats.sampled == 20 and "round skipped" in stats.failures[0]
    assert user_dp.ledger.history[0].steps == 1  # the draw happened: charged
    q = m / n
    # a cohort of a halting size, or one client short of one, with or without the user
    near_gaps = range(17, 89)
    gap = max(
        sum(math.comb(k, j) * q**j * (1 - q) ** (k - j) for j in near_gaps) for k in (n - 1, n)
    )
    assert user_dp.round_risk == pytest.approx(_below(n - 1, q, 9) + gap, rel=1e-9)
    monkeypatch.setattr(UserLevelDP, "sample_cohort", lambda self, c, size, rng=None: c[:89])
    assert len(draw(2)) == 89  # neighbourhoods of 9: it completes
    # where such sizes are likely the guarantee is void: the round is refused
    strategy, user_dp, _ = _user_dp_strategy(120, 90, **server)
    refusal = user_dp.refusal(*strategy.user_dp_round(user_dp, 80))
    assert refusal is not None and "a number SecAgg+ halts" in refusal


def test_user_dp_round_risk_and_state_by_hand() -> None:
    settings = UserDPSettings.create(noise_multiplier=1.0, clip_norm=0.1, population=6)
    # without the user, 5 others: P(Binomial(5, 5/6) < 2) = (1/6)^5 + 5 (5/6) (1/6)^4
    low = (1 / 6) ** 5 + 5 * (5 / 6) * (1 / 6) ** 4
    assert settings.round_risk(5, least=2) == pytest.approx(low, rel=1e-12)
    # with one more, 7: P(Binomial(7, 5/6) > 6) = (5/6)^7
    assert settings.round_risk(5, least=0, most=6) == pytest.approx((5 / 6) ** 7, rel=1e-12)
    assert settings.round_risk(6, least=2) == 0.0  # q = 1: always all six
    # fewer connected: the same rate, so a short cohort is likelier (3 others)
    assert settings.round_risk(5, connected=4, least=2) == pytest.approx(
        (1 / 6) ** 3 + 3 * (5 / 6) * (1 / 6) ** 2, rel=1e-12
    )
    dp = UserLevelDP(settings)
    dp.charge_round(1, 6, risk=1e-6)
    restored = UserLevelDP(settings)
    restored.load_state_dict(json.loads(json.dumps(dp.state_dict())))
    assert restored.round_risk == 1e-6 and restored.epsilon() == pytest.approx(dp.epsilon())
    # a version-1 state (fixed-size cohorts) still loads, with no risk
    old = {**dp.state_dict(), "version": 1}
    del old["round_risk"]
    restored.load_state_dict(old)
    assert restored.round_risk == 0.0
    with pytest.raises(DataError, match="'round_risk' must be a number in \\[0, 1\\]"):
        restored.load_state_dict({**dp.state_dict(), "round_risk": -1})


def test_the_pre_launch_check_accepts_a_user_dp_checkpoint_and_reads_its_journal(
    tmp_path: Path,
) -> None:
    """``fedrec server start`` checks a checkpoint before it launches anything: with user-level
    DP every checkpoint was refused ('no UserLevelDP was given'), so a user-DP deployment
    could never resume; and an unreadable journal passed the check and failed every launch."""
    from server.server_app import check_resume

    ck = tmp_path / "ck"
    config = _dp_config({"num-rounds": 2, "cohort-size": 4, "checkpoint-dir": str(ck)})
    _run(config, num_nodes=4)
    server = ServerConfig.from_run_config(config)
    initial = ToyLinearTask().initial_parameters()
    check_resume(server, initial)  # resumable: no error
    journal = ck / "user-dp-journal.json"
    journal.write_text(journal.read_text()[:40])
    with pytest.raises(DataError, match=r"user-dp-journal\.json"):
        check_resume(server, initial)
    journal.unlink()
    # a damaged strategy state names the checkpoint file (and what to do)
    manifest = ck / "round-00000002.json"
    data = json.loads(manifest.read_text())
    data["strategy_state"]["seed"] = "x"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"round-00000002\.json has a malformed seed.*backup"):
        check_resume(server, initial)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ({"ledger": {"history": "x"}}, "has version None / mechanism None"),
        ({"version": 99}, "has version 99"),
        ({"round_risk": 2}, "'round_risk' must be"),
    ],
)
def test_a_damaged_user_dp_state_in_a_checkpoint_is_refused_before_launch_naming_its_file(
    tmp_path: Path, damage: dict[str, Any], message: str
) -> None:
    """The pre-launch check of ``fedrec server start`` did not read a checkpoint's user-level
    DP state: it passed, and the launched ServerApp then failed with 'user-level DP state has
    version ...', naming neither the file nor what to do."""
    from server.server_app import check_resume

    ck = tmp_path / "ck"
    config = _dp_config({"num-rounds": 2, "cohort-size": 4, "checkpoint-dir": str(ck)})
    _run(config, num_nodes=4)
    (ck / "user-dp-journal.json").unlink()  # the checkpoint's state is all there is
    manifest = ck / "round-00000002.json"
    data = json.loads(manifest.read_text())
    data["ledger_state"].update(damage)
    manifest.write_text(json.dumps(data))
    resumed = {**config, "num-rounds": 3}
    where = rf"DP state in checkpoint \S*round-00000002\.json.*{message}.*restore it from backup"
    with pytest.raises(DataError, match=where):
        check_resume(ServerConfig.from_run_config(resumed), ToyLinearTask().initial_parameters())
    with pytest.raises(DataError, match=where):
        _run(resumed, num_nodes=4)


def test_the_resume_point_reported_skips_a_damaged_newest_checkpoint(tmp_path: Path) -> None:
    """`server start` said it would resume after round 2 and `server status` showed round 2
    while the ServerApp resumed after round 1, skipping round 2's damaged checkpoint."""
    from server.state import ServerLayout, resumable_round

    layout = ServerLayout(tmp_path)
    _run({**RESUME_CONFIG, "num-rounds": 2, "checkpoint-dir": str(layout.checkpoints)}, 5)
    assert resumable_round(layout) == 2
    _truncate_arrays(layout.checkpoints / "round-00000002.json")
    assert resumable_round(layout) == 1
    for name in ("round-00000001.json", "round-00000002.json"):
        _truncate_arrays(layout.checkpoints / name)
    assert resumable_round(layout) is None  # none verifies (the start refuses it)


@pytest.mark.parametrize(
    ("record", "aggregated"),
    [
        ({"updated": True, "clients_ok": 3}, True),
        # user-level DP, every client declined: the noise alone moved the model
        ({"updated": True, "clients_ok": 0}, False),
        ({"updated": False, "clients_ok": 3}, False),  # e.g. a rejected secure aggregate
        ({"updated": False, "clients_ok": 0}, False),
        # a row backfilled from a checkpoint that did not record them counts as trained
        ({"updated": None, "clients_ok": None}, True),
    ],
)
def test_a_round_is_aggregated_only_with_clients_ok_and_a_changed_model(
    record: dict[str, Any], aggregated: bool
) -> None:
    from server.state import round_aggregated

    assert round_aggregated(record) is aggregated


def test_user_level_epsilon_is_never_negative() -> None:
    """With delta = 1/population of 2 devices (0.5) the conversion gave -0.443."""
    from shared.privacy.ledger import PrivacyBudget, PrivacyLedger

    ledger = PrivacyLedger(PrivacyBudget(epsilon=8.0, delta=0.5))
    ledger.record(noise_multiplier=2.0, sample_rate=1.0, steps=1)
    assert ledger.epsilon() == 0.0


def test_a_round_checkpointed_but_not_in_the_progress_file_is_written_at_restart(
    tmp_path: Path,
) -> None:
    """A ServerApp killed between a round's checkpoint and its progress line left that round
    out of progress.jsonl for good (1, 2, 3, 4, 6), and `server status` one round behind."""
    from server.deploy_app import backfill_progress
    from server.state import read_progress_file
    from server.superlink import format_round

    ck, progress = tmp_path / "ck", tmp_path / "progress.jsonl"
    _run({**RESUME_CONFIG, "num-rounds": 3, "checkpoint-dir": str(ck)}, num_nodes=5)
    progress.write_text(json.dumps({"round": 1, "num_rounds": 3}) + "\n")  # 2 and 3 lost
    assert backfill_progress(progress, str(ck), 3) == 2
    records = read_progress_file(progress)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert records[-1]["backfilled"] and records[-1]["clients_sampled"] == 3
    # the keys of a round record, for every reader (the e2e test indexes eval_clients)
    assert {"eval_clients", "secure_aggregation", "round_seconds"} <= set(records[-1])
    line = format_round(records[-1])  # the follow-up display reads it, and says whence
    assert "round 3/3" in line and "from its checkpoint" in line
    assert backfill_progress(progress, str(ck), 3) == 0  # once


def test_a_progress_file_with_bytes_that_are_not_utf8_keeps_its_good_lines(
    tmp_path: Path,
) -> None:
    """Garbage a crash left in the last block of progress.jsonl made `server status` and the
    ServerApp's start (its backfill reads the file) end in a UnicodeDecodeError traceback."""
    from server.deploy_app import backfill_progress
    from server.state import read_progress_file

    progress = tmp_path / "progress.jsonl"
    good = json.dumps({"round": 1, "num_rounds": 3}).encode()
    progress.write_bytes(good + b'\n{"round": 2, "nu\xff\xfe\x00\n')
    assert read_progress_file(progress) == [{"round": 1, "num_rounds": 3}]
    CheckpointStore(tmp_path / "ck").save(1, _params(), {}, None)  # the line's round
    assert backfill_progress(progress, str(tmp_path / "ck"), 3) == 0


def test_a_refused_setting_is_logged_in_one_line_before_flowers_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On `flwr run` a refused setting showed only as a traceback (and exit status 0); the
    ServerApp now says first, in one line, that nothing was trained and why."""
    with caplog.at_level(logging.ERROR), pytest.raises(ConfigError, match="min-cohort"):
        _run({"num-rounds": 1, "min-cohort": 3, "min-available-clients": 2}, num_nodes=2)
    assert "the run's settings are refused, nothing was trained: 'min-cohort'" in caplog.text
    assert "'min-available-clients', --min-clients on `fedrec server start`" in caplog.text


def test_the_numpy_floor_saves_checkpoints_without_a_stray_array() -> None:
    """Checkpoints (and a device's global.npz) are written with np.savez(...,
    allow_pickle=False); numpy before 2.2 has no such keyword and saves it as an array named
    'allow_pickle', so every checkpoint would fail verification. pyproject admitted 1.26."""
    import inspect

    from packaging.version import Version

    from tests.conftest import dependency_floor

    assert Version(dependency_floor("numpy")) >= Version("2.2")
    assert "allow_pickle" in inspect.signature(np.savez).parameters  # the installed one


def test_user_dp_under_secagg_charges_the_rounding_in_its_sensitivity() -> None:
    """SecAgg+ rounds each coordinate of an update stochastically to its quantization grid,
    so one user's share of the unmasked sum is its clipped update plus that rounding, of
    norm up to ``C + sqrt(d) 2 clipping_range / quantization_range`` (0.1 -> 0.10057 for
    the 22,112-value student); the accountant charged the noise ``z C`` against a
    sensitivity of ``C``. It now charges ``z C / (C + slack)``; without SecAgg+, ``z``."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from server.server_app import make_user_dp

    z, c, d = 1.4, 0.1, 22_112
    base = {"user-dp": True, "user-dp-noise-multiplier": z, "user-dp-clip": c, "cohort-size": 50}
    config = ServerConfig.from_run_config({**base, "secagg": True})
    settings = config.secagg_settings
    assert settings is not None
    slack = settings.rounding_slack(d)
    assert 5e-4 < slack < 6e-4
    # the bound holds for a clipped update through Flower's own rounding
    x = np.random.default_rng(0).normal(size=d)
    x *= c / np.linalg.norm(x)
    np.random.seed(0)  # Flower's stochastic rounding draws from numpy's global generator
    (back,) = dequantize(
        quantize([x], settings.clipping_range, settings.quantization_range),
        settings.clipping_range,
        settings.quantization_range,
    )
    assert 0 < np.linalg.norm(back - x) <= slack
    assert np.linalg.norm(back) <= c + slack
    charged = make_user_dp(config, 679, d).spend(50).noise_multiplier
    assert charged == pytest.approx(z * c / (c + slack), rel=1e-12) and charged < z
    plain = ServerConfig.from_run_config({**base, "secagg": False})
    assert make_user_dp(plain, 679, d).spend(50).noise_multiplier == z


def test_the_user_level_ledgers_epsilon_memo_stays_small_over_many_rounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server's user-level ledger memoizes epsilon per spent history, and every round
    spends more, so each round added entries that no later round asks for again: a
    federation of many rounds kept them all in memory. The memo now keeps the newest few."""
    from server.user_dp import _MemoizedLedger
    from shared.privacy.budget import PrivacyBudget
    from shared.privacy.ledger import PrivacyLedger, Spend

    calls: list[int] = []

    def cheap(self: PrivacyLedger, extra: Spend | None = None, delta: float | None = None) -> float:
        calls.append(1)
        return 0.001 * sum(s.steps for s in self.history)

    monkeypatch.setattr(PrivacyLedger, "epsilon", cheap)
    ledger = _MemoizedLedger(PrivacyBudget(8.0, 1e-5))
    for _ in range(2000):
        ledger.epsilon(extra=Spend(1.0, 0.1, 1))  # the charge's check
        ledger.record(1.0, 0.1, 1)
        ledger.epsilon()
        ledger.epsilon()  # asked again in the same round: from the memo
    assert len(calls) <= 4000  # the repeated asks were answered from the memo
    assert len(ledger._memo) <= 64
    assert ledger.epsilon() == pytest.approx(2.0)
