"""The device's local store: SQLite (WAL, ``synchronous=FULL``) with encrypted rows.

Durability
    ``journal_mode=WAL`` + ``synchronous=FULL``: every commit fsyncs the write-ahead log
    before it returns, so a write that :meth:`DeviceStore.add_events` acknowledged survives a
    ``kill -9`` of the process (and a power loss). A second process (e.g. the Flower
    ClientApp that trains on the events) may open the same file: WAL lets readers run next
    to the writer, and writers wait up to ``busy_timeout_ms`` for each other.

Encryption at rest
    Everything user-derived (item ids, timestamps, ratings, feedback, key-value state) is in
    an AES-GCM ``payload`` column: a fresh random 96-bit nonce per row (stored in front of the
    ciphertext) and associated data ``fedrec-store/v1/<table>/<row id>/<kind>``, so a row
    copied to another id, table or kind fails authentication instead of being read. In clear
    are only the row ids, the event kind / feedback action, recommendation ids (random
    UUIDs), and for impressions a *blind index* ``HMAC(k_index, item_id)`` so feedback can be
    matched to what was shown without decrypting every impression (it reveals only that two
    impressions are of the same item). ``secure_delete`` is on, and :meth:`erase` checkpoints
    and ``VACUUM``s, so erased rows do not linger in free pages or the WAL (while another
    process is reading the store, the checkpoint waits for it: :meth:`scrub`).

    What authentication does not catch: the associated data binds a row to its table, id
    and kind, not to the rest of the store, so whoever can write the file can delete rows,
    put back an older copy of a row under the same id (an earlier value of a state key such
    as the rounds joined; after an erase ids start again from 1, so a row of a copy taken
    before it) or roll the whole file back, undetected. An erase deletes and overwrites the
    rows but keeps the data key: a copy of the file made before it (a backup, a file-system
    snapshot) stays readable with this device's key.

Keys
    The AEAD key, the blind-index key and a key-check value are HKDF-derived from the
    device's data key (:func:`client.device.identity.derive_subkey`). The check value is
    stored in the ``meta`` table at creation; opening with another key raises
    :class:`WrongDataKeyError` before any row is touched.

Schema
    ``PRAGMA user_version`` holds :data:`SCHEMA_VERSION`; a newer file is refused (upgrade
    fedrec), an older one is migrated by :data:`_MIGRATIONS`.

Order of events
    :meth:`DeviceStore.events` orders the history by timestamp (then insertion order), so an
    event an app sends late, with its own time, takes its place. An event the daemon stamped
    itself (``stamped``: the app sent no time) is stored no earlier than the newest stored
    event, read in the same write transaction: after the device's clock was set back (NTP
    correcting a fast clock, a board without a real-time clock starting at its last saved
    time) new events still come after the old ones instead of before them, until the clock
    passes the old stamps.

Decrypted history in memory
    A recommendation and a refit need the whole history, and a ``stamped`` event the newest
    stored time; decrypting every row each time grows with the history (tenths of a second
    per request at tens of thousands of events). The store keeps the history it decrypted
    in memory only (nothing decrypted is written anywhere), as of SQLite's ``PRAGMA
    data_version``, which changes when another connection (the ClientApp process, a second
    :class:`DeviceStore` on the file) commits. Its own writes keep it current as they
    commit (an append adds its events, an erase forgets them all, a rolled-back write drops
    it); another connection's commit makes the next read list the rows again, decrypting
    only those it has not seen (a row is recognised by id, kind and ciphertext, which its
    authentication binds together), so a row deleted elsewhere is never served and its
    plaintext is dropped.

Retries
    An app's own ids of events and feedback reports (optional) are kept as blind indexes
    (``events.client_tag``, ``feedback_ids``), so a batch sent again after a lost reply is
    recognised and stored once. The feedback ids are bounded: only the newest
    ``max_feedback_ids`` are remembered.

Bounds
    Impressions: the newest ``max_impressions``; feedback goes with the last impression of
    its slate (counted on in :attr:`StoreStats.feedback`); model records: the sealed
    versions on disk. Events, the user's history, are kept until an erase.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import shlex
import sqlite3
import threading
import time
from bisect import insort
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, TypeGuard, get_args

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from client.device.identity import derive_subkey, key_check_value
from shared.errors import ConfigError, DataError
from shared.io import make_dirs_durable

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 3
#: Version of the rows' associated data (``fedrec-store/v1/...``): schema upgrades that add
#: columns leave it, so the rows of an upgraded file still authenticate.
ROW_FORMAT: Final = 1
NONCE_BYTES: Final = 12

EventKind = Literal["view", "click", "rating"]
FeedbackAction = Literal["shown", "clicked"]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)
FEEDBACK_ACTIONS: tuple[str, ...] = get_args(FeedbackAction)

STATE_ROUNDS_JOINED = "rounds_joined"
STATE_JOINED_FILE_SEEN = "joined_file_seen"
STATE_ROUNDS_WITHOUT_DP = "rounds_without_dp"
STATE_WITHOUT_DP_FILE_SEEN = "without_dp_file_seen"

#: Key-value state that :meth:`DeviceStore.erase` keeps: participation is privacy
#: accounting (it must stay consistent with the privacy ledger, which is never erased).
KEPT_ON_ERASE: tuple[str, ...] = (
    STATE_ROUNDS_JOINED,
    STATE_JOINED_FILE_SEEN,
    STATE_ROUNDS_WITHOUT_DP,
    STATE_WITHOUT_DP_FILE_SEEN,
)

#: Each counter synced from ``federated/joined.json`` and the key of the file count it was
#: last synced to (:meth:`DeviceStore.sync_rounds_joined`).
_SYNC_BASELINE: dict[str, str] = {
    STATE_ROUNDS_JOINED: STATE_JOINED_FILE_SEEN,
    STATE_ROUNDS_WITHOUT_DP: STATE_WITHOUT_DP_FILE_SEEN,
}

STATE_ADAPTATION_PENDING = "adaptation_pending"
#: Feedback reports removed with their expired slate (:meth:`DeviceStore.record_impressions`),
#: still counted in :attr:`StoreStats.feedback` (until an erase).
STATE_FEEDBACK_EXPIRED = "feedback_expired"

#: Longest ``event_id`` an app may give an event (and ``feedback_id`` a feedback report).
MAX_EVENT_ID_LENGTH: Final = 128

#: Feedback ids remembered by default (the newest ones): a batch retried later than this
#: many reports after it was first stored is stored again.
MAX_FEEDBACK_IDS: Final = 10_000

#: Latest timestamp accepted (2100-01-01 UTC): catches milliseconds sent as seconds.
MAX_TIMESTAMP: Final = 4_102_444_800.0

#: How far ahead of this device's clock a timestamp may be (seconds): the history is ordered
#: by time, so an event dated years ahead would stay the newest the model sees for ever.
MAX_CLOCK_SKEW_S: Final = 86_400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('view', 'click', 'rating')),
    payload BLOB NOT NULL,
    client_tag BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS events_client_tag ON events (client_tag);
CREATE TABLE IF NOT EXISTS impressions (
    id INTEGER PRIMARY KEY,
    recommendation_id TEXT NOT NULL,
    item_tag BLOB NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS impressions_lookup ON impressions (recommendation_id, item_tag);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY,
    action TEXT NOT NULL CHECK (action IN ('shown', 'clicked')),
    recommendation_id TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback_ids (id INTEGER PRIMARY KEY, tag BLOB NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS models (
    version INTEGER PRIMARY KEY,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, payload BLOB NOT NULL);
"""

