# Sourced by launch_node.sh, train_multinode.sbatch and tune.sbatch: the requeue of a job whose
# processes stopped on a signal after saving. The main training process (or tune worker) asks for
# it by writing the file named in MONKEYTRAIN_REQUEUE_FILE, and the script that started it requeues
# once it has ended: `scontrol requeue` ends the job at once, and a launcher, a srun step or a W&B
# service still running then dies of its SIGTERM, with a traceback in the job's log.
#
# Only SLURM's warning before the time limit (--signal=B:USR1@..., to the batch shell) leads to a
# requeue. SIGTERM is scancel, or SLURM's own preemption or time limit (after which SLURM requeues
# by itself where so configured), and SIGINT is Ctrl-C: either means the job ends, even after a
# warning. So the caller's traps note each stop signal it gets (note_stop_signal).

stop_signals=  # " USR1 TERM ...": the stop signals the calling script got, in order
warned_at=     # seconds into the calling script when SLURM's warning (SIGUSR1) first came
note_stop_signal() {
    stop_signals+=" $1"
    if [ "$1" = USR1 ] && [ -z "$warned_at" ]; then warned_at=$SECONDS; fi
}
warned_only() { [[ $stop_signals =~ ^( USR1)+$ ]]; }

# Sets `run_name` and `task_seed`, the flags that go before and after train.py's own (where the last
# of a flag given twice wins, as argparse takes it): the run's name, the same after a requeue, and for a
# task of a job array a seed of its own. $1 names the caller in an error; the rest are train.py's flags.
# Without a job array: runs/slurm-<job id> unless the flags name the run. Each task of an array (`sbatch
# --array=0-2`: the usual three seeds) trains into runs/slurm-<array job>_<task> (as squeue shows it) with
# the seed the flags give (--seed, else their --config preset's, else 0) plus the task id; with several
# tasks, flags that name the run would have every task train into that one run, and stop the job (exit 2).
name_the_run() {
    local caller=$1 seed
    shift
    run_name=(--run-name "slurm-$SLURM_JOB_ID") task_seed=()
    if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
        run_name=(--run-name "slurm-${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID")
        seed=$(given_seed "$@")
        # A state given to --resume continues its run with that run's seed; a seed that is no whole
        # number is left for train.py to refuse.
        if [ -z "$(given_state "$@")" ] && [[ $seed =~ ^[0-9]+$ ]]; then
            task_seed=(--seed "$((10#$seed + SLURM_ARRAY_TASK_ID))")
        fi
    fi
    flags_name_the_run "$@" || return 0
    run_name=()
    if [ "${SLURM_ARRAY_TASK_COUNT:-1}" -gt 1 ]; then
        echo "$caller: error: every task of job array ${SLURM_ARRAY_JOB_ID} would train into the one run that" \
             "--run-name or --resume names; leave it out (each task then trains into" \
             "runs/slurm-${SLURM_ARRAY_JOB_ID}_<task>, seeded by its task id), or submit one task (--array=N)." >&2
        exit 2
    fi
}

# The seed train.py's flags give: the last --seed, else the seed key of the last --config preset (read
# with the job's python, as train.py will read it), else train.py's default, 0.
given_seed() {
    local flag previous= seed= preset= python
    for flag in "$@"; do
        case $flag in
            --seed=*) seed=${flag#--seed=} ;;
            --config=*) preset=${flag#--config=} ;;
        esac
        case $previous in
            --seed) seed=$flag ;;
            --config) preset=$flag ;;
        esac
        previous=$flag
    done
    if [ -z "$seed" ] && [ -n "$preset" ] && python=$(command -v python || command -v python3); then
        seed=$("$python" -c 'import sys, yaml; preset = yaml.safe_load(open(sys.argv[1]))
print(preset.get("seed", "") if isinstance(preset, dict) else "")' "$preset" 2>/dev/null || true)
        [[ $seed =~ ^[0-9]+$ ]] || seed=  # an unreadable preset, or a bad seed in it: train.py says which
    fi
    echo "${seed:-0}"
}

# Whether train.py's flags name the run themselves: --run-name, or --resume with a state's path (it
# continues that state's run, and refuses another name). Else the SLURM scripts name it slurm-<job id>,
# the same after a requeue.
flags_name_the_run() {
    local flag
    for flag in "$@"; do
        case $flag in --run-name|--run-name=*) return 0 ;; esac
    done
    [ -n "$(given_state "$@")" ]
}

# The state path given to --resume among train.py's flags (the last one, as argparse takes it), if any.
given_state() {
    local flag previous= state=
    for flag in "$@"; do
        case $flag in
            --resume=auto) state= ;;
            --resume=*) state=${flag#--resume=} ;;
        esac
        if [ "$previous" = --resume ]; then state=$flag; [ "$flag" != auto ] || state=; fi
        previous=$flag
    done
    echo "$state"
}

# Sets `again` to the flags that continue, after a requeue, a run begun from a given state: from its
# newest state, in its folder (the same flags again would start it over from the state they name).
continue_given_state() {
    again=()
    local state run_dir
    state=$(given_state "$@")
    [ -n "$state" ] && [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || return 0
    case $(basename "$state") in
        step-*) ;;
        *) return 0 ;;  # a run's folder (or its state/): given again, train.py takes its newest state
    esac
    run_dir=$(dirname "$(dirname "$state")")  # RUN/state/step-N
    again=(--resume auto --output-dir "$(dirname "$run_dir")" --run-name "$(basename "$run_dir")")
}

