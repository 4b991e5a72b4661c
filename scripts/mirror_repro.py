"""What the Arcee chain does, at CPU scale: Zigma-1, Zigma-1 + Arcee and a non-causal reference on
the mirrored digits (issue 15).

    python scripts/mirror_repro.py                     # the full run (defaults below)
    python scripts/mirror_repro.py --steps 4 --ckpt-every 2 --seeds 0 --num-samples 8 --docs /tmp/d --out /tmp/r

Data `data=digits_mirrored`: each digit in the bottom half (rows 8-15), its vertical mirror in the
top half. With one scan path (zigzag path 0) the top half is the first 32 of 64 tokens: a strictly
causal model denoises it without seeing the bottom half that determines it. Variants
(configs/experiment/mirror_<variant>.yaml, same parameters, so the same seed gives the same initial
weights and data order):
  zigma1        one zigzag path, no chain (strictly causal along the path)
  zigma1_arcee  the same + the Arcee state chain (block i's final SSM state starts block i+1)
  sweep2        the non-causal reference: raster path and its reversal, alternating over the blocks

Training reuses scripts/digits_repro.py (`python train.py experiment=mirror_<v> seed=<s> ...`, run
folders under --out, finished runs are not retrained), with a checkpoint every --ckpt-every steps.
Readout per run (arcee.metrics.causality; every model sees the same fixed (t, noise) draws and
points): held-out flow-matching loss per quarter of zigzag path 0 (val split), the anticausal
sensitivity along that path at every checkpoint (EMA weights), --num-samples samples (same noise
for every run): their top-vs-mirrored-bottom disagreement, and a sample grid. results.json is
rewritten after every evaluated run, so a partial run keeps what it measured.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import shlex
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from arcee.io import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("digits_repro", ROOT / "scripts" / "digits_repro.py")
repro = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(repro)
log, mean_std, paired = repro.log, repro.mean_std, repro.paired

PREFIX = "mirror_"
LABELS = {"zigma1": "Zigma-1", "zigma1_arcee": "Zigma-1 + Arcee", "sweep2": "2 paths (sweep)",
          "zigma2": "Zigma-2", "zigma2_arcee": "Zigma-2 + Arcee"}
SAMPLE_SEED = repro.SAMPLE_SEED


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default="zigma1,zigma1_arcee,sweep2",
                   help="comma-separated; each trains configs/experiment/mirror_<variant>.yaml")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds, the same for every variant")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=32, help="global training batch")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint (and sensitivity readout) interval")
    p.add_argument("--loss-repeats", type=int, default=4, help="(t, noise) draws per val image for the held-out loss")
    p.add_argument("--points", type=int, default=2, help="val images (t = (k + 0.5) / points) for the sensitivity")
    p.add_argument("--num-samples", type=int, default=100, help="samples per run for the mirror agreement")
    p.add_argument("--sampler", default="heun", help="euler | heun | dopri5")
    p.add_argument("--sample-steps", type=int, default=6, help="euler / heun steps (heun: 2 * steps - 1 NFE)")
    p.add_argument("--out", default="runs/mirror_repro", help="run folders: <out>/<variant>/seed<s>")
    p.add_argument("--docs", default="docs/reproduction/mirror", help="where results.json/.md and the plots go")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    p.add_argument("--jobs", type=int, default=3, help="training runs at a time (each with --threads threads)")
    p.add_argument("--train-only", action="store_true", help="train (and checkpoint) every run, evaluate nothing")
    p.add_argument("--report-only", action="store_true", help="only rewrite results.md and the plots from results.json")
    p.add_argument("--train-overrides", default="", help="extra Hydra overrides for every run (space-separated)")
    a = p.parse_args(argv)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    try:
        a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {a.seeds!r}")
    if not a.variants or not a.seeds:
        p.error("--variants and --seeds must name at least one each")
    for v in a.variants:
        if not (ROOT / "configs" / "experiment" / f"{PREFIX}{v}.yaml").is_file():
            have = sorted(f.stem[len(PREFIX):] for f in (ROOT / "configs" / "experiment").glob(f"{PREFIX}*.yaml"))
            p.error(f"--variants: no configs/experiment/{PREFIX}{v}.yaml (available: {', '.join(have)})")
    for key in ("steps", "batch_size", "ckpt_every", "loss_repeats", "points", "sample_steps", "threads", "jobs"):
        if getattr(a, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(a, key)}")
    if a.num_samples < 2:
        p.error(f"--num-samples must be >= 2, got {a.num_samples}")
    a.experiment_prefix = PREFIX
    a.out, a.docs = Path(a.out).absolute(), Path(a.docs).absolute()
    a.ckpt_overrides = (f"train.ckpt_every={a.ckpt_every} train.milestone_every={a.ckpt_every} "
                        f"train.keep_last=1")
    return a


# ----------------------------------------------------------------------------- training


def run_jobs(args) -> list[tuple[str, int, Path]]:
    """Seed-major: every variant of seed s0, then of s1, ...: a partial run keeps complete paired seeds."""
    return [(v, s, args.out / v / f"seed{s}") for s in args.seeds for v in args.variants]


def train_all(args, env: dict, then=None) -> float:
    """Train every (variant, seed) through digits_repro.train_one, `args.jobs` at a time; `then(job)` runs
    right after each training (e.g. its evaluation, overlapping the others' training). Returns wall seconds."""
    jobs = run_jobs(args)
    train_args = argparse.Namespace(**{**vars(args), "train_overrides": f"{args.ckpt_overrides} {args.train_overrides}"})
    done, t0 = 0, time.perf_counter()

    def train(job):
        nonlocal done
        v, s, run_dir = job
        sec = repro.train_one(train_args, v, s, run_dir, env)
        done += 1
        log(f"[{done}/{len(jobs)}] {v} seed {s}: " + ("already trained" if sec == 0 else f"trained in {sec:.0f} s"))
        if then is not None:
            then(job)
        return sec

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(train, jobs))
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- evaluation


