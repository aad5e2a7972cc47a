"""Federated learning on a real device: the ClientApp's task over this device's store, and
the daemon's learner that turns new global models and new local events into the served model.

Two processes share one device state directory:

* **The ClientApp** (``flwr-clientapp``, started by the device's SuperNode for every message)
  runs :class:`DeviceStudentTask`: the student task of the simulation, except that its
  training data is this device's event history (read from the encrypted store, mapped through
  the catalog) and its privacy ledger is the device's ledger (``privacy/ledger.json``, what
  ``/status`` reports and what an erase keeps). After every fit or evaluate it leaves the
  global parameters it was sent in ``federated/global.npz`` (with their version: the server
  round that produced them), and after every fit it counts the round in
  ``federated/joined.json``. It never writes the store, the sealed models or the adapter.
* **The daemon** (``fedrec client start``) runs a :class:`DeviceLearner` thread, the single
  writer of the sealed model store (the personal adapter exists only inside the sealed
  personal model: never in a file of its own, not even a temporary one).
  It notices a newer ``global.npz``, a grown ``joined.json`` or new local events (debounced),
  then rebuilds the served model: the bundle's student with the newest global parameters and
  a personal adapter **refitted against them** from its initialization on the local history
  (:func:`~shared.federated.local_training.fit_personal`; an adapter kept from an older
  global model is stale); exports it to int8 ONNX and installs it (sealed). ``GET /status``
  shows the global version as ``model_version`` (``"3"``, or ``"3+personal"`` once the
  adapter is personal). An erase of the local data installs the newest global model without
  the adapter (``"3"``) before it answers: the learner rebuilds it for the daemon
  (:meth:`DeviceLearner.global_model`), as only personal models of it were sealed.

Why files and not the model artifact the server publishes: the device already receives every
new global model through Flower (fit and evaluate instructions carry it), over the TLS and
authenticated channel, so nothing else has to be served, fetched or trusted. The global
parameters are the aggregate the server sees anyway, so ``global.npz`` is not personal data;
the personal adapter and the ledger stay on the device. The files are written under an
advisory file lock (``federated/.lock``); each write is atomic, so a crash leaves the old or
the new file."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import threading
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from client.device.config import MAX_FEDERATION_PERSONAL_STEPS, MAX_WAIT_S
from client.device.daemon import StaleModelError
from client.device.identity import DeviceIdentity, DeviceLayout, read_passphrase_env
from client.device.sealed import PERSONAL_SUFFIX, Catalog
from shared.config import is_int
from shared.errors import ConfigError, DataError, FedRecError
from shared.federated.local_config import LocalTrainConfig
from shared.io import LockWaitCancelled, exclusive_lock, write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:
    from client.device.daemon import Daemon
    from shared.federated.bundle import Bundle
    from shared.federated.student_task import StudentTask
    from shared.federated.task import Arrays, ConfigValue, EvalOutcome, FitOutcome, RunConfig
    from shared.models.student import StudentModel

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- shared files

#: Each federation file last logged as unreadable, with its state then (see
#: :func:`_log_unreadable`).
_LOGGED_UNREADABLE: dict[Path, tuple[int, int, int] | None] = {}


def _log_unreadable(path: Path, message: str, *args: object) -> None:
    """Log that ``path`` is unreadable at ERROR once per state of the file (inode, size,
    modification time), at DEBUG while it is unchanged: the learner reads the files at every
    poll (twice a second), and logged the same error each time until the next round
    replaced the file, hours or days later."""
    try:
        stat = path.stat()
        state: tuple[int, int, int] | None = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    except OSError:
        state = None
    seen = path in _LOGGED_UNREADABLE and _LOGGED_UNREADABLE[path] == state
    _LOGGED_UNREADABLE[path] = state
    logger.log(logging.DEBUG if seen else logging.ERROR, message, *args)


class PersonalFit(NamedTuple):
    """How a device refits its personal adapter against a global model: the federation's
    ``personal-steps``, ``personal-lr`` and ``exclude-seen``
    (:func:`~shared.federated.local_training.fit_personal`)."""

    steps: int
    lr: float
    exclude_seen: bool = True

    @classmethod
    def of(cls, train: LocalTrainConfig) -> PersonalFit:
        return cls(train.personal_steps, train.personal_lr, train.exclude_seen)


class ReceivedGlobal(NamedTuple):
    """A global model as the ClientApp kept it in ``global.npz``."""

    version: int
    arrays: list[npt.NDArray[Any]]
    #: the refit of the run config it came with; ``None`` in a file kept by a version that
    #: did not record it (``exclude_seen`` defaults to ``True`` in one that recorded only
    #: the steps and the rate)
    personal_fit: PersonalFit | None
    #: the Flower run it came from; ``None`` in a file kept by a version that did not record it
    run_id: int | None = None
    #: the run's ``prune-sparsity``, which the device's own export of it follows (0 in a file
    #: kept by a version that did not record it)
    prune_sparsity: float = 0.0


@dataclass(frozen=True)
class FederatedFiles:
    """The files the ClientApp and the daemon exchange under ``STATE_DIR/federated/``."""

    state_dir: Path

    @property
    def directory(self) -> Path:
        return self.state_dir / "federated"

    @property
    def global_params(self) -> Path:
        return self.directory / "global.npz"

    @property
    def joined(self) -> Path:
        return self.directory / "joined.json"

    @property
    def lock_file(self) -> Path:
        return self.directory / ".lock"

    def lock(
        self, cancel: threading.Event | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Advisory inter-process lock around read-modify-write of these files; the wait for
        it ends with :class:`~shared.io.LockWaitCancelled` once ``cancel`` is set (the
        ClientApp holds it for a whole fit)."""
        return exclusive_lock(self.lock_file, cancel=cancel)

    def global_version(self) -> int | None:
        """Version of ``global.npz`` without loading the arrays (``None``: none yet)."""
        received = self.read_global(arrays=False)
        return received.version if received is not None else None

    def read_global(self, *, arrays: bool = True, strict: bool = False) -> ReceivedGlobal | None:
        """The newest global model received (its arrays only with ``arrays``), or ``None``.
        An unreadable file reads as ``None`` (logged; the next model received replaces it),
        or with ``strict`` raises :class:`DataError`: for the daemon, whose model built from
        ``None`` would be the bundle's, a federated model replaced by version 0."""
        try:
            with np.load(self.global_params, allow_pickle=False) as data:
                version = int(data["version"])
                out = []
                if arrays:
                    count = int(data["count"])
                    out = [np.asarray(data[f"arr_{i:04d}"]) for i in range(count)]
                personal_fit = None
                if "personal_steps" in data and "personal_lr" in data:
                    exclude = bool(data["exclude_seen"]) if "exclude_seen" in data else True
                    personal_fit = PersonalFit(
                        int(data["personal_steps"]), float(data["personal_lr"]), exclude
                    )
                run_id = int(data["run_id"]) if "run_id" in data else None
                prune = float(data["prune_sparsity"]) if "prune_sparsity" in data else 0.0
        except FileNotFoundError:
            return None
        # a truncated file is a BadZipFile, an empty one an EOFError: unreadable too
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            if strict:
                raise DataError(
                    f"the global model file {self.global_params} is unreadable ({exc}); the "
                    "next global model this device receives replaces it"
                ) from exc
            _log_unreadable(
                self.global_params,
                "unreadable %s (%s); waiting for the next round",
                self.global_params,
                exc,
            )
            return None
        return ReceivedGlobal(version, out, personal_fit, run_id, prune)

    def write_global(
        self,
        version: int,
        arrays: Arrays,
        personal_fit: PersonalFit | None = None,
        *,
        run_id: int | None = None,
        prune_sparsity: float = 0.0,
    ) -> bool:
        """Keep ``arrays`` as global model ``version`` of Flower run ``run_id`` unless a newer
        one of the same run is already kept, with the federation's refit settings and
        ``prune-sparsity`` for the daemon. A model of another run replaces whatever is kept:
        a new run starts again from round 1, and comparing rounds alone kept the old run's
        model until the new one overtook its round count."""
        kept = self.read_global(arrays=False)
        if kept is not None:
            same_run = run_id is None or kept.run_id is None or kept.run_id == run_id
            if same_run and kept.version >= version:
                return False
        buf = io.BytesIO()
        named: dict[str, npt.NDArray[Any]] = {
            f"arr_{i:04d}": np.asarray(a, dtype=np.float32) for i, a in enumerate(arrays)
        }
        named["version"] = np.asarray(version, dtype=np.int64)
        named["count"] = np.asarray(len(arrays), dtype=np.int64)
        if run_id is not None:
            named["run_id"] = np.asarray(run_id, dtype=np.uint64)
        if personal_fit is not None:
            named["personal_steps"] = np.asarray(personal_fit.steps, dtype=np.int64)
            named["personal_lr"] = np.asarray(personal_fit.lr, dtype=np.float64)
            named["exclude_seen"] = np.asarray(personal_fit.exclude_seen, dtype=np.bool_)
        if prune_sparsity:
            named["prune_sparsity"] = np.asarray(prune_sparsity, dtype=np.float64)
        np.savez(buf, allow_pickle=False, **named)
        write_bytes_atomic(self.global_params, buf.getvalue())
        return True

    def rounds_joined(self) -> int:
        return self.joined_counts()[0]

    def rounds_without_dp(self) -> int:
        """The joined rounds this device trained without DP (``--allow-no-dp``): they spent
        no epsilon the ledger can count, and no bound holds for them."""
        return self.joined_counts()[1]

    def joined_counts(self) -> tuple[int, int]:
        """The rounds joined and, of those, the ones without DP, from one read of the file
        (both 0 when it is missing or unreadable: the store's counters, which
        :meth:`~client.device.store.DeviceStore.sync_rounds_joined` keeps, outlive that)."""
        try:
            joined = json.loads(self.joined.read_text())
            counts = joined.get("count", 0), joined.get("without_dp", 0)
            # what add_round_joined writes: a count below 0 or not a whole number (1e400,
            # which int() cannot take) failed every /status and every tick of the learner
            if not all(is_int(c) and c >= 0 for c in counts):
                raise ValueError(f"counts {counts} are not whole numbers >= 0")
            return int(counts[0]), int(counts[1])
        except FileNotFoundError:
            return 0, 0
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            _log_unreadable(self.joined, "unreadable %s (%s)", self.joined, exc)
            return 0, 0

    def add_round_joined(self, server_round: int, *, with_dp: bool) -> None:
        count, without_dp = self.joined_counts()
        write_json_atomic(
            self.joined,
            {
                "count": count + 1,
                "without_dp": without_dp + (0 if with_dp else 1),
                "last_round": server_round,
                "at": time.time(),
            },
        )


