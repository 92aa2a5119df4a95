"""Fetch through the tree (node -> controller): real daemons on loopback, the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

from conftest import RELAYTREE, run_cli
from relaytree import client as rclient
from relaytree.results import Status
from test_tree import MIB, cli_json, counts, make_file, sha_of


def files(root):
    """Every regular file under root (relative paths), temporary ones included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def put(fleet, rel="data/f", size_of=lambda i: (i % 4) * MIB + 1000 * i):
    """A different file on every node (node i: size_of(i) bytes); {name: sha256 hex}."""
    digests = {}
    for i, d in enumerate(fleet.daemons):
        path = d.base_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        digests[d.name] = make_file(path, size_of(i), seed=i)
    return digests


def sparse(fleet, size, rel="data/f"):
    for d in fleet.daemons:
        (d.base_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(d.base_dir / rel, "wb") as fh:
            fh.truncate(size)


def test_fetch_from_20_nodes_dead_head_and_missing_file(fleet_factory, tmp_path):
    fleet = fleet_factory(20)
    digests = put(fleet)
    assert os.path.getsize(fleet.by_name("127.0.0.2").base_dir / "data/f") == 0  # an empty one too
    missing, dead = "127.0.0.7", "127.0.0.12"
    (fleet.by_name(missing).base_dir / "data/f").unlink()
    # Width 2: groups .2-.11 and .12-.21; .12 heads the second one and is dead, so .13
    # takes over its group; .2, .3, .8 and .13 relay the chunks of their subtrees.
    fleet.by_name(dead).kill()
    dest = tmp_path / "fetched"
    dest.mkdir()
    proc, doc = cli_json("fetch", "-w", fleet.nodeset, "--port", str(fleet.port), "--width", "2",
                         "--connect-timeout", "2", "/data/f", str(dest))
    assert proc.returncode == 1, proc.stderr
    assert counts(doc) == {"PASS": 18, "FAILED": 1, "UNREACHABLE": 1}, doc
    assert "No such file" in doc["nodes"][missing]["error"] and "/data/f" in doc["nodes"][missing]["error"]
    assert doc["nodes"][dead]["status"] == "UNREACHABLE" and doc["nodes"][dead]["error"]
    for name, digest in digests.items():
        if name in (missing, dead):
            continue
        entry = doc["nodes"][name]
        path = dest / name / "f"  # DESTDIR/NODE/basename
        assert entry["status"] == "PASS" and entry["dest"] == str(path) and entry["changed"] is True
        assert sha_of(path) == digest == entry["sha256"]
        assert entry["size"] == path.stat().st_size
    # Nothing for the nodes that failed, no temporary file anywhere.
    assert files(dest) == sorted("%s/f" % n for n in fleet.names if n not in (missing, dead))

    # Again, human output: the files are there already, nothing changes.
    proc = run_cli("fetch", "-w", fleet.nodeset, "--port", str(fleet.port), "--width", "2",
                   "--connect-timeout", "2", "-b", "/data/f", str(dest))
    out = proc.stdout.decode()
    assert proc.returncode == 1
    assert "PASS: 127.0.0.[2-6,8-11,13-21] (18) unchanged" in out, out
    assert "FAILED: 127.0.0.7 (1)" in out and "UNREACHABLE: 127.0.0.12 (1)" in out
    # The nodes with identical (here: empty) files share a block in the gathered view.
    assert "unchanged: 0 bytes, sha256 %s" % hashlib.sha256(b"").hexdigest() in out


def test_fetch_cli_summary_exit_status_and_bad_input(fleet_factory, tmp_path):
    fleet = fleet_factory(2)
    port = str(fleet.port)
    for d in fleet.daemons:
        (d.base_dir / "etc").mkdir()
        (d.base_dir / "etc" / "motd").write_text("hello from %s\n" % d.name)
    dest = tmp_path / "out"
    dest.mkdir()
    proc = run_cli("fetch", "-w", fleet.nodeset, "--port", port, "/etc/motd", str(dest))
    assert proc.returncode == 0, proc.stderr
    assert b"PASS: 127.0.0.[2-3] (2) changed: 127.0.0.[2-3] (2)" in proc.stdout
    assert (dest / "127.0.0.3" / "motd").read_text() == "hello from 127.0.0.3\n"
    for args, message in [
        (("etc/motd", str(dest)), b"absolute"),
        (("/etc/", str(dest)), b"absolute path of a file"),
        (("/etc/motd", str(tmp_path / "nowhere")), b"does not exist"),
        (("/etc/motd", str(dest), "--chunk-size", "9m"), b"chunk size"),
    ]:
        proc = run_cli("fetch", "-w", fleet.nodeset, "--port", port, *args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    proc = run_cli("fetch", "-w", "cn[1-", "--port", port, "/etc/motd", str(dest))
    assert proc.returncode == 2 and b"bad node set" in proc.stderr
    assert all(d.alive() for d in fleet.daemons)


def test_fetch_path_escapes_are_refused(fleet_factory, tmp_path):
    fleet = fleet_factory(2)
    secret = tmp_path / "secret"
    secret.write_text("not yours")
    for d in fleet.daemons:
        (d.base_dir / "data").mkdir()
        (d.base_dir / "data" / "link").symlink_to(secret)
        (d.base_dir / "data" / "dirlink").symlink_to(tmp_path)
    c = rclient.Client(port=fleet.port)
    dest = tmp_path / "out"
    dest.mkdir()
    for src, message in [("/../secret", "escapes the base directory"),
                         ("/data/../../secret", "escapes the base directory"),
                         ("/data/link", "outside the base directory"),
                         ("/data/dirlink/secret", "outside the base directory"),
                         ("/data", "is a directory")]:
        out = c.fetch(fleet.names, src, str(dest))
        assert all(o.status is Status.FAILED and message in o.error for o in out.values()), (src, out)
    assert files(dest) == []
    try:
        c.fetch(fleet.names, "data/f", str(dest))
        raise AssertionError("a relative source was sent")
    except rclient.ClientError as exc:
        assert "absolute" in str(exc)


def test_fetch_to_own_paths_with_own_sources(fleet_factory, tmp_path):
    """The lower-level form (the coordinator's): each node its own source, each file its own path."""
    fleet = fleet_factory(3)
    for d in fleet.daemons:
        (d.base_dir / "home" / d.name).mkdir(parents=True)
        (d.base_dir / "home" / d.name / "result").write_text(d.name)
    sources = {n: "/home/%s/result" % n for n in fleet.names}
    outs = {n: str(tmp_path / ("%s.txt" % n)) for n in fleet.names}
    out = rclient.Client(port=fleet.port).fetch_to(fleet.names, sources, outs, width=1)
    for name in fleet.names:
        assert out[name].status is Status.PASS and out[name].dest == outs[name], out[name]
        assert open(outs[name]).read() == name


def test_relay_dies_mid_fetch_subtree_is_redispatched(fleet_factory, tmp_path):
    fleet = fleet_factory(6)
    digests = put(fleet, size_of=lambda i: 48 * MIB + i)
    dest = tmp_path / "out"
    dest.mkdir()
    results = {}

    def run():
        c = rclient.Client(port=fleet.port, connect_timeout=2)
        results.update(c.fetch(fleet.names, "/data/f", str(dest), width=1))

    t = threading.Thread(target=run)
    t.start()
    # A chain .2 -> .3 -> ... -> .7: kill .4 once chunks of .6 have reached the controller.
    victim = fleet.by_name("127.0.0.4")
    downstream = dest / "127.0.0.6"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (downstream.exists() and any(downstream.iterdir())):
        time.sleep(0.02)
    assert downstream.exists(), "no chunk of .6 ever arrived"
    victim.kill()
    t.join(timeout=300)
    assert not t.is_alive()
    assert results["127.0.0.4"].status is Status.UNREACHABLE
    for name in fleet.names:
        if name != "127.0.0.4":
            # .5-.7 started again from their first chunk through .3.
            assert results[name].status is Status.PASS, (name, results[name])
            assert sha_of(dest / name / "f") == digests[name]
    assert files(dest) == sorted("%s/f" % n for n in fleet.names if n != "127.0.0.4")


def test_interrupted_fetch_leaves_no_partial_file(fleet_factory, tmp_path):
    fleet = fleet_factory(3)
    sparse(fleet, 256 * MIB)
    dest = tmp_path / "out"
    dest.mkdir()
    for sig in (signal.SIGINT, signal.SIGKILL):
        proc = subprocess.Popen(RELAYTREE + ["fetch", "--insecure", "-w", fleet.nodeset, "--port", str(fleet.port),
                                             "--width", "1", "/data/f", str(dest)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not files(dest):
            time.sleep(0.02)
        assert files(dest), "the fetch never started writing"
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
        landed = [f for f in files(dest) if not os.path.basename(f).startswith(".")]
        assert landed == [], landed  # never a partial file under the final name
        if sig == signal.SIGINT:
            assert proc.returncode == 130 and b"interrupted" in err
            assert files(dest) == []  # and not even a temporary one
        for f in files(dest):
            os.unlink(dest / f)
    # The nodes noticed, cleaned up and serve the next fetch.
    out = rclient.Client(port=fleet.port).fetch(fleet.names, "/data/f", str(dest), width=1)
    assert all(o.status is Status.PASS and o.size == 256 * MIB for o in out.values()), out
    assert all(d.alive() for d in fleet.daemons)


# Bound on peak RSS (VmHWM) during a 1 GiB fetch through relays (8 nodes x 128 MiB, width 2):
# relays keep at most `chunk_window` chunk frames of their subtree plus what gRPC holds per
# stream (1 MiB HTTP/2 windows); the controller writes each chunk as it comes.  Measured
# here on a loaded machine: relays 68-97 MiB (idle 58), controller 63-76 MiB, the same
# for 8 x 512 MiB (relays 68-104 MiB): it does not grow with the file size.
RSS_BOUND_MIB = 128


def test_memory_is_bounded_during_1gib_fetch(fleet_factory, tmp_path):
    fleet = fleet_factory(8)
    sparse(fleet, 128 * MIB)
    dest = tmp_path / "out"
    dest.mkdir()
    # VmHWM, not ru_maxrss: the latter starts at the RSS of the (v)forking pytest process.
    code = ("import json; from relaytree import client as c; "
            "r = c.Client(port=%d).fetch(%r, '/data/f', %r, width=2); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]; "
            "print(json.dumps([sum(o.ok for o in r.values()), int(hwm)]))" % (fleet.port, fleet.names, str(dest)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    passed, controller = json.loads(proc.stdout)
    assert passed == 8
    relay = max(d.rss_kib() for d in fleet.daemons)
    print("peak RSS: relay %.0f MiB, controller %.0f MiB" % (relay / 1024, controller / 1024))
    assert relay < RSS_BOUND_MIB * 1024, "relay RSS %d KiB exceeds %d MiB" % (relay, RSS_BOUND_MIB)
    assert controller < RSS_BOUND_MIB * 1024, "controller RSS %d KiB exceeds %d MiB" % (controller, RSS_BOUND_MIB)
    zeros = hashlib.sha256(b"\0" * (128 * MIB)).hexdigest()
    assert sha_of(dest / fleet.names[-1] / "f") == zeros
