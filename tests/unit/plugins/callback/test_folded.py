"""Folding of host results by the hpc.relaytree.folded callback (pure logic)."""

from __future__ import annotations

import json

from ansible_collections.hpc.relaytree.plugins.callback.folded import content_lines, fold, fold_blocks, fold_recap


def dump(result):
    return json.dumps(result, sort_keys=True, indent=4)


def test_fold_uses_nodesets():
    assert fold(["cn1", "cn3", "cn2", "cn10"]) == "cn[1-3,10]"
    assert fold(["127.0.0.%d" % n for n in range(2, 18)]) == "127.0.0.[2-17]"


def test_timing_does_not_split():
    a = {"rc": 0, "stdout": "same", "start": "1", "end": "2", "delta": "1", "changed": True}
    b = dict(a, start="5", end="6", delta="1")
    assert content_lines(a) == content_lines(b) == ("    same",)


def test_content_lines_fields():
    lines = content_lines({"failed": True, "rc": 2, "msg": "bad\nreally", "stdout": "o1\no2\n", "stderr": "e1",
                           "stdout_truncated": True})
    assert lines == ("    msg: bad", "      really", "    rc: 2", "    o1", "    o2", "    stderr: e1",
                     "    [stdout truncated]")


def test_failure_without_text_dumps_result():
    lines = content_lines({"failed": True, "reason": "x"}, dump=dump)
    assert '        "reason": "x"' in lines


def test_verbose_dumps_without_volatile_keys():
    lines = content_lines({"rc": 0, "stdout": "x", "start": "t1", "_ansible_no_log": False}, verbose=True, dump=dump)
    text = "\n".join(lines)
    assert '"stdout": "x"' in text and "start" not in text and "_ansible" not in text


def test_fold_blocks_groups_identical_results():
    same = content_lines({"rc": 0, "stdout": "ok"})
    entries = [("cn%d" % n, "changed", "", same) for n in range(1, 201)] + [
        ("cn202", "changed", "", same),
        ("cn201", "FAILED", "", content_lines({"failed": True, "rc": 1, "msg": "boom"})),
        ("cn5", "changed", "", same),  # reported twice (e.g. by a retry): counted once
    ]
    blocks = fold_blocks(entries)
    assert [(h, s) for h, s, _lines in blocks] == [
        ("cn[1-200,202] (201) changed", "changed"), ("cn201 (1) FAILED", "FAILED")]
    assert blocks[0][2] == ("    ok",)


def test_fold_blocks_items_and_order():
    entries = [("n10", "ok", "a", ()), ("n2", "ok", "b", ()), ("n9", "ok", "a", ()), ("n1", "skipped", "", ())]
    assert [h for h, _s, _l in fold_blocks(entries)] == [
        "n1 (1) skipped", "n2 (1) ok (item=b)", "n[9-10] (2) ok (item=a)"]


def test_fold_recap():
    ok = {"ok": 3, "changed": 1, "unreachable": 0, "failures": 0, "skipped": 0, "rescued": 0, "ignored": 0}
    bad = dict(ok, failures=1)
    recap = fold_recap({"cn1": ok, "cn2": ok, "cn3": bad, "cn4": ok})
    assert [(label, count) for label, count, _summary in recap] == [("cn[1-2,4]", 3), ("cn3", 1)]
    assert recap[1][2]["failures"] == 1
