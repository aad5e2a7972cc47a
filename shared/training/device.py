"""Which torch device a run trains on, and moving batches and saved state between devices.

One setting names the device everywhere a model trains: ``auto`` (CUDA when torch sees a GPU,
else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. The federated clients
(:mod:`shared.federated.student_task`) and the server's pretraining (teacher and distillation,
:mod:`simulation.pretrain`) resolve it with :func:`resolve_device`, so both refuse a GPU that
is not there with the same one-line error.

Training data is built, shuffled (the loaders draw from a CPU generator, so a run shuffles
the same whatever the device) and trimmed on the CPU; the loss functions move only the model
inputs to the model's device (:func:`to_device`). A model trained on a GPU is saved as CPU
tensors (:func:`cpu_state`) so the file loads on a machine without one, and the GPU memory
torch cached for the work is handed back once it is done (:func:`release_cached_memory`).
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence

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


def to_device(batch: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    """``batch``'s tensors on ``device`` (the same tensor objects where they are there
    already, so a CPU run computes exactly what it did before devices were configurable)."""
    return tuple(t.to(device) for t in batch)


def cpu_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a ``state_dict``) with every tensor on the CPU, for a file that must load
    on a machine without a GPU. Tensors on the CPU are kept as they are (the same bytes
    saved as before)."""
    return {name: value.cpu() for name, value in state.items()}


def release_cached_memory(device: torch.device) -> None:
    """Give the GPU memory torch's caching allocator still holds after work on ``device``
    back to the driver; nothing for the CPU. Freed tensors stay reserved by the process
    that used them: a simulation that pretrained on a GPU kept it, and the clients that Ray
    gives GPU shares (other processes) could not use it. Garbage is collected first, so
    that tensors only unreachable cycles still hold are freed too."""
    if device.type != "cuda":
        return
    gc.collect()
    torch.cuda.empty_cache()