#: ``from_version -> SQL`` upgrading the file by one version (applied in order).
_MIGRATIONS: dict[int, str] = {
    # v2: the app's optional event id (blind-indexed), so a retried batch is stored once
    1: "ALTER TABLE events ADD COLUMN client_tag BLOB; "
    "CREATE UNIQUE INDEX IF NOT EXISTS events_client_tag ON events (client_tag)",
    # v3: the app's optional feedback ids (blind-indexed, the newest only), for the same reason
    2: "CREATE TABLE IF NOT EXISTS feedback_ids (id INTEGER PRIMARY KEY, tag BLOB NOT NULL UNIQUE)",
}


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run ``;``-separated statements inside the open transaction (``executescript`` would
    commit it first)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


class WrongDataKeyError(DataError):
    """The data key does not open this store (another device's key or a wrong passphrase)."""


class StoreIntegrityError(DataError):
    """A row failed authentication or does not parse: tampered with, swapped or corrupt."""


class StoreCorruptError(DataError):
    """The store's file is damaged: SQLite reads it as malformed, or as no database at all."""


def is_corruption(exc: BaseException) -> TypeGuard[sqlite3.DatabaseError]:
    """Whether ``exc`` is SQLite reporting a damaged file (``SQLITE_CORRUPT`` or
    ``SQLITE_NOTADB``), as opposed to a busy store or a full disk, which a retry may cure."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.DatabaseError)
        and isinstance(code, int)
        and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    )


def remove_store_files(path: str | Path) -> None:
    """Delete the store ``path`` with its ``-wal`` and ``-shm`` files (what a damaged store's
    erase comes to: its rows cannot be read, so they cannot be deleted one by one)."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


class UnknownItemsError(DataError):
    """A batch names items the catalog does not have; nothing of the batch is stored."""

    def __init__(self, items: Sequence[str], message: str) -> None:
        super().__init__(message)
        self.items = list(items)


class UnknownImpressionError(DataError):
    """Feedback names (recommendation, item) pairs that were never recommended."""

    def __init__(self, pairs: Sequence[tuple[str, str]], message: str) -> None:
        super().__init__(message)
        self.pairs = list(pairs)


# --------------------------------------------------------------------------- records


def _check_timestamp(ts: float, what: str) -> None:
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise DataError(f"{what} timestamp must be a finite number of seconds, got {ts!r}")
    if not 0 <= ts <= MAX_TIMESTAMP:
        raise DataError(
            f"{what} timestamp {ts} is outside [0, {MAX_TIMESTAMP:.0f}] (seconds since the "
            f"epoch; milliseconds must be divided by 1000)"
        )


def _check_not_ahead(ts: float, what: str) -> None:
    """Refuse input dated more than :data:`MAX_CLOCK_SKEW_S` ahead of this device's clock.

    Checked when a timestamp is stored (:meth:`DeviceStore.add_events`,
    :meth:`DeviceStore.add_feedback`), never when a row is read back: the clock moves, so a
    row stored while it ran fast (the daemon stamps "now" when the app omits a time) would
    otherwise be unreadable once it is corrected, and with it the whole history.
    """
    problem = future_timestamp_problem(ts)
    if problem:
        raise DataError(f"{what} {problem}")


def future_timestamp_problem(ts: float) -> str | None:
    """Why ``ts`` is too far in the future for this device (``None``: it is not)."""
    ahead = ts - time.time()
    if ahead <= MAX_CLOCK_SKEW_S:
        return None
    return (
        f"timestamp {ts} is {ahead / 86_400:.1f} days ahead of this device's clock; the "
        "history is ordered by time, so it would stay the newest event for ever: send the "
        "time it happened (or omit it for now)"
    )


def _check_item_id(item_id: str, what: str) -> None:
    if not isinstance(item_id, str) or not item_id:
        raise DataError(f"{what} item id must be a non-empty string, got {item_id!r}")


def _check_client_id(value: str | None, name: str) -> None:
    """An app's own id of a record: ``None``, or 1 to :data:`MAX_EVENT_ID_LENGTH` characters."""
    if value is not None and not (isinstance(value, str) and 0 < len(value) <= MAX_EVENT_ID_LENGTH):
        raise DataError(
            f"{name} must be a string of 1 to {MAX_EVENT_ID_LENGTH} characters, got {value!r}"
        )


@dataclass(frozen=True)
class Event:
    """One behavior event: ``item_id`` is the dataset's raw id, ``timestamp`` in seconds.

    The fields are checked here; that ``timestamp`` is not ahead of the device's clock only
    when it is stored (:meth:`DeviceStore.add_events`), since stored rows must stay readable
    whatever the clock says later.
    """

    item_id: str
    kind: EventKind
    timestamp: float
    rating: float | None = None
    id: int | None = None
    #: The app's own id of the event (optional): a batch retried after a lost reply (the
    #: daemon stored it, then was killed before answering) stores each event once. Kept as
    #: a blind index only; events read back have none.
    event_id: str | None = None
    #: ``timestamp`` is the device's "now", not a time the app gave: the store raises it to
    #: the newest stored event's (see "Order of events" above). Events read back have
    #: ``False``.
    stamped: bool = False

    def __post_init__(self) -> None:
        _check_item_id(self.item_id, "event")
        _check_client_id(self.event_id, "event_id")
        if self.kind not in EVENT_KINDS:
            raise DataError(f"event kind must be one of {EVENT_KINDS}, got {self.kind!r}")
        _check_timestamp(self.timestamp, "event")
        if (self.rating is None) != (self.kind != "rating"):
            raise DataError(
                f"a {self.kind!r} event must {'have' if self.kind == 'rating' else 'not have'} "
                f"a rating (item {self.item_id!r})"
            )
        if self.rating is not None and not math.isfinite(self.rating):
            raise DataError(f"rating must be finite, got {self.rating!r}")


