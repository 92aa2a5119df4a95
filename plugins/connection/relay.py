# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connection plugin hpc.relaytree.relay: every module runs on the nodes through the relay tree, no SSH."""

from __future__ import annotations

DOCUMENTATION = r"""
name: relay
short_description: Run any module on HPC nodes through the relaytree relay daemons, without SSH
version_added: 0.1.0
description:
  - Runs everything Ansible does on a node (module runs, the file transfers and commands of actions such as
    P(ansible.builtin.copy#module), P(ansible.builtin.template#module) or P(ansible.builtin.fetch#module),
    fact gathering) through the C(relaytree serve) daemon of the node, reached over the relay tree with
    mutual TLS and requests signed by the controller. No SSH is involved.
  - The calls of all the hosts of a task go to the run's relaytree coordinator (a local process started on
    first use, a UNIX socket in C(/tmp/relaytree-coord-UID/)), which sends the hosts that run the same
    command as B(one) tree operation, each node with its own standard input (the module payloads of
    different hosts differ by a few bytes; the transport sends them as shared bases plus small deltas).
    Batching never changes results; every host keeps Ansible's normal per-host logic.
  - Enable pipelining (the default of this plugin, see O(pipelining)); then a module run is a single
    command with the module on its standard input.
author:
  - relaytree developers (!UNKNOWN)
extends_documentation_fragment:
  - hpc.relaytree.tree.options
  - hpc.relaytree.tree.connection
options:
  host:
    description:
      - Address (or name) of the node's relay daemon.
      - The variable C(relaytree_host), else C(ansible_host), else the inventory name of the host.
    type: str
    vars:
      - name: inventory_hostname
      - name: ansible_host
      - name: relaytree_host
      - name: delegated_vars['ansible_host']
  command_timeout:
    description:
      - Seconds a command (a module run) may take on a node before the daemon kills it; the task then
        fails with a timeout message. V(0) means no limit (the task keyword C(timeout) still applies).
    type: float
    default: 0
    vars:
      - name: relaytree_command_timeout
    env:
      - name: ANSIBLE_RELAYTREE_COMMAND_TIMEOUT
    ini:
      - section: relaytree_connection
        key: command_timeout
  pipelining:
    description:
      - Run modules by piping them to the interpreter's standard input instead of copying a file to the
        node first, as for P(ansible.builtin.ssh#connection). One tree operation per module run instead
        of four or five; strongly recommended, hence the default V(true) of this plugin (unlike core's).
      - Set it to V(false) (E(ANSIBLE_PIPELINING=0), C(pipelining = false) in C([connection]) or
        C([defaults]), or C(ansible_pipelining)) for modules that need a file on the node; everything still
        works, with more operations.
    type: bool
    default: true
    env:
      - name: ANSIBLE_PIPELINING
    ini:
      - section: defaults
        key: pipelining
      - section: connection
        key: pipelining
    vars:
      - name: ansible_pipelining
notes:
  - B(Task identity and batching.) The worker gives the plugin the task's uuid, the host's
    C(ansible_play_batch) and C(forks); the coordinator merges the calls of the hosts of the same task at the
    same step (the Nth command of the task on each host) that have the same command line and options.
    A step is sent when every host of the batch is waiting in it or has finished the task, when C(forks)
    hosts wait in the task, or when no host arrived for E(RELAYTREE_COORDINATOR_GAP) seconds (0.3 by
    default). Hosts skipped by C(when), or that take another path through the action, cost one such gap.
    Set C(forks) to at least the number of hosts for one operation per step. C(run_once) and
    C(delegate_to) tasks, and uses outside a task, are one operation per host.
  - B(What travels on standard input.) So that commands which differ between hosts (temporary directory
    names, paths) are still one tree operation, a command without input is sent as a script on the standard
    input of C(/bin/sh), which runs it exactly as C(/bin/sh -c CMD) with input from C(/dev/null). Each node's
    bytes are covered by the controller's signature.
  - B(File transfers.) C(put_file) (module files without pipelining, the files of
    P(ansible.builtin.copy#module) and P(ansible.builtin.template#module)) is a relaytree tree copy, streamed
    in chunks, checked against its sha256 and renamed into place atomically on the node. The hosts that put
    the same local file to the same path are one tree copy; Ansible puts files into per-host temporary
    directories, so in practice every host gets its own copy (all of them at once).
    C(fetch_file) (P(ansible.builtin.fetch#module)) is a relaytree tree fetch. The hosts of a task are one
    tree operation, each node streams its own file up the tree in chunks (bounded memory on every relay and
    on the controller, whatever the file size), and each file lands at its host's destination through a
    temporary file, checked against the size and sha256 the node reports, never partial. Files are written
    and read as the daemon's user (root), whatever C(become).
  - B(Paths.) File transfers are relaytree requests. On a daemon started with C(--base-dir) (a sandbox for
    experiments) their paths are resolved under that directory, while modules see the real filesystem. Use
    this connection with daemons without C(base_dir) (the role's default).
  - B(Users.) The relay daemon runs as root and runs commands as root; C(remote_user) and C(ansible_user)
    are not used (Ansible treats the connection user as V(root)).
  - B(Privilege escalation.) With C(become), the commands Ansible would wrap with the become method run
    directly as C(become_user) (the daemon switches user itself, with that user's groups, C(HOME), C(USER)
    and C(LOGNAME)), whatever the C(become_method) (P(ansible.builtin.sudo#become),
    P(ansible.builtin.su#become) and others all mean "run as C(become_user)" here). No sudo or su is needed on
    the nodes; become passwords, C(become_flags) and C(become_exe) are ignored. Ansible's own handling of
    files for an unprivileged C(become_user) (ACLs or chown of its temporary files) applies unchanged.
  - Commands start in C(/) (in the daemon's base directory when it runs with C(--base-dir)), not in a home
    directory.
  - A node whose daemon cannot be reached is reported unreachable. A command that times out
    (O(command_timeout)), that cannot start (for example an unknown C(become_user)) or whose output exceeds
    256 MiB per stream fails the task with a message. A module's output is held whole in memory by the node,
    each relay on its way and the coordinator (P(ansible.builtin.slurp#module) of a 100 MiB file is 134 MiB of
    output); use P(ansible.builtin.fetch#module) for big files, it streams.
  - If the daemons restrict the controller key (C(copy_dest_prefixes), C(allow_fetch),
    C(fetch_src_prefixes)), the remote temporary directory must be an allowed copy destination, and
    P(ansible.builtin.fetch#module) needs C(allow_fetch).
  - The relaytree Python package ships in the collection's C(src/) directory; the controller needs the Python
    packages grpcio, protobuf and ClusterShell (only the coordinator process loads them; no gRPC in Ansible's
    own processes).
requirements:
  - grpcio, protobuf and ClusterShell on the controller
  - the relaytree daemon on the nodes (role C(hpc.relaytree.relay)), and a Python for the modules
"""

