"""Request signing and verification (pure logic, no gRPC).

The root serializes an :class:`Envelope` once, signs those exact bytes with the
controller's Ed25519 key (:func:`sign`) and every relay forwards the bytes
unchanged.  Each daemon checks them with a :class:`Verifier` *before acting*::

    verifier = Verifier(trusted_keys, policy, node_names={"node12", "10.0.0.12"})
    try:
        env = verifier.verify(request.envelope, request.auth)     # first delivery: act on it
    except ReplayError as dup:
        # The very same signed request arrived again (a relay died and its parent
        # re-dispatched the subtree).  Everything but the nonce checked out:
        # attach to the in-flight / cached result of dup.request_id; never run again.
        # Without such a result, refuse with str(dup).
    except AuthError as e:
        # refuse with str(e); e.code is a short machine-readable reason
        ...

Order of checks: authenticator present, key id known, signature valid (no field
of the envelope is looked at before this), envelope well formed, protocol
version, expiry / validity window (with clock-skew tolerance), scope (one of the
node's names is in the folded node set of all targets), per-key policy, and last
the nonce: it is recorded only when everything else passed.

Nonce cache: bounded (``nonce_cache_size`` entries).  An entry is forgotten only
when the request can no longer pass the expiry check; "floor" is the latest
``not_after`` of any forgotten entry and every request not in the cache with
``not_after <= floor`` is refused, so forgetting never re-opens a replay (this
also covers a clock stepping backwards).  When the cache is full of unexpired
entries, the entry expiring first is evicted and the floor raised to its expiry:
requests expiring later (every new request of a controller using a constant
validity) are still accepted, older ones are refused with "nonce cache full".
With ``nonce_file`` the cache survives a daemon restart (append-only log,
fsync'ed per accepted request, compacted); without it a restarted daemon
accepts a replay of a request it executed before the restart while that request
is still valid, so keep validity short or give the daemon a nonce file.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import ipaddress
import os
import posixpath
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from relaytree import PROTOCOL_VERSION, __version__
from relaytree.keys import KeysError, key_id as _key_id, load_public_key
from relaytree.v1 import relaytree_pb2 as pb

SIGNATURE_LEN = 64
MIN_NONCE_LEN = 8
MAX_NONCE_LEN = 64
DEFAULT_VALIDITY = 3600.0


class AuthError(Exception):
    """A request was refused.  ``str(e)`` is the reason; ``code`` a short tag:
    unsigned, unknown_key, bad_signature, malformed, protocol, expired,
    validity, scope, policy, replay, nonce_reuse, nonce_window, nonce_cache_full, nonce_store."""

    def __init__(self, reason: str, code: str = "denied"):
        super().__init__(reason)
        self.reason = reason
        self.code = code


class ReplayError(AuthError):
    """The same signed request (same nonce, same bytes) was seen before.

    Raised only after every other check passed, so ``envelope`` is authentic:
    the daemon can attach the delivery to the in-flight or cached result of
    ``request_id`` instead of running it again, or refuse it.
    """

    def __init__(self, request_id: str, envelope: pb.Envelope, key_id: str):
        super().__init__(f"replayed request (nonce seen), request id {request_id!r}", "replay")
        self.request_id = request_id
        self.envelope = envelope
        self.key_id = key_id


def _short(value: Any, limit: int = 64) -> str:
    text = value if isinstance(value, str) else repr(value)
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


# --------------------------------------------------------------------------- signing


def sign(envelope_bytes: bytes, private_key: ed25519.Ed25519PrivateKey) -> pb.Authenticator:
    """Authenticator (key id + Ed25519 signature) over ``envelope_bytes`` exactly."""
    if not isinstance(private_key, ed25519.Ed25519PrivateKey):
        raise TypeError("private_key must be an Ed25519PrivateKey")
    data = bytes(envelope_bytes)
    return pb.Authenticator(key_id=_key_id(private_key), signature=private_key.sign(data))


def stamp(
    envelope: pb.Envelope,
    *,
    validity: float = DEFAULT_VALIDITY,
    clock: Callable[[], float] = time.time,
) -> pb.Envelope:
    """Fill the freshness fields of ``envelope`` in place and return it: protocol
    and controller version, a request id (if empty), a fresh 16-byte nonce and
    ``not_after_ms = now + validity``."""
    envelope.protocol_version = PROTOCOL_VERSION
    if not envelope.controller_version:
        envelope.controller_version = __version__
    if not envelope.request_id:
        envelope.request_id = uuid.uuid4().hex
    envelope.nonce = os.urandom(16)
    envelope.not_after_ms = int((clock() + validity) * 1000)
    return envelope


def sign_envelope(envelope: pb.Envelope, private_key: ed25519.Ed25519PrivateKey) -> Tuple[bytes, pb.Authenticator]:
    """Serialize ``envelope`` once and sign the bytes: ``(envelope_bytes, authenticator)``.
    Forward ``envelope_bytes`` unchanged (``Request.envelope``)."""
    data = envelope.SerializeToString()
    return data, sign(data, private_key)


# --------------------------------------------------------------------------- policy


def _norm_path(path: str) -> str:
    """Lexically normalized absolute path ('..' and '.' resolved, one leading '/')."""
    return "/" + posixpath.normpath(path).lstrip("/")


def _under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def _norm_prefixes(prefixes: Optional[List[str]], what: str) -> Optional[List[str]]:
    if prefixes is None:
        return None
    out = []
    for p in prefixes:
        if not isinstance(p, str) or not p.startswith("/") or "\0" in p:
            raise ValueError(f"{what} prefix must be an absolute path, got {p!r}")
        out.append(_norm_path(p))
    return out


def _path_allowed(path: str, prefixes: Optional[List[str]]) -> bool:
    if prefixes is None:
        return True
    if not path.startswith("/") or "\0" in path:
        return False
    norm = _norm_path(path)
    return any(_under(norm, p) for p in prefixes)


@dataclass
class KeyRule:
    """What one controller key may do.  ``None`` lists mean "no restriction".

    ``allow_fetch`` (read files back from the nodes) defaults to ``allow_exec``: a key
    that may run commands can read any file anyway (``cat``), while a key limited to
    copying files in must not gain read access to the whole node by default.
    """

    allow_exec: bool = True
    allow_copy: bool = True
    copy_dest_prefixes: Optional[List[str]] = None
    run_as_users: Optional[List[str]] = None
    allow_fetch: Optional[bool] = None
    fetch_src_prefixes: Optional[List[str]] = None

    def __post_init__(self) -> None:
        self.copy_dest_prefixes = _norm_prefixes(self.copy_dest_prefixes, "copy destination")
        self.fetch_src_prefixes = _norm_prefixes(self.fetch_src_prefixes, "fetch source")
        if self.allow_fetch is None:
            self.allow_fetch = self.allow_exec
        if self.run_as_users is not None:
            self.run_as_users = [str(u) for u in self.run_as_users]

    def dest_allowed(self, path: str) -> bool:
        """Is absolute ``path`` (normalized lexically here) under an allowed prefix?

        The daemon should also call this with the ``os.path.realpath`` of the
        final destination before writing, so a symlink under an allowed prefix
        cannot lead outside it.
        """
        return _path_allowed(path, self.copy_dest_prefixes)

    def src_allowed(self, path: str) -> bool:
        """Is absolute ``path`` under an allowed fetch source prefix?  (The daemon also
        checks the real path of the file it opened.)"""
        return _path_allowed(path, self.fetch_src_prefixes)

    def user_allowed(self, user: str) -> bool:
        return self.run_as_users is None or user in self.run_as_users

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "KeyRule":
        unknown = set(data) - {"allow_exec", "allow_copy", "copy_dest_prefixes", "run_as_users",
                               "allow_fetch", "fetch_src_prefixes"}
        if unknown:
            raise ValueError(f"unknown key rule setting(s): {', '.join(sorted(unknown))}")
        return cls(**dict(data))


class Policy:
    """Per-key authorization: ``key_id -> KeyRule``.

    Keys trusted by the verifier but without a rule get ``default`` (everything
    allowed unless given); ``default=None`` refuses them instead.
    """

    def __init__(self, rules: Optional[Mapping[str, KeyRule]] = None, default: Any = "allow-all"):
        self.rules: Dict[str, KeyRule] = dict(rules or {})
        self.default: Optional[KeyRule] = KeyRule() if isinstance(default, str) and default == "allow-all" else default

    def rule_for(self, key_id: str) -> Optional[KeyRule]:
        return self.rules.get(key_id, self.default)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Policy":
        """From configuration: ``{"keys": {key_id: {allow_exec: .., ...}}, "default": {...} | None}``.
        A missing ``default`` means everything allowed for keys without a rule."""
        rules = {str(k): KeyRule.from_dict(v or {}) for k, v in (data.get("keys") or {}).items()}
        if "default" in data:
            d = data["default"]
            default = None if d is None else KeyRule.from_dict(d)
        else:
            default = KeyRule()
        return cls(rules, default)

    def check(self, key_id: str, envelope: pb.Envelope, daemon_user: str) -> None:
        """Raise :class:`AuthError` unless ``key_id`` may perform ``envelope``'s operation."""
        rule = self.rule_for(key_id)
        if rule is None:
            raise AuthError(f"key {key_id} is not authorized on this node", "policy")
        op = envelope.WhichOneof("operation")
        if op == "exec":
            if not rule.allow_exec:
                raise AuthError(f"key {key_id} may not exec", "policy")
            user = envelope.exec.user or daemon_user
            if not rule.user_allowed(user):
                raise AuthError(f"run-as user {user!r} not allowed for key {key_id}", "policy")
        elif op == "copy":
            if not rule.allow_copy:
                raise AuthError(f"key {key_id} may not copy", "policy")
            dest = envelope.copy.dest
            if not rule.dest_allowed(dest):
                norm = _norm_path(dest)
                extra = f" (resolves to {norm})" if norm != dest else ""
                raise AuthError(f"copy destination {dest} not allowed for key {key_id}{extra}", "policy")
        elif op == "fetch":
            _check_fetch(rule, key_id, envelope.fetch)


