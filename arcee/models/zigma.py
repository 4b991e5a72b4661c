"""The ZigMa backbone (Hu et al. 2024, DiT-style) with the Arcee cross-block state chain.

    v = ZigMa(image_size=32, in_channels=4, ...)(x, t, y=None)    # x, v: (b, C, H, W); t: (b,) in [0, 1]

Patchify -> + position embedding -> depth x [RMSNorm, adaLN-Zero modulation, Mamba mixer
along the block's scan path, gated residual] -> final adaLN + Linear -> unpatchify.
Block i scans path i % k of the scan order (tokens are gathered into the path before the
mixer and scattered back after it). With `state_chain="arcee"` block i's terminal SSM state,
through a parameter-free boundary map, is block i+1's initial state (block 0 starts at zero).

Two backbones around the mixer, chosen by `block` (docs/architecture.md has the differences):
- "prenorm" (default): r <- r + gate * mixer(modulate(RMSNorm(r))); the final layer reads
  RMSNorm(r); ZigMa's time (1000 t, [cos, sin]) and position embeddings.
- "paper": the Arcee authors' code. Block i returns o_i = RMSNorm(r_i) + gate * mixer(...), and
  the stream block i+1 reads is r_{i+1} = r_i + o_i (mamba's add-then-norm Block), so
  r_i = embedding + o_0 + ... + o_{i-1}; the final layer reads LayerNorm(o_last) (eps 1e-6, no
  affine). Also raw-t [sin, cos] time embedding, out_proj Kaiming-uniform / sqrt(depth),
  base-1000 position embedding with the column first, PyTorch-default patch-embed bias,
  when num_classes = 0 one learned unconditional label vector added to the conditioning, and
  in a bidirectional mixer the reversed scan's dt bias at zero (softplus: dt = ln 2).
"""
import math
from typing import Callable, Optional, Sequence, Union

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from arcee.ops.selective_scan import MAX_D_STATE

from .embeddings import LabelEmbedder, TimestepEmbedder, sincos_2d
from .mamba import Mamba
from .scan_orders import get_scan_orders, inverse

# Boundary maps h_T^(i) -> h_0^(i+1) between blocks; parameter-free. The paper uses the identity.
BOUNDARY_MAPS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda h: h,
    "detach": lambda h: h.detach(),  # ablation: pass the state, not its gradient
}
STATE_CHAINS = ("none", "arcee")
BLOCKS = ("prenorm", "paper")


