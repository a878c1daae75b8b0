"""The lease log is the run's history (issue 32): restore goes by commit order, a checkpoint resumed from in the
same generation is committed when resumed, readers take the log's end state over a run.json a stale generation
wrote, and `stop` releases only the holder whose job it stopped. Real SeaweedFS; no Ray."""

from __future__ import annotations

import json

import pytest

from dcgan_ray.errors import CheckpointError
from dcgan_ray.recovery import orphaned
from dcgan_ray.report.runs_table import list_runs
from dcgan_ray.storage.checkpoint import read_checkpoint_uri, save_checkpoint
from dcgan_ray.storage.checkpointer import Checkpointer
from dcgan_ray.storage.layout import RunLayout, runs_prefix
from dcgan_ray.storage.lease import Lease
from dcgan_ray.storage.lease_log import LeaseLog
from dcgan_ray.storage.lease_status import ownership, release_folder
from dcgan_ray.storage.runs import new_run_manifest, write_run_manifest
from test_checkpoint import tiny_state


def take(store, layout, cluster: str, submission: str | None = None, wait: bool = False) -> Lease:
    holder = {"cluster": cluster, "submission_id": submission}
    return Lease.acquire(store, layout.prefix, layout.uri, "run", holder, 10, wait)


def upload(checkpointer: Checkpointer, tmp_path, epoch: int, steps: int) -> str:
    local = tmp_path / f"e{epoch}s{steps}"
    save_checkpoint(local, tiny_state(epoch), checkpointer.lease.generation if checkpointer.lease else None)
    return checkpointer.upload(local, checkpointer.dir_name(epoch, steps))


def test_restore_goes_by_commit_order_not_by_folder_name(cfg, store, tmp_path):
    """After an elastic resize a mid-epoch folder's step count restarts: the newer checkpoint of epoch 3 is
    `_s00030`, which sorts below the older `_s00050`. Restore takes the one committed last."""
    store.check()
    layout = RunLayout.of(cfg)
    lease = take(store, layout, "A")
    checkpointer = Checkpointer(store, layout, cfg.eval.metric, lease)
    older = upload(checkpointer, tmp_path, 3, 50)
    newer = upload(checkpointer, tmp_path, 3, 30)
    assert sorted([older, newer], reverse=True)[0] == older  # by name, the older one would win
    state, uri = Checkpointer(store, layout, cfg.eval.metric, lease).restore(None)
    assert uri == store.uri(newer)


def test_a_checkpoint_resumed_from_in_the_same_generation_is_committed(cfg, store, tmp_path, monkeypatch):
    """Rank 0 lost between the last upload and its commit: the restart in the same generation resumes from the
    upload and commits it, so a later generation neither removes it nor trains that epoch again."""
    store.check()
    layout = RunLayout.of(cfg)
    lease = take(store, layout, "A")
    checkpointer = Checkpointer(store, layout, cfg.eval.metric, lease)
    upload(checkpointer, tmp_path, 1, None)
    monkeypatch.setattr(lease, "commit", lambda body: None)  # the upload lands, its commit never does
    last = upload(checkpointer, tmp_path, 2, None)
    monkeypatch.undo()
    assert [c["epoch"] for c in LeaseLog(store, layout.prefix).entries() if c["kind"] == "commit"] == [1]
    rank0 = Lease.join(store, layout.prefix, layout.uri, "run", lease.generation)  # the restarted attempt
    _, uri = Checkpointer(store, layout, cfg.eval.metric, rank0).restore(None)
    assert uri == store.uri(last)
    assert [c["epoch"] for c in LeaseLog(store, layout.prefix).entries() if c["kind"] == "commit"] == [1, 2]
    lease.release()
    successor = take(store, layout, "B")
    _, uri = Checkpointer(store, layout, cfg.eval.metric, successor).restore(None)
    assert uri == store.uri(last) and store.list_keys(f"{last}/")


