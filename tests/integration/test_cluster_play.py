"""The issue's acceptance play on 16 simulated nodes (real sshd, daemons deployed by the role).

The same play runs twice: once with the tree tasks (tree_exec / tree_copy / tree_ping, a
template over the relay connection), once with builtin modules over SSH. Per-host
results, handlers and the PLAY RECAP must match, and each tree task must reach the
relays as one tree operation for all hosts.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from test_role import BIN, Site, _prefix, simcluster  # noqa: F401  (the role's test site)
from conftest import parse_recap

NODES = 16

TREE = {
    "exec": "hpc.relaytree.tree_exec",
    "copy": "hpc.relaytree.tree_copy",
    "ping": "hpc.relaytree.tree_ping",
    "template_vars": "      vars:\n        ansible_connection: hpc.relaytree.relay\n",
}
SSH = {
    "exec": "ansible.builtin.shell",
    "copy": "ansible.builtin.copy",
    "ping": "ansible.builtin.ping",
    "template_vars": "",
}


def playbook(mods: dict, failing: list) -> str:
    test = " && ".join('[ "$(hostname)" != "%s" ]' % name for name in failing)
    return """
- hosts: relaytree
  gather_facts: false
  tasks:
    - name: hello
      {exec}:
        cmd: echo hello from $(hostname); echo warn >&2
      register: hello
      failed_when: "'hello from' not in hello.stdout"
      notify: noted
    - name: big copy
      {copy}:
        src: big.bin
        dest: /srv/big.bin
    - name: big copy again
      {copy}:
        src: big.bin
        dest: /srv/big.bin
      register: again
    - name: unchanged the second time
      ansible.builtin.assert:
        that: not again.changed
    - name: ping
      {ping}:
    - name: template
      ansible.builtin.template:
        src: motd.j2
        dest: /srv/motd
{template_vars}    - name: fails on exactly two hosts
      {exec}:
        cmd: '{test}'
    - name: after the failure
      {exec}:
        cmd: "true"
  handlers:
    - name: noted
      {exec}:
        cmd: touch /srv/noted
""".format(test=test, **mods)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    name = "rp" + secrets.token_hex(3)
    cluster = simcluster.Cluster(name, nodes=NODES, prefix=_prefix(NODES), subnet="auto")
    cluster.up()
    site = None
    try:
        site = Site(cluster, tmp_path_factory.mktemp("play"))
        # One worker per host, so every host of a task reaches the coordinator together;
        # without the tree strategy, batches are closed after this idle gap.
        site.env.update({"ANSIBLE_FORKS": str(2 * NODES), "RELAYTREE_COORDINATOR_GAP": "2"})
        run = site.play(label="deploy")
        assert run.proc.returncode == 0, run.output[-5000:]
        yield site
    finally:
        if site is not None:
            site.close()
        cluster.down()


def run_play(site: Site, text: str, label: str):
    work = site.tmp / label
    work.mkdir()
    (work / "play.yml").write_text(text)
    with open(work / "big.bin", "wb") as fh:
        fh.write(os.urandom(64 << 20))
    (work / "motd.j2").write_text("Welcome to {{ inventory_hostname }}\n")
    stats = Path(site.env["RELAYTREE_COORDINATOR_STATS"])
    if stats.exists():
        stats.unlink()
    for node in site.names:  # both variants start from the same node state
        site.node(node, "rm -f /srv/big.bin /srv/motd /srv/noted")
    t0 = time.monotonic()
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(site.inventory), "play.yml"],
                          capture_output=True, text=True, timeout=900, env=site.env, cwd=str(work))
    seconds = time.monotonic() - t0
    noted = {n for n in site.names if site.node(n, "test -e /srv/noted").returncode == 0}
    motd = {n: site.node(n, "cat /srv/motd").stdout for n in site.names}
    ops = json.loads(stats.read_text()) if stats.exists() else {}
    print("\n%s play: %.1fs" % (label, seconds))
    return proc, noted, motd, ops


def test_tree_play_matches_builtin_play_over_ssh(deployed):
    site = deployed
    failing = [site.names[2], site.names[6]]
    tree, tree_noted, tree_motd, stats = run_play(site, playbook(TREE, failing), "tree")
    ssh, ssh_noted, ssh_motd, _ = run_play(site, playbook(SSH, failing), "ssh")
    assert ssh.returncode != 0 and tree.returncode != 0  # two hosts fail, in both
    tree_recap, ssh_recap = parse_recap(tree.stdout), parse_recap(ssh.stdout)
    assert set(tree_recap) == set(site.names), tree.stdout[-5000:]
    assert tree_recap == ssh_recap, (tree.stdout[-6000:], ssh.stdout[-3000:])
    for name in site.names:
        expected_failed = 1 if name in failing else 0
        assert tree_recap[name]["failed"] == expected_failed
        assert tree_recap[name]["unreachable"] == 0
    # Handlers ran where Ansible runs them (not on the hosts that failed later), in both.
    assert tree_noted == ssh_noted == set(site.names) - set(failing)
    assert tree_motd == ssh_motd
    assert all(tree_motd[n] == "Welcome to %s\n" % n for n in site.names)
    # One tree operation for all hosts per tree task.
    by_name = {t["name"]: t["operations"] for t in stats.get("tasks", {}).values()}
    for task in ("hello", "big copy", "big copy again", "ping", "fails on exactly two hosts",
                 "after the failure", "noted"):
        assert by_name.get(task) == 1, (task, by_name)
