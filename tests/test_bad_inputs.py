"""Bad input, tabled: every row of docs/errors.md's "Bad input" table, run through the CLI against the real
SeaweedFS server: one `error: ...` line that says what to do, exit code 2, no traceback, and the
bucket exactly as it was (nothing lost, nothing half-written). Only the two cluster-size rows need Ray.
"""

from __future__ import annotations

import http.server
import io
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import yaml

from dcgan_ray.cli import main as cli_main
from dcgan_ray.data.svhn import prepare_split
from dcgan_ray.data.synth import synth_svhn_mat
from dcgan_ray.dev.seaweed import SeaweedPorts
from dcgan_ray.quality.classifier import DigitClassifier, save_state
from dcgan_ray.storage.checkpoint import save_checkpoint
from dcgan_ray.storage.layout import classifier_key, split_manifest_key
from dcgan_ray.storage.s3 import Store
from helpers import BUCKET, REPO, make_config


@dataclass
class Ctx:
    """What a row needs to build its command: job files, data files, URIs on the test server."""

    endpoint: str
    tmp: Path
    not_s3: str  # an HTTP server on loopback that is not S3
    ray_address: str | None = None

    def job(self, prefix: str = "bad-inputs", text: str | None = None, **sections) -> str:
        """A job file: `text` as is, else a valid job on the test bucket under `prefix`, with `sections`."""
        path = self.tmp / f"job-{len(list(self.tmp.glob('job-*')))}.yaml"
        if text is None:
            data = make_config(self.endpoint, prefix, eval={"every_epochs": 0}).to_dict()
            for section, values in sections.items():
                if isinstance(values, dict):
                    data.setdefault(section, {}).update(values)
                else:
                    data[section] = values
            text = yaml.safe_dump(data, sort_keys=False)
        path.write_text(text)
        return str(path)

    def text(self, name: str, content: str) -> str:
        (self.tmp / name).write_text(content)
        return str(self.tmp / name)

    def mat(self, name: str, **variables) -> str:
        path = self.tmp / name
        scipy.io.savemat(path, variables)
        return str(path)

    def uri(self, key: str) -> str:
        return f"s3://{BUCKET}/{key}"


@dataclass
class Row:
    id: str
    bad_input: str  # docs/errors.md's words
    argv: Callable[[Ctx], list[str]]
    expect: str  # a regex the one error line must contain
    env: dict[str, str | None] = field(default_factory=dict)
    ray: bool = False


GOOD_X = np.zeros((32, 32, 3, 5), np.uint8)
GOOD_Y = np.ones((5, 1), np.uint8)

