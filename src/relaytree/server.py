"""The relay daemon: serves its own part of each request and relays the rest down the tree."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

import relaytree
from relaytree import auth, execute, filecopy, filefetch, tree, wire
from relaytree import stdin as stdin_codec
from relaytree.results import NodeOutcome, Status, failed
from relaytree.v1 import relaytree_pb2 as pb

log = logging.getLogger("relaytree.server")

MAX_CHUNK = 8 << 20
DEFAULT_DEADLINE = 86400.0  # when a caller sets none (every client of ours does)
EXEC_GRACE = 5.0  # a command whose requesters all vanished is killed after this long


class Refused(Exception):
    """The request is refused before anything runs; carries the gRPC status to answer."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Settings:
    listen: str = "0.0.0.0:%d" % relaytree.DEFAULT_PORT
    base_dir: Optional[str] = None
    state_dir: str = "/var/lib/relaytree"
    log_level: str = "info"
    insecure: bool = False
    allow_version_skew: bool = False
    chunk_window: int = 4  # chunks kept in memory per copy (shared by all children)
    max_concurrent_rpcs: int = 512
    drain_seconds: float = 30.0
    output_limit: int = execute.DEFAULT_OUTPUT_LIMIT
    extra: Dict[str, object] = field(default_factory=dict)


@dataclass
class Admitted:
    envelope: pb.Envelope
    envelope_bytes: bytes
    auth: pb.Authenticator
    me: str
    children: List[pb.Target]
    width: int
    connect_timeout: float
    batch_ms: int
    deadline: float  # loop.time()
    route: pb.Route


def _keep_until(envelope: pb.Envelope) -> float:
    """Remember what a request did for as long as it could be delivered again (monotonic)."""
    valid_for = envelope.not_after_ms / 1000.0 - time.time() if envelope.not_after_ms else 0.0
    return time.monotonic() + max(600.0, valid_for + 60.0)


class _ExecEntry:
    """A command running (or finished) for one request id; duplicate deliveries share it."""

    def __init__(self, task: "asyncio.Task", expires: float):
        self.task = task
        self.refs = 0
        self.expires = expires
        self.reaper: Optional[asyncio.TimerHandle] = None


