"""Item-text encoding: offline sentence embeddings (all-MiniLM-L6-v2 by default) with a cache.

See :mod:`shared.text.encoder` for the model, pooling and cache design.
"""

from shared.text.encoder import (
    BUNDLED_MODEL_PACKAGE,
    CACHE_DIR_ENV,
    EncoderConfig,
    ItemEncoder,
    bundled_model_dir,
    default_cache_dir,
    encode_items,
    model_cache_key,
    resolve_model_dir,
    text_key,
)

__all__ = [
    "BUNDLED_MODEL_PACKAGE",
    "CACHE_DIR_ENV",
    "EncoderConfig",
    "ItemEncoder",
    "bundled_model_dir",
    "default_cache_dir",
    "encode_items",
    "model_cache_key",
    "resolve_model_dir",
    "text_key",
]
