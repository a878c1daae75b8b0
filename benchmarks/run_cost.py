"""What one small training run costs beyond its training steps: wall seconds and CPU core-seconds of a Ray
Train run, by process, against the same steps without Ray, in one run.

Starts a private SeaweedFS and Ray head on loopback (test credentials), puts --images synthetic digits in
the bucket, then times --runs runs of --epochs epochs on --workers CPU workers (batch 16, no evaluation,
checkpoints uploaded) with `dcgan_ray.train.driver.train`, as a job's driver does. Beside each run it
samples /proc every 0.2 s and charges each process's CPU time to its name (Ray's `ray::` actor titles),
so the table says which processes the core-seconds went to. The baseline: the same number of training
steps of the same network in this process, without Ray, storage or checkpoints. The ratio says how much
of a small run is the run's machinery rather than training: the floor of every test that trains through
Ray, and of a real job's start-up.

  python benchmarks/run_cost.py                          # the tests' small network, 2 runs
  python benchmarks/run_cost.py --g-features 128 --d-features 64      # the reference network
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ["RAY_AUTH_MODE"] = "token"  # as the tests' heads: read once per process, before ray is imported

from dcgan_ray.config import config_from_dict  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
BUCKET = "run-cost"
REPO = Path(__file__).resolve().parents[1]


def machine_core_seconds() -> float:
    """CPU time of every process on the machine since boot (user + system + irq), in core-seconds."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / TICKS


