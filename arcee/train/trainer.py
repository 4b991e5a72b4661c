"""The training loop: a composed Hydra config -> accelerate -> checkpoints, metrics, grids, EMA export.

    from arcee.train import run
    summary = run(cfg, run_dir)        # cfg composed from configs/config.yaml

`run` first validates everything (config, data, model, checkpoint to resume) and only then
writes to the run folder or takes a step. One optimizer step = `train.grad_accum` micro-batches
per process over a GLOBAL batch of `train.batch_size`; gradients are clipped before the step;
the EMA is updated after every step on the raw (unwrapped) model. The hot loop keeps the loss
and grad norm on the device; the host reads them only at log/checkpoint steps.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import signal
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, gather_object
from omegaconf import OmegaConf, open_dict
from torch.utils.data import DataLoader
from tqdm import tqdm

from arcee.data import build_dataset, load_vae
from arcee.flow import SAMPLERS, build_transport
from arcee.models import build_model

from .checkpoint import (clean_stale, ckpt_name, list_checkpoints, load_arcee_state, lock_run_dir, newest_intact,
                         prune, save_checkpoint, unlock_run_dir)
from .ema import EMA
from .logger import METRICS, WANDB_ID, RunLogger, plot_loss_curve
from .sampler import ResumableBatchSampler, SeededSamples
from .schema import check_config

log = logging.getLogger("arcee.train")
logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file save/load INFO lines

ARTIFACTS = ("metrics.jsonl", "checkpoints", "samples", "ema_final.safetensors")
EXPORT = "ema_final.safetensors"


def lr_at(step: int, optim_cfg, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    o = optim_cfg
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if str(o.schedule.value if hasattr(o.schedule, "value") else o.schedule) == "constant":
        return o.lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.AdamW:
    """AdamW; weight decay (if any) on matrices only, as in nanoGPT."""
    o = optim_cfg
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = {"fused": True} if params and params[0].is_cuda else {}
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **fused)


def run(cfg, run_dir=None) -> dict:
    """Train from a composed config. Returns a summary dict (step, run_dir, last record, ...).

    run_dir: the run folder (default: Hydra's `hydra.runtime.output_dir`).
    Raises before any step on bad input (ValueError / FileNotFoundError / FileExistsError)
    and FloatingPointError when the loss or grad norm turns non-finite.
    """
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    AcceleratorState._reset_state()  # a fresh mixed-precision setting per run (tests, -m sweeps)
    mp = _enum(cfg.train.mixed_precision)
    # no CUDA: cpu=True makes `accelerate launch --multi_gpu` processes form a gloo group (MULTI_CPU)
    accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    world, main, device = accelerator.num_processes, accelerator.is_main_process, accelerator.device
    run_dir = _agree_run_dir(accelerator, Path(run_dir).absolute())
    tc = cfg.train

    # ---------------------------------------------------------------- validate, before any write
    check_config(cfg, world)
    vae, cfg = _latent_view(cfg, device)  # model-facing config (latent shapes when encode_latents)
    transport = build_transport(cfg.flow)
    _check_late_keys(cfg)
    dataset = build_dataset(cfg.data if vae is None else cfg.train_data, split="train")
    _seed_everything(cfg.seed)  # identical init on every rank
    model = build_model(cfg.model)
    _check_shapes(cfg, dataset, vae)
    evaluator = _evaluator(cfg, device) if tc.fid_every else None  # extractor and reference folder, now
    accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- the run folder: lock, resume, restart
    lock = lock_run_dir(accelerator, run_dir)  # one writer per run folder, for the life of the run
    try:
        resume_from, state = _pick_resume(accelerator, str(tc.resume), run_dir)
        if state is not None:
            _check_compatible(cfg, resume_from)
        restart = _check_run_dir(run_dir, resume_from, str(tc.resume))
        accelerator.wait_for_everyone()  # every rank has checked before the main process writes
        ckpt_dir = run_dir / "checkpoints"
        if main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "samples").mkdir(exist_ok=True)
            for p in clean_stale(ckpt_dir):
                log.warning("removed the leftover of an interrupted checkpoint write: %s", p)
            restart = _set_aside_attempt(run_dir) if restart else None
        accelerator.wait_for_everyone()
        if device.type == "cuda":  # the paper trains in fp32 with TF32 matmuls
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        logger = RunLogger(run_dir, cfg, enabled=main)
        stopper = _StopFlag(world)
        try:
            return _train(cfg, accelerator, run_dir, ckpt_dir, transport, dataset, model, vae, state, resume_from,
                          logger, stopper, evaluator=evaluator, restarted=restart)
        except BaseException:
            logger.close(exit_code=1)
            raise
        finally:
            stopper.restore()
    finally:
        unlock_run_dir(lock)


def _train(cfg, accelerator, run_dir, ckpt_dir, transport, dataset, model, vae, state, resume_from, logger,
           stopper, evaluator=None, restarted=None) -> dict:
    tc = cfg.train
    rank, world, main, device = (accelerator.process_index, accelerator.num_processes,
                                 accelerator.is_main_process, accelerator.device)

    # ---------------------------------------------------------------- model, optimizer, EMA, resume
    ema = EMA(model, tc.ema_decay, tc.ema_warmup)
    optimizer = make_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    ema.to(device)
    step, cursor, rng_note = 0, 0, "seeded"
    if state is not None:
        accelerator.load_state(str(resume_from))
        ema.load_state_dict(state["ema"])
        step, cursor = int(state["step"]), int(state["cursor"])
        if state["world_size"] == world:
            _set_rng(state["rng"][rank])
            rng_note = "restored"
        else:  # no RNG stream of this rank was saved: reseed deterministically
            _seed_everything(_derive_seed(cfg.seed, step, rank))
            rng_note = f"reseeded from (seed, step, rank): checkpoint had {state['world_size']} processes, now {world}"
    else:
        _seed_everything(_derive_seed(cfg.seed, 0, rank))
    fwd = torch.compile(model) if tc.compile else model

    # ---------------------------------------------------------------- data
    # every random draw of a sample (flip, latent posterior, x0, t, VAE posterior) is a function of
    # (seed, its stream position): the same whatever the number of processes
    sampler = ResumableBatchSampler(len(dataset), tc.batch_size, tc.grad_accum, rank, world, cfg.seed, cursor,
                                    positions=True)
    latent_shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size) if vae is not None else None
    samples = SeededSamples(dataset, cfg.seed, transport.sample_time, latent_shape, vae_eps=vae is not None)
    workers = int(cfg.data.get("num_workers", 0) or 0)
    loader = DataLoader(samples, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(_derive_seed(cfg.seed, cursor, rank)))
    batches = iter(loader)  # the loader has its own generator: the global RNG stream stays untouched
    conditional = int(cfg.data.get("num_classes", 0) or 0) > 0
    latent_scale = float(cfg.data.get("latent_scale", 1.0) or 1.0)

    hosts = gather_object([(rank, world, socket.gethostname(), str(device))])
    log.info("rank %d/%d on %s (%s)", rank, world, socket.gethostname(), device)
    if main:
        log.info("run folder: %s", _shown(run_dir))
    start = {"event": "resume" if state is not None else "start", "world_size": world, "ranks": hosts,
             "mixed_precision": _enum(tc.mixed_precision),
             "per_process_batch": tc.batch_size // (world * tc.grad_accum), "cursor": cursor,
             "params": sum(p.numel() for p in raw_model.parameters()), "dataset_size": len(dataset)}
    if state is not None:
        start.update(checkpoint=str(resume_from), rng=rng_note)
        log.info("resumed from %s at step %d (data cursor %d); RNG %s", resume_from, step, cursor, rng_note)
    if restarted:
        start["restarted"] = restarted  # the earlier attempt's metrics file (it ended before a checkpoint)
    logger.log(start, step=step)

    # ---------------------------------------------------------------- the loop
    def checkpoint():
        rngs = gather_object([_get_rng()])
        arcee_state = {"step": step, "cursor": cursor, "ema": ema.state_dict(), "rng": rngs, "world_size": world,
                       "seed": cfg.seed, "config": OmegaConf.to_yaml(cfg, resolve=True)}
        path = save_checkpoint(accelerator, ckpt_dir, step, arcee_state, cfg, ema.state_dict())
        if main:
            for p in prune(ckpt_dir, tc.keep_last, tc.milestone_every):
                log.info("deleted old checkpoint %s", p)
        logger.log({"event": "checkpoint", "path": str(path.relative_to(run_dir))}, step=step)
        if main:
            plot_loss_curve(run_dir)  # <run>/loss.png from metrics.jsonl
        return path

    loss_acc = torch.zeros((), device=device)
    gnorm_acc = torch.zeros((), device=device)
    last_sync, t_sync, record = step, time.perf_counter(), {}
    last_ckpt = resume_from if state is not None else None
    clip = tc.grad_clip if tc.grad_clip > 0 else math.inf  # inf: the norm is measured, grads scaled by 1
    check_gnorm = _enum(tc.mixed_precision) != "fp16"  # fp16: inf norms are the grad scaler's business
    bar = tqdm(total=tc.max_steps, initial=step, disable=not main, desc=cfg.name, dynamic_ncols=True)
    stopped = False
    while step < tc.max_steps:
        for micro in range(tc.grad_accum):
            x, y, draws = next(batches)
            x = x.to(device, non_blocking=True)
            if vae is not None:  # a posterior sample with this sample's own eps
                with torch.no_grad():
                    dist = vae.encode(x).latent_dist
                    x = (dist.mean + dist.std * draws["eps"].to(device, dist.mean.dtype, non_blocking=True)) \
                        * latent_scale
            x0 = draws["x0"].to(device, x.dtype, non_blocking=True)
            kwargs = {"y": y.to(device, non_blocking=True)} if conditional else {}
            sync = micro == tc.grad_accum - 1  # all-reduce gradients on the last micro-batch only
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss = transport.training_loss(fwd, x, kwargs, x0=x0, t=draws["t"]).mean()
                accelerator.backward(loss / tc.grad_accum)
            loss_acc += loss.detach()
        gnorm_acc += accelerator.clip_grad_norm_(model.parameters(), clip)  # clip BEFORE the step
        lr = lr_at(step, cfg.optim, tc.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        cursor += tc.batch_size
        ema.update(raw_model, step)
        bar.update()

        stopped = stopper.requested()  # agreed by all ranks
        last = step == tc.max_steps
        grid_now = tc.sample_every and (step % tc.sample_every == 0 or last)
        fid_now = tc.fid_every and (step % tc.fid_every == 0 or last)
        ckpt_now = last or stopped or (tc.ckpt_every and step % tc.ckpt_every == 0)
        if step % tc.log_every == 0 or ckpt_now or grid_now or fid_now:  # the host reads the device accumulators
            n = step - last_sync
            mean = torch.stack([loss_acc / (n * tc.grad_accum), gnorm_acc / n])
            loss_v, gnorm_v = accelerator.reduce(mean, "mean").tolist()
            if not math.isfinite(loss_v) or (check_gnorm and not math.isfinite(gnorm_v)):
                raise FloatingPointError(
                    f"non-finite {'loss' if not math.isfinite(loss_v) else 'gradient norm'} (loss {loss_v}, "
                    f"grad norm {gnorm_v}) between steps {last_sync + 1} and {step}: training stopped, nothing "
                    f"saved. Last good checkpoint: {last_ckpt or 'none'}. Resume from it (train.resume=auto) "
                    "with e.g. a lower optim.lr or train.grad_clip, or bf16 instead of fp16.")
            dt = time.perf_counter() - t_sync
            ips = n * tc.batch_size / dt
            record = {"loss": loss_v, "grad_norm": gnorm_v, "lr": lr, "epoch": cursor / len(dataset),
                      "images_per_s": ips, "images_per_s_per_process": ips / world, "sec_per_step": dt / n}
            if device.type == "cuda":
                record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            logger.log(record, step=step)
            bar.set_postfix(loss=f"{loss_v:.4f}", gnorm=f"{gnorm_v:.3f}", img_s=f"{ips:.0f}")
            loss_acc.zero_()
            gnorm_acc.zero_()
            last_sync = step
            if grid_now:
                _sample_grid(cfg, ema, transport, vae, run_dir, step, logger, accelerator)
            if fid_now:
                evaluator = evaluator or _evaluator(cfg, device)
                _log_fid(cfg, evaluator, ema, vae, step, logger, accelerator)
            if ckpt_now:
                last_ckpt = checkpoint()
            t_sync = time.perf_counter()  # throughput excludes logging, grids and checkpoints
        if stopped:
            break
    bar.close()

    # ---------------------------------------------------------------- end: export, agreement check
    preempted = stopped and step < tc.max_steps
    if preempted:
        logger.log({"event": "preempted", "checkpoint": str(last_ckpt)}, step=step)
        log.warning("stop signal: saved %s at step %d; resume with train.resume=auto", last_ckpt, step)
    elif main:  # the EMA of the last step (a resumed run with a larger max_steps replaces it)
        from arcee.sample import save_generator

        save_generator(run_dir / EXPORT, ema.state_dict(), cfg, step)
        if tc.digits_check and cfg.data.get("name") == "digits" and vae is None:
            _digits_check(cfg, ema, step, logger)
        elif tc.digits_check:
            log.info("train.digits_check: skipped (the digits classifier scores data=digits in pixel space only)")
    fingerprints = gather_object([_fingerprint(raw_model)])  # ranks must hold the same weights
    logger.log({"event": "done", "preempted": preempted, "world_size": world, "weights_sha256": fingerprints,
                "export": None if preempted else EXPORT}, step=step)
    logger.close()
    if main and not preempted:
        _say_next(cfg, run_dir)
    return {"step": step, "run_dir": str(run_dir), "checkpoint": str(last_ckpt) if last_ckpt else None,
            "preempted": preempted, "last": record, "world_size": world, "weights_sha256": fingerprints}


# ---------------------------------------------------------------------------- helpers


def _enum(v) -> str:
    return str(v.value if hasattr(v, "value") else v)


def _derive_seed(seed: int, step: int, rank: int) -> int:
    """A 32-bit seed that is a pure function of (seed, step, rank)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also every CUDA device


def _get_rng() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, bytes): ranks must agree."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _agree_run_dir(accelerator, run_dir: Path) -> Path:
    """Every rank uses the main process's run folder (Hydra's ${now:} may differ by a second)."""
    if accelerator.num_processes == 1:
        return run_dir
    agreed = Path(broadcast_object_list([str(run_dir)])[0])
    if agreed != run_dir and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()  # this rank's own (empty) Hydra folder
    return agreed


