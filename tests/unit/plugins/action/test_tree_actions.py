"""tree_exec / tree_copy / tree_ping action plugins, with the coordinator replaced by a recorder."""

from __future__ import annotations

import hashlib
import importlib
import os
from unittest.mock import MagicMock

import pytest
import yaml
from ansible.errors import AnsibleActionFail

from ansible_collections.hpc.relaytree.plugins.action import tree_copy, tree_exec, tree_ping
from ansible_collections.hpc.relaytree.plugins.doc_fragments.tree import ModuleDocFragment
from ansible_collections.hpc.relaytree.plugins.plugin_utils import _tree_action

HOST = "cn7"
TASK_VARS = {"inventory_hostname": HOST, "ansible_host": "10.0.0.7", "ansible_play_batch": ["cn6", "cn7"],
             "relaytree_port": 2000}


class Recorder:
    """Stands for the coordinator: records requests, answers from a script of outcomes."""

    def __init__(self, outcomes=None):
        self.messages = []
        self.outcomes = list(outcomes or [])

    def call(self, message, timeout=None):
        self.messages.append(message)
        if message["op"] == "pass":
            return {"ok": True}
        outcome = self.outcomes.pop(0) if self.outcomes else {"status": "PASS", "rc": 0, "stdout": "", "stderr": ""}
        return {"ok": True, "outcome": dict(outcome, node=message["node"]), "operation": {"checksum": "abc", "size": 6}}

    def steps(self):
        return [(m["op"], m["step"]) for m in self.messages]


def make_action(module, args, *, check_mode=False, diff=False, become=False, become_user=None, outcomes=None,
                tmp_path=None):
    task = MagicMock()
    task.args = dict(args)
    task.async_val = 0
    task.check_mode = check_mode
    task.diff = diff
    task.delegate_to = None
    task.run_once = False
    task.throttle = 0
    task._uuid = "task-uuid"
    task.action = "hpc.relaytree." + module.__name__.rsplit(".", 1)[1]
    task.get_name.return_value = "a task"
    play_context = MagicMock()
    play_context.become = become
    play_context.become_user = become_user
    templar = MagicMock()
    templar.template.side_effect = lambda value: value
    connection = MagicMock()
    connection._shell.tmpdir = "/tmp/x"
    action = module.ActionModule(task, connection, play_context, MagicMock(), templar, MagicMock())
    action._load_name = task.action  # set by the plugin loader in real runs
    recorder = Recorder(outcomes)
    action._coordinator = recorder
    if tmp_path is not None:
        recorder.run_dir = str(tmp_path)
    return action, recorder


def run(action):
    return action.run(task_vars=dict(TASK_VARS))


# -- tree_exec --------------------------------------------------------------------------


def test_exec_request_and_result():
    action, rec = make_action(tree_exec, {"cmd": "uname -r", "chdir": "/opt", "env": {"A": 1}, "timeout": 5},
                              outcomes=[{"status": "PASS", "rc": 0, "stdout": "5.14\n", "stderr": "", "elapsed": 0.5}])
    result = run(action)
    (msg,) = rec.messages
    assert msg["op"] == "exec" and msg["step"] == "exec" and msg["task"] == "task-uuid"
    assert msg["host"] == HOST and msg["node"] == "10.0.0.7" and msg["port"] == 2000
    assert msg["expected"] == ["cn6", "cn7"] and msg["alone"] is False
    assert msg["args"] == {"command": "uname -r", "env": {"A": "1"}, "cwd": "/opt", "user": "", "stdin": "",
                           "timeout": 5.0, "output_limit": 0}
    assert msg["tree"] == {"width": None, "connect_timeout": 5.0, "deadline": None, "insecure": False,
                           "pki": os.path.expanduser("~/.relaytree/pki")}
    assert msg["window"] == 0  # forks unknown here (no CLI): the gap decides
    assert result["rc"] == 0 and result["stdout"] == "5.14" and result["stdout_lines"] == ["5.14"]
    assert result["changed"] is True and not result.get("failed")
    assert result["delta"] == "0:00:00.500000"


