"""Quantization substrate and methods (EfficientDM, MPQ-DM, MPQ-DM+) for CompVis latent-diffusion UNets."""
from quant.api import (QuantConfig, QuantUNet, build_from_meta, config_from_dict, config_to_dict,  # noqa: F401
                       convert_schedule, get_method, load_quantized, make_config, quantize_, register_method,
                       save_quantized)
from quant.stages.calibrate import calibrate, draw_calibration_batch  # noqa: F401
from quant.stages.optim import param_groups  # noqa: F401
from quant.step import StepTable, current_step, step_scope  # noqa: F401
