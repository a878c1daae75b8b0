"""Fault injection for the fault-tolerance tests: a process stops itself, or holds still, at a named step
of an epoch's end, where timing a kill from outside could not hit the moment.

The Ray nodes' environment names a file in DCGAN_RAY_FAULT_FILE (users never set it; then every call here
costs one environment lookup). A test writes `{"step": STEP, "action": ACTION}` into that file (and
`"at": N` for a step that says where it is, an epoch or a step, to fire there only). The first
process to reach STEP claims the fault by renaming the file to `<file>.fired`, so it fires once and the
restarted workers pass the step unharmed. Then, by ACTION:

  kill   SIGKILL to itself: a worker process lost, with no clean-up;
  hold   its Ray node id into `<file>.held`, then wait forever, so the test can take that node down
         while the process stands at exactly this step;
  pause  its pid into `<file>.paused`, then SIGSTOP to itself: the whole process stands still (a long GC,
         a partition) until the test sends SIGCONT, and then goes on from exactly this step;
  mark   its Ray node id into `<file>.marked`, and go on: the test acts on that node (a preemption) while
         the run is at exactly this step.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

FAULT_FILE_ENV = "DCGAN_RAY_FAULT_FILE"

STEPS = {
    "record_epoch": "rank 0 wrote the epoch's sample grid and not yet run.json",
    "upload_checkpoint_file": "half of checkpoint.pt is sent",
    "before_manifest": "checkpoint.pt is in the bucket, its manifest.json not yet",
    "after_manifest": "manifest.json is in the bucket; Ray Train has not registered the checkpoint yet",
}
"""The steps of an epoch's end that the fault tests lose rank 0 at, each with its expected outcome."""
LEASE_STEPS = {"before_commit": "the checkpoint is uploaded and checked; its commit to the lease log is next"}
INTERRUPTION_STEPS = {
    "mid_epoch": "a rank finished step `at` of an epoch (any epoch: the first to get there)",
    "preemption_before_manifest": "a preemption's checkpoint.pt is in the bucket, its manifest.json not yet",
}


def reached(step: str, at: int | None = None) -> None:
    """Fire the fault set for `step` (at `at`, if the fault names where), if one is set and no process
    claimed it yet."""
    path = os.environ.get(FAULT_FILE_ENV)
    if not path:
        return
    try:
        fault = json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError):  # none set, or the test is still writing it
        return
    if fault.get("step") != step or fault.get("at", at) != at:
        return
    try:
        os.rename(path, f"{path}.fired")
    except FileNotFoundError:  # another process claimed it first
        return
    if fault["action"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault["action"] == "pause":
        _write_into_place(Path(f"{path}.paused"), str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    import ray  # only here: the storage modules that call this work without Ray

    if fault["action"] == "mark":
        _write_into_place(Path(f"{path}.marked"), ray.get_runtime_context().get_node_id())
        return
    _write_into_place(Path(f"{path}.held"), ray.get_runtime_context().get_node_id())
    while True:
        time.sleep(60)


def _write_into_place(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")  # renamed into place: the test never reads half of it
    part.write_text(text)
    part.rename(path)


def halfway(step: str, total_bytes: int) -> Callable[[int], None] | None:
    """A callback counting bytes sent that reaches `step` once half of `total_bytes` went out; None when no
    fault is set for `step` (the upload then has no callback of ours at all)."""
    path = os.environ.get(FAULT_FILE_ENV)
    if not path or not os.path.exists(path):
        return None
    sent = 0

    def on_bytes(count: int) -> None:
        nonlocal sent
        sent += count
        if sent >= total_bytes // 2:
            reached(step)

    return on_bytes