ROWS = [
    # YAML
    Row(
        "yaml-syntax",
        "a job file that is not YAML",
        lambda c: ["train", c.job(text="train: {epochs: 2\n")],
        r"job-\d+\.yaml: not valid YAML",
    ),
    Row(
        "yaml-not-a-mapping",
        "a job file that is a list",
        lambda c: ["train", c.job(text="- train\n")],
        r"`the top level` must be a mapping",
    ),
    Row(
        "yaml-unknown-key",
        "a misspelt key",
        lambda c: ["train", c.job(text="train:\n  learning_rate: 0.1\n")],
        r"unknown key `train.learning_rate`; allowed here: batch_size, beta1",
    ),
    Row(
        "yaml-moved-key",
        "a key of an earlier version",
        lambda c: ["train", c.job(text="tune:\n  metric: fid\n")],
        r"`tune.metric` is now `eval.metric`; rename it",
    ),
    Row(
        "yaml-wrong-type",
        "a word where a number belongs",
        lambda c: ["train", c.job(text="train:\n  epochs: two\n")],
        r"`train.epochs` must be int, got 'two' \(str\)",
    ),
    Row(
        "yaml-out-of-range",
        "a value out of range",
        lambda c: ["train", c.job(text="train:\n  batch_size: 1\n")],
        r"`train.batch_size` = 1 is not allowed; expected an integer >= 2 \(BatchNorm needs two images\)",
    ),
    Row(
        "yaml-metric-without-extractor",
        "a metric whose feature extractor is off",
        lambda c: ["train", c.job(text="eval:\n  metric: fid\n")],
        r"`eval.metric` = 'fid' needs 'inception' in `eval.extractors`",
    ),
    Row(
        "job-file-missing",
        "a job file that does not exist",
        lambda c: ["train", str(c.tmp / "nope.yaml")],
        r"job file .*nope.yaml does not exist \(the examples live in jobs/\)",
    ),
    # overrides
    Row(
        "override-no-equals",
        "`--set` without `=`",
        lambda c: ["train", c.job(), "--set", "train.epochs"],
        r"override 'train.epochs' must look like key=value",
    ),
    Row(
        "override-not-yaml",
        "`--set` with a value that is not YAML",
        lambda c: ["train", c.job(), "--set", "train.epochs=[1"],
        r"the value is not valid YAML",
    ),
    Row(
        "override-into-a-value",
        "`--set` below a plain value",
        lambda c: ["train", c.job(), "--set", "name.first=x"],
        r"override 'name.first=x': `name.first`: `name` is not a section",
    ),
    Row(
        "override-unknown-key",
        "`--set` of a misspelt key",
        lambda c: ["train", c.job(), "--set", "train.lrr=0.1"],
        r"\(with --set train.lrr=0.1\): unknown key `train.lrr`",
    ),
    # data files
    Row(
        "from-missing-file",
        "`--from` a file that does not exist",
        lambda c: ["data", "prepare", c.job("bad-inputs-new"), "--split", "train", "--from", str(c.tmp / "none.mat")],
        r"--from .*none.mat: no such file",
    ),
    Row(
        "from-not-a-mat",
        "`--from` a file that is not a .mat",
        lambda c: [
            "data",
            "prepare",
            c.job("bad-inputs-new"),
            "--split",
            "train",
            "--from",
            c.text("notes.mat", "hello"),
        ],
        r"is not a readable MATLAB .mat file",
    ),
    Row(
        "mat-float-pixels",
        "a .mat whose pixels are floats",
        lambda c: [
            "data",
            "prepare",
            c.job("bad-inputs-new"),
            "--split",
            "train",
            "--from",
            c.mat("float.mat", X=GOOD_X.astype(np.float64), y=GOOD_Y),
        ],
        r"X is float64 \(32, 32, 3, 5\); SVHN's format 2 needs uint8 \(32, 32, 3, N\)",
    ),
    Row(
        "mat-no-labels",
        "a .mat without labels",
        lambda c: [
            "data",
            "prepare",
            c.job("bad-inputs-new"),
            "--split",
            "train",
            "--from",
            c.mat("nolabels.mat", X=GOOD_X),
        ],
        r"has no variable 'y'",
    ),
    Row(
        "mat-labels-out-of-range",
        "a .mat with labels outside 1..10",
        lambda c: [
            "data",
            "prepare",
            c.job("bad-inputs-new"),
            "--split",
            "train",
            "--from",
            c.mat("labels.mat", X=GOOD_X, y=np.array([[0], [1], [2], [3], [11]], np.uint8)),
        ],
        r"labels span 0\.\.11; SVHN's are 1\.\.10",
    ),
    Row(
        "mat-count-mismatch",
        "a .mat with fewer labels than images",
        lambda c: [
            "data",
            "prepare",
            c.job("bad-inputs-new"),
            "--split",
            "train",
            "--from",
            c.mat("count.mat", X=GOOD_X, y=GOOD_Y[:3]),
        ],
        r"y has shape \(3, 1\) but X holds 5 images",
    ),
    Row(
        "from-one-file-two-splits",
        "one `--from` file for two splits",
        lambda c: [
            "data",
            "prepare",
            c.job("bad-inputs-new"),
            "--split",
            "train",
            "--split",
            "test",
            "--from",
            c.mat("one.mat", X=GOOD_X, y=GOOD_Y),
        ],
        r"is one file but 2 splits were asked for",
    ),
    Row(
        "from-url-404",
        "`--from` a URL that answers 404",
        lambda c: [
            "data",
            "prepare",
            c.job("bad-inputs-new"),
            "--split",
            "train",
            "--from",
            f"{c.not_s3}/train_32x32.mat",
        ],
        r"cannot download http://127\.0\.0\.1:\d+/train_32x32.mat: HTTP 404",
    ),
    Row(
        "other-source-without-force",
        "a different file for a split already in the bucket",
        lambda c: ["data", "prepare", c.job(), "--split", "train", "--from", str(c.tmp / "other_train.mat")],
        r"the train split in s3://.* came from .*, not from .*other_train.mat \(their sha256 differ\); add --force",
    ),
    Row(
        "split-manifest-not-json",
        "a split manifest that is not JSON",
        lambda c: ["train", c.job("bad-inputs-badmanifest")],
        r"manifest.json is not a split manifest this code can use \(it is not JSON \(JSONDecodeError\)\); "
        r"run `dcgan-ray data prepare .*job-\d+.yaml --split train --force`",
    ),
    # URIs and checkpoints
    Row(
        "uri-without-bucket",
        "an s3:// URI without a bucket",
        lambda c: ["sample", "s3:///runs/x", "--endpoint", c.endpoint],
        r"'s3:///runs/x' names no bucket \(expected s3://BUCKET/KEY\)",
    ),
    Row(
        "uri-nothing-there",
        "a checkpoint URI with nothing there",
        lambda c: ["sample", c.uri("bad-inputs/runs/never"), "--endpoint", c.endpoint],
        r"no checkpoint at s3://.*/bad-inputs/runs/never on http://127\.0\.0\.1:\d+: give the URI of a checkpoint.pt",
    ),
    Row(
        "checkpoint-truncated",
        "a truncated checkpoint file",
        lambda c: ["sample", str(c.tmp / "truncated.pt")],
        r"checkpoint .*truncated.pt is damaged or truncated and cannot be read",
    ),
    Row(
        "checkpoint-not-ours",
        "a torch file that is not a checkpoint",
        lambda c: ["eval", str(c.tmp / "other.pt")],
        r"checkpoint .*other.pt lacks format, netG, netD, .*: not a dcgan-ray checkpoint",
    ),
    Row(
        "checkpoint-torn",
        "a checkpoint folder whose upload was cut (no manifest)",
        lambda c: ["sample", c.uri("bad-inputs/runs/torn/checkpoint_epoch_0001"), "--endpoint", c.endpoint],
        r"checkpoint s3://.*/checkpoint_epoch_0001 is torn \(its upload was cut or it was changed since\): "
        r"it has no manifest.json",
    ),
    # credentials, endpoints, buckets
    Row(
        "wrong-secret",
        "a wrong AWS_SECRET_ACCESS_KEY",
        lambda c: ["train", c.job()],
        r"rejected the credentials \(AWS_ACCESS_KEY_ID=dcga\.\.\.\) while trying to open bucket 'dcgan-test' "
        r"\(SignatureDoesNotMatch\)",
        env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
    ),
    Row(
        "unknown-key-id",
        "an unknown AWS_ACCESS_KEY_ID",
        lambda c: ["data", "prepare", c.job()],
        r"rejected the credentials \(AWS_ACCESS_KEY_ID=nobo\.\.\.\)",
        env={"AWS_ACCESS_KEY_ID": "nobody"},
    ),
    Row(
        "no-credentials",
        "no credentials at all",
        lambda c: ["train", c.job()],
        r"no S3 credentials found for .*: none of the three ways is set up\. Give this process and every Ray node "
        r"one of them: static keys \(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        env={
            "AWS_ACCESS_KEY_ID": None,
            "AWS_SECRET_ACCESS_KEY": None,
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true",
        },
    ),
    Row(
        "endpoint-unreachable",
        "an endpoint where nothing listens",
        lambda c: ["train", c.job(storage={"endpoint": f"http://127.0.0.1:{SeaweedPorts.free().s3}"})],
        r"cannot reach the S3 endpoint http://127\.0\.0\.1:\d+ \(tried 3 times\) while trying to open bucket",
    ),
    Row(
        "endpoint-not-a-url",
        "an endpoint without http://",
        lambda c: ["train", c.job(text="storage:\n  endpoint: 127.0.0.1:8333\n")],
        r"`storage.endpoint` = '127.0.0.1:8333' is not allowed; expected null \(AWS\) or an http\(s\):// URL",
    ),
    Row(
        "endpoint-not-s3",
        "an endpoint that is some other web server",
        lambda c: ["train", c.job(storage={"endpoint": c.not_s3})],
        r"storage.endpoint http://127\.0\.0\.1:\d+ is not an S3 endpoint: listing bucket 'dcgan-test' got HTTP 404",
    ),
    Row(
        "bucket-missing",
        "a bucket that does not exist",
        lambda c: ["train", c.job(storage={"bucket": "no-such-bucket"})],
        r"bucket 'no-such-bucket' does not exist on .*: create it .* or set storage.create_bucket: true",
    ),
    Row(
        "bucket-bad-name",
        "a bucket name S3 does not allow",
        lambda c: ["train", c.job(text="storage:\n  bucket: My_Bucket\n")],
        r"`storage.bucket` = 'My_Bucket' is not allowed; expected an S3 bucket name",
    ),
    # what a run needs in the bucket
    Row(
        "train-without-data",
        "training before `data prepare`",
        lambda c: ["train", c.job("bad-inputs-empty")],
        r"the train split of svhn is not in s3://.*/bad-inputs-empty/data/svhn/train on .*; put it there with: "
        r"dcgan-ray data prepare .*job-\d+.yaml --split train",
    ),
    Row(
        "train-without-classifier",
        "evaluation without the digit classifier",
        lambda c: ["train", c.job("bad-inputs-noclf", eval={"every_epochs": 1})],
        r"no digit classifier at s3://.*: train one with `dcgan-ray classifier train .*job-\d+.yaml`",
    ),
    Row(
        "train-weak-classifier",
        "a digit classifier near chance",
        lambda c: ["train", c.job(eval={"every_epochs": 1})],
        r"has test accuracy 0\.100 on 400 images, below eval.min_classifier_accuracy=0\.9: .* "
        r"`dcgan-ray classifier train .*job-\d+.yaml --set classifier.min_steps=2000`",
    ),
    Row(
        "train-too-few-images",
        "fewer images than one batch",
        lambda c: ["train", c.job(data={"max_images": 8})],
        r"8 images cannot fill one batch of train.batch_size=16 on each of scaling.num_workers=1 workers",
    ),
    # cluster sizes
    Row(
        "zero-workers",
        "no workers",
        lambda c: ["train", c.job(scaling={"num_workers": 0})],
        r"`scaling.num_workers` = 0 is not allowed; expected an integer >= 1",
    ),
    Row(
        "more-workers-than-cpus",
        "more workers than the cluster has CPUs",
        lambda c: ["train", c.job(scaling={"num_workers": 64}), "--address", c.ray_address],
        r"the job needs 64 worker\(s\) x 1 CPU = 64 CPU, but the cluster has 4 CPU; lower scaling.num_workers",
        ray=True,
    ),
    Row(
        "gpus-on-a-cpu-cluster",
        "GPU workers on a cluster without GPUs",
        lambda c: ["train", c.job(scaling={"use_gpu": True}), "--address", c.ray_address],
        r"the job needs 1 worker\(s\) x 1 CPU, 1 GPU = 1 CPU, 1 GPU, but the cluster has 4 CPU, 0 GPU; .*"
        r"\(or set scaling.use_gpu=false\)",
        ray=True,
    ),
    # search spaces
    Row(
        "space-unknown-key",
        "a search over a key that does not exist",
        lambda c: ["tune", c.job(tune={"space": {"train.lrr": {"grid": [1]}}})],
        r"`tune.space` searches `train.lrr`, which is not a job setting",
    ),
    Row(
        "space-bad-form",
        "a search form that does not exist",
        lambda c: ["tune", c.job(tune={"space": {"train.lr": {"range": [1, 2]}}})],
        r"`tune.space.train.lr` must be one of \{grid: ...\}, \{choice: ...\}",
    ),
    Row(
        "space-value-not-allowed",
        "a searched value the key does not allow",
        lambda c: ["tune", c.job(tune={"space": {"train.beta1": {"grid": [0.5, 1.5]}}})],
        r"\(tune.space.train.beta1 = 1.5\): `train.beta1` = 1.5 is not allowed",
    ),
    Row(
        "space-loguniform-zero",
        "a log-uniform range from 0",
        lambda c: ["tune", c.job(tune={"space": {"train.lr": {"loguniform": [0, 0.1]}}})],
        r"`tune.space.train.lr.loguniform` needs low > 0",
    ),
    Row(
        "space-empty",
        "a study with nothing to search",
        lambda c: ["tune", c.job()],
        r"`tune.space` is empty; name at least one setting to vary",
    ),
    Row(
        "study-without-evaluation",
        "a study with evaluation off",
        lambda c: ["tune", c.job(tune={"space": {"train.lr": {"grid": [0.001]}}})],
        r"a study ranks trials by `eval.metric`; set eval.every_epochs >= 1",
    ),
    # classifier
    Row(
        "classifier-too-few-images",
        "a classifier split smaller than one batch",
        lambda c: ["classifier", "train", c.job(classifier={"max_images": 10})],
        r"10 train images cannot fill one batch of classifier.batch_size=64; lower it or use more data",
    ),
    Row(
        "classifier-test-split-missing",
        "a classifier test split that was never prepared",
        lambda c: ["classifier", "train", c.job(classifier={"test_split": "extra"})],
        r"the extra split of svhn is not in .*; put it there with: "
        r"dcgan-ray data prepare .*job-\d+.yaml --split extra",
    ),
    Row(
        "min-accuracy-out-of-range",
        "a minimum accuracy above 1",
        lambda c: ["train", c.job(eval={"min_classifier_accuracy": 90})],
        r"`eval.min_classifier_accuracy` = 90.0 is not allowed; expected a number in \[0, 1\]",
    ),
]


