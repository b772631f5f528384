"""The error-compensating fit against float64 brute-force least squares on random data."""
import pytest
import torch

from sola_stream.method.compensate import least_squares_weight, local_and_cumulative, prime_columns, prime_columns_fit
from sola_stream.method.decompose import cholesky_whitener, spectrum

torch.manual_seed(0)


def _data(tokens=400, n=24, m=16, noise=0.3):
    """Original inputs X, the compressed model's inputs X^ (X plus correlated error) and W."""
    x = torch.randn(tokens, n, dtype=torch.float64) @ torch.randn(n, n, dtype=torch.float64)
    xh = x + noise * (x @ torch.randn(n, n, dtype=torch.float64) / n ** 0.5 + torch.randn(tokens, n, dtype=torch.float64))
    w = torch.randn(m, n, dtype=torch.float64)
    return x, xh, w


def _err(x, xh, w, w2):
    return float(((x @ w.T - xh @ w2.T) ** 2).sum())


def test_least_squares_weight_is_the_lstsq_solution():
    x, xh, w = _data()
    L, damping = cholesky_whitener(xh.T @ xh)
    assert damping == 0.0
    got = least_squares_weight(w, x.T @ xh, L)
    want = torch.linalg.lstsq(xh, x @ w.T).solution.T
    assert torch.allclose(got, want, atol=1e-9, rtol=1e-9)
    # without a cross covariance (X^ = X) the weight is returned as is
    assert torch.equal(least_squares_weight(w, None, L), w)


def test_local_and_cumulative_objective_is_the_stacked_lstsq_solution():
    """--fit compensate: ||X^ W^T - X^ W'^T||^2 + ||X W^T - X^ W'^T||^2, i.e. least squares on the
    compressed inputs stacked twice against the layer's outputs on both streams."""
    x, xh, w = _data()
    c = xh.T @ xh
    L, _ = cholesky_whitener(c)
    got = least_squares_weight(w, local_and_cumulative(c, x.T @ xh), L)
    want = torch.linalg.lstsq(torch.cat([xh, xh]), torch.cat([xh @ w.T, x @ w.T])).solution.T
    assert torch.allclose(got, want, atol=1e-9, rtol=1e-9)


def test_rank_k_error_is_irreducible_plus_dropped_whitened_energy():
    x, xh, w = _data()
    c = xh.T @ xh
    L, _ = cholesky_whitener(c)
    wstar = least_squares_weight(w, x.T @ xh, L)
    sp = spectrum(wstar, L)
    floor = _err(x, xh, w, wstar)
    for k in (1, 5, 12, 16):
        a, b = sp.factors(k)
        assert abs(_err(x, xh, w, a @ b) - (floor + float(sp.energy[k:].sum()))) < 1e-7 * _err(x, xh, w, 0 * w)
    # at full rank the fit is the unconstrained optimum
    a, b = sp.factors(16)
    assert torch.allclose(a @ b, wstar, atol=1e-9)


def test_compensated_rank_k_beats_the_plain_fit_on_the_compressed_inputs():
    x, xh, w = _data()
    L_plain, _ = cholesky_whitener(x.T @ x)
    a, b = spectrum(w, L_plain).factors(6)  # what a fit that ignores upstream error does
    Lh, _ = cholesky_whitener(xh.T @ xh)
    a2, b2 = spectrum(least_squares_weight(w, x.T @ xh, Lh), Lh).factors(6)
    assert _err(x, xh, w, a2 @ b2) < 0.8 * _err(x, xh, w, a @ b)


