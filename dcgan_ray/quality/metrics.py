"""Sample quality: Fréchet distances (digit classifier, Inception) and digit-class statistics.

`Evaluator` is the one pipeline: training calls it every `eval.every_epochs` on every rank, and
`dcgan-ray eval` calls it in a single process.

- An *extractor* turns images in [-1, 1] into features (and, for the digit classifier, class
  probabilities). `digit` is our own classifier (`dcgan-ray classifier train`, stored in the bucket);
  `inception` is the standard 2015 Inception v3 pool3 network of FID.
- *Reference statistics* of the real split, per (dataset, split, extractor, extractor weights,
  image count), are computed once and stored next to the data in S3; every run reuses them.
- Each worker generates its share of `eval.num_samples` images and sums *sufficient statistics*
  (feature sums and outer products, class-probability sums); ranks all-reduce those, never images.
  Reference statistics are sharded the same way: each rank takes every world-th real image.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dcgan_ray import progress
from dcgan_ray.config import METRICS, JobConfig
from dcgan_ray.errors import CheckpointError, DcganError, ObjectMissing
from dcgan_ray.gan.step import to_model_input, unwrap
from dcgan_ray.gan.sync import all_reduce_sum, broadcast_from_rank_zero
from dcgan_ray.quality.classifier import DigitClassifier, classify, histogram_distance, load_classifier
from dcgan_ray.quality.fid import FeatureStats, frechet_from_stats
from dcgan_ray.storage.layout import classifier_key, reference_stats_key
from dcgan_ray.storage.s3 import Store

if TYPE_CHECKING:  # the module itself is imported only when the inception extractor is used
    from dcgan_ray.quality.inception import InceptionV3Pool3

log = logging.getLogger(__name__)

NUM_CLASSES = 10
METRIC_NAMES = {extractor: metric for metric, extractor in METRICS.items()}


class Extractor:
    """Features (and class probabilities, or None) of a batch of images in [-1, 1]."""

    name: str
    ident: str  # identifies the weights: reference statistics are keyed by it
    feature_dim: int

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class DigitExtractor(Extractor):
    name = "digit"

    def __init__(self, model: DigitClassifier, ident: str, accuracy: float | None = None):
        self.model, self.ident, self.feature_dim = model, ident, model.feature_dim
        self.accuracy = accuracy  # the classifier's stored test accuracy, reported beside digit_fd

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return classify(self.model, images, on_host=False)


class InceptionExtractor(Extractor):
    name = "inception"

    def __init__(self, model: InceptionV3Pool3, ident: str):
        self.model, self.ident, self.feature_dim = model, ident, model.feature_dim

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        with torch.no_grad():
            # FID's network takes 8-bit pixels: quantise as a saved PNG would be.
            pixels = images.add(1.0).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)
            return self.model(pixels).double(), None


MORE_CLASSIFIER_TRAINING = (
    "Train it again on more data or for longer: prepare the whole split (drop classifier.max_images), or "
    "raise classifier.min_steps / classifier.epochs, e.g. `dcgan-ray classifier train {config} --set "
    "classifier.min_steps=2000`"
)


def load_digit_classifier(store: Store, cfg: JobConfig) -> tuple[DigitClassifier, dict]:
    """The classifier from the bucket and its metadata (accuracy, what it was trained on)."""
    key = classifier_key(cfg)
    try:
        blob = store.get_bytes(key)
    except ObjectMissing:
        raise DcganError(
            f"no digit classifier at {store.uri(key)}: train one with `dcgan-ray classifier train {{config}}` "
            "(minutes on a CPU), or turn evaluation off with --set eval.every_epochs=0"
        ) from None
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        meta = state["meta"]
    except Exception as e:  # noqa: BLE001 -- torch raises many types for a damaged file
        raise CheckpointError(
            f"the digit classifier at {store.uri(key)} cannot be read ({type(e).__name__}); "
            "train it again with `dcgan-ray classifier train {config}`"
        ) from None
    return load_classifier(state["model"]), {**meta, "uri": store.uri(key), "sha256": hashlib.sha256(blob).hexdigest()}


def check_classifier(store: Store, cfg: JobConfig) -> dict | None:
    """Before a run or study that evaluates with the digit classifier: it must exist and its stored test
    accuracy must reach eval.min_classifier_accuracy. Returns its metadata (None without evaluation)."""
    if not cfg.eval.every_epochs or "digit" not in cfg.eval.extractors:
        return None
    _, meta = load_digit_classifier(store, cfg)
    accuracy = meta.get("test_accuracy")
    if accuracy is None or accuracy < cfg.eval.min_classifier_accuracy:
        raise DcganError(
            f"the digit classifier at {meta['uri']} has test accuracy "
            f"{accuracy if accuracy is None else f'{accuracy:.3f}'} "
            f"on {meta.get('test_images', '?')} images, below eval.min_classifier_accuracy="
            f"{cfg.eval.min_classifier_accuracy:g}: its digit_fd would rank samples by features that do not tell "
            f"digits apart. {MORE_CLASSIFIER_TRAINING}"
        )
    return meta


def load_extractors(store: Store, cfg: JobConfig, device: torch.device) -> list[Extractor]:
    extractors: list[Extractor] = []
    if "digit" in cfg.eval.extractors:
        model, meta = load_digit_classifier(store, cfg)
        extractors.append(DigitExtractor(model.to(device), meta["sha256"][:16], meta.get("test_accuracy")))
    if "inception" in cfg.eval.extractors:
        from dcgan_ray.quality.inception import load_inception

        inception = load_inception(
            cfg.eval.inception_weights, cfg.eval.inception_sha256, storage=cfg.storage, device=device
        )
        ident = (cfg.eval.inception_sha256 or hashlib.sha256(cfg.eval.inception_weights.encode()).hexdigest())[:16]
        extractors.append(InceptionExtractor(inception, ident))
    return extractors


class SampleStats:
    """Sufficient statistics of one image set under one extractor. Like `FeatureStats`, the sums stay
    on the device of what they are given (no host transfer per batch); `prob_sum` and
    `neg_entropy_sum` bring them to the host at the end."""

    def __init__(
        self, features: FeatureStats, prob_sum: np.ndarray | torch.Tensor, neg_entropy_sum: float | torch.Tensor
    ):
        self.features = features
        self._prob_sum = torch.as_tensor(prob_sum, dtype=torch.float64)  # (10,) sum of p(y|x); zeros without
        self._neg_entropy_sum = torch.as_tensor(neg_entropy_sum, dtype=torch.float64)  # () sum over x of sum_y p log p

    @classmethod
    def empty(cls, dim: int, device: torch.device | str = "cpu") -> SampleStats:
        return cls(
            FeatureStats.empty(dim, device),
            torch.zeros(NUM_CLASSES, dtype=torch.float64, device=device),
            torch.zeros((), dtype=torch.float64, device=device),
        )

    @property
    def prob_sum(self) -> np.ndarray:
        return self._prob_sum.cpu().numpy()

    @property
    def neg_entropy_sum(self) -> float:
        return float(self._neg_entropy_sum.item())

    def update(self, features: torch.Tensor, probs: torch.Tensor | None) -> None:
        self.features.update(features)
        if probs is not None:
            p = probs.detach().to(torch.float64)
            if p.device != self._prob_sum.device:
                self._prob_sum, self._neg_entropy_sum = self._prob_sum.to(p.device), self._neg_entropy_sum.to(p.device)
            self._prob_sum += p.sum(dim=0)
            self._neg_entropy_sum += (p * p.clamp(min=1e-12).log()).sum()

    def to_tensor(self) -> torch.Tensor:
        device = self.features.device
        return torch.cat(
            [self.features.to_tensor(), self._prob_sum.to(device), self._neg_entropy_sum.to(device).reshape(1)]
        )

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> SampleStats:
        t = t.cpu()  # at the end of an evaluation: one transfer to the host
        return cls(FeatureStats.from_tensor(t[: -NUM_CLASSES - 1]), t[-NUM_CLASSES - 1 : -1].clone(), t[-1].clone())

    def class_histogram(self) -> np.ndarray:
        return self.prob_sum / max(self.prob_sum.sum(), 1e-12)

    def inception_score(self) -> float:
        """exp(E_x KL(p(y|x) || p(y))) from sums: E[sum p log p] - sum p_bar log p_bar.

        The mean KL is at least 0 (Jensen) and at most the entropy of p_bar, log(classes), so the score
        lies in [1, classes]. Computed as a difference of two sums it rounds just past a bound when the
        exact value is on it (samples all of one class gave 0.9999999999999996), so it is clamped to the
        range; a non-finite input (a diverged G) stays NaN.
        """
        n = self.features.n
        p_bar = self.prob_sum / n
        mean_kl = self.neg_entropy_sum / n - (p_bar * np.log(np.clip(p_bar, 1e-12, None))).sum()
        return float(np.exp(np.clip(mean_kl, 0.0, np.log(NUM_CLASSES))))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            features=np.frombuffer(self.features.to_bytes(), dtype=np.uint8),
            prob_sum=self.prob_sum,
            neg_entropy_sum=np.array(self.neg_entropy_sum),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SampleStats:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        return cls(FeatureStats.from_bytes(z["features"].tobytes()), z["prob_sum"], float(z["neg_entropy_sum"]))


def image_stats(extractors: list[Extractor], batches) -> dict[str, SampleStats]:
    """Statistics of an iterable of float image batches in [-1, 1], under every extractor."""
    stats = {e.name: SampleStats.empty(e.feature_dim) for e in extractors}  # (on the first batch's device)
    for images in batches:
        for e in extractors:
            stats[e.name].update(*e(images))
        progress.beat()
    return stats


def generated_batches(netG: torch.nn.Module, count: int, z_dim: int, batch_size: int, seed: int, device: torch.device):
    """`count` samples of G in eval mode, from noise seeded by `seed` (the same images every evaluation)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = netG.training
    netG.eval()
    try:
        with torch.no_grad():
            for start in range(0, count, batch_size):
                n = min(batch_size, count - start)
                yield netG(torch.randn(n, z_dim, device=device, generator=gen))
    finally:
        netG.train(was_training)


