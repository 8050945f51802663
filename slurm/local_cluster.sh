#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, from Debian's packages, for tests and trying the sbatch files.
#
#   slurm/local_cluster.sh up      install (if missing) and start munge + slurmctld + slurmd; idempotent
#   slurm/local_cluster.sh down    stop what `up` started, and nothing else
#   slurm/local_cluster.sh env     print the export that points Slurm's commands at this cluster
#
# Everything lives in $MTHL_SLURM_DIR (default /tmp/mthl-ds-slurm); the cluster's config is
# $MTHL_SLURM_DIR/slurm.conf, so Slurm's commands need SLURM_CONF set to it (`eval "$(... env)"`).
# Needs root (it runs the daemons as root, as DESIGN.md §4 describes).
set -euo pipefail

STATE=${MTHL_SLURM_DIR:-/tmp/mthl-ds-slurm}
CONF=$STATE/slurm.conf
HOST=$(hostname -s)

log() { echo "local_cluster: $*" >&2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return
  fi
  log "installing slurmctld slurmd slurm-client munge from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  if pgrep -x munged >/dev/null; then
    return
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  su -s /bin/sh munge -c /usr/sbin/munged
  touch "$STATE/started-munged"
  log "started munged"
}

write_conf() {
  local cpus mem
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p "$STATE/ctld" "$STATE/d"
  cat >"$CONF" <<EOF
ClusterName=mthl-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
  install_packages
  mkdir -p "$STATE"
  start_munge
  [ -f "$CONF" ] || write_conf
  export SLURM_CONF=$CONF
  if ! running "$STATE/slurmctld.pid"; then
    slurmctld -f "$CONF"
    log "started slurmctld"
  fi
  if ! running "$STATE/slurmd.pid"; then
    slurmd -f "$CONF"
    log "started slurmd"
  fi
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      log "node $HOST is up; export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 1
  done
  log "the node did not come up; see $STATE/slurmctld.log and $STATE/slurmd.log"
  return 1
}

down() {
  for daemon in slurmd slurmctld; do
    if running "$STATE/$daemon.pid"; then
      kill "$(cat "$STATE/$daemon.pid")"
      log "stopped $daemon"
    fi
  done
  if [ -f "$STATE/started-munged" ]; then
    pkill -x munged || true
    rm -f "$STATE/started-munged"
    log "stopped munged"
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
