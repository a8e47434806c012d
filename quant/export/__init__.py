"""Shipping a quantized UNet: the packed low-bit safetensors file (packed.py) and its bit layout (packing.py)."""
from quant.export.packed import (PackedLayer, export_quantized, load_export, read_header,  # noqa: F401
                                 snap_zero_points_, theoretical_bytes)
