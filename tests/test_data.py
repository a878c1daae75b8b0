import http.server
import threading
from urllib.parse import urlsplit

import numpy as np
import pytest
import scipy.io

from dcgan_ray.data.svhn import OFFICIAL, fetch, load_split, prepare_split, read_mat, read_split_manifest
from dcgan_ray.errors import DatasetError, DatasetMissing
from dcgan_ray.storage.layout import split_prefix


@pytest.fixture
def node_cache(tmp_path, monkeypatch):
    """A fresh per-node cache (what DCGAN_RAY_CACHE points a node's workers at)."""
    monkeypatch.setenv("DCGAN_RAY_CACHE", str(tmp_path / "node-cache"))
    return tmp_path / "node-cache" / "objects"


def test_round_trip_prepare_then_read(store, cfg, svhn_dir, node_cache):
    store.check()
    manifest = prepare_split(store, cfg, "train", from_=str(svhn_dir))
    images, labels = read_mat(svhn_dir / "train_32x32.mat")
    assert manifest["count"] == 1200 == len(images)
    assert manifest["label_histogram"] == {str(d): int((labels == d).sum()) for d in range(10)}
    assert manifest["source"]["sha256"] and manifest["source"]["official"] is False
    data = load_split(store, cfg, "train")
    assert data.images.shape == (1200, 3, 32, 32) and data.images.dtype == np.uint8
    assert np.array_equal(data.images, images) and np.array_equal(data.labels, labels)
    # the layout is SVHN's X[:, :, :, i] transposed to CHW
    raw = scipy.io.loadmat(svhn_dir / "train_32x32.mat")
    assert np.array_equal(data.images[7], raw["X"][:, :, :, 7].transpose(2, 0, 1))
    assert raw["y"][7, 0] % 10 == data.labels[7]


def test_shards_and_partial_read(store, cfg, svhn_dir, node_cache):
    cfg.data.shard_images = 500
    manifest = prepare_split(store, cfg, "train", from_=str(svhn_dir))
    assert [o["count"] for o in manifest["objects"]] == [500, 500, 200]
    first = load_split(store, cfg, "train", max_images=400)
    # 400 images lie in the first shard: only it (and the labels) reach the node's cache
    assert len([p for p in node_cache.iterdir() if not p.name.endswith(".lock")]) == 2
    full = load_split(store, cfg, "train")
    assert np.array_equal(full.images, read_mat(svhn_dir / "train_32x32.mat")[0])
    assert np.array_equal(first.images, full.images[:400]) and np.array_equal(first.labels, full.labels[:400])
    assert len(load_split(store, cfg, "train", max_images=700).images) == 700  # across a shard boundary


def test_prepare_is_idempotent(store, cfg, svhn_dir):
    sent = []  # every request the store sends (each client it makes copies the handlers of its session)
    store.session.events.register(
        "before-send.s3", lambda request, **_: sent.append((request.method, urlsplit(request.url).path))
    )
    prepare_split(store, cfg, "train", from_=str(svhn_dir))
    keys = store.list_keys(split_prefix(cfg, "train"))
    assert {path for method, path in sent if method == "PUT"} == {f"/{store.bucket}/{k}" for k in keys}  # all seen
    before = {k: store.head(k)["ETag"] for k in keys}
    sent.clear()
    prepare_split(store, cfg, "train", from_=str(svhn_dir))
    # Not one write, not even of the same bytes (which would leave the ETags, and within a second the times, alone).
    assert [(method, path) for method, path in sent if method not in ("GET", "HEAD")] == []
    assert {k: store.head(k)["ETag"] for k in store.list_keys(split_prefix(cfg, "train"))} == before


def test_other_data_needs_force_and_force_replaces(store, cfg, svhn_dir, tmp_path):
    prepare_split(store, cfg, "train", from_=str(svhn_dir))
    other = svhn_dir / "test_32x32.mat"
    with pytest.raises(DatasetError, match="add --force to replace it"):
        prepare_split(store, cfg, "train", from_=str(other))
    manifest = prepare_split(store, cfg, "train", from_=str(other), force=True)
    assert manifest["count"] == 400
    keys = store.list_keys(split_prefix(cfg, "train"))
    assert len([k for k in keys if "/images-" in k]) == 1  # the old shards are gone, after the swap


