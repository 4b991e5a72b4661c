"""Self-describing generator weights: save/load `.safetensors` exports and checkpoint folders.

An export is one `.safetensors` file whose metadata holds the full resolved config as YAML
(key "config"), the training step (key "step") and a sha256 of its content (key "sha256", see
`content_sha256`). A training checkpoint folder holds `config.yaml`, `ema.safetensors` and
accelerate's `model.safetensors`, and `SHA256SUMS` (`sha256sum -c` format) with the hash of
every file. Loading verifies the hashes and names a damaged file (`DamagedFileError`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
import torch
from safetensors.torch import load_file, save_file

from arcee.io import atomic_path, atomic_write_text

log = logging.getLogger("arcee.sample")

# wrappers that prefix parameter names: torch.compile, DDP / DataParallel
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
HUB_CONFIG, HUB_WEIGHTS = "config.json", "model.safetensors"  # huggingface_hub's save_pretrained layout
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name
CHECKSUMS = "SHA256SUMS"  # in every checkpoint folder: "<sha256>  <file>" lines, written last
HASH_KEY = "sha256"  # export metadata key: content_sha256 of the file's tensors and other metadata


class DamagedFileError(ValueError):
    """A checkpoint file or export whose content differs from the hash recorded when it was written,
    or that is missing or unreadable."""


def sha256_file(path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder) -> Path:
    """Hash every file under `folder` into `folder/SHA256SUMS` (atomic, fsynced); returns its path.

    `cd folder && sha256sum -c SHA256SUMS` checks it without arcee.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    path = folder / CHECKSUMS
    atomic_write_text(path, "".join(lines))
    return path


def verify_checksums(folder, names=None) -> None:
    """Check files of a checkpoint folder against its SHA256SUMS; names: only these (default: all listed).

    Raises DamagedFileError naming the first file that is missing or differs, or the folder when
    SHA256SUMS itself is missing or unreadable.
    """
    folder = Path(folder)
    listing = folder / CHECKSUMS
    if not listing.is_file():
        raise DamagedFileError(f"checkpoint {folder} has no {CHECKSUMS}: an incomplete folder, or not written by "
                               "arcee.train; its files cannot be verified")
    recorded = {}
    try:
        for line in listing.read_text(encoding="utf-8").splitlines():
            digest, name = line.split("  ", 1)
            if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                raise ValueError(line)
            recorded[name] = digest
    except (UnicodeDecodeError, ValueError) as e:
        raise DamagedFileError(f"checkpoint file {listing} is damaged (unreadable line {str(e)[:40]!r})") from None
    for name in recorded if names is None else names:
        path = folder / name
        if name not in recorded:
            raise DamagedFileError(f"checkpoint file {path} is not listed in {listing}: cannot verify it")
        if not path.is_file():
            raise DamagedFileError(f"checkpoint file {path} is missing (listed in {CHECKSUMS})")
        if sha256_file(path) != recorded[name]:
            raise DamagedFileError(f"checkpoint file {path} is damaged: its sha256 differs from the one recorded in "
                                   f"{CHECKSUMS} when it was written ({path.stat().st_size} bytes now)")


