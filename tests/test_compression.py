"""Pruning, ONNX export, int8 quantization and the on-device runtime (all CPU, ~15 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from shared.compression import (
    ExportConfig,
    PruneConfig,
    QuantizeConfig,
    export_onnx,
    prune_model,
    quantize_onnx,
    random_histories,
    sparsity_report,
    top_k_agreement,
)
from shared.compression.artifact import StudentArtifact, publish_artifact_once
from shared.errors import ConfigError, DataError, ModelFileError, PublishedVersionError
from shared.ondevice import (
    INPUT_NAMES,
    ModelMetadata,
    OnDeviceModel,
    RuntimeConfig,
    catalog_fingerprint,
    graph_digest,
    metadata_digest,
    ort_max_opset,
)
from shared.published import (
    RECORD_FILE,
    artifact_file_name,
    artifact_versions,
    published_digests,
    retire_old_artifacts,
    sha256_hex,
)

N_ITEMS, DIM, MAX_LEN = 1682, 64, 50
CATALOG = catalog_fingerprint([f"item{i}" for i in range(N_ITEMS)])


class StandInStudent(nn.Module):
    """Student contract stand-in: embed -> additive attention pool -> LayerNorm -> item table.

    The item table is clustered (centre + noise), so top-10 lists have real structure and
    int8 agreement is meaningful; ``tied`` shares the input embedding with the output table.
    """

    def __init__(
        self,
        n_items: int = N_ITEMS,
        dim: int = DIM,
        max_len: int = MAX_LEN,
        tied: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.n_items, self.max_len = n_items, max_len
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            centers = torch.randn(24, dim)
            table = centers[torch.randint(0, 24, (n_items,))] + 0.35 * torch.randn(n_items, dim)
            self.item_emb = nn.Embedding(n_items, dim)
            self.pos = nn.Parameter(0.02 * torch.randn(max_len, dim))
            self.att_hidden = nn.Linear(dim, dim)
            self.att_score = nn.Linear(dim, 1)
            self.proj = nn.Linear(dim, dim)
            self.norm = nn.LayerNorm(dim)
            with torch.no_grad():
                self.item_emb.weight.copy_(table)
                self.proj.weight.copy_(torch.eye(dim) + 0.05 * torch.randn(dim, dim))
            if tied:
                self.item_table = self.item_emb.weight
            else:
                self.item_table = nn.Parameter(table + 0.1 * torch.randn(n_items, dim))

    def precompute_item_table(self) -> None:
        """The real student builds its table from item features; here it is a parameter."""

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.item_emb(items) + self.pos[-items.shape[1] :]
        logits = self.att_score(torch.tanh(self.att_hidden(x))).squeeze(-1)
        weights = torch.softmax(logits.masked_fill(~mask, -1e4), dim=-1) * mask
        h = self.norm(self.proj((weights.unsqueeze(-1) * x).sum(dim=1)))
        return h @ self.item_table.T


def left_pad(histories: list[np.ndarray], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference padding: keep the last ``length`` ids, pad on the left, mask the real ones."""
    items = np.zeros((len(histories), length), dtype=np.int64)
    mask = np.zeros((len(histories), length), dtype=bool)
    for row, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)[-length:]
        if len(h):
            items[row, -len(h) :] = h
            mask[row, -len(h) :] = True
    return torch.from_numpy(items), torch.from_numpy(mask)


def torch_scores(model: nn.Module, histories: list[np.ndarray], length: int) -> np.ndarray:
    items, mask = left_pad(histories, length)
    with torch.no_grad():
        return model(items, mask).numpy()


@pytest.fixture(scope="module")
def student() -> StandInStudent:
    return StandInStudent().eval()


