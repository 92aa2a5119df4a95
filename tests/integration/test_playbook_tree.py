"""Real ansible-playbook runs of the hpc.relaytree tree tasks against 16 real relay daemons."""

from __future__ import annotations

import hashlib
import os

import pytest

pytestmark = pytest.mark.timeout(900)

BIG = 64 << 20
FAILING = ("127.0.0.5", "127.0.0.9")

# Tree tasks use the same arguments on every host (one tree operation each); per-host
# differences come from the nodes themselves: with --base-dir, cwd "/" is the host's base dir.
MAIN = r"""
- hosts: all
  gather_facts: false
  vars:
    me: "/n{{ inventory_hostname.split('.')[-1] }}"
  tasks:
    - name: hello
      hpc.relaytree.tree_exec:
        cmd: pwd; echo warn >&2
        chdir: /
      register: hello
      notify: mark handled

    - name: check hello
      ansible.builtin.assert:
        that:
          - hello is changed
          - hello.rc == 0
          - hello.stdout.endswith(me)
          - hello.stdout_lines | length == 1
          - hello.stderr == 'warn'
        quiet: true

    - name: per-host arguments
      hpc.relaytree.tree_exec:
        argv: [echo, "{{ inventory_hostname }}"]
      register: own
      changed_when: false

    - name: check per-host arguments
      ansible.builtin.assert:
        that: own.stdout == inventory_hostname
        quiet: true

    - name: expected exit status
      hpc.relaytree.tree_exec:
        cmd: exit 3
      register: three
      failed_when: three.rc != 3
      changed_when: false

    - name: skipped on one host
      hpc.relaytree.tree_exec:
        cmd: echo not on 127.0.0.3
      when: inventory_hostname != '127.0.0.3'
      changed_when: false

    - name: loop
      hpc.relaytree.tree_exec:
        cmd: "echo {{ item }}"
      loop: [one, two]
      register: looped
      changed_when: false

    - name: check loop
      ansible.builtin.assert:
        that: looped.results | map(attribute='stdout') | list == ['one', 'two']
        quiet: true

    - name: creates
      hpc.relaytree.tree_exec:
        cmd: touch made
        chdir: /
        creates: /made
      register: made1

    - name: creates again
      hpc.relaytree.tree_exec:
        cmd: touch made
        chdir: /
        creates: /made
      register: made2

    - name: check creates
      ansible.builtin.assert:
        that:
          - made1 is changed
          - made2 is not changed
          - "'exists' in made2.msg"
        quiet: true

    - name: big copy
      hpc.relaytree.tree_copy:
        src: {big}
        dest: /data/big.bin
        mkdirs: true
        mode: '0640'
      register: copy1

    - name: big copy again
      hpc.relaytree.tree_copy:
        src: {big}
        dest: /data/big.bin
        mkdirs: true
        mode: '0640'
      register: copy2

    - name: check copies
      ansible.builtin.assert:
        that:
          - copy1 is changed
          - copy2 is not changed
          - copy1.checksum == '{sha1}'
          - copy1.size == {size}
          - copy1.dest == '/data/big.bin'
        quiet: true

    - name: small copy with diff
      hpc.relaytree.tree_copy:
        content: "hello\n"
        dest: /etc/small.conf
        mkdirs: true
      diff: true
      register: small

    - name: check diff
      ansible.builtin.assert:
        that:
          - small is changed
          - small.diff.before == ''
          - small.diff.after == 'hello\n'
        quiet: true

    - name: check mode copy
      hpc.relaytree.tree_copy:
        content: "not written\n"
        dest: /data/check.txt
      check_mode: true
      register: checked

    - name: check check mode
      ansible.builtin.assert:
        that: checked is changed
        quiet: true

    - name: ping
      hpc.relaytree.tree_ping:
      register: pong

    - name: check ping
      ansible.builtin.assert:
        that:
          - pong.ping == 'pong'
          - pong.version is string
          - pong.load | length == 3
        quiet: true

    - name: flush
      ansible.builtin.meta: flush_handlers

    - name: fails on two hosts
      hpc.relaytree.tree_exec:
        cmd: case $(pwd) in */n5|*/n9) echo broken; exit 1;; esac
        chdir: /

    - name: after the failure
      hpc.relaytree.tree_exec:
        cmd: "true"
      changed_when: false

  handlers:
    - name: mark handled
      hpc.relaytree.tree_exec:
        cmd: echo handled > handled.txt
        chdir: /
"""

# Tree tasks of MAIN and the tree operations each must take for all hosts at once.
MAIN_OPERATIONS = {
    "hello": 1, "per-host arguments": 16, "expected exit status": 1, "skipped on one host": 1,
    "loop": 2, "creates": 2, "creates again": 1, "big copy": 1, "big copy again": 1,
    "small copy with diff": 2, "check mode copy": 1, "ping": 1, "mark handled": 1,
    "fails on two hosts": 1, "after the failure": 1,
}
ASSERTS = 8  # assert tasks in MAIN, ok on every host


