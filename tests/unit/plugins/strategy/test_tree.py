"""hpc.relaytree.tree strategy: what it tells the coordinator, and the worker pool it asks for.

Linear's own scheduling is replaced by stubs returning the host/task pairs and results a play would
produce; the coordinator by a recorder. A real play with this strategy: tests/integration/test_playbook_tree.py.
"""

from __future__ import annotations

import queue
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest
import yaml
from ansible.plugins.strategy import StrategyBase
from ansible.plugins.strategy.linear import StrategyModule as LinearStrategyModule

from ansible_collections.hpc.relaytree.plugins.plugin_utils._relaytree import CoordinatorError
from ansible_collections.hpc.relaytree.plugins.strategy import tree

RUNTIME = Path(__file__).resolve().parents[4] / "meta" / "runtime.yml"


class Recorder:
    def __init__(self, error=None):
        self.messages = []
        self.error = error

    def call(self, message, timeout=None):
        self.messages.append(message)
        if self.error:
            raise self.error
        return {"ok": True}


class FakeTQM:
    def __init__(self, workers=5):
        self._workers = [None] * workers
        self._final_q = queue.Queue()
        self.resized = []

    def get_inventory(self):
        return MagicMock()

    def get_variable_manager(self):
        return MagicMock()

    def get_loader(self):
        return MagicMock()

    def _initialize_processes(self, count):
        self.resized.append(count)
        self._workers = [None] * count


def make_task(action="hpc.relaytree.tree_exec", uuid="T1", throttle=0, resolved=True):
    return SimpleNamespace(_uuid=uuid, action=action, resolved_action=action if resolved else None,
                           throttle=throttle, get_name=lambda: "task " + uuid)


def host(name):
    return SimpleNamespace(name=name)


@pytest.fixture
def strategy():
    made = []

    def make(workers=5, error=None):
        s = tree.StrategyModule(FakeTQM(workers))
        s._coordinator = Recorder(error)
        made.append(s)
        return s

    yield make
    for s in made:
        s.cleanup()  # stops the result thread


@pytest.mark.parametrize("action, resolved, expected", [
    ("hpc.relaytree.tree_exec", True, True),
    ("hpc.relaytree.tree_ping", True, True),
    ("tree_copy", False, True),  # short name, before the action is resolved
    ("ansible.builtin.command", True, False),
    ("other.collection.tree_exec", True, False),
])
def test_is_tree_task(action, resolved, expected):
    assert tree.is_tree_task(make_task(action, resolved=resolved)) is expected


def test_tree_actions_are_the_action_group():
    """Every member of group/hpc.relaytree.tree is a tree task for the strategy, and nothing else."""
    groups = yaml.safe_load(RUNTIME.read_text())["action_groups"]
    assert set(groups["tree"]) == tree.TREE_ACTIONS


def test_run_enlarges_the_worker_pool(strategy, monkeypatch):
    ran = []
    monkeypatch.setattr(LinearStrategyModule, "run", lambda self, iterator, play_context: ran.append(iterator) or 0)
    monkeypatch.delenv("RELAYTREE_MAX_FORKS", raising=False)
    s = strategy(workers=5)
    assert s.run(SimpleNamespace(batch_size=40), None) == 0 and ran
    assert s._tqm.resized == [40] and len(s._workers) == 40
    s = strategy(workers=5)
    monkeypatch.setenv("RELAYTREE_MAX_FORKS", "16")
    s.run(SimpleNamespace(batch_size=40), None)
    assert s._tqm.resized == [16] and len(s._workers) == 16
    s = strategy(workers=50)
    s.run(SimpleNamespace(batch_size=40), None)
    assert s._tqm.resized == []  # enough workers already
    s = strategy(workers=5)
    monkeypatch.setenv("RELAYTREE_MAX_FORKS", "lots")
    s.run(SimpleNamespace(batch_size=300), None)
    assert s._tqm.resized == [tree.DEFAULT_MAX_FORKS]


def test_tree_tasks_are_announced(strategy, monkeypatch):
    s = strategy(workers=8)
    pairs = []
    monkeypatch.setattr(LinearStrategyModule, "_get_next_task_lockstep", lambda self, hosts, iterator: pairs)
    pairs[:] = [(host("cn1"), make_task()), (host("cn2"), make_task())]
    assert s._get_next_task_lockstep([], None) == pairs
    assert s._coordinator.messages == [{"op": "expect", "task": "T1", "name": "task T1", "window": 8,
                                        "hosts": ["cn1", "cn2"]}]
    pairs[:] = [(host("cn1"), make_task(uuid="T2", throttle=3))]
    s._get_next_task_lockstep([], None)
    assert s._coordinator.messages[-1]["window"] == 3
    pairs[:] = [(host("cn1"), make_task(uuid="T3", throttle="{{ n }}"))]
    s._get_next_task_lockstep([], None)
    assert s._coordinator.messages[-1]["window"] == 8  # a template: unknown here
    pairs[:] = [(host("cn1"), make_task("ansible.builtin.debug", uuid="T4"))]
    s._get_next_task_lockstep([], None)
    pairs[:] = []
    s._get_next_task_lockstep([], None)
    assert [m["task"] for m in s._coordinator.messages] == ["T1", "T2", "T3"]


def test_finished_hosts_are_reported_done(strategy, monkeypatch):
    s = strategy()
    s._announced.add("T1")
    results = []
    monkeypatch.setattr(StrategyBase, "_process_pending_results", lambda self, iterator, **kw: results)
    t1, other = make_task(uuid="T1"), make_task("ansible.builtin.debug", uuid="T9")
    results[:] = [SimpleNamespace(task=t1, host=host("cn1")),  # ansible-core 2.19+
                  SimpleNamespace(_task=t1, _host=host("cn2")),  # before
                  SimpleNamespace(task=other, host=host("cn1"))]
    assert s._process_pending_results(None) == results
    assert s._coordinator.messages == [{"op": "done", "task": "T1", "hosts": ["cn1", "cn2"]}]
    results[:] = []
    s._process_pending_results(None)
    assert len(s._coordinator.messages) == 1


def test_unreachable_coordinator_warns_once(strategy, monkeypatch):
    s = strategy()
    s._coordinator = Recorder(CoordinatorError("cannot connect"))
    warnings = []
    monkeypatch.setattr(tree.display, "warning", warnings.append)
    monkeypatch.setattr(LinearStrategyModule, "_get_next_task_lockstep",
                        lambda self, hosts, iterator: [(host("cn1"), make_task())])
    s._get_next_task_lockstep([], None)
    s._get_next_task_lockstep([], None)
    assert len(s._coordinator.messages) == 1  # not tried again
    assert len(warnings) == 1 and "batches are not exact: cannot connect" in warnings[0]
