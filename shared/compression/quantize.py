"""int8 quantization of an exported student, gated on top-k agreement with the fp32 model.

Two methods, both producing a file :class:`shared.ondevice.OnDeviceModel` loads:

``weight_int8`` (default)
    Every large float initializer (item table, input embeddings, Linear weights) is stored as
    symmetric int8 with one fp32 scale per output channel / per item row, followed by an
    in-graph ``DequantizeLinear``. A table that is stored twice by the exporter (an embedding
    tied to the output item table appears once as ``E`` for the Gather and once as ``E.T`` for
    the final MatMul) is stored once, the second use becoming a ``Transpose``. Activations stay
    fp32, so ranking fidelity is essentially that of the weights (top-10 agreement ~0.99+),
    and the runtime constant-folds the dequantization at load, so latency equals fp32.
    This is what makes the artifact smaller than fp32: 3.3x on ml-100k and 2.3x on the
    synthetic world (``sizes_bytes`` in ``bench/results/pretrain-*.json``), where the fp32
    small layers and metadata weigh more.

``dynamic_int8``
    ONNX Runtime's ``quantize_dynamic`` (QInt8 weights, per-channel, MatMul and Gather), with
    its ``quant_pre_process`` first. Integer matmuls on uint8-quantized activations: can be
    faster on big layers, but per-tensor activation quantization costs ranking fidelity on the
    final item-table matmul, and tied tables are stored twice. Kept for comparison.

A quantized file is only written if its top-``k`` agreement with the fp32 file on validation
histories is at least ``min_agreement``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from shared.config import is_int
from shared.errors import ConfigError, ModelFileError
from shared.io import write_bytes_atomic
from shared.ondevice.runtime import OnDeviceModel

Method = Literal["weight_int8", "dynamic_int8"]
_METHODS: tuple[str, ...] = ("weight_int8", "dynamic_int8")


def top_k_agreement(scores_a: npt.ArrayLike, scores_b: npt.ArrayLike, k: int = 10) -> float:
    """Mean over rows of ``|top_k(a) ∩ top_k(b)| / k``.

    Rows are users, columns items; ``top_k`` takes the ``k`` highest scores with ties broken
    by the lower item index, so the result is deterministic. 1.0 means identical top-k sets
    (order inside the set is ignored: that is what a recommendation list shows).
    """
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"score arrays must be 2-D and equal in shape, got {a.shape}, {b.shape}")
    if not 1 <= k <= a.shape[1]:
        raise ValueError(f"k must be in [1, {a.shape[1]}], got {k}")
    if a.shape[0] == 0:
        raise ValueError("need at least one row to compare")
    top_a = np.argsort(-a, axis=1, kind="stable")[:, :k]
    top_b = np.argsort(-b, axis=1, kind="stable")[:, :k]
    hits = [
        np.intersect1d(ra, rb, assume_unique=True).size for ra, rb in zip(top_a, top_b, strict=True)
    ]
    return float(np.mean(hits) / k)


def _is_pruned(w: np.ndarray) -> bool:
    """Whether 2-D table ``w`` holds exact zeros outside all-zero rows and columns: a pruned
    table, to be quantized so that its zeros stay zeros. A dense trained table has none (a
    folded product of float weights); an all-zero item (a padding item) is no sign of
    pruning, and it is a row of the ``[items, d]`` Gather table but a column of the same
    table stored transposed (``[d, items]``) for a MatMul, so both are left out."""
    zeros = w == 0
    return bool(
        (zeros & ~zeros.all(axis=-1, keepdims=True) & ~zeros.all(axis=-2, keepdims=True)).any()
    )


@dataclass(frozen=True)
class QuantizeConfig:
    """Quantization settings.

    ``min_elements`` is a ladder, tried in order: float initializers with fewer elements stay
    fp32. The first entry quantizes every matrix (smallest file); later ones keep the small
    Linear/position weights fp32 (a few tens of KB, but they feed every score). The first
    rung whose top-``k`` agreement with fp32 reaches ``min_agreement`` (on ``n_validation``
    random histories, or the caller's) is written; ``min_agreement=None`` takes the first
    rung unchecked. ``residual_clusters``: k-means centroids for the item tables (0 = plain
    per-row int8), see :func:`quantize_weights_int8`.
    """

    method: Method = "weight_int8"
    per_channel: bool = True
    min_elements: tuple[int, ...] = (1024, 65536)
    residual_clusters: int = 32
    share_transposed: bool = True
    preprocess: bool = True
    min_agreement: float | None = 0.97
    k: int = 10
    n_validation: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ConfigError(f"method must be one of {_METHODS}, got {self.method!r}")
        # a bare int or a fractional count would pass a comparison and fail later with a
        # TypeError deep in numpy (a top-k slice, a sample size): refuse it here, by name
        if (
            not isinstance(self.min_elements, Sequence)
            or isinstance(self.min_elements, str)
            or not self.min_elements
            or not all(is_int(m) and m >= 1 for m in self.min_elements)
        ):
            raise ConfigError(
                f"min_elements must be a non-empty sequence of integers >= 1, such as (1024,)"
                f" for one rung, got {self.min_elements!r}"
            )
        if not is_int(self.residual_clusters) or self.residual_clusters < 0:
            raise ConfigError(
                f"residual_clusters must be an integer >= 0, got {self.residual_clusters!r}"
            )
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise ConfigError(f"min_agreement must be in [0, 1], got {self.min_agreement}")
        if not is_int(self.k) or self.k < 1:
            raise ConfigError(f"k must be an integer >= 1, got {self.k!r}")
        if not is_int(self.n_validation) or self.n_validation < 1:
            raise ConfigError(f"n_validation must be an integer >= 1, got {self.n_validation!r}")


@dataclass(frozen=True)
class QuantizeReport:
    """Sizes before/after, what was quantized, and the measured agreement per attempt."""

    method: Method
    src_bytes: int
    dst_bytes: int
    quantized: tuple[str, ...]
    shared: tuple[str, ...] = ()
    agreement: float | None = None
    k: int = 10
    min_elements: int | None = None
    attempts: tuple[tuple[int, int, float | None], ...] = ()  # (min_elements, bytes, agreement)

    @property
    def ratio(self) -> float:
        """fp32 size / int8 size."""
        return self.src_bytes / max(1, self.dst_bytes)

    def as_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "fp32_bytes": self.src_bytes,
            "int8_bytes": self.dst_bytes,
            "ratio": round(self.ratio, 2),
            "min_elements": self.min_elements,
            "quantized": list(self.quantized),
            "shared_transposed": list(self.shared),
            f"top{self.k}_agreement": self.agreement,
            "attempts": [list(a) for a in self.attempts],
        }


def quantize_onnx(
    src: str | Path,
    dst: str | Path,
    *,
    config: QuantizeConfig | None = None,
    validation_histories: Sequence[npt.ArrayLike] | None = None,
) -> QuantizeReport:
    """Quantize the fp32 model at ``src`` to int8 at ``dst`` (atomic; only if it passes).

    Raises :class:`ModelFileError` if ``src`` is not a valid exported fp32 model, or if no
    attempt reaches ``config.min_agreement`` top-``k`` agreement with ``src`` (then nothing
    is written).
    """
    try:
        src_data = Path(src).read_bytes()
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {src}: {exc.strerror or exc}") from exc
    data, report = quantize_onnx_bytes(
        src_data,
        config=config,
        validation_histories=validation_histories,
        source=str(src),
        target=str(dst),
    )
    write_bytes_atomic(dst, data)
    return report


def quantize_onnx_bytes(
    src_data: bytes,
    *,
    config: QuantizeConfig | None = None,
    validation_histories: Sequence[npt.ArrayLike] | None = None,
    source: str = "the fp32 model",
    target: str = "the int8 model",
) -> tuple[bytes, QuantizeReport]:
    """:func:`quantize_onnx` in memory: the int8 bytes of the fp32 model ``src_data`` and the
    report (``source`` / ``target`` name them in errors). With the default ``weight_int8``
    method nothing touches the disk (``dynamic_int8`` goes through ONNX Runtime's file-based
    quantizer in a temporary folder)."""
    cfg = config or QuantizeConfig()
    # validates the source, and gives the fp32 scores for the agreement gate
    reference = OnDeviceModel(src_data, name=source)
    meta = reference.metadata
    if meta.quantization != "none":
        raise ModelFileError(
            f"{source}: already quantized ({meta.quantization}); pass the fp32 export instead"
        )
    # a top-k of the whole catalog agrees with anything: keep one item out of it
    k = max(1, min(cfg.k, meta.n_items - 1))
    histories: list[npt.ArrayLike] = (
        list(validation_histories)
        if validation_histories is not None
        else list(random_histories(meta.n_items, meta.max_len, cfg.n_validation, cfg.seed))
    )
    if not histories:
        raise ConfigError(
            "validation_histories is empty: give at least one history, or None for random ones"
        )
    ref_scores = reference.score(histories) if cfg.min_agreement is not None else None
    rungs: tuple[int | None, ...] = cfg.min_elements if cfg.method == "weight_int8" else (None,)
    attempts: list[tuple[int, int, float | None]] = []
    for rung in rungs:
        proto = onnx.load_model_from_string(src_data)
        shared: list[str] = []
        if rung is not None:
            quantized, shared = quantize_weights_int8(
                proto,
                per_channel=cfg.per_channel,
                min_elements=rung,
                share_transposed=cfg.share_transposed,
                residual_clusters=cfg.residual_clusters,
                seed=cfg.seed,
            )
        else:
            proto, quantized = _ort_dynamic(src_data, cfg)
        dataclasses.replace(meta, quantization=cfg.method).apply_to(proto)
        data = proto.SerializeToString()
        agreement = None
        if ref_scores is not None:
            candidate = OnDeviceModel(data)
            agreement = top_k_agreement(ref_scores, candidate.score(histories), k=k)
        attempts.append((rung or 0, len(data), agreement))
        if agreement is None or cfg.min_agreement is None or agreement >= cfg.min_agreement:
            return data, QuantizeReport(
                method=cfg.method,
                src_bytes=len(src_data),
                dst_bytes=len(data),
                quantized=tuple(quantized),
                shared=tuple(shared),
                agreement=agreement,
                k=k,
                min_elements=rung,
                attempts=tuple(attempts),
            )
    tried = ", ".join(
        f"min_elements={m or 'ort'}: {a:.3f}" for m, _, a in attempts if a is not None
    )
    raise ModelFileError(
        f"{cfg.method} int8 model agrees with fp32 on too few top-{k} items ({tried}; required "
        f"{cfg.min_agreement}); nothing written to {target}. Try method='weight_int8', a larger "
        f"min_elements rung, or more residual_clusters"
    )


def random_histories(
    n_items: int, max_len: int, n: int, seed: int = 0
) -> list[npt.NDArray[np.int64]]:
    """``n`` uniform random histories of lengths 1..max_len (distinct items each)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, size=n)
    return [rng.choice(n_items, size=min(int(m), n_items), replace=False) for m in lengths]