EXAMPLES = r"""
# inventory: every node through the relay tree, keys from `relaytree keys init`
# [cluster:vars]
# ansible_connection=hpc.relaytree.relay
# relaytree_pki=/etc/relaytree/pki

- hosts: cluster
  gather_facts: true
  tasks:
    - name: Any module runs through the tree
      ansible.builtin.lineinfile:
        path: /etc/motd
        line: managed by Ansible over relaytree

    - name: As another user (no sudo needed on the nodes)
      ansible.builtin.command: id -un
      become: true
      become_user: nobody
      changed_when: false
"""

import base64
import collections
import os
import uuid

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

from ansible_collections.hpc.relaytree.plugins.plugin_utils._relaytree import Coordinator, CoordinatorError
from ansible_collections.hpc.relaytree.plugins.plugin_utils._tree_options import (
    TREE_OPTIONS,
    TreeOptionError,
    check_tree_options,
    tree_request,
    worker_window,
)

display = Display()

# Largest output a node keeps per stream of one command: the hard cap of relaytree.wire.MAX_OUTPUT_LIMIT,
# so that modules returning a file in their output (slurp) work for files up to ~190 MiB.
OUTPUT_LIMIT = 256 << 20
# Commands longer than this are sent as they are (one argument of exec is limited to 128 KiB).
SCRIPT_ON_STDIN_MAX = 64 << 10

