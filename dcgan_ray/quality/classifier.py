"""A small digit classifier of our own, the feature network for judging G's samples.

FID's Inception network (`dcgan_ray.quality.inception`) needs weights from outside and ~5.7 GFLOP per image,
and ImageNet features say little about 32x32 house numbers. This CNN, trained on the same digits G
learns, needs neither and gives
  - penultimate features for the Fréchet distance (`dcgan_ray.quality.fid`),
  - class probabilities for an inception score and a class histogram, where mode collapse shows as
    most samples landing in a few classes.

Network: 3 blocks of 3x3 conv -> 2x2 max-pool -> BN -> ReLU (32 -> 64 -> 128 channels), a dense
layer of `feature_dim` features (BN, ReLU), then 10 logits. It is built for CPU speed, so that three
epochs on 10,000 digits take well under two minutes on two cores: one conv per block, pooling before
BN and ReLU, and channels-last tensors, where PyTorch's CPU convolutions and max-pool are fastest.

Inputs are float in [-1, 1], the range of G's tanh, so samples go in without conversion and real
uint8 images go through `dcgan_ray.gan.step.to_model_input` exactly as in GAN training.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcgan_ray.errors import CheckpointError
from dcgan_ray.gan.step import to_model_input

log = logging.getLogger(__name__)

# Saved with the weights: a state from a different network must not load into this one silently.
ARCH = "digit-cnn-3x3-32-64-128-v1"
NUM_CLASSES = 10


def _block(in_ch: int, out_ch: int) -> nn.Sequential:
    # Max-pool commutes with ReLU, and with BN wherever BN's scale is positive, so pooling first is
    # nearly the usual conv-BN-ReLU-pool at a quarter of the BN and ReLU work. No conv bias: BN
    # subtracts the batch mean, which cancels it.
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class DigitClassifier(nn.Module):
    def __init__(self, feature_dim: int = 128):
        super().__init__()
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            _block(3, 32),  # 32x32x3 -> 16x16x32
            _block(32, 64),  # -> 8x8x64
            _block(64, 128),  # -> 4x4x128
            nn.Flatten(),  # -> 2048
            nn.Linear(4 * 4 * 128, feature_dim, bias=False),  # -> feature_dim
            # BN puts the feature units on one scale, so no few of them dominate the Fréchet distance.
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(feature_dim, NUM_CLASSES)  # -> 10 logits
        # torch's stubs leave out the memory_format keyword that Module.to takes (and documents).
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim) of x, float (N, 3, 32, 32) in [-1, 1]."""
        return self.body(x.contiguous(memory_format=torch.channels_last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 10) of x, float (N, 3, 32, 32) in [-1, 1]."""
        return self.head(self.features(x))


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random -max_shift..max_shift pixels in each direction.

    SVHN crops are centred only roughly; shifts teach that, and edge replication (not zeros) keeps
    the shifted-in border looking like the background around it.
    """
    n, _, height, width = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # (N, C, H + 2s, W + 2s)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(x.device)
    rows = offsets[0, :, None] + torch.arange(height, device=x.device)  # (N, H)
    cols = offsets[1, :, None] + torch.arange(width, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices around the channel slice put their (N, H, W) dims first: (N, H, W, C).
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def _check_labelled(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, 32, 32):
        raise ValueError(f"images must be uint8 (N, 3, 32, 32), got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be ({images.shape[0]},) to match the images, got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be digits 0..9, got {int(labels.min())}..{int(labels.max())}")


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log_every: int = 50,
    augment: bool = True,
    min_steps: int = 0,
) -> DigitClassifier:
    """Train a DigitClassifier with Adam on uint8 (N, 3, 32, 32) images and digit labels 0..9.

    Runs `epochs` epochs, or more when that is fewer than `min_steps` optimizer steps (a small split
    needs more passes to learn anything). Deterministic for a seed on one device: the seed drives the
    initial weights (without touching the caller's global RNG), the shuffles and the shifts. Each epoch
    uses full batches of a fresh permutation, so the fewer than batch_size left over differ from epoch
    to epoch. Returns the model in eval mode, as a fixed feature network.
    """
    _check_labelled(images, labels)
    steps = images.shape[0] // batch_size
    if steps == 0:
        raise ValueError(f"{images.shape[0]} images cannot fill one batch of {batch_size}; lower batch_size")
    if epochs * steps < min_steps:
        log.info(
            "%d epochs of %d steps are fewer than the %d steps asked for: training %d epochs",
            epochs,
            steps,
            min_steps,
            -(-min_steps // steps),
        )
        epochs = -(-min_steps // steps)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier().to(device)
    generator = torch.Generator().manual_seed(seed)
    images = images.to(device)
    labels = labels.to(device, torch.int64)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    model.train()
    for epoch in range(epochs):
        batches = torch.randperm(images.shape[0], generator=generator)[: steps * batch_size]
        batches = batches.view(steps, batch_size).to(device)
        # loss sum, correct, seen: kept on the device and read only when logging.
        window = torch.zeros(3, device=device)
        window_start = time.perf_counter()
        for i, idx in enumerate(batches):
            x = to_model_input(images[idx])
            if augment:
                x = random_shift(x, 2, generator)
            y = labels[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            window += torch.stack(
                [
                    loss.detach() * batch_size,
                    (logits.detach().argmax(dim=1) == y).sum().to(window.dtype),
                    torch.tensor(float(batch_size), device=device),
                ]
            )
            if (log_every and (i + 1) % log_every == 0) or i + 1 == steps:
                loss_sum, correct, seen = window.tolist()
                log.info(
                    "classifier epoch %d/%d step %d/%d: loss %.3f, accuracy %.3f, %.0f images/s",
                    epoch + 1,
                    epochs,
                    i + 1,
                    steps,
                    loss_sum / seen,
                    correct / seen,
                    seen / (time.perf_counter() - window_start),
                )
                window.zero_()
                window_start = time.perf_counter()
    return model.eval()


@torch.no_grad()
def classify(
    model: DigitClassifier, x: torch.Tensor, batch_size: int = 512, on_host: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, feature_dim) and class probabilities (N, 10) of x, float in [-1, 1], on the CPU
    (`on_host`) or left on the model's device (evaluation sums them there).

    Runs in eval mode (BatchNorm uses its running statistics, so a sample's features do not depend
    on the batch around it) and puts the model's previous mode back afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.device("cpu") if on_host else device
    features, probs = [], []
    try:
        for start in range(0, x.shape[0], batch_size):
            f = model.features(x[start : start + batch_size].to(device))
            features.append(f.to(out))
            probs.append(torch.softmax(model.head(f), dim=1).to(out))
    finally:
        model.train(was_training)
    if not features:
        return torch.empty(0, model.feature_dim, device=out), torch.empty(0, NUM_CLASSES, device=out)
    return torch.cat(features), torch.cat(probs)


def evaluate_accuracy(
    model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> float:
    """Fraction of uint8 (N, 3, 32, 32) images whose most likely class is their digit label."""
    _check_labelled(images, labels)
    if images.shape[0] == 0:
        raise ValueError("accuracy of no images is undefined")
    correct = 0
    # Converted batch by batch: the whole set as float would be 4x its uint8 size.
    for start in range(0, images.shape[0], batch_size):
        _, probs = classify(model, to_model_input(images[start : start + batch_size]), batch_size)
        correct += int((probs.argmax(dim=1) == labels[start : start + batch_size].cpu().long()).sum())
    return correct / images.shape[0]


def histogram_distance(hist: np.ndarray, reference_hist: np.ndarray) -> float:
    """Total-variation distance in 0..1; mode collapse onto a few classes shows as a large value."""
    hist, reference_hist = np.asarray(hist, np.float64), np.asarray(reference_hist, np.float64)
    if hist.shape != reference_hist.shape or hist.ndim != 1:
        raise ValueError(f"histograms must be 1-d of one length, got {hist.shape} and {reference_hist.shape}")
    # At most 1 for two normalised histograms; their round-off can add a few ulps where the exact value is 1
    # (disjoint classes), so it is clamped there. NaN (a diverged G) stays NaN.
    return float(np.clip(0.5 * np.abs(hist - reference_hist).sum(), 0.0, 1.0))


def save_state(model: DigitClassifier) -> dict:
    """A plain dict (architecture, feature_dim, CPU tensors) that torch.load(weights_only=True) reads."""
    return {
        "arch": ARCH,
        "feature_dim": model.feature_dim,
        "state": {name: t.detach().cpu().clone() for name, t in model.state_dict().items()},
    }


def load_classifier(state: dict) -> DigitClassifier:
    """The classifier saved by `save_state`, in eval mode on the CPU."""
    if not isinstance(state, dict) or state.get("arch") != ARCH:
        found = state.get("arch") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"classifier state has architecture {found!r}, this code builds {ARCH!r}; "
            "train the classifier again with this version"
        )
    feature_dim = state.get("feature_dim")
    # It sets a layer's size: a planted value must not allocate gigabytes (this code trains 128).
    if not isinstance(feature_dim, int) or isinstance(feature_dim, bool) or not 1 <= feature_dim <= 4096:
        raise CheckpointError(
            f"classifier state has feature_dim {feature_dim!r}, not an integer in [1, 4096]; "
            "train the classifier again with this version"
        )
    model = DigitClassifier(feature_dim=feature_dim)
    try:
        model.load_state_dict(state["state"])
    except (KeyError, RuntimeError, TypeError, AttributeError) as e:
        detail = " ".join(str(e).split())[:300]  # torch's message spans lines
        raise CheckpointError(f"classifier state does not fit {ARCH}: {type(e).__name__}: {detail}") from None
    return model.eval()