def mirror_error(images: np.ndarray) -> dict:
    """Top half vs vertically mirrored bottom half of (n, h, w, c) uint8 samples, in [-1, 1] pixel units:
    RMS of top - flip(bottom) per image (0 for every real mirrored digit), and the same for the top of
    image i against the bottom of image i + 1 (unrelated halves: the scale of "no agreement")."""
    x = images.astype(np.float64) / 127.5 - 1.0
    h = x.shape[1] // 2
    top, bottom = x[:, :h], x[:, h:][:, ::-1]
    own = np.sqrt(((top - bottom) ** 2).mean(axis=(1, 2, 3)))
    other = np.sqrt(((top - np.roll(bottom, -1, axis=0)) ** 2).mean(axis=(1, 2, 3)))
    return {"rms": float(own.mean()), "rms_unrelated": float(other.mean()), "ratio": float(own.mean() / other.mean())}


def evaluate_run(run_dir: Path, x_val: torch.Tensor, args, path: torch.Tensor, keep: int = 16) -> dict:
    """Per-quarter held-out loss and sensitivity at every checkpoint (EMA), samples of the final EMA weights."""
    from arcee.metrics import causality
    from arcee.sample import ImageSampler, load_generator, read_step
    from arcee.train import read_metrics
    from arcee.train.checkpoint import list_checkpoints

    t0 = time.perf_counter()
    over_training = []  # the sensitivity at every checkpoint, the loss of the last one
    ckpts = list_checkpoints(run_dir / "checkpoints")
    for step, ckpt in ckpts:
        model, cfg = load_generator(ckpt, use_ema=True)
        r = causality.analyze(model, cfg, x_val, path=path, repeats=args.loss_repeats, points=args.points,
                              loss=step == ckpts[-1][0])
        r.pop("sensitivity_map")  # (L, L) per checkpoint: too big for results.json; the CLI plots it
        over_training.append({"step": step, **r})
    final = over_training[-1]
    model, cfg = load_generator(run_dir / "ema_final.safetensors", use_ema=True)
    sampler = ImageSampler(model, cfg, seed=SAMPLE_SEED, sampler=args.sampler, steps=args.sample_steps)
    images = np.concatenate([sampler(list(range(i, min(i + 100, args.num_samples))))[0]
                             for i in range(0, args.num_samples, 100)])
    curve = [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]
    return {"step": read_step(run_dir / "ema_final.safetensors"), "heldout_loss": final["loss"],
            "quarter_loss": final["quarter_loss"], "position_loss": final["position_loss"],
            "anticausal_ratio": final["sensitivity"]["anticausal_ratio"],
            "first_token_ratio": final["sensitivity"]["first_token_last_ratio"],
            "over_training": over_training, "mirror": mirror_error(images), "curve": curve,
            "eval_seconds": time.perf_counter() - t0, "grid": images[:keep]}


