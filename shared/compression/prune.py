"""Magnitude pruning of the student before export (global or per-layer, made permanent).

Uses ``torch.nn.utils.prune`` (L1 / magnitude, unstructured) and then ``prune.remove`` so
the zeros are baked into the ordinary parameters: no masks, hooks or ``*_orig`` tensors reach
the exporter, and tied parameters stay tied (``remove`` writes into the same Parameter).

Why: zeroed weights compress well when the artifact is shipped compressed, and they bound
how much the model can encode per client before fine-tuning. Pruning does not by itself
shrink a dense ONNX file; the int8 step (:mod:`shared.compression.quantize`) does.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import prune

from shared.errors import ConfigError

Scope = Literal["global", "per_layer"]


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how much.

    ``sparsity``: fraction of the selected weights set to zero, in [0, 1). ``global``
    ranks all selected weights together (layers that matter less lose more); ``per_layer``
    prunes each tensor to exactly ``sparsity``. By default only ``nn.Linear`` weights are
    pruned; ``include_embeddings`` adds ``nn.Embedding`` tables and any other >=2-D parameter
    (e.g. a precomputed item table), ``include_bias`` adds Linear biases.
    """

    sparsity: float = 0.5
    scope: Scope = "global"
    include_embeddings: bool = False
    include_bias: bool = False

    def __post_init__(self) -> None:
        # any real number (a numpy float too), not a bool
        number = isinstance(self.sparsity, numbers.Real) and not isinstance(self.sparsity, bool)
        if not (number and 0.0 <= self.sparsity < 1.0):
            raise ConfigError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        object.__setattr__(self, "sparsity", float(self.sparsity))
        if self.scope not in ("global", "per_layer"):
            raise ConfigError(f"scope must be 'global' or 'per_layer', got {self.scope!r}")


@dataclass(frozen=True)
class LayerSparsity:
    """Zeros in one pruned tensor, e.g. ``name='encoder.0.weight'``."""

    name: str
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class PruneReport:
    """Requested vs achieved sparsity, per tensor and overall."""

    config: PruneConfig
    layers: tuple[LayerSparsity, ...]

    @property
    def overall(self) -> float:
        """Achieved sparsity over all pruned tensors together."""
        total = sum(layer.numel for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / total if total else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "requested": self.config.sparsity,
            "scope": self.config.scope,
            "overall": round(self.overall, 4),
            "layers": {layer.name: round(layer.sparsity, 4) for layer in self.layers},
        }


def publish_prune(sparsity: float) -> PruneConfig | None:
    """How a published model is pruned at ``prune-sparsity``: every weight matrix its graph
    executes, each to exactly that fraction of zeros (None at 0: no pruning)."""
    try:
        config = PruneConfig(sparsity, scope="per_layer", include_embeddings=True)
    except ConfigError as err:  # named as the setting the user gave
        raise ConfigError(f"prune-{err}") from None
    return config if config.sparsity > 0 else None


def prune_targets(model: nn.Module, config: PruneConfig) -> list[tuple[str, nn.Module, str]]:
    """The ``(qualified name, module, parameter name)`` triples ``config`` selects.

    Each Parameter appears once even when tied into several modules.
    """
    seen: set[int] = set()
    out: list[tuple[str, nn.Module, str]] = []
    modules = list(model.named_modules())
    # Linear/Embedding first, so a table tied into a loose attribute keeps its module's name
    layered = [m for m in modules if isinstance(m[1], nn.Linear | nn.Embedding)]
    others = [m for m in modules if not isinstance(m[1], nn.Linear | nn.Embedding)]
    for mod_name, module in layered + others:
        for p_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            if isinstance(module, nn.Linear):
                wanted = p_name == "weight" or (p_name == "bias" and config.include_bias)
            elif isinstance(module, nn.Embedding):
                wanted = config.include_embeddings
            else:
                wanted = config.include_embeddings and param.dim() >= 2
            if wanted:
                seen.add(id(param))
                out.append((f"{mod_name}.{p_name}" if mod_name else p_name, module, p_name))
    return out


def prune_model(model: nn.Module, config: PruneConfig | None = None) -> PruneReport:
    """Zero the smallest-magnitude selected weights of ``model`` in place, permanently."""
    cfg = config or PruneConfig()
    targets = prune_targets(model, cfg)
    if not targets:
        raise ConfigError(
            f"{type(model).__name__} has no parameters selected for pruning (Linear weights"
            f"{', embeddings' if cfg.include_embeddings else ''}); check PruneConfig"
        )
    if cfg.sparsity > 0:
        if cfg.scope == "global":
            prune.global_unstructured(
                [(module, p_name) for _, module, p_name in targets],
                pruning_method=prune.L1Unstructured,
                amount=cfg.sparsity,
            )
        else:
            for _, module, p_name in targets:
                prune.l1_unstructured(module, p_name, amount=cfg.sparsity)
        for _, module, p_name in targets:
            prune.remove(module, p_name)
    return sparsity_report(model, cfg)


def sparsity_report(model: nn.Module, config: PruneConfig | None = None) -> PruneReport:
    """Count exact zeros in the tensors ``config`` selects (no pruning)."""
    cfg = config or PruneConfig()
    layers = []
    for name, module, p_name in prune_targets(model, cfg):
        tensor: torch.Tensor = getattr(module, p_name)
        layers.append(
            LayerSparsity(name=name, numel=tensor.numel(), zeros=int((tensor == 0).sum()))
        )
    return PruneReport(config=cfg, layers=tuple(layers))
