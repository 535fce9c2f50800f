"""Shortcuts for the repeated passes over one resident layer's calibration batches.

Pruning a layer runs it over every calibration batch several times: a statistics pass for the MLP
solver, then an output pass that computes the next layer's inputs with the pruned weights. Two
parts of that work are redundant, and on SmolLM2 they cost about one dense forward of the model:

* the MLP statistics pass only needs the MLP's *input*; the dense MLP's output is thrown away.
  `stop_at` ends the layer's forward as soon as the recorders have seen that input;
* the MLP's pruning leaves attention untouched, and the output pass feeds the layer the same
  hidden states as the statistics pass, so attention's output is the same tensor both times.
  `AttentionCache` keeps it from the statistics pass and hands it back in the output pass, which
  then runs only the norms, the residual adds and the pruned MLP, in the family's own code.

Both are exact: the output pass computes bit for bit what the full layer would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


class _StopLayer(Exception):
    """Raised by `stop_at`'s hook to leave the layer's forward early; caught by `run_until_stop`."""


@contextlib.contextmanager
def stop_at(module: nn.Module) -> Iterator[None]:
    """While active, a call of `module` ends the surrounding forward before `module` computes.
    Register it after the recorders that hook the same module: hooks run in registration order."""

    def stop(_module, _args):
        raise _StopLayer

    handle = module.register_forward_pre_hook(stop)
    try:
        yield
    finally:
        handle.remove()


def run_until_stop(forward: Callable, *args) -> None:
    """`forward(*args)`, where a `stop_at` hook ending it early is the expected outcome."""
    with contextlib.suppress(_StopLayer):
        forward(*args)


class AttentionCache:
    """Attention outputs of one layer, recorded batch by batch and replayed in the same order."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []
        self.module: nn.Module | None = None
        self._arity = 1

    @contextlib.contextmanager
    def recording(self, attn: nn.Module) -> Iterator[None]:
        """Keep every output `attn` produces while active (after any earlier recording is dropped)."""
        self.clear()
        self.module = attn

        def keep(_module, _args, out):
            first = out[0] if isinstance(out, tuple) else out
            self._arity = len(out) if isinstance(out, tuple) else 0
            self.outputs.append(first.detach())

        handle = attn.register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    def clear(self) -> None:
        """Drop what was recorded (a cache serves one layer's output pass)."""
        self.outputs, self.module = [], None

    def usable_for(self, attn: nn.Module, batches: int) -> bool:
        return self.module is attn and len(self.outputs) == batches

    @contextlib.contextmanager
    def replaying(self, attn: nn.Module) -> Iterator[None]:
        """While active, `attn` returns the recorded outputs in order instead of computing them
        (the family's attention returns `(output, weights)`; the weights come back as None)."""
        queue = iter(self.outputs)
        arity = self._arity

        def replay(*_args, **_kwargs):
            out = next(queue)
            return out if arity == 0 else (out, *([None] * (arity - 1)))

        previous = attn.__dict__.get("forward")  # a wrapper some host installed (accelerate...)
        attn.forward = replay  # an instance attribute: nn.Module.__call__ reads self.forward
        try:
            yield
            if next(queue, None) is not None:
                raise RuntimeError("the output pass ran fewer batches than attention recorded")
        finally:
            if previous is None:
                del attn.forward
            else:
                attn.forward = previous
            self.clear()
