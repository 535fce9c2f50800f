"""Compute devices, checked up front: torch's own failures for a missing GPU come from deep inside
its lazy CUDA initialisation (an AttributeError on a CPU-only build) and name no fix."""

from __future__ import annotations

import torch

from .errors import DeviceError

_BACKENDS = {
    "cuda": lambda: torch.cuda.is_available(),
    "mps": lambda: torch.backends.mps.is_available(),
    "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
}


def _count(kind: str) -> int:
    return {"cuda": torch.cuda.device_count, "xpu": lambda: torch.xpu.device_count()}.get(kind, lambda: 1)()


def resolve_device(name: str | torch.device) -> torch.device:
    """`name` as a torch.device that this process can really use, or a DeviceError saying why not."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as err:
        raise DeviceError(
            f"unknown device {str(name)!r}. Fix: use cpu, cuda, cuda:N (or mps on Apple silicon)"
        ) from err
    if device.type == "cpu":
        return device
    check = _BACKENDS.get(device.type)
    if check is None:
        raise DeviceError(
            f"device {str(name)!r} ({device.type}) is not supported here. Fix: use cpu or cuda[:N]"
        )
    if not check():
        if device.type == "cuda" and torch.version.cuda is None:
            why = f"this torch build ({torch.__version__}) has no CUDA support"
        else:
            why = f"no {device.type} device is visible to this process"
        raise DeviceError(
            f"device {str(name)!r}: {why}. Fix: run with --device cpu, or install a {device.type} build of "
            "torch on a machine that has the device"
        )
    if device.index is not None and device.index >= _count(device.type):
        raise DeviceError(
            f"device {str(name)!r}: only {_count(device.type)} {device.type} device(s) are visible "
            f"({device.type}:0..{_count(device.type) - 1}). Fix: pick one of those"
        )
    return device
