"""A SentencePiece-BPE tokenizer rebuilt from a GGUF file's vocabulary, for Gemma models.

transformers (5.17) reads a Gemma GGUF tokenizer as a *Unigram* model over the file's scores. Those
scores are BPE merge priorities (minus the merge rank), not log-probabilities, so the Unigram
search splits common words into pieces: "Hello world" becomes `Hello ▁w or ld` instead of
`Hello ▁world`, and perplexity is measured on text the model never saw tokenized that way.
llama.cpp instead runs SentencePiece's BPE: adjacent pieces merge in order of the merged piece's
score. The same merges in Hugging Face's BPE are the pairs (left, right) whose concatenation is a
normal vocabulary piece, ordered by that piece's score, which is how transformers' own
SentencePiece converter derives merges from a `.model` file.
"""

from __future__ import annotations

from pathlib import Path

# llama.cpp's token types (gguf.TokenType)
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


def read_vocabulary(gguf_path: Path) -> tuple[list[str], list[float], list[int], dict]:
    """Tokens, scores, token types and the special-token ids stored in a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))

    def array(key: str, convert):
        field = reader.fields[key]
        return [convert(field.parts[i]) for i in field.data]

    tokens = array("tokenizer.ggml.tokens", lambda part: bytes(part).decode("utf-8"))
    scores = array("tokenizer.ggml.scores", lambda part: float(part[0]))
    types = array("tokenizer.ggml.token_type", lambda part: int(part[0]))
    special = {}
    for name in ("bos", "eos", "unknown", "padding"):
        field = reader.fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None:
            special[name] = int(field.parts[field.data[0]][0])
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    special["add_bos"] = bool(field.parts[field.data[0]][0]) if field is not None else True
    return tokens, scores, types, special


def bpe_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece-BPE merges: every split of a normal piece into two normal pieces, the pieces
    with the highest score (earliest merge) first; splits of one piece ordered by their ids."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == _NORMAL}
    ranked = []
    for piece, index in vocab.items():
        splits = sorted(
            (vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        )
        ranked.extend((-scores[index], index, j, left, right) for j, (_, _, left, right) in enumerate(splits))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def gemma_tokenizer_from_gguf(gguf_path: Path):
    """transformers' GemmaTokenizer (BPE, byte fallback) with the GGUF file's vocabulary, merges,
    user-defined pieces (whitespace runs, HTML tags: matched whole, as SentencePiece does) and
    control tokens (special)."""
    from tokenizers import AddedToken
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    tokens, scores, types, special = read_vocabulary(gguf_path)
    names = {
        key: tokens[special[gguf_key]]
        for key, gguf_key in (
            ("bos_token", "bos"),
            ("eos_token", "eos"),
            ("unk_token", "unknown"),
            ("pad_token", "padding"),
        )
        if gguf_key in special
    }
    tokenizer = GemmaTokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=bpe_merges(tokens, scores, types),
        add_bos_token=special["add_bos"],
        add_eos_token=False,
        **names,
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED
        ]
    )
    named = set(names.values())
    tokenizer.add_tokens(
        [AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == _CONTROL and t not in named],
        special_tokens=True,
    )
    return tokenizer