def _data_key(state_dir: Path, passphrase_env: str | None = None) -> bytes:
    """The device's data key, from its key file or its passphrase environment variable
    (``passphrase_env``, the one ``fedrec client start`` read; else the one recorded at
    ``init``)."""
    identity = DeviceIdentity.load(state_dir)
    passphrase = None
    if identity.data_key_mode == "passphrase":
        var = passphrase_env or identity.passphrase_env()
        if not var:
            raise ConfigError(
                f"the data key of {state_dir} comes from a passphrase but no variable name is "
                "recorded or given; start the device with `fedrec client start "
                "--passphrase-env NAME` (NAME: the environment variable holding it)"
            )
        passphrase = read_passphrase_env(var)
    return identity.data_key(passphrase)


def local_history(
    state_dir: Path, catalog: Catalog, passphrase_env: str | None = None
) -> npt.NDArray[np.int64]:
    """This device's events as model columns, oldest first (items not in ``catalog``
    skipped); ``passphrase_env`` as for :func:`_data_key`."""
    from client.device.store import DeviceStore

    layout = DeviceLayout(state_dir)
    if not layout.store_db.exists():
        return np.zeros(0, dtype=np.int64)
    with DeviceStore.open(layout.store_db, _data_key(state_dir, passphrase_env)) as store:
        events = store.events()
    columns = [catalog.dense(e.item_id) for e in events]
    return np.asarray([c for c in columns if c is not None], dtype=np.int64)


