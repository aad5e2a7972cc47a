"""``fedrec simulate``: the whole product loop on one machine.

Stages: data and protocol split -> LM item text -> teacher + distilled student (cached) ->
federated fine-tuning of the student on Flower's simulation engine (SecAgg+, Opacus DP-SGD,
per-client privacy ledgers on each virtual device's disk) -> evaluation under
``../shared/PROTOCOL.md`` (baselines, teacher, student before/after federation, the int8
on-device model, few-shot) -> run directory with ``metrics.jsonl``, TensorBoard logs,
checkpoints, plots and ``report.md``.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shared.config import field_names, from_flat, to_flat
from shared.data.dataset import IntArray, RecDataset
from shared.data.provenance import DataProvenance
from shared.data.registry import dataset_key, load_dataset
from shared.errors import (
    ConfigError,
    DataError,
    FedRecError,
    ModelFileError,
    PublishedVersionError,
)
from shared.eval.compare import compare_pairs
from shared.eval.protocol import (
    CaseRanks,
    EvalConfig,
    export_fewshot_recs,
    export_split_recs,
    fewshot_cases,
    fewshot_ranks,
    fewshot_recs_path,
    loo_cases,
    split_ranks,
    summarize_each,
)
from shared.eval.splits import ProtocolSplit, split_users
from shared.federated.bundle import DEPLOY_BUNDLE, ClientData, load_bundle, save_bundle
from shared.federated.local_training import fit_personal
from shared.federated.student_task import set_global_arrays
from shared.io import REPORT_MODE, write_bytes_atomic, write_json_atomic
from shared.models.base import ScoreArray
from shared.models.baselines import EASE, Pop
from shared.models.sequence import module_device, pad_histories
from shared.models.student import DistilledStudent, StudentModel
from shared.text.encoder import encode_items
from shared.training.device import resolve_device
from shared.training.trainer import limited_threads, seeded
from simulation.config import RAY_ONLY, RECS_MODELS, RESUMABLE_KEYS, SimulationConfig, data_dir_key
from simulation.pretrain import configs_for, default_cache_root, encoder_config, pretrain
from simulation.report import write_report
from simulation.run_dir import NEW_RUN_FIX, RunDirectory, RunDirectoryInUse, check_data

if TYPE_CHECKING:  # the int8 export (onnx): imported when a model is published
    from shared.compression.artifact import ArtifactReport

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, dict[str, Any]], None]

PAIRED_COMPARISONS = (
    ("student (federated)", "student (pretrained)"),  # did the federation help?
    ("student (federated + personal)", "student (federated)"),  # the personal adapters
    ("student int8 onnx", "student (federated)"),  # what the int8 artifact costs
    ("student int8 onnx", "ease (public)"),  # the device's model vs the server-side baseline
    ("student (adapted)", "ease fold-in"),  # few-shot, at every K
    ("student (adapted)", "student (no adaptation)"),
)
"""Model pairs the report compares user by user (HR@10 A - B, 95% bootstrap interval over
users: is a difference more than the noise of this many users?)."""


def _noop(stage: str, info: dict[str, Any]) -> None:
    log.info("%s %s", stage, info)


class RunInterrupted(KeyboardInterrupt):
    """The user interrupted the run (Ctrl-C). ``root``: its run directory; ``resumable``:
    whether a round finished there (its checkpoint and the clients' ledgers are on disk, so
    rerunning the same command with ``--name`` continues from it)."""

    def __init__(self, root: Path, resumable: bool) -> None:
        super().__init__(f"interrupted: {root}")
        self.root = root
        self.resumable = resumable


def quiet_engine_logs() -> None:
    """Silence Flower's and Ray's loggers for the rest of the process. After an interrupt
    the engine's threads log every actor it stopped, with tracebacks, until the command
    exits: none of it says more than the one-line resume hint."""
    for noisy in ("flwr", "ray"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL + 1)


def run_pipeline(config: SimulationConfig, progress: ProgressFn = _noop) -> dict[str, Any]:
    """Run every stage; returns the summary (also written to ``summary.json``).

    Ctrl-C raises :class:`RunInterrupted`, naming the run directory to resume from."""
    started = time.perf_counter()
    run = _open_run(config)
    try:
        defaults = config.unrecorded_defaults()  # for a run written before a setting existed
        # a run written before names were made canonical may have stored 'ML-100K'
        canonical = {"dataset": dataset_key, "data-dir": data_dir_key, "text-model": data_dir_key}
        # recorded by _run_stages once the data is checked too: a refused rerun changes nothing
        run.check_settings("simulation", to_flat(config), RESUMABLE_KEYS, defaults, canonical)
        progress("run", {"dir": str(run.root)})
        return _run_stages(config, run, started, progress)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            quiet_engine_logs()
        # a run that failed before its first round leaves nothing behind
        discarded = run.discard_if_empty()
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, RunInterrupted):
            raise RunInterrupted(run.root, resumable=not discarded and run.has_progress()) from exc
        raise
    finally:
        run.close()  # flush TensorBoard and free the folder, also for a run that failed


def _run_stages(
    config: SimulationConfig, run: RunDirectory, started: float, progress: ProgressFn
) -> dict[str, Any]:
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_root()
    if config.backend == "ray" and config.ray_address:  # before minutes of pretraining
        from server.server_app import check_ray_reachable

        check_ray_reachable(config.ray_address)
    pretrain_device = _pretrain_device(config)  # before minutes of loading and encoding

    progress("data", {"dataset": config.dataset})
    dataset, split = load_split(config)
    fingerprint = dataset.fingerprint()  # once: the resume check and the pretraining cache
    run.claim_data(fingerprint, _data_name(config))
    _check_population(config, split)
    run.record_settings("simulation", to_flat(config))  # checked by run_pipeline
    progress("text", {"items": dataset.n_items})
    bars = _bars(config.progress)
    encoder = encoder_config(config.text_model, cache, bars, pretrain_device)
    text = encode_items(dataset.item_text, encoder)

    progress("pretrain", {"public_users": len(split.public_users)})
    teacher_cfg, student_cfg = configs_for(
        config.teacher_epochs,
        config.student_epochs,
        config.seed,
        config.teacher_id_init,
        config.teacher_order,
        config.teacher_members,
        config.teacher_prior,
    )
    pre = pretrain(
        dataset,
        split,
        text,
        cache,
        teacher_config=teacher_cfg,
        student_config=student_cfg,
        progress=bars,
        fingerprint=fingerprint,
        device=pretrain_device,
    )
    run.log("pretrain", 0, seconds=round(pre.seconds, 2), cached=pre.cached)
    bundle_path = run.root / "bundle.pt"  # the virtual clients' data too: stays here
    student = _resumed_student(run, bundle_path, pre.student.model)
    initial = copy.deepcopy(student)

    clients = _client_data(split)
    # both record the data and split, which every model published from them carries
    trained_on = config.data_provenance(fingerprint)
    save_bundle(bundle_path, student, clients, dataset.item_ids, trained_on=trained_on)
    # what a deployment's server and devices load: the model alone, readable by containers
    save_bundle(
        run.root / DEPLOY_BUNDLE,
        student,
        None,
        dataset.item_ids,
        mode=0o644,
        trained_on=trained_on,
    )

    progress("federate", {"clients": len(clients), "rounds": config.rounds})
    federation = _federate(config, run, bundle_path, len(clients), progress)
    final_model = copy.deepcopy(initial).cpu()
    set_global_arrays(final_model, federation["parameters"], config.meta_learning)
    # a new user's adapter starts here: the meta-learned initialization, or the identity
    adapter_init = copy.deepcopy(final_model.adapter.state_dict())
    final_model.adapter.reset()  # the global model itself is served with the identity

    progress("evaluate", {})
    trained = int(federation["round"])
    if trained > config.rounds:
        log.warning(
            "this run directory had already trained %d rounds: --rounds %d re-evaluates the "
            "round-%d model (give --rounds %d or more to train further)",
            trained,
            config.rounds,
            trained,
            trained + 1,
        )
    elif trained < config.rounds:
        log.warning(
            "the federation stopped after round %d of %d (a user-level privacy budget that the "
            "next round would exceed ends a run early; metrics.jsonl has each round)",
            trained,
            config.rounds,
        )
    from server.state import round_aggregated

    updated = sum(1 for r in federation["rounds"] if round_aggregated(r))
    earlier = _earlier_processes(run)
    if federation["rounds"] and not updated:
        log.warning(
            "no round changed the global model: in each, the clients declined (e.g. an "
            "epsilon-budget they had spent, or a round past their max-round-steps or "
            "max-round-epsilon), failed or timed out (metrics.jsonl counts them); "
            "the federated figures below are the pretrained model's"
        )
    evaluating = time.perf_counter()
    summary = _evaluate(
        config,
        run,
        dataset,
        split,
        pre,
        initial,
        final_model,
        adapter_init,
        trained,
        trained_on,
        progress,
    )
    # a later process on this run directory counts it (total seconds)
    run.log("evaluate", trained, seconds=round(time.perf_counter() - evaluating, 2))
    summary["rounds"] = federation["rounds"]
    summary["meta"] = {
        "dataset": dataset.name,
        "users": dataset.n_users,
        "items": dataset.n_items,
        "federated clients": len(clients),
        "rounds": trained,
        "rounds requested": config.rounds,
        "rounds that changed the model": updated,
        "cohort": min(config.cohort_size, len(clients)),
        "secagg": config.secagg,
        "dp": config.dp,
        "user-level dp": config.user_dp,
        "meta-learning": config.meta_learning,
        "noise-shares": config.noise_shares,
        "server-optimizer": config.server_optimizer,
        "server-lr": config.server_lr,
        **privacy_meta(config, len(clients)),
        # every process's: a resumed one mostly loads the cache (0 s), which is not the run's
        "pretraining seconds": round(earlier.pretraining + pre.seconds, 1),
        "pretraining cached": pre.cached,
        "teacher order": pre.teacher.fitted_order,
        "teacher members": pre.teacher.config.members,
        "teacher prior weight": pre.teacher.prior_weight,
        "federation seconds": round(earlier.federation + federation["seconds"], 1),
        "client updates per second": round(federation["updates_per_second"], 2),
        "total seconds": round(earlier.total + time.perf_counter() - started, 1),
        "processes": earlier.processes + 1,
        "run directory": str(run.root),
    }
    report = write_summary_and_report(summary, run.root)
    run.close()
    progress("done", {"report": str(report)})
    return summary


def _pretrain_device(config: SimulationConfig) -> str:
    """The device pretraining (teacher, distillation) runs on: the run's ``device``,
    resolved in this process, which pretrains (``auto``: its GPU when torch sees one). Under
    Ray the configuration checked only the setting's form (the clients see GPUs through
    their shares), so a CUDA device this process lacks is refused here, before the data is
    loaded."""
    try:
        return str(resolve_device(config.device))
    except ConfigError as err:
        raise ConfigError(f"pretraining runs in this process: {err}") from err


def _bars(progress: bool) -> bool:
    """Whether the text encoding and pretraining draw their bars: with ``progress``, and only
    on a terminal. A bar redraws itself with carriage returns, so into a log or a pipe (where
    the command writes a line per stage and round) every redraw would be kept, on one line."""
    stream = sys.stderr
    return progress and stream is not None and stream.isatty()


def privacy_meta(config: SimulationConfig, n_clients: int) -> dict[str, Any]:
    """The summary's privacy settings, only for the mechanisms that ran (record level: the
    clients' DP-SGD; user level: the server's noise on the sum), each with the delta its
    epsilon is reported at: ``delta``, and the user-level delta the server resolves over
    the ``n_clients`` federated clients (``user-dp-delta`` 0: 1 / clients)."""
    out: dict[str, Any] = {}
    if config.dp:
        out["noise multiplier"] = config.noise_multiplier
        out["max grad norm"] = config.max_grad_norm
        out["delta"] = config.delta
    if config.user_dp:
        from server.server_app import ServerConfig, make_user_dp

        server = ServerConfig.from_run_config(config.server_run_config(n_clients))
        out["user-level noise multiplier"] = config.user_dp_noise_multiplier
        out["user-level clip"] = config.user_dp_clip
        out["user-level delta"] = make_user_dp(server, n_clients, scalars=0).settings.delta
    return out


def _resumed_student(run: RunDirectory, bundle: Path, pretrained: StudentModel) -> StudentModel:
    """The pretrained student this run federates: on a resumed run, the one in its
    ``bundle.pt``, which its checkpoints were trained from; else ``pretrained``.

    Pretraining is cached, but a resume may not find the cache (another ``cache-dir``, which
    a rerun may change, or a cleared one) and then trains again, and the result depends on
    the machine (torch's thread count): the checkpoints' global parameters were continued
    on another student's frozen item tables, and the report's "student (pretrained)" was not
    the model the federation started from."""
    if not (run.has_progress() and bundle.exists()):
        return pretrained
    try:
        with seeded(0):  # building the model draws from the global RNG: keep its state
            kept = load_bundle(bundle).student
    except ModelFileError as err:  # unreadable (another version's): as before, pretrained
        log.warning("%s; the run continues from the pretraining just done", err)
        return pretrained
    ours, theirs = pretrained.state_dict(), kept.state_dict()
    if ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours):
        return pretrained
    log.warning(
        "pretraining gave another student than the one this run started from (its cache was "
        "not found, and it trained again, e.g. on another device or a machine with another "
        "number of threads): "
        "the run continues from its own, in %s; the teacher it reports is the new one",
        bundle,
    )
    kept.set_trainable(["global"])  # as a freshly pretrained student leaves it
    return kept


def write_summary_and_report(summary: dict[str, Any], root: Path) -> Path:
    """Write ``summary.json``, then ``report.md`` and its plots from it, under ``root``;
    returns the report's path. The earlier run's report goes first: a process killed between
    the two writes left it next to this run's summary, its figures passing for this run's
    (now there is no report until the next run writes one, from its own summary)."""
    (root / "report.md").unlink(missing_ok=True)
    write_json_atomic(root / "summary.json", summary, mode=REPORT_MODE)
    return write_report(summary, root)


# ---------------------------------------------------------------------------- stages


def _data_name(config: SimulationConfig) -> str:
    """The data a run reads, as its errors name it: the dataset and its folder, if any."""
    return f"{config.dataset} ({config.data_dir})" if config.data_dir else config.dataset


def check_run_data(root: Path, config: SimulationConfig, dataset: RecDataset, why: str) -> None:
    """Refuse ``dataset``, read by the settings ``config`` of the run in ``root``, where its
    content differs from the data that run recorded it was trained on
    (:func:`~simulation.run_dir.check_data`; ``why`` ends the error)."""
    stored = RunDirectory.read_config(root)
    check_data(root, stored, dataset.fingerprint(), _data_name(config), why)


def load_split(config: SimulationConfig) -> tuple[RecDataset, ProtocolSplit]:
    """The run's dataset and its protocol split (a rerun of the same config gets the same)."""
    dataset = load_run_dataset(config)
    return dataset, split_users(dataset, config.split_config())


def trained_with(model: Path) -> SimulationConfig | None:
    """The settings of the simulation run that published ``model`` (a run's
    ``models/model-vN.int8.onnx``, its ``config.json`` two folders up), or ``None`` for a
    model published elsewhere (a server's). Read for its data and split: the runtime keys are
    set to ones valid on any machine (the run's Ray resources, GPU or LM folder may not be)."""
    model = Path(model).resolve()
    if model.parent.name != "models":
        return None
    # not "pass another --name" (what a rerun of simulate can do): this reads a model
    fix = (
        "Restore that file, or copy the model out of the run's models/ folder: a model "
        "elsewhere is evaluated on the data and split its metadata records"
    )
    return stored_config(model.parent.parent, fix)


def stored_config(root: Path, fix: str = NEW_RUN_FIX) -> SimulationConfig | None:
    """The settings the simulation run in ``root`` recorded (``config.json``), with the
    runtime keys set to ones valid on any machine (see :func:`trained_with`), or ``None``.
    ``fix`` ends the error for settings that cannot be read (:meth:`RunDirectory.read_config`)."""
    stored = RunDirectory.read_config(root, fix)
    section = (stored or {}).get("simulation")
    if not isinstance(section, dict):
        return None
    known = field_names(SimulationConfig)
    values = {k: v for k, v in section.items() if k in known and k not in RAY_ONLY}
    values.update({"backend": "inprocess", "device": "auto", "text-model": "", "progress": False})
    config = from_flat(SimulationConfig, values)
    # a setting the run did not record (written before it existed) is what it ran with, not
    # always today's default (a plain run from before update-clip-median-multiple clipped none)
    unrecorded = {
        k: v
        for k, v in config.unrecorded_defaults().items()
        if k not in section and k not in values and k not in RAY_ONLY
    }
    return from_flat(SimulationConfig, {**values, **unrecorded}) if unrecorded else config


@dataclass(frozen=True)
class FinishedRun:
    """What a finished run's evaluation starts from, rebuilt from its directory: its settings,
    dataset and split, and its last checkpoint's global model with the adapter every new
    user starts from (the identity, or the meta-learned initialization)."""

    config: SimulationConfig
    dataset: RecDataset
    split: ProtocolSplit
    model: StudentModel
    adapter_init: dict[str, torch.Tensor]
    server_round: int


def load_finished_run(root: Path, data_dir: str | None = None) -> FinishedRun:
    """The finished ``fedrec simulate`` run in ``root`` (see :class:`FinishedRun`), for
    benchmarks that re-evaluate it without training; ``data_dir`` overrides the folder its
    dataset was read from. Data whose content differs from what the run recorded it trained
    on is refused (:func:`~simulation.run_dir.check_data`). Reads only: the run's files are
    left as they are."""
    from server.checkpoint import CheckpointStore

    config = stored_config(root)
    if config is None:
        raise DataError(
            f"{root} is not a `fedrec simulate` run directory (no config.json); "
            "give the folder a run wrote"
        )
    if data_dir:
        config = replace(config, data_dir=data_dir)
    checkpoint = CheckpointStore(root / "checkpoints", tidy=False).latest()
    if checkpoint is None:
        raise DataError(f"{root} has no checkpoint; run `fedrec simulate` to the end first")
    dataset, split = load_split(config)
    check_run_data(
        root,
        config,
        dataset,
        "its model would be evaluated on other users and items. Give the data it was "
        "trained on (data_dir)",
    )
    model = load_bundle(root / "bundle.pt").student
    set_global_arrays(model, checkpoint.parameters, config.meta_learning)
    init = copy.deepcopy(model.adapter.state_dict())
    return FinishedRun(config, dataset, split, model, init, checkpoint.server_round)


def load_run_dataset(config: SimulationConfig) -> RecDataset:
    """The dataset a run with ``config`` trains on (the synthetic world of its seed and
    sizes, or the named dataset)."""
    if config.dataset == "synthetic":  # its data-dir, if any, is not read
        return load_dataset(
            "synthetic",
            synthetic_seed=config.seed,
            synthetic_users=config.synthetic_users,
            synthetic_items=config.synthetic_items,
        )
    return load_dataset(config.dataset, config.data_dir or None)


def _run_root(config: SimulationConfig) -> Path:
    """``run-dir/name``; without a name, ``dataset-time``, suffixed (``-2``, ...) when a run
    started in the same second already took that folder."""
    if config.name:
        return Path(config.run_dir) / config.name
    base = Path(config.run_dir) / time.strftime(f"{config.dataset}-%Y%m%d-%H%M%S")
    root, n = base, 1
    while root.exists():
        n += 1
        root = base.with_name(f"{base.name}-{n}")
    return root


def _open_run(config: SimulationConfig) -> RunDirectory:
    """Claim the run directory: ``run-dir/name``, refused while another run holds it; without
    a name, the first ``dataset-time`` folder (:func:`_run_root`) that no other run holds.
    Runs started together (a sweep launched with ``&``) all found the same folder free, and
    all but one were refused as "in use by another run" for a name they had not given."""
    if config.name:
        return RunDirectory(_run_root(config))
    while True:
        try:
            return RunDirectory(_run_root(config))
        except RunDirectoryInUse:
            continue  # taken since _run_root looked: it exists now, so the next is tried


def _check_population(config: SimulationConfig, split: ProtocolSplit) -> None:
    """Refuse, before pretraining, a split the run cannot train on and settings its number of
    clients cannot meet (the cohort is capped at the clients there are, which the config
    alone does not know). Each message names the settings that made the split."""
    n_clients = len(split.evaluable(split.federated_users))
    synthetic = config.dataset == "synthetic"
    made_by = (
        (f"synthetic-users {config.synthetic_users}, " if synthetic else "")
        + f"public-fraction {config.public_fraction}, "
        + f"cold-user-fraction {config.cold_user_fraction}"
    )
    more_users = "raise synthetic-users or " if synthetic else ""
    if not any(len(split.train[u]) >= 2 for u in split.public_users):
        raise ConfigError(
            f"the split leaves no public user with two or more training items ({made_by}): "
            f"the teacher and the student pretrain on them; {more_users}raise public-fraction"
        )
    if n_clients == 0:
        raise ConfigError(
            f"the split leaves no federated client with a test item ({made_by}); "
            f"{more_users}lower public-fraction or cold-user-fraction"
        )
    if config.secagg and n_clients < 2:
        raise ConfigError(
            f"SecAgg+ needs at least 2 federated clients and the split leaves {n_clients} "
            f"({made_by}); {more_users}lower public-fraction or cold-user-fraction, or set "
            "secagg=false"
        )
    if config.noise_shares > n_clients:
        raise ConfigError(
            f"'noise-shares' ({config.noise_shares}) exceeds the {n_clients} federated clients "
            f"of this dataset (cohort-size {config.cohort_size} is capped at them): every "
            f"round's aggregate would be discarded; give noise-shares <= {n_clients}"
        )
    from server.server_app import ServerConfig, first_round_refusal

    try:  # the apps' settings against the cohort the run will have (SecAgg+'s shares)
        server = ServerConfig.from_run_config(config.server_run_config(n_clients))
    except ConfigError as err:
        raise ConfigError(
            f"the {n_clients} federated clients of this dataset (cohort-size "
            f"{config.cohort_size} is capped at them) do not fit the settings: {err}"
        ) from err
    # user-level DP: the server would end the run before its first round, after pretraining
    refusal = first_round_refusal(server, n_clients)
    if refusal is not None:
        raise ConfigError(
            f"user-level DP would refuse the first round over the {n_clients} federated "
            f"clients of this dataset: {refusal}"
        )


def _client_data(split: ProtocolSplit) -> ClientData:
    """Virtual client ``i`` is federated user ``split.federated_users[i]``."""
    users = split.evaluable(split.federated_users)
    return ClientData(
        train=[split.train[int(u)] for u in users],
        valid=np.array([split.valid[int(u)] for u in users], dtype=np.int64),
        test=np.array([split.test[int(u)] for u in users], dtype=np.int64),
        full=[split.full_sequences[int(u)] for u in users],
    )


def _server_run_config(
    config: SimulationConfig, run: RunDirectory, bundle: Path, n: int
) -> dict[str, Any]:
    """The run config of this simulation's apps, with this run's files."""
    return {
        **config.server_run_config(n),
        "bundle": str(bundle),
        "checkpoint-dir": str(run.checkpoints),
        "artifact-dir": str(run.root / "models") if config.publish_each_round else "",
        "state-dir": str(run.root / "clients"),
    }


class ClientEpsilons:
    """The largest and the mean of the virtual devices' cumulative epsilons, read from their
    ledgers (``client-*/ledger.json`` under ``state_dir``) on 'their' disks, as a round's
    record holds them.

    A round charges only its cohort, but every device that ever trained keeps a ledger, and
    reading all of them after every round cost 0.5 s a round once 20,000 had trained (every
    ledger parsed, its history growing with its rounds). A ledger is read again only when its
    file changed: every write replaces it atomically (another inode, and a new modification
    time), so an unchanged ledger keeps its epsilon from the last read."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        # client folder name -> (the ledger file's identity when read, its epsilon)
        self._read: dict[str, tuple[tuple[int, int, int, int], float | None]] = {}

    def summary(self) -> dict[str, float | None]:
        """``epsilon_record`` (the largest) and ``epsilon_record_mean``; ``None`` before any
        readable ledger."""
        read: dict[str, tuple[tuple[int, int, int, int], float | None]] = {}
        try:
            entries = list(os.scandir(self.state_dir))
        except OSError:  # no client has trained yet
            entries = []
        for entry in entries:
            if not entry.name.startswith("client-"):
                continue
            path = os.path.join(entry.path, "ledger.json")
            try:
                st = os.stat(path)
            except OSError:
                continue
            key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            known = self._read.get(entry.name)
            if known is None or known[0] != key:
                known = (key, _ledger_epsilon(Path(path)))
            read[entry.name] = known
        self._read = read
        out = [eps for _, eps in read.values() if eps is not None]
        return {
            "epsilon_record": max(out) if out else None,
            "epsilon_record_mean": float(np.mean(out)) if out else None,
        }


def _ledger_epsilon(path: Path) -> float | None:
    """The cumulative epsilon a client's ledger file records, or ``None`` if unreadable."""
    try:
        return float(json.loads(path.read_text())["epsilon"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _federate(
    config: SimulationConfig, run: RunDirectory, bundle: Path, n_clients: int, progress: ProgressFn
) -> dict[str, Any]:
    from client.client_app import make_client_app
    from server.server_app import (
        SimulationBackend,
        make_server_app,
        run_in_process,
        run_simulation,
    )
    from server.strategy import RoundReport

    run_config = _server_run_config(config, run, bundle, n_clients)
    if config.cohort_size > n_clients:
        log.warning(
            "cohort-size %s exceeds the %s federated clients: every client takes part in "
            "every round",
            config.cohort_size,
            n_clients,
        )
    state: dict[str, Any] = {"parameters": None, "round": 0}
    started = time.perf_counter()
    _log_checkpointed_rounds(run)
    # the server resumes from the newest checkpoint that verifies: the log's newest round may
    # be past it (that round's checkpoint unreadable), and then runs again
    from server.checkpoint import CheckpointStore

    try:
        resumed = CheckpointStore(run.checkpoints, tidy=False).latest()
    except FedRecError:  # none verifies: the ServerApp refuses the run and says why
        resumed = None
    first = resumed.server_round + 1 if resumed is not None else 1
    run.resume_at(first)  # TensorBoard: the rounds run again replace the earlier ones
    run.log("federate", first)  # where this process starts (its first round is a cold one)
    if resumed is not None:
        progress("resume", {"round": first - 1})

    epsilons = ClientEpsilons(run.root / "clients")

    def on_round_end(report: RoundReport) -> None:
        state["parameters"] = [np.asarray(a) for a in report.parameters]
        state["round"] = report.server_round
        row: dict[str, Any] = {
            "round": report.server_round,
            "clients_ok": report.fit.ok,
            "clients_declined": report.fit.declined,
            "clients_failed": report.fit.failed + report.fit.rejected,
            "clients_clipped": report.fit.clipped,
            "fit_seconds": round(report.fit_seconds, 3),
            "round_seconds": round(report.round_seconds, 3),
            **epsilons.summary(),
            "epsilon_user": report.epsilon_user,
            "updated": report.fit.updated,
            # this process's federation time so far: a later resume adds it to its own
            "elapsed_seconds": round(time.perf_counter() - started, 3),
        }
        if report.evaluate is not None and report.evaluate.ok:
            m = report.evaluate.metrics
            row["valid_loss"] = report.evaluate.loss
            row["valid_sampled_hr@10"] = m.get("sampled_hr@10")
            row["valid_full_hr@10"] = m.get("full_hr@10")
        run.log("round", report.server_round, **row)
        progress("round", row)

    server_app = make_server_app(run_config, on_round_end=on_round_end)
    client_app = make_client_app(run_config)
    if config.backend == "inprocess":
        run_in_process(server_app, client_app, n_clients, run_config=run_config)
    else:
        backend = SimulationBackend(
            num_cpus_per_client=config.num_cpus_per_client,
            num_gpus_per_client=config.num_gpus_per_client,
            ray_address=config.ray_address or None,
            ray_init_args={"log_to_driver": logging.getLogger().isEnabledFor(logging.INFO)},
        )
        run_simulation(server_app, client_app, n_clients, backend)
    seconds = time.perf_counter() - started
    if state["parameters"] is None:
        # Nothing left to run: a rerun of a finished run resumes from its last checkpoint.
        latest = CheckpointStore(run.checkpoints).latest()
        if latest is None:
            raise FedRecError(
                "the federation finished no round; the server's warning above says why (e.g. "
                "a user-level epsilon budget that its first round would exceed)"
            )
        state["parameters"] = [np.asarray(a) for a in latest.parameters]
        state["round"] = latest.server_round
    return {
        "parameters": state["parameters"],
        # the round those parameters are the model of: the latest logged one may be past it,
        # when its checkpoint was unreadable and this process was asked for no more rounds
        "round": state["round"],
        # the rounds that led to that model (a later, lost round's line stays in the log)
        "rounds": [r for r in _logged_rounds(run) if int(r["round"]) <= state["round"]],
        "seconds": seconds,
        "updates_per_second": _updates_per_second(run),
    }


def _updates_per_second(run: RunDirectory) -> float:
    """Client updates per second of wall time over every round the run directory logged,
    across restarts. The first round of each process pays Ray's start-up and every actor's
    imports, so those rounds are left out, unless no other round exists (then the clients'
    fit time of all rounds is the measure)."""
    rounds = _logged_rounds(run)
    cold = {1} | {int(record["step"]) for record in run.records("federate")}
    warm = [r for r in rounds if r["round"] not in cold]
    chosen, clock = (warm, "round_seconds") if warm else (rounds, "fit_seconds")
    seconds = sum(float(r.get(clock) or 0.0) for r in chosen)
    return sum(int(r.get("clients_ok") or 0) for r in chosen) / seconds if seconds > 0 else 0.0


def _log_checkpointed_rounds(run: RunDirectory) -> None:
    """Log the rounds a checkpoint holds but ``metrics.jsonl`` does not, from what the
    checkpoint recorded (``backfilled``: no validation HR). A process killed
    between the server's checkpoint and this log line lost that round from every report,
    and the resume counted the next, cold round as a warm one."""
    from server.checkpoint import CheckpointStore

    last = max((int(r["round"]) for r in _logged_rounds(run)), default=0)
    missing = CheckpointStore(run.checkpoints, tidy=False).verified_after(last)
    for checkpoint in missing:
        m, server_round = checkpoint.metrics, checkpoint.server_round
        # the clients are charged in a round's fit, which starts only after the previous
        # round's line is logged: their ledgers now stand exactly as after the last one
        last = checkpoint is missing[-1]
        row = ClientEpsilons(run.root / "clients").summary() if last else {}
        run.log(
            "round",
            server_round,
            round=server_round,
            clients_ok=m.get("clients-ok"),
            clients_declined=m.get("clients-declined"),
            clients_failed=_sum_counts(m.get("clients-failed"), m.get("clients-rejected")),
            clients_clipped=m.get("clients-clipped"),
            fit_seconds=m.get("fit-seconds"),
            round_seconds=m.get("round-seconds"),
            valid_loss=m.get("eval-loss"),
            # the user-level ledger's epsilon after the round, as the live line has it
            epsilon_user=m.get("epsilon-user"),
            updated=m.get("updated"),
            backfilled=True,
            **row,
        )


def _sum_counts(*values: Any) -> int | None:
    numbers = [int(v) for v in values if isinstance(v, int | float)]
    return sum(numbers) if numbers else None


@dataclass(frozen=True)
class _EarlierProcesses:
    """What the processes before this one spent on a resumed run directory."""

    processes: int
    pretraining: float
    federation: float
    total: float


def _earlier_processes(run: RunDirectory) -> _EarlierProcesses:
    """Seconds spent by the earlier processes of this run directory (interrupted or resumed),
    so that a resumed run's report counts the whole run and not only its last process.

    Each process logs ``pretrain`` first, then its rounds with their ``elapsed_seconds``,
    then ``evaluate`` when its evaluation is done; an interrupted process counts up to its
    last logged record (what it did after is lost work). The last ``pretrain`` record is
    this process's own.
    """
    # per process: pretraining seconds, the largest elapsed_seconds, the sum of round_seconds
    # (what rounds logged before elapsed_seconds existed give instead), evaluation seconds
    segments: list[list[float]] = []
    for record in run.records():
        event, seconds = record.get("event"), float(record.get("seconds") or 0.0)
        if event == "pretrain":
            segments.append([seconds, 0.0, 0.0, 0.0])
        elif event == "round" and record.get("backfilled") and len(segments) >= 2:
            # logged by the next process from a checkpoint: the time was the earlier one's
            segments[-2][1] += float(record.get("round_seconds") or 0.0)
            segments[-2][2] += float(record.get("round_seconds") or 0.0)
        elif event == "round" and segments:
            segment = segments[-1]
            segment[1] = max(segment[1], float(record.get("elapsed_seconds") or 0.0))
            segment[2] += float(record.get("round_seconds") or 0.0)
        elif event == "evaluate" and segments:
            segments[-1][3] += seconds
    earlier = [(p, elapsed or rounds, e) for p, elapsed, rounds, e in segments[:-1]]
    return _EarlierProcesses(
        processes=len(earlier),
        pretraining=sum(p for p, _, _ in earlier),
        federation=sum(f for _, f, _ in earlier),
        total=sum(p + f + e for p, f, e in earlier),
    )


def _logged_rounds(run: RunDirectory) -> list[dict[str, Any]]:
    """Every round of this run directory, across restarts (the last record of a round wins)."""
    by_round: dict[int, dict[str, Any]] = {}
    for record in run.records("round"):
        row = {k: v for k, v in record.items() if k not in ("event", "step", "time")}
        by_round[int(record["step"])] = row
    return [by_round[r] for r in sorted(by_round)]


# ---------------------------------------------------------------------------- evaluation


class AdaptedStudent:
    """The global model with a personal adapter fitted, per scored history, the way a device
    fits its own (:func:`fit_personal`): from ``adapter_init`` (the identity, or the
    meta-learned initialization), ``steps`` Adam steps on that history, then scored from it.
    For a federated user the history is their device's (train, plus validation at test);
    for a cold user it is the few-shot support set.

    Each fit draws its dropout from ``seed`` and the history's items (:func:`fit_personal`)
    and every adapter starts from the same seeded projection
    (:class:`~shared.models.student.PersonalAdapter`), so a user's scores depend on the global
    model and the history alone, not on the batch, the order or earlier draws: an evaluation
    of a fixed model repeats exactly, and a device with that history (seed 0) fits the same
    adapter.
    """

    def __init__(
        self,
        model: StudentModel,
        steps: int,
        lr: float,
        adapter_init: dict[str, torch.Tensor],
        exclude_seen: bool = True,
        seed: int = 0,
    ) -> None:
        self.model = copy.deepcopy(model)
        self.steps = steps
        self.lr = lr
        self._init = adapter_init
        self.exclude_seen = exclude_seen
        self.seed = seed

    @property
    def n_items(self) -> int:
        return self.model.n_items

    def score(self, histories: Sequence[IntArray]) -> ScoreArray:
        with limited_threads(1):
            return self._score(histories)

    def _score(self, histories: Sequence[IntArray]) -> ScoreArray:
        """On one thread, as a device fits (``StudentTaskConfig.num_threads``): a fit is
        hundreds of tiny operations, which gain nothing from a second thread and lose much
        when another process holds a core (the README's run on 2 CPUs, the 900 users' fits:
        30.6 s on one thread against 29.2 s on two when idle; 29.1 s against 134.5 s beside
        one busy process)."""
        out = np.zeros((len(histories), self.n_items), dtype=np.float32)
        for row, history in enumerate(histories):
            fit_personal(
                self.model,
                history,
                self._init,
                self.steps,
                self.lr,
                exclude_seen=self.exclude_seen,
                seed=self.seed,
            )
            items, mask = pad_histories([history], self.model.config.max_len)
            device = module_device(self.model)
            with torch.no_grad():
                out[row] = self.model(items.to(device), mask.to(device))[0].cpu().numpy()
        return out


def _save_ranks(path: Path, ranks: dict[str, CaseRanks]) -> None:
    """Every evaluated case's rank (``'<cases>/<model>/sampled'`` and ``.../full``) and user
    (``.../users``), so two runs on the same split can be compared user by user
    (:mod:`shared.eval.compare`)."""
    arrays = {
        f"{key}/{kind}": getattr(r, kind)
        for key, r in ranks.items()
        for kind in ("sampled", "full", "users")
        if getattr(r, kind) is not None
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


def load_ranks(path: Path) -> dict[str, CaseRanks]:
    """The per-case ranks a run saved (:func:`_save_ranks`), keyed ``'<cases>/<model>'`` (no
    users in a file an older version saved)."""
    with np.load(path) as data:
        keys = {name.rsplit("/", 1)[0] for name in data.files}
        return {
            key: CaseRanks(
                data[f"{key}/sampled"],
                data[f"{key}/full"],
                data[f"{key}/users"] if f"{key}/users" in data.files else None,
            )
            for key in keys
        }


def run_ranks(root: Path) -> dict[str, CaseRanks]:
    """The per-case ranks of the finished run in ``root``, each with its cases' users: a file
    an older version saved without them gets them from the run's split, which its recorded
    settings determine (the case lists are rebuilt in the order they were ranked), of data
    whose content is the run's (:func:`~simulation.run_dir.check_data`)."""
    ranks = load_ranks(root / "ranks.npz")
    if all(r.users is not None for r in ranks.values()):
        return ranks
    config = stored_config(root)
    if config is None:
        raise DataError(f"{root} has no config.json: the users of its ranks cannot be told")
    dataset, split = load_split(config)
    check_run_data(
        root,
        config,
        dataset,
        "the users of its ranks would be taken from another split. Put back the data it "
        "was evaluated on",
    )
    users: dict[str, IntArray] = {}
    for group in {key.split("/")[0] for key in ranks}:
        if group.startswith("fewshot k="):
            cases = fewshot_cases(split, int(group.removeprefix("fewshot k=")))
        else:  # "federated", "public"
            cases = loo_cases(split, split.population(group), "test")
        users[group] = np.array([c.user for c in cases], dtype=np.int64)
    out: dict[str, CaseRanks] = {}
    for key, r in ranks.items():
        who = users[key.split("/")[0]]
        if len(who) != len(r.sampled):
            raise DataError(
                f"{root}/ranks.npz: {key} ranks {len(r.sampled)} cases, but the run's split "
                f"has {len(who)}; its config.json is not the run's"
            )
        out[key] = replace(r, users=who)
    return out


_RECS_SOURCES = {
    "student-int8": "student int8 onnx",
    "student-personal": "personal",
    "student-federated": "student (federated)",
    "student-pretrained": "student (pretrained)",
    "teacher": "teacher",
    "ease-all": "ease (all)",
    "ease-public": "ease (public)",
    "pop": "pop",
}
"""Each ``export-recs`` name (:data:`simulation.config.RECS_MODELS`) with leave-one-out
figures -> its model's key."""

_FEWSHOT_RECS_SOURCES = {
    "student-adapted": "student (adapted)",
    "student-federated": "student (no adaptation)",
    "ease-all": "ease fold-in",
    "pop": "pop",
}
"""Each ``export-recs`` name with few-shot figures -> its key in the summary's ``fewshot``."""


def recs_file(model: str) -> str:
    """The run-directory file of ``model``'s top 100: ``recs.csv`` for the device model (its
    few-shot files are named from it, :func:`~shared.eval.protocol.fewshot_recs_path`)."""
    return "recs.csv" if model == "student-int8" else f"recs-{model}.csv"


def _export_recs(
    config: SimulationConfig,
    run: RunDirectory,
    dataset: RecDataset,
    split: ProtocolSplit,
    models: dict[str, Any],
    fewshot_models: dict[str, Any],
) -> None:
    """Each exported model's top 100 for every evaluated user (history = train +
    validation, as for the test figures), and for a model with few-shot figures
    (``fewshot_models``, by their summary names; none without cold users) each K's top 100
    for every counted cold user (history = support set), so anyone can recompute its
    full-ranking figures. Files of models (or Ks) no longer exported are removed."""
    wanted = config.recs_exports()
    for name in RECS_MODELS:
        path = run.root / recs_file(name)
        loo = models[_RECS_SOURCES[name]] if name in _RECS_SOURCES else None
        fewshot = None  # every name's model looked up, so a misnamed source fails loudly
        if name in _FEWSHOT_RECS_SOURCES and fewshot_models:
            fewshot = fewshot_models[_FEWSHOT_RECS_SOURCES[name]]
        if name in wanted and loo is not None:
            export_split_recs(loo, dataset, split, path)
        else:  # an earlier process's, of an older model
            path.unlink(missing_ok=True)
        shots = config.shots if name in wanted and fewshot is not None else ()
        if fewshot is not None and shots:
            export_fewshot_recs(fewshot, dataset, split, path, shots)
        written = {fewshot_recs_path(path, k) for k in shots}
        for old in run.root.glob(fewshot_recs_path(path, "*").name):  # other Ks', older models'
            if old not in written:
                old.unlink(missing_ok=True)


#: Where a run's final model goes when its version is out with another model (see
#: :func:`_publish_final`): beside ``models/``, so no device takes it for a published one.
UNPUBLISHED_DIR = "unpublished"


def _publish_final(
    final: StudentModel,
    item_ids: Sequence[str],
    run: RunDirectory,
    trained: int,
    prune_sparsity: float,
    trained_on: DataProvenance | None = None,
) -> ArtifactReport:
    """Publish the final model as ``models/model-v{trained}.int8.onnx``, unless that version
    is out with another model already; the int8 file the run evaluates, either way.

    A published version never changes: devices may hold it, and they tell models apart by
    their version. It is there already when the ServerApp published the round
    (``publish-each-round``) or an earlier process ended at that round: the same model,
    byte for byte (the int8 export is deterministic), unless that round's checkpoint was
    lost (unreadable) and the round ran again, training another model. The ServerApp keeps
    the earlier one under that number (:func:`server.server_app._run_server`), and so does
    this: the final model is then written to ``unpublished/round-{trained}.int8.onnx``
    (with its catalog) and evaluated from there; the next round's model is the next
    version. ``trained_on``: the run's data and split, as its bundle records them (a model
    the ServerApp published from that bundle has them: the same bytes)."""
    from shared.compression.artifact import build_student_artifact, publish_artifact_once
    from shared.compression.prune import publish_prune
    from shared.ondevice.runtime import check_item_id_lengths
    from shared.published import artifact_file_name

    check_item_id_lengths(item_ids)
    # built once: published, or kept unpublished when that version is out with another model
    built = build_student_artifact(
        final,
        item_ids,
        version=str(trained),
        prune=publish_prune(prune_sparsity),
        trained_on=trained_on,
    )
    published = run.root / "models" / artifact_file_name(trained)
    try:
        return publish_artifact_once(built, item_ids, published, version=str(trained))
    except PublishedVersionError:
        kept = run.root / UNPUBLISHED_DIR / f"round-{trained}.int8.onnx"
        kept.parent.mkdir(exist_ok=True)
        report = built.write(kept, item_ids)
    log.warning(
        "model version %s is out with another model: round %s's from before this run's "
        "resume (its checkpoint was unreadable and the round ran again), which devices may "
        "hold. A published version is never replaced: the final model is not published, "
        "and is evaluated from %s; train more rounds to publish the next version",
        trained,
        trained,
        kept,
    )
    return report


def _evaluate(
    config: SimulationConfig,
    run: RunDirectory,
    dataset: RecDataset,
    split: ProtocolSplit,
    pre: Any,
    initial: StudentModel,
    final: StudentModel,
    adapter_init: dict[str, torch.Tensor],
    trained: int,
    trained_on: DataProvenance,
    progress: ProgressFn = _noop,
) -> dict[str, Any]:
    """Score every model and publish the final one as ``model-v{trained}`` (the last round
    trained: a resumed run may be past the rounds asked for, a budget may end one early),
    unless that version is out with another model (:func:`_publish_final`), recording
    ``trained_on`` as the run's bundles do. ``progress``
    hears ``("evaluate", {"model": name})`` as each model starts (the personal adapters,
    fitted per user, take minutes on ml-100k)."""
    from shared.ondevice.runtime import OnDeviceModel

    eval_cfg = EvalConfig(seed=config.seed)
    pops = ("public", "federated")
    final_results: dict[str, Any] = {}
    fewshot: dict[str, Any] = {}
    everyone = split.train_sequences()
    public = split.train_sequences(split.public_users)
    models: dict[str, Any] = {
        "pop": Pop().fit(everyone, dataset.n_items),
        "ease (public)": EASE().fit(public, dataset.n_items),
        "ease (all)": EASE().fit(everyone, dataset.n_items),
        "teacher": pre.teacher,
        "student (pretrained)": DistilledStudent.from_model(initial),
        "student (federated)": DistilledStudent.from_model(final),
    }
    artifact = _publish_final(
        final,
        dataset.item_ids,
        run,
        trained,
        config.prune_sparsity,
        trained_on,
    )
    models["student int8 onnx"] = OnDeviceModel(artifact.path)
    ranks: dict[str, CaseRanks] = {}  # per case, for paired comparisons across runs
    for name, model in models.items():
        progress("evaluate", {"model": name})
        by_pop = split_ranks(model, split, pops, "test", eval_cfg)
        final_results[name] = summarize_each(by_pop, eval_cfg.k)
        ranks[f"federated/{name}"] = by_pop["federated"]
    personalized = AdaptedStudent(
        final, config.personal_steps, config.personal_lr, adapter_init, config.exclude_seen
    )
    progress("evaluate", {"model": "student (federated + personal)"})
    by_pop = split_ranks(personalized, split, pops, "test", eval_cfg)
    ranks["federated/student (federated + personal)"] = by_pop["federated"]
    final_results["student (federated + personal)"] = summarize_each(by_pop, eval_cfg.k)
    fewshot_models: dict[str, Any] = {}
    if len(split.cold_users):
        fewshot_models = {
            "pop": models["pop"],
            "ease fold-in": models["ease (all)"],
            "student (no adaptation)": models["student (federated)"],
            "student (adapted)": AdaptedStudent(
                final, config.adapt_steps, config.adapt_lr, adapter_init, config.exclude_seen
            ),
        }
        for name, model in fewshot_models.items():
            progress("evaluate", {"model": f"few-shot {name}"})
            by_shot = fewshot_ranks(model, split, config.shots, eval_cfg)
            fewshot[name] = summarize_each(by_shot, eval_cfg.k)
            ranks.update({f"fewshot {shot}/{name}": r for shot, r in by_shot.items()})
    _save_ranks(run.root / "ranks.npz", ranks)
    _export_recs(config, run, dataset, split, {**models, "personal": personalized}, fewshot_models)
    by_group: dict[str, dict[str, CaseRanks]] = {}
    for key, case in ranks.items():
        group, name = key.split("/", 1)
        by_group.setdefault(group, {})[name] = case
    comparisons = compare_pairs(by_group, PAIRED_COMPARISONS, eval_cfg.k, seed=config.seed)
    run.log(
        "artifact",
        trained,
        int8_bytes=artifact.int8_bytes,
        fp32_bytes=artifact.fp32_bytes,
        agreement=artifact.agreement,
    )
    out: dict[str, Any] = {"final": final_results, "fewshot": fewshot, "paired": comparisons}
    out["artifact"] = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(artifact).items()
    }
    if any(isinstance(v, float) and math.isnan(v) for v in out["artifact"].values()):
        out["artifact"]["agreement"] = None
    return out
