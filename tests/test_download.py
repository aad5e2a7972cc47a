"""Dataset download: verified, atomic, safe extraction, fast offline failure -- no network.

Archives are built locally and served through ``file://`` URLs; network failures are
simulated by replacing ``download._urlopen`` (plus one refused loopback connection).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import stat
import time
import urllib.error
import zipfile
from pathlib import Path
from typing import Any

import pytest

from shared.data import download
from shared.data.download import (
    ARCHIVES,
    PROVENANCE_FILE,
    ArchiveSpec,
    cached_dataset_dir,
    default_cache_dir,
    download_dataset,
    resolve_cache_dir,
    safe_extract,
)
from shared.data.registry import load_dataset
from shared.errors import DataError, DatasetNotFoundError

ML100K_FILES = {
    "u.data": b"1\t1\t5\t10\n1\t2\t4\t11\n1\t3\t3\t12\n2\t1\t1\t5\n2\t3\t1\t6\n2\t2\t1\t7\n",
    "u.item": b"1|Toy Story (1995)|||u|0|1\n2|Heat (1995)|||u|1|0\n3|Caf\xe9 (1990)|||u|0|0\n",
    "u.genre": b"unknown|0\nComedy|1\n",
}


def make_zip(path: Path, members: dict[str, bytes]) -> tuple[Path, str]:
    """Write a zip with ``members`` and return it with its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def serve(
    monkeypatch: pytest.MonkeyPatch, archive: Path, sha256: str | None, top_dir: str = "ml-100k"
) -> ArchiveSpec:
    """Point the ml-100k entry at a local archive."""
    spec = ArchiveSpec(archive.as_uri(), sha256, top_dir, ("u.data", "u.item"))
    monkeypatch.setitem(ARCHIVES, "ml-100k", spec)
    return spec


def ml100k_zip(tmp_path: Path, prefix: str = "ml-100k/") -> tuple[Path, str]:
    return make_zip(
        tmp_path / "src" / "ml-100k.zip", {prefix + k: v for k, v in ML100K_FILES.items()}
    )


def no_network(monkeypatch: pytest.MonkeyPatch, calls: list[dict[str, Any]] | None = None) -> None:
    """Make every ``_urlopen`` fail like an offline machine, recording its arguments."""

    def urlopen(url: str, *args: Any, **kwargs: Any) -> Any:
        if calls is not None:
            calls.append({"url": url, **kwargs})
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(download, "_urlopen", urlopen)


def leftovers(cache: Path) -> list[str]:
    """Names in the cache other than finished dataset folders (temp files must be gone)."""
    return [p.name for p in cache.iterdir() if p.name.startswith(".")] if cache.exists() else []


@pytest.fixture(autouse=True)
def _cache_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Never touch the real ``~/.cache``."""
    cache = tmp_path / "env-cache"
    monkeypatch.setenv(download.CACHE_ENV, str(cache))
    return cache


# --------------------------------------------------------------------------- success


def test_download_verifies_extracts_and_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, digest = ml100k_zip(tmp_path)
    serve(monkeypatch, archive, digest)
    cache = tmp_path / "cache"
    folder = download_dataset("ml-100k", cache)
    assert folder == cache / "ml-100k"
    assert (folder / "u.item").read_bytes() == ML100K_FILES["u.item"]
    record = json.loads((folder / PROVENANCE_FILE).read_text())
    assert record == {
        "name": "ml-100k",
        "url": archive.as_uri(),
        "sha256": digest,
        "verified": True,
    }
    assert leftovers(cache) == []
    assert cached_dataset_dir("ml-100k", cache) == folder


def test_every_extracted_file_is_on_disk_before_the_folder_is_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A published folder is trusted as complete for good; its files were renamed into place
    unflushed, so a power loss could leave the cache holding empty ones."""
    import os

    synced: set[str] = set()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    unsynced: list[str] = []

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == "ml-100k":
            files = [str(p.resolve()) for p in Path(src).rglob("*") if p.is_file()]
            unsynced.extend(sorted(set(files) - synced))
            unsynced.extend([] if str(Path(src).resolve()) in synced else [str(src)])
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    archive, digest = ml100k_zip(tmp_path)
    serve(monkeypatch, archive, digest)
    folder = download_dataset("ml-100k", tmp_path / "cache")
    assert (folder / "u.data").read_bytes() == ML100K_FILES["u.data"]
    assert unsynced == []
    assert str(folder.parent.resolve()) in synced  # the rename itself