class ZigMaBlock(nn.Module):
    """skip + gate * scatter(Mamba(gather(RMSNorm(x) * (1 + scale) + shift))); (shift, scale, gate) = adaLN(c).

    skip = x (pre-norm residual) or, with normed_skip (the authors' add-then-norm block),
    skip = RMSNorm(x): the block's output is then added to the stream by the model."""

    def __init__(self, width: int, path: Optional[Tensor], normed_skip: bool = False, **mixer_kwargs):
        super().__init__()
        self.normed_skip = normed_skip
        self.norm = nn.RMSNorm(width, eps=1e-5)
        self.mixer = Mamba(width, **mixer_kwargs)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.adaLN[1].weight)
        nn.init.zeros_(self.adaLN[1].bias)
        self.register_buffer("path", path, persistent=False)  # None: tokens already in scan order
        self.register_buffer("inverse", None if path is None else inverse(path), persistent=False)

    def forward(self, x: Tensor, c: Tensor, h0: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """x: (b, L, width) fp32 residual stream; c: (b, width); h0: mixer state or None."""
        shift, scale, gate = self.adaLN(c)[:, None].chunk(3, dim=-1)
        normed = self.norm(x)
        h = normed * (1 + scale) + shift
        if self.path is not None:
            h = h[:, self.path]
        h, h_T = self.mixer(h, h0)
        if self.path is not None:
            h = h[:, self.inverse]
        skip = normed.to(x.dtype) if self.normed_skip else x  # keep the stream's dtype (fp32) under autocast
        return skip + gate * h, h_T


class FinalLayer(nn.Module):
    """adaLN-modulated norm (no affine) + zero-initialised Linear to patch tokens (b, L, p*p*C)."""

    def __init__(self, width: int, patch_size: int, out_channels: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=1e-5, elementwise_affine=False) if norm is None else norm
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        for m in self.adaLN[1], self.linear:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN(c)[:, None].chunk(2, dim=-1)
        return self.linear(self.norm(x) * (1 + scale) + shift)


class ZigMa(nn.Module):
    """The backbone; the arguments are the keys of configs/model/*.yaml (documented in zigma_b2.yaml)."""

    def __init__(self, image_size: Union[int, Sequence[int]], in_channels: int, patch_size: int = 2,
                 width: int = 768, depth: int = 24, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_rank: Optional[int] = None, scan_order: str = "zigzag", num_orders: int = 8,
                 bidirectional: bool = False, block: str = "prenorm", state_chain: str = "none",
                 boundary_map: str = "identity",
                 num_classes: int = 0, class_dropout: float = 0.1, grad_checkpoint: bool = False,
                 scan_backend: Optional[str] = None):
        super().__init__()
        H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        for name, v in dict(in_channels=in_channels, patch_size=patch_size, width=width, depth=depth,
                            expand=expand, d_conv=d_conv).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"model {name} must be a positive integer, got {v!r}")
        if H % patch_size or W % patch_size:
            raise ValueError(f"model image_size {H}x{W} must be divisible by patch_size {patch_size}")
        if not 1 <= d_state <= MAX_D_STATE:
            raise ValueError(f"model d_state must be in 1..{MAX_D_STATE} (the scan's limit), got {d_state}")
        if block not in BLOCKS:
            raise ValueError(f"model block must be one of {BLOCKS}, got {block!r}")
        if state_chain not in STATE_CHAINS:
            raise ValueError(f"model state_chain must be one of {STATE_CHAINS}, got {state_chain!r}")
        if boundary_map not in BOUNDARY_MAPS:
            raise ValueError(f"unknown model boundary_map {boundary_map!r}; known: {sorted(BOUNDARY_MAPS)}")
        if dt_rank is not None and (not isinstance(dt_rank, int) or dt_rank < 1):
            raise ValueError(f"model dt_rank must be 'auto' (ceil(width / 16)) or a positive integer, got {dt_rank!r}")
        if num_classes < 0 or not 0 <= class_dropout < 1:
            raise ValueError(f"model num_classes must be >= 0 and class_dropout in [0, 1), got "
                             f"{num_classes}, {class_dropout}")
        self.image_size, self.in_channels, self.patch_size = (H, W), in_channels, patch_size
        self.grid = (H // patch_size, W // patch_size)
        paths = get_scan_orders(scan_order, *self.grid)
        if not 1 <= num_orders <= len(paths):
            raise ValueError(f"model num_orders must be in 1..{len(paths)} for scan_order {scan_order!r}, "
                             f"got {num_orders}")
        paths = paths[:num_orders]
        self.num_orders, self.num_classes, self.grad_checkpoint = num_orders, num_classes, grad_checkpoint
        self.block, paper = block, block == "paper"
        self.chain = state_chain == "arcee"
        self.boundary_map = BOUNDARY_MAPS[boundary_map]

        self.x_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)  # paper: default bias init
        nn.init.xavier_uniform_(self.x_embed.weight.view(width, -1))
        if not paper:
            nn.init.zeros_(self.x_embed.bias)
        pos = (sincos_2d(*self.grid, width, max_period=1000.0, column_first=True, sin_first=True) if paper
               else sincos_2d(*self.grid, width))
        self.pos_embed = nn.Parameter(pos[None])  # learnable, sin-cos init
        self.t_embed = TimestepEmbedder(width, scale=1.0, sin_first=True) if paper else TimestepEmbedder(width)
        # paper with num_classes = 0: a one-row table, the learned unconditional label
        self.y_embed = LabelEmbedder(num_classes, width, class_dropout) if num_classes > 0 or paper else None
        # k = 1: permute once for the whole model, the blocks then see tokens in scan order.
        once = num_orders == 1
        self.register_buffer("path", paths[0] if once else None, persistent=False)
        self.register_buffer("inverse", inverse(paths[0]) if once else None, persistent=False)
        mixer = dict(d_state=d_state, expand=expand, d_conv=d_conv, dt_rank=dt_rank,
                     bidirectional=bidirectional, scan_backend=scan_backend)
        self.blocks = nn.ModuleList(ZigMaBlock(width, None if once else paths[i % num_orders], paper, **mixer)
                                    for i in range(depth))
        if paper:  # mamba's "rescale prenorm residual": nn.Linear's default init, divided by sqrt(depth)
            for blk in self.blocks:
                nn.init.kaiming_uniform_(blk.mixer.out_proj.weight, a=math.sqrt(5))
                with torch.no_grad():
                    blk.mixer.out_proj.weight.div_(math.sqrt(depth))
                if bidirectional:  # their init zeroes every Linear bias not marked _no_reinit, and the
                    nn.init.zeros_(blk.mixer.dt_proj[1].bias)  # reversed scan's dt_proj bias is not: dt = ln 2
        final_norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False) if paper else None
        self.final = FinalLayer(width, patch_size, in_channels, final_norm)

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """x: (b, C, H, W); t: (b,) in [0, 1]; y: (b,) class labels (num_classes = null class) or None.
        Returns the velocity, shaped and typed like x."""
        t, y = self._check_inputs(x, t, y)
        h = self.x_embed(x).flatten(2).mT.float() + self.pos_embed  # (b, L, width), fp32 residual stream
        c = self.t_embed(t)
        if self.y_embed is not None:
            c = c + self.y_embed(y)
        if self.path is not None:
            h = h[:, self.path]

        state = None  # block 0 starts from zero
        for block in self.blocks:
            if self.grad_checkpoint and torch.is_grad_enabled():
                out, h_T = checkpoint(block, h, c, state, use_reentrant=False)
            else:
                out, h_T = block(h, c, state)
            h = h + out if block.normed_skip else out  # paper: the stream sums the block outputs
            state = self.boundary_map(h_T) if self.chain else None

        # the final layer reads the last block's output (prenorm: that is the stream itself)
        if self.path is not None:
            out = out[:, self.inverse]
        h = self.final(out, c)
        p, (gh, gw) = self.patch_size, self.grid
        return rearrange(h, "b (h w) (p q c) -> b c (h p) (w q)", h=gh, w=gw, p=p, q=p).to(x.dtype)

    def _check_inputs(self, x, t, y):
        """Shape checks (static under torch.compile). Returns t as (b,) and y (null class if None)."""
        C, (H, W) = self.in_channels, self.image_size
        if x.dim() != 4 or x.shape[1] != C or tuple(x.shape[2:]) != (H, W):
            raise ValueError(f"model input x must have shape (b, {C}, {H}, {W}) (in_channels, image_size), "
                             f"got {tuple(x.shape)}")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.dim() == 0 else t
        if t.shape != (b,):
            raise ValueError(f"model input t must have shape (b,) = ({b},), got {tuple(t.shape)}")
        if self.num_classes == 0 and y is not None:
            raise ValueError("model got class labels y but has num_classes = 0 (unconditional)")
        if self.y_embed is not None and y is None:
            y = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)  # null class
        elif y is not None and y.shape != (b,):
            raise ValueError(f"model input y must have shape (b,) = ({b},), got {tuple(y.shape)}")
        return t, y

    def extra_repr(self) -> str:
        return f"grid={self.grid}, block={self.block}, state_chain={'arcee' if self.chain else 'none'}"
