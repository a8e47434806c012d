"""Deployment of a quantized UNet on the integer kernels of an existing engine (issue 17).

- ``describe``: the graph rules shared by every engine: each quantized layer becomes a plain description (signed
  integer weight codes with a per-channel Δ, activation quantizer(s) with per-step or single (Δ, z), smoothing,
  how it runs: int8 exact, int8 after a 7-bit requantization, or FP), the CPU's int8 ISA.
- ``graph``: a traceable torch copy of the UNet built from those descriptions (step index as an input,
  GroupNorm as reshape + layer_norm + affine), the source of both engine graphs.
- ``openvino``: OpenVINO IR for the CPU and ``load_engine_unet`` (the QuantUNet call contract).
- ``onnx_qdq``: ONNX with QuantizeLinear/DequantizeLinear for TensorRT explicit quantization (checked with ONNX
  Runtime on the CPU) and the TensorRT build/timing, which runs only where tensorrt and CUDA exist.

Engines are optional (``pip install -e ".[deploy]"``); every engine import goes through ``require``.
"""
import importlib

from ldm.util import UserError

DEPLOY_EXTRA = 'pip install -e ".[deploy]"'


def require(module, what=None):
    """Import an engine package, or raise one UserError sentence naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what or module} is not installed; install the deployment engines with "
                        f"`{DEPLOY_EXTRA}`.") from None