# ---------------------------------------------------------------------- weight-only int8


def quantize_weights_int8(
    proto: onnx.ModelProto,
    *,
    per_channel: bool = True,
    min_elements: int = 1024,
    share_transposed: bool = True,
    residual_clusters: int = 0,
    residual_min_rows: int = 256,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Rewrite ``proto`` in place: large fp32 weights -> int8 + scale + DequantizeLinear.

    Returns (names quantized, names replaced by a Transpose of another quantized table).
    The dequantized tensor keeps the original name, so consumers are untouched; scales are
    per channel along the axis each weight's first consumer reduces over (item rows for the
    Gather table, output columns for MatMul, ...).

    With ``residual_clusters=K > 0``, a table with at least ``residual_min_rows`` rows is
    stored as K fp32 k-means centroids + a uint8/uint16 centroid id per row + the int8
    *residual* of each row from its centroid: item embeddings cluster (genres, tastes), the
    residuals span a much smaller range than the rows, so the same 8 bits resolve the
    within-cluster differences that decide a top-10 several times more finely. Everything is
    constant, so the runtime folds it back into one fp32 table at load.
    """
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        raise ConfigError(f"weight_int8 needs opset >= 13 (per-axis DequantizeLinear), got {opset}")
    graph = proto.graph
    graph_inputs = {i.name for i in graph.input}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for idx, name in enumerate(node.input):
            consumers[name].append((node, idx))

    arrays: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        if (
            init.data_type == TensorProto.FLOAT
            and len(init.dims) >= 2
            and int(np.prod(init.dims)) >= min_elements
            and init.name not in graph_inputs
        ):
            arrays[init.name] = numpy_helper.to_array(init)

    aliases: dict[str, str] = {}  # name -> name of the table it is the transpose of
    if share_transposed:
        names = list(arrays)
        for i, a in enumerate(names):
            if a in aliases or arrays[a].ndim != 2:
                continue
            for b in names[i + 1 :]:
                if b in aliases or arrays[b].shape != arrays[a].shape[::-1]:
                    continue
                if np.array_equal(arrays[b], arrays[a].T):
                    aliases[b] = a

    new_inits: list[TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    for name, w in arrays.items():
        if name in aliases:
            continue
        axis = _channel_axis(w.ndim, consumers.get(name, []))
        use_residual = (
            residual_clusters > 0
            and per_channel
            and w.ndim == 2
            and w.shape[axis] >= max(residual_min_rows, 2 * residual_clusters)
            # a pruned table keeps its zeros only as plain symmetric int8: centroid +
            # residual turns every zero into a small non-zero weight
            and not _is_pruned(w)
        )
        if use_residual:
            inits, nodes = _residual_table(name, w if axis == 0 else w.T, residual_clusters, seed)
            if axis == 1:
                nodes[-1].output[0] = f"{name}__rows"
                nodes.append(
                    helper.make_node(
                        "Transpose", [f"{name}__rows"], [name], name=f"{name}__t", perm=[1, 0]
                    )
                )
        else:
            q, scale = _quantize_int8(w, axis if per_channel else None)
            inits = [
                numpy_helper.from_array(q, f"{name}__int8"),
                numpy_helper.from_array(scale, f"{name}__scale"),
            ]
            nodes = [_dequant_node(name, axis if per_channel else None)]
        new_inits.extend(inits)
        new_nodes.extend(nodes)
    for alias, base in aliases.items():
        new_nodes.append(
            helper.make_node("Transpose", [base], [alias], name=f"{alias}__shared", perm=[1, 0])
        )

    kept = [t for t in graph.initializer if t.name not in arrays]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + old_nodes)
    return [n for n in arrays if n not in aliases], list(aliases)


def _quantize_int8(
    w: npt.NDArray[np.float32], axis: int | None
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Symmetric int8 (zero point 0, range +-127) with one scale per index of ``axis``."""
    if axis is None:
        scale = np.asarray(np.abs(w).max() / 127.0)
        shape = [1] * w.ndim
    else:
        reduce = tuple(d for d in range(w.ndim) if d != axis)
        scale = np.abs(w).max(axis=reduce) / 127.0
        shape = [1] * w.ndim
        shape[axis] = -1
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def _dequant_node(name: str, axis: int | None, output: str | None = None) -> onnx.NodeProto:
    node = helper.make_node(
        "DequantizeLinear",
        [f"{name}__int8", f"{name}__scale"],
        [output or name],
        name=f"{name}__dequant",
    )
    if axis is not None:
        node.attribute.append(helper.make_attribute("axis", axis))
    return node


