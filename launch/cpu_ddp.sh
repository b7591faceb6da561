#!/usr/bin/env bash
# Two real CPU ranks (gloo): the DDP code path without a GPU.
# Extra flags go to monkeytrain/train.py, e.g.  launch/cpu_ddp.sh --debug
# SIGTERM, SIGINT or SIGUSR1 to this script (or its process group): both ranks
# save their state and stop; continue with --resume auto --run-name NAME.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)  # the checkout; --data, --output-dir stay relative to the working folder
export MONKEYTRAIN_ACCELERATE_CONFIG=$root/accelerate_configs/cpu_ddp.yaml  # train.py --cpu, the cores split
exec "$root/slurm/launch_node.sh" "$@"
