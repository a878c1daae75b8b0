"""What rank 0 publishes for people watching a run: TensorBoard event files and the run page.

The training thread only logs into local event files (`dcgan_ray.train.events`; tensorboardX writes
them from a thread of its own) and, at each epoch's end, closes the epoch's file and hands it over with
a copy of run.json. A publisher thread uploads the closed files in order and rewrites the run page
(`dcgan_ray.report.run_page`), so neither ever holds up a step. When the bucket does not answer (an
outage outlasting storage.retry_budget_s, a refused write), it logs one warning and keeps the files: they
go up with the next epoch's. Only `finished` waits for the publisher, once, at the end of training.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dcgan_ray.config import JobConfig
from dcgan_ray.errors import LeaseLost
from dcgan_ray.report.run_page import publish_run_page
from dcgan_ray.storage.layout import RunLayout, runs_prefix
from dcgan_ray.storage.lease import Lease
from dcgan_ray.storage.s3 import Store
from dcgan_ray.train.events import EventLog, quality_entries

log = logging.getLogger(__name__)


class RunWatch:
    """Rank 0's event log and publisher. `start_step`: the optimizer steps already done (a resumed run's)."""

    def __init__(self, cfg: JobConfig, start_step: int, lease: Lease | None = None):
        self.cfg, self.layout, self.start_step, self.lease = cfg, RunLayout.of(cfg), start_step, lease
        self.events = EventLog(cfg, start_step)
        self.logdir = f"s3://{cfg.storage.bucket}/{runs_prefix(cfg)}"
        self.epoch = 0  # the epoch whose file is open (being trained, or just ended)
        self.grids: dict[int, bytes] = {}
        self.quality_logged: set[int] = set()
        self.pending: list[Path] = []  # closed event files not yet in the bucket, oldest first
        self.page: dict[str, Any] | None = None  # the newest run.json to show, not yet published
        self.published_files = 0
        self.published_pages = 0  # (these counters are what tests wait on)
        self.failures = 0
        self._wake = threading.Condition()
        self._closed = False
        # A store of its own: the publisher's requests never queue behind the training thread's.
        self._store = Store(cfg.storage)
        self._thread = threading.Thread(target=self._run, name="run-watch", daemon=True)
        self._thread.start()

    # --- the training thread: log, and hand over at each epoch's end -----------------------------------

    def step(self, step: int, metrics: dict[str, float]) -> None:
        self.events.step(self.epoch + 1, step, metrics)

    def grid(self, epoch: int, png: bytes) -> None:
        self.grids[epoch] = png

    def epoch_done(self, manifest: dict[str, Any]) -> None:
        """After run.json recorded an epoch (epoch 0: the untrained G): its numbers, grid and any quality
        metrics not logged yet into its file, which is closed and handed to the publisher with run.json."""
        epoch = int(manifest.get("epochs_completed", 0))
        self.epoch = epoch
        entry = next((h for h in manifest["history"] if h["epoch"] == epoch), {"epoch": epoch})
        self.events.epoch(epoch, int(entry.get("step", 0)), entry, self.grids.pop(epoch, None))
        self._log_quality(manifest)
        self._hand_over(manifest)

    def finished(self, manifest: dict[str, Any]) -> None:
        """The last handover; waits until the publisher has tried it (through an outage, up to the retry budget)."""
        self._log_quality(manifest)
        self.events.finished(self.epoch)
        self._hand_over(manifest)
        self.close()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        if self.pending:
            log.warning(
                "%d TensorBoard event file(s) of %s could not be uploaded before training ended: their "
                "curves stop at the last epoch uploaded",
                len(self.pending),
                self.layout.uri,
            )
        self.events.remove()

    def _log_quality(self, manifest: dict[str, Any]) -> None:
        """Quality metrics of epochs this attempt trained (or epoch 0 of a fresh run), once each; a resumed
        run's earlier epochs were logged by the attempt that trained them."""
        for epoch, entry in sorted(quality_entries(manifest["history"]).items()):
            step = int(entry.get("step", 0))
            if epoch in self.quality_logged or (step <= self.start_step and self.start_step > 0):
                continue
            self.events.quality(self.epoch, step, entry)
            self.quality_logged.add(epoch)

    def _hand_over(self, manifest: dict[str, Any]) -> None:
        closed = self.events.close_epoch()
        with self._wake:
            if closed is not None:
                self.pending.append(closed)
            self.page = copy.deepcopy(manifest)
            self._wake.notify()

    # --- the publisher thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self.page is not None or self._closed)
                files, page, self.page = list(self.pending), self.page, None
                closing = self._closed
            if files or page is not None:
                self._publish(files, page)
            if closing:
                return

    def _publish(self, files: list[Path], page: dict[str, Any] | None) -> None:
        try:
            if self.lease is not None:
                self.lease.check()
            for path in files:
                self._store.put_bytes(self.layout.events_key(path.name), path.read_bytes())
                with self._wake:
                    self.pending.remove(path)
                self.published_files += 1
            if page is not None:
                publish_run_page(self._store, self.layout, page, self.logdir)
                self.published_pages += 1
        except LeaseLost:  # the run was taken over: the training thread stops at its next write and says why
            return
        except Exception as e:  # noqa: BLE001 -- whatever fails here, training goes on
            self.failures += 1
            log.warning(
                "TensorBoard events / run page of %s not uploaded (%s: %s); training goes on, and they "
                "go up after the next epoch",
                self.layout.uri,
                type(e).__name__,
                str(e).splitlines()[0],
            )


def publish_after_training(cfg: JobConfig, manifest: dict[str, Any], scored_late: Sequence[int] = ()) -> None:
    """The driver's last word on a run, once its workers are gone: the run page with the final status,
    and, with eval.in_task, the quality metrics of the epochs whose scoring tasks reported after the
    workers had ended (`scored_late`) as one more event file. Never raises: the run is done either way."""
    store, layout = Store(cfg.storage), RunLayout.of(cfg)
    events = EventLog(cfg, 0, purge=False)
    try:
        entries = quality_entries(manifest.get("history", []))
        for epoch in scored_late:
            if epoch in entries:
                events.quality(epoch, int(entries[epoch].get("step", 0)), entries[epoch])
        closed = events.close_epoch()
        if closed is not None:
            store.put_bytes(layout.events_key(closed.name), closed.read_bytes())
        publish_run_page(store, layout, manifest, f"s3://{cfg.storage.bucket}/{runs_prefix(cfg)}")
    except Exception as e:  # noqa: BLE001 -- a page or late curve is not worth failing a finished run for
        log.warning(
            "the run page / late scores of %s were not published (%s: %s)",
            layout.uri,
            type(e).__name__,
            str(e).splitlines()[0],
        )
    finally:
        events.remove()
