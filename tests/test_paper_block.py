"""model.block=paper: the Arcee authors' backbone, pinned row by row (docs/architecture.md) against
closed forms written out here and the parameter counts of the authors' models, and the paper
recipes (configs/experiment/celebahq_*) composing to it."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import arcee.train.schema  # noqa: F401  registers the `arcee_schema` node configs/config.yaml starts from
from arcee.models import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p.stem for p in (CONFIGS / "experiment").glob("celebahq_*.yaml"))
# The authors' models (rc2 Arcee_Models.py; the paper's Table 1), d_state 256, B/2 on 4x32x32 latents
AUTHORS_PARAMS = {"zigma": 161_776_144, "vim": 161_935_888}  # Zigma-k / Arcee-k (any k); Vim / ArceeVim


def tiny(block="paper", **overrides):
    """A tiny model on 1x8x8 images (4x4 tokens)."""
    cfg = dict(image_size=8, in_channels=1, patch_size=2, width=16, depth=4, d_state=4, dt_rank="auto",
               num_orders=4, block=block)
    cfg.update(overrides)
    return build_model(cfg)


def randomize_(model, std=0.2):
    """Open the zero-initialised gates and heads, and move the norm weights off one."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "final" in name or name.endswith("norm.weight"):
                p.normal_(0, std).add_(1.0 if name.endswith("norm.weight") else 0.0)
    return model


def rms_norm64(x, weight, eps=1e-5):
    x = x.double()
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * weight.double()


def capture(module, seen):
    """Record (inputs, output) of every call of module."""
    return module.register_forward_hook(lambda mod, args, out: seen.append((args, out)))


# ----------------------------------------------------------------------------- the recipes

def test_paper_recipes_build_the_authors_model():
    """Every celebahq_* recipe composes to block=paper with the authors' exact parameter count."""
    assert len(RECIPES) == 10  # Zigma-k and Arcee-k for k = 1, 2, 4, 8; Vim and ArceeVim
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        for recipe in RECIPES:
            model_cfg = compose("config", overrides=[f"experiment={recipe}"]).model
            vim = "vim" in recipe
            assert model_cfg.block == "paper" and model_cfg.d_state == 256, recipe
            assert model_cfg.depth == (20 if vim else 24) and model_cfg.bidirectional == vim, recipe
            assert model_cfg.state_chain == ("arcee" if recipe.endswith("_arcee") else "none"), recipe
            with torch.device("meta"):  # the module tree without allocating 650 MB of weights
                count = sum(p.numel() for p in build_model(model_cfg).parameters())
            assert count == AUTHORS_PARAMS["vim" if vim else "zigma"], (recipe, count)


def test_prenorm_stays_the_default_with_its_layout():
    """Configs written before `block` existed (checkpoints, exports) build the prenorm model; it
    differs from the paper's only by the unconditional label (arcee's 161,775,376 at B/2)."""
    cfg = OmegaConf.load(CONFIGS / "model" / "zigma_b2.yaml")
    cfg.pop("block")
    with torch.device("meta"):
        prenorm, paper = build_model(cfg), build_model(OmegaConf.merge(cfg, {"block": "paper"}))
    assert prenorm.block == "prenorm"
    assert sum(p.numel() for p in prenorm.parameters()) == 161_775_376
    a, b = ({k: v.shape for k, v in m.state_dict().items()} for m in (prenorm, paper))
    assert set(b) - set(a) == {"y_embed.table.weight"} and b["y_embed.table.weight"] == (1, 768)
    assert all(a[k] == b[k] for k in a)


# ----------------------------------------------------------------------------- the block and the stream

def test_zero_modulation_block_returns_rms_norm_of_its_input():
    """adaLN-Zero at init: shift = scale = gate = 0, so the block's output is RMSNorm(residual)."""
    model = tiny()
    with torch.no_grad():
        for block in model.blocks:
            block.norm.weight.normal_(1.0, 0.3)
    x, c = torch.randn(2, 16, 16) * 3, torch.randn(2, 16)
    for block in model.blocks:
        out, _ = block(x, c)
        torch.testing.assert_close(out.double(), rms_norm64(x, block.norm.weight), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tiny("prenorm").blocks[0](x, c)[0], rms_norm64(x, torch.ones(16)).float())


