"""ONNX export of a pruned folder through Optimum, with a token-for-token check in ONNX Runtime.

Runs in the export environment (`scripts/install_export_env.sh`: optimum-onnx needs
transformers < 4.58, which llm-compressor's environment cannot share). The pruned model types are
registered with AutoConfig / AutoModelForCausalLM and with Optimum's TasksManager (stock ONNX
configs of their base types), the folder is loaded with the plugin's own classes and exported with
Optimum's exporter functions (task `text-generation-with-past`: KV cache inputs and outputs), the
ONNX folder's config gets the base model type (ONNX Runtime needs no PyTorch classes), and greedy
generation in `ORTModelForCausalLM` is compared with PyTorch's.

A pruned folder carries a copy of `modeling_struprune.py` and an `auto_map`; that copy is code
from wherever the folder came from, so it runs only with `--trust-remote-code`
(`trust_remote_code=True`), as in transformers and Optimum.

    .venv-export/bin/python -m struprune_plugin.onnx_export runs/pruned runs/pruned-onnx
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from . import modeling_struprune
from .errors import StructPruneError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: The tasks this module exports: decoder-only generation, with or without the KV cache.
TEXT_GENERATION_TASKS = ("text-generation", "text-generation-with-past")


def load_causal_lm(folder: str | os.PathLike, trust_remote_code: bool = False) -> PreTrainedModel:
    """The folder's causal LM in float32 (as Optimum's exporter loads it), built by the plugin's
    registered classes (stock transformers classes for plain folders) through `load_pruned`. The folder's own
    `modeling_struprune.py` is imported only with `trust_remote_code=True`: without it
    transformers resolves the `struprune_*` model type from the registry and never reads the
    `auto_map` code, and a model type nobody registered fails instead of running the folder's code."""
    if not trust_remote_code:
        from .checkpoint import load_pruned  # safetensors only, config checked against its layout

        return load_pruned(folder, dtype=torch.float32)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32, use_safetensors=True
    ).eval()


