"""Benchmark the selective scan: forward and forward+backward for every backend and peer.

    python benchmarks/scan.py    # GPU: paper + Mamba shapes, bf16; CPU: model + long shape, fp32
    python benchmarks/scan.py --shape 2,64,1024,16 --dtype fp32 --peers cpu reference

Peers: ours ("triton" on CUDA, "cpu" on CPU), "reference" (sequential PyTorch, eager),
"reference-compiled" (torch.compile of the reference: unrolls the time loop, so compiling takes
minutes at l = 1024), "mamba_ssm" (its CUDA selective_scan_fn, when importable), on CPU
"cpu-before" (the CPU path before issue 18, frozen in benchmarks/scan_cpu_before.py) and
"mambapy" (mamba.py's parallel scan, `pip install mambapy`, when importable). All run with
h0 = None and no h_T, as mamba_ssm has neither. Reports ms, speedups, achieved GB/s and exp/s
against the device's roofs, and writes JSON to benchmarks/results/.

On CPU every peer runs at 1 and 2 threads (`--threads`), interleaved round by round so that
load drift hits all alike, and the table gives medians (wall clock, and the calling thread's CPU
time of forward+backward at the first thread count), the bytes each peer's op sequence moves
per state element (b d n l) forward+backward (every aten op's tensor reads and writes, plus the
fused kernel's inputs and outputs), its peak memory (resident-set growth in a fresh process,
Linux) and the load average before and after.
"""
import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from arcee.io import atomic_write_text
from arcee.ops import selective_scan_fn, selective_scan_ref

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (HBM bytes/s, MUFU exp/s) by device name; Hopper's MUFU: 16 ops/clk/SM x 132 SMs x ~1.98 GHz.
PEAKS = {"H200": (4.8e12, 4.2e12), "H100": (3.35e12, 4.2e12)}


def peaks(device):
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in PEAKS.items() if key in name), (None, None))


def make_inputs(b, d, l, n, dtype, device, z=True):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, dt=dtype):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dt).requires_grad_()

    A = (-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)).to(device).requires_grad_()  # S4D-real
    return dict(u=rand(b, d, l), delta=rand(b, d, l, scale=0.5), A=A, B=rand(b, 1, n, l), C=rand(b, 1, n, l),
                D=rand(d, dt=torch.float32), z=rand(b, d, l) if z else None,
                delta_bias=rand(d, scale=0.5, dt=torch.float32))


def mambapy_scan(pscan, u, delta, A, B, C, D, z, delta_bias):
    """mamba.py's selective scan (its MambaBlock.selective_scan on its parallel scan) on our
    (b, d, l) layout, with softplus(delta + delta_bias) and the silu(z) gate; B, C: (b, 1, n, l)."""
    dt = F.softplus(delta + delta_bias[:, None]).transpose(1, 2)  # (b, l, d)
    x = u.transpose(1, 2)
    Bt, Ct = B[:, 0].transpose(1, 2), C[:, 0].transpose(1, 2)  # (b, l, n)
    deltaA = torch.exp(dt.unsqueeze(-1) * A)  # (b, l, d, n)
    BX = dt.unsqueeze(-1) * Bt.unsqueeze(2) * x.unsqueeze(-1)
    hs = pscan(deltaA, BX)
    y = (hs @ Ct.unsqueeze(-1)).squeeze(3) + D * x
    return (y * F.silu(z.transpose(1, 2))).transpose(1, 2)


