"""`pip check` for what the locks install, not for the whole environment.

    python scripts/check_installed.py requirements/runtime.lock requirements/torch-gpu.lock --package dcgan-ray

A base image brings packages of its own (Ray's image: its conda environment), whose conflicts among themselves
are not this project's: `pip check` fails the build on them, or passes while ours is wrong. This checks from
the locks and the named packages down: every distribution a lock pins (where its environment marker applies)
is installed at that version; every requirement of those and of the named packages, extras and markers
evaluated, is met by what is installed and is itself pinned by a lock (nothing the project runs comes from
the base image unpinned). Prints one line per problem and exits 1, else one line of what it checked.
Needs only `packaging` (runtime.lock pins it) and the standard library.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def pins(lock: Path) -> dict[str, Version]:
    """name -> version of each entry of a hash-pinned lock whose marker applies here."""
    found = {}
    text = re.sub(r"\\\n", " ", lock.read_text())
    for line in text.splitlines():
        line = line.split(" --hash=")[0].split("  #")[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        (spec,) = req.specifier
        found[canonicalize_name(req.name)] = Version(spec.version)
    return found


def installed(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def check(locks: list[Path], packages: list[str]) -> tuple[list[str], int]:
    pinned: dict[str, Version] = {}
    for lock in locks:
        pinned.update(pins(lock))
    problems = []
    for name, version in sorted(pinned.items()):
        dist = installed(name)
        if dist is None:
            problems.append(f"{name}=={version} is pinned but not installed")
        elif Version(dist.version) != version:
            problems.append(f"{name} is {dist.version}, the lock pins {version}")
    queue = [(name, frozenset[str]()) for name in [*pinned, *map(canonicalize_name, packages)]]
    seen: set[tuple[str, frozenset[str]]] = set()
    while queue:
        name, extras = queue.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        dist = installed(name)
        if dist is None:
            if name not in pinned:  # (a pinned one is already reported)
                problems.append(f"{name} is not installed")
            continue
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in {"", *extras}):
                continue
            dep_name = canonicalize_name(req.name)
            dep = installed(dep_name)
            if dep is None:
                problems.append(f"{name} requires {req}, which is not installed")
                continue
            if not req.specifier.contains(dep.version, prereleases=True):
                problems.append(f"{name} requires {req}, but {dep_name} {dep.version} is installed")
            if dep_name not in pinned:
                problems.append(f"{name} requires {dep_name}, which no lock pins ({dep.version} came from elsewhere)")
            queue.append((dep_name, frozenset(req.extras)))
    return sorted(set(problems)), len(seen)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("locks", nargs="+", type=Path)
    parser.add_argument("--package", action="append", default=[], help="a package whose requirements must be met")
    args = parser.parse_args()
    problems, checked = check(args.locks, args.package)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {checked} packages (with the extras asked of them) as {', '.join(map(str, args.locks))} pin them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
