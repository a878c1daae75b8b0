#!/usr/bin/env bash
# The tag of the image built from this checkout: the package's version and the first 12 hex digits of the sha256
# of what the image is made of besides the package (the Dockerfile and the three locks it installs). A tag so
# names one content: a new lock, torch or base image gives a new tag, and a node that has the old image (the
# recipes pull IfNotPresent) cannot mistake it for the new one. A change of the package's code alone keeps the
# tag: bump the version in pyproject.toml for it. The recipes (cluster/kuberay.yaml, cluster/kueue.yaml) name
# this tag with -cpu (head, submitter) and -gpu (workers); tests/test_image.py checks they agree.
#   bash scripts/image-tag.sh        e.g. 0.1.0-3f9c2b1a7d4e
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)"
digest="$(cat Dockerfile requirements/runtime.lock requirements/torch-cpu.lock requirements/torch-gpu.lock | sha256sum | cut -c1-12)"
echo "$version-$digest"
