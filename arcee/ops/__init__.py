"""arcee.ops: the state-passing selective scan (reference, fast CPU path, fused Triton kernels)."""
from .scan_ref import selective_scan_ref
from .selective_scan import BACKENDS, DeviceMismatchError, selective_scan_fn

__all__ = ["selective_scan_fn", "selective_scan_ref", "BACKENDS", "DeviceMismatchError"]
