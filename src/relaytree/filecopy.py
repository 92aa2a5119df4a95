"""Land a file received as a stream of chunks on the local node, safely.

The daemon feeds :class:`LocalCopy` the chunks of one file in order
(``open()``, ``write()`` per chunk, ``finish()``, ``abort()`` on any problem).
Guarantees:

* The destination is replaced atomically (temporary file in the destination
  directory, fsync, ``os.replace``, fsync of the directory), or not at all:
  any failure (bad request, out-of-order chunk, size or sha256 mismatch, disk
  full, abort) removes the temporary file and leaves the destination untouched.
* No wasteful rewrite: when the destination already exists with the announced
  size, incoming chunks are compared with it as they arrive and no temporary
  file exists while everything matches.  At the first difference the
  identical prefix is copied from the destination into a temporary file
  (verified against the sha256 of the received prefix) and writing goes on
  normally.  Identical content with identical mode/owner/group leaves the file
  alone (same inode, same mtime): ``changed`` is False.
* Check mode writes nothing at all and reports whether the copy would change
  the destination.
* Memory is bounded: the only data held is the chunk being written (plus a
  bounded block while comparing or copying).
* With a ``base_dir`` the destination is confined under it, through '..' and
  symlinks alike.

Symlink policy: a destination that is itself a symlink is *replaced* by the
regular file (the link is not followed), as Ansible's copy does by default
(``follow: no``); with a ``base_dir`` a symlink destination whose target
resolves outside the base directory is refused.  A symlink destination always
counts as changed; the mode/owner/group it would keep are those of its target
when that is an existing regular file.  Symlinks in the parent directories are
followed, and the real parent directory must be inside the real ``base_dir``.

Everything is synchronous and meant to run inline on the daemon's event loop.
Standard library only, Python 3.9+.
"""

from __future__ import annotations

import errno
import grp
import hashlib
import os
import pwd
import re
import stat
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

__all__ = [
    "CopyError",
    "CopyOutcome",
    "CopyRequest",
    "LocalCopy",
    "parse_mode",
    "resolve_path",
]

DEFAULT_MODE = 0o644
# Bounded block sizes used when comparing with / copying from the existing file.
_COMPARE_BLOCK = 256 * 1024
_COPY_BLOCK = 1024 * 1024
# Keep temporary names under NAME_MAX (255 bytes) whatever the destination name.
_TMP_NAME_MAX = 200
_MAX_ID = 2**32 - 2
_DIGITS = re.compile(r"[0-9]+")
_OCTAL = re.compile(r"[0-7]+")

_T = TypeVar("_T")


class CopyError(Exception):
    """Clear, user-facing message naming what is wrong (path, reason)."""


@dataclass
class CopyRequest:
    dest: str
    size: int
    sha256: bytes
    chunk_size: int
    src_name: str = ""
    mode: str = ""  # octal string "0644"/"644"/"0o644"; "" = 0644 new, kept otherwise
    owner: str = ""  # name or numeric id; "" = unchanged / daemon's
    group: str = ""
    mkdirs: bool = False
    backup: bool = False
    check: bool = False


@dataclass
class CopyOutcome:
    changed: bool
    dest: str  # final absolute path in request space (without base_dir)
    backup: str = ""  # request-space path of the backup, if one was made
    diff: Optional[dict] = None  # reserved


# --------------------------------------------------------------------------- helpers


def resolve_path(base_dir: Optional[str], path: str, what: str = "destination path") -> str:
    """Map a request path onto the local filesystem.

    ``path`` must be absolute.  It is normalized lexically ('.', '//', '..').
    With ``base_dir`` the result is ``base_dir + path``; a '..' that would climb
    above ``base_dir`` is a :class:`CopyError`.  Without ``base_dir`` a leading
    '/..' stays at '/' as the kernel does.  Symlinks are checked at open time.
    ``what`` names the path in error messages.
    """
    if not isinstance(path, str) or not path:
        raise CopyError(f"{what} is empty")
    if "\0" in path:
        raise CopyError(f"{what} {path!r} contains a NUL byte")
    if not path.startswith("/"):
        raise CopyError(f"{what} {path!r} is not absolute")
    parts = []
    for comp in path.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if parts:
                parts.pop()
            elif base_dir:
                raise CopyError(f"{what} {path!r} escapes the base directory {base_dir}")
            continue
        parts.append(comp)
    rel = "/".join(parts)
    if not base_dir:
        return "/" + rel
    base = _norm_base(base_dir)
    if not rel:
        return base
    return base.rstrip("/") + "/" + rel


