"""Crash-safe file writes: write to a temporary file in the same folder, fsync, rename."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import IO, Any, BinaryIO, NoReturn

logger = logging.getLogger(__name__)

PRIVATE_MODE = 0o600
"""``mode`` of what :func:`write_bytes_atomic` writes unless told otherwise: keys, ledgers,
checkpoints, whatever the umask."""

REPORT_MODE = 0o644
"""``mode`` of the reports a user reads and shares (JSON, markdown, schemas)."""

FOLDER_MODE = 0o775
"""``mode`` of the folders :func:`make_dirs_durable` creates, cut by the umask: never
writable by other users, also under ``umask 000``, where a 0777 folder let any local user
delete or replace the owner-only files in it (a client's privacy ledger, a checkpoint).
The group keeps what the umask gives it (``umask 002``: a team's shared cache or runs)."""

SHARED_FILE_MODE = 0o664
"""``mode`` of the lock and log files :func:`shared_opener` creates, cut by the umask."""


def shared_opener(path: str, flags: int) -> int:
    """``open(..., opener=shared_opener)``: a file it creates is at most
    :data:`SHARED_FILE_MODE` (cut by the umask), not Python's 0666: under ``umask 000`` a
    run's lock, metrics log and ``published.jsonl`` (each model's SHA-256) were writable by
    every local user."""
    return os.open(path, flags, SHARED_FILE_MODE)


STALE_TEMP_SECONDS = 600.0
"""A temporary file this long untouched is left over from a killed write (a live write's
is younger: it is written in one go, or continuously)."""


CACHE_ROOT_ENV = "FEDREC_CACHE_DIR"

CACHE_MAX_IDLE_SECONDS = 30 * 24 * 3600.0
"""A cache file of other inputs (another model, config or library version) neither read nor
written for this long is removed by the next write to its cache folder: nothing else would
ever delete it, and removing one only costs computing it again."""

CACHE_TOUCH_SECONDS = 24 * 3600.0
"""A cache file that is read is marked as in use (its modification time set to now) once it
is this old, so a file that is only read is not taken for an idle one."""


_UNDECODED_BYTE = re.compile("[\udc80-\udcff]")


def readable_path(path: str | os.PathLike[str]) -> str:
    """``path`` to show to people: each byte the locale could not decode (Python keeps it
    as a lone surrogate, ``\\udcff`` for byte 0xff) written ``\\xff``, the rest as it is.
    Printed as it was, such a name became ``?`` under the C locale or raw invalid bytes
    under UTF-8, and a strict output encoding fails on it."""
    return _UNDECODED_BYTE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", os.fspath(path))


_QUOTED_UNDECODED_BYTE = re.compile(r"(?<!\\)((?:\\\\)*)\\udc([89a-f][0-9a-f])")


def readable_message(text: str) -> str:
    """``text`` (a one-line error) to show to people: each byte the locale could not decode
    written ``\\xff``, as :func:`readable_path` does, also where the message quotes a path
    with ``repr`` (``'caf\\udcff'``: repr escapes the surrogate itself, which read as a
    character code rather than the byte the file's name has). Escapes of other characters
    and doubled backslashes are left as they are. Text is not parsed for quotes: a name
    that itself holds the six characters ``\\udcff`` (a typed backslash) reads ``\\xff`` when
    a message shows it unquoted, as a name holding ``\\xff`` already reads like the byte in
    :func:`readable_path`'s display."""
    return _QUOTED_UNDECODED_BYTE.sub(r"\1\\x\2", readable_path(text))


def home_path(path: str | Path) -> Path:
    """``path`` with a leading ``~`` (or ``~user``) as that home folder. A ``~user`` that
    names no user is a :class:`~shared.errors.ConfigError` (``Path.expanduser`` raised a
    RuntimeError, a traceback; ``os.path.expanduser`` alone would leave a folder named
    ``~user`` to be made in the current one)."""
    from shared.errors import ConfigError

    text = str(path)
    expanded = os.path.expanduser(text)
    if text.startswith("~") and expanded == text:
        who = text.split("/", 1)[0]
        raise ConfigError(f"{text}: {who} names no home folder on this machine; give the full path")
    return Path(expanded)


def cache_root() -> Path:
    """The root of fedrec's caches (datasets, embeddings, pretrained models):
    ``$FEDREC_CACHE_DIR`` if set to something other than blanks, else ``~/.cache/fedrec``.
    Read at call time, so tests and CLIs can redirect it through the environment. Without a
    home folder (``HOME`` unset and a user the password database does not know, as in a
    container run as an arbitrary uid or a bare systemd unit) a
    :class:`~shared.errors.ConfigError` names ``$FEDREC_CACHE_DIR``: pathlib's
    "RuntimeError: Could not determine home directory" was a traceback."""
    from shared.errors import ConfigError

    env = os.environ.get(CACHE_ROOT_ENV, "").strip()
    if env:
        return home_path(env)
    try:
        home = Path.home()
    except RuntimeError as exc:
        raise ConfigError(
            f"no home folder for fedrec's cache (HOME is unset and user id {os.getuid()} has "
            f"no entry in the password database); set {CACHE_ROOT_ENV} (or HOME) to a "
            "writable folder"
        ) from exc
    return home / ".cache" / "fedrec"


def installed_version(name: str) -> str | None:
    """The installed version of the distribution ``name`` (``None`` when it is not
    installed). Read at call time (``importlib.metadata``), never cached."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions_key(names: Iterable[str]) -> bytes:
    """``name=version`` of each of the distributions ``names`` (``name=None`` for one not
    installed), for a cache key: derived data that a library's upgrade can change (another
    tokenization, other kernels) must not be reused by the new versions."""
    return "".join(f"lib:{name}={installed_version(name)}\0" for name in names).encode()


def mark_in_use(path: Path, *, every: float = CACHE_TOUCH_SECONDS) -> None:
    """Set the modification time of the cache file ``path`` to now when it is older than
    ``every`` seconds (see :data:`CACHE_TOUCH_SECONDS`); a failure is ignored."""
    with contextlib.suppress(OSError):
        if time.time() - path.stat().st_mtime > every:
            os.utime(path)


def remove_idle_files(
    folder: Path,
    name: re.Pattern[str],
    *,
    keep: Path,
    older_than: float = CACHE_MAX_IDLE_SECONDS,
    what: str = "cache file",
) -> int:
    """Remove the regular files of ``folder`` whose whole name matches ``name``, other than
    ``keep``, that have been neither read nor written for ``older_than`` seconds (see
    :data:`CACHE_MAX_IDLE_SECONDS`); ``what`` names them in the log. One that cannot be
    removed is skipped. Returns how many were removed."""
    now = time.time()
    removed = 0
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if entry.name == keep.name or not name.fullmatch(entry.name):
            continue
        try:
            st = entry.lstat()
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime <= older_than:
                continue
            entry.unlink()
        except OSError:
            continue
        removed += 1
        logger.info("removed the %s %s, unused for over %.0f days", what, entry, older_than / 86400)
    return removed


def remove_stale_temps(
    folder: str | Path,
    pattern: str,
    *,
    older_than: float = STALE_TEMP_SECONDS,
    folders: bool = False,
) -> int:
    """Remove what killed writes left in ``folder``: files matching ``pattern`` (a glob:
    build it with :func:`glob.escape` around any name it holds) whose modification is
    ``older_than`` seconds old, and, with ``folders``, folders matching it whose newest
    modification (their contents included) is (a download extracts into one). An atomic write
    never trusts such a file, but nothing else would ever delete it. A folder is left alone
    without ``folders``: a user's own folder may be named like a temp. Returns how many were
    removed; one that cannot be is skipped."""
    now = time.time()
    removed = 0
    for entry in Path(folder).glob(pattern):
        try:
            is_dir = entry.is_dir() and not entry.is_symlink()
            if is_dir and not folders:
                continue
            times = [entry.lstat().st_mtime]
            if is_dir:
                times += [p.lstat().st_mtime for p in entry.rglob("*")]
            if now - max(times) <= older_than:
                continue
            if is_dir:
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        except OSError:
            continue
    return removed


def write_bytes_atomic(path: str | Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` so a crash, even a power loss, leaves either the old or
    the new file: the data is fsynced before the rename, and the folder after it (the rename
    itself is only durable once the folder is; a ledger that reverted after its update had
    left would under-count privacy). Folders it creates are made durable too.

    The file is readable by its owner only unless ``mode`` says otherwise (e.g.
    :data:`REPORT_MODE`): keys, ledgers and checkpoints go through here.

    A symbolic link is written through (its target is replaced, the link stays); a path that
    is a device, FIFO or socket is refused (the rename would replace ``/dev/null`` itself)."""
    path = writable_target(path)
    make_dirs_durable(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:  # closes fd whatever fails below
            # mkstemp's 0600 is cut by the umask (0377 left a key its owner could not read)
            os.fchmod(fd, PRIVATE_MODE if mode is None else mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise_naming(exc, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""The errors of a disk with no room left: full, or over its quota."""


def disk_full(exc: OSError) -> bool:
    """Whether ``exc`` says the disk has no room left (:data:`DISK_FULL_ERRNOS`): freeing
    space there and retrying is the fix, whichever file it names (often none)."""
    return exc.errno in DISK_FULL_ERRNOS


def raise_naming(exc: OSError, path: str | Path) -> NoReturn:
    """Raise ``exc`` from writing ``path``; one that names no file (a full disk, a quota)
    as the same error naming ``path``: the command line shows an OSError that names a
    file as a one-line error, and any other as a traceback (a fault of its own)."""
    if exc.filename is None:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    raise exc


class LockWaitCancelled(Exception):
    """:func:`exclusive_lock` stopped waiting for the lock: its ``cancel`` event was set."""


@contextlib.contextmanager
def exclusive_lock(
    path: str | Path, *, cancel: threading.Event | None = None, poll_s: float = 0.05
) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``path`` (created, with its folder, if
    missing) for the block: serialises read-change-write of shared state between processes,
    and between threads that open it separately. Released when the block ends or the
    process dies.

    With ``cancel``, the wait for a lock another holder keeps (another process's whole
    training round, say) is given up as soon as the event is set, checked every ``poll_s``
    seconds, raising :class:`LockWaitCancelled`: a thread asked to stop must not stay
    blocked until that holder is done."""
    path = Path(path)
    make_dirs_durable(path.parent)  # what is written beside the lock must survive a crash
    with open(path, "a+b", opener=shared_opener) as handle:
        if cancel is None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        else:
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if cancel.wait(poll_s):
                        raise LockWaitCancelled(f"gave up waiting for the lock {path}") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def try_lock(path: str | Path) -> IO[str] | None:
    """Take an exclusive advisory lock (``flock``) on ``path`` without waiting for a holder
    (only an :func:`is_locked` probe is waited out, see :data:`PROBE_WAIT_S`) and write this
    process's pid into it; the open handle holds the lock (close it to release), None when
    another process holds it (:func:`lock_holder` says which). The kernel releases it when
    the process dies, however it dies."""
    path = Path(path)
    for _ in range(100):
        make_dirs_durable(path.parent)
        handle = open(path, "a+", opener=shared_opener)  # noqa: SIM115 (returned: holds the lock)
        try:
            _flock_past_probes(handle, path)
        except BlockingIOError:
            handle.close()
            return None
        if _is_current(path, handle):
            try:
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()}\n")
                handle.flush()
            except OSError as exc:
                with contextlib.suppress(OSError):  # its close flushes the same bytes again
                    handle.close()
                # a full disk names no file: the one-line error naming the lock, not a traceback
                raise_naming(exc, path)
            return handle
        # its holder removed the file (discarding the folder) between our open and our lock:
        # a lock on the removed file guards nothing, so take the one now at the path
        handle.close()
    raise OSError(f"{path} keeps being replaced; cannot lock it")


PROBE_WAIT_S = 0.2
"""How long :func:`try_lock` waits out a conflicting lock before it calls the lock held: an
:func:`is_locked` probe (``fedrec server status``) holds a shared lock this briefly, and a
start that met one was refused as if a server ran."""

DEAD_HOLDER_WAIT_S = 5.0
"""How long :func:`try_lock` waits while the pid the lock file names is not running: then
only a probe can hold the lock, and a probe preempted on a busy machine may hold it longer
than :data:`PROBE_WAIT_S`."""


def _flock_past_probes(handle: IO[str], path: Path) -> None:
    """``flock(LOCK_EX | LOCK_NB)`` on ``handle``, retried for :data:`PROBE_WAIT_S` while it
    conflicts (a holder's lock stays, a probe's is gone by then), and up to
    :data:`DEAD_HOLDER_WAIT_S` while the holder the file names is not running;
    BlockingIOError after that."""
    from shared.processes import pid_alive

    start = time.monotonic()
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            waited = time.monotonic() - start
            holder = lock_holder(path)
            if waited >= DEAD_HOLDER_WAIT_S or (
                waited >= PROBE_WAIT_S and holder.isdigit() and pid_alive(int(holder))
            ):
                raise
            time.sleep(0.01)


def _is_current(path: Path, handle: IO[str]) -> bool:
    """Whether the open ``handle`` is still the file at ``path``."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def is_locked(path: str | Path) -> bool:
    """Whether a live process holds the :func:`try_lock` lock on ``path`` (probed with a shared
    lock that is released at once; a missing file is not locked, and is not created)."""
    try:
        handle = open(path)  # noqa: SIM115 (closed below; the probe must not create the file)
    except FileNotFoundError:
        return False
    except PermissionError as exc:
        from shared.errors import DataError

        raise DataError(
            f"cannot read the lock file {path} ({exc.strerror}): run this as the user that "
            "owns the state directory"
        ) from None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def lock_holder(path: str | Path) -> str:
    """The pid written by the holder of a :func:`try_lock` lock, or "?"."""
    try:
        return Path(path).read_text().strip() or "?"
    except OSError:
        return "?"


def fsync_dir(path: str | Path) -> None:
    """Make the entries of folder ``path`` (a rename, a new file or folder) durable; a no-op
    where folders cannot be opened or synced (e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def truncate_durably(path: str | Path) -> None:
    """Empty the file at ``path`` and sync it: a truncation, like an unlink, may be undone by
    a power loss until it is synced (``FileNotFoundError`` if there is no file)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


#: The smallest bound :func:`trim_log` is given (a device's ``max-log-bytes``, a server's
#: ``--max-log-bytes``): a trimmed log keeps half of it, which must hold the 16 KiB tail read
#: to say why a process ended (:func:`client.device.daemon.log_lines`) with room to spare.
MIN_LOG_BYTES = 64 * 1024


def trim_log(log_file: str | Path, max_bytes: int) -> int:
    """Keep ``log_file`` at most ``max_bytes``: once it is larger, keep its newest half (from
    the first whole line in it) and drop the rest; returns the bytes dropped from its front
    (0: nothing done). The file is rewritten in place, as ``logrotate``'s ``copytruncate``
    does, because the process writing it holds it open (``O_APPEND``: its next line goes to
    the new end). What it appends while the tail is copied is copied after it before the file
    is cut; only a line written in the instant between the last such check and the cut can
    be lost."""
    try:
        with open(log_file, "r+b") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size <= max_bytes:
                return 0
            fh.seek(size - max_bytes // 2)
            # up to the end measured: what is appended from now on is copied below, once
            tail = fh.read(max_bytes // 2)
            newline = tail.find(b"\n")
            if 0 <= newline < len(tail) - 1:
                tail = tail[newline + 1 :]
            fh.seek(0)
            fh.write(tail)
            kept, read_at = len(tail), size
            # the writer's appends land past read_at, always above what is written at kept
            # (both move by the same amount), so nothing unread is overwritten
            while more := _read_from(fh, read_at):
                fh.seek(kept)
                fh.write(more)
                kept, read_at = kept + len(more), read_at + len(more)
            fh.truncate(kept)
    except OSError as exc:
        logger.warning("could not trim %s: %s", log_file, exc)
        return 0
    return read_at - kept


def _read_from(fh: BinaryIO, offset: int) -> bytes:
    """What ``fh`` holds from ``offset`` to its current end (its own writes flushed first)."""
    fh.flush()
    fh.seek(offset)
    return fh.read()


def make_dirs_durable(folder: str | Path, *, mode: int = FOLDER_MODE) -> None:
    """``mkdir -p folder`` (``mode`` for ``folder`` itself, :data:`FOLDER_MODE` for the
    parents it creates, both cut by the umask), syncing the parent of every folder it
    creates. Create a folder that durable files go into with this,
    not ``mkdir``: :func:`write_bytes_atomic` syncs only the folders it creates itself, and
    a folder whose own entry was never synced can vanish in a power loss with every file
    fsynced inside it (a privacy ledger, a checkpoint, a key)."""
    folder = Path(folder)
    if folder.is_dir():
        return
    missing = [folder, *(p for p in folder.parents if not p.exists())]
    for link in (p for p in missing if p.is_symlink()):
        # a link to a folder not made yet (a volume's mount point): mkdir said "File exists"
        raise FileNotFoundError(
            errno.ENOENT,
            f"a link to {os.readlink(link)}, which does not exist; create that folder first, "
            "or give a path without the link",
            str(link),
        )
    for created in reversed(missing):  # pathlib's parents=True made the parents 0777
        created.mkdir(mode=mode if created == folder else FOLDER_MODE, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(created.parent)


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` and a newline to the log ``path`` and fsync it.

    A crash in the middle of an append leaves a torn last line (which readers skip); the next
    append first ends it, so the record after a crash is not glued onto the torn one and lost
    with it."""
    path = Path(path)
    make_dirs_durable(path.parent)
    try:
        # appends go to the end whatever the read position
        with open(path, "a+b", opener=shared_opener) as fh:
            torn = False
            end = fh.seek(0, os.SEEK_END)
            if end > 0:
                fh.seek(end - 1)
                torn = fh.read(1) != b"\n"
            fh.write((b"\n" if torn else b"") + line.encode("utf-8") + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise_naming(exc, path)


def write_json_atomic(path: str | Path, obj: Any, *, mode: int | None = None) -> None:
    """Atomically write ``obj`` as indented JSON (``mode``: see :func:`write_bytes_atomic`)."""
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    write_bytes_atomic(path, data, mode=mode)


def check_file_name(value: str, what: str) -> str:
    """Refuse a value that becomes one file or folder name (``what``: how the user gives it,
    e.g. ``--tag``) but would point elsewhere: a path separator, or ``.`` / ``..``."""
    from shared.errors import ConfigError

    if value in (".", "..") or "/" in value or "\\" in value:
        raise ConfigError(
            f"{what} becomes a file or folder name (no '/' or '\\', not '.' or '..'), got {value!r}"
        )
    if len(value.encode()) > MAX_NAME_BYTES:  # room for what is added around it
        raise ConfigError(
            f"{what} becomes part of a file name and may be at most {MAX_NAME_BYTES} bytes, "
            f"got {len(value.encode())}"
        )
    return value


MAX_NAME_BYTES = 100
"""The longest value :func:`check_file_name` takes: file systems allow 255 bytes per name,
and the name gets a prefix, a suffix and a temporary file's extension around it."""


def _is_system_path(path: Path) -> bool:
    """Whether ``path`` is under ``/proc`` or ``/dev`` (devices and process streams: never a
    report's file), ``/dev/shm`` (a memory file system for files) excepted."""
    parts = path.parts
    return len(parts) > 1 and (parts[1] == "proc" or (parts[1] == "dev" and parts[2:3] != ("shm",)))


_MAX_LINK_HOPS = 40


STDOUT_HINT = "use the command's --format json"
"""How most report-writing commands print to standard output instead of a file."""


def writable_target(path: str | Path, *, stdout_hint: str = STDOUT_HINT) -> Path:
    """The file an atomic write of ``path`` replaces: ``path``, or the file its chain of
    symbolic links ends at. A :class:`~shared.errors.ConfigError` if that is not a place for
    a file: a device, FIFO or socket (a rename over ``/dev/null`` replaces the device), a
    path through ``/dev`` or ``/proc`` (``/dev/stdout`` leads to the shell's stream or to the
    file it redirects to, whose open descriptor a rename would orphan), a link loop, or
    ``-`` (standard output by convention, taken for a file in the current folder)."""
    from shared.errors import ConfigError

    if str(path) == "-":  # standard output by convention: it wrote a file named "-" instead
        raise ConfigError(
            f"'-' is not standard output here: a report replaces the file it is given, so give "
            f"a file path (for standard output, {stdout_hint})"
        )
    path = Path(path)
    start = current = Path(os.path.abspath(path))
    for _ in range(_MAX_LINK_HOPS):
        if _is_system_path(current):
            where = "is" if current == start else f"leads to {current},"
            raise ConfigError(
                f"{path} {where} a device or a process's stream; a report replaces the file "
                f"it is given, so give a file path (for standard output, {stdout_hint})"
            )
        if not current.is_symlink():
            break
        # the link's text is relative to the folder the link really is in: through a linked
        # folder, "../x" is beside that folder's target, not beside the link to it
        current = Path(
            os.path.abspath(Path(os.path.realpath(current.parent)) / os.readlink(current))
        )
    else:
        raise ConfigError(f"{path} is a loop of symbolic links; give a file path")
    if current.exists() and not current.is_file() and not current.is_dir():
        raise ConfigError(
            f"{path} is not a regular file (a device, FIFO or socket); a report replaces the "
            "file it is given, so give a file path"
        )
    return path if current == start else current


def check_output_file(path: str | Path, *, stdout_hint: str = STDOUT_HINT) -> Path:
    """Make sure ``path`` can be written as a file, before the work that produces it: a
    folder in its place or a folder that cannot be created or written is a
    :class:`~shared.errors.ConfigError` that says so (rather than a failure after the run).
    Nothing is created, so a command refused for another reason leaves no folder behind.
    ``stdout_hint`` completes "for standard output, ..." in the error for a stream path."""
    from shared.errors import ConfigError

    path = writable_target(path, stdout_hint=stdout_hint)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give the output a file name inside it")
    check_output_dir(path.parent)
    return path


def check_output_dir(path: str | Path) -> Path:
    """Say now why the output folder ``path`` could not be created or written (see
    :func:`check_output_file`); the writer creates it when it writes. ``-`` is refused:
    taken for standard output, it made a folder named ``-``."""
    from shared.errors import ConfigError

    if str(path) == "-":
        raise ConfigError(
            "'-' is not standard output here: the output is a folder that files are written "
            "into; give a folder path"
        )
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path else f" (in the way of {path})"
        raise ConfigError(f"{existing} is a file, not a folder{where}; give another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"the output folder {existing} is not writable; give a writable path")
    return path


def ensure_dir(
    path: str | Path, *, what: str, fix: str, error: type[Exception] | None = None
) -> Path:
    """Create folder ``path`` (and its parents), or raise ``error`` (default
    :class:`~shared.errors.ConfigError`) saying which folder (``what``), why, and ``fix``."""
    from shared.errors import ConfigError

    path = Path(path)
    try:
        make_dirs_durable(path)
    except OSError as exc:
        raise (error or ConfigError)(
            f"cannot create {what} {path} ({exc.strerror or exc}); {fix}"
        ) from exc
    return path


def read_json(
    path: str | Path, *, what: str, consequence: str, error: type[Exception] | None = None
) -> Any:
    """Parse the JSON file ``path``, or raise ``error`` (default
    :class:`~shared.errors.ConfigError`): "``what`` ``path`` is unreadable (why);
    ``consequence``" (what the file guards, and what to do)."""
    from shared.errors import ConfigError

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        # RecursionError: nested deeper than the parser goes ([[[...]]]), as unusable
        raise (error or ConfigError)(f"{what} {path} is unreadable ({exc}); {consequence}") from exc
