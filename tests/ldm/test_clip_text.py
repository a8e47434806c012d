"""FrozenCLIPEmbedder (SD v1 text encoder) against transformers 4.19.2 outputs (g_clip_text_tiny)."""
import pytest
import torch

from refdata import load_vector, close

pytest.importorskip("transformers", reason="transformers not installed (optional [clip] extra)")


@torch.no_grad()
def test_clip_text_tiny_matches_reference():
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    rec, sd = load_vector("g_clip_text_tiny")
    emb = FrozenCLIPEmbedder(text_config=rec["config"])
    # the state dict keeps the persistent position_ids, in the original order
    assert list(emb.transformer.state_dict()) == list(sd)
    assert emb.transformer.state_dict()["text_model.embeddings.position_ids"].dtype == torch.int64
    emb.transformer.load_state_dict(sd, strict=True)
    assert sum(p.numel() for p in emb.parameters()) == rec["num_params"]
    assert not any(p.requires_grad for p in emb.parameters())
    ids = rec["inputs"]["input_ids"]
    close(emb(ids), rec["last_hidden_state"])
    close(emb.encode(ids), rec["last_hidden_state"])
    emb.train()
    assert not emb.transformer.training  # frozen encoder stays in eval mode


class _StubTokenizer:
    """Word -> id tokenizer with CLIP's conventions: SOT first, EOT last, truncation keeps the EOT."""
    eos_token_id = 999

    def __call__(self, texts, truncation, max_length, padding):
        rows = []
        for text in texts:
            body = [10 + len(w) for w in text.split()][: max_length - 2]
            rows.append([998] + body + [self.eos_token_id])
        return {"input_ids": rows}


def test_tokenize_pads_with_eot_to_max_length():
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    rec, _ = load_vector("g_clip_text_tiny")
    emb = FrozenCLIPEmbedder(text_config=rec["config"], tokenizer=_StubTokenizer())
    tokens = emb.tokenize(["a photo of", ""])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert tokens[0, :5].tolist() == [998, 11, 15, 12, 999] and (tokens[0, 5:] == 999).all()
    assert tokens[1, 0] == 998 and (tokens[1, 1:] == 999).all()
    assert emb(["a photo of", ""]).shape == (2, 77, 32)
