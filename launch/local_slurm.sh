#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (munged, slurmctld, slurmd), for the launcher tests and
# for trying `megatron-switch sbatch --cpu` scripts locally. Needs root. Idempotent: a cluster that
# already answers is left alone.
#
#   launch/local_slurm.sh            start (installs slurm-wlm and munge with apt if missing)
#   launch/local_slurm.sh --stop     stop the daemons this script started
#
# State, spool and logs go to $SLURM_LOCAL_DIR (default /var/tmp/megatron-switch-slurm). The config
# is written to /etc/slurm/slurm.conf (where every SLURM client looks) unless a slurm.conf that this
# script did not write is already there; then that cluster is used as it is.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/var/tmp/megatron-switch-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by megatron-switch launch/local_slurm.sh"

if [ "$(id -u)" != 0 ]; then
    echo "local_slurm.sh: run as root (slurmctld and slurmd run as root here)" >&2
    exit 1
fi

if [ "${1:-}" = "--stop" ]; then
    for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
        if [ -f "$pidfile" ]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
            rm -f "$pidfile"
        fi
    done
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
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "local_slurm.sh: $CONF was not written by this script; using that cluster as configured"
else
    mkdir -p "$DIR/state" "$DIR/spool" /etc/slurm
    cat >"$CONF.tmp" <<EOF
$MARK
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/ctld.log
SlurmdLogFile=$DIR/d.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
# A requeued job waits cred_expire seconds before it may start again (default 120): 10 on this test node.
AuthInfo=cred_expire=10
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
fi

if ! scontrol ping 2>/dev/null | grep -q "is UP"; then
    slurmctld
fi
if ! pgrep -x slurmd >/dev/null; then
    slurmd
fi

# Wait (bounded) until the node takes jobs.
for _ in $(seq 1 120); do
    state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
    case "$state" in
        idle|mix|alloc) echo "local_slurm.sh: node $host is $state"; exit 0 ;;
        down*|drain*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
done
echo "local_slurm.sh: node $host did not become idle; see $DIR/ctld.log and $DIR/d.log" >&2
exit 1
