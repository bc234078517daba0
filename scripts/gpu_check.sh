#!/usr/bin/env bash
# GPU smoke check of the paper configuration: a few training steps of the multi-output HRNet-W32
# (n_stage 4, 12 joints, input 192x256 (w x h), heatmaps 48x64, batch 32, AMP as the Trainer uses
# it, full OKD loss) on random tensors, contiguous and channels-last (train.channels_last); prints
# img/s and peak GPU memory of each, and the channels-last speedup. Downloads nothing.
#
#   scripts/gpu_check.sh [steps=10] [batch=32]
#
# Exits 2 with a clear message when torch sees no CUDA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
STEPS="${1:-10}" BATCH="${2:-32}" exec "$PY" - <<'EOF'
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    print(f"gpu_check: no CUDA GPU visible to torch {torch.__version__} (cuda build: {torch.version.cuda}); "
          "nothing to check on this machine. Run it where `nvidia-smi` lists a GPU.", file=sys.stderr)
    sys.exit(2)

from okdpose.losses import OKDLoss
from okdpose.model import MultiOutHRNet, forward_flops

steps, batch = int(os.environ["STEPS"]), int(os.environ["BATCH"])
image_w, image_h, joints = 192, 256, 12
dev = torch.device("cuda")
torch.backends.cudnn.benchmark = True
gflop = forward_flops(MultiOutHRNet(joints, width=32, n_stage=4, multi=True), (image_w, image_h)) / 1e9
loss_fn = OKDLoss((1, 2, 3, 4), ((1, 4), (2, 4), (3, 4)), kld_weight=1.0)
amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16    # as okdpose.train.Trainer
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, AMP {str(amp_dtype).split('.')[-1]}")
print(f"  W32 n_stage 4 multi, {image_w}x{image_h} -> {image_w // 4}x{image_h // 4} heatmaps, batch {batch}, "
      f"OKD loss, {steps} steps per memory format (train.channels_last false / true)")
rates = {}
for fmt in (torch.contiguous_format, torch.channels_last):
    name = "channels_last" if fmt == torch.channels_last else "contiguous"
    torch.manual_seed(0)
    model = MultiOutHRNet(joints, width=32, n_stage=4, multi=True).to(dev, memory_format=fmt).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    x = torch.randn(batch, 3, image_h, image_w, device=dev).contiguous(memory_format=fmt)
    target = torch.rand(batch, joints, image_h // 4, image_w // 4, device=dev)
    weight = torch.ones(batch, joints, device=dev)

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=amp_dtype):
            outputs = model(x)
        total, _ = loss_fn([o.float() for o in outputs], target, weight)
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
        return total

    for _ in range(3):                       # warm-up: cudnn autotuning, allocator
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        total = step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    loss = float(total)
    if loss != loss:
        sys.exit(f"gpu_check: non-finite loss {loss} ({name})")
    ips = rates[name] = steps * batch / dt
    print(f"  {name:13s}: {ips:.1f} img/s ({dt / steps * 1e3:.0f} ms/step, {3 * gflop * ips / 1e3:.2f} TFLOP/s at "
          f"3x {gflop:.1f} GFLOP/image); peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
          f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved; final loss {loss:.4g}")
    del model, opt, x, target, weight
    torch.cuda.empty_cache()
print(f"  channels_last speedup: {rates['channels_last'] / rates['contiguous']:.2f}x")
EOF
