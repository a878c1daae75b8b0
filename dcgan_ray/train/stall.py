"""A rank that makes no progress is seen and its attempt ended: no run hangs until someone looks.

Every rank beats (`dcgan_ray.progress`) at each step, evaluation batch and storage request (a storage
outage's retries beat too: waiting one out is not being stuck), and a thread of its own tells the run's
`ProgressBoard`, a Ray actor of the driver's, every `BEAT_S` how long it has been idle, at which step it
is, and how long its process has been waiting out a storage outage (`dcgan_ray.storage.outages`). The
driver's `StallWatch` thread reads the board. A rank is stalled when its idleness passes the window
(`window_s`): a hung collective or a wedged read (its beats go on, idle), or a stopped process (its beats
stop, and its actor does not answer). An outage is not a stall: while any rank waits one out within
storage.retry_budget_s, the ranks waiting for it in a collective are idle but not stalled
(`stalled_ranks`); past the budget, the retrying rank's own error ends the attempt. When a rank is stalled
the driver logs one line naming the rank, its node and pid and its last step, asks every rank to write its
threads' Python stacks (`faulthandler`) to the run folder (`stalls/<when>/`; a stopped process cannot),
and kills the attempt's workers: Ray Train restarts the attempt from the newest checkpoint (a restart
counted against scaling.max_failures), and when it does not, the run fails with the stall's own line
(`stall_error`), not with Ray's "actor killed".

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
from dcgan_ray.errors import Stalled, StorageError
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.outages import outage_seconds
from dcgan_ray.storage.s3 import Store

log = logging.getLogger(__name__)

BEAT_S = 2.0
"""How often each rank tells the board where it is, and the driver reads it."""
MIN_WINDOW_S = 180.0
STEPS_IN_WINDOW = 100
OUTAGE_SLACK_S = 60.0
"""How much longer than storage.retry_budget_s a storage outage can keep ranks idle (see `window_s`)."""
AFTER_OUTAGE_S = 24.0
"""How long after an outage was last seen idle ranks are still excused: pyarrow's longest wait between two
tries (20 s, the AWS SDK's standard strategy, which Ray Train's own writes use) and two beats."""
PROBE_S = 5.0
"""The driver's one look at the bucket before it calls ranks stalled: one try of at most this long."""
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
            beat = {
                **self.me,
                "step": self.step,
                "idle_s": progress.idle_s(),
                "step_s": self.step_s(),
                "outage_s": outage_seconds(self.store.endpoint),
            }
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
        self.ended: dict[str, Any] | None = None
        """The last stall, while no later attempt has beaten: the one that ended the run if fit() fails."""
        self._killed: set[tuple[str, int]] = set()  # (node, pid) of every worker the watch killed
        self._outage: tuple[float, float] | None = None  # (first, last) time an outage was seen, by anyone
        self._probe = self.store.for_lease(PROBE_S)  # one short try a look, never an outage's wait
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

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
        if any((r["node"], r["pid"]) not in self._killed for r in ranks.values()):
            self.ended = None  # a later attempt runs: the last stall did not end the run
        budget, now = self.cfg.storage.retry_budget_s, time.time()
        window = window_s(ranks, self.cfg.scaling.stall_timeout_s, budget)
        if any(r.get("outage_s") is not None for r in ranks.values()):
            self._saw_outage(now)
        idle = stalled_ranks(ranks, window, now, budget)
        if idle and self._outage_excuses(now, budget):
            return
        over = {rank: _answers(ranks[rank]["actor"]) for rank in sorted(idle)}
        for rank in [rank for rank, answer in over.items() if answer is None]:  # an attempt that ended: no stall
            self.board.forget.remote(rank)
        stuck = {rank: answer for rank, answer in over.items() if answer is not None}
        if stuck:
            # One that does not answer is stopped, and the others wait for it in a collective: name it.
            rank = min(stuck, key=lambda r: (stuck[r], -idle[r]))
            self._end_attempt(rank, ranks[rank], idle[rank], window, ranks, stopped=not stuck[rank])

    def _saw_outage(self, now: float) -> None:
        self._outage = (self._outage[0] if self._outage else now, now)

    def _outage_excuses(self, now: float, budget: float) -> bool:
        """Ranks idle past the window are not stalled while the bucket does not answer the driver either, nor
        for AFTER_OUTAGE_S after anyone last saw it down, within the retry budget (+ OUTAGE_SLACK_S) of the
        outage's start. What the ranks' beats cannot report: Ray Train's own writes (its controller's run
        state, at each report, through pyarrow) retry with waits of up to 20 s and make every rank wait."""
        try:
            self._probe.check()
        except StorageError:
            self._saw_outage(now)
        if self._outage is None:
            return False
        first, last = self._outage
        if now - last > AFTER_OUTAGE_S:
            self._outage = None
            return False
        return now - first <= budget + OUTAGE_SLACK_S

    def _end_attempt(
        self, rank: int, r: dict[str, Any], idle: float, window: float, ranks: dict, stopped: bool
    ) -> None:
        prefix = f"{self.layout.prefix}/stalls/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        stall = {
            "rank": rank,
            "node": r["node"],
            "pid": r["pid"],
            "step": r["step"],
            "idle_s": idle,
            "window_s": window,
            "stopped": stopped,
            "stacks": f"{self.store.uri(prefix)}/",
        }
        log.error(
            "%s: ending this attempt, which Ray Train restarts from the newest checkpoint while "
            "scaling.max_failures (%d) allows; the ranks' Python stacks go to %s",
            describe_stall(stall),
            self.cfg.scaling.max_failures,
            stall["stacks"],
        )
        self.stalls.append(stall)
        self.ended = stall
        self._killed.update((other["node"], other["pid"]) for other in ranks.values())
        ray.get(self.board.ask_for_stacks.remote(prefix))
        time.sleep(DUMP_WAIT_S)
        ray.get(self.board.ask_for_stacks.remote(None))
        for other in ranks.values():
            ray.kill(other["actor"], no_restart=True)
        for other in ranks:
            self.board.forget.remote(other)


