"""Run one command on the local node: the daemon's executor.

Pure standard library (asyncio + subprocess): the daemon runs on compute nodes
with Python 3.9+.

What a caller can rely on:

* The status is the exit status, nothing else: ``PASS`` iff the command exited
  with 0.  Output on stderr never makes a command fail.
* The command runs in its own session, hence its own process group.  On
  timeout (or when the awaiting task is cancelled) the whole group gets
  SIGTERM, then SIGKILL after :data:`KILL_GRACE` seconds if anything of it is
  still alive.  The call returns at most about ``KILL_GRACE + REAP_WAIT``
  seconds after the deadline, even if some process (for instance one that
  escaped the group with ``setsid``) keeps the output pipes open.
* At most ``output_limit`` bytes of each of stdout and stderr are kept; the rest
  is read and thrown away (the command never blocks on a full pipe, memory
  stays bounded) and the ``*_truncated`` flag is set.
* Problems of the command (unknown user, bad cwd, program not found, exit
  status, signal, timeout) are reported in the :class:`ExecOutcome`; only a
  misuse of the API (both or neither of ``shell``/``argv``, wrong types, ...)
  raises ``ValueError``.
* Lookups that may block on a hung filesystem or name service (user and group
  database, ``stat`` of the cwd, program lookup in ``PATH``) run in a
  helper thread, so a dead NFS/Lustre mount or sssd stalls this command only,
  never the daemon's event loop.

Deliberate behaviours worth knowing:

* When the command's main process exits by itself, processes it left in the
  background are *not* killed (``nohup daemon &`` is a legitimate admin
  command).  Their output is drained for at most :data:`EXIT_DRAIN` seconds;
  then the pipes are closed (like Ansible's ``command`` module, unlike ssh
  which would hang).
* Processes that leave the process group themselves (``setsid``, double-fork
  daemons) cannot be tracked without cgroups and survive a timeout.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import pwd
import shutil
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

__all__ = [
    "DEFAULT_OUTPUT_LIMIT",
    "EXIT_DRAIN",
    "FAILED",
    "KILL_GRACE",
    "PASS",
    "REAP_WAIT",
    "SHELL",
    "TIMEOUT",
    "ExecOutcome",
    "run_command",
]

PASS = "PASS"
FAILED = "FAILED"
TIMEOUT = "TIMEOUT"

#: Bytes kept per stream (stdout, stderr); the rest is drained and dropped.
DEFAULT_OUTPUT_LIMIT = 1 << 20
#: Seconds between SIGTERM and SIGKILL of the process group.
KILL_GRACE = 1.0
#: Seconds allowed, after the last signal, for the main process to be reaped
#: and the output pipes to reach EOF before the call returns anyway.
REAP_WAIT = 0.5
#: Seconds the output pipes are still drained after the main process exited
#: by itself (background processes may hold them open).
EXIT_DRAIN = 1.0
#: The shell used for ``shell=`` commands.
SHELL = "/bin/sh"

_POLL = 0.05  # seconds between checks that the process group is gone


@dataclass
class ExecOutcome:
    """The result of one command run on the local node."""

    status: str  # PASS | FAILED | TIMEOUT
    rc: Optional[int] = None  # exit status; -signum if killed by a signal; None if it did not run to an end
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    error: str = ""  # why it is not PASS ("" when PASS)
    elapsed: float = 0.0  # seconds

    @property
    def ok(self) -> bool:
        return self.status == PASS


# --------------------------------------------------------------------------
# Argument checking (API misuse -> ValueError)
# --------------------------------------------------------------------------

def _check_text(name: str, value: Any, *, allow_bytes: bool = False) -> None:
    types = (str, bytes) if allow_bytes else (str,)
    if not isinstance(value, types):
        raise ValueError(f"{name} must be a str, not {type(value).__name__}")
    if ("\0" if isinstance(value, str) else b"\0") in value:
        raise ValueError(f"{name} contains a NUL character")


def _command_line(shell: Optional[str], argv: Optional[Sequence[str]]) -> List[Union[str, bytes]]:
    if (shell is None) == (argv is None):
        raise ValueError("run_command() needs exactly one of shell= (a shell command line) or argv= (a program and its arguments)")
    if shell is not None:
        _check_text("shell", shell)
        if not shell:
            raise ValueError("shell= is an empty command line")
        return [SHELL, "-c", shell]
    if isinstance(argv, (str, bytes)):
        raise ValueError("argv= must be a sequence of arguments, not a single string (use shell= for a command line)")
    try:
        args = list(argv)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"argv= must be a sequence of arguments, not {type(argv).__name__}") from None
    if not args:
        raise ValueError("argv= is empty: it needs at least the program to run")
    for i, arg in enumerate(args):
        _check_text(f"argv[{i}]", arg, allow_bytes=True)
    return args


def _check_env(env: Optional[Mapping[str, str]]) -> Dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise ValueError(f"env= must be a mapping of str to str, not {type(env).__name__}")
    out = {}
    for key, value in env.items():
        _check_text("env name", key)
        if not key or "=" in key:
            raise ValueError(f"invalid environment variable name {key!r}")
        _check_text(f"env[{key!r}]", value)
        out[key] = value
    return out


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, not {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} is NaN")
    return value


# --------------------------------------------------------------------------
# Blocking preparation (run in a helper thread)
# --------------------------------------------------------------------------

@dataclass
class _Plan:
    error: str = ""
    popen_kwargs: Dict[str, Any] = field(default_factory=dict)
    identity: Optional[pwd.struct_passwd] = None
    program_found: bool = False
    program_path: str = ""  # where PATH lookup found the program (as given when it has a /)


def _user_label(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _prepare(user: Optional[str], cwd: str, program: Union[str, bytes, None], path: str) -> _Plan:
    """Everything that touches the user database or the filesystem before the spawn."""
    plan = _Plan()
    if user is not None:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            return _Plan(error=f"unknown user '{user}'")
        except Exception as exc:  # name service trouble
            return _Plan(error=f"cannot look up user '{user}': {exc}")
        euid = os.geteuid()
        if euid == 0:
            try:
                groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
            except Exception as exc:
                return _Plan(error=f"cannot get the groups of user '{user}': {exc}")
            plan.popen_kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": groups}
        elif pw.pw_uid != euid:
            return _Plan(error=f"cannot run as user '{user}': the daemon runs as {_user_label(euid)}, not as root")
        plan.identity = pw

    if not os.path.isabs(cwd):
        return _Plan(error=f"cwd {cwd}: not an absolute path")
    try:
        st = os.stat(cwd)
    except OSError as exc:
        return _Plan(error=f"cwd {cwd}: {exc.strerror or exc}")
    if not stat.S_ISDIR(st.st_mode):
        return _Plan(error=f"cwd {cwd}: {os.strerror(errno.ENOTDIR)}")

    # Resolve the program the way exec will, so that a hung directory of PATH
    # hangs here (in a thread) and not in the fork/exec (in the event loop),
    # and so that a missing #! interpreter can be told from a missing program.
    if program is not None:
        name = os.fsdecode(program)
        try:
            if "/" in name:
                full = os.path.join(cwd, name)
                plan.program_found = os.path.isfile(full)
                plan.program_path = name
            else:
                plan.program_path = shutil.which(name, path=path) or ""
                plan.program_found = bool(plan.program_path)
        except Exception:
            pass
    return plan


def _in_thread(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> "asyncio.Future[Any]":
    """Run fn(*args) in a daemon thread: one stuck on a dead mount never blocks exit."""
    fut = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def target() -> None:
        try:
            value, ok = fn(*args), True
        except BaseException as exc:  # delivered to the awaiting task
            value, ok = exc, False
        try:
            loop.call_soon_threadsafe(deliver, ok, value)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=target, name="relaytree-exec-prepare", daemon=True).start()
    return fut


# --------------------------------------------------------------------------
# The process
# --------------------------------------------------------------------------

class _Capture(asyncio.SubprocessProtocol):
    """Keeps the first `limit` bytes of stdout/stderr, counts (and drops) the rest."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.limit = limit
        self.kept = {1: bytearray(), 2: bytearray()}
        self.total = {1: 0, 2: 0}
        self.eof = {1: loop.create_future(), 2: loop.create_future()}
        self.exited = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        buf = self.kept.get(fd)
        if buf is None:
            return
        room = self.limit - len(buf)
        if room > 0:
            buf += data if len(data) <= room else data[:room]
        self.total[fd] += len(data)

    def pipe_connection_lost(self, fd: int, exc: Optional[Exception]) -> None:
        fut = self.eof.get(fd)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        for fut in (*self.eof.values(), self.exited):
            if not fut.done():
                fut.set_result(None)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send sig to the process group; False if the group no longer exists."""
    if pgid <= 1:  # never signal our own group (0) or every process (-1/1)
        return False
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # some member changed uid (setuid program): it exists
        return True
    return True


def _group_has_live_member(pgid: int) -> bool:
    """Does a process of group pgid still exist (zombies do not count)?

    kill(-pgid, 0) also succeeds for zombies, and members orphaned by the
    group leader stay zombies for as long as init does not reap them (for ever
    in some containers): on Linux, look at /proc instead.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        pids = os.listdir("/proc")
    except OSError:
        return True
    for name in pids:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # fields[0] is the state, fields[2] the process group
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _group_gone(pgid: int, exited: "asyncio.Future[Any]") -> bool:
    """True once the main process is reaped (``exited`` done) and no live member of its group is left."""
    return exited.done() and not _group_has_live_member(pgid)


