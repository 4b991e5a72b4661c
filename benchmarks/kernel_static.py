"""Static cost of the Triton scan kernels on sm_90, from SASS, on a machine without a GPU.

    python benchmarks/kernel_static.py                       # paper + Mamba shapes, bf16, every kept config
    python benchmarks/kernel_static.py --shape 2,64,1024,16 --dtype fp32 --json out.json

Each kernel is compiled by Triton's real pipeline for `GPUTarget("cuda", 90, 32)` with the
arguments the host wrapper passes at that shape (the model's call: D, z, delta_bias, softplus,
h0, dh_T), specialised like Triton's JIT does (ints equal to 1 become constants, multiples of
16 and 16-byte-aligned pointers get divisibility 16). The cubin is disassembled with the
`nvdisasm` shipped in the triton wheel. How the figures are counted (benchmarks/README.md):

- the kernel walks chunks of L steps (full chunks in a loop, the partial last chunk apart) and,
  per chunk, loops over the d_state states; one trip of that state loop does BLOCK_D x L state
  updates (one update = one (b, d, n, t)). The steady-state loop is the state loop nested in the
  full-chunk loop (a backward branch inside another), read from the SASS control flow;
- `*_per_update` = warp-instructions of that kind in the state loop's body x warps / (BLOCK_D L),
  plus the rest of the chunk loop's body (the per-(b, d, t) work: loads, softplus, gating,
  stores) x warps / (BLOCK_D L n). `state_loop_*` is the state loop alone (how mamba_ssm's
  figures in REFERENCE.md were counted: its loop over states). MUFU is counted per lane
  (exps per update), like the REFERENCE figures; all other kinds per warp;
- issue-bound clocks per update per SM: max(all / 4, SHFL / 1, MUFU / 32 / 0.5) (an H100/H200
  SM issues 4 warp-instructions, 1 shuffle and 0.5 MUFU warp-instructions a clock);
- registers, spills (STACK), local and shared memory from `cuobjdump --dump-resource-usage`;
  occupancy from registers (65,536 per SM, allocated per warp in units of 256), shared memory
  (228 KiB), at most 32 blocks and 64 warps per SM;
- HBM bytes per (b, d, t): the bytes of every tensor the kernel reads or writes once each (B,
  C, dB, dC amortised over the d / g channels sharing them; states over l; the backward's two
  lam-carry buffers, rewritten in place, once each), i.e. what must cross HBM; the fp32 atomics for
  dB / dC are reported apart (`l2_atomic_bytes_per_bdt`: they resolve in L2). mamba_ssm's figures
  by the same rule, as its csrc kernels move them (see mamba_hbm_bytes), are printed beside them.
"""
import argparse
import collections
import json
import math
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, never interpret

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from arcee.ops import scan_triton as st  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ELEM = {"bf16": 2, "fp16": 2, "fp32": 4}
SHAPES = {"paper": (96, 1536, 256, 256), "mamba": (64, 1536, 1024, 16)}
# mamba_ssm's CUDA kernels, sm_90 (REFERENCE.md section 1): warp-instructions, shuffles, MUFU per update
MAMBA = {"fwd": dict(warp_instr=0.60, shfl=0.023, mufu=1.00), "bwd": dict(warp_instr=2.05, shfl=0.068, mufu=1.00)}
TARGETS = {"fwd": dict(warp_instr=0.45, shfl=0.05, mufu=1.0), "bwd": dict(warp_instr=1.5, shfl=0.15, mufu=1.0)}
STATE_PTRS = ("saved_ptr", "hT_ptr", "h0_ptr", "dhT_ptr", "dh0_ptr", "carry_ptr", "A_ptr", "D_ptr", "bias_ptr",
              "dA_ptr", "dB_ptr", "dC_ptr", "dD_ptr", "dbias_ptr")


def tool(name):
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: this triton wheel does not ship the NVIDIA tools")
    return path


# ----------------------------------------------------------------------------- compile

