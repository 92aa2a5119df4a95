"""hpc.relaytree.relay connection plugin: request building, result mapping, become, file transfers.

The coordinator is replaced by a recorder; the shell script that runs commands on the nodes is run
here with /bin/sh, as the daemon would.
"""

from __future__ import annotations

import base64
import os
import subprocess

import pytest
import yaml
from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.playbook.play_context import PlayContext

from ansible_collections.hpc.relaytree.plugins.connection import relay

NAME = "hpc.relaytree.relay"  # the relay_options fixture (conftest.py) registered its options

HOST_VARS = {"inventory_hostname": "cn7", "ansible_host": "10.0.0.7", "relaytree_port": 2000,
             "relaytree_pki": "/etc/relaytree/pki"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def outcome(rc=0, stdout=b"", stderr=b"", status=None, **kw):
    status = status or ("PASS" if rc == 0 else "FAILED")
    return dict({"status": status, "rc": rc, "stdout_b64": b64(stdout), "stderr_b64": b64(stderr)}, **kw)


class Recorder:
    """Stands for the coordinator: records requests, answers from a script of outcomes."""

    def __init__(self, outcomes=(), error=None):
        self.messages = []
        self.told = []
        self.outcomes = list(outcomes)
        self.error = error  # raised by every call

    def call(self, message, timeout=None):
        self.messages.append(message)
        if self.error is not None:
            raise self.error
        result = self.outcomes.pop(0) if self.outcomes else outcome()
        return {"ok": True, "outcome": dict(result, node=message["node"]), "operation": {}}

    def tell(self, message, timeout=30.0):
        self.told.append(message)
        return {"ok": True}


def make_connection(outcomes=(), task_keys=None, host_vars=None, task_uuid="task-1", batch=("cn6", "cn7")):
    conn = relay.Connection(PlayContext(), task_uuid=task_uuid, ansible_playbook_pid="4242")
    conn._load_name = NAME
    keys = {"uuid": task_uuid, "name": "a task", "action": "ansible.builtin.command", "run_once": False,
            "delegate_to": None, "throttle": 0}
    keys.update(task_keys or {})
    conn.set_options(task_keys=keys, var_options=dict(HOST_VARS, **(host_vars or {})))
    conn.update_vars({"inventory_hostname": "cn7", "ansible_play_batch": list(batch)})
    conn._connect()
    recorder = Recorder(outcomes)
    conn._coordinator = recorder
    return conn, recorder


def sh(argv, stdin=b"", cwd=None):
    proc = subprocess.run(argv, input=stdin, capture_output=True, cwd=cwd, check=False)
    return proc.returncode, proc.stdout, proc.stderr


# -- documentation and options ------------------------------------------------------------


def test_documentation_and_defaults(relay_options):
    doc = yaml.safe_load(relay.DOCUMENTATION)
    assert doc["name"] == "relay"
    options = relay_options
    assert options["pipelining"]["default"] is True
    assert {"name": "ANSIBLE_PIPELINING"} in options["pipelining"]["env"]
    assert [v["name"] for v in options["host"]["vars"]][:3] == ["inventory_hostname", "ansible_host", "relaytree_host"]
    for name, option in options.items():
        assert option.get("description") and option.get("type"), name
        if name not in ("host", "pipelining"):
            assert option.get("vars") and option.get("env") and option.get("ini"), name
    yaml.safe_load(relay.EXAMPLES)


def test_options_from_variables():
    conn, _rec = make_connection(host_vars={"relaytree_host": "relay-cn7", "relaytree_insecure": "yes"})
    assert conn._node == "relay-cn7" and conn._host == "cn7"
    assert conn.get_option("port") == 2000 and conn.get_option("insecure") is True
    assert conn.is_pipelining_enabled()
    assert relay.Connection.has_pipelining and relay.Connection.default_user == "root"


def test_tree_options_reach_the_request(monkeypatch):
    """The tree options, host variables first, then the environment, then the defaults."""
    monkeypatch.setenv("ANSIBLE_RELAYTREE_WIDTH", "4")
    monkeypatch.setenv("ANSIBLE_RELAYTREE_CONNECT_TIMEOUT", "9")
    conn, rec = make_connection(host_vars={"relaytree_connect_timeout": 2, "relaytree_pki": "~/keys"})
    conn.exec_command("true")
    assert rec.messages[0]["tree"] == {"width": 4, "connect_timeout": 2.0, "deadline": None, "insecure": False,
                                       "pki": os.path.expanduser("~/keys")}
    assert rec.messages[0]["port"] == 2000


def test_bad_tree_option_names_its_sources():
    conn, rec = make_connection(host_vars={"relaytree_width": 0})
    with pytest.raises(AnsibleConnectionFailure, match="width must be at least 1, got 0 .*relaytree_width"):
        conn.exec_command("true")
    assert rec.messages == []


# -- exec_command -------------------------------------------------------------------------


def test_exec_with_input_is_one_request_with_own_stdin():
    conn, rec = make_connection([outcome(0, b'{"changed": true}\n\xff', b"warn")])
    rc, out, err = conn.exec_command("/bin/sh -c '/usr/bin/python3 && sleep 0'", in_data=b"PAYLOAD\x00")
    assert (rc, out, err) == (0, b'{"changed": true}\n\xff', b"warn")  # bytes exactly as produced
    (msg,) = rec.messages
    assert msg["op"] == "exec" and msg["task"] == "task-1" and msg["step"] == "exec1" and msg["name"] == "a task"
    assert msg["host"] == "cn7" and msg["node"] == "10.0.0.7" and msg["port"] == 2000
    assert msg["expected"] == ["cn6", "cn7"] and msg["alone"] is False and msg["raw"] is True
    assert msg["args"]["command"] == "/bin/sh -c '/usr/bin/python3 && sleep 0'" and msg["args"]["user"] == ""
    assert msg["args"]["output_limit"] == relay.OUTPUT_LIMIT and msg["args"]["timeout"] is None
    assert base64.b64decode(msg["stdin_b64"]) == b"PAYLOAD\x00"
    assert msg["tree"]["pki"] == "/etc/relaytree/pki" and msg["tree"]["insecure"] is False
    assert msg["tree"]["connect_timeout"] == 5.0


def test_exec_without_input_sends_the_command_on_stdin():
    """Per-host commands (random temp dir names) become one command line with per-host stdin."""
    conn, rec = make_connection([outcome(), outcome()])
    conn.exec_command("( umask 77 && mkdir -p /x/ansible-tmp-1 ) && sleep 0")
    conn.exec_command("rm -rf /x/ansible-tmp-1")
    first, second = rec.messages
    assert first["args"]["command"] == second["args"]["command"] == relay.script("relaytree-run", relay.RUN_SCRIPT)
    assert base64.b64decode(first["stdin_b64"]) == b"( umask 77 && mkdir -p /x/ansible-tmp-1 ) && sleep 0"
    assert (first["step"], second["step"]) == ("exec1", "exec2")


def test_run_script_runs_the_command_like_sh_c(tmp_path):
    command, stdin = relay.command_form('echo "$0" out; echo err >&2; read x || echo no-stdin; exit 3', b"")
    assert sh(command, stdin, cwd=tmp_path) == (3, b"/bin/sh out\nno-stdin\n", b"err\n")
    long_command = "true " + "x" * relay.SCRIPT_ON_STDIN_MAX
    assert relay.command_form(long_command, b"") == (long_command, b"")
    assert relay.command_form("cat", b"in") == ("cat", b"in")


def test_window_alone_and_solo():
    conn, rec = make_connection(task_keys={"throttle": 3})
    conn.exec_command("true")
    assert rec.messages[0]["window"] == 3
    for keys in ({"run_once": True}, {"delegate_to": "cn1"}):
        conn, rec = make_connection(task_keys=keys)
        conn.exec_command("true")
        assert rec.messages[0]["alone"] is True
    conn, rec = make_connection(task_uuid="", task_keys={"uuid": None})  # outside a task
    conn.exec_command("true")
    assert rec.messages[0]["alone"] is True and rec.messages[0]["task"].startswith("relay-solo-")


def test_command_results_and_errors():
    assert relay.command_result(outcome(2, b"o", b"e"), "cn7") == (2, b"o", b"e")
    with pytest.raises(AnsibleConnectionFailure, match="cn7 unreachable: refused"):
        relay.command_result({"status": "UNREACHABLE", "error": "refused"}, "cn7")
    with pytest.raises(AnsibleError, match="timeout on cn7: timed out after 1.0s"):
        relay.command_result(outcome(None, status="TIMEOUT", error="timed out after 1.0s"), "cn7")
    with pytest.raises(AnsibleError, match="cannot run the command on cn7 as bob: unknown user 'bob'"):
        relay.command_result(outcome(None, status="FAILED", error="unknown user 'bob'"), "cn7", "bob")
    with pytest.raises(AnsibleError, match="stdout of the command on cn7 is larger than 256 MiB"):
        relay.command_result(outcome(0, stdout_truncated=True), "cn7")


def test_coordinator_trouble_marks_the_host_unreachable():
    from ansible_collections.hpc.relaytree.plugins.plugin_utils._relaytree import CoordinatorError

    conn, rec = make_connection()
    rec.error = CoordinatorError("relaytree coordinator: controller keys: missing")
    with pytest.raises(AnsibleConnectionFailure, match="controller keys"):
        conn.exec_command("true")


def test_command_timeout_option():
    conn, rec = make_connection(host_vars={"relaytree_command_timeout": 7})
    conn.exec_command("sleep 1")
    assert rec.messages[0]["args"]["timeout"] == 7.0


# -- become ---------------------------------------------------------------------------------


class FakeBecome:
    name = "sudo"
    pipelining = True

    def __init__(self, user):
        self.user = user

    def get_option(self, name):
        assert name == "become_user"
        return self.user

    def build_become_command(self, cmd, shell):  # never used: the relay runs as the user itself
        raise AssertionError("sudo wrapping must not happen")


def test_become_runs_the_wrapped_command_as_become_user():
    conn, rec = make_connection()
    conn.set_become_plugin(FakeBecome("nobody"))
    assert conn.become.name == "sudo" and conn.become.pipelining  # the real plugin's
    cmd = conn.become.build_become_command("/usr/bin/python3", conn._shell)
    assert cmd == "/usr/bin/python3"  # not wrapped
    conn.exec_command("/bin/sh -c '%s'" % cmd, in_data=b"x", sudoable=True)
    conn.exec_command("/bin/sh -c 'echo ~'", sudoable=True)  # Ansible did not ask for become: own user
    assert [m["args"]["user"] for m in rec.messages] == ["nobody", ""]
    conn.become.build_become_command("id", conn._shell)
    conn.exec_command("id", sudoable=False)  # not sudoable: never as the become user
    assert rec.messages[-1]["args"]["user"] == ""
    conn.set_become_plugin(None)
    assert conn.become is None


# -- put_file -------------------------------------------------------------------------------


def test_put_file_is_one_tree_copy(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"line\n\x00\xff")
    conn, rec = make_connection()
    conn.put_file(str(src), "/root/.ansible/tmp/ansible-tmp-1-2-3/source")
    (msg,) = rec.messages
    assert msg["op"] == "copy" and msg["step"] == "put1"
    assert msg["args"] == {"src": str(src), "dest": "/root/.ansible/tmp/ansible-tmp-1-2-3/source"}
    assert "stdin_b64" not in msg
    # Another host putting the same file to the same path asks for the very same operation.
    other, other_rec = make_connection(host_vars={"inventory_hostname": "cn8"})
    other.put_file(str(src), "/root/.ansible/tmp/ansible-tmp-1-2-3/source")
    assert other_rec.messages[0]["args"] == msg["args"]


def test_put_missing_failing_and_unreachable(tmp_path):
    conn, _rec = make_connection([outcome(None, status="FAILED", error="parent directory /x of /x/y does not exist"),
                                  outcome(None, status="UNREACHABLE", error="connection refused")])
    with pytest.raises(AnsibleFileNotFound):
        conn.put_file(str(tmp_path / "missing"), "/x/y")
    (tmp_path / "f").write_text("x")
    with pytest.raises(AnsibleError, match="failed to transfer .* to /x/y on 10.0.0.7: parent directory /x"):
        conn.put_file(str(tmp_path / "f"), "/x/y")
    with pytest.raises(AnsibleConnectionFailure, match="10.0.0.7 unreachable: connection refused"):
        conn.put_file(str(tmp_path / "f"), "/x/y")
    with pytest.raises(AnsibleError, match="relative path"):
        conn.put_file(str(tmp_path / "f"), "x/y")


# -- fetch_file -----------------------------------------------------------------------------


def test_fetch_file_is_one_tree_fetch(tmp_path):
    conn, rec = make_connection([outcome(None, status="PASS", dest=str(tmp_path / "out"), size=3, sha256="ab")])
    conn.fetch_file("/var/log/messages", str(tmp_path / "out"))
    (msg,) = rec.messages
    assert msg["op"] == "fetch" and msg["step"] == "fetch1" and msg["args"] == {}
    # Source and destination are the host's own, outside the arguments: the hosts of a step are one fetch.
    assert msg["src"] == "/var/log/messages" and msg["out_path"] == str(tmp_path / "out")


def test_fetch_file_errors(tmp_path):
    conn, _rec = make_connection([outcome(None, status="FAILED", error="cannot open /f: No such file or directory"),
                                  outcome(None, status="UNREACHABLE", error="relay cn3 failed")])
    with pytest.raises(AnsibleError, match="failed to fetch /f on 10.0.0.7: cannot open /f: No such file"):
        conn.fetch_file("/f", str(tmp_path / "out"))
    with pytest.raises(AnsibleConnectionFailure, match="unreachable: relay cn3 failed"):
        conn.fetch_file("/f", str(tmp_path / "out"))
    with pytest.raises(AnsibleError, match="relative path"):
        conn.fetch_file("f", str(tmp_path / "out"))


# -- close, reset ---------------------------------------------------------------------------


def test_close_reports_done_only_after_requests():
    conn, rec = make_connection()
    conn.close()
    assert rec.told == []
    conn, rec = make_connection()
    conn.exec_command("true")
    conn.close()
    assert rec.told == [{"op": "done", "task": "task-1", "hosts": ["cn7"]}]
    assert not conn.connected
    conn.reset()  # nothing to reset, no warning
