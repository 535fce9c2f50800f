"""Saving and reloading pruned models whose layers have different widths.

transformers builds every layer from one config, so a checkpoint with per-layer head counts or MLP
widths fails `from_pretrained` with size mismatches (and `ignore_mismatched_sizes=True` silently
re-initialises those layers). We record each layer's widths in config.json (`struprune_layout`),
rebuild the skeleton on the meta device, give each layer its recorded shapes, and load the weights
into it. When every layer ended up the same, the config is also rewritten as a plain HF config so
that stock tools load it without the plugin.

Writes are atomic: everything goes to a temporary sibling folder that is renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .architectures import apply_layout, is_uniform, layer_layout
from .errors import LayoutMismatchError, OutputExistsError

LAYOUT_KEY = "struprune_layout"


def _plain_fields(layout: dict) -> dict:
    """The stock config fields that express a uniform layout (OPT derives head_dim from hidden/heads,
    so its head counts cannot be expressed and stay in the layout only)."""
    if layout["family"] == "llama":
        return {
            "head_dim": layout["head_dim"],
            "num_attention_heads": layout["num_attention_heads"][0],
            "num_key_value_heads": layout["num_key_value_heads"][0],
            "intermediate_size": layout["intermediate_sizes"][0],
        }
    return {"ffn_dim": layout["intermediate_sizes"][0]}


def record_layout(model: nn.Module) -> dict:
    """Store the per-layer layout in the config; mirror it into the stock fields when uniform.

    transformers 5 validates some fields (e.g. LlamaConfig wants hidden % heads == 0 even with an
    explicit head_dim); a uniform layout it refuses is kept in the layout key only.
    """
    layout = layer_layout(model)
    config = model.config
    setattr(config, LAYOUT_KEY, layout)
    if is_uniform(layout):
        fields = _plain_fields(layout)
        saved = {k: getattr(config, k, None) for k in fields}
        try:
            for key, value in fields.items():
                setattr(config, key, value)
            config.validate()
        except Exception:  # transformers raises several types here; restore and fall back
            for key, value in saved.items():
                setattr(config, key, value)
    return layout


def structural_fields(config) -> dict:
    """The config entries pruning changed: the layout key and the stock width fields it mirrors.
    Hosts that rewrite config.json on save (llm-compressor restores the original file for vLLM's
    sake) must carry these over, or the folder no longer describes its own weights."""
    layout = getattr(config, LAYOUT_KEY, None)
    if layout is None:
        return {}
    return {
        LAYOUT_KEY: layout,
        **{k: getattr(config, k) for k in _plain_fields(layout) if hasattr(config, k)},
    }


def patch_config_json(folder: str | os.PathLike, fields: dict) -> None:
    """Overwrite `fields` in folder/config.json, atomically."""
    path = Path(folder) / "config.json"
    data = json.loads(path.read_text())
    data.update(fields)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def needs_layout_loader(config) -> bool:
    """Whether stock `from_pretrained` would build the wrong shapes for this config."""
    layout = getattr(config, LAYOUT_KEY, None)
    if not layout:
        return False
    if not is_uniform(layout):
        return True
    mismatch = any(getattr(config, k, None) != v for k, v in _plain_fields(layout).items())
    if layout["family"] == "opt":
        mismatch |= layout["num_attention_heads"][0] * layout["head_dim"] != config.hidden_size
    return mismatch


def _same_folder(a: Path, b: str | os.PathLike | None) -> bool:
    try:
        return b is not None and Path(b).exists() and a.resolve() == Path(b).resolve()
    except OSError:
        return False


def save_pruned(
    model: nn.Module,
    output: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    write_extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write model (+ tokenizer, + whatever `write_extras` puts in the folder) to `output` atomically."""
    output = Path(output)
    if _same_folder(output, getattr(model.config, "_name_or_path", None)):
        raise OutputExistsError(
            f"{output} is the folder the model was loaded from; refusing to overwrite the source "
            "checkpoint. Fix: choose another --output folder"
        )
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists. Fix: choose a new folder or pass --overwrite")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if write_extras is not None:
            write_extras(tmp)
        if output.exists():
            old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in folder.glob("*.safetensors")]
    if not files:
        raise LayoutMismatchError(f"{folder} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(folder / name))
    return state


def load_pruned(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load any checkpoint written by `save_pruned` (or a plain HF folder) onto the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    if not needs_layout_loader(config):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or config.dtype or torch.float32)
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or config.dtype or torch.float32)
    try:
        apply_layout(model, getattr(config, LAYOUT_KEY))
    except Exception as err:
        raise LayoutMismatchError(f"{folder}: the recorded layout does not fit the model: {err}") from err
    state = _read_state_dict(folder)
    target_dtype = next(model.parameters()).dtype
    state = {k: v.to(target_dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:
        raise LayoutMismatchError(
            f"{folder}: weights do not match the per-layer layout recorded in config.json "
            f"({LAYOUT_KEY}). The folder was edited or mixed with another checkpoint. Fix: re-save "
            f"the pruned model with struprune_plugin.save_pruned.\n{err}"
        ) from err
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if unexpected or still_meta:
        raise LayoutMismatchError(
            f"{folder}: weights do not match the recorded layout; missing {still_meta or missing}, "
            f"unexpected {unexpected}. Fix: re-save the pruned model with struprune_plugin.save_pruned"
        )
    model.config._name_or_path = str(folder)
    return model.eval()
