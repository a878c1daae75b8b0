"""The digit classifier trained on rendered SVHN-format digits, and the sample-quality numbers built on
it: Fréchet distance of its features, inception score and class histogram."""

from __future__ import annotations

import io
from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcgan_ray.data.synth import render_digits
from dcgan_ray.errors import CheckpointError
from dcgan_ray.gan.step import to_model_input
from dcgan_ray.quality.classifier import (
    DigitClassifier,
    classify,
    evaluate_accuracy,
    histogram_distance,
    load_classifier,
    random_shift,
    save_state,
    train_classifier,
)
from dcgan_ray.quality.fid import FeatureStats, frechet_from_stats
from dcgan_ray.quality.metrics import SampleStats


def _rendered(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 3, 32, 32) and int64 digits 0..9, as dcgan_ray.data.svhn.read_mat lays them out."""
    X, y = render_digits(n, seed)
    images = torch.from_numpy(np.ascontiguousarray(X.transpose(3, 2, 0, 1)))
    return images, torch.from_numpy((y.reshape(-1) % 10).astype(np.int64))


@pytest.fixture(scope="module")
def train_set() -> tuple[torch.Tensor, torch.Tensor]:
    return _rendered(3000, seed=1)


@pytest.fixture(scope="module")
def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    return _rendered(2000, seed=2)


@pytest.fixture(scope="module")
def model(train_set) -> DigitClassifier:
    # Two short epochs: one epoch of 23 steps leaves it near chance.
    return train_classifier(*train_set, epochs=2, log_every=10)


def test_learns_rendered_digits(model, test_set):
    accuracy = evaluate_accuracy(model, *test_set)
    assert accuracy > 0.5, f"test accuracy {accuracy:.3f}"
    assert not model.training


def test_classify_gives_features_and_distributions(model, test_set):
    x = to_model_input(test_set[0][:300])
    model.train()
    features, probs = classify(model, x, batch_size=128)
    assert model.training  # the caller's mode is put back
    model.eval()
    assert features.shape == (300, model.feature_dim) == (300, 128)
    assert probs.shape == (300, 10)
    assert torch.allclose(probs.sum(dim=1), torch.ones(300), atol=1e-5)
    # eval mode: a sample's outputs do not depend on the batch it is in
    assert torch.allclose(classify(model, x[:7])[0], features[:7], atol=1e-5)
    assert torch.allclose(model.features(x[:7]), features[:7], atol=1e-5)


def test_training_is_deterministic_for_a_seed(train_set):
    images, labels = train_set[0][:256], train_set[1][:256]
    a, b, c = (train_classifier(images, labels, epochs=1, batch_size=64, seed=s) for s in (7, 7, 8))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.head.weight, c.head.weight)


def test_training_rejects_bad_inputs(train_set):
    images, labels = train_set
    with pytest.raises(ValueError, match="images must be uint8"):
        train_classifier(images.float(), labels)
    with pytest.raises(ValueError, match="labels must be digits 0..9"):
        train_classifier(images[:10], labels[:10] + 10)
    with pytest.raises(ValueError, match="cannot fill one batch of 128"):
        train_classifier(images[:100], labels[:100])


@pytest.mark.slow  # over 20 s with no server: outside the fast lane
def test_a_small_split_still_trains_with_min_steps(train_set, test_set):
    # The case: 1,024 images x 2 epochs (32 steps of 64) stay near chance; 200 steps learn them.
    images, labels = train_set[0][:1024], train_set[1][:1024]
    few = train_classifier(images, labels, epochs=2, batch_size=64, log_every=0)
    enough = train_classifier(images, labels, epochs=2, batch_size=64, log_every=0, min_steps=200)
    assert evaluate_accuracy(few, *test_set) < 0.7 and evaluate_accuracy(enough, *test_set) > 0.9


def test_random_shift_moves_whole_images_by_at_most_two_pixels():
    x = torch.rand(16, 3, 32, 32)
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    shifts = []
    for i in range(16):
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[i, :, dy : dy + 32, dx : dx + 32])
        ]
        assert found, f"image {i} is not a window of its padded original"
        shifts.append(found[0])
    assert len(set(shifts)) > 1  # each image draws its own shift


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of float (N, 3, H, W) images, edges replicated."""
    radius = 4
    k = torch.exp(-(torch.arange(-radius, radius + 1.0) ** 2) / (2 * sigma**2))
    k = (k / k.sum()).repeat(3, 1, 1, 1)  # (3, 1, 1, 2r+1): one kernel per channel
    x = F.pad(x, (radius,) * 4, mode="replicate")
    x = F.conv2d(x, k, groups=3)
    return F.conv2d(x, k.transpose(2, 3), groups=3)


