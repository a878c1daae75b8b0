"""SVHN in object storage: fetch the official files, validate them, store them compactly, read them fast.

Layout in the bucket, per split (`<storage.prefix>/data/<dataset>/<split>/`):
  images-<sha256[:16]>.u8   raw uint8 (n, 3, 32, 32) shards, C-contiguous, data.shard_images each
  labels-<sha256[:16]>.u8   raw uint8 digits 0..9 (SVHN's label 10 is stored as 0)
  manifest.json             counts, shapes, label histogram, per-object sha256 and size, source
Objects are named by their content hash, so a new upload never overwrites bytes a manifest points to,
and the manifest is written last: a failed `prepare` leaves the previous split intact and readable.

Workers read through `load_split`: each object is downloaded once per node into a cache keyed by its
sha256 (checked after download), then read straight into one preallocated array.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from dcgan_ray.config import JobConfig
from dcgan_ray.errors import DatasetError, DatasetMissing, DownloadError, ObjectMissing
from dcgan_ray.storage import checks
from dcgan_ray.storage.files import cache_dir, download_url, fetch_once, file_hash
from dcgan_ray.storage.layout import split_manifest_key, split_prefix
from dcgan_ray.storage.s3 import Store

log = logging.getLogger(__name__)

IMAGE_SHAPE = (3, 32, 32)
IMAGE_BYTES = 3 * 32 * 32
MAX_IMAGES = 10_000_000
"""More than any SVHN split (extra: 531,131) by far; a bound for what a manifest or a file may allocate."""
MAX_MAT_BYTES = 2 * 2**30
"""The largest .mat file (or --from download) accepted: SVHN's largest, extra_32x32.mat, has 1.24 GiB."""
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class OfficialFile:
    filename: str
    size: int
    md5: str


