"""Coordinator: the tree root of one ansible-playbook run.

Ansible runs every task once per host, each in its own forked worker. The tree
wants the opposite: one operation for all hosts. The coordinator sits between
the two: a local process (one per playbook run) that the workers of the
``hpc.relaytree`` action plugins talk to over a UNIX socket. It merges the
requests of all hosts for the same task step and the same arguments into ONE
tree operation (``Client.exec/copy/ping`` over all their nodes) and answers
every host with its own result.

It runs as its own exec'd process because gRPC must never be loaded in the
ansible-playbook process or its forked workers (gRPC and fork deadlock). It
exits when idle for ``--idle-exit`` seconds or when the playbook process
(``--parent-pid``) is gone.

Protocol: one JSON object per line, one request and one reply per connection.
Every reply has ``"ok"``; a failed request has ``"ok": false, "error": ...``.

* ``{"op": "exec"|"copy"|"ping", "task", "step", "host", "node", "port",
  "args", "tree", "expected", "alone", "name"}``: one host's part of a task step.
  Requests with the same task, step and hash of (op, port, args, tree) are one
  tree operation over all their ``node``s. The reply
  ``{"ok": true, "outcome": NodeOutcome.to_dict() + {"node"}, "operation": {...}}``
  comes when that operation is over. For ``copy``, ``args.src`` is a file
  readable by the coordinator and ``operation`` carries ``checksum`` (sha1)
  and ``size`` of it.

  Optional fields of an ``exec`` request (the ``relay`` connection plugin):
  ``stdin_b64`` is this host's own stdin (base64, any bytes), outside the
  operation hash: hosts with the same command and different stdins are still one
  tree operation, each node getting its own bytes (``Client.exec_async(...,
  stdin_by_node=...)``); it replaces ``args.stdin``. With ``"raw": true`` the
  reply's outcome carries ``stdout_b64``/``stderr_b64`` (the exact bytes)
  instead of the decoded ``stdout``/``stderr``. ``window`` (any tree op) is the
  size of the worker pool when no strategy announced the task: when that many
  hosts wait in the task, nobody else can come.
* ``{"op": "fetch", ..., "src", "out_path"}`` (the ``relay`` connection plugin's
  ``fetch_file``): bring the file ``src`` back from this host's node to the local
  ``out_path``. Both are outside the operation hash: the hosts of a step are one tree
  fetch, each node reading its own ``src``, each file landing at its host's
  ``out_path`` (checked, atomic, never partial; see ``Client.fetch_to_async``).
  ``args.chunk_size`` is optional.
* ``{"op": "expect", "task", "hosts", "window", "name"}``: exact membership
  (from the ``tree`` strategy): the hosts that will run the task, and how many
  of them can run at once (the worker pool).
* ``{"op": "done", "task", "hosts"}``: these hosts are finished with the task
  (or were skipped by ``when``); nobody waits for them any more. Without the
  strategy (the ``relay`` connection reports its own host when Ansible closes
  it), a done host that comes back to the task (a handler run again) starts a
  new run of it: the done set is cleared.
* ``{"op": "pass", "task", "step", "host"}``: this host goes through ``step``
  without a tree operation this time (for example ``creates`` decided).
* ``{"op": "stats"}``: tree operations run so far, per task.
* ``{"op": "shutdown"}``.

When is a task step dispatched? Every host may run a step several times (loop
items): a host's *round* at a step is how many times it went through it. A
step is dispatched when every expected host that is not done and not ahead
(its round is no later than that of the pending hosts) is waiting in it, or
when as many hosts are waiting in the task as the worker pool lets in at once
(``window``), or when no host arrived for ``gap`` seconds. Without the
strategy the expected hosts are the ``ansible_play_batch`` of the requests
and hosts skipped by ``when`` cost one ``gap`` (0.3 s by default); with it they
are exact (skipped hosts are reported ``done``) and ``exact_gap`` is only a
safety net. Requests whose arguments differ form separate operations,
dispatched together.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

import relaytree
from relaytree import client as rclient
from relaytree import stdin as stdin_codec
from relaytree.results import NodeOutcome, failed

log = logging.getLogger("relaytree.coordinator")

TREE_OPS = ("exec", "copy", "ping", "fetch")
MAX_LINE = 96 << 20  # exec stdin travels inline (base64 for stdin_b64)
DEFAULT_GAP = 0.3
DEFAULT_EXACT_GAP = 30.0
DEFAULT_IDLE_EXIT = 300.0
FORGET_TASK_AFTER = 3600.0  # drop the batching state of tasks idle this long
KEEP_OPERATIONS = 1000  # operation records kept for "stats"
# Per-node stdins travel inside one gRPC request (wire.MAX_MESSAGE is 64 MiB): an exec whose
# encoded stdins (bases + deltas) are larger goes as several tree operations, run at once.
STDIN_BUDGET = 32 << 20
_RUN_FILE = re.compile(r"^(\d+)\.(sock|sock\.lock|log|d)$")  # files of one run (plugin_utils/_relaytree.py)


class RequestError(Exception):
    """A malformed request: answered with ok=false."""


def operation_hash(op: str, port: int, args: Dict[str, Any], tree: Dict[str, Any]) -> str:
    blob = json.dumps([op, port, args, tree], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def file_digest(path: str) -> Tuple[str, int]:
    """sha1 (as ansible.builtin.copy reports it) and size of a file."""
    digest = hashlib.sha1()
    size = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(4 << 20)
            if not block:
                break
            size += len(block)
            digest.update(block)
    return digest.hexdigest(), size


def _process_start(pid: int) -> Optional[str]:
    """Start time of a process (field 22 of /proc/PID/stat): tells a live pid from a reused one."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


