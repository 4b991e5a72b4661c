"""FROZEN BASELINE, not used by arcee: the CPU scan path as of commit 92641fa (before issue 18),
kept so that benchmarks/scan.py can measure "before" against "after" in one process.

Fast CPU selective scan: chunked forward and hand-written backward, no autograd over time.

The recurrence h_t = a_t h_{t-1} + x_t (a_t = exp(dt_t A), x_t = dt_t B_t u_t) is diagonal in
(b, d, n), so it is solved on time-first tensors (L, b, d, n) cut into chunks of T ~ sqrt(l)
steps, and each Python step updates all chunks at once:
  pass 1  run every chunk from a zero state to get its local end state s_c;
  carry   H_{c+1} = P_c H_c + s_c with P_c = prod_t a_t over the chunk (one step per chunk);
  pass 2  rerun the chunks in place, seeded with their true entry state H_c.
Only products of a_t <= 1 are formed, never their inverses, so it is as stable as the
sequential loop. The entry states H_c are saved (with dt and y); the backward recomputes h
from them (pass 2 only) and solves the adjoint lam_t = gy_t C_t + a_{t+1} lam_{t+1} the same way in
reverse (REFERENCE.md section 1). Long inputs are walked in segments of whole chunks, so the
(steps, b, d, n) temporaries stay bounded (and in cache); the state carries across segments.
The tail chunk is padded with identity steps (dt = 0: a = 1, x = 0).
"""
import math
import threading

import torch
import torch.nn.functional as F

from arcee.ops.scan_ref import compute_dtype

SEGMENT_ELEMS = 1 << 19  # steps x b x d x n per segment: ~2 MB per fp32 temporary
LOG2E = 1.0 / math.log(2.0)
MIN_SEGMENT = 64  # steps; below this the Python loops cost more than the memory traffic


