"""Fast CPU selective scan: one fused C++ pass forward, one recompute + reverse pass backward.

The kernel (`scan_cpu.cpp`, C++17 with GCC vector extensions, no torch headers) is compiled on
first use with `$CXX` (default `g++`, GCC >= 9; about 5 s) for this machine (`-march=native`),
cached under `$ARCEE_CACHE` (default `~/.cache/arcee`) and called through ctypes. It walks time in
chunks of `T` steps with the state of 16 channels in vectors, fuses softplus, the bias, `D`,
`silu(z)` and every gradient, and saves only the state entering each chunk; nothing of size
(b, d, n, l) is ever written. A tail chunk is simply shorter, so any `l` is exact. Math:
REFERENCE.md section 1 and docs/ops.md.

Threads (`threads()`): up to `torch.get_num_threads()`, fewer when other threads are runnable
right now (Linux: /proc/loadavg), so that an oversubscribed machine runs the scan on the calling
thread instead of waiting for a descheduled helper, and only as many as get 4 tasks each. Helpers
claim tasks (16 channels of one batch element forward, one group of one batch element backward)
from a shared counter and sleep between calls; the caller never waits for a helper that has not
started. None of it is torch's OpenMP, whose spinning workers are what made the old path 8-68x
slower at 2 threads on a busy 2-core machine (benchmarks/scan.py measures 1 against 2 threads).
"""
import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading

import torch

from .scan_ref import compute_dtype

LANES = 16  # channels per vector: W in scan_cpu.cpp
MAX_CHUNK = 64  # steps per chunk; the backward keeps 4 x T x n x 16 values of the chunk in cache
CHUNK_STATES = 2048  # T x n at most (512 KiB of fp32 backward scratch)
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scan_cpu.cpp")
CXXFLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-Wno-psabi"]


try:
    _CORES = len(os.sched_getaffinity(0))
    _LOADAVG = os.open("/proc/loadavg", os.O_RDONLY)  # "1.0 0.9 0.8 RUNNING/TOTAL LASTPID"
except (AttributeError, OSError):
    _CORES, _LOADAVG = os.cpu_count() or 1, None