async def _wait_group_gone(loop: asyncio.AbstractEventLoop, pgid: int, exited: "asyncio.Future[Any]",
                           until: float, poll: float) -> bool:
    """Wait until the group is gone (True) or loop time `until` (False)."""
    while not _group_gone(pgid, exited):
        left = until - loop.time()
        if left <= 0:
            return False
        if exited.done():
            await asyncio.sleep(min(poll, left))
        else:
            await asyncio.wait([exited], timeout=min(poll * 2, left))
    return True


async def _terminate_group(loop: asyncio.AbstractEventLoop, pgid: int, exited: "asyncio.Future[Any]",
                           kill_grace: float) -> float:
    """SIGTERM the group, SIGKILL it after the grace; return the loop time of the last signal.

    ``exited`` is done once the group's main process is reaped.  A
    cancellation while waiting sends SIGKILL at once and propagates.
    """
    last = loop.time()
    if not _signal_group(pgid, signal.SIGTERM):
        return last
    try:
        if not await _wait_group_gone(loop, pgid, exited, last + kill_grace, _POLL):
            last = loop.time()
            _signal_group(pgid, signal.SIGKILL)
            # SIGKILLed processes die at once, but not synchronously: wait
            # for them, so that nothing of the command is left on return.
            await _wait_group_gone(loop, pgid, exited, last + REAP_WAIT, _POLL / 2.5)
    except asyncio.CancelledError:
        if not _group_gone(pgid, exited):
            _signal_group(pgid, signal.SIGKILL)
        raise
    return last


