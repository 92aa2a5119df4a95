"""Tests of relaytree.output: folding, gathered/line rendering, summary, JSON, exit status."""

from __future__ import annotations

import json
import random
import re
import time

import pytest
from ClusterShell.NodeSet import NodeSet
from hypothesis import given, settings
from hypothesis import strategies as st

from relaytree import output
from relaytree.output import (
    SEPARATOR,
    exit_status,
    fold,
    render_gathered,
    render_lines,
    render_lines_text,
    render_summary,
    to_json,
)
from relaytree.results import NodeOutcome, Status

HEADER = re.compile(r"^-{15}\n(\S+) \((\d+)\)\n-{15}$", re.M)


def ok(node, out=b"", **kw):
    return NodeOutcome(node=node, status=Status.PASS, rc=0, stdout=out, **kw)


def blocks(text):
    """[(nodeset, count, content)] of a gathered rendering."""
    heads = list(HEADER.finditer(text))
    res = []
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        res.append((m.group(1), int(m.group(2)), text[m.end() + 1:end]))
    return res


# ------------------------------------------------------------------ fold


def test_fold_hostnames():
    assert fold(["cn1", "cn2", "cn3", "cn4", "cn7"]) == "cn[1-4,7]"
    assert fold(["cn7", "cn3", "cn1", "cn4", "cn2", "cn3"]) == "cn[1-4,7]"  # order, duplicates
    assert fold(["cn01", "cn02", "cn03"]) == "cn[01-03]"  # padding kept
    assert fold(["login", "cn2", "cn1"]) == "cn[1-2],login"
    assert fold(iter(["cn5"])) == "cn5"
    assert fold([]) == ""
    assert fold(["@io", "cn1"]) == "@io,cn1"  # never resolved as a node group
    assert fold(["a[b", "cn1"]) == "a[b,cn1"  # not NodeSet syntax: listed, not crashing


def test_fold_ipv4():
    assert fold(["127.0.0.%d" % i for i in range(2, 22)]) == "127.0.0.[2-21]"
    assert fold(["127.0.0.5"]) == "127.0.0.5"
    assert fold(["10.0.1.3", "10.0.2.3", "cn1"]) == "10.0.[1-2].3,cn1"


# ------------------------------------------------------------------ gathered


def test_gather_three_groups_exact_text():
    outs = []
    for i in range(1, 11):
        if i in (4, 6):
            out = b"kernel 6.1\n"
        elif i == 9:
            out = b"kernel 6.2\nline two\n"
        else:
            out = b"kernel 5.14\n"
        outs.append(ok("cn%d" % i, out))
    assert render_gathered(outs, kind="exec") == (
        "---------------\n"
        "cn[1-3,5,7-8,10] (7)\n"
        "---------------\n"
        "kernel 5.14\n"
        "---------------\n"
        "cn[4,6] (2)\n"
        "---------------\n"
        "kernel 6.1\n"
        "---------------\n"
        "cn9 (1)\n"
        "---------------\n"
        "kernel 6.2\n"
        "line two\n"
    )


def test_gather_order_independent_of_arrival_order():
    outs = [ok("cn%d" % i, b"%d\n" % (i % 4)) for i in range(1, 40)]
    outs += [ok("10.0.0.%d" % i, b"x\n") for i in (9, 10, 11)]
    expected = render_gathered(outs, kind="exec")
    rnd = random.Random(4)
    for _ in range(5):
        rnd.shuffle(outs)
        assert render_gathered(outs, kind="exec") == expected
    # blocks sorted by natural order of their first node
    assert [NodeSet(b[0])[0] for b in blocks(expected)] == ["10.0.0.9", "cn1", "cn2", "cn3", "cn4"]
    natural = [ok("cn10", b"a\n"), ok("cn9", b"b\n"), ok("cn100", b"c\n"), ok("cn2", b"d\n")]
    assert [b[0] for b in blocks(render_gathered(natural, kind="exec"))] == [
        "cn2", "cn9", "cn10", "cn100"]


