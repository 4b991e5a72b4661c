"""Every figure only a GPU can show, in one command (issue 16): kernels, training, sampling.

    scripts/gpu_check.sh                    # one CUDA device, under 8 min: JSON + markdown in benchmarks/results/
    scripts/gpu_check.sh --dry-run          # no GPU needed: every stage on CPU at tiny sizes (CI runs this)
    scripts/gpu_check.sh --fetch-wheels     # on a host with a package registry: .gpu_wheels/ for an offline device
    scripts/gpu_check.sh --only train_zigma1_bf16,sample --budget 200

Stages, in order (each in its own process, under its own timeout; a failure, hang or timeout is
recorded with the last lines of its output and the next stage runs):
  env            device, driver, torch / triton / CUDA versions; measured copy bandwidth and bf16 matmul rate
  pytest_gpu     `pytest -m gpu` (kernels vs the float64 reference), pass/fail per test
  scan           benchmarks/scan.py at its default shapes, fwd and fwd+bwd: Triton vs mamba_ssm
  kernel_static  benchmarks/kernel_static.py's static prediction for the same shapes, when that tool exists
  train_*        zigma_b2 (d_state 256), Zigma-1 and Zigma-1 + Arcee, bf16 autocast and fp32 + TF32,
                 synthetic 4x32x32 latents: images/s, forward/backward/optimizer ms, peak memory, loss falls
  sample         256 images with Heun and dopri5 (real NFE) from the trained B/2: images/s
  scan_reference Triton vs the eager sequential reference (paper shape at b=8: b=96 needs > 150 GB)
  multi_gpu      2-process `accelerate launch` train.py + sample.py (only with >= 2 CUDA devices)
  scan_compiled  Triton vs torch.compile of the reference (compiling the unrolled loop takes minutes: last)

A global budget (--budget, seconds) caps every stage's timeout so that the later stages keep at
least their reserve; a stage that no longer fits is recorded as skipped. Results: one JSON
`gpu_check_<device>_<date>.json` and a markdown summary beside it (also copied to $OUT when set).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from arcee.io import atomic_write_text  # noqa: E402  (stdlib only: safe before the set-up)

WHEELS = ROOT / ".gpu_wheels"
# Modules the stages import -> their distributions. The device image lacks the first four
# (/work/.library/device/KINDS.md); --fetch-wheels brings them, the set-up installs them.
REQUIRED = {"omegaconf": "omegaconf", "hydra": "hydra-core", "antlr4": "antlr4-python3-runtime", "lmdb": "lmdb",
            "einops": "einops", "torchdiffeq": "torchdiffeq", "safetensors": "safetensors",
            "accelerate": "accelerate", "triton": "triton", "pytest": "pytest"}
FETCH = {"pure": ("omegaconf", "hydra-core", "antlr4-python3-runtime"), "binary": ("lmdb",)}
PAPER_SHAPE, MAMBA_SHAPE = "96,1536,256,256", "64,1536,1024,16"  # benchmarks/scan.py's GPU defaults (b,d,l,n)
REF_SHAPES = ("8,1536,256,256", MAMBA_SHAPE)  # the reference's fp32 (b,d,n,l) intermediates: b=96 needs > 150 GB
DRY_SHAPES = ("1,8,16,4",)
TINY_MODEL = {"width": 32, "depth": 2, "d_state": 8}  # --dry-run: instead of B/2 (width 768, depth 24, d_state 256)
SAMPLE_SOURCE = "train_zigma1_arcee_bf16"  # its trained weights are what `sample` samples from
EXIT = {0: "pass", 3: "skipped", 4: "timeout"}  # a stage process's exit code -> status; anything else: fail


# ============================================================================ processes

def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, the process group we started `proc` in (its children too)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def spawn(cmd, log_path, env=None) -> subprocess.Popen:
    """Start `cmd` in ROOT in a new process group, stdout + stderr appended to `log_path`."""
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(map(str, cmd))}\n".encode())
        log.flush()
        return subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_or_kill(proc: subprocess.Popen, timeout: float, log_path) -> tuple[int | None, bool]:
    """-> (exit code, False), or (None, True) after killing its process group at `timeout` seconds."""
    try:
        return proc.wait(timeout=max(1.0, timeout)), False
    except subprocess.TimeoutExpired:
        kill_group(proc)
        with open(log_path, "ab") as log:
            log.write(f"\n[gpu_check] killed after {timeout:.0f} s\n".encode())
        return None, True
    except BaseException:  # Ctrl-C: leave nothing running
        kill_group(proc)
        raise


def run_logged(cmd, log_path, timeout, env=None) -> tuple[int | None, bool]:
    """Run `cmd` under `timeout`, output to `log_path`. -> (exit code or None, timed out)."""
    return wait_or_kill(spawn(cmd, log_path, env), timeout, log_path)


def tail(path, lines=20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def clean(obj):
    """JSON-safe: non-finite floats become the strings 'nan' / 'inf' / '-inf'."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


# ============================================================================ one stage (child process)

class Skip(Exception):
    """The stage does not apply here (no tool, one device, dry run); exit 3."""


class StageTimeout(Exception):
    """A command inside the stage ran out of the stage's time; what it measured is kept; exit 4."""


class CheckFailed(Exception):
    """The stage ran but a check failed (loss not finite / not falling, a kernel test failed)."""


