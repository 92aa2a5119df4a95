"""Cluster jobs on the local node: the daemon's job manager.

Pure standard library (asyncio, subprocess, sqlite3), Linux, Python 3.9+; no
gRPC: the daemon's job operations call a :class:`JobManager`, which lives on
the daemon's event loop (``await manager.start()`` once, ``await
manager.close()`` at the end).

What a caller can rely on:

* **Ids.** A job is named by the id its submitter gives (the same on every
  node of a cluster job): 1 to :data:`MAX_ID_LENGTH` characters of
  ``[A-Za-z0-9._:@+-]``, starting with a letter or digit.  Anything else
  (``/``, ``..``, spaces, control characters, NUL, empty, too long) is a
  :class:`JobError` naming the id and the rule.  Ids never appear in a path.
* **Idempotent submit.** :meth:`JobManager.submit` of an id the node already
  has changes nothing and returns the existing record with ``created=False``
  (a retry after a lost answer is safe, whatever state the job is in).  If the
  spec differs (command, env, cwd, user, slots, timeout or output limit), it
  is a :class:`JobError` (``exists``) naming what differs, and nothing changes.
* **States.** ``queued`` -> ``running`` -> one of ``done`` (exit status 0),
  ``failed`` (non-zero exit status, or it could not start: unknown user, bad
  cwd, command not found, no space for its output; ``error`` says why),
  ``killed`` (on request), ``timeout``, ``lost`` (its process vanished without
  an exit status: the node rebooted, or it was killed while no daemon watched
  it).  ``rc`` is the exit status as a shell reports it (128+N after death by
  signal N: the job runs under a shell wrapper, see below); it is None when
  the command never ran or the status is unknown.  Times are epoch seconds.
* **Slots.** The node has ``slots`` (default: the number of CPUs); a job takes
  ``spec.slots`` (default 1); asking for more than the node has is a
  :class:`JobError` (``slots``).  Jobs start in strict submission order
  (FIFO): when the oldest queued job needs more slots than are free, the jobs
  behind it wait too, even those that would fit (no backfill; nothing can
  starve).  Queued jobs survive daemon restarts.  At most ``max_queued`` jobs
  wait (``queue_full``).  :meth:`submit` returns once the job is queued, or,
  when it can start at once, once it started or failed to start (it waits at
  most :data:`START_WAIT` seconds for that).
* **Jobs outlive the daemon.** Each job runs in its own session (its own
  process group), stdin ``/dev/null``, stdout and stderr appended to files the
  daemon opens in ``STATE_DIR/jobs/<n>/`` (``n`` is the store's row number,
  not the id; the state dir may stay private: the job gets descriptors, not
  paths), under a ``/bin/sh`` wrapper (a line of shell, not a Python process:
  one more small process per job) that runs the command as its child and
  writes its exit status to a descriptor the daemon opened, closed for the
  command itself.  The wrapper catches SIGHUP/SIGINT/SIGTERM (the command does
  not inherit that) so that a signal to the whole group still records the
  command's status.  A job that keeps the daemon's user is started with
  ``posix_spawn`` (its cost does not grow with the daemon's memory, unlike a
  fork); one that switches ``user`` with ``subprocess.Popen`` as exec does
  (the wrapper and the command both run as that user).  Jobs inherit no
  descriptor of the daemon.  ``env`` comes on top of the daemon's environment,
  with the user's HOME/USER/LOGNAME when it runs as another ``user`` (exactly
  as :func:`relaytree.execute.run_command`), plus ``RELAYTREE_JOB_ID``; the
  daemon's environment is the one it had at :meth:`start`.
  ``cwd`` is resolved under the daemon's ``base_dir`` like exec's.  Stopping
  the daemon (:meth:`close`, SIGTERM, kill -9, an upgrade) never kills a job.
* **Re-adoption.** The store keeps each running job's pid, the process start
  time (``/proc/PID/stat`` field 22) and the boot id.  :meth:`start` watches
  again every job whose process is still the same one (same pid, start time
  and boot), re-arms its timeout from its start time (killing it at once if
  it expired meanwhile), and records the end of those that ended meanwhile:
  with the wrapper's exit status when it wrote one, else ``killed``/``timeout``
  if that had been asked, else ``lost``.
* **Kill.** A queued job is ``killed`` at once (it never runs).  For a running
  job the request is committed first (a daemon restart in between still ends
  in ``killed``), then the process group gets SIGTERM, and SIGKILL after
  ``kill_grace`` seconds; :meth:`kill` returns the record once the job is
  gone (or about ``kill_grace + execute.REAP_WAIT`` seconds later if some
  process cannot die).  Killing a finished job changes nothing.
* **Timeout** (per job, from its start): the group is killed the same way,
  state ``timeout``.
* **A job ends when its command ends**; whatever the command left running in
  its process group is then killed too (SIGTERM, SIGKILL after the grace), as
  batch systems do: a job holds its slots for exactly as long as it runs, and
  its output files stop growing.  Processes that left the group (``setsid``,
  double-forking daemons) escape, as with exec.
* **Output.** At most ``output_limit`` bytes per stream are kept (the job's
  first bytes), with ``stdout_truncated``/``stderr_truncated`` flags.  While
  (and only while) jobs run, a timer truncates each running job's files back
  to the limit (the job keeps appending at the limit, O_APPEND); the period
  is :data:`CAP_PERIOD` seconds, shortened down to :data:`CAP_PERIOD_MIN`
  while some job writes faster than its limit per period, so a file holds at
  most the limit plus what the job writes in one period.
* **Watching costs nothing when idle.** Each running job's wrapper is watched
  with a pidfd on the event loop; the daemon's own children are reaped when it
  fires.  The only timers are per job timeouts and the output timer, and they
  exist only while jobs run: an idle daemon never wakes up.  Where
  ``pidfd_open`` is missing (Linux < 5.3) running jobs are polled every
  :data:`POLL_PERIOD` seconds instead, again only while jobs run.
* **Storage** (see :mod:`relaytree.jobstore`): ``STATE_DIR/jobs.db`` (sqlite,
  WAL, one transaction per state change, no fsync per job: a daemon crash
  loses nothing, a power loss may lose the last submits, which is acceptable
  because it also kills the running jobs).  History is bounded by
  :class:`Retention` (count, age, bytes of finished jobs), purged a few jobs
  at a time as jobs are submitted and finish (and at :meth:`start`), never
  by a periodic timer; queued and running jobs are never purged.  A submit
  when the state dir's file system has less than :data:`MIN_FREE_BYTES` free
  (or the store cannot write) fails with a :class:`JobError` (``no_space``)
  and changes nothing.  A damaged store, or one locked by another daemon, makes
  :meth:`start` fail with a clear :class:`JobError`; it is never deleted.
* **Blocking lookups** (user database, cwd, program in PATH) run in a helper
  thread as exec's do: a hung NFS mount or name service delays that job only
  (its timeout covers that wait).  A shell job with neither ``user`` nor
  ``cwd`` needs none and starts without a thread.  Database work is short and
  runs inline.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from relaytree import execute, filecopy
from relaytree.jobstore import JobError, JobStore, Retention, is_full, spec_json

__all__ = [
    "DONE", "FAILED", "KILLED", "LOST", "QUEUED", "RUNNING", "TIMEOUT", "STATES", "FINISHED",
    "JobError", "JobManager", "JobRecord", "JobSpec", "Retention", "check_job_id",
]

log = logging.getLogger("relaytree.jobs")

QUEUED = "queued"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
KILLED = "killed"
TIMEOUT = "timeout"
LOST = "lost"
STATES = (QUEUED, RUNNING, DONE, FAILED, KILLED, TIMEOUT, LOST)
FINISHED = frozenset((DONE, FAILED, KILLED, TIMEOUT, LOST))

MAX_ID_LENGTH = 128
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]*\Z")
#: Largest spec (command + env + cwd + user, as JSON) a node stores per job.
MAX_SPEC_BYTES = 1 << 20
# Largest per-stream output a job may keep: job outputs stay on the node's disk for the whole
# retention time (an exec's output lives only in memory, for one answer, and may be bigger).
MAX_OUTPUT_LIMIT = 16 << 20
#: A submit needs this much free space (and MIN_FREE_INODES inodes) in the state dir.
MIN_FREE_BYTES = 1 << 20
MIN_FREE_INODES = 64
DEFAULT_MAX_QUEUED = 10_000
#: Seconds between output-cap checks while jobs run; shortened while a job writes fast.
CAP_PERIOD = 2.0
CAP_PERIOD_MIN = 0.1
#: Seconds between checks of running jobs where pidfd_open is missing.
POLL_PERIOD = 1.0
#: Longest time submit waits for a job that can start at once to have started.
START_WAIT = 1.0
#: Purge steps at most at start (a lowered bound is reached over the next activity).
START_PURGE_STEPS = 64

# The wrapper: fd 0 arrives as the exit-status file (neither posix_spawn's nor
# Popen's API places an fd at 3 without a Python callback in the child); it is
# moved to fd 3, stdin becomes /dev/null, and the command runs with fd 3 closed.
# Caught (not ignored) signals reset to their default in the command.  $1 is the
# job id, exported here so that the daemon passes its own environment as is (no
# per-job environment to build and encode: 0.2-0.3 ms of the daemon's CPU per
# job); $2 is the cwd (posix_spawn has no chdir): "cd" in the status file says
# the command never ran because of it.
_WRAPPER = ('exec 3>&0 </dev/null; RELAYTREE_JOB_ID=$1; export RELAYTREE_JOB_ID; '
            'cd -- "$2" || { echo cd >&3; exit 126; }; shift 2; '
            'trap : HUP INT TERM; "$@" 3>&-; r=$?; echo $r >&3; exit $r')
_CD_FAILED = "cd"
_MARKER = "relaytree-job"  # $0 of the wrapper: relaytree-job:<store id>:<n>
_STREAMS = ("stdout", "stderr")
_RC_FILE = "rc"

_HAVE_PIDFD = hasattr(os, "pidfd_open")
_HAVE_SPAWN = hasattr(os, "posix_spawn")
# What Popen's restore_signals resets in a child: Python ignores them, a command must not.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


# --------------------------------------------------------------------------
# Public data
# --------------------------------------------------------------------------

@dataclass
class JobSpec:
    """What to run: exactly one of ``shell`` (run by ``/bin/sh -c``) or ``argv``."""

    id: str
    shell: Optional[str] = None
    argv: Optional[Sequence[str]] = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Optional[str] = None  # None or "": the base dir (or /)
    user: Optional[str] = None  # None or "": the daemon's user
    slots: int = 1
    timeout: Optional[float] = None  # seconds from the start; None: none
    output_limit: Optional[int] = None  # bytes kept per stream; None: the manager's default
    submitter: str = ""  # key id of whoever submitted (recorded, not compared)
    request_id: str = ""  # request that created it (recorded, not compared)


@dataclass
class JobRecord:
    """A job as the node knows it.  The env is not part of it (it may hold secrets)."""

    id: str
    state: str
    rc: Optional[int]
    submit_time: float
    start_time: Optional[float]
    end_time: Optional[float]
    user: str  # "" when it runs as the daemon's user
    command: str  # for display: the shell line, or the argv quoted
    shell: Optional[str]
    argv: Optional[List[str]]
    cwd: str  # as submitted ("" for the default)
    slots: int
    timeout: Optional[float]
    output_limit: int
    pid: Optional[int]
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    error: str = ""
    submitter: str = ""
    request_id: str = ""
    kill_requested: bool = False

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form (output decoded as UTF-8, undecodable bytes replaced)."""
        out: Dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        return out


