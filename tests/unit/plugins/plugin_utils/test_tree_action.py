"""plugin_utils/_tree_action.py: NodeOutcome dicts (from the coordinator) -> Ansible results."""

from __future__ import annotations

import datetime

import pytest

from ansible_collections.hpc.relaytree.plugins.plugin_utils._tree_action import (
    copy_result,
    exec_result,
    ping_result,
    unreachable_result,
)

NOW = datetime.datetime(2025, 1, 31, 12, 0, 0)


def outcome(**kw):
    base = {"node": "cn1", "status": "PASS", "rc": 0, "stdout": "", "stderr": "", "changed": True, "elapsed": 0.25}
    base.update(kw)
    return base


def test_exec_pass():
    r = exec_result(outcome(stdout="a\nb\n\n", stderr="warn\n"), "cmd", now=NOW)
    assert r["stdout"] == "a\nb" and r["stdout_lines"] == ["a", "b"]
    assert r["stderr"] == "warn" and r["stderr_lines"] == ["warn"]
    assert r["rc"] == 0 and r["changed"] is True and "failed" not in r and r["msg"] == ""
    assert r["end"] == str(NOW) and r["delta"] == "0:00:00.250000" and r["cmd"] == "cmd"


def test_exec_no_strip():
    r = exec_result(outcome(stdout="a\n"), ["echo", "a"], strip_empty_ends=False, now=NOW)
    assert r["stdout"] == "a\n" and r["cmd"] == ["echo", "a"]


def test_exec_nonzero_fails_with_rc():
    r = exec_result(outcome(status="FAILED", rc=3, stderr="boom", error="exit status 3"), "false", now=NOW)
    assert r["failed"] is True and r["rc"] == 3 and r["stderr"] == "boom"
    assert r["msg"].startswith("The command exited with a non-zero return code.")


def test_exec_not_started():
    r = exec_result(outcome(status="FAILED", rc=None, error="unknown user 'nobody2'"), "id", now=NOW)
    assert r["failed"] is True and r["rc"] is None and r["msg"] == "unknown user 'nobody2'"


def test_exec_timeout():
    r = exec_result(outcome(status="TIMEOUT", rc=None, error="killed after 5 s", stdout="partial"), "sleep 9", now=NOW)
    assert r["failed"] is True and r["msg"] == "The command timed out: killed after 5 s" and r["stdout"] == "partial"


def test_exec_truncated_flags():
    r = exec_result(outcome(stdout="x" * 10, stdout_truncated=True), "yes", now=NOW)
    assert r["stdout_truncated"] is True and "stderr_truncated" not in r


@pytest.mark.parametrize("fn", [lambda o: exec_result(o, "x"), lambda o: copy_result(o, {}, "/d"), ping_result])
def test_unreachable_everywhere(fn):
    r = fn(outcome(status="UNREACHABLE", rc=None, error="connection refused"))
    assert r == {"unreachable": True, "changed": False, "msg": "relaytree: cn1 unreachable: connection refused"}
    assert r == unreachable_result(outcome(status="UNREACHABLE", error="connection refused"))


def test_copy_results():
    op = {"checksum": "da39a3ee", "size": 0}
    assert copy_result(outcome(changed=False, dest="/d/f"), op, "/d/") == {
        "changed": False, "dest": "/d/f", "checksum": "da39a3ee", "size": 0}
    failed = copy_result(outcome(status="FAILED", changed=False, error="no space left"), op, "/d/f")
    assert failed["failed"] is True and failed["msg"] == "no space left" and failed["dest"] == "/d/f"
    assert "checksum" not in copy_result(outcome(), {"checksum": None}, "/x")


def test_ping_results():
    ping = {"version": "0.1.0", "protocol_version": 1, "hostname": "h", "uptime": 1.0, "load": [0, 0, 0]}
    assert ping_result(outcome(ping=ping, changed=False)) == dict(ping, ping="pong", changed=False)
    r = ping_result(outcome(status="FAILED", error="version mismatch"))
    assert r["failed"] is True and r["msg"] == "version mismatch"
