"""Forward + backward time per training step, Zigma-k vs Zigma-k + Arcee, at the same preset.

    python benchmarks/model.py                                   # CPU: zigma_xs, 16x16x1, fp32
    python benchmarks/model.py --preset zigma_b2 --batch 32      # GPU: bf16 autocast, peak memory
    python benchmarks/model.py --preset zigma_b2 --block paper --batch 1 --rounds 3   # CPU: the paper's B/2

The two models share their weights (Arcee adds no parameter); steps are timed alternately in
rounds and summarised by the median, so drift on a shared machine hits both alike. Prints the
Arcee overhead in % of step time and writes JSON to benchmarks/results/.
"""
import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

from arcee.io import atomic_write_text

from arcee.models import build_model

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args():
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="zigma_b2" if cuda else "zigma_xs", help="configs/model/<preset>.yaml")
    ap.add_argument("--batch", type=int, default=32 if cuda else 8)
    ap.add_argument("--k", type=int, default=None, help="scan orders (num_orders); default: the preset's")
    ap.add_argument("--vim", action="store_true", help="bidirectional raster scan (Vision Mamba) instead")
    ap.add_argument("--block", choices=["prenorm", "paper"], default=None,
                    help="backbone around the mixer (model.block); default: the preset's")
    ap.add_argument("--depth", type=int, default=None, help="default: the preset's (Vim-B/2 in the paper: 20)")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16" if cuda else "fp32", help="autocast dtype")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--image-size", type=int, default=None, help="default: 16 for zigma_xs, else 32")
    ap.add_argument("--channels", type=int, default=None, help="default: 1 for zigma_xs, else 4")
    ap.add_argument("--rounds", type=int, default=10, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return ap.parse_args()


def build(args, state_chain):
    cfg = OmegaConf.load(ROOT / "configs" / "model" / f"{args.preset}.yaml")
    xs = args.preset == "zigma_xs"
    over = dict(image_size=args.image_size or (16 if xs else 32), in_channels=args.channels or (1 if xs else 4),
                state_chain=state_chain, grad_checkpoint=args.grad_checkpoint)
    if args.vim:
        over.update(scan_order="raster", num_orders=1, bidirectional=True)
    elif args.k is not None:
        over["num_orders"] = args.k
    over.update({k: v for k, v in dict(block=args.block, depth=args.depth).items() if v is not None})
    return build_model(OmegaConf.merge(cfg, over)).to(args.device)


def main():
    args = parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    models = {"zigma": build(args, "none")}
    models["arcee"] = build(args, "arcee")
    models["arcee"].load_state_dict(models["zigma"].state_dict())  # identical weights
    m = models["zigma"]
    x = torch.randn(args.batch, m.in_channels, *m.image_size, device=dev)
    t = torch.rand(args.batch, device=dev)
    y = torch.randint(m.num_classes, (args.batch,), device=dev) if m.num_classes else None
    autocast = (torch.autocast(dev.type, dtype=DTYPES[args.dtype]) if args.dtype != "fp32" else nullcontext())
    steps = {k: (torch.compile(v) if args.compile else v) for k, v in models.items()}

    def step(name):
        with autocast:
            loss = steps[name](x, t, y).float().square().mean()
        loss.backward()
        for p in models[name].parameters():
            p.grad = None

    times, peak = {k: [] for k in models}, {}
    for name in models:  # warm up (and compile), then measure the peak memory of one step
        for _ in range(args.warmup):
            step(name)
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step(name)
            sync()
            peak[name] = torch.cuda.max_memory_allocated() / 2**30
    for _ in range(args.rounds):  # alternate, so that drift hits both alike
        for name in models:
            sync()
            t0 = time.perf_counter()
            step(name)
            sync()
            times[name].append(time.perf_counter() - t0)

    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    overhead = 100 * (ms["arcee"] / ms["zigma"] - 1)
    variant = ("vim" if args.vim else f"k{m.num_orders}") + ("" if m.block == "prenorm" else f"_{m.block}")
    result = dict(
        preset=args.preset, variant=variant, block=m.block, depth=len(m.blocks), batch=args.batch,
        dtype=args.dtype, device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        image=[m.in_channels, *m.image_size], params=sum(p.numel() for p in m.parameters()),
        compile=args.compile, grad_checkpoint=args.grad_checkpoint, rounds=args.rounds,
        step_ms=ms, step_ms_all={k: [round(1e3 * s, 3) for s in v] for k, v in times.items()},
        images_per_s={k: 1e3 * args.batch / v for k, v in ms.items()},
        arcee_overhead_pct=overhead, peak_memory_gib=peak or None, torch=torch.__version__,
        time=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    print(f"{args.preset} {variant} batch {args.batch} {args.dtype} on {result['device_name']}: "
          f"zigma {ms['zigma']:.2f} ms/step ({result['images_per_s']['zigma']:.1f} images/s), "
          f"arcee {ms['arcee']:.2f} ms/step ({result['images_per_s']['arcee']:.1f} images/s), "
          f"Arcee overhead {overhead:+.2f}%"
          + (f"; peak memory {peak['zigma']:.2f} / {peak['arcee']:.2f} GiB" if peak else ""))

    path = args.out / f"model_{args.preset}_{variant}_b{args.batch}_{args.dtype}_{dev.type}.json"
    atomic_write_text(path, json.dumps(result, indent=2))
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
