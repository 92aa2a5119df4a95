# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# Node side of the hpc.relaytree.relay key material, run by relay_python with `-c`: writes several
# small files (the node's certificate and key, the CA, the controller's public keys) in one remote
# call instead of one copy task each. The request comes on stdin (it holds a private key: the task
# is no_log): {"dirs": [{"path", "mode"}], "paths": [...], "modes": [...], "contents": [...],
# "check": bool} (parallel lists: one entry per file).
# Owner root:root. A file is rewritten (atomically, in its directory) only when its content, mode
# or owner differ. Prints {"changed": [paths]}.
import json
import os
import sys

req = json.load(sys.stdin)
check = bool(req.get("check"))
changed = []

for d in req.get("dirs", []):
    path, mode = d["path"], int(d["mode"], 8)
    if not os.path.isdir(path):
        changed.append(path)
        if not check:
            os.makedirs(path, mode)
            os.chmod(path, mode)
            os.chown(path, 0, 0)
        continue
    st = os.stat(path)
    if (st.st_mode & 0o7777, st.st_uid, st.st_gid) != (mode, 0, 0):
        changed.append(path)
        if not check:
            os.chmod(path, mode)
            os.chown(path, 0, 0)

for path, mode, content in zip(req.get("paths", []), req.get("modes", []), req.get("contents", [])):
    mode, data = int(mode, 8), content.encode("utf-8")
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            same = fh.read() == data and (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, 0, 0)
    except (IOError, OSError):
        same = False
    if same:
        continue
    changed.append(path)
    if check:
        continue
    tmp = "%s.tmp%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fchown(fd, 0, 0)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)

print(json.dumps({"changed": changed}))
