"""Data-loading throughput: records/s read and decoded from LMDB shards by a DataLoader.

Formats: raw uint8, PNG, JPEG (q95, 4:4:4) pixels at --size, and fp16 latent statistics
(4 x size/8 x size/8 mean and std, sampled at load) as encode-latents writes them; 0, 1 and 2
workers. Compared with what training consumes: --step-images-per-s, images per second per GPU
(each training process runs its own loader). The default, 200, is an assumption above the paper's
ZigMa-B/2 setting (96 images per GPU per step at a few steps/s); replace it with the measured
images/s of a training step. Synthetic images: smooth random fields plus mild noise, so PNG and
JPEG sizes resemble photographs'.

    python benchmarks/data.py [--num-images 1024 --size 256 --workers 0 1 2 --step-images-per-s 200]

Writes benchmarks/results/data.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arcee.data import ShardedLMDBDataset, build_shards, encode_latents  # noqa: E402
from arcee.io import atomic_write_bytes  # noqa: E402


def synthetic_images(n: int, size: int, seed: int = 0) -> list[tuple[str, int, np.ndarray]]:
    """Photo-like uint8 images: a few random low-frequency sinusoids per channel plus noise (sigma 4)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(n):
        img = np.zeros((size, size, 3))
        for _ in range(4):
            f, p, a = rng.uniform(0.5, 4, 2), rng.uniform(0, 2 * np.pi), rng.uniform(20, 50, 3)
            img += a * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy) + p)[..., None]
        img = 128 + img + rng.normal(0, 4, img.shape)
        out.append((f"synthetic/{i:06d}", 0, np.clip(img, 0, 255).astype(np.uint8)))
    return out


class PoolEncoder(torch.nn.Module):
    """Stands in for the SD-VAE encoder (same output shapes: 3xHxW -> 4x(H/8)x(W/8) mean and std)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 8, 1)

    def encode(self, x):
        mean, logvar = self.proj(torch.nn.functional.avg_pool2d(x, 8)).chunk(2, 1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.exp(0.5 * logvar)))


def records_per_s(ds, workers: int, batch_size: int, epochs: int) -> tuple[float, float]:
    """Steady-state records/s (after the first batch, which pays worker start-up) and first-batch seconds."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    n = 0
    for e in range(epochs):
        for x, _ in it:
            n += x.shape[0]
        it = iter(loader) if e + 1 < epochs else None
    return n / (time.perf_counter() - t1), t1 - t0


def getitem_per_s(ds, n: int) -> float:
    """records/s of ``ds[i]`` in one process (read, decode, flip, to [-1, 1]; no batching): the per-core rate."""
    t = time.perf_counter()
    for i in range(n):
        ds[i % len(ds)]
    return n / (time.perf_counter() - t)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=1024)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--formats", nargs="+", default=["raw", "png", "jpeg", "latent"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--step-images-per-s", type=float, default=200.0,
                   help="images/s one GPU's training step consumes (assumption; see the module docstring)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "data.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    results = []
    with tempfile.TemporaryDirectory(prefix="arcee-data-bench-") as tmp:
        images = synthetic_images(a.num_images, a.size)
        roots = {}
        for fmt in [f for f in a.formats if f != "latent"] + (["raw"] if "latent" in a.formats else []):
            if fmt not in roots:
                t = time.perf_counter()
                m = build_shards(images, Path(tmp) / fmt, size=a.size, fmt=fmt, num_shards=4, progress=False)
                roots[fmt] = Path(tmp) / fmt
                size_mb = sum(f.stat().st_size for f in roots[fmt].rglob("data.mdb")) / 2**20
                print(f"built {fmt}: {m['count']} records, {size_mb:.1f} MiB, {time.perf_counter() - t:.1f} s")
        if "latent" in a.formats:
            encode_latents(roots["raw"], Path(tmp) / "latent", PoolEncoder(), batch_size=64, progress=False)
            roots["latent"] = Path(tmp) / "latent"
        for fmt in a.formats:
            ds = ShardedLMDBDataset(roots[fmt], flip=True)
            bytes_per_record = sum(f.stat().st_size for f in roots[fmt].rglob("data.mdb")) / len(ds)
            rate = getitem_per_s(ds, min(len(ds), 512))
            results.append({"format": fmt, "workers": "ds[i] loop", "records_per_s": round(rate, 1),
                            "bytes_per_record": round(bytes_per_record),
                            "ratio_to_step": round(rate / a.step_images_per_s, 2)})
            print(f"{fmt:>6}  ds[i] loop  {rate:9.1f} records/s  x{rate / a.step_images_per_s:.2f} (one core)")
            for w in a.workers:
                rate, startup = records_per_s(ds, w, a.batch_size, a.epochs)
                row = {"format": fmt, "workers": w, "records_per_s": round(rate, 1),
                       "first_batch_s": round(startup, 3), "bytes_per_record": round(bytes_per_record),
                       "ratio_to_step": round(rate / a.step_images_per_s, 2)}
                results.append(row)
                print(f"{fmt:>6}  workers={w}  {rate:9.1f} records/s  "
                      f"x{row['ratio_to_step']:.2f} of {a.step_images_per_s:g} img/s  (first batch {startup:.2f} s)")

    report = {
        "benchmark": "data loading: DataLoader over ShardedLMDBDataset (decode, [-1,1] / latent sampling, flip)",
        "num_images": a.num_images, "image_size": a.size, "batch_size": a.batch_size, "epochs": a.epochs,
        "step_images_per_s": a.step_images_per_s,
        "step_images_per_s_note": "assumed per-GPU consumption of a training step; each GPU process has its own loader",
        "machine": {"cpu_count": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "results": results,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(report, indent=1) + "\n").encode())
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
