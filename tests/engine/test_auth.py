"""Request signing and verification (relaytree.auth), with real Ed25519."""

from __future__ import annotations

import hashlib
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaytree import PROTOCOL_VERSION, auth, keys
from relaytree.auth import AuthError, KeyRule, Policy, ReplayError, Verifier
from relaytree.v1 import relaytree_pb2 as pb

T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def key():
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def other_key():
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def kid(key):
    return keys.key_id(key)


def make_verifier(key, clock, policy=None, names=("node2", "10.0.0.2"), **kw):
    kw.setdefault("daemon_user", "root")
    return Verifier({keys.key_id(key): key.public_key()}, policy, node_names=set(names), clock=clock, **kw)


@pytest.fixture
def verifier(key, clock):
    return make_verifier(key, clock)


def envelope(clock, op="exec", scope="node[1-4]", validity=300.0, **spec):
    env = pb.Envelope(scope=scope)
    if op == "exec":
        env.exec.CopyFrom(pb.ExecSpec(**(spec or {"shell": "id"})))
    elif op == "copy":
        spec.setdefault("dest", "/srv/data/file")
        env.copy.CopyFrom(pb.CopySpec(size=3, sha256=hashlib.sha256(b"abc").digest(), **spec))
    elif op == "ping":
        env.ping.CopyFrom(pb.PingSpec())
    elif op == "fetch":
        spec.setdefault("chunk_size", 1 << 20)
        if "src_by_node" not in spec:
            spec.setdefault("src", "/var/log/messages")
        env.fetch.CopyFrom(pb.FetchSpec(**spec))
    return auth.stamp(env, validity=validity, clock=clock)


def signed(key, env):
    return auth.sign_envelope(env, key)


def rejected(verifier, data, authn, match, exc=AuthError):
    with pytest.raises(exc, match=match) as e:
        verifier.verify(data, authn)
    return e.value


# --------------------------------------------------------------------------- happy path


def test_sign_verify_roundtrip(key, kid, clock, verifier):
    env = envelope(clock, stdin=b"payload", user="", env={"A": "1"})
    data, a = signed(key, env)
    assert a.key_id == kid and len(a.signature) == 64
    got = verifier.verify(data, a)
    assert got == env
    assert got.SerializeToString() == data
    assert got.protocol_version == PROTOCOL_VERSION and len(got.nonce) == 16 and got.request_id


def test_verify_request_message(key, clock, verifier):
    data, a = signed(key, envelope(clock, "ping"))
    req = pb.Request(envelope=data, auth=a, route=pb.Route(targets=[pb.Target(name="node2", address="x:1")]))
    # what a relay forwards: the envelope bytes unchanged, the route rewritten
    wire = pb.Request.FromString(req.SerializeToString())
    wire.route.targets.pop(0)
    assert verifier.verify_request(pb.Request.FromString(wire.SerializeToString())).WhichOneof("operation") == "ping"
    unsigned = pb.Request(envelope=data)
    with pytest.raises(AuthError, match="unsigned request"):
        verifier.verify_request(unsigned)


def test_keys_from_files(tmp_path, clock):
    info = keys.init_signing_key(tmp_path)
    priv = keys.load_signing_key(info.key)
    v = Verifier([info.pub], node_names={"node1"}, clock=clock)
    assert set(v.trusted_keys) == {info.key_id}
    data, a = signed(priv, envelope(clock, "ping"))
    assert a.key_id == info.key_id
    assert v.verify(data, a).ping == pb.PingSpec()


def test_verifier_configuration_errors(key, other_key):
    with pytest.raises(ValueError, match="key id"):
        Verifier({keys.key_id(other_key): key.public_key()}, node_names={"n"})
    with pytest.raises(ValueError, match="no trusted"):
        Verifier({}, node_names={"n"})
    with pytest.raises(ValueError, match="node_names"):
        Verifier([key.public_key()], node_names=set())


# --------------------------------------------------------------------------- authenticity


