"""The device's identity: its key pair, its local data key and its API token.

``fedrec client init`` creates, in ``STATE_DIR/identity/``:

``client.key`` (0600)
    An EC private key on SECP256R1 (NIST P-256) in OpenSSH format (PEM-armored
    ``-----BEGIN OPENSSH PRIVATE KEY-----``). That is the format Flower's SuperNode reads for
    node authentication (``flower-supernode --auth-supernode-private-key client.key``; it
    loads the file with ``load_ssh_private_key``).
``client.pub`` (0644)
    The public key as one OpenSSH line (``ecdsa-sha2-nistp256 AAAA... fedrec-device``), the
    format ``flwr supernode register client.pub`` accepts; ``init`` also prints it.
``data.key`` (0600) *or* ``data.key.scrypt.json`` (0600)
    The 32-byte data key that encrypts the local store and seals model files. Either random
    (stored in ``data.key``), or derived from a passphrase with scrypt (n=2**15, r=8, p=1);
    then only the salt, the parameters, the name of the environment variable the passphrase
    is read from and a short check value are stored, so a wrong passphrase is reported as
    such instead of as a decryption failure. A passphrase is only ever read from an
    environment variable, never from argv (argv is visible to every local user via ``ps``).
``api.token`` (0600)
    The bearer token of the local HTTP API.

``fedrec client rotate-key`` (:func:`rotate_key`) replaces only the key pair, keeping the
replaced public keys in ``client.pub.previous`` for the operator to revoke.

Every purpose-specific key is derived from the data key with HKDF-SHA256 and a distinct
label (:func:`derive_subkey`), so the store, the blind index and the sealed models never
share a key.

One writer per state directory: :class:`StateDirLock` (``STATE_DIR/daemon.lock``) is held by
a running daemon for its whole life and by ``init`` while it rewrites the identity, so a
second daemon, or ``init --force`` under a running daemon, is refused instead of silently
losing data.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import stat
import sys
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from shared.config import is_int
from shared.errors import ConfigError, FedRecError
from shared.io import (
    fsync_dir,
    is_locked,
    make_dirs_durable,
    raise_naming,
    remove_stale_temps,
    write_bytes_atomic,
)
from shared.processes import pid_alive

if TYPE_CHECKING:
    from client.device.sealed import Catalog

logger = logging.getLogger(__name__)

DATA_KEY_BYTES = 32
KDF_FORMAT = "fedrec-data-key-scrypt/1"
_CHECK_MESSAGE = b"fedrec data key check v1"
_KEY_COMMENT = b"fedrec-device"


class IdentityError(FedRecError):
    """The device identity is missing, unreadable, or would be overwritten."""


class WrongPassphraseError(IdentityError):
    """The passphrase does not derive this device's data key."""


class StateDirInUseError(FedRecError):
    """Another process (a running daemon) holds the state directory's single-writer lock."""


