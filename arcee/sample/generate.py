"""Deterministic batched sampling: per-index noise, PNG folders (resumable, multi-process), grids.

Sample `i` depends only on `(seed, i)`: its noise (and class label) come from numpy's PCG64
seeded with the entropy `[seed, i]` (a SeedSequence; torch's CPU generator would not do: it
keeps only the low 32 bits of a seed, so `(seed << 32) + i` collides across seeds). Folders are written in global batches `[k B, (k+1) B)`
shared round-robin between processes, so every batch, hence every image, is bit-identical for any
number of processes and after a resume. Across batch sizes the images agree up to the
floating-point rounding of shape-dependent kernels (CPU conv2d / 2-D linear pick other
algorithms for other batch sizes: |dv| ~ 3e-7, i.e. rare 1-LSB pixel differences; measured
in tests/test_sample.py). The rows of a batch never influence each other for euler / heun;
dopri5 (error control over the whole batch) and the SDE sampler (noise per batch) depend on
the batch layout, which is fixed by batch_size.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import MISSING
from PIL import Image

from arcee.errors import is_int, require
from arcee.io import atomic_path, atomic_write_text

_PNG = re.compile(r"^(\d{6,})\.png$")
_TMP = re.compile(r"^\.\d{6,}\.png\..*\.tmp$")
MANIFEST = "sampling.json"


def index_generator(seed: int, i: int, stream: int = 0) -> np.random.Generator:
    """The random stream of sample `i` of run `seed` (`stream` 1: per-batch SDE noise)."""
    if seed < 0 or i < 0:
        raise ValueError(f"seed and sample index must be >= 0, got seed={seed}, i={i}")
    return np.random.default_rng([seed, i, stream])


def draw_inputs(indices, shape, num_classes: int, seed: int, class_label: int | None = None):
    """Noise `x0: (b, *shape)` and labels `y: (b,)` (None when unconditional) for `indices`."""
    xs, ys = [], []
    for i in indices:
        g = index_generator(seed, int(i))
        xs.append(torch.from_numpy(g.standard_normal(shape, dtype=np.float32)))
        if num_classes > 0:
            ys.append(torch.tensor(int(g.integers(num_classes)) if class_label is None else class_label))
    return torch.stack(xs), (torch.stack(ys) if ys else None)


@dataclass
class SamplerArgs:
    """The types of the sampler keys that sample.py and evaluate.py share (null: the checkpoint's)."""

    sampler: Optional[str] = MISSING
    steps: Optional[int] = MISSING
    atol: Optional[float] = MISSING
    rtol: Optional[float] = MISSING
    cfg_scale: Optional[float] = MISSING
    class_label: Optional[int] = MISSING


def check_sampling_args(*, seed=0, sampler=None, steps=None, atol=None, rtol=None, cfg_scale=None,
                        class_label=None) -> None:
    """The sampling arguments of sample.py / evaluate.py (None: the checkpoint's flow node); raises
    ValueError naming the first bad one. Called before anything is loaded or written."""
    from arcee.flow import SAMPLERS

    number = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)
    require(is_int(seed) and seed >= 0, "seed", seed, "an integer >= 0")
    require(sampler is None or sampler in SAMPLERS, "sampler", sampler,
            f"one of {list(SAMPLERS)} (null: the checkpoint's flow.sampler)")
    require(steps is None or is_int(steps) and steps >= 1, "steps", steps,
            "an integer >= 1 (null: the checkpoint's flow.steps)")
    for key, v in (("atol", atol), ("rtol", rtol)):
        require(v is None or number(v) and v > 0, key, v, f"a number > 0 (null: the checkpoint's flow.{key})")
    require(cfg_scale is None or number(cfg_scale) and math.isfinite(cfg_scale), "cfg_scale", cfg_scale,
            "a finite number (null: the checkpoint's flow.cfg_scale)")
    require(class_label is None or is_int(class_label) and class_label >= 0, "class_label", class_label,
            "an integer >= 0, or null to draw labels from (seed, i)")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(b, c, h, w) in [-1, 1] -> (b, h, w, c) uint8, c in {1, 3}."""
    x = ((x.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


class ImageSampler:
    """Turns sample indices into uint8 images, deterministically per index.

    Sampler settings (sampler, steps, atol, rtol, cfg_scale) default to the checkpoint's
    `flow` node. Latent models are decoded through `cfg.data.vae`
    (pixels = vae.decode(x / latent_scale)).
    """

    def __init__(self, model, cfg, *, seed: int = 0, sampler: str | None = None, steps: int | None = None,
                 atol: float | None = None, rtol: float | None = None, cfg_scale: float | None = None,
                 class_label: int | None = None, device=None, vae=None):
        from arcee.flow import build_transport

        data = cfg.data
        self.model, self.cfg, self.seed = model, cfg, int(seed)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.shape = (int(data.channels), int(data.image_size), int(data.image_size))
        self.num_classes = int(cfg.model.get("num_classes", data.get("num_classes", 0)) or 0)
        self.transport = build_transport(cfg.flow)
        tr = self.transport
        check_sampling_args(seed=seed, sampler=sampler, steps=steps, atol=atol, rtol=rtol, cfg_scale=cfg_scale,
                            class_label=class_label)
        pick = lambda value, default: default if value is None else value  # None only: 0 is an error, not "unset"
        self.solver = {"sampler": pick(sampler, tr.sampler), "steps": int(pick(steps, tr.steps)),
                       "atol": float(pick(atol, tr.atol)), "rtol": float(pick(rtol, tr.rtol))}
        self.cfg_scale = float(pick(cfg_scale, tr.cfg_scale))
        if class_label is not None and not 0 <= class_label < self.num_classes:
            raise ValueError(f"class_label={class_label} needs a conditional model with more classes "
                             f"(data.num_classes={self.num_classes})")
        if self.cfg_scale != 1.0 and self.num_classes == 0:
            raise ValueError(f"cfg_scale={self.cfg_scale} needs a class-conditional model (data.num_classes=0)")
        self.class_label = class_label
        self.latent = data.get("kind", "pixel") == "latent"
        self.vae = vae
        if self.latent and self.vae is None:
            from arcee.data import load_vae
            self.vae = load_vae(data.vae, device=self.device)

    @torch.no_grad()
    def __call__(self, indices) -> tuple[np.ndarray, int]:
        """-> (images (b, h, w, c) uint8, number of velocity evaluations for this batch)."""
        x0, y = draw_inputs(indices, self.shape, self.num_classes, self.seed, self.class_label)
        x0 = x0.to(self.device)
        y = y.to(self.device) if y is not None else None
        velocity = self.transport.velocity_fn(self.model, y, null_class=self.num_classes, cfg_scale=self.cfg_scale)
        g = None
        if self.solver["sampler"] == "euler_maruyama":  # SDE noise: one stream per batch
            seed = int(index_generator(self.seed, int(indices[0]), stream=1).integers(2**62))
            g = torch.Generator(self.device).manual_seed(seed)
        x1, nfe = self.transport.sample(velocity, x0, generator=g, **self.solver)
        if not torch.isfinite(x1).all():
            raise FloatingPointError(f"sampler produced non-finite values for indices {indices[0]}..{indices[-1]}")
        if self.latent:
            from arcee.data import decode_latents
            x1 = decode_latents(self.vae, x1, float(self.cfg.data.latent_scale))
        return to_uint8(x1), int(nfe)


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(n, h, w, c) uint8 -> one (H, W, c) uint8 grid, `nrow` images per row, `pad` black pixels around each."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, nrow)
        grid[pad + r * (h + pad):(r + 1) * (h + pad), pad + q * (w + pad):(q + 1) * (w + pad)] = img
    return grid


def save_png(path, image: np.ndarray) -> None:
    """Atomic PNG write of one (h, w, c) uint8 image (c = 1 -> grayscale)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f, format="PNG")


