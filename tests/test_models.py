"""arcee.models: scan orders, the Mamba mixer against a float64 loop, the ZigMa backbone and
the Arcee state chain, presets and config loading, bad input."""
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from arcee.models import build_model, get_scan_orders
from arcee.models.embeddings import sincos_2d
from arcee.models.mamba import Mamba
from arcee.models.scan_orders import SCAN_ORDERS, inverse

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VARIANTS = {  # the paper's table: overrides on a preset
    "k1": dict(num_orders=1), "k2": dict(num_orders=2), "k4": dict(num_orders=4), "k8": dict(num_orders=8),
    "vim": dict(scan_order="raster", num_orders=1, bidirectional=True),
}


def tiny(**overrides):
    """A tiny model on 1x8x8 images (4x4 tokens) for fast CPU tests."""
    cfg = dict(image_size=8, in_channels=1, patch_size=2, width=16, depth=4, d_state=4, expand=2,
               d_conv=4, dt_rank="auto", scan_order="zigzag", num_orders=4, state_chain="none")
    cfg.update(overrides)
    return build_model(cfg)


def randomize_(model, std=0.2):
    """Replace the zero initialisations (adaLN-Zero, final layer) so every block matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "final" in name:
                p.normal_(0, std)
    return model


# ----------------------------------------------------------------------------- scan orders

def test_zigzag_small_grid_by_hand():
    # 2x3 grid   0 1 2
    #            3 4 5      corners TL, TR, BL, BR; per corner row-snake then column-snake
    expected = [[0, 1, 2, 5, 4, 3], [0, 3, 4, 1, 2, 5], [2, 1, 0, 3, 4, 5], [2, 5, 4, 1, 0, 3],
                [3, 4, 5, 2, 1, 0], [3, 0, 1, 4, 5, 2], [5, 4, 3, 0, 1, 2], [5, 2, 1, 4, 3, 0]]
    assert get_scan_orders("zigzag", 2, 3).tolist() == expected


@pytest.mark.parametrize("H, W", [(1, 1), (1, 5), (4, 4), (5, 5), (3, 6), (7, 2), (16, 16)])
def test_zigzag_paths_are_hamiltonian_with_4_neighbour_steps(H, W):
    paths = get_scan_orders("zigzag", H, W)
    assert paths.shape == (8, H * W) and paths.dtype == torch.long
    for p in paths:
        assert sorted(p.tolist()) == list(range(H * W))  # a bijection
        r, c = p // W, p % W
        assert ((r.diff().abs() + c.diff().abs()) == 1).all()  # every step to a 4-neighbour
    corners = [0, W - 1, (H - 1) * W, H * W - 1]  # TL, TR, BL, BR
    assert paths[:, 0].tolist() == [x for x in corners for _ in range(2)]


@pytest.mark.parametrize("N", [2, 4, 8, 16])
def test_zigzag_reversal_pairs_for_even_grids(N):
    paths = get_scan_orders("zigzag", N, N)
    for a, b in [(0, 4), (1, 3), (2, 6), (5, 7)]:
        assert torch.equal(paths[a].flip(0), paths[b])


def test_raster_and_sweep():
    assert get_scan_orders("raster", 3, 4).tolist() == [list(range(12))]
    assert get_scan_orders("sweep", 3, 4).tolist() == [list(range(12)), list(range(11, -1, -1))]


def test_unknown_scan_order_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown scan order 'hilbert'.*zigzag"):
        get_scan_orders("hilbert", 4, 4)
    with pytest.raises(ValueError, match="unknown scan order.*raster"):
        tiny(scan_order="spiral")


@pytest.mark.parametrize("name", sorted(SCAN_ORDERS))
def test_gather_scatter_round_trip(name):
    x = torch.randn(2, 12, 3)
    for p in get_scan_orders(name, 3, 4):
        assert torch.equal(x[:, p][:, inverse(p)], x)
        assert torch.equal(x[:, inverse(p)][:, p], x)


def test_block_scans_along_its_path():
    """A (forward) Mamba block is causal along its scan path: perturbing the token at path
    position j changes the outputs at path positions >= j only."""
    model = randomize_(tiny(num_orders=8, depth=8)).eval()
    x = torch.randn(2, 16, 16)
    c = torch.randn(2, 16)
    for block in model.blocks[:8]:
        p, j = block.path, 6
        x2 = x.clone()
        x2[:, p[j]] += 1.0
        changed = (block(x2, c)[0] - block(x, c)[0]).abs().amax(dim=(0, 2))[p]  # in path order
        assert (changed[:j] == 0).all() and (changed[j:] > 0).all()


@pytest.mark.parametrize("block", ["prenorm", "paper"])
def test_permute_once_for_k1_equals_gather_in_every_block(block):
    once = randomize_(tiny(num_orders=1, state_chain="arcee", block=block)).eval()
    per_block = copy.deepcopy(once)
    path = once.path
    per_block.path = per_block.inverse = None
    for block in per_block.blocks:
        block.path, block.inverse = path, inverse(path)
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    torch.testing.assert_close(once(x, t), per_block(x, t))


# ----------------------------------------------------------------------------- the mixer

def mamba_loop(m: Mamba, x, h0):
    """Float64 per-time-step Mamba mixer built from the module's weights (the oracle)."""
    b, l, _ = x.shape
    d, n, K = m.d_inner, m.d_state, m.conv1d.kernel_size[0]
    xi, z = (x @ m.in_proj.weight.T).split(d, dim=-1)  # (b, l, d)
    y_sum, h_T = 0, []
    for k in range(m.n_dir):
        u_in, zk = (xi, z) if k == 0 else (xi.flip(1), z.flip(1))
        ch = slice(k * d, (k + 1) * d)
        w, cb = m.conv1d.weight[ch, 0], m.conv1d.bias[ch]  # (d, K)
        u = torch.stack([cb + sum(w[:, i] * u_in[:, t - K + 1 + i] for i in range(K) if t - K + 1 + i >= 0)
                         for t in range(l)], dim=1)
        u = F.silu(u)
        dt, B, C = (u @ m.x_proj[k].weight.T).split([m.dt_rank, n, n], dim=-1)
        delta = F.softplus(dt @ m.dt_proj[k].weight.T + m.dt_proj[k].bias)  # (b, l, d)
        A, D = -torch.exp(m.A_log[ch]), m.D[ch]
        h = torch.zeros(b, d, n, dtype=x.dtype) if h0 is None else h0[:, ch]
        ys = []
        for t in range(l):
            h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
            ys.append(((h * C[:, t, None, :]).sum(-1) + D * u[:, t]) * F.silu(zk[:, t]))
        y = torch.stack(ys, dim=1)
        y_sum = y_sum + (y if k == 0 else y.flip(1))
        h_T.append(h)
    return y_sum @ m.out_proj.weight.T, torch.cat(h_T, dim=1)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_mamba_mixer_matches_float64_loop(bidirectional, with_h0):
    m = Mamba(8, d_state=4, expand=2, bidirectional=bidirectional).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    h0 = torch.randn(2, m.n_dir * m.d_inner, 4, dtype=torch.float64) if with_h0 else None
    y, h_T = m(x, h0)
    y_ref, h_T_ref = mamba_loop(m, x, h0)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h_T, h_T_ref)


