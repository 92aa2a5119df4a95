# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: tree
short_description: Linear strategy with exact batches for the relay tree
version_added: 0.1.0
description:
  - The P(ansible.builtin.linear#strategy) strategy, plus two things for the C(hpc.relaytree) tree tasks.
  - It tells the run's relaytree coordinator which hosts run each tree task, and which of them finished or
    were skipped (by C(when)), so the hosts of a task go down the tree as exactly one operation, however
    slowly the controller starts their workers. Without it the coordinator guesses the batch from
    C(ansible_play_batch) and an idle gap.
  - It enlarges the worker pool (C(forks)) to the size of the batch, up to E(RELAYTREE_MAX_FORKS)
    (default 256), because a tree task keeps every host's worker busy until the whole batch has arrived.
    With a bigger batch the hosts of a task go down the tree in exact groups of that many hosts.
  - Everything else is linear's; results are the same with P(ansible.builtin.linear#strategy) or
    P(ansible.builtin.free#strategy), only the grouping into tree operations is exact here.
notes:
  - Since ansible-core 2.19 every strategy that is not built in makes ansible-core print a deprecation
    warning on each run. Nothing depends on this strategy for correctness.
  - Each worker is a forked ansible-playbook process; hundreds of them need memory on the controller.
author:
  - relaytree developers (!UNKNOWN)
"""

import os

from ansible.plugins.strategy.linear import StrategyModule as LinearStrategyModule
from ansible.utils.display import Display

from ansible_collections.hpc.relaytree.plugins.plugin_utils._relaytree import Coordinator, CoordinatorError

display = Display()

TREE_ACTIONS = frozenset(("tree_exec", "tree_copy", "tree_ping"))
DEFAULT_MAX_FORKS = 256


def is_tree_task(task) -> bool:
    action = getattr(task, "resolved_action", None) or task.action or ""
    namespace, _dot, name = str(action).rpartition(".")
    return name in TREE_ACTIONS and namespace in ("", "hpc.relaytree")


def _throttle(task) -> int:
    try:
        return max(0, int(task.throttle or 0))
    except (TypeError, ValueError):  # a template: unknown here
        return 0


class StrategyModule(LinearStrategyModule):

    def __init__(self, tqm):
        super().__init__(tqm)
        # This process is the ansible-playbook process the workers call os.getppid().
        self._coordinator = Coordinator(run_pid=os.getpid())
        self._announced = set()
        self._coordinator_failed = False

    def run(self, iterator, play_context):
        try:
            limit = int(os.environ.get("RELAYTREE_MAX_FORKS") or DEFAULT_MAX_FORKS)
        except ValueError:
            limit = DEFAULT_MAX_FORKS
        wanted = min(iterator.batch_size, max(1, limit))
        if wanted > len(self._tqm._workers):
            display.vv("hpc.relaytree.tree: %d workers (forks) for a batch of %d hosts" % (wanted, iterator.batch_size))
            self._tqm._initialize_processes(wanted)  # no worker runs yet: safe to resize
            self._workers = self._tqm._workers
        return super().run(iterator, play_context)

    def _get_next_task_lockstep(self, hosts, iterator):
        host_tasks = super()._get_next_task_lockstep(hosts, iterator)
        if host_tasks and is_tree_task(host_tasks[0][1]):
            task = host_tasks[0][1]
            window = len(self._workers)
            if _throttle(task):
                window = min(window, _throttle(task))
            self._tell({"op": "expect", "task": task._uuid, "name": task.get_name(), "window": window,
                        "hosts": [host.name for host, _task in host_tasks]})
            self._announced.add(task._uuid)
        return host_tasks

    def _process_pending_results(self, iterator, one_pass=False, max_passes=None):
        results = super()._process_pending_results(iterator, one_pass=one_pass, max_passes=max_passes)
        finished = {}
        for result in results:
            # ansible-core 2.19+: .task/.host; before: ._task/._host
            task = getattr(result, "task", None) or getattr(result, "_task", None)
            host = getattr(result, "host", None) or getattr(result, "_host", None)
            if task is not None and host is not None and task._uuid in self._announced:
                finished.setdefault(task._uuid, []).append(host.name)
        for task_uuid, hosts in finished.items():
            # Skipped (when), failed before reaching the tree, or done: nobody waits for them now.
            self._tell({"op": "done", "task": task_uuid, "hosts": hosts})
        return results

    def _tell(self, message):
        if self._coordinator_failed:
            return
        try:
            self._coordinator.call(message, timeout=30)
        except CoordinatorError as exc:
            # The tree tasks report the problem themselves; batching falls back to the idle gap.
            self._coordinator_failed = True
            display.warning("hpc.relaytree.tree strategy: cannot reach the coordinator, batches are not exact: %s" % exc)