# Name this job's request file for the processes started from here, and remove one left by the
# job's life before a requeue. Node-local: the main process runs on the job's first node, where the
# batch script runs too (launch_node.sh's pid file makes the same assumption).
take_requeue_requests() {
    local tmp=${TMPDIR:-/tmp}
    [ -d "$tmp" ] && [ -w "$tmp" ] || tmp=/tmp  # a TMPDIR that is gone
    export MONKEYTRAIN_REQUEUE_FILE=$tmp/monkeytrain-$SLURM_JOB_ID.requeue
    rm -f "$MONKEYTRAIN_REQUEUE_FILE"
}

# Requeue the job if a process asked and SLURM's warning alone stopped it; $1 names the caller in the
# log line. Fails when it does not requeue. When `scontrol requeue` fails (a job submitted with
# --no-requeue, a cluster that forbids it) it ends the calling script with status 1 and says how to
# continue: $2 (what to do, in words), else resubmit with the flags the process left in the request's
# second line (train.py: --resume auto --run-name NAME), else a general hint.
requeue_if_asked() {
    [ -s "$MONKEYTRAIN_REQUEUE_FILE" ] || return 1
    local flags hint
    flags=$(sed -n 2p "$MONKEYTRAIN_REQUEUE_FILE")
    hint=${2:-"resubmit $(the_job) with ${flags:-"--resume auto --run-name <the run's name>"}"}
    rm -f "$MONKEYTRAIN_REQUEUE_FILE"
    if ! warned_only; then
        local by=${stop_signals##* }
        echo "$1: not requeued: only SLURM's warning (SIGUSR1) to this script requeues the job${by:+, and SIG$by ends it}" >&2
        return 1
    fi
    refuse_a_pointless_requeue "$1" "$hint"
    trap '' TERM INT  # the requeue's own SIGTERM, while the caller says how it went and exits
    local answer
    if ! answer=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then
        answer=${answer//$'\n'/ }  # one line in the log
        echo "$1: scontrol requeue $SLURM_JOB_ID failed (${answer:-no message}); the job ends here (what it trained is saved): to continue, ${hint}." >&2
        exit 1
    fi
    echo "$1: scontrol requeue $SLURM_JOB_ID: ok" >&2
}

# " (task 1 of job array 408)" in a job's first log line, for a task of a job array: squeue shows it as 408_1.
array_task() {
    if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then echo " (task $SLURM_ARRAY_TASK_ID of job array $SLURM_ARRAY_JOB_ID)"; fi
}

# ", seed 5" after the run's name in that line, where name_the_run gave the task a seed.
seed_words() { if [ -n "${task_seed[1]:-}" ]; then echo ", seed ${task_seed[1]}"; fi; }

# What to resubmit to continue a run: the job, or a task of a job array alone, whose task id gives the
# run its seed again (name_the_run).
the_job() {
    if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then echo "this task alone (sbatch --array=$SLURM_ARRAY_TASK_ID ...)"
    else echo "the job"; fi
}

# SLURM sends the warning as soon as less time is left than --signal=B:USR1@SECONDS asks for (up to a
# minute early): at once, when the time limit is not longer than that. Requeued, such a job would be
# warned at once again, save and requeue, every two minutes without end. So a job with a time limit,
# warned within its first minute, ends (status 1, saying how to continue) instead of being requeued when
# at most 3 minutes of it were left (the scripts' 120 s lead and SLURM's minute), or when it had already
# been requeued (a longer lead, warned again as soon). Warned later, or earlier by hand (`scancel
# --signal=USR1`) with more time left, it is requeued. ($1: the caller, $2: what to do.)
refuse_a_pointless_requeue() {
    local limit
    [ "${warned_at:-60}" -lt 60 ] || return 0
    limit=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null \
        | awk '!found && match($0, /TimeLimit=[^ ]+/) { found = 1; print substr($0, RSTART + 10, RLENGTH - 10) }' || true)
    [[ $limit =~ ^([0-9]+-)?[0-9]+:[0-9]+:[0-9]+$ ]] || return 0  # UNLIMITED, or unknown
    if (( $(seconds_of "$limit") - warned_at > 180 )) && [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then return 0; fi
    echo "$1: not requeued: SLURM's warning came ${warned_at} s into the job, whose time limit ($limit) is not" \
        "longer than the warning's lead (--signal=B:USR1@...) by enough to train: requeued, it would be warned" \
        "at once again; the job ends here (what it trained is saved): to continue, $2, and a longer --time." >&2
    exit 1
}

# Seconds in a time limit as scontrol shows it: [days-]hours:minutes:seconds.
seconds_of() {
    local days=0 clock=$1 hours minutes seconds
    if [[ $clock == *-* ]]; then days=${clock%%-*}; clock=${clock#*-}; fi
    IFS=: read -r hours minutes seconds <<< "$clock"
    echo $(( ((10#$days * 24 + 10#$hours) * 60 + 10#$minutes) * 60 + 10#$seconds ))
}
