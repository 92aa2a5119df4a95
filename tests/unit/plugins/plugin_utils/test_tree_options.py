"""plugin_utils/_tree_options.py: the option table, its documentation, precedence, the request builder."""

from __future__ import annotations

import base64
import importlib

import pytest
import yaml
from ansible import context
from ansible.utils.context_objects import CLIArgs

from ansible_collections.hpc.relaytree.plugins.doc_fragments.tree import ModuleDocFragment
from ansible_collections.hpc.relaytree.plugins.plugin_utils import _tree_options as opts
from ansible_collections.hpc.relaytree.plugins.plugin_utils._relaytree import import_relaytree

NAMES = [option.name for option in opts.TREE_OPTIONS]


def fragment(name):
    return yaml.safe_load(getattr(ModuleDocFragment, name))["options"]


def test_documented_sources_are_the_table():
    """What the connection plugin reads through Ansible (fragment CONNECTION) is the table, exactly."""
    sources = fragment("CONNECTION")
    assert list(sources) == NAMES
    for name, definition in opts.config_definitions().items():
        assert sources[name].get("default") == definition["default"], name
        assert sources[name]["vars"] == definition["vars"], name
        assert sources[name]["env"] == definition["env"], name
        assert sources[name]["ini"] == definition["ini"], name


def test_descriptions_state_the_precedence():
    described = fragment("OPTIONS")
    assert list(described) == NAMES
    for option in opts.TREE_OPTIONS:
        assert described[option.name]["type"] == option.type, option.name
        text = " ".join(described[option.name]["description"])
        where = [text.index("task argument"), text.index("C(%s)" % option.var)]
        where += [text.index("E(%s)" % env) for env in sorted(option.env, key=lambda e: not e.startswith("ANSIBLE_"))]
        where.append(text.index("C([%s])" % opts.INI_SECTION))
        assert where == sorted(where), option.name  # listed in precedence order
        if option.default is not None:
            assert str(option.default).lower().rstrip("0").rstrip(".") in text.lower(), option.name


def test_defaults_are_the_packages():
    """The plugins cannot import the relaytree client (no gRPC in Ansible's processes): same values."""
    import_relaytree()
    client = importlib.import_module("relaytree.client")
    relaytree = importlib.import_module("relaytree")
    assert opts.DEFAULT_PORT == relaytree.DEFAULT_PORT
    assert opts.DEFAULT_CONNECT_TIMEOUT == client.DEFAULT_CONNECT_TIMEOUT
    assert opts.DEFAULT_PKI == "~/.relaytree/pki"


def test_resolution_order(monkeypatch):
    for option in opts.TREE_OPTIONS:
        for env in option.env:
            monkeypatch.delenv(env, raising=False)
    values, origins = opts.resolve_tree_options({}, {})
    assert values["port"] == 1995 and values["width"] is None and values["insecure"] is False
    assert set(origins.values()) == {"default"}
    monkeypatch.setenv("ANSIBLE_RELAYTREE_WIDTH", "4")
    values, origins = opts.resolve_tree_options({}, {})
    assert values["width"] == 4 and origins["width"] == "environment variable ANSIBLE_RELAYTREE_WIDTH"
    values, origins = opts.resolve_tree_options({}, {"relaytree_width": 6})
    assert values["width"] == 6 and origins["width"] == "host variable relaytree_width"
    values, origins = opts.resolve_tree_options({"width": 8, "port": None}, {"relaytree_width": 6})
    assert values["width"] == 8 and origins["width"] == "task argument width"
    assert values["port"] == 1995  # an argument left unset falls through
    assert (type(values["width"]), type(values["connect_timeout"])) == (int, float)  # plain, not tagged


def test_origin_descriptions():
    assert opts.describe_origin("pki", "/etc/ansible/ansible.cfg") == "[relaytree] pki in /etc/ansible/ansible.cfg"
    assert opts.describe_origin("pki", None) == "default"


def test_checks():
    opts.check_tree_options({"port": 1, "width": 1, "connect_timeout": 0.1, "deadline": None})
    with pytest.raises(opts.TreeOptionError, match=r"^port must be between 1 and 65535, got 65536 \(set by task "
                                                   r"argument port, relaytree_port, ANSIBLE_RELAYTREE_PORT, "
                                                   r"\[relaytree\] port\)$"):
        opts.check_tree_options({"port": 65536})
    with pytest.raises(opts.TreeOptionError, match=r"deadline must be positive, got 0 \(task argument deadline\)"):
        opts.check_tree_options({"deadline": 0}, {"deadline": "task argument deadline"})


def test_worker_window(monkeypatch):
    monkeypatch.setattr(context, "CLIARGS", CLIArgs({"forks": 16}))
    assert opts.worker_window() == 16
    assert opts.worker_window(4) == 4 and opts.worker_window(40) == 16
    assert opts.worker_window("{{ n }}") == 16  # an untemplated throttle: unknown, ignored
    monkeypatch.setattr(context, "CLIARGS", CLIArgs({}))
    assert opts.worker_window() == 0 and opts.worker_window(3) == 3


def test_tree_request():
    options = {"port": 2000, "pki": "/k", "width": None, "connect_timeout": 5, "insecure": "yes"}
    message = opts.tree_request(op="exec", task="T", step="exec1", host="cn1", node="10.0.0.1", options=options,
                                args={"command": "true"}, name="n", expected=["cn1", "cn2"], window=8, deadline=30,
                                stdin=b"\0\xff", raw=True)
    assert message == {
        "op": "exec", "task": "T", "name": "n", "step": "exec1", "host": "cn1", "node": "10.0.0.1", "port": 2000,
        "expected": ["cn1", "cn2"], "alone": False, "window": 8, "args": {"command": "true"},
        "tree": {"width": None, "connect_timeout": 5.0, "deadline": 30, "insecure": True, "pki": "/k"},
        "stdin_b64": base64.b64encode(b"\0\xff").decode(), "raw": True}
    plain = opts.tree_request(op="ping", task="T", step="ping", host="cn1", node="cn1", options=options, args={})
    assert "stdin_b64" not in plain and "raw" not in plain and plain["alone"] is False
