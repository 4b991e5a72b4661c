"""Scan orders: the paths along which a Mamba block reads an H x W grid of tokens.

A path is a permutation `p` of the row-major token indices `0 .. H*W-1`: position `j` of the
sequence holds token `p[j]`. Gather with `x[:, p]`, scatter back with `x[:, inverse(p)]`.

    get_scan_orders("zigzag", H, W)   # (8, H*W): the ZigMa snake paths
    get_scan_orders("raster", H, W)   # (1, H*W): row-major
    get_scan_orders("sweep", H, W)    # (2, H*W): row-major and its reversal

A registry maps a name to a generator `(H, W) -> LongTensor[k, H*W]`; add new orders with
`@register("name")`.
"""
from typing import Callable

import torch
from torch import Tensor

SCAN_ORDERS: dict[str, Callable[[int, int], Tensor]] = {}


def register(name: str):
    """Decorator adding a generator `(H, W) -> LongTensor[k, H*W]` to the registry."""
    def add(fn):
        SCAN_ORDERS[name] = fn
        return fn
    return add


def get_scan_orders(name: str, H: int, W: int) -> Tensor:
    """The paths of scan order `name` on an H x W grid: LongTensor (k, H*W), each row a permutation."""
    if name not in SCAN_ORDERS:
        raise ValueError(f"unknown scan order {name!r}; known: {sorted(SCAN_ORDERS)}")
    if H < 1 or W < 1:
        raise ValueError(f"scan order grid must be at least 1 x 1, got H={H}, W={W}")
    with torch.device("cpu"):  # small index tables: built on the CPU, moved with the model
        return SCAN_ORDERS[name](H, W)


def inverse(paths: Tensor) -> Tensor:
    """Inverse permutations, row by row: `inverse(p)[..., p[..., j]] = j`."""
    return torch.argsort(paths, dim=-1)


def _snake(grid: Tensor) -> Tensor:
    """Boustrophedon over the rows of `grid`: even rows left to right, odd rows right to left."""
    grid = grid.clone()
    grid[1::2] = grid[1::2].flip(-1)
    return grid.flatten()


@register("zigzag")
def zigzag(H: int, W: int) -> Tensor:
    """ZigMa's 8 snake paths: from corners TL, TR, BL, BR, each a row-snake then a column-snake.

    For even N x N grids they form the reversal pairs (0, 4), (1, 3), (2, 6), (5, 7).
    """
    grid = torch.arange(H * W).view(H, W)
    corners = (grid, grid.flip(1), grid.flip(0), grid.flip(0, 1))  # TL, TR, BL, BR at [0, 0]
    return torch.stack([_snake(g) for c in corners for g in (c, c.T)])


@register("raster")
def raster(H: int, W: int) -> Tensor:
    """Row-major order, one path (Vision Mamba's forward scan)."""
    return torch.arange(H * W)[None]


@register("sweep")
def sweep(H: int, W: int) -> Tensor:
    """Row-major order and its reversal (the two directions of a bidirectional scan)."""
    p = torch.arange(H * W)
    return torch.stack([p, p.flip(0)])
