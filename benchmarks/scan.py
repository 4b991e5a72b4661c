"""Benchmark the selective scan: forward and forward+backward for every backend and peer.

    python benchmarks/scan.py    # GPU: paper + Mamba shapes, bf16; CPU: small shape, fp32
    python benchmarks/scan.py --shape 2,64,1024,16 --dtype fp32 --peers cpu reference

Peers: ours ("triton" on CUDA, "cpu" on CPU), "reference" (sequential PyTorch, eager),
"reference-compiled" (torch.compile of the reference: unrolls the time loop, so compiling takes
minutes at l = 1024), "mamba_ssm" (its CUDA selective_scan_fn, when importable). All run with
h0 = None and no h_T, as mamba_ssm has neither. Reports ms, speedups, achieved GB/s and exp/s
against the device's roofs, and writes JSON to benchmarks/results/.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

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


def scan_fn(peer):
    """A callable(**inputs) -> out for one backend or peer, or None if unavailable."""
    if peer in ("triton", "cpu", "reference"):
        return lambda **x: selective_scan_fn(**x, delta_softplus=True, backend=peer)
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
                            else ["cpu", "reference"]),
                   choices=["triton", "cpu", "reference", "reference-compiled", "mamba_ssm"])
    p.add_argument("--no-z", action="store_true", help="benchmark without the silu(z) gate")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()
