"""Stopping a daemon's children reaches everything they started: a process in a session of
its own (Flower's ServerApp) and the orphans of a child that crashed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.state import init_state_dir
from server.superlink import SuperLinkOptions, SuperLinkProcess
from shared.processes import descendants, pid_alive, reap_group, terminate_processes

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

# A stand-in for the SuperLink: it starts a "ServerApp" in a session of its own (as Flower's
# SuperExec does), prints that process's pid and waits.
PARENT = (
    "import subprocess, sys, time\n"
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
    " start_new_session=True)\n"
    "print(p.pid, flush=True)\n"
    "time.sleep(120)\n"
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


@pytest.fixture
def parent() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    yield proc, child
    for pid in (proc.pid, child):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def test_descendants_reach_a_child_in_its_own_session(
    parent: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, child = parent
    found = {pid for pid, _ in descendants(proc.pid)}
    assert child in found and proc.pid not in found
    assert os.getsid(child) != os.getsid(proc.pid)  # a signal to the group would miss it
    assert descendants(child) == set()


def test_terminate_processes_spares_a_reused_pid(
    parent: tuple[subprocess.Popen[bytes], int],
) -> None:
    _, child = parent
    ((pid, start),) = [key for key in descendants(parent[0].pid) if key[0] == child]
    terminate_processes({(pid, start + 1)}, grace_s=0.2)  # same pid, another process
    assert _alive(child)
    terminate_processes({(pid, start)}, grace_s=5.0)
    assert _wait_gone(child)


def test_terminate_processes_sends_nothing_to_a_zombie(monkeypatch: pytest.MonkeyPatch) -> None:
    """A zombie (exited, not yet reaped, as orphans are where no init reaps them) counted as
    alive: it was sent SIGTERM, waited for the whole grace, then sent SIGKILL."""
    import shared.processes as processes

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while pid_alive(proc.pid):  # exited, not reaped: a zombie
            assert time.monotonic() < deadline
            time.sleep(0.05)
        start = processes._stat(proc.pid)
        assert start is not None  # still in /proc
        sent: list[int] = []
        real_kill = os.kill

        def kill(pid: int, sig: int) -> None:
            if sig:  # signal 0 is a probe
                sent.append(sig)
            real_kill(pid, sig)

        monkeypatch.setattr(processes.os, "kill", kill)
        terminate_processes({(proc.pid, start[1])}, grace_s=5.0)
        assert sent == []
    finally:
        proc.wait()


def test_stopping_a_crashed_superlink_stops_the_serverapp_it_left_behind(
    tmp_path: Path, parent: tuple[subprocess.Popen[bytes], int]
) -> None:
    proc, server_app = parent
    superlink = SuperLinkProcess(init_state_dir(tmp_path / "s"), SuperLinkOptions(port=19999))
    superlink.popen = proc
    superlink.remember_descendants()  # what following the run notes every few seconds
    proc.kill()  # the SuperLink crashes; its ServerApp is orphaned, out of its group
    proc.wait()
    assert _alive(server_app)
    superlink.stop()
    assert _wait_gone(server_app)


def test_reap_group_does_not_wait_for_members_that_exited() -> None:
    """A group whose only member left is a zombie (exited, not reaped: an orphan waits for
    init, which some containers' init reaps late) has nothing left to stop: reap_group
    waited its whole grace for it (2 s of every device daemon's stop in such a container)."""
    leader = subprocess.Popen(["sleep", "30"], process_group=0)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"], process_group=leader.pid)
    try:
        deadline = time.monotonic() + 20
        while pid_alive(zombie.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # until it has exited; not reaped (no wait): a zombie
        assert not pid_alive(zombie.pid) and os.getpgid(zombie.pid) == leader.pid
        leader.kill()
        leader.wait()
        started = time.monotonic()
        reap_group(leader.pid, 5.0)
        assert time.monotonic() - started < 1.0
    finally:
        zombie.wait()
        with contextlib.suppress(ProcessLookupError):
            leader.kill()


def test_reap_group_kills_a_reaped_leaders_group_and_spares_a_reused_pid() -> None:
    """reap_group runs after the leader was reaped: what is left of its group is killed; but a
    process now holding the leader's pid is a newcomer, and the group of that id its own (a
    daemon stopped long after its child crashed SIGKILLed such an unrelated group)."""
    leader = subprocess.Popen(
        [sys.executable, "-c", LEADER], stdout=subprocess.PIPE, start_new_session=True
    )
    assert leader.stdout is not None
    member = int(leader.stdout.readline())
    leader.wait()  # the leader is gone and reaped; its group lives on in `member`
    try:
        assert _alive(member) and os.getpgid(member) == leader.pid
        reap_group(leader.pid, 0.3)
        assert _wait_gone(member)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)

    # what a reused pid looks like: a live process leading a group of that id
    newcomer = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        reap_group(newcomer.pid, 0.3)
        with pytest.raises(subprocess.TimeoutExpired):  # still running a second later
            newcomer.wait(timeout=1.0)
    finally:
        newcomer.kill()
        newcomer.wait()


# A group leader that starts a member of its group, prints its pid and exits.
LEADER = (
    "import subprocess, sys\n"
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "print(p.pid, flush=True)\n"
)


def test_pid_alive_answers_for_any_pid_a_file_may_hold() -> None:
    """A pid read from a lock or state file past what a pid can be (a corrupt or hand-edited
    file) raised OverflowError from os.kill: a traceback instead of "not running"."""
    assert pid_alive(os.getpid())
    for pid in (0, -1, 2**31, 2**63, 10**30):
        assert not pid_alive(pid)


def test_pid_alive_reads_the_state_after_a_name_holding_a_parenthesis() -> None:
    """The state was read after the first ') ' of /proc/PID/stat, inside the command name
    when that holds one (a process may name itself anything): a running process named
    'x) Z' was taken for a zombie, so a descendant of a stopped daemon was left running."""
    renamed = "open('/proc/self/comm', 'w').write('x) Z'); print(flush=True); input()"
    child = subprocess.Popen(
        [sys.executable, "-c", renamed], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"\n"  # renamed
        assert Path(f"/proc/{child.pid}/comm").read_text() == "x) Z\n"
        assert pid_alive(child.pid)
        child.kill()
        child.wait()
        assert not pid_alive(child.pid)
    finally:
        child.kill()
        child.communicate()
