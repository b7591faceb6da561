#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests and CI:
# loopback only, CPU only, no accounting, everything running as root.
#
#   slurm/local_cluster.sh start    # install slurm-wlm + munge if missing, start, wait until the node is idle
#   slurm/local_cluster.sh status   # exit 0 when all three daemons run and the node is up
#   slurm/local_cluster.sh stop     # stop the daemons by the pids in their pid files
#
# `start` is idempotent: with the cluster already up it only says so. Needs root
# (apt-get, /etc, daemons) and Debian's packages (tested with slurm-wlm 22.05,
# munge 0.5.15). The settings follow what was checked to work on a 2-core
# Debian 12 VM; see the comments in write_slurm_conf.
set -euo pipefail

SLURM_CONF=/etc/slurm/slurm.conf           # where Debian's slurm binaries look for it
STATE_DIR=/var/spool/slurmctld             # controller state (jobs survive a restart)
SPOOL_DIR=/var/spool/slurmd                # the node's copies of batch scripts
PID_DIR=/run/slurm
LOG_DIR=/var/log/slurm-local                # root-owned (munged checks), unlike the package's /var/log/slurm
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid            # munged's default pid file
CTLD_PID=$PID_DIR/slurmctld.pid
SLURMD_PID=$PID_DIR/slurmd.pid
NODE=$(hostname -s)                        # slurmd registers under the short host name

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

# A pid file names a live process.
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# The node's state as sinfo reports it (idle, mix, alloc, down*, ...), or nothing.
node_state() { timeout 10 sinfo --noheader --nodes="$NODE" --format=%t 2>/dev/null | head -n1 || true; }

node_up() { case "$(node_state)" in idle|mix|alloc|comp) return 0 ;; *) return 1 ;; esac; }

all_up() { running "$MUNGE_PID" && running "$CTLD_PID" && running "$SLURMD_PID" && node_up; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
    command -v apt-get >/dev/null || die "slurmctld is missing and there is no apt-get; install slurm-wlm and munge by hand."
    echo "installing slurm-wlm and munge with apt-get ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The packages' own service start-up fails without systemd; that is fine,
    # this script starts the daemons itself.
    apt-get install -y -qq slurm-wlm munge >/dev/null
    command -v slurmctld >/dev/null || die "apt-get did not install slurmctld; see the apt-get output above."
}

# munge authenticates every RPC between the SLURM commands and the daemons.
start_munge() {
    mkdir -p /etc/munge /run/munge /var/lib/munge
    if [ "$(stat -c %s "$MUNGE_KEY" 2>/dev/null || echo 0)" != 1024 ]; then
        # A key change needs a fresh munged; the package's postinst may have made a shorter key.
        if running "$MUNGE_PID"; then kill "$(cat "$MUNGE_PID")"; sleep 1; fi
        head -c 1024 /dev/urandom > "$MUNGE_KEY"
    fi
    chown munge:munge "$MUNGE_KEY" && chmod 400 "$MUNGE_KEY"
    running "$MUNGE_PID" && return
    # --force: munged refuses to run as root otherwise. Its log goes beside
    # SLURM's, in a root-owned folder (the package's /var/log/munge belongs to munge).
    mkdir -p "$LOG_DIR"
    munged --force --log-file="$LOG_DIR/munged.log"
    for _ in $(seq 50); do [ -S /run/munge/munge.socket.2 ] && return; sleep 0.1; done
    die "munged did not start; see $LOG_DIR/munged.log."
}

write_slurm_conf() {
    mkdir -p /etc/slurm "$STATE_DIR" "$SPOOL_DIR" "$PID_DIR" "$LOG_DIR"
    local conf
    conf=$(cat <<EOF
# Written by slurm/local_cluster.sh: one CPU-only node on loopback, for tests.
ClusterName=monkeytrain-local
SlurmctldHost=${NODE}(127.0.0.1)
# root runs the daemons, so no slurm user or file ownership is needed.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# No cgroups in a container: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# A node that was down (say, after a restart) comes back when slurmd registers.
ReturnToService=2
# Accounting is off, so finished jobs are only visible to scontrol until MinJobAge
# (seconds): keep them an hour so tests can read their final state.
MinJobAge=3600
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=8000 State=UNKNOWN
PartitionName=local Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
)
    # Rewrite only on change, so a running controller's config never changes under it.
    if [ ! -f "$SLURM_CONF" ] || [ "$(cat "$SLURM_CONF")" != "$conf" ]; then
        printf '%s\n' "$conf" > "$SLURM_CONF"
    fi
}

start() {
    [ "$(id -u)" = 0 ] || die "start needs root (it installs packages and starts daemons); run it with sudo."
    if all_up; then echo "SLURM is already running: node $NODE is $(node_state)."; return; fi
    install_packages
    start_munge
    write_slurm_conf
    running "$CTLD_PID" || slurmctld
    running "$SLURMD_PID" || slurmd
    for _ in $(seq 120); do
        if node_up; then echo "SLURM is running: node $NODE is $(node_state)."; return; fi
        sleep 0.5
    done
    tail -n 5 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    die "node $NODE did not become idle within 60 s (state: '$(node_state)'); see the logs above."
}

stop_daemon() {  # pid file, name
    running "$1" || return 0
    local pid
    pid=$(cat "$1")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { echo "stopped $2"; return; }; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    echo "killed $2 (it ignored SIGTERM for 10 s)"
}

stop() {
    stop_daemon "$SLURMD_PID" slurmd
    stop_daemon "$CTLD_PID" slurmctld
    stop_daemon "$MUNGE_PID" munged
}

status() {
    local name file
    for name in munged slurmctld slurmd; do
        case $name in munged) file=$MUNGE_PID ;; slurmctld) file=$CTLD_PID ;; slurmd) file=$SLURMD_PID ;; esac
        if running "$file"; then echo "$name: running (pid $(cat "$file"))"; else echo "$name: not running"; fi
    done
    echo "node $NODE: $(node_state || true)"
    all_up
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: slurm/local_cluster.sh start|stop|status (got '${1:-}')" >&2; exit 2 ;;
esac
