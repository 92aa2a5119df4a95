"""The coordinator: tree operations (fake client), the server glue, and the process (real daemons).

The batching rules themselves are tested without any of this in test_coordinator_batching.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict

import pytest

from relaytree import client as rclient
from relaytree.coordinator import operations
from relaytree.coordinator.batching import RequestError
from relaytree.coordinator.operations import Spec, TreeOperations, stdin_parts
from relaytree.coordinator import server as coord_server
from relaytree.coordinator.server import CoordinatorServer
from relaytree.results import NodeOutcome, Status


class FakeClient:
    """Records the Client calls; exec answers every node with its own stdin on stdout (raw bytes)."""

    def __init__(self, fail=None):
        self.calls = []
        self.fail = fail

    async def exec_async(self, nodes, command, *, stdin=b"", stdin_by_node=None, **kw):
        self.calls.append(dict({"op": "exec", "nodes": list(nodes), "command": command, "stdin": stdin,
                                "stdin_by_node": stdin_by_node}, **kw))
        if self.fail:
            raise self.fail
        return {n: NodeOutcome(node=n, status=Status.PASS, rc=0, stdout=(stdin_by_node or {}).get(n, stdin),
                               stderr=b"\xff") for n in nodes}

    async def ping_async(self, nodes, **kw):
        self.calls.append(dict({"op": "ping", "nodes": list(nodes)}, **kw))
        return {n: NodeOutcome(node=n, status=Status.PASS) for n in nodes}

    async def copy_async(self, nodes, src, dest, **kw):
        self.calls.append(dict({"op": "copy", "nodes": list(nodes), "src": src, "dest": dest}, **kw))
        return {n: NodeOutcome(node=n, status=Status.PASS, changed=True) for n in nodes}


@pytest.fixture
def client():
    return FakeClient()


@pytest.fixture
def tree_ops(client):
    made = []

    def factory(port, tree):
        made.append((port, tree))
        return client

    ops = TreeOperations(client_factory=factory)
    ops.made = made
    return ops


def server(tree_ops, **kw):
    return CoordinatorServer(operations=tree_ops, **dict({"gap": 10}, **kw))


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
    """The reply as the worker receives it (written by write_reply, parsed back)."""
    writer = Writer()
    await coord_server.write_reply(writer, reply, piece)
    assert writer.data.endswith(b"\n") and writer.data.count(b"\n") == 1
    return json.loads(writer.data)


def req(host, stdin=None, expected=("a", "b", "c"), task="t1", step="exec1", **kw):
    msg = {"op": "exec", "task": task, "step": step, "host": host, "node": host, "port": 1995,
           "args": {"command": ["/bin/sh", "-c", "cat"]}, "tree": {}, "expected": list(expected), "raw": True}
    if stdin is not None:
        msg["stdin_b64"] = base64.b64encode(stdin).decode()
    msg.update(kw)
    return msg


# -- tree operations ------------------------------------------------------------------------


async def test_tree_options_reach_the_client(tree_ops, client):
    spec = Spec("ping", 2000, {}, {"width": 8, "deadline": 30, "connect_timeout": 2, "insecure": True})
    outcomes, extra = await tree_ops.run(spec, ["a", "b"])
    assert sorted(outcomes) == ["a", "b"] and extra == {}
    assert client.calls == [{"op": "ping", "nodes": ["a", "b"], "width": 8, "deadline": 30}]
    assert tree_ops.made == [(2000, spec.tree)]
    await tree_ops.run(Spec("ping", 2000, {}, {}), ["a"])
    assert client.calls[-1] == {"op": "ping", "nodes": ["a"], "deadline": None}  # the client's own width


async def test_exec_stdins(tree_ops, client):
    command = {"command": "cat", "env": {"A": "1"}, "timeout": 5, "output_limit": 10}
    _outcomes, extra = await tree_ops.run(Spec("exec", 1995, command, {}), ["a", "b"], {"a": b"x", "b": b"y"})
    assert client.calls[-1]["stdin_by_node"] == {"a": b"x", "b": b"y"} and extra == {"stdin": "per-node"}
    assert client.calls[-1]["env"] == {"A": "1"} and client.calls[-1]["timeout"] == 5
    _outcomes, extra = await tree_ops.run(Spec("exec", 1995, command, {}), ["a", "b"], {"a": b"x", "b": b"x"})
    assert client.calls[-1]["stdin"] == b"x" and client.calls[-1]["stdin_by_node"] is None
    assert extra == {"stdin": "shared"}
    # a member without its own stdin gets args.stdin
    await tree_ops.run(Spec("exec", 1995, dict(command, stdin="t"), {}), ["a", "b"], {"a": b"x"})
    assert client.calls[-1]["stdin_by_node"] == {"a": b"x", "b": b"t"}
    with pytest.raises(rclient.ClientError, match="command must be"):
        await tree_ops.run(Spec("exec", 1995, {"command": 3}, {}), ["a"])
    with pytest.raises(rclient.ClientError, match="unknown operation 'nope'"):
        await tree_ops.run(Spec("nope", 1995, {}, {}), ["a"])


async def test_copy_reports_the_source_digest(tree_ops, client, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"hello\n")
    args = {"src": str(src), "dest": "/d/f", "mode": "0644", "mkdirs": True, "chunk_size": 4096}
    _outcomes, extra = await tree_ops.run(Spec("copy", 1995, args, {}), ["a"])
    assert extra == {"checksum": "f572d396fae9206628714fb2ce00f72e94f2258f", "size": 6}
    call = client.calls[-1]
    assert call["mode"] == "0644" and call["mkdirs"] is True and call["chunk_size"] == 4096 and call["check"] is False
    _outcomes, extra = await tree_ops.run(Spec("copy", 1995, dict(args, src=str(tmp_path / "missing")), {}), ["a"])
    assert extra == {"checksum": None, "size": None}  # the copy itself reports the missing file


def test_spec_key_is_the_operation_identity():
    base = Spec("exec", 1995, {"command": "x", "env": {"A": "1", "B": "2"}}, {"width": 4})
    assert base.key() == Spec("exec", 1995, {"env": {"B": "2", "A": "1"}, "command": "x"}, {"width": 4}).key()
    assert base.key() != Spec("exec", 1996, base.args, base.tree).key()
    assert base.key() != Spec("exec", 1995, base.args, {"width": 8}).key()


def test_stdin_parts_keep_similar_stdins_together():
    payload = bytes(range(256)) * 400  # 100 KiB
    similar = {"n%d" % i: payload[:5000] + b"host %d" % i + payload[5000:] for i in range(50)}
    assert stdin_parts(similar, 1 << 20) == [list(similar)]  # 100 KiB + 50 small deltas
    different = {"n%d" % i: bytes([i]) * 100_000 for i in range(10)}
    parts = stdin_parts(different, 250_000)
    assert [len(p) for p in parts] == [2, 2, 2, 2, 2]
    assert sorted(n for p in parts for n in p) == sorted(different)


# -- the server: requests in, replies out ------------------------------------------------------


async def test_per_host_stdin_is_one_operation(tree_ops, client):
    c = server(tree_ops)
    futs = [c.submit(req(h, stdin=b"payload for " + h.encode())) for h in "abc"]
    replies = [await as_sent(r) for r in await asyncio.gather(*futs)]
    (call,) = client.calls
    assert call["nodes"] == ["a", "b", "c"] and call["stdin"] == b""
    assert call["stdin_by_node"] == {h: b"payload for " + h.encode() for h in "abc"}
    for host, reply in zip("abc", replies):
        out = reply["outcome"]
        assert base64.b64decode(out["stdout_b64"]) == b"payload for " + host.encode()
        assert base64.b64decode(out["stderr_b64"]) == b"\xff"
        assert "stdout" not in out and "stderr" not in out and out["node"] == host
        assert reply["operation"]["hosts"] == 3 and reply["operation"]["stdin"] == "per-node"
    assert c.stats()["operations"][0]["stdin"] == "per-node"
    assert c.stats()["tasks"]["t1"]["operations"] == 1


async def test_text_replies_without_raw(tree_ops):
    c = server(tree_ops)
    reply = await c.submit(req("a", stdin=b"hi", expected="a", raw=False))
    assert reply["outcome"]["stdout"] == "hi" and "stdout_b64" not in reply["outcome"]


async def test_large_different_stdins_go_as_several_operations(tree_ops, client, monkeypatch):
    monkeypatch.setattr(operations, "STDIN_BUDGET", 150_000)
    c = server(tree_ops)
    replies = [await as_sent(r, piece=3 * 1000)  # the base64 in many pieces
               for r in await asyncio.gather(*[c.submit(req(h, stdin=h.encode() * 100_000)) for h in "abc"])]
    assert sorted(len(call["nodes"]) for call in client.calls) == [1, 1, 1]
    for host, reply in zip("abc", replies):
        assert base64.b64decode(reply["outcome"]["stdout_b64"]) == host.encode() * 100_000
    (op,) = c.stats()["operations"]
    assert op["stdin"] == "per-node" and op["parts"] == 3 and len(op["hosts"]) == 3


async def test_the_idle_gap_dispatches(tree_ops, client):
    c = server(tree_ops, gap=0.05)
    replies = await asyncio.wait_for(asyncio.gather(*[c.submit(req(h)) for h in "ab"]), 30)
    assert [r["outcome"]["node"] for r in replies] == ["a", "b"]
    assert [call["nodes"] for call in client.calls] == [["a", "b"]]


async def test_expect_done_and_pass(tree_ops, client):
    c = server(tree_ops)
    c.expect("t1", ["a", "b", "c"], 0, "hello")
    first = c.submit(req("a"))
    c.passed("t1", "exec1", "b")
    c.done("t1", ["c"])
    await first
    assert [call["nodes"] for call in client.calls] == [["a"]]
    assert c.stats()["tasks"]["t1"]["name"] == "hello"


async def test_a_failed_operation_answers_every_member(tree_ops, client):
    client.fail = rclient.ClientError("controller keys: missing")
    c = server(tree_ops)
    replies = await asyncio.gather(*[c.submit(req(h, expected="ab")) for h in "ab"])
    assert replies == [{"ok": False, "error": "controller keys: missing"}] * 2
    assert c.stats()["operations"][0]["error"] == "controller keys: missing"
    client.fail = RuntimeError("boom")
    reply = await c.submit(req("a", expected="a", step="exec2"))
    assert reply == {"ok": False, "error": "coordinator: RuntimeError: boom"}


async def test_withdrawn_worker(tree_ops, client):
    c = server(tree_ops)
    c.submit(req("b", step="s2"))
    c.withdraw("t1", "s2", "b")
    assert not c.batcher.tasks["t1"].steps["s2"].pending()


async def test_bad_requests(tree_ops):
    c = server(tree_ops)
    for bad, message in [
        (dict(req("a"), op="nope"), "unknown tree operation 'nope'"),
        (dict(req("a"), port=0), "bad port"),
        (dict(req("a"), port=True), "bad port"),
        (dict(req("a"), host=""), "host: a non-empty string"),
        (dict(req("a"), args="x"), "args and tree must be objects"),
        (req("a", window="5"), "bad window"),
        (dict(req("a"), stdin_b64="***"), "bad base64"),
        (dict(req("a", stdin=b"x"), args={"command": "cat", "stdin": "y"}), "not both"),
        (dict(req("a", stdin=b"x"), op="copy"), "stdin_b64 is not for copy requests"),
        (dict(req("a"), op="exec", src="/x"), "src is not for exec requests"),
        (dict(req("a"), op="fetch", src="/x", out_path="relative"), "out_path"),
        (dict(req("a"), op="fetch", src=None, out_path="/tmp/x"), "src"),
    ]:
        with pytest.raises(RequestError, match=message):
            c.submit(bad)
    assert c.batcher.tasks == {}  # refused before anything changed


async def test_big_raw_output_is_written_in_pieces():
    data = bytes(range(256)) * 4001  # not a multiple of the piece: padding only at the end
    member = coord_server.HostRequest("h", "n", None, raw=True)
    reply = {"ok": True, "outcome": coord_server._outcome_dict(
        NodeOutcome(node="n", status=Status.PASS, rc=0, stdout=data, stderr=b"e"), member)}
    writer = Writer()
    await coord_server.write_reply(writer, reply, piece=3 * 100)
    assert writer.writes > 30
    out = json.loads(writer.data)["outcome"]
    assert base64.b64decode(out["stdout_b64"]) == data and base64.b64decode(out["stderr_b64"]) == b"e"
    assert out["node"] == "n" and "stdout" not in out


# -- the process, with real daemons ---------------------------------------------------------


async def test_fetch_is_one_tree_operation_with_own_sources_and_destinations(fleet_factory, tmp_path):
    """The relay connection's fetch_file: each host its own src and out_path, one tree fetch per step."""
    fleet = fleet_factory(3)
    for d in fleet.daemons:
        (d.base_dir / "logs").mkdir()
        (d.base_dir / "logs" / ("%s.log" % d.name)).write_bytes(d.name.encode() * 1000)
    (fleet.daemons[2].base_dir / "logs" / ("%s.log" % fleet.daemons[2].name)).unlink()
    c = CoordinatorServer(gap=10)
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


