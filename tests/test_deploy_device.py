"""The device side of deployment in one process: the ClientApp's task trains on the device's
encrypted store and leaves the global model for the daemon; the daemon's learner installs new
global versions and adapts the personal adapter on new events; the SuperNode command line."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.client_app import DEVICE_TASK, deployment_run_config
from client.device.daemon import Daemon, DaemonConfig
from client.device.identity import init_identity
from client.device.sealed import Catalog
from client.device.store import Event
from client.device.supernode import SuperNodeOptions, supernode_spec
from client.device.training import (
    DeviceLearner,
    FederatedFiles,
    LearnerConfig,
    PersonalFit,
    local_history,
)
from server.pki import create_pki
from shared.errors import ConfigError, DataError, ModelFileError
from shared.federated.bundle import save_bundle
from shared.federated.student_task import get_global_arrays
from shared.federated.task import FitStatus, get_task
from shared.models.student import StudentConfig, StudentModel
from tests.conftest import tiny_student

N_ITEMS = 30
ITEMS = [f"item-{i}" for i in range(N_ITEMS)]


@pytest.fixture
def bundle(tmp_path: Path, write_tiny_bundle: Callable[[Path, int], list[str]]) -> Path:
    path = tmp_path / "bundle.pt"
    assert write_tiny_bundle(path, N_ITEMS) == ITEMS
    return path


@pytest.fixture
def device(tmp_path: Path) -> Path:
    state = tmp_path / "device"
    init_identity(state)
    return state


def _events(n: int, seed: int = 0) -> list[Event]:
    rng = np.random.default_rng(seed)
    return [
        Event(f"item-{int(i)}", "click", 1_700_000_000.0 + k)
        for k, i in enumerate(rng.choice(N_ITEMS, size=n, replace=False))
    ]


def _wait_until(condition: Callable[[], bool], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _device_task(
    device: Path, bundle: Path, *, share_evaluation: bool = True, **run_config: Any
) -> object:
    server_side = {
        "task": "shared.federated.student_task:make_task",
        "bundle": "/server/only/bundle.pt",
        "state-dir": "/server/only/state",
        "batch-size": 4,
        "personal-steps": 7,
        "personal-lr": 0.02,
        "exclude-seen": False,
        **run_config,
    }
    node = {
        "fedrec-device-dir": str(device),
        "fedrec-bundle": str(bundle),
        "fedrec-share-evaluation": share_evaluation,
    }
    return get_task(DEVICE_TASK, deployment_run_config(server_side, node))


def _ready_device_task(device: Path, bundle: Path) -> tuple[Any, list[np.ndarray]]:
    """A device with its first model and 10 events, its device task and initial parameters."""
    with Daemon.open(device) as daemon:
        DeviceLearner(daemon, bundle).prepare()
        daemon.add_events(_events(10))
    task: Any = _device_task(device, bundle)
    return task, task.initial_parameters()


def test_device_task_trains_on_the_store_and_leaves_the_global_model(
    device: Path, bundle: Path
) -> None:
    with Daemon.open(device) as daemon:
        learner = DeviceLearner(daemon, bundle)
        learner.prepare()  # installs the catalog and model version 0
        assert daemon.status().model_version == "0"
        daemon.add_events(_events(10))
    task = _device_task(device, bundle)
    params = task.initial_parameters()  # type: ignore[attr-defined]
    fit = task.fit(0, params, {"server-round": 3})  # type: ignore[attr-defined]
    # under DP the weight is 1, not the 9 examples of its 10 events: a count is no one's
    # business but the device's; the ledger charged the 9 examples' steps
    assert fit.status is FitStatus.OK and fit.num_examples == 1
    assert fit.metrics["epsilon"] > 0
    files = FederatedFiles(device)
    assert files.global_version() == 2  # round 3 trains from the model of round 2
    received = files.read_global()
    # for the daemon's refit: the federation's steps, rate and objective
    assert received is not None and received.personal_fit == PersonalFit(7, 0.02, False)
    assert files.rounds_joined() == 1
    # the adapter is the daemon's, fitted when it serves, and never a file of its own
    kept = sorted(p.name for p in files.directory.iterdir())
    assert kept == [".lock", "global.npz", "joined.json"]
    assert (device / "privacy" / "ledger.json").exists()  # the device's own ledger
    evaluation = task.evaluate(0, params, {"server-round": 3})  # type: ignore[attr-defined]
    # what --share-evaluation says it sends: no epsilon (it tells how long the history is)
    assert set(evaluation.metrics) == {"full_hr@10", "full_ndcg@10"}
    assert files.global_version() == 3
    assert not files.write_global(1, params)  # an older model never replaces a newer one


def test_the_devices_own_model_is_pruned_as_the_federation_prunes_its_models(
    device: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shared.compression.artifact as artifact

    pruned: list[float] = []
    real = artifact.build_student_artifact

    def spy(*args: Any, prune: Any = None, **kwargs: Any) -> Any:
        pruned.append(0.0 if prune is None else prune.sparsity)
        return real(*args, prune=prune, **kwargs)

    monkeypatch.setattr(artifact, "build_student_artifact", spy)
    with Daemon.open(device) as daemon:
        learner = DeviceLearner(daemon, bundle)
        learner.prepare()  # the bundle's model: no federation yet, nothing pruned
        daemon.add_events(_events(10))
        task: Any = _device_task(device, bundle, **{"prune-sparsity": 0.5})
        assert task.fit(0, task.initial_parameters(), {"server-round": 3}).status is FitStatus.OK
        received = learner.files.read_global(arrays=False)
        assert received is not None and received.prune_sparsity == 0.5
        learner.refresh(adapt=False)
        assert daemon.status().model_version == "2+personal"
    assert pruned == [0.0, 0.5]


def test_rounds_joined_and_without_dp_survive_a_corrupted_federation_file(
    device: Path, bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged joined.json (a crash mid-write on a file system without rename) reads as 0
    and the training side counts again from 0: rounds_joined held (the store's counter),
    rounds_without_dp in /status went back to 0 + the new rounds."""
    files = FederatedFiles(device)
    with Daemon.open(device) as daemon:
        learner = DeviceLearner(daemon, bundle)
        learner.prepare()
        files.add_round_joined(1, with_dp=False)
        files.add_round_joined(2, with_dp=False)
        learner._tick()
        assert (daemon.status().rounds_joined, daemon.status().rounds_without_dp) == (2, 2)
        files.joined.write_text('{"count": 2, "without_dp": 2, "last')  # torn
        files.add_round_joined(3, with_dp=False)
        assert "unreadable" in caplog.text and files.rounds_without_dp() == 1
        learner._tick()
        assert (daemon.status().rounds_joined, daemon.status().rounds_without_dp) == (3, 3)
        files.add_round_joined(4, with_dp=True)
        learner._tick()
        assert (daemon.status().rounds_joined, daemon.status().rounds_without_dp) == (4, 3)
        daemon.erase()  # participation is privacy accounting: an erase keeps it
        assert daemon.status().rounds_without_dp == 3


@pytest.mark.parametrize(
    "damaged",
    ['{"count": -1}', '{"count": 1e400}', '{"count": 2, "without_dp": -3}'],
)
def test_a_joined_file_with_counts_no_round_gives_reads_as_unreadable(
    device: Path, bundle: Path, damaged: str
) -> None:
    """A count below 0 (ValueError in the store's sync) or one int() cannot take (1e400:
    OverflowError) failed every GET /status with a bare 500 and every tick of the learner,
    which then never served a new model; a damaged file reads as 0 rounds instead."""
    files = FederatedFiles(device)
    with Daemon.open(device) as daemon:
        learner = DeviceLearner(daemon, bundle)
        learner.prepare()
        files.add_round_joined(1, with_dp=True)
        learner._tick()
        files.joined.write_text(damaged)
        assert files.joined_counts() == (0, 0)
        learner._tick()
        assert daemon.status().rounds_joined == 1
        files.add_round_joined(2, with_dp=True)  # counts again from 0: one more round
        assert daemon.status().rounds_joined == 2