@pytest.fixture(scope="module")
def fp32_path(student: StandInStudent, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "student.onnx"
    export_onnx(student, path, model_version="test-1", catalog_fingerprint=CATALOG)
    return path


@pytest.fixture(scope="module")
def int8_path(fp32_path: Path) -> Path:
    path = fp32_path.with_name("student_int8.onnx")
    quantize_onnx(fp32_path, path)
    return path


def _tampered(src: Path, dst: Path, edit: Callable[[onnx.ModelProto], object]) -> Path:
    proto = onnx.load(str(src))
    edit(proto)
    dst.write_bytes(proto.SerializeToString())
    return dst


# --------------------------------------------------------------------------- agreement


def test_top_k_agreement_hand_computed() -> None:
    a = np.array([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    b = np.array([[5.0, 1.0, 1.0, 1.0, 9.0], [0.0, 0.0, 0.0, 7.0, 8.0]])
    # row 0: top2(a)={0,1}, top2(b)={4,0} -> 1/2; row 1: {4,3} vs {4,3} -> 2/2
    assert top_k_agreement(a, b, k=2) == pytest.approx(0.75)
    assert top_k_agreement(a, a, k=5) == 1.0
    # ties break toward the lower item id: top1 of [1,1,1] is item 0, of [0,1,1] is item 1
    assert top_k_agreement([[1.0, 1.0, 1.0]], [[0.0, 1.0, 1.0]], k=1) == 0.0
    with pytest.raises(ValueError, match="equal in shape"):
        top_k_agreement(a, b[:1], k=2)
    with pytest.raises(ValueError, match="k must be"):
        top_k_agreement(a, b, k=6)


# --------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("scope", ["global", "per_layer"])
@pytest.mark.parametrize("sparsity", [0.3, 0.8])
def test_pruning_reaches_requested_sparsity(scope: str, sparsity: float) -> None:
    model = StandInStudent(n_items=200, dim=32, max_len=10)
    report = prune_model(model, PruneConfig(sparsity=sparsity, scope=scope))  # type: ignore[arg-type]
    names = {layer.name for layer in report.layers}
    assert names == {"att_hidden.weight", "att_score.weight", "proj.weight"}
    assert report.overall == pytest.approx(sparsity, abs=0.01)
    if scope == "per_layer":
        for layer in report.layers:
            assert layer.sparsity == pytest.approx(sparsity, abs=1.0 / layer.numel + 1e-9)
    # permanent: plain parameters again, no masks or *_orig, and the report is reproducible
    assert not any(n.endswith(("_orig", "_mask")) for n, _ in model.named_parameters())
    assert not any(n.endswith("_mask") for n, _ in model.named_buffers())
    assert sparsity_report(model, report.config).overall == pytest.approx(report.overall)


def test_pruning_embeddings_keeps_tied_table_tied(tmp_path: Path) -> None:
    model = StandInStudent(n_items=200, dim=32, max_len=10)
    report = prune_model(model, PruneConfig(sparsity=0.5, include_embeddings=True))
    assert "item_emb.weight" in {layer.name for layer in report.layers}
    assert len(report.layers) == 5  # tied table counted once; pos included
    assert model.item_table is model.item_emb.weight
    assert report.overall == pytest.approx(0.5, abs=0.01)
    export_onnx(model, tmp_path / "p.onnx", model_version="p", catalog_fingerprint="c")


def test_prune_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="sparsity"):
        PruneConfig(sparsity=1.0)
    with pytest.raises(ConfigError, match="scope"):
        PruneConfig(scope="layerwise")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no parameters"):
        prune_model(nn.Sequential(nn.LayerNorm(4)))


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("tied", [True, False])
def test_export_matches_torch_for_any_batch_and_length(tied: bool, tmp_path: Path) -> None:
    model = StandInStudent(n_items=300, dim=32, max_len=20, tied=tied, seed=1).eval()
    path = tmp_path / "m.onnx"
    report = export_onnx(model, path, model_version="v", catalog_fingerprint="c")
    assert report.max_abs_diff < 1e-4
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch, length in [(1, 1), (1, 20), (4, 7), (9, 13), (2, 20)]:
        histories = [rng.integers(0, 300, rng.integers(1, length + 1)) for _ in range(batch)]
        items, mask = left_pad(histories, length)
        (got,) = session.run(None, {"items": items.numpy(), "mask": mask.numpy()})
        with torch.no_grad():
            want = model(items, mask).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_model_with_non_finite_scores_is_not_exported(tmp_path: Path) -> None:
    """A diverged federation (lr=1e30) ended with 'the model likely has shape-dependent
    Python control flow': the export blamed the code for NaN weights."""
    model = StandInStudent(n_items=50, dim=8, max_len=5, seed=1).eval()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ModelFileError, match=r"own scores are not finite .* training diverged"):
        export_onnx(model, tmp_path / "m.onnx", model_version="v", catalog_fingerprint="c")
    assert not (tmp_path / "m.onnx").exists()


def test_an_export_a_device_would_refuse_is_refused_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    """A model whose output is not float32 scores over its n_items was written, then refused
    by the device's runtime, whose message sent the user back to the same export."""

    class Narrow(StandInStudent):  # says 50 items, scores 49
        def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return super().forward(items, mask)[:, :-1]

    models = {
        "narrow": Narrow(n_items=50, dim=8, max_len=5, seed=1),
        "float64": StandInStudent(n_items=50, dim=8, max_len=5, seed=1).double(),
    }
    for name, model in models.items():
        path = tmp_path / f"{name}.onnx"
        with pytest.raises(ModelFileError, match="a device needs float32 scores, one per"):
            export_onnx(model.eval(), path, model_version="v", catalog_fingerprint="c")
        assert not path.exists(), name


def test_a_catalog_of_another_length_than_the_model_is_never_published(tmp_path: Path) -> None:
    """Its artifact and catalog.json would be refused by every device, blaming the catalog."""
    from shared.compression.artifact import publish_student
    from shared.models.student import StudentConfig, StudentModel

    rng = np.random.default_rng(0)
    tables = [rng.normal(size=(6, 8)).astype(np.float32) for _ in range(2)]
    student = StudentModel(*tables, StudentConfig(dim=16, max_len=10, text_dim=8, id_dim=8))
    for n in (5, 7):
        with pytest.raises(DataError, match=f"catalog has {n} item ids but the student scores 6"):
            publish_student(student, [f"i{k}" for k in range(n)], tmp_path / "m.onnx", version="1")
    assert not list(tmp_path.iterdir())
    publish_student(student, [f"i{k}" for k in range(6)], tmp_path / "m.onnx", version="1")
    assert (tmp_path / "m.onnx").exists()


def test_exported_metadata_and_runtime_scores(student: StandInStudent, fp32_path: Path) -> None:
    proto = onnx.load(str(fp32_path))
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert (meta.n_items, meta.max_len, meta.model_version) == (N_ITEMS, MAX_LEN, "test-1")
    assert meta.catalog_fingerprint == CATALOG and meta.input_names == INPUT_NAMES
    model = OnDeviceModel(fp32_path, expected_n_items=N_ITEMS, expected_catalog_fingerprint=CATALOG)
    rng = np.random.default_rng(1)
    histories = [rng.integers(0, N_ITEMS, n) for n in (1, 5, 50, 80, 0, 17)]
    got = model.score(histories)
    assert got.shape == (len(histories), N_ITEMS) and got.dtype == np.float32
    np.testing.assert_allclose(got, torch_scores(student, histories, MAX_LEN), atol=1e-4)
    # single-user fast path == batched path; long histories are truncated to the last max_len
    np.testing.assert_allclose(model.score([histories[3]])[0], got[3], atol=1e-4)
    np.testing.assert_allclose(model.score([histories[3][-MAX_LEN:]])[0], got[3], atol=1e-4)


def test_export_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="opset"):
        ExportConfig(opset=11)
    with pytest.raises(ConfigError, match="n_items and max_len"):
        export_onnx(
            nn.Linear(2, 2), "/nonexistent/x.onnx", model_version="v", catalog_fingerprint="c"
        )


