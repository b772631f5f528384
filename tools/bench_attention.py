#!/usr/bin/env python
"""Peak device memory and time of one chunk's causal attention at a config's shape (run on a GPU).

  python tools/bench_attention.py --config tools/configs/llama-2-70b.json --windows 8 --seqlen 2048

Compares, in float32 (the engine's compute dtype) and bfloat16, torch's sdpa given grouped
key/value heads (`enable_gqa`, what transformers' sdpa passes without a mask) with the same call
after the heads are repeated (sola_stream/nn/attention.py). Prints one JSON line per variant:
the kernel torch can use, peak allocated bytes above the inputs, and milliseconds (median of 5).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

GIB = 2**30


def usable(q, k, v, gqa: bool) -> list[str]:
    ok = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                sdpa(q[:1, :, :16], k[:1, :, :16], v[:1, :, :16], is_causal=True, enable_gqa=gqa)
            ok.append(backend.name)
        except RuntimeError:
            pass
    return ok


def measure(q, k, v, gqa: bool) -> tuple[float, float]:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        out = sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del out
    return (torch.cuda.max_memory_allocated() - base) / GIB, statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path(__file__).parent / "configs/llama-2-70b.json")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    args = p.parse_args()
    cfg = json.loads(args.config.read_text())
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    gen = torch.Generator("cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        def rand(h):
            return torch.randn(args.windows, h, args.seqlen, dim, device="cuda", dtype=dtype, generator=gen)
        q, k, v = rand(heads), rand(kv), rand(kv)
        for variant in ("grouped (enable_gqa)", "repeated"):
            gqa = variant.startswith("grouped")
            kk, vv = (k, v) if gqa else (k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1))
            row = {"config": args.config.stem, "dtype": str(dtype).removeprefix("torch."), "variant": variant,
                   "windows": args.windows, "seqlen": args.seqlen, "kernels": usable(q, kk, vv, gqa)}
            try:
                row["peak_gib_above_inputs"], row["ms"] = (round(x, 3) for x in measure(q, kk, vv, gqa))
            except torch.OutOfMemoryError as exc:
                row["error"] = str(exc).split(".")[0]
            print(json.dumps(row), flush=True)
            del kk, vv
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
