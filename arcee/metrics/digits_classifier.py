"""A small CNN digits classifier whose penultimate layer is the feature space of a digits FID.

Inception features say little about 16x16 grayscale digits; the small-scale reproduction
(scripts/digits_repro.py) measures a Frechet distance in the feature space of this classifier
instead, trained first on the train split of the same data and cached by content:

    clf = train_digits_classifier(data_cfg)             # trains once, then loads from the cache
    clf.val_accuracy                                    # accuracy on the held-out val split
    ev = Evaluator(ensure_real_samples(data_cfg), feature_extractor=DigitsFeatures(clf), resize=False)

``DigitsFeatures`` takes what clean-fid feeds a feature extractor, ``(b, 3, H, W)`` floats in
``[0, 255]`` (grayscale replicated to RGB), at the images' own resolution (``resize=False``).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from arcee.io import atomic_path

VERSION = 3  # bump when the architecture or the training recipe changes: a new cache key
FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """(b, c, s, s) pixels in [-1, 1] -> (b, 10) logits; ``features`` gives the (b, 64) penultimate layer.

    Two conv stages (3x3 conv x2 + 2x2 max-pool), Linear (the features: the penultimate layer, taken
    before its ReLU so that no dead unit makes the feature covariance singular), ReLU, Linear.
    ``features`` are multiplied by the buffer ``feature_scale``, set after training so that the
    training images' features have unit mean variance per dimension: FD / KID values then do not
    depend on the arbitrary scale the classifier happened to learn.
    """

    def __init__(self, image_size: int = 16, channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4 (two 2x2 poolings), got {image_size}")
        self.image_size, self.channels = image_size, channels
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * w * (image_size // 4) ** 2, FEATURE_DIM))
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(FEATURE_DIM, num_classes))
        self.register_buffer("feature_scale", torch.ones(()))
        self.val_accuracy: float | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class DigitsFeatures(nn.Module):
    """Feature extractor for ``arcee.metrics`` (use with ``resize=False``): clean-fid's
    ``(b, 3, H, W)`` floats in ``[0, 255]`` -> the classifier's ``(b, 64)`` penultimate features.

    ``classifier=None``: the classifier of the embedded 16x16 grayscale digits (trained on first
    use, then cached), so ``feature_extractor="arcee.metrics.digits_classifier:DigitsFeatures"``
    works as a string too.
    """

    def __init__(self, classifier: DigitsClassifier | None = None):
        super().__init__()
        if classifier is None:
            classifier = train_digits_classifier({"name": "digits", "path": None, "kind": "pixel", "image_size": 16,
                                                  "channels": 1, "num_classes": 0, "val_fraction": 0.1})
        self.classifier = classifier.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self.classifier.channels, self.classifier.image_size
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (s, s):
            raise ValueError(f"DigitsFeatures expects (b, 3, {s}, {s}) images in [0, 255] (clean-fid with "
                             f"resize=False), got {tuple(x.shape)}")
        x = x.float() / 127.5 - 1.0
        return self.classifier.features(x[:, :1] if c == 1 else x)  # gray images arrive replicated to RGB


def _load_split(data_cfg, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from arcee.data import build_dataset

    ds = build_dataset(data_cfg, split=split)
    if ds.kind != "pixel":
        raise ValueError(f"train_digits_classifier needs pixel data, got data.kind={ds.kind!r}")
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


def _content_key(x: torch.Tensor, y: torch.Tensor, hparams: dict) -> str:
    h = hashlib.sha256(json.dumps(dict(hparams, version=VERSION), sort_keys=True).encode())
    h.update(x.numpy().tobytes())
    h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (background -1 fills the border)."""
    b, _, s, _ = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=g).tolist()
    return torch.stack([pad[i, :, dy[i]:dy[i] + s, dx[i]:dx[i] + s] for i in range(b)])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return float((pred == y).float().mean())


def train_digits_classifier(data_cfg, *, epochs: int = 10, batch_size: int = 64, lr: float = 2e-3,
                            seed: int = 0, cache: bool = True, cache_dir=None, verbose: bool = True
                            ) -> DigitsClassifier:
    """Train (or load from the cache) the classifier on ``split="train"`` of ``data_cfg``.

    data_cfg: a pixel data node with labels (``configs/data/digits.yaml``; ``num_classes`` may be 0:
    the labels stored in the shards are used). Deterministic for a given ``seed`` (CPU).
    The weights are cached as ``<cache_dir>/digits_classifier/<key>.safetensors`` (default
    ``arcee.data.digits.cache_dir()``), ``key`` a hash of the training pixels and labels, the
    hyperparameters and ``VERSION``. Returns the model in eval mode with ``val_accuracy`` set
    (accuracy on ``split="val"``; None when the data has no val split).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from arcee.data.digits import cache_dir as default_cache_dir

    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0, got epochs={epochs}, "
                         f"batch_size={batch_size}, lr={lr}")
    x, y = _load_split(data_cfg, "train")
    if int(y.min()) < 0 or int(y.max()) > 9:
        raise ValueError(f"train_digits_classifier needs labels 0..9, got {int(y.min())}..{int(y.max())}")
    _, c, s, _ = x.shape
    try:
        xv, yv = _load_split(data_cfg, "val")
    except ValueError:  # val_fraction = 0: no held-out split
        xv = yv = None
    hparams = dict(image_size=s, channels=c, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    path = Path(cache_dir or default_cache_dir()) / "digits_classifier" / f"{_content_key(x, y, hparams)}.safetensors"

    if cache and path.is_file():
        with torch.random.fork_rng():  # construction draws an init we overwrite: leave the caller's RNG alone
            model = DigitsClassifier(s, c)
        model.load_state_dict(load_file(str(path)))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if verbose:
            print(f"digits classifier: loaded {path}")
    else:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():  # the init draws from the global RNG: keep the caller's stream
            torch.manual_seed(seed)
            model = DigitsClassifier(s, c)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
            steps = epochs * -(-len(x) // batch_size)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
            for epoch in range(epochs):
                model.train()
                for idx in torch.randperm(len(x), generator=g).split(batch_size):
                    loss = F.cross_entropy(model(_shift(x[idx], g)), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
        with torch.no_grad():
            model.feature_scale.fill_(model.body(x).var(0).mean().rsqrt())
        meta = {"train_accuracy": f"{accuracy(model, x, y):.6f}", "hparams": json.dumps(hparams),
                "seconds": f"{time.perf_counter() - t0:.1f}"}
        if xv is not None:
            meta["val_accuracy"] = f"{accuracy(model, xv, yv):.6f}"
        if cache:
            with atomic_path(path) as tmp:
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata=meta)
        if verbose:
            print(f"digits classifier: trained {epochs} epochs on {len(x)} images in {meta['seconds']} s; "
                  f"val accuracy {meta.get('val_accuracy')}" + (f"; cached at {path}" if cache else ""))
    model.eval()
    model.val_accuracy = float(meta["val_accuracy"]) if "val_accuracy" in meta else None
    model.cache_path = path if cache else None
    return model


__all__ = ["DigitsClassifier", "DigitsFeatures", "train_digits_classifier", "accuracy",
           "FEATURE_DIM"]