# --------------------------------------------------------------------------- int8


def test_int8_is_small_and_agrees_with_torch(
    student: StandInStudent, fp32_path: Path, int8_path: Path
) -> None:
    fp32_bytes, int8_bytes = fp32_path.stat().st_size, int8_path.stat().st_size
    assert int8_bytes < fp32_bytes / 4
    assert int8_bytes <= 1_000_000
    model = OnDeviceModel(int8_path, expected_n_items=N_ITEMS)
    assert model.metadata.quantization == "weight_int8"
    # the tied table (Gather input and transposed MatMul weight) is stored once, as int8
    tables = [t for t in onnx.load(str(int8_path)).graph.initializer if N_ITEMS in t.dims]
    assert [t.data_type for t in tables if len(t.dims) == 2] == [onnx.TensorProto.INT8]
    histories = random_histories(N_ITEMS, MAX_LEN, 300, seed=123)
    agreement = top_k_agreement(torch_scores(student, histories, MAX_LEN), model.score(histories))
    assert agreement >= 0.97


def test_int8_weights_unfolded_give_same_scores(int8_path: Path) -> None:
    histories = random_histories(N_ITEMS, MAX_LEN, 8, seed=5)
    folded = OnDeviceModel(int8_path).score(histories)
    # dequantized at every call instead of at load (basic level: no int8-kernel fusions)
    cfg = RuntimeConfig(fold_int8_weights=False, graph_optimization="basic")
    np.testing.assert_allclose(
        OnDeviceModel(int8_path, config=cfg).score(histories), folded, rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ConfigError, match="max_batch_size"):
        RuntimeConfig(max_batch_size=0)


def test_ort_dynamic_quantization_is_smaller(fp32_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "dyn.onnx"
    cfg = QuantizeConfig(method="dynamic_int8", min_agreement=None)
    report = quantize_onnx(fp32_path, out, config=cfg)
    assert report.dst_bytes == out.stat().st_size < fp32_path.stat().st_size
    assert OnDeviceModel(out).metadata.quantization == "dynamic_int8"


def test_quantization_gate_refuses_and_writes_nothing(
    fp32_path: Path, int8_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "never.onnx"
    cfg = QuantizeConfig(min_agreement=1.0, min_elements=(1024,), residual_clusters=0)
    with pytest.raises(ModelFileError, match=r"required 1\.0"):
        quantize_onnx(fp32_path, out, config=cfg)
    assert not out.exists()
    with pytest.raises(ModelFileError, match="already quantized"):
        quantize_onnx(int8_path, out)  # the fixture's file (this test alone ran without it)


def test_quantize_config_refuses_a_fractional_k_or_a_bare_min_elements() -> None:
    """k=2.5 was accepted and failed later with a TypeError slicing the top-k; a bare
    ``min_elements=1024`` failed with "'int' object is not iterable"."""
    for k in (2.5, True, 0):
        with pytest.raises(ConfigError, match="k must be an integer >= 1"):
            QuantizeConfig(k=k)  # type: ignore[arg-type]
    for bad in (1024, (1024.5,), (True,), (), (0,), "1024"):
        with pytest.raises(ConfigError, match=r"min_elements must be a non-empty sequence"):
            QuantizeConfig(min_elements=bad)  # type: ignore[arg-type]
    for name in ("n_validation", "residual_clusters"):
        with pytest.raises(ConfigError, match=f"{name} must be an integer"):
            QuantizeConfig(**{name: 2.5})  # type: ignore[arg-type]
    assert QuantizeConfig(k=np.int64(5), min_elements=[np.int64(1), 64]).k == 5  # type: ignore[arg-type]


# --------------------------------------------------------------------------- runtime


def test_a_batch_a_scalar_or_a_fractional_k_is_refused_not_misread(int8_path: Path) -> None:
    """A 2-D history was flattened into one, a scalar read as a one-item history, k=2.5 hit
    a numpy TypeError and k=True gave one item."""
    model = OnDeviceModel(int8_path)
    for history in ([[1, 2, 3], [4, 5, 6]], np.int64(7)):
        with pytest.raises(DataError, match="a history is a 1-D sequence of item ids"):
            model.recommend(history, k=3)
    with pytest.raises(DataError, match=r"got shape \[2, 2\]"):
        model.score([[[1, 2], [3, 4]]])
    for k in (2.5, True, 0):
        with pytest.raises(ConfigError, match="k must be an integer >= 1"):
            model.recommend([1, 2, 3], k=k)  # type: ignore[arg-type]
    assert len(model.recommend([1, 2, 3], k=np.int64(4))) == 4
    assert model.recommend([], k=2).shape == (2,)


def test_catalog_fingerprints_of_different_catalogs_differ() -> None:
    """Ids are NUL-separated, so a NUL inside an id made two catalogs one fingerprint."""
    assert catalog_fingerprint(["ab", "c"]) != catalog_fingerprint(["a", "bc"])
    with pytest.raises(DataError, match="contains a NUL character"):
        catalog_fingerprint(["a\x00b", "c"])


def test_recommend_excludes_history_and_sorts(int8_path: Path) -> None:
    model = OnDeviceModel(int8_path)
    history = np.array([3, 14, 15, 92, 65])
    recs = model.recommend(history, k=10)
    assert len(recs) == 10 and not set(recs) & set(history.tolist())
    scores = model.score([history])[0]
    assert np.all(np.diff(scores[recs]) <= 0)
    assert set(model.recommend(history, k=10, exclude_history=False)) <= set(
        np.argsort(-scores)[:11].tolist()
    )
    with pytest.raises(DataError, match="outside"):
        model.score([np.array([N_ITEMS])])
    too_old = np.r_[N_ITEMS + 5, np.ones(MAX_LEN + 10, dtype=np.int64)]
    with pytest.raises(DataError, match="outside"):  # too old to be scored, still excluded
        model.recommend(too_old)
    with pytest.raises(DataError, match="outside"):  # and scored alike: a history mapped wrong
        model.score([too_old])
    empty = model.score([np.array([], dtype=np.int64)])
    assert empty.shape == (1, N_ITEMS) and np.isfinite(empty).all()
    assert len(model.recommend([], k=5)) == 5


@pytest.mark.parametrize(
    "make_bytes",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: np.random.default_rng(0).bytes(4096), id="random"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_corrupt_files_are_refused(
    fp32_path: Path, tmp_path: Path, make_bytes: Callable[[bytes], bytes]
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(make_bytes(fp32_path.read_bytes()))
    with pytest.raises(ModelFileError, match="download it again"):
        OnDeviceModel(bad)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b"fedrec.max_len", id="metadata-key"),
        pytest.param(b"test-1", id="metadata-value"),
        pytest.param(b"scores", id="output-name"),
    ],
)
def test_a_file_whose_text_is_not_utf8_is_refused(
    fp32_path: Path, tmp_path: Path, text: bytes
) -> None:
    """One damaged byte in a name made protobuf hand it over as bytes, and the loader failed
    with a TypeError (sorting or comparing bytes with str) instead of refusing the file."""
    data = fp32_path.read_bytes()
    assert text in data
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data.replace(text, b"\xff" + text[1:]))  # same length: still parses
    with pytest.raises(ModelFileError, match=r"not UTF-8.*download it again"):
        OnDeviceModel(bad)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="cannot read model file"):
        OnDeviceModel(tmp_path / "nope.onnx")


