#!/usr/bin/env bash
# One machine's share of a training run: a single `accelerate launch` that
# starts this machine's training processes, with SIGUSR1, SIGTERM and SIGINT
# forwarded to them. launch/*.sh use it too, outside SLURM.
# slurm/train.sbatch runs it in the batch shell, slurm/train_multinode.sbatch
# once per node through srun, and the tests run it directly; all of them set
# the same variables (every one has a default):
#
#   NUM_MACHINES    machines in the run                      (1)
#   MACHINE_RANK    this machine, 0 .. NUM_MACHINES-1         (0)
#   MAIN_ADDR       address of the rendezvous host            (127.0.0.1)
#   MAIN_PORT       rendezvous port there                     (20000 + SLURM_JOB_ID % 20000, else 29500;
#                                                             on one machine, the next free one if taken)
#   MONKEYTRAIN_ACCELERATE_CONFIG   Accelerate config file, a relative path from the working directory
#                                   or else the checkout      (accelerate_configs/multi_gpu.yaml on one
#                                   machine, multi_node.yaml on several, cpu_ddp.yaml on one in CPU mode)
#   MONKEYTRAIN_CPU=1               CPU mode: train.py --cpu and no mixed precision (gloo ranks);
#                                   implied by a config file named cpu*.yaml
#   MONKEYTRAIN_PROCS_PER_NODE      training processes on this machine (1 with a one-process config,
#                                   distributed_type NO: cpu.yaml, single_gpu.yaml; else the GPUs SLURM
#                                   gave it, else those CUDA_VISIBLE_DEVICES names, else every GPU
#                                   nvidia-smi lists; 2 in CPU mode)
#   MONKEYTRAIN_TRAIN_SCRIPT        what accelerate runs      (the checkout's monkeytrain/train.py; tests use a stub)
#   MONKEYTRAIN_PID_FILE            where this script's pid goes, so a signal can be sent to it
#                                   ($TMPDIR, or /tmp if that is no writable folder,
#                                   /monkeytrain-$SLURM_JOB_ID-machine$MACHINE_RANK.pid;
#                                   outside SLURM, local-<this pid> instead of the job id)
#   MONKEYTRAIN_REQUEUE_FILE        under SLURM, where the main process asks for a requeue; when it is
#                                   set, whoever set it requeues (slurm/requeue.sh), else this script
#
#   slurm/launch_node.sh [train.py flags ...]
#   slurm/launch_node.sh --forward-signal USR1     # signal the run started above on this machine
#
# It runs in the caller's working directory, as `python monkeytrain/train.py` would: relative
# --data, --output-dir and the default runs/ are taken from there, not from the checkout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)  # the checkout

