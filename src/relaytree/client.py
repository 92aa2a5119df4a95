"""Client library: the controller is the root of the tree.

The CLI and the Ansible layer both go through `Client`; nothing else builds requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import grpc
from ClusterShell.NodeSet import NodeSet, NodeSetException

import relaytree
from relaytree import stdin as stdin_codec
from relaytree import filefetch, tree, wire
from relaytree.results import NodeOutcome, Status, failed, unreachable
from relaytree.v1 import relaytree_pb2 as pb

# Chosen from bench/engine.py (see the closing note of the engine issue): commands are
# latency-bound (wide tree, 2-3 hops), copies bandwidth-bound (narrow tree).
DEFAULT_EXEC_WIDTH = 32
DEFAULT_COPY_WIDTH = 2
DEFAULT_CHUNK = 1 << 20
DEFAULT_WINDOW = 4
DEFAULT_BATCH_MS = 5
DEFAULT_CONNECT_TIMEOUT = 5.0
NO_TIMEOUT_DEADLINE = 86400.0
MAX_NODES = 1_000_000  # a typo like cn[1-10000000000] must fail, not eat the controller
# Where `relaytree keys init` puts the controller's CA, client certificate and signing key.
DEFAULT_PKI = os.environ.get("RELAYTREE_PKI") or os.path.expanduser("~/.relaytree/pki")

Nodes = Union[str, Iterable[str]]
ResultCallback = Callable[[NodeOutcome], None]
Signer = Callable[[bytes], pb.Authenticator]


class ClientError(Exception):
    """Bad input to an operation (node set, source file, options): nothing was sent."""


def expand(nodes: Nodes) -> List[str]:
    """Node names in order: a ClusterShell node set string, or any iterable of names."""
    if isinstance(nodes, str):
        try:
            nodeset = NodeSet(nodes)
            if len(nodeset) > MAX_NODES:
                raise ClientError("node set %r has %d nodes, more than %d"
                                  % (nodes, len(nodeset), MAX_NODES))
            names = list(nodeset)
        except (NodeSetException, ValueError, AssertionError) as exc:
            raise ClientError("bad node set %r: %s" % (nodes, exc)) from None
    else:
        names = [str(n) for n in nodes]
    seen, ordered = set(), []
    for name in names:
        name = name.strip()
        if not name:
            raise ClientError("empty node name in %r" % (nodes,))
        if name not in seen:
            seen.add(name)
            ordered.append(name)
    if not ordered:
        raise ClientError("no nodes given")
    return ordered


def fold(names: Iterable[str]) -> str:
    return str(NodeSet.fromlist(list(names)))


def _hostport(host: str, port: int) -> str:
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def resolve(names: Sequence[str], port: int) -> Tuple[List[pb.Target], Dict[str, str]]:
    """Targets with addresses from the system resolver; errors by name for the others."""
    def lookup(name: str) -> Tuple[str, Optional[str], str]:
        try:
            ipaddress.ip_address(name)
            return name, _hostport(name, port), ""
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            return name, None, "cannot resolve %s: %s" % (name, exc)
        # Prefer IPv4 when a name has both (cluster fabrics mostly are).
        infos.sort(key=lambda info: info[0] != socket.AF_INET)
        return name, _hostport(infos[0][4][0], port), ""

    if len(names) > 64:
        with ThreadPoolExecutor(16) as pool:
            looked = list(pool.map(lookup, names))
    else:
        looked = [lookup(n) for n in names]
    targets, errors = [], {}
    for name, address, error in looked:
        if address is None:
            errors[name] = error
        else:
            targets.append(pb.Target(name=name, address=address))
    return targets, errors


def _sha256_file(path: str, bufsize: int = 4 << 20) -> Tuple[int, bytes]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(bufsize)
            if not block:
                break
            size += len(block)
            digest.update(block)
    return size, digest.digest()


class Client:
    def __init__(self, *, port: int = relaytree.DEFAULT_PORT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 batch_ms: int = DEFAULT_BATCH_MS,
                 credentials: Optional[grpc.ChannelCredentials] = None,
                 signer: Optional[Signer] = None,
                 validity: float = 0.0):
        if not 0 < port < 65536:
            raise ClientError("bad port %r" % port)
        if connect_timeout <= 0:
            raise ClientError("connect timeout must be positive")
        self.port = port
        self.connect_timeout = connect_timeout
        self.batch_ms = batch_ms
        self.credentials = credentials
        self.signer = signer
        self.validity = validity

    # -- building a request ------------------------------------------------------------

    def _envelope(self, names: Sequence[str], deadline: float, **operation) -> bytes:
        validity = self.validity or deadline + 60.0
        envelope = pb.Envelope(
            protocol_version=relaytree.PROTOCOL_VERSION,
            controller_version=relaytree.__version__,
            request_id=uuid.uuid4().hex,
            not_after_ms=int((time.time() + validity) * 1000),
            nonce=os.urandom(16),
            scope=fold(names),
            **operation)
        return envelope.SerializeToString()

    def _auth(self, envelope: bytes) -> pb.Authenticator:
        return self.signer(envelope) if self.signer is not None else pb.Authenticator()

    async def _run(self, kind: str, nodes: Nodes, width: int, deadline: float, operation: dict,
                   on_result: Optional[ResultCallback], feed: Optional[tree.ChunkFeed] = None,
                   producer=None, stdin_by_node: Optional[Mapping[str, bytes]] = None,
                   on_chunk=None, settle: Optional[Callable[[NodeOutcome], NodeOutcome]] = None,
                   ) -> Dict[str, NodeOutcome]:
        """One tree operation.  `settle` turns each node's outcome into its final one before
        it is kept and reported (a fetch lands the node's file there)."""
        names = expand(nodes)
        if width < 1:
            raise ClientError("width must be at least 1")
        if deadline <= 0:
            raise ClientError("deadline must be positive")
        blobs, patches = {}, {}
        if stdin_by_node is not None:
            missing = [n for n in names if n not in stdin_by_node]
            if missing or len(stdin_by_node) != len(names):
                raise ClientError("stdin_by_node must name exactly the target nodes (missing: %s)"
                                  % fold(missing) if missing else "stdin_by_node names unknown nodes")
            try:
                digests, blobs, patches = stdin_codec.encode({n: stdin_by_node[n] for n in names})
            except stdin_codec.StdinError as exc:
                raise ClientError(str(exc)) from None
            for name, value in digests.items():
                operation["exec"].stdin_sha256[name] = value
        envelope = self._envelope(names, deadline, **operation)
        auth = self._auth(envelope)
        targets, errors = resolve(names, self.port)
        outcomes: Dict[str, NodeOutcome] = {}

        def emit(result) -> None:
            outcome = result if isinstance(result, NodeOutcome) else NodeOutcome.from_pb(result)
            if settle is not None:
                outcome = settle(outcome)
            outcomes[outcome.node] = outcome
            if on_result is not None:
                on_result(outcome)

        for name, error in errors.items():
            emit(unreachable(name, error))
        pool = wire.ChannelPool(self.credentials)
        loop = asyncio.get_running_loop()
        fan = tree.Fanout(pool, kind=kind, envelope=envelope, auth=auth, targets=targets,
                          width=width, connect_timeout=self.connect_timeout,
                          batch_ms=self.batch_ms, deadline=loop.time() + deadline, emit=emit,
                          feed=feed, blobs=blobs, patches=patches, on_chunk=on_chunk)
        try:
            if producer is None:
                await fan.run()
            else:
                prod = asyncio.ensure_future(producer())
                try:
                    await fan.run()
                finally:
                    if not prod.done():
                        prod.cancel()
                    await asyncio.gather(prod, return_exceptions=True)
        finally:
            await pool.close()
        # Every target has exactly one outcome, in the order given.
        return {name: outcomes.get(name) or unreachable(name, "no result") for name in names}

    # -- operations --------------------------------------------------------------------

    async def exec_async(self, nodes: Nodes, command: Union[str, Sequence[str]], *,
                         env: Optional[Mapping[str, str]] = None, cwd: str = "", user: str = "",
                         stdin: bytes = b"", timeout: Optional[float] = None,
                         output_limit: int = 0, width: int = DEFAULT_EXEC_WIDTH,
                         deadline: Optional[float] = None,
                         on_result: Optional[ResultCallback] = None,
                         stdin_by_node: Optional[Mapping[str, bytes]] = None,
                         ) -> Dict[str, NodeOutcome]:
        """Run a shell string (str) or an argv (list) on every node.

        stdin_by_node gives each node its own stdin (instead of `stdin`): sent as shared
        bases plus small per-node deltas, each node's bytes covered by the signature."""
        if stdin and stdin_by_node is not None:
            raise ClientError("give stdin or stdin_by_node, not both")
        if isinstance(command, str):
            if not command.strip():
                raise ClientError("empty command")
            spec = pb.ExecSpec(shell=command)
        else:
            argv = [str(a) for a in command]
            if not argv:
                raise ClientError("empty command")
            spec = pb.ExecSpec(argv=pb.Argv(args=argv))
        if timeout is not None and timeout <= 0:
            raise ClientError("timeout must be positive")
        spec.env.update(dict(env or {}))
        spec.cwd = cwd
        spec.user = user
        spec.stdin = stdin
        spec.timeout_ms = int(timeout * 1000) if timeout else 0
        spec.output_limit = output_limit
        if deadline is None:
            deadline = timeout + 30.0 + 2 * self.connect_timeout if timeout else NO_TIMEOUT_DEADLINE
        return await self._run("exec", nodes, width, deadline, {"exec": spec}, on_result,
                               stdin_by_node=stdin_by_node)

    async def ping_async(self, nodes: Nodes, *, width: int = DEFAULT_EXEC_WIDTH,
                         deadline: Optional[float] = None,
                         on_result: Optional[ResultCallback] = None) -> Dict[str, NodeOutcome]:
        if deadline is None:
            deadline = 30.0 + 2 * self.connect_timeout
        return await self._run("ping", nodes, width, deadline, {"ping": pb.PingSpec()}, on_result)

    async def copy_async(self, nodes: Nodes, src: str, dest: str, *, mode: str = "",
                         owner: str = "", group: str = "", mkdirs: bool = False,
                         backup: bool = False, check: bool = False,
                         width: int = DEFAULT_COPY_WIDTH, chunk_size: int = DEFAULT_CHUNK,
                         deadline: Optional[float] = None,
                         on_result: Optional[ResultCallback] = None,
                         on_progress: Optional[Callable[[int, int], None]] = None,
                         ) -> Dict[str, NodeOutcome]:
        """Copy the local file `src` to `dest` on every node (dest may be a directory)."""
        if not os.path.isabs(dest):
            raise ClientError("destination must be an absolute path: %r" % dest)
        if not 0 < chunk_size <= 8 << 20:
            raise ClientError("chunk size must be between 1 byte and 8 MiB")
        try:
            fd = os.open(src, os.O_RDONLY)
        except OSError as exc:
            raise ClientError("cannot read %s: %s" % (src, exc.strerror)) from None
        try:
            if not os.path.isfile(src):
                raise ClientError("%s is not a regular file" % src)
            loop = asyncio.get_running_loop()
            size, digest = await loop.run_in_executor(None, _sha256_file, src)
            spec = pb.CopySpec(dest=dest, size=size, sha256=digest, chunk_size=chunk_size,
                               src_name=os.path.basename(src.rstrip("/")), mode=mode, owner=owner,
                               group=group, mkdirs=mkdirs, backup=backup, check=check)
            if deadline is None:
                deadline = 3600.0 + size / 10e6

            def replay(index: int) -> bytes:
                return os.pread(fd, chunk_size, index * chunk_size)

            feed = tree.ChunkFeed(DEFAULT_WINDOW, replay)

            async def produce():
                sent = 0
                index = 0
                try:
                    while sent < size:
                        chunk = os.pread(fd, chunk_size, index * chunk_size)
                        if not chunk:
                            raise tree.CopyAborted("%s shrank while being copied" % src)
                        await feed.put(chunk)
                        sent += len(chunk)
                        index += 1
                        if on_progress is not None:
                            on_progress(sent, size)
                except BaseException as exc:
                    await feed.finish(exc)
                    raise
                await feed.finish()

            return await self._run("copy", nodes, width, deadline, {"copy": spec}, on_result,
                                   feed=feed, producer=produce)
        finally:
            os.close(fd)

    async def fetch_to_async(self, nodes: Nodes, src: Union[str, Mapping[str, str]],
                             dest: Union[Mapping[str, str], Callable[[str], str]], *,
                             width: int = DEFAULT_COPY_WIDTH, chunk_size: int = DEFAULT_CHUNK,
                             deadline: Optional[float] = None,
                             on_result: Optional[ResultCallback] = None) -> Dict[str, NodeOutcome]:
        """Bring a file back from every node, each node's to its own local path.

        src: the absolute path on every node, or {node: its own path}.  dest: {node: local
        path} or a function of the node name.  Each file lands through a temporary file
        next to its destination, checked against the size and sha256 the node reports,
        then renamed into place (missing parent directories are created); a failed or
        interrupted fetch leaves no partial file.  A node's outcome has dest (the local
        path), size and sha256; changed is False when the destination already held the
        same content.  Memory stays bounded whatever the file sizes."""
        names = expand(nodes)
        if isinstance(src, str):
            spec = pb.FetchSpec(src=src, chunk_size=chunk_size)
            sources = dict.fromkeys(names, src)
        else:
            sources = {n: src.get(n, "") for n in names}
            spec = pb.FetchSpec(chunk_size=chunk_size)
            if len(set(sources.values())) == 1:  # the same for all: no per-node table
                spec.src = next(iter(sources.values()))
            else:
                spec.src_by_node.update(sources)
        bad = [n for n, path in sources.items() if not path.startswith("/") or "\0" in path]
        if bad:
            raise ClientError("fetch source must be an absolute path on the nodes: %r (%s)"
                              % (sources[bad[0]], fold(bad)))
        if not 0 < chunk_size <= 8 << 20:
            raise ClientError("chunk size must be between 1 byte and 8 MiB")
        paths = {n: dest(n) if callable(dest) else dest.get(n, "") for n in names}
        missing = [n for n, path in paths.items() if not path]
        if missing:
            raise ClientError("no local destination for %s" % fold(missing))
        sinks = {n: filefetch.FetchSink(path) for n, path in paths.items()}
        broken: Dict[str, str] = {}  # node -> why its data cannot be used

        async def on_chunk(node: str, frame: bytes) -> None:
            if node in broken:
                return
            _name, offset, data = wire.parse_chunk(frame)
            try:
                sinks[node].write(offset, data)
            except filefetch.FetchError as exc:
                sinks[node].abort()
                broken[node] = str(exc)

        def settle(outcome: NodeOutcome) -> NodeOutcome:
            sink = sinks[outcome.node]
            outcome.dest = sink.path
            if outcome.status is Status.PASS:
                try:
                    if outcome.node in broken:
                        raise filefetch.FetchError(broken[outcome.node])
                    outcome.changed = sink.finish(outcome.size or 0, bytes.fromhex(outcome.sha256))
                except filefetch.FetchError as exc:
                    outcome = failed(outcome.node, str(exc), outcome.via)
                    outcome.dest = sink.path
            sink.abort()  # nothing left behind but a landed file
            return outcome

        try:
            return await self._run("fetch", names, width,
                                   NO_TIMEOUT_DEADLINE if deadline is None else deadline,
                                   {"fetch": spec}, on_result, on_chunk=on_chunk, settle=settle)
        finally:
            for sink in sinks.values():
                sink.abort()

    async def fetch_async(self, nodes: Nodes, src: str, destdir: str, **kw) -> Dict[str, NodeOutcome]:
        """Bring `src` back from every node to DESTDIR/NODE/basename(src) (like clush --rcopy);
        see fetch_to_async for the guarantees and the other arguments."""
        if not isinstance(src, str) or not src.startswith("/") or src.endswith("/"):
            raise ClientError("fetch source must be the absolute path of a file on the nodes: %r"
                              % (src,))
        if not os.path.isdir(destdir):
            raise ClientError("destination directory %s does not exist" % destdir)
        names = expand(nodes)
        bad = [n for n in names if n in (".", "..") or "/" in n or "\0" in n]
        if bad:
            raise ClientError("node name %r cannot name a directory under %s" % (bad[0], destdir))
        base = os.path.basename(src)
        return await self.fetch_to_async(names, src, lambda n: os.path.join(destdir, n, base), **kw)

    # Synchronous forms, for callers without an event loop.
    def exec(self, nodes: Nodes, command, **kw) -> Dict[str, NodeOutcome]:
        return asyncio.run(self.exec_async(nodes, command, **kw))

    def ping(self, nodes: Nodes, **kw) -> Dict[str, NodeOutcome]:
        return asyncio.run(self.ping_async(nodes, **kw))

    def copy(self, nodes: Nodes, src: str, dest: str, **kw) -> Dict[str, NodeOutcome]:
        return asyncio.run(self.copy_async(nodes, src, dest, **kw))

    def fetch(self, nodes: Nodes, src: str, destdir: str, **kw) -> Dict[str, NodeOutcome]:
        return asyncio.run(self.fetch_async(nodes, src, destdir, **kw))

    def fetch_to(self, nodes: Nodes, src, dest, **kw) -> Dict[str, NodeOutcome]:
        return asyncio.run(self.fetch_to_async(nodes, src, dest, **kw))


def secure_client(pki_dir: str = DEFAULT_PKI, **kw) -> Client:
    """A Client using the controller's TLS certificate and signing key from `pki_dir`."""
    from relaytree import auth, keys  # cryptography: only needed in secure mode
    try:
        cert, key, ca = keys.controller_tls_files(pki_dir)
        credentials = keys.channel_credentials(cert, key, ca)
        signing_key = keys.load_signing_key(os.path.join(pki_dir, "signing", "controller.key"))
    except keys.KeysError as exc:
        raise ClientError("controller keys: %s (create them with `relaytree keys init`)" % exc) from None
    return Client(credentials=credentials, signer=lambda envelope: auth.sign(envelope, signing_key), **kw)


def all_passed(outcomes: Mapping[str, NodeOutcome]) -> bool:
    return bool(outcomes) and all(o.status is Status.PASS for o in outcomes.values())
