"""tools/simcluster: a simulated cluster of network/uts/mount/pid namespaces with sshd per node."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIMCLUSTER = ROOT / "tools" / "simcluster" / "simcluster.py"
NODE_PYTHON = "/usr/bin/python3"  # /usr is shared with the nodes; the project dir may not be
sys.path.insert(0, str(SIMCLUSTER.parent))
import simcluster  # noqa: E402

_TOOLS = ("ip", "tc", "unshare", "nsenter", "setpriv", "ssh", "ssh-keygen")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                       reason="simcluster needs Linux and root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in _TOOLS) or not os.access("/usr/sbin/sshd", os.X_OK),
                       reason="simcluster needs iproute2, util-linux, openssh-server/client"),
]


def _unique_name() -> str:
    return "st" + secrets.token_hex(3)


def _prefix(n: int) -> str:
    """'cn' unless another cluster on this machine already uses cn1..cnN in /etc/hosts."""
    text = Path("/etc/hosts").read_text()
    names = {tok for line in text.splitlines() for tok in line.split("#", 1)[0].split()[1:]}
    for prefix in ("cn", "tcn", "ucn"):
        if not {f"{prefix}{i}" for i in range(1, n + 1)} & names:
            return prefix
    pytest.skip("node names taken by other simulated clusters")


def _netns_with_prefix(name: str) -> list:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(name + "-")]


def _link_exists(dev: str) -> bool:
    return subprocess.run(["ip", "link", "show", dev], capture_output=True, check=False).returncode == 0


def _alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _assert_gone(name: str, bridge: str, pids: list, state_dir: str) -> None:
    assert _netns_with_prefix(name) == []
    assert not _link_exists(bridge)
    assert [p for p in pids if _alive(p)] == []
    assert f"relaytree-sim {name}" not in Path("/etc/hosts").read_text()
    assert not os.path.exists(state_dir)
    assert not os.path.exists(f"/run/relaytree-sim/{name}.json")


SERVER = r"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7777))
s.listen(1)
s.settimeout(30)
conn, peer = s.accept()
conn.sendall(("%s %s" % (socket.gethostname(), peer[0])).encode())
conn.close()
"""

CLIENT = r"""
import socket, sys, time
deadline = time.time() + 15
while True:
    try:
        c = socket.create_connection((sys.argv[1], 7777), timeout=5)
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.1)
c.settimeout(10)
print(c.recv(200).decode())
"""


