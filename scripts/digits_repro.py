"""Small-scale CPU reproduction of the paper's headline: Zigma-1 vs Zigma-1 + Arcee (and Zigma-2).

    python scripts/digits_repro.py                       # the full run (defaults below; ~35 min on 2 cores)
    python scripts/digits_repro.py --steps 5 --seeds 0 --variants zigma1,zigma1_arcee --num-samples 16

The recipe, on the embedded 16x16 digits (1,617 train / 180 val images):
1. train a small CNN digits classifier on the train split (cached; arcee/metrics/digits_classifier.py);
2. train every variant x seed with `python train.py experiment=digits_<variant> seed=<s> ...`
   (same steps, batch and seeds for every variant), run folders under `--out`;
3. for each run's EMA weights (`ema_final.safetensors`): the held-out flow-matching loss on the
   val split with one fixed set of (t, noise) draws shared by all runs, and FD / KID of
   `--num-samples` samples (same noise for every run) against all 1,797 digits in the
   classifier's 64-d penultimate feature space (clean-fid via arcee.metrics);
4. write results.md / results.json / results.png / samples.png into `--docs` with the command,
   the machine and the timings.
Runs that already finished (`ema_final.safetensors` at the requested step) are not retrained:
rerunning the same command redoes only the evaluation.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from arcee.io import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
VARIANT_LABELS = {"zigma1": "Zigma-1", "zigma1_arcee": "Zigma-1 + Arcee", "zigma2": "Zigma-2",
                  "zigma2_arcee": "Zigma-2 + Arcee", "zigma4": "Zigma-4", "zigma4_arcee": "Zigma-4 + Arcee"}
LOSS_SEED = 1234     # the generator of the held-out (t, noise) draws: the same for every run
SAMPLE_SEED = 0      # sample i of every run starts from the same noise (arcee.sample.index_generator)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default="zigma1,zigma1_arcee,zigma2",
                   help="comma-separated; each trains configs/experiment/digits_<variant>.yaml")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds, the same for every variant")
    p.add_argument("--steps", type=int, default=250, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=32, help="global training batch")
    p.add_argument("--num-samples", type=int, default=400, help="generated images per run for FD / KID")
    p.add_argument("--sampler", default="heun", help="euler | heun | dopri5 (evaluation samples)")
    p.add_argument("--sample-steps", type=int, default=6, help="euler / heun steps (heun: 2 * steps - 1 NFE)")
    p.add_argument("--loss-repeats", type=int, default=4, help="(t, noise) draws per val image for the held-out loss")
    p.add_argument("--classifier-epochs", type=int, default=10)
    p.add_argument("--out", default="runs/digits_repro", help="run folders: <out>/<variant>/seed<s>")
    p.add_argument("--docs", default="docs/reproduction", help="where the table, plot and samples go")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time (each with --threads threads)")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite results.md / results.png from <docs>/results.json (no training, no sampling)")
    p.add_argument("--train-overrides", default="", help="extra Hydra overrides for every run (space-separated), "
                   "e.g. 'model.d_state=8 optim.lr=5e-4'")
    a = p.parse_args(argv)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    try:
        a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {a.seeds!r}")
    for v in a.variants:
        if not (ROOT / "configs" / "experiment" / f"digits_{v}.yaml").is_file():
            have = sorted(f.stem[len("digits_"):] for f in (ROOT / "configs" / "experiment").glob("digits_*.yaml"))
            p.error(f"--variants: no configs/experiment/digits_{v}.yaml (available: {', '.join(have)})")
    if not a.variants or not a.seeds:
        p.error("--variants and --seeds must name at least one each")
    for key in ("steps", "batch_size", "sample_steps", "loss_repeats", "classifier_epochs", "threads", "jobs"):
        if getattr(a, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(a, key)}")
    if a.num_samples < 2:
        p.error(f"--num-samples must be >= 2 (FD / KID), got {a.num_samples}")
    a.out, a.docs = Path(a.out).absolute(), Path(a.docs).absolute()
    return a


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


# ----------------------------------------------------------------------------- configs and training


def train_overrides(args, variant: str, seed: int, run_dir: Path) -> list[str]:
    prefix = getattr(args, "experiment_prefix", "digits_")  # scripts/mirror_repro.py: "mirror_"
    return [f"experiment={prefix}{variant}", f"seed={seed}", f"train.max_steps={args.steps}",
            f"train.batch_size={args.batch_size}", "train.log_every=10", "train.sample_every=0",
            "train.ckpt_every=0", "logger=disabled", f"hydra.run.dir={run_dir}", *args.train_overrides.split()]


def compose(overrides: list[str]):
    """The training config exactly as `python train.py <overrides>` composes it (validated, no side effects)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import arcee.train  # noqa: F401  (registers the config schema)

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("config", overrides=[o for o in overrides if not o.startswith("hydra.")])


