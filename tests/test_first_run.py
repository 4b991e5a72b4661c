"""What a newcomer meets after `python train.py`: the end-of-run digits check, the loss curve in the run
folder, the Hugging Face layout (save_pretrained / from_pretrained / Hub ids) and fast offline failures.

Tiny shapes (tests/test_train.py's TINY); the digits classifier is trained for 2 epochs into a
private $ARCEE_CACHE (the check's bookkeeping is tested, not the classifier's quality).
"""
import os
import socket
import struct
import sys
import threading
import time

import numpy as np
import pytest
import torch
from test_train import cfg_of

from arcee.train import read_events, run

DATA16 = {"name": "digits", "path": None, "kind": "pixel", "image_size": 16, "channels": 1, "num_classes": 0,
          "val_fraction": 0.1}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private $ARCEE_CACHE (digits shards, classifier, FD reference stats) for this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARCEE_CACHE", str(tmp_path_factory.mktemp("arcee_cache")))
        yield


@pytest.fixture(scope="module")
def tiny_run(cache, tmp_path_factory):
    """A 4-step run on 16x16 digits with checkpoints at steps 2 and 4 -> (run folder, summary)."""
    from arcee.metrics.digits_classifier import train_digits_classifier

    train_digits_classifier(DATA16, epochs=2, verbose=False)  # cached under the key the check does not use
    out = tmp_path_factory.mktemp("run")
    summary = run(cfg_of("data.image_size=16", "train.max_steps=4"), out)
    return out, summary


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


# ----------------------------------------------------------------------------- loss curve


def test_loss_curve_written_at_each_checkpoint(tiny_run, monkeypatch):
    from arcee.train import logger as logger_mod

    out, _ = tiny_run
    assert [e["step"] for e in read_events(out, "checkpoint")] == [2, 4]
    assert _png_size(out / "loss.png")[0] > 100  # a real figure, next to samples/ and metrics.jsonl
    calls = []
    real = logger_mod.plot_loss_curve
    monkeypatch.setattr("arcee.train.trainer.plot_loss_curve", lambda d: calls.append(real(d)))
    run(cfg_of("train.max_steps=6", "train.ckpt_every=3"), out / "again")
    assert len(calls) == 2 and all(p == out / "again" / "loss.png" for p in calls)  # steps 3 and 6


def test_loss_curve_without_matplotlib_warns_once(tiny_run, monkeypatch, caplog):
    from arcee.train import logger as logger_mod

    out, _ = tiny_run
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    monkeypatch.setattr(logger_mod, "_warned_no_matplotlib", False)
    with caplog.at_level("WARNING"):
        assert logger_mod.plot_loss_curve(out, out / "none.png") is None
        assert logger_mod.plot_loss_curve(out, out / "none.png") is None
    assert len(caplog.records) == 1 and "matplotlib" in caplog.records[0].getMessage()
    assert not (out / "none.png").exists()


# ----------------------------------------------------------------------------- digits check


def test_digits_report_counts_what_the_classifier_says(tiny_run):
    """The confident fraction and FD of digits_report against the classifier applied directly (no clean-fid
    batching, padding or feature recorder) to the same samples and to the same real digits."""
    from arcee.data import build_dataset, ensure_real_samples
    from arcee.metrics import Evaluator, build_feature_extractor
    from arcee.metrics.digits_classifier import DigitsFeatures, train_digits_classifier
    from arcee.metrics.digits_score import digits_report
    from arcee.sample import ImageSampler, load_generator

    out, _ = tiny_run
    model, cfg = load_generator(out / "ema_final.safetensors")
    clf = train_digits_classifier(DATA16, epochs=2, verbose=False)
    n = 70  # clean-fid batches of 64: the second one is padded
    report = digits_report(model, cfg, n, threshold=0.5, classifier=clf, sampler="euler", steps=2)
    images, _ = ImageSampler(model, cfg, seed=cfg.seed, sampler="euler", steps=2)(list(range(n)))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        top = clf(x).softmax(-1).max(-1).values
    assert report["samples"]["n"] == n
    assert report["samples"]["confident"] == pytest.approx(float((top >= 0.5).double().mean()))
    extractor = build_feature_extractor(DigitsFeatures(clf), device="cpu", resize=False)
    ev = Evaluator(ensure_real_samples(DATA16), feature_extractor=extractor, kid=False, verbose=False)
    assert report["samples"]["fd"] == pytest.approx(ev.model(model, cfg, n, seed=cfg.seed, sampler="euler",
                                                             steps=2)["fid"], rel=1e-6)
    # real digits: n drawn from all 1,797, classified from the dataset's tensors (not the PNGs)
    ds = build_dataset(DATA16, split="all")
    idx = np.sort(np.random.default_rng(0).choice(len(ds), size=n, replace=False))
    with torch.no_grad():
        real_top = clf(torch.stack([ds[int(i)][0] for i in idx])).softmax(-1).max(-1).values
    assert report["real"]["confident"] == pytest.approx(float((real_top >= 0.5).double().mean()))
    assert 0 < report["real"]["fd"] < report["samples"]["fd"]  # 4 training steps are not digits yet


