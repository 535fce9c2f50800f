"""Data-parallel calibration over torch.distributed: each rank streams its share of the windows.

Launched under `torchrun` (or `accelerate launch`, or inside llm-compressor's distributed
`oneshot`), every rank holds the same model and the same calibration ids; `shard_windows` gives
rank r its contiguous block of windows, so the ranks' tokens, concatenated in rank order, are the
one-process run's tokens in the same order. Every sum over tokens (feature moments, Gram matrices,
the ADMM solver's cross terms, losses, KL totals) goes through `all_sum`, so every rank takes the
same decisions from the same numbers, and only rank 0 writes (`is_writer`).

Without an initialised process group every function here is the identity: one process is the
special case world = 1, not a separate code path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Whether this process writes outputs (rank 0, or the only process)."""
    return rank() == 0


def window_range(count: int) -> tuple[int, int]:
    """[start, stop) of this rank's block of `count` windows: the first `count % world` ranks
    take one more, so blocks differ by at most one window."""
    w, r = world(), rank()
    base, extra = divmod(count, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


_ALREADY_SHARDED = False


@contextlib.contextmanager
def windows_already_sharded() -> Iterator[None]:
    """Within the block, calibration ids are taken to be this rank's own share already (as in
    llm-compressor, whose users partition the dataset per rank), so `shard_windows` keeps them."""
    global _ALREADY_SHARDED
    previous, _ALREADY_SHARDED = _ALREADY_SHARDED, True
    try:
        yield
    finally:
        _ALREADY_SHARDED = previous


def shard_windows(ids: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous block of calibration windows (rows of `ids`)."""
    if not active() or _ALREADY_SHARDED:
        return ids
    if ids.shape[0] < world():
        from .errors import CalibrationDataError

        raise CalibrationDataError(
            f"{ids.shape[0]} calibration windows cannot be shared by {world()} processes. Fix: "
            f"calibrate on at least {world()} windows, or launch fewer processes"
        )
    start, stop = window_range(ids.shape[0])
    return ids[start:stop]


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over ranks (in place, returned), on the device the backend reduces on
    (gloo: CPU, NCCL: the rank's GPU). Callers pass float64 sums, so rank order barely matters."""
    if not active():
        return tensor
    target = _device()
    work = tensor if tensor.device.type == target.type else tensor.to(target)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_sum_scalar(value: float) -> float:
    if not active():
        return value
    return float(all_sum(torch.tensor([value], dtype=torch.float64, device=_device()))[0])


def all_sum_int(value: int) -> int:
    if not active():
        return value
    return int(all_sum(torch.tensor([value], dtype=torch.int64, device=_device()))[0])


def row_offset(local_rows: int) -> tuple[int, int]:
    """(first global row of this rank's rows, total rows): ranks hold consecutive blocks of the
    one-process row order, so a seeded subsample of the global rows can be taken locally."""
    if not active():
        return 0, local_rows
    counts = torch.zeros(world(), dtype=torch.int64, device=_device())
    counts[rank()] = local_rows
    all_sum(counts)
    return int(counts[: rank()].sum()), int(counts.sum())


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
