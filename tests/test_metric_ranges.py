"""Property tests (Hypothesis): every quality metric stays inside its mathematical range, whatever the
samples look like, degenerate ones above all (one class only, identical feature sets, one sample repeated,
nearly singular covariances). Rounding must never put a number into run.json that its definition forbids:
an Inception score below 1 (CI once saw 0.9999999999999998), a negative Fréchet distance, a total-variation
distance above 1.

Driven through `quality_metrics`, the function whose output training and `dcgan-ray eval` record, with
statistics built the way ranks build them (`SampleStats.update`, summed over two "ranks").
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcgan_ray.quality.classifier import histogram_distance
from dcgan_ray.quality.fid import frechet_distance
from dcgan_ray.quality.metrics import NUM_CLASSES, SampleStats, quality_metrics

EXAMPLES = 200
fast = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FEATURE_FORMS = ("random", "one repeated", "low rank", "constant column", "huge offset")
PROB_FORMS = ("one class", "one class, soft", "uniform", "confident spread", "random")


def features(rng: np.random.Generator, form: str, n: int, d: int) -> np.ndarray:
    if form == "one repeated":  # a collapsed G: every sample the same image
        return np.tile(rng.standard_normal(d), (n, 1))
    if form == "low rank":  # features in a subspace, with noise at round-off's scale
        rank = max(1, d // 3)
        basis = rng.standard_normal((rank, d))
        return rng.standard_normal((n, rank)) @ basis + 1e-9 * rng.standard_normal((n, d))
    if form == "constant column":  # a dead unit
        x = rng.standard_normal((n, d))
        x[:, 0] = 0.7
        return x
    if form == "huge offset":  # means far larger than the spread: the covariance's cancellation
        return 1e4 + rng.standard_normal((n, d)) * 1e-2
    return rng.standard_normal((n, d)) * rng.uniform(0.1, 10)


def probs(rng: np.random.Generator, form: str, n: int) -> np.ndarray:
    if form == "one class":
        return np.tile(np.eye(NUM_CLASSES)[rng.integers(NUM_CLASSES)], (n, 1))
    if form == "one class, soft":  # a float32 softmax that puts all but round-off on one class
        logits = np.zeros((n, NUM_CLASSES), np.float32)
        logits[:, rng.integers(NUM_CLASSES)] = 40.0
        return torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    if form == "uniform":
        return np.full((n, NUM_CLASSES), 1.0 / NUM_CLASSES, np.float32)
    if form == "confident spread":  # the maximum: every class equally often, each sample sure
        return np.eye(NUM_CLASSES)[np.arange(n) % NUM_CLASSES]
    logits = rng.standard_normal((n, NUM_CLASSES)).astype(np.float32) * rng.uniform(0.1, 30)
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def sample_stats(x: np.ndarray, p: np.ndarray) -> SampleStats:
    """What the ranks' all-reduce gives: two shares' statistics, summed."""
    half = len(x) // 2
    total = None
    for part in (slice(0, half), slice(half, None)):
        s = SampleStats.empty(x.shape[1])
        s.update(torch.from_numpy(x[part]).float(), torch.from_numpy(p[part]))
        total = s.to_tensor() if total is None else total + s.to_tensor()
    return SampleStats.from_tensor(total)


def assert_in_range(metrics: dict[str, float]) -> None:
    assert set(metrics) == {"digit_fd", "digit_is", "class_hist_tv"}, metrics
    assert math.isfinite(metrics["digit_fd"]) and metrics["digit_fd"] >= 0.0, metrics
    assert 1.0 <= metrics["digit_is"] <= NUM_CLASSES, metrics
    assert 0.0 <= metrics["class_hist_tv"] <= 1.0, metrics


@fast
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(4, 60),
    d=st.integers(1, 12),
    gen_features=st.sampled_from(FEATURE_FORMS),
    gen_probs=st.sampled_from(PROB_FORMS),
    ref_features=st.sampled_from(FEATURE_FORMS),
    ref_probs=st.sampled_from(PROB_FORMS),
)
def test_every_metric_stays_in_its_range(seed, n, d, gen_features, gen_probs, ref_features, ref_probs):
    rng = np.random.default_rng(seed)
    generated = sample_stats(features(rng, gen_features, n, d), probs(rng, gen_probs, n))
    reference = sample_stats(features(rng, ref_features, n + 3, d), probs(rng, ref_probs, n + 3))
    assert_in_range(quality_metrics({"digit": generated}, {"digit": reference}))


@fast
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(4, 60), d=st.integers(1, 12), form=st.sampled_from(FEATURE_FORMS))
def test_a_set_against_itself_is_at_the_bounds(seed, n, d, form):
    """Identical sets: distances at their floor of 0; the Inception score of one class at its floor of 1."""
    rng = np.random.default_rng(seed)
    x, p = features(rng, form, n, d), probs(rng, "one class", n)
    metrics = quality_metrics({"digit": sample_stats(x, p)}, {"digit": sample_stats(x, p)})
    assert_in_range(metrics)
    assert metrics["digit_is"] == 1.0 and metrics["class_hist_tv"] == 0.0
    scale = max(float(np.trace(np.atleast_2d(np.cov(x, rowvar=False)))), 1.0)
    assert metrics["digit_fd"] <= 1e-6 * scale, metrics


@fast
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(10, 80))
def test_the_inception_score_reaches_its_ceiling(seed, n):
    rng = np.random.default_rng(seed)
    p = probs(rng, "confident spread", n * NUM_CLASSES)
    score = sample_stats(np.zeros((len(p), 2)), p).inception_score()
    assert 1.0 <= score <= NUM_CLASSES and math.isclose(score, NUM_CLASSES, rel_tol=1e-9)


@fast
@given(
    a=st.lists(st.floats(0, 1e6), min_size=NUM_CLASSES, max_size=NUM_CLASSES),
    b=st.lists(st.floats(0, 1e6), min_size=NUM_CLASSES, max_size=NUM_CLASSES),
)
def test_total_variation_of_normalised_histograms_is_in_0_1(a, b):
    a, b = np.array(a), np.array(b)
    if a.sum() == 0 or b.sum() == 0:
        return
    tv = histogram_distance(a / a.sum(), b / b.sum())
    assert 0.0 <= tv <= 1.0


@fast
@given(seed=st.integers(0, 2**32 - 1), d=st.integers(1, 16), rank=st.integers(0, 16), scale=st.floats(1e-6, 1e6))
def test_frechet_distance_of_nearly_singular_covariances_is_not_negative(seed, d, rank, scale):
    """Covariances of rank < d (plus round-off): the matrix square root's trace can come out a hair above
    the exact value, which must not make the distance negative."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((min(rank, d), d)) * scale
    sigma = basis.T @ basis + np.eye(d) * scale**2 * 1e-15
    other = sigma + 1e-12 * scale**2 * np.diag(rng.uniform(size=d))
    mu = rng.standard_normal(d)
    for s1, s2 in ((sigma, sigma), (sigma, other), (other, sigma)):
        distance = frechet_distance(mu, s1, mu, s2)
        assert math.isfinite(distance) and distance >= 0.0