def _pick_resume(accelerator, resume: str, run_dir: Path) -> tuple[Path | None, dict | None]:
    """train.resume -> (checkpoint folder, its state), or (None, None) for a start from step 0.

    The main process verifies every file of the checkpoint against its hashes; with `auto` (or this
    run's own folder) damaged newer checkpoints are skipped and moved aside (under the run lock).
    The other ranks load the state of the checkpoint it chose.
    """
    picked = {}

    def pick():
        if resume == "none":
            return None
        p = run_dir if resume == "auto" else Path(resume).expanduser().absolute()
        if resume == "auto" or (p / "checkpoints").is_dir():  # a run folder: its newest intact checkpoint
            own = p == run_dir
            folder, picked["state"] = newest_intact(p / "checkpoints", move_damaged=own and accelerator.is_main_process)
            if folder is None and not own:
                raise FileNotFoundError(f"train.resume={resume!r}: run folder has no intact checkpoint")
            return folder
        picked["state"] = load_arcee_state(p, verify=True)  # an explicit checkpoint: damaged is an error
        return p

    folder = _main_then_broadcast(accelerator, pick)
    if folder is None:
        return None, None
    return folder, picked.get("state") or load_arcee_state(folder)


def _main_then_broadcast(accelerator, fn):
    """fn() on the main process only; every rank returns its result or raises its exception."""
    out = None
    if accelerator.is_main_process:
        try:
            out = (True, fn())
        except Exception as e:  # noqa: BLE001 -- re-raised on every rank
            out = (False, e)
    if accelerator.num_processes > 1:
        out = broadcast_object_list([out])[0]
    if not out[0]:
        raise out[1]
    return out[1]


