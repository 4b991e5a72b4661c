"""The fused Triton selective scan (arcee/ops/scan_triton.py) against the float64 reference.

On CPU this runs under TRITON_INTERPRET=1 (set by conftest before the kernel module is
imported), so shapes stay tiny; the realistic shapes are the `gpu` tests at the end.
"""
import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from arcee.ops import selective_scan_fn, selective_scan_ref

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# mamba_ssm's test tolerances (input dtype); REFERENCE.md section 1
TOL = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2),
       torch.float64: (1e-10, 1e-10)}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0")


@pytest.fixture(scope="module")
def st():
    from arcee.ops import scan_triton  # not at module level: TRITON_INTERPRET must be set first

    return scan_triton


def make_inputs(b=2, d=4, l=7, n=5, g=1, dtype=torch.float32, D=True, z=True, bias=True, h0=True,
                device=DEVICE):
    """Random inputs at mamba_ssm's test scales; parameters fp32 (fp64 for fp64 inputs)."""
    wt = torch.float64 if dtype == torch.float64 else torch.float32
    kw = dict(device=device)
    return dict(
        u=torch.randn(b, d, l, **kw).to(dtype),
        delta=(0.5 * torch.rand(b, d, l, **kw)).to(dtype),
        A=(-0.5 * torch.rand(d, n, **kw) - 0.1).to(wt),
        B=torch.randn(b, g, n, l, **kw).to(dtype),
        C=torch.randn(b, g, n, l, **kw).to(dtype),
        D=torch.randn(d, **kw).to(wt) if D else None,
        z=torch.randn(b, d, l, **kw).to(dtype) if z else None,
        delta_bias=(0.5 * torch.rand(d, **kw)).to(wt) if bias else None,
        h0=torch.randn(b, d, n, **kw).to(wt) if h0 else None,
    )


def reference(x, softplus, dout, dh_T):
    """out, h_T and the nine input gradients of <out, dout> + <h_T, dh_T>, all in float64."""
    x64 = {k: None if v is None else v.detach().double().requires_grad_() for k, v in x.items()}
    out, h_T = selective_scan_ref(x64["u"], x64["delta"], x64["A"], x64["B"], x64["C"], D=x64["D"],
                                  z=x64["z"], delta_bias=x64["delta_bias"], delta_softplus=softplus,
                                  return_last_state=True, initial_state=x64["h0"])
    ((out * dout.double()).sum() + (h_T * dh_T.double()).sum()).backward()
    return out, h_T, {k: None if v is None else v.grad for k, v in x64.items()}


def kernel(st, x, softplus, dout, dh_T):
    """The module's forward/backward called directly."""
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out, h_T, saved = st.forward(*args, softplus, x["h0"])
    grads = st.backward(dout, dh_T, *args, softplus, x["h0"], saved)
    return out, h_T, dict(zip(NAMES, grads))


def assert_close(name, got, want, rtol, atol):
    assert got is not None, name
    want = want.to(got.dtype) if got.dtype != torch.float64 else want
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, check_dtype=False, msg=lambda m: f"{name}: {m}")


def check_all(out, h_T, grads, ref, x, dtype):
    """Outputs at the input dtype's tolerance, gradients looser as in mamba_ssm's tests."""
    rtol, atol = TOL[dtype]
    out_r, h_T_r, g_r = ref
    assert out.dtype == x["u"].dtype and out.shape == x["u"].shape
    assert h_T.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close("out", out, out_r, rtol, atol)
    assert_close("h_T", h_T, h_T_r, rtol, atol)
    scale = {"u": (2, 2), "delta": (5, 10), "A": (1, 5)}
    for k in NAMES:
        if x[k] is None:
            assert grads[k] is None, f"d{k} should be None when {k} is None"
            continue
        assert grads[k].dtype == x[k].dtype and grads[k].shape == x[k].shape, k
        r, a = scale.get(k, (1, 1))
        assert_close(f"d{k}", grads[k].double(), g_r[k], rtol * r, atol * a)


