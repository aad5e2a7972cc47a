"""On-device inference: load a validated ONNX student and score the catalog (no torch)."""

from shared.ondevice.runtime import (
    FORMAT_TAG,
    INPUT_NAMES,
    OUTPUT_NAME,
    ModelMetadata,
    OnDeviceModel,
    RuntimeConfig,
    catalog_fingerprint,
    graph_digest,
    metadata_digest,
    ort_max_opset,
)

__all__ = [
    "FORMAT_TAG",
    "INPUT_NAMES",
    "OUTPUT_NAME",
    "ModelMetadata",
    "OnDeviceModel",
    "RuntimeConfig",
    "catalog_fingerprint",
    "graph_digest",
    "metadata_digest",
    "ort_max_opset",
]
