"""A trained generator in the Hugging Face Hub layout: one folder with `config.json` and `model.safetensors`.

    gen = ZigMaHub.from_config(cfg)                 # cfg: the full resolved config (model, data, flow nodes)
    gen.load_state_dict(ema_state)
    gen.save_pretrained("exports/digits_xs")        # config.json + model.safetensors (+ a README model card)
    gen.push_to_hub("user/digits_xs")               # needs network and `hf auth login`
    gen = ZigMaHub.from_pretrained("exports/digits_xs")   # or a Hub id "user/digits_xs"
    gen.config["flow"]                              # how to sample it

`ZigMaHub` is a `ZigMa` (same forward, same parameter names, so `model.safetensors` is also what
`arcee.sample.load_generator` reads) with huggingface_hub's `PyTorchModelHubMixin`, whose
`config` argument is the whole resolved training config as a plain dict: the `model` node builds
the network, the `data` and `flow` nodes say how to sample it (`sample.py ckpt=<folder or id>`).
"""
from __future__ import annotations

from huggingface_hub import PyTorchModelHubMixin
from omegaconf import OmegaConf

from .build import model_kwargs
from .zigma import ZigMa


class ZigMaHub(ZigMa, PyTorchModelHubMixin, library_name="arcee", tags=["flow-matching", "zigma", "mamba"]):
    """ZigMa built from a full resolved config dict (`config["model"]` gives its arguments)."""

    def __init__(self, config: dict):
        for node in ("model", "data", "flow"):
            if node not in config:
                raise ValueError(f"ZigMaHub: config has no '{node}' node (found: {sorted(config)})")
        super().__init__(**model_kwargs(config["model"]))
        self.config = config

    @classmethod
    def from_config(cls, cfg) -> "ZigMaHub":
        """From an OmegaConf / dict config (interpolations resolved, enums as strings)."""
        if OmegaConf.is_config(cfg):
            cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        return cls(config=dict(cfg))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, strict: bool = True, **kwargs) -> "ZigMaHub":
        """huggingface_hub's `from_pretrained`, strict by default: a missing or unexpected weight raises."""
        return super().from_pretrained(pretrained_model_name_or_path, strict=strict, **kwargs)