# ------------------------------------------------------------------- batching state


@dataclass
class Member:
    host: str
    node: str
    future: "asyncio.Future[Dict[str, Any]]"
    stdin: Optional[bytes] = None  # this host's own stdin (exec stdin_b64), None: args.stdin
    raw: bool = False  # reply with stdout_b64/stderr_b64
    fetch: Optional[Tuple[str, str]] = None  # fetch: (src on the node, local out_path)


@dataclass
class Group:
    """Requests that become one tree operation."""

    task: str
    step: str
    op: str
    port: int
    args: Dict[str, Any]
    tree: Dict[str, Any]
    members: List[Member] = field(default_factory=list)

    def has(self, host: str, node: str) -> bool:
        return any(m.host == host or m.node == node for m in self.members)


@dataclass
class Step:
    groups: Dict[str, List[Group]] = field(default_factory=dict)
    rounds: Dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    timer: Optional[asyncio.TimerHandle] = None

    def pending(self) -> Dict[str, Member]:
        return {m.host: m for groups in self.groups.values() for g in groups for m in g.members}


@dataclass
class TaskState:
    name: str = ""
    expected: Set[str] = field(default_factory=set)
    done: Set[str] = field(default_factory=set)
    exact: bool = False
    window: int = 0
    steps: Dict[str, Step] = field(default_factory=dict)
    last: float = 0.0


