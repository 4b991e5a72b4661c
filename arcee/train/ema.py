"""Exponential moving average of the weights, kept outside DDP/compile on the raw module, in fp32."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """`ema = decay * ema + (1 - decay) * w` after every optimizer step (DiT's `update_ema`).

    For the first `warmup` steps the average copies the weights (decay 0), so a short run's
    EMA does not stay anchored at the random init. `self.model` is an fp32 eval-mode copy of
    the raw model (no DDP wrapper, no compile), used for sample grids and exports.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = float(decay), int(warmup)
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    def to(self, device) -> "EMA":
        self.model.to(device)
        return self

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """model: the raw (unwrapped) training model; step: optimizer steps done so far (>= 1)."""
        src, dst = model.state_dict(), self.model.state_dict()
        floats = [k for k, v in dst.items() if v.is_floating_point()]
        others = [k for k in dst if k not in floats]
        if step <= self.warmup or self.decay == 0.0:
            torch._foreach_copy_([dst[k] for k in floats], [src[k] for k in floats])
        else:  # ema + (1 - decay) * (w - ema), in fp32
            torch._foreach_lerp_([dst[k] for k in floats], [src[k].float() for k in floats], 1.0 - self.decay)
        for k in others:
            dst[k].copy_(src[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
