"""The server's state directory: one folder an operator backs up, mounts into a container, or
points ``fedrec server status`` at.

``fedrec server init --state-dir DIR`` creates the marker, the certificates, the registry
and the empty folders; ``fedrec server start`` adds the SuperLink's database, the progress
file, the last start's record and the generated app::

    DIR/server.toml          marker: layout version, host names of the certificate
    DIR/certs/               ca.pem (give to devices), ca.key, server.pem, server.key (0600)
    DIR/clients.json         the registered device keys (and revoked ones), see ClientRegistry
    DIR/superlink.db         the SuperLink's state database (created by flower-superlink)
    DIR/checkpoints/         one verified checkpoint per round (the run resumes from here)
    DIR/artifacts/           model-v{version}.int8.onnx, the published global models (the
                             newest artifact-keep), catalog.json, and published.jsonl:
                             every version ever published, with its SHA-256 (never reused;
                             kept by init --force: a run that starts without a checkpoint
                             publishes round N as version M+N, M the highest recorded)
    DIR/progress.jsonl       one line per finished round (clients, accuracy, epsilon)
    DIR/flwr-home/           FLWR_HOME of the SuperLink and of the `flwr` calls
    DIR/app/                 the Flower app `fedrec server start` submits (generated)
    DIR/logs/                superlink.log
    DIR/task-state/          the run config's state-dir (each device replaces it with its own)
    DIR/running.json         while `fedrec server start` runs: pids, address, run id
    DIR/last-start.json      the last `fedrec server start` that ran: rounds asked, how it ended

Everything is written atomically (:mod:`shared.io`), so a crash leaves the old or the new
version of every file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.pki import DEFAULT_HOSTS, PkiPaths, SubjectNames, create_pki, with_default_hosts
from shared.config import is_int
from shared.errors import ConfigError, DataError, FedRecError, ModelFileError
from shared.io import (
    exclusive_lock,
    is_locked,
    lock_holder,
    make_dirs_durable,
    try_lock,
    write_bytes_atomic,
)
from shared.processes import pid_alive
from shared.published import (
    ARTIFACT_NAME,
    RECORD_FILE,
    artifact_versions,
    published_digests,
    record_unrecorded,
)

LAYOUT_VERSION = 1

STOPPED_EXIT_CODES = frozenset({128 + signal.SIGINT, 128 + signal.SIGTERM})
"""The exit statuses of a `fedrec server start` stopped on purpose: Ctrl-C (130) and SIGTERM
(143: ``kill``, ``docker stop``), which :func:`describe_last_start` calls a stop."""


class StateDirError(FedRecError):
    """The server state directory is missing, not one, or would be overwritten."""


class BadPublicKeyError(FedRecError):
    """A device public key file is not an OpenSSH EC public key."""


@dataclass(frozen=True)
class ServerLayout:
    """Every path of one server state directory (see the module docstring)."""

    state_dir: Path

    @property
    def marker(self) -> Path:
        return self.state_dir / "server.toml"

    @property
    def pki(self) -> PkiPaths:
        return PkiPaths(self.state_dir / "certs")

    @property
    def registry(self) -> Path:
        return self.state_dir / "clients.json"

    @property
    def database(self) -> Path:
        return self.state_dir / "superlink.db"

    @property
    def checkpoints(self) -> Path:
        return self.state_dir / "checkpoints"

    @property
    def artifacts(self) -> Path:
        return self.state_dir / "artifacts"

    @property
    def progress(self) -> Path:
        return self.state_dir / "progress.jsonl"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    @property
    def app_dir(self) -> Path:
        return self.state_dir / "app"

    @property
    def task_state(self) -> Path:
        """``state-dir`` of the server-side task object (it never trains; kept separate)."""
        return self.state_dir / "task-state"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def superlink_log(self) -> Path:
        return self.logs / "superlink.log"

    @property
    def running(self) -> Path:
        return self.state_dir / "running.json"

    @property
    def last_start(self) -> Path:
        """The last ``fedrec server start`` that launched a run: written when it begins and
        again when it ends (:func:`read_last_start`)."""
        return self.state_dir / "last-start.json"

    @property
    def server_lock(self) -> Path:
        """Locked (``flock``) by the ``fedrec server start`` running from this folder."""
        return self.state_dir / ".server.lock"

    def require(self) -> ServerLayout:
        """Refuse a directory that ``fedrec server init`` did not create."""
        if not self.marker.is_file():
            raise StateDirError(
                f"{self.state_dir} is not a server state directory (no {self.marker.name}); "
                "create it with `fedrec server init --state-dir "
                f"{shlex.quote(str(self.state_dir))}`"
            )
        try:
            marker = tomllib.loads(self.marker.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise StateDirError(f"{self.marker} is unreadable ({exc}); restore it") from None
        version = marker.get("version")
        if marker.get("format") != "fedrec-server-state" or not isinstance(version, int):
            raise StateDirError(
                f"{self.marker} is not a fedrec server state marker; restore it, or create "
                f"the state again with `fedrec server init --force`"
            )
        if version > LAYOUT_VERSION:
            raise StateDirError(
                f"{self.state_dir} was written by a newer fedrec (layout {version}, this one "
                f"reads {LAYOUT_VERSION}); upgrade fedrec"
            )
        return self

    def require_registry(self) -> None:
        """Refuse a missing ``clients.json`` (``init`` writes it) before it is applied: read
        as an empty registry, it unregistered every device from the SuperLink, which never
        takes an unregistered key back (restoring the file then left them all locked out)."""
        problem = self.registry_problem()
        if problem is not None:
            raise DataError(problem)

    def registry_problem(self) -> str | None:
        """Why ``clients.json`` cannot be used as the registry (it is missing), or None."""
        if self.registry.exists():
            return None
        return (
            f"{self.registry} is missing: applied as it is, it would unregister every "
            "device from the SuperLink, which never takes an unregistered key back; "
            "restore it from a backup"
        )


def _interrupted_init(layout: ServerLayout) -> bool:
    """Whether ``layout`` is what an interrupted :func:`init_state_dir` left (a disk full
    or Ctrl-C before the marker, its last write): nothing in it but the entries init makes
    before the marker, with no checkpoint or artifact in them."""
    made = {
        layout.pki.directory,
        layout.checkpoints,
        layout.artifacts,
        layout.flwr_home,
        layout.logs,
        layout.registry,
    }
    if layout.marker.exists() or not layout.state_dir.is_dir():
        return False
    entries = set(layout.state_dir.iterdir())
    if not entries or not entries <= made:
        return False
    return not any(d.is_dir() and any(d.iterdir()) for d in (layout.checkpoints, layout.artifacts))


def init_state_dir(
    state_dir: str | Path, hosts: Sequence[str] = DEFAULT_HOSTS, *, force: bool = False
) -> ServerLayout:
    """Create the layout, the CA and the server certificate for ``hosts`` and the loopback
    names (:data:`DEFAULT_HOSTS`), which the server uses to reach its own SuperLink.

    An existing state directory is refused unless ``force``; with ``force`` the certificates
    are replaced and the run state (checkpoints, progress, SuperLink database, registrations,
    published models) is wiped, because devices must then trust the new CA and be
    registered again. The record of published versions (``artifacts/published.jsonl``)
    stays: the models devices hold keep their numbers, and the next run publishes after them.
    """
    layout = ServerLayout(Path(state_dir))
    hosts = with_default_hosts(hosts)
    SubjectNames.parse(hosts)  # bad --host values are refused before anything is written
    if _interrupted_init(layout):
        # never started (no marker), so no device trusts its CA yet: start it over
        shutil.rmtree(layout.state_dir)
    elif layout.state_dir.exists() and any(layout.state_dir.iterdir()):
        if not force:
            what = "a server state directory" if layout.marker.exists() else "not empty"
            raise StateDirError(
                f"{layout.state_dir} is {what}; refusing to overwrite it (its CA may already "
                "be trusted by devices). Pick another --state-dir, or pass --force to replace "
                "certificates, registrations and run state"
            )
        if not layout.marker.exists():
            raise StateDirError(
                f"{layout.state_dir} is not empty and not a server state directory; --force "
                "only replaces a server state directory. Pick an empty --state-dir"
            )
        _refuse_if_running(layout)
        _clear_artifacts_keeping_record(layout.artifacts)
        for name in ("certs", "checkpoints", "flwr-home", "app", "logs", "task-state"):
            shutil.rmtree(layout.state_dir / name, ignore_errors=True)
        for path in (layout.registry, layout.progress, layout.running, layout.last_start):
            path.unlink(missing_ok=True)
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{layout.database}{suffix}").unlink(missing_ok=True)
    make_dirs_durable(layout.state_dir)
    os.chmod(layout.state_dir, 0o700)
    for directory in (layout.checkpoints, layout.artifacts, layout.flwr_home, layout.logs):
        make_dirs_durable(directory)
    create_pki(layout.pki.directory, hosts)
    ClientRegistry(layout.registry).save()
    import tomli_w

    from server.pki import server_names

    marker = {
        "format": "fedrec-server-state",
        "version": LAYOUT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hosts": server_names(layout.pki),
    }
    write_bytes_atomic(layout.marker, tomli_w.dumps(marker).encode())
    return layout


def _clear_artifacts_keeping_record(artifacts: Path) -> None:
    """Empty ``artifacts/`` for ``init --force`` but for the record of published versions
    (:data:`shared.published.RECORD_FILE`), after adding to it the models on disk it lacks
    (published before it existed). The versions devices may hold stay out of reach of the
    new run, which numbers its own after them (:mod:`server.server_app`): wiped with the
    rest, the next publication reused version 1 for another model, and a device holding a
    newer version from before would never have fetched the new run's models.

    A model that cannot be recorded stays, and an unreadable record refuses the
    re-initialisation (:class:`StateDirError`) before anything is removed."""
    if not artifacts.is_dir():
        return
    try:
        recorded = published_digests(artifacts)
    except ModelFileError as exc:
        raise StateDirError(f"{exc} (--force keeps it: nothing was replaced)") from None
    record_unrecorded(artifacts, recorded, skip="")
    for path in artifacts.iterdir():
        # a model that could not be recorded (a warning said so) stays: it still counts
        if path.name == RECORD_FILE or (
            ARTIFACT_NAME.fullmatch(path.name) and path.name not in recorded
        ):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _refuse_if_running(layout: ServerLayout) -> None:
    info = running_server(layout)
    if info is not None:
        # a server still starting holds the lock before it writes running.json: the pid is
        # then the one the lock file names (it said "pid None")
        pid = info.get("pid") or lock_holder(layout.server_lock)
        raise StateDirError(
            f"a server is running from {layout.state_dir} (pid {pid}); stop it first"
        )


# --------------------------------------------------------------------------- device keys


def load_public_key(text: str, *, source: str) -> tuple[str, str]:
    """Validate one OpenSSH EC public key line; returns ``(normalized line, fingerprint)``.

    Flower's SuperNode authentication takes NIST-curve EC keys (what `fedrec client init`
    writes); anything else is refused with what to do.
    """
    from client.device.identity import device_id_of

    line = text.lstrip("\ufeff").strip()  # a byte-order mark from a Windows editor
    keys = [k for k in line.splitlines() if k.strip() and not k.lstrip().startswith("#")]
    if line.startswith("-----BEGIN") and "PRIVATE KEY" not in line:
        raise BadPublicKeyError(
            f"{source} is a PEM block, not an OpenSSH public key; register the device's "
            "identity/client.pub (one line starting with 'ecdsa-sha2-nistp', as `fedrec client "
            "init` printed it)"
        )
    looks_like_keys = all(k.strip().startswith(("ecdsa-", "ssh-", "sk-")) for k in keys)
    if len(keys) > 1 and "PRIVATE KEY" not in line and looks_like_keys:
        raise BadPublicKeyError(
            f"{source} holds {len(keys)} keys; register each device's identity/client.pub "
            "on its own (one key per file and device)"
        )
    if not line or "PRIVATE KEY" in line:
        hint = " (this is a private key: never copy it off the device)" if line else ""
        raise BadPublicKeyError(
            f"{source} is not a public key{hint}; register the device's "
            "identity/client.pub, the line `fedrec client init` printed"
        )
    try:
        key = serialization.load_ssh_public_key(line.encode())
    # NotImplementedError: a compressed point ("Need uncompressed point"), a traceback before
    except (ValueError, UnsupportedAlgorithm, NotImplementedError) as exc:
        raise BadPublicKeyError(
            f"{source} is not an OpenSSH public key ({exc}); register the device's "
            "identity/client.pub (one line starting with 'ecdsa-sha2-nistp')"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in (
        "secp256r1",
        "secp384r1",
        "secp521r1",
    ):
        kind = getattr(getattr(key, "curve", None), "name", type(key).__name__)
        raise BadPublicKeyError(
            f"{source} is a {kind} key; Flower's SuperNode authentication needs an EC key on a "
            "NIST curve (P-256/384/521), like the one `fedrec client init` creates"
        )
    normalized = key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    return normalized, device_id_of(normalized)


#: Far above an OpenSSH EC public key line (P-521 with a long comment: well under 1 KiB).
MAX_PUBLIC_KEY_FILE_BYTES = 64 * 1024


def read_public_key_file(path: Path) -> tuple[str, str]:
    """:func:`load_public_key` of a file, with a clear error when it cannot be read. Reads
    at most :data:`MAX_PUBLIC_KEY_FILE_BYTES`: a wrong path (a database, a device file)
    is refused, not read into memory."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_PUBLIC_KEY_FILE_BYTES + 1)
        if len(data) > MAX_PUBLIC_KEY_FILE_BYTES:
            raise BadPublicKeyError(
                f"{path} is larger than {MAX_PUBLIC_KEY_FILE_BYTES // 1024} KiB, so it is no "
                "public key file: give the device's identity/client.pub"
            )
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise BadPublicKeyError(f"public key file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadPublicKeyError(f"cannot read public key file {path}: {exc}") from None
    return load_public_key(text, source=str(path))


@dataclass
class ClientRecord:
    """One device key. ``node_id``: the SuperLink's id for it once registered there."""

    name: str
    public_key: str
    fingerprint: str
    added: float
    node_id: int | None = None
    revoked: float | None = None
    #: Whether the SuperLink still lists the key (a revoked key is unregistered there).
    applied: bool = False


def describe_client(record: ClientRecord) -> str:
    """``name (fingerprint[, node N][, revoked])``: one record, told apart from others."""
    node = f", node {record.node_id}" if record.node_id is not None else ""
    revoked = ", revoked" if record.revoked is not None else ""
    return f"{record.name} ({record.fingerprint}{node}{revoked})"


_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# The JSON types of a ClientRecord's fields (None allowed where the field is optional).
_RECORD_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": ((str,), False),
    "public_key": ((str,), False),
    "fingerprint": ((str,), False),
    "added": ((int, float), False),
    "node_id": ((int,), True),
    "revoked": ((int, float), True),
    "applied": ((bool,), False),
}
_REQUIRED = ("name", "public_key", "fingerprint", "added")


