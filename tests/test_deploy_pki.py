"""Server side of deployment without processes: the CA and server certificate, the state
directory, device key registration, the run config `fedrec server start` submits, and the CLI's
errors for missing or bad input."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from client.client_app import deployment_run_config as node_run_config
from client.device.identity import init_identity
from fedrec.cli import app
from server.pki import (
    PkiError,
    check_pki,
    create_pki,
    load_cert,
    renew_server_cert,
    server_names,
)
from server.state import (
    REGISTRY_FORMAT,
    BadPublicKeyError,
    ClientRegistry,
    ServerLayout,
    StateDirError,
    hold_server_lock,
    init_state_dir,
    load_public_key,
    read_public_key_file,
    running_server,
    server_status,
)
from server.superlink import (
    STUDENT_TASK,
    SuperLinkError,
    control_host,
    deployment_run_config,
    format_round,
    live_cli,
    write_app,
)
from shared.errors import ConfigError, DataError, ModelFileError
from shared.published import (
    RECORD_FILE,
    highest_published_version,
    published_digests,
    record_published,
    sha256_hex,
)

runner = CliRunner()


def _ssh_line(key: object) -> str:
    return (
        key.public_key()  # type: ignore[attr-defined]
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


# --------------------------------------------------------------------------- PKI


def test_server_certificate_chains_to_the_ca_with_the_requested_sans(tmp_path: Path) -> None:
    paths = create_pki(tmp_path / "certs", ["fedrec.example.org", "10.1.2.3", "localhost"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fedrec.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert server_names(paths) == ["fedrec.example.org", "localhost", "10.1.2.3"]
    check_pki(paths)


def test_certificates_hold_for_a_device_whose_clock_lags_by_hours(tmp_path: Path) -> None:
    """The CA and server certificates began 5 minutes before they were made, so a device
    whose clock lagged the server's by more (a phone whose time zone is set wrong keeps the
    right local time on an epoch hours off) failed the TLS handshake with "certificate is
    not yet valid" right after `server init` or `renew-cert`. They now begin a day earlier,
    and still last their full lifetime from now."""
    lagging = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=20)
    pki = create_pki(tmp_path / "certs", valid_days=30, ca_valid_days=60)
    renewed = renew_server_cert(tmp_path / "certs", valid_days=10)
    for path, days in ((pki.ca_cert, 60), (renewed.server_cert, 10)):
        cert = load_cert(path)
        assert cert.not_valid_before_utc <= lagging, path.name
        lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
        assert datetime.timedelta(days=days) - lifetime < datetime.timedelta(minutes=1)


def test_private_keys_are_owner_only_and_certs_readable(tmp_path: Path) -> None:
    paths = create_pki(tmp_path / "certs")
    for key in (paths.ca_key, paths.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for cert in (paths.ca_cert, paths.server_cert):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert server_names(paths) == ["localhost", "127.0.0.1"]  # the defaults


def test_check_pki_refuses_open_keys_and_foreign_certificates(tmp_path: Path) -> None:
    paths = create_pki(tmp_path / "a")
    paths.server_key.chmod(0o644)
    with pytest.raises(PkiError, match="chmod 600"):
        check_pki(paths)
    paths.server_key.chmod(0o600)
    other = create_pki(tmp_path / "b")
    paths.server_cert.write_bytes(other.server_cert.read_bytes())
    with pytest.raises(PkiError, match="not issued by"):
        check_pki(paths)
    # a server key that is not its certificate's (a renewal that crashed between the two
    # files) was accepted, and the SuperLink died at start with a bare 'see the log'
    paths = create_pki(tmp_path / "c")
    paths.server_key.write_bytes(other.server_key.read_bytes())
    with pytest.raises(PkiError, match=r"not the key of .*server\.pem.*renew-cert"):
        check_pki(paths)


@pytest.mark.parametrize("name", ["server.pem", "server.key", "ca.pem", "ca.key"])
def test_a_missing_pki_file_names_the_fix_that_keeps_the_state(tmp_path: Path, name: str) -> None:
    """A missing server.pem or server.key made `server start` say "run `fedrec server init`
    (or `--force` to redo it)": init refuses an existing state directory and --force makes a
    new CA for every device and wipes registrations, checkpoints and the privacy journal,
    when `renew-cert` (same CA, state kept) is the fix."""
    pki = create_pki(tmp_path / "certs")
    (pki.directory / name).unlink()
    with pytest.raises(PkiError) as err:
        check_pki(pki)
    if name.startswith("server"):
        assert "`fedrec server renew-cert`" in str(err.value) and "init" not in str(err.value)
        renew_server_cert(pki.directory, ["localhost"])
        check_pki(pki)
    else:  # the CA: only a backup keeps the devices' trust
        assert "restore it from a backup" in str(err.value) and "init --force" in str(err.value)


def _expire(cert_path: Path, ca_key_path: Path) -> None:
    """Rewrite the certificate at ``cert_path`` as one that expired on 2021-01-01, signed by
    the CA key at ``ca_key_path`` (names and extensions kept)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    old = x509.load_pem_x509_certificate(cert_path.read_bytes())
    builder = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(old.issuer)
        .public_key(old.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime(2020, 1, 1))
        .not_valid_after(dt.datetime(2021, 1, 1))
    )
    for ext in old.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    expired = builder.sign(ca_key, hashes.SHA384())  # type: ignore[arg-type]
    cert_path.write_bytes(expired.public_bytes(serialization.Encoding.PEM))


def test_an_expired_ca_is_refused_and_never_renewed_from(tmp_path: Path) -> None:
    """A renewal from an expired CA said it succeeded (a 1-day certificate no device could
    verify), and the check before start passed it; both now say a new CA is needed."""
    pki = create_pki(tmp_path / "s")
    _expire(pki.ca_cert, pki.ca_key)
    server_before = pki.server_cert.read_bytes()
    for attempt in (lambda: renew_server_cert(pki.directory), lambda: check_pki(pki)):
        with pytest.raises(PkiError, match=r"CA .* expires on 2021-01-01.*init --force"):
            attempt()
    assert pki.server_cert.read_bytes() == server_before  # nothing was issued


@pytest.mark.parametrize("damage", ["garbage", "missing", "no-san"])
def test_renewing_a_damaged_server_certificate_asks_for_its_names(
    tmp_path: Path, damage: str
) -> None:
    """A damaged server.pem is reported with `renew-cert` as the fix; without --host that
    command read its names from the damaged file and failed with the same message (or a
    traceback for a certificate without names). It now asks for --host, which works."""
    layout = init_state_dir(tmp_path / "s", ["server"])
    pki = layout.pki
    if damage == "garbage":
        pki.server_cert.write_text("garbage\n")
    elif damage == "missing":
        pki.server_cert.unlink()
    else:  # a certificate of the right CA without a subjectAltName
        ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
        ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server")]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        pki.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    state = ["--state-dir", str(layout.state_dir)]
    result = runner.invoke(app, ["server", "renew-cert", *state])
    assert isinstance(result.exception, PkiError), result.exception  # a message, no traceback
    assert "renew-cert --host" in str(result.exception)
    result = runner.invoke(app, ["server", "renew-cert", *state, "--host", "server"])
    assert result.exit_code == 0, result.output
    check_pki(pki)
    assert server_names(pki) == ["server", "localhost", "127.0.0.1"]


def test_an_expired_or_too_narrow_certificate_is_renewed_from_the_same_ca(
    tmp_path: Path,
) -> None:
    """The only fix offered for an expired server certificate (825 days) or a missing host
    name was `init --force`: a new CA for every device, and the checkpoints, artifacts and
    user-level privacy journal wiped. `renew-cert` keeps the CA and the run state."""
    layout = init_state_dir(tmp_path / "s", ["server"])
    pki = layout.pki
    journal = layout.checkpoints / "user-dp-journal.json"
    journal.write_text('{"spent": "kept"}')
    _expire(pki.server_cert, pki.ca_key)
    with pytest.raises(PkiError, match=r"expired on 2021-01-01; `fedrec server renew-cert`"):
        check_pki(pki)
    ca_before = pki.ca_cert.read_bytes()
    result = runner.invoke(
        app, ["server", "renew-cert", "--state-dir", str(layout.state_dir), "--host", "10.0.0.7"]
    )
    assert result.exit_code == 0, result.output
    check_pki(pki)  # valid again, signed by the CA the devices already trust
    assert pki.ca_cert.read_bytes() == ca_before
    assert server_names(pki) == ["localhost", "10.0.0.7", "127.0.0.1"]
    assert stat.S_IMODE(pki.server_key.stat().st_mode) == 0o600
    assert journal.read_text() == '{"spent": "kept"}'  # the run state stays
    # without --host the names stay
    again = runner.invoke(app, ["server", "renew-cert", "--state-dir", str(layout.state_dir)])
    assert again.exit_code == 0 and server_names(pki) == ["localhost", "10.0.0.7", "127.0.0.1"]
    # a CA key that is not the CA's is refused, naming it
    pki.ca_key.write_bytes(create_pki(tmp_path / "other").ca_key.read_bytes())
    with pytest.raises(PkiError, match=r"is not the key of .*restore it from a backup.*--force"):
        renew_server_cert(pki.directory)
    # and so is one that is no key at all: both said only what was wrong, not what to do
    pki.ca_key.write_text("junk\n")
    with pytest.raises(PkiError, match=r"unreadable .*restore it from a backup.*--force"):
        renew_server_cert(pki.directory)


@pytest.mark.parametrize("host", ["bad host!", "a..b", "", "fédérec.example.org"])
def test_bad_host_names_are_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError):
        create_pki(tmp_path / "certs", [host])


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("-x", "its label '-x' starts with '-'"),
        ("fedrec-.example.org", "its label 'fedrec-' ends with '-'"),
        ("-", "its label '-' starts with '-'"),
        ("a*b.example.org", "its label 'a*b' has characters other than"),
        ("*.example.org", "its label '*' has characters other than"),
        ("a_b", "its label 'a_b' has characters other than"),
        ("x..", "an empty label"),
        (".example.org", "an empty label"),
        ("a" * 64 + ".org", "is 64 characters long"),
        (".".join(["a" * 63] * 4), "it is 255 characters long"),
    ],
)
def test_dns_names_are_checked_label_by_label(tmp_path: Path, host: str, problem: str) -> None:
    """A label is 1-63 letters, digits or '-', neither starting nor ending with '-' (RFC
    1123); '-x', 'x-' and labels with '*' were taken as DNS names."""
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name") as caught:
        create_pki(tmp_path / "certs", [host])
    message = str(caught.value)
    assert problem in message and f"--host {host!r}" in message
    assert "neither starting nor ending with '-'" in message  # what is expected
    assert not (tmp_path / "certs").exists()


@pytest.mark.parametrize(
    "host",
    [
        "fedrec.example.org",
        "fedrec.example.org.",
        "a-b.c",
        "xn--bcher-kva.example",
        "a" * 63,
        "0-server",
        "10.0.0.5",
        "::1",
    ],
)
def test_valid_host_names_and_addresses_are_taken(tmp_path: Path, host: str) -> None:
    paths = create_pki(tmp_path / "certs", [host])
    assert host.rstrip(".") in server_names(paths)


def test_names_go_in_as_tls_compares_them_and_interfaces_are_refused(tmp_path: Path) -> None:
    """A final dot and upper case went into the certificate as given: `init --host
    example.org.` then refused `server start --host example.org` as "not in the
    certificate", though TLS takes them as one name; and an IPv6 zone id was dropped from
    the certificate but kept in the advice to renew it with, which could never help."""
    paths = create_pki(tmp_path / "certs", ["Fedrec.Example.ORG.", "fedrec.example.org", "::1"])
    assert server_names(paths) == ["fedrec.example.org", "::1"]
    with pytest.raises(ConfigError, match=r"names a network interface \(%eth0\).*--host fe80::1\)"):
        create_pki(tmp_path / "zone", ["fe80::1%eth0"])
    layout = init_state_dir(tmp_path / "s", ["Server.Example.org."])
    for asked in ("server.example.org", "SERVER.example.org.", "server.example.org."):
        assert control_host(layout, asked) == asked  # the address to listen on, as given
    with pytest.raises(ConfigError, match="not in the server certificate"):
        control_host(layout, "other.example.org")


def test_a_dns_name_longer_than_a_common_name_is_taken(tmp_path: Path) -> None:
    """A DNS name may be 253 characters, an X.509 common name 64: init with a long valid
    --host crashed with cryptography's ValueError while naming the certificate's subject."""
    long = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    paths = create_pki(tmp_path / "certs", [long])
    assert server_names(paths) == [long]
    cn = load_cert(paths.server_cert).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn[0].value == "fedrec server"
    state = tmp_path / "s"
    result = runner.invoke(app, ["server", "init", "--state-dir", str(state), "--host", long])
    assert result.exit_code == 0, result.output
    assert server_names(ServerLayout(state).pki) == [long, "localhost", "127.0.0.1"]


