"""Perplexity with a stated protocol.

Protocol: the whole text is tokenised once without special tokens and cut into windows of
`seq_len` tokens starting every `stride` tokens (stride = seq_len: non-overlapping, the default).
In each window only the tokens not scored by an earlier window count (HF's strided recipe). With
`bos_token_id` set, a BOS token is prepended to every window so that its first token is scored too.
ppl = exp(total NLL / scored tokens); the tail shorter than a full window is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .architectures import context_length
from .errors import CalibrationDataError


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean NLL per scored token
    tokens: int  # scored tokens
    windows: int
    seq_len: int
    stride: int
    bos: bool

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def _windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position inside the window) for each full window."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens - seq_len + 1, stride):
        end = begin + seq_len
        out.append((begin, end, prev_end - begin if prev_end > begin else 0))
        prev_end = end
    return out


def check_windows(model: nn.Module, token_ids: torch.Tensor, seq_len: int, bos_token_id: int | None) -> None:
    """Refuse evaluation input the model cannot take, before the first forward: ids beyond its
    embedding (a tokenizer of another model) and windows longer than its positions. Otherwise the
    first is a crash inside torch.embedding, and the second either that (learned positions) or a
    perplexity measured where the model was never trained (RoPE past its context)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise CalibrationDataError(f"the window length must be >= 2 tokens; got {seq_len!r}")
    rows = model.get_input_embeddings().num_embeddings
    ids = token_ids.reshape(-1)
    top = max(int(ids.max()) if ids.numel() else -1, -1 if bos_token_id is None else bos_token_id)
    if top >= rows or (ids.numel() and int(ids.min()) < 0):
        raise CalibrationDataError(
            f"token id {top} does not exist in the model, whose embedding has {rows} rows: the tokenizer "
            "belongs to another model. Fix: evaluate with the model's own tokenizer (the one in its folder)"
        )
    window = seq_len + (bos_token_id is not None)
    context = context_length(model.config)
    if context is not None and window > context:
        raise CalibrationDataError(
            f"windows of {window} tokens ({seq_len}{' + BOS' if bos_token_id is not None else ''}) exceed "
            f"the model's {context} positions (max_position_embeddings). Fix: --eval-seq-len "
            f"{context - (bos_token_id is not None)} or less"
        )


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    seq_len: int = 512,
    stride: int | None = None,
    bos_token_id: int | None = None,
    batch_size: int = 4,
    max_windows: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "perplexity",
) -> Perplexity:
    check_windows(model, token_ids, seq_len, bos_token_id)
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise CalibrationDataError(f"stride must be in (0, seq_len={seq_len}]; got {stride}")
    for name, value in (("batch_size", batch_size), ("max_windows", max_windows)):
        if value is not None and value < 1:
            raise CalibrationDataError(f"{name} must be >= 1 (max_windows: or None for all); got {value}")
    ids = token_ids.reshape(-1)
    windows = _windows(ids.numel(), seq_len, stride)
    if not windows:
        raise CalibrationDataError(
            f"evaluation text has {ids.numel()} tokens, shorter than one window of {seq_len}. "
            "Fix: use a longer text or a smaller --eval-seq-len"
        )
    windows = windows[:max_windows] if max_windows else windows
    model.eval()
    device = torch.device(device)
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, unit="batch"):
        chunk = windows[start : start + batch_size]
        x = torch.stack([ids[b:e] for b, e, _ in chunk])
        if bos_token_id is not None:
            x = torch.cat([torch.full((x.shape[0], 1), bos_token_id, dtype=x.dtype), x], dim=1)
        logits = model(input_ids=x.to(device), use_cache=False).logits.float()
        offset = 1 if bos_token_id is not None else 0
        for row, (_b, _e, first) in enumerate(chunk):
            # logits at position p predict token p+1; text token t sits at position t + offset
            first_target = max(first, 1 - offset)
            pred = logits[row, first_target + offset - 1 : seq_len + offset - 1]
            target = x[row, first_target + offset : seq_len + offset].to(pred.device)
            total_nll += F.cross_entropy(pred, target, reduction="sum").item()
            total_tokens += target.numel()
    nll = total_nll / total_tokens
    return Perplexity(
        ppl=math.exp(nll),
        nll=nll,
        tokens=total_tokens,
        windows=len(windows),
        seq_len=seq_len,
        stride=stride,
        bos=bos_token_id is not None,
    )


def default_bos(tokenizer) -> int | None:
    """BOS per window only where the tokenizer itself would add one (the model was trained so)."""
    if tokenizer is None or tokenizer.bos_token_id is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id if probe and probe[0] == tokenizer.bos_token_id else None
