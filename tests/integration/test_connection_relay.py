"""Real ansible-playbook runs with ansible_connection=hpc.relaytree.relay against 16 secure daemons.

Ordinary modules (setup, command, file, copy, template, lineinfile, fetch) run through the relay
tree, no SSH. The daemons run with --base-dir, which confines the paths of *requests* (cwd, copy
destinations), but a module is a real process on this machine: the paths given to modules are real
paths, one directory per host under a tmp dir.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import sys
import tempfile

import pytest

pytestmark = pytest.mark.timeout(900)

FAILING = "127.0.0.9"
BIG = 3 << 20  # above the put_inline_limit the playbook sets: goes by tree copy + rename

MAIN = r"""
- hosts: all
  gather_facts: true
  vars:
    out: "{work}/{{ inventory_hostname }}"
  tasks:
    - name: check facts
      ansible.builtin.assert:
        that:
          - ansible_facts.system == 'Linux'
          - ansible_facts.python.executable == '{python}'
        quiet: true

    - name: directory
      ansible.builtin.file:
        path: "{{ out }}"
        state: directory
        mode: "0755"

    - name: whoami
      ansible.builtin.command: id -un
      register: who
      changed_when: false

    - name: become nobody
      ansible.builtin.command: id -un
      become: true
      become_user: nobody
      register: nobody
      changed_when: false
      vars:
        # the venv's Python lives under /root (0700): nobody needs the system one
        ansible_python_interpreter: /usr/bin/python3

    - name: copy as nobody
      ansible.builtin.copy:
        content: "written by nobody on {{ inventory_hostname }}\n"
        dest: "{nobody_dir}/{{ inventory_hostname }}.txt"
        mode: "0644"
      become: true
      become_user: nobody
      vars:
        ansible_python_interpreter: /usr/bin/python3

    - name: check users
      ansible.builtin.assert:
        that:
          - who.stdout == 'root'
          - nobody.stdout == 'nobody'
        quiet: true

    - name: copy
      ansible.builtin.copy:
        src: "{small}"
        dest: "{{ out }}/small.txt"
        mode: "0640"
      register: copied

    - name: copy again
      ansible.builtin.copy:
        src: "{small}"
        dest: "{{ out }}/small.txt"
        mode: "0640"
      register: again

    - name: template
      ansible.builtin.template:
        src: "{template}"
        dest: "{{ out }}/node.conf"
        mode: "0644"

    - name: lineinfile
      ansible.builtin.lineinfile:
        path: "{{ out }}/node.conf"
        line: "added on {{ inventory_hostname }}"

    - name: fetch
      ansible.builtin.fetch:
        src: "{{ out }}/node.conf"
        dest: "{fetched}/"

    - name: big copy
      ansible.builtin.copy:
        src: "{big}"
        dest: "{{ out }}/big.bin"
        mode: "0600"
      vars:
        relaytree_put_inline_limit: 65536

    - name: check copies
      ansible.builtin.assert:
        that:
          - copied is changed
          - again is not changed
          - copied.checksum == '{small_sha1}'
        quiet: true

    - name: fails on one host
      ansible.builtin.command: "{{ 'false' if inventory_hostname == '127.0.0.9' else 'true' }}"
      changed_when: false

    - name: after the failure
      ansible.builtin.shell: echo "still here on {{ inventory_hostname }}" >&2; printf 'no newline'
      register: after
      changed_when: false

    - name: check raw output
      ansible.builtin.assert:
        that:
          - after.stdout == 'no newline'
          - after.stderr == 'still here on ' + inventory_hostname
        quiet: true
