"""Training throughput: does the framework add anything to the seed network's step?

Measures images/s, in one run, of
  (a) a plain single-process PyTorch loop of the seed's step, written here (pytorch/examples style),
  (b) the project's step (`dcgan_ray.gan.step.run_epoch` / `train_step`), same process, same data,
  (c) a 1-worker Ray Train run of the project (`--ray`; starts a private SeaweedFS and a local Ray),
and prints b/a and c/a. (a) and (b) need no Ray, so they also run on a GPU machine without it:

  python benchmarks/train_step.py --steps 40                 # a and b on CPU
  python benchmarks/train_step.py --steps 40 --ray           # a, b and c
  python benchmarks/train_step.py --device cuda --steps 300  # a and b on a GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcgan_ray.gan.models import build_models  # noqa: E402
from dcgan_ray.gan.step import make_optimizers, noise_generator, run_epoch  # noqa: E402

BATCH, Z = 128, 100


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(images: torch.Tensor, steps: int, device: torch.device) -> float:
    """(a) The textbook loop: D on real + detached fake, then G through D (D's grads computed too)."""
    torch.manual_seed(0)
    netG, netD = build_models(Z, 128, 64, 0.2)
    netG, netD = netG.to(device), netD.to(device)
    optG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    n = len(images)

    def step(i: int) -> None:
        idx = torch.randint(0, n, (BATCH,), device=device)
        real = images[idx].float() / 127.5 - 1
        fake = netG(torch.randn(BATCH, Z, device=device))
        netD.zero_grad()
        out_real, out_fake = netD(real), netD(fake.detach())
        loss_d = (F.binary_cross_entropy_with_logits(out_real, torch.ones_like(out_real))
                  + F.binary_cross_entropy_with_logits(out_fake, torch.zeros_like(out_fake)))
        loss_d.backward()
        optD.step()
        netG.zero_grad()
        out = netD(fake)
        F.binary_cross_entropy_with_logits(out, torch.ones_like(out)).backward()
        optG.step()

    for i in range(3):  # warm-up
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    return steps * BATCH / (time.perf_counter() - start)


def project_step(images: torch.Tensor, steps: int, device: torch.device) -> float:
    """(b) The project's epoch loop and step on the same network and data."""
    torch.manual_seed(0)
    netG, netD = build_models(Z, 128, 64, 0.2)
    netG, netD = netG.to(device), netD.to(device)
    optG, optD = make_optimizers(netG, netD, 2e-4, 2e-4, 0.5, 0.999)
    gen = torch.Generator().manual_seed(0)
    warm = torch.randint(0, len(images), (3, BATCH), generator=gen)
    batches = torch.randint(0, len(images), (steps, BATCH), generator=gen)
    noise = noise_generator(0, 0, 0, device)
    run_epoch(netG, netD, optG, optD, images, warm, Z, noise)
    sync(device)
    stats = run_epoch(netG, netD, optG, optD, images, batches, Z, noise)  # reads losses back at the end: synced
    return stats.images / stats.seconds


def ray_train(steps: int, threads: int) -> float:
    """(c) A 1-worker Ray Train run of the project, S3 and all; the images/s of its last epoch."""
    import ray

    from dcgan_ray.config import config_from_dict
    from dcgan_ray.data.svhn import prepare_split
    from dcgan_ray.dev.seaweed import SeaweedPorts, SeaweedServer
    from dcgan_ray.storage.s3 import Store
    from dcgan_ray.data.synth import synth_svhn_mat
    from dcgan_ray.train.driver import train

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["DCGAN_RAY_CACHE"] = str(tmp / "cache")
        server = SeaweedServer(tmp / "s3", SeaweedPorts.free(), tmp / "weed.log", buckets=("bench",))
        server.start()
        try:
            images = steps * BATCH
            synth_svhn_mat(tmp / "train_32x32.mat", images, seed=0)
            cfg = config_from_dict({
                "name": "bench", "train": {"epochs": 2, "batch_size": BATCH, "log_every_steps": 10**6},
                "storage": {"endpoint": server.endpoint, "bucket": "bench", "prefix": "bench"},
                "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": threads},
                "checkpoint": {"every_epochs": 100}, "eval": {"every_epochs": 0},
            })
            prepare_split(Store(cfg.storage), cfg, "train", from_=str(tmp / "train_32x32.mat"))
            ray.init(address="local", num_cpus=threads, logging_level="ERROR", include_dashboard=False)
            manifest = train(cfg)
            return manifest["history"][-1]["images_per_s"]  # epoch 2: start-up and first touches excluded
        finally:
            ray.shutdown()
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ray", action="store_true", help="also measure (c), a 1-worker Ray Train run")
    args = parser.parse_args()
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    print(f"device {device}, torch {torch.__version__}, {threads} threads, batch {BATCH}, {args.steps} steps")
    images = torch.randint(0, 256, (8192, 3, 32, 32), dtype=torch.uint8, device=device)
    a = plain_loop(images, args.steps, device)
    print(f"(a) plain PyTorch loop      {a:8.1f} img/s")
    b = project_step(images, args.steps, device)
    print(f"(b) project step            {b:8.1f} img/s   b/a = {b / a:.3f}")
    if args.ray:
        c = ray_train(args.steps, threads)
        print(f"(c) 1-worker Ray Train run  {c:8.1f} img/s   c/a = {c / a:.3f}")
    a2 = plain_loop(images, args.steps, device)
    print(f"(a) again, for drift        {a2:8.1f} img/s   (a2/a = {a2 / a:.3f})")


if __name__ == "__main__":
    main()
