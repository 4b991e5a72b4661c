"""The training config schema: typed dataclasses registered in Hydra's ConfigStore.

`configs/config.yaml` lists `arcee_schema` first in its defaults, so every YAML file and every
command-line override is merged into these typed nodes: an unknown key (`train.max_stepz=1`)
or a mistyped value (`train.batch_size=abc`, `train.mixed_precision=bf17`) fails when the
config is composed, before any data is read or a GPU is touched. The `model`, `data` and
`flow` nodes belong to their rooms and are validated by their builders (`build_model`,
`build_dataset`, `build_transport`), which `arcee.train.run` calls before its first step;
`check_config` adds the cross-node rules (divisibility, ranges).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class MixedPrecision(str, Enum):
    no = "no"  # fp32 (TF32 matmuls on GPU); write it quoted in YAML: 'no'
    bf16 = "bf16"
    fp16 = "fp16"


class Schedule(str, Enum):
    constant = "constant"  # linear warmup, then constant (the paper: no warmup, 3e-4)
    cosine = "cosine"  # linear warmup, then cosine decay to optim.min_lr at train.max_steps


class LoggerMode(str, Enum):
    online = "online"
    offline = "offline"  # wandb writes locally; `wandb sync <run>/wandb/offline-run-*` later
    disabled = "disabled"  # wandb is never imported; metrics.jsonl only


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (the paper: lr 3e-4 constant, no warmup, wd 0)."""

    lr: float = 3e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0  # applied to matrices only (>= 2-D); norms, biases, embeddings' 1-D: none
    schedule: Schedule = Schedule.constant
    warmup_steps: int = 0
    min_lr: float = 0.0  # cosine floor


@dataclass
class TrainConfig:
    """The loop. Steps count optimizer updates; `batch_size` is GLOBAL (all processes, all micro-batches)."""

    max_steps: int = 1000
    batch_size: int = 64  # per process per micro-batch = batch_size / (num_processes * grad_accum)
    grad_accum: int = 1
    grad_clip: float = 2.0  # max global grad norm, applied before the optimizer step; 0 = no clipping
    ema_decay: float = 0.9999
    ema_warmup: int = 0  # the EMA copies the weights for the first ema_warmup steps, then averages
    mixed_precision: MixedPrecision = MixedPrecision.no
    compile: bool = False  # torch.compile the model
    log_every: int = 50  # host sync + metrics.jsonl/wandb record every K steps (none in between)
    sample_every: int = 500  # EMA sample grid every K steps (and at the end); 0 = never
    sample_n: int = 64  # images in the grid
    sample_sampler: Optional[str] = None  # sampler of the grids and in-training FID (euler | heun | dopri5 ...); null: the flow node's
    sample_steps: Optional[int] = None  # their steps for euler/heun; null: the flow node's
    ckpt_every: int = 500  # checkpoint every K steps (and at the end); 0 = only at the end
    keep_last: int = 2  # rolling checkpoints kept (milestones come on top)
    milestone_every: int = 0  # checkpoints at multiples of this are never deleted; 0 = none
    resume: str = "auto"  # auto (latest complete checkpoint of this run folder, if any) | none | <path>
    fid_every: int = 0  # in-training FID/KID of the EMA model every K steps (and at the end); 0 = never
    fid_num_samples: int = 1000  # generated images per in-training FID (the paper's final FID uses 50k offline)
    fid_feature_extractor: str = "inception"  # inception | pkg.module:attr | a TorchScript .pt (arcee.metrics)
    encode_latents: bool = False  # pixel data + the data node's VAE on the fly -> latents (slow; prefer shards)
    digits_check: int = 0  # data=digits only: at the end, classifier FD + confident fraction of N EMA samples; 0 = off


@dataclass
class LoggerConfig:
    """wandb settings; a local `metrics.jsonl` is written whatever the mode."""

    mode: LoggerMode = LoggerMode.offline
    project: Optional[str] = None  # null: env WANDB_PROJECT, else "arcee"
    entity: Optional[str] = None  # null: env WANDB_ENTITY, else wandb's default entity
    run_name: Optional[str] = None  # null: the config's `name` plus the run folder's name
    tags: List[str] = field(default_factory=list)


