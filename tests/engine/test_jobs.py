"""relaytree.jobs: the node's job manager, with real processes, files and sqlite; no mocks.

Waits below are bounded loops on a condition (guards against a hang), never assertions on
how long something took: the machine is shared.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Callable, List, Optional

import pytest

from relaytree import jobs
from relaytree.jobs import (
    DONE,
    FAILED,
    KILLED,
    LOST,
    QUEUED,
    RUNNING,
    TIMEOUT,
    JobError,
    JobManager,
    JobSpec,
    Retention,
)

HERE = Path(__file__).resolve().parent
IS_ROOT = os.geteuid() == 0
GUARD = 60.0  # seconds a wait may take before the test is declared hung


# --------------------------------------------------------------------------- helpers


async def until(pred: Callable[[], bool], what: str = "condition", guard: float = GUARD) -> None:
    end = time.monotonic() + guard
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not reached after {guard}s")
        await asyncio.sleep(0.02)


def wait_sync(pred: Callable[[], bool], what: str = "condition", guard: float = GUARD) -> None:
    end = time.monotonic() + guard
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not reached after {guard}s")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """A live (not zombie) process with this pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def group_alive(pgid: int) -> bool:
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def is_job_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"relaytree-job:" in fh.read()
    except OSError:
        return False


