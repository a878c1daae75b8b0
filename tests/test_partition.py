"""A driver cut off from the bucket by a partition (tests/cut_proxy.py), with writes in flight: the lease's gate
(dcgan_ray.storage.fence) keeps each of them from landing after a successor could have taken over, and lets
them land once the cut heals when nobody did. The driver is a process of its own (tests/lease_writer.py),
reaching the test's SeaweedFS through the proxy; the successor is this test, reaching it directly. No Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cut_proxy import CutProxy
from dcgan_ray.storage import fence
from dcgan_ray.storage.lease import Lease
from dcgan_ray.storage.lease_log import LeaseLog
from helpers import wait_until

TTL_S = 10


class Writer:
    """tests/lease_writer.py in a process of its own; its lines as they come."""

    def __init__(self, endpoint: str, bucket: str, folder: str, writes: int, fault: str = ""):
        script = Path(__file__).with_name("lease_writer.py")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), endpoint, bucket, folder, str(TTL_S), str(writes), fault],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def in_flight(self) -> str | None:
        """Its `writing N` line while that write has not returned (log lines may come after it)."""
        steps = [line for line in self.lines if line.startswith(("writing ", "wrote "))]
        return steps[-1] if steps and steps[-1].startswith("writing ") else None

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def end(self, timeout_s: float = 120) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._reader.join(10)  # (every line it printed is in)

    def error(self) -> str:
        """Its one `error:` line (it prints nothing after it, but Python may, at its exit)."""
        errors = [line for line in self.lines if line.startswith("error: ")]
        assert len(errors) == 1, self.lines[-10:]
        return errors[0]


@pytest.fixture
def proxy(s3_server):
    proxy = CutProxy(urlsplit(s3_server.endpoint).port)
    yield proxy
    proxy.close()


def objects(store, folder: str) -> dict[str, str]:
    """What readers see of the folder, outside the lease's own objects: key -> ETag."""
    keys = [k for k in store.list_keys(f"{folder}/") if "/lease/" not in k]
    return {k: store.head(k)["ETag"] for k in keys}


def test_a_write_in_flight_when_the_driver_is_cut_off_never_lands_after_its_successor(proxy, store, prefix):
    """A is cut off while its run.json write is in flight. B takes the run over once A's lease expires and
    finishes it while A is still cut off. After the heal, nothing of A's lands: run.json stays B's, A's log
    ends in the lease's one line, and A wrote nothing after its deadline."""
    folder = f"{prefix}/runs/r"
    a = Writer(proxy.endpoint, store.bucket, folder, writes=10_000)
    try:
        wait_until(lambda: a.said("wrote 2"), 60, "A's first writes")
        proxy.cut()
        held = wait_until(a.in_flight, 30, "A's next write, in flight through the cut")
        b = Lease.acquire(store, folder, store.uri(folder), "run", {"cluster": "B"}, 60, wait=True)
        store.put_bytes(f"{folder}/run.json", json.dumps({"status": "finished", "generation": b.generation}).encode())
        b.release("done")
        finished = objects(store, folder)
        proxy.heal()
        assert a.end() == 3, a.lines
    finally:
        proxy.heal()
        a.end(5)
    assert a.error().startswith("error: run s3://") and "no longer holds it: it was taken over by" in a.error()
    writes_done = [line for line in a.lines if line.startswith("wrote ")]
    assert json.loads(store.get_bytes(f"{folder}/run.json")) == {"status": "finished", "generation": b.generation}
    assert objects(store, folder) == finished  # nothing of A's landed after B finished
    assert not a.said(held.replace("writing", "wrote") + " ")  # the write in flight at the cut never returned
    assert len(writes_done) == sum(1 for line in a.lines if line.startswith("writing ")) - 1  # nor any other
    kinds = [(e["kind"], e["generation"]) for e in LeaseLog(store, folder).entries()]
    assert kinds[-2:] == [("acquire", b.generation), ("release", b.generation)], kinds


def test_a_cut_shorter_than_the_retry_budget_is_ridden_out_when_nobody_took_over(proxy, store, prefix):
    """The same cut, past A's deadline, with no successor: A's held write waits (its deadline passed, so it may
    not land on its own), A renews through the log when the cut heals, and the write lands; nothing is lost."""
    folder = f"{prefix}/runs/r"
    a = Writer(proxy.endpoint, store.bucket, folder, writes=6)
    try:
        wait_until(lambda: a.said("wrote 2"), 60, "A's first writes")
        proxy.cut()
        held = wait_until(a.in_flight, 30, "A's next write, in flight through the cut")
        wait_until(lambda: a.said("is past its deadline"), 60, "A's deadline to pass")
        assert not a.said(held.replace("writing", "wrote") + " ")
        proxy.heal()
        assert a.end() == 0, a.lines
    finally:
        proxy.heal()
        a.end(5)
    assert a.said("renewed again, in the log") and a.said("released")
    assert json.loads(store.get_bytes(f"{folder}/run.json"))["writes"] == 6
    entries = LeaseLog(store, folder).entries()
    assert [e["kind"] for e in entries][0] == "acquire" and "renew" in [e["kind"] for e in entries]
    assert {e["generation"] for e in entries} == {1}


def test_a_driver_whose_renewals_are_cut_stops_writing_at_its_deadline_before_a_successor_could_take_over(
    store, prefix
):
    """A's renewals alone fail (its other writes reach the bucket): A writes until its own deadline and not after,
    and B, which takes the run over once A's lease expires by the server's clock, comes after A's last write.
    A's writes and B's takeover are timed on the machine's monotonic clock, which both processes share."""
    folder = f"{prefix}/runs/r"
    a = Writer(store.cfg.endpoint, store.bucket, folder, writes=10_000, fault="norenew")
    try:
        wait_until(lambda: a.said("held generation"), 60, "A's lease")
        Lease.acquire(store, folder, store.uri(folder), "run", {"cluster": "B"}, 60, wait=True)
        taken_at = time.monotonic()
        assert a.end() == 4, a.lines
    finally:
        a.end(5)
    assert a.error().startswith("error: renewals are cut")
    landed = [float(line.rsplit(" at ", 1)[1]) for line in a.lines if line.startswith("wrote ")]
    # A's last write ended before its deadline, which is the margin before B could take over.
    assert len(landed) >= 5 and taken_at - max(landed) > fence.margin_s(TTL_S), (landed[-3:], taken_at)
    written = json.loads(store.get_bytes(f"{folder}/run.json"))
    assert written["writes"] == len(landed)  # the last write that landed is the last one A saw land
