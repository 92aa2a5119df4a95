# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:

    # What tree_exec, tree_copy and tree_ping share (with OPTIONS): the deadline, notes, attributes.
    DOCUMENTATION = r"""
options:
  deadline:
    description:
      - Overall deadline of the tree operation in seconds.
      - Defaults to one derived from C(timeout) (tree_exec) or from the file size (tree_copy).
    type: float
notes:
  - The task runs through Ansible's normal per-host machinery (C(when), loops, C(register), handlers,
    check and diff mode, C(no_log)), but the work of all the hosts of the task travels as B(one) tree
    operation. A per-run coordinator process (started on first use, a UNIX socket in
    C(/tmp/relaytree-coord-UID/)) gathers the hosts' requests and sends them down the tree.
  - Hosts are reached at the host variable C(relaytree_host), else C(ansible_host), else their inventory name.
    The Ansible connection of the host is not used.
  - The options that say how to reach the relays (O(port), O(pki), O(width), O(connect_timeout), O(insecure)) are
    the same for these tasks and for the P(hpc.relaytree.relay#connection) connection, read with the same
    precedence, highest first, the task argument, the host variable, the environment variable, the C([relaytree])
    section of C(ansible.cfg), the default. Set them once for all tree tasks with
    C(module_defaults) and the group C(group/hpc.relaytree.tree) (its values count as task arguments).
  - A task step is sent when all hosts of C(ansible_play_batch) have arrived, when C(forks) hosts (or the task's
    C(throttle)) wait in the task, or when none has arrived for C(RELAYTREE_COORDINATOR_GAP) seconds
    (default 0.3). Hosts skipped by C(when) cost one gap. Set C(forks) to at least the batch size, or use the
    P(hpc.relaytree.tree#strategy) strategy, which announces exactly which hosts run each task and enlarges the
    worker pool.
  - Per-host templated arguments are fine; hosts with different arguments form separate tree operations.
  - C(delegate_to) is not supported.
  - The relaytree Python package ships in the collection's C(src/) directory; the controller needs the
    Python packages grpcio, protobuf and ClusterShell.
requirements:
  - grpcio, protobuf and ClusterShell on the controller
  - the relaytree daemon on the targets (role C(hpc.relaytree.relay))
attributes:
  action:
    support: full
  action_group:
    description: Use C(group/hpc.relaytree.tree) in C(module_defaults) to set options of all the tree tasks at once.
    support: full
    membership:
      - hpc.relaytree.tree
  async:
    support: none
  bypass_host_loop:
    support: none
  platform:
    platforms: posix
"""

    # How to reach the relays: the options of the table TREE_OPTIONS in plugins/plugin_utils/_tree_options.py,
    # for the tree_* modules and the relay connection. Where they are read from: the descriptions below
    # (tree_* tasks also take them as arguments) and CONNECTION (for Ansible's option machinery).
    OPTIONS = r"""
options:
  port:
    description:
      - TCP port of the relay daemons.
      - Set by, highest precedence first, the task argument (tree tasks, also through C(module_defaults)),
        the host variable C(relaytree_port), E(ANSIBLE_RELAYTREE_PORT), C(port) in the C([relaytree]) section of
        C(ansible.cfg); else V(1995).
    type: int
  pki:
    description:
      - Directory of the controller's relaytree keys (TLS client certificate, CA, signing key), as made by
        C(relaytree keys init).
      - Set by, highest precedence first, the task argument (tree tasks, also through C(module_defaults)),
        the host variable C(relaytree_pki), E(ANSIBLE_RELAYTREE_PKI), E(RELAYTREE_PKI) (also read by the
        C(relaytree) command), C(pki) in the C([relaytree]) section of C(ansible.cfg); else C(~/.relaytree/pki).
    type: path
  width:
    description:
      - Tree width, the number of children each relay forwards to.
      - Set by, highest precedence first, the task argument (tree tasks, also through C(module_defaults)),
        the host variable C(relaytree_width), E(ANSIBLE_RELAYTREE_WIDTH), C(width) in the C([relaytree]) section
        of C(ansible.cfg); else the relaytree client's default for the operation (wide for commands and pings,
        narrow for copies, which are bandwidth-bound).
    type: int
  connect_timeout:
    description:
      - Seconds to wait for a relay to accept a connection before it counts as unreachable
        (its subtree is then served through the next member of its group).
      - Set by, highest precedence first, the task argument (tree tasks, also through C(module_defaults)),
        the host variable C(relaytree_connect_timeout), E(ANSIBLE_RELAYTREE_CONNECT_TIMEOUT), C(connect_timeout)
        in the C([relaytree]) section of C(ansible.cfg); else V(5).
    type: float
  insecure:
    description:
      - Send plaintext, unsigned requests, which only daemons started with C(--insecure) accept.
        For local experiments only.
      - Set by, highest precedence first, the task argument (tree tasks, also through C(module_defaults)),
        the host variable C(relaytree_insecure), E(ANSIBLE_RELAYTREE_INSECURE), C(insecure) in the C([relaytree])
        section of C(ansible.cfg); else V(false).
    type: bool
"""

    # The sources of OPTIONS for a plugin with configuration (the relay connection): use after OPTIONS.
    CONNECTION = r"""
options:
  port:
    default: 1995
    vars:
      - name: relaytree_port
    env:
      - name: ANSIBLE_RELAYTREE_PORT
    ini:
      - section: relaytree
        key: port
  pki:
    default: ~/.relaytree/pki
    vars:
      - name: relaytree_pki
    env:
      - name: RELAYTREE_PKI
      - name: ANSIBLE_RELAYTREE_PKI
    ini:
      - section: relaytree
        key: pki
  width:
    vars:
      - name: relaytree_width
    env:
      - name: ANSIBLE_RELAYTREE_WIDTH
    ini:
      - section: relaytree
        key: width
  connect_timeout:
    default: 5.0
    vars:
      - name: relaytree_connect_timeout
    env:
      - name: ANSIBLE_RELAYTREE_CONNECT_TIMEOUT
    ini:
      - section: relaytree
        key: connect_timeout
  insecure:
    default: false
    vars:
      - name: relaytree_insecure
    env:
      - name: ANSIBLE_RELAYTREE_INSECURE
    ini:
      - section: relaytree
        key: insecure
"""
