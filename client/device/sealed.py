"""Sealed model files and the device's catalog.

A model on the device is stored *sealed*: encrypted and authenticated with AES-GCM under a
key HKDF-derived from the data key (label ``sealed-model/aes-gcm``). Encryption and not only
a MAC, because a model adapted on the device's own history is personal data. One file per
version, ``models/model-v{N}.onnx.sealed``::

    b"FRSEALv1" | u32 header length (big endian) | header (JSON) | 12-byte nonce | ciphertext+tag

The header (format tag, version ``N``, the ONNX ``model_version``, the SHA-256 of the
plaintext, catalog size, time) is in clear but is the AES-GCM associated data, so changing
one byte anywhere — header, nonce or ciphertext — fails authentication; a file renamed to
another version is caught by comparing the header's version with the file name. Every
failure is a :class:`~shared.errors.ModelFileError` saying what is wrong and what to do.

``models/current`` names the version in use; it is replaced atomically *after* the sealed
file is fully written (both with :func:`shared.io.write_bytes_atomic`), so a crash leaves
either the old or the new model current, never a half-written one. The pointer is not
authenticated: pointed at an older sealed version still on disk, that one is served; and
since versions start again from 1 once every file is erased, an older copy of a file sealed
under the same version number (from a backup) would open too. A model is validated by
loading it into :class:`~shared.ondevice.OnDeviceModel` (catalog size and fingerprint
included) before it is sealed, so a broken download is never installed.

The catalog (``catalog.json``: the raw item ids in the models' dense-id order) is not
secret and not personal; it maps the app's raw item ids to model columns and is what lets
``POST /events`` refuse unknown items before any model is installed.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import re
import secrets
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from client.device.identity import derive_subkey
from shared.errors import ConfigError, DataError, ModelFileError
from shared.io import fsync_dir, write_bytes_atomic, write_json_atomic
from shared.ondevice.runtime import OnDeviceModel, RuntimeConfig, catalog_fingerprint

MAGIC = b"FRSEALv1"
SEALED_FORMAT = "fedrec-sealed-model/1"
CATALOG_FORMAT = "fedrec-catalog/1"
CURRENT_POINTER = "current"
_NAME = re.compile(r"^model-v([1-9][0-9]{0,8})\.onnx\.sealed$")
_MAX_HEADER = 64 * 1024
_NONCE = 12

PERSONAL_SUFFIX = "+personal"
"""Ends the ``model_version`` of a model carrying a device's personal adapter (personal data;
``"3+personal"``); a global model's is its round (``"3"``)."""


def sealed_name(version: int) -> str:
    return f"model-v{version}.onnx.sealed"


# --------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class Catalog:
    """The item ids a model scores, in its dense-id order (column ``j`` is ``item_ids[j]``)."""

    item_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.item_ids:
            raise DataError("the catalog is empty; it must list the model's item ids")
        bad = [i for i in self.item_ids if not isinstance(i, str) or not i]
        if bad:
            raise DataError(f"catalog item ids must be non-empty strings, got {bad[:5]!r}")
        if len(set(self.item_ids)) != len(self.item_ids):
            # counted in one pass: ``tuple.count`` per id was quadratic (a minute for 60k ids)
            counts = collections.Counter(self.item_ids)
            dupes = sorted(i for i, n in counts.items() if n > 1)[:5]
            raise DataError(f"catalog lists item ids more than once: {dupes}")

    @functools.cached_property
    def fingerprint(self) -> str:
        """The hash a model's ``fedrec.catalog_fingerprint`` metadata must equal."""
        return catalog_fingerprint(self.item_ids)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {item: i for i, item in enumerate(self.item_ids)}

    def __len__(self) -> int:
        return len(self.item_ids)

    def dense(self, item_id: str) -> int | None:
        """Model column of ``item_id`` (None if unknown)."""
        return self._index.get(item_id)

    def unknown(self, item_ids: Iterable[str]) -> list[str]:
        """The ids not in the catalog, first occurrence order, without repeats."""
        return [i for i in dict.fromkeys(item_ids) if i not in self._index]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CATALOG_FORMAT,
            "fingerprint": self.fingerprint,
            "item_ids": list(self.item_ids),
        }

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def from_json(cls, obj: Any, *, source: str = "catalog") -> Catalog:
        """Parse ``{"format", "item_ids", "fingerprint"}`` or a bare JSON list of ids."""
        if isinstance(obj, list):
            ids = obj
        elif isinstance(obj, dict) and isinstance(obj.get("item_ids"), list):
            if obj.get("format", CATALOG_FORMAT) != CATALOG_FORMAT:
                raise DataError(
                    f"{source}: catalog format {obj.get('format')!r} is not {CATALOG_FORMAT!r}"
                )
            ids = obj["item_ids"]
        else:
            raise DataError(
                f"{source}: a catalog is a JSON list of item ids or an object with 'item_ids'"
            )
        catalog = cls(tuple(ids))
        expected = obj.get("fingerprint") if isinstance(obj, dict) else None
        if expected is not None and expected != catalog.fingerprint:
            raise DataError(
                f"{source}: fingerprint {expected!r} does not match its item ids "
                f"({catalog.fingerprint}); the file is corrupt — fetch it again"
            )
        return catalog

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        path = Path(path)
        try:
            obj = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(
                f"cannot read the catalog {path}: {exc}; it must be the JSON catalog written "
                "next to the model (models/catalog.json of a simulation run)"
            ) from exc
        return cls.from_json(obj, source=str(path))


