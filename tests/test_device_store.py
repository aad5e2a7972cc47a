"""Device identity, encrypted local store and sealed model files (CPU, a few seconds)."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_ssh_private_key,
    load_ssh_public_key,
)
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from client.device.identity import (
    DeviceIdentity,
    DeviceLayout,
    IdentityError,
    ScryptParams,
    StateDirInUseError,
    StateDirLock,
    WrongPassphraseError,
    derive_passphrase_key,
    existing_identity_files,
    init_identity,
    read_passphrase_env,
    rotate_key,
)
from client.device.sealed import Catalog, SealedModelStore, sealed_name
from client.device.store import (
    SCHEMA_VERSION,
    DeviceStore,
    Event,
    Feedback,
    Impression,
    StoreIntegrityError,
    UnknownImpressionError,
    WrongDataKeyError,
)
from fedrec.commands.client import app as client_app
from server.state import ClientRegistry, load_public_key
from shared.errors import ConfigError, DataError, ModelFileError
from shared.ondevice.runtime import ModelMetadata, OnDeviceModel

REPO = Path(__file__).resolve().parents[1]
SECRET_IDS = [f"secret-item-{i:04d}-zq" for i in range(40)]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def store(tmp_path: Path, key: bytes) -> Iterator[DeviceStore]:
    s = DeviceStore.open(tmp_path / "store.db", key)
    yield s
    s.close()


# --------------------------------------------------------------------------- store


def test_events_roundtrip_in_time_order_and_count_adaptation(store: DeviceStore) -> None:
    ids = store.add_events(
        [
            Event("b", "click", 20.0),
            Event("a", "view", 10.0),
            Event("c", "rating", 20.0, rating=4.5),
        ]
    )
    assert ids == [1, 2, 3]
    assert [(e.item_id, e.kind, e.rating) for e in store.events()] == [
        ("a", "view", None),
        ("b", "click", None),
        ("c", "rating", 4.5),
    ]
    assert store.count_events() == 3 and store.adaptation_pending() == 3
    assert store.consume_adaptation_pending(2) == 1
    store.set_state("bandit", {"theta": [0.5, 1.0]})
    assert store.get_state("bandit") == {"theta": [0.5, 1.0]}
    assert store.record_round_joined() == 1


def test_events_are_validated() -> None:
    with pytest.raises(DataError, match="must have a rating"):
        Event("a", "rating", 1.0)
    with pytest.raises(DataError, match="must not have"):
        Event("a", "view", 1.0, rating=3.0)
    with pytest.raises(DataError, match="milliseconds"):
        Event("a", "view", 1.7e12)
    with pytest.raises(DataError, match="kind"):
        Event("a", "like", 1.0)  # type: ignore[arg-type]


def test_rows_stored_while_the_clock_ran_fast_stay_readable_once_it_is_corrected(
    store: DeviceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The "at most a day ahead" rule is for input: rows stored while the device clock ran
    days fast (the daemon stamps "now") were unreadable after the clock was corrected, and
    with them the whole history (every GET /recommendations a 500)."""
    import client.device.store as store_module

    real = time.time
    fast = real() + 3 * 86_400
    monkeypatch.setattr(store_module.time, "time", lambda: fast)
    store.record_impressions([Impression("r" * 32, "a", 1, 1.0, fast)])
    store.add_events([Event("a", "view", fast)])
    store.add_feedback([Feedback("r" * 32, "a", "clicked", fast)])
    monkeypatch.setattr(store_module.time, "time", real)  # NTP corrects the clock
    assert [(e.kind, e.timestamp) for e in store.events()] == [("view", fast), ("click", fast)]
    assert [(f.item_id, f.timestamp) for f in store.feedback()] == [("a", fast)]
    # input dated ahead of the (corrected) clock is still refused, and nothing is stored
    with pytest.raises(DataError, match="days ahead of this device's clock"):
        store.add_events([Event("b", "view", fast)])
    with pytest.raises(DataError, match="days ahead of this device's clock"):
        store.add_feedback([Feedback("r" * 32, "a", "shown", fast)])
    assert store.count_events() == 2 and len(store.feedback()) == 1


def _raw_bytes(db: Path) -> bytes:
    return b"".join(
        Path(f"{db}{s}").read_bytes() for s in ("", "-wal", "-shm") if Path(f"{db}{s}").exists()
    )


def test_database_file_holds_no_plaintext_item_ids(tmp_path: Path, key: bytes) -> None:
    db = tmp_path / "store.db"
    store = DeviceStore.open(db, key)
    store.add_events([Event(i, "view", 1000.0 + n) for n, i in enumerate(SECRET_IDS)])
    imps = [Impression("ab" * 16, i, r, 1.0, 5.0) for r, i in enumerate(SECRET_IDS[:5], 1)]
    store.record_impressions(imps)
    store.add_feedback([Feedback("ab" * 16, SECRET_IDS[0], "clicked", 6.0)])
    # the history decrypted for requests stays in memory: no file holds any of it
    store.add_events([Event(SECRET_IDS[1], "view", 7.0, stamped=True)])
    assert len(store.events()) == len(SECRET_IDS) + 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "store.db",
        "store.db-shm",
        "store.db-wal",
    ]
    assert _mode(db) == 0o600 and _mode(Path(f"{db}-wal")) == 0o600
    raw = _raw_bytes(db)  # while open: the rows are in the WAL
    # (a short marker would be flaky: random ciphertext holds any 2 given bytes by chance)
    assert b"secret-item" not in raw and b"-0007-zq" not in raw
    store.close()  # checkpointed into the main file
    raw = _raw_bytes(db)
    assert b"secret-item" not in raw
    # and yet they are all there
    with DeviceStore.open(db, key) as again:  # (the click is an event too, the oldest)
        assert [e.item_id for e in again.events()] == [SECRET_IDS[0], *SECRET_IDS, SECRET_IDS[1]]


