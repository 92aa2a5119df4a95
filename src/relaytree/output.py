"""Human and JSON rendering of per-node results, folded by node set.

Every node set shown here is folded by ClusterShell's ``NodeSet`` (group
resolution disabled, so a name is only ever a name): ``cn[1-4,7]``,
``127.0.0.[2-21]``, ``r[1-2]n[1-8]``.

Text format
-----------
Every function returning text returns ``""`` or text ending with exactly one
newline; write it as is (``sys.stdout.write(text)``), not with ``print``.

``render_gathered`` (like ``clush -b``) prints one block per distinct result::

    ---------------
    cn[1-3,5] (4)
    ---------------
    <stdout lines, as is>
    [stdout truncated]
    stderr: <each stderr line, prefixed with "stderr: ">
    [stderr truncated]
    [exit 3]

Lines in square brackets are annotations written by relaytree, never output
of the node:

* ``[stdout truncated]`` / ``[stderr truncated]`` when the daemon cut a stream;
* ``[exit N]`` when rc is set and non-zero (whatever the status);
* ``[FAILED]`` / ``[FAILED: <error>]`` for FAILED nodes (``[FAILED]`` only
  when there is neither an error message nor a non-zero rc to show);
* ``[TIMEOUT]`` / ``[TIMEOUT: <error>]`` and ``[UNREACHABLE]`` /
  ``[UNREACHABLE: <error>]``;
* ``[error: <error>]`` for a PASS node that carries an error message;
* ``[no output]`` when a block would otherwise be empty.

Error messages are put on one line (line breaks become " | ").

Kinds: ``exec`` shows the above. ``copy`` starts each block with
``changed: <dest>`` or ``unchanged: <dest>`` (PASS nodes; a failed copy shows
``dest: <dest>``, or ``changed: <dest>`` if it changed the file before
failing). ``fetch`` starts each block with ``changed: SIZE bytes, sha256 HEX``
(or ``unchanged: ...`` when the local file already held that content; PASS
nodes), so nodes whose files are identical share a block; the local path of
each node's file (DESTDIR/NODE/NAME) is in the JSON. ``ping`` starts each block with ``version V (protocol P)``, then
``hostname``, ``uptime`` and ``load``: exact values for a one-node block; for
a bigger block the reported hostnames folded with their count, the uptime
range (``min .. max``) and the 1-minute load range.

Gathering key: nodes share a block iff their status, rc, error, stdout,
stderr and truncation flags are identical, plus (copy) changed and dest, plus
(fetch) changed, size and sha256, plus (ping) version and protocol version. The block text depends on nothing else.

Order: blocks are sorted by the first node of their NodeSet, in natural order
(``cn2`` before ``cn10``, ``10.0.0.9`` before ``10.0.0.10``); the arrival
order of the results does not matter. ``render_lines`` and ``to_json`` keep
the order of the input (the target order). Summary error sub-lines are
sorted like blocks.

``render_lines`` (like plain ``clush``) prefixes every line with ``node: ``
and returns a pair ``Lines(stdout, stderr)`` to print each on its own
stream, as clush does: node stdout (and copy/ping info) in the first, node
stderr and all bracketed annotations in the second. The content is the same
as in a one-node gathered block, except that ping info is on one line and a
PASS node without output prints nothing. ``render_lines_text`` returns the
same lines as one text instead, stderr lines marked ``node: stderr: ...``.

Exit status (``exit_status``): 0 iff there is at least one node and every
node is PASS, else 1. No other codes.
"""

from __future__ import annotations

import functools
import re
from typing import (
    Any,
    Dict,
    Hashable,
    Iterable,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
)

from ClusterShell.NodeSet import RESOLVER_NOGROUP, NodeSet, NodeSetParseError

from relaytree.results import NodeOutcome, Status

__all__ = [
    "KINDS",
    "SEPARATOR",
    "Lines",
    "exit_status",
    "fold",
    "render_gathered",
    "render_lines",
    "render_lines_text",
    "render_summary",
    "to_json",
]

KINDS = ("exec", "copy", "ping", "fetch")
SEPARATOR = "-" * 15  # as clush -b
STATUS_ORDER = (Status.PASS, Status.FAILED, Status.TIMEOUT, Status.UNREACHABLE)
STDERR_PREFIX = "stderr: "

_DIGITS = re.compile(r"(\d+)")


class Lines(NamedTuple):
    """``render_lines`` result: text for stdout and text for stderr."""

    stdout: str
    stderr: str


