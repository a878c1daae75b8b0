"""Training throughput: does the framework add anything to the reference network's step, and what do the
`speed.*` options give?

Measures images/s, in one run, of
  (a) a plain single-process PyTorch loop of the reference network's step, written here (pytorch/examples style),
  (b) the project's step (`dcgan_ray.gan.step.run_epoch` / `train_step`), same process, same data,
  (c) a 1-worker Ray Train run of the project (`--ray`; starts a private SeaweedFS and a local Ray),
and prints b/a and c/a. (a) and (b) need no Ray, so they also run on a GPU machine without it.

`--table` instead measures the project's step with each `speed` option alone and all of them together,
against eager fp32 in the same run, at each `--batch-sizes` batch (per device), on device-resident
uint8 data; compiled variants are compiled and warmed up before timing. Every row trains from the same
seed on the same batches and noise, so its mean losses stay near eager fp32's: within a percent or so,
as a GAN's steps amplify round-off; a broken option shows as NaN or far-off losses.

  python benchmarks/train_step.py --steps 40                          # a and b on CPU
  python benchmarks/train_step.py --steps 40 --ray                    # a, b and c
  python benchmarks/train_step.py --device cuda --steps 300           # a and b on a GPU
  python benchmarks/train_step.py --device cuda --table --steps 1000  # speed options, batch 128 and 1024
  python benchmarks/train_step.py --table --steps 20 --batch-sizes 128 --configs eager,bf16,channels_last
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcgan_ray.config import SpeedSection  # noqa: E402
from dcgan_ray.gan.models import build_models  # noqa: E402
from dcgan_ray.gan.step import make_optimizers, noise_generator, prepare_models, run_epoch  # noqa: E402

BATCH, Z = 128, 100
GFLOP_PER_IMAGE = 1.14  # one step of the reference network, forward + backward (NOTES.md)
ALL_GPU = SpeedSection(autocast_bf16=True, channels_last=True, fused_adam=True, compile="reduce-overhead")
CONFIGS = {
    "eager": SpeedSection(),
    "bf16": SpeedSection(autocast_bf16=True),
    "channels_last": SpeedSection(channels_last=True),
    "fused_adam": SpeedSection(fused_adam=True),
    "all": ALL_GPU,
    "all_no_cudagraphs": dataclasses.replace(ALL_GPU, compile="default"),
    "compile": SpeedSection(compile="default"),
    "cudagraphs": SpeedSection(compile="reduce-overhead"),
}
"""--table rows: name -> options, in the order they are measured: `eager` (all off) first, the baseline
every ratio divides by; the slow-to-compile single options last, where --budget-s may cut them."""
CUDA_ONLY = {"cudagraphs", "all"}
WARM_STEPS = 5  # CUDA graphs: one eager warm-up step, one recording, then replays


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
        loss_d = F.binary_cross_entropy_with_logits(
            out_real, torch.ones_like(out_real)
        ) + F.binary_cross_entropy_with_logits(out_fake, torch.zeros_like(out_fake))
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


def options_step(images: torch.Tensor, batch: int, steps: int, speed: SpeedSection) -> dict[str, float]:
    """The project's step with `speed`: img/s over `steps` timed steps after a warm-up (which compiles)."""
    device = images.device
    torch._dynamo.reset()  # each row compiles afresh, and no row runs into another's recompile limit
    torch.manual_seed(0)
    netG, netD = (net.to(device) for net in build_models(Z, 128, 64, 0.2))
    prepare_models(netG, netD, speed)
    optG, optD = make_optimizers(netG, netD, 2e-4, 2e-4, 0.5, 0.999, fused=speed.fused_adam)
    gen = torch.Generator(device=device).manual_seed(0)
    warm = torch.randint(0, len(images), (WARM_STEPS, batch), generator=gen, device=device)
    batches = torch.randint(0, len(images), (steps, batch), generator=gen, device=device)
    noise = noise_generator(0, 0, 0, device)
    start = time.perf_counter()
    run_epoch(netG, netD, optG, optD, images, warm, Z, noise, speed=speed)  # reads losses back: synced
    warm_s = time.perf_counter() - start
    stats = run_epoch(netG, netD, optG, optD, images, batches, Z, noise, speed=speed)  # synced at its end
    return {
        "img_per_s": stats.images / stats.seconds,
        "loss_d": stats.loss_d,
        "loss_g": stats.loss_g,
        "warmup_s": warm_s,
    }


