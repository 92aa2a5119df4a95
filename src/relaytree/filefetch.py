"""Bring a file back from a node: read it there, land it on the controller, safely.

The node side, :class:`FileSource`, reads one file chunk by chunk for a fetch
(``open()``, ``read_chunk()`` until it returns None, ``close()``):

* The path is a request path: resolved under the daemon's ``base_dir`` like
  every other one ('..' cannot climb out of it) and, with a ``base_dir``, the
  file actually opened (symlinks followed) must lie inside the real base
  directory: checked on the opened descriptor itself (``/proc/self/fd``), so a
  symlink swapped in between cannot lead outside.
* Only a regular file is read (a FIFO or device is refused without blocking).
* The size is taken when the file is opened; the content is hashed (sha256)
  while it is read.  A file that shrinks, grows or is modified (size or mtime)
  while it is read fails with a message saying so.  (A rewrite in place that
  keeps the size within the filesystem's timestamp granularity cannot be seen;
  the sha256 then covers what was read and sent.)  Files whose size is not
  known in advance (those of /proc) fail as "grew while being read".
* Memory is bounded: the chunk being read.

The controller side, :class:`FetchSink`, lands one node's file at a chosen path
(``write()`` per chunk in order, ``finish(size, sha256)`` with what the node
reported, ``abort()`` on any problem):

* Chunks go to a temporary file in the destination directory (created with
  its missing parents on the first byte); ``finish`` checks the size and the
  sha256 of what was received against the node's report, then renames the file
  into place atomically (fsync of the file and of the directory).  Any failure,
  and ``abort()``, removes the temporary file: no partial file ever exists at
  the destination, and a file already there stays as it was.
* A chunk at offset 0 after others restarts the file (a node re-dispatched
  after a relay died sends its file again); any other out-of-order chunk is an
  error.
* When the destination already holds the same content, it is left alone
  (``finish`` returns False: not changed); a new file gets mode 0666 & ~umask.
* Memory is bounded: the chunk being written (plus one block while comparing).

Standard library only, Python 3.9+; synchronous, meant to run inline on the
event loop (like :mod:`relaytree.filecopy`).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from typing import Optional, Union

from relaytree.filecopy import CopyError, resolve_path

__all__ = ["FetchError", "FileSource", "FetchSink"]

_COMPARE_BLOCK = 1 << 20
# Keep temporary names under NAME_MAX (255 bytes) whatever the destination name.
_TMP_NAME_MAX = 200


class FetchError(CopyError):
    """Clear, user-facing message naming what is wrong (path, reason)."""


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


class FileSource:
    """One file of this node, read in chunks of ``chunk_size`` for a fetch."""

    def __init__(self, path: str, base_dir: Optional[str], chunk_size: int):
        self.path = path  # request path, as shown in messages
        self.base_dir = base_dir or None
        self.chunk_size = chunk_size
        self.real_path = ""  # the file actually opened (symlinks resolved), once open
        self.size = 0
        self.offset = 0
        self._fd = -1
        self._st: Optional[os.stat_result] = None
        self._hasher = hashlib.sha256()

    @property
    def sha256(self) -> bytes:
        """Digest of what read_chunk() returned so far (of the whole file once it returned None)."""
        return self._hasher.digest()

    def open(self) -> None:
        try:
            local = resolve_path(self.base_dir, self.path, "source path")
        except CopyError as exc:
            raise FetchError(str(exc)) from None
        real_base = os.path.realpath(self.base_dir) if self.base_dir else ""
        if real_base and not _inside(os.path.realpath(local), real_base):
            raise FetchError(f"{self.path} resolves to {os.path.realpath(local)}, outside the base "
                             f"directory {self.base_dir}")
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(local, flags)
        except OSError as exc:
            raise FetchError(f"cannot open {self.path}: {_why(exc)}") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise FetchError(f"{self.path} is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise FetchError(f"{self.path} is not a regular file")
            self.real_path = self._opened_path(fd, local)
            if real_base and not _inside(self.real_path, real_base):
                raise FetchError(f"{self.path} resolves to {self.real_path}, outside the base "
                                 f"directory {self.base_dir}")
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._st, self.size = fd, st, st.st_size

    @staticmethod
    def _opened_path(fd: int, local: str) -> str:
        try:
            return os.readlink("/proc/self/fd/%d" % fd)
        except OSError:  # no /proc: the path as resolved before opening
            return os.path.realpath(local)

    def read_chunk(self) -> Optional[bytes]:
        """The next chunk, or None once the whole file was read and found unchanged."""
        if self._fd < 0:
            raise FetchError(f"{self.path} is not open")
        try:
            if self.offset >= self.size:
                self._check_unchanged()
                return None
            want = min(self.chunk_size, self.size - self.offset)
            data = os.pread(self._fd, want, self.offset)
            while 0 < len(data) < want:  # short read: gather the rest of the chunk
                more = os.pread(self._fd, want - len(data), self.offset + len(data))
                if not more:
                    break
                data += more
        except OSError as exc:
            raise FetchError(f"{_why(exc)} reading {self.path}") from None
        if len(data) < want:
            raise FetchError(f"{self.path} shrank while being read (it had {self.size} bytes, "
                             f"ends after {self.offset + len(data)})")
        self._hasher.update(data)
        self.offset += len(data)
        return data

    def _check_unchanged(self) -> None:
        if os.pread(self._fd, 1, self.size):
            raise FetchError(f"{self.path} grew while being read (it had {self.size} bytes when "
                             "opened; files without a fixed size, such as those of /proc, cannot "
                             "be fetched)")
        st = os.fstat(self._fd)
        old = self._st
        assert old is not None
        if st.st_size != old.st_size or st.st_mtime_ns != old.st_mtime_ns:
            raise FetchError(f"{self.path} was modified while being read; fetch it again")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _umask() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class FetchSink:
    """One node's file landing at ``path`` on the controller (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self.received = 0
        self._fd = -1
        self._tmp = ""
        self._hasher = hashlib.sha256()

    def write(self, offset: int, data: Union[bytes, memoryview]) -> None:
        if offset == 0 and self.received:  # the node starts again (re-dispatched)
            self._hasher = hashlib.sha256()
            self.received = 0
            self._run(os.ftruncate, self._fd, 0)
        if offset != self.received:
            raise FetchError(f"chunk at offset {offset} of {self.path} out of order: expected "
                             f"offset {self.received}")
        if self._fd < 0:
            self._create()
        done = 0
        while done < len(data):
            done += self._run(os.pwrite, self._fd, data[done:], offset + done)
        self._hasher.update(data)
        self.received += len(data)

    def finish(self, size: int, sha256: bytes) -> bool:
        """Check what arrived against the node's report and land it; True when the file changed."""
        if self.received != size:
            raise FetchError(f"incomplete fetch of {self.path}: received {self.received} of "
                             f"{size} bytes")
        digest = self._hasher.digest()
        if digest != sha256:
            raise FetchError(f"sha256 mismatch for {self.path}: the node sent {sha256.hex()}, "
                             f"received data has {digest.hex()}")
        if self._fd < 0:
            self._create()  # an empty file
        if self._same_as_existing(size, digest):
            self.abort()
            return False
        self._run(os.fchmod, self._fd, 0o666 & ~_umask())
        self._run(os.fsync, self._fd)
        os.close(self._fd)
        self._fd = -1
        try:
            os.replace(self._tmp, self.path)
        except OSError as exc:
            raise FetchError(f"cannot replace {self.path}: {_why(exc)}") from None
        self._tmp = ""
        try:
            dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
        return True

    def abort(self) -> None:
        """Idempotent: remove the temporary file; the destination is untouched."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
            self._tmp = ""

    def _create(self) -> None:
        parent = os.path.dirname(self.path) or "."
        if os.path.isdir(self.path):
            raise FetchError(f"{self.path} is a directory")
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise FetchError(f"cannot create directory {parent}: {_why(exc)}") from None
        name = os.fsencode(os.path.basename(self.path))[:_TMP_NAME_MAX]
        try:
            self._fd, self._tmp = tempfile.mkstemp(prefix="." + os.fsdecode(name) + ".relaytree-",
                                                   suffix=".tmp", dir=parent)
        except OSError as exc:
            raise FetchError(f"cannot create a temporary file in {parent} for {self.path}: "
                             f"{_why(exc)}") from None

    def _same_as_existing(self, size: int, digest: bytes) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
        hasher = hashlib.sha256()
        try:
            with open(self.path, "rb") as fh:
                for block in iter(lambda: fh.read(_COMPARE_BLOCK), b""):
                    hasher.update(block)
        except OSError:
            return False
        return hasher.digest() == digest

    def _run(self, func, *args):
        try:
            return func(*args)
        except OSError as exc:
            raise FetchError(f"{_why(exc)} writing {self.path}") from None
