"""Derive tests/data/crd-schemas.yaml from the KubeRay and Kueue CRDs: the schemas that tests/test_cluster_recipes.py
validates cluster/*.yaml against, for the oldest and the newest release each recipe says it runs on.

    git clone https://github.com/ray-project/kuberay && git clone https://github.com/kubernetes-sigs/kueue
    python scripts/derive_crd_schemas.py --kuberay kuberay/.git --kueue kueue/.git > tests/data/crd-schemas.yaml

Each CRD's openAPIV3Schema, of the API version the recipes use, read with `git show TAG:PATH`, keeps the types,
enums, patterns, bounds and required fields of every field the recipes set (anywhere in cluster/kuberay.yaml
and cluster/kueue.yaml), and lists the names of the others under `other` (accepted as anything). An object that
the CRD does not leave open gets `additionalProperties: false`: unknown field names are refused, as `kubectl
apply` with strict field validation refuses them, so a field that a release lacks fails the tests for that
release. Descriptions, defaults and x-kubernetes-* keys are dropped (CEL rules cannot be checked here). Where
one CRD holds the same schema several times (KubeRay's pod templates), every copy keeps what the recipes set
in any of them, and the copies become one entry of `$defs`. Setting a new field in a recipe means running
this again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["cluster/kuberay.yaml", "cluster/kueue.yaml"]

# (set name, repository option, tag, API version, {kind: CRD file}). The oldest and newest releases each recipe
# states (cluster/README.md "Versions"); Kueue 0.10's v1beta1 for the fallback the README gives for 0.10 to 0.14.
KUBERAY_CRDS = {"RayJob": "ray-operator/config/crd/bases/ray.io_rayjobs.yaml"}
KUEUE_CRDS = {
    kind: f"config/components/crd/bases/kueue.x-k8s.io_{plural}.yaml"
    for kind, plural in [
        ("ResourceFlavor", "resourceflavors"),
        ("ClusterQueue", "clusterqueues"),
        ("LocalQueue", "localqueues"),
        ("WorkloadPriorityClass", "workloadpriorityclasses"),
    ]
}
SETS = [
    ("kuberay-1.5.1", "kuberay", "v1.5.1", "v1", KUBERAY_CRDS),
    ("kuberay-1.7.0", "kuberay", "v1.7.0", "v1", KUBERAY_CRDS),
    ("kueue-0.10.0-v1beta1", "kueue", "v0.10.0", "v1beta1", KUEUE_CRDS),
    ("kueue-0.15.0", "kueue", "v0.15.0", "v1beta2", KUEUE_CRDS),
    ("kueue-0.19.2", "kueue", "v0.19.2", "v1beta2", KUEUE_CRDS),
]
KEPT = {
    "type",
    "enum",
    "pattern",
    "format",
    "required",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "anyOf",
    "oneOf",
    "allOf",
}
SHARED_MIN_CHARS = 400  # a subtree this big that occurs twice goes to $defs


def canonical(node) -> str:
    return json.dumps(node, sort_keys=True)


def merge(a, b):
    """The union of two usage trees (a dict per mapping, {"[]": ...} per list, True per value)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: merge(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in {*a, *b}}
    return a if isinstance(a, dict) else b


def usage(node):
    if isinstance(node, dict):
        return {k: usage(v) for k, v in node.items()}
    if isinstance(node, list):
        merged: object = True
        for item in node:
            merged = merge(merged, usage(item)) if merged is not True else usage(item)
        return {"[]": merged}
    return True


def children(schema: dict, use) -> Iterator[tuple[dict, object]]:
    """(child schema, its usage) for every child that the usage reaches."""
    if not isinstance(use, dict):
        return
    for name, sub in schema.get("properties", {}).items():
        if name in use:
            yield sub, use[name]
    if isinstance(schema.get("additionalProperties"), dict):
        for name, value in use.items():
            if name not in schema.get("properties", {}):
                yield schema["additionalProperties"], value
    if "items" in schema and "[]" in use:
        yield schema["items"], use["[]"]


class Deriver:
    def __init__(self) -> None:
        self.canon: dict[int, str] = {}
        self.shared_use: dict[str, object] = {}

    def key(self, schema: dict) -> str:
        if id(schema) not in self.canon:
            self.canon[id(schema)] = canonical(schema)
        return self.canon[id(schema)]

    def collect(self, schema: dict, use) -> None:
        """Union the usage of every copy of one big schema (KubeRay's pod templates)."""
        k = self.key(schema)
        if len(k) > 20000:
            self.shared_use[k] = merge(self.shared_use[k], use) if k in self.shared_use else use
        for sub, sub_use in children(schema, use):
            self.collect(sub, sub_use)

    def prune(self, schema: dict, use) -> dict:
        use = self.shared_use.get(self.key(schema), use) if len(self.key(schema)) > 20000 else use
        out = {k: v for k, v in schema.items() if k in KEPT}
        used = use if isinstance(use, dict) else {}
        if "properties" in schema:
            props = schema["properties"]
            out["properties"] = {k: self.prune(props[k], used[k]) for k in sorted(used) if k in props}
            if other := sorted(set(props) - set(used)):
                out["other"] = other
            if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
                out["additionalProperties"] = False
        if isinstance(schema.get("additionalProperties"), dict):
            values = [v for k, v in used.items() if k not in schema.get("properties", {})]
            merged: object = True
            for v in values:
                merged = v if merged is True else merge(merged, v)
            out["additionalProperties"] = self.prune(schema["additionalProperties"], merged)
        if "items" in schema:
            out["items"] = self.prune(schema["items"], used.get("[]", True))
        return out