def test_block_output_closed_form_with_modulation():
    """o = n + gate * mixer(n * (1 + scale) + shift), n = RMSNorm(x); (shift, scale, gate) = W silu(c) + b."""
    model = randomize_(tiny(num_orders=1))  # k = 1: the blocks see tokens in scan order (no gather)
    block = model.blocks[1]
    x, c = torch.randn(2, 16, 16), torch.randn(2, 16)
    n = rms_norm64(x, block.norm.weight).float()
    lin = block.adaLN[1]
    shift, scale, gate = (F.silu(c) @ lin.weight.T + lin.bias)[:, None].split(16, dim=-1)
    expected = n + gate * block.mixer(n * (1 + scale) + shift)[0]
    torch.testing.assert_close(block(x, c)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(state_chain="arcee"),
                                       dict(scan_order="raster", num_orders=1, bidirectional=True,
                                            state_chain="arcee")])
def test_stream_is_the_embedding_plus_the_sum_of_block_outputs(overrides):
    """Block k reads r_k = embed + o_0 + ... + o_{k-1}; the final layer reads LayerNorm(o_last)
    (eps 1e-6, no affine), modulated, then the linear head."""
    model = randomize_(tiny(**overrides))
    blocks, final = [], []
    for block in model.blocks:
        capture(block, blocks)
    capture(model.final, final)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    model(x, t)

    # the patch embedding by hand: 2x2 patches, row-major tokens, + the position embedding
    patches = x.unfold(2, 2, 2).unfold(3, 2, 2).reshape(2, 1, 16, 4).permute(0, 2, 1, 3).reshape(2, 16, 4)
    embed = patches @ model.x_embed.weight.reshape(16, 4).T + model.x_embed.bias + model.pos_embed
    if model.path is not None:  # k = 1: the model permutes once into scan order
        embed = embed[:, model.path]
    stream = embed
    for (args, (out, _)) in blocks:
        torch.testing.assert_close(args[0], stream, rtol=1e-5, atol=1e-5)
        stream = stream + out
    (f_args, f_out), = final
    last = blocks[-1][1][0]
    if model.path is not None:
        last = last[:, model.inverse]
    torch.testing.assert_close(f_args[0], last)  # the last block's output, not the stream

    o, c = last.double(), f_args[1].double()
    ln = (o - o.mean(-1, keepdim=True)) / torch.sqrt(o.var(-1, unbiased=False, keepdim=True) + 1e-6)
    ada, head = model.final.adaLN[1].double(), model.final.linear.double()
    shift, scale = (F.silu(c) @ ada.weight.T + ada.bias)[:, None].chunk(2, dim=-1)
    torch.testing.assert_close(f_out.double(), (ln * (1 + scale) + shift) @ head.weight.T + head.bias,
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- embeddings and init

def test_time_embedding_of_raw_t_sin_first():
    """t = 0.5 -> MLP([sin(0.5 w_i)]_i, [cos(0.5 w_i)]_i), w_i = 10000^(-i/128), i < 128 (raw t, not 1000 t)."""
    model = tiny()
    emb = model.t_embed
    with torch.no_grad():
        for m in emb.mlp[0], emb.mlp[2]:
            m.bias.normal_()
    w = [10000 ** (-i / 128) for i in range(128)]
    freq = torch.tensor([math.sin(0.5 * wi) for wi in w] + [math.cos(0.5 * wi) for wi in w])
    expected = F.silu(freq @ emb.mlp[0].weight.T + emb.mlp[0].bias) @ emb.mlp[2].weight.T + emb.mlp[2].bias
    torch.testing.assert_close(emb(torch.tensor([0.5])), expected[None], rtol=1e-5, atol=1e-6)
    prenorm = tiny("prenorm").t_embed
    prenorm.load_state_dict(emb.state_dict())
    assert not torch.allclose(prenorm(torch.tensor([0.5])), expected[None], atol=1e-3)  # ZigMa's 1000 t


def test_position_embedding_base_1000_column_first():
    """Token (r, c) of a 4 x 6 grid, width 16: [sin(c w), cos(c w), sin(r w), cos(r w)], w_i = 1000^(-i/4)."""
    model = tiny(image_size=[8, 12])
    w = [1000 ** (-i / 4) for i in range(4)]
    for r, c in [(1, 4), (3, 2), (0, 5)]:
        expected = ([math.sin(c * wi) for wi in w] + [math.cos(c * wi) for wi in w]
                    + [math.sin(r * wi) for wi in w] + [math.cos(r * wi) for wi in w])
        torch.testing.assert_close(model.pos_embed[0, r * 6 + c], torch.tensor(expected))
    assert model.pos_embed.requires_grad


@pytest.mark.parametrize("width, depth", [(768, 2), (64, 24)])
def test_out_proj_init_is_kaiming_uniform_over_sqrt_depth(width, depth):
    """The authors: kaiming_uniform_(a=sqrt(5)) (nn.Linear's default) then / sqrt(depth):
    std = gain / sqrt(fan_in) / sqrt(depth), gain = sqrt(2 / (1 + a^2)); B/2 (1536, 24): 0.0030."""
    gain = math.sqrt(2 / (1 + 5))
    fan_in = 2 * width  # d_inner = expand * width
    for block, scale in (("paper", 1 / math.sqrt(depth)), ("prenorm", 1.0)):
        model = tiny(block, image_size=4, width=width, depth=depth, d_state=1)
        w = torch.cat([b.mixer.out_proj.weight.flatten() for b in model.blocks])
        expected = gain / math.sqrt(fan_in) * scale
        assert abs(w.std().item() / expected - 1) < 0.1, (block, w.std().item(), expected)
        assert w.abs().max().item() <= math.sqrt(3) * expected * (1 + 1e-6)  # uniform on +-sqrt(3) std


def test_patch_embed_bias_has_pytorch_default_init():
    """Conv2d's default: bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = C p^2 (prenorm: zeros)."""
    bound = 1 / math.sqrt(4 * 2 * 2)
    bias = tiny(image_size=4, in_channels=4, width=768, depth=1, d_state=1).x_embed.bias
    assert bias.abs().max().item() <= bound and abs(bias.std().item() / (bound / math.sqrt(3)) - 1) < 0.1
    assert (tiny("prenorm", image_size=4, in_channels=4, width=768, depth=1, d_state=1).x_embed.bias == 0).all()


@pytest.mark.parametrize("block", ["paper", "prenorm"])
def test_vision_mamba_reversed_scan_dt_bias(block):
    """The authors' Vim: the reversed scan's dt_proj bias is zeroed by their init, so its dt starts at
    softplus(0) = ln 2 on every channel; the forward scan keeps mamba's log-uniform dt in [1e-3, 0.1]."""
    mixer = tiny(block, scan_order="raster", num_orders=1, bidirectional=True, width=64).blocks[0].mixer
    dt_fwd, dt_rev = (F.softplus(p.bias) for p in mixer.dt_proj)
    assert dt_fwd.min() >= 1e-3 * (1 - 1e-4) and dt_fwd.max() <= 0.1 * (1 + 1e-4)
    if block == "paper":
        torch.testing.assert_close(dt_rev, torch.full_like(dt_rev, math.log(2)))
    else:
        assert dt_rev.min() >= 1e-3 * (1 - 1e-4) and dt_rev.max() <= 0.1 * (1 + 1e-4)


def test_one_learned_unconditional_label_is_added_to_the_conditioning():
    model = randomize_(tiny(width=16))
    label = model.y_embed.table.weight
    assert label.shape == (1, 16) and abs(label.std().item() - 0.02) < 0.015  # nn.Embedding init N(0, 0.02)
    seen = []
    capture(model.blocks[0], seen)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    model(x, t).square().mean().backward()
    torch.testing.assert_close(seen[0][0][1], model.t_embed(t) + label[0])
    assert label.grad.abs().sum() > 0  # learned
    with pytest.raises(ValueError, match="num_classes = 0"):
        model(x, t, torch.tensor([0, 0]))
    assert tiny("prenorm").y_embed is None
    assert tiny(num_classes=3).y_embed.table.weight.shape == (4, 16)  # class-conditional: classes + null
