"""Self-describing generator weights: save/load `.safetensors` exports and checkpoint folders.

An export is one `.safetensors` file whose metadata holds the full resolved config as YAML
(key "config") and the training step (key "step"). A training checkpoint folder holds
`config.yaml`, `ema.safetensors` and accelerate's `model.safetensors`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from arcee.io import atomic_path

# wrappers that prefix parameter names: torch.compile, DDP / DataParallel
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def save_generator(path: str | os.PathLike, state_dict: dict, cfg, step: int) -> None:
    """Write `state_dict` to `path` (.safetensors) with `cfg` (YAML) and `step` in its metadata.

    Atomic: written to a temporary file in the same folder, then `os.replace`d.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_generator: path must end in .safetensors, got {str(path)!r}")
    cfg_yaml = OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg), resolve=True)
    # safetensors refuses shared storage (tied weights): give each tensor its own copy
    tensors = {_strip(k): v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"config": cfg_yaml, "step": str(int(step))})


def load_generator(path: str | os.PathLike, use_ema: bool = True, device=None):
    """Build the model described by a checkpoint folder or an exported `.safetensors` file.

    Returns `(model, cfg)`: the model in eval mode (on `device`, default CPU) and the full
    resolved config (DictConfig with `model`, `data`, `flow` nodes).
    """
    from arcee.models import build_model

    weights, cfg = _resolve(Path(path), use_ema)
    for node in ("model", "data", "flow"):
        if node not in cfg:
            raise ValueError(f"load_generator: config of {path} has no '{node}' node (found: {list(cfg.keys())})")
    model = build_model(cfg.model)
    state = {_strip(k): v for k, v in load_file(str(weights)).items()}
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
    """-> (weights file, cfg) for a checkpoint folder or an export."""
    if not path.exists():
        raise FileNotFoundError(f"ckpt: {path} does not exist (expected a checkpoint folder or a .safetensors export)")
    if path.is_dir():
        weights = path / ("ema.safetensors" if use_ema else "model.safetensors")
        if not weights.is_file():
            raise FileNotFoundError(
                f"ckpt: checkpoint folder {path} has no {weights.name}"
                + ("" if use_ema else " (accelerate's save_state with safe_serialization)"))
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
    return path, OmegaConf.create(meta["config"])


def _metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types on bad headers
        raise ValueError(f"ckpt: {path} is not a readable safetensors file: {e}") from e


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
