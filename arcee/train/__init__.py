"""arcee.train: the config schema, the training loop, checkpoints, EMA and run logging.

    from arcee.train import run
    summary = run(cfg, run_dir)    # cfg: composed from configs/config.yaml (importing registers the schema)
"""
from .checkpoint import latest_checkpoint, list_checkpoints, load_arcee_state
from .ema import EMA
from .logger import read_events, read_metrics
from .sampler import ResumableBatchSampler
from .schema import Config, LoggerConfig, OptimConfig, TrainConfig, check_config, register
from .trainer import lr_at, run

__all__ = ["run", "lr_at", "Config", "TrainConfig", "OptimConfig", "LoggerConfig", "check_config", "register",
           "EMA", "ResumableBatchSampler", "latest_checkpoint", "list_checkpoints", "load_arcee_state",
           "read_metrics", "read_events"]
