"""`relaytree supervise`: keep `relaytree serve` running on nodes without systemd.

Standard library only (Python 3.9+, Linux). The supervisor

* runs ``relaytree serve ...`` (same interpreter, same options) as its child and
  restarts it with exponential backoff when it dies (the backoff resets once a
  child has stayed up for ``STABLE_SECONDS``); the child gets SIGTERM if the
  supervisor itself dies (``PR_SET_PDEATHSIG``), so no orphan keeps the port;
* forwards SIGTERM/SIGINT to the daemon (which drains in-flight work), waits up
  to ``--stop-timeout`` seconds, then SIGKILLs it, and exits; SIGHUP restarts
  the daemon at once (no backoff);
* holds an exclusive ``flock`` on its pid file for its whole life: that lock,
  not the pid, says whether it runs (no confusion with a recycled pid), and a
  second supervisor on the same pid file refuses to start;
* writes the daemon's output and its own messages to ``--log-file`` with size
  based rotation (``--log-max-bytes``, ``--log-backups``: nodes with a RAM
  root file system must not fill it), or to stderr in the foreground;
* with ``--detach`` double-forks into its own session and returns once the
  daemon logs that it serves (or with the daemon's last output and status 1 if
  it dies first): a failed start is a failed command, not a silent loop.

Idempotent start: ``relaytree supervise --detach --watch FILE ...`` records a
fingerprint of the daemon command line and of the watched files (config, TLS
material, installed package stamp) in ``PIDFILE.json``. Run again, it prints
``already running`` and changes nothing when the fingerprint is the same, and
restarts the daemon when it differs: a configuration change is never left
unapplied, even after an interrupted deployment.

Other actions: ``--stop`` (drain and stop; exit 0 also when not running),
``--restart`` (stop, then start), ``--status`` (exit 0 when running, 3 when
not; one JSON line on stdout).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from typing import Callable, List, Optional

DEFAULT_PID_FILE = "/run/relaytree/relaytreed.pid"
DEFAULT_LOG_FILE = "/var/log/relaytree/relaytreed.log"
# What `relaytree serve` logs once its port is open (relaytree.server.serve).
READY_MARK = b" serving on "
STABLE_SECONDS = 30.0
TAIL_BYTES = 4096
STATUS_NOT_RUNNING = 3
PR_SET_PDEATHSIG = 1

# `relaytree serve` options passed through to the daemon: (option, attribute, takes a value).
SERVE_OPTIONS = (("--config", "config", True), ("--listen", "listen", True),
                 ("--state-dir", "state_dir", True), ("--base-dir", "base_dir", True),
                 ("--log-level", "log_level", True), ("--insecure", "insecure", False))


class SuperviseError(Exception):
    pass


def _size(text: str) -> int:
    t = text.strip().lower().rstrip("ib")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    try:
        value = int(t[:-1] if mult != 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError("bad size %r (e.g. 10m)" % text) from None
    if value < 0:
        raise argparse.ArgumentTypeError("size must not be negative")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number of seconds" % text) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive, got %s" % text)
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `relaytree supervise` (called by relaytree.cli)."""
    action = p.add_mutually_exclusive_group()
    action.add_argument("--stop", action="store_true",
                        help="stop the supervisor and its daemon (drain first); 0 also if not running")
    action.add_argument("--restart", action="store_true", help="stop (if running), then start")
    action.add_argument("--status", action="store_true",
                        help="exit 0 when running, %d when not; JSON on stdout" % STATUS_NOT_RUNNING)
    p.add_argument("--detach", action="store_true",
                   help="run in the background (own session); return once the daemon serves")
    p.add_argument("--pid-file", default=DEFAULT_PID_FILE, metavar="FILE",
                   help="pid file, locked while the supervisor runs (default %(default)s)")
    p.add_argument("--log-file", metavar="FILE",
                   help="daemon and supervisor log (default: stderr; with --detach %s)" % DEFAULT_LOG_FILE)
    p.add_argument("--log-max-bytes", type=_size, default=10 << 20, metavar="SIZE",
                   help="rotate the log at this size, 0: never (default 10m)")
    p.add_argument("--log-backups", type=int, default=3, metavar="N", help="rotated logs kept (default 3)")
    p.add_argument("--watch", action="append", default=[], metavar="FILE",
                   help="restart on start when this file changed since the daemon started (repeatable)")
    p.add_argument("--min-backoff", type=_seconds, default=1.0, metavar="SECONDS",
                   help="first delay before restarting a dead daemon (default %(default)s)")
    p.add_argument("--max-backoff", type=_seconds, default=60.0, metavar="SECONDS",
                   help="longest delay between restarts (default %(default)s)")
    p.add_argument("--stop-timeout", type=_seconds, default=45.0, metavar="SECONDS",
                   help="time the daemon gets to drain on stop before SIGKILL (default %(default)s)")
    p.add_argument("--ready-timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="with --detach: how long to wait for the daemon to serve (default %(default)s)")
    serve = p.add_argument_group("passed to `relaytree serve`")
    serve.add_argument("--config", metavar="FILE")
    serve.add_argument("--listen", metavar="ADDR:PORT")
    serve.add_argument("--state-dir", metavar="DIR")
    serve.add_argument("--base-dir", metavar="DIR")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--insecure", action="store_true")


def serve_argv(args) -> List[str]:
    argv = [sys.executable, "-m", "relaytree.cli", "serve"]
    for option, attr, has_value in SERVE_OPTIONS:
        value = getattr(args, attr, None)
        if has_value and value:
            argv += [option, str(value)]
        elif not has_value and value:
            argv.append(option)
    return argv


def fingerprint(argv: List[str], watched: List[str]) -> str:
    h = hashlib.sha256(json.dumps(argv).encode())
    for path in watched:
        h.update(b"\0" + os.fsencode(path) + b"\0")
        try:
            with open(path, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
        except OSError as exc:
            h.update(b"missing:%d" % (exc.errno or 0))
    return h.hexdigest()


# --------------------------------------------------------------------------- pid file


class PidFile:
    """A pid file that is flock'ed by its owner for as long as the owner runs."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.state_path = self.path + ".json"
        self.fd: Optional[int] = None

    def acquire(self) -> bool:
        """Take the lock (non-blocking): False when another process holds it."""
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            os.close(fd)  # the previous owner removed it between our open and flock: retry
        raise SuperviseError("cannot lock %s" % self.path)

    def write(self, pid: int) -> None:
        assert self.fd is not None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, b"%d\n" % pid, 0)

    def write_state(self, state: dict) -> None:
        tmp = "%s.tmp%d" % (self.state_path, os.getpid())
        with open(tmp, "w") as fh:
            json.dump(state, fh)
        os.replace(tmp, self.state_path)

    def read_state(self) -> dict:
        try:
            with open(self.state_path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return {}

    def owner(self) -> Optional[int]:
        """Pid of the process holding the lock (0 if unreadable), or None when nobody holds it."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    return int(os.pread(fd, 64, 0).split()[0])
                except (ValueError, IndexError):
                    return 0
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def remove_stale(self) -> None:
        """Remove the files of a supervisor that is gone (only when nobody holds the lock)."""
        if self.acquire():
            self.release()

    def release(self) -> None:
        if self.fd is None:
            return
        for path in (self.state_path, self.path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.close(self.fd)
        self.fd = None


# --------------------------------------------------------------------------- log


class LogWriter:
    """Append-only log with size based rotation (path None: stderr)."""

    def __init__(self, path: Optional[str], max_bytes: int, backups: int):
        self.path, self.max_bytes, self.backups = path, max_bytes, max(0, backups)
        self.fd = 2
        self.size = 0
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o750, exist_ok=True)
            self._open()

    def _open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self.size = os.fstat(self.fd).st_size

    def _rotate(self) -> None:
        os.close(self.fd)
        if self.backups == 0:
            os.unlink(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                src = "%s.%d" % (self.path, i)
                if os.path.exists(src):
                    os.replace(src, "%s.%d" % (self.path, i + 1))
            os.replace(self.path, self.path + ".1")
        self._open()

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.path and self.max_bytes and self.size and self.size + len(data) > self.max_bytes:
            try:
                self._rotate()
            except OSError:
                pass
        try:
            os.write(self.fd, data)
            self.size += len(data)
        except OSError:
            pass  # a full disk must not kill the supervisor

    def say(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.write(("%s relaytree-supervise[%d] %s\n" % (stamp, os.getpid(), message)).encode())

    def close(self) -> None:
        if self.path and self.fd > 2:
            os.close(self.fd)


# --------------------------------------------------------------------------- supervisor


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Supervisor:
    def __init__(self, argv: List[str], log: LogWriter, pidfile: PidFile, fp: str, *, min_backoff: float,
                 max_backoff: float, stop_timeout: float, ready_timeout: float):
        self.argv, self.log, self.pidfile, self.fp = argv, log, pidfile, fp
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self.stop_timeout, self.ready_timeout = stop_timeout, ready_timeout
        self.stopping = False
        self.restart_requested = False
        self.child: Optional[subprocess.Popen] = None

    def _on_term(self, signum, frame) -> None:
        self.stopping = True

    def _on_hup(self, signum, frame) -> None:
        self.restart_requested = True

    def _spawn(self) -> subprocess.Popen:
        child = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, close_fds=True, cwd="/",
                                 preexec_fn=_die_with_parent)
        self.pidfile.write_state({"pid": os.getpid(), "child_pid": child.pid, "fingerprint": self.fp,
                                  "argv": self.argv, "started": time.time()})
        self.log.say("started relaytree serve (pid %d): %s" % (child.pid, " ".join(self.argv)))
        return child

    def _pump(self, child: subprocess.Popen, on_ready: Optional[Callable[[str], None]]) -> bytes:
        """Copy the child's output to the log until it exits; handle stop/restart requests.
        Returns the tail of its output."""
        assert child.stdout is not None
        fd = child.stdout.fileno()
        os.set_blocking(fd, False)
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        tail = b""
        pending = b""  # partial line, only while waiting for readiness
        started = time.monotonic()
        term_sent: Optional[float] = None
        eof = False
        try:
            while True:
                if (self.stopping or self.restart_requested) and term_sent is None and child.poll() is None:
                    child.send_signal(signal.SIGTERM)
                    term_sent = time.monotonic()
                if term_sent is not None and child.poll() is None \
                        and time.monotonic() - term_sent > self.stop_timeout:
                    self.log.say("relaytree serve (pid %d) did not stop within %.0fs: SIGKILL"
                                 % (child.pid, self.stop_timeout))
                    child.kill()
                    term_sent = float("inf")
                if on_ready is not None and time.monotonic() - started > self.ready_timeout:
                    on_ready("started")  # alive, but it did not say it serves
                    on_ready = None
                if not eof:
                    for _key, _ev in sel.select(timeout=0.2):
                        try:
                            data = os.read(fd, 65536)
                        except BlockingIOError:
                            continue
                        if not data:
                            eof = True
                            break
                        self.log.write(data)
                        tail = (tail + data)[-TAIL_BYTES:]
                        if on_ready is not None:
                            pending = (pending + data)[-TAIL_BYTES:]
                            if READY_MARK in pending:
                                on_ready("ready")
                                on_ready = None
                else:
                    time.sleep(0.05)
                if eof and child.poll() is not None:
                    return tail
        finally:
            sel.close()
            child.stdout.close()

    def run(self, notify: Optional[Callable[[dict], None]] = None) -> int:
        """Supervise until SIGTERM/SIGINT. ``notify`` (detached start) hears about the first
        start: ready, started (alive but not confirmed) or failed (then this returns 1)."""
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        self.pidfile.write(os.getpid())
        self.log.say("supervisor started (pid file %s)" % self.pidfile.path)
        delay = self.min_backoff
        first = notify is not None
        try:
            while not self.stopping:
                self.restart_requested = False
                started = time.monotonic()
                try:
                    child = self._spawn()
                except OSError as exc:
                    self.log.say("cannot start relaytree serve: %s" % exc)
                    if first:
                        notify({"event": "failed", "message": "cannot start %s: %s" % (self.argv[0], exc)})
                        return 1
                    child = None
                ready_state = {"ready": False}
                if child is not None:
                    on_ready = None
                    if first:
                        def on_ready(event: str, child=child) -> None:
                            ready_state["ready"] = True
                            notify({"event": event, "pid": os.getpid(), "child_pid": child.pid})
                    tail = self._pump(child, on_ready)
                    uptime = time.monotonic() - started
                    if self.stopping:
                        self.log.say("relaytree serve (pid %d) stopped, status %s" % (child.pid, child.returncode))
                        break
                    if self.restart_requested:
                        self.log.say("restarting relaytree serve (SIGHUP)")
                        first = False
                        continue
                    self.log.say("relaytree serve (pid %d) exited with status %s after %.1fs"
                                 % (child.pid, child.returncode, uptime))
                    if first and not ready_state["ready"]:
                        notify({"event": "failed", "status": child.returncode,
                                "message": tail.decode("utf-8", "replace").strip()})
                        return 1
                    if uptime >= STABLE_SECONDS:
                        delay = self.min_backoff
                first = False
                self.log.say("restarting in %.1fs" % delay)
                end = time.monotonic() + delay
                while time.monotonic() < end and not self.stopping and not self.restart_requested:
                    time.sleep(0.1)
                delay = min(delay * 2, self.max_backoff)
        finally:
            self.log.say("supervisor exiting")
            self.pidfile.release()
            self.log.close()
        return 0


# --------------------------------------------------------------------------- actions


def _proc_cmdline(pid: int) -> bytes:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _kill_if_ours(pid: Optional[int]) -> None:
    if pid and b"relaytree" in _proc_cmdline(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop(pidfile: PidFile, timeout: float) -> Optional[int]:
    """Stop the supervisor holding ``pidfile``; its pid, or None when none ran."""
    pid = pidfile.owner()
    if pid is None:
        pidfile.remove_stale()
        return None
    state = pidfile.read_state()
    if pid > 0:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + timeout + 5.0  # the supervisor SIGKILLs the daemon after `timeout`
    while time.monotonic() < end:
        if pidfile.owner() is None:
            return pid
        time.sleep(0.05)
    _kill_if_ours(state.get("child_pid"))
    _kill_if_ours(pid)
    end = time.monotonic() + 5.0
    while pidfile.owner() is not None and time.monotonic() < end:
        time.sleep(0.05)
    if pidfile.owner() is not None:
        raise SuperviseError("supervisor pid %s did not stop" % pid)
    pidfile.remove_stale()
    return pid


def _detach(sup: Supervisor, pidfile: PidFile) -> dict:
    """Double fork; the grandchild supervises. Returns what it reported about the first start."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: new session, fork again so that the supervisor is no session leader
        code = 1
        try:
            os.close(r)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            os.chdir("/")
            os.umask(0o022)
            devnull = os.open(os.devnull, os.O_RDWR)
            for target in (0, 1, 2):
                os.dup2(devnull, target)
            if devnull > 2:
                os.close(devnull)
            reported = {"done": False}

            def notify(event: dict) -> None:
                if not reported["done"]:
                    reported["done"] = True
                    try:
                        os.write(w, (json.dumps(event) + "\n").encode())
                        os.close(w)
                    except OSError:
                        pass
            code = sup.run(notify)
        except BaseException:  # noqa: BLE001 - the detached process must never return to the caller
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    os.waitpid(pid, 0)
    data = b""
    end = time.monotonic() + sup.ready_timeout + sup.stop_timeout + 10.0
    os.set_blocking(r, False)
    sel = selectors.DefaultSelector()
    sel.register(r, selectors.EVENT_READ)
    try:
        while time.monotonic() < end and not data.endswith(b"\n"):
            if not sel.select(timeout=0.5):
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        sel.close()
        os.close(r)
    if pidfile.fd is not None:
        os.close(pidfile.fd)  # the grandchild keeps the lock (same open file description)
        pidfile.fd = None
    try:
        return json.loads(data.decode() or "{}")
    except ValueError:
        return {}


def _start(args, restarted: bool) -> int:
    argv = serve_argv(args)
    watched = [os.path.abspath(p) for p in args.watch]
    fp = fingerprint(argv, watched)
    pidfile = PidFile(args.pid_file)
    if not pidfile.acquire():
        state = pidfile.read_state()
        pid = pidfile.owner()
        if state.get("fingerprint") == fp:
            print("relaytree supervise: already running (pid %s, relaytree serve pid %s)"
                  % (pid, state.get("child_pid")))
            return 0
        if not args.detach:
            print("relaytree supervise: another supervisor runs with %s (pid %s)" % (pidfile.path, pid),
                  file=sys.stderr)
            return 1
        stop(pidfile, args.stop_timeout)
        restarted = True
        if not pidfile.acquire():
            print("relaytree supervise: %s is locked by another process" % pidfile.path, file=sys.stderr)
            return 1
    log_file = args.log_file or (DEFAULT_LOG_FILE if args.detach else None)
    log = LogWriter(log_file, args.log_max_bytes, args.log_backups)
    sup = Supervisor(argv, log, pidfile, fp, min_backoff=args.min_backoff, max_backoff=args.max_backoff,
                     stop_timeout=args.stop_timeout, ready_timeout=args.ready_timeout)
    if not args.detach:
        return sup.run()
    report = _detach(sup, pidfile)
    log.close()
    verb = "restarted" if restarted else "started"
    event = report.get("event")
    if event == "ready":
        print("relaytree supervise: %s (pid %s, relaytree serve pid %s); log %s"
              % (verb, report.get("pid"), report.get("child_pid"), log_file))
        return 0
    if event == "started":
        print("relaytree supervise: %s, but the daemon did not report serving within %.0fs (see %s)"
              % (verb, args.ready_timeout, log_file))
        return 0
    message = report.get("message") or "no report from the detached supervisor"
    print("relaytree supervise: relaytree serve failed to start (status %s); see %s:\n%s"
          % (report.get("status"), log_file, message), file=sys.stderr)
    return 1


def main(args) -> int:
    if args.min_backoff > args.max_backoff:
        print("relaytree supervise: --min-backoff is larger than --max-backoff", file=sys.stderr)
        return 2
    pidfile = PidFile(args.pid_file)
    try:
        if args.status:
            pid = pidfile.owner()
            state = pidfile.read_state() if pid is not None else {}
            print(json.dumps({"running": pid is not None, "pid": pid, "child_pid": state.get("child_pid"),
                              "fingerprint": state.get("fingerprint"), "pid_file": pidfile.path}))
            return 0 if pid is not None else STATUS_NOT_RUNNING
        if args.stop or args.restart:
            pid = stop(pidfile, args.stop_timeout)
            if args.stop:
                print("relaytree supervise: %s" % ("stopped (pid %s)" % pid if pid is not None else "not running"))
                return 0
            return _start(args, restarted=pid is not None)
        return _start(args, restarted=False)
    except (SuperviseError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.EACCES:
            print("relaytree supervise: %s (run as root, or choose --pid-file/--log-file)" % exc, file=sys.stderr)
        else:
            print("relaytree supervise: %s" % exc, file=sys.stderr)
        return 2
