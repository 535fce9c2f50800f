"""StructPrune: structured global pruning of LLMs with one decoder layer resident.

Public entry points: `prune_model` (the layer-by-layer engine), `save_pruned` / `load_pruned`
(checkpoints with per-layer widths), `perplexity`, and the `struprune` command line.
"""

__version__ = "0.1.0"

from .checkpoint import load_pruned, save_pruned
from .engine import PruneConfig, PruneResult, prune_model
from .evaluation import perplexity

__all__ = [
    "PruneConfig",
    "PruneResult",
    "__version__",
    "load_pruned",
    "perplexity",
    "prune_model",
    "save_pruned",
]
