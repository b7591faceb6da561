#!/usr/bin/env bash
# Everything issue 10 (fast path v2) still has to measure on a GPU, in one device call of about
# 8 minutes. Prepare it here, then run it there with the data set carried in:
#
#   mkdir -p .device_data && cp -r ../shared/data/10-monkey-species .device_data/   # git-ignored, 47 MB
#   device run, carry [".device_data"], timeout_s 560:
#       bash benchmarks/gpu_session.sh .device_data/10-monkey-species "$OUT"
#
# It writes one log per step under OUT (default gpu-session/) and prints a summary at the end.
# SMOKE=1 runs the same steps as tiny CPU runs (about 3 minutes on 2 cores), to check the plumbing
# before GPU minutes are spent on it.
# Each step has its own time limit, so that one hang cannot eat the others' minutes. Budget on one
# H200 (from the 150-epoch default's 60 s): versions 10 s, throughput 2 x 45 s (each with a graphed
# row), the default eager then graphed (the same seed: agreement and the time saved) 2 x 60 s, the
# candidate recipe graphed x 3 seeds about 40-60 s each, then two short graphed runs (AdamW, gradient
# accumulation) and a short fp16 one of about 20 s each.
set -uo pipefail
data=$(cd "${1:?usage: benchmarks/gpu_session.sh DATA [OUT]}" && pwd)
out=$(mkdir -p "${2:-gpu-session}" && cd "${2:-gpu-session}" && pwd)
cd "$(dirname "$0")/.."

step() {  # step NAME SECONDS COMMAND...: run it with a limit, log it, say how it ended
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - started)) s" | tee -a "$out/summary.txt"
    tail -n 12 "$out/$name.log" >>"$out/summary.txt"
}

if [ -n "${SMOKE:-}" ]; then  # later flags win: these shrink every run
    train_extra=(--debug --model resnet10t --image-size 64 --min-train-size 32 --tta-shift 4 --epochs 2)
    throughput_extra=(--tiny --model resnet10t) compile=() fp16=()  # fp16 needs a GPU
else
    train_extra=() throughput_extra=() compile=(--compile) fp16=(--mixed-precision fp16)
fi

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no GPU"
  python -c "import torch, timm, accelerate; print('torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__)"
} >"$out/summary.txt" 2>&1

# Warm the caches (stored views, channel statistics) with the first run, as the targets assume.
step default-once 120 python benchmarks/time_to_accuracy.py --data "$data" --seeds 1 "${train_extra[@]}"
# The same run with each step replayed from a CUDA graph: the same accuracy within seed noise, sooner.
step default-graphed 120 python benchmarks/time_to_accuracy.py --data "$data" --seeds 1 --cuda-graphs \
    "${train_extra[@]}"
step throughput-256 90 python benchmarks/throughput.py --data "$data" --batch-size 256 "${compile[@]}" \
    --steps 40 --warmup-steps 10 "${throughput_extra[@]}"
step throughput-64 60 python benchmarks/throughput.py --data "$data" --batch-size 64 --steps 60 --warmup-steps 15 \
    "${throughput_extra[@]}"
# The candidate default: progressive resizing (128 -> 224 px, the last quarter at 224), shifted
# test-time views, the time saved spent on more epochs and per-sample MixUp/CutMix, graphed steps.
step candidate-graphed 240 python benchmarks/time_to_accuracy.py --data "$data" --seeds 3 --cuda-graphs \
    --min-train-size 128 --tta-shift 8 --epochs 200 --mixup-alpha 0.2 --cutmix-alpha 1.0 --mix-prob 0.5 \
    "${train_extra[@]}"
# Last, as they only check that these captures work on CUDA (emulated on the CPU in the tests):
# short graphed runs with AdamW and with gradient accumulation.
step graphed-adamw 45 python benchmarks/time_to_accuracy.py --data "$data" --seeds 1 --cuda-graphs --epochs 3 \
    --optimizer adamw --lr 0.002 "${train_extra[@]}"
step graphed-accumulating 45 python benchmarks/time_to_accuracy.py --data "$data" --seeds 1 --cuda-graphs \
    --epochs 3 --grad-accum-steps 2 "${train_extra[@]}"
# fp16, the default on GPUs older than Ampere, has never trained on a GPU here: that it does (eager).
step fp16-eager 45 python benchmarks/time_to_accuracy.py --data "$data" --seeds 1 --epochs 3 "${fp16[@]}" \
    "${train_extra[@]}"
cat "$out/summary.txt"
