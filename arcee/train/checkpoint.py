"""Checkpoint folders: atomic, hashed writes, keep-last-K plus milestones, the newest intact one,
and the run-folder lock.

Layout of `<run>/checkpoints/step_0001000/`:
    model.safetensors, optimizer.bin, random_states_<rank>.pkl, ...   accelerator.save_state
    arcee_state.pt     step, data cursor, EMA weights, RNG states of every rank, world size
    config.yaml        the full resolved config
    ema.safetensors    EMA weights + config metadata (arcee.sample.save_generator)
    SHA256SUMS         sha256 of every file above, written last (`sha256sum -c SHA256SUMS`)

A checkpoint is written into `.tmp_step_XXXXXXX/` and renamed when complete; deletions rename
to `.del_step_XXXXXXX/` first. Only `step_*` folders holding `arcee_state.pt` count, so a
`kill -9` at any moment leaves either the previous set of complete checkpoints or the new one.
A checkpoint damaged later (disk, copy) fails its hashes: `newest_intact` skips it and moves
it aside to `step_XXXXXXX.damaged` (never deleted).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, gather_object
from omegaconf import OmegaConf

from arcee.sample.loading import DamagedFileError, verify_checksums, write_checksums

log = logging.getLogger("arcee.train")

STATE_FILE = "arcee_state.pt"
LOCK_FILE = "train.lock"
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


def load_arcee_state(folder, verify: bool = False) -> dict:
    """Our state of a checkpoint folder; a clear error when it is missing or unreadable.

    verify: first check every file of the folder against its SHA256SUMS (DamagedFileError).
    """
    folder = Path(folder)
    path = folder / STATE_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint: {folder} is not a folder (expected <run>/checkpoints/step_XXXXXXX)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {folder} has no {STATE_FILE}: not a complete arcee checkpoint")
    if verify:
        verify_checksums(folder)
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


def newest_intact(ckpt_dir, move_damaged: bool) -> tuple[Path | None, dict | None]:
    """The newest checkpoint of `ckpt_dir` whose files all match their hashes, and its state.

    Newer ones that fail (hash, missing file, unreadable state) are skipped with a warning naming
    the file; with `move_damaged` (the run's own folder, main process, under the run lock) they are
    renamed to `step_XXXXXXX.damaged` so that the run can write that step again. Returns
    (None, None) when no checkpoint is intact.
    """
    ckpt_dir = Path(ckpt_dir)
    candidates = sorted((int(m.group(1)), p) for p in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else [])
                        if (m := _NAME.match(p.name)) and p.is_dir())
    for _, folder in reversed(candidates):
        try:
            return folder, load_arcee_state(folder, verify=True)
        except (DamagedFileError, FileNotFoundError, ValueError) as e:
            if move_damaged:
                aside = _move_aside(folder)
                log.warning("skipping damaged checkpoint %s (moved to %s): %s", folder.name, aside.name, e)
            else:
                log.warning("skipping damaged checkpoint %s: %s", folder, e)
    return None, None


def _move_aside(folder: Path) -> Path:
    for k in range(1, 1000):
        aside = folder.with_name(f"{folder.name}.damaged" + (f".{k}" if k > 1 else ""))
        if not aside.exists():
            os.rename(folder, aside)
            return aside
    raise FileExistsError(f"checkpoint: cannot move {folder} aside: too many {folder.name}.damaged.* folders")


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
    error = None
    try:
        accelerator.save_state(str(tmp))  # every rank writes its random_states_<rank>.pkl
    except Exception as e:  # noqa: BLE001 -- reported below as one line, on every rank
        error = _write_error(e, ckpt_dir, step)
    error = _first_error(accelerator, error)  # also a barrier: every rank's files are written
    if error is None and accelerator.is_main_process:
        try:
            (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            save_generator(tmp / "ema.safetensors", ema_state, cfg, step)
            torch.save(state, tmp / STATE_FILE)
            write_checksums(tmp)  # last: the hash of every file above
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(ckpt_dir)
        except Exception as e:  # noqa: BLE001
            error = _write_error(e, ckpt_dir, step)
    error = _first_error(accelerator, error)
    if error is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space the partial checkpoint took
        raise error
    return final


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, I/O error); the previous checkpoints are untouched."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def _write_error(e: Exception, ckpt_dir: Path, step: int) -> CheckpointWriteError:
    """One line: what failed, on which device, and which checkpoint is still there to resume from."""
    previous = list_checkpoints(ckpt_dir)
    intact = (f"the previous checkpoint step {previous[-1][0]} is intact ({previous[-1][1]})" if previous
              else "no earlier checkpoint exists")
    if _is_disk_full(e, ckpt_dir):
        return CheckpointWriteError(errno.ENOSPC, f"no space left on {_device_of(ckpt_dir)} while writing "
                                    f"checkpoint step {step}; {intact}. Free space, then re-run the same command "
                                    "(train.resume=auto continues from it)")
    first = str(e).splitlines()[0] if str(e) else ""
    return CheckpointWriteError(getattr(e, "errno", None) or errno.EIO, f"cannot write checkpoint step {step} in "
                                f"{ckpt_dir} ({type(e).__name__}: {first}); {intact}")


def _is_disk_full(e: BaseException, path: Path) -> bool:
    """ENOSPC / EDQUOT anywhere in the exception chain; torch.save only says "unexpected pos", so also
    a file system with (almost) no free space left."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(seen) or "os error 28" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return _free_bytes(path) < 1 << 20


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62


def _device_of(path: Path) -> str:
    """'<device> (mounted at <mount point>)' of the file system holding `path`, as /proc/self/mounts says."""
    mount = Path(os.path.realpath(path))
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        with open("/proc/self/mounts") as f:
            devices = [line.split()[0] for line in f if len(line.split()) > 1 and line.split()[1] == str(mount)]
    except OSError:
        devices = []
    return f"{devices[-1]} (mounted at {mount})" if devices else str(mount)


def _first_error(accelerator, error: CheckpointWriteError | None) -> CheckpointWriteError | None:
    """Collective: every rank gets the first rank's error (or None), so that all stop together."""
    if accelerator.num_processes == 1:
        return error
    errors = gather_object([None if error is None else (error.errno, error.strerror)])
    first = next((x for x in errors if x is not None), None)
    return None if first is None else CheckpointWriteError(*first)


def prune(ckpt_dir, keep_last: int, milestone_every: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, sparing multiples of `milestone_every`."""
    ckpts = list_checkpoints(ckpt_dir)
    doomed = [(s, p) for s, p in ckpts[:-keep_last] if not (milestone_every and s % milestone_every == 0)]
    for _, p in doomed:
        trash = p.with_name(f".del_{p.name}")
        os.rename(p, trash)  # atomic: no half-deleted step_* folder is ever visible
        shutil.rmtree(trash)
    return [p for _, p in doomed]


class RunFolderLocked(OSError):
    """Another live process holds the run folder's lock (an OSError: reported as a user error)."""


def lock_run_dir(accelerator, run_dir: Path) -> int | None:
    """Collective: the main process takes an exclusive lock on `<run>/train.lock` for the life of
    the run; every rank raises RunFolderLocked (naming the holder's host and PID) when it is taken.

    A POSIX record lock (fcntl): released by the OS when the holder dies (kill -9, node reboot on
    NFS), not inherited by DataLoader workers, and shared by no other process. Returns the file
    descriptor to pass to `unlock_run_dir` (None on other ranks, or where the file system has no
    locks, with a warning).
    """
    fd, error = None, None
    if accelerator.is_main_process:
        try:
            fd = _acquire(Path(run_dir) / LOCK_FILE)
        except OSError as e:  # held by another process, or the folder is not writable
            error = e
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error is not None:
        raise error
    return fd


def unlock_run_dir(fd: int | None) -> None:
    if fd is not None:
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the lock


def _acquire(path: Path) -> int | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 512, 0).decode(errors="replace").split()
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            who = (f"host {holder[0]}, PID {holder[1]}, since {' '.join(holder[2:4])}" if len(holder) >= 4
                   else "host and PID not yet recorded")
            raise RunFolderLocked(
                f"run folder {path.parent} is in use by another trainer ({who}); refusing to start a second "
                "writer. Stop that process first (after `kill -9` of `accelerate launch` its ranks may still "
                "run), or use another hydra.run.dir") from None
        log.warning("cannot lock %s (%s): a second trainer on this run folder would not be detected", path, e)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    return fd


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