class Coordinator:
    def __init__(self, *, gap: float = DEFAULT_GAP, exact_gap: float = DEFAULT_EXACT_GAP,
                 stats_file: Optional[str] = None):
        self.gap = gap
        self.exact_gap = exact_gap
        self.stats_file = stats_file
        self.tasks: Dict[str, TaskState] = {}
        self.counts: Dict[str, Dict[str, Any]] = {}
        self.operations: Deque[Dict[str, Any]] = collections.deque(maxlen=KEEP_OPERATIONS)
        self.running: Set[asyncio.Task] = set()
        self.digests: Dict[Tuple[str, int, int], Tuple[str, int]] = {}
        self.last_activity = time.monotonic()
        self.connections = 0

    # -- requests --------------------------------------------------------------------

    def submit(self, req: Dict[str, Any]) -> "asyncio.Future[Dict[str, Any]]":
        op = req.get("op")
        if op not in TREE_OPS:
            raise RequestError("unknown tree operation %r" % (op,))
        task_id, step_name, host, node = (_text(req, k) for k in ("task", "step", "host", "node"))
        port = req.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise RequestError("bad port %r" % (port,))
        args, tree = req.get("args") or {}, req.get("tree") or {}
        if not isinstance(args, dict) or not isinstance(tree, dict):
            raise RequestError("args and tree must be objects")
        stdin = _own_stdin(req, op, args)
        fetch = _fetch_paths(req, op)
        window = req.get("window")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 0):
            raise RequestError("bad window %r" % (window,))
        state = self._task(task_id, req.get("name"))
        if not state.exact:
            if host in state.done:  # it runs the task again (a handler): a new run for everyone
                state.done.clear()
            state.expected.update(str(h) for h in req.get("expected") or ())
            state.expected.add(host)
            if window:
                state.window = window
        step = state.steps.setdefault(step_name, Step())
        member = Member(host, node, asyncio.get_running_loop().create_future(), stdin, bool(req.get("raw")),
                        fetch)
        group = Group(task_id, step_name, op, port, args, tree, [member])
        if req.get("alone"):  # run_once: nobody else will come
            step.rounds[host] += 1
            self._launch(group)
            return member.future
        if host in step.pending():
            raise RequestError("host %s is already waiting in step %s of this task" % (host, step_name))
        groups = step.groups.setdefault(operation_hash(op, port, args, tree), [])
        # Two inventory hosts with the same address run twice: never merge them.
        target = next((g for g in groups if not g.has(host, node)), None)
        if target is None:
            groups.append(group)
        else:
            target.members.append(member)
        self._arm(state, step)
        self._evaluate(state)
        return member.future

    def withdraw(self, task_id: str, step_name: str, host: str) -> None:
        """A worker went away before its step was dispatched: forget its request."""
        state = self.tasks.get(task_id)
        step = state and state.steps.get(step_name)
        if not step:
            return
        for key, groups in list(step.groups.items()):
            for g in groups:
                g.members = [m for m in g.members if m.host != host]
            step.groups[key] = [g for g in groups if g.members]
            if not step.groups[key]:
                del step.groups[key]
        self._evaluate(state)

    def expect(self, task_id: str, hosts: List[str], window: int, name: Any = None) -> None:
        state = self._task(task_id, name)
        state.expected = set(hosts)
        state.done = set()
        state.exact = True
        state.window = max(0, int(window or 0))
        for step in state.steps.values():  # a new run of this task (handlers run again)
            if not step.pending():
                step.rounds.clear()
        self._evaluate(state)

    def done(self, task_id: str, hosts: List[str]) -> None:
        state = self.tasks.get(task_id)
        if state is not None:
            state.done.update(hosts)
            self._evaluate(state)

    def passed(self, task_id: str, step_name: str, host: str) -> None:
        state = self._task(task_id, None)
        state.steps.setdefault(step_name, Step()).rounds[host] += 1
        self._evaluate(state)

    def stats(self) -> Dict[str, Any]:
        return {"pid": os.getpid(), "version": relaytree.__version__, "tasks": self.counts,
                "operations": list(self.operations)}

    # -- batching --------------------------------------------------------------------

    def _task(self, task_id: str, name: Any) -> TaskState:
        state = self.tasks.setdefault(task_id, TaskState())
        if name:
            state.name = str(name)
        state.last = time.monotonic()
        return state

    def forget_old_tasks(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self.tasks.items()
                    if now - s.last > FORGET_TASK_AFTER and not any(st.pending() for st in s.steps.values())]:
            del self.tasks[key]

    def _arm(self, state: TaskState, step: Step) -> None:
        """(Re)start the step's gap timer: dispatch whatever waits when nobody came for a while."""
        if step.timer is not None:
            step.timer.cancel()
        gap = self.exact_gap if state.exact else self.gap
        step.timer = asyncio.get_running_loop().call_later(gap, self._dispatch, step)

    def _ready(self, state: TaskState, step: Step) -> bool:
        pending = step.pending()
        if not pending:
            return False
        if state.window and sum(len(s.pending()) for s in state.steps.values()) >= state.window:
            return True
        current = min(step.rounds[h] for h in pending)
        return all(h in pending or step.rounds[h] > current for h in state.expected - state.done)

    def _evaluate(self, state: TaskState) -> None:
        for step in state.steps.values():
            if self._ready(state, step):
                self._dispatch(step)

    def _dispatch(self, step: Step) -> None:
        if step.timer is not None:
            step.timer.cancel()
            step.timer = None
        groups = [g for gs in step.groups.values() for g in gs]
        step.groups = {}
        for group in groups:
            for m in group.members:
                step.rounds[m.host] += 1
            self._launch(group)

    def _launch(self, group: Group) -> None:
        task = asyncio.ensure_future(self._run(group))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    # -- tree operations -------------------------------------------------------------

    async def _run(self, group: Group) -> None:
        started = time.monotonic()
        self.last_activity = started
        nodes = [m.node for m in group.members]
        extra: Dict[str, Any] = {}
        error = ""
        outcomes: Dict[str, NodeOutcome] = {}
        try:
            outcomes, extra = await self._tree(group, nodes)
        except rclient.ClientError as exc:
            error = str(exc)
        except Exception as exc:  # pylint: disable=broad-except
            log.exception("tree operation %s/%s failed", group.task, group.step)
            error = "coordinator: %s: %s" % (type(exc).__name__, exc)
        seconds = time.monotonic() - started
        self._count(group, seconds, error, extra)
        info = dict(extra, hosts=len(nodes), seconds=round(seconds, 3))
        for m in group.members:
            if m.future.done():
                continue
            if error:
                m.future.set_result({"ok": False, "error": error})
            else:
                outcome = outcomes.get(m.node) or failed(m.node, "no result")
                m.future.set_result({"ok": True, "outcome": _outcome_dict(outcome, m), "operation": info})
        self.last_activity = time.monotonic()

    async def _tree(self, group: Group, nodes: List[str]) -> Tuple[Dict[str, NodeOutcome], Dict[str, Any]]:
        args, tree = group.args, group.tree
        client = make_client(group.port, tree)
        common: Dict[str, Any] = {"deadline": tree.get("deadline")}
        if tree.get("width"):
            common["width"] = int(tree["width"])
        if group.op == "exec":
            command = args.get("command")
            if not isinstance(command, (str, list)):
                raise rclient.ClientError("exec: command must be a string or a list")
            stdin = (args.get("stdin") or "").encode("utf-8")
            own = {m.node: m.stdin for m in group.members if m.stdin is not None}
            if own:  # per-host stdins (stdin_b64): one for every node, shared when all equal
                own = {m.node: own.get(m.node, stdin) for m in group.members}
                if len(set(own.values())) == 1:
                    stdin, own = next(iter(own.values())), {}
            spec = dict(env=args.get("env") or {}, cwd=args.get("cwd") or "", user=args.get("user") or "",
                        timeout=args.get("timeout"), output_limit=int(args.get("output_limit") or 0), **common)
            if not own:
                outcomes = await client.exec_async(nodes, command, stdin=stdin, **spec)
                return outcomes, ({"stdin": "shared"} if stdin else {})
            parts = stdin_parts(own, STDIN_BUDGET)
            results = await asyncio.gather(*[
                client.exec_async(part, command, stdin_by_node={n: own[n] for n in part}, **spec)
                for part in parts])
            outcomes = {}
            for result in results:
                outcomes.update(result)
            return outcomes, dict({"stdin": "per-node"}, **({"parts": len(parts)} if len(parts) > 1 else {}))
        if group.op == "ping":
            return await client.ping_async(nodes, **common), {}
        if group.op == "fetch":
            return await fetch_operation(client, group, common)
        if group.op == "copy":
            src = args.get("src") or ""
            digest = asyncio.ensure_future(self._digest(src))
            try:
                outcomes = await client.copy_async(
                    nodes, src, args.get("dest") or "", mode=args.get("mode") or "",
                    owner=args.get("owner") or "", group=args.get("group") or "",
                    mkdirs=bool(args.get("mkdirs")), backup=bool(args.get("backup")),
                    check=bool(args.get("check")),
                    chunk_size=int(args.get("chunk_size") or rclient.DEFAULT_CHUNK), **common)
            except BaseException:
                digest.cancel()
                raise
            checksum, size = await digest
            return outcomes, {"checksum": checksum, "size": size}
        raise rclient.ClientError("unknown operation %r" % group.op)

    async def _digest(self, path: str) -> Tuple[Optional[str], Optional[int]]:
        try:
            st = os.stat(path)
        except OSError:
            return None, None  # the copy itself reports the problem
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self.digests:
            try:
                self.digests[key] = await asyncio.get_running_loop().run_in_executor(None, file_digest, path)
            except OSError:
                return None, None
        return self.digests[key]

    def _count(self, group: Group, seconds: float, error: str, extra: Optional[Dict[str, Any]] = None) -> None:
        state = self.tasks.get(group.task)
        entry = self.counts.setdefault(group.task, {"name": state.name if state else "",
                                                    "operations": 0, "steps": {}})
        entry["operations"] += 1
        entry["steps"][group.step] = entry["steps"].get(group.step, 0) + 1
        self.operations.append({"task": group.task, "name": entry["name"], "step": group.step,
                                "op": group.op, "hosts": [m.host for m in group.members],
                                "seconds": round(seconds, 3), "error": error})
        for key in ("stdin", "parts"):  # exec: "shared" or "per-node" stdin, cut into parts
            if extra and key in extra:
                self.operations[-1][key] = extra[key]
        if self.stats_file:
            tmp = self.stats_file + ".tmp"
            try:
                with open(tmp, "w") as fh:
                    json.dump(self.stats(), fh)
                os.replace(tmp, self.stats_file)
            except OSError as exc:
                log.warning("cannot write %s: %s", self.stats_file, exc)

    # -- socket server ---------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.last_activity = time.monotonic()
        try:
            if not _same_user(writer.get_extra_info("socket")):
                log.warning("refused a connection from another user")
                return
            reply = await self._answer(reader)
            await write_reply(writer, reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.connections -= 1
            self.last_activity = time.monotonic()
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> Dict[str, Any]:
        try:
            line = await reader.readline()
        except ValueError:
            return {"ok": False, "error": "request longer than %d bytes" % MAX_LINE}
        if not line:
            raise ConnectionError("no request")
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            return {"ok": False, "error": "malformed request: %s" % exc}
        op = req.get("op")
        try:
            if op in TREE_OPS:
                return await self._wait(reader, req, self.submit(req))
            if op == "expect":
                self.expect(_text(req, "task"), [str(h) for h in req.get("hosts") or ()],
                            req.get("window") or 0, req.get("name"))
            elif op == "done":
                self.done(_text(req, "task"), [str(h) for h in req.get("hosts") or ()])
            elif op == "pass":
                self.passed(_text(req, "task"), _text(req, "step"), _text(req, "host"))
            elif op == "stats":
                return dict(self.stats(), ok=True)
            elif op == "shutdown":
                asyncio.get_running_loop().call_soon(_stop)
            else:
                raise RequestError("unknown op %r" % (op,))
        except RequestError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True}

    async def _wait(self, reader: asyncio.StreamReader, req: Dict[str, Any],
                    future: "asyncio.Future[Dict[str, Any]]") -> Dict[str, Any]:
        # The worker may die (Ctrl-C, task timeout) while it waits: then drop its request.
        eof = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait({future, eof}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            eof.cancel()
        if not future.done():
            self.withdraw(req["task"], req["step"], req["host"])
            raise ConnectionError("worker went away")
        return future.result()

    def idle(self) -> bool:
        return not self.connections and not self.running


def stdin_parts(stdin_by_node: Dict[str, bytes], budget: int) -> List[List[str]]:
    """The nodes of a per-node-stdin exec, cut into groups whose encoded stdins fit in ``budget`` bytes.

    One group unless the stdins are large and different; nodes sharing a base stay together.
    """
    if sum(len(data) for data in stdin_by_node.values()) <= budget:
        return [list(stdin_by_node)]  # fits even without deltas: no need to encode twice
    _digests, blobs, patches = stdin_codec.encode(stdin_by_node)
    if sum(len(b) for b in blobs.values()) + sum(len(p.middle) for p in patches.values()) <= budget:
        return [list(stdin_by_node)]
    by_base: Dict[str, List[str]] = {}
    for node, patch in patches.items():
        by_base.setdefault(patch.base, []).append(node)
    parts: List[List[str]] = []
    current: List[str] = []
    bases: Set[str] = set()
    size = 0
    for base, nodes in by_base.items():
        for node in nodes:
            cost = len(patches[node].middle) + (0 if base in bases else len(blobs[base]))
            if current and size + cost > budget:
                parts.append(current)
                current, bases, size = [], set(), 0
                cost = len(patches[node].middle) + len(blobs[base])
            current.append(node)
            bases.add(base)
            size += cost
    parts.append(current)
    return parts


async def fetch_operation(client: rclient.Client, group: Group, common: Dict[str, Any]
                          ) -> Tuple[Dict[str, NodeOutcome], Dict[str, Any]]:
    """One tree fetch for the hosts of a step: each node's own source path, each file to its host's out_path."""
    sources = {m.node: m.fetch[0] for m in group.members if m.fetch}
    outs = {m.node: m.fetch[1] for m in group.members if m.fetch}
    chunk_size = int(group.args.get("chunk_size") or rclient.DEFAULT_CHUNK)
    outcomes = await client.fetch_to_async(list(sources), sources, outs, chunk_size=chunk_size, **common)
    return outcomes, {}


def _fetch_paths(req: Dict[str, Any], op: str) -> Optional[Tuple[str, str]]:
    """(src, out_path) of a fetch request, None for the other operations."""
    if op != "fetch":
        return None
    src, out_path = req.get("src"), req.get("out_path")
    if not isinstance(src, str) or not src.startswith("/"):
        raise RequestError("fetch: src must be an absolute path on the node, not %r" % (src,))
    if not isinstance(out_path, str) or not os.path.isabs(out_path):
        raise RequestError("fetch: out_path must be an absolute local path, not %r" % (out_path,))
    return src, out_path


def _own_stdin(req: Dict[str, Any], op: str, args: Dict[str, Any]) -> Optional[bytes]:
    """The bytes of an exec request's stdin_b64, or None when it has none."""
    value = req.get("stdin_b64")
    if value is None:
        return None
    if op != "exec":
        raise RequestError("stdin_b64 is for exec requests only")
    if args.get("stdin"):
        raise RequestError("give args.stdin or stdin_b64, not both")
    if not isinstance(value, str):
        raise RequestError("stdin_b64 must be a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise RequestError("stdin_b64: bad base64: %s" % exc) from None


class Base64:
    """Bytes that a reply carries base64-encoded, written piece by piece by write_reply (a module's
    output may be hundreds of MiB: Ansible's slurp): never a second whole copy in memory."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


def _outcome_dict(outcome: NodeOutcome, member: Member) -> Dict[str, Any]:
    """A host's outcome in a reply: text output, or the exact bytes (base64) when it asked "raw"."""
    if not member.raw:
        return dict(outcome.to_dict(), node=member.node)
    out = dict(replace(outcome, stdout=b"", stderr=b"").to_dict(), node=member.node)
    del out["stdout"], out["stderr"]
    out["stdout_b64"] = Base64(outcome.stdout)
    out["stderr_b64"] = Base64(outcome.stderr)
    return out


async def write_reply(writer: asyncio.StreamWriter, reply: Dict[str, Any], piece: int = 3 << 20) -> None:
    """Write one reply as a JSON line; Base64 values are encoded and sent `piece` bytes at a time."""
    blobs: List[bytes] = []
    token = os.urandom(8).hex()

    def placeholder(value: Any) -> str:
        if not isinstance(value, Base64):
            raise TypeError("cannot send %s in a reply" % type(value).__name__)
        blobs.append(value.data)
        return "%s:%d" % (token, len(blobs) - 1)

    text = json.dumps(reply, default=placeholder).encode("utf-8")
    parts = re.split(b'"%s:([0-9]+)"' % token.encode("ascii"), text) if blobs else [text]
    for i, part in enumerate(parts):
        if i % 2 == 0:
            writer.write(part)
            continue
        data = memoryview(blobs[int(part)])
        writer.write(b'"')
        for start in range(0, len(data), piece):  # piece: a multiple of 3, no padding inside
            writer.write(base64.b64encode(data[start:start + piece]))
            await writer.drain()
        writer.write(b'"')
    writer.write(b"\n")
    await writer.drain()


def _text(req: Dict[str, Any], key: str) -> str:
    value = req.get(key)
    if not isinstance(value, str) or not value:
        raise RequestError("%s: a non-empty string is required" % key)
    return value


def _same_user(sock: Optional[socket.socket]) -> bool:
    if sock is None:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def make_client(port: int, tree: Dict[str, Any]) -> rclient.Client:
    """The tree client of an operation: mutual TLS and signed requests unless tree["insecure"]."""
    options = dict(port=port, connect_timeout=float(tree.get("connect_timeout") or rclient.DEFAULT_CONNECT_TIMEOUT))
    if tree.get("insecure"):
        return rclient.Client(**options)
    return rclient.secure_client(tree.get("pki") or rclient.DEFAULT_PKI, **options)


# ------------------------------------------------------------------- process


def _stop() -> None:
    for task in asyncio.all_tasks():
        if task.get_name() == "relaytree-coordinator-main":
            task.cancel()


async def serve(args: argparse.Namespace) -> int:
    coordinator = Coordinator(gap=args.gap, exact_gap=args.exact_gap, stats_file=args.stats_file)
    path = args.socket
    old_umask = os.umask(0o177)  # the socket is born 0600
    try:
        server = await asyncio.start_unix_server(coordinator.handle, path=path, limit=MAX_LINE)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    ino = os.stat(path).st_ino
    parent_start = _process_start(args.parent_pid) if args.parent_pid else None
    clean_stale(os.path.dirname(path))
    log.info("coordinator %s listening on %s (playbook pid %s)", relaytree.__version__, path, args.parent_pid)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, _stop)
    try:
        while True:
            await asyncio.sleep(1.0)
            coordinator.forget_old_tasks()
            if args.parent_pid and _process_start(args.parent_pid) != parent_start:
                log.info("playbook process %d is gone: exiting", args.parent_pid)
                break
            if coordinator.idle() and time.monotonic() - coordinator.last_activity > args.idle_exit:
                log.info("idle for %.0f s: exiting", args.idle_exit)
                break
    except asyncio.CancelledError:
        log.info("stopped")
    finally:
        server.close()
        try:
            if os.stat(path).st_ino == ino:
                os.unlink(path)
        except OSError:
            pass
        if args.run_dir:
            shutil.rmtree(args.run_dir, ignore_errors=True)
    return 0


def clean_stale(directory: str) -> None:
    """Remove the files of earlier runs whose playbook process is gone (PID.sock, PID.log, ...)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = _RUN_FILE.match(name)
        if not match or os.path.exists("/proc/%s" % match.group(1)):
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m relaytree.coordinator",
                                description="Tree root of one ansible-playbook run (started by the "
                                            "hpc.relaytree plugins).")
    p.add_argument("--socket", required=True, help="UNIX socket to listen on")
    p.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    p.add_argument("--run-dir", help="scratch directory of this run, removed at exit")
    p.add_argument("--gap", type=float, default=DEFAULT_GAP,
                   help="dispatch a step when no host arrived for this long (seconds)")
    p.add_argument("--exact-gap", type=float, default=DEFAULT_EXACT_GAP,
                   help="the same, for tasks whose hosts the strategy announced")
    p.add_argument("--idle-exit", type=float, default=DEFAULT_IDLE_EXIT,
                   help="exit after this many seconds without requests")
    p.add_argument("--stats-file", help="rewrite this JSON file with the stats after every operation")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")

    async def run() -> int:
        asyncio.current_task().set_name("relaytree-coordinator-main")
        return await serve(args)

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
