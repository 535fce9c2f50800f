"""transformers classes for pruned causal LMs whose decoder layers differ in width.

transformers builds every decoder layer from one config, so a checkpoint with per-layer head counts
or MLP widths fails `from_pretrained` with size mismatches. These classes subclass the stock ones
(Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3, OPT): the config carries `struprune_layout` (per-layer query heads,
K/V heads and MLP widths) and the model shrinks each layer to it right after the stock
constructor, before any weight is loaded. Parameter names, forward, generate and the KV cache are
the stock ones (HF attention reshapes with -1 heads, and the cache is per layer).

This file is self-contained on purpose (torch and transformers only): a pruned folder ships a copy
next to its weights with an `auto_map`, so `from_pretrained(folder, trust_remote_code=True)` works
without the plugin installed. With the plugin imported, the classes are registered with
`AutoConfig` / `AutoModelForCausalLM` and no remote code is needed. It runs on transformers 5 and
on the 4.5x line that Optimum's ONNX exporter needs.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

try:  # Qwen3 arrived in transformers 4.51
    from transformers import Qwen3Config, Qwen3ForCausalLM
except ImportError:  # pragma: no cover - older transformers
    Qwen3Config = Qwen3ForCausalLM = None
try:  # Gemma 2 arrived in transformers 4.42, Gemma 3 (text-only causal LM) in 4.50
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig
except ImportError:  # pragma: no cover - older transformers
    Gemma2Config = Gemma2ForCausalLM = Gemma3ForCausalLM = Gemma3TextConfig = None
try:  # Phi-3 (and Phi-4-mini, which shares its classes) arrived in transformers 4.40
    from transformers import Phi3Config, Phi3ForCausalLM
except ImportError:  # pragma: no cover - older transformers
    Phi3Config = Phi3ForCausalLM = None

LAYOUT_KEY = "struprune_layout"
MODEL_TYPE_PREFIX = "struprune_"


def _resized(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(
        in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )


_COUNT_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_sizes")


def check_layout(config, layout: dict) -> None:
    """Refuse a config whose own fields contradict its recorded layout.

    The attention modules take head_dim from the config, not from the weights: a config whose
    head_dim was edited (16 -> 32) still loads weights of the right shapes, but every head is then
    read as half as many heads twice as wide, with other RoPE frequencies, and the logits are wrong
    without a word. Layer counts and the GQA grouping are checked for the same reason."""
    fix = "Fix: restore the config.json the pruning run wrote (or re-save the pruned model)"
    missing = [k for k in ("family", "head_dim", *_COUNT_KEYS) if k not in layout]
    if missing:
        raise ValueError(f"{LAYOUT_KEY} in config.json lacks {missing}. {fix}")
    layers = config.num_hidden_layers
    lengths = {k: len(layout[k]) for k in _COUNT_KEYS}
    wrong = {k: n for k, n in lengths.items() if n != layers}
    if wrong:
        raise ValueError(
            f"config.json builds {layers} decoder layers (num_hidden_layers), but {LAYOUT_KEY} records "
            + ", ".join(f"{n} entries in {k}" for k, n in wrong.items())
            + f". {fix}"
        )
    hd = int(layout["head_dim"])
    if layout["family"] == "opt":
        config_hd, field = (
            config.hidden_size // config.num_attention_heads,
            "hidden_size / num_attention_heads",
        )
    else:
        config_hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        field = "head_dim"
    if config_hd != hd:
        raise ValueError(
            f"config.json gives head_dim {config_hd} ({field}) but {LAYOUT_KEY} records {hd}: the "
            f"attention would read the weights as heads of {config_hd} and compute wrong outputs. {fix}"
        )
    for i, (n_q, n_kv, width) in enumerate(zip(*(layout[k] for k in _COUNT_KEYS))):
        if min(n_q, n_kv, width) < 1 or n_q % n_kv:
            raise ValueError(
                f"{LAYOUT_KEY}: decoder layer {i} records {n_q} query heads over {n_kv} K/V heads and "
                f"{width} MLP channels, which no model has. {fix}"
            )


class LayerConfig:
    """One decoder layer's view of the model config: the shared config, except for the fields
    this layer overrides.

    Phi-3 attention splits its fused qkv_proj output at `self.config.num_attention_heads *
    head_dim`, read from the model-wide config on every call, so a layer that lost query heads
    needs its own count there. Everything else (attention implementation, sliding window, later
    `set_attn_implementation` calls) must stay the shared config's, so reads and writes of any
    other field go to it; the layer keeps no copy that could drift.
    """

    def __init__(self, base, **overrides) -> None:
        object.__setattr__(self, "_struprune_base", base)
        object.__setattr__(self, "_struprune_overrides", dict(overrides))

    def __getattr__(self, name: str):
        # Only reached for names not in the instance dict. A half-built copy (deepcopy, pickle)
        # has no base yet and must not recurse into one.
        own = object.__getattribute__(self, "__dict__")
        if name.startswith("__") or "_struprune_base" not in own:
            raise AttributeError(name)
        if name in own["_struprune_overrides"]:
            return own["_struprune_overrides"][name]
        return getattr(own["_struprune_base"], name)

    def __setattr__(self, name: str, value) -> None:
        if name in self._struprune_overrides:
            self._struprune_overrides[name] = value
        else:
            setattr(self._struprune_base, name, value)

    def __repr__(self) -> str:
        return f"LayerConfig({self._struprune_overrides}, base={type(self._struprune_base).__name__})"


def set_layer_query_heads(attn: nn.Module, num_heads: int) -> None:
    """Give a fused-qkv attention (Phi-3) its own query head count (see LayerConfig).

    Applied on every call, also when the count equals the model's: the model config's own field
    may change later (a uniform layout is mirrored into it on save) and the layer must not follow.
    A config that already is a layer view (of this file or of a copy shipped with a checkpoint)
    is unwrapped, never nested."""
    config = attn.config
    base = vars(config).get("_struprune_base", config)
    attn.config = LayerConfig(base, num_attention_heads=num_heads)


def apply_layout(model: nn.Module, layout: dict) -> None:
    """Shrink every decoder layer to the widths `layout` records (weights are loaded afterwards)."""
    check_layout(model.config, layout)
    layers = model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers
    counts = tuple(layout[k] for k in _COUNT_KEYS)
    hd = int(layout["head_dim"])
    for layer, n_q, n_kv, width in zip(layers, *counts):
        attn = layer.self_attn
        if hasattr(attn, "qkv_proj"):  # Phi-3: rows of all Q heads, then K heads, then V heads
            hidden = attn.qkv_proj.in_features
            attn.qkv_proj = _resized(attn.qkv_proj, hidden, (n_q + 2 * n_kv) * hd)
            attn.o_proj = _resized(attn.o_proj, n_q * hd, hidden)
            mlp = layer.mlp  # gate_up_proj: the gate rows, then the up rows
            mlp.gate_up_proj = _resized(mlp.gate_up_proj, hidden, 2 * width)
            mlp.down_proj = _resized(mlp.down_proj, width, hidden)
            set_layer_query_heads(attn, n_q)
        elif hasattr(attn, "o_proj"):
            hidden = attn.q_proj.in_features
            attn.q_proj = _resized(attn.q_proj, hidden, n_q * hd)
            attn.k_proj = _resized(attn.k_proj, hidden, n_kv * hd)
            attn.v_proj = _resized(attn.v_proj, hidden, n_kv * hd)
            attn.o_proj = _resized(attn.o_proj, n_q * hd, hidden)
            mlp = layer.mlp
            mlp.gate_proj = _resized(mlp.gate_proj, hidden, width)
            mlp.up_proj = _resized(mlp.up_proj, hidden, width)
            mlp.down_proj = _resized(mlp.down_proj, width, hidden)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = width
        else:  # OPT
            hidden = attn.q_proj.in_features
            attn.q_proj = _resized(attn.q_proj, hidden, n_q * hd)
            attn.k_proj = _resized(attn.k_proj, hidden, n_kv * hd)
            attn.v_proj = _resized(attn.v_proj, hidden, n_kv * hd)
            attn.out_proj = _resized(attn.out_proj, n_q * hd, hidden)
            layer.fc1 = _resized(layer.fc1, hidden, width)
            layer.fc2 = _resized(layer.fc2, width, hidden)
            attn.head_dim = hd
        for name, value in (
            ("num_heads", n_q),
            ("num_key_value_heads", n_kv),
            ("num_key_value_groups", n_q // n_kv),
        ):
            if hasattr(attn, name):
                setattr(attn, name, value)


def _pruned_classes(base_config: type, base_model: type) -> tuple[type, type]:
    model_type = MODEL_TYPE_PREFIX + base_config.model_type

    config_cls = type(
        f"StruPrune{base_model.__name__.replace('ForCausalLM', '')}Config",
        (base_config,),
        {
            "model_type": model_type,
            "__doc__": f"{base_config.__name__} plus `{LAYOUT_KEY}` (per-layer widths).",
        },
    )

    def __init__(self, config):
        base_model.__init__(self, config)
        layout = getattr(config, LAYOUT_KEY, None)
        if layout is None:
            raise ValueError(
                f"a {model_type} config needs {LAYOUT_KEY} (per-layer widths); this one has none. "
                "Fix: load the folder the pruning run wrote, unchanged"
            )
        apply_layout(self, layout)

    model_cls = type(
        f"StruPrune{base_model.__name__}",
        (base_model,),
        {
            "config_class": config_cls,
            "__init__": __init__,
            "__doc__": f"{base_model.__name__} whose decoder layers follow `config.{LAYOUT_KEY}`.",
        },
    )
    config_cls.__module__ = model_cls.__module__ = __name__
    return config_cls, model_cls


StruPruneLlamaConfig, StruPruneLlamaForCausalLM = _pruned_classes(LlamaConfig, LlamaForCausalLM)
StruPruneMistralConfig, StruPruneMistralForCausalLM = _pruned_classes(MistralConfig, MistralForCausalLM)
StruPruneQwen2Config, StruPruneQwen2ForCausalLM = _pruned_classes(Qwen2Config, Qwen2ForCausalLM)
StruPruneOPTConfig, StruPruneOPTForCausalLM = _pruned_classes(OPTConfig, OPTForCausalLM)
_OPTIONAL = []
if Qwen3Config is not None:
    StruPruneQwen3Config, StruPruneQwen3ForCausalLM = _pruned_classes(Qwen3Config, Qwen3ForCausalLM)
    _OPTIONAL.append((StruPruneQwen3Config, StruPruneQwen3ForCausalLM))
if Gemma3TextConfig is not None:
    StruPruneGemma2Config, StruPruneGemma2ForCausalLM = _pruned_classes(Gemma2Config, Gemma2ForCausalLM)
    StruPruneGemma3Config, StruPruneGemma3ForCausalLM = _pruned_classes(Gemma3TextConfig, Gemma3ForCausalLM)
    _OPTIONAL += [
        (StruPruneGemma2Config, StruPruneGemma2ForCausalLM),
        (StruPruneGemma3Config, StruPruneGemma3ForCausalLM),
    ]
if Phi3Config is not None:
    StruPrunePhi3Config, StruPrunePhi3ForCausalLM = _pruned_classes(Phi3Config, Phi3ForCausalLM)
    _OPTIONAL.append((StruPrunePhi3Config, StruPrunePhi3ForCausalLM))

#: stock model_type -> (config class, model class) of its pruned variant
PRUNED_CLASSES = {
    cfg.model_type[len(MODEL_TYPE_PREFIX) :]: (cfg, model)
    for cfg, model in [
        (StruPruneLlamaConfig, StruPruneLlamaForCausalLM),
        (StruPruneMistralConfig, StruPruneMistralForCausalLM),
        (StruPruneQwen2Config, StruPruneQwen2ForCausalLM),
        (StruPruneOPTConfig, StruPruneOPTForCausalLM),
        *_OPTIONAL,
    ]
}


def register_auto_classes() -> None:
    """Let AutoConfig / AutoModelForCausalLM resolve the `struprune_*` model types."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for config_cls, model_cls in PRUNED_CLASSES.values():
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
            AutoModelForCausalLM.register(config_cls, model_cls)
        except ValueError:  # already registered (module imported twice under two names)
            pass


