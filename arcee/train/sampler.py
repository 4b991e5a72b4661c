"""Deterministic, resumable data order, sharded across processes.

The global index stream is the concatenation perm_0 ++ perm_1 ++ ... of seeded permutations
of the dataset (perm_e depends only on (seed, e)). Optimizer step s consumes the next
`global_batch` entries of the stream starting at a global cursor; inside the step,
micro-batch m of rank r takes entries

    cursor + m * global_batch / grad_accum + r * b  ...  + b,   b = global_batch / (grad_accum * world)

so the samples of a step, and the cursor, do not depend on the number of processes: a run
checkpointed on N processes continues exactly (mid-epoch) on M.
"""
from __future__ import annotations

import numpy as np


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """(n,) int64: the order of epoch `epoch`; a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def stream_slice(n: int, seed: int, start: int, count: int, _cache: dict | None = None) -> list[int]:
    """Entries [start, start + count) of the infinite stream perm_0 ++ perm_1 ++ ... (may cross epochs)."""
    out = []
    while count > 0:
        epoch, offset = divmod(start, n)
        if _cache is None or _cache.get("epoch") != epoch:
            perm = epoch_permutation(n, seed, epoch)
            if _cache is not None:
                _cache.update(epoch=epoch, perm=perm)
        else:
            perm = _cache["perm"]
        take = min(count, n - offset)
        out.extend(perm[offset:offset + take].tolist())
        start, count = start + take, count - take
    return out


class ResumableBatchSampler:
    """Infinite batch sampler for `torch.utils.data.DataLoader(batch_sampler=...)`.

    Yields this rank's micro-batches (lists of `global_batch // (grad_accum * world)` indices),
    `grad_accum` per optimizer step, starting at global stream position `cursor`.
    """

    def __init__(self, n: int, global_batch: int, grad_accum: int, rank: int, world: int, seed: int,
                 cursor: int = 0):
        if n < 1:
            raise ValueError(f"dataset is empty (n={n})")
        if global_batch % (grad_accum * world):
            raise ValueError(f"global batch {global_batch} not divisible by grad_accum * world = {grad_accum * world}")
        self.n, self.global_batch, self.grad_accum = n, global_batch, grad_accum
        self.rank, self.world, self.seed, self.cursor = rank, world, seed, cursor
        self.micro = global_batch // grad_accum  # one micro-batch over all ranks
        self.local = self.micro // world

    def __iter__(self):
        cache, pos = {}, self.cursor
        while True:
            for m in range(self.grad_accum):
                start = pos + m * self.micro + self.rank * self.local
                yield stream_slice(self.n, self.seed, start, self.local, cache)
            pos += self.global_batch
