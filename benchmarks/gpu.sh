#!/usr/bin/env bash
# Everything GPU-relevant, without Ray, on one GPU machine in under 8 minutes (budgeted for an H100):
#   [1] the step table: the project's step with each speed.* option alone and all together, against
#       eager fp32 in the same run, at batch 128 and 1024 per GPU (benchmarks/train_step.py --table);
#   [2] a short training of the reference network on device-resident synthetic digits, eager fp32 and with
#       every option, scored on the device by the digit Fréchet distance (benchmarks/gpu_train.py);
#   [3] scaling (benchmarks/scaling.py): with 2 or more GPUs, NCCL's all-reduce of a step's gradients
#       and 2 DDP workers against 1 with each DDP option and compression hook; with one GPU, its step
#       at batch 128 and 512 and the scaling model's predictions from it for each link;
# then prints the three tables once more as the summary. Needs only python3 with torch, numpy, scipy,
# pillow and pyyaml (no Ray, no boto3, no venv). Results and logs go to $OUT (or ./gpu-results).
#
#   bash benchmarks/gpu.sh                        # on the GPU machine, from the repo root
#   bash benchmarks/gpu.sh --device cpu --quick   # tiny sizes on CPU: checks that the scripts run
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-$PWD/gpu-results}"
mkdir -p "$out"

device=cuda
quick=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    *) echo "usage: bash benchmarks/gpu.sh [--device cuda|cpu] [--quick]" >&2; exit 2 ;;
  esac
done

if [ "$quick" = 1 ]; then
  # 4 steps of batch 32 per row (steps are counted at batch 128); gpu_train's own tiny sizes.
  step_args=(--steps 1 --batch-sizes 32)
  train_args=(--quick)
  scaling_args=(--batch 8 --steps 1)
else
  # 1000 x 128 = 128k images per row: >= 1 s of timed steps even at the 150k img/s goal. Compiling
  # dominates (6 compiled rows); rows that would start after 300 s are skipped, which leaves the
  # training part its ~2 minutes and scaling its ~30 s within the 8.
  step_args=(--steps 1000 --budget-s 300)
  train_args=()
  # 50 timed steps per row: eager steps of a few ms, so each row's median rests on ~0.1-0.5 s.
  scaling_args=(--steps 50)
fi

started=$SECONDS
echo "== [1] step table ($device) =="
python3 benchmarks/train_step.py --table --device "$device" "${step_args[@]}" \
  --json "$out/step.json" --out-table "$out/step_table.txt" 2>&1 | tee "$out/step.log"
echo "   ($((SECONDS - started)) s)"

echo "== [2] short training with evaluation ($device) =="
python3 benchmarks/gpu_train.py --device "$device" "${train_args[@]}" \
  --json "$out/train.json" --out-table "$out/train_table.txt" 2>&1 | tee "$out/train.log"

echo "== [3] scaling ($device: NCCL with 2+ GPUs, gloo on cpu) =="
# Last, and not fatal: its NCCL path ran on no GPU before it first ran here, and [1] and [2] stay summarised.
if ! python3 benchmarks/scaling.py --device "$device" "${scaling_args[@]}" \
    --json "$out/scaling.json" --out-table "$out/scaling_table.txt" 2>&1 | tee "$out/scaling.log"; then
  echo "[3] scaling failed: see $out/scaling.log" | tee "$out/scaling_table.txt"
fi

echo
echo "== summary ($((SECONDS - started)) s in all; files in $out) =="
cat "$out/step_table.txt"
echo
cat "$out/train_table.txt"
echo
cat "$out/scaling_table.txt"
