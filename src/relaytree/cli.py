"""`relaytree` command line: exec, copy, fetch, ping, serve."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

import relaytree
from relaytree import client as rclient
from relaytree import output
from relaytree.results import NodeOutcome


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a number" % text) from None
        if value <= 0:
            raise argparse.ArgumentTypeError("must be positive, got %s" % text)
        return value
    return parse


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20}
    t = text.strip().lower().rstrip("ib")
    mult = units.get(t[-1:], 1)
    try:
        value = int(t[:-1] if t[-1:] in units else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError("bad size %r (e.g. 512k, 1m)" % text) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return value


def _add_tree_options(p: argparse.ArgumentParser, default_width: int) -> None:
    p.add_argument("-w", "--nodes", required=True, metavar="NODESET",
                   help="target nodes, ClusterShell syntax: cn[1-4,7], 10.0.0.[2-21]")
    p.add_argument("--width", type=_positive(int), default=default_width,
                   help="tree width: children per relay (default %(default)s)")
    p.add_argument("--port", type=_positive(int), default=relaytree.DEFAULT_PORT,
                   help="daemon port (default %(default)s)")
    p.add_argument("--connect-timeout", type=_positive(float),
                   default=rclient.DEFAULT_CONNECT_TIMEOUT, metavar="SECONDS",
                   help="give up on a node that does not accept a connection within this")
    p.add_argument("--deadline", type=_positive(float), metavar="SECONDS",
                   help="overall deadline of the operation (default: derived from --timeout / size)")
    p.add_argument("--pki", metavar="DIR",
                   help="controller keys (default $RELAYTREE_PKI or ~/.relaytree/pki)")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext and unsigned: only for daemons started with --insecure")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("-b", "--gather", action="store_true",
                   help="gather identical outputs into one block per node set (like clush -b)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relaytree", description="Run commands and copy files on many nodes through a tree "
                                      "of relay daemons.")
    parser.add_argument("--version", action="version", version="relaytree %s" % relaytree.__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("exec", help="run a command on every node")
    _add_tree_options(p, rclient.DEFAULT_EXEC_WIDTH)
    p.add_argument("--timeout", type=_positive(float), metavar="SECONDS",
                   help="per-node command timeout; the command's process group is killed")
    p.add_argument("--user", default="", help="run as this user")
    p.add_argument("--cwd", default="", help="working directory on the nodes")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="add to the command's environment (repeatable)")
    p.add_argument("--stdin", action="store_true", help="send this command's stdin to every node")
    p.add_argument("--argv", action="store_true",
                   help="run the words as an argv, without a shell")
    p.add_argument("--output-limit", type=_size, default=0, metavar="SIZE",
                   help="bytes of stdout/stderr kept per node (default 1m)")
    p.add_argument("words", nargs=argparse.REMAINDER, metavar="-- COMMAND")

    p = sub.add_parser("copy", help="copy a file to every node")
    _add_tree_options(p, rclient.DEFAULT_COPY_WIDTH)
    p.add_argument("src", help="local file")
    p.add_argument("dest", help="absolute path on the nodes (an existing directory keeps the name)")
    p.add_argument("--mode", default="", help="octal mode, e.g. 0644")
    p.add_argument("--owner", default="")
    p.add_argument("--group", default="")
    p.add_argument("--mkdirs", action="store_true", help="create missing parent directories")
    p.add_argument("--backup", action="store_true", help="keep a replaced file as DEST.<time>~")
    p.add_argument("--check", action="store_true", help="report what would change, write nothing")
    p.add_argument("--chunk-size", type=_size, default=rclient.DEFAULT_CHUNK, metavar="SIZE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("fetch", help="bring a file back from every node, to DESTDIR/NODE/NAME")
    _add_tree_options(p, rclient.DEFAULT_COPY_WIDTH)
    p.add_argument("src", help="absolute path of the file on the nodes")
    p.add_argument("destdir", help="existing local directory: each node's file lands at "
                                   "DESTDIR/NODE/basename(SRC)")
    p.add_argument("--chunk-size", type=_size, default=rclient.DEFAULT_CHUNK, metavar="SIZE")

    p = sub.add_parser("ping", help="version, hostname, uptime and load of every node")
    _add_tree_options(p, rclient.DEFAULT_EXEC_WIDTH)

    p = sub.add_parser("keys", help="cluster CA, node certificates, controller signing key")
    keys_sub = p.add_subparsers(dest="keys_command", metavar="ACTION")
    keys_sub.required = True
    k = keys_sub.add_parser("init", help="create what is missing: CA, controller certificate and "
                                         "signing key, and certificates for --nodes")
    k.add_argument("--nodes", default="", metavar="NODESET", help="node certificates to issue")
    k.add_argument("--address", action="append", default=[], metavar="NODE=ADDR",
                   help="extra address (IP or DNS name) in a node's certificate (repeatable)")
    k.add_argument("--cluster-name", default="relaytree")
    k.add_argument("--force", action="store_true",
                   help="re-issue existing certificates (never replaces the CA or signing key)")
    k = keys_sub.add_parser("node", help="issue (or with --force re-issue) one node's certificate")
    k.add_argument("name")
    k.add_argument("--address", action="append", default=[], metavar="ADDR")
    k.add_argument("--force", action="store_true")
    k = keys_sub.add_parser("show", help="what exists, expiry dates, the signing key id")
    for k in keys_sub.choices.values():
        k.add_argument("--pki", metavar="DIR",
                       help="key directory (default $RELAYTREE_PKI or ~/.relaytree/pki)")
        k.add_argument("--json", action="store_true")

    p = sub.add_parser("serve", help="run the relay daemon")
    p.add_argument("--listen", metavar="ADDR:PORT", help="default 0.0.0.0:%d" % relaytree.DEFAULT_PORT)
    p.add_argument("--config", metavar="FILE", help="daemon configuration (TOML)")
    p.add_argument("--state-dir", metavar="DIR", help="default /var/lib/relaytree")
    p.add_argument("--base-dir", metavar="DIR",
                   help="resolve every file path of every request under DIR")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--insecure", action="store_true",
                   help="plaintext gRPC without TLS or signatures: local experiments only")

    p = sub.add_parser("supervise", help="keep `relaytree serve` running where there is no systemd: "
                                         "restarts with backoff, pid file, log file, --detach")
    from relaytree import supervise as _supervise  # stdlib only
    _supervise.add_arguments(p)
    return parser


def _client(args) -> rclient.Client:
    options = dict(port=args.port, connect_timeout=args.connect_timeout)
    if args.insecure:
        return rclient.Client(**options)
    pki = args.pki or rclient.DEFAULT_PKI
    if not args.pki and not os.path.exists(os.path.join(pki, "ca.crt")):
        # Nothing to be secure with: the daemons decide (a secure one refuses us).
        print("relaytree: no controller keys in %s (see `relaytree keys init`): sending plaintext, "
              "unsigned requests, which only --insecure daemons accept" % pki, file=sys.stderr)
        return rclient.Client(**options)
    return rclient.secure_client(pki, **options)


def _cmd_keys(args) -> int:
    from relaytree import keys
    pki = args.pki or rclient.DEFAULT_PKI
    try:
        if args.keys_command == "init":
            addresses: Dict[str, list] = {}
            for item in args.address:
                node, sep, addr = item.partition("=")
                if not sep or not node or not addr:
                    raise rclient.ClientError("--address wants NODE=ADDR, got %r" % item)
                addresses.setdefault(node, []).append(addr)
            result = keys.setup(pki, args.nodes or (), cluster_name=args.cluster_name,
                                addresses=addresses, force=args.force)
        elif args.keys_command == "node":
            issued = keys.issue_node_cert(pki, args.name, args.address, force=args.force)
            result = {"created": [str(issued.cert), str(issued.key)]}
        else:
            result = keys.describe(pki)
    except keys.KeysError as exc:
        raise rclient.ClientError(str(exc)) from None
    if args.json or args.keys_command == "show":
        json.dump(result, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    else:
        for path in result.get("created", []):
            print("created %s" % path)
        if result.get("key_id"):
            print("controller signing key id: %s" % result["key_id"])
    return 0


def _print_results(args, kind: str, outcomes: Dict[str, NodeOutcome]) -> int:
    results: List[NodeOutcome] = list(outcomes.values())
    if args.json:
        json.dump(output.to_json(results), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        if args.gather:
            sys.stdout.write(output.render_gathered(results, kind=kind))
        else:
            out, err = output.render_lines(results, kind=kind)
            sys.stdout.write(out)
            sys.stdout.flush()
            sys.stderr.write(err)
        sys.stderr.flush()
        sys.stdout.write(output.render_summary(results, kind=kind))
    sys.stdout.flush()
    return output.exit_status(results)


def _cmd_exec(args) -> int:
    words = list(args.words)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise rclient.ClientError("no command given (relaytree exec -w NODES -- COMMAND)")
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise rclient.ClientError("--env wants NAME=VALUE, got %r" % item)
        env[name] = value
    stdin = sys.stdin.buffer.read() if args.stdin else b""
    command = words if args.argv else " ".join(words)
    outcomes = _client(args).exec(args.nodes, command, env=env, cwd=args.cwd, user=args.user,
                                  stdin=stdin, timeout=args.timeout, width=args.width,
                                  deadline=args.deadline, output_limit=args.output_limit)
    return _print_results(args, "exec", outcomes)


def _cmd_copy(args) -> int:
    bar = None
    on_progress = None
    if not args.no_progress and not args.json and sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=os.path.getsize(args.src), unit="B", unit_scale=True,
                       unit_divisor=1024, desc="copy", file=sys.stderr, leave=False)

            def on_progress(sent: int, total: int) -> None:
                bar.update(sent - bar.n)
    try:
        outcomes = _client(args).copy(args.nodes, args.src, args.dest, mode=args.mode,
                                      owner=args.owner, group=args.group, mkdirs=args.mkdirs,
                                      backup=args.backup, check=args.check, width=args.width,
                                      chunk_size=args.chunk_size, deadline=args.deadline,
                                      on_progress=on_progress)
    finally:
        if bar is not None:
            bar.close()
    return _print_results(args, "copy", outcomes)


def _cmd_fetch(args) -> int:
    outcomes = _client(args).fetch(args.nodes, args.src, args.destdir, width=args.width,
                                   chunk_size=args.chunk_size, deadline=args.deadline)
    return _print_results(args, "fetch", outcomes)


def _cmd_ping(args) -> int:
    outcomes = _client(args).ping(args.nodes, width=args.width, deadline=args.deadline)
    return _print_results(args, "ping", outcomes)


def _cmd_serve(args) -> int:
    from relaytree import daemon
    return daemon.main(args)


def _cmd_supervise(args) -> int:
    from relaytree import supervise
    return supervise.main(args)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {"exec": _cmd_exec, "copy": _cmd_copy, "ping": _cmd_ping, "serve": _cmd_serve, "supervise": _cmd_supervise,
               "keys": _cmd_keys, "fetch": _cmd_fetch}
    try:
        return handler[args.command](args)
    except rclient.ClientError as exc:
        print("relaytree %s: %s" % (args.command, exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("relaytree %s: interrupted" % args.command, file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
