"""simcluster: a simulated HPC cluster on one Linux machine (stdlib only, Python 3.9+).

Every node ``cnN`` is a set of namespaces held by one long-lived process:

* network: netns ``<name>-cnN``, its ``eth0`` is one end of a veth pair whose
  other end (``<name>vN``) is a port of the bridge ``<name>br0`` in the root
  namespace.  The controller (root namespace) owns the bridge address ``.1``,
  nodes get ``.2``, ``.3``, ...  No route leaves the bridge subnet, IPv6 is off
  on every link we create, optional ``tc tbf`` rate cap on both veth ends.
* uts: hostname ``cnN``.
* pid: the node has its own process tree (``ps``/``pkill`` inside a node only
  see that node); its init is ``sshd -D`` (pid 1 in the node).
* mount: per-node copy-on-write overlays over ``/etc``, ``/var``, ``/root`` and
  ``/usr/local`` (upper layers in the state dir), ``/usr`` read-only, and
  private bind-mounted directories for ``/tmp``, ``/opt``, ``/srv``, ``/run``,
  ``/etc/relaytree``, ``/var/lib/relaytree`` and ``/root/.ssh``.  Everything
  else (``/work``, ``/home``, ``/dev`` ...) is the host's, as is.

CLI::

    simcluster.py up --nodes 16 [--name sim] [--prefix cn] [--subnet 10.251.0.0/24|auto]
                     [--rate 1gbit] [--state-dir DIR] [--replace] [--timeout 60]
    simcluster.py down [--name sim]
    simcluster.py status [--name sim] [--json]
    simcluster.py exec [--name sim] NODE -- CMD [ARG...]

Python::

    from simcluster import Cluster
    with Cluster("sim", nodes=4, subnet="auto") as c:
        c.exec("cn1", ["hostname"]).stdout      # 'cn1\\n'
        c.inventory_path, c.ssh_key, c.nodes    # [('cn1', '10.251.0.2'), ...]

Must run as root.  Needs iproute2 (ip, tc), util-linux (unshare, nsenter,
setpriv), openssh-server and openssh-client.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

__all__ = ["Cluster", "SimClusterError", "cluster", "list_clusters", "parse_rate"]

DEFAULT_NAME = "sim"
DEFAULT_PREFIX = "cn"
DEFAULT_SUBNET = "10.251.0.0/24"
AUTO_SUBNET_POOL = "10.251.0.0/16"  # "--subnet auto" picks the first free /24 in here
DEFAULT_STATE_ROOT = "/tmp/relaytree-sim"
REGISTRY_DIR = "/run/relaytree-sim"
HOSTS_FILE = "/etc/hosts"
NETNS_DIR = "/run/netns"
SSHD = "/usr/sbin/sshd"
NODE_PYTHON = "/usr/bin/python3"
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MARKER = ".relaytree-simcluster"
HOSTS_BEGIN = "# BEGIN relaytree-sim {}"
HOSTS_END = "# END relaytree-sim {}"

# Node filesystem layout (see module docstring).
OVERLAY_DIRS = ("/etc", "/var", "/root", "/usr/local")
READONLY_DIRS = ("/usr",)
PRIVATE_DIRS = (  # (mount point, dir under STATE/nodes/NODE/fs, mode)
    ("/tmp", "tmp", 0o1777),
    ("/opt", "opt", 0o755),
    ("/srv", "srv", 0o755),
    ("/run", "run", 0o755),
    ("/etc/relaytree", "etc-relaytree", 0o755),
    ("/var/lib/relaytree", "var-lib-relaytree", 0o755),
    ("/root/.ssh", "root-ssh", 0o700),
)
REQUIRED_TOOLS = ("ip", "tc", "unshare", "nsenter", "setpriv", "ssh-keygen")

_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_PREFIX_RE = re.compile(r"^[a-z](?:[a-z0-9-]{0,14}[a-z])?$")
_SAFE_PATH_RE = re.compile(r"^/[A-Za-z0-9._/+-]*$")

# mount(2) flags
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
CLONE_NEWNET = 0x40000000


class SimClusterError(RuntimeError):
    """A cluster operation failed (message says what and where to look)."""


# --------------------------------------------------------------------------- helpers


def _log(msg: str) -> None:
    print(f"simcluster: {msg}", file=sys.stderr, flush=True)


def _run(argv, input=None, check=True, timeout=60):
    p = subprocess.run(argv, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise SimClusterError(f"{shlex.join(argv)} failed (rc={p.returncode}): "
                              f"{(p.stderr or p.stdout).strip()}")
    return p


def _ip_batch(lines, force=False, netns=None, tool="ip"):
    if not lines:
        return None
    argv = [tool] + (["-n", netns] if netns else []) + (["-force"] if force else []) + ["-batch", "-"]
    return _run(argv, input="\n".join(lines) + "\n", check=not force)


_libc_obj = None


def _libc():
    global _libc_obj
    if _libc_obj is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                              ctypes.c_ulong, ctypes.c_char_p]
        lib.setns.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc_obj = lib
    return _libc_obj


def _write_file(path, text, mode=0o644):
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _proc_stat(pid):
    """(state, starttime) of a pid, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def _alive(pid, start=None):
    if not pid:
        return False
    st = _proc_stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return start is None or st[1] == start


def _ns_inode(pid, kind):
    try:
        link = os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None
    m = re.search(r"\[(\d+)\]", link)
    return int(m.group(1)) if m else None