def export_onnx(
    folder: str | os.PathLike,
    output: str | os.PathLike,
    task: str = "text-generation-with-past",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> Path:
    """Export `folder` to `output` (model.onnx + config); returns the output path.

    The model is loaded here (`load_causal_lm`) and handed to Optimum's exporter functions rather
    than to `main_export` / `onnx_export_from_model`: those tell a transformers model by its class's
    module name (`TasksManager.infer_library_from_model` accepts `transformers...` only, which the
    folder's remote code, imported as `transformers_modules...`, happens to match) and refuse the
    plugin's classes. The steps are theirs for a decoder-only model: the ONNX config from
    `TasksManager`, `get_decoder_models_for_export`, config / generation config / tokenizer next to
    the graph, `export_models`, and the config's post-processing (tied-weight deduplication).
    `trust_remote_code=True` runs the folder's `modeling_struprune.py` instead of the plugin's.

    The output goes through the same checks as every struprune output (not inside the model
    folder; `overwrite` replaces only a folder struprune wrote) and appears only complete."""
    from .outputs import check_output_folder, write_folder_atomically

    if task not in TEXT_GENERATION_TASKS:
        raise StructPruneError(
            f"task {task!r} is not exported here. Fix: use one of {', '.join(TEXT_GENERATION_TASKS)}"
        )
    if not modeling_struprune.register_onnx_export():
        raise StructPruneError(
            "Optimum's ONNX exporter (optimum-onnx) is not installed in this environment; it needs "
            "transformers < 4.58, which the main environment cannot share. Fix: run in the export "
            "environment: bash scripts/install_export_env.sh, then .venv-export/bin/python -m "
            "struprune_plugin.onnx_export FOLDER OUT"
        )
    check_output_folder(output, [folder], overwrite)  # before the model is loaded
    from optimum.exporters.onnx import export_models
    from optimum.exporters.tasks import TasksManager
    from optimum.exporters.utils import get_decoder_models_for_export
    from optimum.utils.save_utils import maybe_save_preprocessors

    folder, output = Path(folder), Path(output)
    model = load_causal_lm(folder, trust_remote_code)
    model.config.use_cache = task.endswith("-with-past")
    constructor = TasksManager.get_exporter_config_constructor(
        exporter="onnx", model=model, task=task, library_name="transformers"
    )
    onnx_config = constructor(model.config, int_dtype="int64", float_dtype="fp32")
    models_and_configs = get_decoder_models_for_export(model, onnx_config)
    onnx_files = [f"{name}.onnx" for name in models_and_configs]

    def build(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        maybe_save_preprocessors(folder, tmp, trust_remote_code=trust_remote_code)
        export_models(models_and_onnx_configs=models_and_configs, output_dir=tmp, output_names=onnx_files)
        onnx_config.post_process_exported_models(tmp, models_and_configs, onnx_files)
        _stock_onnx_config(tmp / "config.json")

    return write_folder_atomically(output, build, [folder], overwrite)


def _stock_onnx_config(path: Path) -> None:
    """Make the ONNX folder's config say what ONNX Runtime's decoder needs (it builds no PyTorch
    model): the base model type (GQA types shape the KV cache from num_key_value_heads), and a
    num_attention_heads with hidden_size / num_attention_heads == head_dim, because that quotient
    is what it uses as the cache's head size even when the config states head_dim. The real
    per-layer head counts are in the ONNX graph and in `struprune_layout`."""
    data = json.loads(path.read_text())
    prefix = modeling_struprune.MODEL_TYPE_PREFIX
    if data.get("model_type", "").startswith(prefix):
        base = data["model_type"][len(prefix) :]
        data["model_type"] = base
        data["architectures"] = [modeling_struprune.PRUNED_CLASSES[base][1].__mro__[1].__name__]
        data.pop("auto_map", None)
    head_dim, hidden = data.get("head_dim"), data.get("hidden_size")
    if head_dim and hidden and hidden % head_dim == 0 and data.get("model_type") != "opt":
        data["num_attention_heads"] = hidden // head_dim
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def cpu_session_options(threads: int | None = None, spinning: bool = False):
    """ONNX Runtime session options for CPU generation. Spinning is off by default because
    `generate()` runs PyTorch work (argmax, logits processors, masks) between session calls on the
    same cores: ONNX Runtime's spinning intra-op threads then compete with it (on 2 cores a batch-8
    greedy step of pruned SmolLM2 took 36 ms with spinning and 29 ms without). A loop that only
    calls the session gains from spinning (`spinning=True`: 13 ms against 15 ms a step)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def ort_model_class():
    """`ORTModelForCausalLM` that also runs pruned models whose layers keep different K/V head
    counts (or whose config cannot state them, OPT): the stock class builds the first step's
    empty KV cache from one config head count; this one reads `struprune_layout`."""
    from optimum.onnxruntime import ORTModelForCausalLM

    class StruPruneORTModelForCausalLM(ORTModelForCausalLM):
        def forward(self, input_ids, attention_mask=None, past_key_values=None, *args, **kwargs):
            heads = modeling_struprune.kv_heads_per_layer(self.config)
            if past_key_values is None and heads and self.key_value_input_names:
                layout = getattr(self.config, modeling_struprune.LAYOUT_KEY)
                past_key_values = tuple(
                    tuple(
                        torch.zeros(input_ids.shape[0], h, 0, int(layout["head_dim"]), dtype=self.dtype)
                        for _ in range(2)
                    )
                    for h in heads
                )
            return super().forward(input_ids, attention_mask, past_key_values, *args, **kwargs)

    return StruPruneORTModelForCausalLM


def compare_generation(
    folder: Path, onnx_dir: Path, prompts: torch.Tensor, new_tokens: int, trust_remote_code: bool = False
) -> dict:
    """Greedy generation in PyTorch and in ONNX Runtime (with its KV cache), token for token. The
    PyTorch side uses the plugin's classes; `trust_remote_code=True` runs the folder's own code."""
    torch_model = load_causal_lm(folder, trust_remote_code)
    ort_model = ort_model_class().from_pretrained(onnx_dir, session_options=cpu_session_options())
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    mask = torch.ones_like(prompts)
    with torch.no_grad():
        expected = torch_model.generate(prompts, attention_mask=mask, **kwargs)
        got = ort_model.generate(prompts, attention_mask=mask, **kwargs)
        logit_diff = (
            (torch_model(input_ids=prompts).logits - ort_model(input_ids=prompts, attention_mask=mask).logits)
            .abs()
            .max()
            .item()
        )
    return {
        "tokens_equal": bool(torch.equal(expected, got)),
        "generated": int(expected.shape[1] - prompts.shape[1]),
        "max_logit_diff": logit_diff,
        "uses_kv_cache": bool(ort_model.use_cache),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a pruned (or dense) HF folder")
    parser.add_argument("output", type=Path, help="where the ONNX model goes")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="load the model with the folder's own modeling_struprune.py (runs code from the folder) "
        "instead of the plugin's classes",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a folder struprune wrote")
    args = parser.parse_args()
    try:
        return _export_and_compare(args)
    except StructPruneError as err:
        print(f"onnx_export: error: {err}", file=sys.stderr)
        return 2


def _export_and_compare(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    export_onnx(args.folder, args.output, trust_remote_code=args.trust_remote_code, overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    vocab = json.loads((args.folder / "config.json").read_text())["vocab_size"]
    prompts = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    report = {
        "export_seconds": seconds,
        **compare_generation(
            args.folder, args.output, prompts, args.new_tokens, trust_remote_code=args.trust_remote_code
        ),
    }
    print(json.dumps(report, indent=1))
    return 0 if report["tokens_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
