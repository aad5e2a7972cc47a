"""Child-process groups for the long-running daemons (the server's SuperLink, the device's
SuperNode and API): one way to tie a child to its parent, and one way to stop a group.

Children are started with ``start_new_session=True`` so that each is the leader of its own
process group: stopping the group also stops what the child spawned (Flower starts a
ServerApp / ClientApp process per run).

Children run in their state folder (not wherever the command was started, a folder that may
be removed meanwhile), so the programs they are started with are named by absolute paths:
``sys.executable`` is relative when Python was found through a relative PATH entry
(``.venv/bin``), and relative to another folder it names no file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.errors import ConfigError


def python_executable() -> str:
    """This interpreter as an absolute path (see the module docstring)."""
    return os.path.abspath(sys.executable)


def console_script(name: str) -> str:
    """The installed console script ``name``, as an absolute path: the one beside this
    interpreter (a virtual environment need not be activated), else the one on PATH;
    :class:`ConfigError` when neither exists."""
    beside = Path(python_executable()).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"`{name}` is not installed; install the project (pip install .)")
    return os.path.abspath(found)


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """``preexec_fn`` on Linux: the child gets SIGTERM when this process dies, even by
    SIGKILL, so a crashed daemon leaves no orphaned SuperLink or SuperNode behind.

    Linux ties the signal to the *thread* that started the child, not the process: a child
    started from a thread that ends before the process (e.g. a monitor thread restarting a
    crashed child) gets SIGTERM when that thread ends. Start children that must outlive
    their starter from a thread that lives as long as the process (the daemon's restarts
    happen in a thread that ends only at shutdown)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid`` (0 probes); whether the group still exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def terminate_group(proc: subprocess.Popen[bytes], grace_s: float) -> bool:
    """SIGTERM ``proc``'s group, wait up to ``grace_s`` for ``proc``, then SIGKILL the group.

    Returns whether it had to be killed (False also when it had already exited).
    """
    if proc.poll() is not None:
        return False
    signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        return True
    return False


def reap_group(pgid: int, grace_s: float) -> None:
    """After the leader exited and was reaped (``Popen.wait`` / ``poll``): let the rest of
    group ``pgid`` finish for ``grace_s``, then SIGKILL whatever is left.

    Signals nothing once the group is gone, or once a process holds the pid ``pgid``: the
    kernel hands out no pid that a live group still uses as its id, so such a process is a
    newcomer that reused the number, and a group of that id is its own (a daemon stopped
    long after its child crashed would otherwise SIGKILL an unrelated process group).
    Members that exited but are not reaped yet (zombies) are not waited for (see
    :func:`_group_running`)."""
    deadline = time.monotonic() + grace_s
    while True:
        if _pid_in_use(pgid) or not _group_running(pgid):
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    signal_group(pgid, signal.SIGKILL)


def _group_running(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member that has not exited. A zombie (exited,
    not yet reaped) has nothing left to stop: an orphan waits for init to reap it, which
    some containers' init does late (a device daemon's stop waited 2 s for its SuperNode's
    exited SuperExec) or never. Without a readable ``/proc``, any member counts."""
    if not signal_group(pgid, 0):
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    group = str(pgid).encode()
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:  # state, ppid, pgrp after the ')'
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == group and fields[0] != b"Z":
            return True
    return False


def _pid_in_use(pid: int) -> bool:
    """Whether some process (a zombie too, or another user's) has the pid ``pid``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` is running: another user's counts, a zombie (exited, not yet
    reaped) does not. What a pid written in a lock or state file is checked with."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # Overflow: past any pid (a corrupt file)
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not reaped) is not running
        with open(f"/proc/{pid}/stat", "rb") as fh:  # the state follows the name's last ')'
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


ProcessKey = tuple[int, int]
"""A process as ``(pid, start time)``: the start time tells a reused pid from the original."""


def _stat(pid: int) -> tuple[int, int] | None:
    """``(parent pid, start time in clock ticks)`` of ``pid`` from ``/proc``, or ``None``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[-1].split()  # the command name may hold spaces and ')'
    try:
        return int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def descendants(pid: int) -> set[ProcessKey]:
    """Every live descendant of ``pid``, however deep and in whatever process group or
    session (Linux ``/proc``; empty elsewhere). Flower's SuperExec starts each ServerApp in
    a session of its own, out of reach of a signal to the SuperLink's group."""
    children: dict[int, list[ProcessKey]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return set()
    for name in entries:
        if name.isdigit() and (info := _stat(int(name))) is not None:
            children.setdefault(info[0], []).append((int(name), info[1]))
    found: set[ProcessKey] = set()
    stack = [pid]
    while stack:
        for key in children.get(stack.pop(), []):
            if key not in found:
                found.add(key)
                stack.append(key[0])
    return found


def terminate_processes(processes: set[ProcessKey], grace_s: float) -> None:
    """SIGTERM each process still alive (same pid *and* start time), SIGKILL those left after
    ``grace_s``: what outlived its group, e.g. orphans of a SuperLink that crashed. A zombie
    (exited, not yet reaped: where no init reaps orphans) has nothing left to stop and is not
    waited for."""

    def alive() -> list[int]:
        return [
            pid
            for pid, start in processes
            if (s := _stat(pid)) is not None and s[1] == start and pid_alive(pid)
        ]

    for pid in alive():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