def expected_recap(host: str) -> dict:
    failing = host in FAILING
    tree_tasks = 13  # tree tasks before "fails on two hosts" (handler included)
    skipped = 1 if host == "127.0.0.3" else 0
    ok = tree_tasks - skipped + ASSERTS + (0 if failing else 2)
    # changed: hello, creates, big copy, small copy, check mode copy, handler, fails on two hosts
    changed = 6 + (0 if failing else 1)
    return {"ok": ok, "changed": changed, "unreachable": 0, "failed": 1 if failing else 0,
            "skipped": skipped, "rescued": 0, "ignored": 0}


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "big.bin"
    block = os.urandom(1 << 20)
    sha1 = hashlib.sha1()
    with open(path, "wb") as fh:
        for i in range(BIG >> 20):
            data = bytes([i]) + block[1:]
            fh.write(data)
            sha1.update(data)
    return path, sha1.hexdigest()


def _main_playbook(big_file) -> str:
    path, sha1 = big_file
    return MAIN.replace("{big}", str(path)).replace("{sha1}", sha1).replace("{size}", str(BIG))


def _check_main(run, fleet, big_file):
    assert run.proc.returncode == 2, run.output  # 2: some hosts failed
    recap = run.recap()
    assert sorted(recap) == sorted(fleet.names), run.output
    for host in fleet.names:
        assert recap[host] == expected_recap(host), (host, run.output)
    for name, count in MAIN_OPERATIONS.items():
        assert run.operations(name) == count, (name, run.stats, run.output)
    for op in run.stats["operations"]:
        if op["name"] != "per-host arguments":
            size = {"skipped on one host": 15, "after the failure": 14}.get(op["name"], 16)
            assert len(op["hosts"]) == size, op
    path, _sha1 = big_file
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    for host in fleet.names:
        base = fleet.base(host)
        assert hashlib.sha256((base / "data" / "big.bin").read_bytes()).hexdigest() == want
        assert oct((base / "data" / "big.bin").stat().st_mode & 0o777) == "0o640"
        assert (base / "etc" / "small.conf").read_text() == "hello\n"
        assert not (base / "data" / "check.txt").exists()
        assert (base / "made").exists()
        assert (base / "handled.txt").read_text() == "handled\n"


def _reset(fleet):
    for d in fleet.daemons:
        for rel in ("data/big.bin", "etc/small.conf", "made", "handled.txt"):
            try:
                os.unlink(d.base_dir / rel)
            except FileNotFoundError:
                pass


def test_linear_one_operation_per_task(fleet, ansible, big_file):
    """linear strategy, forks >= hosts: every tree task is one tree operation for all hosts."""
    _reset(fleet)
    run = ansible.run(_main_playbook(big_file), ansible.inventory(fleet.names, fleet.port, relaytree_pki=str(fleet.pki)), "-f", "16")
    _check_main(run, fleet, big_file)
    assert "fatal: [127.0.0.5]" in run.output and "fatal: [127.0.0.9]" in run.output


def test_tree_strategy_exact_batches(fleet, ansible, big_file):
    """tree strategy with the default 5 forks: it enlarges the pool, batches stay exact."""
    _reset(fleet)
    book = _main_playbook(big_file).replace("gather_facts: false", "gather_facts: false\n  strategy: hpc.relaytree.tree", 1)
    # A large gap would only show up as slowness: make a guessed batch fail the count instead.
    run = ansible.run(book, ansible.inventory(fleet.names, fleet.port, relaytree_pki=str(fleet.pki)), env={"RELAYTREE_COORDINATOR_GAP": "0.01"})
    _check_main(run, fleet, big_file)


def test_folded_callback(fleet, ansible):
    book = r"""
- hosts: all
  gather_facts: false
  tasks:
    - name: same everywhere
      hpc.relaytree.tree_exec:
        cmd: echo same output
      changed_when: false
    - name: fails on two hosts
      hpc.relaytree.tree_exec:
        cmd: case $(pwd) in */n5|*/n9) echo broken; exit 1;; esac
        chdir: /
"""
    run = ansible.run(book, ansible.inventory(fleet.names, fleet.port, relaytree_pki=str(fleet.pki)), "-f", "16",
                      env={"ANSIBLE_STDOUT_CALLBACK": "hpc.relaytree.folded"})
    out = run.proc.stdout
    assert run.proc.returncode == 2, run.output
    assert "127.0.0.[2-17] (16) ok\n    same output\n" in out, out
    assert out.count("same output") == 1, out
    assert "127.0.0.[2-4,6-8,10-17] (14) changed" in out, out
    assert "127.0.0.[5,9] (2) FAILED" in run.output, run.output
    assert run.output.count("broken") == 1, run.output
    recap = out.split("PLAY RECAP")[-1]
    assert "127.0.0.[2-4,6-8,10-17] (14) : ok=2    changed=1    unreachable=0    failed=0" in recap, recap
    assert "127.0.0.[5,9] (2)" in recap and "failed=1" in recap, recap
    assert run.operations("same everywhere") == 1