def kill_job_groups(pids) -> None:
    for pid in pids:
        if pid and is_job_process(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def gate(tmp_path: Path, name: str) -> str:
    """A shell command that waits until the file `name` exists (the test opens the gate)."""
    return f"while [ ! -e {tmp_path / name} ]; do sleep 0.02; done"


def open_gate(tmp_path: Path, name: str) -> None:
    (tmp_path / name).touch()


@pytest.fixture
async def managers(tmp_path):
    """make(state_dir=..., **kw) -> started JobManager; at the end their jobs are killed, they are closed."""
    made: List[JobManager] = []

    async def make(state_dir: Optional[Path] = None, **kw) -> JobManager:
        kw.setdefault("slots", 4)
        kw.setdefault("kill_grace", 0.5)
        m = JobManager(str(state_dir or tmp_path / "state"), **kw)
        await m.start()
        made.append(m)
        return m

    yield make
    for m in made:
        if m._loop is not None and not m._closing:
            kill_job_groups([j.pid for j in m._active.values()])
            await m.close()


async def finished(m: JobManager, job_id: str):
    await until(lambda: m.get(job_id, with_output=False).finished, f"job {job_id} finished")
    return m.get(job_id)


# --------------------------------------------------------------------------- basics


async def test_submit_get_list(managers, tmp_path):
    m = await managers()
    rec, created = await m.submit(JobSpec(id="j1", shell="echo out; echo err >&2", submitter="key1",
                                          request_id="r1"))
    assert created and rec.id == "j1" and rec.state in (QUEUED, RUNNING, DONE)
    rec = await finished(m, "j1")
    assert (rec.state, rec.rc, rec.stdout, rec.stderr, rec.error) == (DONE, 0, b"out\n", b"err\n", "")
    assert rec.submitter == "key1" and rec.request_id == "r1" and rec.command == "echo out; echo err >&2"
    assert rec.submit_time <= rec.start_time <= rec.end_time and rec.pid
    await m.submit(JobSpec(id="j2", argv=["sh", "-c", "exit 3"]))
    rec = await finished(m, "j2")
    assert (rec.state, rec.rc, rec.error) == (FAILED, 3, "")
    assert rec.command == "sh -c 'exit 3'" and rec.argv == ["sh", "-c", "exit 3"]
    # Files: only the output there is (a job without output keeps no file, no directory).
    assert sorted(os.listdir(Path(m.jobs_dir) / str(_seq(m, "j1")))) == ["stderr", "stdout"]
    assert not (Path(m.jobs_dir) / str(_seq(m, "j2"))).exists()
    assert [r.id for r in m.list()] == ["j1", "j2"]
    assert [r.id for r in m.list(states=[FAILED])] == ["j2"]
    assert [r.id for r in m.list(ids=["j2", "nope", "j1"])] == ["j1", "j2"]
    assert [r.id for r in m.list(limit=1)] == ["j2"]
    assert all(r.stdout == b"" for r in m.list())  # list carries no output
    assert m.get("nope") is None and m.get("../x") is None
    with pytest.raises(JobError, match="unknown job state 'bogus'"):
        m.list(states=["bogus"])
    d = m.get("j1").to_dict()
    assert d["stdout"] == "out\n" and d["state"] == DONE and json.dumps(d)
    assert m.usage() == {"slots_total": 4, "slots_used": 0, "running": 0, "queued": 0}


async def test_env_cwd_and_job_id(managers, tmp_path):
    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    m = await managers(base_dir=str(base))
    await m.submit(JobSpec(id="env-1", shell='echo "$FOO $RELAYTREE_JOB_ID"; pwd', env={"FOO": "bar"},
                           cwd="/sub"))
    rec = await finished(m, "env-1")
    assert rec.stdout == f"bar env-1\n{base / 'sub'}\n".encode() and rec.cwd == "/sub"
    with pytest.raises(JobError, match="escapes the base directory"):
        await m.submit(JobSpec(id="env-2", shell="true", cwd="/../.."))
    await m.submit(JobSpec(id="env-3", shell="true", cwd="/missing"))
    rec = await finished(m, "env-3")
    assert rec.state == FAILED and "missing" in rec.error and rec.start_time is None
    if IS_ROOT:  # a directory the job's user may not enter (the daemon's checks can stat it)
        (base / "locked").mkdir(mode=0o700)
        os.chmod(base, 0o755)
        await m.submit(JobSpec(id="env-4", shell="echo never", cwd="/locked", user="nobody"))
        rec = await finished(m, "env-4")
        assert (rec.state, rec.rc, rec.stdout) == (FAILED, None, b"")
        assert rec.error.startswith(f"cannot start the command: cannot change to directory {base / 'locked'} (")


async def test_start_failures_are_clear(managers):
    m = await managers()
    rec, _ = await m.submit(JobSpec(id="nf", argv=["no-such-program-xyz", "a"]))
    rec = await finished(m, "nf")
    assert (rec.state, rec.rc, rec.error) == (FAILED, 127, "no-such-program-xyz: command not found")
    await m.submit(JobSpec(id="nf-sh", shell="no-such-program-xyz"))
    rec = await finished(m, "nf-sh")
    assert (rec.state, rec.rc) == (FAILED, 127) and b"not found" in rec.stderr
    await m.submit(JobSpec(id="nouser", shell="true", user="no-such-user-xyz"))
    rec = await finished(m, "nouser")
    assert (rec.state, rec.rc, rec.error) == (FAILED, None, "unknown user 'no-such-user-xyz'")
    await m.submit(JobSpec(id="segv", shell="kill -SEGV $$"))
    rec = await finished(m, "segv")
    assert (rec.state, rec.rc) == (FAILED, 139) and "SIGSEGV" in rec.error
    # A builtin name as argv[0] runs the program, never the shell's builtin (no "exit" of the wrapper).
    await m.submit(JobSpec(id="builtin", argv=["echo", "-n", "x"]))
    rec = await finished(m, "builtin")
    assert (rec.state, rec.stdout) == (DONE, b"x")


async def test_jobs_inherit_no_descriptors(managers):
    r, w = os.pipe()
    os.set_inheritable(w, True)  # as if whoever started the daemon had left it open
    try:
        m = await managers()
        await m.submit(JobSpec(id="fds", shell="ls /proc/self/fd"))
        rec = await finished(m, "fds")
    finally:
        os.close(r)
        os.close(w)
    fds = {int(x) for x in rec.stdout.split()}
    assert w > 3 and fds <= {0, 1, 2, 3}, fds  # 3: ls's own directory descriptor


@pytest.mark.skipif(not IS_ROOT, reason="needs root to switch users")
async def test_runs_as_user(managers, tmp_path):
    m = await managers()
    await m.submit(JobSpec(id="as-nobody", shell="id -u; echo via-dev-stdout >> /dev/stdout; echo $HOME",
                           user="nobody", cwd="/"))
    rec = await finished(m, "as-nobody")
    assert rec.state == DONE, rec
    assert rec.stdout.split(b"\n")[:2] == [b"65534", b"via-dev-stdout"] and rec.user == "nobody"
    assert os.stat(m.jobs_dir).st_mode & 0o777 == 0o700


@pytest.mark.parametrize("bad", ["", "a/b", "..", "../x", "a b", "a\nb", "a\0b", "-x", ".hidden", "x" * 129,
                                 "é", "a\tb", 42, None])
async def test_bad_ids_refused(managers, bad):
    m = await managers()
    with pytest.raises(JobError) as err:
        await m.submit(JobSpec(id=bad, shell="true"))
    assert err.value.code == "invalid" and "job id" in str(err.value)
    assert m.list() == [] and os.listdir(m.jobs_dir) == []


async def test_good_ids_accepted(managers):
    m = await managers()
    for good in ["9876", "a", "A.b_c:d@e+f-g", "x" * 128]:
        rec, created = await m.submit(JobSpec(id=good, shell="true"))
        assert created and rec.id == good


@pytest.mark.parametrize("kw, message", [
    ({}, "exactly one of shell"),
    ({"shell": "x", "argv": ["x"]}, "exactly one of shell"),
    ({"shell": ""}, "empty command line"),
    ({"argv": []}, "argv= is empty"),
    ({"argv": [""]}, "argv\\[0\\] \\(the program\\) is empty"),
    ({"argv": "ls -l"}, "not a single string"),
    ({"shell": "true", "env": {"A=B": "x"}}, "invalid environment variable name"),
    ({"shell": "true", "slots": 0}, "slots must be an int >= 1"),
    ({"shell": "true", "timeout": -1}, "timeout must be > 0"),
    ({"shell": "true", "output_limit": (16 << 20) + 1}, "output_limit must be an int in"),
    ({"shell": "true", "cwd": "relative"}, "is not absolute"),
    ({"shell": "true", "env": {"BIG": "x" * (1 << 20)}}, "at most 1048576"),
])
async def test_bad_specs_refused(managers, kw, message):
    m = await managers()
    with pytest.raises(JobError, match=message):
        await m.submit(JobSpec(id="bad", **kw))
    assert m.list() == []


@pytest.mark.parametrize("kw, message", [
    ({"slots": 0}, "slots must be an int >= 1"),
    ({"output_limit": -1}, "output_limit must be an int in"),
    ({"kill_grace": -1}, "kill_grace must be >= 0"),
    ({"retention": Retention(keep=0)}, "keep must be >= 1"),
    ({"retention": Retention(max_age=-1)}, "max_age must be a number of seconds >= 0"),
    ({"max_queued": -1}, "max_queued must be an int >= 0"),
])
def test_bad_manager_settings(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        JobManager(str(tmp_path), **kw)


# --------------------------------------------------------------------------- idempotency


async def test_duplicate_submit(managers, tmp_path):
    m = await managers()
    spec = JobSpec(id="dup", shell=gate(tmp_path, "g"), env={"A": "1"}, timeout=100)
    first, created = await m.submit(spec)
    assert created
    again, created = await m.submit(JobSpec(id="dup", shell=gate(tmp_path, "g"), env={"A": "1"}, timeout=100,
                                            request_id="retry"))
    assert not created and again.pid == m.get("dup").pid and again.request_id == ""
    for kw, what in [({"shell": "true"}, "command"), ({"env": {"A": "2"}}, "env"),
                     ({"slots": 2}, "slots"), ({"timeout": 5}, "timeout")]:
        fields = dict(shell=gate(tmp_path, "g"), env={"A": "1"}, timeout=100)
        fields.update(kw)
        with pytest.raises(JobError, match=f"already exists on this node with a different {what}") as err:
            await m.submit(JobSpec(id="dup", **fields))
        assert err.value.code == "exists"
    assert len(m.list()) == 1 and m.usage()["running"] == 1
    open_gate(tmp_path, "g")
    done = await finished(m, "dup")
    again, created = await m.submit(spec)  # still the same job once finished
    assert not created and again.state == DONE and again.end_time == done.end_time


# --------------------------------------------------------------------------- slots and queue


async def test_slots_fifo(managers, tmp_path):
    m = await managers(slots=2)
    ids = [f"s{i}" for i in range(5)]
    for i, job_id in enumerate(ids):
        await m.submit(JobSpec(id=job_id, shell=f"date +%s.%N; {gate(tmp_path, job_id)}"))
    states = lambda: [m.get(i, with_output=False).state for i in ids]  # noqa: E731
    assert states() == [RUNNING, RUNNING, QUEUED, QUEUED, QUEUED]
    assert m.usage() == {"slots_total": 2, "slots_used": 2, "running": 2, "queued": 3}
    open_gate(tmp_path, "s1")  # the second ends first: the oldest queued (s2) takes its slot
    await until(lambda: states()[2] == RUNNING, "s2 started")
    assert states() == [RUNNING, DONE, RUNNING, QUEUED, QUEUED]
    open_gate(tmp_path, "s0")
    await until(lambda: states()[3] == RUNNING, "s3 started")
    assert states() == [DONE, DONE, RUNNING, RUNNING, QUEUED]
    for job_id in ids[2:]:
        open_gate(tmp_path, job_id)
    for job_id in ids:
        await finished(m, job_id)
    starts = [m.get(i).start_time for i in ids]
    assert starts[2] <= starts[3] <= starts[4]
    assert all(m.get(i).state == DONE for i in ids)


async def test_head_of_line_and_too_many_slots(managers, tmp_path):
    m = await managers(slots=2)
    with pytest.raises(JobError, match="asks for 3 slots but this node has 2") as err:
        await m.submit(JobSpec(id="big", shell="true", slots=3))
    assert err.value.code == "slots" and m.list() == []
    await m.submit(JobSpec(id="one", shell=gate(tmp_path, "one")))
    await m.submit(JobSpec(id="two", shell="true", slots=2))
    await m.submit(JobSpec(id="small", shell="true"))
    # One slot is free, but the oldest queued job needs two: nothing overtakes it.
    assert [m.get(i).state for i in ("one", "two", "small")] == [RUNNING, QUEUED, QUEUED]
    open_gate(tmp_path, "one")
    await finished(m, "small")
    assert m.get("two").state == DONE and m.get("two").start_time <= m.get("small").start_time


async def test_queue_bound(managers, tmp_path):
    m = await managers(slots=1, max_queued=2)
    await m.submit(JobSpec(id="q0", shell=gate(tmp_path, "q")))
    await m.submit(JobSpec(id="q1", shell="true"))
    await m.submit(JobSpec(id="q2", shell="true"))
    with pytest.raises(JobError, match="2 jobs already wait") as err:
        await m.submit(JobSpec(id="q3", shell="true"))
    assert err.value.code == "queue_full" and m.get("q3") is None
    open_gate(tmp_path, "q")
    await finished(m, "q2")


# --------------------------------------------------------------------------- kill and timeout


async def test_kill_running_and_queued(managers, tmp_path):
    m = await managers(slots=1)
    rec, _ = await m.submit(JobSpec(id="run", shell="sleep 300 & sleep 300; wait"))
    await m.submit(JobSpec(id="wait", shell=f"touch {tmp_path / 'ran'}"))
    assert rec.state == RUNNING
    killed = await m.kill("wait")
    assert (killed.state, killed.start_time, killed.error) == (KILLED, None, "killed before it started")
    assert killed.kill_requested
    killed = await m.kill("run")
    assert killed.state == KILLED and killed.kill_requested and killed.error == "killed on request"
    assert not group_alive(rec.pid)
    assert not (tmp_path / "ran").exists()
    again = await m.kill("run")  # finished: nothing changes
    assert again.state == KILLED and again.end_time == killed.end_time
    with pytest.raises(JobError, match="no job 'nope'") as err:
        await m.kill("nope")
    assert err.value.code == "unknown"
    assert m.usage()["slots_used"] == 0


async def test_kill_ignoring_term(managers, tmp_path):
    m = await managers(kill_grace=0.3)
    rec, _ = await m.submit(JobSpec(id="stubborn", shell="trap '' TERM; echo armed; sleep 300"))
    await until(lambda: m.get("stubborn").stdout == b"armed\n", "trap armed")
    killed = await m.kill("stubborn")
    assert killed.state == KILLED and not group_alive(rec.pid)


async def test_timeout(managers):
    m = await managers(kill_grace=0.3)
    rec, _ = await m.submit(JobSpec(id="slow", shell="sleep 300", timeout=0.3))
    rec = await finished(m, "slow")
    assert rec.state == TIMEOUT and "timed out after 0.3s" in rec.error
    assert not group_alive(rec.pid)


async def test_leftovers_die_with_the_job(managers):
    m = await managers()
    await m.submit(JobSpec(id="bg", shell="sleep 300 & echo $!"))
    rec = await finished(m, "bg")
    assert rec.state == DONE
    leftover = int(rec.stdout)
    await until(lambda: not alive(leftover), "background sleep killed")


# --------------------------------------------------------------------------- output


async def test_output_cap(managers, tmp_path):
    m = await managers(output_limit=1 << 20)
    # 5 MiB on stdout, a little on stderr; the kept stdout is exactly the first MiB.
    await m.submit(JobSpec(id="big", shell="seq 1 1000000; echo small >&2"))
    rec = await finished(m, "big")
    expected = "".join(f"{i}\n" for i in range(1, 1000001)).encode()
    assert len(expected) > 5 << 20
    assert rec.stdout == expected[:1 << 20] and rec.stdout_truncated
    assert rec.stderr == b"small\n" and not rec.stderr_truncated
    assert os.path.getsize(Path(m.jobs_dir) / str(_seq(m, "big")) / "stdout") == 1 << 20
    small = m.get("big", output_limit=10)
    assert small.stdout == expected[:10] and small.stdout_truncated
    await m.submit(JobSpec(id="none", shell="echo hidden", output_limit=0))
    rec = await finished(m, "none")
    assert rec.stdout == b"" and rec.stdout_truncated


async def test_output_capped_while_running(managers, tmp_path):
    m = await managers()
    await m.submit(JobSpec(id="chatty", shell=f"head -c 3000000 /dev/zero; echo; {gate(tmp_path, 'c')}",
                           output_limit=1000))
    path = Path(m.jobs_dir) / str(_seq(m, "chatty")) / "stdout"
    await until(lambda: path.stat().st_size == 1000 and m.get("chatty").stdout_truncated, "capped while running")
    assert m.get("chatty").state == RUNNING
    open_gate(tmp_path, "c")
    rec = await finished(m, "chatty")
    assert rec.stdout == b"\0" * 1000 and rec.stdout_truncated


def _seq(m: JobManager, job_id: str) -> int:
    return m.store.by_id(job_id)["seq"]


# --------------------------------------------------------------------------- re-adoption


class Host:
    """A JobManager in its own process (tests/engine/jobhost.py), to be killed like a daemon."""

    def __init__(self, state_dir: Path, *args: str):
        self.proc = subprocess.Popen([sys.executable, str(HERE / "jobhost.py"), str(state_dir), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def ask(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps(dict(op=op, **kw)) + "\n")
        self.proc.stdin.flush()
        while True:
            answer = json.loads(self.proc.stdout.readline())
            if answer["op"] == op:
                return answer

    def submit(self, **spec) -> dict:
        answer = self.ask("submit", spec=spec)
        assert "error" not in answer, answer
        return answer["record"]

    def stop(self, sig: int) -> None:
        self.proc.send_signal(sig)
        assert self.proc.wait(30) == (0 if sig == signal.SIGTERM else -sig)


@pytest.fixture
def hosts(tmp_path):
    made: List[Host] = []
    pids: List[int] = []

    def make(*args: str) -> Host:
        host = Host(tmp_path / "state", *args)
        made.append(host)
        return host

    make.pids = pids
    yield make
    for host in made:
        if host.proc.poll() is None:
            host.proc.kill()
            host.proc.wait()
    kill_job_groups(pids)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_daemon_death_neither_kills_nor_forgets(hosts, managers, tmp_path, sig):
    host = hosts()
    rec = host.submit(id="survivor", shell=f"echo started; {gate(tmp_path, 'g')}; exit 7")
    assert rec["state"] == RUNNING
    pid = rec["pid"]
    hosts.pids.append(pid)
    queued = host.submit(id="later", shell="echo later", slots=4)
    assert queued["state"] == QUEUED
    host.stop(sig)
    assert alive(pid)
    m = await managers(slots=4)
    rec = m.get("survivor")
    assert (rec.state, rec.pid, rec.stdout) == (RUNNING, pid, b"started\n")
    assert m.get("later").state == QUEUED  # waits for the adopted job's slot
    open_gate(tmp_path, "g")
    rec = await finished(m, "survivor")
    assert (rec.state, rec.rc, rec.error) == (FAILED, 7, "")
    assert (await finished(m, "later")).stdout == b"later\n"


async def test_job_finished_while_no_daemon(hosts, managers, tmp_path):
    host = hosts()
    rec = host.submit(id="solo", shell=f"sleep 300 & echo $!; {gate(tmp_path, 'g')}; echo bye")
    hosts.pids.append(rec["pid"])
    host.stop(signal.SIGKILL)
    open_gate(tmp_path, "g")
    wait_sync(lambda: not alive(rec["pid"]), "job ended")
    (job_dir,) = (tmp_path / "state" / "jobs").iterdir()  # read while no manager runs
    leftover = int((job_dir / "stdout").read_bytes().split()[0])
    assert alive(leftover)
    m = await managers()
    rec2 = m.get("solo")
    assert (rec2.state, rec2.rc, rec2.stdout) == (DONE, 0, f"{leftover}\nbye\n".encode())
    assert rec2.start_time <= rec2.end_time
    await until(lambda: not alive(leftover), "what the job left running is killed")


async def test_lost_when_no_status(hosts, managers, tmp_path):
    host = hosts()
    rec = host.submit(id="gone", shell="sleep 300")
    host.stop(signal.SIGKILL)
    os.killpg(rec["pid"], signal.SIGKILL)  # wrapper included: no status is written
    wait_sync(lambda: not group_alive(rec["pid"]), "group gone")
    m = await managers()
    rec = m.get("gone")
    assert (rec.state, rec.rc) == (LOST, None) and "without recording an exit status" in rec.error


async def test_kill_requested_before_the_daemon_died(hosts, managers, tmp_path):
    host = hosts("--kill-grace", "300")
    rec = host.submit(id="k", shell="trap '' TERM; echo armed; sleep 300")
    hosts.pids.append(rec["pid"])
    wait_sync(lambda: host.ask("get", id="k")["record"]["stdout"] == "armed\n", "trap armed")
    host.proc.stdin.write(json.dumps({"op": "kill", "id": "k"}) + "\n")  # waits 300s for the grace
    assert host.ask("get", id="k")["record"]["kill_requested"]
    host.stop(signal.SIGKILL)
    assert group_alive(rec["pid"])
    m = await managers(kill_grace=0.2)  # finishes the kill: TERM is ignored, then KILL
    rec = await finished(m, "k")
    assert rec.state == KILLED and not group_alive(rec.pid)


async def test_timeout_expired_while_no_daemon(hosts, managers, tmp_path):
    host = hosts()
    rec = host.submit(id="t", shell="sleep 300", timeout=0.5)
    hosts.pids.append(rec["pid"])
    host.stop(signal.SIGKILL)
    wait_sync(lambda: time.time() > rec["start_time"] + 1.0, "timeout expired")
    assert alive(rec["pid"])
    m = await managers()
    rec = await finished(m, "t")
    assert rec.state == TIMEOUT and not group_alive(rec.pid)


async def test_pid_reused_is_not_adopted(hosts, managers, tmp_path):
    host = hosts()
    rec = host.submit(id="p", shell="sleep 300")
    hosts.pids.append(rec["pid"])
    host.stop(signal.SIGTERM)
    # Make the stored start time disagree, as if the pid now named another process.
    with closing(sqlite3.connect(tmp_path / "state" / "jobs.db")) as db, db:
        db.execute("UPDATE jobs SET pid_start = pid_start + 1 WHERE job_id = 'p'")
    m = await managers()
    rec = m.get("p")
    assert rec.state == LOST and "now belongs to another process" in rec.error
    assert alive(rec.pid)  # not ours any more: never signalled


async def test_start_not_recorded_is_found_by_marker(hosts, managers, tmp_path):
    host = hosts()
    rec = host.submit(id="m", shell=f"{gate(tmp_path, 'g')}; exit 5")
    hosts.pids.append(rec["pid"])
    host.stop(signal.SIGKILL)
    # As if the daemon died between the spawn and the commit of the start.
    with closing(sqlite3.connect(tmp_path / "state" / "jobs.db")) as db, db:
        db.execute("UPDATE jobs SET state = 'queued', pid = NULL, pid_start = NULL, start_time = NULL "
                   "WHERE job_id = 'm'")
    m = await managers()
    got = m.get("m")
    assert (got.state, got.pid) == (RUNNING, rec["pid"])  # adopted, not started a second time
    open_gate(tmp_path, "g")
    got = await finished(m, "m")
    assert (got.state, got.rc) == (FAILED, 5)


# --------------------------------------------------------------------------- store


async def test_retention_by_count(managers):
    m = await managers(retention=Retention(keep=10))
    for i in range(100):
        await m.submit(JobSpec(id=f"r{i}", shell="echo x"))
        await finished(m, f"r{i}")
        assert m.store.finished_count <= 10
    kept = [r.id for r in m.list()]
    assert kept == [f"r{i}" for i in range(90, 100)]
    assert sorted(os.listdir(m.jobs_dir), key=int) == [str(_seq(m, i)) for i in kept]
    stats = m.store.stats()
    assert stats["rows"] == 10 and stats["db_bytes"] < 256 << 10


async def test_retention_by_age_and_bytes(managers, tmp_path):
    m = await managers(retention=Retention(max_age=0.5))
    await m.submit(JobSpec(id="old", shell="true"))
    old = await finished(m, "old")
    await until(lambda: time.time() > old.end_time + 0.6, "old enough")
    await m.submit(JobSpec(id="new", shell="true"))  # activity purges what is too old
    assert m.get("old") is None and m.get("new") is not None
    assert not (Path(m.jobs_dir) / str(1)).exists()

    m2 = await managers(state_dir=tmp_path / "s2", retention=Retention(max_output_bytes=50_000))
    for i in range(20):
        await m2.submit(JobSpec(id=f"b{i}", shell="head -c 10000 /dev/zero"))
        await finished(m2, f"b{i}")
        assert m2.store.finished_bytes <= 50_000
    assert 3 <= len(m2.list()) <= 5 and m2.get("b19").stdout == b"\0" * 10000


async def test_lowered_bounds_apply_at_start(managers, tmp_path):
    m = await managers()
    for i in range(30):
        await m.submit(JobSpec(id=f"x{i}", shell="true"))
    await until(lambda: all(r.finished for r in m.list()), "all finished")
    latest = sorted(m.list(), key=lambda r: r.end_time)[-5:]  # the oldest ends go first
    await m.close()
    m = await managers(retention=Retention(keep=5))
    assert m.list() == sorted(latest, key=lambda r: int(r.id[1:]))


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.decode(errors='replace').strip()}")


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, "4m")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> None:
    """Write until the file system is full, down to the last byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        size = 1 << 16
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError:
                size //= 2
    finally:
        os.close(fd)


@pytest.mark.parametrize("via", ["free-space check", "store write"])
async def test_full_disk(managers, small_fs, monkeypatch, via):
    m = await managers(state_dir=small_fs / "state")
    for i in range(3):
        await m.submit(JobSpec(id=f"ok{i}", shell=f"echo {i}"))
        await finished(m, f"ok{i}")
    before = [(r.id, r.state, r.stdout) for r in (m.get(f"ok{i}") for i in range(3))]
    dirs = sorted(os.listdir(m.jobs_dir))
    _fill(small_fs / "filler")
    if via == "store write":
        monkeypatch.setattr(jobs, "MIN_FREE_BYTES", 0)
        monkeypatch.setattr(jobs, "MIN_FREE_INODES", 0)
    with pytest.raises(JobError, match=r"no space left on the device of .*: job full not accepted") as err:
        # A large spec so that sqlite needs new pages, not only its reused WAL.
        await m.submit(JobSpec(id="full", shell="true", env={"PAD": "x" * 500_000}))
    assert err.value.code == "no_space"
    assert m.get("full") is None and sorted(os.listdir(m.jobs_dir)) == dirs
    assert [(r.id, r.state, r.stdout) for r in (m.get(f"ok{i}") for i in range(3))] == before
    os.unlink(small_fs / "filler")
    await m.submit(JobSpec(id="full", shell="echo back"))
    assert (await finished(m, "full")).stdout == b"back\n"
    await m.close()
    m = await managers(state_dir=small_fs / "state")  # and the store reopens with everything
    assert [r.id for r in m.list()] == ["ok0", "ok1", "ok2", "full"]


async def test_full_disk_while_a_job_ends(managers, small_fs):
    """The wrapper cannot write the status: its own exit status (the command's) is used."""
    m = await managers(state_dir=small_fs / "state")
    filler = small_fs / "filler"
    await m.submit(JobSpec(id="filler", shell=f"cat /dev/zero > {filler}; exit 6"))
    rec = await finished(m, "filler")
    assert (rec.state, rec.rc) == (FAILED, 6) and "could not write it" in rec.error
    os.unlink(filler)
    await m.submit(JobSpec(id="after", shell="true"))  # writes any end that could not be written
    await finished(m, "after")
    await m.close()
    m = await managers(state_dir=small_fs / "state")
    rec = m.get("filler")
    assert (rec.state, rec.rc) == (FAILED, 6) and "could not write it" in rec.error


async def test_corrupt_store_is_refused_and_kept(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    db = state / "jobs.db"
    db.write_bytes(b"this is not sqlite" * 1000)
    m = JobManager(str(state), slots=1)
    with pytest.raises(JobError, match="cannot be used: file is not a database.*move it away") as err:
        await m.start()
    assert err.value.code == "store" and db.read_bytes() == b"this is not sqlite" * 1000
    with pytest.raises(JobError, match="not running"):
        await m.submit(JobSpec(id="x", shell="true"))


async def test_damaged_pages_are_refused(managers, tmp_path):
    m = await managers()
    for i in range(50):
        await m.submit(JobSpec(id=f"d{i}", shell="true", env={"PAD": "y" * 2000}))
    await until(lambda: all(r.finished for r in m.list()), "all finished")
    await m.close()
    db = tmp_path / "state" / "jobs.db"
    data = bytearray(db.read_bytes())
    page = 4096
    for offset in range(2 * page, len(data), page):  # scribble over every page header but the first ones
        data[offset:offset + 8] = b"\xff" * 8
    db.write_bytes(bytes(data))
    with pytest.raises(JobError, match="cannot be used"):
        await JobManager(str(tmp_path / "state"), slots=1).start()


async def test_store_locked_by_another_manager(managers, tmp_path):
    await managers()
    with pytest.raises(JobError, match="locked by another process") as err:
        await JobManager(str(tmp_path / "state"), slots=1).start()
    assert err.value.code == "store"


async def test_newer_schema_refused(managers, tmp_path):
    m = await managers()
    await m.close()
    with closing(sqlite3.connect(tmp_path / "state" / "jobs.db")) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(JobError, match="schema version 99, written by a newer relaytree"):
        await JobManager(str(tmp_path / "state"), slots=1).start()


# --------------------------------------------------------------------------- watching


async def test_idle_manager_has_no_timers(managers, tmp_path):
    m = await managers()
    await m.submit(JobSpec(id="t1", shell="sleep 0.1", timeout=60))
    await finished(m, "t1")
    await until(lambda: m._tick is None, "output timer gone once nothing runs")
    loop = asyncio.get_running_loop()
    ours = [h for h in loop._scheduled if not h.cancelled()]  # noqa: SLF001 - the loop's timer heap
    assert ours == []


async def test_without_pidfd(managers, monkeypatch, tmp_path, hosts):
    """Kernels without pidfd_open: running jobs are polled (only while they run)."""
    monkeypatch.setattr(jobs, "_HAVE_PIDFD", False)
    host = hosts()
    rec = host.submit(id="adopted", shell=f"{gate(tmp_path, 'a')}; exit 4")
    hosts.pids.append(rec["pid"])
    host.stop(signal.SIGKILL)
    m = await managers(kill_grace=0.2)
    await m.submit(JobSpec(id="own", shell="exit 2"))
    await m.submit(JobSpec(id="victim", shell="sleep 300"))
    assert (await finished(m, "own")).rc == 2
    assert (await m.kill("victim")).state == KILLED
    open_gate(tmp_path, "a")
    assert (await finished(m, "adopted")).rc == 4
    await until(lambda: m._tick is None, "polling stops once nothing runs")


async def test_close_leaves_jobs_running(managers, tmp_path):
    m = await managers()
    rec, _ = await m.submit(JobSpec(id="c", shell=f"{gate(tmp_path, 'g')}; exit 9"))
    await m.close()
    assert alive(rec.pid)
    with pytest.raises(JobError, match="not running"):
        m.get("c")
    m = await managers()
    open_gate(tmp_path, "g")
    assert (await finished(m, "c")).rc == 9


async def test_store_that_cannot_be_opened(tmp_path):
    state = tmp_path / "state"
    (state / "jobs.db").mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(JobError, match="cannot open the job store .*jobs.db") as err:
        await JobManager(str(state), slots=1).start()
    assert err.value.code == "store" and "move it away" not in str(err.value)
