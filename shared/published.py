"""The permanent record of the model versions published into a folder, and the retention of
their files.

A published version never changes: devices may hold it, and they tell models apart by their
version alone. While every ``model-v{N}.int8.onnx`` stayed on disk, the file itself was the
proof of what ``N`` was; a server keeping only its newest ``artifact-keep`` files needs
another. :data:`RECORD_FILE` (``published.jsonl`` next to the models) holds one line per
published file, ``{"file": ..., "version": ..., "sha256": ...}``, appended and fsynced
(:func:`shared.io.append_line`) *before* the model is written, so a model file is never
visible without its line. It is a few hundred bytes a version, and is never trimmed.

:func:`retire_old_artifacts` removes the files beyond the newest ones, each only once its
line is on disk (a file published before the record existed gets its line first), so a
removed version is still refused with another model
(:func:`shared.compression.artifact.publish_artifact_once`).

Kept free of torch: the ServerApp and ``fedrec server status`` import it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from shared.errors import ModelFileError
from shared.io import append_line, fsync_dir

logger = logging.getLogger(__name__)

RECORD_FILE = "published.jsonl"
"""Next to the published models: one JSON line per version ever published there."""

ARTIFACT_NAME = re.compile(r"model-v(\d+)\.int8\.onnx")
"""A published on-device model's file name; the group is its version."""


def artifact_file_name(version: int | str) -> str:
    """The file name of published model ``version`` (:data:`ARTIFACT_NAME`)."""
    return f"model-v{version}.int8.onnx"


def artifact_versions(folder: str | Path) -> dict[int, Path]:
    """The published models on disk in ``folder``, by version (anything else there, such as
    a backup or a stray file, is not one); empty when the folder is missing."""
    found: dict[int, Path] = {}
    for path in Path(folder).glob("model-v*.int8.onnx"):
        match = ARTIFACT_NAME.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data``, as the record holds it."""
    return hashlib.sha256(data).hexdigest()


def published_digests(folder: str | Path) -> dict[str, str]:
    """Every file name the record of ``folder`` holds, with the SHA-256 of the model it was
    published with (empty when there is no record yet).

    A line that is not a whole entry is skipped: only a crash in the middle of an append
    leaves one, and the model of that entry was never written (its line comes first). The
    first entry of a name wins (a later one cannot differ: it is refused before it is
    written). Raises :class:`~shared.errors.ModelFileError` (not a refused version) when the
    record cannot be read: what is out could not be told, so nothing is published or
    removed."""
    path = Path(folder) / RECORD_FILE
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ModelFileError(
            f"the record of published versions {path} is unreadable ({exc.strerror or exc}): "
            "what is out cannot be told, so nothing is published; make it readable again"
        ) from exc
    digests: dict[str, str] = {}
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        name, digest = entry.get("file"), entry.get("sha256")
        if isinstance(name, str) and isinstance(digest, str):
            digests.setdefault(name, digest)
    return digests


def highest_published_version(folder: str | Path) -> int:
    """The highest model version ever published into ``folder``: in its record or on disk
    (a file published before the record existed), 0 when none was. A run that starts
    without a checkpoint numbers its versions after it (:mod:`server.server_app`): its
    round 1 trains another model than the version 1 devices may hold. Raises
    :class:`~shared.errors.ModelFileError` when the record cannot be read
    (:func:`published_digests`)."""
    recorded = (ARTIFACT_NAME.fullmatch(name) for name in published_digests(folder))
    versions = [int(m.group(1)) for m in recorded if m] + list(artifact_versions(folder))
    return max(versions, default=0)


def record_published(folder: str | Path, name: str, version: str, digest: str) -> None:
    """Append ``name`` (model ``version``, SHA-256 ``digest``) to the record of ``folder``,
    durably: called before the model is written, and before a file published without a
    line is removed."""
    line = json.dumps({"file": name, "version": version, "sha256": digest})
    append_line(Path(folder) / RECORD_FILE, line)


def record_unrecorded(folder: str | Path, recorded: dict[str, str], *, skip: str) -> None:
    """Append a line for every published model in ``folder`` that the record (``recorded``,
    :func:`published_digests`) lacks, but ``skip``: the files published before the record
    existed (a run or a state directory from an older release), so that the record holds
    every version on disk from the first publication on, not only those after it. Adds the
    lines to ``recorded``. A file that cannot be read or recorded is left for the next time,
    with a warning (it is not removed unrecorded: :func:`retire_old_artifacts`)."""
    for version, path in sorted(artifact_versions(folder).items()):
        if path.name in recorded or path.name == skip:
            continue
        try:
            digest = sha256_hex(path.read_bytes())
            record_published(folder, path.name, str(version), digest)
        except OSError as exc:
            logger.warning("could not record the published model %s: %s", path, exc)
            continue
        recorded[path.name] = digest


def retire_old_artifacts(folder: str | Path, keep: int, *, latest: str) -> list[Path]:
    """Remove the published models of ``folder`` beyond the ``keep`` newest versions, never
    the file named ``latest`` (the one just published, which a resumed run may republish
    under an older number than some on disk); returns those removed.

    Called after a successful publication only. Each file goes once the record holds it:
    one published before the record existed is hashed and recorded first, so its version
    is refused with another model after it is gone. A file that cannot be recorded or
    removed is left, with a warning (the publication itself succeeded). ``keep`` must be
    >= 1; 0 ("keep every version") is the caller's to skip."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    folder = Path(folder)
    on_disk = artifact_versions(folder)
    # oldest first: a removal that stops half way leaves the newer ones
    old = [(v, on_disk[v]) for v in sorted(on_disk)[:-keep] if on_disk[v].name != latest]
    if not old:
        return []
    try:
        recorded = published_digests(folder)
    except ModelFileError as exc:
        logger.warning("no old model version removed: %s", exc)
        return []
    removed = []
    for version, path in old:
        try:
            if path.name not in recorded:
                record_published(folder, path.name, str(version), sha256_hex(path.read_bytes()))
            path.unlink()
        except OSError as exc:
            logger.warning("could not remove the old model version %s: %s", path, exc)
            continue
        removed.append(path)
    if removed:
        fsync_dir(folder)
    return removed
