# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""tree_ping: check the relay daemon of every host of the task (docs: plugins/modules/tree_ping.py)."""

from __future__ import annotations

from ansible_collections.hpc.relaytree.plugins.plugin_utils._tree_action import TreeAction, ping_result


class ActionModule(TreeAction):

    def run_tree(self, args, task_vars):
        # Read-only: the same in check mode.
        return ping_result(self._request("ping", "ping", {})["outcome"])