# --------------------------------------------------------------- folding


def _nodeset(names: Iterable[str]) -> Optional[NodeSet]:
    try:
        return NodeSet.fromlist(names, resolver=RESOLVER_NOGROUP)
    except NodeSetParseError:
        return None


def _fold_count(names: Sequence[str]) -> Tuple[str, int, str]:
    """Folded node set, its node count and its first node (NodeSet order)."""
    if len(names) == 1:  # fast path: 10,000 distinct outputs = 10,000 blocks
        return names[0], 1, names[0]
    return _fold_cached(tuple(names))


@functools.lru_cache(maxsize=16)
def _fold_cached(names: Tuple[str, ...]) -> Tuple[str, int, str]:
    # Cached: the gathered view and the summary often fold the same big set
    # (multi-dimensional sets such as 10,000 IPv4 addresses take ~0.8 s).
    ns = _nodeset(names)
    if ns is None:  # not NodeSet syntax (cannot come from a NodeSet target)
        uniq = sorted(set(names), key=_natural_key)
        return ",".join(uniq), len(uniq), uniq[0] if uniq else ""
    if not len(ns):
        return "", 0, ""
    return str(ns), len(ns), ns[0]


def fold(names: Iterable[str]) -> str:
    """Fold node names with ClusterShell: ``["cn1", "cn2", "cn4"]`` -> ``"cn[1-2,4]"``.

    Duplicates count once; an empty input gives ``""``.
    """
    return _fold_count(list(names))[0]


def _natural_key(name: str) -> Tuple[Any, ...]:
    parts = _DIGITS.split(name)
    parts[1::2] = [int(p) for p in parts[1::2]]
    return (tuple(parts), name)


def _label(folded: str, count: int) -> str:
    return "%s (%d)" % (folded, count)


# --------------------------------------------------------------- content


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError("kind must be one of %s, not %r" % ("/".join(KINDS), kind))


def _oneline(text: str) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _text_lines(data: bytes) -> List[str]:
    if not data:
        return []
    text = data.decode("utf-8", "replace")
    if text.endswith("\n"):
        text = text[:-1]
    return text.split("\n")


