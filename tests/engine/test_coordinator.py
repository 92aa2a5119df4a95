"""The Ansible coordinator: batching rules (fake tree) and the socket server (real daemons)."""

from __future__ import annotations

import asyncio
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
from typing import Dict, List

import pytest

from relaytree import coordinator as coord
from relaytree.results import NodeOutcome, Status


class FakeTree(coord.Coordinator):
    """Records each tree operation instead of running it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.ops: List[List[str]] = []

    async def _tree(self, group, nodes):
        self.ops.append(list(nodes))
        return {n: NodeOutcome(node=n, status=Status.PASS, rc=0, stdout=n.encode()) for n in nodes}, {}


def req(host, task="t1", step="exec", args=None, expected=("a", "b", "c"), node=None, **kw):
    return dict({"op": "exec", "task": task, "step": step, "host": host, "node": node or host, "port": 1995,
                 "args": args or {"command": "true"}, "tree": {}, "expected": list(expected)}, **kw)


async def settle(seconds=0.05):
    await asyncio.sleep(seconds)


async def test_all_expected_arrived_dispatches_at_once():
    c = FakeTree(gap=10)
    futs = [c.submit(req(h)) for h in "abc"]
    await settle()
    assert c.ops == [["a", "b", "c"]]
    replies = [await f for f in futs]
    assert [r["outcome"]["stdout"] for r in replies] == ["a", "b", "c"]
    assert c.stats()["tasks"]["t1"]["operations"] == 1


async def test_missing_host_costs_one_gap():
    c = FakeTree(gap=0.2)
    futs = [c.submit(req(h)) for h in "ab"]
    await settle()
    assert c.ops == []
    await settle(0.3)
    assert c.ops == [["a", "b"]]
    await asyncio.gather(*futs)


async def test_different_args_are_separate_operations_dispatched_together():
    c = FakeTree(gap=10)
    futs = [c.submit(req("a", args={"command": "x"})), c.submit(req("b", args={"command": "y"})),
            c.submit(req("c", args={"command": "x"}))]
    await settle()
    assert sorted(c.ops) == [["a", "c"], ["b"]]
    await asyncio.gather(*futs)


async def test_exact_membership_and_done():
    c = FakeTree(gap=0.01, exact_gap=10)
    c.expect("t1", ["a", "b", "c"], window=0)
    futs = [c.submit(req("a")), c.submit(req("b"))]
    await settle(0.1)
    assert c.ops == []  # the idle gap does not apply: c is expected
    c.done("t1", ["c"])  # skipped by `when`
    await settle()
    assert c.ops == [["a", "b"]]
    await asyncio.gather(*futs)


async def test_loop_rounds_stay_together():
    c = FakeTree(gap=10)
    first = [c.submit(req(h, expected="ab")) for h in "ab"]
    await asyncio.gather(*first)
    second = [c.submit(req("a", expected="ab", args={"command": "2"}))]
    await settle()
    assert len(c.ops) == 1  # a waits for b's second round
    second.append(c.submit(req("b", expected="ab", args={"command": "2"})))
    await asyncio.gather(*second)
    assert c.ops == [["a", "b"], ["a", "b"]]


async def test_pass_releases_the_others():
    c = FakeTree(gap=10)
    fut = c.submit(req("a", expected="ab"))
    await settle()
    assert c.ops == []
    c.passed("t1", "exec", "b")
    await fut
    assert c.ops == [["a"]]


async def test_window_of_the_worker_pool():
    c = FakeTree(gap=10, exact_gap=10)
    c.expect("t1", ["a", "b", "c", "d"], window=2)
    futs = [c.submit(req("a")), c.submit(req("b"))]
    await asyncio.gather(*futs)
    futs = [c.submit(req("c")), c.submit(req("d"))]
    await asyncio.gather(*futs)
    assert c.ops == [["a", "b"], ["c", "d"]]


async def test_same_address_twice_runs_twice():
    c = FakeTree(gap=10)
    futs = [c.submit(req("a", node="10.0.0.1", expected="ab")), c.submit(req("b", node="10.0.0.1", expected="ab"))]
    await asyncio.gather(*futs)
    assert c.ops == [["10.0.0.1"], ["10.0.0.1"]]


async def test_alone_and_withdraw():
    c = FakeTree(gap=10)
    await c.submit(req("a", alone=True))
    assert c.ops == [["a"]]
    c.submit(req("b", step="s2"))
    c.withdraw("t1", "s2", "b")
    assert not c.tasks["t1"].steps["s2"].pending()


async def test_bad_requests():
    c = FakeTree()
    with pytest.raises(coord.RequestError, match="port"):
        c.submit(dict(req("a"), port=0))
    with pytest.raises(coord.RequestError, match="host"):
        c.submit(dict(req("a"), host=""))
    c.submit(req("a", expected="ab"))
    with pytest.raises(coord.RequestError, match="already waiting"):
        c.submit(req("a", expected="ab"))


# -- the process, with real daemons ---------------------------------------------------------


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
