"""Sample PNGs from a checkpoint or an exported EMA file (configs/sample.yaml).

    python sample.py ckpt=runs/.../checkpoints/step_0050000 out_dir=samples/ num_samples=50000 sampler=heun steps=50
    accelerate launch --num_processes 8 sample.py ckpt=... out_dir=...      # same images for any N
"""
import json
import os

import hydra
import torch
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    from accelerate import PartialState

    from arcee.sample import ImageSampler, export_npz, load_generator, make_grid, read_folder, read_step, sample_folder
    from arcee.sample.generate import save_png

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo ranks without GPUs
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
    ckpt = os.path.abspath(cfg.ckpt)
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
    main()
