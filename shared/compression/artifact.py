"""Turn a student into the on-device artifact: optional pruning, fp32 ONNX export with the
catalog's metadata, int8 quantization gated on top-10 agreement. One call, used by the
pretraining benchmark, the simulation and the server's per-round publication."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy.typing as npt
import torch
from torch import nn

from shared.compression.onnx_export import export_onnx_bytes
from shared.compression.prune import PruneConfig, PruneReport, prune_model
from shared.compression.quantize import QuantizeConfig, quantize_onnx_bytes
from shared.data.provenance import DataProvenance
from shared.errors import DataError, PublishedVersionError
from shared.io import write_bytes_atomic, write_json_atomic
from shared.models.student import ExportableStudent, StudentModel
from shared.ondevice.runtime import catalog_fingerprint, check_item_id_lengths
from shared.published import (
    RECORD_FILE,
    published_digests,
    record_published,
    record_unrecorded,
    sha256_hex,
)


@dataclass(frozen=True)
class ArtifactReport:
    """Where the int8 file is and what it cost."""

    path: Path
    int8_bytes: int
    fp32_bytes: int
    agreement: float
    sparsity: float


class _OnDeviceStudent(ExportableStudent):
    """The export graph plus the on-device contract the exporter reads (catalog, window)."""

    @property
    def n_items(self) -> int:
        return self.student.n_items

    @property
    def max_len(self) -> int:
        return self.student.config.max_len


def prune_export_graph(exportable: ExportableStudent, config: PruneConfig) -> PruneReport:
    """Magnitude-prune the weights the exported graph executes, in place.

    Those are the pooling layers (query, key, and the value projection and FFN when the
    student has them) and, with ``include_embeddings``, the recency positions and the folded
    item tables. The heads and the item projections are folded into those tables at
    export, and the personal adapter is the identity in a published model (and the user's
    own in a device's): pruning them would count zeros the file never holds.
    """
    student = exportable.student
    view = nn.Module()
    for name in ("query", "key", "value", "ffn", "positions"):
        module = getattr(student, name, None)
        if module is not None:
            view.add_module(name, module)  # the same modules: pruned in place
    tables = {"input_table": exportable.input_table, "output_table": exportable.output_table}
    for name, table in tables.items():
        view.register_parameter(name, nn.Parameter(table.clone(), requires_grad=False))
    report = prune_model(view, config)
    with torch.no_grad():
        for name, table in tables.items():
            table.copy_(getattr(view, name))
    return report


CATALOG_FILE = "catalog.json"
"""Written next to every published model: its raw item ids in model order (a JSON list)."""


@dataclass(frozen=True)
class StudentArtifact:
    """A student's int8 ONNX model, in memory, and what it cost."""

    int8: bytes
    fp32_bytes: int
    agreement: float
    sparsity: float

    def report(self, path: Path) -> ArtifactReport:
        """What it cost, once written to (or found at) ``path``."""
        return ArtifactReport(
            path=path,
            int8_bytes=len(self.int8),
            fp32_bytes=self.fp32_bytes,
            agreement=self.agreement,
            sparsity=self.sparsity,
        )

    def write(self, out_path: str | Path, item_ids: Sequence[str]) -> ArtifactReport:
        """Write the model to ``out_path`` (atomic) with its catalog next to it."""
        out = Path(out_path)
        write_bytes_atomic(out, self.int8)
        # what a device installs the model with (`fedrec client install-model --catalog`)
        write_json_atomic(out.parent / CATALOG_FILE, list(item_ids))
        return self.report(out)


def build_student_artifact(
    student: StudentModel,
    item_ids: Sequence[str],
    *,
    version: str,
    prune: PruneConfig | None = None,
    quantize: QuantizeConfig | None = None,
    validation_histories: Sequence[npt.ArrayLike] | None = None,
    personal: bool = False,
    trained_on: DataProvenance | None = None,
) -> StudentArtifact:
    """The int8 ONNX bytes of ``student``: the global model (identity adapter) that the
    server publishes, or with ``personal`` the student's own adapter (a device's model).

    Built in memory, fp32 export included, so a device's personal model never lies in clear
    on its disk (the sealed store is where it is kept). Pruning works on a copy of the folded
    export graph so the caller's student is untouched, and on what that graph executes
    (:func:`prune_export_graph`). ``trained_on`` (the bundle's data and split, when it
    records them) goes into the model's metadata, for ``fedrec evaluate model``.
    """
    import copy

    if len(item_ids) != student.n_items:
        raise DataError(
            f"the catalog has {len(item_ids)} item ids but the student scores "
            f"{student.n_items} items: publish it with the catalog it was trained on (the "
            "bundle's item ids), in the same order"
        )
    # on the CPU, whatever device the student trains on: the exporter traces and verifies it
    # with CPU inputs (a server with a GPU holds its task's model there)
    model = copy.deepcopy(student).cpu().eval()
    if not personal:
        model.adapter.reset()
    exportable = _OnDeviceStudent(model).eval()
    sparsity = 0.0
    if prune is not None and prune.sparsity > 0:
        sparsity = prune_export_graph(exportable, prune).overall
    with warnings.catch_warnings():
        # Tracing turns the attention scale (a shape-derived constant) into a float.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        fp32, _ = export_onnx_bytes(
            exportable,
            model_version=version,
            catalog_fingerprint=catalog_fingerprint(item_ids),
            trained_on=trained_on,
        )
    int8, report = quantize_onnx_bytes(
        fp32, config=quantize, validation_histories=validation_histories
    )
    return StudentArtifact(
        int8=int8,
        fp32_bytes=len(fp32),
        agreement=float(report.agreement) if report.agreement is not None else float("nan"),
        sparsity=sparsity,
    )


