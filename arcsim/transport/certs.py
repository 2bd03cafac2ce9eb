"""TLS and mutual TLS for the testbed: a CA of its own, its certificates, and the gRPC credentials.

``arcsim certs DIR`` (``make_certs``) writes six PEM files into ``DIR``:

=============  ==========================================================================================
``ca.pem``     the testbed CA's certificate (self-signed, CA:true, pathlen 0): what clients trust
               (``--tls-ca``) and, for mutual TLS, what the coordinator checks client certificates
               against (``--tls-client-ca``)
``ca.key``     the CA's private key: only needed to issue more certificates; keep it on no service
``server.pem`` the coordinator's certificate, signed by the CA, extendedKeyUsage serverAuth, with a
               subjectAltName for every name and address workers reach the coordinator by
``server.key`` its private key
``client.pem`` one client certificate shared by the workers and adversaries (CN and DNS name
               ``worker``, extendedKeyUsage clientAuth), presented under mutual TLS
``client.key`` its private key
=============  ==========================================================================================

Keys are EC P-256, written mode 0600 (certificates 0644); no file is overwritten unless asked.
The CA is valid for ten years, the certificates for 825 days, all from an hour before they were made
(clocks of the testbed's machines may differ a little).

Trust model: TLS authenticates the coordinator to the workers (only a holder of ``server.key`` can
answer on the address) and encrypts the traffic; mutual TLS additionally keeps every connection
that does not present a certificate of the testbed CA out before any RPC is read. Neither says
*which* worker is calling: that stays the bearer token's job (arcsim.transport.auth), since one client
certificate is shared by every worker and adversary.

``server_credentials`` and ``channel_credentials`` read the files back (with a one-line error naming
the file when one is missing, unreadable, of the wrong kind, expired, or a key that does not match
its certificate) and build ``grpc.ssl_server_credentials`` / ``grpc.ssl_channel_credentials``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The names and addresses the server certificate always carries: a coordinator on this machine
# (localhost, 127.0.0.1: also what a container's own health check connects to) and the compose
# service name other containers reach it by.
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "coordinator")
CLIENT_NAME = "worker"  # the common name (and DNS name) of the shared client certificate
CA_DAYS = 3650
CERT_DAYS = 825
BACKDATE = dt.timedelta(hours=1)

# Environment variables the CLI reads when the matching flag is not given (one process per
# container: the coordinator's own pair, and what its clients use, have different names so that
# the coordinator's container can run a health check under mutual TLS).
SERVER_CERT_ENV = "ARCSIM_TLS_SERVER_CERT"  # coordinator --tls-cert
SERVER_KEY_ENV = "ARCSIM_TLS_SERVER_KEY"  # coordinator --tls-key
CLIENT_CA_ENV = "ARCSIM_TLS_CLIENT_CA"  # coordinator --tls-client-ca (mutual TLS)
CA_ENV = "ARCSIM_TLS_CA"  # worker / adversary / health --tls-ca
CLIENT_CERT_ENV = "ARCSIM_TLS_CLIENT_CERT"  # worker / adversary / health --tls-cert (mutual TLS)
CLIENT_KEY_ENV = "ARCSIM_TLS_CLIENT_KEY"  # worker / adversary / health --tls-key
SERVER_NAME_ENV = "ARCSIM_TLS_SERVER_NAME"  # worker / adversary / health --tls-server-name

# The gRPC channel option that checks the server's certificate against another name than the
# target's host (e.g. a coordinator reached by an address its certificate does not list).
SERVER_NAME_OPTION = "grpc.ssl_target_name_override"

# One DNS label: letters, digits, hyphens inside; underscores too, since Docker's service names
# (``stack_service``) use them. A leading ``*.`` makes a wildcard name.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*\.?")


@dataclass(frozen=True)
class CertFiles:
    """Where ``make_certs`` puts each file of a testbed's PKI."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def in_dir(cls, directory: str | Path) -> CertFiles:
        d = Path(directory)
        return cls(d / "ca.pem", d / "ca.key", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")

    def all(self) -> tuple[Path, ...]:
        return (self.ca_cert, self.ca_key, self.server_cert, self.server_key, self.client_cert, self.client_key)


# --- making a testbed's certificates -------------------------------------------------------------
def server_names(extra: Iterable[str] = ()) -> list[x509.GeneralName]:
    """The server certificate's subjectAltName entries: ``DEFAULT_HOSTS`` then the extra hosts,
    each once (DNS names compare in lower case), in order."""
    return list(dict.fromkeys(general_name(h.strip()) for h in (*DEFAULT_HOSTS, *extra)))


def general_name(host: str) -> x509.GeneralName:
    """A subjectAltName entry: an IP address (v4 or v6) as such, anything else as a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host.isascii() or not _DNS_NAME.fullmatch(host) or len(host) > 253:
        raise ValueError(
            f"a certificate host is an IP address or a DNS name (e.g. coordinator.example.org), got {host!r}"
        )
    return x509.DNSName(host.lower().rstrip("."))


def make_certs(
    directory: str | Path, *, hosts: Sequence[str] = (), force: bool = False, now: dt.datetime | None = None
) -> CertFiles:
    """Make a testbed CA, the coordinator's certificate and a client certificate; write them as PEM.

    ``hosts`` are names and addresses added to ``DEFAULT_HOSTS`` in the server certificate's
    subjectAltName. Existing files are left alone (``FileExistsError`` naming them, before anything
    is written) unless ``force``.
    """
    files = CertFiles.in_dir(directory)
    names = server_names(hosts)
    existing = [p.name for p in files.all() if p.exists() or p.is_symlink()]
    if existing and not force:
        raise FileExistsError(f"{directory} already holds {', '.join(existing)}; pass --force to replace them")
    now = now or dt.datetime.now(dt.UTC)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"arcsim testbed CA {secrets.token_hex(4)}")
    ca_cert = _ca_certificate(ca_key, ca_name, now)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _leaf_certificate(
        server_key.public_key(),
        _name("coordinator"),
        ca_key,
        ca_cert,
        now,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        alt_names=names,
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _leaf_certificate(
        client_key.public_key(),
        _name(CLIENT_NAME),
        ca_key,
        ca_cert,
        now,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        alt_names=[x509.DNSName(CLIENT_NAME)],
    )

    Path(directory).mkdir(parents=True, exist_ok=True)
    for path, pem, mode in (
        (files.ca_cert, _cert_pem(ca_cert), 0o644),
        (files.ca_key, _key_pem(ca_key), 0o600),
        (files.server_cert, _cert_pem(server_cert), 0o644),
        (files.server_key, _key_pem(server_key), 0o600),
        (files.client_cert, _cert_pem(client_cert), 0o644),
        (files.client_key, _key_pem(client_key), 0o600),
    ):
        _write_new(path, pem, mode, replace=force)
    return files


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "arcsim testbed"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_certificate(key: ec.EllipticCurvePrivateKey, name: x509.Name, now: dt.datetime) -> x509.Certificate:
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf_certificate(
    public: ec.EllipticCurvePublicKey,
    name: x509.Name,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    now: dt.datetime,
    *,
    usage: x509.ObjectIdentifier,
    alt_names: list[x509.GeneralName],
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    )
    return builder.sign(ca_key, hashes.SHA256())


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_new(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Write a file that did not exist (O_EXCL: never through a file or link put there meanwhile) with
    exactly ``mode``: a private key is never readable by others, not even for a moment."""
    if replace:
        path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits off a certificate's 0644
        os.write(fd, data)
    finally:
        os.close(fd)


# --- reading them back into gRPC credentials ------------------------------------------------------
def server_credentials(
    cert: str | Path, key: str | Path, *, client_ca: str | Path | None = None
) -> grpc.ServerCredentials:
    """The coordinator's TLS credentials; with ``client_ca``, mutual TLS: every client must present
    a certificate signed by that CA, or its connection is closed in the handshake."""
    cert_pem, key_pem = _certificate_and_key(cert, key)
    ca_pem = read_certificates(client_ca, "client CA certificate")[0] if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=client_ca is not None
    )


