#!/usr/bin/env bash
# Local development stack: SeaweedFS (S3 on 127.0.0.1:8333) and a Ray head (127.0.0.1:6379,
# dashboard/job API http://127.0.0.1:8265); TensorBoard on 127.0.0.1:6006 over the bucket's runs.
# Usage: cluster/local.sh up|down|status|tensorboard
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=dev.env
source "$here/dev.env"
python="${DCGAN_RAY_PYTHON:-$here/../.venv/bin/python}"
[ -x "$python" ] || python=python3
# The Ray head's PATH is its jobs' PATH: `python` in a job entrypoint must be this environment's.
bindir="$(cd "$(dirname "$(command -v "$python")")" && pwd)"
PATH="$bindir:$PATH" exec "$python" -m dcgan_ray.dev.stack "$@"
