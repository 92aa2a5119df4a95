# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:

    # Options and notes shared by tree_exec, tree_copy and tree_ping.
    DOCUMENTATION = r"""
options:
  port:
    description:
      - TCP port of the relay daemons.
      - Defaults to the host variable C(relaytree_port), else V(1995).
    type: int
  width:
    description:
      - Tree width, the number of children each relay forwards to.
      - Defaults to the relaytree client's default for the operation (wide for commands and pings,
        narrow for copies, which are bandwidth-bound).
    type: int
  connect_timeout:
    description:
      - Seconds to wait for a relay to accept a connection before it counts as unreachable
        (its subtree is then served through the next member of its group).
    type: float
    default: 5.0
  deadline:
    description:
      - Overall deadline of the tree operation in seconds.
      - Defaults to one derived from C(timeout) (tree_exec) or from the file size (tree_copy).
    type: float
  pki:
    description:
      - Directory of the controller's relaytree keys (TLS client certificate, CA, signing key), as made by
        C(relaytree keys init).
      - Defaults to the variable C(relaytree_pki), else E(RELAYTREE_PKI), else C(~/.relaytree/pki).
    type: str
  insecure:
    description:
      - Send plaintext, unsigned requests, which only daemons started with C(--insecure) accept.
        For local experiments only.
      - Defaults to the variable C(relaytree_insecure), else V(false).
    type: bool
notes:
  - The task runs through Ansible's normal per-host machinery (C(when), loops, C(register), handlers,
    check and diff mode, C(no_log)), but the work of all the hosts of the task travels as B(one) tree
    operation. A per-run coordinator process (started on first use, a UNIX socket in
    C(/tmp/relaytree-coord-UID/)) gathers the hosts' requests and sends them down the tree.
  - Hosts are reached at the host variable C(relaytree_host), else C(ansible_host), else their inventory name.
    The Ansible connection of the host is not used.
  - A task step is sent when all hosts of C(ansible_play_batch) have arrived, or when none has arrived
    for C(RELAYTREE_COORDINATOR_GAP) seconds (default 0.3). Hosts skipped by C(when) cost one gap.
    Set C(forks) to at least the batch size, or use the P(hpc.relaytree.tree#strategy) strategy,
    which announces exactly which hosts run each task and enlarges the worker pool.
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
  async:
    support: none
  bypass_host_loop:
    support: none
  platform:
    platforms: posix
"""