class NotS3(http.server.BaseHTTPRequestHandler):
    """A web server that is not S3: 404 for everything."""

    def do_GET(self):
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html>not here</html>")

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def ctx(s3_server, svhn_dir, tmp_path_factory):
    """Data in the bucket as the rows need it, a classifier near chance, a torn checkpoint, local files."""
    tmp = tmp_path_factory.mktemp("bad-inputs")
    server = http.server.HTTPServer(("127.0.0.1", 0), NotS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    c = Ctx(s3_server.endpoint, tmp, f"http://127.0.0.1:{server.server_port}")
    for prefix in ("bad-inputs", "bad-inputs-noclf", "bad-inputs-badmanifest"):
        cfg = make_config(s3_server.endpoint, prefix)
        store = Store(cfg.storage)
        for split in ("train", "test"):
            prepare_split(store, cfg, split, from_=str(svhn_dir))
    Store(cfg.storage).put_bytes(split_manifest_key(cfg, "train"), b"{not json")
    cfg = make_config(s3_server.endpoint, "bad-inputs")
    weak = io.BytesIO()
    torch.save({"model": save_state(DigitClassifier()), "meta": {"test_accuracy": 0.1, "test_images": 400}}, weak)
    Store(cfg.storage).put_bytes(classifier_key(cfg), weak.getvalue())
    torn = tmp / "torn"
    save_checkpoint(
        torn,
        {
            "netG": {},
            "netD": {},
            "optG": {},
            "optD": {},
            "epoch": 1,
            "step": 1,
            "fixed_noise": torch.zeros(1),
            "config": cfg.to_dict(),
        },
    )
    Store(cfg.storage).upload_file(torn / "checkpoint.pt", "bad-inputs/runs/torn/checkpoint_epoch_0001/checkpoint.pt")
    (tmp / "truncated.pt").write_bytes((torn / "checkpoint.pt").read_bytes()[:3000])
    torch.save({"weights": torch.zeros(2)}, tmp / "other.pt")
    synth_svhn_mat(tmp / "other_train.mat", 20, seed=9)
    yield c
    server.shutdown()


def bucket_listing(endpoint: str) -> dict:
    """Every bucket, and every object of the test bucket with its size and ETag."""
    client = Store(make_config(endpoint, "x").storage).client
    buckets = sorted(b["Name"] for b in client.list_buckets()["Buckets"])
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        objects.update({o["Key"]: (o["Size"], o["ETag"]) for o in page.get("Contents", [])})
    return {"buckets": buckets, "objects": objects}


def run_row(row: Row, c: Ctx, monkeypatch, capsys) -> str:
    for name, value in row.env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    argv = row.argv(c)
    capsys.readouterr()
    assert cli_main(argv) == 2
    return capsys.readouterr().err


def the_error_line(stderr: str) -> str:
    """The one `error:` line, which must also be the last thing printed."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.rstrip().splitlines()[-1] == errors[0], stderr
    assert "Traceback" not in stderr
    return errors[0]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, ctx, s3_server, monkeypatch, capsys, request):
    if row.ray:
        ctx.ray_address = request.getfixturevalue("ray_head").address
    before = bucket_listing(s3_server.endpoint)
    line = the_error_line(run_row(row, ctx, monkeypatch, capsys))
    assert re.search(row.expect, line), line
    assert "{config}" not in line and "dcgan_ray.errors" not in line
    monkeypatch.undo()  # (the listing needs the real credentials back)
    assert bucket_listing(s3_server.endpoint) == before


@pytest.mark.parametrize("row_id", ["yaml-unknown-key", "wrong-secret", "train-weak-classifier"])
def test_bad_input_through_the_real_cli(row_id, ctx):
    """The same rows as a user runs them: a process, its exit code and its stderr."""
    row = next(r for r in ROWS if r.id == row_id)
    env = {k: v for k, v in {**os.environ, **row.env}.items() if v is not None}
    result = subprocess.run(
        [sys.executable, "-m", "dcgan_ray", *row.argv(ctx)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 2
    assert re.search(row.expect, the_error_line(result.stderr))


def test_the_readme_tables_every_row():
    readme = (REPO / "docs" / "errors.md").read_text()
    table = readme[readme.index("## Bad input, and what you see") :]
    ids = re.findall(r"^\| `([a-z0-9-]+)` \|", table, flags=re.M)
    assert ids == [r.id for r in ROWS] and len(ids) >= 25
