"""The Gemma tokenizer rebuilt from a GGUF vocabulary must tokenize as SentencePiece BPE does
(llama.cpp's `llm_tokenizer_spm`): checked against a direct implementation of that algorithm on a
synthetic vocabulary written to a real GGUF file."""

from __future__ import annotations

import random

import pytest

from struprune_plugin.gguf_tokenizer import gemma_tokenizer_from_gguf

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
USER_DEFINED = ["<tag>", "  "]  # Gemma stores its whitespace runs with real spaces


def _vocabulary(seed: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-BPE-like vocabulary: characters, then pieces grown by merging two existing
    pieces, each later piece with a lower score (merged later)."""
    rng = random.Random(seed)
    pieces = list("abcé▁")
    merged: list[str] = []
    while len(merged) < 40:
        piece = rng.choice(pieces + merged) + rng.choice(pieces + merged)
        if piece not in merged and piece not in pieces and len(piece) <= 6:
            merged.append(piece)
    tokens = SPECIALS + BYTES + USER_DEFINED + pieces + merged
    types = [3] * len(SPECIALS) + [6] * 256 + [4] * len(USER_DEFINED) + [1] * (len(pieces) + len(merged))
    scores = [0.0] * (len(SPECIALS) + 256 + len(USER_DEFINED)) + [-1e6] * len(pieces)
    scores += [-float(rank) for rank in range(len(merged))]
    return tokens, scores, types


def _write_gguf(path, tokens, scores, types) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _spm_bpe(text: str, tokens, scores, types) -> list[int]:
    """SentencePiece BPE as llama.cpp runs it: user-defined pieces match whole in the raw text, spaces
    become '▁', then within each stretch the adjacent pair whose concatenation is the best-scoring normal piece
    merges first (leftmost on ties); leftover characters outside the vocabulary become bytes."""
    ids = {t: i for i, t in enumerate(tokens)}
    normal = {t for t, ty in zip(tokens, types) if ty == 1}
    out: list[int] = []
    while text:
        cut = min(
            ((text.find(u), u) for u in USER_DEFINED if u in text),
            default=(len(text), None),
            key=lambda x: x[0],
        )
        stretch, text = text[: cut[0]], text[cut[0] :]
        symbols = list(stretch.replace(" ", "▁"))
        while True:
            best = None
            for j in range(len(symbols) - 1):
                piece = symbols[j] + symbols[j + 1]
                if piece in normal and (
                    best is None or scores[ids[piece]] > scores[ids[symbols[best] + symbols[best + 1]]]
                ):
                    best = j
            if best is None:
                break
            symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
        for symbol in symbols:
            if symbol in normal:
                out.append(ids[symbol])
            else:
                out.extend(ids[f"<0x{b:02X}>"] for b in symbol.encode())
        if cut[1] is not None:
            out.append(ids[cut[1]])
            text = text[len(cut[1]) :]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rebuilt_tokenizer_is_sentencepiece_bpe(tmp_path, seed):
    tokens, scores, types = _vocabulary(seed)
    _write_gguf(tmp_path / "vocab.gguf", tokens, scores, types)
    tokenizer = gemma_tokenizer_from_gguf(tmp_path / "vocab.gguf")
    rng = random.Random(100 + seed)
    texts = ["abc abc", "  a<tag>b  c", "éé béa", "dab"]  # 'd' is outside the vocabulary: bytes
    texts += ["".join(rng.choice("abcé  d") for _ in range(rng.randint(1, 30))) for _ in range(200)]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == 2, "BOS first, as the GGUF's add_bos_token says"
        assert ids[1:] == _spm_bpe(text, tokens, scores, types), repr(text)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.convert_tokens_to_ids("<start_of_turn>") == 4
    assert tokenizer("<start_of_turn>a", add_special_tokens=False)["input_ids"][0] == 4
