"""Write a saved (pruned or dense) model folder as a folder vLLM serves.

* Every layer alike: the folder is a stock checkpoint (the base config with the pruned widths,
  no remote code), which `vllm serve` and any transformers tool load as they are.
* Layers differ: the DeciLM (Nemotron-NAS) layout that vLLM's `DeciLMForCausalLM` builds: a Llama
  config with `block_configs`, one entry per layer giving its K/V grouping
  (`attention.n_heads_in_group`, so K/V heads = query heads / group) and its exact MLP width
  (`ffn.intermediate_size`). Weights keep the Llama names. The config class ships as
  `configuration_decilm.py` (served with `--trust-remote-code`).

What that layout cannot express is refused with the reason: query-head counts that differ between
layers (vLLM builds every layer with `num_attention_heads`), families other than Llama/Mistral,
attention biases, activations other than SiLU, sliding windows. Written atomically.

Not run in vLLM here: the package's wheels are CUDA builds. The layout follows vLLM's
`nemotron_nas.py` (read from its source) and the tests read the exported config the way that file
does, rebuild the model from it alone and compare logits with the source folder.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import StructPruneError
from . import configuration_decilm

#: Model types the DeciLM layout can carry (its graph is Llama's).
DECI_TYPES = ("llama", "mistral", "struprune_llama", "struprune_mistral")
#: Tokenizer and generation files copied from the source folder when present.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)
#: Config keys that describe struprune's own loader, not the exported model.
STRUPRUNE_KEYS = ("struprune_layout", "auto_map")


class VLLMExportError(StructPruneError):
    """The model cannot be written in a layout vLLM builds correctly."""


@dataclass
class VLLMExport:
    """What `export_vllm` wrote."""

    path: Path
    layout: str  # "stock" or "deci"
    architecture: str
    num_attention_heads: int
    num_key_value_heads: list[int]
    intermediate_sizes: list[int]


def block_configs(kv_heads: list[int], widths: list[int], num_heads: int) -> list[dict]:
    """vLLM's per-layer entries: K/V heads as query heads per group, the MLP width exactly."""
    blocks = []
    for i, (kv, width) in enumerate(zip(kv_heads, widths)):
        if num_heads % kv:
            raise VLLMExportError(
                f"layer {i}: {num_heads} query heads do not split into {kv} K/V groups of equal size"
            )
        blocks.append(
            {
                "attention": {
                    "no_op": False,
                    "replace_with_linear": False,
                    "n_heads_in_group": num_heads // kv,
                },
                "ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": int(width)},
            }
        )
    return blocks


