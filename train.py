"""Train a generator from the Hydra config tree in configs/ (README: "Training").

    python train.py                                          # tiny preset on digits, CPU, minutes
    python train.py model=zigma_xs model.state_chain=arcee train.max_steps=2000
    accelerate launch --multi_gpu --num_processes 2 train.py experiment=celebahq_zigma1_arcee

The run folder is Hydra's hydra.run.dir (runs/<name>/<date>_<time> by default); see
arcee/train/trainer.py for what it holds.
"""
import os
import sys

# OpenMP threads that spin while they wait can make each step of a small model 10x slower as soon as
# another process shares the cores (ZigMa-XS, batch 64, 2 cores at load ~1.5: 0.30 s per step with 1
# thread, 3-4.5 s with 2 spinning threads, 0.35-0.41 s with 2 passive ones; with a core free: 0.23 s
# spinning, 0.27-0.32 s passive). Passive waiting bounds the loss. Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402

import arcee.train  # noqa: E402 -- registers the config schema (arcee_schema) in Hydra's ConfigStore
from arcee.errors import run_main  # noqa: E402

if int(os.environ.get("RANK", "0")) > 0:  # only rank 0 writes Hydra's .hydra/ folder and log file
    sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg):
    arcee.train.run(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    run_main(main)  # a user error: one line on stderr, exit 2 (HYDRA_FULL_ERROR=1: the traceback)