def _norm_base(base_dir: str) -> str:
    if "\0" in base_dir:
        raise CopyError(f"base directory {base_dir!r} contains a NUL byte")
    return os.path.normpath(os.path.abspath(base_dir))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def parse_mode(value: str) -> Optional[int]:
    """"0644", "644", "0o644" → 0o644; "" → None; anything else → CopyError."""
    if value is None or value == "":
        return None
    text = str(value).strip()
    digits = text[2:] if text[:2] in ("0o", "0O") else text
    if not _OCTAL.fullmatch(digits):
        raise CopyError(f"invalid mode {value!r}: expected an octal number such as 0644")
    mode = int(digits, 8)
    if mode > 0o7777:
        raise CopyError(f"invalid mode {value!r}: larger than 07777")
    return mode


def _parse_id(value: str, kind: str) -> Optional[int]:
    if value is None or value == "":
        return None
    text = str(value).strip()
    if _DIGITS.fullmatch(text):
        num = int(text)
        if num > _MAX_ID:
            raise CopyError(f"invalid {kind} id {value!r}")
        return num
    try:
        if kind == "owner":
            return pwd.getpwnam(text).pw_uid
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise CopyError(f"unknown {kind} {value!r} on this node") from None


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    total = len(data)
    while done < total:
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:  # pragma: no cover - pwrite raises rather than returning 0
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        done += n


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


# --------------------------------------------------------------------------- LocalCopy


