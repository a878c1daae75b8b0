"""A driver cut off from the bucket, as tests/test_partition.py runs it in a process of its own: it takes a
folder's lease through the given endpoint (the test's cuttable proxy), renews it, and writes the folder's
run.json every half second, under the lease's gate, until it has written `writes` times (then it releases
the lease) or the lease is lost. Each line it prints says what happened.

    python tests/lease_writer.py ENDPOINT BUCKET FOLDER TTL_S WRITES [norenew]

`norenew` cuts its renewals alone (a fault: every renewal fails as in an outage), not its other writes.
Each `wrote` line ends with the moment the write returned, on the machine's monotonic clock, which every
process of one machine shares.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from dcgan_ray.config import StorageSection
from dcgan_ray.errors import LeaseLost, StorageUnreachable
from dcgan_ray.storage.lease import Lease
from dcgan_ray.storage.s3 import Store


def say(line: str) -> None:
    """One line in one write: lines of two threads never run into each other."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(endpoint: str, bucket: str, folder: str, ttl_s: str, writes: str, fault: str = "") -> int:
    logging.basicConfig(level=logging.WARNING, format="log: %(message)s", stream=sys.stdout)
    store = Store(StorageSection(endpoint=endpoint, bucket=bucket))
    lease = Lease.acquire(store, folder, store.uri(folder), "run", {"cluster": "A"}, float(ttl_s))
    if fault == "norenew":

        def renew() -> None:
            raise StorageUnreachable("renewals are cut (the test's fault)")

        lease.renew = renew  # type: ignore[method-assign]
    else:
        lease.keep_renewed(lambda e: None)  # (the held write says it: one line from one thread)
    say(f"held generation {lease.generation}")
    try:
        with lease.fencing():
            for n in range(1, int(writes) + 1):
                say(f"writing {n}")
                body = {"status": "running", "writes": n, "generation": lease.generation}
                store.put_bytes(f"{folder}/run.json", json.dumps(body).encode(), "application/json")
                say(f"wrote {n} at {time.monotonic():.3f}")
                time.sleep(0.5)
    except LeaseLost as e:
        say(f"error: {e}")
        return 3
    except StorageUnreachable as e:
        say(f"error: {e}")
        return 4
    lease.release()
    say("released")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
