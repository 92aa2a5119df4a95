"""Key management for relaytree: the cluster CA, TLS certificates and signing keys.

Everything is done with ``cryptography`` (no ``openssl`` command).  Layout of a
keys directory (e.g. ``~/.relaytree`` on the controller, ``/etc/relaytree/pki``
on a node)::

    ca.key                 EC P-256 CA key (0600)         -- controller only
    ca.crt                 self-signed CA certificate      -- on every node
    nodes/<name>.key       node TLS key (0600)             -- on that node only
    nodes/<name>.crt       node certificate: serverAuth + clientAuth
    clients/<name>.key     controller TLS key (0600)       -- controller only
    clients/<name>.crt     controller certificate: clientAuth
    signing/<name>.key     Ed25519 request-signing key, PKCS#8 PEM (0600)
    signing/<name>.pub     its public key, SubjectPublicKeyInfo PEM -- on every node

Key types: TLS keys (CA and leaves) are ECDSA P-256 with SHA-256 signatures, the
one choice every gRPC TLS stack (BoringSSL in grpcio, OpenSSL) accepts for
certificates and client certificates in TLS 1.2 and 1.3.  Request signing uses
Ed25519 (see :mod:`relaytree.auth`).

Certificate names: a node certificate carries ``DNS:<name>`` (or ``IP:<name>``
when the name is an address) plus every extra address given.  Relays dial a
child by ``Target.address`` but check its certificate against ``Target.name``
via the ``grpc.ssl_target_name_override`` channel option (:func:`channel_options`),
so the certificate only needs the node's name and the binding "this address is
node X" is checked on every hop whatever address the root resolved.

Files are written atomically (temporary file + rename, fsync'ed), private files
with mode 0600, new directories with mode 0700.  Existing files are never
replaced unless ``force=True``.  Every error is a :class:`KeysError` naming the file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PathLike = Union[str, "os.PathLike[str]"]

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
NODES_DIR = "nodes"
CLIENTS_DIR = "clients"
SIGNING_DIR = "signing"

#: Certificates start to be valid this long before "now", for nodes whose clock lags.
BACKDATE = _dt.timedelta(hours=1)

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,252}$")
_DNS_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$")


class KeysError(Exception):
    """Any problem with keys or certificates; the message names the file."""


@dataclass(frozen=True)
class Issued:
    """Paths of a certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class SigningKeyInfo:
    key: Path
    pub: Path
    key_id: str


# --------------------------------------------------------------------------- files


