"""The recommender's federated task: DP-SGD fit, ledgers, budget refusal, bad local data,
personal parameters, and a whole (tiny) federation in process."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from server.strategy import RoundReport
from shared.errors import ConfigError, DataError, ModelFileError, PublishedVersionError
from shared.federated.bundle import ClientData, load_bundle, save_bundle
from shared.federated.local_training import fit_personal, next_item_examples, pooled_examples
from shared.federated.student_task import (
    StudentTask,
    adapter_names,
    get_global_arrays,
    resolve_device,
    set_global_arrays,
)
from shared.federated.task import ConfigValue, FitStatus, RunConfigValue
from shared.models.sequence import next_item_cross_entropy
from shared.models.student import StudentConfig, StudentModel

if TYPE_CHECKING:
    from flwr.app import Message

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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_task_on_the_gpu_publishes_the_artifact_it_publishes_on_the_cpu(
    bundle: Path, tmp_path: Path
) -> None:
    """A server with a GPU holds its task's model there (``device=auto``); the artifact is
    still built, and is the CPU task's byte for byte. Seen on a GPU machine: every version
    failed with a device mismatch in the exporter, and none was published."""
    published = []
    for device in ("cpu", "cuda"):
        task = _task(bundle, tmp_path / device, device=device)
        assert next(task.model.parameters()).device.type == device
        path = task.publish_artifact(task.initial_parameters(), 3, tmp_path / device)
        assert path.name == "model-v3.int8.onnx"
        published.append(path.read_bytes())
        assert next(task.model.parameters()).device.type == device  # left where it trains
    assert published[0] == published[1]


def test_a_published_version_is_republished_as_is_but_never_replaced(
    bundle: Path, tmp_path: Path
) -> None:
    """The server publishes a checkpoint's model again after a crash between checkpoint and
    publication (the same model: a no-op); a round trained again after its checkpoint was
    lost is another model, and its version may be on devices: refused, file untouched (the
    server's lost-rounds guard needs a checkpoint store; this holds without one)."""
    task = _task(bundle, tmp_path / "state")
    out = tmp_path / "published"
    first = task.initial_parameters()
    path = task.publish_artifact(first, 2, out)
    before = path.read_bytes()
    assert task.publish_artifact(first, 2, out) == path and path.read_bytes() == before
    other = [a + np.float32(0.5) for a in first]
    with pytest.raises(PublishedVersionError, match="version 2 is out already"):
        task.publish_artifact(other, 2, out)
    assert path.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [
        "catalog.json",
        "model-v2.int8.onnx",
        "published.jsonl",  # one line: version 2, recorded once
    ]
    assert len((out / "published.jsonl").read_text().splitlines()) == 1
    assert task.publish_artifact(other, 3, out).read_bytes() != before  # the next version


def test_republishing_a_version_restores_a_catalog_a_crash_left_out(
    bundle: Path, tmp_path: Path
) -> None:
    """The catalog is written after the model: a server that died in between left the model
    alone, and the republication after the restart (the same model) was a no-op that never
    wrote the catalog a device needs to install it."""
    task = _task(bundle, tmp_path / "state")
    out = tmp_path / "published"
    path = task.publish_artifact(task.initial_parameters(), 2, out)
    catalog = out / "catalog.json"
    expected = catalog.read_text()
    catalog.unlink()  # the process died between the model's write and the catalog's
    assert task.publish_artifact(task.initial_parameters(), 2, out) == path
    assert catalog.read_text() == expected


def test_bundle_round_trip(bundle: Path) -> None:
    loaded = load_bundle(bundle)
    assert loaded.n_items == N_ITEMS and loaded.clients is not None
    assert [len(s) for s in loaded.clients.train] == [12] * 5 + [1]
    original = _student()
    for (name, a), (_, b) in zip(
        original.state_dict().items(), loaded.student.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_bundle_records_its_data_and_its_published_models_carry_it(
    bundle: Path, tmp_path: Path
) -> None:
    """The data and split a bundle's student was pretrained with travel into every model
    published from it (``fedrec evaluate model`` splits by them); a bundle written before
    they were recorded still loads, as unknown, and its models load without them."""
    import onnx

    from shared.data.provenance import DataProvenance
    from shared.ondevice.runtime import META_TRAINED_ON, OnDeviceModel

    trained_on = DataProvenance("ml-100k", 7, 0.1, 0.25, data_fingerprint="0123abcd")
    recorded = tmp_path / "recorded.pt"
    save_bundle(recorded, _student(), _clients(), trained_on=trained_on)
    assert load_bundle(recorded).trained_on == trained_on
    assert "trained_on" not in torch.load(bundle, weights_only=True)  # an older bundle's layout
    assert load_bundle(bundle).trained_on is None
    task = _task(recorded, tmp_path / "state")
    published = task.publish_artifact(task.initial_parameters(), 1, tmp_path / "published")
    assert OnDeviceModel(published).metadata.trained_on == trained_on  # the digest holds too
    older = _task(bundle, tmp_path / "state-older")
    unknown = older.publish_artifact(older.initial_parameters(), 1, tmp_path / "older")
    keys = {p.key for p in onnx.load(unknown).metadata_props}
    assert META_TRAINED_ON not in keys and OnDeviceModel(unknown).metadata.trained_on is None


def test_a_bundles_data_record_of_another_layout_is_refused_in_one_line(
    bundle: Path, tmp_path: Path
) -> None:
    payload = torch.load(bundle, weights_only=True)
    payload["trained_on"] = {"dataset": "ml-100k", "seed": 7}
    other = tmp_path / "other.pt"
    torch.save(payload, other)
    with pytest.raises(ModelFileError, match="written by another version") as caught:
        load_bundle(other)
    assert "training data record" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("dataset", [["ml-100k"], {"ml-100k": 1}, 100])
def test_a_data_record_whose_dataset_is_not_a_name_is_refused(dataset: object) -> None:
    """A list or a mapping for the dataset passed: `fedrec evaluate model` then failed
    with a traceback (AttributeError: 'list' object has no attribute 'strip') when it
    loaded the dataset the record names."""
    from shared.data.provenance import DataProvenance

    record = {"dataset": dataset, "seed": 7, "cold_user_fraction": 0.1, "public_fraction": 0.2}
    with pytest.raises(ConfigError, match="dataset must be a non-empty one-line key"):
        DataProvenance.from_mapping(record)


@pytest.mark.parametrize("digest", ["", "not hex", 16, "0123\nabcd"])
def test_a_data_record_whose_fingerprint_is_not_a_digest_is_refused(digest: object) -> None:
    from shared.data.provenance import DataProvenance

    record = {"dataset": "ml-100k", "seed": 7, "cold_user_fraction": 0.1, "public_fraction": 0.2}
    with pytest.raises(ConfigError, match="data_fingerprint must be a hex digest"):
        DataProvenance.from_mapping({**record, "data_fingerprint": digest})


def test_a_file_that_is_not_a_bundle_is_refused_in_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "bundle.pt"
    garbage.write_bytes(b"not a bundle")
    for path, match in (
        (garbage, r"not a readable .*runs/<name>/bundle\.pt"),
        (tmp_path, "folder"),
    ):
        with pytest.raises(ModelFileError, match=match) as caught:
            load_bundle(path)
        assert "\n" not in str(caught.value) and "weights_only=False" not in str(caught.value)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda b: b["student_config"].update(knob_of_a_newer_version=1), "TypeError"),
        (lambda b: b.pop("text_shape"), "no 'text_shape'"),
        (lambda b: b["clients"].pop("full"), "no 'full'"),
    ],
)
def test_a_bundle_of_another_version_is_refused_in_one_line(
    bundle: Path, tmp_path: Path, change: Any, said: str
) -> None:
    payload = torch.load(bundle, weights_only=True)
    change(payload)
    other = tmp_path / "other.pt"
    torch.save(payload, other)
    with pytest.raises(ModelFileError, match="written by another version") as caught:
        load_bundle(other)
    assert said in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["items.text.weight", "head_id.weight"])