def stored_rounds_joined(state_dir: Path, passphrase_env: str | None = None) -> int:
    """The rounds joined as this device's store counts them (0 without a store);
    ``passphrase_env`` as for :func:`_data_key`. The store keeps its counter through an
    erase and through the loss of ``federated/joined.json``."""
    from client.device.store import STATE_ROUNDS_JOINED, DeviceStore

    layout = DeviceLayout(state_dir)
    if not layout.store_db.exists():
        return 0
    with DeviceStore.open(layout.store_db, _data_key(state_dir, passphrase_env)) as store:
        return int(store.get_state(STATE_ROUNDS_JOINED, 0))


def missing_ledger_reason(layout: DeviceLayout, rounds_joined: int) -> str:
    """Why a device that took part in ``rounds_joined`` > 0 rounds but has no privacy ledger
    must not train (its ClientApp's reason, its ``/status``'s privacy error)."""
    files = FederatedFiles(layout.state_dir)
    lost = "" if files.rounds_joined() else f" (its store counts them: {files.joined} is lost too)"
    return (
        f"the privacy ledger {layout.ledger} is missing although this device took part in "
        f"{rounds_joined} round(s){lost}; restore it from backup (training on would start "
        "counting privacy from zero)"
    )


# --------------------------------------------------------------------------- ClientApp side


