"""Checks for sola_stream.method.allocate (budgeted rank allocation) and modules.linear_params."""
import pytest
import torch

from sola_stream.method.allocate import Candidate, allocate, factored_params, uniform_rank
from sola_stream.method.decompose import max_useful_rank, spectrum
from sola_stream.nn.build import layer_from_tensors, linear_params

SHAPES = [(24, 10), (10, 24), (16, 16), (40, 12), (3, 5), (1, 9), (30, 30)]


def candidates(seed=0, shapes=SHAPES):
    """Candidates with real spectra (plain SVD of random matrices of varied decay)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (m, n) in enumerate(shapes):
        decay = torch.logspace(0, -(i % 4), n, dtype=torch.float64)  # column scales, 1 .. 10^-(i%4)
        w = torch.randn(m, n, generator=g, dtype=torch.float64) * decay
        out.append(Candidate(f"c{i}", m, n, spectrum(w, None).energy))
    return out


def spent(cands, ranks):
    return sum(factored_params(c.m, c.n, ranks[c.name]) for c in cands)


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 0.999])
@pytest.mark.parametrize("seed", [0, 1])
def test_allocate_respects_budget_and_spends_it(fraction, seed):
    cands = candidates(seed)
    dense = sum(c.m * c.n for c in cands)
    budget = int(fraction * dense)
    ranks = allocate(cands, budget)
    assert set(ranks) == {c.name for c in cands}
    used = spent(cands, ranks)
    assert used <= budget
    assert budget - used < max(c.m + c.n for c in cands)
    for c in cands:
        r, kmax = ranks[c.name], max_useful_rank(c.m, c.n)
        assert r is None or 0 <= r <= kmax
        if r is not None:  # greedy stops only when no candidate's next step fits
            next_cost = factored_params(c.m, c.n, r + 1 if r < kmax else None) - factored_params(c.m, c.n, r)
            assert next_cost > budget - used, (c, r)


@pytest.mark.parametrize("extra", [0, 1, 10_000])
def test_allocate_budget_covering_everything_keeps_all_dense(extra):
    cands = candidates(2)
    ranks = allocate(cands, sum(c.m * c.n for c in cands) + extra)
    assert ranks == {c.name: None for c in cands}


def test_allocate_gives_flat_spectrum_the_larger_rank():
    m, n = 32, 48
    flat = Candidate("flat", m, n, torch.ones(m, dtype=torch.float64))
    fast = Candidate("fast", m, n, 0.5 ** torch.arange(m, dtype=torch.float64))
    for cands in ([flat, fast], [fast, flat]):
        ranks = allocate(cands, 12 * (m + n))
        assert spent(cands, ranks) == 12 * (m + n)
        assert ranks["flat"] > ranks["fast"] > 0, ranks


def test_allocate_is_deterministic():
    cands = candidates(3)
    budget = int(0.37 * sum(c.m * c.n for c in cands))
    first = allocate(cands, budget)
    assert allocate(candidates(3), budget) == first
    assert allocate(cands, budget) == first


@pytest.mark.parametrize("m,n", [(4096, 4096), (4096, 11008), (11008, 4096), (24, 10), (3, 5), (7, 7), (1, 9)])
@pytest.mark.parametrize("keep", [0.01, 0.2, 0.35, 0.5, 0.8, 0.99])
def test_uniform_rank_fits_keep(m, n, keep):
    k = uniform_rank(m, n, keep)
    assert k is not None and 0 <= k <= max_useful_rank(m, n)
    assert factored_params(m, n, k) <= keep * m * n
    assert (k + 1) * (m + n) > keep * m * n


@pytest.mark.parametrize("m,n", [(4096, 4096), (4096, 11008), (24, 10), (3, 5), (2, 2), (1, 9)])
def test_uniform_rank_none_when_factoring_would_not_save(m, n):
    kmax = max_useful_rank(m, n)
    assert uniform_rank(m, n, (kmax + 1) * (m + n) / (m * n)) is None  # next rank costs >= dense
    assert uniform_rank(m, n, 2.0) is None


def _count_weights(spec, tensors, m, n):
    """Weight parameters of the module built from `tensors`, after checking it maps n -> m."""
    layer = layer_from_tensors(spec, tensors)
    assert layer(torch.zeros(2, n)).shape == (2, m)
    return sum(p.numel() for name, p in layer.named_parameters() if not name.endswith("bias"))


@pytest.mark.parametrize("rank", [None, 0, 1, 3])
def test_linear_params_matches_built_layers(rank):
    m, n, p = 11, 7, 4

    def marginal(rows, cols):
        if rank is None:
            return {"marginal.weight": torch.zeros(rows, cols)}
        return {"marginal.lowrank.a": torch.zeros(rows, rank), "marginal.lowrank.b": torch.zeros(rank, cols)}

    out_spec = {"rank": rank, "prime": p, "split": "out"}  # gate/up: prime rows
    out_tensors = {"prime.weight": torch.zeros(p, n), **marginal(m - p, n)}
    assert linear_params(out_spec, m, n) == _count_weights(out_spec, out_tensors, m, n)

    in_spec = {"rank": rank, "prime": p, "split": "in"}  # down: prime columns
    in_tensors = {"prime.weight": torch.zeros(m, p), **marginal(m, n - p)}
    assert linear_params(in_spec, m, n) == _count_weights(in_spec, in_tensors, m, n)

    plain_spec = {"rank": rank}
    plain_tensors = ({"weight": torch.zeros(m, n), "bias": torch.zeros(m)} if rank is None else
                     {"lowrank.a": torch.zeros(m, rank), "lowrank.b": torch.zeros(rank, n), "bias": torch.zeros(m)})
    assert linear_params(plain_spec, m, n) == _count_weights(plain_spec, plain_tensors, m, n)


def test_linear_params_dense_spec_none():
    assert linear_params(None, 11, 7) == 77
    assert linear_params({"rank": None}, 11, 7) == 77
