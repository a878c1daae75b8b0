import hashlib
import os
import re
import time

import pytest

from dcgan_ray.dev.seaweed import SeaweedPorts, ephemeral_ports
from dcgan_ray.errors import BucketMissing, ObjectMissing, StorageAuthError, StorageUnreachable
from dcgan_ray.storage.layout import RunLayout, classifier_key, split_manifest_key, study_state_key
from dcgan_ray.storage.s3 import TRANSFER, Store, parse_s3_uri
from helpers import BUCKET, TEST_SECRET, make_config


def test_round_trip(store):
    store.check()
    store.put_bytes("x/a.bin", b"hello")
    assert store.get_bytes("x/a.bin") == b"hello"
    assert store.exists("x/a.bin") and not store.exists("x/b.bin")
    assert store.list_keys("x/") == ["x/a.bin"]
    with pytest.raises(ObjectMissing, match=r"s3://dcgan-test/x/b\.bin does not exist"):
        store.get_bytes("x/b.bin")


def test_unreachable_endpoint_is_bounded_and_named():
    port = SeaweedPorts.free().s3  # nothing listens there
    store = Store(make_config(f"http://127.0.0.1:{port}", "p").storage)
    start = time.monotonic()
    with pytest.raises(
        StorageUnreachable, match=rf"cannot reach the S3 endpoint http://127.0.0.1:{port} \(tried 3 times\)"
    ):
        store.check()
    assert time.monotonic() - start < 30


