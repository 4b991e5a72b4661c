"""The selective scan on CPU: reference vs a plain float64 loop, the cpu backend vs the
reference, gradcheck, the state-passing properties, low precision, torch.compile, bad input."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from arcee.ops import DeviceMismatchError, selective_scan_fn, selective_scan_ref

F64 = torch.float64
# mamba_ssm's tolerances (rtol, atol) by input dtype; gradients are loosened as in its tests.
TOL = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(b=2, d=4, n=3, l=7, g=1, dtype=torch.float32, D=True, z=True, bias=True, h0=True,
                grouped=True):
    """Inputs in the style of mamba_ssm's tests; B, C are (b, n, l) when g == 1 and not grouped."""
    bc_shape = (b, g, n, l) if grouped or g > 1 else (b, n, l)
    wt = F64 if dtype == F64 else torch.float32
    x = dict(
        u=torch.randn(b, d, l, dtype=dtype),
        delta=(0.5 * torch.rand(b, d, l)).to(dtype),
        A=-0.5 * torch.rand(d, n, dtype=wt) - 0.1 * torch.arange(n, dtype=wt),
        B=torch.randn(bc_shape, dtype=dtype),
        C=torch.randn(bc_shape, dtype=dtype),
        D=torch.randn(d, dtype=wt) if D else None,
        z=torch.randn(b, d, l, dtype=dtype) if z else None,
        delta_bias=0.5 * torch.rand(d, dtype=wt) if bias else None,
        initial_state=torch.randn(b, d, n, dtype=wt) if h0 else None,
    )
    return {k: (None if v is None else v.requires_grad_()) for k, v in x.items()}


def run(x, backend, softplus=True):
    """out, h_T and the gradients of sum(out * w) + sum(h_T * w_T) for fixed random weights."""
    out, h_T = selective_scan_fn(**x, delta_softplus=softplus, return_last_state=True, backend=backend)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(out.shape, generator=gen).to(out.dtype)
    w_T = torch.randn(h_T.shape, generator=gen).to(h_T.dtype)
    loss = (out * w).sum() + (h_T * w_T).sum()
    present = [k for k in NAMES if x[k] is not None]
    grads = torch.autograd.grad(loss, [x[k] for k in present])
    return out, h_T, dict(zip(present, grads))


def to64(x):
    return {k: (None if v is None else v.detach().to(F64).requires_grad_()) for k, v in x.items()}


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
               initial_state=None):
    """The recurrence written out element by element in Python floats (float64)."""
    b, d, l = u.shape
    n = A.shape[1]
    B = B if B.dim() == 4 else B[:, None]
    C = C if C.dim() == 4 else C[:, None]
    per_group = d // B.shape[1]
    u, delta, A, B, C = (t.tolist() for t in (u, delta, A, B, C))
    out = [[[0.0] * l for _ in range(d)] for _ in range(b)]
    h_T = [[[0.0] * n for _ in range(d)] for _ in range(b)]
    for i in range(b):
        for c in range(d):
            grp = c // per_group
            h = [0.0] * n if initial_state is None else [float(v) for v in initial_state[i, c]]
            for t in range(l):
                v = delta[i][c][t] + (0.0 if delta_bias is None else float(delta_bias[c]))
                dt = math.log1p(math.exp(v)) if delta_softplus and v <= 20 else v
                y = 0.0
                for k in range(n):
                    h[k] = math.exp(dt * A[c][k]) * h[k] + dt * B[i][grp][k][t] * u[i][c][t]
                    y += C[i][grp][k][t] * h[k]
                if D is not None:
                    y += float(D[c]) * u[i][c][t]
                if z is not None:
                    zz = float(z[i, c, t])
                    y *= zz / (1.0 + math.exp(-zz))
                out[i][c][t] = y
            h_T[i][c] = h
    return torch.tensor(out, dtype=F64), torch.tensor(h_T, dtype=F64)


# ----------------------------------------------------------------------------- the oracle

