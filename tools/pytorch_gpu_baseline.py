#!/usr/bin/env python3
"""PyTorch eager on the GPU, the reference figures for the CUDA backend.

Times, on cuda:0 with random weights (the SAM-UNet-50 of pytorch_baseline.py):
one ViT-B window block at batch 1 and 64, the image side (ResNet + ViT +
adapters + neck + multi-scale feature) at batch 1, 8 and 64, and the decoder
for 1 and 32 boxes; fp32 (TF32 off) and bf16 (autocast). Medians of CUDA-event
timings after warm-up. One JSON line per figure.

    python3 tools/pytorch_gpu_baseline.py
"""
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_baseline import SamUnet  # noqa: E402


def timed(fn, runs=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = SamUnet().eval().to(dev)
    name = torch.cuda.get_device_name(0)
    out = lambda **kw: print(json.dumps({"impl": "pytorch-eager", "torch": torch.__version__, "device": name, **kw}), flush=True)
    with torch.inference_mode():
        for dt in ("fp32", "bf16"):
            ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dt == "bf16" else (lambda: torch.autocast("cuda", enabled=False))
            blk = model.image_encoder.sam_img_encoder.blocks[0]
            for b in (1, 64):
                x = torch.randn(b, 16, 16, 768, device=dev)
                with ctx():
                    ms = timed(lambda: blk(x))
                out(what="vit_block_window14", dtype=dt, batch=b, ms=round(ms, 4))
            for b in (1, 8, 64):
                x = torch.randn(b, 3, 256, 256, device=dev)
                with ctx():
                    ms = timed(lambda: model.encode(x), runs=5 if b == 64 else 10)
                out(what="image_side", dtype=dt, batch=b, ms=round(ms, 3), images_per_s=round(1000 * b / ms, 1))
            x = torch.randn(1, 3, 256, 256, device=dev)
            with ctx():
                emb, msf = model.encode(x)
                for n in (1, 32):
                    boxes = torch.tensor([[20.0, 30.0, 120.0, 140.0]] * n, device=dev)
                    ms = timed(lambda: model.decode(emb, msf, boxes))
                    out(what="decoder", dtype=dt, boxes=n, ms=round(ms, 4), per_box_us=round(1000 * ms / n, 1))


if __name__ == "__main__":
    main()
