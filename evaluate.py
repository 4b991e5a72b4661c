"""FID / KID of sample folders or checkpoints against a reference folder (configs/evaluate.yaml).

    python evaluate.py samples=samples/ real=real_samples/
    python evaluate.py 'ckpt=[runs/x/checkpoints/step_0010000,runs/x/checkpoints/step_0020000]' num_samples=10000
"""
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from arcee.errors import require, run_main, typed_config
from arcee.sample import SamplerArgs


@dataclass
class EvaluateArgs(SamplerArgs):
    """The types of configs/evaluate.yaml's keys (their defaults and meaning live there;
    the sampler keys: arcee.sample.SamplerArgs)."""

    samples: Any = MISSING
    ckpt: Any = MISSING
    real: Optional[str] = MISSING
    num_samples: int = MISSING
    use_ema: bool = MISSING
    seed: int = MISSING
    mode: str = MISSING
    feature_extractor: str = MISSING
    resize: bool = MISSING
    kid: bool = MISSING
    kid_subsets: int = MISSING
    kid_subset_size: int = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    cache_dir: Optional[str] = MISSING
    device: Optional[str] = MISSING
    out: str = MISSING
    tf32: bool = MISSING


def _as_list(v) -> list:
    return [] if v is None else list(v) if isinstance(v, (list, ListConfig)) else [v]


def _default_real(samples: list, ckpts: list):
    """The reference named by the first checkpoint's config or the first folder's sampling.json."""
    for s in samples:
        manifest = Path(s) / "sampling.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get("real_samples"):
            return json.loads(manifest.read_text())["real_samples"]
    if ckpts:
        from arcee.sample.loading import _resolve
        _, cfg = _resolve(Path(ckpts[0]), use_ema=True)
        if cfg.data.get("real_samples"):
            from arcee.data import ensure_real_samples
            return ensure_real_samples(cfg.data)
    raise ValueError("real: no reference folder given and none recorded in the checkpoint / sampling.json; pass real=<folder>")


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> list:
    from arcee.io import check_writable
    from arcee.metrics import Evaluator, write_table
    from arcee.metrics.fid import sample_images
    from arcee.sample.generate import check_sampling_args
    from arcee.sample.loading import _resolve

    cfg = typed_config(cfg, EvaluateArgs)
    samples, ckpts = _as_list(cfg.samples), _as_list(cfg.ckpt)
    if not samples and not ckpts:
        raise ValueError("nothing to evaluate: pass samples=<folder> (or a list) and/or ckpt=<checkpoint> (or a list)")
    # every input and the output are checked before anything is scored
    out = Path(os.path.abspath(cfg.out))
    check_writable(out.with_suffix(".json"), "out")
    for s in samples:
        sample_images(s)
    if ckpts:
        require(cfg.num_samples >= 2, "num_samples", cfg.num_samples, ">= 2 for FID/KID in generator mode (ckpt=)")
        check_sampling_args(seed=cfg.seed, sampler=cfg.sampler, steps=cfg.steps, atol=cfg.atol, rtol=cfg.rtol,
                            cfg_scale=cfg.cfg_scale, class_label=cfg.class_label)
        for c in ckpts:
            _resolve(Path(c), use_ema=cfg.use_ema)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
    real = cfg.real if cfg.real is not None else _default_real(samples, ckpts)
    ev = Evaluator(real, mode=cfg.mode, feature_extractor=cfg.feature_extractor, resize=cfg.resize,
                   cache_dir=cfg.cache_dir, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                   device=cfg.device, kid=cfg.kid, kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size)
    common = {"real": str(real), "mode": cfg.mode, "feature_extractor": ev.extractor.name}
    rows = []
    for s in samples:
        manifest = Path(s) / "sampling.json"
        step = json.loads(manifest.read_text()).get("step") if manifest.is_file() else None
        rows.append({"name": str(s), "kind": "folder", "step": step, **ev.folder(s), **common})
        print(json.dumps(rows[-1]))
    sampler_kwargs = OmegaConf.to_container(cfg, resolve=True)
    sampler_kwargs = {k: sampler_kwargs[k] for k in ("sampler", "steps", "atol", "rtol", "cfg_scale", "class_label")}
    for c in ckpts:
        r = ev.checkpoint(c, cfg.num_samples, use_ema=cfg.use_ema, seed=cfg.seed, **sampler_kwargs)
        rows.append({"name": str(c), "kind": "checkpoint", **r, **common, **sampler_kwargs, "seed": cfg.seed})
        print(json.dumps(rows[-1]))
    try:
        paths = write_table(rows, out)
    except OSError as e:  # e.g. the disk filled up while scoring: keep the table elsewhere
        fallback = Path(tempfile.mkdtemp(prefix="arcee-evaluate-")) / out.name
        write_table(rows, fallback)
        raise OSError(f"out={str(out)!r}: cannot write the table ({e}); it was written to {fallback}.json "
                      f"and .csv instead") from e
    print("wrote " + ", ".join(str(p) for p in paths.values() if p is not None))
    return rows


if __name__ == "__main__":
    run_main(main)  # a user error: one line on stderr, exit 2 (HYDRA_FULL_ERROR=1: the traceback)
