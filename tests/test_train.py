"""arcee.train on CPU: schema, data order, EMA, schedules, exact resume, NaN guard, CLI, 2 processes.

Tiny shapes (width 32, depth 2, d_state 4, 8x8 digits): most tests call `arcee.train.run`
in-process; the CLI, kill -9 / SIGTERM and two-process tests launch subprocesses.
"""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import arcee.flow
import arcee.models
import arcee.sample
import arcee.train
from arcee.train import EMA, ResumableBatchSampler, check_config, lr_at, read_events, read_metrics, run
from arcee.train import trainer as trainer_mod
from arcee.train.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
TINY = ["logger=disabled", "model.width=32", "model.depth=2", "model.d_state=4", "model.num_orders=2",
        "data.image_size=8", "train.batch_size=8", "train.log_every=2", "train.ckpt_every=2",
        "train.sample_every=0", "train.sample_n=4", "train.ema_decay=0.9", "train.ema_warmup=1",
        "flow.sampler=euler", "flow.steps=2", "train.digits_check=0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1")


def cfg_of(*overrides, base=TINY):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=[*base, *overrides])


def ckpt_tensors(folder: Path) -> dict:
    """Every tensor of a checkpoint: weights, EMA and the optimizer's moments."""
    out = {f"model/{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    out.update({f"ema/{k}": v for k, v in load_file(folder / "ema.safetensors").items()})
    opt = torch.load(folder / "optimizer.bin", weights_only=False)
    for i, s in opt["state"].items():
        out.update({f"opt/{i}/{k}": v for k, v in s.items() if torch.is_tensor(v)})
    return out


def cli(args, **kw):
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def wait_for(pred, proc, timeout=120):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early (rc {proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


# ------------------------------------------------------------------------------ pure parts


def step_batches(world, accum, cursor, steps, n=10, B=4, seed=7):
    """The global batch of each step: every rank's micro-batches concatenated."""
    its = [iter(ResumableBatchSampler(n, B, accum, r, world, seed, cursor)) for r in range(world)]
    out = []
    for _ in range(steps):
        batch = []
        for _ in range(accum):
            for it in its:
                micro = next(it)
                assert len(micro) == B // (accum * world)
                batch += micro
        out.append(sorted(batch))
    return out


def test_sampler_epochs_ranks_and_cursor():
    n, B = 10, 4
    one = step_batches(1, 1, 0, 10)
    stream = [i for b in step_batches(1, 1, 0, 10, B=1, n=n) for i in b] + \
        [i for b in step_batches(1, 1, 10, 30, B=1, n=n) for i in b]  # 40 samples = 4 epochs
    for e in range(4):  # every epoch is a permutation of the dataset, reshuffled
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n]
    assert one == [sorted(stream[s * B:(s + 1) * B]) for s in range(10)]  # the batch size only slices the stream
    for world, accum in ((2, 1), (4, 1), (2, 2)):  # the same samples per step for any process count
        assert step_batches(world, accum, 0, 10) == one
    assert step_batches(2, 1, 12, 7) == one[3:]  # resume mid-epoch at the global cursor, other world size


def test_ema_matches_closed_form():
    model = torch.nn.Linear(3, 1, bias=False)
    decay, warmup = 0.9, 2
    ema = EMA(model, decay, warmup)
    ref = None
    for step in range(1, 8):
        w = torch.randn(1, 3, dtype=torch.float64)
        model.weight.data.copy_(w)
        ema.update(model, step)
        ref = w.clone() if step <= warmup else decay * ref + (1 - decay) * w  # float64 reference
        assert torch.allclose(ema.model.weight.double(), ref, atol=1e-6)
    assert ema.model.weight.dtype == torch.float32 and not ema.model.weight.requires_grad


def test_lr_schedules():
    cfg = cfg_of("optim=adamw_cosine", "optim.warmup_steps=10", "optim.lr=1e-3", "optim.min_lr=1e-4")
    assert lr_at(0, cfg.optim, 110) == pytest.approx(1e-4)  # (step + 1) / warmup
    assert lr_at(9, cfg.optim, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg.optim, 110) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half-way: mean of lr and min_lr
    assert lr_at(110, cfg.optim, 110) == pytest.approx(1e-4)
    const = cfg_of("optim=adamw")  # the paper: constant, no warmup
    assert {lr_at(s, const.optim, 100) for s in (0, 50, 99)} == {3e-4}


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("override, match", [
    ("train.max_stepz=3", "max_stepz"),
    ("train.batch_size=abc", "batch_size"),
    ("train.mixed_precision=bf17", "mixed_precision"),
    ("logger.mode=loud", "logger.mode"),
])
def test_schema_rejects_at_compose(override, match):
    with pytest.raises(Exception, match=match):
        cfg_of(override)


@pytest.mark.parametrize("overrides, world, err, match", [
    (["+train.foo=1"], 1, ValueError, r"unknown key\(s\) \['foo'\] in train"),
    (["train.batch_size=10"], 4, ValueError, r"batch_size=10 .* divisible by num_processes \* train.grad_accum"),
    (["train.batch_size=8", "train.grad_accum=3"], 1, ValueError, "divisible"),
    (["data.image_size=9"], 1, ValueError, "image_size=9 .* divisible by model.patch_size=2"),
    (["data.path=/nonexistent/shards"], 1, FileNotFoundError, "data.path='/nonexistent/shards' does not exist"),
    (["data=celebahq_latent"], 1, ValueError, "data.path is required"),
    (["train.resume=/nonexistent/ckpt"], 1, FileNotFoundError, "train.resume"),
    (["train.ema_decay=1.0"], 1, ValueError, "ema_decay"),
])
def test_check_config_errors(overrides, world, err, match):
    with pytest.raises(err, match=match):
        check_config(cfg_of(*overrides), world)


def test_bad_input_fails_before_touching_the_run_folder(tmp_path):
    # indivisible image size: raised by run() before anything is written
    with pytest.raises(ValueError, match="divisible"):
        run(cfg_of("data.image_size=9"), tmp_path / "a")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    # an unreadable checkpoint
    bad = tmp_path / "bad" / "checkpoints" / "step_0000002"
    bad.mkdir(parents=True)
    (bad / "arcee_state.pt").write_bytes(b"not a torch file")
    (bad / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="step_0000002 has no SHA256SUMS"):  # unverifiable: never read
        run(cfg_of(f"train.resume={bad}", "train.max_steps=2"), tmp_path / "b")
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
    # a used run folder is never overwritten by a fresh run
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text("precious\n")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        run(cfg_of("train.resume=none", "train.max_steps=2"), used)
    assert (used / "metrics.jsonl").read_text() == "precious\n"


def test_experiments_compose_and_validate(tmp_path):
    names = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
    assert {"celebahq_zigma1", "celebahq_zigma1_arcee", "celebahq_vim", "celebahq_vim_arcee"} <= set(names)
    for name in names:
        cfg = cfg_of(f"experiment={name}", f"data.path={tmp_path}", base=[])
        check_config(cfg, num_processes=2)
        with torch.device("meta"):  # builds the module tree without allocating weights
            arcee.models.build_model(cfg.model)
        arcee.flow.build_transport(cfg.flow)
        if name.startswith("celebahq"):  # the paper's recipe (REFERENCE section 4)
            t, o = cfg.train, cfg.optim
            assert (t.batch_size, t.max_steps, t.grad_clip, t.ema_decay, t.ckpt_every) == \
                (192, 50000, 2.0, 0.9999, 10000)
            assert (o.lr, o.weight_decay, o.warmup_steps, str(o.schedule.value)) == (3e-4, 0.0, 0, "constant")
            assert (cfg.model.width, cfg.model.depth, cfg.model.d_state, cfg.data.name) == (
                768, 20 if "vim" in name else 24, 256, "celebahq_latent")  # Vim-B/2: depth 20 (Table 1)


# ------------------------------------------------------------------------------ the loop


def test_exact_resume_2n_equals_n_plus_n(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # logger=disabled must never import wandb
    common = ["train.grad_accum=2", "train.ckpt_every=3", "train.log_every=1"]
    run(cfg_of(*common, "train.max_steps=6", "train.sample_every=2"), tmp_path / "full")  # grids too
    half = run(cfg_of(*common, "train.max_steps=3"), tmp_path / "split")
    assert half["step"] == 3
    resumed = run(cfg_of(*common, "train.max_steps=6"), tmp_path / "split")  # train.resume=auto
    assert resumed["step"] == 6
    a = ckpt_tensors(tmp_path / "full" / "checkpoints" / "step_0000006")
    b = ckpt_tensors(tmp_path / "split" / "checkpoints" / "step_0000006")
    assert a.keys() == b.keys() and any(k.startswith("ema/") for k in a) and any(k.startswith("opt/") for k in a)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"not bit-identical after resume: {diff[:5]}"
    ema_final = load_file(tmp_path / "split" / "ema_final.safetensors")
    assert all(torch.equal(v, a[f"ema/{k}"]) for k, v in ema_final.items())
    # the logs: a resume event with restored RNG; the loss of steps 4..6 equal in both runs
    (ev,) = read_events(tmp_path / "split", "resume")
    assert ev["step"] == 3 and ev["rng"] == "restored"
    la = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full")}
    lb = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "split")}
    assert la == lb
    assert len(list((tmp_path / "full" / "samples").glob("*.png"))) == 3
    # keep_last=2: step 3 and 6 remain in both
    assert [s for s, _ in list_checkpoints(tmp_path / "full" / "checkpoints")] == [3, 6]


def test_nan_guard_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = trainer_mod.build_transport

    class PoisonAfter:  # the loss turns NaN from the 5th call (step 5) on
        def __init__(self, t):
            self.t, self.calls = t, 0

        def training_loss(self, *a, **k):
            self.calls += 1
            loss = self.t.training_loss(*a, **k)
            return loss * float("nan") if self.calls >= 5 else loss

        def __getattr__(self, name):
            return getattr(self.t, name)

    monkeypatch.setattr(trainer_mod, "build_transport", lambda c: PoisonAfter(real(c)))
    msg = r"non-finite loss .* steps 5 and 6.*Last good checkpoint: .*step_0000004"
    with pytest.raises(FloatingPointError, match=msg):
        run(cfg_of("train.max_steps=10", "train.log_every=100", "train.keep_last=5"), tmp_path)
    steps = [s for s, _ in list_checkpoints(tmp_path / "checkpoints")]
    assert steps == [2, 4]  # nothing saved after the NaN
    assert all(torch.isfinite(v).all() for v in ckpt_tensors(tmp_path / "checkpoints" / "step_0000004").values())
    assert not (tmp_path / "ema_final.safetensors").exists()


def test_in_training_fid_is_the_offline_fid(tmp_path):
    """train.fid_every logs FID/KID through arcee.metrics; the offline Evaluator on the exported
    EMA weights, with the same seeds and sampler (train.sample_sampler/steps), gives the same numbers."""
    pooled = torch.nn.AdaptiveAvgPool2d(1)  # (b, 3, 299, 299) -> (b, 3, 1, 1): 3 well-conditioned features
    extractor = torch.jit.script(torch.nn.Sequential(pooled, torch.nn.Flatten()))
    extractor.save(str(tmp_path / "feat.pt"))
    fid = [f"train.fid_feature_extractor={tmp_path / 'feat.pt'}", "train.fid_every=2", "train.fid_num_samples=12"]
    run(cfg_of(*fid, "train.max_steps=4"), tmp_path / "run")
    logged = {r["step"]: r for r in read_metrics(tmp_path / "run") if "fid/fid" in r}
    assert sorted(logged) == [2, 4] and all(math.isfinite(r["fid/fid"]) for r in logged.values())
    assert logged[2]["fid/fid"] != logged[4]["fid/fid"]  # the EMA model changed in between

    from arcee.data import ensure_real_samples
    from arcee.metrics import Evaluator
    model, cfg = arcee.sample.load_generator(tmp_path / "run" / "ema_final.safetensors")
    ev = Evaluator(ensure_real_samples(cfg.data), feature_extractor=str(tmp_path / "feat.pt"), verbose=False)
    solver = {k: v for k, v in (("sampler", cfg.train.sample_sampler), ("steps", cfg.train.sample_steps)) if v}
    offline = ev.model(model, cfg, 12, seed=cfg.seed, **solver)
    assert offline["fid"] == pytest.approx(logged[4]["fid/fid"], rel=1e-5)
    assert offline["kid"] == pytest.approx(logged[4]["fid/kid"], rel=1e-5, abs=1e-9)


# ------------------------------------------------------------------------------ subprocesses


def test_cli_smoke_run(tmp_path):
    out = tmp_path / "run"
    p = cli([*TINY, f"hydra.run.dir={out}", "train.max_steps=4", "train.sample_every=4"])
    log = p.communicate(timeout=300)[0]
    assert p.returncode == 0, log[-3000:]
    assert (out / "checkpoints" / "step_0000004" / "arcee_state.pt").is_file()
    assert (out / "samples" / "step_0000004.png").is_file()
    assert [r["step"] for r in read_metrics(out)] == [2, 4]
    assert (out / ".hydra" / "config.yaml").is_file()
    model, cfg = arcee.sample.load_generator(out / "ema_final.safetensors")
    assert cfg.train.max_steps == 4 and sum(p.numel() for p in model.parameters()) > 0


def test_kill9_then_resume_then_sigterm(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, f"hydra.run.dir={out}", "train.max_steps=100000", "train.keep_last=2"]
    p = cli(args)
    wait_for(lambda: len(list_checkpoints(out / "checkpoints")) >= 2, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # simulate an interrupted write and a foreign incomplete folder: neither may be picked
    latest = list_checkpoints(out / "checkpoints")[-1][0]
    (out / "checkpoints" / ".tmp_step_9999998").mkdir()
    (out / "checkpoints" / "step_9999999").mkdir()
    p = cli(args)  # resume=auto in the same run folder
    wait_for(lambda: any(e.get("event") == "resume" for e in read_events(out)) and
             read_metrics(out)[-1]["step"] >= latest + 4, p)
    p.send_signal(signal.SIGTERM)
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 0, log[-3000:]
    (resume,) = read_events(out, "resume")
    assert resume["step"] == latest and resume["checkpoint"].endswith(f"step_{latest:07d}")
    (pre,) = read_events(out, "preempted")
    stop = pre["step"]
    assert stop > latest and (out / "checkpoints" / f"step_{stop:07d}" / "arcee_state.pt").is_file()
    assert not (out / "checkpoints" / ".tmp_step_9999998").exists()
    assert "SIGTERM" in log


def test_two_processes_agree_and_resume_on_one(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train.py", *TINY,
           f"hydra.run.dir={out}", "train.max_steps=4"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    (start,) = read_events(out, "start")
    assert start["world_size"] == 2 and sorted(r[0] for r in start["ranks"]) == [0, 1]
    assert start["per_process_batch"] == 4
    (done,) = read_events(out, "done")
    assert len(done["weights_sha256"]) == 2 and len(set(done["weights_sha256"])) == 1  # ranks agree
    assert (out / "checkpoints" / "step_0000004" / "random_states_1.pkl").is_file()
    # continue on one process: the RNG is reseeded (and says so), the data cursor carries over
    summary = run(cfg_of("train.max_steps=6"), out)
    assert summary["step"] == 6
    (resume,) = read_events(out, "resume")
    assert resume["world_size"] == 1 and "reseeded" in resume["rng"] and resume["cursor"] == 4 * 8


def test_bf16_autocast_on_cpu(tmp_path):
    summary = run(cfg_of("train.mixed_precision=bf16", "train.max_steps=2"), tmp_path)
    assert summary["step"] == 2 and math.isfinite(summary["last"]["loss"])
    assert all(v.dtype == torch.float32 for v in load_file(tmp_path / "ema_final.safetensors").values())


def test_vae_on_the_fly(tmp_path):
    """Pixel data encoded every step by a (tiny, random) diffusers VAE: the model sees latents."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=8)
    vae.save_pretrained(tmp_path / "vae")
    run(cfg_of("train.encode_latents=true", "data.channels=3", f"data.vae={tmp_path / 'vae'}",
               "train.max_steps=2", "train.sample_every=2"), tmp_path / "run")
    model, cfg = arcee.sample.load_generator(tmp_path / "run" / "ema_final.safetensors")
    assert (cfg.data.kind, cfg.data.channels, cfg.data.image_size) == ("latent", 4, 4)  # 8 px / 2
    assert (cfg.model.in_channels, cfg.model.image_size) == (4, 4)
    from PIL import Image
    assert Image.open(tmp_path / "run" / "samples" / "step_0000002.png").mode == "RGB"  # decoded pixels


@pytest.mark.slow
def test_compile_matches_eager_loss(tmp_path):
    """train.compile=true (inductor on CPU: ~30 s of compilation) trains, close to eager."""
    eager = run(cfg_of("train.max_steps=2"), tmp_path / "eager")
    compiled = run(cfg_of("train.max_steps=2", "train.compile=true"), tmp_path / "compiled")
    assert compiled["last"]["loss"] == pytest.approx(eager["last"]["loss"], rel=1e-3)
