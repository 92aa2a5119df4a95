# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Controller side of the hpc.relaytree.relay role (run with ansible_playbook_python).

One JSON object in on stdin, one JSON object out on stdout; ``changed`` says
whether the controller cache or the PKI changed. Standard library + pip only.

``artifacts``
    * The relaytree wheel of THIS collection: the files that make the wheel
      (pyproject.toml, README, LICENSE, src/) are hashed; a wheel is built with
      ``pip wheel --no-deps`` from a copy of them (the collection directory is
      never written to) only when no wheel of that hash is in the cache.
      ``SOURCE_DATE_EPOCH`` makes the build reproducible.
    * For ``mode: wheelhouse``: one wheelhouse per target (Python X.Y, machine,
      glibc) with binary wheels only (``pip download --only-binary=:all:
      --python-version X.Y --platform manylinux_2_N_<machine> ...``), cached
      under a key that includes the requirement list; packed into one
      deterministic tar (one transfer per node). pip evaluates environment
      markers with the controller's interpreter, not the target's, so the
      requirements are closed here: markers are evaluated for the target and
      what the downloaded wheels need but lack is downloaded in another round.
    * ``wheelhouse: DIR`` instead: the user's own wheels, packed as they are.

``pki``
    ``relaytree keys init`` (the controller's relaytree CLI; the collection's
    src/ when relaytree is not importable) for the given node names and
    certificate addresses. Existing keys and certificates are kept.
