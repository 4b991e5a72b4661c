"""The SD-VAE (``diffusers.AutoencoderKL``): loading, encode/decode helpers, latent shards.

Latent records store the VAE's posterior statistics in fp16, ``(k, C, h, w)``: ``[mean, std]``,
plus ``[mean, std]`` of the horizontally flipped image when built with ``flip_copy`` (k = 4).
The dataset samples ``z = mean + std * eps`` (as the anchors' on-the-fly encoding does) or uses
the mean, and multiplies by ``latent_scale`` (0.18215 for SD-VAE, kept in the manifest).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from arcee.errors import UserError

from .dataset import ShardedLMDBDataset
from .shards import _map_size, read_manifest, run_build, sha256

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
LATENT_SCALE = 0.18215


def load_vae(name_or_path: str = DEFAULT_VAE, device=None, dtype=torch.float32, local_files_only: bool = False):
    """``AutoencoderKL`` from a Hub name (cached under ``HF_HOME``) or a local folder, eval mode, frozen.

    Raises ``UserError`` (a ``RuntimeError``) saying how to pre-download when the weights cannot be fetched.
    """
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError("latent data needs diffusers: pip install 'arcee[latent]'") from e
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        sub = "vae" if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file() else None
        vae = AutoencoderKL.from_pretrained(path, subfolder=sub)
    elif str(name_or_path).startswith(("/", ".", "~")) or str(name_or_path).count("/") > 1:
        raise FileNotFoundError(f"VAE folder {str(name_or_path)!r} does not exist")
    else:
        try:
            vae = AutoencoderKL.from_pretrained(str(name_or_path), local_files_only=local_files_only)
        except Exception as e:
            raise UserError(
                f"cannot load the VAE {name_or_path!r} ({type(e).__name__}: {e}). Without internet access, "
                f"download it on a connected machine first: `hf download {name_or_path}` (or "
                f"`python -c \"from diffusers import AutoencoderKL; AutoencoderKL.from_pretrained('{name_or_path}')\"`) "
                f"and copy the Hugging Face cache (HF_HOME, with HF_HUB_OFFLINE=1 here), or save it with "
                f"`.save_pretrained(DIR)` and pass the folder: --vae DIR / data.vae=DIR"
            ) from e
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return vae.eval().requires_grad_(False).to(device=device, dtype=dtype)


@torch.no_grad()
def encode_images(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels ``(b, 3, H, W)`` in [-1, 1] -> posterior ``(mean, std)``, each ``(b, C, h, w)`` fp32."""
    p = next(vae.parameters())
    dist = vae.encode(x.to(p.device, p.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, latent_scale: float = LATENT_SCALE) -> torch.Tensor:
    """Scaled latents ``(b, C, h, w)`` (as the dataset returns them) -> pixels ``(b, 3, H, W)`` in [-1, 1]."""
    p = next(vae.parameters())
    return vae.decode(z.to(p.device, p.dtype) / latent_scale).sample.float().clamp_(-1, 1)


def encode_latents(src, out_dir, vae=DEFAULT_VAE, *, batch_size: int = 32, flip_copy: bool = False,
                   latent_scale: float = LATENT_SCALE, device=None, local_files_only: bool = False,
                   workers: int = 0, progress: bool = True) -> dict:
    """Pixel shards ``src`` -> latent shards ``out_dir`` (one per source shard, same keys and labels).

    ``vae``: a Hub name, a local folder, or an ``AutoencoderKL``; ``workers`` DataLoader processes
    read the pixel shards. Resumable and atomic like
    ``build_shards`` (GPU convolutions need not be bit-reproducible, so neither are the values).
    Returns the manifest.
    """
    src = Path(src).expanduser().resolve()
    m = read_manifest(src)
    if m["kind"] != "pixel" or m["channels"] != 3:
        raise ValueError(f"encode-latents needs RGB pixel shards; {str(src)!r} holds {m['kind']} "
                         f"records with {m.get('channels')} channel(s)")
    vae_name = vae if isinstance(vae, (str, os.PathLike)) else type(vae).__name__
    if isinstance(vae, (str, os.PathLike)):
        vae = load_vae(str(vae), device, local_files_only=local_files_only)
    ds = ShardedLMDBDataset(src, "all")
    probe_mean, _ = encode_images(vae, ds[0][0][None])
    c, h, w = probe_mean.shape[1:]
    shape = [4 if flip_copy else 2, c, h, w]
    settings = {"kind": "latent", "vae": str(vae_name), "flip_copy": flip_copy, "latent_scale": latent_scale,
                "source_plan_sha256": m.get("plan_sha256")}
    plan = {"settings": settings, "sources": [[n, int(lab)] for n, lab in zip(ds.sources, ds.labels)]}
    header = {"kind": "latent", "resolution": m["resolution"], "channels": int(c), "format": "fp16", "shape": shape,
              "latent_size": int(h), "latent_scale": latent_scale, "vae": str(vae_name), "flip_copy": flip_copy,
              "stats": "mean_std", "num_classes": m.get("num_classes", 0), "class_names": m.get("class_names", []),
              "source_dataset": str(src), "settings": settings, "shard_metadata": {"shape": shape, "format": "fp16"}}

    def shard_records(s):
        lo, hi = int(ds.offsets[s]), int(ds.offsets[s + 1])
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(lo, hi)), batch_size=batch_size,
                                             num_workers=workers, pin_memory=torch.cuda.is_available())
        i = lo
        for x, _ in loader:
            stats = list(encode_images(vae, x))
            if flip_copy:
                stats += encode_images(vae, x.flip(-1))
            arr = torch.stack(stats, 1).half().cpu().numpy()  # (b, k, C, h, w)
            for rec in arr:
                value = rec.tobytes()
                yield str(ds.sources[i]), int(ds.labels[i]), value, sha256(value), None
                i += 1

    return run_build(Path(out_dir).expanduser(), plan, len(ds.shard_names), shard_records, header,
                     _map_size(int(ds.counts.max()), int(np.prod(shape)) * 2), total=len(ds), progress=progress,
                     sizes=[int(n) for n in ds.counts])


__all__ = ["load_vae", "encode_images", "decode_latents", "encode_latents", "DEFAULT_VAE", "LATENT_SCALE"]