def _check_deci_supported(config, heads: list[int]) -> None:
    model_type = getattr(config, "model_type", "")
    if model_type not in DECI_TYPES:
        raise VLLMExportError(
            f"model type {model_type!r} with per-layer widths: vLLM's per-layer layout (DeciLM) is a "
            "Llama graph, so only Llama and Mistral models export with differing layers. Fix: prune "
            "with equal widths (--equal-widths) for a stock checkpoint"
        )
    if len(set(heads)) > 1:
        raise VLLMExportError(
            f"query heads differ between layers ({min(heads)} to {max(heads)}): vLLM's DeciLM builds "
            "every layer with the same query heads (only K/V heads and MLP widths vary). Fix: prune "
            "with --units mlp (heads kept), or with --equal-widths; or serve with llama.cpp "
            "(struprune export gguf), whose deci graph takes per-layer query heads"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise VLLMExportError("biases in attention or MLP are not written in the DeciLM layout yet")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise VLLMExportError(f"hidden_act {config.hidden_act!r}: the DeciLM layout is written for SiLU MLPs")
    if getattr(config, "sliding_window", None):
        raise VLLMExportError("sliding-window attention is not part of vLLM's DeciLM model")


def _deci_config(config, heads: list[int], kv_heads: list[int], widths: list[int], head_dim: int) -> dict:
    data = config.to_dict()
    for key in STRUPRUNE_KEYS:
        data.pop(key, None)
    data.update(
        model_type=configuration_decilm.DeciLMConfig.model_type,
        architectures=["DeciLMForCausalLM"],
        auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig"},
        num_attention_heads=heads[0],
        num_key_value_heads=kv_heads[0],
        head_dim=head_dim,
        intermediate_size=max(widths),
        block_configs=block_configs(kv_heads, widths, heads[0]),
    )
    data.pop("sliding_window", None)
    data.pop("use_sliding_window", None)
    return data


def export_vllm(folder: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> VLLMExport:
    """Write `folder` (a `save_pruned` folder or a plain HF folder) as a folder vLLM serves."""
    from safetensors.torch import save_file

    from ..architectures import is_uniform, layer_layout
    from ..checkpoint import load_pruned, read_model_config
    from ..outputs import check_output_folder, write_folder_atomically

    folder = Path(folder)
    check_output_folder(out, [folder], overwrite)  # before the model is loaded
    config = read_model_config(folder)
    model = load_pruned(folder)
    layout = layer_layout(model)
    heads, kv_heads, widths = (
        list(layout[k]) for k in ("num_attention_heads", "num_key_value_heads", "intermediate_sizes")
    )
    head_dim = int(layout["head_dim"])
    uniform = is_uniform(layout)
    if uniform:
        from ..checkpoint import needs_layout_loader, record_layout

        record_layout(model)
        if needs_layout_loader(model.config):
            raise VLLMExportError(
                f"the {config.model_type!r} config cannot express this model's uniform widths as a "
                "stock checkpoint (see struprune_layout in its config.json)"
            )
    else:
        _check_deci_supported(config, heads)

    def build(tmp: Path) -> None:
        if uniform:
            model.save_pretrained(tmp)
            data = json.loads((tmp / "config.json").read_text())
            for key in STRUPRUNE_KEYS:
                data.pop(key, None)
            (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        else:
            tied = bool(getattr(config, "tie_word_embeddings", False))
            state = {
                name: t.detach().contiguous()
                for name, t in model.state_dict().items()
                if not (tied and name == "lm_head.weight")
            }
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            data = _deci_config(model.config, heads, kv_heads, widths, head_dim)
            (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            shutil.copyfile(configuration_decilm.__file__, tmp / "configuration_decilm.py")
        for name in SIDE_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)

    path = write_folder_atomically(out, build, [folder], overwrite)
    return VLLMExport(
        path,
        "stock" if uniform else "deci",
        (config.architectures or ["?"])[0] if uniform else "DeciLMForCausalLM",
        heads[0],
        kv_heads,
        widths,
    )


def load_deci_reference(folder: str | os.PathLike) -> torch.nn.Module:
    """Rebuild a DeciLM-layout folder the way vLLM's `nemotron_nas.py` reads it, with transformers'
    Llama modules: the config through its shipped class (attribute access, as vLLM does), each
    layer's K/V heads as num_attention_heads // n_heads_in_group and its MLP width from
    `ffn.intermediate_size`, weights loaded strictly. Used by the tests and `integration/` checks."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    from ..architectures import apply_layout

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    blocks = config.block_configs
    if any(b.attention.no_op or b.ffn.no_op or hasattr(b.ffn, "ffn_mult") for b in blocks):
        raise VLLMExportError("this reader covers layers with attention and an exact MLP width only")
    layout = {
        "family": "llama",
        "head_dim": config.head_dim,
        "num_attention_heads": [config.num_attention_heads] * len(blocks),
        "num_key_value_heads": [config.num_attention_heads // b.attention.n_heads_in_group for b in blocks],
        "intermediate_sizes": [b.ffn.intermediate_size for b in blocks],
    }
    plain = {
        k: v for k, v in config.to_dict().items() if k not in ("block_configs", "auto_map", "model_type")
    }
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(LlamaConfig(**plain))
    apply_layout(model, layout)
    state = load_file(str(folder / "model.safetensors"))
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if unexpected or still_meta:
        raise VLLMExportError(
            f"{folder}: weights do not fit block_configs: missing {still_meta}, unexpected {unexpected}"
        )
    return model.eval()