def sample_grid(model, transport, cfg, n: int = 64, seed: int = 0, path=None, **sampler_kwargs) -> np.ndarray:
    """Grid of samples 0..n-1 of `seed` (the trainer's periodic EMA grid). Saves a PNG when `path`.

    `transport` is accepted for the trainer's call signature; the sampler settings come from
    `cfg.flow` unless overridden through `sampler_kwargs` (sampler, steps, cfg_scale, ...).
    """
    del transport  # ImageSampler builds the same transport from cfg.flow
    sampler = ImageSampler(model, cfg, seed=seed, **sampler_kwargs)
    images, _ = sampler(list(range(n)))
    grid = make_grid(images)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_png(path, grid)
    return grid


def png_name(i: int) -> str:
    return f"{i:06d}.png"


def existing_indices(out_dir) -> set[int]:
    return {int(m.group(1)) for f in os.listdir(out_dir) if (m := _PNG.match(f))}


def sample_folder(sampler: ImageSampler, out_dir, num_samples: int, batch_size: int = 64,
                  manifest: dict | None = None, state=None, progress: bool = True) -> dict:
    """Write images `000000.png .. {num_samples-1}.png` to `out_dir`; resumable, multi-process.

    Run under `accelerate launch` to split the work: every process calls this with the same
    arguments (`state`: accelerate's PartialState, created when None). Indices already on
    disk are kept; stray temporary files of an interrupted run are removed. `manifest`
    (settings that define the images) is stored as `sampling.json` and must match on resume.
    Returns a report (images generated, NFE per image, images/s) on every process.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm import tqdm

    require(is_int(num_samples) and num_samples >= 1, "num_samples", num_samples, "an integer >= 1")
    require(is_int(batch_size) and batch_size >= 1, "batch_size", batch_size, "an integer >= 1 (per process)")
    state = state or PartialState(cpu=not torch.cuda.is_available())  # cpu: gloo ranks without GPUs
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = dict(manifest or {}, seed=sampler.seed, shape=list(sampler.shape), **sampler.solver,
                    cfg_scale=sampler.cfg_scale, class_label=sampler.class_label)
    _check_folder(out_dir, num_samples, manifest)          # every rank: same verdict, no deadlock
    if state.is_main_process:
        for f in os.listdir(out_dir):
            if _TMP.match(f):
                os.remove(out_dir / f)
        _write_json(out_dir / MANIFEST, dict(manifest, num_samples=num_samples))
    done = existing_indices(out_dir)                        # scanned by every rank before any write
    batches = [range(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]
    todo = [b for b in batches if not all(i in done for i in b)]
    state.wait_for_everyone()

    mine = todo[state.process_index::state.num_processes]
    t0, nfes, written = time.perf_counter(), [], 0
    bar = tqdm(mine, desc="sampling", unit="batch", disable=not (progress and state.is_main_process))
    for b in bar:
        images, nfe = sampler(list(b))
        nfes.append((len(b), nfe))
        for i, img in zip(b, images):
            if i not in done:
                save_png(out_dir / png_name(i), img)
                written += 1
    print(f"[rank {state.process_index}/{state.num_processes}] wrote {written} images", flush=True)
    if state.num_processes > 1:
        nfes = gather_object(nfes)
    state.wait_for_everyone()
    elapsed = time.perf_counter() - t0

    have = existing_indices(out_dir)
    missing = [i for i in range(num_samples) if i not in have]
    if missing:
        raise RuntimeError(f"sampling finished but {len(missing)} images are missing in {out_dir} (e.g. {missing[:5]})")
    generated = sum(n for n, _ in nfes)
    return {"out_dir": str(out_dir), "num_samples": num_samples, "generated": generated,
            "nfe_per_image": (sum(n * f for n, f in nfes) / generated) if generated else None,
            "images_per_s": generated / elapsed if generated else None, "seconds": elapsed,
            "num_processes": state.num_processes}


def _check_folder(out_dir: Path, num_samples: int, manifest: dict) -> None:
    foreign = sorted(f for f in os.listdir(out_dir) if not (_PNG.match(f) or f == MANIFEST or f.startswith(".")))
    if foreign:
        raise ValueError(f"out_dir {out_dir} holds {len(foreign)} file(s) or folder(s) sample.py does not write "
                         f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); a sample folder holds only "
                         f"its images and {MANIFEST}: use a fresh out_dir or move them away")
    extra = sorted(i for i in existing_indices(out_dir) if i >= num_samples)
    if extra:
        raise ValueError(f"out_dir {out_dir} already holds {len(extra)} images with index >= num_samples="
                         f"{num_samples} (e.g. {png_name(extra[0])}); use a fresh out_dir or num_samples >= "
                         f"{extra[-1] + 1}")
    path = out_dir / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        old.pop("num_samples", None)
        diff = {k: (old.get(k), v) for k, v in manifest.items() if _jsonable(v) != old.get(k)}
        if diff:
            raise ValueError(f"out_dir {out_dir} was sampled with other settings ({MANIFEST}: "
                             + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                             + "); use a fresh out_dir to avoid mixing images")
    elif existing_indices(out_dir):
        raise ValueError(f"out_dir {out_dir} holds images but no {MANIFEST}: not written by sample.py; use a fresh out_dir")


def _jsonable(v):
    return json.loads(json.dumps(v))


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def read_folder(out_dir, num_samples: int | None = None, limit: int | None = None) -> np.ndarray:
    """Images 0..n-1 of a sample folder as one (n, h, w, c) uint8 array."""
    n = num_samples if num_samples is not None else len(existing_indices(out_dir))
    n = min(n, limit) if limit is not None else n
    return np.stack([_read(Path(out_dir) / png_name(i)) for i in range(n)])


def _read(path: Path) -> np.ndarray:
    a = np.asarray(Image.open(path))
    return a[..., None] if a.ndim == 2 else a


def export_npz(out_dir, num_samples: int, path) -> None:
    """Stream images 0..num_samples-1 into `path` (.npz with `arr_0: (n, h, w, c)` uint8, ADM layout)."""
    path, out_dir = Path(path), Path(out_dir)
    first = _read(out_dir / png_name(0))
    fd, npy = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npy.tmp")
    os.close(fd)
    try:
        arr = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(num_samples, *first.shape))
        for i in range(num_samples):
            arr[i] = _read(out_dir / png_name(i))
        arr.flush()
        del arr
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.write(npy, "arr_0.npy")
    finally:
        if os.path.exists(npy):
            os.remove(npy)
