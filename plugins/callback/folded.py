# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: folded
type: stdout
short_description: Default output, with identical host results folded into one block per node set
version_added: 0.1.0
description:
  - The default stdout callback, except that the results of a task are gathered and printed when the task
    is over, one block per distinct result, headed by the folded node set of its hosts and their count,
    as C(clush -b) does (for example "cn[1-200,202] (201) changed"), followed by the output they share, once.
  - Hosts share a block when their status (ok, changed, skipped, FAILED, UNREACHABLE), loop item and
    displayed content (C(msg), C(rc), C(stdout), C(stderr); the whole result with C(-v)) are identical.
    Timing fields (C(start), C(end), C(delta)) do not split blocks.
  - Identical diffs are folded the same way, and so is the PLAY RECAP (one line per distinct line of counts).
  - With the P(ansible.builtin.free#strategy) strategy, results are printed at each task start, so a task may
    print in several parts.
  - Node sets are folded with ClusterShell (C(relaytree.output.fold)); without it, hosts are listed.
extends_documentation_fragment:
  - ansible.builtin.default_callback
  - ansible.builtin.result_format_callback
options:
  fold_recap:
    description: Fold the PLAY RECAP, one line per distinct set of counts; else one line per host as usual.
    type: bool
    default: true
    env:
      - name: RELAYTREE_FOLD_RECAP
    ini:
      - section: callback_folded
        key: fold_recap
requirements:
  - set as stdout callback in configuration (C(stdout_callback = hpc.relaytree.folded))
author:
  - relaytree developers (!UNKNOWN)
"""

import json
import re

from ansible import constants as C
from ansible import context
from ansible.playbook.task_include import TaskInclude
from ansible.plugins.callback.default import CallbackModule as DefaultCallbackModule
from ansible.utils.color import colorize, hostcolor

INDENT = "    "
# Differ from host to host without saying anything about the outcome.
VOLATILE_KEYS = frozenset(("start", "end", "delta", "invocation", "stdout_lines", "stderr_lines"))
RECAP_KEYS = (("ok", "ok", C.COLOR_OK), ("changed", "changed", C.COLOR_CHANGED),
              ("unreachable", "unreachable", C.COLOR_UNREACHABLE), ("failures", "failed", C.COLOR_ERROR),
              ("skipped", "skipped", C.COLOR_SKIP), ("rescued", "rescued", C.COLOR_OK),
              ("ignored", "ignored", C.COLOR_WARN))
STATUS_COLORS = {"ok": C.COLOR_OK, "changed": C.COLOR_CHANGED, "skipped": C.COLOR_SKIP,
                 "FAILED": C.COLOR_ERROR, "UNREACHABLE": C.COLOR_UNREACHABLE}
_DIGITS = re.compile(r"(\d+)")


def natural_key(name):
    parts = _DIGITS.split(name)
    return [int(p) if i % 2 else p for i, p in enumerate(parts)]


def _fold_fallback(names):
    return ",".join(sorted(set(names), key=natural_key))


_folder = None


def fold(names):
    """Folded node set of host names: relaytree.output.fold (ClusterShell), else a plain list."""
    global _folder  # pylint: disable=global-statement
    if _folder is None:
        try:
            from ansible_collections.hpc.relaytree.plugins.plugin_utils._relaytree import import_relaytree
            import_relaytree()
            from relaytree.output import fold as relaytree_fold
            _folder = relaytree_fold
        except Exception:  # pylint: disable=broad-except
            _folder = _fold_fallback
    return _folder(names)


def _text(value):
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def content_lines(result, verbose=False, dump=None):
    """What a host's result shows, as lines (the folding key of its block).

    ``dump`` serializes a whole result (verbose mode, or a failure that says nothing else).
    """
    shown = {k: v for k, v in result.items() if k not in VOLATILE_KEYS and not k.startswith("_ansible")}
    if verbose and dump is not None:
        return tuple(("%s%s" % (INDENT, line)) for line in dump(shown).splitlines())
    lines = []
    for key in ("msg", "censored"):
        text = _text(result.get(key) or "").rstrip("\n")
        if text:
            first, *rest = text.split("\n")
            lines.append("%s%s: %s" % (INDENT, key, first))
            lines.extend(INDENT + "  " + line for line in rest)
    rc = result.get("rc")
    if rc not in (None, 0) or (rc is not None and result.get("failed")):
        lines.append("%src: %s" % (INDENT, rc))
    for line in _text(result.get("stdout") or "").rstrip("\n").split("\n") if result.get("stdout") else ():
        lines.append(INDENT + line)
    for line in _text(result.get("stderr") or "").rstrip("\n").split("\n") if result.get("stderr") else ():
        lines.append("%sstderr: %s" % (INDENT, line))
    for key in ("stdout_truncated", "stderr_truncated"):
        if result.get(key):
            lines.append("%s[%s]" % (INDENT, key.replace("_", " ")))
    if not lines and result.get("failed") and dump is not None:
        lines.extend(INDENT + line for line in dump(shown).splitlines())
    return tuple(lines)


def fold_blocks(entries):
    """Group (host, status, label, lines) entries: [(header, status, lines)], by first host in natural order."""
    groups = {}
    for host, status, label, lines in entries:
        groups.setdefault((status, label, lines), []).append(host)
    blocks = []
    for (status, label, lines), hosts in groups.items():
        unique = set(hosts)
        header = "%s (%d) %s" % (fold(hosts), len(unique), status)
        if label:
            header += " (item=%s)" % label
        first = min(unique, key=natural_key)
        blocks.append((natural_key(first), header, status, lines))
    blocks.sort(key=lambda b: b[0])
    return [(header, status, lines) for _key, header, status, lines in blocks]


def fold_recap(summaries):
    """{host: summarize dict} -> [(folded hosts, count, summary)] in natural order of the first host."""
    groups = {}
    for host, summary in summaries.items():
        groups.setdefault(tuple(summary.get(key, 0) for key, _label, _color in RECAP_KEYS), []).append(host)
    out = []
    for counts, hosts in groups.items():
        summary = {key: value for (key, _label, _color), value in zip(RECAP_KEYS, counts)}
        out.append((natural_key(min(hosts, key=natural_key)), fold(hosts), len(hosts), summary))
    out.sort(key=lambda r: r[0])
    return [(label, count, summary) for _key, label, count, summary in out]


def _task(result):
    return getattr(result, "task", None) or result._task  # ansible-core < 2.19: _task


def _host(result):
    return getattr(result, "host", None) or result._host


def _result(result):
    value = getattr(result, "result", None)
    return value if isinstance(value, dict) else result._result


class _TaskBuffer:
    def __init__(self, task):
        self.task = task
        self.entries = []
        self.diffs = []


class CallbackModule(DefaultCallbackModule):

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "hpc.relaytree.folded"

    def __init__(self):
        super().__init__()
        self._buffers = {}

    # -- gathering ----------------------------------------------------------------------

    def _buffer(self, task):
        buf = self._buffers.get(task._uuid)
        if buf is None:
            buf = self._buffers[task._uuid] = _TaskBuffer(task)
        return buf

    def _add(self, result, status, item=False):
        task, res = _task(result), _result(result)
        self._warnings(result)
        host = _host(result).get_name()
        label = self._get_item_label(res) if item else None
        lines = content_lines(res, self._run_is_verbose(result), self._dump_results)
        if task.delegate_to and task.delegate_to != host:
            lines = ("%sdelegated to %s" % (INDENT, task.delegate_to),) + lines
        self._buffer(task).entries.append((host, status, "" if label is None else str(label), lines))

    def _warnings(self, result):
        if self._display.verbosity < 3:
            # The folded block shows msg once for all its hosts; the per-host error
            # summary (2.19+) or traceback hint would repeat it for every host.
            _result(result).pop("exception", None)
        if hasattr(self, "_handle_warnings_and_exception"):  # ansible-core 2.19+
            self._handle_warnings_and_exception(result)
        else:
            self._handle_exception(_result(result), use_stderr=self.get_option("display_failed_stderr"))
            self._handle_warnings(_result(result))

    @staticmethod
    def _is_loop_summary(result):
        return bool(_task(result).loop) and "results" in _result(result)

    def v2_runner_on_ok(self, result):
        if self._is_loop_summary(result) or isinstance(_task(result), TaskInclude):
            return  # the items were shown; includes print their own line
        changed = _result(result).get("changed", False)
        if changed or self.get_option("display_ok_hosts"):
            self._add(result, "changed" if changed else "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        if self._is_loop_summary(result):
            return
        self._add(result, "FAILED (ignored)" if ignore_errors else "FAILED")

    def v2_runner_on_skipped(self, result):
        if self.get_option("display_skipped_hosts"):
            self._add(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._add(result, "UNREACHABLE (ignored)" if _task(result).ignore_unreachable else "UNREACHABLE")

    def v2_runner_item_on_ok(self, result):
        if isinstance(_task(result), TaskInclude):
            return
        changed = _result(result).get("changed", False)
        if changed or self.get_option("display_ok_hosts"):
            self._add(result, "changed" if changed else "ok", item=True)

    def v2_runner_item_on_failed(self, result):
        self._add(result, "FAILED", item=True)

    def v2_runner_item_on_skipped(self, result):
        if self.get_option("display_skipped_hosts"):
            self._add(result, "skipped", item=True)

    def v2_on_file_diff(self, result):
        res = _result(result)
        diffs = [r.get("diff") for r in res["results"] if r.get("changed")] if self._is_loop_summary(result) else (
            [res.get("diff")] if res.get("changed") else [])
        for diff in diffs:
            text = self._get_diff(diff) if diff else ""
            if text:
                self._buffer(_task(result)).diffs.append((_host(result).get_name(), text))

    # -- printing -----------------------------------------------------------------------

    def _flush(self):
        buffers, self._buffers = self._buffers, {}
        for buf in buffers.values():
            if not buf.entries and not buf.diffs:
                continue
            if self._last_task_banner != buf.task._uuid:
                self._print_task_banner(buf.task)
            for header, status, lines in fold_blocks(buf.entries):
                color = STATUS_COLORS.get(status.split()[0], C.COLOR_ERROR)
                bad = status.startswith(("FAILED", "UNREACHABLE"))
                stderr = bad and self.get_option("display_failed_stderr")
                self._display.display(header, color=color, stderr=stderr)
                if lines:
                    self._display.display("\n".join(lines), stderr=stderr)
            diffs = {}
            for host, text in buf.diffs:
                diffs.setdefault(text, []).append(host)
            for text, hosts in diffs.items():
                self._display.display("%s (%d) diff:" % (fold(hosts), len(set(hosts))), color=C.COLOR_CHANGED)
                self._display.display(text)

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._flush()
        super().v2_playbook_on_task_start(task, is_conditional)

    def v2_playbook_on_handler_task_start(self, task):
        self._flush()
        super().v2_playbook_on_handler_task_start(task)

    def v2_playbook_on_play_start(self, play):
        self._flush()
        super().v2_playbook_on_play_start(play)

    def v2_playbook_on_include(self, included_file):
        self._flush()
        super().v2_playbook_on_include(included_file)

    def v2_playbook_on_no_hosts_remaining(self):
        self._flush()
        super().v2_playbook_on_no_hosts_remaining()

    def v2_playbook_on_stats(self, stats):
        self._flush()
        if not self.get_option("fold_recap"):
            super().v2_playbook_on_stats(stats)
            return
        self._display.banner("PLAY RECAP")
        summaries = {h: stats.summarize(h) for h in stats.processed.keys()}
        for label, count, summary in fold_recap(summaries):
            name = "%s (%d)" % (label, count)
            for colored in (True, False):
                counts = " ".join(colorize(text, summary[key], color if colored else None)
                                  for key, text, color in RECAP_KEYS)
                self._display.display("%s : %s" % (hostcolor(name, summary, colored), counts),
                                      screen_only=colored, log_only=not colored)
        self._display.display("", screen_only=True)
        if stats.custom and self.get_option("show_custom_stats"):
            self._display.banner("CUSTOM STATS: ")
            for key in sorted(k for k in stats.custom if k != "_run"):
                self._display.display("\t%s: %s" % (key, self._dump_results(stats.custom[key], indent=1).replace("\n", "")))
            if "_run" in stats.custom:
                self._display.display("", screen_only=True)
                self._display.display("\tRUN: %s" % self._dump_results(stats.custom["_run"], indent=1).replace("\n", ""))
            self._display.display("", screen_only=True)
        if context.CLIARGS.get("check") and self.get_option("check_mode_markers"):
            self._display.banner("DRY RUN")
