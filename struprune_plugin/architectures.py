"""The one place that knows which modules form a head or an MLP channel in each model family.

Detection is structural (module names and types), not by `model_type`, so Llama, Mistral, Qwen2,
Qwen3 (q_norm/k_norm) and OPT are all recognised, and a model that merely subclasses one of them
works too. Everything else in the plugin talks to a `LayerView`, never to raw attribute names.

Phi-3 (and Phi-4-mini) fuse q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`. Their
views expose q, k, v, gate and up as `RowBlock`s, row ranges of the fused linear with the
`.weight` / `.bias` / `.out_features` a separate projection would have, so every score, energy and
solver reads (and every refit writes) the same rows whatever the layout. A fused layout is
accepted only for Phi-3's own classes: the row order (all Q heads, then K, then V; gate, then up)
is a convention of the forward, not visible in module names or shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .admm import ACTIVATIONS
from .errors import UnsupportedArchitectureError
from .groups import LayerGeometry
from .modeling_struprune import set_layer_query_heads


@dataclass(frozen=True)
class RowBlock:
    """Rows [start, stop) of a fused linear, standing in for the separate projection they replace.

    `.weight` and `.bias` are views of the fused parameters, so reading them costs nothing and an
    in-place write under `torch.no_grad()` (a refit's `weight.copy_`) lands in the fused module. A
    block is tied to the fused module's current shape: take a fresh `LayerView` after surgery.
    """

    linear: nn.Linear
    start: int
    stop: int

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight[self.start : self.stop]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.linear.bias is None else self.linear.bias[self.start : self.stop]

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    @property
    def in_features(self) -> int:
        return self.linear.in_features


#: A projection as the solvers see it: its own Linear, or its rows of a fused one.
Projection = nn.Linear | RowBlock


@dataclass(frozen=True)
class LayerView:
    """The prunable modules of one decoder layer and the shapes that tie them together."""

    family: str  # "llama" (gated MLP, RoPE, GQA), "phi3" (the same, fused) or "opt" (fc1/ReLU/fc2)
    layer: nn.Module
    attn: nn.Module
    q: Projection
    k: Projection
    v: Projection
    o: nn.Linear
    mlp_in: tuple[Projection, ...]  # (gate, up) or (fc1,): their output rows are the MLP channels
    mlp_out: nn.Linear  # down or fc2: its input columns are the MLP channels
    head_dim: int
    # Qwen3's q_norm/k_norm act on head_dim: never pruned. The modules, not their weights, since a
    # layer streamed from disk (residency.py) gets new weight tensors on every visit.
    head_norms: tuple[nn.Module, ...]
    activation: str = "silu"  # the MLP's own activation (admm.ACTIVATIONS), which the solver uses
    fused_qkv: nn.Linear | None = None  # Phi-3 qkv_proj, whose row blocks q, k and v are
    fused_mlp_in: nn.Linear | None = None  # Phi-3 gate_up_proj, whose row blocks mlp_in are

    @property
    def fused(self) -> bool:
        return self.fused_qkv is not None

    @property
    def head_norm_weights(self) -> tuple[nn.Parameter, ...]:
        return tuple(m.weight for m in self.head_norms)

    @property
    def gated(self) -> bool:
        """A gated MLP (gate and up rows per channel), which the ADMM block solver handles."""
        return len(self.mlp_in) == 2

    @property
    def num_heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.k.out_features // self.head_dim

    @property
    def intermediate_size(self) -> int:
        return self.mlp_out.in_features

    @property
    def hidden_size(self) -> int:
        return self.o.out_features

    @property
    def attention_linears(self) -> tuple[nn.Linear, ...]:
        """The attention's modules, each once (a fused qkv_proj is one module, not three)."""
        return (self.fused_qkv, self.o) if self.fused_qkv is not None else (self.q, self.k, self.v, self.o)

    @property
    def mlp_linears(self) -> tuple[nn.Linear, ...]:
        mlp_in = (self.fused_mlp_in,) if self.fused_mlp_in is not None else self.mlp_in
        return (*mlp_in, self.mlp_out)

    @property
    def linears(self) -> tuple[nn.Linear, ...]:
        """Every module holding prunable parameters, each once (parameter counts sum over these)."""
        return (*self.attention_linears, *self.mlp_linears)

    def input_taps(self) -> dict[str, nn.Linear]:
        """One linear per distinct input the layer's linears see (q/k/v share one, gate/up another):
        real modules, since the recorders hook their forward."""
        return {
            "attn_in": self.fused_qkv if self.fused_qkv is not None else self.q,
            "o_in": self.o,
            "mlp_in": self.fused_mlp_in if self.fused_mlp_in is not None else self.mlp_in[0],
            "mlp_hidden": self.mlp_out,
        }

    def refresh_bookkeeping(self) -> None:
        """Set the attributes HF attention reads at run time after heads or channels were removed."""
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedArchitectureError(
                f"layer has {self.num_heads} query heads over {self.num_kv_heads} KV heads: "
                "not an even grouping; the pruning plan broke the GQA rule"
            )
        if hasattr(self.attn, "num_key_value_groups"):
            self.attn.num_key_value_groups = self.num_heads // self.num_kv_heads
        if hasattr(self.attn, "num_heads"):
            self.attn.num_heads = self.num_heads
        if hasattr(self.attn, "num_key_value_heads"):
            self.attn.num_key_value_heads = self.num_kv_heads
        mlp = getattr(self.layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = self.intermediate_size
        if self.fused:
            # Phi-3 splits qkv at config.num_attention_heads * head_dim (the model-wide config),
            # and K at self.num_key_value_heads; gate_up is chunked in halves and needs nothing.
            set_layer_query_heads(self.attn, self.num_heads)


@dataclass(frozen=True)
class ModelView:
    """Where the decoder layers and the modules before them live in a causal LM."""

    family: str
    backbone: nn.Module  # LlamaModel / OPTDecoder: holds `.layers`
    layers: nn.ModuleList
    pre_layer_modules: tuple[nn.Module, ...]  # what computes layer 0's inputs (embeddings, RoPE)

    def layer(self, index: int) -> LayerView:
        return layer_view(self.layers[index], self.family)

    def layer_views(self) -> list[LayerView]:
        return [layer_view(layer, self.family) for layer in self.layers]


_ATTN_NAMES = ("self_attn",)
_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")
#: The classes whose fused row order (qkv: Q heads, K heads, V heads; gate_up: gate, up) the Phi-3
#: views assume. Found in the MRO by name, so subclasses qualify and no import is needed.
_PHI3_CLASSES = {"attn": "Phi3Attention", "mlp": "Phi3MLP"}

#: The submodules each family's solver, surgery and checkpoint code were built and tested for. A
#: layer with others is refused: extra modules are never silently ignored. Gemma 2/3 layers add
#: RMSNorms after attention and around the MLP (`post_attention_layernorm` there normalises the
#: attention output, not the residual). Those act on the hidden dimension, which is never pruned,
#: and are scale-invariant per token, so the refits' objective (the block's output before the norm)
#: still measures the error the residual stream receives, up to each token's scale.
_KNOWN_CHILDREN = {
    "llama": {
        "layer": {
            "self_attn",
            "mlp",
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",  # Gemma 2/3
            "post_feedforward_layernorm",  # Gemma 2/3
        },
        "self_attn": {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "rotary_emb"},
        "mlp": {*_LLAMA_MLP, "act_fn"},
    },
    "phi3": {
        # the residual dropouts are identities in eval mode, where every pass of the engine runs
        "layer": {
            "self_attn",
            "mlp",
            "input_layernorm",
            "post_attention_layernorm",
            "resid_attn_dropout",
            "resid_mlp_dropout",
        },
        "self_attn": {"qkv_proj", "o_proj"},
        "mlp": {"gate_up_proj", "down_proj", "activation_fn"},
    },
    "opt": {
        "layer": {
            "self_attn",
            "activation_fn",
            "self_attn_layer_norm",
            "fc1",
            "fc2",
            "final_layer_norm",
            "dropout",
        },
        "self_attn": {"q_proj", "k_proj", "v_proj", "out_proj", "dropout"},
    },
}
#: The MLP activations each family's code handles: the gated MLP's solver is exact for each of
#: ACTIVATIONS (its auxiliary-variable steps and refits use the function itself); OPT's fc1 -> ReLU
#: -> fc2 path was built and tested for ReLU.
_FAMILY_ACTIVATIONS = {"llama": tuple(ACTIVATIONS), "phi3": tuple(ACTIVATIONS), "opt": ("relu",)}


def mlp_activation(layer: nn.Module, family: str) -> str:
    """The name (a key of admm.ACTIVATIONS) of the function the layer's MLP applies, identified by
    evaluating the module itself rather than trusting a config string, or an error naming it."""
    if family == "opt":
        act = layer.activation_fn
    else:
        act = layer.mlp.activation_fn if family == "phi3" else layer.mlp.act_fn
    probe = torch.linspace(-6, 6, 97)
    for name in _FAMILY_ACTIVATIONS[family]:
        try:
            with torch.no_grad():
                if torch.allclose(act(probe), ACTIVATIONS[name].fn(probe), atol=1e-6):
                    return name
        except Exception:  # an activation that cannot take a plain tensor is none of these
            break
    raise UnsupportedArchitectureError(
        f"decoder layer {type(layer).__name__}: the MLP activation {type(act).__name__} is none of "
        f"{', '.join(_FAMILY_ACTIVATIONS[family])}, which the MLP solver's auxiliary-variable steps and "
        "refits are exact for"
    )


def check_understood(layer: nn.Module, family: str) -> None:
    """Refuse a layer holding modules or an activation the engine was not built for, before any
    work: pruning on an unchecked assumption gives a silently wrong model, or a run wasted at save."""
    known = _KNOWN_CHILDREN[family]
    parts = {"layer": layer, "self_attn": layer.self_attn, "mlp": getattr(layer, "mlp", None)}
    extra = [
        f"{'' if part == 'layer' else part + '.'}{name}"
        for part, allowed in known.items()
        for name, _ in parts[part].named_children()
        if name not in allowed
    ]
    if extra:
        raise UnsupportedArchitectureError(
            f"decoder layer {type(layer).__name__} holds modules the engine does not model: "
            f"{', '.join(extra)}. Pruning it would rest on untested assumptions (e.g. norms around the "
            "MLP change what the refits fit). Supported: Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3 and OPT layers"
        )
    mlp_activation(layer, family)


def _find_backbone(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    for path in ("model", "model.decoder", "decoder", ""):
        module = model
        for part in filter(None, path.split(".")):
            module = getattr(module, part, None)
            if module is None:
                break
        layers = getattr(module, "layers", None) if module is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return module, layers
    raise UnsupportedArchitectureError(
        f"{type(model).__name__}: found no decoder layers (looked for model.layers and "
        "model.decoder.layers as an nn.ModuleList). Supported: Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, "
        "Phi-3 and OPT causal LMs from transformers"
    )


def _is_class(module: nn.Module | None, name: str) -> bool:
    return module is not None and any(cls.__name__ == name for cls in type(module).__mro__)


def _detect_fused(layer: nn.Module, attn: nn.Module) -> str | None:
    """The family of a layer with fused projections ("phi3"), None for separate ones, and an error
    for another model's fused layout, whose row order nothing here knows (GPT-NeoX and InternLM2
    interleave heads)."""
    qkv = getattr(attn, "qkv_proj", None)
    mlp = getattr(layer, "mlp", None)
    if not isinstance(qkv, nn.Linear) and not isinstance(getattr(mlp, "gate_up_proj", None), nn.Linear):
        return None
    if (
        _is_class(attn, _PHI3_CLASSES["attn"])
        and _is_class(mlp, _PHI3_CLASSES["mlp"])
        and all(isinstance(getattr(m, n, None), nn.Linear) for m, n in ((attn, "o_proj"), (mlp, "down_proj")))
    ):
        return "phi3"
    raise UnsupportedArchitectureError(
        f"decoder layer {type(layer).__name__} fuses its projections ({type(attn).__name__}.qkv_proj "
        "or mlp.gate_up_proj), and fused layouts are supported for Phi-3 / Phi-4-mini only "
        f"({_PHI3_CLASSES['attn']} and {_PHI3_CLASSES['mlp']}, whose row order is known): the order "
        "of heads and channels inside a fused weight is a convention of the model's forward"
    )


def detect_family(layer: nn.Module) -> str:
    attn = getattr(layer, "self_attn", None)
    if attn is None:
        raise UnsupportedArchitectureError(
            f"decoder layer {type(layer).__name__} has no `self_attn` module; supported families "
            "are LLaMA-style (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3), Phi-3 and OPT"
        )
    fused = _detect_fused(layer, attn)
    if fused is not None:
        return fused
    missing = [n for n in ("q_proj", "k_proj", "v_proj") if not isinstance(getattr(attn, n, None), nn.Linear)]
    if not isinstance(getattr(attn, "o_proj", None), nn.Linear) and not isinstance(
        getattr(attn, "out_proj", None), nn.Linear
    ):
        missing.append("o_proj/out_proj")
    if missing:
        raise UnsupportedArchitectureError(
            f"attention {type(attn).__name__} lacks separate Linear modules {missing} "
            "(of fused qkv projections, only Phi-3's qkv_proj is supported)"
        )
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in _LLAMA_MLP):
        return "llama"
    if isinstance(getattr(layer, "fc1", None), nn.Linear) and isinstance(
        getattr(layer, "fc2", None), nn.Linear
    ):
        return "opt"
    raise UnsupportedArchitectureError(
        f"decoder layer {type(layer).__name__} has neither mlp.gate_proj/up_proj/down_proj "
        "(LLaMA family) nor fc1/fc2 (OPT): no recognisable MLP to prune"
    )


def layer_view(layer: nn.Module, family: str | None = None) -> LayerView:
    family = family or detect_family(layer)
    attn = layer.self_attn
    head_dim = int(getattr(attn, "head_dim", 0))
    if head_dim <= 0:
        raise UnsupportedArchitectureError(f"{type(attn).__name__} does not expose `head_dim`")
    norms = tuple(
        getattr(attn, n)
        for n in ("q_norm", "k_norm")
        if getattr(attn, n, None) is not None and getattr(getattr(attn, n), "weight", None) is not None
    )
    if family == "phi3":
        return _fused_view(layer, head_dim)
    if family == "llama":
        mlp = layer.mlp
        mlp_in, mlp_out, out = (mlp.gate_proj, mlp.up_proj), mlp.down_proj, attn.o_proj
    else:
        mlp_in, mlp_out, out = (layer.fc1,), layer.fc2, attn.out_proj
    return LayerView(
        family=family,
        layer=layer,
        attn=attn,
        q=attn.q_proj,
        k=attn.k_proj,
        v=attn.v_proj,
        o=out,
        mlp_in=mlp_in,
        mlp_out=mlp_out,
        head_dim=head_dim,
        head_norms=norms,
        activation=mlp_activation(layer, family),
    )


def _fused_view(layer: nn.Module, head_dim: int) -> LayerView:
    """Phi-3: q, k, v and gate, up as row blocks of qkv_proj and gate_up_proj.

    The split comes from the weights' shapes (o_proj's input is the query rows, down_proj's the
    MLP width), not from attributes that may lag behind a surgery."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv, gate_up, o, down = attn.qkv_proj, mlp.gate_up_proj, attn.o_proj, mlp.down_proj
    q_rows, width = o.in_features, down.in_features
    kv_rows, odd = divmod(qkv.out_features - q_rows, 2)
    if odd or kv_rows <= 0 or q_rows % head_dim or kv_rows % head_dim or gate_up.out_features != 2 * width:
        raise UnsupportedArchitectureError(
            f"{type(layer).__name__}: qkv_proj has {qkv.out_features} rows for o_proj's {q_rows} query "
            f"inputs and gate_up_proj {gate_up.out_features} rows for down_proj's {width} inputs; "
            f"no split into whole heads of {head_dim} (Q, then K and V alike) and gate/up halves fits"
        )
    return LayerView(
        family="phi3",
        layer=layer,
        attn=attn,
        q=RowBlock(qkv, 0, q_rows),
        k=RowBlock(qkv, q_rows, q_rows + kv_rows),
        v=RowBlock(qkv, q_rows + kv_rows, q_rows + 2 * kv_rows),
        o=o,
        mlp_in=(RowBlock(gate_up, 0, width), RowBlock(gate_up, width, 2 * width)),
        mlp_out=down,
        head_dim=head_dim,
        head_norms=(),
        activation=mlp_activation(layer, "phi3"),
        fused_qkv=qkv,
        fused_mlp_in=gate_up,
    )


def geometry_of(lv: LayerView) -> LayerGeometry:
    return LayerGeometry(
        hidden=lv.hidden_size,
        num_heads=lv.num_heads,
        num_kv_heads=lv.num_kv_heads,
        head_dim=lv.head_dim,
        intermediate=lv.intermediate_size,
        mlp_in_count=len(lv.mlp_in),
        mlp_in_bias=lv.mlp_in[0].bias is not None,
        qkv_bias=lv.q.bias is not None,
        prunable_params=sum(p.numel() for lin in lv.linears for p in lin.parameters()),
    )


def model_view(model: nn.Module) -> ModelView:
    """Describe a causal LM, or raise UnsupportedArchitectureError naming what is missing."""
    backbone, layers = _find_backbone(model)
    family = detect_family(layers[0])
    for layer in layers:
        layer_view(layer, family)  # every layer must be recognisable, not just the first
        check_understood(layer, family)
    names = ("embed_tokens", "embed_positions", "project_in", "rotary_emb")
    pre = tuple(getattr(backbone, n) for n in names if isinstance(getattr(backbone, n, None), nn.Module))
    if not pre:
        raise UnsupportedArchitectureError(f"{type(backbone).__name__} has no embed_tokens module")
    return ModelView(family=family, backbone=backbone, layers=layers, pre_layer_modules=pre)


def layer_layout(model: nn.Module) -> dict[str, list[int] | int | str]:
    """Per-layer widths and head counts: what a checkpoint must record to be rebuilt."""
    view = model_view(model)
    layers = view.layer_views()
    return {
        "family": view.family,
        "head_dim": layers[0].head_dim,
        "num_attention_heads": [lv.num_heads for lv in layers],
        "num_key_value_heads": [lv.num_kv_heads for lv in layers],
        "intermediate_sizes": [lv.intermediate_size for lv in layers],
    }


def _resized_linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(
        in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )


def apply_layout(model: nn.Module, layout: dict) -> None:
    """Give every layer the shapes a layout records (weights are loaded afterwards).

    Used when loading a checkpoint whose layers differ in width: the skeleton is built from the
    config (usually on the meta device, so no memory is spent), then shrunk here.
    """
    view = model_view(model)
    counts = (layout["num_attention_heads"], layout["num_key_value_heads"], layout["intermediate_sizes"])
    lengths = sorted({len(c) for c in counts})
    if lengths != [len(view.layers)]:
        raise UnsupportedArchitectureError(
            f"layout records {' / '.join(map(str, lengths))} layers but the model has {len(view.layers)}"
        )
    hd = int(layout["head_dim"])
    for lv, n_q, n_kv, width in zip(view.layer_views(), *counts):
        attn = lv.attn
        hidden = lv.hidden_size
        if lv.fused:
            attn.qkv_proj = _resized_linear(attn.qkv_proj, hidden, (n_q + 2 * n_kv) * hd)
            attn.o_proj = _resized_linear(lv.o, n_q * hd, hidden)
            mlp = lv.layer.mlp
            mlp.gate_up_proj = _resized_linear(mlp.gate_up_proj, hidden, 2 * width)
            mlp.down_proj = _resized_linear(mlp.down_proj, width, hidden)
            layer_view(lv.layer, lv.family).refresh_bookkeeping()
            continue
        attn.q_proj = _resized_linear(lv.q, hidden, n_q * hd)
        attn.k_proj = _resized_linear(lv.k, hidden, n_kv * hd)
        attn.v_proj = _resized_linear(lv.v, hidden, n_kv * hd)
        out_name = "o_proj" if lv.family == "llama" else "out_proj"
        setattr(attn, out_name, _resized_linear(lv.o, n_q * hd, hidden))
        if lv.family == "llama":
            mlp = lv.layer.mlp
            mlp.gate_proj = _resized_linear(mlp.gate_proj, hidden, width)
            mlp.up_proj = _resized_linear(mlp.up_proj, hidden, width)
            mlp.down_proj = _resized_linear(mlp.down_proj, width, hidden)
        else:
            lv.layer.fc1 = _resized_linear(lv.layer.fc1, hidden, width)
            lv.layer.fc2 = _resized_linear(lv.layer.fc2, width, hidden)
        layer_view(lv.layer, lv.family).refresh_bookkeeping()


def context_length(config) -> int | None:
    """Positions the model was built for (every supported family states max_position_embeddings)."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def is_uniform(layout: dict) -> bool:
    return all(
        len(set(layout[k])) == 1 for k in ("num_attention_heads", "num_key_value_heads", "intermediate_sizes")
    )


def parameter_count(module: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def prunable_parameter_count(model: nn.Module) -> int:
    """Parameters of the attention and MLP linears: the denominator of structured sparsity."""
    return sum(
        sum(p.numel() for p in lin.parameters())
        for lv in model_view(model).layer_views()
        for lin in lv.linears
    )


def enable_output_biases(model: nn.Module, view: ModelView) -> None:
    """Give o_proj and down_proj (fc2) a bias, where the checkpoint format can carry one.

    Bias compensation (FLAP, StructPrune's intercept refit) needs it. OPT has the biases already.
    Llama switches them on through the config's own flags (`attention_bias`, `mlp_bias`), so
    q/k/v/gate/up get zero biases too and the checkpoint still loads with the stock classes.
    Mistral and Qwen2/3 have no such flags for o_proj and down_proj: a clear error.
    """
    if view.family == "opt":
        return  # OPT's out_proj and fc2 have biases already
    model_type = getattr(model.config, "model_type", "")
    if model_type != "llama":
        raise UnsupportedArchitectureError(
            f"bias compensation needs a bias on o_proj and down_proj, which transformers' "
            f"{model_type!r} models cannot carry (only Llama has attention_bias/mlp_bias flags, and "
            "OPT has the biases). Fix: FLAP with bias_compensation=False (--no-bias-compensation), "
            "StructPrune with bias_refit=False (no --bias-refit)"
        )
    for lv in view.layer_views():
        for linear in lv.linears:
            if linear.bias is None:
                linear.bias = nn.Parameter(
                    torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
                )
    model.config.attention_bias = True
    model.config.mlp_bias = True