def processes() -> dict[int, tuple[float, str]]:
    """pid -> (CPU core-seconds so far, a name: the actor title for Ray's workers, else the command)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_text().replace("\0", " ").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        name = command.split()[0].split(".")[0] if command.startswith("ray::") else command or stat.split("(")[1]
        name = re.sub(r"\d+", "N", Path(name.split(" --")[0].split()[0].rstrip(")")).name)
        out[int(entry)] = ((int(fields[11]) + int(fields[12])) / TICKS, name)
    return out


class ProcessSampler:
    """CPU time per process name while it runs (processes that start and end in between included, up to
    the last 0.2 s sample of each)."""

    def __init__(self):
        self.before = processes()
        self.last = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.2)

    def _sample(self) -> None:
        for pid, (seconds, name) in processes().items():
            seen = self.last.get(pid)
            # An exiting process has no command line, only its name cut to 15 characters: keep the full one.
            self.last[pid] = (seconds, seen[1] if seen and seen[1].startswith(name) else name)

    def stop(self) -> collections.Counter:
        self._stop.set()
        self._thread.join()
        self._sample()
        spent: collections.Counter = collections.Counter()
        for pid, (seconds, name) in self.last.items():
            earlier = self.before.get(pid)
            spent[name] += seconds - (earlier[0] if earlier and earlier[1] == name else 0.0)
        return spent


def steps_without_ray(cfg, steps: int) -> tuple[float, float]:
    """Wall and core-seconds of `steps` training steps of the run's network at its batch, in this process."""
    import torch

    from dcgan_ray.gan.models import build_models
    from dcgan_ray.gan.step import make_optimizers, train_step

    torch.set_num_threads(1)  # as one Ray worker of 1 CPU
    m = cfg.model
    netG, netD = build_models(m.z_dim, m.g_features, m.d_features, m.alpha)
    optG, optD = make_optimizers(netG, netD, cfg.train.lr, cfg.train.lr, cfg.train.beta1, cfg.train.beta2)
    real = torch.rand(cfg.train.batch_size, 3, 32, 32) * 2 - 1
    wall, cpu = time.monotonic(), machine_core_seconds()
    for _ in range(steps):
        train_step(netG, netD, optG, optD, real, torch.randn(cfg.train.batch_size, m.z_dim))
    return time.monotonic() - wall, machine_core_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=64, help="per epoch (batch 16 per worker)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--g-features", type=int, default=16)
    parser.add_argument("--d-features", type=int, default=16)
    args = parser.parse_args()

    from dcgan_ray.data.svhn import prepare_split
    from dcgan_ray.data.synth import synth_svhn_mat
    from dcgan_ray.dev.ray_nodes import RayHead
    from dcgan_ray.dev.seaweed import SeaweedPorts, SeaweedServer
    from dcgan_ray.storage.s3 import Store
    from dcgan_ray.train.driver import train

    work = Path(tempfile.mkdtemp(prefix="run-cost-"))
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "run-cost-key",
            "AWS_SECRET_ACCESS_KEY": "run-cost-secret-0123456789",
            "AWS_DEFAULT_REGION": "us-east-1",
            "DCGAN_RAY_CACHE": str(work / "cache"),
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(Path(__file__).resolve().parents[1]), os.getenv("PYTHONPATH")])
            ),
        }
    )
    s3 = SeaweedServer(work / "s3", SeaweedPorts.free(), work / "weed.log", buckets=(BUCKET,))
    head = RayHead(work / "head.log", num_cpus=max(4, args.workers))
    head.env["RAY_API_SERVER_ADDRESS"] = head.dashboard_url
    s3.start()
    try:
        wall, cpu = time.monotonic(), machine_core_seconds()
        head.start()
        import ray

        ray.init(address=head.address, logging_level="WARNING")
        print(f"Ray head up: {time.monotonic() - wall:.1f} s, {machine_core_seconds() - cpu:.1f} core-s")

        def config(name: str):
            return config_from_dict(
                {
                    "name": name,
                    "model": {"g_features": args.g_features, "d_features": args.d_features},
                    "train": {"epochs": args.epochs, "batch_size": 16, "log_every_steps": 1000},
                    "data": {"max_images": args.images},
                    "eval": {"every_epochs": 0},
                    "checkpoint": {"keep": 2},
                    "scaling": {"num_workers": args.workers, "use_gpu": False, "max_failures": 0},
                    "storage": {"endpoint": s3.endpoint, "bucket": BUCKET, "prefix": "cost"},
                },
                "run_cost",
            )

        synth_svhn_mat(work / "train_32x32.mat", max(args.images, 64), seed=1)
        cfg = config("run-0")
        prepare_split(Store(cfg.storage), cfg, "train", from_=str(work))
        steps = args.epochs * (args.images // (16 * args.workers))
        rows = []
        for i in range(args.runs):
            cfg = config(f"run-{i}")
            sampler = ProcessSampler()
            wall, cpu = time.monotonic(), machine_core_seconds()
            manifest = train(cfg)
            wall, cpu = time.monotonic() - wall, machine_core_seconds() - cpu
            spent = sampler.stop()
            assert manifest["status"] == "finished", manifest.get("status")
            rows.append((wall, cpu))
            print(
                f"\nrun {i}: {args.epochs} epoch(s) x {steps // args.epochs} step(s) on {args.workers} workers: "
                f"{wall:.1f} s, {cpu:.1f} core-s; by process (core-s):"
            )
            for name, seconds in spent.most_common(10):
                if seconds >= 0.2:
                    print(f"  {seconds:6.1f}  {name}")
        base_wall, base_cpu = steps_without_ray(config("baseline"), steps)
        print(
            f"\nbaseline: the same {steps} steps on one worker's thread without Ray: {base_wall:.2f} s, "
            f"{base_cpu:.2f} core-s (all workers: x{args.workers})"
        )
        wall = sum(w for w, _ in rows) / len(rows)
        cpu = sum(c for _, c in rows) / len(rows)
        print(
            f"a run, mean of {len(rows)}: {wall:.1f} s, {cpu:.1f} core-s = "
            f"{cpu / max(base_cpu * args.workers, 1e-9):.0f}x the core-s of its training steps"
        )
    finally:
        import ray

        ray.shutdown()
        head.stop()
        s3.stop()


if __name__ == "__main__":
    main()
