"""FID / KID through clean-fid against an independent float64 numpy/scipy computation; the stats cache;
generator mode == folder mode; bad input; the offline Inception message; evaluate.py tables."""
import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from omegaconf import OmegaConf
from PIL import Image

from arcee.metrics import Evaluator, build_feature_extractor, kid_from_feats, write_table
from arcee.metrics.fid import inception_location, model_features
from arcee.models import build_model
from arcee.sample import ImageSampler, sample_folder, save_generator

ROOT = Path(__file__).resolve().parents[1]


class Feats(torch.nn.Module):
    """A small fixed feature extractor: (b, 3, H, W) in [0, 255] -> (b, 6); counts its calls."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(2 * torch.randn(3 * 2 * 2, 6, generator=g))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.nn.functional.adaptive_avg_pool2d(x / 255, 2).flatten(1) @ self.proj


def write_pngs(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, a in enumerate(images):
        Image.fromarray(a).save(Path(folder) / f"{i:06d}.png")
    return Path(folder)


def random_images(n, seed, shift=0, size=8):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(128 + shift, 50, (n, size, size, 3)), 0, 255).astype(np.uint8)


def reference_features(folder):
    """Independently: PNGs -> float images -> the extractor, no clean-fid (resize=False)."""
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) for f in sorted(Path(folder).glob("*.png"))])
    with torch.no_grad():
        return Feats()(torch.from_numpy(x).permute(0, 3, 1, 2)).double().numpy()


def fid64(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = (a - mu_a).T @ (a - mu_a) / (len(a) - 1), (b - mu_b).T @ (b - mu_b) / (len(b) - 1)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real))


def kid64(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, all pairs (equal set sizes)."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = lambda K: (K.sum() - np.trace(K)) / (m * (m - 1))
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


@pytest.fixture
def folders(tmp_path):
    return (write_pngs(tmp_path / "real", random_images(40, 0)),
            write_pngs(tmp_path / "fake", random_images(40, 1, shift=30)))


def evaluator(real, tmp_path, extractor=None, **kw):
    return Evaluator(real, feature_extractor=extractor or Feats(), resize=kw.pop("resize", False),
                     cache_dir=tmp_path / "cache", batch_size=16, num_workers=0, device="cpu", verbose=False, **kw)


def test_fid_kid_equal_independent_computation(tmp_path, folders):
    real, fake = folders
    out = evaluator(real, tmp_path).folder(fake)
    a, b = reference_features(fake), reference_features(real)
    assert out["num_samples"] == out["num_real"] == 40
    assert out["fid"] == pytest.approx(fid64(a, b), rel=1e-4) and out["fid"] > 0.1
    assert out["kid"] == pytest.approx(kid64(a, b), rel=1e-4, abs=1e-7) and out["kid"] > 1e-3


def test_identical_folders_give_zero_fid(tmp_path, folders):
    real, _ = folders
    copy = write_pngs(tmp_path / "copy", random_images(40, 0))
    for resize in (False, True):  # True: clean-fid's 299x299 "clean" resize in front of the extractor
        assert abs(evaluator(real, tmp_path, resize=resize).folder(copy)["fid"]) < 1e-6


def test_reference_cache_reused_and_invalidated(tmp_path, folders):
    real, fake = folders
    ext = Feats()
    first = evaluator(real, tmp_path, ext).folder(fake)
    calls = ext.calls
    ev = evaluator(real, tmp_path, ext)
    assert ev.reference.cached and ext.calls == calls  # no feature of the reference recomputed
    assert ev.folder(fake)["fid"] == first["fid"]
    # a changed reference folder -> new key, recomputed; the stale file is gone
    write_pngs(tmp_path / "extra", random_images(1, 5))
    os.replace(tmp_path / "extra" / "000000.png", real / "000040.png")
    ev = evaluator(real, tmp_path, ext)
    assert not ev.reference.cached and ev.folder(fake)["num_real"] == 41
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    # another extractor (other weights) has its own entry
    other = Feats()
    with torch.no_grad():
        other.proj.mul_(2)
    assert not evaluator(real, tmp_path, other).reference.cached


def tiny_generator(tmp_path):
    cfg = OmegaConf.create({
        "model": dict(image_size=8, in_channels=3, patch_size=2, width=16, depth=2, d_state=4, expand=2, d_conv=4,
                      dt_rank="auto", scan_order="zigzag", num_orders=8, bidirectional=False, state_chain="arcee",
                      boundary_map="identity", class_dropout=0.1, grad_checkpoint=False, num_classes=0,
                      scan_backend="reference"),
        "data": dict(name="tiny", kind="pixel", image_size=8, channels=3, num_classes=0, real_samples=None),
        "flow": dict(path="linear", sampler="euler", steps=3)})
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    save_generator(tmp_path / "g.safetensors", model.state_dict(), cfg, 700)
    return model, cfg


def test_generator_mode_equals_folder_mode(tmp_path, folders, monkeypatch):
    real, _ = folders
    model, cfg = tiny_generator(tmp_path)
    sample_folder(ImageSampler(model, cfg, seed=4), tmp_path / "s", 10, batch_size=4, progress=False)
    ev = evaluator(real, tmp_path)
    from_folder = ev.folder(tmp_path / "s")
    from_model = ev.checkpoint(tmp_path / "g.safetensors", 10, seed=4)
    assert from_model["step"] == 700 and from_model["nfe_per_image"] == 3
    assert from_model["fid"] == pytest.approx(from_folder["fid"], rel=1e-5)
    assert from_model["kid"] == pytest.approx(from_folder["kid"], rel=1e-4, abs=1e-8)

    # sharded over two ranks (global batches round-robin) and gathered == one process
    single, _ = model_features(ImageSampler(model, cfg, seed=4), 10, ev.extractor, batch_size=4)
    sent = []  # what the ranks contribute; rank 1 runs first, rank 0 then sees both

    def gather_object(obj):
        sent.extend(obj)
        return list(sent)

    monkeypatch.setattr("accelerate.utils.gather_object", gather_object)
    for rank in (1, 0):
        state = type("State", (), {"process_index": rank, "num_processes": 2})
        feats, nfe = model_features(ImageSampler(model, cfg, seed=4), 10, ev.extractor, batch_size=4, state=state)
    assert sent[0][0] == [4, 5, 6, 7] and sent[1][0] == [0, 1, 2, 3, 8, 9]
    assert np.array_equal(feats, single) and nfe == 3


def test_bad_inputs(tmp_path, folders):
    real, fake = folders
    ev = evaluator(real, tmp_path)
    with pytest.raises(FileNotFoundError, match="samples: folder .*nope does not exist"):
        ev.folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        ev.folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="real: folder"):
        evaluator(tmp_path / "nope", tmp_path).reference
    big = write_pngs(tmp_path / "big", random_images(3, 2, size=16))
    with pytest.raises(ValueError, match="16x16 .*reference images .* are 8x8"):
        ev.folder(big)
    mixed = write_pngs(tmp_path / "mixed", random_images(3, 2))
    Image.fromarray(random_images(1, 3, size=16)[0]).save(mixed / "x.png")
    with pytest.raises(ValueError, match="all images must have one size"):
        ev.folder(mixed)
    rgba = write_pngs(tmp_path / "rgba", random_images(3, 2))
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(rgba / "a.png")
    with pytest.raises(ValueError, match="mode RGBA; expected L .* or RGB"):
        ev.folder(rgba)
    one = write_pngs(tmp_path / "one", random_images(1, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        ev.folder(one)
    with pytest.raises(ValueError, match="KID needs at least 2"):
        kid_from_feats(np.zeros((1, 4)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        ev.model(*tiny_generator(tmp_path), num_samples=1)
    with pytest.raises(ValueError, match="mode must be one of"):
        build_feature_extractor(Feats(), mode="fast")


def test_inception_unreachable_gives_a_clear_message(monkeypatch):
    url, path = inception_location("clean")
    if os.path.exists(path):
        pytest.skip(f"Inception weights present at {path}")

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(RuntimeError, match="network unreachable") as e:
        build_feature_extractor("inception", "clean", "cpu")
    assert path in str(e.value) and url in str(e.value)


def test_evaluate_entry_point_table_and_plot(tmp_path, folders):
    real, fake = folders
    model, cfg = tiny_generator(tmp_path)
    for step, seed in ((100, 0), (200, 1)):
        sample_folder(ImageSampler(model, cfg, seed=seed), tmp_path / f"s{step}", 6, batch_size=6,
                      manifest={"step": step}, progress=False)
    out = tmp_path / "table"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))
    cmd = [sys.executable, str(ROOT / "evaluate.py"), f"samples=[{tmp_path / 's200'},{tmp_path / 's100'}]",
           f"ckpt={tmp_path / 'g.safetensors'}", "num_samples=6", f"real={real}", "feature_extractor=test_metrics:Feats",
           "resize=false", f"cache_dir={tmp_path / 'cache'}", "num_workers=0", "device=cpu", f"out={out}"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["step"] for r in rows] == [200, 100, 700] and all(r["fid"] > 0 for r in rows)
    assert out.with_suffix(".csv").read_text().splitlines()[0].startswith("name,kind,step,fid")
    assert out.with_suffix(".png").is_file()
    # generator mode of the checkpoint at seed 0 == its folder at seed 0
    assert rows[2]["fid"] == pytest.approx(Evaluator(real, feature_extractor=Feats(), resize=False,
                                                     cache_dir=tmp_path / "cache", device="cpu",
                                                     verbose=False).folder(tmp_path / "s100")["fid"], rel=1e-5)


def test_write_table_without_steps(tmp_path):
    paths = write_table([{"name": "a", "fid": 1.0, "step": None}], tmp_path / "t")
    assert paths["plot"] is None and json.loads(paths["json"].read_text())[0]["fid"] == 1.0


def test_parameter_free_extractors_get_distinct_cache_identities(tmp_path):
    """The reference-stats cache is keyed by the extractor's identity: two extractors without
    weights that compute different features must not share it (a stale-stats bug otherwise)."""
    from arcee.metrics.fid import build_feature_extractor

    names = []
    for size in (1, 2):
        pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(size), torch.nn.Flatten())
        torch.jit.script(pool).save(str(tmp_path / f"pool{size}.pt"))
        names.append(build_feature_extractor(str(tmp_path / f"pool{size}.pt"), device="cpu").name)
        names.append(build_feature_extractor(pool, device="cpu").name)
    assert len(set(names)) == 4, names
    again = build_feature_extractor(str(tmp_path / "pool1.pt"), device="cpu").name
    assert again == names[0]  # the same file: the same identity (the cache is reused)


def test_extractor_import_strings_accept_classes_factories_functions_and_instances(tmp_path, monkeypatch):
    (tmp_path / "my_feats.py").write_text(
        "import torch\n"
        "class Pool(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x.mean((2, 3))\n"
        "def make_pool():\n"
        "    return Pool()\n"
        "def pool_fn(x):\n"
        "    return x.amax((2, 3))\n"
        "instance = Pool()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    for attr, expect in [("Pool", x.mean((2, 3))), ("make_pool", x.mean((2, 3))),
                         ("instance", x.mean((2, 3))), ("pool_fn", x.amax((2, 3)))]:
        fx = build_feature_extractor(f"my_feats:{attr}", device="cpu", resize=False)
        torch.testing.assert_close(fx.fn(x), expect, msg=attr)
    with pytest.raises(ValueError, match="expected 'inception'"):
        build_feature_extractor("my_feats.Pool", device="cpu")