def make_device_task(run_config: RunConfig) -> StudentTask:
    """Task-registry factory: the student task over the device named by ``state-dir``."""
    from client.client_app import (
        NODE_PASSPHRASE_ENV,
        NODE_REQUIRE_DP,
        NODE_SHARE_EVALUATION,
        max_noise_shares,
    )
    from shared.federated.student_task import ClientState, StudentTask
    from shared.federated.task import (
        CONFIG_RUN_ID,
        DECLINE_NO_LOCAL_DATA,
        DECLINE_OPTED_OUT,
        EvalOutcome,
        FitOutcome,
        server_round,
    )
    from shared.privacy.ledger import PrivacyBudget, PrivacyLedger

    class DeviceClientState(ClientState):
        """The device's own ledger (``privacy/ledger.json``)."""

        def __init__(self, layout: DeviceLayout, budget: PrivacyBudget):
            self.ledger = PrivacyLedger.open(layout.ledger, budget)

    class DeviceStudentTask(StudentTask):
        """:class:`StudentTask` whose only client is this device (see the module docstring)."""

        @property
        def layout(self) -> DeviceLayout:
            return DeviceLayout(Path(self.config.state_dir))

        @property
        def files(self) -> FederatedFiles:
            return FederatedFiles(Path(self.config.state_dir))

        def catalog(self) -> Catalog:
            return Catalog(tuple(self.bundle.item_ids))

        def _round_config(
            self, config: Mapping[str, ConfigValue], client_id: int
        ) -> LocalTrainConfig:
            """The round's training settings under the owner's noise-shares cap, which holds
            for a round's override as for the run config: more noise, never less."""
            train = super()._round_config(config, client_id)
            if train.noise_shares <= noise_shares_cap:
                return train
            return replace(train, noise_shares=noise_shares_cap)

        #: The history a fit read (:meth:`_fit`), served to the training it starts: one
        #: read a fit, so an erase between the event count and the training cannot make
        #: the count's "enough events" train on none (an error instead of a decline).
        _fit_history: np.ndarray | None = None

        def local_sequence(self, client_id: int) -> np.ndarray:
            if self._fit_history is not None:
                return self._fit_history
            return local_history(self.layout.state_dir, self.catalog(), passphrase_env)

        def client_state(self, client_id: int) -> ClientState:
            if not self.layout.ledger.exists():
                # joined.json may be lost with it: then the store's counter (kept by an
                # erase) still says whether this device took part; read only while no
                # ledger is found, i.e. before a device's first round
                joined = self.files.rounds_joined() or stored_rounds_joined(
                    self.layout.state_dir, passphrase_env
                )
                if joined:
                    raise DataError(missing_ledger_reason(self.layout, joined))
            return DeviceClientState(self.layout, self._budget)

        def client_lock(self, client_id: int) -> contextlib.AbstractContextManager[None]:
            return contextlib.nullcontext()  # fit already holds the device's files lock

        def _keep_global(
            self, version: int, parameters: Arrays, config: Mapping[str, ConfigValue]
        ) -> None:
            fit = PersonalFit.of(self.train_config)
            run = config.get(CONFIG_RUN_ID)
            run_id = run if is_int(run) else None
            self.files.write_global(
                version,
                parameters,
                personal_fit=fit,
                run_id=run_id,
                prune_sparsity=self.config.prune_sparsity,
            )

        def fit(
            self, client_id: int, parameters: Arrays, config: Mapping[str, ConfigValue]
        ) -> FitOutcome:
            outcome = self._fit(client_id, parameters, config)
            if outcome.status.value == "declined":
                # the server is told only the decline's kind (and counts it): the
                # SuperNode's log (the ClientApp's stderr) is the one place its owner, and
                # `fedrec server start`'s advice, can read the reason
                logger.warning(
                    "round %d: this device declined to train: %s",
                    server_round(config),
                    outcome.reason,
                )
            return outcome

        def _fit(
            self, client_id: int, parameters: Arrays, config: Mapping[str, ConfigValue]
        ) -> FitOutcome:
            round_no = server_round(config)
            self.check_received(parameters)  # never kept (and served) unchecked
            with_dp = self._round_config(config, client_id).dp
            if require_dp and not with_dp:
                raise ConfigError(
                    "the server asks this device to train without DP; it trains only with "
                    "DP-SGD (its owner can allow otherwise with `fedrec client start "
                    "--allow-no-dp`)"
                )
            with self.files.lock():
                self._keep_global(max(round_no - 1, 0), parameters, config)
                history = self.local_sequence(client_id)
                if len(history) < 2:  # a young device, not a broken one: it sits this round out
                    return FitOutcome.declined(
                        f"this device has {len(history)} event(s); training needs >= 2",
                        DECLINE_NO_LOCAL_DATA,
                    )
                self._fit_history = history
                try:
                    outcome = super().fit(client_id, parameters, config)
                finally:
                    self._fit_history = None
                if outcome.status.value == "ok":
                    if not self.layout.ledger.exists():
                        # a round without DP (--allow-no-dp) spends nothing, but once a
                        # round is joined a missing ledger means a lost one: write it first
                        PrivacyLedger.open(self.layout.ledger, self._budget).save()
                    self.files.add_round_joined(round_no, with_dp=with_dp)
            return outcome

        def evaluate(
            self, client_id: int, parameters: Arrays, config: Mapping[str, ConfigValue]
        ) -> EvalOutcome:
            self.check_received(parameters)
            with self.files.lock():
                self._keep_global(server_round(config), parameters, config)
            if not share_evaluation:  # the model is kept: the device still serves it
                return EvalOutcome.declined(
                    "this device does not share evaluation metrics (they are computed from "
                    "its user's own events and would leave it in the clear); its owner can "
                    "allow it with `fedrec client start --share-evaluation`",
                    DECLINE_OPTED_OUT,
                )
            return self._evaluate_local(parameters)

        def _evaluate_local(self, parameters: Arrays) -> EvalOutcome:
            """Leave-last-out on the local history: the newest event is the target."""
            import torch
            import torch.nn.functional as F

            from shared.eval.metrics import hit_rate_at_k, ndcg_at_k, rank_of_target
            from shared.federated.student_task import set_global_arrays
            from shared.models.sequence import module_device, pad_histories

            history = self.local_sequence(0)
            if len(history) < 2:
                return EvalOutcome.declined(
                    f"this device has {len(history)} event(s); evaluation needs >= 2",
                    DECLINE_NO_LOCAL_DATA,
                )
            context, target = history[:-1], int(history[-1])
            with self._lock:
                torch.set_num_threads(self.config.num_threads)
                set_global_arrays(self.model, parameters, self._meta)
                self.model.eval()
                items, mask = pad_histories([context], self.model.config.max_len)
                device = module_device(self.model)
                with torch.no_grad():
                    scores = self.model(items.to(device), mask.to(device))[0].cpu()
            loss = float(F.cross_entropy(scores[None], torch.tensor([target])))
            s = scores.numpy().astype(np.float64)
            excluded = np.zeros(len(s), dtype=bool)
            excluded[context] = True
            excluded[target] = True
            rank = rank_of_target(s[target], s[~excluded])
            # what `--share-evaluation` says it sends, nothing more: the epsilon spent (which
            # tells how long the history is) stays on the device, as SecAgg+ keeps it out of
            # the fit replies
            return EvalOutcome(
                loss=loss,
                num_examples=1,
                metrics={"full_hr@10": hit_rate_at_k([rank]), "full_ndcg@10": ndcg_at_k([rank])},
            )

    share_evaluation = run_config.get(NODE_SHARE_EVALUATION) is True
    passphrase_env = str(run_config.get(NODE_PASSPHRASE_ENV) or "") or None
    require_dp = run_config.get(NODE_REQUIRE_DP) is not False
    noise_shares_cap = max_noise_shares(run_config)
    if not str(run_config.get("state-dir", "")):
        raise ConfigError(
            "the device task needs the device state directory (node config "
            "'fedrec-device-dir', set by `fedrec client start`)"
        )
    return DeviceStudentTask.from_run_config(run_config)