def test_unsigned(key, kid, clock, verifier):
    data, _ = signed(key, envelope(clock))
    rejected(verifier, data, None, "^unsigned request$")
    rejected(verifier, data, pb.Authenticator(), "^unsigned request$")
    rejected(verifier, data, pb.Authenticator(key_id=kid), "^unsigned request$")
    assert len(verifier.nonces) == 0


def test_wrong_key(key, other_key, kid, clock, verifier):
    env = envelope(clock)
    data, a = signed(other_key, env)
    e = rejected(verifier, data, a, f"unknown key id '{keys.key_id(other_key)}'")
    assert e.code == "unknown_key"
    # signed by another key but claiming the trusted key's id
    forged = pb.Authenticator(key_id=kid, signature=a.signature)
    assert rejected(verifier, data, forged, "^bad signature").code == "bad_signature"


@pytest.mark.parametrize("pos", [0, 1, 31, 32, 63])
def test_bit_flipped_signature(key, kid, clock, verifier, pos):
    data, a = signed(key, envelope(clock))
    sig = bytearray(a.signature)
    sig[pos] ^= 0x01
    rejected(verifier, data, pb.Authenticator(key_id=kid, signature=bytes(sig)), "^bad signature")
    rejected(verifier, data, pb.Authenticator(key_id=kid, signature=a.signature[:-1]), "^bad signature")
    rejected(verifier, data, pb.Authenticator(key_id=kid, signature=a.signature + b"\0"), "^bad signature")
    assert verifier.verify(data, a)  # the genuine one still passes (nonce not burnt)


def test_every_bit_flip_of_the_envelope_is_rejected(key, clock, verifier):
    env = envelope(clock, "copy", dest="/srv/data/f", mode="0644", owner="root")
    data, a = signed(key, env)
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            tampered = bytearray(data)
            tampered[i] ^= bit
            rejected(verifier, bytes(tampered), a, "^bad signature")
    rejected(verifier, data + b"\x00", a, "^bad signature")  # appended bytes
    rejected(verifier, data[:-1], a, "^bad signature")  # truncated
    assert len(verifier.nonces) == 0


def test_reserialized_envelope_is_not_trusted(key, clock, verifier):
    """Fields changed by a relay that re-encodes the envelope break the signature."""
    env = envelope(clock, "copy")
    data, a = signed(key, env)
    env.copy.dest = "/etc/shadow"
    rejected(verifier, env.SerializeToString(), a, "^bad signature")


def test_malformed_but_signed(key, clock, verifier):
    for garbage in (b"\xff\xff\xff", b"\x0a\x05ab"):
        rejected(verifier, garbage, auth.sign(garbage, key), "^malformed envelope")
    env = envelope(clock)
    env.ClearField("request_id")
    rejected(verifier, *signed(key, env), match=r"malformed envelope \(no request id\)")
    env = envelope(clock)
    env.nonce = b"1234"
    rejected(verifier, *signed(key, env), match=r"malformed envelope \(nonce")
    env = envelope(clock)
    env.ClearField("exec")
    rejected(verifier, *signed(key, env), match=r"malformed envelope \(no operation\)")
    env = envelope(clock, scope="node[1-")
    rejected(verifier, *signed(key, env), match=r"malformed envelope \(bad scope")
    env = envelope(clock, scope="node[1-1000000000]")
    rejected(verifier, *signed(key, env), match=r"malformed envelope \(bad scope")
    env = envelope(clock, scope="")
    rejected(verifier, *signed(key, env), match=r"malformed envelope \(empty scope\)")


def test_protocol_version(key, clock, verifier):
    env = envelope(clock)
    env.protocol_version = PROTOCOL_VERSION + 1
    e = rejected(verifier, *signed(key, env), match=f"protocol version {PROTOCOL_VERSION + 1} not supported")
    assert e.code == "protocol"


# --------------------------------------------------------------------------- time


def test_expired(key, clock, verifier):
    data, a = signed(key, envelope(clock, validity=60))
    clock.now += 60 + 30 + 5  # past not_after + skew
    e = rejected(verifier, data, a, r"^expired \(not_after .* is 35\.0 s ago\)")
    assert e.code == "expired"