def test_security_options_and_variables():
    action, rec = make_action(tree_exec, {"cmd": "true"})
    action.run(task_vars=dict(TASK_VARS, relaytree_insecure="yes", relaytree_pki="~/keys"))
    tree = rec.messages[0]["tree"]
    assert tree["insecure"] is True and tree["pki"].endswith("/keys") and not tree["pki"].startswith("~")
    action, rec = make_action(tree_exec, {"cmd": "true", "insecure": False, "pki": "/etc/k", "port": 3000})
    action.run(task_vars=dict(TASK_VARS, relaytree_insecure=True, relaytree_pki="/other"))
    assert rec.messages[0]["tree"]["insecure"] is False and rec.messages[0]["tree"]["pki"] == "/etc/k"
    assert rec.messages[0]["port"] == 3000


def test_width_and_connect_timeout_from_host_variables():
    """relaytree_width and relaytree_connect_timeout count for tree tasks as for the relay connection."""
    action, rec = make_action(tree_exec, {"cmd": "true"})
    action.run(task_vars=dict(TASK_VARS, relaytree_width=3, relaytree_connect_timeout="1.5"))
    assert rec.messages[0]["tree"]["width"] == 3 and rec.messages[0]["tree"]["connect_timeout"] == 1.5
    action, rec = make_action(tree_ping, {"width": 8, "connect_timeout": 4})
    action.run(task_vars=dict(TASK_VARS, relaytree_width=3, relaytree_connect_timeout=1.5))
    assert rec.messages[0]["tree"]["width"] == 8 and rec.messages[0]["tree"]["connect_timeout"] == 4.0


def test_option_precedence(monkeypatch):
    """task argument > host variable > environment > default, for every tree option."""
    monkeypatch.setenv("ANSIBLE_RELAYTREE_PORT", "3001")
    monkeypatch.setenv("ANSIBLE_RELAYTREE_WIDTH", "5")
    monkeypatch.setenv("ANSIBLE_RELAYTREE_CONNECT_TIMEOUT", "7")
    monkeypatch.setenv("ANSIBLE_RELAYTREE_INSECURE", "true")
    monkeypatch.setenv("RELAYTREE_PKI", "/env/pki")
    variables = {k: v for k, v in TASK_VARS.items() if k != "relaytree_port"}
    action, rec = make_action(tree_exec, {"cmd": "true"})
    action.run(task_vars=dict(variables))
    assert rec.messages[-1]["port"] == 3001
    assert rec.messages[-1]["tree"] == {"width": 5, "connect_timeout": 7.0, "deadline": None, "insecure": True,
                                        "pki": "/env/pki"}
    monkeypatch.setenv("ANSIBLE_RELAYTREE_PKI", "/ansible-env/pki")  # the Ansible name wins over RELAYTREE_PKI
    action.run(task_vars=dict(variables, relaytree_port=3002, relaytree_width=6, relaytree_insecure=False))
    assert rec.messages[-1]["port"] == 3002 and rec.messages[-1]["tree"]["width"] == 6
    assert rec.messages[-1]["tree"]["insecure"] is False and rec.messages[-1]["tree"]["pki"] == "/ansible-env/pki"
    action, rec = make_action(tree_exec, {"cmd": "true", "port": 3003, "width": 7, "insecure": True, "pki": "/arg"})
    action.run(task_vars=dict(variables, relaytree_port=3002, relaytree_width=6, relaytree_insecure=False))
    assert rec.messages[-1]["port"] == 3003 and rec.messages[-1]["tree"]["width"] == 7
    assert rec.messages[-1]["tree"]["insecure"] is True and rec.messages[-1]["tree"]["pki"] == "/arg"


def test_templated_option_variables():
    action, rec = make_action(tree_exec, {"cmd": "true"})
    action._templar.template.side_effect = lambda value: "12" if value == "{{ w }}" else value
    action.run(task_vars=dict(TASK_VARS, relaytree_width="{{ w }}"))
    assert rec.messages[0]["tree"]["width"] == 12