CALLS = {  # the flags of the call compiled: the model's (Arcee: h0 in, dL/dh_T in), or nothing optional
    "model": dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, HAS_H0=True, HAS_DHT=True, SOFTPLUS=True),
    "bare": dict(HAS_D=False, HAS_Z=False, HAS_BIAS=False, HAS_H0=False, HAS_DHT=False, SOFTPLUS=False),
}


def call_args(kernel, b, d, l, n, dtype, call="model"):
    """The scalar arguments the host wrapper passes (contiguous tensors with rows padded to 16 steps,
    g = 1, the flags of CALLS[call]).
    Returns (values, constexpr flags, the kernel's chunk L, backward chunks, ITEMS, VEC)."""
    import torch
    plan = st._plan({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype], l)
    sub = plan.sub if kernel == "fwd" else 1
    chunk, items = plan.chunk * sub, plan.items * sub
    lp = -(-l // 16) * 16  # rows padded to 16 steps by the host (scan_triton._vector_rows) when l is not
    bdl, bnl, bdn = (d * lp, lp, 1), (n * lp, n * lp, lp, 1), (d * n, n, 1)
    vals = dict(dim=d, dstate=n, seqlen=l, nchunks=plan.nchunks, nslots=plan.nchunks, ngroups=1,
                s_Ad=n, s_An=1, s_D=1, s_bias=1)
    for pre in ("u", "d", "z", "o"):
        vals.update({f"s_{pre}b": bdl[0], f"s_{pre}d": bdl[1], f"s_{pre}l": bdl[2]})
    for pre in ("B", "C"):
        vals.update({f"s_{pre}b": bnl[0], f"s_{pre}g": bnl[1], f"s_{pre}n": bnl[2], f"s_{pre}l": bnl[3]})
    for pre in ("h", "g"):
        vals.update({f"s_{pre}b": bdn[0], f"s_{pre}d": bdn[1], f"s_{pre}n": bdn[2]})
    flags = dict(**CALLS[call],
                 ACC=tl.float32, FAST=True, L=chunk, ITEMS=items, VEC=plan.vec, SUB=sub, VEC_ATOMICS=l % 4 == 0)
    return vals, flags, chunk, plan.nchunks, items, plan.vec


def compile_kernel(kernel, b, d, l, n, dtype, block_d, num_warps, maxnreg=None, call="model"):
    fn = (st._fwd_kernel if kernel == "fwd" else st._bwd_kernel).fn
    vals, flags, chunk, nchunks, items, vec = call_args(kernel, b, d, l, n, dtype, call)
    const = {k: v for k, v in {**flags, "BLOCK_D": block_d}.items() if k in fn.arg_names}
    const.update({k: 1 for k, v in vals.items() if k in fn.arg_names and v == 1})  # JIT: ints == 1
    sig, div16 = {}, []
    for a in fn.arg_names:
        if a in const:
            sig[a] = "constexpr"
        elif a.endswith("_ptr"):
            sig[a] = "*fp32" if a in STATE_PTRS else f"*{dtype}"
            div16.append(a)
        else:
            sig[a] = "i32"
            if vals[a] % 16 == 0:
                div16.append(a)
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
    compiled = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, maxnreg=maxnreg))
    return compiled, chunk, nchunks, items, vec, flags["SUB"]


def kept_configs(kernel, d, n, l, dtype="bf16"):
    """Every config the autotuner may pick at this shape: the GPU list, pruned like at run time."""
    configs = st._gpu_configs("fwd" if kernel == "fwd" else "bwd")
    flags = call_args(kernel, 1, d, l, n, dtype)[1]
    return st._pruner()(configs, {"dim": d, "ngroups": 1}, ITEMS=flags["ITEMS"], VEC=flags["VEC"])


