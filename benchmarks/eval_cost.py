"""What an in-training evaluation costs, as a fraction of an epoch of training, on this machine.

Measured in one run without Ray: (1) training throughput of the project's step, extrapolated to an
epoch of SVHN's train split (73,257 images, batch 128); (2) one evaluation of `--num-samples`
generated images with the digit classifier (G forward + classifier + sufficient statistics + the
Fréchet distance); (3) the Inception extractor on a few images, extrapolated to `--num-samples`.
The classifier and Inception weights are random: the cost does not depend on their values.

  python benchmarks/eval_cost.py [--num-samples 10000] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcgan_ray.gan.models import build_models  # noqa: E402
from dcgan_ray.gan.step import make_optimizers, noise_generator, rank_batches, run_epoch  # noqa: E402
from dcgan_ray.quality.classifier import DigitClassifier  # noqa: E402
from dcgan_ray.quality.fid import frechet_from_stats  # noqa: E402
from dcgan_ray.quality.inception import InceptionV3Pool3  # noqa: E402
from dcgan_ray.quality.metrics import DigitExtractor, InceptionExtractor, generated_batches, image_stats  # noqa: E402

SVHN_TRAIN = 73_257


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--inception-images", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    netG, netD = build_models(100, 128, 64, 0.2)
    netG, netD = netG.to(device), netD.to(device)
    optG, optD = make_optimizers(netG, netD, 2e-4, 2e-4, 0.5, 0.999)
    images = torch.randint(0, 256, (128 * (args.train_steps + 2), 3, 32, 32), dtype=torch.uint8, device=device)
    batches = rank_batches(len(images), 128, 0, 1, 0, 0)
    noise = noise_generator(0, 0, 0, device)
    run_epoch(netG, netD, optG, optD, images, batches[:2], 100, noise)  # warm-up
    stats = run_epoch(netG, netD, optG, optD, images, batches[2:], 100, noise)
    train_ips = stats.images / stats.seconds
    epoch_s = SVHN_TRAIN / train_ips

    digit = DigitExtractor(DigitClassifier().to(device).eval(), "bench")
    start = time.perf_counter()
    gen = image_stats([digit], generated_batches(netG, args.num_samples, 100, 500, seed=1, device=device))["digit"]
    ref = image_stats([digit], generated_batches(netG, 1000, 100, 500, seed=2, device=device))["digit"]
    frechet_from_stats(gen.features, ref.features)
    digit_s = time.perf_counter() - start

    inception = InceptionExtractor(InceptionV3Pool3().to(device).eval(), "bench")
    start = time.perf_counter()
    image_stats([inception], generated_batches(netG, args.inception_images, 100, 32, seed=3, device=device))
    inception_s = (time.perf_counter() - start) * args.num_samples / args.inception_images

    print(f"device {device}, {torch.get_num_threads()} threads")
    print(f"training: {train_ips:.0f} img/s -> one epoch of SVHN train ({SVHN_TRAIN} images) ~ {epoch_s:.0f} s")
    print(f"eval, digit classifier, {args.num_samples} samples: {digit_s:.1f} s = {digit_s / epoch_s:.3f} of an epoch")
    print(
        f"eval, Inception (FID), {args.num_samples} samples: ~{inception_s:.0f} s = "
        f"{inception_s / epoch_s:.2f} of an epoch "
        f"(extrapolated from {args.inception_images} images)"
    )


if __name__ == "__main__":
    main()