# Stanford's SVHN format 2 (cropped digits), http://ufldl.stanford.edu/housenumbers/
OFFICIAL = {
    "train": OfficialFile("train_32x32.mat", 182_040_794, "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": OfficialFile("test_32x32.mat", 64_275_384, "eb5a983be6a315427106f1b164d9cef3"),
    "extra": OfficialFile("extra_32x32.mat", 1_329_278_602, "a93ce644f1a588dc4d68dda5feec44a7"),
}


def prepare_command(split: str) -> str:
    """The command that puts a split into the bucket; the CLI fills in the job file (see errors.DcganError)."""
    return f"dcgan-ray data prepare {{config}} --split {split}"


# --- fetching -----------------------------------------------------------------------------------


@dataclass
class Source:
    """A local copy of one split's .mat file and where it came from."""

    path: Path
    origin: str  # URL or path it was fetched from
    official: bool  # fetched from the official URL and md5-checked


def _download(url: str, dest: Path, expected_size: int | None) -> None:
    """Download to `dest` via a `.part` file; only a complete download is renamed into place."""
    part = dest.with_name(dest.name + ".part")
    try:
        download_url(url, part, expected_size, max_bytes=MAX_MAT_BYTES)
    except DownloadError as e:
        raise DatasetError(
            f"cannot download {url}: {e}. Run the command again, or, without internet access, fetch the file "
            "elsewhere and pass it with --from PATH, or use `dcgan-ray data synth` for offline SVHN-format data"
        ) from None
    os.replace(part, dest)


def fetch(split: str, workdir: Path, source_url: str, from_: str | None = None) -> Source:
    """Get the split's .mat file into `workdir`.

    Without `from_`, it is downloaded from `source_url` (the official location) and must match the
    official md5 and size. With `from_` (a local file, a directory holding SVHN's file names, or a URL)
    any file in SVHN's format is accepted; `prepare` records its sha256.
    """
    official = OFFICIAL[split]
    if from_ is None:
        url = source_url.rstrip("/") + "/" + official.filename
        dest = workdir / official.filename
        _download(url, dest, official.size)
        digest, size = file_hash(dest, "md5"), dest.stat().st_size
        if digest != official.md5 or size != official.size:
            dest.unlink()
            raise DatasetError(
                f"{url} does not match the official SVHN {official.filename}: md5 {digest} and {size} bytes, "
                f"expected md5 {official.md5} and {official.size} bytes (the file was deleted). The download "
                "is corrupt or the URL serves something else: run again, or pass a known-good copy with --from"
            )
        return Source(dest, url, official=True)
    if "://" in from_:
        dest = workdir / official.filename
        _download(from_, dest, None)
        return Source(dest, from_, official=False)
    path = Path(from_).expanduser()
    if path.is_dir():
        path = path / official.filename
    if not path.is_file():
        raise DatasetError(
            f"--from {from_}: no such file {path} (expected SVHN's {official.filename} or a path to a .mat file)"
        )
    return Source(path, str(path.resolve()), official=False)


# --- validating ---------------------------------------------------------------------------------


def read_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate an SVHN format-2 .mat file.

    Returns images uint8 (N, 3, 32, 32) C-contiguous and labels uint8 (N,) as digits 0..9.
    """
    where = f"{path}"
    size = Path(path).stat().st_size
    if size > MAX_MAT_BYTES:
        raise DatasetError(
            f"{where} has {size / 2**30:.1f} GiB, more than any SVHN file ({MAX_MAT_BYTES / 2**30:.0f} "
            "GiB at most; extra_32x32.mat has 1.24 GiB): not an SVHN split"
        )
    try:
        # The declared shapes first: a small compressed file may declare an array that fills the memory.
        shapes = {name: shape for name, shape, _ in scipy.io.whosmat(str(path))}
        declared = shapes.get("X", ())
        if len(declared) == 4 and int(np.prod(declared, dtype=np.int64)) > MAX_IMAGES * IMAGE_BYTES:
            raise DatasetError(f"{where}: X declares {declared}, more than {MAX_IMAGES} images: not an SVHN split")
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except DatasetError:
        raise
    except Exception as e:  # scipy raises many types for a damaged file
        raise DatasetError(
            f"{where} is not a readable MATLAB .mat file ({type(e).__name__}: {e}); "
            "SVHN's format-2 files are MATLAB 5 files with variables X and y"
        ) from None
    for var in ("X", "y"):
        if var not in mat:
            raise DatasetError(f"{where} has no variable {var!r}; SVHN's format 2 has X (32,32,3,N) and y (N,1)")
    X, y = mat["X"], mat["y"]
    if X.dtype != np.uint8 or X.ndim != 4 or X.shape[:3] != (32, 32, 3):
        raise DatasetError(f"{where}: X is {X.dtype} {X.shape}; SVHN's format 2 needs uint8 (32, 32, 3, N)")
    n = X.shape[3]
    if y.shape not in ((n, 1), (n,)):
        raise DatasetError(f"{where}: y has shape {y.shape} but X holds {n} images; expected ({n}, 1)")
    y = y.reshape(-1)
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{where}: y is {y.dtype}; expected integer labels 1..10")
    if n == 0:
        raise DatasetError(f"{where} holds no images")
    if y.min() < 1 or y.max() > 10:
        raise DatasetError(f"{where}: labels span {int(y.min())}..{int(y.max())}; SVHN's are 1..10 (10 is digit 0)")
    images = np.ascontiguousarray(X.transpose(3, 2, 0, 1))  # (32,32,3,N) -> (N,3,32,32)
    labels = (y % 10).astype(np.uint8)
    return images, labels


# --- storing ------------------------------------------------------------------------------------


def read_split_manifest(store: Store, cfg: JobConfig, split: str) -> dict[str, Any]:
    """The split's manifest (objects, counts, source), every field checked (`check_split_manifest`);
    DatasetMissing names the `prepare` command."""
    key = split_manifest_key(cfg, split)
    try:
        blob = store.get_bytes(key)
    except ObjectMissing:
        raise DatasetMissing(
            f"the {split} split of {cfg.data.dataset} is not in {store.uri(split_prefix(cfg, split))} on "
            f"{store.endpoint}; put it there with: {prepare_command(split)}"
        ) from None
    try:
        return check_split_manifest(checks.parse_json(blob), split_prefix(cfg, split))
    except checks.NotOurs as e:
        raise DatasetError(
            f"{store.uri(key)} is not a split manifest this code can use ({e}); run `{prepare_command(split)} --force`"
        ) from None


def check_split_manifest(manifest: Any, prefix: str) -> dict[str, Any]:
    """The fields the readers use, checked: counts that add up, sizes that match them, digests that are
    digests (they name cache files) and keys under the split's own prefix. Raises checks.NotOurs."""
    m = checks.mapping(manifest, "the manifest")
    if m.get("version") != MANIFEST_VERSION:
        raise checks.NotOurs(f"its version is {m.get('version')!r}, this code reads {MANIFEST_VERSION}")
    count = checks.integer(m.get("count"), "count", 1, MAX_IMAGES)
    total = 0
    for i, obj in enumerate(checks.listing(m.get("objects"), "objects", 10_000)):
        what = f"objects[{i}]"
        checks.mapping(obj, what)
        checks.key_under(obj.get("key"), prefix, f"{what}.key")
        checks.sha256(obj.get("sha256"), f"{what}.sha256")
        n = checks.integer(obj.get("count"), f"{what}.count", 1, MAX_IMAGES)
        if checks.integer(obj.get("bytes"), f"{what}.bytes") != n * IMAGE_BYTES:
            raise checks.NotOurs(f"{what} has {obj['bytes']} bytes for {n} images of {IMAGE_BYTES} bytes")
        total += n
    if total != count:
        raise checks.NotOurs(f"its objects hold {total} images, its count says {count}")
    labels = checks.mapping(m.get("labels"), "labels")
    checks.key_under(labels.get("key"), prefix, "labels.key")
    checks.sha256(labels.get("sha256"), "labels.sha256")
    if checks.integer(labels.get("bytes"), "labels.bytes") != count:
        raise checks.NotOurs(f"labels has {labels['bytes']} bytes for {count} images")
    source = checks.mapping(m.get("source"), "source")
    checks.sha256(source.get("sha256"), "source.sha256")
    checks.text(source.get("origin"), "source.origin")
    return m


def _write_object(
    store: Store, prefix: str, stem: str, data: np.ndarray, tmp: Path, existing: set[str]
) -> dict[str, Any]:
    path = tmp / stem
    data.tofile(path)
    digest = file_hash(path)
    key = f"{prefix}/{stem}-{digest[:16]}.u8"
    if key in existing:
        log.info("%s already in the bucket", key)
    else:
        store.upload_file(path, key, label=f"upload {stem}")
    path.unlink()
    return {"key": key, "sha256": digest, "bytes": int(data.nbytes)}


def prepare_split(
    store: Store,
    cfg: JobConfig,
    split: str,
    from_: str | None = None,
    force: bool = False,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Put one split into the bucket; returns its manifest. A split already there is left alone."""
    prefix = split_prefix(cfg, split)
    if not force:
        try:
            manifest = read_split_manifest(store, cfg, split)
            local = Path(from_) if from_ and "://" not in from_ else None
            if local is not None and local.is_dir():
                local = local / OFFICIAL[split].filename
            if local is not None and local.is_file() and file_hash(local) != manifest["source"]["sha256"]:
                raise DatasetError(
                    f"the {split} split in {store.uri(prefix)} came from {manifest['source']['origin']}, not from "
                    f"{local} (their sha256 differ); add --force to replace it"
                )
            missing = [o["key"] for o in manifest["objects"] if not store.exists(o["key"])]
            if not missing:
                log.info(
                    "%s split already in %s (%d images, source %s): nothing to upload",
                    split,
                    store.uri(prefix),
                    manifest["count"],
                    manifest["source"]["origin"],
                )
                return manifest
            log.warning("%s split manifest lists %d missing objects; preparing it again", split, len(missing))
        except DatasetMissing:
            pass
    with tempfile.TemporaryDirectory(prefix="dcgan-ray-prepare-", dir=workdir) as tmp_name:
        tmp = Path(tmp_name)
        src = fetch(split, tmp, cfg.data.source_url, from_)
        log.info("validating %s", src.path)
        images, labels = read_mat(src.path)
        source = {"origin": src.origin, "file": src.path.name, "official": src.official, "sha256": file_hash(src.path)}
        if src.official:
            source["md5"] = OFFICIAL[split].md5
        if src.path.parent == tmp:
            src.path.unlink()  # free the disk before writing shards
        existing = set(store.list_keys(prefix + "/"))
        objects = []
        per = cfg.data.shard_images
        for i, start in enumerate(range(0, len(images), per)):
            shard = images[start : start + per]
            obj = _write_object(store, prefix, f"images-{i:03d}", shard, tmp, existing)
            obj["count"] = len(shard)
            objects.append(obj)
        label_obj = _write_object(store, prefix, "labels", labels, tmp, existing)
    manifest = {
        "version": MANIFEST_VERSION,
        "dataset": cfg.data.dataset,
        "split": split,
        "count": int(len(images)),
        "image_shape": list(IMAGE_SHAPE),
        "dtype": "uint8",
        "layout": "NCHW",
        "label_histogram": {str(d): int(c) for d, c in enumerate(np.bincount(labels, minlength=10))},
        "objects": objects,
        "labels": label_obj,
        "source": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store.put_bytes(split_manifest_key(cfg, split), json.dumps(manifest, indent=2).encode(), "application/json")
    # Only after the new manifest is in place: drop objects no manifest points to any more.
    keep = {o["key"] for o in objects} | {label_obj["key"], split_manifest_key(cfg, split)}
    stale = [k for k in existing if k not in keep and k.endswith(".u8")]
    if stale:
        store.delete(stale)
    log.info(
        "%s split in %s: %d images, labels %s", split, store.uri(prefix), manifest["count"], manifest["label_histogram"]
    )
    return manifest


# --- reading ------------------------------------------------------------------------------------


def cached_object(store: Store, obj: dict[str, Any], node: str | None = None) -> Path:
    """A local, hash-checked copy of a manifest object, downloaded once per node (`fetch_once`)."""

    def download(part: Path) -> None:
        try:
            store.download_file(obj["key"], part)
        except ObjectMissing:
            raise DatasetError(
                f"{store.uri(obj['key'])} is listed in the split's manifest but is not in the bucket (deleted "
                f"since it was prepared?): prepare the split again with `{prepare_command(_split_of(obj))} --force`"
            ) from None
        digest = file_hash(part)
        if digest != obj["sha256"] or part.stat().st_size != obj["bytes"]:
            raise DatasetError(
                f"{store.uri(obj['key'])} is corrupt: sha256 {digest[:16]}... but the manifest says "
                f"{obj['sha256'][:16]}...; prepare the split again with --force"
            )

    # The name is a checked digest (check_split_manifest), so the path stays in the cache; a file found
    # there is used only if it still has that digest.
    return fetch_once(
        cache_dir("objects", node) / checks.sha256(obj["sha256"], "sha256"),
        download,
        ready=lambda p: p.is_file() and p.stat().st_size == obj["bytes"] and file_hash(p) == obj["sha256"],
    )


def _split_of(obj: dict[str, Any]) -> str:
    """The split an object of a manifest belongs to: its key is <prefix>/data/<dataset>/<split>/<name>."""
    return obj["key"].rsplit("/", 2)[-2]


@dataclass
class SplitData:
    images: np.ndarray  # uint8 (N, 3, 32, 32)
    labels: np.ndarray  # uint8 (N,), digits 0..9
    manifest: dict[str, Any]


def load_split(
    store: Store, cfg: JobConfig, split: str | None = None, max_images: int | None = None, node: str | None = None
) -> SplitData:
    """The split's first `max_images` (default: all) images and labels, in memory, through the cache of
    `node` (a Ray node id; see `cache_dir`).

    Every rank holds the whole split; the training loop gives each its slice of a per-epoch permutation.
    """
    split = split or cfg.data.split
    manifest = read_split_manifest(store, cfg, split)
    count = manifest["count"] if max_images is None else min(max_images, manifest["count"])
    images = np.empty((count, *IMAGE_SHAPE), dtype=np.uint8)
    flat = images.reshape(-1)
    start = 0
    for obj in manifest["objects"]:
        end = min(start + obj["count"], count)
        if start < end:
            with open(cached_object(store, obj, node), "rb") as f:
                wanted = (end - start) * IMAGE_BYTES
                if f.readinto(flat[start * IMAGE_BYTES : end * IMAGE_BYTES].data) != wanted:
                    raise DatasetError(
                        f"the cached copy of {store.uri(obj['key'])} is shorter than its manifest "
                        f"says; delete {cache_dir('objects', node)} and start again"
                    )
        start += obj["count"]
    labels = np.fromfile(cached_object(store, manifest["labels"], node), dtype=np.uint8)[:count]
    if len(labels) != count:
        raise DatasetError(
            f"the cached labels of {store.uri(manifest['labels']['key'])} are short; delete "
            f"{cache_dir('objects', node)} and start again"
        )
    return SplitData(images, labels, manifest)