def finished(run_dir: Path, steps: int) -> bool:
    from arcee.sample import read_step

    export = run_dir / "ema_final.safetensors"
    return export.is_file() and read_step(export) == steps


def train_one(args, variant: str, seed: int, run_dir: Path, env: dict) -> float:
    """Train one run through train.py; returns the wall seconds (0 when it was already done)."""
    if finished(run_dir, args.steps):
        return 0.0
    if run_dir.is_dir() and not any((run_dir / "checkpoints").glob("step_*")):
        shutil.rmtree(run_dir)  # our own interrupted run with nothing to resume from
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "train.py"), *train_overrides(args, variant, seed, run_dir)]
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "w") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not finished(run_dir, args.steps):
        tail = "".join((run_dir / "train.log").read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"training {variant} seed {seed} failed (exit code {rc}); log {run_dir / 'train.log'}:\n{tail}")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- evaluation


def heldout_draws(shape, repeats: int, seed: int = LOSS_SEED) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`repeats` fixed (t: (n,), x0: shape) draws for the held-out loss; the same for every run."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(shape[0], generator=g), torch.randn(shape, generator=g)) for _ in range(repeats)]


@torch.no_grad()
def heldout_loss(model, transport, x1: torch.Tensor, draws, batch_size: int = 256) -> float:
    """Mean velocity MSE of `model` over the val images x1 and the fixed draws (transport.training_loss)."""
    total, count = 0.0, 0
    for t, x0 in draws:
        for i in range(0, len(x1), batch_size):
            sl = slice(i, i + batch_size)
            total += float(transport.training_loss(model, x1[sl], x0=x0[sl], t=t[sl]).double().sum())
            count += len(x1[sl])
    return total / count


def evaluate_run(run_dir: Path, evaluator, x_val, draws, args, keep: int = 16) -> dict:
    """Held-out loss, FD / KID (Evaluator.model: in-memory samples 0..n-1) and the first `keep` samples."""
    from arcee.flow import build_transport
    from arcee.sample import ImageSampler, load_generator, read_step
    from arcee.train import read_metrics

    t0 = time.perf_counter()
    model, cfg = load_generator(run_dir / "ema_final.safetensors", use_ema=True)
    loss = heldout_loss(model, build_transport(cfg.flow), x_val, draws)
    solver = {"sampler": args.sampler, "steps": args.sample_steps}
    scores = evaluator.model(model, cfg, args.num_samples, seed=SAMPLE_SEED, **solver)
    images, _ = ImageSampler(model, cfg, seed=SAMPLE_SEED, **solver)(list(range(keep)))  # the same first samples
    curve = [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]
    return {"heldout_loss": loss, "fd": scores["fid"], "kid": scores["kid"], "nfe_per_image": scores["nfe_per_image"],
            "step": read_step(run_dir / "ema_final.safetensors"), "final_train_loss": curve[-1][1] if curve else None,
            "curve": curve, "eval_seconds": time.perf_counter() - t0, "grid": images}


def real_floor(evaluator, n: int, seed: int = 0) -> dict:
    """FD / KID of `n` real digits drawn from the reference itself: the score of a perfect model at this n."""
    from arcee.metrics import fid_from_feats, kid_from_feats

    ref = evaluator.reference
    idx = np.random.default_rng(seed).choice(len(ref.feats), size=min(n, len(ref.feats)), replace=False)
    return {"n": len(idx), "fd": fid_from_feats(ref.feats[idx], ref), "kid": kid_from_feats(ref.feats[idx], ref.feats)}


# ----------------------------------------------------------------------------- reporting


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "git_commit": commit,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}



def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def summarize(runs: list[dict], variants: list[str]) -> dict:
    out = {}
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        out[v] = {k: dict(zip(("mean", "std"), mean_std([r[k] for r in rs])), per_seed=[r[k] for r in rs])
                  for k in ("heldout_loss", "fd", "kid")}
    return out


def paired(runs: list[dict], a: str, b: str, key: str) -> list[float]:
    """Per-seed differences b - a (same seed: same initial weights and data order when the variants
    have the same parameters, e.g. Zigma-1 and Zigma-1 + Arcee)."""
    by = {(r["variant"], r["seed"]): r[key] for r in runs}
    return [by[(b, s)] - by[(a, s)] for (v, s) in by if v == a and (b, s) in by]