def _check_fetch(rule: KeyRule, key_id: str, spec: pb.FetchSpec) -> None:
    if not rule.allow_fetch:
        raise AuthError(f"key {key_id} may not fetch", "policy")
    for src in list(spec.src_by_node.values()) or [spec.src]:
        if not rule.src_allowed(src):
            norm = _norm_path(src) if src.startswith("/") else src
            extra = f" (resolves to {norm})" if norm != src else ""
            raise AuthError(f"fetch source {src} not allowed for key {key_id}{extra}", "policy")


# --------------------------------------------------------------------------- nonce cache


@dataclass
class _Seen:
    not_after_ms: int
    digest: bytes
    request_id: str


class NonceCache:
    """Bounded replay cache; see the module docstring for the policy.

    Not thread-safe by itself (the :class:`Verifier` holds a lock).
    """

    def __init__(
        self,
        capacity: int = 100_000,
        *,
        skew_ms: int = 30_000,
        path: Optional[Union[str, Path]] = None,
        clock: Callable[[], float] = time.time,
    ):
        if capacity < 1:
            raise ValueError("nonce cache capacity must be at least 1")
        self.capacity = capacity
        self.skew_ms = skew_ms
        self.floor_ms = 0  # every forgotten nonce had not_after_ms <= floor_ms
        self.evicted_floor_ms = 0  # same, for nonces evicted from a full cache
        self._seen: Dict[bytes, _Seen] = {}
        self._heap: List[Tuple[int, bytes]] = []
        self._path = Path(path) if path is not None else None
        self._clock = clock
        self._log = None
        self._log_lines = 0
        if self._path is not None:
            self._load()

    def __len__(self) -> int:
        return len(self._seen)

    def get(self, nonce: bytes) -> Optional[_Seen]:
        return self._seen.get(nonce)

    def purge(self, now_ms: int) -> None:
        """Forget entries that can no longer pass the expiry check."""
        while self._heap and self._heap[0][0] + self.skew_ms < now_ms:
            self._forget()

    def _forget(self, evicted: bool = False) -> None:
        na, nonce = heapq.heappop(self._heap)
        del self._seen[nonce]
        if na > self.floor_ms:
            self.floor_ms = na
        if evicted and na > self.evicted_floor_ms:
            self.evicted_floor_ms = na

    def admit(self, nonce: bytes, not_after_ms: int, digest: bytes, request_id: str, now_ms: int) -> None:
        """Check that ``nonce`` is new and record it, or raise :class:`AuthError`.
        (The caller has handled nonces already in the cache.)"""
        self.purge(now_ms)
        if not_after_ms <= self.floor_ms:
            if not_after_ms <= self.evicted_floor_ms:
                raise AuthError(
                    "nonce cache full: cannot prove this request is not a replay "
                    f"(requests expiring by {_fmt_ms(self.evicted_floor_ms)} were evicted)",
                    "nonce_cache_full",
                )
            raise AuthError(
                f"request older than the replay cache horizon {_fmt_ms(self.floor_ms)} (clock stepped back?)",
                "nonce_window",
            )
        if len(self._seen) >= self.capacity:
            if not_after_ms <= self._heap[0][0]:
                raise AuthError(
                    f"nonce cache full ({self.capacity} unexpired requests) and this request expires first",
                    "nonce_cache_full",
                )
            self._forget(evicted=True)
        self._persist(nonce, not_after_ms, digest, request_id, now_ms)
        self._seen[nonce] = _Seen(not_after_ms, digest, request_id)
        heapq.heappush(self._heap, (not_after_ms, nonce))

    # -- persistence: one line per accepted nonce, "F <floor>" lines for the floor

    def _load(self) -> None:
        assert self._path is not None
        try:
            with open(self._path, "r", encoding="ascii", errors="replace") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            lines = []
        now_ms = int(self._clock() * 1000)
        for line in lines:
            parts = line.split()
            try:
                if parts and parts[0] == "F" and len(parts) in (2, 3):
                    self.floor_ms = max(self.floor_ms, int(parts[1]))
                    if len(parts) == 3:
                        self.evicted_floor_ms = max(self.evicted_floor_ms, int(parts[2]))
                elif len(parts) == 4:
                    nonce, na = bytes.fromhex(parts[0]), int(parts[1])
                    digest, rid = bytes.fromhex(parts[2]), bytes.fromhex(parts[3]).decode("utf-8")
                    if nonce not in self._seen:
                        self._seen[nonce] = _Seen(na, digest, rid)
                        heapq.heappush(self._heap, (na, nonce))
            except (ValueError, UnicodeDecodeError):
                continue  # torn last line after a crash
        self.purge(now_ms)
        while len(self._seen) > self.capacity:
            self._forget(evicted=True)
        self._compact()

    def _compact(self) -> None:
        assert self._path is not None
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(self._path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(self._floor_line())
            for nonce, s in self._seen.items():
                f.write(self._line(nonce, s.not_after_ms, s.digest, s.request_id))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)
        if self._log is not None:
            self._log.close()
        self._log = open(self._path, "a", encoding="ascii")
        self._log_lines = len(self._seen) + 1

    def _floor_line(self) -> str:
        return f"F {self.floor_ms} {self.evicted_floor_ms}\n"

    @staticmethod
    def _line(nonce: bytes, na: int, digest: bytes, rid: str) -> str:
        return f"{nonce.hex()} {na} {digest.hex()} {rid.encode('utf-8').hex()}\n"

    def _persist(self, nonce: bytes, na: int, digest: bytes, rid: str, now_ms: int) -> None:
        if self._log is None:
            return
        try:
            if self._log_lines > 2 * len(self._seen) + 1000:
                self.purge(now_ms)
                self._compact()
            self._log.write(self._floor_line() + self._line(nonce, na, digest, rid))
            self._log.flush()
            os.fsync(self._log.fileno())
            self._log_lines += 2
        except OSError as e:
            raise AuthError(f"cannot record the request nonce in {self._path}: {e}", "nonce_store") from None

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _fmt_ms(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms"


# --------------------------------------------------------------------------- verifier


@functools.lru_cache(maxsize=32)
def _parse_scope(scope: str) -> Any:
    """Parsed node set (cached: parsing "node[1-15000]" takes milliseconds and
    successive requests of a run share their scope).  Treat as read-only."""
    from ClusterShell.NodeSet import RESOLVER_NOGROUP, NodeSet

    # No group resolution: "@group" must never run a group-source command.
    return NodeSet(scope, resolver=RESOLVER_NOGROUP)


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _daemon_user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError, AttributeError):
        return str(os.environ.get("USER", ""))


