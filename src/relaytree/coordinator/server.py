"""The coordinator process: a UNIX socket server in front of the batching and the tree.

It runs as its own exec'd process (``python -m relaytree.coordinator``, one per
playbook run, started by the first plugin that needs it) because gRPC must
never be loaded in the ansible-playbook process or its forked workers (gRPC and
fork deadlock). Only processes of the same user may talk to it (``SO_PEERCRED``;
the socket is also born 0600). It exits when idle for ``--idle-exit`` seconds or
when the playbook process (``--parent-pid``) is gone, and removes the files of
earlier runs whose playbook is gone.

Protocol: one JSON object per line, one request and one reply per connection.
Every reply has ``"ok"``; a failed request has ``"ok": false, "error": ...``.

* ``{"op": <tree operation>, "task", "step", "host", "node", "port", "args",
  "tree", "expected", "alone", "name"}``: one host's part of a task step; the
  tree operations and their ``args``/``tree`` are those of
  ``relaytree.coordinator.operations`` (``exec``, ``copy``, ``ping``, ``fetch``). Requests
  with the same task, step and operation (hash of op, port, args, tree) are one
  tree operation over all their ``node``s, dispatched by the rules of
  ``relaytree.coordinator.batching``. The reply
  ``{"ok": true, "outcome": NodeOutcome.to_dict() + {"node"}, "operation": {...}}``
  comes when that operation is over; ``operation`` has ``hosts`` (how many),
  ``seconds`` and the operation's own facts (``copy``: ``checksum``, ``size``).
  An operation that could not run answers every member ``ok: false``.

  Optional fields: a host's own part of an operation, outside the operation
  hash (``operations.Operation.own_fields``): ``stdin_b64`` (``exec``: this
  host's own stdin, base64, any bytes; it replaces ``args.stdin``), ``src`` and
  ``out_path`` (``fetch``: the file on this host's node, and where it lands). With ``"raw": true`` the reply's outcome
  carries ``stdout_b64``/``stderr_b64`` (the exact bytes) instead of the decoded
  ``stdout``/``stderr`` (written in pieces: a module's output may be hundreds of
  MiB). ``window`` is the size of the worker pool when no
  strategy announced the task: when that many hosts wait in the task, nobody
  else can come. A worker that closes its connection before the reply
  withdraws its request.
* ``{"op": "expect", "task", "hosts", "window", "name"}``: exact membership
  (from the ``tree`` strategy): the hosts that will run the task, and how many
  of them can run at once (the worker pool).
* ``{"op": "done", "task", "hosts"}``: these hosts are finished with the task
  (or were skipped by ``when``); nobody waits for them any more. Without the
  strategy (the ``relay`` connection reports its own host when Ansible closes
  it), a done host that comes back to the task (a handler run again) starts a
  new run of it.
* ``{"op": "pass", "task", "step", "host"}``: this host goes through ``step``
  without a tree operation this time (for example ``creates`` decided).
* ``{"op": "stats"}``: tree operations run so far, per task.
* ``{"op": "shutdown"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
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
from dataclasses import dataclass, replace
from typing import Any, Deque, Dict, List, Optional, Set

import relaytree
from relaytree import client as rclient
from relaytree.coordinator.batching import DEFAULT_EXACT_GAP, DEFAULT_GAP, Batcher, Group, Member, RequestError
from relaytree.coordinator.operations import OPERATIONS, OWN_FIELDS, Spec, TreeOperations
from relaytree.results import NodeOutcome, failed

log = logging.getLogger("relaytree.coordinator")

MAX_LINE = 96 << 20  # exec stdin travels inline (base64 for stdin_b64)
DEFAULT_IDLE_EXIT = 300.0
KEEP_OPERATIONS = 1000  # operation records kept for "stats"
_RUN_FILE = re.compile(r"^(\d+)\.(sock|sock\.lock|log|d)$")  # files of one run (plugin_utils/_relaytree.py)


@dataclass
class HostRequest(Member):
    """A member that waits for its reply."""

    future: "Optional[asyncio.Future[Dict[str, Any]]]" = None
    own: Any = None  # this host's own part (Operation.parse_own: its stdin, its paths), None: none
    raw: bool = False  # reply with stdout_b64/stderr_b64


class CoordinatorServer:
    """Answers the plugins' requests: batching (Batcher) + tree operations (TreeOperations) + stats."""

    def __init__(self, *, gap: float = DEFAULT_GAP, exact_gap: float = DEFAULT_EXACT_GAP,
                 stats_file: Optional[str] = None, operations: Optional[TreeOperations] = None):
        self.batcher = Batcher(gap=gap, exact_gap=exact_gap, clock=time.monotonic)
        self.operations = operations or TreeOperations()
        self.stats_file = stats_file
        self.counts: Dict[str, Dict[str, Any]] = {}
        self.history: Deque[Dict[str, Any]] = collections.deque(maxlen=KEEP_OPERATIONS)
        self.running: Set[asyncio.Task] = set()
        self.last_activity = time.monotonic()
        self.connections = 0
        self._timer: Optional[asyncio.TimerHandle] = None

    # -- requests --------------------------------------------------------------------

    def submit(self, req: Dict[str, Any]) -> "asyncio.Future[Dict[str, Any]]":
        """A tree operation request: the future of its reply."""
        op = req.get("op")
        operation = OPERATIONS.get(op) if isinstance(op, str) else None
        if operation is None:
            raise RequestError("unknown tree operation %r" % (op,))
        task, step, host, node = (_text(req, k) for k in ("task", "step", "host", "node"))
        port = req.get("port")
        if not _is_int(port) or not 0 < port < 65536:
            raise RequestError("bad port %r" % (port,))
        args, tree = req.get("args") or {}, req.get("tree") or {}
        if not isinstance(args, dict) or not isinstance(tree, dict):
            raise RequestError("args and tree must be objects")
        stray = sorted(f for f in OWN_FIELDS if f in req and f not in operation.own_fields)
        if stray:
            raise RequestError("%s is not for %s requests" % (stray[0], op))
        own = operation.parse_own(req, args) if operation.parse_own is not None else None
        window = req.get("window")
        if window is not None and (not _is_int(window) or window < 0):
            raise RequestError("bad window %r" % (window,))
        spec = Spec(op, port, args, tree)
        member = HostRequest(host, node, asyncio.get_running_loop().create_future(), own, bool(req.get("raw")))
        self._launch(self.batcher.submit(task, step, member, key=spec.key(), spec=spec, name=req.get("name"),
                                         expected=[str(h) for h in req.get("expected") or ()], window=window,
                                         alone=bool(req.get("alone"))))
        return member.future

    def expect(self, task: str, hosts: List[str], window: int, name: Any = None) -> None:
        self._launch(self.batcher.expect(task, hosts, window, name))

    def done(self, task: str, hosts: List[str]) -> None:
        self._launch(self.batcher.done(task, hosts))

    def passed(self, task: str, step: str, host: str) -> None:
        self._launch(self.batcher.passed(task, step, host))

    def withdraw(self, task: str, step: str, host: str) -> None:
        self._launch(self.batcher.withdraw(task, step, host))

    def stats(self) -> Dict[str, Any]:
        return {"pid": os.getpid(), "version": relaytree.__version__, "tasks": self.counts,
                "operations": list(self.history)}

    def idle(self) -> bool:
        return not self.connections and not self.running

    # -- dispatch --------------------------------------------------------------------

    def _launch(self, groups: List[Group]) -> None:
        for group in groups:
            task = asyncio.ensure_future(self._run(group))
            self.running.add(task)
            task.add_done_callback(self.running.discard)
        self._schedule()

    def _schedule(self) -> None:
        """One timer, at the batcher's next idle-gap expiry."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.batcher.next_expiry()
        if when is not None:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, when - time.monotonic()), self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._launch(self.batcher.expire())

    async def _run(self, group: Group) -> None:
        started = time.monotonic()
        self.last_activity = started
        spec: Spec = group.spec
        members: List[HostRequest] = group.members  # type: ignore[assignment]
        extra: Dict[str, Any] = {}
        error = ""
        outcomes: Dict[str, NodeOutcome] = {}
        try:
            outcomes, extra = await self.operations.run(
                spec, group.nodes, {m.node: m.own for m in members if m.own is not None})
        except rclient.ClientError as exc:
            error = str(exc)
        except Exception as exc:  # pylint: disable=broad-except
            log.exception("tree operation %s/%s failed", group.task, group.step)
            error = "coordinator: %s: %s" % (type(exc).__name__, exc)
        seconds = time.monotonic() - started
        self._count(group, seconds, error, extra)
        info = dict(extra, hosts=len(members), seconds=round(seconds, 3))
        for m in members:
            if m.future is None or m.future.done():
                continue
            if error:
                m.future.set_result({"ok": False, "error": error})
            else:
                outcome = outcomes.get(m.node) or failed(m.node, "no result")
                m.future.set_result({"ok": True, "outcome": _outcome_dict(outcome, m), "operation": info})
        self.last_activity = time.monotonic()

    def _count(self, group: Group, seconds: float, error: str, extra: Dict[str, Any]) -> None:
        entry = self.counts.setdefault(group.task, {"name": self.batcher.task_name(group.task),
                                                    "operations": 0, "steps": {}})
        entry["operations"] += 1
        entry["steps"][group.step] = entry["steps"].get(group.step, 0) + 1
        record = {"task": group.task, "name": entry["name"], "step": group.step, "op": group.spec.op,
                  "hosts": [m.host for m in group.members], "seconds": round(seconds, 3), "error": error}
        for key in ("stdin", "parts"):  # exec: "shared" or "per-node" stdin, cut into parts
            if key in extra:
                record[key] = extra[key]
        self.history.append(record)
        if self.stats_file:
            tmp = self.stats_file + ".tmp"
            try:
                with open(tmp, "w") as fh:
                    json.dump(self.stats(), fh)
                os.replace(tmp, self.stats_file)
            except OSError as exc:
                log.warning("cannot write %s: %s", self.stats_file, exc)

    # -- socket ----------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.last_activity = time.monotonic()
        try:
            if not same_user(writer.get_extra_info("socket")):
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
            if op in OPERATIONS:
                return await self._wait(reader, req, self.submit(req))
            if op == "expect":
                window = req.get("window") or 0
                if not _is_int(window) or window < 0:
                    raise RequestError("bad window %r" % (window,))
                self.expect(_text(req, "task"), [str(h) for h in req.get("hosts") or ()], window, req.get("name"))
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Base64:
    """Bytes that a reply carries base64-encoded, written piece by piece by write_reply (a module's
    output may be hundreds of MiB: Ansible's slurp): never a second whole copy in memory."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


def _outcome_dict(outcome: NodeOutcome, member: HostRequest) -> Dict[str, Any]:
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


def same_user(sock: Optional[socket.socket]) -> bool:
    """The peer of a UNIX socket runs as this process's user (SO_PEERCRED)."""
    if sock is None:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def _process_start(pid: int) -> Optional[str]:
    """Start time of a process (field 22 of /proc/PID/stat): tells a live pid from a reused one."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


# ------------------------------------------------------------------- process


def _stop() -> None:
    for task in asyncio.all_tasks():
        if task.get_name() == "relaytree-coordinator-main":
            task.cancel()


async def serve(args: argparse.Namespace) -> int:
    server = CoordinatorServer(gap=args.gap, exact_gap=args.exact_gap, stats_file=args.stats_file)
    path = args.socket
    old_umask = os.umask(0o177)  # the socket is born 0600
    try:
        listener = await asyncio.start_unix_server(server.handle, path=path, limit=MAX_LINE)
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
            server.batcher.forget_old_tasks()
            if args.parent_pid and _process_start(args.parent_pid) != parent_start:
                log.info("playbook process %d is gone: exiting", args.parent_pid)
                break
            if server.idle() and time.monotonic() - server.last_activity > args.idle_exit:
                log.info("idle for %.0f s: exiting", args.idle_exit)
                break
    except asyncio.CancelledError:
        log.info("stopped")
    finally:
        listener.close()
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
