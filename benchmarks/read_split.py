"""Dataset read speed: `dcgan_ray.data.svhn.load_split` against plain boto3 `get_object` of the same bytes.

Starts a private SeaweedFS on loopback, puts an SVHN-sized train split (73,257 offline digits by
default) into it, then times, in the same run:
  (base) boto3 get_object(...).read() of every shard and the labels, concatenated with numpy,
  (cold) load_split with an empty cache: parallel ranged downloads, sha256 check, read into one array,
  (warm) load_split again: the node's cache hit (what a second worker on the same node sees),
and prints MB/s and the ratios cold/base and warm/base.

  python benchmarks/read_split.py [--images 73257]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcgan_ray.config import config_from_dict  # noqa: E402
from dcgan_ray.data.svhn import load_split, prepare_split  # noqa: E402
from dcgan_ray.data.synth import render_digits, write_svhn_mat  # noqa: E402
from dcgan_ray.dev.seaweed import scratch_server  # noqa: E402
from dcgan_ray.storage.s3 import Store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=73_257, help="split size (SVHN train: 73,257)")
    args = parser.parse_args()
    with scratch_server("bench") as (server, tmp):
        cfg = config_from_dict({"storage": {"endpoint": server.endpoint, "bucket": "bench", "prefix": "bench"}})
        store = Store(cfg.storage)
        # Pixels of a few thousand rendered digits, tiled: the read path does not care what they show.
        X, y = render_digits(min(args.images, 5000), seed=0)
        reps = -(-args.images // X.shape[3])
        X = np.concatenate([X] * reps, axis=3)[..., : args.images]
        y = np.concatenate([y] * reps)[: args.images]
        write_svhn_mat(tmp / "train_32x32.mat", X, y)
        manifest = prepare_split(store, cfg, "train", from_=str(tmp / "train_32x32.mat"))
        total = sum(o["bytes"] for o in manifest["objects"]) + manifest["labels"]["bytes"]
        mb = total / 1e6

        start = time.perf_counter()
        parts = [
            np.frombuffer(store.client.get_object(Bucket="bench", Key=o["key"])["Body"].read(), np.uint8)
            for o in manifest["objects"]
        ]
        labels = np.frombuffer(
            store.client.get_object(Bucket="bench", Key=manifest["labels"]["key"])["Body"].read(), np.uint8
        )
        base_images = np.concatenate(parts).reshape(-1, 3, 32, 32)
        base = time.perf_counter() - start

        cache = tmp / "cache"
        os.environ["DCGAN_RAY_CACHE"] = str(cache)  # an empty node cache of its own
        start = time.perf_counter()
        cold_data = load_split(store, cfg, "train")
        cold = time.perf_counter() - start
        start = time.perf_counter()
        warm_data = load_split(store, cfg, "train")
        warm = time.perf_counter() - start
        assert np.array_equal(cold_data.images, base_images) and np.array_equal(warm_data.labels, labels)
        shutil.rmtree(cache)

        print(f"{args.images} images, {mb:.0f} MB in {len(manifest['objects'])} shards, S3 on loopback")
        print(f"(base) boto3 get_object         {mb / base:8.0f} MB/s  {base:6.2f} s")
        print(f"(cold) load_split, empty cache  {mb / cold:8.0f} MB/s  {cold:6.2f} s   cold/base = {base / cold:.2f}")
        print(f"(warm) load_split, node cache   {mb / warm:8.0f} MB/s  {warm:6.2f} s   warm/base = {base / warm:.2f}")


if __name__ == "__main__":
    main()
