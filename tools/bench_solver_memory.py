#!/usr/bin/env python
"""Device workspaces of the solver calls the engine makes, and the host memory of the CUDA runtime
(run on a GPU; the planner's constants and tools/simulate_device_memory.py's WORKSPACES).

  python tools/bench_solver_memory.py --cholesky 8192 21504 28672 --eigh 8192

For each size: peak allocated device bytes during torch.linalg.cholesky_ex (float64, as
method/decompose.py calls it) and torch.linalg.eigh, above the input and the outputs, and the
temporaries of gathering a covariance's marginal block three ways (indexing, two index_selects,
the engine's `submatrix`). Then the process's resident host memory after importing torch, after
CUDA's first use, after the first cuBLAS call and after the first cuSOLVER call. One JSON line
per measurement.
"""
from __future__ import annotations

import argparse
import json

import psutil
import torch

from sola_stream.method.decompose import submatrix

GIB = 2**30


def rss() -> float:
    return round(psutil.Process().memory_info().rss / GIB, 3)


def spd(n: int) -> torch.Tensor:
    c = torch.rand(n, n, device="cuda", dtype=torch.float64)
    c = c + c.T
    c.diagonal().add_(2 * n)  # diagonally dominant: positive definite
    return c


def above(fn, outputs_bytes: int) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base - outputs_bytes
    del out
    return round(peak / GIB, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cholesky", type=int, nargs="*", default=[8192, 21504, 28672])
    p.add_argument("--eigh", type=int, nargs="*", default=[8192])
    p.add_argument("--gather", nargs="*", default=["28672:21504"],
                   help="N:M: a float32 N x N covariance's M x M marginal block, gathered as the engine does")
    args = p.parse_args()
    host = {"after import torch": rss()}
    torch.zeros(1, device="cuda")
    host["after CUDA init"] = rss()
    a = torch.randn(256, 256, device="cuda")
    (a @ a).sum().item()
    host["after first cuBLAS call"] = rss()
    torch.linalg.cholesky_ex(a @ a.T + 256 * torch.eye(256, device="cuda"))
    torch.cuda.synchronize()
    host["after first cuSOLVER call"] = rss()
    del a
    for n in args.cholesky:
        c = spd(n)
        ws = above(lambda: torch.linalg.cholesky_ex(c), n * n * 8)
        print(json.dumps({"call": "cholesky_ex", "n": n, "dtype": "float64", "input_gib": round(n * n * 8 / GIB, 3),
                          "workspace_gib": ws}), flush=True)
        del c
        torch.cuda.empty_cache()
    for n in args.eigh:
        c = spd(n)
        ws = above(lambda: torch.linalg.eigh(c), n * n * 8 + n * 8)
        print(json.dumps({"call": "eigh", "n": n, "dtype": "float64", "input_gib": round(n * n * 8 / GIB, 3),
                          "workspace_gib": ws}), flush=True)
        del c
        torch.cuda.empty_cache()
    for spec in args.gather:
        n, m = (int(v) for v in spec.split(":"))
        c = torch.rand(n, n, device="cuda")
        index = torch.randperm(n, device="cuda")[:m].sort().values
        for how, fn in (("c[index[:, None], index]", lambda: c[index[:, None], index]),
                        ("c.index_select(0, index).index_select(1, index)",
                         lambda: c.index_select(0, index).index_select(1, index)),
                        ("submatrix(c, index) (the engine's)", lambda: submatrix(c, index))):
            ws = above(fn, m * m * 4)
            print(json.dumps({"call": how, "n": n, "m": m, "dtype": "float32", "output_gib": round(m * m * 4 / GIB, 3),
                              "temporary_gib": ws}), flush=True)
        del c
        torch.cuda.empty_cache()
    print(json.dumps({"host_rss_gib": host, "torch": torch.__version__,
                      "preferred_linalg_library": str(torch.backends.cuda.preferred_linalg_library())}))


if __name__ == "__main__":
    main()
