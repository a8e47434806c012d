"""Deployment of a quantized UNet on the integer kernels of an existing engine (issue 17).

- ``describe``: the graph rules shared by every engine: each quantized layer becomes a plain description (signed
  integer weight codes with a per-channel Δ, activation quantizer(s) with per-step or single (Δ, z), smoothing,
  how it runs: int8 exact, int8 after a 7-bit requantization, or FP), the CPU's int8 ISA.
- ``graph``: a traceable torch copy of the UNet built from those descriptions (step index as an input), the
  source of both engine graphs.
- ``elementwise``: the layout the element-wise work runs in ([B, C, H·W] rows views) and the GroupNorm / SiLU
  rewrites for the engine.
- ``openvino``: OpenVINO IR for the CPU and ``load_engine_unet`` (the QuantUNet call contract).
- ``onnx_qdq``: ONNX with QuantizeLinear/DequantizeLinear for TensorRT explicit quantization (checked with ONNX
  Runtime on the CPU) and the TensorRT build/timing, which runs only where tensorrt and CUDA exist.

Engines are optional (``pip install -e ".[deploy]"``; TensorRT: ``pip install -e ".[tensorrt]"`` on a CUDA machine);
every engine import goes through ``require``.
"""
import importlib

from ldm.util import UserError

DEPLOY_EXTRA = 'pip install -e ".[deploy]"'
EXTRAS = {"tensorrt": 'pip install -e ".[tensorrt]"'}   # engines outside the deploy extra: module -> command


def require(module, what=None):
    """Import an engine package, or raise one UserError sentence naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what or module} is not installed; install it with "
                        f"`{EXTRAS.get(module, DEPLOY_EXTRA)}`.") from None
