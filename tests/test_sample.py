"""Sampling: export round trip, per-index determinism over processes / batch sizes / resumes, bad input."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from arcee.models import build_model
from arcee.sample import (ImageSampler, draw_inputs, export_npz, load_generator, read_folder, read_step,
                          sample_folder, sample_grid, save_generator)

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(channels=3, num_classes=0, width=16):
    return OmegaConf.create({
        "model": dict(image_size=8, in_channels=channels, patch_size=2, width=width, depth=2, d_state=4, expand=2,
                      d_conv=4, dt_rank="auto", scan_order="zigzag", num_orders=8, bidirectional=False,
                      state_chain="arcee", boundary_map="identity", class_dropout=0.1, grad_checkpoint=False,
                      num_classes=num_classes, scan_backend="reference"),
        "data": dict(name="tiny", path=None, kind="pixel", image_size=8, channels=channels, num_classes=num_classes,
                     flip=False, latent_scale=1.0, vae=None, num_workers=0, real_samples=None),
        "flow": dict(path="linear", sampler="heun", steps=3)})


def tiny_model(cfg, seed=0):
    """Random weights; the zero-initialised output layers are perturbed so that images vary."""
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    cfg = tiny_cfg()
    path = tmp_path_factory.mktemp("ckpt") / "ema.safetensors"
    save_generator(path, tiny_model(cfg).state_dict(), cfg, step=1234)
    return path


@pytest.fixture(scope="module")
def generator(export):
    return load_generator(export)


def files_of(d):
    return {f: (Path(d) / f).read_bytes() for f in sorted(os.listdir(d)) if f.endswith(".png")}


# ----------------------------------------------------------------------------- loading

def test_export_round_trip_and_checkpoint_folder(tmp_path, export):
    cfg = tiny_cfg()
    model, cfg2 = load_generator(export)
    ref = tiny_model(cfg).state_dict()
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)
    assert OmegaConf.to_container(cfg2) == OmegaConf.to_container(cfg) and read_step(export) == 1234
    assert not model.training and not [f for f in os.listdir(export.parent) if f.endswith(".tmp")]

    # a training checkpoint folder: config.yaml, ema.safetensors, accelerate's model.safetensors
    # (keys of a compiled model carry "_orig_mod."); use_ema picks the file
    ckpt = tmp_path / "step_0000500"
    ckpt.mkdir()
    OmegaConf.save(cfg, ckpt / "config.yaml")
    save_generator(ckpt / "ema.safetensors", ref, cfg, 500)
    raw = tiny_model(cfg, seed=1).state_dict()
    save_file({"_orig_mod." + k: v.contiguous() for k, v in raw.items()}, str(ckpt / "model.safetensors"))
    ema, _ = load_generator(ckpt)
    plain, _ = load_generator(ckpt, use_ema=False)
    key = next(iter(ref))
    assert torch.equal(ema.state_dict()[key], ref[key]) and torch.equal(plain.state_dict()[key], raw[key])
    assert read_step(ckpt) == 500


def test_load_errors(tmp_path, export):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_generator(tmp_path / "nope.safetensors")
    # config says width 32, weights are width 16: every mismatch is named
    wide = tmp_path / "wide.safetensors"
    save_generator(wide, tiny_model(tiny_cfg()).state_dict(), tiny_cfg(width=32), 1)
    with pytest.raises(ValueError, match="do not match the model.*shape mismatches"):
        load_generator(wide)
    part = {k: v for i, (k, v) in enumerate(tiny_model(tiny_cfg()).state_dict().items()) if i}
    save_generator(tmp_path / "part.safetensors", dict(part, extra=torch.zeros(1)), tiny_cfg(), 1)
    with pytest.raises(ValueError, match="1 missing keys.*1 unexpected keys: extra"):
        load_generator(tmp_path / "part.safetensors")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="no 'config' metadata"):
        load_generator(tmp_path / "bare.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="has no ema.safetensors"):
        load_generator(tmp_path / "folder")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_generator(tmp_path / "x.pt", {}, tiny_cfg(), 0)


# ----------------------------------------------------------------------------- determinism

def test_noise_depends_only_on_seed_and_index():
    x_a, y_a = draw_inputs([0, 5, 9], (3, 8, 8), 10, seed=7)
    x_b, y_b = draw_inputs([9, 5], (3, 8, 8), 10, seed=7)
    assert torch.equal(x_a[1:].flip(0), x_b) and torch.equal(y_a[1:].flip(0), y_b)
    assert not torch.equal(draw_inputs([5], (3, 8, 8), 0, seed=8)[0][0], x_a[1])
    assert draw_inputs([5], (3, 8, 8), 0, seed=7)[1] is None
    with pytest.raises(ValueError, match="seed"):
        draw_inputs([0], (1,), 0, seed=-1)


def test_world_size_invariance_two_processes(tmp_path, export, generator):
    """accelerate launch --multi_gpu --num_processes 2 (gloo ranks on CPU) == one process, byte for byte."""
    model, cfg = generator
    sample_folder(ImageSampler(model, cfg, seed=3), tmp_path / "one", 10, batch_size=4, progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "sample.py"),
           f"ckpt={export}", f"out_dir={tmp_path / 'two'}", "num_samples=10", "batch_size=4", "seed=3",
           "progress=false", "grid=4"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "[rank 0/2] wrote 6 images" in run.stdout and "[rank 1/2] wrote 4 images" in run.stdout, run.stdout
    one, two = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    assert len(one) == 10 and one == two
    assert len(set(one.values())) == 10  # the images differ from one another
    assert Image.open(f"{tmp_path / 'two'}_grid.png").size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)


def test_batch_size_invariance(tmp_path, generator):
    """Rows of a batch do not interact, but CPU conv2d / 2-D linear pick shape-dependent algorithms
    (|dv| ~ 1e-7): across batch sizes PNGs agree up to rare 1-LSB differences."""
    model, cfg = generator
    imgs = {}
    for b in (1, 4, 12):
        sample_folder(ImageSampler(model, cfg), tmp_path / f"b{b}", 12, batch_size=b, progress=False)
        imgs[b] = read_folder(tmp_path / f"b{b}").astype(int)
    for b in (4, 12):
        d = np.abs(imgs[b] - imgs[1])
        assert d.max() <= 1 and (d > 0).mean() < 1e-2
    # at one batch size the other rows do not matter, bit for bit: index 4 alongside others
    a, _ = ImageSampler(model, cfg)([4, 5, 6, 7])
    b, _ = ImageSampler(model, cfg)([9, 4, 0, 1])
    assert np.array_equal(a[0], b[1])


def test_resume_after_interruption(tmp_path, generator):
    model, cfg = generator
    sampler = ImageSampler(model, cfg, seed=1)
    full = tmp_path / "full"
    sample_folder(sampler, full, 11, batch_size=4, progress=False)
    ref = files_of(full)
    # an interrupted run: some images, a stray temporary file, the manifest
    part = tmp_path / "part"
    part.mkdir()
    for f in ("000000.png", "000001.png", "000002.png", "000003.png", "000005.png", "sampling.json"):
        (part / f).write_bytes((full / f).read_bytes())
    (part / ".000006.png.x1y2.tmp").write_bytes(b"partial")
    report = sample_folder(sampler, part, 11, batch_size=4, progress=False)
    assert report["generated"] == 7  # batch [0, 4) was complete; [4, 8) and [8, 11) are redone
    assert files_of(part) == ref and sorted(os.listdir(part)) == sorted(os.listdir(full))
    # extending the folder keeps what is there and adds the new indices
    report = sample_folder(sampler, part, 13, batch_size=4, progress=False)
    assert len(files_of(part)) == 13 and all(files_of(part)[f] == ref[f] for f in ref)


def test_folder_guards(tmp_path, generator):
    model, cfg = generator
    out = tmp_path / "out"
    sample_folder(ImageSampler(model, cfg, seed=0), out, 4, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="other settings.*seed: 0 -> 1"):
        sample_folder(ImageSampler(model, cfg, seed=1), out, 4, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="index >= num_samples=2"):
        sample_folder(ImageSampler(model, cfg, seed=0), out, 2, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        sample_folder(ImageSampler(model, cfg), tmp_path / "x", 0)


def test_sampler_errors_propagate(tmp_path, generator):
    model, cfg = generator

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, y=None):
            raise RuntimeError("kernel exploded")

    with pytest.raises(RuntimeError, match="kernel exploded"):
        sample_folder(ImageSampler(Broken(), cfg), tmp_path / "b", 4, progress=False)
    assert not files_of(tmp_path / "b")

    class NaN(Broken):
        def forward(self, x, t, y=None):
            return torch.full_like(x, float("nan"))

    with pytest.raises(FloatingPointError, match="non-finite"):
        ImageSampler(NaN(), cfg)([0, 1])


def test_npz_grid_nfe_and_labels(tmp_path, generator):
    model, cfg = generator
    out = tmp_path / "out"
    report = sample_folder(ImageSampler(model, cfg, sampler="euler", steps=5), out, 6, batch_size=4, progress=False)
    assert report["nfe_per_image"] == 5 and report["images_per_s"] > 0
    export_npz(out, 6, tmp_path / "out.npz")
    with np.load(tmp_path / "out.npz") as z:
        assert np.array_equal(z["arr_0"], read_folder(out)) and z["arr_0"].shape == (6, 8, 8, 3)
    grid = sample_grid(model, None, cfg, n=4, seed=0, path=tmp_path / "g" / "grid.png", sampler="euler", steps=5)
    assert grid.shape == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2, 3) and (tmp_path / "g" / "grid.png").is_file()
    assert np.array_equal(grid[2:10, 2:10], read_folder(out)[0])

    # class-conditional, grayscale: labels from (seed, i); guidance only for conditional models
    ccfg = tiny_cfg(channels=1, num_classes=3)
    cmodel = tiny_model(ccfg)
    imgs, nfe = ImageSampler(cmodel, ccfg, cfg_scale=2.0, steps=2)([0, 1])
    assert imgs.shape == (2, 8, 8, 1) and nfe == 3
    fixed, _ = ImageSampler(cmodel, ccfg, class_label=2, steps=2)([0, 1])
    y = draw_inputs([0, 1], (1, 8, 8), 3, seed=0)[1]
    assert np.array_equal(fixed[y == 2], ImageSampler(cmodel, ccfg, steps=2)([0, 1])[0][y == 2])
    with pytest.raises(ValueError, match="cfg_scale=2.0 needs a class-conditional"):
        ImageSampler(model, cfg, cfg_scale=2.0)
    with pytest.raises(ValueError, match="class_label=5"):
        ImageSampler(cmodel, ccfg, class_label=5)


def test_latent_models_decode_through_the_vae(generator):
    model, cfg = generator
    lcfg = OmegaConf.merge(cfg, {"data": {"kind": "latent", "latent_scale": 0.5, "vae": "stand-in"}})

    class StandInVAE(torch.nn.Module):  # decode: 2x nearest upsampling, as an AutoencoderKL returns it
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def decode(self, z):
            return type("Out", (), {"sample": torch.nn.functional.interpolate(z, scale_factor=2).tanh()})

    imgs, _ = ImageSampler(model, lcfg, vae=StandInVAE())([0, 1])
    with torch.no_grad():
        x1, _ = ImageSampler(model, cfg).transport.sample(lambda x, t: model(x, t),
                                                          draw_inputs([0, 1], (3, 8, 8), 0, 0)[0], sampler="heun", steps=3)
    expect = ((torch.nn.functional.interpolate(x1 / 0.5, scale_factor=2).tanh() + 1) * 127.5).round()
    assert imgs.shape == (2, 16, 16, 3)
    assert np.abs(imgs.astype(int) - expect.permute(0, 2, 3, 1).numpy()).max() <= 1
