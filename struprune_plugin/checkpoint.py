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
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .architectures import apply_layout, is_uniform, layer_layout
from .errors import CheckpointError, LayoutMismatchError, first_line
from .modeling_struprune import check_layout
from .outputs import write_folder_atomically, write_text_atomic

LAYOUT_KEY = "struprune_layout"


def _plain_fields(layout: dict) -> dict:
    """The stock config fields that express a uniform layout (OPT derives head_dim from hidden/heads,
    so its head counts cannot be expressed and stay in the layout only)."""
    if layout["family"] in ("llama", "phi3"):
        return {
            "head_dim": layout["head_dim"],
            "num_attention_heads": layout["num_attention_heads"][0],
            "num_key_value_heads": layout["num_key_value_heads"][0],
            "intermediate_size": layout["intermediate_sizes"][0],
        }
    return {"ffn_dim": layout["intermediate_sizes"][0]}


_ABSENT = object()


def record_layout(model: nn.Module) -> dict:
    """Store the per-layer layout in the config; mirror it into the stock fields when uniform.

    transformers 5 validates some fields (e.g. LlamaConfig wants hidden % heads == 0 even with an
    explicit head_dim), and some config classes check when they are built from config.json (Phi-3's
    longrope factors must match hidden / heads, on the 4.5x line in `__init__`): a uniform layout the
    config class refuses either way is kept in the layout key only.
    """
    layout = layer_layout(model)
    config = model.config
    setattr(config, LAYOUT_KEY, layout)
    if is_uniform(layout):
        fields = _plain_fields(layout)
        saved = {k: getattr(config, k, _ABSENT) for k in fields}
        try:
            for key, value in fields.items():
                setattr(config, key, value)
            if hasattr(config, "validate"):  # transformers 5; the 4.5x line has no validate()
                config.validate()
            type(config).from_dict(config.to_dict())  # what loading config.json will do
        except Exception:  # transformers raises several types here; restore and fall back
            for key, value in saved.items():
                if value is _ABSENT:  # e.g. Phi3Config has no head_dim: None would be read as one
                    vars(config).pop(key, None)
                else:
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
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_loader_files(folder: str | os.PathLike) -> None:
    """Make a saved folder with per-layer widths load through the Auto classes.

    config.json gets the `struprune_<type>` model type and an `auto_map`, and a copy of
    `modeling_struprune.py` goes next to the weights: `from_pretrained(folder)` then works with the
    plugin imported, and `from_pretrained(folder, trust_remote_code=True)` without it. Folders
    whose layout the stock config expresses (uniform widths) stay plain HF checkpoints.
    """
    from transformers import AutoConfig

    from . import modeling_struprune

    folder = Path(folder)
    path = folder / "config.json"
    data = json.loads(path.read_text())
    base_type = data.get("model_type", "").removeprefix(modeling_struprune.MODEL_TYPE_PREFIX)
    if not needs_layout_loader(AutoConfig.for_model(base_type, **_config_kwargs(data))):
        return
    if base_type not in modeling_struprune.PRUNED_CLASSES:
        raise LayoutMismatchError(f"no pruned-layout classes for model type {base_type!r}")
    config_cls, model_cls = modeling_struprune.PRUNED_CLASSES[base_type]
    module = Path(modeling_struprune.__file__).stem
    data["model_type"] = config_cls.model_type
    data["architectures"] = [model_cls.__name__]
    data["auto_map"] = {
        "AutoConfig": f"{module}.{config_cls.__name__}",
        "AutoModelForCausalLM": f"{module}.{model_cls.__name__}",
    }
    shutil.copyfile(modeling_struprune.__file__, folder / f"{module}.py")
    patch_config_json(folder, data)


def _config_kwargs(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in ("model_type", "architectures", "auto_map")}


