"""Crash-safe writes (``shared.io``): what survives a crash mid-write or a power loss."""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.deploy_app import append_progress
from server.state import ServerLayout, read_progress
from shared.errors import ConfigError, DataError
from shared.io import (
    append_line,
    check_output_file,
    is_locked,
    lock_holder,
    remove_stale_temps,
    trim_log,
    try_lock,
    write_bytes_atomic,
    write_json_atomic,
)


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every fsync from now on, as ('dir' | 'file', path)."""
    synced: list[tuple[str, str]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append((kind, os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to name fds")
def test_an_atomic_write_syncs_the_data_then_every_folder_it_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = _record_fsyncs(monkeypatch)
    target = tmp_path / "new" / "deeper" / "ledger.json"
    write_bytes_atomic(target, b"{}")
    assert target.read_bytes() == b"{}"
    dirs = [path for kind, path in synced if kind == "dir"]
    # the folders it created are recorded in their parents, and the rename in its folder
    assert {str(tmp_path), str(tmp_path / "new"), str(target.parent)} <= set(dirs)
    assert synced[-1] == ("dir", str(target.parent))  # the rename is made durable last
    files = [path for kind, path in synced if kind == "file"]
    assert len(files) == 1 and files[0].startswith(str(target.parent / ".ledger.json."))
    assert [p.name for p in target.parent.iterdir()] == ["ledger.json"]  # no temp file left


def _ledger_under_its_lock(root: Path) -> Path:
    """A simulated client's fit: its lock (which makes the folder), then its ledger."""
    from shared.io import exclusive_lock
    from shared.privacy.budget import PrivacyBudget
    from shared.privacy.ledger import PrivacyLedger

    folder = root / "clients" / "client-3"
    with exclusive_lock(folder / ".lock"):
        PrivacyLedger.open(folder / "ledger.json", PrivacyBudget(8.0, 1e-5)).record(1.0, 0.1, 3)
    return folder / "ledger.json"


def _device_rounds_joined(root: Path) -> Path:
    from client.device.training import FederatedFiles

    files = FederatedFiles(root / "device")
    with files.lock():
        files.add_round_joined(1, with_dp=True)
    return files.joined


def _checkpoint(root: Path) -> Path:
    from server.checkpoint import CheckpointStore

    return CheckpointStore(root / "run" / "checkpoints").save(
        1, [np.zeros(3, dtype=np.float32)], {}, None
    )


def _device_identity(root: Path) -> Path:
    from client.device.identity import init_identity

    return init_identity(root / "device").layout.data_key


def _server_state(root: Path) -> Path:
    from server.state import init_state_dir

    return init_state_dir(root / "server").pki.ca_key


def _run_config(root: Path) -> Path:
    from simulation.run_dir import RunDirectory

    run = RunDirectory(root / "runs" / "a-run")
    run.write_config({"seed": 0})
    run.close()
    return run.root / "config.json"


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to name fds")
@pytest.mark.parametrize(
    "write",
    [
        _ledger_under_its_lock,
        _device_rounds_joined,
        _checkpoint,
        _device_identity,
        _server_state,
        _run_config,
    ],
)
def test_a_folder_made_before_its_first_file_is_durable_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: Callable[[Path], Path]
) -> None:
    """A lock, a store or a state directory makes the folder before the atomic write, which
    then syncs only the folder's contents: its own entry could vanish in a power loss with
    the fsynced ledger, checkpoint or key in it. Every folder on the way must be synced in
    its parent."""
    synced = _record_fsyncs(monkeypatch)
    written = write(tmp_path)
    assert written.is_file()
    dirs = {path for kind, path in synced if kind == "dir"}
    unsynced = [
        str(folder)
        for folder in written.relative_to(tmp_path).parents
        if folder != Path(".") and str(tmp_path / folder.parent) not in dirs
    ]
    assert not unsynced, f"made but never synced in their parents: {unsynced}"


LINE_DURING_TRIM = b"written during the trim\n"