def test_wrong_catalog_is_refused(fp32_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"scores 1682 items but the local catalog has 1000"):
        OnDeviceModel(fp32_path, expected_n_items=1000)
    with pytest.raises(ModelFileError, match="exported for catalog"):
        OnDeviceModel(fp32_path, expected_catalog_fingerprint="0123456789abcdef")


def _set_meta(proto: onnx.ModelProto, key: str, value: str) -> None:
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = value


def _restamp(proto: onnx.ModelProto) -> None:
    """Both export digests recomputed, as the exporter would write them."""
    _set_meta(proto, "fedrec.graph_sha256", graph_digest(proto))
    props = {p.key: p.value for p in proto.metadata_props}
    _set_meta(proto, "fedrec.metadata_sha256", metadata_digest(props))


def test_output_width_mismatch_is_refused(fp32_path: Path, tmp_path: Path) -> None:
    # metadata claims 1600 items, graph says 1682 (static output shape)
    def claim(p: onnx.ModelProto) -> None:
        _set_meta(p, "fedrec.n_items", "1600")
        _restamp(p)  # as a (buggy) exporter would write it

    bad = _tampered(fp32_path, tmp_path / "w.onnx", claim)
    with pytest.raises(ModelFileError, match="output width is 1682 items but the metadata says"):
        OnDeviceModel(bad)

    # same, with the static width erased: caught by the probe inference
    def erase(p: onnx.ModelProto) -> None:
        _set_meta(p, "fedrec.n_items", "1600")
        p.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "n"
        _restamp(p)  # a consistently built file

    bad = _tampered(fp32_path, tmp_path / "w2.onnx", erase)
    with pytest.raises(ModelFileError, match=r"expected float32\[1, 1600\]"):
        OnDeviceModel(bad)


def test_wrong_inputs_are_refused(fp32_path: Path, tmp_path: Path) -> None:
    def rename(p: onnx.ModelProto) -> None:
        p.graph.input[1].name = "attention_mask"
        for node in p.graph.node:
            for i, name in enumerate(node.input):
                if name == "mask":
                    node.input[i] = "attention_mask"
        _restamp(p)

    bad = _tampered(fp32_path, tmp_path / "names.onnx", rename)
    with pytest.raises(ModelFileError, match=r"inputs are \['attention_mask', 'items'\], expected"):
        OnDeviceModel(bad)

    def retype(p: onnx.ModelProto) -> None:
        p.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT32
        _restamp(p)

    bad = _tampered(fp32_path, tmp_path / "types.onnx", retype)
    with pytest.raises(ModelFileError, match="input 'items' is int32"):
        OnDeviceModel(bad)


