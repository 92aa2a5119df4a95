#!/usr/bin/python
# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

# Documentation only: the work is done by the action plugin plugins/action/tree_ping.py.

from __future__ import annotations

DOCUMENTATION = r"""
module: tree_ping
short_description: Check the relay daemons of many nodes
version_added: 0.1.0
description:
  - Asks the relaytree daemon of every host of the task for its version, hostname, uptime and load,
    in one operation sent down the tree.
  - Hosts whose daemon cannot be reached are reported unreachable (the tree re-heads around dead relays,
    so one dead node never costs the nodes below it).
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.flow
  - hpc.relaytree.tree
  - hpc.relaytree.tree.options
attributes:
  check_mode:
    support: full
    details: Read-only, runs the same in check mode.
  diff_mode:
    support: none
seealso:
  - module: ansible.builtin.ping
  - module: hpc.relaytree.tree_exec
author:
  - relaytree developers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Are all relays up, and at which version?
  hpc.relaytree.tree_ping:
  register: relay

- name: Nodes with an old daemon
  ansible.builtin.debug:
    msg: "{{ inventory_hostname }} runs relaytree {{ relay.version }}"
  when: relay.version is version('0.1.0', '<')
"""

RETURN = r"""
ping:
  description: Always V(pong).
  returned: success
  type: str
  sample: pong
version:
  description: relaytree version of the daemon.
  returned: success
  type: str
  sample: 0.1.0
protocol_version:
  description: Wire protocol version of the daemon.
  returned: success
  type: int
  sample: 1
hostname:
  description: Hostname of the node.
  returned: success
  type: str
  sample: cn042
uptime:
  description: Uptime of the node in seconds.
  returned: success
  type: float
  sample: 86400.5
load:
  description: 1, 5 and 15 minute load averages.
  returned: success
  type: list
  elements: float
  sample: [0.1, 0.2, 0.3]
"""
