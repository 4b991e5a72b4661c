"""Sample PNGs from a checkpoint or an exported EMA file (configs/sample.yaml).

    python sample.py ckpt=runs/.../checkpoints/step_0050000 out_dir=samples/ num_samples=50000 sampler=heun steps=50
    accelerate launch --num_processes 8 sample.py ckpt=... out_dir=...      # same images for any N
"""
import json
import os
from dataclasses import dataclass

import hydra
import torch
from omegaconf import MISSING, DictConfig

from arcee.errors import require, run_main, typed_config
from arcee.sample import SamplerArgs


@dataclass
class SampleArgs(SamplerArgs):
    """The types of configs/sample.yaml's keys (their defaults and meaning live there;
    the sampler keys: arcee.sample.SamplerArgs)."""

    ckpt: str = MISSING
    use_ema: bool = MISSING
    out_dir: str = MISSING
    num_samples: int = MISSING
    seed: int = MISSING
    batch_size: int = MISSING
    grid: int = MISSING
    npz: bool = MISSING
    tf32: bool = MISSING
    progress: bool = MISSING


@hydra.main(config_path="configs", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    from accelerate import PartialState

    from arcee.sample import ImageSampler, export_npz, load_generator, make_grid, read_folder, read_step, sample_folder
    from arcee.sample.generate import check_sampling_args, save_png

    cfg = typed_config(cfg, SampleArgs, {"ckpt": "a training checkpoint folder, an exported .safetensors, "
                                                 "a save_pretrained folder or a Hub id owner/name",
                                         "out_dir": "the folder to write the PNGs to"})
    check_sampling_args(seed=cfg.seed, sampler=cfg.sampler, steps=cfg.steps, atol=cfg.atol, rtol=cfg.rtol,
                        cfg_scale=cfg.cfg_scale, class_label=cfg.class_label)
    require(cfg.grid >= 0, "grid", cfg.grid, "an integer >= 0 (0: no grid)")
    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo ranks without GPUs
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
    ckpt = os.path.abspath(cfg.ckpt) if os.path.exists(cfg.ckpt) else cfg.ckpt  # else maybe a Hub id owner/name
    model, model_cfg = load_generator(ckpt, use_ema=cfg.use_ema, device=state.device)
    sampler = ImageSampler(model, model_cfg, seed=cfg.seed, sampler=cfg.sampler, steps=cfg.steps, atol=cfg.atol,
                           rtol=cfg.rtol, cfg_scale=cfg.cfg_scale, class_label=cfg.class_label)
    manifest = {"ckpt": ckpt, "use_ema": cfg.use_ema, "step": read_step(ckpt),
                "real_samples": model_cfg.data.get("real_samples")}
    report = sample_folder(sampler, cfg.out_dir, cfg.num_samples, cfg.batch_size, manifest, state, cfg.progress)
    if state.is_main_process:
        out = os.path.normpath(cfg.out_dir)
        if cfg.grid:
            save_png(f"{out}_grid.png", make_grid(read_folder(out, cfg.num_samples, limit=cfg.grid)))
        if cfg.npz:
            export_npz(out, cfg.num_samples, f"{out}.npz")
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    run_main(main)  # a user error: one line on stderr, exit 2 (HYDRA_FULL_ERROR=1: the traceback)
