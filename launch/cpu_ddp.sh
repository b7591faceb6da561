#!/usr/bin/env bash
# Two real CPU ranks (gloo): the DDP code path without a GPU.
# Extra flags go to monkeytrain/train.py, e.g.  launch/cpu_ddp.sh --debug
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # two ranks share the cores
exec accelerate launch --config_file accelerate_configs/cpu_ddp.yaml monkeytrain/train.py --cpu "$@"
