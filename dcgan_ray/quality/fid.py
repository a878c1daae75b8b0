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


class FeatureStats:
    """Sufficient statistics of a feature set: count, sum (d,), sum of outer products (d, d), float64.

    Combining two is addition, so ranks can all-reduce them instead of gathering images or features.
    float64 keeps the covariance's `outer / n - mean mean^T` cancellation harmless for network
    activations, whose means are not orders of magnitude larger than their spread.

    The sums accumulate as float64 torch tensors on the device of the features they are given (a GPU
    in training), so `update` never waits for the device; `to_tensor` stays there too, for the
    all-reduce. Only the end moves them to the host: `total`, `outer` and `mean_cov` (NumPy, for the
    Fréchet distance) and serialization.
    """

    def __init__(self, n: int, total: np.ndarray | torch.Tensor, outer: np.ndarray | torch.Tensor):
        self.n = n
        self._total = torch.as_tensor(total, dtype=torch.float64)
        self._outer = torch.as_tensor(outer, dtype=torch.float64)

    @classmethod
    def empty(cls, dim: int, device: torch.device | str = "cpu") -> FeatureStats:
        if dim < 1:
            raise ValueError(f"feature dimension must be at least 1, got {dim}")
        return cls(
            0,
            torch.zeros(dim, dtype=torch.float64, device=device),
            torch.zeros(dim, dim, dtype=torch.float64, device=device),
        )

    @property
    def dim(self) -> int:
        return self._total.shape[0]

    @property
    def device(self) -> torch.device:
        return self._total.device

    @property
    def total(self) -> np.ndarray:
        """The sum (d,) on the host (a copy when the sums live on a GPU)."""
        return self._total.cpu().numpy()

    @property
    def outer(self) -> np.ndarray:
        """The sum of outer products (d, d) on the host."""
        return self._outer.cpu().numpy()

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        """Add a (batch, d) block of features, accumulating in float64 on the features' device."""
        x = (
            features.detach()
            if isinstance(features, torch.Tensor)
            else torch.from_numpy(np.ascontiguousarray(features))
        )
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be (batch, {self.dim}), got shape {tuple(x.shape)}")
        x = x.to(torch.float64)
        if x.device != self.device:  # the first batch decides where the sums live
            self._total, self._outer = self._total.to(x.device), self._outer.to(x.device)
        self.n += x.shape[0]
        self._total += x.sum(dim=0)
        self._outer.addmm_(x.T, x)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (d,) and unbiased covariance (d, d), as np.mean and np.cov(rowvar=False) give them."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, these statistics hold {self.n}")
        mu = self.total / self.n  # a CPU-GPU sync point: the sums come to the host once, here
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov

    def to_tensor(self) -> torch.Tensor:
        """One flat float64 tensor [n, total, outer.ravel()] on the sums' device, so one
        all_reduce(SUM) combines ranks.

        n travels as float64, exact up to 2**53 feature vectors.
        """
        return torch.cat(
            [
                torch.tensor([float(self.n)], dtype=torch.float64, device=self.device),
                self._total,
                self._outer.reshape(-1),
            ]
        )

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> FeatureStats:
        """Inverse of `to_tensor` (the sums stay on t's device); d follows from the length 1 + d + d^2."""
        flat = t.detach().to(torch.float64).reshape(-1)
        size = flat.numel()
        dim = (math.isqrt(max(4 * size - 3, 0)) - 1) // 2
        if dim < 1 or 1 + dim + dim * dim != size:
            raise ValueError(f"a tensor of {size} values is not [n, total (d), outer (d*d)] for any d")
        return cls(
            n=int(round(flat[0].item())),  # a CPU-GPU sync point (once per evaluation)
            total=flat[1 : 1 + dim].clone(),
            outer=flat[1 + dim :].reshape(dim, dim).clone(),
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
            f"need means (d,) and covariances (d, d) of one d; "
            f"got {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}"
        )

    covmean, residual = _sqrtm(sigma1 @ sigma2)
    if residual > _SQRTM_RESIDUAL_TOL:
        log.warning(
            "sqrt(S1 S2) is inaccurate (relative residual %.2g); adding %g to the covariances' diagonals and retrying",
            residual,
            eps,
        )
        offset = np.eye(d) * eps
        covmean, residual = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("sqrt(S1 S2) is not finite even with the eps offset; the covariances hold NaN or inf")

    tr_covmean = np.trace(covmean)
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > _IMAG_RTOL * max(abs(tr_covmean.real), 1.0):
            raise ValueError(
                f"sqrt(S1 S2) has an imaginary part of {imag:.3g}, too large for round-off; "
                "the covariances are not valid (symmetric positive semi-definite) matrices"
            )
        tr_covmean = tr_covmean.real

    diff = mu1 - mu2
    mean_term = float(diff @ diff)
    trace_terms = float(np.trace(sigma1) + np.trace(sigma2))
    distance = mean_term + trace_terms - 2.0 * float(tr_covmean)
    if distance < 0.0:
        if distance < -_NEGATIVE_RTOL * max(mean_term + trace_terms, 1.0):
            raise ValueError(
                f"Fréchet distance came out at {distance:.3g} < 0; the covariances are not positive semi-definite"
            )
        distance = 0.0
    return distance


def frechet_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """The Fréchet distance between the Gaussian fits of two feature sets."""
    if a.dim != b.dim:
        raise ValueError(f"cannot compare statistics of {a.dim}-d and {b.dim}-d features")
    mu1, sigma1 = a.mean_cov()
    mu2, sigma2 = b.mean_cov()
    return frechet_distance(mu1, sigma1, mu2, sigma2)
