"""How much the image's torch layer downloads: each package of a torch lock at its pinned version, as the wheel
pip picks for CPython 3.11 on Linux x86-64, sized from PyPI's JSON simple API (PEP 691). The GPU image's layer
is PyPI's torch with the CUDA runtime it brings; the CPU image's is one wheel from PyTorch's own index (not
reachable from these machines: `ls -l` the wheel instead).

  python benchmarks/torch_layer_size.py requirements/torch-gpu.lock
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request

from packaging.tags import Tag
from packaging.utils import parse_wheel_filename

# The tags of CPython 3.11 on manylinux x86-64, most specific first (what pip prefers).
TAGS = [
    Tag(interpreter, abi, platform)
    for interpreter, abi in (("cp311", "cp311"), ("cp311", "abi3"), ("py3", "none"), ("py2.py3", "none"))
    for platform in [f"manylinux_2_{minor}_x86_64" for minor in range(40, 4, -1)]
    + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "any"]
]


def wheel(name: str, version: str) -> dict:
    request = urllib.request.Request(
        f"https://pypi.org/simple/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        files = json.load(answer)["files"]
    ranked = []
    for f in files:
        if f["filename"].endswith(".whl"):
            _, found, _, tags = parse_wheel_filename(f["filename"])
            ranks = [TAGS.index(t) for t in tags if t in TAGS]
            if str(found) == version and ranks:
                ranked.append((min(ranks), f))
    if not ranked:
        raise SystemExit(f"no wheel of {name}=={version} for CPython 3.11 on Linux x86-64")
    return min(ranked, key=lambda r: r[0])[1]


def main() -> None:
    pins = re.findall(r"^([a-z0-9][a-z0-9._-]*)==([^ ;\\]+)", open(sys.argv[1]).read(), re.M)
    total = 0
    for name, version in pins:
        f = wheel(name, version)
        total += f["size"]
        print(f"{f['size'] / 1e6:9.1f} MB  {f['filename']}")
    print(f"{total / 1e9:.2f} GB in {len(pins)} wheels")


if __name__ == "__main__":
    main()