def channel_credentials(
    ca: str | Path, *, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """A client's TLS credentials: trust ``ca`` (only it: not the system's roots), and present
    ``cert`` / ``key`` for mutual TLS when given (both or neither)."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate and its key go together: give both or neither")
    ca_pem = read_certificates(ca, "CA certificate")[0]
    cert_pem, key_pem = _certificate_and_key(cert, key) if cert is not None else (None, None)
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)


def read_certificates(path: str | Path, what: str = "certificate") -> tuple[bytes, list[x509.Certificate]]:
    """The PEM bytes of a certificate file (one certificate or a chain) and the certificates in it."""
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{what} {path} holds no PEM certificate (is it a key, or DER?)") from None
    return data, certs


def read_private_key(path: str | Path, what: str = "private key") -> tuple[bytes, PrivateKeyTypes]:
    """The PEM bytes of an unencrypted private key file and the key."""
    data = _read(path, what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(f"{what} {path} is encrypted; arcsim reads unencrypted keys (keep them mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{what} {path} holds no PEM private key (is it a certificate?)") from None
    return data, key


def _certificate_and_key(cert: str | Path, key: str | Path) -> tuple[bytes, bytes]:
    """A certificate (chain) and its key, checked: the leaf in date, the key its own."""
    cert_pem, chain = read_certificates(cert, "TLS certificate")
    key_pem, private = read_private_key(key, "TLS private key")
    leaf = chain[0]
    now = dt.datetime.now(dt.UTC)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise ValueError(
            f"TLS certificate {cert} is valid from {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now; make new ones (arcsim certs)"
        )
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ValueError(f"TLS private key {key} is not the key of the certificate {cert}")
    return cert_pem, key_pem


def _read(path: str | Path, what: str) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error.strerror or error}") from None