def scan_fn(peer):
    """A callable(**inputs) -> out for one backend or peer, or None if unavailable."""
    if peer in ("triton", "cpu", "reference"):
        return lambda **x: selective_scan_fn(**x, delta_softplus=True, backend=peer)
    if peer == "cpu-before":  # the frozen baseline, through the same custom op as "cpu"
        import scan_cpu_before  # benchmarks/ is on sys.path when this file runs as a script
        from arcee.ops.selective_scan import _scan_fwd
        sys.modules.setdefault("arcee.ops.scan_cpu_before", scan_cpu_before)
        return lambda u, delta, A, B, C, D, z, delta_bias: _scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, True, None, "cpu_before")[0]
    if peer == "mambapy":
        try:
            from mambapy.pscan import pscan
        except ImportError:
            return None
        return lambda **x: mambapy_scan(pscan, **x)
    if peer == "reference-compiled":
        ref = torch.compile(selective_scan_ref, dynamic=False)
        return lambda **x: ref(**x, delta_softplus=True)
    if peer == "mamba_ssm":
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_scan
        except ImportError:
            return None
        return lambda **x: mamba_scan(**x, delta_softplus=True)
    raise ValueError(f"unknown peer {peer!r}")


def timer(device, warmup, reps):
    """Milliseconds of fn() after warmup: CUDA events on GPU, perf_counter on CPU."""
    def measure(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        # CPU: the least disturbed run, as other jobs share the cores; GPU: the median
        return statistics.median(times) if device.type == "cuda" else min(times)
    return measure


def bench_shape(b, d, l, n, dtype, device, peers, warmup, reps, z=True):
    x = make_inputs(b, d, l, n, dtype, device, z)
    dout = torch.randn(b, d, l, device=device, dtype=dtype)
    leaves = [v for v in x.values() if v is not None]
    measure = timer(device, warmup, reps)
    size = dtype.itemsize
    elems, elems_bc = b * d * l, b * n * l  # per-(b, d, t) tensors; B and C (g = 1)
    n_io = 4 if z else 3  # forward: u, delta, (z) read, out written
    bytes_fwd = size * (n_io * elems + 2 * elems_bc)
    bytes_bwd = size * ((2 * n_io - 1) * elems + 4 * elems_bc)  # + dout read, du/ddelta/(dz), dB/dC
    exps_fwd = b * d * n * l  # one exp per state update; the backward recomputes it and needs a_{t+1}
    rows = {}
    for peer in peers:
        fn = scan_fn(peer)
        if fn is None:
            print(f"  {peer}: not available, skipped")
            continue
        try:
            with torch.no_grad():
                t_fwd = measure(lambda: fn(**x))
            t_fb = measure(lambda: torch.autograd.grad(fn(**x), leaves, dout))
        except (torch.OutOfMemoryError, RuntimeError) as e:  # e.g. the reference at the paper shape
            print(f"  {peer}: failed ({str(e).splitlines()[0][:100]}), skipped")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        rows[peer] = dict(fwd_ms=t_fwd, fwd_bwd_ms=t_fb,
                          fwd_GBps=bytes_fwd / t_fwd / 1e6, fwd_bwd_GBps=(bytes_fwd + bytes_bwd) / t_fb / 1e6,
                          fwd_exp_per_s=exps_fwd / t_fwd * 1e3, fwd_bwd_exp_per_s=3 * exps_fwd / t_fb * 1e3)
    return rows, dict(bytes_fwd=bytes_fwd, bytes_bwd=bytes_bwd, exps_fwd=exps_fwd, exps_fwd_bwd=3 * exps_fwd)


class ByteCounter(TorchDispatchMode):
    """Bytes an op sequence reads and writes: every aten op's tensor arguments (not for ops that
    only write them: copy_, fill_, zero_, out=) and results; views and allocations move nothing.
    The fused CPU kernel (called through ctypes, unseen by dispatch) counts its inputs and outputs
    once (`kernel_call`)."""

    WRITE_ONLY = {"copy_", "fill_", "zero_"}
    NO_BYTES = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        if func.is_view or name in self.NO_BYTES:
            return out
        tensors = lambda x: [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]
        reads = tensors(args[1:] if name in self.WRITE_ONLY else args)
        reads += tensors({k: v for k, v in kwargs.items() if k != "out"})
        self.bytes += sum(t.numel() * t.element_size() for t in reads + tensors(out))
        return out

    def kernel_call(self, call):
        def counted(which, ct, sizes, tensors):
            self.bytes += sum(t.numel() * t.element_size() for t in tensors.values() if t is not None)
            return call(which, ct, sizes, tensors)
        return counted


def _fast_module(peer):
    """The backend module whose forward/backward the custom op would call, or None."""
    if peer == "cpu":
        from arcee.ops import scan_cpu
        return scan_cpu
    if peer == "cpu-before":
        import scan_cpu_before
        return scan_cpu_before
    return None


def bytes_per_state(peer, fn, x, leaves, dout, states):
    """Bytes moved forward+backward per state element (b d n l), counted by ByteCounter; the
    CPU paths are called below their custom op, which would hide their ops."""
    from arcee.ops import scan_cpu
    module = _fast_module(peer)
    counter = ByteCounter()
    call = scan_cpu._call
    scan_cpu._call = counter.kernel_call(call)
    try:
        with counter, torch.no_grad():
            if module is None:
                with torch.enable_grad():
                    torch.autograd.grad(fn(**x), leaves, dout)
            else:
                args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, None)
                _, _, saved = module.forward(*args)
                module.backward(dout, None, *args, saved)
    finally:
        scan_cpu._call = call
    return counter.bytes / states