def test_a_killed_downloads_folder_is_removed_by_a_later_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL mid-download leaves the TemporaryDirectory (archive included) for good; the
    next download removes such a folder once it is clearly dead, not a live one's."""
    import os
    import time

    cache = tmp_path / "cache"
    dead = cache / ".ml-100k-download-abc123"
    live = cache / ".ml-100k-download-def456"
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "archive.zip").write_bytes(b"part of an archive")
    old = time.time() - 2 * 3600 - 2 * download.DEFAULT_DEADLINE_S
    for path in (dead, dead / "archive.zip"):
        os.utime(path, (old, old))
    archive, digest = ml100k_zip(tmp_path)
    serve(monkeypatch, archive, digest)
    download_dataset("ml-100k", cache)
    assert not dead.exists() and (live / "archive.zip").exists()


def test_cached_copy_needs_no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, digest = ml100k_zip(tmp_path)
    serve(monkeypatch, archive, digest)
    cache = tmp_path / "cache"
    download_dataset("ml-100k", cache)
    calls: list[dict[str, Any]] = []
    no_network(monkeypatch, calls)
    assert download_dataset("ml-100k", cache) == cache / "ml-100k"
    ds = load_dataset("ml-100k", cache_dir=cache)
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (2, 3, 6)
    assert calls == []


def test_a_cached_copy_of_another_release_is_refused_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder in the cache was returned by name alone: once ARCHIVES named another
    SHA-256 (GroupLens republished ml-latest-small and the entry was updated), machines
    holding the old download kept reading its data while fresh ones read the new release,
    under the same name, split and cache keys. Its recorded hash is now checked."""
    archive, digest = ml100k_zip(tmp_path)
    serve(monkeypatch, archive, digest)
    cache = tmp_path / "cache"
    folder = download_dataset("ml-100k", cache)
    serve(monkeypatch, archive, "0" * 64)  # the entry now names another archive
    no_network(monkeypatch)
    for read in (
        lambda: download_dataset("ml-100k", cache),
        lambda: load_dataset("ml-100k", cache_dir=cache),
    ):
        with pytest.raises(DataError, match=f"{digest}.*not the {'0' * 64}") as caught:
            read()
        assert str(folder) in str(caught.value) and "--data-dir" in str(caught.value)
    assert load_dataset("ml-100k", data_dir=folder).n_items == 3  # the way to keep it
    serve(monkeypatch, archive, None)  # no hash recorded: any download is the release
    assert download_dataset("ml-100k", cache) == folder
    (folder / PROVENANCE_FILE).unlink()  # unzipped by hand: nothing to check it by
    serve(monkeypatch, archive, "0" * 64)
    assert download_dataset("ml-100k", cache) == folder


def test_load_dataset_downloads_into_env_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _cache_env: Path
) -> None:
    archive, digest = ml100k_zip(tmp_path)
    serve(monkeypatch, archive, digest)
    ds = load_dataset("ml-100k")
    assert ds.item_text[2] == "Café (1990)."
    assert (_cache_env / "datasets" / "ml-100k" / "u.data").is_file()


def test_archive_without_top_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, digest = ml100k_zip(tmp_path, prefix="")
    serve(monkeypatch, archive, digest)
    folder = download_dataset("ml-100k", tmp_path / "cache")
    assert (folder / "u.data").is_file()


def test_unknown_checksum_is_logged_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    archive, digest = ml100k_zip(tmp_path)
    serve(monkeypatch, archive, None)
    with caplog.at_level(logging.WARNING, logger="shared.data.download"):
        folder = download_dataset("ml-100k", tmp_path / "cache")
    assert any(digest in r.getMessage() for r in caplog.records)
    record = json.loads((folder / PROVENANCE_FILE).read_text())
    assert record["sha256"] == digest and record["verified"] is False


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("kind", ["file", "broken link", "link to an empty folder"])
def test_something_in_the_way_of_the_cached_folder_is_named_before_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A file or a link at ``<cache>/ml-100k`` made the download run to its end and then fail
    at the rename with "Not a directory: <a temp folder that is gone> -> ...; check the path
    and its permissions", the archive thrown away; it is refused first, saying what is there
    and what to do, and left as it is."""
    archive, digest = ml100k_zip(tmp_path)
    serve(monkeypatch, archive, digest)
    calls: list[dict[str, Any]] = []
    no_network(monkeypatch, calls)
    cache = tmp_path / "cache"
    cache.mkdir()
    slot = cache / "ml-100k"
    if kind == "file":
        slot.write_text("mine")
    else:
        target = tmp_path / ("gone" if kind == "broken link" else "empty")
        if kind != "broken link":
            target.mkdir()
        slot.symlink_to(target)
    with pytest.raises(DataError, match=r"ml-100k is (a file|a link).*--data-dir") as err:
        download_dataset("ml-100k", cache)
    assert calls == []  # nothing downloaded for nothing
    assert str(slot) in str(err.value) and "permissions" not in str(err.value)
    assert slot.is_symlink() or slot.read_text() == "mine"