@pytest.mark.parametrize("variables, env, message", [
    ({"relaytree_width": 0}, {}, "width must be at least 1, got 0 (host variable relaytree_width)"),
    ({"relaytree_port": 0}, {}, "port must be between 1 and 65535, got 0 (host variable relaytree_port)"),
    ({}, {"ANSIBLE_RELAYTREE_CONNECT_TIMEOUT": "-1"},
     "connect_timeout must be positive, got -1.0 (environment variable ANSIBLE_RELAYTREE_CONNECT_TIMEOUT)"),
    ({"relaytree_width": "wide"}, {}, "relaytree option width (task argument width, relaytree_width"),
])
def test_bad_option_values_name_their_origin(variables, env, message, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    action, rec = make_action(tree_exec, {"cmd": "true"})
    with pytest.raises(AnsibleActionFail) as err:
        action.run(task_vars=dict(TASK_VARS, **variables))
    assert message in str(err.value)
    assert rec.messages == []


def test_window_from_forks_and_throttle(monkeypatch):
    from ansible import context
    from ansible.utils.context_objects import CLIArgs

    monkeypatch.setattr(context, "CLIARGS", CLIArgs({"forks": 20}))
    action, rec = make_action(tree_exec, {"cmd": "true"})
    run(action)
    assert rec.messages[0]["window"] == 20
    action, rec = make_action(tree_exec, {"cmd": "true"})
    action._task.throttle = 4
    run(action)
    assert rec.messages[0]["window"] == 4


def test_exec_relaytree_host_wins():
    action, rec = make_action(tree_exec, {"argv": ["true"]})
    action.run(task_vars=dict(TASK_VARS, relaytree_host="ib-cn7"))
    assert rec.messages[0]["node"] == "ib-cn7"
    assert rec.messages[0]["args"]["command"] == ["true"]


@pytest.mark.parametrize("args, message", [
    ({}, "one of the following is required: cmd, argv"),
    ({"cmd": "a", "argv": ["b"]}, "parameters are mutually exclusive: cmd|argv"),
    ({"cmd": "a", "chdir": "rel"}, "chdir must be an absolute path"),
    ({"cmd": "a", "timeout": 0}, "timeout must be positive"),
    ({"cmd": "a", "port": 70000}, "port must be between 1 and 65535"),
    ({"cmd": "a", "width": 0}, "width must be at least 1"),
    ({"cmd": "a", "env": {"BAD-NAME": "x"}}, "not a valid variable name"),
    ({"cmd": "a", "bogus": 1}, "bogus"),
    ({"cmd": " "}, "the command is empty"),
])
def test_exec_argument_validation(args, message):
    action, rec = make_action(tree_exec, args)
    with pytest.raises(AnsibleActionFail, match=message.replace("|", r"\|")):
        run(action)
    assert rec.messages == []


def test_exec_become_maps_to_user():
    action, rec = make_action(tree_exec, {"cmd": "id"}, become=True, become_user="alice")
    run(action)
    assert rec.messages[0]["args"]["user"] == "alice"
    action, rec = make_action(tree_exec, {"cmd": "id", "user": "bob"}, become=True, become_user="alice")
    run(action)
    assert rec.messages[0]["args"]["user"] == "bob"
    action, rec = make_action(tree_exec, {"cmd": "id"}, become=True)
    run(action)
    assert rec.messages[0]["args"]["user"] == "root"


def test_exec_stdin_newline():
    action, rec = make_action(tree_exec, {"cmd": "cat", "stdin": "data"})
    run(action)
    assert rec.messages[0]["args"]["stdin"] == "data\n"
    action, rec = make_action(tree_exec, {"cmd": "cat", "stdin": "data", "stdin_add_newline": False})
    run(action)
    assert rec.messages[0]["args"]["stdin"] == "data"


def test_exec_creates_exists_skips_and_passes():
    action, rec = make_action(tree_exec, {"cmd": "make", "creates": "out/*.o", "chdir": "/src"},
                              outcomes=[{"status": "FAILED", "rc": 10}])
    result = run(action)
    assert rec.steps() == [("exec", "guard"), ("pass", "exec")]
    assert rec.messages[0]["args"]["command"][-2:] == ["./src/out/*.o", ""]
    assert rec.messages[0]["args"]["cwd"] == "/"
    assert result["changed"] is False and result["rc"] == 0
    assert result["msg"] == "Did not run command since 'out/*.o' exists"


def test_exec_removes_missing_skips():
    action, rec = make_action(tree_exec, {"cmd": "rm /x", "removes": "/x"}, outcomes=[{"status": "FAILED", "rc": 11}])
    result = run(action)
    assert result["changed"] is False and "does not exist" in result["msg"]


def test_exec_guard_then_run():
    action, rec = make_action(tree_exec, {"cmd": "make", "creates": "/out"},
                              outcomes=[{"status": "PASS", "rc": 0}, {"status": "PASS", "rc": 0, "stdout": "built"}])
    result = run(action)
    assert rec.steps() == [("exec", "guard"), ("exec", "exec")]
    assert result["changed"] is True and result["stdout"] == "built"


def test_exec_guard_unreachable():
    action, rec = make_action(tree_exec, {"cmd": "make", "creates": "/out"},
                              outcomes=[{"status": "UNREACHABLE", "error": "connection refused"}])
    result = run(action)
    assert result["unreachable"] is True and "connection refused" in result["msg"]


def test_exec_check_mode():
    action, rec = make_action(tree_exec, {"cmd": "reboot"}, check_mode=True)
    result = run(action)
    assert rec.messages == [] and result["skipped"] is True and result["changed"] is False
    action, rec = make_action(tree_exec, {"cmd": "make", "creates": "/out"}, check_mode=True,
                              outcomes=[{"status": "PASS", "rc": 0}])
    result = run(action)
    assert rec.steps() == [("exec", "guard")]
    assert result["changed"] is True and result["msg"] == "Command would have run if not in check mode"


def test_exec_run_once_is_alone():
    action, rec = make_action(tree_exec, {"cmd": "true"})
    action._task.run_once = True
    run(action)
    assert rec.messages[0]["alone"] is True


def test_exec_delegate_to_refused():
    action, rec = make_action(tree_exec, {"cmd": "true"})
    action._task.delegate_to = "other"
    with pytest.raises(AnsibleActionFail, match="delegate_to is not supported"):
        run(action)


def test_guard_command_shape():
    argv = tree_exec.guard_command("/a b/*", None, None)
    assert argv[:2] == ["sh", "-c"] and "exit 10" in argv[2] and "exit 11" not in argv[2]
    assert argv[4:] == ["./a b/*", ""]
    assert tree_exec.guard_path("rel", "/base/") == "./base/rel"
    assert tree_exec.guard_path("/abs", "/base") == "./abs"


# -- tree_copy --------------------------------------------------------------------------


def test_copy_content_request(tmp_path):
    action, rec = make_action(tree_copy, {"content": "hello\n", "dest": "/etc/x", "mode": 0o644, "mkdirs": True},
                              tmp_path=tmp_path, outcomes=[{"status": "PASS", "changed": True, "dest": "/etc/x"}])
    result = run(action)
    (msg,) = rec.messages
    args = msg["args"]
    sha = hashlib.sha256(b"hello\n").hexdigest()
    assert args["src"] == str(tmp_path / ("content-" + sha))
    assert (tmp_path / ("content-" + sha)).read_bytes() == b"hello\n"
    assert args["mode"] == "0644" and args["mkdirs"] is True and args["check"] is False
    assert result == {"changed": True, "dest": "/etc/x", "checksum": "abc", "size": 6}


def test_copy_src_found_in_files(tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 10)
    action, rec = make_action(tree_copy, {"src": "f.bin", "dest": "/data/"}, tmp_path=tmp_path)
    action._find_needle = MagicMock(return_value=str(src))
    action._loader.get_real_file.side_effect = lambda path, decrypt=True: path
    run(action)
    action._find_needle.assert_called_once_with("files", "f.bin")
    assert rec.messages[0]["args"]["src"] == str(src)
    assert rec.messages[0]["args"]["src_id"][0] == 10


def test_copy_check_and_diff(tmp_path):
    action, rec = make_action(tree_copy, {"content": "new\n", "dest": "/etc/x"}, check_mode=True, diff=True,
                              tmp_path=tmp_path, outcomes=[{"status": "PASS", "rc": 0, "stdout": "old\n"},
                                                           {"status": "PASS", "changed": True}])
    result = run(action)
    assert rec.steps() == [("exec", "before"), ("copy", "copy")]
    assert rec.messages[1]["args"]["check"] is True
    assert result["diff"] == {"before": "old\n", "after": "new\n", "before_header": "/etc/x",
                              "after_header": "dynamically generated"}


def test_copy_diff_missing_dest_and_binary(tmp_path):
    action, rec = make_action(tree_copy, {"content": "new\n", "dest": "/etc/x"}, diff=True, tmp_path=tmp_path,
                              outcomes=[{"status": "FAILED", "rc": 3}, {"status": "PASS", "changed": True}])
    assert run(action)["diff"]["before"] == ""
    action, rec = make_action(tree_copy, {"content": "a\0b", "dest": "/etc/x"}, diff=True, tmp_path=tmp_path,
                              outcomes=[{"status": "PASS", "changed": True}])
    assert "diff" not in run(action) and rec.steps() == [("copy", "copy")]


@pytest.mark.parametrize("args, message", [
    ({"dest": "/x"}, "one of the following is required: src, content"),
    ({"src": "a", "content": "b", "dest": "/x"}, "mutually exclusive"),
    ({"content": "b"}, "missing required arguments: dest"),
    ({"content": "b", "dest": "rel"}, "dest must be an absolute path"),
    ({"content": "b", "dest": "/dir/"}, "dest must be a file path"),
    ({"content": "b", "dest": "/x", "mode": "u+rw"}, "symbolic modes are not supported"),
    ({"content": "b", "dest": "/x", "chunk_size": 0}, "chunk_size must be between"),
    ({"content": "b", "dest": "/x", "connect_timeout": -1}, "connect_timeout must be positive"),
])
def test_copy_argument_validation(args, message, tmp_path):
    action, rec = make_action(tree_copy, args, tmp_path=tmp_path)
    with pytest.raises(AnsibleActionFail, match=message):
        run(action)
    assert rec.messages == []


# -- tree_ping --------------------------------------------------------------------------


def test_ping():
    ping = {"version": "0.1.0", "protocol_version": 1, "hostname": "cn7", "uptime": 5.0, "load": [0.0, 0.1, 0.2]}
    action, rec = make_action(tree_ping, {"width": 8}, outcomes=[{"status": "PASS", "ping": ping}])
    result = run(action)
    assert rec.messages[0]["op"] == "ping" and rec.messages[0]["tree"]["width"] == 8
    assert result == dict(ping, ping="pong", changed=False)


def test_ping_unreachable():
    action, rec = make_action(tree_ping, {}, outcomes=[{"status": "UNREACHABLE", "error": "timed out"}])
    assert run(action) == {"unreachable": True, "changed": False, "msg": "relaytree: 10.0.0.7 unreachable: timed out"}


def _fragment_options(*names):
    options = {}
    for name in names:
        options.update(yaml.safe_load(getattr(ModuleDocFragment, name))["options"])
    return options


def test_tree_options_doc_and_spec_agree():
    documented = _fragment_options("DOCUMENTATION", "OPTIONS")
    assert set(_tree_action.TREE_ARGUMENT_SPEC) == set(documented)
    for name, spec in _tree_action.TREE_ARGUMENT_SPEC.items():
        assert spec["type"] == documented[name]["type"], name
        assert spec.get("default") is None and "default" not in documented[name], name  # falls back, see OPTIONS


@pytest.mark.parametrize("name, action", [("tree_exec", tree_exec), ("tree_copy", tree_copy), ("tree_ping", tree_ping)])
def test_argument_spec_matches_documentation(name, action):
    """The action validates exactly the options its doc stub (plus the tree fragments) documents."""
    doc = yaml.safe_load(importlib.import_module("ansible_collections.hpc.relaytree.plugins.modules." + name).DOCUMENTATION)
    assert {"hpc.relaytree.tree", "hpc.relaytree.tree.options"} <= set(doc["extends_documentation_fragment"])
    documented = dict(_fragment_options("DOCUMENTATION", "OPTIONS"), **(doc.get("options") or {}))
    spec = dict(action.ActionModule.ARGUMENT_SPEC, **_tree_action.TREE_ARGUMENT_SPEC)
    assert set(spec) == set(documented)
    for option, entry in spec.items():
        assert entry["type"] == documented[option]["type"], option
        assert entry.get("default") == documented[option].get("default"), option
        assert entry.get("required", False) == documented[option].get("required", False), option
        assert entry.get("elements") == documented[option].get("elements"), option
