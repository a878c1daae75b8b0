"""One small interface to S3-compatible object storage (AWS S3, MinIO, SeaweedFS, ...).

This module is the one place that knows endpoints, retries and credentials. Credentials come only
from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_SHARED_CREDENTIALS_FILE, an
instance role, ...): boto3's default chain resolves them on each process, so no secret is ever in a
config, a Ray task argument, a log line or an exception message.

botocore's exceptions are translated into `dcgan_ray.errors.StorageError` subclasses that name the
endpoint, bucket and key, and say what to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from dcgan_ray.config import StorageConfig
from dcgan_ray.errors import BucketMissing, ObjectMissing, StorageAuthError, StorageError, StorageUnreachable
from dcgan_ray.storage.files import Progress

log = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 3
"""Bounded retries: an unreachable endpoint fails in seconds, not minutes."""

_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken", "ExpiredToken"}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}

# Multipart above 64 MiB with 8 threads: full speed on loopback and on real S3 alike.
TRANSFER = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=16 * 2**20, max_concurrency=8)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key")."""
    if not uri.startswith("s3://"):
        raise StorageError(f"{uri!r} is not an s3:// URI (expected s3://BUCKET/KEY)")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket (expected s3://BUCKET/KEY)")
    return bucket, key.strip("/")


class Store:
    """Objects under one bucket on one endpoint. Keys are full keys in the bucket."""

    def __init__(self, cfg: StorageConfig):
        self.cfg = cfg
        self.bucket = cfg.bucket
        self.endpoint = cfg.endpoint or "AWS S3"
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            config = botocore.config.Config(
                connect_timeout=5,
                read_timeout=120,
                retries={"max_attempts": CONNECT_ATTEMPTS, "mode": "standard"},
                signature_version="s3v4",
                s3={"addressing_style": "path"},
            )
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.cfg.endpoint, region_name=self.cfg.region, config=config
            )
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        # A boto3 client does not pickle; each process builds its own from its own environment.
        return {**self.__dict__, "_client": None}

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    @contextlib.contextmanager
    def _errors(self, what: str, key: str | None = None) -> Iterator[None]:
        """Translate botocore failures into messages a user can act on."""
        target = self.uri(key) if key is not None else f"bucket {self.bucket!r}"
        try:
            yield
        except botocore.exceptions.NoCredentialsError:
            raise StorageAuthError(
                f"no S3 credentials found for {self.endpoint} while trying to {what} {target}: "
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_SHARED_CREDENTIALS_FILE) in the "
                "environment of this process and of every Ray node"
            ) from None
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
                botocore.exceptions.ReadTimeoutError) as e:
            raise StorageUnreachable(
                f"cannot reach the S3 endpoint {self.endpoint} (tried {CONNECT_ATTEMPTS} times) while trying "
                f"to {what} {target}: {type(e).__name__}. Is the server up (`cluster/local.sh status` for the "
                "dev stack) and is storage.endpoint right?"
            ) from None
        except botocore.exceptions.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in _AUTH_CODES:
                raise StorageAuthError(
                    f"S3 endpoint {self.endpoint} rejected the credentials (AWS_ACCESS_KEY_ID="
                    f"{_key_hint()}) while trying to {what} {target} ({code}): check AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY in the environment, and that this key may access the bucket"
                ) from None
            if code == "NoSuchBucket":
                raise BucketMissing(self._bucket_missing_message()) from None
            if code in _MISSING_KEY_CODES:
                raise ObjectMissing(f"{target} does not exist on {self.endpoint}") from None
            raise StorageError(f"S3 error {code or '?'} on {self.endpoint} while trying to {what} {target}: "
                               f"{e.response.get('Error', {}).get('Message', e)}") from None

    def _bucket_missing_message(self) -> str:
        return (f"bucket {self.bucket!r} does not exist on {self.endpoint}: create it (e.g. `aws s3 mb "
                f"s3://{self.bucket}`), fix storage.bucket, or set storage.create_bucket: true")

    def check(self) -> None:
        """Fail fast, before any work starts, if the endpoint, credentials or bucket are wrong.

        Creates the bucket when `storage.create_bucket` is set (the dev stack's configs do).
        """
        with self._errors("open"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except botocore.exceptions.ClientError as e:
                # HEAD has no body: a 403 may be bad credentials or a foreign bucket, a 404 a missing bucket.
                code = str(e.response.get("Error", {}).get("Code", ""))
                if code not in ("404", "NoSuchBucket"):
                    raise
        if not self.cfg.create_bucket:
            raise BucketMissing(self._bucket_missing_message())
        with self._errors("create"):
            self.client.create_bucket(Bucket=self.bucket)
        log.info("created bucket %s on %s", self.bucket, self.endpoint)

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
            return True
        except ObjectMissing:
            return False

    def head(self, key: str) -> dict[str, Any]:
        with self._errors("read", key):
            return self.client.head_object(Bucket=self.bucket, Key=key)

    def get_bytes(self, key: str) -> bytes:
        with self._errors("read", key):
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        with self._errors("write", key):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    def upload_file(self, path: str | Path, key: str, label: str | None = None) -> None:
        """Upload with multipart for big files and a progress line."""
        size = os.path.getsize(path)
        progress = Progress(label or f"upload {Path(path).name}", size)
        with self._errors("write", key):
            self.client.upload_file(str(path), self.bucket, key, Config=TRANSFER, Callback=progress)

    def download_file(self, key: str, path: str | Path, label: str | None = None) -> None:
        """Download with parallel ranged GETs to `path` (the caller makes it atomic)."""
        with self._errors("read", key):
            size = self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
            progress = Progress(label or f"download {key.rsplit('/', 1)[-1]}", size)
            self.client.download_file(self.bucket, key, str(path), Config=TRANSFER, Callback=progress)

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        with self._errors("list", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys

    def delete(self, keys: list[str]) -> None:
        with self._errors("delete", keys[0] if keys else None):
            for start in range(0, len(keys), 1000):
                chunk = [{"Key": k} for k in keys[start:start + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})


def _key_hint() -> str:
    """The access key id, shortened: enough to spot the wrong one, not a secret."""
    key = os.environ.get("AWS_ACCESS_KEY_ID", "")
    return f"{key[:4]}..." if key else "<unset>"
