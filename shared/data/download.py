"""Download the public MovieLens archives into a local cache, verified and extracted safely.

Only small, stable archives are fetched automatically (``ARCHIVES``); bigger ones
(``MANUAL_ARCHIVES``) must be downloaded by hand and passed with ``--data-dir``. Every step
is built so that a failure leaves nothing half-done behind:

* the archive is streamed into a temporary folder inside the cache dir, hashed on the fly,
  and its SHA-256 checked against ``ARCHIVES`` before anything is extracted;
* extraction refuses absolute paths, ``..`` components and symbolic links (no path
  traversal) and caps the unpacked size;
* the extracted folder is flushed to disk and renamed into place (``<cache>/<name>``) in one
  atomic step, so a folder in the cache is always complete, even after a power loss; it
  records the archive's hash, and a cached folder of another archive than ``ARCHIVES`` now
  names (a republished one) is refused, not read as this release;
* a redirect from the HTTPS address to plain HTTP is refused, not followed;
* the network timeout is short (:data:`DEFAULT_TIMEOUT_S`): offline machines fail fast with a
  :class:`DatasetNotFoundError` that says how to point at a local copy (``--data-dir PATH``);
  the whole download has a deadline too (:data:`DEFAULT_DEADLINE_S`), so a server that
  trickles a byte at a time cannot hold it for ever, and a size limit
  (:data:`MAX_ARCHIVE_BYTES`), so one that streams without end cannot fill the disk.

The cache dir is ``~/.cache/fedrec/datasets`` unless ``$FEDREC_CACHE_DIR`` (then its
``datasets/``) or an explicit argument says otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import http.client
import json
import logging
import os
import stat
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from shared.errors import DataError, DatasetNotFoundError, FedRecError
from shared.io import (
    CACHE_ROOT_ENV,
    cache_root,
    disk_full,
    ensure_dir,
    fsync_dir,
    home_path,
    readable_path,
    remove_stale_temps,
)

logger = logging.getLogger(__name__)

CACHE_ENV = CACHE_ROOT_ENV
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_DEADLINE_S = 600.0
"""The whole download's limit: about 10 KB/s for the largest automatic archive (ml-1m)."""
MAX_EXTRACTED_BYTES = 2 * 1024**3
MAX_ARCHIVE_BYTES = 512 * 1024**2
"""The most a download may bring: the automatic archives are a few MB (ml-1m 6 MB), and the
checksum can refuse a wrong one only once it is all on disk, so a server streaming without
end would otherwise fill the disk before the deadline."""
PROVENANCE_FILE = ".fedrec-source.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveSpec:
    """Where an archive lives and what it must hash to.

    ``sha256 = None`` means "not known": the download is accepted, and the computed hash is
    logged and written to the provenance file so that it can be recorded here.
    """

    url: str
    sha256: str | None
    top_dir: str
    files: tuple[str, ...]


# SHA-256 values as published in TensorFlow Datasets' checksum list
# (tensorflow_datasets/url_checksums/movielens.txt); the GroupLens site only lists MD5s.
# ml-latest-small is a "latest" release that GroupLens may republish: on a mismatch, check
# the new archive and update the value here (or download it by hand and use --data-dir).
ARCHIVES: dict[str, ArchiveSpec] = {
    "ml-100k": ArchiveSpec(
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        top_dir="ml-100k",
        files=("u.data", "u.item"),
    ),
    "ml-1m": ArchiveSpec(
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        top_dir="ml-1m",
        files=("ratings.dat", "movies.dat"),
    ),
    "ml-latest-small": ArchiveSpec(
        url="https://files.grouplens.org/datasets/movielens/ml-latest-small.zip",
        sha256="696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
        top_dir="ml-latest-small",
        files=("ratings.csv", "movies.csv"),
    ),
}
"""Archives fetched automatically when no ``--data-dir`` is given."""

MANUAL_ARCHIVES: dict[str, str] = {
    "ml-latest": "https://files.grouplens.org/datasets/movielens/ml-latest.zip",
    "ml-25m": "https://files.grouplens.org/datasets/movielens/ml-25m.zip",
}
"""Large archives that are never downloaded automatically (hundreds of MB)."""


