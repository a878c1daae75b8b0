"""A driver cut off from the bucket, as tests/test_partition.py runs it in a process of its own: it takes a
folder's lease through the given endpoint (the test's cuttable proxy), renews it, and writes the folder's
run.json every half second, under the lease's gate, until it has written `writes` times (then it releases
the lease) or the lease is lost. Each line it prints says what happened.

    python tests/lease_writer.py ENDPOINT BUCKET FOLDER TTL_S WRITES
"""

from __future__ import annotations

import json
import logging
import sys
import time

from dcgan_ray.config import StorageSection
from dcgan_ray.errors import LeaseLost
from dcgan_ray.storage.lease import Lease
from dcgan_ray.storage.s3 import Store


def main(endpoint: str, bucket: str, folder: str, ttl_s: str, writes: str) -> int:
    logging.basicConfig(level=logging.WARNING, format="log: %(message)s", stream=sys.stdout)
    store = Store(StorageSection(endpoint=endpoint, bucket=bucket))
    lease = Lease.acquire(store, folder, store.uri(folder), "run", {"cluster": "A"}, float(ttl_s))
    lease.keep_renewed(lambda e: print(f"lost: {e}", flush=True))
    print(f"held generation {lease.generation}", flush=True)
    try:
        with lease.fencing():
            for n in range(1, int(writes) + 1):
                print(f"writing {n}", flush=True)
                body = {"status": "running", "writes": n, "generation": lease.generation}
                store.put_bytes(f"{folder}/run.json", json.dumps(body).encode(), "application/json")
                print(f"wrote {n}", flush=True)
                time.sleep(0.5)
    except LeaseLost as e:
        print(f"error: {e}", flush=True)
        return 3
    lease.release()
    print("released", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
