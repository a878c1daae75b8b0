"""pyarrow's S3 filesystem for what Ray Train and Tune write themselves (their run state, checkpoint
deletions), on the configured endpoint, retrying through outages as `dcgan_ray.storage.s3.Store` does."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import pyarrow.fs

from dcgan_ray.config import StorageSection


class ArrowS3FileSystem(pyarrow.fs.S3FileSystem):
    """pyarrow's S3 filesystem, for what Ray Train and Tune write themselves (their run state, checkpoint
    deletions), with retries that outlast `storage.retry_budget_s` as `Store`'s do.

    pyarrow does not pickle a filesystem's retry strategy, and Ray ships the filesystem to its controller
    and workers: `__reduce__` rebuilds it with the strategy. Credentials are not passed: each process
    resolves them from its own environment, so they are never pickled into what Ray ships.
    """

    def __init__(self, storage: StorageSection):
        kwargs: dict[str, Any] = {"region": storage.region}
        if storage.endpoint is not None:
            url = urlparse(storage.endpoint)
            kwargs.update(endpoint_override=url.netloc, scheme=url.scheme)
        super().__init__(
            retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=arrow_attempts(storage.retry_budget_s)),
            **kwargs,
        )
        self.storage = storage

    def __reduce__(self):
        return ArrowS3FileSystem, (self.storage,)


def arrow_attempts(budget_s: float) -> int:
    """Tries of the AWS SDK's standard strategy whose waits add up to `budget_s` on average.

    Before retry r the SDK waits rand(0..1) x 2^r seconds, at most 20 s, i.e. on average
    min(2^r / 2, 20 - 200 / 2^r) (measured here: 10 tries against a closed port took 84 s).
    """
    waited, retries = 0.0, 0
    while waited < budget_s:
        scale = 2.0**retries
        waited += scale / 2 if scale <= 20 else 20 - 200 / scale
        retries += 1
    return retries + 1