"""

# ok/changed per host: Gathering Facts + tasks; changed: directory, copy as nobody, copy, template,
# lineinfile, fetch, big copy
EXPECTED_OK = {"ok": 17, "changed": 7, "unreachable": 0, "failed": 0, "skipped": 0, "rescued": 0, "ignored": 0}
EXPECTED_FAILED = dict(EXPECTED_OK, ok=14, failed=1)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    src = tmp_path_factory.mktemp("sources")
    small = src / "small.txt"
    small.write_bytes(b"small file\n\x00\xffbinary tail\n")
    template = src / "node.conf.j2"
    template.write_text("node {{ inventory_hostname }}\nport {{ relaytree_port }}\n")
    big = src / "big.bin"
    big.write_bytes(os.urandom(BIG))
    return {"small": small, "template": template, "big": big}


@pytest.fixture
def nobody_dir():
    """A directory nobody may write (pytest's tmp dirs are under a 0700 directory)."""
    path = tempfile.mkdtemp(prefix="relaytree-nobody-", dir="/tmp")
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def relay_inventory(ansible, fleet, names=None, **extra):
    return ansible.inventory(names or fleet.names, fleet.port, ansible_connection="hpc.relaytree.relay",
                             relaytree_pki=str(fleet.pki), **extra)


def test_modules_through_the_relay_connection(fleet, ansible, sources, tmp_path, nobody_dir):
    work, fetched = tmp_path / "work", tmp_path / "fetched"
    work.mkdir()
    book = (MAIN.replace("{work}", str(work)).replace("{fetched}", str(fetched))
            .replace("{small}", str(sources["small"])).replace("{template}", str(sources["template"]))
            .replace("{big}", str(sources["big"])).replace("{python}", sys.executable).replace("{nobody_dir}", nobody_dir)
            .replace("{small_sha1}", hashlib.sha1(sources["small"].read_bytes()).hexdigest()))
    run = ansible.run(book, relay_inventory(ansible, fleet), "-f", "16")
    assert run.proc.returncode == 2, run.output  # 2: a host failed
    recap = run.recap()
    assert sorted(recap) == sorted(fleet.names), run.output
    for host in fleet.names:
        assert recap[host] == (EXPECTED_FAILED if host == FAILING else EXPECTED_OK), (host, run.output)
    assert "fatal: [%s]" % FAILING in run.output
    assert run.output.count("fatal: [") == 1, run.output

    big_sha = hashlib.sha256(sources["big"].read_bytes()).hexdigest()
    for host in fleet.names:
        out = work / host
        assert (out / "small.txt").read_bytes() == sources["small"].read_bytes()
        assert oct((out / "small.txt").stat().st_mode & 0o777) == "0o640"
        want = "node %s\nport %d\nadded on %s\n" % (host, fleet.port, host)
        assert (out / "node.conf").read_text() == want
        # fetch: DEST/HOST/PATH
        assert (fetched / host / str(out / "node.conf").lstrip("/")).read_text() == want
        assert hashlib.sha256((out / "big.bin").read_bytes()).hexdigest() == big_sha
        assert sorted(p.name for p in out.iterdir()) == ["big.bin", "node.conf", "small.txt"]  # no staging left
        assert not (fleet.base(host) / str(out).lstrip("/")).exists()  # modules wrote real paths
        mine = os.path.join(nobody_dir, host + ".txt")
        with open(mine) as fh:
            assert fh.read() == "written by nobody on %s\n" % host
        assert os.stat(mine).st_uid == pwd.getpwnam("nobody").pw_uid

    # Batching: every step of every task (module runs, temp dirs, puts, fetches, the big file's tree
    # copy and rename) went as ONE tree operation for all its hosts, each node with its own stdin.
    ops_by_step = {}
    for op in run.stats["operations"]:
        ops_by_step.setdefault((op["name"], op["step"]), []).append(op)
    for (name, step), ops in ops_by_step.items():
        hosts = 15 if name == "after the failure" else 16
        assert sum(len(op["hosts"]) for op in ops) == hosts, (name, step, ops)
        assert len(ops) == 1, (name, step, ops)  # merged: fewer operations than hosts
    assert not [op for op in run.stats["operations"] if op["error"]], run.stats
    assert ops_by_step[("fails on one host", "exec1")][0]["stdin"] == "per-node"  # args differ on one host
    steps = {step for name, step in ops_by_step if name == "big copy"}
    assert {"copy1", "move1"} <= steps, steps  # the big file went by tree copy, the small ones inline
    assert {"put1"} <= {step for name, step in ops_by_step if name == "copy"}
    assert len(ops_by_step) < 60, sorted(ops_by_step)


def test_unreachable_node_and_pipelining_off(fleet, ansible, tmp_path):
    """A node without a daemon is UNREACHABLE; without pipelining modules go as files (put_file)."""
    dead = "127.0.0.18"
    book = r"""
- hosts: all
  gather_facts: false
  tasks:
    - name: hello
      ansible.builtin.command: echo hello
      register: hello
      changed_when: false
    - name: check
      ansible.builtin.assert:
        that: hello.stdout == 'hello'
        quiet: true
    - name: stat a file
      ansible.builtin.stat:
        path: /etc/hostname
      register: st
    - name: reset
      ansible.builtin.meta: reset_connection
"""
    names = [dead] + fleet.names[:4]
    run = ansible.run(book, relay_inventory(ansible, fleet, names, relaytree_connect_timeout=2), "-f", "5",
                      env={"ANSIBLE_PIPELINING": "0"})
    assert run.proc.returncode == 4, run.output  # 4: a host unreachable
    recap = run.recap()
    assert recap[dead]["unreachable"] == 1 and recap[dead]["ok"] == 0, run.output
    assert "UNREACHABLE!" in run.output and "relaytree: %s unreachable" % dead in run.output, run.output
    for host in fleet.names[:4]:
        assert recap[host]["ok"] == 3 and recap[host]["failed"] == 0, (host, run.output)
    # Without pipelining a module run is several steps, among them a put of the module file.
    steps = {op["step"] for op in run.stats["operations"] if op["name"] == "hello"}
    assert "put1" in steps, run.stats


def test_errors_are_clear(fleet, ansible, tmp_path):
    """Unknown become user, a timeout, a too big fetch and missing keys: failures with a message."""
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 5000)
    book = r"""
- hosts: all
  gather_facts: false
  tasks:
    - name: unknown become user
      ansible.builtin.command: id -un
      become: true
      become_user: no-such-user-here
      ignore_errors: true
      register: unknown
    - name: timeout
      ansible.builtin.command: sleep 30
      vars:
        relaytree_command_timeout: 1
      ignore_errors: true
      register: slow
    - name: fetch above the limit
      ansible.builtin.fetch:
        src: "{big}"
        dest: "{fetched}/"
      vars:
        relaytree_fetch_limit: 1000
      ignore_errors: true
      register: toobig
    - name: check
      ansible.builtin.assert:
        that:
          - unknown is failed
          - "'no-such-user-here' in unknown.msg"
          - slow is failed
          - "'command timeout' in slow.msg"
          - toobig is failed
          - "'fetch limit' in toobig.msg"
        quiet: true
    - name: no keys
      ansible.builtin.command: echo never
      vars:
        relaytree_pki: "{missing}"
""".replace("{big}", str(big)).replace("{fetched}", str(tmp_path / "fetched")).replace(
        "{missing}", str(tmp_path / "nokeys"))
    run = ansible.run(book, relay_inventory(ansible, fleet, fleet.names[:2]), "-f", "2")
    assert run.proc.returncode == 4, run.output  # missing keys: the host cannot be reached
    recap = run.recap()
    for host in fleet.names[:2]:
        assert recap[host]["ok"] == 4 and recap[host]["ignored"] == 3, (host, run.output)
        assert recap[host]["unreachable"] == 1, (host, run.output)
    assert "relaytree keys init" in run.output, run.output