def stored_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every stored tensor's shape, read from the safetensors headers (no tensor data is read). An
    empty, truncated or corrupted file is named with a fix here instead of failing deep inside the
    loader (safetensors checks that the header covers the file)."""
    from safetensors import safe_open

    folder = Path(folder)
    shapes = {}
    for name in _weight_files(folder):
        try:
            with safe_open(folder / name, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as err:  # SafetensorError, OSError: the library's message goes along
            size = (folder / name).stat().st_size
            raise CheckpointError(
                f"{folder / name} ({size:,} bytes) is not a readable safetensors file: {first_line(err)}. It is "
                "empty, truncated or corrupted. Fix: copy or re-save the checkpoint again"
            ) from err
    return shapes


def check_weights_match_layout(
    folder: str | os.PathLike, layout: dict, shapes: dict[str, tuple[int, ...]] | None = None
) -> None:
    """Compare the stored tensors' shapes with the recorded layout before building anything, so a
    folder whose weights and config.json disagree fails with a message naming the first mismatch."""
    folder = Path(folder)
    shapes = stored_shapes(folder) if shapes is None else shapes
    hd = int(layout["head_dim"])
    opt = layout["family"] == "opt"
    for i, (n_q, n_kv, width) in enumerate(
        zip(layout["num_attention_heads"], layout["num_key_value_heads"], layout["intermediate_sizes"])
    ):
        prefix = f"model.decoder.layers.{i}." if opt else f"model.layers.{i}."
        expected = _expected_sizes(layout["family"], n_q * hd, n_kv * hd, width)
        for suffix, (dim, size) in expected.items():
            shape = shapes.get(prefix + suffix)
            if shape is None or shape[dim] != size:
                raise LayoutMismatchError(
                    f"{folder}: weights do not match the recorded layout: {prefix + suffix} has shape {shape}, but config.json ({LAYOUT_KEY}) "
                    f"records {size} along dim {dim} for decoder layer {i}. The weights and the config "
                    "come from different runs. Fix: re-save the pruned model (save_pruned) or restore "
                    "the matching config.json"
                )


def _expected_sizes(family: str, q_rows: int, kv_rows: int, width: int) -> dict[str, tuple[int, int]]:
    """Stored tensor name (within a layer) -> (dim, size) that the layout fixes."""
    if family == "opt":
        return {
            "self_attn.q_proj.weight": (0, q_rows),
            "self_attn.k_proj.weight": (0, kv_rows),
            "self_attn.v_proj.weight": (0, kv_rows),
            "self_attn.out_proj.weight": (1, q_rows),
            "fc1.weight": (0, width),
            "fc2.weight": (1, width),
        }
    if family == "phi3":  # fused: Q, K and V rows in one tensor, gate and up rows in another
        return {
            "self_attn.qkv_proj.weight": (0, q_rows + 2 * kv_rows),
            "self_attn.o_proj.weight": (1, q_rows),
            "mlp.gate_up_proj.weight": (0, 2 * width),
            "mlp.down_proj.weight": (1, width),
        }
    return {
        "self_attn.q_proj.weight": (0, q_rows),
        "self_attn.k_proj.weight": (0, kv_rows),
        "self_attn.v_proj.weight": (0, kv_rows),
        "self_attn.o_proj.weight": (1, q_rows),
        "mlp.gate_proj.weight": (0, width),
        "mlp.up_proj.weight": (0, width),
        "mlp.down_proj.weight": (1, width),
    }


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


def save_pruned(
    model: nn.Module,
    output: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    write_extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write model (+ tokenizer, + whatever `write_extras` puts in the folder) to `output` atomically.

    The folder is built as a hidden sibling and renamed into place, so a crash or SIGTERM leaves
    either the old folder or the new one (and the sibling is removed, or by the next run if the
    process was killed outright). `overwrite` replaces only a folder struprune wrote (see
    `outputs.check_output_folder`); the folder the model came from is never a valid output.

    The layout is read from the modules' shapes here, so a model pruned by other means (by hand,
    or a Torch-Pruning pruner without the adapter) is saved with the widths it really has."""
    record_layout(model)

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        write_loader_files(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if write_extras is not None:
            write_extras(tmp)

    return write_folder_atomically(output, build, [getattr(model.config, "_name_or_path", None)], overwrite)


#: Weight files that are pickles: loading one can run arbitrary code, so they are never loaded.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


INDEX_FILE = "model.safetensors.index.json"


def read_weight_map(folder: str | os.PathLike) -> dict[str, str] | None:
    """Tensor name -> shard file of the folder's safetensors index, or None if it has none.

    Every shard must be a file name inside the folder: an index naming `../../x.safetensors` or an
    absolute path would make the loader read (and a pruning run copy into its output) tensors from
    anywhere on the machine."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if not index.exists() and not index.is_symlink():
        return None
    if not index.is_file():
        raise CheckpointError(
            f"{index} is not a regular file. Fix: restore the index written with the weights"
        )
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{index} is not a valid safetensors index ({err}). Fix: restore the index written "
            "with the weights, or re-save the model"
        ) from err
    for name in sorted(set(weight_map.values())):
        parts = Path(name).parts
        if (
            not name
            or Path(name).is_absolute()
            or ".." in parts
            or "\\" in name
            or not name.endswith(".safetensors")
        ):
            raise CheckpointError(
                f"{index} names the weight file {name!r}, which is not a .safetensors file inside {folder}; "
                "shards are read only from the model's own folder. Fix: restore the index written with "
                "the weights (shard names such as model-00001-of-00002.safetensors)"
            )
    return weight_map


def _weight_files(folder: Path) -> list[str]:
    """The folder's safetensors files; a folder with only pickled weights is refused, not loaded."""
    weight_map = read_weight_map(folder)
    index = folder / INDEX_FILE
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (folder / f).is_file()]
        if absent:
            raise CheckpointError(
                f"{index} names weight files that are missing: {absent}. Fix: copy them back"
            )
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
        if pickles:
            raise CheckpointError(
                f"{folder} holds its weights only as pickles ({', '.join(pickles)}); struprune loads "
                "weights from .safetensors only, since unpickling a file can run code it carries. Fix: "
                "convert it where you trust the file: AutoModelForCausalLM.from_pretrained(folder)"
                ".save_pretrained(new_folder) writes safetensors"
            )
        raise CheckpointError(
            f"{folder} has no weights (no *.safetensors file). Fix: point at the folder that holds "
            "model.safetensors next to config.json"
        )
    return files


