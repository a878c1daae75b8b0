"""Seconds `dcgan-ray runs` and `recover`'s search for orphans take over N runs: one run at a time (the old
way, `--threads 1`) against `SCAN_THREADS` at a time (the default), measured in the same run against a
private local SeaweedFS. No Ray. `--latency-ms` adds a wait to every request, as a cloud S3's round trip
(tens of ms) would: on loopback a request is 1-2 ms of this process's CPU (botocore) and the server's, so on a
machine of few cores the listing is CPU-bound and reading in parallel gains little; on a real endpoint the
wait dominates, and it is what the threads overlap.

Each run is what a driver leaves in the bucket: a run.json as `new_run_manifest` makes it and a lease log
of one to three entries (acquire; commit of the end state; release), planted with `LeaseLog.append`. Of
every ten runs: five finished, one failed, one stopped, one running whose holder renews (held), one running
whose driver let its lease go (orphaned), one queued (no log, no cluster to ask). The runs are planted
up to each N in turn; each listing is timed `--repeats` times, the two ways interleaved, best kept.

  python benchmarks/runs_listing.py                  # N = 101, 401, 1001
  python benchmarks/runs_listing.py --runs 50 200 --repeats 5
  python benchmarks/runs_listing.py --latency-ms 20 --runs 101 401 --repeats 1
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcgan_ray.config import config_from_dict  # noqa: E402
from dcgan_ray.dev.seaweed import scratch_server  # noqa: E402
from dcgan_ray.recovery import find_orphans, orphaned  # noqa: E402
from dcgan_ray.report.runs_table import SCAN_THREADS, list_runs, scan  # noqa: E402
from dcgan_ray.storage.layout import RunLayout  # noqa: E402
from dcgan_ray.storage.lease_log import LeaseLog, utc_now  # noqa: E402
from dcgan_ray.storage.runs import new_run_manifest, write_run_manifest  # noqa: E402
from dcgan_ray.storage.s3 import Store  # noqa: E402

# (run.json's status, its lease log) of every ten runs
MIX = [("finished", "finished")] * 5 + [
    ("failed", "failed"),
    ("stopped", "released"),
    ("running", "held"),
    ("running", "released"),
    ("queued", "none"),
]


def lease_entries(lease: str, i: int) -> list[dict[str, Any]]:
    holder = {"host": "node", "pid": 1, "cluster": "bench", "submission_id": f"raysubmit_{i}"}
    common = {"generation": 1, "writer": f"node:1:{i}", "at": utc_now()}
    acquire = {"seq": 1, "kind": "acquire", **common, "holder": {**holder, "since": utc_now(), "ttl_s": 3600.0}}
    if lease == "none":
        return []
    if lease == "held":
        return [acquire]
    commit = [{"seq": 2, "kind": "commit", **common, "state": lease}] if lease in ("finished", "failed") else []
    return [acquire, *commit, {"seq": 2 + len(commit), "kind": "release", **common, "reason": "done"}]


def plant(store: Store, runs: str, first: int, last: int) -> None:
    """Runs number `first` to `last` - 1 (in parallel: the planting is not what is measured)."""
    cfg = config_from_dict({"storage": {"bucket": store.bucket}}, "bench")

    def one(name: str) -> None:
        i = int(name.rsplit("-", 1)[1])
        status, lease = MIX[i % len(MIX)]
        layout = RunLayout(store.bucket, f"{runs}/{name}")
        manifest = new_run_manifest(cfg, layout)
        write_run_manifest(store, layout, {**manifest, "name": name, "status": status, "submission_id": f"s{i}"})
        for entry in lease_entries(lease, i):
            LeaseLog(store, layout.prefix).append(entry)

    scan(one, [f"run-{i:05d}" for i in range(first, last)])


def add_latency(store: Store, latency_s: list[float]) -> None:
    """Every request of the store's client waits `latency_s[0]` before it is sent (the GIL is free meanwhile,
    as it is while a real request is on the network)."""
    store.client.meta.events.register("before-send.s3", lambda **_: time.sleep(latency_s[0]) if latency_s[0] else None)


def best_of(repeats: int, fns: dict[str, Callable[[], Any]]) -> dict[str, tuple[float, Any]]:
    """(best seconds, last result) of each, the calls interleaved."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - started)
    return {name: (min(times[name]), results[name]) for name in fns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, nargs="+", default=[101, 401, 1001], help="the numbers of runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every request while timing")
    parser.add_argument(
        "--threads", type=int, default=SCAN_THREADS, help=f"the parallel way's (default {SCAN_THREADS})"
    )
    args = parser.parse_args()
    with scratch_server("bench") as (server, _):
        store = Store(config_from_dict({"storage": {"endpoint": server.endpoint, "bucket": "bench"}}, "bench").storage)
        store.check()
        latency_s = [0.0]
        add_latency(store, latency_s)
        runs, planted = "bench/runs", 0
        print(f"{args.latency_ms:g} ms added to each request; best of {args.repeats}")
        print(f"{'runs':>5}  {'what':<16}{'1 at a time':>12}{f'{args.threads} at a time':>14}{'ratio':>8}")
        for n in sorted(args.runs):
            latency_s[0] = 0.0
            plant(store, runs, planted, n)
            planted, latency_s[0] = n, args.latency_ms / 1000
            timed = best_of(
                args.repeats,
                {
                    "runs 1": lambda: list_runs(store, runs, orphaned, threads=1),
                    "runs N": lambda: list_runs(store, runs, orphaned, threads=args.threads),
                    "recover 1": lambda: find_orphans(store, runs, None, threads=1),
                    "recover N": lambda: find_orphans(store, runs, None, threads=args.threads),
                },
            )
            found = {"runs": n, "recover": n // 10 + (n % 10 > 8)}  # every run; the orphaned, the 9th of each 10
            for what in ("runs", "recover"):
                (one_s, one), (many_s, many) = timed[f"{what} 1"], timed[f"{what} N"]
                if [x.name for x in one] != [x.name for x in many] or len(one) != found[what]:
                    raise SystemExit(f"{what} over {n} runs: the two ways disagree or miss runs")
                label = "dcgan-ray runs" if what == "runs" else "recover's search"
                print(f"{n:>5}  {label:<16}{one_s:>11.2f}s{many_s:>13.2f}s{one_s / many_s:>7.1f}x")


if __name__ == "__main__":
    main()
