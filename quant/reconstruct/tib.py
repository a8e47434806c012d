"""TFMQ-DM's Temporal Information Block (PEERS.md §3.1), found from the model structure.

The TIB is the time MLP h(t) = Linear(SiLU(Linear(sinusoid(t)))) plus the embedding layer g_i = Linear(SiLU(·)) of
every residual block; its output is the tuple (g_1(h(t)), ..., g_n(h(t))). It is a function of t alone: the
class-label embedding that a class-conditional UNet adds to h(t) is no part of it (cin256-v2 and the digits model
condition through cross-attention, so their blocks see exactly h(t)).

``TemporalInformationBlock(unet)`` is that function as a module over the UNet's own (FP or quantized) layers, and
``tib_unit`` makes it a reconstruction unit whose input is the UNet's timestep argument: the streaming driver then
caches t and the FP embeddings like any block's inputs and targets (TIAR, quant.methods.tfmqdm).
"""
from torch import nn

from quant.layers import QuantLinear
from quant.policy import model_family
from quant.reconstruct.units import Unit

# per family: the time MLP (its two linears), the residual block class and its embedding layer
STRUCTURE = {
    "compvis_unet": {"time_mlp": ("time_embed.0", "time_embed.2"), "block": "ResBlock", "embedding": "emb_layers"},
    "ddim_model": {"time_mlp": ("temb.dense.0", "temb.dense.1"), "block": "ResnetBlock", "embedding": "temb_proj"},
}
UNIT_NAME = "temporal_information_block"


def _is_linear(m):
    return isinstance(m, (nn.Linear, QuantLinear))


def embedding_layers(unet, family=None):
    """(name, module) of every residual block's embedding layer in module order (CompVis: ``emb_layers`` =
    Sequential(SiLU, Linear); DDIM: the Linear ``temb_proj``, whose SiLU is applied by the block)."""
    s = STRUCTURE[family or model_family(unet)]
    return [(f"{name}.{s['embedding']}", getattr(m, s["embedding"])) for name, m in unet.named_modules()
            if type(m).__name__ == s["block"] and hasattr(m, s["embedding"])]


def tib_layers(unet, family=None):
    """Names of the TIB's linears: the time MLP's two, then every embedding layer's, in module order."""
    family = family or model_family(unet)
    names = list(STRUCTURE[family]["time_mlp"])
    for name, m in embedding_layers(unet, family):
        names += [name] if _is_linear(m) else [f"{name}.{n}" for n, sub in m.named_children() if _is_linear(sub)]
    return names


def embedding_patterns(family):
    """Glob patterns of the embedding linears inside one residual-block unit (names relative to the block), to
    leave them out of the block's AdaRound after TIAR."""
    return (f"{STRUCTURE[family]['embedding']}*",)


class TemporalInformationBlock(nn.Module):
    """forward(t) -> (g_1(h(t)), ..., g_n(h(t))) over ``unet``'s own layers (references, not copies)."""

    def __init__(self, unet, family=None):
        super().__init__()
        self.family = family or model_family(unet)
        if self.family == "compvis_unet":
            self.time_mlp, self.channels = unet.time_embed, int(unet.model_channels)
        else:
            self.time_mlp, self.channels = unet.temb.dense, int(unet.ch)
        self.embeddings = nn.ModuleList([m for _, m in embedding_layers(unet, self.family)])

    def time_embedding(self, t):
        """h(t)."""
        if self.family == "compvis_unet":
            from ldm.modules.diffusionmodules.util import timestep_embedding
            return self.time_mlp(timestep_embedding(t, self.channels, repeat_only=False))
        from ddim.models.diffusion import get_timestep_embedding, nonlinearity
        return self.time_mlp[1](nonlinearity(self.time_mlp[0](get_timestep_embedding(t, self.channels))))

    def forward(self, t):
        h = self.time_embedding(t)
        if self.family == "compvis_unet":
            return tuple(g(h) for g in self.embeddings)
        from ddim.models.diffusion import nonlinearity
        return tuple(g(nonlinearity(h)) for g in self.embeddings)


def _timesteps(args, kwargs):
    """The timestep argument of a UNet call (CompVis: ``timesteps``; DDIM: ``t``)."""
    if len(args) > 1:
        return args[1]
    return kwargs["timesteps"] if "timesteps" in kwargs else kwargs["t"]


def tib_unit(family):
    """The TIB as a reconstruction unit: hooked on the UNet itself, it takes only the call's timesteps."""
    return Unit(UNIT_NAME, kind="tib", hook="", build=lambda model: TemporalInformationBlock(model, family),
                select=lambda args, kwargs: ((_timesteps(args, kwargs),), {}))
