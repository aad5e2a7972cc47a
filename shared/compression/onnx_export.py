"""Export a student-shaped torch module to a self-describing ONNX file.

The module contract (see ``shared/models/student.py``): ``forward(items: Long[B, L],
mask: Bool[B, L]) -> Float[B, n_items]`` over left-padded histories, with attributes
``n_items`` and ``max_len``. Call the model's item-table precompute method before exporting
so the table is a constant of the graph.

Why the legacy TorchScript exporter (``dynamo=False``): the student is a small static graph
(Gather, Linear, LayerNorm, softmax pooling, one matmul), which it traces robustly in well
under a second, with dynamic batch and sequence axes. Tracing can freeze shape-dependent
Python control flow, so every export is verified against torch at several batch sizes and
sequence lengths before the file is written (atomically).
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from shared.data.provenance import DataProvenance
from shared.errors import ConfigError, ModelFileError
from shared.io import write_bytes_atomic
from shared.ondevice.runtime import INPUT_NAMES, OUTPUT_NAME, ModelMetadata, ort_max_opset

#: Opsets this exporter accepts: >= 13 for per-axis DequantizeLinear (int8 weights), and the
#: TorchScript exporter stops at 20.
MIN_OPSET = 13
MAX_OPSET = 20


@dataclass(frozen=True)
class ExportConfig:
    """Export settings.

    ``verify_shapes`` are the ``(batch, seq_len)`` pairs checked against torch after export
    (``seq_len`` 0 means ``max_len``); tolerances are for fp32 and loose enough for
    reassociated float sums but far below any ranking-relevant difference.
    """

    opset: int = 17
    verify: bool = True
    verify_shapes: tuple[tuple[int, int], ...] = ((1, 0), (3, 1), (2, 7), (5, 0))
    atol: float = 1e-4
    rtol: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ConfigError(
                f"opset must be in [{MIN_OPSET}, {MAX_OPSET}] (per-axis int8 needs >= 13; the "
                f"TorchScript exporter stops at {MAX_OPSET}), got {self.opset}"
            )
        if self.atol < 0 or self.rtol < 0:
            raise ConfigError(f"atol/rtol must be >= 0, got {self.atol}/{self.rtol}")
        for b, seq in self.verify_shapes:
            if b < 1 or seq < 0:
                raise ConfigError(f"verify_shapes entries need batch>=1, seq>=0: {(b, seq)}")


@dataclass(frozen=True)
class ExportReport:
    """What was written: where, how big, and how closely ORT matched torch."""

    path: str
    n_bytes: int
    opset: int
    metadata: ModelMetadata
    max_abs_diff: float
    largest_initializers: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "bytes": self.n_bytes,
            "opset": self.opset,
            "max_abs_diff": self.max_abs_diff,
            "largest_initializers": [[n, list(d)] for n, d in self.largest_initializers],
            **self.metadata.to_props(),
        }


def _example_inputs(
    n_items: int, batch: int, seq: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random left-padded histories of varied lengths (>= 1 real item per row)."""
    items = torch.randint(0, n_items, (batch, seq), generator=gen)
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    lengths[0] = seq
    pos = torch.arange(seq).unsqueeze(0)
    mask = pos >= (seq - lengths).unsqueeze(1)
    return items.masked_fill(~mask, 0), mask


