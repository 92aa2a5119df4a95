"""LocalCopy: landing a chunked file on the local node (real files in tmp_path)."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaytree.filecopy import (
    CopyError,
    CopyOutcome,
    CopyRequest,
    LocalCopy,
    parse_mode,
    resolve_path,
)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------- helpers


def make_req(dest, data: bytes, chunk_size: int = 4, **kw) -> CopyRequest:
    kw.setdefault("sha256", hashlib.sha256(data).digest())
    return CopyRequest(dest=str(dest), size=len(data), chunk_size=chunk_size, **kw)


def split(data: bytes, chunk_size: int) -> List[bytes]:
    return [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]


def run_copy(
    req: CopyRequest,
    data: bytes,
    base_dir: Optional[str] = None,
    after_write: Optional[Callable[[int, LocalCopy], None]] = None,
) -> CopyOutcome:
    lc = LocalCopy(req, base_dir)
    try:
        lc.open()
        for i, chunk in enumerate(split(data, req.chunk_size)):
            lc.write(i, chunk)
            if after_write is not None:
                after_write(i, lc)
        return lc.finish()
    finally:
        lc.abort()


def listing(d) -> List[str]:
    return sorted(os.listdir(d))


def temps(d) -> List[str]:
    return [n for n in os.listdir(d) if ".relaytree-" in n]


def aged(path: Path, data: bytes, mode: int = 0o644) -> os.stat_result:
    """Write an existing file with an old mtime, so any rewrite is visible."""
    path.write_bytes(data)
    os.chmod(path, mode)
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    return os.stat(path)


# --------------------------------------------------------------------------- resolve_path / parse_mode


def test_resolve_path_without_base():
    assert resolve_path(None, "/etc//hosts") == "/etc/hosts"
    assert resolve_path(None, "/a/./b/../c") == "/a/c"
    assert resolve_path(None, "/../etc/x") == "/etc/x"
    assert resolve_path(None, "/") == "/"


def test_resolve_path_with_base(tmp_path):
    base = str(tmp_path)
    assert resolve_path(base, "/etc/hosts") == f"{base}/etc/hosts"
    assert resolve_path(base, "/a/../b") == f"{base}/b"
    assert resolve_path(base, "/") == base
    assert resolve_path(base + "/", "/x") == f"{base}/x"


@pytest.mark.parametrize("path", ["/..", "/../x", "/a/../../x", "/a/b/../../../etc/passwd"])
def test_resolve_path_refuses_escape(tmp_path, path):
    with pytest.raises(CopyError, match="escapes"):
        resolve_path(str(tmp_path), path)


@pytest.mark.parametrize("path", ["", "relative/x", "./x", "x"])
def test_resolve_path_requires_absolute(path):
    with pytest.raises(CopyError):
        resolve_path(None, path)


def test_parse_mode():
    assert parse_mode("") is None
    assert parse_mode("0644") == 0o644
    assert parse_mode("644") == 0o644
    assert parse_mode("0o644") == 0o644
    assert parse_mode("4755") == 0o4755
    assert parse_mode("07777") == 0o7777


@pytest.mark.parametrize("mode", ["abc", "0888", "u=rw", "17777", "0o", "-1", "0x1ff", "6 4 4"])
def test_bad_mode_refused_at_open(tmp_path, mode):
    lc = LocalCopy(make_req(tmp_path / "f", b"x", mode=mode))
    with pytest.raises(CopyError, match="invalid mode"):
        lc.open()
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- basic copies


def test_new_file(tmp_path):
    data = b"hello world, this is relaytree\n" * 3
    dest = tmp_path / "new.txt"
    seen = []
    out = run_copy(make_req(dest, data, chunk_size=10), data,
                   after_write=lambda i, lc: seen.append(len(temps(tmp_path))))
    assert out == CopyOutcome(changed=True, dest=str(dest))
    assert dest.read_bytes() == data
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644
    assert seen and all(n == 1 for n in seen)  # one temp file while writing
    assert listing(tmp_path) == ["new.txt"]


def test_new_empty_file(tmp_path):
    dest = tmp_path / "empty"
    out = run_copy(make_req(dest, b""), b"")
    assert out.changed and dest.read_bytes() == b""
    assert listing(tmp_path) == ["empty"]
    # and again: identical now
    assert run_copy(make_req(dest, b""), b"").changed is False


def test_temp_file_name_and_mode(tmp_path):
    dest = tmp_path / "f.bin"
    lc = LocalCopy(make_req(dest, b"abcdefgh"))
    lc.open()
    lc.write(0, b"abcd")
    (name,) = temps(tmp_path)
    assert re.fullmatch(r"\.f\.bin\.relaytree-\w+\.tmp", name)
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    lc.abort()
    assert listing(tmp_path) == []


def test_dest_is_directory_uses_src_name(tmp_path):
    data = b"content"
    out = run_copy(make_req(tmp_path, data, src_name="file.conf"), data)
    assert out.dest == str(tmp_path / "file.conf")
    assert (tmp_path / "file.conf").read_bytes() == data


@pytest.mark.parametrize("name", ["", "a/b", "..", ".", "/abs"])
def test_dest_is_directory_bad_src_name(tmp_path, name):
    lc = LocalCopy(make_req(tmp_path, b"x", src_name=name))
    with pytest.raises(CopyError):
        lc.open()
    assert listing(tmp_path) == []


def test_dest_dir_slash_src_name_is_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    with pytest.raises(CopyError, match="is a directory"):
        LocalCopy(make_req(tmp_path, b"x", src_name="sub")).open()


def test_trailing_slash_means_directory(tmp_path):
    data = b"payload"
    with pytest.raises(CopyError, match="does not exist"):
        run_copy(make_req(f"{tmp_path}/newdir/", data, src_name="p"), data)
    assert listing(tmp_path) == []
    out = run_copy(make_req(f"{tmp_path}/newdir/", data, src_name="p", mkdirs=True), data)
    assert out.dest == f"{tmp_path}/newdir/p"
    assert (tmp_path / "newdir" / "p").read_bytes() == data


def test_dest_non_regular_file_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CopyError, match="not a regular file"):
        LocalCopy(make_req(fifo, b"x")).open()
    assert listing(tmp_path) == ["fifo"]


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_bad_chunk_size(tmp_path, chunk_size):
    with pytest.raises(CopyError, match="chunk size"):
        LocalCopy(make_req(tmp_path / "f", b"x", chunk_size=chunk_size)).open()
    assert listing(tmp_path) == []


def test_bad_sha256_length(tmp_path):
    with pytest.raises(CopyError, match="invalid sha256"):
        LocalCopy(make_req(tmp_path / "f", b"x", sha256=b"short")).open()


# --------------------------------------------------------------------------- same-content detection


def test_identical_content_is_not_rewritten(tmp_path):
    data = os.urandom(1000)
    dest = tmp_path / "same"
    before = aged(dest, data)
    seen = []
    out = run_copy(make_req(dest, data, chunk_size=64), data,
                   after_write=lambda i, lc: seen.append(listing(tmp_path)))
    assert out == CopyOutcome(changed=False, dest=str(dest))
    assert len(seen) == 16 and all(s == ["same"] for s in seen)  # never a temp file
    after = os.stat(dest)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert dest.read_bytes() == data
    assert listing(tmp_path) == ["same"]


@pytest.mark.parametrize("where", [0, 1, 500, 999])
def test_same_size_different_content(tmp_path, where):
    old = os.urandom(1000)
    new = bytearray(old)
    new[where] ^= 0xFF
    new = bytes(new)
    dest = tmp_path / "f"
    before = aged(dest, old, 0o640)
    first_diff_chunk = where // 100
    seen = []
    out = run_copy(make_req(dest, new, chunk_size=100), new,
                   after_write=lambda i, lc: seen.append(len(temps(tmp_path))))
    assert out.changed is True
    assert dest.read_bytes() == new
    # no temp file before the first differing chunk, one from it on
    assert seen == [0] * first_diff_chunk + [1] * (10 - first_diff_chunk)
    after = os.stat(dest)
    assert after.st_ino != before.st_ino
    assert stat.S_IMODE(after.st_mode) == 0o640  # existing mode kept
    assert listing(tmp_path) == ["f"]


def test_different_size(tmp_path):
    dest = tmp_path / "f"
    aged(dest, b"short")
    data = b"a much longer content than before"
    out = run_copy(make_req(dest, data, chunk_size=7), data)
    assert out.changed and dest.read_bytes() == data
    # and shorter
    out = run_copy(make_req(dest, b"x", chunk_size=7), b"x")
    assert out.changed and dest.read_bytes() == b"x"
    assert listing(tmp_path) == ["f"]


def test_dest_modified_during_comparison(tmp_path):
    """The identical prefix is copied from the dest: it must still be what was received."""
    old = b"AAAABBBBCCCC"
    dest = tmp_path / "f"
    aged(dest, old)
    new = b"AAAABBBBXXXX"
    lc = LocalCopy(make_req(dest, new))
    lc.open()
    lc.write(0, b"AAAA")
    lc.write(1, b"BBBB")
    with open(dest, "r+b") as fh:  # someone rewrites the already-compared prefix
        fh.write(b"ZZZZ")
    with pytest.raises(CopyError, match="changed while it was being compared"):
        lc.write(2, b"XXXX")
    assert listing(tmp_path) == ["f"]
    assert dest.read_bytes() == b"ZZZZBBBBCCCC"


def test_dest_modified_before_finish_of_identical(tmp_path):
    data = b"0123456789"
    dest = tmp_path / "f"
    aged(dest, data)
    lc = LocalCopy(make_req(dest, data))
    lc.open()
    for i, c in enumerate(split(data, 4)):
        lc.write(i, c)
    os.utime(dest)  # touched: we can no longer vouch for "identical"
    with pytest.raises(CopyError, match="was modified during the copy"):
        lc.finish()


# --------------------------------------------------------------------------- failures leave nothing


def test_sha_mismatch(tmp_path):
    dest = tmp_path / "f"
    before = aged(dest, b"old content")
    data = b"new content that differs"
    lc = LocalCopy(make_req(dest, data, sha256=hashlib.sha256(b"other").digest()))
    lc.open()
    for i, c in enumerate(split(data, 4)):
        lc.write(i, c)
    assert len(temps(tmp_path)) == 1
    with pytest.raises(CopyError, match="sha256 mismatch"):
        lc.finish()
    assert listing(tmp_path) == ["f"]
    assert dest.read_bytes() == b"old content"
    assert os.stat(dest).st_ino == before.st_ino
    with pytest.raises(CopyError, match="already failed"):
        lc.finish()
    lc.abort()


def test_sha_mismatch_same_size(tmp_path):
    dest = tmp_path / "f"
    old = b"0123456789"
    aged(dest, old)
    new = b"0123456780"
    with pytest.raises(CopyError, match="sha256 mismatch"):
        run_copy(make_req(dest, new, sha256=hashlib.sha256(old).digest()), new)
    assert listing(tmp_path) == ["f"] and dest.read_bytes() == old


def test_size_overflow(tmp_path):
    dest = tmp_path / "f"
    lc = LocalCopy(make_req(dest, b"12345678"))  # announces 8 bytes
    lc.open()
    lc.write(0, b"1234")
    lc.write(1, b"5678")
    with pytest.raises(CopyError, match="announced size"):
        lc.write(2, b"9")
    assert listing(tmp_path) == []


def test_incomplete(tmp_path):
    dest = tmp_path / "f"
    aged(dest, b"old")
    lc = LocalCopy(make_req(dest, b"12345678"))
    lc.open()
    lc.write(0, b"1234")
    with pytest.raises(CopyError, match="incomplete copy"):
        lc.finish()
    assert listing(tmp_path) == ["f"] and dest.read_bytes() == b"old"


def test_out_of_order_chunk(tmp_path):
    dest = tmp_path / "f"
    lc = LocalCopy(make_req(dest, b"12345678"))
    lc.open()
    lc.write(0, b"1234")
    with pytest.raises(CopyError, match="out of order"):
        lc.write(0, b"1234")
    assert listing(tmp_path) == []
    with pytest.raises(CopyError, match="already failed"):
        lc.write(1, b"5678")
    lc2 = LocalCopy(make_req(dest, b"12345678"))
    lc2.open()
    with pytest.raises(CopyError, match="out of order"):
        lc2.write(1, b"5678")
    assert listing(tmp_path) == []


def test_chunk_size_rules(tmp_path):
    lc = LocalCopy(make_req(tmp_path / "a", b"123456789"))
    lc.open()
    with pytest.raises(CopyError, match="more than the chunk size"):
        lc.write(0, b"12345")
    lc = LocalCopy(make_req(tmp_path / "b", b"123456789"))
    lc.open()
    lc.write(0, b"12")
    with pytest.raises(CopyError, match="short chunk"):
        lc.write(1, b"3456")
    assert listing(tmp_path) == []


def test_abort_midway(tmp_path):
    dest = tmp_path / "f"
    before = aged(dest, b"old")
    lc = LocalCopy(make_req(dest, b"new content"))
    lc.abort()  # before open: fine
    lc = LocalCopy(make_req(dest, b"new content"))
    lc.open()
    lc.write(0, b"new ")
    assert len(temps(tmp_path)) == 1
    lc.abort()
    lc.abort()  # idempotent
    assert listing(tmp_path) == ["f"]
    assert dest.read_bytes() == b"old" and os.stat(dest).st_ino == before.st_ino
    with pytest.raises(CopyError):
        lc.write(1, b"cont")


def test_abort_after_finish_keeps_dest(tmp_path):
    dest = tmp_path / "f"
    lc = LocalCopy(make_req(dest, b"data"))
    lc.open()
    lc.write(0, b"data")
    lc.finish()
    lc.abort()
    lc.abort()
    assert dest.read_bytes() == b"data"
    with pytest.raises(CopyError):
        lc.write(1, b"x")


def test_state_errors(tmp_path):
    lc = LocalCopy(make_req(tmp_path / "f", b"data"))
    with pytest.raises(CopyError, match=r"write\(\) called"):
        lc.write(0, b"data")
    with pytest.raises(CopyError, match=r"finish\(\) called"):
        lc.finish()
    lc.open()
    with pytest.raises(CopyError, match=r"open\(\) called"):
        lc.open()
    lc.write(0, b"data")
    lc.finish()
    with pytest.raises(CopyError, match=r"finish\(\) called"):
        lc.finish()
    assert (tmp_path / "f").read_bytes() == b"data"


def test_context_manager_cleans_up(tmp_path):
    with pytest.raises(RuntimeError):
        with LocalCopy(make_req(tmp_path / "f", b"12345678")) as lc:
            lc.open()
            lc.write(0, b"1234")
            raise RuntimeError("boom")
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- mode / owner / group


def test_mode_applied(tmp_path):
    dest = tmp_path / "f"
    run_copy(make_req(dest, b"x", mode="0600"), b"x")
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    run_copy(make_req(dest, b"y", mode="0o755"), b"y")
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    run_copy(make_req(dest, b"z"), b"z")  # "" keeps the existing mode
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755


def test_identical_content_different_mode(tmp_path):
    dest = tmp_path / "f"
    data = b"same content here"
    before = aged(dest, data, 0o644)
    seen = []
    out = run_copy(make_req(dest, data, mode="600"), data,
                   after_write=lambda i, lc: seen.append(listing(tmp_path)))
    assert out.changed is True
    assert all(s == ["f"] for s in seen)
    after = os.stat(dest)
    assert stat.S_IMODE(after.st_mode) == 0o600
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # second time: nothing to do
    assert run_copy(make_req(dest, data, mode="0600"), data).changed is False


@pytest.mark.skipif(not IS_ROOT, reason="chown needs root")
def test_owner_group(tmp_path):
    dest = tmp_path / "f"
    run_copy(make_req(dest, b"x", owner="65534", group="65534"), b"x")
    st_ = dest.stat()
    assert (st_.st_uid, st_.st_gid) == (65534, 65534)
    # the existing owner is kept when the content is replaced without owner
    run_copy(make_req(dest, b"new"), b"new")
    st_ = dest.stat()
    assert (st_.st_uid, st_.st_gid) == (65534, 65534)
    run_copy(make_req(dest, b"again", owner="0", group="0"), b"again")
    assert (dest.stat().st_uid, dest.stat().st_gid) == (0, 0)


@pytest.mark.skipif(not IS_ROOT, reason="chown needs root")
def test_owner_by_name(tmp_path):
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    dest = tmp_path / "f"
    run_copy(make_req(dest, b"x", owner="nobody"), b"x")
    assert dest.stat().st_uid == nobody.pw_uid


@pytest.mark.skipif(not IS_ROOT, reason="chown needs root")
def test_identical_content_different_owner(tmp_path):
    dest = tmp_path / "f"
    data = b"same"
    before = aged(dest, data, 0o4755)
    out = run_copy(make_req(dest, data, owner="65534"), data)
    assert out.changed is True
    after = os.stat(dest)
    assert after.st_uid == 65534 and after.st_ino == before.st_ino
    assert after.st_mtime_ns == before.st_mtime_ns
    assert stat.S_IMODE(after.st_mode) == 0o4755  # kept despite chown clearing it
    assert run_copy(make_req(dest, data, owner="65534"), data).changed is False


@pytest.mark.parametrize("field", ["owner", "group"])
def test_unknown_owner_group(tmp_path, field):
    lc = LocalCopy(make_req(tmp_path / "f", b"x", **{field: "no-such-principal-xyz"}))
    with pytest.raises(CopyError, match=f"unknown {field}"):
        lc.open()
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- directories


def test_mkdirs(tmp_path):
    dest = tmp_path / "a" / "b" / "c" / "f"
    out = run_copy(make_req(dest, b"deep", mkdirs=True), b"deep")
    assert out.changed and dest.read_bytes() == b"deep"
    assert listing(dest.parent) == ["f"]


def test_missing_parent_without_mkdirs(tmp_path):
    dest = tmp_path / "a" / "b" / "f"
    with pytest.raises(CopyError, match="does not exist"):
        run_copy(make_req(dest, b"x"), b"x")
    assert listing(tmp_path) == []


def test_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(CopyError, match="not a directory"):
        run_copy(make_req(tmp_path / "file" / "sub" / "f", b"x", mkdirs=True), b"x")
    with pytest.raises(CopyError, match="not a directory"):
        run_copy(make_req(tmp_path / "file" / "f", b"x"), b"x")
    assert listing(tmp_path) == ["file"]


# --------------------------------------------------------------------------- base_dir confinement


def test_base_dir_lands_under_base(tmp_path):
    base = tmp_path / "root"
    (base / "etc").mkdir(parents=True)
    out = run_copy(make_req("/etc/motd", b"hi"), b"hi", base_dir=str(base))
    assert out.dest == "/etc/motd"
    assert (base / "etc" / "motd").read_bytes() == b"hi"


def test_base_dir_dotdot_escape(tmp_path):
    base = tmp_path / "root"
    base.mkdir()
    with pytest.raises(CopyError, match="escapes"):
        run_copy(make_req("/../outside", b"x"), b"x", base_dir=str(base))
    assert listing(tmp_path) == ["root"]


def test_base_dir_missing(tmp_path):
    with pytest.raises(CopyError, match="base directory"):
        run_copy(make_req("/f", b"x"), b"x", base_dir=str(tmp_path / "nope"))


def test_base_dir_symlinked_dir_escape(tmp_path):
    base = tmp_path / "root"
    outside = tmp_path / "outside"
    base.mkdir()
    outside.mkdir()
    (base / "link").symlink_to(outside)
    with pytest.raises(CopyError, match="outside the base directory"):
        run_copy(make_req("/link/f", b"x"), b"x", base_dir=str(base))
    with pytest.raises(CopyError, match="outside the base directory"):
        run_copy(make_req("/link/a/b/f", b"x", mkdirs=True), b"x", base_dir=str(base))
    with pytest.raises(CopyError, match="outside the base directory"):  # dest dir is the link
        run_copy(make_req("/link", b"x", src_name="f"), b"x", base_dir=str(base))
    assert listing(outside) == []


def test_base_dir_symlinked_dir_inside_is_fine(tmp_path):
    base = tmp_path / "root"
    (base / "real").mkdir(parents=True)
    (base / "link").symlink_to("real")
    out = run_copy(make_req("/link/f", b"x"), b"x", base_dir=str(base))
    assert out.dest == "/link/f"
    assert (base / "real" / "f").read_bytes() == b"x"


def test_base_dir_symlink_dest_outside_refused(tmp_path):
    base = tmp_path / "root"
    base.mkdir()
    target = tmp_path / "secret"
    target.write_bytes(b"secret")
    (base / "f").symlink_to(target)
    with pytest.raises(CopyError, match="is a symlink to"):
        run_copy(make_req("/f", b"x"), b"x", base_dir=str(base))
    assert target.read_bytes() == b"secret"
    assert (base / "f").is_symlink()
    assert listing(base) == ["f"]


def test_symlink_dest_inside_is_replaced(tmp_path):
    base = tmp_path / "root"
    base.mkdir()
    (base / "target").write_bytes(b"target")
    os.chmod(base / "target", 0o600)
    (base / "f").symlink_to("target")
    out = run_copy(make_req("/f", b"target"), b"target", base_dir=str(base))
    assert out.changed is True  # a link becomes a file, even with the same content
    assert not (base / "f").is_symlink()
    assert (base / "f").read_bytes() == b"target"
    assert stat.S_IMODE((base / "f").stat().st_mode) == 0o600  # target's mode kept
    assert (base / "target").read_bytes() == b"target"


def test_symlink_dest_without_base_is_replaced(tmp_path):
    (tmp_path / "target").write_bytes(b"old")
    (tmp_path / "f").symlink_to(tmp_path / "target")
    run_copy(make_req(tmp_path / "f", b"new"), b"new")
    assert not (tmp_path / "f").is_symlink()
    assert (tmp_path / "f").read_bytes() == b"new"
    assert (tmp_path / "target").read_bytes() == b"old"


# --------------------------------------------------------------------------- check mode


def test_check_mode_new_file_writes_nothing(tmp_path):
    data = b"0123456789"
    seen = []
    out = run_copy(make_req(tmp_path / "a" / "b" / "f", data, check=True, mkdirs=True), data,
                   after_write=lambda i, lc: seen.append(listing(tmp_path)))
    assert out.changed is True
    assert all(s == [] for s in seen) and listing(tmp_path) == []


def test_check_mode_existing(tmp_path):
    dest = tmp_path / "f"
    data = b"0123456789"
    before = aged(dest, data, 0o644)

    def spy(i, lc):
        assert listing(tmp_path) == ["f"]

    assert run_copy(make_req(dest, data, check=True), data, after_write=spy).changed is False
    other = b"0123456780"
    assert run_copy(make_req(dest, other, check=True), other, after_write=spy).changed is True
    assert run_copy(make_req(dest, b"xy", check=True), b"xy", after_write=spy).changed is True
    assert run_copy(make_req(dest, data, check=True, mode="0600"), data).changed is True
    after = os.stat(dest)
    assert (after.st_ino, after.st_mtime_ns, after.st_mode) == (
        before.st_ino, before.st_mtime_ns, before.st_mode)
    assert dest.read_bytes() == data and listing(tmp_path) == ["f"]


def test_check_mode_still_verifies_sha(tmp_path):
    data = b"0123456789"
    with pytest.raises(CopyError, match="sha256 mismatch"):
        run_copy(make_req(tmp_path / "f", data, check=True, sha256=bytes(32)), data)


def test_check_mode_read_chunk_refused(tmp_path):
    lc = LocalCopy(make_req(tmp_path / "f", b"12345678", check=True))
    lc.open()
    lc.write(0, b"1234")
    with pytest.raises(CopyError, match="check mode keeps no data"):
        lc.read_chunk(0)
    lc.abort()


# --------------------------------------------------------------------------- read_chunk


def test_read_chunk_from_temp(tmp_path):
    data = b"abcdefghij"
    lc = LocalCopy(make_req(tmp_path / "f", data))
    lc.open()
    for i, c in enumerate(split(data, 4)):
        lc.write(i, c)
        assert [lc.read_chunk(j) for j in range(i + 1)] == split(data, 4)[: i + 1]
    with pytest.raises(CopyError):
        lc.read_chunk(3)
    with pytest.raises(CopyError):
        lc.read_chunk(-1)
    assert lc.chunks_received == 3
    lc.finish()
    assert lc.read_chunk(2) == b"ij"  # served from the landed file after finish
    lc.abort()
    with pytest.raises(CopyError):
        lc.read_chunk(0)


def test_read_chunk_from_identical_dest(tmp_path):
    data = os.urandom(40)
    dest = tmp_path / "f"
    aged(dest, data)
    chunks = split(data, 8)
    lc = LocalCopy(make_req(dest, data, chunk_size=8))
    lc.open()
    for i, c in enumerate(chunks):
        lc.write(i, c)
        assert listing(tmp_path) == ["f"]
        assert lc.read_chunk(i) == c and lc.read_chunk(0) == chunks[0]
    assert lc.finish().changed is False
    assert [lc.read_chunk(i) for i in range(5)] == chunks
    lc.abort()


def test_read_chunk_after_divergence(tmp_path):
    old = b"AAAABBBBCCCCDD"
    new = b"AAAABBBBXXXXDD"
    dest = tmp_path / "f"
    aged(dest, old)
    lc = LocalCopy(make_req(dest, new))
    lc.open()
    for i, c in enumerate(split(new, 4)):
        lc.write(i, c)
    assert len(temps(tmp_path)) == 1
    assert [lc.read_chunk(i) for i in range(4)] == split(new, 4)
    lc.finish()
    assert dest.read_bytes() == new
    lc.abort()


# --------------------------------------------------------------------------- ENOSPC


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                              capture_output=True)
    except OSError as exc:
        pytest.skip(f"cannot mount tmpfs: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_enospc(tiny_fs):
    dest = tiny_fs / "big"
    old = b"old content"
    aged(dest, old)
    data = os.urandom(2 * 1024 * 1024)
    with pytest.raises(CopyError, match="No space left on device") as info:
        run_copy(make_req(dest, data, chunk_size=64 * 1024), data)
    assert str(dest) in str(info.value)
    assert listing(tiny_fs) == ["big"]
    assert dest.read_bytes() == old


def test_enospc_during_prefix_copy(tiny_fs):
    """Same size as an existing 600 KiB file: the prefix copy itself hits ENOSPC."""
    dest = tiny_fs / "f"
    old = os.urandom(600 * 1024)
    aged(dest, old)
    new = old[:-1] + bytes([old[-1] ^ 1])
    with pytest.raises(CopyError, match="No space left on device"):
        run_copy(make_req(dest, new, chunk_size=64 * 1024), new)
    assert listing(tiny_fs) == ["f"]
    assert dest.read_bytes() == old


# --------------------------------------------------------------------------- backup


BACKUP_RE = r"f\.\d+\.\d{4}-\d\d-\d\d@\d\d:\d\d:\d\d(\.\d+)?~"


def test_backup(tmp_path):
    dest = tmp_path / "f"
    before = aged(dest, b"version 1")
    out = run_copy(make_req(dest, b"version 2", backup=True), b"version 2")
    assert out.changed and out.backup
    backup = Path(out.backup)
    assert backup.parent == tmp_path and re.fullmatch(BACKUP_RE, backup.name)
    assert backup.read_bytes() == b"version 1"
    assert os.stat(backup).st_ino == before.st_ino  # hard link of the old file
    assert dest.read_bytes() == b"version 2"
    # a second backup in the same second does not clobber the first
    out2 = run_copy(make_req(dest, b"version 3", backup=True), b"version 3")
    assert out2.backup and out2.backup != out.backup
    assert Path(out2.backup).read_bytes() == b"version 2"
    assert backup.read_bytes() == b"version 1"
    assert len(temps(tmp_path)) == 0


def test_no_backup_when_unchanged_or_new(tmp_path):
    dest = tmp_path / "f"
    out = run_copy(make_req(dest, b"v", backup=True), b"v")
    assert out.changed and out.backup == ""
    out = run_copy(make_req(dest, b"v", backup=True, mode="0600"), b"v")
    assert out.changed and out.backup == ""  # only the mode changed
    assert listing(tmp_path) == ["f"]


def test_backup_with_base_dir_reports_request_path(tmp_path):
    base = tmp_path / "root"
    base.mkdir()
    (base / "f").write_bytes(b"one")
    out = run_copy(make_req("/f", b"two", backup=True), b"two", base_dir=str(base))
    assert out.backup.startswith("/f.") and (base / out.backup.lstrip("/")).read_bytes() == b"one"


# --------------------------------------------------------------------------- property


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=3000),
    chunk_size=st.integers(min_value=1, max_value=700),
    existing=st.sampled_from(["none", "same", "flipped", "other"]),
    flip=st.integers(min_value=0),
    other=st.binary(max_size=500),
    check=st.booleans(),
)
def test_property_lands_identical(data, chunk_size, existing, flip, other, check):
    with tempfile.TemporaryDirectory() as d:
        dest = Path(d) / "f"
        old: Optional[bytes] = None
        if existing == "same":
            old = data
        elif existing == "flipped" and data:
            buf = bytearray(data)
            buf[flip % len(buf)] ^= 0x5A
            old = bytes(buf)
        elif existing == "other":
            old = other
        if old is not None:
            aged(dest, old)
        expect_changed = old != data
        before = os.stat(dest) if old is not None else None

        out = run_copy(make_req(dest, data, chunk_size=chunk_size, check=check), data)
        assert out.changed is expect_changed
        assert out.dest == str(dest)
        if check:
            assert (dest.read_bytes() if old is not None else None) == old
        else:
            assert dest.read_bytes() == data
            assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(data).digest()
        if before is not None and (check or not expect_changed):
            after = os.stat(dest)
            assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert listing(d) == ([] if check and old is None else ["f"])
