"""Run the exported student on a device: load, validate, and score with ONNX Runtime.

This module is what ships to the device, so it needs only ``numpy``, ``onnx`` (to read and
check the file before handing it to the runtime) and ``onnxruntime`` — never torch. It also
owns the *file format* of an on-device model: the input/output names and the
``metadata_props`` keys that :mod:`shared.compression.onnx_export` writes and this loader
checks, so a model trained for another catalog or by an incompatible exporter is refused with
a message instead of silently recommending the wrong items.

Hot path: scoring the full catalog for one user goes through pre-allocated input/output
buffers bound once with ONNX Runtime's IO binding, so a call is a buffer fill plus one native
``run`` (no per-call dict building, no output allocation).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx import TensorProto, helper

from shared.config import is_int
from shared.data.provenance import DataProvenance
from shared.errors import ConfigError, DataError, ModelFileError

IntArray = npt.NDArray[np.int64]
ScoreArray = npt.NDArray[np.float32]

#: Graph input names, in order: left-padded item ids and the matching "real item" mask.
INPUT_NAMES: tuple[str, str] = ("items", "mask")
#: Graph output name: ``(batch, n_items)`` float32 scores.
OUTPUT_NAME = "scores"
#: Format tag written into every exported model; bump when the contract changes.
FORMAT_TAG = "fedrec-student-onnx/1"

META_FORMAT = "fedrec.format"
META_N_ITEMS = "fedrec.n_items"
META_MAX_LEN = "fedrec.max_len"
META_GRAPH_SHA256 = "fedrec.graph_sha256"
"""SHA-256 of the serialized graph (nodes and weights): a file damaged in transit or on disk
is refused instead of scoring differently. Files without it (older exports) still load."""
META_METADATA_SHA256 = "fedrec.metadata_sha256"
"""SHA-256 of the other ``fedrec.*`` metadata (catalog, ``max_len``, quantization...), which
the runtime acts on as much as on the graph: a damaged ``max_len`` scored a shorter window
without an error. Files without it (older exports) still load."""
MIN_LATENCY_CALLS = 500
"""The fewest timed scoring calls a benchmark reports a p99 latency from (five above it)."""
MAX_HISTORY = 100_000
"""Upper bound on a model's ``max_len``: the loader allocates windows of that length."""
META_MODEL_VERSION = "fedrec.model_version"
META_CATALOG = "fedrec.catalog_fingerprint"
META_INPUTS = "fedrec.input_names"
META_OUTPUT = "fedrec.output_name"
META_QUANT = "fedrec.quantization"
META_TRAINED_ON = "fedrec.trained_on"
"""The data and split the model was pretrained with (:class:`DataProvenance`, as JSON), so
that an offline evaluation tests it on users it never trained on. Older files lack it."""

#: Values of ``fedrec.quantization``.
Quantization = Literal["none", "weight_int8", "dynamic_int8"]
_QUANTIZATIONS: tuple[str, ...] = ("none", "weight_int8", "dynamic_int8")

_EXPECTED_INPUT_TYPES: dict[str, int] = {"items": TensorProto.INT64, "mask": TensorProto.BOOL}
_DEFAULT_DOMAINS = ("", "ai.onnx")
_REEXPORT_HINT = (
    "re-export it with shared.compression.onnx_export.export_onnx (and quantize_onnx) "
    "or download the model built for this catalog"
)


#: The longest item id a device can name: its API refuses longer ones (a bound on request
#: sizes), so a catalog with longer ids would be recommended but never reported back.
MAX_ITEM_ID_LENGTH = 256


def check_item_id_lengths(item_ids: Sequence[str]) -> None:
    """Refuse (:class:`DataError`) a catalog with ids a device could not report feedback or
    events for (longer than :data:`MAX_ITEM_ID_LENGTH` characters)."""
    long = [i for i in item_ids if len(i) > MAX_ITEM_ID_LENGTH]
    if long:
        raise DataError(
            f"{len(long)} item id(s) are longer than {MAX_ITEM_ID_LENGTH} characters (e.g. "
            f"{long[0][:40]!r}...): a device could recommend them but never report them back. "
            "Map the dataset's ids to shorter ones (e.g. a hash) before training"
        )


