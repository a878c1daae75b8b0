"""Errors a user can act on.

Every expected failure raises a subclass of `DcganError` whose message says what failed, which key,
file or URI it concerns, and what to do. The CLI prints these without a traceback; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

from typing import ClassVar


class DcganError(Exception):
    """Base class of the errors the CLI reports as `error: <message>`.

    Library code does not know which job file the user gave; where a message suggests a command that
    takes it, it writes `{config}` and the CLI fills it in (`for_job`).
    """

    def for_job(self, config_path: str | None) -> str:
        return str(self).replace("{config}", config_path or "CONFIG")


class ConfigError(DcganError):
    """A job YAML or a --set override is invalid."""


class StorageError(DcganError):
    """The S3-compatible store failed; subclasses say how."""


class StorageUnreachable(StorageError):
    """No connection to the endpoint after the bounded retries."""


class StorageAuthError(StorageError):
    """Credentials missing or rejected. The message never contains the secret."""


class BucketMissing(StorageError):
    """The configured bucket does not exist."""


class ObjectMissing(StorageError):
    """A key is not in the bucket."""


class DownloadError(DcganError):
    """An http(s) download failed or came back short; callers add what to do instead."""


class DatasetError(DcganError):
    """A dataset file is missing, corrupt or not in SVHN's format."""


class DatasetMissing(DatasetError):
    """The split is not in the bucket; the message names the `prepare` command."""


class CheckpointError(DcganError):
    """A checkpoint cannot be read (truncated, corrupt, wrong format)."""


class ClusterError(DcganError):
    """The Ray cluster cannot run the job as configured (resources, GPUs, address)."""


class LeaseHeld(DcganError):
    """Another live driver holds the lease of the run or study this driver was asked to write."""


class LeaseLost(DcganError):
    """This driver (or its workers) no longer holds the lease: another one took the run over, or it was released."""

    interrupting: ClassVar[LeaseLost | None] = None
    """The loss this process's main thread was interrupted for (`dcgan_ray.train.ownership`): the interrupt
    (a KeyboardInterrupt) can land anywhere, even in the cleanup past the code that turns it into this error,
    and the CLI still ends with this error's one line."""


class Stalled(DcganError):
    """A rank made no progress for the stall window, and the attempt the driver's stall watch ended for it
    was the run's last (dcgan_ray.train.stall)."""
