"""arcee.metrics.causality (per-position loss, anticausal sensitivity), the mirrored digits and the
mirror experiment (scripts/mirror_repro.py) end to end at a few steps."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arcee.flow import build_transport
from arcee.metrics import causality
from arcee.models.scan_orders import get_scan_orders
from arcee.models.zigma import ZigMa

ROOT = Path(__file__).resolve().parents[1]


def tiny(chain: str, num_orders: int = 1, seed: int = 0) -> ZigMa:
    """An 8x8x1 ZigMa (16 tokens) with every parameter randomised (adaLN-Zero and the zero-initialised
    final layer would otherwise make the output, and its Jacobian, identically zero)."""
    torch.manual_seed(seed)
    m = ZigMa(image_size=8, in_channels=1, patch_size=2, width=16, depth=3, d_state=4, num_orders=num_orders,
              state_chain=chain)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


def fd_token_norms(model, x, t, path, eps=1e-2):
    """Token-block Jacobian norms by central finite differences (float64 arithmetic on the outputs)."""
    D = x.numel()
    cols = []
    with torch.no_grad():
        for b in range(D):
            e = torch.zeros(D)
            e[b] = eps
            e = e.view_as(x)
            cols.append((model(x + e, t).double() - model(x - e, t).double()).flatten() / (2 * eps))
    J = torch.stack(cols, dim=1)                                        # (D out, D in)
    tok = causality.to_tokens(torch.arange(D).view_as(x), 2)[0]           # (L, 4) pixel ids per token
    S = torch.stack([torch.stack([J[tok[a]][:, tok[b]].norm() for b in range(len(tok))]) for a in range(len(tok))])
    return S[path][:, path]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_one_path_is_exactly_causal_and_arcee_is_not(backend):
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.8])
    z1, arcee = tiny("none"), tiny("arcee")
    path = causality.analysis_path(z1)
    assert torch.equal(path, get_scan_orders("zigzag", 4, 4)[0])

    S = causality.token_sensitivity(z1, x, t, path, backend=backend)
    assert S.shape == (2, 16, 16)
    upper = torch.triu(torch.ones(16, 16, dtype=torch.bool), 1)
    assert (S[:, upper] == 0).all()                                       # exactly, not approximately
    assert (S[:, upper.T] > 0).float().mean() > 0.9 and (S.diagonal(dim1=1, dim2=2) > 0).all()
    s = causality.sensitivity_summary(S)
    assert s["anticausal"] == 0.0 and s["anticausal_ratio"] == 0.0 and s["causal"] > 0
    # read along the reversed path the same model is exactly anticausal instead
    back = causality.sensitivity_summary(causality.token_sensitivity(z1, x, t, path.flip(0), backend=backend))
    assert back["causal"] == 0.0 and back["anticausal"] > 0

    sa = causality.sensitivity_summary(causality.token_sensitivity(arcee, x, t, path, backend=backend))
    assert sa["anticausal"] > 1e-3 * sa["causal"] and sa["first_token_last_ratio"] > 0
    # with two paths (the second the column snake) the model is not causal along path 0 either
    assert causality.sensitivity_summary(causality.token_sensitivity(tiny("none", 2), x, t, path))["anticausal"] > 0


def test_sensitivity_matches_finite_differences():
    model = tiny("arcee", seed=1)
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([0.6])
    path = causality.analysis_path(model)
    got = causality.token_sensitivity(model, x, t, path, chunk=24)[0]     # chunks that do not divide D
    want = fd_token_norms(model, x, t, path)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3 * float(want.max()))


def test_position_loss_matches_float64_formula():
    g = torch.Generator().manual_seed(5)
    x1 = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    w = torch.randn(64, 64, generator=g) / 8

    class Linear(torch.nn.Module):  # any deterministic function of (x_t, t)
        patch_size = 2

        def forward(self, x, t):
            return (x.flatten(1) @ w.to(x.dtype)).view_as(x) * (1 + t.view(-1, 1, 1, 1)) - 0.2

    model, transport = Linear(), build_transport({"path": "linear"})
    draws = causality.fixed_draws(tuple(x1.shape), 3)
    path = get_scan_orders("zigzag", 4, 4)[0]
    got = causality.position_loss(model, transport, x1, draws, path, batch_size=4)
    want = torch.zeros(4, 4, dtype=torch.float64)                        # (token row, token column)
    for t, x0 in draws:   # linear path: x_t = t x1 + (1 - t) x0, target x1 - x0
        td, x0d, x1d = t.double().view(-1, 1, 1, 1), x0.double(), x1.double()
        err = (model(td * x1d + (1 - td) * x0d, t.double()) - (x1d - x0d)).square()
        for r in range(4):
            for c in range(4):
                want[r, c] += err[:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean(dim=(1, 2, 3)).sum()
    want = want.flatten()[path] / (len(x1) * len(draws))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert causality.quarters(got) == pytest.approx([float(q.mean()) for q in want.view(4, 4)], rel=1e-6)
    loss = torch.cat([transport.training_loss(model, x1, x0=x0, t=t) for t, x0 in draws]).double().mean()
    assert float(got.mean()) == pytest.approx(float(loss), rel=1e-5)     # the mean is the usual loss


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("arcee_cache")
        mp.setenv("ARCEE_CACHE", str(path))
        mp.setenv("OMP_NUM_THREADS", "1")
        yield path


def test_mirrored_digits(cache):
    from arcee.data import build_dataset, digit_sources

    cfg = {"name": "digits_mirrored", "path": None, "kind": "pixel", "image_size": 16, "channels": 1,
           "num_classes": 0, "val_fraction": 0.1}
    ds = build_dataset(cfg, split="all")
    assert len(ds) == 1797 and ds.root.parent == cache
    x = torch.stack([ds[i][0] for i in range(len(ds))])                  # (n, 1, 16, 16) in [-1, 1]
    assert torch.equal(x[:, :, :8], x[:, :, 8:].flip(2))                 # rows 0-7 mirror rows 8-15
    # along zigzag path 0 (patch 2, 64 tokens) the first 32 tokens are a fixed function of the last 32:
    # token at position a = the token at position 63 - a with its two pixel rows swapped
    tokens = causality.to_tokens(x, 2)[:, get_scan_orders("zigzag", 8, 8)[0]]    # (n, 64, 4): (p q) pixels
    swapped = tokens[:, 32:].flip(1).view(-1, 32, 2, 2).flip(2).reshape(-1, 32, 4)
    assert torch.equal(tokens[:, :32], swapped)
    # the bottom half is the digit: averaging column pairs of it gives back the 8x8 original
    src = digit_sources()
    bottom = ((x[:, 0, 8:] + 1) * 127.5).view(-1, 8, 8, 2).mean(-1).numpy()
    orig = np.stack([img for _, _, img in src]).astype(np.float64)
    corr = np.corrcoef(bottom.reshape(len(x), -1).ravel(), orig.reshape(len(x), -1).ravel())[0, 1]
    assert corr > 0.95
    # same labels and the same val split as data=digits
    digits = build_dataset({**cfg, "name": "digits"}, split="val")
    val = build_dataset(cfg, split="val")
    assert np.array_equal(val.indices, digits.indices) and np.array_equal(ds.labels, [lab for _, lab, _ in src])
    with pytest.raises(ValueError, match="digits_mirrored"):
        build_dataset({**cfg, "name": "nope"})


def load_script():
    spec = importlib.util.spec_from_file_location("mirror_repro", ROOT / "scripts" / "mirror_repro.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mirror_error():
    mod = load_script()
    x = np.random.default_rng(0).integers(0, 256, size=(5, 8, 6, 1)).astype(np.uint8)
    x[:, :4] = x[:, 4:][:, ::-1]
    assert mod.mirror_error(x)["rms"] == 0.0 and mod.mirror_error(x)["rms_unrelated"] > 0
    y = x.copy()
    y[:, 0] = 255 - y[:, 0]
    d = (y[:, 0].astype(np.float64) - x[:, 0]) / 127.5                    # only row 0 differs from its mirror
    want = np.sqrt((d ** 2).sum(axis=(1, 2)) / (4 * 6)).mean()
    assert mod.mirror_error(y)["rms"] == pytest.approx(want)


def test_mirror_experiment_end_to_end(cache, tmp_path):
    mod = load_script()
    out, docs = tmp_path / "runs", tmp_path / "docs"
    argv = ["--steps", "2", "--ckpt-every", "1", "--seeds", "0", "--num-samples", "4", "--sample-steps", "1",
            "--loss-repeats", "1", "--points", "1", "--jobs", "1", "--out", str(out), "--docs", str(docs)]
    result = mod.main(argv)
    saved = json.loads((docs / "results.json").read_text())
    assert [(r["variant"], r["seed"], r["step"]) for r in saved["runs"]] == [
        ("zigma1", 0, 2), ("zigma1_arcee", 0, 2), ("sweep2", 0, 2)]
    for r in saved["runs"]:
        assert [o["step"] for o in r["over_training"]] == [1, 2]          # every checkpoint was read
        assert len(r["quarter_loss"]) == 4 and math.isfinite(r["heldout_loss"])
        assert r["heldout_loss"] == pytest.approx(np.mean(r["position_loss"]))
        assert 0 <= r["mirror"]["rms"] and math.isfinite(r["mirror"]["ratio"])
        anti = [o["sensitivity"]["anticausal"] for o in r["over_training"]]
        if r["variant"] == "zigma1":
            assert anti == [0.0, 0.0]                                     # exactly causal at every step
        else:  # (after step 1 only the zero-initialised final layer has moved: the blocks' gates are still 0)
            assert anti[-1] > 0
    assert saved["paired"]["Zigma-1 + Arcee - Zigma-1"]["heldout_loss"] == [
        saved["runs"][1]["heldout_loss"] - saved["runs"][0]["heldout_loss"]]
    md = (docs / "results.md").read_text()
    assert "| Zigma-1 + Arcee |" in md and saved["command"] in md
    for png in ("results.png", "samples.png"):
        with Image.open(docs / png) as im:
            assert im.format == "PNG" and im.size[0] > 100
    (docs / "results.md").unlink()
    assert mod.main(argv + ["--report-only"])["runs"] == saved["runs"]
    assert (docs / "results.md").read_text() == md
    assert result["runs"][0]["heldout_loss"] == saved["runs"][0]["heldout_loss"]


def test_cli(cache, tmp_path, capsys):
    model = tiny("arcee")
    from omegaconf import OmegaConf

    from arcee.sample import save_generator

    cfg = OmegaConf.create({"model": {"name": "zigma_xs", "image_size": 8, "in_channels": 1, "patch_size": 2,
                                      "width": 16, "depth": 3, "d_state": 4, "num_orders": 1, "state_chain": "arcee"},
                            "data": {"name": "digits_mirrored", "path": None, "kind": "pixel", "image_size": 8,
                                     "channels": 1, "num_classes": 0, "val_fraction": 0.1},
                            "flow": {"path": "linear"}})
    ckpt = tmp_path / "m.safetensors"
    save_generator(ckpt, model.state_dict(), cfg, step=7)
    res = causality.main([f"ckpt={ckpt}", "repeats=1", "points=1", f"plot={tmp_path / 'c.png'}",
                          f"json={tmp_path / 'c.json'}"])
    assert "anticausal" in capsys.readouterr().out and res[0]["sensitivity"]["anticausal"] > 0
    assert json.loads((tmp_path / "c.json").read_text())[0]["quarter_loss"] == res[0]["quarter_loss"]
    assert (tmp_path / "c.png").is_file()
    with pytest.raises(SystemExit, match="ckpt= is required"):
        causality.main([])
    with pytest.raises(SystemExit, match="unknown argument 'bogus'"):
        causality.main(["bogus"])