def default_cache_dir() -> Path:
    """``$FEDREC_CACHE_DIR/datasets`` if the variable is set, else ``~/.cache/fedrec/datasets``
    (beside the ``embeddings/`` and ``pretrained/`` caches under the same root)."""
    return cache_root() / "datasets"


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The explicit ``cache_dir`` if given, else :func:`default_cache_dir`."""
    return home_path(cache_dir) if cache_dir is not None else default_cache_dir()


def cached_dataset_dir(name: str, cache_dir: str | Path | None = None) -> Path | None:
    """``<cache>/<name>`` if it exists and is not empty, else ``None``.

    Downloads are renamed into place atomically, so an existing folder is a complete one.
    One downloaded from another archive than :data:`ARCHIVES` names now (its provenance
    file records another SHA-256) raises :class:`DataError`: see :func:`_check_release`.
    """
    path = resolve_cache_dir(cache_dir) / name
    if not (path.is_dir() and any(path.iterdir())):
        return None
    _check_release(name, path)
    return path


def _check_release(name: str, folder: Path) -> None:
    """Refuse the cached ``folder`` of ``name`` when its provenance file records another
    archive than the SHA-256 :data:`ARCHIVES` expects (an entry updated after GroupLens
    republished the archive): found by name alone, it would be read as the release this
    code names, so machines that downloaded before the update would train and report on
    other data than fresh ones, under the same name and cache keys. A folder without a
    readable record (unzipped by hand) or an entry without a hash is not checked."""
    spec = ARCHIVES.get(name)
    if spec is None or spec.sha256 is None:
        return
    try:
        record = json.loads((folder / PROVENANCE_FILE).read_text(encoding="utf-8"))
        recorded = record["sha256"]
    except (OSError, ValueError, TypeError, KeyError):
        return
    if isinstance(recorded, str) and recorded.lower() != spec.sha256.lower():
        raise DataError(
            f"{name}: the cached copy {folder} was downloaded from an archive with SHA-256 "
            f"{recorded}, not the {spec.sha256} this version reads ({spec.url} was "
            "republished): its data are another release's. Delete that folder to download "
            "the dataset again, or pass --data-dir PATH to read that copy all the same."
        )


def download_dataset(
    name: str,
    cache_dir: str | Path | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    deadline: float = DEFAULT_DEADLINE_S,
) -> Path:
    """Download, verify and extract archive ``name`` into the cache; return its folder.

    Returns the cached folder at once if it is already there. Raises
    :class:`DatasetNotFoundError` when the network fails and :class:`DataError` when the
    archive does not match its checksum or is unsafe to extract.
    """
    spec = _spec(name)
    root = resolve_cache_dir(cache_dir)
    cached = cached_dataset_dir(name, root)
    if cached is not None:
        return cached
    final = root / name
    _check_in_the_way(final, spec)
    _make_dir(root)
    # a download killed mid-way leaves its folder (a TemporaryDirectory is not removed then)
    remove_stale_temps(
        root,
        f".{glob.escape(name)}-download-*",
        older_than=2 * max(deadline, 600.0),
        folders=True,
    )
    logger.info("%s: downloading %s into %s", name, spec.url, readable_path(root))
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-download-") as tmp:
        archive = Path(tmp) / "archive.zip"
        digest = fetch(
            spec.url, archive, timeout=timeout, deadline=deadline, name=name, cache_dir=root
        )
        verify_sha256(name, spec, digest)
        extracted = Path(tmp) / "extracted"
        safe_extract(archive, extracted)
        folder = extracted / spec.top_dir
        folder = folder if folder.is_dir() else extracted
        with _writing(folder):
            _write_provenance(folder, name, spec, digest)
            _sync_tree(folder)
        _publish(folder, final)
    logger.info("%s: ready in %s", name, readable_path(final))
    return final


def fetch(
    url: str,
    dest: Path,
    *,
    timeout: float,
    name: str,
    cache_dir: Path,
    deadline: float = DEFAULT_DEADLINE_S,
) -> str:
    """Stream ``url`` into ``dest`` and return its SHA-256 (hex); a download still running
    after ``deadline`` seconds fails like a lost connection."""
    digest = hashlib.sha256()
    start = time.monotonic()
    received = 0
    response = _open(url, timeout, name, cache_dir)
    try:
        expected = _content_length(response)
        if expected is not None and expected > MAX_ARCHIVE_BYTES:
            raise _too_large(name, url, expected)
        with _writing(dest), dest.open("wb") as out:
            while chunk := _read(response, url, name, cache_dir):
                received += len(chunk)
                if received > MAX_ARCHIVE_BYTES:
                    raise _too_large(name, url, received)
                out.write(chunk)
                digest.update(chunk)
                if time.monotonic() - start > deadline:
                    reason = (
                        f"the download did not finish within {deadline:g} s "
                        f"({received} bytes received)"
                    )
                    raise offline_error(name, url, reason, cache_dir)
        if expected is not None and received < expected:
            # http.client ends a body cut short without an error: without this check a
            # dropped connection was reported as a corrupt or altered archive
            reason = f"the connection closed after {received} of {expected} bytes"
            raise offline_error(name, url, reason, cache_dir)
    finally:
        response.close()
    return digest.hexdigest()


def _too_large(name: str, url: str, size: int) -> DataError:
    """The error for a download that is (or announces) far more than any archive."""
    return DataError(
        f"{name}: {url} sends more than {MAX_ARCHIVE_BYTES} bytes ({size}), far more than the "
        f"archive; the download was stopped. Download it by hand, unzip it and pass "
        f"--data-dir PATH."
    )


def _content_length(response: Any) -> int | None:
    """The size the server announced (``Content-Length``), or ``None`` when it gave none."""
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def verify_sha256(name: str, spec: ArchiveSpec, digest: str) -> None:
    """Raise :class:`DataError` on a mismatch; log the hash when none is known."""
    if spec.sha256 is None:
        logger.warning(
            "%s: no SHA-256 is recorded for %s; the download hashes to %s -- record it in "
            "shared/data/download.py ARCHIVES after checking it",
            name,
            spec.url,
            digest,
        )
        return
    if digest.lower() != spec.sha256.lower():
        raise DataError(
            f"{name}: checksum mismatch for {spec.url}: expected SHA-256 {spec.sha256}, got "
            f"{digest}. The download is corrupt or was altered, so it was discarded. Retry; if "
            f"GroupLens republished the archive, check it and update ARCHIVES, or download it "
            f"by hand and pass --data-dir PATH."
        )
    logger.info("%s: SHA-256 verified (%s)", name, digest)


def safe_extract(archive: Path, dest: Path, *, max_bytes: int = MAX_EXTRACTED_BYTES) -> None:
    """Extract a zip into ``dest`` after checking every member stays inside it."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for info in members:
                _check_member(info, root, archive)
            total = sum(info.file_size for info in members)
            if total > max_bytes:
                raise DataError(f"{archive}: refusing to extract {total} bytes (limit {max_bytes})")
            with _writing(root):
                zf.extractall(root, members)
    except zipfile.BadZipFile as err:
        raise DataError(
            f"{archive} is not a valid zip archive ({err}); retry the download"
        ) from err


