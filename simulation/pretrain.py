"""Server-side pretraining for the simulation: teacher on public users, student distilled
from it. Cached on disk keyed by everything that determines the result, so a second run (or
a rerun after a crash) reuses it; a write removes the cache files of other keys that have
been neither read nor written for :data:`shared.io.CACHE_MAX_IDLE_SECONDS` (30 days)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch

from shared.data.dataset import RecDataset
from shared.data.registry import load_dataset
from shared.eval.protocol import EvalConfig, evaluate_split
from shared.eval.splits import ProtocolSplit, SplitConfig, split_users
from shared.io import (
    mark_in_use,
    remove_idle_files,
    remove_stale_temps,
    versions_key,
    write_bytes_atomic,
)
from shared.models.epochs import STUDENT_EPOCHS, TEACHER_EPOCHS
from shared.models.history_order import Order
from shared.models.item_factors import IdInit
from shared.models.student import (
    DistilledStudent,
    StudentConfig,
    StudentModel,
    load_student_state,
)
from shared.models.teacher import SASRecTeacher, TeacherConfig
from shared.text.encoder import (
    EncoderConfig,
    default_cache_dir,
    encode_items,
    resolve_model_dir,
)
from shared.training.device import cpu_state, release_cached_memory, resolve_device
from shared.training.trainer import Validation, count_parameters, seeded

log = logging.getLogger(__name__)


@dataclass
class Pretrained:
    """The fitted teacher and student, and whether they came from the cache."""

    teacher: SASRecTeacher
    student: DistilledStudent
    seconds: float
    cached: bool


PRETRAIN_CACHE_VERSION = 2  # 2: selection on the run's seed's negatives
"""Part of every pretraining cache key. Bump it with any change to how a config trains (a
loss, the validation that stops training, the student's budget rule): the key holds the
data and the configs, not the code, so a cache written by older code would still be used."""

PRETRAIN_LIBRARIES = ("torch", "numpy")
"""The libraries whose installed versions are part of every pretraining cache key: torch runs
all of training, numpy the teacher prior's EASE inverse (its bundled BLAS); another version
can train other models from the same data and configs."""


def cache_key(
    dataset: RecDataset,
    split: ProtocolSplit,
    text: npt.NDArray[np.float32],
    teacher: TeacherConfig,
    student: StudentConfig,
    fingerprint: str | None = None,
    device_type: str = "cpu",
) -> str:
    """The pretraining cache's name for these inputs: the data, split, configs and item
    text, :data:`PRETRAIN_CACHE_VERSION` and the versions of :data:`PRETRAIN_LIBRARIES`.
    ``fingerprint`` is ``dataset.fingerprint()`` where the caller has it already (hashing
    every interaction and text again costs a pass over the data); computed here otherwise.

    ``device_type``, the kind of device that trains (``torch.device.type``), is part of the
    key only when it is not ``"cpu"``: a GPU's kernels round differently, so its models are
    not a CPU run's, and a CPU run keeps the key (and the cache) it had before pretraining
    could run on a GPU. Which GPU (``cuda:1``) is not part of it."""
    h = hashlib.sha256(f"pretrain-v{PRETRAIN_CACHE_VERSION}".encode())
    if device_type != "cpu":
        h.update(f"device={device_type}\0".encode())
    h.update(versions_key(PRETRAIN_LIBRARIES))
    h.update((fingerprint if fingerprint is not None else dataset.fingerprint()).encode())
    h.update(json.dumps(asdict(split.config), sort_keys=True).encode())
    h.update(json.dumps(asdict(teacher), sort_keys=True).encode())
    h.update(json.dumps(asdict(student), sort_keys=True).encode())
    h.update(np.ascontiguousarray(text).tobytes())
    return h.hexdigest()[:20]


def _student_budget(teacher: SASRecTeacher, config: StudentConfig) -> StudentConfig:
    """``config`` narrowed to a tenth of one member of the (fitted or loaded) teacher."""
    member = count_parameters(p for p in teacher.model.first.parameters() if p.requires_grad)
    scaled = config.scaled_to(member)
    if scaled != config:
        log.info(
            "student narrowed to dim %d (text %d, id %d): %d trainable parameters, %.3f of the "
            "teacher member's %d",
            scaled.dim,
            scaled.text_dim,
            scaled.id_dim,
            scaled.trainable_parameters(),
            scaled.trainable_parameters() / member,
            member,
        )
    return scaled


def pretrain(
    dataset: RecDataset,
    split: ProtocolSplit,
    text: npt.NDArray[np.float32],
    cache_dir: Path,
    *,
    teacher_config: TeacherConfig,
    student_config: StudentConfig,
    progress: bool = False,
    fingerprint: str | None = None,
    device: str = "cpu",
) -> Pretrained:
    """Fit (or load) the teacher and the student on the public users' training data.

    ``fingerprint``: ``dataset.fingerprint()``, where the caller has computed it (see
    :func:`cache_key`).

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``;
    :func:`~shared.training.device.resolve_device`) trains and validates both models; a GPU
    run has its own cache key (:func:`cache_key`). Either way the models come back, and are
    cached, on the CPU: a cache written on a GPU loads on a machine without one, and what
    the run does next (the bundle, the federation, the evaluation) gets what a cache hit
    gives.

    The student is narrowed, if needed, to a tenth of the trainable parameters of one member
    of the fitted teacher (:meth:`StudentConfig.scaled_to`): the teacher grows with the
    catalog and its shape depends on the reading validation chose, the student's does not.
    Counting one member, not the whole ensemble, keeps the student the same whatever
    ``members`` is.

    Once done (or failed), the GPU memory torch cached for it goes back to the driver
    (:func:`~shared.training.device.release_cached_memory`): the models are on the CPU by
    then, and a simulation's clients that Ray gives GPU shares run in other processes.
    """
    train_on = resolve_device(device)
    try:
        return _fit_or_load(
            dataset,
            split,
            text,
            cache_dir,
            train_on,
            teacher_config=teacher_config,
            student_config=student_config,
            progress=progress,
            fingerprint=fingerprint,
        )
    finally:
        release_cached_memory(train_on)


def _fit_or_load(
    dataset: RecDataset,
    split: ProtocolSplit,
    text: npt.NDArray[np.float32],
    cache_dir: Path,
    train_on: torch.device,
    *,
    teacher_config: TeacherConfig,
    student_config: StudentConfig,
    progress: bool,
    fingerprint: str | None,
) -> Pretrained:
    """:func:`pretrain` on the resolved device ``train_on``."""
    teacher = SASRecTeacher(text, teacher_config, progress=progress, device=str(train_on))
    key = cache_key(
        dataset, split, text, teacher_config, student_config, fingerprint, train_on.type
    )
    path = cache_dir / "pretrained" / f"{dataset.name}-{key}.pt"
    start = time.perf_counter()
    if path.exists():
        try:
            state = _read_checked(path)
            teacher.build(dataset.n_items, state["teacher_order"]).load_state_dict(state["teacher"])
            teacher.order_scores = dict(state["teacher_order_scores"])
            teacher.member_scores = list(state["teacher_member_scores"])
            teacher.prior_scores = dict(state["teacher_prior_scores"])
            budget = _student_budget(teacher, student_config)
            widths = (state["text_shape"][1], state["ids_shape"][1])
            if widths != (budget.text_dim, budget.id_dim):  # sized by older code
                raise ValueError(
                    f"its student's tables are {widths[0]} / {widths[1]} wide, the student "
                    f"config's {budget.text_dim} / {budget.id_dim}"
                )
            with seeded(budget.seed):  # its draws are overwritten: keep the global RNG's
                model = StudentModel(
                    np.zeros(state["text_shape"], np.float32),
                    np.zeros(state["ids_shape"], np.float32),
                    budget,
                )
            if not load_student_state(model, state["student"]):
                model.set_cold_user(split.train_sequences(split.public_users))
            model.set_trainable(["global"])  # as a freshly distilled student leaves it
            model.eval()
            mark_in_use(path)  # not idle for another key's write
            log.info("pretrained teacher and student loaded from %s", path)
            student = DistilledStudent.from_model(model)
            student.teacher = teacher
            return Pretrained(teacher, student, time.perf_counter() - start, cached=True)
        except Exception as err:
            # empty, garbage, truncated, altered (its digest), or of an unexpected layout:
            # the cache is derived data, so any damage means training again
            log.warning(
                "ignoring unusable pretraining cache %s (%s: %s); retraining",
                path,
                type(err).__name__,
                err,
            )
    public = split.public_users
    validation = Validation(split, ("public",))  # negatives of the run's seed
    teacher.fit(split.train_sequences(public), dataset.n_items, validation)
    budget = _student_budget(teacher, student_config)
    student = DistilledStudent(teacher, budget, progress=progress, device=str(train_on))
    student.fit(split.train_sequences(public), dataset.n_items, validation)
    teacher.model.cpu()  # as a cache hit gives them
    student.model.cpu()
    buf = io.BytesIO()
    torch.save(
        {
            "teacher": cpu_state(teacher.model.state_dict()),
            "teacher_order": teacher.fitted_order,
            "teacher_order_scores": teacher.order_scores,
            "teacher_member_scores": teacher.member_scores,
            "teacher_prior_scores": teacher.prior_scores,
            "student": cpu_state(student.model.state_dict()),
            "text_shape": list(student.model.items.text.weight.shape),
            "ids_shape": list(student.model.items.ids.weight.shape),
        },
        buf,
    )
    payload = buf.getvalue()
    header = _DIGEST_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    try:
        remove_stale_temps(path.parent, ".*.pt.*.tmp")  # from killed writes
        write_bytes_atomic(path, header + payload)
    except OSError as err:  # the models are trained: keep them for this run
        log.warning("could not cache the pretrained models in %s (%s); continuing", path, err)
    else:  # every other data / config / library version leaves a file: old ones go
        remove_idle_files(path.parent, _CACHE_NAME, keep=path, what="pretraining cache")
    return Pretrained(teacher, student, time.perf_counter() - start, cached=False)


_CACHE_NAME = re.compile(r".+-[0-9a-f]{20}\.pt")
"""A pretraining cache file's name: ``<dataset>-<cache_key>.pt``."""
_DIGEST_MAGIC = b"fedrec-pretrained sha256:"
"""Start of a cache file: the SHA-256 of the torch payload after it, checked on load."""


