"""Fused Triton kernels for the state-passing selective scan (REFERENCE.md section 1).

One launch forward, one launch backward, time-parallel like mamba_ssm's CUDA kernel. A program
owns ``BLOCK_D`` channels of one group of one batch element and is one warp. It walks the
sequence in chunks of ``L = 32 * ITEMS`` steps: each lane holds ``ITEMS = 8`` consecutive steps
(one 16-byte vector of bf16 / fp16, two of fp32) of every channel of the tile, so a
``[BLOCK_D, L]`` tile is what the loads give, with no layout conversion. For every state ``n`` in turn (a loop:
``n`` is never a tile axis) the recurrence ``h_t = a_t h_{t-1} + b_t`` is one
``tl.associative_scan`` along time: a sequential scan of the lane's ``ITEMS`` steps, then five
shuffle rounds across the warp, amortised over ``ITEMS`` steps. ``y_t = sum_n C_t[n] h_t[n]`` (and
``du``, ``ddelta`` in the backward) accumulate in registers over the loop on ``n``: no reduction
over ``n`` ever crosses lanes.

Once a sequence spans two backward chunks, the forward walks chunks of two of them (``SUB = 2``):
each lane holds two 16-byte vectors, ``2 ITEMS`` consecutive steps (``_time_order`` numbers the
tile's columns so that the loads give exactly that), which spreads the shuffle rounds, paid per
lane and state, over twice the steps. State crossing chunks goes through memory, one value per
(channel, state) and backward chunk: the forward stores the state leaving backward chunk k in
``saved[:, k]`` (the last one's in ``h_T``) and the backward reads it back as chunk k + 1's entry
state, so ``saved`` is empty when ``l <= L``.

The backward walks chunks in reverse; ``lam_t = dL/dh_t`` obeys ``lam_t = g_t + a_{t+1} lam_{t+1}``: a reverse
scan over ``(a_{t+1}, g_t)``. ``a_{t+1}`` is the forward's ``a`` shifted by one step: in registers
within a lane and one shuffle across lanes, so the backward evaluates one exp per update. What
flows into the previous chunk, ``a_0 lam_0``, is the carry (and, for chunk 0, ``dh0``).

dB, dC are reduced over the channel tile and added with relaxed fp32 atomics, dA, dD and
ddelta_bias per program likewise: the backward is not bitwise deterministic (as mamba_ssm's).
Every full chunk runs without masks; the last, partial chunk runs the same code with masks, its
padded steps the exact identity ``(a, b) = (1, 0)`` (also for ``A = -inf``).

On a GPU the exponentials, logs and reciprocals are the single-instruction approximations
(``ex2/lg2/rcp.approx.ftz.f32``, relative error ~2^-22). fp64 inputs and the interpreter use
``tl.exp2`` / ``tl.log2`` / division. Accumulation is fp32, fp64 when the inputs are fp64.

TRITON_INTERPRET must be set before this module is imported: the autotune configs depend on it.
"""
import os
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
LANES = 32  # one warp per program: a chunk is LANES * ITEMS steps
INTERPRET_CHUNK = 32  # chunk length under the interpreter (small, so tests cross chunks)

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
        if getattr(self.combine_fn, "__name__", "") == "_combine" and len(data) == 2:
            # the linear recurrence of this module's _combine, in numpy: h_i = a_i h_{i-1} + b_i
            (a, b), (a_out, h_out) = data, outs
            np.cumprod(a, axis=0, out=a_out)
            h_out[0] = b[0]
            for i in range(1, a.shape[0]):
                h_out[i] = a[i] * h_out[i - 1] + b[i]
            return [self.to_tensor(np.moveaxis(o, 0, self.axis), x.dtype) for o, x in zip(outs, inputs)]
        acc = None  # reverse scans arrive flipped (apply_impl), so this is always combine(acc, cur)
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

def _gpu_configs(kernel):
    """One warp per program; BLOCK_D channels per lane, registers capped so that at least 16
    warps fit on an SM (occupancy >= 25 %): benchmarks/kernel_static.py reads the cost of each."""
    widths = (1, 2) if kernel == "fwd" else (1,)
    return [triton.Config({"BLOCK_D": bd}, num_warps=1, maxnreg=128) for bd in widths]


def _configs(kernel):
    if _INTERPRET or not torch.cuda.is_available():  # the interpreter cannot autotune
        return [triton.Config({"BLOCK_D": 4}, num_warps=1)]
    return _gpu_configs(kernel)


def _pruner():
    """The widest tile that the group fills (wider ones would be partly masked off): more channels
    per lane share each state's B, C loads and loop overhead, and kernel_static.py shows the wider
    tile costs fewer instructions per update at every shape, so there is nothing to time."""
    def prune(configs, named_args, **kwargs):
        dpg = named_args["dim"] // named_args["ngroups"]
        # a lane holding more than one 16-byte vector of steps (fp32, or a forward chunk of two
        # backward chunks) holds one channel: two would spill
        widest = 1 if kwargs.get("ITEMS", 1) > kwargs.get("VEC", 1) else triton.next_power_of_2(dpg)
        fits = [c for c in configs if c.kwargs["BLOCK_D"] <= widest]
        return [max(fits, key=lambda c: c.kwargs["BLOCK_D"]) if fits else
                min(configs, key=lambda c: c.kwargs["BLOCK_D"])]
    return prune


# ----------------------------------------------------------------------------- math helpers

