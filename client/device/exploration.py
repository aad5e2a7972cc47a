"""The device's exploration policy: a :mod:`shared.bandits` policy behind the daemon's
:class:`~client.device.daemon.Reranker` interface.

What it adds to the policy itself:

* **Features from the model being served.** The policy needs item features (LinUCB's and
  Thompson's linear reward, MMR's similarity). The device computes them from the installed
  int8 model alone (:func:`shared.bandits.features.model_features`, once per model version),
  so no extra artifact has to be shipped or kept in sync with the catalog. The student's item
  representation is built from the LM text embedding, so these features carry the text
  knowledge.
* **A posterior that survives restarts.** After every slate and every feedback batch the
  policy's state (posterior, pending impressions, counters) is written to the encrypted store
  (one durable SQLite transaction), so a ``kill -9`` loses nothing acknowledged.
* **One posterior per global model version.** Features are derived from the model, so a
  posterior learned under one version's features means nothing under the next one: a new
  global model starts a fresh posterior and features (what was learned federatedly is in the
  model itself, and every click is an event of the history the few-shot adaptation fits), while a
  personal refit of the same global model keeps both, also across a restart (the features are
  stored with the posterior: recomputed from a personal model they would differ).
* **Feedback semantics.** An impression reported ``clicked`` is reward 1, ``shown`` (seen, not
  clicked) reward 0. Each impression is learned from once; a later report on the same
  impression is stored but ignored by the policy (the daemon does not pass it on; a direct
  :meth:`BanditReranker.observe` call logs it and counts it as ``rejected_not_shown``).
  Feedback names its recommendation, and the policy learns from that slate's impression of
  the item (the context it was shown in), also when the item is pending in several slates.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from collections.abc import Sequence
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt

from client.device.store import DeviceStore
from shared.bandits.features import model_features
from shared.bandits.policies import BanditConfig, Policy, make_policy
from shared.errors import ConfigError, ModelFileError
from shared.ondevice.runtime import ModelMetadata, OnDeviceModel

__all__ = ["FEATURES_KEY", "PENDING_PREFIX", "STATE_KEY", "BanditReranker"]

logger = logging.getLogger(__name__)

STATE_KEY = "exploration"
"""Key of the policy state in the store's encrypted key-value table."""
FEATURES_KEY = "exploration.features"
"""Key of the item features the posterior was learned under (see :meth:`BanditReranker._ready`)."""
PENDING_PREFIX = "exploration.pending."
"""Prefix of the keys of the pending impressions, one value each, by impression id."""

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.floating[Any]]


def _global_version(metadata: ModelMetadata) -> str:
    """The global model a served model was built on, and for which catalog: ``7@<catalog
    fingerprint>`` for ``7+personal``. A model for another catalog under the same label (a
    new federation's round 7) gets fresh features and posterior: the old ones had the old
    catalog's size, and every slate failed on them."""
    return f"{metadata.model_version.split('+', 1)[0]}@{metadata.catalog_fingerprint}"