# --------------------------------------------------------------------------- daemon side


@dataclass(frozen=True)
class LearnerConfig:
    """How the daemon adapts and refreshes the served model.

    ``debounce_s``: wait this long after the last new event before adapting (a burst of
    events costs one adaptation). ``poll_s``: how often the ClientApp's files are checked.
    ``personal_steps`` / ``personal_lr`` / ``exclude_seen``: how the personal adapter is
    refitted against each served global model. ``None`` follows the federation: the values
    of the run config that came with the newest global model (``personal-steps`` /
    ``personal-lr`` / ``exclude-seen``), or :class:`LocalTrainConfig`'s defaults (where they
    were measured) before any model came. A value set here overrides the federation's on
    this device. ``num_threads``: torch threads a refit (and an erase's rebuild) uses.
    """

    debounce_s: float = 2.0
    poll_s: float = 0.5
    personal_steps: int | None = None
    personal_lr: float | None = None
    exclude_seen: bool | None = None
    num_threads: int = 1

    def __post_init__(self) -> None:
        # named as `fedrec client start` takes them; NaN fails every comparison, so the
        # checks are written to refuse it (a NaN debounce would never adapt)
        if not (math.isfinite(self.debounce_s) and self.debounce_s >= 0):
            raise ConfigError(
                f"--adapt-debounce must be a finite number of seconds >= 0, got {self.debounce_s}"
            )
        # a wait beyond threading.TIMEOUT_MAX raises OverflowError in the learner thread
        if not (math.isfinite(self.poll_s) and 0 < self.poll_s <= MAX_WAIT_S):
            raise ConfigError(
                f"poll-s must be a finite number > 0 and <= {MAX_WAIT_S:g} seconds, "
                f"got {self.poll_s}"
            )
        # what fit_personal takes, checked here: refused there, every refit failed
        if self.personal_steps is not None and not (
            is_int(self.personal_steps) and self.personal_steps >= 0
        ):
            raise ConfigError(
                f"--personal-steps must be >= 0, a whole number, got {self.personal_steps!r}"
            )
        # torch.set_num_threads refuses it with a bare RuntimeError, at every refresh
        if not (is_int(self.num_threads) and self.num_threads >= 1):
            raise ConfigError(f"num-threads must be an integer >= 1, got {self.num_threads!r}")
        if self.personal_lr is not None and not (
            math.isfinite(self.personal_lr) and self.personal_lr > 0
        ):
            raise ConfigError(f"--personal-lr must be a finite number > 0, got {self.personal_lr}")

    def personal_fit(self, federation: PersonalFit | None) -> PersonalFit:
        """The refit to use: each of this config's values, else the federation's (its steps
        at most :data:`MAX_FEDERATION_PERSONAL_STEPS`), else the defaults."""
        base = federation or PersonalFit.of(LocalTrainConfig())
        steps = base.steps
        if steps > MAX_FEDERATION_PERSONAL_STEPS and self.personal_steps is None:
            logger.warning(
                "the federation asks for %d personal-steps; this device takes %d (its owner "
                "can set more with --personal-steps)",
                steps,
                MAX_FEDERATION_PERSONAL_STEPS,
            )
            steps = MAX_FEDERATION_PERSONAL_STEPS
        return PersonalFit(
            steps if self.personal_steps is None else self.personal_steps,
            base.lr if self.personal_lr is None else self.personal_lr,
            base.exclude_seen if self.exclude_seen is None else self.exclude_seen,
        )


