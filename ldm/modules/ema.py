"""Exponential moving average of a module's parameters, stored as buffers (CompVis `LitEma` layout).

Buffer names are the parameter names without dots (`diffusion_modeltime_embed0weight`), preceded by
`decay` (float32) and `num_updates` (int32), so checkpoints' `model_ema.*` keys load unchanged.
"""
import torch
import torch.nn as nn


class LitEma(nn.Module):
    def __init__(self, model, decay=0.9999, use_num_upates=True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError("Decay must be between 0 and 1")
        self.m_name2s_name = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.clone().detach().data)
        self.collected_params = []

    @torch.no_grad()
    def forward(self, model):
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            n = int(self.num_updates)
            decay = min(decay, (1 + n) / (10 + n))  # warm-up: average faster early on
        one_minus_decay = 1.0 - decay
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if p.requires_grad:
                s = shadow[self.m_name2s_name[name]]
                s.sub_(one_minus_decay * (s - p.to(s.dtype)))
            else:
                assert name not in self.m_name2s_name

    def copy_to(self, model):
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data.copy_(shadow[self.m_name2s_name[name]].data)
            else:
                assert name not in self.m_name2s_name

    def store(self, parameters):
        self.collected_params = [param.clone() for param in parameters]

    def restore(self, parameters):
        for c_param, param in zip(self.collected_params, parameters):
            param.data.copy_(c_param.data)
        self.collected_params = []