def peak_memory_mib(peer, b, d, l, n, dtype, z):
    """Peak resident-set growth (MiB) of one forward+backward (two, the second warm) in a fresh
    process, from the moment the inputs exist; None where /proc cannot tell."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    cmd = [sys.executable, os.path.abspath(__file__), "--peak-of", peer, "--shape", f"{b},{d},{l},{n}",
           "--dtype", next(k for k, v in DTYPES.items() if v == dtype)] + ([] if z else ["--no-z"])
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = re.search(r"peak_MiB=([0-9.]+)", res.stdout)
    return float(found.group(1)) if found else None


def _rss_kib(field):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])


def run_peak(peer, b, d, l, n, dtype, z):
    """The child of peak_memory_mib: print the growth of the peak RSS over two forward+backward
    passes, after a tiny one that loads what any first call loads (modules, the kernel library)."""
    torch.set_num_threads(1)
    fn = scan_fn(peer)

    def fwd_bwd(b, d, l, n):
        x = make_inputs(b, d, l, n, dtype, torch.device("cpu"), z)
        dout = torch.randn(b, d, l, dtype=dtype)
        leaves = [v for v in x.values() if v is not None]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _rss_kib("VmRSS")
        for _ in range(2):
            torch.autograd.grad(fn(**x), leaves, dout)
        return (_rss_kib("VmHWM") - base) / 1024

    fwd_bwd(1, 16, 4, 4)
    print(f"peak_MiB={fwd_bwd(b, d, l, n):.1f}")


def bench_shape_cpu(b, d, l, n, dtype, peers, threads, warmup, reps, z=True):
    """Medians of fwd and fwd+bwd ms for each peer and thread count, measured round-robin."""
    device = torch.device("cpu")
    x = make_inputs(b, d, l, n, dtype, device, z)
    dout = torch.randn(b, d, l, dtype=dtype)
    leaves = [v for v in x.values() if v is not None]
    fns = {}
    for peer in peers:
        fns[peer] = scan_fn(peer)
        if fns[peer] is None:
            print(f"  {peer}: not available, skipped")
            del fns[peer]

    def fwd(fn):
        with torch.no_grad():
            fn(**x)

    def fwd_bwd(fn):
        torch.autograd.grad(fn(**x), leaves, dout)

    times = {(peer, th, kind): [] for peer in fns for th in threads for kind in ("fwd", "fb", "fb_cpu")}
    for rnd in range(warmup + reps):
        for peer, fn in fns.items():
            for th in threads:
                torch.set_num_threads(th)
                for kind, step in (("fwd", fwd), ("fb", fwd_bwd)):
                    time.sleep(0.05)  # let OpenMP threads spinning after the previous call go to sleep
                    t0, c0 = time.perf_counter(), time.thread_time()
                    step(fn)
                    if rnd >= warmup:
                        times[peer, th, kind].append(1e3 * (time.perf_counter() - t0))
                        if kind == "fb":  # CPU time of the calling thread: at 1 thread the work, not the wait
                            times[peer, th, "fb_cpu"].append(1e3 * (time.thread_time() - c0))
    torch.set_num_threads(threads[0])
    states = b * d * n * l
    rows = {}
    for peer, fn in fns.items():
        rows[peer] = dict(
            ms={f"{kind}_{th}t": statistics.median(times[peer, th, kind]) for th in threads
                for kind in ("fwd", "fb", "fb_cpu")},
            bytes_per_state_fwd_bwd=bytes_per_state(peer, fn, x, leaves, dout, states),
            peak_MiB=peak_memory_mib(peer, b, d, l, n, dtype, z))
    return rows


def print_table_cpu(rows, threads):
    """Wall-clock medians per thread count, then the forward+backward CPU time of the calling
    thread at threads[0] (at 1 thread all of the work): on a loaded machine the wall clock also
    counts the time spent waiting for a core, the CPU time only the work."""
    cols = [f"{kind}_{th}t" for kind in ("fwd", "fb") for th in threads] + [f"fb_cpu_{threads[0]}t"]
    print(f"  {'backend':<12}" + "".join(f"{c.replace('_', ' ') + ' ms':>13}" for c in cols)
          + f"{'B/state':>9}{'peak MiB':>10}" + "".join(f"{'cpu x ' + c.replace('_', ' '):>16}" for c in cols[2:]))
    ours = rows.get("cpu")
    for peer, r in rows.items():
        ms = r["ms"]
        line = f"  {peer:<12}" + "".join(f"{ms[c]:>13.2f}" for c in cols)
        peak = "-" if r["peak_MiB"] is None else f"{r['peak_MiB']:.1f}"
        line += f"{r['bytes_per_state_fwd_bwd']:>9.1f}{peak:>10}"
        if ours:
            line += "".join(f"{ms[c] / ours['ms'][c]:>16.2f}" for c in cols[2:])
        print(line)
    others = {p: r for p, r in rows.items() if p not in ("cpu", "cpu-before")}
    if ours and others:
        key = f"fb_cpu_{threads[0]}t"
        best = min(others, key=lambda p: others[p]["ms"][key])
        print(f"  best peer (forward+backward CPU time, {threads[0]} thread(s)): {best}; cpu is "
              f"{others[best]['ms'][key] / ours['ms'][key]:.2f}x faster")


def print_table(rows, ours, hbm, mufu):
    head = f"  {'backend':<20}{'fwd ms':>10}{'f+b ms':>10}{'fwd GB/s':>10}{'f+b GB/s':>10}"
    head += f"{'%HBM f/fb':>12}{'%MUFU f/fb':>12}" if hbm else ""
    head += f"{'ours x f':>10}{'ours x fb':>10}"
    print(head)
    for peer, r in rows.items():
        line = f"  {peer:<20}{r['fwd_ms']:>10.3f}{r['fwd_bwd_ms']:>10.3f}"
        line += f"{r['fwd_GBps']:>10.3g}{r['fwd_bwd_GBps']:>10.3g}"
        if hbm:
            line += f"{100 * r['fwd_GBps'] * 1e9 / hbm:>6.0f}/{100 * r['fwd_bwd_GBps'] * 1e9 / hbm:<5.0f}"
            line += f"{100 * r['fwd_exp_per_s'] / mufu:>6.0f}/{100 * r['fwd_bwd_exp_per_s'] / mufu:<5.0f}"
        if ours in rows:  # speedup of our backend over this peer: t_peer / t_ours
            mine = rows[ours]
            line += f"{r['fwd_ms'] / mine['fwd_ms']:>10.2f}{r['fwd_bwd_ms'] / mine['fwd_bwd_ms']:>10.2f}"
        print(line)


def write_json(record, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dev = record["device"].replace(" ", "_").replace("/", "_")
    path = os.path.join(out_dir, f"scan_{dev}_{stamp}.json")
    atomic_write_text(path, json.dumps(record, indent=2))
    return path


def main():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", metavar="B,D,L,N",
                   help="repeatable; default: 96,1536,256,256 and 64,1536,1024,16 on GPU, "
                        "2,64,1024,16 on CPU")
    p.add_argument("--dtype", choices=DTYPES, default="bf16" if cuda else "fp32")
    p.add_argument("--peers", nargs="+",
                   default=(["triton", "reference", "reference-compiled", "mamba_ssm"] if cuda
                            else ["cpu", "cpu-before", "mambapy", "reference"]),
                   choices=["triton", "cpu", "cpu-before", "mambapy", "reference", "reference-compiled",
                            "mamba_ssm"])
    p.add_argument("--no-z", action="store_true", help="benchmark without the silu(z) gate")
    p.add_argument("--threads", type=int, nargs="+",
                   help="CPU threads for torch; on CPU each count is measured (default: 1 2); on GPU the first")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: the child of peak_memory_mib
    args = p.parse_args()

    if args.peak_of:
        b, d, l, n = (int(v) for v in args.shape[0].split(","))
        return run_peak(args.peak_of, b, d, l, n, DTYPES[args.dtype], not args.no_z)
    if not cuda:
        return main_cpu(args)
    if args.threads:
        torch.set_num_threads(args.threads[0])
    device = torch.device("cuda" if cuda else "cpu")
    shapes = args.shape or (["96,1536,256,256", "64,1536,1024,16"] if cuda else ["2,64,1024,16"])
    dtype = DTYPES[args.dtype]
    ours = "triton" if cuda else "cpu"
    hbm, mufu = peaks(device)
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if cuda else f"cpu-{platform.machine()}-{threads}threads"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    record = dict(device=name, torch=torch.__version__, triton=triton_version, dtype=args.dtype,
                  z=not args.no_z, threads=threads, peaks=dict(hbm_Bps=hbm, mufu_exp_per_s=mufu), results=[])
    print(f"device: {name}  torch {torch.__version__}  triton {triton_version}  dtype {args.dtype}")
    for spec in shapes:
        b, d, l, n = (int(v) for v in spec.split(","))
        print(f"\nb={b} d={d} l={l} n={n}")
        rows, work = bench_shape(b, d, l, n, dtype, device, args.peers, args.warmup, args.reps, not args.no_z)
        print_table(rows, ours, hbm, mufu)
        record["results"].append(dict(shape=dict(b=b, d=d, l=l, n=n), work=work, backends=rows))
    print(f"\nwrote {write_json(record, args.out)}")


def main_cpu(args):
    threads = args.threads or [1, 2]
    shapes = args.shape or ["32,128,64,16", "2,64,1024,16"]  # ZigMa-XS's scan at batch 32; a long one
    dtype = DTYPES[args.dtype]
    name = f"cpu-{platform.machine()}-{os.cpu_count()}cores"
    load_before = os.getloadavg()
    print(f"device: {name}  torch {torch.__version__}  dtype {args.dtype}  threads {threads}  "
          f"load {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    record = dict(device=name, torch=torch.__version__, dtype=args.dtype, z=not args.no_z, threads=threads,
                  reps=args.reps, statistic="median", load_before=load_before, results=[])
    for spec in shapes:
        b, d, l, n = (int(v) for v in spec.split(","))
        print(f"\nb={b} d={d} l={l} n={n}")
        rows = bench_shape_cpu(b, d, l, n, dtype, args.peers, threads, args.warmup, args.reps, not args.no_z)
        print_table_cpu(rows, threads)
        record["results"].append(dict(shape=dict(b=b, d=d, l=l, n=n), backends=rows))
    record["load_after"] = os.getloadavg()
    print(f"\nload after: {' '.join(f'{v:.2f}' for v in record['load_after'])}")
    print(f"wrote {write_json(record, args.out)}")


if __name__ == "__main__":
    main()