def _check_run_dir(run_dir: Path, resume_from: Path | None, resume: str) -> bool:
    """Never overwrite: a run folder with outputs is only reused to resume from its own checkpoint.

    Returns True when `resume=auto` finds outputs but no intact checkpoint and no final export: an
    attempt that ended before its first checkpoint, which starts again from step 0.
    """
    own = resume_from is not None and resume_from.parent == run_dir / "checkpoints"
    found = [a for a in ARTIFACTS if (run_dir / a).exists() and not (a in ("checkpoints", "samples") and
                                                                     (run_dir / a).is_dir() and
                                                                     not any((run_dir / a).iterdir()))]
    if own:
        newer = [p.name for s, p in list_checkpoints(run_dir / "checkpoints") if p.name > resume_from.name]
        if newer:
            raise FileExistsError(
                f"train.resume={resume_from} is not the latest checkpoint of its run folder (newer: {newer}); "
                "continuing from it would overwrite them. Copy it into a new run folder and resume from there.")
    if found and not own:
        if resume == "auto" and resume_from is None and EXPORT not in found:
            return True
        if resume == "auto" and resume_from is None:
            raise FileExistsError(
                f"run folder {run_dir} holds a finished run ({EXPORT}) but no intact checkpoint to continue; "
                "refusing to overwrite it. Use a new hydra.run.dir.")
        raise FileExistsError(
            f"run folder {run_dir} already holds {found} and train.resume={resume} does not continue one of "
            f"its checkpoints; refusing to overwrite. Use a new hydra.run.dir, or "
            f"train.resume=auto to continue it (needs a complete checkpoint in {run_dir / 'checkpoints'}).")
    return False


