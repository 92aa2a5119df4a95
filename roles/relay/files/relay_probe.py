# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# Node probe of the hpc.relaytree.relay role, run by relay_python with `-c`: what Python and
# platform the node has, what relaytree install is there, whether the supervisor runs. Read only.
# One JSON argument in, one JSON line out. Keep it runnable on any Python 3 (the version check
# must be able to say "too old").
import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys

args = json.loads(sys.argv[1])
out = {
    "python": platform.python_version(),
    "version": list(sys.version_info[:2]),
    "implementation": platform.python_implementation().lower(),
    "machine": platform.machine(),
    "systemd": os.path.isdir("/run/systemd/system"),
}
# The running glibc, as pip sees it (platform.libc_ver() reads the interpreter binary instead).
try:
    libc, libc_version = os.confstr("CS_GNU_LIBC_VERSION").split()
except (AttributeError, ValueError, OSError):
    libc, libc_version = platform.libc_ver()
out["libc"], out["libc_version"] = libc or "unknown", libc_version or ""
out["venv_module"] = importlib.util.find_spec("venv") is not None

venv_python = os.path.join(args["venv"], "bin", "python")
out["venv_version"] = None
if os.path.exists(venv_python):
    try:
        proc = subprocess.run([venv_python, "-c", "import relaytree, sys; sys.stdout.write(relaytree.__version__)"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=60, check=False)
        if proc.returncode == 0:
            out["venv_version"] = proc.stdout.decode()
    except (OSError, subprocess.SubprocessError):
        pass
try:
    with open(args["stamp"]) as fh:
        out["stamp"] = json.load(fh)
except (IOError, OSError, ValueError):
    out["stamp"] = {}

# The supervisor holds a flock on its pid file for as long as it runs.
running, pid = False, None
try:
    fd = os.open(args["pid_file"], os.O_RDONLY)
except (IOError, OSError):
    fd = None
if fd is not None:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except (IOError, OSError):
        running = True
        try:
            pid = int(os.read(fd, 64).split()[0])
        except (ValueError, IndexError):
            pass
    os.close(fd)
out["supervisor"] = {"running": running, "pid": pid}

# The role's paths: whether they exist, their mode, owner and (files) sha1, so that the role can
# skip tasks whose result is already there; for state=absent, what to remove (a directory that is
# a mount point is emptied instead).
out["paths"], out["remove"] = {}, []
for path in args.get("paths", []):
    entry = {"exists": os.path.lexists(path), "mount": os.path.ismount(path)}
    if entry["exists"]:
        st = os.lstat(path)
        entry.update(mode="%04o" % (st.st_mode & 0o7777), uid=st.st_uid, gid=st.st_gid,
                     dir=os.path.isdir(path) and not os.path.islink(path))
        if os.path.isfile(path) and not os.path.islink(path) and st.st_size < (1 << 20):
            with open(path, "rb") as fh:
                entry["sha1"] = hashlib.sha1(fh.read()).hexdigest()
    out["paths"][path] = entry
    if entry["mount"] and os.path.isdir(path):
        todo = sorted(os.path.join(path, name) for name in os.listdir(path))
    else:
        todo = [path] if entry["exists"] else []
    out["remove"].extend(p for p in todo if p not in out["remove"])
print(json.dumps(out))