@dataclass(frozen=True)
class Feedback:
    """What became of one recommended item: ``shown`` to the user, or ``clicked``.

    As for :class:`Event`, the clock check of ``timestamp`` is made when it is stored.
    """

    recommendation_id: str
    item_id: str
    action: FeedbackAction
    timestamp: float
    id: int | None = None
    #: The app's own id of the report (optional): a batch retried after a lost reply stores
    #: each report once (see :meth:`DeviceStore.add_feedback`). Kept as a blind index only;
    #: feedback read back has none.
    feedback_id: str | None = None
    #: ``timestamp`` is the device's "now": the ``click`` event a click adds is stamped as
    #: :attr:`Event.stamped` is. The report itself keeps ``timestamp``.
    stamped: bool = False

    def __post_init__(self) -> None:
        _check_item_id(self.item_id, "feedback")
        _check_client_id(self.feedback_id, "feedback_id")
        if self.action not in FEEDBACK_ACTIONS:
            raise DataError(
                f"feedback action must be one of {FEEDBACK_ACTIONS}, got {self.action!r}"
            )
        if not self.recommendation_id:
            raise DataError("feedback needs the recommendation_id it refers to")
        _check_timestamp(self.timestamp, "feedback")


class StoredFeedback(NamedTuple):
    """What :meth:`DeviceStore.add_feedback` stored: the feedback rows, the ``click`` events
    its first click reports added to the history, and the positions in the batch of the
    reports skipped because their ``feedback_id`` was stored before (or earlier in it)."""

    ids: list[int]
    click_events: list[int]
    duplicates: tuple[int, ...] = ()


@dataclass(frozen=True)
class Impression:
    """One item of one recommendation list, as shown by ``GET /recommendations``."""

    recommendation_id: str
    item_id: str
    rank: int
    score: float
    timestamp: float


@dataclass(frozen=True)
class ModelRecord:
    """One installed model version (the sealed file ``model-v{version}.onnx.sealed``)."""

    version: int
    model_version: str
    sha256: str
    installed_at: float


@dataclass(frozen=True)
class StoreStats:
    events: int
    feedback: int
    impressions: int
    models: int
    adaptation_pending: int
    rounds_joined: int
    #: of those, the rounds trained without DP (``--allow-no-dp``)
    rounds_without_dp: int = 0


# --------------------------------------------------------------------------- store


def _history_order(event: Event) -> tuple[float, int]:
    """The history's order: by timestamp, then insertion order (row id)."""
    return event.timestamp, event.id or 0


