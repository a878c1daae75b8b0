"""Checkpoint folders in the real SeaweedFS: a manifest written last, verified on every load; torn ones
are skipped for the previous intact one, with a warning, and never taken for good; an upload that was
cut (no manifest, newer than anything known durable) is removed, and only damage refuses a restart."""

import json

import pytest
import torch

from dcgan_ray.cli import main as cli_main
from dcgan_ray.errors import CheckpointError
from dcgan_ray.storage.checkpoint import (
    CHECKPOINT_FILE,
    MANIFEST_FILE,
    checkpoint_bytes,
    load_checkpoint,
    read_checkpoint_dir,
    read_checkpoint_uri,
    save_checkpoint,
)
from dcgan_ray.storage.checkpointer import Checkpointer
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.runs import write_run_manifest
from helpers import make_config


def tiny_state(epoch: int) -> dict:
    """A checkpoint's fields with small tensors (the format does not care about their size)."""
    cfg = make_config("http://127.0.0.1:1", "p", model={"g_features": 8, "d_features": 8, "z_dim": 4})
    return {
        "netG": {"w": torch.full((3,), float(epoch))},
        "netD": {},
        "optG": {},
        "optD": {},
        "epoch": epoch,
        "step": 10 * epoch,
        "fixed_noise": torch.zeros(4, 4),
        "config": cfg.to_dict(),
    }


@pytest.fixture
def run(cfg, store, tmp_path):
    """A run folder with intact checkpoints for epochs 1, 2 and 3, uploaded as training does."""
    store.check()
    checkpointer = Checkpointer(store, RunLayout.of(cfg), cfg.eval.metric)
    for epoch in (1, 2, 3):
        local = tmp_path / f"e{epoch}"
        save_checkpoint(local, tiny_state(epoch))
        checkpointer.upload(local, checkpointer.dir_name(epoch))
    return checkpointer


def registered_by_ray(checkpointer: Checkpointer, epoch: int) -> str:
    return f"{checkpointer.layout.bucket}/{checkpointer.layout.checkpoint_dir_key(f'checkpoint_epoch_{epoch:04d}')}"


def test_upload_writes_a_manifest_that_lists_every_file(run, store):
    folder = run.layout.checkpoint_dir_key("checkpoint_epoch_0003")
    manifest = json.loads(store.get_bytes(f"{folder}/{MANIFEST_FILE}"))
    assert manifest["epoch"] == 3 and set(manifest["files"]) == {CHECKPOINT_FILE}
    assert manifest["files"][CHECKPOINT_FILE]["bytes"] == store.head(f"{folder}/{CHECKPOINT_FILE}")["ContentLength"]
    assert read_checkpoint_dir(store, folder)["epoch"] == 3
    assert run.restore(registered_by_ray(run, 3))[0]["epoch"] == 3


