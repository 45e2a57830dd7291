#!/usr/bin/env bash
# The SD-v1.4-shaped guidance benchmark at 512x512 on one GPU, in one command (under 8 minutes):
#   benchmarks/gpu.sh [OUT.json]        (default OUT: benchmarks/results/sd_gpu_512.json; log: logs/bench_sd_gpu.log)
# fp16 components, 40 k-LMS steps, guidance every 5, main batch 8, images/s at batches 1, 4, 8 and 16; options:
# unet, unet+gvae (TAESD-shaped guidance decoder), detached, unet+ckpt, unet+bf16, unet+gvae+bf16, detached+bf16,
# unet+frozen (see --help of the benchmark).
# Uses the project's .venv as it is and installs nothing. The benchmark stops starting new runs after 360 s of
# measuring and keeps what it measured (its JSON is rewritten after each section); `timeout` interrupts it at 440 s.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=.venv/bin/python
OUT="${1:-benchmarks/results/sd_gpu_512.json}"
LOG=logs/bench_sd_gpu.log

if [[ ! -x "$PY" ]]; then
    echo "gpu.sh: $PY not found; create the project's virtual environment first (make install)" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: torch sees no CUDA device (torch.cuda.is_available() is False); this benchmark needs a GPU" >&2
    exit 3
fi

mkdir -p logs "$(dirname "$OUT")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
"$PY" -c 'import torch; print("gpu.sh:", torch.cuda.get_device_name(0), "torch", torch.__version__)'

timeout --signal=INT --kill-after=20 440 \
    "$PY" -m benchmarks.bench_guidance \
    --model sd --device cuda --dtype float16 --height 512 --steps 40 --interval 5 \
    --batch 8 --batches 1,4,8,16 --repeats 2 --warmup 1 --time-budget 360 \
    --json "$OUT" 2>&1 | tee "$LOG"

echo "gpu.sh: wrote $OUT"