def trusted_keys_from(sources: Iterable[Any]) -> Dict[str, ed25519.Ed25519PublicKey]:
    """``{key_id: public key}`` from paths / PEM / key objects (see ``keys.load_public_key``)."""
    out: Dict[str, ed25519.Ed25519PublicKey] = {}
    for src in sources:
        pub = load_public_key(src)
        out[_key_id(pub)] = pub
    return out


class Verifier:
    """Checks signed requests for one daemon (thread-safe)."""

    def __init__(
        self,
        trusted_keys: Union[Mapping[str, ed25519.Ed25519PublicKey], Iterable[Any]],
        policy: Optional[Policy] = None,
        *,
        node_names: Iterable[str],
        clock_skew: float = 30.0,
        max_validity: float = 86400 * 2,
        nonce_cache_size: int = 100_000,
        clock: Callable[[], float] = time.time,
        protocol_version: int = PROTOCOL_VERSION,
        daemon_user: Optional[str] = None,
        nonce_file: Optional[Union[str, Path]] = None,
    ):
        if isinstance(trusted_keys, Mapping):
            keys: Dict[str, ed25519.Ed25519PublicKey] = {}
            for kid, pub in trusted_keys.items():
                pub = load_public_key(pub)
                if _key_id(pub) != kid:
                    raise ValueError(f"trusted key listed as {kid!r} has key id {_key_id(pub)}")
                keys[kid] = pub
        else:
            keys = trusted_keys_from(trusted_keys)
        if not keys:
            raise ValueError("no trusted controller keys: every request would be refused")
        self.trusted_keys = keys
        self.policy = policy if policy is not None else Policy()
        names = [str(n).strip().lower() for n in node_names if n and str(n).strip()]
        if not names:
            raise ValueError("node_names must name this node (hostname, configured names, addresses)")
        if isinstance(node_names, (set, frozenset)):
            names.sort()
        # Host names before addresses (the first one names the node in messages).
        names.sort(key=_is_address)
        self.node_names: Tuple[str, ...] = tuple(dict.fromkeys(names))
        if clock_skew < 0 or max_validity <= 0:
            raise ValueError("clock_skew must be >= 0 and max_validity > 0")
        self.skew_ms = int(clock_skew * 1000)
        self.max_validity_ms = int(max_validity * 1000)
        self.clock = clock
        self.protocol_version = protocol_version
        self.daemon_user = daemon_user if daemon_user is not None else _daemon_user()
        self.nonces = NonceCache(nonce_cache_size, skew_ms=self.skew_ms, path=nonce_file, clock=clock)
        self._lock = threading.Lock()

    def rule_for(self, key_id: str) -> Optional[KeyRule]:
        """The policy rule of ``key_id`` (for re-checking a resolved copy path)."""
        return self.policy.rule_for(key_id)

    def verify_request(self, request: pb.Request) -> pb.Envelope:
        return self.verify(request.envelope, request.auth if request.HasField("auth") else None)

    def verify(self, envelope_bytes: bytes, auth: Optional[pb.Authenticator]) -> pb.Envelope:
        """Return the authentic, authorized, fresh Envelope or raise :class:`AuthError`
        (:class:`ReplayError` for a second delivery of the same signed request)."""
        # 1. Authenticator and signature: nothing in the envelope is trusted before this.
        if not isinstance(envelope_bytes, (bytes, bytearray, memoryview)):
            raise AuthError("malformed envelope (not bytes)", "malformed")
        data = bytes(envelope_bytes)
        if auth is None or not isinstance(auth, pb.Authenticator) or not auth.signature:
            raise AuthError("unsigned request", "unsigned")
        kid = auth.key_id
        pub = self.trusted_keys.get(kid)
        if pub is None:
            raise AuthError(f"unknown key id {_short(kid)}", "unknown_key")
        sig = auth.signature
        if len(sig) != SIGNATURE_LEN:
            raise AuthError(f"bad signature (key {kid})", "bad_signature")
        try:
            pub.verify(sig, data)
        except InvalidSignature:
            raise AuthError(f"bad signature (key {kid})", "bad_signature") from None

        # 2. Well-formed envelope.
        env = pb.Envelope()
        try:
            env.ParseFromString(data)
        except Exception as e:
            raise AuthError(f"malformed envelope ({type(e).__name__})", "malformed") from None
        if env.protocol_version != self.protocol_version:
            raise AuthError(
                f"protocol version {env.protocol_version} not supported (this daemon speaks {self.protocol_version})",
                "protocol",
            )
        if not env.request_id:
            raise AuthError("malformed envelope (no request id)", "malformed")
        if not MIN_NONCE_LEN <= len(env.nonce) <= MAX_NONCE_LEN:
            raise AuthError(f"malformed envelope (nonce must be {MIN_NONCE_LEN} to {MAX_NONCE_LEN} bytes)", "malformed")
        op = env.WhichOneof("operation")
        if op is None:
            raise AuthError("malformed envelope (no operation)", "malformed")
        if op == "copy":
            c = env.copy
            if not c.dest.startswith("/") or "\0" in c.dest:
                raise AuthError(f"malformed envelope (copy destination {_short(c.dest)} is not absolute)", "malformed")
            if c.src_name and ("/" in c.src_name or c.src_name in (".", "..") or "\0" in c.src_name):
                raise AuthError(f"malformed envelope (bad source name {_short(c.src_name)})", "malformed")

        # 3. Validity window.
        now_ms = int(self.clock() * 1000)
        na = env.not_after_ms
        if now_ms > na + self.skew_ms:
            raise AuthError(f"expired (not_after {_fmt_ms(na)} is {(now_ms - na) / 1000:.1f} s ago)", "expired")
        if na - now_ms > self.max_validity_ms + self.skew_ms:
            raise AuthError(
                f"validity too long (not_after {_fmt_ms(na)} is {(na - now_ms) / 1000:.0f} s ahead, "
                f"at most {self.max_validity_ms / 1000:.0f} s allowed)",
                "validity",
            )

        # 4. Scope: this node must be one of the operation's targets.
        self._check_scope(env.scope)

        # 5. Authorization of the key for this operation.
        self.policy.check(kid, env, self.daemon_user)

        # 6. Nonce, recorded only now.
        digest = hashlib.sha256(data).digest()
        with self._lock:
            seen = self.nonces.get(env.nonce)
            if seen is not None:
                if seen.digest == digest:
                    raise ReplayError(env.request_id, env, kid)
                raise AuthError(
                    f"nonce reused by a different request (request id {_short(env.request_id)})", "nonce_reuse"
                )
            self.nonces.admit(env.nonce, na, digest, env.request_id, now_ms)
        return env

    def _check_scope(self, scope: str) -> None:
        if not scope.strip():
            raise AuthError("malformed envelope (empty scope)", "malformed")
        try:
            ns = _parse_scope(scope.lower())
        except Exception as e:  # NodeSetParseError, AssertionError ("range too large"), ...
            raise AuthError(f"malformed envelope (bad scope {_short(scope)}: {e})", "malformed") from None
        for name in self.node_names:
            try:
                if name in ns:
                    return
            except Exception:
                continue
        raise AuthError(f"node {self.node_names[0]} not in the request scope {_short(scope, 120)}", "scope")

    def close(self) -> None:
        self.nonces.close()


__all__ = [
    "AuthError",
    "ReplayError",
    "KeyRule",
    "Policy",
    "NonceCache",
    "Verifier",
    "sign",
    "sign_envelope",
    "stamp",
    "trusted_keys_from",
    "KeysError",
]
