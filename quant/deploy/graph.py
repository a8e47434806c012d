"""A traceable torch copy of the quantized UNet, the single source of the OpenVINO and the ONNX Q/DQ graphs.

Each quantized layer becomes an ``EngineLayer`` built from its ``describe.LayerExport``; the sampling-step index
is a graph input (``DeployUNet.forward(x, timesteps, context, step)``), read by every layer through one shared
holder, never a module counter. Per part p and step k (rule 4 of issue 17: the quantizer of the integer kernel
has a FIXED code range; the per-step Δ_k, z_k act only as float scalars around it):

    u  = X_p ⊙ (1/s_p)/Δ_k + z_k                       float, Δ_k, z_k gathered from [S] tables by the step input
    c  = quantize(u) ∈ [0, 2^bits − 1]                  fixed range: FakeQuantize (OpenVINO) / Q-DQ (ONNX)
    y += Δ_k · conv(c, q_p)·Δw_p − Δ_k·z_k · K_p         K_p = conv(1_pad, Ŵ_p), Ŵ_p = q_p·Δw_p

The integer conv pads its codes with 0 where the fake-quant conv pads X̂ with 0 (code z_k), so K_p is the
border-aware map conv(1_pad, Ŵ_p) over the output positions (one number per output for a linear), a constant of
the graph (the latent size is static): O·Ho·Wo floats per conv. (Padding X with zeros before the quantizer would
make K one number per channel, but the CPU plugin runs that Pad as a reference kernel: 41 ms of 460 ms on digits.)
ONNX/TensorRT wants symmetric int8 codes: c − 128 for 8-bit activations, with (128 − z_k)·K_p in place of
−z_k·K_p (exact); codes of fewer bits fit int8 as they are.
The element-wise work around each conv runs on the rows view of its maps and GroupNorm / SiLU are rewritten for
the engine (rules 3 and 5, ``elementwise``).
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from quant.api import set_submodule
from quant.deploy.elementwise import channel_vector, engine_functions, rewrite_for_engine, rows

FLAVORS = ("openvino", "qdq")


class StepHolder:
    """The step-index tensor of the current DeployUNet call, shared by every EngineLayer."""
    index = None


class _DQWeight(torch.autograd.Function):
    """int8 weight codes times per-channel Δ; exported to ONNX as DequantizeLinear(int8, Δ, axis 0)."""

    @staticmethod
    def forward(ctx, q, delta):
        return q.to(torch.float32) * delta.view((-1,) + (1,) * (q.dim() - 1))

    @staticmethod
    def symbolic(g, q, delta):
        zp = g.op("Constant", value_t=torch.zeros(delta.type().sizes(), dtype=torch.int8))
        return g.op("DequantizeLinear", q, delta, zp, axis_i=0)


class _QDQCodes(torch.autograd.Function):
    """Round-to-nearest-even and saturate to int8 (values are already integers in range after the clip);
    exported as QuantizeLinear/DequantizeLinear with scale 1, zero point 0 (TensorRT's explicit quantization)."""

    @staticmethod
    def forward(ctx, u):
        return torch.round(u).clamp_(-128, 127)

    @staticmethod
    def symbolic(g, u):
        scale = g.op("Constant", value_t=torch.tensor(1.0))
        zp = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", u, scale, zp), scale, zp)


class EngineLayer(nn.Module):
    """One quantized conv/linear of the engine graph (see the module docstring for the arithmetic)."""

    def __init__(self, desc, steps: StepHolder, flavor):
        super().__init__()
        if flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {flavor!r}")
        self.name, self.kind, self.op_args, self.flavor, self.steps = desc.name, desc.kind, desc.op_args, flavor, steps
        self.register_buffer("bias", desc.bias)
        self.parts = []
        for i, part in enumerate(desc.parts):
            tag = f"p{i}_"
            self.register_buffer(tag + "q", part.weight.q.to(torch.int8 if part.mode != "fp" else torch.int16))
            self.register_buffer(tag + "wdelta", part.weight.delta.float())
            if part.act is not None:
                self.register_buffer(tag + "adelta", part.act.delta.float())
                self.register_buffer(tag + "azero", part.act.zero.float())
            self.register_buffer(tag + "sinv", None if part.smooth_inv is None else part.smooth_inv.float())
            w_hat = part.weight.dequantized()
            if self.kind == "linear":
                k_src = w_hat.sum(1)                                   # K = Ŵ·1, one number per output
            elif self.op_args["groups"] == 1:
                k_src = w_hat.sum(1, keepdim=True)                     # per-position kernel sums S[o, 1, k...]
            else:
                k_src = w_hat
            self.register_buffer(tag + "ksrc", k_src)
            self.parts.append({"tag": tag, "start": part.start, "stop": part.stop, "mode": part.mode,
                               "hi": None if part.act is None else part.act.hi,
                               "single": part.act is not None and not part.act.per_step})

    # ---- helpers -----------------------------------------------------------------------------------
    def _buf(self, p, name):
        return getattr(self, p["tag"] + name)

    def _scales(self, p):
        """(Δ_k, z_k) as runtime scalars. A single-set quantizer reads entry step·0: the same runtime pattern as the
        per-step ones (with constant scales the CPU plugin folds them into the kernels, which measured 3x further
        from the fake-quant model on digits, cause not isolated)."""
        delta, zero = self._buf(p, "adelta"), self._buf(p, "azero")
        k = self.steps.index * 0 if p["single"] else self.steps.index
        return delta[k], zero[k]

    def _w_hat(self, p):
        q, d = self._buf(p, "q"), self._buf(p, "wdelta")
        return q.to(torch.float32) * d.view((-1,) + (1,) * (q.dim() - 1))

    def _op(self, x, w, groups=None):
        if self.kind == "linear":
            return F.linear(x, w)
        a = self.op_args
        conv = F.conv2d if self.kind == "conv" else F.conv1d
        return conv(x, w, None, a["stride"], a["padding"], a["dilation"], a["groups"] if groups is None else groups)

    def _view(self, x):
        """Where the element-wise work runs: a linear's input as it is (channels last), a conv's rows view."""
        return x if self.kind == "linear" else rows(x)

    def _out_bias(self, bias, x):
        """The bias against the output's view (for input x)."""
        return bias if self.kind == "linear" else channel_vector(bias, self._out_shape(x))

    def _out_shape(self, x):
        """A conv's output shape for input x, batch -1 (channels and map size are static in a graph)."""
        k_src, a = self._buf(self.parts[0], "ksrc"), self.op_args
        size = [(int(n) + 2 * a["padding"][i] - a["dilation"][i] * (k_src.shape[2 + i] - 1) - 1) // a["stride"][i] + 1
                for i, n in enumerate(x.shape[2:])]
        return (-1, int(k_src.shape[0])) + tuple(size)

    def _k_term(self, p, x):
        """K = conv(1_pad, Ŵ) in the output's view: one number per output for a linear; for a conv the
        border-aware map over the output positions, made once from the input's size (static in the graph: the
        eager pass before tracing builds it) and stored as a constant; a map computed in the graph from a ones
        tensor would be re-prepared on every call under the dynamic batch (≈1 ms per layer measured)."""
        k_src = self._buf(p, "ksrc")
        if self.kind == "linear":
            return k_src
        name = p["tag"] + "kmap"
        kmap = getattr(self, name, None)
        if kmap is None or tuple(kmap.shape[2:]) != self._out_shape(x)[2:]:
            groups = 1 if self.op_args["groups"] == 1 else None
            ones = torch.ones((1, 1 if groups == 1 else k_src.shape[1] * self.op_args["groups"]) + tuple(x.shape[2:]))
            with torch.no_grad():
                kmap = self._op(ones, k_src, groups=groups).contiguous()
            self.register_buffer(name, kmap)
        return rows(kmap)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, x):
        """Sum of the parts' outputs, in the output's element-wise view, reshaped to the output once at the end."""
        y = None
        cdim = -1 if self.kind == "linear" else 1   # a linear's channels are last ([B, tokens, C] in attention)
        for i, p in enumerate(self.parts):
            whole = p["start"] == 0 and p["stop"] == x.shape[cdim]
            xp = x if whole else x.narrow(cdim, p["start"], p["stop"] - p["start"])
            bias = self.bias if i == 0 else None
            out = self._fp_part(p, xp, bias) if p["mode"] == "fp" else self._int_part(p, xp, bias)
            y = out if y is None else y + out
        return y if self.kind == "linear" else y.reshape(self._out_shape(x))

    def _apply(self, c, shape, w):
        """The layer's op on values held in the input's view; the result in the output's view."""
        if self.kind == "linear":
            return self._op(c, w)
        return rows(self._op(c if c.shape == shape else c.reshape(shape), w))

    def _scaled(self, p, x, delta, shape):
        sinv = self._buf(p, "sinv")
        if sinv is not None:
            x = x * (sinv if self.kind == "linear" else channel_vector(sinv, shape))
        return x / delta

    def _fp_part(self, p, x, bias):
        """Float fake quantization and a float conv (activation off, or a layer kept FP by rule 2)."""
        shape, v = x.shape, self._view(x)
        if p["hi"] is not None:
            delta, zero = self._scales(p)
            v = (torch.clamp(torch.round(self._scaled(p, v, delta, shape)) + zero, 0, p["hi"]) - zero) * delta
        y = self._apply(v, shape, self._w_hat(p))
        return y if bias is None else y + self._out_bias(bias, x)

    def _int_part(self, p, x, bias):
        """y = Δ_k·conv(c, Ŵ) + (b − Δ_k·z'_k·K): one scalar multiply and one small broadcast add after the
        integer kernel (z'_k = z_k, or z_k − 128 for the shifted int8 codes of the Q/DQ graph)."""
        delta, zero = self._scales(p)
        u = self._scaled(p, self._view(x), delta, x.shape) + zero
        if self.flavor == "openvino":
            c = torch.fake_quantize_per_tensor_affine(u, 1.0, 0, 0, p["hi"])
            w = self._w_hat(p)
            offset = zero
        else:   # Q/DQ of the codes right before the conv, in its 4D shape: TensorRT fuses DQ -> Conv into INT8
            shift = 128 if p["hi"] > 127 else 0
            c = _QDQCodes.apply(torch.clamp(u if self.kind == "linear" else u.reshape(x.shape), 0, p["hi"]) - shift)
            w = _DQWeight.apply(self._buf(p, "q"), self._buf(p, "wdelta"))
            offset = zero - shift
        shift_term = (-(delta * offset)) * self._k_term(p, x)
        if bias is not None:
            shift_term = shift_term + self._out_bias(bias, x)
        return self._apply(c, x.shape, w) * delta + shift_term