@pytest.mark.parametrize("form", [["--host", "-x"], ["--host=-x"]])
def test_a_host_starting_with_a_hyphen_is_refused_through_the_cli(
    tmp_path: Path, form: list[str]
) -> None:
    """Click takes the word after --host as its value even when it starts with '-'; both
    spellings reach the check and are refused before anything is written."""
    state = tmp_path / "s"
    result = runner.invoke(app, ["server", "init", "--state-dir", str(state), *form])
    assert isinstance(result.exception, ConfigError), result.output
    assert "--host '-x' is neither an IP address nor a DNS name" in str(result.exception)
    assert not state.exists()
    done = subprocess.run(
        [sys.executable, "-m", "fedrec.cli", "server", "init", "--state-dir", str(state), *form],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and not state.exists()
    assert done.stderr.startswith("error: --host '-x' is neither an IP address nor a DNS name")
    assert "its label '-x' starts with '-'" in done.stderr


def test_init_creates_the_layout_and_refuses_to_overwrite(tmp_path: Path) -> None:
    state = tmp_path / "server"
    layout = init_state_dir(state)
    for path in (layout.marker, layout.registry, layout.checkpoints, layout.artifacts):
        assert path.exists(), path
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    ca_before = layout.pki.ca_cert.read_bytes()
    with pytest.raises(StateDirError, match="--force"):
        init_state_dir(state)
    assert layout.pki.ca_cert.read_bytes() == ca_before  # untouched
    (layout.checkpoints / "round-00000001.json").write_text("{}")
    init_state_dir(state, ["10.0.0.1"], force=True)
    assert layout.pki.ca_cert.read_bytes() != ca_before
    assert not (layout.checkpoints / "round-00000001.json").exists()
    assert server_names(layout.pki) == ["localhost", "10.0.0.1", "127.0.0.1"]  # + loopback


def test_init_force_keeps_the_record_of_published_versions(tmp_path: Path) -> None:
    """`init --force` removed artifacts/published.jsonl with the models: the next run
    published version 1 again, another model under a number devices may hold, and devices
    holding a newer version never fetched its models. The record stays (with the models
    published before it existed added to it), so the next run numbers after it."""
    layout = init_state_dir(tmp_path / "s")
    record_published(layout.artifacts, "model-v1.int8.onnx", "1", "a" * 64)
    (layout.artifacts / "model-v1.int8.onnx").write_bytes(b"one")
    (layout.artifacts / "model-v7.int8.onnx").write_bytes(b"seven")  # never recorded
    (layout.artifacts / "catalog.json").write_text("[]")
    init_state_dir(layout.state_dir, force=True)
    assert [p.name for p in layout.artifacts.iterdir()] == [RECORD_FILE]
    assert published_digests(layout.artifacts) == {
        "model-v1.int8.onnx": "a" * 64,
        "model-v7.int8.onnx": sha256_hex(b"seven"),
    }
    assert highest_published_version(layout.artifacts) == 7
    assert server_status(layout).latest_artifact is None  # none on disk yet


def test_init_force_refuses_over_an_unreadable_record(tmp_path: Path) -> None:
    """Kept by --force, a record that cannot be read is not wiped with the rest: it is
    named, and nothing is replaced."""
    layout = init_state_dir(tmp_path / "s")
    (layout.artifacts / RECORD_FILE).mkdir()  # reading it fails (EISDIR)
    ca = layout.pki.ca_cert.read_bytes()
    with pytest.raises(StateDirError, match=r"published\.jsonl is unreadable .*nothing was"):
        init_state_dir(layout.state_dir, force=True)
    assert layout.pki.ca_cert.read_bytes() == ca


def test_init_finishes_over_an_interrupted_init(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An init stopped before its last write (the marker: disk full, Ctrl-C) left certs
    but no ``server.toml``; no server ever started from it, so a new init starts over
    instead of refusing the folder as "not a server state directory"."""
    from server import state as state_module

    state = tmp_path / "server"

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(state_module, "write_bytes_atomic", disk_full)
        with pytest.raises(OSError, match="No space"):
            init_state_dir(state)
    layout = ServerLayout(state)
    assert layout.pki.ca_cert.exists() and not layout.marker.exists()
    ca_before = layout.pki.ca_cert.read_bytes()
    init_state_dir(state)
    assert layout.marker.exists() and layout.require() is not None
    assert layout.pki.ca_cert.read_bytes() != ca_before
    # a folder holding anything else, or a checkpoint, is still refused
    layout.marker.unlink()
    (layout.checkpoints / "round-00000001.json").write_text("{}")
    with pytest.raises(StateDirError, match="not empty"):
        init_state_dir(state)


def test_a_damaged_or_newer_state_marker_is_refused(tmp_path: Path) -> None:
    layout = init_state_dir(tmp_path / "s")
    layout.marker.write_text("garbage = [")
    with pytest.raises(StateDirError, match="unreadable"):
        layout.require()
    layout.marker.write_text('format = "something-else"\nversion = 1\n')
    with pytest.raises(StateDirError, match="not a fedrec server state marker"):
        layout.require()
    layout.marker.write_text('format = "fedrec-server-state"\nversion = 99\n')
    with pytest.raises(StateDirError, match="newer fedrec"):
        layout.require()
    init_state_dir(layout.state_dir, force=True)  # what the message offers works
    assert layout.require() is layout


def test_force_never_wipes_a_directory_that_is_not_a_server_state(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(StateDirError, match="not a server state"):
        init_state_dir(tmp_path, force=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- registration


def test_device_keys_from_client_init_are_accepted(tmp_path: Path) -> None:
    identity = init_identity(tmp_path / "device")
    line, fingerprint = read_public_key_file(identity.layout.public_key)
    assert line.startswith("ecdsa-sha2-nistp256 ")
    assert fingerprint == identity.device_id
    # saved by a Windows editor (byte-order mark): the same key
    bom = tmp_path / "bom.pub"
    bom.write_text("\ufeff" + identity.layout.public_key.read_text())
    assert read_public_key_file(bom) == (line, fingerprint)
    # two devices' keys in one file: not silently the first only
    other = init_identity(tmp_path / "other").layout.public_key.read_text()
    both = tmp_path / "both.pub"
    both.write_text(identity.layout.public_key.read_text() + other)
    with pytest.raises(BadPublicKeyError, match="holds 2 keys"):
        read_public_key_file(both)
    # a file of many lines that are no keys (a catalog) is not "602 keys"
    catalog = tmp_path / "catalog.json"
    catalog.write_text('[\n"1",\n"2"\n]\n')
    with pytest.raises(BadPublicKeyError) as caught:
        read_public_key_file(catalog)
    assert "not an OpenSSH public key" in str(caught.value) and " holds " not in str(caught.value)


def test_a_key_file_far_larger_than_a_key_is_refused_unread(tmp_path: Path) -> None:
    """`register-client` read the whole file: a wrong path (a database, `/dev/zero`) was read
    into memory until it ran out (or forever) before any error."""
    big = tmp_path / "superlink.db"
    big.write_bytes(b"ecdsa-sha2-nistp256 " + b"A" * 200_000)
    with pytest.raises(BadPublicKeyError, match="larger than"):
        read_public_key_file(big)
    if Path("/dev/zero").exists():
        with pytest.raises(BadPublicKeyError, match="larger than"):
            read_public_key_file(Path("/dev/zero"))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (_ssh_line(rsa.generate_private_key(65537, 2048)), "NIST curve"),
        (_ssh_line(ed25519.Ed25519PrivateKey.generate()), "NIST curve"),
        ("ecdsa-sha2-nistp256 AAAAnotbase64", "not an OpenSSH public key"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n", "private key"),
        ("", "not a public key"),
    ],
    ids=["rsa", "ed25519", "not-base64", "private-key", "empty"],
)
def test_bad_keys_are_refused_with_the_reason(text: str, match: str) -> None:
    with pytest.raises(BadPublicKeyError, match=match):
        load_public_key(text, source="key.pub")


def test_registry_add_revoke_find(tmp_path: Path) -> None:
    registry = ClientRegistry(tmp_path / "clients.json")
    keys = [init_identity(tmp_path / f"d{i}").public_key_openssh for i in range(2)]
    a = registry.add(*load_public_key(keys[0], source="a"), name="phone")
    registry.add(*load_public_key(keys[1], source="b"), name=None)
    with pytest.raises(ConfigError, match="already registered"):
        registry.add(*load_public_key(keys[0], source="a"), name="again")
    registry.save()
    loaded = ClientRegistry.load(registry.path)
    assert [c.name for c in loaded.active()] == ["phone", "device-1"]
    # a default name never repeats one given explicitly (revoke-client would pick either)
    third = init_identity(tmp_path / "d2").public_key_openssh
    loaded.add(*load_public_key(third, source="c"), name="device-2")
    fourth = init_identity(tmp_path / "d3").public_key_openssh
    assert loaded.add(*load_public_key(fourth, source="d"), name=None).name == "device-3"
    assert loaded.find(a.fingerprint).name == "phone"
    with pytest.raises(ConfigError, match="no registered client"):
        loaded.find("nobody")


_KEY, _FINGERPRINT = load_public_key(
    _ssh_line(ec.generate_private_key(ec.SECP256R1())), source="a test key"
)
_GOOD_RECORD = {"name": "phone", "public_key": _KEY, "fingerprint": _FINGERPRINT, "added": 1.0}


def test_a_key_with_a_compressed_point_is_refused_as_a_bad_key() -> None:
    """cryptography cannot read an OpenSSH key whose EC point is compressed and raises
    NotImplementedError, which escaped from register-client (and a registry read) as a
    traceback instead of the bad-key error that names the file to register."""
    kind, blob = _KEY.split()[:2]
    raw = base64.b64decode(blob)
    compressed = raw[:-69] + (33).to_bytes(4, "big") + bytes([2 + raw[-1] % 2]) + raw[-64:-32]
    line = f"{kind} {base64.b64encode(compressed).decode()}"
    with pytest.raises(BadPublicKeyError, match="is not an OpenSSH public key"):
        load_public_key(line, source="phone.pub")


def test_the_registry_is_saved_one_device_per_line(tmp_path: Path) -> None:
    """`server start` saves clients.json after each registration the SuperLink makes, so a
    save is paid once per device and grows with the devices: indented JSON (Python's pure
    encoder) took 37 s of writes to apply 1,000 new devices. Each record is one compact line
    now (the C encoder: 6 s), read back as it was written."""
    registry = ClientRegistry(tmp_path / "clients.json")
    registry.add(_KEY, _FINGERPRINT, "phone")
    other, fingerprint = load_public_key(
        _ssh_line(ec.generate_private_key(ec.SECP256R1())), source="key"
    )
    registry.add(other, fingerprint, None).node_id = 7
    registry.save()
    lines = registry.path.read_text().splitlines()
    for record in registry.clients:
        (line,) = [x for x in lines if record.fingerprint in x]
        assert json.loads(line.strip().rstrip(",")) == asdict(record)
    assert ClientRegistry.load(registry.path).clients == registry.clients
    ClientRegistry(registry.path).save()  # none left
    assert json.loads(registry.path.read_text()) == {"format": REGISTRY_FORMAT, "clients": []}


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ([], "the top level is a JSON list, not an object"),
        ({"clients": {}}, '"clients" is not a list'),
        ({"clients": [_GOOD_RECORD, "phone"]}, 'entry 1 of "clients" is not an object'),
        (
            {"clients": [{**_GOOD_RECORD, "colour": 1}]},
            'entry 0 of "clients" has unknown field(s) colour',
        ),
        (
            {"clients": [{"name": "phone", "added": 1.0}]},
            'entry 0 of "clients" lacks public_key, fingerprint',
        ),
        (
            {"clients": [{**_GOOD_RECORD, "node_id": "7"}]},
            'entry 0 of "clients" has node_id = "7", of the wrong type',
        ),
        (
            {"clients": [{**_GOOD_RECORD, "added": True}]},
            'entry 0 of "clients" has added = true, of the wrong type',
        ),
        (
            {"clients": [{**_GOOD_RECORD, "applied": 1}]},
            'entry 0 of "clients" has applied = 1, of the wrong type',
        ),
        (  # hand-edited or merged: revoking either name (or the key) left the key active
            {
                "clients": [
                    _GOOD_RECORD,
                    {**_GOOD_RECORD, "revoked": 2},
                    {**_GOOD_RECORD, "name": "b"},
                ]
            },
            "entries 0 and 2 of \"clients\" ('phone', 'b') both authorize the key "
            f"{_FINGERPRINT} (a revocation would leave it active under the other; keep one)",
        ),
        (  # `server start` failed on it with Flower's multi-line error naming no entry
            {"clients": [{**_GOOD_RECORD, "public_key": "ecdsa-sha2-nistp256 AAAAjunk"}]},
            "entry 0 of \"clients\" ('phone') has a public_key that is not a device key",
        ),
        (  # what status showed and revoke-client matched was not the key authorized
            {"clients": [{**_GOOD_RECORD, "fingerprint": "SHA256:x"}]},
            f"entry 0 of \"clients\" ('phone') has fingerprint SHA256:x, but its public_key's "
            f"is {_FINGERPRINT}",
        ),
        (  # a newer fedrec's file was read by these rules and saved back as format 1
            {"format": "fedrec-clients/2", "clients": [_GOOD_RECORD]},
            'its format is "fedrec-clients/2", not "fedrec-clients/1", the one this fedrec '
            "reads (use the fedrec version that wrote it)",
        ),
    ],
)
def test_a_malformed_registry_is_described_in_the_files_terms(
    tmp_path: Path, raw: object, problem: str
) -> None:
    path = tmp_path / "clients.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError) as err:
        ClientRegistry.load(path)
    assert str(err.value) == (
        f"the client registry {path} is malformed: {problem}; restore it from a backup"
    )
    path.write_text(json.dumps({"clients": [{**_GOOD_RECORD, "node_id": None, "revoked": 2}]}))
    (record,) = ClientRegistry.load(path).clients
    assert (record.name, record.node_id, record.revoked) == ("phone", None, 2)


def test_a_registry_that_is_not_text_is_refused_as_unreadable(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 (a damaged disk, a binary copied over it) escaped as a raw
    UnicodeDecodeError traceback from `fedrec server status` and every registry command."""
    path = tmp_path / "clients.json"
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(DataError, match=r"clients\.json is unreadable: .*restore it from a backup"):
        ClientRegistry.load(path)


def test_a_key_revoked_after_the_superlink_had_it_cannot_be_registered_again(
    tmp_path: Path,
) -> None:
    registry = ClientRegistry(tmp_path / "clients.json")
    keys = [init_identity(tmp_path / f"d{i}").public_key_openssh for i in range(2)]
    applied = registry.add(*load_public_key(keys[0], source="a"), name="phone-1")
    applied.node_id = 1234  # a `server start` registered it with the SuperLink
    applied.revoked = time.time()
    with pytest.raises(ConfigError, match=r"never accepts a revoked key again.*client rotate-key"):
        registry.add(*load_public_key(keys[0], source="a"), name="phone-1b")
    # revoked before any SuperLink saw it: nothing to forget, so it may come back
    never = registry.add(*load_public_key(keys[1], source="b"), name="tablet")
    never.revoked = time.time()
    again = registry.add(*load_public_key(keys[1], source="b"), name="tablet-2")
    assert [c.name for c in registry.active()] == ["tablet-2"] and again.revoked is None


def test_cli_register_and_revoke_without_a_running_server(tmp_path: Path) -> None:
    state = tmp_path / "server"
    assert runner.invoke(app, ["server", "init", "--state-dir", str(state)]).exit_code == 0
    identity = init_identity(tmp_path / "device")
    ok = runner.invoke(
        app,
        ["server", "register-client", str(identity.layout.public_key), "--state-dir", str(state)],
    )
    assert ok.exit_code == 0, ok.output
    assert "next `fedrec server start`" in ok.output
    bad = runner.invoke(
        app,
        ["server", "register-client", str(identity.layout.private_key), "--state-dir", str(state)],
    )
    assert bad.exit_code != 0 and isinstance(bad.exception, BadPublicKeyError)
    revoked = runner.invoke(app, ["server", "revoke-client", "device-1", "--state-dir", str(state)])
    assert revoked.exit_code == 0, revoked.output
    info = server_status(ServerLayout(state))
    assert (info.clients_registered, info.clients_revoked, info.running) == (0, 1, False)


def test_register_and_revoke_while_the_server_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that starts holds its lock before its SuperLink is up (no running.json
    yet): register-client and revoke-client said "the server is not running: applied at the
    next start", while the starting server applies them within seconds. And the check
    for a live SuperLink ran before the registry's lock was taken: a server that came up
    and applied its registrations in between left the new key unapplied until a restart.
    The check runs under the lock (the starting server applies after it, or this command
    does), and a starting server is called one."""
    import server.superlink
    from shared.io import is_locked

    layout = init_state_dir(tmp_path / "s")
    key = init_identity(tmp_path / "device").layout.public_key
    args = ["--state-dir", str(layout.state_dir)]
    with hold_server_lock(layout):
        added = runner.invoke(app, ["server", "register-client", str(key), *args])
        assert added.exit_code == 0, added.output
        assert "not running" not in added.output and "starting" in added.output
        revoked = runner.invoke(app, ["server", "revoke-client", "device-1", *args])
        assert revoked.exit_code == 0, revoked.output
        assert "not running" not in revoked.output and "starting" in revoked.output

    lock = layout.registry.with_name(f".{layout.registry.name}.lock")
    link = _FlakySuperLink()

    def up_once_the_registry_is_locked(_: ServerLayout) -> _FlakySuperLink | None:
        return link if is_locked(lock) else None  # the SuperLink came up meanwhile

    monkeypatch.setattr(server.superlink, "live_cli", up_once_the_registry_is_locked)
    second = init_identity(tmp_path / "device-2").layout.public_key
    added = runner.invoke(app, ["server", "register-client", str(second), *args])
    assert added.exit_code == 0, added.output
    assert list(link.registered) == [100]


def test_registry_names_are_plain_and_node_ids_match_only_known_nodes(tmp_path: Path) -> None:
    registry = ClientRegistry(tmp_path / "clients.json")
    keys = [init_identity(tmp_path / f"d{i}").public_key_openssh for i in range(3)]
    for bad in ("", "../../home/op/.ssh/id_ecdsa", "a/b", "two\nlines", ".hidden", "x" * 65):
        with pytest.raises(ConfigError, match="--name must be"):
            registry.add(*load_public_key(keys[0], source="a"), name=bad)
    none = registry.add(*load_public_key(keys[0], source="a"), name="None")
    phone = registry.add(*load_public_key(keys[1], source="b"), name="phone")
    assert registry.find("None") is none  # not every record whose node id is still unknown
    phone.node_id = 5
    assert registry.find("5") is phone
    # digits of other scripts are no node id: '²' was a ValueError traceback from
    # revoke-client and the Arabic-Indic '٥' revoked node 5
    for other in ("²", "\u0665", "\uff15"):
        with pytest.raises(ConfigError, match="no registered client"):
            registry.find(other)
    registry.add(*load_public_key(keys[2], source="c"), name="5")
    with pytest.raises(ConfigError, match="matches several active clients"):
        registry.find("5")


def test_a_name_reused_after_a_revocation_means_the_new_device(tmp_path: Path) -> None:
    registry = ClientRegistry(tmp_path / "clients.json")
    keys = [init_identity(tmp_path / f"d{i}").public_key_openssh for i in range(2)]
    old = registry.add(*load_public_key(keys[0], source="a"), name="phone-1")
    old.revoked = 1.0
    new = registry.add(*load_public_key(keys[1], source="b"), name="phone-1")
    assert registry.find("phone-1") is new
    assert registry.find(old.fingerprint) is old  # the old one by its fingerprint
    new.revoked = 2.0
    assert registry.find("phone-1") is new  # both revoked: the caller says so, no ambiguity
    old.applied = True  # its revocation has not reached the SuperLink yet: that one is retried
    assert registry.find("phone-1") is old


def test_revoke_client_by_a_name_reused_after_a_key_rotation(tmp_path: Path) -> None:
    """The README's flow: revoke a device, it rotates its key, its new key is registered
    under the same name. The name then means the active key, and once that is revoked too
    the name is reported as revoked already, not as ambiguous."""
    state = tmp_path / "server"
    args = ["--state-dir", str(state)]
    assert runner.invoke(app, ["server", "init", *args]).exit_code == 0
    keys = [init_identity(tmp_path / f"d{i}").layout.public_key for i in range(2)]
    first = runner.invoke(app, ["server", "register-client", str(keys[0]), *args, "--name", "p1"])
    assert first.exit_code == 0, first.output
    taken = runner.invoke(app, ["server", "register-client", str(keys[1]), *args, "--name", "p1"])
    assert isinstance(taken.exception, ConfigError)
    assert "revoke the old one first (fedrec server revoke-client SHA256:" in str(taken.exception)
    assert runner.invoke(app, ["server", "revoke-client", "p1", *args]).exit_code == 0
    again = runner.invoke(app, ["server", "register-client", str(keys[1]), *args, "--name", "p1"])
    assert again.exit_code == 0, again.output
    registry = ClientRegistry.load(ServerLayout(state).registry)
    old, new = registry.clients
    revoked = runner.invoke(app, ["server", "revoke-client", "p1", *args])
    assert revoked.exit_code == 0, revoked.output
    assert f"revoked p1 ({new.fingerprint})" in revoked.output
    noop = runner.invoke(app, ["server", "revoke-client", "p1", *args])
    assert noop.exit_code != 0 and isinstance(noop.exception, ConfigError)
    message = str(noop.exception)
    assert "already revoked" in message and "several" not in message
    assert old.fingerprint in message and new.fingerprint in message
    single = runner.invoke(app, ["server", "revoke-client", old.fingerprint, *args])
    assert isinstance(single.exception, ConfigError)
    assert f"p1 ({old.fingerprint}) is already revoked" in str(single.exception)


def test_only_several_active_clients_are_ambiguous_and_are_listed(tmp_path: Path) -> None:
    registry = ClientRegistry(tmp_path / "clients.json")
    keys = [init_identity(tmp_path / f"d{i}").public_key_openssh for i in range(3)]
    gone = registry.add(*load_public_key(keys[0], source="a"), name="7")
    gone.revoked = 1.0
    phone = registry.add(*load_public_key(keys[1], source="b"), name="phone")
    phone.node_id = 7
    assert registry.find("7") is phone  # the revoked "7" does not make it ambiguous
    seven = registry.add(*load_public_key(keys[2], source="c"), name="7")
    with pytest.raises(ConfigError, match="several active clients") as err:
        registry.find("7")
    assert phone.fingerprint in str(err.value) and seven.fingerprint in str(err.value)
    assert gone.fingerprint not in str(err.value)


def test_a_pem_public_key_is_named_as_such() -> None:
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(BadPublicKeyError, match="is a PEM block, not an OpenSSH public key"):
        load_public_key(pem.decode(), source="pem.pub")


def test_concurrent_registrations_are_all_kept(tmp_path: Path) -> None:
    """Each command reads, changes and writes clients.json; the registry's lock keeps one
    from overwriting another's change."""
    state = tmp_path / "server"
    assert runner.invoke(app, ["server", "init", "--state-dir", str(state)]).exit_code == 0
    keys = [init_identity(tmp_path / f"d{i}").layout.public_key for i in range(4)]
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "fedrec.cli", "server", "register-client", str(key)),
                *("--state-dir", str(state), "--name", f"phone-{i}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i, key in enumerate(keys)
    ]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    names = sorted(c.name for c in ClientRegistry.load(ServerLayout(state).registry).clients)
    assert names == [f"phone-{i}" for i in range(4)]


class _FlakySuperLink:
    """The `flwr` CLI of a running SuperLink whose first unregister call fails."""

    def __init__(self) -> None:
        self.registered: dict[int, str] = {}
        self.fail_unregister = True

    def nodes(self) -> dict[int, str]:
        return {n: "online" for n in self.registered}

    def register(self, public_key_file: Path) -> int:
        node = 100 + len(self.registered)
        self.registered[node] = public_key_file.read_text()
        return node

    def register_keys(self, public_keys: list[str]) -> Iterator[int | SuperLinkError]:
        """:meth:`FlwrCli.register_keys` through :meth:`register` (a refusal is the key's)."""
        for key in public_keys:
            with tempfile.TemporaryDirectory() as tmp:
                key_file = Path(tmp) / "client.pub"
                key_file.write_text(key + "\n")
                try:
                    yield self.register(key_file)
                except SuperLinkError as exc:
                    yield exc

    def unregister(self, node_id: int) -> None:
        if self.fail_unregister:
            self.fail_unregister = False
            raise SuperLinkError("`flwr supernode unregister` failed: timed out")
        del self.registered[node_id]


def test_a_revocation_the_superlink_missed_can_be_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.superlink

    state = tmp_path / "server"
    assert runner.invoke(app, ["server", "init", "--state-dir", str(state)]).exit_code == 0
    link = _FlakySuperLink()
    monkeypatch.setattr(server.superlink, "live_cli", lambda layout: link)
    key = init_identity(tmp_path / "device").layout.public_key
    args = ["--state-dir", str(state)]
    added = runner.invoke(app, ["server", "register-client", str(key), *args])
    assert added.exit_code == 0 and "registered device-1" in added.output
    assert list(link.registered) == [100]
    failed = runner.invoke(app, ["server", "revoke-client", "device-1", *args])
    assert failed.exit_code != 0 and isinstance(failed.exception, SuperLinkError)
    assert list(link.registered) == [100]  # the SuperLink still accepts the device
    retry = runner.invoke(app, ["server", "revoke-client", "device-1", *args])
    assert retry.exit_code == 0, retry.output
    assert "applying it to the SuperLink" in retry.output and link.registered == {}
    again = runner.invoke(app, ["server", "revoke-client", "device-1", *args])
    assert isinstance(again.exception, ConfigError) and "already revoked" in str(again.exception)


def test_register_client_fails_when_the_superlink_refuses_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal of one key is a line of the registrations' output (so that `server start`
    registers the others); `register-client` printed it and exited 0, the device unable to
    join. It fails, the key stays saved, and the command again applies it."""
    import server.superlink

    state = tmp_path / "server"
    assert runner.invoke(app, ["server", "init", "--state-dir", str(state)]).exit_code == 0
    link = _FlakySuperLink()
    monkeypatch.setattr(server.superlink, "live_cli", lambda layout: link)
    accept = link.register

    def refuse(public_key_file: Path) -> int:
        raise SuperLinkError("`flwr supernode register` failed: [code: 3] refused")

    link.register = refuse  # type: ignore[method-assign]
    key = init_identity(tmp_path / "device").layout.public_key
    args = [str(key), "--state-dir", str(state)]
    refused = runner.invoke(app, ["server", "register-client", *args])
    assert isinstance(refused.exception, SuperLinkError), refused.output
    assert "could not register device-1" in refused.output
    assert "did not register device-1" in str(refused.exception)
    (saved,) = ClientRegistry.load(state / "clients.json").clients
    assert saved.name == "device-1" and not saved.applied
    link.register = accept  # type: ignore[method-assign]
    retried = runner.invoke(app, ["server", "register-client", *args])
    assert retried.exit_code == 0, retried.output
    assert "registered device-1 as node 100" in retried.output


def test_register_and_revoke_client_read_the_registry_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each read of clients.json checks every stored key (0.4 s at 10,000 devices), and
    `register-client` on a running server read it three times: to add the key, to apply it,
    and to see whether the SuperLink took it (`revoke-client` twice). Each reads it once."""
    import server.superlink

    layout = _state_with_devices(tmp_path, 2)
    link = _FlakySuperLink()
    link.fail_unregister = False
    monkeypatch.setattr(server.superlink, "live_cli", lambda layout: link)
    reads: list[Path] = []
    load = ClientRegistry.load.__func__  # type: ignore[attr-defined]

    def counting(cls: type[ClientRegistry], path: Path) -> ClientRegistry:
        reads.append(path)
        return load(cls, path)  # type: ignore[no-any-return]

    monkeypatch.setattr(ClientRegistry, "load", classmethod(counting))
    key = init_identity(tmp_path / "device").layout.public_key
    args = [str(key), "--state-dir", str(layout.state_dir)]
    added = runner.invoke(app, ["server", "register-client", *args])
    assert added.exit_code == 0, added.output
    assert "registered device-1 as node 102" in added.output
    assert reads == [layout.registry]

    def refuse(public_key_file: Path) -> int:
        raise SuperLinkError("`flwr supernode register` failed: [code: 3] refused")

    accept = link.register
    monkeypatch.setattr(link, "register", refuse)
    reads.clear()
    other = init_identity(tmp_path / "device-2").layout.public_key
    refused = runner.invoke(app, ["server", "register-client", str(other), *args[1:]])
    assert isinstance(refused.exception, SuperLinkError), refused.output
    assert "did not register device-2" in str(refused.exception)
    assert reads == [layout.registry]
    monkeypatch.setattr(link, "register", accept)
    reads.clear()
    revoked = runner.invoke(app, ["server", "revoke-client", "phone-0", *args[1:]])
    assert revoked.exit_code == 0, revoked.output
    assert "unregistered phone-0 (node 100)" in revoked.output and 100 not in link.registered
    assert "registered device-2 as node 103" in revoked.output  # the refused key, retried
    assert reads == [layout.registry]  # revoke-client too (it read it twice)
    saved = {c.name: c.applied for c in ClientRegistry.load(layout.registry).clients}
    assert saved == {"phone-0": False, "phone-1": True, "device-1": True, "device-2": True}


