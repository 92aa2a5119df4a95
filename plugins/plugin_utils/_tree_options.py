# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""How the coordinator reaches the relays: one option table, one precedence, one request builder.

``TREE_OPTIONS`` is the single table of the options every tree operation needs
(port, PKI, width, connect timeout, insecure), for the ``tree_*`` actions and
the ``relay`` connection alike. Highest precedence first:

1. the task argument (``tree_*`` tasks only; ``module_defaults``, for example
   ``group/hpc.relaytree.tree``, are task arguments);
2. the host variable (``relaytree_port``, ...);
3. the environment variable (``ANSIBLE_RELAYTREE_PORT``, ...; the last of an
   option's list that is set wins, as in Ansible);
4. the option in the ``[relaytree]`` section of ``ansible.cfg``;
5. the default.

Both kinds of plugins resolve them with Ansible's own option machinery
(``ansible.constants.config``), so both agree down to type conversion: the
connection through its documentation (doc fragments ``hpc.relaytree.tree.options``
and ``hpc.relaytree.tree.connection``, which the unit tests check against this
table), the actions through ``resolve_tree_options`` with their task arguments
as direct settings.

``tree_request`` builds every coordinator request for a host's part of a tree
operation (protocol: ``relaytree.coordinator.server``).
"""

from __future__ import annotations

import base64
from typing import NamedTuple

from ansible import constants as C
from ansible import context
from ansible.errors import AnsibleError

INI_SECTION = "relaytree"
DEFAULT_PORT = 1995  # relaytree.DEFAULT_PORT (not imported: no gRPC in Ansible's processes)
DEFAULT_CONNECT_TIMEOUT = 5.0  # relaytree.client.DEFAULT_CONNECT_TIMEOUT
DEFAULT_PKI = "~/.relaytree/pki"  # where `relaytree keys init` puts the controller's keys


class TreeOption(NamedTuple):
    name: str
    type: str  # Ansible type name (argument spec and configuration)
    var: str  # host variable
    env: tuple  # environment variables, in Ansible's order: the last one set wins
    default: object = None  # None: the relaytree client's default for the operation


TREE_OPTIONS = (
    TreeOption("port", "int", "relaytree_port", ("ANSIBLE_RELAYTREE_PORT",), DEFAULT_PORT),
    TreeOption("pki", "path", "relaytree_pki", ("RELAYTREE_PKI", "ANSIBLE_RELAYTREE_PKI"), DEFAULT_PKI),
    TreeOption("width", "int", "relaytree_width", ("ANSIBLE_RELAYTREE_WIDTH",)),
    TreeOption("connect_timeout", "float", "relaytree_connect_timeout", ("ANSIBLE_RELAYTREE_CONNECT_TIMEOUT",),
               DEFAULT_CONNECT_TIMEOUT),
    TreeOption("insecure", "bool", "relaytree_insecure", ("ANSIBLE_RELAYTREE_INSECURE",), False),
)
OPTION_VARS = tuple(option.var for option in TREE_OPTIONS)

# The actions' definitions live in Ansible's configuration under this (plugin type, name).
_CONFIG_KEY = ("action", "hpc.relaytree.tree")


class TreeOptionError(AnsibleError):
    """A tree option with a value the tree cannot use."""


def config_definitions() -> dict:
    """The table as Ansible configuration definitions (what a plugin's documented options become)."""
    return {option.name: {"type": option.type, "default": option.default, "vars": [{"name": option.var}],
                          "env": [{"name": name} for name in option.env],
                          "ini": [{"section": INI_SECTION, "key": option.name}]}
            for option in TREE_OPTIONS}


def resolve_tree_options(task_args: dict, variables: dict) -> tuple:
    """(values, origins) of the tree options for a tree_* task; ``variables``: the host's, templated.

    Values are plain Python values; origins say where each came from (for error messages).
    """
    if not C.config.get_configuration_definitions(*_CONFIG_KEY):
        C.config.initialize_plugin_configuration_definitions(*_CONFIG_KEY, config_definitions())
    direct = {option.name: task_args[option.name] for option in TREE_OPTIONS if task_args.get(option.name) is not None}
    values, origins = {}, {}
    for option in TREE_OPTIONS:
        try:
            value, origin = C.config.get_config_value_and_origin(
                option.name, plugin_type=_CONFIG_KEY[0], plugin_name=_CONFIG_KEY[1],
                variables=variables, direct=direct)
        except AnsibleError as exc:
            raise TreeOptionError("relaytree option %s (%s): %s" % (option.name, sources(option.name), exc)) from None
        values[option.name] = value
        origins[option.name] = describe_origin(option.name, origin)
    return plain(values), origins


def plain(values: dict) -> dict:
    """The option values as plain Python types (Ansible may hand out tagged subclasses)."""
    out = dict(values)
    for option in TREE_OPTIONS:
        value = values.get(option.name)
        if value is None:
            continue
        out[option.name] = {"int": int, "float": float, "bool": bool}.get(option.type, str)(value)
    return out


def describe_origin(name: str, origin) -> str:
    origin = str(origin or "")
    if origin == "Direct":
        return "task argument %s" % name
    if origin.startswith("var: "):
        return "host variable %s" % origin[5:]
    if origin.startswith("env: "):
        return "environment variable %s" % origin[5:]
    if origin == "default" or not origin:
        return "default"
    return "[%s] %s in %s" % (INI_SECTION, name, origin)


def sources(name: str) -> str:
    """Where an option can be set (for messages about a value whose origin is unknown)."""
    option = next(o for o in TREE_OPTIONS if o.name == name)
    return ", ".join(("task argument " + name, option.var) + option.env + ("[%s] %s" % (INI_SECTION, name),))


_RULES = {
    "port": (lambda v: 0 < v < 65536, "must be between 1 and 65535"),
    "width": (lambda v: v >= 1, "must be at least 1"),
    "connect_timeout": (lambda v: v > 0, "must be positive"),
    "deadline": (lambda v: v > 0, "must be positive"),
}


def check_tree_options(values: dict, origins: dict | None = None) -> None:
    """Range checks a type cannot express; the message names where the bad value came from."""
    for name, (valid, rule) in _RULES.items():
        value = values.get(name)
        if value is not None and not valid(value):
            where = (origins or {}).get(name) or "set by " + sources(name)
            raise TreeOptionError("%s %s, got %s (%s)" % (name, rule, value, where))


def worker_window(throttle=None) -> int:
    """How many hosts can be in a task at once: the worker pool (forks), or the task's throttle."""
    try:
        window = int(context.CLIARGS.get("forks") or 0)
    except (TypeError, ValueError):
        window = 0
    try:
        throttle = int(throttle or 0)
    except (TypeError, ValueError):  # a template: unknown here
        throttle = 0
    if throttle > 0:
        window = min(window, throttle) if window else throttle
    return max(window, 0)


def tree_request(*, op: str, task: str, step: str, host: str, node: str, options: dict, args: dict,
                 name: str = "", expected=(), alone: bool = False, window: int = 0, deadline=None,
                 stdin: bytes | None = None, raw: bool = False) -> dict:
    """One host's part of a tree operation, as the coordinator wants it.

    ``options``: the resolved TREE_OPTIONS (values); ``stdin``: this host's own stdin bytes (exec);
    ``raw``: the reply carries the exact output bytes (base64).
    """
    options = plain(options)
    message = {
        "op": op, "task": task, "name": name, "step": step, "host": host, "node": node,
        "port": options["port"], "expected": [str(h) for h in expected], "alone": bool(alone),
        "window": int(window or 0), "args": args,
        "tree": {"width": options.get("width"), "connect_timeout": options.get("connect_timeout"),
                 "deadline": deadline, "insecure": bool(options.get("insecure")), "pki": options.get("pki")},
    }
    if stdin is not None:
        message["stdin_b64"] = base64.b64encode(stdin).decode("ascii")
    if raw:
        message["raw"] = True
    return message
