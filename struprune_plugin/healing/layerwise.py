"""Layer-wise healing: each pruned decoder layer learns to reproduce its dense layer's output.

Block-local distillation (Puzzle's first stage; the block-wise reconstruction of arXiv 2510.14444)
needs no gradient across layers, so it keeps pruning's memory story: one student layer and its
teacher layer resident, plus the calibration activations. The walk is the engine's: the
pre-layer modules run once (`capture_layer_inputs`), then layer by layer

- the teacher layer maps the *dense prefix's* hidden states to the target outputs;
- the student layer is trained with gradient steps on all its kept weights so that, fed its inputs,
  it reproduces those targets (mean squared error relative to the targets' mean square);
- both activation streams advance to the next layer.

Which inputs the student trains on is a setting: `"healed"` (default) feeds it the outputs of the
already-healed student prefix, the inputs it will see at inference, so each layer also learns to
correct the error its prefix left; `"dense"` feeds it the dense prefix's hidden states, the classic
block-local distillation where every block is trained independently. The teacher's targets are
the same in both. The student is changed in place (the caller passes its own copy); the teacher
is only read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..architectures import model_view
from ..engine import LayerBatch, capture_layer_inputs, layer_forward
from ..errors import StructPruneError
from ..residency import all_resident

HealInputs = Literal["healed", "dense"]


class HealConfigError(StructPruneError):
    """A healing setting that cannot run (named with the fix)."""


@dataclass(frozen=True)
class LayerwiseHealConfig:
    """Settings of layer-wise healing.

    `steps` gradient steps per layer, each on one calibration batch (cycling), AdamW at `lr` with
    a cosine decay to zero; `inputs` chooses the student's training inputs (module docstring)."""

    steps: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 8
    inputs: HealInputs = "healed"
    seed: int = 0
    bf16: bool = False  # forward and backward under bf16 autocast; weights and AdamW state stay float32

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise HealConfigError(f"steps={self.steps}: healing needs at least one step per layer")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise HealConfigError(f"lr={self.lr}: the learning rate must be a positive number")
        if self.batch_size < 1:
            raise HealConfigError(f"batch_size={self.batch_size}: must be at least 1")
        if self.inputs not in ("healed", "dense"):
            raise HealConfigError(f"inputs={self.inputs!r}: choose 'healed' or 'dense'")


@dataclass
class LayerHealRecord:
    """One layer's relative output error against the dense layer, before and after its steps."""

    index: int
    error_before: float
    error_after: float
    losses: list[float]
    seconds: float


def _relative_error(layer: nn.Module, inputs: Sequence[LayerBatch], targets: Sequence[torch.Tensor]) -> float:
    num = den = 0.0
    with torch.no_grad():
        for batch, target in zip(inputs, targets):
            out = layer_forward(layer, batch).float()
            num += (out - target.float()).pow(2).sum().item()
            den += target.float().pow(2).sum().item()
    return num / max(den, 1e-30)


def _family(config) -> str:
    """The base family of a config (a per-layer-width folder's `struprune_llama` is `llama`)."""
    return str(getattr(config, "model_type", "")).removeprefix("struprune_")


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """The teacher must be the student's dense source: same family, depth and hidden size."""
    s_cfg, t_cfg = student.config, teacher.config
    if _family(s_cfg) != _family(t_cfg):
        raise HealConfigError(
            f"teacher is a {_family(t_cfg)!r} model but the pruned model is {_family(s_cfg)!r}. "
            "Fix: pass the dense model the pruned one was made from as the teacher"
        )
    for field in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if getattr(s_cfg, field, None) != getattr(t_cfg, field, None):
            raise HealConfigError(
                f"teacher's {field} is {getattr(t_cfg, field, None)} but the pruned model's is "
                f"{getattr(s_cfg, field, None)}: it is not the pruned model's dense source. Fix: pass "
                "the dense model the pruned one was made from as the teacher"
            )