def test_prime_columns_fit_is_the_joint_optimum():
    x, xh, w = _data(n=30)
    c = xh.T @ xh
    L, _ = cholesky_whitener(c)
    wstar = least_squares_weight(w, x.T @ xh, L)
    perm = torch.randperm(30)
    prime, marginal = perm[:6].sort().values, perm[6:].sort().values
    sp, t, damping = prime_columns_fit(wstar, c, prime, marginal)
    assert damping == 0.0
    k = 5
    a, b = sp.factors(k)
    d = prime_columns(wstar, t, prime, marginal, a, b)
    full = torch.zeros_like(w)
    full[:, prime], full[:, marginal] = d, a @ b
    got = _err(x, xh, w, full)
    # the prime columns are the least-squares answer given the marginal part
    resid = x @ w.T - xh[:, marginal] @ (a @ b).T
    d_ls = torch.linalg.lstsq(xh[:, prime], resid).solution.T
    assert torch.allclose(d, d_ls, atol=1e-8)
    # error = irreducible + the dropped energy in the Schur metric
    floor = _err(x, xh, w, wstar)
    assert abs(got - (floor + float(sp.energy[k:].sum()))) < 1e-7 * got
    # and better than keeping the prime columns of W* and fitting the rest on their own covariance
    Lq, _ = cholesky_whitener(c[marginal][:, marginal])
    a2, b2 = spectrum(wstar[:, marginal], Lq).factors(k)
    plain = wstar.clone()
    plain[:, marginal] = a2 @ b2
    assert got < _err(x, xh, w, plain)
    # no perturbation of the optimum does better
    for _ in range(5):
        da = a + 1e-3 * torch.randn_like(a)
        moved = full.clone()
        moved[:, marginal] = da @ b
        moved[:, prime] = prime_columns(wstar, t, prime, marginal, da, b)
        assert _err(x, xh, w, moved) >= got - 1e-9


@pytest.mark.parametrize("method", ["sola", "svd-llm"])
def test_compensation_lowers_a_block_output_error_at_the_same_parameter_count(tiny_models, method):
    """Block 1 of a tiny LLaMA fed states carrying an upstream error (x^ = x + e): the compensated
    fit reproduces the original block's outputs on x better than the plain fit fitted on x^."""
    from sola_stream.method.block_compress import Layout
    from sola_stream.pipeline.block_forward import BlockStats, run_block
    from sola_stream.pipeline.paired import compress_compensated
    from sola_stream.nn.build import build_block
    from sola_stream.pipeline.skeleton import Skeleton
    from sola_stream.storage.checkpoint import CheckpointReader

    reader = CheckpointReader(str(tiny_models["llama"]))
    sk = Skeleton(reader)
    family = sk.family
    ids = torch.randint(0, 256, (16, 48), generator=torch.Generator().manual_seed(1))
    x0, kwargs = sk.embed(ids)
    w0 = reader.tensors(family.block_prefix(0))
    x = run_block(build_block(sk.meta_block(0), w0, None, "cpu", torch.float32), x0, kwargs[0], "cpu", 4, out=x0.clone())
    gen = torch.Generator().manual_seed(2)
    xh = x + 0.3 * x.std() * torch.randn(x.shape, generator=gen)  # what a compressed block 0 might pass on
    weights = reader.tensors(family.block_prefix(1))
    meta = sk.meta_block(1)
    want = run_block(build_block(meta, weights, None, "cpu", torch.float32), x, kwargs[1], "cpu", 4, out=x.clone())

    block = build_block(meta, weights, None, "cpu", torch.float32)
    stats = BlockStats(block, family)
    run_block(block, xh, kwargs[1], "cpu", 4, out=None)
    stats.remove()
    layout = Layout(weights, stats.cov, stats.neuron_scores(), family, method, 0.3, 0.15)
    plain = layout.result(weights, {n: layout.fit(n, weights, torch.float32) for n in family.linears})
    comp = compress_compensated(meta, weights, family, (method, 0.3, 0.15), kwargs[1], "cpu", 4, x, xh, None,
                                lambda: None, None, torch.float32, lambda t, what: None)
    assert comp.kept_params == plain.kept_params and comp.specs == plain.specs

    def error(res):
        out = run_block(build_block(meta, res.tensors, res.specs, "cpu", torch.float32), xh, kwargs[1], "cpu", 4,
                        out=xh.clone())
        return float(((out - want) ** 2).sum() / ((want - x) ** 2).sum())  # relative to the block's update

    e_plain, e_comp = error(plain), error(comp)
    assert e_comp < 0.85 * e_plain, (e_plain, e_comp)