def real_batches(images_uint8: np.ndarray | torch.Tensor, batch_size: int, device: torch.device):
    images = torch.as_tensor(images_uint8)
    for start in range(0, len(images), batch_size):
        yield to_model_input(images[start : start + batch_size].to(device))


def reference_stats(
    store: Store,
    cfg: JobConfig,
    extractors: list[Extractor],
    images_uint8: np.ndarray | torch.Tensor,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> dict[str, SampleStats]:
    """The real split's statistics per extractor: from S3 when already computed, else computed and stored.

    A collective when world > 1: rank 0 decides what is missing, every rank computes its share (every
    world-th image), the shares are all-reduced, and rank 0 stores the sum.
    """
    count = len(images_uint8)
    keys = {e.name: reference_stats_key(cfg, e.name, e.ident, count) for e in extractors}
    out: dict[str, SampleStats] = {}
    if rank == 0:
        for e in extractors:
            try:
                out[e.name] = SampleStats.from_bytes(store.get_bytes(keys[e.name]))
            except ObjectMissing:
                pass
    missing_names = broadcast_from_rank_zero([e.name for e in extractors if e.name not in out])
    missing = [e for e in extractors if e.name in missing_names]
    if missing:
        if rank == 0:
            log.info(
                "computing reference statistics of %d real images for %s on %d rank(s)",
                count,
                ", ".join(e.name for e in missing),
                world,
            )
        share = image_stats(missing, real_batches(images_uint8[rank::world], cfg.eval.batch_size, device))
        total = all_reduce_sum(stats_to_tensor(share, [e.name for e in missing]).to(device))
        computed = stats_from_tensor(total, missing)
        if rank == 0:
            for e in missing:
                store.put_bytes(keys[e.name], computed[e.name].to_bytes())
                log.info("reference statistics stored at %s", store.uri(keys[e.name]))
        out.update(computed)
    return out


def quality_metrics(generated: dict[str, SampleStats], reference: dict[str, SampleStats]) -> dict[str, float]:
    """digit_fd / fid (lower is better), and from the classifier: digit_is and class_hist_tv."""
    metrics: dict[str, float] = {}
    for name, gen in generated.items():
        try:
            metrics[METRIC_NAMES[name]] = frechet_from_stats(gen.features, reference[name].features)
        except ValueError as e:  # a diverged G makes non-finite images: no distance, not a crash
            log.warning("%s distance undefined: %s", METRIC_NAMES[name], e)
            metrics[METRIC_NAMES[name]] = float("nan")
        if name == "digit":
            metrics["digit_is"] = gen.inception_score()
            metrics["class_hist_tv"] = histogram_distance(gen.class_histogram(), reference[name].class_histogram())
    return metrics


def stats_to_tensor(stats: dict[str, SampleStats], names: list[str]) -> torch.Tensor:
    return torch.cat([stats[n].to_tensor() for n in names])


def stats_from_tensor(t: torch.Tensor, extractors: list[Extractor]) -> dict[str, SampleStats]:
    out, offset = {}, 0
    for e in extractors:
        size = 1 + e.feature_dim + e.feature_dim**2 + NUM_CLASSES + 1
        out[e.name] = SampleStats.from_tensor(t[offset : offset + size])
        offset += size
    return out


def describe_metrics(metrics: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))


