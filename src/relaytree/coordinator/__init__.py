"""Coordinator: the tree root of one ansible-playbook run.

Ansible runs every task once per host, each in its own forked worker. The tree
wants the opposite: one operation for all hosts. The coordinator sits between
the two: a local process (one per playbook run) that the workers of the
``hpc.relaytree`` plugins talk to over a UNIX socket. It merges the requests of
all hosts for the same task step and the same arguments into ONE tree
operation and answers every host with its own result.

Three parts, each testable on its own:

* ``batching``: which requests become one operation and when it is sent
  (pure logic, no event loop, no sockets, a clock given by the caller);
* ``operations``: one batched group -> one ``relaytree.client.Client`` call
  (one entry per operation: ``exec``, ``copy``, ``ping``);
* ``server``: the process (``python -m relaytree.coordinator``): the UNIX socket
  server and its protocol (the contract with the plugins), the peer-credential
  check, idle exit, clean-up of stale runs.

Importing this package loads nothing: the controller side of the plugins only
ever runs it as a separate process.
"""
