"""Hostile or damaged objects in the bucket, against the real SeaweedFS: each is refused in one line naming
the object (or skipped, where an older intact copy exists), and none reaches a path outside the cache, a
huge allocation or a traceback. The field-by-field checks themselves: tests/test_properties.py."""

from __future__ import annotations

import argparse
import json
import logging
import re

import numpy as np
import pytest
import scipy.io

import dcgan_ray.data.svhn as svhn
from dcgan_ray.cli import main as cli_main
from dcgan_ray.cli.commands import _eval_config
from dcgan_ray.config import StorageSection
from dcgan_ray.data.svhn import cached_object, load_split, prepare_split, read_mat
from dcgan_ray.errors import DatasetError
from dcgan_ray.storage.checkpoint import MANIFEST_FILE, save_checkpoint
from dcgan_ray.storage.checkpointer import Checkpointer
from dcgan_ray.storage.files import cache_dir
from dcgan_ray.storage.layout import RunLayout, split_manifest_key
from dcgan_ray.storage.runs import RunManifestError, merge_results, read_run_manifest
from helpers import make_config
from test_checkpoint import tiny_state


@pytest.fixture
def split(cfg, store, svhn_dir):
    store.check()
    return prepare_split(store, cfg, "test", from_=str(svhn_dir))


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("sha256", "/proc/self/environ", r"objects\[0\]\.sha256 is not a sha256 hex digest"),
        ("sha256", "../../outside", r"objects\[0\]\.sha256 is not a sha256 hex digest"),
        ("key", "dcgan-ray/data/other/test/images-000.u8", r"objects\[0\]\.key is not a key under .*/data/svhn/test/"),
        ("key", "PREFIX/../../secret", r"objects\[0\]\.key is not a key under"),
        ("bytes", 0, r"objects\[0\] has 0 bytes for \d+ images"),
        ("count", 10**12, r"objects\[0\]\.count is not an integer in \[1, 10000000\]"),
    ],
)
def test_a_planted_split_manifest_is_refused_naming_the_field(cfg, store, split, field, value, problem):
    manifest = json.loads(store.get_bytes(split_manifest_key(cfg, "test")))
    prefix = manifest["objects"][0]["key"].rsplit("/", 1)[0]
    manifest["objects"][0][field] = value.replace("PREFIX", prefix) if isinstance(value, str) else value
    store.put_bytes(split_manifest_key(cfg, "test"), json.dumps(manifest).encode())
    with pytest.raises(
        DatasetError,
        match=rf"s3://.*/manifest\.json is not a split manifest this code can use "
        rf"\({problem}.*\); run `dcgan-ray data prepare .* --split test --force`",
    ):
        load_split(store, cfg, "test")


def test_a_cached_file_of_the_right_size_but_other_bytes_is_fetched_again(cfg, store, split):
    obj = split["objects"][0]
    path = cached_object(store, obj)
    path.write_bytes(b"\0" * obj["bytes"])  # e.g. another process's garbage under the same name
    assert cached_object(store, obj).read_bytes() != b"\0" * obj["bytes"]
    assert cached_object(store, obj).parent == cache_dir("objects")


def test_a_short_cached_copy_is_an_error_not_uninitialised_images(cfg, store, split, monkeypatch):
    obj = split["objects"][0]
    real = cached_object(store, obj)
    short = real.with_name("short")
    short.write_bytes(real.read_bytes()[:-10])
    monkeypatch.setattr("dcgan_ray.data.svhn.cached_object", lambda store, o, node=None: short if o is obj else real)
    monkeypatch.setattr("dcgan_ray.data.svhn.read_split_manifest", lambda *a: split)
    with pytest.raises(DatasetError, match=r"the cached copy of s3://.* is shorter than its manifest says; delete"):
        load_split(store, cfg, "test")


@pytest.mark.parametrize(
    "body, problem",
    [
        (b"[1, 2]", "the manifest is not a mapping"),
        (b'{"history": "all of it"}', "history is not a list"),
        (b'{"epochs_completed": "7"}', r"epochs_completed is not an integer"),
        (b'{"checkpoints": {"latest": "s3://elsewhere/secret"}}', r"checkpoints\.latest is not in the run's folder"),
        (b"\xff\xfe", r"it is not JSON \(JSONDecodeError\)"),
    ],
)
def test_a_planted_run_json_is_refused_in_one_line(cfg, store, body, problem):
    layout = RunLayout.of(cfg)
    store.put_bytes(layout.manifest_key, body)
    with pytest.raises(
        RunManifestError,
        match=rf"s3://.*/run\.json is not a run manifest this code can use "
        rf"\({problem}.*\); move it away",
    ) as e:
        read_run_manifest(store, layout)
    assert "\n" not in str(e.value)


