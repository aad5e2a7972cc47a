"""Model compression for the on-device student: prune -> export to ONNX -> int8.

Server-side (needs torch). The device side lives in :mod:`shared.ondevice` and never imports
this package.
"""

from shared.compression.onnx_export import ExportConfig, ExportReport, export_onnx
from shared.compression.prune import (
    LayerSparsity,
    PruneConfig,
    PruneReport,
    prune_model,
    sparsity_report,
)
from shared.compression.quantize import (
    QuantizeConfig,
    QuantizeReport,
    quantize_onnx,
    random_histories,
    top_k_agreement,
)

__all__ = [
    "ExportConfig",
    "ExportReport",
    "LayerSparsity",
    "PruneConfig",
    "PruneReport",
    "QuantizeConfig",
    "QuantizeReport",
    "export_onnx",
    "prune_model",
    "quantize_onnx",
    "random_histories",
    "sparsity_report",
    "top_k_agreement",
]
