#!/usr/bin/env bash
usage() {
  cat <<'EOF'
Usage: bash sh/slurm_local.sh [start|stop|status]

A single-node SLURM cluster on this machine, for trying sh/slurm_sweep.sh and its test
(tests/test_slurm.py) without a real cluster. Needs root and a Debian-like system.

  start   (default) install Debian's slurm-wlm and munge when missing (apt-get), write a munge
          key and /etc/slurm/slurm.conf for this host (its name, CPUs and memory from `slurmd -C`,
          one partition "local", no GPUs), start munged, slurmctld and slurmd, and wait until the
          node takes jobs. Safe to run again: what runs already is left running.
  stop    stop the three daemons this script started (by their pid files).
  status  print whether each daemon runs, and the node's state.

State and logs live under /var/lib/slurm-local and /var/log/slurm-local. An existing
/etc/slurm/slurm.conf that this script did not write is never replaced. After the machine's CPUs
or memory changed: stop, then start. Jobs run at the nice value of the sbatch that submitted them.
EOF
}
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# written by sh/slurm_local.sh"
STATE=/var/lib/slurm-local
LOGS=/var/log/slurm-local
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=/run/slurm-local/slurmctld.pid
SLURMD_PID=/run/slurm-local/slurmd.pid

die() { echo "error: $*" >&2; exit 2; }
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return
  command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and apt-get is missing"
  echo "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    mungekey --create --keyfile /etc/munge/munge.key
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  running "$MUNGE_PID" && return
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- munged --pid-file "$MUNGE_PID"
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qxF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script: not replacing it"
  fi
  local node host
  node=$(slurmd -C | head -n 1)  # "NodeName=<host> CPUs=.. Boards=.. ... RealMemory=.."
  [[ "$node" =~ ^NodeName=([A-Za-z0-9._-]+)\  ]] || die "unexpected 'slurmd -C' output: $node"
  host=${BASH_REMATCH[1]}
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$LOGS" /run/slurm-local
  cat > "$CONF.tmp" <<EOF
$MARKER
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# no cgroups: a container may not offer them
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# jobs run at the nice value of the sbatch that submitted them
PropagatePrioProcess=1
ReturnToService=2
MpiDefault=none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
$node State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
  echo "$host"
}

wait_for_node() {  # host: until the node is idle or busy (resumed once when it comes up down)
  local state
  for _ in $(seq 60); do
    state=$(sinfo -h -n "$1" -o %T 2>/dev/null || true)
    case "$state" in
      idle*|mixed*|alloc*) echo "SLURM is up: node $1 $state (sinfo)"; return ;;
      down*|drain*) scontrol update NodeName="$1" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
  done
  die "node $1 did not come up (state '${state:-none}'); see $LOGS/slurmctld.log and $LOGS/slurmd.log"
}

start() {
  [ "$(id -u)" -eq 0 ] || die "run as root: it installs packages and starts system daemons"
  install_packages
  start_munge
  local host
  host=$(write_conf)
  running "$CTLD_PID" || slurmctld
  running "$SLURMD_PID" || slurmd
  wait_for_node "$host"
}

stop() {  # and wait until each has exited, so that a start right after starts it anew
  local pidfile pid
  for pidfile in "$SLURMD_PID" "$CTLD_PID" "$MUNGE_PID"; do
    running "$pidfile" || continue
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then die "$(basename "$pidfile" .pid) (pid $pid) did not stop in 10 s"; fi
    echo "stopped $(basename "$pidfile" .pid)"
  done
}

status() {
  local pidfile
  for pidfile in "$MUNGE_PID" "$CTLD_PID" "$SLURMD_PID"; do
    if running "$pidfile"; then echo "$(basename "$pidfile" .pid): running"; else echo "$(basename "$pidfile" .pid): not running"; fi
  done
  if command -v sinfo >/dev/null; then sinfo 2>&1 || true; fi
}

case "${1:-start}" in
  -h|--help) usage ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "unknown argument '$1' (bash sh/slurm_local.sh --help)" >&2; exit 2 ;;
esac
