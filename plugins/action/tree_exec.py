# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""tree_exec: run a command on every host of the task through the relay tree (docs: plugins/modules/tree_exec.py)."""

from __future__ import annotations

import re

from ansible.errors import AnsibleActionFail

from ansible_collections.hpc.relaytree.plugins.plugin_utils._tree_action import TreeAction, exec_result, unreachable_result

# creates/removes are evaluated on the node, with the shell's globbing as Ansible's glob.glob
# ($1 unquoted under IFS= : pathname expansion without word splitting). Exit 10: creates
# exists, 11: removes missing, 0: run the command.
_CREATES = 'for f in $1; do if [ -e "$f" ] || [ -L "$f" ]; then exit 10; fi; done; '
_REMOVES = 'for f in $2; do if [ -e "$f" ] || [ -L "$f" ]; then exit 0; fi; done; exit 11; '
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def guard_path(path: str, chdir: str | None) -> str:
    """A creates/removes path as seen from cwd "/": relative to chdir as in ansible.builtin.command.

    Going through "./" keeps it under a daemon's --base-dir like every other path of a request.
    """
    if not path.startswith("/") and chdir:
        path = chdir.rstrip("/") + "/" + path
    return "./" + path.lstrip("/")


def guard_command(creates: str | None, removes: str | None, chdir: str | None) -> list:
    script = "IFS=; " + (_CREATES if creates else "") + (_REMOVES if removes else "") + "exit 0"
    return ["sh", "-c", script, "sh", guard_path(creates, chdir) if creates else "",
            guard_path(removes, chdir) if removes else ""]


class ActionModule(TreeAction):

    ARGUMENT_SPEC = dict(
        cmd=dict(type="str"),
        argv=dict(type="list", elements="str"),
        chdir=dict(type="str"),
        env=dict(type="dict", default={}),
        user=dict(type="str"),
        stdin=dict(type="str"),
        stdin_add_newline=dict(type="bool", default=True),
        timeout=dict(type="float"),
        creates=dict(type="str"),
        removes=dict(type="str"),
        output_limit=dict(type="int", default=0),
        strip_empty_ends=dict(type="bool", default=True),
    )
    VALIDATION = dict(mutually_exclusive=[("cmd", "argv")], required_one_of=[("cmd", "argv")])

    def run_tree(self, args, task_vars):
        command = args["cmd"] if args.get("cmd") is not None else args["argv"]
        if not command or (isinstance(command, str) and not command.strip()):
            raise AnsibleActionFail("cmd/argv: the command is empty")
        chdir = args.get("chdir")
        if chdir is not None and not chdir.startswith("/"):
            raise AnsibleActionFail("chdir must be an absolute path, got %r" % chdir)
        if args.get("timeout") is not None and args["timeout"] <= 0:
            raise AnsibleActionFail("timeout must be positive, got %s" % args["timeout"])
        if args["output_limit"] < 0:
            raise AnsibleActionFail("output_limit must be 0 (the daemon's default) or a number of bytes")
        env = {}
        for name, value in args["env"].items():
            if not _ENV_NAME.match(str(name)):
                raise AnsibleActionFail("env: %r is not a valid variable name" % (name,))
            env[str(name)] = "" if value is None else str(value)

        creates, removes = args.get("creates"), args.get("removes")
        shoulda = "Would" if self._task.check_mode else "Did"
        if creates or removes:
            skip = self._guard(creates, removes, chdir)
            if isinstance(skip, dict):
                return skip
            if skip:
                what, path = ("exists", creates) if skip == 10 else ("does not exist", removes)
                self._pass("exec")
                return {"changed": False, "rc": 0, "cmd": command, "stdout": "skipped, since %s %s" % (path, what),
                        "stderr": "", "msg": "%s not run command since '%s' %s" % (shoulda, path, what)}
        if self._task.check_mode:
            result = {"changed": True, "rc": 0, "cmd": command, "msg": "Command would have run if not in check mode"}
            if not (creates or removes):
                result.update(skipped=True, changed=False)
            return result

        stdin = args.get("stdin")
        if stdin is not None and args["stdin_add_newline"]:
            stdin += "\n"
        reply = self._request("exec", "exec", {
            "command": command, "env": env, "cwd": chdir or "", "user": self._run_as(args.get("user")),
            "stdin": stdin or "", "timeout": args.get("timeout"), "output_limit": args["output_limit"],
        })
        return exec_result(reply["outcome"], command, args["strip_empty_ends"])

    def _guard(self, creates, removes, chdir):
        """0: run the command, 10/11: skip it (creates exists / removes missing), dict: a failed result."""
        outcome = self._request("guard", "exec", {"command": guard_command(creates, removes, chdir), "cwd": "/"},
                                deadline=self._tree_args.get("deadline") or 120.0)["outcome"]
        if outcome.get("status") == "UNREACHABLE":
            return unreachable_result(outcome)
        if outcome.get("rc") in (0, 10, 11):
            return outcome["rc"]
        return {"failed": True, "changed": False, "msg": "cannot check creates/removes on the node: %s"
                % (outcome.get("error") or outcome.get("stderr") or "exit %s" % outcome.get("rc"))}