def test_rc_status_and_error_split_blocks():
    outs = [
        ok("cn1", b"same\n"),
        ok("cn2", b"same\n"),
        NodeOutcome("cn3", Status.FAILED, rc=2, stdout=b"same\n"),
        NodeOutcome("cn4", Status.FAILED, rc=3, stdout=b"same\n"),
        NodeOutcome("cn5", Status.TIMEOUT, stdout=b"same\n"),
        NodeOutcome("cn6", Status.UNREACHABLE, error="connection refused"),
        NodeOutcome("cn7", Status.UNREACHABLE, error="no route to host"),
        NodeOutcome("cn8", Status.UNREACHABLE, error="connection refused"),
    ]
    got = {(ns, n): content for ns, n, content in blocks(render_gathered(outs, kind="exec"))}
    assert got == {
        ("cn[1-2]", 2): "same\n",
        ("cn3", 1): "same\n[exit 2]\n",
        ("cn4", 1): "same\n[exit 3]\n",
        ("cn5", 1): "same\n[TIMEOUT]\n",
        ("cn[6,8]", 2): "[UNREACHABLE: connection refused]\n",
        ("cn7", 1): "[UNREACHABLE: no route to host]\n",
    }


def test_failed_status_always_visible():
    outs = [
        NodeOutcome("cn1", Status.FAILED, error="spawn failed: /bin/nope\nENOENT"),
        NodeOutcome("cn2", Status.FAILED),
        NodeOutcome("cn3", Status.FAILED, rc=1, error="boom"),
    ]
    got = {ns: content for ns, _, content in blocks(render_gathered(outs, kind="exec"))}
    assert got == {
        "cn1": "[FAILED: spawn failed: /bin/nope | ENOENT]\n",
        "cn2": "[FAILED]\n",
        "cn3": "[exit 1]\n[FAILED: boom]\n",
    }


def test_stderr_visible_and_distinguished():
    outs = [
        NodeOutcome("cn1", Status.FAILED, rc=1, stdout=b"out1\n", stderr=b"warn: x\n\nlast"),
        NodeOutcome("cn2", Status.FAILED, rc=1, stdout=b"out1\n", stderr=b"warn: x\n\nlast"),
        ok("cn3", b"out1\n"),  # same stdout, no stderr: other block
    ]
    text = render_gathered(outs, kind="exec")
    got = {ns: content for ns, _, content in blocks(text)}
    assert got["cn[1-2]"] == "out1\nstderr: warn: x\nstderr:\nstderr: last\n[exit 1]\n"
    assert got["cn3"] == "out1\n"

    assert render_lines_text(outs, kind="exec") == (
        "cn1: out1\ncn1: stderr: warn: x\ncn1: stderr:\ncn1: stderr: last\ncn1: [exit 1]\n"
        "cn2: out1\ncn2: stderr: warn: x\ncn2: stderr:\ncn2: stderr: last\ncn2: [exit 1]\n"
        "cn3: out1\n"
    )
    out, err = render_lines(outs, kind="exec")
    assert out == "cn1: out1\ncn2: out1\ncn3: out1\n"
    assert err == (
        "cn1: warn: x\ncn1:\ncn1: last\ncn1: [exit 1]\n"
        "cn2: warn: x\ncn2:\ncn2: last\ncn2: [exit 1]\n"
    )


def test_truncated_flags():
    outs = [
        NodeOutcome("cn1", Status.PASS, rc=0, stdout=b"a" * 10, stdout_truncated=True,
                    stderr=b"e", stderr_truncated=True),
        NodeOutcome("cn2", Status.PASS, rc=0, stdout=b"a" * 10),
    ]
    got = {ns: content for ns, _, content in blocks(render_gathered(outs, kind="exec"))}
    assert got["cn1"] == "aaaaaaaaaa\n[stdout truncated]\nstderr: e\n[stderr truncated]\n"
    assert got["cn2"] == "aaaaaaaaaa\n"
    lines = render_lines_text(outs, kind="exec")
    assert "cn1: [stdout truncated]\n" in lines and "cn1: [stderr truncated]\n" in lines
    assert "cn2: [" not in lines


def test_no_output_and_invalid_utf8():
    outs = [ok("cn1"), ok("cn2"), ok("cn3", b"caf\xc3\xa9 \xff\n")]
    text = render_gathered(outs, kind="exec")
    got = {ns: content for ns, _, content in blocks(text)}
    assert got == {"cn[1-2]": "[no output]\n", "cn3": "caf\u00e9 \ufffd\n"}
    assert render_lines_text(outs, kind="exec") == "cn3: caf\u00e9 \ufffd\n"  # silent when no output