REGISTRY_FORMAT = "fedrec-clients/1"
"""The ``format`` :meth:`ClientRegistry.save` writes into ``clients.json``: another one (a
newer fedrec's) is refused rather than read by this version's rules and saved back as this
one, dropping what it does not know."""


def _registry_problem(raw: object) -> str | None:
    """What makes a parsed ``clients.json`` unusable, in the file's own terms (or None)."""
    if not isinstance(raw, dict):
        return f"the top level is a JSON {type(raw).__name__}, not an object"
    written = raw.get("format", REGISTRY_FORMAT)  # none: written by hand, read as this one
    if written != REGISTRY_FORMAT:
        return (
            f"its format is {json.dumps(written)}, not {json.dumps(REGISTRY_FORMAT)}, the one "
            "this fedrec reads (use the fedrec version that wrote it)"
        )
    clients = raw.get("clients", [])
    if not isinstance(clients, list):
        return '"clients" is not a list'
    for i, record in enumerate(clients):
        where = f'entry {i} of "clients"'
        if not isinstance(record, dict):
            return f"{where} is not an object"
        unknown = sorted(set(record) - set(_RECORD_TYPES))
        if unknown:
            return f"{where} has unknown field(s) {', '.join(unknown)}"
        missing = [k for k in _REQUIRED if k not in record]
        if missing:
            return f"{where} lacks {', '.join(missing)}"
        for key, value in record.items():
            types, optional = _RECORD_TYPES[key]
            if value is None and optional:
                continue
            is_bool = isinstance(value, bool)
            if not isinstance(value, types) or (is_bool and bool not in types):
                return f"{where} has {key} = {json.dumps(value)}, of the wrong type"
        problem = _key_problem(record)
        if problem is not None:
            return f"{where} ({record['name']!r}) {problem}"
    return _duplicate_active_key(clients)