@pytest.mark.parametrize("g,grouped", [(1, False), (1, True), (2, True)])
@pytest.mark.parametrize("opts", [dict(), dict(D=False, z=False, bias=False, h0=False)])
@pytest.mark.parametrize("softplus", [True, False])
def test_reference_matches_float64_loop(g, grouped, opts, softplus):
    x = make_inputs(b=2, d=4, n=3, l=6, g=g, dtype=F64, grouped=grouped, **opts)
    out, h_T = selective_scan_ref(**x, delta_softplus=softplus, return_last_state=True)
    want_out, want_h = naive_scan(**{k: (None if v is None else v.detach()) for k, v in x.items()},
                                  delta_softplus=softplus)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_T, want_h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("g", [1, 2])
def test_gradcheck_float64(backend, g):
    x = make_inputs(b=2, d=2, n=2, l=5, g=g, dtype=F64)
    keys = [k for k in NAMES if x[k] is not None]

    def f(*args):
        kw = dict(zip(keys, args))
        out, h_T = selective_scan_fn(**kw, delta_softplus=True, return_last_state=True, backend=backend)
        return out, h_T

    assert torch.autograd.gradcheck(f, [x[k] for k in keys])


# ----------------------------------------------------------------------------- cpu backend vs reference

def assert_matches(got, want, dtype, tol_scale=1.0):
    """got: run() in `dtype`; want: run() of the float64 reference on the same inputs."""
    rtol, atol = (tol_scale * t for t in TOL[dtype])
    out, h_T, grads = got
    want_out, want_h, want_grads = want
    assert out.dtype == dtype and h_T.dtype == torch.float32
    torch.testing.assert_close(out.float(), want_out.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(h_T, want_h.float(), rtol=rtol, atol=atol)
    assert grads.keys() == want_grads.keys()
    loosen = {"u": (2, 2), "delta": (5, 10), "A": (1, 5)}  # mamba_ssm's gradient tolerances
    for k, gk in grads.items():
        r, a = loosen.get(k, (1, 1))
        # Gradients summed over (b, t) grow with the number of terms: scale atol by their size.
        scale = max(1.0, want_grads[k].abs().max().item())
        torch.testing.assert_close(gk.float(), want_grads[k].float(), rtol=r * rtol, atol=a * atol * scale,
                                   msg=lambda m: f"grad of {k}: {m}")


GRID = [(l, n, g) for l in (1, 7, 64, 100) for n in (1, 5, 16) for g in (1, 2)]


@pytest.mark.parametrize("l,n,g", GRID)
@pytest.mark.parametrize("full", [True, False], ids=["all-options", "no-options"])
def test_cpu_matches_reference(l, n, g, full):
    opts = dict() if full else dict(D=False, z=False, bias=False, h0=False)
    x = make_inputs(b=2, d=4, n=n, l=l, g=g, **opts)
    want = run(to64(x), "reference", softplus=full)
    assert_matches(run(x, "cpu", softplus=full), want, torch.float32)


@pytest.mark.parametrize("drop", ["D", "z", "bias", "h0", "softplus", "grouped"])
def test_cpu_matches_reference_each_option(drop):
    opts = {} if drop == "softplus" else {drop: False}
    x = make_inputs(b=2, d=4, n=5, l=33, g=1, **opts)
    softplus = drop != "softplus"
    assert_matches(run(x, "cpu", softplus=softplus), run(to64(x), "reference", softplus=softplus),
                   torch.float32)


@pytest.mark.parametrize("l", [7, 64, 100])
def test_cpu_chunks_and_tiles_match_reference(monkeypatch, l):
    """The kernel walks time in chunks and channels in tiles of 16: force 3-step chunks (with a
    shorter tail) and groups of 20 channels (a full and a partial tile)."""
    from arcee.ops import scan_cpu

    monkeypatch.setattr(scan_cpu, "MAX_CHUNK", 3)
    assert scan_cpu.chunk_len(5) == 3
    x = make_inputs(b=2, d=40, n=5, l=l, g=2)
    assert_matches(run(x, "cpu"), run(to64(x), "reference"), torch.float32)


@pytest.mark.parametrize("max_chunk", [64, 16])
def test_cpu_inf_in_A_with_a_tail_chunk(monkeypatch, max_chunk):
    """A = -inf (a_t = 0) with l not a multiple of the chunk: a shorter tail chunk must not run
    padded steps (dt = 0 would give exp(0 * -inf) = NaN). Matches the float64 reference, whose
    only NaN is d(delta) of that channel (A exp(dt A) = -inf * 0)."""
    from arcee.ops import scan_cpu

    monkeypatch.setattr(scan_cpu, "MAX_CHUNK", max_chunk)
    x = make_inputs(b=2, d=4, n=5, l=40, g=1)
    with torch.no_grad():
        x["A"][1, 2] = -math.inf
    got, want = run(x, "cpu"), run(to64(x), "reference")
    assert got[1].isfinite().all() and want[1].isfinite().all()
    for k in ("u", "A", "B", "C", "initial_state"):
        assert got[2][k].isfinite().all(), k
    for a, b in [(got[0], want[0]), (got[1], want[1])] + [(got[2][k], want[2][k]) for k in got[2]]:
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-2, equal_nan=True)