def export_to_proto(model: nn.Module, config: ExportConfig | None = None) -> onnx.ModelProto:
    """Trace ``model`` to an ONNX proto with dynamic batch and sequence axes (no metadata)."""
    cfg = config or ExportConfig()
    n_items, max_len = _contract(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    example = _example_inputs(n_items, 2, max_len, gen)
    was_training = model.training
    model.eval()
    buffer = io.BytesIO()  # in memory: a device's export holds its personal adapter
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            torch.onnx.export(
                model,
                example,
                # the TorchScript exporter (dynamo=False) writes to a file object too
                # (torch.onnx.utils.export's f: str | io.BytesIO); export's hint names paths
                buffer,  # type: ignore[arg-type]
                dynamo=False,
                opset_version=cfg.opset,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_axes={
                    "items": {0: "batch", 1: "seq"},
                    "mask": {0: "batch", 1: "seq"},
                    OUTPUT_NAME: {0: "batch"},
                },
                do_constant_folding=True,
            )
            data = buffer.getvalue()
    except Exception as exc:
        raise ModelFileError(
            f"torch could not export {type(model).__name__} to ONNX opset {cfg.opset}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    return onnx.load_model_from_string(data)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    model_version: str,
    catalog_fingerprint: str,
    config: ExportConfig | None = None,
) -> ExportReport:
    """Export ``model`` to ``path`` (fp32 ONNX) with metadata; verify; write atomically.

    The metadata (``n_items``, ``max_len``, ``model_version``, ``catalog_fingerprint``, input
    and output names, format tag) is what :class:`shared.ondevice.OnDeviceModel` checks on
    load. Raises :class:`ModelFileError` if tracing fails or ORT disagrees with torch, and
    then writes nothing.
    """
    data, report = export_onnx_bytes(
        model, model_version=model_version, catalog_fingerprint=catalog_fingerprint, config=config
    )
    write_bytes_atomic(path, data)
    return dataclasses.replace(report, path=str(path))


def export_onnx_bytes(
    model: nn.Module,
    *,
    model_version: str,
    catalog_fingerprint: str,
    config: ExportConfig | None = None,
    trained_on: DataProvenance | None = None,
) -> tuple[bytes, ExportReport]:
    """:func:`export_onnx` without a file: the verified fp32 ONNX bytes (the report's
    ``path`` is empty). Nothing touches the disk, so a device exporting its personal model
    leaves no clear copy of it behind, not even in a temporary folder when it is killed.
    ``trained_on``: the data and split the model was pretrained with, recorded in its
    metadata (left out when unknown)."""
    cfg = config or ExportConfig()
    if cfg.opset > ort_max_opset():
        raise ConfigError(
            f"opset {cfg.opset} is newer than onnxruntime {ort.__version__} supports "
            f"({ort_max_opset()}); use ExportConfig(opset={min(17, ort_max_opset())})"
        )
    n_items, max_len = _contract(model)
    meta = ModelMetadata(
        n_items=n_items,
        max_len=max_len,
        model_version=model_version,
        catalog_fingerprint=catalog_fingerprint,
        trained_on=trained_on,
    )
    proto = export_to_proto(model, cfg)
    meta.apply_to(proto)
    proto.producer_name = "fedrec"
    proto.doc_string = (
        f"fedrec on-device student: scores {n_items} items from the last {max_len} item ids"
    )
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ModelFileError(f"exported ONNX model failed onnx.checker: {exc}") from exc
    data = proto.SerializeToString()
    diff = verify_against_torch(model, data, cfg) if cfg.verify else float("nan")
    # the biggest constants: where the bytes go (an un-precomputed 384-d text table shows here)
    largest = sorted(proto.graph.initializer, key=lambda t: -int(np.prod(t.dims)))[:3]
    return data, ExportReport(
        path="",
        n_bytes=len(data),
        opset=cfg.opset,
        metadata=meta,
        max_abs_diff=diff,
        largest_initializers=tuple((t.name, tuple(t.dims)) for t in largest),
    )


def verify_against_torch(model: nn.Module, data: bytes, config: ExportConfig) -> float:
    """Max |ORT - torch| over ``config.verify_shapes``; raise if outside tolerance."""
    n_items, max_len = _contract(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(config.seed + 1)
    worst = 0.0
    was_training = model.training
    model.eval()
    try:
        for batch, seq in config.verify_shapes:
            seq = min(seq or max_len, max_len)
            items, mask = _example_inputs(n_items, batch, seq, gen)
            with torch.no_grad():
                expected = model(items, mask).float().numpy()
            if not np.isfinite(expected).all():
                raise ModelFileError(
                    "the model's own scores are not finite (its weights are NaN or overflow): "
                    "training diverged, e.g. a learning rate too large for these settings; "
                    "nothing was exported"
                )
            (got,) = session.run([OUTPUT_NAME], {"items": items.numpy(), "mask": mask.numpy()})
            if got.dtype != np.float32 or got.shape != (batch, n_items):
                # what OnDeviceModel refuses on load: refused here, before anything is written
                raise ModelFileError(
                    f"{type(model).__name__} scores {got.dtype}{list(got.shape)} for a batch "
                    f"of {batch}, but its n_items says {n_items}: a device needs float32 "
                    f"scores, one per catalog item ({batch}x{n_items}); make n_items the "
                    "width of forward's output and keep the model in float32"
                )
            if got.shape != expected.shape or not np.allclose(
                got, expected, atol=config.atol, rtol=config.rtol
            ):
                diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else -1.0
                raise ModelFileError(
                    f"exported ONNX disagrees with torch at batch={batch}, seq={seq}: shapes "
                    f"{got.shape} vs {expected.shape}, max |diff|={diff:.3g}; the model likely "
                    f"has shape-dependent Python control flow that tracing froze — make forward "
                    f"use tensor ops only"
                )
            worst = max(worst, float(np.abs(got - expected).max()))
    finally:
        model.train(was_training)
    return worst


def _contract(model: nn.Module) -> tuple[int, int]:
    n_items = getattr(model, "n_items", None)
    max_len = getattr(model, "max_len", None)
    if not isinstance(n_items, int) or not isinstance(max_len, int) or n_items < 1 or max_len < 1:
        raise ConfigError(
            f"{type(model).__name__} must have positive int attributes n_items and max_len "
            f"(found n_items={n_items!r}, max_len={max_len!r})"
        )
    return n_items, max_len
