#!/usr/bin/env bash
# Run `ansible-test sanity` or `ansible-test units` on the hpc.relaytree
# collection with one ansible-core version, without docker and without the
# hosts ansible-test normally downloads from (only the Python package index).
#
# Usage: tools/ansible-test.sh CORE_VERSION PYTHON_VERSION sanity|units [ansible-test args...]
#   CORE_VERSION    2.21        -> ansible-core==2.21.*
#                   2.19.14     -> ansible-core==2.19.14
#                   '>=2.19,<2.20' (anything else is used as a pip specifier)
#   PYTHON_VERSION  3.12, 3.11, ...: runs ansible-test with it and tests only it
#
# What it does:
#   1. a venv with that Python and that ansible-core, cached in
#      $RELAYTREE_AT_CACHE (default ~/.cache/relaytree-ansible-test)/core-<v>-py<p>/
#   2. ansible-test's pip bootstrap (it downloads get-pip-<pip>.py from a host
#      this network cannot reach): a local stand-in is written to the path
#      ansible-test reads first, ~/.ansible/test/cache/get_pip_<pip>.py, next to
#      the pip wheel it installs (fetched once from the package index)
#   3. the collection is copied (git-tracked and untracked-not-ignored files
#      only: no .venv, no .git) to .../ansible_collections/hpc/relaytree in that
#      cache directory: ansible-test insists on that layout; the copy keeps its
#      tests/output/ between runs, so ansible-test's own venvs are reused
#   4. ansible-test <command> --venv --python PYTHON_VERSION [args]
#
# Environment:
#   RELAYTREE_AT_CACHE    cache root (see above)
#   RELAYTREE_AT_REFRESH  non-empty: rebuild the ansible-core venv (newest patch release)
#   RELAYTREE_AT_SKIP     extra sanity tests to skip, space separated
#   RELAYTREE_AT_SANITY_ALL  non-empty: sanity also checks src/, tests/engine/,
#                         tests/integration/, bench/, tools/*.py (see select_files)
set -euo pipefail

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 3 ]] || usage
CORE_VERSION=$1
PYVER=$2
COMMAND=$3
shift 3
case $COMMAND in sanity | units) ;; *) usage ;; esac
[[ $PYVER =~ ^[0-9]+\.[0-9]+$ ]] || { echo "PYTHON_VERSION must look like 3.12, not '$PYVER'" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${RELAYTREE_AT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/relaytree-ansible-test}

if [[ $CORE_VERSION =~ ^[0-9]+\.[0-9]+$ ]]; then
    CORE_REQ="ansible-core==$CORE_VERSION.*"
elif [[ $CORE_VERSION =~ ^[0-9] ]]; then
    CORE_REQ="ansible-core==$CORE_VERSION"
else
    CORE_REQ="ansible-core$CORE_VERSION"
fi
WORK=$CACHE/core-$(printf '%s' "$CORE_VERSION" | tr -c 'A-Za-z0-9.' '_')-py$PYVER
VENV=$WORK/venv

log() { printf '[ansible-test.sh] %s\n' "$*" >&2; }

# --- 1. Python and the ansible-core venv -------------------------------------
find_python() {
    local cand
    # pyenv installs first (newest patch release first), then PATH
    while IFS= read -r cand; do
        [[ -x $cand/bin/python$PYVER ]] && { echo "$cand/bin/python$PYVER"; return; }
    done < <(printf '%s\n' "${PYENV_ROOT:-$HOME/.pyenv}/versions/$PYVER".* | sort -V -r)
    cand=$(command -v "python$PYVER" 2>/dev/null) && "$cand" -c '' 2>/dev/null && { echo "$cand"; return; }
    return 1
}
mkdir -p "$WORK"
# One run at a time per version: runs share the venv and the staged copy.
exec 9>"$WORK/.lock"
flock 9

PYTHON=$(find_python) || { echo "no Python $PYVER found (pyenv or python$PYVER on PATH)" >&2; exit 1; }

if [[ -n ${RELAYTREE_AT_REFRESH:-} || ! -x $VENV/bin/ansible-test || "$(cat "$VENV/.relaytree-req" 2>/dev/null)" != "$CORE_REQ" ]]; then
    log "creating $VENV ($CORE_REQ, $PYTHON)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$CORE_REQ"
    printf '%s\n' "$CORE_REQ" >"$VENV/.relaytree-req"
fi
log "$("$VENV/bin/ansible-test" --version) on $("$VENV/bin/python" -V)"

# --- 2. offline pip bootstrap --------------------------------------------------
# ansible-test creates every venv --without-pip, then runs get-pip-<pip>.py,
# downloaded from ci-files.testing.ansible.com unless ~/.ansible/test/cache/
# get_pip_<pip with _>.py exists (ansible_test/_util/target/setup/requirements.py,
# bootstrap()); <pip> comes from get_venv_packages() in
# ansible_test/_internal/python_requirements.py (2.19: 24.2, 2.21: 25.2).
read -r PIP_VERSION GET_PIP < <("$VENV/bin/python" - "$PYVER" <<'EOF'
import os, re, sys
import ansible_test
root = os.path.dirname(ansible_test.__file__)
with open(os.path.join(root, '_util', 'target', 'setup', 'requirements.py')) as f:
    m = re.search(r"cache_path = os\.path\.expanduser\('([^']*)' % pip_version\.replace\(\"\.\", \"_\"\)\)", f.read())
if not m:
    sys.exit('this ansible-test does not read ~/.ansible/test/cache/get_pip_<version>.py: tools/ansible-test.sh needs updating')
try:
    from ansible_test._internal.host_configs import NativePythonConfig
    from ansible_test._internal.python_requirements import get_venv_packages
    pip_version = get_venv_packages(NativePythonConfig(version=sys.argv[1], path=sys.executable))['pip']
except Exception:  # pragma: no cover - fall back to reading the source
    with open(os.path.join(root, '_internal', 'python_requirements.py')) as f:
        pip_version = re.search(r"default_packages = dict\(\s*pip='([^']+)'", f.read()).group(1)
print(pip_version, os.path.expanduser(m.group(1) % pip_version.replace('.', '_')))
EOF
) || true
[[ -n ${GET_PIP:-} ]] || { echo "could not work out ansible-test's pip bootstrap path" >&2; exit 1; }
PIP_CACHE=$(dirname "$GET_PIP")
mkdir -p "$PIP_CACHE"
PIP_WHEEL=$PIP_CACHE/pip-$PIP_VERSION-py3-none-any.whl
if [[ ! -f $PIP_WHEEL ]]; then
    log "fetching pip $PIP_VERSION wheel for the offline bootstrap"
    "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$PIP_CACHE" "pip==$PIP_VERSION"
fi
if ! grep -q 'relaytree offline get-pip' "$GET_PIP" 2>/dev/null; then
    log "writing offline pip bootstrap $GET_PIP"
    cat >"$GET_PIP.tmp" <<EOF
# relaytree offline get-pip stand-in, written by tools/ansible-test.sh.
# ansible-test runs it as get-pip.py: ARGS = pip==$PIP_VERSION [--no-setuptools] [--no-wheel] ...
# It installs pip from the wheel next to it (no network), or, without that
# wheel, bootstraps the pip bundled with Python (ensurepip) and asks the index.
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WHEEL = os.path.join(HERE, 'pip-$PIP_VERSION-py3-none-any.whl')


def main():
    args = [a for a in sys.argv[1:] if a not in ('--no-setuptools', '--no-wheel')]
    if os.path.isfile(WHEEL):
        sys.path.insert(0, WHEEL)
        from pip._internal.cli.main import main as pip_main
        return pip_main(['install', '--no-index', '--find-links', HERE, '--upgrade', '--force-reinstall'] + args)
    import ensurepip
    ensurepip.bootstrap(upgrade=True)
    return subprocess.call([sys.executable, '-m', 'pip', 'install', '--upgrade'] + args)


if __name__ == '__main__':
    sys.exit(main())
EOF
    mv "$GET_PIP.tmp" "$GET_PIP"
fi

# --- 3. stage the collection ---------------------------------------------------
NAMESPACE=$(sed -n 's/^namespace:[[:space:]]*\([A-Za-z0-9_]*\).*/\1/p' "$ROOT/galaxy.yml")
NAME=$(sed -n 's/^name:[[:space:]]*\([A-Za-z0-9_]*\).*/\1/p' "$ROOT/galaxy.yml")
STAGE=$WORK/collections/ansible_collections/$NAMESPACE/$NAME
mkdir -p "$STAGE/tests"
# Keep tests/output (ansible-test's delegation venv and results), drop the rest.
find "$STAGE" -mindepth 1 -maxdepth 1 ! -name tests -exec rm -rf {} +
find "$STAGE/tests" -mindepth 1 -maxdepth 1 ! -name output -exec rm -rf {} +

list_files() {
    if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # what ansible-test itself would see in the git checkout
        git -C "$ROOT" ls-files -z --cached --others --exclude-standard
    else
        (cd "$ROOT" && find . \( -name .git -o -name .venv -o -name __pycache__ -o -name '*.egg-info' \
            -o -path ./tests/output -o -path ./build -o -path ./dist -o -name .pytest_cache \) -prune \
            -o \( -type f -o -type l \) ! -name '*.pyc' ! -name '*.tar.gz' -printf '%P\0')
    fi
}
# Python trees that are not Ansible content (the daemon package, the pytest
# suites tests/engine and tests/integration, benchmarks, helper scripts) stay
# out of the SANITY copy (they stay in the collection tarball and in the units
# copy). ansible-test would run pylint/pep8/compile/shebang on them with its
# Ansible-specific settings: names such as `_` are banned, subprocess.run needs
# check=, `#!/usr/bin/env python3` is refused, protoc's generated
# relaytree_pb2.py fails pep8, and compile/pylint only use the controller's
# Python (3.11+/3.12+), never the daemon's 3.9 floor. They have their own
# tests. RELAYTREE_AT_SANITY_ALL=1 keeps them in (expect those findings).
select_files() {
    local f
    while IFS= read -r -d '' f; do
        [[ -e $ROOT/$f || -L $ROOT/$f ]] || continue # deleted in the work tree
        case $f in tests/output/*) continue ;; esac   # results of an ansible-test run in the checkout
        if [[ $COMMAND == sanity && -z ${RELAYTREE_AT_SANITY_ALL:-} ]]; then
            case $f in
                tests/integration/targets/*) ;; # ansible-test integration targets, if any appear
                src/* | tests/engine/* | tests/integration/* | bench/* | tools/*.py) continue ;;
            esac
        fi
        printf '%s\0' "$f"
    done
}
list_files | select_files | (cd "$ROOT" && tar --null --no-recursion -T - -cf -) | tar -xf - -C "$STAGE"
log "staged $(find "$STAGE" -path "$STAGE/tests/output" -prune -o -type f -print | wc -l) files in $STAGE"

# --- 4. run ansible-test -------------------------------------------------------
args=("$COMMAND" --venv --python "$PYVER" --color no)
if [[ $COMMAND == sanity ]]; then
    # Without the shellcheck program the shellcheck sanity test passes silently
    # (a warning only): install the program (Debian) rather than lose the test.
    if ! command -v shellcheck >/dev/null 2>&1 && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing shellcheck (apt) for the shellcheck sanity test"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq shellcheck >/dev/null 2>&1 ||
            { apt-get update -qq && apt-get install -y -qq shellcheck >/dev/null; } ||
            log "WARNING: could not install shellcheck: the shellcheck sanity test will not check anything"
    fi
    # Sanity tests skipped here, and why (anything else the version has runs):
    skips=()
    # none needed at the moment; add "name:reason" entries here
    for s in ${RELAYTREE_AT_SKIP:-}; do skips+=("$s:skipped through RELAYTREE_AT_SKIP"); done
    for entry in "${skips[@]}"; do
        log "skipping sanity test ${entry%%:*}: ${entry#*:}"
        args+=(--skip-test "${entry%%:*}")
    done
fi

cd "$STAGE"
log "running: ansible-test ${args[*]} $*"
start=$SECONDS
rc=0
PATH=$VENV/bin:$PATH "$VENV/bin/ansible-test" "${args[@]}" "$@" || rc=$?
log "ansible-test $COMMAND ($CORE_REQ, Python $PYVER) exited $rc after $((SECONDS - start))s"
exit $rc
