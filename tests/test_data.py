"""arcee.data and data_prep: shard building, determinism, resume, verify, datasets, digits, latents, CLI.

Expected values come from the inputs' construction (constant colours, alpha compositing by hand,
sklearn's own arrays, a direct VAE encode), never from running the code under test.
"""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arcee.data import (ShardError, ShardedLMDBDataset, build_dataset, build_shards, ensure_real_samples,
                        read_manifest, scan_folder, verify_shards)
from arcee.data import shards as shards_mod

ROOT = Path(__file__).resolve().parents[1]
LEVEL = 1 / 127.5 + 1e-6  # one uint8 grey level in [-1, 1] units


def px(v):
    return np.asarray(v, dtype=np.float64) / 127.5 - 1.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Odd sizes, grayscale, RGBA, a JPEG, one corrupt file, a hidden file and a non-image."""
    src = tmp_path_factory.mktemp("src")
    (src / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (23, 17), (200, 10, 50)).save(src / "a" / "const_rgb.png")
    Image.new("L", (9, 31), 77).save(src / "a" / "b" / "gray.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(src / "rgba_clear.png")
    Image.new("RGBA", (13, 13), (0, 0, 0, 128)).save(src / "rgba_half.png")
    geom = np.zeros((20, 40, 3), np.uint8)  # 40 wide: black | white (80%) | red
    geom[:, 4:36] = 255
    geom[:, 36:] = (255, 0, 0)
    Image.fromarray(geom).save(src / "geom.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(src / "photo.jpg", quality=90)
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (src / ".hidden.png").write_bytes(b"AppleDouble junk")
    (src / "notes.txt").write_text("not an image")
    return src


def build(src, out, **kw):
    sources, classes = scan_folder(src, kw.pop("labels", "none"))
    kw = {"size": 12, "num_shards": 2, "workers": 0, "progress": False, **kw}
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        return build_shards(sources, out, class_names=classes, **kw)


def files(root):
    """Every file of a shard folder except the (empty) lock file."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.is_file() and p.name != ".build.lock"}


