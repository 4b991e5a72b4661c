"""Deterministic, resumable data order, sharded across processes.

The global index stream is the concatenation perm_0 ++ perm_1 ++ ... of seeded permutations
of the dataset (perm_e depends only on (seed, e)). Optimizer step s consumes the next
`global_batch` entries of the stream starting at a global cursor; inside the step,
micro-batch m of rank r takes entries

    cursor + m * global_batch / grad_accum + r * b  ...  + b,   b = global_batch / (grad_accum * world)

so the samples of a step, and the cursor, do not depend on the number of processes: a run
checkpointed on N processes continues exactly (mid-epoch) on M.

`SeededSamples` makes every random draw of a training sample (the dataset's flip and latent
posterior sample, the flow's noise x0 and time t, the VAE's posterior sample) a function of
(seed, the sample's stream position) alone, so they do not depend on the process count either.
"""
from __future__ import annotations

import numpy as np
import torch


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
    `grad_accum` per optimizer step, starting at global stream position `cursor`. With
    `positions=True` each entry is `(stream position, index)` (for `SeededSamples`).
    """

    def __init__(self, n: int, global_batch: int, grad_accum: int, rank: int, world: int, seed: int,
                 cursor: int = 0, positions: bool = False):
        if n < 1:
            raise ValueError(f"dataset is empty (n={n})")
        if global_batch % (grad_accum * world):
            raise ValueError(f"global batch {global_batch} not divisible by grad_accum * world = {grad_accum * world}")
        self.n, self.global_batch, self.grad_accum = n, global_batch, grad_accum
        self.rank, self.world, self.seed, self.cursor, self.positions = rank, world, seed, cursor, positions
        self.micro = global_batch // grad_accum  # one micro-batch over all ranks
        self.local = self.micro // world

    def __iter__(self):
        cache, pos = {}, self.cursor
        while True:
            for m in range(self.grad_accum):
                start = pos + m * self.micro + self.rank * self.local
                indices = stream_slice(self.n, self.seed, start, self.local, cache)
                yield list(enumerate(indices, start)) if self.positions else indices
            pos += self.global_batch


def sample_seeds(seed: int, position: int) -> tuple[int, int]:
    """Two 63-bit seeds (the dataset's draws, the noise) that are a pure function of (seed, position)."""
    a, b = np.random.SeedSequence([seed, position]).generate_state(2, np.uint64) >> np.uint64(1)
    return int(a), int(b)


class SeededSamples(torch.utils.data.Dataset):
    """`dataset[(position, index)] -> (x, y, draws)`: record `index` of `dataset`, drawn as the
    training sample at stream `position` (from `ResumableBatchSampler(..., positions=True)`).

    The dataset's own random draws (torch's global CPU RNG: flips, latent posterior samples) run
    under the first seed of `sample_seeds(seed, position)`, and that RNG is restored afterwards;
    `draws` holds the sample's noise from a generator under the second: `t` () from
    `time_fn(1, generator=g)`, `x0` of `noise_shape` (default: the shape of x), and `eps` of
    `noise_shape` for an on-the-fly VAE posterior sample when `vae_eps`. Drawn on the CPU: the
    same numbers on every device and process count.
    """

    def __init__(self, dataset, seed: int, time_fn, noise_shape=None, vae_eps: bool = False):
        self.dataset, self.seed, self.time_fn = dataset, seed, time_fn
        self.noise_shape, self.vae_eps = (tuple(noise_shape) if noise_shape else None), vae_eps

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        position, index = key
        data_seed, noise_seed = sample_seeds(self.seed, position)
        cpu = torch.default_generator  # not torch.manual_seed: that also seeds every device (~0.4 ms)
        saved = cpu.get_state()
        try:
            cpu.manual_seed(data_seed)
            x, y = self.dataset[index]
        finally:
            cpu.set_state(saved)
        g = torch.Generator().manual_seed(noise_seed)
        shape = self.noise_shape or tuple(x.shape)
        draws = {"t": self.time_fn(1, generator=g)[0], "x0": torch.randn(shape, generator=g)}
        if self.vae_eps:
            draws["eps"] = torch.randn(shape, generator=g)
        return x, y, draws
