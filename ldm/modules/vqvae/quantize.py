"""VectorQuantizer2: nearest-codebook quantization with a straight-through estimator (taming semantics).

Own implementation of the taming-transformers quantizer used by the LDM VQ first stages; only the remap=None
path is supported (that is what every LDM config uses).
"""
import torch
import torch.nn as nn


class VectorQuantizer2(nn.Module):
    def __init__(self, n_e, e_dim, beta, remap=None, unknown_index="random", sane_index_shape=False, legacy=True):
        super().__init__()
        if remap is not None:
            raise NotImplementedError("VectorQuantizer2: codebook remapping (remap) is not supported")
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.remap = None
        self.re_embed = n_e
        self.sane_index_shape = sane_index_shape
        self.embedding = nn.Embedding(n_e, e_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)

    def distances(self, z_flat):
        """Squared distances |z|^2 + |e|^2 - 2 z.e, shape (N, n_e), computed in that order as the original."""
        w = self.embedding.weight
        return (torch.sum(z_flat ** 2, dim=1, keepdim=True) + torch.sum(w ** 2, dim=1)
                - 2 * torch.einsum("bd,dn->bn", z_flat, w.t()))

    def forward(self, z, temp=None, rescale_logits=False, return_logits=False):
        assert temp is None or temp == 1.0, "only for interface compatible with Gumbel"
        assert not rescale_logits and not return_logits, "only for interface compatible with Gumbel"
        z = z.permute(0, 2, 3, 1).contiguous()  # b h w c
        z_flat = z.view(-1, self.e_dim)
        indices = torch.argmin(self.distances(z_flat), dim=1)
        z_q = self.embedding(indices).view(z.shape)

        commit = torch.mean((z_q.detach() - z) ** 2)
        codebook = torch.mean((z_q - z.detach()) ** 2)
        # legacy placement puts beta on the codebook term (a historical bug kept for checkpoint compatibility)
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook

        z_q = z + (z_q - z).detach()  # straight-through gradient
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        if self.sane_index_shape:
            indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices, shape):
        """indices -> z_q; shape is (batch, height, width, channel) or None."""
        z_q = self.embedding(indices.reshape(-1))
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q
