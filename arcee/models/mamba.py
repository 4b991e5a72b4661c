"""The Mamba mixer (Gu & Dao 2023, "simple" Mamba-1 block) with a state port in and out.

    y, h_T = Mamba(width)(x, h0=None)     # x, y: (b, l, width); h0, h_T: (b, n_dir * d_inner, d_state) fp32

With `bidirectional=True` (Vision Mamba) a second scan reads the sequence reversed with its
own conv, x_proj, dt_proj, A and D (in_proj and out_proj are shared) and the two outputs are
summed. Both directions run as one scan call: channels are stacked along d and B, C use one
group per direction, so the state (and an Arcee state chain) is simply twice as wide.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arcee.ops import selective_scan_fn


class Mamba(nn.Module):
    def __init__(self, width: int, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_rank: Optional[int] = None, bidirectional: bool = False,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 scan_backend: Optional[str] = None):
        super().__init__()
        self.d_inner = d_inner = expand * width
        self.d_state, self.dt_rank = d_state, dt_rank or math.ceil(width / 16)
        self.n_dir = n_dir = 2 if bidirectional else 1
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(width, 2 * d_inner, bias=False)  # -> (x, z)
        self.conv1d = nn.Conv1d(n_dir * d_inner, n_dir * d_inner, d_conv, groups=n_dir * d_inner,
                                padding=d_conv - 1)  # depthwise, made causal by trimming the tail
        self.x_proj = nn.ModuleList(nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
                                    for _ in range(n_dir))  # -> (dt, B, C)
        self.dt_proj = nn.ModuleList(nn.Linear(self.dt_rank, d_inner) for _ in range(n_dir))
        # S4D-real: A[c, i] = -(i + 1)
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(n_dir * d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(n_dir * d_inner))
        self.out_proj = nn.Linear(d_inner, width, bias=False)

        # dt_proj: weight ~ U(-r^-1/2, r^-1/2); bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]
        for proj in self.dt_proj:
            nn.init.uniform_(proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            with torch.no_grad():
                proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.A_log._no_weight_decay = self.D._no_weight_decay = True

    def forward(self, x: Tensor, h0: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """x: (b, l, width), h0: (b, n_dir * d_inner, d_state) fp32 or None (zeros).
        Returns y: (b, l, width) and the state after the last token h_T (same shape as h0)."""
        l = x.shape[1]
        x, z = (self.in_proj.weight @ x.mT).chunk(2, dim=1)  # (b, d_inner, l) each, l innermost
        if self.n_dir == 2:  # the second direction reads the sequence reversed
            x, z = torch.cat([x, x.flip(-1)], dim=1), torch.cat([z, z.flip(-1)], dim=1)
        x = F.silu(self.conv1d(x)[..., :l])

        deltas, Bs, Cs = [], [], []  # per direction, all (b, channels, l) like the scan's inputs
        for xd, x_proj, dt_proj in zip(x.chunk(self.n_dir, dim=1), self.x_proj, self.dt_proj):
            dt, B, C = (x_proj.weight @ xd).split([self.dt_rank, self.d_state, self.d_state], dim=1)
            deltas.append(dt_proj.weight @ dt)  # (b, d_inner, l); the bias goes in as delta_bias
            Bs.append(B)
            Cs.append(C)
        delta_bias = torch.cat([proj.bias for proj in self.dt_proj]).float()
        y, h_T = selective_scan_fn(
            x, torch.cat(deltas, dim=1), -torch.exp(self.A_log.float()), torch.stack(Bs, dim=1),
            torch.stack(Cs, dim=1), self.D.float(), z, delta_bias=delta_bias,
            delta_softplus=True, return_last_state=True, initial_state=h0, backend=self.scan_backend)
        if self.n_dir == 2:
            y = y[:, :self.d_inner] + y[:, self.d_inner:].flip(-1)
        return self.out_proj(y.mT), h_T