# What the coordinator merges is the same command line with per-host standard inputs. So a
# command without input (mkdir of a temporary directory with a random name, rm, chmod...) is
# sent as a script on the stdin of this runner, which then runs it exactly as the daemon runs
# a shell command (/bin/sh -c CMD, stdin /dev/null).
RUN_SCRIPT = 'c=$(cat) || exit 126; exec /bin/sh -c "$c" </dev/null'


def script(name: str, body: str, *args: str) -> list:
    """argv of a /bin/sh script ($0 is its name, for error messages)."""
    return ["/bin/sh", "-c", body, name] + [str(a) for a in args]


def command_form(cmd: str, in_data: bytes) -> tuple:
    """(command, stdin) to send for exec_command(cmd, in_data): a command without input goes on stdin."""
    if in_data or len(cmd) > SCRIPT_ON_STDIN_MAX:
        return cmd, in_data
    return script("relaytree-run", RUN_SCRIPT), cmd.encode("utf-8", "surrogateescape")


class RelayBecome:
    """Stands in for the task's become plugin on this connection.

    Ansible wraps the commands that need privilege escalation with
    ``connection.become.build_become_command(cmd, shell)`` (``sudo -u USER ...``)
    right before it calls ``exec_command(cmd, sudoable=True)``. Here that call
    leaves the command as it is and tells the connection to run it as
    ``become_user``: the daemon switches user itself, so the nodes need no sudo
    and no password. Everything else (options, pipelining support, names) is the
    real plugin's, so Ansible's handling of an unprivileged become user (temporary
    file permissions, ``~`` expansion) stays as with any connection.
    """

    def __init__(self, plugin, connection: "Connection"):
        self._plugin = plugin
        self._connection = connection

    def __getattr__(self, name):
        if name in ("_plugin", "_connection"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._plugin, name)

    @property
    def become_user(self) -> str:
        try:
            user = self._plugin.get_option("become_user")
        except KeyError:
            user = None
        return str(user or getattr(self._connection._play_context, "become_user", None) or "root")

    def build_become_command(self, cmd, shell):
        self._connection._run_as_next = self.become_user
        return cmd


def command_result(outcome: dict, node: str, user: str = "") -> tuple:
    """(rc, stdout, stderr) of a raw exec outcome, or the exception Ansible should see."""
    status = outcome.get("status")
    error = outcome.get("error") or ""
    if status == "UNREACHABLE":
        raise AnsibleConnectionFailure("relaytree: %s unreachable: %s" % (node, error or "no answer"))
    stdout = base64.b64decode(outcome.get("stdout_b64") or "")
    stderr = base64.b64decode(outcome.get("stderr_b64") or "")
    who = " as %s" % user if user else ""
    if status == "TIMEOUT":
        raise AnsibleError("relaytree: command timeout on %s%s: %s" % (node, who, error or "killed"))
    rc = outcome.get("rc")
    if rc is None:
        raise AnsibleError("relaytree: cannot run the command on %s%s: %s" % (node, who, error or status))
    for stream in ("stdout", "stderr"):
        if outcome.get(stream + "_truncated"):
            raise AnsibleError("relaytree: the %s of the command on %s is larger than %d MiB and was cut"
                               % (stream, node, OUTPUT_LIMIT >> 20))
    return rc, stdout, stderr