def test_status_counts_rounds_without_dp_with_no_learner_running(device: Path) -> None:
    """/status read the store's counter, which only the learner's tick caught up: a daemon
    serving the API alone (`serve-api`) showed 0 rounds without DP after two."""
    files = FederatedFiles(device)
    files.add_round_joined(1, with_dp=False)
    files.add_round_joined(2, with_dp=False)
    with Daemon.open(device) as daemon:
        status = daemon.status()
        assert (status.rounds_joined, status.rounds_without_dp) == (2, 2)
        assert daemon.status().rounds_without_dp == 2  # read again: counted once


def test_device_never_keeps_global_parameters_it_refuses(device: Path, bundle: Path) -> None:
    """The daemon serves what the task keeps as global.npz: NaN parameters kept there broke
    every refit until a newer round came, and cost privacy for nothing."""
    task, params = _ready_device_task(device, bundle)
    bad = [p.copy() for p in params]
    bad[0][...] = np.nan
    for call in (task.fit, task.evaluate):  # type: ignore[attr-defined]
        with pytest.raises(DataError, match="NaN"):
            call(0, bad, {"server-round": 3})
    assert FederatedFiles(device).global_version() is None
    assert not (device / "privacy" / "ledger.json").exists()


def test_a_new_run_replaces_the_global_model_of_an_older_one(device: Path, bundle: Path) -> None:
    from shared.federated.task import CONFIG_RUN_ID

    task, params = _ready_device_task(device, bundle)
    files = FederatedFiles(device)
    task.evaluate(0, params, {"server-round": 40, CONFIG_RUN_ID: 7})  # type: ignore[attr-defined]
    assert files.global_version() == 40
    newer = [p + 0.5 for p in params]
    task.evaluate(0, newer, {"server-round": 2, CONFIG_RUN_ID: 8})  # type: ignore[attr-defined]
    received = files.read_global()
    assert received is not None and received.version == 2  # the new run's, not round 40's
    np.testing.assert_array_equal(received.arrays[0], newer[0])
    task.evaluate(0, params, {"server-round": 1, CONFIG_RUN_ID: 8})  # type: ignore[attr-defined]
    assert files.global_version() == 2  # an older round of the same run never replaces it


def test_a_device_whose_ledger_went_missing_refuses_to_train(device: Path, bundle: Path) -> None:
    task, params = _ready_device_task(device, bundle)
    assert task.fit(0, params, {"server-round": 1}).status is FitStatus.OK  # type: ignore[attr-defined]
    (device / "privacy" / "ledger.json").unlink()  # lost: epsilon would restart at 0
    with pytest.raises(DataError, match=r"ledger .* is missing although this device took part"):
        task.fit(0, params, {"server-round": 2})  # type: ignore[attr-defined]


def test_a_device_that_lost_its_ledger_and_joined_file_refuses_to_train(
    device: Path, bundle: Path
) -> None:
    """Both files lost: the store's rounds-joined counter (kept even by an erase) still says
    the device took part, so it must not start counting privacy from zero; /status says so."""
    task, params = _ready_device_task(device, bundle)
    assert task.fit(0, params, {"server-round": 1}).status is FitStatus.OK
    with Daemon.open(device) as daemon:
        assert daemon.status().rounds_joined == 1  # the store caught up with joined.json
        daemon.erase()
        daemon.add_events(_events(10, seed=1))  # the user goes on using the device
    (device / "privacy" / "ledger.json").unlink()
    (device / "federated" / "joined.json").unlink()
    with pytest.raises(DataError, match=r"ledger .* is missing although this device took part"):
        task.fit(0, params, {"server-round": 2})
    assert not (device / "privacy" / "ledger.json").exists()  # nothing restarted
    with Daemon.open(device) as daemon:
        status = daemon.status()
    assert status.rounds_joined == 1 and status.epsilon_spent is None
    assert status.privacy_error is not None
    assert "missing although this device took part in 1 round" in status.privacy_error
    assert "joined.json is lost too" in status.privacy_error
    with pytest.raises(DataError, match=r"joined.json is lost too"):
        task.fit(0, params, {"server-round": 2})


@pytest.mark.parametrize(
    "text",
    [
        '{"version": 1, "mechanism": "rdp", "history": [[1.0, 0.1, 1e400]]}',
        '{"version": 1, "mechanism": "rdp", "history": [], "declined": 1e400}',
        "[" * 100_000 + "]" * 100_000,
    ],
)
def test_a_ledger_of_unconvertible_numbers_or_deep_nesting_is_a_privacy_error(
    device: Path, text: str
) -> None:
    """OverflowError and RecursionError escaped the typed error: /status answered 500."""
    ledger = device / "privacy" / "ledger.json"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.write_text(text)
    with Daemon.open(device) as daemon:
        status = daemon.status()
    assert status.epsilon_spent is None
    assert status.privacy_error is not None and str(ledger) in status.privacy_error


def test_a_round_without_dp_does_not_lock_the_device_out_of_later_rounds(
    device: Path, bundle: Path
) -> None:
    """An owner who allows no-DP rounds (--allow-no-dp): such a round spends nothing, but it
    is joined, and a device that has joined rounds without a ledger file reads as one that
    lost it. Every later round failed, asking for a backup that never existed."""
    with Daemon.open(device) as daemon:
        DeviceLearner(daemon, bundle).prepare()
        daemon.add_events(_events(10))
    server_side = {"task": "shared.federated.student_task:make_task", "batch-size": 4}
    node = {
        "fedrec-device-dir": str(device),
        "fedrec-bundle": str(bundle),
        "fedrec-require-dp": False,
    }
    task: Any = get_task(DEVICE_TASK, deployment_run_config(server_side, node))
    params = task.initial_parameters()
    assert task.fit(0, params, {"server-round": 1, "dp": False}).status is FitStatus.OK
    assert FederatedFiles(device).rounds_joined() == 1
    ledger = device / "privacy" / "ledger.json"
    assert json.loads(ledger.read_text())["history"] == []  # written, nothing spent
    assert task.fit(0, params, {"server-round": 2}).status is FitStatus.OK  # DP again
    assert len(json.loads(ledger.read_text())["history"]) == 1
    # its status says so: epsilon_spent counts the DP round only (it read as all rounds)
    files = FederatedFiles(device)
    assert (files.rounds_joined(), files.rounds_without_dp()) == (2, 1)
    with Daemon.open(device) as daemon:
        DeviceLearner(daemon, bundle)._tick()  # catches the store's count up
        status = daemon.status()
        assert (status.rounds_joined, status.rounds_without_dp) == (2, 1)
        assert status.epsilon_spent is not None and status.epsilon_spent > 0