def array_sources(n, size=8, seed=0):
    """Images whose pixel (0, 0, red) = 5 i identifies them; label i % 3."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        img[0, 0, 0] = 5 * i
        out.append((f"img/{i:03d}", i % 3, img))
    return out


# ----------------------------------------------------------------------------- build -> dataset


def test_folder_build_gives_expected_tensors(folder, tmp_path):
    m = build(folder, tmp_path / "ds", workers=2)
    assert m["count"] == 6 and [s["count"] for s in m["shards"]] == [3, 3]
    assert [k["source"] for k in m["skipped"]] == ["corrupt.png"]
    assert (m["resolution"], m["channels"], m["format"], m["shape"]) == (12, 3, "raw", [12, 12, 3])
    ds = ShardedLMDBDataset(tmp_path / "ds", "all")
    assert len(ds) == 6
    assert list(ds.sources) == ["a/b/gray.png", "a/const_rgb.png", "geom.png", "photo.jpg",
                                "rgba_clear.png", "rgba_half.png"]
    xs = {}
    for i in range(len(ds)):
        x, label = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 12, 12) and label == 0
        assert -1.0 <= x.min() and x.max() <= 1.0
        xs[ds.sources[i]] = x.double().numpy()
        s, k = ds.locate(i)  # the stored bytes hash to the manifest's checksum
        assert hashlib.sha256(ds.read(i).tobytes()).hexdigest() == m["shards"][s]["sha256"][k]
    expect = {
        "a/const_rgb.png": (200, 10, 50),
        "a/b/gray.png": (77, 77, 77),
        "rgba_clear.png": (255, 255, 255),                      # fully transparent over white
        "rgba_half.png": (255 * (1 - 128 / 255),) * 3,           # black at alpha 128 over white
        "geom.png": (255, 255, 255),                             # center crop of the white middle
    }
    for name, rgb in expect.items():
        np.testing.assert_allclose(xs[name], np.broadcast_to(px(rgb)[:, None, None], (3, 12, 12)),
                                   atol=LEVEL + 1e-3, err_msg=name)


def test_png_and_jpeg_formats(folder, tmp_path):
    build(folder, tmp_path / "raw")
    build(folder, tmp_path / "png", fmt="png")
    build(folder, tmp_path / "jpg", fmt="jpeg", quality=95)
    raw, png, jpg = (ShardedLMDBDataset(tmp_path / d) for d in ("raw", "png", "jpg"))
    for i in range(len(raw)):
        np.testing.assert_array_equal(png.read(i), raw.read(i))  # PNG is lossless
        err = np.abs(jpg.read(i).astype(int) - raw.read(i).astype(int)).mean()
        assert err < 8, err  # JPEG q95 is close


def test_grayscale_and_labels_from_subdirs(tmp_path):
    for c, n in (("cat", 2), ("dog", 3)):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (10, 14), (i * 40, 100, 200)).save(tmp_path / "src" / c / f"{i}.png")
    sources, classes = scan_folder(tmp_path / "src", "subdir")
    m = build_shards(sources, tmp_path / "ds", size=6, channels=1, workers=0, class_names=classes, progress=False)
    assert m["class_names"] == ["cat", "dog"] and m["num_classes"] == 2
    ds = ShardedLMDBDataset(tmp_path / "ds", channels=1)
    assert [ds[i][1] for i in range(len(ds))] == [0, 0, 1, 1, 1]
    x, _ = ds[0]  # ITU-R 601-2 luma of (0, 100, 200), as PIL's "L" conversion defines it
    assert x.shape == (1, 6, 6)
    np.testing.assert_allclose(x.numpy(), px(0.299 * 0 + 0.587 * 100 + 0.114 * 200), atol=LEVEL)


# ----------------------------------------------------------------------------- determinism, resume


@pytest.mark.parametrize("fmt", ["raw", "png"])
def test_builds_are_byte_identical(folder, tmp_path, fmt):
    build(folder, tmp_path / "one", fmt=fmt, workers=2)
    build(folder, tmp_path / "two", fmt=fmt, workers=0)
    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert sorted(one) == ["manifest.json", "shard_0000.lmdb/data.mdb", "shard_0000.lmdb/index.json",
                           "shard_0001.lmdb/data.mdb", "shard_0001.lmdb/index.json"]
    assert one == two


def test_resume_after_interrupted_build(folder, tmp_path, monkeypatch):
    real_load, calls = shards_mod.load_image, []

    def crash_in_second_shard(src, size, channels):
        calls.append(src)
        if len(calls) == 5:  # shards hold 3 + 2 + 2 sources: the 2nd of shard 1
            raise KeyboardInterrupt
        return real_load(src, size, channels)

    monkeypatch.setattr(shards_mod, "load_image", crash_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build_shards(scan_folder(folder)[0], tmp_path / "ds", size=12, num_shards=3, workers=0, progress=False)
    monkeypatch.setattr(shards_mod, "load_image", real_load)
    out = tmp_path / "ds"
    assert (out / "shard_0000.lmdb" / "index.json").is_file()
    assert (out / "shard_0001.lmdb.tmp" / "data.mdb").is_file()  # the partial shard, never renamed
    assert not (out / "shard_0001.lmdb").exists() and not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished build"):
        ShardedLMDBDataset(out)
    with pytest.raises(ValueError, match="unfinished build with other"):
        build_shards(scan_folder(folder)[0], out, size=10, num_shards=3, workers=0, progress=False)
    first = (out / "shard_0000.lmdb" / "data.mdb").stat()
    build(folder, out, num_shards=3)
    again = (out / "shard_0000.lmdb" / "data.mdb").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # finished shard kept
    build(folder, tmp_path / "clean", num_shards=3)
    assert files(out) == files(tmp_path / "clean")
    assert not list(out.glob("*.tmp")) and not (out / "build_plan.json").exists()
    assert len(ShardedLMDBDataset(out)) == 6
    assert build_shards(scan_folder(folder)[0], out, size=12, num_shards=3, progress=False) == read_manifest(out)
    with pytest.raises(ValueError, match="already holds a finished dataset"):
        build_shards(scan_folder(folder)[0], out, size=10, workers=0, progress=False)


# ----------------------------------------------------------------------------- verify and bad shards


def flip_byte_in_value(root, shard, key):
    """Flip one byte in the middle of a stored value inside data.mdb (found by its bytes)."""
    path = root / f"shard_{shard:04d}.lmdb"
    with shards_mod.open_env(path).begin() as txn:
        value = txn.get(str(key).encode())
    data = (path / "data.mdb").read_bytes()
    pos = data.find(value)
    assert pos >= 0 and data.find(value, pos + 1) < 0
    with open(path / "data.mdb", "r+b") as f:
        f.seek(pos + len(value) // 2)
        f.write(bytes([data[pos + len(value) // 2] ^ 0x01]))


def test_verify_detects_flipped_byte_and_missing_shard(folder, tmp_path):
    root = tmp_path / "ds"
    build(folder, root)
    assert verify_shards(root, progress=False) == []
    flip_byte_in_value(root, 1, 0)  # shards: gray, const_rgb, (corrupt), geom | photo, rgba_clear, rgba_half
    problems = verify_shards(root, progress=False)
    assert problems == ["shard_0001.lmdb key '0' (source 'photo.jpg'): checksum mismatch (stored bytes changed)"]
    shutil.rmtree(root / "shard_0000.lmdb")
    problems = verify_shards(root, progress=False)
    assert len(problems) == 2 and "shard_0000.lmdb" in problems[0] and "missing" in problems[0]


def test_bad_shards_and_configs(folder, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build(folder, a)                      # shards of 3 + 3 records
    build(folder, b, num_shards=3)        # shards of 2 + 2 + 2 (differs from a's)
    with pytest.raises(ValueError, match=r"data.image_size=16 .* 12x12"):
        ShardedLMDBDataset(a, image_size=16)
    with pytest.raises(ValueError, match="data.channels=1"):
        ShardedLMDBDataset(a, channels=1)
    with pytest.raises(ValueError, match="data.kind='latent'"):
        ShardedLMDBDataset(a, kind="latent")
    with pytest.raises(ValueError, match="zero records"):
        ShardedLMDBDataset(a, "val", val_fraction=0.0)
    with pytest.raises(ValueError, match="data.path is not set"):
        build_dataset({"name": "celebahq", "path": "???"})
    with pytest.raises(ValueError, match="data.num_classes=10"):
        build_dataset({"name": "x", "path": str(a), "num_classes": 10})
    shutil.rmtree(a / "shard_0001.lmdb")
    shutil.copytree(b / "shard_0001.lmdb", a / "shard_0001.lmdb")  # a shard from another build
    ds = ShardedLMDBDataset(a)
    ds[0]
    with pytest.raises(ShardError, match=r"shard_0001.lmdb' holds 2 records but manifest.json says 3"):
        ds[3]
    assert any("shard_0001.lmdb: holds 2 records but manifest.json says 3" in p for p in verify_shards(a, progress=False))
    build(folder, tmp_path / "c", size=10)  # 3 + 3 records like a's, but 10x10
    shutil.rmtree(a / "shard_0000.lmdb")
    shutil.copytree(tmp_path / "c" / "shard_0000.lmdb", a / "shard_0000.lmdb")
    with pytest.raises(ShardError, match=r"shard_0000.lmdb' holds raw records of shape \[10, 10, 3\] but "
                                         r"manifest.json says raw \[12, 12, 3\]"):
        ShardedLMDBDataset(a)[0]
    shutil.rmtree(a / "shard_0001.lmdb")
    with pytest.raises(ShardError, match="shard_0001.lmdb' listed in manifest.json is missing"):
        ShardedLMDBDataset(a)
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json' is not valid JSON"):
        ShardedLMDBDataset(b)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShardedLMDBDataset(tmp_path / "nowhere")


def test_bad_sources(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere' does not exist"):
        scan_folder(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError):
        scan_folder(folder / "notes.txt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        scan_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="needs every image inside a class folder; 'corrupt.png'"):
        scan_folder(folder, "subdir")
    with pytest.raises(ValueError, match="cannot read image 'corrupt.png'.*--strict"):
        build_shards(scan_folder(folder)[0], tmp_path / "s", size=8, strict=True, workers=0, progress=False)
    bad = [("x.png", 0, str(folder / "corrupt.png"))]
    with pytest.raises(ValueError, match="no readable images"):
        build_shards(bad, tmp_path / "t", size=8, workers=0, progress=False)
    with pytest.raises(ValueError, match="format must be one of"):
        build_shards(bad, tmp_path / "u", size=8, fmt="gif")


# ----------------------------------------------------------------------------- reading in workers


def test_dataloader_workers_read_each_record_once(tmp_path):
    build_shards(array_sources(30), tmp_path / "ds", size=8, num_shards=3, workers=0, progress=False)
    ds = ShardedLMDBDataset(tmp_path / "ds")
    ds[0]  # the parent opens an environment before the workers fork: they must not reuse it
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=2,
                                         generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        ids, labels = [], []
        for x, y in loader:
            ids += torch.round((x[:, 0, 0, 0] + 1) * 127.5 / 5).long().tolist()
            labels += y.tolist()
        order = np.argsort(ids)
        assert sorted(ids) == list(range(30))
        assert [labels[j] for j in order] == [i % 3 for i in range(30)]


def test_environment_reopened_in_new_process(tmp_path, monkeypatch):
    build_shards(array_sources(4), tmp_path / "ds", size=8, workers=0, progress=False)
    ds = ShardedLMDBDataset(tmp_path / "ds")
    x0, _ = ds[0]
    env = ds._envs[0]
    real = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real + 1)  # as seen by a forked worker
    x1, _ = ds[0]
    assert ds._envs[0] is not env and torch.equal(x0, x1)


def test_random_flip_uses_torch_rng(tmp_path):
    ramp = np.tile(np.arange(0, 240, 30, dtype=np.uint8)[None, :, None], (8, 1, 3))  # increases along width
    build_shards([("ramp", 0, ramp)], tmp_path / "ds", size=8, workers=0, progress=False)
    plain = ShardedLMDBDataset(tmp_path / "ds")[0][0]
    ds = ShardedLMDBDataset(tmp_path / "ds", flip=True)
    torch.manual_seed(0)
    draws = [ds[0][0] for _ in range(32)]
    flipped = [bool(torch.equal(x, plain.flip(-1))) for x in draws]
    assert all(f or torch.equal(x, plain) for f, x in zip(flipped, draws))
    assert 4 < sum(flipped) < 28
    torch.manual_seed(0)
    assert all(torch.equal(x, ds[0][0]) for x in draws)


# ----------------------------------------------------------------------------- the embedded default


def test_digits_default(tmp_path, monkeypatch):
    from omegaconf import OmegaConf
    from sklearn.datasets import load_digits

    monkeypatch.setenv("ARCEE_CACHE", str(tmp_path / "cache"))
    cfg = OmegaConf.load(ROOT / "configs" / "data" / "digits.yaml")
    train, val, full = (build_dataset(cfg, s) for s in ("train", "val", "all"))
    assert (len(train), len(val), len(full)) == (1617, 180, 1797)
    assert set(train.indices).isdisjoint(val.indices) and len(set(train.indices) | set(val.indices)) == 1797
    digits = load_digits()
    for i in [0, 1, 500, 1796]:
        x, label = full[i]
        j = int(full.sources[i].split("/")[-1])
        assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
        assert label == digits.target[j]
        down = ((x[0].double() + 1) / 2 * 16).reshape(8, 2, 8, 2).mean((1, 3)).numpy()  # undo the 2x upsampling
        assert np.abs(down - digits.images[j]).mean() < 1.0
    real = ensure_real_samples(cfg)
    pngs = sorted(real.glob("*.png"))
    assert len(pngs) == 1797
    np.testing.assert_array_equal(np.asarray(Image.open(pngs[500]))[..., None], full.read(500))
    assert ensure_real_samples(cfg) == real


def test_digits_cache_build_is_race_safe(tmp_path):
    code = "from arcee.data.digits import ensure_digits; print(ensure_digits(8, 1))"
    env = {**os.environ, "ARCEE_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    root = Path(outs[0][0].strip())
    assert outs[0][0] == outs[1][0] and read_manifest(root)["count"] == 1797
    assert verify_shards(root, progress=False) == []


# ----------------------------------------------------------------------------- latents


@pytest.fixture(scope="module")
def small_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


def test_encode_latents_round_trip(tmp_path, small_vae):
    from arcee.data import decode_latents, encode_images, encode_latents, load_vae

    pix = tmp_path / "pix"
    build_shards(array_sources(7, size=16), pix, size=16, num_shards=2, workers=0, progress=False)
    m = encode_latents(pix, tmp_path / "lat", str(small_vae), batch_size=3, flip_copy=True, device="cpu",
                       workers=2, progress=False)
    assert m["kind"] == "latent" and m["shape"] == [4, 4, 8, 8] and m["latent_scale"] == 0.18215
    assert [s["count"] for s in m["shards"]] == [4, 3] and m["count"] == 7
    assert verify_shards(tmp_path / "lat", progress=False) == []

    vae = load_vae(str(small_vae), "cpu")
    x = torch.stack([ShardedLMDBDataset(pix)[i][0] for i in range(7)])
    mean, std = encode_images(vae, x)  # direct encode, one batch
    mean_f, std_f = encode_images(vae, x.flip(-1))
    lat = ShardedLMDBDataset(tmp_path / "lat", image_size=8, channels=4, kind="latent", latent_sample=False)
    stored = torch.stack([torch.from_numpy(lat.read(i)).float() for i in range(7)])  # (7, 4, C, h, w)
    for k, ref in enumerate((mean, std, mean_f, std_f)):
        torch.testing.assert_close(stored[:, k], ref.half().float(), rtol=2e-3, atol=2e-3)
    z, label = lat[2]
    assert label == 2 and z.dtype == torch.float32
    torch.testing.assert_close(z, stored[2, 0] * 0.18215)
    assert decode_latents(vae, z[None]).shape == (1, 3, 16, 16)

    sampled = ShardedLMDBDataset(tmp_path / "lat", latent_sample=True)
    eps = torch.stack([(sampled[i][0] / 0.18215 - stored[i, 0]) / stored[i, 1] for i in range(7)])
    assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1  # z = mean + std * N(0, I)

    flipping = ShardedLMDBDataset(tmp_path / "lat", flip=True, latent_sample=False)
    got = [flipping[0][0] for _ in range(16)]
    is_flip = [torch.allclose(g, stored[0, 2] * 0.18215) for g in got]  # the flipped image's encoding
    assert all(f or torch.allclose(g, stored[0, 0] * 0.18215) for f, g in zip(is_flip, got)) and 0 < sum(is_flip) < 16

    cfg = {"name": "lat", "path": str(tmp_path / "lat"), "kind": "latent", "image_size": 8, "channels": 4,
           "latent_scale": 0.18215}
    assert len(build_dataset(cfg)) == 7
    with pytest.raises(ValueError, match="encoded for latent_scale=0.18215"):
        build_dataset({**cfg, "latent_scale": 0.13025})
    real = ensure_real_samples(cfg)  # from the pixel shards the latents came from
    assert real.parent.resolve() == pix.resolve() and len(list(real.glob("*.png"))) == 7


def test_load_vae_errors_say_how_to_fix():
    from arcee.data import load_vae

    with pytest.raises(RuntimeError, match="hf download arcee-test/no-such-vae"):
        load_vae("arcee-test/no-such-vae", "cpu", local_files_only=True)
    with pytest.raises(FileNotFoundError, match="VAE folder '/no/such/vae' does not exist"):
        load_vae("/no/such/vae")


# ----------------------------------------------------------------------------- command line


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "data_prep", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_cli_build_verify(folder, tmp_path):
    out = tmp_path / "ds"
    r = cli("build", folder, out, "--size", 12, "--shards", 2, "--format", "png", "--workers", 2, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "6 records in 2 shard(s)" in r.stdout and "warning: skipped 1 unreadable" in r.stderr
    build(folder, tmp_path / "here", fmt="png")  # another process, other worker count: same bytes
    assert files(out) == files(tmp_path / "here")
    r = cli("verify", out, "--quiet")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr
    r = cli("real-samples", out, tmp_path / "real", "--quiet")
    assert r.returncode == 0 and len(list((tmp_path / "real").glob("*.png"))) == 6
    flip_byte_in_value(out, 0, 1)
    r = cli("verify", out, "--quiet")
    assert r.returncode == 1 and "shard_0000.lmdb key '1' (source 'a/const_rgb.png'): checksum mismatch" in r.stderr
    r = cli("real-samples", out, tmp_path / "real2", "--quiet")  # the damaged PNG no longer decodes
    assert r.returncode == 2 and "shard_0000.lmdb' key '1' (source 'a/const_rgb.png')" in r.stderr
    assert not (tmp_path / "real2").exists()
    r = cli("build", folder, tmp_path / "strict", "--size", 12, "--strict", "--workers", 0, "--quiet")
    assert r.returncode == 2 and "cannot read image 'corrupt.png'" in r.stderr
    r = cli("build", tmp_path / "nowhere", tmp_path / "x", "--size", 12)
    assert r.returncode == 2 and "does not exist" in r.stderr
