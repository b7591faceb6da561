#!/usr/bin/env bash
# One GPU, bf16.  launch/single_gpu.sh --data data/10-monkey-species --epochs 80
# SIGTERM, SIGINT or SIGUSR1 to this script (or its process group): the run saves
# its state and stops; continue with --resume auto --run-name NAME.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)  # the checkout; --data, --output-dir stay relative to the working folder
export MONKEYTRAIN_ACCELERATE_CONFIG=$root/accelerate_configs/single_gpu.yaml MONKEYTRAIN_PROCS_PER_NODE=1
exec "$root/slurm/launch_node.sh" "$@"
