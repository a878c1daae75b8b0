"""Tests for the offline synthetic SVHN generator (dcgan_ray.data.synth)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io

from dcgan_ray.data import synth


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, np.ndarray]:
    return synth.render_digits(500, seed=0)


def _digit_features(X: np.ndarray) -> np.ndarray:
    """Grey images, polarity-normalised so the digit ink is bright, z-scored."""
    grey = X.astype(np.float64).mean(axis=2).transpose(2, 0, 1)
    grey -= grey.mean(axis=(1, 2), keepdims=True)
    # The centre digit covers the middle more than the top/bottom rows, so the
    # middle is brighter than those rows exactly when the ink is light.
    centre = grey[:, 8:24, 10:22].mean(axis=(1, 2))
    rows = np.concatenate([grey[:, :3], grey[:, -3:]], axis=1).mean(axis=(1, 2))
    grey *= np.where(centre >= rows, 1.0, -1.0)[:, None, None]
    grey /= grey.std(axis=(1, 2), keepdims=True) + 1e-6
    return grey.reshape(len(grey), -1)


def test_shapes_dtypes_and_label_range(sample):
    X, y = sample
    assert X.shape == (32, 32, 3, 500) and X.dtype == np.uint8
    assert y.shape == (500, 1) and y.dtype == np.uint8
    assert y.min() >= 1 and y.max() <= 10


def test_every_digit_appears_with_ten_meaning_zero(sample):
    _, y = sample
    assert set(np.unique(y)) == set(range(1, 11))
    counts = np.bincount(y.ravel(), minlength=11)
    assert counts[0] == 0
    # SVHN's skew: 1s are far more common than 9s.
    assert counts[1] > counts[9]


def test_empty_and_negative_n():
    X, y = synth.render_digits(0)
    assert X.shape == (32, 32, 3, 0) and y.shape == (0, 1)
    with pytest.raises(ValueError):
        synth.render_digits(-1)


def test_deterministic_per_seed_and_differs_between_seeds():
    X1, y1 = synth.render_digits(40, seed=7)
    X2, y2 = synth.render_digits(40, seed=7)
    X3, y3 = synth.render_digits(40, seed=8)
    assert np.array_equal(X1, X2) and np.array_equal(y1, y2)
    assert not np.array_equal(X1, X3)
    assert not np.array_equal(y1, y3)


def test_images_have_content_and_backgrounds_vary(sample):
    X, _ = sample
    pixels = X.astype(np.float64)
    assert pixels.std(axis=(0, 1, 2)).min() > 5.0
    # Top and bottom rows are almost all background; their mean colour must
    # vary a lot across images (plain grey backgrounds would fail this).
    border = np.concatenate([pixels[:2], pixels[-2:]], axis=0).mean(axis=(0, 1))
    assert border.shape == (3, 500)
    assert (border.std(axis=1) > 40.0).all()


def test_label_is_recognisable_from_the_centre_digit():
    # A ridge-regression linear classifier must beat chance (~0.19 for the
    # majority class) by far, which only holds if the label digit dominates.
    X_train, y_train = synth.render_digits(1500, seed=1)
    X_test, y_test = synth.render_digits(500, seed=2)
    A, B = _digit_features(X_train), _digit_features(X_test)
    targets = np.eye(10)[y_train.ravel() % 10]
    W = np.linalg.solve(A.T @ A + 100.0 * np.eye(A.shape[1]), A.T @ targets)
    accuracy = ((B @ W).argmax(axis=1) == y_test.ravel() % 10).mean()
    assert accuracy > 0.5


def test_builtin_font_alone_is_enough(monkeypatch):
    # CI machines may have no system fonts at all.
    monkeypatch.setattr(synth, "_font_sources", lambda: (None,))
    X, y = synth.render_digits(30, seed=0)
    assert X.shape == (32, 32, 3, 30)
    assert X.astype(np.float64).std(axis=(0, 1, 2)).min() > 5.0


def test_mat_round_trip_and_no_temp_files(tmp_path):
    path = tmp_path / "train_32x32.mat"
    synth.synth_svhn_mat(path, 40, seed=3)
    assert [p.name for p in tmp_path.iterdir()] == ["train_32x32.mat"]

    mat = scipy.io.loadmat(path)
    X, y = synth.render_digits(40, seed=3)
    assert mat["X"].shape == (32, 32, 3, 40) and mat["X"].dtype == np.uint8
    assert mat["y"].shape == (40, 1) and mat["y"].dtype == np.uint8
    assert np.array_equal(mat["X"], X)
    assert np.array_equal(mat["y"], y)


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "train_32x32.mat"
    path.write_bytes(b"previous")
    X, y = synth.render_digits(5, seed=0)

    def broken_savemat(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(scipy.io, "savemat", broken_savemat)
    with pytest.raises(OSError):
        synth.write_svhn_mat(path, X, y)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["train_32x32.mat"]


@pytest.mark.parametrize(
    "X, y",
    [
        (np.zeros((32, 32, 3, 4), np.float32), np.ones((4, 1), np.uint8)),
        (np.zeros((32, 32, 3, 4), np.uint8), np.ones((4,), np.uint8)),
        (np.zeros((28, 28, 3, 4), np.uint8), np.ones((4, 1), np.uint8)),
    ],
)
def test_write_rejects_non_svhn_layout(tmp_path, X, y):
    with pytest.raises(ValueError):
        synth.write_svhn_mat(tmp_path / "bad.mat", X, y)
    assert list(tmp_path.iterdir()) == []