@pytest.mark.parametrize("tear", ["truncated", "missing file", "no manifest", "bytes changed"])
def test_a_torn_checkpoint_is_skipped_for_the_previous_one(run, store, tear, caplog):
    folder = run.layout.checkpoint_dir_key("checkpoint_epoch_0003")
    data = store.get_bytes(f"{folder}/{CHECKPOINT_FILE}")
    if tear == "truncated":
        store.put_bytes(f"{folder}/{CHECKPOINT_FILE}", data[: len(data) // 2])
    elif tear == "missing file":
        store.delete([f"{folder}/{CHECKPOINT_FILE}"])
    elif tear == "no manifest":
        store.delete([f"{folder}/{MANIFEST_FILE}"])
    else:  # same size, one byte flipped: still a readable zip, so only the sha256 can tell
        store.put_bytes(f"{folder}/{CHECKPOINT_FILE}", data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    state, uri = run.restore(registered_by_ray(run, 3))
    assert state["epoch"] == 2 and uri.endswith("checkpoint_epoch_0002")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w for w in warnings if "checkpoint_epoch_0003 is torn" in w and "trying the run's older" in w], warnings
    assert len(warnings) == 1, warnings
    # Ray registered epoch 3, so it was durable: its missing manifest is damage, and the folder stays.
    assert store.list_keys(f"{folder}/")
    with pytest.raises(CheckpointError, match="is torn"):
        read_checkpoint_dir(store, folder)


def test_checkpoints_ray_never_registered_are_still_resumed(run, store, cfg):
    # Ray's record of its checkpoints can be missing (its write failed in an outage, or the upload ended
    # just before its worker was lost): the run folder's intact checkpoints still count.
    state, uri = run.restore(None)
    assert state["epoch"] == 3 and uri.endswith("checkpoint_epoch_0003")
    empty = Checkpointer(store, RunLayout(cfg.storage.bucket, f"{cfg.storage.prefix}/runs/never-ran"), cfg.eval.metric)
    assert empty.restore(None) == (None, None)


def record_durable(store, checkpointer: Checkpointer, epoch: int) -> None:
    """run.json as the recorder leaves it once the checkpoint of `epoch` is durable."""
    latest = store.uri(checkpointer.layout.checkpoint_dir_key(f"checkpoint_epoch_{epoch:04d}"))
    write_run_manifest(store, checkpointer.layout, {"checkpoints": {"latest": latest, "durable_epoch": epoch}})


@pytest.mark.parametrize("registered", [2, None])
def test_a_cut_upload_is_removed_with_one_warning(run, store, registered, caplog):
    """Epoch 4's upload cut between checkpoint.pt and its manifest: it is removed with one warning, and the
    run resumes from the newest intact checkpoint, whether or not Ray had registered that one."""
    cut = run.layout.checkpoint_dir_key("checkpoint_epoch_0004")
    store.put_bytes(f"{cut}/{CHECKPOINT_FILE}", store.get_bytes(f"{run.folders()[0]}/{CHECKPOINT_FILE}"))
    state, uri = run.restore(registered_by_ray(run, registered) if registered else None)
    assert state["epoch"] == (registered or 3) and uri.endswith(f"checkpoint_epoch_{registered or 3:04d}")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "checkpoint_epoch_0004 has no manifest.json: its upload was cut" in warnings[0]
    assert store.list_keys(f"{cut}/") == []
    assert run.dir_name(4) == "checkpoint_epoch_0004"  # the name is free again for the epoch trained again


def test_only_cut_uploads_start_over_with_a_warning(cfg, store, caplog):
    """The first checkpoint's upload cut: nothing intact, nothing damaged, so the run starts over."""
    store.check()
    layout = RunLayout(cfg.storage.bucket, f"{cfg.storage.prefix}/runs/first")
    checkpointer = Checkpointer(store, layout, cfg.eval.metric)
    store.put_bytes(checkpointer.layout.checkpoint_dir_key("checkpoint_epoch_0001") + f"/{CHECKPOINT_FILE}", b"x")
    assert checkpointer.restore(None) == (None, None)
    assert any(
        "checkpoint_epoch_0001 has no manifest.json: its upload was cut" in r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING"
    )
    assert checkpointer.folders() == []


@pytest.mark.parametrize("known_durable", ["registered by Ray", "recorded in run.json"])
def test_no_intact_checkpoint_refuses_to_start_over(run, store, known_durable):
    """Manifests gone from checkpoints known to have been durable: damage, not a cut upload."""
    for folder in run.folders():
        store.delete([f"{folder}/{MANIFEST_FILE}"])
    if known_durable == "recorded in run.json":
        record_durable(store, run, 3)
    with pytest.raises(CheckpointError, match="none is intact; refusing to start over"):
        run.restore(registered_by_ray(run, 3) if known_durable == "registered by Ray" else None)
    assert len(run.folders()) == 3  # nothing removed


def test_a_cut_upload_after_damaged_checkpoints_still_refuses(run, store):
    """Epoch 4's upload was cut, and the checkpoints before it rotted: the cut one goes, the refusal stays."""
    store.put_bytes(f"{run.layout.checkpoint_dir_key('checkpoint_epoch_0004')}/{CHECKPOINT_FILE}", b"x")
    for folder in run.folders()[1:]:
        store.put_bytes(f"{folder}/{CHECKPOINT_FILE}", b"rotted")
    with pytest.raises(CheckpointError, match="none is intact; refusing to start over"):
        run.restore(None)
    assert [f.rsplit("/", 1)[-1] for f in run.folders()] == [f"checkpoint_epoch_000{e}" for e in (3, 2, 1)]


def test_sample_reads_checked_folders_and_refuses_torn_ones(run, store, cfg, tmp_path, capsys):
    folder_uri = store.uri(run.layout.checkpoint_dir_key("checkpoint_epoch_0002"))
    assert read_checkpoint_uri(folder_uri, cfg.storage)["epoch"] == 2
    store.delete([f"{run.layout.checkpoint_dir_key('checkpoint_epoch_0002')}/{MANIFEST_FILE}"])
    rc = cli_main(["sample", folder_uri, "--endpoint", cfg.storage.endpoint, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint_epoch_0002 is torn" in err and "no manifest.json" in err
    # A local folder is checked the same way.
    local = tmp_path / "local"
    save_checkpoint(local, tiny_state(5))
    assert read_checkpoint_uri(str(local), cfg.storage)["epoch"] == 5
    (local / CHECKPOINT_FILE).write_bytes((local / CHECKPOINT_FILE).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="is torn"):
        read_checkpoint_uri(str(local), cfg.storage)


# --- The format on local folders (no S3 server: in the fast lane) ------------------------------------------


def test_a_saved_folder_reads_back_checked_against_its_manifest(tmp_path):
    save_checkpoint(tmp_path / "c", tiny_state(4))
    manifest = json.loads((tmp_path / "c" / MANIFEST_FILE).read_text())
    assert manifest["epoch"] == 4 and set(manifest["files"]) == {CHECKPOINT_FILE}
    state = read_checkpoint_uri(str(tmp_path / "c"), make_config("http://127.0.0.1:1", "p").storage)
    assert state["epoch"] == 4 and torch.equal(state["netG"]["w"], torch.full((3,), 4.0))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [CHECKPOINT_FILE, MANIFEST_FILE]  # no temp files


@pytest.mark.parametrize(
    "tear, error",
    [
        ("no manifest", "it has no manifest.json, which is written last"),
        ("truncated", "checkpoint.pt has 100 bytes and another sha256"),
        ("bytes changed", r"checkpoint.pt has (\d+) bytes and another sha256 than the \1 bytes its manifest lists"),
        ("manifest not JSON", "its manifest.json cannot be read"),
        ("manifest lists another file", "its manifest.json cannot be read .*it lists"),
    ],
)
def test_a_torn_local_folder_is_refused_with_what_is_wrong(tmp_path, tear, error):
    folder = tmp_path / "c"
    save_checkpoint(folder, tiny_state(1))
    data, manifest = (folder / CHECKPOINT_FILE).read_bytes(), json.loads((folder / MANIFEST_FILE).read_text())
    if tear == "no manifest":
        (folder / MANIFEST_FILE).unlink()
    elif tear == "truncated":
        (folder / CHECKPOINT_FILE).write_bytes(data[:100])
    elif tear == "bytes changed":
        (folder / CHECKPOINT_FILE).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif tear == "manifest not JSON":
        (folder / MANIFEST_FILE).write_text("{")
    else:
        manifest["files"] = {"other.pt": manifest["files"][CHECKPOINT_FILE]}
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"checkpoint {folder} is torn .*: {error}"):
        read_checkpoint_uri(str(folder), make_config("http://127.0.0.1:1", "p").storage)


def test_a_checkpoint_file_that_is_not_ours_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "netG": {}}, path)
    with pytest.raises(CheckpointError, match="lacks .*: not a dcgan-ray checkpoint"):
        load_checkpoint(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is not a dcgan-ray checkpoint"):
        load_checkpoint(path)
    path.write_bytes(checkpoint_bytes(tiny_state(1))[:1000])
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is damaged or truncated and cannot be read"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