def _set_aside_attempt(run_dir: Path) -> str | None:
    """Rename an attempt's metrics.jsonl (and wandb id) to metrics.aborted_<k>.jsonl: main process.

    Returns the new name of the metrics file (None when there was none).
    """
    k = 1
    while any(run_dir.glob(f"*.aborted_{k}.*")):
        k += 1
    moved = None
    for name in (METRICS, WANDB_ID):
        if (run_dir / name).exists():
            stem, ext = name.rsplit(".", 1)
            os.rename(run_dir / name, run_dir / f"{stem}.aborted_{k}.{ext}")
            moved = moved or f"{stem}.aborted_{k}.{ext}"
    log.warning("run folder %s holds no intact checkpoint yet: starting again from step 0 (the earlier attempt's "
                "log is kept as %s; its sample grids are replaced as this run reaches them)", run_dir, moved)
    return moved


def _check_late_keys(cfg) -> None:
    """Keys first used after step 0 (sample grids), checked before it; FID's are checked by building
    its evaluator."""
    t = cfg.train
    if t.sample_sampler is not None and t.sample_sampler not in SAMPLERS:
        raise ValueError(f"config: train.sample_sampler must be one of {list(SAMPLERS)} or null (the flow node's), "
                         f"got {t.sample_sampler!r}")
    if t.sample_steps is not None and (isinstance(t.sample_steps, bool) or t.sample_steps < 1):
        raise ValueError(f"config: train.sample_steps must be an integer >= 1 or null (the flow node's), got "
                         f"{t.sample_steps!r}")


