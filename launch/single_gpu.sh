#!/usr/bin/env bash
# One GPU, bf16.  launch/single_gpu.sh --data data/10-monkey-species --epochs 80
set -euo pipefail
cd "$(dirname "$0")/.."
exec accelerate launch --config_file accelerate_configs/single_gpu.yaml monkeytrain/train.py "$@"