def content_sha256(tensors: dict, metadata: dict) -> str:
    """sha256 of an export's content: its metadata (except "sha256") and every tensor's name, dtype,
    shape and bytes, in name order. Independent of how safetensors lays the file out."""
    h = hashlib.sha256()
    head = {"metadata": {k: v for k, v in metadata.items() if k != HASH_KEY},
            "tensors": {k: [str(v.dtype), list(v.shape)] for k, v in tensors.items()}}
    h.update(json.dumps(head, sort_keys=True).encode())
    for k in sorted(tensors):
        h.update(tensors[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_generator(path: str | os.PathLike, state_dict: dict, cfg, step: int) -> None:
    """Write `state_dict` to `path` (.safetensors) with `cfg` (YAML), `step` and the content's
    sha256 (`content_sha256`, checked by `load_generator`) in its metadata.

    Atomic: written to a temporary file in the same folder, then `os.replace`d.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_generator: path must end in .safetensors, got {str(path)!r}")
    cfg_yaml = OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg), resolve=True)
    # safetensors refuses shared storage (tied weights): give each tensor its own copy
    tensors = {_strip(k): v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    metadata = {"config": cfg_yaml, "step": str(int(step))}
    metadata[HASH_KEY] = content_sha256(tensors, metadata)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def load_generator(path: str | os.PathLike, use_ema: bool = True, device=None):
    """Build the model described by a checkpoint folder or an exported `.safetensors` file.

    Returns `(model, cfg)`: the model in eval mode (on `device`, default CPU) and the full
    resolved config (DictConfig with `model`, `data`, `flow` nodes). The files read are verified
    first (a checkpoint's SHA256SUMS, an export's "sha256"): DamagedFileError names a damaged one.
    """
    from arcee.models import build_model

    weights, cfg = _resolve(Path(path), use_ema)
    for node in ("model", "data", "flow"):
        if node not in cfg:
            raise ValueError(f"load_generator: config of {path} has no '{node}' node (found: {list(cfg.keys())})")
    model = build_model(cfg.model)
    state = {_strip(k): v for k, v in _load_file(weights).items()}
    _check_state(model.state_dict(), state, weights)
    model.load_state_dict(state)
    return model.to(device or "cpu").eval(), cfg


def read_step(path: str | os.PathLike) -> int | None:
    """Training step of a checkpoint folder or export (None when it is not recorded)."""
    path = Path(path)
    weights = path / "ema.safetensors" if path.is_dir() else path
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
        if step is not None:
            return int(step)
    m = re.search(r"step_?(\d+)", path.name)
    return int(m.group(1)) if m else None


def _strip(key: str) -> str:
    for p in _WRAPPER_PREFIXES:
        while key.startswith(p):
            key = key[len(p):]
    return key


def _resolve(path: Path, use_ema: bool):
    """-> (weights file, cfg) for a checkpoint folder or an export, both verified against their hashes.

    Also a folder in the Hugging Face Hub layout (`ZigMaHub.save_pretrained`: config.json +
    model.safetensors, one set of weights) or a Hub id `owner/name` (downloaded to the Hub cache).
    """
    if not path.exists() and _HUB_ID.match(str(path)):
        path = _hub_download(str(path))
    if not path.exists():
        raise FileNotFoundError(f"ckpt: {path} does not exist (expected a checkpoint folder, a .safetensors export, "
                                "a save_pretrained folder or a Hugging Face Hub id owner/name)")
    if path.is_dir() and (path / HUB_CONFIG).is_file() and not (path / "config.yaml").is_file():
        weights = path / HUB_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"ckpt: {path} has {HUB_CONFIG} but no {HUB_WEIGHTS} (a save_pretrained folder)")
        try:
            return weights, OmegaConf.create(json.loads((path / HUB_CONFIG).read_text(encoding="utf-8")))
        except (UnicodeDecodeError, ValueError) as e:
            raise DamagedFileError(f"ckpt: {path / HUB_CONFIG} is not readable JSON ({e})") from None
    if path.is_dir():
        weights = path / ("ema.safetensors" if use_ema else "model.safetensors")
        if not weights.is_file():
            raise FileNotFoundError(
                f"ckpt: checkpoint folder {path} has no {weights.name}"
                + ("" if use_ema else " (accelerate's save_state with safe_serialization)"))
        if (path / CHECKSUMS).is_file():
            verify_checksums(path, [p.name for p in (weights, path / "config.yaml") if p.exists()])
        else:
            log.warning("ckpt: %s has no %s (written before checkpoints carried hashes): not verified", path,
                        CHECKSUMS)
        if (path / "config.yaml").is_file():
            return weights, OmegaConf.load(path / "config.yaml")
        meta = _metadata(weights)
        if "config" not in meta:
            raise FileNotFoundError(f"ckpt: checkpoint folder {path} has no config.yaml")
        return weights, OmegaConf.create(meta["config"])
    if path.suffix != ".safetensors":
        raise ValueError(f"ckpt: {path} is neither a checkpoint folder nor a .safetensors file")
    meta = _metadata(path)
    if "config" not in meta:
        raise ValueError(f"ckpt: {path} has no 'config' metadata key; export it with arcee.sample.save_generator")
    verify_export(path)
    return path, OmegaConf.create(meta["config"])


def _hub_download(repo_id: str) -> Path:
    """The local snapshot of Hub model `repo_id` (config.json + model.safetensors): from the Hub cache when
    there, else downloaded; fails within seconds, naming the cause, when the Hub cannot be reached."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from arcee.net import unreachable

    files = [HUB_CONFIG, HUB_WEIGHTS]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=files, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else unreachable(constants.ENDPOINT)
    if why:
        raise FileNotFoundError(f"ckpt={repo_id}: not a local file or folder, and as a Hugging Face Hub id it is not "
                                f"in the Hub cache and cannot be downloaded ({why}). Pass a local checkpoint or "
                                f"save_pretrained folder, or download {repo_id} where there is network.")
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=files))
    except Exception as e:  # huggingface_hub's errors: repository not found, gated, HTTP errors
        raise FileNotFoundError(f"ckpt={repo_id}: not a local file or folder, and downloading it from the Hugging "
                                f"Face Hub failed ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return folder


def verify_export(path) -> None:
    """Check an export's tensors and metadata against the "sha256" in its metadata (`content_sha256`).

    Raises DamagedFileError when they differ or the file cannot be read; an export without the
    key (written before exports carried it, or by another tool) is loaded with a warning.
    """
    path = Path(path)
    meta = _metadata(path)
    if HASH_KEY not in meta:
        log.warning("ckpt: %s has no %r metadata (not written by this version of save_generator): not verified",
                    path, HASH_KEY)
        return
    if content_sha256(_load_file(path), meta) != meta[HASH_KEY]:
        raise DamagedFileError(f"export {path} is damaged: the sha256 of its tensors and metadata differs from the "
                               "one recorded when it was written; export it again (or use a checkpoint's "
                               "ema.safetensors)")


def _load_file(path: Path) -> dict:
    try:
        return load_file(str(path))
    except Exception as e:  # a damaged header or a truncated file
        raise DamagedFileError(f"{path} is damaged or not a safetensors file ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types on bad headers
        raise DamagedFileError(f"ckpt: {path} is damaged or not a safetensors file: {e}") from None


def _check_state(expected: dict, found: dict, source: Path) -> None:
    """Raise a readable error when the weights do not fit the model built from the config."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: model {tuple(expected[k].shape)} vs file {tuple(found[k].shape)}"
              for k in expected if k in found and expected[k].shape != found[k].shape]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for name, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{len(items)} {name}: {', '.join(items[:5])}{more}")
    raise ValueError(f"ckpt: weights in {source} do not match the model built from its config's "
                     f"'model' node; " + "; ".join(parts))
