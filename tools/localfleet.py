"""Local fleets of relay daemons: N real `relaytree serve` processes on 127.0.0.N.

Used by the engine tests and the benchmarks (one machine, many loopback addresses,
one port, a base dir per daemon so their files do not collide).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

RELAYTREE = [sys.executable, "-m", "relaytree.cli"]


@dataclass
class Daemon:
    name: str
    port: int
    base_dir: Path
    log_path: Path
    extra_args: List[str] = field(default_factory=list)
    insecure: bool = True
    confined: bool = True  # run with --base-dir base_dir (else request paths are real paths)
    proc: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return "%s:%d" % (self.name, self.port)

    def start(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            RELAYTREE + ["serve", "--listen", self.address]
            + (["--base-dir", str(self.base_dir)] if self.confined else [])
            + ["--state-dir", str(self.base_dir.parent / (self.name + ".state")), "--log-level", "info"]
            + (["--insecure"] if self.insecure else []) + self.extra_args,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=30)
        if getattr(self, "_log", None):
            self._log.close()

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

    def cpu_seconds(self) -> float:
        """User + system CPU time of the daemon so far."""
        with open("/proc/%d/stat" % self.proc.pid) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        with open("/proc/%d/status" % self.proc.pid) as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0


def secure_config(daemon: Daemon, pki: Path, extra: str = "") -> Path:
    """A daemon config with the node's TLS material and the controller's key from `pki`
    (a directory made by `relaytree keys init`); `extra` is appended (e.g. a policy)."""
    path = daemon.base_dir.parent / (daemon.name + ".toml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '[tls]\ncert = "%s"\nkey = "%s"\nca = "%s"\n\n[auth]\ntrusted_keys = ["%s"]\n%s'
        % (pki / "nodes" / (daemon.name + ".crt"), pki / "nodes" / (daemon.name + ".key"),
           pki / "ca.crt", pki / "signing" / "controller.pub", extra))
    return path


class Fleet:
    """N daemons on 127.0.0.2 ... 127.0.0.(N+1), all on one port, each with its own base dir.

    With `pki` they run secure (mutual TLS, signed requests), else with --insecure.  With
    confined=False they run without --base-dir: request paths are this machine's real paths
    (the base dirs then only hold their state and config).
    """

    def __init__(self, tmp: Path, count: int, port: Optional[int] = None, first: int = 2,
                 extra_args=(), pki: Optional[Path] = None, policy: str = "", confined: bool = True):
        self.tmp = tmp
        self.pki = pki
        names = ["127.0.0.%d" % (first + i) for i in range(count)]
        self.port = port or free_port(names)
        self.daemons = [Daemon(name, self.port, tmp / ("n" + name.rsplit(".", 1)[1]),
                               tmp / ("n%s.log" % name.rsplit(".", 1)[1]), list(extra_args),
                               confined=confined)
                        for name in names]
        if pki is not None:
            for d in self.daemons:
                d.insecure = False
                d.extra_args += ["--config", str(secure_config(d, pki, policy))]

    @property
    def nodeset(self) -> str:
        first = self.daemons[0].name.rsplit(".", 1)[1]
        last = self.daemons[-1].name.rsplit(".", 1)[1]
        return "127.0.0.[%s-%s]" % (first, last)

    @property
    def names(self) -> List[str]:
        return [d.name for d in self.daemons]

    def start(self) -> "Fleet":
        for d in self.daemons:
            d.start()
        for d in self.daemons:
            d.wait_ready()
        return self

    def stop(self) -> None:
        for d in self.daemons:
            if d.alive():
                os.kill(d.proc.pid, signal.SIGTERM)
        for d in self.daemons:
            if d.proc is not None:
                try:
                    d.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    d.kill()
            d.kill()

    def by_name(self, name: str) -> Daemon:
        return next(d for d in self.daemons if d.name == name)

    def base(self, name: str) -> Path:
        return self.by_name(name).base_dir


def free_port(hosts) -> int:
    """A port free on every address of the fleet (daemons share one port)."""
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