class LocalCopy:
    """Receive one file chunk by chunk and land it atomically on the local node.

    States: new → open → finished → closed, or → failed / aborted.  Any error
    raised by open(), write() or finish() is fatal: the temporary file is removed
    at once and later calls raise CopyError.  Calling a method in the wrong state
    (e.g. write() after finish()) raises CopyError without touching anything.
    read_chunk() works while open and after finish() (from the landed file) until
    abort() is called; abort() after finish() only releases that descriptor.
    """

    def __init__(self, req: CopyRequest, base_dir: Optional[str] = None):
        self.req = req
        self.base_dir = base_dir or None
        self._state = "new"
        self._error = ""
        self._shown = req.dest if isinstance(req.dest, str) else ""  # request-space dest
        self._base = ""  # lexical base directory
        self._path = ""  # local path: real parent directory + name
        self._dir = ""  # real parent directory ("" in check mode when it would be created)
        self._mode: Optional[int] = None
        self._uid: Optional[int] = None
        self._gid: Optional[int] = None
        self._existing: Optional[os.stat_result] = None  # lstat of dest when a regular file
        self._kept: Optional[os.stat_result] = None  # file whose mode/owner are kept
        self._cmp_fd = -1  # existing dest, while the received data is identical to it
        self._tmp_fd = -1
        self._tmp_path = ""
        self._identical = False
        self._next = 0
        self._received = 0
        self._short_seen = False
        self._hasher = hashlib.sha256()

    # ----------------------------------------------------------------- public API

    @property
    def chunks_received(self) -> int:
        """Number of chunks written so far (read_chunk accepts indexes below it)."""
        return self._next

    @property
    def bytes_received(self) -> int:
        return self._received

    @property
    def local_path(self) -> str:
        """Where the file lands on this node (real parent directory + name), once open."""
        return self._path

    def open(self) -> None:
        """Validate and prepare; CopyError on any problem (see module docstring)."""
        self._require("open", "new")
        self._state = "open"
        self._run(self._open)

    def write(self, index: int, chunk: bytes) -> None:
        """Take chunk ``index`` (0-based, strictly in order)."""
        self._require("write", "open")
        self._run(self._write, index, chunk)

    def read_chunk(self, index: int) -> bytes:
        """Chunk ``index`` (< chunks written so far), read back from local disk."""
        if self.req.check:
            raise CopyError("check mode keeps no data")
        self._require("read_chunk", "open", "finished")
        if not isinstance(index, int) or not 0 <= index < self._next:
            raise CopyError(
                f"cannot read chunk {index} of {self._shown}: "
                f"only {self._next} chunk(s) received"
            )
        offset = index * self.req.chunk_size
        size = min(self.req.chunk_size, self._received - offset)
        fd = self._cmp_fd if self._identical else self._tmp_fd
        try:
            data = _pread_exact(fd, size, offset)
        except OSError as exc:
            raise CopyError(f"{_why(exc)} reading back chunk {index} of {self._shown}") from exc
        if len(data) != size:
            raise CopyError(
                f"cannot read back chunk {index} of {self._shown}: the file was truncated"
            )
        return data

    def finish(self) -> CopyOutcome:
        """Verify size and sha256, then land the file (see module docstring)."""
        self._require("finish", "open")
        return self._run(self._finish)

    def abort(self) -> None:
        """Idempotent: remove any temporary file; the destination is untouched."""
        self._cleanup()
        if self._state == "finished":
            self._state = "closed"
        elif self._state in ("new", "open"):
            self._state = "aborted"

    def __enter__(self) -> LocalCopy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()

    def __del__(self) -> None:  # safety net: never leak a temporary file
        try:
            self._cleanup()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    # ----------------------------------------------------------------- state

    def _require(self, method: str, *states: str) -> None:
        if self._state in states:
            return
        if self._state == "failed":
            raise CopyError(f"copy of {self._shown} already failed: {self._error}")
        raise CopyError(f"{method}() called on a copy of {self._shown} that is {self._state}")

    def _run(self, func: Callable[..., _T], *args: object) -> _T:
        try:
            return func(*args)
        except CopyError as exc:
            self._fail(str(exc))
            raise
        except OSError as exc:
            err = CopyError(f"{_why(exc)} copying to {self._shown}")
            self._fail(str(err))
            raise err from exc
        except BaseException as exc:
            self._fail(f"interrupted by {type(exc).__name__}")
            raise

    def _fail(self, message: str) -> None:
        self._cleanup()
        self._state = "failed"
        self._error = message

    def _cleanup(self) -> None:
        _close(self._cmp_fd)
        self._cmp_fd = -1
        _close(self._tmp_fd)
        self._tmp_fd = -1
        if self._tmp_path:
            try:
                os.unlink(self._tmp_path)
            except FileNotFoundError:
                pass
            except OSError:  # pragma: no cover - nothing better to do
                pass
            self._tmp_path = ""

    def _show(self, local: str) -> str:
        """Request-space spelling of a lexical local path."""
        if not self._base:
            return local
        if local == self._base:
            return "/"
        prefix = self._base.rstrip("/") + "/"
        if local.startswith(prefix):
            return "/" + local[len(prefix):]
        return local

    # ----------------------------------------------------------------- open

    def _open(self) -> None:
        req = self.req
        if not isinstance(req.chunk_size, int) or req.chunk_size <= 0:
            raise CopyError(f"invalid chunk size {req.chunk_size!r} for {self._shown}")
        if not isinstance(req.size, int) or req.size < 0:
            raise CopyError(f"invalid size {req.size!r} for {self._shown}")
        if not isinstance(req.sha256, (bytes, bytearray)) or len(req.sha256) != 32:
            raise CopyError(f"invalid sha256 for {self._shown}: expected 32 bytes")
        self._mode = parse_mode(req.mode)
        self._uid = _parse_id(req.owner, "owner")
        self._gid = _parse_id(req.group, "group")

        real_base = ""
        if self.base_dir:
            self._base = _norm_base(self.base_dir)
            real_base = os.path.realpath(self._base)
            if not os.path.isdir(real_base):
                raise CopyError(f"base directory {self.base_dir} does not exist")

        local = resolve_path(self._base or None, req.dest)
        shown = resolve_path(None, req.dest)
        self._shown = shown
        if req.dest.endswith("/") or os.path.isdir(local):
            name = req.src_name
            if not name:
                raise CopyError(f"{shown} is a directory and the request names no source file")
            if "/" in name or "\0" in name or name in (".", ".."):
                raise CopyError(f"invalid source name {name!r} for directory {shown}")
            local = os.path.join(local, name)
            shown = os.path.join(shown, name)
            self._shown = shown

        parent = os.path.dirname(local)
        shown_parent = os.path.dirname(shown)
        ancestor = parent
        while not os.path.lexists(ancestor):
            ancestor = os.path.dirname(ancestor)
        self._confine(ancestor, real_base)
        if not os.path.isdir(ancestor):
            raise CopyError(f"{self._show(ancestor)} is not a directory (parent of {shown})")
        if ancestor != parent:
            if not req.mkdirs:
                raise CopyError(
                    f"parent directory {shown_parent} of {shown} does not exist "
                    "(set mkdirs to create it)"
                )
            if req.check:  # would be created: the destination is new
                return
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                raise CopyError(f"cannot create directory {shown_parent}: {_why(exc)}") from exc
            self._confine(parent, real_base)
            if not os.path.isdir(parent):  # pragma: no cover - raced
                raise CopyError(f"{shown_parent} is not a directory")
        self._dir = os.path.realpath(parent)
        self._path = os.path.join(self._dir, os.path.basename(local))

        try:
            st = os.lstat(self._path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise CopyError(f"cannot inspect {shown}: {_why(exc)}") from exc
        if st is None:
            pass
        elif stat.S_ISLNK(st.st_mode):
            # Policy: the link itself is replaced by the file (see module docstring).
            if real_base and not _inside(os.path.realpath(self._path), real_base):
                raise CopyError(
                    f"{shown} is a symlink to {os.readlink(self._path)}, "
                    f"outside the base directory {self.base_dir}"
                )
            try:
                target = os.stat(self._path)
            except OSError:
                target = None
            if target is not None and stat.S_ISREG(target.st_mode):
                self._kept = target
        elif stat.S_ISDIR(st.st_mode):
            raise CopyError(f"{shown} is a directory")
        elif not stat.S_ISREG(st.st_mode):
            raise CopyError(f"{shown} exists and is not a regular file")
        else:
            self._existing = self._kept = st
            if st.st_size == req.size:
                self._open_for_compare(st)

        if not self._identical and not req.check:
            self._create_tmp()

    def _confine(self, path: str, real_base: str) -> None:
        if not real_base:
            return
        real = os.path.realpath(path)
        if not _inside(real, real_base):
            raise CopyError(
                f"{self._show(path)} resolves to {real}, outside the base directory "
                f"{self.base_dir} (destination {self._shown})"
            )

    def _open_for_compare(self, st: os.stat_result) -> None:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        flags |= getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(self._path, flags)
        except PermissionError:
            return  # cannot read it: treat as different and rewrite it
        except OSError as exc:
            raise CopyError(f"cannot open {self._shown} for comparison: {_why(exc)}") from exc
        fst = os.fstat(fd)
        if (fst.st_ino, fst.st_dev) != (st.st_ino, st.st_dev) or not stat.S_ISREG(fst.st_mode):
            os.close(fd)
            raise CopyError(f"{self._shown} changed while being opened; retry the copy")
        self._cmp_fd = fd
        self._identical = True

    def _create_tmp(self) -> None:
        name = os.fsencode(os.path.basename(self._path))[:_TMP_NAME_MAX]
        prefix = "." + os.fsdecode(name) + ".relaytree-"
        try:
            fd, path = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=self._dir)
        except OSError as exc:
            raise CopyError(
                f"cannot create a temporary file in {os.path.dirname(self._shown)} "
                f"for {self._shown}: {_why(exc)}"
            ) from exc
        self._tmp_fd, self._tmp_path = fd, path

    # ----------------------------------------------------------------- write

    def _write(self, index: int, chunk: bytes) -> None:
        req = self.req
        if index != self._next:
            raise CopyError(
                f"chunk {index} of {self._shown} out of order: expected chunk {self._next}"
            )
        try:
            data = memoryview(chunk).cast("B")
        except TypeError:
            raise CopyError(f"chunk {index} of {self._shown} is not bytes") from None
        size = len(data)
        if self._short_seen:
            raise CopyError(
                f"chunk {index} of {self._shown} follows a short chunk: "
                "only the last chunk may be shorter than the chunk size"
            )
        if size > req.chunk_size:
            raise CopyError(
                f"chunk {index} of {self._shown} has {size} bytes, "
                f"more than the chunk size {req.chunk_size}"
            )
        offset = self._received
        if offset + size > req.size:
            raise CopyError(
                f"received more data than the announced size of {self._shown} "
                f"({offset + size} > {req.size} bytes)"
            )
        if self._identical and not self._matches(offset, data):
            self._identical = False
            if req.check:
                _close(self._cmp_fd)
                self._cmp_fd = -1
            else:
                self._diverge(offset)
        if not self._identical and not req.check:
            try:
                _pwrite_all(self._tmp_fd, data, offset)
            except OSError as exc:
                raise CopyError(f"{_why(exc)} writing {self._shown}") from exc
        self._hasher.update(data)
        self._received += size
        self._next += 1
        if size < req.chunk_size:
            self._short_seen = True

    def _matches(self, offset: int, data: memoryview) -> bool:
        pos = 0
        total = len(data)
        try:
            while pos < total:
                n = min(_COMPARE_BLOCK, total - pos)
                if data[pos:pos + n] != _pread_exact(self._cmp_fd, n, offset + pos):
                    return False
                pos += n
        except OSError as exc:
            raise CopyError(f"{_why(exc)} reading {self._shown}") from exc
        return True

    def _diverge(self, prefix: int) -> None:
        """First difference at ``prefix``: copy the identical prefix into a temp file."""
        self._create_tmp()
        check = hashlib.sha256()
        pos = 0
        try:
            while pos < prefix:
                block = _pread_exact(self._cmp_fd, min(_COPY_BLOCK, prefix - pos), pos)
                if not block:
                    break
                check.update(block)
                _pwrite_all(self._tmp_fd, memoryview(block), pos)
                pos += len(block)
        except OSError as exc:
            raise CopyError(f"{_why(exc)} writing {self._shown}") from exc
        # The bytes copied must be those received (the file may change under us).
        if pos != prefix or check.digest() != self._hasher.digest():
            raise CopyError(f"{self._shown} changed while it was being compared; retry the copy")
        _close(self._cmp_fd)
        self._cmp_fd = -1

    # ----------------------------------------------------------------- finish

    def _finish(self) -> CopyOutcome:
        req = self.req
        if self._received != req.size:
            raise CopyError(
                f"incomplete copy of {self._shown}: received {self._received} "
                f"of {req.size} bytes"
            )
        digest = self._hasher.digest()
        if digest != bytes(req.sha256):
            raise CopyError(
                f"sha256 mismatch for {self._shown}: expected {bytes(req.sha256).hex()}, "
                f"received data has {digest.hex()}"
            )
        if req.check:
            changed = not self._identical or self._attrs_differ(self._existing)
            _close(self._cmp_fd)
            self._cmp_fd = -1
            self._state = "finished"
            return CopyOutcome(changed=changed, dest=self._shown)
        if self._identical:
            changed = self._finish_in_place()
            self._state = "finished"
            return CopyOutcome(changed=changed, dest=self._shown)
        if self._tmp_fd < 0:  # pragma: no cover - created by open() or _diverge()
            self._create_tmp()
        self._apply_attrs_to_tmp()
        try:
            os.fsync(self._tmp_fd)
        except OSError as exc:
            raise CopyError(f"{_why(exc)} writing {self._shown}") from exc
        backup = self._make_backup() if req.backup else ""
        try:
            os.replace(self._tmp_path, self._path)
        except OSError as exc:
            if backup:
                try:
                    os.unlink(backup)
                except OSError:
                    pass
            raise CopyError(f"cannot replace {self._shown}: {_why(exc)}") from exc
        self._tmp_path = ""  # now the destination: never remove it
        self._fsync_dir()
        self._state = "finished"
        shown_backup = self._shown + backup[len(self._path):] if backup else ""
        return CopyOutcome(changed=True, dest=self._shown, backup=shown_backup)

    def _target_mode(self, st: Optional[os.stat_result]) -> int:
        if self._mode is not None:
            return self._mode
        if st is not None:
            return stat.S_IMODE(st.st_mode)
        return DEFAULT_MODE

    def _attrs_differ(self, st: Optional[os.stat_result]) -> bool:
        if st is None:
            return True
        return (
            self._target_mode(st) != stat.S_IMODE(st.st_mode)
            or (self._uid is not None and self._uid != st.st_uid)
            or (self._gid is not None and self._gid != st.st_gid)
        )

    def _finish_in_place(self) -> bool:
        """Content identical: keep the file, fix mode/owner/group if they differ."""
        old = self._existing
        assert old is not None
        try:
            now = os.fstat(self._cmp_fd)
            at_path = os.lstat(self._path)
        except OSError as exc:
            raise CopyError(f"cannot inspect {self._shown}: {_why(exc)}") from exc
        if (
            (at_path.st_ino, at_path.st_dev) != (old.st_ino, old.st_dev)
            or now.st_size != old.st_size
            or now.st_mtime_ns != old.st_mtime_ns
        ):
            raise CopyError(f"{self._shown} was modified during the copy; retry the copy")
        if not self._attrs_differ(now):
            return False
        try:
            if self._uid is not None and self._uid != now.st_uid:
                os.fchown(self._cmp_fd, self._uid, -1)
            if self._gid is not None and self._gid != now.st_gid:
                os.fchown(self._cmp_fd, -1, self._gid)
            # Always after chown, which may clear setuid/setgid bits.
            os.fchmod(self._cmp_fd, self._target_mode(now))
            os.fsync(self._cmp_fd)
        except OSError as exc:
            raise CopyError(
                f"cannot set mode/owner/group of {self._shown}: {_why(exc)}"
            ) from exc
        return True

    def _apply_attrs_to_tmp(self) -> None:
        kept = self._kept
        for kind, wanted in (("owner", self._uid), ("group", self._gid)):
            requested = wanted is not None
            if wanted is None and kept is not None:
                wanted = kept.st_uid if kind == "owner" else kept.st_gid
            if wanted is None:
                continue
            try:
                if kind == "owner":
                    os.fchown(self._tmp_fd, wanted, -1)
                else:
                    os.fchown(self._tmp_fd, -1, wanted)
            except OSError as exc:
                if requested:
                    value = self.req.owner if kind == "owner" else self.req.group
                    raise CopyError(
                        f"cannot set {kind} of {self._shown} to {value}: {_why(exc)}"
                    ) from exc
                # Keeping the previous owner is best effort (as Ansible does).
        mode = self._target_mode(kept)
        try:
            os.fchmod(self._tmp_fd, mode)
        except OSError as exc:
            raise CopyError(f"cannot set mode {mode:04o} on {self._shown}: {_why(exc)}") from exc

    def _make_backup(self) -> str:
        """Hard link (or copy) the current destination to DEST.<pid>.<time>~."""
        path = self._path
        if not os.path.lexists(path):
            return ""
        stem = f"{path}.{os.getpid()}.{time.strftime('%Y-%m-%d@%H:%M:%S')}"
        for attempt in range(1000):
            name = stem + ("~" if attempt == 0 else f".{attempt}~")
            try:
                os.link(path, name, follow_symlinks=False)
                return name
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise CopyError(f"cannot back up {self._shown}: {_why(exc)}") from exc
            try:
                self._copy_backup(path, name)
                return name
            except FileExistsError:
                continue
            except OSError as exc:
                raise CopyError(f"cannot back up {self._shown}: {_why(exc)}") from exc
        raise CopyError(f"cannot back up {self._shown}: too many backups this second")

    @staticmethod
    def _copy_backup(path: str, name: str) -> None:
        if os.path.islink(path):
            os.symlink(os.readlink(path), name)
            return
        src = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(src)
            dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                pos = 0
                while True:
                    block = os.pread(src, _COPY_BLOCK, pos)
                    if not block:
                        break
                    _pwrite_all(dst, memoryview(block), pos)
                    pos += len(block)
                try:
                    os.fchown(dst, st.st_uid, st.st_gid)
                except OSError:
                    pass
                os.fchmod(dst, stat.S_IMODE(st.st_mode))
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.fsync(dst)
            except BaseException:
                os.close(dst)
                os.unlink(name)
                raise
            os.close(dst)
        finally:
            os.close(src)

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self._dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
                raise CopyError(f"{_why(exc)} syncing the directory of {self._shown}") from exc
        finally:
            os.close(fd)