class DaemonNotRunningError(FedRecError):
    """No daemon serves the local API of a state directory (an ``api.json`` there, if any,
    is left over from one that was killed)."""


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class DeviceLayout:
    """Where everything of one device lives under its state directory.

    One place names every path so the store, the sealed models, the daemon and the CLI agree.
    """

    state_dir: Path

    @property
    def identity_dir(self) -> Path:
        return self.state_dir / "identity"

    @property
    def private_key(self) -> Path:
        return self.identity_dir / "client.key"

    @property
    def public_key(self) -> Path:
        return self.identity_dir / "client.pub"

    @property
    def data_key(self) -> Path:
        return self.identity_dir / "data.key"

    @property
    def data_key_kdf(self) -> Path:
        return self.identity_dir / "data.key.scrypt.json"

    @property
    def api_token(self) -> Path:
        return self.identity_dir / "api.token"

    @property
    def store_db(self) -> Path:
        return self.state_dir / "store.db"

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def catalog(self) -> Path:
        return self.state_dir / "catalog.json"

    @property
    def erase_pending(self) -> Path:
        """Present while an erase runs: a daemon opening the folder finishes the erase."""
        return self.state_dir / "erase.pending"

    @property
    def catalog_pending(self) -> Path:
        """A new catalog while the model that needs it is being installed (see
        :meth:`~client.device.daemon.Daemon.install_model`)."""
        return self.state_dir / "catalog.pending.json"

    def remove_personal_leftovers(self) -> None:
        """Delete the personal adapter that earlier versions kept in clear under
        ``federated/`` (``personal.pt``, and an interrupted write's temporary file): the
        adapter now lives only inside the sealed personal model, and an erase must not leave
        a copy of it."""
        folder = self.state_dir / "federated"
        found = [*folder.glob("personal.pt*"), *folder.glob(".personal.pt.*")]
        for path in found:
            path.unlink(missing_ok=True)
        if found:  # durable before an erase's marker goes
            fsync_dir(folder)

    def remove_stale_temps(self) -> None:
        """Delete what killed atomic writes left in ``federated/`` and ``privacy/`` (e.g.
        ``.global.npz.*.tmp``): nothing reads such a file, and nothing else would delete it.
        Only ones untouched for :data:`~shared.io.STALE_TEMP_SECONDS`: the training process
        may be writing a live one."""
        for folder in (self.state_dir / "federated", self.ledger.parent):
            remove_stale_temps(folder, ".*.tmp")

    def remove_federated_model(self) -> None:
        """Delete the global model the last federation sent (``federated/global.npz``, and an
        interrupted write's temporary file) for ``init --force``: the daemon serves and
        refits against that file, so a device joining another federation would serve the old
        one's parameters (or, with another architecture, fail on every start). The rounds
        joined (``federated/joined.json``) stay, as the privacy ledger does: they are
        privacy accounting, not the model."""
        folder = self.state_dir / "federated"
        for path in [*folder.glob("global.npz"), *folder.glob(".global.npz.*")]:
            path.unlink(missing_ok=True)

    @property
    def supernode_log(self) -> Path:
        """The SuperNode's log (its ClientApp's output too): it names the user's data in its
        declines and errors, so an erase empties it, whether or not a SuperNode runs, and
        ``init --force`` deletes it."""
        return self.state_dir / "logs" / "supernode.log"

    @property
    def ledger(self) -> Path:
        """The privacy ledger: never deleted by an erase (that would let a device re-spend)."""
        return self.state_dir / "privacy" / "ledger.json"

    @property
    def api_info(self) -> Path:
        """Written by a running daemon: where its API listens (host, port, pid). A daemon
        killed by SIGKILL leaves it behind: read it with :func:`running_api`."""
        return self.state_dir / "api.json"

    @property
    def previous_public_key(self) -> Path:
        """The key ``rotate-key`` replaced, kept so the operator can revoke it."""
        return self.identity_dir / "client.pub.previous"

    @property
    def lock_file(self) -> Path:
        """The single-writer lock (:class:`StateDirLock`); never deleted."""
        return self.state_dir / "daemon.lock"

    def identity_files(self) -> tuple[Path, ...]:
        """Every file ``init`` may create (any of them existing means an identity exists)."""
        return (
            self.private_key,
            self.public_key,
            self.data_key,
            self.data_key_kdf,
            self.api_token,
        )


# --------------------------------------------------------------------------- single writer


LockRole = Literal["daemon", "init", "rotate-key"]
_ROLE_NAMES: dict[str, str] = {
    "daemon": "a fedrec daemon",
    "init": "`fedrec client init`",
    "rotate-key": "`fedrec client rotate-key`",
}


