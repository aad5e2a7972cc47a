"""One writer per device state directory: the daemon holds ``STATE/daemon.lock`` (an
exclusive ``flock``) for its whole life, so a second daemon or ``init --force`` on the same
directory is refused, a daemon that fails to start never deletes another one's ``api.json``,
and the lock goes away with its holder, even after ``kill -9``; the ``api.json`` a killed
daemon leaves is then told from a live one's by that lock, and removed by the next start."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from client.device import identity
from client.device.daemon import Daemon, DaemonConfig
from client.device.identity import (
    DaemonNotRunningError,
    DeviceIdentity,
    DeviceLayout,
    StateDirInUseError,
    StateDirLock,
    init_identity,
    remove_stale_api_info,
    running_api,
)
from fedrec.cli import app as fedrec_app
from shared.errors import ConfigError
from tests.test_deploy_device import _wait_until, device  # noqa: F401  (device: a fixture)
from tests.test_deploy_e2e import fedrec_cmd

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

_HOLD = textwrap.dedent(
    """
    import sys, time
    from client.device.identity import StateDirLock
    lock = StateDirLock.acquire(sys.argv[1], role="daemon", advice="stop it")
    print("locked", flush=True)
    time.sleep(600)
    """
)


def _acquire(state: Path) -> StateDirLock:
    return StateDirLock.acquire(state, role="daemon", advice="stop it first")


def test_a_second_lock_is_refused_until_the_first_is_released(tmp_path: Path) -> None:
    layout = DeviceLayout(tmp_path / "new" / "dev")
    first = _acquire(layout.state_dir)
    assert first.held
    assert stat.S_IMODE(layout.state_dir.stat().st_mode) == 0o700  # created owner-only
    assert json.loads(layout.lock_file.read_text()) == {"pid": os.getpid(), "role": "daemon"}
    # a second open file description conflicts even within one process
    with pytest.raises(StateDirInUseError) as refused:
        _acquire(layout.state_dir)
    message = str(refused.value)
    assert str(layout.state_dir) in message and "in use" in message
    assert f"a fedrec daemon (pid {os.getpid()})" in message and "stop it first" in message
    assert "\n" not in message  # the CLI prints it as one line
    first.release()
    first.release()  # idempotent
    assert not first.held
    assert layout.lock_file.exists() and layout.lock_file.read_text() == ""  # kept, emptied
    with _acquire(layout.state_dir) as again:
        assert again.held
    assert not again.held
    _acquire(layout.state_dir)  # dropped at once: garbage collection releases it too
    _acquire(layout.state_dir).release()


def test_a_lock_whose_holder_cannot_be_written_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a full disk, writing the holder's pid into daemon.lock raised an OSError that
    names no file: `client start`, `serve-api`, `install-model`, `init` and `rotate-key`
    printed a traceback ending in '[Errno 28] No space left on device'. It names the lock
    file now (the command line's one-line error), and the lock is not left held."""
    import errno

    from fedrec.cli import main

    layout = DeviceLayout(tmp_path / "dev")

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patched:
        patched.setattr(os, "pwrite", full)
        with pytest.raises(OSError) as caught:
            _acquire(layout.state_dir)
        assert caught.value.filename == str(layout.lock_file)
        patched.setattr(
            sys, "argv", ["fedrec", "client", "init", "--state-dir", str(layout.state_dir)]
        )
        with pytest.raises(SystemExit) as exited:
            main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"error: No space left on device: {layout.lock_file}; free space on that disk and retry"
    )
    _acquire(layout.state_dir).release()  # not held by the failed attempt


def test_the_lock_of_a_killed_process_is_released(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(state)],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StateDirInUseError, match=rf"\(pid {holder.pid}\)"):
            _acquire(state)
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=30) == -signal.SIGKILL
        # nothing cleaned up (the file still names the dead holder), yet the lock is free
        assert str(holder.pid) in DeviceLayout(state).lock_file.read_text()
        _acquire(state).release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_second_daemon_and_init_force_are_refused_while_a_daemon_runs(
    device: Path,  # noqa: F811  (the imported fixture)
) -> None:
    before = DeviceIdentity.load(device).device_id
    with Daemon.open(device) as first:
        with pytest.raises(StateDirInUseError, match=r"one daemon per device state directory"):
            Daemon.open(device)
        with pytest.raises(StateDirInUseError, match=r"stop it first.*fedrec client init"):
            init_identity(device, force=True)
        assert DeviceIdentity.load(device).device_id == before == first.device_id
        assert DeviceLayout(device).store_db.exists()  # not deleted under the daemon
        assert first.status().events == 0  # and the daemon still works
    with Daemon.open(device):  # released at shutdown
        pass
    # a daemon that fails to open (after taking the lock) releases it
    with pytest.raises(ConfigError, match="32 raw bytes"):
        Daemon.open(device, data_key=b"too short")
    assert init_identity(device, force=True).device_id != before


