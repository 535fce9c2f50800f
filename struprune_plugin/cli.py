"""`struprune` command line: prepare the real model and text, prune, evaluate, report."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch

from . import __version__
from .admm import RIDGE_SCALES
from .allocators import ALLOCATIONS, DEFAULT_TEMPERATURE
from .data import TEXT_SHA256, cache_dir, ensure_texts, sample_calibration, tokenize
from .errors import CheckpointError, StructPruneError, first_line

EVAL_TEXTS = ("wiki_test", "news")


def _units(value: str) -> tuple[str, ...]:
    return tuple(u.strip() for u in value.split(",") if u.strip())


def _allocation_option(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as JSON where it parses (0.08, null, [1, 1.5]), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. max_deviation=0.08); got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _int_at_least(least: int):
    """An argparse type: an integer >= `least`, refused with the option's own usage line otherwise."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if number < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {number}")
        return number

    return parse


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--texts",
        type=_units,
        default=None,
        help="built-in texts, comma-separated: wiki_test,wiki_valid,news,newsgroups (default wiki_test,news "
        "unless --text is given)",
    )
    p.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="SOURCE",
        help="your own evaluation text (repeatable): a .txt, .jsonl/.json, .parquet/.csv file or a "
        "datasets save_to_disk folder",
    )
    p.add_argument(
        "--text-field", default="text", help="the field holding the text in JSON-lines and dataset sources"
    )
    p.add_argument(
        "--eval-seq-len", type=_int_at_least(2), default=512, help="perplexity window length (tokens)"
    )
    p.add_argument(
        "--eval-stride", type=_int_at_least(1), default=None, help="window stride (default: = seq len)"
    )
    p.add_argument(
        "--eval-max-windows", type=_int_at_least(1), default=None, help="cap windows per text (quick runs)"
    )
    p.add_argument("--eval-batch-size", type=_int_at_least(1), default=4)
    p.add_argument(
        "--bos",
        choices=("auto", "on", "off"),
        default="auto",
        help="prepend BOS to each evaluation and calibration window: auto = where the tokenizer adds one",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="struprune", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser(
        "prepare", help="build a real model (default SmolLM2-135M) and the texts into the cache"
    )
    prep.add_argument("--model", default="smollm2", help="'smollm2' (default) or 'gemma3-270m'")

    p = sub.add_parser("prune", help="prune a model layer by layer, save it, evaluate, report")
    p.add_argument(
        "--model", default="smollm2", help="'smollm2' (default), 'gemma3-270m', 'tiny', or a local HF folder"
    )
    p.add_argument(
        "--method",
        default="structprune",
        choices=(
            "magnitude",
            "wanda-sp",
            "flap",
            "structprune",
            "energy-threshold",
            "global-taylor",
            "global",
        ),
        help="flap: FLAP reference (fluctuation, global standardised ranking, bias compensation); "
        "energy-threshold (formerly 'global', still accepted): one threshold over every group's local "
        "energy, same solver (streamed, not a global method); global-taylor: the O(N) global reference (gradient of the whole model's loss, "
        "first-order Taylor importance, one ranking over all groups, least-squares refits)",
    )
    p.add_argument("--sparsity", type=float, default=0.3, help="fraction of prunable parameters to remove")
    p.add_argument("--units", type=_units, default=("mlp", "heads"), help="mlp,heads | mlp | heads")
    p.add_argument("--head-unit", default="auto", choices=("auto", "query", "kv_group"))
    p.add_argument(
        "--head-sparsity",
        type=float,
        default=None,
        help="remove exactly this fraction of heads in every layer (must be feasible under GQA)",
    )
    p.add_argument(
        "--mlp-round-to",
        type=_int_at_least(1),
        default=None,
        help="keep every MLP width a multiple of this (default for structprune: 32, else 8, where "
        "every layer's width is a multiple with 16 steps or more, else 1; 1 = exact widths)",
    )
    p.add_argument(
        "--skip-layers",
        type=int,
        nargs="+",
        default=[],
        metavar="I",
        help="decoder layer indices kept dense; the sparsity then counts the other layers only",
    )
    p.add_argument(
        "--equal-widths",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the same head count and MLP width in every layer: a plain config that stock tools "
        "(transformers without the plugin, vLLM, llama.cpp's llama graph) load; it makes StructPrune's "
        "allocation uniform. Default: on for uniform allocation (--temperature inf) when every layer starts alike",
    )
    sp = p.add_argument_group("structprune (method=structprune)")
    sp.add_argument(
        "--allocation",
        choices=("auto", *ALLOCATIONS),
        default="auto",
        help="layer allocation rule: uniform, energy (the paper's softmax over layer energies), "
        "energy-relative (energies relative to the residual stream), kl / kl-knapsack (measured "
        "end-to-end KL per layer), slimgpt, owl, threshold; auto (default) = energy-relative with every "
        "layer's keep share within 0.8 to 1.2 times the mean at finite T, uniform at T = inf",
    )
    sp.add_argument(
        "--allocation-option",
        type=_allocation_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the allocation rule, repeatable (e.g. max_deviation=0.08 for kl-knapsack and the softmax rules, "
        "lam=0.05 for owl)",
    )
    sp.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help="softmax temperature of the energy, energy-relative and kl rules (default 1); inf = uniform",
    )
    sp.add_argument(
        "--sensitivity-samples",
        type=_int_at_least(1),
        default=2,
        help="calibration windows for the measured-KL pass (allocation kl, kl-knapsack)",
    )
    sp.add_argument("--energy", default="obs", choices=("obs", "wanda", "flap"), help="group energy")
    sp.add_argument("--admm-iterations", type=_int_at_least(0), default=4)
    sp.add_argument(
        "--heal-steps",
        type=_int_at_least(0),
        default=0,
        help="heal inside the walk: gradient steps per pruned layer towards the dense layer's output (0: off)",
    )
    sp.add_argument(
        "--heal-lr", type=float, default=1e-3, help="learning rate of --heal-steps (cosine decay)"
    )
    sp.add_argument("--no-aux", action="store_true", help="MLP solver without SparseLLM auxiliary variables")
    sp.add_argument("--no-refit", action="store_true", help="no least-squares refit of kept weights")
    sp.add_argument(
        "--bias-refit",
        action="store_true",
        help="the least-squares refits also fit o_proj/down_proj biases (Llama and OPT)",
    )
    sp.add_argument(
        "--damping",
        type=float,
        default=0.01,
        help="ridge damping of the least-squares solves (times what --ridge-scale says)",
    )
    sp.add_argument(
        "--ridge-scale",
        choices=RIDGE_SCALES,
        default="mean",
        help="what --damping multiplies: the Gram's mean diagonal on every channel (mean), or each "
        "input channel's own second moment (channel: scale-free, massive activations do not set "
        "every channel's ridge)",
    )
    sp.add_argument(
        "--solver-tokens",
        type=_int_at_least(1),
        default=None,
        help="calibration tokens the MLP solver fits on per layer (a seeded subsample beyond that); "
        "default: 4 per kept MLP channel, at least 8192",
    )
    sp.add_argument(
        "--energy-samples",
        type=_int_at_least(0),
        default=32,
        help="calibration windows for the energy pass (0 = all); one mean per layer needs few",
    )
    sp.add_argument(
        "--refresh-energies",
        action="store_true",
        help="re-measure each layer's energy on the pruned prefix and re-allocate the rest of the budget",
    )
    sp.add_argument(
        "--kind-split",
        choices=("auto", "mlp-first", "ratio", "energy"),
        default="auto",
        help="how a layer's budget is shared between heads and MLP channels: mlp-first (channels "
        "take it, heads only what capped channels cannot; StructPrune's default), the allocation's "
        "ratio (the references' default), or one energy-per-parameter threshold over the layer",
    )
    fp = p.add_argument_group("flap (method=flap)")
    fp.add_argument(
        "--no-bias-compensation", action="store_true", help="FLAP without folding removed means into biases"
    )
    p.add_argument("--calib-samples", type=_int_at_least(1), default=128, help="calibration windows")
    p.add_argument("--calib-len", type=_int_at_least(2), default=512, help="tokens per calibration window")
    p.add_argument(
        "--calib-text",
        default="wiki_train",
        choices=sorted(TEXT_SHA256),
        help="built-in split to sample calibration windows from",
    )
    p.add_argument(
        "--calib-data",
        default=None,
        metavar="SOURCE",
        help="your own calibration text instead: a .txt, .jsonl/.json, .parquet/.csv file or a datasets "
        "save_to_disk folder (field: --text-field)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_int_at_least(1), default=8, help="calibration batch size (streamed)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--output", type=Path, default=None, help="output folder (default runs/<model>-<method>-<s>)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output folder, only if struprune wrote it and it holds nothing else",
    )
    p.add_argument(
        "--allow-shortfall",
        action="store_true",
        help="prune as far as the units allow when --sparsity is out of reach (exit 0, noted in the report)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--stream-weights",
        action="store_true",
        help="never hold the whole model: read one decoder layer at a time from the folder's "
        "safetensors, prune it, write it to the output, drop it (perplexity is then measured on "
        "the saved output; add --no-eval for models larger than memory)",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype the layers run and are saved in (auto: the checkpoint's); statistics and solves "
        "stay float32/float64, perplexity is measured in float32",
    )
    _add_eval_args(p)

    e = sub.add_parser("eval", help="perplexity of a saved (pruned or dense) model folder")
    e.add_argument("folder", help="model folder, or 'smollm2' / 'tiny'")
    e.add_argument("--device", default="cpu")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    e.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output file (only a results JSON)"
    )
    _add_eval_args(e)

    from .healing.command import add_parser as add_heal_parser

    add_heal_parser(sub, _add_eval_args, _int_at_least)

    x = sub.add_parser("export", help="write a saved model folder in a serving engine's format")
    xs = x.add_subparsers(dest="format", required=True)
    g = xs.add_parser(
        "gguf",
        help="one self-contained GGUF file for llama.cpp / Ollama / LM Studio "
        "(stock llama architecture when every layer is the same, deci when they differ)",
    )
    g.add_argument("folder", help="a folder written by 'struprune prune' (or a plain HF Llama folder)")
    g.add_argument("out", type=Path, help="the .gguf file to write")
    g.add_argument("--outtype", choices=("f32", "f16", "q8_0"), default="f16")
    g.add_argument("--overwrite", action="store_true", help="replace an existing file")
    v = xs.add_parser(
        "vllm",
        help="a folder vLLM serves (experimental: not run in vLLM by the test suite): a stock checkpoint "
        "when every layer is the same, the DeciLM layout (block_configs, --trust-remote-code) when K/V "
        "heads or MLP widths differ",
    )
    v.add_argument("folder", help="a folder written by 'struprune prune' (or a plain HF folder)")
    v.add_argument("out", type=Path, help="the folder to write")
    v.add_argument("--overwrite", action="store_true", help="replace a folder struprune wrote")
    return parser


def _bos(mode: str, tokenizer) -> int | None:
    from .evaluation import default_bos

    if mode == "off":
        return None
    if mode == "on":
        if tokenizer.bos_token_id is None:
            raise StructPruneError("--bos on, but the tokenizer defines no BOS token")
        return tokenizer.bos_token_id
    return default_bos(tokenizer)


def folder_digest(folder: Path) -> str:
    """The content of every file in a model folder: weights in any format, config and tokenizer
    each change a perplexity, and a file replaced in place keeps neither size nor mtime honest."""
    from .zoo import file_sha256

    files = sorted(p for p in folder.iterdir() if p.is_file())
    return hashlib.sha256("|".join(f"{f.name}:{file_sha256(f)}" for f in files).encode()).hexdigest()


def _dense_cache_key(digest: str, args, text: str, text_sha256: str, bos: int | None) -> str:
    """Cache key of a dense perplexity: the folder's content, the text's and every evaluation setting."""
    settings = [
        digest,
        text,
        text_sha256,
        args.eval_seq_len,
        args.eval_stride,
        args.eval_max_windows,
        args.eval_batch_size,
        bos,
        torch.device(args.device).type,
        __version__,
    ]
    return hashlib.sha256("|".join(map(str, settings)).encode()).hexdigest()[:24]


def evaluate_texts(
    model,
    tokenizer,
    args,
    progress: bool,
    dense_of: Path | None = None,
    inputs: EvalInputs | None = None,
) -> dict:
    """Perplexity on each of `args.texts`; the dense model's results are cached by folder content +
    protocol (`dense_of` names its folder). `model` may be a callable that loads the model, so a
    fully cached evaluation loads nothing; `inputs` are `eval_inputs`' ids and BOS when known."""
    from .evaluation import perplexity
    from .outputs import write_text_atomic

    inputs = inputs or eval_inputs(model, tokenizer, args)
    bos = inputs.bos
    digest = folder_digest(dense_of) if dense_of else None
    results = {}
    for text, ids in inputs.ids.items():
        key = _dense_cache_key(digest, args, text, inputs.sources[text]["sha256"], bos) if digest else None
        cached = cache_dir() / "ppl" / f"{key}.json" if key else None
        if cached is not None and cached.exists():
            results[text] = json.loads(cached.read_text())
            continue
        if callable(model) and not isinstance(model, torch.nn.Module):
            model = model()
        ppl = perplexity(
            model,
            ids,
            seq_len=args.eval_seq_len,
            stride=args.eval_stride,
            bos_token_id=bos,
            batch_size=args.eval_batch_size,
            max_windows=args.eval_max_windows,
            device=args.device,
            progress=progress,
            desc=f"ppl {text}",
        ).as_dict()
        results[text] = ppl
        if cached is not None:
            write_text_atomic(cached, json.dumps(ppl))
    return results


@dataclass
class EvalInputs:
    """Evaluation texts as token ids by label, where each came from, and the BOS choice."""

    ids: dict[str, torch.Tensor]
    sources: dict[str, dict]
    bos: int | None


def evaluation_texts(args) -> dict[str, tuple[str, dict]]:
    """Label -> (text, description) for the built-in texts and the user's `--text` sources."""
    from .sources import read_text_source

    user = list(getattr(args, "text", None) or [])
    builtin = args.texts if args.texts is not None else (() if user else EVAL_TEXTS)
    corpus = ensure_texts() if builtin else None
    texts = {
        name: (corpus.read(name), {"source": name, "kind": "built-in", "sha256": TEXT_SHA256[name]})
        for name in builtin
    }
    for given in user:
        source = read_text_source(given, getattr(args, "text_field", "text"))
        label = source.label if source.label not in texts else source.path
        texts[label] = (source.text, source.describe())
    return texts


def eval_inputs(model, tokenizer, args) -> EvalInputs:
    """The evaluation texts as ids, checked against the model (vocabulary, positions) up front, so
    a run does not prune for minutes and then fail in its evaluation."""
    from .evaluation import check_windows

    bos = _bos(args.bos, tokenizer)
    texts = evaluation_texts(args)
    ids = {label: tokenize(tokenizer, text) for label, (text, _) in texts.items()}
    for label, tokens in ids.items():
        try:
            check_windows(model, tokens, args.eval_seq_len, bos)
        except StructPruneError as err:
            raise type(err)(f"evaluation text {label!r}: {err}") from err
    return EvalInputs(ids=ids, sources={label: info for label, (_, info) in texts.items()}, bos=bos)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not present:
        raise CheckpointError(
            f"{folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}). Fix: save the "
            "tokenizer of the model it came from into the folder (tokenizer.save_pretrained(folder))"
        )
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # transformers raises many kinds here, some with misleading advice
        raise CheckpointError(
            f"{folder}: the tokenizer ({', '.join(present)}) cannot be loaded: {type(err).__name__}: "
            f"{first_line(err)}. Fix: restore the tokenizer files saved "
            "with the model"
        ) from err


def _load(folder: Path, device: str, dtype: torch.dtype | None = None):
    from .checkpoint import load_pruned

    model = load_pruned(folder, dtype).to(device)  # checks the folder's config and weights first
    return model, _load_tokenizer(folder)


def cmd_prepare(args) -> int:
    from .zoo import resolve_model

    corpus = ensure_texts()
    print(f"texts: {corpus.root}")
    print(f"model: {resolve_model(args.model)}")
    return 0


def _check_text_sources(args) -> None:
    """The user's --calib-data and --text sources exist and can be read, before any model loads."""
    from .sources import check_text_source

    for source in [getattr(args, "calib_data", None), *(getattr(args, "text", None) or [])]:
        if source:
            check_text_source(source)


def calibration_text(args) -> tuple[str, dict]:
    """The calibration text (the user's --calib-data, else the built-in split) and its origin."""
    from .sources import read_text_source

    if args.calib_data:
        source = read_text_source(args.calib_data, args.text_field)
        return source.text, source.describe()
    return ensure_texts().read(args.calib_text), {
        "split": args.calib_text,
        "source": args.calib_text,
        "kind": "built-in",
        "sha256": TEXT_SHA256.get(args.calib_text),
    }


def _join_process_group(args) -> bool:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL with one GPU per rank for
    `--device cuda`, gloo on CPU. Returns whether this process started it. The launcher's variables
    are checked and the wait for the other processes is bounded (`distributed.join_process_group`),
    so a launch that cannot form a group exits at once with the reason instead of hanging."""
    from .distributed import join_process_group

    started, args.device = join_process_group(args.device)
    return started


def cmd_prune(args) -> int:
    """Under torchrun every rank prunes on its share of the calibration windows (see
    `distributed`); rank 0 evaluates, saves and prints."""
    import torch.distributed as dist

    started = _join_process_group(args)
    try:
        return _cmd_prune(args)
    finally:
        if started:
            dist.destroy_process_group()


def _cmd_prune(args) -> int:
    with contextlib.ExitStack() as claims:  # the output stays claimed until the run has written it
        return _prune_command(args, claims)


def _prune_command(args, claims: contextlib.ExitStack) -> int:
    from . import distributed
    from .architectures import model_view
    from .checkpoint import save_pruned
    from .engine import METHOD_ALIASES, METHOD_NEEDS_CALIBRATION, PruneConfig, prune_model
    from .outputs import add_to_manifest, check_output_folder, output_lock
    from .report import plot_layer_widths, render_markdown, write_report
    from .zoo import resolve_model

    progress = not args.no_progress and distributed.is_writer()
    args.method = METHOD_ALIASES.get(args.method, args.method)
    config = PruneConfig(
        method=args.method,
        sparsity=args.sparsity,
        units=args.units,
        head_unit=args.head_unit,
        head_sparsity=args.head_sparsity,
        mlp_round_to=args.mlp_round_to,
        skip_layers=tuple(args.skip_layers),
        equal_widths=args.equal_widths,
        batch_size=args.batch_size,
        device=args.device,
        allocation=args.allocation,
        allocation_options=dict(args.allocation_option),
        sensitivity_samples=args.sensitivity_samples,
        temperature=args.temperature,
        energy=args.energy,
        admm_iterations=args.admm_iterations,
        use_aux=not args.no_aux,
        refit=not args.no_refit,
        energy_samples=args.energy_samples or None,
        refresh_energies=args.refresh_energies,
        kind_split=args.kind_split,
        bias_refit=args.bias_refit,
        damping=args.damping,
        ridge_scale=args.ridge_scale,
        solver_tokens=args.solver_tokens,
        bias_compensation=not args.no_bias_compensation,
        allow_shortfall=args.allow_shortfall,
        heal_steps=args.heal_steps,
        heal_lr=args.heal_lr,
    )
    config.validate()
    _check_text_sources(args)
    folder = resolve_model(args.model)
    output = args.output or Path("runs") / f"{folder.name}-{args.method}-{round(args.sparsity * 100)}"
    check_output_folder(output, [folder], args.overwrite)  # before any work
    if distributed.is_writer():  # a second run with the same output is refused now, not at the end
        claims.enter_context(output_lock(output))
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.stream_weights:
        from .streaming import skeleton

        model, tokenizer = skeleton(folder, dtype), _load_tokenizer(folder)
    else:
        model, tokenizer = _load(folder, "cpu", dtype)
    model_view(model)  # unsupported architectures fail here, before any work
    inputs = None if args.no_eval else eval_inputs(model, tokenizer, args)
    report: dict = {"struprune_version": __version__, "model": {"name": folder.name, "path": str(folder)}}
    calibration = None
    if METHOD_NEEDS_CALIBRATION[args.method]:
        text, origin = calibration_text(args)
        bos = _bos(args.bos, tokenizer)
        calibration = sample_calibration(
            tokenize(tokenizer, text), args.calib_samples, args.calib_len, args.seed, bos_token_id=bos
        )
        report["calibration"] = {
            **origin,
            "samples": args.calib_samples,
            "seq_len": args.calib_len,
            "seed": args.seed,
            "bos": bos is not None,
        }
    if args.stream_weights:
        from .streaming import prune_checkpoint

        del model
        result = prune_checkpoint(
            folder, output, calibration, config, dtype=dtype, overwrite=args.overwrite, progress=progress
        )
    else:
        result = prune_model(model, calibration, config, inplace=True, progress=progress)
    if not distributed.is_writer():
        return 0  # rank 0 evaluates and saves the (identical) result
    pruned = result.model
    summary = result.summary()
    report["pruning"] = {
        "method": args.method,
        "settings": {k: v for k, v in vars(result.config).items() if k not in ("method", "device")},
        "layer_energies": result.layer_energies,
        "allocation": result.allocation,
        "units": list(args.units),
        "head_unit": args.head_unit,
        "requested_sparsity": result.requested_sparsity,
        "achieved_sparsity": result.achieved_sparsity,
        "budget_missed": result.budget_missed,
        "seconds": result.seconds,
        "device": args.device,
        "peak_memory_bytes": result.peak_memory_bytes,
        "peak_memory_kind": result.peak_memory_kind,
        "weights": "streamed from disk" if args.stream_weights else "in memory",
        "processes": distributed.world(),
        "dtype": str(next(pruned.parameters()).dtype).removeprefix("torch."),
    }
    report["params"] = {
        "total_before": result.params_before,
        "total_after": result.params_after,
        "prunable_before": result.prunable_before,
        "prunable_after": result.prunable_after,
    }
    report["layers"] = summary["layers"]
    report["environment"] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if not args.no_eval:
        # Pruning ran first so its memory figure is not inflated by evaluation buffers; the dense
        # reference is cached per folder content and protocol, and otherwise reloaded from disk.
        t0 = time.perf_counter()
        if args.stream_weights:
            evaluated = _load(output, args.device, torch.float32)[0]
        else:  # float32 for the evaluation; back to the run's dtype (exactly) before saving
            run_dtype = next(pruned.parameters()).dtype
            evaluated = pruned.to(args.device, torch.float32)
        pruned_ppl = evaluate_texts(evaluated, tokenizer, args, progress, inputs=inputs)
        report["eval_seconds"] = time.perf_counter() - t0
        del evaluated
        if not args.stream_weights:
            pruned.to("cpu", run_dtype)
        dense_ppl = evaluate_texts(
            lambda: _load(folder, args.device)[0], tokenizer, args, progress, dense_of=folder, inputs=inputs
        )
        report["perplexity"] = {t: {"dense": dense_ppl[t], "pruned": pruned_ppl[t]} for t in inputs.ids}
        report["evaluation_texts"] = inputs.sources

    def write_extras(tmp: Path) -> None:
        write_report(report, tmp)
        title = f"{folder.name}: {args.method} at {result.achieved_sparsity:.1%}"
        plot_layer_widths(report["layers"], tmp / "layer_widths.png", title)

    if args.stream_weights:  # the folder is written: add the report (atomically, file by file)
        write_extras(output)
        add_to_manifest(output, ["struprune_report.json", "struprune_report.md", "layer_widths.png"])
    else:
        save_pruned(pruned, output, tokenizer=tokenizer, overwrite=args.overwrite, write_extras=write_extras)
    print(render_markdown(report))
    print(f"saved pruned model and report to {output}")
    if result.budget_missed:
        print(f"struprune: warning: {result.budget_missed}", file=sys.stderr)
        if not args.allow_shortfall:
            print(
                "struprune: the model was saved, but the budget was missed: exit 3. Fix: pass "
                "--allow-shortfall to accept it, or change --units / --mlp-round-to",
                file=sys.stderr,
            )
            return EXIT_BUDGET_MISSED
    return 0


def cmd_export(args) -> int:
    from .export.gguf_model import export_gguf
    from .zoo import resolve_model

    if args.format == "vllm":
        from .export.vllm_folder import export_vllm

        done = export_vllm(resolve_model(args.folder), args.out, args.overwrite)
        serve = "vllm serve " + str(done.path) + (" --trust-remote-code" if done.layout == "deci" else "")
        print(
            f"wrote {done.path}: {done.layout} layout ({done.architecture}), {len(done.intermediate_sizes)} "
            f"layers, {done.num_attention_heads} query heads, K/V heads {min(done.num_key_value_heads)}-"
            f"{max(done.num_key_value_heads)}, MLP widths {min(done.intermediate_sizes)}-"
            f"{max(done.intermediate_sizes)}\nserve with: {serve}"
        )
        return 0
    info = export_gguf(resolve_model(args.folder), args.out, args.outtype, args.overwrite)
    widths = info.feed_forward_length
    print(
        f"wrote {info.path} ({info.path.stat().st_size / 2**20:.1f} MiB): architecture {info.architecture}, "
        f"{info.outtype}, {len(widths)} layers, heads {min(info.head_count)}-{max(info.head_count)}, "
        f"KV heads {min(info.head_count_kv)}-{max(info.head_count_kv)}, MLP widths {min(widths)}-{max(widths)}, "
        f"tokenizer {info.vocabulary['model']}/{info.vocabulary['pre']}"
    )
    if info.f16_fallbacks:
        print(
            f"note: {len(info.f16_fallbacks)} tensors kept in f16: their rows do not split into Q8_0 blocks of 32"
        )
    return 0


def cmd_eval(args) -> int:
    from .devices import resolve_device
    from .outputs import check_output_file
    from .zoo import resolve_model

    resolve_device(args.device)
    _check_text_sources(args)
    folder = resolve_model(args.folder)
    if args.output:
        check_output_file(args.output, "--output", [folder], args.overwrite, ours=_is_eval_results)
    model, tokenizer = _load(folder, args.device)
    results = evaluate_texts(model, tokenizer, args, not args.no_progress)
    for text, r in results.items():
        print(
            f"{text}: ppl {r['ppl']:.3f} ({r['tokens']:,} tokens, {r['windows']} windows of {r['seq_len']})"
        )
    if args.output:
        from .outputs import write_text_atomic

        write_text_atomic(args.output, json.dumps({"folder": str(folder), "perplexity": results}, indent=2))
    return 0


def _is_eval_results(path: Path) -> bool:
    """A JSON file `struprune eval --output` wrote: the only kind its --overwrite replaces."""
    try:
        return "perplexity" in json.loads(path.read_text())
    except (ValueError, OSError, TypeError):
        return False


#: Exit codes: 2 bad input (nothing written), 3 the model was saved but missed its sparsity budget.
EXIT_BAD_INPUT = 2
EXIT_BUDGET_MISSED = 3


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .healing.command import cmd_heal

    handler = {
        "prepare": cmd_prepare,
        "prune": cmd_prune,
        "eval": cmd_eval,
        "export": cmd_export,
        "heal": cmd_heal,
    }[args.command]
    try:
        return handler(args)
    except StructPruneError as err:
        if args.debug:
            raise
        print(f"struprune: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        if args.debug:
            raise
        print(
            f"struprune: error: {type(err).__name__}: {err}\n"
            "(unexpected: rerun with --debug for the traceback, and report it if the input was valid)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
