#!/usr/bin/env bash
# A SLURM cluster of one or several nodes on this machine (munged, slurmctld, one slurmd per node), for
# the launcher tests and for trying `megatron-switch sbatch --cpu` scripts locally. Needs root.
#
#   launch/local_slurm.sh              one node named after this host (installs slurm-wlm and munge if missing)
#   launch/local_slurm.sh --nodes 2    two nodes, n1 and n2, each with this machine's CPUs
#   launch/local_slurm.sh --stop       stop the daemons this script started
#
# Idempotent: a cluster that already runs the configuration asked for is left alone. Asking for another
# node count stops this script's slurmctld and slurmd(s), rewrites the configuration and starts them
# again with a clean state (jobs of the old cluster are forgotten).
#
# Several nodes on one machine use slurmd's multiple-slurmd support (Debian's slurm-wlm is built with
# it): `NodeName=n[1-N] NodeHostname=<host> NodeAddr=127.0.0.1 Port=17001-...`, one `slurmd -N nK` per
# node, spool, pid and log paths per node (`%n`). The nodes share this machine's network stack, /tmp,
# /dev/shm and hostname, and their names do not resolve (the sbatch script falls back to NodeAddr).
#
# State, spool and logs go to $SLURM_LOCAL_DIR (default /var/tmp/megatron-switch-slurm). The config
# is written to /etc/slurm/slurm.conf (where every SLURM client looks) unless a slurm.conf that this
# script did not write is already there; then that cluster is used as it is.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/var/tmp/megatron-switch-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by megatron-switch launch/local_slurm.sh"

usage() {
    echo "usage: launch/local_slurm.sh [--nodes N] | --stop" >&2
    exit 2
}

nodes=1
stop=0
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) [ $# -ge 2 ] || usage; nodes=$2; shift 2 ;;
        --nodes=*) nodes=${1#--nodes=}; shift ;;
        --stop) stop=1; shift ;;
        *) usage ;;
    esac
done
case "$nodes" in
    ''|*[!0-9]*|0) echo "local_slurm.sh: --nodes takes a positive number, not '$nodes'" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
    echo "local_slurm.sh: run as root (slurmctld and slurmd run as root here)" >&2
    exit 1
fi

alive() {  # alive PIDFILE: the process it names runs
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# stop_daemons PIDFILE...: TERM each, then wait (bounded) until each has exited.
stop_daemons() {
    local pidfile pid
    for pidfile in "$@"; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
}

slurm_pidfiles() {  # slurmd(s) first, then slurmctld (slurmd.pid: the one-node layout of older versions)
    local f
    for f in "$DIR"/slurmd.pid "$DIR"/slurmd.*.pid "$DIR"/slurmctld.pid; do
        [ -f "$f" ] && echo "$f"
    done
    return 0
}

if [ "$stop" = 1 ]; then
    mapfile -t pidfiles < <(slurm_pidfiles)
    stop_daemons "${pidfiles[@]}" "$DIR/munged.pid"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q slurm-wlm munge
fi

# munge: a key, then the daemon (as the munge user, as the Debian service does).
if [ ! -s /etc/munge/munge.key ]; then
    mungekey -c -f -k /etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge "$DIR"
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- munged --force
    pgrep -u munge -n munged >"$DIR/munged.pid"
fi

host=$(hostname -s)
cpus=$(nproc)
if [ "$nodes" = 1 ]; then
    names=("$host")
    node_lines="NodeName=$host CPUs=$cpus State=UNKNOWN"
    node_list=$host
else
    names=()
    for i in $(seq 1 "$nodes"); do names+=("n$i"); done
    node_list="n[1-$nodes]"
    node_lines="# $nodes nodes on this one machine: one slurmd each (slurmd -N nK), all at 127.0.0.1 on their own port.
NodeName=$node_list NodeHostname=$host NodeAddr=127.0.0.1 Port=17001-$((17000 + nodes)) CPUs=$cpus State=UNKNOWN"
fi

own_config=1
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    own_config=0
    echo "local_slurm.sh: $CONF was not written by this script; using that cluster as configured"
    names=()  # wait for whatever nodes that cluster has
fi

clean_start=0
if [ "$own_config" = 1 ]; then
    mkdir -p "$DIR/state" /etc/slurm
    cat >"$CONF.tmp" <<EOF
$MARK (--nodes $nodes)
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool.%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/ctld.log
SlurmdLogFile=$DIR/d.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
# A requeued job waits cred_expire seconds before it may start again (default 120), then for the
# scheduler's next pass: about 12 s here. (Shorter credentials risk step launches failing on a busy machine.)
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
$node_lines
PartitionName=debug Nodes=$node_list Default=YES MaxTime=INFINITE State=UP
EOF
    if [ -f "$CONF" ] && cmp -s "$CONF.tmp" "$CONF"; then
        rm -f "$CONF.tmp"
    else
        # Another layout (or an older version of this script) was running: stop it before switching.
        mapfile -t pidfiles < <(slurm_pidfiles)
        if [ "${#pidfiles[@]}" -gt 0 ]; then
            echo "local_slurm.sh: switching $CONF to $nodes node(s): stopping the running slurmctld and slurmd(s)"
        fi
        stop_daemons "${pidfiles[@]}"
        mv "$CONF.tmp" "$CONF"
        clean_start=1
    fi
fi

if ! scontrol ping 2>/dev/null | grep -q "is UP"; then
    if [ "$clean_start" = 1 ]; then
        slurmctld -c  # the node set changed: do not recover the old cluster's nodes and jobs
    else
        slurmctld
    fi
fi
if [ "$own_config" = 1 ]; then
    if [ "$nodes" = 1 ]; then
        alive "$DIR/slurmd.$host.pid" || slurmd
    else
        for name in "${names[@]}"; do
            alive "$DIR/slurmd.$name.pid" || slurmd -N "$name"
        done
    fi
elif ! pgrep -x slurmd >/dev/null; then
    slurmd
fi

# Wait (bounded) until every node takes jobs.
if [ "${#names[@]}" = 0 ]; then
    mapfile -t names < <(sinfo -h -N -o %N 2>/dev/null | sort -u)
fi
for _ in $(seq 1 120); do
    ready=0
    for name in "${names[@]}"; do
        state=$(sinfo -h -n "$name" -o %t 2>/dev/null | head -n 1 || true)
        case "$state" in
            idle|mix|alloc) ready=$((ready + 1)) ;;
            down*|drain*) scontrol update NodeName="$name" State=RESUME 2>/dev/null || true ;;
        esac
    done
    if [ "$ready" -gt 0 ] && [ "$ready" = "${#names[@]}" ]; then
        echo "local_slurm.sh: $ready node(s) idle: ${names[*]}"
        exit 0
    fi
    sleep 1
done
echo "local_slurm.sh: not every node of ${names[*]} became idle; see $DIR/ctld.log and $DIR/d.*.log" >&2
exit 1