def call(path: str, message: Dict, timeout: float = 60) -> Dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data) if data else {}


def start_coordinator(run_dir, *args):
    path = str(run_dir / ("%d.sock" % os.getpid()))
    with open(run_dir / "coord.err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "relaytree.coordinator", "--socket", path,
                                 "--parent-pid", str(os.getpid()), "--idle-exit", "60",
                                 "--run-dir", str(run_dir / ("%d.d" % os.getpid()))] + list(args), stderr=err)
    end = time.monotonic() + 20
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.02)
    return proc, path


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def coordinator_process(tmp_path):
    run_dir = tmp_path / "coord"
    run_dir.mkdir(mode=0o700)
    (run_dir / "999999999.log").write_text("stale")  # from a dead run: cleaned at start
    proc, path = start_coordinator(run_dir, "--gap", "5")
    yield proc, path
    stop(proc)


def test_process_merges_hosts_into_one_operation(fleet_factory, coordinator_process):
    fleet = fleet_factory(3)
    proc, path = coordinator_process
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not os.path.exists(os.path.join(os.path.dirname(path), "999999999.log"))
    replies = {}

    def worker(name):
        replies[name] = call(path, {"op": "exec", "task": "T", "name": "hello", "step": "exec", "host": "h-" + name,
                                    "node": name, "port": fleet.port, "expected": ["h-" + n for n in fleet.names],
                                    "args": {"command": "pwd", "cwd": "/"}, "tree": {"connect_timeout": 2, "insecure": True}})

    threads = [threading.Thread(target=worker, args=(n,)) for n in fleet.names]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert time.monotonic() - started < 4  # all expected hosts came: no 5 s gap
    for name in fleet.names:
        out = replies[name]["outcome"]
        assert out["status"] == "PASS" and out["node"] == name
        assert out["stdout"].strip() == str(fleet.by_name(name).base_dir)
    stats = call(path, {"op": "stats"})
    assert stats["ok"] and stats["tasks"]["T"] == {"name": "hello", "operations": 1, "steps": {"exec": 1}}
    assert call(path, {"op": "nope"}) == {"ok": False, "error": "unknown op 'nope'"}
    assert call(path, {"op": "shutdown"}) == {"ok": True}
    assert proc.wait(timeout=10) == 0
    assert not os.path.exists(path)