def _read_checked(path: Path) -> dict[str, Any]:
    """A cache file's state, refused (``ValueError``) if its digest or a weight is off.

    Files written before the digest (a bare torch zip) load without the check.
    """
    data = path.read_bytes()
    if data.startswith(_DIGEST_MAGIC):
        header, _, payload = data.partition(b"\n")
        if hashlib.sha256(payload).hexdigest().encode() != header[len(_DIGEST_MAGIC) :]:
            raise ValueError("its contents do not match the digest written with them")
        data = payload
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a state mapping")
    for part in ("teacher", "student"):
        if not all(torch.isfinite(t).all() for t in state[part].values() if t.is_floating_point()):
            raise ValueError(f"its {part} weights are not all finite")
    return state


def configs_for(
    epochs_teacher: int,
    epochs_student: int,
    seed: int,
    teacher_id_init: str = TeacherConfig.id_init,
    teacher_order: str = TeacherConfig.order,
    teacher_members: int = TeacherConfig.members,
    teacher_prior: bool = TeacherConfig.prior,
) -> tuple[TeacherConfig, StudentConfig]:
    """The teacher/student configs of a simulation (defaults, with its epoch caps, seed,
    the teacher's ID-table initialisation, history order, ensemble size and item-item prior;
    :class:`TeacherConfig` refuses an unknown one)."""
    return (
        replace(
            TeacherConfig(),
            epochs=epochs_teacher,
            seed=seed,
            id_init=cast(IdInit, teacher_id_init),
            order=cast(Order, teacher_order),
            members=teacher_members,
            prior=teacher_prior,
        ),
        replace(StudentConfig(), epochs=epochs_student, seed=seed),
    )


