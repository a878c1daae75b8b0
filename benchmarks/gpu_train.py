"""A short training of the reference network on one device, scored on that device: no Ray, S3 or boto3.

Renders synthetic SVHN-format digits (`dcgan_ray.data.synth`), trains the digit classifier on them
(`dcgan_ray.quality.classifier`), then trains the reference DCGAN twice from the same seed on the same
device-resident uint8 digits, eager fp32 and with every `speed` option on, and scores each G by the
digit Fréchet distance (`dcgan_ray.quality.fid`) of its samples to the real digits, before and after
training. Prints one table: images/s per epoch (the first one includes compiling), mean losses of the
last epoch, digit FD before -> after. It shows that the options train as fast as the step table says
and no worse than eager fp32; a few hundred steps are far from a converged GAN.

Only what the GPU machine has is imported (torch, numpy, scipy, pillow, pyyaml):
`dcgan_ray.quality.metrics` and `dcgan_ray.data.svhn` need boto3 and are left out.

  python benchmarks/gpu_train.py --device cuda           # 8192 digits, 3 epochs at batch 128
  python benchmarks/gpu_train.py --device cpu --quick    # tiny sizes: checks that the script runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcgan_ray.config import SpeedSection  # noqa: E402
from dcgan_ray.data.synth import render_digits  # noqa: E402
from dcgan_ray.gan.models import build_models  # noqa: E402
from dcgan_ray.gan.step import make_optimizers, noise_generator, prepare_models, rank_batches, run_epoch, to_model_input  # noqa: E402
from dcgan_ray.quality.classifier import DigitClassifier, classify, evaluate_accuracy, train_classifier  # noqa: E402
from dcgan_ray.quality.fid import FeatureStats, frechet_from_stats  # noqa: E402

Z = 100
EVAL_BATCH = 512


@dataclasses.dataclass
class Sizes:
    images: int  # training digits (GAN and classifier)
    test_images: int  # held-out digits for the classifier's accuracy
    epochs: int  # GAN epochs
    batch: int  # GAN batch per device
    classifier_epochs: int
    classifier_batch: int
    samples: int  # generated images per digit FD; a multiple of EVAL_BATCH keeps G's shapes static


FULL = Sizes(
    images=8192, test_images=2048, epochs=3, batch=128, classifier_epochs=3, classifier_batch=128, samples=4096
)
QUICK = Sizes(images=256, test_images=128, epochs=2, batch=32, classifier_epochs=1, classifier_batch=32, samples=512)


def digits(n: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """n synthetic digits as uint8 (n, 3, 32, 32) and labels 0..9, on the device."""
    X, y = render_digits(n, seed)
    images = np.ascontiguousarray(X.transpose(3, 2, 0, 1))  # SVHN's (32, 32, 3, N) -> (N, 3, 32, 32)
    labels = y.reshape(-1).astype(np.int64) % 10  # SVHN's label 10 is the digit 0
    return torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)


def feature_stats(classifier: DigitClassifier, batches: Iterator[torch.Tensor]) -> FeatureStats:
    stats = FeatureStats.empty(classifier.feature_dim)
    for x in batches:
        features, _ = classify(classifier, x, EVAL_BATCH)
        stats.update(features)
    return stats


def samples(netG: torch.nn.Module, count: int, device: torch.device) -> Iterator[torch.Tensor]:
    """`count` samples of G in eval mode, from the same noise each time it is asked."""
    gen = torch.Generator(device=device).manual_seed(1)
    netG.eval()
    try:
        with torch.no_grad():
            for start in range(0, count, EVAL_BATCH):
                # Each batch is used up before the next forward: a CUDA-graph replay may overwrite it.
                yield netG(torch.randn(min(EVAL_BATCH, count - start), Z, device=device, generator=gen))
    finally:
        netG.train()


def train_gan(
    name: str,
    speed: SpeedSection,
    images: torch.Tensor,
    sizes: Sizes,
    classifier: DigitClassifier,
    reference: FeatureStats,
) -> dict:
    device = images.device
    torch._dynamo.reset()  # a fresh compile per run, as a new job would get
    torch.manual_seed(0)
    netG, netD = (net.to(device) for net in build_models(Z, 128, 64, 0.2))
    prepare_models(netG, netD, speed)
    optG, optD = make_optimizers(netG, netD, 2e-4, 2e-4, 0.5, 0.999, fused=speed.fused_adam)
    fd_before = frechet_from_stats(feature_stats(classifier, samples(netG, sizes.samples, device)), reference)
    per_epoch, start = [], time.perf_counter()
    for epoch in range(sizes.epochs):
        stats = run_epoch(
            netG,
            netD,
            optG,
            optD,
            images,
            rank_batches(len(images), sizes.batch, 0, 1, 0, epoch),
            Z,
            noise_generator(0, epoch, 0, device),
            speed=speed,
        )
        per_epoch.append(stats.images / stats.seconds)
        logging.info(
            "%s: epoch %d/%d  %.0f img/s  loss_d %.3f  loss_g %.3f",
            name,
            epoch + 1,
            sizes.epochs,
            per_epoch[-1],
            stats.loss_d,
            stats.loss_g,
        )
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    fd_after = frechet_from_stats(feature_stats(classifier, samples(netG, sizes.samples, device)), reference)
    return {
        "name": name,
        **dataclasses.asdict(speed),
        "img_per_s_by_epoch": per_epoch,
        "train_s": train_s,
        "loss_d": stats.loss_d,
        "loss_g": stats.loss_g,
        "digit_fd_before": fd_before,
        "digit_fd_after": fd_after,
        "eval_s": time.perf_counter() - start,
    }


def table(runs: list[dict], header: str) -> str:
    lines = [
        header,
        f"{'options':46s}  {'img/s by epoch (1st: + compile)':34s}  loss_d  loss_g  "
        f"digit FD before -> after  train s  eval s",
    ]
    for r in runs:
        if "error" in r:
            lines.append(f"{r['name']:46s}  failed: {r['error']}")
            continue
        rates = " ".join(f"{v:7.0f}" for v in r["img_per_s_by_epoch"])
        lines.append(
            f"{r['name']:46s}  {rates:34s}  {r['loss_d']:6.3f}  {r['loss_g']:6.3f}  "
            f"{r['digit_fd_before']:10.2f} -> {r['digit_fd_after']:8.2f}  "
            f"{r['train_s']:7.1f}  {r['eval_s']:6.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--out-table", default=None, help="also write the final table to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    sizes = QUICK if args.quick else FULL
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    start = time.perf_counter()
    images, labels = digits(sizes.images, seed=0, device=device)
    test_images, test_labels = digits(sizes.test_images, seed=1, device=device)
    render_s = time.perf_counter() - start
    start = time.perf_counter()
    classifier = train_classifier(images, labels, sizes.classifier_epochs, sizes.classifier_batch, device=device)
    accuracy = evaluate_accuracy(classifier, test_images, test_labels)
    reference = feature_stats(
        classifier, (to_model_input(images[i : i + EVAL_BATCH]) for i in range(0, len(images), EVAL_BATCH))
    )
    classifier_s = time.perf_counter() - start

    # CUDA graphs are GPU-only (the job config refuses them on CPU); compile `default` stands in there.
    every_option = SpeedSection(
        autocast_bf16=True,
        channels_last=True,
        fused_adam=True,
        compile="reduce-overhead" if device.type == "cuda" else "default",
    )
    runs = []
    for name, speed in (
        ("eager fp32 (all options off)", SpeedSection()),
        (f"bf16+channels_last+fused_adam+{every_option.compile}", every_option),
    ):
        try:
            runs.append(train_gan(name, speed, images, sizes, classifier, reference))
        except Exception as e:  # one failed run must not hide the other's numbers: report it in the table
            logging.exception("%s failed", name)
            runs.append({"name": name, **dataclasses.asdict(speed), "error": f"{type(e).__name__}: {e}"[:200]})
    header = (
        f"device {device} ({device_name}), torch {torch.__version__}: {sizes.images} synthetic digits, "
        f"{sizes.epochs} epochs at batch {sizes.batch}; digit classifier {accuracy:.3f} accurate on "
        f"{sizes.test_images} held-out digits; digit FD of {sizes.samples} samples; "
        f"render {render_s:.0f} s, classifier {classifier_s:.0f} s"
    )
    text = table(runs, header)
    print(text)
    if args.out_table:
        Path(args.out_table).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": device_name,
                    "torch": torch.__version__,
                    "sizes": dataclasses.asdict(sizes),
                    "classifier_accuracy": accuracy,
                    "runs": runs,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