def test_wrong_credentials_never_show_the_secret(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    store = Store(make_config(s3_server.endpoint, "p").storage)
    with pytest.raises(StorageAuthError, match="rejected the credentials") as info:
        store.check()
    with pytest.raises(StorageAuthError) as info2:
        store.get_bytes("anything")
    for e in (info, info2):
        assert "wrong-secret-value" not in str(e.value) and TEST_SECRET not in str(e.value)


def test_missing_credentials(s3_server, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageAuthError, match="no S3 credentials found.*AWS_ACCESS_KEY_ID"):
        Store(make_config(s3_server.endpoint, "p").storage).check()


def test_missing_bucket_is_an_error_unless_creation_is_asked(s3_server, prefix):
    name = f"nb-{prefix}".lower()
    cfg = make_config(s3_server.endpoint, "p", storage={"bucket": name})
    with pytest.raises(BucketMissing, match=rf"bucket '{name}' does not exist.*storage.create_bucket"):
        Store(cfg.storage).check()
    cfg.storage.create_bucket = True
    Store(cfg.storage).check()
    Store(cfg.storage).put_bytes("k", b"v")  # it exists now
    cfg.storage.create_bucket = False
    Store(cfg.storage).check()


def test_multipart_upload_and_download(store, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(70 * 2**20))  # above the 64 MiB multipart threshold
    store.upload_file(big, "big/obj")
    # A multipart object's ETag is the md5 of its parts' md5s, a dash and their count (parts of TRANSFER's size).
    chunk = TRANSFER.multipart_chunksize
    data = big.read_bytes()
    parts = [hashlib.md5(data[i : i + chunk]).digest() for i in range(0, len(data), chunk)]
    assert len(parts) >= 2
    assert store.head("big/obj")["ETag"] == f'"{hashlib.md5(b"".join(parts)).hexdigest()}-{len(parts)}"'
    out = tmp_path / "back.bin"
    store.download_file("big/obj", out)
    assert out.read_bytes() == big.read_bytes()


def test_parse_s3_uri():
    assert parse_s3_uri("s3://b/k/x") == ("b", "k/x")
    assert parse_s3_uri(f"s3://{BUCKET}") == (BUCKET, "")


def outage_lines(caplog):
    text = [r.getMessage() for r in caplog.records if r.name == "dcgan_ray.storage.s3"]
    return [t for t in text if "is not answering" in t], [t for t in text if "answers again" in t]


def test_an_outage_is_waited_out_and_logged_once(private_s3, prefix, caplog):
    """The server stopped for 8 s under a reader and a writer: both carry on, one line at each end."""
    import threading

    store = Store(make_config(private_s3.endpoint, prefix, storage={"retry_budget_s": 60}).storage)
    store.put_bytes(f"{prefix}/before", b"kept")
    private_s3.stop()
    restart = threading.Timer(8.0, private_s3.start)
    restart.start()
    start = time.monotonic()
    try:
        assert store.get_bytes(f"{prefix}/before") == b"kept"
        store.put_bytes(f"{prefix}/during", b"written")
    finally:
        restart.join()
    assert 6 < time.monotonic() - start < 40
    assert store.get_bytes(f"{prefix}/during") == b"written"
    started, ended = outage_lines(caplog)
    assert len(started) == 1 and len(ended) == 1, started + ended
    assert "while trying to read s3://" in started[0]
    assert "retrying for up to 60 s (storage.retry_budget_s)" in started[0]
    assert re.search(r"answers again after \d+\.\d s \(\d+ retries\)", ended[0])


def test_an_outage_past_the_budget_is_one_clear_error(private_s3, prefix, caplog):
    store = Store(make_config(private_s3.endpoint, prefix, storage={"retry_budget_s": 3}).storage)
    store.put_bytes(f"{prefix}/x", b"1")
    private_s3.stop()
    try:
        start = time.monotonic()
        with pytest.raises(
            StorageUnreachable,
            match=r"did not answer for [34] s \(storage.retry_budget_s = 3\) "
            r"while trying to read s3://dcgan-test/.*/x.*run the command again",
        ):
            store.get_bytes(f"{prefix}/x")
        assert time.monotonic() - start < 15
    finally:
        private_s3.start()
    assert store.get_bytes(f"{prefix}/x") == b"1"  # and the outage ends with its line
    started, ended = outage_lines(caplog)
    assert len(started) == 1 and len(ended) == 1


def test_errors_retrying_cannot_fix_fail_at_once(store, monkeypatch, caplog):
    store.check()
    start = time.monotonic()
    with pytest.raises(ObjectMissing):
        store.get_bytes("no/such/key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    with pytest.raises(StorageAuthError):
        Store(store.cfg).put_bytes("x/y", b"1")
    assert time.monotonic() - start < 5
    assert outage_lines(caplog) == ([], [])


def test_ray_trains_filesystem_keeps_its_retries_when_pickled(cfg):
    import pickle

    from dcgan_ray.storage.arrowfs import ArrowS3FileSystem, arrow_attempts

    fs = pickle.loads(pickle.dumps(ArrowS3FileSystem(cfg.storage)))
    assert isinstance(fs, ArrowS3FileSystem) and fs == ArrowS3FileSystem(cfg.storage)
    assert fs.storage.retry_budget_s == cfg.storage.retry_budget_s
    assert arrow_attempts(300) >= 16 and arrow_attempts(1) <= 3


def test_anonymous_and_wrong_key_access_are_refused(store, monkeypatch):
    import urllib.error
    import urllib.request

    store.check()
    store.put_bytes("private/obj", b"not for everyone")
    # An unsigned request (no credentials at all) is refused by the server, not served.
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{store.cfg.endpoint}/{BUCKET}/private/obj", timeout=10)
    assert info.value.code == 403
    # An unknown access key id: one clear line naming the key's start, never a secret.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrongkeyid")
    with pytest.raises(StorageAuthError, match=r"rejected the credentials \(AWS_ACCESS_KEY_ID=wron\.\.\.\)") as e:
        Store(store.cfg).get_bytes("private/obj")
    assert TEST_SECRET not in str(e.value)


def test_the_layout_of_a_run_and_a_study():
    # The bucket's layout is the contract between training, studies, `dcgan-ray runs` and TensorBoard: pinned.
    cfg = make_config("http://127.0.0.1:1", "team/dcgan", name="r1")
    layout = RunLayout.of(cfg)
    assert (layout.uri, layout.runs_uri) == (f"s3://{BUCKET}/team/dcgan/runs/r1", f"s3://{BUCKET}/team/dcgan/runs")
    assert [
        layout.manifest_key,
        layout.config_key,
        layout.sample_key(3),
        layout.latest_sample_key,
        layout.gif_key,
        layout.best_key,
        layout.validation_key(2),
        layout.report_key,
        layout.checkpoint_dir_key("c"),
    ] == [
        "team/dcgan/runs/r1/run.json",
        "team/dcgan/runs/r1/config.yaml",
        "team/dcgan/runs/r1/samples/epoch_0003.png",
        "team/dcgan/runs/r1/samples/latest.png",
        "team/dcgan/runs/r1/samples/progress.gif",
        "team/dcgan/runs/r1/best/checkpoint.pt",
        "team/dcgan/runs/r1/validations/epoch_0002.json",
        "team/dcgan/runs/r1/report/index.html",
        "team/dcgan/runs/r1/c",
    ]
    assert split_manifest_key(cfg, "test") == "team/dcgan/data/svhn/test/manifest.json"
    assert classifier_key(cfg) == "team/dcgan/models/classifier-svhn.pt"
    assert study_state_key(cfg) == "team/dcgan/studies/r1-study/state.json"
    elsewhere = make_config("http://127.0.0.1:1", "team/dcgan", name="t-1", storage={"runs_prefix": "team/s/trials"})
    assert RunLayout.of(elsewhere).prefix == "team/s/trials/t-1"
    assert RunLayout.of(elsewhere).runs_uri == f"s3://{BUCKET}/team/s/trials"


def test_test_servers_ports_are_never_an_outgoing_connections_local_port():
    """A server stopped for an outage must be able to start again on its ports: none of them may be in the
    range the kernel gives outgoing connections, nor among Ray's worker ports."""
    low, _ = ephemeral_ports()
    for _ in range(50):
        assert all(20000 <= port < low for port in SeaweedPorts.free().all())
