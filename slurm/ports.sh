# Sourced by launch_node.sh and train_multinode.sbatch: the rendezvous port, which must be free on the
# machine that hosts the rendezvous. A taken one fails worse than it looks: Accelerate stops machine 0
# with a traceback, and the other machines, finding a rendezvous store on that port (another job's,
# whose ports collide: job ids 20000 apart), join that job's rendezvous instead of waiting for theirs.

FIRST_JOB_PORT=20000 JOB_PORTS=20000  # job ports: 20000-39999

# The port a SLURM job starts from: the same after a requeue, distinct between jobs running together
# unless their ids are JOB_PORTS apart.
job_port() { echo $((FIRST_JOB_PORT + $1 % JOB_PORTS)); }

# Nothing on this machine holds port $1: a socket can bind it on every address. Without a python to
# ask, say it is free (the launch then finds out, as before).
port_is_free() {
    local python
    python=$(command -v python || command -v python3) || return 0
    "$python" -S -c 'import socket, sys; socket.socket().bind(("", int(sys.argv[1])))' "$1" 2>/dev/null
}

# The first free port from $1 on (among the job ports, wrapping round), 100 tried at most; fails when
# none was.
first_free_port() {
    local port=$1 tried
    for ((tried = 0; tried < 100; tried++)); do
        if port_is_free "$port"; then echo "$port"; return 0; fi
        port=$((FIRST_JOB_PORT + (port - FIRST_JOB_PORT + 1) % JOB_PORTS))
    done
    return 1
}
