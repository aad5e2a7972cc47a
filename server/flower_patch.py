"""Swap an attribute of one of Flower's modules for ours, only while it is Flower's own.

The SecAgg+ helpers (:mod:`server.secagg`) and the simulation runtime
(:mod:`server.vce_runtime`) replace objects inside Flower's modules under one rule: an
attribute is replaced only while it is still the object Flower shipped. A second call then
changes nothing, and a Flower release that renamed or reworked the attribute keeps its own.
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["replace_if_unchanged"]


def replace_if_unchanged(
    module: ModuleType, name: str, original: object, replacement: object
) -> None:
    """Set ``module.name`` to ``replacement`` if it is ``original`` now; else leave it."""
    if getattr(module, name, None) is original:
        setattr(module, name, replacement)
