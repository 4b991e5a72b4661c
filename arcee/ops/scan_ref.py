"""Sequential PyTorch selective scan with a differentiable initial and final state: the oracle.

One Python step per time step, autograd through all of it; float64-capable. State and
accumulation are fp32 whatever the input dtype (fp64 for fp64 inputs). REFERENCE.md section 1.
"""
import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the state and every reduction for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None):
    """u, delta, z: (b, d, l); A: (d, n); B, C: (b, g, n, l) or (b, n, l); D, delta_bias: (d,);
    initial_state: (b, d, n) or None (zeros).

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,  y_t = C_t . h_t + D u_t,  out_t = y_t silu(z_t).
    Returns out (b, d, l) in u's dtype, and h_T (b, d, n) fp32 (fp64) if return_last_state.
    Inputs are not validated here: `selective_scan_fn` does that.
    """
    dtype_in, ct = u.dtype, compute_dtype(u.dtype)
    b, d, l = u.shape
    u, delta, A = u.to(ct), delta.to(ct), A.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)  # threshold 20: identity above
    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    g = B.shape[1]
    B = B.to(ct).repeat_interleave(d // g, dim=1)  # (b, d, n, l): channel c uses group c // (d/g)
    C = C.to(ct).repeat_interleave(d // g, dim=1)

    a = torch.exp(delta[:, :, None, :] * A[:, :, None])  # (b, d, n, l)
    x = (delta * u)[:, :, None, :] * B  # (b, d, n, l)
    h = u.new_zeros(b, d, A.shape[1]) if initial_state is None else initial_state.to(ct)
    ys = []
    for a_t, x_t, C_t in zip(a.unbind(-1), x.unbind(-1), C.unbind(-1)):  # unbind: one stack backward
        h = a_t * h + x_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    out = y if D is None else y + u * D.to(ct)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ct))
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out
