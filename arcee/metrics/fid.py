"""FID and KID with clean-fid: folders, checkpoints in memory (clean-fid's `gen=` path), cached references.

Features come from clean-fid's own pipeline (`get_files_features` / `get_model_features`,
its resizers per mode, its `frechet_distance` and `kernel_distance`). What arcee adds:
reference features cached on disk under a key derived from the reference folder's content,
per-index deterministic generation shared with `sample.py`, input checks, custom feature
extractors, and a clear error when the Inception weights cannot be downloaded.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib
import inspect
import json
import os
import sys
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from arcee.errors import UserError, is_int, require
from arcee.io import atomic_path

MODES = ("clean", "legacy_pytorch", "legacy_tensorflow")
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """`$ARCEE_CACHE/fid_stats` (default ~/.cache/arcee/fid_stats)."""
    from arcee.data import cache_dir
    return cache_dir() / "fid_stats"


# ----------------------------------------------------------------------------- feature extractors

@dataclasses.dataclass
class FeatureExtractor:
    """fn: (b, 3, H, W) float in [0, 255] -> (b, d) features; name: its identity in the stats cache;
    fn_resize: per-image (h, w, 3) numpy transform before fn (None: clean-fid's resizer of the mode)."""

    fn: Callable
    name: str
    fn_resize: Callable | None = None


def build_feature_extractor(spec="inception", mode: str = "clean", device=None, resize: bool = True,
                            name: str | None = None) -> FeatureExtractor:
    """Inception (clean-fid, per `mode`) or a custom extractor.

    `spec`: "inception"; a torch module or callable; "package.module:attr" (a module instance, a
    class or factory called without arguments, or an extractor function); a TorchScript file (.pt / .pth).
    Custom extractors receive what clean-fid feeds Inception (299x299 after the mode's resize),
    or the images at their own resolution when `resize=False` (e.g. a digits classifier).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if spec is None or spec == "inception":
        return FeatureExtractor(_load_inception(mode, device), f"inception-{mode}")
    if isinstance(spec, str):
        if spec.endswith((".pt", ".pth")) and name is None and os.path.isfile(spec):
            name = "torchscript-" + hashlib.sha256(Path(spec).read_bytes()).hexdigest()[:16]  # its bytes
        spec = _import_extractor(spec)
    if isinstance(spec, torch.nn.Module):
        spec = spec.to(device).eval()
    if not callable(spec):
        raise ValueError(f"feature_extractor must be 'inception', a torch module, a callable, "
                         f"'module:attr' or a TorchScript file, got {spec!r}")
    native = (lambda x: np.asarray(x, dtype=np.float32)) if not resize else None
    return FeatureExtractor(spec, name or _identity(spec) + ("" if resize else "-native"), native)


def _import_extractor(spec: str):
    if spec.endswith((".pt", ".pth")):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"feature_extractor: TorchScript file {spec} does not exist")
        return torch.jit.load(spec, map_location="cpu")
    mod, sep, attr = spec.partition(":")
    if not sep:
        raise ValueError(f"feature_extractor={spec!r}: expected 'inception', 'package.module:attr' or a .pt file")
    try:
        obj = getattr(importlib.import_module(mod), attr)
    except ImportError as e:
        raise ImportError(f"feature_extractor={spec!r}: cannot import module {mod!r} ({e}); it must be importable "
                          f"from the current directory or PYTHONPATH") from e
    except AttributeError:
        raise ValueError(f"feature_extractor={spec!r}: module {mod!r} has no attribute {attr!r}") from None
    if isinstance(obj, type) or (callable(obj) and not isinstance(obj, torch.nn.Module) and _takes_no_args(obj)):
        return obj()  # a class or a factory: called without arguments
    return obj  # a module instance or an extractor function (b, 3, H, W) -> (b, d)


def _takes_no_args(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _identity(fn) -> str:
    """Stable name of a custom extractor: its class and a hash of its weights."""
    kind = type(fn) if isinstance(fn, torch.nn.Module) else fn
    name = f"{getattr(kind, '__module__', '')}.{getattr(kind, '__qualname__', type(fn).__name__)}"
    if isinstance(fn, torch.nn.Module):
        h = hashlib.sha256(repr(fn).encode())  # the architecture (pooling sizes etc.) and the weights
        for k, v in fn.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        name += "-" + h.hexdigest()[:12]
    return name.replace("<", "").replace(">", "")


def inception_location(mode: str) -> tuple[str, str]:
    """(URL, local path) of the Inception weights clean-fid uses in `mode`."""
    from cleanfid import downloads_helper, inception_pytorch

    if mode == "legacy_pytorch":
        url = inception_pytorch.FID_WEIGHTS_URL
        return url, os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    return downloads_helper.inception_url, os.path.join("/tmp", "inception-2015-12-05.pt")


def _load_inception(mode: str, device):
    from arcee.net import unreachable

    url, path = inception_location(mode)
    why = None if os.path.exists(path) else unreachable(url)  # seconds, not the download's minutes of time-outs
    if why:
        raise UserError(
            f"cannot download the Inception weights for FID (mode={mode}): network unreachable ({why}). Download "
            f"{url} on a machine with internet access and place it at {path}, or pass "
            "feature_extractor=<custom module>.")
    from cleanfid.features import build_feature_extractor as cleanfid_extractor

    try:
        return cleanfid_extractor(mode, device, use_dataparallel=False)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise UserError(
            f"cannot download the Inception weights for FID (mode={mode}): network unreachable ({e}). "
            f"Download {url} on a machine with internet access and place it at {path}, or pass "
            f"feature_extractor=<custom module>.") from e
    except RuntimeError as e:
        if os.path.exists(path):
            raise UserError(f"the Inception weights at {path} cannot be loaded ({e}); the file is probably "
                            f"an interrupted download: delete it and place a complete copy of {url} there") from e
        raise


# ----------------------------------------------------------------------------- folders

def list_images(folder, what: str = "samples") -> list[str]:
    """Sorted image files under `folder` (recursive, as clean-fid), checked: one size, mode L or RGB."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: folder {folder} does not exist")
    files = sorted({f for ext in IMAGE_EXTENSIONS for e in (ext, ext.upper())
                    for f in glob.glob(os.path.join(glob.escape(str(folder)), f"**/*.{e}"), recursive=True)})
    if not files:
        raise ValueError(f"{what}: folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def sample_images(folder) -> tuple[list[str], str]:
    """The images of a sample folder to score, and a note on how they were chosen.

    A folder written by sample.py (its ``sampling.json`` records ``num_samples``): exactly
    ``000000.png .. {num_samples-1}.png``; a missing one is an error, other images are ignored
    (and named in the note). Any other folder: every image under it (recursive, as clean-fid).
    """
    from arcee.sample.generate import MANIFEST, png_name

    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        files = list_images(folder, "samples")
        return files, f"{folder} has no {MANIFEST}: scoring all {len(files)} images found under it (recursive)"
    try:
        n = json.loads(manifest.read_text())["num_samples"]
        if not is_int(n) or n < 0:
            raise ValueError(f"num_samples={n!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"samples: {manifest} is unreadable or lacks num_samples ({e}); re-run sample.py on "
                         f"{folder} with the same settings to rewrite it") from None
    files = [str(folder / png_name(i)) for i in range(n)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise ValueError(f"samples: {folder} is incomplete: {MANIFEST} lists {n} images but {len(missing)} are "
                         f"missing (e.g. {Path(missing[0]).name}); re-run sample.py with the same settings to finish it")
    listed = set(files)
    others = [os.path.relpath(f, folder) for f in list_images(folder, "samples") if f not in listed]
    note = (f"{folder}: scoring the {n} images {MANIFEST} lists; ignoring {len(others)} other image(s) "
            f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})") if others else ""
    return files, note


def image_format(files, what: str = "samples") -> tuple[int, int]:
    """Common (height, width) of `files`; raises on mixed sizes or modes other than L / RGB."""
    size = None
    for f in files:
        try:
            with Image.open(f) as im:
                mode, s = im.mode, im.size
        except Exception as e:
            raise ValueError(f"{what}: cannot read image {f}: {e}") from e
        if mode not in ("L", "RGB"):
            raise ValueError(f"{what}: image {f} has mode {mode}; expected L (grayscale) or RGB")
        if size is None:
            size, first = s, f
        elif s != size:
            raise ValueError(f"{what}: image {f} is {s[0]}x{s[1]} but {first} is {size[0]}x{size[1]}; "
                             f"all images must have one size")
    return size[1], size[0]


def folder_key(files, root) -> str:
    """Content key of a folder: sha256 over sorted (relative name, size, mtime_ns)."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def files_features(files, extractor: FeatureExtractor, mode: str, batch_size: int = 64, num_workers: int = 0,
                   device=None, verbose: bool = False, desc: str = "") -> np.ndarray:
    """(n, d) features of image files through clean-fid's resize + feature pipeline."""
    from cleanfid.fid import get_files_features

    return get_files_features(files, model=extractor.fn, num_workers=num_workers, batch_size=batch_size,
                              device=_device(device), mode=mode, custom_fn_resize=extractor.fn_resize,
                              description=desc, verbose=verbose)


@dataclasses.dataclass
class Reference:
    """Features of the reference folder with their mean / covariance (cached on disk)."""

    feats: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    size: tuple[int, int]
    path: Path | None = None
    cached: bool = False


def stats_of(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def reference_stats(real, extractor: FeatureExtractor, mode: str = "clean", cache_dir=None,
                    batch_size: int = 64, num_workers: int = 0, device=None, verbose: bool = False) -> Reference:
    """Reference features of folder `real`, computed once per content and cached in `cache_dir`.

    The cache file name holds the folder name, a hash of (folder path, mode, extractor) and a
    hash of the folder's content (file names, sizes, mtimes): editing the folder yields a new
    key, and the stale file of the same (folder, mode, extractor) is removed.
    """
    files = list_images(real, "real")
    root = os.path.abspath(real)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    ident = hashlib.sha256(f"{root}\0{mode}\0{extractor.name}\0{_CACHE_VERSION}".encode()).hexdigest()[:10]
    prefix = f"{Path(root).name}-{ident}-"
    path = cache_dir / f"{prefix}{folder_key(files, root)[:20]}.npz"
    if path.is_file():
        with np.load(path) as z:
            return Reference(z["feats"], z["mu"], z["sigma"], tuple(int(v) for v in z["size"]), path, cached=True)
    size = image_format(files, "real")
    feats = files_features(files, extractor, mode, batch_size, num_workers, device, verbose, f"real {Path(root).name}")
    mu, sigma = stats_of(feats)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, feats=feats, mu=mu, sigma=sigma, size=np.array(size),
                 meta=json.dumps({"folder": root, "mode": mode, "extractor": extractor.name, "n": len(files)}))
    for stale in cache_dir.glob(f"{glob.escape(prefix)}*.npz"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return Reference(feats, mu, sigma, size, path, cached=False)


# ----------------------------------------------------------------------------- scores

def fid_from_feats(feats: np.ndarray, ref: Reference) -> float:
    """Frechet distance (clean-fid's) between N(mean, cov) of `feats` and the reference."""
    from cleanfid.fid import frechet_distance

    if len(feats) < 2:
        raise ValueError(f"FID needs at least 2 samples, got {len(feats)}")
    mu, sigma = stats_of(feats)
    return float(frechet_distance(mu, sigma, ref.mu, ref.sigma))


def kid_from_feats(feats: np.ndarray, ref_feats: np.ndarray, num_subsets: int = 100,
                   max_subset_size: int = 1000, seed: int = 0) -> float:
    """clean-fid's KID (unbiased MMD^2, kernel (x.y/d + 1)^3, averaged over random subsets).

    Subsets are drawn from numpy's global RNG inside clean-fid: it is seeded here and restored.
    """
    from cleanfid.fid import kernel_distance

    m = min(len(feats), len(ref_feats), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {len(feats)} samples and "
                         f"{len(ref_feats)} reference images (max_subset_size={max_subset_size})")
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(kernel_distance(ref_feats, feats, num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)


# ----------------------------------------------------------------------------- generator mode

class IndexedGenerator:
    """clean-fid `gen`: each call returns the next samples of `indices`, in order, as (b, 3, h, w) in [0, 255].

    The latent z clean-fid passes is ignored: noise comes from (seed, index) as in sample.py. clean-fid
    asks for full batches; the last one is padded with copies and truncated by clean-fid.
    """

    def __init__(self, sampler, indices, size=None):
        self.sampler, self.indices, self.size, self.pos, self.nfe = sampler, list(indices), size, 0, []

    def __call__(self, z):
        b = z.shape[0]
        idx = self.indices[self.pos:self.pos + b]
        self.pos += len(idx)
        if not idx:
            raise RuntimeError("IndexedGenerator: asked for more samples than scheduled")
        images, nfe = self.sampler(idx)
        if self.size is not None and tuple(images.shape[1:3]) != tuple(self.size):
            raise ValueError(f"generated images are {images.shape[1]}x{images.shape[2]} (h x w) but the "
                             f"reference images are {self.size[0]}x{self.size[1]}")
        self.nfe.append((len(idx), nfe))
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return torch.cat([x, x[-1:].expand(b - len(idx), -1, -1, -1)]) if len(idx) < b else x


def model_features(sampler, num_samples: int, extractor: FeatureExtractor, mode: str = "clean",
                   batch_size: int = 64, device=None, state=None, verbose: bool = False, size=None):
    """(num_samples, d) features of samples 0..num_samples-1 of `sampler`, without PNGs.

    With an accelerate `state` of several processes, global batches [k B, (k+1) B) are shared
    round-robin (as in sample_folder) and the features gathered on every process.
    Returns (features, NFE per image).
    """
    from cleanfid.fid import get_model_features

    batches = [list(range(s, min(s + batch_size, num_samples))) for s in range(0, num_samples, batch_size)]
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    mine = [i for b in batches[rank::world] for i in b]
    gen = IndexedGenerator(sampler, mine, size)
    feats = (get_model_features(gen, extractor.fn, mode=mode, num_gen=len(mine), batch_size=batch_size,
                                device=_device(device), custom_fn_resize=extractor.fn_resize,
                                verbose=verbose and rank == 0, desc="FID model: ")
             if mine else None)
    nfe = gen.nfe
    if world > 1:
        from accelerate.utils import gather_object
        parts = gather_object([(mine, feats, nfe)])
        order = np.argsort(np.concatenate([p[0] for p in parts if p[0]]))
        feats = np.concatenate([p[1] for p in parts if p[0]])[order]
        nfe = [x for p in parts for x in p[2]]
    return feats, sum(n * f for n, f in nfe) / sum(n for n, _ in nfe)


def _device(device):
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ----------------------------------------------------------------------------- the evaluator

class Evaluator:
    """FID / KID against one reference folder; offline evaluation and the trainer share it.

    >>> ev = Evaluator("real_samples/")                   # Inception, mode "clean"
    >>> ev.folder("samples/")                             # {"fid": ..., "kid": ..., ...}
    >>> ev.model(ema_model, cfg, num_samples=5000)        # generator mode (in-training FID)
    >>> ev.checkpoint("runs/.../step_0050000", 50000)     # load_generator + generator mode
    """

    def __init__(self, real, mode: str = "clean", feature_extractor="inception", resize: bool = True,
                 cache_dir=None, batch_size: int = 64, num_workers: int = 0, device=None, kid: bool = True,
                 kid_subsets: int = 100, kid_subset_size: int = 1000, verbose: bool = True):
        if real is None:
            raise ValueError("real: path of the reference folder (real_samples/) is required")
        require(is_int(batch_size) and batch_size >= 1, "batch_size", batch_size, "an integer >= 1")
        require(is_int(num_workers) and num_workers >= 0, "num_workers", num_workers, "an integer >= 0")
        require(is_int(kid_subsets) and kid_subsets >= 1, "kid_subsets", kid_subsets, "an integer >= 1")
        require(is_int(kid_subset_size) and kid_subset_size >= 2, "kid_subset_size", kid_subset_size,
                "an integer >= 2")
        self.real, self.mode, self.device = Path(real), mode, _device(device)
        if not self.real.is_dir():  # before the feature extractor is built (Inception: a download)
            raise FileNotFoundError(f"real: folder {real} does not exist")
        self.extractor = (feature_extractor if isinstance(feature_extractor, FeatureExtractor)
                          else build_feature_extractor(feature_extractor, mode, self.device, resize))
        self.cache_dir, self.batch_size, self.num_workers = cache_dir, batch_size, num_workers
        self.kid, self.kid_subsets, self.kid_subset_size, self.verbose = kid, kid_subsets, kid_subset_size, verbose
        self._ref = None

    @property
    def reference(self) -> Reference:
        if self._ref is None:
            self._ref = reference_stats(self.real, self.extractor, self.mode, self.cache_dir, self.batch_size,
                                        self.num_workers, self.device, self.verbose)
        return self._ref

    def scores(self, feats: np.ndarray) -> dict:
        ref = self.reference
        out = {"fid": fid_from_feats(feats, ref), "num_samples": len(feats), "num_real": len(ref.feats)}
        if self.kid:
            out["kid"] = kid_from_feats(feats, ref.feats, self.kid_subsets, self.kid_subset_size)
        return out

    def folder(self, samples) -> dict:
        """Scores of the images of folder `samples` (those its sampling.json lists, else all; `sample_images`)."""
        t0 = time.perf_counter()
        files, note = sample_images(samples)
        if note and self.verbose:
            print(f"note: {note}", file=sys.stderr, flush=True)
        self.reference  # loaded (or computed) before any sample is read
        self._check_size(image_format(files, "samples"), f"samples folder {samples}")
        feats = files_features(files, self.extractor, self.mode, self.batch_size, self.num_workers, self.device,
                               self.verbose, f"samples {Path(samples).name}")
        return dict(self.scores(feats), seconds=time.perf_counter() - t0)

    def model(self, model, cfg, num_samples: int, seed: int = 0, state=None, **sampler_kwargs) -> dict:
        """Scores of samples 0..num_samples-1 of (model, cfg), generated in memory (same seeds as sample.py).

        sampler_kwargs: sampler, steps, atol, rtol, cfg_scale, class_label (ImageSampler).
        Under accelerate, call on every process with its `state`; each generates a share.
        """
        from arcee.sample.generate import ImageSampler

        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 for FID/KID, got {num_samples}")
        t0 = time.perf_counter()
        sampler = ImageSampler(model, cfg, seed=seed, **sampler_kwargs)
        ref = self.reference
        was_training = model.training
        model.eval()
        try:
            feats, nfe = model_features(sampler, num_samples, self.extractor, self.mode, self.batch_size,
                                        self.device, state, self.verbose, ref.size)
        finally:
            model.train(was_training)
        return dict(self.scores(feats), nfe_per_image=nfe, seconds=time.perf_counter() - t0)

    def checkpoint(self, ckpt, num_samples: int, use_ema: bool = True, seed: int = 0, state=None,
                   **sampler_kwargs) -> dict:
        from arcee.sample.loading import load_generator, read_step

        model, cfg = load_generator(ckpt, use_ema=use_ema, device=self.device)
        return dict(self.model(model, cfg, num_samples, seed, state, **sampler_kwargs), step=read_step(ckpt))

    def _check_size(self, size, what):
        ref = self.reference
        if tuple(size) != tuple(ref.size):
            raise ValueError(f"{what} are {size[0]}x{size[1]} (h x w) but the reference images in {self.real} "
                             f"are {ref.size[0]}x{ref.size[1]}")
