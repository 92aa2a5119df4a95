"""Batching: which hosts' requests become one tree operation, and when it is sent.

Pure decision logic: no sockets, no event loop, no tree. The caller (the
coordinator server) hands in each host's request with plain calls and gets back
the groups to run now; a clock (``time.monotonic`` by default, a fake one in
tests) stands for time. The only timed rule is the idle gap: the caller asks
``next_expiry()`` when to call ``expire()`` next.

Words:

* a *task* is one Ansible task of one run (its uuid); every host of the task
  runs it in its own worker;
* a *step* is one tree operation of a host's task, named by the caller
  (``exec``, ``guard``, ``copy``, ``exec3``...);
* a *member* is one host's request at a step (its inventory name and the node
  address its relay daemon listens on);
* a *group* is the members of a step whose requests are the same operation
  (the same ``key``): they become ONE tree operation over all their nodes.

When is a task step dispatched? Every host may run a step several times (loop
items): a host's *round* at a step is how many times it went through it. A
step is dispatched when every expected host that is not done and not ahead
(its round is no later than that of the pending hosts) is waiting in it, or
when as many hosts are waiting in the task as the worker pool lets in at once
(``window``), or when no host arrived in the step for ``gap`` seconds. Without
the ``tree`` strategy the expected hosts are the ``ansible_play_batch`` of the
requests and hosts skipped by ``when`` cost one ``gap`` (0.3 s by default);
with it they are exact (``expect``; skipped hosts are reported ``done``) and
``exact_gap`` is only a safety net. Requests whose keys differ form separate
groups, dispatched together. A request marked ``alone`` (``run_once``) is a
group of its own at once: nobody else will come.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

DEFAULT_GAP = 0.3
DEFAULT_EXACT_GAP = 30.0
FORGET_TASK_AFTER = 3600.0  # drop the batching state of tasks idle this long


class RequestError(ValueError):
    """A request the coordinator refuses: answered with ok=false, nothing else changes."""


@dataclass
class Member:
    """One host's request at a step. Callers subclass it to carry how to answer the host."""

    host: str  # inventory name: one request per host and step at a time
    node: str  # address of its relay daemon: never twice in one tree operation


@dataclass
class Group:
    """Members of one step whose requests are the same operation: one tree operation."""

    task: str
    step: str
    key: str  # identity of the operation: requests with the same key merge
    spec: Any  # what to run, the caller's (opaque here): that of the first member
    members: List[Member] = field(default_factory=list)

    def has(self, host: str, node: str) -> bool:
        return any(m.host == host or m.node == node for m in self.members)

    @property
    def nodes(self) -> List[str]:
        return [m.node for m in self.members]


@dataclass
class Step:
    groups: Dict[str, List[Group]] = field(default_factory=dict)
    rounds: Dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    expires: Optional[float] = None  # when its idle gap runs out (dispatch whatever waits)

    def pending(self) -> Dict[str, Member]:
        return {m.host: m for groups in self.groups.values() for g in groups for m in g.members}


@dataclass
class TaskState:
    name: str = ""
    expected: Set[str] = field(default_factory=set)
    done: Set[str] = field(default_factory=set)
    exact: bool = False  # expected came from the strategy (expect), not guessed from requests
    window: int = 0  # hosts that can be in the task at once (worker pool); 0: unknown
    steps: Dict[str, Step] = field(default_factory=dict)
    last: float = 0.0


