"""ONNX export of a pruned folder through Optimum, with a token-for-token check in ONNX Runtime.

Runs in the export environment (`scripts/install_export_env.sh`: optimum-onnx needs
transformers < 4.58, which llm-compressor's environment cannot share). The pruned model types are
registered with Optimum's TasksManager (stock ONNX configs of their base types), the folder is
exported with `main_export` (task `text-generation-with-past`: KV cache inputs and outputs), the
ONNX folder's config gets the base model type (ONNX Runtime needs no PyTorch classes), and greedy
generation in `ORTModelForCausalLM` is compared with PyTorch's.

    .venv-export/bin/python -m struprune_plugin.onnx_export runs/pruned runs/pruned-onnx
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from . import modeling_struprune


def export_onnx(
    folder: str | os.PathLike, output: str | os.PathLike, task: str = "text-generation-with-past"
):
    """Export `folder` to `output` (model.onnx + config); returns the output path."""
    from optimum.exporters.onnx import main_export

    folder, output = Path(folder), Path(output)
    if not modeling_struprune.register_onnx_export():
        raise ImportError(
            "Optimum's ONNX exporter is not installed here. Fix: run in the export environment "
            "(bash scripts/install_export_env.sh; .venv-export/bin/python ...)"
        )
    # The folder's own modeling file (trust_remote_code) loads the classes under a
    # `transformers_modules` module, which is how Optimum recognises a transformers model.
    main_export(
        str(folder),
        str(output),
        task=task,
        library_name="transformers",
        trust_remote_code=True,
        do_validation=False,
    )
    _stock_onnx_config(output / "config.json")
    return output


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


def compare_generation(folder: Path, onnx_dir: Path, prompts: torch.Tensor, new_tokens: int) -> dict:
    """Greedy generation in PyTorch and in ONNX Runtime (with its KV cache), token for token."""
    from transformers import AutoModelForCausalLM

    torch_model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
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
    args = parser.parse_args()
    start = time.perf_counter()
    export_onnx(args.folder, args.output)
    seconds = time.perf_counter() - start
    vocab = json.loads((args.folder / "config.json").read_text())["vocab_size"]
    prompts = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    report = {
        "export_seconds": seconds,
        **compare_generation(args.folder, args.output, prompts, args.new_tokens),
    }
    print(json.dumps(report, indent=1))
    return 0 if report["tokens_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