def test_expiry_within_skew_is_accepted(key, clock, verifier):
    data, a = signed(key, envelope(clock, validity=60))
    clock.now += 60 + 29  # node clock ahead of the controller's, within the 30 s tolerance
    assert verifier.verify(data, a)


def test_validity_too_long(key, clock):
    v = make_verifier(key, clock, max_validity=600)
    rejected(v, *signed(key, envelope(clock, validity=600 + 31)), match=r"^validity too long")
    assert v.verify(*signed(key, envelope(clock, validity=600)))
    assert v.verify(*signed(key, envelope(clock, validity=600 + 29)))  # skew tolerance


def test_future_dated_beyond_skew(key, clock):
    """A controller clock far ahead makes not_after lie beyond what the node allows."""
    v = make_verifier(key, clock, max_validity=600)
    ahead = Clock(clock.now + 120)
    rejected(v, *signed(key, envelope(ahead, validity=600)), match=r"^validity too long")
    ahead = Clock(clock.now + 20)  # within skew
    assert v.verify(*signed(key, envelope(ahead, validity=600)))


# --------------------------------------------------------------------------- replay


def test_replay_is_detected_and_carries_request_id(key, kid, clock, verifier):
    env = envelope(clock)
    data, a = signed(key, env)
    assert verifier.verify(data, a)
    for _ in range(2):
        e = rejected(verifier, data, a, r"^replayed request \(nonce seen\)", ReplayError)
        assert isinstance(e, AuthError) and e.code == "replay"
        assert e.request_id == env.request_id and e.envelope == env and e.key_id == kid


def test_nonce_reuse_with_other_content(key, clock, verifier):
    env = envelope(clock)
    assert verifier.verify(*signed(key, env))
    env.exec.shell = "reboot"
    e = rejected(verifier, *signed(key, env), match="nonce reused by a different request")
    assert not isinstance(e, ReplayError)


def test_nonce_recorded_only_when_everything_passed(key, clock):
    v = make_verifier(key, clock, max_validity=600)
    early = Clock(clock.now + 300)  # controller ahead: the request looks too long-lived now...
    data, a = signed(key, envelope(early, validity=600))
    rejected(v, data, a, "^validity too long")
    assert len(v.nonces) == 0
    clock.now += 300  # ...and fine once the node's clock catches up: not a replay
    assert v.verify(data, a)
    assert len(v.nonces) == 1


def test_rejected_policy_does_not_burn_nonce(key, kid, clock):
    v = make_verifier(key, clock, Policy({kid: KeyRule(allow_exec=False)}))
    data, a = signed(key, envelope(clock))
    rejected(v, data, a, "may not exec")
    rejected(v, data, a, "may not exec")  # still a policy refusal, not a replay
    assert len(v.nonces) == 0


