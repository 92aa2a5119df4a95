"""FileSource (node side of a fetch) and FetchSink (controller side): real files in tmp_path."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess

import pytest

from relaytree.filefetch import FetchError, FetchSink, FileSource


def read_all(source: FileSource):
    chunks = []
    while True:
        data = source.read_chunk()
        if data is None:
            return chunks
        chunks.append(data)


def temps(d):
    return [n for n in os.listdir(d) if ".relaytree-" in n]


# --------------------------------------------------------------------------- FileSource


def test_source_reads_chunks_and_hashes(tmp_path):
    data = os.urandom(10 * 1000 + 7)
    (tmp_path / "f").write_bytes(data)
    source = FileSource(str(tmp_path / "f"), None, 1000)
    source.open()
    try:
        chunks = read_all(source)
    finally:
        source.close()
    assert [len(c) for c in chunks] == [1000] * 10 + [7]
    assert b"".join(chunks) == data
    assert source.size == len(data) and source.sha256 == hashlib.sha256(data).digest()
    assert source.real_path == str(tmp_path / "f")


def test_source_empty_file(tmp_path):
    (tmp_path / "e").write_bytes(b"")
    source = FileSource(str(tmp_path / "e"), None, 1000)
    source.open()
    assert read_all(source) == [] and source.size == 0
    assert source.sha256 == hashlib.sha256(b"").digest()
    source.close()


def test_source_under_base_dir(tmp_path):
    base = tmp_path / "base"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "f").write_bytes(b"inside")
    (base / "inner").symlink_to(base / "etc")  # a symlink that stays inside is fine
    for path in ("/etc/f", "/inner/f", "/etc/../etc/f"):
        source = FileSource(path, str(base), 4)
        source.open()
        assert b"".join(read_all(source)) == b"inside"
        source.close()


@pytest.mark.parametrize("path, message", [
    ("/../secret", "escapes the base directory"),
    ("/a/../../secret", "escapes the base directory"),
    ("/out/secret", "outside the base directory"),
    ("/link", "outside the base directory"),
    ("relative", "not absolute"),
    ("", "empty"),
    ("/x\0y", "NUL"),
])
def test_source_path_escapes_are_refused(tmp_path, path, message):
    base = tmp_path / "base"
    base.mkdir()
    (tmp_path / "secret").write_bytes(b"secret")
    (base / "out").symlink_to(tmp_path)
    (base / "link").symlink_to(tmp_path / "secret")
    source = FileSource(path, str(base), 4)
    with pytest.raises(FetchError, match=message):
        source.open()


@pytest.mark.parametrize("kind", ["missing", "directory", "fifo", "device"])
def test_source_not_a_regular_file(tmp_path, kind):
    path = tmp_path / "x"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening must not block
    elif kind == "device":
        path = "/dev/null"
    source = FileSource(str(path), None, 4)
    expected = {"missing": "cannot open .*: No such file", "directory": "is a directory",
                "fifo": "not a regular file", "device": "not a regular file"}[kind]
    with pytest.raises(FetchError, match=expected):
        source.open()


def test_source_that_shrinks_grows_or_changes_fails(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"a" * 100)
    source = FileSource(str(path), None, 10)
    source.open()
    source.read_chunk()
    os.truncate(path, 50)
    with pytest.raises(FetchError, match="shrank while being read"):
        read_all(source)
    source.close()

    path.write_bytes(b"a" * 100)
    source = FileSource(str(path), None, 10)
    source.open()
    with open(path, "ab") as fh:
        fh.write(b"more")
    with pytest.raises(FetchError, match="grew while being read"):
        read_all(source)
    source.close()

    path.write_bytes(b"a" * 100)
    os.utime(path, ns=(1, 1))
    source = FileSource(str(path), None, 10)
    source.open()
    with open(path, "r+b") as fh:  # same size, new content
        fh.write(b"b")
    with pytest.raises(FetchError, match="modified while being read"):
        read_all(source)
    source.close()


def test_proc_files_are_refused_clearly():
    source = FileSource("/proc/self/status", None, 1 << 20)
    source.open()
    with pytest.raises(FetchError, match="grew while being read.*/proc"):
        read_all(source)
    source.close()


# --------------------------------------------------------------------------- FetchSink


def land(path, data: bytes, chunk: int = 4, sha=None, size=None) -> bool:
    sink = FetchSink(str(path))
    try:
        for offset in range(0, len(data), chunk):
            sink.write(offset, memoryview(data)[offset:offset + chunk])
        return sink.finish(len(data) if size is None else size, sha or hashlib.sha256(data).digest())
    finally:
        sink.abort()


def test_sink_lands_atomically_with_parents(tmp_path):
    dest = tmp_path / "a" / "b" / "f"
    assert land(dest, b"hello world") is True
    assert dest.read_bytes() == b"hello world"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~umask
    assert temps(dest.parent) == []


def test_sink_empty_file(tmp_path):
    assert land(tmp_path / "e", b"") is True
    assert (tmp_path / "e").read_bytes() == b""


def test_sink_same_content_is_not_rewritten(tmp_path):
    dest = tmp_path / "f"
    dest.write_bytes(b"same")
    os.utime(dest, ns=(1, 1))
    inode = dest.stat().st_ino
    assert land(dest, b"same") is False
    assert dest.stat().st_ino == inode and dest.stat().st_mtime_ns == 1
    assert land(dest, b"diff") is True and dest.read_bytes() == b"diff"
    assert temps(tmp_path) == []


@pytest.mark.parametrize("problem", ["sha256", "size"])
def test_sink_mismatch_leaves_nothing(tmp_path, problem):
    dest = tmp_path / "f"
    dest.write_bytes(b"old")
    kw = {"sha": b"\0" * 32} if problem == "sha256" else {"size": 99}
    with pytest.raises(FetchError, match="sha256 mismatch" if problem == "sha256" else "received 8 of 99"):
        land(dest, b"new data", **kw)
    assert dest.read_bytes() == b"old" and temps(tmp_path) == []


def test_sink_restart_at_zero_and_out_of_order(tmp_path):
    dest = tmp_path / "f"
    sink = FetchSink(str(dest))
    sink.write(0, b"abcd")
    sink.write(4, b"ef")
    sink.write(0, b"ABCD")  # the node starts again (re-dispatched)
    sink.write(4, b"EF")
    assert sink.finish(6, hashlib.sha256(b"ABCDEF").digest()) is True
    assert dest.read_bytes() == b"ABCDEF"
    sink = FetchSink(str(tmp_path / "g"))
    sink.write(0, b"abcd")
    with pytest.raises(FetchError, match="offset 8 .* out of order: expected offset 4"):
        sink.write(8, b"x")
    sink.abort()
    assert not (tmp_path / "g").exists() and temps(tmp_path) == []


def test_sink_abort_and_bad_destinations(tmp_path):
    sink = FetchSink(str(tmp_path / "f"))
    sink.write(0, b"partial")
    assert len(temps(tmp_path)) == 1
    sink.abort()
    sink.abort()
    assert os.listdir(tmp_path) == []
    (tmp_path / "d").mkdir()
    with pytest.raises(FetchError, match="is a directory"):
        FetchSink(str(tmp_path / "d")).write(0, b"x")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FetchError, match="cannot create directory"):
        FetchSink(str(tmp_path / "file" / "sub" / "f")).write(0, b"x")


def test_sink_disk_full(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(FetchError, match="No space left"):
            land(mnt / "big", os.urandom(2 << 20), chunk=1 << 16)
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)])