"""

from __future__ import annotations

import email.parser
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01, the oldest date a zip file can hold
WHEEL_SOURCES = ("pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in")
WHEEL_SOURCE_GLOBS = re.compile(r"^(README|LICEN[CS]E|COPYING|NOTICE|AUTHORS)", re.IGNORECASE)
SKIP_DIRS = {"__pycache__", "build", "dist"}
BOOTSTRAP = ("pip",)  # venvs are created --without-pip and get pip from the wheelhouse
MAX_ROUNDS = 6


class Failure(Exception):
    pass


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_json(path: str, data) -> None:
    tmp = "%s.tmp%d" % (path, os.getpid())
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _run(argv, env=None, what="command"):
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise Failure("%s failed (rc=%d): %s\n%s" % (what, proc.returncode, " ".join(argv),
                                                     (proc.stdout + proc.stderr)[-4000:]))
    return proc.stdout


# --------------------------------------------------------------------------- the relaytree wheel


def _wheel_source_files(root: str):
    """Relative paths of every file that can end up in the wheel."""
    files = [name for name in WHEEL_SOURCES if os.path.isfile(os.path.join(root, name))]
    files += sorted(n for n in os.listdir(root) if WHEEL_SOURCE_GLOBS.match(n) and os.path.isfile(os.path.join(root, n)))
    src = os.path.join(root, "src")
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            if name.endswith((".pyc", ".pyo")):
                continue
            files.append(os.path.relpath(os.path.join(dirpath, name), root))
    return files


def source_hash(root: str):
    if not os.path.isfile(os.path.join(root, "pyproject.toml")) or not os.path.isdir(os.path.join(root, "src")):
        raise Failure("%s is not the collection root (no pyproject.toml and src/): the relay role deploys the "
                      "relaytree package shipped in the collection" % root)
    h = hashlib.sha256()
    files = _wheel_source_files(root)
    for rel in files:
        h.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest(), files


def _build_isolation(choice) -> bool:
    """Isolated builds fetch setuptools from the index; skip that when the controller has it."""
    if choice in ("always", "never"):
        return choice == "always"
    if importlib.util.find_spec("setuptools") is None:
        return True
    import setuptools
    try:
        major = int(setuptools.__version__.split(".")[0])
    except ValueError:
        return True
    return major < 61


def _prune(directory: str, keep: int) -> None:
    """Keep the ``keep`` most recent wheel directories (one per source hash)."""
    entries = sorted((e for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("build-")),
                     key=lambda e: e.stat().st_mtime, reverse=True)
    for entry in entries[keep:]:
        shutil.rmtree(entry.path, ignore_errors=True)


def wheel_metadata(path: str) -> dict:
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(zf.read(meta).decode("utf-8"))
    return {"name": msg["Name"], "version": msg["Version"], "requires": msg.get_all("Requires-Dist") or []}


def build_wheel(root: str, cache: str, isolation) -> dict:
    digest, files = source_hash(root)
    out = os.path.join(cache, "dist", digest[:20])
    wheels = sorted(f for f in os.listdir(out) if f.endswith(".whl")) if os.path.isdir(out) else []
    built = False
    if len(wheels) != 1:
        os.makedirs(os.path.join(cache, "dist"), exist_ok=True)
        work = tempfile.mkdtemp(prefix="build-", dir=os.path.join(cache, "dist"))
        try:
            tree = os.path.join(work, "src-tree")
            for rel in files:
                dest = os.path.join(tree, rel)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copyfile(os.path.join(root, rel), dest)
            env = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH, PIP_DISABLE_PIP_VERSION_CHECK="1")
            argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q",
                    "-w", os.path.join(work, "out"), tree]
            if not _build_isolation(isolation):
                argv.insert(4, "--no-build-isolation")
            _run(argv, env=env, what="building the relaytree wheel")
            wheels = [f for f in os.listdir(os.path.join(work, "out")) if f.endswith(".whl")]
            if len(wheels) != 1:
                raise Failure("pip wheel made %r, expected one relaytree wheel" % wheels)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(os.path.join(work, "out"), out)
            built = True
            _prune(os.path.join(cache, "dist"), keep=5)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    path = os.path.join(out, wheels[0])
    meta = wheel_metadata(path)
    return {"path": path, "name": wheels[0], "sha256": _sha256(path), "source_hash": digest,
            "version": meta["version"], "requires": meta["requires"], "built": built}


# --------------------------------------------------------------------------- wheelhouse


def _packaging():
    try:
        from packaging.markers import Marker
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
    except ImportError:  # pip always carries it
        from pip._vendor.packaging.markers import Marker
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.utils import canonicalize_name
    return Marker, Requirement, canonicalize_name


def target_env(target: dict) -> dict:
    version = target["python"]
    machine = target["machine"]
    return {"implementation_name": "cpython", "implementation_version": version + ".0", "os_name": "posix",
            "platform_machine": machine, "platform_python_implementation": "CPython", "platform_release": "",
            "platform_system": "Linux", "platform_version": "", "python_full_version": version + ".0",
            "python_version": version, "sys_platform": "linux", "extra": ""}


def for_target(requires, env: dict):
    """Requirement strings without markers, for those whose marker holds on the target."""
    _Marker, Requirement, _canon = _packaging()
    out = []
    for text in requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        req.marker = None
        out.append(str(req))
    return out


def platforms(target: dict):
    machine = target["machine"]
    if target.get("libc") != "glibc" or not re.match(r"^\d+\.\d+", target.get("libc_version") or ""):
        raise Failure("node platform %s/%s %s: only glibc (manylinux) nodes get a downloaded wheelhouse; give "
                      "relay_wheelhouse (a directory of wheels for the nodes)"
                      % (machine, target.get("libc") or "unknown libc", target.get("libc_version") or ""))
    major, minor = (int(x) for x in target["libc_version"].split(".")[:2])
    if major != 2 or minor < 17:
        raise Failure("glibc %s on the nodes is older than manylinux2014 (2.17)" % target["libc_version"])
    tags = ["manylinux_2_%d_%s" % (m, machine) for m in range(minor, 16, -1)]
    return tags + ["manylinux2014_%s" % machine]


def _downloaded(directory: str):
    """{canonical project name: wheel file} of the wheels in directory."""
    _Marker, _Requirement, canon = _packaging()
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".whl"):
            out[canon(name.split("-")[0])] = name
    return out


def download_wheelhouse(cache: str, target: dict, requires, pip_args) -> dict:
    env = target_env(target)
    _Marker, Requirement, canon = _packaging()
    reqs = for_target(list(requires), env) + list(BOOTSTRAP)
    key_data = json.dumps({"target": target, "requires": sorted(reqs), "pip_args": pip_args}, sort_keys=True)
    key = "cp%s-%s-%s%s-%s" % (target["python"].replace(".", ""), target["machine"], target.get("libc"),
                               target.get("libc_version"), hashlib.sha256(key_data.encode()).hexdigest()[:12])
    directory = os.path.join(cache, "wheelhouse", key)
    marker = os.path.join(directory, ".complete")
    downloaded = False
    if not os.path.isfile(marker):
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        tags = platforms(target)
        wanted = list(reqs)
        for _round in range(MAX_ROUNDS):
            argv = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--implementation", "cp",
                    "--python-version", target["python"], "-d", directory]
            for tag in tags:
                argv += ["--platform", tag]
            _run(argv + list(pip_args) + wanted, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"),
                 what="downloading wheels for Python %s on %s" % (target["python"], target["machine"]))
            have = _downloaded(directory)
            missing = []
            for wheel in have.values():
                for text in for_target(wheel_metadata(os.path.join(directory, wheel))["requires"], env):
                    if canon(Requirement(text).name) not in have and text not in wanted + missing:
                        missing.append(text)
            if not missing:
                break
            wanted += missing
        else:
            raise Failure("the wheelhouse for %s does not close after %d rounds" % (key, MAX_ROUNDS))
        _atomic_json(marker, {"requires": wanted, "target": target, "created": time.time()})
        downloaded = True
    house = pack(directory, os.path.join(cache, "wheelhouse", key + ".tar"), downloaded)
    house.update(key=key, downloaded=downloaded)
    return house


def _write_tar(paths, tar_path: str) -> None:
    """Deterministic flat tar of the given files."""
    tmp = "%s.tmp%d" % (tar_path, os.getpid())
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(paths, key=os.path.basename):
            info = tarfile.TarInfo(os.path.basename(path))
            info.size = os.path.getsize(path)
            info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "root", "root"
            with open(path, "rb") as fh:
                tar.addfile(info, fh)
    os.replace(tmp, tar_path)


def pack(directory: str, tar_path: str, force: bool) -> dict:
    """Deterministic tar of the wheels in directory (rewritten only when they changed)."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(".whl"))
    if not names:
        raise Failure("no wheels in %s" % directory)
    listing = os.path.join(tar_path + ".list")
    current = json.dumps([[n, os.path.getsize(os.path.join(directory, n)), os.path.getmtime(os.path.join(directory, n))]
                          for n in names])
    fresh = not force and os.path.isfile(tar_path) and os.path.isfile(listing) and open(listing).read() == current
    if not fresh:
        _write_tar([os.path.join(directory, n) for n in names], tar_path)
        with open(listing, "w") as fh:
            fh.write(current)
    return {"tar": tar_path, "dir": directory, "sha256": _sha256(tar_path), "wheels": names, "downloaded": False,
            "packed": not fresh}