def _environment(identity: Optional[pwd.struct_passwd], extra_env: Mapping[str, str]) -> Dict[str, str]:
    """A command's environment: the daemon's, the user's identity, then the caller's."""
    env = dict(os.environ)
    if identity is not None:
        env.update(HOME=identity.pw_dir, USER=identity.pw_name, LOGNAME=identity.pw_name)
    env.update(extra_env)
    return env


def _describe_signal(rc: int) -> str:
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = "unknown signal"
    return f"killed by signal {-rc} ({name})"


def _spawn_failure(exc: BaseException, program: str, cwd: str, plan: _Plan) -> "tuple[Optional[int], str]":
    """(rc, error) for an exception raised while starting the process."""
    if isinstance(exc, OSError) and exc.filename is not None:
        filename = os.fsdecode(exc.filename)
        reason = exc.strerror or str(exc)
        if filename == cwd and filename != program:
            # _posixsubprocess failed before exec: chdir, setgroups, setgid or setuid.
            return None, f"cannot start the command (chdir to {cwd} or switch of user): {reason}"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            if plan.program_found:
                return 126, f"{program}: cannot execute: its #! interpreter or its dynamic loader is missing ({reason})"
            return 127, f"{program}: command not found"
        return 126, f"{program}: cannot execute: {reason}"
    return None, f"cannot start the command: {exc}"


