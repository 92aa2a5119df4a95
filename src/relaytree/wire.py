"""gRPC plumbing shared by the daemon and the controller: method paths, channel options, channel pool."""

from __future__ import annotations

import asyncio
from typing import Dict, Optional

import grpc
import grpc.aio

from relaytree import execute
from relaytree.v1 import relaytree_pb2 as pb

SERVICE = "relaytree.v1.Relay"
EXEC = "/%s/Exec" % SERVICE
PING = "/%s/Ping" % SERVICE
COPY = "/%s/Copy" % SERVICE

# One ResultBatch may carry several nodes' capped outputs; chunks are 1 MiB.
MAX_MESSAGE = 64 << 20
# Largest per-stream output a request may ask the nodes to keep.
MAX_OUTPUT_LIMIT = execute.MAX_OUTPUT_LIMIT

_COMMON_OPTIONS = [
    # A fixed 1 MiB HTTP/2 window per stream instead of BDP auto-tuning: the auto-tuned
    # windows let a relay buffer 100+ MiB during a big copy (1 GiB via 8 relays: peak RSS
    # 200 MiB -> 80 MiB, same wall time); 1 MiB per RTT of 100 us is still 10 GB/s.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 1 << 20),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]

# Keepalive lets a parent notice a child that vanished without closing its socket.
CHANNEL_OPTIONS = _COMMON_OPTIONS + [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
]

SERVER_OPTIONS = _COMMON_OPTIONS + [
    # Two daemons on one address must fail, not silently share the port.
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


class Unreachable(Exception):
    """A node could not be connected to within the connect timeout."""


class ChannelPool:
    """One channel per child, reused across operations (a new channel costs a handshake).

    With TLS, a child is dialled at the address the root resolved, and its certificate
    must name the node (`name`): each hop checks "this address really is node X".
    """

    def __init__(self, credentials: Optional[grpc.ChannelCredentials] = None):
        self._credentials = credentials
        self._channels: Dict[tuple, grpc.aio.Channel] = {}

    @property
    def secure(self) -> bool:
        return self._credentials is not None

    def _new(self, address: str, name: str) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        options = list(CHANNEL_OPTIONS)
        if name:
            options.append(("grpc.ssl_target_name_override", name))
        return grpc.aio.secure_channel(address, self._credentials, options=options)

    async def connect(self, address: str, timeout: float, name: str = "") -> grpc.aio.Channel:
        """A READY channel to address, or Unreachable after at most `timeout` seconds.

        A channel left in TRANSIENT_FAILURE by an earlier failure is replaced, so a node
        that came back is not held hostage by gRPC's reconnect backoff.
        """
        key = (address, name if self.secure else "")
        channel = self._channels.get(key)
        if channel is not None and channel.get_state() in (
                grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
            self._channels.pop(key, None)
            await channel.close()
            channel = None
        if channel is None:
            channel = self._channels[key] = self._new(address, name)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        state = channel.get_state(try_to_connect=True)
        while state is not grpc.ChannelConnectivity.READY:
            if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                raise Unreachable("connection to %s failed" % address)
            if state is grpc.ChannelConnectivity.SHUTDOWN:
                raise Unreachable("channel to %s shut down" % address)
            remaining = end - loop.time()
            if remaining <= 0:
                raise Unreachable("no connection to %s within %.1fs" % (address, timeout))
            try:
                await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
            except asyncio.TimeoutError:
                raise Unreachable("no connection to %s within %.1fs" % (address, timeout)) from None
            state = channel.get_state(try_to_connect=True)
        return channel

    def drop(self, address: str, name: str = "") -> None:
        """Forget a channel whose peer died mid-call (the next use reconnects)."""
        channel = self._channels.pop((address, name if self.secure else ""), None)
        if channel is not None:
            asyncio.ensure_future(channel.close())

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


def exec_method(channel: grpc.aio.Channel):
    return channel.unary_stream(EXEC, request_serializer=pb.Request.SerializeToString,
                                response_deserializer=pb.ResultBatch.FromString)


def ping_method(channel: grpc.aio.Channel):
    return channel.unary_stream(PING, request_serializer=pb.Request.SerializeToString,
                                response_deserializer=pb.ResultBatch.FromString)


def copy_method(channel: grpc.aio.Channel):
    # Raw frames: the header is a serialized Request, then file chunks as they are.
    return channel.stream_stream(COPY, request_serializer=None,
                                 response_deserializer=pb.ResultBatch.FromString)