def export_personal_model(
    student: StudentModel, item_ids: tuple[str, ...], version: str, prune_sparsity: float = 0.0
) -> bytes:
    """The int8 ONNX bytes of ``student`` (global parameters and personal adapter), pruned
    as the federation prunes the global models it publishes (``prune-sparsity``)."""
    from shared.compression.artifact import build_student_artifact
    from shared.compression.prune import publish_prune

    # in memory: the model holds the adapter fitted on this user's history, so it is only
    # ever written sealed (a temporary file would outlive a daemon killed mid-export)
    prune = publish_prune(prune_sparsity)
    built = build_student_artifact(student, item_ids, version=version, prune=prune, personal=True)
    return built.int8


#: The longest wait between two refreshes that keep failing (seconds).
MAX_BACKOFF_S = 60.0
#: Doublings of the back-off before it reaches :data:`MAX_BACKOFF_S` (2**6 = 64 > 60).
_BACKOFF_DOUBLINGS = math.ceil(math.log2(MAX_BACKOFF_S))


class DeviceLearner:
    """The daemon's model refresher (see the module docstring); one background thread.

    Register it with :meth:`attach` before :meth:`Daemon.run`; it installs the catalog and a
    first model (the bundle's student, version 0) if the device has none, so events are
    accepted and recommendations served before the first round.
    """

    def __init__(self, daemon: Daemon, bundle_path: Path, config: LearnerConfig | None = None):
        self.daemon = daemon
        self.bundle_path = Path(bundle_path)
        self.config = config or LearnerConfig()
        self.files = FederatedFiles(daemon.layout.state_dir)
        self._bundle: Bundle | None = None
        #: the bundle's own global parameters, before any global model is loaded into its
        #: student: what a device without a (readable) global model serves
        self._pretrained: list[npt.NDArray[Any]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._events_at: float | None = None
        self._thread: threading.Thread | None = None
        #: held while the bundle's student holds a model being built (the learner's refresh
        #: and an erase's rebuild of the global model both load parameters into it)
        self._student_lock = threading.Lock()
        #: ((run, round), label) of the global model an erase is installing (see
        #: :meth:`global_model`), until :meth:`_on_erase` has seen whether it serves
        self._erase_built: tuple[tuple[int | None, int], str] | None = None
        #: (Flower run, round) of the global model being served: a new run restarts at
        #: round 1, so the round alone could equal the one served
        self.installed_global: tuple[int | None, int] | None = None
        self.adaptations = 0

    # -- setup -------------------------------------------------------------------------------

    @property
    def last_error(self) -> str | None:
        """Why the model refreshes keep failing, ``None`` after one succeeds: the daemon's
        :attr:`~client.device.daemon.Daemon.refresh_error`, the one place it is kept."""
        return self.daemon.refresh_error

    @property
    def bundle(self) -> Bundle:
        if self._bundle is None:
            from shared.federated.bundle import check_deployable, load_bundle
            from shared.federated.student_task import get_global_arrays

            bundle = load_bundle(self.bundle_path)
            check_deployable(bundle, self.bundle_path)  # no other user's data on a device
            self._bundle = bundle
            self._pretrained = get_global_arrays(self._bundle.student)
        return self._bundle

    def prepare(self) -> None:
        """Check the bundle against the device and install catalog + first model if missing.

        Runs before the API starts, so a wrong bundle is refused at once with the reason.
        """
        catalog = Catalog(tuple(self.bundle.item_ids))
        installed = self.daemon.catalog
        if installed is None:
            self.daemon.install_catalog(catalog)
        elif installed.fingerprint != catalog.fingerprint:
            raise ConfigError(
                f"the bundle {self.bundle_path} has another catalog ({catalog.fingerprint}) "
                f"than this device ({installed.fingerprint}); use the bundle of this "
                "federation (or `fedrec client init --force` for a new one)"
            )
        model = self.daemon.model
        if model is None or self.files.global_version() is not None:
            self.refresh(adapt=False)

    def attach(self) -> None:
        """Prepare, listen to new events, and run the refresher while the daemon runs."""
        self.prepare()
        self.daemon.add_new_events_listener(self._on_events)
        self.daemon.add_shutdown_callback(self.stop)
        self.daemon.add_erase_callback(self._on_erase)
        self.daemon.set_global_model_source(self.global_model)
        self._thread = threading.Thread(target=self._loop, name="fedrec-learner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    # -- triggers ----------------------------------------------------------------------------

    def _on_events(self, count: int) -> None:
        self._events_at = time.monotonic()
        self._wake.set()

    def _on_erase(self) -> None:
        """The user's data is gone, and with the sealed models the personal adapter fitted on
        it. The erase installed the newest global model (not personal), built by
        :meth:`global_model`; if it could not, the next tick installs it."""
        self._events_at = None
        built, self._erase_built = self._erase_built, None
        served = self.daemon.model
        if built is not None and served is not None and served.metadata.model_version == built[1]:
            self.installed_global = built[0]  # served already: nothing to rebuild
            # the newest model serves and no refit is left to do: a failure of one before
            # (of the data now erased) no longer says why the model is not refreshed
            self.daemon.refresh_error = None
        else:
            self.installed_global = None  # reinstall: erase removed the sealed models
        self._wake.set()

    def _loop(self) -> None:
        from shared.federated.local_training import FitCancelled  # torch: in this thread

        failures = 0
        while not self._stop.is_set():
            # after a failure, back off (capped) instead of retrying every poll; the exponent
            # is capped too: 2.0**1024 overflows, which ended the thread after ~17 hours
            delay = (
                self.config.poll_s
                if not failures
                else min(MAX_BACKOFF_S, 2.0 ** min(failures, _BACKOFF_DOUBLINGS))
            )
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._tick()
                failures = 0
            except LockWaitCancelled:  # stopping: the ClientApp holds the files mid-fit
                return
            except FitCancelled:  # stopping, or an erase: refitted once it is done
                if self._stop.is_set():
                    return
            except FedRecError as exc:
                failures += 1
                self._failed(str(exc))
                logger.error("model refresh failed: %s", exc)
            except Exception as exc:  # keep serving the last good model
                failures += 1
                self._failed(f"{type(exc).__name__}: {exc}")
                logger.exception("model refresh failed")

    def _cancelled(self) -> bool:
        """Whether a refit in flight is to end: the daemon is stopping, or erasing the local
        data (the refit would be stale, and the erase waits for the learner's student)."""
        return self._stop.is_set() or self.daemon.erasing

    def _failed(self, reason: str) -> None:
        """Note why a refresh failed, for the daemon's ``/status`` too (the owner would
        otherwise see only the daemon's log)."""
        self.daemon.refresh_error = reason

    def _tick(self) -> None:
        store = self.daemon.store
        store.sync_rounds_joined(*self.files.joined_counts())
        kept = self.files.read_global(arrays=False)
        new_global = kept is not None and (kept.run_id, kept.version) != self.installed_global
        events_due = (
            self._events_at is not None
            and time.monotonic() - self._events_at >= self.config.debounce_s
        )
        if events_due or (self._events_at is None and store.adaptation_pending() > 0):
            self._events_at = None
            self.refresh(adapt=True)
        elif new_global or self.daemon.model is None:
            self.refresh(adapt=False)

    # -- the work ----------------------------------------------------------------------------

    def refresh(self, *, adapt: bool) -> None:
        """Rebuild and install the served model (see the module docstring). ``adapt``: new
        events are being taken in (they are marked consumed once the model is installed)."""
        import torch

        from shared.federated.local_training import FitCancelled, fit_personal

        torch.set_num_threads(self.config.num_threads)
        bundle = self.bundle
        student = bundle.student
        catalog = Catalog(tuple(bundle.item_ids))
        # the student is held from the files lock (which the ClientApp holds for a whole fit)
        # to the export, so an erase waits for a build (which it cuts short), never for a round
        with contextlib.ExitStack() as holding_student:
            # a stop (the daemon shutting down) ends the wait: the ClientApp holds this lock
            # for a whole fit, and is only stopped once this thread is
            with self.files.lock(cancel=self._stop):
                holding_student.enter_context(self._student_lock)
                # before the history is read: an erase from now on makes this refit stale
                erasures = self.daemon.erasures
                received = self._read_global()
                version, federation_fit, prune_sparsity = self._load_global(student, received)
                init = {k: v.clone() for k, v in student.adapter.state_dict().items()}
                pending = self.daemon.store.adaptation_pending()
                history = np.asarray(self.daemon.history(catalog), dtype=np.int64)
                fit = self.config.personal_fit(federation_fit)
                is_personal = fit.steps > 0 and len(history) >= 2
                if is_personal:
                    # refitted against the global model it will be served with, from the
                    # start; it lives only in the sealed model built from it (never in a file
                    # of its own)
                    # a refit may take minutes: a stop or an erase ends it at its next step
                    fit_personal(
                        student,
                        history,
                        init,
                        fit.steps,
                        fit.lr,
                        exclude_seen=fit.exclude_seen,
                        cancel=self._cancelled,
                    )
                    self.adaptations += 1
            if self._cancelled():  # nor do they wait for the export
                raise FitCancelled("the daemon is stopping or erasing the local data")
            label = f"{version}{PERSONAL_SUFFIX}" if is_personal else str(version)
            data = export_personal_model(student, catalog.item_ids, label, prune_sparsity)
        try:
            info = self.daemon.install_model(data, catalog, erasures=erasures)
        except StaleModelError:  # the erase's callback asked for a new refresh already
            logger.info("discarded model %s: the local data it was fitted on was erased", label)
            return
        if adapt and pending:
            self.daemon.store.consume_adaptation_pending(pending)
        self.installed_global = (received.run_id if received else None, version)
        self.daemon.refresh_error = None
        logger.info("serving model %s (sealed v%d)", label, info.version)

    def global_model(self) -> bytes | None:
        """The ONNX bytes of the newest global model as a newcomer is served it (the kept
        ``global.npz``, or the bundle's parameters before any: version 0), with the
        adapter at its initialization: what :meth:`Daemon.erase` installs in place of the
        personal model. Federated models are only ever sealed with the personal adapter, so
        the newest non-personal model sealed was the bundle's (version 0) until the next tick
        rebuilt the global one. Reads ``global.npz`` without the files lock (its writes are
        atomic), so an erase does not wait for a round the ClientApp is training.

        ``None`` with a kept model that is unreadable (logged: the daemon then installs its
        newest non-personal sealed model). Raises what building it raises."""
        import torch

        torch.set_num_threads(self.config.num_threads)
        bundle = self.bundle
        catalog = Catalog(tuple(bundle.item_ids))
        with self._student_lock:
            try:
                received = self.files.read_global(strict=True)
            except DataError as exc:
                logger.error("%s; the erase serves the newest global model sealed", exc)
                return None
            version, _, prune_sparsity = self._load_global(bundle.student, received)
            data = export_personal_model(
                bundle.student, catalog.item_ids, str(version), prune_sparsity
            )
        self._erase_built = ((received.run_id if received else None, version), str(version))
        return data

    def _load_global(
        self, student: StudentModel, received: ReceivedGlobal | None
    ) -> tuple[int, PersonalFit | None, float]:
        """Load ``received`` (``None``: the bundle's own parameters) into ``student``, its
        adapter at its initialization; returns its version, its federation's refit and its
        ``prune-sparsity``."""
        from shared.federated.student_task import global_names, set_global_arrays

        if received is None:  # no global model yet: the bundle's, as a newcomer gets it
            # the student may hold a global model loaded before: the bundle's parameters,
            # not those labelled version 0
            set_global_arrays(student, self._pretrained)
            return 0, None, 0.0
        version, arrays, federation_fit = received[:3]
        # meta-learning runs also carry the adapter's initialization
        meta = len(arrays) != len(global_names(student))
        self._check_fits(student, arrays, meta, version)
        set_global_arrays(student, arrays, meta)
        return version, federation_fit, received.prune_sparsity

    def _read_global(self) -> ReceivedGlobal | None:
        """The kept global model, or ``None`` without one. An unreadable one raises
        :class:`DataError` while a model is served: rebuilding from ``None`` replaced a
        federated model (say version 4) with the bundle's, labelled 0 (after a restart), or
        served its parameters labelled 0 (without one). The served model stays until a
        readable global model arrives. A device serving nothing gets the bundle's model."""
        try:
            return self.files.read_global(strict=True)
        except DataError as exc:
            served = self.daemon.model
            if served is not None:
                raise DataError(
                    f"{exc}; serving model {served.metadata.model_version} until then"
                ) from exc
            logger.error("%s; serving the bundle's model until then", exc)
            return None

    def _check_fits(
        self, student: StudentModel, arrays: list[npt.NDArray[Any]], meta: bool, version: int
    ) -> None:
        """:class:`ConfigError` naming ``global.npz`` unless ``arrays`` are ``student``'s
        global parameters (and with ``meta`` its adapter initialization). Checked before any
        is loaded: a model of another federation failed every start naming only a
        parameter's shape, after half of it had been copied into the bundle's student."""
        from shared.federated.student_task import adapter_names, get_global_arrays, global_names
        from shared.federated.validation import InvalidUpdateError, check_structure

        names = global_names(student) + (adapter_names(student) if meta else [])
        try:
            check_structure(
                arrays,
                get_global_arrays(student, meta),
                what="global model",
                names=names,
                check_dtype=False,
            )
        except InvalidUpdateError as exc:
            raise ConfigError(
                f"the global model {version} kept in {self.files.global_params} does not fit "
                f"the bundle {self.bundle_path} ({exc}): it came from another federation. "
                f"Use that federation's bundle, or delete {self.files.global_params} (the next "
                "round brings this federation's model; `fedrec client init --force` removes it "
                "when the device joins a new federation)"
            ) from exc


def attach_learner(daemon: Daemon, bundle: Path, config: LearnerConfig | None = None) -> None:
    """Convenience for the CLI: build, prepare and start a :class:`DeviceLearner`."""
    DeviceLearner(daemon, bundle, config).attach()