def test_a_bundle_with_non_finite_weights_is_refused(tmp_path: Path, name: str) -> None:
    """A bundle with a NaN weight loaded. In a frozen table every client trained, charged
    its privacy ledger, and sent a NaN update its own check refused, every round; in a
    global parameter every client refused what it was sent. Now loading it is an error."""
    student = _student()
    with torch.no_grad():
        dict(student.named_parameters())[name].view(-1)[3] = float("nan")
    path = tmp_path / "bundle.pt"
    save_bundle(path, student, _clients())
    with pytest.raises(ModelFileError, match=f"NaN or inf weights \\({name}\\)") as caught:
        load_bundle(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c.update(valid=c["valid"][:-1]),  # client 5 had no validation item
        lambda c: c.update(test=c["test"][:3]),
        lambda c: c["full"].update(lengths=c["full"]["lengths"][:-1]),  # one history lost
        lambda c: c["train"]["lengths"].__setitem__(0, 13),  # cuts into client 1's items
        lambda c: c["train"]["lengths"].__setitem__(slice(0, 2), torch.tensor([-2, 26])),
    ],
)
def test_a_bundle_whose_client_data_do_not_fit_together_is_refused(
    bundle: Path, tmp_path: Path, change: Any
) -> None:
    """A bundle whose clients' arrays disagree loaded: one client's evaluation then failed
    with an IndexError (an "internal" error reply) while it still trained, or sequence
    lengths that do not add up cut other clients' items into a client's history."""
    payload = torch.load(bundle, weights_only=True)
    change(payload["clients"])
    other = tmp_path / "other.pt"
    torch.save(payload, other)
    with pytest.raises(ModelFileError, match="is damaged") as caught:
        load_bundle(other)
    assert "\n" not in str(caught.value)


def test_fit_trains_global_params_records_privacy_and_leaves_the_adapter(
    bundle: Path, tmp_path: Path
) -> None:
    # Prepare
    task = _task(bundle, tmp_path / "state")
    params = task.initial_parameters()
    with torch.no_grad():  # an adapter left over from another client of this process
        task.model.adapter.up.weight.fill_(0.5)
    # Execute
    out = task.fit(0, params, {"server-round": 1})
    # Assert
    assert out.status is FitStatus.OK
    assert [u.shape for u in out.arrays] == [p.shape for p in params]
    assert sum(float(np.abs(u).sum()) for u in out.arrays) > 0
    ledger = tmp_path / "state" / "client-0" / "ledger.json"
    assert ledger.exists() and float(out.metrics["epsilon"]) > 0
    # only the noised update is DP: no example count (a FedAvg weight, summed in the clear
    # even under SecAgg+) and no training loss, which would say whether a record was there
    assert out.num_examples == 1 and set(out.metrics) == {"epsilon"}
    plain = _task(bundle, tmp_path / "plain", dp=False).fit(0, params, {"server-round": 1})
    assert plain.num_examples > 1 and {"loss", "steps"} <= set(plain.metrics)
    # the global model is trained as a newcomer is served it (adapter at the identity), and
    # the adapter is the serving device's to fit (fit_personal), not the federated round's
    assert float(task.model.adapter.up.weight.abs().sum()) == 0.0
    assert not (tmp_path / "state" / "client-0" / "personal.pt").exists()
    # epsilon is cumulative across rounds and across a fresh task (a restart)
    first = float(out.metrics["epsilon"])
    again = _task(bundle, tmp_path / "state").fit(0, params, {"server-round": 2})
    assert float(again.metrics["epsilon"]) > first


def test_set_global_arrays_leaves_the_adapter_at_its_initialization() -> None:
    model = _student()
    plain = get_global_arrays(model)
    with torch.no_grad():
        model.adapter.up.weight.fill_(0.5)  # a personal adapter fitted earlier
    set_global_arrays(model, plain)
    assert float(model.adapter.up.weight.abs().sum()) == 0.0  # plain mode: the identity
    carried = [np.full(a.shape, 0.25, np.float32) for a in get_global_arrays(model, meta=True)]
    set_global_arrays(model, [*plain, *carried[len(plain) :]], meta=True)
    assert torch.all(model.adapter.up.weight == 0.25)  # meta: the carried initialization


def _history_loss(model: StudentModel, history: np.ndarray) -> float:
    items, mask, targets = next_item_examples(history, model.config.max_len)
    with torch.no_grad():
        return float(next_item_cross_entropy(model(items, mask), items, mask, targets))


def test_pooled_examples_are_each_sequences_recent_pairs_padded_alike() -> None:
    from shared.models.sequence import PAD_ITEM

    first, second = np.array([5, 6, 7, 8]), np.array([9, 3])
    items, mask, targets = pooled_examples([first, second], max_len=2)
    # (5)->6, (5 6)->7, (6 7)->8 from the first (windows of at most 2), then (9)->3
    assert targets.tolist() == [6, 7, 8, 3]
    assert items.tolist() == [[PAD_ITEM, 5], [5, 6], [6, 7], [PAD_ITEM, 9]]
    assert mask.tolist() == [[False, True], [True, True], [True, True], [False, True]]
    # each sequence keeps its most recent max_examples pairs, as a client trains on
    assert pooled_examples([first, second], 2, max_examples=1)[2].tolist() == [8, 3]


