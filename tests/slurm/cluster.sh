#!/usr/bin/env bash
# A private one-node SLURM cluster for the real-SLURM tests (`make test-slurm`):
#
#   tests/slurm/cluster.sh run COMMAND [ARG...]
#
# installs slurmctld, slurmd, the SLURM client commands and munge when they are missing (as root,
# with apt-get), starts munged, slurmctld and slurmd for this machine alone (one node, one CPU
# partition, the cores and memory `slurmd -C` reports), runs COMMAND with SLURM_CONF pointing at the
# cluster and LONGCPT_SLURM_CLUSTER set, then cancels what is left of its jobs and stops the three
# daemons by the PIDs it started. Its exit status is COMMAND's.
#
# Everything lives in one temporary folder (configuration, munge key and socket, state, logs): the
# machine's own /etc/slurm, /etc/munge and any SLURM or munge daemon already running are left alone,
# and the ports are chosen free. Where the cluster cannot run (not root, no apt-get to install SLURM,
# the install failing, not Linux) it prints `SKIPPED: <reason>` and exits 0. The folder is removed
# when COMMAND passes and kept (its path printed) when it fails, for the daemons' logs.
#
# No systemd is needed (the daemons run in the foreground, children of this script), and no
# cgroups: processes are tracked through /proc and tasks are not bound to cores.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)  # what the slurm-wlm meta-package brings that we use
DAEMONS=(slurmctld slurmd munged)
CLIENTS=(sbatch srun scontrol squeue scancel sinfo munge unmunge)

skip() { echo "make test-slurm: SKIPPED: $*" >&2; exit 0; }
die() { echo "make test-slurm: error: $*" >&2; exit 1; }

usage() { echo "usage: $0 run COMMAND [ARG...]" >&2; exit 2; }
[ "${1:-}" = run ] && [ $# -ge 2 ] || usage
shift

# ---------------------------------------------------------------- can it run here?
[ "$(uname -s)" = Linux ] || skip "SLURM's daemons need Linux (this is $(uname -s))"
[ "$(id -u)" -eq 0 ] || skip "slurmd must run as root to start job steps (running as $(id -un)); run make test-slurm as root"
missing() { for d in "${DAEMONS[@]}" "${CLIENTS[@]}"; do command -v "$d" >/dev/null || return 0; done; return 1; }
if missing; then
  command -v apt-get >/dev/null || skip "SLURM is not installed and there is no apt-get to install ${PACKAGES[*]}"
  echo "installing ${PACKAGES[*]} with apt-get" >&2
  log=$(mktemp)
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$log" 2>&1 &&
     ! { apt-get update -q >>"$log" 2>&1 &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$log" 2>&1; }; then
    tail -n 5 "$log" >&2
    skip "apt-get could not install ${PACKAGES[*]} (log: $log)"
  fi
  rm -f "$log"
  missing && die "apt-get installed ${PACKAGES[*]} but one of ${DAEMONS[*]} ${CLIENTS[*]} is still not on PATH"
fi

# ---------------------------------------------------------------- configuration
STATE=$(mktemp -d "${TMPDIR:-/tmp}/longcpt-slurm.XXXXXX")  # 0700: the munge socket and key live here
PIDS=()
listening() {  # is TCP port $1 in use? (read from /proc: no ss/netstat needed)
  local hex
  hex=$(printf ':%04X ' "$1")
  cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk -v p="$hex" 'index($2 " ", p) && $4 == "0A" {f=1} END {exit !f}'
}
port=16817
while listening "$port" || listening $((port + 1)); do port=$((port + 2)); done

node=$(slurmd -C | sed -n 1p)  # NodeName=<host> CPUs=.. Boards=.. SocketsPerBoard=.. ... RealMemory=..
host=${node#NodeName=}
host=${host%% *}
mkdir -p "$STATE/ctld" "$STATE/slurmd"
cat >"$STATE/slurm.conf" <<EOF
ClusterName=longcpt-test
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge.socket
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# processes tracked through /proc, tasks not bound: no cgroups or systemd needed
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=30
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
$node State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$STATE/slurm.conf

# ---------------------------------------------------------------- start, run, stop
stop() {
  local status=$? pid i
  set +e
  if [ ${#PIDS[@]} -gt 1 ]; then  # slurmctld is up: cancel our jobs and let their steps end
    scancel --user="$(id -un)" 2>/dev/null
    for i in $(seq 60); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 1; done
  fi
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do  # slurmd, slurmctld, then munged
    pid=${PIDS[i]}
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  if [ "$status" -eq 0 ]; then rm -rf "$STATE"; else echo "make test-slurm: logs kept in $STATE" >&2; fi
  exit "$status"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

started() {  # wait for $2 to be true after starting daemon $1 (PID last in PIDS)
  local i
  for i in $(seq 60); do
    eval "$2" >/dev/null 2>&1 && return 0
    kill -0 "${PIDS[-1]}" 2>/dev/null || break
    sleep 0.5
  done
  tail -n 20 "$STATE/$1.log" "$STATE/$1.stderr" >&2 2>/dev/null
  die "$1 did not start (log above; folder $STATE)"
}

dd if=/dev/urandom of="$STATE/munge.key" bs=1024 count=1 status=none
chmod 400 "$STATE/munge.key"
# --force: munged refuses to run as root otherwise; the key and socket are ours alone.
munged --foreground --force --socket="$STATE/munge.socket" --key-file="$STATE/munge.key" \
  --pid-file="$STATE/munged.pid" --seed-file="$STATE/munged.seed" --log-file="$STATE/munged.log" 2>>"$STATE/munged.stderr" &
PIDS+=($!)
started munged "munge --socket=$STATE/munge.socket -n | unmunge --socket=$STATE/munge.socket"
slurmctld -D -f "$SLURM_CONF" 2>>"$STATE/slurmctld.stderr" &
PIDS+=($!)
started slurmctld "scontrol ping | grep -q UP"
slurmd -D -f "$SLURM_CONF" 2>>"$STATE/slurmd.stderr" &
PIDS+=($!)
started slurmd "sinfo -h -N -o %T | grep -qx idle"
echo "SLURM cluster up: $node, partition cpu, slurmctld port $port, state $STATE" >&2

LONGCPT_SLURM_CLUSTER=$STATE "$@"
