"""``ShardedLMDBDataset``: many LMDB shards read as one dataset; ``build_dataset`` from a config node.

Environments are opened lazily, once per process (read-only, ``lock=False``, ``readahead=False``)
and reopened when the process id changes, so the dataset is safe to create before DataLoader
workers or ``accelerate`` processes fork. Random flips draw from torch's RNG, which DataLoader
seeds per worker.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import lmdb
import numpy as np
import torch
from filelock import FileLock
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from .shards import ShardError, decode_value, open_env, read_manifest, shard_header_problem

SPLITS = ("train", "val", "all")
_SPLIT_SALT = b"arcee-split-v1/"


def split_indices(sources, split: str, val_fraction: float) -> np.ndarray:
    """Deterministic held-out split: records ordered by ``blake2b(salt + source name)``; the last
    ``round(val_fraction * n)`` are ``val``, the rest ``train``. Independent of record order, shard
    count and library versions. Returns sorted global indices.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(sources)
    n_val = int(round(val_fraction * n))
    if split == "all" or (split == "train" and n_val == 0):
        return np.arange(n, dtype=np.int64)
    order = sorted(range(n), key=lambda i: hashlib.blake2b(_SPLIT_SALT + str(sources[i]).encode(),
                                                              digest_size=8).digest())
    part = order[n - n_val:] if split == "val" else order[: n - n_val]
    return np.array(sorted(part), dtype=np.int64)