@triton.jit
def _ex2(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _lg2(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _to_acc(x, ACC: tl.constexpr, FAST: tl.constexpr):
    """x.to(ACC); FAST bf16 widens two packed values with one instruction each (and, shift)."""
    if FAST and (x.dtype == tl.bfloat16):
        return tl.inline_asm_elementwise("{ and.b32 $1, $2, 0xffff0000; shl.b32 $0, $2, 16; }", "=r,=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=2)
    else:
        return x.to(ACC)


@triton.jit
def _softplus(x, FAST: tl.constexpr):
    # log(1 + e^x), identity above 20 like torch's; NaN in gives NaN out, +inf gives +inf
    return tl.where(x > 20.0, x, _lg2(1.0 + _ex2(x * LOG2E, FAST), FAST) * LN2)


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    return _rcp(1.0 + _ex2(-(x * LOG2E), FAST), FAST)


@triton.jit
def _combine(a1, b1, a2, b2):
    # apply (a1, b1) then (a2, b2): h -> a2 * (a1 * h + b1) + b2
    return a1 * a2, a2 * b1 + b2


def reverse_scan_ptx(items):
    """PTX of the backward's reverse scan for one lane holding `items` consecutive steps.

    Operands: outputs lam_0.. ($0..), inputs a_0.. then g_0.. (the lane's steps in order).
    Computes lam_t = g_t + a_{t+1} lam_{t+1} over the warp's 32 * items steps, with nothing after
    the last step (the chunk's carry is already in its g): a_{t+1} comes from the next register
    or, for the lane's last step, from the next lane. The lane's affine map x -> A x + R (x: lam
    right after the lane) in one pass, five shuffle rounds composing the maps across lanes, one
    shuffle for the value after the lane, then the lane's steps again from it, last to first.
    tests/test_scan_triton.py runs this text through a small PTX interpreter against a loop.
    """
    n = items
    out, a, g = [f"${i}" for i in range(n)], [f"${n + i}" for i in range(n)], [f"${2 * n + i}" for i in range(n)]
    al = a[1:] + ["an"]  # a_{t+1}
    lines = [".reg .f32 an, Ar, Rr, X, t1, t2;", ".reg .pred p;",
             f"shfl.sync.down.b32 an|p, {a[0]}, 1, 0x1f, 0xffffffff;",
             f"mov.f32 Rr, {g[n - 1]};", f"mov.f32 Ar, {al[n - 1]};"]
    for i in range(n - 2, -1, -1):
        lines += [f"fma.rn.f32 Rr, {al[i]}, Rr, {g[i]};", f"mul.f32 Ar, {al[i]}, Ar;"]
    for d in (1, 2, 4, 8, 16):
        lines += [f"shfl.sync.down.b32 t1|p, Rr, {d}, 0x1f, 0xffffffff;",
                  f"shfl.sync.down.b32 t2|p, Ar, {d}, 0x1f, 0xffffffff;", "@p fma.rn.f32 Rr, Ar, t1, Rr;"]
        if d < 16:
            lines += ["@p mul.f32 Ar, Ar, t2;"]
    lines += ["shfl.sync.down.b32 X|p, Rr, 1, 0x1f, 0xffffffff;", "@!p mov.f32 X, 0f00000000;",
              f"fma.rn.f32 {out[n - 1]}, {al[n - 1]}, X, {g[n - 1]};"]
    lines += [f"fma.rn.f32 {out[i]}, {al[i]}, {out[i + 1]}, {g[i]};" for i in range(n - 2, -1, -1)]
    return "{ " + " ".join(lines) + " }"


def forward_scan_ptx(items):
    """PTX of the forward scan for one lane holding `items` consecutive steps.

    Operands: outputs h_0.. ($0..), inputs a_0.., b_0.., then h_in (the state entering the chunk,
    the same in every operand). Computes h_t = a_t h_{t-1} + b_t over the warp's 32 * items steps
    from h_{-1} = h_in: the lane's affine map x -> A x + H in one pass (lane 0 applies it to h_in),
    five shuffle rounds compose the maps across lanes, one shuffle brings each lane the state it
    starts from, then the lane's steps again from it (what tl.associative_scan does, with the
    entering state folded in and without its identity selects). Tested like reverse_scan_ptx.
    """
    n = items
    out, a, b = [f"${i}" for i in range(n)], [f"${n + i}" for i in range(n)], [f"${2 * n + i}" for i in range(n)]
    h_in = f"${3 * n}"
    lines = [".reg .f32 Ar, Hr, X, t1, t2;", ".reg .pred p, q;", ".reg .u32 ln;",
             "mov.u32 ln, %laneid;", "setp.eq.u32 q, ln, 0;", f"mov.f32 Ar, {a[0]};", f"mov.f32 Hr, {b[0]};"]
    for i in range(1, n):
        lines += [f"mul.f32 Ar, Ar, {a[i]};", f"fma.rn.f32 Hr, {a[i]}, Hr, {b[i]};"]
    lines += [f"@q fma.rn.f32 Hr, Ar, {h_in}, Hr;"]
    for d in (1, 2, 4, 8, 16):
        lines += [f"shfl.sync.up.b32 t1|p, Hr, {d}, 0x0, 0xffffffff;",
                  f"shfl.sync.up.b32 t2|p, Ar, {d}, 0x0, 0xffffffff;", "@p fma.rn.f32 Hr, Ar, t1, Hr;"]
        if d < 16:
            lines += ["@p mul.f32 Ar, Ar, t2;"]
    lines += ["shfl.sync.up.b32 X|p, Hr, 1, 0x0, 0xffffffff;", f"@q mov.f32 X, {h_in};",
              f"fma.rn.f32 {out[0]}, {a[0]}, X, {b[0]};"]
    lines += [f"fma.rn.f32 {out[i]}, {a[i]}, {out[i - 1]}, {b[i]};" for i in range(1, n)]
    return "{ " + " ".join(lines) + " }"


# FAST lanes hold 8 steps (the backward, and the forward within one backward chunk) or 16
_FORWARD_SCAN_16 = tl.constexpr(forward_scan_ptx(16))
_FORWARD_SCAN_8 = tl.constexpr(forward_scan_ptx(8))
_FORWARD_SCAN_CONSTRAINTS_16 = tl.constexpr(",".join(["=r"] * 16 + ["r"] * 48))
_FORWARD_SCAN_CONSTRAINTS_8 = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 24))


@triton.jit
def _forward_scan(a, bx, h_in, ts, ITEMS: tl.constexpr, FAST: tl.constexpr):
    """h [BD, L] with h_t = a_t h_{t-1} + bx_t from h_{-1} = h_in [BD]. FAST: forward_scan_ptx."""
    if FAST:
        hb = tl.broadcast_to(h_in[:, None], a.shape)
        if ITEMS == 16:
            return tl.inline_asm_elementwise(_FORWARD_SCAN_16, _FORWARD_SCAN_CONSTRAINTS_16, [a, bx, hb],
                                             dtype=tl.float32, is_pure=True, pack=16)
        else:
            tl.static_assert(ITEMS == 8, "_forward_scan: 8 or 16 steps per lane")
            return tl.inline_asm_elementwise(_FORWARD_SCAN_8, _FORWARD_SCAN_CONSTRAINTS_8, [a, bx, hb],
                                             dtype=tl.float32, is_pure=True, pack=8)
    else:
        bx0 = tl.where(ts[None, :] == 0, bx + a * h_in[:, None], bx)  # the entering state: b_0 += a_0 h_in
        _, h = tl.associative_scan((a, bx0), 1, _combine)
        return h


_REVERSE_SCAN_8 = tl.constexpr(reverse_scan_ptx(8))
_REVERSE_SCAN_CONSTRAINTS_8 = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 16))