def check_job_id(job_id: Any) -> str:
    """The id itself, or JobError naming it and the rule."""
    if not isinstance(job_id, str):
        raise JobError(f"job id must be a string, not {type(job_id).__name__}")
    if not job_id:
        raise JobError("job id is empty")
    if len(job_id) > MAX_ID_LENGTH:
        raise JobError(f"job id {job_id[:40]!r}... is {len(job_id)} characters long (at most {MAX_ID_LENGTH})")
    if not _ID_RE.match(job_id):
        raise JobError(f"invalid job id {job_id!r}: use letters, digits and . _ : @ + - "
                       "(starting with a letter or digit; no /, spaces or control characters)")
    return job_id


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------

def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> Optional[Tuple[bytes, int]]:
    """(state letter, start time in clock ticks since boot) of pid, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _same_process(pid: int, start_ticks: Optional[int]) -> bool:
    """Is pid still the live (not zombie) process that started at start_ticks?"""
    st = _proc_start(pid)
    return st is not None and st[0] not in (b"Z", b"X") and st[1] == start_ticks


def _find_wrapper(marker: str) -> Optional[int]:
    """Pid of the wrapper whose $0 is marker (a scan of /proc: rare recovery path only)."""
    want = marker.encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        if len(args) > 3 and args[3] == want:
            try:  # the wrapper leads its group; a child forked by it (not yet exec'd) does not
                with open(f"/proc/{name}/stat", "rb") as fh:
                    if fh.read().rsplit(b")", 1)[1].split()[2] == name.encode():
                        return int(name)
            except (OSError, IndexError):
                continue
    return None


def _read_status(path: str) -> Optional[str]:
    """What the wrapper wrote: an exit status, _CD_FAILED, or None (nothing)."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(16).strip().decode("ascii")
    except (OSError, UnicodeDecodeError):
        return None
    return text if text == _CD_FAILED or text.isdigit() else None