class Batcher:
    """Membership of every task of one run; every call returns the groups to run now."""

    def __init__(self, *, gap: float = DEFAULT_GAP, exact_gap: float = DEFAULT_EXACT_GAP,
                 clock: Callable[[], float] = time.monotonic):
        self.gap = gap
        self.exact_gap = exact_gap
        self.clock = clock
        self.tasks: Dict[str, TaskState] = {}

    # -- news from the workers and the strategy -------------------------------------

    def submit(self, task: str, step: str, member: Member, *, key: str, spec: Any = None, name: Any = None,
               expected: Iterable[str] = (), window: Optional[int] = None, alone: bool = False) -> List[Group]:
        """A host's request at a step. ``expected``: the hosts it believes run the task (its play batch)."""
        state = self._task(task, name)
        current = state.steps.get(step)
        if not alone and current is not None and member.host in current.pending():
            raise RequestError("host %s is already waiting in step %s of this task" % (member.host, step))
        if not state.exact:
            if member.host in state.done:  # it runs the task again (a handler): a new run for everyone
                state.done.clear()
            state.expected.update(expected)
            state.expected.add(member.host)
            if window:
                state.window = window
        current = state.steps.setdefault(step, Step())
        group = Group(task, step, key, spec, [member])
        if alone:
            current.rounds[member.host] += 1
            return [group]
        groups = current.groups.setdefault(key, [])
        # Two inventory hosts with the same address run twice: never merge them.
        target = next((g for g in groups if not g.has(member.host, member.node)), None)
        if target is None:
            groups.append(group)
        else:
            target.members.append(member)
        current.expires = self.clock() + (self.exact_gap if state.exact else self.gap)
        return self._evaluate(state)

    def withdraw(self, task: str, step: str, host: str) -> List[Group]:
        """A worker went away before its step was dispatched: forget its request."""
        state = self.tasks.get(task)
        current = state.steps.get(step) if state else None
        if current is None:
            return []
        for key, groups in list(current.groups.items()):
            for g in groups:
                g.members = [m for m in g.members if m.host != host]
            current.groups[key] = [g for g in groups if g.members]
            if not current.groups[key]:
                del current.groups[key]
        return self._evaluate(state)

    def expect(self, task: str, hosts: Iterable[str], window: int = 0, name: Any = None) -> List[Group]:
        """Exact membership (the tree strategy): these hosts run the task, ``window`` of them at once."""
        state = self._task(task, name)
        state.expected = set(hosts)
        state.done = set()
        state.exact = True
        state.window = max(0, int(window or 0))
        for current in state.steps.values():  # a new run of this task (handlers run again)
            if not current.pending():
                current.rounds.clear()
        return self._evaluate(state)

    def done(self, task: str, hosts: Iterable[str]) -> List[Group]:
        """These hosts finished the task (or were skipped by ``when``): nobody waits for them any more."""
        state = self.tasks.get(task)
        if state is None:
            return []
        state.done.update(hosts)
        return self._evaluate(state)

    def passed(self, task: str, step: str, host: str) -> List[Group]:
        """This host went through ``step`` without a tree operation this time."""
        state = self._task(task, None)
        state.steps.setdefault(step, Step()).rounds[host] += 1
        return self._evaluate(state)

    # -- time -------------------------------------------------------------------------

    def next_expiry(self) -> Optional[float]:
        """When (on the clock) the next idle gap runs out, None when nothing waits."""
        times = [s.expires for t in self.tasks.values() for s in t.steps.values()
                 if s.expires is not None and s.groups]
        return min(times) if times else None

    def expire(self) -> List[Group]:
        """Dispatch the steps whose idle gap ran out."""
        now = self.clock()
        out: List[Group] = []
        for state in self.tasks.values():
            for current in state.steps.values():
                if current.expires is not None and current.expires <= now:
                    out += self._dispatch(current)
        return out

    def forget_old_tasks(self) -> None:
        now = self.clock()
        for key in [k for k, s in self.tasks.items()
                    if now - s.last > FORGET_TASK_AFTER and not any(st.pending() for st in s.steps.values())]:
            del self.tasks[key]

    def task_name(self, task: str) -> str:
        state = self.tasks.get(task)
        return state.name if state else ""

    # -- rules ----------------------------------------------------------------------------

    def _task(self, task: str, name: Any) -> TaskState:
        state = self.tasks.setdefault(task, TaskState())
        if name:
            state.name = str(name)
        state.last = self.clock()
        return state

    @staticmethod
    def _ready(state: TaskState, current: Step) -> bool:
        pending = current.pending()
        if not pending:
            return False
        if state.window and sum(len(s.pending()) for s in state.steps.values()) >= state.window:
            return True
        lowest = min(current.rounds[h] for h in pending)
        return all(h in pending or current.rounds[h] > lowest for h in state.expected - state.done)

    def _evaluate(self, state: TaskState) -> List[Group]:
        # Decide for every step before dispatching any: a dispatch empties its step, which would
        # hide from the window count hosts that were waiting when the decision was due.
        ready = [current for current in state.steps.values() if self._ready(state, current)]
        return [group for current in ready for group in self._dispatch(current)]

    @staticmethod
    def _dispatch(current: Step) -> List[Group]:
        current.expires = None
        groups = [g for gs in current.groups.values() for g in gs]
        current.groups = {}
        for group in groups:
            for m in group.members:
                current.rounds[m.host] += 1
        return groups