def _check_member(info: zipfile.ZipInfo, root: Path, archive: Path) -> None:
    """Reject absolute paths, drive letters, ``..`` and symlinks (zip-slip)."""
    name = info.filename
    path = PurePosixPath(name.replace("\\", "/"))
    escapes = path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":")
    if escapes or not (root / path).resolve().is_relative_to(root):
        raise DataError(f"{archive}: refusing to extract {name!r}: it points outside {root}")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DataError(f"{archive}: refusing to extract symbolic link {name!r}")


def offline_error(name: str, url: str, reason: object, cache_dir: Path) -> DatasetNotFoundError:
    """The error for a failed download: what failed and how to use a local copy instead."""
    spec = ARCHIVES.get(name)
    files = " and ".join(spec.files) if spec else "the dataset's files"
    return DatasetNotFoundError(
        f"{name}: could not download {url} ({reason}). If this machine is offline, get the "
        f"archive elsewhere, unzip it and pass --data-dir PATH (the folder holding {files}), "
        f"or unzip it into {cache_dir / name}."
    )


def _spec(name: str) -> ArchiveSpec:
    """The archive entry for ``name``, or a :class:`DatasetNotFoundError` explaining why not."""
    if name in ARCHIVES:
        return ARCHIVES[name]
    if name in MANUAL_ARCHIVES:
        raise DatasetNotFoundError(
            f"{name} is too large to download automatically: download "
            f"{MANUAL_ARCHIVES[name]}, unzip it and pass --data-dir PATH"
        )
    raise DatasetNotFoundError(
        f"{name} cannot be downloaded; downloadable datasets: {', '.join(ARCHIVES)}"
    )


