# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Controller side of relaytree: find the package, talk to the run's coordinator.

Nothing here loads gRPC: this module is imported by the ansible-playbook
process (strategy, callback) and by its forked workers (action plugins), and
gRPC must never be loaded before or across a fork. The tree itself runs in the
coordinator, a separate exec'd process (``python -m relaytree.coordinator``).
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ansible.errors import AnsibleError

# (module to find, package to install) for what the coordinator imports.
RUNTIME_DEPENDENCIES = (("grpc", "grpcio"), ("google.protobuf", "protobuf"), ("ClusterShell", "ClusterShell"))

# Environment knobs of the coordinator (defaults in relaytree.coordinator.batching and .server).
ENV_DIR = "RELAYTREE_COORDINATOR_DIR"  # where sockets and logs live
ENV_GAP = "RELAYTREE_COORDINATOR_GAP"  # seconds without a new host before a step is dispatched
ENV_EXACT_GAP = "RELAYTREE_COORDINATOR_EXACT_GAP"  # the same, with the tree strategy (safety net)
ENV_IDLE_EXIT = "RELAYTREE_COORDINATOR_IDLE_EXIT"  # seconds without requests before it exits
ENV_STATS = "RELAYTREE_COORDINATOR_STATS"  # file rewritten with the stats after each operation

START_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0


class CoordinatorError(AnsibleError):
    """The coordinator could not be started or reached, or refused a request."""


def import_relaytree():
    """The relaytree package: an importable one, else the one shipped in this collection's src/."""
    if importlib.util.find_spec("relaytree") is None:
        shipped = Path(__file__).resolve().parents[2] / "src"
        if (shipped / "relaytree" / "__init__.py").is_file():
            sys.path.append(str(shipped))
            importlib.invalidate_caches()
    try:
        return importlib.import_module("relaytree")
    except ImportError as exc:
        raise AnsibleError("the hpc.relaytree plugins need the relaytree Python package on the controller "
                           "(it ships in the collection's src/ directory, or: pip install relaytree): %s" % exc) from None


def check_runtime_dependencies() -> None:
    """Fail clearly, naming the package, when the coordinator could not import its dependencies."""
    missing = []
    for module, package in RUNTIME_DEPENDENCIES:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    if missing:
        raise AnsibleError("the hpc.relaytree plugins need the Python package(s) %s on the controller, for %s: "
                           "pip install %s" % (", ".join(missing), sys.executable, " ".join(missing)))


def _private_dir(path: str) -> str:
    """Create (0700) or check a directory only this user can enter."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise CoordinatorError("cannot create %s: %s" % (path, exc.strerror or exc)) from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise CoordinatorError("%s must be a directory owned by uid %d with mode 0700 (it holds the coordinator's "
                               "socket)" % (path, os.getuid()))
    return path


class Coordinator:
    """Client of the coordinator of one ansible-playbook run.

    ``run_pid`` is the ansible-playbook process: ``os.getppid()`` in a worker
    (workers are forked from it), ``os.getpid()`` in the strategy.
    """

    def __init__(self, run_pid: int | None = None, directory: str | None = None):
        self.run_pid = run_pid or os.getppid()
        self.directory = directory or os.environ.get(ENV_DIR) or os.path.join(
            tempfile.gettempdir(), "relaytree-coord-%d" % os.getuid())
        self.socket_path = os.path.join(self.directory, "%d.sock" % self.run_pid)
        self.log_path = os.path.join(self.directory, "%d.log" % self.run_pid)

    @property
    def run_dir(self) -> str:
        """Scratch directory of this run (content files for tree_copy), removed by the coordinator."""
        return _private_dir(os.path.join(_private_dir(self.directory), "%d.d" % self.run_pid))

    def call(self, message: dict, timeout: float | None = None) -> dict:
        """Send one request, return the reply (its "ok" is true) or raise CoordinatorError."""
        return self._exchange(self._connect(), message, timeout)

    def tell(self, message: dict, timeout: float | None = 30.0) -> dict | None:
        """Like call(), but only to a coordinator that already runs: None (nothing started) when none does.

        For news that only matters to a running coordinator (a host is done with a task).
        """
        try:
            sock = self._try_connect()
        except CoordinatorError:
            return None
        return None if sock is None else self._exchange(sock, message, timeout)

    def _exchange(self, sock: socket.socket, message: dict, timeout: float | None) -> dict:
        data = json.dumps(message).encode("utf-8") + b"\n"
        try:
            sock.settimeout(timeout)
            sock.sendall(data)
            chunks = []  # a reply may carry megabytes (fetched files): no quadratic +=
            while not chunks or not chunks[-1].endswith(b"\n"):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
            reply = b"".join(chunks)
        except socket.timeout:
            raise CoordinatorError("no answer from the relaytree coordinator within %.0f s (%s)"
                                   % (timeout, self.log_path)) from None
        except OSError as exc:
            raise CoordinatorError("lost the relaytree coordinator: %s (see %s)" % (exc, self.log_path)) from None
        finally:
            sock.close()
        if not reply:
            raise CoordinatorError("the relaytree coordinator closed the connection without an answer (see %s)"
                                   % self.log_path)
        try:
            answer = json.loads(reply)
        except ValueError:
            raise CoordinatorError("garbled answer from the relaytree coordinator (see %s)" % self.log_path) from None
        if not answer.get("ok"):
            raise CoordinatorError("relaytree coordinator: %s" % answer.get("error", "request refused"))
        return answer

    def _try_connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(self.socket_path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        except OSError as exc:
            sock.close()
            raise CoordinatorError("cannot connect to %s: %s" % (self.socket_path, exc)) from None

    def _connect(self) -> socket.socket:
        sock = self._try_connect()
        if sock is not None:
            return sock
        _private_dir(self.directory)
        # One start per run even when many workers find no coordinator at once.
        with open(self.socket_path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            sock = self._try_connect()
            if sock is None:
                sock = self._start()
        return sock

    def _start(self) -> socket.socket:
        relaytree = import_relaytree()
        check_runtime_dependencies()
        try:
            os.unlink(self.socket_path)  # stale: nobody listens on it
        except FileNotFoundError:
            pass
        cmd = [sys.executable, "-m", "relaytree.coordinator", "--socket", self.socket_path,
               "--parent-pid", str(self.run_pid), "--run-dir", os.path.join(self.directory, "%d.d" % self.run_pid)]
        for env, option in ((ENV_GAP, "--gap"), (ENV_EXACT_GAP, "--exact-gap"), (ENV_IDLE_EXIT, "--idle-exit"),
                            (ENV_STATS, "--stats-file")):
            if os.environ.get(env):
                cmd += [option, os.environ[env]]
        env = dict(os.environ)
        # Run exactly the package these plugins found (it may be the collection's src/).
        root = str(Path(relaytree.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        with open(self.log_path, "ab") as logfile:
            # fork+exec, own session: it outlives this worker and ignores the playbook's Ctrl-C.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile, env=env,
                                    close_fds=True, start_new_session=True)
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            sock = self._try_connect()
            if sock is not None:
                return sock
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
        raise CoordinatorError("the relaytree coordinator did not start (%s): %s" % (self.log_path, self._log_tail()))

    def _log_tail(self, size: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - size))
                return fh.read().decode("utf-8", "replace").strip()
        except OSError:
            return "(no log)"