def _stats(model: DigitClassifier, x: torch.Tensor) -> FeatureStats:
    stats = FeatureStats.empty(model.feature_dim)
    stats.update(classify(model, x)[0])
    return stats


def test_frechet_distance_grows_with_noise_and_blur(model, test_set):
    x = to_model_input(test_set[0])
    half_a, half_b = x[:1000], x[1000:]
    reference = _stats(model, half_a)
    clean = frechet_from_stats(reference, _stats(model, half_b))

    noise = torch.Generator().manual_seed(0)
    noisy = [
        frechet_from_stats(
            reference, _stats(model, (half_b + s * torch.randn(half_b.shape, generator=noise)).clamp(-1, 1))
        )
        for s in (0.15, 0.3, 0.6)
    ]
    blurred = [frechet_from_stats(reference, _stats(model, _blur(half_b, s))) for s in (1.0, 1.5, 2.0)]

    for name, values in (("noise", noisy), ("blur", blurred)):
        assert all(a < b for a, b in pairwise(values)), f"{name}: {values}"
        assert clean < values[0], f"clean halves {clean} vs {name} {values}"


def _prob_stats(*parts: np.ndarray) -> SampleStats:
    """The statistics training and `dcgan-ray eval` build from class probabilities, summed over parts as
    ranks sum them (features are irrelevant here: zeros)."""
    total = None
    for probs in parts:
        s = SampleStats.empty(2)
        s.update(torch.zeros(len(probs), 2), torch.from_numpy(probs))
        total = s.to_tensor() if total is None else total + s.to_tensor()
    return SampleStats.from_tensor(total)


def test_inception_score_bounds():
    confident_uniform = np.tile(np.eye(10), (20, 1))
    assert _prob_stats(confident_uniform).inception_score() == pytest.approx(10.0)
    # Summed over two "ranks", the score is that of the whole set.
    assert _prob_stats(confident_uniform[:70], confident_uniform[70:]).inception_score() == pytest.approx(10.0)
    one_class = np.zeros((200, 10))
    one_class[:, 3] = 1.0
    assert _prob_stats(one_class).inception_score() == pytest.approx(1.0)
    assert _prob_stats(np.full((50, 10), 0.1)).inception_score() == pytest.approx(1.0)  # unsure predictions
    half_sure = np.tile(np.eye(10) * 0.5 + 0.05, (20, 1))
    assert 1.0 < _prob_stats(half_sure).inception_score() < 10.0


def test_class_histogram_shows_mode_collapse():
    uniform = _prob_stats(np.tile(np.eye(10), (20, 1))).class_histogram()
    assert np.allclose(uniform, 0.1)
    collapsed_probs = np.zeros((100, 10))
    collapsed_probs[:, 3] = 1.0
    collapsed = _prob_stats(collapsed_probs[:30], collapsed_probs[30:]).class_histogram()
    assert collapsed[3] == pytest.approx(1.0)
    assert histogram_distance(collapsed, uniform) > 0.8
    assert histogram_distance(uniform, uniform) == 0.0
    with pytest.raises(ValueError, match="one length"):
        histogram_distance(uniform, uniform[:9])


def test_state_round_trips_through_weights_only_load(model, test_set):
    buf = io.BytesIO()
    torch.save(save_state(model), buf)
    loaded = load_classifier(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    x = to_model_input(test_set[0][:64])
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training

    state = save_state(model)
    state["arch"] = "some-other-net"
    with pytest.raises(CheckpointError, match="architecture 'some-other-net'"):
        load_classifier(state)
