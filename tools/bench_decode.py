#!/usr/bin/env python
"""Greedy decode speed of dense and compressed models, loaded the way users load them
(transformers AutoModelForCausalLM, trust_remote_code for outputs), batch 1 and batch 16.

    python tools/bench_decode.py --models models/smollm2-135m runs/smol-sola-20 runs/smol-sola-30 \\
        --batches 1 16 --new-tokens 64 [--device cuda] [--dtype bfloat16]

Each model: a 32-token prompt (the same token ids for all), `--new-tokens` greedy tokens with the
KV cache, best of `--repeats` runs after one warm-up; tokens/s counts generated tokens over all
rows. Prints a markdown table with each model's speed relative to the first (dense) model and its
parameter count.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def decode_speed(model, batch: int, new_tokens: int, repeats: int, device: str) -> float:
    ids = torch.arange(100, 132, device=device).repeat(batch, 1)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        best = float("inf")
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, **kwargs)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return batch * new_tokens / best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="dense checkpoint first, then outputs")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--unfused", action="store_true",
                   help="also time each compressed model with its shared-input fusion turned off")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for path in args.models:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=getattr(torch, args.dtype))
        model = model.to(args.device).eval()
        params = sum(p.numel() for p in model.parameters())
        speeds = {b: decode_speed(model, b, args.new_tokens, args.repeats, args.device) for b in args.batches}
        rows.append((Path(path).name, params, speeds))
        print(f"{path}: {params / 1e6:.1f} M parameters, " +
              ", ".join(f"batch {b}: {s:.1f} tok/s" for b, s in speeds.items()), file=sys.stderr)
        fused = [m for m in model.modules() if getattr(m, "shared", None) is not None]
        if args.unfused and fused:
            for m in fused:
                m.shared = None
            speeds = {b: decode_speed(model, b, args.new_tokens, args.repeats, args.device) for b in args.batches}
            rows.append((Path(path).name + " (unfused)", params, speeds))
        del model
    base = rows[0][2]
    print("| model | parameters | " + " | ".join(f"batch {b} tok/s (x dense)" for b in args.batches) + " |")
    print("|---|---|" + "---|" * len(args.batches))
    for name, params, speeds in rows:
        print(f"| {name} | {params / 1e6:.1f} M | " +
              " | ".join(f"{speeds[b]:.1f} ({speeds[b] / base[b]:.2f}x)" for b in args.batches) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
