"""Write a saved (pruned or dense) Llama-family folder as one self-contained GGUF file for llama.cpp.

A uniformly pruned model is written as llama.cpp's stock `llama` architecture. A model whose layers
differ is written as `deci` (NVIDIA's Nemotron-NAS layout): it is the llama.cpp graph that reads
`head_count`, `head_count_kv` and `feed_forward_length` as per-layer arrays and builds each layer
with its own counts, while the `llama` graph uses one value for every layer. What llama.cpp's
converter does for these architectures is done the same way here (Q/K rows permuted from Hugging
Face's rotate-half RoPE layout to GGML's interleaved one, the head dimension written explicitly,
tied output embeddings omitted so llama.cpp reuses the token embeddings), so the file loads in any
llama.cpp build, Ollama and LM Studio included.

The `deci` graph's pitfall (a layer whose MLP width is 0 skips its attention's residual add) cannot
arise: a saved layout keeps at least one head and one channel per layer (`check_layout` refuses
anything else). What the format cannot express (attention biases, activations other than SiLU,
RoPE scaling, sliding windows) is refused with an error naming it.

Gemma 3 text models are written as llama.cpp's `gemma3` architecture: sliding-window layers as the
config lists them, the local RoPE base, GELU, norm weights plus one (Gemma's RMSNorm scales by
1 + w) and the SentencePiece vocabulary (`gguf_vocab`). Its graph builds every layer with layer 0's
counts, so only equal widths are written: prune with `--equal-widths` (StructPrune's default
gives each layer its own widths, which this export refuses).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import StructPruneError
from ..outputs import check_output_file, output_lock, place_file, temp_sibling
from .gguf_vocab import add_vocabulary

OUTTYPES = ("f32", "f16", "q8_0")
#: Model types the writer knows; Mistral is llama.cpp's `llama` architecture too.
LLAMA_TYPES = ("llama", "mistral", "struprune_llama", "struprune_mistral")
#: Gemma 3 text models: llama.cpp's `gemma3` graph, one width for every layer.
GEMMA3_TYPES = ("gemma3_text", "struprune_gemma3_text")


class GGUFExportError(StructPruneError):
    """The model cannot be written as a GGUF file llama.cpp would run correctly."""


@dataclass
class GGUFExport:
    """What `export_gguf` wrote."""

    path: Path
    architecture: str
    outtype: str
    head_count: list[int]
    head_count_kv: list[int]
    feed_forward_length: list[int]
    vocabulary: dict
    f16_fallbacks: list[str] = field(default_factory=list)  # q8_0 tensors whose rows do not split in 32s


def _check_gemma3(config, uniform: bool, head_dim: int, heads: int) -> None:
    """What llama.cpp's `gemma3` graph computes, checked against the config."""
    if not uniform:
        raise GGUFExportError(
            "Gemma 3 with per-layer widths: llama.cpp's gemma3 graph builds every layer with layer 0's "
            "head count and MLP width. Fix: prune with equal widths (--equal-widths, which makes "
            "StructPrune's allocation uniform)"
        )
    if getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise GGUFExportError(
            f"hidden_activation {config.hidden_activation!r}: llama.cpp's gemma3 uses GELU (tanh)"
        )
    if getattr(config, "attn_logit_softcapping", None):
        raise GGUFExportError("attention logit soft-capping is not part of llama.cpp's gemma3 graph")
    # llama.cpp scales attention by 1/sqrt(head_dim), except for 62-layer models (27B), where it
    # uses 1/sqrt(hidden / heads): with pruned heads that is no longer the scale the model learnt
    expected = config.hidden_size / heads if config.num_hidden_layers == 62 else head_dim
    if getattr(config, "query_pre_attn_scalar", head_dim) != expected:
        raise GGUFExportError(
            f"query_pre_attn_scalar {config.query_pre_attn_scalar} but llama.cpp's gemma3 graph would "
            f"scale attention by 1/sqrt({expected:g}) for this model"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    for kind in ("full_attention", "sliding_attention"):
        rope_type = (
            (rope.get(kind) or {}).get("rope_type", "default") if isinstance(rope, dict) else "default"
        )
        if rope_type != "default":
            raise GGUFExportError(
                f"RoPE scaling {rope_type!r} ({kind}) is not written by the GGUF exporter yet"
            )


def _check_supported(config) -> None:
    model_type = getattr(config, "model_type", "")
    if model_type in GEMMA3_TYPES:
        return
    if model_type not in LLAMA_TYPES:
        raise GGUFExportError(
            f"model type {model_type!r}: the GGUF exporter writes Llama-family models "
            f"({', '.join(LLAMA_TYPES[:2])}) and Gemma 3 so far"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise GGUFExportError(f"hidden_act {config.hidden_act!r}: llama.cpp's llama/deci graphs use SiLU")
    if getattr(config, "attention_bias", False):
        raise GGUFExportError(
            "attention_bias=True: llama.cpp's deci graph sizes the Q bias to the hidden size, so "
            "pruned heads with biases do not fit; export without attention biases"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise GGUFExportError(f"RoPE scaling {rope_type!r} is not written by the GGUF exporter yet")
    if getattr(config, "sliding_window", None):
        raise GGUFExportError("sliding-window attention is not expressed by llama.cpp's llama graph")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):  # Gemma 3: per layer type
        rope = rope["full_attention"]
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def permute_for_ggml_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Q/K rows from Hugging Face's rotate-half order to GGML's interleaved pairs, per head (as
    llama.cpp's converter does; works for biases too)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _encode(name: str, tensor: torch.Tensor, outtype: str, fallbacks: list[str]):
    """(data, raw dtype) for gguf.GGUFWriter.add_tensor: 1-D tensors stay f32 as in llama.cpp."""
    import gguf

    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if data.ndim == 1 or outtype == "f32":
        return data, gguf.GGMLQuantizationType.F32
    if outtype == "q8_0":
        if data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            q = gguf.GGMLQuantizationType.Q8_0
            return gguf.quants.quantize(data, q), q
        fallbacks.append(name)
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def export_gguf(
    folder: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16", overwrite: bool = False
) -> GGUFExport:
    """Write `folder` (a `save_pruned` folder or a plain HF Llama folder) as the GGUF file `out`.

    The file is written next to `out` under a temporary name and renamed into place, so an
    interrupted export leaves no partial file behind. The output may not lie inside the folder
    being read, and `overwrite` replaces only a GGUF file (`outputs.check_output_file`)."""
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"unknown outtype {outtype!r}; choose one of {OUTTYPES}")
    folder, out = Path(folder), Path(out)
    check_output_file(out, "GGUF output", [folder], overwrite, ours=is_gguf_file)
    with output_lock(out):
        check_output_file(out, "GGUF output", [folder], overwrite, ours=is_gguf_file)
        return _export_gguf(folder, out, outtype, overwrite)


def is_gguf_file(path: Path) -> bool:
    """A GGUF file starts with the magic `GGUF`: `--overwrite` replaces only such a file."""
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


def _export_gguf(folder: Path, out: Path, outtype: str, overwrite: bool) -> GGUFExport:
    import gguf

    from ..architectures import is_uniform, layer_layout
    from ..checkpoint import load_pruned, read_model_config

    config = read_model_config(folder)
    _check_supported(config)
    model = load_pruned(folder, dtype=torch.float32)
    layout = layer_layout(model)
    heads, kv_heads, widths = (
        list(layout[k]) for k in ("num_attention_heads", "num_key_value_heads", "intermediate_sizes")
    )
    head_dim = int(layout["head_dim"])
    uniform = is_uniform(layout)
    gemma = config.model_type in GEMMA3_TYPES
    if gemma:
        _check_gemma3(config, uniform, head_dim, heads[0])
        arch = gguf.MODEL_ARCH.GEMMA3
    else:
        arch = gguf.MODEL_ARCH.LLAMA if uniform else gguf.MODEL_ARCH.DECI

    n_layers = len(heads)
    tmp = temp_sibling(out, "gguf")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_name(folder.name)
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(widths[0] if uniform else widths)
        writer.add_head_count(heads[0] if uniform else heads)
        writer.add_head_count_kv(kv_heads[0] if uniform else kv_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        if gemma:
            _add_gemma3_keys(writer, config)
        writer.add_vocab_size(int(config.vocab_size))
        writer.add_file_type(
            {
                "f32": gguf.LlamaFileType.ALL_F32,
                "f16": gguf.LlamaFileType.MOSTLY_F16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            }[outtype]
        )
        vocabulary = add_vocabulary(writer, folder, int(config.vocab_size))
        fallbacks: list[str] = []
        names = gguf.get_tensor_name_map(arch, n_layers)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        for hf_name, tensor in _tensors(model, heads, kv_heads, tied, gemma):
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise GGUFExportError(f"no GGUF name for tensor {hf_name!r}")
            data, raw = _encode(name, tensor, outtype, fallbacks)
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        place_file(tmp, out, overwrite)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return GGUFExport(
        out, gguf.MODEL_ARCH_NAMES[arch], outtype, heads, kv_heads, widths, vocabulary, fallbacks
    )


def _add_gemma3_keys(writer, config) -> None:
    """Sliding-window attention as the config has it: the window, which layers use it (written per
    layer rather than left to llama.cpp's default pattern of 6) and their RoPE base."""
    types = list(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    if window and "sliding_attention" in types:
        writer.add_sliding_window(int(window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        rope = getattr(config, "rope_parameters", None) or {}
        local = (rope.get("sliding_attention") or {}).get("rope_theta") if isinstance(rope, dict) else None
        writer.add_rope_freq_base_swa(float(local or getattr(config, "rope_local_base_freq", 10000.0)))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _tensors(model, heads: list[int], kv_heads: list[int], tied: bool, gemma: bool = False):
    """(Hugging Face name, tensor) pairs in llama.cpp's layout. Gemma's RMSNorms scale by (1 + w),
    llama.cpp's by w: its norm weights are written plus one, as llama.cpp's converter does; its
    RoPE is Hugging Face's own (NeoX) layout, so Q/K rows stay as they are."""
    state = model.state_dict()
    for name, tensor in state.items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if gemma:
            yield name, tensor + 1.0 if name.endswith("norm.weight") else tensor
            continue
        parts = name.split(".")
        if "layers" in parts:
            i = int(parts[parts.index("layers") + 1])
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = permute_for_ggml_rope(tensor, heads[i])
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = permute_for_ggml_rope(tensor, kv_heads[i])
        yield name, tensor
