"""Fused Triton kernels for the state-passing selective scan (REFERENCE.md section 1).

One launch forward, one launch backward. Each program owns a tile of ``BLOCK_D`` channels of one
group of one batch element and walks the sequence in chunks of ``T`` steps. On a
``[BLOCK_D, BLOCK_N, T]`` tile the linear recurrence ``h_t = a_t h_{t-1} + b_t`` is one
``tl.associative_scan`` over pairs ``(a, b)``; the state crosses chunks as ``[BLOCK_D, BLOCK_N]``
fp32 values. Steps past ``l`` are the identity pair ``(1, 0)``, so any ``l >= 1`` works.

d_state larger than ``MAX_BLOCK_N`` is split into ``NB`` blocks of ``BLOCK_N`` states, looped
*inside* the program, so ``y_t = sum_n C_t[n] h_t[n]`` (and du, ddelta in the backward) still
reduce in registers and the forward writes every output once, without atomics. With ``NB == 1`` the
carried state lives in registers; with ``NB > 1`` it goes through global memory: the forward
reads chunk k's entry state from ``saved`` (written by the same program at chunk k - 1) and the
backward keeps ``dL/dh`` in the ``dh0`` buffer, with a barrier between chunks.

``saved`` holds the state entering each chunk, ``(b, nchunks, d, n)`` in the accumulation dtype;
the backward recomputes the states of a chunk from it, runs the reverse scan for
``lam_t = dL/dh_t`` and reduces dB/dC over the channel tile before fp32 atomics. dA, dD and
ddelta_bias are per-program partial sums added with atomics, so the backward is not bitwise
deterministic (as mamba_ssm's). Accumulation is fp32, fp64 when the inputs are fp64.

TRITON_INTERPRET must be set before this module is imported: the autotune configs depend on it.
"""
import os

import numpy as np
import torch
import triton
import triton.language as tl

MAX_BLOCK_N = 64  # states per block; larger d_state loops over ceil(n / 64) blocks
FWD_TILE = 8192  # BLOCK_D * BLOCK_N * T elements per program: no ptxas spills at 8 warps on sm_90
BWD_TILE = 4096  # the backward keeps about twice as many tiles alive (same criterion)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _vectorize_interpreter_scan():
    """Make the interpreter's generic ``tl.associative_scan`` loop over the scan axis only.

    Triton 3.x interprets it one scalar at a time (about 30 us each: seconds for one small tile).
    Combine functions are elementwise by contract, so calling one on whole slices along the axis
    gives the same result. Left alone if the interpreter's internals differ from what we expect.
    """
    from triton.runtime import interpreter

    scan_ops = getattr(interpreter, "ScanOps", None)
    if scan_ops is None or not hasattr(scan_ops, "generic_scan") or not hasattr(scan_ops, "to_tensor"):
        return

    def generic_scan(self, inputs):
        data = [np.moveaxis(x.handle.data, self.axis, 0) for x in inputs]
        outs = [np.empty_like(d) for d in data]
        acc = None
        for i in range(data[0].shape[0]):
            cur = tuple(self.to_tensor(d[i:i + 1], x.dtype) for d, x in zip(data, inputs))
            acc = cur if acc is None else self.combine_fn.fn(*acc, *cur)
            acc = acc if isinstance(acc, tuple) else (acc,)
            for o, a in zip(outs, acc):
                o[i:i + 1] = a.handle.data if isinstance(a, tl.core.tensor) else a
        return [self.to_tensor(np.moveaxis(o, 0, self.axis), x.dtype) for o, x in zip(outs, inputs)]

    scan_ops.generic_scan = generic_scan


if _INTERPRET:
    _vectorize_interpreter_scan()


# ----------------------------------------------------------------------------- configs

def _configs():
    if _INTERPRET or not torch.cuda.is_available():  # the interpreter cannot autotune
        return [triton.Config({"BLOCK_D": 4}, num_warps=4)]
    return [triton.Config({"BLOCK_D": bd}, num_warps=w) for bd in (1, 2, 4, 8, 16, 32) for w in (4, 8)]


