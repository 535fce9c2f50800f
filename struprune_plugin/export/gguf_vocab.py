"""A Hugging Face BPE tokenizer written as a llama.cpp vocabulary: byte-level BPE as `gpt2`,
SentencePiece-style BPE (byte fallback, spaces as U+2581, as Gemma's) as `llama`.

llama.cpp re-implements each pre-tokenizer by name (`tokenizer.ggml.pre`); the name must describe
the same splitting as the folder's tokenizer.json or text is tokenized differently from how the
model was trained. llama.cpp's converter identifies the pre-tokenizer by hashing the tokenization
of a test string against a table of known upstream checkpoints; a pruned folder's tokenizer is
often not byte-identical to an upstream one (ours are rebuilt from GGUF files), so we read the
pre-tokenizer's structure from tokenizer.json instead and accept only the structures whose
llama.cpp counterpart we know. Anything else is refused with the structure we found.

Token list and token types follow llama.cpp's converter (`TextModel.get_vocab_base`): ids without a
token become `[PAD<id>]` (unused), added special tokens are control tokens, other added tokens
user-defined. Merges, special-token ids, add-BOS and the chat template come from gguf-py's own
`SpecialVocab`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import StructPruneError

#: GPT-2's split regex as the `tokenizers` library writes it (ByteLevel with use_regex=True).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
#: Llama 3's split regex (llama.cpp: `llama-bpe`).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Qwen2's split regex (llama.cpp: `qwen2`).
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class GGUFVocabularyError(StructPruneError):
    """The tokenizer cannot be written as a llama.cpp vocabulary that tokenizes the same way."""


def _shape(node: dict | None) -> tuple:
    """A pre-tokenizer node reduced to what decides the splitting."""
    if node is None:
        return ()
    kind = node.get("type")
    if kind == "Sequence":
        return tuple(s for child in node.get("pretokenizers", []) for s in _shape(child))
    if kind == "ByteLevel":
        return (("ByteLevel", bool(node.get("use_regex", True))),)
    if kind == "Digits":
        return (("Digits", bool(node.get("individual_digits", False))),)
    if kind == "Split":
        pattern = node.get("pattern", {})
        return (("Split", pattern.get("Regex", pattern.get("String")), node.get("behavior")),)
    return ((kind,),)


#: tokenizer.json pre-tokenizer structure -> llama.cpp's `tokenizer.ggml.pre`.
KNOWN_PRE_TOKENIZERS: dict[tuple, str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_REGEX, "Isolated"), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_REGEX, "Isolated"), ("ByteLevel", False)): "qwen2",
}


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the folder's pre-tokenizer, or a clear error."""
    normalizer = tokenizer_json.get("normalizer")
    if normalizer and not (normalizer.get("type") == "Sequence" and not normalizer.get("normalizers")):
        raise GGUFVocabularyError(
            f"the tokenizer has a normalizer ({normalizer.get('type')}), which llama.cpp's BPE "
            "vocabularies do not apply; exporting it would tokenize text differently"
        )
    shape = _shape(tokenizer_json.get("pre_tokenizer"))
    if shape not in KNOWN_PRE_TOKENIZERS:
        raise GGUFVocabularyError(
            f"unknown pre-tokenizer structure {shape}: llama.cpp would split text differently. Known: "
            + ", ".join(f"{v} {k}" for k, v in KNOWN_PRE_TOKENIZERS.items())
        )
    return KNOWN_PRE_TOKENIZERS[shape]


def _write_add_bos(writer, special, tokenizer) -> bool:
    """Whether llama.cpp should prepend BOS: tokenizer_config.json's setting (SpecialVocab writes
    it), else what the HF tokenizer does (written here)."""
    add_bos = special.add_special_token.get("bos")
    if add_bos is None:
        ids = tokenizer("a").input_ids
        add_bos = tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id
        writer.add_add_bos_token(add_bos)
    return add_bos


def is_sentencepiece_bpe(tokenizer_json: dict) -> bool:
    """SentencePiece's BPE as `tokenizers` writes it: byte fallback, spaces replaced by U+2581 by
    the normalizer, no splitting before BPE (a split on ' ' finds none left after the normalizer)."""
    model, normalizer = tokenizer_json.get("model", {}), tokenizer_json.get("normalizer") or {}
    replaces = normalizer.get("type") == "Replace" and normalizer.get("content") == "\u2581"
    pre = _shape(tokenizer_json.get("pre_tokenizer"))
    return (
        model.get("type") == "BPE"
        and bool(model.get("byte_fallback"))
        and replaces
        and pre in ((), (("Split", " ", "MergedWithPrevious"),))
    )


def add_sentencepiece_vocabulary(writer, folder: Path, data: dict, vocab_size: int) -> dict:
    """llama.cpp's `llama` (SentencePiece) vocabulary from a SentencePiece-style BPE tokenizer.json.

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose merged token has the
    highest score; Hugging Face's BPE merges the pair of lowest rank. A merged token's score is
    therefore minus the rank of its first merge, which gives both the same order. Other tokens get
    SentencePiece's conventions: 0 for byte tokens, -1000 for control and user-defined ones."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size or len(vocab) != vocab_size:
        raise GGUFVocabularyError(
            f"the tokenizer has {len(vocab)} tokens (ids up to {max(vocab.values())}) for {vocab_size} embeddings"
        )
    first_merge: dict[str, int] = {}
    for rank, merge in enumerate(data["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        first_merge.setdefault(left + right, rank)
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        text = reverse[i]
        tokens.append(text)
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            scores.append(-1000.0)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(gguf.TokenType.BYTE)
            scores.append(0.0)
        else:
            types.append(gguf.TokenType.NORMAL)
            scores.append(-float(first_merge.get(text, len(first_merge))))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(False)  # the normalizer replaces spaces and prepends nothing
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    add_bos = _write_add_bos(writer, special, tokenizer)
    return {
        "model": "llama",
        "pre": "default",
        "tokens": len(tokens),
        "merges": len(first_merge),
        "add_bos": add_bos,
        "chat_template": special.chat_template is not None,
    }


def add_vocabulary(writer, folder: Path, vocab_size: int) -> dict:
    """Write the folder's tokenizer into `writer` (a gguf.GGUFWriter). Returns what was written."""
    import gguf
    from transformers import AutoTokenizer

    path = folder / "tokenizer.json"
    if not path.exists():
        raise GGUFVocabularyError(
            f"{folder} has no tokenizer.json: the GGUF exporter writes BPE tokenizers from it "
            "(SentencePiece tokenizer.model files alone are not supported yet)"
        )
    data = json.loads(path.read_text())
    if is_sentencepiece_bpe(data):
        return add_sentencepiece_vocabulary(writer, folder, data, vocab_size)
    # byte_fallback is allowed: after a byte-level pre-tokenizer every byte is already a token
    if data.get("model", {}).get("type") != "BPE":
        raise GGUFVocabularyError(
            f"the tokenizer is a {data.get('model', {}).get('type')} model; the GGUF exporter "
            "supports byte-level BPE (llama.cpp's gpt2 vocabulary) only"
        )
    pre = pre_tokenizer_name(data)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFVocabularyError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} embeddings"
        )
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise GGUFVocabularyError(f"{path} has no BPE merges")
    special.add_to_gguf(writer, quiet=True)
    add_bos = _write_add_bos(writer, special, tokenizer)
    return {
        "model": "gpt2",
        "pre": pre,
        "tokens": len(tokens),
        "merges": len(special.merges),
        "add_bos": add_bos,
        "chat_template": special.chat_template is not None,
    }
