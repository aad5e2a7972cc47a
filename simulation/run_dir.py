"""A simulation's run directory: resolved config, ``metrics.jsonl``, TensorBoard logs,
checkpoints, plots and the report, all under one folder.

Metrics are appended one JSON object per line and flushed at once, so a crash loses at most
the line being written; TensorBoard gets the same scalars, each step once: a resumed process
does not write again what an earlier one logged (its pretraining at step 0), and the rounds
it runs again (those after the checkpoint it resumed from) replace the earlier ones
(:meth:`RunDirectory.resume_at`). TensorBoard is a view of ``metrics.jsonl``: a file it
cannot write (a full disk) stops it, with a warning, and not the run.

One run uses a folder at a time (a lock, :data:`LOCK_FILE`): two would interleave their
metrics and overwrite each other's checkpoints and ledgers.

A run directory is also what a rerun resumes from (its checkpoints and the virtual devices'
privacy ledgers), so :meth:`RunDirectory.claim` refuses settings that differ from the stored
ones in anything but the keys a resume may change: a checkpoint trained on another split, or
without DP, must never be continued and reported under new labels.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from shared.config import is_int
from shared.errors import ConfigError, FedRecError
from shared.io import (
    REPORT_MODE,
    SHARED_FILE_MODE,
    append_line,
    ensure_dir,
    lock_holder,
    make_dirs_durable,
    read_json,
    try_lock,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
NEW_RUN_FIX = "Pass another --name to start a fresh run"
"""What to do about unreadable run settings when starting a run."""
DATA_SECTION = "data"
"""The section of ``config.json`` recording the data a run trains on
(:meth:`RunDirectory.claim_data`)."""
LOCK_FILE = ".lock"
"""Held (``flock``) by the run using the folder; holds its pid."""
_RUN_ENTRIES = (
    CONFIG_FILE,
    LOCK_FILE,
    "checkpoints",
    "plots",
    "metrics.jsonl",
    "tensorboard",
    "models",
    "summary.json",
    "report.md",
    "bundle.pt",
    "deploy-bundle.pt",
    "ranks.npz",
    "recs.csv",
)
"""What a run writes at the top of its folder before any progress (clients/ is progress)."""


class RunDirectoryInUse(ConfigError):
    """The run directory is held by another run (its lock, :data:`LOCK_FILE`)."""


def has_progress(root: Path) -> bool:
    """Whether the run directory ``root`` holds something a rerun resumes from: a
    checkpoint, or a virtual device's state (its privacy ledger). Reads only, so it also
    answers for a directory this process has not opened."""
    checkpoints = root / "checkpoints"
    return (checkpoints.is_dir() and any(checkpoints.iterdir())) or (root / "clients").exists()


def recorded_fingerprint(stored: Mapping[str, Any] | None) -> str | None:
    """The data content fingerprint a run's settings (``stored``: its ``config.json``)
    recorded (:meth:`RunDirectory.claim_data`), or ``None`` (older code recorded none)."""
    section = (stored or {}).get(DATA_SECTION)
    recorded = section.get("fingerprint") if isinstance(section, dict) else None
    return recorded if isinstance(recorded, str) else None


def check_data(
    root: Path, stored: Mapping[str, Any] | None, fingerprint: str, what: str, why: str
) -> None:
    """Refuse (:class:`ConfigError`) data whose content ``fingerprint`` differs from the one
    the run in ``root`` recorded (``stored``: its ``config.json``, see
    :meth:`RunDirectory.claim_data`); ``what`` names the data, ``why`` ends the error (what
    the run's files would be used for on other data, and what to do). A run that recorded
    none (older code) is not compared."""
    refuse_other_data(f"{root} holds a run", recorded_fingerprint(stored), fingerprint, what, why)


def refuse_other_data(
    subject: str, recorded: str | None, fingerprint: str, what: str, why: str
) -> None:
    """Refuse (:class:`ConfigError`) data of content ``fingerprint`` for ``subject`` (a run,
    a model: "PATH was") that recorded it was trained on data of content ``recorded``;
    ``what`` names the data, ``why`` ends the error. ``None`` (older code recorded none) is
    not compared."""
    if recorded is not None and recorded != fingerprint:
        raise ConfigError(
            f"{subject} trained on other data than {what} holds now (its content "
            f"fingerprint {recorded}, now {fingerprint}): {why}"
        )


class RunDirectory:
    """Owns the layout of one run's folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.created = not self.root.exists()
        # the folders above it that this run creates (e.g. ./runs), removed with it if empty
        self._created_parents = [p for p in self.root.parents if not p.exists()]
        # in a folder that existed, what this run adds: a failed start removes only that
        self._added = [self.root / name for name in _RUN_ENTRIES if not (self.root / name).exists()]
        for folder in (self.root, self.checkpoints, self.plots):
            ensure_dir(
                folder,
                what="the run directory",
                fix="pass --run-dir a writable folder, or another --name",
            )
        self._lock = try_lock(self.root / LOCK_FILE)
        if self._lock is None:
            raise RunDirectoryInUse(
                f"{self.root} is in use by another run (pid "
                f"{lock_holder(self.root / LOCK_FILE)}); two runs in one folder would mix "
                "their metrics, checkpoints and ledgers. Wait for it to end, or pass another "
                "--name"
            )
        self._tb: Any = None
        # what earlier processes logged (event, step), read before this one logs anything
        self._earlier: set[tuple[str, int]] | None = None
        # TensorBoard hides the earlier processes' points from this step on (resume_at)
        self._purge_from: int | None = None

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def write_config(self, config: Mapping[str, Any]) -> None:
        write_json_atomic(self.root / CONFIG_FILE, dict(config), mode=REPORT_MODE)

    def stored_config(self) -> dict[str, Any] | None:
        """The settings a previous run left here, or ``None`` (a new directory)."""
        return self.read_config(self.root)

    @staticmethod
    def read_config(root: Path, fix: str = NEW_RUN_FIX) -> dict[str, Any] | None:
        """The settings the run in ``root`` left, or ``None``; reads only (the folder need
        not be claimed). ``fix`` ends the error for a file that cannot be read: what the
        caller's user can do (by default, what a rerun of ``fedrec simulate`` can)."""
        path = root / CONFIG_FILE
        if not path.exists():
            return None
        stored = read_json(
            path,
            what="the run settings",
            consequence=f"they record what the run in {root} was trained with. {fix}",
        )
        if not isinstance(stored, dict):
            raise ConfigError(f"{path} is not a JSON object. {fix}")
        return stored

    def claim(
        self,
        section: str,
        settings: Mapping[str, Any],
        may_change: Collection[str],
        defaults: Mapping[str, Any] | None = None,
        canonical: Mapping[str, Callable[[Any], Any]] | None = None,
    ) -> None:
        """Record ``settings`` under ``section`` of ``config.json`` (:meth:`record_settings`),
        after checking that a previous run here used the same ones (:meth:`check_settings`)."""
        self.check_settings(section, settings, may_change, defaults, canonical)
        self.record_settings(section, settings)

    def check_settings(
        self,
        section: str,
        settings: Mapping[str, Any],
        may_change: Collection[str],
        defaults: Mapping[str, Any] | None = None,
        canonical: Mapping[str, Callable[[Any], Any]] | None = None,
    ) -> None:
        """Check that a previous run here used the same ``settings`` under ``section`` of
        ``config.json`` (but for the ``may_change`` keys); writes nothing, so a run refused
        by a later check (:meth:`claim_data`) leaves the settings its files were made with.

        Raises :class:`ConfigError` listing every differing key: resuming its checkpoints
        (and its devices' privacy ledgers) under other settings would mix two runs and label
        the result with the new settings. A setting the previous run did not record (added
        by an upgrade) ran at its default, so it is compared with ``defaults``; one only the
        previous run recorded (removed since) is not compared. ``canonical`` maps a key to
        the spelling ``settings`` use now (a previous run may have stored ``ML-100K``).
        """
        stored = self.stored_config()
        previous = (stored or {}).get(section)
        if not isinstance(previous, dict) and self.has_progress():
            raise ConfigError(
                f"{self.root} holds a run's checkpoints or its devices' privacy ledgers but "
                f"not the settings they were trained with ({CONFIG_FILE} is missing or has no "
                f"'{section}' settings): resuming them under other settings would mix two runs. "
                f"Put its {CONFIG_FILE} back to resume it, or pass another --name to start a "
                "fresh run"
            )
        if isinstance(previous, dict) and self.has_progress():
            before = {**{k: v for k, v in (defaults or {}).items() if k in settings}, **previous}
            for key, spell in (canonical or {}).items():
                # a value that spells nothing known is compared as it was stored
                with contextlib.suppress(FedRecError, TypeError, AttributeError):
                    if key in before:
                        before[key] = spell(before[key])
            differing = [
                f"{key} {before[key]!r} -> {value!r}"
                for key, value in settings.items()
                if key not in may_change and key in before and before[key] != value
            ]
            if differing:
                raise ConfigError(
                    f"{self.root} holds a run with other settings ({'; '.join(differing)}); "
                    "resuming it would mix the two runs. Rerun with its settings to resume it, "
                    "or pass another --name to start a fresh run"
                )

    def record_settings(self, section: str, settings: Mapping[str, Any]) -> None:
        """Write ``settings`` under ``section`` of ``config.json``, keeping its other
        sections; check them first (:meth:`check_settings`)."""
        self.write_config({**(self.stored_config() or {}), section: dict(settings)})

    def claim_data(self, fingerprint: str, what: str) -> None:
        """Record the content fingerprint of the data the run trains on (the ``data``
        section of ``config.json``), after checking that a previous run here trained on the
        same: its settings can all match while the data differ (a data-dir file edited, a new
        download, another version's cleaning filters), and its checkpoints, pretrained
        student and ledgers would be continued on other users and items. ``what`` names the
        data for the error. A run that recorded none (older code) is not compared."""
        stored = self.stored_config() or {}
        if self.has_progress():
            check_data(
                self.root,
                stored,
                fingerprint,
                what,
                "resuming it would continue its checkpoints on other users and items. Restore "
                "the data it was trained on to resume it, or pass another --name to start a "
                "fresh run",
            )
        self.write_config({**stored, DATA_SECTION: {"fingerprint": fingerprint}})

    def has_progress(self) -> bool:
        """Whether a run here got far enough to leave something a rerun resumes from
        (:func:`has_progress`)."""
        return has_progress(self.root)

    def discard_if_empty(self) -> bool:
        """Undo a run that left nothing to resume (it failed on bad input before its first
        round): remove the directory if this process created it, else only the files and
        folders this run added to it. Returns whether it did."""
        if not self.root.exists() or self.has_progress():
            return False
        self.close()
        if not self.created:
            for path in self._added:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            return True
        shutil.rmtree(self.root, ignore_errors=True)
        for parent in self._created_parents:  # innermost first; never one that holds more
            try:
                parent.rmdir()
            except OSError:
                break
        return True

    def log(self, event: str, step: int, **metrics: Any) -> None:
        """Append one record to ``metrics.jsonl`` and its numeric fields to TensorBoard.

        An ``event`` at a ``step`` that an earlier process logged goes to TensorBoard only
        from :meth:`resume_at`'s step on, where the earlier points are hidden: TensorBoard
        keeps every point it is given, so writing it again drew a second one at that step."""
        earlier = self._earlier_steps()
        record = {"event": event, "step": step, "time": round(time.time(), 3), **metrics}
        append_line(self.metrics_path, json.dumps(record, default=_jsonable))
        if (event, step) in earlier and (self._purge_from is None or step < self._purge_from):
            return
        try:
            writer = self._writer()
            if writer is not None:
                for key, value in metrics.items():
                    numeric = isinstance(value, int | float) and not isinstance(value, bool)
                    if numeric and math.isfinite(float(value)):
                        writer.add_scalar(f"{event}/{key}", float(value), step)
                writer.flush()
        except OSError as exc:
            self._stop_tensorboard(exc)

    def _stop_tensorboard(self, exc: OSError) -> None:
        """TensorBoard's file could not be written (a full disk, a read-only folder): it is
        a view of ``metrics.jsonl``, which holds every record, so the run goes on without it
        (a warning says so) rather than ending in TensorBoard's traceback."""
        logger.warning(
            "TensorBoard logs in %s stopped (%s); metrics.jsonl keeps every record",
            self.tensorboard,
            exc.strerror or exc,
        )
        writer, self._tb = self._tb, False
        if writer:
            with contextlib.suppress(OSError):
                writer.close()

    def resume_at(self, step: int) -> None:
        """This process logs its rounds from ``step`` on (the round after the checkpoint it
        resumed from): TensorBoard hides what earlier processes logged at ``step`` or later
        (``SummaryWriter``'s ``purge_step``), which this one runs and logs again. Call it
        before logging anything at ``step`` or later."""
        if not any(logged >= step for _, logged in self._earlier_steps()):
            return  # nothing to hide
        if self._tb:  # the purge is written when a writer starts
            with contextlib.suppress(OSError):  # its file failed: _stop_tensorboard's
                self._tb.close()
            self._tb = None
        self._purge_from = step

    def _earlier_steps(self) -> set[tuple[str, int]]:
        """The (event, step) pairs that earlier processes logged here."""
        if self._earlier is None:
            self._earlier = {
                (str(r.get("event")), r["step"]) for r in self.records() if is_int(r.get("step"))
            }
        return self._earlier

    def records(self, event: str | None = None) -> Iterator[dict[str, Any]]:
        """Read back the logged records (a torn last line from a crash is skipped). Bytes
        that are not UTF-8 spoil only the lines they are in, which are skipped alike: a
        strict decode of the whole file failed the resumed run on them. So is a line that
        parses as JSON but is not an object (``7``): no record, and not one to call ``.get``
        on."""
        if not self.metrics_path.exists():
            return
        text = self.metrics_path.read_bytes().decode("utf-8", errors="replace")
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            if event is None or record.get("event") == event:
                yield record

    def close(self) -> None:
        """Flush TensorBoard and let another run use the folder."""
        if self._tb:
            with contextlib.suppress(OSError):  # its file failed: _stop_tensorboard's
                self._tb.close()
        self._tb = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _writer(self) -> Any:
        """The TensorBoard writer; None once its file failed (:meth:`_stop_tensorboard`)."""
        if self._tb is False:
            return None
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; degrade rather than crash
                return None
            _quiet_tensorboard_thread_errors()
            # made here, not by SummaryWriter (os.makedirs: 0777 under umask 000, where every
            # other folder of the run is at most FOLDER_MODE)
            make_dirs_durable(self.tensorboard)
            self._tb = SummaryWriter(log_dir=str(self.tensorboard), purge_step=self._purge_from)
            _no_write_for_others(self.tensorboard)
        return self._tb


def _no_write_for_others(folder: Path) -> None:
    """TensorBoard's event files in ``folder`` at most :data:`SHARED_FILE_MODE`, as the run's
    metrics log: SummaryWriter creates its file (at once, empty) with Python's 0666, which
    under ``umask 000`` let any local user rewrite the run's curves. A file that is not this
    user's is left as it is."""
    for path in folder.glob("events.out.tfevents.*"):
        with contextlib.suppress(OSError):
            mode = stat.S_IMODE(path.lstat().st_mode)
            if path.is_file() and not path.is_symlink() and mode & ~SHARED_FILE_MODE:
                path.chmod(mode & SHARED_FILE_MODE)


def _quiet_tensorboard_thread_errors() -> None:
    """Keep TensorBoard's writer thread from printing the traceback of a file error: it
    hands the error to the thread that writes next (:meth:`RunDirectory.log` handles it),
    but it also raises it again itself, and Python printed that as 'Exception in thread
    Thread-1' with a traceback, cut off where the process exited. Installed once."""
    previous = threading.excepthook
    if getattr(previous, "fedrec_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(
            args.exc_value, OSError
        ):
            return
        previous(args)

    hook.fedrec_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
