"""relaytree: push files and commands to many nodes through a tree of gRPC relays."""

__version__ = "0.1.0"

# Wire protocol version: a daemon refuses requests of any other version.
PROTOCOL_VERSION = 1

DEFAULT_PORT = 1995