def test_checksum_mismatch_discards_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, digest = ml100k_zip(tmp_path)
    serve(monkeypatch, archive, "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="checksum mismatch") as err:
        download_dataset("ml-100k", cache)
    assert "0" * 64 in str(err.value) and digest in str(err.value)
    assert "--data-dir" in str(err.value)
    assert not (cache / "ml-100k").exists()
    assert leftovers(cache) == []


def test_offline_fails_fast_with_data_dir_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    no_network(monkeypatch, calls)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("ml-100k", cache_dir=cache)
    msg = str(err.value)
    assert "--data-dir PATH" in msg and ARCHIVES["ml-100k"].url in msg
    assert "name resolution" in msg and "u.data" in msg
    assert calls == [{"url": ARCHIVES["ml-100k"].url, "timeout": download.DEFAULT_TIMEOUT_S}]
    assert download.DEFAULT_TIMEOUT_S <= 10
    assert leftovers(cache) == [] and not (cache / "ml-100k").exists()


def test_connection_lost_mid_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def read(self, size: int) -> bytes:
            raise TimeoutError("timed out")

        def close(self) -> None:
            pass

    monkeypatch.setattr(download, "_urlopen", lambda url, timeout: Broken())
    cache = tmp_path / "cache"
    with pytest.raises(DatasetNotFoundError, match="timed out"):
        download_dataset("ml-1m", cache)
    assert leftovers(cache) == []


def test_a_body_cut_short_is_a_lost_connection_not_a_corrupt_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """http.client ends a body shorter than its Content-Length without an error, so a
    dropped connection used to surface as "checksum mismatch ... corrupt or was altered"."""

    class Cut:
        def __init__(self) -> None:
            self.headers = {"Content-Length": "100"}
            self.chunks = [b"x" * 40]

        def read1(self, size: int) -> bytes:
            return self.chunks.pop() if self.chunks else b""

        def close(self) -> None:
            pass

    monkeypatch.setattr(download, "_urlopen", lambda url, timeout: Cut())
    cache = tmp_path / "cache"
    with pytest.raises(DatasetNotFoundError, match=r"closed after 40 of 100 bytes.*--data-dir"):
        download_dataset("ml-100k", cache)
    assert leftovers(cache) == [] and not (cache / "ml-100k").exists()


def test_a_server_trickling_bytes_hits_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every receive returns within the socket timeout, one byte at a time: only the whole
    download's deadline stops it (it used to run for ever)."""

    class Trickle:
        def read1(self, size: int) -> bytes:
            time.sleep(0.02)
            return b"x"

        def close(self) -> None:
            pass

    monkeypatch.setattr(download, "_urlopen", lambda url, timeout: Trickle())
    cache = tmp_path / "cache"
    start = time.perf_counter()
    with pytest.raises(DatasetNotFoundError, match=r"did not finish within 0.3 s .*--data-dir"):
        download_dataset("ml-100k", cache, deadline=0.3)
    assert time.perf_counter() - start < 3
    assert leftovers(cache) == []


@pytest.mark.parametrize("announced", [None, str(10**12)])
def test_a_download_far_larger_than_the_archive_is_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, announced: str | None
) -> None:
    """A server that streams without end (fast, so the deadline is minutes away) filled the
    cache's disk before the checksum could refuse the result; the download stops at
    MAX_ARCHIVE_BYTES, or before it starts when the announced size is larger."""
    sent: list[int] = []

    class Endless:
        headers = {"Content-Length": announced} if announced else {}

        def read1(self, size: int) -> bytes:
            sent.append(size)
            return b"x" * size

        def close(self) -> None:
            pass

    monkeypatch.setattr(download, "_urlopen", lambda url, timeout: Endless())
    monkeypatch.setattr(download, "MAX_ARCHIVE_BYTES", 5 * download._CHUNK)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"more than 5242880 bytes.*--data-dir"):
        download_dataset("ml-100k", cache, deadline=2.0)
    assert len(sent) <= (0 if announced else 6)
    assert leftovers(cache) == [] and not (cache / "ml-100k").exists()


