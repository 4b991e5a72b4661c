"""Atomic file writes: a file appears at its final path only when complete.

Used by every writer whose output a user keeps (samples, exported weights, tables, caches), so an
interrupted run never leaves a truncated file under a real name. Depends on nothing of ours.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _file_mode() -> int:
    """Permissions of a newly created file under the current umask (mkstemp alone gives 0600)."""
    try:  # Linux: read it without changing it (os.umask is set-and-return, racy with threads)
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path, suffix: str = ".tmp", fsync: bool = False):
    """Yield a temporary path beside `path` (`.<name>.XXXX<suffix>`); when the block completes it
    gets the usual permissions (and with `fsync` reaches the disk) and is renamed onto `path`;
    when it raises, it is removed.

        with atomic_path(out / "x.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _file_mode())
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` atomically and durably (fsync before the rename)."""
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode())


def check_writable(path, key: str) -> Path:
    """Fail now, naming the argument `key`, when no file can be written at `path` (its folder is
    created when missing); used before long work whose result goes to `path`. Returns `path`."""
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(f"{key}={str(path)!r}: {str(path.parent)!r} is a file, not a folder; "
                                 f"pass a writable {key}=")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise OSError(f"{key}={str(path)!r}: cannot write to {str(path.parent)!r} ({e.strerror or e}); "
                      f"pass a writable {key}=") from e
    return path