def _key_problem(record: dict[str, Any]) -> str | None:
    """Whether a record's key is a device key with the fingerprint it lists: a damaged key
    failed `server start` with Flower's multi-line error naming no entry, and a fingerprint
    edited apart from its key was shown and matched by ``revoke-client`` for another key."""
    try:
        _, fingerprint = load_public_key(record["public_key"], source="public_key")
    except BadPublicKeyError:
        return "has a public_key that is not a device key"
    if fingerprint != record["fingerprint"]:
        return f"has fingerprint {record['fingerprint']}, but its public_key's is {fingerprint}"
    return None


def _duplicate_active_key(clients: list[dict[str, Any]]) -> str | None:
    """Two active entries holding one key (a hand edit, a merge of backups), or None:
    ``revoke-client`` revokes one record, and the key stayed authorized under the other
    while the command said it was revoked."""
    first: dict[str, int] = {}
    for i, record in enumerate(clients):
        if record.get("revoked") is not None:
            continue
        j = first.setdefault(record["fingerprint"], i)
        if j != i:
            names = f"{clients[j]['name']!r}, {record['name']!r}"
            return (
                f'entries {j} and {i} of "clients" ({names}) both authorize the key '
                f"{record['fingerprint']} (a revocation would leave it active under the "
                "other; keep one)"
            )
    return None