class _Execution:
    def __init__(self, loop: asyncio.AbstractEventLoop, output_limit: int, kill_grace: float) -> None:
        self.loop = loop
        self.capture = _Capture(loop, output_limit)
        self.kill_grace = kill_grace
        self.transport: Optional[asyncio.SubprocessTransport] = None
        self.pgid = 0

    # -- output ------------------------------------------------------------
    def outcome(self, status: str, rc: Optional[int], error: str, started: float) -> ExecOutcome:
        cap = self.capture
        return ExecOutcome(
            status=status,
            rc=rc,
            stdout=bytes(cap.kept[1]),
            stderr=bytes(cap.kept[2]),
            stdout_truncated=cap.total[1] > len(cap.kept[1]),
            stderr_truncated=cap.total[2] > len(cap.kept[2]),
            error=error,
            elapsed=time.monotonic() - started,
        )

    async def drain(self, until: float) -> bool:
        """Wait for EOF on stdout and stderr until loop time `until`; True if both reached."""
        pending = [f for f in self.capture.eof.values() if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, until - self.loop.time()))
        return all(f.done() for f in self.capture.eof.values())

    # -- killing -------------------------------------------------------------
    async def terminate(self) -> float:
        """SIGTERM the group, SIGKILL it after the grace (see _terminate_group)."""
        return await _terminate_group(self.loop, self.pgid, self.capture.exited, self.kill_grace)

    async def wait_gone(self, until: float, poll: float) -> bool:
        return await _wait_group_gone(self.loop, self.pgid, self.capture.exited, until, poll)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- the whole run -------------------------------------------------------
    async def spawn(self, cmd: List[Union[str, bytes]], stdin: bytes, popen_kwargs: Dict[str, Any]) -> None:
        """Start the process; OSError etc. propagate. Cancellation kills what was started."""
        task = asyncio.ensure_future(
            self.loop.subprocess_exec(
                lambda: self.capture,
                *cmd,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                **popen_kwargs,
            )
        )
        try:
            self.transport, _ = await asyncio.shield(task)
        except asyncio.CancelledError:
            # The spawn goes on in its own task (it cannot be interrupted
            # cleanly): wait for it, then kill whatever it started.
            def kill_spawned(t: "asyncio.Future[Any]") -> None:
                if t.cancelled() or t.exception() is not None:
                    return
                transport, _ = t.result()
                _signal_group(transport.get_pid(), signal.SIGKILL)
                transport.close()

            try:
                await asyncio.wait([task])
                if not task.cancelled() and task.exception() is None:
                    self.transport, _ = task.result()
                    self.pgid = self.transport.get_pid()
                    _signal_group(self.pgid, signal.SIGKILL)
                    await self.wait_gone(self.loop.time() + REAP_WAIT, _POLL / 2.5)
            except asyncio.CancelledError:  # cancelled again: do not wait any more
                if not task.done():
                    task.add_done_callback(kill_spawned)
                elif self.transport is not None:
                    _signal_group(self.pgid, signal.SIGKILL)
            raise
        self.pgid = self.transport.get_pid()
        if stdin:
            pipe = self.transport.get_pipe_transport(0)
            if pipe is not None:
                # A process that does not read its stdin makes this fail with
                # EPIPE: the pipe transport swallows it, as it should.
                pipe.write(stdin)
                pipe.close()  # EOF once the data is flushed

    async def supervise(self, deadline: Optional[float], timeout: Optional[float], started: float) -> ExecOutcome:
        loop, cap = self.loop, self.capture
        left = None if deadline is None else max(0.0, deadline - loop.time())
        try:
            await asyncio.wait([cap.exited], timeout=left)
        except asyncio.CancelledError:
            if not cap.exited.done():
                try:
                    await self.terminate()
                except asyncio.CancelledError:
                    pass
            raise

        if cap.exited.done():
            rc = self.transport.get_returncode() if self.transport is not None else None
            await self.drain(loop.time() + EXIT_DRAIN)
            if rc is None:  # cannot happen: exited means reaped
                return self.outcome(FAILED, None, "the command ended with an unknown status", started)
            if rc == 0:
                return self.outcome(PASS, 0, "", started)
            # A plain non-zero exit is said by rc alone; a signal death needs words.
            return self.outcome(FAILED, rc, _describe_signal(rc) if rc < 0 else "", started)

        # Timed out.
        last = await self.terminate()
        error = f"timed out after {float(timeout or 0)}s (process group killed)"
        if not cap.exited.done():
            error += f"; pid {self.pgid} did not die after SIGKILL (uninterruptible sleep: hung filesystem?)"
        elif not await self.drain(last + REAP_WAIT):
            error += "; its output pipes were still held open by a process outside its process group"
        return self.outcome(TIMEOUT, None, error, started)


