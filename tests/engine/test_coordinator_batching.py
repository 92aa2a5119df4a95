"""Coordinator batching rules: plain calls and a fake clock (no event loop, no sockets, no tree)."""

from __future__ import annotations

from typing import List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaytree.coordinator.batching import FORGET_TASK_AFTER, Batcher, Group, Member, RequestError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def batcher(gap=0.3, exact_gap=30.0):
    clock = Clock()
    return Batcher(gap=gap, exact_gap=exact_gap, clock=clock), clock


def submit(b, host, *, task="t1", step="exec", key="k", node=None, expected="abc", **kw) -> List[Group]:
    return b.submit(task, step, Member(host, node or host), key=key, spec=("spec", host), expected=list(expected), **kw)


def hosts(groups: List[Group]) -> List[List[str]]:
    return [[m.host for m in g.members] for g in groups]


def test_all_expected_arrived_dispatches_at_once():
    b, _clock = batcher()
    assert submit(b, "a") == [] and submit(b, "b") == []
    (group,) = submit(b, "c")
    assert hosts([group]) == [["a", "b", "c"]] and group.nodes == ["a", "b", "c"]
    assert (group.task, group.step, group.key, group.spec) == ("t1", "exec", "k", ("spec", "a"))  # the first's spec
    assert b.next_expiry() is None  # nothing waits any more


def test_missing_host_costs_one_gap():
    b, clock = batcher(gap=0.3)
    submit(b, "a")
    clock.advance(0.2)
    submit(b, "b")  # each arrival restarts the step's gap
    assert b.next_expiry() == pytest.approx(clock.now + 0.3)
    clock.advance(0.29)
    assert b.expire() == []
    clock.advance(0.02)
    assert hosts(b.expire()) == [["a", "b"]]
    assert b.expire() == [] and b.next_expiry() is None


def test_different_keys_are_separate_operations_dispatched_together():
    b, _clock = batcher()
    submit(b, "a", key="x")
    submit(b, "b", key="y")
    assert sorted(hosts(submit(b, "c", key="x"))) == [["a", "c"], ["b"]]


def test_exact_membership_and_done():
    b, clock = batcher(gap=0.01, exact_gap=30)
    assert b.expect("t1", ["a", "b", "c"], window=0, name="hello") == []
    submit(b, "a")
    submit(b, "b")
    clock.advance(1)
    assert b.expire() == []  # the short gap does not apply: c is announced
    assert hosts(b.done("t1", ["c"])) == [["a", "b"]]  # c skipped by `when`
    assert b.task_name("t1") == "hello"


def test_exact_membership_ignores_guesses_from_requests():
    b, _clock = batcher()
    b.expect("t1", ["a", "b"])
    submit(b, "a", expected="abcdef")
    assert hosts(submit(b, "b", expected="abcdef")) == [["a", "b"]]


def test_exact_gap_is_a_safety_net():
    b, clock = batcher(exact_gap=30)
    b.expect("t1", ["a", "b"])
    submit(b, "a")
    clock.advance(30)
    assert hosts(b.expire()) == [["a"]]


def test_loop_rounds_stay_together():
    b, _clock = batcher()
    submit(b, "a", expected="ab")
    assert hosts(submit(b, "b", expected="ab")) == [["a", "b"]]
    assert submit(b, "a", expected="ab", key="item2") == []  # a waits for b's second round
    assert hosts(submit(b, "b", expected="ab", key="item2")) == [["a", "b"]]


def test_a_host_ahead_does_not_block_the_others():
    """b already went through the step twice (loop): a's first round does not wait for it."""
    b, _clock = batcher()
    b.passed("t1", "exec", "b")
    b.passed("t1", "exec", "b")
    assert hosts(submit(b, "a", expected="ab")) == [["a"]]


def test_pass_releases_the_others():
    b, _clock = batcher()
    assert submit(b, "a", expected="ab") == []
    assert hosts(b.passed("t1", "exec", "b")) == [["a"]]


def test_window_of_the_worker_pool():
    b, _clock = batcher()
    b.expect("t1", ["a", "b", "c", "d"], window=2)
    submit(b, "a")
    assert hosts(submit(b, "b")) == [["a", "b"]]
    submit(b, "c")
    assert hosts(submit(b, "d")) == [["c", "d"]]


def test_window_without_strategy():
    """forks=2: when two hosts wait in the task nobody else can come, so the step goes."""
    b, _clock = batcher()
    submit(b, "a", expected="abcd", window=2)
    assert hosts(submit(b, "b", expected="abcd", window=2)) == [["a", "b"]]


def test_window_counts_every_step_of_the_task():
    b, _clock = batcher()
    b.expect("t1", ["a", "b", "c"], window=2)
    submit(b, "a", step="guard")
    assert sorted(hosts(submit(b, "b", step="exec"))) == [["a"], ["b"]]


