"""`build_model`: a model config node (configs/model/*.yaml, OmegaConf or dict) -> ZigMa."""
import inspect
from collections.abc import Mapping

from omegaconf import OmegaConf

from .zigma import ZigMa

_IGNORED = ("name", "defaults")  # bookkeeping keys of the config file, not model arguments


def build_model(cfg) -> ZigMa:
    """Build the backbone from a model config node. Interpolations are resolved (inside a
    composed config `${oc.select:data.image_size,32}` reads the data node); `dt_rank: auto`
    means ceil(width / 16). Unknown or missing keys raise ValueError naming them."""
    return ZigMa(**model_kwargs(cfg))


def model_kwargs(cfg) -> dict:
    """ZigMa's keyword arguments from a model config node (checked; see `build_model`)."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"build_model expects a model config node (DictConfig or dict), got {type(cfg).__name__}")
    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.create(dict(cfg))
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in _IGNORED}
    params = inspect.signature(ZigMa).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"model config: unknown key(s) {unknown}; known: {sorted(params)}")
    missing = [k for k, p in params.items() if p.default is p.empty and k not in kwargs]
    if missing:
        raise ValueError(f"model config: missing key(s) {missing}")
    if kwargs.get("dt_rank") == "auto":
        kwargs["dt_rank"] = None  # the mixer uses ceil(width / 16)
    return kwargs
