#!/usr/bin/env bash
# Sample N images (default 50k) from one checkpoint and compute FID/KID against a reference folder.
#
#   scripts/eval_checkpoint.sh CKPT REAL [OUT_DIR] [sample.py overrides...]
#   scripts/eval_checkpoint.sh runs/paper/celebahq_zigma1_arcee/ema_final.safetensors /data/celebahq256/real_samples_all
#   NUM_GPUS=8 NUM_SAMPLES=10000 scripts/eval_checkpoint.sh runs/x/checkpoints/step_0030000 /data/real out/ sampler=heun steps=50
#
# CKPT: a checkpoint folder (runs/<run>/checkpoints/step_XXXXXXX) or an exported .safetensors.
# OUT_DIR (default: <CKPT without .safetensors>_samples_<N>) receives the PNGs; the scores go to
# OUT_DIR.csv / OUT_DIR.json. Re-running resumes the sampling. Environment: NUM_GPUS (default: all
# visible GPUs, min 1), NUM_SAMPLES (50000), SAMPLE_BATCH (64 per process), EVALUATE_ARGS (extra
# evaluate.py overrides, space-separated, e.g. "feature_extractor=/path/feats.pt resize=false"),
# DRY_RUN=1 prints the commands only.
set -euo pipefail
CKPT=${1:?usage: $0 CKPT REAL [OUT_DIR] [sample.py overrides...]}
REAL=${2:?usage: $0 CKPT REAL [OUT_DIR] [sample.py overrides...]}
NUM_SAMPLES=${NUM_SAMPLES:-50000}
OUT=${3:-${CKPT%.safetensors}_samples_$NUM_SAMPLES}
shift $(( $# < 3 ? $# : 3 ))
NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)}
OUT=${OUT%/}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

LAUNCH=(accelerate launch --num_processes "$NUM_GPUS" --num_machines 1 --mixed_precision no --dynamo_backend no)
if [ "$NUM_GPUS" -gt 1 ]; then LAUNCH=(accelerate launch --multi_gpu "${LAUNCH[@]:2}"); fi

run() {
  printf '%q ' "$@" | sed 's/ $//'
  echo
  if [ "${DRY_RUN:-0}" = 0 ]; then "$@"; fi
}

run "${LAUNCH[@]}" "$ROOT/sample.py" "ckpt=$CKPT" "out_dir=$OUT" "num_samples=$NUM_SAMPLES" \
  "batch_size=${SAMPLE_BATCH:-64}" "$@"
read -r -a EVAL_EXTRA <<< "${EVALUATE_ARGS:-}"
run python "$ROOT/evaluate.py" "samples=$OUT" "real=$REAL" "out=$OUT" ${EVAL_EXTRA[@]+"${EVAL_EXTRA[@]}"}