def test_inputs_of_a_fixed_batch_or_another_length_are_refused_on_load(
    fp32_path: Path, tmp_path: Path
) -> None:
    """A graph built for one row passed the one-row probe, then every batch of two failed
    inside onnxruntime (a raw InvalidArgument)."""

    def fix_dim(axis: int, size: int) -> Callable[[onnx.ModelProto], None]:
        def edit(p: onnx.ModelProto) -> None:
            for inp in p.graph.input:
                inp.type.tensor_type.shape.dim[axis].dim_value = size
            _restamp(p)  # a consistently built file

        return edit

    bad = _tampered(fp32_path, tmp_path / "batch1.onnx", fix_dim(0, 1))
    with pytest.raises(ModelFileError, match="input 'items' has a fixed batch size of 1"):
        OnDeviceModel(bad)
    bad = _tampered(fp32_path, tmp_path / "seq7.onnx", fix_dim(1, 7))
    with pytest.raises(ModelFileError, match=rf"fixed length of 7.*max_len={MAX_LEN}"):
        OnDeviceModel(bad)
    # a fixed length equal to max_len is what every call is padded to: it loads and scores
    ok = OnDeviceModel(_tampered(fp32_path, tmp_path / "seq.onnx", fix_dim(1, MAX_LEN)))
    assert ok.score([[1, 2], [3]]).shape == (2, N_ITEMS)


def test_unsupported_opset_is_refused(fp32_path: Path, tmp_path: Path) -> None:
    def bump(p: onnx.ModelProto) -> None:
        for imp in p.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = 99

    bad = _tampered(fp32_path, tmp_path / "opset.onnx", bump)
    with pytest.raises(ModelFileError, match=rf"opset 99.*up to {ort_max_opset()}.*re-export"):
        OnDeviceModel(bad)


def test_missing_or_foreign_metadata_is_refused(fp32_path: Path, tmp_path: Path) -> None:
    bad = _tampered(fp32_path, tmp_path / "m.onnx", lambda p: p.ClearField("metadata_props"))
    with pytest.raises(ModelFileError, match=r"metadata is missing fedrec\.format"):
        OnDeviceModel(bad)
    bad = _tampered(fp32_path, tmp_path / "f.onnx", lambda p: _set_meta(p, "fedrec.format", "x/9"))
    with pytest.raises(ModelFileError, match="model format is 'x/9'"):
        OnDeviceModel(bad)


