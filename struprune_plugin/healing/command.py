"""`struprune heal PRUNED --teacher DENSE`: heal a saved pruned folder from its dense teacher.

`--mode layerwise` trains each pruned layer to reproduce its dense layer (one layer pair resident,
`layerwise.py`); `--mode distill` trains the whole student on the teacher's next-token
distributions (`distill.py`, all parameters or `--lora-rank R`); `--mode finetune` is plain
next-token fine-tuning on the same text, the baseline. The command mirrors `prune`: the same calibration sources (`--calib-data`, else the built-in
Wikipedia train split) and evaluation texts, the output checked and claimed before any work, the
healed folder written atomically with its report (`struprune_heal.json`) and a plot of every
layer's error against the dense layer before and after (layer-wise) or of the training loss
(end to end). The healed folder keeps the pruned
folder's widths, so it loads, exports and serves exactly as the pruned one does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from .. import __version__
from ..data import TEXT_SHA256, sample_calibration, tokenize
from .distill import DistillConfig, DistillRecord, distill
from .layerwise import HealConfigError, LayerHealRecord, LayerwiseHealConfig, heal_layerwise

REPORT = "struprune_heal.json"
PLOT = "heal_layer_errors.png"
LOSS_PLOT = "heal_loss.png"
MODES = ("layerwise", "distill", "finetune")
#: `--mode` when none is given: distillation won back the most per token (integration/results/heal.md)
DEFAULT_MODE = "distill"
#: learning rates when --lr is not given, per mode (LoRA's adapters start at zero and take larger steps)
#: (SmolLM2 at 30 %, 65536 tokens: distillation at 3e-4 reached 45.50 on Wikipedia, at 1e-4 47.22)
DEFAULT_LR = {"layerwise": 1e-3, "distill": 3e-4, "finetune": 3e-4, "lora": 1e-3}


def add_parser(sub: argparse._SubParsersAction, add_eval_args, int_at_least) -> None:
    h = sub.add_parser("heal", help="heal a pruned folder by training it to reproduce its dense teacher")
    h.add_argument("pruned", help="a folder written by 'struprune prune' (or any pruned HF folder)")
    h.add_argument(
        "--teacher",
        default=None,
        help="the dense model the pruned one was made from: a folder or 'smollm2' / 'gemma3-270m' / 'tiny' "
        "(default: the model named in the pruned folder's report)",
    )
    h.add_argument("--output", type=Path, default=None, help="the healed folder (default: PRUNED-healed)")
    h.add_argument("--overwrite", action="store_true", help="replace a folder struprune wrote")
    h.add_argument(
        "--tokens", type=int, default=65536, help="calibration tokens to heal on (windows x --calib-len)"
    )
    h.add_argument("--calib-len", type=int_at_least(2), default=512, help="tokens per calibration window")
    h.add_argument("--calib-text", default="wiki_train", choices=sorted(TEXT_SHA256), help="built-in split")
    h.add_argument(
        "--calib-data",
        default=None,
        metavar="SOURCE",
        help="your own calibration text instead (as for prune)",
    )
    h.add_argument(
        "--mode",
        choices=MODES,
        default=DEFAULT_MODE,
        help="layerwise: each layer learns its dense layer's output, one layer resident; distill: the whole "
        "model learns the teacher's next-token distributions; finetune: plain next-token training (baseline)",
    )
    h.add_argument(
        "--lr",
        type=float,
        default=None,
        help="AdamW learning rate, cosine decay (default: 1e-3 layer-wise and with --lora-rank, else 3e-4)",
    )
    h.add_argument("--batch-size", type=int_at_least(1), default=8, help="windows per gradient step")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (end to end: cpu or cuda)")
    h.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="bfloat16: compute under bf16 autocast (weights and optimizer state stay float32); auto: "
        "bfloat16 where the device has native bf16 matmuls (AVX512-BF16/AMX CPUs, recent GPUs), else float32",
    )
    lw = h.add_argument_group("layer-wise")
    lw.add_argument(
        "--steps",
        type=int_at_least(1),
        default=None,
        help="gradient steps per layer (default: one pass over the windows, --tokens / --calib-len / --batch-size, "
        "times --epochs: the same computation as end to end on the same budget)",
    )
    lw.add_argument(
        "--inputs", choices=("healed", "dense"), default="healed", help="the student layers' inputs"
    )
    h.add_argument("--epochs", type=int_at_least(1), default=1, help="passes over the --tokens budget")
    e2e = h.add_argument_group("end to end (distill, finetune)")
    e2e.add_argument(
        "--lora-rank", type=int, default=0, help="0: train all weights; R: peft LoRA of rank R, merged"
    )
    e2e.add_argument(
        "--top-k",
        type=int,
        default=64,
        help="teacher logits kept per token, computed once in a streamed pass (0: full logits, teacher resident)",
    )
    e2e.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    e2e.add_argument(
        "--micro-batch-size",
        type=int_at_least(1),
        default=1,
        help="windows per forward (gradients accumulate)",
    )
    e2e.add_argument("--save-every", type=int_at_least(1), default=25, help="checkpoint every N steps")
    h.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its last checkpoint (in OUTPUT.heal-checkpoints: every "
        "--save-every steps end to end, every layer layer-wise)",
    )
    h.add_argument("--no-eval", action="store_true", help="skip perplexity before and after")
    h.add_argument("--no-progress", action="store_true")
    add_eval_args(h)


def _teacher_of(pruned: Path, given: str | None) -> str:
    if given:
        return given
    report = pruned / "struprune_report.json"
    try:
        return json.loads(report.read_text())["model"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        raise HealConfigError(
            f"{pruned} has no struprune_report.json naming its dense model. Fix: pass --teacher DENSE"
        ) from None


def check_same_tokenizer(pruned: Path, teacher: Path) -> None:
    """Both folders' tokenizers, where both ship one, must be the same file: distillation compares
    next-token distributions position by position, which only means something over one vocabulary."""
    a, b = pruned / "tokenizer.json", teacher / "tokenizer.json"
    if (
        a.is_file()
        and b.is_file()
        and json.loads(a.read_text("utf-8")).get("model") != json.loads(b.read_text("utf-8")).get("model")
    ):
        raise HealConfigError(
            f"the teacher's tokenizer ({b}) is not the pruned model's ({a}). Fix: pass the dense model "
            "the pruned one was made from as the teacher"
        )


def cmd_heal(args) -> int:
    from ..checkpoint import load_pruned, save_pruned
    from ..cli import _bos, _check_text_sources, _load, calibration_text, evaluate_texts
    from ..devices import resolve_device
    from ..memory import RssSampler, peak_memory, reset_peak
    from ..outputs import check_output_folder, output_lock
    from ..zoo import resolve_model

    if args.tokens < args.calib_len:
        raise HealConfigError(
            f"--tokens {args.tokens} is less than one window of --calib-len {args.calib_len}: healing "
            "needs at least one window. Fix: raise --tokens"
        )
    resolve_device(args.device)
    if args.dtype == "auto":
        from ..devices import fast_bf16

        args.dtype = "bfloat16" if fast_bf16(args.device) else "float32"
    config = heal_config(args)
    _check_text_sources(args)
    pruned_folder = resolve_model(args.pruned)
    teacher_folder = resolve_model(_teacher_of(pruned_folder, args.teacher))
    output = args.output or pruned_folder.with_name(pruned_folder.name + "-healed")
    check_output_folder(output, [pruned_folder, teacher_folder], args.overwrite)
    check_same_tokenizer(pruned_folder, teacher_folder)
    work_dir = output.with_name(output.name + ".heal-checkpoints")
    if not args.resume:  # a fresh run: an earlier run's checkpoints are not this one's
        shutil.rmtree(work_dir, ignore_errors=True)
    progress = not args.no_progress
    with contextlib.ExitStack() as claims:
        claims.enter_context(output_lock(output))
        student, tokenizer = _load(pruned_folder, "cpu", torch.float32)
        teacher = load_pruned(teacher_folder, torch.float32)  # its tokenizer is the student's (vocab checked)
        text, origin = calibration_text(args)
        bos = _bos(args.bos, tokenizer)
        windows = args.tokens // args.calib_len
        calibration = sample_calibration(
            tokenize(tokenizer, text), windows, args.calib_len, args.seed, bos_token_id=bos
        )
        report: dict = {
            "struprune_version": __version__,
            "pruned": str(pruned_folder),
            "teacher": str(teacher_folder),
            "mode": mode_name(config),
            "settings": {
                **vars(config),
                "tokens": windows * args.calib_len,
                "device": args.device,
                "dtype": args.dtype,
            },
            "calibration": {**origin, "samples": windows, "seq_len": args.calib_len, "seed": args.seed},
        }
        before = None if args.no_eval else evaluate_texts(student, tokenizer, args, progress)
        reset_peak(args.device)
        start = time.perf_counter()
        records: list[LayerHealRecord] | DistillRecord
        with RssSampler() as sampler:
            if isinstance(config, LayerwiseHealConfig):
                records = heal_layerwise(
                    student, teacher, calibration, config, args.device, progress, checkpoint_dir=work_dir
                )
                report["layers"] = [vars(r) for r in records]
            else:
                teacher_or_none = teacher if config.loss == "kd" else None
                student, records = distill(
                    student,
                    teacher_or_none,
                    calibration,
                    config,
                    work_dir,
                    args.device,
                    args.resume,
                    progress,
                )
                report["training"] = vars(records)
        peak = peak_memory(args.device, sampler if torch.device(args.device).type == "cpu" else None)
        report["seconds"] = time.perf_counter() - start
        report["peak_memory_bytes"], report["peak_memory_kind"] = peak.bytes, peak.kind
        student.to("cpu", torch.float32)
        del teacher
        if not args.no_eval:
            after = evaluate_texts(student.to(args.device), tokenizer, args, progress)
            report["perplexity"] = {t: {"before": before[t], "after": after[t]} for t in after}
            student.to("cpu")
        report["environment"] = {"torch": torch.__version__, "platform": platform.platform()}

        def write_extras(tmp: Path) -> None:
            (tmp / REPORT).write_text(json.dumps(report, indent=1), encoding="utf-8")
            if isinstance(records, DistillRecord):
                plot_losses(records, tmp / LOSS_PLOT, f"{pruned_folder.name}: {report['mode']}")
            else:
                plot_layer_errors(records, tmp / PLOT, f"{pruned_folder.name}: layer-wise healing")

        save_pruned(student, output, tokenizer=tokenizer, overwrite=args.overwrite, write_extras=write_extras)
    shutil.rmtree(work_dir, ignore_errors=True)  # the checkpoints of a run that finished
    if isinstance(records, DistillRecord):
        print(f"{records.steps} steps, loss {records.losses[0]:.4g} -> {records.losses[-1]:.4g}")
    else:
        for r in records:
            print(f"layer {r.index}: relative error {r.error_before:.4g} -> {r.error_after:.4g}")
    for text, ppl in (report.get("perplexity") or {}).items():
        print(f"{text}: ppl {ppl['before']['ppl']:.2f} -> {ppl['after']['ppl']:.2f}")
    print(f"healed in {report['seconds']:.0f} s; saved to {output}")
    return 0


def heal_config(args) -> LayerwiseHealConfig | DistillConfig:
    """The settings of the chosen mode, from the command line (the learning rate's default per mode)."""
    lr = args.lr
    if lr is None:
        lr = DEFAULT_LR["lora" if args.lora_rank and args.mode != "layerwise" else args.mode]
    if args.mode == "layerwise":
        windows = max(args.tokens // args.calib_len, 1)
        return LayerwiseHealConfig(
            steps=args.steps or args.epochs * -(-windows // args.batch_size),
            lr=lr,
            batch_size=args.batch_size,
            inputs=args.inputs,
            seed=args.seed,
            bf16=args.dtype == "bfloat16",
        )
    return DistillConfig(
        loss="kd" if args.mode == "distill" else "ce",
        temperature=args.temperature,
        top_k=args.top_k,
        lora_rank=args.lora_rank,
        lr=lr,
        batch_size=args.batch_size,
        micro_batch_size=min(args.micro_batch_size, args.batch_size),
        epochs=args.epochs,
        save_every=args.save_every,
        seed=args.seed,
        bf16=args.dtype == "bfloat16",
    )


def mode_name(config: LayerwiseHealConfig | DistillConfig) -> str:
    """layer-wise, distill-full, distill-lora, finetune-full or finetune-lora."""
    return "layer-wise" if isinstance(config, LayerwiseHealConfig) else config.mode


def plot_losses(record: DistillRecord, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(record.losses) + 1), record.losses, lw=1)
    ax.set(xlabel="step", ylabel="training loss", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layer_errors(records: list[LayerHealRecord], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.5))
    idx = [r.index for r in records]
    ax.plot(idx, [r.error_before for r in records], marker="o", label="pruned")
    ax.plot(idx, [r.error_after for r in records], marker="o", label="healed")
    ax.set(xlabel="layer", ylabel="relative error vs dense layer", yscale="log")
    ax.legend()
    for r in records:
        bx.plot(r.losses, lw=0.8)
    bx.set(xlabel="step", ylabel="training loss per layer", yscale="log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