class DeviceStore:
    """The encrypted local store (see the module docstring). Thread-safe; one connection.

    Open with :meth:`open`; use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        data_key: bytes,
        *,
        max_impressions: int = 10_000,
        busy_timeout_ms: int = 5000,
        max_feedback_ids: int = MAX_FEEDBACK_IDS,
    ) -> None:
        self.path = path
        self._conn = conn
        self._aead = AESGCM(derive_subkey(data_key, "store/aes-gcm"))
        self._index_key = derive_subkey(data_key, "store/blind-index")
        self._lock = threading.RLock()
        self.max_impressions = max_impressions
        self.max_feedback_ids = max_feedback_ids
        self._busy_timeout_ms = busy_timeout_ms
        self._key_check = key_check_value(data_key)
        #: An erase left pages on disk that :meth:`scrub` has not removed yet.
        self.scrub_pending = False
        #: The ``VACUUM`` of an erase failed (e.g. the disk was full); :meth:`scrub` retries it.
        self._vacuum_pending = False
        #: The decrypted events (in memory only; see "Decrypted history in memory"), by the
        #: ``(id, kind, payload)`` of their rows: the rows present when last listed, and
        #: those this store added since.
        self._plain: dict[tuple[int, str, bytes], Event] = {}
        #: Those events oldest first (:meth:`events`' order), current while ``PRAGMA
        #: data_version`` is ``_history_at``; ``None``: to be listed again.
        self._history: list[Event] | None = None
        self._history_at = -1
        #: Counts the changes of the history in memory (:meth:`history_mark`).
        self._history_changes = 0

    # -- open / close -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        data_key: bytes,
        *,
        busy_timeout_ms: int = 5000,
        max_impressions: int = 10_000,
        max_feedback_ids: int = MAX_FEEDBACK_IDS,
    ) -> DeviceStore:
        """Open (creating if needed) the store at ``path`` with ``data_key``.

        ``max_feedback_ids``: how many of the apps' feedback ids (the newest) are remembered
        to recognise a retried batch.

        Raises :class:`WrongDataKeyError` if the file was created with another key,
        :class:`StoreCorruptError` if the file is damaged, and :class:`DataError` if it is
        not a store, is newer than this code, cannot be opened for writing (permissions, a
        full disk, another program's lock) or WAL is refused.
        """
        if max_impressions < 1:
            raise ConfigError(f"max_impressions must be >= 1, got {max_impressions}")
        if max_feedback_ids < 1:
            raise ConfigError(f"max_feedback_ids must be >= 1, got {max_feedback_ids}")
        path = Path(path)
        conn = cls._connect(path, busy_timeout_ms, key_check_value(data_key))
        return cls(
            path,
            conn,
            data_key,
            max_impressions=max_impressions,
            busy_timeout_ms=busy_timeout_ms,
            max_feedback_ids=max_feedback_ids,
        )

    @classmethod
    def _connect(cls, path: Path, busy_timeout_ms: int, check: str) -> sqlite3.Connection:
        """A configured connection to the store ``path`` (created if missing), its schema
        checked against the key check value ``check``."""
        make_dirs_durable(path.parent)
        if not path.exists():  # owner-only from the start; SQLite gives -wal/-shm the same mode
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        try:
            conn = sqlite3.connect(
                path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise DeviceStore._unopenable(path, exc) from exc
        try:
            cls._configure(conn, path, busy_timeout_ms)
            cls._prepare_schema(conn, path, check)
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _damaged(path: Path, exc: sqlite3.Error) -> StoreCorruptError:
        what = (
            "is not a fedrec device store (or its header is damaged)"
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_NOTADB
            else "is damaged"
        )
        return StoreCorruptError(
            f"the local store {path} {what} ({exc}) and cannot be read: move it and its "
            f"{path.name}-wal/-shm files away (the daemon then starts an empty store; an "
            f"erase of the local data that was pending completes by deleting them) or "
            f"restore it from a backup"
        )

    @staticmethod
    def _unopenable(path: Path, exc: sqlite3.Error) -> DataError:
        """SQLite cannot open the store ``path`` for writing, for a reason outside its
        contents (a damaged or foreign file is :meth:`_damaged`): name the fix, which is
        never to set the store aside."""
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF in (
            sqlite3.SQLITE_BUSY,
            sqlite3.SQLITE_LOCKED,
        ):
            fix = "another program holds it locked: close that program and retry"
        else:
            fix = (
                f"this user must be able to read and write it, its {path.name}-wal/-shm files "
                f"and the folder {path.parent} (give files left by a run as another user, e.g. "
                f"root, back with `chown`), and the disk must have room"
            )
        return DataError(f"cannot open the local store {path} ({exc}): {fix}; it was not changed")

    @staticmethod
    def _configure(conn: sqlite3.Connection, path: Path, busy_timeout_ms: int) -> None:
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA secure_delete = ON")
            # SQLite's temporary tables and indices (VACUUM, large sorts) stay in memory,
            # not in files under /tmp, outside the device's folder and its erase
            conn.execute("PRAGMA temp_store = MEMORY")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as exc:
            if is_corruption(exc):
                raise DeviceStore._damaged(path, exc) from exc
            # a file that is not SQLite is SQLITE_NOTADB (above); what is left is the file's
            # surroundings: permissions, a full disk, another program's lock
            raise DeviceStore._unopenable(path, exc) from exc
        if str(mode).lower() != "wal":
            raise DataError(
                f"SQLite refused write-ahead logging for {path} (journal_mode={mode}); put the "
                f"state directory on a local filesystem that supports it"
            )

    @staticmethod
    def _prepare_schema(conn: sqlite3.Connection, path: Path, check: str) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if version > SCHEMA_VERSION:
                raise DataError(
                    f"{path} has store schema v{version}, this fedrec reads up to "
                    f"v{SCHEMA_VERSION}; upgrade fedrec"
                )
            if version == 0 and tables:
                raise DataError(
                    f"{path} is an SQLite file but not a fedrec device store (tables: "
                    f"{', '.join(sorted(tables))}); move it away"
                )
            if version == 0:
                _run_script(conn, _SCHEMA)
                conn.execute("INSERT INTO meta VALUES ('key_check', ?)", (check,))
                conn.execute("INSERT INTO meta VALUES ('created_at', ?)", (repr(time.time()),))
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            while version and version < SCHEMA_VERSION:
                _run_script(conn, _MIGRATIONS[version])
                version += 1
                conn.execute(f"PRAGMA user_version = {version}")
            row = conn.execute("SELECT value FROM meta WHERE key = 'key_check'").fetchone()
            if row is None:
                raise DataError(f"{path} has no key check value; the store is corrupt")
            # as bytes: compare_digest raises TypeError on a str that is not ASCII
            if not hmac.compare_digest(str(row[0]).encode(), check.encode()):
                raise WrongDataKeyError(
                    f"the data key does not open the local store {path} (it was created with "
                    f"another key): check the passphrase / key file in the identity directory "
                    f"(restore it from a backup), or start over with `fedrec client init "
                    f"--force --state-dir {shlex.quote(str(path.parent))}` (erases the store; "
                    "keeps the privacy ledger)"
                )
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if is_corruption(exc):
                raise DeviceStore._damaged(path, exc) from exc
            if isinstance(exc, sqlite3.OperationalError):
                # creating or migrating the schema on a full disk, a read-only folder, a
                # lock held past the timeout: a traceback, not the fix (nothing was changed)
                raise DeviceStore._unopenable(path, exc) from exc
            raise

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close."""
        with self._lock:
            self._forget_history()
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:  # another process reading: the WAL stays, still safe
                logger.debug("checkpoint on close skipped: %s", exc)
            self._conn.close()

    def __enter__(self) -> DeviceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One atomic write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, fsynced)."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # the history in memory may hold what the write added: listed again
                self._drop_history()
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # -- encryption -----------------------------------------------------------------------------

    @staticmethod
    def _ad(table: str, row_id: int | str, kind: str) -> bytes:
        return f"fedrec-store/v{ROW_FORMAT}/{table}/{row_id}/{kind}".encode()

    def _seal(self, table: str, row_id: int | str, kind: str, obj: Any) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        data = json.dumps(obj, separators=(",", ":")).encode()
        return nonce + self._aead.encrypt(nonce, data, self._ad(table, row_id, kind))

    def _open(self, table: str, row_id: int | str, kind: str, blob: bytes) -> Any:
        try:
            # a payload rewritten as TEXT or a number (SQLite keeps any type) is tampering too
            if not isinstance(blob, bytes) or len(blob) < NONCE_BYTES + 16:
                raise InvalidTag
            data = self._aead.decrypt(
                blob[:NONCE_BYTES], blob[NONCE_BYTES:], self._ad(table, row_id, kind)
            )
            return json.loads(data)
        except (InvalidTag, ValueError) as exc:
            raise StoreIntegrityError(
                f"{self.path}: row {table}#{row_id} ({kind}) failed authentication — it was "
                f"tampered with, moved from another row or corrupted; erase the local data "
                f"(DELETE /data) if this persists"
            ) from exc

    def item_tag(self, item_id: str) -> bytes:
        """Blind index of an item id: equal ids give equal tags; the id is not recoverable."""
        return hmac.new(
            self._index_key, item_id.encode("utf-8", "surrogatepass"), hashlib.sha256
        ).digest()[:16]

    @staticmethod
    def _next_id(conn: sqlite3.Connection, table: str, key: str = "id") -> int:
        return int(conn.execute(f"SELECT COALESCE(MAX({key}), 0) + 1 FROM {table}").fetchone()[0])

    # -- events -------------------------------------------------------------------------------

    def add_events(self, events: Sequence[Event]) -> list[int]:
        """Store ``events`` in one transaction (all or none) and bump "adaptation pending".

        An event whose ``event_id`` is already stored (or repeated in the batch) is skipped:
        a retried batch adds nothing twice. Returns the new row ids; when this returns, the
        events are durable. An event dated more than a day ahead of this device's clock
        raises :class:`DataError` and nothing is stored.
        """
        events = list(events)
        if not events:
            return []
        for ev in events:
            _check_not_ahead(ev.timestamp, "event")
        with self._write() as conn:
            return self._insert_events(conn, events)

    def _insert_events(self, conn: sqlite3.Connection, events: Sequence[Event]) -> list[int]:
        """Insert ``events`` inside the caller's write transaction, skipping those whose
        ``event_id`` is already stored; counts the new ones as pending. A ``stamped`` event
        is dated no earlier than any event stored before it (this batch's included)."""
        tags = [None if ev.event_id is None else self._event_tag(ev.event_id) for ev in events]
        fresh = self._first_sightings(conn, "events", "client_tag", tags)
        first = self._next_id(conn, "events")
        newest = self._newest_event_time(conn) if any(ev.stamped for ev in events) else 0.0
        rows: list[tuple[int, str, bytes, bytes | None]] = []
        stored: list[Event] = []
        for ev, tag, new in zip(events, tags, fresh, strict=True):
            if not new:
                continue
            row_id = first + len(rows)
            ts = max(ev.timestamp, newest) if ev.stamped else ev.timestamp
            newest = max(newest, ts)
            payload = {"item": ev.item_id, "ts": ts, "rating": ev.rating}
            sealed = self._seal("events", row_id, ev.kind, payload)
            rows.append((row_id, ev.kind, sealed, tag))
            stored.append(Event(ev.item_id, ev.kind, ts, ev.rating, row_id))
        conn.executemany(
            "INSERT INTO events (id, kind, payload, client_tag) VALUES (?, ?, ?, ?)", rows
        )
        self._increment(conn, STATE_ADAPTATION_PENDING, len(rows))
        self._remember_added(conn, [(r[0], r[1], r[2]) for r in rows], stored)
        return [r[0] for r in rows]

    def _newest_event_time(self, conn: sqlite3.Connection) -> float:
        """The latest timestamp of the stored events (0 when there are none), from the
        history in memory (the last event of :meth:`events`' order)."""
        history = self._current_history(conn)
        return history[-1].timestamp if history else 0.0

    # -- the decrypted history in memory ------------------------------------------------------

    @staticmethod
    def _data_version(conn: sqlite3.Connection) -> int:
        """SQLite's count of other connections' commits to the file, as ``conn`` sees it."""
        return int(conn.execute("PRAGMA data_version").fetchone()[0])

    def _current_history(self, conn: sqlite3.Connection) -> list[Event]:
        """Every event, oldest first, as ``conn`` sees the file (the caller holds
        ``_lock``; inside a write transaction, as of it). The list in memory while no other
        connection committed since it was made; else the rows are listed again and only
        those not seen before are decrypted. The list is the store's own: do not change it."""
        # read before the rows: a commit in between makes the next call list them again
        version = self._data_version(conn)
        if self._history is not None and self._history_at == version:
            return self._history
        plain: dict[tuple[int, str, bytes], Event] = {}
        for row_id, kind, blob in conn.execute("SELECT id, kind, payload FROM events"):
            key = (row_id, kind, blob)
            event = self._plain.get(key)
            plain[key] = self._event_row(row_id, kind, blob) if event is None else event
        # the rows gone (deleted by another connection) leave memory with their plaintext
        self._plain = plain
        history = sorted(plain.values(), key=_history_order)
        if history != self._history:  # (not after a commit elsewhere that left the events)
            self._history_changes += 1
        self._history, self._history_at = history, version
        return history

    def history_mark(self) -> int:
        """A number that changes whenever :meth:`events` would list other events (checked
        against the file as :meth:`events` checks it): what a caller derives from the history
        is current while the mark it read *before* :meth:`events` stays the same."""
        with self._lock:
            self._current_history(self._conn)
            return self._history_changes

    def _remember_added(
        self,
        conn: sqlite3.Connection,
        rows: Sequence[tuple[int, str, bytes]],
        events: Sequence[Event],
    ) -> None:
        """Note ``events``, just inserted as ``rows`` (id, kind, payload) inside the caller's
        write transaction, in the history in memory (:meth:`_write` drops it if the
        transaction does not commit)."""
        for (row_id, kind, sealed), event in zip(rows, events, strict=True):
            self._plain[(row_id, kind, sealed)] = event
        if self._history is None or self._history_at != self._data_version(conn):
            self._drop_history()  # another connection committed since: listed again
            return
        for event in events:
            insort(self._history, event, key=_history_order)
        self._history_changes += 1

    def _drop_history(self) -> None:
        """Have the next read list the rows again (decrypting only those not seen)."""
        self._history = None
        self._history_changes += 1

    def _forget_history(self) -> None:
        """Drop every decrypted event from memory (an erase, a closed store)."""
        self._plain = {}
        self._drop_history()

    def _event_row(self, row_id: int, kind: EventKind, blob: bytes) -> Event:
        """The event of one ``events`` row (decrypted and checked)."""
        p = self._open("events", row_id, kind, blob)
        try:
            return Event(str(p["item"]), kind, float(p["ts"]), p["rating"], row_id)
        except (KeyError, TypeError, DataError) as exc:
            raise StoreIntegrityError(f"{self.path}: row events#{row_id} is malformed") from exc

    def _clicked_items(self, conn: sqlite3.Connection) -> set[str]:
        """Items with a stored ``click`` event (from the history in memory)."""
        return {e.item_id for e in self._current_history(conn) if e.kind == "click"}

    def _event_tag(self, event_id: str) -> bytes:
        """Blind index of an app's event id (apart from the item tags)."""
        return self.item_tag(f"event-id\x00{event_id}")

    @classmethod
    def _first_sightings(
        cls, conn: sqlite3.Connection, table: str, column: str, tags: Sequence[bytes | None]
    ) -> list[bool]:
        """For each of ``tags`` (blind indexes of an app's ids; ``None``: no id given), whether
        its record is new: its tag neither in ``column`` of ``table`` nor earlier in ``tags``.
        A retried batch, or an id given twice in one, is stored once."""
        known = cls._stored_tags(conn, table, column, [t for t in tags if t is not None])
        fresh: list[bool] = []
        for tag in tags:
            fresh.append(tag is None or tag not in known)
            if tag is not None:
                known.add(tag)
        return fresh

    @staticmethod
    def _stored_tags(
        conn: sqlite3.Connection, table: str, column: str, tags: Sequence[bytes]
    ) -> set[bytes]:
        """Which of the blind indexes ``tags`` the ``column`` of ``table`` holds already."""
        found: set[bytes] = set()
        for start in range(0, len(tags), 500):  # SQLite's bound-parameter limit
            chunk = list(tags[start : start + 500])
            rows = conn.execute(
                f"SELECT {column} FROM {table} WHERE {column} IN ({','.join('?' * len(chunk))})",
                chunk,
            ).fetchall()
            found.update(bytes(r[0]) for r in rows)
        return found

    def events(self) -> list[Event]:
        """Every event, oldest first (by timestamp, then insertion order): a copy of the
        history in memory, decrypted only where rows are new to it."""
        with self._lock:
            return list(self._current_history(self._conn))

    def count_events(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    # -- impressions and feedback ---------------------------------------------------------------

    def record_impressions(self, impressions: Sequence[Impression]) -> None:
        """Remember what was recommended (so feedback can be checked), pruning the oldest
        beyond ``max_impressions``, and the feedback of the slates they were the last
        impressions of: it can no longer be matched to anything, and an app reports every
        item it shows (it stays counted in :attr:`StoreStats.feedback`)."""
        if not impressions:
            return
        with self._write() as conn:
            first = self._next_id(conn, "impressions")
            rows = []
            for offset, imp in enumerate(impressions):
                row_id = first + offset
                payload = {
                    "item": imp.item_id,
                    "rank": imp.rank,
                    "score": imp.score,
                    "ts": imp.timestamp,
                }
                rows.append(
                    (
                        row_id,
                        imp.recommendation_id,
                        self.item_tag(imp.item_id),
                        self._seal("impressions", row_id, imp.recommendation_id, payload),
                    )
                )
            conn.executemany(
                "INSERT INTO impressions (id, recommendation_id, item_tag, payload) "
                "VALUES (?, ?, ?, ?)",
                rows,
            )
            last = first + len(rows) - 1
            expired = conn.execute(
                "DELETE FROM impressions WHERE id <= ?", (last - self.max_impressions,)
            ).rowcount
            if expired > 0:
                gone = conn.execute(
                    "DELETE FROM feedback WHERE recommendation_id NOT IN "
                    "(SELECT recommendation_id FROM impressions)"
                ).rowcount
                if gone > 0:
                    self._increment(conn, STATE_FEEDBACK_EXPIRED, gone)

    def missing_impressions(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """The ``(recommendation_id, item_id)`` pairs that were never recommended (or expired)."""
        with self._lock:
            return [
                (rec, item)
                for rec, item in pairs
                if self._conn.execute(
                    "SELECT 1 FROM impressions WHERE recommendation_id = ? AND item_tag = ?",
                    (rec, self.item_tag(item)),
                ).fetchone()
                is None
            ]

    def reported(self, pairs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """The ``(recommendation_id, item_id)`` pairs that already have stored feedback."""
        wanted = set(pairs)
        recs = sorted({rec for rec, _ in wanted})
        found: set[tuple[str, str]] = set()
        with self._lock:
            for start in range(0, len(recs), 500):  # SQLite's bound-parameter limit
                chunk = recs[start : start + 500]
                rows = self._conn.execute(
                    "SELECT id, action, recommendation_id, payload FROM feedback "
                    f"WHERE recommendation_id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                for row_id, action, rec, blob in rows:
                    pair = (rec, str(self._open("feedback", row_id, action, blob)["item"]))
                    if pair in wanted:
                        found.add(pair)
        return found

    def add_feedback(self, feedback: Sequence[Feedback]) -> StoredFeedback:
        """Store feedback atomically; *all* of it must refer to recorded impressions.

        A ``clicked`` report is also stored as a ``click`` event, in the same transaction,
        unless the item has one already: a click is behaviour, so it joins the history the
        next few-shot adaptation fits (and counts as adaptation pending) and the clicked item
        is no longer recommended. A repeated or retried report adds no second event.

        A report whose ``feedback_id`` is already stored (or repeated in the batch) is skipped
        before anything else is checked, so a batch sent again after a lost reply stores
        nothing twice, even once its impressions expired; its position is listed in
        :attr:`StoredFeedback.duplicates`. The newest ``max_feedback_ids`` ids are remembered.

        Raises :class:`UnknownImpressionError` listing the pairs that were never recommended
        (or whose impression expired), and then stores nothing; :class:`DataError` (nothing
        stored) for a report dated more than a day ahead of this device's clock.
        """
        feedback = list(feedback)
        if not feedback:
            return StoredFeedback([], [])
        for fb in feedback:
            _check_not_ahead(fb.timestamp, "feedback")
        with self._write() as conn:
            tags = [
                None if fb.feedback_id is None else self._feedback_tag(fb.feedback_id)
                for fb in feedback
            ]
            fresh = self._first_sightings(conn, "feedback_ids", "tag", tags)
            duplicates = [position for position, new in enumerate(fresh) if not new]
            new_tags = [t for t, new in zip(tags, fresh, strict=True) if new and t is not None]
            feedback = [fb for fb, new in zip(feedback, fresh, strict=True) if new]
            if not feedback:
                return StoredFeedback([], [], tuple(duplicates))
            pairs = list(dict.fromkeys((f.recommendation_id, f.item_id) for f in feedback))
            missing = self.missing_impressions(pairs)
            if missing:
                shown = ", ".join(f"{item!r} in {rec}" for rec, item in missing[:20])
                more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
                raise UnknownImpressionError(
                    missing,
                    f"feedback refers to {len(missing)} item(s) that recommendation(s) never "
                    f"returned (or whose impression expired): {shown}{more}; send feedback only "
                    f"for items of a GET /recommendations response, with its recommendation_id",
                )
            first = self._next_id(conn, "feedback")
            rows = []
            for offset, fb in enumerate(feedback):
                row_id = first + offset
                payload = {"item": fb.item_id, "ts": fb.timestamp}
                rows.append(
                    (
                        row_id,
                        fb.action,
                        fb.recommendation_id,
                        self._seal("feedback", row_id, fb.action, payload),
                    )
                )
            # one click event per item: an earlier report of it, or the app's own POST
            # /events of the click, already put it in the history
            clicks: dict[str, Feedback] = {}
            for fb in feedback:
                if fb.action == "clicked":
                    clicks.setdefault(fb.item_id, fb)
            if clicks:
                for item in self._clicked_items(conn):
                    clicks.pop(item, None)
            conn.executemany(
                "INSERT INTO feedback (id, action, recommendation_id, payload) VALUES (?, ?, ?, ?)",
                rows,
            )
            events = [
                Event(fb.item_id, "click", fb.timestamp, stamped=fb.stamped)
                for fb in clicks.values()
            ]
            event_ids = self._insert_events(conn, events) if events else []
            if new_tags:
                self._remember_feedback_ids(conn, new_tags)
        return StoredFeedback([r[0] for r in rows], event_ids, tuple(duplicates))

    def _feedback_tag(self, feedback_id: str) -> bytes:
        """Blind index of an app's feedback id (apart from the item and event-id tags)."""
        return self.item_tag(f"feedback-id\x00{feedback_id}")

    def _remember_feedback_ids(self, conn: sqlite3.Connection, tags: Sequence[bytes]) -> None:
        """Record ``tags`` inside the caller's write transaction, forgetting the oldest beyond
        ``max_feedback_ids`` (a retry comes soon after the lost reply; the table stays small)."""
        first = self._next_id(conn, "feedback_ids")
        conn.executemany(
            "INSERT INTO feedback_ids (id, tag) VALUES (?, ?)",
            [(first + offset, tag) for offset, tag in enumerate(tags)],
        )
        last = first + len(tags) - 1
        conn.execute("DELETE FROM feedback_ids WHERE id <= ?", (last - self.max_feedback_ids,))

    def feedback(self) -> list[Feedback]:
        """All feedback, in insertion order."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, action, recommendation_id, payload FROM feedback ORDER BY id"
            ).fetchall()
        out = []
        for row_id, action, rec, blob in rows:
            p = self._open("feedback", row_id, action, blob)
            out.append(Feedback(rec, str(p["item"]), action, float(p["ts"]), row_id))
        return out

    # -- models -------------------------------------------------------------------------------

    def record_model(self, record: ModelRecord, kept: Iterable[int] | None = None) -> None:
        """Log an installed model version (the sealed file is the source of the bytes).
        ``kept``: the sealed versions still on disk; the records of every other version are
        removed, so the table stays as small as the sealed store (a device seals a model
        per round and per personal refit, for months). ``None``: remove nothing."""
        payload = {
            "model_version": record.model_version,
            "sha256": record.sha256,
            "installed_at": record.installed_at,
        }
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO models (version, payload) VALUES (?, ?)",
                (record.version, self._seal("models", record.version, "model", payload)),
            )
            if kept is not None:
                keep = sorted({*kept, record.version})
                marks = ",".join("?" * len(keep))
                conn.execute(f"DELETE FROM models WHERE version NOT IN ({marks})", keep)

    def models(self) -> list[ModelRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT version, payload FROM models ORDER BY version"
            ).fetchall()
        out = []
        for version, blob in rows:
            p = self._open("models", version, "model", blob)
            out.append(ModelRecord(version, p["model_version"], p["sha256"], p["installed_at"]))
        return out

    # -- key-value state -----------------------------------------------------------------------

    def _get(self, conn: sqlite3.Connection, key: str, default: Any) -> Any:
        row = conn.execute("SELECT payload FROM state WHERE key = ?", (key,)).fetchone()
        return default if row is None else self._open("state", key, "kv", row[0])["v"]

    def _put(self, conn: sqlite3.Connection, key: str, value: Any) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO state (key, payload) VALUES (?, ?)",
            (key, self._seal("state", key, "kv", {"v": value})),
        )

    def _increment(self, conn: sqlite3.Connection, key: str, by: int) -> int:
        value = int(self._get(conn, key, 0)) + by
        self._put(conn, key, value)
        return value

    def get_state(self, key: str, default: Any = None) -> Any:
        """A JSON value from the encrypted key-value table."""
        with self._lock:
            return self._get(self._conn, key, default)

    def set_state(self, key: str, value: Any) -> None:
        """Set a JSON-serialisable value (encrypted, durable on return)."""
        self.update_state({key: value})

    def update_state(
        self,
        values: Mapping[str, Any],
        *,
        delete: Iterable[str] = (),
        delete_prefix: str | None = None,
    ) -> None:
        """Set several values and delete keys in one transaction (encrypted, durable on
        return): first every key starting with ``delete_prefix``, then ``delete``, then
        ``values``."""
        json.dumps(dict(values))  # fail before the transaction on a non-JSON value
        with self._write() as conn:
            if delete_prefix:
                conn.execute(
                    "DELETE FROM state WHERE substr(key, 1, ?) = ?",
                    (len(delete_prefix), delete_prefix),
                )
            conn.executemany("DELETE FROM state WHERE key = ?", [(k,) for k in delete])
            for key, value in values.items():
                self._put(conn, key, value)

    def states_with_prefix(self, prefix: str) -> dict[str, Any]:
        """Every state value whose key starts with ``prefix``, by key."""
        if not prefix:
            raise ValueError("prefix must not be empty")
        with self._lock:
            rows = self._conn.execute(
                "SELECT key, payload FROM state WHERE substr(key, 1, ?) = ?",
                (len(prefix), prefix),
            ).fetchall()
            return {key: self._open("state", key, "kv", blob)["v"] for key, blob in rows}

    def increment(self, key: str, by: int = 1) -> int:
        """Atomically add ``by`` to an integer state value; returns the new value."""
        with self._write() as conn:
            return self._increment(conn, key, by)

    def record_round_joined(self) -> int:
        """Count one federated round this device took part in (kept by :meth:`erase`)."""
        return self.increment(STATE_ROUNDS_JOINED)

    def sync_rounds_joined(self, file_count: int, without_dp: int | None = None) -> int:
        """Catch the rounds-joined counter up with the federation's own count ``file_count``
        (``federated/joined.json``, written by the training process); returns the rounds
        added. ``without_dp``: the file's count of those trained without DP, which catches
        up the rounds-without-DP counter the same way (``None`` leaves it).

        Each round counts once. A count below the last one synced means that file was lost
        or unreadable and started again from 0: its rounds are new and count from there,
        rather than freezing the counter until the file catches up. Both counters are kept
        here for that reason: the file's own restart from 0 reset ``rounds_without_dp``.
        """
        if file_count < 0 or (without_dp is not None and without_dp < 0):
            raise ValueError(f"file counts must be >= 0, got {file_count}, {without_dp}")
        with self._write() as conn:
            # a store from before this key kept its counter equal to the file's count
            seen = int(
                self._get(conn, STATE_JOINED_FILE_SEEN, self._get(conn, STATE_ROUNDS_JOINED, 0))
            )
            restarted = file_count < seen
            added = file_count if restarted else file_count - seen
            if added:
                self._increment(conn, STATE_ROUNDS_JOINED, added)
            if file_count != seen:
                self._put(conn, STATE_JOINED_FILE_SEEN, file_count)
            if without_dp is not None:
                # a store from before this key had counted none: all of the file's are new
                seen_no_dp = int(self._get(conn, STATE_WITHOUT_DP_FILE_SEEN, 0))
                new = (
                    without_dp if restarted or without_dp < seen_no_dp else without_dp - seen_no_dp
                )
                if new:
                    self._increment(conn, STATE_ROUNDS_WITHOUT_DP, new)
                if without_dp != seen_no_dp:
                    self._put(conn, STATE_WITHOUT_DP_FILE_SEEN, without_dp)
            return added

    def adaptation_pending(self) -> int:
        """New local events not yet used by the few-shot adaptation."""
        return int(self.get_state(STATE_ADAPTATION_PENDING, 0))

    def consume_adaptation_pending(self, count: int) -> int:
        """Mark ``count`` pending events as adapted on (clamped at 0); returns what is left."""
        with self._write() as conn:
            left = max(0, int(self._get(conn, STATE_ADAPTATION_PENDING, 0)) - count)
            self._put(conn, STATE_ADAPTATION_PENDING, left)
            return left

    # -- stats / erase ---------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        with self._lock:
            counts = {
                t: int(self._conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
                for t in ("events", "feedback", "impressions", "models")
            }
            pending = int(self._get(self._conn, STATE_ADAPTATION_PENDING, 0))
            counts["feedback"] += int(self._get(self._conn, STATE_FEEDBACK_EXPIRED, 0))
            rounds = int(self._get(self._conn, STATE_ROUNDS_JOINED, 0))
            without_dp = int(self._get(self._conn, STATE_ROUNDS_WITHOUT_DP, 0))
        return StoreStats(
            events=counts["events"],
            feedback=counts["feedback"],
            impressions=counts["impressions"],
            models=counts["models"],
            adaptation_pending=pending,
            rounds_joined=rounds,
            rounds_without_dp=without_dp,
        )

    def erase(self, keep_state: Sequence[str] = KEPT_ON_ERASE) -> bool:
        """Delete every event, impression, feedback (with the apps' feedback ids), model
        record and state value.

        State keys in ``keep_state`` survive (by default the rounds joined: participation
        belongs to privacy accounting), except one whose row fails authentication (tampered
        or corrupt): kept, it would raise :class:`StoreIntegrityError` after every erase, the
        very fix that error advises; it starts again instead, as in an erase of a damaged
        file (the rounds joined catch up with ``federated/joined.json``; the privacy ledger
        is a file of its own). The deleted rows are overwritten (``secure_delete``),
        the WAL is truncated and the file ``VACUUM``-ed, so nothing lingers in the store's
        files. Copies outside them (a backup or snapshot of the folder, blocks the file
        system freed without clearing) are encrypted under keys derived from the device's
        data key, which the erase keeps: whoever holds both can read them.

        Returns whether the old pages are gone from disk already. Another connection in the
        middle of a read (the federated client, during a fit) keeps the WAL from being
        copied back and truncated; then :attr:`scrub_pending` is set and :meth:`scrub`
        must be called again once that reader is done.

        Once the deletion committed the erase has happened, so the clean-up after it is
        best-effort: a ``VACUUM`` that fails (the disk full: it needs room for a copy of the
        file) is logged and left to :meth:`scrub` (``False`` is returned), never raised as if
        nothing had been erased.
        """
        keep = list(keep_state)
        with self._lock:
            try:
                with self._write() as conn:
                    for table in ("events", "impressions", "feedback", "feedback_ids", "models"):
                        conn.execute(f"DELETE FROM {table}")
                    self._forget_history()
                    marks = ",".join("?" * len(keep))
                    conn.execute(f"DELETE FROM state WHERE key NOT IN ({marks})", keep)
                    self._reset_unreadable(conn, keep)
                self.scrub_pending = True
                self._vacuum_pending = True
                return self.scrub()
            except sqlite3.DatabaseError as exc:
                if not is_corruption(exc):
                    raise
                self._recreate(keep, exc)
                return True

    def _reset_unreadable(self, conn: sqlite3.Connection, keys: Sequence[str]) -> None:
        """Delete, inside the caller's write transaction, the state values of ``keys`` that
        fail authentication, and with a reset counter the federation file count it was last
        synced to (:data:`_SYNC_BASELINE`), so it catches up with the file from 0."""
        bad: list[str] = []
        for key in keys:
            try:
                self._get(conn, key, None)
            except StoreIntegrityError:
                logger.warning("state %r failed authentication; the erase resets it", key)
                bad.append(key)
        bad += [_SYNC_BASELINE[key] for key in bad if key in _SYNC_BASELINE]
        conn.executemany("DELETE FROM state WHERE key = ?", [(key,) for key in bad])

    def _recreate(self, keep: Sequence[str], cause: sqlite3.Error) -> None:
        """Erase a damaged store by deleting its files and starting an empty one (same key).

        Its rows cannot all be read, so they cannot be deleted one by one; what the user
        asked to erase is gone with the file. The ``keep`` state values that can still be
        read are carried over; one that cannot starts again. Another process that has the
        old file open (the federated client) keeps reading it until it opens the store again.
        """
        logger.warning("the local store %s is damaged (%s); erased as a whole", self.path, cause)
        kept: dict[str, Any] = {}
        for key in keep:
            try:
                value = self._get(self._conn, key, None)
            except (sqlite3.DatabaseError, DataError) as exc:
                logger.warning("%r could not be read from the damaged store (%s); reset", key, exc)
                continue
            if value is not None:
                kept[key] = value
        self._forget_history()
        try:
            self._conn.close()
        except sqlite3.Error as exc:
            logger.debug("closing the damaged store: %s", exc)
        remove_store_files(self.path)
        self._conn = self._connect(self.path, self._busy_timeout_ms, self._key_check)
        self.scrub_pending = self._vacuum_pending = False
        if kept:
            with self._write() as conn:
                for key, value in kept.items():
                    self._put(conn, key, value)

    def scrub(self, *, wait: bool = True) -> bool:
        """``VACUUM`` the file if an erase's has not run yet, copy the WAL into the main file
        and truncate it; True once no page of an erase is left behind (clears
        :attr:`scrub_pending`), False while a reader holds it back or the ``VACUUM`` fails
        (the disk full). ``wait=False`` gives up at once instead of waiting up to the busy
        timeout (for retries, which must not hold the store up)."""
        with self._lock:
            if not wait:
                self._conn.execute("PRAGMA busy_timeout = 0")
            try:
                if self._vacuum_pending:
                    try:
                        self._conn.execute("VACUUM")
                        self._vacuum_pending = False
                    except sqlite3.OperationalError as exc:  # disk full, I/O error, locked
                        (logger.warning if wait else logger.debug)(
                            "compacting the store after an erase failed (%s); the erased "
                            "rows are deleted and overwritten, and it is retried",
                            exc,
                        )
                busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            except sqlite3.OperationalError as exc:  # locked: another writer mid-transaction
                logger.debug("checkpoint deferred: %s", exc)
                busy = 1
            finally:
                if not wait:
                    self._conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            if not busy and not self._vacuum_pending:
                self.scrub_pending = False
            return not busy and not self._vacuum_pending