@dataclass
class PretrainedRun:
    """A dataset, its protocol split, the item text embeddings and the pretrained models."""

    dataset: RecDataset
    split: ProtocolSplit
    text: npt.NDArray[np.float32]
    pretrained: Pretrained

    def evaluate_federated(self, model: StudentModel, stage: str) -> dict[str, float]:
        """Protocol metrics of ``model`` on the federated users' ``stage`` item (``'valid'``
        for model selection, ``'test'`` for the figure), rounded to 4 places."""
        result = evaluate_split(
            DistilledStudent.from_model(model),
            self.split,
            ("federated",),
            stage,
            EvalConfig(seed=self.split.config.seed),  # the run's seed draws its negatives
        )["federated"]
        return {k: round(float(v), 4) for k, v in result.items()}


def pretrain_on(
    dataset: str,
    data_dir: str | None,
    seed: int,
    cache_dir: Path,
    *,
    teacher_epochs: int = TEACHER_EPOCHS,
    student_epochs: int = STUDENT_EPOCHS,
    teacher_members: int = TeacherConfig.members,
    teacher_prior: bool = TeacherConfig.prior,
    text_model: str = "",
) -> PretrainedRun:
    """Load ``dataset``, split it by the protocol (``seed``), encode the item text (with
    ``text_model``, default the bundled MiniLM) and pretrain (or load from ``cache_dir``) the
    default teacher (of ``teacher_members``) and student: the common start of the benchmarks,
    which then share one pretraining cache."""
    ds = load_dataset(dataset, data_dir, synthetic_seed=seed)
    split = split_users(ds, SplitConfig(seed=seed))
    text = encode_items(ds.item_text, encoder_config(text_model, cache_dir))
    teacher_cfg, student_cfg = configs_for(
        teacher_epochs,
        student_epochs,
        seed,
        teacher_members=teacher_members,
        teacher_prior=teacher_prior,
    )
    pre = pretrain(
        ds, split, text, cache_dir, teacher_config=teacher_cfg, student_config=student_cfg
    )
    return PretrainedRun(ds, split, text, pre)