@triton.jit
def _reverse_scan(a, g, ts, ITEMS: tl.constexpr, FAST: tl.constexpr):
    """lam [BD, L] with lam_t = g_t + a_{t+1} lam_{t+1}, nothing after the last step (fold any carry
    into g's last step). FAST: reverse_scan_ptx, from the lane's registers: a_{t+1} is the next
    register or, for a lane's last step, one shuffle (Triton lowers a reverse
    tl.associative_scan by reversing the tile across lanes: ~130 shuffles instead of 12)."""
    if FAST:
        tl.static_assert(ITEMS == 8, "_reverse_scan: 8 steps per lane")
        return tl.inline_asm_elementwise(_REVERSE_SCAN_8, _REVERSE_SCAN_CONSTRAINTS_8, [a, g],
                                         dtype=tl.float32, is_pure=True, pack=8)
    else:
        _, lam = tl.associative_scan((_shift_next(a, ts), g), 1, _combine, reverse=True)
        return lam


@triton.jit
def _shift_next(x, tt):
    """y[:, t] = x[:, t + 1] of a [BD, L] tile; y[:, L - 1] is unspecified. An exact one-hot
    contraction over the time axis (the interpreter, fp64; on a GPU reverse_scan_ptx shifts)."""
    hit = tt[None, :, None] == tt[None, None, :] - 1  # [1, dst, src]: src = dst + 1
    return tl.sum(tl.where(hit, x[:, None, :], 0.0), axis=2)


def _store_step_asm(items, first):
    """PTX for _store_step: operands are ITEMS outputs, then ITEMS addresses, values and flags.
    first: lane 0 stores its register 0 if its flag is set (it reads its lane id itself, so no
    register is held across the state loop); else the lane whose flag is set stores its last."""
    if first:
        return tl.constexpr(
            "{ .reg .pred p; .reg .u32 l; mov.u32 l, %laneid; setp.eq.u32 p, l, 0; "
            f"setp.ne.and.s32 p, ${3 * items}, 0, p; @p st.global.f32 [${items}], ${2 * items}; mov.b32 $0, 0; }}")
    return tl.constexpr(
        f"{{ .reg .pred p; setp.ne.s32 p, ${4 * items - 1}, 0; "
        f"@p st.global.f32 [${2 * items - 1}], ${3 * items - 1}; mov.b32 $0, 0; }}")


_STORE_FIRST_8, _STORE_LAST_8, _STORE_LAST_16 = _store_step_asm(8, True), _store_step_asm(8, False), \
    _store_step_asm(16, False)
_STORE_CONSTRAINTS_16 = tl.constexpr(",".join(["=r"] * 16 + ["l"] * 16 + ["r"] * 32))
_STORE_CONSTRAINTS_8 = tl.constexpr(",".join(["=r"] * 8 + ["l"] * 8 + ["r"] * 16))