def name_of(path: list[str]) -> str:
    """A $defs name from where the subtree was first seen: `containers`, `containers.item`, `limits.value`."""
    suffix = {"items": ".item", "additionalProperties": ".value"}.get(path[-1], "")
    parts = [p for p in path if p not in ("properties", "items", "additionalProperties")]
    return (parts[-1] if parts else "root") + suffix


def share(schemas: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Move every big subtree that occurs more than once into $defs, outermost first."""
    counts: dict[str, int] = {}
    first_path: dict[str, list[str]] = {}

    def walk(node, path, is_schema=True):
        if isinstance(node, dict):
            k = canonical(node)
            if is_schema and len(k) >= SHARED_MIN_CHARS and len(path) > 1:
                counts[k] = counts.get(k, 0) + 1
                first_path.setdefault(k, path)
            for key, value in node.items():  # the value of `properties` maps names to schemas: not a schema
                walk(value, [*path, key], is_schema=is_schema and key != "properties" or not is_schema)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, [*path, str(i)])

    for kind, schema in schemas.items():
        walk(schema, [kind])
    shared = sorted((k for k, n in counts.items() if n > 1), key=len, reverse=True)
    defs: dict[str, dict] = {}
    names: dict[str, str] = {}
    for k in shared:
        name = name_of(first_path[k])
        while name in defs:
            name += "_"
        names[k] = name
        defs[name] = json.loads(k)

    def replace(node, top=False, is_schema=True):
        if isinstance(node, dict):
            k = canonical(node)
            if is_schema and not top and k in names:
                return {"$ref": f"#/$defs/{names[k]}"}
            return {
                key: replace(value, is_schema=not (is_schema and key == "properties")) for key, value in node.items()
            }
        if isinstance(node, list):
            return [replace(v) for v in node]
        return node

    # A def that holds another shared subtree refers to it too (the outer one is replaced first).
    return {kind: replace(s) for kind, s in schemas.items()}, {n: replace(d, top=True) for n, d in defs.items()}


def crd_schema(git_dir: str, tag: str, path: str, version: str) -> dict:
    text = subprocess.run(
        ["git", "--git-dir", git_dir, "show", f"{tag}:{path}"], capture_output=True, check=True
    ).stdout
    crd = yaml.safe_load(text)
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return entry["schema"]["openAPIV3Schema"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kuberay", required=True, help="the git directory of a ray-project/kuberay clone")
    parser.add_argument("--kueue", required=True, help="the git directory of a kubernetes-sigs/kueue clone")
    args = parser.parse_args()
    docs = [d for name in RECIPES for d in yaml.safe_load_all((REPO / name).read_text()) if d]
    by_kind: dict[str, object] = {}
    for doc in docs:
        by_kind[doc["kind"]] = merge(by_kind[doc["kind"]], usage(doc)) if doc["kind"] in by_kind else usage(doc)

    sources, out = {}, {}
    for set_name, repo, tag, version, crds in SETS:
        git_dir = getattr(args, repo)
        commit = subprocess.run(
            ["git", "--git-dir", git_dir, "rev-parse", f"{tag}^{{commit}}"], capture_output=True, text=True, check=True
        ).stdout.strip()
        schemas = {}
        for kind, path in crds.items():
            if kind not in by_kind:
                continue
            full = crd_schema(git_dir, tag, path, version)
            deriver = Deriver()
            deriver.collect(full, by_kind[kind])
            schemas[kind] = deriver.prune(full, by_kind[kind])
        schemas, defs = share(schemas)
        repository = {"kuberay": "ray-project/kuberay", "kueue": "kubernetes-sigs/kueue"}[repo]
        sources[set_name] = {"repository": repository, "tag": tag, "commit": commit, "version": version}
        out[set_name] = {**schemas, "$defs": defs}

    header = "\n".join(f"# {line}" for line in (__doc__ or "").split("\n\n")[0].splitlines())
    print(f"{header}\n# Made by scripts/derive_crd_schemas.py (its docstring says how); do not edit.")
    print(yaml.safe_dump({"sources": sources, "schemas": out}, sort_keys=False, width=120), end="")


if __name__ == "__main__":
    sys.exit(main())