def publish_student(
    student: StudentModel,
    item_ids: Sequence[str],
    out_path: str | Path,
    *,
    version: str,
    prune: PruneConfig | None = None,
    quantize: QuantizeConfig | None = None,
    validation_histories: Sequence[npt.ArrayLike] | None = None,
    trained_on: DataProvenance | None = None,
) -> ArtifactReport:
    """Write ``student``'s global model (:func:`build_student_artifact`) to ``out_path``
    (atomic) with the catalog next to it, as the server publishes every round. Refuses a
    catalog whose ids a device could not report back (:func:`check_item_id_lengths`)."""
    check_item_id_lengths(item_ids)
    built = build_student_artifact(
        student,
        item_ids,
        version=version,
        prune=prune,
        quantize=quantize,
        validation_histories=validation_histories,
        trained_on=trained_on,
    )
    return built.write(out_path, item_ids)


def publish_student_once(
    student: StudentModel,
    item_ids: Sequence[str],
    out_path: str | Path,
    *,
    version: str,
    prune: PruneConfig | None = None,
    trained_on: DataProvenance | None = None,
) -> ArtifactReport:
    """:func:`publish_student`, for a version that may be out already
    (:func:`publish_artifact_once`)."""
    check_item_id_lengths(item_ids)
    built = build_student_artifact(
        student, item_ids, version=version, prune=prune, trained_on=trained_on
    )
    return publish_artifact_once(built, item_ids, out_path, version=version)


def publish_artifact_once(
    built: StudentArtifact, item_ids: Sequence[str], out_path: str | Path, *, version: str
) -> ArtifactReport:
    """Publish model ``version``, built already (:func:`build_student_artifact`): written
    when ``out_path`` is not there and was never published, left as it is when it holds
    (or was published with) this very model (the int8 export is deterministic: a process
    that died between its checkpoint and its publication, a rerun of a finished run),
    refused with :class:`PublishedVersionError` when it holds or was published with
    another model (a round that ran again after its checkpoint was lost trains another).
    The caller may then write ``built`` elsewhere, without building it again.

    A published version never changes: devices may hold it and tell models apart by their
    version alone. The record of published versions (:mod:`shared.published`) keeps the
    SHA-256 of every model published into the folder, so this holds after the file was
    removed (``artifact-keep``); its line is appended before the model is written. The
    model is compared in memory, so a refusal leaves the published folder as it was."""
    out = Path(out_path)
    digest = sha256_hex(built.int8)
    digests = published_digests(out.parent)
    recorded = digests.get(out.name)
    if recorded is not None and recorded != digest:
        raise PublishedVersionError(
            f"model version {version} is out already, with another model ({out.name} in "
            f"{out.parent / RECORD_FILE}, SHA-256 {recorded[:12]}..., this one "
            f"{digest[:12]}...): a published version never changes, as devices may hold "
            "it, even once its file is removed; publish this model under a new version "
            "(train another round)"
        )
    exists = out.exists()
    if exists and built.int8 != out.read_bytes():
        raise PublishedVersionError(
            f"model version {version} is out already, with another model ({out}): a "
            "published version never changes, as devices may hold it; publish this model "
            "under a new version (train another round)"
        )
    # the versions published before the record existed, then this one if it is not in it
    record_unrecorded(out.parent, digests, skip=out.name)
    if recorded is None:  # first published, or published before the record existed
        record_published(out.parent, out.name, version, digest)
    if not exists:
        return built.write(out, item_ids)
    # the catalog is written after the model: a process that died in between left the model
    # alone, and a device cannot install it without its catalog (the model's fingerprint
    # matched these ids, so this is the catalog it was published with)
    catalog = out.parent / CATALOG_FILE
    if _read_json(catalog) != list(item_ids):
        write_json_atomic(catalog, list(item_ids))
    return built.report(out)


def _read_json(path: Path) -> object:
    """``path``'s JSON, or ``None`` if it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