def test_a_daemon_that_fails_to_start_writes_no_api_json(
    device: Path,  # noqa: F811  (the imported fixture)
) -> None:
    """Another daemon's api.json is safe from it: a live one holds the lock, so this one
    does not start at all (the CLI test below). One left by a killed daemon is stale: the
    start removes it, so the failed daemon leaves none behind."""
    api_json = DeviceLayout(device).api_info
    api_json.write_text('{"host": "127.0.0.1", "port": 1, "url": "http://127.0.0.1:1", "pid": 1}')
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        daemon = Daemon.open(device, config=DaemonConfig(port=busy.getsockname()[1]))
        errors: list[BaseException] = []

        def run() -> None:  # off the main thread: run() leaves the test's signal handlers alone
            try:
                daemon.run(api=True)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ConfigError)
    assert "cannot listen" in str(errors[0])
    assert not api_json.exists()
    _acquire(device).release()  # and the lock is released


def _api_json(layout: DeviceLayout, pid: int, port: int = 9) -> None:
    url = f"http://127.0.0.1:{port}"
    info = {"host": "127.0.0.1", "port": port, "url": url, "pid": pid}
    layout.api_info.write_text(json.dumps(info))


def test_api_json_counts_only_while_its_daemon_holds_the_lock(tmp_path: Path) -> None:
    """A daemon killed by SIGKILL left api.json naming a dead address, and whatever read it
    (the address of the device's API) talked to nothing, with no hint why."""
    layout = DeviceLayout(tmp_path / "dev")
    # not even a state directory (a mistyped path): starting a daemon there is refused too,
    # for want of an identity, so the advice is `init` (or the path), not `start`
    with pytest.raises(DaemonNotRunningError, match=r"not a device state directory.*client init"):
        running_api(layout.state_dir)
    init_identity(layout.state_dir)
    nothing = r"^no daemon is running on .*; start one with `fedrec client start"
    with pytest.raises(DaemonNotRunningError, match=nothing):
        running_api(layout.state_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _api_json(layout, dead.pid)  # the daemon was killed: no lock file is held
    with pytest.raises(DaemonNotRunningError) as stale:
        running_api(layout.state_dir)
    message = str(stale.value)
    assert f"pid {dead.pid}" in message and "left over" in message and "SIGKILL" in message
    assert "replaces the file" in message and "\n" not in message
    with _acquire(layout.state_dir):  # a daemon starting (it holds the lock, no API yet)
        with pytest.raises(DaemonNotRunningError, match=r"a fedrec daemon \(pid \d+\).*retry"):
            running_api(layout)
        _api_json(layout, os.getpid(), port=4242)  # its own, once it listens
        assert running_api(layout) == running_api(layout.state_dir)
        assert running_api(layout).url == "http://127.0.0.1:4242"
        assert running_api(layout).pid == os.getpid()
    with pytest.raises(DaemonNotRunningError, match="left over"):
        running_api(layout)  # the lock went with it


def test_a_daemon_starting_while_api_json_is_read_is_not_reported_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader probed the lock (free: the last daemon was killed), then the next daemon
    started, removed the stale api.json and wrote its own, and only then did the reader read
    it: the live daemon's address was reported as left over from a dead one."""
    layout = DeviceLayout(tmp_path / "dev")
    layout.state_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _api_json(layout, dead.pid)  # the killed daemon's
    held: list[StateDirLock] = []

    def then_a_daemon_starts(read: Callable[[Path], Any]) -> Callable[[Path], Any]:
        def read_then_start(path: Path) -> Any:
            seen = read(path)
            if not held:  # the next daemon, between the reader's two looks: lock, clean up
                held.append(_acquire(layout.state_dir))
                remove_stale_api_info(held[0])
                _api_json(layout, os.getpid(), port=4242)  # and listen
            return seen

        return read_then_start

    # whichever of the lock and the file the reader looks at first
    monkeypatch.setattr(identity, "is_locked", then_a_daemon_starts(identity.is_locked))
    monkeypatch.setattr(identity, "_read_api_info", then_a_daemon_starts(identity._read_api_info))
    try:
        try:
            api = running_api(layout)
        except DaemonNotRunningError as exc:  # "retry in a moment" is right; "dead" is not
            assert "left over" not in str(exc), str(exc)
            api = running_api(layout)
        assert api.pid == os.getpid() and api.port == 4242
    finally:
        held[0].release()


def test_a_readers_probe_of_the_lock_does_not_make_a_daemon_fail_to_start(
    tmp_path: Path,
) -> None:
    state = tmp_path / "dev"
    _acquire(state).release()
    probe = os.open(DeviceLayout(state).lock_file, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # what running_api's check holds
    threading.Timer(0.05, os.close, (probe,)).start()
    _acquire(state).release()  # waited for it, instead of "in use"


def test_a_slow_readers_probe_does_not_make_a_daemon_fail_to_start(tmp_path: Path) -> None:
    """A reader's probe outlasting the 0.2 s wait (the reader preempted on a busy machine)
    made the next start of a daemon that had been killed fail as "in use by a fedrec daemon
    (pid N)", N the dead daemon's pid. The recorded holder is dead: only a probe can hold
    the lock then, and it is waited out; a live holder is still refused at once."""
    state = tmp_path / "dev"
    lock = _acquire(state)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file = DeviceLayout(state).lock_file
    lock_file.write_text(json.dumps({"pid": dead.pid, "role": "daemon"}) + "\n")
    lock._finalizer()  # the daemon was killed: its flock went, its pid stays in the file
    probe = os.open(lock_file, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a reader's probe, held 0.6 s
    threading.Timer(0.6, os.close, (probe,)).start()
    _acquire(state).release()  # waited for it, instead of "in use"
    with _acquire(state):  # a live daemon: refused without the longer wait
        started = time.monotonic()
        with pytest.raises(StateDirInUseError, match=rf"pid {os.getpid()}"):
            _acquire(state)
        assert time.monotonic() - started < 1.0


@pytest.mark.network
def test_a_daemon_killed_by_sigkill_is_reported_as_not_running_and_the_next_start_cleans_up(
    device: Path,  # noqa: F811  (the imported fixture)
) -> None:
    layout = DeviceLayout(device)
    argv = [*fedrec_cmd(), "client", "serve-api", "--state-dir", str(device), "--port", "0"]
    daemon = subprocess.Popen(argv, cwd=REPO, env=ENV, stderr=subprocess.DEVNULL)
    runner = CliRunner()
    try:
        _wait_until(lambda: layout.api_info.exists() or daemon.poll() is not None, timeout=60)
        assert daemon.poll() is None
        api = running_api(device)
        assert api.pid == daemon.pid
        asked = ["client", "status", "--state-dir", str(device)]
        status = runner.invoke(fedrec_app, [*asked, "--format", "json"])
        assert status.exit_code == 0, status.output
        assert json.loads(status.stdout)["events"] == 0
        table = runner.invoke(fedrec_app, asked)  # the default: for people, every field
        assert table.exit_code == 0, table.output
        assert table.stdout.startswith(f"device {device}\n")
        assert "  events: " in table.stdout and "  privacy:\n    epsilon spent:" in table.stdout
        daemon.send_signal(signal.SIGKILL)
        assert daemon.wait(timeout=30) == -signal.SIGKILL
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert layout.api_info.exists()  # nothing could remove it
    with pytest.raises(DaemonNotRunningError, match=rf"left over.*pid {daemon.pid}.*is dead"):
        running_api(device)
    status = runner.invoke(fedrec_app, ["client", "status", "--state-dir", str(device)])
    assert status.exit_code != 0 and isinstance(status.exception, DaemonNotRunningError)
    with Daemon.open(device):  # the next start: the dead daemon's address is gone
        assert not layout.api_info.exists()


@pytest.mark.network
def test_cli_refuses_a_second_daemon_and_init_force_while_one_runs(
    device: Path,  # noqa: F811  (the imported fixture)
) -> None:
    def fedrec(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [*fedrec_cmd(), "client", *args, "--state-dir", str(device)]
        return subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)

    layout = DeviceLayout(device)
    key = layout.private_key.read_bytes()
    argv = [*fedrec_cmd(), "client", "serve-api", "--state-dir", str(device), "--port", "0"]
    first = subprocess.Popen(argv, cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until(lambda: layout.api_info.exists() or first.poll() is not None, timeout=60)
        assert first.poll() is None
        info = layout.api_info.read_text()
        assert json.loads(info)["pid"] == first.pid

        second = fedrec("serve-api", "--port", "0")
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert str(device) in lines[0] and f"(pid {first.pid})" in lines[0]
        assert "stop it first" in lines[0] and "--state-dir" in lines[0]
        assert layout.api_info.read_text() == info  # neither overwritten nor deleted

        token = DeviceIdentity.load(device).api_token()
        request = urllib.request.Request(
            json.loads(info)["url"] + "/status", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200  # the first daemon still serves

        forced = fedrec("init", "--force")
        assert forced.returncode == 2, forced.stderr
        assert forced.stderr.startswith("error: ") and "stop it first" in forced.stderr
        assert layout.private_key.read_bytes() == key and layout.store_db.exists()

        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
        assert first.stderr is not None
        # it told the user where it listens and where the token is
        said = first.stderr.read()
        url = json.loads(info)["url"]
        assert f"device API on {url} (bearer token in {layout.api_token})" in said
        assert not layout.api_info.exists()  # its own api.json: removed
        assert fedrec("init", "--force").returncode == 0  # the lock went with the daemon
        assert layout.private_key.read_bytes() != key
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
