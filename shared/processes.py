"""Child-process groups for the long-running daemons (the server's SuperLink, the device's
SuperNode and API): one way to tie a child to its parent, and one way to stop a group.

Children are started with ``start_new_session=True`` so that each is the leader of its own
process group: stopping the group also stops what the child spawned (Flower starts a
ServerApp / ClientApp process per run).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """``preexec_fn`` on Linux: the child gets SIGTERM when this process dies, even by
    SIGKILL, so a crashed daemon leaves no orphaned SuperLink or SuperNode behind."""
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
    """After the leader exited: let the rest of group ``pgid`` finish for ``grace_s``, then
    SIGKILL whatever is left."""
    deadline = time.monotonic() + grace_s
    while signal_group(pgid, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_group(pgid, signal.SIGKILL)
