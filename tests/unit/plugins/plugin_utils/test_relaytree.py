"""plugin_utils/_relaytree.py: the plugins' client of the coordinator (a stand-in socket server here)."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest
from ansible.errors import AnsibleError

from ansible_collections.hpc.relaytree.plugins.plugin_utils import _relaytree
from ansible_collections.hpc.relaytree.plugins.plugin_utils._relaytree import Coordinator, CoordinatorError


@pytest.fixture
def coord_dir(tmp_path):
    path = tmp_path / "coord"
    path.mkdir(mode=0o700)
    return path


def serve_once(path, answer: bytes):
    """A UNIX socket at ``path`` that reads one request line and answers ``answer``; returns the requests."""
    requests = []
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def run():
        conn, _addr = listener.accept()
        with conn:
            data = b""
            while not data.endswith(b"\n"):
                data += conn.recv(65536)
            requests.append(json.loads(data))
            conn.sendall(answer)
        listener.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return requests, thread


def test_call_sends_one_line_and_reads_the_reply(coord_dir):
    coordinator = Coordinator(run_pid=4242, directory=str(coord_dir))
    assert coordinator.socket_path == str(coord_dir / "4242.sock")
    requests, thread = serve_once(coordinator.socket_path, json.dumps({"ok": True, "x": "y" * 3_000_000}).encode() + b"\n")
    reply = coordinator.call({"op": "stats"}, timeout=30)
    thread.join(30)
    assert requests == [{"op": "stats"}] and len(reply["x"]) == 3_000_000


@pytest.mark.parametrize("answer, message", [
    (b'{"ok": false, "error": "unknown op"}\n', "relaytree coordinator: unknown op"),
    (b"not json\n", "garbled answer"),
    (b"", "closed the connection without an answer"),
])
def test_refusals_and_garbage_are_coordinator_errors(coord_dir, answer, message):
    coordinator = Coordinator(run_pid=4242, directory=str(coord_dir))
    _requests, thread = serve_once(coordinator.socket_path, answer)
    with pytest.raises(CoordinatorError, match=message):
        coordinator.call({"op": "stats"}, timeout=30)
    thread.join(30)


def test_tell_never_starts_a_coordinator(tmp_path):
    coordinator = Coordinator(run_pid=os.getpid(), directory=str(tmp_path / "coord"))
    assert coordinator.tell({"op": "done", "task": "t", "hosts": ["cn7"]}) is None
    assert not (tmp_path / "coord").exists()


def test_run_dir_is_private(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    with pytest.raises(CoordinatorError, match="mode 0700"):
        os.listdir(Coordinator(run_pid=1, directory=str(loose)).run_dir)
    run_dir = Coordinator(run_pid=1, directory=str(tmp_path / "new")).run_dir
    assert run_dir == str(tmp_path / "new" / "1.d") and os.stat(run_dir).st_mode & 0o777 == 0o700


def test_missing_runtime_dependency_names_the_package(monkeypatch):
    monkeypatch.setattr(_relaytree, "RUNTIME_DEPENDENCIES", (("json", "json"), ("no_such_module_xyz", "nosuch-pkg")))
    with pytest.raises(AnsibleError, match="pip install nosuch-pkg"):
        _relaytree.check_runtime_dependencies()


def test_import_relaytree():
    assert _relaytree.import_relaytree().__name__ == "relaytree"
