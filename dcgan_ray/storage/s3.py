"""One small interface to S3-compatible object storage (AWS S3, MinIO, SeaweedFS, ...).

This module is the one place that knows endpoints, retries and credentials. Credentials come only
from the environment, in one of three ways (static keys, a session token, a role: IRSA, EKS Pod Identity
or an instance role; `dcgan_ray.storage.credentials`): boto3's default chain resolves them on each
process, so no secret is ever in a config, a Ray task argument, a log line or an exception message.
`Store.check` resolves them before its first request, so a credential failure says in one line which way
was found and what is missing.

botocore's exceptions are translated into `dcgan_ray.errors.StorageError` subclasses that name the
endpoint, bucket and key, and say what to do.

Outages: a failure that retrying can fix (no connection, a timeout, a cut transfer, a 5xx answer) is
retried with capped exponential backoff for up to `storage.retry_budget_s`, counted from the first
failure of the outage, not per call. An outage is logged once per process and endpoint: one line when
it starts, one when the endpoint answers again (with its length and the retries it took; kept in
`dcgan_ray.storage.outages`). Failures
retrying cannot fix (a missing key or bucket, refused credentials) raise at once. `Store.check`, the
first contact of every command, does not wait: a wrong endpoint fails in seconds.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import os
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from dcgan_ray import progress
from dcgan_ray.config import StorageSection
from dcgan_ray.errors import BucketMissing, ObjectMissing, StorageAuthError, StorageError, StorageUnreachable
from dcgan_ray.storage import credentials, fence
from dcgan_ray.storage.files import Progress
from dcgan_ray.storage.outages import outage_failed, outage_over, outage_seconds

log = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 3
"""botocore's attempts per request; `Store.check` gives up after these, so a wrong endpoint fails in seconds."""

_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken", "ExpiredToken"}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}
_SERVER_BUSY_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}
# A conditional write that met another one in flight on the same key: AWS asks for a retry.
_CONFLICT_CODES = {"ConditionalRequestConflict", "409"}
_PRECONDITION_CODES = {"PreconditionFailed", "412"}
# No connection, a timeout, a connection cut mid-transfer; s3transfer's give-up after its own download retries.
# (botocore's SSLError is a ConnectionError too, but a certificate problem is not fixed by waiting.)
_TRANSIENT = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.IncompleteReadError,
    boto3.exceptions.RetriesExceededError,
)


WRITES = ("write", "create", "delete")
"""The requests (`Store._call`'s `what`) that change what is in the bucket: the ones a lease's gate admits."""