def test_no_trailing_noise():
    outs = [ok("cn1", b"a\n\n"), NodeOutcome("cn2", Status.FAILED, rc=1, stderr=b"\n"),
            NodeOutcome("cn3", Status.UNREACHABLE, error="refused\n")]
    for text in (render_gathered(outs, kind="exec"), render_lines_text(outs, kind="exec"),
                 *render_lines(outs, kind="exec"), render_summary(outs)):
        assert text.endswith("\n") and not text.endswith("\n\n") or text == ""
        assert all(line == line.rstrip() for line in text.split("\n"))
    assert render_gathered([], kind="exec") == ""
    assert render_lines_text([], kind="exec") == ""
    assert render_summary([]) == ""


def test_unknown_kind():
    with pytest.raises(ValueError):
        render_gathered([ok("cn1")], kind="shell")
    with pytest.raises(ValueError):
        render_lines_text([ok("cn1")], kind="")
    with pytest.raises(ValueError):
        render_summary([ok("cn1")], kind="pong")


# ------------------------------------------------------------------ copy / ping


def test_copy_kind():
    outs = [NodeOutcome("cn%d" % i, Status.PASS, rc=0, changed=i <= 3, dest="/etc/hosts")
            for i in range(1, 17)]
    outs.append(NodeOutcome("cn17", Status.FAILED, error="Permission denied", dest="/etc/hosts"))
    outs.append(NodeOutcome("cn18", Status.UNREACHABLE, error="connection refused"))
    text = render_gathered(outs, kind="copy")
    assert [(ns, n, c) for ns, n, c in blocks(text)] == [
        ("cn[1-3]", 3, "changed: /etc/hosts\n"),
        ("cn[4-16]", 13, "unchanged: /etc/hosts\n"),
        ("cn17", 1, "dest: /etc/hosts\n[FAILED: Permission denied]\n"),
        ("cn18", 1, "[UNREACHABLE: connection refused]\n"),
    ]
    assert render_summary(outs, kind="copy") == (
        "PASS: cn[1-16] (16) changed: cn[1-3] (3)\n"
        "FAILED: cn17 (1)\n"
        "  cn17 (1): Permission denied\n"
        "UNREACHABLE: cn18 (1)\n"
        "  cn18 (1): connection refused\n"
    )
    unchanged = [o for o in outs if o.status is Status.PASS and not o.changed]
    assert render_summary(unchanged, kind="copy") == "PASS: cn[4-16] (13) unchanged\n"
    assert render_summary(outs).startswith("PASS: cn[1-16] (16)\n")  # exec: no copy info
    assert render_lines_text(outs[:1] + outs[-2:], kind="copy") == (
        "cn1: changed: /etc/hosts\n"
        "cn17: dest: /etc/hosts\n"
        "cn17: [FAILED: Permission denied]\n"
        "cn18: [UNREACHABLE: connection refused]\n"
    )
    out, err = render_lines(outs[:1] + outs[-2:], kind="copy")
    assert out == "cn1: changed: /etc/hosts\ncn17: dest: /etc/hosts\n"
    assert err == "cn17: [FAILED: Permission denied]\ncn18: [UNREACHABLE: connection refused]\n"


def _ping(node, version="0.1.0", uptime=0.0, load=(0.0, 0.0, 0.0), hostname=None):
    return NodeOutcome(node, Status.PASS, ping={
        "version": version, "protocol_version": 1, "hostname": hostname or node,
        "uptime": uptime, "load": list(load)})


