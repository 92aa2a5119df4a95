"""Fixtures: real relay daemons on 127.0.0.N and real ansible-playbook runs against them.

Daemons come from tools/localfleet.py, as in the engine tests. Each runs with
--base-dir, so a request path /data/f lands at BASE/data/f and cwd "/" is BASE.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from localfleet import Fleet  # noqa: E402
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from relaytree import keys  # cryptography: test side only
    path = tmp_path_factory.mktemp("pki")
    keys.setup(path, "127.0.0.[2-17]")
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, pki):
    """16 secure daemons (mutual TLS, signed requests)."""
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), 16, pki=pki).start()
    yield fleet
    fleet.stop()


@pytest.fixture
def insecure_fleet(tmp_path):
    fleet = Fleet(tmp_path / "insecure", 4).start()
    yield fleet
    fleet.stop()


def parse_recap(stdout: str) -> Dict[str, Dict[str, int]]:
    """Per-host PLAY RECAP counts (standard, one line per host)."""
    out = {}
    for line in stdout.split("PLAY RECAP")[-1].splitlines():
        m = re.match(r"^(\S+)\s+:\s+(.*)$", line)
        if m:
            out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return out


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    stats: Dict
    coordinator_log: str

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def recap(self) -> Dict[str, Dict[str, int]]:
        return parse_recap(self.proc.stdout)

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