@pytest.mark.network
def test_refused_loopback_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ArchiveSpec("http://127.0.0.1:9/ml-100k.zip", None, "ml-100k", ("u.data",))
    monkeypatch.setitem(ARCHIVES, "ml-100k", spec)
    start = time.perf_counter()
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        download_dataset("ml-100k", tmp_path / "cache", timeout=2.0)
    assert time.perf_counter() - start < 5


def _serve_in_thread(server: Any) -> str:
    """Run ``server`` in a daemon thread (shut it down when done); return its ``host:port``."""
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return f"{host}:{port}"


@pytest.mark.network
def test_a_redirect_from_https_to_plain_http_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """urllib follows a redirect from HTTPS to plain HTTP silently: the archive then came
    over an unauthenticated connection (accepted as is where no SHA-256 is recorded) while
    the provenance file named the HTTPS address. An HTTPS-to-HTTPS redirect still works."""
    import http.server
    import ssl

    from server.pki import create_pki

    archive, _ = ml100k_zip(tmp_path)
    body = archive.read_bytes()
    plain_hits: list[str] = []

    class Plain(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            plain_hits.append(self.path)
            self.send_archive()

        def send_archive(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Plain)
    plain_at = _serve_in_thread(plain)

    class Secure(Plain):
        def do_GET(self) -> None:
            moves = {"/down": f"http://{plain_at}/ml-100k.zip", "/moved": "/ml-100k.zip"}
            if self.path not in moves:
                self.send_archive()
                return
            self.send_response(302)
            self.send_header("Location", moves[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()

    pki = create_pki(tmp_path / "certs")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    secure = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Secure)
    secure.socket = context.wrap_socket(secure.socket, server_side=True)
    secure_at = _serve_in_thread(secure)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))  # trust the test CA
    try:
        for path in ("/down", "/moved"):
            spec = ArchiveSpec(f"https://{secure_at}{path}", None, "ml-100k", ("u.data",))
            monkeypatch.setitem(ARCHIVES, "ml-100k", spec)
            cache = tmp_path / path.strip("/")
            if path == "/down":
                with pytest.raises(
                    DatasetNotFoundError, match=r"redirect from HTTPS to http:.*--data-dir"
                ):
                    download_dataset("ml-100k", cache, timeout=5.0)
                assert plain_hits == [] and not (cache / "ml-100k").exists()
                assert leftovers(cache) == []
            else:
                folder = download_dataset("ml-100k", cache, timeout=5.0)
                assert (folder / "u.data").read_bytes() == ML100K_FILES["u.data"]
    finally:
        for server in (plain, secure):
            server.shutdown()
            server.server_close()


def test_large_archives_are_not_downloaded(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"ml-25m\.zip.*--data-dir"):
        download_dataset("ml-25m", tmp_path)