def test_a_checkpoint_manifest_that_lists_files_as_a_list_is_torn_and_skipped(cfg, store, tmp_path, caplog):
    layout = RunLayout.of(cfg)
    checkpointer = Checkpointer(store, layout, cfg.eval.metric)
    for epoch in (1, 2):
        save_checkpoint(tmp_path / f"e{epoch}", tiny_state(epoch))
        checkpointer.upload(tmp_path / f"e{epoch}", checkpointer.dir_name(epoch))
    newest = layout.checkpoint_dir_key("checkpoint_epoch_0002")
    store.put_bytes(
        f"{newest}/{MANIFEST_FILE}", json.dumps({"format": 1, "epoch": 2, "files": ["checkpoint.pt"]}).encode()
    )
    with caplog.at_level(logging.WARNING):
        state, uri = checkpointer.restore(f"{layout.bucket}/{newest}")
    assert state["epoch"] == 1 and uri.endswith("checkpoint_epoch_0001")
    assert any(
        "checkpoint_epoch_0002 is torn" in r.getMessage() and "files is not a mapping" in r.getMessage()
        for r in caplog.records
    )


def test_a_planted_scoring_result_is_left_out(cfg, store, caplog):
    layout = RunLayout.of(cfg)
    manifest = {"history": [{"epoch": 1}], "checkpoints": {}}
    store.put_bytes(layout.validation_key(1), b'{"epoch": 1, "metrics": {"digit_fd": "NaN please"}}')
    with caplog.at_level(logging.WARNING):
        assert merge_results(store, layout, manifest) == []
    assert "scored" not in manifest["history"][0]
    assert any("metrics.digit_fd is not a finite number" in r.getMessage() for r in caplog.records)


def test_eval_takes_only_the_models_shape_from_a_checkpoint(cfg, tmp_path):
    """A shared checkpoint must not decide where credentials go, what is written where, or where weights
    are fetched from: those come from --config (or the command line's URI and endpoint)."""
    hostile = make_config(
        "http://127.0.0.9:1",
        "elsewhere",
        name="theirs",
        model={"g_features": 16, "z_dim": 8},
        eval={
            "inception_weights": "http://127.0.0.9:1/steal.pth",
            "extractors": ["digit", "inception"],
            "metric": "fid",
        },
    )
    job = tmp_path / "mine.yaml"
    job.write_text(cfg.to_yaml())
    args = argparse.Namespace(
        config=str(job),
        endpoint=None,
        num_samples=64,
        extractors=None,
        checkpoint=f"s3://{cfg.storage.bucket}/{cfg.storage.prefix}/runs/theirs/best",
    )
    mine = _eval_config(args, cfg.storage, hostile)
    assert mine.storage == cfg.storage and mine.eval.inception_weights == cfg.eval.inception_weights
    assert (mine.model.g_features, mine.model.z_dim, mine.eval.num_samples) == (16, 8, 64)
    # Without --config: the URI's bucket and prefix, the command line's endpoint, the defaults' weights.
    bare = argparse.Namespace(
        config=None,
        endpoint=None,
        num_samples=None,
        extractors=None,
        checkpoint="s3://mybucket/team/a/runs/theirs/best",
    )
    mine = _eval_config(bare, StorageSection(endpoint="http://127.0.0.1:8333"), hostile)
    assert (mine.storage.endpoint, mine.storage.bucket, mine.storage.prefix) == (
        "http://127.0.0.1:8333",
        "mybucket",
        "team/a",
    )
    assert mine.eval.extractors == ["digit"] and "127.0.0.9" not in mine.eval.inception_weights


@pytest.mark.parametrize(
    "argv, error",
    [
        (["sample", "x.pt", "--n", "0"], r"argument --n: 0 is not in \[1, 4096\]"),
        (["sample", "x.pt", "--scale", "100"], r"argument --scale: 100 is not in \[1, 16\]"),
        (["eval", "x.pt", "--num-samples", "0"], r"argument --num-samples: 0 is not in \[2, 1000000\]"),
        (
            ["eval", "x.pt", "--endpoint", "localhost:9000"],
            r"argument --endpoint: 'localhost:9000' is not an http\(s\):// URL",
        ),
        (["data", "synth", "out.mat", "--n", "-1"], r"argument --n: -1 is not in \[1, 10000000\]"),
    ],
)
def test_bad_arguments_end_in_one_usage_error(argv, error, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(error, err), err


def test_a_mat_file_declaring_more_images_than_allowed_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "declared.mat"
    scipy.io.savemat(
        path, {"X": np.zeros((32, 32, 3, 5), np.uint8), "y": np.ones((5, 1), np.uint8)}, do_compression=True
    )
    assert read_mat(path)[0].shape == (5, 3, 32, 32)
    # The same check with a limit this file exceeds (a real one would need a file declaring 10 million images).
    monkeypatch.setattr(svhn, "MAX_IMAGES", 4)
    with pytest.raises(DatasetError, match=r"declared\.mat: X declares \(32, 32, 3, 5\), more than 4 images"):
        read_mat(path)


def test_a_planted_key_is_named_on_one_short_line():
    """A key of a bucket's JSON object named in an error (a metric, a trial): plain ones as they are, others
    quoted and cut short (hypothesis planted a trial named "\\n", which broke the error's one line)."""
    from dcgan_ray.storage.checks import member

    assert member("metrics", "digit_fd") == "metrics.digit_fd"
    assert member("trials", "a\nb") == "trials['a\\nb']"
    long = member("trials", "x\n" * 1000)
    assert "\n" not in long and len(long) < 100 and long.endswith("...']")
