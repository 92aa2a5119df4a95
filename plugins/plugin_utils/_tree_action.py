# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the tree_* action plugins share: arguments, tree options (see _tree_options), result mapping.

Each host's task runs in Ansible's own worker as usual (``when``, loops,
``register``, handlers, check/diff mode, no_log stay Ansible's); its action
plugin sends that host's part to the run's coordinator, which merges the hosts
of the task into one tree operation and returns each host its NodeOutcome (as
a dict). The ``*_result`` functions turn that into the Ansible result.
"""

from __future__ import annotations

import datetime
import os

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

from ansible_collections.hpc.relaytree.plugins.plugin_utils._relaytree import Coordinator, CoordinatorError
from ansible_collections.hpc.relaytree.plugins.plugin_utils._tree_options import (
    OPTION_VARS,
    TREE_OPTIONS,
    TreeOptionError,
    check_tree_options,
    resolve_tree_options,
    tree_request,
    worker_window,
)

# Options of every tree_* action (doc fragments hpc.relaytree.tree and hpc.relaytree.tree.options):
# the tree options (no default here: an unset argument falls back to the host variable, the
# environment, ansible.cfg, then the default, see _tree_options) and the operation's deadline.
TREE_ARGUMENT_SPEC = dict({option.name: dict(type=option.type) for option in TREE_OPTIONS}, deadline=dict(type="float"))

# Variables naming the relay of a host, first found wins (then inventory_hostname).
NODE_VARS = ("relaytree_host", "ansible_host")


def _lines(text: str) -> list:
    return text.splitlines()


def unreachable_result(outcome: dict) -> dict:
    """Ansible marks the host unreachable (or ignores it with ignore_unreachable)."""
    return {"unreachable": True, "changed": False,
            "msg": "relaytree: %s unreachable: %s" % (outcome.get("node", "node"), outcome.get("error") or "no answer")}


def _truncation(outcome: dict) -> dict:
    return {k: True for k in ("stdout_truncated", "stderr_truncated") if outcome.get(k)}


def exec_result(outcome: dict, cmd, strip_empty_ends: bool = True, now: datetime.datetime | None = None) -> dict:
    """An ansible.builtin.command-like result from an exec NodeOutcome dict."""
    status = outcome.get("status")
    if status == "UNREACHABLE":
        return unreachable_result(outcome)
    stdout, stderr = outcome.get("stdout") or "", outcome.get("stderr") or ""
    if strip_empty_ends:
        stdout, stderr = stdout.rstrip("\r\n"), stderr.rstrip("\r\n")
    end = now or datetime.datetime.now()
    start = end - datetime.timedelta(seconds=float(outcome.get("elapsed") or 0.0))
    rc = outcome.get("rc")
    result = {
        "changed": True, "cmd": cmd, "rc": rc, "stdout": stdout, "stderr": stderr,
        "stdout_lines": _lines(stdout), "stderr_lines": _lines(stderr),
        "start": str(start), "end": str(end), "delta": str(end - start), "msg": "",
    }
    result.update(_truncation(outcome))
    error = outcome.get("error") or ""
    if status == "TIMEOUT":
        result.update(failed=True, msg="The command timed out%s" % (": " + error if error else "."))
    elif rc is None:
        result.update(failed=True, msg=error or "The command did not run.")
    elif rc != 0:
        result.update(failed=True, msg="The command exited with a non-zero return code." + (" " + error if error else ""))
    elif status != "PASS":
        result.update(failed=True, msg=error or "The command failed.")
    elif error:
        result["msg"] = error
    return result


def copy_result(outcome: dict, operation: dict, dest: str) -> dict:
    """An ansible.builtin.copy-like result from a copy NodeOutcome dict."""
    status = outcome.get("status")
    if status == "UNREACHABLE":
        return unreachable_result(outcome)
    result = {"changed": bool(outcome.get("changed")), "dest": outcome.get("dest") or dest}
    for key in ("checksum", "size"):
        if operation.get(key) is not None:
            result[key] = operation[key]
    if status != "PASS":
        result.update(failed=True, msg=outcome.get("error") or "The copy failed (%s)." % status)
    return result


def ping_result(outcome: dict) -> dict:
    status = outcome.get("status")
    if status == "UNREACHABLE":
        return unreachable_result(outcome)
    if status != "PASS":
        return {"changed": False, "failed": True, "msg": outcome.get("error") or "The ping failed (%s)." % status}
    result = {"changed": False, "ping": "pong"}
    result.update(outcome.get("ping") or {})
    return result


class TreeAction(ActionBase):
    """Base of the tree_* actions: no connection, no module, one coordinator request per step."""

    TRANSFERS_FILES = False
    _requires_connection = False
    _supports_check_mode = True
    _supports_async = False

    ARGUMENT_SPEC: dict = {}
    _coordinator: Coordinator | None = None  # created on first use
    VALIDATION: dict = {}  # mutually_exclusive, required_one_of, ... for validate_argument_spec

    def run(self, tmp=None, task_vars=None):
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        del tmp
        _validation, args = self.validate_argument_spec(
            argument_spec=dict(self.ARGUMENT_SPEC, **TREE_ARGUMENT_SPEC), **self.VALIDATION)
        if self._task.delegate_to:
            raise AnsibleActionFail("delegate_to is not supported by %s: every host is reached through its own relay "
                                    "(set relaytree_host to choose the address)" % self._task.action)
        self._tree_vars = task_vars
        self._tree_args = args
        try:
            self._options, origins = resolve_tree_options(
                args, {name: self._var(name) for name in OPTION_VARS if name in task_vars})
            check_tree_options(dict(self._options, deadline=args.get("deadline")),
                               dict(origins, deadline="task argument deadline"))
        except TreeOptionError as exc:
            raise AnsibleActionFail(str(exc)) from None
        result.update(self.run_tree(args, task_vars))
        return result

    def run_tree(self, args: dict, task_vars: dict) -> dict:
        raise NotImplementedError

    # -- talking to the coordinator --------------------------------------------------

    def _var(self, name: str, default=None):
        if name not in self._tree_vars:
            return default
        return self._templar.template(self._tree_vars[name])

    def _node(self) -> str:
        for name in NODE_VARS:
            value = self._var(name)
            if value:
                return str(value)
        return str(self._var("inventory_hostname"))

    def _request(self, step: str, op: str, op_args: dict, deadline: float | None = None) -> dict:
        """This host's part of one tree operation; returns the coordinator's reply.

        ``deadline``: of this operation, when not the task's ``deadline`` argument.
        """
        deadline = deadline or self._tree_args.get("deadline")
        message = tree_request(
            op=op, task=self._task._uuid, name=self._task.get_name(), step=step,
            host=str(self._var("inventory_hostname")), node=self._node(), options=self._options, args=op_args,
            expected=self._var("ansible_play_batch") or (), alone=bool(self._task.run_once),
            window=worker_window(self._task.throttle), deadline=deadline)
        try:
            return self.coordinator.call(message, timeout=deadline + 120.0 if deadline else None)
        except CoordinatorError as exc:
            raise AnsibleActionFail(str(exc)) from None

    def _pass(self, step: str) -> None:
        """This host goes through ``step`` without a tree operation: others need not wait for it."""
        if self._coordinator is None:
            return  # no step ran: nothing waits on this host yet in this coordinator
        try:
            self.coordinator.call({"op": "pass", "task": self._task._uuid, "step": step,
                                   "host": str(self._var("inventory_hostname"))}, timeout=30)
        except CoordinatorError as exc:
            raise AnsibleActionFail(str(exc)) from None

    @property
    def coordinator(self) -> Coordinator:
        if self._coordinator is None:
            self._coordinator = Coordinator(run_pid=os.getppid())
        return self._coordinator

    def _run_as(self, user: str | None) -> str:
        """run-as user: the user option, else become_user when become is on, else the daemon's own (root)."""
        if user:
            return user
        if self._play_context.become:
            return self._play_context.become_user or "root"
        return ""