class _Decrypts:
    """Counts the event rows each store decrypts (``DeviceStore._event_row``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by: list[DeviceStore] = []
        real = DeviceStore._event_row

        def counting(store: DeviceStore, *row: Any) -> Event:
            self.by.append(store)
            return real(store, *row)

        monkeypatch.setattr(DeviceStore, "_event_row", counting)

    def of(self, store: DeviceStore) -> int:
        """Rows ``store`` decrypted since the last call (the count then starts again)."""
        n = sum(s is store for s in self.by)
        self.by.clear()
        return n


def _fresh_events(db: Path, key: bytes) -> list[Event]:
    """The history as a store opened anew decrypts it (its close checkpoints the WAL, a
    commit to the file other connections see, as the ClientApp's does)."""
    with DeviceStore.open(db, key) as again:
        return again.events()


def test_the_history_is_decrypted_once_and_kept_current_by_the_stores_own_writes(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every recommendation decrypted the whole history (and a stamped event all of it
    again for the newest time), tenths of a second at tens of thousands of events. Now each
    row is decrypted once; what is served is what a fresh read gives after every write."""
    db = tmp_path / "store.db"
    decrypts = _Decrypts(monkeypatch)
    with DeviceStore.open(db, key) as first:
        first.add_events([Event("b", "view", 20.0), Event("a", "view", 10.0)])
    with DeviceStore.open(db, key) as store:
        assert [e.item_id for e in store.events()] == ["a", "b"]
        assert decrypts.of(store) == 2  # the rows on file; the ones it adds are known to it
        assert store.events() == _fresh_events(db, key)
        assert decrypts.of(store) == 0  # a second read, after another connection's checkpoint
        now = time.time()
        store.add_events([Event("c", "view", now - 5), Event("d", "rating", 15.0, rating=4.0)])
        store.add_events([Event("e", "view", 5.0, stamped=True)])  # the newest time, kept
        store.record_impressions(
            [Impression("r" * 32, i, r, 1.0, now) for r, i in [(1, "f"), (2, "g")]]
        )
        store.add_feedback([Feedback("r" * 32, "f", "clicked", 1.0, stamped=True)])
        history = store.events()
        assert decrypts.of(store) == 0
        assert [(e.item_id, e.timestamp) for e in history] == [
            ("a", 10.0),
            ("d", 15.0),
            ("b", 20.0),
            ("c", now - 5),
            ("e", now - 5),
            ("f", now - 5),
        ]
        assert history == _fresh_events(db, key)
        history.clear()  # a copy: the caller's to change
        assert len(store.events()) == 6
        # a write that fails after its click event was added leaves nothing of it in memory
        with monkeypatch.context() as failing, pytest.raises(ZeroDivisionError):
            failing.setattr(store, "_remember_feedback_ids", lambda *a: 1 / 0)
            store.add_feedback([Feedback("r" * 32, "g", "clicked", 30.0, feedback_id="fb")])
        assert [e.item_id for e in store.events()] == ["a", "d", "b", "c", "e", "f"]
        # an erase forgets the plaintext too; row ids start again from 1 after it
        store.erase()
        assert store.events() == [] and not store._plain
        store.add_events([Event("h", "click", 1.0)])
        assert store.events() == _fresh_events(db, key) == [Event("h", "click", 1.0, id=1)]


def test_a_write_through_another_connection_is_seen_and_an_event_it_deleted_is_not_served(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's store shares the file with other connections (the ClientApp process,
    a second store object): their commits change ``PRAGMA data_version``, and the history
    in memory is listed again, decrypting only the rows it has not seen."""
    db = tmp_path / "store.db"
    decrypts = _Decrypts(monkeypatch)
    with DeviceStore.open(db, key) as daemon, DeviceStore.open(db, key) as other:
        other.add_events([Event(f"m{i}", "view", 10.0 + i) for i in range(5)])
        assert len(daemon.events()) == 5 and decrypts.of(daemon) == 5
        assert len(daemon.events()) == 5 and decrypts.of(daemon) == 0
        later = time.time() + 600  # within the clock-skew bound
        other.add_events([Event("x", "view", later)])
        assert daemon.events() == _fresh_events(db, key)
        assert daemon.events()[-1].item_id == "x" and decrypts.of(daemon) == 1
        # the newest time comes from the file, not from what this store last read
        other.add_events([Event("y", "view", later + 60)])
        daemon.add_events([Event("z", "view", time.time(), stamped=True)])
        assert [(e.item_id, e.timestamp) for e in daemon.events()[-2:]] == [
            ("y", later + 60),
            ("z", later + 60),
        ]
        assert daemon.events() == _fresh_events(db, key) == other.events()
        # an erase through the other connection: nothing of it is served, nor kept in memory
        other.erase()
        assert daemon.events() == [] and not daemon._plain
        other.add_events([Event("n", "view", 1.0)])  # row id 1 again, another payload
        assert daemon.events() == [Event("n", "view", 1.0, id=1)] == _fresh_events(db, key)


def test_the_store_keeps_sqlites_temporary_data_in_memory(store: DeviceStore) -> None:
    """SQLite's default put temporary tables and indices (VACUUM, large sorts) in files
    under /tmp, outside the device's folder and its erase."""
    assert store._conn.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
    assert store._conn.execute("PRAGMA secure_delete").fetchone()[0] == 1


def test_wrong_key_is_refused_clearly(tmp_path: Path, key: bytes) -> None:
    db = tmp_path / "store.db"
    with DeviceStore.open(db, key) as store:
        store.add_events([Event("x", "view", 1.0)])
    with pytest.raises(WrongDataKeyError, match=r"does not open the local store.*passphrase"):
        DeviceStore.open(db, os.urandom(32))
    with pytest.raises(Exception, match="32 raw bytes"):
        DeviceStore.open(db, key.hex().encode())


def test_swapped_or_flipped_rows_fail_authentication(tmp_path: Path, key: bytes) -> None:
    db = tmp_path / "store.db"
    with DeviceStore.open(db, key) as store:
        store.add_events([Event("a", "view", 1.0), Event("b", "view", 2.0)])
    with sqlite3.connect(db) as conn:  # an attacker swaps the two ciphertexts
        (p1,), (p2,) = conn.execute("SELECT payload FROM events ORDER BY id").fetchall()
        conn.execute("UPDATE events SET payload = ? WHERE id = 1", (p2,))
        conn.execute("UPDATE events SET payload = ? WHERE id = 2", (p1,))
    with (
        DeviceStore.open(db, key) as store,
        pytest.raises(StoreIntegrityError, match=r"events#\d.*failed authentication"),
    ):
        store.events()
    with sqlite3.connect(db) as conn:  # restore, then change the kind in clear
        conn.execute("UPDATE events SET payload = ? WHERE id = 1", (p1,))
        conn.execute("UPDATE events SET payload = ? WHERE id = 2", (p2,))
        conn.execute("UPDATE events SET kind = 'click' WHERE id = 1")
    with DeviceStore.open(db, key) as store, pytest.raises(StoreIntegrityError, match="events#1"):
        store.events()


def test_a_payload_or_key_check_rewritten_as_another_type_is_a_typed_error(
    tmp_path: Path, key: bytes
) -> None:
    """SQLite keeps any type in any column: a payload rewritten as TEXT or a number raised a
    bare TypeError from AES-GCM or len() instead of StoreIntegrityError, and a key check value
    rewritten with a non-ASCII character a TypeError from compare_digest."""
    db = tmp_path / "store.db"
    with DeviceStore.open(db, key) as store:
        store.add_events([Event("a", "view", 1.0)])
        store.set_state("k", 1)
    for value in ("x" * 40, 12345, 1.5):
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE events SET payload = ?", (value,))
            conn.execute("UPDATE state SET payload = ? WHERE key = 'k'", (value,))
        with DeviceStore.open(db, key) as store:
            with pytest.raises(StoreIntegrityError, match=r"events#1.*failed authentication"):
                store.events()
            with pytest.raises(StoreIntegrityError, match=r"state#k.*failed authentication"):
                store.get_state("k")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = 'é' WHERE key = 'key_check'")
    with pytest.raises(WrongDataKeyError, match="does not open the local store"):
        DeviceStore.open(db, key)


def test_schema_version_and_foreign_files_are_refused(tmp_path: Path, key: bytes) -> None:
    db = tmp_path / "store.db"
    DeviceStore.open(db, key).close()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(DataError, match=r"schema v99.*upgrade fedrec"):
        DeviceStore.open(db, key)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(DataError, match="not a fedrec device store"):
        DeviceStore.open(other, key)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DataError, match="not a fedrec device store"):
        DeviceStore.open(junk, key)


def test_a_store_this_user_cannot_write_is_not_called_a_foreign_file(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store SQLite can open only read-only (its files or folder left by a run as root)
    was reported as "not a fedrec device store; move it away (the daemon then starts an
    empty one)": advice that sets the user's data aside instead of naming the permissions.
    Tests run as root, which writes any file: SQLite is made to open the store read-only."""
    from client.device import store as store_module

    connect = sqlite3.connect
    monkeypatch.setattr(
        store_module.sqlite3,
        "connect",
        lambda path, **kw: connect(f"file:{path}?mode=ro", uri=True, **kw),
    )
    with pytest.raises(DataError) as info:
        DeviceStore.open(tmp_path / "store.db", key)
    message = str(info.value)
    assert "not a fedrec device store" not in message and "move it away" not in message
    assert "readonly" in message and "read and write" in message and "chown" in message


def test_store_is_in_wal_mode_with_full_sync(store: DeviceStore) -> None:
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from client.device.store import DeviceStore, Event
    store = DeviceStore.open(sys.argv[1], bytes.fromhex(os.environ["FEDREC_TEST_KEY"]))
    for i in range(100000):
        store.add_events([Event(f"item-{i}", "view", 1000.0 + i)])
        print(f"acked {i}", flush=True)
    """
)