# ----------------------------------------------------------------------------- reporting

KEYS = ("heldout_loss", "q1", "q2", "q3", "q4", "mirror_rms", "anticausal_ratio")


def flat(r: dict) -> dict:
    out = {"heldout_loss": r["heldout_loss"], "mirror_rms": r["mirror"]["rms"], "anticausal_ratio": r["anticausal_ratio"]}
    out.update({f"q{i + 1}": q for i, q in enumerate(r["quarter_loss"])})
    return out


def summarize(runs: list[dict], variants: list[str]) -> dict:
    out = {}
    for v in variants:
        rs = [flat(r) for r in runs if r["variant"] == v]
        if rs:
            out[v] = {k: dict(zip(("mean", "std"), mean_std([r[k] for r in rs])), per_seed=[r[k] for r in rs])
                      for k in KEYS}
    return out


def gap_closed(runs: list[dict], key: str, causal="zigma1", chain="zigma1_arcee", ref="sweep2") -> list[float]:
    """Per seed: (causal - chain) / (causal - ref), the fraction of the causal model's gap to the reference
    that the chain closes (1 = all of it)."""
    by = {(r["variant"], r["seed"]): flat(r)[key] for r in runs}
    seeds = sorted({s for (_, s) in by})
    return [(by[(causal, s)] - by[(chain, s)]) / (by[(causal, s)] - by[(ref, s)]) for s in seeds
            if all((v, s) in by for v in (causal, chain, ref)) and by[(causal, s)] != by[(ref, s)]]


def _fmt(m: dict, digits: int = 4) -> str:
    pm = f" ± {m['std']:.2g}" if math.isfinite(m["std"]) else ""
    return f"{m['mean']:.{digits}g}{pm}"