class Ctx:
    """What a stage function gets: the work folder, dry-run flag, device, time left, and `save`."""

    def __init__(self, name: str, work: Path, dry: bool, timeout: float):
        self.name, self.work, self.dry = name, work, dry
        self.deadline = time.monotonic() + timeout
        self.figures: dict = {}

    @functools.cached_property
    def device(self):  # torch is imported only by the stages that use it (saves seconds per stage on CPU)
        import torch

        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @functools.cached_property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def remaining(self, margin: float = 5.0) -> float:
        return self.deadline - time.monotonic() - margin

    def save(self, **figures) -> None:
        """Merge into this stage's figures and write them now: a later timeout keeps them."""
        self.figures.update(figures)
        atomic_write_text(self.work / f"{self.name}.json", json.dumps(clean(self.figures), indent=1))

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def other(self, name: str) -> dict:
        """Another stage's saved figures ({} if it did not run)."""
        try:
            return json.loads((self.work / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {}


def time_ms(ctx: Ctx, fn, warmup=3, reps=10) -> float:
    """Median milliseconds of fn(): CUDA events on GPU, perf_counter on CPU."""
    import torch

    for _ in range(warmup):
        fn()
    ctx.sync()
    times = []
    for _ in range(reps):
        if ctx.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------- 1. env

def stage_env(ctx: Ctx):
    import torch

    f = dict(python=sys.version.split()[0], executable=sys.executable, platform=platform.platform(),
             cpu_count=os.cpu_count(), torch=torch.__version__, cuda_runtime=torch.version.cuda,
             cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             triton=version("triton"), packages={d: version(d) for d in sorted(set(REQUIRED.values()))},
             mamba_ssm=version("mamba-ssm") or version("mamba_ssm"), cuda_available=ctx.cuda,
             device_count=torch.cuda.device_count() if ctx.cuda else 0,
             triton_interpret=os.environ.get("TRITON_INTERPRET"))
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        f.update(device=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                 memory_gib=round(p.total_memory / 2**30, 1), l2_cache_mb=getattr(p, "L2_cache_size", 0) / 2**20)
        try:
            q = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
            out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20).stdout.strip().splitlines()
            f["nvidia_smi"] = [dict(zip(q.split(","), (v.strip() for v in line.split(",")))) for line in out]
            f["driver"] = f["nvidia_smi"][0]["driver_version"] if f["nvidia_smi"] else None
        except (OSError, subprocess.TimeoutExpired, IndexError, KeyError) as e:
            f["nvidia_smi"] = f"unavailable: {e}"
    else:
        f["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    ctx.save(**f)

    # the two ceilings (METHOD.md): a device-to-device copy (bytes read + written) and a bf16 matmul
    n, m = (2**30, 8192) if ctx.cuda else (2**22, 256)
    x = torch.randn(n // 1024, 1024, device=ctx.device, dtype=torch.bfloat16)  # random data, never zeros
    y = torch.empty_like(x)
    copy_ms = time_ms(ctx, lambda: y.copy_(x), reps=20)
    dt = torch.bfloat16 if ctx.cuda else torch.float32
    a, b = (torch.randn(m, m, device=ctx.device, dtype=dt) for _ in range(2))
    mm_ms = time_ms(ctx, lambda: a @ b)
    ctx.save(ceilings=dict(copy_GBps=2 * x.numel() * x.element_size() / copy_ms / 1e6, copy_bytes=2 * x.nbytes,
                           matmul_TFLOPs=2 * m**3 / mm_ms / 1e9, matmul_n=m, matmul_dtype=str(dt).split(".")[-1]))


# ---------------------------------------------------------------------------- 2. pytest -m gpu

_OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_NODEID = re.compile(r"(tests/\S+\.py::\S+)")


def parse_junit(path) -> dict:
    """junit XML -> {nodeid: {"outcome", "seconds", "message"?}}."""
    tests = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        nodeid = f"{cls.replace('.', '/')}.py::{name}" if cls else name
        outcome, message = "passed", None
        for tag, what in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            el = case.find(tag)
            if el is not None:
                outcome, message = what, (el.get("message") or "")[:300]
                break
        tests[nodeid] = dict(outcome=outcome, seconds=float(case.get("time", 0) or 0))
        if message:
            tests[nodeid]["message"] = message
    return tests


def parse_verbose(text: str) -> dict:
    """`pytest -v` lines (plain or pytest-xdist) -> {nodeid: {"outcome"}}: what finished before a timeout."""
    tests = {}
    for line in text.splitlines():
        node, outcome = _NODEID.search(line), _OUTCOME.search(line)
        if node and outcome:
            tests[node.group(1)] = dict(outcome=outcome.group(1).lower().replace("xpass", "passed"))
    return tests


def stage_pytest_gpu(ctx: Ctx):
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text(errors="replace"))
    junit, out = ctx.work / "pytest_gpu.xml", ctx.work / "pytest_gpu.out"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", f"--junitxml={junit}", *files]
    workers = min(8, (os.cpu_count() or 2) // 2)
    if not ctx.dry and importlib.util.find_spec("xdist") and workers > 1:
        cmd[3:3] = ["-n", str(workers)]  # Triton compiles the kernels of every shape: in parallel
    ctx.save(files=files, command=shlex.join(cmd))
    rc, timed_out = run_logged(cmd, out, ctx.remaining())
    text = out.read_text(errors="replace")
    tests = parse_junit(junit) if junit.is_file() and not timed_out else parse_verbose(text)
    counts = {k: sum(t["outcome"] == k for t in tests.values()) for k in ("passed", "failed", "error", "skipped")}
    ctx.save(returncode=rc, counts=counts, tests=tests, summary_line=next(
        (ln.strip("= ") for ln in reversed(text.splitlines()) if re.search(r"\d+ (passed|failed|skipped)", ln)), None))
    print(tail(out, 30))
    if timed_out:
        raise StageTimeout(f"pytest ran out of time after {sum(counts.values())} tests")
    if rc != 0 or counts["failed"] or counts["error"]:
        raise CheckFailed(f"pytest -m gpu: exit {rc}, {counts}")


# ---------------------------------------------------------------------------- 3. scan benchmarks

def _timing(r: dict, kind: str):
    """fwd / fwd_bwd ms of a backend row: the GPU JSON's `fwd_ms`, or the CPU JSON's `ms.fwd_<k>t` (fewest threads)."""
    if f"{kind}_ms" in r:
        return r[f"{kind}_ms"]
    key = {"fwd": "fwd", "fwd_bwd": "fb"}[kind]
    found = sorted((int(k[len(key) + 1:-1]), v) for k, v in (r.get("ms") or {}).items()
                   if re.fullmatch(rf"{key}_\d+t", k))
    return found[0][1] if found else None


def scan_figures(record: dict, ceilings: dict) -> list[dict]:
    """benchmarks/scan.py's JSON -> per shape: ms, speedup of triton over each peer, roof fractions."""
    hbm, mufu = (record.get("peaks") or {}).get("hbm_Bps"), (record.get("peaks") or {}).get("mufu_exp_per_s")
    copy = ceilings.get("copy_GBps")
    rows = []
    for res in record.get("results", []):
        s, backends = res["shape"], {}
        for peer, r in res["backends"].items():
            row = {f"{kind}_ms": _timing(r, kind) for kind in ("fwd", "fwd_bwd")}
            for kind in ("fwd", "fwd_bwd"):
                if f"{kind}_GBps" in r:
                    row[f"{kind}_GBps"] = r[f"{kind}_GBps"]
                    if hbm:
                        row[f"{kind}_frac_hbm"] = r[f"{kind}_GBps"] * 1e9 / hbm
                    if copy:
                        row[f"{kind}_frac_measured_copy"] = r[f"{kind}_GBps"] / copy
                if mufu and f"{kind}_exp_per_s" in r:
                    row[f"{kind}_frac_exp"] = r[f"{kind}_exp_per_s"] / mufu
            backends[peer] = row
        ours = backends.get("triton")
        speedup = {peer: {k: b[f"{k}_ms"] / ours[f"{k}_ms"] for k in ("fwd", "fwd_bwd")
                          if b[f"{k}_ms"] and ours[f"{k}_ms"]}
                   for peer, b in backends.items() if ours and peer != "triton"}
        rows.append(dict(shape=f"{s['b']},{s['d']},{s['l']},{s['n']}", backends=backends,
                         triton_speedup_over=speedup, work=res.get("work")))
    return rows


_AUTOTUNED = re.compile(r"Triton autotuning for function (\w+),\s*with key as (.*?),\s*finished after ([\d.]+)s,"
                        r"\s*best config selected: (.*?);", re.S)


def parse_autotuning(text: str) -> list[dict]:
    """Triton's TRITON_PRINT_AUTOTUNING=1 lines -> [{"function", "key", "seconds", "config"}]: the configs the
    GPU run used, to set beside kernel_static's prediction for each config."""
    return [dict(function=f, key=k, seconds=float(t), config=c.strip()) for f, k, t, c in _AUTOTUNED.findall(text)]


def run_scan(ctx: Ctx, shapes, peers, warmup, reps):
    """benchmarks/scan.py through its CLI, one process per shape (it writes its JSON at the end: a timeout
    keeps the shapes already done); figures from those JSONs. Triton must give a timing at every shape."""
    ceilings = ctx.other("env").get("ceilings", {})
    log = ctx.work / f"{ctx.name}.scan.log"
    raw, rows, commands = [], [], []
    for shape in shapes:
        out_dir = ctx.work / f"{ctx.name}_json" / shape.replace(",", "_")
        cmd = [sys.executable, ROOT / "benchmarks" / "scan.py", "--shape", shape, "--peers", *peers,
               "--warmup", warmup, "--reps", reps, "--out", out_dir]
        if ctx.dry:  # on CPU scan.py times every peer at each --threads count, round-robin
            cmd += ["--dtype", "fp32", "--threads", "1"]
        commands.append(shlex.join(map(str, cmd)))
        ctx.save(commands=commands)
        rc, timed_out = run_logged(cmd, log, ctx.remaining(), env=dict(os.environ, TRITON_PRINT_AUTOTUNING="1"))
        ctx.save(autotuned=parse_autotuning(log.read_text(errors="replace")))
        found = sorted(out_dir.glob("scan_*.json")) if out_dir.is_dir() else []
        if found:
            raw.append(json.loads(found[-1].read_text()))  # scan.py's own JSON: nothing lost to a parse error
            rows += scan_figures(raw[-1], ceilings)
            ctx.save(raw=raw, dtype=raw[0].get("dtype"), peaks=raw[0].get("peaks"), shapes=rows,
                     unavailable_peers=[p for p in peers if not any(p in r["backends"] for r in rows)])
        print(tail(log, 30))
        if timed_out:
            raise StageTimeout(f"benchmarks/scan.py ran out of time at shape {shape}")
        if rc != 0 or not found:
            raise RuntimeError(f"benchmarks/scan.py exited {rc} without a JSON at shape {shape}")
    no_triton = [r["shape"] for r in rows if "triton" not in r["backends"]]
    if no_triton:
        raise CheckFailed(f"no Triton timing at shape(s) {no_triton} (see the log)")


def stage_scan(ctx: Ctx):
    peers = ["triton", "cpu"] if ctx.dry else ["triton", "mamba_ssm"]
    run_scan(ctx, DRY_SHAPES if ctx.dry else (PAPER_SHAPE, MAMBA_SHAPE), peers, 1 if ctx.dry else 3,
             1 if ctx.dry else 10)


def stage_scan_reference(ctx: Ctx):
    run_scan(ctx, DRY_SHAPES if ctx.dry else REF_SHAPES, ["triton", "reference"], 1, 1 if ctx.dry else 3)


def stage_scan_compiled(ctx: Ctx):
    run_scan(ctx, REF_SHAPES[:1], ["triton", "reference-compiled"], 1, 3)


def stage_kernel_static(ctx: Ctx):
    tool = ROOT / "benchmarks" / "kernel_static.py"
    helptext = subprocess.run([sys.executable, tool, "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=min(30, ctx.remaining())).stdout
    out = ctx.work / "kernel_static.tool.json"  # (kernel_static.json holds this stage's figures)
    cmd = [sys.executable, tool, "--json", out]
    if "--shape" in helptext:
        for s in DRY_SHAPES if ctx.dry else (PAPER_SHAPE, MAMBA_SHAPE):
            cmd += ["--shape", s]
    if ctx.dry and "--block-d" in helptext:  # one tile width: the dry run checks the path, not every config
        cmd += ["--block-d", "1"]
    ctx.save(command=shlex.join(map(str, cmd)))
    rc, timed_out = run_logged(cmd, ctx.work / "kernel_static.tool.log", ctx.remaining())
    print(tail(ctx.work / "kernel_static.tool.log", 30))
    if timed_out:
        raise StageTimeout("benchmarks/kernel_static.py ran out of time")
    if rc != 0 or not out.is_file():
        raise RuntimeError(f"benchmarks/kernel_static.py exited {rc} without writing {out.name}")
    data = json.loads(out.read_text())  # {"command", "records": [...]} (or the bare list)
    ctx.save(records=data["records"] if isinstance(data, dict) else data)


# ---------------------------------------------------------------------------- 4. training

def compose_recipe(variant: str, dry: bool):
    """The paper's recipe `experiment=celebahq_<variant>` (zigma_b2, GVP, AdamW 3e-4, clip 2.0, EMA), with
    synthetic data in place of the latent shards; --dry-run: 4x8x8 latents and TINY_MODEL."""
    from hydra import compose, initialize_config_dir

    import arcee.train  # noqa: F401  (registers the config schema, arcee_schema)

    overrides = [f"experiment=celebahq_{variant}", "data.path=synthetic", "logger=disabled"]
    if dry:
        overrides.append("data.image_size=8")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    for key, value in (TINY_MODEL.items() if dry else ()):
        cfg.model[key] = value
    return cfg


def synthetic_latents(n, channels, size, device, seed=0):
    """(n, channels, size, size) smooth random fields (bilinear upsampling of 4x4 noise), unit variance:
    structure a model can learn in a few steps, with no dataset."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(n, channels, 4, 4, generator=g), size=(size, size), mode="bilinear")
    return ((x - x.mean()) / x.std()).to(device)


def stage_train(ctx: Ctx, variant: str, precision: str):
    """A real training run of the recipe through arcee's builders, optimizer and loss, timed per phase."""
    import torch

    from arcee.flow import build_transport
    from arcee.models import build_model
    from arcee.train.ema import EMA
    from arcee.train.trainer import lr_at, make_optimizer

    cfg = compose_recipe(variant, ctx.dry)
    dev, tc = ctx.device, cfg.train
    if ctx.cuda:  # as arcee.train.run: the paper trains fp32 with TF32 matmuls; bf16 runs keep TF32 too
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    transport = build_transport(cfg.flow)
    channels, size = int(cfg.model.in_channels), int(cfg.model.image_size)
    pool = synthetic_latents(64 if ctx.dry else 1024, channels, size, dev)
    steps, warmup = (6, 2) if ctx.dry else (35, 5)  # the first `warmup` steps (autotuning) are not timed
    candidates = (8, 4) if ctx.dry else (96, 80, 64, 48, 32, 24, 16, 8)  # per-GPU batch: the paper's 96 first
    clip = tc.grad_clip if tc.grad_clip > 0 else math.inf
    draw = torch.Generator().manual_seed(1)
    ctx.save(variant=variant, precision=precision, recipe=f"celebahq_{variant}", d_state=int(cfg.model.d_state),
             model=dict(width=int(cfg.model.width), depth=int(cfg.model.depth), num_orders=int(cfg.model.num_orders),
                        state_chain=str(cfg.model.state_chain)), image=[channels, size, size],
             optimizer=dict(lr=float(cfg.optim.lr), grad_clip=float(tc.grad_clip), ema_decay=float(tc.ema_decay)))

    def clock():
        if ctx.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(a, b):
        return a.elapsed_time(b) if ctx.cuda else 1e3 * (b - a)

    def step(i, model, opt, ema, batch):
        x1 = pool[torch.randint(len(pool), (batch,), generator=draw).to(dev)]
        marks = [clock()]
        with amp():
            loss = transport.training_loss(model, x1).mean()
        marks.append(clock())
        loss.backward()
        marks.append(clock())
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)  # as the trainer: clip, step, EMA
        for group in opt.param_groups:
            group["lr"] = lr_at(i, cfg.optim, tc.max_steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, i + 1)
        marks.append(clock())
        return loss.detach(), gnorm.detach(), marks

    oom, model = [], None
    for batch in candidates:  # the first step (Triton autotuning included) doubles as the memory probe
        torch.manual_seed(0)
        t0 = time.perf_counter()
        try:
            model = build_model(cfg.model).to(dev).train()
            opt, ema = make_optimizer(model, cfg.optim), EMA(model, tc.ema_decay, tc.ema_warmup).to(dev)
            records = [step(0, model, opt, ema, batch)]
            ctx.sync()
            break
        except torch.cuda.OutOfMemoryError:
            oom.append(batch)
        model = opt = ema = records = None  # outside the except block: frees the failed attempt's memory
        torch.cuda.empty_cache()
    if model is None:
        raise RuntimeError(f"out of memory at every per-GPU batch size {candidates}")
    first_step_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    ctx.save(batch=batch, oom_batches=oom, params=params, first_step_s=first_step_s)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(1, warmup):
        records.append(step(i, model, opt, ema, batch))
    ctx.sync()
    t0 = time.perf_counter()
    for i in range(warmup, steps):
        records.append(step(i, model, opt, ema, batch))
    ctx.sync()
    wall = time.perf_counter() - t0

    losses = torch.stack([r[0] for r in records]).float().tolist()
    gnorms = torch.stack([r[1] for r in records]).float().tolist()
    timed = records[warmup:]
    phase = {name: statistics.median(ms(r[2][k], r[2][k + 1]) for r in timed)
             for k, name in enumerate(("forward_ms", "backward_ms", "optimizer_ms"))}
    k = max(2, steps // 5)
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    finite = all(map(math.isfinite, losses + gnorms))
    ctx.save(steps=steps, warmup_steps=warmup, timed_steps=len(timed), wall_s=wall,
             images_per_s=batch * len(timed) / wall, step_ms=1e3 * wall / len(timed), **phase,
             peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if ctx.cuda else None,
             reserved_memory_gib=torch.cuda.max_memory_reserved() / 2**30 if ctx.cuda else None,
             loss=[round(v, 5) if math.isfinite(v) else v for v in losses], grad_norm_first=gnorms[0],
             grad_norm_last=gnorms[-1], loss_first=first, loss_last=last, loss_finite=finite,
             loss_falls=finite and last < first)
    if ctx.name == SAMPLE_SOURCE and finite:
        from arcee.sample import save_generator

        save_generator(ctx.work / "trained.safetensors", model.state_dict(), cfg, steps)
        ctx.save(saved_weights="trained.safetensors (for the sample stage)")
    if not finite:
        raise CheckFailed(f"non-finite loss or grad norm: losses {losses}")
    if not last < first:
        raise CheckFailed(f"the loss did not fall: mean of the first {k} steps {first:.4f}, of the last {k} {last:.4f}")


# ---------------------------------------------------------------------------- 5. sampling, 2 processes

def stage_sample(ctx: Ctx):
    import torch

    from arcee.models import build_model
    from arcee.sample import ImageSampler, load_generator

    src = ctx.work / "trained.safetensors"
    if src.is_file():
        model, cfg = load_generator(src, device=ctx.device)
        weights = f"trained by {SAMPLE_SOURCE}"
    else:  # still a real timing: random weights, the zero-initialised output layers perturbed
        cfg = compose_recipe("zigma1_arcee", ctx.dry)
        model = build_model(cfg.model).to(ctx.device).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        weights = f"untrained ({SAMPLE_SOURCE} left no weights)"
    if ctx.cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    n, batch = (8, 4) if ctx.dry else (256, 128)
    heun_steps = 4 if ctx.dry else int(cfg.flow.steps)
    size = int(cfg.data.image_size)
    ctx.save(weights=weights, images=n, batch=batch, image=[int(cfg.data.channels), size, size],
             note="generator only: latents, no VAE decode (its weights are not on the device)")
    results = {}
    # Heun in bf16 autocast; dopri5 in fp32 + TF32 (bf16 rounding would drive its error control)
    for sampler, steps, precision in (("heun", heun_steps, "bf16"), ("dopri5", None, "tf32")):
        amp = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        with amp:
            warm = ImageSampler(model, cfg, sampler="euler", steps=1, vae=torch.nn.Identity())
            warm.latent = False  # the timing covers the generator (benchmarks/sample.py does the same)
            warm(list(range(batch)))
            run = ImageSampler(model, cfg, sampler=sampler, steps=steps, vae=torch.nn.Identity())
            run.latent = False
            ctx.sync()
            t0, nfe = time.perf_counter(), []
            for i in range(0, n, batch):
                nfe.append(run(list(range(i, min(n, i + batch))))[1])  # raises on non-finite samples
            ctx.sync()
        dt = time.perf_counter() - t0
        results[sampler] = dict(precision=precision, solver=run.solver, seconds=dt, images_per_s=n / dt,
                                nfe_per_batch=nfe, nfe_mean=statistics.mean(nfe))
        ctx.save(samplers=results)


def stage_multi_gpu(ctx: Ctx, force_cpu: bool = False):
    import torch

    devices = torch.cuda.device_count() if ctx.cuda else 0
    if devices < 2 and not force_cpu:
        raise Skip(f"{devices} CUDA device(s): the 2-process accelerate launch test needs 2")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    run_dir, out_dir = ctx.work / "multi_gpu_run", ctx.work / "multi_gpu_samples"
    train = launch + ["train.py", "train.max_steps=4", "train.batch_size=16", "train.log_every=2",
                      "train.sample_every=0", "train.ckpt_every=0", "logger=disabled", f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    rc, timed_out = run_logged(train, ctx.work / "multi_gpu.train.log", ctx.remaining())
    ctx.save(devices=devices, train_command=shlex.join(map(str, train)), train_returncode=rc,
             train_s=time.perf_counter() - t0)
    if timed_out:
        raise StageTimeout("2-process training ran out of time")
    events = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    done = next((e for e in events if e.get("event") == "done"), {})
    ctx.save(train_world_size=done.get("world_size"),
             ranks_agree=len(set(done.get("weights_sha256") or [None, 0])) == 1)
    if rc != 0 or done.get("world_size") != 2 or not ctx.figures["ranks_agree"]:
        raise CheckFailed(f"2-process training: exit {rc}, world size {done.get('world_size')}, "
                          f"ranks' weights agree: {ctx.figures['ranks_agree']}")
    sample = launch + ["sample.py", f"ckpt={run_dir / 'ema_final.safetensors'}", f"out_dir={out_dir}",
                       "num_samples=8", "batch_size=2", "sampler=euler", "steps=4", "grid=0", "progress=false"]
    t0 = time.perf_counter()
    rc, timed_out = run_logged(sample, ctx.work / "multi_gpu.sample.log", ctx.remaining())
    pngs = len(list(out_dir.glob("*.png"))) if out_dir.is_dir() else 0
    ctx.save(sample_command=shlex.join(map(str, sample)), sample_returncode=rc, sample_s=time.perf_counter() - t0,
             pngs=pngs)
    if timed_out:
        raise StageTimeout("2-process sampling ran out of time")
    if rc != 0 or pngs != 8:
        raise CheckFailed(f"2-process sampling: exit {rc}, {pngs} of 8 PNGs")


# ============================================================================ the run (parent process)

@dataclass
class Stage:
    name: str
    fn: str  # stage function name
    kwargs: dict = field(default_factory=dict)
    timeout: float = 60  # seconds on a GPU (--dry-run: DRY_TIMEOUT)
    reserve: float = 10  # the least time worth starting it with: earlier stages leave it this much
    skip_if: object = None  # args -> a reason to skip it without starting a process, or None
    background: bool = False  # CPU only: started with the first stage, collected in its place in the order


STAGES = [
    Stage("env", "stage_env", timeout=60, reserve=10),
    Stage("pytest_gpu", "stage_pytest_gpu", timeout=120, reserve=30),
    Stage("scan", "stage_scan", timeout=100, reserve=30),
    Stage("kernel_static", "stage_kernel_static", timeout=240, reserve=0, background=True,
          skip_if=lambda a: None if (ROOT / "benchmarks" / "kernel_static.py").is_file()
          else "benchmarks/kernel_static.py does not exist yet"),
    *(Stage(f"train_{v}_{p}", "stage_train", dict(variant=v, precision=p), timeout=100, reserve=40)
      for p in ("bf16", "tf32") for v in ("zigma1", "zigma1_arcee")),
    Stage("sample", "stage_sample", timeout=100, reserve=30),
    Stage("scan_reference", "stage_scan_reference", timeout=60, reserve=20),
    Stage("multi_gpu", "stage_multi_gpu", timeout=120, reserve=0,
          skip_if=lambda a: "dry run: CPU only (--multi-cpu runs it as 2 CPU processes)"
          if a.dry_run and not a.multi_cpu else None),
    Stage("scan_compiled", "stage_scan_compiled", timeout=150, reserve=0,
          skip_if=lambda a: "dry run: torch.compile of the unrolled reference takes ~35 s on 2 CPU cores even at "
                            "l=4" if a.dry_run else None),
]
DRY_TIMEOUT = 300  # per stage: the dry run checks code paths, not speed, on CPUs other jobs may share


def child_main(args) -> int:
    """`--stage NAME`: run one stage in this process; figures go to <work>/<NAME>.json."""
    stage = next(s for s in STAGES if s.name == args.stage)
    ctx = Ctx(stage.name, Path(args.work), args.dry_run, args.timeout)
    kwargs = dict(stage.kwargs, **({"force_cpu": True} if args.multi_cpu and stage.name == "multi_gpu" else {}))
    try:
        globals()[stage.fn](ctx, **kwargs)
        return 0
    except Skip as e:
        ctx.save(skip_reason=str(e))
        print(f"skipped: {e}")
        return 3
    except StageTimeout as e:
        ctx.save(error=str(e))
        print(f"timeout: {e}")
        return 4
    except BaseException as e:
        traceback.print_exc()
        ctx.save(error=f"{type(e).__name__}: {e}"[:2000])
        return 1


@dataclass
class Running:
    """A stage process in flight (see start_stage / finish_stage)."""
    name: str
    proc: subprocess.Popen
    log: Path
    work: Path
    timeout: float
    t0: float


def start_stage(name, cmd, work: Path, timeout: float, env=None) -> Running:
    """Start one stage process; its output goes to <work>/<name>.log, its figures to <work>/<name>.json."""
    (work / f"{name}.json").unlink(missing_ok=True)
    return Running(name, spawn(cmd, work / f"{name}.log", env), work / f"{name}.log", work, timeout,
                   time.monotonic())


def finish_stage(r: Running) -> dict:
    """Wait for a stage until its timeout (then kill its process group); -> {"status", "seconds", "cpu_s",
    "figures", "reason"? (skipped), "error" and "log_tail"? (fail, timeout)}."""
    cpu0 = _children_cpu()
    rc, timed_out = wait_or_kill(r.proc, r.t0 + r.timeout - time.monotonic(), r.log)
    seconds, cpu = time.monotonic() - r.t0, _children_cpu() - cpu0
    try:
        figures = json.loads((r.work / f"{r.name}.json").read_text())
    except (OSError, ValueError):
        figures = {}
    status = "timeout" if timed_out else EXIT.get(rc, "fail")
    result = dict(status=status, seconds=round(seconds, 2), cpu_s=round(cpu, 2), timeout_s=round(r.timeout, 1),
                  figures=figures)
    if status == "skipped":
        result["reason"] = figures.pop("skip_reason", "")
    elif status != "pass":
        result["error"] = figures.pop("error", None) or (f"killed after {r.timeout:.0f} s" if timed_out
                                                         else f"exit code {rc}")
        result["log_tail"] = tail(r.log, 25)
    return result


def run_stage(name, cmd, work: Path, timeout: float, env=None) -> dict:
    """Run one stage process under `timeout` and return its record (finish_stage)."""
    return finish_stage(start_stage(name, cmd, work, timeout, env))


def _children_cpu() -> float:
    """CPU seconds (user + system) of every finished child process so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def setup_imports(work: Path, env: dict) -> dict:
    """Make the repository and the modules the stages need importable for the stage processes (`env`),
    installing the wheels carried in .gpu_wheels/ (`--fetch-wheels`) when some are missing."""
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    report = dict(missing_before=missing, wheels=sorted(p.name for p in WHEELS.glob("*.whl")))
    if missing and report["wheels"]:
        target = work / "site"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", target, *sorted(WHEELS.glob("*.whl"))]
        try:
            r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=180)
            report["pip"] = dict(returncode=r.returncode, output=(r.stdout + r.stderr)[-2000:])
        except subprocess.TimeoutExpired:
            report["pip"] = dict(returncode=None, output="pip install timed out after 180 s")
        sys.path.append(str(target))
        env["PYTHONPATH"] += os.pathsep + str(target)
        importlib.invalidate_caches()
    report["missing"] = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if report["missing"]:
        report["hint"] = (f"missing {', '.join(REQUIRED[m] for m in report['missing'])}: on a host with a package "
                          "registry run `scripts/gpu_check.sh --fetch-wheels`, then carry .gpu_wheels to this machine")
    return report


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _print_stage(name: str, r: dict) -> None:
    note = r.get("reason") or r.get("error") or ""
    print(f"  {name:<26}{r['status']:<9}{r['seconds']:>7.1f} s  {note.splitlines()[0] if note else ''}"[:160],
          flush=True)


def orchestrate(args) -> int:
    start, wall0 = datetime.datetime.now(), time.monotonic()
    deadline = wall0 + args.budget
    work = Path(args.work or tempfile.mkdtemp(prefix="arcee_gpu_check_")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # the stage processes' environment
    if args.dry_run:  # CPU everywhere, the Triton kernels through the interpreter, one thread (shared CI cores)
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    setup = setup_imports(work, env)
    print(f"gpu_check: work folder {work}; budget {args.budget:.0f} s" + (" (dry run: CPU, tiny sizes)"
                                                                          if args.dry_run else ""))
    if setup["missing"]:
        print(f"gpu_check: WARNING {setup['hint']}")

    chosen = [s for s in STAGES if (not args.only or s.name in args.only) and s.name not in args.skip]
    skip = {s.name: s.skip_if(args) if s.skip_if else None for s in chosen}

    def command(s, timeout):
        return ([sys.executable, Path(__file__).resolve(), "--stage", s.name, "--work", work, "--timeout",
                 f"{timeout:.1f}"] + ["--dry-run"] * args.dry_run + ["--multi-cpu"] * args.multi_cpu)

    stages, background = {}, {}
    try:
        for s in chosen:  # CPU-only stages (static compilation) run beside the GPU stages from the start
            if s.background and not skip[s.name]:
                timeout = min(DRY_TIMEOUT if args.dry_run else s.timeout, args.budget)
                background[s.name] = start_stage(s.name, command(s, timeout), work, timeout, env)
        for i, s in enumerate(chosen):
            later = sum(t.reserve for t in chosen[i + 1:] if not skip[t.name])
            timeout = min(DRY_TIMEOUT if args.dry_run else s.timeout, deadline - time.monotonic() - later)
            if skip[s.name]:
                stages[s.name] = dict(status="skipped", seconds=0, figures={}, reason=skip[s.name])
            elif s.name in background:  # collected now if done, else after the last stage
                if background[s.name].proc.poll() is None:
                    continue
                stages[s.name] = finish_stage(background.pop(s.name))
            elif timeout < max(s.reserve, 5):
                stages[s.name] = dict(status="skipped", seconds=0, figures={},
                                      reason=f"budget: {timeout:.0f} s left for it (--budget {args.budget:.0f})")
            else:
                stages[s.name] = run_stage(s.name, command(s, timeout), work, timeout, env)
            _print_stage(s.name, stages[s.name])
        for name in list(background):
            stages[name] = finish_stage(background.pop(name))
            _print_stage(name, stages[name])
        stages = {s.name: stages[s.name] for s in chosen if s.name in stages}  # in STAGES order
    finally:  # an interrupted run still reports what it has, and leaves nothing running
        for r in background.values():
            kill_group(r.proc)
        report = dict(schema=1, dry_run=args.dry_run, started=start.isoformat(timespec="seconds"),
                      wall_s=round(time.monotonic() - wall0, 1), budget_s=args.budget, commit=git_commit(),
                      command=shlex.join(sys.argv), work=str(work), setup=setup, stages=stages)
        report["device"] = stages.get("env", {}).get("figures", {}).get("device", "unknown")
        report["summary"] = summarize(stages)
        paths = write_report(report, args)
    print(markdown(report))
    for p in paths:
        print(f"wrote {p}")
    bad = [n for n, r in stages.items() if r["status"] in ("fail", "timeout")]
    return 1 if bad else 0


# ============================================================================ report

def summarize(stages: dict) -> dict:
    """The headline figures of every stage, in one place."""
    fig = {n: r.get("figures", {}) for n, r in stages.items()}
    out = {"status": {n: r["status"] for n, r in stages.items()}}
    if "pytest_gpu" in fig:
        out["pytest_gpu"] = fig["pytest_gpu"].get("counts")
    for name in ("scan", "scan_reference", "scan_compiled"):
        for row in fig.get(name, {}).get("shapes", []):
            t = row["backends"].get("triton", {})
            out.setdefault(name, {})[row["shape"]] = dict(
                triton_fwd_ms=t.get("fwd_ms"), triton_fwd_bwd_ms=t.get("fwd_bwd_ms"),
                triton_fwd_frac_hbm=t.get("fwd_frac_hbm"), triton_fwd_bwd_frac_hbm=t.get("fwd_bwd_frac_hbm"),
                triton_fwd_frac_exp=t.get("fwd_frac_exp"), triton_fwd_bwd_frac_exp=t.get("fwd_bwd_frac_exp"),
                speedup_over=row["triton_speedup_over"])
    for name in ("scan", "scan_reference", "scan_compiled"):
        if fig.get(name, {}).get("autotuned"):
            out.setdefault("autotuned", {})[name] = [f"{a['function']} {a['key']}: {a['config']}"
                                                     for a in fig[name]["autotuned"]]
    keys = ("kernel", "shape", "config", "warp_instr_per_update", "shfl_per_update", "mufu_per_update",
            "issue_clocks_per_update_per_sm", "regs", "spill_bytes", "occupancy", "meets_targets")
    if fig.get("kernel_static", {}).get("records"):
        out["kernel_static"] = [{k: r.get(k) for k in keys} for r in fig["kernel_static"]["records"]]
    train = {n: f for n, f in fig.items() if n.startswith("train_") and "images_per_s" in f}
    if train:
        out["train"] = {n: {k: f.get(k) for k in ("batch", "images_per_s", "step_ms", "forward_ms", "backward_ms",
                                                  "optimizer_ms", "peak_memory_gib", "loss_first", "loss_last",
                                                  "loss_falls")} for n, f in train.items()}
        for p in ("bf16", "tf32"):  # step time per image, Arcee over Zigma-1 (> 1: Arcee is slower)
            a, z = train.get(f"train_zigma1_arcee_{p}"), train.get(f"train_zigma1_{p}")
            if a and z:
                out.setdefault("arcee_overhead", {})[p] = z["images_per_s"] / a["images_per_s"]
    if fig.get("sample", {}).get("samplers"):
        out["sample"] = {k: dict(images_per_s=v["images_per_s"], nfe_mean=v["nfe_mean"], precision=v["precision"])
                         for k, v in fig["sample"]["samplers"].items()}
    return out


def _num(v, fmt="{:.3g}"):
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _pair(a, b, fmt="{:.3g}"):
    return f"{_num(a, fmt)} / {_num(b, fmt)}"


def markdown(report: dict) -> str:
    """The short human summary: stage table, then the headline figures."""
    s, st = report["summary"], report["stages"]
    lines = [f"# GPU check: {report['device']}" + (" (dry run)" if report["dry_run"] else ""), "",
             f"{report['started']}, commit {report['commit'] or '?'}, {report['wall_s']:.0f} s of a "
             f"{report['budget_s']:.0f} s budget.", "", "| stage | status | s | note |", "|---|---|---|---|"]
    for name, r in st.items():
        note = (r.get("reason") or r.get("error") or "").replace("|", "/").replace("\n", " ")[:120]
        lines.append(f"| {name} | {r['status']} | {r['seconds']:.0f} | {note} |")
    env = st.get("env", {}).get("figures", {})
    if env:
        c = env.get("ceilings", {})
        lines += ["", f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda_runtime')}, "
                      f"driver {env.get('driver', '-')}; measured copy {_num(c.get('copy_GBps'), '{:.0f}')} GB/s, "
                      f"{c.get('matmul_dtype', '')} matmul {_num(c.get('matmul_TFLOPs'))} TFLOP/s"]
    if s.get("pytest_gpu"):
        lines += ["", f"pytest -m gpu: {s['pytest_gpu']}"]
    for name in ("scan", "scan_reference", "scan_compiled"):
        if not s.get(name):
            continue
        lines += ["", f"{name}: Triton ms, fraction of the HBM and exp roofs, speedup t_peer / t_triton", "",
                  "| b,d,l,n | fwd / f+b ms | HBM fwd / f+b | exp fwd / f+b | speedups fwd / f+b |",
                  "|---|---|---|---|---|"]
        for shape, r in s[name].items():
            speedups = ", ".join(f"{p} {_pair(v.get('fwd'), v.get('fwd_bwd'))}" for p, v in r["speedup_over"].items())
            lines.append(f"| {shape} | {_pair(r['triton_fwd_ms'], r['triton_fwd_bwd_ms'])} | "
                         f"{_pair(r['triton_fwd_frac_hbm'], r['triton_fwd_bwd_frac_hbm'], '{:.0%}')} | "
                         f"{_pair(r['triton_fwd_frac_exp'], r['triton_fwd_bwd_frac_exp'], '{:.0%}')} | "
                         f"{speedups or '-'} |")
    for name, configs in s.get("autotuned", {}).items():
        lines += ["", f"{name}: autotuned configs"] + [f"- {c}" for c in configs]
    if s.get("kernel_static"):
        lines += ["", "kernel_static (sm_90 SASS, per state update):", "",
                  "| kernel | b,d,l,n | config | warp instr | SHFL | MUFU | clk/SM | regs | spill B | occupancy |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["kernel_static"]:
            shape = ",".join(str(v) for v in r["shape"].values()) if isinstance(r["shape"], dict) else r["shape"]
            config = " ".join(f"{k}={v}" for k, v in r["config"].items()) if isinstance(r["config"], dict) \
                else r["config"]
            lines.append(f"| {r['kernel']} | {shape} | {config} | {_num(r['warp_instr_per_update'])} | "
                         f"{_num(r['shfl_per_update'])} | {_num(r['mufu_per_update'])} | "
                         f"{_num(r['issue_clocks_per_update_per_sm'])} | {r['regs']} | {r['spill_bytes']} | "
                         f"{_num(r['occupancy'], '{:.0%}')} |")
    if s.get("train"):
        lines += ["", "| training run | batch | images/s | step ms | fwd / bwd / optim ms | peak GiB | loss |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in s["train"].items():
            phases = " / ".join(_num(r[k]) for k in ("forward_ms", "backward_ms", "optimizer_ms"))
            lines.append(f"| {name} | {r['batch']} | {_num(r['images_per_s'])} | {_num(r['step_ms'])} | {phases} | "
                         f"{_num(r['peak_memory_gib'])} | {_num(r['loss_first'])} -> {_num(r['loss_last'])} |")
        for p, v in s.get("arcee_overhead", {}).items():
            lines.append(f"\nArcee overhead ({p}): time per image x{v:.3f} of Zigma-1's")
    for k, v in s.get("sample", {}).items():
        lines.append(f"\nsampling {k} ({v['precision']}): {_num(v['images_per_s'])} images/s, "
                     f"NFE {_num(v['nfe_mean'])} per image")
    return "\n".join(lines) + "\n"


def write_report(report: dict, args) -> list[Path]:
    results = Path(args.results_dir or (Path(tempfile.gettempdir()) / "arcee_gpu_check" if args.dry_run
                                        else ROOT / "benchmarks" / "results"))
    dev = re.sub(r"[^A-Za-z0-9._-]+", "_", "cpu-dry-run" if args.dry_run else report["device"]).strip("_")
    stem = f"gpu_check_{dev}_{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    paths = [results / f"{stem}.json", results / f"{stem}.md"]
    atomic_write_text(paths[0], json.dumps(clean(report), indent=1))
    atomic_write_text(paths[1], markdown(report))
    logs = Path(report["work"]) / "gpu_check.log"  # every stage's log, one after the other
    atomic_write_text(logs, "".join(f"\n===== {p.name}\n{p.read_text(errors='replace')}"
                                    for p in sorted(Path(report["work"]).glob("*.log")) if p != logs))
    if os.environ.get("OUT"):  # the device machine sends back what is under $OUT
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        for p in (*paths, logs):
            shutil.copy(p, out / p.name)
        paths.append(out)
    return paths


# ============================================================================ wheels for an offline device

def fetch_wheels(python_version: str) -> int:
    """Download (or build) wheels of the modules the device image lacks into .gpu_wheels/, pinned to this
    machine's versions; the set-up installs them there with `pip install --no-index --target`."""
    WHEELS.mkdir(exist_ok=True)
    pins = {d: version(d) for group in FETCH.values() for d in group}
    spec = [f"{d}=={v}" if v else d for d, v in pins.items()]
    pip = [sys.executable, "-m", "pip"]
    cmds = [pip + ["wheel", "--no-deps", "-w", str(WHEELS)] + [s for s in spec if s.split("==")[0] in FETCH["pure"]],
            pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                   "--implementation", "cp", "-d", str(WHEELS)]
            + [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
            + [s for s in spec if s.split("==")[0] in FETCH["binary"]]]
    for cmd in cmds:
        print("$", shlex.join(cmd))
        if subprocess.run(cmd).returncode:
            print(f"gpu_check: fetching wheels failed: {shlex.join(cmd)}", file=sys.stderr)
            return 1
    print(f"wheels in {WHEELS}: {', '.join(sorted(p.name for p in WHEELS.glob('*.whl')))}\n"
          "device run: carry .gpu_wheels, command scripts/gpu_check.sh")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU only, tiny sizes, TRITON_INTERPRET=1 (CI)")
    p.add_argument("--budget", type=float, default=None, help="total seconds (default: 470 on a GPU, 1800 dry)")
    p.add_argument("--only", type=lambda s: s.split(","), default=[], help="comma-separated stage names")
    p.add_argument("--skip", type=lambda s: s.split(","), default=[], help="comma-separated stage names")
    p.add_argument("--results-dir", help="default: benchmarks/results (dry run: $TMPDIR/arcee_gpu_check)")
    p.add_argument("--work", help="stage logs, JSONs and weights (default: a new temporary folder)")
    p.add_argument("--multi-cpu", action="store_true",
                   help="run the 2-process accelerate stage even without 2 CUDA devices (gloo on CPU)")
    p.add_argument("--fetch-wheels", action="store_true", help="download the wheels the device lacks, then exit")
    p.add_argument("--device-python", default="3.12", help="--fetch-wheels: the device's Python version")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    p.add_argument("--timeout", type=float, default=60, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = sorted(set(args.only + args.skip) - {s.name for s in STAGES})
    if unknown:
        p.error(f"unknown stage(s) {unknown}; stages: {', '.join(s.name for s in STAGES)}")
    if args.budget is None:
        args.budget = 1800.0 if args.dry_run else 470.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage:
        return child_main(args)
    if args.fetch_wheels:
        return fetch_wheels(args.device_python)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
