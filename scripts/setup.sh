#!/usr/bin/env bash
# Create .venv with dcgan-ray and exactly the versions the tests ran with: every package from
# requirements/test.lock (hash-checked), PyTorch at requirements/torch-version, then the package itself.
#   LOCK=requirements/runtime.lock   without the test tools (a cluster node)
#   VENV=DIR                         another place than .venv (the AWS recipe: ~/venv)
#   TORCH_SPEC=...                   another torch build: the default, torch==<torch-version>, is the CPU
#                                    build these machines carry (/opt/wheels) and PyPI's CUDA build elsewhere
#   DCGAN_RAY_SKIP_BROWSER=1         with the test tools, do not install Debian's chromium (the browser tests
#                                    in tests/test_watch.py need it; the demo does not)
# Refresh the locks with `bash scripts/lock.sh` (README "Pinned installs").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"
venv="${VENV:-.venv}"
lock="${LOCK:-requirements/test.lock}"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  { echo "error: dcgan-ray needs Python >= 3.11; $("$python" -V 2>&1) is $python (set PYTHON=...)" >&2; exit 2; }
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# pip's own failures still show and fail the script; only its noise about empty local indexes goes.
pip_install() {
  "$venv/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip_install --upgrade "pip>=24"
pip_install --require-hashes -r "$lock"
pip_install "${TORCH_SPEC:-torch==$(cat requirements/torch-version)}"
pip_install --no-deps -e .
"$venv/bin/python" -m pip check
# The browser tests open TensorBoard in Debian's headless chromium: a system package, not a wheel.
if [ "$lock" = requirements/test.lock ] && [ "${DCGAN_RAY_SKIP_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
      >/tmp/dcgan-ray-chromium.log 2>&1 || { echo "error: apt-get install chromium failed; see /tmp/dcgan-ray-chromium.log" >&2; exit 1; }
    echo "installed $(chromium --version 2>/dev/null || echo chromium) for the browser tests"
  else
    echo "warning: chromium is not installed and this is not root with apt-get: tests/test_watch.py's browser tests" \
      "will fail until \`apt-get install -y chromium\` (or DCGAN_RAY_SKIP_BROWSER=1 to stop this warning)" >&2
  fi
fi
echo "set up $venv ($("$venv/bin/python" -c 'import torch, ray; print(f"torch {torch.__version__}, ray {ray.__version__}")'))"