def options_table(
    images: torch.Tensor, batch_sizes: list[int], steps_at_128: int, names: list[str], budget_s: float | None
) -> list[dict]:
    """One row per (option set, batch), sorted by batch; a row that fails records its error and the
    table goes on; rows that would start after `budget_s` seconds are recorded as skipped."""
    rows, start = [], time.perf_counter()
    for name in names:
        for batch in batch_sizes:
            steps = max(1, steps_at_128 * BATCH // batch)  # the same number of images at every batch size
            row = {"batch": batch, "config": name, "steps": steps, **dataclasses.asdict(CONFIGS[name])}
            if budget_s is not None and time.perf_counter() - start > budget_s:
                row["skipped"] = f"the table ran past --budget-s {budget_s:.0f}"
            else:
                try:
                    row.update(options_step(images, batch, steps, CONFIGS[name]))
                except Exception as e:  # a benchmark row, not the program: report it and measure the rest
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            rows.append(row)
            print(format_row(row, rows), flush=True)
    return sorted(rows, key=lambda r: r["batch"])  # stable: options stay in measuring order


def format_row(row: dict, rows: list[dict]) -> str:
    base = next((r for r in rows if r["batch"] == row["batch"] and r["config"] == "eager" and "img_per_s" in r), None)
    head = f"{row['batch']:6d}  {row['config']:18s}"
    if "error" in row:
        return f"{head}  failed: {row['error']}"
    if "skipped" in row:
        return f"{head}  skipped: {row['skipped']}"
    ratio = f"{row['img_per_s'] / base['img_per_s']:6.2f}x" if base else "      -"
    tflops = row["img_per_s"] * GFLOP_PER_IMAGE / 1e3
    return (
        f"{head}  {row['img_per_s']:10.0f}  {ratio}  {tflops:7.1f}  {row['loss_d']:7.4f}  {row['loss_g']:7.4f}"
        f"  {row['warmup_s']:7.1f}"
    )


TABLE_HEAD = (
    " batch  options              img/s/dev  x eager  TFLOP/s   loss_d   loss_g  warm-up s\n"
    "                                                     (1.14 GFLOP/img)  (timed steps' means)"
)


def ray_train(steps: int, threads: int) -> float:
    """(c) A 1-worker Ray Train run of the project, S3 and all; the images/s of its last epoch."""
    import ray

    from dcgan_ray.config import config_from_dict
    from dcgan_ray.data.svhn import prepare_split
    from dcgan_ray.data.synth import synth_svhn_mat
    from dcgan_ray.dev.seaweed import scratch_server
    from dcgan_ray.storage.s3 import Store
    from dcgan_ray.train.driver import train

    with scratch_server("bench") as (server, tmp):
        os.environ["DCGAN_RAY_CACHE"] = str(tmp / "cache")
        try:
            images = steps * BATCH
            synth_svhn_mat(tmp / "train_32x32.mat", images, seed=0)
            cfg = config_from_dict(
                {
                    "name": "bench",
                    "train": {"epochs": 2, "batch_size": BATCH, "log_every_steps": 10**6},
                    "storage": {"endpoint": server.endpoint, "bucket": "bench", "prefix": "bench"},
                    "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": threads},
                    "checkpoint": {"every_epochs": 100},
                    "eval": {"every_epochs": 0},
                }
            )
            prepare_split(Store(cfg.storage), cfg, "train", from_=str(tmp / "train_32x32.mat"))
            ray.init(address="local", num_cpus=threads, logging_level="ERROR", include_dashboard=False)
            manifest = train(cfg)
            return manifest["history"][-1]["images_per_s"]  # epoch 2: start-up and first touches excluded
        finally:
            ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ray", action="store_true", help="also measure (c), a 1-worker Ray Train run")
    parser.add_argument("--table", action="store_true", help="measure the speed options instead of a, b, c")
    parser.add_argument(
        "--batch-sizes",
        default=None,
        help="--table: comma-separated batches per device (default 128,1024 on cuda, 128 on cpu); "
        "each row trains on --steps x 128 images",
    )
    parser.add_argument(
        "--configs",
        default=None,
        help=f"--table: comma-separated rows from {', '.join(CONFIGS)} (default: all that the "
        f"device runs; {', '.join(sorted(CUDA_ONLY))} need cuda)",
    )
    parser.add_argument("--json", default=None, help="--table: also write the rows to this file")
    parser.add_argument("--out-table", default=None, help="--table: also write the printed table to this file")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="--table: start no row after this many seconds (later rows are listed as skipped)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {device} ({name}), torch {torch.__version__}, {threads} threads, {args.steps} steps at batch {BATCH}"
    )
    images = torch.randint(0, 256, (8192, 3, 32, 32), dtype=torch.uint8, device=device)
    if args.table:
        sizes = [int(b) for b in (args.batch_sizes or ("128,1024" if device.type == "cuda" else "128")).split(",")]
        names = (
            args.configs.split(",")
            if args.configs
            else [n for n in CONFIGS if device.type == "cuda" or n not in CUDA_ONLY]
        )
        unknown = sorted(set(names) - set(CONFIGS))
        if unknown:
            raise SystemExit(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
        if device.type != "cuda" and CUDA_ONLY & set(names):
            raise SystemExit(
                f"--configs: {', '.join(sorted(CUDA_ONLY & set(names)))} record CUDA graphs: use --device cuda"
            )
        if "eager" not in names:
            names.insert(0, "eager")  # the baseline of every ratio
        print(TABLE_HEAD)
        rows = options_table(images, sizes, args.steps, names, args.budget_s)
        best = max((r for r in rows if "img_per_s" in r), key=lambda r: r["img_per_s"], default=None)
        fastest = (
            f"fastest: {best['config']} at batch {best['batch']}: {best['img_per_s']:.0f} img/s per device ({name})"
            if best
            else "no row measured"
        )
        print(fastest)
        if args.out_table:
            lines = [f"step table, {name}, torch {torch.__version__}, {args.steps * BATCH} images per row", TABLE_HEAD]
            lines += [format_row(r, rows) for r in rows] + [fastest]
            Path(args.out_table).write_text("\n".join(lines) + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))
        return
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
