#!/usr/bin/python
# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

# Documentation only: the work is done by the action plugin plugins/action/tree_exec.py.

from __future__ import annotations

DOCUMENTATION = r"""
module: tree_exec
short_description: Run a command on many nodes through a tree of relays
version_added: 0.1.0
description:
  - Runs a command on every host of the task, like M(ansible.builtin.command), but all the hosts of
    the task are served by one operation sent down a tree of relaytree daemons instead of one
    connection per host.
  - The result of each host looks like that of M(ansible.builtin.command), so C(register),
    C(failed_when), C(changed_when) and handlers work as usual.
  - The exit status decides success; output on stderr is data, not failure.
options:
  cmd:
    description:
      - The command, run by C(/bin/sh -c) on the node (pipes, redirections and variables work).
      - Exactly one of O(cmd) and O(argv) is required.
    type: str
  argv:
    description:
      - The command as a list of words, run without a shell.
    type: list
    elements: str
  chdir:
    description:
      - Absolute path of the directory to run the command in.
    type: str
  env:
    description:
      - Variables added to the command's environment.
    type: dict
    default: {}
  user:
    description:
      - Run the command as this user (the daemon runs as root).
      - When not set and C(become) is on for the task, C(become_user) is used; the become method and
        password are not used. Without either, the command runs as the daemon's user (root).
    type: str
  stdin:
    description:
      - Text sent to the command's standard input.
    type: str
  stdin_add_newline:
    description:
      - Append a newline to O(stdin).
    type: bool
    default: true
  timeout:
    description:
      - Seconds the command may run on each node; then its whole process group is killed and the
        host fails with a timeout message.
    type: float
  creates:
    description:
      - A path or glob on the node. If it exists, the command is not run.
      - Relative paths are relative to O(chdir). Checked on the node before O(removes).
    type: str
  removes:
    description:
      - A path or glob on the node. If it does not exist, the command is not run.
    type: str
  output_limit:
    description:
      - Bytes of stdout and of stderr kept per node; V(0) means the daemon's default.
        C(stdout_truncated) / C(stderr_truncated) tell when output was cut.
    type: int
    default: 0
  strip_empty_ends:
    description:
      - Strip trailing newlines from stdout and stderr, as M(ansible.builtin.command) does.
    type: bool
    default: true
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.flow
  - hpc.relaytree.tree
  - hpc.relaytree.tree.options
attributes:
  check_mode:
    support: partial
    details: As M(ansible.builtin.command) - the command is skipped unless O(creates) or O(removes) decide.
  diff_mode:
    support: none
seealso:
  - module: ansible.builtin.command
  - module: hpc.relaytree.tree_copy
  - module: hpc.relaytree.tree_ping
author:
  - relaytree developers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Kernel of every node
  hpc.relaytree.tree_exec:
    cmd: uname -r
  register: kernel

- name: Rebuild the module cache once
  hpc.relaytree.tree_exec:
    argv: [depmod, -a]
    creates: /lib/modules/{{ kernel.stdout }}/modules.dep.bin

- name: Run as a service user, with a timeout, and notify a handler when it changed something
  hpc.relaytree.tree_exec:
    cmd: ./refresh.sh --quiet
    chdir: /opt/app
    user: appuser
    env:
      APP_MODE: batch
    timeout: 60
  register: refresh
  changed_when: "'updated' in refresh.stdout"
  notify: Restart app
"""

RETURN = r"""
cmd:
  description: The command as given (string or list).
  returned: always
  type: raw
  sample: uname -r
rc:
  description: Exit status of the command (null when it could not be started or timed out).
  returned: when the host was reached
  type: int
  sample: 0
stdout:
  description: Standard output of the command.
  returned: when the host was reached
  type: str
  sample: 5.14.0-427.el9.x86_64
stderr:
  description: Standard error of the command.
  returned: when the host was reached
  type: str
  sample: ''
stdout_lines:
  description: O(strip_empty_ends)-processed stdout split into lines.
  returned: when the host was reached
  type: list
  elements: str
  sample: [5.14.0-427.el9.x86_64]
stderr_lines:
  description: stderr split into lines.
  returned: when the host was reached
  type: list
  elements: str
  sample: []
stdout_truncated:
  description: The daemon cut stdout at O(output_limit).
  returned: when true
  type: bool
  sample: true
stderr_truncated:
  description: The daemon cut stderr at O(output_limit).
  returned: when true
  type: bool
  sample: true
start:
  description: When the command started on the node (controller clock, derived from its run time).
  returned: when the command ran
  type: str
  sample: '2025-01-31 12:00:00.000000'
end:
  description: When the result came back.
  returned: when the command ran
  type: str
  sample: '2025-01-31 12:00:00.021000'
delta:
  description: Run time of the command on the node.
  returned: when the command ran
  type: str
  sample: '0:00:00.021000'
msg:
  description: Why the command failed, was skipped or would have run.
  returned: always
  type: str
  sample: The command exited with a non-zero return code.
"""
