"""What the lease costs rank 0 per epoch: extra requests to the bucket and seconds, with the lease against
without it, measured in the same run against a private local SeaweedFS. No Ray: this is rank 0's end of an
epoch, the same code in a Ray worker.

Each epoch writes what rank 0 writes at the end of an epoch that checkpoints: the sample grid, latest.png,
run.json (through `write_run_manifest`) and a small checkpoint folder (the file, its manifest last). With the
lease (`--ttl`, the default 60 s) the driver holds it and renews it from its thread, rank 0 joins it and
registers its gate (`dcgan_ray.storage.fence`), looks at the log before each write as the recorder does
(`Lease.check`), and commits the checkpoint. Without it, the same writes alone. Requests are counted by
operation at botocore's `before-send`, so retries would count too.

  python benchmarks/lease_cost.py                 # 40 epochs each way
  python benchmarks/lease_cost.py --epochs 200
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcgan_ray.config import StorageSection  # noqa: E402
from dcgan_ray.dev.seaweed import scratch_server  # noqa: E402
from dcgan_ray.storage.checkpoint import CHECKPOINT_FILE, MANIFEST_FILE, manifest_bytes, upload_checkpoint  # noqa: E402
from dcgan_ray.storage.layout import RunLayout  # noqa: E402
from dcgan_ray.storage.lease import Lease  # noqa: E402
from dcgan_ray.storage.runs import write_run_manifest  # noqa: E402
from dcgan_ray.storage.s3 import Store  # noqa: E402

PNG = os.urandom(60_000)  # about a 8x8 grid of 32x32 digits
CHECKPOINT = os.urandom(2_800_000)  # the tests' small network's checkpoint; the reference's is ~72 MB


class Counter:
    """Requests by operation, from every client of the stores it is attached to."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def attach(self, store: Store) -> None:
        for client in (store.client, *store._bounded.values()):
            client.meta.events.register("before-send.s3", self._count, unique_id=f"count-{id(client)}")

    def _count(self, request: Any, **_: Any) -> None:
        lease = "%2Flease%2F" in request.url or "/lease/" in request.url
        self.counts[f"{request.method} {'lease' if lease else 'run'}"] += 1


def epochs(store: Store, layout: RunLayout, n: int, lease: Lease | None, folder: Path) -> float:
    """Rank 0's writes for `n` epochs; seconds per epoch."""
    manifest: dict[str, Any] = {"name": "bench", "status": "running", "history": []}
    (folder / CHECKPOINT_FILE).write_bytes(CHECKPOINT)
    (folder / MANIFEST_FILE).write_bytes(manifest_bytes({CHECKPOINT_FILE: CHECKPOINT}, 1))
    started = time.perf_counter()
    for epoch in range(1, n + 1):
        if lease is not None:
            lease.check()  # the recorder's look before its writes
        store.put_bytes(layout.sample_key(epoch), PNG, "image/png")
        store.put_bytes(layout.latest_sample_key, PNG, "image/png")
        manifest["history"].append({"epoch": epoch})
        if lease is not None:
            lease.check()
        write_run_manifest(store, layout, manifest)
        key = layout.checkpoint_dir_key(f"checkpoint_epoch_{epoch:04d}")
        if lease is not None:
            lease.check()
        upload_checkpoint(store, folder, key, "")
        if lease is not None:
            lease.commit({"epoch": epoch, "checkpoint": key, "manifest_sha256": "0" * 64})
    return (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--ttl", type=float, default=60.0, help="storage.lease_ttl_s (default 60)")
    args = parser.parse_args()
    with scratch_server("bench") as (server, _), tempfile.TemporaryDirectory() as local:
        storage = StorageSection(endpoint=server.endpoint, bucket="bench", prefix="bench")
        results = {}
        for leased in (False, True, False, True):  # twice each, interleaved: the server warms up on the first
            store = Store(storage)
            store.check()
            layout = RunLayout("bench", f"bench/runs/{'leased' if leased else 'plain'}-{len(results)}")
            counter = Counter()
            with contextlib.ExitStack() as stack:
                view = None
                if leased:
                    driver = Lease.acquire(store, layout.prefix, layout.uri, "run", {"cluster": "bench"}, args.ttl)
                    driver.keep_renewed(lambda e: None)
                    stack.callback(driver.release)
                    view = Lease.join(store, layout.prefix, layout.uri, "run", driver.generation)
                    stack.enter_context(view.fencing())
                    store.put_bytes(f"{layout.prefix}/warm", b"")  # (makes the gate's bounded client)
                    counter.attach(view.log.store)
                counter.attach(store)
                seconds = epochs(store, layout, args.epochs, view, Path(local))
                counted = collections.Counter(counter.counts)  # (not the release's catching up on rank 0's commits)
            results[(leased, len(results))] = (seconds, counted)
        for leased in (False, True):
            runs = [v for (lz, _), v in results.items() if lz == leased]
            best = min(s for s, _ in runs)
            counts = runs[-1][1]
            per_epoch = ", ".join(f"{k} {v / args.epochs:.2f}" for k, v in sorted(counts.items()))
            name = "with the lease" if leased else "without"
            print(f"{name:>14}: {best * 1000:7.1f} ms/epoch; requests/epoch: {per_epoch}")
        plain = min(s for (lz, _), (s, _) in results.items() if not lz)
        leased_s = min(s for (lz, _), (s, _) in results.items() if lz)
        extra = sum(results[(True, 3)][1].values()) - sum(results[(False, 2)][1].values())
        print(
            f"the lease adds {extra / args.epochs:.2f} requests and {(leased_s - plain) * 1000:.1f} ms per epoch "
            f"({leased_s / plain:.2f}x rank 0's end-of-epoch writes; best of two runs each, {args.epochs} epochs)"
        )


if __name__ == "__main__":
    main()
