"""Which data and split a pretrained model was trained with, recorded where it travels.

``fedrec simulate`` writes it into its bundles, and every model published from them carries
it in its ONNX metadata, so ``fedrec evaluate model`` can test a deployment's model on the
users it never trained on (a deployment's published folder has no run config to read).
Standard library only: the device runtime reads it too.
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass

from shared.config import is_int
from shared.errors import ConfigError


@dataclass(frozen=True)
class DataProvenance:
    """The dataset (its registry key) and protocol split a model was pretrained with.

    Recorded by ``fedrec simulate`` in the bundles it writes and carried into every model
    published from them: evaluated on another split, the model would be tested on users it
    trained on (inflated figures), and a deployment's published folder has no run config
    that says which split it was."""

    dataset: str
    seed: int
    cold_user_fraction: float
    public_fraction: float
    #: The generated world's size (``synthetic`` only; its seed is ``seed``): the catalog
    #: check tells another item count, not another user count.
    synthetic_users: int | None = None
    synthetic_items: int | None = None
    #: The content hash of the data (``RecDataset.fingerprint()``): a changed copy of the same
    #: catalog (other ratings, other timestamps) splits into other users' tests, some of them
    #: what the model trained on, which the catalog check cannot tell. Older records lack it.
    data_fingerprint: str | None = None

    def __post_init__(self) -> None:
        name = self.dataset
        if not isinstance(name, str) or not name or any(c in name for c in "\n\r"):
            raise ConfigError(f"dataset must be a non-empty one-line key, got {self.dataset!r}")
        digest = self.data_fingerprint
        if digest is not None and (
            not isinstance(digest, str) or not digest or set(digest) - set(string.hexdigits)
        ):
            raise ConfigError(f"data_fingerprint must be a hex digest, got {digest!r}")
        if not is_int(self.seed):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        for size in ("synthetic_users", "synthetic_items"):
            value = getattr(self, size)
            if value is not None and (not is_int(value) or value < 1):
                raise ConfigError(f"{size} must be a positive integer, got {value!r}")
        for name in ("cold_user_fraction", "public_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))

    def to_json(self) -> str:
        """The compact JSON stored under :data:`META_TRAINED_ON` (sizes only when known)."""
        record = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(record, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_mapping(cls, values: object) -> DataProvenance:
        """Parse a stored record (a bundle's dict, a model's decoded JSON); a record of
        another shape raises :class:`ConfigError` naming what is wrong."""
        if not isinstance(values, dict):
            raise ConfigError(f"the training data record is not a mapping: {values!r}")
        try:
            return cls(**values)
        except TypeError as exc:  # a key missing or unknown
            raise ConfigError(f"the training data record has another layout: {exc}") from None
