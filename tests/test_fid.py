"""Fréchet distance against closed forms, and feature statistics combined in chunks, by tensor and
across two real gloo processes."""

from __future__ import annotations

import datetime
import io
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcgan_ray.quality.fid import FeatureStats, frechet_distance, frechet_from_stats


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    """A random well-conditioned symmetric positive-definite matrix."""
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _frechet_by_eigh(mu1, s1, mu2, s2) -> float:
    """Independent route: Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix."""
    r = _psd_sqrt(s1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0.0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def test_diagonal_gaussians_match_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    v1, v2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_identical_distributions_are_at_distance_zero():
    rng = np.random.default_rng(1)
    mu, sigma = rng.standard_normal(16), _spd(rng, 16)
    d = frechet_distance(mu, sigma, mu, sigma)
    assert 0.0 <= d < 1e-8


def test_full_covariances_match_eigendecomposition():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    s1, s2 = _spd(rng, 12), _spd(rng, 12)
    d = frechet_distance(mu1, s1, mu2, s2)
    assert d == pytest.approx(_frechet_by_eigh(mu1, s1, mu2, s2), rel=1e-9)
    assert d > ((mu1 - mu2) ** 2).sum()  # the covariances differ, so the trace term adds


def test_rank_deficient_covariances_stay_finite_and_accurate():
    # Fewer samples than dimensions, as with a small sample of generated images.
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((5, 20)), rng.standard_normal((5, 20)) + 0.5
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    d = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(d) and d >= 0.0
    assert d == pytest.approx(_frechet_by_eigh(mu1, s1, mu2, s2), rel=1e-4)


def test_invalid_covariances_raise():
    mu = np.zeros(2)
    with pytest.raises(ValueError, match="imaginary part"):
        frechet_distance(mu, np.diag([1.0, -1.0]), mu, np.eye(2))
    with pytest.raises(ValueError, match="not finite"):
        frechet_distance(mu, np.full((2, 2), np.nan), mu, np.eye(2))
    with pytest.raises(ValueError, match=r"means \(d,\) and covariances \(d, d\)"):
        frechet_distance(np.zeros(3), np.eye(3), mu, np.eye(2))


def test_stats_in_chunks_equal_stats_in_one_go():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((301, 8)) * rng.uniform(0.5, 2.0, 8) + rng.standard_normal(8)
    whole = FeatureStats.empty(8)
    whole.update(x)
    first, second = FeatureStats.empty(8), FeatureStats.empty(8)
    first.update(x[:120])
    second.update(torch.from_numpy(x[120:]).float())  # a float32 tensor, as a network returns
    second_f64 = FeatureStats.empty(8)
    second_f64.update(x[120:])

    def combined(a, b):  # what the ranks' all_reduce(SUM) of to_tensor() does
        return FeatureStats.from_tensor(a.to_tensor() + b.to_tensor())

    merged = combined(first, second_f64)
    assert merged.n == 301
    assert np.allclose(merged.total, whole.total) and np.allclose(merged.outer, whole.outer)
    assert np.allclose(combined(first, second).total, whole.total, rtol=1e-6)

    mu, cov = whole.mean_cov()
    assert np.allclose(mu, x.mean(axis=0)) and np.allclose(cov, np.cov(x, rowvar=False))
    assert frechet_from_stats(whole, merged) == pytest.approx(0.0, abs=1e-9)


def test_stats_reject_wrong_shapes_and_too_few_samples():
    s = FeatureStats.empty(4)
    with pytest.raises(ValueError, match=r"features must be \(batch, 4\)"):
        s.update(np.zeros((3, 5)))
    s.update(np.ones((1, 4)))
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        s.mean_cov()
    with pytest.raises(ValueError, match="is not \\[n, total"):
        FeatureStats.from_tensor(torch.zeros(10, dtype=torch.float64))


def test_serialization_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    s = FeatureStats.empty(7)
    s.update(rng.standard_normal((50, 7)))
    for loaded in (FeatureStats.from_bytes(s.to_bytes()), _through_file(s, tmp_path / "ref.npz")):
        assert loaded.n == 50 and loaded.dim == 7
        assert np.array_equal(loaded.total, s.total) and np.array_equal(loaded.outer, s.outer)

    buf = io.BytesIO()
    np.savez(buf, n=np.int64(3))
    with pytest.raises(ValueError, match=r"lacks \['dim', 'outer', 'total'\]"):
        FeatureStats.from_bytes(buf.getvalue())


def _through_file(s: FeatureStats, path) -> FeatureStats:
    s.save(path)
    return FeatureStats.load(path)


def _rank_main(rank: int, world_size: int, init_file: str, features_file: str, out_file: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo would otherwise pick the host's non-loopback address
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        features = np.load(features_file)
        mine = np.array_split(features, world_size)[rank]
        stats = FeatureStats.empty(features.shape[1])
        stats.update(mine)
        flat = stats.to_tensor()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if rank == 0:
            with open(out_file, "wb") as f:
                f.write(FeatureStats.from_tensor(flat).to_bytes())
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_two_processes_equals_single_process(tmp_path):
    rng = np.random.default_rng(6)
    features = rng.standard_normal((203, 16)) + 3.0
    np.save(tmp_path / "features.npy", features)
    out = tmp_path / "merged.npz"
    mp.spawn(_rank_main, args=(2, str(tmp_path / "pg-init"), str(tmp_path / "features.npy"), str(out)),
             nprocs=2, join=True)

    merged = FeatureStats.from_bytes(out.read_bytes())
    single = FeatureStats.empty(16)
    single.update(features)
    assert merged.n == 203
    assert np.allclose(merged.total, single.total) and np.allclose(merged.outer, single.outer)
    assert frechet_from_stats(merged, single) == pytest.approx(0.0, abs=1e-9)