def _fmt_uptime(seconds: Any) -> str:
    try:
        total = int(float(seconds))
    except (TypeError, ValueError):
        return str(seconds)
    days, rest = divmod(max(total, 0), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    hms = "%02d:%02d:%02d" % (hours, minutes, secs)
    return "%dd %s" % (days, hms) if days else hms


def _fmt_load(load: Any) -> str:
    try:
        return " ".join("%.2f" % float(x) for x in load)
    except (TypeError, ValueError):
        return str(load)


def _version_line(ping: Dict[str, Any]) -> str:
    version = ping.get("version") or "?"
    proto = ping.get("protocol_version")
    if proto in (None, ""):
        return "version %s" % version
    return "version %s (protocol %s)" % (version, proto)


def _annotations(o: NodeOutcome) -> List[str]:
    """Bracketed status lines (rc, status, error) of one outcome."""
    notes: List[str] = []
    error = _oneline(o.error) if o.error else ""
    if o.rc is not None and o.rc != 0:
        notes.append("[exit %d]" % o.rc)
    if o.status is Status.PASS:
        if error:
            notes.append("[error: %s]" % error)
    elif o.status is Status.FAILED and not error:
        if not notes:
            notes.append("[FAILED]")
    else:
        notes.append("[%s: %s]" % (o.status.value, error) if error else "[%s]" % o.status.value)
    return notes


def _copy_line(o: NodeOutcome) -> Optional[str]:
    if o.status is Status.PASS or o.changed:
        word = "changed" if o.changed else "unchanged"
        return "%s: %s" % (word, o.dest) if o.dest else word
    if o.dest:
        return "dest: %s" % o.dest
    return None


def _fetch_line(o: NodeOutcome) -> Optional[str]:
    if o.status is not Status.PASS or not o.sha256:
        return None
    return "%s: %d bytes, sha256 %s" % ("changed" if o.changed else "unchanged", o.size or 0, o.sha256)


def _ping_oneline(ping: Dict[str, Any]) -> str:
    parts = [_version_line(ping)]
    if ping.get("hostname"):
        parts.append("hostname %s" % ping["hostname"])
    if ping.get("uptime") is not None:
        parts.append("uptime %s" % _fmt_uptime(ping["uptime"]))
    if ping.get("load"):
        parts.append("load %s" % _fmt_load(ping["load"]))
    return ", ".join(parts)


def _ping_block_lines(pings: List[Dict[str, Any]]) -> List[str]:
    """Ping info of a block: exact for one node, folded/ranged for more."""
    lines = [_version_line(pings[0])]
    if len(pings) == 1:
        ping = pings[0]
        if ping.get("hostname"):
            lines.append("hostname %s" % ping["hostname"])
        if ping.get("uptime") is not None:
            lines.append("uptime %s" % _fmt_uptime(ping["uptime"]))
        if ping.get("load"):
            lines.append("load %s" % _fmt_load(ping["load"]))
        return lines
    hostnames = [p["hostname"] for p in pings if p.get("hostname")]
    if hostnames:
        lines.append("hostname %s" % _label(*_fold_count(hostnames)[:2]))
    uptimes = [float(p["uptime"]) for p in pings if isinstance(p.get("uptime"), (int, float))]
    if uptimes:
        lo, hi = min(uptimes), max(uptimes)
        span = _fmt_uptime(lo) if int(lo) == int(hi) else "%s .. %s" % (_fmt_uptime(lo), _fmt_uptime(hi))
        lines.append("uptime %s" % span)
    loads = [float(p["load"][0]) for p in pings if p.get("load")]
    if loads:
        lo, hi = min(loads), max(loads)
        span = "%.2f" % lo if "%.2f" % lo == "%.2f" % hi else "%.2f .. %.2f" % (lo, hi)
        lines.append("load %s (1 min)" % span)
    return lines


def _entries(o: NodeOutcome, kind: str, ping_lines: Optional[List[str]]) -> List[Tuple[str, str]]:
    """Content of one outcome as (stream, line); stream is "out", "err" or "note".

    ``ping_lines`` replaces the per-node ping info (gathered blocks).
    """
    entries: List[Tuple[str, str]] = []
    if kind in ("copy", "fetch"):
        line = _copy_line(o) if kind == "copy" else _fetch_line(o)
        if line:
            entries.append(("out", line))
    elif kind == "ping":
        if ping_lines is not None:
            entries.extend(("out", line) for line in ping_lines)
        elif o.ping is not None:
            entries.append(("out", _ping_oneline(o.ping)))
    entries.extend(("out", line) for line in _text_lines(o.stdout))
    if o.stdout_truncated:
        entries.append(("note", "[stdout truncated]"))
    entries.extend(("err", line) for line in _text_lines(o.stderr))
    if o.stderr_truncated:
        entries.append(("note", "[stderr truncated]"))
    entries.extend(("note", note) for note in _annotations(o))
    return entries


def _prefixed(prefix: str, line: str) -> str:
    return prefix + line if line else prefix.rstrip()


def _gather_key(o: NodeOutcome, kind: str) -> Hashable:
    key: Tuple[Any, ...] = (
        o.status,
        o.rc,
        o.error,
        o.stdout,
        o.stderr,
        o.stdout_truncated,
        o.stderr_truncated,
    )
    if kind == "copy":
        key += (o.changed, o.dest)
    elif kind == "fetch":
        key += (o.changed, o.size, o.sha256)
    elif kind == "ping":
        ping = o.ping
        key += (None,) if ping is None else (
            "ping", str(ping.get("version")), str(ping.get("protocol_version")))
    return key


# --------------------------------------------------------------- renderers


def render_gathered(outcomes: Sequence[NodeOutcome], *, kind: str) -> str:
    """clush -b style: one block per distinct result, headed by its folded node set.

    Blocks are sorted by the natural order of their first node.
    """
    _check_kind(kind)
    groups: Dict[Hashable, List[NodeOutcome]] = {}
    for o in outcomes:
        groups.setdefault(_gather_key(o, kind), []).append(o)

    blocks = []
    for members in groups.values():
        folded, count, first = _fold_count([o.node for o in members])
        ping_lines = None
        if kind == "ping":
            pings = [o.ping for o in members if o.ping is not None]
            ping_lines = _ping_block_lines(pings) if pings else []
        lines = []
        for stream, line in _entries(members[0], kind, ping_lines):
            lines.append(_prefixed(STDERR_PREFIX, line) if stream == "err" else line)
        if not lines:
            lines.append("[no output]")
        text = "%s\n%s\n%s\n%s\n" % (SEPARATOR, _label(folded, count), SEPARATOR, "\n".join(lines))
        blocks.append((_natural_key(first), text))
    blocks.sort(key=lambda b: b[0])
    return "".join(text for _, text in blocks)


def render_lines(outcomes: Sequence[NodeOutcome], *, kind: str) -> Lines:
    """Plain clush style, split by stream: ``Lines(stdout_text, stderr_text)``.

    stdout_text: node stdout lines and copy/ping info, as ``node: line``.
    stderr_text: node stderr lines (unmarked) and bracketed annotations, as
    ``node: line``. Nodes in input order.
    """
    _check_kind(kind)
    out: List[str] = []
    err: List[str] = []
    for o in outcomes:
        prefix = o.node + ": "
        for stream, line in _entries(o, kind, None):
            (out if stream == "out" else err).append(_prefixed(prefix, line))
    return Lines(
        "".join(line + "\n" for line in out),
        "".join(line + "\n" for line in err),
    )


def render_lines_text(outcomes: Sequence[NodeOutcome], *, kind: str) -> str:
    """Plain clush style in one text: every line prefixed with ``node: ``.

    stderr lines read ``node: stderr: line``; bracketed annotations follow
    the node's output. Nodes in input order; a PASS node with no output
    prints nothing.
    """
    _check_kind(kind)
    lines: List[str] = []
    for o in outcomes:
        prefix = o.node + ": "
        for stream, line in _entries(o, kind, None):
            if stream == "err":
                line = _prefixed(STDERR_PREFIX, line)
            lines.append(_prefixed(prefix, line))
    return "".join(line + "\n" for line in lines)


def _reason(o: NodeOutcome) -> str:
    parts = []
    if o.rc is not None and o.rc != 0:
        parts.append("exit %d" % o.rc)
    if o.error:
        parts.append(_oneline(o.error))
    return ": ".join(parts)


def render_summary(outcomes: Sequence[NodeOutcome], *, kind: Optional[str] = None) -> str:
    """One ``STATUS: nodeset (count)`` line per status present, PASS first.

    Under FAILED/TIMEOUT/UNREACHABLE, each distinct reason (``exit N`` and/or
    the error message) is listed, indented, with its node set:
    ``  cn[3,9] (2): connection refused``; nodes without any reason are listed
    as ``(no error message)`` when other nodes of that status have one.
    With ``kind="copy"`` or ``"fetch"`` the PASS line ends with
    ``changed: nodeset (count)``, or ``unchanged`` when no node changed.
    """
    if kind is not None:
        _check_kind(kind)
    by_status: Dict[Status, List[NodeOutcome]] = {}
    for o in outcomes:
        by_status.setdefault(o.status, []).append(o)

    lines: List[str] = []
    for status in STATUS_ORDER:
        members = by_status.get(status)
        if not members:
            continue
        folded, count, _ = _fold_count([o.node for o in members])
        line = "%s: %s" % (status.value, _label(folded, count))
        if status is Status.PASS:
            if kind in ("copy", "fetch"):
                changed = [o.node for o in members if o.changed]
                if changed:
                    line += " changed: %s" % _label(*_fold_count(changed)[:2])
                else:
                    line += " unchanged"
            lines.append(line)
            continue
        lines.append(line)
        reasons: Dict[str, List[str]] = {}
        for o in members:
            reasons.setdefault(_reason(o), []).append(o.node)
        if list(reasons) == [""]:
            continue
        details = []
        for reason, names in reasons.items():
            r_folded, r_count, r_first = _fold_count(names)
            details.append((_natural_key(r_first), "  %s: %s" % (
                _label(r_folded, r_count), reason or "(no error message)")))
        details.sort(key=lambda d: d[0])
        lines.extend(text for _, text in details)
    return "".join(line + "\n" for line in lines)


def to_json(outcomes: Sequence[NodeOutcome]) -> Dict[str, Any]:
    """``{"nodes": {name: outcome.to_dict()}, "summary": {STATUS: count}}``.

    Nodes in input order. The summary always holds the four statuses (0 when
    absent) in the order PASS, FAILED, TIMEOUT, UNREACHABLE.
    """
    nodes: Dict[str, Any] = {o.node: o.to_dict() for o in outcomes}
    counts = {status.value: 0 for status in STATUS_ORDER}
    for entry in nodes.values():  # a repeated name counts once, like in "nodes"
        counts[entry["status"]] += 1
    return {"nodes": nodes, "summary": counts}


def exit_status(outcomes: Sequence[NodeOutcome]) -> int:
    """0 iff there is at least one node and every node is PASS, else 1."""
    if not outcomes:
        return 1
    return 0 if all(o.status is Status.PASS for o in outcomes) else 1