class _DyingSuperLink(_FlakySuperLink):
    """A SuperLink whose server process dies (SIGKILL, power loss: no ``finally`` runs) on
    its second registration; it notes what ``clients.json`` held on disk by then."""

    def __init__(self, registry: Path) -> None:
        super().__init__()
        self.registry = registry
        self.on_disk: list[int | None] = []

    def register(self, public_key_file: Path) -> int:
        if self.registered:
            self.on_disk = [c.node_id for c in ClientRegistry.load(self.registry).clients]
            raise KeyboardInterrupt  # stands for the kill; what was saved is what counts
        return super().register(public_key_file)


def _state_with_devices(tmp_path: Path, count: int) -> ServerLayout:
    """A server state whose clients.json holds ``count`` new devices, phone-0, phone-1, ..."""
    layout = init_state_dir(tmp_path / "s")
    with ClientRegistry.locked(layout.registry) as registry:
        for i in range(count):
            public = init_identity(tmp_path / f"d{i}").public_key_openssh
            registry.add(*load_public_key(public, source="key"), name=f"phone-{i}")
        registry.save()
    return layout


def test_each_registration_is_saved_before_the_next_superlink_call(tmp_path: Path) -> None:
    """`server start` registered every new key and saved the node ids only once all were
    done: a server killed in between (SIGKILL, a power loss) lost the node ids the SuperLink
    had already given, and a later revocation of such a device could not unregister it (the
    SuperLink kept accepting it). Each node id is saved as soon as the SuperLink gives it."""
    from server.superlink import apply_registrations

    layout = _state_with_devices(tmp_path, 2)
    link = _DyingSuperLink(layout.registry)
    with pytest.raises(KeyboardInterrupt):
        apply_registrations(layout, link)  # type: ignore[arg-type]
    assert link.on_disk == [100, None]


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path: Path) -> None:
    """Through the real entry point (main()): bad key, missing client options, no state."""
    cmd = [sys.executable, "-m", "fedrec.cli"]
    init = subprocess.run(
        [*cmd, "server", "init", "--state-dir", str(tmp_path / "s")], capture_output=True
    )
    assert init.returncode == 0
    junk = tmp_path / "junk.pub"
    junk.write_text("ssh-rsa nope\n")
    cases = [
        ["server", "register-client", str(junk), "--state-dir", str(tmp_path / "s")],
        ["server", "status", "--state-dir", str(tmp_path / "nothing")],
        ["client", "start", "--state-dir", str(tmp_path / "d")],
        [
            "client",
            "start",
            "--state-dir",
            str(tmp_path / "d"),
            "--server",
            "127.0.0.1:1",
            "--root-cert",
            str(junk),
            "--bundle",
            str(junk),
            "--personal-steps",
            "-1",
        ],
    ]
    for args in cases:
        done = subprocess.run([*cmd, *args], capture_output=True, text=True)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    missing = subprocess.run([*cmd, *cases[2]], capture_output=True, text=True).stderr
    assert "--server, --root-cert, --bundle" in missing
    steps = subprocess.run([*cmd, *cases[3]], capture_output=True, text=True).stderr
    assert "personal-steps must be >= 0" in steps