def test_digits_check_at_the_end_of_a_run(cache, tmp_path, caplog, monkeypatch):
    from arcee.metrics import digits_score
    from arcee.metrics.digits_classifier import train_digits_classifier

    clf = train_digits_classifier(DATA16, epochs=2, verbose=False)  # the 10-epoch default costs ~25 CPU-s
    monkeypatch.setattr(digits_score, "train_digits_classifier", lambda data, verbose: clf)
    with caplog.at_level("INFO", logger="arcee.train"):
        run(cfg_of("data.image_size=16", "train.max_steps=2", "train.digits_check=8"), tmp_path)
    (check,) = read_events(tmp_path, "digits_check")
    assert check["samples_n"] == check["real_n"] == 8 and 0 <= check["samples_confident"] <= 1
    text = caplog.text
    assert "8 EMA samples: classifier FD" in text and "8 real digits: classifier FD" in text
    assert f"run folder: {tmp_path}" in text
    assert f"next: python sample.py ckpt={tmp_path / 'ema_final.safetensors'} out_dir=samples/" in text


def test_digits_check_config_error():
    from arcee.train import check_config

    with pytest.raises(ValueError, match=r"train.digits_check must be 0 \(off\) or >= 2"):
        check_config(cfg_of("train.digits_check=1"))


# ----------------------------------------------------------------------------- Hugging Face layout


def test_save_pretrained_from_pretrained_round_trip(tiny_run, tmp_path):
    from arcee.models.hub import ZigMaHub
    from arcee.sample import ImageSampler, load_generator
    from arcee.sample.export import export_pretrained

    out, _ = tiny_run
    folder = tmp_path / "exported"
    export_pretrained(out / "ema_final.safetensors", folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    ref, ref_cfg = load_generator(out / "ema_final.safetensors")
    hub = ZigMaHub.from_pretrained(folder)
    assert hub.config["model"] == dict(ref_cfg.model) and hub.config["flow"]["path"] == ref_cfg.flow.path
    x, t = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.rand(5)
    with torch.no_grad():
        assert torch.equal(hub(x, t), ref(x, t))
    # sample.py's loader takes the folder: the same images as from the export
    model, cfg = load_generator(folder)
    a, _ = ImageSampler(ref, ref_cfg, seed=3, sampler="euler", steps=3)([0, 1, 2])
    b, _ = ImageSampler(model, cfg, seed=3, sampler="euler", steps=3)([0, 1, 2])
    assert np.array_equal(a, b)
    with pytest.raises(FileExistsError, match="not empty"):
        export_pretrained(out / "ema_final.safetensors", folder)


def test_hub_id_offline_fails_fast_and_clearly(tiny_run, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from arcee.sample import load_generator
    from arcee.sample.export import export_pretrained

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 6761)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"ckpt=someone/digits: not a local file or folder.*hub\.invalid"):
        load_generator("someone/digits")
    assert time.perf_counter() - t0 < 15
    out, _ = tiny_run
    with pytest.raises(ConnectionError, match="cannot be reached.*hf upload someone/digits"):
        export_pretrained(out / "ema_final.safetensors", tmp_path / "pushed", push_to_hub="someone/digits")
    assert (tmp_path / "pushed" / "model.safetensors").is_file()  # written before the push was tried


# ----------------------------------------------------------------------------- offline failures


def test_unreachable():
    from arcee.net import unreachable

    t0 = time.perf_counter()
    assert "does not resolve" in unreachable("https://weights.invalid/x.pt")
    assert time.perf_counter() - t0 < 10
    with socket.socket() as server:  # a local server that accepts: reachable
        server.bind(("127.0.0.1", 0))
        server.listen()
        threading.Thread(target=lambda: server.accept()[0].close(), daemon=True).start()
        assert unreachable(f"http://127.0.0.1:{server.getsockname()[1]}/x") is None
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: refused
    assert "does not answer" in unreachable(f"http://127.0.0.1:{port}/x")


def test_inception_download_fails_fast_without_network(tmp_path, monkeypatch):
    from arcee.errors import UserError
    from arcee.metrics import fid

    monkeypatch.setattr(fid, "inception_location",
                        lambda mode: ("https://weights.invalid/inception.pt", str(tmp_path / "inception.pt")))
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"does not resolve.*place it at .*inception\.pt"):
        fid.build_feature_extractor("inception", device="cpu")
    assert time.perf_counter() - t0 < 10
    assert not os.path.exists(tmp_path / "inception.pt")
