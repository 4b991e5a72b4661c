"""The digits reproduction (scripts/digits_repro.py) end to end at a tiny step count, its held-out
loss against an independent float64 formula, and the digits classifier that defines its FD."""
import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = {"name": "digits", "path": None, "kind": "pixel", "image_size": 16, "channels": 1, "num_classes": 0,
        "val_fraction": 0.1}
EPOCHS = 3  # enough for > 90 % val accuracy; the e2e run reuses this classifier from the cache


def load_script():
    spec = importlib.util.spec_from_file_location("digits_repro", ROOT / "scripts" / "digits_repro.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private $ARCEE_CACHE (digits shards, classifier, FD reference stats) for this module."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("arcee_cache")
        mp.setenv("ARCEE_CACHE", str(path))
        mp.setenv("OMP_NUM_THREADS", "1")
        yield path


@pytest.fixture(scope="module")
def classifier(cache):
    from arcee.metrics.digits_classifier import train_digits_classifier

    return train_digits_classifier(DATA, epochs=EPOCHS)


def split(name):
    from arcee.data import build_dataset

    ds = build_dataset(DATA, split=name)
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


def test_classifier_accuracy_cache_and_features(classifier, cache, monkeypatch):
    from arcee.metrics import build_feature_extractor
    from arcee.metrics import digits_classifier as dc

    # accuracy on the 180 held-out digits, recomputed here from the logits
    xv, yv = split("val")
    assert len(xv) == 180
    with torch.no_grad():
        acc = (classifier(xv).argmax(1) == yv).double().mean().item()
    assert acc >= 0.9 and acc == pytest.approx(classifier.val_accuracy, abs=1e-6)

    # the second call is a cache hit: same weights, no training step taken
    monkeypatch.setattr(dc.F, "cross_entropy", lambda *a, **k: pytest.fail("retrained despite the cache"))
    again = dc.train_digits_classifier(DATA, epochs=EPOCHS)
    assert classifier.cache_path.is_file() and classifier.cache_path.parent == cache / "digits_classifier"
    for k, v in classifier.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert again.val_accuracy == classifier.val_accuracy

    # clean-fid's input ((b, 3, h, w) gray replicated, [0, 255]) -> the penultimate layer of [-1, 1] pixels
    xt, _ = split("train")
    rgb255 = ((xt + 1) * 127.5).expand(-1, 3, -1, -1)
    with torch.no_grad():
        f = dc.DigitsFeatures(classifier)(rgb255).double()
        body = classifier.body[:-1](xt)                              # up to the last Linear, independently
        lin = classifier.body[-1]
        ref = (body.double() @ lin.weight.double().T + lin.bias.double()) * float(classifier.feature_scale)
    assert f.shape == (len(xt), dc.FEATURE_DIM)
    torch.testing.assert_close(f, ref, rtol=1e-4, atol=1e-4)
    assert f.var(0).mean().item() == pytest.approx(1.0, rel=1e-3)   # normalised on the training images
    with pytest.raises(ValueError, match=r"\(b, 3, 16, 16\)"):
        dc.DigitsFeatures(classifier)(torch.zeros(2, 1, 16, 16))

    # accepted by arcee.metrics as a custom extractor at native resolution
    ext = build_feature_extractor(dc.DigitsFeatures(classifier), device="cpu", resize=False)
    assert ext.fn_resize is not None and "DigitsFeatures" in ext.name


def test_heldout_loss_matches_float64_formula():
    from arcee.flow import build_transport

    repro = load_script()
    g = torch.Generator().manual_seed(3)
    x1 = torch.rand(10, 1, 4, 4, generator=g) * 2 - 1
    w = torch.randn(16, 16, generator=g) / 4

    def model(x, t):  # any deterministic function of (x_t, t)
        return (x.flatten(1) @ w.to(x.dtype)).view_as(x) * (1 + t.view(-1, 1, 1, 1)) - 0.3

    draws = repro.heldout_draws(tuple(x1.shape), repeats=3)
    again = repro.heldout_draws(tuple(x1.shape), repeats=3)
    other = repro.heldout_draws(tuple(x1.shape), repeats=3, seed=repro.LOSS_SEED + 1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(draws, again))
    assert not torch.equal(draws[0][1], other[0][1])

    got = repro.heldout_loss(model, build_transport({"path": "linear"}), x1, draws, batch_size=4)
    want = []
    for t, x0 in draws:  # linear path: x_t = t x1 + (1 - t) x0, target velocity x1 - x0
        t, x0, xd = t.double().view(-1, 1, 1, 1), x0.double(), x1.double()
        pred = model(t * xd + (1 - t) * x0, t.view(-1))
        want.append((pred - (xd - x0)).square().flatten(1).mean(1))
    assert got == pytest.approx(torch.cat(want).mean().item(), rel=1e-5)


def test_reproduction_end_to_end(classifier, tmp_path):
    repro = load_script()
    out, docs = tmp_path / "runs", tmp_path / "docs"
    argv = ["--steps", "3", "--seeds", "0", "--variants", "zigma1,zigma1_arcee", "--num-samples", "6",
            "--sample-steps", "1", "--loss-repeats", "1", "--classifier-epochs", str(EPOCHS),
            "--out", str(out), "--docs", str(docs)]
    t0 = time.perf_counter()
    result = repro.main(argv)
    first = time.perf_counter() - t0

    saved = json.loads((docs / "results.json").read_text())
    assert [(r["variant"], r["seed"], r["step"]) for r in saved["runs"]] == [("zigma1", 0, 3), ("zigma1_arcee", 0, 3)]
    for r in saved["runs"]:
        assert math.isfinite(r["heldout_loss"]) and math.isfinite(r["fd"]) and r["nfe_per_image"] == 1
        assert Path(r["run_dir"]).parent.parent == out and (Path(r["run_dir"]) / "ema_final.safetensors").is_file()
        assert [s for s, _ in r["curve"]] == [3]                        # metrics.jsonl read back
    assert saved["classifier"]["val_accuracy"] == classifier.val_accuracy   # the cached classifier was used
    assert saved["paired"]["Zigma-1 + Arcee - Zigma-1"]["fd"] == [saved["runs"][1]["fd"] - saved["runs"][0]["fd"]]
    assert saved["machine"]["torch"] == torch.__version__ and "scripts/digits_repro.py --steps 3" in saved["command"]
    md = (docs / "results.md").read_text()
    assert "| Zigma-1 |" in md and "| Zigma-1 + Arcee |" in md and saved["command"] in md
    for png in ("results.png", "samples.png"):
        with Image.open(docs / png) as im:
            assert im.format == "PNG" and im.size[0] > 100

    # --report-only rewrites the table from results.json alone
    (docs / "results.md").unlink()
    assert repro.main(argv + ["--report-only"])["runs"] == saved["runs"]
    assert (docs / "results.md").read_text() == md

    # rerunning the command retrains nothing and reproduces the numbers (fixed draws and noise)
    again = repro.main(argv)
    assert again["train_seconds"] < 0.5 * first
    for a, b in zip(result["runs"], again["runs"]):
        assert a["heldout_loss"] == b["heldout_loss"] and a["fd"] == pytest.approx(b["fd"], rel=1e-9)


def test_bad_arguments_name_the_flag(capsys):
    repro = load_script()
    with pytest.raises(SystemExit):
        repro.parse_args(["--variants", "zigma3"])
    assert "configs/experiment/digits_zigma3.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        repro.parse_args(["--num-samples", "1"])
    assert "--num-samples" in capsys.readouterr().err
