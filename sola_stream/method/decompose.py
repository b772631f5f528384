"""Pure factorization math: whitening and truncated (whitened) SVD.

All functions take and return tensors; nothing here knows about models or files.
Factorization runs in float64 (covariances are accumulated in float32 by the caller).

Notation (see docs/METHOD.md): a linear layer W is out x in (m x n), calibration inputs
X are tokens x n, C = X^T X = L L^T. The rank-k factors satisfy W ~ A @ B with A m x k,
B k x n, and ||(W - A B) X^T||_F^2 equals the sum of the dropped whitened energies.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Relative damping steps tried, in order, when C is not numerically positive definite.
# Deterministic: the same C always takes the same step.
_DAMPING_STEPS = (0.0, 1e-8, 1e-6, 1e-4, 1e-2, 1e-1, 1.0)
_MIN_PIVOT = 1e-12  # smallest accepted squared Cholesky pivot, relative to the mean diagonal


def cholesky_whitener(cov: torch.Tensor, what: str = "covariance", overwrite: bool = False) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor L of a (damped if needed) covariance, in float64. With `overwrite`,
    a float64 `cov` the caller no longer needs is damped in place instead of copied.

    Returns (L, damping) where damping is the absolute value added to the diagonal
    (0.0 when C factored as is). Dead inputs (zero rows) are why C is often singular.
    """
    # Only the lower triangle is read, so the float32 accumulation's tiny asymmetry is harmless
    # and no symmetrized copy is made; damping is added to the diagonal in place (one n x n
    # float64 matrix plus its factor: the memory floor of this step).
    # C is a Gram matrix X^T X: a NaN/Inf anywhere in X reaches the diagonal (C_jj = sum x_ij^2) and
    # |C_jk| <= sqrt(C_jj C_kk) bounds the rest, so the diagonal tells. isfinite of the whole matrix
    # would allocate a float copy of it (|C|) and three boolean ones: 5 GiB for a 70B FFN's.
    if not torch.isfinite(cov.diagonal()).all():
        raise ValueError(f"{what}: NaN or Inf values (NaN/Inf in calibration states?)")
    c = cov if overwrite and cov.dtype == torch.float64 else cov.to(torch.float64, copy=True)
    diag = c.diagonal()
    scale = float(diag.abs().mean()) or 1.0
    added = 0.0
    for step in _DAMPING_STEPS:
        damping = step * scale
        diag.add_(damping - added)
        added = damping
        L, info = torch.linalg.cholesky_ex(c)
        # a factorization that "succeeds" with a vanishing pivot is as unusable as a failed one
        if int(info) == 0 and float(L.diagonal().min()) ** 2 >= _MIN_PIVOT * scale:
            if damping:
                log.info("%s: not positive definite, damped diagonal by %.3g", what, damping)
            return L, damping
        del L
    raise ValueError(f"{what}: Cholesky failed even with damping {damping:.3g} (NaN/Inf in calibration states?)")


SUBMATRIX_SLAB = 256 << 20  # bytes: the most `submatrix` holds beside its result


def submatrix(c: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
    """c[rows][:, cols] (cols: rows by default), gathered a slab of rows at a time. The one-step
    c[rows[:, None], cols] broadcasts both index tensors to the result's shape in int64 on CUDA:
    4x a float32 result in temporaries, 6.9 GiB for a LLaMA-2-70B FFN's marginal block
    (docs/BENCHMARKS.md, "70B on a GPU"). Here the temporary is one slab (SUBMATRIX_SLAB)."""
    cols = rows if cols is None else cols
    out = c.new_empty((len(rows), len(cols)))
    step = max(1, SUBMATRIX_SLAB // max(1, c.shape[1] * c.element_size()))
    for s in range(0, len(rows), step):
        torch.index_select(c.index_select(0, rows[s:s + step]), 1, cols, out=out[s:s + step])
    return out


@dataclass
class Spectrum:
    """Whitened spectrum of one matrix, enough to produce factors at any rank.

    energy: squared whitened singular values, descending (length min(m, n)).
    basis: right singular vectors (n x r) when n <= m, left ones (m x r) otherwise.
    """

    weight: torch.Tensor  # m x n, as given (any dtype/device; converted when factors are made)
    whitener: torch.Tensor | None  # L (n x n, lower) or None for plain SVD
    energy: torch.Tensor
    basis: torch.Tensor
    right: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-`rank` factors (A: m x k, B: k x n) minimizing the whitened error."""
        L = self.whitener
        w = self.weight.to(self.basis.device, torch.float64)
        if self.right:
            v = self.basis[:, :rank]  # n x k
            a = (w @ L @ v) if L is not None else w @ v
            if L is None:
                b = v.T
            else:  # B = V_k^T L^-1, via a triangular solve L^T B^T = V_k
                b = torch.linalg.solve_triangular(L.T, v, upper=True).T
        else:
            # M = W L = U S V^T; the best rank-k M is U_k U_k^T M, so W_k = U_k U_k^T W.
            u = self.basis[:, :rank]
            a, b = u, u.T @ w
        return a.contiguous(), b.contiguous()


def spectrum(weight: torch.Tensor, whitener: torch.Tensor | None, device: torch.device | None = None,
             values_only: bool = False) -> Spectrum:
    """Eigendecomposition of the smaller Gram matrix of W L (equivalent to its SVD).

    The Gram route is several times faster than a full SVD for the tall matrices of an FFN,
    and float64 keeps the squared condition number harmless for truncation purposes.
    `values_only`: energies without a basis (no factors can be made; a survey needs no more).
    """
    device = device or (whitener.device if whitener is not None else weight.device)
    m = weight.to(device, torch.float64)
    if whitener is not None:
        m = m @ whitener
    right = m.shape[1] <= m.shape[0]
    gram = m.T @ m if right else m @ m.T
    del m
    if values_only:
        evals, basis = torch.linalg.eigvalsh(gram), None
    else:
        evals, evecs = torch.linalg.eigh(gram)
        basis = evecs.flip(1)
    del gram
    energy = evals.flip(0).clamp_min(0.0)
    return Spectrum(weight=weight, whitener=whitener, energy=energy, basis=basis, right=right)


def max_useful_rank(m: int, n: int) -> int:
    """Largest rank whose factors (k (m + n) params) are strictly smaller than W (m n)."""
    return (m * n - 1) // (m + n)