def _nspid(pid):
    """Pids of ``pid`` from the host pid namespace down to its own (NSpid)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return None


def _all_pids():
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _mountpoints():
    points = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4]
                points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mp))
    except OSError:
        pass
    return points


def _umount(path, detach=False):
    """umount2(2) (no umount binary: it would leave libmount state in /run/mount)."""
    libc = _libc()
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    if libc.umount2(path.encode(), MNT_DETACH if detach else 0) != 0:
        e = ctypes.get_errno()
        _log(f"umount {path}: {os.strerror(e)}")
        return False
    return True


def _is_under(path, parent):
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _netns_list():
    try:
        return sorted(os.listdir(NETNS_DIR))
    except OSError:
        return []


def _links():
    out = _run(["ip", "-o", "link", "show"], check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


@contextlib.contextmanager
def _in_netns(ns):
    """Run the block with the calling thread inside network namespace ``ns``."""
    libc = _libc()
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns({ns}): {os.strerror(e)}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if libc.setns(orig, CLONE_NEWNET) != 0:  # cannot happen; never continue in the wrong netns
                os.write(2, b"simcluster: FATAL: cannot return to the original netns\n")
                os._exit(70)
    finally:
        os.close(orig)


def _disable_ipv6(dev):
    path = f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"
    if os.path.exists(path):
        with open(path, "w") as f:
            f.write("1\n")


_RATE_UNITS = {"": 1, "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}


def parse_rate(rate: str) -> int:
    """tc-style rate ('100mbit', '1gbit', '50mbps', '1000000') -> bits per second."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(rate))
    if not m or m.group(2).lower() not in _RATE_UNITS:
        raise SimClusterError(f"bad rate {rate!r}: use e.g. 100mbit, 1gbit, 10gbit, 50mbps")
    bits = int(float(m.group(1)) * _RATE_UNITS[m.group(2).lower()])
    if bits < 8000:
        raise SimClusterError(f"rate {rate!r} is too small")
    return bits


def _used_networks():
    nets = []
    out = _run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
    for m in re.finditer(r"\binet (\S+)", out):
        nets.append(ipaddress.ip_interface(m.group(1)).network)
    out = _run(["ip", "-4", "route", "show", "table", "all"], check=False).stdout
    kinds = {"unicast", "local", "broadcast", "multicast", "anycast", "blackhole",
             "unreachable", "prohibit", "throw", "nat"}
    for line in out.splitlines():
        toks = line.split()
        if not toks:
            continue
        dst = toks[1] if toks[0] in kinds and len(toks) > 1 else toks[0]
        if dst == "default":
            continue
        try:
            nets.append(ipaddress.ip_network(dst, strict=False))
        except ValueError:
            pass
    return nets


# One lock for every cluster operation on this machine: flock on /etc/hosts
# (always exists, never replaced by us, nothing to clean up).  Re-entrant
# within the process so that a failing up() can call down().
_LOCK = threading.RLock()
_lock_depth = 0
_lock_fd = None


@contextlib.contextmanager
def _machine_lock():
    global _lock_depth, _lock_fd
    with _LOCK:
        if _lock_depth == 0:
            fd = os.open(HOSTS_FILE, os.O_RDONLY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_EX)
            _lock_fd = fd
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
            if _lock_depth == 0:
                os.close(_lock_fd)
                _lock_fd = None


def _hosts_edit(name, entries):
    """Replace (entries=list of (addr, hostname)) or remove (None) our /etc/hosts block.

    Written in place (same inode): works when /etc/hosts is a bind mount, and
    the nodes, which see /etc through an overlay, read the new content."""
    begin, end = HOSTS_BEGIN.format(name), HOSTS_END.format(name)
    with open(HOSTS_FILE, "r+") as f:
        text = f.read()
        out, skip = [], False
        for line in text.splitlines():
            s = line.strip()
            if s == begin:
                skip = True
            elif skip and s == end:
                skip = False
            elif not skip:
                out.append(line)
        if entries:
            out.append(begin)
            out.extend(f"{addr}\t{host}" for addr, host in entries)
            out.append(end)
        new = "\n".join(out) + "\n" if out else ""
        if new != text:
            f.seek(0)
            f.write(new)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())


def _hosts_names_outside_block(name):
    begin, end = HOSTS_BEGIN.format(name), HOSTS_END.format(name)
    names, skip = set(), False
    with open(HOSTS_FILE) as f:
        for line in f:
            s = line.strip()
            if s == begin:
                skip = True
                continue
            if skip:
                skip = s != end
                continue
            s = s.split("#", 1)[0].split()
            names.update(s[1:])
    return names


def list_clusters():
    """Registered clusters: list of dicts {name, state_dir}."""
    out = []
    try:
        entries = sorted(os.listdir(REGISTRY_DIR))
    except OSError:
        return out
    for e in entries:
        if e.endswith(".json"):
            reg = _read_json(os.path.join(REGISTRY_DIR, e))
            if reg:
                out.append(reg)
    return out


# --------------------------------------------------------------------------- node init
# Runs as ``python simcluster.py _node-init STATE/nodes/cnN/init.json`` inside
# ``ip netns exec NS unshare --uts --mount --pid --fork --kill-child``: pid 1 of
# the node.  Sets up the mounts and the hostname, reports its host pid, then
# becomes sshd.


