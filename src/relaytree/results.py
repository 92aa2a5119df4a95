"""Per-node results: the one result model of the daemon, the client, the CLI and Ansible."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from relaytree.v1 import relaytree_pb2 as pb


class Status(str, enum.Enum):
    PASS = "PASS"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    UNREACHABLE = "UNREACHABLE"


_TO_PB = {
    Status.PASS: pb.PASS,
    Status.FAILED: pb.FAILED,
    Status.TIMEOUT: pb.TIMEOUT,
    Status.UNREACHABLE: pb.UNREACHABLE,
}
_FROM_PB = {v: k for k, v in _TO_PB.items()}


@dataclass
class NodeOutcome:
    node: str
    status: Status
    rc: Optional[int] = None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    changed: bool = False
    error: str = ""
    elapsed: float = 0.0
    ping: Optional[Dict[str, Any]] = None
    dest: str = ""
    via: str = ""
    sha256: str = ""  # fetch: hex digest of the content the node sent
    size: Optional[int] = None  # fetch: bytes the node sent

    @property
    def ok(self) -> bool:
        return self.status is Status.PASS

    def to_pb(self) -> pb.NodeResult:
        msg = pb.NodeResult(
            node=self.node,
            status=_TO_PB[self.status],
            stdout=self.stdout,
            stderr=self.stderr,
            stdout_truncated=self.stdout_truncated,
            stderr_truncated=self.stderr_truncated,
            changed=self.changed,
            error=self.error,
            elapsed=self.elapsed,
            dest=self.dest,
            via=self.via,
            sha256=bytes.fromhex(self.sha256),
            size=self.size or 0,
        )
        if self.rc is not None:
            msg.rc = self.rc
        if self.ping is not None:
            msg.ping.CopyFrom(pb.PingInfo(**self.ping))
        return msg

    @classmethod
    def from_pb(cls, msg: pb.NodeResult) -> "NodeOutcome":
        ping = None
        if msg.HasField("ping"):
            ping = {
                "version": msg.ping.version,
                "protocol_version": msg.ping.protocol_version,
                "hostname": msg.ping.hostname,
                "uptime": msg.ping.uptime,
                "load": list(msg.ping.load),
            }
        return cls(
            node=msg.node,
            status=_FROM_PB.get(msg.status, Status.FAILED),
            rc=msg.rc if msg.HasField("rc") else None,
            stdout=msg.stdout,
            stderr=msg.stderr,
            stdout_truncated=msg.stdout_truncated,
            stderr_truncated=msg.stderr_truncated,
            changed=msg.changed,
            error=msg.error,
            elapsed=msg.elapsed,
            ping=ping,
            dest=msg.dest,
            via=msg.via,
            sha256=msg.sha256.hex(),
            size=msg.size if msg.sha256 else None,
        )

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form (the CLI's --json node entry, Ansible's per-host result)."""
        out: Dict[str, Any] = {
            "status": self.status.value,
            "rc": self.rc,
            "stdout": self.stdout.decode("utf-8", "replace"),
            "stderr": self.stderr.decode("utf-8", "replace"),
            "changed": self.changed,
        }
        if self.stdout_truncated:
            out["stdout_truncated"] = True
        if self.stderr_truncated:
            out["stderr_truncated"] = True
        if self.error:
            out["error"] = self.error
        if self.ping is not None:
            out["ping"] = self.ping
        if self.dest:
            out["dest"] = self.dest
        if self.sha256:
            out["sha256"] = self.sha256
            out["size"] = self.size
        out["elapsed"] = round(self.elapsed, 3)
        return out


def unreachable(node: str, error: str, via: str = "") -> NodeOutcome:
    return NodeOutcome(node=node, status=Status.UNREACHABLE, error=error, via=via)


def failed(node: str, error: str, via: str = "") -> NodeOutcome:
    return NodeOutcome(node=node, status=Status.FAILED, error=error, via=via)


def summary(outcomes: List[NodeOutcome]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for o in outcomes:
        counts[o.status.value] = counts.get(o.status.value, 0) + 1
    return counts
