"""What a Kueue preemption costs a run, as far as one machine can show it: the run loses its Ray cluster and,
readmitted, resumes on a new one from its newest durable checkpoint.

Kueue preempts a RayJob by suspending it; KubeRay deletes its Ray cluster; readmitted, the RayJob gets a new
cluster and runs its entrypoint again (cluster/README.md "Priorities"). Here: a private SeaweedFS on loopback;
head A trains --epochs epochs of a run (the reference network unless told otherwise, so the checkpoint is its
68 MiB); head A and all its processes stop, as the deleted cluster's do; head B, a fresh cluster with a temp dir
of its own, starts, and the same run is trained again with one epoch more, as the readmitted entrypoint does.
Prints the new head's start-up, the resumed run from its driver's start to its end, the one epoch's own
training seconds (run.json's epoch_seconds), and the difference: what the readmission costs on top of the
epoch, besides what Kubernetes adds.

Not measured here (no Kubernetes): Kueue's wait for quota, pod scheduling, a node scaling up, the image pull.

  python benchmarks/readmission.py                                   # the reference network, 2 runs
  python benchmarks/readmission.py --g-features 16 --d-features 16   # the tests' small network
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ["RAY_AUTH_MODE"] = "token"  # as the tests' heads: read once per process, before ray is imported

from dcgan_ray.config import ModelSection, config_from_dict  # noqa: E402

BUCKET = "readmission"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1, help="trained before the preemption")
    parser.add_argument("--images", type=int, default=64, help="per epoch (batch 16 per worker)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--g-features", type=int, default=ModelSection().g_features)
    parser.add_argument("--d-features", type=int, default=ModelSection().d_features)
    args = parser.parse_args()

    import ray

    from dcgan_ray.data.svhn import prepare_split
    from dcgan_ray.data.synth import synth_svhn_mat
    from dcgan_ray.dev.ray_nodes import RayHead
    from dcgan_ray.dev.seaweed import SeaweedPorts, SeaweedServer
    from dcgan_ray.storage.s3 import Store
    from dcgan_ray.train.driver import train

    work = Path(tempfile.mkdtemp(prefix="readmission-"))
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "readmission-key",
            "AWS_SECRET_ACCESS_KEY": "readmission-secret-0123456789",
            "AWS_DEFAULT_REGION": "us-east-1",
            "DCGAN_RAY_CACHE": str(work / "cache"),
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(Path(__file__).resolve().parents[1]), os.getenv("PYTHONPATH")])
            ),
        }
    )
    s3 = SeaweedServer(work / "s3", SeaweedPorts.free(), work / "weed.log", buckets=(BUCKET,))
    s3.start()

    def config(name: str, epochs: int):
        return config_from_dict(
            {
                "name": name,
                "model": {"g_features": args.g_features, "d_features": args.d_features},
                "train": {"epochs": epochs, "batch_size": 16, "log_every_steps": 1000},
                "data": {"max_images": args.images},
                "eval": {"every_epochs": 0},
                "checkpoint": {"keep": 2},
                "scaling": {"num_workers": args.workers, "use_gpu": False, "max_failures": 0},
                "storage": {"endpoint": s3.endpoint, "bucket": BUCKET, "prefix": "readmission"},
            },
            "readmission",
        )

    def on_a_new_cluster(name: str, label: str, cfg) -> tuple[float, float, dict]:
        """(head start-up s, run s, run.json) of `cfg` on a head of its own, stopped after."""
        head = RayHead(
            work / f"{name}-{label}.log", num_cpus=max(4, args.workers), temp_dir=work / f"ray-{name}-{label}"
        )
        head.env["RAY_API_SERVER_ADDRESS"] = head.dashboard_url
        started = time.monotonic()
        head.start()
        ray.init(address=head.address, logging_level="WARNING")
        up = time.monotonic() - started
        try:
            started = time.monotonic()
            manifest = train(cfg)
            return up, time.monotonic() - started, manifest
        finally:
            ray.shutdown()
            head.stop()

    try:
        synth_svhn_mat(work / "train_32x32.mat", max(args.images, 64), seed=1)
        first = config("run-0", args.epochs)
        prepare_split(Store(first.storage), first, "train", from_=str(work))
        rows = []
        for i in range(args.runs):
            name = f"run-{i}"
            _, before, manifest = on_a_new_cluster(name, "a", config(name, args.epochs))
            assert manifest["status"] == "finished", manifest.get("status")
            up, after, manifest = on_a_new_cluster(name, "b", config(name, args.epochs + 1))
            assert manifest["resumed_from"]["epoch"] == args.epochs, manifest.get("resumed_from")
            epoch = manifest["history"][-1]["epoch_seconds"]
            rows.append((up, after, epoch))
            print(
                f"{name}: cluster A trained {args.epochs} epoch(s) in {before:.1f} s and went; cluster B: head up in "
                f"{up:.1f} s, resumed from epoch {manifest['resumed_from']['epoch']} and trained epoch "
                f"{args.epochs + 1} in {after:.1f} s, of which the epoch itself {epoch:.1f} s"
            )
        up = sum(r[0] for r in rows) / len(rows)
        after = sum(r[1] for r in rows) / len(rows)
        epoch = sum(r[2] for r in rows) / len(rows)
        print(
            f"mean of {len(rows)} ({args.g_features}/{args.d_features}-wide G/D, {args.workers} CPU workers): a new "
            f"head {up:.1f} s + the resumed run's start-up and finish {after - epoch:.1f} s = "
            f"{up + after - epoch:.1f} s on top of the epoch, besides pod scheduling and image pulls"
        )
    finally:
        s3.stop()


if __name__ == "__main__":
    main()
