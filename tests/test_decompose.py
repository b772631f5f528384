"""Float64 reference checks for sola_stream.method.decompose (whitening and truncated whitened SVD)."""
import math

import pytest
import torch

from sola_stream.method.decompose import cholesky_whitener, max_useful_rank, spectrum

F64 = torch.float64
# (m, n): tall (right=True path), wide (right=False path), square (right=True path)
SHAPES = [(24, 10), (10, 24), (16, 16)]


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


def setup(m, n, seed=0, tokens=None):
    """Random W (m x n), calibration X (tokens x n) and its covariance C = X^T X (SPD)."""
    g = torch.Generator().manual_seed(seed)
    w = rand(g, m, n)
    x = rand(g, tokens or 3 * n, n) * torch.linspace(0.1, 3.0, n, dtype=F64)  # uneven input scales
    return w, x, x.T @ x


def rel_close(a, b, rel):
    return abs(a - b) <= rel * max(abs(a), abs(b))


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("whitened", [True, False])
def test_full_rank_reproduces_weight(m, n, whitened):
    w, _, c = setup(m, n)
    L = cholesky_whitener(c)[0] if whitened else None
    a, b = spectrum(w, L).factors(min(m, n))
    assert a.shape == (m, min(m, n)) and b.shape == (min(m, n), n)
    assert torch.linalg.norm(a @ b - w) <= 1e-8 * torch.linalg.norm(w)