def heal_layerwise(
    student: nn.Module,
    teacher: nn.Module,
    calibration_ids: torch.Tensor,
    config: LayerwiseHealConfig | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
) -> list[LayerHealRecord]:
    """Train every decoder layer of `student` (in place) to reproduce `teacher`'s layer outputs on
    `calibration_ids` (windows x tokens). Returns one record per layer.

    With `checkpoint_dir`, every healed layer is saved there as it finishes; a later call with the
    same directory, settings and calibration loads the layers already healed instead of training
    them again (their outputs are recomputed to carry the walk on), so an interrupted run resumes at
    the layer it was on."""
    config = config or LayerwiseHealConfig()
    check_teacher(student, teacher)
    device = torch.device(device)
    if calibration_ids.ndim != 2 or calibration_ids.numel() == 0:
        raise HealConfigError(
            f"calibration ids of shape {tuple(calibration_ids.shape)}: healing needs windows x tokens, "
            "at least one token. Fix: give it calibration text (the budget of tokens must not be zero)"
        )
    s_view, t_view = model_view(student), model_view(teacher)
    id_batches = list(calibration_ids.split(config.batch_size))
    with torch.no_grad():
        student_in = capture_layer_inputs(student, s_view, id_batches, device)
        teacher_in = capture_layer_inputs(teacher, t_view, id_batches, device)
    saved = _LayerCheckpoints(checkpoint_dir, config, calibration_ids) if checkpoint_dir else None
    records = []
    bar = _progress(len(s_view.layers), progress)
    for index, (s_layer, t_layer) in enumerate(zip(s_view.layers, t_view.layers)):
        start = time.perf_counter()
        with all_resident([s_layer, t_layer], device):
            with torch.no_grad():
                targets = [layer_forward(t_layer, batch).detach() for batch in teacher_in]
            inputs = student_in if config.inputs == "healed" else _with_hidden(student_in, teacher_in)
            done = saved.load(index, s_layer) if saved else None
            if done is None:
                before = _relative_error(s_layer, inputs, targets)
                # each layer's own generator: a resumed run draws the same batch order as a whole one
                generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
                losses = train_layer(s_layer, inputs, targets, config, generator)
                after = _relative_error(s_layer, inputs, targets)
                if saved:
                    saved.save(index, s_layer, LayerHealRecord(index, before, after, losses, 0.0))
            else:
                before, after, losses = done.error_before, done.error_after, done.losses
            with torch.no_grad():
                student_in = [replace(b, hidden=layer_forward(s_layer, b).detach()) for b in student_in]
            teacher_in = [replace(b, hidden=t) for b, t in zip(teacher_in, targets)]
        records.append(LayerHealRecord(index, before, after, losses, time.perf_counter() - start))
        if bar is not None:
            bar.set_postfix(error=f"{before:.3g}->{after:.3g}")
            bar.update()
    if bar is not None:
        bar.close()
    return records


class _LayerCheckpoints:
    """Healed layers saved one safetensors file each, beside a manifest of the run they belong to
    (settings and a digest of the calibration ids): a directory from another run is refused."""

    def __init__(
        self, folder: str | Path, config: LayerwiseHealConfig, calibration_ids: torch.Tensor
    ) -> None:
        self.folder = Path(folder)
        digest = hashlib.sha256(calibration_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
        manifest = {"settings": asdict(config), "calibration_sha256": digest}
        path = self.folder / "manifest.json"
        if path.exists():
            if json.loads(path.read_text()) != manifest:
                raise HealConfigError(
                    f"{self.folder} holds the checkpoints of a run with other settings or calibration. Fix: "
                    "rerun with that run's settings, or start afresh without --resume"
                )
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, json.dumps(manifest).encode())

    def _paths(self, index: int) -> tuple[Path, Path]:
        stem = self.folder / f"layer-{index:04d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def save(self, index: int, layer: nn.Module, record: LayerHealRecord) -> None:
        from safetensors.torch import save

        weights, meta = self._paths(index)
        state = {k: v.detach().contiguous().cpu() for k, v in layer.state_dict().items()}
        _write_atomic(weights, save(state))
        _write_atomic(meta, json.dumps(asdict(record)).encode())  # last: marks the layer done

    def load(self, index: int, layer: nn.Module) -> LayerHealRecord | None:
        from safetensors.torch import load_file

        weights, meta = self._paths(index)
        if not meta.exists():
            return None
        layer.load_state_dict(load_file(str(weights), device=str(next(layer.parameters()).device)))
        return LayerHealRecord(**json.loads(meta.read_text()))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _with_hidden(student_in: list[LayerBatch], teacher_in: list[LayerBatch]) -> list[LayerBatch]:
    """The student's batches (its own kwargs) carrying the dense prefix's hidden states."""
    return [replace(s, hidden=t.hidden) for s, t in zip(student_in, teacher_in)]


def train_layer(
    layer: nn.Module,
    inputs: list[LayerBatch],
    targets: list[torch.Tensor],
    config: LayerwiseHealConfig,
    generator: torch.Generator,
) -> list[float]:
    """`config.steps` AdamW steps (cosine decay) on all of `layer`'s floating-point weights so that,
    fed `inputs`, it reproduces `targets` (MSE relative to each target's mean square). Shared by
    `heal_layerwise` and the pruning walk's in-walk healing. Returns the loss at each step."""
    params = [p for p in layer.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    scales = [t.float().pow(2).mean().clamp_min(1e-30) for t in targets]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / config.steps))
    )
    order = torch.randperm(len(inputs), generator=generator).tolist()
    losses = []
    device_type = params[0].device.type if params else "cpu"
    try:
        with torch.enable_grad():
            for step in range(config.steps):
                i = order[step % len(order)]
                with torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.bf16):
                    out = layer_forward(layer, inputs[i])
                loss = (out.float() - targets[i].float()).pow(2).mean() / scales[i]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
    return losses


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="heal layers", unit="layer")
