#!/usr/bin/env bash
# relaytree demo (`make demo`): a simulated cluster of 16 air-gapped nodes, the collection built
# and installed like a user would, the daemon deployed over SSH with hpc.relaytree.deploy, then
# the example playbooks through the tree with the folded output, and the relaytree CLI.
# The cluster is torn down whatever happens (trap), and nothing is left in $HOME except the
# wheel/wheelhouse cache (~/.cache/relaytree, reused by the next run).
#
# Environment: DEMO_NODES (16), DEMO_FORKS (max(16, nodes)), VENV (.venv), DEMO_KEEP=1 keeps the
# work directory (logs, PKI) after the run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
NODES=${DEMO_NODES:-16}
FORKS=${DEMO_FORKS:-$(( NODES > 16 ? NODES : 16 ))}
SIM="$VENV/bin/python $ROOT/tools/simcluster/simcluster.py"
NAME="demo$(printf %04x $((RANDOM % 65536)))"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { echo "demo: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "needs root (network namespaces, one sshd per node)"
if [ ! -x "$VENV/bin/ansible-playbook" ] || [ ! -x "$VENV/bin/relaytree" ]; then
    make -C "$ROOT" setup
fi
[ -x "$VENV/bin/ansible-playbook" ] || die "no ansible-playbook in $VENV (ansible-core in requirements-dev.txt)"

WORK=$(mktemp -d /tmp/relaytree-demo.XXXXXX)
CLUSTER_UP=0

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    # Ansible's persistent ssh connections and the tree coordinator of the last playbook.
    for sock in "$WORK"/cp/*; do
        [ -S "$sock" ] && ssh -O exit -o ControlPath="$sock" node >/dev/null 2>&1
    done
    if [ -f "$WORK/coordinator.json" ]; then
        pid=$("$VENV/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("pid") or "")' \
              "$WORK/coordinator.json" 2>/dev/null)
        [ -n "$pid" ] && kill "$pid" 2>/dev/null
    fi
    if [ "$CLUSTER_UP" = 1 ]; then
        say "tearing down the simulated cluster $NAME"
        $SIM down --name "$NAME"
    fi
    if [ "${DEMO_KEEP:-0}" = 1 ]; then
        echo "demo: work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SECONDS=0
declare -a TIMES=()
timed() {  # timed LABEL COMMAND...: run, record the wall time, keep going only on success
    local label=$1; shift
    local t0=$SECONDS
    "$@"
    TIMES+=("$(printf '%4ds  %s' $((SECONDS - t0)) "$label")")
}

say "building and installing the collection (ansible-galaxy collection build / install)"
mkdir -p "$WORK/build" "$WORK/collections" "$WORK/cp" "$WORK/coord" "$WORK/tmp"
chmod 700 "$WORK/cp" "$WORK/coord"
timed "collection build + install" bash -c "
    '$VENV/bin/ansible-galaxy' collection build --force --output-path '$WORK/build' '$ROOT' >/dev/null &&
    '$VENV/bin/ansible-galaxy' collection install --force -p '$WORK/collections' '$WORK'/build/hpc-relaytree-*.tar.gz"

say "bringing up $NODES simulated nodes (no route out of their subnet: air-gapped)"
for prefix in cn dcn ecn; do
    if $SIM up --name "$NAME" --nodes "$NODES" --prefix "$prefix" --subnet auto >"$WORK/sim.log" 2>&1; then
        CLUSTER_UP=1
        break
    fi
    grep -q "host names already in" "$WORK/sim.log" || { cat "$WORK/sim.log" >&2; die "simcluster up failed"; }
done
[ "$CLUSTER_UP" = 1 ] || { cat "$WORK/sim.log" >&2; die "no free node names for the simulated cluster"; }
cat "$WORK/sim.log"
STATE=$("$VENV/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["state_dir"])' \
        "/run/relaytree-sim/$NAME.json")
NODESET="${prefix}[1-$NODES]"
# deploy.yml targets the group "relaytree" by default.
{ cat "$STATE/inventory.ini"; printf '\n[relaytree:children]\ncompute\n'; } >"$WORK/inventory.ini"

export ANSIBLE_COLLECTIONS_PATH="$WORK/collections"
export ANSIBLE_INVENTORY="$WORK/inventory.ini"
export ANSIBLE_FORKS="$FORKS"
export ANSIBLE_PIPELINING=1
export ANSIBLE_RETRY_FILES_ENABLED=0
export ANSIBLE_SSH_CONTROL_PATH_DIR="$WORK/cp"
export ANSIBLE_LOCAL_TEMP="$WORK/tmp"
export RELAYTREE_PKI="$WORK/pki"                 # the role creates the cluster PKI here
export RELAYTREE_COORDINATOR_DIR="$WORK/coord"
export RELAYTREE_COORDINATOR_STATS="$WORK/coordinator.json"
PLAYBOOK="$VENV/bin/ansible-playbook"

say "deploying the relay daemon: ansible-playbook hpc.relaytree.deploy (over SSH, forks=$FORKS)"
timed "deploy.yml, $NODES fresh nodes" "$PLAYBOOK" hpc.relaytree.deploy

say "deploying again: nothing to change"
timed "deploy.yml again (changed=0)" "$PLAYBOOK" hpc.relaytree.deploy

export ANSIBLE_STDOUT_CALLBACK=hpc.relaytree.folded

say "example: tree_ping (playbooks/examples/ping.yml)"
timed "examples/ping.yml" "$PLAYBOOK" hpc.relaytree.examples.ping

say "example: tree_exec with folded output (playbooks/examples/exec.yml)"
timed "examples/exec.yml" "$PLAYBOOK" hpc.relaytree.examples.exec

say "example: tree_copy of a 64 MiB file (playbooks/examples/copy.yml), twice"
head -c $((64 << 20)) /dev/urandom >"$WORK/payload.bin"
timed "examples/copy.yml, 64 MiB to $NODES nodes" \
    "$PLAYBOOK" hpc.relaytree.examples.copy -e src="$WORK/payload.bin" -e dest=/srv/demo/payload.bin
timed "examples/copy.yml again (same content: ok)" \
    "$PLAYBOOK" hpc.relaytree.examples.copy -e src="$WORK/payload.bin" -e dest=/srv/demo/payload.bin

say "the same without Ansible: relaytree CLI ($NODESET resolves through /etc/hosts)"
timed "relaytree ping" "$VENV/bin/relaytree" ping -w "$NODESET" -b
timed "relaytree exec -b" "$VENV/bin/relaytree" exec -w "$NODESET" -b -- 'uname -r; /opt/relaytree/venv/bin/python -V; ls /etc/relaytree/pki'

say "removing the daemon: hpc.relaytree.deploy -e relay_state=absent"
unset ANSIBLE_STDOUT_CALLBACK
timed "deploy.yml relay_state=absent" "$PLAYBOOK" hpc.relaytree.deploy -e relay_state=absent

say "timings ($NODES nodes, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg))"
printf '%s\n' "${TIMES[@]}"
