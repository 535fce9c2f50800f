"""Calibration statistics of one decoder layer, accumulated over streamed batches with hooks.

Only sufficient statistics are kept (per-feature sums, sums of squares, token counts), never the
activations themselves, so memory does not grow with the number of calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import distributed
from .errors import NonFiniteActivationError


@dataclass
class FeatureMoments:
    """Running per-feature sums of x_j and x_j^2 (float64) for one linear layer's input."""

    sum_x: torch.Tensor | None = None
    sum_sq: torch.Tensor | None = None
    tokens: int = 0
    with_gram: bool = False  # also accumulate X^T X (features x features), for least-squares refits
    gram: torch.Tensor | None = None
    keep_inputs: bool = False  # also keep the inputs themselves (the ADMM solver needs the tokens)
    inputs: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        # One batch sums in float32 (pairwise summation keeps it accurate); batches add up in float64.
        sums, squares = flat.float().sum(0).double(), flat.float().pow(2).sum(0).double()
        self.sum_x = sums if self.sum_x is None else self.sum_x + sums
        self.sum_sq = squares if self.sum_sq is None else self.sum_sq + squares
        self.tokens += flat.shape[0]
        if self.with_gram:
            wide = flat.double()
            g = wide.T @ wide
            self.gram = g if self.gram is None else self.gram + g
        if self.keep_inputs:
            self.inputs.append(flat.float().clone())

    def combine_ranks(self) -> None:
        """Under torch.distributed, sum the statistics of every rank's tokens (the kept inputs
        stay local: the solver reduces what it computes from them)."""
        if not distributed.active():
            return
        for name in ("sum_x", "sum_sq", "gram"):
            value = getattr(self, name)
            if value is not None:
                distributed.all_sum(value)
        self.tokens = distributed.all_sum_int(self.tokens)

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
    grams: tuple[str, ...] = ()
    keep_inputs: tuple[str, ...] = ()
    stats: dict[str, FeatureMoments] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def __enter__(self) -> InputRecorder:
        for name, module in self.modules.items():
            self.stats[name] = FeatureMoments(
                with_gram=name in self.grams, keep_inputs=name in self.keep_inputs
            )
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def record(_module, args):
            x = args[0]
            self.stats[name].add(x)
            # A NaN/inf anywhere in x makes its feature's running sum of squares non-finite, so
            # checking that small vector replaces a full pass over the activations.
            if not torch.isfinite(self.stats[name].sum_sq).all():
                raise NonFiniteActivationError(
                    f"NaN/inf in the input of {name} in decoder layer {self.layer_index}. "
                    "Fix: check the calibration data and the model weights (an fp16 overflow? load "
                    "the model in float32)"
                )

        return record

    def __exit__(self, exc_type, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if exc_type is None:
            for moments in self.stats.values():
                moments.combine_ranks()
