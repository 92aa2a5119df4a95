"""`relaytree supervise`: start, idempotent start, restart on watched-file change and on death,
failed start reported, stop. Real `relaytree serve --insecure` daemons on 127.0.0.x."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only (flock, prctl)")]


def _port() -> int:
    for _ in range(50):
        port = random.randint(20000, 40000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.7", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


class Sup:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.pid_file = tmp / "run" / "relaytreed.pid"
        self.log_file = tmp / "log" / "relaytreed.log"
        self.watched = tmp / "watched.txt"
        self.watched.write_text("one\n")
        self.port = _port()
        self.env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))

    def run(self, *args: str, serve=True, timeout: float = 60) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "relaytree.cli", "supervise", "--pid-file", str(self.pid_file),
                "--log-file", str(self.log_file), "--stop-timeout", "10", "--min-backoff", "0.2"]
        if serve:
            argv += ["--listen", "127.0.0.7:%d" % self.port, "--state-dir", str(self.tmp / "state"), "--insecure",
                     "--watch", str(self.watched)]
        return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=timeout, env=self.env)

    def state(self) -> dict:
        return json.loads(Path(str(self.pid_file) + ".json").read_text())

    def status(self) -> dict:
        return json.loads(self.run("--status", serve=False).stdout)

    def serving(self) -> bool:
        try:
            socket.create_connection(("127.0.0.7", self.port), timeout=1).close()
            return True
        except OSError:
            return False


@pytest.fixture
def sup(tmp_path):
    s = Sup(tmp_path)
    yield s
    s.run("--stop", serve=False)
    # Belt and braces: nothing of ours may survive the test.
    try:
        pid = int(s.pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        pass


def test_start_is_idempotent_and_restarts_on_change(sup):
    first = sup.run("--detach")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "started" in first.stdout and sup.serving()
    state = sup.state()
    assert sup.status()["running"] and sup.status()["pid"] == state["pid"]

    again = sup.run("--detach")
    assert again.returncode == 0 and "already running" in again.stdout
    assert sup.state()["child_pid"] == state["child_pid"]

    sup.watched.write_text("two\n")
    changed = sup.run("--detach")
    assert changed.returncode == 0 and "restarted" in changed.stdout, changed.stdout + changed.stderr
    assert sup.state()["pid"] != state["pid"] and sup.serving()

    stop = sup.run("--stop", serve=False)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert not sup.pid_file.exists() and not sup.serving()
    assert sup.run("--status", serve=False).returncode == 3
    assert "not running" in sup.run("--stop", serve=False).stdout
    log = sup.log_file.read_text()
    assert "serving on" in log and "draining" in log


def test_dead_daemon_is_restarted(sup):
    assert sup.run("--detach").returncode == 0
    child = sup.state()["child_pid"]
    os.kill(child, signal.SIGKILL)
    end = time.monotonic() + 15
    while time.monotonic() < end:
        state = sup.state()
        if state["child_pid"] != child and sup.serving():
            break
        time.sleep(0.1)
    else:
        pytest.fail("daemon not restarted:\n" + sup.log_file.read_text())
    assert "exited with status -9" in sup.log_file.read_text()


def test_supervisor_death_takes_the_daemon_along(sup):
    assert sup.run("--detach").returncode == 0
    state = sup.state()
    os.kill(state["pid"], signal.SIGKILL)
    end = time.monotonic() + 10
    while time.monotonic() < end and Path("/proc/%d" % state["child_pid"]).exists():
        with open("/proc/%d/stat" % state["child_pid"]) as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.1)
    assert not sup.serving()
    # The lock died with the supervisor: a new one starts.
    assert sup.run("--detach").returncode == 0 and sup.serving()


def test_failed_start_is_reported(sup, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_setting = 1\n")
    proc = sup.run("--detach", "--config", str(bad))
    assert proc.returncode == 1
    assert "failed to start" in proc.stderr and "no_such_setting" in proc.stderr
    assert sup.run("--status", serve=False).returncode == 3


def test_log_rotation(sup):
    assert sup.run("--detach", "--log-max-bytes", "600", "--log-backups", "2").returncode == 0
    for _ in range(4):
        assert sup.run("--restart", "--detach", "--log-max-bytes", "600", "--log-backups", "2").returncode == 0
    logs = sorted(p.name for p in sup.log_file.parent.iterdir())
    assert logs == ["relaytreed.log", "relaytreed.log.1", "relaytreed.log.2"], logs