@pytest.mark.parametrize("m,n,right", [(24, 10, True), (10, 24, False)])
def test_truncation_error_equals_dropped_energy(m, n, right):
    w, x, c = setup(m, n, seed=1)
    L, damping = cholesky_whitener(c)
    assert damping == 0.0
    spec = spectrum(w, L)
    assert spec.right is right
    for k in [0, 1, 3, min(m, n) // 2, min(m, n) - 1]:
        a, b = spec.factors(k)
        err = float(torch.linalg.norm((w - a @ b) @ x.T) ** 2)
        dropped = float(spec.energy[k:].sum())
        assert rel_close(err, dropped, 1e-8), (k, err, dropped)


@pytest.mark.parametrize("m,n", SHAPES)
def test_energy_is_squared_singular_values_of_whitened_weight(m, n):
    w, _, c = setup(m, n, seed=2)
    L = cholesky_whitener(c)[0]
    energy = spectrum(w, L).energy
    ref = torch.linalg.svdvals(w @ L) ** 2
    assert energy.shape == (min(m, n),)
    assert torch.allclose(energy, ref, rtol=1e-8, atol=1e-10 * float(ref[0]))
    assert (energy >= 0).all()
    assert (energy[:-1] >= energy[1:]).all()


@pytest.mark.parametrize("m,n", SHAPES)
def test_plain_svd_truncation_is_eckart_young_optimal(m, n):
    w, _, _ = setup(m, n, seed=3)
    spec = spectrum(w, None)
    s2 = torch.linalg.svdvals(w) ** 2
    for k in [0, 1, 4, min(m, n) - 1, min(m, n)]:
        a, b = spec.factors(k)
        err = float(torch.linalg.norm(w - a @ b) ** 2)
        assert math.isclose(err, float(s2[k:].sum()), rel_tol=1e-8, abs_tol=1e-10 * float(s2.sum()))


@pytest.mark.parametrize("m,n", SHAPES)
def test_whitening_never_hurts_on_its_calibration_data(m, n):
    w, x, c = setup(m, n, seed=4)
    whitened, plain = spectrum(w, cholesky_whitener(c)[0]), spectrum(w, None)
    gaps = []
    for k in [1, 2, 5, min(m, n) - 1]:
        err_w = float(torch.linalg.norm((w - torch.mm(*whitened.factors(k))) @ x.T) ** 2)
        err_p = float(torch.linalg.norm((w - torch.mm(*plain.factors(k))) @ x.T) ** 2)
        assert err_w <= err_p * (1 + 1e-10), (k, err_w, err_p)
        gaps.append(err_p - err_w)
    assert max(gaps) > 0  # uneven input scales: whitening must actually change the factors


def test_cholesky_whitener_spd_is_exact_and_undamped():
    _, _, c = setup(5, 12, seed=5)
    L, damping = cholesky_whitener(c)
    assert damping == 0.0
    assert L.dtype == F64
    assert torch.equal(L, L.tril())
    assert torch.allclose(L @ L.T, c, rtol=0, atol=1e-12 * float(c.abs().max()))


@pytest.mark.parametrize("case", ["zero_column", "few_tokens_3x8", "few_tokens_10x40"])
def test_cholesky_whitener_damps_singular_covariance(case):
    g = torch.Generator().manual_seed(6)
    if case == "zero_column":
        x = rand(g, 40, 8)
        x[:, 3] = 0.0  # a dead input
    else:
        tokens, n = map(int, case.split("_")[-1].split("x"))
        x = rand(g, tokens, n)
    c = x.T @ x
    L, damping = cholesky_whitener(c)
    assert damping > 0
    assert torch.isfinite(L).all()
    assert torch.equal(L, L.tril())
    damped = c + damping * torch.eye(c.shape[0], dtype=F64)
    assert torch.allclose(L @ L.T, damped, rtol=0, atol=1e-10 * float(damped.abs().max()))


def test_cholesky_whitener_accepts_float32_covariance():
    _, x, _ = setup(4, 12, seed=7)
    c32 = (x.T @ x).float()
    L, damping = cholesky_whitener(c32)
    assert L.dtype == F64 and damping == 0.0
    assert torch.allclose(L @ L.T, c32.double(), rtol=0, atol=1e-10 * float(c32.abs().max()))


@pytest.mark.parametrize("where", [(0, 0), (5, 2), (7, 7)])
def test_cholesky_whitener_nan_raises(where):
    _, _, c = setup(4, 8, seed=8)
    c[where] = float("nan")
    with pytest.raises(ValueError):
        cholesky_whitener(c)


def test_cholesky_whitener_reads_only_the_lower_triangle():
    """The upper triangle is never read (a Gram matrix's is the lower's mirror), so a NaN there
    changes nothing; the NaN checks look at the diagonal, where any NaN/Inf input shows."""
    _, _, c = setup(4, 8, seed=8)
    clean = cholesky_whitener(c)[0]
    c[2, 5] = float("nan")
    assert torch.equal(cholesky_whitener(c)[0], clean)


PAIRS = [(m, n) for m in range(1, 31) for n in range(1, 31)] + [
    (4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672), (1, 100000), (2, 2), (3, 6)]


def test_max_useful_rank_is_the_largest_saving_rank():
    for m, n in PAIRS:
        k = max_useful_rank(m, n)
        assert k >= 0 and k * (m + n) < m * n and (k + 1) * (m + n) >= m * n, (m, n, k)


def test_block_digest_from_file_bytes_equals_digest_of_loaded_tensors(tmp_path, tiny_tokenizer):
    """The resume check hashes input blocks straight from the shards; the compress step hashes the
    tensors it loaded. Both must give the same digest, for every block and the outer tensors."""
    from conftest import make_tiny
    from sola_stream.storage.checkpoint import CheckpointReader, tensors_digest

    reader = CheckpointReader(make_tiny("qwen2", tmp_path / "m", tiny_tokenizer, shards=True))
    for i in range(3):
        prefix = f"model.layers.{i}."
        assert reader.digest(prefix) == tensors_digest(reader.tensors(prefix))
    outer = [n for n in reader.names() if not n.startswith("model.layers.")]
    assert reader.digest("", outer) == tensors_digest({n: reader.get(n) for n in outer})
    assert reader.digest("model.layers.0.") != reader.digest("model.layers.1.")


def test_values_only_spectrum_has_the_same_energies():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 24, generator=g, dtype=torch.float64)
    x = torch.randn(200, 24, generator=g, dtype=torch.float64)
    L, _ = cholesky_whitener(x.T @ x)
    full, values = spectrum(w, L), spectrum(w, L, values_only=True)
    assert values.basis is None
    torch.testing.assert_close(values.energy, full.energy, rtol=1e-10, atol=1e-8 * float(full.energy[0]))


@pytest.mark.parametrize("slab_rows", [1, 7, 10_000])
def test_submatrix_is_the_indexed_block_whatever_the_slab(monkeypatch, slab_rows):
    from sola_stream.method import decompose
    n = 300
    monkeypatch.setattr(decompose, "SUBMATRIX_SLAB", slab_rows * n * 8)  # that many rows per slab
    g = torch.Generator().manual_seed(0)
    c = torch.randn(n, n, dtype=torch.float64, generator=g)
    rows = torch.randperm(n, generator=g)[:211].sort().values
    cols = torch.randperm(n, generator=g)[:97]
    assert torch.equal(decompose.submatrix(c, rows), c[rows[:, None], rows])
    assert torch.equal(decompose.submatrix(c, rows, cols), c[rows][:, cols])
    assert decompose.submatrix(c, rows[:0]).shape == (0, 0)