class ShardedLMDBDataset(Dataset):
    """Records of the shard folder ``root`` as ``(x, label)``.

    Pixel data: ``x`` float32 ``(C, H, W)`` in ``[-1, 1]``. Latent data: ``x`` float32 ``(C, h, w)``
    equal to ``latent_scale * z``, with ``z = mean + std * eps`` (``latent_sample``) or ``z = mean``.
    ``flip``: horizontal flip with probability 1/2; for latents it picks the stored encoding of
    the flipped image when the shards have one (``--flip-copy``), else flips the latent itself.
    ``split``: ``"all"``, or ``"train"``/``"val"`` of ``split_indices(..., val_fraction)``.
    ``image_size``/``channels``/``kind``, when given, are checked against the manifest.
    """

    def __init__(self, root, split: str = "all", *, flip: bool = False, image_size: int | None = None,
                 channels: int | None = None, kind: str | None = None, latent_scale: float = 0.18215,
                 latent_sample: bool = True, val_fraction: float = 0.0):
        self.root = Path(root).expanduser()
        m = read_manifest(self.root)
        self.manifest = {k: v for k, v in m.items() if k not in ("shards", "skipped")}
        self.kind, self.format = m["kind"], m["format"]
        if kind is not None and kind != self.kind:
            raise ValueError(f"data.kind={kind!r} but {str(self.root)!r} holds {self.kind!r} records")
        if self.kind == "latent":
            k, c, h, w = m["shape"]
            self.flip_copy = k == 4
        else:
            h, w, c = m["shape"]
        if image_size is not None and (h, w) != (image_size, image_size):
            raise ValueError(f"data.image_size={image_size} but {str(self.root)!r} holds {h}x{w} records "
                             f"(manifest.json); set data.image_size={h} or rebuild the shards at that size")
        if channels is not None and channels != c:
            raise ValueError(f"data.channels={channels} but {str(self.root)!r} holds {c}-channel records")
        self.shape = (c, h, w)
        self.shard_names = [s["name"] for s in m["shards"]]
        self.shard_bytes = [s.get("data_mdb_bytes") for s in m["shards"]]
        for s, name in enumerate(self.shard_names):
            if not (self.root / name / "data.mdb").is_file():
                raise ShardError(f"shard {str(self.root / name)!r} listed in manifest.json is missing")
            self._open(s)  # now, not in a DataLoader worker: a truncated shard fails here with its name
        self.counts = np.array([s["count"] for s in m["shards"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        # numpy arrays, not lists of Python objects: forked workers then share them without copies
        self.sources = np.array([n for s in m["shards"] for n in s["sources"]], dtype=str)
        self.labels = np.array([lab for s in m["shards"] for lab in s["labels"]], dtype=np.int64)
        self.indices = split_indices(self.sources, split, val_fraction)
        self.split = split
        if len(self.indices) == 0:
            raise ValueError(f"split {split!r} of {str(self.root)!r} has zero records "
                             f"(count={m['count']}, val_fraction={val_fraction})")
        self.flip, self.latent_scale, self.latent_sample = flip, latent_scale, latent_sample
        self._envs: dict[int, lmdb.Environment] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_envs"], state["_pid"] = {}, None
        return state

    def _env(self, s: int) -> lmdb.Environment:
        if self._pid != os.getpid():  # new process: never use a parent's handle (open_env reopens)
            self._envs, self._pid = {}, os.getpid()
        env = self._envs.get(s)
        if env is None:
            path = self.root / self.shard_names[s]
            env = self._open(s)
            with env.begin() as txn:
                problem = shard_header_problem(txn, int(self.counts[s]), self.manifest)
            if problem:
                raise ShardError(f"shard {str(path)!r} {problem}")
            self._envs[s] = env
        return env

    def _open(self, s: int) -> lmdb.Environment:
        """Shard ``s`` via ``open_env`` (size checks against its header and the manifest)."""
        try:
            return open_env(self.root / self.shard_names[s], self.shard_bytes[s])
        except ShardError as e:
            raise ShardError(f"{e}; run `python -m data_prep verify {self.root}`") from None

    def locate(self, i: int) -> tuple[int, int]:
        """Dataset index -> (shard, local key)."""
        g = int(self.indices[i])
        s = int(np.searchsorted(self.offsets, g, side="right")) - 1
        return s, g - int(self.offsets[s])

    def read(self, i: int) -> np.ndarray:
        """Stored record ``i`` decoded: uint8 HWC (pixels) or float16 ``(k, C, h, w)`` (latents)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} records")
        s, key = self.locate(i % len(self))
        try:
            with self._env(s).begin(buffers=True) as txn:
                buf = txn.get(str(key).encode())
                if buf is not None:
                    return decode_value(buf, self.manifest).copy()
            problem = "is missing"
        except (lmdb.Error, ValueError) as e:
            problem = str(e)
        source = str(self.sources[self.offsets[s] + key])
        raise ShardError(f"{str(self.root / self.shard_names[s])!r} key '{key}' (source {source!r}): {problem}; "
                         f"run `python -m data_prep verify {self.root}`")

    def label(self, i: int) -> int:
        return int(self.labels[self.indices[i]])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        arr = self.read(i)
        flip = self.flip and bool(torch.rand(()) < 0.5)
        if self.kind == "pixel":
            x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)
        else:
            stats = torch.from_numpy(arr).float()
            if flip and self.flip_copy:
                stats, flip = stats[2:], False
            mean, std = stats[0], stats[1]
            x = (mean + std * torch.randn(mean.shape)) if self.latent_sample else mean.clone()
            x = x.mul_(self.latent_scale)
        if flip:
            x = x.flip(-1)
        return x, self.label(i)


def _get(cfg, key, default=None):
    v = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if v is None else v


def _resolve_path(cfg) -> Path:
    path = cfg.get("path")
    if path is None:
        from .digits import EMBEDDED
        if cfg.get("name") in EMBEDDED:
            return EMBEDDED[cfg["name"]](int(_get(cfg, "image_size", 16)), int(_get(cfg, "channels", 1)))
        raise ValueError(f"data.path is null for dataset {cfg.get('name')!r}; only the embedded datasets "
                         f"{sorted(EMBEDDED)} are built automatically")
    if str(path) == "???":
        raise ValueError("data.path is not set: build shards with `python -m data_prep build SRC_DIR OUT_DIR "
                         "--size N` and pass data.path=OUT_DIR")
    return Path(os.path.expandvars(str(path))).expanduser()


def _container(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def build_dataset(data_cfg, split: str = "train") -> ShardedLMDBDataset:
    """Dataset from a data config node (``configs/data/*.yaml``; OmegaConf node or dict)."""
    cfg = _container(data_cfg)
    ds = ShardedLMDBDataset(
        _resolve_path(cfg), split, flip=bool(_get(cfg, "flip", False)), image_size=cfg.get("image_size"),
        channels=cfg.get("channels"), kind=cfg.get("kind"), latent_scale=float(_get(cfg, "latent_scale", 0.18215)),
        latent_sample=bool(_get(cfg, "latent_sample", True)), val_fraction=float(_get(cfg, "val_fraction", 0.0)))
    num_classes = int(_get(cfg, "num_classes", 0))
    have = int(ds.manifest.get("num_classes", 0))
    if num_classes and num_classes != have:
        raise ValueError(f"data.num_classes={num_classes} but {str(ds.root)!r} has {have} classes "
                         f"(build with --labels subdir for class-conditional data, or set data.num_classes=0)")
    if ds.kind == "latent":
        stored = ds.manifest.get("latent_scale")
        if stored is not None and abs(stored - ds.latent_scale) > 1e-12:
            raise ValueError(f"data.latent_scale={ds.latent_scale} but {str(ds.root)!r} was encoded for "
                             f"latent_scale={stored} (manifest.json)")
    return ds


# ----------------------------------------------------------------------------- FID reference images


def write_real_samples(root, out_dir, split: str = "all", val_fraction: float = 0.0, progress: bool = True) -> Path:
    """Write the records of ``split`` as PNGs (``{global_index:06d}.png``, exactly the stored pixels).

    Atomic (written to a temporary folder, then renamed) and safe if several processes race:
    an existing ``out_dir`` is taken as complete and left alone.
    """
    out = Path(out_dir).expanduser()
    ds = ShardedLMDBDataset(root, split, val_fraction=val_fraction)
    if ds.kind != "pixel":
        raise ValueError(f"{str(ds.root)!r} holds latents; write real samples from its pixel shards "
                         f"({ds.manifest.get('source_dataset')!r})")
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        if out.is_dir():
            return out
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.mkdir()
        for i in tqdm(range(len(ds)), desc=f"real samples {split}", unit="img", disable=None if progress else True):
            arr = ds.read(i)
            Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(
                tmp / f"{int(ds.indices[i]):06d}.png", compress_level=1)
        os.replace(tmp, out)
    return out


def ensure_real_samples(data_cfg) -> Path:
    """Folder of reference PNGs for FID/KID for this data config; written on first use.

    ``data.real_samples`` when set (a folder that exists is used as it is); else
    ``<pixel dataset>/real_samples_<split>`` with ``split = data.real_samples_split`` (default
    ``all``: every stored image, the paper's practice). Latent datasets use the pixel shards
    they were encoded from (``source_dataset`` in their manifest).
    """
    cfg = _container(data_cfg)
    split = _get(cfg, "real_samples_split", "all")
    target = cfg.get("real_samples")
    if target is not None and Path(os.path.expandvars(str(target))).expanduser().is_dir():
        return Path(os.path.expandvars(str(target))).expanduser()
    root = _resolve_path(cfg)
    m = read_manifest(root)
    if m["kind"] == "latent":
        root = Path(m["source_dataset"])
    if target is None:
        target = root / f"real_samples_{split}"
    return write_real_samples(root, Path(os.path.expandvars(str(target))), split,
                              float(_get(cfg, "val_fraction", 0.0)), progress=False)