@triton.jit
def _store_step(ptrs, x, mask_d, ts, STEP: tl.constexpr, ITEMS: tl.constexpr, FAST: tl.constexpr):
    """ptrs[c] = x[c, step STEP] for the channels in mask_d; x is a [BD, L] tile whose column i
    holds step ts[i]. FAST: STEP is step 0 (8 steps per lane) or the last step of a lane.

    FAST: the lane that holds the step stores it from its registers (a tl.store would first
    convert the tile to the store's own layout through shared memory)."""
    if FAST:
        p = (ptrs[:, None] + 0 * ts[None, :]).to(tl.int64, bitcast=True)
        if STEP == 0:
            tl.static_assert(ITEMS == 8, "_store_step: step 0 with 8 steps per lane")
            ok = (mask_d[:, None] & (ts >= 0)[None, :]).to(tl.int32)
            tl.inline_asm_elementwise(_STORE_FIRST_8, _STORE_CONSTRAINTS_8, [p, x, ok], dtype=tl.int32,
                                      is_pure=False, pack=8)
        else:
            tl.static_assert(STEP % ITEMS == ITEMS - 1, "_store_step: the first or the last step of a lane")
            # the lane holding the step (ITEMS consecutive steps per lane): hoisted out of the state loop
            own = (mask_d[:, None] & (ts // ITEMS == STEP // ITEMS)[None, :]).to(tl.int32)
            if ITEMS == 16:
                tl.inline_asm_elementwise(_STORE_LAST_16, _STORE_CONSTRAINTS_16, [p, x, own], dtype=tl.int32,
                                          is_pure=False, pack=16)
            else:
                tl.static_assert(ITEMS == 8, "_store_step: 8 or 16 steps per lane")
                tl.inline_asm_elementwise(_STORE_LAST_8, _STORE_CONSTRAINTS_8, [p, x, own], dtype=tl.int32,
                                          is_pure=False, pack=8)
    else:
        # pointers laid out like the tile, valid only where masked in (ts == STEP)
        tl.store(ptrs[:, None] + (ts[None, :] - STEP), x, mask=mask_d[:, None] & (ts == STEP)[None, :])


def time_order_columns(L, items, vec):
    """The step each column of a FAST [BD, L] tile holds, as _time_order computes it (numpy, for
    benchmarks/kernel_static.py and the tests, which compose it with Triton's own layout)."""
    tt = np.arange(L)
    return items * ((tt // vec) % LANES) + vec * (tt // (LANES * vec)) + tt % vec


@triton.jit
def _time_order(tt, ITEMS: tl.constexpr, VEC: tl.constexpr, FAST: tl.constexpr):
    """The step each column of a [BD, L] tile holds. FAST with ITEMS > VEC (a lane holds ITEMS / VEC
    16-byte vectors of VEC steps): Triton lays the tile out as vectors, lane after lane, then
    another round, and a lane's registers run vector by vector; so column 32 VEC r + VEC i + e
    (round r, lane i, element e) holds step ITEMS i + VEC r + e, and each lane holds ITEMS
    consecutive steps in its registers, as the scans assume (kernel_static.py checks this against
    Triton's own linear layout of the compiled tiles)."""
    if FAST and ITEMS > VEC:
        return ITEMS * ((tt // VEC) % 32) + VEC * (tt // (32 * VEC)) + tt % VEC
    else:
        return tt


@triton.jit
def _atomic_add_row(ptrs, x, VEC: tl.constexpr, ITEMS: tl.constexpr):
    """ptrs[t] += x[t] for a [L] fp32 row, relaxed. VEC (GPU, 16-byte aligned rows): each lane
    adds its ITEMS (8) consecutive values with two vector reductions, from its registers
    (tl.atomic_add would first convert the row to its 4-wide layout with shuffles)."""
    if VEC:
        tl.static_assert(ITEMS == 8, "_atomic_add_row: 8 steps per lane")
        p = ptrs.to(tl.int64, bitcast=True)
        tl.inline_asm_elementwise(
            "red.global.gpu.relaxed.add.v4.f32 [$8], {$16, $17, $18, $19}; "
            "red.global.gpu.relaxed.add.v4.f32 [$8+16], {$20, $21, $22, $23}; mov.b32 $0, 0;",
            "=r,=r,=r,=r,=r,=r,=r,=r,l,l,l,l,l,l,l,l,r,r,r,r,r,r,r,r",
            [p, x], dtype=tl.int32, is_pure=False, pack=8)
    else:
        tl.atomic_add(ptrs, x, sem="relaxed")


@triton.jit
def _load_tile(ptrs, mask, MASKED: tl.constexpr):
    """tl.load with zeros where mask is off; MASKED=False: no mask at all (an all-true one still
    costs instructions: kernel_static.py counts them)."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _entry_state(k, bi, c, mask_d, h0_ptr, saved_ptr, dim, dstate, nchunks, s_hb, s_hd, s_hn,
                 HAS_H0: tl.constexpr):
    """(pointers [BD], stride along n, mask) of the state entering chunk k: h0 (or zeros, masked
    off) for chunk 0, else what the forward stored in saved[:, k - 1]."""
    first = k == 0
    ptrs = tl.where(first, h0_ptr + bi * s_hb + c * s_hd,
                    saved_ptr + (bi * (nchunks - 1) + k - 1) * (dim * dstate) + c.to(tl.int64) * dstate)
    stride = tl.where(first, s_hn, 1)
    if HAS_H0:
        mask = mask_d
    else:
        mask = mask_d & (k > 0)
    return ptrs, stride, mask


# ----------------------------------------------------------------------------- forward

@triton.jit
def _fwd_chunk(k, t0, bi, grp, c, cl, mask_d, ts, bias2, Dv,
               u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, z_ptr, h0_ptr, out_ptr, hT_ptr, saved_ptr,
               dim, dstate, seqlen, nslots,
               s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_Ad, s_An,
               s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_hb, s_hd, s_hn,
               HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
               SOFTPLUS: tl.constexpr, ACC: tl.constexpr, FAST: tl.constexpr, MASKED: tl.constexpr,
               L: tl.constexpr, ITEMS: tl.constexpr, SUB: tl.constexpr):
    """One chunk [t0, t0 + L) of SUB backward chunks: out, and the state leaving each backward
    chunk kb (saved[:, kb], h_T for the last one). Loads use the channels cl (c, with the tile's
    channels past the group repeating its last one), so that only time needs a load mask."""
    t = t0 + ts
    if MASKED:
        mask_t = t < seqlen
        ld_mask = mask_t[None, :] & (cl >= 0)[:, None]
        mask = mask_d[:, None] & mask_t[None, :]
    else:
        ld_mask = None  # full chunks load without a mask
        mask = mask_d[:, None]
    u = _to_acc(_load_tile(u_ptr + bi * s_ub + cl[:, None] * s_ud + t[None, :] * s_ul, ld_mask, MASKED), ACC, FAST)
    x = _to_acc(_load_tile(delta_ptr + bi * s_db + cl[:, None] * s_dd + t[None, :] * s_dl, ld_mask, MASKED), ACC, FAST)
    # dt in log2 units, dt2 = dt log2(e): exp(dt A) = 2^(dt2 A), and softplus(x) log2(e) = log2(1 + 2^(x log2(e)))
    if HAS_BIAS:
        x2 = x * LOG2E + bias2[:, None]
    else:
        x2 = x * LOG2E
    dt2 = x2
    if SOFTPLUS:
        dt2 = tl.where(x2 > 20.0 * LOG2E, x2, _lg2(1.0 + _ex2(x2, FAST), FAST))  # identity above 20, as torch
    if MASKED:
        dt2 = tl.where(mask, dt2, 0.0)
    dtu = (dt2 * LN2) * u
    y = tl.zeros_like(u)
    if HAS_D:
        y = Dv[:, None] * u

    in_ptrs, in_stride, in_mask = _entry_state(k * SUB, bi, cl, mask_d, h0_ptr, saved_ptr, dim, dstate, nslots,
                                               s_hb, s_hd, s_hn, HAS_H0)
    slab = dim * dstate
    st_off = c.to(tl.int64) * dstate
    kb = k * SUB  # the backward chunks ending in this chunk: kb (and kb + 1)
    state0 = tl.where(kb == nslots - 1, hT_ptr + bi * slab + st_off,
                      saved_ptr + (bi * (nslots - 1) + kb) * slab + st_off)
    state1 = tl.where(kb + 1 == nslots - 1, hT_ptr + bi * slab + st_off,
                      saved_ptr + (bi * (nslots - 1) + kb + 1) * slab + st_off)
    mask1 = mask_d & (kb + 1 < nslots)  # a partial last chunk may end inside its first half
    # pointers advanced by one state per trip (cheaper than recomputing them from j)
    B_ptrs = B_ptr + bi * s_Bb + grp * s_Bg + t * s_Bl
    C_ptrs = C_ptr + bi * s_Cb + grp * s_Cg + t * s_Cl
    A_ptrs = A_ptr + cl * s_Ad
    for _ in range(dstate):
        Aj = tl.load(A_ptrs).to(ACC)
        if MASKED:
            Bj = tl.load(B_ptrs, mask=mask_t, other=0.0).to(ACC)
            Cj = tl.load(C_ptrs, mask=mask_t, other=0.0).to(ACC)
        else:
            Bj = _to_acc(tl.load(B_ptrs), ACC, FAST)
            Cj = _to_acc(tl.load(C_ptrs), ACC, FAST)
        a = _ex2(dt2 * Aj[:, None], FAST)
        if MASKED:
            a = tl.where(mask, a, 1.0)  # padded steps: the identity, also for A = -inf
        bx = dtu * Bj[None, :]
        if HAS_H0:
            h_in = tl.load(in_ptrs).to(ACC)
        else:
            h_in = tl.load(in_ptrs, mask=in_mask, other=0.0).to(ACC)
        h = _forward_scan(a, bx, h_in, ts, ITEMS, FAST)
        y += Cj[None, :] * h  # y_t = sum_n C_t[n] h_t[n]
        _store_step(state0, h, mask_d, ts, L // SUB - 1, ITEMS, FAST)
        if SUB > 1:
            _store_step(state1, h, mask1, ts, L - 1, ITEMS, FAST)
            state1 += 1
        A_ptrs += s_An
        B_ptrs += s_Bn
        C_ptrs += s_Cn
        in_ptrs += in_stride
        state0 += 1
    if HAS_Z:
        zv = _to_acc(_load_tile(z_ptr + bi * s_zb + cl[:, None] * s_zd + t[None, :] * s_zl, ld_mask, MASKED), ACC, FAST)
        y *= zv * _sigmoid(zv, FAST)  # out = y * silu(z)
    tl.store(out_ptr + (bi * dim + c[:, None]) * seqlen + t[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs("fwd"), key=["dim", "dstate", "seqlen", "HAS_Z", "L"],
                 prune_configs_by={"early_config_prune": _pruner()})
@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    out_ptr, hT_ptr, saved_ptr,
    dim, dstate, seqlen, nslots, ngroups,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_Ad, s_An, s_D, s_bias,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_hb, s_hd, s_hn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, ACC: tl.constexpr, FAST: tl.constexpr,
    BLOCK_D: tl.constexpr, L: tl.constexpr, ITEMS: tl.constexpr, VEC: tl.constexpr, SUB: tl.constexpr,
):
    dpg = dim // ngroups
    ntiles = tl.cdiv(dpg, BLOCK_D)  # 1-D grid: channel tiles fastest, so tiles sharing B, C run together
    pid = tl.program_id(0)
    bi = (pid // (ntiles * ngroups)).to(tl.int64)
    grp = (pid // ntiles) % ngroups
    cg = (pid % ntiles) * BLOCK_D + tl.arange(0, BLOCK_D)  # channel within the group
    mask_d = cg < dpg
    c = grp * dpg + cg
    cl = grp * dpg + tl.minimum(cg, dpg - 1)  # channels to load from: always in range
    ts = _time_order(tl.arange(0, L), ITEMS, VEC, FAST)
    bias2 = tl.load(bias_ptr + cl * s_bias).to(ACC) * LOG2E if HAS_BIAS else None
    Dv = tl.load(D_ptr + cl * s_D).to(ACC) if HAS_D else None
    nfull = seqlen // L
    for k in range(nfull):
        _fwd_chunk(k, k * L, bi, grp, c, cl, mask_d, ts, bias2, Dv,
                   u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, z_ptr, h0_ptr, out_ptr, hT_ptr, saved_ptr,
                   dim, dstate, seqlen, nslots,
                   s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_Ad, s_An,
                   s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_hb, s_hd, s_hn,
                   HAS_D, HAS_Z, HAS_BIAS, HAS_H0, SOFTPLUS, ACC, FAST, False, L, ITEMS, SUB)
        tl.debug_barrier()  # the next chunk reads the states this one stored
    if nfull * L < seqlen:
        _fwd_chunk(nfull, nfull * L, bi, grp, c, cl, mask_d, ts, bias2, Dv,
                   u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, z_ptr, h0_ptr, out_ptr, hT_ptr, saved_ptr,
                   dim, dstate, seqlen, nslots,
                   s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_Ad, s_An,
                   s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_hb, s_hd, s_hn,
                   HAS_D, HAS_Z, HAS_BIAS, HAS_H0, SOFTPLUS, ACC, FAST, True, L, ITEMS, SUB)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _bwd_chunk(k, t0, bi, grp, c, mask_d, ts, bias_ptr, s_bias, D_ptr, s_D, dD_acc, dbias_acc,
               dout_ptr, dhT_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, z_ptr, h0_ptr, saved_ptr,
               du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dz_ptr, dh0_ptr, carry_ptr,
               dim, dstate, seqlen, nchunks, ngroups,
               s_ob, s_od, s_ol, s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_Ad, s_An,
               s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_hb, s_hd, s_hn, s_gb, s_gd, s_gn,
               HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
               HAS_DHT: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr, FAST: tl.constexpr,
               MASKED: tl.constexpr, L: tl.constexpr, ITEMS: tl.constexpr, VEC_ATOMICS: tl.constexpr):
    """Gradients of chunk [t0, t0 + L); returns the running (dD, ddelta_bias) partial sums."""
    t = t0 + ts
    # loaded per chunk (L1) rather than kept in registers for the whole program
    bias = tl.load(bias_ptr + c * s_bias, mask=mask_d, other=0.0).to(ACC) if HAS_BIAS else None
    Dv = tl.load(D_ptr + c * s_D, mask=mask_d, other=0.0).to(ACC) if HAS_D else None
    if MASKED:
        mask_t = t < seqlen
        mask = mask_d[:, None] & mask_t[None, :]
    else:
        mask = mask_d[:, None]
    x = _to_acc(tl.load(delta_ptr + bi * s_db + c[:, None] * s_dd + t[None, :] * s_dl, mask=mask, other=0.0), ACC, FAST)
    if HAS_BIAS:
        x += bias[:, None]
    dt = x
    if SOFTPLUS:
        dt = _softplus(x, FAST)
    if MASKED:
        dt = tl.where(mask, dt, 0.0)
    dtu = dt * _to_acc(tl.load(u_ptr + bi * s_ub + c[:, None] * s_ud + t[None, :] * s_ul, mask=mask, other=0.0),
                       ACC, FAST)
    gy = _to_acc(tl.load(dout_ptr + bi * s_ob + c[:, None] * s_od + t[None, :] * s_ol, mask=mask, other=0.0),
                 ACC, FAST)
    if HAS_Z:
        zv = _to_acc(tl.load(z_ptr + bi * s_zb + c[:, None] * s_zd + t[None, :] * s_zl, mask=mask, other=0.0),
                     ACC, FAST)
        gy *= zv * _sigmoid(zv, FAST)  # dL/dy = dout * silu(z)
    y = tl.zeros_like(dt)  # sum_n C h (for dz)
    s_lamB = tl.zeros_like(dt)  # sum_n lam B
    s_lamAah = tl.zeros_like(dt)  # sum_n lam A a h_{t-1}

    in_ptrs, in_stride, in_mask = _entry_state(k, bi, c, mask_d, h0_ptr, saved_ptr, dim, dstate, nchunks,
                                               s_hb, s_hd, s_hn, HAS_H0)
    # lam carry: dL/dh_T into the last chunk, else a_0 lam_0 of the chunk after. Two buffers used
    # alternately (chunk 0 writes dh0's), so no lane overwrites a carry another lane has yet to read.
    slab = dim * dstate
    st_off = c.to(tl.int64) * dstate
    last = k == nchunks - 1
    lam_buf = tl.where((k + 1) % 2 == 0, dh0_ptr, carry_ptr) + bi * slab + st_off
    lam_in = tl.where(last, dhT_ptr + bi * s_gb + c * s_gd, lam_buf)
    lam_in_stride = tl.where(last, s_gn, 1)
    if HAS_DHT:
        lam_in_mask = mask_d
    else:
        lam_in_mask = mask_d & (k < nchunks - 1)
    lam_out = tl.where(k % 2 == 0, dh0_ptr, carry_ptr) + bi * slab + st_off
    if HAS_H0:
        mu_mask = mask_d
    else:  # no dh0 wanted: chunk 0 stores nothing
        mu_mask = mask_d & (k > 0)
    dBC_ptrs = (bi * ngroups + grp) * dstate * seqlen + t  # dB, dC are contiguous (b, g, n, l)
    B_ptrs = B_ptr + bi * s_Bb + grp * s_Bg + t * s_Bl
    C_ptrs = C_ptr + bi * s_Cb + grp * s_Cg + t * s_Cl
    A_ptrs = A_ptr + c * s_Ad
    dA_ptrs = dA_ptr + c * s_Ad  # dA has A's layout
    for j in range(dstate):
        Aj = tl.load(A_ptrs, mask=mask_d, other=0.0).to(ACC)
        if MASKED:
            Bj = tl.load(B_ptrs, mask=mask_t, other=0.0).to(ACC)
            Cj = tl.load(C_ptrs, mask=mask_t, other=0.0).to(ACC)
        else:
            Bj = _to_acc(tl.load(B_ptrs), ACC, FAST)
            Cj = _to_acc(tl.load(C_ptrs), ACC, FAST)
        a = _ex2(dt * (Aj * LOG2E)[:, None], FAST)
        if MASKED:
            a = tl.where(mask, a, 1.0)
        bx = dtu * Bj[None, :]
        h_in = tl.load(in_ptrs, mask=in_mask, other=0.0).to(ACC)
        h = _forward_scan(a, bx, h_in, ts, ITEMS, FAST)  # the states, recomputed
        y += Cj[None, :] * h

        # lam_t = g_t + a_{t+1} lam_{t+1}, g_t = gy_t C_t; the carry enters at the last step
        g = gy * Cj[None, :]
        lam_c = tl.load(lam_in, mask=lam_in_mask, other=0.0).to(ACC)
        g = tl.where(ts[None, :] == L - 1, g + lam_c[:, None], g)
        lam = _reverse_scan(a, g, ts, ITEMS, FAST)
        _store_step(lam_out, a * lam, mu_mask, ts, 0, ITEMS, FAST)  # a_0 lam_0: carry, or dh0

        ah = h - dtu * Bj[None, :]  # a_t h_{t-1} (bx recomputed: one register tile less across the scans)
        lam_ah = lam * ah
        s_lamB += lam * Bj[None, :]
        s_lamAah += Aj[:, None] * lam_ah
        tl.atomic_add(dA_ptrs, tl.sum(dt * lam_ah, axis=1), mask=mask_d, sem="relaxed")
        if MASKED:
            tl.atomic_add(dB_ptr + dBC_ptrs + j * seqlen, tl.sum(lam * dtu, axis=0), mask=mask_t, sem="relaxed")
            tl.atomic_add(dC_ptr + dBC_ptrs + j * seqlen, tl.sum(gy * h, axis=0), mask=mask_t, sem="relaxed")
        else:
            _atomic_add_row(dB_ptr + dBC_ptrs + j * seqlen, tl.sum(lam * dtu, axis=0), VEC_ATOMICS, ITEMS)
            _atomic_add_row(dC_ptr + dBC_ptrs + j * seqlen, tl.sum(gy * h, axis=0), VEC_ATOMICS, ITEMS)
        A_ptrs += s_An
        dA_ptrs += s_An
        B_ptrs += s_Bn
        C_ptrs += s_Cn
        in_ptrs += in_stride
        lam_in += lam_in_stride
        lam_out += 1

    # what the state loop did not need is loaded again (L1 / L2) rather than kept in registers
    bdl = (bi * dim + c[:, None]) * seqlen + t[None, :]  # du, ddelta, dz are contiguous (b, d, l)
    u = _to_acc(tl.load(u_ptr + bi * s_ub + c[:, None] * s_ud + t[None, :] * s_ul, mask=mask, other=0.0), ACC, FAST)
    du = dt * s_lamB
    if HAS_D:
        y += Dv[:, None] * u
        du += Dv[:, None] * gy
        dD_acc += tl.sum(gy * u, axis=1)
    tl.store(du_ptr + bdl, du.to(du_ptr.dtype.element_ty), mask=mask)
    if HAS_Z:
        dout = _to_acc(tl.load(dout_ptr + bi * s_ob + c[:, None] * s_od + t[None, :] * s_ol, mask=mask, other=0.0),
                       ACC, FAST)
        zv = _to_acc(tl.load(z_ptr + bi * s_zb + c[:, None] * s_zd + t[None, :] * s_zl, mask=mask, other=0.0),
                     ACC, FAST)
        sig_z = _sigmoid(zv, FAST)
        dz = dout * y * sig_z * (1.0 + zv * (1.0 - sig_z))  # d/dz [y z sigmoid(z)]
        tl.store(dz_ptr + bdl, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    ddelta = u * s_lamB + s_lamAah  # dL/d dt
    if SOFTPLUS:
        x = _to_acc(tl.load(delta_ptr + bi * s_db + c[:, None] * s_dd + t[None, :] * s_dl, mask=mask, other=0.0), ACC, FAST)
        if HAS_BIAS:
            x += bias[:, None]
        ddelta *= _sigmoid(x, FAST)
    if MASKED:
        ddelta = tl.where(mask, ddelta, 0.0)
    dbias_acc += tl.sum(ddelta, axis=1)
    tl.store(ddelta_ptr + bdl, ddelta.to(ddelta_ptr.dtype.element_ty), mask=mask)
    return dD_acc, dbias_acc


@triton.autotune(configs=_configs("bwd"), key=["dim", "dstate", "seqlen", "HAS_Z", "L"],
                 prune_configs_by={"early_config_prune": _pruner()},
                 reset_to_zero=["dA_ptr", "dB_ptr", "dC_ptr", "dD_ptr", "dbias_ptr"])
@triton.jit
def _bwd_kernel(
    dout_ptr, dhT_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, saved_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, dh0_ptr, carry_ptr,
    dim, dstate, seqlen, nchunks, ngroups,
    s_ob, s_od, s_ol, s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_Ad, s_An, s_D, s_bias,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_hb, s_hd, s_hn, s_gb, s_gd, s_gn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_DHT: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr, FAST: tl.constexpr,
    BLOCK_D: tl.constexpr, L: tl.constexpr, ITEMS: tl.constexpr, VEC: tl.constexpr, VEC_ATOMICS: tl.constexpr,
):
    dpg = dim // ngroups
    ntiles = tl.cdiv(dpg, BLOCK_D)
    pid = tl.program_id(0)
    bi = (pid // (ntiles * ngroups)).to(tl.int64)
    grp = (pid // ntiles) % ngroups
    cg = (pid % ntiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cg < dpg
    c = grp * dpg + cg
    ts = _time_order(tl.arange(0, L), ITEMS, VEC, FAST)
    dD_acc = tl.zeros([BLOCK_D], ACC)
    dbias_acc = tl.zeros([BLOCK_D], ACC)
    nfull = seqlen // L
    if nfull < nchunks:  # the partial chunk is the last one: it goes first
        dD_acc, dbias_acc = _bwd_chunk(
            nfull, nfull * L, bi, grp, c, mask_d, ts, bias_ptr, s_bias, D_ptr, s_D, dD_acc, dbias_acc,
            dout_ptr, dhT_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, z_ptr, h0_ptr, saved_ptr,
            du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dz_ptr, dh0_ptr, carry_ptr,
            dim, dstate, seqlen, nchunks, ngroups,
            s_ob, s_od, s_ol, s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_Ad, s_An,
            s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_hb, s_hd, s_hn, s_gb, s_gd, s_gn,
            HAS_D, HAS_Z, HAS_BIAS, HAS_H0, HAS_DHT, SOFTPLUS, ACC, FAST, True, L, ITEMS, VEC_ATOMICS)
        tl.debug_barrier()  # the carry stored above is read by the chunk before
    for kk in range(nfull):
        k = nfull - 1 - kk
        dD_acc, dbias_acc = _bwd_chunk(
            k, k * L, bi, grp, c, mask_d, ts, bias_ptr, s_bias, D_ptr, s_D, dD_acc, dbias_acc,
            dout_ptr, dhT_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, z_ptr, h0_ptr, saved_ptr,
            du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dz_ptr, dh0_ptr, carry_ptr,
            dim, dstate, seqlen, nchunks, ngroups,
            s_ob, s_od, s_ol, s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_Ad, s_An,
            s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_hb, s_hd, s_hn, s_gb, s_gd, s_gn,
            HAS_D, HAS_Z, HAS_BIAS, HAS_H0, HAS_DHT, SOFTPLUS, ACC, FAST, False, L, ITEMS, VEC_ATOMICS)
        tl.debug_barrier()
    if HAS_D:
        tl.atomic_add(dD_ptr + c, dD_acc, mask=mask_d, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + c, dbias_acc, mask=mask_d, sem="relaxed")


# ----------------------------------------------------------------------------- host side

class Plan(NamedTuple):
    """How a sequence is cut. The backward walks chunks of ``chunk = 32 items`` steps, a lane holding
    ``items`` consecutive steps (8: one 16-byte vector of bf16 / fp16, two of fp32), and ``saved``
    holds the state entering each chunk but the first. The forward walks chunks of ``sub`` backward
    chunks (a lane holds ``sub items`` steps: the shuffle rounds composing the lanes' maps, paid per
    lane and state, are spread over twice the steps) and stores the state at the end of each
    backward chunk. ``sub`` is 2 once there are two backward chunks."""
    vec: int
    items: int
    chunk: int
    nchunks: int
    sub: int

    @property
    def fwd_chunk(self):
        return self.sub * self.chunk

    @property
    def fwd_items(self):
        return self.sub * self.items


def _plan(dtype, seqlen):
    vec = 16 // torch.empty((), dtype=dtype).element_size()  # steps per 16-byte vector
    items = max(vec, 8) if vec >= 4 else vec  # fp64 (never FAST) keeps one vector
    chunk = INTERPRET_CHUNK if _INTERPRET else LANES * items
    nchunks = triton.cdiv(seqlen, chunk)
    return Plan(vec, items, chunk, nchunks, 2 if nchunks > 1 else 1)


def _acc(u):
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _tl_acc(acc):
    return tl.float64 if acc == torch.float64 else tl.float32


def _fast(u):
    """Single-instruction approximate math and the one-shuffle shift: compiled fp16/bf16/fp32 only."""
    return not _INTERPRET and u.dtype != torch.float64


def _vector_rows(x, fast):
    """x (..., l) as the FAST kernels' 16-byte loads need it, else unchanged: unit stride along l,
    every other stride a multiple of 16 elements and a 16-byte aligned start, which is what Triton's
    JIT specialises on (a row that is not provably aligned is loaded one element per lane, a layout
    the kernels' PTX cannot take). Otherwise a copy whose rows are padded to 16 steps (a view of
    the first l): the model's tensors never need one (l a multiple of 16, l innermost)."""
    if x is None or not fast or x.stride(-1) == 0:  # constant along time (B, C as (d, n)): broadcast loads
        return x
    if x.stride(-1) == 1 and all(st % 16 == 0 for st in x.stride()[:-1]) and x.data_ptr() % 16 == 0:
        return x
    l = x.shape[-1]
    rows = x.new_empty(*x.shape[:-1], -(-l // 16) * 16)
    rows[..., :l] = x
    return rows[..., :l]


def _strides(x, ndim):
    return x.stride() if x is not None else (0,) * ndim


def forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0):
    """u, delta, z: (b, d, l); A: (d, n); B, C: (b, g, n, l); D, delta_bias: (d,); h0: (b, d, n).
    Returns out (b, d, l) in u's dtype, h_T (b, d, n) fp32 and saved (b, nchunks - 1, d, n): the
    states entering chunks 1.., for the backward (empty when l fits one chunk)."""
    b, d, l = u.shape
    n, g = A.shape[1], B.shape[1]
    acc = _acc(u)
    plan = _plan(u.dtype, l)
    nchunks = plan.nchunks
    fast = _fast(u)
    u, delta, z, B, C = (_vector_rows(x, fast) for x in (u, delta, z, B, C))
    out = torch.empty((b, d, l), dtype=u.dtype, device=u.device)
    h_T = torch.empty((b, d, n), dtype=acc, device=u.device)
    saved = torch.empty((b, nchunks - 1, d, n), dtype=acc, device=u.device)
    A = A.contiguous()
    grid = lambda meta: (triton.cdiv(d // g, meta["BLOCK_D"]) * b * g,)  # noqa: E731
    _fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, h0 if h0 is not None else u,
        out, h_T, saved if saved.numel() else h_T,
        d, n, l, nchunks, g,
        *u.stride(), *delta.stride(), *_strides(z, 3), *A.stride(), *_strides(D, 1), *_strides(delta_bias, 1),
        *B.stride(), *C.stride(), *_strides(h0, 3),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_H0=h0 is not None,
        SOFTPLUS=bool(delta_softplus), ACC=_tl_acc(acc), FAST=fast, L=plan.fwd_chunk, ITEMS=plan.fwd_items,
        VEC=plan.vec, SUB=plan.sub,
    )
    return out, h_T, saved


def backward(dout, dh_T, u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, saved):
    """Gradients of forward's (out, h_T) given dout (b, d, l) and dh_T (b, d, n) or None.
    Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0), None where the input was None."""
    b, d, l = u.shape
    n, g = A.shape[1], B.shape[1]
    acc = _acc(u)
    vec, items, chunk, nchunks, _ = _plan(u.dtype, l)
    fast = _fast(u)
    dout, u, delta, z, B, C = (_vector_rows(x, fast) for x in (dout, u, delta, z, B, C))
    assert saved.shape == (b, nchunks - 1, d, n), f"saved: expected {(b, nchunks - 1, d, n)}, got {tuple(saved.shape)}"
    dev = u.device
    du = torch.empty((b, d, l), dtype=u.dtype, device=dev)
    ddelta = torch.empty((b, d, l), dtype=delta.dtype, device=dev)
    dz = torch.empty((b, d, l), dtype=z.dtype, device=dev) if z is not None else None
    A = A.contiguous()
    dA = torch.zeros((d, n), dtype=acc, device=dev)
    dB = torch.zeros((b, g, n, l), dtype=acc, device=dev)
    dC = torch.zeros((b, g, n, l), dtype=acc, device=dev)
    dD = torch.zeros((d,), dtype=acc, device=dev) if D is not None else None
    dbias = torch.zeros((d,), dtype=acc, device=dev) if delta_bias is not None else None
    dh0 = torch.empty((b, d, n), dtype=acc, device=dev)  # also one of the two lam carry buffers
    carry = torch.empty((b, d, n), dtype=acc, device=dev) if nchunks > 1 else dh0
    grid = lambda meta: (triton.cdiv(d // g, meta["BLOCK_D"]) * b * g,)  # noqa: E731
    _bwd_kernel[grid](
        dout, dh_T if dh_T is not None else dout, u, delta, A, B, C,
        D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, h0 if h0 is not None else u,
        saved if saved.numel() else dh0,
        du, ddelta, dA, dB, dC, dD if dD is not None else dA, dz if dz is not None else du,
        dbias if dbias is not None else dA, dh0, carry,
        d, n, l, nchunks, g,
        *dout.stride(), *u.stride(), *delta.stride(), *_strides(z, 3), *dA.stride(),
        *_strides(D, 1), *_strides(delta_bias, 1),
        *B.stride(), *C.stride(), *_strides(h0, 3), *_strides(dh_T, 3),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_H0=h0 is not None,
        HAS_DHT=dh_T is not None, SOFTPLUS=bool(delta_softplus), ACC=_tl_acc(acc), FAST=fast,
        L=chunk, ITEMS=items, VEC=vec, VEC_ATOMICS=fast and l % 4 == 0,  # rows of dB, dC 16-byte aligned
    )
    return (
        du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
        dD.to(D.dtype) if D is not None else None, dz,
        dbias.to(delta_bias.dtype) if delta_bias is not None else None,
        dh0.to(h0.dtype) if h0 is not None else None,
    )