# A subset of l in {1, 7, 64, 100} x n in {1, 5, 16} x g in {1, 2} x options: every value and every
# option on and off at least once, odd lengths and channel tiles that are partly masked (d // g < 4).
CASES = [  # b, d, l, n, g, D, z, bias, softplus, h0
    (2, 4, 1, 1, 1, True, True, True, True, True),
    (1, 4, 7, 5, 2, True, False, False, False, True),
    (2, 2, 7, 1, 2, False, True, True, False, False),
    (2, 8, 64, 16, 1, False, True, True, True, False),
    (1, 8, 100, 16, 2, True, True, True, True, True),
    (1, 2, 100, 5, 1, False, False, False, False, False),
    (1, 6, 65, 5, 2, True, False, True, True, True),
]


@pytest.mark.parametrize("b,d,l,n,g,D,z,bias,softplus,h0", CASES)
def test_fp32_matches_reference(st, b, d, l, n, g, D, z, bias, softplus, h0):
    x = make_inputs(b, d, l, n, g, torch.float32, D, z, bias, h0)
    dout, dh_T = torch.randn_like(x["u"]), torch.randn(b, d, n, device=DEVICE)
    got = kernel(st, x, softplus, dout, dh_T)
    check_all(*got, reference(x, softplus, dout, dh_T), x, torch.float32)


@pytest.mark.parametrize("n", [100, 256])  # the state loop runs over every n, no power of two needed
def test_large_d_state(st, n):
    x = make_inputs(1, 2, 19, n, 1, torch.float64)
    dout, dh_T = torch.randn_like(x["u"]), torch.randn(1, 2, n, dtype=torch.float64, device=DEVICE)
    check_all(*kernel(st, x, True, dout, dh_T), reference(x, True, dout, dh_T), x, torch.float64)


def test_fp64_exact_multi_chunk(st):
    """Several full chunks and a tail (l = 150), fp64 to 1e-10: the chunk carries are exact."""
    assert 150 // st._plan(torch.float64, 150)[1] >= 2
    x = make_inputs(1, 2, 150, 3, 1, torch.float64)
    dout, dh_T = torch.randn_like(x["u"]), torch.randn(1, 2, 3, dtype=torch.float64, device=DEVICE)
    check_all(*kernel(st, x, True, dout, dh_T), reference(x, True, dout, dh_T), x, torch.float64)


def test_no_dh_T_is_zero_dh_T(st):
    x = make_inputs(1, 4, 9, 3, 1)
    dout = torch.randn_like(x["u"])
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out, h_T, saved = st.forward(*args, True, x["h0"])
    g_none = st.backward(dout, None, *args, True, x["h0"], saved)
    g_zero = st.backward(dout, torch.zeros_like(h_T), *args, True, x["h0"], saved)
    for k, a, b in zip(NAMES, g_none, g_zero):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


class _Kernel(torch.autograd.Function):
    """The module's forward/backward as an autograd function, for gradcheck."""

    @staticmethod
    def forward(ctx, st, softplus, *x):
        out, h_T, saved = st.forward(*x[:8], softplus, x[8])
        ctx.st, ctx.softplus = st, softplus
        ctx.save_for_backward(*x, saved)
        return out, h_T

    @staticmethod
    def backward(ctx, dout, dh_T):
        *x, saved = ctx.saved_tensors
        grads = ctx.st.backward(dout, dh_T, *x[:8], ctx.softplus, x[8], saved)
        return (None, None, *grads)


def test_gradcheck_fp64(st):
    """Finite differences of the kernel's own forward against its backward, in float64."""
    x = make_inputs(1, 2, 5, 3, 1, torch.float64)
    inputs = [x[k].requires_grad_() for k in NAMES]
    assert torch.autograd.gradcheck(lambda *a: _Kernel.apply(st, True, *a), inputs, eps=1e-6, atol=1e-7)