def _fmt(m: dict, scale: float = 1.0, digits: int = 4) -> str:
    mean, std = m["mean"] * scale, m["std"] * scale
    seeds = ", ".join(f"{x * scale:.{digits}g}" for x in m["per_seed"])
    pm = f" ± {std:.{max(1, digits - 1)}g}" if math.isfinite(std) else ""
    return f"{mean:.{digits}g}{pm} ({seeds})"


def markdown(result: dict) -> str:
    a, s, m = result["args"], result["summary"], result["machine"]
    lines = [
        "# Digits reproduction: results",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} logical CPUs, {a['threads']} torch thread(s) per process, "
        f"{a['jobs']} run(s) at a time), {m['platform']}, Python {m['python']}, torch {m['torch']}, "
        f"git {m['git_commit']}, {m['date']}. Wall time {result['seconds'] / 60:.1f} min "
        f"(training {result['train_seconds'] / 60:.1f} min).",
        "",
        f"Setup: embedded digits 16x16x1 (train 1,617 / val 180), ZigMa-XS (configs/experiment/digits_*.yaml), "
        f"{a['steps']} steps x batch {a['batch_size']}, seeds {a['seeds']} for every variant; EMA weights. "
        f"Held-out loss: velocity MSE on the 180 val images x {a['loss_repeats']} fixed (t, noise) draws. "
        f"FD / KID: {a['num_samples']} samples ({a['sampler']}, {result['nfe_per_image']:.0f} NFE, same noise "
        f"for every run) vs all 1,797 digits, in the 64-d penultimate features of a CNN digits classifier "
        f"(val accuracy {result['classifier']['val_accuracy']:.3f}; features scaled to unit mean variance on the "
        f"training digits, so FD / KID are in units of that variance, not comparable to Inception FIDs).",
        "",
        "Mean ± std over seeds (per-seed values in parentheses); lower is better.",
        "",
        "| variant | held-out FM loss | FD (classifier features) | KID (classifier features) |",
        "|---|---|---|---|",
    ]
    for v in a["variants"]:
        lines.append(f"| {VARIANT_LABELS.get(v, v)} | {_fmt(s[v]['heldout_loss'])} | {_fmt(s[v]['fd'], digits=3)} | "
                     f"{_fmt(s[v]['kid'], digits=3)} |")
    f = result["real_floor"]
    lines.append(f"| real digits (n={f['n']}, from the reference) | - | {f['fd']:.3g} | {f['kid']:.3g} |")
    if result["paired"]:
        lines += ["", "Paired per-seed differences (same seed = same initial weights and data order):", ""]
        for name, d in result["paired"].items():
            lines.append(f"- {name}: " + ", ".join(f"{k} " + ", ".join(f"{x:+.4g}" for x in vals)
                                                    for k, vals in d.items()))
    lines += ["", "Plot: `results.png`; samples of seed " + str(a["seeds"][0]) + ": `samples.png`.", ""]
    return "\n".join(lines)