def _check_compatible(cfg, resume_from: Path) -> None:
    """The checkpoint's model must be the one this config builds."""
    saved = resume_from / "config.yaml"
    if not saved.is_file():
        return
    old = OmegaConf.to_container(OmegaConf.load(saved).get("model", {}), resolve=True)
    new = OmegaConf.to_container(cfg.model, resolve=True)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ValueError(f"train.resume: checkpoint {resume_from} was trained with another model config; differing "
                         "keys: " + ", ".join(f"model.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff))


def _latent_view(cfg, device):
    """With train.encode_latents, load the VAE and describe the data as the model sees it (latents).

    Returns (vae or None, cfg). The returned cfg's `data` node has the latent shape and
    `kind: latent` (so model interpolations and exported configs match the model), and
    `train_data` keeps the pixel node the dataset is built from.
    """
    if not cfg.train.encode_latents:
        return None, cfg
    if cfg.data.get("kind", "pixel") != "pixel":
        raise ValueError(f"train.encode_latents=true needs pixel data, but data.kind={cfg.data.kind!r} "
                         "(latent shards are already encoded: set train.encode_latents=false)")
    if cfg.data.get("channels") != 3:
        raise ValueError(f"train.encode_latents=true needs RGB data, got data.channels={cfg.data.get('channels')}")
    vae = load_vae(cfg.data.vae, device=device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.data.image_size % factor:
        raise ValueError(f"data.image_size={cfg.data.image_size} must be divisible by the VAE's factor {factor}")
    pixel = OmegaConf.to_container(cfg.data, resolve=True)
    view = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True))
    with open_dict(view):
        view.data.kind = "latent"
        view.data.image_size = cfg.data.image_size // factor
        view.data.channels = int(vae.config.latent_channels)
        view.data.latent_scale = float(cfg.data.get("latent_scale") or 0.18215)
        view.train_data = pixel
    return vae, view


def _check_shapes(cfg, dataset, vae) -> None:
    """One record must have the shape the model expects (before any GPU time is spent)."""
    x, _ = dataset[0]
    shape = tuple(x.shape)
    if vae is not None:
        shape = (int(cfg.data.channels), int(cfg.data.image_size), int(cfg.data.image_size))
    m = cfg.model
    want = (m.get("in_channels"), m.get("image_size"), m.get("image_size"))
    if None not in want and shape != tuple(want):
        raise ValueError(f"data records have shape {shape} but the model expects (model.in_channels, "
                         f"model.image_size, model.image_size) = {tuple(want)}")


@torch.no_grad()
def _sample_grid(cfg, ema, transport, vae, run_dir, step, logger, accelerator) -> None:
    """EMA samples of fixed noise (the same every time) -> samples/step_XXXXXXX.png; main process."""
    if accelerator.is_main_process:
        from arcee.sample import sample_grid

        path = run_dir / "samples" / f"{ckpt_name(step)}.png"
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # sampling must not move the training RNG
            solver = {k: v for k, v in (("sampler", cfg.train.sample_sampler), ("steps", cfg.train.sample_steps),
                                        ("vae", vae)) if v is not None}
            sample_grid(ema.model, transport, cfg, n=cfg.train.sample_n, seed=cfg.seed, path=path, **solver)
        logger.log_image("samples", path, step)
    accelerator.wait_for_everyone()


def _digits_check(cfg, ema, step, logger) -> None:
    """Are the final EMA samples digits? Classifier FD and confident fraction of samples 0..N-1 (the grid's
    sampler and seed) beside N real digits (arcee.metrics.digits_score); logged and in metrics.jsonl."""
    from arcee.metrics.digits_score import digits_report, format_report

    tc = cfg.train
    solver = {k: v for k, v in (("sampler", tc.sample_sampler), ("steps", tc.sample_steps)) if v is not None}
    log.info("digits check: scoring %d EMA samples with the digits classifier (trained once on first use, then "
             "cached)", tc.digits_check)
    report = digits_report(ema.model, cfg, tc.digits_check, seed=cfg.seed, **solver)
    for line in format_report(report).splitlines():
        log.info(line)
    logger.log({"event": "digits_check", **{f"{who}_{k}": v for who in ("samples", "real")
                                            for k, v in report[who].items()},
                "threshold": report["threshold"], "nfe_per_image": report["nfe_per_image"]}, step=step)


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies under it (as the user typed it), else absolute."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(path)


def _say_next(cfg, run_dir: Path) -> None:
    """Where the run is, and the command that samples its export."""
    where = _shown(run_dir)
    log.info("done: run folder %s (%s, samples/, loss.png, metrics.jsonl, checkpoints/)", where, EXPORT)
    log.info("next: python sample.py ckpt=%s out_dir=samples/%s num_samples=64", os.path.join(where, EXPORT),
             cfg.name)


def _evaluator(cfg, device):
    """The offline FID/KID code path (arcee.metrics) against the data node's real_samples/."""
    from arcee.data import ensure_real_samples
    from arcee.metrics import Evaluator

    return Evaluator(ensure_real_samples(cfg.data), feature_extractor=cfg.train.fid_feature_extractor,
                     device=device, verbose=False)


@torch.no_grad()
def _log_fid(cfg, evaluator, ema, vae, step, logger, accelerator) -> None:
    """FID/KID of EMA samples 0..fid_num_samples-1 (sample.py's seeds); every rank generates a share."""
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # must not move the training RNG
        solver = {k: v for k, v in (("sampler", cfg.train.sample_sampler), ("steps", cfg.train.sample_steps),
                                    ("vae", vae)) if v is not None}
        scores = evaluator.model(ema.model, cfg, cfg.train.fid_num_samples, seed=cfg.seed,
                                 state=accelerator.state, **solver)
    logger.log({f"fid/{k}": v for k, v in scores.items()}, step=step)


class _StopFlag:
    """SIGTERM/SIGUSR1 -> stop at the next step boundary, agreed by every rank.

    With several processes the flags are all-reduced every step over a CPU (gloo) group:
    host-side only, no device synchronisation.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, world: int):
        self.flag, self.previous = False, {}
        self.group = dist.new_group(backend="gloo") if world > 1 else None
        for s in self.SIGNALS:
            try:
                self.previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handlers (and no preemption support)
                pass

    def _handle(self, signum, frame):
        if not self.flag:
            log.warning("received %s: checkpointing at the next step boundary, then exiting",
                        signal.Signals(signum).name)
        self.flag = True

    def requested(self) -> bool:
        if self.group is None:
            return self.flag
        t = torch.tensor([int(self.flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}
