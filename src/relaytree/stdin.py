"""Per-node stdin in the transport: shared bases plus a small delta per node.

Ansible module payloads of different hosts differ by a few bytes, so one exec can carry
a payload per node without sending N full copies: each node's stdin is a base blob with
one changed middle region.  The envelope signs each node's sha256; the bytes travel in
the per-hop Route, pruned to the subtree at every relay.
"""

from __future__ import annotations

import hashlib
from typing import Dict, Iterable, Mapping, Tuple

from relaytree.v1 import relaytree_pb2 as pb


class StdinError(Exception):
    pass


def _common_prefix(a: bytes, b: bytes) -> int:
    """Length of the common prefix, by bisection over slice compares (memcmp speed)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: bytes, b: bytes, limit: int) -> int:
    lo, hi = 0, min(len(a), len(b), limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid:] == b[len(b) - mid:]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def encode(stdin_by_node: Mapping[str, bytes]) -> Tuple[Dict[str, bytes], Dict[str, bytes],
                                                          Dict[str, pb.StdinPatch]]:
    """(signed digests by node, blobs by key, patches by node)."""
    digests: Dict[str, bytes] = {}
    blobs: Dict[str, bytes] = {}
    patches: Dict[str, pb.StdinPatch] = {}
    bases: list = []  # (key, bytes): a node far from every base becomes a base itself
    for node, data in stdin_by_node.items():
        if not isinstance(data, bytes):
            raise StdinError("stdin for %s must be bytes" % node)
        digests[node] = digest(data)
        best = None
        for key, base in bases:
            prefix = _common_prefix(base, data)
            suffix = _common_suffix(base, data, min(len(base), len(data)) - prefix)
            middle = len(data) - prefix - suffix
            if best is None or middle < best[3]:
                best = (key, prefix, suffix, middle)
            if middle == 0:
                break
        if best is None or best[3] > max(256, len(data) // 4):
            key = digests[node].hex()
            blobs[key] = data
            bases.append((key, data))
            patches[node] = pb.StdinPatch(base=key, prefix=len(data))
        else:
            key, prefix, suffix, _ = best
            patches[node] = pb.StdinPatch(base=key, prefix=prefix, suffix=suffix,
                                          middle=data[prefix:len(data) - suffix])
    return digests, blobs, patches


def prune(names: Iterable[str], blobs: Mapping[str, bytes], patches: Mapping[str, pb.StdinPatch]
          ) -> Tuple[Dict[str, bytes], Dict[str, pb.StdinPatch]]:
    """The part of blobs and patches a subtree of `names` needs."""
    mine = {n: patches[n] for n in names if n in patches}
    return {p.base: blobs[p.base] for p in mine.values() if p.base in blobs}, mine


def decode(node: str, expected: bytes, blobs: Mapping[str, bytes],
           patches: Mapping[str, pb.StdinPatch]) -> bytes:
    """This node's stdin, checked against the signed digest."""
    patch = patches.get(node)
    if patch is None or patch.base not in blobs:
        raise StdinError("no stdin for %s in the request" % node)
    base = blobs[patch.base]
    if patch.prefix + patch.suffix > len(base):
        raise StdinError("malformed stdin delta for %s" % node)
    data = base[:patch.prefix] + patch.middle + base[len(base) - patch.suffix:]
    if digest(data) != expected:
        raise StdinError("stdin for %s does not match the signed digest" % node)
    return data
