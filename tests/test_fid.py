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
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
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
    mp.spawn(
        _rank_main, args=(2, str(tmp_path / "pg-init"), str(tmp_path / "features.npy"), str(out)), nprocs=2, join=True
    )

    merged = FeatureStats.from_bytes(out.read_bytes())
    single = FeatureStats.empty(16)
    single.update(features)
    assert merged.n == 203
    assert np.allclose(merged.total, single.total) and np.allclose(merged.outer, single.outer)
    assert frechet_from_stats(merged, single) == pytest.approx(0.0, abs=1e-9)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _numpy_sums(batches: list[np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
    """The host path the statistics used to take: every batch to float64 NumPy, then sum and x^T x."""
    n, total, outer = 0, 0.0, 0.0
    for b in batches:
        x = np.asarray(b, dtype=np.float64)
        n, total, outer = n + len(x), total + x.sum(axis=0), outer + x.T @ x
    return n, total, outer


@pytest.mark.parametrize("device", DEVICES)
def test_device_accumulation_matches_the_numpy_path(device):
    """Sums kept as float64 tensors on the features' device equal the old per-batch NumPy sums."""
    rng = np.random.default_rng(8)
    # float32 batches as a network returns them, with a mean far from 0 (the cancellation float64 is for)
    batches = [(rng.standard_normal((m, 32)) * 0.3 + 5.0).astype(np.float32) for m in (500, 500, 137)]
    stats = FeatureStats.empty(32)
    for b in batches:
        stats.update(torch.from_numpy(b).to(device))
    assert stats.device.type == device  # the sums followed the features, nothing went to the host
    n, total, outer = _numpy_sums(batches)
    assert stats.n == n
    np.testing.assert_allclose(stats.total, total, rtol=1e-12)
    np.testing.assert_allclose(stats.outer, outer, rtol=1e-12)
    x = np.concatenate(batches).astype(np.float64)
    mu, cov = stats.mean_cov()
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    # to_tensor stays on the device (for the all-reduce) and round-trips
    flat = stats.to_tensor()
    assert flat.device.type == device and flat.dtype == torch.float64
    back = FeatureStats.from_tensor(flat)
    assert back.n == n and np.array_equal(back.outer, stats.outer)


@pytest.mark.parametrize("device", DEVICES)
def test_device_class_statistics_match_the_numpy_path(device):
    from dcgan_ray.quality.metrics import SampleStats

    rng = np.random.default_rng(9)
    feats = [rng.standard_normal((m, 6)).astype(np.float32) for m in (40, 23)]
    probs = [rng.dirichlet(np.ones(10), m).astype(np.float32) for m in (40, 23)]
    probs[1][0] = np.eye(10)[3]  # exact zeros: p log p must be 0 there, not nan
    s = SampleStats.empty(6)
    for f, p in zip(feats, probs, strict=True):
        s.update(torch.from_numpy(f).to(device), torch.from_numpy(p).to(device))
    p64 = np.concatenate(probs).astype(np.float64)
    np.testing.assert_allclose(s.prob_sum, p64.sum(0), rtol=1e-12)
    assert s.neg_entropy_sum == pytest.approx(float((p64 * np.log(np.clip(p64, 1e-12, None))).sum()), rel=1e-12)
    back = SampleStats.from_bytes(s.to_bytes())
    assert back.features.n == 63 and np.array_equal(back.prob_sum, s.prob_sum)
    assert back.inception_score() == pytest.approx(s.inception_score(), rel=1e-12)


def test_statistics_stored_before_the_device_path_still_load():
    """Reference statistics in the bucket were written by NumPy (np.savez of dim, n, total, outer; the
    SampleStats wrapper around them): the same bytes load and give the same distance."""
    from dcgan_ray.quality.metrics import SampleStats

    rng = np.random.default_rng(10)
    x = rng.standard_normal((64, 5))
    inner = io.BytesIO()
    np.savez(inner, dim=np.int64(5), n=np.int64(64), total=x.sum(0), outer=x.T @ x)
    old = io.BytesIO()
    np.savez(
        old,
        features=np.frombuffer(inner.getvalue(), dtype=np.uint8),
        prob_sum=np.arange(10.0),
        neg_entropy_sum=np.array(-3.5),
    )
    loaded = SampleStats.from_bytes(old.getvalue())
    assert loaded.features.n == 64 and np.array_equal(loaded.features.outer, x.T @ x)
    assert np.array_equal(loaded.prob_sum, np.arange(10.0)) and loaded.neg_entropy_sum == -3.5
    fresh = FeatureStats.empty(5)
    fresh.update(torch.from_numpy(x))
    assert frechet_from_stats(loaded.features, fresh) == pytest.approx(0.0, abs=1e-9)
