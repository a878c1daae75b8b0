"""The vendored FID Inception network and its weight fetching, with no download from the internet.

The weights are made here: a seeded random-init `InceptionV3Pool3` saved as a state dict has exactly
the keys and shapes of the official file, which is all loading and caching can tell apart. They are
served the ways users stage them: a local path, a real HTTP server on loopback, the real S3 server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dcgan_ray.quality.inception import InceptionV3Pool3, WeightsError, fetch_weights, load_inception
from dcgan_ray.storage.files import file_hash

# Measured from torch-fidelity 0.4.0's FeatureExtractorInceptionV3 (loaded with these random weights,
# strict=True): sum(p.numel() for p in model.parameters()) == 23_850_960, fc included; its state dict
# has 566 entries, the BatchNorm running statistics included.
TORCH_FIDELITY_PARAMETERS = 23_850_960
TORCH_FIDELITY_STATE_ENTRIES = 566


@dataclasses.dataclass(frozen=True)
class Weights:
    path: Path
    sha256: str


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Weights:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(InceptionV3Pool3().state_dict(), path)
    return Weights(path, file_hash(path))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass  # the test output stays readable; failures show up as the client's errors


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """A real HTTP server on a free loopback port serving `directory`; yields its base URL."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def weight_files(cache: Path) -> list[str]:
    """What the cache holds besides its lock files (downloads and leftover partial downloads)."""
    return sorted(p.name for p in cache.iterdir() if p.suffix != ".lock") if cache.exists() else []


def test_local_weights_load_and_give_deterministic_pool3_features(weights, images, tmp_path):
    cache = tmp_path / "cache"
    first = load_inception(str(weights.path), sha256=weights.sha256, cache_dir=cache)
    second = load_inception(str(weights.path), sha256=weights.sha256.upper(), cache_dir=cache)
    assert not first.training and not any(p.requires_grad for p in first.parameters())
    # The logits head is loaded but never computed: poisoning it must not change the features.
    second.fc.weight.fill_(float("nan"))
    with torch.no_grad():
        a, b = first(images), second(images)
    assert a.shape == (4, InceptionV3Pool3.feature_dim) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and a.abs().sum() > 0
    assert torch.equal(a, b)
    assert weight_files(cache) == []  # a local file is used in place, not copied


def test_structure_matches_torch_fidelity():
    model = InceptionV3Pool3()
    state = model.state_dict()
    for key in (
        "Conv2d_1a_3x3.conv.weight",
        "Conv2d_1a_3x3.bn.running_var",
        "Mixed_5b.branch5x5_2.conv.weight",
        "Mixed_6e.branch7x7dbl_5.bn.bias",
        "Mixed_7c.branch3x3dbl_3b.conv.weight",
        "Mixed_7c.branch_pool.conv.weight",
        "fc.weight",
        "fc.bias",
    ):
        assert key in state
    assert state["fc.weight"].shape == (1008, 2048)
    assert sum(p.numel() for p in model.parameters()) == TORCH_FIDELITY_PARAMETERS
    assert len(state) == TORCH_FIDELITY_STATE_ENTRIES


def test_forward_takes_uint8_nchw_only():
    model = InceptionV3Pool3().eval()
    with pytest.raises(ValueError, match=r"expected uint8 images \(N, 3, H, W\), got torch.float32"):
        model(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"got torch.uint8 \(1, 1, 32, 32\)"):
        model(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))


def test_http_download_is_cached_and_reused_without_the_server(weights, tmp_path):
    cache = tmp_path / "cache"
    with serve(weights.path.parent) as base:
        url = f"{base}/{weights.path.name}"
        pinned = fetch_weights(url, cache, weights.sha256)
        unpinned = fetch_weights(url, cache, None)
    assert pinned == cache / f"{weights.sha256}.pth" and file_hash(pinned) == weights.sha256
    assert unpinned.name.startswith("uri-") and file_hash(unpinned) == weights.sha256
    with pytest.raises(WeightsError, match="cannot fetch"):  # the server is really gone ...
        fetch_weights(f"{base}/other.pth", cache, None)
    assert fetch_weights(url, cache, weights.sha256) == pinned  # ... and the cache answers instead
    assert fetch_weights(url, cache, None) == unpinned
    assert weight_files(cache) == sorted([pinned.name, unpinned.name])