def _residual_table(
    name: str, rows: npt.NDArray[np.float32], k: int, seed: int
) -> tuple[list[TensorProto], list[onnx.NodeProto]]:
    """Initializers + nodes computing ``name = centers[assign] + dequant(int8 residual)``."""
    centers, assign = _kmeans(rows, k, seed)
    q, scale = _quantize_int8(rows - centers[assign], 0)
    id_dtype = np.uint8 if len(centers) <= 256 else np.uint16
    inits = [
        numpy_helper.from_array(q, f"{name}__int8"),
        numpy_helper.from_array(scale, f"{name}__scale"),
        numpy_helper.from_array(centers, f"{name}__centers"),
        numpy_helper.from_array(assign.astype(id_dtype), f"{name}__assign"),
    ]
    nodes = [
        helper.make_node(
            "Cast",
            [f"{name}__assign"],
            [f"{name}__assign64"],
            to=TensorProto.INT64,
            name=f"{name}__cast",
        ),
        helper.make_node(
            "Gather",
            [f"{name}__centers", f"{name}__assign64"],
            [f"{name}__base"],
            name=f"{name}__gather",
            axis=0,
        ),
        _dequant_node(name, 0, output=f"{name}__resid"),
        helper.make_node("Add", [f"{name}__base", f"{name}__resid"], [name], name=f"{name}__add"),
    ]
    return inits, nodes