def _pruner(budget):
    def prune(configs, named_args, **kwargs):
        if len(configs) == 1:
            return configs
        tile_nt = kwargs["BLOCK_N"] * kwargs["T"]
        max_bd = triton.next_power_of_2(named_args["dim"] // named_args["ngroups"])
        kept = [c for c in configs
                if c.kwargs["BLOCK_D"] * tile_nt <= budget and c.kwargs["BLOCK_D"] <= max_bd
                and c.kwargs["BLOCK_D"] * tile_nt >= 32 * c.num_warps]  # at least one element per thread
        return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_D"], c.num_warps))]
    return prune


# ----------------------------------------------------------------------------- helpers

@triton.jit
def _softplus(x):
    # log(1 + e^x), identity above 20 like torch's softplus (tl.math.log1p is missing in the interpreter)
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _combine(a1, b1, a2, b2):
    # apply (a1, b1) then (a2, b2): h -> a2 * (a1 * h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _states(h_in, A, dt, dtu, Bt):
    """States of one chunk. h_in [BD, BN] enters; A [BD, BN]; dt, dtu = dt*u [BD, T]; Bt [BN, T].
    Returns h [BD, BN, T] with h_t = a_t h_{t-1} + dt_t B_t u_t, a_t = exp(dt_t A)."""
    a = tl.exp(dt[:, None, :] * A[:, :, None])
    a_cum, h_loc = tl.associative_scan((a, dtu[:, None, :] * Bt[None, :, :]), axis=2, combine_fn=_combine)
    return a_cum * h_in[:, :, None] + h_loc


@triton.jit
def _at(x, tt, i):
    """x[:, :, i] of a [BD, BN, T] tile (tt = arange(T))."""
    return tl.sum(tl.where(tt[None, None, :] == i, x, 0.0), axis=2)


@triton.jit
def _dt(delta_ptrs, mask, bias, ACC: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt = softplus(delta + bias) at masked positions, 0 elsewhere (so a = 1: the identity step).
    Returns (dt, delta + bias)."""
    x = tl.load(delta_ptrs, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        x += bias[:, None]
    dt = x
    if SOFTPLUS:
        dt = _softplus(x)
    return tl.where(mask, dt, 0.0), x


# ----------------------------------------------------------------------------- forward

@triton.autotune(configs=_configs(), key=["dim", "dstate", "seqlen", "HAS_Z"],
                 prune_configs_by={"early_config_prune": _pruner(FWD_TILE)})
@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    out_ptr, hT_ptr, saved_ptr,
    dim, dstate, seqlen, nchunks, ngroups,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_hb, s_hd, s_hn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, T: tl.constexpr,
):
    dpg = dim // ngroups
    ntiles = tl.cdiv(dpg, BLOCK_D)  # 1-D grid: channel tiles fastest, so tiles sharing B, C run together
    pid = tl.program_id(0)
    bi = (pid // (ntiles * ngroups)).to(tl.int64)
    grp = (pid // ntiles) % ngroups
    cg = (pid % ntiles) * BLOCK_D + tl.arange(0, BLOCK_D)  # channel within the group
    mask_d = cg < dpg
    c = (grp * dpg + cg).to(tl.int64)
    nn = tl.arange(0, BLOCK_N)
    tt = tl.arange(0, T)

    u_ptrs = u_ptr + bi * s_ub + c[:, None] * s_ud + tt[None, :] * s_ul
    delta_ptrs = delta_ptr + bi * s_db + c[:, None] * s_dd + tt[None, :] * s_dl
    z_ptrs = z_ptr + bi * s_zb + c[:, None] * s_zd + tt[None, :] * s_zl
    out_ptrs = out_ptr + (bi * dim + c[:, None]) * seqlen + tt[None, :]
    B_base = B_ptr + bi * s_Bb + grp * s_Bg
    C_base = C_ptr + bi * s_Cb + grp * s_Cg
    state_off = c[:, None] * dstate + nn[None, :]  # into a (d, n) slab of saved / h_T
    slab = (bi * 0 + dim) * dstate  # one (d, n) state slab, int64: nchunks * d * n may pass 2^31
    saved_b = saved_ptr + bi * nchunks * slab

    bias = tl.load(bias_ptr + c, mask=mask_d, other=0.0).to(ACC) if HAS_BIAS else None
    Dv = tl.load(D_ptr + c, mask=mask_d, other=0.0).to(ACC) if HAS_D else None

    # saved[:, 0] = h0 (zeros when h0 is None); with NB == 1 the carry stays in registers
    h = tl.zeros([BLOCK_D, BLOCK_N], ACC)
    for j in range(NB):
        n_idx = j * BLOCK_N + nn
        mask_dn = mask_d[:, None] & (n_idx < dstate)[None, :]
        h0 = tl.zeros([BLOCK_D, BLOCK_N], ACC)
        if HAS_H0:
            h0 = tl.load(h0_ptr + bi * s_hb + c[:, None] * s_hd + n_idx[None, :] * s_hn,
                         mask=mask_dn, other=0.0).to(ACC)
        tl.store(saved_b + state_off + j * BLOCK_N, h0, mask=mask_dn)
        if NB == 1:
            h = h0
    if NB > 1:
        tl.debug_barrier()

    for k in range(nchunks):
        t = k * T + tt
        mask_t = t < seqlen
        mask_dt = mask_d[:, None] & mask_t[None, :]
        u = tl.load(u_ptrs + k * T * s_ul, mask=mask_dt, other=0.0).to(ACC)
        dt = _dt(delta_ptrs + k * T * s_dl, mask_dt, bias, ACC, HAS_BIAS, SOFTPLUS)[0]
        dtu = dt * u
        y = tl.zeros([BLOCK_D, T], ACC)
        for j in range(NB):
            n_idx = j * BLOCK_N + nn
            mask_n = n_idx < dstate
            mask_dn = mask_d[:, None] & mask_n[None, :]
            mask_nt = mask_n[:, None] & mask_t[None, :]
            A = tl.load(A_ptr + c[:, None] * dstate + n_idx[None, :], mask=mask_dn, other=0.0).to(ACC)
            Bt = tl.load(B_base + n_idx[:, None] * s_Bn + t[None, :] * s_Bl, mask=mask_nt, other=0.0).to(ACC)
            Ct = tl.load(C_base + n_idx[:, None] * s_Cn + t[None, :] * s_Cl, mask=mask_nt, other=0.0).to(ACC)
            if NB > 1:
                h = tl.load(saved_b + k * slab + state_off + j * BLOCK_N, mask=mask_dn, other=0.0)
            hs = _states(h, A, dt, dtu, Bt)
            y += tl.sum(Ct[None, :, :] * hs, axis=1)  # y_t = sum_n C_t[n] h_t[n]
            h = _at(hs, tt, T - 1)  # tail steps are the identity, so this is the last real state
            tl.store(saved_b + (k + 1) * slab + state_off + j * BLOCK_N, h, mask=mask_dn & (k + 1 < nchunks))
            tl.store(hT_ptr + bi * slab + state_off + j * BLOCK_N, h, mask=mask_dn & (k + 1 == nchunks))
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            zv = tl.load(z_ptrs + k * T * s_zl, mask=mask_dt, other=0.0).to(ACC)
            y *= zv * tl.sigmoid(zv)  # out = y * silu(z)
        tl.store(out_ptrs + k * T, y.to(out_ptr.dtype.element_ty), mask=mask_dt)
        if NB > 1:
            tl.debug_barrier()  # chunk k + 1 reads the states this chunk stored


# ----------------------------------------------------------------------------- backward

@triton.autotune(configs=_configs(), key=["dim", "dstate", "seqlen", "HAS_Z"],
                 prune_configs_by={"early_config_prune": _pruner(BWD_TILE)},
                 reset_to_zero=["dA_ptr", "dB_ptr", "dC_ptr", "dD_ptr", "dbias_ptr"])
@triton.jit
def _bwd_kernel(
    dout_ptr, dhT_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, saved_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, dh0_ptr,
    dim, dstate, seqlen, nchunks, ngroups,
    s_ob, s_od, s_ol, s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_gb, s_gd, s_gn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_DHT: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, T: tl.constexpr,
):
    dpg = dim // ngroups
    ntiles = tl.cdiv(dpg, BLOCK_D)  # 1-D grid: channel tiles fastest, so tiles sharing B, C run together
    pid = tl.program_id(0)
    bi = (pid // (ntiles * ngroups)).to(tl.int64)
    grp = (pid // ntiles) % ngroups
    cg = (pid % ntiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cg < dpg
    c = (grp * dpg + cg).to(tl.int64)
    nn = tl.arange(0, BLOCK_N)
    tt = tl.arange(0, T)

    dout_ptrs = dout_ptr + bi * s_ob + c[:, None] * s_od + tt[None, :] * s_ol
    u_ptrs = u_ptr + bi * s_ub + c[:, None] * s_ud + tt[None, :] * s_ul
    delta_ptrs = delta_ptr + bi * s_db + c[:, None] * s_dd + tt[None, :] * s_dl
    z_ptrs = z_ptr + bi * s_zb + c[:, None] * s_zd + tt[None, :] * s_zl
    bdl_off = (bi * dim + c[:, None]) * seqlen + tt[None, :]  # du, ddelta, dz are contiguous
    B_base = B_ptr + bi * s_Bb + grp * s_Bg
    C_base = C_ptr + bi * s_Cb + grp * s_Cg
    dBC_off = (bi * ngroups + grp) * dstate * seqlen  # dB, dC are contiguous (b, g, n, l)
    state_off = c[:, None] * dstate + nn[None, :]
    slab = (bi * 0 + dim) * dstate  # one (d, n) state slab, int64: nchunks * d * n may pass 2^31
    saved_b = saved_ptr + bi * nchunks * slab
    lam_b = dh0_ptr + bi * slab  # with NB > 1, lam carries live here until dh0 overwrites them

    bias = tl.load(bias_ptr + c, mask=mask_d, other=0.0).to(ACC) if HAS_BIAS else None
    Dv = tl.load(D_ptr + c, mask=mask_d, other=0.0).to(ACC) if HAS_D else None

    # lam carry = dL/dh at the first step of the chunk after the current one; dL/dh_T to start
    lam = tl.zeros([BLOCK_D, BLOCK_N], ACC)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], ACC)
    for j in range(NB):
        n_idx = j * BLOCK_N + nn
        mask_dn = mask_d[:, None] & (n_idx < dstate)[None, :]
        g_T = tl.zeros([BLOCK_D, BLOCK_N], ACC)
        if HAS_DHT:
            g_T = tl.load(dhT_ptr + bi * s_gb + c[:, None] * s_gd + n_idx[None, :] * s_gn,
                          mask=mask_dn, other=0.0).to(ACC)
        if NB == 1:
            lam = g_T
        else:
            tl.store(lam_b + state_off + j * BLOCK_N, g_T, mask=mask_dn)
    if NB > 1:
        tl.debug_barrier()

    dD_acc = tl.zeros([BLOCK_D], ACC)
    dbias_acc = tl.zeros([BLOCK_D], ACC)
    for kk in range(nchunks):
        k = nchunks - 1 - kk
        t = k * T + tt
        mask_t = t < seqlen
        mask_dt = mask_d[:, None] & mask_t[None, :]
        u = tl.load(u_ptrs + k * T * s_ul, mask=mask_dt, other=0.0).to(ACC)
        dout = tl.load(dout_ptrs + k * T * s_ol, mask=mask_dt, other=0.0).to(ACC)
        dt, x = _dt(delta_ptrs + k * T * s_dl, mask_dt, bias, ACC, HAS_BIAS, SOFTPLUS)
        # dt_{t+1}: 0 at t = l - 1 and past it, so a_{t+1} = 1 there and lam_{l-1} = gy C + dL/dh_T
        mask_next = mask_d[:, None] & (t + 1 < seqlen)[None, :]
        dt_next = _dt(delta_ptrs + (k * T + 1) * s_dl, mask_next, bias, ACC, HAS_BIAS, SOFTPLUS)[0]
        dtu = dt * u
        gy = dout  # dL/dy
        if HAS_Z:
            zv = tl.load(z_ptrs + k * T * s_zl, mask=mask_dt, other=0.0).to(ACC)
            sig_z = tl.sigmoid(zv)
            gy = dout * zv * sig_z

        y = tl.zeros([BLOCK_D, T], ACC)
        lamB = tl.zeros([BLOCK_D, T], ACC)  # sum_n lam_t[n] B_t[n]
        ddt = tl.zeros([BLOCK_D, T], ACC)  # dL/d dt_t
        for j in range(NB):
            n_idx = j * BLOCK_N + nn
            mask_n = n_idx < dstate
            mask_dn = mask_d[:, None] & mask_n[None, :]
            mask_nt = mask_n[:, None] & mask_t[None, :]
            A = tl.load(A_ptr + c[:, None] * dstate + n_idx[None, :], mask=mask_dn, other=0.0).to(ACC)
            Bt = tl.load(B_base + n_idx[:, None] * s_Bn + t[None, :] * s_Bl, mask=mask_nt, other=0.0).to(ACC)
            Ct = tl.load(C_base + n_idx[:, None] * s_Cn + t[None, :] * s_Cl, mask=mask_nt, other=0.0).to(ACC)
            h_in = tl.load(saved_b + k * slab + state_off + j * BLOCK_N, mask=mask_dn, other=0.0)
            hs = _states(h_in, A, dt, dtu, Bt)
            y += tl.sum(Ct[None, :, :] * hs, axis=1)

            # lam_t = gy_t C_t + a_{t+1} lam_{t+1}: a reverse scan seeded with the carry
            if NB > 1:
                lam = tl.load(lam_b + state_off + j * BLOCK_N, mask=mask_dn, other=0.0)
            a_next = tl.exp(dt_next[:, None, :] * A[:, :, None])
            a_rcum, lam_loc = tl.associative_scan((a_next, gy[:, None, :] * Ct[None, :, :]), axis=2,
                                                  combine_fn=_combine, reverse=True)
            lam_t = a_rcum * lam[:, :, None] + lam_loc
            lam = _at(lam_t, tt, 0)
            if NB > 1:
                tl.store(lam_b + state_off + j * BLOCK_N, lam, mask=mask_dn)

            # dB = sum_c lam dt u, dC = sum_c gy h: reduced over the channel tile, then atomics
            dBC_idx = dBC_off + n_idx[:, None] * seqlen + t[None, :]
            tl.atomic_add(dB_ptr + dBC_idx, tl.sum(lam_t * dtu[:, None, :], axis=0), mask=mask_nt)
            tl.atomic_add(dC_ptr + dBC_idx, tl.sum(gy[:, None, :] * hs, axis=0), mask=mask_nt)

            lam_Bt = lam_t * Bt[None, :, :]
            ah_prev = hs - dtu[:, None, :] * Bt[None, :, :]  # a_t h_{t-1} = h_t - dt_t B_t u_t
            lamB += tl.sum(lam_Bt, axis=1)
            ddt += tl.sum(lam_t * A[:, :, None] * ah_prev, axis=1)
            dA_j = tl.sum(lam_t * dt[:, None, :] * ah_prev, axis=2)  # dA = sum_t dt lam a h_{t-1}
            if NB == 1:
                dA_acc += dA_j
            else:
                tl.atomic_add(dA_ptr + c[:, None] * dstate + n_idx[None, :], dA_j, mask=mask_dn)

        ddt += lamB * u
        du = dt * lamB
        if HAS_D:
            y += Dv[:, None] * u
            du += Dv[:, None] * gy
            dD_acc += tl.sum(gy * u, axis=1)
        if HAS_Z:
            dz = dout * y * sig_z * (1.0 + zv * (1.0 - sig_z))  # d/dz [y z sigmoid(z)]
            tl.store(dz_ptr + bdl_off + k * T, dz.to(dz_ptr.dtype.element_ty), mask=mask_dt)
        ddelta = ddt
        if SOFTPLUS:
            ddelta = ddt * tl.sigmoid(x)
        ddelta = tl.where(mask_dt, ddelta, 0.0)
        dbias_acc += tl.sum(ddelta, axis=1)
        tl.store(du_ptr + bdl_off + k * T, du.to(du_ptr.dtype.element_ty), mask=mask_dt)
        tl.store(ddelta_ptr + bdl_off + k * T, ddelta.to(ddelta_ptr.dtype.element_ty), mask=mask_dt)
        if NB > 1:
            tl.debug_barrier()  # the lam carries stored above are read by the next chunk

    if HAS_H0:  # dh0 = a_0 lam_0
        dt0 = _dt(delta_ptrs, mask_d[:, None] & (tt == 0)[None, :], bias, ACC, HAS_BIAS, SOFTPLUS)[0]
        dt0 = tl.sum(dt0, axis=1)
        for j in range(NB):
            n_idx = j * BLOCK_N + nn
            mask_dn = mask_d[:, None] & (n_idx < dstate)[None, :]
            A = tl.load(A_ptr + c[:, None] * dstate + n_idx[None, :], mask=mask_dn, other=0.0).to(ACC)
            if NB > 1:
                lam = tl.load(lam_b + state_off + j * BLOCK_N, mask=mask_dn, other=0.0)
            tl.store(lam_b + state_off + j * BLOCK_N, tl.exp(dt0[:, None] * A) * lam, mask=mask_dn)
    if NB == 1:
        tl.atomic_add(dA_ptr + state_off, dA_acc, mask=mask_d[:, None] & (nn < dstate)[None, :])
    if HAS_D:
        tl.atomic_add(dD_ptr + c, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + c, dbias_acc, mask=mask_d)


# ----------------------------------------------------------------------------- host side

def _plan(d_state, seqlen):
    """(BLOCK_N, NB, T, nchunks): states per block, state blocks, chunk length, chunks."""
    block_n = min(MAX_BLOCK_N, max(2, triton.next_power_of_2(d_state)))
    t = min(64, max(16, triton.next_power_of_2(seqlen)))
    return block_n, triton.cdiv(d_state, block_n), t, triton.cdiv(seqlen, t)


def _acc(u):
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _tl_acc(acc):
    return tl.float64 if acc == torch.float64 else tl.float32


def _strides(x, ndim):
    return x.stride() if x is not None else (0,) * ndim


def forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0):
    """u, delta, z: (b, d, l); A: (d, n); B, C: (b, g, n, l); D, delta_bias: (d,); h0: (b, d, n).
    Returns out (b, d, l) in u's dtype, h_T (b, d, n) fp32 and saved (b, nchunks, d, n): the states
    entering each chunk of the kernel, for the backward."""
    b, d, l = u.shape
    n, g = A.shape[1], B.shape[1]
    acc = _acc(u)
    block_n, nb, t, nchunks = _plan(n, l)
    A = A.contiguous()
    out = torch.empty((b, d, l), dtype=u.dtype, device=u.device)
    h_T = torch.empty((b, d, n), dtype=acc, device=u.device)
    saved = torch.empty((b, nchunks, d, n), dtype=acc, device=u.device)
    grid = lambda meta: (triton.cdiv(d // g, meta["BLOCK_D"]) * b * g,)  # noqa: E731
    _fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, h0 if h0 is not None else u,
        out, h_T, saved,
        d, n, l, nchunks, g,
        *u.stride(), *delta.stride(), *_strides(z, 3), *B.stride(), *C.stride(), *_strides(h0, 3),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_H0=h0 is not None,
        SOFTPLUS=bool(delta_softplus), ACC=_tl_acc(acc), BLOCK_N=block_n, NB=nb, T=t,
    )
    return out, h_T, saved


def backward(dout, dh_T, u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, saved):
    """Gradients of forward's (out, h_T) given dout (b, d, l) and dh_T (b, d, n) or None.
    Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0), None where the input was None."""
    b, d, l = u.shape
    n, g = A.shape[1], B.shape[1]
    acc = _acc(u)
    block_n, nb, t, nchunks = _plan(n, l)
    assert saved.shape == (b, nchunks, d, n), f"saved: expected {(b, nchunks, d, n)}, got {tuple(saved.shape)}"
    A = A.contiguous()
    dev = u.device
    du = torch.empty((b, d, l), dtype=u.dtype, device=dev)
    ddelta = torch.empty((b, d, l), dtype=delta.dtype, device=dev)
    dz = torch.empty((b, d, l), dtype=z.dtype, device=dev) if z is not None else None
    dA = torch.zeros((d, n), dtype=acc, device=dev)
    dB = torch.zeros((b, g, n, l), dtype=acc, device=dev)
    dC = torch.zeros((b, g, n, l), dtype=acc, device=dev)
    dD = torch.zeros((d,), dtype=acc, device=dev) if D is not None else None
    dbias = torch.zeros((d,), dtype=acc, device=dev) if delta_bias is not None else None
    dh0 = torch.empty((b, d, n), dtype=acc, device=dev)  # also the lam carry buffer when NB > 1
    grid = lambda meta: (triton.cdiv(d // g, meta["BLOCK_D"]) * b * g,)  # noqa: E731
    _bwd_kernel[grid](
        dout, dh_T if dh_T is not None else dout, u, delta, A, B, C,
        D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, saved,
        du, ddelta, dA, dB, dC, dD if dD is not None else dA, dz if dz is not None else du,
        dbias if dbias is not None else dA, dh0,
        d, n, l, nchunks, g,
        *dout.stride(), *u.stride(), *delta.stride(), *_strides(z, 3),
        *B.stride(), *C.stride(), *_strides(dh_T, 3),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_H0=h0 is not None,
        HAS_DHT=dh_T is not None, SOFTPLUS=bool(delta_softplus), ACC=_tl_acc(acc),
        BLOCK_N=block_n, NB=nb, T=t,
    )
    return (
        du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
        dD.to(D.dtype) if D is not None else None, dz,
        dbias.to(delta_bias.dtype) if delta_bias is not None else None,
        dh0.to(h0.dtype) if h0 is not None else None,
    )
