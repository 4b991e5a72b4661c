"""``python -m data_prep {build,verify,real-samples,encode-latents} ...`` (also ``arcee-data``).

    build SRC_DIR OUT_DIR --size 256 [--shards 8 | --shard-size-mb 1024] [--format raw|png|jpeg]
    verify OUT_DIR                               exit 1 when any record is missing or corrupt
    real-samples OUT_DIR REAL_DIR [--split all|train|val --val-fraction F]
    encode-latents OUT_DIR LATENT_DIR [--vae stabilityai/sd-vae-ft-ema] [--flip-copy]

Exit status: 0 ok, 1 verification found problems, 2 bad input or damaged data (one line saying what
and where; --debug shows the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from arcee.errors import run_main


def _build(a) -> int:
    from arcee.data.shards import build_shards, scan_folder

    sources, class_names = scan_folder(a.src, a.labels)
    m = build_shards(sources, a.out, size=a.size, channels=a.channels, fmt=a.format, num_shards=a.shards,
                     shard_size_mb=a.shard_size_mb, workers=a.workers, strict=a.strict, quality=a.jpeg_quality,
                     class_names=class_names, progress=not a.quiet)
    print(f"{a.out}: {m['count']} records in {len(m['shards'])} shard(s), {m['shape']} {m['format']}, "
          f"{len(m['skipped'])} skipped")
    return 0


def _verify(a) -> int:
    from arcee.data.shards import verify_shards

    problems = verify_shards(a.dir, progress=not a.quiet)
    for p in problems:
        print(f"{a.dir}/{p}", file=sys.stderr)
    print(f"{a.dir}: {'FAILED, ' + str(len(problems)) + ' problem(s)' if problems else 'ok'}")
    return 1 if problems else 0


def _real_samples(a) -> int:
    from arcee.data.dataset import write_real_samples

    out = write_real_samples(a.dir, a.out, a.split, a.val_fraction, progress=not a.quiet)
    print(f"{out}: real samples ({a.split})")
    return 0


def _encode_latents(a) -> int:
    from arcee.data.vae import encode_latents

    m = encode_latents(a.src, a.out, a.vae, batch_size=a.batch_size, flip_copy=a.flip_copy,
                       latent_scale=a.latent_scale, device=a.device, local_files_only=a.offline,
                       workers=a.workers, progress=not a.quiet)
    print(f"{a.out}: {m['count']} latent records {m['shape']} (fp16 mean/std), scale {m['latent_scale']}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="data_prep", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="arcee dataset tools: LMDB shards from image folders, checks, "
                                            "FID reference images, SD-VAE latents",
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="image folder (recursive) -> LMDB shards")
    b.add_argument("src", help="folder of images (searched recursively; hidden files skipped)")
    b.add_argument("out", help="output shard folder (re-running resumes an interrupted build)")
    b.add_argument("--size", type=int, required=True, help="resize the shorter side to SIZE, center crop")
    b.add_argument("--channels", type=int, choices=(1, 3), default=3, help="3 = RGB, 1 = grayscale")
    b.add_argument("--format", choices=("raw", "png", "jpeg"), default="raw", help="record encoding")
    b.add_argument("--jpeg-quality", type=int, default=95)
    g = b.add_mutually_exclusive_group()
    g.add_argument("--shards", type=int, help="number of shards")
    g.add_argument("--shard-size-mb", type=float, help="target shard size by raw record size (default 1024)")
    b.add_argument("--labels", choices=("none", "subdir"), default="none",
                   help="subdir: class = first folder level under SRC")
    b.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    b.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of skipping")
    b.set_defaults(fn=_build)

    v = sub.add_parser("verify", help="re-read and check every record")
    v.add_argument("dir")
    v.set_defaults(fn=_verify)

    r = sub.add_parser("real-samples", help="write the stored images as PNGs (FID/KID reference)")
    r.add_argument("dir", help="pixel shard folder")
    r.add_argument("out", help="output folder of PNGs")
    r.add_argument("--split", choices=("all", "train", "val"), default="all")
    r.add_argument("--val-fraction", type=float, default=0.0, help="held-out fraction defining train/val")
    r.set_defaults(fn=_real_samples)

    e = sub.add_parser("encode-latents", help="pixel shards -> SD-VAE latent shards (fp16 mean and std)")
    e.add_argument("src", help="RGB pixel shard folder")
    e.add_argument("out", help="output latent shard folder")
    e.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="Hub name or local folder")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--flip-copy", action="store_true", help="also store the encoding of each flipped image")
    e.add_argument("--latent-scale", type=float, default=0.18215)
    e.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    e.add_argument("--offline", action="store_true", help="never contact the Hub; use the local cache only")
    e.add_argument("--workers", type=int, default=min(4, len(os.sched_getaffinity(0))),
                   help="DataLoader processes reading the pixel shards")
    e.set_defaults(fn=_encode_latents)

    for sp in (b, v, r, e):
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)
    return run_main(a.fn, a, debug=a.debug, hint="--debug")


if __name__ == "__main__":
    raise SystemExit(main())