def encoder_config(
    text_model: str, cache_root: Path, progress: bool = False, device: str = "cpu"
) -> EncoderConfig:
    """The item-text encoder of a run: ``text_model`` (a local Hugging Face model directory;
    "" for the bundled MiniLM), caching under ``cache_root/embeddings`` beside the
    pretraining cache, encoding on ``device`` (the one pretraining runs on: a GPU encodes a
    large catalog's text many times faster; a CPU run's cache key is unchanged)."""
    if text_model:
        resolve_model_dir(text_model, setting="text-model")  # named as the user gave it
    return EncoderConfig(
        model_path=text_model or None,
        cache_dir=str(cache_root / "embeddings"),
        show_progress=progress,
        device=device,
    )


def default_cache_root() -> Path:
    """Where pretrained models (and text embeddings, under ``embeddings/``) are cached unless
    configured: ``$FEDREC_CACHE_DIR`` if set, else ``~/.cache/fedrec``."""
    return Path(default_cache_dir()).parent


def _members(text: str) -> int:
    """``--teacher-members``: a whole number of at least one, refused by argparse otherwise."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def cache_dir_argument(text: str) -> str:
    """``--cache-dir``: a folder, ``~`` expanded (as the simulation's ``cache-dir`` is); a
    blank one, which would cache into the current folder, is refused by argparse."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be blank; omit it for the default")
    return str(Path(text).expanduser())


def add_pretrain_arguments(parser: argparse.ArgumentParser, dataset: str) -> None:
    """The options :func:`pretrain_from_args` reads (``--dataset``, ``--data-dir``,
    ``--seed``, ``--cache-dir``, ``--teacher-members``, ``--teacher-prior``), for the
    benchmarks that start from a pretrained run."""
    parser.add_argument("--dataset", default=dataset)
    parser.add_argument("--data-dir", default=None, help="dataset folder (not for synthetic)")
    parser.add_argument("--seed", type=int, default=42, help="split and synthetic-world seed")
    parser.add_argument(
        "--cache-dir",
        type=cache_dir_argument,
        default=str(default_cache_root()),
        help="pretraining cache root",
    )
    parser.add_argument(
        "--teacher-members",
        type=_members,
        default=TeacherConfig.members,
        help="independently seeded teachers whose log-probabilities are averaged",
    )
    parser.add_argument(
        "--teacher-prior",
        action=argparse.BooleanOptionalAction,
        default=TeacherConfig.prior,
        help="add the item-item (EASE) prior to the teacher, weighted on validation",
    )
    parser.add_argument(
        "--text-model", default="", help="local Hugging Face encoder folder (default: MiniLM)"
    )


def pretrain_from_args(
    args: argparse.Namespace,
    *,
    teacher_epochs: int = TEACHER_EPOCHS,
    student_epochs: int = STUDENT_EPOCHS,
) -> PretrainedRun:
    """:func:`pretrain_on` with the options of :func:`add_pretrain_arguments`."""
    return pretrain_on(
        args.dataset,
        args.data_dir,
        args.seed,
        Path(args.cache_dir),
        teacher_epochs=teacher_epochs,
        student_epochs=student_epochs,
        teacher_members=args.teacher_members,
        teacher_prior=args.teacher_prior,
        text_model=args.text_model,
    )