_RECORD_FIELDS = tuple(f.name for f in fields(ClientRecord))


def _registry_bytes(clients: Sequence[ClientRecord]) -> bytes:
    """``clients.json``'s content: the format, then each record as one line of JSON.

    The file is written whole on every change, and `server start` saves it after each
    registration the SuperLink makes (:func:`server.superlink.apply_registrations`), so its
    cost is paid once per device and grows with the devices: indented JSON (Python's pure
    encoder) of ``asdict`` records took 37 s of registry writes to apply 1,000 new devices.
    One compact line per record uses the C encoder, and still reads, diffs and edits by hand
    device by device."""
    lines = [json.dumps({k: getattr(c, k) for k in _RECORD_FIELDS}) for c in clients]
    records = "[\n    " + ",\n    ".join(lines) + "\n  ]" if lines else "[]"
    head = f'{{\n  "format": {json.dumps(REGISTRY_FORMAT)},\n  "clients": '
    return f"{head}{records}\n}}\n".encode()


@dataclass
class ClientRegistry:
    """The authorized device keys (``clients.json``): the source of truth that
    ``fedrec server start`` applies to the SuperLink (register new, unregister revoked).

    Change it only inside :meth:`locked`: the CLI commands and a starting server read,
    change and write it back, and without the lock one would overwrite another's change
    (a revocation lost while the SuperLink keeps the key)."""

    path: Path
    clients: list[ClientRecord] = field(default_factory=list)

    @classmethod
    @contextlib.contextmanager
    def locked(cls, path: Path) -> Iterator[ClientRegistry]:
        """The registry at ``path``, loaded under an exclusive lock held until the block
        ends (call :meth:`save` inside it)."""
        with exclusive_lock(path.with_name(f".{path.name}.lock")):
            yield cls.load(path)

    @classmethod
    def load(cls, path: Path) -> ClientRegistry:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:  # bytes not UTF-8
            raise DataError(
                f"the client registry {path} is unreadable: {exc}; restore it from a backup"
            ) from exc
        problem = _registry_problem(raw)
        if problem is not None:
            raise DataError(
                f"the client registry {path} is malformed: {problem}; restore it from a backup"
            )
        return cls(path, [ClientRecord(**c) for c in raw.get("clients", [])])

    def save(self) -> None:
        """Write ``clients.json`` (atomically), one device per line (:func:`_registry_bytes`)."""
        write_bytes_atomic(self.path, _registry_bytes(self.clients))

    def active(self) -> list[ClientRecord]:
        return [c for c in self.clients if c.revoked is None]

    def matching(self, ref: str) -> list[ClientRecord]:
        """The records ``ref`` names by name, fingerprint or node id, active ones first."""
        ordered = self.active() + [c for c in self.clients if c.revoked is not None]

        def matches(c: ClientRecord) -> bool:
            # ASCII digits only: isdigit() takes '²' (int() fails on it) and other scripts'
            by_node = ref.isascii() and ref.isdigit() and c.node_id == int(ref)
            return ref in (c.name, c.fingerprint) or by_node

        return [c for c in ordered if matches(c)]

    def find(self, ref: str) -> ClientRecord:
        """A record by name, fingerprint or node id. Only active records count when there
        are any: a name reused after a revocation (a device that rotated its key) means the
        active device, and only a reference that matches two different active devices, such
        as the name of one and the node id of another, is refused as ambiguous (listing them
        with their fingerprints). A reference that matches only revoked records gives one of
        them, for the caller to report as revoked already: one whose revocation the SuperLink
        has not yet applied if there is one, else the last revoked."""
        records = self.matching(ref)
        active = [c for c in records if c.revoked is None]
        if len({c.fingerprint for c in active}) > 1:  # two different devices
            which = ", ".join(describe_client(c) for c in active)
            raise ConfigError(
                f"{ref!r} matches several active clients ({which}); give the fingerprint "
                "(SHA256:...) of the one meant"
            )
        if active:
            return active[0]
        if records:  # all revoked already
            return max(records, key=lambda c: (c.applied, c.revoked or 0.0))
        names = ", ".join(c.name for c in self.active()) or "none"
        raise ConfigError(f"no registered client {ref!r} (registered: {names})")

    def add(self, public_key: str, fingerprint: str, name: str | None) -> ClientRecord:
        """Add an active record. The same key twice is refused, and so is a key revoked after
        the SuperLink had registered it: the SuperLink keeps an unregistered node's key and
        never activates a node with it again, so re-adding would only look like success. A
        key revoked before any ``server start`` applied it may be added again."""
        for c in self.clients:
            if c.revoked is not None and c.fingerprint == fingerprint and c.node_id is not None:
                raise ConfigError(
                    f"this key ({fingerprint}) was revoked (as {c.name!r}, node {c.node_id}) "
                    "and the SuperLink never accepts a revoked key again; give the device a "
                    "new key (`fedrec client rotate-key` on it keeps its data and privacy "
                    "ledger) and register the new public key"
                )
        if name is not None and not _CLIENT_NAME.fullmatch(name):
            raise ConfigError(
                f"--name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                f"or digit; got {name!r}"
            )
        for c in self.active():
            if c.fingerprint == fingerprint:
                raise ConfigError(f"this key ({fingerprint}) is already registered as {c.name!r}")
            if name is not None and c.name == name:
                raise ConfigError(
                    f"a client named {name!r} is already registered ({c.fingerprint}); pick "
                    "another --name, or, if this is that device's new key (fedrec client "
                    f"rotate-key), revoke the old one first (fedrec server revoke-client "
                    f"{c.fingerprint}) and register this one again"
                )
        if name is None:  # the first device-N no record (active or revoked) has taken
            taken = {c.name for c in self.clients}
            name = next(
                f"device-{n}" for n in range(1, len(taken) + 2) if f"device-{n}" not in taken
            )
        record = ClientRecord(
            name=name,
            public_key=public_key,
            fingerprint=fingerprint,
            added=time.time(),
        )
        self.clients.append(record)
        return record


