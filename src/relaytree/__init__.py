"""relaytree: push files and commands to many nodes through a tree of gRPC relays."""

import os as _os

__version__ = "0.1.0"

# Wire protocol version: a daemon refuses requests of any other version.
PROTOCOL_VERSION = 1

DEFAULT_PORT = 1995

# The daemon forks a process for every command and the child execs at once.  gRPC's
# fork handlers (pthread_atfork) are only for children that keep using gRPC, and a
# child forked while gRPC threads are busy can hang in them before it execs (seen with
# Python 3.9, which always forks; newer Pythons use vfork).  Must be set before grpc loads.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
