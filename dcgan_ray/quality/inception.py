"""The 2015 TensorFlow Inception v3 "pool3" network that FID is defined on, and its weights.

The network is vendored from torch-fidelity 0.4.0 (https://github.com/toshas/torch-fidelity,
Apache-2.0; `feature_extractor_inceptionv3.py` and `interpolate_compat_tensorflow.py`, itself adapted
from pytorch-fid, Apache-2.0), the literature-compatible PyTorch port of the graph Heusel et al. used.
Its weights are the official TensorFlow `inception-2015-12-05` weights (Apache-2.0,
https://github.com/tensorflow/models), converted to PyTorch by torch-fidelity. We vendor instead of
importing because `import torch_fidelity` imports torchvision, which does not import beside our torch.

Kept identical to torch-fidelity, so features (and FIDs) compare with published numbers: every module
and parameter name (the official weights file loads with `strict=True`), the TF1-style bilinear resize
to 299x299 and the (x - 128) / 128 input scaling. Dropped: the other feature taps, the float64 option
and its helper classes.

Every FID package downloads these weights at first use; offline and air-gapped clusters cannot. So
`fetch_weights` takes the weights from where the config says: an https:// URL, an s3:// URI in the
user's own bucket, or a local path; it checks the sha256 when one is given and caches by content hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcgan_ray.config import INCEPTION_URL, StorageSection
from dcgan_ray.errors import BucketMissing, DcganError, DownloadError, ObjectMissing
from dcgan_ray.storage.files import cache_dir as node_cache_dir
from dcgan_ray.storage.files import download_url, fetch_once, file_hash
from dcgan_ray.storage.s3 import Store, parse_s3_uri

log = logging.getLogger(__name__)

WEIGHTS_FILENAME = INCEPTION_URL.rsplit("/", 1)[-1]
HTTP_TIMEOUT_S = 60
"""Per socket operation: an offline machine fails in seconds (refused) or one minute (black-holed)."""


class WeightsError(DcganError):
    """The Inception weights cannot be fetched, fail their hash check, or are not the FID network's."""


# --- the network --------------------------------------------------------------------------------