def test_dead_daemon_is_unreachable(fleet, ansible):
    """A host without a daemon is UNREACHABLE; the tree re-heads around it for the others."""
    dead = "127.0.0.18"
    book = r"""
- hosts: all
  gather_facts: false
  tasks:
    - name: narrow tree through a dead head
      hpc.relaytree.tree_exec:
        cmd: echo alive
        width: 2
        connect_timeout: 2
      changed_when: false
    - name: ping
      hpc.relaytree.tree_ping:
        width: 2
        connect_timeout: 2
"""
    inventory = ansible.inventory([dead] + fleet.names, fleet.port, relaytree_pki=str(fleet.pki))
    run = ansible.run(book, inventory, "-f", "17")
    assert run.proc.returncode == 4, run.output  # 4: some hosts unreachable
    recap = run.recap()
    assert recap[dead]["unreachable"] == 1 and recap[dead]["ok"] == 0, run.output
    for host in fleet.names:
        assert recap[host] == {"ok": 2, "changed": 0, "unreachable": 0, "failed": 0, "skipped": 0,
                               "rescued": 0, "ignored": 0}, (host, run.output)
    assert "UNREACHABLE!" in run.output
    assert run.operations("narrow tree through a dead head") == 1


def test_insecure_daemons_and_missing_keys(insecure_fleet, ansible, tmp_path):
    """--insecure daemons need insecure: true; without keys the error names the fix."""
    book = r"""
- hosts: all
  gather_facts: false
  tasks:
    - name: plaintext
      hpc.relaytree.tree_exec:
        cmd: echo plain
        insecure: true
      register: plain
    - name: no keys
      hpc.relaytree.tree_ping:
        pki: {missing}
      ignore_errors: true
      register: nokeys
    - name: check
      ansible.builtin.assert:
        that:
          - plain.stdout == 'plain'
          - nokeys is failed
          - "'relaytree keys init' in nokeys.msg"
        quiet: true
""".replace("{missing}", str(tmp_path / "nokeys"))
    run = ansible.run(book, ansible.inventory(insecure_fleet.names, insecure_fleet.port), "-f", "4")
    assert run.proc.returncode == 0, run.output
    assert run.operations("plaintext") == 1 and run.operations("no keys") == 1


def test_option_sources(fleet, ansible, tmp_path):
    """module_defaults (group/hpc.relaytree.tree) > host variable; [relaytree] in ansible.cfg for tasks and connection.

    The inventory's relaytree_port is wrong and there is no relaytree_pki: the group's module defaults give
    the port, ansible.cfg the keys; without the defaults the host variable counts (unreachable).
    """
    names = fleet.names[:4]
    book = r"""
- name: tree tasks with module defaults
  hosts: all
  gather_facts: false
  module_defaults:
    group/hpc.relaytree.tree:
      port: "{{ real_port }}"
      connect_timeout: 3
  tasks:
    - name: exec
      hpc.relaytree.tree_exec:
        cmd: echo ok
      register: out
      changed_when: false
    - name: copy
      hpc.relaytree.tree_copy:
        content: "defaults\n"
        dest: /defaults.txt
    - name: ping
      hpc.relaytree.tree_ping:
    - name: check
      ansible.builtin.assert:
        that: out.stdout == 'ok'
        quiet: true

- name: without them the host variable counts
  hosts: all
  gather_facts: false
  tasks:
    - name: wrong port
      hpc.relaytree.tree_ping:
        connect_timeout: 2
      ignore_unreachable: true
      register: wrong
    - name: check
      ansible.builtin.assert:
        that: wrong is unreachable
        quiet: true

- name: the relay connection reads the same ansible.cfg section
  hosts: all
  gather_facts: false
  vars:
    ansible_connection: hpc.relaytree.relay
    relaytree_port: "{{ real_port }}"
  tasks:
    - name: any module
      ansible.builtin.command: echo through the connection
      register: conn
      changed_when: false
    - name: check
      ansible.builtin.assert:
        that: conn.stdout == 'through the connection'
        quiet: true
      vars:
        ansible_connection: local
"""
    config = tmp_path / "ansible.cfg"
    config.write_text("[relaytree]\npki = %s\n" % fleet.pki)
    inventory = ansible.inventory(names, fleet.port + 1, real_port=fleet.port)
    run = ansible.run(book, inventory, "-f", "4", env={"ANSIBLE_CONFIG": str(config)})
    assert run.proc.returncode == 0, run.output
    recap = run.recap()
    for host in names:
        assert recap[host]["failed"] == 0 and recap[host]["unreachable"] == 0, (host, run.output)
        assert (fleet.base(host) / "defaults.txt").read_text() == "defaults\n"
    for name in ("exec", "copy", "ping"):
        assert run.operations(name) == 1, (name, run.stats)
