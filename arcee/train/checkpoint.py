"""Checkpoint folders: atomic writes, keep-last-K plus milestones, finding the latest complete one.

Layout of `<run>/checkpoints/step_0001000/`:
    model.safetensors, optimizer.bin, random_states_<rank>.pkl, ...   accelerator.save_state
    arcee_state.pt     step, data cursor, EMA weights, RNG states of every rank, world size
    config.yaml        the full resolved config
    ema.safetensors    EMA weights + config metadata (arcee.sample.save_generator)

A checkpoint is written into `.tmp_step_XXXXXXX/` and renamed when complete; deletions rename
to `.del_step_XXXXXXX/` first. Only `step_*` folders holding `arcee_state.pt` count, so a
`kill -9` at any moment leaves either the previous set of complete checkpoints or the new one.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

STATE_FILE = "arcee_state.pt"
_NAME = re.compile(r"^step_(\d{7,})$")


def ckpt_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(ckpt_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints in `ckpt_dir`, as (step, folder), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _NAME.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_dir) -> Path | None:
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1][1] if ckpts else None


def load_arcee_state(folder) -> dict:
    """Our state of a checkpoint folder; a clear error when it is missing or unreadable."""
    folder = Path(folder)
    path = folder / STATE_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint: {folder} is not a folder (expected <run>/checkpoints/step_XXXXXXX)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {folder} has no {STATE_FILE}: not a complete arcee checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated / corrupted file
        raise ValueError(f"checkpoint: cannot read {path}: {type(e).__name__}: {e}") from e
    missing = [k for k in ("step", "cursor", "ema", "rng", "world_size") if k not in state]
    if missing:
        raise ValueError(f"checkpoint: {path} lacks {missing}: not written by arcee.train")
    if not (folder / "model.safetensors").is_file() and not (folder / "pytorch_model.bin").is_file():
        raise FileNotFoundError(f"checkpoint: {folder} has no model weights (accelerator.save_state output)")
    return state


def clean_stale(ckpt_dir) -> list[Path]:
    """Remove leftovers of interrupted writes/deletions (`.tmp_*`, `.del_*`). Main process only."""
    ckpt_dir, removed = Path(ckpt_dir), []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith((".tmp_", ".del_")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def save_checkpoint(accelerator, ckpt_dir, step: int, state: dict, cfg, ema_state: dict) -> Path:
    """Write checkpoint `step` atomically; every process calls this (collective).

    state: our `arcee_state.pt` dict, already holding the gathered RNG states.
    """
    from arcee.sample import save_generator

    ckpt_dir = Path(ckpt_dir)
    final, tmp = ckpt_dir / ckpt_name(step), ckpt_dir / f".tmp_{ckpt_name(step)}"
    if accelerator.is_main_process:
        if final.exists():
            raise FileExistsError(f"checkpoint: {final} already exists; refusing to overwrite it")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its random_states_<rank>.pkl
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        save_generator(tmp / "ema.safetensors", ema_state, cfg, step)
        torch.save(state, tmp / STATE_FILE)  # written last: its presence marks a complete folder
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(ckpt_dir)
    accelerator.wait_for_everyone()
    return final


def prune(ckpt_dir, keep_last: int, milestone_every: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, sparing multiples of `milestone_every`."""
    ckpts = list_checkpoints(ckpt_dir)
    doomed = [(s, p) for s, p in ckpts[:-keep_last] if not (milestone_every and s % milestone_every == 0)]
    for _, p in doomed:
        trash = p.with_name(f".del_{p.name}")
        os.rename(p, trash)  # atomic: no half-deleted step_* folder is ever visible
        shutil.rmtree(trash)
    return [p for _, p in doomed]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
