"""The committed protobuf stubs must match proto/ (regenerate with `make proto`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I%s" % (ROOT / "proto"),
                    "--python_out=%s" % tmp_path, "--pyi_out=%s" % tmp_path,
                    str(ROOT / "proto/relaytree/v1/relaytree.proto")], check=True)
    for name in ("relaytree_pb2.py", "relaytree_pb2.pyi"):
        fresh = (tmp_path / "relaytree/v1" / name).read_text()
        committed = (ROOT / "src/relaytree/v1" / name).read_text()
        assert fresh == committed, "src/relaytree/v1/%s is stale: run `make proto`" % name


def test_versions_agree():
    import relaytree
    galaxy = (ROOT / "galaxy.yml").read_text()
    assert "version: %s" % relaytree.__version__ in galaxy
