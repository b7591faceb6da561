#!/usr/bin/env bash
# Every GPU of this node, one DDP rank each, bf16.  --batch-size is per GPU.
#   launch/all_gpus.sh --data data/10-monkey-species --epochs 80
# SIGTERM, SIGINT or SIGUSR1 to this script (or its process group): every rank
# saves its state and stops; continue with --resume auto --run-name NAME.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)  # the checkout; --data, --output-dir stay relative to the working folder
export MONKEYTRAIN_ACCELERATE_CONFIG=$root/accelerate_configs/multi_gpu.yaml
exec "$root/slurm/launch_node.sh" "$@"
