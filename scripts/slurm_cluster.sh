#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying `--launcher slurm` and for the tests:
#
#   scripts/slurm_cluster.sh start    # install slurm-wlm + munge when root and missing, then start
#   scripts/slurm_cluster.sh status   # exit 0 when the cluster answers; prints its SLURM_CONF
#   scripts/slurm_cluster.sh env      # `export SLURM_CONF=...`: eval "$(scripts/slurm_cluster.sh env)"
#   scripts/slurm_cluster.sh stop     # stop the daemons this script started (and nothing else)
#
# Everything lives in a directory of its own (SLURM_CLUSTER_DIR, default /tmp/dad3d-slurm-<uid>):
# slurm.conf, a munge key and socket, spool, state, logs and pid files. Nothing under /etc is
# written, so an existing SLURM or munge set-up of this machine is left alone; commands reach this
# cluster only with SLURM_CONF=<dir>/slurm.conf. Its daemons use ports of their own
# (SLURM_CLUSTER_PORT, default 6917, and the next one), not SLURM's default 6817/6818.
# The node has the machine's memory and SLURM_CLUSTER_CPUS of its cores (default 2, at most all;
# `slurmd -C`), no GPUs, one partition `debug`, no accounting; each job gets 1 core and an equal
# share of the memory unless it asks for more: two jobs run at a time, whatever the machine, so
# that the tests see jobs wait in the queue.
# SLURM_CLUSTER_INSTALL=0: never install packages.
set -uo pipefail
DIR=${SLURM_CLUSTER_DIR:-/tmp/dad3d-slurm-$(id -u)}
PORT=${SLURM_CLUSTER_PORT:-6917}
CONF=$DIR/slurm.conf
NODE=$(hostname -s)
ME=$(id -un)

STARTING=0  # set while `start` runs: a failure then stops what it had started
say() { echo "slurm_cluster: $*"; }
fail() {
  echo "slurm_cluster: error: $*" >&2
  [ "$STARTING" = 1 ] && stop >/dev/null
  exit 1
}
[[ "$PORT" =~ ^[1-9][0-9]*$ ]] || fail "SLURM_CLUSTER_PORT must be a port number, got '$PORT'"

pid_alive() {  # pid file, program name: whether that program runs under the pid in the file
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$2"
}

install_missing() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
  [ "${SLURM_CLUSTER_INSTALL:-1}" = 0 ] && fail "slurmctld, slurmd or munged not found (SLURM_CLUSTER_INSTALL=0: not installing)"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing slurm-wlm and munge (apt-get)..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >"$DIR.install.log" 2>&1 \
      || fail "could not install slurm-wlm and munge (see $DIR.install.log)"
  else
    fail "slurmctld, slurmd or munged not found; install them (Debian/Ubuntu: sudo apt-get install -y slurm-wlm munge)"
  fi
}

write_config() {
  local node cpus mem
  node=$(slurmd -C 2>/dev/null | head -1) || fail "slurmd -C failed"
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node")
  mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  [ -n "$cpus" ] && [ -n "$mem" ] || fail "cannot read CPUs and RealMemory from 'slurmd -C': $node"
  local want=${SLURM_CLUSTER_CPUS:-2}
  [[ "$want" =~ ^[1-9][0-9]*$ ]] || fail "SLURM_CLUSTER_CPUS must be a positive number, got '$want'"
  [ "$want" -lt "$cpus" ] && cpus=$want
  # The node answers on 127.0.0.1, so the host name need not resolve.
  cat >"$CONF" <<CONF
# Written by scripts/slurm_cluster.sh: a one-node test cluster. Reach it with SLURM_CONF=$CONF
ClusterName=dad3d
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$ME
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=600
SchedulerType=sched/backfill
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munged() {
  local m=$DIR/munge
  pid_alive "$m/munged.pid" munged && return 0
  mkdir -p "$m"
  [ -s "$m/munge.key" ] || dd if=/dev/urandom of="$m/munge.key" bs=1 count=128 status=none
  chmod 700 "$m"; chmod 400 "$m/munge.key"
  local args=(--socket="$m/munge.socket" --key-file="$m/munge.key" --pid-file="$m/munged.pid"
              --log-file="$m/munged.log" --seed-file="$m/munged.seed" --force)
  if [ "$(id -u)" = 0 ]; then  # munged refuses to run as root
    id munge >/dev/null 2>&1 || fail "user 'munge' not found (install the munge package)"
    chown -R munge: "$m"
    runuser -u munge -- munged "${args[@]}" || fail "munged did not start (see $m/munged.log)"
  else
    munged "${args[@]}" || fail "munged did not start (see $m/munged.log)"
  fi
}

running() { SLURM_CONF=$CONF timeout 5 sinfo -h -o %T >/dev/null 2>&1; }

start() {
  mkdir -p "$DIR" || fail "cannot create $DIR"
  install_missing
  if pid_alive "$DIR/slurmctld.pid" slurmctld && running; then
    say "already running; SLURM_CONF=$CONF"
    return 0
  fi
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  STARTING=1
  write_config || fail "cannot write $CONF"
  start_munged
  export SLURM_CONF=$CONF
  pid_alive "$DIR/slurmctld.pid" slurmctld || slurmctld -c -f "$CONF" || fail "slurmctld did not start (see $DIR/log/slurmctld.log)"
  pid_alive "$DIR/slurmd.pid" slurmd || slurmd -f "$CONF" || fail "slurmd did not start (see $DIR/log/slurmd.log)"
  local state="" begin=$SECONDS d
  while [ $((SECONDS - begin)) -lt 60 ]; do
    state=$(timeout 5 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1)
    [ "$state" = idle ] && break
    if [ $((SECONDS - begin)) -ge 3 ]; then  # a daemon that stopped (a port in use, a bad setting)
      for d in slurmctld slurmd; do
        pid_alive "$DIR/$d.pid" "$d" || fail "$d stopped: $(grep -h 'error\|fatal' "$DIR/log/$d.log" 2>/dev/null | tail -1)"
      done
    fi
    sleep 1
  done
  [ "$state" = idle ] || fail "node $NODE not idle after 60 s (state '${state:-none}'; see $DIR/log/)"
  STARTING=0
  say "running: node $NODE idle, partition debug; SLURM_CONF=$CONF"
}

stop() {
  local f name pid i stopped=""
  for f in slurmd:slurmd.pid slurmctld:slurmctld.pid munged:munge/munged.pid; do
    name=${f%%:*}
    pid_alive "$DIR/${f#*:}" "$name" || continue
    pid=$(cat "$DIR/${f#*:}")
    kill "$pid"
    for i in $(seq 30); do [ -d "/proc/$pid" ] || break; sleep 0.5; done
    [ -d "/proc/$pid" ] && kill -9 "$pid"
    stopped+=" $name($pid)"
  done
  say "stopped${stopped:- nothing (none of its daemons was running)}"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if pid_alive "$DIR/slurmctld.pid" slurmctld && running; then say "running; SLURM_CONF=$CONF"; else say "not running"; exit 1; fi ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
