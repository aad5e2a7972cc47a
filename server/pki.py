"""The server's TLS material: a private CA and a server certificate it signs.

``fedrec server init`` calls :func:`create_pki`. The CA certificate (``ca.pem``) is what
devices trust (``fedrec client start --root-cert ca.pem``, Flower's
``--root-certificates``); the server certificate carries the host names and IP addresses
devices use to reach the SuperLink as subject alternative names (TLS clients check SANs,
not the common name). Keys are EC P-384 (small, fast, accepted by gRPC/uvicorn TLS) and
written 0600 in PKCS#8 PEM, certificates 0644.

The CA key is kept for :func:`renew_server_cert` (``fedrec server renew-cert``): a new server
certificate (expired, or for other host names) signed by the same CA, so devices keep
trusting the server and the run state stays. Only a lost or compromised CA needs a new
``init --force``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import ConfigError, FedRecError
from shared.io import make_dirs_durable, write_bytes_atomic

#: What a server certificate names when the operator gives no ``--host``.
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")


class PkiError(FedRecError):
    """The TLS material is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class PkiPaths:
    """Where the CA and server key pair live (all in one ``certs/`` folder)."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def all(self) -> tuple[Path, ...]:
        return (self.ca_cert, self.ca_key, self.server_cert, self.server_key)


_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DNS_NAME_RULE = (
    "A DNS name is labels separated by dots, each 1-63 letters, digits or '-' and neither "
    "starting nor ending with '-', 253 characters at most"
)


def unbracketed(host: str) -> str:
    """``host`` without the brackets an IPv6 address is written in beside a port
    (``[::1]`` -> ``::1``): what sockets and the SuperLink take."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def dns_name_problem(host: str) -> str | None:
    """Why ``host`` is not a DNS name a server certificate can carry (RFC 1123 host name,
    optionally ending in one dot), or None. An international name goes in as its ``xn--``
    form; a wildcard is not a name a device connects to."""
    if not host.isascii():
        return "it has characters outside ASCII (give an international name as xn--...)"
    name = host.removesuffix(".")
    if len(name) > 253:
        return f"it is {len(name)} characters long"
    for label in name.split("."):
        if not label:
            return "it has an empty label (a leading dot or two dots in a row)"
        if len(label) > 63:
            return f"its label {label[:20]!r}... is {len(label)} characters long"
        if not _DNS_LABEL.fullmatch(label):
            if re.fullmatch(r"[A-Za-z0-9-]+", label):  # only a hyphen at an end is wrong
                end = "starts" if label.startswith("-") else "ends"
                return f"its label {label!r} {end} with '-'"
            return f"its label {label!r} has characters other than letters, digits and '-'"
    return None


def dns_name_key(host: str) -> str:
    """``host`` as TLS compares DNS names: case-insensitive, and a final dot (the root) is
    not part of the name (``Fedrec.Example.org.`` is ``fedrec.example.org``). Certificates
    carry this form, so a name given either way is found in them."""
    return host.removesuffix(".").lower()


@dataclass(frozen=True)
class SubjectNames:
    """The SANs of a server certificate: DNS names and IP addresses."""

    dns: tuple[str, ...]
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]

    @classmethod
    def parse(cls, hosts: Sequence[str]) -> SubjectNames:
        """Split ``hosts`` into IP addresses and DNS names; refuse junk with the reason."""
        dns: list[str] = []
        ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for raw in hosts:
            host = raw.strip()
            if not host:  # was skipped: `--host ""` then silently left the defaults alone
                raise ConfigError("--host '' is empty; give a DNS name or an IP address")
            try:
                ip = ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                if host.rstrip(".").replace(".", "").isdigit():  # 999.1.1.1: a typo, not a name
                    raise ConfigError(
                        f"--host {raw!r} looks like an IPv4 address but is not one (each of "
                        "its four numbers must be 0-255)"
                    ) from None
                problem = dns_name_problem(host)
                if problem is not None:
                    raise ConfigError(
                        f"--host {raw!r} is neither an IP address nor a DNS name: {problem}. "
                        f"{_DNS_NAME_RULE}; give the names devices use to reach the server "
                        "(e.g. --host fedrec.example.org --host 10.0.0.5)"
                    ) from None
                name = dns_name_key(host)  # as TLS compares names
                if name not in dns:
                    dns.append(name)
            else:
                if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
                    bare = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
                    raise ConfigError(
                        f"--host {raw!r} names a network interface (%{ip.scope_id}), which a "
                        f"certificate cannot carry; give the address alone (--host {bare})"
                    )
                if ip.is_unspecified or ip.is_multicast:  # no device connects to these
                    what = "listen-on-all" if ip.is_unspecified else "multicast"
                    raise ConfigError(
                        f"--host {raw!r} is a {what} address, not one devices can connect to; "
                        "give the server's DNS name or its reachable IP (e.g. --host "
                        "fedrec.example.org --host 10.0.0.5); `fedrec server start --host` is "
                        "where the SuperLink listens"
                    )
                if ip not in ips:
                    ips.append(ip)
        if not dns and not ips:
            raise ConfigError("the server certificate needs at least one --host (name or IP)")
        return cls(tuple(dns), tuple(ips))

    def general_names(self) -> list[x509.GeneralName]:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in self.dns]
        names.extend(x509.IPAddress(ip) for ip in self.ips)
        return names

    @property
    def common_name(self) -> str:
        """The subject's CN: only informative (TLS clients check the SANs), and X.509 caps
        it at 64 characters where a DNS name may have 253, so the first name that fits."""
        fitting = [n for n in (*self.dns, *map(str, self.ips)) if len(n) <= 64]
        return fitting[0] if fitting else "fedrec server"


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_bytes_atomic(path, pem)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    write_bytes_atomic(path, cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(path, 0o644)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrec"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Key usage of the CA (signs certificates and CRLs) or of the server (TLS key
    agreement); both sign."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