def test_the_client_app_opens_the_store_with_the_passphrase_variable_the_daemon_read(
    tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedrec client start --passphrase-env START` opened the daemon with $START, while the
    ClientApp read the variable recorded at init: the device served, and every round failed."""
    from fedrec.commands.client import _passphrase_var

    state = tmp_path / "device"
    monkeypatch.setenv("INIT_PASS", "correct horse battery")
    init_identity(state, passphrase="correct horse battery", passphrase_env="INIT_PASS")
    monkeypatch.delenv("INIT_PASS")
    monkeypatch.setenv("START_PASS", "correct horse battery")
    assert _passphrase_var(state, "START_PASS") == "START_PASS"
    assert _passphrase_var(state, None) == "INIT_PASS"  # the recorded one by default
    with Daemon.open(state, passphrase="correct horse battery") as daemon:
        DeviceLearner(daemon, bundle).prepare()
        daemon.add_events(_events(10))
        ca = create_pki(tmp_path / "certs").ca_cert
        options = SuperNodeOptions(
            server="127.0.0.1:9093", root_cert=ca, bundle=bundle, passphrase_env="START_PASS"
        )
        spec = supernode_spec(daemon.layout, options)
    node_config = spec.argv[list(spec.argv).index("--node-config") + 1]
    assert "fedrec-passphrase-env='START_PASS'" in node_config
    # the SuperNode (and its ClientApps) run in the device folder, not the daemon's start
    # folder, which may be removed while the daemon runs
    assert spec.cwd == str(state.resolve())
    node = {
        "fedrec-device-dir": str(state),
        "fedrec-bundle": str(bundle),
        "fedrec-passphrase-env": "START_PASS",
    }
    server_side = {"task": "shared.federated.student_task:make_task", "batch-size": 4}
    task: Any = get_task(DEVICE_TASK, deployment_run_config(server_side, node))
    params = task.initial_parameters()
    assert task.fit(0, params, {"server-round": 1}).status is FitStatus.OK
    # without it, the ClientApp reads $INIT_PASS, which this device's start did not set
    del node["fedrec-passphrase-env"]
    recorded: Any = get_task(DEVICE_TASK, deployment_run_config(server_side, node))
    with pytest.raises(ConfigError, match="INIT_PASS"):
        recorded.fit(0, params, {"server-round": 2})


def test_a_device_shares_evaluation_metrics_only_if_its_owner_allows(
    device: Path, bundle: Path
) -> None:
    with Daemon.open(device) as daemon:
        DeviceLearner(daemon, bundle).prepare()
        daemon.add_events(_events(10))
    private = _device_task(device, bundle, share_evaluation=False)
    params = private.initial_parameters()  # type: ignore[attr-defined]
    kept_private = private.evaluate(0, params, {"server-round": 4})  # type: ignore[attr-defined]
    assert kept_private.status is FitStatus.DECLINED  # a choice, not a failure
    assert "does not share evaluation metrics" in kept_private.reason
    assert kept_private.decline_kind == "opted-out"  # what the server is told
    assert (kept_private.num_examples, dict(kept_private.metrics)) == (0, {})
    assert FederatedFiles(device).global_version() == 4  # the evaluated model is still kept
    # a server cannot switch it on: the device's node config decides
    server_says = deployment_run_config(
        {"fedrec-share-evaluation": True},
        {"fedrec-device-dir": str(device), "fedrec-bundle": str(bundle)},
    )
    assert server_says["fedrec-share-evaluation"] is False
    shared = _device_task(device, bundle, share_evaluation=True)
    assert shared.evaluate(0, params, {"server-round": 5}).num_examples == 1  # type: ignore[attr-defined]


def test_a_young_device_sits_rounds_out_instead_of_failing(
    device: Path, bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Daemon.open(device) as daemon:
        DeviceLearner(daemon, bundle).prepare()
        daemon.add_events(_events(1))
    task: Any = _device_task(device, bundle)
    params = task.initial_parameters()
    with caplog.at_level(logging.WARNING, logger="client.device.training"):
        fit = task.fit(0, params, {"server-round": 2})
    assert fit.status is FitStatus.DECLINED and "1 event(s)" in fit.reason
    assert fit.decline_kind == "no-local-data"  # the server is told the kind, not the count
    # the server names the devices' logs for the reason, and keeps none itself: the device
    # logged nothing, so a run where every device declined could not be explained
    assert any(
        "round 2: this device declined to train" in r.getMessage()
        and "1 event(s)" in r.getMessage()
        for r in caplog.records
    )
    evaluation = task.evaluate(0, params, {"server-round": 2})
    assert evaluation.status is FitStatus.DECLINED and "1 event(s)" in evaluation.reason
    assert evaluation.decline_kind == "no-local-data"
    assert FederatedFiles(device).rounds_joined() == 0
    with Daemon.open(device) as daemon:
        daemon.add_events(_events(10, seed=1))
    assert task.fit(0, params, {"server-round": 3}).status is FitStatus.OK
    assert FederatedFiles(device).rounds_joined() == 1


def test_the_device_owner_sets_a_privacy_floor_the_server_cannot_lower(
    device: Path, bundle: Path
) -> None:
    node = {"fedrec-device-dir": str(device), "fedrec-bundle": str(bundle)}
    # the smaller budget applies: the device's cap, or the server's if it is smaller
    capped = deployment_run_config({"epsilon-budget": 50.0}, {**node, "fedrec-max-epsilon": 4.0})
    assert capped["epsilon-budget"] == 4.0
    smaller = deployment_run_config({"epsilon-budget": 2.0}, {**node, "fedrec-max-epsilon": 4.0})
    assert smaller["epsilon-budget"] == 2.0
    # a budget sent as text, which the task reads as a number, was left uncapped
    text = deployment_run_config({"epsilon-budget": "100"}, {**node, "fedrec-max-epsilon": 4.0})
    assert text["epsilon-budget"] == 4.0
    junk = deployment_run_config({"epsilon-budget": "lots"}, {**node, "fedrec-max-epsilon": 4.0})
    assert junk["epsilon-budget"] == 4.0
    # delta is capped too: at delta 0.5 the same spend reads as a far smaller epsilon
    loose = deployment_run_config({"delta": 0.5}, {**node, "fedrec-max-delta": 1e-5})
    assert loose["delta"] == 1e-5
    assert deployment_run_config({"delta": 1e-7}, node)["delta"] == 1e-7  # stricter: kept
    assert deployment_run_config({}, node)["delta"] == 1e-5  # the device default
    # a server cannot switch the device's DP requirement off (a device default)
    assert deployment_run_config({"fedrec-require-dp": False}, node)["fedrec-require-dp"] is True
    task, params = _ready_device_task(device, bundle)
    with pytest.raises(ConfigError, match="train without DP"):
        task.fit(0, params, {"server-round": 1, "dp": False})
    assert not (device / "privacy" / "ledger.json").exists()
    assert task.fit(0, params, {"server-round": 1}).status is FitStatus.OK


def test_the_server_cannot_split_a_devices_noise_beyond_its_owners_cap(
    device: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """noise-shares m makes a device add 1/sqrt(m) of its noise while its ledger charges all
    of it; a server that chose m = 10000 released updates nearly noise-free at the epsilon of
    the full noise. The owner's cap (default 1) holds for the run config and for a round's
    override alike."""
    import shared.federated.student_task as student_task

    node = {"fedrec-device-dir": str(device), "fedrec-bundle": str(bundle)}
    assert deployment_run_config({"noise-shares": 10000}, node)["noise-shares"] == 1
    trusting = {**node, "fedrec-max-noise-shares": 50}
    assert deployment_run_config({"noise-shares": 10000}, trusting)["noise-shares"] == 50
    assert deployment_run_config({"noise-shares": 25}, trusting)["noise-shares"] == 25
    with pytest.raises(ConfigError, match="fedrec-max-noise-shares must be an integer >= 1"):
        deployment_run_config({}, {**node, "fedrec-max-noise-shares": 0})
    used: list[int] = []
    real = student_task.train_global_dp

    def spy(model: Any, sequence: Any, train: Any, groups: Any) -> Any:
        used.append(train.noise_shares)
        return real(model, sequence, train, groups)

    monkeypatch.setattr(student_task, "train_global_dp", spy)
    task, params = _ready_device_task(device, bundle)
    assert task.fit(0, params, {"server-round": 1, "noise-shares": 10000}).status is FitStatus.OK
    assert used == [1]


def test_the_server_cannot_raise_a_devices_caps_on_a_round(device: Path, bundle: Path) -> None:
    """The owner's --max-round-steps and --max-round-epsilon bound the server's
    max-round-steps and max-round-epsilon (the smaller applies, as for epsilon-budget), and a
    round asking more of the device than its cap is declined, naming the cap, spending
    nothing."""
    node = {"fedrec-device-dir": str(device), "fedrec-bundle": str(bundle)}
    greedy = {"max-round-steps": 10**6, "max-round-epsilon": 100.0}
    capped = deployment_run_config(greedy, node)
    assert (capped["max-round-steps"], capped["max-round-epsilon"]) == (1000, 6.0)  # defaults
    owner = {**node, "fedrec-max-round-steps": 2, "fedrec-max-round-epsilon": 0.5}
    capped = deployment_run_config(greedy, owner)
    assert (capped["max-round-steps"], capped["max-round-epsilon"]) == (2, 0.5)
    kept = deployment_run_config({"max-round-steps": 1, "max-round-epsilon": 0.1}, owner)
    assert (kept["max-round-steps"], kept["max-round-epsilon"]) == (1, 0.1)  # stricter: kept
    with Daemon.open(device) as daemon:
        DeviceLearner(daemon, bundle).prepare()
        daemon.add_events(_events(10))
    server_side = {
        "task": "shared.federated.student_task:make_task",
        "bundle": "/server/only/bundle.pt",
        "state-dir": "/server/only/state",
        "batch-size": 4,
        **greedy,
    }
    task: Any = get_task(DEVICE_TASK, deployment_run_config(server_side, owner))
    params = task.initial_parameters()
    out = task.fit(0, params, {"server-round": 1})  # 9 examples in batches of 4: 3 steps
    assert out.status is FitStatus.DECLINED and out.decline_kind == "max-round-steps"
    out = task.fit(0, params, {"server-round": 1, "batch-size": 8})  # 2 steps: epsilon > 0.5
    assert out.status is FitStatus.DECLINED and out.decline_kind == "max-round-epsilon"
    assert "0.000 to" in out.reason  # nothing was spent
    assert FederatedFiles(device).rounds_joined() == 0


@pytest.mark.parametrize("asked", [float("nan"), "nan"])
def test_a_noise_shares_that_is_no_number_is_a_config_error(device: Path, asked: object) -> None:
    """A NaN noise-shares from the server raised int()'s bare ValueError, which the reply
    calls an "internal" error of the device, not the configuration the server sent."""
    node = {"fedrec-device-dir": str(device), "fedrec-bundle": "b", "fedrec-max-noise-shares": 4}
    with pytest.raises(ConfigError, match="noise-shares must be an integer >= 1"):
        deployment_run_config({"noise-shares": asked}, node)


@pytest.mark.parametrize(
    ("key", "cap"),
    [
        ("fedrec-max-epsilon", float("nan")),
        ("fedrec-max-epsilon", "nan"),
        ("fedrec-max-epsilon", float("inf")),
        ("fedrec-max-epsilon", 0.0),
        ("fedrec-max-delta", float("nan")),
        ("fedrec-max-delta", 1.0),
        ("fedrec-max-noise-shares", float("nan")),
        ("fedrec-max-noise-shares", float("inf")),
        ("fedrec-max-round-steps", 0),
        ("fedrec-max-round-steps", 2.5),
        ("fedrec-max-round-steps", float("nan")),
        ("fedrec-max-round-epsilon", float("nan")),
        ("fedrec-max-round-epsilon", float("inf")),
        ("fedrec-max-round-epsilon", 0.0),
    ],
)
def test_a_node_cap_that_bounds_nothing_is_refused(key: str, cap: object) -> None:
    """A NaN privacy cap in the node config (a SuperNode started by hand) compared below no
    number, so the server's epsilon-budget 100 or delta 0.5 was taken uncapped; a NaN or
    infinite noise-shares cap raised int()'s bare ValueError / OverflowError, an "internal"
    error of the device instead of its configuration."""
    node = {"fedrec-device-dir": "/nonexistent", "fedrec-bundle": "b", key: cap}
    with pytest.raises(ConfigError, match=f"node config {key}"):
        deployment_run_config({"epsilon-budget": 100.0, "delta": 0.5, "noise-shares": 4}, node)


@pytest.mark.parametrize("server_round", [float("nan"), "abc"])
def test_a_malformed_server_round_is_a_config_error_on_the_device(
    device: Path, bundle: Path, server_round: object
) -> None:
    """A NaN round raised int()'s bare ValueError (an "internal" error of the device); text
    was read as round 0, so an evaluation kept the server's model as version 0, the label of
    the bundle's own."""
    task, params = _ready_device_task(device, bundle)
    for call in (task.fit, task.evaluate):
        with pytest.raises(ConfigError, match="server-round"):
            call(0, params, {"server-round": server_round})
    assert FederatedFiles(device).global_version() is None  # nothing kept


def _adapter(learner: DeviceLearner) -> dict[str, torch.Tensor]:
    """The adapter of the learner's last refit (it is only ever stored sealed, inside the
    model built from it)."""
    return {k: v.clone() for k, v in learner.bundle.student.adapter.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_learner_serves_new_global_models_and_adapts_on_new_events(
    device: Path, bundle: Path
) -> None:
    with Daemon.open(device, config=DaemonConfig(port=0)) as daemon:
        learner = DeviceLearner(daemon, bundle, LearnerConfig(debounce_s=0.05, poll_s=0.05))
        learner.attach()
        first = daemon.recommend(5)
        assert first.model_version == "0"
        # the ClientApp received global model 4
        files = FederatedFiles(device)
        arrays = [a + 0.5 for a in get_global_arrays(learner.bundle.student)]
        files.write_global(4, arrays)
        _wait_until(lambda: daemon.status().model_version == "4")
        second = daemon.recommend(5)
        assert [i.score for i in second.items] != [i.score for i in first.items]
        # new events: debounced few-shot adaptation of the personal adapter, off the caller
        started = time.monotonic()
        daemon.add_events(_events(8, seed=1))
        assert time.monotonic() - started < 1.0
        _wait_until(lambda: daemon.status().adaptation_pending == 0)
        status = daemon.status()
        assert status.model_version == "4+personal" and status.adaptation_pending == 0
        assert learner.adaptations == 1
        adapter = _adapter(learner)
        # a new global model: the adapter is refitted against it, not carried over
        files.write_global(5, [a - 0.25 for a in arrays])
        _wait_until(lambda: daemon.status().model_version == "5+personal")
        assert learner.adaptations == 2 and not _same(_adapter(learner), adapter)
        # the federation's run config turns the refit off (personal-steps = 0)
        files.write_global(6, arrays, personal_fit=PersonalFit(0, 0.001))
        _wait_until(lambda: daemon.status().model_version == "6")
        assert learner.adaptations == 2
        files.write_global(7, arrays, personal_fit=PersonalFit(3, 0.001))
        _wait_until(lambda: daemon.status().model_version == "7+personal")
        # erasing the user's data also erases the adapter fitted on it; the global model
        # (version 7, not personal) is served again, as soon as the erase returns
        daemon.erase()
        assert daemon.status().model_version == "7"
        learner.stop()


def test_learner_refits_with_the_federations_objective(
    device: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shared.federated.local_training as local_training

    calls: list[bool] = []
    real = local_training.fit_personal

    def spy(*args: Any, exclude_seen: bool = True, **kwargs: Any) -> float:
        calls.append(exclude_seen)
        return real(*args, exclude_seen=exclude_seen, **kwargs)

    monkeypatch.setattr(local_training, "fit_personal", spy)
    with Daemon.open(device) as daemon:
        learner = DeviceLearner(daemon, bundle)
        learner.prepare()
        daemon.add_events(_events(6))
        arrays = get_global_arrays(learner.bundle.student)
        learner.files.write_global(2, arrays, personal_fit=PersonalFit(2, 0.01, False))
        learner.refresh(adapt=False)
        learner.files.write_global(3, arrays, personal_fit=PersonalFit(2, 0.01, True))
        learner.refresh(adapt=False)
        assert daemon.status().model_version == "3+personal"
    assert calls == [False, True]


def test_a_device_fits_the_adapter_the_simulation_evaluates(device: Path, bundle: Path) -> None:
    """Given a global model and a history, the device's adapter is the one the simulation's
    evaluation fits for that history (both through ``fit_personal``, seeded by the history):
    whatever torch's generators drew before, so the figures a run reports for personal
    adapters are those its devices get, and a device's refit repeats."""
    from shared.federated.bundle import load_bundle
    from shared.federated.local_training import fit_personal
    from shared.federated.student_task import set_global_arrays

    with Daemon.open(device) as daemon:
        learner = DeviceLearner(daemon, bundle)
        learner.prepare()
        daemon.add_events(_events(8, seed=1))
        arrays = [a + 0.1 for a in get_global_arrays(learner.bundle.student)]
        learner.files.write_global(2, arrays, personal_fit=PersonalFit(5, 0.05, True))
        torch.manual_seed(123)
        learner.refresh(adapt=False)
        assert daemon.status().model_version == "2+personal"
        on_device = _adapter(learner)
        history = local_history(device, Catalog(tuple(learner.bundle.item_ids)))
    assert len(history) == 8
    student = load_bundle(bundle).student
    set_global_arrays(student, arrays)
    init = {k: v.clone() for k, v in student.adapter.state_dict().items()}
    torch.manual_seed(456)
    fit_personal(student, history, init, 5, 0.05, exclude_seen=True)
    assert not torch.equal(student.adapter.up.weight, init["up.weight"])  # it did fit
    for name, value in student.adapter.state_dict().items():
        torch.testing.assert_close(on_device[name], value, rtol=0, atol=0)


def test_global_model_file_of_an_older_version_refits_with_the_default_objective(
    tmp_path: Path,
) -> None:
    files = FederatedFiles(tmp_path)
    files.directory.mkdir(parents=True)
    arrays = {"arr_0000": np.ones(3, dtype=np.float32)}
    np.savez(files.global_params, version=4, count=1, personal_steps=5, personal_lr=0.01, **arrays)
    received = files.read_global()
    assert received is not None and received.personal_fit == PersonalFit(5, 0.01, True)
    np.savez(files.global_params, version=5, count=1, **arrays)
    received = files.read_global()
    assert received is not None and received.personal_fit is None


def test_learner_refuses_a_bundle_of_another_catalog(
    device: Path, bundle: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    student = StudentModel(
        np.zeros((5, 8), dtype=np.float32),
        np.zeros((5, 8), dtype=np.float32),
        StudentConfig(dim=16, max_len=10, text_dim=8, id_dim=8),
    )
    save_bundle(other, student, None, [f"x{i}" for i in range(5)])
    with Daemon.open(device) as daemon:
        DeviceLearner(daemon, bundle).prepare()
        with pytest.raises(ConfigError, match="another catalog"):
            DeviceLearner(daemon, other).prepare()


def test_learner_refuses_a_bundle_holding_the_simulated_users_data(
    device: Path, bundle: Path, tmp_path: Path
) -> None:
    """A simulation's bundle.pt holds every virtual client's history: a device given it
    would hold other users' data; it takes the model-only deploy-bundle.pt."""
    from shared.federated.bundle import ClientData, load_bundle

    loaded = load_bundle(bundle)
    seqs = [np.array([0, 1, 2]), np.array([3, 4])]
    with_users = tmp_path / "with-users.pt"
    clients = ClientData(seqs, np.array([2, 4]), np.array([1, 3]), seqs)
    save_bundle(with_users, loaded.student, clients, loaded.item_ids)
    with Daemon.open(device) as daemon:
        with pytest.raises(ModelFileError, match=r"simulated clients' data.*deploy-bundle\.pt"):
            DeviceLearner(daemon, with_users).prepare()
        assert daemon.status().model_version is None  # nothing installed from it


def test_learner_names_the_deploy_bundle_for_a_file_that_is_not_a_bundle(
    device: Path, tmp_path: Path
) -> None:
    """A device given a file that is not a bundle was told to give "the bundle.pt that
    `fedrec simulate` wrote", which a deployment then refuses (it holds the users' data)."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a bundle")
    with (
        Daemon.open(device) as daemon,
        pytest.raises(ModelFileError, match=r"not a readable .*deploy-bundle\.pt"),
    ):
        DeviceLearner(daemon, garbage).prepare()


def test_init_force_removes_the_old_federations_global_model_and_keeps_its_accounting(
    device: Path, bundle: Path
) -> None:
    """`init --force` (what a device joining a new federation runs) kept global.npz: the
    daemon served the old federation's parameters on the new bundle, or failed every start."""
    task, params = _ready_device_task(device, bundle)
    assert task.fit(0, params, {"server-round": 3}).status is FitStatus.OK
    files = FederatedFiles(device)
    assert files.global_version() == 2
    init_identity(device, force=True)
    assert not files.global_params.exists()
    assert files.rounds_joined() == 1  # privacy accounting, as the ledger
    assert (device / "privacy" / "ledger.json").exists()
    with Daemon.open(device) as daemon:
        DeviceLearner(daemon, bundle).prepare()
        assert daemon.status().model_version == "0"


def _serving_global_v4(daemon: Daemon, bundle: Path) -> tuple[DeviceLearner, list[np.ndarray]]:
    """A learner for ``daemon`` serving global model 4 (the bundle's parameters + 0.5), and
    the bundle's own parameters."""
    learner = DeviceLearner(daemon, bundle)
    learner.prepare()
    pretrained = get_global_arrays(learner.bundle.student)
    FederatedFiles(daemon.layout.state_dir).write_global(4, [a + 0.5 for a in pretrained])
    learner.refresh(adapt=False)
    return learner, pretrained


def test_an_unreadable_global_model_keeps_the_served_one_instead_of_the_bundles(
    device: Path, bundle: Path
) -> None:
    """An unreadable global.npz read as no global model: the next refresh served the bundle's
    model (version 0) after a restart, or version 4's parameters labelled 0 without one."""
    files = FederatedFiles(device)
    with Daemon.open(device) as daemon:
        learner, pretrained = _serving_global_v4(daemon, bundle)
        assert daemon.status().model_version == "4"
        files.global_params.write_bytes(b"\x00" * 100)  # a bad sector, a full disk
        daemon.add_events(_events(3))
        with pytest.raises(DataError, match=r"global\.npz is unreadable.*serving model 4 until"):
            learner.refresh(adapt=True)
        assert daemon.status().model_version == "4"
        assert daemon.store.adaptation_pending() == 3  # taken in once a readable model comes
    with Daemon.open(device) as daemon:  # after a restart
        learner = DeviceLearner(daemon, bundle)
        learner.prepare()
        assert daemon.status().model_version == "4"
        with pytest.raises(DataError, match="unreadable"):
            learner.refresh(adapt=True)
        assert daemon.status().model_version == "4"
        files.global_params.unlink()  # gone, not unreadable: the bundle's own parameters
        learner.refresh(adapt=False)
        assert daemon.status().model_version == "0+personal"
        for served, own in zip(get_global_arrays(learner.bundle.student), pretrained, strict=True):
            np.testing.assert_array_equal(served, own)


@pytest.mark.parametrize("keep", [0, 10, 0.5], ids=["empty", "10 bytes", "half"])
def test_a_truncated_global_model_is_replaced_by_the_next_one_and_blocks_no_start(
    device: Path, bundle: Path, keep: float
) -> None:
    """A truncated global.npz raised zipfile.BadZipFile (an empty one EOFError), which the
    reader did not take for an unreadable file: the ClientApp, which reads the kept version
    before replacing it, failed every round (so nothing ever replaced it), and the daemon
    with a learner no longer started."""
    files = FederatedFiles(device)
    with Daemon.open(device) as daemon:
        _, pretrained = _serving_global_v4(daemon, bundle)
    data = files.global_params.read_bytes()
    files.global_params.write_bytes(data[: int(keep * len(data)) if keep < 1 else int(keep)])
    assert files.read_global() is None and files.global_version() is None
    with pytest.raises(DataError, match="unreadable"):
        files.read_global(strict=True)
    with Daemon.open(device) as daemon:  # the daemon starts, serving what it served
        DeviceLearner(daemon, bundle).prepare()
        assert daemon.status().model_version == "4"
    # the ClientApp keeps the next global model over it
    assert files.write_global(5, pretrained)
    received = files.read_global()
    assert received is not None and received.version == 5


def test_learner_refuses_a_kept_global_model_of_another_architecture(
    device: Path, bundle: Path, tmp_path: Path
) -> None:
    """The error named only a parameter's shape, on every start; it now names the file."""
    other = tmp_path / "wider.pt"
    student = tiny_student(N_ITEMS, dim=32)
    save_bundle(other, student, None, ITEMS)  # same catalog, another student
    files = FederatedFiles(device)
    files.write_global(4, get_global_arrays(student))
    with Daemon.open(device) as daemon:
        learner = DeviceLearner(daemon, bundle)
        before = [a.copy() for a in get_global_arrays(learner.bundle.student)]
        with pytest.raises(ConfigError, match=r"global model 4 kept in .*global\.npz does not fit"):
            learner.prepare()
        for kept, was in zip(get_global_arrays(learner.bundle.student), before, strict=True):
            np.testing.assert_array_equal(kept, was)  # nothing half loaded
        files.global_params.unlink()  # what the message says to do
        learner.prepare()
        assert daemon.status().model_version == "0"


def test_supernode_command_line(device: Path, bundle: Path, tmp_path: Path) -> None:
    ca = create_pki(tmp_path / "certs").ca_cert
    options = SuperNodeOptions(server="127.0.0.1:9093", root_cert=ca, bundle=bundle)
    with Daemon.open(device) as daemon:
        spec = supernode_spec(daemon.layout, options)
    argv = list(spec.argv)
    assert Path(argv[0]).name == "flower-supernode"
    assert argv[argv.index("--superlink") + 1] == "127.0.0.1:9093"
    assert argv[argv.index("--root-certificates") + 1] == str(ca.resolve())
    assert argv[argv.index("--auth-supernode-private-key") + 1].endswith("client.key")
    assert "--insecure" not in argv and "--allow-runtime-dependency-installation" not in argv
    node_config = argv[argv.index("--node-config") + 1]
    assert f"fedrec-device-dir='{device.resolve()}'" in node_config
    assert "fedrec-share-evaluation=false" in node_config  # the owner's choice, off by default
    assert "fedrec-max-epsilon=8.0" in node_config and "fedrec-require-dp=true" in node_config
    assert "fedrec-max-noise-shares=1" in node_config  # all the noise, trusting no one
    assert "fedrec-max-round-steps=1000" in node_config
    assert "fedrec-max-round-epsilon=6.0" in node_config
    assert spec.restart and spec.max_backoff_s is not None and spec.log_file


def test_a_supernode_found_by_a_relative_path_runs_in_the_device_folder(
    device: Path, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started as ``python -m fedrec.cli`` through a relative PATH entry (``PATH=.venv/bin``),
    Python's ``sys.executable`` is relative, and so was the flower-supernode beside it.
    Since the SuperNode runs in the device folder, not the daemon's, that path named no
    file there (Popen resolves it against ``cwd``), and neither did the PATH entry its
    flower-superexec and flwr-clientapp are found by: the SuperNode never started. Both
    are absolute."""
    venv = Path(sys.executable).parent.parent
    monkeypatch.chdir(venv)
    monkeypatch.setattr(sys, "executable", str(Path(sys.executable).relative_to(venv)))
    ca = create_pki(tmp_path / "certs").ca_cert
    options = SuperNodeOptions(server="127.0.0.1:9093", root_cert=ca, bundle=bundle)
    with Daemon.open(device) as daemon:
        spec = supernode_spec(daemon.layout, options)
    assert spec.cwd == str(device.resolve())
    assert (Path(spec.cwd) / spec.argv[0]).is_file()  # as Popen(argv, cwd=cwd) finds it
    assert os.path.samefile(spec.argv[0], venv / "bin" / "flower-supernode")
    first_on_path = dict(spec.env)["PATH"].split(os.pathsep)[0]
    assert os.path.isabs(first_on_path) and os.path.samefile(first_on_path, venv / "bin")


@pytest.mark.parametrize(
    ("server", "root", "match"),
    [
        ("nohost", "ca", "HOST:PORT"),
        ("https://x:1", "ca", "HOST:PORT|scheme"),
        ("127.0.0.1:9093", "missing", "does not exist"),
        ("127.0.0.1:9093", "junk", "not a PEM certificate"),
        ("127.0.0.1:9093", "leaf", "not a CA certificate"),
    ],
)
def test_supernode_options_are_checked(
    bundle: Path, tmp_path: Path, server: str, root: str, match: str
) -> None:
    pki = create_pki(tmp_path / "certs")
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    paths = {"ca": pki.ca_cert, "missing": tmp_path / "nope.pem", "junk": junk}
    paths["leaf"] = pki.server_cert  # pinned in place of the CA: never verifies
    with pytest.raises(ConfigError, match=match):
        SuperNodeOptions(server=server, root_cert=paths[root], bundle=bundle)


def test_a_federation_cannot_hold_a_devices_erase_with_a_huge_refit() -> None:
    """A refit holds the model, and so DELETE /data, until it ends: a run config asking for
    10**9 personal-steps kept an erase waiting for hours. The device takes at most
    MAX_FEDERATION_PERSONAL_STEPS from the federation; its owner's --personal-steps, any."""
    from client.device.config import MAX_FEDERATION_PERSONAL_STEPS

    greedy = PersonalFit(10**9, 0.02, False)
    assert LearnerConfig().personal_fit(greedy).steps == MAX_FEDERATION_PERSONAL_STEPS
    assert LearnerConfig(personal_steps=5000).personal_fit(greedy).steps == 5000
    fair = PersonalFit(MAX_FEDERATION_PERSONAL_STEPS, 0.02, False)
    assert LearnerConfig().personal_fit(fair) == fair


def test_learner_refits_with_its_flags_else_the_federations_else_the_defaults() -> None:
    from shared.federated.local_config import LocalTrainConfig

    train = LocalTrainConfig()
    defaults = PersonalFit(train.personal_steps, train.personal_lr, train.exclude_seen)
    federation = PersonalFit(7, 0.02, False)
    assert LearnerConfig().personal_fit(None) == defaults
    assert LearnerConfig().personal_fit(federation) == federation
    assert LearnerConfig(personal_steps=0).personal_fit(federation) == (0, 0.02, False)
    assert LearnerConfig(personal_lr=0.5).personal_fit(None) == (train.personal_steps, 0.5, True)
    assert LearnerConfig(exclude_seen=True).personal_fit(federation) == (7, 0.02, True)
    with pytest.raises(ConfigError, match="personal-steps must be >= 0"):
        LearnerConfig(personal_steps=-1)
    for bad, match in (
        ({"debounce_s": float("nan")}, "--adapt-debounce must be a finite number"),
        ({"debounce_s": float("inf")}, "--adapt-debounce must be a finite number"),
        ({"personal_lr": float("nan")}, "--personal-lr must be a finite number > 0, got nan"),
        ({"poll_s": 0.0}, "poll-s must be a finite number > 0"),
    ):
        with pytest.raises(ConfigError, match=match):
            LearnerConfig(**bad)  # type: ignore[arg-type]


def test_the_device_spends_by_the_budget_it_reports(
    device: Path, bundle: Path, tmp_path: Path
) -> None:
    from client.device.supernode import one_epsilon_cap

    ca = create_pki(tmp_path / "certs").ca_cert
    options = SuperNodeOptions(server="127.0.0.1:9093", root_cert=ca, bundle=bundle)
    for shown, enforced, cap in ((4.0, 8.0, 4.0), (8.0, 3.0, 3.0), (8.0, 8.0, 8.0)):
        config, node = one_epsilon_cap(
            DaemonConfig(privacy_epsilon=shown), replace(options, max_epsilon=enforced)
        )
        assert (config.privacy_epsilon, node.max_epsilon) == (cap, cap)
        with Daemon.open(device, config=config) as daemon:  # before any round: the cap
            assert daemon.status().epsilon_budget == cap
        with Daemon.open(device, config=config) as daemon:
            spec = supernode_spec(daemon.layout, node)
        node_config = spec.argv[list(spec.argv).index("--node-config") + 1]
        assert f"fedrec-max-epsilon={cap!r}" in node_config
        assert f"fedrec-max-delta={config.privacy_delta!r}" in node_config
    # after rounds under budget 8, an owner who lowers the cap sees the new one at once (it
    # showed the last round's 8 until the next round)
    from shared.privacy.ledger import PrivacyBudget, PrivacyLedger

    with Daemon.open(device) as daemon:
        ledger_file = daemon.layout.ledger
    PrivacyLedger.open(ledger_file, PrivacyBudget(8.0)).record(1.0, 0.1, 50)
    with Daemon.open(device, config=DaemonConfig(privacy_epsilon=3.0)) as daemon:
        assert daemon.status().epsilon_budget == 3.0


@pytest.mark.parametrize("cap", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bad_device_epsilon_cap_is_refused(bundle: Path, tmp_path: Path, cap: float) -> None:
    ca = create_pki(tmp_path / "certs").ca_cert
    with pytest.raises(ConfigError, match="--max-epsilon"):
        SuperNodeOptions(server="127.0.0.1:9093", root_cert=ca, bundle=bundle, max_epsilon=cap)


@pytest.mark.parametrize(
    ("caps", "flag"),
    [
        ({"max_round_steps": 0}, "--max-round-steps must be an integer >= 1"),
        ({"max_round_epsilon": 0.0}, "--max-round-epsilon must be a finite number > 0"),
        ({"max_round_epsilon": float("nan")}, "--max-round-epsilon must be a finite number > 0"),
        ({"max_round_epsilon": float("inf")}, "--max-round-epsilon must be a finite number > 0"),
    ],
)
def test_a_bad_device_round_cap_is_refused(
    bundle: Path, tmp_path: Path, caps: dict[str, Any], flag: str
) -> None:
    ca = create_pki(tmp_path / "certs").ca_cert
    with pytest.raises(ConfigError, match=flag):
        SuperNodeOptions(server="127.0.0.1:9093", root_cert=ca, bundle=bundle, **caps)


def test_a_device_refuses_to_train_with_another_bundle_than_the_servers(
    device: Path, bundle: Path, tmp_path: Path
) -> None:
    """Another bundle with the same catalog (another pretraining) passed the catalog check:
    the device trained and served another model than the federation's, without a word."""
    from server.state import init_state_dir
    from server.superlink import deployment_run_config as server_run_config
    from shared.errors import ModelFileError
    from shared.federated.bundle import bundle_digest

    submitted = server_run_config(
        init_state_dir(tmp_path / "server"), bundle=bundle, num_rounds=1, overrides={}
    )
    assert submitted["bundle-sha256"] == bundle_digest(bundle)
    with Daemon.open(device) as daemon:
        DeviceLearner(daemon, bundle).prepare()
        daemon.add_events(_events(10))
    same = _device_task(device, bundle, **{"bundle-sha256": submitted["bundle-sha256"]})
    params = same.initial_parameters()  # type: ignore[attr-defined]
    assert same.fit(0, params, {"server-round": 1}).status is FitStatus.OK  # type: ignore[attr-defined]
    other = _device_task(device, bundle, **{"bundle-sha256": "0" * 64})
    with pytest.raises(
        ModelFileError, match=r"is not the server's .*same bundle file.*deploy-bundle\.pt"
    ):
        other.initial_parameters()  # type: ignore[attr-defined]


def test_a_personal_model_is_exported_without_touching_the_disk(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export wrote fp32.onnx / int8.onnx (the user's adapter in clear) to a temporary
    folder, which a daemon killed mid-export left behind for good."""
    import tempfile

    from client.device.training import export_personal_model
    from shared.federated.bundle import load_bundle
    from shared.ondevice.runtime import OnDeviceModel

    def no_files(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the personal model's export created a temporary file")

    for name in ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryFile"):
        monkeypatch.setattr(tempfile, name, no_files)
    loaded = load_bundle(bundle)
    data = export_personal_model(loaded.student, tuple(loaded.item_ids), "2+personal")
    model = OnDeviceModel(data)
    assert model.metadata.model_version == "2+personal"
    assert model.metadata.quantization != "none"


def test_a_new_runs_model_is_served_even_at_the_round_already_served(
    device: Path, bundle: Path
) -> None:
    """The learner compared rounds only: a new Flower run's round-3 model, kept by the
    ClientApp in place of the old run's round 3, was not served until something else
    triggered a refresh."""
    with Daemon.open(device) as daemon:
        learner = DeviceLearner(daemon, bundle)
        learner.prepare()
        arrays = get_global_arrays(learner.bundle.student)
        learner.files.write_global(3, [a + 0.1 for a in arrays], run_id=111)
        learner._tick()
        first = daemon.model_info
        assert first is not None and first.model_version == "3"
        learner._tick()  # nothing new: nothing installed
        assert daemon.model_info == first
        assert learner.files.write_global(3, [a - 0.1 for a in arrays], run_id=222)
        learner._tick()
        second = daemon.model_info
        assert second is not None and second.model_version == "3"
        assert second.version == first.version + 1 and second.sha256 != first.sha256


def test_delete_data_serves_the_newest_global_model_at_once(device: Path, bundle: Path) -> None:
    """Every global model a device received was served with its personal adapter, so the
    only non-personal model it had sealed was the bundle's (version 0): right after
    ``DELETE /data`` it served version 0, and the newest global model (12) only once the
    learner rebuilt it a tick later (or, mid-round, once the round ended)."""
    from fastapi.testclient import TestClient

    from client.device.api import create_app
    from client.device.identity import DeviceIdentity

    config = LearnerConfig(debounce_s=0.0, poll_s=600.0)  # idle until woken
    with Daemon.open(device, config=DaemonConfig(port=0)) as daemon:
        learner = DeviceLearner(daemon, bundle, config)
        learner.prepare()
        assert daemon.status().model_version == "0"
        daemon.add_events(_events(8))
        pretrained = get_global_arrays(learner.bundle.student)
        for version in (11, 12):  # rounds: each one served with the adapter
            learner.files.write_global(version, [a + 0.01 * version for a in pretrained])
            learner.refresh(adapt=True)
            assert daemon.status().model_version == f"{version}+personal"
        learner.attach()  # the running daemon's learner, idle until woken
        token = DeviceIdentity.load(device).api_token()
        client = TestClient(create_app(daemon, token))
        client.headers["Authorization"] = f"Bearer {token}"
        assert client.get("/status").json()["model_version"] == "12+personal"
        # the ClientApp mid-round holds the files lock: the learner's refresh waits for it,
        # the erase does not
        with learner.files.lock():
            assert client.delete("/data").status_code == 204
            assert client.get("/status").json()["model_version"] == "12"
            assert client.get("/recommendations").json()["model_version"] == "12"
        status = client.get("/status").json()
        assert status["model_version"] == "12"
        assert status["events"] == 0 and status["adaptation_pending"] == 0
        # the global parameters, without an adapter: a newcomer's model of round 12
        served = daemon.model
        assert served is not None and not served.metadata.model_version.endswith("+personal")
        assert all(
            not info.model_version.endswith("+personal")
            for info in (daemon.models.read(v)[0] for v in daemon.models.versions())
        )
        learner.stop()


def test_a_daemon_stops_at_once_while_the_client_app_holds_the_files_mid_fit(
    device: Path, bundle: Path
) -> None:
    """The ClientApp holds ``federated/.lock`` for a whole fit (minutes) and writes the new
    global model at its start, so the learner's refresh waits for that lock. Stopping the
    daemon then waited for the fit too (the learner is stopped, with a 60 s join, before
    the SuperNode and its ClientApp are), and a learner outliving that join went on with a
    closed store."""
    import threading

    daemon = Daemon.open(device, config=DaemonConfig(port=0))
    learner = DeviceLearner(daemon, bundle, LearnerConfig(debounce_s=0.0, poll_s=0.05))
    learner.attach()
    arrays = [a + 0.5 for a in get_global_arrays(learner.bundle.student)]
    fitting, done = threading.Event(), threading.Event()

    def client_app_fit() -> None:
        with learner.files.lock():
            learner.files.write_global(4, arrays)
            fitting.set()
            done.wait(30)

    fit = threading.Thread(target=client_app_fit)
    fit.start()
    try:
        assert fitting.wait(10)
        time.sleep(0.5)  # the learner's tick saw model 4 and waits for the lock
        started = time.monotonic()
        daemon.shutdown()
        assert time.monotonic() - started < 5.0
        assert learner._thread is not None and not learner._thread.is_alive()
    finally:
        done.set()
        fit.join()


def test_a_fit_reads_the_history_once_so_an_erase_mid_fit_cannot_fail_it(
    device: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device task counted the events (enough: no decline) and the training read the
    history again: a DELETE /data between the two made the round an error reply of kind
    'data' ('client 0 has 0 interactions'). A fit now reads the history once and trains on
    that read (an erase after it does not reach an update already being trained)."""
    import client.device.training as training

    task, params = _ready_device_task(device, bundle)
    real = training.local_history
    reads: list[int] = []

    def erased_after_the_first_read(*args: Any, **kwargs: Any) -> np.ndarray:
        reads.append(1)
        history = real(*args, **kwargs)
        return history if len(reads) == 1 else history[:0]

    monkeypatch.setattr(training, "local_history", erased_after_the_first_read)
    fit = task.fit(0, params, {"server-round": 1})
    assert fit.status is FitStatus.OK and len(reads) == 1
    later = task.fit(0, params, {"server-round": 2})  # the erase seen by the next round
    assert later.status is FitStatus.DECLINED and later.decline_kind == "no-local-data"


def _break_refits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every personal refit fails with DataError("the refit broke")."""
    import shared.federated.local_training as local_training

    def broken(*args: Any, **kwargs: Any) -> None:
        raise DataError("the refit broke")

    monkeypatch.setattr(local_training, "fit_personal", broken)


def _attached_learner(daemon: Daemon, bundle: Path) -> DeviceLearner:
    """A learner on ``daemon`` polling fast, its thread started."""
    learner = DeviceLearner(daemon, bundle, LearnerConfig(debounce_s=0.05, poll_s=0.05))
    learner.attach()
    return learner


def test_a_failing_refresh_shows_in_status_until_one_succeeds(
    device: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The learner's failures (a refit that fails, a global model of another federation)
    reached only the daemon's log: /status showed an old model served with no reason. Its
    refresh_error says why, until a refresh succeeds."""
    import shared.federated.local_training as local_training

    real = local_training.fit_personal
    _break_refits(monkeypatch)
    with Daemon.open(device, config=DaemonConfig(port=0)) as daemon:
        _attached_learner(daemon, bundle)
        assert daemon.status().refresh_error is None
        daemon.add_events(_events(8, seed=1))
        _wait_until(lambda: daemon.status().refresh_error is not None)
        status = daemon.status()
        assert "the refit broke" in str(status.refresh_error)
        assert status.model_version == "0"  # the last good model serves meanwhile
        monkeypatch.setattr(local_training, "fit_personal", real)
        _wait_until(lambda: daemon.status().model_version == "0+personal")  # retried
        assert daemon.status().refresh_error is None


def test_the_learner_outlives_any_number_of_failed_refreshes(device: Path, bundle: Path) -> None:
    """The back-off after failed refreshes was ``min(60, 2.0**failures)``: the power is taken
    before the cap, and 2.0**1024 raises OverflowError outside the loop's error handling, so
    about 17 hours of failures (a global model of another federation, an unreadable one;
    sooner with events waking it) killed the learner thread silently: the device served its
    old model for ever, after the fault was gone too."""
    import threading

    class NoWait(threading.Event):
        """The back-off's waits return at once: 17 hours of failures in a moment."""

        def wait(self, timeout: float | None = None) -> bool:
            return True

    ticks: list[float] = []
    with Daemon.open(device) as daemon:
        learner = DeviceLearner(daemon, bundle)

        def tick() -> None:
            ticks.append(time.monotonic())
            if len(ticks) <= 1100:
                raise DataError("the global model is unreadable")
            learner._stop.set()  # the fault is gone: this refresh succeeds

        learner._tick = tick  # type: ignore[method-assign]
        learner._wake = NoWait()
        learner._loop()  # returns once stopped, instead of raising OverflowError
    assert len(ticks) == 1101


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"num_threads": 0}, "num-threads must be an integer >= 1, got 0"),
        ({"num_threads": 1.5}, "num-threads must be an integer >= 1, got 1.5"),
        ({"personal_steps": 2.5}, "--personal-steps must be >= 0, a whole number, got 2.5"),
        ({"personal_steps": True}, "--personal-steps must be >= 0, a whole number, got True"),
        ({"poll_s": 1e10}, "poll-s must be a finite number > 0 and <= 3600 seconds"),
    ],
)
def test_a_learner_config_that_cannot_run_is_refused_at_once(
    bad: dict[str, object], match: str
) -> None:
    """LearnerConfig took these, then failed later: num_threads 0 raised torch's bare
    RuntimeError from every refresh (a traceback at start), steps of 2.5 a ConfigError from
    every refit once the history had two events, and a poll of 1e10 s an OverflowError
    from the learner thread's first wait, which ended it (no model refreshed again)."""
    with pytest.raises(ConfigError, match=match):
        LearnerConfig(**bad)  # type: ignore[arg-type]


def test_an_erase_that_serves_the_global_model_clears_the_refresh_error(
    device: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refit that kept failing left its refresh_error after DELETE /data, which installed
    the newest global model and left nothing to refit: /status said refreshes kept failing,
    with a current model served and no refresh failing any more, until the next round."""
    _break_refits(monkeypatch)
    with Daemon.open(device, config=DaemonConfig(port=0)) as daemon:
        learner = _attached_learner(daemon, bundle)
        daemon.add_events(_events(8, seed=1))
        _wait_until(lambda: daemon.status().refresh_error is not None)
        learner.stop()  # no refit retried meanwhile: its failure would be a new one
        daemon.erase()
        status = daemon.status()
        assert status.model_version == "0" and status.events == 0
        assert status.refresh_error is None


def test_an_unreadable_federation_file_is_logged_once_not_at_every_poll(
    device: Path, bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The learner reads global.npz and joined.json at every poll (twice a second by
    default), and each read of an unreadable one logged an ERROR: until the next round
    replaced it (hours, days), the daemon's log grew by two lines a second per file. Each
    state of a file is logged once; a new one, unreadable too, is logged again."""
    with Daemon.open(device, config=DaemonConfig(port=0)) as daemon:
        learner = DeviceLearner(daemon, bundle, LearnerConfig(poll_s=0.02))
        learner.files.write_global(3, get_global_arrays(learner.bundle.student))
        learner.attach()
        assert daemon.status().model_version == "3"
        with caplog.at_level(logging.ERROR, logger="client.device.training"):
            learner.files.global_params.write_bytes(b"not a zip")
            learner.files.joined.write_text("[1, 2]")
            time.sleep(0.6)  # ~30 polls
            for path in (learner.files.global_params, learner.files.joined):
                logged = [r for r in caplog.records if str(path) in r.getMessage()]
                assert len(logged) == 1, (path, len(logged))
            caplog.clear()
            learner.files.global_params.write_bytes(b"not a zip either")
            _wait_until(lambda: "global.npz" in caplog.text)
        assert daemon.status().model_version == "3"  # the served model stays
        learner.stop()


def test_a_daemon_stops_at_once_while_the_learner_refits(
    device: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refit runs ``personal-steps`` Adam steps (up to 2000 the federation may ask for:
    minutes on a device), and stopping the daemon joined the learner for up to 60 s first:
    SIGTERM took a minute (Docker's 30 s grace SIGKILLed it), and a refit outliving the join
    went on to seal a model after the store was closed and the directory's lock released.
    A stop now ends the refit at its next step, and nothing is installed."""
    import threading

    import shared.federated.local_training as local_training

    real = local_training.fit_personal
    fitting = threading.Event()

    def signalled(*args: Any, **kwargs: Any) -> float:
        fitting.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(local_training, "fit_personal", signalled)
    daemon = Daemon.open(device, config=DaemonConfig(port=0))
    learner = DeviceLearner(daemon, bundle, LearnerConfig(debounce_s=0.0, personal_steps=10**9))
    learner.attach()
    sealed = daemon.models.versions()
    daemon.add_events(_events(8))
    assert fitting.wait(10)
    started = time.monotonic()
    daemon.shutdown()
    assert time.monotonic() - started < 5.0
    assert learner._thread is not None and not learner._thread.is_alive()
    assert daemon.models.versions() == sealed and daemon.refresh_error is None


def test_an_erase_mid_refit_ends_the_refit_instead_of_waiting_for_it(
    device: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``DELETE /data`` rebuilds the global model in the learner's student, so it waited for
    a refit in flight (thousands of steps: minutes), holding the daemon's locks all along:
    ``/status``, recommendations and feedback hung with it. A refit of data being erased
    is stale anyway: the erase now ends it at its next step, and the learner refits once
    the erase is done."""
    import threading

    import shared.federated.local_training as local_training

    real = local_training.fit_personal
    fitting = threading.Event()
    steps: list[int] = []

    def signalled(*args: Any, **kwargs: Any) -> float:
        steps.append(args[3])
        if len(steps) == 1:  # the first refit runs for ever, unless cancelled
            fitting.set()
            return real(*args[:3], 10**9, *args[4:], **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(local_training, "fit_personal", signalled)
    with Daemon.open(device, config=DaemonConfig(port=0)) as daemon:
        learner = DeviceLearner(daemon, bundle, LearnerConfig(debounce_s=0.0, poll_s=0.05))
        learner.attach()
        daemon.add_events(_events(8))
        assert fitting.wait(10)
        erase = threading.Thread(target=daemon.erase)
        erase.start()
        erase.join(5)
        stuck = erase.is_alive()
        learner.stop()  # ends the refit, if the erase did not
        erase.join()
        assert not stuck
        status = daemon.status()
        assert status.events == 0 and status.model_version == "0"
        assert status.refresh_error is None
