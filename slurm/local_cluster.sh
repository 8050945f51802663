#!/usr/bin/env bash
# A Slurm cluster of N nodes on this machine, from Debian's packages, for tests and trying the sbatch files.
#
#   slurm/local_cluster.sh up [--nodes N]   install (if missing) and start munge, slurmctld and N slurmd; idempotent
#   slurm/local_cluster.sh down             stop and remove what `up` made, and nothing else
#   slurm/local_cluster.sh env              print the export that points Slurm's commands at this cluster
#
# How the nodes are made (checked with Debian's slurm-wlm 22.05.8):
# - Several slurmd on one host: Debian's slurmd takes `-N NAME` and runs as that node of slurm.conf. Each node has
#   its own `Port=` and its own spool, pid and log files (`%n` in SlurmdSpoolDir / SlurmdPidFile / SlurmdLogFile
#   expands to the node name), so N daemons do not share any file.
# - Its own hostname: each slurmd runs in a UTS namespace of its own (`unshare --uts`, hostname set to the node's
#   name), so a job step on node i sees `hostname` = mthl-node<i>, as on a real cluster. The namespace lives as long
#   as the daemon and what it starts; nothing is left to remove.
# - Its own address, on loopback: node i is 127.0.1.(10+i). All of 127.0.0.0/8 is on `lo`, so no interface or
#   network namespace is needed; an /etc/hosts line per node (tagged "# mthl-ds local_cluster") lets the launcher,
#   the rendezvous and gloo resolve the node names. slurmctld listens on 127.0.0.1. No traffic leaves loopback.
# - One partition `debug` with every node, so `sbatch --nodes=2` gets two nodes and SLURM_JOB_NODELIST names both.
#
# Everything else lives in $MTHL_SLURM_DIR (default /tmp/mthl-ds-slurm), which `up` creates and `down` removes;
# Slurm's commands need SLURM_CONF=$MTHL_SLURM_DIR/slurm.conf (`eval "$(slurm/local_cluster.sh env)"`).
# `down` cancels the cluster's jobs, stops its daemons (munged only if `up` started it), removes the hosts lines and
# the folder. Installed packages and the munge key stay. Needs root (daemons run as root, DESIGN.md §4).
set -euo pipefail

STATE=${MTHL_SLURM_DIR:-/tmp/mthl-ds-slurm}
CONF=$STATE/slurm.conf
MARK=$STATE/.mthl-local-cluster
HOSTS_TAG="# mthl-ds local_cluster"
CTLD_HOST=$(hostname -s)

log() { echo "local_cluster: $*" >&2; }
node_name() { echo "mthl-node$1"; }
node_addr() { echo "127.0.1.$((10 + $1))"; }

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

write_conf() {  # $1: number of nodes
  local cpus mem i
  cpus=$(nproc)
  mem=$(awk -v n="$1" '/MemTotal/ {print int($2 / 1024 * 0.9 / n)}' /proc/meminfo)
  mkdir -p "$STATE/ctld"
  cat >"$CONF" <<EOF
ClusterName=mthl-local
SlurmctldHost=$CTLD_HOST(127.0.0.1)
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
SlurmdTimeout=60
MinJobAge=600
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
EOF
  for ((i = 0; i < $1; i++)); do
    echo "NodeName=$(node_name $i) NodeHostname=$(node_name $i) NodeAddr=$(node_addr $i) Port=$((6818 + i))" \
         "CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$CONF"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
  echo "$1" >"$STATE/nodes"
}

add_hosts() {  # /etc/hosts may be a bind mount: rewrite it in place, never replace the file
  local i lines
  lines=$(grep -v "$HOSTS_TAG" /etc/hosts || true)
  for ((i = 0; i < $1; i++)); do lines+=$'\n'"$(node_addr $i) $(node_name $i) $HOSTS_TAG"; done
  printf '%s\n' "$lines" >/etc/hosts
}

remove_hosts() {
  local lines
  grep -q "$HOSTS_TAG" /etc/hosts || return 0
  lines=$(grep -v "$HOSTS_TAG" /etc/hosts || true)
  printf '%s\n' "$lines" >/etc/hosts
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
  local nodes=1 i name
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) nodes=${2:?--nodes needs a number}; shift 2 ;;
      --nodes=*) nodes=${1#--nodes=}; shift ;;
      *) log "unknown argument $1"; exit 2 ;;
    esac
  done
  [[ "$nodes" =~ ^[1-9][0-9]?$ ]] || { log "--nodes must be 1-99, not '$nodes'"; exit 2; }
  if [ -e "$STATE" ] && [ ! -f "$MARK" ]; then
    log "$STATE exists and was not made by this script; set MTHL_SLURM_DIR to a new folder"
    exit 2
  fi
  if [ -f "$STATE/nodes" ] && running "$STATE/slurmctld.pid" && [ "$(cat "$STATE/nodes")" != "$nodes" ]; then
    log "a $(cat "$STATE/nodes")-node cluster is up in $STATE; run '$0 down' first"
    exit 2
  fi
  install_packages
  mkdir -p "$STATE"
  touch "$MARK"
  start_munge
  running "$STATE/slurmctld.pid" || write_conf "$nodes"
  add_hosts "$nodes"
  export SLURM_CONF=$CONF
  if ! running "$STATE/slurmctld.pid"; then
    slurmctld -f "$CONF"
    log "started slurmctld"
  fi
  for ((i = 0; i < nodes; i++)); do
    name=$(node_name $i)
    if ! running "$STATE/slurmd-$name.pid"; then
      unshare --uts sh -c "hostname $name && exec slurmd -N $name -f $CONF"
      log "started slurmd $name ($(node_addr $i))"
    fi
  done
  for _ in $(seq 60); do
    if [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" -eq "$nodes" ]; then
      log "$nodes node(s) up: $(sinfo -h -o %N); export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 1
  done
  log "the nodes did not come up; see $STATE/slurmctld.log and $STATE/slurmd-*.log"
  return 1
}

down() {
  local pidfile
  [ -f "$MARK" ] || { remove_hosts; log "no cluster in $STATE"; return 0; }
  export SLURM_CONF=$CONF
  if running "$STATE/slurmctld.pid"; then
    scancel --full --quiet --user=root 2>/dev/null || true
    for _ in $(seq 30); do
      [ -z "$(squeue -h -t RUNNING,COMPLETING 2>/dev/null)" ] && break
      sleep 1
    done
  fi
  for pidfile in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid"; do
    if running "$pidfile"; then
      kill "$(cat "$pidfile")"
      for _ in $(seq 20); do running "$pidfile" || break; sleep 0.5; done
      log "stopped $(basename "$pidfile" .pid)"
    fi
  done
  if [ -f "$STATE/started-munged" ]; then
    pkill -x munged || true
    log "stopped munged"
  fi
  remove_hosts
  rm -rf "$STATE"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up [--nodes N] | down | env" >&2; exit 2 ;;
esac