def kv_heads_per_layer(config) -> list[int] | None:
    layout = getattr(config, LAYOUT_KEY, None)
    return list(layout["num_key_value_heads"]) if layout else None


def register_onnx_export() -> bool:
    """Let Optimum's ONNX exporter (`main_export`, `optimum-cli export onnx`) take the pruned model
    types with the stock ONNX configs of their base types. Per-layer query heads and MLP widths
    need nothing more (the exporter traces the real modules); per-layer K/V head counts get dummy
    past key/values shaped layer by layer. Returns False when Optimum's exporter is missing."""
    try:  # optimum 2 keeps the task table but moved the ONNX exporter into optimum-onnx
        from optimum.exporters.onnx import export_models  # noqa: F401
        from optimum.exporters.tasks import TasksManager
    except ImportError:
        return False
    supported = TasksManager._SUPPORTED_MODEL_TYPE
    for base_type in PRUNED_CLASSES:
        for key in {MODEL_TYPE_PREFIX + base_type, (MODEL_TYPE_PREFIX + base_type).replace("_", "-")}:
            supported.setdefault(key, {})["onnx"] = _StockTasks(supported, base_type)
    return True


class _StockTasks(Mapping):
    """The base type's ONNX task table, read when Optimum asks (its own configs register lazily,
    possibly after this module was imported), each constructor adapted to the layout."""

    def __init__(self, supported: dict, base_type: str):
        self._supported, self._base_type = supported, base_type

    def _stock(self) -> dict:
        return self._supported.get(self._base_type, {}).get("onnx", {})

    def __getitem__(self, task):
        return _layout_constructor(self._stock()[task])

    def __iter__(self):
        return iter(self._stock())

    def __len__(self) -> int:
        return len(self._stock())