def _trim_with_a_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: str
) -> tuple[bytes, int]:
    """Trim a 14,000-byte log to 4,000 while its writer appends :data:`LINE_DURING_TRIM`
    through its own ``O_APPEND`` descriptor just before the trim's first ``before`` call
    (``"read"``: before the tail is read; ``"write"``: while it is copied to the front);
    returns the log's bytes after it and what :func:`trim_log` said it dropped."""
    import shared.io

    log = tmp_path / "supernode.log"
    log.write_bytes(b"".join(b"old line %04d\n" % i for i in range(1000)))
    real_open = open

    class WriterAppends:
        def __init__(self, fh: Any) -> None:
            self.fh, self.appended = fh, False

        def __getattr__(self, name: str) -> Any:
            return getattr(self.fh, name)

        def __enter__(self) -> WriterAppends:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

        def _append_once(self) -> None:
            if not self.appended:
                self.appended = True
                fd = os.open(log, os.O_WRONLY | os.O_APPEND)
                os.write(fd, LINE_DURING_TRIM)
                os.close(fd)

        def read(self, *args: Any) -> bytes:
            if before == "read":
                self._append_once()
            return bytes(self.fh.read(*args))

        def write(self, data: bytes) -> int:
            if before == "write":
                self._append_once()
            return int(self.fh.write(data))

    opener = lambda *a, **k: WriterAppends(real_open(*a, **k))  # noqa: E731
    monkeypatch.setattr(shared.io, "open", opener, raising=False)
    dropped = trim_log(log, 4000)
    return log.read_bytes(), dropped


def test_a_line_the_writer_appends_while_its_log_is_trimmed_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trim copies the log's newest half to its front, then cuts the file: a line the
    SuperNode (or the SuperLink) appended in between, past the old end, was cut with it."""
    kept, dropped = _trim_with_a_writer(tmp_path, monkeypatch, "write")
    assert kept.endswith(b"old line 0999\n" + LINE_DURING_TRIM)
    assert kept.startswith(b"old line ") and len(kept) <= 4000
    assert dropped == 14_000 + len(LINE_DURING_TRIM) - len(kept)
    assert trim_log(tmp_path / "supernode.log", 4000) == 0  # under the limit: untouched


def test_a_line_the_writer_appends_before_the_tail_is_read_is_kept_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trim measured the log's end, then read its tail up to the end it found then: a
    line the writer appended in between was in that tail, and was copied once more after it
    as an append past the measured end (the log held it twice)."""
    kept, dropped = _trim_with_a_writer(tmp_path, monkeypatch, "read")
    assert kept.endswith(b"old line 0999\n" + LINE_DURING_TRIM)
    assert kept.count(LINE_DURING_TRIM) == 1
    assert dropped == 14_000 + len(LINE_DURING_TRIM) - len(kept)


def test_a_record_after_a_torn_line_is_not_lost(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    append_line(log, json.dumps({"round": 1}))
    with log.open("ab") as fh:  # a crash in the middle of the second append
        fh.write(b'{"round": 2, "lo')
    append_line(log, json.dumps({"round": 3}))
    append_line(log, json.dumps({"round": 4}))
    rows = []
    for line in log.read_text().splitlines():
        try:
            rows.append(json.loads(line)["round"])
        except json.JSONDecodeError:
            continue
    assert rows == [1, 3, 4]


def test_the_servers_progress_file_keeps_the_round_after_a_torn_line(tmp_path: Path) -> None:
    layout = ServerLayout(tmp_path)
    append_progress(layout.progress, {"round": 1})
    with layout.progress.open("ab") as fh:
        fh.write(b'{"round": 2')
    append_progress(layout.progress, {"round": 3})
    assert [r["round"] for r in read_progress(layout)] == [1, 3]


def test_a_progress_line_holds_non_finite_values_as_null(tmp_path: Path) -> None:
    """A client's metric that is not finite, or whose mean overflows, must not fail the
    round hook (and with it the run): the line is written, with null for such values."""
    from server.strategy import _weighted_means

    means = _weighted_means([(40, {"epsilon": 1e308}), (30, {"epsilon": 1.0})])
    assert math.isfinite(means["epsilon"])
    assert means["epsilon"] == pytest.approx(40 / 70 * 1e308)
    layout = ServerLayout(tmp_path)
    record = {
        "round": 1,
        "eval_loss": math.inf,
        "epsilon_user": math.nan,
        "eval_metrics": {"hr@10": -math.inf, "ndcg@10": 0.5},
    }
    append_progress(layout.progress, record)
    (line,) = read_progress(layout)
    assert line == {
        "round": 1,
        "eval_loss": None,
        "epsilon_user": None,
        "eval_metrics": {"hr@10": None, "ndcg@10": 0.5},
    }


def test_a_full_disk_names_the_file_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "clients.json"
    target.write_text("old")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as err:
        write_bytes_atomic(target, b"new")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "clients.json"
    ]


