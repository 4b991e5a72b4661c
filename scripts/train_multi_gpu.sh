#!/usr/bin/env bash
# One node, N GPUs: the paper's recipes (configs/experiment/) through accelerate.
#
#   scripts/train_multi_gpu.sh <experiment> [hydra overrides ...]
#   NUM_GPUS=2 scripts/train_multi_gpu.sh celebahq_zigma1_arcee data.path=/data/celebahq256_latent
#   NUM_GPUS=8 scripts/train_multi_gpu.sh celebahq_zigma4 data.path=... train.batch_size=256
#
# train.batch_size is GLOBAL (the paper: 192 = 2 GPUs x 96); each GPU gets
# batch_size / (NUM_GPUS * train.grad_accum). Re-running the same command with the same
# hydra.run.dir resumes from the latest complete checkpoint (train.resume=auto), also on
# another GPU count. wandb: set WANDB_PROJECT / WANDB_ENTITY, or logger.project=... logger.entity=...
set -euo pipefail
EXPERIMENT=${1:?usage: $0 <experiment> [overrides...]}
shift
NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
MIXED_PRECISION=${MIXED_PRECISION:-no}   # accelerate's flag; the run uses train.mixed_precision
cd "$(dirname "$0")/.."
LAUNCH=(--num_processes "$NUM_GPUS" --num_machines 1 --mixed_precision "$MIXED_PRECISION" --dynamo_backend no)
if [ "$NUM_GPUS" -gt 1 ]; then LAUNCH=(--multi_gpu "${LAUNCH[@]}"); fi
exec accelerate launch "${LAUNCH[@]}" train.py experiment="$EXPERIMENT" "$@"
