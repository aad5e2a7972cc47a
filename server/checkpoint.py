"""Crash-safe round checkpoints and versioned model publication for the server.

* :class:`CheckpointStore` - after every round the server writes the global parameters,
  the round number, the strategy state and the server's privacy-ledger state; a
  restarted run resumes from :meth:`CheckpointStore.latest`.
* :class:`ArtifactPublisher` - optional task protocol: a task that implements
  ``publish_artifact`` gets every new global model to publish as a versioned artifact
  (the recommender writes ``model-v{version}.int8.onnx``; :func:`write_npz_artifact` is
  a minimal implementation for tests and toy tasks).

On-disk layout of one checkpoint (``NNNNNNNN`` = zero-padded round)::

    round-NNNNNNNN.npz    the parameter arrays (``arr_0000``, ``arr_0001``, ...)
    round-NNNNNNNN.json   the manifest: round, array names/shapes/dtypes, the SHA-256
                          and size of the .npz, strategy state, ledger state, metrics

Why two files: arrays stay in NumPy's binary format (no float <-> text round trip) while
the small state stays human-readable. Why it is still atomic: both files are written
with temp file + fsync + ``os.replace``, the ``.npz`` first and the manifest last. The
manifest is the commit record: a checkpoint exists once its manifest does, and the
manifest's SHA-256 ties it to exactly one arrays file. A crash at any point leaves
either the previous checkpoint or the new one, never a mix; an orphan ``.npz`` without
manifest is ignored and pruned later.

Loading verifies the manifest's JSON schema, the arrays file against its hash, and the
arrays' count, shapes and dtypes. The manifest's own values (the strategy and optimiser
state, the server's privacy ledger) carry no checksum: a change that still parses and
passes the schema, such as an edited digit, loads as written. A corrupt
or truncated newest checkpoint is skipped with a logged warning and the previous one
used. If checkpoints exist but *none* is valid, :meth:`CheckpointStore.latest` raises
instead of returning ``None``: starting over silently would forget the training
progress and - worse - the privacy already spent.

This module imports neither Flower nor torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeAlias, runtime_checkable

import numpy as np
import numpy.typing as npt

from shared.config import is_int
from shared.errors import ConfigError, DataError
from shared.io import make_dirs_durable, write_bytes_atomic, write_json_atomic

logger = logging.getLogger(__name__)

#: Format version written into every manifest; other versions are not loaded.
CHECKPOINT_VERSION = 1
#: What a JSON-serializable state value may be (checked when saving).
JSONValue: TypeAlias = Any
Arrays: TypeAlias = list[npt.NDArray[np.floating]]
MetricScalar: TypeAlias = bool | int | float | str | bytes | None

_NAME = re.compile(r"^round-(\d{8})\.json$")
_PREFIX = "round-"
#: How often :meth:`CheckpointStore.latest` lists the directory again when a checkpoint it
#: listed was pruned (by the running server) before it could be read.
_RESCANS = 5


def _stem(server_round: int) -> str:
    return f"{_PREFIX}{server_round:08d}"


@dataclass(frozen=True)
class Checkpoint:
    """One verified checkpoint, as returned by :meth:`CheckpointStore.latest`."""

    server_round: int
    parameters: Arrays
    strategy_state: dict[str, JSONValue]
    ledger_state: dict[str, JSONValue] | None
    metrics: dict[str, JSONValue]
    created: float
    manifest_path: Path
    arrays_path: Path
    extra: dict[str, JSONValue] = field(default_factory=dict)


def _json_metrics(metrics: Mapping[str, MetricScalar]) -> dict[str, JSONValue]:
    """Metrics as strict JSON: non-finite floats become ``None``, bytes are dropped."""
    out: dict[str, JSONValue] = {}
    for key, value in metrics.items():
        if isinstance(value, bytes):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            out[str(key)] = None
        else:
            out[str(key)] = value
    return out


def _check_json(value: JSONValue, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} is not strict-JSON serializable: {exc}") from exc


class CheckpointStore:
    """Atomic per-round checkpoints in one directory, keeping the newest ``keep``.

    One writer per directory: a second server writing into the same directory would
    interleave rounds. Leftover temp files of a crashed writer are removed when the
    store is opened.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, tidy: bool = True) -> None:
        if not is_int(keep) or keep < 1:
            raise ConfigError(f"'checkpoint-keep' must be an integer >= 1, got {keep!r}")
        self.directory = Path(directory)
        self.keep = keep
        try:
            make_dirs_durable(self.directory)
        except OSError as exc:
            raise ConfigError(
                f"cannot create checkpoint directory {self.directory}: {exc}"
            ) from exc
        # every atomic write here leaves ".<name>.<random>.tmp" if interrupted: the
        # checkpoints' and the user-level DP journal's (``tidy=False``: only reading, maybe
        # beside a running writer, whose temp files are not stale)
        for stale in self.directory.glob(".*.tmp") if tidy else ():
            logger.warning("removing a temp file left by an interrupted save: %s", stale)
            stale.unlink(missing_ok=True)

    # ------------------------------------------------------------------ writing

    def save(
        self,
        server_round: int,
        parameters: Sequence[npt.NDArray[np.floating]],
        strategy_state: Mapping[str, JSONValue],
        ledger_state: Mapping[str, JSONValue] | None,
        metrics: Mapping[str, MetricScalar] | None = None,
        *,
        extra: Mapping[str, JSONValue] | None = None,
    ) -> Path:
        """Write the checkpoint of ``server_round`` atomically; returns the manifest path.

        Raises :class:`ConfigError` for unserializable state (a bug in the caller) and
        ``OSError`` for I/O failures - both should stop the run rather than continue
        without a checkpoint.
        """
        if not is_int(server_round):
            raise ConfigError(f"checkpoint round must be an int, got {server_round!r}")
        if server_round < 0:
            raise ConfigError(f"checkpoint round must be >= 0, got {server_round}")
        arrays = [np.asarray(a) for a in parameters]
        strategy_dict = dict(strategy_state)
        ledger_dict = dict(ledger_state) if ledger_state is not None else None
        extra_dict = dict(extra or {})
        metrics_dict = _json_metrics(metrics or {})
        _check_json(strategy_dict, "strategy state")
        _check_json(ledger_dict, "ledger state")
        _check_json(extra_dict, "extra checkpoint state")
        _check_json(metrics_dict, "round metrics")

        buffer = io.BytesIO()
        names = [f"arr_{i:04d}" for i in range(len(arrays))]
        np.savez(buffer, allow_pickle=False, **dict(zip(names, arrays, strict=True)))
        data = buffer.getvalue()
        stem = _stem(server_round)
        arrays_path = self.directory / f"{stem}.npz"
        manifest_path = self.directory / f"{stem}.json"
        manifest = {
            "version": CHECKPOINT_VERSION,
            "round": server_round,
            "created": time.time(),
            "arrays_file": arrays_path.name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "arrays": [
                {"name": n, "shape": list(a.shape), "dtype": a.dtype.str}
                for n, a in zip(names, arrays, strict=True)
            ],
            "strategy_state": strategy_dict,
            "ledger_state": ledger_dict,
            "metrics": metrics_dict,
            "extra": extra_dict,
        }
        # Replacing an existing checkpoint of the same round (a rerun after a crash that
        # happened between this save and the next): drop its manifest first, so no
        # moment exists where the old manifest points at the new arrays.
        manifest_path.unlink(missing_ok=True)
        write_bytes_atomic(arrays_path, data)
        write_bytes_atomic(
            manifest_path, (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode()
        )
        self._prune(server_round)
        return manifest_path

    def _rounds_on_disk(self) -> list[int]:
        """Rounds with a manifest file, newest first (validity not checked)."""
        rounds = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match:
                rounds.append(int(match.group(1)))
        return sorted(rounds, reverse=True)

    def _prune(self, saved: int) -> None:
        """Keep the checkpoint just ``saved`` and the newest ``keep - 1`` before it; remove
        older ones and orphan arrays. Rounds *after* it are left alone and not counted: they
        are checkpoints a resume skipped (unreadable, or of another model), and counting
        them could delete the one just written."""
        rounds = [r for r in self._rounds_on_disk() if r <= saved]
        for server_round in rounds[self.keep :]:
            stem = _stem(server_round)
            (self.directory / f"{stem}.json").unlink(missing_ok=True)  # uncommit first
            (self.directory / f"{stem}.npz").unlink(missing_ok=True)
        kept = {_stem(r) for r in self._rounds_on_disk()}
        for path in self.directory.glob(f"{_PREFIX}*.npz"):
            if path.stem not in kept:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading

    def rounds(self) -> list[int]:
        """Rounds that have a checkpoint manifest on disk, oldest first."""
        return sorted(self._rounds_on_disk())

    def verified_after(self, server_round: int) -> list[Checkpoint]:
        """The checkpoints of the rounds after ``server_round`` that verify, oldest first (an
        invalid one is left out, as a resume skips it): what a log that stopped at
        ``server_round`` lacks after a crash between a checkpoint and its log line."""
        out = []
        for later in self.rounds():
            if later <= server_round:
                continue
            try:
                out.append(self.load(later))
            except DataError:
                continue
        return out

    def load(self, server_round: int) -> Checkpoint:
        """Load and verify the checkpoint of ``server_round``; :class:`DataError` if bad."""
        stem = _stem(server_round)
        manifest_path = self.directory / f"{stem}.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            # RecursionError: nested deeper than the parser goes ([[[...]]]), as unusable
            raise DataError(f"checkpoint manifest {manifest_path} is unreadable: {exc}") from exc
        if not isinstance(manifest, dict):
            raise DataError(f"checkpoint manifest {manifest_path} is not a JSON object")
        if manifest.get("version") != CHECKPOINT_VERSION:
            raise DataError(
                f"checkpoint manifest {manifest_path} has version {manifest.get('version')!r}, "
                f"expected {CHECKPOINT_VERSION}"
            )
        try:
            if manifest["round"] != server_round:
                raise DataError(f"says round {manifest['round']!r}, file name says {server_round}")
            arrays_path = self.directory / str(manifest["arrays_file"])
            if arrays_path.parent != self.directory or arrays_path.name != f"{stem}.npz":
                raise DataError(f"points at unexpected arrays file {manifest['arrays_file']!r}")
            expected_hash = str(manifest["sha256"])
            expected_size = int(manifest["size"])
            specs = list(manifest["arrays"])
            strategy_state = manifest["strategy_state"]
            ledger_state = manifest["ledger_state"]
            metrics = manifest.get("metrics", {})
            extra = manifest.get("extra", {})
            created = float(manifest["created"])
            if not isinstance(strategy_state, dict) or not (
                ledger_state is None or isinstance(ledger_state, dict)
            ):
                raise DataError("has a malformed strategy or ledger state")
        except DataError as exc:
            raise DataError(f"checkpoint manifest {manifest_path} {exc}") from None
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            # OverflowError: a number past any float (1e400 reads as inf, which int() refuses)
            raise DataError(f"checkpoint manifest {manifest_path} is malformed: {exc!r}") from None

        try:
            data = arrays_path.read_bytes()
        except OSError as exc:
            raise DataError(f"checkpoint arrays {arrays_path} are unreadable: {exc}") from exc
        if len(data) != expected_size or hashlib.sha256(data).hexdigest() != expected_hash:
            raise DataError(
                f"checkpoint arrays {arrays_path} do not match their manifest "
                f"(size {len(data)} vs {expected_size}, or SHA-256 differs): truncated or "
                "corrupted"
            )
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                parameters: Arrays = []
                for spec in specs:
                    arr = npz[str(spec["name"])]
                    if list(arr.shape) != list(spec["shape"]) or arr.dtype.str != spec["dtype"]:
                        raise DataError(f"array {spec['name']} does not match the manifest")
                    parameters.append(arr)
                if len(npz.files) != len(specs):
                    raise DataError("holds arrays the manifest does not list")
        except DataError as exc:
            raise DataError(f"checkpoint arrays {arrays_path}: {exc}") from None
        except Exception as exc:  # zip/npy decoding errors of many kinds
            raise DataError(f"checkpoint arrays {arrays_path} cannot be decoded: {exc}") from exc
        return Checkpoint(
            server_round=server_round,
            parameters=parameters,
            strategy_state=strategy_state,
            ledger_state=ledger_state,
            metrics=dict(metrics) if isinstance(metrics, dict) else {},
            created=created,
            manifest_path=manifest_path,
            arrays_path=arrays_path,
            extra=dict(extra) if isinstance(extra, dict) else {},
        )

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; ``None`` if the directory has none.

        Invalid newer checkpoints are skipped with a warning. Raises
        :class:`DataError` when manifests exist but none verifies (see module doc).

        A reader beside the running server (``fedrec server status``, the pre-launch check)
        can see a checkpoint pruned between listing and loading it: with ``checkpoint-keep``
        1, saving round N+1 removes round N, the only one listed. A checkpoint whose manifest
        is gone by the time its load failed was removed, not damaged: the directory is
        listed again rather than the run reported as having no valid checkpoint.
        """
        problems: list[str] = []
        for _ in range(_RESCANS):
            problems = []
            vanished = False
            for server_round in self._rounds_on_disk():
                try:
                    checkpoint = self.load(server_round)
                except DataError as exc:
                    if not (self.directory / f"{_stem(server_round)}.json").exists():
                        vanished = True  # pruned by the writer since the listing
                        break
                    logger.warning("skipping invalid checkpoint of round %s: %s", server_round, exc)
                    problems.append(str(exc))
                    continue
                if problems:
                    logger.warning(
                        "resuming from the checkpoint of round %s (%s newer checkpoint(s) invalid)",
                        server_round,
                        len(problems),
                    )
                return checkpoint
            if not vanished:
                break
        else:
            raise DataError(
                f"the checkpoints in {self.directory} kept changing while they were read "
                f"({_RESCANS} times: a running server saving and pruning them); try again"
            )
        if problems:
            raise DataError(
                f"all {len(problems)} checkpoint(s) in {self.directory} are invalid; refusing "
                "to start over (that would forget the training progress and the privacy "
                "already spent). Restore them, or start a new run deliberately elsewhere (another "
                "--name for `fedrec simulate`, another --state-dir for `fedrec server "
                f"start`, or 'checkpoint-dir' of the ServerApp). First problem: {problems[0]}"
            )
        return None


# ============================================================================ publication


@runtime_checkable
class ArtifactPublisher(Protocol):
    """Optional task extension: publish each new global model as a versioned artifact.

    The server calls :meth:`publish_artifact` after each round's checkpoint when the
    run config sets ``artifact-dir`` (and once more on resume for the checkpointed
    model, in case the previous process died between checkpoint and publication, so
    implementations must be idempotent for a given version). Write atomically (temp +
    rename) so that consumers never see a half-written model.
    """

    def publish_artifact(
        self, parameters: Sequence[npt.NDArray[np.floating]], version: int, out_dir: Path
    ) -> Path:
        """Write the artifact of model ``version`` into ``out_dir``; return its path."""
        ...


def write_npz_artifact(
    parameters: Sequence[npt.NDArray[np.floating]],
    version: int,
    out_dir: Path,
    *,
    stem: str = "model",
) -> Path:
    """Minimal :class:`ArtifactPublisher` body: ``{stem}-v{version}.npz`` plus a manifest.

    Writes ``{stem}-v{version}.npz`` (the arrays) and ``{stem}-v{version}.json``
    (version, SHA-256, shapes), both atomically; returns the ``.npz`` path.
    """
    if not is_int(version) or version < 0:
        raise ConfigError(f"artifact version must be an int >= 0, got {version!r}")
    buffer = io.BytesIO()
    arrays = [np.asarray(a) for a in parameters]
    np.savez(buffer, allow_pickle=False, **{f"arr_{i:04d}": a for i, a in enumerate(arrays)})
    data = buffer.getvalue()
    path = Path(out_dir) / f"{stem}-v{version}.npz"
    write_bytes_atomic(path, data)
    write_json_atomic(
        path.with_suffix(".json"),
        {
            "version": version,
            "file": path.name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "shapes": [list(a.shape) for a in arrays],
            "dtypes": [a.dtype.str for a in arrays],
        },
    )
    return path
