#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for trying `pipe run --executor slurm` and for the tests.
#
#   bash scripts/slurm-local.sh up       install slurm-wlm + munge if missing, configure, start, wait for idle
#   bash scripts/slurm-local.sh up --no-install
#                                        the same, but exit 3 instead of downloading packages (the tests)
#   bash scripts/slurm-local.sh down     stop slurmd, slurmctld and munged
#   bash scripts/slurm-local.sh status   say whether the daemons run and what sinfo reports
#
# Needs root (it installs packages and writes /etc/slurm). Meant for containers without systemd or
# cgroups: process tracking is by /proc, there is no task confinement and no accounting database, so
# finished jobs are known to `scontrol show job` for MinJobAge seconds (an hour) and not to `sacct`.
# Idempotent: `up` on a running cluster only checks that the node is idle.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
RUN=/run/slurm
NODE="$(hostname -s)"

log() { echo "slurm-local: $*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (it installs packages and starts daemons); try: sudo bash $0 $*"
    exit 2
  fi
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null; then
    return
  fi
  if [ "${NO_INSTALL:-0}" = 1 ]; then
    log "slurm-wlm and munge are not installed (--no-install); run: sudo bash $0 up"
    exit 3
  fi
  log "installing slurm-wlm and munge (apt-get)"
  local t0=$SECONDS
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  log "installed in $((SECONDS - t0)) s"
}

start_munge() {
  mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
  chmod 0700 /etc/munge /var/lib/munge /var/log/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  if pid_alive /run/munge/munged.pid && munge -n </dev/null | unmunge >/dev/null 2>&1; then
    return
  fi
  log "starting munged"
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
  runuser -u munge -- munged
  for _ in $(seq 50); do
    munge -n </dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  log "munged did not answer; see /var/log/munge/munged.log"
  exit 1
}

write_conf() {
  local cpus mem_mb margin
  cpus="$(nproc)"
  mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
  # Leave room for the daemons and the OS, so slurmd's own memory check never drains the node.
  margin=$((mem_mb / 10 > 1024 ? mem_mb / 10 : 1024))
  mem_mb=$((mem_mb - margin))
  mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS" "$RUN"
  local tmp="$CONF.tmp"
  cat >"$tmp" <<EOF
# Written by scripts/slurm-local.sh for a single-node cluster on $NODE; rewritten by every 'up'.
ClusterName=pipe-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
# No systemd or cgroups in a container: track processes through /proc, do not confine tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobContainerType=job_container/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# CPUs are the consumable; --mem is checked against the node but does not serialise jobs.
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Keep finished jobs visible to 'scontrol show job' for an hour (there is no sacct here).
MinJobAge=3600
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
    return 1
  fi
  mv "$tmp" "$CONF"
  log "wrote $CONF ($cpus CPUs, ${mem_mb} MB)"
  return 0
}

node_state() { sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -1; }

up() {
  need_root up
  local t0=$SECONDS
  install_packages
  start_munge
  local changed=0
  write_conf && changed=1
  if [ "$changed" = 1 ] && { pid_alive "$RUN/slurmctld.pid" || pid_alive "$RUN/slurmd.pid"; }; then
    log "configuration changed: restarting the daemons"
    stop_daemons
  fi
  if ! pid_alive "$RUN/slurmctld.pid"; then
    log "starting slurmctld"
    slurmctld
  fi
  if ! pid_alive "$RUN/slurmd.pid"; then
    log "starting slurmd"
    slurmd
  fi
  local state=""
  for _ in $(seq 120); do
    state="$(node_state)"
    case "$state" in
      idle | mixed | allocated | completing) break ;;
      down* | drain*)
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        ;;
    esac
    sleep 0.5
  done
  case "$state" in
    idle | mixed | allocated | completing) ;;
    *)
      log "node $NODE is '${state:-unknown}' after 60 s; see $LOGS/slurmctld.log and $LOGS/slurmd.log"
      exit 1
      ;;
  esac
  log "up: node $NODE $state ($((SECONDS - t0)) s)"
}

stop_pid() {
  local f=$1
  if pid_alive "$f"; then
    local pid
    pid="$(cat "$f")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  rm -f "$f"
}

stop_daemons() {
  stop_pid "$RUN/slurmd.pid"
  stop_pid "$RUN/slurmctld.pid"
}

down() {
  need_root down
  stop_daemons
  stop_pid /run/munge/munged.pid
  log "down"
}

status() {
  local ok=0
  for d in munge/munged slurm/slurmctld slurm/slurmd; do
    if pid_alive "/run/$d.pid"; then echo "${d#*/}: running (pid $(cat "/run/$d.pid"))"; else
      echo "${d#*/}: stopped"
      ok=1
    fi
  done
  if command -v sinfo >/dev/null; then sinfo 2>&1 || ok=1; fi
  return $ok
}

case "${1:-}" in
  up)
    if [ "${2:-}" = "--no-install" ]; then NO_INSTALL=1; fi
    up
    ;;
  down) down ;;
  status) status ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