def test_noncontiguous_inputs(st):
    """u, delta, z, B, C, h0, dout and dh_T as strided views (l not innermost, transposed states)."""
    b, d, l, n, g = 2, 4, 23, 5, 2
    c = make_inputs(b, d, l, n, g)
    x = dict(c)
    for k in ("u", "delta", "z"):
        x[k] = c[k].transpose(1, 2).contiguous().transpose(1, 2)
    for k in ("B", "C"):
        x[k] = c[k].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    x["h0"] = c["h0"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(x[k].is_contiguous() for k in ("u", "delta", "z", "B", "C", "h0"))
    dout = torch.randn(b, l, d, device=DEVICE).transpose(1, 2)
    dh_T = torch.randn(b, n, d, device=DEVICE).transpose(1, 2)
    check_all(*kernel(st, x, True, dout, dh_T), reference(c, True, dout, dh_T), c, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(st, dtype):
    x = make_inputs(2, 4, 37, 16, 2, dtype)
    dout, dh_T = torch.randn_like(x["u"]), torch.randn(2, 4, 16, device=DEVICE)
    check_all(*kernel(st, x, True, dout, dh_T), reference(x, True, dout, dh_T), x, dtype)


def test_dispatcher_triton_backend():
    """selective_scan_fn(..., backend="triton") with autograd, against the reference."""
    x = make_inputs(2, 4, 33, 5, 2)
    leaves = {k: None if v is None else v.clone().requires_grad_() for k, v in x.items()}
    out, h_T = selective_scan_fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                                 D=leaves["D"], z=leaves["z"], delta_bias=leaves["delta_bias"],
                                 delta_softplus=True, return_last_state=True, initial_state=leaves["h0"],
                                 backend="triton")
    dout, dh_T = torch.randn_like(out), torch.randn_like(h_T)
    ((out * dout).sum() + (h_T * dh_T).sum()).backward()
    grads = {k: None if v is None else v.grad for k, v in leaves.items()}
    check_all(out, h_T, grads, reference(x, True, dout, dh_T), x, torch.float32)


def test_chaining_two_halves_equals_one_scan():
    """Scan [0, k) then [k, l) from a non-contiguous view of the first h_T: values and gradients."""
    b, d, l, n, k = 1, 4, 29, 5, 11  # k not a multiple of the chunk length
    x = make_inputs(b, d, l, n, 2, torch.float64)
    dout, dh_T = torch.randn_like(x["u"]), torch.randn(b, d, n, dtype=torch.float64, device=DEVICE)

    def run(split):
        v = {k_: None if t is None else t.clone().requires_grad_() for k_, t in x.items()}
        kw = dict(D=v["D"], delta_bias=v["delta_bias"], delta_softplus=True, return_last_state=True,
                  backend="triton")
        pieces = [slice(0, l)] if not split else [slice(0, k), slice(k, l)]
        h, outs = v["h0"], []
        for s in pieces:
            z = v["z"][..., s]
            o, h = selective_scan_fn(v["u"][..., s], v["delta"][..., s], v["A"], v["B"][..., s],
                                     v["C"][..., s], z=z, initial_state=h, **kw)
            h = h.transpose(1, 2).contiguous().transpose(1, 2)  # a non-contiguous h_T view
            outs.append(o)
        out = torch.cat(outs, dim=-1)
        ((out * dout).sum() + (h * dh_T).sum()).backward()
        return out, h, {k_: None if t is None else t.grad for k_, t in v.items()}

    one, two = run(False), run(True)
    for name, a, b_ in (("out", one[0], two[0]), ("h_T", one[1], two[1])):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10, msg=name)
    for key in NAMES:
        torch.testing.assert_close(one[2][key], two[2][key], rtol=1e-10, atol=1e-10, msg=f"d{key}")