# --------------------------------------------------------------------------- sealing


@dataclass(frozen=True)
class SealedModelInfo:
    """What a sealed file's header says (after authentication)."""

    version: int
    model_version: str
    sha256: str
    n_items: int
    sealed_at: float
    path: Path


def seal_model(data: bytes, key: bytes, header: dict[str, Any]) -> bytes:
    """Encrypt ``data`` with AES-GCM; ``header`` (JSON) is bound as associated data."""
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(head) > _MAX_HEADER:
        raise ConfigError(f"sealed-model header too large ({len(head)} bytes)")
    prefix = MAGIC + struct.pack(">I", len(head)) + head
    nonce = secrets.token_bytes(_NONCE)
    return prefix + nonce + AESGCM(key).encrypt(nonce, data, prefix)


def unseal_model(blob: bytes, key: bytes, *, source: str) -> tuple[dict[str, Any], bytes]:
    """Authenticate and decrypt a sealed file: ``(header, model bytes)`` or ModelFileError."""
    fix = "delete it (or erase the device) and let the next round deliver the model again"
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise ModelFileError(f"{source}: not a sealed fedrec model (bad magic); {fix}")
    (n,) = struct.unpack(">I", blob[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if n > _MAX_HEADER or len(blob) < start + n + _NONCE + 16:
        raise ModelFileError(f"{source}: sealed model is truncated or its header is corrupt; {fix}")
    prefix = blob[: start + n]
    nonce = blob[start + n : start + n + _NONCE]
    try:
        data = AESGCM(key).decrypt(nonce, blob[start + n + _NONCE :], prefix)
    except InvalidTag:
        raise ModelFileError(
            f"{source}: sealed model failed authentication — it was modified, corrupted, or "
            f"sealed with another device's data key; {fix}"
        ) from None
    try:
        header = json.loads(blob[start : start + n])
    except json.JSONDecodeError as exc:  # authenticated, so only a bug could get here
        raise ModelFileError(f"{source}: sealed header is not JSON ({exc}); {fix}") from None
    if not isinstance(header, dict) or header.get("format") != SEALED_FORMAT:
        raise ModelFileError(f"{source}: sealed format is not {SEALED_FORMAT!r}; {fix}")
    if hashlib.sha256(data).hexdigest() != header.get("sha256"):
        raise ModelFileError(f"{source}: model bytes do not match the sealed SHA-256; {fix}")
    return header, data


class SealedModelStore:
    """Versioned sealed model files in one directory, with an atomic ``current`` pointer."""

    def __init__(self, directory: str | Path, data_key: bytes, *, keep: int = 3) -> None:
        if keep < 1:
            raise ConfigError(f"keep (model versions kept on disk) must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self._key = derive_subkey(data_key, "sealed-model/aes-gcm")

    def path(self, version: int) -> Path:
        return self.directory / sealed_name(version)

    def versions(self) -> list[int]:
        """Sealed versions on disk, ascending."""
        if not self.directory.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def current_version(self) -> int | None:
        """The version ``current`` points at (None before the first install)."""
        pointer = self.directory / CURRENT_POINTER
        try:
            text = pointer.read_bytes().decode("utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:  # a bad sector: no model, not no start
            raise ModelFileError(
                f"{pointer} is unreadable ({exc}); delete it and install the model again"
            ) from exc
        match = _NAME.match(text)
        if not match:
            raise ModelFileError(
                f"{pointer} holds {text[:60]!r}, not a sealed model name; delete it and "
                f"install the model again"
            )
        version = int(match.group(1))
        if not self.path(version).exists():
            raise ModelFileError(
                f"{pointer} points at {text}, which is missing; install the model again"
            )
        return version

    def install(
        self,
        data: bytes,
        *,
        catalog: Catalog | None = None,
        runtime: RuntimeConfig | None = None,
        name: str | None = None,
    ) -> tuple[SealedModelInfo, OnDeviceModel]:
        """Validate ``data`` (ONNX bytes), seal it as the next version and make it current.

        The model must load in :class:`OnDeviceModel` and, with ``catalog``, match its size
        and fingerprint; otherwise :class:`ModelFileError` and nothing is written. Older
        versions beyond ``keep`` are deleted after the pointer moved.
        """
        return self.seal(data, self.validate(data, catalog=catalog, runtime=runtime, name=name))

    @staticmethod
    def validate(
        data: bytes,
        *,
        catalog: Catalog | None = None,
        runtime: RuntimeConfig | None = None,
        name: str | None = None,
    ) -> OnDeviceModel:
        """The first half of :meth:`install`: load ``data`` (an ONNX Runtime session and a
        probe) and check it against ``catalog``; writes nothing, so it needs no lock."""
        return OnDeviceModel(
            data,
            expected_n_items=len(catalog) if catalog else None,
            expected_catalog_fingerprint=catalog.fingerprint if catalog else None,
            config=runtime,
            name=name,
        )

    def seal(self, data: bytes, model: OnDeviceModel) -> tuple[SealedModelInfo, OnDeviceModel]:
        """The second half of :meth:`install`: seal ``data``, which :meth:`validate` loaded
        as ``model``, as the next version and make it current (callers serialise it)."""
        version = max(self.versions(), default=0) + 1
        header = {
            "format": SEALED_FORMAT,
            "version": version,
            "model_version": model.metadata.model_version,
            "sha256": hashlib.sha256(data).hexdigest(),
            "n_items": model.n_items,
            "sealed_at": time.time(),
        }
        path = self.path(version)  # its folder is created (durably) by the write
        write_bytes_atomic(path, seal_model(data, self._key, header))
        try:
            write_bytes_atomic(self.directory / CURRENT_POINTER, (path.name + "\n").encode())
        except BaseException:
            # the previous model stays current: the new file would be an orphan (taking the
            # space a full disk lacks) until a later prune; kept where the pointer did move
            # before the failure (its folder's sync), or where the pointer cannot be read
            with contextlib.suppress(OSError, ModelFileError):
                if self.current_version() != version:
                    path.unlink(missing_ok=True)
            raise
        self._prune(current=version)
        return self._info(header, path), model

    def read(self, version: int) -> tuple[SealedModelInfo, bytes]:
        """Unseal one version: its header and the ONNX bytes (ModelFileError if tampered)."""
        path = self.path(version)
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise ModelFileError(
                f"cannot read sealed model {path}: {exc.strerror or exc}; install it again"
            ) from exc
        header, data = unseal_model(blob, self._key, source=str(path))
        if header.get("version") != version:
            raise ModelFileError(
                f"{path}: the file holds sealed version {header.get('version')}, not {version} "
                f"(renamed or swapped); delete it and install the model again"
            )
        return self._info(header, path), data

    def load(
        self,
        version: int | None = None,
        *,
        catalog: Catalog | None = None,
        runtime: RuntimeConfig | None = None,
    ) -> tuple[SealedModelInfo, OnDeviceModel] | None:
        """Unseal and load ``version`` (default: current) from bytes; None if none installed."""
        version = self.current_version() if version is None else version
        if version is None:
            return None
        info, data = self.read(version)
        model = self.validate(data, catalog=catalog, runtime=runtime, name=str(info.path))
        return info, model

    def erase(self, *, keep: int | None = None) -> None:
        """Delete every sealed file but version ``keep`` (which must be current), and the
        pointer unless ``keep`` is given (pointer first: never a dangling current). The
        deletions are durable when it returns (the folder is synced): an erase's marker,
        removed after, must not outlive them in a power loss."""
        if keep is None:
            (self.directory / CURRENT_POINTER).unlink(missing_ok=True)
        elif keep != self.current_version():
            raise ValueError(f"sealed version {keep} is not current; it cannot be kept alone")
        for version in self.versions():
            if version != keep:
                self.path(version).unlink(missing_ok=True)
        if self.directory.is_dir():
            for tmp in self.directory.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
            fsync_dir(self.directory)

    def _prune(self, current: int) -> None:
        """Keep the ``keep`` newest versions, and also the newest global model while the
        current one is personal: erasing the user's data removes every personal model and
        serves that global one again, so pruning it left an erased device with no model."""
        old = [v for v in self.versions() if v != current]
        protected = None
        if self._is_personal(current):
            protected = next((v for v in reversed(old) if self._is_personal(v) is False), None)
        others = [v for v in old if v != protected]
        room = max(0, self.keep - 1 - (protected is not None))
        for version in others[: max(0, len(others) - room)]:
            self.path(version).unlink(missing_ok=True)

    def _is_personal(self, version: int) -> bool | None:
        """Whether a sealed file's header names a personal model (``None``: unreadable).

        Read from the header's clear text without authenticating it: for housekeeping only
        (a tampered file still fails when it is unsealed)."""
        try:
            with self.path(version).open("rb") as fh:
                prefix = fh.read(len(MAGIC) + 4)
                (n,) = struct.unpack(">I", prefix[len(MAGIC) :])
                if not prefix.startswith(MAGIC) or n > _MAX_HEADER:
                    return None
                header = json.loads(fh.read(n))
            return str(header["model_version"]).endswith(PERSONAL_SUFFIX)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            return None

    @staticmethod
    def _info(header: dict[str, Any], path: Path) -> SealedModelInfo:
        return SealedModelInfo(
            version=int(header["version"]),
            model_version=str(header["model_version"]),
            sha256=str(header["sha256"]),
            n_items=int(header["n_items"]),
            sealed_at=float(header["sealed_at"]),
            path=path,
        )
