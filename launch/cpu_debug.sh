#!/usr/bin/env bash
# One CPU process, small images, a few steps: checks the whole pipeline in under a minute.
# Extra flags go to monkeytrain/train.py, e.g.  launch/cpu_debug.sh --data data/10-monkey-species
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)  # the checkout; --data, --output-dir stay relative to the working folder
export MONKEYTRAIN_ACCELERATE_CONFIG=$root/accelerate_configs/cpu.yaml MONKEYTRAIN_PROCS_PER_NODE=1
exec "$root/slurm/launch_node.sh" --debug "$@"
