"""Interpolation paths x_t = alpha_t x1 + sigma_t x0 and training-time samplers.

Convention: noise x0 ~ N(0, I) at t = 0, data x1 at t = 1. The regression target is the
path's velocity u_t = alpha'_t x1 + sigma'_t x0 (REFERENCE.md section 3).
"""
import math

import torch

PATHS = ("linear", "gvp")
TIME_SAMPLERS = ("uniform", "logit_normal")


def _check_choice(kind, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {list(allowed)}")


def _bcast(t, x):
    """t: float, 0-d or (b,) tensor -> a tensor broadcastable against x (b, ...)."""
    t = torch.as_tensor(t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim == 1 else t


class Path:
    """An interpolant given by (alpha_t, sigma_t) with alpha_0 = sigma_1 = 0, alpha_1 = sigma_0 = 1.

    All methods take x of shape (b, ...) and t as a float, 0-d tensor or (b,) tensor in [0, 1].
    """

    name = None

    def coefficients(self, t):
        """-> (alpha, sigma, d alpha/dt, d sigma/dt), each shaped like t."""
        raise NotImplementedError

    def interpolate(self, x0, x1, t):
        a, s, _, _ = self.coefficients(_bcast(t, x1))
        return a * x1 + s * x0

    def velocity(self, x0, x1, t):
        """Target d x_t / dt = alpha' x1 + sigma' x0."""
        _, _, da, ds = self.coefficients(_bcast(t, x1))
        return da * x1 + ds * x0

    # Prediction conversions. Given x_t and a velocity v = alpha' x1 + sigma' x0 (for a trained
    # model: E[v | x_t]), solve the 2x2 system [alpha sigma; alpha' sigma'] [x1; x0] = [x_t; v].
    # det = alpha sigma' - sigma alpha' is -1 (linear) and -pi/2 (gvp): never singular.
    # With v = E[u | x_t] these are E[x1 | x_t] and E[x0 | x_t] exactly (the system is linear).
    def data_from_velocity(self, x, v, t):
        """E[x1 | x_t] from the velocity: (sigma' x - sigma v) / det."""
        a, s, da, ds = self.coefficients(_bcast(t, x))
        return (ds * x - s * v) / (a * ds - s * da)

    def noise_from_velocity(self, x, v, t):
        """E[x0 | x_t] from the velocity: (alpha v - alpha' x) / det."""
        a, s, da, ds = self.coefficients(_bcast(t, x))
        return (a * v - da * x) / (a * ds - s * da)

    def score_from_velocity(self, x, v, t):
        """grad log p_t(x) = -E[x0 | x_t] / sigma_t (Tweedie). Singular at t = 1 (sigma = 0)."""
        _, s, _, _ = self.coefficients(_bcast(t, x))
        return -self.noise_from_velocity(x, v, t) / s


class LinearPath(Path):
    """alpha = t, sigma = 1 - t (rectified flow / SiT "Linear")."""

    name = "linear"

    def coefficients(self, t):
        one = torch.ones_like(t)
        return t, 1 - t, one, -one


class GVPPath(Path):
    """alpha = sin(pi t / 2), sigma = cos(pi t / 2): variance preserving (the paper's path)."""

    name = "gvp"

    def coefficients(self, t):
        c = math.pi / 2
        sin, cos = torch.sin(c * t), torch.cos(c * t)
        return sin, cos, c * cos, -c * sin


def get_path(name):
    _check_choice("path", name, PATHS)
    return {"linear": LinearPath, "gvp": GVPPath}[name]()


def sample_time(n, kind="uniform", mean=0.0, std=1.0, device=None, generator=None):
    """Training times, (n,) float32 in [0, 1]: U[0, 1] or sigmoid(N(mean, std^2)) (logit-normal)."""
    _check_choice("time_sampler", kind, TIME_SAMPLERS)
    if kind == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if not std > 0:
        raise ValueError(f"logit_normal_std must be > 0, got {std!r}")
    return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))
