"""The package's layers (docs/architecture.md): each imports only the layers above it, so the GAN can be
read, tested and benchmarked without Ray, S3 or a cluster, and no two packages need each other."""

import ast
from pathlib import Path

from helpers import REPO

LAYERS = [
    {"errors", "logs", "faults", "progress"},
    {"ray_internals"},
    {"config"},
    {"gan"},
    {"storage"},
    {"data"},
    {"quality"},
    {"report"},
    {"train"},
    {"study"},
    {"jobs", "recovery", "spot"},
    {"dev"},
    {"cli", "__main__"},
]
PACKAGE = REPO / "dcgan_ray"


def layer_of(part: str) -> int:
    (index,) = [i for i, names in enumerate(LAYERS) if part in names]
    return index


def imported_parts(path: Path) -> set[str]:
    """The top-level parts of dcgan_ray (package or module) that a file imports, at any depth of the file."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "dcgan_ray":
                parts |= {alias.name for alias in node.names}
            elif node.module.startswith("dcgan_ray."):
                parts.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            parts |= {a.name.split(".")[1] for a in node.names if a.name.startswith("dcgan_ray.")}
    return parts


def test_every_part_of_the_package_has_a_layer():
    parts = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()
    }
    assert parts == set().union(*LAYERS)


def test_each_layer_imports_only_the_layers_above_it():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).parts
        own = rel[0] if len(rel) > 1 else path.stem
        if own == "__init__":
            continue
        for part in imported_parts(path) - {own}:
            if layer_of(part) > layer_of(own):
                wrong.append(f"{path.relative_to(REPO)} imports dcgan_ray.{part}")
    assert not wrong, "\n".join(wrong)


MAX_MODULE_LINES = 420
"""A module past this has outgrown its room: where do its concerns part? (issue 24 split cli and the tuner)"""


def test_no_module_has_outgrown_its_room():
    sizes = {path.relative_to(REPO): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES} == {}
