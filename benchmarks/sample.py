"""Sampling throughput (images/s, real NFE) and the time of a FID evaluation with cached reference statistics.

    python benchmarks/sample.py                                  # CPU: zigma_xs on 16x16x1, heun 10 steps
    python benchmarks/sample.py --preset zigma_b2 --batch 64     # GPU: latent 4x32x32 (VAE decode not included)

The FID part times `Evaluator.folder` on `--fid-num` PNGs against a reference whose statistics
are already cached, through clean-fid's "clean" pipeline (PNG decode, 299x299 bicubic resize,
features). Inception is used when its weights are on disk; otherwise a small stand-in
extractor (noted in the JSON), so the figure then covers decode + resize only. The 50k time is
extrapolated from the measured rate. JSON goes to benchmarks/results/.
"""
import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from arcee.io import atomic_write_text
from arcee.metrics import Evaluator, build_feature_extractor
from arcee.models import build_model
from arcee.sample import ImageSampler

ROOT = Path(__file__).resolve().parents[1]


def parse_args():
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="zigma_b2" if cuda else "zigma_xs", help="configs/model/<preset>.yaml")
    ap.add_argument("--batch", type=int, default=64 if cuda else 16)
    ap.add_argument("--num", type=int, default=None, help="images to sample (default: 4 batches)")
    ap.add_argument("--sampler", default="heun")
    ap.add_argument("--steps", type=int, default=50 if cuda else 10)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16" if cuda else "fp32", help="autocast dtype")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--fid-num", type=int, default=2000 if cuda else 500, help="PNGs in the timed FID evaluation")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return ap.parse_args()


class StandIn(torch.nn.Module):
    """Pooled random projection to 64 features: a cheap stand-in when Inception is unavailable."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Parameter(torch.randn(3 * 8 * 8, 64, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x / 255, 8).flatten(1) @ self.proj


def config(preset):
    xs = preset == "zigma_xs"
    data = dict(name="bench", kind="pixel" if xs else "latent", image_size=16 if xs else 32, channels=1 if xs else 4,
                num_classes=0, latent_scale=0.18215, vae=None, real_samples=None)
    return OmegaConf.create({"model": OmegaConf.load(ROOT / "configs" / "model" / f"{preset}.yaml"), "data": data,
                             "flow": OmegaConf.load(ROOT / "configs" / "flow" / "gvp.yaml")})


def bench_sampling(args):
    cfg = config(args.preset)
    model = build_model(cfg.model).to(args.device).eval()
    with torch.no_grad():  # random weights; the zero-initialised output layers perturbed so that work is real
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sampler = ImageSampler(model, cfg, sampler=args.sampler, steps=args.steps, vae=torch.nn.Identity())
    sampler.latent = False  # time the generator: the SD-VAE decode (weights not available offline) is excluded
    ac = (torch.autocast(args.device.split(":")[0], torch.bfloat16) if args.dtype == "bf16" else nullcontext())
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    num = args.num or 4 * args.batch
    with ac:
        sampler(list(range(args.batch)))  # warm-up
        sync()
        t0, nfe = time.perf_counter(), []
        for s in range(0, num, args.batch):
            nfe.append(sampler(list(range(s, min(s + args.batch, num))))[1])
        sync()
    dt = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return {"images": num, "seconds": dt, "images_per_s": num / dt, "nfe_per_image": float(np.mean(nfe)),
            "params": params, "image": list(sampler.shape)}


def bench_fid(args, size, channels):
    ext = "inception"
    try:
        build_feature_extractor("inception", "clean", args.device)
    except RuntimeError as e:
        ext, note = StandIn(), f"Inception unavailable ({str(e)[:80]}...): stand-in extractor"
    else:
        note = "Inception (clean-fid torchscript)"
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("real", "fake"):
            d = Path(tmp) / name
            d.mkdir()
            for i in range(args.fid_num):
                a = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
                Image.fromarray(a[..., 0] if channels == 1 else a).save(d / f"{i:06d}.png")
        kw = dict(feature_extractor=ext, cache_dir=Path(tmp) / "cache", device=args.device, verbose=False,
                  num_workers=8 if args.device.startswith("cuda") else 2)
        Evaluator(Path(tmp) / "real", **kw).reference  # computes and caches the reference statistics
        ev = Evaluator(Path(tmp) / "real", **kw)
        t0 = time.perf_counter()
        res = ev.folder(Path(tmp) / "fake")
        dt = time.perf_counter() - t0
        assert ev.reference.cached
    return {"extractor": note, "images": args.fid_num, "image": [size, size, channels], "seconds": dt,
            "images_per_s": args.fid_num / dt, "extrapolated_50k_s": 50_000 * dt / args.fid_num, "fid": res["fid"]}


def main():
    args = parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    sampling = bench_sampling(args)
    pixel = (16, 1) if args.preset == "zigma_xs" else (256, 3)
    fid = bench_fid(args, *pixel)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    out = {"preset": args.preset, "device": args.device, "device_name": device_name, "batch": args.batch,
           "sampler": args.sampler, "steps": args.steps, "dtype": args.dtype, "sampling": sampling, "fid": fid}
    print(json.dumps(out, indent=2))
    path = args.out / f"sample_{args.preset}_{args.sampler}{args.steps}_b{args.batch}_{args.dtype}_{args.device.split(':')[0]}.json"
    atomic_write_text(path, json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