CLOCK_SKEW: Final = dt.timedelta(days=1)
"""How long before its issue a certificate :func:`create_pki` or :func:`renew_server_cert`
makes is already valid: a device whose clock lags the server's by up to this much (a time
zone set wrong leaves an epoch hours off behind the right local time) still verifies it,
where one that began when it was issued fails the TLS handshake ("certificate is not yet
valid") until the device's clock catches up."""


def with_default_hosts(hosts: Sequence[str]) -> list[str]:
    """``hosts`` and then :data:`DEFAULT_HOSTS` (those not given), which the server uses
    to reach its own SuperLink."""
    return [*hosts, *(h for h in DEFAULT_HOSTS if h not in hosts)]


def _issue_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: SubjectNames,
    now: dt.datetime,
    valid_days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh server key and its certificate for ``names``, signed by the CA, valid from
    :data:`CLOCK_SKEW` before ``now`` until ``valid_days`` after it."""
    ca_name = ca_cert.subject
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names.common_name))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names.general_names()), critical=False)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return server_key, server_cert


def create_pki(
    directory: str | Path,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    valid_days: int = 825,
    ca_valid_days: int = 3650,
) -> PkiPaths:
    """Create a CA and a server certificate for ``hosts`` in ``directory``.

    Overwrites files in ``directory`` (the caller decides whether that is allowed).
    """
    if valid_days < 1 or ca_valid_days < valid_days:
        raise ConfigError(
            f"certificate lifetimes must be >= 1 day and the CA's >= the server's, got "
            f"{valid_days} / {ca_valid_days}"
        )
    names = SubjectNames.parse(hosts)
    paths = PkiPaths(Path(directory))
    make_dirs_durable(paths.directory)
    now = dt.datetime.now(dt.UTC)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedrec federation CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=ca_valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key, server_cert = _issue_server_cert(ca_key, ca_cert, names, now, valid_days)
    _write_private_key(paths.ca_key, ca_key)
    _write_cert(paths.ca_cert, ca_cert)
    _write_private_key(paths.server_key, server_key)
    _write_cert(paths.server_cert, server_cert)
    return paths


def renew_server_cert(
    directory: str | Path, hosts: Sequence[str] | None = None, *, valid_days: int = 825
) -> PkiPaths:
    """Replace the server certificate and key with new ones signed by the existing CA, for
    ``hosts`` and :data:`DEFAULT_HOSTS` (default: the names of the current certificate).
    Devices keep trusting the server (same ``ca.pem``); nothing else in the state directory
    changes."""
    paths = PkiPaths(Path(directory))
    for path in (paths.ca_cert, paths.ca_key):
        if not path.is_file():
            raise _missing(paths, path)
    if hosts is None:
        try:
            current = server_names(paths)
        except PkiError as exc:  # the certificate this renewal is the fix for
            raise PkiError(
                f"the names of the current server certificate cannot be read ({exc}); give "
                "them: `fedrec server renew-cert --host NAME_OR_IP [--host ...]` (localhost "
                "and 127.0.0.1 are added)"
            ) from None
    names = SubjectNames.parse(current if hosts is None else with_default_hosts(hosts))
    ca_cert = load_cert(paths.ca_cert)
    try:
        ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise PkiError(f"CA key {paths.ca_key} is unreadable ({exc}); {_NO_CA_FIX}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or (
        ca_key.public_key().public_numbers() != ca_cert.public_key().public_numbers()  # type: ignore[union-attr]
    ):
        raise PkiError(f"{paths.ca_key} is not the key of {paths.ca_cert}; {_NO_CA_FIX}")
    _check_ca_current(paths, ca_cert)
    now = dt.datetime.now(dt.UTC)
    if ca_cert.not_valid_after_utc < now + dt.timedelta(days=valid_days):
        valid_days = max(1, (ca_cert.not_valid_after_utc - now).days)
    server_key, server_cert = _issue_server_cert(ca_key, ca_cert, names, now, valid_days)
    _write_private_key(paths.server_key, server_key)
    _write_cert(paths.server_cert, server_cert)
    return paths


def _check_ca_current(paths: PkiPaths, ca: x509.Certificate) -> None:
    """Refuse an expired CA: no certificate it signs verifies, however new."""
    if ca.not_valid_after_utc < dt.datetime.now(dt.UTC) + dt.timedelta(days=1):
        raise PkiError(
            f"the CA {paths.ca_cert} expires on {ca.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
            "no certificate it signs verifies after that. `fedrec server init --force` makes "
            "a new CA (every device then needs the new ca.pem)"
        )


def load_cert(path: Path) -> x509.Certificate:
    """Read a PEM certificate; :class:`PkiError` with the fix if it is missing or bad."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"certificate {path} is missing; run `fedrec server init`") from None
    except (OSError, ValueError) as exc:
        raise PkiError(
            f"certificate {path} is unreadable ({exc}); `fedrec server renew-cert` issues a new "
            "server certificate (for a damaged ca.pem, `fedrec server init --force`)"
        ) from exc


