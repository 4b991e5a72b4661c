"""Samplers for dx/dt = v(x, t) from noise (t = 0) to data (t = 1), with honest NFE counts.

NFE is the number of `velocity_fn` calls actually made: Euler = steps, Heun = 2 * steps - 1
(its last step is a plain Euler step, as in EDM / SiT), dopri5 = whatever the adaptive solver
used (counted through a wrapper; the anchors' "50 NFE" were 50 output points, not calls).
Under classifier-free guidance one call is one batched (cond + uncond) model forward.
"""
import math

import torch
from torchdiffeq import odeint

ODE_SAMPLERS = ("euler", "heun", "dopri5")
SDE_SAMPLERS = ("euler_maruyama",)


def _check_steps(steps):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _check_span(t_start, t_end):
    if not 0.0 <= t_start < t_end <= 1.0:
        raise ValueError(f"need 0 <= t_start < t_end <= 1, got t_start={t_start!r}, t_end={t_end!r}")


def _check_x0(x0):
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.ndim < 1:
        raise ValueError(f"x0 must be a floating-point tensor of shape (b, ...), got {x0!r:.80}")


def _time(t, x):
    """A (b,) time tensor in x's dtype (at least fp32) for velocity_fn."""
    return torch.full((x.shape[0],), t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


def _grid(t_start, t_end, steps):
    return [t_start + (t_end - t_start) * i / steps for i in range(steps + 1)]


def sample_ode(velocity_fn, x0, sampler="heun", steps=50, atol=1e-6, rtol=1e-3, t_start=0.0, t_end=1.0):
    """Integrate dx/dt = velocity_fn(x, t) from t_start to t_end.

    velocity_fn(x: (b, ...), t: (b,)) -> (b, ...). x0: (b, ...) noise. `steps` sets the uniform
    grid of euler/heun; atol/rtol drive dopri5 (torchdiffeq, RMS error norm over the whole batch).
    Returns (x1: (b, ...), nfe: int).
    """
    if sampler not in ODE_SAMPLERS:
        hint = " (an SDE sampler: use Transport.sample)" if sampler in SDE_SAMPLERS else ""
        raise ValueError(f"unknown sampler {sampler!r}{hint}; expected one of {list(ODE_SAMPLERS)}")
    _check_x0(x0)
    _check_span(t_start, t_end)
    if sampler == "dopri5":
        if not (atol > 0 and rtol > 0):
            raise ValueError(f"atol and rtol must be > 0, got atol={atol!r}, rtol={rtol!r}")
        return _dopri5(velocity_fn, x0, atol, rtol, t_start, t_end)
    _check_steps(steps)
    ts, x, nfe = _grid(t_start, t_end, steps), x0, 0
    for i in range(steps):
        h = ts[i + 1] - ts[i]
        v = velocity_fn(x, _time(ts[i], x))
        nfe += 1
        if sampler == "euler" or i == steps - 1:  # Heun's last step is Euler: 2 * steps - 1 calls
            x = x + h * v
        else:
            v_next = velocity_fn(x + h * v, _time(ts[i + 1], x))
            nfe += 1
            x = x + (0.5 * h) * (v + v_next)
    return x, nfe


def _dopri5(velocity_fn, x0, atol, rtol, t_start, t_end):
    nfe = 0
    dtype = torch.promote_types(x0.dtype, torch.float32)

    def f(t, x):
        nonlocal nfe
        nfe += 1
        return velocity_fn(x, t.to(dtype).expand(x.shape[0]))

    t = torch.tensor([t_start, t_end], dtype=dtype, device=x0.device)
    # step_t makes the last step land on t_end: by default torchdiffeq steps past it and
    # interpolates back, evaluating the model at t > 1, outside its training range.
    x1 = odeint(f, x0, t, method="dopri5", atol=atol, rtol=rtol, options={"step_t": t[1:]})[-1]
    return x1, nfe


def sample_sde(velocity_fn, x0, path, steps=250, diffusion=1.0, t_start=0.0, t_end=1.0, generator=None):
    """Euler-Maruyama for an SDE with the same marginals p_t as the probability-flow ODE.

    For any g(t) >= 0, dx = [v + g^2/2 * score] dt + g dW keeps p_t (Fokker-Planck: the added
    g^2/2 (div(p score) - lap p) vanishes because p score = grad p). The score
    -E[x0 | x_t] / sigma_t is singular at t = 1; we take g(t)^2 = diffusion * sigma_t, so the
    drift v - diffusion / 2 * E[x0 | x_t] stays bounded and the noise vanishes at t = 1.
    The last step adds no noise. NFE = steps. Returns (x1, nfe).
    """
    _check_x0(x0)
    _check_steps(steps)
    _check_span(t_start, t_end)
    if not diffusion >= 0:
        raise ValueError(f"diffusion must be >= 0, got {diffusion!r}")
    ts, x = _grid(t_start, t_end, steps), x0
    for i in range(steps):
        t, h = ts[i], ts[i + 1] - ts[i]
        tt = _time(t, x)
        v = velocity_fn(x, tt)
        x = x + h * (v - (0.5 * diffusion) * path.noise_from_velocity(x, v, tt))
        if i < steps - 1 and diffusion > 0:
            sigma = path.coefficients(torch.tensor(t, dtype=torch.float64))[1].item()  # host-side float
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + math.sqrt(diffusion * sigma * h) * noise
    return x, steps


def guided_velocity(model, y, scale, null_class):
    """Classifier-free guidance: v = v_uncond + scale * (v_cond - v_uncond), as velocity_fn(x, t).

    model(x, t, y=...) -> v. y: (b,) class labels; null_class: the label of the dropped class.
    scale == 1 returns the conditional model itself (exactly, one batch-b forward); otherwise
    cond and uncond run in one forward of batch 2b (one NFE). scale 0 is unconditional.
    """
    if scale == 1:
        return lambda x, t: model(x, t, y=y)
    if y is None:
        raise ValueError(f"classifier-free guidance with scale={scale!r} needs class labels y, got None")
    y2 = torch.cat([y, torch.full_like(y, null_class)])

    def velocity_fn(x, t):
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), y=y2).chunk(2)
        return torch.lerp(uncond, cond, scale)

    return velocity_fn