class DeployUNet(nn.Module):
    """forward(x, timesteps, context, step): the UNet with engine layers; step = sampling-step index (int64)."""

    def __init__(self, unet, steps: StepHolder, timesteps):
        super().__init__()
        self.unet, self.steps = unet, steps
        self.timesteps = list(timesteps)

    def forward(self, x, timesteps, context=None, step=None):
        self.steps.index = step
        try:
            with engine_functions():   # the DDIM Model's forward takes no context argument
                return self.unet(x, timesteps, **({} if context is None else {"context": context}))
        finally:
            self.steps.index = None


@torch.no_grad()
def build_deploy_unet(qunet, layers, flavor="openvino"):
    """DeployUNet from a QuantUNet (fake-quant or packed) and its decided LayerExports. The QuantUNet is left
    intact; its quantized layers are replaced in a copy, GroupNorms and SiLUs rewritten."""
    # the quantized layers are not copied (deepcopy memo), only replaced: a cin256-size UNet is 1.6 GB in float
    by_name = dict(qunet.unet.named_modules())
    unet = copy.deepcopy(qunet.unet, memo={id(by_name[d.name]): nn.Identity() for d in layers})
    steps = StepHolder()
    for desc in layers:
        set_submodule(unet, desc.name, EngineLayer(desc, steps, flavor))
    rewrite_for_engine(unet)
    return DeployUNet(unet.eval(), steps, qunet.table.timesteps).eval()


@torch.no_grad()
def build_fp_deploy_unet(unet, timesteps=None):
    """The FP UNet with the same graph rules (GroupNorm and SiLU rewrites), same call signature; the step is
    ignored."""
    unet = rewrite_for_engine(copy.deepcopy(unet))
    return DeployUNet(unet.eval(), StepHolder(), timesteps or []).eval()