def test_fit_personal_refits_from_the_initialization_and_leaves_the_global_model() -> None:
    model = _student()
    model.eval()
    init = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    global_before = model.global_state_dict()
    history = _clients().train[0]
    before = _history_loss(model, history)
    torch.manual_seed(1)  # dropout is on while fitting
    fit_personal(model, history, init, steps=20, lr=0.01)
    fitted = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    assert _history_loss(model, history) < before  # it fits the user's own history
    for name, value in model.global_state_dict().items():
        assert torch.equal(value, global_before[name]), name
    # a stale adapter (fitted against another global model) is not continued: the same
    # history and global model give the same adapter whatever the adapter held before
    with torch.no_grad():
        model.adapter.up.weight.normal_()
    torch.manual_seed(1)
    fit_personal(model, history, init, steps=20, lr=0.01)
    for name, value in model.adapter.state_dict().items():
        assert torch.allclose(value, fitted[name], atol=1e-6), name
    assert not model.training  # left ready to serve
    # one interaction: nothing to fit, the initialization is served (in eval mode too)
    model.train()
    fit_personal(model, history[:1], init, steps=20, lr=0.01)
    for name, value in model.adapter.state_dict().items():
        assert torch.equal(value, init[name]), name
    assert not model.training


@pytest.mark.parametrize(
    ("steps", "lr", "said"),
    [
        (-3, 0.01, "steps must be an integer >= 0"),
        (2.5, 0.01, "steps must be an integer >= 0"),
        (True, 0.01, "steps must be an integer >= 0"),
        (5, math.nan, "learning rate must be a finite number > 0"),
        (5, -0.1, "learning rate must be a finite number > 0"),
        (5, 0.0, "learning rate must be a finite number > 0"),
        (5, math.inf, "learning rate must be a finite number > 0"),
    ],
)
def test_fit_personal_refuses_bad_steps_or_rate_before_touching_the_model(
    steps: Any, lr: float, said: str
) -> None:
    """A negative step count served the initialization as if it were 0, an infinite rate
    fitted an adapter of NaNs (every score NaN, every case a miss), and a NaN or negative
    rate raised Adam's bare ValueError with the model left in training mode, the global
    parameters frozen. Now a ConfigError that names the setting, for any history (one
    interaction too), and the model is as it was."""
    model = _student()
    model.eval()
    init = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    with torch.no_grad():
        model.adapter.up.weight.fill_(0.5)  # a fitted adapter, still being served
    for history in (_clients().train[0], _clients().train[0][:1]):
        with pytest.raises(ConfigError, match=said):
            fit_personal(model, history, init, steps, lr)
        assert torch.all(model.adapter.up.weight == 0.5)
        assert not model.training
        assert all(p.requires_grad for p in model.global_parameters())
    # no steps: nothing trains, so the rate is not read (a benchmark's "no adaptation")
    assert math.isnan(fit_personal(model, _clients().train[0], init, 0, 0.0))


def test_a_fresh_adapter_is_the_same_everywhere_and_draws_nothing_global() -> None:
    """Every reset gives the same identity adapter (its down projection drawn from the
    config's seed, not from torch's global generator), whatever was drawn before: two
    processes evaluating one global model fit the same adapters."""
    model = _student()
    other = _student()
    other.adapter.down.weight.data.normal_()  # a fitted (or differently started) adapter
    set_global_arrays(other, get_global_arrays(model))  # resets the adapter
    for name, value in model.adapter.state_dict().items():
        assert torch.equal(value, other.adapter.state_dict()[name]), name
    assert float(model.adapter.down.weight.abs().sum()) > 0  # a projection, not zeros
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    model.adapter.reset()
    assert torch.equal(torch.rand(3), expected)  # the global generator was not used


def test_adapted_scores_depend_on_the_history_alone() -> None:
    """The evaluation's per-user adapter fits (dropout is on while fitting) are seeded from
    the history: the same user scores the same in any batch, in any order, after any other
    draw from torch's generator, so a benchmark on a fixed global model repeats exactly."""
    from simulation.pipeline import AdaptedStudent

    model = _student()
    init = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    histories = _clients().train[:3]
    adapted = AdaptedStudent(model, steps=5, lr=0.05, adapter_init=init)
    torch.manual_seed(1)
    together = adapted.score(histories)
    torch.manual_seed(2)
    alone = adapted.score([histories[2]])
    np.testing.assert_array_equal(together[2], alone[0])
    np.testing.assert_array_equal(adapted.score(histories[::-1])[::-1], together)
    # the fit does move the scores, and another seed fits (slightly) differently
    plain = AdaptedStudent(model, steps=0, lr=0.05, adapter_init=init).score(histories)
    assert not np.allclose(together, plain)
    other = AdaptedStudent(model, steps=5, lr=0.05, adapter_init=init, seed=1)
    assert not np.array_equal(other.score(histories), together)


def test_adapted_scores_fit_on_one_thread_as_a_device_and_leave_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The evaluation's per-user fits ran on every thread torch had: slower (hundreds of tiny
    operations; tenfold beside another busy process) than the one a device fits on."""
    import simulation.pipeline as pipeline

    seen: list[int] = []
    real = pipeline.fit_personal

    def recording(*args: Any, **kwargs: Any) -> float:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "fit_personal", recording)
    model = _student()
    init = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pipeline.AdaptedStudent(model, steps=2, lr=0.05, adapter_init=init).score(
            _clients().train[:2]
        )
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    import dataclasses

    from shared.federated.student_config import StudentTaskConfig

    threads = {f.name: f.default for f in dataclasses.fields(StudentTaskConfig)}["num_threads"]
    assert threads == 1  # what a device fits with


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


def test_a_budget_decline_tells_the_server_its_kind_not_the_epsilons(
    bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A decline's reply carried the task's reason in the clear, even under SecAgg+'s
    evaluation and in plain rounds: 'training would spend epsilon 9.1 > budget 8 ...
    (spent so far 7.9)', what this client's ledger holds. The server, which only counts
    declines, is told 'privacy-budget'; the epsilons stay in the client's log."""
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.compat.common.recorddict_compat import recorddict_to_fitres

    from shared.federated.task import METRIC_REASON, METRIC_STATUS

    # a budget below what one round spends: it declines at once
    fit = _client_app_fit(bundle, tmp_path, {"epsilon-budget": 0.01})
    FLOWER_LOGGER.addHandler(caplog.handler)  # it does not pass records on to the root's
    try:
        with caplog.at_level("INFO", logger=FLOWER_LOGGER.name):
            reply = fit({})
    finally:
        FLOWER_LOGGER.removeHandler(caplog.handler)
    metrics = recorddict_to_fitres(reply.content, keep_input=True).metrics
    assert metrics == {METRIC_STATUS: "declined", METRIC_REASON: "privacy-budget"}
    assert "fedrec fit declined (privacy-budget): training would spend epsilon" in caplog.text