die() { echo "launch_node.sh: error: $*" >&2; exit 2; }
is_count() { [[ $1 =~ ^[0-9]+$ ]]; }
# A relative path from a variable: from the working directory if it is there, else from the checkout
# (where the README's examples name accelerate_configs/... from).
from_checkout() { if [[ $1 != /* && ! -e $1 && -e $root/$1 ]]; then echo "$root/$1"; else echo "$1"; fi; }
# GPUs this machine's processes may use: what SLURM's --gres gave it, else those CUDA_VISIBLE_DEVICES
# names (CUDA stops at the first entry that is no index or UUID: -1, NoDevFiles), else all nvidia-smi
# lists (counting its "GPU n: ..." lines: without a driver it prints an error on stdout).
gpu_count() {
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        local id n=0
        for id in ${CUDA_VISIBLE_DEVICES//,/ }; do [[ $id =~ ^([0-9]+|GPU-.+|MIG-.+)$ ]] || break; n=$((n + 1)); done
        echo "$n"
    elif command -v nvidia-smi >/dev/null; then
        nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

# Accelerate starts one process for a config with distributed_type NO, whatever --num_processes says;
# counted as more, the launch would go without --quiet, and a bad flag end in Accelerate's traceback.
one_process_config() { grep -Eq "^distributed_type:[[:space:]]*['\"]?NO['\"]?[[:space:]]*(#.*)?$" "$1"; }

NUM_MACHINES=${NUM_MACHINES:-1}
MACHINE_RANK=${MACHINE_RANK:-0}
MAIN_ADDR=${MAIN_ADDR:-127.0.0.1}
source "$root/slurm/ports.sh"
port_given=${MAIN_PORT:+1}
if [ -n "${SLURM_JOB_ID:-}" ] && [[ $SLURM_JOB_ID =~ ^[0-9]+$ ]]; then
    # One port per job, so two jobs sharing a node do not collide on Accelerate's default 29500.
    MAIN_PORT=${MAIN_PORT:-$(job_port "$SLURM_JOB_ID")}
fi
MAIN_PORT=${MAIN_PORT:-29500}
tmp=${TMPDIR:-/tmp}
[ -d "$tmp" ] && [ -w "$tmp" ] || tmp=/tmp  # a TMPDIR that is gone would lose the pid file
pid_file=${MONKEYTRAIN_PID_FILE:-$tmp/monkeytrain-${SLURM_JOB_ID:-local-$$}-machine${MACHINE_RANK}.pid}

if [ "${1:-}" = --forward-signal ]; then
    # Used by train_multinode.sbatch: SLURM can only signal a job step as a
    # whole, which would also hit the launcher and DataLoader workers; the
    # launch below forwards a signal sent to it to its training processes only.
    [ -s "$pid_file" ] || die "no run on this machine ($pid_file is missing); nothing to signal."
    exec kill -s "${2:-USR1}" "$(cat "$pid_file")"
fi

is_count "$NUM_MACHINES" && [ "$NUM_MACHINES" -ge 1 ] || die "NUM_MACHINES must be a positive whole number, got '$NUM_MACHINES'."
is_count "$MACHINE_RANK" && [ "$MACHINE_RANK" -lt "$NUM_MACHINES" ] \
    || die "MACHINE_RANK must be a whole number below NUM_MACHINES ($NUM_MACHINES), got '$MACHINE_RANK'."
is_count "$MAIN_PORT" && [ "$MAIN_PORT" -ge 1 ] && [ "$MAIN_PORT" -le 65535 ] \
    || die "MAIN_PORT must be a TCP port (1-65535), got '$MAIN_PORT'."
# Decimal from here on: in $((...)) a leading zero would make 08 an octal error.
NUM_MACHINES=$((10#$NUM_MACHINES)) MACHINE_RANK=$((10#$MACHINE_RANK)) MAIN_PORT=$((10#$MAIN_PORT))
# A taken port (slurm/ports.sh says what then goes wrong). On one machine the port is this launch's
# alone: one left to this script moves on to the next free one. Machine 0 of several (Accelerate's
# rendezvous host, the one it checks) cannot tell the others: a port in use there ends the launch.
if [ "$NUM_MACHINES" = 1 ] && [ -z "$port_given" ]; then
    MAIN_PORT=$(first_free_port "$MAIN_PORT") \
        || die "no free port among the 100 from $MAIN_PORT on $(hostname -s); set MAIN_PORT to a free one."
elif [ "$MACHINE_RANK" = 0 ]; then
    port_is_free "$MAIN_PORT" \
        || die "the rendezvous port MAIN_PORT=$MAIN_PORT is in use on $(hostname -s); set MAIN_PORT to a free port."
fi

# --- which config, which device, how many processes -------------------------
cpu=${MONKEYTRAIN_CPU:-0}
config=${MONKEYTRAIN_ACCELERATE_CONFIG:-}
if [ -z "$config" ]; then
    if [ "$NUM_MACHINES" -gt 1 ]; then config=accelerate_configs/multi_node.yaml
    elif [ "$cpu" = 1 ]; then config=accelerate_configs/cpu_ddp.yaml
    else config=accelerate_configs/multi_gpu.yaml; fi
fi
config=$(from_checkout "$config")
[ -f "$config" ] || die "Accelerate config '$config' does not exist; set MONKEYTRAIN_ACCELERATE_CONFIG to a file in accelerate_configs/."
case "$(basename "$config")" in cpu*) cpu=1 ;; esac
[ "$cpu" = 0 ] || [ "$cpu" = 1 ] || die "MONKEYTRAIN_CPU must be 0 or 1, got '$cpu'."

gpus=0
if [ "$cpu" = 0 ]; then gpus=$(gpu_count); fi
# Also with MONKEYTRAIN_PROCS_PER_NODE set (launch/single_gpu.sh): a GPU config must not train on the CPU.
# A SLURM job is submitted again (the environment goes with it), not started by hand here.
if [ -n "${SLURM_JOB_ID:-}" ]; then
    cpu_ranks="submit it to a partition with GPUs (sbatch --gres=gpu:N), or for CPU ranks submit it with"
    cpu_ranks+=" MONKEYTRAIN_CPU=1 set (MONKEYTRAIN_CPU=1 sbatch --gres=none ...)"
else
    cpu_ranks="for CPU ranks set MONKEYTRAIN_CPU=1 (or MONKEYTRAIN_ACCELERATE_CONFIG=accelerate_configs/cpu_ddp.yaml),"
    cpu_ranks+=" or use launch/cpu_ddp.sh or launch/cpu_debug.sh here"
fi
[ "$cpu" = 1 ] || [ "$gpus" -ge 1 ] \
    || die "no GPU found on $(hostname -s)${SLURM_JOB_ID:+ for job $SLURM_JOB_ID}; $cpu_ranks."
procs=${MONKEYTRAIN_PROCS_PER_NODE:-}
if [ -z "$procs" ]; then
    if one_process_config "$config"; then procs=1
    elif [ "$cpu" = 1 ]; then procs=2; else procs=$gpus; fi
elif is_count "$procs" && [ "$procs" -ge 1 ]; then
    procs=$((10#$procs))
else
    die "MONKEYTRAIN_PROCS_PER_NODE must be a whole number of at least 1, got '$procs'."
fi

script=$(from_checkout "${MONKEYTRAIN_TRAIN_SCRIPT:-monkeytrain/train.py}")
[ -f "$script" ] || die "training script '$script' does not exist; set MONKEYTRAIN_TRAIN_SCRIPT to a file, or leave it unset."

accelerate=$(command -v accelerate || true)
if [ -z "$accelerate" ] && [ -x "$root/.venv/bin/accelerate" ]; then accelerate=$root/.venv/bin/accelerate; fi
[ -n "$accelerate" ] || die "'accelerate' is not on PATH; activate the environment monkeytrain is installed in before sbatch (jobs inherit your PATH)."

# Run by accelerate's own Python (a console script names it on its first line), `accelerate launch` goes
# through slurm/launcher.py, which leaves out the elastic agent's report of a stop signal forwarded here.
interpreter=$(head -n 1 "$accelerate" 2>/dev/null | sed -n 's|^#!\(/[^ ]*/python[0-9.]*\)$|\1|p' || true)
if [ -x "$interpreter" ]; then accelerate=("$interpreter" "$root/slurm/launcher.py"); fi
launch=("${accelerate[@]}" launch --config_file "$config"
        --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK"
        --num_processes "$((NUM_MACHINES * procs))"   # Accelerate wants the total over all machines
        --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT")
# The c10d rendezvous keeps its keys under torchrun's --rdzv-id, which Accelerate leaves at "none" (torchrun
# reads PET_RDZV_ID instead): the job's id, so that a machine which meets another job's rendezvous on its
# port (taken after train_multinode.sbatch chose it) waits for its own job's machines instead of joining.
if [ "$NUM_MACHINES" -gt 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then export PET_RDZV_ID=${PET_RDZV_ID:-$SLURM_JOB_ID}; fi
train_flags=()
if [ "$((NUM_MACHINES * procs))" = 1 ]; then
    # One process: accelerate's --quiet keeps its CalledProcessError traceback from
    # following train.py's one-line error (several processes have no such switch).
    launch+=(--quiet)
fi
if [ "$cpu" = 1 ]; then
    # The multi-process launcher with Accelerator(cpu=True) in train.py gives real
    # gloo ranks (`accelerate launch --cpu` would start only one process).
    launch+=(--mixed_precision no)
    train_flags+=(--cpu)
    cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / procs > 0 ? cpus / procs : 1))}
fi

# --- launch, forwarding stop signals to the training processes -------------
# SLURM's warning signal (--signal=B:USR1@...) reaches only the batch shell, and
# `kill`, `timeout`, systemd and Docker signal the top process or its process
# group. Either way this shell passes SIGUSR1, SIGTERM and SIGINT on to the
# training processes, which save their state and exit 0; the launcher itself
# never sees them (its own session, so a process-group signal misses it), so it
# ends cleanly instead of with torchrun's SignalException traceback, and this
# script exits as an interrupted job does (128 + the signal). The training
# processes are the launcher's children (torch's elastic agent starts each in its
# own session), so they are signalled by parent pid: not the launcher, nor
# DataLoader workers. setpriv --pdeathsig: should this shell be SIGKILLed, the
# launcher gets SIGTERM, passes it on, and no rank trains on as an orphan.
forward() {
    note_stop_signal "$1"
    echo "launch_node.sh: machine $MACHINE_RANK: forwarding SIG$1 to the training processes" >&2
    pending=$1 pending_since=$SECONDS delivered=" "
    deliver
}
stop() {
    local again=$stopped_by
    stopped_by=$1
    forward "$1"
    if [ -n "$again" ]; then  # a second TERM or Ctrl-C: to every training process at once
        pending_since=$((SECONDS - HOLD_SECONDS))
        deliver
    fi
}
# A training process can take the signal once it catches SIGUSR1 (train.py's handlers, installed after
# seconds of imports): before that SIGUSR1 would be ignored, SIGTERM would kill it unsaved, and early on
# the launcher has not even started it. So the signal stays pending, and the loop below sends it to each
# training process once that one catches SIGUSR1, until the launcher ends. A TERM or INT is held back
# HOLD_SECONDS at most (or not at all when it comes twice): a process that never gets that far (waiting
# for its peers, say) has trained nothing, and must still be stoppable.
HOLD_SECONDS=30
deliver() {
    local pid
    [ -n "$pending" ] && [ -n "$launcher" ] || return 0
    local held=1
    if [ "$pending" != USR1 ] && (( SECONDS - pending_since >= HOLD_SECONDS )); then held=0; fi
    for pid in $(pgrep -P "$launcher"); do
        [[ $delivered == *" $pid "* ]] && continue
        if { [ "$held" = 0 ] || catches_usr1 "$pid"; } && kill -s "$pending" "$pid" 2>/dev/null; then
            delivered+="$pid "
        fi
    done
}
catches_usr1() {
    local caught  # the process's mask of signals with a handler, in hex
    caught=$(awk '/^SigCgt:/ {print $2}' "/proc/$1/status" 2>/dev/null) && [ -n "$caught" ] \
        && (( (16#$caught >> ($(kill -l USR1) - 1)) & 1 ))
}
# Under SLURM the main training process asks for a requeue, and it comes below once the launcher has
# ended (slurm/requeue.sh says why); unless the script that started this one has named the request
# file, as train_multinode.sbatch does: it requeues once every machine's launch has ended.
source "$root/slurm/requeue.sh"  # and note_stop_signal: a requeue follows SLURM's warning alone
requeues_here=0
if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${MONKEYTRAIN_REQUEUE_FILE:-}" ]; then
    take_requeue_requests
    requeues_here=1
fi
# The traps and the pid file come before the launch, so that a signal sent at once is kept.
launcher= pending= pending_since=0 delivered=" " stopped_by=
trap 'forward USR1' USR1
trap 'stop TERM' TERM
trap 'stop INT' INT
trap 'rm -f "$pid_file"' EXIT
{ echo $$ > "$pid_file"; } 2>/dev/null \
    || die "cannot write the pid file $pid_file; set MONKEYTRAIN_PID_FILE (or TMPDIR) to a writable folder's file."
detach=(setsid)
if setpriv --pdeathsig TERM true 2>/dev/null; then detach+=(setpriv --pdeathsig TERM); fi
# The launcher starts with SIGUSR1 ignored, so a USR1 sent to a whole job step
# (`scancel --signal=USR1 JOB`) cannot kill it; the training processes inherit
# the ignore until train.py installs its own handler.
(trap '' USR1; exec "${detach[@]}" "${launch[@]}" "$script" "${train_flags[@]}" "$@") &
launcher=$!

# `wait` returns early whenever a trapped signal arrives: wait again until the
# launcher is gone (with a signal pending, look for training processes to take it
# twice a second instead), then once more for its exit status (bash keeps it).
while kill -0 "$launcher" 2>/dev/null; do
    if [ -n "$pending" ]; then deliver; sleep 0.5; else wait "$launcher" || true; fi
done
status=0
wait "$launcher" || status=$?
# (A requeue that fails ends this script with status 1, saying how to continue.)
if [ "$requeues_here" = 1 ] && requeue_if_asked "launch_node.sh: machine $MACHINE_RANK"; then
    exit "$status"
fi
if [ -n "$stopped_by" ] && [ "$status" = 0 ]; then
    exit $((128 + $(kill -l "$stopped_by")))  # the training processes saved and stopped
fi
exit "$status"
