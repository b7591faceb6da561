#!/usr/bin/env bash
# Every GPU of this node, one DDP rank each, bf16.  --batch-size is per GPU.
#   launch/all_gpus.sh --data data/10-monkey-species --epochs 80
set -euo pipefail
cd "$(dirname "$0")/.."
gpus=$(nvidia-smi --list-gpus | wc -l)
exec accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes "$gpus" \
    monkeytrain/train.py "$@"
