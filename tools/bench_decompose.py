#!/usr/bin/env python
"""Timings of the decomposition alternatives behind `decompose.spectrum`, on this device.

For a whitened weight M = W L (m x n), the energies and the basis the factors need come either
from a thin SVD of M, or from an eigendecomposition of its smaller Gram matrix (M^T M or M M^T).
Both are exact up to rounding (the test suite checks the factors against float64 references);
this measures which is faster, in float32 and float64, plus the Cholesky of the covariance.

  python tools/bench_decompose.py                      # SmolLM2 and 7B shapes
  python tools/bench_decompose.py --shapes 24371x8192  # the 70B FFN marginal part (GPU)
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def timed(fn, device, repeat: int) -> float:
    fn()  # warm-up (kernels, workspace)
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["1536x576", "4096x4096", "11008x4096"],
                   help="m x n of the matrices (m >= n: FFN gate/up, or q/o)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    for shape in args.shapes:
        m, n = (int(v) for v in shape.split("x"))
        for dt in args.dtypes:
            dtype = getattr(torch, dt)
            gen = torch.Generator(device=device).manual_seed(0)
            w = torch.randn(m, n, device=device, dtype=dtype, generator=gen)
            x = torch.randn(2 * n, n, device=device, dtype=dtype, generator=gen)
            c = x.T @ x
            row = {"device": name, "shape": shape, "dtype": dt,
                   "svd_s": timed(lambda: torch.linalg.svd(w, full_matrices=False), device, args.repeat),
                   "gram_eigh_s": timed(lambda: torch.linalg.eigh(w.T @ w), device, args.repeat),
                   "cholesky_s": timed(lambda: torch.linalg.cholesky_ex(c), device, args.repeat)}
            row["svd_over_gram"] = round(row["svd_s"] / row["gram_eigh_s"], 2)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