def _first_line(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read(512).split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _cloexec_inherited() -> None:
    """Mark every descriptor the daemon inherited (>= 3) close-on-exec: posix_spawn
    has no close_fds, and jobs must not get, say, a pipe of whoever started the daemon."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the listing's own descriptor, closed meanwhile


def _describe_rc(rc: int) -> str:
    """Words for a non-zero status that looks like a death by signal (128+N)."""
    if 128 < rc < 128 + signal.NSIG:
        return f"exit status {rc}: {execute._describe_signal(128 - rc)}"
    return ""  # a plain non-zero exit is said by rc alone


class _Job:
    """A job being started or running (in memory)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, seq: int, job_id: str, slots: int, spec: Dict[str, Any],
                 where: str):
        self.seq = seq
        self.job_id = job_id
        self.slots = slots
        self.spec = spec
        self.spec_bytes = 0
        self.pid: Optional[int] = None  # the wrapper = the process group
        self.pid_start: Optional[int] = None
        self.child = False  # our own child (False when adopted): we reap it
        self.popen: Optional[subprocess.Popen] = None  # when it was started by Popen (user switch)
        self.status: Optional[int] = None  # its wait status once reaped (Popen.returncode style)
        self.cwd = "/"
        self.pidfd: Optional[int] = None
        self.exited = loop.create_future()  # done when the job has ended and is recorded
        self.timer: Optional[asyncio.TimerHandle] = None
        self.start_task: Optional[asyncio.Task] = None
        self.kill_task: Optional[asyncio.Task] = None
        self.kill_reason: Optional[str] = None
        self.truncated = {"stdout": False, "stderr": False}
        self.concluded = False
        self.dir = where  # its output files

    @property
    def output_limit(self) -> int:
        return self.spec["output_limit"]


# --------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------

