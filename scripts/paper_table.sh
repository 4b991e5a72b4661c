#!/usr/bin/env bash
# The Arcee paper's table (REFERENCE.md section 6) end to end: for every row, train the recipe
# (configs/experiment/<row>.yaml), sample 50k images from its final EMA weights, compute FID/KID
# against the real images; then collect one table. Walk-through: scripts/celebahq.md.
#
#   scripts/paper_table.sh --data /data/celebahq256_latent --real /data/celebahq256/real_samples_all
#   scripts/paper_table.sh --data D --real R --gpus 8 --runs /scratch/arcee --project my-proj --rows "celebahq_zigma1 celebahq_zigma1_arcee"
#   scripts/paper_table.sh --data D --real R --dry-run            # print the commands only
#   scripts/paper_table.sh --data D --real R -- train.compile=true   # extra Hydra overrides for train.py
#
# Re-running resumes: training continues from the newest checkpoint of runs/<row>/ (a finished row
# only re-exports its EMA weights), sampling keeps the PNGs already written.
set -euo pipefail

ROWS_ALL="celebahq_zigma1 celebahq_zigma1_arcee celebahq_zigma2 celebahq_zigma2_arcee celebahq_zigma4 \
celebahq_zigma4_arcee celebahq_zigma8 celebahq_zigma8_arcee celebahq_vim celebahq_vim_arcee"

usage() {
  cat <<EOF
usage: $0 --data DIR --real DIR [options] [-- train.py overrides...]
  --data DIR         latent shard folder (python -m data_prep encode-latents)         [\$ARCEE_DATA]
  --real DIR         FID reference PNGs (python -m data_prep real-samples)            [\$ARCEE_REAL]
  --runs DIR         one run folder per row: DIR/<row>                                [runs/paper]
  --gpus N           processes for training and sampling                              [all visible GPUs, min 1]
  --project NAME     wandb project (logger.project)                                   [\$WANDB_PROJECT or arcee]
  --wandb-mode MODE  online | offline | disabled                                       [online]
  --rows "A B ..."   experiments to run                                               [all ten rows]
  --num-samples N    images per row for FID/KID                                       [50000]
  --sample-batch N   sample.py batch size per process                                 [64]
  --sample-args STR  extra sample.py overrides, space-separated (e.g. "sampler=heun steps=50")
  --eval-args STR    extra evaluate.py overrides (e.g. "mode=legacy_tensorflow")
  --dry-run          print the commands, run nothing
EOF
}

DATA=${ARCEE_DATA:-}
REAL=${ARCEE_REAL:-}
RUNS=runs/paper
GPUS=
PROJECT=${WANDB_PROJECT:-arcee}
WANDB_MODE_=online
ROWS=$ROWS_ALL
NUM_SAMPLES=50000
SAMPLE_BATCH=64
SAMPLE_ARGS=
EVAL_ARGS=
DRY_RUN=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA=$2; shift 2 ;;
    --real) REAL=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --wandb-mode) WANDB_MODE_=$2; shift 2 ;;
    --rows) ROWS=$2; shift 2 ;;
    --num-samples) NUM_SAMPLES=$2; shift 2 ;;
    --sample-batch) SAMPLE_BATCH=$2; shift 2 ;;
    --sample-args) SAMPLE_ARGS=$2; shift 2 ;;
    --eval-args) EVAL_ARGS=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
[ -n "$DATA" ] || { echo "error: --data DIR (latent shards) is required" >&2; usage >&2; exit 2; }
[ -n "$REAL" ] || { echo "error: --real DIR (reference PNGs) is required" >&2; usage >&2; exit 2; }
if [ "$DRY_RUN" = 0 ]; then
  [ -d "$DATA" ] || { echo "error: --data $DATA does not exist" >&2; exit 2; }
  [ -d "$REAL" ] || { echo "error: --real $REAL does not exist" >&2; exit 2; }
fi
if [ -z "$GPUS" ]; then
  GPUS=$(python -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
fi
cd "$(dirname "$0")/.."
read -r -a SAMPLE_EXTRA <<< "$SAMPLE_ARGS"

LAUNCH=(accelerate launch --num_processes "$GPUS" --num_machines 1 --mixed_precision no --dynamo_backend no)
if [ "$GPUS" -gt 1 ]; then LAUNCH=(accelerate launch --multi_gpu "${LAUNCH[@]:2}"); fi

run() {  # print the command (shell-quoted), then run it unless --dry-run
  printf '%q ' "$@" | sed 's/ $//'
  echo
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

for ROW in $ROWS; do
  [ -f "configs/experiment/$ROW.yaml" ] || { echo "error: no configs/experiment/$ROW.yaml" >&2; exit 2; }
  RUN="$RUNS/$ROW"
  echo "# $ROW"
  run "${LAUNCH[@]}" train.py "experiment=$ROW" "data.path=$DATA" "hydra.run.dir=$RUN" \
    "logger.project=$PROJECT" "logger.mode=$WANDB_MODE_" ${EXTRA[@]+"${EXTRA[@]}"}
  # sample + evaluate: prints (and unless --dry-run runs) its two commands; scores in $RUN/samples_N.json
  DRY_RUN=$DRY_RUN NUM_GPUS=$GPUS NUM_SAMPLES=$NUM_SAMPLES SAMPLE_BATCH=$SAMPLE_BATCH EVALUATE_ARGS=$EVAL_ARGS \
    bash scripts/eval_checkpoint.sh "$RUN/ema_final.safetensors" "$REAL" "$RUN/samples_$NUM_SAMPLES" \
    ${SAMPLE_EXTRA[@]+"${SAMPLE_EXTRA[@]}"}
done

echo "# table"
run python - "$RUNS" "$NUM_SAMPLES" $ROWS <<'EOF'
import json, sys
from pathlib import Path
from arcee.io import atomic_write_text
runs, n, rows = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
lines = ["| experiment | FID | KID x 10^3 | samples |", "|---|---|---|---|"]
for row in rows:
    f = runs / row / f"samples_{n}.json"
    r = json.loads(f.read_text())[0] if f.is_file() else {}
    fid, kid = r.get("fid"), r.get("kid")
    lines.append(f"| {row} | {fid:.2f} | {1e3 * kid:.2f} | {r.get('num_samples')} |" if fid is not None
                 else f"| {row} | - | - | - |")
text = "\n".join(lines) + "\n"
atomic_write_text(runs / "table.md", text)
print(text + f"wrote {runs / 'table.md'}")
EOF