@pytest.mark.parametrize(
    "member",
    ["../evil.txt", "ml-100k/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt", "..\\evil.txt"],
)
def test_path_traversal_is_refused(tmp_path: Path, member: str) -> None:
    archive, _ = make_zip(tmp_path / "bad.zip", {"ml-100k/u.data": b"x", member: b"boom"})
    dest = tmp_path / "deep" / "out"
    with pytest.raises(DataError, match="refusing to extract"):
        safe_extract(archive, dest)
    assert not list(tmp_path.rglob("evil.txt"))
    assert not (dest / "ml-100k" / "u.data").exists()  # checked before anything is written


def test_symlink_member_is_refused(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("ml-100k/u.data")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="symbolic link"):
        safe_extract(archive, tmp_path / "out")


def test_oversized_archive_is_refused(tmp_path: Path) -> None:
    archive, _ = make_zip(tmp_path / "big.zip", {"a": b"0" * 1000})
    with pytest.raises(DataError, match="refusing to extract 1000 bytes"):
        safe_extract(archive, tmp_path / "out", max_bytes=999)


def test_corrupt_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "src" / "ml-100k.zip"
    archive.parent.mkdir()
    archive.write_bytes(b"this is not a zip")
    serve(monkeypatch, archive, None)
    with pytest.raises(DataError, match="not a valid zip"):
        download_dataset("ml-100k", tmp_path / "cache")
    assert leftovers(tmp_path / "cache") == []


_FULL_DISK_SCRIPT = """
import os, resource, sys
sys.path.insert(0, os.environ["REPO"])
from shared.data.download import ARCHIVES, ArchiveSpec, download_dataset
from shared.errors import FedRecError
ARCHIVES["ml-100k"] = ArchiveSpec(os.environ["URL"], None, "ml-100k", ("u.data", "u.item"))
limit = int(os.environ["LIMIT"])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    download_dataset("ml-100k", os.environ["CACHE"])
except FedRecError as err:
    print("FedRecError:", err)
except OSError as err:
    print("OSError filename=%s: %s" % (err.filename, err))
"""


@pytest.mark.parametrize(
    ("stage", "members"),
    [
        ("download", {"ml-100k/pad": random.Random(0).randbytes(1_000_000)}),  # 1 MB zipped
        ("extraction", {"ml-100k/pad": b"0" * 1_000_000}),  # a few KB zipped
    ],
)
def test_a_full_disk_is_a_clear_error_not_a_traceback(
    tmp_path: Path, stage: str, members: dict[str, bytes]
) -> None:
    """A write that fails for want of room (ENOSPC, or here the file-size limit that fails
    the same way: an OSError naming no file) was raised bare, which the CLI shows as a
    traceback; it is a DataError naming the file and the way out, and nothing is left."""
    import os
    import subprocess
    import sys

    path = tmp_path / "src" / "ml-100k.zip"
    path.parent.mkdir()
    files = {**{"ml-100k/" + k: v for k, v in ML100K_FILES.items()}, **members}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    assert (path.stat().st_size > 200_000) == (stage == "download")
    cache = tmp_path / "cache"
    env = {
        **os.environ,
        "REPO": str(Path(__file__).resolve().parents[1]),
        "URL": path.as_uri(),
        "CACHE": str(cache),
        "LIMIT": "200000",
    }
    out = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_SCRIPT], env=env, capture_output=True, text=True
    )
    assert out.stdout.startswith("FedRecError: cannot write"), out.stdout + out.stderr
    assert "File too large" in out.stdout and "free space there" in out.stdout
    assert f"${download.CACHE_ENV}" in out.stdout
    assert leftovers(cache) == [] and not (cache / "ml-100k").exists()


# --------------------------------------------------------------------------- configuration


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env" / "datasets"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_cache_dir(None) == tmp_path / "env" / "datasets"
    monkeypatch.delenv(download.CACHE_ENV)
    assert default_cache_dir() == Path.home() / ".cache" / "fedrec" / "datasets"


def test_official_archive_table() -> None:
    base = "https://files.grouplens.org/datasets/movielens/"
    assert {n: s.url for n, s in ARCHIVES.items()} == {
        n: f"{base}{n}.zip" for n in ("ml-100k", "ml-1m", "ml-latest-small")
    }
    assert ARCHIVES["ml-100k"].sha256 == (
        "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
    )
    assert all(s.sha256 is None or len(s.sha256) == 64 for s in ARCHIVES.values())
