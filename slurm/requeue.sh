# Sourced by launch_node.sh, train_multinode.sbatch and tune.sbatch: the requeue of a job whose
# processes stopped on a signal after saving. The main training process (or tune worker) asks for
# it by writing the file named in MONKEYTRAIN_REQUEUE_FILE, and the script that started it requeues
# once it has ended: `scontrol requeue` ends the job at once, and a launcher, a srun step or a W&B
# service still running then dies of its SIGTERM, with a traceback in the job's log.

# Name this job's request file for the processes started from here, and remove one left by the
# job's life before a requeue. Node-local: the main process runs on the job's first node, where the
# batch script runs too (launch_node.sh's pid file makes the same assumption).
take_requeue_requests() {
    export MONKEYTRAIN_REQUEUE_FILE=${TMPDIR:-/tmp}/monkeytrain-$SLURM_JOB_ID.requeue
    rm -f "$MONKEYTRAIN_REQUEUE_FILE"
}

# Requeue the job if a process asked; $1 names the caller in the log line. Fails when none asked.
requeue_if_asked() {
    [ -s "$MONKEYTRAIN_REQUEUE_FILE" ] || return 1
    rm -f "$MONKEYTRAIN_REQUEUE_FILE"
    trap '' TERM INT  # the requeue's own SIGTERM, while the caller says how it went and exits
    local answer
    if answer=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then answer=ok; fi
    echo "$1: scontrol requeue $SLURM_JOB_ID: $answer" >&2
}
