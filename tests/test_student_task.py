"""The recommender's federated task: DP-SGD fit, ledgers, budget refusal, bad local data,
personal parameters, and a whole (tiny) federation in process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shared.errors import ConfigError, DataError
from shared.federated.bundle import ClientData, load_bundle, save_bundle
from shared.federated.student_task import (
    StudentTask,
    adapter_names,
    get_global_arrays,
    resolve_device,
)
from shared.federated.task import FitStatus
from shared.models.student import StudentConfig, StudentModel

N_ITEMS = 40


def _student() -> StudentModel:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    return StudentModel(
        rng.normal(size=(N_ITEMS, 8)).astype(np.float32),
        rng.normal(size=(N_ITEMS, 8)).astype(np.float32),
        StudentConfig(dim=16, max_len=10, text_dim=8, id_dim=8),
    )


def _clients() -> ClientData:
    rng = np.random.default_rng(1)
    full = [rng.choice(N_ITEMS, size=14, replace=False) for _ in range(5)]
    full.append(np.array([3], dtype=np.int64))  # client 5: too little data to train
    return ClientData(
        train=[s[:-2] for s in full[:5]] + [full[5]],
        valid=np.array([s[-2] for s in full[:5]] + [-1]),
        test=np.array([s[-1] for s in full[:5]] + [-1]),
        full=full,
    )


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    path = tmp_path / "bundle.pt"
    save_bundle(path, _student(), _clients())
    return path


def _task(bundle: Path, state: Path, **extra: object) -> StudentTask:
    return StudentTask.from_run_config(
        {"bundle": str(bundle), "state-dir": str(state), "batch-size": 4, **extra}
    )


def test_bundle_round_trip(bundle: Path) -> None:
    loaded = load_bundle(bundle)
    assert loaded.n_items == N_ITEMS and loaded.clients is not None
    assert [len(s) for s in loaded.clients.train] == [12] * 5 + [1]
    original = _student()
    for (name, a), (_, b) in zip(
        original.state_dict().items(), loaded.student.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_fit_trains_global_params_records_privacy_and_keeps_personal(
    bundle: Path, tmp_path: Path
) -> None:
    # Prepare
    task = _task(bundle, tmp_path / "state")
    params = task.initial_parameters()
    # Execute
    out = task.fit(0, params, {"server-round": 1})
    # Assert
    assert out.status is FitStatus.OK
    assert [u.shape for u in out.arrays] == [p.shape for p in params]
    assert sum(float(np.abs(u).sum()) for u in out.arrays) > 0
    ledger = tmp_path / "state" / "client-0" / "ledger.json"
    assert ledger.exists() and float(out.metrics["epsilon"]) > 0
    assert (tmp_path / "state" / "client-0" / "personal.pt").exists()
    # epsilon is cumulative across rounds and across a fresh task (a restart)
    first = float(out.metrics["epsilon"])
    again = _task(bundle, tmp_path / "state").fit(0, params, {"server-round": 2})
    assert float(again.metrics["epsilon"]) > first


def test_budget_exhausted_client_declines_also_after_restart(bundle: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    task = _task(bundle, state, **{"epsilon-budget": 8.0, "noise-multiplier": 1.0})
    params = task.initial_parameters()
    statuses = [task.fit(1, params, {"server-round": r}).status for r in range(1, 6)]
    assert statuses[0] is FitStatus.OK
    assert FitStatus.DECLINED in statuses
    restarted = _task(bundle, state, **{"epsilon-budget": 8.0, "noise-multiplier": 1.0})
    out = restarted.fit(1, params, {"server-round": 9})
    assert out.status is FitStatus.DECLINED and "budget" in out.reason


def test_too_little_or_unknown_local_data_is_an_error(bundle: Path, tmp_path: Path) -> None:
    task = _task(bundle, tmp_path / "state")
    params = task.initial_parameters()
    with pytest.raises(DataError, match=r"at least 2|needs >= 2"):
        task.fit(5, params, {})
    with pytest.raises(DataError, match="no local data"):
        task.fit(99, params, {})


def test_evaluate_reports_protocol_metrics(bundle: Path, tmp_path: Path) -> None:
    task = _task(bundle, tmp_path / "state")
    res = task.evaluate(0, task.initial_parameters(), {})
    assert res.num_examples == 1 and np.isfinite(res.loss)
    assert set(res.metrics) == {"sampled_hr@10", "sampled_ndcg@10", "full_hr@10", "full_ndcg@10"}


def test_no_dp_mode_spends_no_privacy(bundle: Path, tmp_path: Path) -> None:
    task = _task(bundle, tmp_path / "state", dp=False)
    out = task.fit(2, task.initial_parameters(), {})
    assert out.status is FitStatus.OK and out.metrics["epsilon"] == 0.0


@pytest.mark.parametrize("secagg", [False, True])
def test_tiny_federation_in_process_goes_on_despite_a_bad_client(
    bundle: Path, tmp_path: Path, secagg: bool
) -> None:
    from client.client_app import make_client_app
    from server.server_app import make_server_app, run_in_process

    config = {
        "task": "shared.federated.student_task:make_task",
        "bundle": str(bundle),
        "state-dir": str(tmp_path / "state"),
        "num-rounds": 2,
        "cohort-size": 6,
        "min-cohort": 2,
        "min-available-clients": 6,
        "eval-size": 0,
        "eval-fraction": 0.0,
        "secagg": secagg,
        "secagg-num-shares": 3,
        "secagg-reconstruction-threshold": 2,
        "batch-size": 4,
    }
    reports = []
    server = make_server_app(config, on_round_end=reports.append)
    run_in_process(server, make_client_app(config), 6, run_config=config)
    assert [r.server_round for r in reports] == [1, 2]
    for r in reports:
        assert r.fit.ok == 5 and r.fit.failed == 1  # client 5 has one interaction
        assert r.fit.updated
    initial = get_global_arrays(_student())
    moved = sum(
        float(np.abs(a - b).sum()) for a, b in zip(reports[-1].parameters, initial, strict=True)
    )
    assert moved > 0


def test_meta_learning_mode_trains_the_adapter_initialization(bundle: Path, tmp_path: Path) -> None:
    plain = _task(bundle, tmp_path / "plain").initial_parameters()
    task = _task(bundle, tmp_path / "meta", **{"meta-learning": True, "dp": False})
    params = task.initial_parameters()
    n_adapter = len(adapter_names(task.model))
    assert n_adapter == 3 and len(params) == len(plain) + n_adapter
    out = task.fit(0, params, {"server-round": 1})
    assert out.status is FitStatus.OK
    assert [u.shape for u in out.arrays] == [p.shape for p in params]
    # the released update moves the shared initialization of the adapter (Reptile's step)...
    assert sum(float(np.abs(u).sum()) for u in out.arrays[-n_adapter:]) > 0
    # ... and the device kept its own, adapted from that initialization, on its disk
    personal = torch.load(tmp_path / "meta" / "client-0" / "personal.pt", weights_only=True)
    init = dict(zip(adapter_names(task.model), params[-n_adapter:], strict=True))
    assert not np.allclose(personal["up.weight"].numpy(), init["adapter.up.weight"])
    assert task.evaluate(0, params, {}).num_examples == 1
    with pytest.raises(DataError, match="adapter initialization"):
        task.fit(1, plain, {})  # a plain-mode model sent to a meta-learning client


def test_meta_learning_with_dp_records_privacy_like_plain_mode(
    bundle: Path, tmp_path: Path
) -> None:
    meta = _task(bundle, tmp_path / "meta", **{"meta-learning": True})
    plain = _task(bundle, tmp_path / "plain")
    a = meta.fit(0, meta.initial_parameters(), {"server-round": 1})
    b = plain.fit(0, plain.initial_parameters(), {"server-round": 1})
    assert a.status is b.status is FitStatus.OK
    assert float(a.metrics["epsilon"]) == pytest.approx(float(b.metrics["epsilon"]))


def test_device_selection() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no GPU"):
            resolve_device("cuda")


def test_no_dp_mode_clips_the_batch_gradient(bundle: Path, tmp_path: Path) -> None:
    # even at an absurd learning rate every SGD step moves at most lr * max-grad-norm
    task = _task(bundle, tmp_path / "state", dp=False, lr=50.0, **{"personal-steps": 0})
    out = task.fit(2, task.initial_parameters(), {})
    assert out.status is FitStatus.OK
    norm = float(np.sqrt(sum(float((u.astype(np.float64) ** 2).sum()) for u in out.arrays)))
    steps = int(out.metrics["steps"])
    assert 0 < norm <= 50.0 * 1.0 * steps + 1e-6
