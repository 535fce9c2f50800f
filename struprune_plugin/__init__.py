"""StructPrune: structured global pruning of LLMs with one decoder layer resident.

Public entry points: `prune_model` (the layer-by-layer engine), `save_pruned` / `load_pruned`
(checkpoints with per-layer widths), `perplexity`, the `struprune` command line,
`tp_adapter` (Torch-Pruning) and `llmcompressor_modifier.StructPruneModifier` (llm-compressor
recipes; registered with llm-compressor's ModifierFactory whenever both packages are imported).
"""

__version__ = "0.1.0"

from . import _llmcompressor_hook
from .checkpoint import load_pruned, save_pruned
from .engine import PruneConfig, PruneResult, prune_model
from .evaluation import perplexity
from .modeling_struprune import register_auto_classes

_llmcompressor_hook.install()  # StructPruneModifier for llm-compressor recipes
register_auto_classes()  # from_pretrained on folders with per-layer widths

__all__ = [
    "PruneConfig",
    "PruneResult",
    "__version__",
    "load_pruned",
    "perplexity",
    "prune_model",
    "save_pruned",
]
