"""Error-compensating fit (pure functions): the compressed layer is fitted to reproduce what the
original layer computes on the original model's inputs, fed the inputs the compressed model produces.

Notation (docs/METHOD.md, "Error-compensating fit"): X (tokens x n) are the original model's inputs
of a layer W (m x n), X^ the compressed model's inputs at the same tokens, C = X^T^ X^ (+ damping)
= L L^T, M = X^T X^. The fit minimizes ||X W^T - X^ W'^T||_F^2:
- unconstrained: W* = W M C^-1 (a least-squares refit);
- rank k: the objective equals ||(W' - W*) L||^2 + const, so the optimum is the whitened truncated
  SVD of W* with the same L (decompose.spectrum(W*, L));
- with dense prime columns D next to low-rank marginal columns Z (the FFN output projection): D
  absorbs what it can, D = W*_p + (W*_q - Z) C_qp C_pp^-1, and Z is the whitened truncated SVD of
  W*_q in the metric of the Schur complement S = C_qq - C_qp C_pp^-1 C_pq.
All in float64.
"""
from __future__ import annotations

import torch

from sola_stream.method.decompose import Spectrum, cholesky_whitener, spectrum, submatrix


def local_and_cumulative(cov: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """The cross-covariance of the objective --fit compensate minimizes: the local error (the
    layer on the compressed model's inputs, what the plain fit minimizes) plus the cumulative
    one (against the original model's outputs), equally weighted:
    ||X^ W^T - X^ W'^T||^2 + ||X W^T - X^ W'^T||^2 = 2 ||(W' - W*) L||^2 + const with
    W* = W (C + M)/2 C^-1. The cumulative term alone (M) regresses the original outputs on
    inputs that are noisier than the originals, which shrinks them: measured worse than the plain
    fit on SmolLM2 (docs/BENCHMARKS.md). Computed in place of `cross` (no n x n copy)."""
    return cross.add_(cov).mul_(0.5)


def least_squares_weight(w: torch.Tensor, cross: torch.Tensor | None, L: torch.Tensor) -> torch.Tensor:
    """W* = W M C^-1 with C = L L^T (float64, on L's device). `cross` None means X^ = X, M = C
    undamped: W* is then W itself (no solve, so an undamped plain fit stays exact)."""
    w = w.to(L.device, torch.float64)
    if cross is None:
        return w
    # W M in float64, M converted a block of columns at a time (not a whole float64 copy of it)
    wm = torch.empty(w.shape[0], cross.shape[1], dtype=torch.float64, device=L.device)
    for j in range(0, cross.shape[1], 4096):
        torch.mm(w, cross[:, j:j + 4096].to(L.device, torch.float64), out=wm[:, j:j + 4096])
    # W M C^-1 = ((C^-1 M^T W^T))^T; C^-1 = L^-T L^-1, two triangular solves on (W M)^T
    y = torch.linalg.solve_triangular(L, wm.T, upper=False)
    return torch.linalg.solve_triangular(L.T, y, upper=True).T


def prime_columns_fit(w: torch.Tensor, cov: torch.Tensor, prime: torch.Tensor, marginal: torch.Tensor,
                      what: str = "covariance") -> tuple[Spectrum, torch.Tensor, float]:
    """Joint fit of dense prime columns and low-rank marginal columns of `w` (already W*), for
    inputs of covariance `cov` (n x n, damping included by the caller when needed).

    Returns (spectrum of W*_q in the Schur metric, T = C_pp^-1 C_pq (p x q), damping added to S).
    For a rank's factors A, B: D = W*_p + (W*_q - A B) T^T (see `prime_columns`)."""
    p, q = prime.to(cov.device), marginal.to(cov.device)
    # each block gathered (in slabs of rows: submatrix), then made float64 (no float64 copy of the whole C)
    c_pp = submatrix(cov, p).double()
    Lp, _ = cholesky_whitener(c_pp, what=f"{what} (prime neurons)", overwrite=True)
    del c_pp
    k = torch.linalg.solve_triangular(Lp, submatrix(cov, p, q).double(), upper=False)  # Lp^-1 C_pq
    s = submatrix(cov, q).double()
    s.addmm_(k.T, k, alpha=-1.0)  # Schur complement, in place
    t = torch.linalg.solve_triangular(Lp.T, k, upper=True)  # C_pp^-1 C_pq
    del k
    Ls, damping = cholesky_whitener(s, what=f"{what} (marginal neurons given the prime ones)")
    del s
    return spectrum(w[:, q], Ls, Ls.device), t, damping


def prime_columns(w: torch.Tensor, t: torch.Tensor, prime: torch.Tensor, marginal: torch.Tensor,
                  a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The refitted dense prime columns D = W*_p + (W*_q - A B) T^T (m x p)."""
    w = w.to(t.device, torch.float64)
    resid = w[:, marginal.to(t.device)] - a.to(t.device, torch.float64) @ b.to(t.device, torch.float64)
    return w[:, prime.to(t.device)] + resid @ t.T