# --------------------------------------------------------------------------- run config


def test_deployment_run_config_points_at_the_state_dir(
    tmp_path: Path, write_tiny_bundle: Callable[[Path, int], list[str]]
) -> None:
    layout = init_state_dir(tmp_path / "s")
    bundle = tmp_path / "bundle.pt"
    write_tiny_bundle(bundle, 12)
    config = deployment_run_config(
        layout,
        bundle=bundle,
        num_rounds=4,
        overrides={"secagg-num-shares": 3, "secagg-reconstruction-threshold": 2},
    )
    assert config["task"] == STUDENT_TASK and config["num-rounds"] == 4
    assert config["checkpoint-dir"] == str(layout.checkpoints.resolve())
    assert config["secagg"] is True and config["secagg-num-shares"] == 3
    with pytest.raises(ConfigError, match="cannot be overridden"):
        deployment_run_config(
            layout, bundle=bundle, num_rounds=1, overrides={"checkpoint-dir": "/tmp/x"}
        )
    with pytest.raises(ConfigError, match="--bundle"):
        deployment_run_config(layout, bundle=None, num_rounds=1, overrides={})
    with pytest.raises(ConfigError, match="is not a file"):
        deployment_run_config(layout, bundle=tmp_path / "no.pt", num_rounds=1, overrides={})
    toy = deployment_run_config(layout, bundle=None, num_rounds=1, overrides={"task": "toy-linear"})
    app_dir = write_app(layout, toy)
    import tomllib

    pyproject = tomllib.loads((app_dir / "pyproject.toml").read_text())
    flwr_app = pyproject["tool"]["flwr"]["app"]
    assert flwr_app["components"] == {
        "serverapp": "server.deploy_app:app",
        "clientapp": "client.client_app:app",
    }
    assert flwr_app["config"]["progress-file"] == str(layout.progress.resolve())
    assert pyproject["project"]["dependencies"] == []  # nothing to install at run time


def test_deployment_run_config_holds_the_server_settings_as_the_server_app_reads_them(
    tmp_path: Path,
) -> None:
    """`fedrec server start` reads num-rounds, secagg, ... from the run config too: given as
    num-rounds=4.0 and secagg=0 (which the ServerApp reads as 4 and false) it found no rounds
    left to count and refused a SecAgg+ quorum for a run without SecAgg+."""
    layout = init_state_dir(tmp_path / "s")
    config = deployment_run_config(
        layout,
        bundle=None,
        num_rounds=1,
        overrides={
            "task": "toy-linear",
            "num-rounds": 4.0,
            "secagg": 0,
            "secagg-reconstruction-threshold": 4,
            "min-available-clients": 3,
        },
    )
    assert config["num-rounds"] == 4 and type(config["num-rounds"]) is int
    assert config["secagg"] is False


