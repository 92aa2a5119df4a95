"""relaytree.execute: real processes, no mocks."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import List

import pytest

import relaytree
from relaytree.execute import DEFAULT_OUTPUT_LIMIT, FAILED, PASS, TIMEOUT, ExecOutcome, run_command

IS_ROOT = os.geteuid() == 0
NOBODY_UID = 65534


# -- helpers: look at processes through /proc ---------------------------------------------

def _proc_stat(pid: int):
    """(state, ppid, pgrp) of pid, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0].decode(), int(fields[1]), int(fields[2])


def _all_pids() -> List[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def live_members(pgid: int) -> List[int]:
    """Processes of group pgid that are not zombies (orphaned zombies may never be reaped
    when PID 1 is not a real init, so they do not count as surviving)."""
    out = []
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st is not None and st[2] == pgid and st[0] not in ("Z", "X"):
            out.append(pid)
    return out


def pids_with_arg(arg: str) -> List[int]:
    """Live processes having `arg` as one of their arguments."""
    out = []
    for pid in _all_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        st = _proc_stat(pid)
        if arg.encode() in args and st is not None and st[0] not in ("Z", "X"):
            out.append(pid)
    return out


def our_zombies() -> List[int]:
    return [pid for pid in _all_pids()
            if (_proc_stat(pid) or ("", 0, 0))[:2] == ("Z", os.getpid())]


@pytest.fixture
def marker():
    """Unique `sleep` durations to find (and finally kill, by pid) a test's processes."""
    made: List[str] = []

    def make() -> str:
        made.append("100.%06d" % random.randrange(10 ** 6))
        return made[-1]

    yield make
    for m in made:  # whatever a failed test (or a by-design survivor) left behind
        for pid in pids_with_arg(m):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def wait_for_pids(arg: str, timeout: float = 5.0) -> List[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pids = pids_with_arg(arg)
        if pids:
            return pids
        await asyncio.sleep(0.02)
    raise AssertionError(f"no process with argument {arg} appeared")


# -- status and output ------------------------------------------------------------------

async def test_pass_captures_stdout_and_stderr_separately():
    out = await run_command(shell="echo out; echo err >&2")
    assert isinstance(out, ExecOutcome)
    assert (out.status, out.rc, out.error) == (PASS, 0, "")
    assert out.stdout == b"out\n"
    assert out.stderr == b"err\n"
    assert not out.stdout_truncated and not out.stderr_truncated
    assert 0 <= out.elapsed < 5


async def test_stderr_output_with_exit_0_is_pass():
    out = await run_command(shell="echo 'warning: this is fine' >&2; head -c 100000 /dev/zero >&2; exit 0")
    assert out.status == PASS and out.rc == 0 and out.error == ""
    assert out.stderr == b"warning: this is fine\n" + bytes(100000)


async def test_nonzero_exit_is_failed_with_rc():
    out = await run_command(shell="echo partial; exit 3")
    assert (out.status, out.rc) == (FAILED, 3)
    assert out.error == ""  # rc says it
    assert out.stdout == b"partial\n"
    false = await run_command(argv=["false"])
    assert (false.status, false.rc, false.error) == (FAILED, 1, "")


async def test_killed_by_signal_is_failed_with_negative_rc():
    out = await run_command(shell="kill -TERM $$; sleep 5")
    assert (out.status, out.rc) == (FAILED, -signal.SIGTERM)
    assert "SIGTERM" in out.error
    out = await run_command(argv=["sh", "-c", "kill -KILL $$"])
    assert (out.status, out.rc) == (FAILED, -signal.SIGKILL)
    assert "SIGKILL" in out.error


async def test_argv_is_not_interpreted_by_a_shell():
    out = await run_command(argv=["echo", "$HOME; false", "*", "a  b"])
    assert out.status == PASS
    assert out.stdout == b"$HOME; false * a  b\n"


async def test_shell_runs_through_bin_sh():
    out = await run_command(shell='echo abc | tr a-c x-z && printf "%s\\n" "$0"')
    assert out.status == PASS
    assert out.stdout == b"xyz\n/bin/sh\n"


@pytest.mark.parametrize("kwargs", [
    {},                                        # neither
    {"shell": "true", "argv": ["true"]},       # both
    {"argv": []},
    {"shell": ""},
    {"argv": "ls -l"},                         # a string is not an argv
    {"argv": ["echo", "a\0b"]},
    {"shell": "true", "env": {"A=B": "x"}},
    {"shell": "true", "env": {"": "x"}},
    {"shell": "true", "env": {"A": 1}},
    {"shell": "true", "timeout": 0},
    {"shell": "true", "timeout": -1},
    {"shell": "true", "output_limit": -1},
    {"shell": "true", "user": ""},
    {"shell": "true", "cwd": ""},
    {"shell": "true", "stdin": "text"},
])
async def test_api_misuse_raises_value_error(kwargs):
    with pytest.raises(ValueError):
        await run_command(**kwargs)


async def test_value_error_messages_are_clear():
    with pytest.raises(ValueError, match="exactly one of shell"):
        await run_command(shell="true", argv=["true"])
    with pytest.raises(ValueError, match="exactly one of shell"):
        await run_command()
    with pytest.raises(ValueError, match="argv= is empty"):
        await run_command(argv=[])


# -- environment, cwd ---------------------------------------------------------------------

async def test_env_is_added_on_top_of_the_daemon_environment(monkeypatch):
    monkeypatch.setenv("RELAYTREE_TEST_INHERITED", "from-daemon")
    monkeypatch.setenv("RELAYTREE_TEST_OVERRIDDEN", "old")
    out = await run_command(
        shell='printf "%s|%s|%s" "$RELAYTREE_TEST_INHERITED" "$RELAYTREE_TEST_OVERRIDDEN" "$RELAYTREE_TEST_ADDED"',
        env={"RELAYTREE_TEST_OVERRIDDEN": "new", "RELAYTREE_TEST_ADDED": "a b; c"})
    assert out.status == PASS
    assert out.stdout == b"from-daemon|new|a b; c"


async def test_env_path_is_used_to_find_the_program(tmp_path):
    tool = tmp_path / "relaytree-test-tool"
    tool.write_text("#!/bin/sh\necho tool ran\n")
    tool.chmod(0o755)
    out = await run_command(argv=["relaytree-test-tool"], env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert out.status == PASS and out.stdout == b"tool ran\n"


async def test_default_cwd_is_root_not_the_daemon_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    out = await run_command(argv=["pwd"])
    assert out.status == PASS and out.stdout == b"/\n"


async def test_cwd(tmp_path):
    (tmp_path / "here").write_text("")
    out = await run_command(shell="pwd -P; ls", cwd=str(tmp_path))
    assert out.status == PASS
    assert out.stdout == f"{os.path.realpath(tmp_path)}\nhere\n".encode()


async def test_missing_cwd_fails_and_runs_nothing(tmp_path):
    missing = tmp_path / "no" / "such dir"
    ran = tmp_path / "ran"
    out = await run_command(shell=f"touch '{ran}'", cwd=str(missing))
    assert (out.status, out.rc) == (FAILED, None)
    assert str(missing) in out.error and "No such file or directory" in out.error
    assert not ran.exists()


async def test_cwd_that_is_a_file_or_relative_fails(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    out = await run_command(argv=["true"], cwd=str(f))
    assert (out.status, out.rc) == (FAILED, None)
    assert str(f) in out.error and "Not a directory" in out.error
    out = await run_command(argv=["true"], cwd="tmp")
    assert out.status == FAILED and "tmp" in out.error and "absolute" in out.error


# -- stdin --------------------------------------------------------------------------------

async def test_stdin_is_passed_through_then_closed():
    data = bytes(range(256)) * 2000  # 512 KB: more than a pipe buffer, with NULs
    out = await run_command(argv=["cat"], stdin=data, timeout=10)
    assert out.status == PASS
    assert out.stdout == data


async def test_stdin_not_read_by_the_command_is_not_an_error():
    out = await run_command(argv=["true"], stdin=b"x" * (4 << 20), timeout=10)
    assert (out.status, out.rc, out.error) == (PASS, 0, "")
    out = await run_command(shell="exec 0<&-; sleep 0.1; echo done", stdin=b"y" * (1 << 20), timeout=10)
    assert (out.status, out.stdout) == (PASS, b"done\n")


async def test_empty_stdin_is_dev_null():
    out = await run_command(shell="readlink /proc/self/fd/0; cat", timeout=5)
    assert (out.status, out.stdout) == (PASS, b"/dev/null\n")
    assert out.elapsed < 4


# -- output limits ------------------------------------------------------------------------

async def test_big_output_is_truncated_to_the_limit_and_drained():
    out = await run_command(
        shell="head -c 5000000 /dev/zero; head -c 3000000 /dev/zero | tr '\\0' e >&2; echo end >&2",
        output_limit=1 << 20, timeout=20)
    assert out.status == PASS  # the command was never blocked on a full pipe
    assert len(out.stdout) == 1 << 20 and out.stdout_truncated
    assert len(out.stderr) == 1 << 20 and out.stderr_truncated
    assert out.stderr == b"e" * (1 << 20)


async def test_output_at_the_limit_is_not_truncated():
    out = await run_command(shell="head -c 1000 /dev/zero", output_limit=1000)
    assert len(out.stdout) == 1000 and not out.stdout_truncated
    out = await run_command(shell="head -c 1001 /dev/zero", output_limit=1000)
    assert len(out.stdout) == 1000 and out.stdout_truncated
    out = await run_command(shell="echo x", output_limit=0)
    assert out.stdout == b"" and out.stdout_truncated and out.status == PASS
    assert DEFAULT_OUTPUT_LIMIT == 1 << 20


async def test_memory_stays_bounded_for_a_huge_output():
    tracemalloc.start()
    try:
        out = await run_command(shell="yes | head -c 150000000", output_limit=64 << 10, timeout=30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.status == PASS and out.stdout_truncated
    assert out.stdout == b"y\n" * (32 << 10)
    assert peak < 8 << 20, f"peak Python memory {peak} bytes for 150 MB of output"


# -- timeout, process group -----------------------------------------------------------------

async def test_timeout_kills_the_whole_process_group(marker):
    bg, fg = marker(), marker()
    out = await run_command(shell=f"echo $$; echo started >&2; sleep {bg} & sleep {fg}", timeout=1)
    assert (out.status, out.rc) == (TIMEOUT, None)
    assert "timed out after 1.0s" in out.error
    assert 1.0 <= out.elapsed < 3.0
    assert out.stderr == b"started\n"  # output captured up to the timeout is kept
    pgid = int(out.stdout.split()[0])
    assert live_members(pgid) == []
    assert pids_with_arg(bg) == [] and pids_with_arg(fg) == []
    assert pgid not in our_zombies()


async def test_timeout_sigkills_what_ignores_sigterm(marker):
    bg, fg = marker(), marker()
    out = await run_command(shell=f"echo $$; trap '' TERM; sleep {bg} & sleep {fg}; echo survived",
                            timeout=0.5, kill_grace=0.3)
    assert (out.status, out.rc) == (TIMEOUT, None)
    assert 0.8 <= out.elapsed < 2.5
    assert b"survived" not in out.stdout
    pgid = int(out.stdout.split()[0])
    assert live_members(pgid) == []
    assert pids_with_arg(bg) == [] and pids_with_arg(fg) == []


async def test_timeout_returns_promptly_when_an_escaped_process_holds_stdout(marker):
    escaped, fg = marker(), marker()
    # setsid takes `sleep` out of the process group: it survives and keeps stdout open.
    out = await run_command(shell=f"setsid sleep {escaped} & sleep {fg}", timeout=0.5)
    assert out.status == TIMEOUT
    assert out.elapsed < 0.5 + 1.0 + 0.5 + 0.5
    assert pids_with_arg(fg) == []
    assert "held open" in out.error


async def test_background_process_after_a_normal_exit_does_not_hang(marker):
    bg = marker()
    out = await run_command(shell=f"sleep {bg} & echo done")
    assert (out.status, out.rc, out.stdout) == (PASS, 0, b"done\n")
    assert out.elapsed < 3
    # By design the command's background processes are left alone on a normal exit
    # (`nohup daemon &` is legitimate); the marker fixture kills it.
    assert pids_with_arg(bg)


async def test_cancellation_kills_the_process_group_and_reaps(marker):
    bg, fg = marker(), marker()
    task = asyncio.ensure_future(run_command(shell=f"sleep {bg} & sleep {fg}"))
    pid = (await wait_for_pids(fg))[0]
    await wait_for_pids(bg)
    pgid = _proc_stat(pid)[2]
    assert pgid > 1 and live_members(pgid)
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 2.5
    assert live_members(pgid) == []
    assert pids_with_arg(bg) == [] and pids_with_arg(fg) == []
    assert pgid not in our_zombies()


async def test_cancellation_by_wait_for_kills_the_process_group(marker):
    m = marker()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(run_command(argv=["sleep", m]), 0.3)
    assert pids_with_arg(m) == []


async def test_concurrent_commands_are_independent():
    outs = await asyncio.gather(*(run_command(shell=f"sleep 0.2; echo {i}; exit {i % 3}") for i in range(20)))
    assert [o.stdout for o in outs] == [f"{i}\n".encode() for i in range(20)]
    assert [o.rc for o in outs] == [i % 3 for i in range(20)]
    assert our_zombies() == []


# -- programs -----------------------------------------------------------------------------

async def test_command_not_found_is_rc_127():
    out = await run_command(argv=["relaytree-no-such-program", "arg"])
    assert (out.status, out.rc) == (FAILED, 127)
    assert "relaytree-no-such-program" in out.error and "not found" in out.error
    out = await run_command(argv=["/no/such/dir/prog"])
    assert (out.status, out.rc) == (FAILED, 127) and "/no/such/dir/prog" in out.error
    out = await run_command(shell="relaytree-no-such-program")  # the shell's own 127
    assert (out.status, out.rc) == (FAILED, 127)


async def test_program_that_cannot_be_executed_is_rc_126(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("echo hi\n")
    plain.chmod(0o644)
    out = await run_command(argv=[str(plain)])
    assert (out.status, out.rc) == (FAILED, 126) and str(plain) in out.error
    bad = tmp_path / "bad-interpreter"
    bad.write_text("#!/no/such/interpreter\n")
    bad.chmod(0o755)
    out = await run_command(argv=["./bad-interpreter"], cwd=str(tmp_path))
    assert (out.status, out.rc) == (FAILED, 126) and "interpreter" in out.error


# -- users --------------------------------------------------------------------------------

@pytest.mark.skipif(not IS_ROOT, reason="switching user needs root")
async def test_run_as_another_user(tmp_path):
    out = await run_command(argv=["id", "-u"], user="nobody")
    assert (out.status, out.stdout) == (PASS, b"65534\n")
    out = await run_command(shell='echo "$HOME $USER $LOGNAME"; id -G; id -g', user="nobody",
                            env={"RELAYTREE_TEST": "kept"})
    assert out.status == PASS
    home = (await run_command(shell="getent passwd nobody | cut -d: -f6")).stdout.decode().strip()
    lines = out.stdout.decode().split("\n")
    assert lines[0] == f"{home} nobody nobody"
    assert lines[1] == lines[2]  # root's supplementary groups are dropped (initgroups)
    # Files it creates belong to it.
    tmp_path.chmod(0o777)
    await run_command(shell="touch made", cwd=str(tmp_path), user="nobody")
    assert (tmp_path / "made").stat().st_uid == NOBODY_UID


async def test_unknown_user_fails_and_runs_nothing(tmp_path):
    ran = tmp_path / "ran"
    out = await run_command(shell=f"touch '{ran}'", user="relaytree-no-such-user")
    assert (out.status, out.rc) == (FAILED, None)
    assert out.error == "unknown user 'relaytree-no-such-user'"
    assert not ran.exists()


_AS_NOBODY = r"""
import asyncio, json, os, sys
import relaytree.execute as ex
async def main():
    loop = asyncio.get_running_loop()
    a = await ex.run_command(argv=["id", "-u"], user="root")
    b = await ex.run_command(argv=["id", "-u"], user="nobody")
    c = await ex.run_command(argv=["id", "-u"])
    return [[o.status, o.rc, o.stdout.decode(), o.error] for o in (a, b, c)]
os.setgroups([]); os.setgid(65534); os.setuid(65534)
print(json.dumps(asyncio.run(main())))
"""


@pytest.mark.skipif(not IS_ROOT, reason="needs root to drop to nobody")
def test_a_non_root_daemon_can_only_run_as_itself():
    # A real non-root daemon: a child interpreter that imports everything, then drops to nobody.
    proc = subprocess.run([sys.executable, "-c", _AS_NOBODY], capture_output=True, timeout=30, cwd="/",
                          env=dict(os.environ, PYTHONPATH=str(Path(relaytree.__file__).parents[1])))
    assert proc.returncode == 0, proc.stderr.decode()
    as_root, as_self, plain = json.loads(proc.stdout)
    assert as_root[:2] == [FAILED, None]
    assert "root" in as_root[3] and "nobody" in as_root[3]
    assert as_self[:3] == [PASS, 0, "65534\n"]
    assert plain[:3] == [PASS, 0, "65534\n"]