def test_a_lock_file_another_user_owns_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A status read by another OS user than the daemon's raised a bare PermissionError (a
    traceback); the tests run as root, whom file modes do not stop, so open() is refused."""
    import shared.io

    path = tmp_path / ".lock"
    path.write_text("1")

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(shared.io, "open", refused, raising=False)
    with pytest.raises(DataError, match=r"cannot read the lock file .*Permission denied.*owns"):
        is_locked(path)


class _FullDiskHandle:
    """An open file whose writes reach a full disk at the flush; the rest is the file's."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def test_a_lock_whose_pid_cannot_be_written_names_the_lock_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """try_lock wrote its pid into the lock on a full disk with an OSError naming no file:
    `fedrec server start` (its state directory's lock) and `fedrec simulate` (its run
    folder's) printed a traceback ending in '[Errno 28] No space left on device'. It names
    the lock file now (the command line's one-line error), and the lock is not held."""
    import shared.io

    def full(*args: Any, **kwargs: Any) -> _FullDiskHandle:
        return _FullDiskHandle(open(*args, **kwargs))  # try_lock closes it

    path = tmp_path / "run" / ".lock"
    with monkeypatch.context() as patched:
        patched.setattr(shared.io, "open", full, raising=False)
        with pytest.raises(OSError) as caught:
            try_lock(path)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    held = try_lock(path)
    assert held is not None
    held.close()


def test_a_lock_is_seen_while_held_and_probing_it_takes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "run" / ".lock"
    assert not is_locked(path) and not path.exists()  # the probe creates no file
    held = try_lock(path)
    assert held is not None and is_locked(path)
    assert try_lock(path) is None  # the probe released its shared lock
    assert lock_holder(path) == str(os.getpid())
    held.close()
    assert not is_locked(path)
    again = try_lock(path)
    assert again is not None
    again.close()


def test_a_status_probe_does_not_make_a_free_lock_look_held(tmp_path: Path) -> None:
    """is_locked probes with a shared lock; a try_lock that met one (`fedrec server start`
    while `fedrec server status` looked) was refused as if a server ran. A probe is waited
    out; a holder still refuses it."""
    import fcntl
    import threading
    import time

    path = tmp_path / "run" / ".lock"
    path.parent.mkdir()
    for named, probe_s in (("", 0.05), (f"{os.getpid()}\n", 0.05), ("999999999\n", 0.5)):
        path.write_text(named)  # no holder named; a live one; a dead one (a probe past 0.2 s)
        probe = open(path)  # noqa: SIM115 (closed by the timer: the probe ends)
        fcntl.flock(probe.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        threading.Timer(probe_s, probe.close).start()
        held = try_lock(path)
        assert held is not None, named
        held.close()
    held = try_lock(path)
    assert held is not None
    start = time.monotonic()
    assert try_lock(path) is None  # a live holder's lock is not waited out
    assert time.monotonic() - start < 2.0
    held.close()


def test_a_lock_file_removed_under_a_waiting_locker_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run discarding its folder removes its lock file; a second run that had opened the
    old file must not hold a lock on it (a third would then lock a new file, and two runs
    would share the folder)."""
    import fcntl

    import shared.io as io_mod

    path = tmp_path / "run" / ".lock"
    path.parent.mkdir()
    path.write_text("123\n")
    real = fcntl.flock
    calls: list[int] = []

    def holder_discards_first(fd: int, op: int) -> None:
        calls.append(fd)
        if len(calls) == 1:  # between this opener's open and its lock
            path.unlink()
        real(fd, op)

    monkeypatch.setattr(io_mod.fcntl, "flock", holder_discards_first)
    held = try_lock(path)
    assert held is not None and len(calls) == 2  # it let the removed file go and retried
    now, mine = path.stat(), os.fstat(held.fileno())
    assert (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino) and now.st_nlink == 1
    assert lock_holder(path) == str(os.getpid())
    held.close()


def test_files_are_private_unless_written_as_reports(tmp_path: Path) -> None:
    from shared.io import REPORT_MODE, write_json_atomic

    write_json_atomic(tmp_path / "ledger.json", {"epsilon": 1.0})
    write_json_atomic(tmp_path / "report.json", {"hr": 0.7}, mode=REPORT_MODE)
    assert stat.S_IMODE((tmp_path / "ledger.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644
    write_json_atomic(tmp_path / "report.json", {"hr": 0.71}, mode=REPORT_MODE)  # overwrite
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644


@pytest.mark.parametrize("umask", [0o377, 0o277, 0o000, 0o777])
def test_the_modes_are_the_documented_ones_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """mkstemp's 0600 is cut by the umask: under 0377 a key or ledger came out 0400 or 0000,
    unreadable (or unwritable) by its own owner; the documented modes hold over any umask
    and over a file of other modes already there."""
    from shared.io import REPORT_MODE

    for name in ("ledger.json", "report.json"):
        (tmp_path / name).write_text("old")
        (tmp_path / name).chmod(0o777)
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "ledger.json", {"epsilon": 1.0})
        write_json_atomic(tmp_path / "report.json", {"hr": 0.7}, mode=REPORT_MODE)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ledger.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644


def test_nothing_is_writable_by_other_users_under_umask_000(tmp_path: Path) -> None:
    """Under ``umask 000`` a run's folders (its parents too) came out 0777 and its lock,
    metrics log and published.jsonl 0666: any local user could delete or replace a client's
    owner-only privacy ledger, or rewrite the SHA-256 a model is checked against."""
    from shared.io import exclusive_lock, make_dirs_durable

    run = tmp_path / "runs" / "quick"
    old = os.umask(0o000)
    try:
        make_dirs_durable(run / "clients" / "client-0")
        held = try_lock(run / ".lock")
        with exclusive_lock(run / "clients" / "client-0" / ".lock"):
            append_line(run / "models" / "published.jsonl", "{}")
    finally:
        os.umask(old)
    assert held is not None
    held.close()
    modes = {
        str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")
    }
    assert {p for p, m in modes.items() if m & 0o002} == set(), modes
    # the group keeps what the umask gives it (a team's shared folder under umask 002)
    assert modes["runs"] == modes["runs/quick/clients/client-0"] == 0o775
    assert modes["runs/quick/.lock"] == modes["runs/quick/models/published.jsonl"] == 0o664


def test_a_folder_through_a_link_to_a_missing_folder_is_named(tmp_path: Path) -> None:
    """``--state-dir ~/.fedrec`` with ~/.fedrec a link to a volume's folder not made yet
    was "error: File exists: ~/.fedrec", naming nothing that exists; now the link's target."""
    from shared.io import make_dirs_durable

    (tmp_path / "state").symlink_to(tmp_path / "volume" / "fedrec")
    for folder in (tmp_path / "state", tmp_path / "state" / "identity"):
        with pytest.raises(FileNotFoundError, match=r"a link to .*volume/fedrec, which does not"):
            make_dirs_durable(folder)
    (tmp_path / "volume" / "fedrec").mkdir(parents=True)
    make_dirs_durable(tmp_path / "state" / "identity")  # through the link, once it leads somewhere
    assert (tmp_path / "volume" / "fedrec" / "identity").is_dir()


def test_a_device_or_fifo_is_refused_and_a_link_is_written_through(tmp_path: Path) -> None:
    """`--output /dev/null` run as root replaced the system's /dev/null with a JSON file (the
    atomic rename replaces whatever is at the path); a link was replaced by a file."""
    import os

    from shared.eval.protocol import export_recs

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for write in (
        lambda: check_output_file(fifo),
        lambda: write_bytes_atomic(fifo, b"x"),
        lambda: write_json_atomic(fifo, {"a": 1}),
    ):
        with pytest.raises(ConfigError, match="is not a regular file"):
            write()
    assert fifo.is_fifo()
    target = tmp_path / "real" / "report.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert check_output_file(link) == target
    write_json_atomic(link, {"a": 1})
    assert link.is_symlink() and json.loads(target.read_text()) == {"a": 1}
    # the recs export too
    recs_target = tmp_path / "real" / "recs.csv"
    recs_target.write_text("")
    (tmp_path / "recs.csv").symlink_to(recs_target)

    class Flat:
        n_items = 3

        def score(self, histories: list[np.ndarray]) -> np.ndarray:
            return np.tile(np.arange(3.0), (len(histories), 1))

    from tests.conftest import make_dataset

    ds = make_dataset(n_users=2, n_items=3, length=1)
    export_recs(Flat(), ds, {0: np.array([0])}, tmp_path / "recs.csv")
    assert (tmp_path / "recs.csv").is_symlink()
    assert recs_target.read_text().splitlines()[0] == "user,item,rank"
    with pytest.raises(ConfigError, match="is not a regular file"):
        export_recs(Flat(), ds, {0: np.array([0])}, fifo)
    # /dev/stdout leads to the shell's stream, or to the file it redirects to, whose open
    # descriptor a rename would orphan; a loop of links resolves to nothing
    for stream in ("/dev/stdout", "/proc/self/fd/1"):
        with pytest.raises(ConfigError, match="a device or a process's stream"):
            check_output_file(stream)
    (tmp_path / "to-stdout").symlink_to("/dev/stdout")
    with pytest.raises(ConfigError, match="leads to /dev/stdout, a device"):
        write_json_atomic(tmp_path / "to-stdout", {})
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ConfigError, match="a loop of symbolic links"):
        write_bytes_atomic(tmp_path / "a", b"x")


def test_a_relative_link_in_a_linked_folder_is_written_where_it_points(tmp_path: Path) -> None:
    """A link `../x.json` reached through a linked folder points beside that folder's target,
    as the kernel reads it; resolving it beside the link's path wrote a new file elsewhere and
    left the file the link shows unchanged."""
    real = tmp_path / "real"
    (real / "dir").mkdir(parents=True)
    (real / "x.json").write_text("old")
    (tmp_path / "linked").symlink_to(real / "dir")
    (real / "dir" / "l.json").symlink_to("../x.json")
    path = tmp_path / "linked" / "l.json"
    assert path.read_text() == "old"
    assert check_output_file(path) == real / "x.json"
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and path.is_symlink()
    assert not (tmp_path / "x.json").exists()


def test_stale_temps_are_old_files_and_folders_only_when_asked(tmp_path: Path) -> None:
    """A user's folder named like a temp (``.recs.csv.old.tmp``) was deleted with the temps
    of killed writes; only a download, which extracts into a folder, removes folders."""
    import os
    import time

    old = time.time() - 3600
    stale, fresh = tmp_path / ".a.csv.x1.tmp", tmp_path / ".a.csv.x2.tmp"
    folder = tmp_path / ".a.csv.old.tmp"
    folder.mkdir()
    (folder / "kept.txt").write_text("mine")
    for path in (stale, fresh):
        path.write_text("")
    for path in (stale, folder / "kept.txt", folder):
        os.utime(path, (old, old))
    assert remove_stale_temps(tmp_path, ".a.csv.*.tmp", older_than=600) == 1
    assert not stale.exists() and fresh.exists() and (folder / "kept.txt").exists()
    assert remove_stale_temps(tmp_path, ".a.csv.*.tmp", older_than=600, folders=True) == 1
    assert not folder.exists() and fresh.exists()


def test_a_full_disk_during_an_append_names_the_log(tmp_path: Path, monkeypatch) -> None:
    """An fsync or write that failed for lack of space raised an OSError naming no file,
    which `fedrec` shows as a traceback instead of a one-line error naming the log."""
    import errno

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    log = tmp_path / "metrics.jsonl"
    with pytest.raises(OSError) as caught:
        append_line(log, "{}")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(log)


def test_a_failed_write_closes_its_temporary_file(tmp_path: Path, monkeypatch) -> None:
    """A chmod the file system refuses (some network and FUSE mounts) raised before the
    temporary file's descriptor was handed to the file object that closes it: every failed
    write, retried by a long-running daemon, leaked a descriptor."""
    import errno

    def refused(fd: int, mode: int) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "fchmod", refused)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(PermissionError):
            write_bytes_atomic(tmp_path / "ledger.json", b"{}")
    assert len(os.listdir("/proc/self/fd")) == before
    assert list(tmp_path.iterdir()) == []


def test_readable_path_writes_undecodable_bytes_as_escapes() -> None:
    """Bytes the locale could not decode (lone surrogates in Python's str) read ``\\xff``;
    every other character, ASCII or not, is left as it is."""
    from shared.io import readable_path

    # undecodable under UTF-8 (the escape); a Latin-1 locale decodes it (ÿ)
    assert readable_path(os.fsdecode(b"/d/caf\xff")) in ("/d/caf\\xff", "/d/caf\xff")
    assert readable_path("/d/caf\udcc3\udca9 é") == "/d/caf\\xc3\\xa9 é"
    assert readable_path(Path("plain")) == "plain"


def test_readable_message_writes_undecodable_bytes_as_escapes_also_where_quoted() -> None:
    """An error message may hold a path as it is (the lone surrogate) or quoted with repr
    (``'caf\\udcff'``, the surrogate's own escape): both read ``\\xff``. Other escapes, and a
    backslash that is part of the name (doubled by repr), are left as they are."""
    from shared.io import readable_message

    name = "/d/caf\udcff"
    assert readable_message(f"{name} lacks u.data") == "/d/caf\\xff lacks u.data"
    assert readable_message(f"data-dir {name!r} is given") == "data-dir '/d/caf\\xff' is given"
    assert readable_message(repr("a\\udcff")) == repr("a\\udcff")  # typed, not a byte
    assert readable_message(repr("a\\\udcff")) == "'a\\\\\\xff'"
    assert readable_message("caf\\u00e9 'x\\n'") == "caf\\u00e9 'x\\n'"