def plot(result: dict, runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = result["args"]["variants"]
    colors = {v: f"C{i}" for i, v in enumerate(variants)}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=120)
    for ax, key, title in ((axes[0], "heldout_loss", "held-out FM loss (EMA weights)"),
                           (axes[1], "fd", "FD in classifier features")):
        for i, v in enumerate(variants):
            vals = [r[key] for r in runs if r["variant"] == v]
            mean, std = mean_std(vals)
            ax.errorbar(i + 0.18, mean, yerr=std if math.isfinite(std) else None, fmt="_", ms=14, color=colors[v],
                        capsize=3)
            ax.scatter(i + np.linspace(-0.15, 0.05, len(vals)), vals, color=colors[v], zorder=3, s=16)
        if key == "fd":
            ax.axhline(result["real_floor"]["fd"], color="k", ls=":", lw=1,
                       label=f"{result['real_floor']['n']} real digits")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(variants)), [VARIANT_LABELS.get(v, v) for v in variants], fontsize=8)
        ax.set_xlim(-0.5, len(variants) - 0.5)
        ax.set_title(title + " (dots: seeds; bar: mean ± std)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[2]
    for r in runs:
        steps, losses = zip(*r["curve"]) if r["curve"] else ((), ())
        first = r["seed"] == result["args"]["seeds"][0]
        ax.plot(steps, losses, color=colors[r["variant"]], lw=1, alpha=0.8,
                label=VARIANT_LABELS.get(r["variant"], r["variant"]) if first else None)
    ax.set_xlabel("step", fontsize=8)
    ax.set_title("training loss (mean of each 10 steps), every seed", fontsize=9)
    low = min((loss for r in runs for _, loss in r["curve"]), default=None)
    if low is not None and low > 0:  # the first records (loss ~2) would flatten the rest
        ax.set_ylim(0.95 * low, min(ax.get_ylim()[1], 3 * low))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_samples(grids: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from arcee.sample import make_grid

    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 2.9), dpi=120, squeeze=False)
    for ax, (v, images) in zip(axes[0], grids.items()):
        ax.imshow(make_grid(images, nrow=4)[..., 0], cmap="gray", vmin=0, vmax=255)
        ax.set_title(VARIANT_LABELS.get(v, v), fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report_only:
        path = args.docs / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"--report-only: {path} does not exist (run the reproduction first)")
        result = json.loads(path.read_text())
        atomic_write_bytes(args.docs / "results.md", markdown(result).encode())
        plot(result, result["runs"], args.docs / "results.png")
        log(f"rewrote {args.docs / 'results.md'} and results.png from {path}")
        return result
    command = shlex.join(["python", "scripts/digits_repro.py", *(sys.argv[1:] if argv is None else argv)])
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HYDRA_FULL_ERROR="1")
    jobs = [(v, s, args.out / v / f"seed{s}") for v in args.variants for s in args.seeds]
    cfgs = {v: compose(train_overrides(args, v, args.seeds[0], args.out)) for v in args.variants}  # fail fast
    data_cfg = cfgs[args.variants[0]].data
    log(f"{len(jobs)} runs ({', '.join(args.variants)} x seeds {args.seeds}), {args.steps} steps x batch "
        f"{args.batch_size}; run folders under {args.out}")

    # 1. the classifier and the FD reference
    from arcee.data import build_dataset, ensure_real_samples
    from arcee.metrics import Evaluator, build_feature_extractor
    from arcee.metrics.digits_classifier import DigitsFeatures, train_digits_classifier

    clf = train_digits_classifier(data_cfg, epochs=args.classifier_epochs)
    log(f"classifier val accuracy {clf.val_accuracy:.4f} ({clf.cache_path})")
    extractor = build_feature_extractor(DigitsFeatures(clf), device="cpu", resize=False)
    evaluator = Evaluator(ensure_real_samples(data_cfg), feature_extractor=extractor, device="cpu", kid=True,
                          verbose=False)
    floor = real_floor(evaluator, args.num_samples)
    val = build_dataset(data_cfg, split="val")
    x_val = torch.stack([val[i][0] for i in range(len(val))])
    draws = heldout_draws(tuple(x_val.shape), args.loss_repeats)

    # 2. training
    t_train = time.perf_counter()
    done = 0

    def train(job):
        nonlocal done
        v, s, run_dir = job
        sec = train_one(args, v, s, run_dir, env)
        done += 1
        note = "already trained" if sec == 0 else f"trained in {sec:.0f} s"
        log(f"[{done}/{len(jobs)}] {v} seed {s}: {note} ({run_dir})")
        return sec

    log("training (progress: one line per finished run; per-step logs in <run>/train.log)")
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(train, jobs))
    train_seconds = time.perf_counter() - t_train

    # 3. evaluation
    runs, grids = [], {}
    for k, (v, s, run_dir) in enumerate(jobs):
        r = evaluate_run(run_dir, evaluator, x_val, draws, args)
        grid = r.pop("grid")
        if s == args.seeds[0]:
            grids[v] = grid
        runs.append(dict(variant=v, seed=s, run_dir=str(run_dir), **r))
        log(f"[eval {k + 1}/{len(jobs)}] {v} seed {s}: held-out loss {r['heldout_loss']:.4f}, FD {r['fd']:.3f}, "
            f"KID {r['kid'] * 1e3:.2f}e-3 ({r['eval_seconds']:.0f} s)")

    # 4. report
    pairs = {}
    for a, b in (("zigma1", "zigma1_arcee"), ("zigma1", "zigma2")):
        if a in args.variants and b in args.variants:
            pairs[f"{VARIANT_LABELS[b]} - {VARIANT_LABELS[a]}"] = {
                k: paired(runs, a, b, k) for k in ("heldout_loss", "fd")}
    result = {
        "command": command, "machine": machine_info(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "classifier": {"val_accuracy": clf.val_accuracy, "path": str(clf.cache_path),
                       "epochs": args.classifier_epochs},
        "nfe_per_image": runs[0]["nfe_per_image"], "real_floor": floor, "summary": summarize(runs, args.variants),
        "paired": pairs, "runs": runs, "train_seconds": train_seconds,
        "seconds": time.perf_counter() - t_start,
    }
    args.docs.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.docs / "results.json", json.dumps(result, indent=2).encode())
    atomic_write_bytes(args.docs / "results.md", markdown(result).encode())
    plot(result, runs, args.docs / "results.png")
    plot_samples(grids, args.docs / "samples.png")
    log(f"done in {result['seconds'] / 60:.1f} min: {args.docs / 'results.md'}")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
