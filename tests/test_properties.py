"""Property tests (Hypothesis): whatever a user types or a bucket holds, the config loader and every reader
of bucket JSON either succeed or raise this project's own one-line error, never anything else.

No server and no cluster: the readers' checks are pure functions of what was read (each reader's
conversion of their error into its user-facing one is tested against the real SeaweedFS elsewhere:
tests/test_bad_inputs.py, tests/test_untrusted_bucket.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dcgan_ray.config import JobConfig, config_from_dict, load_config
from dcgan_ray.config.rules import is_name
from dcgan_ray.data.svhn import IMAGE_BYTES, check_split_manifest
from dcgan_ray.errors import CheckpointError, ConfigError
from dcgan_ray.quality.classifier import DigitClassifier, load_classifier, save_state
from dcgan_ray.storage import checks
from dcgan_ray.storage.checkpoint import CHECKPOINT_FILE, manifest_bytes, verify
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.runs import check_result, check_run_manifest
from dcgan_ray.study.state import check_study_state

EXAMPLES = 300
"""Per property; the eight properties below run 2,400 examples together (about 20 s here)."""
fast = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)


def one_line(error: BaseException) -> None:
    assert str(error) and "\n" not in str(error)


def mutate(data: Any, draw) -> Any:
    """`data` with one field somewhere replaced by an arbitrary JSON value (or removed)."""
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(data, ())
    path = draw(st.sampled_from(paths))
    if not path:
        return draw(json_values)
    out = copy.deepcopy(data)
    node = out
    for part in path[:-1]:
        node = node[part]
    if isinstance(node, dict) and draw(st.booleans()):
        del node[path[-1]]
    else:
        node[path[-1]] = draw(json_values)
    return out


# --- the config loader --------------------------------------------------------------------------------

KEYS = [
    "name",
    "model.z_dim",
    "model.g_features",
    "train.epochs",
    "train.lr",
    "train.seed",
    "train.batch_size",
    "train.label_smoothing",
    "data.dataset",
    "data.split",
    "eval.every_epochs",
    "eval.metric",
    "eval.extractors",
    "scaling.num_workers",
    "scaling.use_gpu",
    "storage.prefix",
    "storage.bucket",
    "storage.endpoint",
    "storage.retry_budget_s",
    "tune.study",
    "tune.space",
    "sample.grid_size",
    "nonsense.key",
    "train",
    "speed.compile",
    "extends",
]


@fast
@given(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=5))
@example({"train": {"\n": None}})  # found by a CI run: an unknown key with a line break
def test_any_config_mapping_loads_or_names_its_problem(changes):
    data = JobConfig().to_dict()
    overrides = []
    for key, value in changes.items():
        overrides.append(f"{key}={json.dumps(value)}")
    try:
        cfg = config_from_dict(data, "job.yaml", overrides)
    except ConfigError as e:
        one_line(e)
        return
    # What loads is valid: names stay names, numbers stay finite where they must.
    assert is_name(cfg.name) and is_name(cfg.data.dataset)
    assert 0 < cfg.storage.retry_budget_s <= 86400 and 0 <= cfg.train.seed < 2**31
    assert all(is_name(part) for part in cfg.storage.prefix.split("/"))


_yaml_dir = Path(tempfile.mkdtemp(prefix="dcgan-properties-"))


@fast
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_any_yaml_text_loads_or_names_its_problem(text):
    path = _yaml_dir / "job.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as e:
        one_line(e)


# --- readers of bucket JSON ---------------------------------------------------------------------------

PREFIX = "p/data/svhn/train"


def valid_split_manifest() -> dict[str, Any]:
    digest = hashlib.sha256(b"x").hexdigest()
    return {
        "version": 1,
        "count": 3,
        "objects": [
            {"key": f"{PREFIX}/images-000-{digest[:16]}.u8", "sha256": digest, "bytes": 2 * IMAGE_BYTES, "count": 2},
            {"key": f"{PREFIX}/images-001-{digest[:16]}.u8", "sha256": digest, "bytes": IMAGE_BYTES, "count": 1},
        ],
        "labels": {"key": f"{PREFIX}/labels-{digest[:16]}.u8", "sha256": digest, "bytes": 3},
        "source": {"sha256": digest, "origin": "test", "file": "train_32x32.mat"},
    }


def test_the_valid_examples_pass():
    check_split_manifest(valid_split_manifest(), PREFIX)
    check_run_manifest(valid_run_manifest(), LAYOUT)
    check_result(valid_result(), LAYOUT)
    check_study_state({"version": 1, "trials": {"t-0": {"state": "TERMINATED", "error": None}}})


@fast
@given(st.data())
def test_split_manifests_are_used_only_when_every_field_checks_out(data):
    manifest = mutate(valid_split_manifest(), data.draw)
    try:
        checked = check_split_manifest(manifest, PREFIX)
    except checks.NotOurs as e:
        one_line(e)
        return
    # What passes names cache files by digest only, under the split's prefix, with sizes that add up.
    objects = [*checked["objects"], checked["labels"]]
    assert all(
        checks.SHA256.fullmatch(o["sha256"]) and o["key"].startswith(PREFIX + "/") and ".." not in o["key"]
        for o in objects
    )
    assert sum(o["count"] for o in checked["objects"]) == checked["count"] == checked["labels"]["bytes"]


LAYOUT = RunLayout("b", "p/runs/r")


def valid_run_manifest() -> dict[str, Any]:
    return {
        "name": "r",
        "status": "running",
        "epochs_total": 3,
        "epochs_completed": 1,
        "history": [{"epoch": 0}, {"epoch": 1, "digit_fd": 3.0}],
        "samples": {"latest": None},
        "checkpoints": {
            "latest": f"{LAYOUT.uri}/checkpoint_epoch_0001",
            "best": {"epoch": 1, "value": 3.0, "metric": "digit_fd", "uri": f"{LAYOUT.uri}/best"},
        },
    }


@fast
@given(st.data())
def test_run_manifests_are_used_only_when_every_field_checks_out(data):
    manifest = mutate(valid_run_manifest(), data.draw)
    try:
        checked = check_run_manifest(manifest, LAYOUT)
    except checks.NotOurs as e:
        one_line(e)
        return
    latest = checked.get("checkpoints", {}).get("latest")
    assert latest is None or latest.startswith(LAYOUT.uri + "/")
    assert all(isinstance(h["epoch"], int) for h in checked.get("history", []))


def valid_result() -> dict[str, Any]:
    return {
        "epoch": 2,
        "metrics": {"digit_fd": 4.5},
        "best": {"epoch": 2, "value": 4.5, "metric": "digit_fd", "uri": f"{LAYOUT.uri}/best"},
    }


@fast
@given(st.data())
def test_scoring_results_and_study_states_check_out_or_are_refused(data):
    result = mutate(valid_result(), data.draw)
    try:
        checked = check_result(result, LAYOUT)
        assert all(math.isfinite(v) for v in checked.get("metrics", {}).values())
    except checks.NotOurs as e:
        one_line(e)
    state = mutate(
        {
            "version": 1,
            "trials": {"t-0": {"state": "TERMINATED", "error": None}, "t-1": {"state": "ERROR", "error": "x"}},
        },
        data.draw,
    )
    try:
        check_study_state(state)
    except checks.NotOurs as e:
        one_line(e)


CHECKPOINT = b"not really a checkpoint, but bytes the manifest describes"


@fast
@given(st.data())
def test_checkpoint_manifests_are_verified_or_the_checkpoint_is_torn(data):
    manifest = json.loads(manifest_bytes({CHECKPOINT_FILE: CHECKPOINT}, 1))
    blob = data.draw(st.one_of(st.just(json.dumps(mutate(manifest, data.draw)).encode()), st.binary(max_size=64)))
    try:
        verify({CHECKPOINT_FILE: CHECKPOINT}, blob, "s3://b/p/runs/r/checkpoint_epoch_0001")
    except CheckpointError as e:
        one_line(e)
        return
    listed = json.loads(blob)["files"][CHECKPOINT_FILE]
    assert listed["sha256"] == hashlib.sha256(CHECKPOINT).hexdigest() and listed["bytes"] == len(CHECKPOINT)


SMALL_CLASSIFIER = save_state(DigitClassifier(feature_dim=4))


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_classifier_states_load_or_are_refused(data):
    state = {**SMALL_CLASSIFIER, "state": dict(SMALL_CLASSIFIER["state"])}
    field = data.draw(st.sampled_from(["arch", "feature_dim", "state", "a tensor"]))
    if field == "a tensor":
        name = data.draw(st.sampled_from(sorted(state["state"])))
        state["state"][name] = data.draw(st.one_of(json_scalars, st.just(torch.zeros(3))))
    else:
        state[field] = data.draw(json_values)
    try:
        model = load_classifier(state)
    except CheckpointError as e:
        one_line(e)
        return
    assert 1 <= model.feature_dim <= 4096


@pytest.mark.parametrize("planted", ["/proc/self/environ", "../../etc/passwd", "A" * 64, "0" * 63])
def test_a_planted_digest_never_names_a_file(planted):
    manifest = valid_split_manifest()
    manifest["objects"][0]["sha256"] = planted
    with pytest.raises(checks.NotOurs, match=r"objects\[0\]\.sha256 is not a sha256 hex digest"):
        check_split_manifest(manifest, PREFIX)