# Multipart above 64 MiB with 8 threads: full speed on loopback and on real S3 alike.
TRANSFER = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=16 * 2**20, max_concurrency=8)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key")."""
    if not uri.startswith("s3://"):
        raise StorageError(f"{uri!r} is not an s3:// URI (expected s3://BUCKET/KEY)")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket (expected s3://BUCKET/KEY)")
    return bucket, key.strip("/")


class Store:
    """Objects under one bucket on one endpoint. Keys are full keys in the bucket."""

    def __init__(self, cfg: StorageSection):
        self.cfg = cfg
        self.bucket = cfg.bucket
        self.endpoint = cfg.endpoint or "AWS S3"
        self._session: Any = None
        self._client: Any = None
        self._bounded: dict[float, Any] = {}
        self.gated = True
        self.bound_s: float | None = None  # every request's attempt bounded to this (a lease's own store)

    @property
    def session(self) -> Any:
        """This process's boto3 session: it resolves the credentials once and keeps them (and renews a role's)."""
        if self._session is None:
            self._session = boto3.session.Session()
        return self._session

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._new_client(5, 120, {"max_attempts": CONNECT_ATTEMPTS, "mode": "standard"})
        return self._client

    def _bounded_client(self, attempt_s: float) -> Any:
        """A client whose one attempt ends within `attempt_s` (a third to connect, a third for each socket read
        and write: a request that fits the socket's buffers) and that does not retry by itself: `_call`
        retries, asking the gate each time."""
        if attempt_s not in self._bounded:
            client = self._new_client(attempt_s / 3, attempt_s / 3, {"total_max_attempts": 1})
            client.meta.events.register("before-send.s3", fence.check_before_send)
            self._bounded[attempt_s] = client
        return self._bounded[attempt_s]

    def _new_client(self, connect_s: float, read_s: float, retries: dict[str, Any]) -> Any:
        config = botocore.config.Config(
            connect_timeout=connect_s,
            read_timeout=read_s,
            retries=retries,
            signature_version="s3v4",
            s3={"addressing_style": "path"},
        )
        return self.session.client("s3", endpoint_url=self.cfg.endpoint, region_name=self.cfg.region, config=config)

    def for_lease(self, attempt_s: float) -> Store:
        """This store as a lease's own: not gated (the lease is the gate), each attempt of every request bounded
        to `attempt_s` (a renewal that cannot be had in time counts as missed; a look at the log never hangs)."""
        store = Store.__new__(Store)
        store.__dict__.update(self.__dict__)  # (its session and clients too: copy.copy would drop them)
        store.gated, store.bound_s = False, attempt_s
        return store

    def __getstate__(self) -> dict[str, Any]:
        # A boto3 session and client do not pickle; each process builds its own from its own environment.
        return {**self.__dict__, "_session": None, "_client": None, "_bounded": {}}

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _call(self, what: str, key: str | None, request: Callable[[Any], Any], wait_out_outages: bool = True) -> Any:
        """`request(client)`, with botocore's failures translated and, when `wait_out_outages`, outages waited
        out (see the module's docstring). A write into a leased folder asks the folder's gate before every
        attempt and is bounded to end before the lease's deadline (`dcgan_ray.storage.fence`)."""
        writes = what in WRITES
        gate = fence.gate_for(self.bucket, key) if writes and self.gated and key is not None else None
        bound = gate.attempt_s if gate is not None else self.bound_s
        client = self._bounded_client(bound) if bound is not None else self.client
        attempt = 0
        while True:
            if gate is not None:
                gate.admit()
            try:
                with self._errors(what, key), fence.sending(gate):
                    result = request(client)
            except fence.PastDeadline:
                continue  # (paused on its way out: the gate decides again)
            except _Unreachable as e:
                target = self.uri(key) if key is not None else f"bucket {self.bucket!r}"
                wait = (
                    outage_failed(self.endpoint, self.cfg.retry_budget_s, attempt, e.failure, f"{what} {target}")
                    if wait_out_outages
                    else None
                )
                if wait is None:
                    message = self._unreachable_message(what, key, e.failure, wait_out_outages)
                    raise StorageUnreachable(message) from None
                progress.beat()  # waiting out an outage is not being stuck
                time.sleep(wait)
                attempt += 1
                continue
            outage_over(self.endpoint)
            progress.beat()
            return result

    def _unreachable_message(self, what: str, key: str | None, failure: str, wait_out_outages: bool) -> str:
        target = self.uri(key) if key is not None else f"bucket {self.bucket!r}"
        if not wait_out_outages:
            return (
                f"cannot reach the S3 endpoint {self.endpoint} (tried {CONNECT_ATTEMPTS} times) while trying "
                f"to {what} {target}: {failure}. Is the server up (`cluster/local.sh status` for the dev "
                "stack) and is storage.endpoint right?"
            )
        return (
            f"the S3 endpoint {self.endpoint} did not answer for {outage_seconds(self.endpoint) or 0:.0f} s "
            f"(storage.retry_budget_s = {self.cfg.retry_budget_s:g}) while trying to {what} {target}: "
            f"{failure}. Everything written before is kept: once the endpoint is back, run the command "
            "again (a training job or study resumes from its last checkpoint)"
        )

    @contextlib.contextmanager
    def _errors(self, what: str, key: str | None = None) -> Iterator[None]:
        """Translate botocore failures into messages a user can act on; `_Unreachable` for retryable ones."""
        target = self.uri(key) if key is not None else f"bucket {self.bucket!r}"
        try:
            yield
        except botocore.exceptions.NoCredentialsError:
            raise StorageAuthError(credentials.none_found_message(self.endpoint, what, target)) from None
        except credentials.RESOLUTION_ERRORS as e:
            raise StorageAuthError(credentials.unusable_message(self.endpoint, what, target, e)) from None
        except botocore.exceptions.SSLError as e:
            raise StorageError(
                f"TLS with the S3 endpoint {self.endpoint} failed while trying to {what} {target}: "
                f"{e}. Check storage.endpoint (http:// or https://) and the server's certificate"
            ) from None
        except _TRANSIENT as e:
            raise _Unreachable(type(e).__name__) from None
        except (botocore.exceptions.ClientError, boto3.exceptions.S3UploadFailedError) as e:
            # boto3's upload_file wraps the ClientError it caught (only as the implicit context).
            client_error = e if isinstance(e, botocore.exceptions.ClientError) else e.__context__
            if not isinstance(client_error, botocore.exceptions.ClientError):
                raise StorageError(f"S3 upload to {target} on {self.endpoint} failed: {e}") from None
            code = str(client_error.response.get("Error", {}).get("Code", ""))
            if client_error.operation_name in credentials.STS_OPERATIONS:  # a role refused before any S3 request
                unusable = credentials.unusable_message(self.endpoint, what, target, client_error)
                raise StorageAuthError(unusable) from None
            if code in _AUTH_CODES:
                way = credentials.way_of_session(self.session)
                resource = f"s3://{self.bucket}/{self.cfg.prefix}/"
                raise StorageAuthError(
                    f"S3 endpoint {self.endpoint} rejected the credentials ({way.hint}) while trying to {what} "
                    f"{target} ({code}): {credentials.rejected(way, code, os.environ, resource)}"
                ) from None
            if code == "NoSuchBucket":
                raise BucketMissing(self._bucket_missing_message()) from None
            if code in _MISSING_KEY_CODES:
                raise ObjectMissing(f"{target} does not exist on {self.endpoint}") from None
            if code in _SERVER_BUSY_CODES or code in _CONFLICT_CODES:
                raise _Unreachable(f"the server answered {code}") from None
            raise StorageError(
                f"S3 error {code or '?'} on {self.endpoint} while trying to {what} {target}: "
                f"{client_error.response.get('Error', {}).get('Message', client_error)}"
            ) from None
        except OSError as e:  # (last: botocore's timeouts and TLS errors are OSErrors too)
            if credentials.token_file_of(e, os.environ) is None:  # a local file of ours: not a credential
                raise
            raise StorageAuthError(credentials.unusable_message(self.endpoint, what, target, e)) from None

    def _not_s3_message(self, answer: str) -> str:
        return (
            f"storage.endpoint {self.endpoint} is not an S3 endpoint: listing bucket {self.bucket!r} got {answer}. "
            "Check storage.endpoint (the S3 API's URL and port, e.g. http://127.0.0.1:8333 for the dev stack)"
        )

    def _bucket_missing_message(self) -> str:
        return (
            f"bucket {self.bucket!r} does not exist on {self.endpoint}: create it (e.g. `aws s3 mb "
            f"s3://{self.bucket}`), fix storage.bucket, or set storage.create_bucket: true"
        )

    def check(self) -> None:
        """Fail fast, before any work starts, if the endpoint, credentials or bucket are wrong, or if the
        endpoint is some other HTTP server (it must answer a listing as S3 does).

        Creates the bucket when `storage.create_bucket` is set (the dev stack's configs do).
        """

        def bucket_exists(client: Any) -> bool:
            try:
                # Under the prefix: a policy that lets this project list only its own prefix allows it too.
                listing = client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.cfg.prefix}/", MaxKeys=1)
            except botocore.exceptions.ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                if code == "NoSuchBucket":
                    return False
                if code in _AUTH_CODES or code in _SERVER_BUSY_CODES:
                    raise
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", code)
                raise StorageError(self._not_s3_message(f"HTTP {status}")) from None
            if listing.get("Name") != self.bucket:  # every S3 listing names its bucket
                raise StorageError(self._not_s3_message("a reply that is not an S3 listing"))
            return True

        credentials.check_session(self.session, self.endpoint, "open", f"bucket {self.bucket!r}")
        if self._call("open", None, bucket_exists, wait_out_outages=False):
            return
        if not self.cfg.create_bucket:
            raise BucketMissing(self._bucket_missing_message())
        self._call("create", None, lambda client: client.create_bucket(Bucket=self.bucket))
        log.info("created bucket %s on %s", self.bucket, self.endpoint)

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
            return True
        except ObjectMissing:
            return False

    def head(self, key: str) -> dict[str, Any]:
        return self._call("read", key, lambda client: client.head_object(Bucket=self.bucket, Key=key))

    def get_bytes(self, key: str) -> bytes:
        # The body is read inside the retried call: a connection cut mid-read is retried as a whole.
        return self._call("read", key, lambda client: client.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def create_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        """Write `key` only if no object has that name (PutObject with If-None-Match: *): True when this call
        created it, False when it was there. The server decides, atomically: of writers racing for one name
        exactly one creates it. (A create whose answer was lost and was retried answers False: a caller that
        must know whether it was its own reads the object back.)"""

        def create(client: Any) -> bool:
            try:
                client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, IfNoneMatch="*")
            except botocore.exceptions.ClientError as e:
                if str(e.response.get("Error", {}).get("Code", "")) in _PRECONDITION_CODES:
                    return False
                raise
            return True

        return self._call("create", key, create)

    def age_s(self, key: str) -> float:
        """Seconds since `key` was last written, by the server's clock alone (its Date answer minus the
        object's Last-Modified, each to the second), so a client's wrong clock cannot shift it."""
        head = self.head(key)
        now = email.utils.parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
        return (now - head["LastModified"]).total_seconds()

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream", once: bool = False
    ) -> None:
        """Write `key`; `once`: one try, no waiting out an outage (a lease's renewal, which must not land late)."""
        self._call(
            "write",
            key,
            lambda client: client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type),
            wait_out_outages=not once,
        )

    def upload_file(
        self, path: str | Path, key: str, label: str | None = None, on_bytes: Callable[[int], None] | None = None
    ) -> None:
        """Upload with multipart for big files and a progress line; `on_bytes` also sees each count of bytes sent."""
        size = os.path.getsize(path)

        def upload(client: Any) -> None:
            progress = Progress(label or f"upload {Path(path).name}", size)
            callback: Callable[[int], None] = progress
            if on_bytes is not None:
                also = on_bytes

                def callback(count: int) -> None:
                    progress(count)
                    also(count)

            client.upload_file(str(path), self.bucket, key, Config=TRANSFER, Callback=callback)

        self._call("write", key, upload)

    def download_file(self, key: str, path: str | Path, label: str | None = None) -> None:
        """Download with parallel ranged GETs to `path` (the caller makes it atomic)."""

        def download(client: Any) -> None:
            size = client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
            progress = Progress(label or f"download {key.rsplit('/', 1)[-1]}", size)
            client.download_file(self.bucket, key, str(path), Config=TRANSFER, Callback=progress)

        self._call("read", key, download)

    def list_keys(self, prefix: str, start_after: str = "") -> list[str]:
        """Every key under `prefix` (in S3's order: by UTF-8 bytes), or only those after `start_after`."""

        def list_all(client: Any) -> list[str]:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, StartAfter=start_after
            )
            return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

        return self._call("list", prefix, list_all)

    def list_folders(self, prefix: str) -> list[str]:
        """The names of the 'folders' right under `prefix` (which ends with '/'), without listing their contents."""

        def list_all(client: Any) -> list[str]:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/")
            return [p["Prefix"][len(prefix) :].rstrip("/") for page in pages for p in page.get("CommonPrefixes", [])]

        return self._call("list", prefix, list_all)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start : start + 1000]]
            self._call("delete", chunk[0]["Key"], partial(_delete_objects, bucket=self.bucket, chunk=chunk))


def _delete_objects(client: Any, bucket: str, chunk: list[dict[str, str]]) -> Any:
    return client.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})


class _Unreachable(Exception):
    """Internal: a failure that waiting may fix; `Store._call` retries it or turns it into StorageUnreachable."""

    def __init__(self, failure: str):
        super().__init__(failure)
        self.failure = failure
