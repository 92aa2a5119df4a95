"""Tree operations of the coordinator: one batched group of host requests -> one ``Client`` call.

A group (see ``batching``) is the requests of several hosts that are the same
operation: the same ``Spec`` (operation name, port, ``args``, ``tree``). This
module turns it into one call of ``relaytree.client.Client`` over the nodes of
all its members and returns each node's ``NodeOutcome`` plus a few facts about
the operation (``extra``, merged into the ``operation`` object of every reply).

``tree`` (every operation): how the client reaches the relays: ``pki`` (key
directory; default ``relaytree.client.DEFAULT_PKI``), ``insecure`` (plaintext,
unsigned), ``connect_timeout`` (seconds), ``width``, ``deadline`` (seconds);
missing or null values take the client's defaults for the operation.

``args`` per operation:

* ``exec``: ``command`` (a shell string or an argv list, required), ``env``,
  ``cwd``, ``user``, ``stdin`` (text), ``timeout``, ``output_limit``. A member
  may bring its own stdin bytes (``stdin_b64`` of its request, outside the
  operation's identity): hosts with the same command and different stdins are
  still one operation, each node getting its own bytes (sent as shared bases
  plus deltas, cut into several tree operations run at once when they exceed
  ``STDIN_BUDGET``); it replaces ``args.stdin``. ``extra``: ``stdin``
  (``"shared"`` or ``"per-node"``) when there was one, ``parts`` when cut.
* ``copy``: ``src`` (a file readable by the coordinator), ``dest``, ``mode``,
  ``owner``, ``group``, ``mkdirs``, ``backup``, ``check``, ``chunk_size``.
  ``extra``: ``checksum`` (sha1, as ``ansible.builtin.copy`` reports it) and
  ``size`` of ``src``.
* ``ping``: no args.
* ``fetch`` (the ``relay`` connection's ``fetch_file``): each member brings its own
  ``src`` (absolute path on its node) and ``out_path`` (local, absolute), outside
  the identity: the hosts of a step are one tree fetch, each file landing at its
  host's ``out_path`` (checked, atomic, never partial; ``Client.fetch_to_async``).
  ``args.chunk_size`` is optional.

Adding an operation is one entry in ``OPERATIONS``: a coroutine that gets a
``TreeCall`` and returns ``(outcomes by node, extra)``, plus, for per-host fields
outside the identity, their names and parser (``own_fields``, ``parse_own``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, List, Optional, Set, Tuple

from relaytree import client as rclient
from relaytree import stdin as stdin_codec
from relaytree.coordinator.batching import RequestError
from relaytree.results import NodeOutcome

# Per-node stdins travel inside one gRPC request (wire.MAX_MESSAGE is 64 MiB): an exec whose
# encoded stdins (bases + deltas) are larger goes as several tree operations, run at once.
STDIN_BUDGET = 32 << 20

Outcomes = Dict[str, NodeOutcome]
Result = Tuple[Outcomes, Dict[str, Any]]


@dataclass(frozen=True)
class Spec:
    """What one group runs: the request fields that make an operation's identity."""

    op: str
    port: int
    args: Dict[str, Any]
    tree: Dict[str, Any]

    def key(self) -> str:
        """Requests with the same key are one operation (same op, port, args and tree options)."""
        blob = json.dumps([self.op, self.port, self.args, self.tree], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


class FileDigests:
    """sha1 and size of source files, computed once per (path, size, mtime)."""

    def __init__(self) -> None:
        self._known: Dict[Tuple[str, int, int], Tuple[str, int]] = {}

    async def get(self, path: str) -> Tuple[Optional[str], Optional[int]]:
        try:
            st = os.stat(path)
        except OSError:
            return None, None  # the copy itself reports the problem
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self._known:
            try:
                self._known[key] = await asyncio.get_running_loop().run_in_executor(None, file_digest, path)
            except OSError:
                return None, None
        return self._known[key]


@dataclass
class TreeCall:
    """What an operation gets: one client call to make over ``nodes``."""

    client: rclient.Client
    nodes: List[str]
    args: Dict[str, Any]
    common: Dict[str, Any]  # keyword arguments of every Client call: deadline, width
    own: Dict[str, Any] = field(default_factory=dict)  # node -> its host's own part (Operation.parse_own)
    digests: FileDigests = field(default_factory=FileDigests)


@dataclass(frozen=True)
class Operation:
    run: Callable[[TreeCall], Awaitable[Result]]
    # Request fields a host may bring for itself, outside the operation's identity (its own
    # stdin, its own paths), and their parser: request, args -> the host's own part, or None.
    own_fields: Tuple[str, ...] = ()
    parse_own: Optional[Callable[[Dict[str, Any], Dict[str, Any]], Any]] = None


def parse_exec_own(req: Dict[str, Any], args: Dict[str, Any]) -> Optional[bytes]:
    """The bytes of an exec request's ``stdin_b64``, or None when it has none."""
    value = req.get("stdin_b64")
    if value is None:
        return None
    if args.get("stdin"):
        raise RequestError("give args.stdin or stdin_b64, not both")
    if not isinstance(value, str):
        raise RequestError("stdin_b64 must be a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise RequestError("stdin_b64: bad base64: %s" % exc) from None


def parse_fetch_own(req: Dict[str, Any], args: Dict[str, Any]) -> Tuple[str, str]:
    """(src on the node, local out_path) of a fetch request."""
    src, out_path = req.get("src"), req.get("out_path")
    if not isinstance(src, str) or not src.startswith("/"):
        raise RequestError("fetch: src must be an absolute path on the node, not %r" % (src,))
    if not isinstance(out_path, str) or not os.path.isabs(out_path):
        raise RequestError("fetch: out_path must be an absolute local path, not %r" % (out_path,))
    return src, out_path


async def run_exec(call: TreeCall) -> Result:
    args = call.args
    command = args.get("command")
    if not isinstance(command, (str, list)):
        raise rclient.ClientError("exec: command must be a string or a list")
    stdin = (args.get("stdin") or "").encode("utf-8")
    own = call.own
    if own:  # per-host stdins: one for every node, shared when all equal
        own = {node: own.get(node, stdin) for node in call.nodes}
        if len(set(own.values())) == 1:
            stdin, own = next(iter(own.values())), {}
    spec = dict(env=args.get("env") or {}, cwd=args.get("cwd") or "", user=args.get("user") or "",
                timeout=args.get("timeout"), output_limit=int(args.get("output_limit") or 0), **call.common)
    if not own:
        outcomes = await call.client.exec_async(call.nodes, command, stdin=stdin, **spec)
        return outcomes, ({"stdin": "shared"} if stdin else {})
    parts = stdin_parts(own, STDIN_BUDGET)
    results = await asyncio.gather(*[
        call.client.exec_async(part, command, stdin_by_node={n: own[n] for n in part}, **spec)
        for part in parts])
    outcomes = {}
    for result in results:
        outcomes.update(result)
    return outcomes, dict({"stdin": "per-node"}, **({"parts": len(parts)} if len(parts) > 1 else {}))


async def run_copy(call: TreeCall) -> Result:
    args = call.args
    src = args.get("src") or ""
    digest = asyncio.ensure_future(call.digests.get(src))
    try:
        outcomes = await call.client.copy_async(
            call.nodes, src, args.get("dest") or "", mode=args.get("mode") or "",
            owner=args.get("owner") or "", group=args.get("group") or "",
            mkdirs=bool(args.get("mkdirs")), backup=bool(args.get("backup")), check=bool(args.get("check")),
            chunk_size=int(args.get("chunk_size") or rclient.DEFAULT_CHUNK), **call.common)
    except BaseException:
        digest.cancel()
        raise
    checksum, size = await digest
    return outcomes, {"checksum": checksum, "size": size}


async def run_ping(call: TreeCall) -> Result:
    return await call.client.ping_async(call.nodes, **call.common), {}


async def run_fetch(call: TreeCall) -> Result:
    """One tree fetch for the hosts of a step: each node its own source, each file to its host's out_path."""
    sources = {node: own[0] for node, own in call.own.items()}
    outs = {node: own[1] for node, own in call.own.items()}
    chunk_size = int(call.args.get("chunk_size") or rclient.DEFAULT_CHUNK)
    return await call.client.fetch_to_async(list(sources), sources, outs, chunk_size=chunk_size, **call.common), {}


OPERATIONS: Dict[str, Operation] = {
    "exec": Operation(run_exec, ("stdin_b64",), parse_exec_own),
    "copy": Operation(run_copy),
    "ping": Operation(run_ping),
    "fetch": Operation(run_fetch, ("src", "out_path"), parse_fetch_own),
}
# Every per-host field some operation knows: one sent to another operation is refused.
OWN_FIELDS = frozenset(f for operation in OPERATIONS.values() for f in operation.own_fields)


def make_client(port: int, tree: Dict[str, Any]) -> rclient.Client:
    """The tree client of an operation: mutual TLS and signed requests unless tree["insecure"]."""
    options = dict(port=port, connect_timeout=float(tree.get("connect_timeout") or rclient.DEFAULT_CONNECT_TIMEOUT))
    if tree.get("insecure"):
        return rclient.Client(**options)
    return rclient.secure_client(tree.get("pki") or rclient.DEFAULT_PKI, **options)


class TreeOperations:
    """Runs the operation of a group: builds its client and its call, picks the entry of OPERATIONS."""

    def __init__(self, client_factory: Callable[[int, Dict[str, Any]], rclient.Client] = make_client):
        self.client_factory = client_factory
        self.digests = FileDigests()

    async def run(self, spec: Spec, nodes: List[str], own: Optional[Dict[str, Any]] = None) -> Result:
        """Run ``spec`` over ``nodes``; raises ClientError (bad input: nothing was sent) or what the client raised."""
        operation = OPERATIONS.get(spec.op)
        if operation is None:
            raise rclient.ClientError("unknown operation %r" % spec.op)
        common: Dict[str, Any] = {"deadline": spec.tree.get("deadline")}
        if spec.tree.get("width"):
            common["width"] = int(spec.tree["width"])
        call = TreeCall(self.client_factory(spec.port, spec.tree), list(nodes), spec.args, common,
                        dict(own or {}), self.digests)
        return await operation.run(call)


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
