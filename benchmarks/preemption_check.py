"""What asking Ray for a preemption notice costs, against a training step, measured in one run.

`ray.train.get_preemption_info()` is a collective (every rank asks, Ray's synchronization actor answers), so
the training loop asks only every so many steps (`checkpoint.preemption_check_s`, dcgan_ray.train.interruptions).
This starts a private Ray head on loopback, runs a TorchTrainer of --workers CPU workers that times --steps
training steps of the tests' small network and then --asks asks, and prints both, their ratio, the asks'
share of training at the default cadence, and what the cadence means at a GPU's step time (the reference
network's step on an A10G as docs/scaling.md estimates it, 8.2 ms at batch 128).

  python benchmarks/preemption_check.py
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ["RAY_AUTH_MODE"] = "token"  # as the tests' heads: read once per process, before ray is imported
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")

GPU_STEP_S = 0.0082
"""The reference network's step on an A10G at batch 128, as docs/scaling.md estimates it."""


def timed(config: dict) -> dict:
    """Every rank: time training steps, then asks for a preemption notice (rank 0's numbers are returned)."""
    import ray.train
    import torch

    from dcgan_ray.gan.models import build_models
    from dcgan_ray.gan.step import make_optimizers, to_model_input, train_step

    torch.manual_seed(0)
    netG, netD = (ray.train.torch.prepare_model(n) for n in build_models(100, 16, 16, 0.2))
    optG, optD = make_optimizers(netG, netD, 2e-4, 2e-4, 0.5, 0.999)
    real = to_model_input(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8))
    z = torch.randn(16, 100)
    for _ in range(2):  # warm up
        train_step(netG, netD, optG, optD, real, z)
    start = time.perf_counter()
    for _ in range(config["steps"]):
        train_step(netG, netD, optG, optD, real, z)
    step_s = (time.perf_counter() - start) / config["steps"]
    ray.train.get_preemption_info()  # warm up
    start = time.perf_counter()
    for _ in range(config["asks"]):
        ray.train.get_preemption_info()
    ask_s = (time.perf_counter() - start) / config["asks"]
    return {"step_s": step_s, "ask_s": ask_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--asks", type=int, default=200)
    args = parser.parse_args()

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from dcgan_ray.config import CheckpointSection
    from dcgan_ray.dev.ray_nodes import RayHead

    work = Path(tempfile.mkdtemp(prefix="preemption-check-"))
    head = RayHead(work / "head.log", num_cpus=args.workers)
    head.env["RAY_API_SERVER_ADDRESS"] = head.dashboard_url
    try:
        head.start()
        ray.init(address=head.address, logging_level="WARNING")
        result = TorchTrainer(
            timed,
            train_loop_config={"steps": args.steps, "asks": args.asks},
            scaling_config=ray.train.ScalingConfig(num_workers=args.workers, use_gpu=False),
            run_config=ray.train.RunConfig(name="preemption-check", storage_path=str(work / "storage")),
        ).fit()
    finally:
        ray.shutdown()
        head.stop()
    step_s, ask_s = result.return_value["step_s"], result.return_value["ask_s"]
    every_s = CheckpointSection().preemption_check_s
    print(f"{args.workers} CPU workers, the tests' small network at batch 16 (rank 0's times):")
    print(f"  a training step                       {step_s * 1000:8.2f} ms")
    print(f"  an ask for a preemption notice         {ask_s * 1000:8.2f} ms   ({ask_s / step_s:.3f} of a step)")
    print(f"  steps between asks for under 1%        {math.ceil(ask_s / (0.01 * step_s)):8d}")
    cadence = max(1, round(every_s / step_s))
    print(
        f"  at the default, every {every_s:g} s ({cadence} steps here): "
        f"{ask_s / (cadence * step_s):.4%} of the training time"
    )
    gpu_cadence = max(1, round(every_s / GPU_STEP_S))
    print(f"on a GPU at {GPU_STEP_S * 1000:.1f} ms a step (the reference network, A10G, estimated):")
    print(f"  steps between asks for under 1%        {math.ceil(ask_s / (0.01 * GPU_STEP_S)):8d}")
    print(
        f"  at the default, every {every_s:g} s ({gpu_cadence} steps): "
        f"{ask_s / (gpu_cadence * GPU_STEP_S):.4%} of the training time"
    )


if __name__ == "__main__":
    main()