def _kmeans(
    x: npt.NDArray[np.float32], k: int, seed: int, iters: int = 30
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Plain k-means (k-means++ init, Lloyd steps); deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    x64 = x.astype(np.float64)
    n = len(x64)
    k = min(k, n)
    centers = np.empty((k, x64.shape[1]))
    centers[0] = x64[rng.integers(n)]
    d2 = ((x64 - centers[0]) ** 2).sum(1)
    for j in range(1, k):
        total = d2.sum()
        idx = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        centers[j] = x64[idx]
        d2 = np.minimum(d2, ((x64 - centers[j]) ** 2).sum(1))
    sq = (x64**2).sum(1, keepdims=True)
    assign = np.zeros(n, dtype=np.int64)
    for step in range(iters):
        dist = sq - 2 * x64 @ centers.T + (centers**2).sum(1)
        new = dist.argmin(1)
        if step and np.array_equal(new, assign):
            break
        assign = new
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(centers)
        np.add.at(sums, assign, x64)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled, None]
    return centers.astype(np.float32), assign


def _channel_axis(ndim: int, uses: list[tuple[onnx.NodeProto, int]]) -> int:
    """Axis to keep one scale per: the 'output channel' of the first consumer."""
    for node, idx in uses:
        if node.op_type == "Gather" and idx == 0:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            return axis % ndim
        if node.op_type == "MatMul" and idx == 1:
            return ndim - 1
        if node.op_type == "Gemm" and idx == 1:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            return 0 if trans_b else 1
        if node.op_type == "Transpose" and idx == 0 and ndim == 2:
            return 0
    return 0


