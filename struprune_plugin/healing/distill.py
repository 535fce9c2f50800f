"""End-to-end healing: the pruned student learns the dense teacher's next-token distributions.

The loss is the KL divergence from the teacher's distribution to the student's at every position
of the calibration windows, at a temperature `T` (scaled by `T**2`, Hinton et al.). With `top_k`
the teacher's distribution is its `k` most likely tokens plus one bucket for all the others (exact
probabilities: the log-normaliser is kept too), computed once beforehand in a streamed pass (`teacher.teacher_top_k`): training then holds only the student. With `top_k = 0`
the teacher stays resident and gives full logits on every batch. `loss = "ce"` is plain next-token
fine-tuning on the same windows, the baseline distillation has to beat.

The training loop is transformers' `Trainer` (AdamW, cosine schedule with warm-up, gradient
accumulation, bf16 autocast, a checkpoint every `save_every` steps and resumption from the last
one, a progress bar with the loss); LoRA is peft's, merged back into the weights at the end so the
healed model has exactly the pruned model's modules and widths. TRL's `DistillationTrainer` (1.16)
was read and not used: it distils on completions the student generates from prompts (on-policy,
teacher resident), where healing distils on fixed calibration text with a precomputed teacher.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .layerwise import HealConfigError, check_teacher
from .teacher import TeacherTopK, teacher_top_k

HealLoss = Literal["kd", "ce"]


@dataclass(frozen=True)
class DistillConfig:
    """Settings of end-to-end healing (one pass over the calibration windows per epoch)."""

    loss: HealLoss = "kd"
    temperature: float = 1.0
    top_k: int = 64
    lora_rank: int = 0  # 0: all parameters train; r > 0: peft LoRA of rank r on every linear layer
    lora_alpha: float | None = None  # default 2 x rank
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 8
    micro_batch_size: int = 1
    epochs: int = 1
    warmup: float = 0.05  # fraction of the steps
    save_every: int = 25
    seed: int = 0
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.loss not in ("kd", "ce"):
            raise HealConfigError(f"loss={self.loss!r}: choose 'kd' (distillation) or 'ce' (fine-tuning)")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise HealConfigError(f"temperature={self.temperature}: must be a positive number")
        if self.top_k < 0:
            raise HealConfigError(f"top_k={self.top_k}: 0 (full logits) or a positive count")
        if self.lora_rank < 0:
            raise HealConfigError(f"lora_rank={self.lora_rank}: 0 (full parameters) or a positive rank")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise HealConfigError(f"lr={self.lr}: the learning rate must be a positive number")
        if self.micro_batch_size < 1 or self.batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise HealConfigError(
                f"batch_size={self.batch_size}, micro_batch_size={self.micro_batch_size}: the batch must be "
                "a positive multiple of the micro-batch. Fix: choose sizes that divide"
            )
        if self.epochs < 1 or self.save_every < 1:
            raise HealConfigError("epochs and save_every must be at least 1")
        if not 0 <= self.warmup < 1:
            raise HealConfigError(f"warmup={self.warmup}: a fraction of the steps in [0, 1)")

    @property
    def mode(self) -> str:
        kind = "distill" if self.loss == "kd" else "finetune"
        return f"{kind}-lora" if self.lora_rank else f"{kind}-full"


@dataclass
class DistillRecord:
    """What a run did: its steps, the loss at each, and the time in the teacher pass and training."""

    steps: int
    tokens: int
    losses: list[float] = field(default_factory=list)
    teacher_seconds: float = 0.0
    train_seconds: float = 0.0
    resumed_from: str | None = None


class _Windows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, top: TeacherTopK | None) -> None:
        self.ids, self.top = ids, top

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.ids[i]}
        if self.top is not None:
            item["teacher_values"], item["teacher_indices"] = self.top.values[i], self.top.indices[i]
            item["teacher_log_normalizer"] = self.top.log_normalizer[i]
        return item


def heal_loss(
    student_logits: torch.Tensor,
    input_ids: torch.Tensor,
    config: DistillConfig,
    teacher_logits: torch.Tensor | None = None,
    teacher_values: torch.Tensor | None = None,
    teacher_indices: torch.Tensor | None = None,
    teacher_log_normalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-token mean loss: next-token cross-entropy, or T^2 KL(teacher || student) at every
    position: over the whole vocabulary (`teacher_logits`), or over the teacher's top-k tokens plus
    one bucket holding every other token (`teacher_values`, `teacher_indices` and the teacher's
    log-normaliser at the temperature)."""
    logits = student_logits.float()
    if config.loss == "ce":
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    t = config.temperature
    student = logits.div(t).log_softmax(-1)
    if teacher_values is None:
        teacher = teacher_logits.float().div(t).log_softmax(-1)
        return (teacher.exp() * (teacher - student)).sum(-1).mean() * t * t
    student = _with_rest(student.gather(-1, teacher_indices))
    teacher = _with_rest(teacher_values.float().div(t) - teacher_log_normalizer.unsqueeze(-1))
    return (teacher.exp() * (teacher - student)).sum(-1).mean() * t * t


