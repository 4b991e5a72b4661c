"""arcee.models: scan orders, the Mamba mixer, the ZigMa backbone with the Arcee state chain."""
from .build import build_model
from .mamba import Mamba
from .scan_orders import SCAN_ORDERS, get_scan_orders
from .zigma import BOUNDARY_MAPS, ZigMa

__all__ = ["build_model", "get_scan_orders", "SCAN_ORDERS", "Mamba", "ZigMa", "BOUNDARY_MAPS"]
