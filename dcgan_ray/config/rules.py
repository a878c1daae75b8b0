"""The rules config values follow, kept beside the fields they check (`field(metadata=rule(...))`), and the
naming rule every name that becomes a key in the shared bucket obeys."""

from __future__ import annotations

import re
import typing
from typing import Any

SPLIT_NAMES = ("train", "test", "extra")


def is_http_url(text: str) -> bool:
    """An http:// or https:// URL with something after the scheme (S3 endpoints: the config's and --endpoint)."""
    return isinstance(text, str) and text.startswith(("http://", "https://")) and bool(text.split("://", 1)[1])


def rule(ok: typing.Callable[[Any], bool], allowed: str) -> dict[str, Any]:
    """A field's range check, kept beside the field: `ok(value)` must hold; `allowed` says what does."""
    return {"rule": (ok, allowed)}


AT_LEAST_1 = rule(lambda v: v >= 1, "an integer >= 1")
NULL_OR_AT_LEAST_1 = rule(lambda v: v is None or v >= 1, "null or an integer >= 1")
POSITIVE = rule(lambda v: v > 0, "a number > 0")
NULL_OR_POSITIVE = rule(lambda v: v is None or v > 0, "null or a number > 0")
UNIT_INTERVAL = rule(lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
SPLIT = rule(lambda v: v in SPLIT_NAMES, f"one of {', '.join(SPLIT_NAMES)}")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""Run, dataset and study names and each segment of a key prefix: they become keys in a shared bucket
and Ray submission ids, so no '/', no '.' or '..', nothing that starts with '.' or '-', at most 100."""
NAME_RULE = "1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_name(value: Any) -> bool:
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None


def is_prefix(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 512 and all(is_name(part) for part in value.split("/"))


NAME = rule(is_name, f"a name of {NAME_RULE}")
NULL_OR_NAME = rule(lambda v: v is None or is_name(v), f"null or a name of {NAME_RULE}")
PREFIX = rule(is_prefix, f"a key prefix: names of {NAME_RULE}, joined by '/'")
NULL_OR_PREFIX = rule(lambda v: v is None or is_prefix(v), f"null or a key prefix: names of {NAME_RULE}, joined by '/'")
