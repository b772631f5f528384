"""Rank allocation under a parameter budget (pure functions).

A candidate matrix m x n with whitened energies e_1 >= e_2 >= ... costs k (m + n) parameters
at rank k, and m n when kept dense (exact). Rank allocation spends a parameter budget where
it removes the most relative output error per parameter: each step either adds one rank to a
candidate (gain e_k / E, cost m + n) or, once factoring stops saving, makes it dense
(gain: the rest of its energy, cost: the remaining parameters). A gain is an energy times the
candidate's `weight`, what one unit of its whitened energy costs the model: by default 1 / E (E
the candidate's total energy), so gains are fractions of each layer's own output energy (the
paper's energy ratio); a model-wide allocation passes measured weights (pipeline/probe.py).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from sola_stream.method.decompose import max_useful_rank


@dataclass
class Candidate:
    name: str
    m: int
    n: int
    energy: torch.Tensor  # descending, length min(m, n)
    weight: float | None = None  # cost of one unit of its whitened energy (None: 1 / its total energy)


def factored_params(m: int, n: int, rank: int | None) -> int:
    """Parameters stored for an m x n matrix at `rank` (None = dense)."""
    return m * n if rank is None else rank * (m + n)


def uniform_rank(m: int, n: int, keep: float) -> int | None:
    """Largest rank whose factors keep at most `keep` of the m x n parameters (None: dense is cheaper)."""
    k = int(keep * m * n) // (m + n)
    return None if k > max_useful_rank(m, n) else k


def allocate(candidates: list[Candidate], budget: int) -> dict[str, int | None]:
    """Greedy budgeted allocation; returns name -> rank (None = keep dense).

    Never spends more than `budget`; stops within one step's cost of it.
    """
    ranks = {c.name: 0 for c in candidates}
    dense: set[str] = set()
    heap: list[tuple[float, int, str]] = []
    info: dict[str, tuple[Candidate, list[float], float]] = {}
    for order, c in enumerate(candidates):
        e = c.energy.double().clamp_min(0).tolist()
        total = sum(e) or 1.0
        info[c.name] = (c, e, total)
        _push(heap, order, c, e, total, 0)

    spent = 0
    while heap:
        neg_prio, order, name = heapq.heappop(heap)
        c, e, total = info[name]
        k = ranks[name]
        cost = _step_cost(c, k)
        if spent + cost > budget:
            continue  # this candidate's next step does not fit; others' may
        spent += cost
        if k >= max_useful_rank(c.m, c.n):
            dense.add(name)
            continue
        ranks[name] = k + 1
        _push(heap, order, c, e, total, k + 1)
    return {n: (None if n in dense else r) for n, r in ranks.items()}


def _step_cost(c: Candidate, k: int) -> int:
    kmax = max_useful_rank(c.m, c.n)
    return (c.m + c.n) if k < kmax else c.m * c.n - kmax * (c.m + c.n)


def _push(heap, order, c: Candidate, e: list[float], total: float, k: int) -> None:
    kmax = max_useful_rank(c.m, c.n)
    if k < kmax:
        gain = e[k] if k < len(e) else 0.0
    else:
        gain = sum(e[k:])
    prio = (1.0 / total if c.weight is None else c.weight) * gain / _step_cost(c, k)
    heapq.heappush(heap, (-prio, order, c.name))