@dataclass
class Config:
    """The whole training config (`configs/config.yaml`)."""

    name: str = "default"  # recipe name: run folder and wandb run name
    seed: int = 0
    model: Any = MISSING  # configs/model/*.yaml, checked by arcee.models.build_model
    data: Any = MISSING  # configs/data/*.yaml, checked by arcee.data.build_dataset
    flow: Any = MISSING  # configs/flow/*.yaml, checked by arcee.flow.build_transport
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register() -> None:
    """Register the schema as `arcee_schema` (idempotent)."""
    ConfigStore.instance().store(name="arcee_schema", node=Config)


register()


def _require(ok: bool, key: str, expectation: str, value) -> None:
    if not ok:
        raise ValueError(f"config: {key} must be {expectation}, got {value!r}")


def check_config(cfg, num_processes: int = 1) -> None:
    """Cross-field rules the types cannot express; raises ValueError naming the key.

    cfg: the composed config (DictConfig). num_processes: the world size it will run on.
    """
    # `+key=value` overrides open the struct flag: catch keys the schema does not know here
    for node, schema in (("", Config), ("train", TrainConfig), ("optim", OptimConfig), ("logger", LoggerConfig)):
        have = set(cfg[node] if node else cfg)
        known = {f.name for f in fields(schema)}
        if have - known:
            raise ValueError(f"config: unknown key(s) {sorted(have - known)} in {node or 'the top level'}; "
                             f"known: {sorted(known)}")
    t, o = cfg.train, cfg.optim
    for key in ("max_steps", "batch_size", "grad_accum", "log_every", "keep_last", "sample_n"):
        _require(t[key] >= 1, f"train.{key}", "an integer >= 1", t[key])
    for key in ("ckpt_every", "sample_every", "milestone_every", "ema_warmup", "fid_every"):
        _require(t[key] >= 0, f"train.{key}", "an integer >= 0", t[key])
    _require(t.digits_check == 0 or t.digits_check >= 2, "train.digits_check", "0 (off) or >= 2 samples",
             t.digits_check)
    _require(t.fid_every == 0 or t.fid_num_samples >= 2, "train.fid_num_samples", ">= 2 for FID/KID",
             t.fid_num_samples)
    _require(t.grad_clip >= 0, "train.grad_clip", ">= 0 (0 disables clipping)", t.grad_clip)
    _require(0.0 <= t.ema_decay < 1.0, "train.ema_decay", "in [0, 1)", t.ema_decay)
    per_process = num_processes * t.grad_accum
    if t.batch_size % per_process:
        raise ValueError(
            f"config: train.batch_size={t.batch_size} (global) must be divisible by num_processes * "
            f"train.grad_accum = {num_processes} * {t.grad_accum} = {per_process}")
    _require(o.lr > 0, "optim.lr", "> 0", o.lr)
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr", f"in [0, optim.lr={o.lr}]", o.min_lr)
    _require(o.warmup_steps >= 0, "optim.warmup_steps", ">= 0", o.warmup_steps)
    _require(o.weight_decay >= 0, "optim.weight_decay", ">= 0", o.weight_decay)
    _require(o.eps > 0, "optim.eps", "> 0", o.eps)
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)",
             list(o.betas))
    resume = t.resume
    if resume not in ("auto", "none") and not Path(resume).exists():
        raise FileNotFoundError(f"config: train.resume={resume!r} is neither 'auto', 'none' nor an existing "
                                "checkpoint folder")
    # cross-node: the token grid needs image_size divisible by the patch size
    m = cfg.model
    if "image_size" in m and "patch_size" in m and m.image_size % m.patch_size:
        raise ValueError(f"config: model.image_size={m.image_size} (from data.image_size) must be divisible by "
                         f"model.patch_size={m.patch_size}")
    if OmegaConf.is_missing(cfg.data, "path"):
        raise ValueError(f"config: data.path is required for data={cfg.data.get('name')!r}: the shard folder "
                         "written by `python -m data_prep build` (set data.path=/path/to/shards)")
    path = cfg.data.get("path")
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"config: data.path={path!r} does not exist (the {cfg.data.get('name', 'data')} "
                                "shard folder; see data_prep/ to build it, or set data.path=...)")
