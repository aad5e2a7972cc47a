"""Which torch device a run trains on.

One setting names the device where a model trains: ``auto`` (CUDA when torch sees a GPU,
else the CPU), ``cpu``, ``cuda`` or ``cuda:N``, resolved by :func:`resolve_device` (here, not
in :mod:`shared.federated.student_task`, so that server-side training can use it without
importing the federation).
"""

from __future__ import annotations

import torch

from shared.errors import ConfigError


def check_device_name(name: str) -> torch.device | None:
    """The device ``name`` means (``None`` for ``auto``), refusing any other form than auto,
    cpu, cuda or cuda:N, whatever this machine has (a server checks its clients' setting)."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from err
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when a GPU is visible, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` as
    given (refused with a clear error when that device is not there)."""
    device = check_device_name(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} asked for CUDA but torch sees no GPU (torch "
                f"{torch.__version__}); use device=auto or device=cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r}: only {torch.cuda.device_count()} GPU(s) are visible"
            )
    return device
