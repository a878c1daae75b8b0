"""Loading a job: YAML file, then `--set key=value` overrides, into `JobConfig`, every value checked.

Precedence, lowest to highest: the defaults in `sections`, the file the YAML `extends` (if any), the YAML
file, then command-line overrides (`--set train.epochs=2`). `extends: PATH` (relative to the file) lets a
site keep only what differs, e.g. a cluster's storage on top of jobs/svhn.yaml (cluster/k8s-job.yaml):
mappings merge key by key, any other value replaces the base's. Unknown keys, wrong types and values out of
range raise `ConfigError` naming the key, the file and what is allowed. Secrets never live here: S3
credentials come from the environment only (see `dcgan_ray.storage.s3`).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from dcgan_ray.config.sections import METRICS, JobConfig
from dcgan_ray.errors import ConfigError


def _convert(value: Any, annotation: Any, key: str, where: str) -> Any:
    """Check `value` against a field's annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [a for a in options if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], key, where)
        for option in inner:  # e.g. int | list[int]: the first form the value has
            try:
                return _convert(value, option, key, where)
            except ConfigError:
                pass
        forms = " or ".join(getattr(o, "__name__", None) or str(o) for o in inner)
        raise ConfigError(f"{where}: `{key}` must be {forms}, got {value!r}")
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: `{key}` must be a mapping, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: `{key}` must be a list, got {value!r}")
        return [_convert(v, item, key, where) for v in value]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads `2e-4` (no dot) as a string; accept what a person means.
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: `{key}` must be {annotation.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, data: Any, prefix: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: `{prefix or 'the top level'}` must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        if key in MOVED:
            raise ConfigError(f"{where}: `{key}` is now `{MOVED[key]}`; rename it")
        # A key with a line break or other control character is shown escaped: the error stays one line.
        shown = key if key.isprintable() else ascii(key)
        raise ConfigError(f"{where}: unknown key `{shown}`; allowed here: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        annotation = hints[name]
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, f"{key}.", where)
        else:
            kwargs[name] = _convert(value, annotation, key, where)
    return cls(**kwargs)


def _validate(cfg: Any, where: str, prefix: str = "") -> None:
    """Check every field against the rule beside it, section by section, then the rules across fields."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _validate(value, where, f"{prefix}{f.name}.")
        elif "rule" in f.metadata and not f.metadata["rule"][0](value):
            raise ConfigError(
                f"{where}: `{prefix}{f.name}` = {value!r} is not allowed; expected {f.metadata['rule'][1]}"
            )
    if prefix:
        return
    needed = METRICS[cfg.eval.metric]
    if cfg.eval.every_epochs and needed not in cfg.eval.extractors:
        raise ConfigError(f"{where}: `eval.metric` = {cfg.eval.metric!r} needs {needed!r} in `eval.extractors`")
    if cfg.eval.in_task and cfg.eval.every_epochs and cfg.eval.every_epochs % cfg.checkpoint.every_epochs:
        # The task scores a checkpoint: an eval epoch without one would have nothing to score.
        raise ConfigError(
            f"{where}: `eval.in_task` scores checkpoints, so every eval epoch must be a checkpoint "
            f"epoch, but `eval.every_epochs` = {cfg.eval.every_epochs} is not a multiple of "
            f"`checkpoint.every_epochs` = {cfg.checkpoint.every_epochs}; change one of them or set "
            "eval.in_task: false"
        )
    if cfg.speed.compile == "reduce-overhead" and not cfg.scaling.use_gpu:
        # On CPU torch would skip the CUDA graphs silently and run plain `default`: say so instead.
        raise ConfigError(
            f"{where}: `speed.compile` = 'reduce-overhead' records CUDA graphs and needs "
            "`scaling.use_gpu: true`; on CPU use `speed.compile: default`"
        )
    _validate_space(cfg, where)


MOVED = {"tune.metric": "eval.metric"}
"""Keys of earlier versions and where they went (one metric picks the best checkpoint and ranks trials)."""

SPACE_FORMS = ("grid", "choice", "loguniform", "uniform")


def _validate_space(cfg: JobConfig, where: str) -> None:
    """Each searched key must be a real config value and each form well made; every listed value is
    checked by building the config with it, so a study never dies on trial 17 of a typo."""
    flat = _flatten(cfg.to_dict())
    for key, spec in cfg.tune.space.items():
        if key not in flat or key.startswith("tune."):
            raise ConfigError(
                f"{where}: `tune.space` searches `{key}`, which is not a job setting "
                "(use dotted keys such as train.lr_d or model.alpha)"
            )
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_FORMS:
            raise ConfigError(
                f"{where}: `tune.space.{key}` must be one of "
                + ", ".join(f"{{{form}: ...}}" for form in SPACE_FORMS)
                + f", got {spec!r}"
            )
        form, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: `tune.space.{key}.{form}` must be a non-empty list")
        if form in ("loguniform", "uniform"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                raise ConfigError(f"{where}: `tune.space.{key}.{form}` must be [low, high] with low < high")
            if form == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{where}: `tune.space.{key}.loguniform` needs low > 0")
        for value in values:
            data = cfg.to_dict()
            data["tune"] = {}
            set_dotted(data, key, value)
            _validate(
                _build(JobConfig, data, "", f"{where} (tune.space.{key} = {value!r})"),
                f"{where} (tune.space.{key} = {value!r})",
            )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: the problem, where it is, and what it was parsing (its own text spans
    several lines and quotes the input with a caret)."""
    if not isinstance(e, yaml.MarkedYAMLError) or e.problem is None:
        return " ".join(str(e).split())
    where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
    context = ""
    if e.context:
        mark = e.context_mark
        context = f" ({e.context}" + (f" at line {mark.line + 1}, column {mark.column + 1})" if mark else ")")
    return f"{e.problem}{where}{context}"


def parse_override(text: str) -> tuple[str, Any]:
    """`train.epochs=2` -> ("train.epochs", 2); the value is parsed as YAML (so `null`, lists work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e.problem})") from None
    return key.strip(), value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """data["train"]["lr"] = value for key "train.lr", creating sections as needed."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"`{key}`: `{part}` is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        key, value = parse_override(text)
        try:
            set_dotted(data, key, value)
        except ConfigError as e:
            raise ConfigError(f"override {text!r}: {e}") from None
    return data


def config_from_dict(data: dict[str, Any], where: str = "config", overrides: Sequence[str] = ()) -> JobConfig:
    data = apply_overrides(copy.deepcopy(data), list(overrides))
    where = f"{where} (with --set {' '.join(overrides)})" if overrides else where
    cfg = _build(JobConfig, data, "", where)
    _validate(cfg, where)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> JobConfig:
    """Load a job YAML (and the file it extends), apply `key=value` overrides, check every value."""
    return config_from_dict(read_job_file(path), str(path), overrides)


def read_job_file(path: str | Path) -> Any:
    """A job YAML's content, the file it extends merged in (no comments survive, and no key holds a secret)."""
    return _read_job_yaml(Path(path))


MAX_EXTENDS = 8
"""How many files deep `extends` may chain (a loop is refused before that)."""


def _read_job_yaml(path: Path, extended_by: tuple[Path, ...] = ()) -> Any:
    try:
        text = path.read_text()
    except (FileNotFoundError, IsADirectoryError):
        by = f" (extended by {extended_by[-1]})" if extended_by else " (the examples live in jobs/)"
        raise ConfigError(f"job file {path} does not exist{by}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict) or "extends" not in data:
        return data
    base = data.pop("extends")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: `extends` must be the path of another job YAML, got {base!r}")
    base_path = path.parent / base
    chain = (*extended_by, path)
    if base_path.resolve() in {p.resolve() for p in chain}:
        raise ConfigError(f"{path}: `extends: {base}` makes a loop ({' -> '.join(map(str, (*chain, base_path)))})")
    if len(chain) >= MAX_EXTENDS:
        raise ConfigError(f"{path}: `extends` chains more than {MAX_EXTENDS} files; extend the base directly")
    based = _read_job_yaml(base_path, chain)
    if not isinstance(based, dict):
        raise ConfigError(f"{base_path} (extended by {path}): the top level must be a mapping of job settings")
    return _merged(based, data)


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out