# ---------------------------------------------------------------------- ORT dynamic


def _ort_dynamic(src_data: bytes, cfg: QuantizeConfig) -> tuple[onnx.ModelProto, list[str]]:
    """ONNX Runtime's quantize_dynamic (QInt8, MatMul + Gather), after quant_pre_process."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="fedrec-quant-") as tmp:
        raw = Path(tmp) / "fp32.onnx"
        pre = Path(tmp) / "pre.onnx"
        out = Path(tmp) / "int8.onnx"
        raw.write_bytes(src_data)
        source = raw
        if cfg.preprocess:
            try:
                quant_pre_process(str(raw), str(pre), skip_symbolic_shape=False)
                source = pre
            except Exception:
                source = raw  # pre-processing is an optimisation, never a requirement
        try:
            quantize_dynamic(
                str(source),
                str(out),
                op_types_to_quantize=["MatMul", "Gather"],
                per_channel=cfg.per_channel,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
        except Exception as exc:
            raise ModelFileError(f"onnxruntime quantize_dynamic failed: {exc}") from exc
        proto = onnx.load_model(str(out))
    quantized = sorted(
        t.name
        for t in proto.graph.initializer
        if t.data_type in (TensorProto.INT8, TensorProto.UINT8)
    )
    return proto, quantized