def _with_rest(log_probs: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of k tokens, with the log of the remaining mass appended as a k+1-th."""
    rest = (1 - log_probs.exp().sum(-1, keepdim=True)).clamp_min(1e-12).log()
    return torch.cat([log_probs, rest], dim=-1)


def _trainer_class():
    from transformers import Trainer

    class HealTrainer(Trainer):
        """Trainer whose loss is `heal_loss`; the batches are whole windows, so the mean loss of a
        micro-batch divided by the accumulation steps is exact (`model_accepts_loss_kwargs` off)."""

        def __init__(self, *args, heal: DistillConfig, teacher: nn.Module | None, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.heal, self.teacher = heal, teacher
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            logits = model(input_ids=ids, use_cache=False).logits
            teacher_logits = None
            if self.heal.loss == "kd" and "teacher_values" not in inputs:
                with torch.no_grad():
                    teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits
            loss = heal_loss(
                logits,
                ids,
                self.heal,
                teacher_logits,
                inputs.get("teacher_values"),
                inputs.get("teacher_indices"),
                inputs.get("teacher_log_normalizer"),
            )
            return (loss, None) if return_outputs else loss

    return HealTrainer


def _training_device(device: torch.device) -> bool:
    """Whether the Trainer runs on CPU; it picks the current CUDA device otherwise."""
    if device.type == "cpu":
        return True
    if device.type == "cuda" and (device.index or 0) == 0:
        return False
    raise HealConfigError(
        f"device {device}: end-to-end healing runs on 'cpu' or 'cuda' (the first visible GPU). Fix: choose "
        "the GPU with CUDA_VISIBLE_DEVICES and pass --device cuda"
    )


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    windows: torch.Tensor,
    config: DistillConfig,
    work_dir: str | Path,
    device: torch.device | str = "cpu",
    resume: bool = False,
    progress: bool = True,
) -> tuple[nn.Module, DistillRecord]:
    """Heal `student` on `windows` (windows x tokens) and return it (LoRA merged) with a record.

    `work_dir` holds the Trainer's checkpoints; with `resume` the run continues from the last one
    there. `teacher` may be None only for `loss="ce"`. The student is trained in place."""
    from transformers import TrainerCallback, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    device = torch.device(device)
    use_cpu = _training_device(device)
    if config.loss == "kd":
        if teacher is None:
            raise HealConfigError("distillation needs the dense teacher. Fix: pass --teacher DENSE")
        check_teacher(student, teacher)
    if windows.ndim != 2 or len(windows) == 0:
        raise HealConfigError(
            f"calibration ids of shape {tuple(windows.shape)}: healing needs windows x tokens, at least "
            "one window. Fix: raise the budget of tokens"
        )
    work_dir = Path(work_dir)
    checkpoint = get_last_checkpoint(str(work_dir)) if resume and work_dir.is_dir() else None
    record = DistillRecord(steps=0, tokens=int(windows.numel()), resumed_from=checkpoint)
    top = None
    if config.loss == "kd" and config.top_k:
        start = time.perf_counter()
        top = teacher_top_k(
            teacher,
            windows,
            config.top_k,
            config.temperature,
            config.batch_size,
            device,
            progress,
            config.bf16,
        )
        record.teacher_seconds = time.perf_counter() - start
    resident_teacher = None
    if config.loss == "kd" and not config.top_k:
        resident_teacher = teacher.to(device).eval()
    model = student
    if config.lora_rank:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha or 2 * config.lora_rank,
            lora_dropout=0.0,
            target_modules="all-linear",
            bias="none",
        )
        model = get_peft_model(student, lora)
    accumulation = config.batch_size // config.micro_batch_size
    args = TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=config.epochs,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_every,
        save_total_limit=1,
        report_to="none",
        use_cpu=use_cpu,
        bf16=config.bf16,
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )

    class _Losses(TrainerCallback):
        def on_log(self, _args, _state, _control, logs=None, **_kwargs):
            if logs and "loss" in logs:
                record.losses.append(float(logs["loss"]))

    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=_Windows(windows, top),
        heal=config,
        teacher=resident_teacher,
        callbacks=[_Losses()],
    )
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    was_training = model.training
    trainer.train(resume_from_checkpoint=checkpoint)
    record.train_seconds = time.perf_counter() - start
    record.steps = int(trainer.state.global_step)
    model.train(was_training)
    if resident_teacher is not None:
        resident_teacher.to("cpu")
    healed = model.merge_and_unload() if config.lora_rank else model
    healed.eval()
    return healed.to("cpu"), record
