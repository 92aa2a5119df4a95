"""Fixtures: real relay daemons on 127.0.0.N and real ansible-playbook runs against them.

The daemon bits are those of tests/engine/conftest.py (copied: the two test trees
stay independent). Each daemon runs with --base-dir, so a request path /data/f
lands at BASE/data/f and cwd "/" is BASE.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
RELAYTREE = [sys.executable, "-m", "relaytree.cli"]
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")


@dataclass
class Daemon:
    name: str
    port: int
    base_dir: Path
    log_path: Path
    pki: Optional[Path] = None  # None: --insecure
    proc: Optional[subprocess.Popen] = None
    _log: object = field(default=None, repr=False)

    def start(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        if self.pki is None:
            security = ["--insecure"]
        else:  # mutual TLS and signed requests, as in production
            config = self.base_dir.parent / (self.name + ".toml")
            config.write_text('[tls]\ncert = "%s"\nkey = "%s"\nca = "%s"\n\n[auth]\ntrusted_keys = ["%s"]\n' % (
                self.pki / "nodes" / (self.name + ".crt"), self.pki / "nodes" / (self.name + ".key"),
                self.pki / "ca.crt", self.pki / "signing" / "controller.pub"))
            security = ["--config", str(config)]
        self.proc = subprocess.Popen(
            RELAYTREE + ["serve", "--listen", "%s:%d" % (self.name, self.port), "--base-dir", str(self.base_dir),
                         "--state-dir", str(self.base_dir.parent / (self.name + ".state")),
                         "--log-level", "info"] + security,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.alive():
                raise RuntimeError("daemon %s exited: %s" % (self.name, self.log_path.read_text()))
            try:
                socket.create_connection((self.name, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("daemon %s not listening after %.0fs" % (self.name, timeout))

    def stop(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        if self._log is not None:
            self._log.close()


def free_port(hosts: List[str]) -> int:
    """A port free on every address of the fleet (its daemons share one port)."""
    for _ in range(100):
        port = random.randint(20000, 40000)
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


class Fleet:
    """Daemons on 127.0.0.2 ... 127.0.0.(count+1), one port, each with its own base dir.

    With ``pki`` (a key directory from ``relaytree keys init``) they run secure, else --insecure.
    """

    def __init__(self, tmp: Path, count: int, pki: Optional[Path] = None):
        names = ["127.0.0.%d" % n for n in range(2, count + 2)]
        self.port = free_port(names)
        self.pki = pki
        self.daemons = [Daemon(name, self.port, tmp / ("n" + name.rsplit(".", 1)[1]),
                               tmp / ("n%s.log" % name.rsplit(".", 1)[1]), pki) for name in names]

    @property
    def names(self) -> List[str]:
        return [d.name for d in self.daemons]

    def base(self, name: str) -> Path:
        return next(d.base_dir for d in self.daemons if d.name == name)

    def start(self) -> "Fleet":
        for d in self.daemons:
            d.start()
        for d in self.daemons:
            d.wait_ready()
        return self

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from relaytree import keys  # cryptography: test side only
    path = tmp_path_factory.mktemp("pki")
    keys.setup(path, "127.0.0.[2-17]")
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, pki):
    """16 secure daemons (mutual TLS, signed requests)."""
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), 16, pki).start()
    yield fleet
    fleet.stop()


@pytest.fixture
def insecure_fleet(tmp_path):
    fleet = Fleet(tmp_path / "insecure", 4).start()
    yield fleet
    fleet.stop()


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    stats: Dict
    coordinator_log: str

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def recap(self) -> Dict[str, Dict[str, int]]:
        """Per-host PLAY RECAP counts (standard, one line per host)."""
        out = {}
        for line in self.proc.stdout.split("PLAY RECAP")[-1].splitlines():
            m = re.match(r"^(\S+)\s+:\s+(.*)$", line)
            if m:
                out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
        return out

    def operations(self, name: str) -> int:
        """Tree operations the coordinator ran for the task(s) with this name."""
        return sum(t["operations"] for t in self.stats.get("tasks", {}).values() if t["name"] == name)


class Ansible:
    """Runs ansible-playbook with the working tree installed as the hpc.relaytree collection."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        collections = tmp / "collections" / "ansible_collections" / "hpc"
        collections.mkdir(parents=True)
        (collections / "relaytree").symlink_to(ROOT)
        self.collections_path = str(tmp / "collections")
        self.coord_dir = tmp / "coord"
        self.coord_dir.mkdir(mode=0o700)
        self.runs = 0

    def inventory(self, names: List[str], port: int, **group_vars) -> Path:
        """Hosts named by their address, reached over the relay tree; local connection for the rest."""
        hosts = {name: {"ansible_host": name} for name in names}
        inv = {"all": {"hosts": hosts, "vars": dict({"ansible_connection": "local", "relaytree_port": port,
                                                     "ansible_python_interpreter": sys.executable}, **group_vars)}}
        path = self.tmp / ("inventory%d.json" % self.runs)
        path.write_text(json.dumps(inv))
        return path

    def run(self, playbook: str, inventory: Path, *args: str, env: Optional[Dict[str, str]] = None,
            timeout: float = 600) -> Run:
        self.runs += 1
        book = self.tmp / ("playbook%d.yml" % self.runs)
        book.write_text(playbook)
        stats_file = self.tmp / ("stats%d.json" % self.runs)
        environ = dict(os.environ)
        environ.update({
            "ANSIBLE_COLLECTIONS_PATH": self.collections_path,
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_HOST_KEY_CHECKING": "0",
            "ANSIBLE_LOCAL_TEMP": str(self.tmp / "ansible-tmp"),
            "ANSIBLE_DEPRECATION_WARNINGS": os.environ.get("ANSIBLE_DEPRECATION_WARNINGS", "0"),
            "RELAYTREE_COORDINATOR_DIR": str(self.coord_dir),
            "RELAYTREE_COORDINATOR_STATS": str(stats_file),
            # Without the tree strategy, batches are guessed with this idle gap: the 0.3 s
            # default splits them on a loaded machine; the tests check merging, not the guess.
            "RELAYTREE_COORDINATOR_GAP": "2",
        })
        environ.update(env or {})
        proc = subprocess.run([ANSIBLE_PLAYBOOK, "-i", str(inventory), str(book)] + list(args),
                              capture_output=True, text=True, timeout=timeout, env=environ, cwd=str(self.tmp))
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        logs = sorted(self.coord_dir.glob("*.log"), key=lambda p: p.stat().st_mtime)
        coordinator_log = logs[-1].read_text() if logs else ""
        if stats.get("pid"):
            reap_coordinator(stats["pid"])
        return Run(proc, stats, coordinator_log)


def reap_coordinator(pid: int, grace: float = 10.0) -> None:
    """The coordinator exits once its playbook is gone; kill it if it does not (and fail)."""
    end = time.monotonic() + grace
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if _is_zombie(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("coordinator %d still running %.0f s after its playbook ended" % (pid, grace))


def _is_zombie(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture(scope="module")
def ansible(tmp_path_factory):
    return Ansible(tmp_path_factory.mktemp("ansible"))
