"""Tree routing: split targets into groups, forward to group heads, re-head, re-dispatch.

The same code runs on every relay and at the root on the controller (which serves
nobody itself).  A relay holding targets [me, t1 ... tn] serves itself and hands
t1 ... tn to a Fanout, which cuts them into `width` contiguous groups and sends each
group to its first member.  Results come back per node; a node that never reports
is accounted for here, so every target gets exactly one outcome.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Awaitable, Callable, Dict, List, Optional, Sequence

import grpc
import grpc.aio

from relaytree import stdin as stdin_codec
from relaytree import wire
from relaytree.results import NodeOutcome, Status
from relaytree.v1 import relaytree_pb2 as pb

log = logging.getLogger("relaytree.tree")

# Codes that say "this head is gone" rather than "this request is bad".
_DEAD_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
               grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED)


def split(targets: Sequence, width: int) -> List[list]:
    """Cut targets into at most `width` contiguous groups whose sizes differ by at most one."""
    width = max(1, min(width, len(targets)))
    size, extra = divmod(len(targets), width)
    groups, start = [], 0
    for i in range(width):
        end = start + size + (1 if i < extra else 0)
        if end > start:
            groups.append(list(targets[start:end]))
        start = end
    return groups


def child_timeout(remaining: float) -> float:
    """Deadline for a child call: a little shorter than ours at every hop, so a parent
    reports a stuck child before its own parent gives up."""
    return max(0.05, remaining - min(2.0, 0.05 * remaining + 0.1))


class ResultStream:
    """What a subtree sends up: results gathered for `batch_s` before each send, and (fetch)
    file chunk frames passed through as they come, in the order they were put.

    Memory is bounded.  At most `chunk_window` chunk frames wait here: `put_chunk` waits
    for room.  Results are put without waiting (one per target, mostly small), but once
    the results waiting here hold `max_queued` bytes or more, `room()` waits until they
    have gone up: a relay awaits it before reading more from its children, so gRPC flow
    control holds the rest of a subtree's big outputs (Ansible's slurp) below.  A result
    that would make a batch larger than `max_bytes` goes in the next one, so a node's big
    output travels alone.
    """

    _END = object()

    def __init__(self, expected: int, batch_s: float, max_bytes: int = 4 << 20,
                 chunk_window: int = 4, max_queued: int = 64 << 20):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._expected = expected
        self._seen = 0
        self._batch_s = batch_s
        self._max_bytes = max_bytes
        self._chunk_room = asyncio.Semaphore(max(1, chunk_window))
        self._max_queued = max_queued
        self._queued = 0  # bytes of the results waiting here
        self._drained = asyncio.Event()
        self._drained.set()
        self._carry = None  # taken from the queue for the next batch

    def put(self, result: pb.NodeResult) -> None:
        # ByteSize serializes (upb): once per result, then carried with it.
        size = result.ByteSize()
        self._seen += 1
        self._queued += size
        if self._queued >= self._max_queued:
            self._drained.clear()
        self._queue.put_nowait((result, size))

    async def put_chunk(self, frame: bytes) -> None:
        await self._chunk_room.acquire()
        self._queue.put_nowait(frame)

    async def room(self) -> None:
        """Return once the results waiting here hold less than `max_queued` bytes."""
        await self._drained.wait()

    def close(self) -> None:
        self._queue.put_nowait(self._END)

    def _taken(self, size: int) -> None:
        self._queued -= size
        if self._queued < self._max_queued:
            self._drained.set()

    async def batches(self):
        """ResultBatch messages and chunk frames (bytes), in order."""
        queue = self._queue
        while True:
            item, self._carry = self._carry, None
            if item is None:
                item = await queue.get()
            if item is self._END:
                return
            if isinstance(item, bytes):
                self._chunk_room.release()
                yield item
                continue
            # Wait a little for more, unless the whole subtree has already reported.
            if self._batch_s > 0 and self._seen < self._expected:
                await asyncio.sleep(self._batch_s)
            result, size = item
            batch, sizes = [result], [size]
            while size < self._max_bytes:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if item is self._END or isinstance(item, bytes) or size + item[1] > self._max_bytes:
                    self._carry = item
                    break
                batch.append(item[0])
                sizes.append(item[1])
                size += item[1]
            message = pb.ResultBatch(results=batch)
            del batch, result, item  # the batch holds its own copies now
            yield message
            del message
            self._taken(sum(sizes))  # sent: only now may the subtree send more

    async def serve(self, *work):
        """Yield batches while the coroutines `work` run (they put results here); the
        stream ends when all are done, and they are cancelled if the consumer goes away."""
        async def run_all():
            try:
                await asyncio.gather(*work)
            finally:
                self.close()

        task = asyncio.ensure_future(run_all())
        try:
            async for batch in self.batches():
                yield batch
            await task
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


class ReplayUnavailable(Exception):
    """A late reader needs chunks this relay no longer has (its local copy failed)."""


class CopyAborted(Exception):
    """The incoming stream broke or was refused: nothing more will come."""


class ChunkFeed:
    """The chunks of one copy, shared by every child stream, with bounded memory.

    The newest `window` chunks stay in memory; `put` waits until every reader that
    keeps up has taken the chunk about to be dropped (back-pressure up the tree).  A
    reader that starts late (a re-dispatched subtree) reads older chunks back through
    `replay` (the local file) and joins the back-pressure once it has caught up.
    """

    def __init__(self, window: int, replay: Optional[Callable[[int], bytes]]):
        self.window = max(1, window)
        self._replay = replay
        self._chunks: Dict[int, bytes] = {}
        self.count = 0
        self.done = False
        self.error: Optional[BaseException] = None
        self._cursors: Dict[int, int] = {}
        self._next_reader = 0
        self._cond = asyncio.Condition()

    def disable_replay(self) -> None:
        self._replay = None

    def _blocked(self) -> bool:
        # The next put drops chunk `oldest`: wait for readers about to take it.  Readers
        # further behind are replaying from disk and do not hold the stream back.
        oldest = self.count - self.window
        return oldest >= 0 and oldest in self._cursors.values()

    async def put(self, chunk: bytes) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._blocked())
            self._chunks[self.count] = chunk
            self._chunks.pop(self.count - self.window, None)
            self.count += 1
            self._cond.notify_all()

    async def finish(self, error: Optional[BaseException] = None) -> None:
        async with self._cond:
            self.done = True
            self.error = error
            self._cond.notify_all()

    def reader(self) -> "FeedReader":
        """A reader positioned at chunk 0; it holds the stream back from now on."""
        rid = self._next_reader
        self._next_reader += 1
        self._cursors[rid] = 0
        return FeedReader(self, rid)


class FeedReader:
    def __init__(self, feed: ChunkFeed, rid: int):
        self._feed = feed
        self._rid = rid
        self._closed = False

    async def chunks(self):
        """Every chunk from 0 on, as bytes."""
        feed, index = self._feed, 0
        try:
            while True:
                async with feed._cond:
                    await feed._cond.wait_for(lambda: index < feed.count or feed.done)
                    if index >= feed.count:
                        if feed.error is not None:
                            raise CopyAborted(str(feed.error) or type(feed.error).__name__)
                        return
                    chunk = feed._chunks.get(index)
                if chunk is None:
                    if feed._replay is None:
                        raise ReplayUnavailable("chunk %d is no longer held by this relay" % index)
                    chunk = feed._replay(index)
                yield chunk
                index += 1
                async with feed._cond:
                    if not self._closed:
                        feed._cursors[self._rid] = index
                    feed._cond.notify_all()
        finally:
            await self.close()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._feed._cursors.pop(self._rid, None)
            async with self._feed._cond:
                self._feed._cond.notify_all()


class Fanout:
    """Deliver one operation to a list of targets through `width` subtrees.

    kind is "exec", "ping" (unary request, streamed results), "copy" (chunks from `feed`)
    or "fetch" (unary request, results and file chunk frames back).
    `emit` is called with one pb.NodeResult per target, exactly once each.  For a fetch,
    `on_chunk(node, frame)` is awaited for every chunk frame of a node still waiting for
    its outcome, in order (it applies back-pressure by taking its time); a node's chunks
    come before its result, and start again at offset 0 if it is re-dispatched.  A relay
    passes `wait_room` (ResultStream.room): awaited before each read of a child's stream.
    """

    def __init__(self, pool: wire.ChannelPool, *, kind: str, envelope: bytes, auth: pb.Authenticator,
                 targets: Sequence[pb.Target], width: int, connect_timeout: float, batch_ms: int,
                 deadline: float, emit: Callable[[pb.NodeResult], None], via: str = "",
                 feed: Optional[ChunkFeed] = None, blobs=None, patches=None,
                 on_chunk: Optional[Callable[[str, bytes], Awaitable[None]]] = None,
                 wait_room: Optional[Callable[[], Awaitable[None]]] = None):
        self.pool = pool
        self.kind = kind
        self.envelope = envelope
        self.auth = auth
        self.targets = list(targets)
        self.width = max(1, width)
        self.connect_timeout = connect_timeout
        self.batch_ms = batch_ms
        self.deadline = deadline  # loop.time() value
        self.emit = emit
        self.via = via
        self.feed = feed
        # Per-node stdin (see relaytree.stdin): each subtree gets only its own part.
        self.blobs = blobs or {}
        self.patches = patches or {}
        self.on_chunk = on_chunk
        self.wait_room = wait_room

    async def run(self) -> None:
        if not self.targets:
            return
        await asyncio.gather(*(self._group(g) for g in split(self.targets, self.width)))

    def _request(self, pending: "OrderedDict[str, pb.Target]") -> pb.Request:
        route = pb.Route(targets=list(pending.values()), width=self.width,
                         connect_timeout_ms=int(self.connect_timeout * 1000), batch_ms=self.batch_ms)
        if self.patches:
            blobs, patches = stdin_codec.prune(pending, self.blobs, self.patches)
            for key, data in blobs.items():
                route.blobs[key] = data
            for name, patch in patches.items():
                route.stdin[name].CopyFrom(patch)
        return pb.Request(envelope=self.envelope, auth=self.auth, route=route)

    def _report(self, pending, names, status: Status, error: str) -> None:
        for name in list(names):
            if pending.pop(name, None) is not None:
                self.emit(NodeOutcome(node=name, status=status, error=error, via=self.via).to_pb())

    async def _group(self, group: List[pb.Target]) -> None:
        # A copy's first reader is registered before connecting, so the stream waits for
        # this subtree instead of running ahead; later heads replay what they missed.
        readers = [self.feed.reader()] if self.feed is not None else []
        try:
            await self._dispatch(group, readers)
        finally:
            for reader in readers:
                await reader.close()

    async def _dispatch(self, group: List[pb.Target], readers: list) -> None:
        loop = asyncio.get_running_loop()
        pending: "OrderedDict[str, pb.Target]" = OrderedDict((t.name, t) for t in group)
        while pending:
            head = next(iter(pending.values()))
            remaining = self.deadline - loop.time()
            if remaining <= 0:
                self._report(pending, pending, Status.TIMEOUT, "deadline passed before delivery")
                return
            if not head.address:
                self._report(pending, [head.name], Status.UNREACHABLE,
                             "no address for %s" % head.name)
                continue
            try:
                channel = await self.pool.connect(head.address, min(self.connect_timeout, remaining),
                                                  head.name)
            except wire.Unreachable as exc:
                self._report(pending, [head.name], Status.UNREACHABLE, str(exc))
                continue
            try:
                await self._call(channel, pending, child_timeout(self.deadline - loop.time()), readers)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code is grpc.StatusCode.DEADLINE_EXCEEDED or self.deadline - loop.time() <= 0:
                    self._report(pending, pending, Status.TIMEOUT,
                                 "no result before the deadline (via %s)" % head.name)
                    return
                if code in _DEAD_CODES:
                    self.pool.drop(head.address, head.name)
                    # The head is gone; whoever it had not reported for goes to the next head.
                    self._report(pending, [head.name], Status.UNREACHABLE,
                                 "relay %s failed: %s" % (head.name, details or code.name))
                else:
                    # The head refused the request (version, signature, policy...): that is
                    # the head's own verdict; the others decide for themselves.
                    self._report(pending, [head.name], Status.FAILED, details or code.name)
                continue
            except ReplayUnavailable as exc:
                self._report(pending, pending, Status.FAILED,
                             "cannot re-dispatch the copy via %s: %s" % (self.via or "root", exc))
                return
            except CopyAborted as exc:
                self._report(pending, pending, Status.FAILED, "copy aborted upstream: %s" % exc)
                return
            except Exception as exc:  # noqa: BLE001 - one bad head must not sink the group
                log.exception("call to %s failed", head.name)
                self.pool.drop(head.address, head.name)
                self._report(pending, [head.name], Status.FAILED,
                             "relay %s: %s: %s" % (head.name, type(exc).__name__, exc))
                continue
            if pending:
                # The subtree finished without accounting for some nodes: never leave a
                # target without an outcome, and do not loop on a misbehaving relay.
                self._report(pending, pending, Status.UNREACHABLE,
                             "relay %s returned no result for this node" % head.name)

    def _absorb(self, pending, batch: pb.ResultBatch) -> None:
        for result in batch.results:
            if pending.pop(result.node, None) is not None:
                self.emit(result)

    async def _room(self) -> None:
        # Callers drop their reference to what they read first: a big result must not
        # stay alive here while the relay waits for the results above it to go up.
        if self.wait_room is not None:
            await self.wait_room()

    async def _call(self, channel, pending, timeout: float, readers: list) -> None:
        request = self._request(pending)
        if self.kind == "exec":
            call = wire.exec_method(channel)(request, timeout=timeout)
        elif self.kind == "ping":
            call = wire.ping_method(channel)(request, timeout=timeout)
        elif self.kind == "fetch":
            await self._fetch(channel, pending, request, timeout)
            return
        else:
            if not readers:  # a re-dispatch: start over from chunk 0 (replayed)
                readers.append(self.feed.reader())
            await self._copy(channel, pending, request, timeout, readers.pop())
            return
        try:
            async for batch in call:
                self._absorb(pending, batch)
                del batch
                await self._room()
        finally:
            call.cancel()

    async def _fetch(self, channel, pending, request: pb.Request, timeout: float) -> None:
        call = wire.fetch_method(channel)(request, timeout=timeout)
        try:
            async for frame in call:
                if frame[:1] == wire.CHUNK_TAG:
                    # A chunk of a node that is not ours to wait for (reported, or not in
                    # this subtree) is dropped, like its result would be.
                    node = wire.chunk_node(frame)
                    if node in pending:
                        await self.on_chunk(node, frame)
                elif frame[:1] == wire.RESULTS_TAG:
                    self._absorb(pending, wire.parse_results(frame))
                else:
                    raise wire.FrameError("unknown frame tag %r" % frame[:1])
                del frame
                await self._room()
        finally:
            call.cancel()

    async def _copy(self, channel, pending, request: pb.Request, timeout: float,
                    reader: FeedReader) -> None:
        call = wire.copy_method(channel)(timeout=timeout)
        header = request.SerializeToString()

        async def send():
            await call.write(header)
            async for chunk in reader.chunks():
                await call.write(chunk)
            await call.done_writing()

        sender = asyncio.ensure_future(send())
        # If feeding fails (replay impossible, upstream broke), stop the call at once.
        sender.add_done_callback(lambda t: t.cancelled() or t.exception() is None or call.cancel())
        try:
            while True:
                batch = await call.read()
                if batch is grpc.aio.EOF:
                    break
                self._absorb(pending, batch)
                del batch
                await self._room()
        except grpc.aio.AioRpcError:
            failure = sender.exception() if sender.done() and not sender.cancelled() else None
            if isinstance(failure, (ReplayUnavailable, CopyAborted)):
                raise failure from None
            raise
        finally:
            if not sender.done():
                sender.cancel()
                try:
                    await sender
                except BaseException:  # noqa: BLE001 - the call's own outcome is what matters
                    pass
            await reader.close()
            call.cancel()
