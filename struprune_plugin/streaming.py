"""Out-of-core pruning: a checkpoint folder in, a pruned checkpoint folder out, one layer in memory.

The model is never materialised. Its skeleton is built on the meta device (no memory), every
module the engine visits is marked as streamed from the input's safetensors shards
(`residency.attach_checkpoint`), and the engine's passes load one decoder layer at a time and drop
it afterwards. Each pruned layer is written to its own output shard while it is still resident;
embeddings, final norm and LM head are read only when a pass needs them (capturing layer 0's
inputs, the sensitivity pass's logits) and are copied tensor by tensor into the last shard.

Peak memory is therefore one decoder layer, the calibration activations and the embeddings, as
the method promises, and the output folder appears only complete (`write_folder_atomically`):
an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .architectures import model_view
from .checkpoint import meta_model, read_model_config, write_loader_files
from .engine import PruneConfig, PruneResult, prune_model
from .errors import StructPruneError
from .outputs import check_output_folder, write_folder_atomically, write_text_atomic
from .residency import ShardReader, attach_checkpoint, head_modules

#: Files next to the weights that describe the tokenizer and generation, copied as they are.
_SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def skeleton(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The folder's model on the meta device, with a pruned folder's per-layer widths applied."""
    model = meta_model(read_model_config(folder), Path(folder), dtype)
    model.config._name_or_path = str(folder)
    return model.eval()


class ShardWriter:
    """Writes the output checkpoint shard by shard: one file per decoder layer, one for the rest,
    and the index that maps every tensor to its file."""

    def __init__(self, folder: Path, shards: int):
        self.folder, self.shards = folder, shards
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._next = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> str:
        from safetensors.torch import save_file

        self._next += 1
        name = f"model-{self._next:05d}-of-{self.shards:05d}.safetensors"
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(tensors, self.folder / name, metadata={"format": "pt"})
        for key, tensor in tensors.items():
            self.weight_map[key] = name
            self.total_bytes += tensor.numel() * tensor.element_size()
        return name

    def finish(self) -> None:
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        write_text_atomic(self.folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")


def prune_checkpoint(
    folder: str | os.PathLike,
    output: str | os.PathLike,
    calibration_ids: torch.Tensor | None,
    config: PruneConfig,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    write_extras: Callable[[Path, PruneResult], None] | None = None,
) -> PruneResult:
    """Prune the checkpoint in `folder` into `output` without ever holding the whole model.

    `dtype` is the dtype the layers are computed and saved in (default: the checkpoint's own);
    statistics and solves run in float32/float64 whatever it is. The result's `model` is the
    pruned skeleton on the meta device: load `output` to use the pruned model."""
    config.validate()
    if config.method == "global-taylor":
        raise StructPruneError(
            "global-taylor is the O(N) reference: it needs the gradient of the whole model with "
            "every layer resident, which streaming from disk rules out. Fix: prune it in memory "
            "(prune_model / struprune prune without --stream-weights)"
        )
    folder = Path(folder)
    check_output_folder(output, [folder], overwrite)
    model = skeleton(folder, dtype)
    view = model_view(model)
    reader = ShardReader(folder)
    modules = [*view.pre_layer_modules, *view.layers, *head_modules(model, view.backbone)]
    prefixes = attach_checkpoint(model, reader, modules, next(model.parameters()).dtype)
    if not distributed.is_writer():  # under torch.distributed only rank 0 writes the folder
        return prune_model(model, calibration_ids, config, inplace=True, progress=False)
    layer_prefixes = [prefixes[layer] for layer in view.layers]
    layers_root = prefixes[view.layers[0]].rpartition(".")[0] + "."
    holder: dict[str, PruneResult] = {}

    def build(tmp: Path) -> None:
        writer = ShardWriter(tmp, len(view.layers) + 1)

        def sink(index: int, layer: nn.Module) -> None:
            state = layer.state_dict()
            writer.write({f"{layer_prefixes[index]}.{k}": v for k, v in state.items()})

        result = prune_model(model, calibration_ids, config, inplace=True, progress=progress, sink=sink)
        rest = {}
        target = next(model.parameters()).dtype
        for key in reader.names():
            if not key.startswith(layers_root):
                tensor = reader.get(key)
                rest[key] = tensor.to(target) if tensor.is_floating_point() else tensor
        reader.release()
        writer.write(rest)
        writer.finish()
        model.config.dtype = target
        model.config.save_pretrained(tmp)
        for name in _SIDE_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
        write_loader_files(tmp)
        if write_extras is not None:
            write_extras(tmp, result)
        holder["result"] = result

    write_folder_atomically(output, build, [folder], overwrite)
    return holder["result"]