def _node_init(cfg_path):
    with open(cfg_path) as f:
        cfg = json.load(f)
    dir_fd = os.open(cfg["node_dir"], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def report(fname, data):
        tmp = fname + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
        os.write(fd, json.dumps(data).encode())
        os.close(fd)
        os.rename(tmp, fname, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    try:
        libc = _libc()

        def mount(src, tgt, fstype, flags, data=None):
            def enc(text):
                return None if text is None else text.encode()

            if libc.mount(enc(src), enc(tgt), enc(fstype), flags, enc(data)) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"mount({src!r}, {tgt!r}, {fstype!r}, {flags:#x}, {data!r}): "
                                 f"{os.strerror(e)}")

        # Still the host's procfs: /proc/self is our pid in the host pid namespace.
        host_pid = int(os.readlink("/proc/self"))
        mount(None, "/", None, MS_REC | MS_PRIVATE)

        # Hold every source by fd first: later mounts hide the state dir (/tmp)
        # and the host's submounts under the overlaid directories.
        bind_fds = [(b["target"], os.open(b["source"], os.O_PATH | os.O_CLOEXEC)) for b in cfg["binds"]]
        overlaid = [o["target"] for o in cfg["overlays"]]
        sub_fds, taken = [], []
        for mp in sorted(set(_mountpoints()), key=len):
            if any(_is_under(mp, d) and mp != d for d in overlaid) and not any(_is_under(mp, t) for t in taken):
                sub_fds.append((mp, os.open(mp, os.O_PATH | os.O_CLOEXEC)))
                taken.append(mp)

        for d in cfg["readonly"]:
            keep = os.statvfs(d).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
            mount(d, d, None, MS_BIND | MS_REC)
            mount(None, d, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
        for o in cfg["overlays"]:
            t = o["target"]
            mount("overlay", t, "overlay", 0, f"lowerdir={t},upperdir={o['upper']},workdir={o['work']}")
        for mp, fd in sub_fds:
            mount(f"/proc/self/fd/{fd}", mp, None, MS_BIND | MS_REC)
        for target, fd in bind_fds:
            if not os.path.isdir(target):
                if not any(_is_under(target, d) for d in overlaid):
                    raise RuntimeError(f"mount point {target} missing on the host")
                os.makedirs(target, 0o755)  # lands in the node's overlay upper dir
            mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
        for fd in [fd for _target, fd in bind_fds + sub_fds]:
            os.close(fd)
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        socket.sethostname(cfg["hostname"])
        os.chdir("/")
        report("ready", {"pid": host_pid})
    except BaseException as e:  # noqa: BLE001 - report anything, then die
        try:
            report("error", {"error": f"{type(e).__name__}: {e}"})
        finally:
            print(f"simcluster node-init {cfg.get('hostname')}: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
            os._exit(1)
    os.close(dir_fd)
    os.execv(SSHD, [SSHD, "-D", "-e", "-f", "/etc/ssh/sshd_config"])


# --------------------------------------------------------------------------- cluster


class Cluster:
    """A simulated cluster.  ``Cluster(...).up()`` creates it, ``.down()`` removes it.

    ``Cluster.attach(name)`` gives a handle on a cluster created elsewhere
    (for example by the CLI).  Usable as a context manager (up on enter unless
    already up, down on exit).
    """

    def __init__(self, name=DEFAULT_NAME, nodes=16, prefix=DEFAULT_PREFIX, subnet=DEFAULT_SUBNET,
                 rate=None, state_dir=None, python=NODE_PYTHON, ready_timeout=60.0,
                 default_route=False):
        if not _NAME_RE.match(name or ""):
            raise SimClusterError(f"bad cluster name {name!r}: 1-8 chars, [a-z][a-z0-9]*")
        if not _PREFIX_RE.match(prefix or ""):
            raise SimClusterError(f"bad node prefix {prefix!r}: [a-z][a-z0-9-]*, ending with a letter")
        if int(nodes) < 1:
            raise SimClusterError("need at least one node")
        self.name = name
        self.count = int(nodes)
        self.prefix = prefix
        self.subnet = subnet
        self.rate = rate
        self.rate_bits = parse_rate(rate) if rate else None
        self.python = python
        self.default_route = bool(default_route)
        self.ready_timeout = float(ready_timeout)
        self.state_dir = os.path.abspath(state_dir or os.path.join(DEFAULT_STATE_ROOT, name))
        self.info = None  # contents of STATE/cluster.json once created
        self.up_seconds = None
        self.down_seconds = None
        self._procs = {}  # node -> Popen of its launcher (only in the process that ran up())

    # ---- naming
    @property
    def bridge(self):
        return f"{self.name}br0"

    @property
    def node_names(self):
        return [f"{self.prefix}{i}" for i in range(1, self.count + 1)]

    @property
    def controller_name(self):
        return f"{self.name}-controller"

    @property
    def controller_address(self):
        return self.info["controller"] if self.info else None

    @property
    def nodes(self):
        """[(name, address), ...] in node order."""
        if not self.info:
            return []
        return [(n["name"], n["address"]) for n in self.info["nodes"]]

    @property
    def addresses(self):
        return dict(self.nodes)

    @property
    def pids(self):
        """{node: host pid of the node's init (sshd, pid 1 in the node)}."""
        if not self.info:
            return {}
        return {n["name"]: n.get("init_pid") for n in self.info["nodes"]}

    def _p(self, *parts):
        return os.path.join(self.state_dir, *parts)

    @property
    def cluster_json(self):
        return self._p("cluster.json")

    @property
    def inventory_path(self):
        return self._p("inventory.ini")

    @property
    def ssh_config_path(self):
        return self._p("ssh_config")

    @property
    def known_hosts_path(self):
        return self._p("known_hosts")

    @property
    def ssh_key(self):
        return self._p("id_ed25519")

    @property
    def registry_path(self):
        return os.path.join(REGISTRY_DIR, f"{self.name}.json")

    def node_dir(self, node):
        return self._p("nodes", node)

    def __repr__(self):
        return f"<Cluster {self.name} nodes={self.count} subnet={self.subnet} state={self.state_dir}>"

    # ---- attach / persistence
    @classmethod
    def attach(cls, name=DEFAULT_NAME, state_dir=None):
        """Handle on an existing cluster (from the registry, else the default state dir)."""
        reg = _read_json(os.path.join(REGISTRY_DIR, f"{name}.json")) or {}
        sd = state_dir or reg.get("state_dir") or os.path.join(DEFAULT_STATE_ROOT, name)
        info = _read_json(os.path.join(sd, "cluster.json"))
        if info:
            c = cls(name=name, nodes=max(1, len(info["nodes"])), prefix=info["prefix"],
                    subnet=info["subnet"], rate=info.get("rate"), state_dir=sd,
                    python=info.get("python", NODE_PYTHON))
            c.info = info
        else:
            c = cls(name=name, nodes=1, state_dir=sd)
        return c

    def exists(self):
        """True when anything of this cluster is known on the machine."""
        return (os.path.exists(self.registry_path) or os.path.exists(self._p(MARKER))
                or any(ns.startswith(f"{self.name}-") for ns in _netns_list())
                or self.bridge in _links())

    def _save(self):
        _write_file(self.cluster_json, json.dumps(self.info, indent=2) + "\n", 0o600)

    def _node_info(self, node):
        if not self.info:
            raise SimClusterError(f"cluster {self.name!r} is not up")
        for n in self.info["nodes"]:
            if n["name"] == node:
                return n
        raise SimClusterError(f"no node {node!r} in cluster {self.name!r} "
                              f"({', '.join(self.node_names)})")

    # ---- up
    def up(self, replace=False):
        """Create the cluster; on any failure, clean up what was made and raise."""
        t0 = time.monotonic()
        if os.geteuid() != 0:
            raise SimClusterError("simcluster needs root")
        missing = [t for t in REQUIRED_TOOLS if not shutil.which(t)] + \
            ([SSHD] if not os.access(SSHD, os.X_OK) else [])
        if missing:
            raise SimClusterError(f"missing tools: {', '.join(missing)} "
                                  "(Debian: iproute2 util-linux openssh-server openssh-client)")
        with _machine_lock():
            if self.exists():
                if not replace:
                    raise SimClusterError(
                        f"cluster {self.name!r} already exists (state dir {self.state_dir}): run "
                        f"'simcluster.py down --name {self.name}' first, or up with --replace")
                Cluster.attach(self.name).down()
                if os.path.exists(self._p(MARKER)):
                    Cluster(self.name, state_dir=self.state_dir).down()
            net = self._validate()  # no side effects yet
            try:
                self._create(net)
            except BaseException:
                try:
                    self.down()
                except Exception as e:  # noqa: BLE001
                    _log(f"cleanup after failed up also failed: {e}")
                raise
        self.up_seconds = time.monotonic() - t0
        return self

    def _check_state_dir(self):
        sd = self.state_dir
        if not _SAFE_PATH_RE.match(sd) or sd.rstrip("/") in ("", "/"):
            raise SimClusterError(f"state dir {sd!r}: use an absolute path of [A-Za-z0-9._/+-]")
        for d in OVERLAY_DIRS + READONLY_DIRS:
            if _is_under(sd, d) or _is_under(d, sd):
                raise SimClusterError(f"state dir {sd} must not be inside or contain {d} "
                                      "(overlaid/read-only in the nodes); default is "
                                      f"{DEFAULT_STATE_ROOT}/NAME")
        if os.path.exists(sd) and (not os.path.isdir(sd) or os.listdir(sd)):
            raise SimClusterError(f"state dir {sd} exists and is not empty")

    def _validate(self):
        """Check state dir, subnet and host names; returns the subnet (ip_network)."""
        self._check_state_dir()
        used = _used_networks()
        if str(self.subnet) == "auto":
            pool = ipaddress.ip_network(AUTO_SUBNET_POOL)
            for cand in pool.subnets(new_prefix=24):
                if not any(cand.overlaps(u) for u in used):
                    self.subnet = str(cand)
                    break
            else:
                raise SimClusterError(f"no free /24 left in {AUTO_SUBNET_POOL}")
        try:
            net = ipaddress.ip_network(self.subnet, strict=True)
        except ValueError as e:
            raise SimClusterError(f"bad subnet {self.subnet!r}: {e}") from None
        if net.version != 4 or not net.is_private:
            raise SimClusterError(f"subnet {net} must be a private IPv4 range")
        clash = sorted({str(u) for u in used if net.overlaps(u)})
        if clash:
            raise SimClusterError(f"subnet {net} overlaps {', '.join(clash)} already on this machine; "
                                  "pick another --subnet (or 'auto')")
        if net.num_addresses - 3 < self.count:
            raise SimClusterError(f"subnet {net} is too small for {self.count} nodes")
        self.subnet = str(net)
        taken = _hosts_names_outside_block(self.name) & set(self.node_names + [self.controller_name])
        if taken:
            raise SimClusterError(f"host names already in {HOSTS_FILE}: {', '.join(sorted(taken))} "
                                  "(another cluster with the same --prefix?)")
        return net

    def _create(self, net):
        hosts = list(net.hosts())
        os.makedirs(os.path.dirname(self.state_dir), mode=0o755, exist_ok=True)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        _write_file(self._p(MARKER), f"simcluster {self.name}\n")
        self.info = {
            "version": 1, "name": self.name, "prefix": self.prefix, "subnet": self.subnet,
            "prefixlen": net.prefixlen, "controller": str(hosts[0]), "bridge": self.bridge,
            "rate": self.rate, "rate_bits": self.rate_bits, "python": self.python,
            "default_route": self.default_route,
            "state_dir": self.state_dir, "phase": "creating", "created": time.time(),
            "netns_dir_existed": os.path.isdir(NETNS_DIR),
            "netns_dir_mounted": NETNS_DIR in _mountpoints(),
            "nodes": [{"name": nm, "address": str(hosts[i + 1]), "netns": f"{self.name}-{nm}",
                       "veth": f"{self.name}v{i + 1}"} for i, nm in enumerate(self.node_names)],
        }
        self._save()
        os.makedirs(REGISTRY_DIR, mode=0o755, exist_ok=True)
        _write_file(self.registry_path, json.dumps({"name": self.name, "state_dir": self.state_dir}) + "\n")

        self._make_files()
        self._make_network()
        entries = [(self.info["controller"], self.controller_name)]
        _hosts_edit(self.name, entries + [(addr, name) for name, addr in self.nodes])
        self._launch_nodes()
        self._wait_sshd()
        self.info["phase"] = "up"
        self._save()

    def _make_files(self):
        info = self.info
        # keys: cluster client key + one host key per node, generated in parallel
        jobs = [["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"simcluster-{self.name}",
                 "-f", self.ssh_key]]
        for n in info["nodes"]:
            d = self.node_dir(n["name"])
            os.makedirs(os.path.join(d, "ov", "etc", "upper", "ssh"), 0o755)
            jobs.append(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{n['name']}",
                         "-f", os.path.join(d, "ov", "etc", "upper", "ssh", "ssh_host_ed25519_key")])
        procs = [subprocess.Popen(j, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT) for j in jobs]
        for j, p in zip(jobs, procs):
            out = p.communicate(timeout=60)[0]
            if p.returncode != 0:
                raise SimClusterError(f"{shlex.join(j)} failed: {out.decode(errors='replace')}")
        with open(self.ssh_key + ".pub") as f:
            client_pub = f.read().strip()
        with open(self.ssh_key) as f:
            client_priv = f.read()

        known = []
        for n in info["nodes"]:
            with open(os.path.join(self.node_dir(n["name"]), "ov", "etc", "upper", "ssh",
                                   "ssh_host_ed25519_key.pub")) as f:
                ktype, kdata = f.read().split()[:2]
            known.append(f"{n['name']},{n['address']} {ktype} {kdata}")
        known_text = "\n".join(known) + "\n"
        _write_file(self.known_hosts_path, known_text)

        root_shadow = None
        try:
            with open("/etc/shadow") as f:
                shadow = f.read()
            if re.search(r"^root:!", shadow, re.M):  # locked root: sshd (UsePAM no) refuses it
                root_shadow = re.sub(r"^root:![^:]*:", "root:*:", shadow, flags=re.M)
        except OSError:
            pass

        for n in info["nodes"]:
            d = self.node_dir(n["name"])
            for target in OVERLAY_DIRS:
                slug = target.strip("/").replace("/", "-")
                st = os.stat(target)
                for part in ("upper", "work"):
                    p = os.path.join(d, "ov", slug, part)
                    os.makedirs(p, exist_ok=True)
                    if part == "upper":  # the merged dir takes the upper dir's owner/mode
                        os.chown(p, st.st_uid, st.st_gid)
                        os.chmod(p, st.st_mode & 0o7777)
            for target, slug, mode in PRIVATE_DIRS:
                p = os.path.join(d, "fs", slug)
                os.makedirs(p, exist_ok=True)
                os.chmod(p, mode)
            run = os.path.join(d, "fs", "run")
            for sub, mode in (("sshd", 0o755), ("lock", 0o1777)):
                os.makedirs(os.path.join(run, sub), exist_ok=True)
                os.chmod(os.path.join(run, sub), mode)
            rs = os.path.join(d, "fs", "root-ssh")
            _write_file(os.path.join(rs, "authorized_keys"), client_pub + "\n", 0o600)
            _write_file(os.path.join(rs, "id_ed25519"), client_priv, 0o600)
            _write_file(os.path.join(rs, "id_ed25519.pub"), client_pub + "\n", 0o644)
            _write_file(os.path.join(rs, "known_hosts"), known_text, 0o644)
            etc = os.path.join(d, "ov", "etc", "upper")
            _write_file(os.path.join(etc, "hostname"), n["name"] + "\n")
            # No DNS server inside the cluster: names come from /etc/hosts; lookups of
            # anything else go to the node's own loopback and fail fast.
            _write_file(os.path.join(etc, "resolv.conf"),
                        "# simcluster: no DNS in the simulated cluster (names: /etc/hosts)\n"
                        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
            if root_shadow is not None:
                _write_file(os.path.join(etc, "shadow"), root_shadow, 0o640)
            _write_file(os.path.join(etc, "ssh", "sshd_config"), self._sshd_config(n))
            init = {
                "hostname": n["name"], "node_dir": d,
                "readonly": list(READONLY_DIRS),
                "overlays": [{"target": t,
                              "upper": os.path.join(d, "ov", t.strip("/").replace("/", "-"), "upper"),
                              "work": os.path.join(d, "ov", t.strip("/").replace("/", "-"), "work")}
                             for t in OVERLAY_DIRS],
                "binds": [{"target": t, "source": os.path.join(d, "fs", slug)}
                          for t, slug, _mode in PRIVATE_DIRS],
            }
            _write_file(os.path.join(d, "init.json"), json.dumps(init, indent=2) + "\n")

        self._write_client_files()

    def _sshd_config(self, n):
        return "\n".join([
            f"# simcluster {self.name}: sshd of node {n['name']} (pid 1 of the node)",
            f"ListenAddress {n['address']}:22",
            "ListenAddress 127.0.0.1:22",
            "HostKey /etc/ssh/ssh_host_ed25519_key",
            "PidFile /run/sshd.pid",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "AuthorizedKeysFile .ssh/authorized_keys",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "X11Forwarding no",
            "PrintMotd no",
            "PrintLastLog no",
            "AcceptEnv LANG LC_*",
            "Subsystem sftp internal-sftp",
            "MaxStartups 100:30:300",
            "MaxSessions 100",
            "LoginGraceTime 30",
            "LogLevel INFO",
            "",
        ])

    def _write_client_files(self):
        key = self.ssh_key
        common = ("-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null")
        inv = [f"# simcluster {self.name}: {self.count} nodes on {self.subnet} "
               f"(controller {self.info['controller']} = {self.controller_name})",
               "[compute]"]
        for name, addr in self.nodes:
            inv.append(f"{name} ansible_host={addr} ansible_user=root ansible_ssh_private_key_file={key} "
                       f"ansible_ssh_common_args='{common}' ansible_python_interpreter={self.python}")
        _write_file(self.inventory_path, "\n".join(inv) + "\n")

        names = " ".join(self.addresses)
        addrs = " ".join(self.addresses.values())
        cfg = [f"# simcluster {self.name}: ssh -F {self.ssh_config_path} {self.node_names[0]} hostname"]
        for name, addr in self.nodes:
            cfg += [f"Host {name}", f"    HostName {addr}"]
        cfg += [f"Host {names} {addrs}",
                "    User root",
                f"    IdentityFile {key}",
                "    IdentitiesOnly yes",
                f"    UserKnownHostsFile {self.known_hosts_path}",
                "    GlobalKnownHostsFile /dev/null",
                "    StrictHostKeyChecking yes",
                "    CheckHostIP no",
                "    BatchMode yes",
                "    ConnectTimeout 10",
                "    LogLevel ERROR"]
        _write_file(self.ssh_config_path, "\n".join(cfg) + "\n")

    def _make_network(self):
        info, br, plen = self.info, self.bridge, self.info["prefixlen"]
        nodes = info["nodes"]
        info["network_started"] = True
        self._save()
        # 1) bridge + namespaces; IPv6 off everywhere before links come up
        _ip_batch([f"link add {br} type bridge stp_state 0"] + [f"netns add {n['netns']}" for n in nodes])
        _disable_ipv6(br)
        for n in nodes:
            with _in_netns(n["netns"]):
                _disable_ipv6("default")  # eth0, created below, inherits it; lo keeps ::1
        # 2) veth pairs, node end named eth0 directly inside the node netns
        lines = []
        for n in nodes:
            lines += [f"link add {n['veth']} type veth peer name eth0 netns {n['netns']}",
                      f"link set {n['veth']} master {br}"]
        _ip_batch(lines)
        for n in nodes:
            _disable_ipv6(n["veth"])
        _ip_batch([f"addr add {info['controller']}/{plen} dev {br}", f"link set {br} up"]
                  + [f"link set {n['veth']} up" for n in nodes])
        # 3) inside each node (in parallel): lo, eth0 address; optional tc on both ends
        qdisc = None
        if self.rate_bits:
            burst = max(self.rate_bits // 8 // 50, 15140)  # ~20 ms of traffic, >= 10 full frames
            qdisc = f"root tbf rate {self.rate_bits}bit burst {burst} latency 50ms"
            _ip_batch([f"qdisc replace dev {n['veth']} {qdisc}" for n in nodes], tool="tc")
        jobs = []
        for n in nodes:
            # --default-route: on-link default route (no gateway) so tools that look for
            # one (Ansible's ansible_default_ipv4) find eth0; packets to other
            # addresses never get an ARP answer, so they cannot leave the bridge.
            route = "route add default dev eth0\n" if self.default_route else ""
            jobs.append((["ip", "-n", n["netns"], "-batch", "-"],
                         f"link set lo up\naddr add {n['address']}/{plen} dev eth0\n"
                         f"link set eth0 up\n{route}"))
            if qdisc:
                jobs.append((["tc", "-n", n["netns"], "-batch", "-"], f"qdisc replace dev eth0 {qdisc}\n"))
        procs = [(argv, inp, subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True))
                 for argv, inp in jobs]
        errors = []
        for argv, inp, p in procs:
            out = p.communicate(inp, timeout=60)[0]
            if p.returncode != 0:
                errors.append(f"{shlex.join(argv)}: {out.strip()}")
        if errors:
            raise SimClusterError("network setup failed: " + "; ".join(errors))

    def _launch_nodes(self):
        env = {"PATH": NODE_PATH, "LANG": "C.UTF-8"}
        me = os.path.abspath(__file__)
        for n in self.info["nodes"]:
            d = self.node_dir(n["name"])
            argv = ["ip", "netns", "exec", n["netns"],
                    "unshare", "--uts", "--mount", "--pid", "--fork", "--kill-child",
                    "--propagation", "private",
                    sys.executable, "-I", "-S", me, "_node-init", os.path.join(d, "init.json")]
            with open(os.path.join(d, "node.log"), "ab") as log:
                p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True, close_fds=True)
            self._procs[n["name"]] = p
            st = _proc_stat(p.pid)
            n["launcher_pid"], n["launcher_start"] = p.pid, (st[1] if st else None)
        self._save()

        deadline = time.monotonic() + self.ready_timeout
        pending = {n["name"]: n for n in self.info["nodes"]}
        while pending:
            for name, n in list(pending.items()):
                d = self.node_dir(name)
                ready = _read_json(os.path.join(d, "ready"))
                if ready:
                    pid = ready["pid"]
                    st = _proc_stat(pid)
                    n["init_pid"], n["init_start"] = pid, (st[1] if st else None)
                    n["ns"] = {k: _ns_inode(pid, k) for k in ("net", "mnt", "pid", "uts")}
                    del pending[name]
                    continue
                err = _read_json(os.path.join(d, "error"))
                if err or self._procs[name].poll() is not None:
                    raise SimClusterError(f"node {name} failed to start: "
                                          f"{(err or {}).get('error', 'launcher exited')}\n"
                                          f"{self._log_tail(name)}")
            if pending and time.monotonic() > deadline:
                raise SimClusterError(f"timeout waiting for node init of {', '.join(sorted(pending))}")
            if pending:
                time.sleep(0.02)
        self._save()

    def _log_tail(self, node, lines=15):
        try:
            with open(os.path.join(self.node_dir(node), "node.log"), errors="replace") as f:
                tail = f.read().splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return "\n".join(f"  {node}| {line}" for line in tail)

    def _wait_sshd(self):
        deadline = time.monotonic() + self.ready_timeout
        pending = dict(self.nodes)
        while pending:
            for name, addr in list(pending.items()):
                if _ssh_banner(addr, 22, timeout=2.0):
                    del pending[name]
                    continue
                n = self._node_info(name)
                if not _alive(n.get("init_pid"), n.get("init_start")):
                    raise SimClusterError(f"sshd of node {name} died:\n{self._log_tail(name)}")
            if pending:
                if time.monotonic() > deadline:
                    raise SimClusterError(f"timeout waiting for sshd on {', '.join(sorted(pending))}:\n"
                                          + "\n".join(self._log_tail(n, 5) for n in sorted(pending)))
                time.sleep(0.05)

    # ---- down
    def down(self, grace=3.0):
        """Remove everything of this cluster.  Safe to call twice and after a failed up()."""
        t0 = time.monotonic()
        with _machine_lock():
            if not self.info:
                other = Cluster.attach(self.name, state_dir=self.state_dir
                                       if os.path.exists(self._p(MARKER)) else None)
                self.info, self.state_dir = other.info, other.state_dir
            info = self.info or {}
            nodes = list(info.get("nodes", []))
            netns = {n["netns"] for n in nodes} | {ns for ns in _netns_list() if ns.startswith(f"{self.name}-")}
            links = _links()
            veths = {n["veth"] for n in nodes} | {ln for ln in links if re.fullmatch(rf"{self.name}v\d+", ln)}

            self._kill_all(nodes, netns, grace)

            lines = [f"link del {v}" for v in sorted(veths) if v in links]
            if self.bridge in links:
                lines.append(f"link del {self.bridge}")
            lines += [f"netns del {ns}" for ns in sorted(netns) if os.path.exists(os.path.join(NETNS_DIR, ns))]
            _ip_batch(lines, force=True)
            _hosts_edit(self.name, None)
            self._remove_state_dir()
            with contextlib.suppress(OSError):
                os.unlink(self.registry_path)
            with contextlib.suppress(OSError):
                os.rmdir(REGISTRY_DIR)
            # iproute2 bind-mounts /run/netns on itself on first use: undo that if we caused it
            if info and not info.get("netns_dir_mounted") and not _netns_list():
                if NETNS_DIR in _mountpoints():
                    _umount(NETNS_DIR)
                if not info.get("netns_dir_existed") and NETNS_DIR not in _mountpoints():
                    with contextlib.suppress(OSError):
                        os.rmdir(NETNS_DIR)
            leftovers = self._leftovers(nodes)
            self.info = None
        self.down_seconds = time.monotonic() - t0
        if leftovers:
            raise SimClusterError(f"cluster {self.name!r}: left behind after down: {leftovers}")

    def _victims(self, nodes, netns):
        """Host pids belonging to the cluster.

        Found by: recorded pids (checked against their start time); membership
        in one of the cluster's namespaces (its netns files; recorded mnt/pid
        namespaces while their init is alive); a launcher command line naming
        our state dir (processes of a half-started node that are not yet in the
        netns); a mount namespace holding our state dir's mounts."""
        me = os.getpid()
        my_mnt = _ns_inode(me, "mnt")
        pids, ns_ids = set(), set()
        for n in nodes:
            for key in ("init", "launcher"):
                if _alive(n.get(f"{key}_pid"), n.get(f"{key}_start")):
                    pids.add(n[f"{key}_pid"])
            # recorded ns inodes are only trusted while the node init still holds them
            if n.get("ns") and _alive(n.get("init_pid"), n.get("init_start")):
                ns_ids.update((k, v) for k, v in n["ns"].items() if k != "uts" and v)
        for ns in netns:
            with contextlib.suppress(OSError):
                ns_ids.add(("net", os.stat(os.path.join(NETNS_DIR, ns)).st_ino))
        launcher_mark = b"_node-init\0" + self.state_dir.encode() + b"/"
        mount_mark = f"{self.state_dir}/nodes/"
        for pid in _all_pids():
            if pid == me or pid in pids:
                continue
            if any((kind, _ns_inode(pid, kind)) in ns_ids for kind in ("net", "mnt", "pid")):
                pids.add(pid)
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if launcher_mark in f.read():
                        pids.add(pid)
                        continue
                if _ns_inode(pid, "mnt") not in (my_mnt, None):
                    with open(f"/proc/{pid}/mountinfo") as f:
                        if mount_mark in f.read():
                            pids.add(pid)
            except OSError:
                pass
        return {p for p in pids if _alive(p)}

    def _kill_all(self, nodes, netns, grace):
        """SIGTERM the processes running inside the nodes (not their init) and give
        them ``grace`` seconds, like a shutdown; then SIGTERM everything (sshd = the
        node init exits at once, taking its pid namespace along); then SIGKILL."""
        def inner(pid):
            nspid = _nspid(pid)
            return bool(nspid) and len(nspid) > 1 and nspid[-1] != 1

        for scope, sig, wait in (("inner", signal.SIGTERM, grace), ("all", signal.SIGTERM, 1.0),
                                 ("all", signal.SIGKILL, 5.0), ("all", signal.SIGKILL, 5.0)):
            victims = self._victims(nodes, netns)
            if scope == "inner":
                victims = {p for p in victims if inner(p)}
            if not victims:
                if scope == "inner":
                    continue
                break
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(_alive(p) for p in victims):
                self._reap()
                time.sleep(0.02)
        self._reap(wait=True)

    def _reap(self, wait=False):
        for name, p in list(self._procs.items()):
            try:
                if (p.wait(timeout=2) if wait else p.poll()) is not None:
                    del self._procs[name]
            except subprocess.TimeoutExpired:
                pass

    def _remove_state_dir(self):
        sd = self.state_dir
        if not os.path.isdir(sd):
            return
        for mp in sorted((m for m in _mountpoints() if _is_under(m, sd)), key=len, reverse=True):
            _umount(mp, detach=True)
        if os.path.exists(os.path.join(sd, MARKER)) or not os.listdir(sd):
            nodes = os.path.join(sd, "nodes")
            if os.path.isdir(nodes):  # many small dirs: remove the node dirs in parallel
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(lambda d: shutil.rmtree(os.path.join(nodes, d), ignore_errors=True),
                                  os.listdir(nodes)))
            shutil.rmtree(sd, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(sd))  # DEFAULT_STATE_ROOT when empty
        else:
            _log(f"not removing {sd}: no {MARKER} in it")

    def _leftovers(self, nodes):
        left = []
        ns = [x for x in _netns_list() if x.startswith(f"{self.name}-")]
        if ns:
            left.append(f"netns {ns}")
        links = [ln for ln in _links() if ln == self.bridge or re.fullmatch(rf"{self.name}v\d+", ln)]
        if links:
            left.append(f"links {links}")
        pids = [n[k] for n in nodes for k in ("init_pid", "launcher_pid")
                if _alive(n.get(k), n.get(k.replace("_pid", "_start")))]
        if pids:
            left.append(f"pids {pids}")
        with open(HOSTS_FILE) as f:
            if HOSTS_BEGIN.format(self.name) in f.read():
                left.append("/etc/hosts block")
        return left

    # ---- use
    def exec_argv(self, node, argv):
        """argv that runs ``argv`` inside ``node`` (its net, mount, uts and pid namespaces).

        The command gets SIGKILL when the nsenter process dies (so killing a
        Popen of it, or a subprocess timeout, also stops the command in the node)."""
        n = self._node_info(node)
        if not _alive(n.get("init_pid"), n.get("init_start")):
            raise SimClusterError(f"node {node} is not running (init pid {n.get('init_pid')})")
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        return ["nsenter", f"--target={n['init_pid']}", "--net", "--mount", "--uts", "--pid",
                "--", "setpriv", "--pdeathsig", "KILL", "--"] + list(argv)

    @staticmethod
    def node_env(extra=None):
        env = {"PATH": NODE_PATH, "HOME": "/root", "USER": "root", "LOGNAME": "root",
               "SHELL": "/bin/bash", "LANG": "C.UTF-8", "TERM": os.environ.get("TERM", "dumb")}
        env.update(extra or {})
        return env

    def exec(self, node, argv, *, check=False, capture_output=True, text=True, timeout=None,
             input=None, env=None, **kw):
        """Run argv (list, or str for /bin/sh -c) in ``node``; returns CompletedProcess.

        ``env`` adds to a clean node environment (PATH, HOME=/root, LANG ...)."""
        return subprocess.run(self.exec_argv(node, argv), check=check, capture_output=capture_output,
                              text=text, timeout=timeout, input=input, env=self.node_env(env), **kw)

    def popen(self, node, argv, *, env=None, **kw):
        """subprocess.Popen of argv inside ``node`` (kill the Popen to stop it)."""
        return subprocess.Popen(self.exec_argv(node, argv), env=self.node_env(env), **kw)

    def ssh_argv(self, node, command=None):
        argv = ["ssh", "-F", self.ssh_config_path, node]
        if command is not None:
            argv += ["--", command if isinstance(command, str) else shlex.join(command)]
        return argv

    def ssh(self, node, command, *, check=False, capture_output=True, text=True, timeout=60, **kw):
        """Run a command on ``node`` through its sshd, as root with the cluster key."""
        return subprocess.run(self.ssh_argv(node, command), check=check, capture_output=capture_output,
                              text=text, timeout=timeout, stdin=subprocess.DEVNULL, **kw)

    def status(self):
        info = self.info or {}
        nodes = []
        for n in info.get("nodes", []):
            nodes.append({"name": n["name"], "address": n["address"], "pid": n.get("init_pid"),
                          "alive": _alive(n.get("init_pid"), n.get("init_start"))})
        return {"name": self.name, "state_dir": self.state_dir, "phase": info.get("phase"),
                "subnet": info.get("subnet"), "bridge": self.bridge, "rate": info.get("rate"),
                "controller": info.get("controller"), "inventory": self.inventory_path,
                "ssh_config": self.ssh_config_path, "nodes": nodes}

    def summary(self):
        nodes = self.nodes
        lines = [f"cluster {self.name!r}: {len(nodes)} nodes up"
                 + (f" in {self.up_seconds:.1f}s" if self.up_seconds else ""),
                 f"  bridge    {self.bridge} {self.controller_address}/{self.info['prefixlen']} "
                 f"({self.controller_name}), rate cap: {self.rate or 'none'}",
                 f"  nodes     {nodes[0][0]} {nodes[0][1]} .. {nodes[-1][0]} {nodes[-1][1]}"
                 if len(nodes) > 1 else f"  node      {nodes[0][0]} {nodes[0][1]}",
                 f"  state     {self.state_dir}",
                 f"  inventory {self.inventory_path}",
                 f"  ssh       ssh -F {self.ssh_config_path} {nodes[0][0]} hostname",
                 f"  exec      {sys.executable} {os.path.abspath(__file__)} exec --name {self.name} "
                 f"{nodes[0][0]} -- hostname"]
        return "\n".join(lines)

    # ---- context manager
    def __enter__(self):
        if not self.info:
            self.up()
        return self

    def __exit__(self, *exc):
        self.down()
        return False


def _ssh_banner(addr, port, timeout):
    try:
        with socket.create_connection((addr, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


@contextlib.contextmanager
def cluster(name=DEFAULT_NAME, nodes=16, replace=False, **kw):
    """``with cluster("sim", 4, subnet="auto") as c: ...``: up on enter, down on exit."""
    c = Cluster(name, nodes, **kw)
    c.up(replace=replace)
    try:
        yield c
    finally:
        c.down()


# --------------------------------------------------------------------------- CLI


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_node-init"]:
        _node_init(argv[1])
        return 1
    ap = argparse.ArgumentParser(prog="simcluster.py", description="Simulated HPC cluster on one machine "
                                 "(network/uts/mount/pid namespaces + sshd per node).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up", help="create a cluster")
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--name", default=DEFAULT_NAME, help="cluster name, [a-z][a-z0-9]{0,7} (default %(default)s)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="node name prefix (default %(default)s)")
    p.add_argument("--subnet", default=DEFAULT_SUBNET,
                   help=f"private IPv4 subnet, or 'auto' = first free /24 of {AUTO_SUBNET_POOL} "
                        "(default %(default)s)")
    p.add_argument("--rate", help="per-node link cap both ways, tc syntax (e.g. 1gbit, 100mbit)")
    p.add_argument("--state-dir", help=f"default {DEFAULT_STATE_ROOT}/NAME")
    p.add_argument("--python", default=NODE_PYTHON, help="ansible_python_interpreter (default %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the nodes")
    p.add_argument("--default-route", action="store_true",
                   help="give nodes an on-link default route via eth0 (no gateway: nothing leaves "
                        "the bridge) so that e.g. ansible_default_ipv4 is set")
    p.add_argument("--replace", action="store_true", help="down an existing cluster of that name first")
    p = sub.add_parser("down", help="remove a cluster (safe to repeat)")
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--state-dir")
    p = sub.add_parser("status", help="show clusters")
    p.add_argument("--name")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("exec", help="run a command inside a node: exec NODE -- CMD...")
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("node")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)

    try:
        if a.cmd == "up":
            c = Cluster(a.name, a.nodes, prefix=a.prefix, subnet=a.subnet, rate=a.rate,
                        state_dir=a.state_dir, python=a.python, ready_timeout=a.timeout,
                        default_route=a.default_route)
            c.up(replace=a.replace)
            with contextlib.suppress(BrokenPipeError):
                print(c.summary(), flush=True)
        elif a.cmd == "down":
            c = Cluster.attach(a.name, state_dir=a.state_dir)
            if not c.exists():
                print(f"cluster {a.name!r}: nothing to remove")
                return 0
            c.down()
            print(f"cluster {a.name!r}: down in {c.down_seconds:.1f}s")
        elif a.cmd == "status":
            names = [a.name] if a.name else [r["name"] for r in list_clusters()]
            stats = [Cluster.attach(n).status() for n in names]
            if a.json:
                print(json.dumps(stats, indent=2))
            elif not stats:
                print("no clusters")
            for s in ([] if a.json else stats):
                alive = sum(n["alive"] for n in s["nodes"])
                print(f"{s['name']}: {s['phase'] or 'absent'}, {alive}/{len(s['nodes'])} nodes alive, "
                      f"subnet {s['subnet']}, bridge {s['bridge']}, rate {s['rate'] or 'none'}, "
                      f"state {s['state_dir']}")
                for n in s["nodes"]:
                    print(f"  {n['name']:<8} {n['address']:<15} pid {n['pid']} "
                          f"{'up' if n['alive'] else 'DOWN'}")
            return 0 if all(s["nodes"] and all(n["alive"] for n in s["nodes"]) for s in stats) else 1
        elif a.cmd == "exec":
            cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
            if not cmd:
                ap.error("exec: missing command (exec NODE -- CMD...)")
            c = Cluster.attach(a.name)
            full = c.exec_argv(a.node, cmd)
            os.execvpe(full[0], full, c.node_env())
    except SimClusterError as e:
        print(f"simcluster: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