def test_cpu_nan_delta_propagates_through_softplus():
    """NaN in delta gives NaN out from that step on in its channel, as the reference (and mamba_ssm)."""
    x = make_inputs(b=2, d=4, n=3, l=20, h0=False)
    with torch.no_grad():
        x["delta"][0, 1, 7] = math.nan
    for backend in ("reference", "cpu"):
        out = selective_scan_fn(**x, delta_softplus=True, backend=backend)
        want = torch.zeros_like(out, dtype=torch.bool)
        want[0, 1, 7:] = True
        assert torch.equal(out.isnan(), want), backend


def test_cpu_softplus_and_exp_are_accurate():
    """The kernel's own vectorised softplus and exp against torch's, in fp32, edge values included:
    with l = 1, B = C = u = 1, out = dt = softplus(delta); with B = 0, h_T = exp(dt A) h0."""
    v = torch.cat([torch.linspace(-30, 30, 6001),
                   torch.tensor([-1e30, -100.0, -17.5, -1e-8, 0.0, 1e-8, 19.99, 20.0, 20.001, 1e30, math.inf,
                                 -math.inf, math.nan])])
    d = v.numel()
    one = torch.ones(1, d, 1)
    out = selective_scan_fn(one, v.view(1, d, 1), -torch.ones(d, 1), torch.ones(1, 1, 1), torch.ones(1, 1, 1),
                            delta_softplus=True, backend="cpu")
    # atol: results below fp32's normal range (2^-126) are flushed to zero
    torch.testing.assert_close(out.view(-1), F.softplus(v), rtol=2e-6, atol=2e-38, equal_nan=True)

    x = torch.cat([torch.linspace(-80, 5, 8501), torch.tensor([-math.inf, math.nan, 0.0])])
    d = x.numel()
    _, h_T = selective_scan_fn(torch.zeros(1, d, 1), torch.ones(1, d, 1), x.view(d, 1), torch.zeros(1, 1, 1),
                               torch.zeros(1, 1, 1), return_last_state=True, initial_state=torch.ones(1, d, 1),
                               backend="cpu")
    # exp(dt A) is formed as 2^(dt (A log2 e)): the rounding of A log2 e costs ~|dt A| 6e-8 relative
    torch.testing.assert_close(h_T.view(-1).double(), torch.exp(x.double()), rtol=1e-5, atol=0, equal_nan=True)


def test_cpu_strided_D_and_delta_bias():
    x = make_inputs(b=2, d=6, n=8, l=20, g=2)
    x["D"] = torch.randn(12)[::2].requires_grad_()
    x["delta_bias"] = (0.5 * torch.rand(12))[::2].requires_grad_()
    assert not x["D"].is_contiguous()
    assert_matches(run(x, "cpu"), run(to64(x), "reference"), torch.float32)