def test_ping_kind():
    outs = [_ping("cn%d" % i, uptime=3 * 86400 + i * 3600, load=(0.25 * i, 0.5, 0.75))
            for i in range(1, 5)]
    outs.append(_ping("cn5", version="0.0.9", uptime=3725.9, load=(1.5, 1.0, 0.5),
                      hostname="cn5.cluster"))
    outs.append(NodeOutcome("cn6", Status.UNREACHABLE, error="connection refused"))
    text = render_gathered(outs, kind="ping")
    assert blocks(text) == [
        ("cn[1-4]", 4, "version 0.1.0 (protocol 1)\nhostname cn[1-4] (4)\n"
                       "uptime 3d 01:00:00 .. 3d 04:00:00\nload 0.25 .. 1.00 (1 min)\n"),
        ("cn5", 1, "version 0.0.9 (protocol 1)\nhostname cn5.cluster\n"
                   "uptime 01:02:05\nload 1.50 1.00 0.50\n"),
        ("cn6", 1, "[UNREACHABLE: connection refused]\n"),
    ]
    lines = render_lines_text(outs, kind="ping")
    assert lines.splitlines()[0] == (
        "cn1: version 0.1.0 (protocol 1), hostname cn1, uptime 3d 01:00:00, load 0.25 0.50 0.75")
    assert lines.splitlines()[-1] == "cn6: [UNREACHABLE: connection refused]"


# ------------------------------------------------------------------ summary


def test_summary_exact_text():
    outs = [ok("cn%d" % i, b"x\n") for i in range(1, 234) if i not in (8, 20, 30, 31, 40)]
    outs.insert(7, NodeOutcome("cn8", Status.FAILED, rc=3))
    outs.append(NodeOutcome("cn20", Status.FAILED, rc=1, error="killed"))
    outs.append(NodeOutcome("cn30", Status.UNREACHABLE, error="connection refused"))
    outs.append(NodeOutcome("cn31", Status.UNREACHABLE, error="connection refused"))
    outs.append(NodeOutcome("cn40", Status.TIMEOUT))
    outs.append(NodeOutcome("cn300", Status.UNREACHABLE, error="no route to host"))
    assert render_summary(outs) == (
        "PASS: cn[1-7,9-19,21-29,32-39,41-233] (228)\n"
        "FAILED: cn[8,20] (2)\n"
        "  cn8 (1): exit 3\n"
        "  cn20 (1): exit 1: killed\n"
        "TIMEOUT: cn40 (1)\n"
        "UNREACHABLE: cn[30-31,300] (3)\n"
        "  cn[30-31] (2): connection refused\n"
        "  cn300 (1): no route to host\n"
    )


def test_summary_status_order_and_missing_reasons():
    outs = [
        NodeOutcome("n3", Status.UNREACHABLE, error="refused"),
        NodeOutcome("n1", Status.TIMEOUT, error="timed out after 5s"),
        NodeOutcome("n2", Status.TIMEOUT),
        ok("n4"),
    ]
    assert render_summary(outs) == (
        "PASS: n4 (1)\n"
        "TIMEOUT: n[1-2] (2)\n"
        "  n1 (1): timed out after 5s\n"
        "  n2 (1): (no error message)\n"
        "UNREACHABLE: n3 (1)\n"
        "  n3 (1): refused\n"
    )


# ------------------------------------------------------------------ JSON, exit


def test_json_shape():
    outs = [
        ok("cn1", b"hi\n"),
        NodeOutcome("cn2", Status.FAILED, rc=2, stderr=b"\xff oops", stderr_truncated=True),
        NodeOutcome("cn3", Status.UNREACHABLE, error="refused"),
        _ping("cn4"),
    ]
    doc = to_json(outs)
    assert set(doc) == {"nodes", "summary"}
    assert list(doc["nodes"]) == ["cn1", "cn2", "cn3", "cn4"]
    assert doc["nodes"]["cn2"] == outs[1].to_dict()
    assert doc["summary"] == {"PASS": 2, "FAILED": 1, "TIMEOUT": 0, "UNREACHABLE": 1}
    back = json.loads(json.dumps(doc))
    assert back == doc
    assert back["nodes"]["cn2"]["stderr"] == "\ufffd oops"
    assert back["nodes"]["cn2"]["stderr_truncated"] is True
    assert back["nodes"]["cn1"]["rc"] == 0 and back["nodes"]["cn3"]["rc"] is None
    assert to_json([]) == {"nodes": {}, "summary": {"PASS": 0, "FAILED": 0, "TIMEOUT": 0,
                                                    "UNREACHABLE": 0}}


