"""A rank that makes no progress is seen and its attempt ended: no run hangs until someone looks.

Every rank beats (`dcgan_ray.progress`) at each step, evaluation batch and storage request (a storage
outage's retries beat too: waiting one out is not being stuck), and a thread of its own tells the run's
`ProgressBoard`, a Ray actor of the driver's, every `BEAT_S` how long it has been idle and at which step it
is. The driver's `StallWatch` thread reads the board. A rank is stalled when its idleness passes the window
(`scaling.stall_timeout_s`; by default 100 times the measured step time, at least 3 minutes): a hung
collective or a wedged read (its beats go on, idle), or a stopped process (its beats stop, and its actor
does not answer). Then the driver logs one line naming the rank, its node and pid and its last step, asks
every rank to write its threads' Python stacks (`faulthandler`) to the run folder (`stalls/<when>/`; a
stopped process cannot), and kills the attempt's workers: Ray Train restarts the attempt from the newest
checkpoint (a restart counted against scaling.max_failures).

Ray Train's own check marks a worker that stopped answering dead after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S
(10 minutes), without stacks; a worker hung in a collective answers it and is never caught.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import statistics
import tempfile
import threading
import time
from typing import Any

import ray

from dcgan_ray import progress
from dcgan_ray.config import JobConfig
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.s3 import Store

log = logging.getLogger(__name__)

BEAT_S = 2.0
"""How often each rank tells the board where it is, and the driver reads it."""
MIN_WINDOW_S = 180.0
STEPS_IN_WINDOW = 100
ANSWER_S = 5.0
"""How long a worker's actor has to answer before it counts as stopped."""
DUMP_WAIT_S = 5.0
"""How long the driver waits for the ranks' stacks before it kills the attempt."""


class RankBeat:
    """A rank's thread that tells the board how idle it is and at which step (`at`, which the training loop
    calls after each step), and writes its stacks when asked."""

    def __init__(self, board: Any, rank: int, store: Store, step: int):
        self.board, self.rank, self.store = board, rank, store
        ctx = ray.get_runtime_context()
        self.me = {"node": ctx.get_node_id(), "pid": os.getpid(), "actor": ctx.current_actor}
        self.step = self.first_step = step
        self.started = time.perf_counter()
        self.dumped: set[str] = set()
        threading.Thread(target=self._run, name="stall-beat", daemon=True).start()

    def at(self, step: int) -> None:
        self.step = step

    def step_s(self) -> float | None:
        """This attempt's time per step so far, evaluation and checkpoints included (a generous measure)."""
        steps = self.step - self.first_step
        return (time.perf_counter() - self.started) / steps if steps else None

    def _run(self) -> None:
        while True:
            beat = {**self.me, "step": self.step, "idle_s": progress.idle_s(), "step_s": self.step_s()}
            try:
                ask = ray.get(self.board.beat.remote(self.rank, beat), timeout=30)
            except Exception:  # noqa: BLE001 -- the board is the driver's: gone with it, or busy; beat again
                ask = None
            if ask and ask not in self.dumped:
                self.dumped.add(ask)
                self._write_stacks(ask)
            time.sleep(BEAT_S)

    def _write_stacks(self, prefix: str) -> None:
        with tempfile.TemporaryFile("w+") as f:
            f.write(f"rank {self.rank}, pid {self.me['pid']}, node {self.me['node']}, step {self.step}\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.seek(0)
            self.store.put_bytes(f"{prefix}/rank_{self.rank}.txt", f.read().encode(), "text/plain")


class StallWatch:
    """The driver's thread over the board (see the module's docstring)."""

    def __init__(self, cfg: JobConfig, board: Any):
        self.cfg, self.board = cfg, board
        self.store, self.layout = Store(cfg.storage), RunLayout.of(cfg)
        self.stalls: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def window_s(self, ranks: dict[int, dict[str, Any]]) -> float:
        if self.cfg.scaling.stall_timeout_s is not None:
            return self.cfg.scaling.stall_timeout_s
        steps = [r["step_s"] for r in ranks.values() if r.get("step_s")]
        return max(MIN_WINDOW_S, STEPS_IN_WINDOW * statistics.median(steps)) if steps else MIN_WINDOW_S

    def _run(self) -> None:
        failed = False
        while not self._stop.wait(BEAT_S):
            try:
                self._look()
                failed = False
            except Exception as e:  # noqa: BLE001 -- a watch that fails must not fail the run
                if not failed:  # (once, until it works again)
                    log.warning("the stall watch could not look at the workers (%s: %s)", type(e).__name__, e)
                failed = True

    def _look(self) -> None:
        ranks = ray.get(self.board.read.remote(), timeout=30)
        window, now = self.window_s(ranks), time.time()
        idle = {rank: r["idle_s"] + (now - r["received"]) for rank, r in ranks.items()}
        over = {rank: _answers(ranks[rank]["actor"]) for rank in sorted(ranks) if idle[rank] > window}
        for rank in [rank for rank, answer in over.items() if answer is None]:  # an attempt that ended: no stall
            self.board.forget.remote(rank)
        stuck = {rank: answer for rank, answer in over.items() if answer is not None}
        if stuck:
            # One that does not answer is stopped, and the others wait for it in a collective: name it.
            rank = min(stuck, key=lambda r: (stuck[r], -idle[r]))
            self._end_attempt(rank, ranks[rank], idle[rank], window, ranks, stopped=not stuck[rank])

    def _end_attempt(
        self, rank: int, r: dict[str, Any], idle: float, window: float, ranks: dict, stopped: bool
    ) -> None:
        prefix = f"{self.layout.prefix}/stalls/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        log.error(
            "rank %d on node %s (pid %d) made no progress for %.0f s, at step %d (%s; the window: %.0f s, "
            "scaling.stall_timeout_s): ending this attempt, which Ray Train restarts from the newest "
            "checkpoint; the ranks' Python stacks go to %s/",
            rank,
            r["node"][:12],
            r["pid"],
            idle,
            r["step"],
            "its process does not answer" if stopped else "its process answers, its training does not move",
            window,
            self.store.uri(prefix),
        )
        self.stalls.append({"rank": rank, "pid": r["pid"], "step": r["step"], "stacks": prefix, "stopped": stopped})
        ray.get(self.board.ask_for_stacks.remote(prefix))
        time.sleep(DUMP_WAIT_S)
        ray.get(self.board.ask_for_stacks.remote(None))
        for other in ranks.values():
            ray.kill(other["actor"], no_restart=True)
        for other in ranks:
            self.board.forget.remote(other)


def _answers(actor: Any) -> bool | None:
    """Whether the worker's actor answers: True, False for a process that is there but does not (stopped),
    None for one that is gone (its attempt ended)."""
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=ANSWER_S)
    except ray.exceptions.GetTimeoutError:
        return False
    except ray.exceptions.RayActorError:
        return None
    return True
