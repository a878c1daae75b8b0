"""Fréchet distance between feature sets, from sufficient statistics that ranks can add up.

The Fréchet (FID-style) distance between two sets of features fits a Gaussian to each and measures

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

A Gaussian fit needs only the count, the sum and the sum of outer products of the features. Those
add across batches and across ranks, so each rank keeps a `FeatureStats`, the ranks all-reduce
`to_tensor()` with SUM, and no images or features are ever gathered in one place. Reference
statistics of the real data are computed once and stored as bytes (`to_bytes`) next to the data set.

Nothing here imports Ray or needs a process group; `torch` is only the transport for all-reduce.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from scipy import linalg

log = logging.getLogger(__name__)

# Relative residual ||X X - A||_F / ||A||_F above which sqrtm's answer is not trusted and the
# product is regularised, like the reference code's retry (it retried only on non-finite output).
_SQRTM_RESIDUAL_TOL = 1e-4
# The imaginary part of sqrt(S1 S2) is round-off when S1 S2 has tiny negative or complex eigenvalues;
# relative to the trace, larger than this means the statistics are broken, not noisy.
_IMAG_RTOL = 1e-3
# Negative distances within this fraction of the terms' size are cancellation round-off.
_NEGATIVE_RTOL = 1e-6


@dataclass
class FeatureStats:
    """Sufficient statistics of a feature set: count, sum (d,), sum of outer products (d, d), float64.

    Combining two is addition, so ranks can all-reduce them instead of gathering images or features.
    float64 keeps the covariance's `outer / n - mean mean^T` cancellation harmless for network
    activations, whose means are not orders of magnitude larger than their spread.
    """

    n: int
    total: np.ndarray  # (d,) float64
    outer: np.ndarray  # (d, d) float64

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        if dim < 1:
            raise ValueError(f"feature dimension must be at least 1, got {dim}")
        return cls(0, np.zeros(dim, dtype=np.float64), np.zeros((dim, dim), dtype=np.float64))

    @property
    def dim(self) -> int:
        return self.total.shape[0]

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        """Add a (batch, d) block of features, accumulating in float64."""
        if isinstance(features, torch.Tensor):
            features = features.detach().to("cpu", torch.float64).numpy()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be (batch, {self.dim}), got shape {x.shape}")
        self.n += x.shape[0]
        self.total += x.sum(axis=0)
        self.outer += x.T @ x

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (d,) and unbiased covariance (d, d), as np.mean and np.cov(rowvar=False) give them."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, these statistics hold {self.n}")
        mu = self.total / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov

    def to_tensor(self) -> torch.Tensor:
        """One flat float64 tensor [n, total, outer.ravel()], so one all_reduce(SUM) combines ranks.

        n travels as float64, exact up to 2**53 feature vectors.
        """
        return torch.cat([
            torch.tensor([float(self.n)], dtype=torch.float64),
            torch.from_numpy(self.total),
            torch.from_numpy(self.outer.ravel()),
        ])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> FeatureStats:
        """Inverse of `to_tensor`; the dimension d follows from the length 1 + d + d^2."""
        flat = t.detach().to("cpu", torch.float64).reshape(-1).numpy()
        dim = (math.isqrt(max(4 * flat.size - 3, 0)) - 1) // 2
        if dim < 1 or 1 + dim + dim * dim != flat.size:
            raise ValueError(f"a tensor of {flat.size} values is not [n, total (d), outer (d*d)] for any d")
        return cls(
            n=int(round(flat[0])),
            total=flat[1:1 + dim].copy(),
            outer=flat[1 + dim:].reshape(dim, dim).copy(),
        )

    def save(self, file: str | os.PathLike | BinaryIO) -> None:
        """Write an .npz with dim, n, total and outer (no pickles, so loading runs no code)."""
        np.savez(file, dim=np.int64(self.dim), n=np.int64(self.n), total=self.total, outer=self.outer)

    @classmethod
    def load(cls, file: str | os.PathLike | BinaryIO) -> FeatureStats:
        with np.load(file, allow_pickle=False) as z:
            missing = {"dim", "n", "total", "outer"} - set(z.files)
            if missing:
                raise ValueError(f"feature statistics file lacks {sorted(missing)}; write it with FeatureStats.save")
            dim, n = int(z["dim"]), int(z["n"])
            total, outer = z["total"].astype(np.float64), z["outer"].astype(np.float64)
        if total.shape != (dim,) or outer.shape != (dim, dim) or n < 0:
            raise ValueError(
                f"feature statistics file is inconsistent: dim {dim}, n {n}, total {total.shape}, outer {outer.shape}"
            )
        return cls(n, total, outer)

    def to_bytes(self) -> bytes:
        """The `save` format as bytes, for putting reference statistics into S3."""
        buf = io.BytesIO()
        self.save(buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> FeatureStats:
        return cls.load(io.BytesIO(data))


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, float]:
    """sqrtm(a) and its relative residual, which scipy >= 1.16 no longer returns (`disp` is deprecated)."""
    with warnings.catch_warnings():
        # A singular product is expected (fewer samples than dimensions, dead units); the residual
        # below is the check that decides whether the answer can be used.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(a)
    if not np.isfinite(root).all():
        return root, math.inf
    residual = np.linalg.norm(root @ root - a) / max(np.linalg.norm(a), np.finfo(np.float64).tiny)
    return root, float(residual)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), computed as the reference FID code does.

    As in pytorch-fid and TTUR: scipy's sqrtm of the product; when that fails (non-finite, or here
    also an inaccurate root of a near-singular product) eps * I is added to both covariances and it
    is tried again; round-off imaginary parts are dropped and tiny negative results become 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"need means (d,) and covariances (d, d) of one d; got {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}"
        )

    covmean, residual = _sqrtm(sigma1 @ sigma2)
    if residual > _SQRTM_RESIDUAL_TOL:
        log.warning("sqrt(S1 S2) is inaccurate (relative residual %.2g); adding %g to the covariances' "
                    "diagonals and retrying", residual, eps)
        offset = np.eye(d) * eps
        covmean, residual = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("sqrt(S1 S2) is not finite even with the eps offset; the covariances hold NaN or inf")

    tr_covmean = np.trace(covmean)
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > _IMAG_RTOL * max(abs(tr_covmean.real), 1.0):
            raise ValueError(f"sqrt(S1 S2) has an imaginary part of {imag:.3g}, too large for round-off; "
                             "the covariances are not valid (symmetric positive semi-definite) matrices")
        tr_covmean = tr_covmean.real

    diff = mu1 - mu2
    mean_term = float(diff @ diff)
    trace_terms = float(np.trace(sigma1) + np.trace(sigma2))
    distance = mean_term + trace_terms - 2.0 * float(tr_covmean)
    if distance < 0.0:
        if distance < -_NEGATIVE_RTOL * max(mean_term + trace_terms, 1.0):
            raise ValueError(f"Fréchet distance came out at {distance:.3g} < 0; the covariances are not "
                             "positive semi-definite")
        distance = 0.0
    return distance


def frechet_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """The Fréchet distance between the Gaussian fits of two feature sets."""
    if a.dim != b.dim:
        raise ValueError(f"cannot compare statistics of {a.dim}-d and {b.dim}-d features")
    mu1, sigma1 = a.mean_cov()
    mu2, sigma2 = b.mean_cov()
    return frechet_distance(mu1, sigma1, mu2, sigma2)