class BanditReranker:
    """Re-ranks the daemon's candidates with the configured bandit policy (see module doc).

    Thread-safe: the API serves requests from several threads.
    """

    def __init__(self, config: BanditConfig, store: DeviceStore) -> None:
        if not isinstance(config, BanditConfig):
            raise ConfigError(f"expected a BanditConfig, got {type(config).__name__}")
        self.config = config
        self.store = store
        self.name = config.policy if config.mmr_lambda >= 1.0 else f"{config.policy}+mmr"
        self._lock = threading.Lock()
        self._model: OnDeviceModel | None = None
        self._model_version: str | None = None
        self._features: npt.NDArray[np.float64] | None = None
        self._features_unsaved = False
        self._policy: Policy | None = None
        # ids of the pending impressions the store holds for self._policy (None: unknown,
        # the next save rewrites them all)
        self._stored_pending: set[int] | None = None

    # -- the daemon's hooks ----------------------------------------------------------------------

    def on_model(self, model: OnDeviceModel | None) -> None:
        """The daemon now serves ``model`` (None: no model). Features are computed lazily.

        A personal refit of the same global model (``7+personal`` after ``7``, or refitted
        again) keeps the features and the posterior: the adapter changes how the user is
        read, not what the items are, and recomputed features (an SVD, signs fixed anew)
        would no longer match what the posterior learned."""
        with self._lock:
            version = None if model is None else _global_version(model.metadata)
            if model is self._model:
                return
            if version != self._model_version or self._model is None:
                self._features = None
            self._model = model
            if version != self._model_version:
                self._model_version, self._policy, self._stored_pending = version, None, None

    def rerank(
        self, candidates: IntArray, scores: FloatArray, k: int, slate_id: str | None = None
    ) -> Sequence[int]:
        """As :meth:`~client.device.daemon.LearningReranker.rerank`. A slate is shown only
        once it is saved: if that fails (a full disk), the policy is returned to its state
        before the slate and the error raised, so the daemon serves the model's order and
        the unshown slate leaves no impression that feedback could match (the bandit learns
        from the slates it chose and showed, so feedback on that list counts as not shown)."""
        with self._lock:
            policy, features = self._ready()
            undo = policy.checkpoint()
            try:
                slate = policy.select(
                    candidates,
                    scores,
                    features[candidates],
                    k,
                    diversity_embeddings=features[candidates],
                    tag=slate_id,
                )
                self._save(policy)
            except BaseException:
                policy.rollback(undo)
                # what a failed write left in the store is unknown: the next save rewrites
                # every pending impression rather than trust the old record
                self._stored_pending = None
                raise
        return [int(c) for c in slate]

    def observe(
        self,
        columns: Sequence[int],
        rewards: Sequence[float],
        slate_ids: Sequence[str | None] | None = None,
    ) -> int:
        """Learn from the outcome of shown items (model columns), each matched to its
        impression in the slate named by ``slate_ids`` (the recommendation id given to
        :meth:`rerank`); returns how many counted."""
        if not columns:
            return 0
        with self._lock:
            if self._model is None:
                return 0
            policy, _ = self._ready()
            tags = None if slate_ids is None else list(slate_ids)
            accepted = policy.update_many(list(columns), list(rewards), tags)
            self._save(policy)
        return accepted

    def awaiting(self, columns: Sequence[int], slate_ids: Sequence[str | None]) -> list[bool]:
        """For each shown column, whether its impression in the slate its id names still
        awaits feedback (stored feedback on it was never learned from, e.g. after a kill
        between the store's write and the posterior's)."""
        with self._lock:
            if self._model is None:
                return [False] * len(columns)
            policy, _ = self._ready()
            return [policy.awaits(c, s) for c, s in zip(columns, slate_ids, strict=True)]

    def reset(self) -> None:
        """Forget the posterior (the daemon's erase removed the stored state already)."""
        with self._lock:
            self._policy, self._stored_pending = None, None

    def state(self) -> dict[str, Any]:
        """The policy's persisted state for the current model (loaded or fresh)."""
        with self._lock:
            return self._ready()[0].state_dict()

    @property
    def feedback_counts(self) -> dict[str, int]:
        """Accepted / refused feedback by reason, for this model version."""
        with self._lock:
            return {} if self._policy is None else dict(self._policy.feedback_counts)

    # -- internals -------------------------------------------------------------------------------

    def _ready(self) -> tuple[Policy, npt.NDArray[np.float64]]:
        model = self._model
        if model is None:
            raise ModelFileError("the exploration policy has no model to re-rank for")
        if self._features is None:
            self._features = self._stored_features(model.n_items)
        if self._features is None:
            self._features = model_features(model.score, model.n_items, self.config.feature_dim)
            self._features_unsaved = True  # written with the posterior they go with
        if self._policy is None:
            self._policy = self._restore(model)
        return self._policy, self._features

    def _saved_for_this_model(self, saved: object) -> TypeGuard[dict[str, Any]]:
        """Whether a stored value (posterior or features) belongs to the global model served.

        One saved before the key named the catalog holds the bare label ("7"): still this
        model's (a catalog of another size fails the shape checks, and starts fresh). The
        features and the posterior learned under them are judged alike: recomputed features
        (from a personal refit served at the upgrade) no longer matched the posterior kept."""
        legacy = (self._model_version or "").split("@", 1)[0]
        return isinstance(saved, dict) and saved.get("model_version") in (
            self._model_version,
            legacy,
        )

    def _stored_features(self, n_items: int) -> npt.NDArray[np.float64] | None:
        """The features this global version's posterior was learned under, as first computed.

        After a restart the model served may be a personal refit, whose adapter changes the
        scores the features are read from: recomputed, they no longer matched the stored
        posterior, whose weights then applied to other columns."""
        saved = self.store.get_state(FEATURES_KEY)
        shape = [n_items, self.config.feature_dim]
        if not self._saved_for_this_model(saved):
            return None
        try:
            if saved.get("shape") != shape:
                raise ValueError(f"shape {saved.get('shape')} is not {shape}")
            data = base64.b64decode(str(saved["float64"]), validate=True)
            features = np.frombuffer(data, dtype="<f8").reshape(shape).astype(np.float64)
        except (KeyError, ValueError, binascii.Error) as exc:
            logger.warning("stored exploration features not reused (%s); recomputing", exc)
            return None
        return features

    def _restore(self, model: OnDeviceModel) -> Policy:
        """The stored policy of this model version (else a fresh one), exploring with fresh
        randomness: the config's seed would replay the same draws after every restart, and
        on every device."""
        policy = self._stored_policy(model)
        policy.rng = np.random.default_rng()
        return policy

    def _stored_policy(self, model: OnDeviceModel) -> Policy:
        self._stored_pending = None
        policy = make_policy(self.config, model.n_items)
        saved = self.store.get_state(STATE_KEY)
        if not self._saved_for_this_model(saved):
            return policy
        state = saved.get("policy")
        try:
            if isinstance(state, dict) and "pending" not in state:
                rows = self.store.states_with_prefix(PENDING_PREFIX)
                pending = {_impression_id(key): value for key, value in rows.items()}
                policy.load_state_dict(state, pending)
                self._stored_pending = set(pending)
            else:  # saved whole, as before impressions had records of their own
                policy.load_state_dict(state)  # type: ignore[arg-type]
        except ModelFileError as exc:
            logger.warning("stored exploration state not reused (%s); starting fresh", exc)
            return make_policy(self.config, model.n_items)
        return policy

    def _save(self, policy: Policy) -> None:
        """Write the posterior and the changes to the pending impressions since the last
        save, in one transaction: a slate adds its own impressions (and a full queue expires
        the oldest), feedback removes the ones it consumed, instead of rewriting all of them
        (up to ``max_pending``, about 400 kB at the default) on every request."""
        pending = policy.pending_ids()
        core = {"model_version": self._model_version, "policy": policy.state_dict(pending=False)}
        known = self._stored_pending
        added = policy.pending_entries(pending if known is None else pending - known)
        values = {STATE_KEY: core, **{_pending_key(i): e for i, e in added.items()}}
        if self._features_unsaved and self._features is not None:
            values[FEATURES_KEY] = {
                "model_version": self._model_version,
                "shape": list(self._features.shape),
                "float64": base64.b64encode(self._features.astype("<f8").tobytes()).decode(),
            }
        self.store.update_state(
            values,
            delete=[] if known is None else [_pending_key(i) for i in known - pending],
            delete_prefix=PENDING_PREFIX if known is None else None,
        )
        self._stored_pending = pending
        self._features_unsaved = False


def _pending_key(impression: int) -> str:
    return f"{PENDING_PREFIX}{impression:012d}"


def _impression_id(key: str) -> int:
    suffix = key[len(PENDING_PREFIX) :]
    if not suffix.isdigit():
        raise ModelFileError(f"bad pending impression key {key!r}")
    return int(suffix)