@pytest.fixture
def submitted(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The run configs `fedrec server start` submits, with the SuperLink left out."""
    import server.superlink as superlink

    configs: list[dict[str, Any]] = []

    class Runner:
        def __init__(self, layout: Any, options: Any, config: dict[str, Any], echo: Any) -> None:
            configs.append(config)

        def run(self) -> int:
            return 0

    monkeypatch.setattr(superlink, "ServerRunner", Runner)
    return configs


def test_server_start_refuses_unknown_keys_and_flags_win_over_run_config(
    tmp_path: Path, submitted: list[dict[str, Any]]
) -> None:
    layout = init_state_dir(tmp_path / "s")
    with pytest.raises(ConfigError, match=r"unknown --run-config key 'user-dp-clp'.*user-dp-clip"):
        deployment_run_config(
            layout,
            bundle=None,
            num_rounds=1,
            overrides={"task": "toy-linear", "user-dp-clp": 0.5},
        )
    base = ["server", "start", "--state-dir", str(layout.state_dir)]
    given = "task=toy-linear num-rounds=5 min-available-clients=4"
    for extra, rounds, clients in (
        ([], 5, 4),  # from --run-config
        (["--rounds", "2", "--min-clients", "3"], 2, 3),  # the flags win
    ):
        result = runner.invoke(app, [*base, "--run-config", given, *extra])
        assert result.exit_code == 0, result.output
        config = submitted[-1]
        assert (config["num-rounds"], config["min-available-clients"]) == (rounds, clients)
    result = runner.invoke(app, [*base, "--run-config", "task=toy-linear"])
    assert (submitted[-1]["num-rounds"], submitted[-1]["min-available-clients"]) == (3, 3)


def test_server_start_submits_one_spelling_of_a_snake_case_run_config_key(
    tmp_path: Path, submitted: list[dict[str, Any]]
) -> None:
    """`--run-config epsilon_budget=4` was submitted as typed: every device then added its
    capped `epsilon-budget` beside it and refused every round (the setting given twice), and
    a flag of the same setting was refused instead of winning over it as the help says."""
    layout = init_state_dir(tmp_path / "s")
    base = ["server", "start", "--state-dir", str(layout.state_dir), "--run-config"]
    given = "task=toy-linear epsilon_budget=4 num_rounds=5 noise_multiplier=2.0"
    result = runner.invoke(app, [*base, given])
    assert result.exit_code == 0, result.exception
    config = submitted[-1]
    assert (config["epsilon-budget"], config["num-rounds"], config["noise-multiplier"]) == (4, 5, 2)
    assert not [key for key in config if "_" in key]
    device = node_run_config(config, {"fedrec-device-dir": str(tmp_path / "d")})
    from shared.federated.student_task import StudentTask

    StudentTask.from_run_config({**device, "bundle": "b.pt"})  # each setting read once
    flagged = runner.invoke(app, [*base, given, "--noise-multiplier", "3", "--rounds", "2"])
    assert flagged.exit_code == 0, flagged.exception
    assert (submitted[-1]["noise-multiplier"], submitted[-1]["num-rounds"]) == (3, 2)
    both = runner.invoke(app, [*base, "task=toy-linear epsilon_budget=4 epsilon-budget=5"])
    assert "gives 'epsilon-budget' twice (epsilon_budget and epsilon-budget)" in str(both.exception)


def test_every_run_setting_is_a_server_start_flag(
    tmp_path: Path, submitted: list[dict[str, Any]]
) -> None:
    from fedrec.server_settings import NOT_FLAGS, START_SETTINGS_HELP
    from server.server_app import ServerConfig
    from shared.config import field_names, kebab
    from shared.federated.local_config import LocalTrainConfig
    from shared.federated.student_config import StudentTaskConfig

    keys = (
        field_names(ServerConfig) | field_names(LocalTrainConfig) | field_names(StudentTaskConfig)
    )
    documented = [name for topic in START_SETTINGS_HELP.values() for name in topic]
    assert len(documented) == len(set(documented))  # each setting once
    assert {kebab(n) for n in documented} == keys - {kebab(n) for n in NOT_FLAGS}
    shown = runner.invoke(app, ["server", "start", "--help"], env={"COLUMNS": "250"}).output
    for name in documented:
        assert f"--{kebab(name)} " in shown, name
    layout = init_state_dir(tmp_path / "s")
    base = ["server", "start", "--state-dir", str(layout.state_dir)]
    given = ["--run-config", "task=toy-linear noise-multiplier=2.0 batch-size=8 cohort-size=8"]
    flags = ["--noise-multiplier", "3", "--no-exclude-seen", "--server-optimizer", "adam"]
    flags += ["--secagg-num-shares", "0.5", "--secagg-reconstruction-threshold", "4"]
    # 0.5 of the cohort as neighbours and a threshold of 4: rounds need 7 clients or more
    result = runner.invoke(app, [*base, *given, *flags, "--min-clients", "8"])
    assert result.exit_code == 0, result.output
    config = submitted[-1]
    assert config["noise-multiplier"] == 3.0  # the flag wins over --run-config
    assert (config["batch-size"], config["cohort-size"]) == (8, 8)  # from --run-config
    assert (config["exclude-seen"], config["server-optimizer"]) == (False, "adam")
    assert config["secagg"] is True  # a deployment's default, untouched by the flags' defaults
    assert "max-examples" not in config  # a flag not typed adds nothing: the app's default
    # a count and a fraction keep their types (SecAgg+ reads 0.5 as a share of the cohort)
    assert config["secagg-num-shares"] == 0.5 and isinstance(config["secagg-num-shares"], float)
    assert config["secagg-reconstruction-threshold"] == 4
    assert isinstance(config["secagg-reconstruction-threshold"], int)
    for bad, message in (
        (["--secagg-num-shares", "five"], "'five' is not a number"),
        (["--noise-multiplier", "x"], "Invalid value for '--noise-multiplier'"),
    ):
        result = runner.invoke(app, [*base, *given, *bad])
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(app, [*base, *given, "--user-dp-clip", "-1", "--user-dp"])
    assert "'user-dp-clip' must be > 0 with user-dp" in str(result.exception)
    assert len(submitted) == 1  # refused before the SuperLink starts


@pytest.mark.parametrize(
    ("overrides", "rounds", "message"),
    [
        ({}, 0, "'num-rounds' must be between 1 and 1,000,000, got 0"),
        ({"num-rounds": 10**22}, 2, "'num-rounds' must be between 1 and 1,000,000"),
        ({"min-available-clients": 0}, 2, "'min-available-clients' must be >= 1"),
        # SecAgg+ (on by default here) could never unmask a round of 2 with threshold 3: the run
        # used to complete with every round failed ("Insufficient available nodes")
        ({"min-available-clients": 2}, 2, "raise --min-clients to 3"),
        ({"secagg-num-shares": "abc"}, 2, "secagg-num-shares"),
        ({"task": "no-such-task"}, 2, "unknown federated task 'no-such-task'"),
        # the devices' training settings, checked under the toy task too (it ignores them)
        ({"task": "toy-linear", "lr": -1.0}, 2, "lr and personal-lr must be finite numbers > 0"),
        ({"task": "toy-linear", "batch-size": 0}, 2, "batch-size must be >= 1, got 0"),
        ({"task": "toy-linear", "local-epochs": 10**6}, 2, "local-epochs must be <= 1,000"),
        ({"task": "toy-linear", "device": "tpu"}, 2, "device must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_server_start_refuses_what_the_server_app_would_before_launching(
    tmp_path: Path, overrides: dict[str, Any], rounds: int, message: str
) -> None:
    """A setting the ServerApp refuses would only show as a failed run, its reason inside
    the ServerApp's log, and every restart would submit it again: refused before launch."""
    layout = init_state_dir(tmp_path / "s")
    with pytest.raises(ConfigError, match=message):
        deployment_run_config(
            layout, bundle=None, num_rounds=rounds, overrides={"task": "toy-linear", **overrides}
        )


def test_a_deployment_without_secagg_needs_no_secagg_quorum(tmp_path: Path) -> None:
    """`fedrec server start --no-secagg --min-clients 2` was refused by the SecAgg+ quorum
    check, pointing at a threshold that has no effect without SecAgg+."""
    layout = init_state_dir(tmp_path / "s")
    plain = {"task": "toy-linear", "secagg": False, "min-available-clients": 2}
    config = deployment_run_config(layout, bundle=None, num_rounds=2, overrides=plain)
    assert config["secagg"] is False and config["min-available-clients"] == 2


def test_server_start_refuses_a_checkpoint_the_server_app_could_not_resume(
    tmp_path: Path,
) -> None:
    from server.checkpoint import CheckpointStore
    from server.server_app import ServerConfig, build_strategy
    from shared.federated.task import get_task

    layout = init_state_dir(tmp_path / "s")
    toy = {"task": "toy-linear"}
    config = deployment_run_config(layout, bundle=None, num_rounds=3, overrides=toy)
    server = ServerConfig.from_run_config(config)
    params = get_task("toy-linear", config).initial_parameters()
    state = build_strategy(server, params).state_dict()
    CheckpointStore(layout.checkpoints).save(2, params, state, None)
    deployment_run_config(layout, bundle=None, num_rounds=5, overrides=toy)  # resumable
    for overrides, message in (
        ({"server-optimizer": "adam"}, "trained with server-optimizer='avg'"),
        ({"user-dp": True, "population-size": 4}, "trained without user-level DP"),
        ({"toy-dim": 3}, "does not fit task"),
    ):
        with pytest.raises(ConfigError, match=message):
            deployment_run_config(layout, bundle=None, num_rounds=5, overrides=toy | overrides)


@pytest.mark.parametrize(("key", "value"), [("num-threads", 0), ("eval-negatives", -5)])
def test_server_start_refuses_a_student_setting_the_devices_would_fail_on(
    tmp_path: Path, key: str, value: int
) -> None:
    """Found only on the devices, after the run had "completed" with every device failed."""
    layout = init_state_dir(tmp_path / "s")
    bundle = tmp_path / "bundle.pt"
    bundle.write_bytes(b"checked after the settings")
    with pytest.raises(ConfigError, match=f"'{key}' must be >= 1, got {value}"):
        deployment_run_config(layout, bundle=bundle, num_rounds=1, overrides={key: value})


def test_server_start_refuses_a_bundle_holding_the_simulated_users_data(
    tmp_path: Path, write_tiny_bundle: Callable[[Path, int], list[str]]
) -> None:
    """The README told operators to deploy runs/<name>/bundle.pt, which also holds every
    simulated user's history (for ml-100k, MovieLens users' ratings): every device got it."""
    import numpy as np

    from shared.federated.bundle import ClientData, load_bundle, save_bundle

    layout = init_state_dir(tmp_path / "s")
    model_only = tmp_path / "deploy-bundle.pt"
    write_tiny_bundle(model_only, 6)
    loaded = load_bundle(model_only)
    seqs = [np.array([0, 1, 2]), np.array([3, 4])]
    with_users = tmp_path / "bundle.pt"
    clients = ClientData(seqs, np.array([2, 4]), np.array([1, 3]), seqs)
    save_bundle(with_users, loaded.student, clients, loaded.item_ids)
    with pytest.raises(ModelFileError, match=r"holds the simulated clients' data \(2 users"):
        deployment_run_config(layout, bundle=with_users, num_rounds=1, overrides={})
    config = deployment_run_config(layout, bundle=model_only, num_rounds=1, overrides={})
    assert config["bundle"] == str(model_only.resolve())


def test_a_cpu_server_may_run_a_federation_of_gpu_devices(
    tmp_path: Path, write_tiny_bundle: Callable[[Path, int], list[str]]
) -> None:
    """`--device cuda` says where the clients train; it was resolved on the server, which
    refused it without a GPU of its own ("torch sees no GPU")."""
    layout = init_state_dir(tmp_path / "s")
    bundle = tmp_path / "deploy-bundle.pt"
    write_tiny_bundle(bundle, 6)
    config = deployment_run_config(
        layout, bundle=bundle, num_rounds=1, overrides={"device": "cuda"}
    )
    assert config["device"] == "cuda"  # what the devices get


def test_server_start_refuses_a_bundle_that_is_not_one(tmp_path: Path) -> None:
    layout = init_state_dir(tmp_path / "s")
    bundle = tmp_path / "bundle.pt"
    bundle.write_bytes(b"not a bundle")
    with pytest.raises(ModelFileError, match=r"not a readable .*deploy-bundle\.pt") as caught:
        deployment_run_config(layout, bundle=bundle, num_rounds=1, overrides={})
    assert "weights_only" not in str(caught.value)  # torch's advice to load it unsafely


def test_control_host_must_be_in_the_certificate(tmp_path: Path) -> None:
    layout = init_state_dir(tmp_path / "s", ["server", "10.0.0.5"])
    # the loopback names are always added: the SuperLink reaches its own executor there
    assert server_names(layout.pki) == ["server", "localhost", "10.0.0.5", "127.0.0.1"]
    assert control_host(layout, "0.0.0.0") == "127.0.0.1"
    assert control_host(layout, "server") == "server"
    with pytest.raises(ConfigError, match=r"not in the server certificate.*renew-cert --host 10"):
        control_host(layout, "10.9.9.9")
    # junk is named as junk (it was told to rerun init --force with the junk, unquoted)
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
        control_host(layout, "bad host")
    # a state made before that: listening on all addresses would leave every run pending
    create_pki(layout.pki.directory, ["server", "10.0.0.5"])
    with pytest.raises(ConfigError, match=r"does not name 127\.0\.0\.1.*--host server"):
        control_host(layout, "0.0.0.0")
    assert control_host(layout, "10.0.0.5") == "10.0.0.5"
    # listening on every IPv6 address, the executor connects through ::1, which init adds
    # only when asked: the error says so
    with pytest.raises(ConfigError, match=r"does not name ::1.*--host \.\.\. --host ::1"):
        control_host(init_state_dir(tmp_path / "v6", ["server"]), "::")
    assert control_host(init_state_dir(tmp_path / "v6b", ["server", "::1"]), "::") == "::1"
    # an IPv6 host is bracketed where Flower's CLI and gRPC take HOST:PORT ("::1:19194" was
    # refused by `flwr supernode ls`, and no run was ever submitted)
    from server.superlink import SuperLinkOptions, SuperLinkProcess

    v6 = SuperLinkProcess(
        init_state_dir(tmp_path / "v6c", ["server", "::1"]),
        SuperLinkOptions(host="::1", port=19194),
    )
    assert (v6.host, v6.address) == ("::1", "[::1]:19194")


def test_a_bracketed_ipv6_listen_host_is_the_address_itself(tmp_path: Path) -> None:
    """`server init --host [::1]` takes the brackets (the SAN is ::1), but `server start
    --host [::1]` kept them: the port probe called the address unresolvable ("--host [::1]
    does not resolve on this machine"), and Flower would have been given "[[::1]]:PORT".
    The brackets are dropped, as init does."""
    from server.superlink import SuperLinkOptions, SuperLinkProcess

    layout = init_state_dir(tmp_path / "s", ["server", "[::1]"])
    assert "::1" in server_names(layout.pki)
    process = SuperLinkProcess(layout, SuperLinkOptions(host="[::1]", port=19196))
    assert (process.host, process.address) == ("::1", "[::1]:19196")
    argv = process.argv()
    assert argv[argv.index("--host") + 1] == "::1"
    assert SuperLinkOptions(host="[::]").host == "::"


def test_a_superlink_log_the_disk_has_no_room_for_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The banner `server start` writes into logs/superlink.log failed on a full disk with
    an OSError naming no file, and again in the close's flush: a traceback ending in
    '[Errno 28] No space left on device'. It names the log now (the command line's one-line
    error), and no SuperLink is started."""
    import errno
    import io

    import server.superlink as superlink
    from server.superlink import SuperLinkOptions, SuperLinkProcess

    class FullDisk(io.RawIOBase):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    layout = init_state_dir(tmp_path / "s")
    process = SuperLinkProcess(layout, SuperLinkOptions(port=19198))
    monkeypatch.setattr(superlink, "open", FullDisk, raising=False)
    with pytest.raises(OSError) as caught:
        process.start()
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(layout.superlink_log)
    assert process.popen is None


def test_the_superlink_log_is_kept_under_max_log_bytes(tmp_path: Path) -> None:
    """`logs/superlink.log` was only ever appended to: the SuperLink logs calls of every
    device in every round (GetRun, GetFab, PushMessages...), for as long as a federation
    runs, and every start adds to it, until the server's disk was full. While `server
    start` follows a run it now keeps the log under `--max-log-bytes`, the oldest lines
    dropped; what this start wrote is still read from where it begins."""
    from server.superlink import ServerRunner, SuperLinkOptions, SuperLinkProcess

    layout = init_state_dir(tmp_path / "s")
    layout.superlink_log.write_bytes(b"INFO : [Fleet.GetRun] Requesting Run\n" * 10_000)
    options = SuperLinkOptions(port=19199, max_log_bytes=64 * 1024)
    process = SuperLinkProcess(layout, options)
    process._log_offset = layout.superlink_log.stat().st_size
    with layout.superlink_log.open("ab") as log:
        log.write(b"ERROR : this start's words\n")
    runner = ServerRunner(layout, options, {}, echo=lambda line: None)
    runner.superlink, runner.run_id = process, 7
    runner.cli = _StatusCli(lambda: "finished:completed")  # type: ignore[assignment]
    process.alive = lambda: True  # type: ignore[method-assign]
    process.remember_descendants = lambda: None  # type: ignore[method-assign]
    runner._follow()
    data = layout.superlink_log.read_bytes()
    assert len(data) <= 64 * 1024 and data.startswith(b"INFO : [Fleet.GetRun]")
    assert data[process._log_offset :] == b"ERROR : this start's words\n"
    with pytest.raises(ConfigError, match="--max-log-bytes"):
        SuperLinkOptions(max_log_bytes=100)


class _AliveSuperLink:
    """A SuperLink that stays up, for ``ServerRunner._follow``."""

    def alive(self) -> bool:
        return True

    def remember_descendants(self) -> None:
        pass

    def trim_log(self) -> None:
        pass


class _StatusCli:
    """The ``flwr`` calls ``ServerRunner._follow`` makes: the run's status from ``status``."""

    def __init__(self, status: Callable[[], str]) -> None:
        self.status = status

    def run_status(self, run_id: int) -> str:
        return self.status()

    def save_log(self, run_id: int, path: Path) -> None:
        pass


def test_a_run_no_executor_picks_up_is_reported_not_waited_for(tmp_path: Path) -> None:
    from server.superlink import RunFailedError, ServerRunner, SuperLinkOptions

    layout = init_state_dir(tmp_path / "s")
    options = SuperLinkOptions(status_interval_s=0.01, pending_timeout_s=1.0)
    runner = ServerRunner(layout, options, {}, echo=lambda line: None)
    statuses = iter(["pending", "starting", "running", "finished:completed"])

    runner.superlink, runner.run_id = _AliveSuperLink(), 7  # type: ignore[assignment]
    runner.cli = _StatusCli(lambda: next(statuses))  # type: ignore[assignment]
    assert runner._follow() == 0  # a run that starts is followed to its end
    runner.cli = _StatusCli(lambda: "pending")  # type: ignore[assignment]
    started = time.monotonic()
    with pytest.raises(RunFailedError, match=r"run 7 is still pending after 1 s.*superlink"):
        runner._follow()
    assert time.monotonic() - started < 30
    # a run whose every round failed "completed" with exit status 0: it now says so, and 1
    lines: list[str] = []
    runner.echo = lines.append

    def finish_with_nothing_learned() -> str:
        with layout.progress.open("a") as f:
            # a round an earlier process trained, written from its checkpoint at this start,
            # is not this run's: it does not make this run a success
            backfilled = {"round": 1, "num_rounds": 3, "updated": True, "backfilled": True}
            f.write(json.dumps(backfilled) + "\n")
            for r in (2, 3):
                f.write(json.dumps({"round": r, "num_rounds": 3, "updated": False}) + "\n")
        return "finished:completed"

    runner.cli = _StatusCli(finish_with_nothing_learned)  # type: ignore[assignment]
    assert runner._follow() == 1
    assert "no round changed the global model" in lines[-1]
    # a run that ran no round with rounds left (its privacy budget spent before round 1)
    # "completed" with exit status 0 too
    runner.run_config = {"num-rounds": 5}
    runner.cli = _StatusCli(lambda: "finished:completed")  # type: ignore[assignment]
    assert runner._follow() == 1
    assert "completed without running a round, with 5 of its rounds still to run" in lines[-1]
    # with every round checkpointed already there is nothing left to run: a success
    import numpy as np

    from server.checkpoint import CheckpointStore

    CheckpointStore(layout.checkpoints).save(5, [np.zeros(2, dtype=np.float32)], {}, None, {})
    assert runner._follow() == 0 and lines[-1] == "run 7 completed"
    # and a start then launches nothing: it said "resuming", started a SuperLink, submitted
    # a run and reported it completed
    runner._run = lambda: pytest.fail("launched with nothing left to run")  # type: ignore[method-assign]
    assert runner.run() == 0
    assert lines[-1] == (
        "all 5 rounds are done (the checkpoint of round 5); nothing to run. Give more --rounds "
        "to continue the run"
    )


def test_the_end_of_a_run_is_noticed_soon_after_its_final_round(tmp_path: Path) -> None:
    """`server start` checked the run's status (a `flwr ls` process) every 5 s, after the
    last round too: it noticed a run that had ended up to 5 s late (measured in the
    deployment test: 6 s from the last round's line to the run's log saved). Once the
    final round is recorded, it checks every ``final_status_interval_s`` (0.5 s)."""
    from server.superlink import ServerRunner, SuperLinkOptions

    layout = init_state_dir(tmp_path / "s")
    options = SuperLinkOptions(status_interval_s=10.0)
    runner = ServerRunner(layout, options, {}, echo=lambda line: None)
    checks: list[float] = []

    def status() -> str:
        checks.append(time.monotonic())
        if len(checks) == 1:  # the run goes on, and records its last round
            with layout.progress.open("a") as f:
                f.write(json.dumps({"round": 1, "num_rounds": 2, "clients_ok": 1}) + "\n")
                f.write(json.dumps({"round": 2, "num_rounds": 2, "clients_ok": 1}) + "\n")
            return "running"
        return "finished:completed"

    runner.superlink, runner.run_id = _AliveSuperLink(), 7  # type: ignore[assignment]
    runner.cli = _StatusCli(status)  # type: ignore[assignment]
    started = time.monotonic()
    assert runner._follow() == 0
    assert time.monotonic() - started < 3, checks


def test_following_a_run_reads_only_the_rounds_recorded_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`server start` read and parsed the whole of `progress.jsonl` (every round of every
    run, kept for good) twice a second while it followed a run: on a federation of many
    rounds each poll cost more (0.3 s for 20,000 rounds). It now reads only what was
    appended since, and says the same."""
    from server.superlink import ServerRunner, SuperLinkOptions

    layout = init_state_dir(tmp_path / "s")
    earlier = json.dumps({"round": 1, "num_rounds": 9, "updated": True}) + "\n"
    layout.progress.write_text(earlier * 3000 + '{"round": 2, "torn')  # a crash tore it
    options = SuperLinkOptions(status_interval_s=0.01, final_status_interval_s=0.01)
    lines: list[str] = []
    runner = ServerRunner(layout, options, {}, echo=lines.append)
    polls = iter(range(100))

    def status() -> str:
        n = next(polls)
        if n == 0:  # this run's rounds: the first is written in two parts
            with layout.progress.open("a") as f:
                f.write('\n{"round": 2, "num_rounds": 3, "updated": false')
            return "running"
        if n == 1:
            with layout.progress.open("a") as f:
                f.write(', "clients_ok": 0}\n')
                f.write(json.dumps({"round": 3, "num_rounds": 3, "updated": False}) + "\n")
            return "running"
        return "finished:completed"

    parsed: list[str] = []
    loads = json.loads

    def counting(text: str, *args: Any, **kwargs: Any) -> Any:
        parsed.append(text)
        return loads(text, *args, **kwargs)

    runner.superlink, runner.run_id = _AliveSuperLink(), 7  # type: ignore[assignment]
    runner.cli = _StatusCli(status)  # type: ignore[assignment]
    monkeypatch.setattr(json, "loads", counting)
    assert runner._follow() == 1
    monkeypatch.undo()
    assert len(parsed) < 10, len(parsed)
    assert [line.split(",")[0] for line in lines[:2]] == ["round 2/3", "round 3/3"]
    assert "no round changed the global model" in lines[-1]


def test_a_node_with_a_device_dir_trains_on_that_device() -> None:
    server = {"task": STUDENT_TASK, "bundle": "/server/b.pt", "state-dir": "/server/t", "lr": 0.1}
    assert node_run_config(server, {"partition-id": 3}) == server  # simulation: unchanged
    device = node_run_config(
        server, {"fedrec-device-dir": "/dev/state", "fedrec-bundle": "/dev/b.pt"}
    )
    assert device["task"] == "client.device.training:make_device_task"
    assert (device["state-dir"], device["bundle"], device["lr"]) == ("/dev/state", "/dev/b.pt", 0.1)


def test_progress_lines_and_status_json(tmp_path: Path) -> None:
    layout = init_state_dir(tmp_path / "s")
    record = {
        "round": 2,
        "num_rounds": 5,
        "clients_ok": 3,
        "clients_sampled": 4,
        "clients_declined": 0,
        "clients_failed": 1,
        "eval_loss": 0.5,
        "eval_metrics": {"sampled_hr@10": 0.25},
        "epsilon_record_mean": 1.5,
        "epsilon_user": None,
        "round_seconds": 3.0,
    }
    line = format_round(record)
    assert "round 2/5" in line and "3/4 ok" in line and "sampled_hr@10 0.2500" in line
    assert "epsilon 1.500" in line and line.endswith("3.0 s")
    assert format_round({**record, "round_seconds": "5"}).endswith("n/a s")  # was a traceback
    assert "clipped" not in line  # a round the server clipped no update of
    assert "(0 declined, 1 failed, 2 clipped)" in format_round({**record, "clients_clipped": 2})
    layout.progress.write_text(json.dumps(record) + "\n{torn")
    # a manifest that does not verify is no resume point (the ServerApp would skip it)
    (layout.checkpoints / "round-00000002.json").write_text("{}")
    asked = ["server", "status", "--state-dir", str(layout.state_dir)]
    result = runner.invoke(app, [*asked, "--format", "json"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, [*asked, "--json"]).output == result.output  # the older spelling
    status = json.loads(result.output[result.output.index("{") :])
    assert status["checkpoint_round"] is None and status["last"]["round"] == 2
    assert status["num_rounds"] == 5 and status["running"] is False
    # every checkpoint damaged: `start` refuses to start over, so status never says "none yet"
    assert "are invalid" in status["checkpoint_problem"]
    text = runner.invoke(app, ["server", "status", "--state-dir", str(layout.state_dir)])
    assert "checkpoint: none usable:" in text.output and "none yet" not in text.output


def test_status_reads_past_stray_files_and_a_left_over_running_file(tmp_path: Path) -> None:
    layout = init_state_dir(tmp_path / "s")
    for name in ("model-v2.int8.onnx", "model-v10.int8.onnx", "model-v3-backup.int8.onnx"):
        (layout.artifacts / name).write_bytes(b"")
    (layout.artifacts / "model-v.int8.onnx").write_bytes(b"")
    (layout.checkpoints / "round-5.json").write_text("{}")  # not a checkpoint store name
    layout.progress.write_text(json.dumps({"round": 1}) + "\n")  # no num_rounds
    # left by a server killed with SIGKILL (its own pid is alive: this test's process)
    layout.running.write_text(json.dumps({"pid": os.getpid(), "address": "127.0.0.1:9093"}))
    layout.server_lock.touch()
    status = server_status(layout)
    assert status.latest_artifact == "model-v10.int8.onnx" and status.checkpoint_round is None
    assert status.num_rounds is None and status.last == {"round": 1}
    assert status.running is False and live_cli(layout) is None
    for bad in ('{"pid": null}', '{"pid": "abc"}', "[1]"):
        layout.running.write_text(bad)
        assert server_status(layout).running is False
    layout.registry.write_text("[]")
    with pytest.raises(DataError, match="malformed"):
        server_status(layout)


def test_status_shows_the_total_of_the_run_in_progress(tmp_path: Path) -> None:
    """A run of 3 rounds, resumed with --rounds 6: until its round 4 ends, the last progress
    line is the first start's round 3/3, and status showed 3 rounds in all."""
    from server.superlink import ServerRunner, SuperLinkOptions

    layout = init_state_dir(tmp_path / "s")
    layout.progress.write_text(json.dumps({"round": 3, "num_rounds": 3}) + "\n")
    args = ["server", "status", "--state-dir", str(layout.state_dir)]
    assert server_status(layout).num_rounds == 3  # no server runs: the last line's
    server = ServerRunner(layout, SuperLinkOptions(), {"num-rounds": 6}, echo=lambda _: None)
    with hold_server_lock(layout):
        server._write_running(ready=True)
        assert server_status(layout).num_rounds == 6
        shown = runner.invoke(app, [*args, "--json"]).output
        assert json.loads(shown[shown.index("{") :])["num_rounds"] == 6
        assert "last round: round 3/6" in runner.invoke(app, args).output


class _FailedRunCli(_StatusCli):
    """A run that failed, its ServerApp's log saved as ``flwr log`` shows it."""

    def __init__(self, log: str) -> None:
        super().__init__(lambda: "finished:failed")
        self.log = log

    def save_log(self, run_id: int, path: Path) -> None:
        path.write_text(self.log)


def test_a_failed_run_names_the_exception_that_ended_it(tmp_path: Path) -> None:
    """A checkpoint the server's disk had no room for failed the run: `server start` said
    only "run N ended as finished:failed; the ServerApp's log is in logs/run-N.log", the
    full disk somewhere in that log's traceback. The error names it now, with the fix."""
    from server.superlink import RunFailedError, ServerRunner, SuperLinkOptions

    layout = init_state_dir(tmp_path / "s")
    options = SuperLinkOptions(status_interval_s=0.01)
    runner = ServerRunner(layout, options, {}, echo=lambda line: None)
    runner.superlink, runner.run_id = _AliveSuperLink(), 7  # type: ignore[assignment]
    npz = "/srv/checkpoints/round-00000001.npz"
    log = (
        "\x1b[92mINFO \x1b[0m:      [ROUND 1]\n"
        "Traceback (most recent call last):\n"
        '  File "/app/shared/io.py", line 183, in write_bytes_atomic\n'
        "OSError: [Errno 28] No space left on device\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "Traceback (most recent call last):\n"
        f"OSError: [Errno 28] No space left on device: '{npz}'\n"
        "\x1b[91mERROR \x1b[0m:     Exit Code: 201\n"
        "An unhandled exception occurred in the ServerApp.\n"
    )
    runner.cli = _FailedRunCli(log)  # type: ignore[assignment]
    with pytest.raises(RunFailedError) as failed:
        runner._follow()
    message = str(failed.value)
    assert message.startswith(
        f"run 7 ended as finished:failed (OSError: [Errno 28] No space left on device: "
        f"'{npz}': free space on that disk); the ServerApp's log is in "
    )
    assert "\n" not in message
    runner.cli = _FailedRunCli("no exception here\n")  # type: ignore[assignment]
    with pytest.raises(RunFailedError, match=r"^run 7 ended as finished:failed; the Server"):
        runner._follow()


class _RunLogCli(_StatusCli):
    """Runs listed and their logs saved (``flwr ls``, ``flwr log``), stops recorded."""

    def __init__(self, runs: list[dict[str, Any]]) -> None:
        super().__init__(lambda: "finished:completed")
        self.listed, self.saved, self.stopped = runs, list[int](), list[int]()

    def runs(self) -> list[dict[str, Any]]:
        return self.listed

    def save_log(self, run_id: int, path: Path) -> None:
        self.saved.append(run_id)
        path.write_text(f"run {run_id}\n")

    def stop(self, run_id: int) -> None:
        self.stopped.append(run_id)


def test_only_the_newest_run_logs_are_kept(tmp_path: Path) -> None:
    """`logs/run-ID.log` was written for every run a start submitted and never removed:
    logs/ grew with the number of starts. The newest `--max-run-logs` are kept; the log of
    the run followed and those a start points at are never removed, and an old run's log
    removed is not saved again by the next start."""
    from server.superlink import ServerRunner, SuperLinkOptions

    layout = init_state_dir(tmp_path / "s")
    for age, run_id in enumerate([1, 2, 3, 4, 5, 9]):
        log = layout.logs / f"run-{run_id}.log"
        log.write_text("old\n")
        os.utime(log, (1000 + age, 1000 + age))
    options = SuperLinkOptions(status_interval_s=0.01, max_run_logs=3)
    runner = ServerRunner(layout, options, {}, echo=lambda line: None)
    runner.superlink, runner.run_id = _AliveSuperLink(), 9  # type: ignore[assignment]
    runner.cli = _RunLogCli([])  # type: ignore[assignment]
    assert runner._follow() == 0
    kept = {p.name for p in layout.logs.glob("run-*.log")}
    assert kept == {"run-4.log", "run-5.log", "run-9.log"}
    # a start saves the log of a stale run, and not those of old finished runs it removed
    runs = [
        {"run-id": str(i), "status": "finished:completed", "pending-at": f"2026-01-0{i}"}
        for i in (1, 2, 3, 4, 5)
    ]
    runs.append({"run-id": "6", "status": "running", "pending-at": "2026-01-06"})
    runs[0]["status"] = "running"  # a stale run whose old log is named: kept too
    (layout.logs / "run-1.log").write_text("old\n")
    os.utime(layout.logs / "run-1.log", (1, 1))
    cli = _RunLogCli(runs)
    lines: list[str] = []
    runner = ServerRunner(layout, options, {}, echo=lines.append)
    runner.cli = cli  # type: ignore[assignment]
    runner._handle_stale_runs()
    assert cli.saved == [6] and cli.stopped == [1, 6]
    assert lines[-1] == f"stopped stale run 6 (running); its log is in {layout.logs / 'run-6.log'}"
    assert {p.name for p in layout.logs.glob("run-*.log")} == {
        "run-1.log",
        "run-5.log",
        "run-6.log",
        "run-9.log",
    }
    with pytest.raises(ConfigError, match="--max-run-logs"):
        SuperLinkOptions(max_run_logs=0)


def test_a_run_log_the_full_disk_has_no_room_for_is_not_pointed_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saving the ServerApp's log (`flwr log`) failed silently on a full logs/ disk, and the
    error then said "the ServerApp's log is in logs/run-7.log", a file never written. It
    says the log could not be saved, and why."""
    import errno

    import server.superlink as superlink
    from server.superlink import FlwrCli, RunFailedError, ServerRunner, SuperLinkOptions

    class FailedRunFlwr(FlwrCli):
        def run_status(self, run_id: int) -> str:
            return "finished:failed"

    def flwr_log(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.CompletedProcess(argv, 0, b"OSError: [Errno 28] ...\n", b"")

    def full_disk(path: Path, data: bytes, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(superlink.subprocess, "run", flwr_log)
    monkeypatch.setattr(superlink, "write_bytes_atomic", full_disk)
    layout = init_state_dir(tmp_path / "s")
    runner = ServerRunner(layout, SuperLinkOptions(status_interval_s=0.01), {}, echo=print)
    runner.superlink, runner.run_id = _AliveSuperLink(), 7  # type: ignore[assignment]
    runner.cli = FailedRunFlwr(layout)
    with pytest.raises(RunFailedError) as failed:
        runner._follow()
    message = str(failed.value)
    run_log = layout.logs / "run-7.log"
    assert not run_log.exists()
    assert "log is in" not in message and "\n" not in message
    assert f"could not be saved to {run_log} (No space left on device: free space" in message


def test_status_says_how_a_start_that_did_not_complete_ended(tmp_path: Path) -> None:
    """A run of 3 rounds, started again with --rounds 6, and that start failed (or was
    stopped, or killed) before a round ended: status said "not running" with the progress
    file's last line, round 3/3, as for a completed run. It says how that start ended, out
    of the rounds it asked for."""
    from server.superlink import RunFailedError, ServerRunner, SuperLinkOptions

    layout = init_state_dir(tmp_path / "s")
    layout.progress.write_text(json.dumps({"round": 3, "num_rounds": 3}) + "\n")
    args = ["server", "status", "--state-dir", str(layout.state_dir)]
    server = ServerRunner(layout, SuperLinkOptions(), {"num-rounds": 6}, echo=lambda _: None)

    def fail() -> int:
        raise RunFailedError("run 7 ended as finished:failed; the log is in logs/run-7.log")

    server._run = fail  # type: ignore[method-assign]
    with pytest.raises(RunFailedError):
        server.run()
    status = server_status(layout)
    assert status.running is False and status.num_rounds == 6
    assert status.last_start is not None and status.last_start["error"].startswith("run 7")
    shown = runner.invoke(app, args).output
    assert "not running: the last start (6 rounds, begun " in shown
    assert "failed: run 7 ended as finished:failed" in shown
    assert "last round: round 3/6" in shown
    # while a start runs, status is the running server's; one that completes adds nothing
    during: dict[str, Any] = {}

    def complete() -> int:
        during.update(json.loads(layout.last_start.read_text()))
        assert server_status(layout).running and server_status(layout).last_start is None
        return 0

    server._run = complete  # type: ignore[method-assign]
    assert server.run() == 0
    assert "not running\n" in runner.invoke(app, args).output
    server._run = lambda: 130  # type: ignore[method-assign]
    assert server.run() == 130
    assert "the last start (6 rounds, begun " in runner.invoke(app, args).output
    assert ") was stopped\n" in runner.invoke(app, args).output
    layout.last_start.write_text(json.dumps(during))  # as a start killed mid-run leaves it
    assert "did not finish: it was killed" in runner.invoke(app, args).output
    # every round done already: nothing to run, and an earlier start's end is not news
    server.run_config = {"num-rounds": 0}
    assert server.run() == 0 and server_status(layout).last_start is None
    assert server_status(layout).num_rounds == 3


@pytest.mark.parametrize("started", ["Infinity", "NaN", "1e20", "-1e20"])
def test_status_leaves_out_a_start_time_that_is_no_time(tmp_path: Path, started: str) -> None:
    """A damaged or hand-edited last-start.json whose "started" is no time a clock can show
    (json reads Infinity and NaN) made `fedrec server status` fail with an OverflowError
    traceback; it is left out, as a "num_rounds" that is not a count is."""
    layout = init_state_dir(tmp_path / "s")
    layout.last_start.write_text(f'{{"num_rounds": 6, "started": {started}}}')
    result = runner.invoke(app, ["server", "status", "--state-dir", str(layout.state_dir)])
    assert result.exit_code == 0, result.output
    assert "not running: the last start (6 rounds) did not finish" in result.output


@pytest.mark.parametrize("code", ["Infinity", "NaN", "2.5", '"7"', "null"])
def test_status_leaves_out_an_exit_status_that_is_no_integer(tmp_path: Path, code: str) -> None:
    """A damaged or hand-edited last-start.json whose "exit_code" is not an integer made
    `fedrec server status` say "ended with exit status inf"; it is left out, as a
    "started" that is no time is."""
    from server.state import describe_last_start

    record = json.loads(f'{{"num_rounds": 6, "ended": 5.0, "exit_code": {code}}}')
    said = describe_last_start(record)
    assert said == "the last start (6 rounds) ended (its log is in logs/)", said
    record["exit_code"] = 3
    assert describe_last_start(record) == (
        "the last start (6 rounds) ended with exit status 3 (its log is in logs/)"
    )


def test_one_server_per_state_directory(tmp_path: Path) -> None:
    layout = init_state_dir(tmp_path / "s")
    with hold_server_lock(layout):
        assert running_server(layout) is not None  # held: running, before running.json
        shown = runner.invoke(app, ["server", "status", "--state-dir", str(layout.state_dir)])
        assert "server" in shown.output and ": starting" in shown.output  # not "pid None"
        assert "None" not in shown.output.splitlines()[0]
        with pytest.raises(StateDirError, match="a server already runs"), hold_server_lock(layout):
            pass
        # `init --force` named a starting server "pid None"; it names the lock's holder
        with pytest.raises(StateDirError, match=rf"a server is running.*\(pid {os.getpid()}\)"):
            init_state_dir(layout.state_dir, force=True)
    assert running_server(layout) is None  # released with the process (here: the block)


def test_responsive_grid_returns_replies_as_they_arrive_and_honours_the_timeout() -> None:
    from types import SimpleNamespace

    from server.grid import ResponsiveGrid

    class Slow:
        """Replies to message i after i+1 pulls; never to 'silent'."""

        def __init__(self) -> None:
            self.pulls = 0

        def push_messages(self, messages: Any) -> list[str]:
            return list(messages)

        def pull_messages(self, ids: Any) -> list[Any]:
            self.pulls += 1
            ready = [i for i in ids if i != "silent" and int(i) < self.pulls]
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]

    inner = Slow()
    grid = ResponsiveGrid(inner, min_poll_s=0.01, max_poll_s=0.01)  # type: ignore[arg-type]
    replies = list(grid.send_and_receive(["0", "1", "2"], timeout=5))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["0", "1", "2"]
    assert inner.pulls == 3
    started = time.monotonic()
    partial = list(grid.send_and_receive(["0", "silent"], timeout=0.2))
    assert [r.metadata.reply_to_message_id for r in partial] == ["0"]
    assert 0.2 <= time.monotonic() - started < 2


def test_responsive_grid_backs_off_while_waiting_and_polls_fast_after_a_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    import server.grid
    from server.grid import ResponsiveGrid

    class Clock:
        """Virtual time: sleeping advances it, nothing else does."""

        now = 0.0

        def monotonic(self) -> float:
            return self.now

        def sleep(self, seconds: float) -> None:
            self.now += seconds

    clock = Clock()
    monkeypatch.setattr(server.grid, "time", clock)

    class Timed:
        """Reply i lands at ready[i] seconds after the push."""

        def __init__(self, ready: dict[str, float]) -> None:
            self.ready, self.pulls, self.pushed = ready, 0, 0.0

        def push_messages(self, messages: Any) -> list[str]:
            self.pushed = clock.now
            return list(messages)

        def pull_messages(self, ids: Any) -> list[Any]:
            self.pulls += 1
            return [
                SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                for i in ids
                if self.ready[i] <= clock.now - self.pushed
            ]

    slow = Timed({"a": 6.0})
    grid = ResponsiveGrid(slow, min_poll_s=0.01, max_poll_s=1.0)  # type: ignore[arg-type]
    assert len(list(grid.send_and_receive(["a"], timeout=60))) == 1
    assert 6.0 <= clock.now < 7.0  # seen at most one max wait late
    assert slow.pulls <= 15  # waits 0.01, 0.02, ..., 0.64, then 1 s: a fixed poll pulls 600x

    clock.now = 0.0
    spread = Timed({"a": 0.5, "c": 3.0})
    grid = ResponsiveGrid(spread, min_poll_s=0.01, max_poll_s=2.0)  # type: ignore[arg-type]
    assert len(list(grid.send_and_receive(["a", "c"], timeout=60))) == 2
    # seeing "a" at 0.63 s resets the wait: "c" is seen at 3.19 s; had the wait kept
    # doubling from the push, the pulls would fall at 2.55 s and 4.55 s
    assert 3.0 <= clock.now < 3.5

    clock.now = 0.0
    silent = Timed({"a": 0.0, "b": 100.0})
    grid = ResponsiveGrid(silent, min_poll_s=0.01, max_poll_s=2.0)  # type: ignore[arg-type]
    assert len(list(grid.send_and_receive(["a", "b"], timeout=5))) == 1
    assert clock.now == pytest.approx(5.0)  # the last wait is cut to the deadline
    with pytest.raises(ValueError, match="min_poll_s"):
        ResponsiveGrid(spread, min_poll_s=0.5, max_poll_s=0.1)  # type: ignore[arg-type]


def test_start_warns_when_fewer_devices_are_registered_than_a_round_waits_for(
    tmp_path: Path,
) -> None:
    from server.superlink import ServerRunner, SuperLinkOptions

    layout = init_state_dir(tmp_path / "s")
    lines: list[str] = []
    config: dict[str, Any] = {"min-available-clients": 2}
    runner = ServerRunner(layout, SuperLinkOptions(), config, echo=lines.append)
    runner._warn_if_too_few_devices()
    assert "waits for 2 devices" in lines[-1] and "0 are registered" in lines[-1]
    # SecAgg+'s default 5 shares / threshold 3: a round waits for 3, whatever --min-clients
    config = {"min-available-clients": 2, "secagg": True}
    runner = ServerRunner(layout, SuperLinkOptions(), config, echo=lines.append)
    runner._warn_if_too_few_devices()
    assert "waits for 3 devices (the fewest a SecAgg+ round completes with" in lines[-1]


def test_a_server_run_stopped_by_sigterm_exits_143_and_by_ctrl_c_130(tmp_path: Path) -> None:
    """SIGTERM (``kill``, ``docker stop``) ended `fedrec server start` with 130, Ctrl-C's
    status, where `fedrec simulate` and the shell's convention give 128 + 15. `fedrec server
    status` then reported such a stop as "ended with exit status 143", as for a failure."""
    import signal

    from server.superlink import ServerRunner, SuperLinkOptions

    for sig, status in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        layout = init_state_dir(tmp_path / str(sig))
        server = ServerRunner(layout, SuperLinkOptions(), {"num-rounds": 1}, echo=lambda _: None)

        def follow(sig: int = sig) -> int:
            os.kill(os.getpid(), sig)  # SIGINT: Python's own KeyboardInterrupt
            time.sleep(5)
            raise AssertionError("the signal did not stop the run")

        server._start_superlink = lambda: None  # type: ignore[method-assign]
        server._follow = follow  # type: ignore[method-assign]
        assert server.run() == status
        assert json.loads(layout.last_start.read_text())["exit_code"] == status
        # both are a stop (`docker stop` sends SIGTERM), not an exit status to look into
        shown = runner.invoke(app, ["server", "status", "--state-dir", str(layout.state_dir)])
        assert ") was stopped\n" in shown.output, shown.output


def test_superlink_restarts_count_deaths_in_a_row_not_in_a_lifetime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--max-restarts counted every SuperLink death of the server's life: one up for weeks,
    whose SuperLink died now and then between rounds, gave up for good at the fourth. A
    death after a round was checkpointed is no crash loop: the count starts again; deaths
    with no round in between still give up after --max-restarts."""
    from server import superlink as module
    from server.superlink import ServerRunner, SuperLinkError, SuperLinkOptions

    checkpointed = [0]
    monkeypatch.setattr(module, "resumable_round", lambda layout: checkpointed[0] or None)
    for progress, deaths in ((True, 4), (False, 2)):
        layout = init_state_dir(tmp_path / str(progress))
        lines: list[str] = []
        server = ServerRunner(
            layout, SuperLinkOptions(max_restarts=1), {"num-rounds": 9}, echo=lines.append
        )
        followed = [0]

        def follow(
            progress: bool = progress, deaths: int = deaths, followed: list[int] = followed
        ) -> int | None:
            followed[0] += 1
            if followed[0] > deaths:
                return 0  # the run finished
            checkpointed[0] += progress  # a round done, then the SuperLink died
            return None

        server._start_superlink = lambda: None  # type: ignore[method-assign]
        server._follow = follow  # type: ignore[method-assign]
        if progress:
            assert server.run() == 0
            assert sum("restarting it (1/1)" in line for line in lines) == deaths
        else:
            with pytest.raises(SuperLinkError, match="died 2 times; giving up"):
                server.run()


def test_a_server_run_puts_the_previous_sigterm_handler_back(tmp_path: Path) -> None:
    """`ServerRunner` answers SIGTERM by stopping its run; once the run ended, a SIGTERM in
    the same process (a library or test caller) raised KeyboardInterrupt from its handler."""
    import signal

    from server.superlink import ServerRunner, SuperLinkOptions

    layout = init_state_dir(tmp_path / "s")
    server = ServerRunner(layout, SuperLinkOptions(), {"num-rounds": 1}, echo=lambda _: None)
    during: list[object] = []

    def follow() -> int:
        during.append(signal.getsignal(signal.SIGTERM))
        return 0

    server._start_superlink = lambda: None  # type: ignore[method-assign]
    server._follow = follow  # type: ignore[method-assign]

    def caller(signum: int, frame: object) -> None:
        """What the caller had installed."""

    previous = signal.signal(signal.SIGTERM, caller)
    try:
        assert server._run() == 0
        assert during == [server._on_signal]  # the run's own handler while it ran
        assert signal.getsignal(signal.SIGTERM) is caller
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_superlink_that_cannot_bind_its_port_is_reported_by_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port taken where the pre-start probe cannot see it (bound but not accepting, or on
    another address) made flower-superlink exit at once, and start said only "exited with
    status 1 during start-up; see superlink.log". It names the port now, and an earlier
    start's lines in the same log are not taken for this one's."""
    from server.superlink import SuperLinkOptions, SuperLinkProcess

    layout = init_state_dir(tmp_path / "s")
    layout.logs.mkdir(parents=True, exist_ok=True)
    message = {"text": "ERROR [uvicorn.error] [Errno 98] ... address already in use"}

    def argv(self: SuperLinkProcess) -> list[str]:
        return [sys.executable, "-c", f"print({message['text']!r}); raise SystemExit(1)"]

    monkeypatch.setattr(SuperLinkProcess, "argv", argv)
    process = SuperLinkProcess(layout, SuperLinkOptions(host="127.0.0.1", port=1))
    with pytest.raises(SuperLinkError, match=r"port 1 is already in use on 127\.0\.0\.1.*--port"):
        process.start()
    message["text"] = "ERROR boom: the database is locked"
    with pytest.raises(SuperLinkError, match=r"status 1 during start-up \(.*database is locked\)"):
        process.start()


def test_a_second_signal_while_stopping_leaves_no_superlink_running(tmp_path: Path) -> None:
    """A second Ctrl-C (or a SIGTERM) while `server start` stopped its SuperLink raised out
    of the stop, and start ended with the SuperLink (or what it had started) still running.
    The stop runs to its end now; the run's exit status is the first signal's."""
    import signal
    import threading

    from server.superlink import ServerRunner, SuperLinkOptions

    layout = init_state_dir(tmp_path / "s")
    server = ServerRunner(layout, SuperLinkOptions(), {"num-rounds": 1}, echo=lambda _: None)
    slow_to_stop = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(1.5)"
    )

    def start() -> None:
        server.superlink.popen = subprocess.Popen(
            [sys.executable, "-c", slow_to_stop], stdout=subprocess.PIPE, start_new_session=True
        )
        assert server.superlink.popen.stdout is not None
        server.superlink.popen.stdout.readline()  # its SIGTERM handler is in place

    def follow() -> int:
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C
        time.sleep(5)
        raise AssertionError("the signal did not stop the run")

    server._start_superlink = start  # type: ignore[method-assign]
    server._follow = follow  # type: ignore[method-assign]
    second = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    second.start()  # while the stop waits for the SuperLink
    try:
        assert server._run() == 130
    finally:
        second.cancel()
        proc = server.superlink.popen
        alive = proc is not None and proc.poll() is None
        if proc is not None and alive:
            proc.kill()
            proc.wait()
    assert not alive


def test_a_listen_host_this_machine_cannot_resolve_is_refused_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`server start --host NAME` with a certificate name only the devices resolve ended in
    a raw socket.gaierror traceback from the port probe; it is a ConfigError that says so."""
    import socket

    from server.superlink import SuperLinkOptions, SuperLinkProcess

    layout = init_state_dir(tmp_path / "s", ["fedrec.invalid"])

    def unresolvable(*args: object, **kwargs: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    process = SuperLinkProcess(layout, SuperLinkOptions(host="fedrec.invalid", port=19195))
    with pytest.raises(ConfigError, match=r"--host fedrec\.invalid does not resolve.*0\.0\.0\.0"):
        process.start()
    assert process.popen is None  # nothing was started


@pytest.mark.parametrize(
    ("overrides", "max_weight"),
    [
        ({}, 1.0),  # the devices train with DP by default: each reports weight 1
        ({"secagg-max-weight": 250.0}, 1.0),
        ({"dp": False, "secagg-max-weight": 250.0}, 250.0),  # example counts: as given
        ({"dp": False}, 1000.0),
    ],
)
def test_a_dp_deployments_secagg_quantizes_its_unit_weight_updates_at_full_precision(
    tmp_path: Path,
    write_tiny_bundle: Callable[[Path, int], list[str]],
    overrides: dict[str, Any],
    max_weight: float,
) -> None:
    """Under record-level DP every device reports weight 1 (its example count is not DP),
    and SecAgg+ scales an update by weight / max-weight before quantizing it: with the
    default max-weight 1000 each update went through a grid 1000 times coarser (a step of
    3.8e-3 per coordinate against DP noise of about 4.7e-3 per step) for nothing. Without
    DP the devices report their example counts, which max-weight must bound."""
    from server.server_app import ServerConfig

    layout = init_state_dir(tmp_path / "s")
    bundle = tmp_path / "deploy-bundle.pt"
    write_tiny_bundle(bundle, 6)
    config = deployment_run_config(layout, bundle=bundle, num_rounds=1, overrides=overrides)
    settings = ServerConfig.from_run_config(config).secagg_settings
    assert settings is not None and settings.max_weight == max_weight


def test_a_dp_deployments_secagg_rounding_is_far_below_its_dp_noise() -> None:
    """A unit-weight update through SecAgg+'s arithmetic (scaled by weight / max-weight,
    quantized with Flower's stochastic rounding, dequantized and divided by the weight
    again, as the client mod and the workflow do) keeps its values to far less than the
    DP noise one step of the devices' DP-SGD adds to each (lr z C / batch-size, 4.7e-3 at
    the defaults); at max-weight 1000 the rounding was of the same size as that noise."""
    import numpy as np
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from server.server_app import ServerConfig
    from shared.federated.local_config import LocalTrainConfig

    train = LocalTrainConfig()
    noise = train.lr * train.noise_multiplier * train.max_grad_norm / train.batch_size
    update = np.random.default_rng(0).normal(scale=noise, size=20_000)
    settings = ServerConfig.from_run_config({"task": STUDENT_TASK, "secagg": True}).secagg_settings
    assert settings is not None
    np.random.seed(0)  # Flower's stochastic rounding draws from numpy's global generator
    q = settings.quantization_range
    errors = {}
    for max_weight in (settings.max_weight, 1000.0):
        ratio = round(1 / max_weight * q) / q  # the client mod's dequantized weight
        (back,) = dequantize(
            quantize([update * ratio], settings.clipping_range, q), settings.clipping_range, q
        )
        errors[max_weight] = float(np.std(back / ratio - update))
    assert errors[1.0] < noise / 1000  # the deployment's: 1.6e-6
    assert errors[1000.0] > noise / 10  # what it was: 1.6e-3


def test_the_superlink_refuses_control_and_runtime_requests_from_other_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flower 1.42 serves the unauthenticated Control API (`flwr supernode register`, `flwr
    stop`) and runtime API on the devices' port: any host that reached it registered its own
    key and joined the federation without `register-client`. The SuperLink now runs behind
    a guard that answers those only to this machine; the Fleet API stays open to devices."""
    import asyncio

    import httpx
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from server.superlink import SuperLinkOptions, SuperLinkProcess
    from server.superlink_guard import LocalOnlyMiddleware, install, is_local_address

    argv = SuperLinkProcess(init_state_dir(tmp_path / "s"), SuperLinkOptions(port=19197)).argv()
    assert argv[:3] == [sys.executable, "-m", "server.superlink_guard"], argv

    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/{path:path}", ok, methods=["GET", "POST"])])
    guarded = LocalOnlyMiddleware(inner)  # type: ignore[arg-type]

    async def status(peer: str, path: str) -> int:
        transport = httpx.ASGITransport(app=guarded, client=(peer, 40000))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="https://srv") as client:
            return (await client.post(path)).status_code

    remote = "192.0.2.7"  # TEST-NET-1: no interface here holds it
    assert not is_local_address(remote) and is_local_address("127.0.0.1")
    assert is_local_address("::ffff:127.0.0.1") and not is_local_address("testclient")
    cases = {
        (remote, "/v1/control/register-supernode"): 403,
        (remote, "/v1/control/stop-run"): 403,
        (remote, "/v1/runtime/list-apps-to-launch"): 403,
        (remote, "/docs"): 403,
        (remote, "/v1/fleet/activate-node"): 200,
        (remote, "/health"): 200,
        ("127.0.0.1", "/v1/control/register-supernode"): 200,
        ("127.0.0.1", "/v1/runtime/list-apps-to-launch"): 200,
    }
    for (peer, path), expected in cases.items():
        assert asyncio.run(status(peer, path)) == expected, (peer, path)
    sent: list[dict[str, Any]] = []

    async def websocket(peer: str) -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "websocket.connect"}

        async def send(message: Any) -> None:
            sent.append(dict(message))

        scope = {"type": "websocket", "path": "/v1/control/x", "client": (peer, 1)}
        await guarded(scope, receive, send)

    asyncio.run(websocket(remote))
    assert sent == [{"type": "websocket.close", "code": 1008}]

    # installed through Flower's extension hook, outermost of the SuperLink app's middleware
    from flwr.superlink import extensions
    from flwr.superlink import main as superlink_main

    monkeypatch.setattr(extensions, "get_middleware", extensions.get_middleware)
    install()
    assert superlink_main._get_middleware()[0].cls is LocalOnlyMiddleware


def test_a_missing_clients_json_unregisters_no_device(tmp_path: Path) -> None:
    """A clients.json gone from a state directory (a restore that missed it, a slip of rm)
    read as an empty registry: `server start` unregistered every device's node as one
    "registered outside `fedrec server register-client`", and the SuperLink never takes an
    unregistered key back, so restoring the file left every device locked out while
    `status` listed them registered. The start is refused, and the SuperLink untouched."""
    from server.superlink import apply_registrations

    layout = init_state_dir(tmp_path / "s")
    link = _FlakySuperLink()
    link.registered[101] = "phone-0's key"
    layout.registry.unlink()
    with pytest.raises(DataError, match=r"clients\.json is missing.*restore it from a backup"):
        apply_registrations(layout, link)  # type: ignore[arg-type]
    assert list(link.registered) == [101]
    assert not layout.registry.exists()  # nothing written in its place
    # nor by register-client: a new registry of one key would unregister every other device
    key = tmp_path / "client.pub"
    key.write_text(init_identity(tmp_path / "d0").public_key_openssh)
    state = ["--state-dir", str(layout.state_dir)]
    result = runner.invoke(app, ["server", "register-client", str(key), *state])
    assert isinstance(result.exception, DataError), result.output
    assert not layout.registry.exists()
    # revoke-client said "no registered client" and status "0 registered": both say it is gone
    result = runner.invoke(app, ["server", "revoke-client", "phone-0", *state])
    assert isinstance(result.exception, DataError), result.output
    assert "clients.json is missing" in str(result.exception)
    assert not layout.registry.exists()
    status = server_status(layout)
    assert (
        status.clients_problem is not None and "clients.json is missing" in status.clients_problem
    )
    shown = runner.invoke(app, ["server", "status", *state])
    assert shown.exit_code == 0, shown.output
    line = next(x for x in shown.output.splitlines() if x.startswith("  clients:"))
    assert line.endswith("restore it from a backup") and "clients.json is missing" in line


def _one_device_and_a_superlink(tmp_path: Path) -> tuple[ServerLayout, _FlakySuperLink]:
    """A server state with one device (phone-0) in clients.json, and a SuperLink's CLI."""
    layout = init_state_dir(tmp_path / "s")
    with ClientRegistry.locked(layout.registry) as registry:
        public = init_identity(tmp_path / "d0").public_key_openssh
        registry.add(*load_public_key(public, source="key"), name="phone-0")
        registry.save()
    link = _FlakySuperLink()
    link.fail_unregister = False
    return layout, link


def test_a_device_unregistered_outside_fedrec_is_reported_locked_out(tmp_path: Path) -> None:
    """A device whose node was unregistered by hand (`flwr supernode unregister`) was reported
    "already registered" by every `server start` and `register-client`, as the SuperLink
    refuses its key as in use; the device stayed locked out with no word of it."""
    from server.superlink import apply_registrations

    layout, link = _one_device_and_a_superlink(tmp_path)
    assert apply_registrations(layout, link) == ["registered phone-0 as node 100"]  # type: ignore[arg-type]

    link.nodes = lambda: {100: "unregistered"}  # type: ignore[method-assign]

    def in_use(public_key_file: Path) -> int:
        raise SuperLinkError("`flwr supernode register` failed: public key already in use")

    link.register = in_use  # type: ignore[method-assign]
    done = apply_registrations(layout, link)  # type: ignore[arg-type]
    assert len(done) == 1 and "already registered" not in done[0], done
    assert "phone-0" in done[0] and "rotate-key" in done[0] and "node 100" in done[0]
    assert not ClientRegistry.load(layout.registry).clients[0].applied


def test_new_devices_are_registered_in_one_call_and_a_refused_key_blocks_no_other(
    tmp_path: Path,
) -> None:
    """`server start` ran one `flwr supernode register` process per new device (2.3 s
    each: most of an hour for 1,000), and the first key the SuperLink refused for any
    reason but "in use" stopped the registration of every device after it. All new keys go
    through one register_keys call (one process and connection); a refused key is reported,
    left unapplied in clients.json (retried at the next start), and the others are
    registered, each node id saved."""
    from server.superlink import apply_registrations

    layout = _state_with_devices(tmp_path, 3)
    phone_1 = ClientRegistry.load(layout.registry).clients[1].public_key
    link = _FlakySuperLink()
    calls: list[list[str]] = []
    register_keys = link.register_keys

    def one_call(public_keys: list[str]) -> Iterator[int | SuperLinkError]:
        calls.append(list(public_keys))
        return register_keys(public_keys)

    def register(public_key_file: Path) -> int:
        if public_key_file.read_text().strip() == phone_1:
            raise SuperLinkError("`flwr supernode register` failed: [code: 3] refused")
        return _FlakySuperLink.register(link, public_key_file)

    link.register_keys = one_call  # type: ignore[method-assign]
    link.register = register  # type: ignore[method-assign]
    done = apply_registrations(layout, link)  # type: ignore[arg-type]
    assert len(calls) == 1 and len(calls[0]) == 3
    assert done[0] == "registered phone-0 as node 100" and done[2].startswith("registered phone-2")
    assert done[1].startswith("could not register phone-1") and "[code: 3] refused" in done[1]
    saved = ClientRegistry.load(layout.registry).clients
    assert [(c.node_id, c.applied) for c in saved] == [(100, True), (None, False), (101, True)]
    link.register = lambda public_key_file: _FlakySuperLink.register(link, public_key_file)  # type: ignore[method-assign]
    assert apply_registrations(layout, link) == ["registered phone-1 as node 102"]  # type: ignore[arg-type]
    assert calls[-1] == [phone_1]  # only the one left


def test_register_keys_reports_a_superlink_it_cannot_reach_for_all_keys(tmp_path: Path) -> None:
    """The registering process (server.flwr_register) that cannot connect (here: no
    connection written yet) fails the registration as a whole, with Flower's reason, and
    registers nothing: not a key-by-key refusal."""
    from server.superlink import FlwrCli

    layout = init_state_dir(tmp_path / "s")
    keys = [init_identity(tmp_path / f"d{i}").public_key_openssh for i in range(2)]
    results = FlwrCli(layout, timeout_s=60).register_keys(keys)
    with pytest.raises(SuperLinkError, match=r"^`flwr supernode register` failed: An une"):
        next(results)  # Flower's own message, not a traceback
    with pytest.raises(StopIteration):
        next(results)


def test_a_node_no_device_in_clients_json_holds_is_unregistered(tmp_path: Path) -> None:
    """A key registered with the SuperLink outside `register-client` (by hand with `flwr
    supernode register`, or by another host through the Control API before the SuperLink
    refused that) stayed registered through every `server start`: that device kept joining
    rounds, and neither `server status` nor `revoke-client` could name it. `clients.json` is
    the source of truth: such a node is unregistered; none is while an active device's key
    may be held under a node id the registry does not know (it could be that one)."""
    from server.superlink import apply_registrations

    layout, link = _one_device_and_a_superlink(tmp_path)
    link.registered[7] = "an intruder's key"
    done = apply_registrations(layout, link)  # type: ignore[arg-type]
    assert list(link.registered) == [101], done
    assert any("node 7" in line and "clients.json" in line for line in done), done

    # phone-0's key held under an id the registry lost: the unknown node may be its own
    link.registered = {7: "phone-0's key, or not", 101: "the id the registry knows"}
    with ClientRegistry.locked(layout.registry) as registry:
        registry.clients[0].node_id = None
        registry.save()

    def already(public_key_file: Path) -> int:
        raise SuperLinkError("`flwr supernode register` failed: public key already in use")

    link.register = already  # type: ignore[method-assign]
    done = apply_registrations(layout, link)  # type: ignore[arg-type]
    assert sorted(link.registered) == [7, 101], done
    assert any("node 7" in line and "flwr supernode ls" in line for line in done), done


def test_the_server_starts_flower_by_absolute_paths_from_a_relative_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SuperLink, the `flwr` calls and the registering process run in the state folder;
    started through a relative PATH entry (``PATH=.venv/bin``), Python's ``sys.executable``
    is relative and named no file there, so `server start` could not start the SuperLink."""
    import os

    from server.superlink import SuperLinkOptions, SuperLinkProcess, flower_env

    layout = init_state_dir(tmp_path / "s")
    venv = Path(sys.executable).parent.parent
    monkeypatch.chdir(venv)
    monkeypatch.setattr(sys, "executable", str(Path(sys.executable).relative_to(venv)))
    argv = SuperLinkProcess(layout, SuperLinkOptions(port=19197)).argv()
    assert os.path.isabs(argv[0]) and os.path.samefile(argv[0], venv / sys.executable)
    first_on_path = flower_env(layout)["PATH"].split(os.pathsep)[0]
    assert os.path.isabs(first_on_path) and os.path.samefile(first_on_path, venv / "bin")