def test_failed_prepare_keeps_existing_split(store, cfg, svhn_dir, tmp_path, node_cache):
    prepare_split(store, cfg, "train", from_=str(svhn_dir))
    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"not a mat file at all")
    with pytest.raises(DatasetError, match="not a readable MATLAB .mat file"):
        prepare_split(store, cfg, "train", from_=str(bad), force=True)
    assert load_split(store, cfg, "train").images.shape[0] == 1200


def test_dataset_missing_names_prepare_command(store, cfg):
    with pytest.raises(DatasetMissing, match=r"dcgan-ray data prepare \{config\} --split test") as e:
        read_split_manifest(store, cfg, "test")
    # The CLI names the job file the user gave.
    assert "dcgan-ray data prepare jobs/mine.yaml --split test" in e.value.for_job("jobs/mine.yaml")


def test_corrupt_object_in_bucket_is_detected(store, cfg, svhn_dir, node_cache):
    manifest = prepare_split(store, cfg, "train", from_=str(svhn_dir))
    key = manifest["objects"][0]["key"]
    data = bytearray(store.get_bytes(key))
    data[100] ^= 0xFF
    store.put_bytes(key, bytes(data))
    with pytest.raises(DatasetError, match="is corrupt: sha256"):
        load_split(store, cfg, "train")
    assert not [p for p in node_cache.iterdir() if p.name.endswith(".part")]


@pytest.mark.parametrize(
    "X, y, message",
    [
        (
            np.zeros((32, 32, 3, 4), np.float32),
            np.ones((4, 1), np.uint8),
            r"X is float32 .* needs uint8 \(32, 32, 3, N\)",
        ),
        (np.zeros((28, 28, 3, 4), np.uint8), np.ones((4, 1), np.uint8), r"X is uint8 \(28, 28, 3, 4\)"),
        (np.zeros((32, 32, 3, 4), np.uint8), np.ones((5, 1), np.uint8), r"y has shape \(5, 1\) but X holds 4 images"),
        (np.zeros((32, 32, 3, 4), np.uint8), np.zeros((4, 1), np.uint8), r"labels span 0\.\.0; SVHN's are 1\.\.10"),
        (np.zeros((32, 32, 3, 4), np.uint8), np.full((4, 1), 11, np.uint8), r"labels span 11\.\.11"),
    ],
)
def test_misshaped_mat_files(tmp_path, X, y, message):
    path = tmp_path / "x.mat"
    scipy.io.savemat(path, {"X": X, "y": y})
    with pytest.raises(DatasetError, match=message):
        read_mat(path)


def test_mat_without_y(tmp_path):
    path = tmp_path / "x.mat"
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(DatasetError, match="has no variable 'y'"):
        read_mat(path)


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""
    claimed_length = None

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(self.claimed_length or len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_source():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_official_download_with_wrong_md5_leaves_nothing(http_source, tmp_path, svhn_dir):
    server, url = http_source
    _Handler.body, _Handler.claimed_length = (svhn_dir / "test_32x32.mat").read_bytes(), None
    with pytest.raises(
        DatasetError, match=rf"does not match the official SVHN test_32x32.mat.*expected md5 {OFFICIAL['test'].md5}"
    ):
        fetch("test", tmp_path, url)
    assert list(tmp_path.iterdir()) == []


def test_truncated_download_leaves_nothing(http_source, tmp_path, svhn_dir):
    server, url = http_source
    body = (svhn_dir / "test_32x32.mat").read_bytes()
    _Handler.body, _Handler.claimed_length = body[:1000], len(body)
    with pytest.raises(DatasetError, match="truncated|cannot download"):
        fetch("test", tmp_path, url, from_=url + "test_32x32.mat")
    assert list(tmp_path.iterdir()) == []


def test_from_url_accepts_svhn_format(http_source, store, cfg, svhn_dir):
    server, url = http_source
    _Handler.body, _Handler.claimed_length = (svhn_dir / "test_32x32.mat").read_bytes(), None
    manifest = prepare_split(store, cfg, "test", from_=url + "test_32x32.mat")
    assert manifest["count"] == 400 and manifest["source"]["origin"].startswith("http://127.0.0.1")


def test_unreachable_official_url_says_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="--from PATH.*dcgan-ray data synth"):
        fetch("train", tmp_path, "http://127.0.0.1:9/")