class JobManager:
    """The jobs of one node (see the module docstring for the contract)."""

    def __init__(self, state_dir: str, *, slots: Optional[int] = None, retention: Optional[Retention] = None,
                 output_limit: int = execute.DEFAULT_OUTPUT_LIMIT, kill_grace: float = execute.KILL_GRACE,
                 base_dir: Optional[str] = None, max_queued: int = DEFAULT_MAX_QUEUED):
        if slots is None:
            slots = os.cpu_count() or 1
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an int >= 1, not {slots!r}")
        self.retention = retention if retention is not None else Retention()
        self.retention.check()
        if self.retention.keep < 1:
            raise ValueError("retention keep must be >= 1 (a finished job must be visible at least once)")
        if (isinstance(output_limit, bool) or not isinstance(output_limit, int)
                or not 0 <= output_limit <= MAX_OUTPUT_LIMIT):
            raise ValueError(f"output_limit must be an int in 0..{MAX_OUTPUT_LIMIT}, not {output_limit!r}")
        kill_grace = execute._check_number("kill_grace", kill_grace)
        if kill_grace < 0:
            raise ValueError("kill_grace must be >= 0")
        if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 0:
            raise ValueError(f"max_queued must be an int >= 0, not {max_queued!r}")
        self.state_dir = os.path.abspath(state_dir)
        self.jobs_dir = os.path.join(self.state_dir, "jobs")
        self.slots = slots
        self.output_limit = output_limit
        self.kill_grace = kill_grace
        self.base_dir = base_dir
        self.max_queued = max_queued
        self.store = JobStore(os.path.join(self.state_dir, "jobs.db"))
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._closing = False
        self._boot_id = ""
        self._queue: Deque[Tuple[int, int]] = deque()  # (seq, slots) in submission order
        self._active: Dict[int, _Job] = {}  # seq -> job being started or running
        self._used = 0  # slots of the active jobs
        self._tasks: Set[asyncio.Task] = set()
        self._tick: Optional[asyncio.TimerHandle] = None
        self._cap_period = CAP_PERIOD
        self._pending: Dict[int, Dict[str, Any]] = {}  # ends not yet written (store error): retried
        self._use_pidfd = _HAVE_PIDFD
        self._ready = False  # True once start() has adopted every running job
        self._use_spawn = _HAVE_SPAWN
        self._environ: Dict[bytes, bytes] = {}  # the daemon's environment for posix_spawn (a dict: fast)

    # -- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Open (or create) the store, re-adopt running jobs, start queued ones.

        Call once, on the loop the manager will live on.  JobError when the
        store cannot be used (damaged, locked by another daemon, unwritable).
        """
        if self._loop is not None:
            raise JobError("the job manager is already started", "closed")
        try:
            os.makedirs(self.jobs_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise JobError(f"cannot create {self.jobs_dir}: {exc.strerror or exc}", "store") from None
        self.store.open()
        _cloexec_inherited()
        self._environ = dict(os.environb)
        self._loop = asyncio.get_running_loop()
        self._boot_id = _boot_id()
        try:
            for row in self.store.unfinished():
                if row["state"] == QUEUED and not os.path.isdir(self._dir(row["seq"])):
                    self._queue.append((row["seq"], row["slots"]))
                else:
                    self._recover(row)
            for _ in range(START_PURGE_STEPS):
                purged = self.store.purge(time.time(), self.retention)
                self._remove_dirs(purged)
                if not purged:
                    break
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise JobError(f"cannot recover the jobs of {self.store.path}: {exc}", "store") from None
        self._ready = True
        self._schedule()

    async def close(self) -> None:
        """Stop watching and close the store.  Jobs are never killed: they run on, and the
        next manager on this state dir adopts them."""
        if self._loop is None or self._closing:
            return
        self._closing = True
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for job in list(self._active.values()):
            self._unwatch(job)
            if job.timer is not None:
                job.timer.cancel()
            if job.popen is not None and job.popen.returncode is None:
                # Left running on purpose: keep Popen.__del__ from warning about it
                # or reaping it behind the next manager's back.
                job.popen.returncode = 0
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._active.clear()
        self._queue.clear()
        self.store.close()

    # -- queries -----------------------------------------------------------------------

    def get(self, job_id: str, *, with_output: bool = True, output_limit: Optional[int] = None) -> Optional[JobRecord]:
        """The job with this id, or None.  With output: at most min(the job's limit,
        ``output_limit``) bytes per stream (the flag says when there is more)."""
        self._require_started()
        if not isinstance(job_id, str) or not _ID_RE.match(job_id) or len(job_id) > MAX_ID_LENGTH:
            return None
        row = self.store.by_id(job_id)
        return None if row is None else self._record(row, with_output, output_limit)

    def list(self, *, states: Optional[Sequence[str]] = None, ids: Optional[Sequence[str]] = None,
             limit: Optional[int] = None) -> List[JobRecord]:
        """Jobs in submission order, without output; the newest ``limit`` of them."""
        self._require_started()
        if states is not None:
            states = list(states)
            for s in states:
                if s not in STATES:
                    raise JobError(f"unknown job state {s!r} (one of {', '.join(STATES)})")
        if ids is not None:
            ids = [i for i in ids if isinstance(i, str)]
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise JobError(f"limit must be an int >= 0, not {limit!r}")
        return [self._record(row, False, None) for row in self.store.select(states, ids, limit)]

    def usage(self) -> Dict[str, int]:
        """Slots of the node and what holds them (jobs being started count as running)."""
        return {"slots_total": self.slots, "slots_used": self._used, "running": len(self._active),
                "queued": len(self._queue)}

    # -- submit --------------------------------------------------------------------------

    async def submit(self, spec: JobSpec) -> Tuple[JobRecord, bool]:
        """Accept a job: (its record, True), or (the existing record, False) for a known id."""
        self._require_started()
        spec_dict, fields = self._check_spec(spec)
        existing = self.store.by_id(spec.id)
        if existing is not None:
            self._check_same(spec.id, json.loads(existing["spec"]), spec_dict)
            return self._record(existing, False, None), False
        if len(self._queue) >= self.max_queued:
            raise JobError(f"job {spec.id} not accepted: {len(self._queue)} jobs already wait on this node "
                           f"(at most {self.max_queued})", "queue_full")
        self._check_space(spec.id)
        self._flush_pending()
        now = time.time()
        fields.update(state=QUEUED, submit_time=now)
        try:
            seq, purged = self.store.insert(fields, now, self.retention)
        except (sqlite3.Error, OSError) as exc:
            if is_full(exc):
                raise JobError(f"no space left on the device of {self.state_dir}: job {spec.id} not accepted",
                               "no_space") from None
            raise JobError(f"job {spec.id} not accepted: the job store failed: {exc}", "store") from None
        self._remove_dirs(purged)
        self._queue.append((seq, fields["slots"]))
        self._schedule()
        job = self._active.get(seq)
        if job is not None and job.start_task is not None and not job.start_task.done():
            await asyncio.wait([job.start_task], timeout=START_WAIT)
        row = self.store.by_seq(seq)
        if row is None:
            raise JobError(f"job {spec.id} ended and was purged at once (retention bounds)", "unknown")
        return self._record(row, False, None), True

    def _check_spec(self, spec: JobSpec) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """(canonical spec, store fields) of a valid spec; JobError naming what is wrong."""
        if not isinstance(spec, JobSpec):
            raise JobError(f"submit needs a JobSpec, not {type(spec).__name__}")
        job_id = check_job_id(spec.id)
        if (spec.shell is None) == (spec.argv is None):
            raise JobError(f"job {job_id}: give exactly one of shell (a command line) or argv (a program and "
                           "its arguments)")
        try:
            cmd = execute._command_line(spec.shell, spec.argv)
            env = execute._check_env(spec.env)
        except ValueError as exc:
            raise JobError(f"job {job_id}: {exc}") from None
        if spec.argv is not None:
            if any(not isinstance(a, str) for a in cmd):
                raise JobError(f"job {job_id}: argv items must be strings")
            if not cmd[0]:
                raise JobError(f"job {job_id}: argv[0] (the program) is empty")
        cwd = spec.cwd or ""
        user = spec.user or ""
        for name, value in (("cwd", cwd), ("user", user), ("submitter", spec.submitter),
                            ("request_id", spec.request_id)):
            try:
                execute._check_text(name, value)
            except ValueError as exc:
                raise JobError(f"job {job_id}: {exc}") from None
        if cwd:
            self._resolve_cwd(job_id, cwd)
        slots = spec.slots
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise JobError(f"job {job_id}: slots must be an int >= 1, not {slots!r}")
        if slots > self.slots:
            raise JobError(f"job {job_id} asks for {slots} slots but this node has {self.slots}", "slots")
        timeout = spec.timeout
        if timeout is not None:
            try:
                timeout = execute._check_number("timeout", timeout)
            except ValueError as exc:
                raise JobError(f"job {job_id}: {exc}") from None
            if timeout <= 0:
                raise JobError(f"job {job_id}: timeout must be > 0 seconds or None, not {timeout}")
            if math.isinf(timeout):
                timeout = None
        limit = self.output_limit if spec.output_limit is None else spec.output_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_OUTPUT_LIMIT:
            raise JobError(f"job {job_id}: output_limit must be an int in 0..{MAX_OUTPUT_LIMIT}, "
                           f"not {limit!r}")
        canonical = {"shell": spec.shell, "argv": list(cmd) if spec.argv is not None else None, "env": env,
                     "cwd": cwd, "user": user, "slots": slots, "timeout": timeout, "output_limit": limit}
        text = spec_json(canonical)
        try:
            size = len(text.encode())
            spec.submitter.encode()
            spec.request_id.encode()
        except UnicodeEncodeError as exc:
            raise JobError(f"job {job_id}: not valid Unicode text ({exc.reason} at {exc.object[exc.start:exc.end]!r})"
                           ) from None
        if size > MAX_SPEC_BYTES:
            raise JobError(f"job {job_id}: its command and environment take {size} bytes (at most "
                           f"{MAX_SPEC_BYTES})")
        fields = {"job_id": job_id, "spec": text, "slots": slots, "submitter": spec.submitter,
                  "request_id": spec.request_id, "stored_bytes": size}
        return canonical, fields

    @staticmethod
    def _check_same(job_id: str, old: Dict[str, Any], new: Dict[str, Any]) -> None:
        differ = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if not differ:
            return
        what = ["command" if k in ("shell", "argv") else k for k in differ]
        raise JobError(f"job id {job_id} already exists on this node with a different "
                       f"{', '.join(dict.fromkeys(what))}; nothing changed", "exists")

    def _check_space(self, job_id: str) -> None:
        try:
            st = os.statvfs(self.state_dir)
        except OSError:
            return  # the store's own write will tell
        free = st.f_bavail * st.f_frsize
        if free < MIN_FREE_BYTES or (st.f_files and st.f_favail < MIN_FREE_INODES):
            raise JobError(f"no space left on the device of {self.state_dir}: job {job_id} not accepted "
                           f"({free} bytes and {st.f_favail} inodes free)", "no_space")

    def _resolve_cwd(self, job_id: str, cwd: str) -> str:
        if not cwd:
            return self.base_dir or "/"
        try:
            return filecopy.resolve_path(self.base_dir, cwd)
        except filecopy.CopyError as exc:
            raise JobError(f"job {job_id}: cwd: {exc}") from None

    # -- kill ----------------------------------------------------------------------------

    async def kill(self, job_id: str) -> JobRecord:
        """Kill a job (see the module docstring); its record.  JobError for an unknown id."""
        self._require_started()
        row = self.store.by_id(job_id) if isinstance(job_id, str) else None
        if row is None:
            raise JobError(f"no job {job_id!r} on this node", "unknown")
        seq = row["seq"]
        job = self._active.get(seq)
        if job is None:
            if row["end_time"] is None and (seq, row["slots"]) in self._queue:
                job = _Job(self._loop, seq, job_id, 0, json.loads(row["spec"]), self._dir(seq))
                job.spec_bytes = row["stored_bytes"]
                try:  # written first: on a store error the job stays queued, nothing changed
                    self._conclude(job, KILLED, None, "killed before it started", {"kill_reason": "kill"},
                                   strict=True)
                except (sqlite3.Error, OSError) as exc:
                    raise JobError(f"job {job_id} stays queued: its kill could not be recorded: {exc}",
                                   "no_space" if is_full(exc) else "store") from None
                self._queue.remove((seq, row["slots"]))
                self._schedule()
        elif job.pid is None:  # still preparing its start
            self._cancel_start(job, KILLED, "killed before it started")
        else:
            task = self._begin_kill(job, "kill")
            await asyncio.shield(task)
            if not job.exited.done():
                await asyncio.wait([job.exited], timeout=execute.REAP_WAIT)
        row = self.store.by_seq(seq)
        if row is None:
            raise JobError(f"job {job_id} ended and was purged at once (retention bounds)", "unknown")
        return self._record(row, False, None)

    def _begin_kill(self, job: _Job, reason: str) -> "asyncio.Task":
        if job.kill_reason is None:
            job.kill_reason = reason
            try:
                self.store.update(job.seq, {"kill_reason": reason})
            except (sqlite3.Error, OSError) as exc:  # killed all the same; the end records it
                log.error("job %s: cannot record the %s request: %s", job.job_id, reason, exc)
        if job.kill_task is None:
            job.kill_task = self._spawn(execute._terminate_group(self._loop, job.pid, job.exited, self.kill_grace))
        return job.kill_task

    def _on_timeout(self, job: _Job) -> None:
        job.timer = None
        if job.concluded:
            return
        timeout = job.spec["timeout"]
        if job.pid is None:
            self._cancel_start(job, TIMEOUT, f"timed out after {timeout}s before the command could start "
                                             "(user lookup, cwd or program lookup blocked: hung filesystem "
                                             "or name service?)")
        else:
            self._begin_kill(job, "timeout")

    def _cancel_start(self, job: _Job, state: str, error: str) -> None:
        if job.start_task is not None:
            job.start_task.cancel()
        self._conclude(job, state, None, error, {"kill_reason": "kill" if state == KILLED else "timeout"})
        self._schedule()

    # -- scheduling and starting -----------------------------------------------------------

    def _schedule(self) -> None:
        """Start queued jobs, oldest first, while the oldest fits in the free slots."""
        while self._queue and self._ready and not self._closing:
            seq, slots = self._queue[0]
            if self._used + slots > self.slots and slots <= self.slots:
                break
            self._queue.popleft()
            row = self.store.by_seq(seq)
            if row is None or row["end_time"] is not None:
                continue
            job = _Job(self._loop, seq, row["job_id"], slots, json.loads(row["spec"]), self._dir(seq))
            job.spec_bytes = row["stored_bytes"]
            if slots > self.slots:  # the node has fewer slots since it was queued
                self._conclude(job, FAILED, None, f"it asks for {slots} slots but this node now has {self.slots}")
                continue
            self._active[seq] = job
            self._used += slots
            if job.spec["timeout"] is not None:
                job.timer = self._loop.call_later(job.spec["timeout"], self._on_timeout, job)
            job.start_task = self._spawn(self._start_job(job))

    async def _start_job(self, job: _Job) -> None:
        spec = job.spec
        if spec["argv"] is not None:
            cmd, program = list(spec["argv"]), spec["argv"][0]
        else:
            cmd, program = [execute.SHELL, "-c", spec["shell"]], None
        try:
            cwd = self._resolve_cwd(job.job_id, spec["cwd"])
        except JobError as exc:  # the base dir changed since the submit
            cwd, plan = "/", execute._Plan(error=str(exc))
        else:
            if program is None and not spec["user"] and not spec["cwd"]:
                # Nothing that can hang (no user or PATH lookup, the daemon's own base
                # dir): prepared inline, no helper thread (~0.15 ms per job).
                plan = execute._prepare(None, cwd, None, "")
            else:
                extra = spec["env"]
                path = os.pathsep.join(os.get_exec_path(extra if "PATH" in extra else None))
                try:
                    plan = await execute._in_thread(self._loop, execute._prepare, spec["user"] or None, cwd,
                                                    program, path)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # cannot start a thread: resource exhaustion
                    plan = execute._Plan(error=f"cannot start the job: {exc}")
                if job.concluded:
                    return
        if plan.error:
            self._conclude(job, FAILED, None, plan.error)
        elif program is not None and not plan.program_found:
            self._conclude(job, FAILED, 127, f"{program}: command not found")
        else:
            if program is not None:
                cmd[0] = plan.program_path  # never a shell builtin or keyword
            env = None  # the daemon's own, inherited as is
            if plan.identity is not None or spec["env"]:
                env = execute._environment(plan.identity, spec["env"])
            job.cwd = cwd
            self._launch(job, cmd, env, plan)
        self._schedule()

    def _launch(self, job: _Job, cmd: List[str], env: Optional[Dict[str, str]], plan: Any) -> None:
        """Spawn the wrapper (synchronously: no await between the files and the record).

        posix_spawn (vfork: its cost does not grow with the daemon's size; Python 3.9's
        Popen forks, 2+ ms for a daemon with gRPC loaded) unless the job switches user,
        which only Popen does; Popen then closes every other descriptor itself."""
        where = job.dir
        fds: List[int] = []
        try:
            try:
                os.mkdir(where, 0o700)
            except FileExistsError:  # left by an attempt the store does not know of: reused
                pass
            for name in _STREAMS:
                fds.append(os.open(os.path.join(where, name),
                                   os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600))
            fds.append(os.open(os.path.join(where, _RC_FILE), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                               0o600))
            uid = plan.popen_kwargs.get("user")
            if uid is not None:  # so that the job may reopen /dev/stdout (/proc/self/fd/1)
                for fd in fds[:2]:
                    os.fchown(fd, uid, plan.popen_kwargs["group"])
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            self._conclude(job, FAILED, None, f"cannot create the job's output files in {where}: "
                                              f"{exc.strerror or exc}")
            return
        argv = [execute.SHELL, "-c", _WRAPPER, f"{_MARKER}:{self.store.store_id}:{job.seq}", job.job_id,
                job.cwd] + cmd
        try:
            if self._use_spawn and not plan.popen_kwargs:
                try:
                    job.pid = os.posix_spawn(
                        execute.SHELL, argv, self._environ if env is None else env, setsid=True,
                        file_actions=[(os.POSIX_SPAWN_DUP2, fds[2], 0), (os.POSIX_SPAWN_DUP2, fds[0], 1),
                                      (os.POSIX_SPAWN_DUP2, fds[1], 2)],
                        setsigdef=_DEFAULT_SIGNALS, setsigmask=())
                except NotImplementedError:  # a libc without POSIX_SPAWN_SETSID
                    self._use_spawn = False
            if job.pid is None:
                job.popen = subprocess.Popen(argv, stdin=fds[2], stdout=fds[0], stderr=fds[1], env=env,
                                             start_new_session=True, close_fds=True, **plan.popen_kwargs)
                job.pid = job.popen.pid
        except Exception as exc:  # noqa: BLE001 - every spawn failure is the job's failure
            rc, error = execute._spawn_failure(exc, execute.SHELL, job.cwd, plan)
            self._conclude(job, FAILED, rc, error)
            return
        finally:
            for fd in fds:
                os.close(fd)
        job.child = True
        ident = _proc_start(job.pid)  # it cannot be reaped yet: we have not waited
        job.pid_start = ident[1] if ident is not None else None
        try:
            self.store.update(job.seq, {"state": RUNNING, "pid": job.pid, "pid_start": job.pid_start,
                                        "boot_id": self._boot_id, "start_time": time.time()})
        except (sqlite3.Error, OSError) as exc:  # a restart finds it through its $0 marker
            log.error("job %s: cannot record its start: %s", job.job_id, exc)
        self._watch(job)

    # -- watching --------------------------------------------------------------------------

    def _watch(self, job: _Job) -> None:
        if self._use_pidfd:
            try:
                job.pidfd = os.pidfd_open(job.pid)
            except OSError as exc:
                if exc.errno in (errno.ENOSYS, errno.EPERM):
                    self._use_pidfd = False  # old kernel or seccomp: poll instead
                elif exc.errno != errno.ESRCH:
                    log.warning("job %s: pidfd_open: %s; polling it", job.job_id, exc)
        if job.pidfd is not None:
            if not job.child and not _same_process(job.pid, job.pid_start):
                os.close(job.pidfd)  # it ended (or the pid was reused) before the pidfd was open
                job.pidfd = None
                self._ended(job)
                return
            self._loop.add_reader(job.pidfd, self._ended, job)
        elif not job.child and not _same_process(job.pid, job.pid_start):
            self._ended(job)
            return
        self._arm_tick()

    def _unwatch(self, job: _Job) -> None:
        if job.pidfd is not None:
            self._loop.remove_reader(job.pidfd)
            os.close(job.pidfd)
            job.pidfd = None

    def _gone(self, job: _Job) -> bool:
        """Polling (no pidfd): has the job's wrapper ended?"""
        if job.child:
            return self._reap(job)
        return not _same_process(job.pid, job.pid_start)

    @staticmethod
    def _reap(job: _Job) -> bool:
        """Wait (without blocking) for our own child; True once it has ended (status in job.status)."""
        if job.status is not None:
            return True
        if job.popen is not None:
            job.status = job.popen.poll()
            return job.status is not None
        try:
            pid, status = os.waitpid(job.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else: ended, status unknown
            return True
        if pid == 0:
            return False
        job.status = os.waitstatus_to_exitcode(status)
        return True

    def _arm_tick(self) -> None:
        if self._tick is not None or self._closing:
            return
        running = [j for j in self._active.values() if j.pid is not None]
        if running:
            period = self._cap_period
            if any(j.pidfd is None for j in running):
                period = min(POLL_PERIOD, period)
            self._tick = self._loop.call_later(period, self._on_tick)

    def _on_tick(self) -> None:
        """While jobs run: cap their output files; without pidfd, notice their ends."""
        self._tick = None
        fast = False
        for job in list(self._active.values()):
            if job.pid is None or job.concluded:
                continue
            if job.pidfd is None and self._gone(job):
                self._ended(job)
                continue
            fast = self._cap_running(job) or fast
        self._cap_period = max(CAP_PERIOD_MIN, self._cap_period / 4) if fast else min(CAP_PERIOD, self._cap_period * 2)
        self._arm_tick()

    def _cap_running(self, job: _Job) -> bool:
        """Truncate a running job's files back to its limit; True if one grew by more than that."""
        fast = False
        limit = job.output_limit
        for name in _STREAMS:
            path = os.path.join(job.dir, name)
            try:
                size = os.stat(path).st_size
                if size <= limit:
                    continue
                os.truncate(path, limit)
            except OSError:
                continue
            fast = fast or size - limit > max(limit, 1 << 20)
            if not job.truncated[name]:
                job.truncated[name] = True
                try:
                    self.store.update(job.seq, {f"{name}_truncated": 1})
                except (sqlite3.Error, OSError):
                    pass  # the end records it
        return fast

    def _ended(self, job: _Job) -> None:
        """The wrapper is gone: reap it, read the status it wrote, record the end."""
        if job.concluded:
            return
        self._unwatch(job)
        if job.child:
            self._reap(job)
        else:
            try:
                os.waitpid(job.pid, os.WNOHANG)  # our child from an earlier manager in this process
            except ChildProcessError:
                pass
        text = _read_status(os.path.join(job.dir, _RC_FILE))
        status, why, note = job.status, "", ""
        if text is None and status is not None:
            if status < 0:
                why = f"its wrapper was {execute._describe_signal(status)} before it could record the exit status"
            else:  # the wrapper exits with the command's status: the file write failed (full disk?)
                text, note = str(status), f"exit status from the wrapper: it could not write it to {job.dir}"
        state, rc, error = self._end_state(job, text, why)
        self._conclude(job, state, rc, "; ".join(filter(None, (error, note))))
        self._kill_leftovers(job)
        self._schedule()

    def _end_state(self, job: _Job, text: Optional[str], why_lost: str) -> Tuple[str, Optional[int], str]:
        """(state, rc, error) of an ended job from what its wrapper wrote (see _read_status)."""
        if text == _CD_FAILED:
            reason = _first_line(os.path.join(job.dir, "stderr"))
            return FAILED, None, f"cannot start the command: cannot change to directory {job.cwd}" + (
                f" ({reason})" if reason else "")
        rc = None if text is None else int(text)
        if job.kill_reason == "kill":
            return KILLED, rc, "killed on request"
        if job.kill_reason == "timeout":
            return TIMEOUT, rc, f"timed out after {job.spec['timeout']}s (process group killed)"
        if rc == 0:
            return DONE, 0, ""
        if rc is not None:
            return FAILED, rc, _describe_rc(rc)
        return LOST, None, why_lost or "the job's process vanished without recording an exit status"

    def _kill_leftovers(self, job: _Job) -> None:
        """What the command left running in its group dies with the job."""
        if job.kill_task is not None or job.pid is None:
            return
        try:
            os.killpg(job.pid, 0)
        except ProcessLookupError:
            return  # the usual case: nothing left
        except PermissionError:
            pass
        if execute._group_has_live_member(job.pid):
            log.info("job %s ended; killing what it left in its process group %d", job.job_id, job.pid)
            self._spawn(self._terminate_leftovers(job))

    async def _terminate_leftovers(self, job: _Job) -> None:
        await execute._terminate_group(self._loop, job.pid, job.exited, self.kill_grace)
        for name in _STREAMS:  # what they wrote meanwhile beyond the limit is not kept
            path = os.path.join(job.dir, name)
            try:
                if os.stat(path).st_size > job.output_limit:
                    os.truncate(path, job.output_limit)
            except OSError:
                pass

    # -- recording ends ----------------------------------------------------------------------

    def _conclude(self, job: _Job, state: str, rc: Optional[int], error: str,
                  extra: Optional[Dict[str, Any]] = None, strict: bool = False) -> None:
        """Record the end of a job (once), free its slots, wake whoever waits for it.

        strict: the store write comes first and its error propagates (for a job that is
        neither starting nor running: nothing else has changed then)."""
        if job.concluded:
            return
        job.concluded = True
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        if self._active.pop(job.seq, None) is not None:
            self._used -= job.slots
        fields: Dict[str, Any] = {"state": state, "rc": rc, "error": error, "end_time": time.time()}
        fields.update(extra or {})
        stored = job.spec_bytes
        useless = [_RC_FILE]  # files the record does not need once the end is written
        for name in _STREAMS:
            path = os.path.join(job.dir, name)
            try:
                size = os.stat(path).st_size
                if size > job.output_limit:
                    os.truncate(path, job.output_limit)
                    job.truncated[name] = True
                    size = job.output_limit
            except OSError:
                size = 0
            if not size:
                useless.append(name)
            stored += size
            fields[f"{name}_truncated"] = int(job.truncated[name])
        fields["stored_bytes"] = stored
        if strict:
            self._flush_pending()
            try:
                self._remove_dirs(self.store.finish(job.seq, fields, time.time(), self.retention))
            except BaseException:
                job.concluded = False
                raise
        else:
            self._write_end(job.seq, fields)
        if job.seq not in self._pending:
            # Held inodes matter as much as bytes (job caches that exhausted inodes):
            # a finished job without output keeps no file at all.
            self._remove_files(job.dir, useless)
        if not job.exited.done():
            job.exited.set_result(None)

    def _write_end(self, seq: int, fields: Dict[str, Any]) -> None:
        """One transaction: the end of job seq and a purge step.  On a store error the
        end is kept in memory (queries show it) and written at the next occasion."""
        self._pending[seq] = fields
        self._flush_pending()

    def _flush_pending(self) -> None:
        for seq, fields in list(self._pending.items()):
            try:
                purged = self.store.finish(seq, fields, time.time(), self.retention)
            except (sqlite3.Error, OSError) as exc:
                log.error("job store: cannot record the end of a job (kept in memory, retried): %s", exc)
                return
            del self._pending[seq]
            self._remove_dirs(purged)

    def _remove_dirs(self, seqs: Sequence[int]) -> None:
        for seq in seqs:
            self._remove_files(self._dir(seq), _STREAMS + (_RC_FILE,))

    @staticmethod
    def _remove_files(where: str, names: Sequence[str]) -> None:
        """Remove these files of a job's directory, and the directory once it is empty."""
        for name in names:
            try:
                os.unlink(os.path.join(where, name))
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove %s/%s: %s", where, name, exc)
        try:
            os.rmdir(where)
        except (FileNotFoundError, OSError) as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                log.warning("cannot remove %s: %s", where, exc)

    # -- re-adoption --------------------------------------------------------------------------

    def _recover(self, row: sqlite3.Row) -> None:
        """A job that was running (or being started) when the previous manager stopped."""
        seq = row["seq"]
        job = _Job(self._loop, seq, row["job_id"], row["slots"], json.loads(row["spec"]), self._dir(seq))
        job.spec_bytes = row["stored_bytes"]
        job.kill_reason = row["kill_reason"]
        job.truncated = {name: bool(row[f"{name}_truncated"]) for name in _STREAMS}
        try:
            job.cwd = self._resolve_cwd(job.job_id, job.spec["cwd"])
        except JobError:  # the base dir changed: only for messages here
            job.cwd = job.spec["cwd"]
        pid, start_time = row["pid"], row["start_time"]
        extra: Dict[str, Any] = {}
        if row["state"] == QUEUED:
            # Its files exist but its start was not recorded: the daemon stopped between the
            # two.  The wrapper carries the job's marker as $0: find it rather than run it twice.
            start_time = os.stat(self._dir(seq)).st_mtime
            pid = _find_wrapper(f"{_MARKER}:{self.store.store_id}:{seq}")
            extra["start_time"] = start_time
            if pid is not None:
                ident = _proc_start(pid)
                job.pid_start = ident[1] if ident is not None else None
                self.store.update(seq, {"state": RUNNING, "pid": pid, "pid_start": job.pid_start,
                                        "boot_id": self._boot_id, "start_time": start_time})
                row = self.store.by_seq(seq)
        else:
            job.pid_start = row["pid_start"]
        alive = (pid is not None and (row["boot_id"] or "") == self._boot_id
                 and _same_process(pid, job.pid_start))
        if not alive:
            rc_path = os.path.join(self._dir(seq), _RC_FILE)
            text = _read_status(rc_path)
            if text is not None:
                extra["end_time"] = os.stat(rc_path).st_mtime  # when the wrapper wrote it
                why = ""
            elif row["state"] == QUEUED:
                why = "the daemon stopped while starting it (it may not have run)"
            elif (row["boot_id"] or "") != self._boot_id:
                why = "the node rebooted while it ran (no exit status recorded)"
            else:
                now = _proc_start(pid) if pid is not None else None
                why = ""
                if now is not None and now[1] != job.pid_start:
                    why = f"its process vanished without an exit status (pid {pid} now belongs to another process)"
            self._conclude(job, *self._end_state(job, text, why), extra=extra)
            if pid is not None and (row["boot_id"] or "") == self._boot_id:
                now = _proc_start(pid)
                if now is None or now[1] == job.pid_start:  # gone, or our wrapper as a zombie
                    job.pid = pid  # what it left in its group dies now, as it would have then
                    self._kill_leftovers(job)
            return
        job.pid = pid
        self._active[seq] = job
        self._used += job.slots
        self._watch(job)
        if job.concluded:
            return
        if job.kill_reason is not None:
            self._begin_kill(job, job.kill_reason)  # finish what the previous daemon began
        elif job.spec["timeout"] is not None:
            left = start_time + job.spec["timeout"] - time.time()
            if left <= 0:
                self._on_timeout(job)
            else:
                job.timer = self._loop.call_later(left, self._on_timeout, job)

    # -- records -----------------------------------------------------------------------------

    def _dir(self, seq: int) -> str:
        return os.path.join(self.jobs_dir, str(seq))

    def _record(self, row: sqlite3.Row, with_output: bool, output_limit: Optional[int]) -> JobRecord:
        values = dict(row)
        pending = self._pending.get(row["seq"])
        if pending is not None:
            values.update(pending)
        spec = json.loads(values["spec"])
        argv = spec["argv"]
        rec = JobRecord(
            id=values["job_id"], state=values["state"], rc=values["rc"], submit_time=values["submit_time"],
            start_time=values["start_time"], end_time=values["end_time"], user=spec["user"],
            command=spec["shell"] if argv is None else shlex.join(argv), shell=spec["shell"], argv=argv,
            cwd=spec["cwd"], slots=spec["slots"], timeout=spec["timeout"], output_limit=spec["output_limit"],
            pid=values["pid"], stdout_truncated=bool(values["stdout_truncated"]),
            stderr_truncated=bool(values["stderr_truncated"]), error=values["error"],
            submitter=values["submitter"], request_id=values["request_id"],
            kill_requested=values["kill_reason"] is not None)
        if with_output and (values["start_time"] is not None or values["pid"] is not None):
            keep = rec.output_limit if output_limit is None else max(0, min(output_limit, rec.output_limit))
            where = self._dir(values["seq"])
            for name in _STREAMS:
                try:
                    with open(os.path.join(where, name), "rb") as fh:
                        data = fh.read(keep)
                        more = os.fstat(fh.fileno()).st_size > len(data)
                except OSError:
                    continue
                setattr(rec, name, data)
                if more:
                    setattr(rec, f"{name}_truncated", True)
        return rec

    # -- helpers -----------------------------------------------------------------------------

    def _require_started(self) -> None:
        if self._loop is None or self._closing:
            raise JobError("the job manager is not running", "closed")

    def _spawn(self, coro: Any) -> "asyncio.Task":
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: "asyncio.Task") -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("job manager task failed", exc_info=task.exception())