def test_cpu_threads_give_identical_results(monkeypatch):
    """Tasks are claimed by whichever thread comes first: results must not depend on it."""
    from arcee.ops import scan_cpu

    x = make_inputs(b=6, d=40, n=5, l=70, g=2)
    results = []
    for n_threads in (1, 3):
        monkeypatch.setattr(scan_cpu, "threads", lambda: n_threads)
        results.append(run(x, "cpu"))
    (o1, h1, g1), (o3, h3, g3) = results
    assert torch.equal(o1, o3) and torch.equal(h1, h3)
    assert all(torch.equal(g1[k], g3[k]) for k in g1)


@pytest.mark.parametrize("running,want", [(1, 2), (2, 1), (9, 1)])
def test_cpu_threads_leave_busy_cores_alone(monkeypatch, tmp_path, running, want):
    """threads(): torch's count, less the cores other runnable threads hold (the caller is one)."""
    from arcee.ops import scan_cpu

    path = tmp_path / "loadavg"
    path.write_text(f"3.10 2.50 2.00 {running}/300 4242\n")
    fd = os.open(path, os.O_RDONLY)
    monkeypatch.setattr(scan_cpu, "_LOADAVG", fd)
    monkeypatch.setattr(scan_cpu, "_CORES", 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    try:
        assert scan_cpu.threads() == want
    finally:
        os.close(fd)


def test_cpu_kernel_build_errors_name_the_compiler(monkeypatch, tmp_path):
    from arcee.ops import scan_cpu

    monkeypatch.setenv("ARCEE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(RuntimeError, match="no-such-compiler-xyz.*not found.*CXX"):
        scan_cpu._build()
    assert list(tmp_path.iterdir()) == []  # no partial library left behind


@pytest.mark.parametrize("l", [1, 50])
def test_cpu_results_survive_the_next_call(l):
    """The cpu path reuses scratch buffers: nothing it returns may alias them."""
    first = run(make_inputs(l=l), "cpu")
    kept = [t.clone() for t in first[:2]] + [t.clone() for t in first[2].values()]
    run(make_inputs(l=l), "cpu")
    for a, b in zip([*first[:2], *first[2].values()], kept):
        assert torch.equal(a, b)


def test_default_backend_on_cpu_is_cpu_path():
    x = make_inputs()
    got = run(x, None)
    want = run(x, "cpu")
    for a, b in zip(got[:2], want[:2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_float64_inputs_stay_float64(backend):
    x = make_inputs(dtype=F64)
    out, h_T, grads = run(x, backend)
    assert out.dtype == F64 and h_T.dtype == F64
    assert all(gk.dtype == F64 for gk in grads.values())


# ----------------------------------------------------------------------------- state passing

@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_h0_none_equals_zeros(backend):
    x = make_inputs(h0=False)
    got = run(x, backend)
    x0 = dict(x, initial_state=torch.zeros(2, 4, 3, requires_grad=True))
    want = run(x0, backend)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    for k, gk in got[2].items():
        torch.testing.assert_close(gk, want[2][k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("k", [1, 5, 13])
def test_chaining_two_halves_equals_one_scan(backend, k):
    x = make_inputs(b=2, d=4, n=5, l=20, g=2, dtype=F64)
    leaves = [x[name] for name in NAMES]

    def one_scan():
        return selective_scan_fn(**x, delta_softplus=True, return_last_state=True, backend=backend)

    def two_scans():
        head = {n: v[..., :k] if n in ("u", "delta", "B", "C", "z") else v for n, v in x.items()}
        tail = {n: v[..., k:] if n in ("u", "delta", "B", "C", "z") else v for n, v in x.items()}
        out1, h1 = selective_scan_fn(**head, delta_softplus=True, return_last_state=True, backend=backend)
        h1_view = torch.stack([h1, h1], dim=-1)[..., 0]  # a non-contiguous view of h_T
        assert not h1_view.is_contiguous()
        tail["initial_state"] = h1_view
        out2, h2 = selective_scan_fn(**tail, delta_softplus=True, return_last_state=True, backend=backend)
        return torch.cat([out1, out2], dim=-1), h2

    w = torch.randn(2, 4, 20, dtype=F64)
    w_T = torch.randn(2, 5, 4, dtype=F64)
    results = []
    for f in (one_scan, two_scans):
        out, h_T = f()
        # the loss reads h_T through a non-contiguous view, so dL/dh_T arrives non-contiguous
        loss = (out * w).sum() + (h_T.transpose(1, 2) * w_T).sum()
        results.append((out, h_T, torch.autograd.grad(loss, leaves)))
    (o1, h1, g1), (o2, h2, g2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h1, h2, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(NAMES, g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("use", ["out", "h_T"])
def test_gradients_from_one_output_only(use):
    """Autograd passes no gradient for the unused output; the cpu path must treat it as zero."""
    x = make_inputs(b=2, d=4, n=3, l=11, g=2, dtype=F64)
    leaves = [x[k] for k in NAMES]
    grads = []
    for backend in ("reference", "cpu"):
        out, h_T = selective_scan_fn(**x, delta_softplus=True, return_last_state=True, backend=backend)
        loss = (out if use == "out" else h_T).square().sum()
        grads.append(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))
    for name, a, b in zip(NAMES, *grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_linear_in_h0(backend):
    x = make_inputs(b=2, d=4, n=5, l=9, g=2, dtype=F64)
    _, h_T = selective_scan_fn(**x, delta_softplus=True, return_last_state=True, backend=backend)
    _, h_T0 = selective_scan_fn(**dict(x, initial_state=None), delta_softplus=True,
                                return_last_state=True, backend=backend)
    dt = F.softplus(x["delta"] + x["delta_bias"][:, None])  # (b, d, l)
    decay = torch.exp(dt.sum(-1)[..., None] * x["A"])  # exp(sum_t dt_t A): (b, d, n)
    torch.testing.assert_close(h_T - h_T0, decay * x["initial_state"], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- low precision

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_low_precision_inputs(dtype, backend):
    x = make_inputs(b=2, d=4, n=5, l=40, g=2, dtype=dtype)
    got = run(x, backend)
    for k, gk in got[2].items():
        assert gk.dtype == x[k].dtype, k
    assert_matches(got, run(to64(x), "reference"), dtype)


# ----------------------------------------------------------------------------- torch.compile, opcheck

def test_torch_compile_fullgraph():
    class Block(torch.nn.Module):
        def __init__(self, d=4, n=3):
            super().__init__()
            self.A = torch.nn.Parameter(-torch.rand(d, n))
            self.D = torch.nn.Parameter(torch.ones(d))

        def forward(self, u, delta, B, C, h0):
            out, h_T = selective_scan_fn(u, delta, self.A, B, C, self.D, delta_softplus=True,
                                         return_last_state=True, initial_state=h0)
            return out.square().mean() + h_T.sum()

    block = Block()
    args = [torch.randn(2, 4, 9), torch.randn(2, 4, 9), torch.randn(2, 3, 9), torch.randn(2, 3, 9),
            torch.randn(2, 4, 3)]
    args[0].requires_grad_()
    args[-1].requires_grad_()
    inputs = [args[0], args[-1], block.A, block.D]
    want = block(*args)
    want_grads = torch.autograd.grad(want, inputs)
    got = torch.compile(block, fullgraph=True)(*args)
    got_grads = torch.autograd.grad(got, inputs)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_opcheck_custom_op():
    from arcee.ops.selective_scan import _scan_fwd

    x = make_inputs(b=1, d=2, n=2, l=5, g=2)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True,
            x["initial_state"], "cpu")
    torch.library.opcheck(_scan_fwd, args, test_utils=("test_schema", "test_autograd_registration",
                                                       "test_faketensor"))


# ----------------------------------------------------------------------------- bad input

def _bad(name):
    """(kwargs, expected exception, words the message must contain) for one bad input."""
    b, d, n, l = 2, 4, 3, 7
    x = {k: (None if v is None else v.detach()) for k, v in make_inputs(b, d, n, l, g=2).items()}
    cases = {
        "u rank": (dict(u=x["u"][0]), ValueError, ["u", "(b, d, l)"]),
        "u dtype": (dict(u=x["u"].int()), ValueError, ["u", "float16"]),
        "u empty": (dict(u=x["u"][..., :0]), ValueError, ["u", ">= 1"]),
        "delta shape": (dict(delta=x["delta"][..., :5]), ValueError, ["delta", "(b, d, l)"]),
        "delta dtype": (dict(delta=x["delta"].double()), ValueError, ["delta", "dtype of u"]),
        "A shape": (dict(A=x["A"][:3]), ValueError, ["A", "(d, n)"]),
        "A rank": (dict(A=x["A"][0]), ValueError, ["A", "(d, n)"]),
        "A complex": (dict(A=x["A"].to(torch.complex64)), ValueError, ["A", "float32"]),
        "A dtype": (dict(A=x["A"].half()), ValueError, ["A", "float32"]),
        "d_state > 256": (dict(A=torch.zeros(d, 257), B=torch.zeros(b, 2, 257, l),
                               C=torch.zeros(b, 2, 257, l)), ValueError, ["A", "256"]),
        "B rank": (dict(B=x["B"][0, 0]), ValueError, ["B", "(b, g, n, l)"]),
        "B batch": (dict(B=x["B"][:1]), ValueError, ["B", "(b, g, n, l)"]),
        "B length": (dict(B=x["B"][..., :6]), ValueError, ["B", "(b, g, n, l)"]),
        "B d_state": (dict(B=x["B"][:, :, :2]), ValueError, ["B", "(b, g, n, l)"]),
        "B groups": (dict(B=torch.zeros(b, 3, n, l), C=torch.zeros(b, 3, n, l)), ValueError,
                     ["B", "divisible"]),
        "B dtype": (dict(B=x["B"].double()), ValueError, ["B", "dtype of u"]),
        "C shape": (dict(C=x["C"][:, :1]), ValueError, ["C", "(b, g, n, l)"]),
        "C batch": (dict(C=x["C"][:1]), ValueError, ["C", "(b, g, n, l)"]),
        "D shape": (dict(D=torch.zeros(d + 1)), ValueError, ["D", "(d,)"]),
        "D dtype": (dict(D=x["D"].half()), ValueError, ["D", "float32"]),
        "z shape": (dict(z=x["z"][:1]), ValueError, ["z", "(b, d, l)"]),
        "z dtype": (dict(z=x["z"].half()), ValueError, ["z", "dtype of u"]),
        "delta_bias shape": (dict(delta_bias=torch.zeros(d, 1)), ValueError, ["delta_bias", "(d,)"]),
        "h0 shape": (dict(initial_state=torch.zeros(b, d, n + 1)), ValueError, ["initial_state", "(b, d, n)"]),
        "h0 batch": (dict(initial_state=torch.zeros(1, d, n)), ValueError, ["initial_state", "(b, d, n)"]),
        "h0 dtype": (dict(initial_state=x["initial_state"].half()), ValueError, ["initial_state", "float32"]),
        "device": (dict(D=x["D"].to("meta")), DeviceMismatchError, ["D", "device"]),
        "backend name": (dict(backend="cuda"), ValueError, ["backend", "reference"]),
    }
    kw, exc, words = cases[name]
    return {**x, **kw}, exc, words


@pytest.mark.parametrize("name", [
    "u rank", "u dtype", "u empty", "delta shape", "delta dtype", "A shape", "A rank", "A complex",
    "A dtype", "d_state > 256", "B rank", "B batch", "B length", "B d_state", "B groups", "B dtype",
    "C shape", "C batch", "D shape", "D dtype", "z shape", "z dtype", "delta_bias shape", "h0 shape",
    "h0 batch", "h0 dtype", "device", "backend name"])
def test_bad_input_raises_naming_the_argument(name):
    kw, exc, words = _bad(name)
    with pytest.raises(exc) as info:
        selective_scan_fn(**kw)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_device_mismatch_is_also_a_runtime_error():
    assert issubclass(DeviceMismatchError, RuntimeError) and issubclass(DeviceMismatchError, ValueError)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kw, _, _ = _bad("backend name")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        selective_scan_fn(**dict(kw, backend="triton"))