def catalog_fingerprint(item_ids: Sequence[str]) -> str:
    """Short stable hash of the catalog's item ids *in dense-id order*.

    The model's output column ``j`` means item ``item_ids[j]``; the fingerprint pins that
    mapping so a model exported for one catalog (or one ordering of it) is refused on another.
    """
    h = hashlib.sha256(str(len(item_ids)).encode())
    for item in item_ids:
        if "\x00" in item:  # the separator: ["a\0b", "c"] and ["a", "b\0c"] would collide
            raise DataError(
                f"item id {item!r} contains a NUL character, which a catalog cannot hold; "
                "remove it from the id in the item file"
            )
        h.update(b"\x00")
        h.update(item.encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ModelMetadata:
    """What an on-device model file says about itself (its ``metadata_props``).

    Written at export, checked at load: the catalog size and fingerprint must match the
    device's catalog, and ``max_len`` is how long a history the model was exported for.
    """

    n_items: int
    max_len: int
    model_version: str
    catalog_fingerprint: str
    quantization: Quantization = "none"
    input_names: tuple[str, str] = INPUT_NAMES
    output_name: str = OUTPUT_NAME
    trained_on: DataProvenance | None = None
    """The data and split it was pretrained with; ``None`` when unknown (an older file)."""

    def __post_init__(self) -> None:
        if self.n_items < 1:
            raise ConfigError(f"n_items must be >= 1, got {self.n_items}")
        if not 1 <= self.max_len <= MAX_HISTORY:
            raise ConfigError(f"max_len must be in [1, {MAX_HISTORY}], got {self.max_len}")
        for name in ("model_version", "catalog_fingerprint"):
            value = getattr(self, name)
            if not value or any(c in value for c in "\n\r,"):
                raise ConfigError(f"{name} must be a non-empty one-line string without commas")
        if self.quantization not in _QUANTIZATIONS:
            raise ConfigError(
                f"quantization must be one of {_QUANTIZATIONS}, got {self.quantization!r}"
            )
        if tuple(self.input_names) != INPUT_NAMES or self.output_name != OUTPUT_NAME:
            raise ConfigError(
                f"input/output names must be {INPUT_NAMES}/{OUTPUT_NAME!r}, got "
                f"{self.input_names}/{self.output_name!r}"
            )

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` key/values to store in the ONNX file."""
        return {
            META_FORMAT: FORMAT_TAG,
            META_N_ITEMS: str(self.n_items),
            META_MAX_LEN: str(self.max_len),
            META_MODEL_VERSION: self.model_version,
            META_CATALOG: self.catalog_fingerprint,
            META_INPUTS: ",".join(self.input_names),
            META_OUTPUT: self.output_name,
            META_QUANT: self.quantization,
            # absent when unknown: an export without it is the same file as before it existed
            **({META_TRAINED_ON: self.trained_on.to_json()} if self.trained_on else {}),
        }

    def apply_to(self, proto: onnx.ModelProto) -> None:
        """Write these keys into ``proto.metadata_props`` (replacing them; others are kept),
        with the digest of the graph as it is now (call it last, before serializing)."""
        props = {**self.to_props(), META_GRAPH_SHA256: graph_digest(proto)}
        keep = [
            (p.key, p.value)
            for p in proto.metadata_props
            if p.key not in props and p.key != META_METADATA_SHA256
        ]
        props[META_METADATA_SHA256] = metadata_digest(dict([*keep, *props.items()]))
        del proto.metadata_props[:]
        for key, value in [*keep, *props.items()]:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value

    @classmethod
    def from_props(cls, props: Mapping[str, str], *, source: str = "model") -> ModelMetadata:
        """Parse and validate ``metadata_props``; any problem is a :class:`ModelFileError`."""
        required = (META_FORMAT, META_N_ITEMS, META_MAX_LEN, META_MODEL_VERSION, META_CATALOG)
        missing = [k for k in required if k not in props]
        if missing:
            raise ModelFileError(
                f"{source}: metadata is missing {', '.join(missing)} (found keys: "
                f"{', '.join(sorted(props)) or 'none'}); this file was not produced by the "
                f"fedrec exporter — {_REEXPORT_HINT}"
            )
        if props[META_FORMAT] != FORMAT_TAG:
            raise ModelFileError(
                f"{source}: model format is {props[META_FORMAT]!r}, this runtime reads "
                f"{FORMAT_TAG!r}; {_REEXPORT_HINT}"
            )
        try:
            n_items = int(props[META_N_ITEMS])
            max_len = int(props[META_MAX_LEN])
        except ValueError as exc:
            raise ModelFileError(
                f"{source}: metadata n_items/max_len must be integers, found "
                f"{props[META_N_ITEMS]!r}/{props[META_MAX_LEN]!r}; {_REEXPORT_HINT}"
            ) from exc
        inputs = tuple(props.get(META_INPUTS, ",".join(INPUT_NAMES)).split(","))
        quant = props.get(META_QUANT, "none")
        try:
            trained_on = None
            if META_TRAINED_ON in props:
                try:
                    record = json.loads(props[META_TRAINED_ON])
                except ValueError:
                    raise ConfigError(f"{META_TRAINED_ON} is not JSON") from None
                trained_on = DataProvenance.from_mapping(record)
            return cls(
                n_items=n_items,
                max_len=max_len,
                model_version=props[META_MODEL_VERSION],
                catalog_fingerprint=props[META_CATALOG],
                quantization=quant,  # type: ignore[arg-type]  # validated in __post_init__
                input_names=(inputs[0], inputs[1]) if len(inputs) == 2 else ("?", "?"),
                output_name=props.get(META_OUTPUT, OUTPUT_NAME),
                trained_on=trained_on,
            )
        except ConfigError as exc:
            raise ModelFileError(f"{source}: invalid metadata: {exc}; {_REEXPORT_HINT}") from exc


def metadata_digest(props: Mapping[str, str]) -> str:
    """SHA-256 (hex) of the ``fedrec.*`` entries of ``props`` but the two digests."""
    ours = {
        k: v
        for k, v in props.items()
        if k.startswith("fedrec.") and k not in (META_GRAPH_SHA256, META_METADATA_SHA256)
    }
    return hashlib.sha256(json.dumps(ours, sort_keys=True).encode()).hexdigest()


def graph_digest(proto: onnx.ModelProto) -> str:
    """SHA-256 (hex) of ``proto``'s graph, serialized deterministically."""
    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()


@functools.cache
def ort_max_opset() -> int:
    """Highest ``ai.onnx`` opset the installed onnxruntime accepts (probed once, ~5 ms).

    onnxruntime has no public API for this, so a one-node model is stamped with candidate
    opsets and loaded (binary search): exactly the check a real model load would hit.
    """

    def loads(opset: int) -> bool:
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            ort.InferenceSession(
                model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception:
            return False
        return True

    lo, hi = 7, 256  # ORT supports ai.onnx >= 7; find the largest loadable opset
    if not loads(lo):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if loads(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


_OPT_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class RuntimeConfig:
    """How the device runs the model.

    ``intra_op_num_threads=1`` by default: a phone should not spin up every core to score
    ~2k items. ``fold_int8_weights`` lets ONNX Runtime constant-fold the ``DequantizeLinear``
    nodes of a weight-only int8 model at load time (session option
    ``session.disable_quant_qdq``), so the file is small but inference runs at fp32 speed and
    accuracy. Turned off, weights stay int8 in memory and, at the "extended"/"all" levels,
    ONNX Runtime fuses them into its int8 kernels (``MatMulNBits``), which also quantize
    activations: less memory, but scores drift (~0.1 on a +-20 scale) and it is not faster
    at this size.
    """

    intra_op_num_threads: int = 1
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    fold_int8_weights: bool = True
    max_batch_size: int = 256
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.intra_op_num_threads < 0:
            raise ConfigError(
                f"intra_op_num_threads must be >= 0 (0 = all cores), got "
                f"{self.intra_op_num_threads}"
            )
        if self.graph_optimization not in _OPT_LEVELS:
            raise ConfigError(
                f"graph_optimization must be one of {sorted(_OPT_LEVELS)}, got "
                f"{self.graph_optimization!r}"
            )
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.pad_id < 0:
            raise ConfigError(f"pad_id must be a valid item id (>= 0), got {self.pad_id}")


ModelSource = str | os.PathLike[str] | bytes


class OnDeviceModel:
    """An exported (fp32 or int8) student loaded into ONNX Runtime; implements ``Scorer``.

    Everything that can be wrong with a model file is checked in the constructor and raised
    as :class:`ModelFileError` saying what was expected, what was found and what to do:
    unreadable/corrupt bytes, an opset newer than the installed runtime supports, missing or
    mismatching metadata (catalog size, catalog fingerprint), wrong input names, types or
    axes (a fixed batch, a fixed length other than ``max_len``), and an output whose width
    is not the catalog size (checked on a real probe inference).

    Safe to share between threads: the single-user fast path reuses pre-allocated, pre-bound
    buffers under a lock; batched scoring allocates per call.
    """

    def __init__(
        self,
        source: ModelSource,
        *,
        expected_n_items: int | None = None,
        expected_catalog_fingerprint: str | None = None,
        config: RuntimeConfig | None = None,
        name: str | None = None,
    ) -> None:
        self.config = config or RuntimeConfig()
        # ``name``: where bytes came from, for the errors (a file read by the caller)
        self.source = name or ("<bytes>" if isinstance(source, bytes) else str(source))
        data = self._read(source)
        proto = self._parse(data)
        # before the metadata is read: a damaged file is refused as damaged, not as a model
        # of another catalog (a damaged n_items or fingerprint) or a foreign export
        self._check_digest(proto)
        self._check_opset(proto)
        self.metadata = ModelMetadata.from_props(
            {p.key: p.value for p in proto.metadata_props}, source=self.source
        )
        self._check_expectations(expected_n_items, expected_catalog_fingerprint)
        self._check_graph_io(proto)
        self.session = self._make_session(data)
        del proto, data
        self._max_len = self.metadata.max_len
        self._n_items = self.metadata.n_items
        if self.config.pad_id >= self._n_items:
            raise ConfigError(
                f"RuntimeConfig.pad_id={self.config.pad_id} is not an item id of this "
                f"{self._n_items}-item model; use 0 (PAD_ITEM)"
            )
        self._probe()
        self._lock = threading.Lock()
        self._setup_fast_path()

    # ------------------------------------------------------------------ validation on load

    def _read(self, source: ModelSource) -> bytes:
        if isinstance(source, bytes):
            return source
        try:
            return Path(source).read_bytes()
        except OSError as exc:
            raise ModelFileError(
                f"cannot read model file {self.source}: {exc.strerror or exc}; check the path "
                f"and permissions, or download the model again"
            ) from exc

    def _parse(self, data: bytes) -> onnx.ModelProto:
        if not data:
            raise ModelFileError(f"{self.source}: model file is empty; download it again")
        try:
            proto = onnx.load_model_from_string(data)
        except Exception as exc:
            raise ModelFileError(
                f"{self.source}: not a valid ONNX file ({type(exc).__name__}: {exc}); it is "
                f"corrupt or truncated ({len(data)} bytes) — download it again"
            ) from exc
        if not proto.graph.node or not proto.graph.output or not proto.opset_import:
            raise ModelFileError(
                f"{self.source}: file parsed but holds no usable ONNX graph (nodes="
                f"{len(proto.graph.node)}, outputs={len(proto.graph.output)}, opset imports="
                f"{len(proto.opset_import)}); it is corrupt or truncated — download it again"
            )
        damaged = _undecoded_text(proto)
        if damaged is not None:
            raise ModelFileError(
                f"{self.source}: the text of {damaged} is not UTF-8; the file is corrupt — "
                f"download it again"
            )
        return proto

    def _check_opset(self, proto: onnx.ModelProto) -> None:
        versions = {o.domain: o.version for o in proto.opset_import}
        default = [v for d, v in versions.items() if d in _DEFAULT_DOMAINS]
        if not default:
            raise ModelFileError(
                f"{self.source}: model imports no ai.onnx opset (found domains "
                f"{sorted(versions)}); {_REEXPORT_HINT}"
            )
        supported = ort_max_opset()
        if max(default) > supported:
            raise ModelFileError(
                f"{self.source}: model uses ONNX opset {max(default)}, but the installed "
                f"onnxruntime {ort.__version__} supports opsets up to {supported}; re-export "
                f"with the default ExportConfig(opset=17) (any opset <= {supported} loads "
                f"here) or upgrade onnxruntime on the device"
            )

    def _check_expectations(
        self, expected_n_items: int | None, expected_fingerprint: str | None
    ) -> None:
        meta = self.metadata
        if expected_n_items is not None and meta.n_items != expected_n_items:
            raise ModelFileError(
                f"{self.source}: model scores {meta.n_items} items but the local catalog has "
                f"{expected_n_items}; download the model built for this catalog (or "
                f"re-export it)"
            )
        if expected_fingerprint is not None and meta.catalog_fingerprint != expected_fingerprint:
            raise ModelFileError(
                f"{self.source}: model was exported for catalog {meta.catalog_fingerprint!r} "
                f"but the local catalog is {expected_fingerprint!r} (same size does not mean "
                f"same items/order); download the model built for this catalog"
            )

    def _check_graph_io(self, proto: onnx.ModelProto) -> None:
        graph = proto.graph
        initializers = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        found = {i.name: i.type.tensor_type for i in inputs}
        if sorted(found) != sorted(INPUT_NAMES):
            raise ModelFileError(
                f"{self.source}: model inputs are {sorted(found)}, expected exactly "
                f"{list(INPUT_NAMES)} (int64 item ids and bool mask, both [batch, seq]); "
                f"{_REEXPORT_HINT}"
            )
        for name, elem in _EXPECTED_INPUT_TYPES.items():
            ttype = found[name]
            if ttype.elem_type != elem or len(ttype.shape.dim) != 2:
                raise ModelFileError(
                    f"{self.source}: input {name!r} is "
                    f"{_type_str(ttype.elem_type)}[rank {len(ttype.shape.dim)}], expected "
                    f"{_type_str(elem)}[batch, seq]; {_REEXPORT_HINT}"
                )
            # every call is max_len long (left-padded), and a batch is any size up to
            # max_batch_size: a fixed batch passed the one-row probe, then a batch failed
            # inside onnxruntime
            batch, seq = ttype.shape.dim
            if batch.HasField("dim_value"):
                raise ModelFileError(
                    f"{self.source}: input {name!r} has a fixed batch size of "
                    f"{batch.dim_value}, expected a dynamic batch axis (scoring runs batches "
                    f"of up to {self.config.max_batch_size} histories); {_REEXPORT_HINT}"
                )
            if seq.HasField("dim_value") and seq.dim_value != self.metadata.max_len:
                raise ModelFileError(
                    f"{self.source}: input {name!r} has a fixed length of {seq.dim_value}, "
                    f"but the metadata says max_len={self.metadata.max_len} (every history is "
                    f"padded to that length); the file is inconsistent — {_REEXPORT_HINT}"
                )
        outputs = [o.name for o in graph.output]
        if outputs != [OUTPUT_NAME]:
            raise ModelFileError(
                f"{self.source}: model outputs are {outputs}, expected [{OUTPUT_NAME!r}]; "
                f"{_REEXPORT_HINT}"
            )
        out = graph.output[0].type.tensor_type
        dims = out.shape.dim
        if out.elem_type != TensorProto.FLOAT or len(dims) != 2:
            raise ModelFileError(
                f"{self.source}: output {OUTPUT_NAME!r} is {_type_str(out.elem_type)}"
                f"[rank {len(dims)}], expected float[batch, {self.metadata.n_items}]; "
                f"{_REEXPORT_HINT}"
            )
        if dims[1].HasField("dim_value") and dims[1].dim_value != self.metadata.n_items:
            raise ModelFileError(
                f"{self.source}: output width is {dims[1].dim_value} items but the metadata "
                f"says n_items={self.metadata.n_items}; the file is inconsistent (tampered or "
                f"mis-exported) — {_REEXPORT_HINT}"
            )

    def _make_session(self, data: bytes) -> ort.InferenceSession:
        cfg = self.config
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cfg.intra_op_num_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = _OPT_LEVELS[cfg.graph_optimization]
        opts.log_severity_level = 3
        if cfg.fold_int8_weights and self.metadata.quantization == "weight_int8":
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        try:
            return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelFileError(
                f"{self.source}: onnxruntime {ort.__version__} could not load the model: "
                f"{_short(exc)}; {_REEXPORT_HINT}"
            ) from exc

    def _check_digest(self, proto: onnx.ModelProto) -> None:
        """Refuse a graph that differs from the digest written at export (a flipped bit in a
        weight loaded and scored differently, with no error)."""
        props = {p.key: p.value for p in proto.metadata_props}
        if props.get(META_FORMAT) != FORMAT_TAG:
            return  # not this format (ModelMetadata.from_props says which), digests aside
        recorded_meta = props.get(META_METADATA_SHA256)
        if recorded_meta is not None and recorded_meta != metadata_digest(props):
            raise ModelFileError(
                f"{self.source}: the metadata (catalog, max_len, quantization...) does not "
                f"match the digest written at export: the file is corrupt or was modified — "
                f"{_REEXPORT_HINT}"
            )
        recorded = props.get(META_GRAPH_SHA256)
        if recorded is not None and recorded != graph_digest(proto):
            raise ModelFileError(
                f"{self.source}: the graph does not match the digest written at export: the "
                f"file is corrupt or was modified — {_REEXPORT_HINT}"
            )

    def _probe(self) -> None:
        """One real inference on a one-item history: catches width/type errors early."""
        items = np.full((1, self._max_len), self.config.pad_id, dtype=np.int64)
        mask = np.zeros((1, self._max_len), dtype=np.bool_)
        items[0, -1] = 0
        mask[0, -1] = True
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a failure is raised with its message: not logged too
        try:
            (out,) = self.session.run([OUTPUT_NAME], {"items": items, "mask": mask}, quiet)
        except Exception as exc:
            raise ModelFileError(
                f"{self.source}: probe inference failed: {_short(exc)}; {_REEXPORT_HINT}"
            ) from exc
        out = np.asarray(out)
        if out.shape != (1, self._n_items) or out.dtype != np.float32:
            raise ModelFileError(
                f"{self.source}: model returned {out.dtype}{list(out.shape)} for one user, "
                f"expected float32[1, {self._n_items}] (n_items from metadata); the file is "
                f"inconsistent — {_REEXPORT_HINT}"
            )
        if not np.isfinite(out).all():
            raise ModelFileError(
                f"{self.source}: model returned non-finite scores on a probe input; the "
                f"weights are corrupt — {_REEXPORT_HINT}"
            )

    # ------------------------------------------------------------------ scoring

    def _setup_fast_path(self) -> None:
        """Bind persistent single-user buffers once; ``_score_one`` only refills them."""
        self._items1 = np.full((1, self._max_len), self.config.pad_id, dtype=np.int64)
        self._mask1 = np.zeros((1, self._max_len), dtype=np.bool_)
        self._out1 = np.empty((1, self._n_items), dtype=np.float32)
        binding = self.session.io_binding()
        for name, arr in (("items", self._items1), ("mask", self._mask1)):
            binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        binding.bind_output(
            OUTPUT_NAME, "cpu", 0, np.float32, list(self._out1.shape), self._out1.ctypes.data
        )
        self._binding = binding

    @property
    def n_items(self) -> int:
        """Catalog size: width of every score row."""
        return self._n_items

    @property
    def max_len(self) -> int:
        """Longest history the model sees; older items are dropped."""
        return self._max_len

    def _ids(self, history: npt.ArrayLike, *, truncate: bool = True) -> IntArray:
        """History as int64 ids (the last ``max_len`` if ``truncate``), every one
        range-checked."""
        raw = np.asarray(history)
        if raw.size and raw.dtype.kind not in "iu":
            raise DataError(
                f"history item ids must be integers of the catalog, got {raw.dtype} values "
                f"(e.g. {raw.reshape(-1)[0]!r}); map raw ids through the same catalog as "
                "the model"
            )
        if raw.ndim != 1 and raw.size:  # a batch or a scalar would be read as one history
            raise DataError(
                f"a history is a 1-D sequence of item ids, got shape {list(raw.shape)}; score "
                "a batch with score([h1, h2, ...]) and recommend for one history at a time"
            )
        h = raw.astype(np.int64).reshape(-1)
        # the whole history, as recommend reads it: an id of another catalog means the
        # history was mapped wrong, however old
        if h.size and (int(h.min()) < 0 or int(h.max()) >= self._n_items):
            raise DataError(
                f"history has item ids outside [0, {self._n_items}): min={int(h.min())}, "
                f"max={int(h.max())}; map raw ids through the same catalog as the model"
            )
        return h[-self._max_len :] if truncate else h

    def _score_one(self, history: npt.ArrayLike) -> ScoreArray:
        h = self._ids(history)
        n = h.size
        with self._lock:
            items, mask = self._items1[0], self._mask1[0]
            cut = self._max_len - n
            items[:cut] = self.config.pad_id
            mask[:cut] = False
            if n:
                items[cut:] = h
                mask[cut:] = True
            self.session.run_with_iobinding(self._binding)
            return self._out1.copy()

    def score(self, histories: Sequence[npt.ArrayLike]) -> ScoreArray:
        """Score the whole catalog for each history: ``(len(histories), n_items)`` float32.

        Histories are chronological item ids; the last ``max_len`` are kept and left-padded
        to exactly ``max_len`` (mask False on padding), so every call has the same shape.
        The student's recency positions make that equal to padding to the longest history;
        an empty history is scored from the model's cold-start user vector.
        Batches are run in chunks of ``config.max_batch_size``.
        """
        b = len(histories)
        if b == 1:
            return self._score_one(histories[0])
        out = np.empty((b, self._n_items), dtype=np.float32)
        step = self.config.max_batch_size
        for start in range(0, b, step):
            chunk = [self._ids(h) for h in histories[start : start + step]]
            items = np.full((len(chunk), self._max_len), self.config.pad_id, dtype=np.int64)
            mask = np.zeros((len(chunk), self._max_len), dtype=np.bool_)
            for row, h in enumerate(chunk):
                if h.size:
                    items[row, -h.size :] = h
                    mask[row, -h.size :] = True
            (scores,) = self.session.run([OUTPUT_NAME], {"items": items, "mask": mask})
            out[start : start + len(chunk)] = scores
        return out

    def recommend(
        self, history: npt.ArrayLike, k: int = 10, exclude_history: bool = True
    ) -> IntArray:
        """Top-``k`` item ids for one history, best first (ties: lower id first).

        With ``exclude_history`` the items already in the (full, untruncated) history are
        never recommended; fewer than ``k`` ids come back only if the catalog runs out.
        """
        if not is_int(k) or k < 1:
            raise ConfigError(f"k must be an integer >= 1, got {k!r}")
        h = self._ids(history, truncate=False)
        scores = self._score_one(h)[0]
        candidate = np.ones(self._n_items, dtype=np.bool_)
        if exclude_history and h.size:
            candidate[h] = False  # a mask, not a score: a -inf or NaN score is no exclusion
        ids = np.flatnonzero(candidate)
        k = min(k, ids.size)
        if k <= 0:
            return np.empty(0, dtype=np.int64)
        neg = -scores[ids].astype(np.float64)
        neg[np.isnan(neg)] = np.inf  # a NaN score is never above anything
        kth = np.partition(neg, k - 1)[k - 1]
        # every candidate tied with the k-th, so the lower id wins the tie (argpartition
        # would keep an arbitrary one)
        top = np.flatnonzero(neg <= kth)
        order = np.lexsort((ids[top], neg[top]))[:k]
        return ids[top[order]].astype(np.int64)

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"OnDeviceModel({self.source!r}, n_items={m.n_items}, max_len={m.max_len}, "
            f"version={m.model_version!r}, quantization={m.quantization!r})"
        )


def _type_str(elem_type: int) -> str:
    try:
        return str(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        return f"elem_type {elem_type}"


def _undecoded_text(message: Message, path: str = "model") -> str | None:
    """The first string field of ``message`` (searched recursively) that protobuf could not
    decode as UTF-8, as a dotted path, or ``None``.

    protobuf hands such a field (a damaged byte in a name or a metadata entry) over as
    ``bytes`` instead of ``str``, and the checks on load, which sort and compare names, then
    failed with a ``TypeError`` instead of refusing the file."""
    for field, value in message.ListFields():
        where = f"{path}.{field.name}"
        if field.type == FieldDescriptor.TYPE_STRING:
            texts = [value] if isinstance(value, str | bytes) else value
            if any(isinstance(text, bytes) for text in texts):
                return where
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for child in [value] if isinstance(value, Message) else value:
                found = _undecoded_text(child, where)
                if found is not None:
                    return found
    return None


def _short(exc: BaseException, limit: int = 400) -> str:
    msg = " ".join(str(exc).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
