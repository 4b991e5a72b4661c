"""Are a digits generator's samples digits? Classifier FD and the confident fraction, beside real digits.

    report = digits_report(ema_model, cfg, num_samples=400, sampler="heun", steps=8)
    report["samples"]   # {"fd": ..., "confident": ..., "n": 400}: samples 0..399 of seed cfg.seed
    report["real"]      # the same two figures for 400 real digits of the reference (the floor)
    print(format_report(report))                        # what `python train.py` prints at the end

FD is the Frechet distance in the 64-d penultimate features of the digits classifier
(``arcee.metrics.digits_classifier``; the same FD as ``scripts/digits_repro.py``, computed by
``Evaluator.model``); ``confident`` is the fraction of images the classifier assigns to one digit
with softmax probability >= ``threshold``. Both figures are computed in one pass over the samples:
the feature extractor also keeps each image's top class probability.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .digits_classifier import DigitsFeatures, train_digits_classifier
from .fid import Evaluator, build_feature_extractor, fid_from_feats, list_images


class _ConfidenceRecorder(DigitsFeatures):
    """DigitsFeatures that also records the classifier's top softmax probability of every image it sees."""

    def __init__(self, classifier):
        super().__init__(classifier)
        self.top: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = super().forward(x)  # body(x) * feature_scale (a positive scalar): undo it for the head
        probs = self.classifier.head(feats / self.classifier.feature_scale).softmax(-1)
        self.top.append(probs.max(-1).values.detach().cpu())
        return feats

    def take(self) -> np.ndarray:
        top, self.top = (torch.cat(self.top).numpy() if self.top else np.zeros(0)), []
        return top


def digits_report(model, cfg, num_samples: int = 400, seed: int | None = None, threshold: float = 0.9,
                  real_seed: int = 0, classifier=None, verbose: bool = False, **sampler_kwargs) -> dict:
    """Classifier FD and confident fraction of samples ``0..num_samples-1`` of ``(model, cfg)`` and of
    ``num_samples`` real digits drawn from the reference (all digits at ``cfg.data``'s size).

    model: a generator on its device; cfg: its config (``data`` must be the digits, pixel space);
    seed: the sample noise (default ``cfg.seed``: the trainer's grid shows samples 0..63 of it);
    classifier: a ``DigitsClassifier`` (default: ``train_digits_classifier(cfg.data)``, trained once, cached);
    sampler_kwargs: sampler, steps, ... (``ImageSampler``). Returns
    ``{"samples": {"fd", "confident", "n"}, "real": {"fd", "confident", "n"}, "threshold", "nfe_per_image",
    "classifier_val_accuracy"}``.
    """
    if num_samples < 2:
        raise ValueError(f"digits_report: num_samples must be >= 2 (FD), got {num_samples}")
    data = cfg.data
    if data.get("kind", "pixel") != "pixel" or int(data.get("channels", 1)) != 1:
        raise ValueError(f"digits_report needs the grayscale pixel digits, got data.kind={data.get('kind')!r}, "
                         f"data.channels={data.get('channels')!r}")
    if classifier is None:
        classifier = train_digits_classifier(data, verbose=verbose)  # trained on first use (with grad), then cached
    with torch.no_grad():
        return _report(model, cfg, classifier, num_samples, cfg.seed if seed is None else seed, threshold, real_seed,
                       verbose, sampler_kwargs)


def _report(model, cfg, classifier, num_samples, seed, threshold, real_seed, verbose, sampler_kwargs) -> dict:
    from arcee.data import ensure_real_samples

    data = cfg.data
    recorder = _ConfidenceRecorder(classifier)
    device = next(model.parameters()).device
    extractor = build_feature_extractor(recorder, device=device, resize=False,
                                        name=build_feature_extractor(DigitsFeatures(classifier), resize=False,
                                                                     device="cpu").name)  # share its stats cache
    real = ensure_real_samples(data)
    ev = Evaluator(real, feature_extractor=extractor, device=device, kid=False, verbose=verbose)
    ref = ev.reference
    recorder.take()  # the reference pass (when not cached) is not ours
    scores = ev.model(model, cfg, num_samples, seed=seed, **sampler_kwargs)
    top = recorder.take()[:num_samples]  # clean-fid pads the last batch

    # real digits: a random subset of the reference (its cached features give FD; the PNGs, the confidence)
    idx = np.sort(np.random.default_rng(real_seed).choice(len(ref.feats), size=min(num_samples, len(ref.feats)),
                                                          replace=False))
    files = list_images(real, "real")
    pixels = np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in idx])  # (n, h, w, 3) uint8
    recorder(torch.from_numpy(pixels).permute(0, 3, 1, 2).float().to(device))
    real_top = recorder.take()
    return {"samples": {"fd": scores["fid"], "confident": float((top >= threshold).mean()), "n": len(top)},
            "real": {"fd": fid_from_feats(ref.feats[idx], ref), "confident": float((real_top >= threshold).mean()),
                     "n": len(idx)},
            "threshold": threshold, "nfe_per_image": scores["nfe_per_image"],
            "classifier_val_accuracy": classifier.val_accuracy}


def format_report(report: dict) -> str:
    """Two lines: the samples' and the real digits' FD and confident fraction."""
    s, r, th = report["samples"], report["real"], report["threshold"]
    return (f"digits check, {s['n']} EMA samples: classifier FD {s['fd']:.2f}, {100 * s['confident']:.1f} % "
            f"classified with confidence >= {th:g}\n"
            f"               {r['n']} real digits: classifier FD {r['fd']:.2f}, {100 * r['confident']:.1f} % "
            f"classified with confidence >= {th:g}")