def test_too_little_or_unknown_local_data_is_an_error(bundle: Path, tmp_path: Path) -> None:
    task = _task(bundle, tmp_path / "state")
    params = task.initial_parameters()
    with pytest.raises(DataError, match=r"at least 2|needs >= 2"):
        task.fit(5, params, {})
    with pytest.raises(DataError, match="no local data"):
        task.fit(99, params, {})


def test_a_negative_eval_seed_is_refused_when_the_task_is_built(
    bundle: Path, tmp_path: Path
) -> None:
    """eval-seed=-1 was taken; NumPy's generator refused it in every client's every
    evaluation (a bare ValueError, an "internal" error reply), the run's evaluation gone."""
    with pytest.raises(ConfigError, match="'eval-seed' must be an integer >= 0, got -1"):
        _task(bundle, tmp_path / "state", **{"eval-seed": -1})
    task = _task(bundle, tmp_path / "state", **{"eval-seed": 0})
    assert np.isfinite(task.evaluate(0, task.initial_parameters(), {}).loss)


@pytest.mark.parametrize("bad", ["nan", "inf", "float64", "shape"])
def test_evaluate_refuses_parameters_that_cannot_be_the_models(
    bundle: Path, tmp_path: Path, bad: str
) -> None:
    """Evaluation took whatever global parameters came: NaN or inf gave a NaN loss (and
    every case a miss), which the client's reply blamed on its local data ("data"), and
    float64 ones were cast silently. Fit refused them; evaluate now does too, with the
    InvalidUpdateError of an "invalid-update" reply."""
    from shared.federated.validation import InvalidUpdateError

    task = _task(bundle, tmp_path / "state")
    params = [a.copy() for a in task.initial_parameters()]
    if bad == "float64":
        params[0] = params[0].astype(np.float64)
    elif bad == "shape":
        params[0] = params[0][:-1]
    else:
        params[0].flat[0] = float(bad)
    with pytest.raises(InvalidUpdateError, match="global parameters array 0"):
        task.evaluate(0, params, {})


@pytest.mark.parametrize(
    ("train", "valid", "full"),
    [
        ([1, 2, 99], 4, [1, 2, 99, 4]),  # a history item outside the catalog
        ([1, 2, -3], 4, [1, 2, -3, 4]),  # a negative one
        ([1, 2, 3], N_ITEMS, [1, 2, 3, N_ITEMS]),  # the validation item
        ([1, 2, 3], 4, [1, 2, 3, 4, 77]),  # an item the negatives leave out
    ],
)
def test_evaluating_malformed_local_data_is_a_data_error(
    tmp_path: Path, train: list[int], valid: int, full: list[int]
) -> None:
    """Evaluation read item ids outside the catalog unchecked: an IndexError, which the
    client's reply names an "internal" error (not the client's "data"), or for a negative
    id in the items left out of the full ranking a silent wrap-around. Fit refused them."""
    good = _clients()
    clients = ClientData(
        train=[np.array(train), *good.train[1:]],
        valid=np.concatenate([[valid], good.valid[1:]]),
        test=good.test,
        full=[np.array(full), *good.full[1:]],
    )
    path = tmp_path / "bundle.pt"
    save_bundle(path, _student(), clients)
    task = _task(path, tmp_path / "state")
    params = task.initial_parameters()
    with pytest.raises(DataError, match="outside the catalog"):
        task.evaluate(0, params, {})
    assert np.isfinite(task.evaluate(1, params, {}).loss)  # the others still evaluate


def test_evaluate_reports_protocol_metrics(bundle: Path, tmp_path: Path) -> None:
    task = _task(bundle, tmp_path / "state")
    res = task.evaluate(0, task.initial_parameters(), {})
    assert res.num_examples == 1 and np.isfinite(res.loss)
    assert set(res.metrics) == {"sampled_hr@10", "sampled_ndcg@10", "full_hr@10", "full_ndcg@10"}


def test_no_dp_mode_spends_no_privacy(bundle: Path, tmp_path: Path) -> None:
    task = _task(bundle, tmp_path / "state", dp=False)
    out = task.fit(2, task.initial_parameters(), {})
    assert out.status is FitStatus.OK and out.metrics["epsilon"] == 0.0


def _federation_config(
    bundle: Path, tmp_path: Path, **extra: RunConfigValue
) -> dict[str, RunConfigValue]:
    """The six clients of ``_clients()`` (client 5 cannot train), one round, all sampled."""
    return {
        "task": "shared.federated.student_task:make_task",
        "bundle": str(bundle),
        "state-dir": str(tmp_path / "state"),
        "num-rounds": 1,
        "cohort-size": 6,
        "min-cohort": 2,
        "min-available-clients": 6,
        "eval-size": 0,
        "eval-fraction": 0.0,
        "secagg-num-shares": 3,
        "secagg-reconstruction-threshold": 2,
        "batch-size": 4,
        **extra,
    }


@pytest.mark.parametrize("secagg", [False, True])
def test_tiny_federation_in_process_goes_on_despite_a_bad_client(
    bundle: Path, tmp_path: Path, secagg: bool
) -> None:
    from client.client_app import make_client_app
    from server.server_app import make_server_app, run_in_process

    extra: dict[str, RunConfigValue] = {"num-rounds": 2, "secagg": secagg}
    config = _federation_config(bundle, tmp_path, **extra)
    reports: list[RoundReport] = []
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


def test_next_item_cross_entropy_leaves_the_window_out_of_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]], requires_grad=True)
    items = torch.tensor([[0, 3, 1]])  # position 0 is padding: item 0 is not in the window
    mask = torch.tensor([[False, True, True]])
    target = torch.tensor([2])
    loss = next_item_cross_entropy(logits, items, mask, target)
    # candidates 0, 2, 4 (the window's 3 and 1 are out)
    expected = -math.log(math.exp(0.5) / (math.exp(2.0) + math.exp(0.5) + math.exp(0.0)))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad is not None
    assert float(logits.grad[0, 1]) == 0.0 and float(logits.grad[0, 3]) == 0.0
    # off: the plain softmax over every item
    plain = next_item_cross_entropy(logits, items, mask, target, exclude_seen=False)
    assert float(plain) == pytest.approx(float(F.cross_entropy(logits, target)))
    # a repeated target stays a candidate: only the other window item (1) is left out
    again = next_item_cross_entropy(
        logits, torch.tensor([[2, 1]]), torch.tensor([[True, True]]), target
    )
    candidates = logits[:, [0, 2, 3, 4]]  # the target, item 2, is candidate 1 here
    assert float(again) == pytest.approx(float(F.cross_entropy(candidates, target - 1)))