def test_exit_status():
    assert exit_status([ok("cn1"), ok("cn2")]) == 0
    assert exit_status([ok("cn1"), NodeOutcome("cn2", Status.FAILED, rc=1)]) == 1
    assert exit_status([NodeOutcome("cn1", Status.TIMEOUT)]) == 1
    assert exit_status([ok("cn1"), NodeOutcome("cn2", Status.UNREACHABLE, error="x")]) == 1
    assert exit_status([]) == 1


# ------------------------------------------------------------------ property


_names = st.one_of(
    st.integers(0, 300).map(lambda i: "cn%d" % i),
    st.tuples(st.integers(1, 4), st.integers(1, 20)).map(lambda t: "r%dn%d" % t),
    st.tuples(st.integers(0, 2), st.integers(0, 255)).map(lambda t: "10.1.%d.%d" % t),
)
_outcomes = st.builds(
    lambda status, rc, out, err, error, trunc: (status, rc, out, err, error, trunc),
    st.sampled_from(list(Status)),
    st.sampled_from([None, 0, 1, 2]),
    st.sampled_from([b"", b"a\n", b"b\nc\n", b"\xff\n"]),
    st.sampled_from([b"", b"warn\n"]),
    st.sampled_from(["", "refused", "no route"]),
    st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_names, _outcomes, min_size=1, max_size=80),
       st.sampled_from(["exec", "copy", "ping"]))
def test_property_every_node_in_exactly_one_block(table, kind):
    outs = [
        NodeOutcome(name, status, rc=rc, stdout=out, stderr=err, error=error,
                    stdout_truncated=trunc, changed=trunc, dest="/tmp/f",
                    ping={"version": "1", "protocol_version": 1, "hostname": name,
                          "uptime": 10.0, "load": [0.1, 0.2, 0.3]} if rc == 0 else None)
        for name, (status, rc, out, err, error, trunc) in table.items()
    ]
    text = render_gathered(outs, kind=kind)
    seen = []
    total = 0
    for ns, count, content in blocks(text):
        nodes = list(NodeSet(ns))
        assert len(nodes) == count
        assert content.endswith("\n") and content.strip()
        seen.extend(nodes)
        total += count
    assert sorted(seen) == sorted(table)  # every node, exactly once
    assert total == len(outs)
    assert text.count(SEPARATOR + "\n") == 2 * len(blocks(text))

    summary = render_summary(outs, kind=kind)
    status_lines = [line for line in summary.splitlines() if not line.startswith("  ")]
    assert sum(int(re.search(r"\((\d+)\)", line).group(1)) for line in status_lines) == len(outs)
    assert to_json(outs)["summary"] == {
        s.value: sum(o.status is s for o in outs) for s in Status}
    assert exit_status(outs) == (0 if all(o.status is Status.PASS for o in outs) else 1)


# ------------------------------------------------------------------ speed


def test_ten_thousand_nodes_fast():
    outs = []
    for i in range(10000):
        name = "cn%d" % (i + 1)
        if i % 997 == 0:
            outs.append(NodeOutcome(name, Status.UNREACHABLE, error="refused %d" % (i % 3)))
        elif i % 101 == 0:
            outs.append(NodeOutcome(name, Status.FAILED, rc=1, stderr=b"boom\n"))
        else:
            outs.append(ok(name, b"out %d\n" % (i % 3)))
    distinct = [ok("cn%d" % (i + 1), b"host%d\n" % i) for i in range(10000)]  # `hostname`

    def best_of_3(render):  # best of 3: robust to a busy test machine
        times = []
        for _ in range(3):
            output._fold_cached.cache_clear()  # time the folding, not the cache
            start = time.perf_counter()
            result = render()
            times.append(time.perf_counter() - start)
        return min(times), result

    elapsed, text = best_of_3(lambda: (
        render_gathered(outs, kind="exec"),
        render_summary(outs),
        render_lines(outs, kind="exec"),
        json.dumps(to_json(outs)),
    )[0])
    assert sum(n for _, n, _ in blocks(text)) == 10000
    assert len(blocks(text)) == 3 + 1 + 3  # 3 outputs, 1 failure, 3 errors
    assert elapsed < 0.6, elapsed
    elapsed, text = best_of_3(lambda: render_gathered(distinct, kind="exec"))
    assert len(blocks(text)) == 10000
    assert elapsed < 0.4, elapsed
