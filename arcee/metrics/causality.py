"""Causality along a scan path: where a model's loss sits on the path, and whether tokens see ahead.

A ZigMa with one scan path and no state chain is strictly causal along that path: output token i
depends on input tokens j <= i only. The Arcee chain hands block k's final state to block k+1, so
every token of block k+1 can see every token of block k: the model is no longer causal.

    path = analysis_path(model)                              # (L,) token ids: the model's first path
    draws = fixed_draws(x_val.shape, repeats=4)              # [(t (n,), x0 (n, C, H, W))], seeded
    loss = position_loss(model, transport, x_val, draws, path)   # (L,) float64, mean = held-out loss
    S = token_sensitivity(model, x_t, t, path)               # (n, L, L): ||d v_a / d x_b||_F per token block
    sensitivity_summary(S)                                   # anticausal (b > a) vs causal (b < a) norms
    analyze(model, cfg, x_val)                               # all of it, with the checkpoint's transport

Tokens are the model's patches (p x p x C values); positions a, b are positions along `path`.
The Jacobian is exact (autograd, one reverse pass per output value, batched), so structural zeros
stay exactly 0.0 (the scan's backward gets exact zeros past the output token, on the "cpu" and the
"reference" backends alike; tests/test_causality.py checks both): for a one-path model without the
chain the anticausal part is exactly zero, not merely small.

CLI (prints a table, writes a plot and a JSON):

    python -m arcee.metrics.causality ckpt=runs/x/ema_final.safetensors [ckpt=...] [split=val]
        [repeats=4] [points=4] [seed=1234] [path=zigzag:0] [plot=causality.png] [json=causality.json]
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor

LOSS_SEED = 1234   # the held-out (t, noise) draws: the same generator as scripts/digits_repro.py
POINT_SEED = 4321  # the noise of the sensitivity points


def analysis_path(model) -> Tensor:
    """The model's first scan path (k = 1: the model-wide path; else block 0's path): LongTensor (L,)."""
    path = getattr(model, "path", None)
    if path is None:
        path = model.blocks[0].path
    return path.detach().cpu().long()


def fixed_draws(shape, repeats: int, seed: int = LOSS_SEED) -> list[tuple[Tensor, Tensor]]:
    """`repeats` fixed (t: (n,), x0: shape) draws; the same for every model (and digits_repro's)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(shape[0], generator=g), torch.randn(shape, generator=g)) for _ in range(repeats)]


def to_tokens(x: Tensor, patch_size: int) -> Tensor:
    """(b, C, H, W) -> (b, L, p*p*C) in row-major token order (the model's patch order)."""
    return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


@torch.no_grad()
def position_loss(model, transport, x1: Tensor, draws, path: Tensor, patch_size: int | None = None,
                  batch_size: int = 256) -> Tensor:
    """Held-out velocity MSE per position along `path`: float64 (L,), averaged over the images x1,
    the draws and each token's p*p*C values (so its mean is the usual per-image loss)."""
    p = patch_size or model.patch_size
    interp = transport.interpolant
    total = torch.zeros(len(path), dtype=torch.float64)
    count = 0
    for t, x0 in draws:
        for i in range(0, len(x1), batch_size):
            sl = slice(i, i + batch_size)
            xt = interp.interpolate(x0[sl], x1[sl], t[sl])
            err = (model(xt, t[sl]).double() - interp.velocity(x0[sl], x1[sl], t[sl]).double()).square()
            total += to_tokens(err, p).mean(-1).sum(0)[path]
            count += len(x1[sl])
    return total / count


def quarters(values: Tensor) -> list[float]:
    """Means of the four quarters of a per-position vector (L divisible by 4)."""
    return [float(q.mean()) for q in values.reshape(4, -1)]


@contextlib.contextmanager
def scan_backend(model, backend: str | None):
    """Temporarily run every Mamba mixer of `model` on the scan backend `backend` (None: unchanged)."""
    from arcee.models.mamba import Mamba

    mixers = [m for m in model.modules() if isinstance(m, Mamba)]
    saved = [m.scan_backend for m in mixers]
    try:
        if backend is not None:
            for m in mixers:
                m.scan_backend = backend
        yield model
    finally:
        for m, b in zip(mixers, saved):
            m.scan_backend = b


def token_sensitivity(model, x: Tensor, t: Tensor, path: Tensor, patch_size: int | None = None,
                      chunk: int = 256, backend: str | None = None) -> Tensor:
    """Exact token-block Jacobian norms: (n, L, L) float64, [k, a, b] = ||d v(x_k)[path[a]] / d x_k[path[b]]||_F.

    x: (n, C, H, W) inputs (e.g. x_t), t: (n,). Each of the D = C*H*W output values of a point gets
    its own batch row (rows are independent in the model), so one backward pass gives D Jacobian rows.
    backend: the scan backend to use (None: the model's own; "reference" = autograd over time steps).
    """
    p = patch_size or model.patch_size
    n, D = x.shape[0], x[0].numel()
    # pixel -> token id (row-major tokens), as a (D, L) 0/1 matrix: token blocks by matrix products
    tok = to_tokens(torch.arange(D, dtype=torch.float64).view(1, *x.shape[1:]), p)[0].long()  # (L, p*p*C)
    L = tok.shape[0]
    member = torch.zeros(D, L, dtype=torch.float64)
    member[tok.flatten(), torch.arange(L).repeat_interleave(tok.shape[1])] = 1.0
    out = torch.empty(n, L, L, dtype=torch.float64)
    eye = torch.eye(D, dtype=x.dtype).view(D, *x.shape[1:])
    with scan_backend(model, backend), torch.enable_grad():
        for k in range(n):
            rows = []
            for i in range(0, D, chunk):
                m = min(chunk, D - i)
                xs = x[k:k + 1].detach().expand(m, *x.shape[1:]).clone().requires_grad_(True)
                v = model(xs, t[k:k + 1].expand(m))
                (g,) = torch.autograd.grad((v * eye[i:i + m]).sum(), xs)
                rows.append(g.reshape(m, D).double())
            J2 = torch.cat(rows).square()                     # (D out, D in)
            S = (member.T @ J2 @ member).sqrt()                # (L out, L in), row-major tokens
            out[k] = S[path][:, path]
    return out


def sensitivity_summary(S: Tensor) -> dict:
    """S: (n, L, L) or (L, L) token-block norms along a path (rows: outputs a, columns: inputs b).
    Norms are root-sum-squares over the blocks (and root-mean-squares over points)."""
    S2 = S.square().mean(0) if S.dim() == 3 else S.square()
    L = S2.shape[0]
    upper = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    anti, causal, diag = (float(S2[upper].sum().sqrt()), float(S2[upper.T].sum().sqrt()),
                          float(S2.diagonal().sum().sqrt()))
    first = S2[0].sqrt()

    def ratio(a, b):
        return a / b if b > 0 else (0.0 if a == 0 else math.inf)

    return {"anticausal": anti, "causal": causal, "diagonal": diag, "anticausal_ratio": ratio(anti, causal),
            "first_token_last_ratio": ratio(float(first[-1]), float(first[0])),
            "first_token_anticausal_ratio": ratio(float(first[1:].square().sum().sqrt()), float(first[0])),
            "first_half_from_second_half": ratio(float(S2[: L // 2, L // 2:].sum().sqrt()),
                                                 float(S2[: L // 2, : L // 2].sum().sqrt()))}


def sensitivity_points(x1: Tensor, points: int, transport, seed: int = POINT_SEED) -> tuple[Tensor, Tensor]:
    """The first `points` images of x1 noised to t_k = (k + 0.5) / points with seeded noise: (x_t, t)."""
    x1 = x1[:points]
    t = (torch.arange(len(x1), dtype=torch.float32) + 0.5) / len(x1)
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(seed))
    return transport.interpolant.interpolate(x0, x1, t).to(x1.dtype), t


def analyze(model, cfg, x_val: Tensor, path: Tensor | None = None, repeats: int = 4, points: int = 4,
            seed: int = LOSS_SEED, loss: bool = True) -> dict:
    """Sensitivity summary (and, with `loss`, the per-position / per-quarter held-out loss) of `model`
    (cfg: its config, for the transport) on the val images x_val, along `path` (default: its first path)."""
    from arcee.flow import build_transport

    transport = build_transport(cfg.flow)
    path = analysis_path(model) if path is None else path
    model.eval()
    out = {}
    if loss:
        pos = position_loss(model, transport, x_val, fixed_draws(tuple(x_val.shape), repeats, seed), path)
        out.update(loss=float(pos.mean()), quarter_loss=quarters(pos), position_loss=pos.tolist())
    xt, t = sensitivity_points(x_val, points, transport)
    S = token_sensitivity(model, xt, t, path)
    out.update(sensitivity=sensitivity_summary(S), sensitivity_map=S.square().mean(0).sqrt().tolist())
    return out


# ----------------------------------------------------------------------------- CLI


def parse_path(spec: str, grid) -> Tensor:
    """'zigzag:0' -> path 0 of the zigzag order on `grid`."""
    from arcee.models.scan_orders import get_scan_orders

    name, _, i = spec.partition(":")
    paths = get_scan_orders(name, *grid)
    i = int(i or 0)
    if not 0 <= i < len(paths):
        raise ValueError(f"path={spec}: scan order {name!r} has paths 0..{len(paths) - 1}")
    return paths[i]


def plot(results: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from arcee.io import atomic_write_bytes

    n = len(results)
    fig, axes = plt.subplots(1, n + 1, figsize=(4.2 * (n + 1), 3.8), dpi=110, squeeze=False)
    ax = axes[0, 0]
    for r in results:
        ax.plot(r["position_loss"], lw=1, label=Path(r["ckpt"]).parent.name + "/" + Path(r["ckpt"]).name)
    ax.set_xlabel("position along the path", fontsize=8)
    ax.set_title("held-out FM loss per path position", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    for ax, r in zip(axes[0, 1:], results):
        S = np.asarray(r["sensitivity_map"])
        im = ax.imshow(np.log10(S / S.max() + 1e-12), vmin=-8, vmax=0, cmap="viridis")
        ax.set_title(f"log10 |dv_a/dx_b| (anticausal ratio {r['sensitivity']['anticausal_ratio']:.2g})", fontsize=8)
        ax.set_xlabel("input position b", fontsize=8)
        ax.set_ylabel("output position a", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())


USAGE = ("usage: python -m arcee.metrics.causality ckpt=PATH [ckpt=PATH ...] [split=val] [repeats=4] [points=4] "
         "[seed=1234] [path=zigzag:0] [plot=FILE.png] [json=FILE.json]")


def main(argv=None) -> list[dict]:
    from arcee.data import build_dataset
    from arcee.io import atomic_write_bytes
    from arcee.sample import load_generator

    opts = {"ckpt": [], "split": "val", "repeats": "4", "points": "4", "seed": str(LOSS_SEED), "path": None,
            "plot": None, "json": None}
    for arg in sys.argv[1:] if argv is None else argv:
        key, eq, value = arg.partition("=")
        if not eq or key not in opts:
            raise SystemExit(f"unknown argument {arg!r}\n{USAGE}")
        if key == "ckpt":
            opts["ckpt"].append(value)
        else:
            opts[key] = value
    if not opts["ckpt"]:
        raise SystemExit(f"ckpt= is required (a checkpoint folder or .safetensors export)\n{USAGE}")
    try:
        repeats, points, seed = int(opts["repeats"]), int(opts["points"]), int(opts["seed"])
    except ValueError:
        raise SystemExit(f"repeats, points and seed must be integers\n{USAGE}") from None
    results = []
    for ckpt in opts["ckpt"]:
        model, cfg = load_generator(ckpt, use_ema=True)
        ds = build_dataset(cfg.data, split=opts["split"])
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        path = parse_path(opts["path"], model.grid) if opts["path"] else None
        r = {"ckpt": ckpt, **analyze(model, cfg, x, path, repeats, points, seed)}
        results.append(r)
        s = r["sensitivity"]
        print(f"{ckpt}: held-out loss {r['loss']:.4f} (quarters " + ", ".join(f"{q:.4f}" for q in r["quarter_loss"])
              + f"); anticausal {s['anticausal']:.3g} vs causal {s['causal']:.3g} (ratio {s['anticausal_ratio']:.3g}); "
              f"first token: last/self {s['first_token_last_ratio']:.3g}, ahead/self "
              f"{s['first_token_anticausal_ratio']:.3g}")
    if opts["json"]:
        atomic_write_bytes(Path(opts["json"]), json.dumps(results, indent=1).encode())
    if opts["plot"]:
        plot(results, Path(opts["plot"]))
    return results


if __name__ == "__main__":
    main()