async def run_command(
    *,
    shell: Optional[str] = None,
    argv: Optional[Sequence[str]] = None,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    user: Optional[str] = None,
    stdin: bytes = b"",
    timeout: Optional[float] = None,
    output_limit: int = DEFAULT_OUTPUT_LIMIT,
    kill_grace: float = KILL_GRACE,
) -> ExecOutcome:
    """Run one command (``shell=`` via ``/bin/sh -c``, or ``argv=``) and return its outcome.

    ``env`` is added on top of the daemon's environment; with ``user``, HOME,
    USER and LOGNAME are those of that user (unless ``env`` sets them).
    ``cwd`` defaults to ``/``.  ``stdin`` is fed to the command then closed
    (``/dev/null`` when empty).  ``timeout`` (seconds, None for none) covers
    the whole run; on expiry the process group is terminated (SIGTERM, then
    SIGKILL after ``kill_grace`` seconds).  Raises ``ValueError`` on API
    misuse only; every problem of the command itself is in the outcome.
    """
    cmd = _command_line(shell, argv)
    extra_env = _check_env(env)
    if cwd is None:
        cwd = "/"
    else:
        try:
            cwd = os.fspath(cwd)
        except TypeError:
            raise ValueError(f"cwd must be a path, not {type(cwd).__name__}") from None
        _check_text("cwd", cwd)
        if not cwd:
            raise ValueError("cwd is empty (use None for the default, /)")
    if user is not None:
        _check_text("user", user)
        if not user:
            raise ValueError("user is empty (use None to run as the daemon's user)")
    if not isinstance(stdin, (bytes, bytearray, memoryview)):
        raise ValueError(f"stdin must be bytes, not {type(stdin).__name__}")
    stdin = bytes(stdin)
    if timeout is not None:
        timeout = _check_number("timeout", timeout)
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, not {timeout}")
        if math.isinf(timeout):
            timeout = None
    if isinstance(output_limit, bool) or not isinstance(output_limit, int) or output_limit < 0:
        raise ValueError(f"output_limit must be an int >= 0, not {output_limit!r}")
    kill_grace = _check_number("kill_grace", kill_grace)
    if kill_grace < 0:
        raise ValueError("kill_grace must be >= 0")

    loop = asyncio.get_running_loop()
    started = time.monotonic()
    deadline = None if timeout is None else loop.time() + timeout

    program = cmd[0] if argv is not None else None
    path = os.pathsep.join(os.get_exec_path({**os.environ, **extra_env}))

    def not_run(status: str, error: str, rc: Optional[int] = None) -> ExecOutcome:
        return ExecOutcome(status=status, rc=rc, error=error, elapsed=time.monotonic() - started)

    if not cmd[0]:  # like a shell running "": a command-level problem
        return not_run(FAILED, "empty program name (argv[0]): command not found", 127)

    # 1. Lookups that may block (user database, cwd, PATH): in a thread.
    try:
        prep = _in_thread(loop, _prepare, user, cwd, program, path)
    except RuntimeError as exc:  # cannot start a thread: resource exhaustion
        return not_run(FAILED, f"cannot start the command: {exc}")
    try:
        await asyncio.wait([prep], timeout=None if deadline is None else max(0.0, deadline - loop.time()))
    except asyncio.CancelledError:
        prep.cancel()
        raise
    if not prep.done():
        prep.cancel()
        return not_run(
            TIMEOUT,
            f"timed out after {timeout}s before the command could start "
            "(user lookup, cwd or program lookup blocked: hung filesystem or name service?)",
        )
    try:
        plan: _Plan = prep.result()
    except Exception as exc:
        return not_run(FAILED, f"cannot start the command: {exc}")
    if plan.error:
        return not_run(FAILED, plan.error)

    # 2. Environment: the daemon's, the user's identity, then the caller's.
    full_env = _environment(plan.identity, extra_env)

    # 3. Run.
    execution = _Execution(loop, output_limit, kill_grace)
    try:
        try:
            await execution.spawn(cmd, stdin, dict(plan.popen_kwargs, cwd=cwd, env=full_env))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            rc, error = _spawn_failure(exc, os.fsdecode(cmd[0]), cwd, plan)
            return not_run(FAILED, error, rc)
        return await execution.supervise(deadline, timeout, started)
    finally:
        execution.close()