def _ensure_dir(path: Path) -> None:
    if path.is_dir():
        return
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    except OSError as e:
        raise KeysError(f"cannot create directory {path}: {e.strerror or e}") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory.

    Without ``force`` the final step is ``link()``, which fails if ``path``
    appeared meanwhile, so an existing file is never replaced.
    """
    _ensure_dir(path.parent)
    if not force and os.path.lexists(path):
        raise KeysError(f"{path} already exists (use force to overwrite)")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    except OSError as e:
        raise KeysError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if force:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise KeysError(f"{path} already exists (use force to overwrite)") from None
                except OSError:
                    # File system without hard links: best effort check + rename.
                    if os.path.lexists(path):
                        raise KeysError(f"{path} already exists (use force to overwrite)") from None
                    os.replace(tmp, path)
        except OSError as e:
            raise KeysError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _write_pair(key_path: Path, key_pem: bytes, cert_path: Path, cert_pem: bytes, force: bool) -> Issued:
    if not force:
        for p in (key_path, cert_path):
            if os.path.lexists(p):
                raise KeysError(f"{p} already exists (use force to overwrite)")
    _atomic_write(key_path, key_pem, 0o600, force)
    try:
        _atomic_write(cert_path, cert_pem, 0o644, force)
    except KeysError:
        if not force:  # do not leave a key without its certificate behind
            try:
                key_path.unlink()
            except OSError:
                pass
        raise
    return Issued(cert=cert_path, key=key_path)


def _read(path: PathLike, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise KeysError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise KeysError(f"cannot read {what} {path}: {e.strerror or e}") from None


# --------------------------------------------------------------------------- helpers


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _not_after(cert: x509.Certificate) -> _dt.datetime:
    t = getattr(cert, "not_valid_after_utc", None)
    if t is None:  # cryptography < 42
        t = cert.not_valid_after.replace(tzinfo=_dt.timezone.utc)
    return t


def _not_before(cert: x509.Certificate) -> _dt.datetime:
    t = getattr(cert, "not_valid_before_utc", None)
    if t is None:
        t = cert.not_valid_before.replace(tzinfo=_dt.timezone.utc)
    return t


def _check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise KeysError(
            f"invalid {what} {name!r}: use letters, digits, '.', '-', '_' or ':' "
            "(it becomes a file name and a certificate name)"
        )
    return name


def _san_entry(value: Any) -> x509.GeneralName:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return x509.IPAddress(value)
    text = str(value).strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not _DNS_RE.match(text) or ".." in text:
        raise KeysError(f"invalid certificate name or address {text!r}")
    return x509.DNSName(text)


def _sans(name: str, addresses: Iterable[Any]) -> List[x509.GeneralName]:
    out: List[x509.GeneralName] = []
    for v in [name, *addresses]:
        e = _san_entry(v)
        if e not in out:
            out.append(e)
    return out


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_cert(path: PathLike, what: str = "certificate") -> x509.Certificate:
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except Exception as e:  # ValueError and friends
        raise KeysError(f"{what} {path} is not a PEM certificate: {e}") from None


def _load_private(path: PathLike, what: str = "private key") -> Any:
    data = _read(path, what)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeysError(f"{what} {path} is encrypted; relaytree needs an unencrypted key (mode 0600)") from None
    except Exception as e:
        raise KeysError(f"{what} {path} is not a PEM private key: {e}") from None


def _same_public(a: Any, b: Any) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def load_ca(keys_dir: PathLike) -> Tuple[x509.Certificate, Any]:
    """Return the CA certificate and key of ``keys_dir`` (checked to match)."""
    d = Path(keys_dir)
    cert_path, key_path = d / CA_CERT, d / CA_KEY
    if not cert_path.exists() or not key_path.exists():
        missing = cert_path if not cert_path.exists() else key_path
        raise KeysError(f"no CA in {d}: {missing} does not exist (run `relaytree keys init` first)")
    cert = _load_cert(cert_path, "CA certificate")
    key = _load_private(key_path, "CA key")
    if not _same_public(cert.public_key(), key.public_key()):
        raise KeysError(f"CA key {key_path} does not match CA certificate {cert_path}")
    return cert, key


# --------------------------------------------------------------------------- CA


def init_ca(
    keys_dir: PathLike, *, cluster_name: str = "relaytree", days: int = 3650, force: bool = False
) -> Issued:
    """Create the cluster CA (``ca.key``, ``ca.crt``) in ``keys_dir``.

    Refuses to replace an existing CA unless ``force`` (doing so invalidates
    every certificate issued by the old one).
    """
    d = Path(keys_dir)
    _ensure_dir(d)
    if days <= 0:
        raise KeysError(f"CA validity must be positive, got {days} days")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "relaytree"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster_name} CA"[:64]),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(d / CA_KEY, _key_pem(key), d / CA_CERT, _cert_pem(cert), force)


def _issue(
    keys_dir: PathLike,
    name: str,
    addresses: Iterable[Any],
    ekus: Sequence[x509.ObjectIdentifier],
    days: int,
) -> Tuple[bytes, bytes]:
    ca_cert, ca_key = load_ca(keys_dir)
    if days <= 0:
        raise KeysError(f"certificate validity must be positive, got {days} days")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + _dt.timedelta(days=days), _not_after(ca_cert))
    if not_after <= now:
        raise KeysError(f"CA certificate {Path(keys_dir) / CA_CERT} has expired; create a new CA")
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - BACKDATE, _not_before(ca_cert)))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
        .add_extension(x509.SubjectAlternativeName(_sans(name, addresses)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _key_pem(key), _cert_pem(cert)


def issue_node_cert(
    keys_dir: PathLike,
    name: str,
    addresses: Iterable[Any] = (),
    *,
    days: int = 825,
    force: bool = False,
    out_dir: Optional[PathLike] = None,
) -> Issued:
    """Issue ``nodes/<name>.crt`` + ``.key`` signed by the CA of ``keys_dir``.

    SAN: ``name`` (DNS, or IP if it is an address) plus each of ``addresses``
    (IP addresses or extra DNS names).  EKU serverAuth + clientAuth, since a
    relay is the server of its parent and a client of its children.
    Re-issuing an existing certificate needs ``force=True``.
    """
    _check_name(name, "node name")
    key_pem, cert_pem = _issue(
        keys_dir, name, addresses, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], days
    )
    d = Path(out_dir) if out_dir is not None else Path(keys_dir) / NODES_DIR
    return _write_pair(d / f"{name}.key", key_pem, d / f"{name}.crt", cert_pem, force)


def issue_controller_cert(
    keys_dir: PathLike,
    name: str = "controller",
    *,
    days: int = 825,
    force: bool = False,
    out_dir: Optional[PathLike] = None,
) -> Issued:
    """Issue the root's TLS client certificate ``clients/<name>.crt`` + ``.key`` (clientAuth)."""
    _check_name(name, "controller name")
    key_pem, cert_pem = _issue(keys_dir, name, (), [ExtendedKeyUsageOID.CLIENT_AUTH], days)
    d = Path(out_dir) if out_dir is not None else Path(keys_dir) / CLIENTS_DIR
    return _write_pair(d / f"{name}.key", key_pem, d / f"{name}.crt", cert_pem, force)


