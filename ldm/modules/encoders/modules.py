"""Conditioning encoders: ClassEmbedder (class-conditional LDMs) and FrozenCLIPEmbedder (Stable Diffusion v1)."""
import os

import torch
import torch.nn as nn

from ldm.util import UserError


class AbstractEncoder(nn.Module):
    def encode(self, *args, **kwargs):
        raise NotImplementedError


class ClassEmbedder(nn.Module):
    """c = embedding(batch[key])[:, None]: one context token of width embed_dim per sample."""

    def __init__(self, embed_dim, n_classes=1000, key="class"):
        super().__init__()
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch, key=None):
        labels = batch[key or self.key]
        return self.embedding(labels[:, None])


# Text tower of CLIP ViT-L/14, as SD v1 uses it (transformers CLIPTextConfig fields).
CLIP_VIT_L14_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                layer_norm_eps=1e-5, projection_dim=768, bos_token_id=0, eos_token_id=2,
                                pad_token_id=1)


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise UserError("FrozenCLIPEmbedder needs the `transformers` package: install it with "
                        "`pip install transformers` (or the project's [clip] extra).") from err
    return transformers


class _TextModelHolder(nn.Module):
    """transformers >= 5 flattened CLIPTextModel (no `text_model` child); this restores the key layout
    `text_model.*` of the SD checkpoints."""

    def __init__(self, text_model):
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids):
        return self.text_model(input_ids=input_ids)


def _text_model(tf, config):
    model = tf.CLIPTextModel(config)
    return model if isinstance(getattr(model, "text_model", None), nn.Module) else _TextModelHolder(model)


def _local_tokenizer_dir(version):
    """`version` as a local tokenizer folder (absolute, or relative to the working directory or to the repository
    root, so a config can name a shipped tokenizer), else None (a Hugging Face id)."""
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    for path in (version, os.path.join(repo_root, version)):
        if os.path.isfile(os.path.join(path, "vocab.json")):
            return path
    return None


class FrozenCLIPEmbedder(AbstractEncoder):
    """CLIP text encoder whose last hidden state ([B, 77, 768]) is the SD v1 cross-attention context.

    The text model is built from the ViT-L/14 config rather than downloaded: the SD checkpoint carries its
    weights (`cond_stage_model.transformer.text_model.*`). The tokenizer is loaded lazily from `version` (a local
    folder with vocab.json and merges.txt, absolute or relative to the repository root, else a Hugging Face id from
    its cache), only when text strings are encoded; token-id tensors can be passed directly.
    """

    def __init__(self, version="openai/clip-vit-large-patch14", device=None, max_length=77, text_config=None,
                 tokenizer=None):
        super().__init__()
        tf = _transformers()
        self.version = version
        self.max_length = max_length
        self.transformer = _text_model(tf, tf.CLIPTextConfig(**(text_config or CLIP_VIT_L14_TEXT_CONFIG)))
        # official SD checkpoints store position_ids (persistent in transformers < 4.31): keep it in the state dict
        emb = self.transformer.text_model.embeddings
        emb.register_buffer("position_ids", emb.position_ids, persistent=True)
        self._tokenizer = tokenizer
        self.freeze()

    def freeze(self):
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    def train(self, mode=True):
        # frozen: stays in eval mode (no dropout) whatever the parent does
        return super().train(False)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            tf = _transformers()
            source = _local_tokenizer_dir(self.version) or self.version
            try:
                self._tokenizer = tf.CLIPTokenizer.from_pretrained(source)
            except Exception as err:  # offline / not cached
                raise UserError(f"could not load the CLIP tokenizer {self.version!r} ({type(err).__name__}); "
                                "install the clip extra (`pip install -e .[clip]`) and put the tokenizer files "
                                "(vocab.json, merges.txt) of openai/clip-vit-large-patch14 in a folder passed as "
                                "cond_stage_config.params.version, or fill the Hugging Face cache by running once "
                                "with internet access.") from err
        return self._tokenizer

    def tokenize(self, text):
        """Strings -> ids [B, max_length]: SOT, tokens (truncated), EOT, then EOT padding (CLIP's pad token)."""
        tok = self.tokenizer
        ids = tok(list(text), truncation=True, max_length=self.max_length, padding=False)["input_ids"]
        eot = tok.eos_token_id
        rows = [seq + [eot] * (self.max_length - len(seq)) for seq in ids]
        return torch.tensor(rows, dtype=torch.long)

    def forward(self, text):
        if isinstance(text, str):
            text = [text]
        tokens = text if torch.is_tensor(text) else self.tokenize(text)
        tokens = tokens.to(self.transformer.text_model.embeddings.token_embedding.weight.device)
        return self.transformer(input_ids=tokens).last_hidden_state

    def encode(self, text):
        return self(text)