def transfer_result(outcome: dict, node: str, what: str) -> dict:
    """The outcome of a tree copy or fetch for this host, or the exception Ansible should see."""
    status = outcome.get("status")
    error = outcome.get("error") or status or "no answer"
    if status == "UNREACHABLE":
        raise AnsibleConnectionFailure("relaytree: %s unreachable: %s" % (node, error))
    if status != "PASS":
        raise AnsibleError("relaytree: failed to %s on %s: %s" % (what, node, error))
    return outcome


class Connection(ConnectionBase):
    """Each exec_command / put_file / fetch_file is this host's part of a coordinator tree operation."""

    transport = "hpc.relaytree.relay"
    has_pipelining = True
    # The relay daemon runs commands as root: Ansible's idea of the connection user (tmp dirs, become).
    default_user = "root"

    def __init__(self, play_context, *args, **kwargs):
        super().__init__(play_context, *args, **kwargs)
        # The TaskExecutor passes the uuid of the task its worker runs (ansible-core 2.3+): all the hosts of
        # that task (and no other) share it. Without it (uses outside a task) every call is on its own.
        self._task_uuid = str(kwargs.get("task_uuid") or "")
        try:
            self._run_pid = int(kwargs.get("ansible_playbook_pid") or 0) or os.getppid()
        except (TypeError, ValueError):
            self._run_pid = os.getppid()
        self._task_keys: dict = {}
        self._inventory_hostname = ""
        self._play_batch: list = []
        self._steps: collections.Counter = collections.Counter()
        self._requests = 0
        self._run_as_next = ""
        self._solo_id = "relay-solo-%d-%s" % (os.getpid(), uuid.uuid4().hex[:12])
        self._coordinator: Coordinator | None = None

    # -- what Ansible tells the connection ---------------------------------------------

    def set_options(self, task_keys=None, var_options=None, direct=None):
        super().set_options(task_keys=task_keys, var_options=var_options, direct=direct)
        if task_keys:
            self._task_keys = {key: task_keys.get(key) for key in
                               ("uuid", "name", "action", "run_once", "delegate_to", "throttle")}

    def update_vars(self, variables):
        """Called by the worker with the host's task variables: who we are and who else runs the task."""
        super().update_vars(variables)
        self._inventory_hostname = str(variables.get("inventory_hostname") or "")
        self._play_batch = [str(h) for h in variables.get("ansible_play_batch") or ()]

    def set_become_plugin(self, plugin):
        super().set_become_plugin(RelayBecome(plugin, self) if plugin is not None else None)

    # -- identity of this host's calls ---------------------------------------------------

    @property
    def _node(self) -> str:
        return str(self.get_option("host") or self._play_context.remote_addr or self._inventory_hostname)

    @property
    def _host(self) -> str:
        return self._inventory_hostname or self._node

    @property
    def _task_id(self) -> str:
        return self._task_uuid or str(self._task_keys.get("uuid") or "") or self._solo_id

    @property
    def _alone(self) -> bool:
        """One operation for this host only: nothing to wait for (or nothing safe to merge with)."""
        return (not (self._task_uuid or self._task_keys.get("uuid")) or bool(self._task_keys.get("run_once"))
                or bool(self._task_keys.get("delegate_to")))

    def _tree_options(self) -> dict:
        """The tree options (TREE_OPTIONS), as Ansible resolved them for this host; range-checked."""
        options = {option.name: self.get_option(option.name) for option in TREE_OPTIONS}
        try:
            check_tree_options(options)
        except TreeOptionError as exc:
            raise AnsibleConnectionFailure("relaytree: %s" % exc) from None
        return options

    def _request(self, kind: str, op: str, args: dict, stdin: bytes | None = None, raw: bool = False,
                 timeout: float | None = None, extra: dict | None = None) -> tuple:
        """This host's part of one tree operation: (outcome dict, operation dict)."""
        self._steps[kind] += 1
        message = tree_request(
            op=op, task=self._task_id, step="%s%d" % (kind, self._steps[kind]),
            name=str(self._task_keys.get("name") or self._task_keys.get("action") or ""),
            host=self._host, node=self._node, options=self._tree_options(), args=args,
            expected=self._play_batch, alone=self._alone, window=worker_window(self._task_keys.get("throttle")),
            stdin=stdin, raw=raw)
        message.update(extra or {})
        try:
            reply = self._coordinator.call(message, timeout=timeout)
        except CoordinatorError as exc:
            raise AnsibleConnectionFailure(str(exc)) from None  # "relaytree coordinator: ..."
        self._requests += 1
        return reply["outcome"], reply.get("operation") or {}

    def _exec(self, kind: str, command, stdin: bytes = b"", user: str = "", cwd: str = "",
              output_limit: int = OUTPUT_LIMIT) -> tuple:
        """Run a command (shell string or argv) on the node: (rc, stdout, stderr)."""
        seconds = float(self.get_option("command_timeout") or 0)
        args = {"command": command, "user": user, "cwd": cwd, "timeout": seconds or None,
                "output_limit": output_limit}
        outcome, _operation = self._request(kind, "exec", args, stdin=stdin, raw=True,
                                            timeout=seconds + 300.0 if seconds else None)
        return command_result(outcome, self._node, user)

    # -- the connection API --------------------------------------------------------------

    def _connect(self):
        if not self._connected:
            self._coordinator = Coordinator(run_pid=self._run_pid)
            self._connected = True
            display.vvv("RELAYTREE: %s through the relay tree (port %s)" % (self._node, self.get_option("port")),
                        host=self._host)
        return self

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        user = self._run_as_next if sudoable else ""
        self._run_as_next = ""
        display.vvv("EXEC %s%s" % (to_text(cmd), " (as %s)" % user if user else ""), host=self._host)
        command, stdin = command_form(to_text(cmd, errors="surrogate_or_strict"), to_bytes(in_data or b""))
        return self._exec("exec", command, stdin=stdin, user=user)

    def put_file(self, in_path, out_path):
        """One tree copy of the local file to out_path (shared by the hosts that put the same file there)."""
        super().put_file(in_path, out_path)
        display.vvv("PUT %s TO %s" % (in_path, out_path), host=self._host)
        if not os.path.isfile(to_bytes(in_path, errors="surrogate_or_strict")):
            raise AnsibleFileNotFound("file or module does not exist: %s" % to_text(in_path))
        in_path, out_path = to_text(in_path), to_text(out_path)
        if not out_path.startswith("/"):
            raise AnsibleError("relaytree: cannot copy %s to the relative path %s" % (in_path, out_path))
        outcome, _operation = self._request("put", "copy", {"src": os.path.abspath(in_path), "dest": out_path})
        transfer_result(outcome, self._node, "transfer %s to %s" % (in_path, out_path))

    def fetch_file(self, in_path, out_path):
        """One tree fetch for the hosts of the step, this node's file landing at out_path."""
        super().fetch_file(in_path, out_path)
        display.vvv("FETCH %s TO %s" % (in_path, out_path), host=self._host)
        in_path, out_path = to_text(in_path), to_text(out_path)
        if not in_path.startswith("/"):
            raise AnsibleError("relaytree: cannot fetch the relative path %s" % in_path)
        outcome, _operation = self._request("fetch", "fetch", {},
                                            extra={"src": in_path, "out_path": os.path.abspath(out_path)})
        transfer_result(outcome, self._node, "fetch %s" % in_path)

    def close(self):
        """The host is done with the task: a running coordinator need not wait for it at later steps."""
        if self._connected and self._requests and not self._alone:
            try:
                self._coordinator.tell({"op": "done", "task": self._task_id, "hosts": [self._host]})
            except CoordinatorError as exc:
                display.debug("relaytree: cannot tell the coordinator that %s is done: %s" % (self._host, exc))
        self._requests = 0
        self._connected = False

    def reset(self):
        """Nothing to reset: no session is kept to the node (meta: reset_connection is a no-op)."""
        display.vvv("RELAYTREE: reset_connection: nothing to reset")
