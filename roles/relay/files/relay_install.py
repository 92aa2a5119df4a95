# Copyright: relaytree developers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# Node side of the hpc.relaytree.relay install, run by relay_python (>= 3.9, checked before) with
# `-c`; one JSON argument. In one remote call: unpack what the controller pushed (the wheelhouse +
# the relaytree wheel as one tar, or the wheel alone), create the virtual environment if asked,
# pip install (no index in wheelhouse mode), write the stamp, remove the transient files.
# Prints one JSON line; exit status 1 with the failing step's output on failure.
import json
import os
import shutil
import subprocess
import sys
import tarfile

args = json.loads(sys.argv[1])
venv, incoming, pushed = args["venv"], args["incoming"], args["pushed"]
python = os.path.join(venv, "bin", "python")
steps = []


def run(argv, what, env=None):
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, check=False)
    out = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0:
        print(json.dumps({"failed": True, "step": what, "rc": proc.returncode, "argv": argv, "output": out[-6000:],
                          "steps": steps}))
        sys.exit(1)
    steps.append(what)
    return out


try:
    os.makedirs(args["base_dir"], exist_ok=True)
    os.chmod(args["base_dir"], 0o755)
    wheelhouse = os.path.join(incoming, "wheelhouse")
    if pushed.endswith(".tar"):
        os.makedirs(wheelhouse, exist_ok=True)
        with tarfile.open(pushed) as tar:
            for member in tar.getmembers():  # flat archive of wheels made by the role, nothing else
                if not member.isfile() or "/" in member.name or member.name.startswith("."):
                    raise ValueError("unexpected member %r in %s" % (member.name, pushed))
            tar.extractall(wheelhouse)
        steps.append("unpacked %s" % os.path.basename(pushed))
        wheel = os.path.join(wheelhouse, args["wheel"])
    else:
        wheel = pushed

    pip_env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    if args["mode"] == "wheelhouse":
        pip_env["PIP_CONFIG_FILE"] = os.devnull  # --no-index: the node's pip configuration has no say
        source = ["--no-index", "--find-links", wheelhouse]
    else:
        source = list(args["pip_args"])
    pip_wheel = os.path.join(wheelhouse, args["pip_wheel"]) if args["pip_wheel"] else ""

    if args["new_venv"]:
        run([args["python"], "-m", "venv", "--clear"] + (["--without-pip"] if pip_wheel else []) + [venv],
            "created %s" % venv)
    if args["deps"]:
        # pip from the wheelhouse's own pip wheel (a wheel is runnable): no ensurepip needed.
        pip = [python, os.path.join(pip_wheel, "pip")] if pip_wheel else [python, "-m", "pip"]
        run(pip + ["install", "--no-cache-dir", "--no-compile", "--upgrade"] + source + ["pip"] + args["requires"]
            + ([wheel] if args["new_venv"] else []),
            "installed the dependencies" + (" and relaytree" if args["new_venv"] else ""), env=pip_env)
    if args["code"] and not args["new_venv"]:
        run([python, "-m", "pip", "install", "--no-cache-dir", "--no-compile", "--no-index", "--no-deps",
             "--force-reinstall", wheel], "installed %s" % os.path.basename(wheel), env=pip_env)
    version = run([python, "-c", "import relaytree, sys; sys.stdout.write(relaytree.__version__)"], "checked")
    tmp = args["stamp"] + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(args["stamp_content"], fh, indent=1, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, args["stamp"])
    print(json.dumps({"changed": True, "steps": steps, "version": version}))
finally:
    shutil.rmtree(incoming, ignore_errors=True)
