"""One block's compression: prime/marginal split, whitened factorization, rank allocation.

Input: the block's original weights and its calibration statistics. Output: the compressed
block's tensors (names relative to the block), the per-layer specs (see nn/build.py) and a report.
Pure with respect to files and devices: the engine decides where tensors live.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sola_stream.method.allocate import Candidate, allocate, uniform_rank
from sola_stream.families import Family
from sola_stream.method.decompose import Spectrum, cholesky_whitener, spectrum
from sola_stream.nn.build import linear_params

METHODS = ("sola", "svd-llm", "svd")


@dataclass
class BlockResult:
    tensors: dict[str, torch.Tensor]
    specs: dict[str, dict]
    dense_params: int
    kept_params: int
    error: dict[str, float]  # per layer: dropped fraction of its whitened output energy
    damping: dict[str, float]


def stacked(index: torch.Tensor, count: int, chunks: int) -> torch.Tensor:
    """Row indices of neurons `index` in a layer stacking `chunks` blocks of `count` neurons."""
    return torch.cat([index + k * count for k in range(chunks)]) if chunks > 1 else index


def prime_order(scores: torch.Tensor, prime_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(prime, marginal) neuron indices, each ascending: the top `prime_ratio` by score are prime.
    Stable sort so ties break by index and runs are reproducible."""
    n_prime = int(round(prime_ratio * scores.numel()))
    order = torch.sort(-scores.double().cpu(), stable=True).indices
    return order[:n_prime].sort().values, order[n_prime:].sort().values


@torch.no_grad()
def compress_block(weights: dict[str, torch.Tensor], covs: dict[str, torch.Tensor], scores: torch.Tensor | None,
                   family: Family, method: str, ratio: float, prime_ratio: float,
                   storage_dtype: torch.dtype) -> BlockResult:
    """`weights`: block tensors by name relative to the block (linears' `.weight`, biases, norms).
    `covs`: input covariances by group key (see pipeline/block_forward.py); the FFN-neuron one is consumed (removed
    from the dict once whitened, so a 70B block's 3 GiB matrix does not outlive its use).
    Returns the compressed tensors."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    linears = family.linears
    shapes = {n: tuple(weights[n + ".weight"].shape) for n in linears}
    dense_params = sum(m * n for m, n in shapes.values())
    whiteners: dict[str, tuple[torch.Tensor, float]] = {}
    dev = next(iter(covs.values())).device  # decompositions run where the statistics are

    def whitener(key: str, index: torch.Tensor | None = None):
        wkey = key if index is None else key + ":marginal"
        if method == "svd":
            return None
        if wkey not in whiteners:
            c = covs[key] if index is None else covs[key][index][:, index]
            if key == family.neuron_key:  # the largest statistic, used once: free it early (see pipeline/plan.py)
                covs.pop(key)
            whiteners[wkey] = cholesky_whitener(c, what=f"{key} covariance")
            del c
        return whiteners[wkey][0]

    rows, cols, chunks = family.neurons.rows, family.neurons.cols, family.neurons.chunks
    ffn = (*rows, cols)
    split = method == "sola" and prime_ratio > 0
    prime = marginal = None
    if split:
        prime, marginal = prime_order(scores, prime_ratio)
        if len(marginal) == 0:
            split = False
    if split:
        count = len(prime) + len(marginal)
        prime_rows, marginal_rows = stacked(prime, count, chunks), stacked(marginal, count, chunks)

    # matrices to factor: the whole weight, or the marginal rows/columns of FFN layers
    targets: dict[str, torch.Tensor] = {}
    spectra: dict[str, Spectrum] = {}
    for name in linears:
        w = weights[name + ".weight"]
        key = family.group_of(name)
        if split and name == cols:
            targets[name] = w[:, marginal]
            spectra[name] = spectrum(targets[name], whitener(key, marginal.to(dev)), dev)
        elif split and name in rows:
            targets[name] = w[marginal_rows]
            spectra[name] = spectrum(targets[name], whitener(key), dev)
        else:
            targets[name] = w
            spectra[name] = spectrum(w, whitener(key), dev)

    keep = 1.0 - ratio
    if method == "sola":
        fixed = (sum(len(prime_rows) * shapes[n][1] for n in rows) + len(prime) * shapes[cols][0]) if split else 0
        budget = math.floor(keep * dense_params) - fixed
        if budget <= 0:
            raise ValueError(f"ratio {ratio} leaves no room beyond the prime neurons (prime ratio {prime_ratio})")
        cands = [Candidate(n, *targets[n].shape, spectra[n].energy) for n in linears]
        ranks = allocate(cands, budget)
    else:
        ranks = {n: uniform_rank(*targets[n].shape, keep) for n in linears}
    ranks = {n: (max(r, 1) if r is not None else None) for n, r in ranks.items()}

    tensors = {k: v for k, v in weights.items() if not any(k.startswith(n + ".") for n in linears)}
    specs: dict[str, dict] = {}
    error: dict[str, float] = {}
    for name in linears:
        w, bias = weights[name + ".weight"], weights.get(name + ".bias")
        rank, sp = ranks[name], spectra.pop(name)
        total = float(sp.energy.sum()) or 1.0
        error[name] = 0.0 if rank is None else float(sp.energy[rank:].sum()) / total
        spec: dict = {"rank": rank}
        own: dict[str, torch.Tensor] = {}
        if split and name in ffn:
            spec.update(prime=len(prime), split="in" if name == cols else "out")
            if name == cols:
                own["prime.weight"] = w[:, prime]
                if bias is not None:
                    own["prime.bias"] = bias
            else:
                if chunks > 1:
                    spec["chunks"] = chunks
                own["prime.weight"] = w[prime_rows]
                if bias is not None:
                    own["prime.bias"], own["marginal.bias"] = bias[prime_rows], bias[marginal_rows]
            own.update(_factored(targets[name], sp, rank, "marginal."))
        else:
            own.update(_factored(w, sp, rank, ""))
            if bias is not None:
                own["bias"] = bias
        tensors.update({f"{name}.{k}": v.to("cpu", storage_dtype).contiguous() for k, v in own.items()})
        del sp  # frees this layer's basis before the next layer's factors
        specs[name] = spec
    kept = sum(linear_params(specs[n], *shapes[n]) for n in linears)
    return BlockResult(tensors=tensors, specs=specs, dense_params=dense_params, kept_params=kept, error=error,
                       damping={k: d for k, (_, d) in whiteners.items() if d})


def _factored(w: torch.Tensor, sp: Spectrum, rank: int | None, prefix: str) -> dict[str, torch.Tensor]:
    if rank is None:
        return {prefix + "weight": w}
    a, b = sp.factors(rank)
    return {prefix + "lowrank.a": a, prefix + "lowrank.b": b}