def read_model_config(folder: str | os.PathLike):
    """The folder's config, after checking what loading will need: a readable config.json of a
    known model type, readable safetensors weights, and a layout its own fields do not contradict."""
    from transformers import AutoConfig

    from . import modeling_struprune

    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        if path.exists():
            raise CheckpointError(
                f"{path} is not a regular file (a folder, named pipe or device). Fix: restore the "
                "config.json saved with the model"
            )
        raise CheckpointError(f"{folder} has no config.json. Fix: pass a Hugging Face model folder")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(
            f"{path} is not valid JSON ({first_line(err)}). Fix: restore the file (re-save the model)"
        ) from err
    if not isinstance(data, dict) or not data.get("model_type"):
        raise CheckpointError(f"{path} has no model_type. Fix: restore the config.json saved with the model")
    check_size_fields(path, data)
    check_regular_entries(folder)
    shapes = stored_shapes(folder)  # every weight file's header, read once
    check_layer_count(path, data, shapes)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, TypeError) as err:
        known = sorted(
            {
                *modeling_struprune.PRUNED_CLASSES,
                *(f"struprune_{t}" for t in modeling_struprune.PRUNED_CLASSES),
            }
        )
        if data.get("auto_map"):
            raise CheckpointError(
                f"{path}: model_type {data['model_type']!r} comes with its own code (auto_map), which is "
                f"not run unasked; struprune knows {', '.join(known)}. Fix: use a folder of one of those "
                "types, or, if you trust where the folder came from, load it with trust_remote_code=True "
                "(ONNX export: --trust-remote-code)"
            ) from err
        raise CheckpointError(
            f"{path}: transformers cannot build a config of model_type {data['model_type']!r} ({first_line(err)}). "
            f"struprune handles {', '.join(known)}. Fix: use a model of one of those types"
        ) from err
    layout = getattr(config, LAYOUT_KEY, None)
    if not layout and str(config.model_type).startswith(modeling_struprune.MODEL_TYPE_PREFIX):
        raise LayoutMismatchError(
            f"{path}: model_type {config.model_type!r} is a struprune folder with per-layer widths, but "
            f"its config.json has no {LAYOUT_KEY}, so the layers' widths are unknown. Fix: restore the "
            "config.json the pruning run wrote (or re-save the pruned model)"
        )
    if layout:
        try:
            check_layout(config, layout)
        except ValueError as err:
            raise LayoutMismatchError(f"{path}: {err}") from err
        check_weights_match_layout(folder, layout, shapes)
    check_shapes_match_config(folder, config, shapes)
    return config


