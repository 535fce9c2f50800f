"""`struprune` command line: prepare the real model and text, prune, evaluate, report."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch

from . import __version__
from .data import cache_dir, ensure_texts, sample_calibration, tokenize
from .errors import StructPruneError

EVAL_TEXTS = ("wiki_test", "news")


def _units(value: str) -> tuple[str, ...]:
    return tuple(u.strip() for u in value.split(",") if u.strip())


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--texts", type=_units, default=EVAL_TEXTS, help="comma-separated: wiki_test,wiki_valid,news"
    )
    p.add_argument("--eval-seq-len", type=int, default=512, help="perplexity window length (tokens)")
    p.add_argument("--eval-stride", type=int, default=None, help="window stride (default: = seq len)")
    p.add_argument("--eval-max-windows", type=int, default=None, help="cap windows per text (quick runs)")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument(
        "--bos",
        choices=("auto", "on", "off"),
        default="auto",
        help="prepend BOS to each window: auto = where the tokenizer adds one",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="struprune", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("prepare", help="build the default model (SmolLM2-135M) and the texts into the cache")

    p = sub.add_parser("prune", help="prune a model layer by layer, save it, evaluate, report")
    p.add_argument("--model", default="smollm2", help="'smollm2' (default), 'tiny', or a local HF folder")
    p.add_argument(
        "--method",
        default="structprune",
        choices=("magnitude", "wanda-sp", "flap", "structprune", "global"),
        help="flap: FLAP reference (fluctuation, global standardised ranking, bias compensation); "
        "global: the O(N) reference, one energy threshold over all groups, same solver",
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
        "--mlp-round-to", type=int, default=1, help="keep every MLP width a multiple of this (e.g. 8 or 64)"
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
        action="store_true",
        help="the same head count and MLP width in every layer: a plain config that stock tools "
        "(transformers without the plugin, vLLM) load; uniform allocation only",
    )
    sp = p.add_argument_group("structprune (method=structprune)")
    sp.add_argument(
        "--temperature", type=float, default=math.inf, help="allocation temperature; inf = uniform (default)"
    )
    sp.add_argument("--energy", default="obs", choices=("obs", "wanda", "flap"), help="group energy")
    sp.add_argument("--admm-iterations", type=int, default=4)
    sp.add_argument("--no-aux", action="store_true", help="MLP solver without SparseLLM auxiliary variables")
    sp.add_argument("--no-refit", action="store_true", help="no least-squares refit of kept weights")
    sp.add_argument(
        "--bias-refit",
        action="store_true",
        help="the least-squares refits also fit o_proj/down_proj biases (Llama and OPT)",
    )
    sp.add_argument(
        "--energy-samples",
        type=int,
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
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--calib-text", default="wiki_train", help="split to sample calibration windows from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (streamed)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--output", type=Path, default=None, help="output folder (default runs/<model>-<method>-<s>)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    p.add_argument("--no-progress", action="store_true")
    _add_eval_args(p)

    e = sub.add_parser("eval", help="perplexity of a saved (pruned or dense) model folder")
    e.add_argument("folder", help="model folder, or 'smollm2' / 'tiny'")
    e.add_argument("--device", default="cpu")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    _add_eval_args(e)
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


def _weights_key(folder: Path) -> str:
    parts = [str(folder.resolve())]
    for f in [*sorted(folder.glob("*.safetensors")), folder / "config.json"]:
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def evaluate_texts(model, tokenizer, args, progress: bool, cache_key: str | None = None) -> dict:
    """Perplexity on each requested text; results of a dense model are cached by folder + protocol.

    `model` may be a callable that loads the model, so a fully cached evaluation loads nothing.
    """
    from .evaluation import perplexity

    corpus = ensure_texts()
    bos = _bos(args.bos, tokenizer)
    results = {}
    for text in args.texts:
        key = f"{cache_key}-{text}-{args.eval_seq_len}-{args.eval_stride}-{args.eval_max_windows}-{bos}"
        cached = cache_dir() / "ppl" / f"{key}.json"
        if cache_key and cached.exists():
            results[text] = json.loads(cached.read_text())
            continue
        if callable(model) and not isinstance(model, torch.nn.Module):
            model = model()
        ids = tokenize(tokenizer, corpus.read(text))
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
        if cache_key:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(ppl))
    return results


def _load(folder: Path, device: str):
    from transformers import AutoTokenizer

    from .checkpoint import load_pruned

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_pruned(folder).to(device)
    return model, tokenizer


def cmd_prepare(_args) -> int:
    from .zoo import ensure_smollm2

    corpus = ensure_texts()
    print(f"texts: {corpus.root}")
    print(f"model: {ensure_smollm2()}")
    return 0


def cmd_prune(args) -> int:
    from .architectures import model_view
    from .checkpoint import save_pruned
    from .engine import METHOD_NEEDS_CALIBRATION, PruneConfig, prune_model
    from .report import plot_layer_widths, render_markdown, write_report
    from .zoo import resolve_model

    progress = not args.no_progress
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
        temperature=args.temperature,
        energy=args.energy,
        admm_iterations=args.admm_iterations,
        use_aux=not args.no_aux,
        refit=not args.no_refit,
        energy_samples=args.energy_samples or None,
        refresh_energies=args.refresh_energies,
        kind_split=args.kind_split,
        bias_refit=args.bias_refit,
        bias_compensation=not args.no_bias_compensation,
    )
    config.validate()
    folder = resolve_model(args.model)
    output = args.output or Path("runs") / f"{folder.name}-{args.method}-{round(args.sparsity * 100)}"
    if output.exists() and not args.overwrite:
        raise StructPruneError(f"{output} already exists. Fix: choose another --output or pass --overwrite")
    model, tokenizer = _load(folder, "cpu")
    model_view(model)  # unsupported architectures fail here, before any work
    report: dict = {"struprune_version": __version__, "model": {"name": folder.name, "path": str(folder)}}
    calibration = None
    if METHOD_NEEDS_CALIBRATION[args.method]:
        corpus = ensure_texts()
        calibration = sample_calibration(
            tokenize(tokenizer, corpus.read(args.calib_text)), args.calib_samples, args.calib_len, args.seed
        )
        report["calibration"] = {
            "split": args.calib_text,
            "samples": args.calib_samples,
            "seq_len": args.calib_len,
            "seed": args.seed,
        }
    result = prune_model(model, calibration, config, inplace=True, progress=progress)
    pruned = result.model
    summary = result.summary()
    report["pruning"] = {
        "method": args.method,
        "settings": {k: v for k, v in vars(config).items() if k not in ("method", "device")},
        "layer_energies": result.layer_energies,
        "units": list(args.units),
        "head_unit": args.head_unit,
        "requested_sparsity": result.requested_sparsity,
        "achieved_sparsity": result.achieved_sparsity,
        "seconds": result.seconds,
        "device": args.device,
        "peak_memory_bytes": result.peak_memory_bytes,
        "peak_memory_kind": result.peak_memory_kind,
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
        # reference is cached per folder and protocol, and otherwise reloaded from disk.
        t0 = time.perf_counter()
        pruned_ppl = evaluate_texts(pruned.to(args.device), tokenizer, args, progress)
        report["eval_seconds"] = time.perf_counter() - t0
        pruned.to("cpu")
        dense_ppl = evaluate_texts(
            lambda: _load(folder, args.device)[0], tokenizer, args, progress, cache_key=_weights_key(folder)
        )
        report["perplexity"] = {t: {"dense": dense_ppl[t], "pruned": pruned_ppl[t]} for t in args.texts}

    def write_extras(tmp: Path) -> None:
        write_report(report, tmp)
        title = f"{folder.name}: {args.method} at {result.achieved_sparsity:.1%}"
        plot_layer_widths(report["layers"], tmp / "layer_widths.png", title)

    save_pruned(pruned, output, tokenizer=tokenizer, overwrite=args.overwrite, write_extras=write_extras)
    print(render_markdown(report))
    print(f"saved pruned model and report to {output}")
    return 0


def cmd_eval(args) -> int:
    from .zoo import resolve_model

    folder = resolve_model(args.folder)
    model, tokenizer = _load(folder, args.device)
    results = evaluate_texts(model, tokenizer, args, not args.no_progress)
    for text, r in results.items():
        print(
            f"{text}: ppl {r['ppl']:.3f} ({r['tokens']:,} tokens, {r['windows']} windows of {r['seq_len']})"
        )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"folder": str(folder), "perplexity": results}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"prepare": cmd_prepare, "prune": cmd_prune, "eval": cmd_eval}[args.command]
    try:
        return handler(args)
    except StructPruneError as err:
        print(f"struprune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
