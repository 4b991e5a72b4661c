"""Transport: one object, built from configs/flow/*.yaml, that the trainer and the sampler share."""
import dataclasses
from collections.abc import Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from .paths import PATHS, TIME_SAMPLERS, _bcast, _check_choice, get_path, sample_time
from .samplers import ODE_SAMPLERS, SDE_SAMPLERS, guided_velocity, sample_ode, sample_sde

SAMPLERS = ODE_SAMPLERS + SDE_SAMPLERS


@dataclasses.dataclass(frozen=True)
class Transport:
    """Path, training-time distribution and default sampler settings (fields = config keys).

    path: "linear" | "gvp". time_sampler: "uniform" | "logit_normal" (mean, std of the logit).
    sampler: "euler" | "heun" | "dopri5" | "euler_maruyama"; steps for the fixed-step ones,
    atol/rtol for dopri5, diffusion for euler_maruyama. Sampling runs over [t_eps, 1 - t_eps]
    (0 by default: both paths are regular at the endpoints). cfg_scale: default guidance.
    """

    path: str = "gvp"
    time_sampler: str = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    sampler: str = "dopri5"
    steps: int = 50
    atol: float = 1e-6
    rtol: float = 1e-3
    diffusion: float = 1.0
    cfg_scale: float = 1.0
    t_eps: float = 0.0
    name: str | None = None  # optional label of the config node (e.g. Hydra group choice)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"flow config {f.name} must be a number, got {value!r}")
            if f.type is float:
                object.__setattr__(self, f.name, float(value))
        _check_choice("path", self.path, PATHS)
        _check_choice("time_sampler", self.time_sampler, TIME_SAMPLERS)
        _check_choice("sampler", self.sampler, SAMPLERS)
        self._check_sampler_settings(self.steps, self.atol, self.rtol, self.diffusion, self.t_eps)
        if not self.logit_normal_std > 0:
            raise ValueError(f"logit_normal_std must be > 0, got {self.logit_normal_std!r}")
        object.__setattr__(self, "_path", get_path(self.path))

    @staticmethod
    def _check_sampler_settings(steps, atol, rtol, diffusion, t_eps):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if not (atol > 0 and rtol > 0):
            raise ValueError(f"atol and rtol must be > 0, got atol={atol!r}, rtol={rtol!r}")
        if not diffusion >= 0:
            raise ValueError(f"diffusion must be >= 0, got {diffusion!r}")
        if not 0 <= t_eps < 0.5:
            raise ValueError(f"t_eps must be in [0, 0.5), got {t_eps!r}")

    @property
    def interpolant(self):
        """The Path object (coefficients, interpolate, velocity, prediction conversions)."""
        return self._path

    def sample_time(self, n, device=None, generator=None):
        """(n,) training times from the configured time sampler."""
        mean, std = self.logit_normal_mean, self.logit_normal_std
        return sample_time(n, self.time_sampler, mean, std, device, generator)

    def training_loss(self, model, x1, model_kwargs=None, generator=None, x0=None, t=None):
        """Per-sample velocity MSE, (b,) fp32. x1: (b, ...) data.

        Draws t ~ time_sampler and x0 ~ N(0, I) (from `generator`) unless given; t: (b,) in [0, 1].
        """
        b, tdtype = x1.shape[0], torch.promote_types(x1.dtype, torch.float32)
        if t is None:
            t = self.sample_time(b, device=x1.device, generator=generator).to(tdtype)
        else:
            t = torch.as_tensor(t, dtype=tdtype)  # checked where it lives: a CPU t costs no device sync
            if t.shape != (b,):
                raise ValueError(f"t must have shape ({b},), got {tuple(t.shape)}")
            if not bool(((t >= 0) & (t <= 1)).all()):
                raise ValueError(f"t must lie in [0, 1], got values in [{t.min().item()}, {t.max().item()}]")
            t = t.to(x1.device, non_blocking=True)
        if x0 is None:
            x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        elif x0.shape != x1.shape:
            raise ValueError(f"x0 must have the shape of x1 {tuple(x1.shape)}, got {tuple(x0.shape)}")
        a, s, da, ds = self._path.coefficients(_bcast(t, x1))
        pred = model(a * x1 + s * x0, t, **(model_kwargs or {}))
        if pred.shape != x1.shape:
            raise ValueError(f"model output shape {tuple(pred.shape)} != input shape {tuple(x1.shape)}")
        return (pred.float() - (da * x1 + ds * x0).float()).square().flatten(1).mean(1)

    def velocity_fn(self, model, y=None, null_class=None, cfg_scale=None):
        """model(x, t, y) -> velocity_fn(x, t), with classifier-free guidance (default cfg_scale)."""
        return guided_velocity(model, y, self.cfg_scale if cfg_scale is None else cfg_scale, null_class)

    def sample(self, velocity_fn, x0, sampler=None, steps=None, atol=None, rtol=None, diffusion=None,
               t_eps=None, generator=None):
        """Noise x0 (b, ...) -> (x1, nfe) with the config's sampler; keyword arguments override it."""
        sampler = self.sampler if sampler is None else sampler
        _check_choice("sampler", sampler, SAMPLERS)
        steps = self.steps if steps is None else steps
        atol = self.atol if atol is None else atol
        rtol = self.rtol if rtol is None else rtol
        diffusion = self.diffusion if diffusion is None else diffusion
        t_eps = self.t_eps if t_eps is None else t_eps
        self._check_sampler_settings(steps, atol, rtol, diffusion, t_eps)
        span = dict(t_start=float(t_eps), t_end=1.0 - t_eps)
        if sampler in SDE_SAMPLERS:
            return sample_sde(velocity_fn, x0, self._path, steps, diffusion, generator=generator, **span)
        return sample_ode(velocity_fn, x0, sampler, steps, atol, rtol, **span)


_FIELDS = tuple(f.name for f in dataclasses.fields(Transport))


def build_transport(cfg=None):
    """Transport from a flow config node (OmegaConf DictConfig or dict); missing keys take defaults."""
    if cfg is None:
        cfg = {}
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise ValueError(f"flow config must be a mapping or DictConfig, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown flow config key(s) {unknown}; allowed: {list(_FIELDS)}")
    return Transport(**cfg)