# --------------------------------------------------------------------------- running / status


def read_running(layout: ServerLayout) -> dict[str, Any] | None:
    """``running.json`` if it is readable and names a process id, else ``None``."""
    try:
        data = json.loads(layout.running.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    pid = data.get("pid")
    if not is_int(pid) or pid <= 0:
        return None
    return data


@contextlib.contextmanager
def hold_server_lock(layout: ServerLayout) -> Iterator[None]:
    """Be the one server of ``layout`` until the block ends; :class:`StateDirError` if
    another holds it. The kernel releases the lock when the process dies, however it dies,
    so a stale ``running.json`` never looks alive and two starts cannot both pass."""
    handle = try_lock(layout.server_lock)
    if handle is None:
        info = read_running(layout) or {}
        pid = info.get("pid") or lock_holder(layout.server_lock)
        raise StateDirError(
            f"a server already runs from {layout.state_dir} (pid {pid}, "
            f"{info.get('address', 'starting')}); stop it first"
        )
    try:
        yield
    finally:
        handle.close()  # releases the lock


def running_server(layout: ServerLayout) -> dict[str, Any] | None:
    """What ``running.json`` says about the server running from ``layout``, or ``None``
    when none runs (also when the file is left over from a server that was killed)."""
    info = read_running(layout)
    if layout.server_lock.exists():
        # held: running (running.json may not be written yet)
        return (info or {}) if is_locked(layout.server_lock) else None
    # a server of an earlier version, which took no lock
    return info if info is not None and pid_alive(int(info["pid"])) else None


def read_last_start(layout: ServerLayout) -> dict[str, Any] | None:
    """``last-start.json`` if it is readable, else ``None``: ``num_rounds`` (the rounds that
    start asked for), ``started``, and once it ended ``ended`` with its ``exit_code`` or the
    ``error`` it failed with. Without ``ended`` and with no server running, it was killed
    (or its machine went down) and had no time to say so."""
    try:
        data = json.loads(layout.last_start.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def describe_last_start(record: dict[str, Any]) -> str | None:
    """How the last start (:func:`read_last_start`) ended, when that was not a completed
    run; ``None`` when it completed."""
    rounds = record.get("num_rounds")
    started = record.get("started")
    what = [f"{rounds} rounds"] if is_int(rounds) else []
    if isinstance(started, int | float) and not isinstance(started, bool):
        # a damaged or hand-edited file (Infinity, NaN, 1e20) is no time a clock can show:
        # left out, as a num_rounds that is not a count is
        with contextlib.suppress(OverflowError, OSError, ValueError):
            what.append(f"begun {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}")
    start = f"the last start ({', '.join(what)})" if what else "the last start"
    code, error = record.get("exit_code"), record.get("error")
    if record.get("ended") is None:
        return f"{start} did not finish: it was killed, or its machine went down"
    if error:
        return f"{start} failed: {error}"
    if code in STOPPED_EXIT_CODES:
        return f"{start} was stopped"
    if code != 0:
        # a damaged or hand-edited file's code that is no exit status (Infinity, 2.5, "7")
        # is left out, as a "started" that is no time is
        status = f" with exit status {code}" if is_int(code) else ""
        return f"{start} ended{status} (its log is in logs/)"
    return None


def read_progress(layout: ServerLayout) -> list[dict[str, Any]]:
    """Every round record (a torn last line, from a crash mid-write, is skipped)."""
    return read_progress_file(layout.progress)


def round_aggregated(record: Mapping[str, Any]) -> bool:
    """Whether a round's record (a progress line, a ``metrics.jsonl`` row) says clients'
    updates went into the model: ``updated`` (not false) with at least one client ok. Under
    user-level DP a round in which no client trained still applies its noise, so it is
    ``updated`` without an aggregated update; a run of only such rounds trained nothing."""
    return record.get("updated") is not False and record.get("clients_ok") != 0


def read_progress_file(path: Path) -> list[dict[str, Any]]:
    """:func:`read_progress` of a progress file given by its path. Bytes that are not UTF-8
    (what a crash can leave in a file's last block) only spoil the lines they are in, which
    are skipped like a torn line: decoding the whole file strictly made `fedrec server
    status` and the ServerApp's start fail on it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return _progress_records(data)


def _progress_records(data: bytes) -> list[dict[str, Any]]:
    """The round records of progress-file bytes (torn or undecodable lines skipped)."""
    out = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


class ProgressTail:
    """Follows a progress file: :meth:`new_records` returns the records appended since the
    last call (the first call: since this object was made), reading only the new bytes. A
    file that grows by a line per round for weeks, read whole twice a second, cost the
    follower more each round. A line still being written is read once it is complete."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = self._complete(0)[0]

    def _complete(self, start: int) -> tuple[int, bytes]:
        """The offset after the last complete line from ``start`` on, and those bytes (a
        file now shorter than ``start``, replaced, is read from its beginning)."""
        try:
            with self.path.open("rb") as fh:
                end = fh.seek(0, os.SEEK_END)
                if end < start:
                    start = 0
                fh.seek(start)
                data = fh.read(end - start)
        except FileNotFoundError:
            return 0, b""
        complete = data.rfind(b"\n") + 1
        return start + complete, data[:complete]

    def new_records(self) -> list[dict[str, Any]]:
        self.offset, data = self._complete(self.offset)
        return _progress_records(data)


_CHECKPOINT_NAME = re.compile(r"round-(\d{8})\.json")


def checkpoint_rounds(layout: ServerLayout) -> list[int]:
    """Rounds with a checkpoint manifest, oldest first. Reads names only: opening a
    :class:`~server.checkpoint.CheckpointStore` would tidy the directory under a running
    server's feet."""
    if not layout.checkpoints.is_dir():
        return []
    rounds = []
    for path in layout.checkpoints.glob("round-*.json"):
        match = _CHECKPOINT_NAME.fullmatch(path.name)  # the checkpoint store's own names
        if match:
            rounds.append(int(match.group(1)))
    return sorted(rounds)


def resumable_round(layout: ServerLayout) -> int | None:
    """The round a restart resumes after: the newest checkpoint that verifies (a damaged
    newer one is skipped, as the ServerApp skips it), ``None`` if none does. Reads only."""
    return checkpoint_state(layout)[0]


def checkpoint_state(layout: ServerLayout) -> tuple[int | None, str | None]:
    """:func:`resumable_round`, and why a restart would refuse to start (every checkpoint
    damaged: the ServerApp refuses to start over), or ``None``. Reads only."""
    from server.checkpoint import CheckpointStore

    if not checkpoint_rounds(layout):
        return None, None
    try:
        latest = CheckpointStore(layout.checkpoints, tidy=False).latest()
    except DataError as err:
        return None, str(err)
    return (latest.server_round if latest is not None else None), None


@dataclass(frozen=True)
class ServerStatus:
    """What ``fedrec server status`` shows (all read from the state directory)."""

    state_dir: str
    running: bool
    pid: int | None
    address: str | None
    run_id: str | None
    checkpoint_round: int | None
    #: why no checkpoint can be resumed although there are some (``start`` refuses), or None
    checkpoint_problem: str | None
    #: the run's total: the running server's (its ``running.json``), else the last start's
    #: (its ``last-start.json``), else the last progress line's (a resumed run with more
    #: rounds wrote none before its first round, and a start may fail before it)
    num_rounds: int | None
    last: dict[str, Any] | None
    clients_registered: int
    clients_revoked: int
    latest_artifact: str | None
    #: when no server runs: the last start that launched a run (:func:`read_last_start`)
    last_start: dict[str, Any] | None = None
    #: why the registry's counts mean nothing (``clients.json`` missing), else None
    clients_problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def server_status(layout: ServerLayout) -> ServerStatus:
    """Read the state directory; works with or without a running server."""
    layout.require()
    running = running_server(layout)
    alive = running is not None
    resumable, problem = checkpoint_state(layout)
    progress = read_progress(layout)
    registry = ClientRegistry.load(layout.registry)
    # the newest on disk: artifact-keep removes older ones, never the newest
    versions = artifact_versions(layout.artifacts)
    # the running server's total (a resumed start may have asked for more rounds than the
    # run that wrote the last progress line), else the last start's (one that failed or was
    # killed before a round ended wrote none), else the last line's
    last_start = None if alive else read_last_start(layout)
    num_rounds = running.get("num_rounds") if running else None
    if not is_int(num_rounds) and last_start is not None:
        num_rounds = last_start.get("num_rounds")
    if not is_int(num_rounds):
        num_rounds = progress[-1].get("num_rounds") if progress else None
    return ServerStatus(
        state_dir=str(layout.state_dir),
        running=alive,
        pid=running.get("pid") if running else None,
        address=str(running["address"]) if running and running.get("address") else None,
        run_id=str(running.get("run_id")) if running and running.get("run_id") else None,
        checkpoint_round=resumable,
        checkpoint_problem=problem,
        num_rounds=num_rounds if is_int(num_rounds) else None,
        last=progress[-1] if progress else None,
        clients_registered=len(registry.active()),
        clients_revoked=len(registry.clients) - len(registry.active()),
        latest_artifact=versions[max(versions)].name if versions else None,
        last_start=last_start,
        clients_problem=layout.registry_problem(),
    )
