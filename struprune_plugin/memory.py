"""Peak memory as the pruning run saw it: CUDA max allocated on a GPU, process peak RSS on CPU."""

from __future__ import annotations

import resource
import sys
import threading
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PeakMemory:
    bytes: int
    kind: str  # "cuda_max_allocated" or "cpu_peak_rss" (sampled over the pruning run)


def reset_peak(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str, sampler: RssSampler | None = None) -> PeakMemory:
    """CUDA: max allocated since `reset_peak`. CPU: the sampled peak RSS of the block if a sampler
    ran, else the whole process's high-water mark (ru_maxrss, model loading included)."""
    device = torch.device(device)
    if device.type == "cuda":
        return PeakMemory(torch.cuda.max_memory_allocated(device), "cuda_max_allocated")
    if sampler is not None:
        return PeakMemory(sampler.peak, "cpu_peak_rss")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return PeakMemory(rss if sys.platform == "darwin" else rss * 1024, "cpu_process_max_rss")


class RssSampler:
    """Peak resident memory of this process over a block, sampled in a background thread.

    Unlike ru_maxrss it can be scoped to one step (pruning, not model loading or evaluation).
    """

    def __init__(self, interval: float = 0.01):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)
