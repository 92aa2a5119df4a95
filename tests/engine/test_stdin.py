"""Per-node stdin: shared bases plus per-node deltas, checked against signed digests."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaytree import client as rclient
from relaytree import stdin as codec
from relaytree.results import Status


def roundtrip(payloads):
    digests, blobs, patches = codec.encode(payloads)
    return {n: codec.decode(n, digests[n], blobs, patches) for n in payloads}, blobs, patches


def test_near_identical_payloads_share_one_base():
    base = os.urandom(100_000)
    payloads = {"cn%d" % i: base[:5000] + b"/tmp/ansible-tmp-%d/" % i + base[5000:] for i in range(50)}
    decoded, blobs, patches = roundtrip(payloads)
    assert decoded == payloads
    assert len(blobs) == 1  # one full copy, 49 deltas of a few bytes
    assert max(len(p.middle) for p in patches.values()) < 64


def test_unrelated_payloads_become_their_own_bases():
    payloads = {"a": os.urandom(5000), "b": os.urandom(5000), "c": b""}
    decoded, blobs, _ = roundtrip(payloads)
    assert decoded == payloads
    assert len(blobs) >= 2


def test_tampered_delta_or_wrong_node_is_refused():
    payloads = {"a": b"x" * 1000, "b": b"x" * 999 + b"y"}
    digests, blobs, patches = codec.encode(payloads)
    patches["b"].middle = b"z"
    with pytest.raises(codec.StdinError, match="does not match the signed digest"):
        codec.decode("b", digests["b"], blobs, patches)
    with pytest.raises(codec.StdinError, match="no stdin"):
        codec.decode("c", digests["a"], blobs, patches)
    blobs2, patches2 = codec.prune(["a"], blobs, patches)
    assert set(patches2) == {"a"}


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=5), st.binary(max_size=600), min_size=1, max_size=8))
def test_roundtrip_property(payloads):
    decoded, _, _ = roundtrip(payloads)
    assert decoded == payloads


def test_each_node_runs_its_own_stdin_through_the_tree(fleet_factory):
    fleet = fleet_factory(7)
    base = os.urandom(200_000)
    payloads = {n: base + n.encode() for n in fleet.names}
    out = rclient.Client(port=fleet.port).exec(fleet.names, "sha256sum", width=2,
                                               stdin_by_node=payloads)
    import hashlib
    for name, outcome in out.items():
        assert outcome.status is Status.PASS, outcome
        assert outcome.stdout.split()[0].decode() == hashlib.sha256(payloads[name]).hexdigest()
    with pytest.raises(rclient.ClientError, match="exactly the target nodes"):
        rclient.Client(port=fleet.port).exec(fleet.names, "cat", stdin_by_node={fleet.names[0]: b""})
