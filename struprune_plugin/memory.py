"""Peak memory as the pruning run saw it: CUDA max allocated on a GPU, process peak RSS on CPU."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PeakMemory:
    bytes: int
    kind: str  # "cuda_max_allocated" or "cpu_peak_rss"

    @property
    def mib(self) -> float:
        return self.bytes / 2**20


def reset_peak(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str) -> PeakMemory:
    """On CPU this is the whole process's high-water mark (model loading included): Linux has no
    way to reset it, so compare runs made in separate processes."""
    device = torch.device(device)
    if device.type == "cuda":
        return PeakMemory(torch.cuda.max_memory_allocated(device), "cuda_max_allocated")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return PeakMemory(rss if sys.platform == "darwin" else rss * 1024, "cpu_peak_rss")