def resize_like_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of float (N, C, H, W) to (N, C, size, size) exactly as TF1's
    `tf.image.resize_bilinear(align_corners=False)`, which the FID graph uses and PyTorch's
    `interpolate` does not reproduce (it samples pixel centres; TF1 samples pixel corners).

    torch-fidelity's "slow" method, bit-exact on CPU; the op order is kept to keep it so.
    """
    scale_y = torch.tensor(x.shape[2] / size, dtype=torch.float32)
    scale_x = torch.tensor(x.shape[3] / size, dtype=torch.float32)

    grid_y = torch.arange(0, size, 1, dtype=x.dtype, device=x.device) * scale_y
    y_lo = grid_y.long()
    y_hi = (y_lo + 1).clamp_max(x.shape[2] - 1)
    dy = (grid_y - y_lo.float()).view(1, 1, size, 1)

    grid_x = torch.arange(0, size, 1, dtype=x.dtype, device=x.device) * scale_x
    x_lo = grid_x.long()
    x_hi = (x_lo + 1).clamp_max(x.shape[3] - 1)
    dx = (grid_x - x_lo.float()).view(1, 1, 1, size)

    rows_lo, rows_hi = x[:, :, y_lo, :], x[:, :, y_hi, :]
    top = rows_lo[:, :, :, x_lo] + (rows_lo[:, :, :, x_hi] - rows_lo[:, :, :, x_lo]) * dx
    bottom = rows_hi[:, :, :, x_lo] + (rows_hi[:, :, :, x_hi] - rows_hi[:, :, :, x_lo]) * dx
    return top + (bottom - top) * dy


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (TF's eps 0.001) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool leaves the zero padding out of the average; PyTorch's default counts it.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: in_channels -> 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17: in_channels -> 480 + in_channels channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions: in_channels -> 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8: in_channels -> 512 + in_channels channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class InceptionE(nn.Module):
    """8x8 block with split 3x3 convolutions: in_channels -> 2048 channels.

    `max_pool`: the TF graph's last block (Mixed_7c) max-pools in its pool branch where the paper and
    every other block average; FID's features depend on that quirk, so it is kept.
    """

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


class InceptionV3Pool3(nn.Module):
    """uint8 images (N, 3, H, W) in [0, 255], any H and W -> the 2048 "pool3" features FID uses.

    Put the images on the model's device first. Build it with `load_inception`: a bare instance has
    random weights.
    """

    feature_dim = 2048
    input_size = 299

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        # The 1008-class logits head is never computed for FID; it stays because the official
        # weights file holds fc.weight / fc.bias and loads with strict=True.
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
            raise ValueError(
                f"expected uint8 images (N, 3, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}"
            )
        x = resize_like_tf1(images_uint8.to(torch.float32), self.input_size)  # N x 3 x 299 x 299
        # The TF graph multiplies by 0.0078125 (= 1/128); dividing is bit-identical.
        x = (x - 128) / 128
        x = self.Conv2d_1a_3x3(x)  # N x 32 x 149 x 149
        x = self.Conv2d_2a_3x3(x)  # N x 32 x 147 x 147
        x = self.Conv2d_2b_3x3(x)  # N x 64 x 147 x 147
        x = self.MaxPool_1(x)  # N x 64 x 73 x 73
        x = self.Conv2d_3b_1x1(x)  # N x 80 x 73 x 73
        x = self.Conv2d_4a_3x3(x)  # N x 192 x 71 x 71
        x = self.MaxPool_2(x)  # N x 192 x 35 x 35
        x = self.Mixed_5b(x)  # N x 256 x 35 x 35
        x = self.Mixed_5c(x)  # N x 288 x 35 x 35
        x = self.Mixed_5d(x)  # N x 288 x 35 x 35
        x = self.Mixed_6a(x)  # N x 768 x 17 x 17
        x = self.Mixed_6b(x)  # N x 768 x 17 x 17
        x = self.Mixed_6c(x)  # N x 768 x 17 x 17
        x = self.Mixed_6d(x)  # N x 768 x 17 x 17
        x = self.Mixed_6e(x)  # N x 768 x 17 x 17
        x = self.Mixed_7a(x)  # N x 1280 x 8 x 8
        x = self.Mixed_7b(x)  # N x 2048 x 8 x 8
        x = self.Mixed_7c(x)  # N x 2048 x 8 x 8
        return torch.flatten(self.AvgPool(x), 1)  # N x 2048


# --- the weights --------------------------------------------------------------------------------


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "s3://"))


def _how_to_provide() -> str:
    return (
        f"To provide the weights: download {INCEPTION_URL} on a machine with internet access and set "
        "eval.inception_weights to its local path or to an s3:// URI in your bucket (e.g. `aws s3 cp "
        f"{WEIGHTS_FILENAME} s3://BUCKET/weights/`), or use the digit-classifier metric, which needs no "
        "outside weights"
    )


def _hash_mismatch(uri: str, expected: str, actual: str, fate: str) -> WeightsError:
    return WeightsError(
        f"Inception weights from {uri} have sha256 {actual}, expected {expected} ({fate}). The file is "
        f"corrupt or another file: fetch it again from {INCEPTION_URL}, or, if you meant to use this file, "
        "set the expected sha256 in the config to its hash"
    )


def _download_http(uri: str, part: Path) -> None:
    try:
        download_url(uri, part, timeout_s=HTTP_TIMEOUT_S)
    except DownloadError as e:
        raise WeightsError(f"cannot fetch Inception weights from {uri}: {e}. {_how_to_provide()}") from None


def _download_s3(uri: str, part: Path, storage: StorageSection | None) -> None:
    if storage is None:
        raise ValueError(f"fetching {uri} needs the job's storage settings (storage=cfg.storage)")
    bucket, key = parse_s3_uri(uri)
    try:
        Store(dataclasses.replace(storage, bucket=bucket)).download_file(key, part, label=f"download {uri}")
    except (ObjectMissing, BucketMissing) as e:
        # Endpoint and credential errors propagate as they are: their messages already say what to do.
        raise WeightsError(f"cannot fetch Inception weights: {e}. {_how_to_provide()}") from None


def _local_weights(uri: str, sha256: str | None) -> Path:
    """A local file is used in place (never copied, never deleted): only its hash is checked."""
    path = Path(uri).expanduser()
    if not path.is_file():
        raise WeightsError(f"Inception weights file {path} does not exist. {_how_to_provide()}")
    if sha256 is not None:
        actual = file_hash(path)
        if actual != sha256:
            raise _hash_mismatch(uri, sha256, actual, "the file was left in place")
    return path


def fetch_weights(uri: str, cache_dir: Path, sha256: str | None, storage: StorageSection | None = None) -> Path:
    """A local path to the weights named by `uri`: an http(s):// URL, an s3://bucket/key URI (read with
    `storage`'s endpoint and the environment's credentials) or a local path.

    Downloads land in `cache_dir` under the sha256 of their content (under a hash of the URI when no
    sha256 is given), once per node: a cached file is reused without touching the network, and Ray
    workers sharing a node take a file lock so only one downloads.
    """
    sha256 = sha256.lower() if sha256 else None
    if not _is_remote(uri):
        return _local_weights(uri, sha256)

    name = sha256 or f"uri-{hashlib.sha256(uri.encode()).hexdigest()}"

    def download(part: Path) -> None:
        log.info("fetching Inception weights from %s", uri)
        if uri.startswith("s3://"):
            _download_s3(uri, part, storage)
        else:
            _download_http(uri, part)
        actual = file_hash(part)
        if sha256 is not None and actual != sha256:
            raise _hash_mismatch(uri, sha256, actual, "the download was deleted")
        if sha256 is None:
            log.info("Inception weights from %s have sha256 %s; put it in the config to pin them", uri, actual)

    return fetch_once(cache_dir / f"{name}.pth", download)


def _model_from_file(path: Path, uri: str) -> InceptionV3Pool3:
    where = str(path) if uri == str(path) else f"{path} (from {uri})"
    not_fid = f"it is not the 2015 Inception v3 FID weights ({WEIGHTS_FILENAME})"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as e:
        # torch's own message suggests weights_only=False, which is no fix for a file that is not weights.
        raise WeightsError(
            f"{where} cannot be read as PyTorch weights ({type(e).__name__}): {not_fid}. {_how_to_provide()}"
        ) from None
    if not isinstance(state, Mapping):
        raise WeightsError(f"{where} holds a {type(state).__name__}, not a state dict: {not_fid}. {_how_to_provide()}")
    model = InceptionV3Pool3()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        # PyTorch lists every missing/unexpected key; the start is enough to see what the file is.
        detail = " ".join(str(e).split())[:300]
        raise WeightsError(f"{where} does not fit the network: {not_fid} ({detail}...). {_how_to_provide()}") from None
    return model


def load_inception(
    uri: str,
    sha256: str | None = None,
    cache_dir: Path | None = None,
    storage: StorageSection | None = None,
    device: str | torch.device = "cpu",
) -> InceptionV3Pool3:
    """The FID feature network with the weights at `uri` (see `fetch_weights`), frozen, in eval mode, on
    `device`. With no `sha256` (eval.inception_sha256 unset) any file is accepted and a download's
    hash is logged."""
    path = fetch_weights(uri, cache_dir or node_cache_dir("weights"), sha256, storage)
    try:
        model = _model_from_file(path, uri)
    except WeightsError:
        if _is_remote(uri):
            # Without a sha256 a bad download (a proxy's HTML page, another file) would otherwise be
            # served from the cache forever; a user's local file is never deleted.
            path.unlink(missing_ok=True)
        raise
    return model.eval().requires_grad_(False).to(device)
