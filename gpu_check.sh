#!/usr/bin/env bash
# The GPU check of the performance issue, prepared for a session that is lent a CUDA machine:
#   1. bench.py on the GPU (training, batched inference, latency, data pipeline, peak memory, ceilings);
#   2. the full original recipe (256x256, 7x expansion, RMSProp 1e-3, BCE, plateau schedule, 200 epochs), timed,
#      on 780 synthetic phantoms (BUSI's size: 624 training images after the split), since ../shared/data does not
#      travel to the device machine. Speed does not depend on what the pixels show.
#
#   bash gpu_check.sh [OUT_FOLDER]          # default runs/gpu_check; results: bench.txt, bench.json, recipe.log
#
# Environment overrides (the tests use tiny ones on CPU): PYTHON, DEVICE (cuda), PER_CLASS (260), EPOCHS (200),
# LIMIT_S (480: the training is stopped after this many seconds and its log says how far it got), BENCH_ARGS,
# TRAIN_ARGS (extra train.py flags; none for the original recipe).
set -uo pipefail
cd "$(dirname "$0")"
OUT=${1:-runs/gpu_check}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
PER_CLASS=${PER_CLASS:-260}
EPOCHS=${EPOCHS:-200}
LIMIT_S=${LIMIT_S:-480}
BENCH_ARGS=${BENCH_ARGS:-}
TRAIN_ARGS=${TRAIN_ARGS:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"; } 2>&1 | tee "$OUT/machine.txt"

# shellcheck disable=SC2086
"$PYTHON" bench.py --device "$DEVICE" --json "$OUT/bench.json" $BENCH_ARGS 2>&1 | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}

"$PYTHON" phantom.py --out "$OUT/phantoms" --per-class "$PER_CLASS" --seed 1 || exit 1
start=$(date +%s)
timeout --signal=INT "$LIMIT_S" "$PYTHON" train.py --data_dir "$OUT/phantoms" --out_dir "$OUT/recipe" \
    --loss_graph_dir "$OUT" --device "$DEVICE" --epochs "$EPOCHS" --overwrite --no-progress $TRAIN_ARGS 2>&1 | tee "$OUT/recipe.log"
train_rc=${PIPESTATUS[0]}
seconds=$(( $(date +%s) - start ))
epochs_done=$(grep -c "INFO train: epoch [0-9]*:" "$OUT/recipe.log")
echo "original recipe on $DEVICE: $epochs_done of $EPOCHS epochs in $seconds s (train.py exit status $train_rc;" \
     "124 or 130: stopped at the ${LIMIT_S} s limit)" | tee -a "$OUT/recipe.log"
[ "$bench_rc" -eq 0 ] && [ "$epochs_done" -gt 0 ]