def test_h0_none_equals_zeros_and_linearity(st):
    """h0 = None equals h0 = 0, and h_T(h0) - h_T(0) = exp(sum_t dt_t A) h0 (fp64)."""
    x = make_inputs(2, 4, 13, 5, 1, torch.float64, h0=False)
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out0, hT0, _ = st.forward(*args, True, None)
    outz, hTz, _ = st.forward(*args, True, torch.zeros(2, 4, 5, dtype=torch.float64, device=DEVICE))
    torch.testing.assert_close(out0, outz, rtol=0, atol=0)
    torch.testing.assert_close(hT0, hTz, rtol=0, atol=0)
    h0 = torch.randn(2, 4, 5, dtype=torch.float64, device=DEVICE)
    _, hT1, _ = st.forward(*args, True, h0)
    dt = torch.nn.functional.softplus(x["delta"] + x["delta_bias"][:, None])  # (b, d, l)
    decay = torch.exp(dt.sum(-1)[..., None] * x["A"])  # (b, d, n)
    torch.testing.assert_close(hT1 - hT0, decay * h0, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("l", [1, 7, 64, 1000])
def test_plan_covers_the_sequence(st, dtype, l):
    """A lane holds whole 16-byte vectors; the backward's chunks cover l exactly once, and the
    forward's chunks are whole numbers of them (two once there are two)."""
    plan = st._plan(dtype, l)
    assert plan.vec * torch.empty((), dtype=dtype).element_size() == 16 and plan.items % plan.vec == 0
    assert plan.chunk * (plan.nchunks - 1) < l <= plan.chunk * plan.nchunks
    assert plan.sub == (2 if plan.nchunks > 1 else 1) and plan.fwd_chunk == plan.sub * plan.chunk
    if dtype != torch.float64 and not st._INTERPRET:
        assert plan.items == 8


# ----------------------------------------------------------------------------- GPU scale

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,d,l,n,g", [(2, 256, 1024, 16, 1), (2, 192, 256, 256, 1), (3, 128, 333, 64, 2),
                                       (1, 64, 1, 1, 1), (2, 96, 2049, 5, 3)])
def test_gpu_matches_reference(st, dtype, b, d, l, n, g):
    x = make_inputs(b, d, l, n, g, dtype, device="cuda")
    dout = torch.randn_like(x["u"])
    dh_T = torch.randn(b, d, n, device="cuda")
    check_all(*kernel(st, x, True, dout, dh_T), reference(x, True, dout, dh_T), x, dtype)