# ----------------------------------------------------------------------------- SASS

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def disassemble(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([tool("nvdisasm"), "-c", "-hex", f.name], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return sass, res


def parse_sass(text):
    """[(opcode, text)] in program order and {label: index}."""
    instrs, labels = [], {}
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR.search(line)
        if m:
            s = m.group(2).strip()
            op = re.sub(r"^@!?U?P[T\d]+\s+", "", s).split()[0] if s else ""
            instrs.append((op, s))
    return instrs, labels


def loops(instrs, labels):
    """(head, tail) index pairs of backward branches, i.e. loops."""
    out = []
    for i, (op, s) in enumerate(instrs):
        if op.startswith("BRA"):
            m = re.search(r"`\(\s*(\.L_x_\d+)\s*\)", s)
            if m and labels.get(m.group(1), i + 1) <= i:
                out.append((labels[m.group(1)], i))
    return out


def steady_state(instrs, labels):
    """(state loop, chunk loop): the loop nested in another loop, and that other loop."""
    ls = loops(instrs, labels)
    for inner in ls:
        outers = [o for o in ls if o != inner and o[0] <= inner[0] and inner[1] <= o[1]]
        if outers:
            return inner, min(outers, key=lambda o: o[1] - o[0])
    raise RuntimeError(f"no nested loop found in the SASS (loops: {ls})")


KINDS = {"shfl": ("SHFL",), "mufu": ("MUFU",), "ldg": ("LDG",), "stg": ("STG",), "bar": ("BAR",),
         "atom": ("RED", "REDG", "ATOM", "ATOMG"), "lds_sts": ("LDS", "STS", "LDSM", "STSM")}


def mix(instrs, lo, hi):
    c = collections.Counter(op.split(".")[0] for op, _ in instrs[lo:hi + 1])
    out = {"all": sum(c.values())}
    for k, prefixes in KINDS.items():
        out[k] = sum(v for op, v in c.items() if op in prefixes)
    return out


def resources(res):
    get = lambda key: int(re.search(rf"{key}:(\d+)", res).group(1))  # noqa: E731
    return dict(regs=get("REG"), spill_bytes=get("STACK"), local_bytes=get("LOCAL"), shared_bytes=get("SHARED"))


def occupancy(regs, shared, warps):
    per_warp = math.ceil(regs * 32 / 256) * 256
    blocks = min(32, 64 // warps, 65536 // (per_warp * warps), (228 * 1024) // shared if shared else 32)
    return blocks * warps / 64


LANE_ASM = ("Ar, Hr", "an, Ar", "setp.ne", "red.global")  # the PTX that assumes a lane's steps (scans, stores, atomics)


def lane_steps(layout, shape, items, vec):
    """[lanes][registers] -> the step each register of each lane holds, for one row of a [BD, L]
    tile: Triton's own linear layout of `layout` (a TTGIR blocked-layout string) on `shape`,
    composed with the column numbering of scan_triton._time_order. None when this Triton has no
    gluon layout API."""
    try:
        from triton._C.libtriton import gluon_ir, ir
        from triton.experimental.gluon import language as gl
    except ImportError:
        return None
    field = lambda key: [int(v) for v in re.search(rf"{key} = \[([^]]*)\]", layout).group(1).split(",")]  # noqa: E731
    ctx = ir.context()
    ir.load_dialects(ctx)
    builder = gluon_ir.GluonOpBuilder(ctx)
    blocked = gl.BlockedLayout(size_per_thread=field("sizePerThread"), threads_per_warp=field("threadsPerWarp"),
                               warps_per_cta=field("warpsPerCTA"), order=field("order"))
    linear = builder.to_linear_layout(blocked._to_ir(builder), list(shape))
    steps = st.time_order_columns(shape[1], items, vec) if items > vec else list(range(shape[1]))

    def coord(reg, lane):  # a linear layout: XOR of the bases of the set bits
        row = col = 0
        for bases, idx in ((linear.reg_bases, reg), (linear.lane_bases, lane)):
            for bit, (r, c) in enumerate(bases):
                if idx >> bit & 1:
                    row, col = row ^ r, col ^ c
        return row, col
    nregs = 1 << len(linear.reg_bases)
    return [[int(steps[coord(reg, lane)[1]]) for reg in range(nregs) if coord(reg, lane)[0] == 0]
            for lane in range(1 << len(linear.lane_bases))]


def layout_check(ttgir, items, vec, shape):
    """Every inline PTX that assumes a lane holds ITEMS consecutive steps (the scans, the one-lane
    stores, the vector atomics) must get tiles whose TTGIR layout gives each lane one 16-byte vector
    of VEC steps per round, lanes in order, in one warp (rows: a slice of that layout); and Triton's
    linear layout of it on the [BD, L] tile, with _time_order's column numbering, must put steps
    ITEMS i .. ITEMS i + ITEMS - 1 in lane i's registers, in order. Returns the wanted layout, whether
    it all holds, and whether the lane order could be checked (it needs Triton's gluon API)."""
    want = f"sizePerThread = [1, {vec}], threadsPerWarp = [1, 32], warpsPerCTA = [1, 1], order = [1, 0]"
    aliases = dict(re.findall(r"^(#\w+) = #ttg\.blocked<\{([^}]*)\}>", ttgir, re.M))
    good = {name for name, lay in aliases.items() if lay.strip() == want}
    seen, ok = 0, bool(good)
    for line in ttgir.splitlines():
        if "elementwise_inline_asm" in line and any(k in line for k in LANE_ASM):
            for lay in re.findall(r"tensor<[0-9x]+x\w+, (#\w+|#ttg\.slice<\{[^}]*\}>)>", line):
                parent = re.match(r"#ttg\.slice<\{dim = \d+, parent = (#\w+)\}>", lay)
                ok = ok and (parent.group(1) if parent else lay) in good
                seen += 1
    lanes = lane_steps(want, shape, items, vec)
    consecutive = lanes is None or lanes == [list(range(items * i, items * i + items)) for i in range(32)]
    return want, ok and seen > 0 and consecutive, lanes is not None


# ----------------------------------------------------------------------------- HBM model

def hbm_bytes(kernel, b, d, l, n, e, nchunks, g=1, state_io=True, z=True):
    """Bytes per (b, d, t) that must cross HBM: each tensor the kernel touches, once.
    state_io=False: the call mamba_ssm can make (no h0 in, no dL/dh_T in, no dh0 out).
    nchunks: backward chunks (saved holds the states entering chunks 1..)."""
    bc = 2 * g * n * e / d  # B and C, shared by the d / g channels of a group
    states = 4 * n / l  # one fp32 (b, d, n) state tensor, per time step
    saved = states * (nchunks - 1)  # states entering chunks 1.., written forward, read backward
    if kernel == "fwd":  # u, delta, z in; out; B, C; h_T out (always); h0 in
        return (2 + z) * e + e + bc + states + saved + (states if state_io else 0.0)
    # the lam carries between chunks go through two (b, d, n) buffers used in turn (one is dh0),
    # rewritten in place: each is written back once (L2 write-back), at most 2 of them
    carries = states * min(nchunks - 1, 2)
    # dout, u, delta, z in; du, ddelta, dz out; B, C in; dB, dC out (fp32); saved in; h0, dh_T in, dh0 out
    return (3 + z) * e + (2 + z) * e + bc + 2 * g * n * 4 / d + saved + carries + (3 * states if state_io else 0.0)


def mamba_hbm_bytes(kernel, l, n, e, d, g=1, z=True):
    """mamba_ssm's selective_scan_fn with z at the same shape (no h0, no h_T), by the same rule, as
    its csrc/selective_scan kernels read and write (REFERENCE.md section 1):
    - forward: u, delta, z in; `out` (before the gate, kept for the backward) and `out_z` written;
      x, the running (a, b) pair of every 2048-step chunk, written (fp32, 8 n B per chunk);
    - backward: dout, u, delta, z and `out` in (dz = dout out sigma(z)(1 + z(1 - sigma(z))));
      du, ddelta, dz out; dB, dC fp32; x read for the chunks after the first only.
    Without z: u, delta in, out written; dout, u, delta in, du, ddelta out."""
    chunks = math.ceil(l / 2048)
    bc = 2 * g * n * e / d
    if kernel == "fwd":
        return (2 + z) * e + (1 + z) * e + bc + 8 * n * chunks / l
    return (3 + 2 * z) * e + (2 + z) * e + bc + 2 * g * n * 4 / d + 8 * n * (chunks - 1) / l


def floor_hbm_bytes(kernel, e, z=True):
    """REFERENCE.md's physical floor, bf16 with z: u, delta, z in and out written (fwd, 8 B); dout,
    u, delta, z in, du, ddelta, dz out (bwd, 14 B): what no kernel can go under."""
    return (3 + z) * e if kernel == "fwd" else (5 + 2 * z) * e


# ----------------------------------------------------------------------------- main

def analyse(kernel, shape, dtype, config, dump=None, call="model"):
    b, d, l, n = shape
    bd, warps = config.kwargs["BLOCK_D"], config.num_warps
    compiled, chunk, nchunks, items, vec, sub = compile_kernel(kernel, b, d, l, n, dtype, bd, warps, config.maxnreg,
                                                               call)
    sass, res = disassemble(compiled.asm["cubin"])
    if dump:
        os.makedirs(dump, exist_ok=True)
        stem = os.path.join(dump, f"{kernel}_{b}_{d}_{l}_{n}_{dtype}_bd{bd}" + ("" if call == "model" else f"_{call}"))
        for ext, text in (("ttgir", compiled.asm["ttgir"]), ("ptx", compiled.asm["ptx"]), ("sass", sass)):
            with open(f"{stem}.{ext}", "w") as f:
                f.write(text)
    instrs, labels = parse_sass(sass)
    (ilo, ihi), (olo, ohi) = steady_state(instrs, labels)
    inner, outer = mix(instrs, ilo, ihi), mix(instrs, olo, ohi)
    per_trip = bd * chunk  # updates per trip of the state loop
    rest = {k: outer[k] - inner[k] for k in inner}  # the chunk's per-(b, d, t) work
    per_update = {k: (inner[k] + rest[k] / n) * warps / per_trip for k in inner}
    state_loop = {k: inner[k] * warps / per_trip for k in inner}
    mufu_lane = per_update["mufu"] * 32  # exps per update, counted per lane
    r = resources(res)
    want, layout_ok, lane_order_checked = layout_check(compiled.asm["ttgir"], items, vec, (1, chunk))
    clocks = max(per_update["all"] / 4, per_update["shfl"] / 1, per_update["mufu"] / 0.5)
    e, has_z = ELEM[dtype], CALLS[call]["HAS_Z"]
    rec = dict(
        kernel=kernel, call=call, shape=dict(b=b, d=d, l=l, n=n), dtype=dtype,
        config=dict(BLOCK_D=bd, num_warps=warps, maxnreg=config.maxnreg, L=chunk, ITEMS=items, SUB=sub),
        warp_instr_per_update=per_update["all"], shfl_per_update=per_update["shfl"], mufu_per_update=mufu_lane,
        ldg_per_update=per_update["ldg"], stg_per_update=per_update["stg"], bar_per_update=per_update["bar"],
        atomics_per_update=per_update["atom"], smem_ops_per_update=per_update["lds_sts"],
        state_loop_warp_instr_per_update=state_loop["all"], state_loop_shfl_per_update=state_loop["shfl"],
        state_loop_mufu_per_update=state_loop["mufu"] * 32,
        issue_clocks_per_update_per_sm=clocks,
        regs=r["regs"], spill_bytes=r["spill_bytes"], local_bytes=r["local_bytes"], shared_bytes=r["shared_bytes"],
        occupancy=occupancy(r["regs"], r["shared_bytes"], warps),
        hbm_bytes_per_bdt=hbm_bytes(kernel, b, d, l, n, e, nchunks, state_io=call == "model", z=has_z),
        hbm_bytes_per_bdt_as_mamba=hbm_bytes(kernel, b, d, l, n, e, nchunks, state_io=False, z=has_z),
        mamba_hbm_bytes_per_bdt=mamba_hbm_bytes(kernel, l, n, e, d, z=has_z),
        floor_hbm_bytes_per_bdt=floor_hbm_bytes(kernel, e, z=has_z),
        l2_atomic_bytes_per_bdt=(2 * n * 4 / bd) if kernel == "bwd" else 0.0,
        exps_per_bdt=(inner["mufu"] * n + rest["mufu"]) * 32 / per_trip * warps,
        state_loop_instructions=ihi - ilo + 1, chunk_loop_instructions=ohi - olo + 1,
        layout=want, layout_ok=layout_ok, lane_order_checked=lane_order_checked,
    )
    t = TARGETS[kernel]
    rec["meets_targets"] = bool(
        rec["warp_instr_per_update"] <= t["warp_instr"] and rec["shfl_per_update"] <= t["shfl"]
        and rec["state_loop_mufu_per_update"] <= t["mufu"] and rec["spill_bytes"] == 0 and rec["local_bytes"] == 0
        and rec["occupancy"] >= 0.25 and rec["hbm_bytes_per_bdt_as_mamba"] <= rec["mamba_hbm_bytes_per_bdt"] + 1e-9
        and layout_ok)
    return rec


def table(records):
    head = ("kernel", "shape b,d,l,n", "BLOCK_D", "instr/upd", "(state loop)", "SHFL/upd", "MUFU/upd", "(state loop)",
            "clk/upd/SM", "regs", "spill", "occ", "HBM B/bdt", "(as mamba)", "mamba B/bdt", "floor", "ok")
    rows = [head]
    for r in records:
        s = r["shape"]
        rows.append((r["kernel"], f"{s['b']},{s['d']},{s['l']},{s['n']}", str(r["config"]["BLOCK_D"]),
                     f"{r['warp_instr_per_update']:.3f}", f"{r['state_loop_warp_instr_per_update']:.3f}",
                     f"{r['shfl_per_update']:.4f}", f"{r['mufu_per_update']:.3f}", f"{r['state_loop_mufu_per_update']:.3f}",
                     f"{r['issue_clocks_per_update_per_sm']:.4f}", str(r["regs"]), str(r["spill_bytes"]),
                     f"{r['occupancy']:.0%}", f"{r['hbm_bytes_per_bdt']:.2f}", f"{r['hbm_bytes_per_bdt_as_mamba']:.2f}",
                     f"{r['mamba_hbm_bytes_per_bdt']:.2f}", f"{r['floor_hbm_bytes_per_bdt']:.0f}",
                     "yes" if r["meets_targets"] else "NO"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", action="append", metavar="B,D,L,N",
                   help="repeatable; default: the paper's 96,1536,256,256 and Mamba's 64,1536,1024,16")
    p.add_argument("--dtype", default="bf16", choices=sorted(ELEM))
    p.add_argument("--kernels", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    p.add_argument("--block-d", type=int, nargs="+", help="only these BLOCK_D (default: every kept config)")
    p.add_argument("--json", metavar="PATH", help="write the records (a JSON list) here")
    p.add_argument("--dump", metavar="DIR", help="also write each kernel's TTGIR, PTX and SASS here")
    p.add_argument("--call", default="model", choices=sorted(CALLS),
                   help="model: D, z, delta_bias, softplus, h0, dL/dh_T (default); bare: none of them")
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else list(SHAPES.values())
    records = []
    for shape in shapes:
        b, d, l, n = shape
        for kernel in args.kernels:
            for config in kept_configs(kernel, d, n, l, args.dtype):
                if args.block_d and config.kwargs["BLOCK_D"] not in args.block_d:
                    continue
                records.append(analyse(kernel, shape, args.dtype, config, args.dump, args.call))
                print(f"compiled {kernel} {shape} BLOCK_D={config.kwargs['BLOCK_D']}", file=sys.stderr)
    print(table(records))
    t = TARGETS
    print(f"targets per update: fwd <= {t['fwd']['warp_instr']} instr, <= {t['fwd']['shfl']} SHFL; bwd <= "
          f"{t['bwd']['warp_instr']} instr, <= {t['bwd']['shfl']} SHFL; state-loop MUFU <= 1 exp; no spills; "
          "occupancy >= 25 %; HBM bytes of the call mamba_ssm can make (no h0, no dh_T, no dh0) <= mamba_ssm's, "
          "which are counted as its kernels move them (fwd writes out and out_z, bwd reads out back; x read after "
          "the first 2048 steps); floor: u, delta, z, out (fwd), + dout, du, ddelta, dz (bwd). "
          "mamba_ssm (REFERENCE.md): fwd 0.60 instr / 0.023 SHFL, bwd 2.05 / 0.068, counted over its state loop.")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {args.json}")
    return records


if __name__ == "__main__":
    main()