def markdown(result: dict) -> str:
    a, s, m = result["args"], result["summary"], result["machine"]
    variants = [v for v in a["variants"] if v in s]
    lines = [
        "# Mirrored digits: Zigma-1, Zigma-1 + Arcee, non-causal reference",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} logical CPUs, {a['threads']} torch thread(s) per process, "
        f"{a['jobs']} run(s) at a time, nice {result.get('nice', '?')}), torch {m['torch']}, git "
        f"{m['git_commit']}, {m['date']}. Wall {result['seconds'] / 60:.1f} min (training and evaluation overlap); "
        f"CPU time of this process tree {result['cpu_seconds'] / 60:.1f} min; "
        f"load average at the end {result['load_end']}.",
        "",
        f"Setup: `data=digits_mirrored` (train 1,617 / val 180), ZigMa-XS (64 tokens), {a['steps']} steps x batch "
        f"{a['batch_size']}, seeds {a['seeds']}; EMA weights. Held-out loss: velocity MSE on the val split x "
        f"{a['loss_repeats']} fixed (t, noise) draws, split by quarter of zigzag path 0 (Q1 = the first 16 tokens "
        f"= rows 0-3, the top of the mirror; Q3-Q4 = the digit). Anticausal ratio: ||d v_i/d x_j|| over j > i "
        f"against j < i along zigzag path 0 (autograd, {a['points']} val points). Mirror RMS: top half vs "
        f"flipped bottom half of {a['num_samples']} samples ({a['sampler']}, {a['sample_steps']} steps), "
        f"[-1, 1] units (real data: 0).",
        "",
        "Mean ± std over seeds; lower is better.",
        "",
        "| variant | held-out loss | Q1 | Q2 | Q3 | Q4 | mirror RMS | anticausal ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        lines.append(f"| {LABELS.get(v, v)} | " + " | ".join(_fmt(s[v][k], 3 if k == "anticausal_ratio" else 4)
                                                           for k in KEYS) + " |")
    lines += ["", "Per seed (seeds " + ", ".join(map(str, a["seeds"])) + "):", ""]
    for v in variants:
        lines.append(f"- {LABELS.get(v, v)}: " + "; ".join(
            f"{k} " + ", ".join(f"{x:.4g}" for x in s[v][k]["per_seed"]) for k in KEYS))
    if result["paired"]:
        lines += ["", "Paired per-seed differences (same seed = same initial weights and data order):", ""]
        for name, d in result["paired"].items():
            lines.append(f"- {name}: " + "; ".join(f"{k} " + ", ".join(f"{x:+.4g}" for x in vals)
                                                   for k, vals in d.items()))
    if result.get("gap_closed"):
        lines += ["", "Fraction of the Zigma-1 -> reference gap closed by Arcee, per seed:", ""]
        lines += [f"- {k}: " + ", ".join(f"{x:+.2f}" for x in vals) for k, vals in result["gap_closed"].items()]
    lines += ["", "Plots: `results.png` (per-quarter loss, sensitivity over training, per-position loss), "
              f"`samples.png` (seed {a['seeds'][0]}).", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, variants = result["runs"], [v for v in result["args"]["variants"] if v in result["summary"]]
    colors = {v: f"C{i}" for i, v in enumerate(variants)}
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8), dpi=110)
    ax = axes[0]
    for i, v in enumerate(variants):
        for r in (r for r in runs if r["variant"] == v):
            ax.plot(range(1, 5), r["quarter_loss"], color=colors[v], marker="o", ms=3, lw=1, alpha=0.8,
                    label=LABELS.get(v, v) if r["seed"] == result["args"]["seeds"][0] else None)
    ax.set_xticks(range(1, 5), ["Q1 (top)", "Q2", "Q3", "Q4 (bottom)"], fontsize=8)
    ax.set_title("held-out FM loss per quarter of path 0 (every seed)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for ax, key, title in ((axes[1], "anticausal_ratio", "anticausal / causal sensitivity (path 0)"),
                           (axes[2], "first_token_last_ratio", "first token: |dv_0/dx_last| / |dv_0/dx_0|")):
        for r in runs:
            steps = [o["step"] for o in r["over_training"]]
            vals = [o["sensitivity"][key] for o in r["over_training"]]
            ax.plot(steps, vals, color=colors[r["variant"]], marker="o", ms=3, lw=1,
                    label=LABELS.get(r["variant"], r["variant"]) if r["seed"] == result["args"]["seeds"][0] else None)
        ax.set_yscale("symlog", linthresh=1e-5)
        ax.set_xlabel("step", fontsize=8)
        ax.set_title(title + " (EMA)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[3]
    for v in variants:
        pos = np.mean([r["position_loss"] for r in runs if r["variant"] == v], axis=0)
        ax.plot(pos, color=colors[v], lw=1, label=LABELS.get(v, v))
    ax.set_xlabel("position along zigzag path 0", fontsize=8)
    ax.set_title("held-out FM loss per path position (mean of seeds)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def report(args, runs, grids, command, t_start, train_seconds) -> dict:
    pairs = {}
    for b in ("zigma1_arcee", "sweep2"):
        if "zigma1" in args.variants and b in args.variants:
            pairs[f"{LABELS[b]} - Zigma-1"] = {k: paired([{"variant": r["variant"], "seed": r["seed"], **flat(r)}
                                                          for r in runs], "zigma1", b, k) for k in KEYS}
    result = {"command": command, "machine": repro.machine_info(),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "summary": summarize(runs, args.variants), "paired": pairs,
              "gap_closed": {k: gap_closed(runs, k) for k in ("heldout_loss", "q1", "q2")},
              "runs": runs, "train_seconds": train_seconds, "seconds": time.perf_counter() - t_start,
              "cpu_seconds": cpu_seconds(), "nice": os.getpriority(os.PRIO_PROCESS, 0), "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    args.docs.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.docs / "results.json", json.dumps(result, indent=1).encode())
    atomic_write_bytes(args.docs / "results.md", markdown(result).encode())
    plot(result, args.docs / "results.png")
    if grids:
        repro.plot_samples({LABELS.get(v, v): grids[v] for v in args.variants if v in grids}, args.docs / "samples.png")
    return result


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report_only:
        path = args.docs / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"--report-only: {path} does not exist (run the experiment first)")
        result = json.loads(path.read_text())
        atomic_write_bytes(args.docs / "results.md", markdown(result).encode())
        plot(result, args.docs / "results.png")
        return result
    command = shlex.join(["python", "scripts/mirror_repro.py", *(sys.argv[1:] if argv is None else argv)])
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), HYDRA_FULL_ERROR="1")
    cfg = repro.compose(repro.train_overrides(args, args.variants[0], args.seeds[0], args.out))  # fail fast
    for v in args.variants[1:]:
        repro.compose(repro.train_overrides(args, v, args.seeds[0], args.out))
    log(f"{len(args.variants) * len(args.seeds)} runs ({', '.join(args.variants)} x seeds {args.seeds}), "
        f"{args.steps} steps x batch {args.batch_size}, checkpoint every {args.ckpt_every}; runs under {args.out}")
    if args.train_only:
        train_seconds = train_all(args, env)
        log(f"trained in {train_seconds / 60:.1f} min (--train-only: no evaluation)")
        return {"train_seconds": train_seconds}

    from arcee.data import build_dataset
    from arcee.models.scan_orders import get_scan_orders

    val = build_dataset(cfg.data, split="val")
    x_val = torch.stack([val[i][0] for i in range(len(val))])
    grid = (cfg.data.image_size // cfg.model.patch_size,) * 2
    path = get_scan_orders("zigzag", *grid)[0]  # Zigma-1's path: the one every model is read along
    evaluated, grids, lock = {}, {}, threading.Lock()

    def evaluate(job):
        v, s, run_dir = job
        r = evaluate_run(run_dir, x_val, args, path)
        g = r.pop("grid")
        with lock:
            if s == args.seeds[0]:
                grids[v] = g
            evaluated[(v, s)] = {"variant": v, "seed": s, **r}
            log(f"[eval] {v} seed {s}: held-out {r['heldout_loss']:.4f}, quarters "
                + ", ".join(f"{q:.4f}" for q in r["quarter_loss"]) + f", anticausal {r['anticausal_ratio']:.3g}, "
                f"mirror RMS {r['mirror']['rms']:.3f} ({r['eval_seconds']:.0f} s)")
            runs = [evaluated[(v, s)] for v, s, _ in run_jobs(args) if (v, s) in evaluated]
            report(args, runs, grids, command, t_start, time.perf_counter() - t_start)  # incremental

    train_seconds = train_all(args, env, then=evaluate)
    runs = [evaluated[(v, s)] for v, s, _ in run_jobs(args)]
    result = report(args, runs, grids, command, t_start, train_seconds)
    log(f"done in {result['seconds'] / 60:.1f} min: {args.docs / 'results.md'}")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