def _layout_constructor(constructor):
    """Optimum's constructors are partials of an OnnxConfig class; the stock classes shape the
    dummy KV cache from one `num_key_value_heads`."""

    def construct(config, *args, **kwargs):
        heads = kv_heads_per_layer(config)
        if heads and len(set(heads)) == 1:
            config.num_key_value_heads = heads[0]
        elif heads:
            cls = _per_layer_kv_onnx_config(constructor.func)
            return cls(config, *constructor.args, *args, **{**constructor.keywords, **kwargs})
        return constructor(config, *args, **kwargs)

    return construct


def _per_layer_kv_onnx_config(config_cls: type) -> type:
    stock = config_cls.DUMMY_PKV_GENERATOR_CLASS

    class PerLayerPastKeyValues(stock):
        def __init__(self, task, normalized_config, *args, **kwargs):
            super().__init__(task, normalized_config, *args, **kwargs)
            layout = getattr(normalized_config.config, LAYOUT_KEY)
            self.layer_kv_heads, self.layer_head_dim = layout["num_key_value_heads"], int(layout["head_dim"])

        def generate(self, input_name, framework="pt", int_dtype="int64", float_dtype="fp32"):
            def tensor(heads):
                shape = (self.batch_size, heads, self.sequence_length, self.layer_head_dim)
                return self.random_float_tensor(shape, framework=framework, dtype=float_dtype)

            return [(tensor(h), tensor(h)) for h in self.layer_kv_heads]

    generators = tuple(
        PerLayerPastKeyValues if g is stock else g for g in config_cls.DUMMY_INPUT_GENERATOR_CLASSES
    )
    return type(
        f"StruPrune{config_cls.__name__}",
        (config_cls,),
        {"DUMMY_INPUT_GENERATOR_CLASSES": generators, "DUMMY_PKV_GENERATOR_CLASS": PerLayerPastKeyValues},
    )


# Loaded as remote code by `optimum-cli export onnx --trust-remote-code`: register right away.
if "optimum.exporters.tasks" in sys.modules:
    register_onnx_export()