def test_readers_take_the_logs_end_state_over_a_stale_run_json(cfg, store):
    """A's run.json write lands after B finished the run (a request the network held): `runs` shows the run
    finished, and `recover` does not take it for an orphan."""
    store.check()
    layout = RunLayout.of(cfg)
    a = take(store, layout, "A")
    with a.fencing():
        write_run_manifest(store, layout, new_run_manifest(cfg, layout))
    a.release("failed")
    b = take(store, layout, "B")
    with b.fencing():
        finished = {**new_run_manifest(cfg, layout), "status": "finished", "epochs_completed": 1}
        b.commit({"state": "finished", "epochs_completed": 1})
        write_run_manifest(store, layout, finished)
    b.release()
    written = json.loads(store.get_bytes(layout.manifest_key))
    assert written["generation"] == b.generation and "lease log" in written["authority"]
    stale = {**new_run_manifest(cfg, layout), "generation": a.generation, "status": "running"}
    store.put_bytes(layout.manifest_key, json.dumps(stale).encode())  # A's late write, past any gate
    assert ownership(store, layout.prefix).status_of(stale) == "finished"
    (row,) = list_runs(store, runs_prefix(cfg), orphaned)
    assert (row.name, row.status, row.why) == (cfg.name, "finished", "")
    assert orphaned(store, layout.prefix, stale) is None


def test_stop_releases_only_the_holder_whose_job_it_stopped(cfg, store):
    """`dcgan-ray stop` ended submission X; by the time it releases, a driver of submission Y holds the run."""
    store.check()
    layout = RunLayout.of(cfg)
    take(store, layout, "A", "X").release()
    successor = take(store, layout, "B", "Y")
    assert not release_folder(store, layout.prefix, "stopped by dcgan-ray stop", {"X"})
    successor.check()  # still the holder
    assert ownership(store, layout.prefix).holder["generation"] == successor.generation
    assert release_folder(store, layout.prefix, "stopped by dcgan-ray stop", {"Y"})


def test_sample_and_eval_read_only_the_committed_history(cfg, store, tmp_path, monkeypatch):
    """`read_checkpoint_uri` (behind `sample` and `eval`): a run folder means its newest committed checkpoint,
    an uncommitted folder is refused, and best/ is believed only as its newest commit recorded it."""
    store.check()
    layout = RunLayout.of(cfg)
    lease = take(store, layout, "A")
    checkpointer = Checkpointer(store, layout, cfg.eval.metric, lease)
    committed = upload(checkpointer, tmp_path, 1, None)
    monkeypatch.setattr(lease, "commit", lambda body: None)
    uncommitted = upload(checkpointer, tmp_path, 2, None)  # a stale driver's upload, say
    monkeypatch.undo()
    assert read_checkpoint_uri(layout.uri, cfg.storage)["epoch"] == 1
    assert read_checkpoint_uri(store.uri(committed), cfg.storage)["epoch"] == 1
    with pytest.raises(CheckpointError, match=r"is not in its run's committed history \(the lease log has no commit"):
        read_checkpoint_uri(store.uri(uncommitted), cfg.storage)
    best = checkpointer.keep_if_best(None, 1, 10.0, lambda: tiny_state(1))
    assert read_checkpoint_uri(best["uri"], cfg.storage)["epoch"] == 1
    # A stale driver's best copy lands over it: the manifest no longer matches its commit.
    Checkpointer(store, layout, cfg.eval.metric).keep_if_best(None, 2, 5.0, lambda: tiny_state(2))
    with pytest.raises(CheckpointError, match=r"was replaced after its commit"):
        read_checkpoint_uri(best["uri"], cfg.storage)


def test_a_cut_upload_after_a_resize_is_removed_though_its_name_sorts_below_a_committed_one(
    cfg, store, tmp_path, caplog
):
    """After an elastic resize the newer attempt's mid-epoch upload `_s00030` was cut (no manifest); the older,
    committed `_s00050` sorts above it. It is still a cut upload (its epoch is the newest committed one's):
    removed with one warning, and restore takes the committed checkpoint."""
    store.check()
    layout = RunLayout.of(cfg)
    lease = take(store, layout, "A")
    checkpointer = Checkpointer(store, layout, cfg.eval.metric, lease)
    committed = upload(checkpointer, tmp_path, 3, 50)
    cut = layout.checkpoint_dir_key(checkpointer.dir_name(3, 30))
    store.put_bytes(f"{cut}/checkpoint.pt", b"half of it")  # the upload was cut before its manifest
    with caplog.at_level("WARNING", "dcgan_ray"):
        _, uri = Checkpointer(store, layout, cfg.eval.metric, lease).restore(None)
    assert uri == store.uri(committed) and store.list_keys(f"{cut}/") == []
    assert [r.getMessage() for r in caplog.records if "its upload was cut" in r.getMessage()], caplog.text