def test_an_implausible_max_len_is_refused_before_its_window_is_allocated(
    fp32_path: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The probe allocates a window of max_len: a huge one was a traceback (or gigabytes on a
    phone) before any check. A failing probe is reported once, in the error, not also logged."""

    def longer(p: onnx.ModelProto) -> None:  # as a (buggy) exporter would write it
        _set_meta(p, "fedrec.max_len", "1000")
        _restamp(p)

    bad = _tampered(fp32_path, tmp_path / "long.onnx", longer)
    with pytest.raises(ModelFileError, match="probe inference failed"):
        OnDeviceModel(bad)
    assert "onnxruntime" not in capfd.readouterr().err

    def huge(p: onnx.ModelProto) -> None:
        _set_meta(p, "fedrec.max_len", str(10**12))
        _restamp(p)

    bad = _tampered(fp32_path, tmp_path / "huge.onnx", huge)
    with pytest.raises(ModelFileError, match=r"max_len must be in \[1, 100000\]"):
        OnDeviceModel(bad)


def test_history_ids_must_be_integers(int8_path: Path) -> None:
    model = OnDeviceModel(int8_path)
    for bad in ([5.9, 7.2], ["5", "7"], [float("nan")]):
        with pytest.raises(DataError, match="must be integers of the catalog"):
            model.score([bad])
    with pytest.raises(DataError, match="outside"):
        model.score([[2**63 - 1]])
    assert model.score([[]]).shape == (1, model.n_items)


def test_a_damaged_weight_is_refused_by_the_graph_digest(int8_path: Path, tmp_path: Path) -> None:
    """One flipped bit in a weight loaded and scored differently with no error (272 of 300
    random single-bit flips); the digest written at export refuses it."""

    def flip(p: onnx.ModelProto) -> None:
        tensor = max(p.graph.initializer, key=lambda t: len(t.raw_data))
        raw = bytearray(tensor.raw_data)
        raw[len(raw) // 2] ^= 0x10
        tensor.raw_data = bytes(raw)

    bad = _tampered(int8_path, tmp_path / "flipped.onnx", flip)
    with pytest.raises(ModelFileError, match="does not match the digest written at export"):
        OnDeviceModel(bad)
    unstamped = _tampered(
        int8_path, tmp_path / "old.onnx", lambda p: _set_meta(p, "fedrec.graph_sha256", "")
    )
    with pytest.raises(ModelFileError, match="digest"):
        OnDeviceModel(unstamped)  # an emptied digest is a wrong one, not a missing one


def test_damaged_metadata_is_refused_by_its_digest(int8_path: Path, tmp_path: Path) -> None:
    """max_len 50 -> 10 loaded and scored a 10-item window with no error (the graph's digest
    does not cover the metadata the runtime acts on)."""
    shorter = _tampered(
        int8_path, tmp_path / "short.onnx", lambda p: _set_meta(p, "fedrec.max_len", "10")
    )
    with pytest.raises(ModelFileError, match=r"metadata \(catalog, max_len"):
        OnDeviceModel(shorter)

    def older_export(p: onnx.ModelProto) -> None:  # written before the metadata digest
        kept = [(e.key, e.value) for e in p.metadata_props if e.key != "fedrec.metadata_sha256"]
        del p.metadata_props[:]
        for key, value in kept:
            entry = p.metadata_props.add()
            entry.key, entry.value = key, value

    older = _tampered(int8_path, tmp_path / "older.onnx", older_export)
    assert OnDeviceModel(older).metadata.max_len == MAX_LEN


@pytest.mark.parametrize(
    ("key", "value"),
    [("fedrec.n_items", "1683"), ("fedrec.catalog_fingerprint", "f" * 16), ("fedrec.max_len", "x")],
)
def test_damaged_metadata_is_called_damaged_not_another_catalog(
    int8_path: Path, tmp_path: Path, key: str, value: str
) -> None:
    """The catalog checks (and the metadata's parse) ran before the digest check, so a file
    damaged in its n_items or catalog entry was refused as a model of another catalog
    ("download the model built for this catalog") and a damaged max_len as a foreign export."""
    damaged = _tampered(int8_path, tmp_path / "damaged.onnx", lambda p: _set_meta(p, key, value))
    with pytest.raises(ModelFileError, match="does not match the digest written at export"):
        OnDeviceModel(damaged, expected_n_items=N_ITEMS, expected_catalog_fingerprint=CATALOG)


@pytest.mark.parametrize("sparsity", [0.5, 0.005])
def test_a_pruned_student_keeps_its_zeros_through_int8(sparsity: float) -> None:
    """The artifact reports the pruned sparsity; the int8 tables it ships used to hold no zero
    at all (centroid + int8 residual turns a zero into a small weight), so a device ran a
    dense model reported as half pruned."""
    from onnx import TensorProto, numpy_helper

    from shared.compression.artifact import build_student_artifact
    from shared.compression.prune import publish_prune
    from shared.models.student import StudentConfig, StudentModel

    n_items = 400  # enough rows for the item tables' centroid + residual path
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    student = StudentModel(
        rng.normal(size=(n_items, 8)).astype(np.float32),
        rng.normal(size=(n_items, 12)).astype(np.float32),
        StudentConfig(dim=16, max_len=8, text_dim=8, id_dim=12),
    )
    ids = [str(i) for i in range(n_items)]
    dense = onnx.load_model_from_string(build_student_artifact(student, ids, version="1").int8)
    built = build_student_artifact(student, ids, version="1", prune=publish_prune(sparsity))
    assert built.sparsity == pytest.approx(sparsity, abs=0.01)
    assert built.agreement >= 0.97
    shipped = onnx.load_model_from_string(built.int8)
    onnx.checker.check_model(shipped)  # one entry per metadata key (a digest was written twice)
    assert not any(t.name.endswith("__centers") for t in shipped.graph.initializer)

    def int8_tables(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
        return {
            t.name: numpy_helper.to_array(t)
            for t in proto.graph.initializer
            if t.data_type == TensorProto.INT8 and np.prod(t.dims) >= 4 * n_items
        }

    assert any(t.name.endswith("__centers") for t in dense.graph.initializer)  # the finer path
    tables = int8_tables(shipped)
    assert tables
    for name, q in tables.items():
        assert float((q == 0).mean()) >= sparsity - 0.01, name


@pytest.mark.parametrize("tied", [True, False])
def test_a_padding_item_is_no_sign_of_pruning_in_either_orientation(
    tied: bool, tmp_path: Path
) -> None:
    """An all-zero item row (a padding item) was ignored only along the last axis, but the
    exported MatMul stores the output table transposed ([d, items]): its padding column
    flagged the dense table as pruned, which then lost the finer centroid + residual int8."""
    from onnx import numpy_helper

    from shared.compression.quantize import _is_pruned

    n_items = 400  # enough rows for the centroid + residual path
    student = StandInStudent(n_items=n_items, dim=16, max_len=5, tied=tied).eval()
    with torch.no_grad():
        student.item_emb.weight[0] = 0.0
        student.item_table[0] = 0.0
    src = tmp_path / "padded.onnx"
    export_onnx(student, src, model_version="1", catalog_fingerprint="f" * 16)
    fp32 = onnx.load(str(src))
    tables = {
        t.name: numpy_helper.to_array(t)
        for t in fp32.graph.initializer
        if len(t.dims) == 2 and n_items in t.dims
    }
    assert any(w.shape[0] == n_items for w in tables.values())
    assert tied or any(w.shape[1] == n_items for w in tables.values())  # the MatMul's [d, items]
    for w in tables.values():
        assert not _is_pruned(w) and not _is_pruned(w.T)
        pruned = np.where(np.abs(w) < np.quantile(np.abs(w), 0.3), 0.0, w)
        assert _is_pruned(pruned) and _is_pruned(pruned.T)
    out = tmp_path / "padded.int8.onnx"
    report = quantize_onnx(src, out, config=QuantizeConfig(min_agreement=None))
    centers = {t.name for t in onnx.load(str(out)).graph.initializer}
    stored = [name for name in tables if name in report.quantized]  # not the tied alias
    assert stored and all(f"{name}__centers" in centers for name in stored)


def test_recommend_breaks_ties_by_the_lower_id(
    int8_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """argpartition kept an arbitrary member of a tie at the k-th place (3 of 4 heavily tied
    draws picked another top-10 than a stable sort)."""
    model = OnDeviceModel(int8_path)
    rng = np.random.default_rng(0)
    for _ in range(50):
        scores = rng.integers(0, 4, size=N_ITEMS).astype(np.float32)
        scores[rng.integers(0, N_ITEMS, size=5)] = np.nan
        monkeypatch.setattr(model, "_score_one", lambda h, s=scores: s.copy()[None, :])
        history = rng.choice(N_ITEMS, size=3, replace=False)
        expected = np.argsort(-np.where(np.isnan(scores), -np.inf, scores), kind="stable")
        expected = expected[~np.isin(expected, history)][:10]
        np.testing.assert_array_equal(model.recommend(history, k=10), expected)


def test_recommend_never_returns_history_when_scores_are_minus_inf_or_nan(
    int8_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """History was excluded by scoring it -inf, so a k-th score of -inf (or NaN) pulled
    history items back in: [4, 0, 1] for history [0, 1]."""
    model = OnDeviceModel(int8_path)
    for fill, history, expected in ((-np.inf, [0, 1], [4, 2, 3]), (np.nan, [0, 2], [1, 4, 3])):
        scores = np.full(N_ITEMS, fill, dtype=np.float32)
        scores[[0, 1, 4]] = [9.0, 5.0, 1.0]
        if fill == -np.inf:
            scores[1] = 5.0
        monkeypatch.setattr(model, "_score_one", lambda h, s=scores: s.copy()[None, :])
        np.testing.assert_array_equal(model.recommend(np.array(history), k=3), expected)
        everything = model.recommend(np.array(history), k=N_ITEMS)
        assert len(everything) == N_ITEMS - 2 and not set(history) & set(everything.tolist())


def test_the_int8_gate_still_judges_a_catalog_no_longer_than_its_top_k(tmp_path: Path) -> None:
    """With k = the catalog size every model's top-k is the whole catalog, so the gate passed
    any int8 model; it now leaves one item out of the compared top."""
    small = StandInStudent(n_items=8, dim=16, max_len=5).eval()
    src = tmp_path / "small.onnx"
    export_onnx(small, src, model_version="1", catalog_fingerprint="f" * 16)
    report = quantize_onnx(
        src, tmp_path / "small.int8.onnx", config=QuantizeConfig(min_elements=(1,))
    )
    assert report.k == 7 and report.agreement is not None
    with pytest.raises(ConfigError, match="validation_histories is empty"):
        quantize_onnx(src, tmp_path / "x.onnx", validation_histories=[])


def test_prune_config_takes_a_numpy_sparsity_and_the_student_narrows_to_16() -> None:
    """np.float32(0.5) was refused as 'not a number'; a width not a multiple of 8 (20) never
    tried 16, so the student stayed over its budget."""
    from dataclasses import replace

    from shared.compression.prune import PruneConfig
    from shared.models.student import StudentConfig

    assert PruneConfig(sparsity=np.float32(0.5)).sparsity == 0.5  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sparsity must be a number"):
        PruneConfig(sparsity=True)
    wide = StudentConfig(dim=20, text_dim=8, id_dim=8)
    at_16 = replace(wide, dim=16).trainable_parameters()
    assert wide.scaled_to(at_16 * 10, max_ratio=0.1).dim == 16  # 20 itself is over budget


def test_the_torch_floor_takes_the_exporter_keyword_the_export_passes() -> None:
    """``torch.onnx.export(..., dynamo=False)`` (the TorchScript exporter, chosen on purpose)
    is a keyword torch 2.5 added: a floor below it installs a torch the export fails on."""
    import inspect

    from packaging.version import Version

    from shared.compression import onnx_export
    from tests.conftest import dependency_floor

    assert "dynamo=False" in inspect.getsource(onnx_export)
    assert Version(dependency_floor("torch")) >= Version("2.5")


# ------------------------------------------------------------------ published versions


def _built(data: bytes) -> StudentArtifact:
    """A model as :func:`publish_artifact_once` takes it (the bytes are all it reads)."""
    return StudentArtifact(int8=data, fp32_bytes=len(data), agreement=1.0, sparsity=0.0)


def _publish(out: Path, version: int, data: bytes) -> Path:
    path = out / artifact_file_name(version)
    publish_artifact_once(_built(data), ["a", "b"], path, version=str(version))
    return path


def _models(out: Path) -> list[str]:
    return [p.name for _, p in sorted(artifact_versions(out).items())]


def test_retention_keeps_the_newest_and_never_the_one_just_published(tmp_path: Path) -> None:
    """A server kept every model-vN.int8.onnx for ever: months of rounds filled its disk."""
    out = tmp_path / "artifacts"
    for version in range(1, 6):
        _publish(out, version, b"model %d" % version)
    removed = retire_old_artifacts(out, 2, latest=artifact_file_name(5))
    assert [p.name for p in removed] == [artifact_file_name(v) for v in (1, 2, 3)]
    assert _models(out) == [artifact_file_name(4), artifact_file_name(5)]
    assert (out / "catalog.json").exists() and len(published_digests(out)) == 5
    # a resumed run republishes its checkpoint's model under an older number than one on
    # disk (v5 from before a lost checkpoint): the one just published stays
    assert retire_old_artifacts(out, 1, latest=artifact_file_name(4)) == []
    assert _models(out) == [artifact_file_name(4), artifact_file_name(5)]
    assert [p.name for p in retire_old_artifacts(out, 1, latest=artifact_file_name(5))] == [
        artifact_file_name(4)
    ]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        retire_old_artifacts(out, 0, latest=artifact_file_name(5))


def test_a_removed_version_is_refused_with_another_model_and_taken_with_the_same(
    tmp_path: Path,
) -> None:
    """Once model-v1 was removed, nothing told that version 1 was out: a restarted or new
    run publishing another model as version 1 wrote it, and devices holding the first one
    took the two for the same model."""
    out = tmp_path / "artifacts"
    for version in (1, 2):
        _publish(out, version, b"model %d" % version)
    retire_old_artifacts(out, 1, latest=artifact_file_name(2))
    assert _models(out) == [artifact_file_name(2)]
    with pytest.raises(PublishedVersionError, match=r"version 1 is out already.*published\.jsonl"):
        _publish(out, 1, b"another model")
    assert _models(out) == [artifact_file_name(2)]  # a refusal writes nothing
    path = _publish(out, 1, b"model 1")  # the same model: accepted, as before
    assert path.read_bytes() == b"model 1"
    assert len((out / RECORD_FILE).read_text().splitlines()) == 2  # recorded once each


def test_a_model_published_before_the_record_is_recorded_at_the_first_publication(
    tmp_path: Path,
) -> None:
    """A state or run directory from before the record holds models without a line:
    removing one unrecorded would forget its version, and the record left out every version
    published before the upgrade."""
    out = tmp_path / "artifacts"
    out.mkdir()
    (out / artifact_file_name(1)).write_bytes(b"old model 1")  # no record yet
    _publish(out, 2, b"model 2")
    lines = [json.loads(line) for line in (out / RECORD_FILE).read_text().splitlines()]
    assert [(e["file"], e["version"]) for e in lines] == [
        (artifact_file_name(1), "1"),
        (artifact_file_name(2), "2"),
    ]
    retire_old_artifacts(out, 1, latest=artifact_file_name(2))
    assert _models(out) == [artifact_file_name(2)]
    assert published_digests(out)[artifact_file_name(1)] == sha256_hex(b"old model 1")
    with pytest.raises(PublishedVersionError, match="version 1 is out already"):
        _publish(out, 1, b"another model")


def test_the_record_survives_a_crash_in_the_middle_of_a_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The line comes before the model: a write that fails (a full disk) leaves no model,
    and a crash half way through a line leaves a torn line that is skipped (its model was
    never written) without losing the lines before it or the one after."""
    import shared.published

    out = tmp_path / "artifacts"
    _publish(out, 1, b"model 1")

    def disk_full(path: Path, line: str) -> None:
        raise OSError(28, "No space left on device", str(path))

    with monkeypatch.context() as patch:
        patch.setattr(shared.published, "append_line", disk_full)
        with pytest.raises(OSError, match="No space left"):
            _publish(out, 2, b"model 2")
    assert _models(out) == [artifact_file_name(1)]  # never published without its line
    with open(out / RECORD_FILE, "ab") as fh:  # killed in the middle of version 2's line
        fh.write(b'{"file": "model-v2.int8.onnx", "vers')
    assert list(published_digests(out)) == [artifact_file_name(1)]
    _publish(out, 2, b"model 2")
    _publish(out, 3, b"model 3")
    retire_old_artifacts(out, 1, latest=artifact_file_name(3))
    assert published_digests(out) == {
        artifact_file_name(v): sha256_hex(b"model %d" % v) for v in (1, 2, 3)
    }
    for version in (1, 2):
        with pytest.raises(PublishedVersionError, match=f"version {version} is out already"):
            _publish(out, version, b"another model")


def test_an_unreadable_record_publishes_and_removes_nothing(tmp_path: Path) -> None:
    """What is out cannot be told without the record: publishing or removing then could
    reuse a version. Not a refused version either (the simulation would then keep its
    final model unpublished, blaming another model)."""
    out = tmp_path / "artifacts"
    for version in (1, 2):
        _publish(out, version, b"model %d" % version)
    (out / RECORD_FILE).unlink()
    (out / RECORD_FILE).mkdir()  # unreadable as a file, whoever runs the test
    with pytest.raises(ModelFileError, match=r"published\.jsonl is unreadable") as refused:
        _publish(out, 3, b"model 3")
    assert not isinstance(refused.value, PublishedVersionError)
    assert retire_old_artifacts(out, 1, latest=artifact_file_name(2)) == []
    assert _models(out) == [artifact_file_name(1), artifact_file_name(2)]


def _load_models_in_a_fresh_process(home: str) -> subprocess.CompletedProcess[str]:
    """Load ONNX models (ort_max_opset: a session per opset tried) in a new process whose
    home folder is ``home`` and whose environment does not mention ONNX Runtime's
    telemetry."""
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    code = "from shared.ondevice import ort_max_opset; assert ort_max_opset() >= 17"
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "HOME": home},
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_onnx_runtime_keeps_no_device_id_and_prints_no_telemetry_warning(tmp_path: Path) -> None:
    """onnxruntime 1.32's Linux wheel sends usage events to Microsoft and keeps a device
    identifier in ~/.cache/Microsoft/DeveloperTools/.onnxruntime; with a home folder it
    cannot write, every command that loads a model printed "Failed to persist telemetry
    device ID". The project turns that telemetry off (ORT_DISABLE_TELEMETRY, set when
    ``shared`` is imported)."""
    proc = _load_models_in_a_fresh_process(str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.rglob("*")) == []
    assert "telemetry" not in proc.stderr.lower()
    if Path("/proc/self").is_dir():  # a home folder no one can write, even root
        unwritable = _load_models_in_a_fresh_process("/proc")
        assert unwritable.returncode == 0, unwritable.stderr
        assert "telemetry" not in unwritable.stderr.lower(), unwritable.stderr
