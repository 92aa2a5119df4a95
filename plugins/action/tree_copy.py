# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""tree_copy: push one controller file to every host of the task through the relay tree (docs: plugins/modules/tree_copy.py)."""

from __future__ import annotations

import hashlib
import os
import re

from ansible.errors import AnsibleActionFail, AnsibleError
from ansible.module_utils.common.text.converters import to_bytes

from ansible_collections.hpc.relaytree.plugins.plugin_utils._tree_action import TreeAction, copy_result

DIFF_MAX = 64 * 1024  # bytes: bigger files, or binary ones, get no diff
DEFAULT_CHUNK = 1 << 20
_MODE = re.compile(r"^0?[0-7]{3,4}$")

# Reads the current destination for the diff, from cwd "/" (see guard_path in tree_exec):
# exit 3 when it does not exist; a directory destination means DIR/<source name>.
_BEFORE = 'p=$1; if [ -d "$p" ]; then p=$p/$2; fi; [ -e "$p" ] || exit 3; exec cat -- "$p"'


def _is_text(data: bytes) -> bool:
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class ActionModule(TreeAction):

    ARGUMENT_SPEC = dict(
        src=dict(type="str"),
        content=dict(type="str"),
        dest=dict(type="str", required=True),
        mode=dict(type="raw"),
        owner=dict(type="str"),
        group=dict(type="str"),
        mkdirs=dict(type="bool", default=False),
        backup=dict(type="bool", default=False),
        chunk_size=dict(type="int", default=DEFAULT_CHUNK),
        decrypt=dict(type="bool", default=True),
    )
    VALIDATION = dict(mutually_exclusive=[("src", "content")], required_one_of=[("src", "content")])

    def run_tree(self, args, task_vars):
        dest = args["dest"]
        if not dest.startswith("/"):
            raise AnsibleActionFail("dest must be an absolute path, got %r" % dest)
        if not 0 < args["chunk_size"] <= 8 << 20:
            raise AnsibleActionFail("chunk_size must be between 1 byte and 8 MiB, got %s" % args["chunk_size"])
        mode = self._mode(args.get("mode"))
        if args.get("content") is not None:
            if dest.endswith("/"):
                raise AnsibleActionFail("dest must be a file path when content is given, got the directory %r" % dest)
            src, src_name = self._content_file(to_bytes(args["content"], errors="surrogate_or_strict")), None
        else:
            src, src_name = self._source(args["src"], args["decrypt"])
        st = os.stat(src)

        diff = None
        if self._task.diff:
            diff = self._before(dest, src_name, src, st.st_size)
        reply = self._request("copy", "copy", {
            "src": src, "src_id": [st.st_size, st.st_mtime_ns], "dest": dest, "mode": mode,
            "owner": args.get("owner") or "", "group": args.get("group") or "", "mkdirs": args["mkdirs"],
            "backup": args["backup"], "check": bool(self._task.check_mode), "chunk_size": args["chunk_size"],
        })
        result = copy_result(reply["outcome"], reply.get("operation") or {}, dest)
        if diff is not None and result.get("changed") and not result.get("failed"):
            result["diff"] = diff
        return result

    @staticmethod
    def _mode(mode) -> str:
        if mode is None:
            return ""
        if isinstance(mode, int):  # YAML 0644 arrives as the integer 420
            mode = "%04o" % mode
        mode = str(mode)
        if not _MODE.match(mode):
            raise AnsibleActionFail("mode must be an octal mode such as '0644', got %r (symbolic modes are not supported)"
                                    % mode)
        return mode

    def _source(self, src: str, decrypt: bool):
        """Path of the file to send, as every host of the task finds it (same path: one operation)."""
        try:
            found = self._find_needle("files", src)
        except AnsibleError as exc:
            raise AnsibleActionFail("could not find src=%s: %s" % (src, exc)) from None
        if os.path.isdir(found):
            raise AnsibleActionFail("src must be a file, %s is a directory" % found)
        real = self._loader.get_real_file(found, decrypt=decrypt)
        if real == found:
            return found, os.path.basename(found)
        try:  # a vault-decrypted temporary file: differs per worker, so share it by content
            with open(real, "rb") as fh:
                return self._content_file(fh.read()), os.path.basename(found)
        finally:
            self._loader.cleanup_tmp_file(real)

    def _content_file(self, data: bytes) -> str:
        """A file of the run's scratch directory named by its content: the same for every host."""
        path = os.path.join(self.coordinator.run_dir, "content-" + hashlib.sha256(data).hexdigest())
        if not os.path.exists(path):
            tmp = "%s.%d.tmp" % (path, os.getpid())
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        return path

    def _before(self, dest: str, name: str | None, src: str, size: int):
        """The diff of a small text file (None otherwise): 'before' read from the node by a tree exec.

        ``name`` is the source's file name (None for content), used when dest is a directory.
        """
        if size > DIFF_MAX:
            return None
        with open(src, "rb") as fh:
            after = fh.read()
        if not _is_text(after):
            return None
        reply = self._request("before", "exec", {
            "command": ["sh", "-c", _BEFORE, "sh", "./" + dest.lstrip("/").rstrip("/"), name or ""], "cwd": "/",
            "output_limit": DIFF_MAX + 1})
        outcome = reply["outcome"]
        if outcome.get("rc") == 3:
            before = ""
        elif outcome.get("rc") == 0 and not outcome.get("stdout_truncated"):
            before = outcome.get("stdout") or ""
            if "\0" in before or "\ufffd" in before:  # binary on the node: no diff
                return None
        else:
            return None  # unreachable or unreadable: the copy step reports it
        return {"before": before, "after": after.decode("utf-8"), "before_header": dest, "after_header": name or "dynamically generated"}