def test_three_nodes(tmp_path):
    name = _unique_name()
    prefix = _prefix(3)
    c = simcluster.Cluster(name, nodes=3, prefix=prefix, subnet="auto", rate="100mbit",
                           state_dir=f"/tmp/relaytree-sim-test/{name}")
    n1, n2, n3 = (f"{prefix}{i}" for i in (1, 2, 3))
    pids = []
    try:
        c.up()
        pids = [n["init_pid"] for n in c.info["nodes"]] + [n["launcher_pid"] for n in c.info["nodes"]]
        assert [node for node, _addr in c.nodes] == [n1, n2, n3]
        state = json.loads(Path(c.state_dir, "cluster.json").read_text())
        assert {n["name"]: n["init_pid"] for n in state["nodes"]} == c.pids

        # hostnames through the namespaces, and as root through each node's sshd (by name)
        for node, addr in c.nodes:
            assert c.exec(node, ["hostname"], timeout=30).stdout.strip() == node
            r = subprocess.run(["ssh", "-F", c.ssh_config_path, node, "hostname"],
                               capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
            assert (r.returncode, r.stdout.strip()) == (0, node), r.stderr
        r = subprocess.run(["ssh", "-i", c.ssh_key, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                            "-o", "ConnectTimeout=10", f"root@{n2}", "hostname"],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
        assert (r.returncode, r.stdout.strip()) == (0, n2), r.stderr
        # the node has its own pid namespace (sshd is its pid 1)
        assert c.exec(n1, ["cat", "/proc/1/comm"]).stdout.strip() == "sshd"

        # private /tmp and /opt
        marker = f"simcluster-{secrets.token_hex(4)}"
        assert c.exec(n1, f"echo hi > /tmp/{marker} && echo hi > /opt/{marker}").returncode == 0
        assert c.exec(n1, ["cat", f"/tmp/{marker}"]).stdout == "hi\n"
        assert c.exec(n2, ["test", "-e", f"/tmp/{marker}"]).returncode == 1
        assert c.exec(n2, ["test", "-e", f"/opt/{marker}"]).returncode == 1
        assert not os.path.exists(f"/tmp/{marker}") and not os.path.exists(f"/opt/{marker}")
        assert Path(c.node_dir(n1), "fs", "tmp", marker).read_text() == "hi\n"
        # /etc is a per-node overlay: writes stay in the node, /etc/relaytree exists
        assert c.exec(n1, f"touch /etc/{marker} && test -d /etc/relaytree").returncode == 0
        assert not os.path.exists(f"/etc/{marker}")

        # node to node over the bridge, by name
        # Inside a node, /tmp is private: the project's venv may not be visible there.
        server = c.popen(n1, [NODE_PYTHON, "-c", SERVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            r = c.exec(n2, [NODE_PYTHON, "-c", CLIENT, n1], timeout=40)
            assert r.returncode == 0, r.stderr
            assert r.stdout.split() == [n1, c.addresses[n2]]
            server.wait(timeout=20)
        finally:
            server.kill()
            server.wait(timeout=10)

        # killing a popen() also kills the command inside the node
        sleeper = c.popen(n3, ["sleep", "300"])
        assert c.exec(n3, ["sh", "-c", "for i in $(seq 50); do pgrep -x sleep && exit 0; sleep 0.1; done; exit 1"]
                      ).returncode == 0
        sleeper.kill()
        sleeper.wait(timeout=10)
        assert c.exec(n3, ["sh", "-c", "for i in $(seq 50); do pgrep -x sleep || exit 0; sleep 0.1; done; exit 1"]
                      ).returncode == 0

        # link cap on both ends of every veth
        for n in c.info["nodes"]:
            host_side = subprocess.run(["tc", "qdisc", "show", "dev", n["veth"]],
                                       capture_output=True, text=True, check=False).stdout
            assert "tbf" in host_side and "rate 100Mbit" in host_side
            node_side = c.exec(n["name"], ["tc", "qdisc", "show", "dev", "eth0"]).stdout
            assert "tbf" in node_side and "rate 100Mbit" in node_side

        # client files
        inv = Path(c.inventory_path).read_text()
        assert "[compute]" in inv
        for node, addr in c.nodes:
            assert f"{node} ansible_host={addr} ansible_user=root" in inv
        assert f"ansible_ssh_private_key_file={c.ssh_key}" in inv
        hosts = Path("/etc/hosts").read_text()
        assert f"# BEGIN relaytree-sim {name}" in hosts and f"{c.addresses[n3]}\t{n3}" in hosts

        c.down()
        _assert_gone(name, c.bridge, pids, c.state_dir)
        c.down()  # twice is fine
    finally:
        c.down()
    _assert_gone(name, c.bridge, pids, c.state_dir)


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(SIMCLUSTER), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_cli_roundtrip():
    name = _unique_name()
    prefix = _prefix(2)
    try:
        r = _cli("up", "--nodes", "2", "--name", name, "--prefix", prefix, "--subnet", "auto")
        assert r.returncode == 0, r.stderr
        assert "2 nodes up" in r.stdout
        state_dir = f"/tmp/relaytree-sim/{name}"
        pids = [n["init_pid"] for n in json.loads(Path(state_dir, "cluster.json").read_text())["nodes"]]

        r = _cli("up", "--nodes", "2", "--name", name, "--prefix", prefix, "--subnet", "auto")
        assert r.returncode == 2 and "already exists" in r.stderr

        r = _cli("status", "--name", name)
        assert r.returncode == 0 and "2/2 nodes alive" in r.stdout
        r = _cli("exec", "--name", name, f"{prefix}2", "--", "sh", "-c", "hostname; exit 3")
        assert (r.returncode, r.stdout.strip()) == (3, f"{prefix}2")
        r = subprocess.run(["ssh", "-F", f"{state_dir}/ssh_config", f"{prefix}1", "ssh", f"{prefix}2", "hostname"],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
        assert (r.returncode, r.stdout.strip()) == (0, f"{prefix}2"), r.stderr

        r = _cli("down", "--name", name)
        assert r.returncode == 0, r.stderr
        _assert_gone(name, f"{name}br0", pids, state_dir)
        r = _cli("down", "--name", name)
        assert r.returncode == 0 and "nothing to remove" in r.stdout
    finally:
        _cli("down", "--name", name)


def test_failed_up_cleans_up(monkeypatch):
    name = _unique_name()
    seen = {}

    def boom(self):
        seen["pids"] = [n["init_pid"] for n in self.info["nodes"]]
        seen["netns"] = _netns_with_prefix(self.name)
        raise RuntimeError("boom")

    monkeypatch.setattr(simcluster.Cluster, "_wait_sshd", boom)
    c = simcluster.Cluster(name, nodes=2, prefix=_prefix(2), subnet="auto")
    try:
        with pytest.raises(RuntimeError, match="boom"):
            c.up()
        assert len(seen["pids"]) == 2 and len(seen["netns"]) == 2
        _assert_gone(name, c.bridge, seen["pids"], c.state_dir)
    finally:
        c.down()
