"""Key management (relaytree.keys): CA, node/controller certificates, signing keys, mutual TLS."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import shutil
import stat
import subprocess
from concurrent import futures
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relaytree import keys
from relaytree.keys import KeysError


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def pki(tmp_path):
    d = tmp_path / "pki"
    keys.init_ca(d, cluster_name="testcluster")
    keys.issue_node_cert(d, "node1", ["127.0.0.1", "10.1.2.3", "fe80::1", "node1.example.org"])
    keys.issue_node_cert(d, "node2")
    keys.issue_controller_cert(d)
    keys.init_signing_key(d)
    return d


# --------------------------------------------------------------------------- certificates


def test_layout_and_modes(pki):
    for rel in ("ca.key", "nodes/node1.key", "nodes/node2.key", "clients/controller.key", "signing/controller.key"):
        assert _mode(pki / rel) == 0o600, rel
    for rel in ("ca.crt", "nodes/node1.crt", "clients/controller.crt", "signing/controller.pub"):
        assert _mode(pki / rel) == 0o644, rel
    for rel in (".", "nodes", "clients", "signing"):
        assert _mode(pki / rel) == 0o700, rel
    # atomic writes leave no temporary files behind
    leftovers = [p for p in pki.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []


def test_ca_certificate(pki):
    ca = _cert(pki / "ca.crt")
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert ca.subject == ca.issuer
    assert "testcluster" in ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA256)
    ca.verify_directly_issued_by(ca)


def test_node_certificate_sans_and_ekus(pki):
    ca = _cert(pki / "ca.crt")
    cert = _cert(pki / "nodes/node1.crt")
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node1", "node1.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("fe80::1"),
    ]
    eku = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node1"
    # validity about 825 days, backdated a little for lagging clocks
    span = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=825) <= span <= dt.timedelta(days=825, hours=2)
    assert cert.not_valid_before_utc < dt.datetime.now(dt.timezone.utc)
    key = serialization.load_pem_private_key((pki / "nodes/node1.key").read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_controller_certificate_is_client_only(pki):
    cert = _cert(pki / "clients/controller.crt")
    cert.verify_directly_issued_by(_cert(pki / "ca.crt"))
    eku = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_node_named_by_address_gets_ip_san(pki):
    keys.issue_node_cert(pki, "192.168.7.9")
    san = _cert(pki / "nodes/192.168.7.9.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.168.7.9")]
    assert san.value.get_values_for_type(x509.DNSName) == []


def test_chain_validates_with_cryptography_verifier(pki):
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    store = Store([_cert(pki / "ca.crt")])
    builder = PolicyBuilder().store(store)
    node = _cert(pki / "nodes/node1.crt")
    # as a TLS server, by name and by address
    builder.build_server_verifier(x509.DNSName("node1")).verify(node, [])
    builder.build_server_verifier(x509.IPAddress(ipaddress.ip_address("10.1.2.3"))).verify(node, [])
    with pytest.raises(VerificationError):
        builder.build_server_verifier(x509.DNSName("node2")).verify(node, [])
    # as a TLS client (relays are clients of their children), and the controller
    builder.build_client_verifier().verify(node, [])
    builder.build_client_verifier().verify(_cert(pki / "clients/controller.crt"), [])
    # the controller certificate is no server certificate
    with pytest.raises(VerificationError):
        builder.build_server_verifier(x509.DNSName("controller")).verify(_cert(pki / "clients/controller.crt"), [])


def test_chain_rejects_other_ca(pki, tmp_path):
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    other = tmp_path / "other"
    keys.init_ca(other)
    keys.issue_node_cert(other, "node1")
    store = Store([_cert(pki / "ca.crt")])
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("node1")).verify(
            _cert(other / "nodes/node1.crt"), []
        )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_chain_validates_with_openssl(pki, tmp_path):
    ca = str(pki / "ca.crt")
    for leaf, purpose in (("nodes/node1.crt", "sslserver"), ("nodes/node1.crt", "sslclient"), ("clients/controller.crt", "sslclient")):
        r = subprocess.run(
            ["openssl", "verify", "-purpose", purpose, "-CAfile", ca, str(pki / leaf)], capture_output=True, text=True
        )
        assert r.returncode == 0 and ": OK" in r.stdout, (leaf, purpose, r.stdout, r.stderr)
    r = subprocess.run(
        ["openssl", "verify", "-purpose", "sslserver", "-CAfile", ca, str(pki / "clients/controller.crt")],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    other = tmp_path / "other"
    keys.init_ca(other)
    r = subprocess.run(
        ["openssl", "verify", "-CAfile", str(other / "ca.crt"), str(pki / "nodes/node1.crt")],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0


# --------------------------------------------------------------------------- overwrite protection


def test_init_ca_refuses_overwrite(pki):
    before = (pki / "ca.key").read_bytes(), (pki / "ca.crt").read_bytes()
    with pytest.raises(KeysError, match=r"ca\.key already exists.*force"):
        keys.init_ca(pki)
    assert ((pki / "ca.key").read_bytes(), (pki / "ca.crt").read_bytes()) == before
    keys.init_ca(pki, force=True)
    assert (pki / "ca.key").read_bytes() != before[0]
    assert _mode(pki / "ca.key") == 0o600


def test_init_ca_refuses_when_only_cert_exists(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    (d / "ca.crt").write_text("x")
    with pytest.raises(KeysError, match="ca.crt already exists"):
        keys.init_ca(d)
    assert not (d / "ca.key").exists()  # nothing half-written


def test_node_cert_reissue_needs_force(pki):
    old = _cert(pki / "nodes/node1.crt")
    old_key = (pki / "nodes/node1.key").read_bytes()
    with pytest.raises(KeysError, match=r"nodes/node1\.key already exists"):
        keys.issue_node_cert(pki, "node1")
    assert _cert(pki / "nodes/node1.crt").serial_number == old.serial_number
    issued = keys.issue_node_cert(pki, "node1", ["10.9.9.9"], force=True)
    new = _cert(issued.cert)
    assert new.serial_number != old.serial_number
    assert (pki / "nodes/node1.key").read_bytes() != old_key
    assert _mode(issued.key) == 0o600
    san = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.9.9.9")]
    new.verify_directly_issued_by(_cert(pki / "ca.crt"))


def test_signing_key_refuses_overwrite(pki):
    before = (pki / "signing/controller.key").read_bytes()
    with pytest.raises(KeysError, match="signing/controller.key already exists"):
        keys.init_signing_key(pki)
    assert (pki / "signing/controller.key").read_bytes() == before
    info = keys.init_signing_key(pki, force=True)
    assert (pki / "signing/controller.key").read_bytes() != before
    assert info.key_id == keys.key_id(keys.load_public_key(pki / "signing/controller.pub"))


def test_out_dir(pki, tmp_path):
    out = tmp_path / "export"
    issued = keys.issue_node_cert(pki, "node9", out_dir=out)
    assert issued.cert == out / "node9.crt" and issued.key == out / "node9.key"
    assert _mode(out) == 0o700 and _mode(issued.key) == 0o600


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x..y", "-rf", "a b", "nöde"])
def test_invalid_names_rejected(pki, name):
    with pytest.raises(KeysError, match="invalid node name"):
        keys.issue_node_cert(pki, name)
    assert not (pki.parent / "evil.key").exists()


def test_invalid_address_rejected(pki):
    with pytest.raises(KeysError, match="invalid certificate name or address"):
        keys.issue_node_cert(pki, "node5", ["not a host"])
    assert not (pki / "nodes/node5.key").exists()


def test_issue_without_ca_names_the_file(tmp_path):
    with pytest.raises(KeysError, match=r"no CA in .*ca\.crt does not exist"):
        keys.issue_node_cert(tmp_path, "node1")


def test_mismatched_ca_key_detected(pki, tmp_path):
    other = tmp_path / "other"
    keys.init_ca(other)
    shutil.copy(other / "ca.key", pki / "ca.key")
    with pytest.raises(KeysError, match=r"ca\.key does not match"):
        keys.issue_node_cert(pki, "node3")


def test_garbage_files_name_the_file(pki):
    (pki / "signing/bad.key").write_text("garbage")
    with pytest.raises(KeysError, match=r"signing/bad\.key"):
        keys.load_signing_key(pki / "signing/bad.key")
    with pytest.raises(KeysError, match=r"missing\.pub does not exist"):
        keys.load_public_key(pki / "missing.pub")
    (pki / "ca.crt").write_text("garbage")
    with pytest.raises(KeysError, match=r"ca\.crt is not a PEM certificate"):
        keys.issue_node_cert(pki, "node3")


# --------------------------------------------------------------------------- signing keys


def test_signing_key_roundtrip_and_key_id(pki):
    priv = keys.load_signing_key(pki / "signing/controller.key")
    assert isinstance(priv, ed25519.Ed25519PrivateKey)
    pub = keys.load_public_key(pki / "signing/controller.pub")
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    kid = keys.key_id(pub)
    assert kid == hashlib.sha256(raw).hexdigest()[:16]
    assert kid == keys.key_id(priv) == keys.key_id(str(pki / "signing/controller.pub"))
    pem = (pki / "signing/controller.pub").read_bytes()
    ssh = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    for form in (pem, pem.decode(), raw, ssh, ssh.decode(), priv):
        assert keys.key_id(keys.load_public_key(form)) == kid
    sig = priv.sign(b"x")
    pub.verify(sig, b"x")


def test_public_key_loader_rejects_wrong_kinds(pki, tmp_path):
    with pytest.raises(KeysError, match="private key"):
        keys.load_public_key((pki / "signing/controller.key").read_bytes())
    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(KeysError, match="not an Ed25519"):
        keys.load_public_key(ec_pub)
    with pytest.raises(KeysError, match="not an Ed25519"):
        keys.load_signing_key(pki / "ca.key")


# --------------------------------------------------------------------------- describe / setup


def test_describe(pki):
    info = keys.describe(pki)
    assert info["ca"]["subject"].startswith("CN=testcluster CA")
    assert info["ca"]["days_left"] >= 3649 and info["ca"]["expired"] is False
    assert set(info["nodes"]) == {"node1", "node2"}
    n1 = info["nodes"]["node1"]
    assert n1["signed_by_ca"] and n1["key_matches"]
    assert "10.1.2.3" in n1["names"] and "node1" in n1["names"]
    assert n1["usage"] == ["serverAuth", "clientAuth"]
    dt.datetime.fromisoformat(n1["not_after"])
    assert info["clients"]["controller"]["usage"] == ["clientAuth"]
    assert info["signing"]["controller"]["key_id"] == keys.key_id(keys.load_public_key(pki / "signing/controller.pub"))
    assert keys.describe(pki / "nope") == {"keys_dir": str(pki / "nope"), "ca": None, "nodes": {}, "clients": {}, "signing": {}}


def test_setup_is_idempotent_and_force_reissues_leaves_only(tmp_path):
    d = tmp_path / "pki"
    r1 = keys.setup(d, "node[1-3]", addresses={"node2": ["10.0.0.2"]})
    assert sorted(p.name for p in (d / "nodes").iterdir()) == [
        "node1.crt", "node1.key", "node2.crt", "node2.key", "node3.crt", "node3.key",
    ]
    assert str(d / "ca.key") in r1["created"] and r1["kept"] == []
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    r2 = keys.setup(d, ["node[1-3]"])
    assert r2["created"] == [] and r2["key_id"] == r1["key_id"]
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    r3 = keys.setup(d, "node[1-4]", force=True)
    assert (d / "ca.key").read_bytes() == before[d / "ca.key"]
    assert (d / "signing/controller.key").read_bytes() == before[d / "signing/controller.key"]
    assert (d / "nodes/node1.key").read_bytes() != before[d / "nodes/node1.key"]
    assert (d / "nodes/node4.crt").exists() and r3["key_id"] == r1["key_id"]
    info = keys.describe(d)
    assert all(n["signed_by_ca"] for n in info["nodes"].values())


# --------------------------------------------------------------------------- mutual TLS over gRPC


def _self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("intruder")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    c, k = tmp_path / "intruder.crt", tmp_path / "intruder.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return c, k


@pytest.fixture
def tls_server(pki):
    grpc = pytest.importorskip("grpc")
    cert, key, ca = keys.node_tls_files(pki, "node1")
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"echo:" + req)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", keys.server_credentials(cert, key, ca))
    assert port > 0
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


def _call(port, creds, name="node1"):
    import grpc

    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=keys.channel_options(name)) as ch:
        return ch.unary_unary("/test.Echo/Call")(b"hi", timeout=10)


def test_mtls_ca_issued_clients_connect(pki, tls_server):
    ctrl = keys.controller_tls_files(pki)
    assert _call(tls_server, keys.channel_credentials(*ctrl)) == b"echo:hi"
    # a relay (node certificate) is a client of its children too
    assert _call(tls_server, keys.channel_credentials(*keys.node_tls_files(pki, "node2"))) == b"echo:hi"
    # PEM data works as well as paths
    c, k, a = (Path(p).read_bytes() for p in ctrl)
    assert _call(tls_server, keys.channel_credentials(c, k, a)) == b"echo:hi"
    # dialing the address in the certificate without a name override
    import grpc

    with grpc.secure_channel(f"127.0.0.1:{tls_server}", keys.channel_credentials(*ctrl)) as ch:
        assert ch.unary_unary("/test.Echo/Call")(b"ip", timeout=10) == b"echo:ip"


def test_mtls_rejects_self_signed_client(pki, tls_server, tmp_path):
    import grpc

    c, k = _self_signed(tmp_path)
    with pytest.raises(grpc.RpcError) as e:
        _call(tls_server, keys.channel_credentials(c, k, pki / "ca.crt"))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_rejects_client_of_another_ca(pki, tls_server, tmp_path):
    import grpc

    other = tmp_path / "other"
    keys.setup(other)
    oc, ok, _ = keys.controller_tls_files(other)
    with pytest.raises(grpc.RpcError) as e:
        _call(tls_server, keys.channel_credentials(oc, ok, pki / "ca.crt"))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_rejects_client_without_certificate(pki, tls_server):
    import grpc

    creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.crt").read_bytes())
    with pytest.raises(grpc.RpcError) as e:
        _call(tls_server, creds)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_client_checks_server_name(pki, tls_server):
    import grpc

    # node1's certificate does not prove it is node2
    with pytest.raises(grpc.RpcError) as e:
        _call(tls_server, keys.channel_credentials(*keys.controller_tls_files(pki)), name="node2")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_client_rejects_server_of_another_ca(pki, tls_server, tmp_path):
    import grpc

    other = tmp_path / "other"
    keys.setup(other)
    oc, ok, oca = keys.controller_tls_files(other)
    with pytest.raises(grpc.RpcError) as e:
        _call(tls_server, keys.channel_credentials(oc, ok, oca))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_material_mismatch_names_file(pki):
    with pytest.raises(KeysError, match="does not match certificate"):
        keys.server_credentials(pki / "nodes/node1.crt", pki / "nodes/node2.key", pki / "ca.crt")
    with pytest.raises(KeysError, match=r"nodes/nope\.crt does not exist"):
        keys.channel_credentials(pki / "nodes/nope.crt", pki / "nodes/node2.key", pki / "ca.crt")
