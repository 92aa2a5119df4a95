"""Coordinator features used by the relay connection plugin: per-host stdin, raw output, window, done."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from relaytree import coordinator as coord
from relaytree.results import NodeOutcome, Status


class FakeClient:
    """Records exec_async calls; every node answers with its own stdin on stdout (raw bytes)."""

    calls: list = []

    async def exec_async(self, nodes, command, *, stdin=b"", stdin_by_node=None, **kw):
        FakeClient.calls.append({"nodes": list(nodes), "command": command, "stdin": stdin,
                                 "stdin_by_node": stdin_by_node, **kw})
        return {n: NodeOutcome(node=n, status=Status.PASS, rc=0,
                               stdout=(stdin_by_node or {}).get(n, stdin), stderr=b"\xff")
                for n in nodes}


@pytest.fixture
def fake_client(monkeypatch):
    FakeClient.calls = []
    monkeypatch.setattr(coord, "make_client", lambda port, tree: FakeClient())
    return FakeClient


class Writer:
    """Stands for the socket a reply is written to."""

    def __init__(self):
        self.data = bytearray()
        self.writes = 0

    def write(self, data):
        self.data += data
        self.writes += 1

    async def drain(self):
        pass


async def as_sent(reply, piece=3 << 20):
    """The reply as the worker receives it (written by coordinator.write_reply, parsed back)."""
    writer = Writer()
    await coord.write_reply(writer, reply, piece)
    assert writer.data.endswith(b"\n") and writer.data.count(b"\n") == 1
    return json.loads(writer.data)


def req(host, stdin=None, expected=("a", "b", "c"), task="t1", step="exec1", **kw):
    msg = {"op": "exec", "task": task, "step": step, "host": host, "node": host, "port": 1995,
           "args": {"command": ["/bin/sh", "-c", "cat"]}, "tree": {}, "expected": list(expected), "raw": True}
    if stdin is not None:
        msg["stdin_b64"] = base64.b64encode(stdin).decode()
    msg.update(kw)
    return msg


async def test_per_host_stdin_is_one_operation(fake_client):
    c = coord.Coordinator(gap=10)
    futs = [c.submit(req(h, stdin=b"payload for " + h.encode())) for h in "abc"]
    replies = [await as_sent(r) for r in await asyncio.gather(*futs)]
    (call,) = fake_client.calls
    assert call["nodes"] == ["a", "b", "c"] and call["stdin"] == b""
    assert call["stdin_by_node"] == {h: b"payload for " + h.encode() for h in "abc"}
    for host, reply in zip("abc", replies):
        out = reply["outcome"]
        assert base64.b64decode(out["stdout_b64"]) == b"payload for " + host.encode()
        assert base64.b64decode(out["stderr_b64"]) == b"\xff"
        assert "stdout" not in out and "stderr" not in out
    assert c.stats()["operations"][0]["stdin"] == "per-node"


async def test_equal_stdins_are_sent_once(fake_client):
    c = coord.Coordinator(gap=10)
    await asyncio.gather(*[c.submit(req(h, stdin=b"same")) for h in "abc"])
    (call,) = fake_client.calls
    assert call["stdin"] == b"same" and call["stdin_by_node"] is None
    assert c.stats()["operations"][0]["stdin"] == "shared"


async def test_text_replies_unchanged_without_raw(fake_client):
    c = coord.Coordinator(gap=10)
    reply = await c.submit(req("a", stdin=b"hi", expected="a", raw=False))
    assert reply["outcome"]["stdout"] == "hi" and "stdout_b64" not in reply["outcome"]


async def test_bad_stdin_requests():
    c = coord.Coordinator(gap=10)
    with pytest.raises(coord.RequestError, match="bad base64"):
        c.submit(dict(req("a"), stdin_b64="***"))
    with pytest.raises(coord.RequestError, match="not both"):
        c.submit(dict(req("a", stdin=b"x"), args={"command": "cat", "stdin": "y"}))
    with pytest.raises(coord.RequestError, match="exec requests only"):
        c.submit(dict(req("a", stdin=b"x"), op="copy"))
    with pytest.raises(coord.RequestError, match="window"):
        c.submit(req("a", window="5"))


async def test_window_without_strategy(fake_client):
    """forks=2: when two hosts wait in the task nobody else can come, so the step goes."""
    c = coord.Coordinator(gap=10)
    futs = [c.submit(req(h, expected="abcd", window=2)) for h in "ab"]
    await asyncio.gather(*futs)
    assert [call["nodes"] for call in fake_client.calls] == [["a", "b"]]


async def test_done_hosts_and_a_new_run(fake_client):
    c = coord.Coordinator(gap=10)
    first = c.submit(req("a"))
    c.done("t1", ["b", "c"])  # b, c finished the task (the relay connection's close())
    await first
    assert [call["nodes"] for call in fake_client.calls] == [["a"]]
    c.done("t1", ["a"])
    # The task runs again (a handler): a done host coming back waits for the others again.
    again = [c.submit(req("b", step="exec1"))]
    await asyncio.sleep(0.05)
    assert len(fake_client.calls) == 1
    again += [c.submit(req(h, step="exec1")) for h in "ac"]
    await asyncio.gather(*again)
    assert sorted(fake_client.calls[-1]["nodes"]) == ["a", "b", "c"]


def test_stdin_parts_keep_similar_stdins_together():
    payload = bytes(range(256)) * 400  # 100 KiB
    similar = {"n%d" % i: payload[:5000] + b"host %d" % i + payload[5000:] for i in range(50)}
    assert coord.stdin_parts(similar, 1 << 20) == [list(similar)]  # 100 KiB + 50 small deltas
    different = {"n%d" % i: bytes([i]) * 100_000 for i in range(10)}
    parts = coord.stdin_parts(different, 250_000)
    assert [len(p) for p in parts] == [2, 2, 2, 2, 2]
    assert sorted(n for p in parts for n in p) == sorted(different)


async def test_large_different_stdins_go_as_several_operations(fake_client, monkeypatch):
    monkeypatch.setattr(coord, "STDIN_BUDGET", 150_000)
    c = coord.Coordinator(gap=10)
    replies = [await as_sent(r, piece=3 * 1000)  # the base64 in many pieces
               for r in await asyncio.gather(*[c.submit(req(h, stdin=h.encode() * 100_000)) for h in "abc"])]
    assert sorted(len(call["nodes"]) for call in fake_client.calls) == [1, 1, 1]
    for host, reply in zip("abc", replies):
        assert base64.b64decode(reply["outcome"]["stdout_b64"]) == host.encode() * 100_000
    (op,) = c.stats()["operations"]
    assert op["stdin"] == "per-node" and op["parts"] == 3 and len(op["hosts"]) == 3


async def test_fetch_is_one_tree_operation_with_own_sources_and_destinations(fleet_factory, tmp_path):
    """The relay connection's fetch_file: each host its own src and out_path, one tree fetch per step."""
    fleet = fleet_factory(3)
    for d in fleet.daemons:
        (d.base_dir / "logs").mkdir()
        (d.base_dir / "logs" / ("%s.log" % d.name)).write_bytes(d.name.encode() * 1000)
    (fleet.daemons[2].base_dir / "logs" / ("%s.log" % fleet.daemons[2].name)).unlink()
    c = coord.Coordinator(gap=10)
    hosts = ["h-" + n for n in fleet.names]

    def fetch(name):
        return {"op": "fetch", "task": "T", "step": "fetch1", "host": "h-" + name, "node": name,
                "port": fleet.port, "expected": hosts, "args": {}, "tree": {"insecure": True},
                "src": "/logs/%s.log" % name, "out_path": str(tmp_path / "h-{}".format(name) / "out.log")}

    replies = await asyncio.gather(*[c.submit(fetch(n)) for n in fleet.names])
    (op,) = c.stats()["operations"]
    assert op["op"] == "fetch" and sorted(op["hosts"]) == sorted(hosts) and not op["error"]
    for name, reply in zip(fleet.names[:2], replies):
        out = reply["outcome"]
        path = tmp_path / ("h-" + name) / "out.log"
        assert out["status"] == "PASS" and out["dest"] == str(path) and out["size"] == 9000, out
        assert path.read_bytes() == name.encode() * 1000
    missing = replies[2]["outcome"]
    assert missing["status"] == "FAILED" and "No such file" in missing["error"], missing
    assert not (tmp_path / ("h-" + fleet.names[2])).exists()
    with pytest.raises(coord.RequestError, match="out_path"):
        c.submit(dict(fetch(fleet.names[0]), out_path="relative"))
    with pytest.raises(coord.RequestError, match="src"):
        c.submit(dict(fetch(fleet.names[0]), src=None))


async def test_big_raw_output_is_written_in_pieces():
    data = bytes(range(256)) * 4001  # not a multiple of the piece: padding only at the end
    member = coord.Member("h", "n", None, raw=True)
    reply = {"ok": True, "outcome": coord._outcome_dict(NodeOutcome(node="n", status=Status.PASS, rc=0,
                                                                    stdout=data, stderr=b"e"), member)}
    writer = Writer()
    await coord.write_reply(writer, reply, piece=3 * 100)
    assert writer.writes > 30
    out = json.loads(writer.data)["outcome"]
    assert base64.b64decode(out["stdout_b64"]) == data and base64.b64decode(out["stderr_b64"]) == b"e"
    assert out["node"] == "n" and "stdout" not in out
