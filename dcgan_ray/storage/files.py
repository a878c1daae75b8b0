"""Local files: the node cache, checked downloads made once per node, hashing, progress lines.

Nothing here talks to S3 (that is `dcgan_ray.storage.s3`); `fetch_once` is how both S3 objects and
http(s) downloads land in a node's cache exactly once, with only checked files ever in place.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from dcgan_ray.errors import DownloadError

log = logging.getLogger(__name__)


def file_hash(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file (sha256 for our objects, md5 where SVHN's official checksums need it)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def cache_dir(kind: str, node: str | None = None) -> Path:
    """This node's cache for one kind of download: $DCGAN_RAY_CACHE[/node-<id>]/<kind> (default root
    ~/.cache/dcgan-ray).

    Keyed by content hash inside, so every Ray worker of a node shares one copy (see `fetch_once`). Ray
    workers pass their Ray node id: nodes that share a disk (several raylets on one machine, or a shared
    home directory) still each hold their own copy, as separate machines would.
    """
    root = Path(os.environ.get("DCGAN_RAY_CACHE", Path.home() / ".cache" / "dcgan-ray"))
    return (root / f"node-{node[:16]}" if node else root) / kind


def download_url(
    url: str, part: Path, expected_size: int | None = None, timeout_s: float = 60, max_bytes: int = 4 * 2**30
) -> None:
    """Stream an http(s) URL into `part` with a progress line.

    Raises DownloadError with the reason when the request fails, fewer bytes arrive than the server
    (or `expected_size`) announced, or more than `max_bytes` would; nothing is left at `part` then.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or expected_size or 0
            if total > max_bytes:
                raise DownloadError(f"it announces {total} bytes, more than the {max_bytes} accepted")
            progress = Progress(f"download {url.rsplit('/', 1)[-1]}", total) if total else None
            received = 0
            while block := resp.read(4 * 2**20):
                received += len(block)
                if received > max_bytes:
                    raise DownloadError(f"it sends more than the {max_bytes} bytes accepted")
                out.write(block)
                if progress:
                    progress(len(block))
        if total and received != total:
            raise DownloadError(f"the download is truncated: got {received} of {total} bytes")
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    except urllib.error.HTTPError as e:
        part.unlink(missing_ok=True)
        raise DownloadError(f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        part.unlink(missing_ok=True)
        reason = e.reason if isinstance(e, urllib.error.URLError) else f"{type(e).__name__}: {e}"
        raise DownloadError(str(reason)) from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def fetch_once(path: Path, fetch: Callable[[Path], None], ready: Callable[[Path], bool] = Path.is_file) -> Path:
    """`path`, made at most once per node by `fetch(part)`.

    Processes sharing the node (Ray workers) take a file lock: one fetches, the others wait and reuse
    the result. `fetch` writes a temporary `part` and raises if it is incomplete or wrong, so only a
    checked file is ever renamed to `path`.
    """
    if ready(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f"{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready(path):
            return path
        part = path.with_name(f"{path.name}.{os.getpid()}.part")
        try:
            fetch(part)
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)
    return path


class Progress:
    """A boto3 transfer callback that logs one progress line every few seconds."""

    def __init__(self, label: str, total: int, every_s: float = 2.0):
        self.label, self.total, self.every_s = label, total, every_s
        self.transferred = 0
        self._lock = threading.Lock()
        self._start = self._last = time.monotonic()

    def __call__(self, nbytes: int) -> None:
        with self._lock:
            self.transferred += nbytes
            now = time.monotonic()
            if now - self._last >= self.every_s or self.transferred >= self.total:
                self._last = now
                rate = self.transferred / max(now - self._start, 1e-9) / 2**20
                log.info(
                    "%s: %.1f/%.1f MiB (%3.0f%%, %.0f MiB/s)",
                    self.label,
                    self.transferred / 2**20,
                    self.total / 2**20,
                    100 * self.transferred / max(self.total, 1),
                    rate,
                )
