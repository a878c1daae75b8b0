#!/usr/bin/env bash
# The README's first command: set up, bring up the local stack (SeaweedFS S3 + Ray head), put
# offline SVHN-format digits into the bucket, and train the demo job through `ray job submit`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DCGAN_RAY_SKIP_BROWSER=1 bash scripts/setup.sh  # (the browser is for the tests)
source cluster/dev.env
source .venv/bin/activate
cluster/local.sh up

# SVHN's official URL needs the internet; these files have its exact format (see docs/clusters.md for real SVHN).
data="${DCGAN_RAY_DEMO_DATA:-$HOME/.cache/dcgan-ray/offline-svhn}"
mkdir -p "$data"
[ -f "$data/train_32x32.mat" ] || dcgan-ray data synth "$data/train_32x32.mat" --n 12000 --seed 1
[ -f "$data/test_32x32.mat" ] || dcgan-ray data synth "$data/test_32x32.mat" --n 4000 --seed 2
dcgan-ray data prepare jobs/demo.yaml --from "$data"
# Where things are in the bucket: asked of the CLI, never spelled here.
uri() { dcgan-ray paths jobs/demo.yaml "$1"; }
in_bucket() { python -c "import boto3,sys; b,_,k=sys.argv[1][5:].partition('/'); boto3.client('s3').head_object(Bucket=b, Key=k)" "$1" 2>/dev/null; }
# The digit classifier behind the digit_fd quality metric (once; the second run finds it in the bucket).
in_bucket "$(uri classifier)" || dcgan-ray classifier train jobs/demo.yaml

ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m dcgan_ray train jobs/demo.yaml "$@"

# Copies to look at right away; the originals stay in the bucket.
mkdir -p demo-output
python - "$(uri run_manifest)" "$(uri latest_samples)" "$(uri animation)" <<'PY'
import json, sys, boto3
s3 = boto3.client("s3")
split = lambda uri: uri[len("s3://"):].split("/", 1)
run = json.loads(s3.get_object(Bucket=split(sys.argv[1])[0], Key=split(sys.argv[1])[1])["Body"].read())
for uri in sys.argv[2:]:
    s3.download_file(*split(uri), f"demo-output/{uri.rsplit('/', 1)[-1]}")
print(f"\ndemo finished: {run['epochs_completed']} epochs; artifacts in {run['run_uri']}")
print(f"  samples:    demo-output/latest.png  (from {run['samples']['latest']})")
print(f"  animation:  demo-output/progress.gif  (from {run['samples']['gif']})")
print(f"  checkpoint: {run['checkpoints']['latest']}")
best = run["checkpoints"].get("best")
if best:
    print(f"  best:       {best['uri']}  ({best['metric']} {best['value']:.2f} at epoch {best['epoch']})")
curve = ", ".join(f"{h['epoch']}: {h['digit_fd']:.1f}" for h in run["history"] if "digit_fd" in h)
print(f"  digit_fd by epoch (lower is better): {curve}")
print("  a new grid: source cluster/dev.env && .venv/bin/dcgan-ray sample "
      f"{run['checkpoints']['latest']} --out grid.png")
PY
# Something to look at: the run page (a copy beside the others), and TensorBoard over the bucket's runs.
dcgan-ray report demo --config jobs/demo.yaml --out demo-output/run-page
echo "  run page in the bucket: $(uri run_page)"
cluster/local.sh tensorboard --logdir "$(uri tensorboard_logdir)"
echo "  open http://127.0.0.1:6006 (Images: the grids, epoch by epoch); \`cluster/local.sh down\` stops it with the stack"
echo "  the demo took $((SECONDS / 60)) min $((SECONDS % 60)) s, set-up included"
