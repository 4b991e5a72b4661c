"""The public selective scan: validation, backend choice and the `torch.library` custom op.

Backends: "reference" (scan_ref, autograd over time steps: the oracle), "cpu" (scan_cpu) and
"triton" (scan_triton, CUDA tensors or CPU under TRITON_INTERPRET=1). The fast backends share
one interface (docs/architecture.md):

    forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0) -> (out, h_T, saved)
    backward(dout, dh_T, u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, saved)
        -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0)

and are wrapped in the custom ops `arcee::selective_scan_fwd` / `arcee::selective_scan_bwd`
(fake kernels + `register_autograd`), so `torch.compile(fullgraph=True)` traces through them.
"""
import importlib
import os
from typing import Optional

import torch
from torch import Tensor

from .scan_ref import compute_dtype, selective_scan_ref

BACKENDS = ("reference", "cpu", "triton")
MAX_D_STATE = 256
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PARAM_DTYPES = (torch.float32, torch.float64)


class DeviceMismatchError(ValueError, RuntimeError):
    """Input tensors on different devices (both a ValueError and a RuntimeError)."""


# ----------------------------------------------------------------------------- validation

def _tensor(name, x, shape, expected):
    """Check that `x` is a tensor of the given shape; `expected` spells the shape for errors."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {expected} = {tuple(shape)}, got {tuple(x.shape)}")


def _dtype(name, x, allowed, what):
    if x.dtype not in allowed:
        raise ValueError(f"{name} must be {what}, got {x.dtype}")


def _validate(u, delta, A, B, C, D, z, delta_bias, h0):
    """Raise ValueError naming the argument on bad input; return B, C as (b, g, n, l)."""
    if not isinstance(u, Tensor) or u.dim() != 3:
        got = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise ValueError(f"u must be a tensor of shape (b, d, l), got {got}")
    _dtype("u", u, _INPUT_DTYPES, "float16, bfloat16, float32 or float64")
    b, d, l = u.shape
    if min(b, d, l) < 1:
        raise ValueError(f"u must have shape (b, d, l) with b, d, l >= 1, got {tuple(u.shape)}")
    in_dtype = f"{u.dtype} (the dtype of u)"
    _tensor("delta", delta, (b, d, l), "(b, d, l)")
    _dtype("delta", delta, (u.dtype,), in_dtype)
    if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[0] != d:
        got = tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__
        raise ValueError(f"A must have shape (d, n) = ({d}, n), got {got}")
    if A.is_complex():
        raise ValueError(f"complex A is not supported (got {A.dtype}): arcee's scan is the real (S4D-real / "
                         "Mamba) one; pass A as real float32")
    _dtype("A", A, _PARAM_DTYPES, "real float32 (or float64)")
    n = A.shape[1]
    if not 1 <= n <= MAX_D_STATE:
        raise ValueError(f"A must have shape (d, n) with 1 <= n (d_state) <= {MAX_D_STATE}, got n = {n}")
    for name, x in (("B", B), ("C", C)):
        if not isinstance(x, Tensor) or x.dim() not in (2, 3, 4):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must have shape (b, g, n, l), (b, n, l) or (d, n), got {got}")
    per_channel = B.dim() == 2 or C.dim() == 2
    B, C = (_constant_as_grouped(name, x, u, n) for name, x in (("B", B), ("C", C)))
    if per_channel:  # a constant (d, n) is one group per channel: the other becomes so too
        B, C = (x.expand(b, d, n, l) if x.shape[1] == 1 else x for x in (B, C))
    g = B.shape[1]
    if g < 1 or d % g:
        raise ValueError(f"B must have shape (b, g, n, l) with d = {d} divisible by g, got g = {g}")
    for name, x in (("B", B), ("C", C)):
        _tensor(name, x, (b, g, n, l), "(b, g, n, l)")
        _dtype(name, x, (u.dtype,), in_dtype)
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None:
            _tensor(name, x, (d,), "(d,)")
            _dtype(name, x, _PARAM_DTYPES, "float32 (or float64)")
    if z is not None:
        _tensor("z", z, (b, d, l), "(b, d, l)")
        _dtype("z", z, (u.dtype,), in_dtype)
    if h0 is not None:
        _tensor("initial_state", h0, (b, d, n), "(b, d, n)")
        _dtype("initial_state", h0, _PARAM_DTYPES, "float32 (or float64)")
    named = dict(delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=h0)
    for name, x in named.items():
        if x is not None and x.device != u.device:
            raise DeviceMismatchError(f"{name} is on {x.device} but u is on {u.device}: all tensors must "
                                      "be on one device")
    return B, C


def _constant_as_grouped(name, x, u, n):
    """mamba_ssm's drop-in forms as (b, g, n, l) views: (b, n, l) is g = 1; a constant (d, n) is
    one group per channel, the same at every step and batch element (a stride-0 view, cast to u's
    dtype; autograd sums its gradient back to (d, n))."""
    b, d, l = u.shape
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() == 2:
        if tuple(x.shape) != (d, n):
            raise ValueError(f"{name} must have shape (b, g, n, l), (b, n, l) or, constant, (d, n) = {(d, n)}; "
                             f"got {tuple(x.shape)}")
        return x.to(u.dtype).t().reshape(1, d, n, 1).expand(b, d, n, l)
    return x


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _choose_backend(backend, device) -> str:
    if backend is None:
        return "triton" if device.type == "cuda" else "cpu"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise ValueError(f"backend='triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 set "
                         "before arcee.ops.scan_triton is imported")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got {device}")
    return backend


def _module(backend: str):
    # Imported lazily: TRITON_INTERPRET must be set before scan_triton is imported.
    return importlib.import_module(f"arcee.ops.scan_{backend}")


# ----------------------------------------------------------------------------- custom ops
# The backend's `saved` crosses the op boundary as flat bytes plus a small CPU int64 tensor
# [dtype index, *shape]: its size depends on the backend's chunking, which the fake kernel
# cannot know, so the fake gives it an unbacked size.

_SAVED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64,
                 torch.uint8)


def _pack(saved: Tensor):
    meta = torch.tensor([_SAVED_DTYPES.index(saved.dtype), *saved.shape], dtype=torch.int64)
    return saved.contiguous().view(-1).view(torch.uint8), meta


def _unpack(flat: Tensor, meta: Tensor) -> Tensor:
    code, *shape = meta.tolist()
    return flat.view(_SAVED_DTYPES[code]).view(shape)


@torch.library.custom_op("arcee::selective_scan_fwd", mutates_args=())
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
              h0: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out, h_T, saved = _module(backend).forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0)
    flat, meta = _pack(saved)
    if h_T.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr():
        h_T = h_T.clone()  # custom-op outputs must not alias each other
    return out, h_T, flat, meta


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, backend):
    b, d, l = u.shape
    ctx = torch.library.get_ctx()
    return (u.new_empty(b, d, l), u.new_empty(b, d, A.shape[1], dtype=compute_dtype(u.dtype)),
            u.new_empty(ctx.new_dynamic_size(), dtype=torch.uint8),
            torch.empty(ctx.new_dynamic_size(), dtype=torch.int64))


@torch.library.custom_op("arcee::selective_scan_bwd", mutates_args=())
def _scan_bwd(dout: Tensor, dh_T: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
              D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
              delta_softplus: bool, h0: Optional[Tensor], saved: Tensor, saved_meta: Tensor,
              backend: str) -> list[Tensor]:
    grads = _module(backend).backward(dout, dh_T, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                      h0, _unpack(saved, saved_meta))
    inputs = (u, delta, A, B, C, D, z, delta_bias, h0)
    # Missing optional inputs get empty placeholders (custom ops cannot return None).
    return [u.new_empty(0) if x is None else gx.to(x.dtype).contiguous() for gx, x in zip(grads, inputs)]


@_scan_bwd.register_fake
def _(dout, dh_T, u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, saved, saved_meta, backend):
    inputs = (u, delta, A, B, C, D, z, delta_bias, h0)
    return [u.new_empty(0) if x is None else x.new_empty(x.shape) for x in inputs]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0, output[2], output[3])
    ctx.delta_softplus, ctx.backend = delta_softplus, backend
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.set_materialize_grads(False)  # no zero gradients for `saved`, nor for an unused h_T


def _backward(ctx, dout, dh_T, _dsaved, _dmeta):
    u, delta, A, B, C, D, z, delta_bias, h0, saved, meta = ctx.saved_tensors
    dout = torch.zeros_like(u) if dout is None else dout.contiguous()
    dh_T = None if dh_T is None else dh_T.contiguous()
    grads = _scan_bwd(dout, dh_T, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, h0, saved,
                      meta, ctx.backend)
    grads = [None if x is None else gx for gx, x in zip(grads, (u, delta, A, B, C, D, z, delta_bias, h0))]
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0 = grads
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, None, dh0, None


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API

def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, initial_state=None, backend=None):
    """Selective scan with a differentiable initial and final state (drop-in for mamba_ssm's).

    u, delta, z: (b, d, l) fp16/bf16/fp32/fp64; A: (d, n) fp32, 1 <= n <= 256;
    B, C: (b, g, n, l) or (b, n, l) in u's dtype, d % g == 0, or a constant (d, n) (mamba_ssm's
    form; cast to u's dtype); D, delta_bias: (d,) fp32 (any strides); A real (complex is refused);
    initial_state: (b, d, n) fp32 or None (zeros).
    backend: "reference", "cpu", "triton" or None (triton for CUDA tensors, cpu for CPU tensors).
    Returns out (b, d, l) in u's dtype, and h_T (b, d, n) fp32 (fp64 for fp64 inputs) when
    return_last_state. Gradients flow to every tensor input, including initial_state, and from
    both outputs.
    """
    B4, C4 = _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    backend = _choose_backend(backend, u.device)
    if backend == "reference":
        return selective_scan_ref(u, delta, A, B4, C4, D, z, delta_bias, bool(delta_softplus),
                                  return_last_state, initial_state)
    ct = compute_dtype(u.dtype)
    A, D, delta_bias, h0 = (None if x is None else x.to(ct) for x in (A, D, delta_bias, initial_state))
    out, h_T, _, _ = _scan_fwd(u, delta, A, B4, C4, D, z, delta_bias, bool(delta_softplus), h0, backend)
    return (out, h_T) if return_last_state else out
