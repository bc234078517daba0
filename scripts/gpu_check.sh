#!/usr/bin/env bash
# GPU smoke check of the paper configuration (presets/paper_hrnet4_okd.yaml: HRNet-W32, n_stage 4,
# 192x256, batch 32, KL 3<-4, channels-last) through the Trainer, on built-in synthetic data
# generated into a temporary folder: one short epoch (loss couples, unused heads under DDP's
# find_unused_parameters, fused Adam, one validation), then a second fit that resumes the finished
# run from last.pt. Three times, one per train.precision: fp32 (the preset's), bf16, and auto
# (bf16 with bf16 tensor cores, else fp16 + GradScaler). Prints the resolved device and precision,
# img/s and peak GPU memory; exits 1 on a non-finite loss or score. Downloads nothing.
#
#   scripts/gpu_check.sh [steps=10] [extra okdpose.gpu_check args, e.g. --set train.batch_size=16]
#
# Exits 2 with a clear message when torch sees no CUDA GPU. The logic is okdpose.gpu_check
# (tests/test_gpu_check.py runs it on the CPU with a tiny model).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
STEPS="${1:-10}"
shift || true
for precision in fp32 bf16 auto; do
    "$PY" -m okdpose.gpu_check --device cuda --steps "$STEPS" --set "train.precision=$precision" "$@"
done