def check_regular_entries(folder: Path) -> None:
    """Loaders open the folder's files by name (weights, index, tokenizer, generation config): a
    named pipe or device among them would block the run forever instead of failing."""
    odd = sorted(p.name for p in folder.iterdir() if not p.is_file() and not p.is_dir())
    if odd:
        raise CheckpointError(
            f"{folder} holds entries that are not regular files ({', '.join(odd[:5])}): named pipes, "
            "sockets, devices or broken links, which loading could block on. Fix: replace them with "
            "the files saved with the model"
        )


#: config.json fields that size the model: where present (and not null) each is a positive integer.
SIZE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "ffn_dim",
    "word_embed_proj_dim",
)


def check_size_fields(path: Path, data: dict) -> None:
    """A negative or fractional width in config.json would otherwise end in a torch error deep in
    model construction that names neither the file nor the field."""
    for key in SIZE_FIELDS:
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(
                f"{path}: {key} is {value!r}, but it sizes the model and must be a positive integer. "
                "Fix: restore the config.json saved with these weights"
            )


_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _spans(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5': long runs of missing layers read at a glance."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def check_layer_count(path: Path, data: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """The decoder layers config.json names are the ones the weights hold. transformers fills
    missing layers with random weights (a warning among many, then minutes of work on a broken
    model) and drops surplus ones without a word; both mean a config from another checkpoint."""
    count = data.get("num_hidden_layers")
    found = {int(m.group(1)) for key in shapes if (m := _LAYER_KEY.search(key))}
    if count is None or not found:
        return  # no layer count or no `layers.N.` naming: the architecture check speaks later
    missing = sorted(set(range(count)) - found)
    surplus = sorted(found - set(range(count)))
    if missing:
        raise CheckpointError(
            f"{path} names {count} decoder layers (num_hidden_layers), but the weights hold {len(found)}: "
            f"layers {_spans(missing)} have no weights. Fix: restore the config.json saved with these "
            "weights (or the missing weight files)"
        )
    if surplus:
        raise CheckpointError(
            f"{path} names {count} decoder layers (num_hidden_layers), but the weights also hold layers "
            f"{_spans(surplus)}, which would be dropped without a word. Fix: restore the config.json "
            "saved with these weights"
        )


def check_shapes_match_config(folder: Path, config, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every stored tensor has the shape the config builds (checked on a meta-device model, so it
    costs no memory): a width edited in config.json fails here, naming the tensor, instead of as a
    size-mismatch traceback from the loader."""
    try:
        expected = {k: tuple(v.shape) for k, v in meta_model(config, folder).state_dict().items()}
    except LayoutMismatchError:
        raise
    except Exception:  # an architecture struprune does not build: its own checks speak later
        return
    for key, shape in shapes.items():
        if key in expected and expected[key] != shape:
            raise LayoutMismatchError(
                f"{folder}: {key} has shape {list(shape)} in the weights, but config.json builds "
                f"{list(expected[key])}. The config and the weights come from different models. Fix: "
                "restore the config.json saved with these weights"
            )


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for name in _weight_files(folder):
        state.update(load_file(folder / name))
    return state


def meta_model(config, folder: Path, dtype: torch.dtype | str | None = None) -> nn.Module:
    """The model `config` describes on the meta device (no memory; buffers such as RoPE tables are
    real, as they are computed, not stored), with a pruned folder's per-layer widths applied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    dtype = dtype or config.dtype or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layout = getattr(config, LAYOUT_KEY, None)
    if layout:
        try:
            apply_layout(model, layout)
        except Exception as err:
            raise LayoutMismatchError(f"{folder}: the recorded layout does not fit the model: {err}") from err
    return model


def load_pruned(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load any checkpoint written by `save_pruned` (or a plain HF folder) onto the CPU.

    Weights come from safetensors only; the folder's config is checked against its layout and its
    weights first (`read_model_config`), and no code from the folder runs."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    config = read_model_config(folder)
    if not needs_layout_loader(config) or config.model_type.startswith("struprune_"):
        # plain configs, and folders whose classes shrink their own layers (modeling_struprune)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or config.dtype or torch.float32, use_safetensors=True
        )
        return model.eval()
    model = meta_model(config, folder, dtype)
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
