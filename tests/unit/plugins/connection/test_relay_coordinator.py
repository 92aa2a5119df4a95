"""The relay connection plugin against a real coordinator server, as several hosts' workers at once.

Each host is a Connection in its own thread (Ansible's workers), talking through the plugins'
real client (plugin_utils/_relaytree.Coordinator) over a UNIX socket to relaytree's
CoordinatorServer, running in this process. Only the tree is replaced: a client that answers
every node with the stdin it got, so each host sees which bytes reached its node.
Real ansible-playbook runs with real daemons: tests/integration/test_connection_relay.py.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from ansible.playbook.play_context import PlayContext

from ansible_collections.hpc.relaytree.plugins.connection import relay
from ansible_collections.hpc.relaytree.plugins.plugin_utils._relaytree import Coordinator, import_relaytree

RUN_PID = 4242
HOSTS = ["cn1", "cn2", "cn3"]
JOIN = 60  # seconds: far beyond any dispatch here; the gap (600 s) would mean a merge that never came


class EchoTree:
    """Stands for relaytree.client.Client: every node answers with its own stdin on stdout."""

    def __init__(self):
        self.calls = []

    async def exec_async(self, nodes, command, *, stdin=b"", stdin_by_node=None, **kw):
        from relaytree.results import NodeOutcome, Status

        self.calls.append({"nodes": sorted(nodes), "command": command, "user": kw.get("user"),
                           "per_node": stdin_by_node is not None})
        return {n: NodeOutcome(node=n, status=Status.PASS, rc=0, stdout=(stdin_by_node or {}).get(n, stdin))
                for n in nodes}


@pytest.fixture
def coordinator(tmp_path):
    """A CoordinatorServer listening where the plugins of run RUN_PID look for it."""
    import_relaytree()  # the collection's src/ when the package is not installed
    from relaytree.coordinator.operations import TreeOperations
    from relaytree.coordinator.server import CoordinatorServer

    tree = EchoTree()
    directory = tmp_path / "coord"
    directory.mkdir(mode=0o700)
    server = CoordinatorServer(gap=600, operations=TreeOperations(client_factory=lambda port, options: tree))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    path = Coordinator(run_pid=RUN_PID, directory=str(directory)).socket_path
    listener = asyncio.run_coroutine_threadsafe(asyncio.start_unix_server(server.handle, path=path), loop).result(30)
    yield tree, str(directory)
    loop.call_soon_threadsafe(listener.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    loop.close()


def connect(directory, host, task_keys=None, batch=None):
    conn = relay.Connection(PlayContext(), task_uuid="task-1", ansible_playbook_pid=str(RUN_PID))
    conn._load_name = "hpc.relaytree.relay"
    keys = {"uuid": "task-1", "name": "a task", "action": "ansible.builtin.command", "run_once": False,
            "delegate_to": None, "throttle": 0}
    conn.set_options(task_keys=dict(keys, **(task_keys or {})),
                     var_options={"inventory_hostname": host, "relaytree_port": 2000, "relaytree_insecure": True})
    conn.update_vars({"inventory_hostname": host, "ansible_play_batch": list(batch or HOSTS)})
    conn._connect()
    conn._coordinator = Coordinator(run_pid=RUN_PID, directory=directory)
    return conn


def as_workers(conns, work):
    """Run work(conn) for every host at once, one thread each (Ansible's workers); their results."""
    results, errors = {}, []

    def worker(conn):
        try:
            results[conn._host] = work(conn)
        except Exception as exc:  # pylint: disable=broad-except
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
    assert not errors and not any(t.is_alive() for t in threads), errors
    return results


def test_module_payloads_of_all_hosts_are_one_operation(coordinator):
    tree, directory = coordinator
    conns = [connect(directory, h) for h in HOSTS]
    results = as_workers(conns, lambda c: c.exec_command("/usr/bin/python3", in_data=b"payload of " + c._host.encode()))
    assert tree.calls == [{"nodes": HOSTS, "command": "/usr/bin/python3", "user": "", "per_node": True}]
    for host in HOSTS:
        assert results[host] == (0, b"payload of " + host.encode(), b"")


def test_per_host_commands_without_input_are_one_operation(coordinator):
    """mkdir of per-host temporary directories: one command line, each host's command on its stdin."""
    tree, directory = coordinator
    conns = [connect(directory, h) for h in HOSTS]
    results = as_workers(conns, lambda c: c.exec_command("mkdir /tmp/ansible-tmp-%s" % c._host))
    (call,) = tree.calls
    assert call["nodes"] == HOSTS and call["command"] == relay.script("relaytree-run", relay.RUN_SCRIPT)
    for host in HOSTS:
        assert results[host][1] == b"mkdir /tmp/ansible-tmp-" + host.encode()


def test_a_host_done_with_the_task_is_not_waited_for(coordinator):
    """cn3 leaves the task after its first command (Ansible closes its connection): the others go on."""
    tree, directory = coordinator
    conns = [connect(directory, h) for h in HOSTS]
    as_workers(conns, lambda c: c.exec_command("true"))
    first, second, third = conns

    def leave(conn):
        conn.close()
        return None

    as_workers([first, second, third], lambda c: leave(c) if c is third else c.exec_command("false"))
    assert [call["nodes"] for call in tree.calls] == [HOSTS, ["cn1", "cn2"]]


def test_run_once_goes_alone_at_once(coordinator):
    tree, directory = coordinator
    conn = connect(directory, "cn2", task_keys={"run_once": True})
    assert conn.exec_command("hostname", in_data=b"x") == (0, b"x", b"")
    assert [call["nodes"] for call in tree.calls] == [["cn2"]]


def test_become_users_are_separate_operations(coordinator):
    tree, directory = coordinator
    conns = [connect(directory, h, batch=HOSTS[:2]) for h in HOSTS[:2]]
    conns[1]._run_as_next = "nobody"  # what RelayBecome.build_become_command leaves for the next command
    as_workers(conns, lambda c: c.exec_command("id -un", in_data=b"-"))
    assert sorted((call["nodes"], call["user"]) for call in tree.calls) == [(["cn1"], ""), (["cn2"], "nobody")]