class StateDirLock:
    """The single-writer lock of a device state directory (``STATE_DIR/daemon.lock``).

    Why: a daemon holds the data key, the API token and the open store in memory and is the
    only writer of the sealed model store and the personal adapter. A second daemon on the
    same directory would overwrite (and on exit delete) the first one's ``api.json`` and race
    on the models; ``init --force`` under a running daemon would leave it writing with the old
    key to a store that was deleted, so events would be lost silently. Both must fail loudly.

    How: an exclusive, non-blocking ``fcntl.flock`` on the lock file, held open as long as the
    holder lives. The kernel drops it when the descriptor is closed or the process dies (even
    by SIGKILL), so a crash never leaves a stale lock; the file itself is never deleted
    (unlinking a lock file lets two processes lock two different inodes). flock locks belong
    to the open file description, so a second :meth:`acquire` conflicts even within one
    process, and the descriptor is close-on-exec (child processes such as the SuperNode do not
    inherit it). The file holds the holder's PID and role, to name it in the error and to
    tell a live ``api.json`` from a killed daemon's (:func:`running_api`, whose probe of the
    lock holds a shared lock for an instant: :meth:`acquire` waits that out, for up to
    :data:`_PROBE_WAIT_S`, or :data:`_DEAD_HOLDER_WAIT_S` when the holder named is dead).
    """

    def __init__(self, layout: DeviceLayout, fd: int) -> None:
        self.layout = layout
        self._fd: int | None = fd
        # released when the holder is garbage-collected without close (the fd is closed once)
        self._finalizer = weakref.finalize(self, os.close, fd)

    @classmethod
    def acquire(
        cls, state_dir: str | Path | DeviceLayout, *, role: LockRole, advice: str
    ) -> StateDirLock:
        """Take the lock now or raise :class:`StateDirInUseError` (``advice``: what to do).

        Creates the state directory (owner-only) if it does not exist yet.
        """
        layout = state_dir if isinstance(state_dir, DeviceLayout) else DeviceLayout(Path(state_dir))
        if not layout.state_dir.exists():
            make_dirs_durable(layout.state_dir, mode=0o700)
        path = layout.lock_file
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(path, flags, 0o600)
        try:
            _flock_exclusive(fd)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StateDirInUseError(_in_use_message(layout, holder, advice)) from None
            raise ConfigError(
                f"cannot lock {path} ({exc.strerror or exc}); put the device state directory "
                f"on a local file system that supports file locks"
            ) from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps({"pid": os.getpid(), "role": role}) + "\n").encode(), 0)
        except OSError as exc:
            os.close(fd)
            # a full disk names no file: the one-line error naming the lock, not a traceback
            raise_naming(exc, path)
        except BaseException:
            os.close(fd)
            raise
        return cls(layout, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (idempotent); the file stays, emptied of the holder's PID."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        self._finalizer()  # closing the descriptor releases the flock

    def __enter__(self) -> StateDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


#: How long :meth:`StateDirLock.acquire` waits out a conflicting lock before it calls the
#: directory in use: a reader's probe (:func:`running_api`) holds a shared lock this briefly.
_PROBE_WAIT_S = 0.2

#: How long it waits while the holder the lock file names is not alive (a daemon killed
#: with SIGKILL, or none written): then only a reader's probe can hold it, and a reader
#: preempted on a busy machine may hold it longer than :data:`_PROBE_WAIT_S`.
_DEAD_HOLDER_WAIT_S = 5.0


def _flock_exclusive(fd: int) -> None:
    """``flock(fd, LOCK_EX | LOCK_NB)``, retried for :data:`_PROBE_WAIT_S` while it conflicts
    (a daemon's lock stays, so it still fails then; a reader's probe is gone by then), and
    up to :data:`_DEAD_HOLDER_WAIT_S` while the holder the file names is not alive."""
    start = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            waited = time.monotonic() - start
            if waited >= _DEAD_HOLDER_WAIT_S or (
                waited >= _PROBE_WAIT_S and _holder_alive(_read_holder(fd))
            ):
                raise
            time.sleep(0.01)


def _holder_alive(holder: dict[str, Any]) -> bool:
    """Whether the process a lock file names (its ``pid``) is running (``False``: none named)."""
    pid = holder.get("pid")
    return is_int(pid) and pid_alive(pid)


def _read_holder(fd: int) -> dict[str, Any]:
    """What the holder wrote into the lock file ({} if unreadable or not written yet)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _in_use_message(layout: DeviceLayout, holder: dict[str, Any], advice: str) -> str:
    who = _ROLE_NAMES.get(str(holder.get("role")), "another fedrec daemon")
    pid = holder.get("pid")
    who += f" (pid {pid})" if isinstance(pid, int) else ""
    return (
        f"the device state directory {layout.state_dir} is in use: {who} is running on it and "
        f"holds its lock {layout.lock_file.name}; {advice}"
    )


# --------------------------------------------------------------------------- api.json


@dataclass(frozen=True)
class ApiInfo:
    """Where the daemon running on a state directory serves its local API (``api.json``)."""

    url: str
    host: str
    port: int
    pid: int


def _read_api_info(path: Path) -> ApiInfo | None:
    """``api.json`` if it is there and well-formed, else ``None``."""
    try:
        data = json.loads(path.read_text())
        info = ApiInfo(str(data["url"]), str(data["host"]), int(data["port"]), int(data["pid"]))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return info


def _lock_holder(layout: DeviceLayout) -> dict[str, Any] | None:
    """What the live holder of the directory's lock wrote into it ({} if it wrote nothing
    yet), or ``None`` when no live process holds it (the kernel drops a dead one's)."""
    if not is_locked(layout.lock_file):
        return None
    try:
        holder = json.loads(layout.lock_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def running_api(state_dir: str | Path | DeviceLayout) -> ApiInfo:
    """Where the daemon running on ``state_dir`` serves its API, from ``STATE_DIR/api.json``.

    The file alone is no proof: a daemon killed by SIGKILL (or a power loss) leaves it
    behind, naming a dead address. It counts only while the process it names holds the
    directory's single-writer lock (:class:`StateDirLock`), which the kernel drops when its
    holder dies. Raises :class:`DaemonNotRunningError` saying which case it is.
    """
    layout = state_dir if isinstance(state_dir, DeviceLayout) else DeviceLayout(Path(state_dir))
    where = shlex.quote(str(layout.state_dir))
    start = f"`fedrec client start --state-dir {where}` (or `fedrec client serve-api`)"
    # the file first, then the lock: a daemon that starts in between (it takes the lock,
    # then replaces a stale file) is then "not served yet", never a live one called dead
    info = _read_api_info(layout.api_info)
    holder = _lock_holder(layout)
    if holder is None:
        if info is None and not layout.private_key.exists():  # e.g. a mistyped path
            raise DaemonNotRunningError(
                f"no daemon is running on {layout.state_dir}: it is not a device state "
                f"directory (no {layout.private_key.relative_to(layout.state_dir)}); check "
                f"the path, or create one with `fedrec client init --state-dir {where}`"
            )
        if info is None:
            raise DaemonNotRunningError(
                f"no daemon is running on {layout.state_dir}; start one with {start}"
            )
        raise DaemonNotRunningError(
            f"no daemon is running on {layout.state_dir}: its {layout.api_info.name} is left "
            f"over from one that did not shut down (pid {info.pid}, killed by SIGKILL or a "
            f"power loss), so the API address it names, {info.url}, is dead; start the daemon "
            f"again with {start}, which replaces the file"
        )
    if info is None or info.pid != holder.get("pid"):
        who = _ROLE_NAMES.get(str(holder.get("role")), "another fedrec process")
        pid = holder.get("pid")
        who += f" (pid {pid})" if isinstance(pid, int) else ""
        raise DaemonNotRunningError(
            f"the local API of {layout.state_dir} is not served yet: {who} holds the "
            f"directory and has not started the API (a daemon still starting, or "
            f"`fedrec client install-model`); retry in a moment"
        )
    return info


def remove_stale_api_info(lock: StateDirLock) -> None:
    """Delete an ``api.json`` left over from a daemon that was killed; the caller holds the
    directory's lock (``lock``), so no other daemon can be running to have written it."""
    if not lock.held:
        raise ValueError("remove_stale_api_info needs the state directory's lock held")
    path = lock.layout.api_info
    stale = _read_api_info(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return
    named = f" (pid {stale.pid}, {stale.url})" if stale is not None else ""
    logger.warning(
        "removed %s%s: left over from a daemon that did not shut down cleanly", path, named
    )


# --------------------------------------------------------------------------- key derivation


#: Most memory scrypt may need (``128 * n * r`` bytes, 32 times the default's) and most
#: parallel passes ``p``: parameters past them, read from a damaged or edited
#: ``data.key.scrypt.json``, would raise MemoryError, be killed for memory, or run for hours.
SCRYPT_MAX_MEMORY = 2**30
SCRYPT_MAX_P = 16


@dataclass(frozen=True)
class ScryptParams:
    """scrypt cost parameters. n=2**15, r=8 uses 32 MiB and ~0.1 s: fine once per start."""

    n: int = 2**15
    r: int = 8
    p: int = 1
    salt_bytes: int = 16

    def __post_init__(self) -> None:
        if self.n < 2 or self.n & (self.n - 1):
            raise ConfigError(f"scrypt n must be a power of two >= 2, got {self.n}")
        if self.r < 1 or self.p < 1:
            raise ConfigError(f"scrypt r and p must be >= 1, got r={self.r}, p={self.p}")
        if 128 * self.n * self.r > SCRYPT_MAX_MEMORY or self.p > SCRYPT_MAX_P:
            raise ConfigError(
                f"scrypt n={self.n}, r={self.r}, p={self.p} is past the limits (128*n*r <= "
                f"{SCRYPT_MAX_MEMORY} bytes of memory, p <= {SCRYPT_MAX_P})"
            )
        if self.salt_bytes < 16:
            raise ConfigError(f"scrypt salt must be >= 16 bytes, got {self.salt_bytes}")


def derive_subkey(data_key: bytes, label: str, length: int = 32) -> bytes:
    """A purpose-specific key: HKDF-SHA256(data_key, info="fedrec/<label>").

    Distinct labels give independent keys, so e.g. the store's AEAD key never doubles as the
    sealed-model key.
    """
    check_data_key(data_key)
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=None, info=f"fedrec/{label}".encode()
    ).derive(data_key)


def check_data_key(data_key: bytes) -> None:
    """Refuse anything but 32 bytes (a hex string or a short key is a caller bug)."""
    if not isinstance(data_key, bytes) or len(data_key) != DATA_KEY_BYTES:
        n = len(data_key) if isinstance(data_key, bytes | str) else type(data_key).__name__
        raise ConfigError(f"the data key must be {DATA_KEY_BYTES} raw bytes, got {n}")


def key_check_value(data_key: bytes) -> str:
    """A short public value that tells whether a key is the right one (not the key itself)."""
    mac = hmac.new(derive_subkey(data_key, "key-check"), _CHECK_MESSAGE, hashlib.sha256)
    return mac.hexdigest()[:32]


def derive_passphrase_key(passphrase: str, salt: bytes, params: ScryptParams) -> bytes:
    """scrypt(passphrase, salt) -> 32-byte data key.

    The passphrase is hashed as its UTF-8 bytes; bytes that are not UTF-8 (an environment
    variable set in a Latin-1 terminal: Python decodes them as lone surrogates) are hashed as
    they are (``surrogateescape``) instead of failing, so a UTF-8 passphrase's key is
    unchanged.
    """
    if not passphrase:
        raise ConfigError("the passphrase is empty; set a non-empty passphrase")
    return Scrypt(salt=salt, length=DATA_KEY_BYTES, n=params.n, r=params.r, p=params.p).derive(
        passphrase.encode("utf-8", "surrogateescape")
    )


def read_passphrase_env(var: str) -> str:
    """The passphrase from environment variable ``var`` (never from the command line), as
    the variable's bytes whatever the locale: decoded as UTF-8 (``surrogateescape``), so
    :func:`derive_passphrase_key` hashes exactly those bytes. ``os.environ`` decodes them
    with the locale's codec: under a Latin-1 locale (a systemd unit's or an old image's
    ``LANG``) the UTF-8 passphrase "päss" read as "pÃ¤ss", another key, and a device set up
    under a UTF-8 locale was refused as "the passphrase does not unlock" there."""
    if not var or not var.replace("_", "").isalnum():
        raise ConfigError(
            f"--passphrase-env takes the *name* of an environment variable (e.g. "
            f"FEDREC_PASSPHRASE), got {var!r}; never put the passphrase itself on the command line"
        )
    value = os.environb.get(os.fsencode(var))
    if not value:
        raise ConfigError(
            f"environment variable {var} is not set or empty; export {var}=<passphrase> before "
            f"running (the passphrase is never read from the command line)"
        )
    return value.decode("utf-8", "surrogateescape")


def _locale_spelling(passphrase: str) -> str | None:
    """How ``os.environ`` spelled ``passphrase`` under this locale, where that differs: the
    key of a device set up under a Latin-1 locale before :func:`read_passphrase_env` read
    the variable's bytes was derived from that spelling."""
    raw = passphrase.encode("utf-8", "surrogateescape")
    spelled = raw.decode(sys.getfilesystemencoding(), "surrogateescape")
    return None if spelled == passphrase else spelled


# --------------------------------------------------------------------------- files


def _write_secret(path: Path, data: bytes) -> None:
    """Atomic write of a file only the owner may read (mkstemp creates it 0600)."""
    write_bytes_atomic(path, data)
    os.chmod(path, 0o600)


def _read_secret(path: Path) -> bytes:
    """Read a secret file, refusing one that others can read (as ssh does)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise IdentityError(
            f"{path} is missing; create the device identity with `fedrec client init "
            f"--state-dir {shlex.quote(str(path.parent.parent))}`"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"{path} is accessible by other users (mode {stat.S_IMODE(mode):o}); it holds a "
            f"secret — run `chmod 600 {path}`"
        )
    return path.read_bytes()


# --------------------------------------------------------------------------- identity


DataKeyMode = Literal["random", "passphrase"]


@dataclass(frozen=True)
class InitResult:
    """What ``init`` created: the public key to register and where the files are."""

    layout: DeviceLayout
    public_key_openssh: str
    device_id: str
    data_key_mode: DataKeyMode
    #: with ``force``: every key this device had before, oldest first (the replaced one last,
    #: when it was readable), as ``rotate-key`` keeps them: revoke those registered
    previous_device_ids: tuple[str, ...] = ()
    #: with ``force``: what it erased of what was there, in the words of ``init --help``
    #: ("the local store", ...), so the command can say so
    erased: tuple[str, ...] = ()


def _public_openssh(public_key: ec.EllipticCurvePublicKey) -> str:
    line = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    return f"{line} {_KEY_COMMENT.decode()}"


def device_id_of(public_openssh: str) -> str:
    """OpenSSH-style fingerprint ``SHA256:<base64>`` of the public key (as ``ssh-keygen -l``)."""
    parts = public_openssh.split()
    if len(parts) < 2:
        raise IdentityError(f"not an OpenSSH public key line: {public_openssh[:40]!r}")
    blob = base64.b64decode(parts[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def existing_identity_files(layout: DeviceLayout) -> list[Path]:
    return [p for p in layout.identity_files() if p.exists()]


_INIT_ADVICE = (
    "stop it first (a daemon keeps the current key, token and store in memory and would go on "
    "writing to the store that `init --force` deletes), then rerun `fedrec client init`"
)


def _existing_or_refuse(layout: DeviceLayout, force: bool) -> list[Path]:
    existing = existing_identity_files(layout)
    if not existing and not force and layout.store_db.exists():
        raise IdentityError(
            f"{layout.state_dir} holds a local store ({layout.store_db.name}) but no identity: "
            f"the data key that opens it is gone. Restore {layout.identity_dir} from a backup, "
            f"or pass --force to erase the store and start over (the privacy ledger is kept)"
        )
    if existing and not force:
        names = ", ".join(p.name for p in existing)
        raise IdentityError(
            f"a device identity already exists in {layout.identity_dir} ({names}); refusing to "
            f"overwrite it: its key may be registered with the SuperLink and its data key "
            f"encrypts the local store. Pass --force to replace it (the local store and sealed "
            f"models become unreadable and are erased; the privacy ledger is kept)"
        )
    return existing


def init_identity(
    state_dir: str | Path,
    *,
    passphrase: str | None = None,
    passphrase_env: str | None = None,
    force: bool = False,
    scrypt: ScryptParams | None = None,
    catalog: Catalog | None = None,
) -> InitResult:
    """Create a fresh device identity under ``state_dir`` (see the module docstring).

    Refuses (:class:`IdentityError`) when any identity file exists, unless ``force``: the
    key pair may be registered with a SuperLink and the data key encrypts the local store.
    With ``force`` the local store and sealed models (encrypted with the old key), the
    global model of the last federation and the SuperNode's log (it names the erased data)
    are erased; the privacy ledger, the rounds joined and the catalog are kept.
    ``catalog`` is installed too, if given. A first init that fails (a full disk) removes
    the identity files it wrote, so it can be retried as it was.
    ``passphrase_env`` is only recorded (so ``start`` knows where to read the passphrase).

    Everything is rewritten under the directory's :class:`StateDirLock`: while a daemon runs
    on it, this raises :class:`StateDirInUseError` and changes nothing.
    """
    layout = DeviceLayout(Path(state_dir))
    _existing_or_refuse(layout, force)  # before the lock: the more useful message first
    with StateDirLock.acquire(layout, role="init", advice=_INIT_ADVICE):
        existing = _existing_or_refuse(layout, force)
        # a replaced key may be registered with the SuperLink: kept for the operator to revoke
        previous = _keep_replaced_key(layout, _replaced_key(layout)) if existing else []
        try:
            result = _create_identity(layout, existing, passphrase, passphrase_env, scrypt)
            result = replace(result, previous_device_ids=tuple(device_id_of(p) for p in previous))
            if force:  # unreadable with the new key: remove rather than leave junk
                result = replace(result, erased=_erased_by_force(layout))
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{layout.store_db}{suffix}").unlink(missing_ok=True)
                shutil.rmtree(layout.models_dir, ignore_errors=True)
                layout.remove_personal_leftovers()
                layout.remove_federated_model()
                # it logs in terms of the erased user's data, as an erase knows (which empties it)
                layout.supernode_log.unlink(missing_ok=True)
            if catalog is not None:
                catalog.save(layout.catalog)
        except BaseException:
            if not existing:
                # a first init that failed (a full disk) leaves no part of an identity: it was
                # never shown or used, and a part of one refused the retry the error advises
                for path in existing_identity_files(layout):
                    path.unlink(missing_ok=True)
            raise
    return result


def _erased_by_force(layout: DeviceLayout) -> tuple[str, ...]:
    """What ``init --force`` is about to erase that ``layout`` holds, named as its --help
    names it: the command printed nothing of what it erased."""
    store = [Path(f"{layout.store_db}{suffix}") for suffix in ("", "-wal", "-shm")]
    models = layout.models_dir.is_dir() and any(layout.models_dir.iterdir())
    federated = layout.state_dir / "federated"
    parts = {
        "the local store": any(p.exists() for p in store),
        "the sealed models": models,
        "the last federation's global model": (federated / "global.npz").exists(),
        "logs/supernode.log": layout.supernode_log.exists(),
    }
    return tuple(name for name, present in parts.items() if present)


def _create_identity(
    layout: DeviceLayout,
    existing: list[Path],
    passphrase: str | None,
    passphrase_env: str | None,
    scrypt: ScryptParams | None,
) -> InitResult:
    """Write the key pair, the data key (or its KDF descriptor) and the API token."""
    make_dirs_durable(layout.identity_dir, mode=0o700)
    os.chmod(layout.identity_dir, 0o700)
    for path in existing:
        path.unlink()

    public_line = _write_key_pair(layout)
    mode: DataKeyMode
    if passphrase is None:
        mode = "random"
        _write_secret(layout.data_key, secrets.token_bytes(DATA_KEY_BYTES))
    else:
        mode = "passphrase"
        params = scrypt or ScryptParams()
        salt = secrets.token_bytes(params.salt_bytes)
        key = derive_passphrase_key(passphrase, salt, params)
        descriptor = {
            "format": KDF_FORMAT,
            "kdf": "scrypt",
            "n": params.n,
            "r": params.r,
            "p": params.p,
            "salt": base64.b64encode(salt).decode(),
            "passphrase_env": passphrase_env,
            "check": key_check_value(key),
        }
        _write_secret(layout.data_key_kdf, (json.dumps(descriptor, indent=2) + "\n").encode())
    _write_secret(layout.api_token, (secrets.token_urlsafe(32) + "\n").encode())
    return InitResult(layout, public_line, device_id_of(public_line), mode)


def _write_key_pair(layout: DeviceLayout) -> str:
    """A new SuperNode key pair: the private key first, then ``client.pub`` (derived from it,
    so a crash in between leaves a stale public file, never a stale private key); returns the
    public OpenSSH line."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    _write_secret(
        layout.private_key,
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public_line = _public_openssh(private_key.public_key())
    _write_public(layout.public_key, public_line)
    return public_line


def _write_public(path: Path, public_line: str) -> None:
    write_bytes_atomic(path, (public_line + "\n").encode())
    os.chmod(path, 0o644)


@dataclass(frozen=True)
class RotateResult:
    """What ``rotate-key`` changed: the new key to register and the replaced ones to revoke
    (``previous_device_ids``, oldest first: every key this device has had, as a key rotated
    away before it was registered leaves the one the server knows further back)."""

    layout: DeviceLayout
    public_key_openssh: str
    device_id: str
    previous_device_ids: tuple[str, ...]


_ROTATE_ADVICE = (
    "stop it first (its SuperNode authenticates with the current key), then rerun "
    "`fedrec client rotate-key`"
)


def rotate_key(state_dir: str | Path) -> RotateResult:
    """Replace the device's SuperNode key pair and keep everything else.

    Why: the SuperLink never accepts a revoked key again, and a key may leak; the device
    then needs a new key, but its encrypted store, sealed models, API token and privacy ledger
    are still valid (they do not depend on this key), so unlike ``init --force`` nothing is
    erased. Every replaced public key is kept, one per line, in
    ``identity/client.pub.previous`` (revoke on the server those it has registered). Runs
    under the state directory's :class:`StateDirLock`: refused (:class:`StateDirInUseError`)
    while a daemon runs on it.
    """
    layout = DeviceLayout(Path(state_dir))
    DeviceIdentity.load(layout.state_dir)  # no identity: refused before the lock makes a folder
    with StateDirLock.acquire(layout, role="rotate-key", advice=_ROTATE_ADVICE):
        DeviceIdentity.load(layout.state_dir)
        previous = _keep_replaced_key(layout, _replaced_key(layout, role="rotate-key"))
        public_line = _write_key_pair(layout)
    ids = tuple(device_id_of(line) for line in previous)
    return RotateResult(layout, public_line, device_id_of(public_line), ids)


def _replaced_key(layout: DeviceLayout, role: str = "init --force") -> str:
    """The public OpenSSH line of the key about to be replaced: derived from the private key
    in use, else the operator's copy (``client.pub``), else "" (neither readable)."""
    try:
        return DeviceIdentity(layout).public_key_openssh
    except (OSError, IdentityError):  # a damaged key is what replacing it is for
        logger.warning("%s: %s is unusable; replacing it", role, layout.private_key)
        return _public_copy(layout)


def _keep_replaced_key(layout: DeviceLayout, current: str) -> list[str]:
    """Append ``current`` (if any) to ``client.pub.previous``; return its keys, oldest first."""
    kept = layout.previous_public_key
    earlier = kept.read_text().splitlines() if kept.exists() else []
    previous = [line for line in earlier if line.strip() and line != current]
    previous += [current] if current else []
    if previous:
        write_bytes_atomic(kept, ("\n".join(previous) + "\n").encode())
        os.chmod(kept, 0o644)
    return previous


def _public_copy(layout: DeviceLayout) -> str:
    """The operator's copy of the public key (``client.pub``), or "" if it is not readable."""
    try:
        line = layout.public_key.read_text().strip()
        device_id_of(line)
    except (OSError, ValueError, IdentityError):  # binascii.Error and decoding are ValueErrors
        return ""
    return line


@dataclass(frozen=True)
class DeviceIdentity:
    """A loaded identity: reads the key files lazily and checks them."""

    layout: DeviceLayout

    @classmethod
    def load(cls, state_dir: str | Path) -> DeviceIdentity:
        """The identity in ``state_dir``; :class:`IdentityError` naming ``init`` if absent."""
        layout = DeviceLayout(Path(state_dir))
        if layout.private_key.exists() and not layout.api_token.exists():
            raise IdentityError(
                f"{layout.api_token} is missing; restore it from backup, or re-create the "
                "identity with `fedrec client init --force --state-dir "
                f"{shlex.quote(str(layout.state_dir))}` "
                f"(the local store is then erased)"
            )
        if not layout.private_key.exists() or not layout.api_token.exists():
            raise IdentityError(
                f"no device identity in {layout.state_dir}; create one with `fedrec client "
                f"init --state-dir {shlex.quote(str(layout.state_dir))}`"
            )
        if not layout.data_key.exists() and not layout.data_key_kdf.exists():
            raise IdentityError(
                f"{layout.identity_dir} has no data key ({layout.data_key.name} or "
                f"{layout.data_key_kdf.name}); restore it from backup or re-create the identity "
                f"with `fedrec client init --force` (the local store is then erased)"
            )
        return cls(layout)

    @property
    def data_key_mode(self) -> DataKeyMode:
        return "passphrase" if self.layout.data_key_kdf.exists() else "random"

    @property
    def public_key_openssh(self) -> str:
        """The public key of the private key in use (derived from it: ``client.pub`` is a copy
        for the operator, and could be stale after an interrupted ``rotate-key``)."""
        return _public_openssh(self.private_key().public_key())

    @property
    def device_id(self) -> str:
        return device_id_of(self.public_key_openssh)

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """The SuperNode authentication key (checked to be an EC key)."""
        path = self.layout.private_key
        try:
            key = serialization.load_ssh_private_key(_read_secret(path), None)
        # NotImplementedError: a point not tagged uncompressed ("Need uncompressed point"),
        # which one damaged byte makes: a traceback before, in rotate-key (the fix) too
        except (ValueError, TypeError, UnsupportedAlgorithm, NotImplementedError) as exc:
            raise IdentityError(
                f"{path} is not a usable OpenSSH private key ({exc}); restore it from backup, "
                f"or give the device a new key with `fedrec client rotate-key --state-dir "
                f"{self.layout.state_dir}` and register that on the server (the store, models "
                f"and privacy ledger are kept)"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise IdentityError(f"{self.layout.private_key} is not an EC private key")
        return key

    def api_token(self) -> str:
        try:
            token = _read_secret(self.layout.api_token).decode().strip()
        except UnicodeDecodeError:  # damaged: init writes ASCII
            token = ""
        if len(token) < 16:
            raise IdentityError(
                f"{self.layout.api_token} holds no usable token; re-create the identity with "
                f"`fedrec client init --force`"
            )
        return token

    def kdf_descriptor(self) -> dict[str, Any]:
        raw = _read_secret(self.layout.data_key_kdf)
        try:
            desc = json.loads(raw)
            if not isinstance(desc, dict):
                raise TypeError(f"not a JSON object but {type(desc).__name__}")
            if desc.get("format") != KDF_FORMAT or desc.get("kdf") != "scrypt":
                raise ValueError(f"format {desc.get('format')!r}")
            base64.b64decode(desc["salt"], validate=True)
            # in range before anything is derived: a damaged n or p would exhaust the device
            ScryptParams(n=int(desc["n"]), r=int(desc["r"]), p=int(desc["p"]))
            check = desc.get("check")
            if not isinstance(check, str) or not re.fullmatch(r"[0-9a-f]{32}", check):
                raise ValueError("its check value is not 32 hex digits")
        # OverflowError: a number past any float (1e400); RecursionError: nested too deep
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            raise IdentityError(
                f"{self.layout.data_key_kdf} is malformed ({exc}); restore it from backup"
            ) from None
        return dict(desc)

    def passphrase_env(self) -> str | None:
        """The environment variable named at ``init`` (None for a random key)."""
        if self.data_key_mode != "passphrase":
            return None
        value = self.kdf_descriptor().get("passphrase_env")
        return str(value) if value else None

    def data_key(self, passphrase: str | None = None) -> bytes:
        """The 32-byte data key: read from ``data.key`` or derived from ``passphrase``."""
        if self.data_key_mode == "random":
            key = _read_secret(self.layout.data_key)
            if len(key) != DATA_KEY_BYTES:
                raise IdentityError(
                    f"{self.layout.data_key} holds {len(key)} bytes, expected {DATA_KEY_BYTES}; "
                    f"it is corrupt — restore it from backup"
                )
            return key
        desc = self.kdf_descriptor()
        if passphrase is None:
            env = desc.get("passphrase_env") or "FEDREC_PASSPHRASE"
            raise WrongPassphraseError(
                f"this device's data key is derived from a passphrase; export it in an "
                f"environment variable and pass --passphrase-env (e.g. {env})"
            )
        params = ScryptParams(n=int(desc["n"]), r=int(desc["r"]), p=int(desc["p"]))
        salt, check = base64.b64decode(desc["salt"]), str(desc.get("check", ""))
        key = derive_passphrase_key(passphrase, salt, params)
        legacy = _locale_spelling(passphrase)
        if not hmac.compare_digest(key_check_value(key), check) and legacy is not None:
            key = derive_passphrase_key(legacy, salt, params)  # set up under this locale
        if not hmac.compare_digest(key_check_value(key), check):
            raise WrongPassphraseError(
                "the passphrase does not unlock this device's data key (check value mismatch); "
                "use the passphrase given at `fedrec client init`"
            )
        return key