def test_same_address_twice_runs_twice():
    b, _clock = batcher()
    submit(b, "a", node="10.0.0.1", expected="ab")
    groups = submit(b, "b", node="10.0.0.1", expected="ab")
    assert [g.nodes for g in groups] == [["10.0.0.1"], ["10.0.0.1"]]


def test_alone_is_dispatched_at_once():
    b, _clock = batcher()
    assert hosts(submit(b, "a", alone=True)) == [["a"]]
    assert hosts(submit(b, "a", alone=True)) == [["a"]]  # run_once in a loop: never "already waiting"
    assert b.next_expiry() is None


def test_withdraw_forgets_the_request():
    b, _clock = batcher()
    submit(b, "b", step="s2")
    assert b.withdraw("t1", "s2", "b") == []
    assert not b.tasks["t1"].steps["s2"].pending() and b.next_expiry() is None
    assert b.withdraw("t1", "nope", "b") == [] and b.withdraw("nope", "s2", "b") == []


def test_withdraw_of_the_last_straggler_releases_nobody_it_still_expects():
    b, _clock = batcher()
    b.expect("t1", ["a", "b"])
    submit(b, "a")
    submit(b, "b", key="other")  # b waits too: a dispatch would have come with it
    assert b.withdraw("t1", "exec", "b") == []  # b is still expected in this step


def test_already_waiting_is_refused():
    b, _clock = batcher()
    submit(b, "a", expected="ab")
    with pytest.raises(RequestError, match="already waiting"):
        submit(b, "a", expected="ab")
    assert hosts(submit(b, "b", expected="ab")) == [["a", "b"]]  # the refused request changed nothing


def test_done_hosts_and_a_new_run():
    b, _clock = batcher()
    assert submit(b, "a") == []
    assert hosts(b.done("t1", ["b", "c"])) == [["a"]]  # b, c finished the task (relay connection close)
    b.done("t1", ["a"])
    # The task runs again (a handler): a done host coming back waits for the others again.
    assert submit(b, "b") == []
    submit(b, "a")
    assert sorted(hosts(submit(b, "c"))[0]) == ["a", "b", "c"]
    assert b.done("unknown", ["a"]) == []


def test_expect_starts_a_new_run_of_the_task():
    b, _clock = batcher()
    b.expect("t1", ["a", "b"])
    submit(b, "a")
    submit(b, "b")
    b.expect("t1", ["a", "b"])  # the handler runs again: rounds start over
    submit(b, "a")
    assert hosts(submit(b, "b")) == [["a", "b"]]


def test_old_tasks_are_forgotten_unless_someone_waits():
    b, clock = batcher()
    submit(b, "a", task="old", expected="a")
    submit(b, "a", task="waiting", expected="ab")
    clock.advance(FORGET_TASK_AFTER + 1)
    b.forget_old_tasks()
    assert list(b.tasks) == ["waiting"]


# Any interleaving of arrivals, passes and done reports: every request is dispatched exactly once
# (at the latest when the gap runs out), and no group holds a host or a node twice.
_event = st.tuples(st.sampled_from(["submit", "pass", "done", "tick"]), st.sampled_from("abcd"),
                   st.sampled_from(["s1", "s2"]), st.sampled_from(["k1", "k2"]))


@settings(max_examples=200, deadline=None)
@given(events=st.lists(_event, max_size=40), exact=st.booleans(), window=st.integers(0, 4),
       shared_node=st.booleans())
def test_every_request_goes_exactly_once(events, exact, window, shared_node):
    b, clock = batcher(gap=1.0, exact_gap=5.0)
    if exact:
        b.expect("t", list("abcd"), window=window)
    submitted, dispatched = [], []

    def collect(groups):
        for g in groups:
            assert len({m.host for m in g.members}) == len(g.members)
            assert len(set(g.nodes)) == len(g.nodes)
            assert all(g.key == key for key in [m.key for m in g.members])
            dispatched.extend(m for m in g.members)

    for kind, host, step, key in events:
        if kind == "submit":
            waiting = b.tasks.get("t") and b.tasks["t"].steps.get(step)
            if waiting and host in waiting.pending():
                continue
            member = Member(host, "n0" if shared_node and host in "ab" else host)
            member.key = key  # checked above: a group only holds its own key
            submitted.append(member)
            collect(b.submit("t", step, member, key=key, expected="abcd", window=window or None))
        elif kind == "pass":
            collect(b.passed("t", step, host))
        elif kind == "done":
            collect(b.done("t", [host]))
        else:
            clock.advance(0.7)
            collect(b.expire())
    clock.advance(10)
    collect(b.expire())
    assert sorted(map(id, dispatched)) == sorted(map(id, submitted))
    assert b.next_expiry() is None
