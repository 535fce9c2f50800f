"""Where a module's weights live between passes, and how they come onto the compute device.

Every pass of the engine (energies, sensitivity, FLAP's scores, pruning) visits the decoder layers
one at a time. `resident(module, device)` is the one place that brings a module's weights onto the
device for a visit and sends them home afterwards:

* a model in memory: the module moves to the device and back to where it was;
* a model streamed from its checkpoint (`attach_checkpoint`): the module is a meta-device skeleton
  whose tensors are read from the safetensors shards (memory-mapped) for the visit and dropped
  afterwards, so at most one decoder layer's weights are ever materialised.

Keeping that choice inside one context manager is what lets the same passes run on a model held in
memory and on one larger than memory.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, NonFiniteWeightError

#: The attribute that marks a module as streamed from a checkpoint (a `ModuleSource`).
SOURCE_ATTR = "_struprune_source"


class ShardReader:
    """Tensors of a safetensors checkpoint (one file or an indexed set of shards), read lazily.

    `safe_open` memory-maps each shard, so asking for one tensor reads only its bytes."""

    def __init__(self, folder: str | Path):
        from .checkpoint import _weight_files, read_weight_map

        self.folder = Path(folder)
        self.files = _weight_files(self.folder)
        self._handles: dict[str, object] = {}
        self.key_file: dict[str, str] = {}
        weight_map = read_weight_map(self.folder)  # shard names checked to lie inside the folder
        if weight_map is not None:
            self.key_file = dict(weight_map)
        else:
            for name in self.files:
                for key in self._handle(name).keys():  # noqa: SIM118 (safe_open is no dict)
                    self.key_file[key] = name

    def _handle(self, name: str):
        from safetensors import safe_open

        if name not in self._handles:
            self._handles[name] = safe_open(self.folder / name, framework="pt", device="cpu")
        return self._handles[name]

    def __contains__(self, key: str) -> bool:
        return key in self.key_file

    def names(self) -> list[str]:
        return list(self.key_file)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.key_file:
            raise CheckpointError(f"{self.folder}: the checkpoint has no tensor {key!r}")
        return self._handle(self.key_file[key]).get_tensor(key)

    def release(self) -> None:
        """Unmap the shards. Pages of a mapping count in the process's resident memory once read,
        so the reader lets go of them after every module instead of holding the whole model."""
        self._handles.clear()


class ModuleSource:
    """How to fill one skeleton module from a checkpoint: its parameter names -> checkpoint keys.

    A parameter with no key is one the run added (a zero bias for bias compensation): it starts
    as zeros. Loaded tensors are checked for NaN/inf, as the in-memory engine checks its model."""

    def __init__(
        self,
        reader: ShardReader,
        keys: dict[str, str | None],
        dtype: torch.dtype | None,
        twins: dict[str, list[tuple[nn.Module, str]]] | None = None,
    ):
        self.reader, self.keys, self.dtype = reader, keys, dtype
        # Other modules holding the same Parameter (a tied LM head): they get the same tensor on
        # load and lose it on unload, so a tie never keeps a whole embedding alive.
        self.twins = twins or {}

    def _assign(self, module: nn.Module, name: str, param: nn.Parameter) -> None:
        owner, leaf = _owner(module, name)
        owner._parameters[leaf] = param
        for twin, twin_leaf in self.twins.get(name, ()):
            twin._parameters[twin_leaf] = param

    def unload(self, module: nn.Module) -> None:
        """Back to the meta device: shapes stay (pruned ones included), the memory goes."""
        for name, param in list(module.named_parameters()):
            meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
            self._assign(module, name, nn.Parameter(meta, requires_grad=False))

    def load(self, module: nn.Module, device: torch.device) -> None:
        for name, param in list(module.named_parameters()):
            key = self.keys.get(name)
            if key is None:
                if not name.endswith("bias"):
                    raise CheckpointError(f"the checkpoint has no tensor for parameter {name!r}")
                tensor = torch.zeros(param.shape, dtype=param.dtype)
            else:
                tensor = self.reader.get(key)
                if self.dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(self.dtype)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise CheckpointError(
                        f"{key} has shape {tuple(tensor.shape)} in the checkpoint but the model "
                        f"expects {tuple(param.shape)}. Fix: use the config.json saved with these weights"
                    )
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise NonFiniteWeightError(
                        f"the model's weight {key} holds NaN/inf values, so no pruning decision (and "
                        "no saved model) could be trusted. Fix: repair or re-download the checkpoint"
                    )
            self._assign(module, name, nn.Parameter(tensor.to(device), requires_grad=False))
        self.reader.release()


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def home_device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextlib.contextmanager
def resident(module: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """`module` with its weights on `device` for the duration of the block (see the module doc)."""
    device = torch.device(device)
    source: ModuleSource | None = getattr(module, SOURCE_ATTR, None)
    if source is None:
        home = home_device(module)
        module.to(device)
        try:
            yield module
        finally:
            module.to(home if home.type != "meta" else torch.device("cpu"))
        return
    source.load(module, device)
    try:
        yield module
    finally:
        source.unload(module)
        # Torch-Pruning's dependency graphs hold the layer's old tensors in reference cycles,
        # which Python's collector frees only when object counts (not bytes) trigger it: collect
        # now, or every visited layer lingers and memory grows with depth.
        gc.collect()


@contextlib.contextmanager
def all_resident(modules: Iterable[nn.Module], device: torch.device | str) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(resident(module, device))
        yield


def is_streamed(module: nn.Module) -> bool:
    return getattr(module, SOURCE_ATTR, None) is not None


def head_modules(model: nn.Module, backbone: nn.Module) -> list[nn.Module]:
    """The modules after the last decoder layer: final norm (OPT: and project_out), LM head."""
    out = [getattr(backbone, n, None) for n in ("norm", "final_layer_norm", "project_out")]
    return [m for m in out if isinstance(m, nn.Module)] + [model.get_output_embeddings()]


def attach_checkpoint(
    model: nn.Module, reader: ShardReader, modules: Iterable[nn.Module], dtype: torch.dtype | None
) -> dict[nn.Module, str]:
    """Mark `modules` of a meta-device skeleton as streamed from `reader`; returns each module's
    name prefix in the checkpoint. A parameter tied to another (a tied LM head) reads the key its
    twin is stored under, since save_pretrained stores tied weights once."""
    model.tie_weights()
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    prefix_of = {m: n for n, m in model.named_modules(remove_duplicate=False)}
    prefixes = {}
    for module in modules:
        prefix = prefix_of[module]
        keys: dict[str, str | None] = {}
        twins: dict[str, list[tuple[nn.Module, str]]] = {}
        for name, param in module.named_parameters():
            full = f"{prefix}.{name}" if prefix else name
            candidates = [full] + [n for n in names_of[id(param)] if n != full]
            twins[name] = [_owner(model, n) for n in candidates[1:]]
            keys[name] = next((c for c in candidates if c in reader), None)
            if keys[name] is None:
                raise CheckpointError(
                    f"{reader.folder}: no tensor for {full} in the checkpoint. Fix: point at the "
                    "folder whose config.json these weights were saved with"
                )
        setattr(module, SOURCE_ATTR, ModuleSource(reader, keys, dtype, twins))
        prefixes[module] = prefix
    return prefixes
