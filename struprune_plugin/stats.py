"""Calibration statistics of one decoder layer, accumulated over streamed batches with hooks.

Only sufficient statistics are kept (per-feature sums, sums of squares, token counts), never the
activations themselves, so memory does not grow with the number of calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import NonFiniteActivationError


@dataclass
class FeatureMoments:
    """Running per-feature sums of x_j and x_j^2 (float64) for one linear layer's input."""

    sum_x: torch.Tensor | None = None
    sum_sq: torch.Tensor | None = None
    tokens: int = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        sums, squares = flat.sum(0), flat.pow(2).sum(0)
        self.sum_x = sums if self.sum_x is None else self.sum_x + sums
        self.sum_sq = squares if self.sum_sq is None else self.sum_sq + squares
        self.tokens += flat.shape[0]

    def norms(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens (Wanda's activation norm)."""
        return self.sum_sq.sqrt().float()

    def mean(self) -> torch.Tensor:
        return (self.sum_x / self.tokens).float()

    def variance(self) -> torch.Tensor:
        """Population variance per feature (FLAP's fluctuation), clamped at 0 against round-off."""
        mean = self.sum_x / self.tokens
        return (self.sum_sq / self.tokens - mean.pow(2)).clamp(min=0).float()


@dataclass
class InputRecorder:
    """Forward pre-hooks that record the inputs of chosen linears, checking them for NaN/inf."""

    modules: dict[str, nn.Module]
    layer_index: int
    stats: dict[str, FeatureMoments] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def __enter__(self) -> InputRecorder:
        for name, module in self.modules.items():
            self.stats[name] = FeatureMoments()
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def record(_module, args):
            x = args[0]
            if not torch.isfinite(x).all():
                raise NonFiniteActivationError(
                    f"NaN/inf in the input of {name} in decoder layer {self.layer_index}. "
                    "Fix: check the calibration data and model weights (fp16 overflow? run in "
                    "float32 with --dtype float32)"
                )
            self.stats[name].add(x)

        return record

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
