"""End to end: role hpc.relaytree.relay through playbooks/deploy.yml on a simulated cluster.

Four simulated nodes (tools/simcluster: network namespaces with their own sshd, air-gapped),
reached by Ansible over SSH, deployed in wheelhouse mode. In file order:

1. a wrong variable type is rejected by the argument spec with a clear message;
2. a node whose sshd does not answer is reported unreachable while the others deploy;
3. with that node back, a second deploy brings it up; a third run changes nothing anywhere;
4. the daemons serve: ``relaytree ping --pki`` through a width-2 tree answers from all nodes,
   a plaintext client is refused, a killed daemon is restarted by its supervisor; insecure
   mode (``-e relay_insecure=true``) and back, while ``-e relay_insecure=false`` changes nothing;
5. check mode on the deployed nodes fails nothing and changes nothing;
6. ``relay_state=absent`` leaves no process, unit, venv, configuration or key behind, and
   check mode on the now fresh nodes fails nothing and writes nothing;
7. ``ansible-lint --profile production`` passes on roles/ and playbooks/ without network.

The wheelhouse is downloaded once into the controller cache (~/.cache/relaytree, or
$RELAYTREE_TEST_CACHE) and reused by later runs.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "simcluster"))
import simcluster  # noqa: E402
from conftest import parse_recap  # noqa: E402

BIN = Path(sys.executable).parent
COLLECTION_CONTENT = ("galaxy.yml", "meta", "plugins", "roles", "playbooks", "src", "pyproject.toml", "README.md",
                      "LICENSE")
NODES = 4
_TOOLS = ("ip", "tc", "unshare", "nsenter", "setpriv", "ssh", "ssh-keygen")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                       reason="simcluster needs Linux and root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in _TOOLS) or not os.access("/usr/sbin/sshd", os.X_OK),
                       reason="simcluster needs iproute2, util-linux, openssh-server/client"),
    pytest.mark.skipif(not (BIN / "ansible-playbook").exists(), reason="ansible-core is not installed"),
]


def _prefix(n: int) -> str:
    """A node name prefix that no other simulated cluster on this machine uses."""
    text = Path("/etc/hosts").read_text()
    names = {tok for line in text.splitlines() for tok in line.split("#", 1)[0].split()[1:]}
    for prefix in ("rcn", "rtn", "rrn", "rqn"):
        if not {f"{prefix}{i}" for i in range(1, n + 1)} & names:
            return prefix
    pytest.skip("node names taken by other simulated clusters")


class Run:
    def __init__(self, proc: subprocess.CompletedProcess, seconds: float):
        self.proc, self.seconds = proc, seconds

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def recap(self) -> Dict[str, Dict[str, int]]:
        return parse_recap(self.proc.stdout)


class Site:
    """The simulated cluster plus everything a controller needs to deploy to it."""

    def __init__(self, cluster: simcluster.Cluster, tmp: Path):
        self.cluster, self.tmp = cluster, tmp
        self.names = [name for name, _addr in cluster.nodes]
        self.pki = tmp / "pki"
        # A snapshot of the collection, as an installed one would be: other work on the tree
        # during the test must not change what the role deploys between two runs.
        collection = tmp / "collections" / "ansible_collections" / "hpc" / "relaytree"
        collection.mkdir(parents=True)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for item in COLLECTION_CONTENT:
            src = ROOT / item
            if src.is_dir():
                shutil.copytree(src, collection / item, ignore=ignore)
            elif src.exists():
                shutil.copy2(src, collection / item)
        self.collection = collection
        self.coord = tmp / "coord"
        self.coord.mkdir(mode=0o700)
        self.control = tmp / "cp"
        self.control.mkdir(mode=0o700)
        # The default group of deploy.yml is "relaytree".
        text = Path(cluster.inventory_path).read_text().replace("[compute]", "[relaytree]")
        self.inventory = tmp / "inventory.ini"
        self.inventory.write_text(text)
        self.timings: Dict[str, float] = {}
        self.env = dict(os.environ)
        self.env.update({
            "ANSIBLE_COLLECTIONS_PATH": str(tmp / "collections"),
            "ANSIBLE_STDOUT_CALLBACK": "default",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_PIPELINING": "1",
            "ANSIBLE_FORKS": str(2 * NODES),
            "ANSIBLE_TIMEOUT": "10",
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.control),
            "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
            "RELAYTREE_PKI": str(self.pki),
            "RELAYTREE_COORDINATOR_DIR": str(self.coord),
            "RELAYTREE_COORDINATOR_STATS": str(tmp / "coordinator-stats.json"),
        })
        if os.environ.get("RELAYTREE_TEST_CACHE"):
            self.env["XDG_CACHE_HOME"] = os.environ["RELAYTREE_TEST_CACHE"]

    def play(self, *args: str, label: str = "", timeout: float = 600) -> Run:
        stats = Path(self.env["RELAYTREE_COORDINATOR_STATS"])
        if stats.exists():
            stats.unlink()
        t0 = time.monotonic()
        playbook = self.collection / "playbooks" / "deploy.yml"
        proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(self.inventory), str(playbook)] + list(args),
                              capture_output=True, text=True, timeout=timeout, env=self.env, cwd=str(self.tmp))
        run = Run(proc, time.monotonic() - t0)
        if label:
            self.timings[label] = round(run.seconds, 1)
        self._stop_coordinator(stats)
        return run

    def _stop_coordinator(self, stats: Path) -> None:
        """The coordinator (started by tree_ping) exits after its playbook; make sure of it."""
        try:
            pid = json.loads(stats.read_text()).get("pid")
        except (OSError, ValueError):
            return
        if not pid:
            return
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                with open("/proc/%d/stat" % pid) as fh:
                    if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                        return
            except OSError:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)

    def relaytree(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        env = dict(self.env, PYTHONPATH=str(self.collection / "src"))
        return subprocess.run([sys.executable, "-m", "relaytree.cli"] + list(args), capture_output=True, text=True,
                              timeout=timeout, env=env)

    def node(self, name: str, command: str) -> subprocess.CompletedProcess:
        return self.cluster.exec(name, command, timeout=60)

    def close(self) -> None:
        for sock in self.control.iterdir():  # Ansible's persistent ssh connections
            subprocess.run(["ssh", "-O", "exit", "-o", "ControlPath=%s" % sock, "node"], capture_output=True,
                           timeout=10, check=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    name = "rr" + secrets.token_hex(3)
    cluster = simcluster.Cluster(name, nodes=NODES, prefix=_prefix(NODES), subnet="auto")
    cluster.up()
    site = None
    try:
        site = Site(cluster, tmp_path_factory.mktemp("role"))
        yield site
    finally:
        if site is not None:
            site.close()
            print("\nrole timings (s): %s" % json.dumps(site.timings))
        cluster.down()


def _ok(run: Run, hosts: List[str]) -> Dict[str, Dict[str, int]]:
    recap = run.recap()
    assert set(hosts) <= set(recap), run.output[-4000:]
    for host in hosts:
        assert recap[host]["failed"] == 0 and recap[host]["unreachable"] == 0, run.output[-6000:]
    return recap


def test_argument_spec_rejects_wrong_types(site):
    run = site.play("-e", "relay_port=not-a-port", "-e", "relay_health_check=maybe",
                    "-e", "relay_install_mode=carrier-pigeon")
    assert run.proc.returncode != 0
    out = run.output
    assert "Validation of arguments failed" in out, out[-3000:]
    assert re.search(r"relay_port.*int", out), out[-3000:]
    assert re.search(r"relay_health_check.*bool", out), out[-3000:]
    assert "relay_install_mode" in out and "carrier-pigeon" in out, out[-3000:]
    # Nothing was done on the nodes.
    assert "Probe the node" not in out


def test_unreachable_node_does_not_stop_the_others(site):
    *up, down = site.names
    init = site.cluster.pids[down]
    os.kill(init, signal.SIGSTOP)  # the node's sshd (its pid 1) accepts nothing any more
    try:
        run = site.play(label="deploy %d fresh nodes, 1 unreachable" % len(up))
    finally:
        os.kill(init, signal.SIGCONT)
    recap = run.recap()
    assert recap[down]["unreachable"] == 1, run.output[-4000:]
    _ok(run, up)
    for host in up:
        assert recap[host]["changed"] > 0
    # The health check (tree_ping) ran for the deployed ones.
    assert "Check that every daemon answers through the tree" in run.proc.stdout


def test_deploy_then_second_run_changes_nothing(site):
    run = site.play(label="deploy: the missing node")
    recap = _ok(run, site.names)
    assert recap[site.names[-1]]["changed"] > 0
    run = site.play(label="second run, %d nodes" % NODES)
    recap = _ok(run, site.names)
    assert all(recap[h]["changed"] == 0 for h in site.names), run.output[-6000:]


def test_daemons_serve_through_the_tree(site):
    nodes = ",".join(site.names)
    proc = site.relaytree("ping", "-w", nodes, "--pki", str(site.pki), "--width", "2", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert {n: r["status"] for n, r in result["nodes"].items()} == {n: "PASS" for n in site.names}
    proc = site.relaytree("exec", "-w", nodes, "--pki", str(site.pki), "--json", "--", "hostname")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {n: r["stdout"].strip() for n, r in json.loads(proc.stdout)["nodes"].items()} == {n: n for n in site.names}
    # Secure daemons refuse a plaintext, unsigned client.
    proc = site.relaytree("ping", "-w", site.names[0], "--insecure", "--connect-timeout", "3", "--deadline", "10")
    assert proc.returncode != 0


def test_supervisor_restarts_a_dead_daemon(site):
    node = site.names[1]

    def daemon_pid():
        state = site.node(node, "cat /run/relaytree/relaytreed.pid.json").stdout
        return json.loads(state)["child_pid"] if state else None

    before = daemon_pid()
    assert before and "relaytree.cli serve" in site.node(node, "cat /proc/%d/cmdline | tr '\\0' ' '" % before).stdout
    site.node(node, "kill -9 %d" % before)
    end = time.monotonic() + 20
    while time.monotonic() < end:
        after = daemon_pid()
        if after and after != before:
            proc = site.relaytree("ping", "-w", node, "--pki", str(site.pki))
            if proc.returncode == 0:
                break
        time.sleep(0.5)
    else:
        pytest.fail("the daemon on %s was not restarted: %s" % (node, site.node(node, "tail -20 /var/log/relaytree/relaytreed.log").stdout))


def test_insecure_mode_round_trip(site):
    nodes = ",".join(site.names)
    # Booleans typed on the command line are strings: "false" must stay false.
    run = site.play("-e", "relay_insecure=false")
    recap = _ok(run, site.names)
    assert all(recap[h]["changed"] == 0 for h in site.names), run.output[-6000:]

    run = site.play("-e", "relay_insecure=true", label="switch to insecure, %d nodes" % NODES)
    _ok(run, site.names)
    assert "[WARNING] relay_insecure is true" in run.proc.stdout
    assert site.relaytree("ping", "-w", nodes, "--insecure").returncode == 0
    assert site.relaytree("ping", "-w", nodes, "--pki", str(site.pki), "--connect-timeout", "3",
                          "--deadline", "15").returncode != 0

    run = site.play(label="back to secure, %d nodes" % NODES)
    _ok(run, site.names)
    proc = site.relaytree("ping", "-w", nodes, "--pki", str(site.pki))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_mode_on_deployed_nodes(site):
    run = site.play("--check", label="check mode, %d nodes" % NODES)
    recap = _ok(run, site.names)
    assert all(recap[h]["changed"] == 0 for h in site.names), run.output[-6000:]


def test_absent_removes_everything(site):
    run = site.play("-e", "relay_state=absent", label="absent, %d nodes" % NODES)
    _ok(run, site.names)
    for node in site.names:
        ps = site.node(node, "ps -eo args").stdout
        assert "relaytree" not in ps, ps
        # /etc/relaytree and /var/lib/relaytree are mount points in a simulated node: emptied, not removed.
        left = site.node(node, "for p in /etc/systemd/system/relaytreed.service /opt/relaytree /etc/relaytree/pki "
                               "/etc/relaytree/relaytree.toml /run/relaytree /var/log/relaytree; do "
                               "test -e $p && echo $p; done; find /var/lib/relaytree /etc/relaytree -mindepth 1")
        assert left.stdout.strip() == "", "%s: %s" % (node, left.stdout)
    run = site.play("-e", "relay_state=absent")
    recap = _ok(run, site.names)
    assert all(recap[h]["changed"] == 0 for h in site.names), run.output[-6000:]


def test_check_mode_on_fresh_nodes(site):
    """After absent the nodes are fresh again: --check reports what it would do and fails nothing."""
    run = site.play("--check", label="check mode, %d fresh nodes" % NODES)
    recap = _ok(run, site.names)
    assert all(recap[h]["changed"] > 0 for h in site.names), run.output[-6000:]
    assert "would install relaytree" in run.proc.stdout
    left = site.node(site.names[0], "find /opt /etc/relaytree /var/lib/relaytree -mindepth 1")
    assert left.stdout.strip() == "", left.stdout


def test_ansible_lint_production_offline(tmp_path):
    lint = BIN / "ansible-lint"
    if not lint.exists():
        pytest.skip("ansible-lint is not installed (requirements-dev.txt)")
    collections = tmp_path / "collections" / "ansible_collections" / "hpc"
    collections.mkdir(parents=True)
    (collections / "relaytree").symlink_to(ROOT)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(tmp_path / "collections"), NO_COLOR="1",
               ANSIBLE_HOME=str(tmp_path / "ansible-home"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    argv = [str(lint), "--offline", "--profile", "production", "roles/", "playbooks/"]
    if os.geteuid() == 0 and shutil.which("unshare"):
        argv = ["unshare", "--net", "--"] + argv  # no network at all: proves it downloads nothing
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Passed" in proc.stdout + proc.stderr
