"""arcee.flow: interpolation paths, time samplers, the velocity loss, ODE/SDE samplers, Transport.

    transport = build_transport(flow_cfg)                 # configs/flow/*.yaml
    loss = transport.training_loss(model, x1)             # (b,) per-sample velocity MSE
    x1, nfe = transport.sample(velocity_fn, x0)           # sampler settings from the config
    x1, nfe = sample_ode(velocity_fn, x0, sampler="heun", steps=50)
"""
from .paths import PATHS, TIME_SAMPLERS, GVPPath, LinearPath, Path, get_path, sample_time
from .samplers import ODE_SAMPLERS, SDE_SAMPLERS, guided_velocity, sample_ode, sample_sde
from .transport import SAMPLERS, Transport, build_transport

__all__ = [
    "PATHS", "TIME_SAMPLERS", "ODE_SAMPLERS", "SDE_SAMPLERS", "SAMPLERS",
    "Path", "LinearPath", "GVPPath", "get_path", "sample_time",
    "sample_ode", "sample_sde", "guided_velocity", "Transport", "build_transport",
]