def test_acknowledged_writes_survive_kill_9(tmp_path: Path, key: bytes) -> None:
    db = tmp_path / "store.db"
    env = {**os.environ, "FEDREC_TEST_KEY": key.hex(), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert proc.stdout is not None
    acked: list[int] = []
    deadline = time.monotonic() + 60
    while len(acked) < 30 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(int(line.split()[1]))
    os.kill(proc.pid, signal.SIGKILL)  # mid-way: the writer is still writing
    proc.wait()
    assert len(acked) == 30, "the writer did not get going"
    # it may have acknowledged more before the kill landed: those are in the pipe
    acked += [int(line.split()[1]) for line in proc.stdout.read().splitlines()]
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with DeviceStore.open(db, key) as store:
        stored = {e.item_id for e in store.events()}
    assert {f"item-{i}" for i in acked} <= stored
    assert len(stored) <= len(acked) + 1  # at most the one in flight when killed


def test_feedback_must_refer_to_an_impression(store: DeviceStore) -> None:
    rec = "0123456789abcdef0123456789abcdef"
    store.record_impressions([Impression(rec, "a", 1, 2.0, 1.0), Impression(rec, "b", 2, 1.0, 1.0)])
    with pytest.raises(UnknownImpressionError, match=r"1 item.*'zzz'") as err:
        store.add_feedback([Feedback(rec, "a", "shown", 2.0), Feedback(rec, "zzz", "clicked", 2.0)])
    assert err.value.pairs == [(rec, "zzz")]
    assert store.feedback() == []  # atomic: the valid entry was not stored either
    other = "f" * 32
    with pytest.raises(UnknownImpressionError):
        store.add_feedback([Feedback(other, "a", "shown", 2.0)])  # right item, wrong list
    pending = store.adaptation_pending()
    stored = store.add_feedback(
        [Feedback(rec, "a", "shown", 2.0), Feedback(rec, "a", "clicked", 3)]
    )
    assert len(stored.ids) == 2 and len(stored.click_events) == 1
    assert [(f.item_id, f.action) for f in store.feedback()] == [("a", "shown"), ("a", "clicked")]
    # the click is behaviour too: an event of the history, pending for the next adaptation
    assert [(e.item_id, e.kind, e.timestamp) for e in store.events()] == [("a", "click", 3.0)]
    assert store.adaptation_pending() == pending + 1
    # a retried click of the same impression adds no second event; another impression does
    store.record_impressions([Impression("e" * 32, "b", 1, 1.0, 4.0)])
    again = store.add_feedback(
        [Feedback(rec, "a", "clicked", 5.0), Feedback("e" * 32, "b", "clicked", 6)]
    )
    assert len(again.ids) == 2 and len(again.click_events) == 1
    assert [(e.item_id, e.kind) for e in store.events()] == [("a", "click"), ("b", "click")]
    # an app that also posted the click to /events before reporting it: not stored twice
    store.add_events([Event("c", "click", 7.0)])
    store.record_impressions([Impression("d" * 32, "c", 1, 1.0, 7.5)])
    assert store.add_feedback([Feedback("d" * 32, "c", "clicked", 8.0)]).click_events == []
    assert [e.item_id for e in store.events()].count("c") == 1


def test_old_impressions_expire(tmp_path: Path, key: bytes) -> None:
    with DeviceStore.open(tmp_path / "s.db", key, max_impressions=3) as store:
        for n in range(5):
            store.record_impressions([Impression(f"{n:032x}", "a", 1, 1.0, 1.0)])
        assert store.stats().impressions == 3
        assert store.missing_impressions([(f"{0:032x}", "a"), (f"{4:032x}", "a")]) == [
            (f"{0:032x}", "a")
        ]


def test_feedback_of_expired_impressions_is_not_kept(tmp_path: Path, key: bytes) -> None:
    """Impressions expire beyond ``max_impressions``, but every feedback report stayed in
    the store for good (an app reports every item it shows): on a device running for months
    the table grew without bound, and each ``POST /feedback`` scanned all of it. Feedback
    whose slate has expired can no longer be matched to anything and goes with it; the
    count ``/status`` shows still includes it (until an erase)."""
    with DeviceStore.open(tmp_path / "s.db", key, max_impressions=20) as store:
        for n in range(50):
            rec = f"{n:032x}"
            store.record_impressions([Impression(rec, item, 1, 1.0, 1.0) for item in "abcd"])
            store.add_feedback([Feedback(rec, item, "shown", 2.0) for item in "abcd"])
        stats = store.stats()
        assert stats.impressions == 20 and stats.feedback == 200
        rows = store.feedback()
        assert len(rows) <= 24
        last = f"{49:032x}"
        assert store.reported([(last, "a")]) == {(last, "a")}
        assert store.erase() and store.stats().feedback == 0


def test_rounds_joined_follow_the_federation_file_and_survive_its_reset(
    tmp_path: Path, key: bytes
) -> None:
    with DeviceStore.open(tmp_path / "store.db", key) as store:
        assert store.sync_rounds_joined(3) == 3  # three rounds written by the training side
        assert store.sync_rounds_joined(3) == 0  # nothing new: each round counts once
        assert store.sync_rounds_joined(5) == 2
        # joined.json lost or corrupt: the training side starts again from 0 and writes 1;
        # that round is new and counts, and so do the next ones
        assert store.sync_rounds_joined(1) == 1
        assert store.sync_rounds_joined(2) == 1
        store.erase()
        assert store.sync_rounds_joined(2) == 0  # the erase keeps the count and its baseline
        assert store.stats().rounds_joined == 7
    # a store from before the baseline key kept its counter equal to the file's count
    with DeviceStore.open(tmp_path / "old.db", key) as old:
        old.record_round_joined()
        old.record_round_joined()
        assert old.sync_rounds_joined(3) == 1
        assert old.stats().rounds_joined == 3
    with pytest.raises(ValueError, match=">= 0"), DeviceStore.open(tmp_path / "store.db", key) as s:
        s.sync_rounds_joined(-1)


def test_rounds_without_dp_follow_the_federation_file_and_survive_its_reset(
    tmp_path: Path, key: bytes
) -> None:
    with DeviceStore.open(tmp_path / "store.db", key) as store:
        store.sync_rounds_joined(3, without_dp=2)
        store.sync_rounds_joined(4, without_dp=2)  # a round with DP
        assert store.stats().rounds_without_dp == 2
        store.sync_rounds_joined(1, without_dp=1)  # the file restarted from 0: one more
        store.sync_rounds_joined(2, without_dp=1)
        store.sync_rounds_joined(2)  # without the file's count: left as it is
        assert (store.stats().rounds_joined, store.stats().rounds_without_dp) == (6, 3)
        store.erase()
        store.sync_rounds_joined(2, without_dp=1)
        assert store.stats().rounds_without_dp == 3


def test_erase_deletes_data_but_keeps_rounds_joined(tmp_path: Path, key: bytes) -> None:
    db = tmp_path / "store.db"
    with DeviceStore.open(db, key) as store:
        store.add_events([Event(i, "view", 1.0) for i in SECRET_IDS])
        store.record_impressions([Impression("c" * 32, SECRET_IDS[0], 1, 1.0, 1.0)])
        store.add_feedback([Feedback("c" * 32, SECRET_IDS[0], "shown", 1.0)])
        store.set_state("bandit", {"x": 1})
        store.record_round_joined()
        store.record_round_joined()
        store.erase()
        stats = store.stats()
        assert (stats.events, stats.feedback, stats.impressions, stats.adaptation_pending) == (
            0,
            0,
            0,
            0,
        )
        assert store.get_state("bandit") is None
        assert stats.rounds_joined == 2
        store.add_events([Event("after", "view", 2.0)])  # still usable
        assert [e.item_id for e in store.events()] == ["after"]


def test_an_erase_resets_a_kept_counter_that_fails_authentication(
    tmp_path: Path, key: bytes
) -> None:
    """A kept state row that failed authentication (one bit flipped on disk: SQLite has no
    page checksums) survived the erase, so stats() and every round's sync kept raising
    StoreIntegrityError, whose advice is that very erase. The erase now resets that counter
    and its file baseline, and the counter catches up with the federation's file."""
    db = tmp_path / "store.db"
    with DeviceStore.open(db, key) as store:
        store.add_events([Event("a", "view", 1.0)])
        store.sync_rounds_joined(3, without_dp=1)
    with sqlite3.connect(db) as conn:
        (blob,) = conn.execute("SELECT payload FROM state WHERE key = 'rounds_joined'").fetchone()
        flipped = bytearray(blob)
        flipped[20] ^= 1
        conn.execute("UPDATE state SET payload = ? WHERE key = 'rounds_joined'", (bytes(flipped),))
    with DeviceStore.open(db, key) as store:
        with pytest.raises(StoreIntegrityError, match="state#rounds_joined"):
            store.stats()
        store.erase()
        assert store.count_events() == 0
        assert store.sync_rounds_joined(4, without_dp=1) == 4  # caught up with the file
        stats = store.stats()
        assert (stats.rounds_joined, stats.rounds_without_dp) == (4, 1)


class _NoRoomToVacuum:
    """A store connection whose ``VACUUM`` fails as on a full disk (it needs room for a copy
    of the file); everything else goes to the real connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql.strip().upper() == "VACUUM":
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


def test_an_erase_whose_vacuum_fails_still_erases_and_compacts_later(
    store: DeviceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VACUUM after the committed DELETE raised, so the erase was reported as failed
    ("nothing was changed, retry") though the events were gone."""
    store.add_events([Event(i, "view", 1.0) for i in SECRET_IDS])
    real = store._conn
    monkeypatch.setattr(store, "_conn", _NoRoomToVacuum(real))
    assert store.erase() is False  # erased; the compaction is still to do
    assert store.count_events() == 0 and store.scrub_pending
    assert store.scrub(wait=False) is False and store.scrub_pending  # still no room
    monkeypatch.setattr(store, "_conn", real)
    assert store.scrub(wait=False) is True and not store.scrub_pending
    assert SECRET_IDS[0].encode() not in _raw_bytes(store.path)


def test_a_store_whose_schema_cannot_be_written_is_a_typed_error(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creating the schema of a new store on a full disk raised a raw sqlite3
    OperationalError ('database or disk is full'): `fedrec client install-model`, `start`
    and `serve-api` on a fresh device printed a traceback. It is the DataError of a store
    that cannot be opened for writing, naming the fix; the store opens once there is room."""
    import client.device.store as store_module

    def full(conn: sqlite3.Connection, script: str) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    db = tmp_path / "store.db"
    with monkeypatch.context() as patched:
        patched.setattr(store_module, "_run_script", full)
        with pytest.raises(DataError, match=r"disk is full.*the disk must have room"):
            DeviceStore.open(db, key)
    with DeviceStore.open(db, key) as store:
        assert store.count_events() == 0


def _damage(db: Path, page: int) -> None:
    """Overwrite page ``page`` (0-based, 4096 bytes) of a closed store with junk."""
    with open(db, "r+b") as f:
        f.seek(4096 * page)
        f.write(b"\xff" * 4096)


def _filled_store(db: Path, key: bytes) -> None:
    with DeviceStore.open(db, key) as store:
        store.add_events([Event(str(i), "view", 1000.0 + i) for i in range(3000)])
        store.record_round_joined()


def test_a_damaged_store_is_refused_at_open_with_a_typed_error(tmp_path: Path, key: bytes) -> None:
    """A damaged schema page escaped as a raw sqlite3.DatabaseError (a traceback from
    `fedrec client serve-api`)."""
    from client.device.store import StoreCorruptError

    db = tmp_path / "store.db"
    _filled_store(db, key)
    _damage(db, 2)
    with pytest.raises(StoreCorruptError, match=r"store\.db is damaged .*move it .* away"):
        DeviceStore.open(db, key)


def test_erasing_a_damaged_store_deletes_it_and_keeps_what_it_can(
    tmp_path: Path, key: bytes
) -> None:
    """A damaged data page made the erase fail (its DELETE reads every row), so the user's
    data could never be erased; now the file goes, with the readable kept state carried."""
    db = tmp_path / "store.db"
    _filled_store(db, key)
    _damage(db, 60)
    with DeviceStore.open(db, key) as store:
        with pytest.raises(sqlite3.DatabaseError, match="malformed"):
            store.events()
        assert store.erase() is True
        assert store.count_events() == 0 and store.events() == []
        assert store.stats().rounds_joined == 1
        store.add_events([Event("after", "view", 2.0)])  # usable, with the same key
    with DeviceStore.open(db, key) as store:
        assert [e.item_id for e in store.events()] == ["after"]


# --------------------------------------------------------------------------- identity


def test_init_identity_files_and_formats(tmp_path: Path) -> None:
    result = init_identity(tmp_path / "dev")
    layout = result.layout
    for secret in (layout.private_key, layout.data_key, layout.api_token):
        assert _mode(secret) == 0o600, secret
    assert _mode(layout.identity_dir) == 0o700
    assert not layout.data_key_kdf.exists()
    # what Flower reads: the SuperNode loads the private key with load_ssh_private_key, and
    # `flwr supernode register` loads the public key with load_ssh_public_key
    private = load_ssh_private_key(layout.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp256r1"
    public = load_ssh_public_key(layout.public_key.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert result.public_key_openssh.startswith("ecdsa-sha2-nistp256 ")
    identity = DeviceIdentity.load(layout.state_dir)
    assert len(identity.data_key()) == 32 and len(identity.api_token()) >= 32
    assert identity.device_id == result.device_id and result.device_id.startswith("SHA256:")
    with pytest.raises(IdentityError, match=r"already exists.*--force"):
        init_identity(layout.state_dir)
    again = init_identity(layout.state_dir, force=True)
    assert again.public_key_openssh != result.public_key_openssh


def test_flower_accepts_the_public_key(tmp_path: Path) -> None:
    register = pytest.importorskip("flwr.cli.supernode.register")
    layout = init_identity(tmp_path).layout
    assert register.try_load_public_key(layout.public_key)


def test_secret_files_readable_by_others_are_refused(tmp_path: Path) -> None:
    layout = init_identity(tmp_path).layout
    os.chmod(layout.data_key, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        DeviceIdentity.load(tmp_path).data_key()


def test_a_damaged_api_token_is_named_with_its_fix(tmp_path: Path) -> None:
    """An api.token whose bytes are not text raised a bare UnicodeDecodeError from every
    `client start` and `client status`; it is the IdentityError a too-short one gives."""
    layout = init_identity(tmp_path).layout
    assert len(DeviceIdentity.load(tmp_path).api_token()) >= 16
    layout.api_token.write_bytes(b"\xff" * 40)
    with pytest.raises(IdentityError, match=r"holds no usable token.*init --force"):
        DeviceIdentity.load(tmp_path).api_token()


def test_passphrase_key_is_derived_and_checked(tmp_path: Path) -> None:
    result = init_identity(tmp_path, passphrase="correct horse", passphrase_env="MY_PASS")
    assert result.data_key_mode == "passphrase"
    layout = result.layout
    assert not layout.data_key.exists() and _mode(layout.data_key_kdf) == 0o600
    assert b"correct horse" not in layout.data_key_kdf.read_bytes()
    identity = DeviceIdentity.load(tmp_path)
    assert identity.passphrase_env() == "MY_PASS"
    k1 = identity.data_key("correct horse")
    assert k1 == identity.data_key("correct horse") and len(k1) == 32
    with pytest.raises(WrongPassphraseError, match="does not unlock"):
        identity.data_key("wrong horse")
    with pytest.raises(WrongPassphraseError, match="MY_PASS"):
        identity.data_key()


def test_a_passphrase_is_its_bytes_whatever_the_locale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon read the passphrase through os.environ, decoded with the locale's codec:
    a device set up with "päss" under a UTF-8 locale was refused ("does not unlock") when
    started under a Latin-1 one (LANG=en_US.ISO-8859-1), which spells the same bytes
    "pÃ¤ss". A device set up under that locale before still opens there."""
    raw = "päss".encode()
    init_identity(tmp_path / "utf8", passphrase="päss", passphrase_env="MY_PASS")
    init_identity(tmp_path / "latin1", passphrase=raw.decode("latin-1"), passphrase_env="MY_PASS")
    # what a Latin-1 locale's interpreter holds: the bytes, and their Latin-1 spelling
    monkeypatch.setattr(os, "environb", {b"MY_PASS": raw})
    monkeypatch.setattr(os, "environ", {"MY_PASS": raw.decode("latin-1")})
    monkeypatch.setattr(sys, "getfilesystemencoding", lambda: "iso8859-1")
    passphrase = read_passphrase_env("MY_PASS")
    for device in ("utf8", "latin1"):
        assert len(DeviceIdentity.load(tmp_path / device).data_key(passphrase)) == 32
    with pytest.raises(WrongPassphraseError, match="does not unlock"):
        DeviceIdentity.load(tmp_path / "utf8").data_key("pass")


def test_a_malformed_passphrase_descriptor_is_an_identity_error(tmp_path: Path) -> None:
    """A list, a number past any float and JSON nested too deep raised AttributeError,
    OverflowError and RecursionError instead of the typed error naming the file."""
    layout = init_identity(
        tmp_path, passphrase="correct horse", passphrase_env="MY_PASS", scrypt=ScryptParams(n=16)
    ).layout
    good = layout.data_key_kdf.read_text()
    for text in (
        "[1, 2]",
        good.replace('"n": 16', '"n": 1e400'),
        "[" * 100_000 + "]" * 100_000,
    ):
        assert text != good
        layout.data_key_kdf.write_text(text)
        with pytest.raises(IdentityError, match=rf"{layout.data_key_kdf} is malformed"):
            DeviceIdentity.load(tmp_path).data_key("correct horse")


def test_passphrase_descriptor_parameters_out_of_range_are_refused_before_deriving(
    tmp_path: Path,
) -> None:
    """A damaged or edited data.key.scrypt.json was derived from as it stood: n=2**30 raised
    a bare MemoryError (a smaller one could get the daemon killed for memory, a large p ran
    for hours), an n not a power of two a ConfigError not naming the file, and a non-ASCII
    check value a TypeError from compare_digest. Each is now the IdentityError naming it."""
    layout = init_identity(
        tmp_path, passphrase="correct horse", passphrase_env="MY_PASS", scrypt=ScryptParams(n=16)
    ).layout
    good = layout.data_key_kdf.read_text()
    check = DeviceIdentity.load(tmp_path).kdf_descriptor()["check"]
    for text in (
        good.replace('"n": 16', f'"n": {2**30}'),
        good.replace('"n": 16', '"n": 24'),
        good.replace('"p": 1', '"p": 17'),
        good.replace(check, "\u00e9" * 32),
        good.replace(f'"check": "{check}"', '"check": 7'),
    ):
        assert text != good
        layout.data_key_kdf.write_text(text)
        with pytest.raises(IdentityError, match=rf"{layout.data_key_kdf} is malformed"):
            DeviceIdentity.load(tmp_path).data_key("correct horse")
    layout.data_key_kdf.write_text(good)
    assert len(DeviceIdentity.load(tmp_path).data_key("correct horse")) == 32
    with pytest.raises(ConfigError, match="past the limits"):
        ScryptParams(n=2**20, r=16)


# --------------------------------------------------------------------------- CLI init

runner = CliRunner()


def test_cli_init_creates_0600_files_and_refuses_to_overwrite(tmp_path: Path) -> None:
    state = tmp_path / "device"
    result = runner.invoke(client_app, ["init", "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    layout = DeviceLayout(state)
    assert result.stdout.strip() == layout.public_key.read_text().strip()
    assert "flwr supernode register" in result.stderr
    for secret in (layout.private_key, layout.data_key, layout.api_token):
        assert _mode(secret) == 0o600
    before = layout.private_key.read_bytes()
    again = runner.invoke(client_app, ["init", "--state-dir", str(state)])
    assert again.exit_code != 0
    assert isinstance(again.exception, IdentityError)
    assert "--force" in str(again.exception)
    assert layout.private_key.read_bytes() == before
    forced = runner.invoke(client_app, ["init", "--state-dir", str(state), "--force"])
    assert forced.exit_code == 0 and layout.private_key.read_bytes() != before


@pytest.mark.parametrize("failing", ["client.pub", "api.token", "catalog.json"])
def test_a_first_init_that_fails_on_a_full_disk_leaves_no_part_of_an_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """`client init` on a disk that filled up after its first files ended with "free space
    on that disk and retry", but the files it had written (the private key, ...) made the
    retry "a device identity already exists ... Pass --force" (and `start` asked for
    --force too). A first init that fails now removes what it wrote, so the retry works."""
    import errno

    real_replace = os.replace

    def full(src: str, dst: str | Path) -> None:
        if Path(dst).name == failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    state = tmp_path / "device"
    catalog = tmp_path / "catalog.json"
    catalog.write_text('["a", "b"]')
    args = ["init", "--state-dir", str(state), "--catalog", str(catalog)]
    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", full)
        result = runner.invoke(client_app, args)
    assert isinstance(result.exception, OSError) and result.exception.errno == errno.ENOSPC
    layout = DeviceLayout(state)
    assert existing_identity_files(layout) == []
    assert not [p for p in layout.identity_dir.iterdir() if p.name.endswith(".tmp")]
    again = runner.invoke(client_app, args)
    assert again.exit_code == 0, again.output
    assert DeviceIdentity.load(state).public_key_openssh == again.stdout.strip()


def test_init_refuses_a_store_whose_identity_is_gone(tmp_path: Path) -> None:
    state = tmp_path / "device"
    assert runner.invoke(client_app, ["init", "--state-dir", str(state)]).exit_code == 0
    layout = DeviceLayout(state)
    layout.store_db.write_bytes(b"events sealed with the lost key")
    shutil.rmtree(layout.identity_dir)
    again = runner.invoke(client_app, ["init", "--state-dir", str(state)])
    assert isinstance(again.exception, IdentityError)
    assert "holds a local store (store.db) but no identity" in str(again.exception)
    assert layout.store_db.read_bytes() == b"events sealed with the lost key"
    forced = runner.invoke(client_app, ["init", "--state-dir", str(state), "--force"])
    assert forced.exit_code == 0 and not layout.store_db.exists()


def test_cli_init_with_passphrase_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "device"
    missing = runner.invoke(
        client_app, ["init", "--state-dir", str(state), "--passphrase-env", "P"]
    )
    assert "environment variable P is not set" in str(missing.exception)
    assert not DeviceLayout(state).private_key.exists()
    monkeypatch.setenv("FEDREC_TEST_PASS", "s3cret passphrase")
    args = ["init", "--state-dir", str(state), "--passphrase-env", "FEDREC_TEST_PASS"]
    result = runner.invoke(client_app, args)
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    assert DeviceIdentity.load(state).data_key("s3cret passphrase")
    bad = runner.invoke(client_app, ["init", "--state-dir", str(state), "--passphrase-env", "a b"])
    assert "name* of an environment variable" in str(bad.exception)


def test_a_passphrase_that_is_not_utf8_derives_the_key_of_its_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A passphrase exported from a Latin-1 terminal (Python reads its byte 0xE9 as a lone
    surrogate) raised UnicodeEncodeError in `client init` after client.key was written (a
    half identity, refused by the next init); its key is now scrypt over the bytes as typed,
    and a UTF-8 passphrase's key is unchanged."""
    params = ScryptParams(n=16)
    salt = b"s" * 16
    assert derive_passphrase_key("caf\u00e9", salt, params) == Scrypt(
        salt=salt, length=32, n=16, r=8, p=1
    ).derive(b"caf\xc3\xa9")
    latin1 = os.fsdecode(b"caf\xe9")
    assert derive_passphrase_key(latin1, salt, params) == Scrypt(
        salt=salt, length=32, n=16, r=8, p=1
    ).derive(b"caf\xe9")
    state = tmp_path / "device"
    monkeypatch.setenv("FEDREC_TEST_PASS", latin1)
    args = ["init", "--state-dir", str(state), "--passphrase-env", "FEDREC_TEST_PASS"]
    result = runner.invoke(client_app, args)
    assert result.exit_code == 0, result.exception
    identity = DeviceIdentity.load(state)
    assert identity.data_key(os.environ["FEDREC_TEST_PASS"]) == identity.data_key(latin1)
    with pytest.raises(WrongPassphraseError):
        identity.data_key("caf\u00e9")  # the UTF-8 spelling is another passphrase


def test_cli_rotate_key_replaces_only_the_key_pair(tmp_path: Path, key: bytes) -> None:
    state = tmp_path / "device"
    first = init_identity(state)
    layout = first.layout
    identity = DeviceIdentity.load(state)
    with DeviceStore.open(layout.store_db, identity.data_key()) as store:
        store.add_events([Event(i, "view", 1.0) for i in SECRET_IDS])
    layout.ledger.parent.mkdir()
    layout.ledger.write_text('{"spent": "kept"}')
    kept = {p: p.read_bytes() for p in (layout.data_key, layout.api_token, layout.ledger)}
    server_fingerprint = load_public_key(first.public_key_openssh, source="old")[1]

    result = runner.invoke(client_app, ["rotate-key", "--state-dir", str(state)])

    assert result.exit_code == 0, result.output
    new_public = layout.public_key.read_text().strip()
    assert result.stdout.strip() == new_public != first.public_key_openssh
    assert layout.previous_public_key.read_text().strip() == first.public_key_openssh
    assert f"revoke-client {server_fingerprint}" in result.stderr
    # the old key's id is what the server's revoke-client takes; the new key is a new device
    assert f"revoke-client {server_fingerprint}" in result.stderr
    rotated = DeviceIdentity.load(state)
    assert rotated.device_id == load_public_key(new_public, source="new")[1]
    private = load_ssh_private_key(layout.private_key.read_bytes(), None)
    assert _mode(layout.private_key) == 0o600
    assert load_ssh_public_key(new_public.encode()).public_numbers() == (  # type: ignore[union-attr]
        private.public_key().public_numbers()  # type: ignore[union-attr]
    )
    assert {p: p.read_bytes() for p in kept} == kept  # data key, API token, ledger untouched
    with DeviceStore.open(layout.store_db, rotated.data_key()) as store:
        assert sorted(e.item_id for e in store.events()) == sorted(SECRET_IDS)
    # the server takes the new key where the old one was revoked after a SuperLink had it
    registry = ClientRegistry(tmp_path / "clients.json")
    old = registry.add(*load_public_key(first.public_key_openssh, source="old"), name="phone")
    old.node_id, old.revoked = 7, 1.0
    assert registry.add(*load_public_key(new_public, source="new"), name="phone-2").revoked is None


def test_init_force_keeps_the_replaced_key_for_the_operator_to_revoke(tmp_path: Path) -> None:
    """``init --force`` replaced the key pair without a word about the old one, which the
    SuperLink may still accept: it is kept in client.pub.previous, as ``rotate-key`` keeps
    its, and the output names the revoke command; a later rotate-key offers both."""
    state = tmp_path / "device"
    first = init_identity(state)
    result = runner.invoke(client_app, ["init", "--state-dir", str(state), "--force"])
    assert result.exit_code == 0, result.output
    layout = first.layout
    assert layout.previous_public_key.read_text().split("\n")[0] == first.public_key_openssh
    assert f"revoke-client {first.device_id}" in result.stderr
    second = DeviceIdentity.load(state).device_id
    assert second != first.device_id
    assert rotate_key(state).previous_device_ids == (first.device_id, second)
    fresh = runner.invoke(client_app, ["init", "--state-dir", str(tmp_path / "new"), "--force"])
    assert fresh.exit_code == 0 and "revoke-client" not in fresh.stderr  # nothing replaced


def test_a_damaged_key_is_named_with_its_fix_and_rotate_key_replaces_it(tmp_path: Path) -> None:
    """A garbage client.key gave a cryptography traceback in every command that reads it,
    rotate-key (the fix) included; and a missing API token sent the user to `client init`,
    which refuses an existing identity."""
    first = init_identity(tmp_path / "device")
    layout = first.layout
    layout.private_key.write_bytes(b"garbage")
    with pytest.raises(IdentityError, match=r"not a usable OpenSSH private key.*rotate-key"):
        DeviceIdentity.load(layout.state_dir).private_key()
    result = runner.invoke(client_app, ["serve-api", "--state-dir", str(layout.state_dir)])
    assert isinstance(result.exception, IdentityError)  # the CLI prints it as one error line
    rotated = rotate_key(layout.state_dir)
    assert DeviceIdentity.load(layout.state_dir).public_key_openssh == rotated.public_key_openssh
    assert rotated.previous_device_ids == (first.device_id,)  # from the client.pub copy
    layout.api_token.unlink()
    with pytest.raises(IdentityError, match=r"api\.token is missing.*init --force"):
        DeviceIdentity.load(layout.state_dir)


def test_a_key_whose_ec_point_byte_is_damaged_is_named_with_its_fix(tmp_path: Path) -> None:
    """A client.key whose public point no longer starts with 0x04 (one damaged byte: the
    uncompressed-point tag) made cryptography raise NotImplementedError ("Need uncompressed
    point"), not ValueError: a traceback in every command that reads the key, and in
    rotate-key, the fix the error names. It is the damaged key it is, and rotate-key
    replaces it."""
    first = init_identity(tmp_path / "device")
    layout = first.layout
    point = load_ssh_public_key(first.public_key_openssh.encode())
    assert isinstance(point, ec.EllipticCurvePublicKey)
    x962 = point.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    head, *body, tail = layout.private_key.read_text().strip().splitlines()
    blob = base64.b64decode("".join(body))
    assert blob.count(x962) == 2  # the public half, and again in the private half
    damaged = base64.b64encode(blob.replace(x962, b"\x05" + x962[1:])).decode()
    layout.private_key.write_text("\n".join([head, *textwrap.wrap(damaged, 70), tail]) + "\n")
    with pytest.raises(IdentityError, match=r"not a usable OpenSSH private key.*rotate-key"):
        DeviceIdentity.load(layout.state_dir).private_key()
    rotated = rotate_key(layout.state_dir)
    assert DeviceIdentity.load(layout.state_dir).public_key_openssh == rotated.public_key_openssh


def test_rotate_key_prints_the_new_key_when_the_replaced_one_is_unknown(tmp_path: Path) -> None:
    """A damaged client.key with no client.pub (and no earlier rotation) leaves no replaced
    key to name: `rotate-key` replaced the key, then crashed with an IndexError before it
    printed the new public key (a `> device.pub` redirect got nothing). It now prints it and
    says the old key must be found on the server."""
    layout = init_identity(tmp_path / "device").layout
    layout.private_key.write_bytes(b"garbage")
    layout.public_key.unlink()

    result = runner.invoke(client_app, ["rotate-key", "--state-dir", str(layout.state_dir)])

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == layout.public_key.read_text().strip()
    assert "could not be read" in result.stderr
    assert "fedrec server status" in result.stderr


def test_rotate_key_is_refused_under_a_daemon_and_without_an_identity(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="client init"):
        rotate_key(tmp_path / "none")
    assert not (tmp_path / "none").exists()  # nothing left behind (it left daemon.lock)
    layout = init_identity(tmp_path / "device").layout
    before = layout.private_key.read_bytes()
    with (
        StateDirLock.acquire(layout, role="daemon", advice="stop it"),
        pytest.raises(StateDirInUseError, match="stop it"),
    ):
        rotate_key(layout.state_dir)
    assert layout.private_key.read_bytes() == before
    assert not layout.previous_public_key.exists()


def test_every_replaced_key_is_kept_for_revocation(tmp_path: Path) -> None:
    """Rotating twice before the server registered the second key: the key the server knows
    is the first one, so it must still be on the device to be revoked."""
    first = init_identity(tmp_path)
    second = rotate_key(tmp_path)
    third = rotate_key(tmp_path)
    assert third.previous_device_ids == (first.device_id, second.device_id)
    kept = first.layout.previous_public_key.read_text().splitlines()
    assert kept == [first.public_key_openssh, second.public_key_openssh]
    assert third.device_id not in third.previous_device_ids


def test_the_public_key_in_use_comes_from_the_private_key(tmp_path: Path) -> None:
    """A rotation interrupted between its two writes leaves client.pub stale; the identity
    still reports (and the daemon registers as) the key the SuperNode authenticates with."""
    first = init_identity(tmp_path)
    second = rotate_key(tmp_path)
    first.layout.public_key.write_text(first.public_key_openssh + "\n")  # the stale copy
    assert DeviceIdentity.load(tmp_path).device_id == second.device_id != first.device_id


# --------------------------------------------------------------------------- sealed models


def tiny_onnx(
    n_items: int = 40, dim: int = 8, max_len: int = 6, catalog: str = "c", version: str = "v1"
) -> bytes:
    """A student-shaped ONNX graph built by hand (no torch): sum-pool embeddings, dot table."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(n_items, dim)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "items"], ["x"]),
        helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis_last"], ["m3"]),
        helper.make_node("Mul", ["x", "m3"], ["xm"]),
        helper.make_node("ReduceSum", ["xm", "axis_seq"], ["h"], keepdims=0),
        helper.make_node("MatMul", ["h", "ET"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("items", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", n_items])],
        initializer=[
            numpy_helper.from_array(table, "E"),
            numpy_helper.from_array(table.T.copy(), "ET"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis_last"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis_seq"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ModelMetadata(n_items, max_len, version, catalog).apply_to(model)
    return bytes(model.SerializeToString())


CATALOG = Catalog(tuple(f"m{i}" for i in range(40)))


def test_seal_install_load_and_versions(tmp_path: Path, key: bytes) -> None:
    sealed = SealedModelStore(tmp_path / "models", key, keep=2)
    assert sealed.current_version() is None and sealed.load() is None
    data = tiny_onnx(catalog=CATALOG.fingerprint)
    info, model = sealed.install(data, catalog=CATALOG)
    assert (info.version, info.model_version, info.path.name) == (1, "v1", "model-v1.onnx.sealed")
    assert data not in info.path.read_bytes()  # encrypted, not just signed
    loaded = sealed.load(catalog=CATALOG)
    assert loaded is not None and isinstance(loaded[1], OnDeviceModel)
    np.testing.assert_allclose(loaded[1].score([[1, 2]]), model.score([[1, 2]]))
    sealed.install(tiny_onnx(catalog=CATALOG.fingerprint, version="v2"), catalog=CATALOG)
    sealed.install(tiny_onnx(catalog=CATALOG.fingerprint, version="v3"), catalog=CATALOG)
    assert sealed.versions() == [2, 3] and sealed.current_version() == 3
    assert (tmp_path / "models" / "current").read_text().strip() == sealed_name(3)
    assert sealed.read(3)[1] == tiny_onnx(catalog=CATALOG.fingerprint, version="v3")
    sealed.erase()
    assert sealed.versions() == [] and sealed.current_version() is None


def test_a_model_whose_pointer_the_full_disk_has_no_room_for_leaves_no_file(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new sealed file was written, then the `current` pointer's write failed on a full
    disk: the file stayed, an orphan taking space, until a later install pruned it. It is
    removed now, and the previous model stays current and readable; a pointer that did move
    before the failure (its folder's sync failed) keeps its file."""
    import errno

    import client.device.sealed as sealed_module

    sealed = SealedModelStore(tmp_path, key)
    sealed.install(tiny_onnx(catalog=CATALOG.fingerprint), catalog=CATALOG)
    write = sealed_module.write_bytes_atomic
    moved = False

    def full_disk(path: Path, data: bytes, **kwargs: Any) -> None:
        if path.name == "current":
            if moved:
                write(path, data, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, data, **kwargs)

    monkeypatch.setattr(sealed_module, "write_bytes_atomic", full_disk)
    v2 = tiny_onnx(catalog=CATALOG.fingerprint, version="v2")
    with pytest.raises(OSError, match="No space left"):
        sealed.install(v2, catalog=CATALOG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", sealed_name(1)]
    assert sealed.current_version() == 1
    loaded = sealed.load(catalog=CATALOG)
    assert loaded is not None and loaded[0].model_version == "v1"
    moved = True
    with pytest.raises(OSError, match="No space left"):
        sealed.install(v2, catalog=CATALOG)
    assert sealed.current_version() == 2 and sealed.read(2)[0].model_version == "v2"


def test_a_sealed_model_refused_on_load_is_named_by_its_file(tmp_path: Path, key: bytes) -> None:
    """A sealed model that no longer fits the catalog (or fails to load) was reported as
    '<bytes>: ...' (in the daemon's /status too), naming no file."""
    sealed = SealedModelStore(tmp_path, key)
    sealed.install(tiny_onnx(catalog=CATALOG.fingerprint), catalog=CATALOG)
    other = Catalog(tuple(f"x{i}" for i in range(40)))
    with pytest.raises(ModelFileError, match=r"^\S*model-v1\.onnx\.sealed: .*exported for catalog"):
        sealed.load(catalog=other)


@pytest.mark.parametrize("where", [0, 20, -100, -1])
def test_one_flipped_byte_is_refused(tmp_path: Path, key: bytes, where: int) -> None:
    sealed = SealedModelStore(tmp_path, key)
    info, _ = sealed.install(tiny_onnx())
    blob = bytearray(info.path.read_bytes())
    blob[where] ^= 0x01
    info.path.write_bytes(bytes(blob))
    with pytest.raises(ModelFileError, match=r"model-v1\.onnx\.sealed.*(authentication|magic)"):
        sealed.load()


def test_renamed_wrong_key_and_foreign_models_are_refused(tmp_path: Path, key: bytes) -> None:
    sealed = SealedModelStore(tmp_path, key)
    sealed.install(tiny_onnx(version="a"))
    sealed.install(tiny_onnx(version="b"))
    v1, v2 = sealed.path(1), sealed.path(2)
    b1 = v1.read_bytes()
    v1.write_bytes(v2.read_bytes())  # v2's file under v1's name: a rollback/swap
    with pytest.raises(ModelFileError, match="holds sealed version 2, not 1"):
        sealed.read(1)
    v1.write_bytes(b1)
    with pytest.raises(ModelFileError, match="another device's data key"):
        SealedModelStore(tmp_path, os.urandom(32)).load()
    with pytest.raises(ModelFileError, match="exported for catalog"):
        sealed.install(tiny_onnx(catalog="other"), catalog=CATALOG)
    with pytest.raises(ModelFileError, match="not a valid ONNX"):
        sealed.install(b"garbage")
    assert sealed.versions() == [1, 2]  # nothing written by the refused installs
    (tmp_path / "current").write_text("model-v9.onnx.sealed\n")
    with pytest.raises(ModelFileError, match="missing; install the model again"):
        sealed.load()


def test_catalog_roundtrip_and_validation(tmp_path: Path) -> None:
    CATALOG.save(tmp_path / "c.json")
    assert Catalog.load(tmp_path / "c.json") == CATALOG
    assert CATALOG.unknown(["m1", "zz", "zz", "m2", "yy"]) == ["zz", "yy"]
    assert CATALOG.dense("m3") == 3 and CATALOG.dense("zz") is None
    with pytest.raises(DataError, match="more than once"):
        Catalog(("a", "a"))
    bad = CATALOG.to_json() | {"fingerprint": "0" * 16}
    with pytest.raises(DataError, match="does not match"):
        Catalog.from_json(bad)


def test_a_large_catalog_with_a_repeated_id_is_refused_at_once() -> None:
    """The duplicate check counted every id in the whole tuple (quadratic): a 60,000-item
    catalog (MovieLens-25M has 62,000) with one id repeated took about a minute to be
    refused."""
    ids = tuple(f"item-{i}" for i in range(60_000))
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"more than once: \['item-7', 'item-9'\]"):
        Catalog((*ids, "item-9", "item-7", "item-9"))
    assert time.perf_counter() - start < 2.0


def test_exploration_serves_a_tiny_catalog_and_a_new_catalog_under_the_same_label(
    store: DeviceStore,
) -> None:
    """Two device-audit findings. A catalog of at most ``feature_dim`` (16) items failed every
    slate on the feature width; a model for a new catalog under the label already served (a
    new federation's round 3) reused the old catalog's features, and every slate failed on an
    out-of-range index. Both fell back to the model's order and learned nothing."""
    from client.device.exploration import BanditReranker
    from shared.bandits.policies import BanditConfig

    reranker = BanditReranker(BanditConfig(), store)
    for n_items, catalog in ((5, "five"), (40, "forty")):
        reranker.on_model(OnDeviceModel(tiny_onnx(n_items=n_items, catalog=catalog, version="3")))
        candidates = np.arange(n_items, dtype=np.int64)
        slate = reranker.rerank(candidates, np.linspace(1, 0, n_items), 4, slate_id=catalog)
        assert len(set(slate)) == 4 and set(slate) <= set(range(n_items))
        reranker.observe([slate[0]], [1.0], [catalog])
        assert reranker.feedback_counts["accepted"] == 1  # a fresh posterior per catalog


def test_a_retried_batch_with_event_ids_is_stored_once(store: DeviceStore) -> None:
    """An app whose batch was stored but whose reply was lost (the daemon killed in between)
    stored it twice when it retried: 40-120 duplicate events per kill in the device audit."""
    batch = [Event(f"m{i}", "view", 10.0 + i, event_id=f"app-{i}") for i in range(3)]
    assert len(store.add_events(batch)) == 3
    pending = store.adaptation_pending()
    retry = [*batch, Event("m9", "view", 20.0, event_id="app-9"), Event("m9", "view", 21.0)]
    assert len(store.add_events(retry)) == 2  # the new id, and the event without one
    assert [e.item_id for e in store.events()] == ["m0", "m1", "m2", "m9", "m9"]
    assert store.adaptation_pending() == pending + 2
    # an id repeated inside one batch counts once too
    twice = [Event("m5", "view", 30.0, event_id="dup"), Event("m6", "view", 31.0, event_id="dup")]
    assert len(store.add_events(twice)) == 1
    with pytest.raises(DataError, match="event_id"):
        Event("m1", "view", 1.0, event_id="")


def test_a_version_1_store_is_upgraded_and_its_rows_still_open(tmp_path: Path, key: bytes) -> None:
    db = tmp_path / "store.db"
    with DeviceStore.open(db, key) as store:
        store.add_events([Event("old", "view", 1.0)])
    with sqlite3.connect(db) as conn:  # the file as version 1 wrote it
        conn.execute("DROP INDEX events_client_tag")
        conn.execute("ALTER TABLE events DROP COLUMN client_tag")
        conn.execute("PRAGMA user_version = 1")
    with DeviceStore.open(db, key) as store:
        assert [e.item_id for e in store.events()] == ["old"]
        new = [Event("new", "view", 2.0, event_id="x")]
        assert len(store.add_events(new)) == 1 and store.add_events(new) == []
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_retried_feedback_batch_with_ids_is_stored_once_even_after_a_restart(
    tmp_path: Path, key: bytes
) -> None:
    """An app whose POST /feedback reply was lost sends the batch again: every report was
    stored a second time (the feedback count grew, the policy learned once)."""
    db, rec = tmp_path / "store.db", "ab" * 16
    with DeviceStore.open(db, key) as store:
        store.record_impressions([Impression(rec, i, r, 1.0, 1.0) for r, i in enumerate("abc", 1)])
        batch = [
            Feedback(rec, "a", "clicked", 2.0, feedback_id="fb-1"),
            Feedback(rec, "b", "shown", 2.0, feedback_id="fb-2"),
        ]
        first = store.add_feedback(batch)
        assert len(first.ids) == 2 and len(first.click_events) == 1 and first.duplicates == ()
    with DeviceStore.open(db, key) as store:  # the ids survive a restart
        retry = [*batch, Feedback(rec, "c", "shown", 3.0, feedback_id="fb-3")]
        again = store.add_feedback(retry)
        assert len(again.ids) == 1 and again.duplicates == (0, 1) and again.click_events == []
        assert [f.item_id for f in store.feedback()] == ["a", "b", "c"]
        assert store.stats().events == 1  # the retried click added no second event
        # the whole batch again: nothing stored, every report a duplicate
        assert store.add_feedback(retry) == ([], [], (0, 1, 2))
        # an id repeated inside one batch counts once; reports without an id are all stored
        twice = [
            Feedback(rec, "c", "clicked", 4.0, feedback_id="dup"),
            Feedback(rec, "c", "clicked", 4.0, feedback_id="dup"),
            Feedback(rec, "c", "shown", 4.0),
            Feedback(rec, "c", "shown", 4.0),
        ]
        assert store.add_feedback(twice).duplicates == (1,)
        assert store.stats().feedback == 6
    with pytest.raises(DataError, match="feedback_id"):
        Feedback(rec, "a", "shown", 1.0, feedback_id="x" * 129)


def test_feedback_ids_are_bounded_and_a_retry_is_recognised_before_the_impressions_check(
    tmp_path: Path, key: bytes
) -> None:
    rec = "cd" * 16
    with DeviceStore.open(tmp_path / "s.db", key, max_feedback_ids=3) as store:
        store.record_impressions([Impression(rec, "a", 1, 1.0, 1.0)])
        for n in range(5):
            store.add_feedback([Feedback(rec, "a", "shown", 2.0, feedback_id=f"id-{n}")])
        with sqlite3.connect(store.path) as conn:
            assert conn.execute("SELECT COUNT(*) FROM feedback_ids").fetchone()[0] == 3
        assert store.add_feedback([Feedback(rec, "a", "shown", 2.0, feedback_id="id-4")]).ids == []
        # the oldest ids are forgotten: such a late retry is stored again
        assert len(store.add_feedback([Feedback(rec, "a", "shown", 2.0, feedback_id="id-0")]).ids)
        # a retry whose impression expired since is a duplicate, not a 422
        store.erase()
        store.record_impressions([Impression(rec, "a", 1, 1.0, 1.0)])
        store.add_feedback([Feedback(rec, "a", "shown", 2.0, feedback_id="late")])
        with sqlite3.connect(store.path) as conn:
            conn.execute("DELETE FROM impressions")
        assert store.add_feedback([Feedback(rec, "a", "shown", 2.0, feedback_id="late")]) == (
            [],
            [],
            (0,),
        )
        # an erase forgets the ids with the feedback they name
        store.erase()
        with sqlite3.connect(store.path) as conn:
            assert conn.execute("SELECT COUNT(*) FROM feedback_ids").fetchone()[0] == 0


def test_a_version_2_store_is_upgraded_to_remember_feedback_ids(tmp_path: Path, key: bytes) -> None:
    db, rec = tmp_path / "store.db", "ef" * 16
    with DeviceStore.open(db, key) as store:
        store.record_impressions([Impression(rec, "a", 1, 1.0, 1.0)])
        store.add_feedback([Feedback(rec, "a", "shown", 2.0)])
    with sqlite3.connect(db) as conn:  # the file as version 2 wrote it
        conn.execute("DROP TABLE feedback_ids")
        conn.execute("PRAGMA user_version = 2")
    with DeviceStore.open(db, key) as store:
        assert [f.item_id for f in store.feedback()] == ["a"]
        report = [Feedback(rec, "a", "clicked", 3.0, feedback_id="x")]
        assert len(store.add_feedback(report).ids) == 1
        assert store.add_feedback(report).duplicates == (0,)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3


def test_exploration_keeps_a_posterior_saved_under_the_labels_of_earlier_versions(
    store: DeviceStore,
) -> None:
    """Saved states are keyed on label and catalog now; one saved by an earlier version under
    the bare label ("3") is still this model's, not a reason to forget what was learned."""
    from client.device.exploration import STATE_KEY, BanditReranker
    from shared.bandits.policies import BanditConfig

    model = OnDeviceModel(tiny_onnx(n_items=40, catalog="forty", version="3"))
    first = BanditReranker(BanditConfig(), store)
    first.on_model(model)
    slate = first.rerank(np.arange(40, dtype=np.int64), np.linspace(1, 0, 40), 4, slate_id="s")
    first.observe([slate[0]], [1.0], ["s"])
    saved = store.get_state(STATE_KEY)
    assert isinstance(saved, dict) and saved["model_version"] == "3@forty"
    store.update_state({STATE_KEY: {**saved, "model_version": "3"}})  # as before the change
    again = BanditReranker(BanditConfig(), store)
    again.on_model(model)
    assert again.state()["posterior"] == first.state()["posterior"]


def test_exploration_keeps_the_features_saved_under_the_label_of_an_earlier_version(
    store: DeviceStore,
) -> None:
    """The posterior saved under the bare label ("3") was kept after the upgrade, but the
    features it was learned under were recomputed (from the personal refit then served, they
    differ): the kept weights applied to other columns, the defect the stored features fix."""
    from client.device.exploration import FEATURES_KEY, STATE_KEY, BanditReranker
    from shared.bandits.policies import BanditConfig

    personal = OnDeviceModel(tiny_onnx(n_items=40, catalog="forty", version="3+personal"))
    first = BanditReranker(BanditConfig(), store)
    first.on_model(personal)
    first.rerank(np.arange(40, dtype=np.int64), np.linspace(1, 0, 40), 4, slate_id="s")
    # as an earlier version saved them: bare label, features first computed from model 3
    learned_under = np.full((40, BanditConfig().feature_dim), 0.25)
    legacy = {
        "model_version": "3",
        "shape": list(learned_under.shape),
        "float64": base64.b64encode(learned_under.astype("<f8").tobytes()).decode(),
    }
    state = {**store.get_state(STATE_KEY), "model_version": "3"}
    store.update_state({STATE_KEY: state, FEATURES_KEY: legacy})
    again = BanditReranker(BanditConfig(), store)
    again.on_model(personal)
    again.rerank(np.arange(40, dtype=np.int64), np.linspace(1, 0, 40), 4, slate_id="t")
    assert store.get_state(FEATURES_KEY) == legacy  # reused, not recomputed and replaced
    contexts = again.state()["pending"][-1][1]  # [1, z(score), features]
    assert contexts[2:] == [0.25] * BanditConfig().feature_dim


def test_a_slate_whose_state_cannot_be_saved_leaves_no_trace_in_the_policy(
    store: DeviceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerank whose save failed (disk full) raised, and the daemon served the model's order
    instead, but the policy kept the unshown slate's impressions (and expired older ones for
    them): feedback naming that recommendation was learned from a slate never shown, and
    feedback on the expired, shown slate was refused. Now the policy is as before the slate."""
    from client.device.exploration import PENDING_PREFIX, BanditReranker
    from shared.bandits.policies import BanditConfig

    config = BanditConfig(policy="thompson", top_n=40, slate_size=4, max_pending=6)
    model = OnDeviceModel(tiny_onnx(n_items=40, catalog="forty", version="3"))
    reranker = BanditReranker(config, store)
    reranker.on_model(model)
    candidates = np.arange(40, dtype=np.int64)
    scores = np.linspace(1, 0, 40)
    shown = reranker.rerank(candidates, scores, 4, slate_id="shown")
    before = reranker.state()
    policy = reranker._ready()[0]
    draws = policy.rng.bit_generator.state
    chosen: list[np.ndarray] = []
    select = policy.select
    monkeypatch.setattr(
        policy, "select", lambda *a, **kw: chosen.append(select(*a, **kw)) or chosen[-1]
    )
    real = store.update_state

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "update_state", disk_full)
    with pytest.raises(OSError, match="No space left"):
        reranker.rerank(candidates, np.where(candidates == 39, np.nan, scores), 4, "unshown")
    assert reranker.state() == before  # no impressions, expiries or counts of it
    assert policy.rng.bit_generator.state == draws
    monkeypatch.setattr(store, "update_state", real)

    # feedback naming the unshown slate is not learned; the shown slate's all is
    unshown = [int(c) for c in chosen[-1]]
    assert reranker.observe(unshown, [1.0] * 4, ["unshown"] * 4) == 0
    assert reranker.feedback_counts["rejected_not_shown"] == 4
    assert reranker.observe(list(shown), [0.0] * 4, ["shown"] * 4) == 4
    assert store.states_with_prefix(PENDING_PREFIX) == {}
    again = BanditReranker(config, store)
    again.on_model(model)
    assert again.state() == reranker.state()


def test_init_force_says_what_it_erased_and_what_it_kept(tmp_path: Path) -> None:
    """``init --force`` erased the store, the sealed models, the global model and the
    SuperNode's log without a word (only --help and the refusal said so): it names on
    stderr what it erased of what was there, and what it kept; stdout is still the key."""
    state = tmp_path / "device"
    layout = init_identity(state).layout
    with DeviceStore.open(layout.store_db, DeviceIdentity.load(state).data_key()) as store:
        store.add_events([Event(i, "view", 1.0) for i in SECRET_IDS])
    joined = state / "federated" / "joined.json"
    for path in (layout.models_dir / "m.sealed", layout.supernode_log, layout.ledger, joined):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (state / "federated" / "global.npz").write_bytes(b"x")
    layout.catalog.write_text('["a"]')

    result = runner.invoke(client_app, ["init", "--state-dir", str(state), "--force"])

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == layout.public_key.read_text().strip()
    assert result.stderr.strip().splitlines()[-1] == (
        "erased the local store, the sealed models, the last federation's global model and "
        "logs/supernode.log; kept the privacy ledger, the rounds joined and the catalog"
    )
    assert layout.ledger.exists() and not layout.store_db.exists()
    # only what was there is named; a catalog given with --catalog replaces the old one
    layout.store_db.write_bytes(b"x")
    catalog = tmp_path / "catalog.json"
    catalog.write_text('["a"]')
    args = ["init", "--state-dir", str(state), "--force", "--catalog", str(catalog)]
    again = runner.invoke(client_app, args)
    assert again.exit_code == 0, again.output
    assert "erased the local store; kept the privacy ledger and the rounds joined" in again.stderr
    fresh = runner.invoke(client_app, ["init", "--state-dir", str(tmp_path / "new"), "--force"])
    assert fresh.exit_code == 0 and "erased" not in fresh.stderr  # nothing was there
    # what was never there is not named as kept (it said "kept the privacy ledger, the rounds
    # joined and the catalog" of a device that had none of them)
    unused = init_identity(tmp_path / "unused").layout
    unused.store_db.write_bytes(b"x")
    bare = runner.invoke(client_app, ["init", "--state-dir", str(unused.state_dir), "--force"])
    assert bare.exit_code == 0, bare.output
    assert bare.stderr.strip().splitlines()[-1] == "erased the local store"