class Evaluator:
    """G -> quality metrics: the one evaluation pipeline, for training and `dcgan-ray eval` alike.

    With world > 1 every rank must call it together: each generates its share of `eval.num_samples`
    from its own fixed noise (so successive evaluations compare the same latent points), the ranks
    all-reduce sufficient statistics, and rank 0 gets the metrics ({} on the others).
    """

    def __init__(
        self,
        store: Store,
        cfg: JobConfig,
        real_images: np.ndarray | torch.Tensor,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
    ):
        self.cfg, self.device, self.rank = cfg, device, rank
        self.extractors = load_extractors(store, cfg, device)
        self.reference = reference_stats(store, cfg, self.extractors, real_images, device, rank, world)
        self.share = cfg.eval.num_samples // world + (rank < cfg.eval.num_samples % world)

    def __call__(self, netG: torch.nn.Module, seed: int) -> dict[str, float]:
        start = time.perf_counter()
        batches = generated_batches(
            unwrap(netG),
            self.share,
            self.cfg.model.z_dim,
            self.cfg.eval.batch_size,
            seed=seed * 7919 + 104729 + self.rank,
            device=self.device,
        )
        names = [e.name for e in self.extractors]
        # A collective and a CPU-GPU sync point: every rank's statistics, summed.
        total = all_reduce_sum(stats_to_tensor(image_stats(self.extractors, batches), names).to(self.device))
        if self.rank != 0:
            return {}
        metrics = quality_metrics(stats_from_tensor(total, self.extractors), self.reference)
        for e in self.extractors:
            if isinstance(e, DigitExtractor) and e.accuracy is not None:
                # What digit_fd is worth: every record of it (run.json, Tune, the study report) carries it.
                metrics["classifier_accuracy"] = e.accuracy
        metrics["eval_seconds"] = time.perf_counter() - start
        log.info(
            "quality of %d samples: %s (%.1f s)",
            self.cfg.eval.num_samples,
            describe_metrics(metrics),
            metrics["eval_seconds"],
        )
        return metrics