def threads() -> int:
    """Threads for one kernel call: torch.get_num_threads(), capped by the cores that other
    runnable threads leave free at this moment (the running count includes the caller)."""
    want = torch.get_num_threads()
    if want <= 1 or _LOADAVG is None:
        return max(1, want)
    try:
        running = int(os.pread(_LOADAVG, 128, 0).split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return want
    return max(1, min(want, _CORES - (running - 1)))


def chunk_len(n: int) -> int:
    """Steps per chunk for d_state n (8 at n = 256): one saved state per chunk, backward scratch ~ T n."""
    return max(1, min(MAX_CHUNK, CHUNK_STATES // n))


class _Args(ctypes.Structure):
    """ScanArgs in scan_cpu.cpp (same field order)."""
    _fields_ = ([(k, ctypes.c_int64) for k in ("b", "d", "l", "n", "g", "T", "softplus", "threads")]
                + [(k, ctypes.c_void_p) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0",
                                                  "out", "hT", "saved", "dout", "dhT", "du", "ddelta", "dA",
                                                  "dB", "dC", "dD", "dz", "ddelta_bias", "dh0")])


_lib = None
_lib_lock = threading.Lock()


def _cache_dir() -> str:
    root = os.path.expanduser(os.environ.get("ARCEE_CACHE") or "~/.cache/arcee")  # as arcee.data.digits
    try:
        os.makedirs(root, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    root = os.path.join(tempfile.gettempdir(), f"arcee-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
    os.makedirs(root, exist_ok=True)
    return root


def _machine() -> str:
    """What -march=native depends on: the CPU's model and flags (Linux), else the platform."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({line for line in f if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _build() -> str:
    """Compile scan_cpu.cpp once per source, compiler, flags and CPU; return the library path."""
    cxx = os.environ.get("CXX", "g++")
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + "\0".join([cxx, *CXXFLAGS, _machine()]).encode()).hexdigest()[:16]
    cache = _cache_dir()
    path = os.path.join(cache, f"scan_cpu_{key}.so")
    if os.path.exists(path):
        return path
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # then an atomic rename: concurrent builds are safe
    os.close(fd)
    try:
        subprocess.run([cxx, *CXXFLAGS, SOURCE, "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, path)
    except FileNotFoundError:
        raise RuntimeError(f"the CPU selective scan compiles a small C++ kernel on first use, but the compiler "
                           f"{cxx!r} was not found: install g++ (or set CXX), or pass backend='reference'") from None
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"compiling {SOURCE} with {cxx!r} failed:\n{e.stderr[-4000:]}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def kernel() -> ctypes.CDLL:
    """The compiled kernel library (built on first call)."""
    global _lib
    with _lib_lock:
        if _lib is None:
            lib = ctypes.CDLL(_build())
            for name in ("arcee_scan_fwd_f32", "arcee_scan_fwd_f64", "arcee_scan_bwd_f32", "arcee_scan_bwd_f64"):
                getattr(lib, name).argtypes = [ctypes.POINTER(_Args)]
                getattr(lib, name).restype = None
            _lib = lib
    return _lib


def _prepare(ct, *xs):
    """Contiguous copies in the compute dtype (no copy when already so); None stays None."""
    return [None if x is None else x.to(ct).contiguous() for x in xs]


def _call(which, ct, sizes, tensors):
    """Run arcee_scan_{which}_{f32|f64} on ScanArgs built from `sizes` (ints) and `tensors`
    (contiguous, dtype ct, or None: absent)."""
    args = _Args(**sizes, **{k: None if x is None else x.data_ptr() for k, x in tensors.items()})
    getattr(kernel(), f"arcee_scan_{which}_{'f64' if ct == torch.float64 else 'f32'}")(ctypes.byref(args))


def _saved_numel(b, d, l, n, g):
    return b * -(-l // chunk_len(n)) * g * -(-(d // g) // LANES) * n * LANES


def forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0):
    """Shapes as in selective_scan_fn (B, C 4-D). Returns out (b, d, l) in u's dtype, h_T (b, d, n)
    fp32/fp64 and `saved`: the state entering every chunk, (b, chunks, g, tiles, n, 16) flat."""
    b, d, l = u.shape
    g, n = B.shape[1], A.shape[1]
    ct = compute_dtype(u.dtype)
    u_, delta_, B_, C_, z_ = _prepare(ct, u, delta, B, C, z)
    A_, D_, bias_, h0_ = _prepare(ct, A, D, delta_bias, h0)
    out = torch.empty(b, d, l, dtype=ct)
    h_T = torch.empty(b, d, n, dtype=ct)
    saved = torch.empty(_saved_numel(b, d, l, n, g), dtype=ct)
    sizes = dict(b=b, d=d, l=l, n=n, g=g, T=chunk_len(n), softplus=delta_softplus, threads=threads())
    _call("fwd", ct, sizes, dict(u=u_, delta=delta_, A=A_, B=B_, C=C_, D=D_, z=z_, delta_bias=bias_, h0=h0_,
                                 out=out, hT=h_T, saved=saved))
    return out.to(u.dtype), h_T, saved


def backward(dout, dh_T, u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, saved):
    """Gradients of forward's (out, h_T) by REFERENCE.md section 1; None where the input was None."""
    b, d, l = u.shape
    g, n = B.shape[1], A.shape[1]
    ct = compute_dtype(u.dtype)
    u_, delta_, B_, C_, z_, dout_ = _prepare(ct, u, delta, B, C, z, dout)
    A_, D_, bias_, dh_T_ = _prepare(ct, A, D, delta_bias, dh_T)

    saved = saved.contiguous()

    def new(*shape, present=True):
        return torch.empty(*shape, dtype=ct) if present else None

    du, ddelta, dz = new(b, d, l), new(b, d, l), new(b, d, l, present=z is not None)
    dA, dB, dC = new(d, n), new(b, g, n, l), new(b, g, n, l)
    dD, dbias = new(d, present=D is not None), new(d, present=delta_bias is not None)
    dh0 = new(b, d, n, present=h0 is not None)
    sizes = dict(b=b, d=d, l=l, n=n, g=g, T=chunk_len(n), softplus=delta_softplus, threads=threads())
    _call("bwd", ct, sizes, dict(u=u_, delta=delta_, A=A_, B=B_, C=C_, D=D_, z=z_, delta_bias=bias_, saved=saved,
                                 dout=dout_, dhT=dh_T_, du=du, ddelta=ddelta, dA=dA, dB=dB, dC=dC, dD=dD, dz=dz,
                                 ddelta_bias=dbias, dh0=dh0))
    return du, ddelta, dA, dB, dC, dD, dz, dbias, dh0