def bundle(cache: str, house: dict, wheel: dict) -> str:
    """The wheelhouse plus the relaytree wheel: what a node needs for a fresh install, one transfer."""
    directory = os.path.join(cache, "bundles")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "%s-%s-%s.tar" % (house["key"], house["sha256"][:12], wheel["sha256"][:12]))
    if not os.path.isfile(path):
        for old in os.listdir(directory):  # one bundle per wheelhouse is enough
            if old.startswith(house["key"] + "-"):
                os.unlink(os.path.join(directory, old))
        wheels = [os.path.join(house["dir"], n) for n in house["wheels"] if not n.startswith("relaytree-")]
        _write_tar(wheels + [wheel["path"]], path)
    return path


def artifacts(req: dict) -> dict:
    cache = os.path.abspath(os.path.expanduser(req["cache"]))
    os.makedirs(cache, mode=0o755, exist_ok=True)
    wheel = build_wheel(os.path.abspath(req["root"]), cache, req.get("build_isolation", "auto"))
    result = {"wheel": wheel, "wheelhouses": {}, "changed": wheel["built"]}
    if req.get("mode") != "wheelhouse":
        return result
    user_dir = req.get("wheelhouse") or ""
    for text in req.get("targets") or ():
        python, machine, libc, libc_version = text.split("|")
        target = {"python": python, "machine": machine, "libc": libc, "libc_version": libc_version}
        if user_dir:
            directory = os.path.abspath(os.path.expanduser(user_dir))
            if not os.path.isdir(directory):
                raise Failure("relay_wheelhouse %s is not a directory on the controller" % directory)
            key = "user-" + hashlib.sha256(directory.encode()).hexdigest()[:12]
            os.makedirs(os.path.join(cache, "wheelhouse"), exist_ok=True)
            house = pack(directory, os.path.join(cache, "wheelhouse", key + ".tar"), False)
            house["key"] = key
        else:
            house = download_wheelhouse(cache, target, wheel["requires"], req.get("pip_args") or [])
        house["bundle"] = bundle(cache, house, wheel)
        result["wheelhouses"][text] = house
        result["changed"] = result["changed"] or house["downloaded"] or house["packed"]
    return result


# --------------------------------------------------------------------------- PKI


def _fold(names):
    try:
        from ClusterShell.NodeSet import NodeSet
        return str(NodeSet.fromlist(names))
    except Exception:  # noqa: BLE001 - folding is only to keep the argument short
        return ",".join(names)


def pki(req: dict) -> dict:
    directory = os.path.abspath(os.path.expanduser(req["pki"]))
    env = dict(os.environ)
    if importlib.util.find_spec("relaytree") is None:
        src = os.path.join(os.path.abspath(req["root"]), "src")
        env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    argv = [sys.executable, "-m", "relaytree.cli", "keys", "init", "--json", "--pki", directory,
            "--cluster-name", req.get("cluster_name") or "relaytree"]
    names = [str(n) for n in req.get("nodes") or ()]
    if names:
        argv += ["--nodes", _fold(names)]
    for name, addresses in sorted((req.get("addresses") or {}).items()):
        for address in addresses:
            if address and address != name:
                argv += ["--address", "%s=%s" % (name, address)]
    out = _run(argv, env=env, what="relaytree keys init")
    data = json.loads(out)
    created = data.get("created") or []
    return {"changed": bool(created), "pki": directory, "key_id": data.get("key_id"),
            "created": created[:20], "created_count": len(created)}


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in ("artifacts", "pki"):
        print("usage: relay_controller.py artifacts|pki < request.json", file=sys.stderr)
        return 2
    try:
        req = json.load(io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8"))
        result = (artifacts if sys.argv[1] == "artifacts" else pki)(req)
    except Failure as exc:
        print(json.dumps({"failed": True, "msg": str(exc)}))
        print("relay_controller.py %s: %s" % (sys.argv[1], exc), file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
