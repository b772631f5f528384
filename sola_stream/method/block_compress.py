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
    starved: list[str]  # layers kept dense: no calibration token reached them (an unrouted expert)


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
def compress_block(weights: dict[str, torch.Tensor], covs: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
                   family: Family, method: str, ratio: float, prime_ratio: float,
                   storage_dtype: torch.dtype) -> BlockResult:
    """`weights`: block tensors by name relative to the block (linears' `.weight`, biases, norms).
    `covs`: input covariances by group key (see pipeline/block_forward.py); the FFN-neuron ones are
    consumed (removed from the dict once whitened, so a 70B block's 3 GiB matrix does not outlive
    its use). `scores`: neuron scores by the key of each neuron group's activations (SoLA only).
    Returns the compressed tensors."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    linears = family.linears
    shapes = {n: tuple(weights[n + ".weight"].shape) for n in linears}
    dense_params = sum(m * n for m, n in shapes.values())
    whiteners: dict[str, tuple[torch.Tensor, float]] = {}
    dev = next(iter(covs.values())).device  # decompositions run where the statistics are

    neuron_keys = {family.neuron_key(g) for g in family.neuron_groups}

    def whitener(key: str, index: torch.Tensor | None = None):
        wkey = key if index is None else key + ":marginal"
        if method == "svd":
            return None
        if wkey not in whiteners:
            c = covs[key] if index is None else covs[key][index][:, index]
            if key in neuron_keys:  # the largest statistics, each used once: freed early (see pipeline/plan.py)
                covs.pop(key)
            whiteners[wkey] = cholesky_whitener(c, what=f"{key} covariance")
            del c
        return whiteners[wkey][0]

    # per FFN: (prime, marginal) neurons, and the rows of its rows layers that hold each
    splits: dict[str, tuple] = {}  # layer name -> (role, prime index, marginal index, chunks)
    fixed = 0  # weights the prime neurons keep dense
    # an expert that no calibration token was routed to has no statistics: it stays dense (reported)
    starved = [n for n in linears if method != "svd" and family.group_of(n) not in covs]
    for g in family.neuron_groups if method == "sola" and prime_ratio > 0 else ():
        if family.neuron_key(g) not in scores:
            continue
        prime, marginal = prime_order(scores[family.neuron_key(g)], prime_ratio)
        if len(marginal) == 0:
            continue
        count = len(prime) + len(marginal)
        for name in g.rows:
            splits[name] = ("out", stacked(prime, count, g.chunks), stacked(marginal, count, g.chunks), g.chunks)
            fixed += len(splits[name][1]) * shapes[name][1]
        splits[g.cols] = ("in", prime, marginal, 1)
        fixed += len(prime) * shapes[g.cols][0]

    # matrices to factor: the whole weight, or the marginal rows/columns of FFN layers
    targets: dict[str, torch.Tensor] = {}
    spectra: dict[str, Spectrum] = {}
    for name in (n for n in linears if n not in starved):
        w = weights[name + ".weight"]
        key = family.group_of(name)
        if name in splits and splits[name][0] == "in":
            marginal = splits[name][2]
            targets[name] = w[:, marginal]
            spectra[name] = spectrum(targets[name], whitener(key, marginal.to(dev)), dev)
        elif name in splits:
            targets[name] = w[splits[name][2]]
            spectra[name] = spectrum(targets[name], whitener(key), dev)
        else:
            targets[name] = w
            spectra[name] = spectrum(w, whitener(key), dev)

    keep = 1.0 - ratio
    if method == "sola":
        budget = math.floor(keep * dense_params) - fixed - sum(math.prod(shapes[n]) for n in starved)
        if budget <= 0:
            raise ValueError(f"ratio {ratio} leaves no room beyond the prime neurons (prime ratio {prime_ratio})")
        ranks = allocate([Candidate(n, *targets[n].shape, spectra[n].energy) for n in targets], budget)
    else:
        ranks = {n: uniform_rank(*targets[n].shape, keep) for n in targets}
    ranks = {n: (max(r, 1) if r is not None else None) for n, r in ranks.items()}
    ranks.update({n: None for n in starved})

    tensors = {k: v for k, v in weights.items() if not any(k.startswith(n + ".") for n in linears)}
    specs: dict[str, dict] = {}
    error: dict[str, float] = {}
    for name in linears:
        w, bias = weights[name + ".weight"], weights.get(name + ".bias")
        rank, sp = ranks[name], spectra.pop(name, None)
        error[name] = 0.0 if rank is None else float(sp.energy[rank:].sum()) / (float(sp.energy.sum()) or 1.0)
        spec: dict = {"rank": rank}
        own: dict[str, torch.Tensor] = {}
        if name in splits:
            role, prime, marginal, chunks = splits[name]
            spec.update(prime=len(prime) // chunks, split=role)
            if role == "in":
                own["prime.weight"] = w[:, prime]
                if bias is not None:
                    own["prime.bias"] = bias
            else:
                if chunks > 1:
                    spec["chunks"] = chunks
                own["prime.weight"] = w[prime]
                if bias is not None:
                    own["prime.bias"], own["marginal.bias"] = bias[prime], bias[marginal]
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
                       damping={k: d for k, (_, d) in whiteners.items() if d}, starved=starved)


def _factored(w: torch.Tensor, sp: Spectrum, rank: int | None, prefix: str) -> dict[str, torch.Tensor]:
    if rank is None:
        return {prefix + "weight": w}
    a, b = sp.factors(rank)
    return {prefix + "lowrank.a": a, prefix + "lowrank.b": b}