def test_wrong_sha256_names_both_hashes_and_keeps_nothing(weights, tmp_path):
    cache = tmp_path / "cache"
    wrong = "0" * 64
    with serve(weights.path.parent) as base:
        with pytest.raises(
            WeightsError, match=rf"sha256 {weights.sha256}, expected {wrong} \(the download was deleted\)"
        ):
            fetch_weights(f"{base}/{weights.path.name}", cache, wrong)
    assert weight_files(cache) == []
    with pytest.raises(
        WeightsError, match=rf"sha256 {weights.sha256}, expected {wrong} \(the file was left in place\)"
    ):
        load_inception(str(weights.path), sha256=wrong, cache_dir=cache)
    assert weights.path.is_file()


def test_unfetchable_weights_say_how_to_provide_them(weights, tmp_path):
    how = r"eval.inception_weights to its local path or to an s3:// URI.*aws s3 cp.*digit-classifier metric"
    with pytest.raises(WeightsError, match=rf"{tmp_path / 'missing.pth'} does not exist.*{how}"):
        load_inception(str(tmp_path / "missing.pth"), cache_dir=tmp_path / "cache")
    with pytest.raises(WeightsError, match=rf"cannot fetch .* from http://127.0.0.1:9/x.pth: .*{how}"):
        load_inception("http://127.0.0.1:9/x.pth", cache_dir=tmp_path / "cache")
    with serve(weights.path.parent) as base:
        with pytest.raises(WeightsError, match=rf"HTTP 404 .*{how}"):
            load_inception(f"{base}/absent.pth", cache_dir=tmp_path / "cache")
    assert weight_files(tmp_path / "cache") == []


def test_files_that_are_not_the_fid_weights_are_refused(tmp_path):
    other = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(2048, 10).state_dict(), other)
    with pytest.raises(WeightsError, match=rf"{other} .*does not fit the network: it is not the 2015 Inception v3"):
        load_inception(str(other), cache_dir=tmp_path / "cache")

    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(WeightsError, match="holds a Tensor, not a state dict: it is not the 2015 Inception v3"):
        load_inception(str(tensor), cache_dir=tmp_path / "cache")

    noise = tmp_path / "noise.pth"
    noise.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(WeightsError, match=rf"{noise} .*cannot be read as PyTorch weights"):
        load_inception(str(noise), cache_dir=tmp_path / "cache")
    assert noise.is_file()  # a user's own file is never deleted

    # Unpinned, a bad download (a proxy's HTML page, say) must not be served from the cache next time.
    cache = tmp_path / "cache"
    with serve(tmp_path) as base:
        with pytest.raises(WeightsError, match="cannot be read as PyTorch weights"):
            load_inception(f"{base}/noise.pth", cache_dir=cache)
    assert weight_files(cache) == []


def test_weights_from_s3(weights, images, cfg, store, tmp_path):
    key = f"{cfg.storage.prefix}/weights/inc.pth"
    store.upload_file(weights.path, key)
    # The bucket comes from the URI, not from storage.bucket; only the endpoint settings are used.
    elsewhere = dataclasses.replace(cfg.storage, bucket="not-this-bucket")
    model = load_inception(
        f"s3://{store.bucket}/{key}", sha256=weights.sha256, storage=elsewhere, cache_dir=tmp_path / "c"
    )
    assert weight_files(tmp_path / "c") == [f"{weights.sha256}.pth"]
    with torch.no_grad():
        assert model(images[:1]).shape == (1, 2048)

    missing = f"s3://{store.bucket}/{cfg.storage.prefix}/weights/absent.pth"
    with pytest.raises(WeightsError, match=rf"{missing} does not exist.*eval.inception_weights"):
        load_inception(missing, storage=cfg.storage, cache_dir=tmp_path / "c")
