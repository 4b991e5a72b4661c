"""arcee.data: LMDB shards (pixels or SD-VAE latents), the embedded digits default, the VAE.

    ds = build_dataset(data_cfg, split="train")   # data_cfg: configs/data/*.yaml node or dict
    x, label = ds[i]      # x float32 (C, H, W): pixels in [-1, 1]; latents times latent_scale
    path = ensure_real_samples(data_cfg)          # FID/KID reference PNGs, written on first use

Names are imported lazily, so the shard tools (``data_prep build``/``verify``) start without torch.
"""
import importlib

_EXPORTS = {
    "dataset": ("ShardedLMDBDataset", "build_dataset", "ensure_real_samples", "write_real_samples", "split_indices"),
    "digits": ("cache_dir", "ensure_digits", "ensure_mirrored_digits", "digit_sources"),
    "shards": ("ShardError", "build_shards", "read_manifest", "scan_folder", "verify_shards"),
    "vae": ("load_vae", "encode_images", "decode_latents", "encode_latents"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'arcee.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
