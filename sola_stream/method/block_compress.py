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
from sola_stream.method.compensate import least_squares_weight, prime_columns, prime_columns_fit
from sola_stream.method.decompose import Spectrum, cholesky_whitener, spectrum, submatrix
from sola_stream.nn.build import linear_params
from sola_stream.phases import phase

METHODS = ("sola", "svd-llm", "svd")


class BudgetError(ValueError):
    """The block's parameter budget does not pay for its prime neurons (a split too large)."""


@dataclass
class BlockResult:
    tensors: dict[str, torch.Tensor]
    specs: dict[str, dict]
    dense_params: int
    kept_params: int
    error: dict[str, float]  # per layer: dropped fraction of its whitened output energy
    damping: dict[str, float]
    starved: list[str]  # layers kept dense: no calibration token reached them (an unrouted expert)
    prime_split: float | None = None  # the split chosen for this block (--prime-ratio auto)


def stacked(index: torch.Tensor, count: int, chunks: int) -> torch.Tensor:
    """Row indices of neurons `index` in a layer stacking `chunks` blocks of `count` neurons."""
    return torch.cat([index + k * count for k in range(chunks)]) if chunks > 1 else index


def prime_order(scores: torch.Tensor, prime_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(prime, marginal) neuron indices, each ascending: the top `prime_ratio` by score are prime.
    Stable sort so ties break by index and runs are reproducible."""
    n_prime = int(round(prime_ratio * scores.numel()))
    order = torch.sort(-scores.double().cpu(), stable=True).indices
    return order[:n_prime].sort().values, order[n_prime:].sort().values


def decomposition_cost(m: int, n: int, whitened_width: int) -> float:
    """Relative cost of factoring an m x n matrix: its SVD (m n min(m, n)) and the Cholesky of
    the covariance that whitens it (width^3 / 3). Used to share a block's layers out fairly."""
    return m * n * min(m, n) + whitened_width ** 3 / 3


class Layout:
    """What a block's compression decides before any factor is made, from its statistics: the
    prime/marginal split of each FFN, the layers kept dense for want of tokens, the spectra the
    ranks are chosen on (reused by a plain fit), and each layer's rank (None: dense) for `ratio`
    (None: no ranks; `allocate` returns each share's when several are fitted from one layout).

    `covs`: input covariances by group key (see pipeline/block_forward.py); the FFN-neuron ones are
    consumed (removed from the dict once whitened, so a 70B block's 3 GiB matrix does not outlive
    its use). `scores`: neuron scores by the key of each neuron group's activations (SoLA only).
    `values_only`: spectra without bases, for a survey (no layer can be fitted from it).
    `spread`: the decompositions are shared out among processes (pipeline/distributed.py Spread):
    this one makes the spectra of the layers it owns, and the allocation uses everyone's.
    `importance`: by layer, what one unit of its whitened energy costs the model (measured by a
    survey's probe, pipeline/probe.py); None: every layer's relative error counts alike."""

    def __init__(self, weights: dict[str, torch.Tensor], covs: dict[str, torch.Tensor],
                 scores: dict[str, torch.Tensor], family: Family, method: str, ratio: float | None,
                 prime_ratio: float, budget: int | None = None, values_only: bool = False, spread=None,
                 importance: dict[str, float] | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}")
        self.family, self.method, self.prime_ratio = family, method, prime_ratio
        linears = family.linears
        self.shapes = shapes = {n: tuple(weights[n + ".weight"].shape) for n in linears}
        self.dense_params = sum(m * n for m, n in shapes.values())
        self.whiteners: dict[str, tuple[torch.Tensor, float]] = {}
        self.damping: dict[str, float] = {}
        dev = next(iter(covs.values())).device  # decompositions run where the statistics are
        neuron_keys = {family.neuron_key(g) for g in family.neuron_groups}

        def whitener(key: str, index: torch.Tensor | None = None):
            wkey = key if index is None else key + ":marginal"
            if method == "svd":
                return None
            if wkey not in self.whiteners:
                with phase("whitening"):
                    if key in neuron_keys:  # the largest statistics, used once: freed as early as can be
                        c = covs.pop(key)
                        if index is not None:  # the marginal block gathered a slab of rows at a time (submatrix)
                            c = submatrix(c, index)
                        c = c.double()  # the float32 original is freed here, before the factor exists
                        self.whiteners[wkey] = cholesky_whitener(c, what=f"{key} covariance", overwrite=True)
                    else:
                        c = covs[key] if index is None else submatrix(covs[key], index)
                        self.whiteners[wkey] = cholesky_whitener(c, what=f"{key} covariance")
                    del c
            return self.whiteners[wkey][0]

        # per FFN: (prime, marginal) neurons, and the rows of its rows layers that hold each
        self.splits: dict[str, tuple] = {}  # layer name -> (role, prime index, marginal index, chunks)
        fixed = 0  # weights the prime neurons keep dense
        # an expert that no calibration token was routed to has no statistics: it stays dense (reported)
        self.starved = [n for n in linears if method != "svd" and family.group_of(n) not in covs]
        for g in family.neuron_groups if method == "sola" and prime_ratio > 0 else ():
            if family.neuron_key(g) not in scores:
                continue
            prime, marginal = prime_order(scores[family.neuron_key(g)], prime_ratio)
            if len(marginal) == 0:
                continue
            count = len(prime) + len(marginal)
            for name in g.rows:
                self.splits[name] = ("out", stacked(prime, count, g.chunks), stacked(marginal, count, g.chunks),
                                     g.chunks)
                fixed += len(self.splits[name][1]) * shapes[name][1]
            self.splits[g.cols] = ("in", prime, marginal, 1)
            fixed += len(prime) * shapes[g.cols][0]

        # matrices to factor: the whole weight, or the marginal rows/columns of FFN layers
        targets: dict[str, tuple[int, int]] = {}
        for name in (n for n in linears if n not in self.starved):
            (m, n), split = shapes[name], self.splits.get(name)
            targets[name] = (m, len(split[2])) if split and split[0] == "in" else (len(split[2]) if split else m, n)
        if spread is not None:
            spread.assign({k: decomposition_cost(*t, t[1]) for k, t in targets.items()})
        self.spectra: dict[str, Spectrum] = {}
        for name in (n for n in targets if spread is None or spread.mine(n)):
            w = weights[name + ".weight"]
            key = family.group_of(name)
            split = self.splits.get(name)
            if split and split[0] == "in":
                w, L = w[:, split[2]], whitener(key, split[2].to(dev))
            else:
                w, L = (w[split[2]] if split else w), whitener(key)
            with phase("spectra"):
                self.spectra[name] = spectrum(w, L, dev, values_only)
        energies = {n: sp.energy for n, sp in self.spectra.items()}
        self.damping = {k: d for k, (_, d) in self.whiteners.items() if d}
        if spread is not None:
            energies, self.damping = spread.share(energies, self.damping)

        # parameters spent whatever the ranks: prime rows/columns and layers kept dense for want of tokens
        self.fixed = fixed + sum(math.prod(shapes[n]) for n in self.starved)
        self.targets, self.energies = targets, energies
        # weighted by the constructor's `importance` (a survey's and a probe's: none); a share's
        # allocation weighs its own (`allocate`)
        self.candidates = self._candidates(importance)
        self.ranks: dict[str, int | None] | None = None
        if ratio is not None:
            self.ranks = self.allocate(ratio, budget, importance)

    def _candidates(self, importance: dict[str, float] | None) -> list[Candidate]:
        # a layer the survey did not see (an expert no token reached then) counts as the block's most important
        return [Candidate(n, *t, self.energies[n],
                          None if importance is None else importance.get(n, max(importance.values(), default=1.0)))
                for n, t in self.targets.items()]

    def allocate(self, ratio: float, budget: int | None = None,
                 importance: dict[str, float] | None = None) -> dict[str, int | None]:
        """Every layer's rank (None: dense) for `ratio` of the block's parameters removed, or for
        `budget` parameters (a model-wide allocation's share), with `importance` its layers'
        weights there. The whitening and spectra do not depend on them, so one layout serves
        several ratios (compress_shares: each fit is given its share's ranks)."""
        keep = 1.0 - ratio
        targets = self.targets
        if self.method == "sola":
            # the block's share of the parameters: its own (1 - ratio), or what a model-wide allocation gave it
            budget = (math.floor(keep * self.dense_params) if budget is None else budget) - self.fixed
            if budget <= 0:
                raise BudgetError(f"ratio {ratio} leaves no room beyond the prime neurons "
                                  f"(prime ratio {self.prime_ratio})")
            with phase("allocation"):
                ranks = allocate(self._candidates(importance), budget)
        else:
            ranks = {n: uniform_rank(*targets[n], keep) for n in targets}
        ranks = {n: (max(r, 1) if r is not None else None) for n, r in ranks.items()}
        ranks.update({n: None for n in self.starved})
        return ranks

    def truncated(self, name: str, weights: dict[str, torch.Tensor], keep: float) -> tuple[torch.Tensor, float]:
        """Layer `name`'s whole weight (float32) with its factored part cut to the rank that keeps
        `keep` of that part's parameters, and the whitened energy the cut drops. For a probe of what
        a layer's error costs the model; needs the spectra with their bases (not values_only)."""
        sp, split = self.spectra[name], self.splits.get(name)
        m, n = sp.shape
        rank = max(1, int(keep * m * n) // (m + n))
        a, b = sp.factors(rank)
        cut = a.float() @ b.float()  # float32: a 70B FFN layer's product is 0.7 GiB, not 1.4
        del a, b
        if split is None:
            return cut, float(sp.energy[rank:].sum())
        w = weights[name + ".weight"].to(cut.device, torch.float32, copy=True)
        if split[0] == "in":
            w[:, split[2].to(w.device)] = cut
        else:
            w[split[2].to(w.device)] = cut
        return w, float(sp.energy[rank:].sum())

    def fit(self, name: str, weights: dict[str, torch.Tensor], storage_dtype: torch.dtype,
            cov: torch.Tensor | None = None, cross: torch.Tensor | None = None,
            ranks: dict[str, int | None] | None = None, keep: bool = False) -> tuple[dict, dict, float]:
        """Layer `name`'s tensors (relative to the block, in `storage_dtype`), spec and dropped
        fraction of its whitened output energy, at its rank in `ranks` (default: the constructor's
        ratio's). Without `cov`: the plain fit, on the spectra the ranks were chosen on (freed once
        fitted, unless `keep`: another share is fitted from them after). With `cov` (C of the
        inputs the compressed model produces) and
        `cross` ((C + M)/2, M against the original model's inputs: compensate.local_and_cumulative):
        the error-compensating fit (method/compensate.py) at the same rank and split."""
        ranks = self.ranks if ranks is None else ranks
        if ranks is None:  # a bug, not an input
            raise RuntimeError("Layout.fit before any ranks were allocated")
        w, bias = weights[name + ".weight"], weights.get(name + ".bias")
        rank, split = ranks[name], self.splits.get(name)
        prime_cols = None
        if cov is None or name in self.starved or self.method == "svd":
            sp = self.spectra.get(name) if keep else self.spectra.pop(name, None)
        else:
            self.spectra.pop(name, None)
            key = self.family.group_of(name)
            L, damping = cholesky_whitener(cov, what=f"{key} covariance (compensated)")
            if damping:
                self.damping[key + ":compensated"] = damping
            w = least_squares_weight(w, cross, L)
            if split and split[0] == "in":
                del L
                sp, t, damping = prime_columns_fit(w, cov, split[1], split[2], what=f"{key} covariance (compensated)")
                if damping:
                    self.damping[key + ":marginal:compensated"] = damping
                prime_cols = t
            else:
                sp = spectrum(w[split[2].to(w.device)] if split else w, L, L.device)
        error = 0.0 if rank is None else float(sp.energy[rank:].sum()) / (float(sp.energy.sum()) or 1.0)
        spec: dict = {"rank": rank}
        own: dict[str, torch.Tensor] = {}
        if split:
            role, prime, marginal, chunks = split
            spec.update(prime=len(prime) // chunks, split=role)
            if role == "in":
                own.update(_factored(sp.weight, sp, rank, "marginal."))
                if prime_cols is None or rank is None:  # a dense marginal part leaves nothing to absorb
                    own["prime.weight"] = w[:, prime.to(w.device)]
                else:
                    a, b = own["marginal.lowrank.a"], own["marginal.lowrank.b"]
                    own["prime.weight"] = prime_columns(w, prime_cols, prime, marginal, a, b)
                if bias is not None:
                    own["prime.bias"] = bias
            else:
                if chunks > 1:
                    spec["chunks"] = chunks
                own["prime.weight"] = w[prime.to(w.device)]
                own.update(_factored(sp.weight, sp, rank, "marginal."))
                if bias is not None:
                    own["prime.bias"], own["marginal.bias"] = bias[prime], bias[marginal]
        else:
            own.update(_factored(w, sp, rank, ""))
            if bias is not None:
                own["bias"] = bias
        return ({f"{name}.{k}": v.to("cpu", storage_dtype).contiguous() for k, v in own.items()}, spec, error)

    def result(self, weights: dict[str, torch.Tensor], fitted: dict[str, tuple[dict, dict, float]]) -> BlockResult:
        """The compressed block from every layer's fit (and the block's other tensors as they are)."""
        linears = self.family.linears
        tensors = {k: v for k, v in weights.items() if not any(k.startswith(n + ".") for n in linears)}
        for own, _, _ in fitted.values():
            tensors.update(own)
        specs = {n: fitted[n][1] for n in linears}
        kept = sum(linear_params(specs[n], *self.shapes[n]) for n in linears)
        return BlockResult(tensors=tensors, specs=specs, dense_params=self.dense_params, kept_params=kept,
                           error={n: fitted[n][2] for n in linears}, damping=dict(self.damping),
                           starved=self.starved)


@dataclass(frozen=True)
class Share:
    """What one output spends on a block: `ratio` of its parameters removed, or `budget`
    parameters (a model-wide allocation's share), with `importance` its layers' weights there."""
    ratio: float
    budget: int | None = None
    importance: dict[str, float] | None = None


@torch.no_grad()
def compress_block(weights: dict[str, torch.Tensor], covs: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
                   family: Family, method: str, ratio: float, prime_ratio: float,
                   storage_dtype: torch.dtype, budget: int | None = None, spread=None,
                   importance: dict[str, float] | None = None) -> BlockResult:
    """The plain fit of a whole block: `weights` are the block tensors by name relative to the
    block (linears' `.weight`, biases, norms); see Layout for `covs`, `scores`, `budget` and `spread`."""
    result, = compress_shares(weights, covs, scores, family, method, prime_ratio, storage_dtype,
                              [Share(ratio, budget, importance)], spread)
    if isinstance(result, BudgetError):
        raise result
    return result


@torch.no_grad()
def compress_shares(weights: dict[str, torch.Tensor], covs: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
                    family: Family, method: str, prime_ratio: float, storage_dtype: torch.dtype,
                    shares: list[Share], spread=None) -> list[BlockResult | BudgetError]:
    """The plain fit of a whole block for each of `shares` (several ratios' outputs) at one split:
    the whitening and spectra are made once, then each share's allocation and factors. A share
    whose budget does not pay for the split's prime neurons gets its BudgetError instead."""
    with phase("decomposition"):
        layout = Layout(weights, covs, scores, family, method, None, prime_ratio, spread=spread)
        allocated: list = []  # by share: its ranks, or its BudgetError
        for share in shares:
            try:
                allocated.append(layout.allocate(share.ratio, share.budget, share.importance))
            except BudgetError as exc:
                # without its traceback: that would hold this frame (the layout, the covariances)
                # in a reference cycle until the garbage collector ran
                allocated.append(exc.with_traceback(None))
        fitting = [j for j, a in enumerate(allocated) if not isinstance(a, BudgetError)]
        fitted: list[dict] = [{} for _ in shares]
        # layer-major: each layer's basis is freed once every share has its factors (the last
        # share's fit), as in a run of one share; the device never holds more spectra than it would
        for name in family.linears:
            if spread is None or spread.mine(name):
                for j in fitting:
                    with phase("factors"):
                        fitted[j][name] = layout.fit(name, weights, storage_dtype, ranks=allocated[j],
                                                     keep=j != fitting[-1])
        results: list[BlockResult | BudgetError] = []
        for j, ranks in enumerate(allocated):
            if isinstance(ranks, BudgetError):
                results.append(ranks)
                continue
            if spread is not None:  # a collective: every process collects every share, in order
                fitted[j] = spread.collect(fitted[j], list(family.linears))
                if any(fitted[j][n][1]["rank"] != ranks[n] for n in family.linears):  # a bug, not an input
                    raise RuntimeError("the processes of the run allocated different ranks to one block")
            results.append(layout.result(weights, fitted[j]))
            fitted[j] = {}
        return results


def _factored(w: torch.Tensor, sp: Spectrum | None, rank: int | None, prefix: str) -> dict[str, torch.Tensor]:
    if rank is None:
        return {prefix + "weight": w}
    a, b = sp.factors(rank)
    return {prefix + "lowrank.a": a, prefix + "lowrank.b": b}