class _NoDowngradeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects, except one from HTTPS to another scheme: urllib's own handler
    follows ``https://`` to ``http://`` (or ``ftp://``) silently, so the archive would come
    over an unauthenticated connection, accepted as is where no SHA-256 is recorded, while
    the provenance file names the HTTPS address."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        if req.type == "https" and not newurl.lower().startswith("https://"):
            raise urllib.error.HTTPError(
                newurl, code, f"refused a redirect from HTTPS to {newurl}", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _urlopen(url: str, *, timeout: float) -> Any:
    """Open ``url`` (redirects from HTTPS stay on HTTPS, see :class:`_NoDowngradeRedirects`;
    the proxy settings are read from the environment now, as ``urlopen`` does)."""
    return urllib.request.build_opener(_NoDowngradeRedirects).open(url, timeout=timeout)


def _open(url: str, timeout: float, name: str, cache_dir: Path) -> Any:
    """Open ``url`` with a short timeout; network failures become the offline error."""
    try:
        return _urlopen(url, timeout=timeout)
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise offline_error(name, url, getattr(err, "reason", err), cache_dir) from err


def _read(response: Any, url: str, name: str, cache_dir: Path) -> bytes:
    """One chunk of the response (what one receive brings, so the deadline is checked
    between them); a broken connection becomes the offline error."""
    read = getattr(response, "read1", None) or response.read
    try:
        chunk: bytes = read(_CHUNK)
    except (OSError, http.client.HTTPException) as err:
        raise offline_error(name, url, err, cache_dir) from err
    return chunk


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a disk problem while writing ``path`` (or a file under it) into a
    :class:`DataError` that names the file and the way out. A full disk (``ENOSPC``, a
    quota, the file-size limit) raises an OSError that names no file, which the CLI shows
    as a traceback; the download's own errors (``DatasetNotFoundError`` is an OSError too)
    pass unchanged."""
    try:
        yield
    except FedRecError:
        raise
    except OSError as err:
        where = err.filename or path
        full = disk_full(err) or err.errno == errno.EFBIG  # or the file-size limit
        fix = "free space there or set " if full else "set "
        raise DataError(
            f"cannot write {where}: {err.strerror or err}; {fix}${CACHE_ENV} to a writable "
            "folder with room for the dataset"
        ) from err


def _make_dir(path: Path) -> None:
    """Create the cache dir, or explain how to choose another."""
    ensure_dir(
        path,
        what="the dataset cache",
        fix=f"set ${CACHE_ENV} to a writable folder",
        error=DataError,
    )


def _write_provenance(folder: Path, name: str, spec: ArchiveSpec, digest: str) -> None:
    """Record where the files came from and the archive's hash, next to the files."""
    record = {"name": name, "url": spec.url, "sha256": digest, "verified": spec.sha256 is not None}
    (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _sync_tree(folder: Path) -> None:
    """Flush every extracted file and folder under ``folder`` to disk before it is renamed
    into place: the cache trusts a published folder as complete for good, and without this a
    power loss soon after the rename could leave it holding empty or cut files (the rename
    can reach the disk before the data does)."""
    for path in sorted(folder.rglob("*"), reverse=True):  # files before their folders
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


def _check_in_the_way(final: Path, spec: ArchiveSpec) -> None:
    """Refuse, before anything is downloaded, what stands at ``final`` that the finished
    folder cannot be renamed over: a file, or a link (broken, or to an empty folder; one to
    a folder with files is the cached copy). The rename failed only after the whole
    download, with "Not a directory" naming a temporary folder that was gone by then."""
    if final.is_symlink():
        if not final.exists():
            state = "a missing path"
        elif final.is_dir():
            state = "an empty folder"
        else:
            state = "a file"
        what = f"a link to {state} ({os.readlink(final)})"
    elif final.exists() and not final.is_dir():
        what = "a file"
    else:
        return
    raise DataError(
        f"{final} is {what}, so the download cannot be put there: remove it and retry, unzip "
        f"{spec.url} there yourself, or pass --data-dir PATH to a copy of the dataset"
    )


def _publish(folder: Path, final: Path) -> None:
    """Atomically rename ``folder`` to ``final``; keep a copy another process put there first."""
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()  # an empty leftover, e.g. made by hand
    try:
        os.replace(folder, final)
    except OSError:
        if cached_dataset_dir(final.name, final.parent) is None:
            raise
        logger.info(
            "%s appeared while downloading; keeping the existing copy", readable_path(final)
        )
        return
    fsync_dir(final.parent)  # the rename itself
