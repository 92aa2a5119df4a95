#!/usr/bin/python
# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

# Documentation only: the work is done by the action plugin plugins/action/tree_copy.py.

from __future__ import annotations

DOCUMENTATION = r"""
module: tree_copy
short_description: Copy a file to many nodes through a tree of relays
version_added: 0.1.0
description:
  - Copies one file from the controller to every host of the task, like M(ansible.builtin.copy), but
    the file is sent once and streamed down a tree of relaytree daemons, each relay writing it locally
    while forwarding it to its children.
  - Every node writes a temporary file next to the destination, verifies its sha256 and renames it
    atomically; a failed copy never leaves a partial file. A destination that already has the same
    content (and mode/owner/group) is not rewritten and reports C(changed=false).
options:
  src:
    description:
      - The file on the controller, searched like the O(ansible.builtin.copy#module:src) of
        M(ansible.builtin.copy) (the C(files/) directories of roles and playbooks).
      - Directories are not supported. Exactly one of O(src) and O(content) is required.
    type: str
  content:
    description:
      - The content of the file, instead of O(src).
    type: str
  dest:
    description:
      - Absolute path on the nodes. When it is an existing directory, the file keeps the name of O(src).
    type: str
    required: true
  mode:
    description:
      - Octal mode of the file, for example V('0644') (quote it in YAML). Symbolic modes are not supported.
      - Default for a new file is V('0644'); an existing file keeps its mode.
    type: raw
  owner:
    description:
      - Owner (name or uid) of the file. The daemon runs as root and writes the file as root otherwise.
    type: str
  group:
    description:
      - Group (name or gid) of the file.
    type: str
  mkdirs:
    description:
      - Create missing parent directories of O(dest).
    type: bool
    default: false
  backup:
    description:
      - Keep a file that gets replaced as C(DEST.<pid>.<timestamp>~), like M(ansible.builtin.copy).
    type: bool
    default: false
  chunk_size:
    description:
      - Bytes per chunk of the stream (1 byte to 8 MiB).
    type: int
    default: 1048576
  decrypt:
    description:
      - Decrypt a vault-encrypted O(src) on the controller before sending it.
    type: bool
    default: true
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.flow
  - hpc.relaytree.tree
  - hpc.relaytree.tree.options
attributes:
  check_mode:
    support: full
    details: The file is streamed and compared on every node, nothing is written; C(changed) tells what would change.
  diff_mode:
    support: partial
    details: For text files of at most 64 KiB; the current content is read on the nodes by one extra tree operation.
  safe_file_operations:
    description: Writes a temporary file next to the destination, verifies its checksum and renames it atomically.
    support: full
  vault:
    description: Can automatically decrypt Ansible vaulted files.
    support: full
seealso:
  - module: ansible.builtin.copy
  - module: hpc.relaytree.tree_exec
author:
  - relaytree developers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Push a compute image to every node (one stream down the tree)
  hpc.relaytree.tree_copy:
    src: images/compute.squashfs
    dest: /var/lib/images/compute.squashfs
    mode: '0644'
    mkdirs: true

- name: Small configuration file from a template string
  hpc.relaytree.tree_copy:
    content: "{{ lookup('template', 'limits.conf.j2') }}"
    dest: /etc/security/limits.d/90-hpc.conf
    owner: root
    group: root
    mode: '0644'
  notify: Reload limits
"""

RETURN = r"""
dest:
  description: Path of the file on the node (with the source name appended when O(dest) is a directory).
  returned: when the host was reached
  type: str
  sample: /var/lib/images/compute.squashfs
checksum:
  description: SHA1 checksum of the source, as M(ansible.builtin.copy) and M(ansible.builtin.stat) report it.
    Transfers are verified with SHA256 on every node.
  returned: when the host was reached
  type: str
  sample: 2a3f0e5ff5d7b4d3c3c1b5c7e4b0f8a1b9c6d2e3
size:
  description: Size of the source in bytes.
  returned: when the host was reached
  type: int
  sample: 67108864
msg:
  description: Why the copy failed.
  returned: on failure
  type: str
  sample: "parent directory /data does not exist (use mkdirs)"
"""