def test_mamba_init():
    m = Mamba(64, d_state=16)
    assert m.dt_rank == 4 and m.d_inner == 128
    torch.testing.assert_close(-torch.exp(m.A_log), -torch.arange(1.0, 17).expand(128, 16))  # S4D-real
    dt = F.softplus(m.dt_proj[0].bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert torch.equal(m.D, torch.ones(128))


def test_sincos_2d_closed_form():
    H, W, dim = 3, 5, 8
    emb = sincos_2d(H, W, dim)
    r, c = 2, 3
    w = [10000 ** (-i / 2) for i in range(2)]  # dim/4 = 2 frequencies per axis
    expected = [math.cos(r * w[0]), math.cos(r * w[1]), math.sin(r * w[0]), math.sin(r * w[1]),
                math.cos(c * w[0]), math.cos(c * w[1]), math.sin(c * w[0]), math.sin(c * w[1])]
    torch.testing.assert_close(emb[r * W + c], torch.tensor(expected))


# ----------------------------------------------------------------------------- the backbone

@pytest.mark.parametrize("overrides", [
    dict(), dict(num_orders=1), dict(state_chain="arcee", num_orders=8, depth=3),
    dict(scan_order="raster", num_orders=1, bidirectional=True, state_chain="arcee"),
    dict(scan_order="sweep", num_orders=2), dict(num_classes=10),
    dict(image_size=[8, 12], in_channels=3, state_chain="arcee"),  # non-square, RGB
])
@pytest.mark.parametrize("block", ["prenorm", "paper"])
def test_output_shape_equals_input_shape(overrides, block):
    model = tiny(block=block, **overrides)
    C, (H, W) = model.in_channels, model.image_size
    x = torch.randn(2, C, H, W)
    y = torch.tensor([3, 10]) if overrides.get("num_classes") else None
    out = model(x, torch.rand(2), y)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert (out == 0).all()  # adaLN-Zero: the untrained model predicts zero


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("block", ["prenorm", "paper"])
def test_arcee_adds_no_parameters(variant, block):
    none, arcee = (tiny(state_chain=s, depth=8, block=block, **VARIANTS[variant]) for s in ("none", "arcee"))
    shapes = lambda m: [(k, tuple(p.shape)) for k, p in m.named_parameters()]
    assert shapes(none) == shapes(arcee)


def test_zigma_b2_parameter_count():
    cfg = OmegaConf.load(CONFIGS / "model" / "zigma_b2.yaml")
    with torch.device("meta"):
        counts = [sum(p.numel() for p in build_model(OmegaConf.merge(cfg, dict(state_chain=s))).parameters())
                  for s in ("none", "arcee")]
    assert counts[0] == counts[1]
    assert abs(counts[0] - 161.8e6) <= 0.01 * 161.8e6, counts


def capture_states(model):
    """Record (h0, h_T) of every block's mixer on the next forward."""
    seen = []
    for block in model.blocks:
        block.mixer.register_forward_hook(lambda mod, args, out: seen.append((args[1], out[1])))
    return seen


def test_state_chain_none_starts_every_block_at_zero():
    model = randomize_(tiny(state_chain="none"))
    seen = capture_states(model)
    model(torch.randn(2, 1, 8, 8), torch.rand(2))
    assert len(seen) == 4 and all(h0 is None for h0, _ in seen)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("block", ["prenorm", "paper"])
def test_arcee_chain_passes_each_final_state_on(bidirectional, block):
    model = randomize_(tiny(state_chain="arcee", bidirectional=bidirectional, block=block))
    seen = capture_states(model)
    model(torch.randn(2, 1, 8, 8), torch.rand(2))
    assert seen[0][0] is None  # block 0 starts at zero
    for (_, h_T), (h0, _) in zip(seen, seen[1:]):
        assert h0.dtype == torch.float32 and torch.equal(h0, h_T)  # identity boundary map
        assert h0.shape == (2, (2 if bidirectional else 1) * 32, 4)


@pytest.mark.parametrize("variant, block", [("k1", "prenorm"), ("k4", "prenorm"), ("vim", "prenorm"),
                                            ("k1", "paper"), ("vim", "paper")])
@pytest.mark.parametrize("chain, boundary, reaches", [("none", "identity", False), ("arcee", "identity", True),
                                                      ("arcee", "detach", False)])
def test_block0_influences_the_loss_only_through_the_state(variant, block, chain, boundary, reaches):
    """Block 0's gate is zeroed: its only path to the output is h_T -> block 1's h0."""
    model = randomize_(tiny(state_chain=chain, boundary_map=boundary, block=block, **VARIANTS[variant]))
    with torch.no_grad():
        gate = model.blocks[0].adaLN[1]
        gate.weight[32:].zero_()  # rows [2w, 3w) of (shift, scale, gate), w = 16
        gate.bias[32:].zero_()
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    model(x, t).square().mean().backward()
    mixer0 = model.blocks[0].mixer
    for p in (mixer0.in_proj.weight, mixer0.x_proj[0].weight, mixer0.A_log):
        assert (p.grad is not None and p.grad.abs().sum() > 0) == reaches

    with torch.no_grad():  # perturbing block 0's final state moves the output iff states are chained
        ref = model(x, t)
        handle = mixer0.register_forward_hook(lambda mod, args, out: (out[0], out[1] + 1.0))
        moved = (model(x, t) - ref).abs().max() > 0
        handle.remove()
    assert moved == (chain == "arcee")


@pytest.mark.parametrize("chain, block", [("none", "prenorm"), ("arcee", "prenorm"), ("arcee", "paper")])
def test_grad_checkpoint_gives_the_same_gradients(chain, block):
    model = randomize_(tiny(state_chain=chain, block=block))
    ckpt = copy.deepcopy(model)
    ckpt.grad_checkpoint = True
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    for m in model, ckpt:
        m(x, t).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("block", ["prenorm", "paper"])
def test_bf16_autocast_keeps_residual_and_states_fp32(block):
    model = randomize_(tiny(state_chain="arcee", bidirectional=True, block=block))
    seen = []
    model.blocks[1].register_forward_hook(lambda mod, args, out: seen.append((out[0].dtype, out[1].dtype)))
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.dtype == torch.float32 and seen == [(torch.float32, torch.float32)]
    torch.testing.assert_close(out, model(x, t), rtol=5e-2, atol=5e-2)  # bf16 tolerance (REFERENCE.md)
    out.square().mean().backward()


def test_class_labels_and_null_class():
    model = randomize_(tiny(num_classes=3, class_dropout=0.5)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    null = model(x, t, torch.tensor([3, 3]))
    torch.testing.assert_close(model(x, t), null)  # y=None is the null class
    assert (model(x, t, torch.tensor([0, 1])) - null).abs().max() > 0


def test_training_steps_lower_the_loss_on_xs():
    cfg = OmegaConf.load(CONFIGS / "model" / "zigma_xs.yaml")
    model = build_model(OmegaConf.merge(cfg, dict(image_size=16, in_channels=1, state_chain="arcee")))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x1, x0, t = torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16), torch.rand(8)
    xt, v = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0, x1 - x0  # linear path
    losses = []
    for _ in range(6):
        loss = (model(xt, t) - v).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.98 * losses[0], losses


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_forward_backward_under_torch_compile(backend):
    model = randomize_(tiny(state_chain="arcee", depth=3))
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: no graph breaks
    out = compiled(x, t)
    torch.testing.assert_close(out, model(x, t), rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    assert model.blocks[0].mixer.in_proj.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("preset", ["zigma_b2", "zigma_s", "zigma_xs"])
def test_presets_load_stand_alone(preset):
    cfg = OmegaConf.load(CONFIGS / "model" / f"{preset}.yaml")
    assert (cfg.image_size, cfg.in_channels, cfg.num_classes) == (32, 4, 0)  # defaults without a data node
    assert cfg.name == preset
    with torch.device("meta"):
        build_model(cfg)


def test_preset_reads_the_data_node_when_composed(tmp_path):
    from hydra import compose, initialize_config_dir

    (tmp_path / "config.yaml").write_text(
        "defaults:\n  - model: zigma_xs\n  - _self_\n"
        "data: {image_size: 16, channels: 1, num_classes: 10}\n"
        f"hydra:\n  searchpath: ['file://{CONFIGS}']\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        cfg = compose("config", overrides=["model.state_chain=arcee", "model.num_orders=2"])
    model = build_model(cfg.model)
    assert (model.image_size, model.in_channels, model.num_classes) == ((16, 16), 1, 10)
    assert model.chain and len({tuple(b.path.tolist()) for b in model.blocks}) == 2
    assert model(torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 9])).shape == (2, 1, 16, 16)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides, match", [
    (dict(image_size=9), "image_size 9x9 must be divisible by patch_size 2"),
    (dict(d_state=0), "d_state must be in 1..256"),
    (dict(d_state=257), "d_state must be in 1..256"),
    (dict(num_orders=0), "num_orders must be in 1..8"),
    (dict(num_orders=9), "num_orders must be in 1..8"),
    (dict(scan_order="raster", num_orders=2), "num_orders must be in 1..1 for scan_order 'raster'"),
    (dict(state_chain="gru"), "state_chain must be one of"),
    (dict(block="postnorm"), r"block must be one of \('prenorm', 'paper'\)"),
    (dict(boundary_map="scale"), "unknown model boundary_map 'scale'"),
    (dict(d_sate=16), r"unknown key\(s\) \['d_sate'\]"),
    (dict(width=0), "width must be a positive integer"),
    (dict(dt_rank="big"), "dt_rank must be 'auto'"),
])
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_missing_config_key_raises():
    with pytest.raises(ValueError, match=r"missing key\(s\) \['in_channels'\]"):
        build_model(dict(image_size=8))


def test_bad_call_raises():
    model = tiny()
    with pytest.raises(ValueError, match=r"x must have shape \(b, 1, 8, 8\).*got \(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match=r"x must have shape"):
        model(torch.randn(2, 1, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match=r"t must have shape \(b,\) = \(2,\)"):
        model(torch.randn(2, 1, 8, 8), torch.rand(3))
    with pytest.raises(ValueError, match="num_classes = 0"):
        model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 1]))
