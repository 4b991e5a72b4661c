"""Conditioning and position embeddings (as in DiT): time, class label, 2D sin-cos grid."""
import math

import torch
from torch import Tensor, nn


def sincos_1d(pos: Tensor, dim: int, max_period: float = 10000.0, sin_first: bool = False) -> Tensor:
    """pos: (m,) float -> (m, dim) = [cos(pos w_i), sin(pos w_i)] ([sin, cos] if sin_first),
    w_i = max_period^(-i / (dim/2)), i = 0 .. dim/2 - 1."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=pos.device) / half)
    args = pos.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)] if sin_first else [torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, emb.new_zeros(len(pos), dim % 2)], dim=-1)  # odd dim: pad one zero


def sincos_2d(H: int, W: int, dim: int, max_period: float = 10000.0, column_first: bool = False,
              sin_first: bool = False) -> Tensor:
    """(H*W, dim) row-major grid embedding: the first half of the channels encodes the row (the
    column if column_first), the second half the other coordinate, each with `sincos_1d`.
    The Arcee authors' (MAE's layout, base 1000): column_first=True, sin_first=True, max_period=1000."""
    if dim % 2:
        raise ValueError(f"width must be even for the 2D sin-cos position embedding, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                                indexing="ij")
    first, second = (cols, rows) if column_first else (rows, cols)
    return torch.cat([sincos_1d(a.flatten(), dim // 2, max_period, sin_first) for a in (first, second)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1], shape (b,) -> (b, width): MLP(sinusoidal_freq_dim(scale * t)).

    ZigMa (the default): scale 1000, [cos, sin]; the Arcee authors: scale 1 (raw t), [sin, cos]."""

    def __init__(self, width: int, freq_dim: int = 256, scale: float = 1000.0, sin_first: bool = False):
        super().__init__()
        self.freq_dim, self.scale, self.sin_first = freq_dim, scale, sin_first
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        for m in self.mlp[0], self.mlp[2]:
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, t: Tensor) -> Tensor:
        freq = sincos_1d(self.scale * t, self.freq_dim, sin_first=self.sin_first)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (b,) -> (b, width). Index `num_classes` is the null class used for
    classifier-free guidance; in training labels are replaced by it with probability `dropout`.
    With num_classes = 0 the null class is the only one: a single learned vector (the Arcee
    authors' unconditional label)."""

    def __init__(self, num_classes: int, width: int, dropout: float):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.table = nn.Embedding(num_classes + 1, width)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, y: Tensor) -> Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y)
