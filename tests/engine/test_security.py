"""Security by default: mutual TLS, signed requests, replay protection, hostile input.

Real daemons with real certificates; forged requests are delivered through the same
tree code the controller uses, so each node has to refuse on its own.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import relaytree
from conftest import RELAYTREE
from relaytree import auth, client as rclient, keys, tree, wire
from relaytree.results import NodeOutcome, Status
from relaytree.v1 import relaytree_pb2 as pb

NAMES = ["127.0.0.%d" % i for i in range(2, 6)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    keys.setup(d, NAMES)
    return d


@pytest.fixture
def secure_fleet(fleet_factory, pki):
    return fleet_factory(len(NAMES), pki=pki)


def markers(fleet, name="marker"):
    return [d.name for d in fleet.daemons if (d.base_dir / name).exists()]


def controller_credentials(pki):
    return keys.channel_credentials(*keys.controller_tls_files(pki))


def envelope(names, *, validity=60.0, **operation) -> pb.Envelope:
    return pb.Envelope(protocol_version=relaytree.PROTOCOL_VERSION,
                       controller_version=relaytree.__version__, request_id=uuid.uuid4().hex,
                       not_after_ms=int((time.time() + validity) * 1000), nonce=os.urandom(16),
                       scope=rclient.fold(names), **operation)


def deliver(fleet, credentials, data: bytes, authenticator, names=None, *, kind="exec",
            feed=None, width=2, chunks=None):
    """Send one already-built request down the tree; {name: NodeOutcome}.  A fetch's chunk
    frames go to the list `chunks`."""
    names = names or fleet.names
    outcomes = {}

    async def on_chunk(node, frame):
        chunks.append(frame)

    async def run():
        pool = wire.ChannelPool(credentials)
        fan = tree.Fanout(pool, kind=kind, envelope=data, auth=authenticator,
                          targets=[pb.Target(name=n, address="%s:%d" % (n, fleet.port)) for n in names],
                          width=width, connect_timeout=3, batch_ms=2,
                          deadline=asyncio.get_running_loop().time() + 30,
                          emit=lambda r: outcomes.__setitem__(r.node, NodeOutcome.from_pb(r)), feed=feed,
                          on_chunk=on_chunk)
        try:
            await fan.run()
        finally:
            await pool.close()

    asyncio.run(run())
    return outcomes


def signing_key(pki):
    return keys.load_signing_key(pki / "signing" / "controller.key")


def touch_marker(names, **kw):
    return envelope(names, exec=pb.ExecSpec(shell="touch marker"), **kw)


def test_secure_cluster_works_end_to_end(secure_fleet, pki, tmp_path):
    c = rclient.secure_client(str(pki), port=secure_fleet.port)
    out = c.exec(secure_fleet.names, "touch marker; hostname", width=2)
    assert all(o.status is Status.PASS for o in out.values()), out
    assert sorted(markers(secure_fleet)) == sorted(NAMES)
    src = tmp_path / "f"
    src.write_bytes(os.urandom(3 << 20))
    out = c.copy(secure_fleet.names, str(src), "/data/f", mkdirs=True)
    assert all(o.status is Status.PASS for o in out.values()), out
    assert all((d.base_dir / "data/f").read_bytes() == src.read_bytes() for d in secure_fleet.daemons)
    # The CLI finds the same keys with --pki.
    proc = subprocess.run(RELAYTREE + ["ping", "-w", rclient.fold(NAMES), "--port", str(secure_fleet.port),
                                       "--pki", str(pki)], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert b"PASS: 127.0.0.[2-5] (4)" in proc.stdout


@pytest.mark.parametrize("forgery", ["unsigned", "wrong key", "expired", "content altered",
                                     "bit-flipped signature"])
def test_forged_requests_are_refused_on_every_node(secure_fleet, pki, forgery):
    creds = controller_credentials(pki)
    env = touch_marker(secure_fleet.names, validity=-120 if forgery == "expired" else 60)
    data = env.SerializeToString()
    key = ed25519.Ed25519PrivateKey.generate() if forgery == "wrong key" else signing_key(pki)
    authenticator = auth.sign(data, key) if forgery != "unsigned" else pb.Authenticator()
    if forgery == "content altered":
        env.exec.shell = "touch marker; touch evil"
        data = env.SerializeToString()
    if forgery == "bit-flipped signature":
        sig = bytearray(authenticator.signature)
        sig[5] ^= 1
        authenticator.signature = bytes(sig)
    out = deliver(secure_fleet, creds, data, authenticator)
    assert set(out) == set(NAMES)
    for outcome in out.values():
        assert outcome.status is Status.FAILED, outcome
        assert "request refused" in outcome.error
    expected = {"unsigned": "unsigned", "wrong key": "unknown key", "expired": "expired",
                "content altered": "bad signature", "bit-flipped signature": "bad signature"}[forgery]
    assert all(expected in o.error for o in out.values()), out
    assert markers(secure_fleet) == []
    assert all(d.alive() for d in secure_fleet.daemons)


def test_target_set_altered_by_a_relay(secure_fleet, pki):
    # Signed for .2 only; a relay adds .3-.5 to the route: they refuse, .2 runs.
    env = touch_marker(["127.0.0.2"])
    data = env.SerializeToString()
    out = deliver(secure_fleet, controller_credentials(pki), data, auth.sign(data, signing_key(pki)))
    assert out["127.0.0.2"].status is Status.PASS
    for name in NAMES[1:]:
        assert out[name].status is Status.FAILED
        assert "not in the request scope" in out[name].error
    assert markers(secure_fleet) == ["127.0.0.2"]


def test_replayed_request_is_refused_and_runs_nothing(secure_fleet, pki):
    creds = controller_credentials(pki)
    env = touch_marker(secure_fleet.names)
    data = env.SerializeToString()
    authenticator = auth.sign(data, signing_key(pki))
    first = deliver(secure_fleet, creds, data, authenticator)
    assert all(o.status is Status.PASS for o in first.values())
    for d in secure_fleet.daemons:
        (d.base_dir / "marker").unlink()
    again = deliver(secure_fleet, creds, data, authenticator)
    assert all(o.status is Status.FAILED and "replayed" in o.error for o in again.values()), again
    assert markers(secure_fleet) == []


def test_altered_chunk_is_never_committed(secure_fleet, pki, tmp_path):
    # Whoever sits above the nodes (here the sender, as a compromised relay would) sends
    # a chunk that differs from the signed header: no node may land it.
    content = os.urandom(3 * 65536 + 100)
    import hashlib
    env = envelope(secure_fleet.names, copy=pb.CopySpec(
        dest="/data/f", size=len(content), sha256=hashlib.sha256(content).digest(),
        chunk_size=65536, src_name="f", mkdirs=True))
    data = env.SerializeToString()
    altered = bytearray(content)
    altered[70000] ^= 0xFF
    altered = bytes(altered)
    chunks = [altered[i:i + 65536] for i in range(0, len(altered), 65536)]

    async def go():
        feed = tree.ChunkFeed(4, lambda i: chunks[i])
        outcomes = {}
        pool = wire.ChannelPool(controller_credentials(pki))
        fan = tree.Fanout(pool, kind="copy", envelope=data, auth=auth.sign(data, signing_key(pki)),
                          targets=[pb.Target(name=n, address="%s:%d" % (n, secure_fleet.port))
                                   for n in secure_fleet.names],
                          width=1, connect_timeout=3, batch_ms=2,
                          deadline=asyncio.get_running_loop().time() + 30,
                          emit=lambda r: outcomes.__setitem__(r.node, NodeOutcome.from_pb(r)), feed=feed)

        async def produce():
            for chunk in chunks:
                await feed.put(chunk)
            await feed.finish()

        await asyncio.gather(fan.run(), produce())
        await pool.close()
        return outcomes

    out = asyncio.run(go())
    assert all(o.status is Status.FAILED and "sha256" in o.error for o in out.values()), out
    for d in secure_fleet.daemons:
        data_dir = d.base_dir / "data"
        assert not data_dir.exists() or list(data_dir.iterdir()) == []


def test_client_without_a_valid_certificate_cannot_connect(secure_fleet, pki, tmp_path):
    rogue = tmp_path / "rogue"
    keys.setup(rogue, [])
    c = rclient.secure_client(str(rogue), port=secure_fleet.port, connect_timeout=2)
    out = c.exec(secure_fleet.names, "touch marker")
    assert all(o.status is Status.UNREACHABLE for o in out.values()), out
    plain = rclient.Client(port=secure_fleet.port, connect_timeout=2).exec(secure_fleet.names, "touch marker")
    assert all(o.status is Status.UNREACHABLE for o in plain.values()), plain
    assert markers(secure_fleet) == []


def test_daemon_without_tls_refuses_to_start(tmp_path):
    proc = subprocess.run(RELAYTREE + ["serve", "--listen", "127.0.0.2:1", "--state-dir", str(tmp_path)],
                          capture_output=True, timeout=30)
    assert proc.returncode == 2
    assert b"no TLS material configured" in proc.stderr and b"--insecure" in proc.stderr


def test_insecure_mode_says_so(fleet_factory):
    fleet = fleet_factory(1)
    time.sleep(0.3)
    assert "INSECURE MODE" in fleet.daemons[0].log_path.read_text()


def test_policy_limits_exec_copy_and_symlink_escapes(fleet_factory, pki, tmp_path):
    policy = ('[auth.policy.default]\nallow_exec = false\ncopy_dest_prefixes = ["/srv"]\n')
    fleet = fleet_factory(2, pki=pki, policy=policy)
    c = rclient.secure_client(str(pki), port=fleet.port)
    out = c.exec(fleet.names, "touch marker")
    assert all(o.status is Status.FAILED and "may not exec" in o.error for o in out.values()), out
    assert markers(fleet) == []
    src = tmp_path / "f"
    src.write_bytes(b"payload")
    out = c.copy(fleet.names, str(src), "/etc/f", mkdirs=True)
    assert all("not allowed" in o.error for o in out.values()), out
    out = c.copy(fleet.names, str(src), "/srv/../etc/f", mkdirs=True)
    assert all(o.status is Status.FAILED for o in out.values()), out
    for d in fleet.daemons:
        (d.base_dir / "srv").mkdir(parents=True)
        (d.base_dir / "etc").mkdir()
        (d.base_dir / "srv" / "link").symlink_to(d.base_dir / "etc")
    out = c.copy(fleet.names, str(src), "/srv/link/f")
    assert all(o.status is Status.FAILED and "resolves to /etc" in o.error for o in out.values()), out
    assert not any((d.base_dir / "etc" / "f").exists() for d in fleet.daemons)
    out = c.copy(fleet.names, str(src), "/srv/ok")
    assert all(o.status is Status.PASS for o in out.values()), out


def test_policy_limits_fetch_and_symlink_escapes(fleet_factory, pki, tmp_path):
    def secure_fleet_with_files(policy):
        fleet = fleet_factory(2, pki=pki, policy="[auth.policy.default]\nallow_exec = false\n" + policy)
        for d in fleet.daemons:
            (d.base_dir / "srv").mkdir()
            (d.base_dir / "etc").mkdir()
            (d.base_dir / "etc" / "shadow").write_text("secret")
            (d.base_dir / "srv" / "ok").write_text("fine on " + d.name)
            (d.base_dir / "srv" / "link").symlink_to(d.base_dir / "etc" / "shadow")
        return fleet, rclient.secure_client(str(pki), port=fleet.port)

    dest = tmp_path / "out"
    dest.mkdir()
    # A key that may not exec may not fetch either, unless allow_fetch says so.
    fleet, c = secure_fleet_with_files("")
    out = c.fetch(fleet.names, "/srv/ok", str(dest))
    assert all(o.status is Status.FAILED and "may not fetch" in o.error for o in out.values()), out
    fleet.stop()
    fleet, c = secure_fleet_with_files('allow_fetch = true\nfetch_src_prefixes = ["/srv"]\n')
    for src, message in [("/etc/shadow", "not allowed"), ("/srv/../etc/shadow", "not allowed"),
                         ("/srv/link", "resolves to /etc/shadow")]:
        out = c.fetch(fleet.names, src, str(dest))
        assert all(o.status is Status.FAILED and message in o.error for o in out.values()), (src, out)
    assert not any(p.is_file() for p in dest.rglob("*"))
    out = c.fetch(fleet.names, "/srv/ok", str(dest))
    assert all(o.status is Status.PASS for o in out.values()), out
    assert (dest / fleet.names[1] / "ok").read_text() == "fine on " + fleet.names[1]


def test_fetch_replayed_after_it_went_up_is_refused(secure_fleet, pki):
    for d in secure_fleet.daemons:
        (d.base_dir / "f").write_bytes(b"content of " + d.name.encode())
    env = envelope(secure_fleet.names, fetch=pb.FetchSpec(src="/f", chunk_size=4))
    data = env.SerializeToString()
    authenticator = auth.sign(data, signing_key(pki))
    chunks = []
    first = deliver(secure_fleet, controller_credentials(pki), data, authenticator, kind="fetch", chunks=chunks)
    assert all(o.status is Status.PASS for o in first.values()), first
    assert sorted({wire.chunk_node(f) for f in chunks}) == sorted(secure_fleet.names)
    chunks.clear()
    again = deliver(secure_fleet, controller_credentials(pki), data, authenticator, kind="fetch", chunks=chunks)
    assert all(o.status is Status.FAILED and "replayed" in o.error for o in again.values()), again
    assert chunks == []  # not a byte of any file went out again


def test_disk_full_on_one_node(fleet_factory, tmp_path):
    fleet = fleet_factory(3)
    small = fleet.daemons[1].base_dir / "data"
    small.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        src = tmp_path / "f"
        src.write_bytes(os.urandom(4 << 20))
        out = rclient.Client(port=fleet.port).copy(fleet.names, str(src), "/data/f", mkdirs=True, width=1)
        bad = out[fleet.daemons[1].name]
        assert bad.status is Status.FAILED and "No space left" in bad.error, bad
        for d in (fleet.daemons[0], fleet.daemons[2]):
            assert out[d.name].status is Status.PASS
            assert (d.base_dir / "data/f").read_bytes() == src.read_bytes()
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)])


def test_hostile_sizes_and_floods_leave_the_daemon_serving(fleet_factory):
    fleet = fleet_factory(1)
    d = fleet.daemons[0]
    c = rclient.Client(port=fleet.port)
    # Huge output is capped, flagged, and the command still passes.
    out = c.exec([d.name], "head -c 50000000 /dev/zero")[d.name]
    assert out.status is Status.PASS and out.stdout_truncated and len(out.stdout) == 1 << 20
    # A message over the transport cap is refused by gRPC, not by a crash.
    out = c.exec([d.name], "cat >/dev/null", stdin=b"x" * (wire.MAX_MESSAGE + 10))[d.name]
    assert out.status is not Status.PASS
    # Thousands of concurrent requests: some may be turned away, none crashes the daemon.

    async def flood():
        c2 = rclient.Client(port=fleet.port)
        return await asyncio.gather(*(c2.ping_async([d.name]) for _ in range(1500)),
                                    return_exceptions=True)

    results = asyncio.run(flood())
    assert not [r for r in results if isinstance(r, BaseException)]
    assert d.alive()
    assert c.ping([d.name])[d.name].status is Status.PASS


def _raw_call(address, method, payload, stream=False):
    with grpc.insecure_channel(address) as ch:
        if stream:
            call = ch.stream_stream(method, request_serializer=None, response_deserializer=None)
            it = call(iter(payload), timeout=5)
        else:
            it = ch.unary_stream(method, request_serializer=None, response_deserializer=None)(payload, timeout=5)
        try:
            return list(it)
        except grpc.RpcError as exc:
            return exc.code()


@pytest.fixture
def fuzz_fleet(fleet_factory, pki):
    return fleet_factory(1, pki=pki)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=2048), frames=st.lists(st.binary(max_size=512), max_size=5),
       method=st.sampled_from([wire.EXEC, wire.PING]))
def test_fuzzed_messages_never_crash_the_daemon(fuzz_fleet, pki, payload, frames, method):
    d = fuzz_fleet.daemons[0]
    creds = controller_credentials(pki)
    with grpc.secure_channel(d.address, creds, options=keys.channel_options(d.name)) as ch:
        for call in (lambda: list(ch.unary_stream(method, request_serializer=None, response_deserializer=None)(
                         payload, timeout=5)),
                     lambda: list(ch.stream_stream(wire.COPY, request_serializer=None, response_deserializer=None)(
                         iter([payload] + frames), timeout=5))):
            try:
                call()
            except grpc.RpcError as exc:
                assert exc.code() is not grpc.StatusCode.UNAVAILABLE, exc
    assert d.alive()


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40))
def test_fuzzed_node_sets_give_names_or_a_clear_error(text):
    try:
        names = rclient.expand(text)
    except rclient.ClientError as exc:
        assert str(exc)
    else:
        assert names and all(isinstance(n, str) and n for n in names)


def test_per_node_stdin_is_signed_per_node(secure_fleet, pki):
    c = rclient.secure_client(str(pki), port=secure_fleet.port)
    payloads = {n: b"payload for " + n.encode() for n in secure_fleet.names}
    out = c.exec(secure_fleet.names, "cat", stdin_by_node=payloads, width=2)
    for name, outcome in out.items():
        assert outcome.status is Status.PASS, outcome
        assert outcome.stdout == payloads[name]
