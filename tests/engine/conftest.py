"""Fixtures: real relay daemons as subprocesses on loopback addresses 127.0.0.N."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from localfleet import RELAYTREE, Daemon, Fleet  # noqa: E402,F401


@pytest.fixture
def fleet_factory(tmp_path):
    fleets: List[Fleet] = []

    def make(count: int, **kw) -> Fleet:
        fleet = Fleet(tmp_path / ("fleet%d" % len(fleets)), count, **kw)
        fleets.append(fleet)
        return fleet.start()

    yield make
    for fleet in fleets:
        fleet.stop()


def run_cli(*args: str, input: Optional[bytes] = None, timeout: float = 120) -> subprocess.CompletedProcess:
    args = list(args)
    if args and args[0] in ("exec", "copy", "ping", "fetch"):
        args.insert(1, "--insecure")  # these fleets run --insecure daemons
    return subprocess.run(RELAYTREE + args, input=input, capture_output=True, timeout=timeout)
