"""The device daemon: owns the store, the sealed models, the catalog, the exploration policy
and the processes that run next to the local API (the Flower SuperNode, added later).

One :class:`Daemon` per state directory, enforced: :meth:`Daemon.open` takes the directory's
single-writer lock (:class:`~client.device.identity.StateDirLock`, ``STATE/daemon.lock``)
before it derives the data key or writes anything, and holds it until
:meth:`Daemon.shutdown`, so a second daemon (or ``init --force``) on the same directory fails
at once with :class:`~client.device.identity.StateDirInUseError`; the kernel drops the lock if
the daemon dies, even by SIGKILL. The API (:mod:`client.device.api`) only talks to it through
the methods of :class:`DeviceBackend`; the daemon does the domain work:

* :meth:`Daemon.add_events` refuses items the catalog does not know (nothing of the batch
  is stored), stores the rest atomically and calls the :meth:`Daemon.on_new_events` hook,
  which the few-shot adaptation will use ("adaptation pending" is counted in the store).
* :meth:`Daemon.recommend` scores the catalog with the current int8 ONNX model over the
  local history (held in memory, decrypted and as model columns, from start-up on and
  updated as it changes: the store's "Decrypted history in memory"), excludes the
  history, takes the top ``candidate_pool`` candidates and lets
  the exploration policy pick ``k``: by default the configured bandit
  (:class:`~client.device.exploration.BanditReranker`, ``DaemonConfig.exploration``), any
  :class:`Reranker` when given. Every returned item is remembered as an impression so that
  feedback can be checked.
* :meth:`Daemon.add_feedback` **rejects** (:class:`UnknownImpressionError`, HTTP 422) the
  whole batch if any (recommendation, item) pair was never returned by ``recommend`` or has
  expired, so a bug in the app cannot feed the policy made-up impressions; accepted feedback
  updates a learning policy's posterior at once (:class:`LearningReranker`).
* :meth:`Daemon.erase` deletes every local trace of the user: events, impressions, feedback,
  adaptation state, model records, the sealed model files (an adapted model is personal
  data) and the managed processes' logs with ``logs/supernode.log``, SuperNode running or
  not (the ClientApp logs its declines in terms of the user's data). It **keeps** the
  device identity (its keys stay registered), the catalog (public, not personal), the
  rounds-joined counter and the **privacy ledger**: erasing the ledger
  would let the device spend its privacy budget a second time on the same user.

Processes: :meth:`Daemon.add_process` registers a :class:`ProcessSpec` (argv, env, restart
policy); :meth:`Daemon.run` starts them, serves the API with uvicorn in the main thread,
watches the processes from a monitor thread (restart with back-off, or stop the daemon once
``max_restarts`` is used up), and on SIGTERM/SIGINT shuts everything down cleanly: the API
stops accepting, each process gets SIGTERM then SIGKILL after ``shutdown_grace_s``, the store
is checkpointed and closed, ``api.json`` removed (only if this daemon wrote it) and the lock
released. A daemon killed by SIGKILL cannot remove its ``api.json``: readers tell it from a
live one by the lock (:func:`~client.device.identity.running_api`), and the next
:meth:`Daemon.open` removes it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from client.device.config import DaemonConfig
from client.device.exploration import BanditReranker
from client.device.identity import (
    DeviceIdentity,
    DeviceLayout,
    StateDirLock,
    remove_stale_api_info,
)
from client.device.sealed import PERSONAL_SUFFIX, Catalog, SealedModelInfo, SealedModelStore
from client.device.store import (
    DeviceStore,
    Event,
    Feedback,
    Impression,
    ModelRecord,
    StoreCorruptError,
    UnknownImpressionError,
    UnknownItemsError,
    remove_store_files,
)
from shared.errors import ConfigError, DataError, FedRecError, ModelFileError
from shared.io import (
    PRIVATE_MODE,
    fsync_dir,
    trim_log,
    truncate_durably,
    write_bytes_atomic,
    write_json_atomic,
)
from shared.ondevice.runtime import OnDeviceModel, RuntimeConfig
from shared.privacy.budget import PrivacyBudget
from shared.processes import die_with_parent, reap_group, terminate_group

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]

__all__ = [
    "Daemon",
    "DaemonConfig",
    "DeviceBackend",
    "DeviceStatus",
    "GreedyReranker",
    "LearningReranker",
    "NoCatalogError",
    "NoModelError",
    "ProcessSpec",
    "Recommendation",
    "RecommendedItem",
    "Reranker",
    "UnknownImpressionError",
    "UnknownItemsError",
]


MONITOR_FAILURES_TO_STOP = 5
"""Consecutive monitor ticks whose check of the managed processes raised before the daemon
stops (:meth:`Daemon._monitor_loop`): a passing failure is logged and outlived, one that
persists would leave the processes unwatched."""

_DAEMON_ADVICE = (
    "stop it first (SIGTERM or Ctrl-C), then run this again: one daemon per device state "
    "directory (a second device needs its own --state-dir)"
)


class NoModelError(FedRecError):
    """No usable model is installed yet (the API answers 503)."""


class NoCatalogError(FedRecError):
    """No catalog is installed yet, so item ids cannot be checked (the API answers 503)."""


REINSTALL_ADVICE = (
    "install the model again with its catalog (`fedrec client install-model --model "
    "MODEL.onnx --catalog catalog.json`)"
)
"""The repair of a device whose catalog is missing or unusable."""


class StaleModelError(FedRecError):
    """A model built from local data that was erased while it was being built."""


# --------------------------------------------------------------------------- exploration


@runtime_checkable
class Reranker(Protocol):
    """The exploration policy's interface to the daemon (``shared.bandits`` plugs in here).

    ``candidates`` are model columns (best model score first), ``scores`` their model
    scores; return at most ``k`` distinct candidates, best first. Output that breaks this
    contract is replaced by the greedy order (and logged), never served.
    """

    name: str

    def rerank(self, candidates: IntArray, scores: FloatArray, k: int) -> Sequence[int]: ...


def api_url(host: str, port: int) -> str:
    """The URL of an API bound to ``host:port`` (an IPv6 address in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@runtime_checkable
class LearningReranker(Reranker, Protocol):
    """A policy that learns on the device: told which model it serves, fed feedback, reset on
    erase. The daemon calls these hooks; :class:`Reranker`-only policies never see them."""

    def on_model(self, model: OnDeviceModel | None) -> None: ...

    def rerank(
        self, candidates: IntArray, scores: FloatArray, k: int, slate_id: str | None = None
    ) -> Sequence[int]:
        """As :meth:`Reranker.rerank`; ``slate_id`` is the recommendation id that this
        slate's feedback will name."""
        ...

    def observe(
        self,
        columns: Sequence[int],
        rewards: Sequence[float],
        slate_ids: Sequence[str | None] | None = None,
    ) -> int:
        """Learn from feedback on shown columns, each about the slate its id names."""
        ...

    def awaiting(self, columns: Sequence[int], slate_ids: Sequence[str | None]) -> list[bool]:
        """Whether each shown column's impression in its slate still awaits feedback."""
        ...

    def reset(self) -> None: ...


class GreedyReranker:
    """No exploration: the model's own top-``k`` (ties: lower column first)."""

    name = "greedy"

    def rerank(self, candidates: IntArray, scores: FloatArray, k: int) -> Sequence[int]:
        order = np.lexsort((candidates, -scores))
        return [int(c) for c in candidates[order][:k]]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RecommendedItem:
    item_id: str
    rank: int
    score: float


@dataclass(frozen=True)
class Recommendation:
    """One recommendation list; ``recommendation_id`` is what feedback refers to."""

    recommendation_id: str
    model_version: str
    sealed_version: int
    policy: str
    items: tuple[RecommendedItem, ...]


@dataclass(frozen=True)
class DeviceStatus:
    """What ``GET /status`` reports."""

    device_id: str | None
    model_version: str | None
    sealed_version: int | None
    model_error: str | None
    catalog_items: int | None
    rounds_joined: int
    epsilon_spent: float | None
    rounds_without_dp: int
    epsilon_budget: float
    delta: float
    privacy_error: str | None
    events: int
    feedback: int
    adaptation_pending: int
    policy: str
    processes: tuple[ProcessState, ...] = ()
    #: Why the last refresh of the served model (a personal refit, or a new global model)
    #: failed, while it keeps failing (:attr:`Daemon.refresh_error`); ``None`` otherwise.
    refresh_error: str | None = None


@dataclass(frozen=True)
class ProcessState:
    """A managed process as ``GET /status`` reports it: is it running, how often it was
    restarted, and why it last exited (its log's last error line, and what it means)."""

    name: str
    running: bool
    restarts: int
    last_exit_code: int | None
    last_error: str | None
    #: What its log says is wrong now, while it runs (e.g. the server does not answer);
    #: ``None`` when nothing is (:attr:`ProcessSpec.watch`).
    notice: str | None = None


class DeviceBackend(Protocol):
    """What the HTTP API needs from the daemon (tests may pass any object with these)."""

    def add_events(self, events: Sequence[Event]) -> int: ...
    def recommend(self, k: int | None = None) -> Recommendation: ...
    def add_feedback(self, feedback: Sequence[Feedback]) -> int: ...
    def status(self) -> DeviceStatus: ...
    def erase(self) -> None: ...


# --------------------------------------------------------------------------- processes

_ERROR_MARKERS = ("ERROR", "Error", "error:", "Exception", "Failed", "failed")


def is_error_line(line: str) -> bool:
    """Whether a log line reports an error (or a failure Flower logs as a warning)."""
    return any(marker in line for marker in _ERROR_MARKERS)


def log_size(log_file: str | None) -> int:
    """How many bytes ``log_file`` holds (0 if it does not exist yet): where the output of
    a run started now begins."""
    if log_file is None:
        return 0
    try:
        return os.path.getsize(log_file)
    except OSError:
        return 0


def log_lines(log_file: str | None, *, start: int = 0, tail_bytes: int = 16_384) -> list[str]:
    """The lines of ``log_file`` from byte ``start`` on (at most its last ``tail_bytes``),
    stripped of colour codes; ``[]`` if it is unreadable. With ``start`` = the file's size
    when a run began (:func:`log_size`), only that run's output: a line an earlier run logged
    is not why this one ended."""
    if log_file is None:
        return []
    try:
        with open(log_file, "rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            if start > end:  # truncated or replaced since: all of it is newer
                start = 0
            fh.seek(max(start, end - tail_bytes))
            tail = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    # Flower colours its log levels
    return [re.sub(r"\x1b\[[0-9;]*m", "", raw).strip() for raw in tail.splitlines()]


def last_error_explained(
    lines: Sequence[str], explain: Callable[[str], str | None] | None = None
) -> str | None:
    """The default reading of why a run ended (:attr:`ProcessSpec.diagnose`): the last error
    line it logged, with ``explain``'s reading of it in parentheses."""
    line = next((line[:300] for line in reversed(lines) if is_error_line(line)), None)
    if line is None:
        return None
    meaning = explain(line) if explain is not None else None
    return line + (f" ({meaning})" if meaning else "")


@dataclass(frozen=True)
class ProcessSpec:
    """A process the daemon runs next to the API (e.g. ``flower-supernode ...``).

    ``restart``: start it again (after ``backoff_s``, doubling) when it exits on its own,
    at most ``max_restarts`` times; after that, or with ``restart=False``, its exit stops the
    whole daemon (exit status 1), so a supervisor (systemd, Docker) can act on it.
    """

    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    restart: bool = True
    max_restarts: int = 5
    backoff_s: float = 2.0
    #: Upper bound of the doubling back-off (``None``: no bound).
    max_backoff_s: float | None = None
    #: Append the process's stdout and stderr to this file (``None``: inherit the daemon's).
    log_file: str | None = None
    #: What an error line of its log means for the user (``None``: nothing to add).
    explain: Callable[[str], str | None] | None = None
    #: Why a run ended, from the lines it logged (oldest first): a line and what it means,
    #: for the log and ``/status``. ``None``: its last error line, read by ``explain``
    #: (:func:`last_error_explained`); a process whose last words are often not the cause
    #: (a retry notice logged after the real refusal) gives its own.
    diagnose: Callable[[Sequence[str]], str | None] | None = None
    #: What is wrong now while it runs, from the lines the current run logged (oldest
    #: first) and the seconds since its log last grew: a line and what it means, for
    #: ``/status``; ``None``: nothing to say (or no reading, the default).
    watch: Callable[[Sequence[str], float], str | None] | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.argv:
            raise ConfigError("a managed process needs a name and a non-empty argv")
        if self.max_restarts < 0 or self.backoff_s < 0:
            raise ConfigError(f"{self.name}: max_restarts and backoff_s must be >= 0")
        if self.max_backoff_s is not None and self.max_backoff_s < 0:
            raise ConfigError(f"{self.name}: max_backoff_s must be >= 0")


#: The most exit codes a :class:`ManagedProcess` keeps (the newest): one is recorded per
#: run, and a SuperNode may be restarted up to a million times while only the last is read.
EXIT_CODES_KEPT = 100


@dataclass
class ManagedProcess:
    """Runtime state of one :class:`ProcessSpec`."""

    spec: ProcessSpec
    popen: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float | None = None
    #: The exit statuses of its runs, oldest first: the newest ``EXIT_CODES_KEPT``.
    exit_codes: list[int] = field(default_factory=list)
    #: Why it last exited: an error line its run logged, with what it means
    #: (``spec.diagnose``).
    last_error: str | None = None
    #: Where the current run's output begins in ``spec.log_file`` (its size at the start).
    log_start: int = 0
    #: The log's size when last looked at (:meth:`observe_log`), and when (``time.monotonic``)
    #: it was last seen to grow: how long the log has been quiet, whatever the wall clock
    #: does (a file's mtime is wall-clock time, which NTP may set back or forward).
    log_seen: int = 0
    log_grew_at: float = field(default_factory=time.monotonic)
    #: The run whose exit is in ``exit_codes`` already: a check that failed after recording
    #: it is retried at the next tick, which must not record the same exit again.
    recorded: subprocess.Popen[bytes] | None = None

    def state(self) -> ProcessState:
        running = self.popen is not None and self.popen.poll() is None
        return ProcessState(
            name=self.spec.name,
            running=running,
            restarts=self.restarts,
            last_exit_code=self.exit_codes[-1] if self.exit_codes else None,
            last_error=self.last_error,
            notice=self._notice() if running else None,
        )

    def _notice(self) -> str | None:
        """:attr:`ProcessSpec.watch`'s reading of the current run's log, as it is now."""
        log_file = self.spec.log_file
        if self.spec.watch is None or log_file is None:
            return None
        quiet_s = self.observe_log()
        return self.spec.watch(log_lines(log_file, start=self.log_start), quiet_s)

    def observe_log(self) -> float:
        """Seconds since the log was last seen to grow (checked now and at every monitor
        tick, so to within ``monitor_interval_s``), on the monotonic clock."""
        size = log_size(self.spec.log_file)
        now = time.monotonic()
        if size != self.log_seen:
            self.log_seen, self.log_grew_at = size, now
        return max(0.0, now - self.log_grew_at)

    def start(self) -> None:
        env = {**os.environ, **dict(self.spec.env)}
        # Linux: the child is sent SIGTERM if the daemon dies, even by SIGKILL (no orphan
        # SuperNode training without its daemon).
        # Its own process group: stopping it signals its descendants too (a SuperNode's
        # SuperExec and ClientApp processes, whose --parent-pid checks are fooled by PID reuse).
        preexec = die_with_parent if sys.platform == "linux" else None
        self.log_start = self.log_seen = log_size(self.spec.log_file)
        self.log_grew_at = time.monotonic()
        if self.spec.log_file is None:
            self.popen = subprocess.Popen(
                list(self.spec.argv),
                env=env,
                cwd=self.spec.cwd,
                preexec_fn=preexec,
                start_new_session=True,
            )
        else:
            Path(self.spec.log_file).parent.mkdir(parents=True, exist_ok=True)
            # owner-only, as the store and the ledger: the ClientApp logs in terms of the
            # user's data (a log an earlier version created with the umask's mode too)
            fd = os.open(self.spec.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_MODE)
            with open(fd, "ab") as log:
                os.fchmod(log.fileno(), PRIVATE_MODE)
                self.popen = subprocess.Popen(
                    list(self.spec.argv),
                    env=env,
                    cwd=self.spec.cwd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=preexec,
                    start_new_session=True,
                )
        self.next_start = None
        logger.info("started %s (pid %d)", self.spec.name, self.popen.pid)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM its process group, wait up to ``grace_s``, then SIGKILL; returns the exit
        status. Descendants still alive once it exited are killed too."""
        proc = self.popen
        if proc is None:
            return None
        if terminate_group(proc, grace_s):
            logger.warning("%s ignored SIGTERM for %.1f s; killed it", self.spec.name, grace_s)
        self.reap_group(min(grace_s, 2.0))
        return proc.returncode

    def reap_group(self, grace_s: float = 2.0) -> None:
        """After the process exited: let its descendants finish for ``grace_s``, then kill
        what is left of its process group."""
        if self.popen is not None:
            reap_group(self.popen.pid, grace_s)


# --------------------------------------------------------------------------- daemon


class Daemon:
    """The device side of the system; see the module docstring."""

    def __init__(
        self,
        layout: DeviceLayout,
        store: DeviceStore,
        models: SealedModelStore,
        config: DaemonConfig | None = None,
        *,
        device_id: str | None = None,
        reranker: Reranker | None = None,
        runtime: RuntimeConfig | None = None,
        lock: StateDirLock | None = None,
    ) -> None:
        self.layout = layout
        #: the state directory's single-writer lock (from :meth:`open`), released at shutdown
        self.state_lock = lock
        self._wrote_api_info = False
        self.store = store
        self.models = models
        self.config = config or DaemonConfig()
        self.device_id = device_id
        self.reranker: Reranker = reranker or BanditReranker(self.config.exploration, store)
        self.runtime = runtime or RuntimeConfig()
        self.processes: list[ManagedProcess] = []
        self.exit_code = 0
        self._lock = threading.RLock()
        # held across a whole recommendation, feedback batch or erase: an erase must not
        # interleave with a request that reads the history or writes the policy's state
        self._serve_lock = threading.RLock()
        # held across a whole erase, marker to marker: an erase that started while another
        # ran would otherwise find the marker removed by the first and run without one
        self._erase_lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self._server: uvicorn.Server | None = None
        self._monitor: threading.Thread | None = None
        self._event_listeners: list[Callable[[int], None]] = []
        self._shutdown_callbacks: list[Callable[[], None]] = []
        self._erase_callbacks: list[Callable[[], None]] = []
        self._global_model_source: Callable[[], bytes | None] | None = None
        #: How many times local data was erased (see :meth:`install_model`'s ``erasures``).
        self.erasures = 0
        self.catalog: Catalog | None = None
        #: The last history mapped to columns (:meth:`_history_columns`): its catalog, the
        #: store's history mark it was mapped at, and the (read-only) columns; in memory only.
        self._columns: tuple[Catalog, int, IntArray] | None = None
        #: Held to cache ``_columns`` (only while the history mark they were read at is still
        #: the store's) and to clear them at an erase: a read that an erase overtook (a refit,
        #: the warm-up: neither holds the serving lock) never caches the erased history.
        self._columns_lock = threading.Lock()
        #: Why ``catalog.json`` could not be loaded at open (a damaged file), until a catalog
        #: is installed: "no catalog installed" would send the user looking for a missing one.
        self.catalog_error: str | None = None
        self.model: OnDeviceModel | None = None
        self.model_info: SealedModelInfo | None = None
        self.model_error: str | None = None
        #: Set by the model refresher (the federated learner) while its refreshes fail: the
        #: last good model keeps serving, and ``/status`` says why it is not refreshed.
        self.refresh_error: str | None = None
        #: An erase interrupted by a crash was finished when the folder was opened.
        self.erase_completed_at_open = False
        self._load_installed()
        self._model_changed()
        self.layout.remove_personal_leftovers()
        self.layout.remove_stale_temps()
        if self.layout.erase_pending.exists():
            logger.warning("finishing an erase of local data that a crash interrupted")
            self.erase()
            self.erase_completed_at_open = True

    @classmethod
    def open(
        cls,
        state_dir: str | Path,
        *,
        data_key: bytes | None = None,
        passphrase: str | None = None,
        config: DaemonConfig | None = None,
        reranker: Reranker | None = None,
        runtime: RuntimeConfig | None = None,
    ) -> Daemon:
        """Open the device in ``state_dir`` (identity from ``init``; key from it unless
        ``data_key`` is given).

        Takes the directory's single-writer lock before the data key is derived or anything
        is written: :class:`StateDirInUseError` (nothing changed) while another daemon holds
        it. On any failure the lock is released. Holding it, removes an ``api.json`` that a
        killed daemon left behind.

        A damaged store raises :class:`StoreCorruptError`, unless an erase of the local data
        is pending: then its files are deleted (that is the erase) and an empty store opened.
        """
        cfg = config or DaemonConfig()
        layout = DeviceLayout(Path(state_dir))
        identity = DeviceIdentity.load(layout.state_dir) if data_key is None else None
        lock = StateDirLock.acquire(layout, role="daemon", advice=_DAEMON_ADVICE)
        try:
            # a daemon killed by SIGKILL left its api.json: it names a dead address until the
            # API is up again (readers check the lock too: `running_api`)
            remove_stale_api_info(lock)
            device_id = None
            if identity is not None:
                data_key = identity.data_key(passphrase)
                device_id = identity.device_id
            assert data_key is not None
            try:
                store = DeviceStore.open(
                    layout.store_db, data_key, max_impressions=cfg.max_impressions
                )
            except StoreCorruptError:
                if not layout.erase_pending.exists():
                    raise
                # the user asked for its contents to be erased: deleting the file does it
                logger.warning("the local store is damaged; the pending erase deletes it")
                remove_store_files(layout.store_db)
                store = DeviceStore.open(
                    layout.store_db, data_key, max_impressions=cfg.max_impressions
                )
            try:
                models = SealedModelStore(layout.models_dir, data_key, keep=cfg.keep_models)
                return cls(
                    layout,
                    store,
                    models,
                    cfg,
                    device_id=device_id,
                    reranker=reranker,
                    runtime=runtime,
                    lock=lock,
                )
            except BaseException:
                store.close()
                raise
        except BaseException:
            lock.release()
            raise

    def _load_installed(self) -> None:
        """Load the catalog and current model; a bad model is logged and reported, not fatal
        (the API must stay up so the user can still erase data or get a new model)."""
        self._finish_catalog_change()
        if self.layout.catalog.exists():
            try:
                self.catalog = Catalog.load(self.layout.catalog)
            except DataError as exc:  # the API stays up: erase and reinstall still work
                self.catalog_error = str(exc)
                self.model_error = f"{exc}; {REINSTALL_ADVICE}"
                logger.error("the installed catalog is unusable: %s", exc)
                return
        try:
            loaded = self.models.load(catalog=self.catalog, runtime=self.runtime)
        except ModelFileError as exc:
            self.model_error = str(exc)
            logger.error("the installed model is unusable: %s", exc)
            return
        if loaded is not None:
            self.model_info, self.model = loaded
            if self.catalog is None:
                self.model_error = f"{self.layout.catalog} is missing; {REINSTALL_ADVICE}"
                logger.error("the installed model has no catalog: %s", self.layout.catalog)

    # -- installing ---------------------------------------------------------------------------

    def install_model(
        self,
        data: bytes,
        catalog: Catalog | None = None,
        *,
        name: str | None = None,
        erasures: int | None = None,
    ) -> SealedModelInfo:
        """Validate, seal and switch to a new model (and its catalog, if given); ``name``
        (e.g. the file it was read from) is what errors call it.

        The model must match the catalog (given, or the installed one). Raises
        :class:`ModelFileError` / :class:`NoCatalogError` and changes nothing on failure.
        ``erasures``: the :attr:`erasures` count when the model's inputs were read; a model
        built from local data read before an erase since is refused
        (:class:`StaleModelError`), so an erase cannot be undone by a refit in flight.

        The model is validated (an ONNX Runtime session and a probe: the slow part) before
        the daemon's lock is taken, so recommendations and ``/status`` do not wait for it;
        the lock covers the rest (the checks again, the numbering, the sealed write and the
        switch), so installs still take effect one at a time, in increasing versions, and
        an erase still comes wholly before or after one. The rest also waits for a
        recommendation or feedback batch in flight (the serve lock, taken first as they
        do): one that read the old model must not have its candidates ranked, or its
        feedback learned, by a policy already switched to the new model and catalog.
        """
        with self._lock:  # a refit already stale is refused before it is loaded
            validated_for = self._install_catalog(catalog, erasures)
        model = self.models.validate(data, catalog=validated_for, runtime=self.runtime, name=name)
        with self._serve_lock, self._lock:
            catalog = self._install_catalog(catalog, erasures)
            if catalog is not validated_for:  # another install changed the catalog meanwhile
                model = self.models.validate(data, catalog=catalog, runtime=self.runtime, name=name)
            if catalog == self.catalog:  # a refit's own copy of the same ids: kept as is
                catalog = self.catalog
            new_catalog = catalog is not self.catalog
            if new_catalog:  # it waits beside the old one until the model is current
                catalog.save(self.layout.catalog_pending)
            try:
                info, model = self.models.seal(data, model)
            except BaseException:
                if new_catalog:
                    self.layout.catalog_pending.unlink(missing_ok=True)
                raise
            if new_catalog:
                self._adopt_pending_catalog()
            self._record_sealed(info)
            self.catalog, self.model, self.model_info, self.model_error = catalog, model, info, None
            self.catalog_error = None
            self._model_changed()
            logger.info("installed model %s as sealed v%d", info.model_version, info.version)
            return info

    def _install_catalog(self, catalog: Catalog | None, erasures: int | None) -> Catalog:
        """The catalog :meth:`install_model` installs against (``catalog``, else the installed
        one), after its checks: :class:`StaleModelError` for a refit of erased data,
        :class:`NoCatalogError` without a catalog (saying so when the installed one is damaged).
        Called with the lock held."""
        if erasures is not None and erasures != self.erasures:
            raise StaleModelError(
                "the model was fitted on local data that has been erased since; not installed"
            )
        return catalog or self._require_catalog(
            "",
            "no catalog installed: install the model together with its catalog "
            "(`fedrec client install-model --catalog catalog.json`)",
        )

    def _require_catalog(self, consequence: str, missing: str) -> Catalog:
        """The installed catalog, else :class:`NoCatalogError`: for a damaged one its cause,
        then ``consequence`` and the repair ("no catalog installed" would send the user after
        one that is there); ``missing`` when none was ever installed."""
        if self.catalog is not None:
            return self.catalog
        if self.catalog_error is not None:
            raise NoCatalogError(
                f"the installed catalog is damaged: {self.catalog_error}{consequence}; "
                f"{REINSTALL_ADVICE}"
            )
        raise NoCatalogError(missing)

    def _finish_catalog_change(self) -> None:
        """Complete or undo an install with a new catalog that a crash interrupted: the new
        catalog becomes current if the current model was built for it, else it is dropped
        (the model switch never happened), so model and catalog always match."""
        pending = self.layout.catalog_pending
        if not pending.exists():
            return
        try:
            catalog = Catalog.load(pending)
            loaded = self.models.load(runtime=self.runtime)
        except (DataError, ModelFileError) as exc:
            logger.warning("dropping %s from an interrupted install (%s)", pending, exc)
            pending.unlink(missing_ok=True)
            return
        if loaded is not None and loaded[1].metadata.catalog_fingerprint == catalog.fingerprint:
            self._adopt_pending_catalog()
            logger.info("completed an interrupted install: its new catalog is now current")
        else:
            pending.unlink()
            logger.info("dropped the new catalog of an install that never switched models")

    def _adopt_pending_catalog(self) -> None:
        """Make ``catalog.pending.json`` the current catalog, durably."""
        os.replace(self.layout.catalog_pending, self.layout.catalog)
        fsync_dir(self.layout.state_dir)

    def _model_changed(self) -> None:
        if isinstance(self.reranker, LearningReranker):
            self.reranker.on_model(self.model)

    def install_catalog(self, catalog: Catalog) -> None:
        """Install a catalog alone (before the first model). Refused if it does not match
        the installed model."""
        with self._lock:
            if self.model is not None and (
                self.model.metadata.catalog_fingerprint != catalog.fingerprint
            ):
                raise ModelFileError(
                    f"catalog {catalog.fingerprint} does not match the installed model's "
                    f"catalog {self.model.metadata.catalog_fingerprint}; install a model "
                    f"together with its catalog instead"
                )
            catalog.save(self.layout.catalog)
            self.catalog, self.catalog_error = catalog, None

    # -- API operations -------------------------------------------------------------------------

    def add_events(self, events: Sequence[Event]) -> int:
        """Store a batch atomically; unknown items refuse the whole batch (422)."""
        catalog = self._require_catalog(
            ", so item ids cannot be checked",
            "no catalog installed yet, so item ids cannot be checked; install a model "
            "with its catalog first (`fedrec client install-model`)",
        )
        unknown = catalog.unknown(e.item_id for e in events)
        if unknown:
            shown = ", ".join(repr(i) for i in unknown[:20])
            more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
            raise UnknownItemsError(
                unknown,
                f"{len(unknown)} item id(s) are not in the catalog ({len(catalog)} items): "
                f"{shown}{more}; nothing of this batch was stored — send the dataset's raw item "
                f"ids, without the unknown ones",
            )
        ids = self.store.add_events(events)
        if ids:
            self.on_new_events(len(ids))
        return len(ids)

    def on_new_events(self, count: int) -> None:
        """Hook: ``count`` new events were durably stored and counted as adaptation pending.

        The few-shot adaptation registers itself with :meth:`add_new_events_listener` (or
        a subclass overrides this). Listeners run in the request's thread and must be quick
        (schedule work, don't do it); their errors are logged, never returned to the app.
        """
        for listener in list(self._event_listeners):
            try:
                listener(count)
            except Exception:
                logger.exception("new-events listener %r failed", listener)

    def add_new_events_listener(self, listener: Callable[[int], None]) -> None:
        self._event_listeners.append(listener)

    def add_shutdown_callback(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` at shutdown, before the processes stop and the store closes
        (background services that use the store stop here)."""
        self._shutdown_callbacks.append(callback)

    def history(self, catalog: Catalog | None = None) -> list[int]:
        """The local history as columns of ``catalog`` (default: the installed one), oldest
        first (unknown items skipped). Pass the catalog of the model it is scored with: a
        model and catalog switch may land in between."""
        catalog = catalog or self.catalog
        return [] if catalog is None else self._history_columns(catalog).tolist()

    def _history_columns(self, catalog: Catalog) -> IntArray:
        """:meth:`history` as a read-only array, mapped again only once the events changed
        (:meth:`DeviceStore.history_mark`) or for another catalog: a request reads it as is.
        Catalogs are told apart by their item ids, not by object: a refit builds its own from
        the bundle, with the installed one's ids, and compared as objects it evicted the
        served history's columns, so the next request mapped the whole history again."""
        mark = self.store.history_mark()  # before the events: a write in between maps again
        mapped = self._columns
        if (
            mapped is not None
            and mapped[1] == mark
            and (mapped[0] is catalog or mapped[0].item_ids == catalog.item_ids)
        ):
            return mapped[2]
        out = []
        for event in self.store.events():
            col = catalog.dense(event.item_id)
            if col is None:  # only after a catalog change dropped the item
                logger.debug("history item %r is not in the current catalog", event.item_id)
            else:
                out.append(col)
        columns = np.asarray(out, dtype=np.int64)
        columns.setflags(write=False)
        with self._columns_lock:
            if self.store.history_mark() == mark:  # else the events changed (an erase) since
                self._columns = (catalog, mark, columns)
        return columns

    def recommend(self, k: int | None = None) -> Recommendation:
        """Top-``k`` items for the local history (history excluded), re-ranked by the policy;
        ``k`` defaults to the policy's ``bandit-slate-size``."""
        if k is None:
            k = self.config.exploration.slate_size
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        with self._serve_lock:
            return self._recommend(k)

    def _recommend(self, k: int) -> Recommendation:
        with self._lock:
            model, info, catalog = self.model, self.model_info, self.catalog
        if model is None or info is None or catalog is None:
            why = (
                f" (the installed one is unusable: {self.model_error})" if self.model_error else ""
            )
            raise NoModelError(
                f"no model is installed on this device yet{why}; recommendations are available "
                f"once the first federated round delivered one (or after `fedrec client "
                f"install-model`)"
            )
        history = self._history_columns(catalog)
        scores = model.score([history[-model.max_len :]])[0].astype(np.float32)
        available = np.ones(model.n_items, dtype=bool)
        available[history] = False
        columns = np.flatnonzero(available)
        pool = min(max(k, self.config.candidate_pool), columns.size)
        rec_id = uuid.uuid4().hex
        chosen: list[int] = []
        policy = self.reranker.name
        if pool > 0:
            top = columns[np.argpartition(-scores[columns], pool - 1)[:pool]]
            candidates = top[np.lexsort((top, -scores[top]))].astype(np.int64)
            chosen, policy = self._rerank(candidates, scores[candidates], min(k, pool), rec_id)
        now = time.time()
        items = tuple(
            RecommendedItem(catalog.item_ids[c], rank, float(scores[c]))
            for rank, c in enumerate(chosen, start=1)
        )
        self.store.record_impressions(
            [Impression(rec_id, it.item_id, it.rank, it.score, now) for it in items]
        )
        return Recommendation(rec_id, info.model_version, info.version, policy, items)

    def _rerank(
        self, candidates: IntArray, scores: FloatArray, k: int, rec_id: str
    ) -> tuple[list[int], str]:
        """The list to serve and the name of the policy that ordered it: the model's order
        (``greedy``) when the configured policy failed, so that the response does not credit
        it with a list it did not choose (and whose feedback it does not learn from)."""
        greedy = GreedyReranker()
        reranker = self.reranker
        try:
            if isinstance(reranker, LearningReranker):
                picked = reranker.rerank(candidates, scores, k, slate_id=rec_id)
            else:
                picked = reranker.rerank(candidates, scores, k)
            out = [int(c) for c in picked]
        except Exception:
            logger.exception("reranker %s failed; serving the model's order", reranker.name)
            return list(greedy.rerank(candidates, scores, k)), greedy.name
        allowed = set(candidates.tolist())
        if len(out) > k or len(set(out)) != len(out) or not set(out) <= allowed:
            logger.error(
                "reranker %s returned %d items (k=%d, duplicates or non-candidates); serving "
                "the model's order",
                reranker.name,
                len(out),
                k,
            )
            return list(greedy.rerank(candidates, scores, k)), greedy.name
        return out, reranker.name

    def add_feedback(self, feedback: Sequence[Feedback]) -> int:
        """Store feedback; the whole batch is refused (422) if any pair was never shown.

        A click is also behaviour: its first report adds a ``click`` event to the history
        (:meth:`DeviceStore.add_feedback`), so the next few-shot adaptation fits it and the
        item is not recommended again; the app need not post it to ``/events`` as well.

        Stored feedback then updates a learning policy at once (``clicked`` = 1, ``shown`` =
        0: seen and not clicked), once per impression (recommendation, item): a report
        repeated or retried later is stored but not learned from again, and within one batch
        a click beats "shown". A report whose ``feedback_id`` was stored before is not
        stored again (a batch retried after a lost reply); the count returned leaves it out.
        A policy failure is logged, never lost feedback: the store already has it.
        """
        with self._serve_lock:
            return self._add_feedback(feedback)

    def _add_feedback(self, feedback: Sequence[Feedback]) -> int:
        # an impression is learned from once: a retried or repeated report is stored only
        earlier = self.store.reported([(fb.recommendation_id, fb.item_id) for fb in feedback])
        stored = self.store.add_feedback(feedback)
        if stored.duplicates:
            # a report skipped for its id is learned from only if its impression was stored
            # (it may still wait: the retry follows a crash); one that reused the id of
            # another impression's report was not stored, so it teaches nothing
            skipped = set(stored.duplicates)
            feedback = [
                fb
                for i, fb in enumerate(feedback)
                if i not in skipped or (fb.recommendation_id, fb.item_id) in earlier
            ]
        if stored.click_events:  # clicks join the history: the next adaptation fits them
            self.on_new_events(len(stored.click_events))
        reranker, catalog = self.reranker, self.catalog
        if isinstance(reranker, LearningReranker) and catalog is not None:
            reward: dict[tuple[str, str], float] = {}  # per impression; a click beats "shown"
            for fb in feedback:
                pair = (fb.recommendation_id, fb.item_id)
                reward[pair] = max(reward.get(pair, 0.0), float(fb.action == "clicked"))
            shown = [
                (col, pair, value)
                for pair, value in reward.items()
                if (col := catalog.dense(pair[1])) is not None
            ]
            try:
                # a pair stored before is learned from only if its impression still waits:
                # the process died between storing it and saving the posterior
                waits = reranker.awaiting([c for c, _, _ in shown], [p[0] for _, p, _ in shown])
                learn = [s for s, w in zip(shown, waits, strict=True) if s[1] not in earlier or w]
                columns = [col for col, _, _ in learn]
                rewards = [value for _, _, value in learn]
                slates: list[str | None] = [pair[0] for _, pair, _ in learn]
                reranker.observe(columns, rewards, slates)
            except Exception:
                logger.exception(
                    "exploration policy %s failed to learn from feedback", reranker.name
                )
        return len(stored.ids)

    def status(self) -> DeviceStatus:
        from client.device.training import FederatedFiles

        # catch the counters up with the training process's file first: without a learner
        # (`serve-api` alone), or before its first tick, nothing else does
        try:
            self.store.sync_rounds_joined(*FederatedFiles(self.layout.state_dir).joined_counts())
        except DataError as exc:
            logger.warning("rounds joined not synced for /status (%s)", exc)
        stats = self.store.stats()
        spent, privacy_error, budget = self._privacy_spent(stats.rounds_joined)
        with self._lock:
            model, info, catalog = self.model, self.model_info, self.catalog
        return DeviceStatus(
            device_id=self.device_id,
            model_version=model.metadata.model_version if model else None,
            sealed_version=info.version if info else None,
            model_error=self.model_error,
            catalog_items=len(catalog) if catalog else None,
            rounds_joined=stats.rounds_joined,
            epsilon_spent=spent,
            rounds_without_dp=stats.rounds_without_dp,
            epsilon_budget=budget.epsilon,
            delta=budget.delta,
            privacy_error=privacy_error,
            events=stats.events,
            feedback=stats.feedback,
            adaptation_pending=stats.adaptation_pending,
            policy=self.reranker.name,
            processes=tuple(proc.state() for proc in self.processes),
            refresh_error=self.refresh_error,
        )

    def _privacy_spent(self, rounds_joined: int) -> tuple[float | None, str | None, PrivacyBudget]:
        """Epsilon spent per the ledger file (written by the training process), at the delta
        of the budget that process enforces (recorded in the file; the daemon's configured
        one until the first round), that budget, and any error reading it: a missing ledger
        of a device that took part in ``rounds_joined`` > 0 rounds is one (it was lost, and
        the training process declines to train). The import is lazy because the accountant
        pulls in torch."""
        from client.device.training import missing_ledger_reason
        from shared.privacy.ledger import PrivacyLedger

        budget = PrivacyBudget(self.config.privacy_epsilon, self.config.privacy_delta)
        if rounds_joined and not self.layout.ledger.exists():
            reason = missing_ledger_reason(self.layout, rounds_joined)
            logger.error("%s", reason)
            return None, reason, budget
        try:
            ledger = PrivacyLedger.open(self.layout.ledger, budget)
        except DataError as exc:
            logger.error("privacy ledger unreadable: %s", exc)
            return None, str(exc), budget
        recorded = ledger.recorded_budget
        # the tighter of what the last round enforced and the cap the owner set since
        enforced = (
            PrivacyBudget(min(recorded.epsilon, budget.epsilon), min(recorded.delta, budget.delta))
            if recorded is not None
            else budget
        )
        return ledger.epsilon(delta=enforced.delta), None, enforced

    def erase(self) -> None:
        """Delete all local user data (see the module docstring for what is kept and why).

        Every sealed model file goes, since an adapted model is personal data; the newest
        global model (what every device of the federation got: not personal) is installed
        first, before this returns, so the device keeps recommending and no request after
        the erase is served an older model. It comes from the global model source
        (:meth:`set_global_model_source`: the federated learner rebuilds it from the global
        parameters it kept, with no adapter), else it is the newest sealed model that is not
        personal. A marker file makes the erase all-or-nothing across a crash: the next open
        finishes it. Erases run one at a time (a retried ``DELETE /data`` waits for the
        first), each from its own marker to its removal."""
        with self._erase_lock:
            self._erase()

    @property
    def erasing(self) -> bool:
        """Whether an erase is running (background work on the local data gives way to it)."""
        return self._erase_lock.locked()

    def _erase(self) -> None:
        marker = self.layout.erase_pending
        write_bytes_atomic(marker, b"")
        self._run_erase_callbacks()  # derived personal data first: see add_erase_callback
        with self._serve_lock, self._lock:
            global_model = self._global_model()
            if not self.store.erase():
                self._scrub_later()
            with self._columns_lock:  # the erased history's columns leave memory too
                self._columns = None
            # counted once the data is gone (readers of the history do not take the lock):
            # whoever reads the new count reads an erased store, and a refit that read the
            # old count is refused at install (which waits for this lock)
            self.erasures += 1
            self.model = None
            self.model_info = None
            self.model_error = None
            if isinstance(self.reranker, LearningReranker):
                self.reranker.reset()
                self.reranker.on_model(None)
            kept = None
            try:  # erasing must not fail on the reinstall (nor on a full disk sealing it)
                if global_model is not None and self.catalog is not None:
                    kept = self.install_model(global_model, self.catalog).version
                elif global_model is not None:  # kept, not served, until a catalog is back
                    kept = self._reseal_without_catalog(global_model)
            except (FedRecError, OSError) as exc:
                self.model_error = f"the global model could not be reinstalled: {exc}"
            self.models.erase(keep=kept)  # the personal versions, once a global one serves
            self.layout.remove_personal_leftovers()
            self._empty_process_logs()
        self._run_erase_callbacks()
        marker.unlink(missing_ok=True)
        fsync_dir(self.layout.state_dir)
        logger.warning("local data erased (identity, catalog and privacy ledger kept)")

    def _empty_process_logs(self) -> None:
        """Empty the managed processes' logs and ``logs/supernode.log``: the ClientApp logs
        why it declined or failed in terms of this user's data (how many events, the epsilon
        spent), which the erase must not leave behind. The SuperNode's log is emptied even
        when no SuperNode is registered: under ``serve-api``, or finishing at open an erase
        that a crash interrupted, it still holds what an earlier ``start`` logged. They
        append (``O_APPEND``), so a running process goes on writing from the new, empty
        start. Each is synced once emptied: the marker that finishes an interrupted erase goes
        next, and a truncation, like an unlink, is durable only once synced."""
        logs = [proc.spec.log_file for proc in self.processes if proc.spec.log_file]
        for log_file in dict.fromkeys([*logs, str(self.layout.supernode_log)]):
            try:
                truncate_durably(log_file)
            except FileNotFoundError:
                pass
            except OSError as exc:  # the erase itself stands; say what is left
                logger.warning("could not empty %s after the erase: %s", log_file, exc)
        for proc in self.processes:
            proc.log_start = 0

    def _reseal_without_catalog(self, data: bytes) -> int:
        """Seal the global model ``data`` as current while no catalog is installed: it is not
        personal data, so an erase keeps it, and it serves again once the catalog is back
        (the same repair as at open). Returns its sealed version."""
        info, _ = self.models.install(data, runtime=self.runtime)
        self._record_sealed(info)
        self.model_info = info
        self.model_error = (
            f"{self.layout.catalog} is missing; the global model {info.model_version} is "
            f"kept and serves once its catalog is back: {REINSTALL_ADVICE}"
        )
        return info.version

    def _record_sealed(self, info: SealedModelInfo) -> None:
        """Note a newly sealed model in the store's model history, which keeps the records
        of the sealed versions still on disk only."""
        self.store.record_model(
            ModelRecord(info.version, info.model_version, info.sha256, info.sealed_at),
            kept=self.models.versions(),
        )

    def _scrub_later(self) -> None:
        """Retry removing the erased pages from disk until the reader holding them back (the
        federated client mid-fit) is done, or compacting the file until there is room for
        it; they are encrypted meanwhile, and unreadable through the store."""
        logger.warning(
            "erased data is unreadable but may still be on disk while another process reads "
            "the store (or until the file can be compacted); it is removed as soon as that "
            "read ends"
        )

        def retry() -> None:
            while self.store.scrub_pending and not self._stop.wait(1.0):
                try:
                    done = self.store.scrub(wait=False)
                except Exception:  # the store closed under it: closing checkpoints too
                    logger.debug("scrub retry stopped", exc_info=True)
                    return
                if done:
                    logger.info("the erased data's pages are now removed from disk")

        threading.Thread(target=retry, name="fedrec-scrub", daemon=True).start()

    def _run_erase_callbacks(self) -> None:
        for callback in list(self._erase_callbacks):
            try:
                callback()
            except Exception:
                logger.exception("erase callback %r failed", callback)

    def set_global_model_source(self, source: Callable[[], bytes | None]) -> None:
        """Make ``source`` what :meth:`erase` installs: the ONNX bytes of the newest global
        model, without a personal adapter (``None``: it has none; the newest sealed model
        that is not personal serves then). The federated learner registers one: the global
        models it receives are only ever sealed with the adapter, so the newest one not
        personal can be far older (the bundle's, version 0). It is called under the daemon's
        lock, so it must not wait for anything that waits for that lock."""
        self._global_model_source = source

    def _global_model(self) -> bytes | None:
        """The newest global model (ONNX bytes) for :meth:`erase`, ``None`` if there is none:
        from the global model source, else the newest sealed one that is not personal."""
        source = self._global_model_source
        if source is not None:
            try:
                data = source()
            except Exception:  # erasing must not fail on it: the sealed one serves
                logger.exception("rebuilding the newest global model for the erase failed")
            else:
                if data is not None:
                    return data
        return self._newest_global_model()

    def _newest_global_model(self) -> bytes | None:
        """The ONNX bytes of the newest sealed model that is not personal (``None``: none)."""
        for version in reversed(self.models.versions()):
            try:
                info, data = self.models.read(version)
            except ModelFileError:
                continue
            if not info.model_version.endswith(PERSONAL_SUFFIX):
                return data
        return None

    def add_erase_callback(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in :meth:`erase` (services holding state derived from the user's
        data delete or reset it there; the federated learner schedules a reinstall of the
        global model and drops its pending adaptation).

        It runs twice, so it must be idempotent: before the store is erased (a crash in
        between then leaves the user's data, which a repeated erase removes, never a model
        fitted on data the user was told is gone) and after (dropping anything derived in
        between). Both calls are outside the daemon's lock: a callback may wait for a
        refit that is itself waiting for that lock. If opening the folder finished an erase
        that a crash interrupted, it also runs once now."""
        self._erase_callbacks.append(callback)
        if self.erase_completed_at_open:
            try:
                callback()
            except Exception:
                logger.exception("erase callback %r failed", callback)

    # -- processes and lifecycle ----------------------------------------------------------------

    def add_process(self, spec: ProcessSpec) -> None:
        """Register a process to run next to the API (started by :meth:`run`)."""
        if any(p.spec.name == spec.name for p in self.processes):
            raise ConfigError(f"a managed process named {spec.name!r} is already registered")
        self.processes.append(ManagedProcess(spec))

    def request_stop(self, reason: str = "requested", exit_code: int | None = None) -> None:
        """Ask :meth:`run` to shut down (thread- and signal-safe, idempotent)."""
        if exit_code is not None and not self._stop.is_set():
            self.exit_code = exit_code
        if not self._stop.is_set():
            logger.info("stopping the daemon: %s", reason)
        self._stop.set()
        server = self._server
        if server is not None:
            server.should_exit = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop(f"signal {signal.Signals(signum).name}")

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the daemon cleanly (main thread only)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)

    def run(
        self,
        *,
        api: bool = True,
        token: str | None = None,
        on_ready: Callable[[str], None] | None = None,
    ) -> int:
        """Start the processes, serve the API until stopped, shut down; the exit status.

        ``on_ready`` gets the API's URL once it listens (the CLI tells the user where)."""
        if api and not token:
            token = DeviceIdentity.load(self.layout.state_dir).api_token()
        self.install_signal_handlers()
        threading.Thread(target=self._warm_up, name="fedrec-warm-up", daemon=True).start()
        try:
            for proc in self.processes:
                proc.start()
            self._monitor = threading.Thread(
                target=self._monitor_loop, name="fedrec-monitor", daemon=True
            )
            self._monitor.start()
            if api and not self._stop.is_set():
                assert token is not None
                self.serve_api(token, on_ready)
            else:
                self._stop.wait()
        finally:
            self.shutdown()
        return self.exit_code

    def _warm_up(self) -> None:
        """Import the privacy accountant (it pulls in torch) and decrypt the history into
        memory off the request path (the first recommendation would, for tenths of a second
        at tens of thousands of events). A failure here is the request's to report."""
        with contextlib.suppress(Exception):
            import shared.privacy.ledger  # noqa: F401
        with contextlib.suppress(Exception):
            self.history()

    def bind_socket(self) -> socket.socket:
        """Bind the API socket (so the real port is known before serving, e.g. for port 0)
        and listen on it: a client that reads ``api.json`` (written next) is queued until the
        server accepts, instead of refused while it starts."""
        host, port = self.config.host, self.config.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(socket.SOMAXCONN)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                advice = "another program holds it; pick another port with --port"
            else:
                advice = "give an address of this machine with --host"
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); {advice}"
            ) from exc
        sock.set_inheritable(True)
        return sock

    def serve_api(self, token: str, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve the local API with uvicorn until :meth:`request_stop` (blocks)."""
        import uvicorn

        from client.device.api import ApiConfig, create_app

        app = create_app(
            self,
            token,
            config=ApiConfig.from_daemon(self.config),
            token_hint=str(self.layout.api_token),
        )
        sock = self.bind_socket()
        host, port = sock.getsockname()[:2]
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level=self.config.log_level,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=max(1, int(self.config.shutdown_grace_s)),
            )
        )
        self._server = server
        url = api_url(host, port)
        write_json_atomic(
            self.layout.api_info, {"host": host, "port": port, "url": url, "pid": os.getpid()}
        )
        self._wrote_api_info = True
        if on_ready is not None:
            on_ready(url)
        if self._stop.is_set():
            server.should_exit = True
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()
            self._server = None

    def _monitor_loop(self) -> None:
        """Check the managed processes every ``monitor_interval_s`` until stopped.

        A check that raises (an OSError reading a process's state, a bug) is logged with its
        traceback and monitoring goes on: a dead monitor thread would never restart a
        SuperNode that exited, nor stop the daemon, while ``/status`` looked healthy. Checks
        that fail :data:`MONITOR_FAILURES_TO_STOP` ticks in a row stop the daemon (status 1),
        saying why."""
        interval = self.config.monitor_interval_s
        failed_ticks = 0
        while not self._stop.wait(interval):
            failure: Exception | None = None
            for proc in self.processes:
                try:
                    self._check_process(proc)
                except Exception as exc:
                    failure = exc
                    logger.exception("checking the managed processes failed (%s)", proc.spec.name)
            failed_ticks = failed_ticks + 1 if failure is not None else 0
            if failed_ticks >= MONITOR_FAILURES_TO_STOP:
                reason = (
                    f"the managed processes could not be checked {failed_ticks} times in a "
                    f"row (last: {failure!r}); their tracebacks are in this log"
                )
                logger.error("stopping the daemon: %s", reason)
                self.request_stop(reason, exit_code=1)
                return

    def _check_process(self, proc: ManagedProcess) -> None:
        if proc.spec.log_file is not None:
            dropped = trim_log(proc.spec.log_file, self.config.max_log_bytes)
            proc.log_start = max(0, proc.log_start - dropped)
        now = time.monotonic()
        if proc.next_start is not None:
            if now >= proc.next_start and not self._stop.is_set():
                try:
                    proc.start()
                except OSError as exc:
                    logger.error("cannot restart %s: %s", proc.spec.name, exc)
                    self.request_stop(f"{proc.spec.name} cannot start", exit_code=1)
            return
        if proc.popen is None:
            return
        if proc.popen.poll() is None:
            if proc.spec.watch is not None:
                proc.observe_log()  # when its log grows, for the notice's quiet time
            return
        code = proc.popen.returncode
        if proc.recorded is not proc.popen:
            proc.exit_codes.append(code)
            del proc.exit_codes[:-EXIT_CODES_KEPT]
            proc.recorded = proc.popen
        proc.reap_group(0.5)
        spec = proc.spec
        lines = log_lines(spec.log_file, start=proc.log_start)  # this run's output only
        if spec.diagnose is not None:
            proc.last_error = spec.diagnose(lines)
        else:
            proc.last_error = last_error_explained(lines, spec.explain)
        why = f" ({proc.last_error})" if proc.last_error else ""
        if spec.restart and proc.restarts < spec.max_restarts:
            delay = spec.backoff_s * (2 ** min(proc.restarts, 30))
            if spec.max_backoff_s is not None:
                delay = min(delay, spec.max_backoff_s)
            proc.restarts += 1
            proc.next_start = now + delay
            logger.warning(
                "%s exited with status %d%s; restart %d/%d in %.1f s",
                spec.name,
                code,
                why,
                proc.restarts,
                spec.max_restarts,
                delay,
            )
        else:
            logger.error("%s exited with status %d%s; stopping the daemon", spec.name, code, why)
            self.request_stop(f"{spec.name} exited", exit_code=1)

    def shutdown(self) -> None:
        """Stop processes, close the store, remove ``api.json`` if this daemon wrote it, release
        the state directory's lock (idempotent)."""
        self.request_stop("shutdown")
        if self._closed:
            return
        self._closed = True
        try:
            for callback in list(self._shutdown_callbacks):
                try:
                    callback()
                except Exception:
                    logger.exception("shutdown callback %r failed", callback)
            if self._monitor is not None:
                self._monitor.join(timeout=5)
            for proc in self.processes:
                code = proc.stop(self.config.shutdown_grace_s)
                logger.info("%s stopped (status %s)", proc.spec.name, code)
            with self._lock:
                self.store.close()
            if self._wrote_api_info:  # never another daemon's (one that failed to start)
                self.layout.api_info.unlink(missing_ok=True)
        finally:
            if self.state_lock is not None:
                self.state_lock.release()

    close = shutdown

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