# --------------------------------------------------------------------------- signing keys


def key_id(public_key: Any) -> str:
    """Short stable fingerprint of an Ed25519 key: first 16 hex digits of sha256(raw public key).

    Accepts a public or private key object, or anything :func:`load_public_key` accepts.
    """
    if isinstance(public_key, ed25519.Ed25519PrivateKey):
        public_key = public_key.public_key()
    if not isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key = load_public_key(public_key)
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def init_signing_key(keys_dir: PathLike, name: str = "controller", force: bool = False) -> SigningKeyInfo:
    """Create the Ed25519 request-signing key ``signing/<name>.key`` (0600) and ``.pub``."""
    _check_name(name, "signing key name")
    d = Path(keys_dir) / SIGNING_DIR
    key = ed25519.Ed25519PrivateKey.generate()
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    issued = _write_pair(d / f"{name}.key", _key_pem(key), d / f"{name}.pub", pub_pem, force)
    return SigningKeyInfo(key=issued.key, pub=issued.cert, key_id=key_id(key))


def load_signing_key(path: PathLike) -> ed25519.Ed25519PrivateKey:
    """Load an Ed25519 private key (PEM, PKCS#8 or OpenSSH)."""
    data = _read(path, "signing key")
    key = None
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeysError(f"signing key {path} is encrypted; relaytree needs an unencrypted key") from None
    except Exception as e:
        raise KeysError(f"signing key {path} is not a PEM private key: {e}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeysError(f"signing key {path} is not an Ed25519 key ({type(key).__name__})")
    return key


def _parse_public(data: bytes, where: str) -> ed25519.Ed25519PublicKey:
    stripped = data.strip()
    try:
        if stripped.startswith(b"-----BEGIN"):
            if b"PRIVATE KEY" in stripped.split(b"\n", 1)[0]:
                raise KeysError(f"{where} is a private key; give the public key (.pub)")
            key = serialization.load_pem_public_key(stripped)
        elif stripped.startswith(b"ssh-ed25519 "):
            key = serialization.load_ssh_public_key(stripped)
        elif len(data) == 32:
            key = ed25519.Ed25519PublicKey.from_public_bytes(data)
        else:
            raise KeysError(f"{where} is not an Ed25519 public key (PEM, OpenSSH or 32 raw bytes)")
    except KeysError:
        raise
    except Exception as e:
        raise KeysError(f"{where} is not a valid public key: {e}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeysError(f"{where} is not an Ed25519 public key ({type(key).__name__})")
    return key


def load_public_key(path_or_pem: Any) -> ed25519.Ed25519PublicKey:
    """Load an Ed25519 public key from a path, PEM text/bytes, an OpenSSH line,
    32 raw bytes, or a key object (a private key gives its public half)."""
    if isinstance(path_or_pem, ed25519.Ed25519PublicKey):
        return path_or_pem
    if isinstance(path_or_pem, ed25519.Ed25519PrivateKey):
        return path_or_pem.public_key()
    if isinstance(path_or_pem, (bytes, bytearray, memoryview)):
        return _parse_public(bytes(path_or_pem), "public key data")
    if isinstance(path_or_pem, str) and path_or_pem.lstrip().startswith(("-----BEGIN", "ssh-ed25519 ")):
        return _parse_public(path_or_pem.encode(), "public key text")
    if isinstance(path_or_pem, (str, os.PathLike)):
        return _parse_public(_read(path_or_pem, "public key"), f"public key {path_or_pem}")
    raise KeysError(f"cannot load a public key from {type(path_or_pem).__name__}")


# --------------------------------------------------------------------------- inspection


def _cert_info(cert_path: Path, key_path: Optional[Path], ca: Optional[x509.Certificate]) -> Dict[str, Any]:
    info: Dict[str, Any] = {"cert": str(cert_path)}
    if key_path is not None:
        info["key"] = str(key_path) if key_path.exists() else None
    try:
        cert = _load_cert(cert_path)
    except KeysError as e:
        info["error"] = str(e)
        return info
    now = _now()
    na = _not_after(cert)
    info.update(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "x"),
        not_before=_not_before(cert).isoformat(),
        not_after=na.isoformat(),
        days_left=(na - now).days,
        expired=na <= now,
    )
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        info["names"] = [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
            str(v) for v in san.get_values_for_type(x509.IPAddress)
        ]
    except x509.ExtensionNotFound:
        info["names"] = []
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        info["usage"] = [getattr(o, "_name", o.dotted_string) for o in eku]
    except x509.ExtensionNotFound:
        info["usage"] = []
    if ca is not None and ca is not cert:
        try:
            cert.verify_directly_issued_by(ca)
            info["signed_by_ca"] = True
        except (ValueError, TypeError, InvalidSignature):
            info["signed_by_ca"] = False
    if key_path is not None and key_path.exists():
        try:
            info["key_matches"] = _same_public(cert.public_key(), _load_private(key_path).public_key())
        except KeysError as e:
            info["key_matches"] = False
            info["error"] = str(e)
    return info


def describe(keys_dir: PathLike) -> Dict[str, Any]:
    """What exists in ``keys_dir`` (for ``relaytree keys show``)::

        {"keys_dir": str, "ca": {...} | None,
         "nodes": {name: {...}}, "clients": {name: {...}},
         "signing": {name: {"key": path|None, "pub": path|None, "key_id": str|None}}}

    Certificate entries have ``subject``, ``not_after`` (ISO 8601, UTC),
    ``days_left``, ``expired``, ``names`` (SANs), ``usage`` (EKUs),
    ``signed_by_ca`` and ``key_matches``; an unreadable file gives ``error``.
    """
    d = Path(keys_dir)
    out: Dict[str, Any] = {"keys_dir": str(d), "ca": None, "nodes": {}, "clients": {}, "signing": {}}
    if not d.is_dir():
        return out
    ca: Optional[x509.Certificate] = None
    if (d / CA_CERT).exists():
        out["ca"] = _cert_info(d / CA_CERT, d / CA_KEY, None)
        try:
            ca = _load_cert(d / CA_CERT)
        except KeysError:
            ca = None
    for section, sub in (("nodes", NODES_DIR), ("clients", CLIENTS_DIR)):
        sd = d / sub
        if sd.is_dir():
            for p in sorted(sd.glob("*.crt")):
                out[section][p.stem] = _cert_info(p, p.with_suffix(".key"), ca)
    sd = d / SIGNING_DIR
    if sd.is_dir():
        names = sorted({p.stem for p in sd.glob("*.key")} | {p.stem for p in sd.glob("*.pub")})
        for n in names:
            kp, pp = sd / f"{n}.key", sd / f"{n}.pub"
            entry: Dict[str, Any] = {
                "key": str(kp) if kp.exists() else None,
                "pub": str(pp) if pp.exists() else None,
                "key_id": None,
            }
            try:
                entry["key_id"] = key_id(load_public_key(pp) if pp.exists() else load_signing_key(kp))
            except KeysError as e:
                entry["error"] = str(e)
            out["signing"][n] = entry
    return out


# --------------------------------------------------------------------------- one-shot setup


def _expand_nodes(nodes: Union[str, Iterable[str]]) -> List[str]:
    from ClusterShell.NodeSet import NodeSet, NodeSetException

    items = [nodes] if isinstance(nodes, str) else list(nodes)
    out: List[str] = []
    for item in items:
        try:
            names = list(NodeSet(item))
        except (NodeSetException, AssertionError, ValueError) as e:
            raise KeysError(f"invalid node set {item!r}: {e}") from None
        for n in names:
            if n not in out:
                out.append(n)
    return out


def setup(
    keys_dir: PathLike,
    nodes: Union[str, Iterable[str]] = (),
    *,
    cluster_name: str = "relaytree",
    controller: str = "controller",
    addresses: Optional[Mapping[str, Iterable[Any]]] = None,
    ca_days: int = 3650,
    days: int = 825,
    force: bool = False,
) -> Dict[str, Any]:
    """Create whatever is missing: CA, controller certificate, signing key, node certificates.

    ``nodes`` is a node set (``"node[1-64]"``) or a list of names/node sets;
    ``addresses`` maps a node name to extra SAN entries.  Existing files are
    kept (idempotent); ``force`` re-issues the controller and node
    *certificates* but never replaces the CA or the signing key (that would
    invalidate every node: use ``init_ca``/``init_signing_key`` with force).

    Returns ``{"created": [paths], "kept": [paths], "key_id": str}``.
    """
    d = Path(keys_dir)
    created: List[str] = []
    kept: List[str] = []
    names = _expand_nodes(nodes)
    for n in names:
        _check_name(n, "node name")

    def note(issued: Issued, new: bool) -> None:
        (created if new else kept).extend([str(issued.cert), str(issued.key)])

    if (d / CA_CERT).exists() or (d / CA_KEY).exists():
        load_ca(d)  # both present and matching, or a clear error
        note(Issued(d / CA_CERT, d / CA_KEY), False)
    else:
        note(init_ca(d, cluster_name=cluster_name, days=ca_days), True)

    cc, ck = d / CLIENTS_DIR / f"{controller}.crt", d / CLIENTS_DIR / f"{controller}.key"
    if force or not (cc.exists() and ck.exists()):
        note(issue_controller_cert(d, controller, days=days, force=True), True)
    else:
        note(Issued(cc, ck), False)

    sk, sp = d / SIGNING_DIR / f"{controller}.key", d / SIGNING_DIR / f"{controller}.pub"
    if sk.exists():
        priv = load_signing_key(sk)
        if not sp.exists():
            pub_pem = priv.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            _atomic_write(sp, pub_pem, 0o644, False)
            created.append(str(sp))
        else:
            kept.append(str(sp))
            if key_id(load_public_key(sp)) != key_id(priv):
                raise KeysError(f"signing public key {sp} does not match {sk}")
        kept.append(str(sk))
        kid = key_id(priv)
    else:
        info = init_signing_key(d, controller, force=True)
        created.extend([str(info.key), str(info.pub)])
        kid = info.key_id

    addresses = addresses or {}
    for n in names:
        nc, nk = d / NODES_DIR / f"{n}.crt", d / NODES_DIR / f"{n}.key"
        if force or not (nc.exists() and nk.exists()):
            note(issue_node_cert(d, n, addresses.get(n, ()), days=days, force=True), True)
        else:
            note(Issued(nc, nk), False)
    return {"created": created, "kept": kept, "key_id": kid}


# --------------------------------------------------------------------------- gRPC TLS


def _material(value: Any, what: str) -> bytes:
    """PEM bytes from PEM bytes/text or a path."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    if isinstance(value, (str, os.PathLike)):
        return _read(value, what)
    raise KeysError(f"{what}: expected a path or PEM data, got {type(value).__name__}")


def _tls_material(cert: Any, key: Any, ca: Any) -> Tuple[bytes, bytes, bytes]:
    c, k, a = _material(cert, "certificate"), _material(key, "private key"), _material(ca, "CA certificate")
    where = cert if not isinstance(cert, (bytes, bytearray)) else "certificate data"
    try:
        cobj = x509.load_pem_x509_certificate(c)
        kobj = serialization.load_pem_private_key(k, password=None)
        x509.load_pem_x509_certificate(a)
    except Exception as e:
        raise KeysError(f"invalid TLS material ({where}): {e}") from None
    if not _same_public(cobj.public_key(), kobj.public_key()):
        raise KeysError(f"private key does not match certificate {where}")
    return c, k, a


def server_credentials(cert: Any, key: Any, ca: Any) -> Any:
    """``grpc.ServerCredentials`` requiring a client certificate issued by ``ca``.

    Each argument is a path or PEM data.
    """
    import grpc

    c, k, a = _tls_material(cert, key, ca)
    return grpc.ssl_server_credentials([(k, c)], root_certificates=a, require_client_auth=True)


def channel_credentials(cert: Any, key: Any, ca: Any) -> Any:
    """``grpc.ChannelCredentials`` presenting ``cert`` and trusting only ``ca``."""
    import grpc

    c, k, a = _tls_material(cert, key, ca)
    return grpc.ssl_channel_credentials(root_certificates=a, private_key=k, certificate_chain=c)


def channel_options(server_name: Optional[str]) -> List[Tuple[str, Any]]:
    """Channel options to check the peer's certificate against ``server_name``
    (the node name, ``Target.name``) whatever address is dialed."""
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []


def node_tls_files(keys_dir: PathLike, name: str) -> Tuple[Path, Path, Path]:
    """``(cert, key, ca)`` paths of node ``name`` in the standard layout."""
    _check_name(name, "node name")
    d = Path(keys_dir)
    return d / NODES_DIR / f"{name}.crt", d / NODES_DIR / f"{name}.key", d / CA_CERT


def controller_tls_files(keys_dir: PathLike, name: str = "controller") -> Tuple[Path, Path, Path]:
    """``(cert, key, ca)`` paths of the controller's client certificate."""
    _check_name(name, "controller name")
    d = Path(keys_dir)
    return d / CLIENTS_DIR / f"{name}.crt", d / CLIENTS_DIR / f"{name}.key", d / CA_CERT