class Relay:
    """The daemon's request handlers (also usable in-process by tests)."""

    def __init__(self, settings: Settings, pool: Optional[wire.ChannelPool] = None,
                 verifier: Optional[auth.Verifier] = None):
        self.settings = settings
        self.pool = pool or wire.ChannelPool()
        self.verifier = verifier
        self._execs: Dict[str, _ExecEntry] = {}
        self._copies: Dict[str, tuple] = {}  # request_id -> (expires, changed) of landed copies
        self._fetched: Dict[str, float] = {}  # request_id -> expiry, of fetches streamed completely
        self.started = time.time()
        self.counters: Dict[str, int] = {"exec": 0, "copy": 0, "ping": 0, "fetch": 0, "refused": 0}

    # -- admission ---------------------------------------------------------------------

    def _may_redeliver(self, envelope: pb.Envelope) -> bool:
        """Is a second delivery of this signed request a re-dispatch rather than a replay?

        A command may be re-delivered while it still runs here (the delivery attaches to
        it); a copy until it has landed here (an interrupted copy is received again: same
        signed content, same destination); a fetch until one delivery of it has been
        streamed completely from here (a node below a relay that died sends its file again;
        once the file went up in full, a second delivery is a replay).  Anything that
        already ran is not run again.
        """
        kind = envelope.WhichOneof("operation")
        if kind == "exec":
            entry = self._execs.get(envelope.request_id)
            return entry is not None and not entry.task.done()
        if kind == "copy":
            return envelope.request_id not in self._copies
        if kind == "fetch":
            return envelope.request_id not in self._fetched
        return False

    def _authenticate(self, request: pb.Request) -> pb.Envelope:
        if self.verifier is None:  # insecure mode: nothing is checked
            try:
                return pb.Envelope.FromString(request.envelope)
            except DecodeError:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed request envelope") from None
        try:
            return self.verifier.verify(request.envelope,
                                        request.auth if request.HasField("auth") else None)
        except auth.ReplayError as dup:
            # The same signed request again.  While it is still running here this is a
            # parent re-dispatching a subtree after a relay died: the delivery attaches to
            # the running command (or lands the copy once more).  Otherwise it is a replay.
            if self._may_redeliver(dup.envelope):
                return dup.envelope
            raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                          "request refused: replayed request %s (it already ran on this node; "
                          "not run again)" % dup.request_id) from None
        except auth.AuthError as exc:
            code = (grpc.StatusCode.PERMISSION_DENIED if exc.code == "policy"
                    else grpc.StatusCode.UNAUTHENTICATED)
            raise Refused(code, "request refused: %s" % exc) from None

    def admit(self, request: pb.Request, context, kind: str) -> Admitted:
        envelope = self._authenticate(request)
        if envelope.protocol_version != relaytree.PROTOCOL_VERSION:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          "protocol version mismatch: the controller speaks relaytree protocol %d "
                          "(relaytree %s), this daemon speaks %d (relaytree %s); deploy the same "
                          "version everywhere" % (envelope.protocol_version,
                                                  envelope.controller_version or "?",
                                                  relaytree.PROTOCOL_VERSION, relaytree.__version__))
        if (envelope.controller_version != relaytree.__version__
                and not self.settings.allow_version_skew):
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          "version mismatch: controller runs relaytree %s, this daemon runs %s "
                          "(redeploy, or set allow_version_skew in the daemon config)"
                          % (envelope.controller_version or "?", relaytree.__version__))
        if envelope.WhichOneof("operation") != kind:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          "%s request carries a %s operation" % (kind, envelope.WhichOneof("operation")))
        if not envelope.request_id:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "request without a request id")
        if envelope.not_after_ms and envelope.not_after_ms < time.time() * 1000:
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "request expired")
        route = request.route
        if not route.targets:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "request without targets")
        names = set()
        for target in route.targets:
            if not target.name or target.name in names:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              "empty or duplicate target name %r" % target.name)
            names.add(target.name)
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining() if context is not None else None
        if remaining is None:
            remaining = DEFAULT_DEADLINE
        self.counters[kind] += 1
        return Admitted(
            envelope=envelope, envelope_bytes=request.envelope, auth=request.auth,
            me=route.targets[0].name, children=list(route.targets[1:]),
            width=max(1, route.width or 1),
            connect_timeout=(route.connect_timeout_ms or 5000) / 1000.0,
            batch_ms=route.batch_ms, deadline=loop.time() + remaining, route=route)

    def _fanout(self, op: Admitted, kind: str, stream: tree.ResultStream, feed=None) -> tree.Fanout:
        """The fan-out below this node, sending what its subtree reports up through `stream`."""
        return tree.Fanout(self.pool, kind=kind, envelope=op.envelope_bytes, auth=op.auth,
                           targets=op.children, width=op.width, connect_timeout=op.connect_timeout,
                           batch_ms=op.batch_ms, deadline=op.deadline, emit=stream.put, via=op.me,
                           feed=feed, blobs=op.route.blobs, patches=op.route.stdin,
                           on_chunk=lambda node, frame: stream.put_chunk(frame), wait_room=stream.room)

    async def _serve_unary(self, op: Admitted, kind: str, local):
        """Run `local()` (-> NodeOutcome) here and the fan-out below; yield batches as they come."""
        stream = tree.ResultStream(1 + len(op.children), op.batch_ms / 1000.0)

        async def run_local():
            try:
                outcome = await local()
            except Exception as exc:  # noqa: BLE001 - a bug must not cost the subtree
                log.exception("%s failed locally", kind)
                outcome = failed(op.me, "internal error: %s" % exc)
            outcome.node = op.me
            stream.put(outcome.to_pb())

        async for batch in stream.serve(run_local(), self._fanout(op, kind, stream).run()):
            yield batch

    # -- exec ----------------------------------------------------------------------------

    def _resolve_dir(self, path: str) -> str:
        if not path:
            return "/" if not self.settings.base_dir else self.settings.base_dir
        return filecopy.resolve_path(self.settings.base_dir, path)

    async def _exec_local(self, op: Admitted) -> NodeOutcome:
        spec = op.envelope.exec
        request_id = op.envelope.request_id
        entry = self._execs.get(request_id)
        if entry is None:
            self._expire()
            try:
                cwd = self._resolve_dir(spec.cwd)
            except filecopy.CopyError as exc:
                return failed(op.me, "cwd: %s" % exc)
            data = spec.stdin
            if spec.stdin_sha256:
                try:
                    data = self._node_stdin(op)
                except stdin_codec.StdinError as exc:
                    return failed(op.me, str(exc))
            limit = min(spec.output_limit or self.settings.output_limit, wire.MAX_OUTPUT_LIMIT)
            which = spec.WhichOneof("command")
            if which is None or (which == "shell" and not spec.shell) or (
                    which == "argv" and not spec.argv.args):
                return failed(op.me, "empty command")
            coro = execute.run_command(
                shell=spec.shell if which == "shell" else None,
                argv=list(spec.argv.args) if which == "argv" else None,
                env=dict(spec.env), cwd=cwd, user=spec.user or None, stdin=data,
                timeout=spec.timeout_ms / 1000.0 if spec.timeout_ms else None,
                output_limit=limit)
            entry = self._execs[request_id] = _ExecEntry(asyncio.ensure_future(coro),
                                                         _keep_until(op.envelope))
        else:
            log.info("request %s delivered again: attaching to the running command", request_id)
        entry.refs += 1
        if entry.reaper is not None:
            entry.reaper.cancel()
            entry.reaper = None
        try:
            result = await asyncio.shield(entry.task)
        except ValueError as exc:  # the request's command, env or stdin is malformed
            return failed(op.me, "bad command: %s" % exc)
        finally:
            entry.refs -= 1
            if entry.refs == 0 and not entry.task.done():
                # Everyone who asked is gone (client killed, parent died): give a re-dispatch
                # a moment to re-attach, then kill the command's process group.
                entry.reaper = asyncio.get_running_loop().call_later(EXEC_GRACE, entry.task.cancel)
        return NodeOutcome(node=op.me, status=Status(result.status), rc=result.rc,
                           stdout=result.stdout, stderr=result.stderr,
                           stdout_truncated=result.stdout_truncated,
                           stderr_truncated=result.stderr_truncated,
                           error=result.error, elapsed=result.elapsed, changed=True)

    def _node_stdin(self, op: Admitted) -> bytes:
        """This node's own stdin of a per-node-stdin exec, checked against the signature."""
        spec = op.envelope.exec
        mismatch = self._not_me(op)
        if mismatch:
            raise stdin_codec.StdinError("per-node input " + mismatch)
        expected = spec.stdin_sha256.get(op.me)
        if expected is None:
            raise stdin_codec.StdinError("no signed stdin digest for %s" % op.me)
        return stdin_codec.decode(op.me, expected, op.route.blobs, op.route.stdin)

    def _not_me(self, op: Admitted) -> str:
        """Why this node must not take the per-node part of a request addressed to op.me
        ("" when it may): a relay must not hand it another node's (signed) part."""
        if self.verifier is not None and op.me.lower() not in self.verifier.node_names:
            return "addressed to %s, but this node is %s (set [auth] node_names)" % (
                op.me, ", ".join(self.verifier.node_names))
        return ""

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, e in self._execs.items() if e.task.done() and e.expires < now]:
            del self._execs[key]
        for key in [k for k, v in self._copies.items() if v[0] < now]:
            del self._copies[key]
        for key in [k for k, expires in self._fetched.items() if expires < now]:
            del self._fetched[key]

    async def Exec(self, request: pb.Request, context):
        op = await self._admit_or_abort(request, context, "exec")
        async for batch in self._serve_unary(op, "exec", lambda: self._exec_local(op)):
            yield batch

    # -- ping ----------------------------------------------------------------------------

    def ping_info(self) -> dict:
        try:
            with open("/proc/uptime") as fh:
                uptime = float(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            uptime = 0.0
        return {"version": relaytree.__version__, "protocol_version": relaytree.PROTOCOL_VERSION,
                "hostname": socket.gethostname(), "uptime": uptime, "load": list(os.getloadavg())}

    async def Ping(self, request: pb.Request, context):
        op = await self._admit_or_abort(request, context, "ping")

        async def local():
            return NodeOutcome(node=op.me, status=Status.PASS, ping=self.ping_info())

        async for batch in self._serve_unary(op, "ping", local):
            yield batch

    # -- copy ----------------------------------------------------------------------------

    async def Copy(self, request_iterator, context):
        frames = request_iterator.__aiter__()
        try:
            header = await frames.__anext__()
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty copy stream")
        try:
            request = pb.Request.FromString(header)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed copy header")
        op = await self._admit_or_abort(request, context, "copy")
        spec = op.envelope.copy
        if not 0 < spec.chunk_size <= MAX_CHUNK:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "chunk size %d out of range (1..%d)" % (spec.chunk_size, MAX_CHUNK))
        if len(spec.sha256) != 32:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "copy header without a sha256")

        stream = tree.ResultStream(1 + len(op.children), op.batch_ms / 1000.0)
        started = time.monotonic()
        local: Optional[filecopy.LocalCopy] = filecopy.LocalCopy(filecopy.CopyRequest(
            dest=spec.dest, size=spec.size, sha256=spec.sha256, chunk_size=spec.chunk_size,
            src_name=spec.src_name, mode=spec.mode, owner=spec.owner, group=spec.group,
            mkdirs=spec.mkdirs, backup=spec.backup, check=spec.check), self.settings.base_dir)

        def report_local(status: Status, error: str = "", changed: bool = False, dest: str = ""):
            stream.put(NodeOutcome(node=op.me, status=status, error=error, changed=changed, dest=dest,
                                   elapsed=time.monotonic() - started).to_pb())

        landed = local  # released once the fan-out no longer needs to replay from it
        try:
            local.open()
            self._check_resolved_dest(op, local)
        except filecopy.CopyError as exc:
            local.abort()
            report_local(Status.FAILED, str(exc))
            local = None
        feed = tree.ChunkFeed(self.settings.chunk_window,
                              None if local is None or spec.check else local.read_chunk)

        async def receive():
            nonlocal local
            index = received = 0
            try:
                async for chunk in frames:
                    received += len(chunk)
                    if received > spec.size:
                        raise filecopy.CopyError("stream carries more than the announced %d bytes"
                                                 % spec.size)
                    if local is not None:
                        try:
                            local.write(index, chunk)
                        except filecopy.CopyError as exc:
                            local.abort()
                            local = None
                            feed.disable_replay()
                            report_local(Status.FAILED, str(exc))
                    await feed.put(chunk)
                    index += 1
                if received != spec.size:
                    raise filecopy.CopyError("stream ended after %d of %d bytes" % (received, spec.size))
            except (filecopy.CopyError, grpc.aio.AioRpcError) as exc:
                await feed.finish(exc)
                if local is not None:
                    local.abort()
                    local = None
                    report_local(Status.FAILED, str(exc))
                return
            except BaseException:
                if local is not None:
                    local.abort()
                await feed.finish(tree.CopyAborted("cancelled"))
                raise
            await feed.finish()
            if local is not None:
                try:
                    outcome = local.finish()
                except filecopy.CopyError as exc:
                    local.abort()
                    report_local(Status.FAILED, str(exc))
                else:
                    changed = outcome.changed
                    cached = self._copies.get(op.envelope.request_id)
                    if cached is not None:
                        changed = cached[1]  # a re-delivery reports what the first one did
                    else:
                        self._copies[op.envelope.request_id] = (_keep_until(op.envelope), changed)
                    report_local(Status.PASS, changed=changed, dest=outcome.dest)
                local = None

        try:
            async for batch in stream.serve(receive(), self._fanout(op, "copy", stream, feed).run()):
                yield batch
        finally:
            if local is not None:
                local.abort()
            landed.abort()

    def _check_resolved_dest(self, op: Admitted, local: filecopy.LocalCopy) -> None:
        """A symlink under an allowed prefix must not lead the copy outside it."""
        rule = self.verifier.rule_for(op.auth.key_id) if self.verifier is not None else None
        if rule is None or rule.copy_dest_prefixes is None or not local.local_path:
            return
        real = os.path.realpath(local.local_path)
        if self.settings.base_dir:
            real = "/" + os.path.relpath(real, os.path.realpath(self.settings.base_dir))
        if not rule.dest_allowed(real):
            raise filecopy.CopyError("copy destination %s resolves to %s, which key %s may not write"
                                     % (op.envelope.copy.dest, real, op.auth.key_id))

    # -- fetch ---------------------------------------------------------------------------

    async def Fetch(self, request: pb.Request, context):
        op = await self._admit_or_abort(request, context, "fetch")
        error = fetch_request_error(op.envelope.fetch)
        if error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        self._expire()
        stream = tree.ResultStream(1 + len(op.children), op.batch_ms / 1000.0,
                                   chunk_window=self.settings.chunk_window)
        async for item in stream.serve(self._fetch_local(op, stream), self._fanout(op, "fetch", stream).run()):
            yield item if isinstance(item, bytes) else wire.results_frame(item)
        # Everything went up (an interrupted delivery never gets here): see _may_redeliver.
        self._fetched[op.envelope.request_id] = _keep_until(op.envelope)

    async def _fetch_local(self, op: Admitted, stream: tree.ResultStream) -> None:
        """Stream this node's file up (chunk frames, then its result)."""
        spec = op.envelope.fetch
        started = time.monotonic()
        path = spec.src
        try:
            if spec.src_by_node:
                mismatch = self._not_me(op)
                if mismatch:
                    raise filefetch.FetchError("per-node source path " + mismatch)
                if op.me not in spec.src_by_node:
                    raise filefetch.FetchError("the request names no source path for %s" % op.me)
                path = spec.src_by_node[op.me]
            source = filefetch.FileSource(path, self.settings.base_dir, spec.chunk_size)
            source.open()
            try:
                self._check_resolved_src(op, source)
                while True:
                    offset = source.offset
                    data = source.read_chunk()
                    if data is None:
                        break
                    await stream.put_chunk(wire.chunk_frame(op.me, offset, data))
            finally:
                source.close()
            outcome = NodeOutcome(node=op.me, status=Status.PASS, dest=path, size=source.size,
                                  sha256=source.sha256.hex())
        except filefetch.FetchError as exc:
            outcome = failed(op.me, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must not cost the subtree
            log.exception("fetch failed locally")
            outcome = failed(op.me, "internal error: %s" % exc)
        outcome.elapsed = time.monotonic() - started
        stream.put(outcome.to_pb())

    def _check_resolved_src(self, op: Admitted, source: filefetch.FileSource) -> None:
        """A symlink under an allowed prefix must not lead the fetch outside it."""
        rule = self.verifier.rule_for(op.auth.key_id) if self.verifier is not None else None
        if rule is None or rule.fetch_src_prefixes is None:
            return
        real = source.real_path
        if self.settings.base_dir:
            real = "/" + os.path.relpath(real, os.path.realpath(self.settings.base_dir))
        if not rule.src_allowed(real):
            raise filefetch.FetchError("fetch source %s resolves to %s, which key %s may not read"
                                       % (source.path, real, op.auth.key_id))

    async def _admit_or_abort(self, request, context, kind) -> Admitted:
        try:
            return self.admit(request, context, kind)
        except Refused as exc:
            self.counters["refused"] += 1
            log.warning("refused %s request: %s", kind, exc)
            await context.abort(exc.code, str(exc))
            raise  # not reached: abort raises


def fetch_request_error(spec: pb.FetchSpec) -> str:
    """What is wrong with a fetch request, "" if nothing (checked before any file is opened)."""
    if not 0 < spec.chunk_size <= MAX_CHUNK:
        return "chunk size %d out of range (1..%d)" % (spec.chunk_size, MAX_CHUNK)
    if spec.src and spec.src_by_node:
        return "fetch request with both a source path and per-node source paths"
    paths = list(spec.src_by_node.values()) if spec.src_by_node else [spec.src]
    for path in paths:
        if not path.startswith("/") or "\0" in path:
            return "fetch source path %r is not an absolute path" % path[:200]
    return ""


def _handlers(relay: Relay) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(wire.SERVICE, {
        "Exec": grpc.unary_stream_rpc_method_handler(
            relay.Exec, request_deserializer=pb.Request.FromString,
            response_serializer=pb.ResultBatch.SerializeToString),
        "Ping": grpc.unary_stream_rpc_method_handler(
            relay.Ping, request_deserializer=pb.Request.FromString,
            response_serializer=pb.ResultBatch.SerializeToString),
        "Copy": grpc.stream_stream_rpc_method_handler(
            relay.Copy, request_deserializer=None,
            response_serializer=pb.ResultBatch.SerializeToString),
        "Fetch": grpc.unary_stream_rpc_method_handler(
            relay.Fetch, request_deserializer=pb.Request.FromString, response_serializer=None),
    })


def tune_malloc() -> None:
    """glibc: keep 1 MiB chunk buffers off mmap and stop trimming (halves relay CPU per GiB)."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


async def build_server(relay: Relay, listen: str,
                       credentials: Optional[grpc.ServerCredentials] = None) -> grpc.aio.Server:
    server = grpc.aio.server(options=wire.SERVER_OPTIONS,
                             maximum_concurrent_rpcs=relay.settings.max_concurrent_rpcs)
    server.add_generic_rpc_handlers((_handlers(relay),))
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as exc:
        raise OSError("cannot listen on %s: %s" % (listen, exc)) from None
    if not port:
        raise OSError("cannot listen on %s (address in use or not available)" % listen)
    await server.start()
    return server


async def serve(settings: Settings, credentials: Optional[grpc.ServerCredentials] = None,
                channel_credentials: Optional[grpc.ChannelCredentials] = None,
                verifier: Optional[auth.Verifier] = None) -> None:
    """Run the daemon until SIGTERM/SIGINT, then drain in-flight work."""
    relay = Relay(settings, wire.ChannelPool(channel_credentials), verifier)
    server = await build_server(relay, settings.listen, credentials)
    log.info("relaytree %s serving on %s (base dir %s)", relaytree.__version__, settings.listen,
             settings.base_dir or "/")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining (up to %.0fs)", settings.drain_seconds)
    # Finish in-flight work; whatever is still running after the grace is cancelled,
    # and cancelled copies remove their temporary files.
    await server.stop(settings.drain_seconds)
    await relay.pool.close()
    if verifier is not None:
        verifier.close()
    log.info("stopped")
