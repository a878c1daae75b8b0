"""Checks for what is read back from the bucket.

The bucket is shared: whoever can write to it (another user, another job, a damaged upload) can put
anything where this project expects its own JSON. Every field a reader uses goes through one of these
checks first (type, range, digest, key under its own prefix), so a planted object ends in the reader's
one-line error naming the object, never in a traceback, a path outside the cache or a huge allocation.
The checks raise `NotOurs` with what is wrong; each reader turns it into its own error type and says
what to do.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from dcgan_ray.config.rules import NAME_PATTERN

SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_JSON_BYTES = 16 * 2**20
"""No manifest this project writes comes near this (run.json of a 10,000-epoch run is ~5 MB)."""


class NotOurs(Exception):
    """Internal: the object is not what this project writes; the message says which field and why."""


PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def member(parent: str, key: Any) -> str:
    """How an error names `parent`'s member `key`, a key read from the bucket: `parent.key` for a plain
    key, else quoted and cut to 40 characters, so that a planted key can neither break the error's one line
    nor make it long."""
    if isinstance(key, str) and PLAIN_KEY.fullmatch(key):
        return f"{parent}.{key}"
    text = str(key)
    return f"{parent}[{(text[:40] + '...' if len(text) > 40 else text)!r}]"


def parse_json(blob: bytes) -> Any:
    if len(blob) > MAX_JSON_BYTES:
        raise NotOurs(f"it has {len(blob)} bytes, more than any manifest this project writes")
    try:
        return json.loads(blob)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise NotOurs(f"it is not JSON ({type(e).__name__})") from None


def mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise NotOurs(f"{what} is not a mapping")
    return value


def listing(value: Any, what: str, max_items: int = 100_000) -> list[Any]:
    if not isinstance(value, list) or len(value) > max_items:
        raise NotOurs(f"{what} is not a list of at most {max_items} items")
    return value


def integer(value: Any, what: str, low: int = 0, high: int = 2**53) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise NotOurs(f"{what} is not an integer in [{low}, {high}]")
    return value


def number(value: Any, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise NotOurs(f"{what} is not a finite number")
    return float(value)


def text(value: Any, what: str, max_length: int = 4096) -> str:
    if not isinstance(value, str) or len(value) > max_length:
        raise NotOurs(f"{what} is not a string of at most {max_length} characters")
    return value


def sha256(value: Any, what: str) -> str:
    if not isinstance(value, str) or not SHA256.fullmatch(value):
        raise NotOurs(f"{what} is not a sha256 hex digest")
    return value


def key_under(value: Any, prefix: str, what: str) -> str:
    """A key inside `prefix/` whose every further segment is a plain name (no '..', no empty segment)."""
    if (
        not isinstance(value, str)
        or not value.startswith(prefix + "/")
        or not all(NAME_PATTERN.fullmatch(part) for part in value[len(prefix) + 1 :].split("/"))
    ):
        raise NotOurs(f"{what} is not a key under {prefix}/")
    return value