@pytest.mark.gpu
def test_gpu_large_batch_offsets(st):
    """b * d * l above 2^31 elements would overflow int32 offsets; here just past 2^28 as a smoke test."""
    x = make_inputs(64, 1024, 4096, 16, 1, torch.bfloat16, device="cuda", z=False, h0=False)
    out, h_T, saved = st.forward(*[x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")],
                                 True, None)
    assert torch.isfinite(out.float()).all() and torch.isfinite(h_T).all()


def test_autotune_pruning_keeps_fitting_configs(st):
    """The GPU configs pruned for a shape are never wider than the group, and never nothing."""
    for kernel in ("fwd", "bwd"):
        configs = st._gpu_configs(kernel)
        assert all(c.num_warps == 1 and c.maxnreg == 128 for c in configs)
        for d, g in ((1536, 1), (3, 3), (64, 2), (2, 2)):
            kept = st._pruner()(configs, {"dim": d, "ngroups": g})
            assert kept and all(c.kwargs["BLOCK_D"] <= max(1, 2 ** (d // g - 1).bit_length()) for c in kept)


# ----------------------------------------------------------------------------- bugs fixed (issue 12)

def test_strided_D_and_delta_bias(st):
    """D and delta_bias as strided views are read through their strides."""
    x = make_inputs(2, 6, 20, 8, 1)
    x["D"] = torch.randn(12, device=DEVICE)[::2]
    x["delta_bias"] = (0.5 * torch.rand(12, device=DEVICE))[::2]
    assert not x["D"].is_contiguous() and not x["delta_bias"].is_contiguous()
    dout, dh_T = torch.randn_like(x["u"]), torch.randn(2, 6, 8, device=DEVICE)
    check_all(*kernel(st, x, True, dout, dh_T), reference(x, True, dout, dh_T), x, torch.float32)


def test_nan_delta_propagates_through_softplus(st):
    x = make_inputs(1, 2, 9, 3, 1, h0=False)
    x["delta"][0, 1, 4] = float("nan")
    out, h_T, _ = st.forward(*[x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")], True, None)
    assert out[0, 1, 4:].isnan().all() and h_T[0, 1].isnan().all()
    assert not out[0, 0].isnan().any() and not out[0, 1, :4].isnan().any()


@pytest.mark.parametrize("l", [40, 70])  # tail chunks of 8 and 6 steps under the interpreter
def test_inf_in_A_with_a_partial_chunk(st, l):
    """A = -inf (a state that forgets at once): padded steps are the identity, not exp(0 * -inf).
    Matches the float64 reference, whose only NaN is d(delta) of that channel (A exp(dt A) = -inf * 0)."""
    x = make_inputs(1, 4, l, 5, 1)
    x["A"][1, 2] = float("-inf")
    dout, dh_T = torch.randn_like(x["u"]), torch.randn(1, 4, 5, device=DEVICE)
    out, h_T, grads = kernel(st, x, True, dout, dh_T)
    ref = reference(x, True, dout, dh_T)
    assert torch.isfinite(out).all() and torch.isfinite(h_T).all()
    for k in ("u", "A", "B", "C", "D", "z", "h0"):
        assert torch.isfinite(grads[k]).all(), k
    for name, got, want in [("out", out, ref[0]), ("h_T", h_T, ref[1])] + [(k, grads[k], ref[2][k]) for k in NAMES]:
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-2, equal_nan=True, msg=name)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_constant_B_C_of_shape_d_n(backend):
    """mamba_ssm's drop-in form: B, C of shape (d, n), the same at every step and batch element."""
    b, d, l, n = 2, 4, 11, 3
    x = make_inputs(b, d, l, n, 1)
    Bc, Cc = torch.randn(d, n, device=DEVICE, requires_grad=True), torch.randn(d, n, device=DEVICE, requires_grad=True)
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)
    out = selective_scan_fn(x["u"], x["delta"], x["A"], Bc, Cc, backend=backend, **kw)
    out.sum().backward()
    Be, Ce = (v.detach().clone().requires_grad_() for v in (Bc, Cc))
    # independent statement: channel c is its own group whose B is constant in b and t
    want = selective_scan_ref(x["u"], x["delta"], x["A"], Be.t().reshape(1, d, n, 1).expand(b, d, n, l),
                              Ce.t().reshape(1, d, n, 1).expand(b, d, n, l), **kw)
    want.sum().backward()
    torch.testing.assert_close(out, want, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(Bc.grad, Be.grad, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(Cc.grad, Ce.grad, rtol=6e-4, atol=2e-3)


def test_complex_A_is_refused_clearly():
    x = make_inputs(1, 2, 5, 3, 1)
    with pytest.raises(ValueError, match="complex A is not supported"):
        selective_scan_fn(x["u"], x["delta"], x["A"].to(torch.complex64), x["B"], x["C"])


_time_order = None  # scan_triton._time_order, set by the test below (the module is imported lazily)


@triton.jit
def _numbering(out_ptr, L: tl.constexpr, ITEMS: tl.constexpr, VEC: tl.constexpr):
    tt = tl.arange(0, L)
    tl.store(out_ptr + tt, _time_order(tt, ITEMS, VEC, True))


def test_time_order_matches_its_numpy_statement(st):
    """_time_order (the kernels' column numbering) equals time_order_columns, which
    benchmarks/kernel_static.py composes with Triton's own layout to check each lane's steps."""
    global _time_order
    _time_order = st._time_order
    for L, items, vec in ((512, 16, 8), (256, 8, 4), (512, 16, 4), (256, 8, 8)):
        out = torch.empty(L, dtype=torch.int32, device=DEVICE)
        _numbering[(1,)](out, L, items, vec)
        assert out.tolist() == st.time_order_columns(L, items, vec).tolist()
        assert sorted(out.tolist()) == list(range(L))  # a permutation of the chunk's steps


def test_vector_rows_pads_only_what_the_vector_loads_cannot_take(st):
    """The FAST kernels need rows Triton's JIT can prove 16-byte aligned; anything else is copied
    into rows padded to 16 steps (same values), and nothing is copied when it already is."""
    aligned = torch.randn(2, 3, 32)
    assert st._vector_rows(aligned, True) is aligned
    assert st._vector_rows(torch.randn(2, 3, 33), False).shape == (2, 3, 33)  # not FAST: untouched
    constant = torch.randn(3, 1).expand(3, 40)  # constant along time (B, C given as (d, n))
    assert st._vector_rows(constant, True) is constant
    for x in (torch.randn(2, 3, 33), torch.randn(2, 40, 3).transpose(1, 2), torch.randn(2, 3, 49)[..., 1:]):
        y = st._vector_rows(x, True)
        assert torch.equal(y, x) and y.stride(-1) == 1 and all(s % 16 == 0 for s in y.stride()[:-1])
        assert y.data_ptr() % 16 == 0


# ----------------------------------------------------------------------------- the GPU-only PTX, on CPU

@pytest.mark.parametrize("items", [16, 8])  # the forward: 16 or 8 steps per lane
def test_forward_scan_ptx_matches_a_float64_loop(st, items):
    """The kernels' hand-written forward scan (GPU only) run instruction by instruction here:
    h_t = a_t h_{t-1} + b_t over 32 lanes x items steps from h_{-1} = h_in."""
    rng = np.random.default_rng(1)
    L, h_in = 32 * items, np.float32(0.7)
    a = rng.uniform(0.3, 1.0, L).astype(np.float32)
    b = rng.standard_normal(L).astype(np.float32)
    ops = [{**{f"${items + i}": a[lane * items + i] for i in range(items)},
            **{f"${2 * items + i}": b[lane * items + i] for i in range(items)}, f"${3 * items}": h_in}
           for lane in range(32)]
    lanes = _Lanes(ops)
    lanes.run(st.forward_scan_ptx(items))
    got = np.array([lanes.regs[t // items][f"${t % items}"] for t in range(L)], dtype=np.float64)
    want, h = np.zeros(L), np.float64(h_in)
    for t in range(L):
        h = a[t] * h + b[t]
        want[t] = h
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)


class _Lanes:
    """A tiny interpreter for the PTX subset of scan_triton.reverse_scan_ptx, over 32 lanes."""

    def __init__(self, operands):
        self.regs = [dict(operands[lane]) for lane in range(32)]

    def val(self, lane, tok):
        if tok.startswith("0f"):
            return float(np.frombuffer(bytes.fromhex(tok[2:])[::-1], dtype=np.float32)[0])
        return self.regs[lane][tok]

    def run(self, text):
        body = text.strip()[1:-1]
        for ins in (i.strip() for i in body.split(";") if i.strip()):
            pred = None
            if ins.startswith("@"):
                pred, ins = ins.split(None, 1)
            op, args = ins.split(None, 1)
            args = [a.strip() for a in args.replace("|", ",").split(",")]
            if op.startswith(".reg"):
                continue
            lanes = range(32)
            if pred:
                neg, name = pred[1] == "!", pred.lstrip("@!")
                lanes = [ln for ln in lanes if self.regs[ln][name] != neg]
            if op in ("shfl.sync.down.b32", "shfl.sync.up.b32"):  # d|p, a, delta, clamp, mask
                dst, p, src, delta = args[0], args[1], args[2], int(args[3])
                delta = delta if op == "shfl.sync.down.b32" else -delta
                snap = [self.val(ln, src) for ln in range(32)]
                for ln in lanes:
                    ok = 0 <= ln + delta < 32
                    self.regs[ln][dst] = snap[ln + delta] if ok else snap[ln]
                    self.regs[ln][p] = ok
                continue
            if op == "mov.u32" and args[1] == "%laneid":
                for ln in lanes:
                    self.regs[ln][args[0]] = ln
                continue
            if op == "setp.eq.u32":
                for ln in lanes:
                    self.regs[ln][args[0]] = self.regs[ln][args[1]] == int(args[2])
                continue
            for ln in lanes:
                v = [self.val(ln, a) for a in args[1:]]
                f32 = np.float32
                if op == "mov.f32":
                    r = v[0]
                elif op == "mul.f32":
                    r = f32(v[0]) * f32(v[1])
                elif op == "fma.rn.f32":  # fused: one rounding
                    r = f32(np.float64(v[0]) * np.float64(v[1]) + np.float64(v[2]))
                else:
                    raise NotImplementedError(op)
                self.regs[ln][args[0]] = f32(r)


@pytest.mark.parametrize("items", [8])  # the backward: 8 steps per lane
def test_reverse_scan_ptx_matches_a_float64_loop(st, items):
    """The backward's hand-written reverse scan (GPU only) run instruction by instruction here:
    lam_t = g_t + a_{t+1} lam_{t+1} over 32 lanes x items steps, nothing after the last step."""
    rng = np.random.default_rng(0)
    L = 32 * items
    a = rng.uniform(0.3, 1.0, L).astype(np.float32)
    g = rng.standard_normal(L).astype(np.float32)
    ops = [{**{f"${items + i}": a[lane * items + i] for i in range(items)},
            **{f"${2 * items + i}": g[lane * items + i] for i in range(items)}} for lane in range(32)]
    lanes = _Lanes(ops)
    lanes.run(st.reverse_scan_ptx(items))
    got = np.array([lanes.regs[t // items][f"${t % items}"] for t in range(L)], dtype=np.float64)
    want = np.zeros(L)
    acc = 0.0
    for t in range(L - 1, -1, -1):
        acc = g[t] + (a[t + 1] * acc if t + 1 < L else 0.0)
        want[t] = acc
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)


def test_static_tool_on_sm90(tmp_path):
    """benchmarks/kernel_static.py compiles both kernels for sm_90 (real Triton, not the
    interpreter) at a small shape, reads their SASS and checks the layout the GPU-only code assumes:
    catches GPU-only compile errors and layout changes in CPU CI. Needs Triton's bundled ptxas."""
    import json
    import subprocess
    import sys

    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bin_dir, t)) for t in ("ptxas", "nvdisasm", "cuobjdump")):
        pytest.skip("Triton's NVIDIA backend tools (ptxas, nvdisasm, cuobjdump) are not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "static.json"
    root = os.path.join(os.path.dirname(__file__), "..")
    tool = [sys.executable, os.path.join(root, "benchmarks", "kernel_static.py")]
    r = subprocess.run(tool + ["--shape", "2,64,256,16", "--shape", "2,64,333,16", "--json", str(out)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    records = json.loads(out.read_text())
    assert {rec["kernel"] for rec in records} == {"fwd", "bwd"}
    # l = 333: the forward walks chunks of two backward chunks, a lane holding two 16-byte vectors,
    # and the rows (padded to 16 steps by the host) still load as vectors: the layout check holds
    assert {(rec["kernel"], rec["shape"]["l"], rec["config"]["SUB"]) for rec in records} == {
        ("fwd", 256, 1), ("bwd", 256, 1), ("fwd", 333, 2), ("bwd", 333, 1)}
    # the call with none of D, z, delta_bias, softplus, h0, dL/dh_T compiles through other branches
    r = subprocess.run(tool + ["--shape", "2,64,333,16", "--call", "bare", "--dtype", "fp32", "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    records += json.loads(out.read_text())
    for rec in records:
        assert rec["layout_ok"], f"{rec['kernel']}: the [BLOCK_D, L] tiles no longer have layout {rec['layout']}"
        assert rec["lane_order_checked"]  # Triton's linear layout was read, not skipped
        assert 0 < rec["state_loop_warp_instr_per_update"] <= rec["warp_instr_per_update"]
        assert rec["state_loop_mufu_per_update"] == pytest.approx(1.0, abs=0.01)  # one exp per update
        assert rec["regs"] <= 128 and rec["occupancy"] >= 0.25