def test_process_refuses_other_users():
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another user")
    run_dir = Path(tempfile.mkdtemp(prefix="relaytree-coord-test-"))
    os.chmod(run_dir, 0o755)  # others may reach the socket: only SO_PEERCRED stands in the way
    proc, path = start_coordinator(run_dir)
    try:
        os.chmod(path, 0o666)
        _probe_as_nobody(path)
        assert call(path, {"op": "stats"})["ok"]
    finally:
        stop(proc)
        shutil.rmtree(run_dir, ignore_errors=True)


def _probe_as_nobody(path):
    probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);\n"
             "try:\n    s.sendall(b'{\"op\": \"stats\"}\\n'); print(repr(s.recv(100)))\n"
             "except (ConnectionResetError, BrokenPipeError):\n    print(repr(b''))")  # closed on us: refused either way
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            out = subprocess.run([python, "-c", probe, path], user=65534, capture_output=True, text=True, timeout=30)
            break
        except PermissionError:  # a Python under /root cannot be run by nobody
            continue
    else:
        pytest.skip("no Python that user 65534 may run")
    assert out.stdout.strip() == "b''", out


def test_process_exits_with_its_playbook(tmp_path):
    parent = subprocess.Popen(["sleep", "60"])
    path = str(tmp_path / "p.sock")
    proc = subprocess.Popen([sys.executable, "-m", "relaytree.coordinator", "--socket", path,
                             "--parent-pid", str(parent.pid)])
    try:
        end = time.monotonic() + 20
        while not os.path.exists(path) and time.monotonic() < end:
            time.sleep(0.02)
        parent.kill()
        parent.wait()
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