def test_exclude_seen_changes_what_a_client_learns(bundle: Path, tmp_path: Path) -> None:
    updates = []
    for exclude in (True, False):
        task = _task(
            bundle,
            tmp_path / f"state-{exclude}",
            dp=False,
            **{"personal-steps": 0, "exclude-seen": exclude},
        )
        assert task.train_config.exclude_seen is exclude
        out = task.fit(0, task.initial_parameters(), {})
        assert out.status is FitStatus.OK
        updates.append(np.concatenate([a.ravel() for a in out.arrays]))
    assert not np.allclose(updates[0], updates[1])


def test_no_dp_mode_clips_the_batch_gradient(bundle: Path, tmp_path: Path) -> None:
    # even at an absurd learning rate every SGD step moves at most lr * max-grad-norm
    task = _task(bundle, tmp_path / "state", dp=False, lr=50.0, **{"personal-steps": 0})
    out = task.fit(2, task.initial_parameters(), {})
    assert out.status is FitStatus.OK
    norm = float(np.sqrt(sum(float((u.astype(np.float64) ** 2).sum()) for u in out.arrays)))
    steps = int(out.metrics["steps"])
    assert 0 < norm <= 50.0 * 1.0 * steps + 1e-6


# ------------------------------------------------------------- distributed noise (noise-shares)


def _ledger_history(state: Path, client: int) -> list[list[float]]:
    import json

    history: list[list[float]] = json.loads(
        (state / f"client-{client}" / "ledger.json").read_text()
    )["history"]
    return history


def test_a_round_override_in_snake_case_is_the_same_setting(bundle: Path, tmp_path: Path) -> None:
    """Per-round overrides matched kebab-case keys only: local_epochs=2 trained (and was
    charged) at the run's default, while a run config takes either spelling."""
    params = _task(bundle, tmp_path / "a").initial_parameters()
    charged = []
    for name, key in (("a", "local-epochs"), ("b", "local_epochs"), ("c", None)):
        round_config: dict[str, Any] = {"server-round": 1}
        if key is not None:
            round_config[key] = 2
        out = _task(bundle, tmp_path / name).fit(0, params, round_config)
        assert out.status is FitStatus.OK
        charged.append(_ledger_history(tmp_path / name, 0)[0][2])
    assert charged[0] == charged[1] == 2 * charged[2]


def _client_app_fit(
    bundle: Path, tmp_path: Path, run_config: dict[str, RunConfigValue]
) -> Callable[[dict[str, ConfigValue]], Message]:
    """A function that sends client 0 of the student task, through the ClientApp, one
    round-1 fit instruction with the given round config, returning its reply."""
    from flwr.app import Context, Message, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict
    from flwr.supercore.task_identity import TaskIdentity

    import client.client_app as client_app

    try:  # instruction messages need a process task identity (Flower's runtimes set it)
        _ = TaskIdentity.run_id
    except RuntimeError:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    config: dict[str, RunConfigValue] = {
        "task": "shared.federated.student_task:make_task",
        "bundle": str(bundle),
        "state-dir": str(tmp_path / "state"),
        "batch-size": 4,
        "dp": True,
        **run_config,
    }
    params = get_global_arrays(_student())

    def fit(round_config: dict[str, ConfigValue]) -> Message:
        ins = FitIns(ndarrays_to_parameters(params), {"server-round": 1, **round_config})
        message = Message(fitins_to_recorddict(ins, keep_input=True), 100, "train")
        context = Context(1, 100, {"partition-id": 0}, RecordDict(), {})
        return client_app.make_client_app(config)(message, context)

    return fit


@pytest.mark.parametrize(
    ("key", "high"),
    [
        ("local-epochs", "1,000"),
        ("batch-size", "65,536"),
        ("personal-steps", "10,000"),
        ("max-examples", "100,000"),
    ],
)
def test_work_a_server_can_ask_of_a_client_is_bounded(key: str, high: str) -> None:
    """Only lower bounds were checked: a misconfigured or hostile server's local-epochs
    10**9 kept a device training for ever (or, under DP, declined as over budget, which
    names the wrong problem). The bound itself is taken, one more is refused by name."""
    from shared.config import from_flat
    from shared.federated.local_config import LocalTrainConfig

    bound = int(high.replace(",", ""))
    assert getattr(from_flat(LocalTrainConfig, {key: bound}), key.replace("-", "_")) == bound
    with pytest.raises(ConfigError, match=f"^{key} must be <= {high}, got {bound + 1}: "):
        from_flat(LocalTrainConfig, {key: bound + 1})


def test_a_round_asking_for_endless_training_gets_a_config_error_reply(
    bundle: Path, tmp_path: Path
) -> None:
    """The ClientApp answers a round config past a bound with an error reply of kind
    config (it was declined as over the privacy budget), and spends nothing."""
    fit = _client_app_fit(bundle, tmp_path, {})
    refused = fit({"local-epochs": 10**9})
    assert refused.has_error() and "fedrec fit failed: config: " in refused.error.reason
    assert not (tmp_path / "state" / "client-0" / "ledger.json").exists()


