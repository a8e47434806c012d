"""A CLIP byte-level BPE tokenizer built offline from a small corpus (vocab.json + merges.txt).

The embedded text-to-image model needs a tokenizer that behaves like SD's (`openai/clip-vit-large-patch14`):
lower-cased, byte-level symbols, "</w>" marking a word's last symbol, <|startoftext|> / <|endoftext|> around
at most 75 tokens. Its files are written in the layout of OpenAI's CLIP vocabulary, which transformers'
CLIPTokenizer reads unchanged: the 256 byte symbols, the same 256 with "</w>", one entry per merge in merge
order, then the two special tokens. Every byte is in the vocabulary, so any text tokenizes (unknown words fall
back to shorter pieces); the merges only decide how compact the corpus words become.
"""
import collections
import json
import os
import re

from ldm.util import atomic_write_bytes

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer rule (letter runs, single digits, runs of other symbols), restricted to ASCII text:
# the corpus the merges are learnt from is the toolkit's own English prompt phrasings.
_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def bytes_to_unicode():
    """GPT-2/CLIP's reversible byte -> printable unicode character table (printable bytes map to themselves)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _symbols(word, byte_table):
    chars = [byte_table[b] for b in word.encode("utf-8")]
    return tuple(chars[:-1]) + (chars[-1] + "</w>",)


def learn_merges(corpus, max_merges=10_000):
    """BPE merges learnt from `corpus` (an iterable of texts): repeatedly merge the most frequent adjacent pair
    (ties: the lexicographically smallest), until every word is one symbol or max_merges is reached."""
    table = bytes_to_unicode()
    counts = collections.Counter(w for text in corpus for w in _WORD.findall(text.lower().strip()))
    words = {_symbols(w, table): n for w, n in sorted(counts.items())}
    merges = []
    while len(merges) < max_merges:
        pairs = collections.Counter()
        for sym, n in words.items():
            for pair in zip(sym, sym[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        new_words = {}
        for sym, n in words.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + n
        words = new_words
    return merges


def clip_vocab(merges):
    """token -> id in CLIP's order: bytes, bytes + "</w>", merge results, <|startoftext|>, <|endoftext|>."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}


def write_clip_tokenizer(directory, corpus, max_merges=10_000):
    """Write vocab.json, merges.txt and the tokenizer configs to `directory`; returns the vocabulary size.

    The files are a pure function of the corpus (deterministic tie-breaking, sorted JSON), so a rebuild is
    byte-identical.
    """
    merges = learn_merges(corpus, max_merges)
    vocab = clip_vocab(merges)
    os.makedirs(directory, exist_ok=True)
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, sort_keys=False),
        # the header line is part of the format: CLIP's readers skip the first line
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
            "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2),
        "special_tokens_map.json": json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
                                               "pad_token": EOS}, indent=2),
    }
    for name, text in files.items():
        atomic_write_bytes(os.path.join(directory, name), text.encode("utf-8"))
    return len(vocab)