def test_concurrent_duplicates_run_once(key, clock, verifier):
    data, a = signed(key, envelope(clock))
    results = []

    def go():
        try:
            verifier.verify(data, a)
            results.append("ok")
        except ReplayError:
            results.append("dup")

    threads = [threading.Thread(target=go) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["dup"] * 15 + ["ok"]


def test_nonce_cache_is_bounded(key, clock):
    v = make_verifier(key, clock, nonce_cache_size=3)
    sent = []
    for i in range(3):
        sent.append(signed(key, envelope(clock, validity=100 + i)))
        assert v.verify(*sent[-1])
    assert len(v.nonces) == 3
    # full of unexpired entries: a request expiring before all of them is refused
    e = rejected(v, *signed(key, envelope(clock, validity=50)), match="^nonce cache full")
    assert e.code == "nonce_cache_full"
    # a request expiring later evicts the entry expiring first ...
    assert v.verify(*signed(key, envelope(clock, validity=200)))
    assert len(v.nonces) == 3
    # ... and the evicted request cannot be replayed (refused, never accepted)
    rejected(v, *sent[0], match="^nonce cache full")
    # the others are still recognized as duplicates
    rejected(v, *sent[1], match="^replayed request", exc=ReplayError)
    # once everything has expired, the cache empties and new requests pass
    clock.now += 200 + 31
    assert v.verify(*signed(key, envelope(clock, validity=100)))
    assert len(v.nonces) == 1


def test_expired_entries_are_purged_and_clock_step_back_is_safe(key, clock):
    v = make_verifier(key, clock, nonce_cache_size=10)
    old = signed(key, envelope(clock, validity=60))
    assert v.verify(*old)
    clock.now += 60 + 31
    assert v.verify(*signed(key, envelope(clock, validity=60)))
    assert len(v.nonces) == 1  # the first one was purged
    clock.now = T0  # wall clock steps back: the purged request looks valid again
    e = rejected(v, *old, match="replay cache horizon")
    assert e.code == "nonce_window"


def test_nonce_file_survives_restart(key, clock, tmp_path):
    path = tmp_path / "state" / "nonces"
    v1 = make_verifier(key, clock, nonce_file=path)
    sent = [signed(key, envelope(clock)) for _ in range(3)]
    for s in sent:
        v1.verify(*s)
    v1.close()
    with open(path, "a") as f:
        f.write("deadbeef 12")  # torn last line after a crash
    v2 = make_verifier(key, clock, nonce_file=path)
    for s in sent:
        rejected(v2, *s, match="^replayed request", exc=ReplayError)
    assert v2.verify(*signed(key, envelope(clock)))
    v2.close()
    # once expired, the entries are dropped on load
    clock.now += 400
    v3 = make_verifier(key, clock, nonce_file=path)
    assert len(v3.nonces) == 0
    rejected(v3, *sent[0], match="^expired")
    v3.close()


# --------------------------------------------------------------------------- scope


def test_scope_mismatch(key, clock, verifier):
    e = rejected(verifier, *signed(key, envelope(clock, scope="node[5-9],gpu1")), match="^node node2 not in the request scope")
    assert e.code == "scope"


@pytest.mark.parametrize(
    "names,scope",
    [
        ({"node2"}, "node[1-4]"),
        ({"gpu7", "10.0.0.3"}, "10.0.0.[1-5]"),
        ({"Node2.Example.org"}, "node[1-3].example.org"),
        ({"node0042"}, "node[0001-0100]"),
        ({"c1", "node3"}, "node3"),
    ],
)
def test_scope_match(key, clock, names, scope):
    v = make_verifier(key, clock, names=names)
    assert v.verify(*signed(key, envelope(clock, scope=scope)))


def test_scope_never_resolves_groups(key, clock):
    v = make_verifier(key, clock, names={"node1"})
    rejected(v, *signed(key, envelope(clock, scope="@all")), match="not in the request scope")
    rejected(v, *signed(key, envelope(clock, scope="node10")), match="not in the request scope")


# --------------------------------------------------------------------------- policy


@pytest.fixture
def restricted(key, kid, clock):
    rule = KeyRule(allow_exec=True, copy_dest_prefixes=["/srv/data", "/opt/app/"], run_as_users=["app", "nobody"])
    return make_verifier(key, clock, Policy({kid: rule}))


def test_exec_denied(key, kid, clock):
    v = make_verifier(key, clock, Policy({kid: KeyRule(allow_exec=False)}))
    e = rejected(v, *signed(key, envelope(clock)), match=f"^key {kid} may not exec$")
    assert e.code == "policy"
    assert v.verify(*signed(key, envelope(clock, "copy")))
    assert v.verify(*signed(key, envelope(clock, "ping")))


def test_copy_denied(key, kid, clock):
    v = make_verifier(key, clock, Policy({kid: KeyRule(allow_copy=False)}))
    rejected(v, *signed(key, envelope(clock, "copy")), match=f"^key {kid} may not copy$")
    assert v.verify(*signed(key, envelope(clock)))


@pytest.mark.parametrize(
    "dest",
    [
        "/etc/x",
        "/srv/../etc/passwd",
        "/srv/data/../../etc/shadow",
        "/srv/data/../dataX/f",
        "/srv/dataX/f",
        "/srv/data-evil",
        "/srv",
        "//etc/x",
        "/opt/app/../../root/.ssh/authorized_keys",
        "/opt",
    ],
)
def test_copy_destination_outside_prefixes(key, kid, clock, restricted, dest):
    e = rejected(restricted, *signed(key, envelope(clock, "copy", dest=dest)), match=f"^copy destination {dest} not allowed for key {kid}")
    assert e.code == "policy"


@pytest.mark.parametrize("dest", ["/srv/data", "/srv/data/", "/srv/data/sub/f", "/srv/./data/x/../y", "//srv/data/z", "/opt/app/bin/tool"])
def test_copy_destination_inside_prefixes(key, clock, restricted, dest):
    assert restricted.verify(*signed(key, envelope(clock, "copy", dest=dest)))


def test_copy_destination_and_source_name_sanity(key, clock, verifier):
    rejected(verifier, *signed(key, envelope(clock, "copy", dest="srv/data/f")), match="not absolute")
    for bad in ("../../etc/passwd", "..", "a/b"):
        rejected(verifier, *signed(key, envelope(clock, "copy", dest="/srv/data", src_name=bad)), match="bad source name")
    assert verifier.verify(*signed(key, envelope(clock, "copy", dest="/srv/data", src_name="f.tar")))


def test_fetch_follows_exec_unless_told(key, kid, clock):
    """allow_fetch defaults to allow_exec: exec can read any file anyway, copy cannot."""
    assert KeyRule().allow_fetch is True and KeyRule(allow_exec=False).allow_fetch is False
    copy_only = make_verifier(key, clock, Policy({kid: KeyRule(allow_exec=False)}))
    e = rejected(copy_only, *signed(key, envelope(clock, "fetch")), match=f"^key {kid} may not fetch$")
    assert e.code == "policy"
    fetch_only = make_verifier(key, clock, Policy({kid: KeyRule(allow_exec=False, allow_fetch=True)}))
    assert fetch_only.verify(*signed(key, envelope(clock, "fetch")))
    no_fetch = make_verifier(key, clock, Policy({kid: KeyRule(allow_fetch=False)}))
    rejected(no_fetch, *signed(key, envelope(clock, "fetch")), match="may not fetch")
    assert no_fetch.verify(*signed(key, envelope(clock)))


def test_fetch_source_prefixes(key, kid, clock):
    v = make_verifier(key, clock, Policy({kid: KeyRule(fetch_src_prefixes=["/var/log/"])}))
    assert v.verify(*signed(key, envelope(clock, "fetch", src="/var/log/slurmd.log")))
    for src in ("/etc/shadow", "/var/log/../../etc/shadow", "/var/logs/x", "var/log/x"):
        rejected(v, *signed(key, envelope(clock, "fetch", src=src)), match=f"^fetch source {src} not allowed")
    # Per-node paths: every one of them must be allowed.
    mixed = {"node1": "/var/log/a", "node2": "/root/.ssh/id_ed25519"}
    rejected(v, *signed(key, envelope(clock, "fetch", src_by_node=mixed)), match="/root/.ssh/id_ed25519 not allowed")
    assert v.verify(*signed(key, envelope(clock, "fetch", src_by_node={"node1": "/var/log/a", "node2": "/var/log/b"})))
    assert v.rule_for(kid).src_allowed("/var/log/x") and not v.rule_for(kid).src_allowed("/etc/x")
    p = Policy.from_dict({"keys": {kid: {"allow_fetch": True, "fetch_src_prefixes": ["/var/log"]}}})
    assert p.rule_for(kid) == KeyRule(allow_fetch=True, fetch_src_prefixes=["/var/log"])
    with pytest.raises(ValueError, match="fetch source prefix must be an absolute path"):
        KeyRule(fetch_src_prefixes=["var/log"])


def test_run_as_denied(key, kid, clock, restricted):
    e = rejected(restricted, *signed(key, envelope(clock, shell="id", user="bob")), match=f"^run-as user 'bob' not allowed for key {kid}$")
    assert e.code == "policy"
    # "" means the daemon's own user (root here)
    rejected(restricted, *signed(key, envelope(clock, shell="id")), match="run-as user 'root' not allowed")
    assert restricted.verify(*signed(key, envelope(clock, shell="id", user="app")))


def test_policy_default_and_unlisted_keys(key, other_key, kid, clock):
    both = {keys.key_id(k): k.public_key() for k in (key, other_key)}
    strict = Policy({kid: KeyRule()}, default=None)
    v = Verifier(both, strict, node_names={"node2"}, clock=clock)
    assert v.verify(*signed(key, envelope(clock)))
    rejected(v, *signed(other_key, envelope(clock)), match=f"key {keys.key_id(other_key)} is not authorized")
    lax = Verifier(both, Policy({kid: KeyRule(allow_exec=False)}), node_names={"node2"}, clock=clock)
    assert lax.verify(*signed(other_key, envelope(clock)))  # default: allowed
    rejected(lax, *signed(key, envelope(clock)), match="may not exec")


def test_policy_from_dict(kid):
    p = Policy.from_dict(
        {"keys": {kid: {"allow_exec": False, "copy_dest_prefixes": ["/srv/"]}}, "default": None}
    )
    assert p.rule_for(kid) == KeyRule(allow_exec=False, copy_dest_prefixes=["/srv"])
    assert p.rule_for("0" * 16) is None
    with pytest.raises(ValueError, match="unknown key rule"):
        Policy.from_dict({"keys": {kid: {"allow_exce": False}}})
    with pytest.raises(ValueError, match="absolute"):
        KeyRule(copy_dest_prefixes=["srv"])


def test_rule_for_resolved_paths(kid, key, clock, restricted):
    """The daemon re-checks the realpath of the final destination (symlinks)."""
    rule = restricted.rule_for(kid)
    assert rule.dest_allowed("/srv/data/link/f")
    assert not rule.dest_allowed("/etc/f")
    assert not rule.dest_allowed("relative")


# --------------------------------------------------------------------------- fuzzing


_fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_fuzz
@given(data=st.binary(max_size=512), key_id=st.one_of(st.text(max_size=40), st.just("K")), sig=st.binary(max_size=80))
def test_fuzz_random_inputs_only_raise_auth_error(key, kid, data, key_id, sig):
    v = make_verifier(key, Clock())
    a = pb.Authenticator(key_id=kid if key_id == "K" else key_id, signature=sig)
    with pytest.raises(AuthError):
        v.verify(data, a)


@_fuzz
@given(data=st.binary(max_size=512))
def test_fuzz_signed_random_bytes_never_crash(key, data):
    v = make_verifier(key, Clock())
    try:
        env = v.verify(data, auth.sign(data, key))
    except AuthError:
        return
    assert isinstance(env, pb.Envelope)


@_fuzz
@given(
    scope=st.text(max_size=40),
    rid=st.text(max_size=10),
    nonce=st.binary(max_size=70),
    not_after=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    dest=st.text(max_size=30),
    src=st.text(max_size=10),
    user=st.text(max_size=8),
    op=st.sampled_from(["exec", "copy", "ping", None]),
    version=st.integers(min_value=0, max_value=3),
)
def test_fuzz_signed_envelopes_never_crash(key, kid, scope, rid, nonce, not_after, dest, src, user, op, version):
    v = make_verifier(key, Clock(), Policy({kid: KeyRule(copy_dest_prefixes=["/srv"], run_as_users=["app"])}))
    env = pb.Envelope(protocol_version=version, request_id=rid, nonce=nonce, not_after_ms=not_after, scope=scope)
    if op == "exec":
        env.exec.user = user
    elif op == "copy":
        env.copy.dest = dest
        env.copy.src_name = src
    elif op == "ping":
        env.ping.SetInParent()
    data, a = signed(key, env)
    try:
        got = v.verify(data, a)
    except AuthError as e:
        assert str(e)
        return
    assert got == env


@_fuzz
@given(junk=st.one_of(st.none(), st.integers(), st.text(max_size=5), st.binary(max_size=5)))
def test_fuzz_wrong_types(key, junk):
    v = make_verifier(key, Clock())
    with pytest.raises(AuthError):
        v.verify(b"\x08\x01", junk)
    with pytest.raises(AuthError):
        v.verify(junk, pb.Authenticator(key_id="x", signature=b"y"))
