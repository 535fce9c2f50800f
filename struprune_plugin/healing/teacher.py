"""The dense teacher's next-token distributions, computed once in a streamed pass.

End-to-end distillation needs, for every calibration token, the teacher's distribution over the
vocabulary. Keeping only its `k` largest logits (values and token ids) makes that a small table
(65 536 tokens x 64 logits is 25 MB), computed before training on the engine's layer walk: the
pre-layer modules once, then one teacher layer resident at a time, then the head. The teacher is
never resident as a whole, and training holds only the student. `k = 0` keeps nothing: the
distillation then runs the resident teacher on every batch (full logits).

Each position also keeps the log-normaliser (log-sum-exp of all the logits at the temperature),
so the top-k logits give true probabilities and the mass outside them is known: the loss compares
the two distributions on the top-k tokens plus one "all other tokens" bucket. Renormalising the
top-k instead would teach the student to put all its mass on k tokens, which measurably raised
held-out perplexity on the test model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..architectures import model_view
from ..engine import capture_layer_inputs, layer_forward
from ..residency import all_resident, head_modules


@dataclass
class TeacherTopK:
    """The teacher's `k` largest next-token logits at every position of every window."""

    values: torch.Tensor  # windows x tokens x k, float32
    indices: torch.Tensor  # windows x tokens x k, int64
    log_normalizer: torch.Tensor  # windows x tokens: logsumexp(logits / temperature)
    temperature: float = 1.0

    @property
    def k(self) -> int:
        return int(self.values.shape[-1])


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from its last decoder layer's output: the backbone's final norm (OPT:
    and `project_out`), the LM head, and Gemma's final logit soft-capping where the config sets it,
    in the order the families' own forwards apply them."""
    view = model_view(model)
    for module in head_modules(model, view.backbone)[:-1]:
        hidden = module(hidden)
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def teacher_top_k(
    teacher: nn.Module,
    windows: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = True,
    bf16: bool = False,
) -> TeacherTopK:
    """Walk `teacher` layer by layer over `windows` (windows x tokens) and keep the top-`k` logits
    (the layers under bf16 autocast with `bf16`; the log-softmax always in float32)."""
    device = torch.device(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return _teacher_top_k(teacher, windows, k, temperature, batch_size, device, progress)


def _teacher_top_k(teacher, windows, k, temperature, batch_size, device, progress) -> TeacherTopK:
    view = model_view(teacher)
    id_batches = list(windows.split(batch_size))
    batches = capture_layer_inputs(teacher, view, id_batches, device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(view.layers) + 1, desc="teacher logits", unit="layer")
    for layer in view.layers:
        with all_resident([layer], device):
            batches = [replace(b, hidden=layer_forward(layer, b)) for b in batches]
        if bar is not None:
            bar.update()
    values, indices, normalizers = [], [], []
    with all_resident(head_modules(teacher, view.backbone), device):
        for batch in batches:
            logits = head_logits(teacher, batch.hidden).float()
            top = logits.topk(k, dim=-1)
            values.append(top.values.cpu())
            indices.append(top.indices.cpu())
            normalizers.append(logits.div(temperature).logsumexp(-1).cpu())
    if bar is not None:
        bar.update()
        bar.close()
    return TeacherTopK(torch.cat(values), torch.cat(indices), torch.cat(normalizers), temperature)