def plan(l: int, m: int):
    """(T, number of chunks, chunks per segment) for length l and m = b d n states per step.

    T ~ sqrt(segment length) balances the T in-chunk steps against the carry steps."""
    seg = min(l, max(MIN_SEGMENT, SEGMENT_ELEMS // m))
    T = math.isqrt(seg - 1) + 1  # ceil(sqrt(seg))
    return T, -(-l // T), -(-seg // T)


_workspace = threading.local()


def _scratch(slot: str, shape, dtype) -> torch.Tensor:
    """A per-thread scratch buffer reused across calls (contents undefined).

    glibc returns freed blocks of more than a few hundred KB to the OS, and faulting fresh
    pages in on every call costs more than the arithmetic. A slot holds one segment's
    (steps, b, d, n) or one (l, b, d)-sized tensor.
    """
    numel = math.prod(shape)
    buf = getattr(_workspace, slot, None)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_workspace, slot, buf)
    return buf[:numel].view(shape)


def _time_first(x, L, ct, slot):
    """(b, ..., l) -> zero-padded (L, b, ...) in dtype ct, in scratch buffer `slot`."""
    *lead, l = x.shape
    out = _scratch(slot, (L, *lead), ct)
    out.view(L, -1)[:l].copy_(x.to(ct).reshape(-1, l).t())  # as 2-D: torch's blocked transpose
    out[l:] = 0
    return out


def _untime(x, l):
    """(L, b, ...) -> a new contiguous (b, ..., l): never a view of the scratch `x`."""
    L, *lead = x.shape
    out = x.new_empty(*lead, l)
    out.view(-1, l).copy_(x.view(L, -1)[:l].t())  # as 2-D: torch's blocked transpose
    return out


def _biased(delta, delta_bias, ct):
    """v = delta + delta_bias, (b, d, l); dt = softplus(v) or v."""
    return delta.to(ct) if delta_bias is None else delta.to(ct) + delta_bias.to(ct)[:, None]


def _chunks(x, T):
    """(nc T, *s) -> T views (nc, *s): step k of every chunk."""
    return x.view(-1, T, *x.shape[1:]).unbind(1)


def _carry_fwd(a, x, T, states):
    """Fill states[1:] (nc + 1, *s) from states[0]: the state entering each chunk, then h_last."""
    a_k, x_k = _chunks(a, T), _chunks(x, T)
    s = x_k[0].clone()
    for k in range(1, T):
        s = torch.addcmul(x_k[k], a_k[k], s)  # s_c: chunk c's end state from a zero start
    P = a.view(-1, T, *a.shape[1:]).prod(1)  # chunk c's total decay
    for s_c, P_c, h_in, h_out in zip(s, P, states[:-1], states[1:]):
        torch.addcmul(s_c, P_c, h_in, out=h_out)


def _scan_fwd_(a, x, T, entry):
    """In place x <- h for h_t = a_t h_{t-1} + x_t, each chunk seeded with entry (nc, *s)."""
    a_k, x_k = _chunks(a, T), _chunks(x, T)
    x_k[0].addcmul_(a_k[0], entry)
    for k in range(1, T):
        x_k[k].addcmul_(a_k[k], x_k[k - 1])


def _scan_rev_(a, x, T, g_last):
    """In place x <- lam for lam_t = x_t + a_{t+1} lam_{t+1}, lam_{L-1} = x_{L-1} + g_last.

    Returns a_0 lam_0: the gradient flowing into the state before the first step.
    """
    nc = a.shape[0] // T
    a_k, x_k = _chunks(a, T), _chunks(x, T)
    s = x_k[T - 1].clone()
    for k in range(T - 2, -1, -1):
        s = torch.addcmul(x_k[k], a_k[k + 1], s)  # s_c: chunk c's lam_0 from a zero carry
    P, s = a.view(nc, T, *a.shape[1:]).prod(1), s.mul_(a_k[0])
    # carry[c + 1] = a_{t+1} lam_{t+1} entering chunk c at its last step t; carry[0] = a_0 lam_0.
    carry = x.new_empty(nc + 1, *x.shape[1:])
    carry[nc] = g_last
    for s_c, P_c, c_in, c_out in zip(*(v.unbind(0)[::-1] for v in (s, P, carry[1:], carry[:-1]))):
        torch.addcmul(s_c, P_c, c_in, out=c_out)
    x_k[T - 1].add_(carry[1:])
    for k in range(T - 2, -1, -1):
        x_k[k].addcmul_(a_k[k + 1], x_k[k + 1])
    return carry[0]


def _fill(dt_t, dtu_t, A2, B_t, g):
    """One segment's a = exp(dt A) = 2^(dt A2) (A2 = A log2(e); exp2 is ~2x faster than exp)
    and x = dt B u, (steps, b, d, n), in scratch buffers."""
    L, b, d = dt_t.shape
    n = A2.shape[1]
    a = torch.mul(dt_t[..., None], A2, out=_scratch("a", (L, b, d, n), dt_t.dtype)).exp2_()
    x = _scratch("x", (L, b, d, n), dt_t.dtype)
    torch.mul(dtu_t.view(L, b, g, d // g, 1), B_t[:, :, :, None], out=x.view(L, b, g, d // g, n))
    return a, x


def _contract_n(x5, v, out):
    """out[t, b, g * e] = sum_n x5[t, b, g, e, n] v[t, b, g, n]."""
    # as vec-mat products: ~4x faster than the equivalent mat-vec on CPU
    torch.matmul(v[..., None, :], x5.transpose(-1, -2), out=out.view(*v.shape[:3], 1, -1))


def _contract_e(x5, w, out):
    """out[t, b, g, n] = sum_e x5[t, b, g, e, n] w[t, b, g, e]."""
    torch.matmul(w[..., None, :], x5, out=out[..., None, :])


def _segments(nc, per_seg):
    return [(c0, min(c0 + per_seg, nc)) for c0 in range(0, nc, per_seg)]


def forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0):
    """Shapes as in selective_scan_fn (B, C 4-D). Returns out (b, d, l) in u's dtype,
    h_T (b, d, n) fp32/fp64 and `saved`: the chunk entry states, dt and (with z) y, flat."""
    b, d, l = u.shape
    g, n = B.shape[1], A.shape[1]
    ct = compute_dtype(u.dtype)
    T, nc, per_seg = plan(l, b * d * n)
    L, A2 = nc * T, A.to(ct) * LOG2E
    dt = _biased(delta, delta_bias, ct)
    dt = F.softplus(dt) if delta_softplus else dt  # threshold 20: identity above
    dt_t, dtu_t = _time_first(dt, L, ct, "dt"), _time_first(dt * u, L, ct, "dtu")
    B_t, C_t = _time_first(B, L, ct, "B"), _time_first(C, L, ct, "C")
    states = u.new_empty(nc + 1, b, d, n, dtype=ct)  # states[c] enters chunk c; states[nc] = h_T
    states[0] = 0 if h0 is None else h0
    y = _scratch("y", (L, b, d), ct)  # C . h
    for c0, c1 in _segments(nc, per_seg):
        t = slice(c0 * T, c1 * T)
        a, x = _fill(dt_t[t], dtu_t[t], A2, B_t[t], g)
        _carry_fwd(a, x, T, states[c0:c1 + 1])
        _scan_fwd_(a, x, T, states[c0:c1])  # x <- h
        _contract_n(x.view(-1, b, g, d // g, n), C_t[t], out=y[t])
    y = _untime(y, l)
    if D is not None:
        y = torch.addcmul(y, u.to(ct), D.to(ct)[:, None])
    saved = torch.cat([states[:nc].flatten(), dt.flatten()] + ([] if z is None else [y.flatten()]))
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(u.dtype), states[nc].clone(), saved


def backward(dout, dh_T, u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, saved):
    """Gradients of forward's (out, h_T) by REFERENCE.md section 1; None where the input was None.

    Walks the segments in reverse, recomputing h from the saved entry states and carrying
    a_t lam_t (the gradient flowing into the state before step t) from segment to segment."""
    b, d, l = u.shape
    g, n = B.shape[1], A.shape[1]
    e, ct = d // g, compute_dtype(u.dtype)
    T, nc, per_seg = plan(l, b * d * n)
    L, A = nc * T, A.to(ct)
    A2 = A * LOG2E
    u, dout = u.to(ct), dout.to(ct)
    n_entry, n_dt = nc * b * d * n, b * d * l
    entry, dt = saved[:n_entry].view(nc, b, d, n), saved[n_entry:n_entry + n_dt].view(b, d, l)
    y = None if z is None else saved[n_entry + n_dt:].view(b, d, l)  # C . h + D u
    gy = dout if z is None else dout * F.silu(z.to(ct))  # dL/dy
    dt_t, dtu_t = _time_first(dt, L, ct, "dt"), _time_first(dt * u, L, ct, "dtu")
    B_t, C_t = _time_first(B, L, ct, "B"), _time_first(C, L, ct, "C")
    gy_t = _time_first(gy, L, ct, "gy").view(L, b, g, e)
    lamB, Aq = _scratch("lamB", (L, b, d), ct), _scratch("y", (L, b, d), ct)
    dB, dC = _scratch("dB", (L, b, g, n), ct), _scratch("dC", (L, b, g, n), ct)
    dA = A.new_zeros(d, n)
    carry = torch.zeros(b, d, n, dtype=ct) if dh_T is None else dh_T.to(ct)
    for c0, c1 in reversed(_segments(nc, per_seg)):
        t = slice(c0 * T, c1 * T)
        a, h = _fill(dt_t[t], dtu_t[t], A2, B_t[t], g)
        _scan_fwd_(a, h, T, entry[c0:c1])  # h <- the states
        h5 = h.view(-1, b, g, e, n)
        _contract_e(h5, gy_t[t], out=dC[t])

        lam = _scratch("lam", h.shape, ct)
        lam5 = lam.view(h5.shape)
        torch.mul(gy_t[t, ..., None], C_t[t, :, :, None], out=lam5)
        carry = _scan_rev_(a, lam, T, carry)  # lam <- dL/dh_t
        _contract_n(lam5, B_t[t], out=lamB[t])  # sum_n lam B
        _contract_e(lam5, dtu_t[t].view(-1, b, g, e), out=dB[t])

        # q_t = lam_t a_t h_{t-1} = lam_t (h_t - dt_t B_t u_t), formed in a's buffer.
        a4, h4 = a.view(-1, T, b, d, n), h.view(-1, T, b, d, n)
        a4[:, 1:] *= h4[:, :-1]
        a4[:, 0] *= entry[c0:c1]
        q = a.mul_(lam)
        qA = torch.mul(q, A, out=h)  # h is dead: reuse its buffer
        torch.mv(qA.view(-1, n), qA.new_ones(n), out=Aq[t].view(-1))  # sum_n q A; mat-vec beats sum(-1)
        dA += q.mul_(dt_t[t, ..., None]).sum((0, 1))
    lamB, Aq = _untime(lamB, l), _untime(Aq, l)
    dz = None if z is None else torch.ops.aten.silu_backward(dout * y, z.to(ct))  # dout y silu'(z)
    ddelta = torch.addcmul(Aq, u, lamB)  # dL/d dt
    if delta_softplus:
        ddelta = torch.ops.aten.softplus_backward(ddelta, _biased(delta, delta_bias, ct), 1.0, 20.0)
    du = dt * lamB
    dD = None
    if D is not None:
        du = torch.addcmul(du, gy, D.to(ct)[:, None])
        dD = (gy * u).sum((0, 2))
    ddelta_bias = None if delta_bias is None else ddelta.sum((0, 2))
    dh0 = None if h0 is None else carry
    return du, ddelta, dA, _untime(dB, l), _untime(dC, l), dD, dz, ddelta_bias, dh0