def test_a_round_whose_settings_multiply_past_the_step_cap_is_declined_naming_it(
    bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each setting was bounded alone: local-epochs 1,000 with batch-size 1 (both within
    their bounds) asked client 0 for 11,000 DP-SGD steps (500,000 on a larger history). The
    round is declined before any training, its reply naming the cap (max-round-steps) and
    the client's log the steps, the cap and both fixes; nothing is spent."""
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.compat.common.recorddict_compat import recorddict_to_fitres

    from shared.federated.task import METRIC_REASON, METRIC_STATUS

    fit = _client_app_fit(bundle, tmp_path, {})
    FLOWER_LOGGER.addHandler(caplog.handler)  # it does not pass records on to the root's
    try:
        with caplog.at_level("INFO", logger=FLOWER_LOGGER.name):
            reply = fit({"local-epochs": 1000, "batch-size": 1})
    finally:
        FLOWER_LOGGER.removeHandler(caplog.handler)
    metrics = recorddict_to_fitres(reply.content, keep_input=True).metrics
    assert metrics == {METRIC_STATUS: "declined", METRIC_REASON: "max-round-steps"}
    assert (
        "fedrec fit declined (max-round-steps): this round would take 11,000 DP-SGD steps "
        "(1,000 local-epochs x 11 batches of batch-size 1), more than this client's "
        "max-round-steps 1,000" in caplog.text
    )
    assert "fewer 'local-epochs', a larger 'batch-size'" in caplog.text
    assert "--max-round-steps" in caplog.text
    assert not (tmp_path / "state" / "client-0" / "ledger.json").exists()  # nothing spent


@pytest.mark.parametrize("dp", [True, False])
def test_the_step_cap_holds_at_its_value_with_dp_or_without(
    bundle: Path, tmp_path: Path, dp: bool
) -> None:
    """Client 0's 11 examples in batches of 4 take 3 steps an epoch: a cap of 3 trains (and
    charges 3 steps), a cap of 2 declines, without DP too (the cap bounds the work)."""
    from shared.federated.task import DECLINE_ROUND_STEPS

    params = _task(bundle, tmp_path / "a").initial_parameters()
    at_cap = _task(bundle, tmp_path / "a", **{"max-round-steps": 3, "dp": dp})
    assert at_cap.fit(0, params, {"server-round": 1}).status is FitStatus.OK
    if dp:
        assert _ledger_history(tmp_path / "a", 0)[0][2] == 3
    past = _task(bundle, tmp_path / "b", **{"max-round-steps": 2, "dp": dp})
    out = past.fit(0, params, {"server-round": 1})
    assert out.status is FitStatus.DECLINED and out.decline_kind == DECLINE_ROUND_STEPS
    assert "3 DP-SGD steps" in out.reason and "max-round-steps 2" in out.reason


def test_a_round_spending_more_than_the_epsilon_cap_is_declined_and_spends_nothing(
    bundle: Path, tmp_path: Path
) -> None:
    """A server could ask a client, well within a large budget, to spend most of it in one
    round (noise-multiplier 0.5). The ledger's prediction of the round (epsilon after minus
    before) is held to max-round-epsilon: the round is declined and the ledger keeps the
    history it had; a round within the cap trains as before."""
    from shared.federated.task import DECLINE_ROUND_EPSILON
    from shared.privacy.ledger import PrivacyBudget, PrivacyLedger, Spend

    state = tmp_path / "state"
    task = _task(bundle, state, **{"epsilon-budget": 100.0})
    params = task.initial_parameters()
    assert task.fit(0, params, {"server-round": 1}).status is FitStatus.OK
    before = _ledger_history(state, 0)
    ledger = PrivacyLedger.open(state / "client-0" / "ledger.json", PrivacyBudget(100.0))
    greedy = Spend(0.5, 1 / 3, 3)  # what round 2 asks of client 0's 11 examples
    assert ledger.round_epsilon(greedy) > 6.0 and ledger.epsilon(greedy) < 100.0
    out = task.fit(0, params, {"server-round": 2, "noise-multiplier": 0.5})
    assert out.status is FitStatus.DECLINED and out.decline_kind == DECLINE_ROUND_EPSILON
    assert "more than this client's max-round-epsilon 6" in out.reason
    assert "'noise-multiplier'" in out.reason and "--max-round-epsilon" in out.reason
    assert _ledger_history(state, 0) == before
    assert task.fit(0, params, {"server-round": 3}).status is FitStatus.OK  # within the cap


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("max-round-steps", 0, "max-round-steps must be an integer >= 1"),
        ("max-round-steps", -5, "max-round-steps must be an integer >= 1"),
        ("max-round-steps", 2.5, "max-round-steps"),
        ("max-round-epsilon", 0.0, "max-round-epsilon must be a finite number > 0"),
        ("max-round-epsilon", float("nan"), "max-round-epsilon must be a finite number > 0"),
        ("max-round-epsilon", float("inf"), "max-round-epsilon must be a finite number > 0"),
        ("max-round-epsilon", "lots", "max-round-epsilon"),
    ],
)
def test_a_round_cap_that_bounds_nothing_is_refused(
    bundle: Path, tmp_path: Path, key: str, value: object, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        _task(bundle, tmp_path / "state", **{key: value})


@pytest.mark.parametrize(
    ("fit_config", "run_config"),
    [
        ({"noise-shares": 4}, {}),
        ({}, {"noise-shares": 4}),
        ({"noise-shares": "4"}, {}),  # a string the task reads as 4
        ({}, {"noise_shares": 4}),  # the snake_case spelling the task accepts
        ({"noise-shares": 4, "fedrec-under-secagg": True}, {}),  # the server cannot claim it
    ],
)
def test_split_noise_is_refused_outside_secagg_however_the_server_spells_it(
    bundle: Path,
    tmp_path: Path,
    fit_config: dict[str, ConfigValue],
    run_config: dict[str, RunConfigValue],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """noise-shares > 1 adds only a share of the noise: without SecAgg+ the server would see
    the update with that share alone, so the client refuses before training and spends
    nothing. The check read the raw kebab-case key and only numbers, so "4" or noise_shares
    trained with sigma 0.75 released while the ledger recorded 1.5."""
    fit = _client_app_fit(bundle, tmp_path, run_config)

    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.addHandler(caplog.handler)  # it does not pass records on to the root's
    try:
        with caplog.at_level("WARNING", logger=FLOWER_LOGGER.name):
            refused = fit(fit_config)
    finally:
        FLOWER_LOGGER.removeHandler(caplog.handler)
    assert refused.has_error() and "fedrec fit failed: config: " in refused.error.reason
    assert "came without SecAgg+" in caplog.text  # in the client's log, not the reply
    assert not (tmp_path / "state" / "client-0" / "ledger.json").exists()
    plain = fit({**fit_config, "noise-shares": 1})  # the same round without the split trains
    assert not plain.has_error(), plain.error.reason
    assert _ledger_history(tmp_path / "state", 0) == [[1.5, pytest.approx(1 / 3), 3]]


@pytest.mark.parametrize("override", [{"noise-shares": 4}, {"noise_shares": "4"}])
def test_split_noise_with_a_clipped_update_is_refused_when_a_round_asks_for_it(
    bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    override: dict[str, ConfigValue],
) -> None:
    """noise-shares > 1 and a clip of the whole update are refused together by the client
    whatever the server sends; the ClientApp checked the run config's noise-shares only, so
    a round's own override (which the task trains with) clipped updates carrying 1/4 of the
    noise while the ledger charged all of it."""
    import client.client_app as client_app

    monkeypatch.setattr(client_app, "under_secagg", lambda: True)  # as SecAgg+ calls it
    fit = _client_app_fit(bundle, tmp_path, {})
    clipped: dict[str, ConfigValue] = {"update-clip-norm": 0.5}
    refused = fit({**clipped, **override})
    assert refused.has_error() and "fedrec fit failed: config: " in refused.error.reason
    assert not (tmp_path / "state" / "client-0" / "ledger.json").exists()  # nothing spent
    assert not fit(clipped).has_error()  # the clip alone trains


def test_the_noise_in_a_dp_update_does_not_depend_on_the_example_count() -> None:
    """Opacus divided the noisy sum by int(n * q): 17 and 18 examples in batches of 16 (the
    same q = 1/2, steps and charge) gave updates whose noise differed by 9/8, which tells
    one record's presence apart far better than the charged epsilon allows. The normaliser
    is batch-size now, the same for every client."""
    import copy

    from shared.federated.local_config import LocalTrainConfig
    from shared.federated.local_training import train_global_dp

    base = _student()
    config = LocalTrainConfig(batch_size=16, lr=1.0, noise_multiplier=5.0, max_grad_norm=1.0)
    history = np.random.default_rng(0).integers(0, N_ITEMS, size=19)
    spread = {}
    for n in (17, 18):
        stds = []
        # the noise is secret (unseeded): 16 draws of 1,304 values put the ratio's standard
        # error near 0.7%, so the 3% tolerance fails by chance about never (4 draws: ~3%)
        for _ in range(16):
            model = copy.deepcopy(base)
            before = get_global_arrays(model)
            result = train_global_dp(model, history[: n + 1], config)
            assert (result.num_examples, result.sample_rate, result.steps) == (n, 0.5, 2)
            moved = [a - b for a, b in zip(get_global_arrays(model), before, strict=True)]
            stds.append(float(np.std(np.concatenate([m.ravel() for m in moved]))))
        spread[n] = float(np.mean(stds))
    assert spread[18] / spread[17] == pytest.approx(1.0, abs=0.03)  # was 8/9


def test_an_empty_poisson_batch_steps_its_noise_through_the_optimizer() -> None:
    """With momentum, the noise-only step of an empty batch bypassed the momentum buffer, so
    the released update's noise told whether a batch had been empty."""
    from shared.federated.local_config import LocalTrainConfig
    from shared.federated.local_training import _noise_only_step

    config = LocalTrainConfig(batch_size=4, lr=0.1, momentum=0.9, max_grad_norm=2.0)
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.grad = torch.ones(3)
    optimizer.step()  # a real step: buffer 1, parameter -0.1
    _noise_only_step(optimizer, [param], config, torch.Generator().manual_seed(7))
    noise = torch.randn(3, generator=torch.Generator().manual_seed(7))
    gradient = noise * config.noise_multiplier * config.max_grad_norm / config.batch_size
    buffer = 0.9 * torch.ones(3) + gradient
    assert torch.allclose(param.detach(), -0.1 - 0.1 * buffer)


def test_an_epoch_takes_the_steps_the_budget_check_charges() -> None:
    """Opacus' sampler runs int(1 / q) steps, one short where 1 / (1 / 93) is 92.99...: the
    check charged 93 and refused rounds that fitted."""
    from shared.federated.local_config import LocalTrainConfig
    from shared.federated.local_training import dp_epoch_steps, train_global_dp

    assert 1 / (1 / 93) < 93 and dp_epoch_steps(93, 1) == 93
    config = LocalTrainConfig(batch_size=1, lr=0.01)
    history = np.random.default_rng(0).integers(0, N_ITEMS, size=94)
    result = train_global_dp(_student(), history, config)
    assert (result.num_examples, result.steps) == (93, 93)


def test_training_without_dp_follows_the_seed_it_was_sent() -> None:
    """Dropout drew from torch's global generator: two runs with one seed differed with
    whatever the process had drawn before."""
    from shared.federated.local_config import LocalTrainConfig
    from shared.federated.local_training import train_global_dp

    config = LocalTrainConfig(dp=False, batch_size=4, lr=0.5, seed=11)
    history = np.random.default_rng(0).integers(0, N_ITEMS, size=14)
    trained = []
    for draws in (0, 5):
        model = _student()  # seeds torch's global generator: then other draws
        torch.rand(draws)  # the process's earlier randomness
        train_global_dp(model, history, config)
        trained.append(get_global_arrays(model))
    for a, b in zip(*trained, strict=True):
        np.testing.assert_array_equal(a, b)


def test_noise_shares_release_one_gradient_charged_at_the_full_noise(
    bundle: Path, tmp_path: Path
) -> None:
    # Prepare: 12 interactions -> 11 examples; batch 4 -> q = 1/3
    shares = _task(bundle, tmp_path / "shares", **{"noise-shares": 4, "personal-steps": 0})
    local = _task(bundle, tmp_path / "local", **{"personal-steps": 0})
    params = shares.initial_parameters()
    # Execute
    a = shares.fit(0, params, {"server-round": 1})
    b = local.fit(0, params, {"server-round": 1})
    # Assert: one step, charged at the aggregate's noise multiplier (1.5), not the share's
    assert a.status is b.status is FitStatus.OK
    assert _ledger_history(tmp_path / "local", 0)[0][2] == 3  # three local batches
    # at the rate Opacus samples 11 examples in batches of 4: 1 / ceil(11 / 4), not 4 / 11
    assert _ledger_history(tmp_path / "shares", 0) == [[1.5, pytest.approx(1 / 3), 1]]
    assert 0 < float(a.metrics["epsilon"]) < float(b.metrics["epsilon"])


def test_noise_share_is_the_aggregate_noise_over_sqrt_shares(tmp_path: Path) -> None:
    """With a negligible clip the released step is pure noise: its per-coordinate std must be
    lr * sigma * C / (sqrt(m) * batch_size), so m shares sum to the full noise."""
    from shared.federated.local_config import LocalTrainConfig
    from shared.federated.local_training import train_global_dp

    model = _student()
    sequence = np.arange(12, dtype=np.int64)
    before = torch.cat([p.detach().flatten().clone() for p in model.global_parameters()])
    for m in (1, 16):
        model.load_global_state_dict(
            dict(zip(model.global_state_dict(), _split_like(model, before), strict=True))
        )
        config = LocalTrainConfig(
            batch_size=4, lr=2.0, max_grad_norm=1e-6, noise_multiplier=1.5, noise_shares=m
        )
        torch.manual_seed(m)
        result = train_global_dp(model, sequence, config)
        after = torch.cat([p.detach().flatten() for p in model.global_parameters()])
        std = float((after - before).std())
        expected = 2.0 * 1.5 * 1e-6 / (math.sqrt(m) * 4)
        if m == 1:
            # local noise: three batches (q = 1/3), each divided by Opacus' own batch
            assert result.steps == 3
        else:
            assert result.steps == 1
            # the noise is secret (not seeded), so the tolerance is the sample std's own
            # spread, 1 / sqrt(2n) relative, five times over (5% failed 1 run in about 15)
            assert std == pytest.approx(expected, rel=5 / math.sqrt(2 * after.numel()))


@pytest.mark.parametrize(("n", "batch"), [(20, 16), (11, 4), (300, 256), (7, 16), (5, 1)])
def test_the_ledger_charges_the_rate_opacus_samples_at(n: int, batch: int) -> None:
    """The ledger charged batch / n while Opacus samples at 1 / len(loader): 0.8 against
    0.5 for 20 examples in batches of 16, so clients declined for budget they had not spent."""
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    from shared.federated.local_training import dp_sample_rate

    data = TensorDataset(torch.arange(n))
    loader = DPDataLoader.from_data_loader(DataLoader(data, batch_size=min(batch, n)))
    assert dp_sample_rate(n, batch) == pytest.approx(loader.sample_rate, abs=1e-15)
    assert dp_sample_rate(n, batch) <= min(1.0, batch / n)


def _split_like(model: StudentModel, flat: torch.Tensor) -> list[torch.Tensor]:
    out, start = [], 0
    for p in model.global_parameters():
        out.append(flat[start : start + p.numel()].view_as(p).clone())
        start += p.numel()
    return out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"noise-shares": 2, "local-epochs": 2}, "local-epochs must be 1"),
        ({"noise-shares": 2, "dp": False}, "needs dp=true"),
        ({"noise-shares": 0}, "noise-shares must be >= 1"),
    ],
)
def test_noise_shares_config_is_checked(
    bundle: Path, tmp_path: Path, extra: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _task(bundle, tmp_path / "state", **extra)


@pytest.mark.parametrize(("shares", "updated"), [(5, True), (6, False)])
def test_federation_with_noise_shares_discards_an_aggregate_of_too_few_contributors(
    bundle: Path, tmp_path: Path, shares: int, updated: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six sampled, five train (client 5 fails): five shares of the noise are enough for
    noise-shares=5 and too few for 6, whose round must leave the model as it was, and whose
    sum must never be unmasked: Flower unmasks before the strategy decides, and the sum of
    five carries 5/6 of the noise the ledgers were charged for."""
    from client.client_app import make_client_app
    from server.secagg import EarlyDropoutTolerantSecAggPlusWorkflow as Workflow
    from server.server_app import make_server_app, run_in_process

    unmasked: list[int] = []
    real_unmask = Workflow.unmask_stage

    def unmask(self: Workflow, *args: Any) -> bool:
        unmasked.append(1)
        return real_unmask(self, *args)

    monkeypatch.setattr(Workflow, "unmask_stage", unmask)

    extra: dict[str, RunConfigValue] = {
        "secagg": True,
        "noise-shares": shares,
        "server-optimizer": "adam",
        "server-lr": 0.01,
    }
    config = _federation_config(bundle, tmp_path, **extra)
    reports: list[RoundReport] = []
    server = make_server_app(config, on_round_end=reports.append)
    run_in_process(server, make_client_app(config), 6, run_config=config)
    (report,) = reports
    assert report.fit.updated is updated
    assert bool(unmasked) is updated
    moved = max(
        float(np.abs(a - b).max())
        for a, b in zip(report.parameters, get_global_arrays(_student()), strict=True)
    )
    if updated:
        assert report.fit.ok == 5
        # FedAdam's first step is lr * u / (|u| + tau): at most lr in any coordinate
        assert 0.005 < moved <= 0.01
    else:
        assert moved == 0.0 and report.fit.rejected == 5
        assert any("fewer than noise-shares=6" in r for r in report.fit.rejections)
    # every client that trained was charged one step at the full noise, whatever happened
    for client in range(5):
        assert _ledger_history(tmp_path / "state", client)[0][2] == 1


def test_dp_batches_and_noise_are_secret_from_the_server(bundle: Path, tmp_path: Path) -> None:
    """The server sends the seed; under DP it must not decide (or let anyone replay) which
    examples a step samples, nor the noise: the same seed and global RNG give other updates.
    Without DP the seed still makes training repeatable."""

    def update(state: str, dp: bool) -> list[np.ndarray]:
        task = _task(bundle, tmp_path / state, dp=dp, seed=7)
        torch.manual_seed(0)  # even a fixed global RNG does not fix them
        out = task.fit(0, task.initial_parameters(), {"server-round": 1})
        assert out.status is FitStatus.OK
        return list(out.arrays)

    a, b = update("dp-a", True), update("dp-b", True)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c, d = update("plain-a", False), update("plain-b", False)
    assert all(np.array_equal(x, y) for x, y in zip(c, d, strict=True))


def test_parameters_or_settings_refused_by_the_client_spend_no_privacy(
    bundle: Path, tmp_path: Path
) -> None:
    task = _task(bundle, tmp_path / "state")
    good = task.initial_parameters()
    nan = [p.copy() for p in good]
    nan[0][...] = np.nan
    wide = [p.astype(np.float64) for p in good]
    for params in (nan, wide, good[:-1]):
        with pytest.raises(DataError):
            task.fit(0, params, {"server-round": 1})
    with pytest.raises(ConfigError, match="momentum"):
        task.fit(0, good, {"server-round": 1, "momentum": float("nan")})
    assert not (tmp_path / "state" / "client-0" / "ledger.json").exists()  # nothing spent


@pytest.mark.parametrize("server_round", ["abc", float("nan"), float("inf"), 1.5, -1])
def test_a_server_round_that_is_no_round_is_a_config_error(
    bundle: Path, tmp_path: Path, server_round: ConfigValue
) -> None:
    """int() of a malformed server-round raised a bare ValueError / OverflowError, which the
    error reply calls an "internal" failure of the client, not the server's instruction."""
    task = _task(bundle, tmp_path / "state")
    with pytest.raises(ConfigError, match="server-round"):
        task.fit(0, task.initial_parameters(), {"server-round": server_round})
    assert not (tmp_path / "state" / "client-0" / "ledger.json").exists()  # nothing spent


def test_concurrent_fits_of_one_client_both_reach_its_ledger(bundle: Path, tmp_path: Path) -> None:
    """A fit that outlived its round (another process) and the next round's fit of the same
    client: each task instance has its own thread lock, so only the file lock orders them."""
    import threading

    tasks = [_task(bundle, tmp_path / "state") for _ in range(2)]
    outcomes: list[object] = []

    def fit(task: StudentTask) -> None:
        outcomes.append(task.fit(0, task.initial_parameters(), {"server-round": 1}))

    threads = [threading.Thread(target=fit, args=(t,)) for t in tasks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o.status is FitStatus.OK for o in outcomes)  # type: ignore[attr-defined]
    ledger = _task(bundle, tmp_path / "state").client_state(0).ledger
    # both fits charged, none lost: 11 examples in batches of 4 are 3 steps each
    assert sum(entry[2] for entry in ledger.state_dict()["history"]) == 2 * 3


def test_a_benchmark_can_replay_dp_randomness(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The emulator's runs repeat: it replays the clients' DP randomness from its seed."""
    import shared.federated.local_training as local_training

    monkeypatch.setattr(local_training, "_dp_random", local_training._dp_random)  # restored
    updates = []
    for state in ("a", "b"):
        local_training.replay_dp_randomness(3)
        task = _task(bundle, tmp_path / state, dp=True)
        torch.manual_seed(0)
        updates.append(task.fit(0, task.initial_parameters(), {"server-round": 1}).arrays)
    assert all(np.array_equal(x, y) for x, y in zip(*updates, strict=True))