def server_names(paths: PkiPaths) -> list[str]:
    """The SANs of the server certificate (DNS names, then IP addresses)."""
    cert = load_cert(paths.server_cert)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError(
            f"server certificate {paths.server_cert} names no host (no subjectAltName), so no "
            "device can verify it; `fedrec server renew-cert --host NAME_OR_IP` issues one "
            "that does"
        ) from None
    dns = san.get_values_for_type(x509.DNSName)
    return [*dns, *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


_NO_CA_FIX = (
    "restore it from a backup, or recreate the state with `fedrec server init --force` (a new CA)"
)
"""The fix for a CA file that is missing or damaged: only a backup keeps the trust of the
devices, which hold its ca.pem."""


def _missing(paths: PkiPaths, path: Path) -> PkiError:
    """A missing file of ``paths``, with the fix that keeps the most: a server certificate
    or key is issued again from the same CA (`init`, the fix this named, refuses an existing
    state and `init --force` makes devices trust a new CA and wipes the run state); without
    the CA only a backup keeps the devices' trust."""
    if path in (paths.server_cert, paths.server_key):
        return PkiError(
            f"{path} is missing; `fedrec server renew-cert` issues a new server certificate and "
            "key from the same CA (devices keep their ca.pem; the run state stays)"
        )
    return PkiError(
        f"{path} is missing: without the CA no certificate devices trust can be issued; "
        f"{_NO_CA_FIX}"
    )


def check_pki(paths: PkiPaths) -> None:
    """Refuse a missing file, a key readable by others, or a server cert the CA did not sign."""
    for path in paths.all():
        if not path.is_file():
            raise _missing(paths, path)
    for key in (paths.ca_key, paths.server_key):
        mode = stat.S_IMODE(key.stat().st_mode)
        if mode & 0o077:
            raise PkiError(
                f"private key {key} is readable by others (mode {mode:o}); run `chmod 600 {key}`"
            )
    ca, server = load_cert(paths.ca_cert), load_cert(paths.server_cert)
    _check_ca_current(paths, ca)
    try:
        server.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PkiError(
            f"{paths.server_cert} was not issued by {paths.ca_cert} "
            f"({exc or 'bad signature'}); `fedrec server renew-cert` issues one that is"
        ) from None
    try:
        server_key = serialization.load_pem_private_key(paths.server_key.read_bytes(), None)
        matches = server_key.public_key().public_numbers() == server.public_key().public_numbers()  # type: ignore[union-attr]
    except (OSError, ValueError, TypeError, AttributeError):
        matches = False
    if not matches:  # e.g. a renewal that crashed between writing the key and the certificate
        raise PkiError(
            f"{paths.server_key} is unreadable or not the key of {paths.server_cert}; "
            "`fedrec server renew-cert` issues a new matching pair from the same CA"
        )
    if server.not_valid_after_utc < dt.datetime.now(dt.UTC):
        raise PkiError(
            f"server certificate {paths.server_cert} expired on "
            f"{server.not_valid_after_utc:%Y-%m-%d}; `fedrec server renew-cert` issues a new one "
            "from the same CA (devices keep their ca.pem; the run state stays)"
        )
