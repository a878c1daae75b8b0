import os
import time

import pytest

from conftest import BUCKET, TEST_SECRET, make_config
from dcgan_ray.dev.seaweed import SeaweedPorts
from dcgan_ray.errors import BucketMissing, ObjectMissing, StorageAuthError, StorageUnreachable
from dcgan_ray.storage.s3 import Store, parse_s3_uri


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
    with pytest.raises(StorageUnreachable, match=rf"cannot reach the S3 endpoint http://127.0.0.1:{port} \(tried 3 times\)"):
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
    out = tmp_path / "back.bin"
    store.download_file("big/obj", out)
    assert out.read_bytes() == big.read_bytes()


def test_parse_s3_uri():
    assert parse_s3_uri("s3://b/k/x") == ("b", "k/x")
    assert parse_s3_uri(f"s3://{BUCKET}") == (BUCKET, "")