def window_s(ranks: dict[int, dict[str, Any]], stall_timeout_s: float | None, retry_budget_s: float) -> float:
    """How long a rank may make no progress before it is stalled: scaling.stall_timeout_s, the user's choice,
    or by default STEPS_IN_WINDOW times the ranks' median step time (a slow step is not a stall), at least
    MIN_WINDOW_S, and at least storage.retry_budget_s + OUTAGE_SLACK_S. That last floor is for outages that
    `stalled_ranks` cannot see yet or at all: a rank waits in a collective for one that retries storage
    before the retrying rank's next beat reports its outage, and Ray Train's own checkpoint uploads retry
    in pyarrow (`dcgan_ray.storage.arrowfs`), which neither beats nor reports an outage, for about the
    budget (the waits are random: the slack covers their spread, a beat's delay and the last backoff)."""
    if stall_timeout_s is not None:
        return stall_timeout_s
    steps = [r["step_s"] for r in ranks.values() if r.get("step_s")]
    measured = STEPS_IN_WINDOW * statistics.median(steps) if steps else 0.0
    return max(MIN_WINDOW_S, retry_budget_s + OUTAGE_SLACK_S, measured)


def stalled_ranks(
    ranks: dict[int, dict[str, Any]], window: float, now: float, retry_budget_s: float
) -> dict[int, float]:
    """The ranks idle longer than `window` at `now` (the board's clock), with how long each has been idle.

    `ranks` are the board's last beats (`idle_s`, `outage_s`, and `received`, when the board got them). None
    is stalled while any rank waits out a storage outage younger than storage.retry_budget_s +
    OUTAGE_SLACK_S: the others wait for it in a collective, and it beats. Past the budget the retrying rank
    raises the outage's own error, which ends the attempt in its own line (the slack gives that error time to
    arrive first); an outage that lasts longer anyway (a rank stopped while it retried) excuses no more.
    """
    outages = [r["outage_s"] + (now - r["received"]) for r in ranks.values() if r.get("outage_s") is not None]
    if any(outage <= retry_budget_s + OUTAGE_SLACK_S for outage in outages):
        return {}
    idle = {rank: r["idle_s"] + (now - r["received"]) for rank, r in ranks.items()}
    return {rank: seconds for rank, seconds in idle.items() if seconds > window}


def describe_stall(stall: dict[str, Any]) -> str:
    """What the watch saw of a stalled rank, for its log line and the run's error."""
    return (
        f"rank {stall['rank']} on node {stall['node'][:12]} (pid {stall['pid']}) made no progress for "
        f"{stall['idle_s']:.0f} s, at step {stall['step']} ("
        + ("its process does not answer" if stall["stopped"] else "its process answers, its training does not move")
        + f"; the window: {stall['window_s']:.0f} s, scaling.stall_timeout_s)"
    )


def stall_error(stall: dict[str, Any], cfg: JobConfig) -> Stalled:
    """The run's error when the attempt a stall ended was its last (scaling.max_failures spent)."""
    return Stalled(
        f"training of {cfg.name} stopped: {describe_stall(stall)}, so the stall watch ended the attempt and "
        f"scaling.max_failures = {cfg.scaling.max_failures} allowed no further restart; the ranks' Python stacks "
        f"are in {stall['stacks']}. If the work is legitimately this slow, raise scaling.stall_timeout_s; to "
        "restart a stalled attempt from the newest checkpoint, raise scaling.max_failures. Artifacts so far: "
        f"{RunLayout.of(cfg).uri}; resubmit to resume"
    )


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
