"""Embedded synthetic world: the project's default dataset, with a known ground truth.

Why: MovieLens tells us *what* people watched, never *why*. A world whose latent causes we
know lets later stages measure what real data cannot: bandit regret against the true click
probability, whether the text encoder recovers item semantics, how fast a federated model
tracks drifting tastes. It needs no download, so every test and demo runs offline.

The generative story (all randomness from ``numpy.random.default_rng(config.seed)``, split
into independent child streams so, e.g., changing the text noise leaves sequences untouched):

* **Items** have latent factors ``v_i ~ N(0, I_k)``, a Zipf-like popularity bias
  ``b_i = -popularity_skew * log(rank_i)`` (centred), and a release time: most of the catalog
  exists at the start of the timeline, ``new_item_fraction`` of it is released later.
* **Categories** are the argmax of a fixed random projection of the factors (a close runner-up
  becomes a second genre). **Text** (title + genres + description) is composed from
  :data:`FACTOR_AXES`: every latent direction has descriptor words for its negative and its
  positive pole, and a factor contributes words with probability increasing with ``|v_ij|``.
  Topic phrases, story forms and title nouns are pure noise.
* **Users** have an initial interest ``a_u`` and a second interest ``c_u`` (unit vectors,
  ``c_u`` orthogonal to ``a_u``). Their taste at step ``t`` of their own sequence rotates from
  the first toward the second: ``taste_u(t) = cos(phi_t) a_u + sin(phi_t) c_u`` with
  ``phi_t = pi/2 * (1 - exp(-drift * t))``, evaluable in closed form at any ``t``.
* **Behaviour**: a user's sequence length is lognormal, timestamps are a Poisson-like process
  inside the user's active window, and at each step the user picks one released, not yet
  consumed item with probability ``softmax(temperature * taste_u(t) . v_i + b_i)``.
* **Ground truth for bandits**: ``true_preference = sigmoid(temperature * taste . v + b +
  preference_offset)``, the click probability of showing item ``i`` to user ``u``.

Example:
    >>> world = generate_world(SyntheticConfig(n_users=20, n_items=60, mean_interactions=8))
    >>> world.dataset.n_users, world.dataset.n_items
    (20, 60)
    >>> 0.0 <= world.true_preference(0, 3) <= 1.0
    True
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import overload

import numpy as np
import numpy.typing as npt

from shared.config import is_int
from shared.data.dataset import RecDataset, build_dataset
from shared.errors import ConfigError

__all__ = [
    "DATASET_NAME",
    "FACTOR_AXES",
    "GENRES",
    "START_EPOCH",
    "SyntheticConfig",
    "SyntheticWorld",
    "generate_world",
]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

DATASET_NAME = "synthetic"
MAX_WORLD_PAIRS = 100_000_000
"""The most users x items a world may have: generating it holds tables over every user and
item (each user's choice scores under both interests, the step's logits, what each has
consumed: about 42 bytes a pair, measured), so this keeps it to about 4 GB. Checked by
:class:`SyntheticConfig`, so a world size read from a file (a model's provenance) is
bounded too, not only a simulation's settings (:func:`check_world_size`)."""

#: Start of the timeline (2020-01-01T00:00:00Z); timestamps are Unix seconds like MovieLens.
START_EPOCH = 1_577_836_800
_DAY = 86_400

# fmt: off
#: One entry per latent direction: (descriptors of the negative pole, of the positive pole).
#: Words are unique across the whole table, so a word names exactly one direction and sign.
FACTOR_AXES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (
        ("lighthearted", "whimsical", "playful", "breezy", "sunny", "cheerful"),
        ("dark", "gritty", "bleak", "brooding", "grim", "menacing"),
    ),
    (
        ("slow-burning", "contemplative", "quiet", "meditative", "patient", "understated"),
        ("explosive", "breakneck", "action-packed", "relentless", "adrenaline-fueled",
         "pulse-pounding"),
    ),
    (
        ("family-friendly", "wholesome", "gentle", "heartwarming", "innocent", "tender"),
        ("violent", "brutal", "savage", "bloody", "ruthless", "vicious"),
    ),
    (
        ("grounded", "realistic", "true-to-life", "documentary-style", "naturalistic",
         "everyday"),
        ("fantastical", "magical", "otherworldly", "mythic", "enchanted", "dreamlike"),
    ),
    (
        ("cold", "detached", "clinical", "austere", "icy", "aloof"),
        ("romantic", "passionate", "sensual", "lovestruck", "swooning", "intimate"),
    ),
    (
        ("period", "historical", "old-fashioned", "vintage", "classical", "antique"),
        ("futuristic", "high-tech", "cybernetic", "interstellar", "dystopian", "space-age"),
    ),
    (
        ("serious", "solemn", "earnest", "sober", "weighty", "somber"),
        ("hilarious", "witty", "zany", "satirical", "goofy", "slapstick"),
    ),
    (
        ("predictable", "cozy", "comforting", "easygoing", "relaxed", "leisurely"),
        ("suspenseful", "tense", "twisty", "paranoid", "nail-biting", "enigmatic"),
    ),
    (
        ("small", "modest", "minimalist", "low-key", "scrappy", "homespun"),
        ("epic", "sweeping", "grand", "monumental", "spectacular", "lavish"),
    ),
    (
        ("silent", "wordless", "hushed", "muted", "soundless", "still"),
        ("musical", "rhythmic", "melodic", "tuneful", "operatic", "jazzy"),
    ),
    (
        ("simple", "straightforward", "popcorn", "lightweight", "uncomplicated", "fun"),
        ("cerebral", "philosophical", "intellectual", "thought-provoking", "complex",
         "layered"),
    ),
    (
        ("tragic", "mournful", "heartbreaking", "melancholy", "wistful", "doomed"),
        ("heroic", "triumphant", "uplifting", "inspiring", "hopeful", "rousing"),
    ),
    (
        ("rural", "pastoral", "frontier", "wild", "rugged", "dusty"),
        ("urban", "metropolitan", "neon-lit", "cosmopolitan", "street-level", "big-city"),
    ),
    (
        ("bright", "colorful", "vibrant", "sparkling", "glossy", "radiant"),
        ("eerie", "haunting", "creepy", "macabre", "spooky", "unsettling"),
    ),
    (
        ("mature", "world-weary", "seasoned", "elderly", "grown-up", "veteran"),
        ("youthful", "coming-of-age", "adolescent", "teenage", "school-age", "fresh-faced"),
    ),
    (
        ("raw", "rough-edged", "lo-fi", "unpolished", "handmade", "ramshackle"),
        ("stylish", "glamorous", "flashy", "sleek", "chic", "fashionable"),
    ),
)

#: Category names (MovieLens genres); the first ``n_categories`` are used.
GENRES: tuple[str, ...] = (
    "Drama", "Comedy", "Action", "Thriller", "Romance", "Adventure", "Crime", "Sci-Fi",
    "Horror", "Children's", "Fantasy", "Mystery", "Animation", "Musical", "War",
    "Documentary", "Western", "Film-Noir",
)

#: Noise vocabularies: they make the text read like a catalog entry but carry no signal.
TITLE_NOUNS: tuple[str, ...] = (
    "Horizon", "Letter", "Garden", "Machine", "River", "Promise", "Harbor", "Winter",
    "Signal", "Kingdom", "Stranger", "Lantern", "Summer", "Mirror", "Island", "Road",
    "Orchard", "Tower", "Voyage", "Secret", "Echo", "Frontier", "Bridge", "Storm",
    "Carnival", "Witness", "Orbit", "Sparrow", "Compass", "Legacy", "Harvest", "Shadow",
)
STORY_FORMS: tuple[str, ...] = (
    "story", "tale", "journey", "saga", "chronicle", "portrait", "adventure", "odyssey",
)
TOPICS: tuple[str, ...] = (
    "a small town", "two strangers", "an unlikely friendship", "a family secret",
    "a missing heir", "a long road home", "a broken promise", "a forgotten city",
    "a rivalry between brothers", "a stolen painting", "a last summer", "a retired detective",
    "a traveling circus", "a lighthouse keeper", "a reluctant leader", "an old debt",
    "a crew of misfits", "a second chance", "a distant planet", "a wedding gone wrong",
)
# fmt: on


def check_world_size(n_users: int, n_items: int, what: str = "synthetic users x items") -> None:
    """Refuse a world of more than :data:`MAX_WORLD_PAIRS` users x items (:class:`ConfigError`
    naming ``what``, the product and the memory it would take)."""
    pairs = n_users * n_items
    if pairs > MAX_WORLD_PAIRS:
        raise ConfigError(
            f"{what} must be at most {MAX_WORLD_PAIRS:,}, got {n_users:,} x {n_items:,} = "
            f"{pairs:,}: generating the world takes about 42 bytes a user and item (some "
            f"{pairs * 42 / 1e9:.0f} GB here); give fewer users or items"
        )


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if not is_int(value):
        raise ConfigError(f"synthetic.{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"synthetic.{name} must be {bound}, got {value}")


def _check_float(
    name: str,
    value: object,
    low: float,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"synthetic.{name} must be a number, got {value!r}")
    v = float(value)
    too_low = v <= low if low_open else v < low
    too_high = high is not None and (v >= high if high_open else v > high)
    if not math.isfinite(v) or too_low or too_high:
        lo = f"({low}" if low_open else f"[{low}"
        hi = "inf)" if high is None else (f"{high})" if high_open else f"{high}]")
        raise ConfigError(f"synthetic.{name} must be finite and in {lo}, {hi}, got {value!r}")


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic world; defaults look like MovieLens-style implicit feedback.

    The defaults (1,000 users, 600 items, ~40k interactions) keep a whole federated simulation
    to a few minutes on 2 CPUs. Every field is validated on construction
    (:class:`~shared.errors.ConfigError` names the field and the allowed range).

    Attributes:
        seed: root seed; the world is a pure function of the config.
        n_users: number of users (each gets at least ``min_interactions`` interactions).
        n_items: catalog size.
        n_factors: latent dimension, at most ``len(FACTOR_AXES)`` (one vocabulary per axis).
        n_categories: number of genres, at most ``len(GENRES)``.
        mean_interactions: mean of the lognormal per-user sequence length (before clipping).
        length_sigma: log-scale spread of sequence lengths (0 = every user the same length).
        min_interactions: shortest sequence (MovieLens keeps users with >= 20; 5 leaves room
            for few-shot splits).
        max_interactions: longest sequence; ``None`` (default) = half the launch catalog.
            It must fit in the launch catalog so a user never runs out of released, unseen
            items (see :attr:`max_length`).
        popularity_skew: Zipf exponent of the popularity prior: with tastes switched off, the
            item of popularity rank ``r`` is picked with probability ``∝ r^-popularity_skew``.
        drift: rate at which a user's taste rotates from the first interest to the second,
            per step of their own sequence (``phi_t = pi/2 (1 - exp(-drift t))``; 0 = static).
        new_item_fraction: share of the catalog released during the timeline, not at launch.
        temperature: sharpness of the taste term of the choice logit (higher = users follow
            their taste more and popularity less).
        preference_offset: intercept of the click model ``sigmoid(logit + offset)``; sets the
            base click rate seen by bandits (-2 gives a mean of ~0.29 on the default world).
        text_noise: probability that a descriptor word in an item's text is drawn uniformly
            from the whole descriptor vocabulary instead of from the item's factors.
        n_descriptors: descriptor words per item description (the title adds one more).
        horizon_days: length of the timeline that users and releases live on.
    """

    seed: int = 42
    n_users: int = 1000
    n_items: int = 600
    n_factors: int = 8
    n_categories: int = 12
    mean_interactions: float = 40.0
    length_sigma: float = 0.8
    min_interactions: int = 5
    max_interactions: int | None = None
    popularity_skew: float = 1.5
    drift: float = 0.02
    new_item_fraction: float = 0.2
    temperature: float = 3.0
    preference_offset: float = -2.0
    text_noise: float = 0.2
    n_descriptors: int = 6
    horizon_days: int = 730

    def __post_init__(self) -> None:
        _check_int("seed", self.seed, 0)
        _check_int("n_users", self.n_users, 1)
        _check_int("n_items", self.n_items, 2)
        check_world_size(self.n_users, self.n_items)
        _check_int("n_factors", self.n_factors, 1, len(FACTOR_AXES))
        _check_int("n_categories", self.n_categories, 1, len(GENRES))
        _check_float("mean_interactions", self.mean_interactions, 0.0, low_open=True)
        _check_float("length_sigma", self.length_sigma, 0.0, 3.0)
        _check_int("min_interactions", self.min_interactions, 1)
        if self.max_interactions is not None:
            _check_int("max_interactions", self.max_interactions, 1)
        _check_float("popularity_skew", self.popularity_skew, 0.0, 5.0)
        _check_float("drift", self.drift, 0.0, 10.0)
        _check_float("new_item_fraction", self.new_item_fraction, 0.0, 1.0, high_open=True)
        _check_float("temperature", self.temperature, 0.0, 100.0, low_open=True)
        _check_float("preference_offset", self.preference_offset, -20.0, 20.0)
        _check_float("text_noise", self.text_noise, 0.0, 1.0)
        _check_int("n_descriptors", self.n_descriptors, 2, 12)
        _check_int("horizon_days", self.horizon_days, 1)
        if self.min_interactions > self.max_length:
            if self.max_interactions is None:  # the catalog is too small (--synthetic-items)
                raise ConfigError(
                    f"a synthetic world of {self.n_items} items is too small: each user needs "
                    f"{self.min_interactions} interactions among half of the "
                    f"{self.n_launch_items} items released at launch; give at least "
                    f"{self._items_for(2 * self.min_interactions)} items (--synthetic-items)"
                )
            raise ConfigError(
                f"synthetic.min_interactions ({self.min_interactions}) must not exceed "
                f"max_interactions ({self.max_length})"
            )
        if self.n_launch_items < self.max_length:
            raise ConfigError(
                f"synthetic.max_interactions ({self.max_length}) exceeds the "
                f"{self.n_launch_items} items released at launch (n_items={self.n_items}, "
                f"new_item_fraction={self.new_item_fraction}); lower max_interactions or "
                "new_item_fraction, or raise n_items"
            )

    @property
    def max_length(self) -> int:
        """Effective longest sequence: ``max_interactions`` or half the launch catalog."""
        if self.max_interactions is not None:
            return self.max_interactions
        return max(1, self.n_launch_items // 2)

    @property
    def n_new_items(self) -> int:
        """Items released during the timeline rather than at launch."""
        return round(self.new_item_fraction * self.n_items)

    @property
    def n_launch_items(self) -> int:
        """Items available from the first second of the timeline."""
        return self.n_items - self.n_new_items

    def _items_for(self, launch: int) -> int:
        """The smallest catalog with at least ``launch`` items released at launch."""
        n = launch
        while n - round(self.new_item_fraction * n) < launch:  # as n_launch_items counts
            n += 1
        return n

    def as_dict(self) -> dict[str, int | float | None]:
        """Plain dict (for logs and run manifests)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _sigmoid(x: FloatArray) -> FloatArray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)), dtype=np.float64)


@dataclass(frozen=True, eq=False, repr=False)
class SyntheticWorld:
    """A generated world: the dataset plus the latent truth that produced it.

    All arrays are indexed by the dataset's dense ids (user ``u`` is ``dataset.user_ids[u]``,
    item ``i`` is ``dataset.item_ids[i]``). Treat them as read-only.

    Attributes:
        config: the config it was generated from.
        dataset: the interactions and item text, as every loader returns them.
        latent_items: item factors, ``(n_items, n_factors)``.
        popularity_bias: additive logit bias per item (centred Zipf log-rank).
        item_release: Unix second at which each item becomes available.
        item_category: index into :data:`GENRES` of each item's primary genre.
        initial_tastes: unit taste ``a_u`` at step 0, ``(n_users, n_factors)``.
        second_tastes: unit interest ``c_u`` (orthogonal to ``a_u``) that tastes rotate toward.
        sequence_lengths: number of interactions of each user.
    """

    config: SyntheticConfig
    dataset: RecDataset
    latent_items: FloatArray
    popularity_bias: FloatArray
    item_release: IntArray
    item_category: IntArray
    initial_tastes: FloatArray
    second_tastes: FloatArray
    sequence_lengths: IntArray

    def __repr__(self) -> str:
        ds = self.dataset
        return (
            f"SyntheticWorld(seed={self.config.seed}, users={ds.n_users}, items={ds.n_items}, "
            f"interactions={ds.n_interactions}, factors={self.config.n_factors})"
        )

    @property
    def item_factors(self) -> FloatArray:
        """Latent item factors ``(n_items, n_factors)``: the semantics the text describes."""
        return self.latent_items

    @property
    def n_users(self) -> int:
        return int(self.initial_tastes.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.latent_items.shape[0])

    def drift_angle(self, t: int | IntArray) -> FloatArray:
        """Rotation angle (radians) from the first interest toward the second at step ``t``."""
        steps = np.asarray(t, dtype=np.float64)
        return np.asarray(
            0.5 * np.pi * (1.0 - np.exp(-self.config.drift * steps)), dtype=np.float64
        )

    def user_taste(self, user: int, t: int | None = None) -> FloatArray:
        """Unit taste vector of dense ``user`` at step ``t`` of their sequence.

        ``t`` counts the user's own interactions: ``sequences[user][t]`` was chosen with
        ``user_taste(user, t)`` (0 = before the first interaction). The default is
        ``len(sequence)``, the state right after their last observed interaction, i.e. what
        they would want next. Steps beyond the sequence extrapolate the same drift.
        """
        u = self._check_user(user)
        step = int(self.sequence_lengths[u]) if t is None else int(t)
        if step < 0:
            raise ValueError(f"step t must be >= 0, got {t}")
        phi = float(self.drift_angle(step))
        return np.asarray(
            math.cos(phi) * self.initial_tastes[u] + math.sin(phi) * self.second_tastes[u],
            dtype=np.float64,
        )

    def end_tastes(self, users: IntArray | None = None) -> FloatArray:
        """Tastes of ``users`` (default all) at the end of their sequences, ``(len, k)``."""
        idx = (
            np.arange(self.n_users, dtype=np.int64)
            if users is None
            else np.asarray(users, dtype=np.int64)
        )
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_users):
            raise IndexError(f"user ids must be in [0, {self.n_users}), got {idx}")
        phi = self.drift_angle(self.sequence_lengths[idx])[:, None]
        return np.asarray(
            np.cos(phi) * self.initial_tastes[idx] + np.sin(phi) * self.second_tastes[idx],
            dtype=np.float64,
        )

    def choice_logits(self, user: int, t: int | None = None) -> FloatArray:
        """Choice-model logits over all items: ``temperature * taste . v + popularity_bias``."""
        taste = self.user_taste(user, t)
        return np.asarray(
            self.config.temperature * (self.latent_items @ taste) + self.popularity_bias,
            dtype=np.float64,
        )

    @overload
    def true_preference(self, user: int, item: int, t: int | None = None) -> float: ...

    @overload
    def true_preference(self, user: int, item: IntArray, t: int | None = None) -> FloatArray: ...

    def true_preference(
        self, user: int, item: int | IntArray, t: int | None = None
    ) -> float | FloatArray:
        """Ground-truth expected reward (click probability, in ``[0, 1]``) of showing ``item``.

        ``sigmoid(temperature * taste_u(t) . v_i + b_i + preference_offset)`` for dense
        ``user`` and dense item id(s); ``t`` as in :meth:`user_taste` (default: end of the
        user's sequence). Release times are ignored: this is utility, not availability.
        """
        scalar = np.ndim(item) == 0
        idx = np.atleast_1d(np.asarray(item, dtype=np.int64))
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_items):
            raise IndexError(f"item ids must be in [0, {self.n_items}), got {item}")
        taste = self.user_taste(user, t)
        logit = (
            self.config.temperature * (self.latent_items[idx] @ taste)
            + self.popularity_bias[idx]
            + self.config.preference_offset
        )
        pref = _sigmoid(logit)
        return float(pref[0]) if scalar else pref

    def preference_matrix(self, users: IntArray | None = None) -> FloatArray:
        """True preference of ``users`` (default all) for every item, ``(users, items)``.

        Uses each user's end-of-sequence taste, like :meth:`true_preference` with ``t=None``.
        """
        tastes = self.end_tastes(users)
        logits = (
            self.config.temperature * (tastes @ self.latent_items.T)
            + self.popularity_bias[None, :]
            + self.config.preference_offset
        )
        return _sigmoid(logits)

    def sample_click(
        self, user: int, item: int, rng: np.random.Generator, t: int | None = None
    ) -> bool:
        """One Bernoulli click with probability :meth:`true_preference` (for bandit runs)."""
        return bool(rng.random() < self.true_preference(user, int(item), t))

    def _check_user(self, user: int) -> int:
        u = int(user)
        if not 0 <= u < self.n_users:
            raise IndexError(f"user id must be in [0, {self.n_users}), got {user}")
        return u


def generate_world(config: SyntheticConfig | None = None) -> SyntheticWorld:
    """Generate the world for ``config`` (default :class:`SyntheticConfig`); deterministic.

    Not memoised: every call returns fresh arrays, so callers may not corrupt each other. The
    default config takes about a second; keep the returned world if you need it twice.
    """
    cfg = SyntheticConfig() if config is None else config
    if not isinstance(cfg, SyntheticConfig):
        raise ConfigError(f"expected a SyntheticConfig, got {type(cfg).__name__}")
    item_rng, user_rng, time_rng, choice_rng, text_rng = np.random.default_rng(cfg.seed).spawn(5)

    factors, bias, release, category, genres = _make_items(cfg, item_rng)
    initial, second = _make_tastes(cfg, user_rng)
    lengths, stamps = _make_timeline(cfg, time_rng)
    items = _simulate_choices(
        cfg, choice_rng, factors, bias, release, initial, second, lengths, stamps
    )
    titles, texts = _make_text(cfg, text_rng, factors, release, genres)

    width = max(4, len(str(cfg.n_users)), len(str(cfg.n_items)))
    user_ids = [f"u{u + 1:0{width}d}" for u in range(cfg.n_users)]
    item_ids = [f"i{i + 1:0{width}d}" for i in range(cfg.n_items)]
    user_col = np.repeat(np.asarray(user_ids), lengths)
    item_col = np.asarray(item_ids)[items]
    dataset = build_dataset(
        DATASET_NAME,
        user_col,
        item_col,
        stamps,
        item_ids=item_ids,
        item_text=texts,
        item_titles=titles,
        item_categories=genres,
    )
    return SyntheticWorld(
        config=cfg,
        dataset=dataset,
        latent_items=factors,
        popularity_bias=bias,
        item_release=release,
        item_category=category,
        initial_tastes=initial,
        second_tastes=second,
        sequence_lengths=lengths,
    )


def _make_items(
    cfg: SyntheticConfig, rng: np.random.Generator
) -> tuple[FloatArray, FloatArray, IntArray, IntArray, list[list[str]]]:
    """Latent factors, popularity bias, release times and genres of every item."""
    n, k = cfg.n_items, cfg.n_factors
    factors = rng.standard_normal((n, k))
    rank = rng.permutation(n) + 1  # 1 = most popular
    bias = -cfg.popularity_skew * np.log(rank.astype(np.float64))
    bias -= bias.mean()

    release = np.full(n, START_EPOCH, dtype=np.int64)
    horizon = cfg.horizon_days * _DAY
    new = rng.choice(n, size=cfg.n_new_items, replace=False)
    release[new] = START_EPOCH + rng.uniform(0.05 * horizon, 0.9 * horizon, size=new.size).astype(
        np.int64
    )

    projection = rng.standard_normal((k, cfg.n_categories))
    scores = factors @ projection
    order = np.argsort(-scores, axis=1, kind="stable")
    category = order[:, 0].astype(np.int64)
    genres: list[list[str]] = []
    if cfg.n_categories > 1:
        gap = scores[np.arange(n), order[:, 0]] - scores[np.arange(n), order[:, 1]]
        second = gap < np.median(gap)  # a close runner-up is a second genre (~half of items)
    else:
        second = np.zeros(n, dtype=bool)
    for i in range(n):
        names = [GENRES[order[i, 0]]]
        if second[i]:
            names.append(GENRES[order[i, 1]])
        genres.append(names)
    return factors, bias, release, category, genres


def _make_tastes(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[FloatArray, FloatArray]:
    """Unit first interests and unit second interests orthogonal to them."""
    first = rng.standard_normal((cfg.n_users, cfg.n_factors))
    first /= np.linalg.norm(first, axis=1, keepdims=True)
    other = rng.standard_normal((cfg.n_users, cfg.n_factors))
    if cfg.n_factors == 1:  # no orthogonal direction: the second interest is the opposite one
        return first, -first
    other -= np.sum(other * first, axis=1, keepdims=True) * first
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    return first, other


def _make_timeline(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[IntArray, IntArray]:
    """Sequence lengths and the flat, per-user strictly increasing timestamps (user-major)."""
    mu = math.log(cfg.mean_interactions) - 0.5 * cfg.length_sigma**2
    raw = rng.lognormal(mu, cfg.length_sigma, size=cfg.n_users)
    lengths = np.clip(np.rint(raw), cfg.min_interactions, cfg.max_length).astype(np.int64)

    horizon = cfg.horizon_days * _DAY
    start = rng.uniform(0.0, 0.7 * horizon, size=cfg.n_users)
    span = (horizon - start) * rng.uniform(0.1, 1.0, size=cfg.n_users)
    owner = np.repeat(np.arange(cfg.n_users), lengths)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    frac = rng.random(int(offsets[-1]))
    # sort the uniform draws inside each user's block: order statistics = Poisson-like arrivals
    frac = frac[np.lexsort((frac, owner))]
    stamps = np.floor(START_EPOCH + start[owner] + frac * span[owner]).astype(np.int64)
    # strictly increasing within a user (ties would make "the next step" ambiguous)
    pos = np.arange(stamps.size) - offsets[owner]
    shifted = stamps - pos
    for u in range(cfg.n_users):
        lo, hi = offsets[u], offsets[u + 1]
        shifted[lo:hi] = np.maximum.accumulate(shifted[lo:hi])
    return lengths, shifted + pos


def _simulate_choices(
    cfg: SyntheticConfig,
    rng: np.random.Generator,
    factors: FloatArray,
    bias: FloatArray,
    release: IntArray,
    initial: FloatArray,
    second: FloatArray,
    lengths: IntArray,
    stamps: IntArray,
) -> IntArray:
    """Run the choice model step by step, all active users at once.

    Each step draws one item per active user from the masked softmax by inverse-CDF sampling
    (one uniform per user instead of one Gumbel per user-item pair: faster, same law).
    """
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    consumed = np.zeros((cfg.n_users, cfg.n_items), dtype=bool)
    chosen = np.empty(int(offsets[-1]), dtype=np.int64)
    # taste . v is linear in the taste, so both interests' scores are computed once
    first_scores = cfg.temperature * (initial @ factors.T)
    second_scores = cfg.temperature * (second @ factors.T)
    for step in range(int(lengths.max())):
        active = np.flatnonzero(lengths > step)
        phi = 0.5 * np.pi * (1.0 - math.exp(-cfg.drift * step))
        logits = math.cos(phi) * first_scores[active]
        logits += math.sin(phi) * second_scores[active]
        logits += bias[None, :]
        now = stamps[offsets[active] + step]
        blocked = consumed[active]
        blocked |= release[None, :] > now[:, None]
        np.putmask(logits, blocked, -np.inf)
        logits -= logits.max(axis=1, keepdims=True)  # every row has an available item
        # float64 on purpose: a float32 CDF would make picks depend on the CPU's exp()
        cdf = np.cumsum(np.exp(logits, out=logits), axis=1, out=logits)
        total = cdf[:, -1]
        u = np.minimum(rng.random(active.size) * total, np.nextafter(total, 0.0))
        pick = (cdf <= u[:, None]).sum(axis=1)  # first index whose cdf exceeds u
        consumed[active, pick] = True
        chosen[offsets[active] + step] = pick
    return chosen


def _article(word: str) -> str:
    return "An" if word[0].lower() in "aeiou" else "A"


def _make_text(
    cfg: SyntheticConfig,
    rng: np.random.Generator,
    factors: FloatArray,
    release: IntArray,
    genres: list[list[str]],
) -> tuple[list[str], list[str]]:
    """Titles and full texts whose descriptor words reflect each item's latent factors."""
    k = cfg.n_factors
    axes = FACTOR_AXES[:k]
    all_words = [w for axis in axes for pole in axis for w in pole]
    titles: list[str] = []
    texts: list[str] = []
    launch_year = 1970 + np.arange(50)  # back-catalog items get an old year (noise)
    for i in range(cfg.n_items):
        v = factors[i]
        mag = np.abs(v)
        weight = np.exp(1.5 * mag)
        weight /= weight.sum()
        words: list[str] = []
        for _ in range(cfg.n_descriptors):
            if rng.random() < cfg.text_noise:
                pool: tuple[str, ...] | list[str] = all_words
            else:
                j = int(rng.choice(k, p=weight))
                pool = axes[j][int(v[j] > 0)]
            fresh = [w for w in pool if w not in words]
            if fresh:
                words.append(fresh[int(rng.integers(len(fresh)))])
        strongest = int(np.argmax(mag))
        pole = axes[strongest][int(v[strongest] > 0)]
        adjective = pole[int(rng.integers(len(pole)))]
        noun = TITLE_NOUNS[int(rng.integers(len(TITLE_NOUNS)))]
        if release[i] == START_EPOCH:
            year = int(launch_year[int(rng.integers(launch_year.size))])
        else:
            year = 2020 + int((release[i] - START_EPOCH) // (365 * _DAY))
        template = int(rng.integers(4))
        if template == 0:
            name = f"The {adjective.title()} {noun}"
        elif template == 1:
            name = f"{adjective.title()} {noun}"
        elif template == 2:
            name = f"{_article(adjective)} {adjective.title()} {noun}"
        else:
            other = TITLE_NOUNS[int(rng.integers(len(TITLE_NOUNS)))]
            name = f"The {other} and the {adjective.title()} {noun}"
        title = f"{name} ({year})"
        form = STORY_FORMS[int(rng.integers(len(STORY_FORMS)))]
        topic = TOPICS[int(rng.integers(len(TOPICS)))]
        description = f"{_article(words[0])} {words[0]}, {words[1]} {form} about {topic}."
        rest = words[2:]
        if rest:
            tail = (
                rest[0].capitalize()
                if len(rest) == 1
                else (f"{rest[0].capitalize()} and {rest[1]}")
            )
            if len(rest) > 2:
                tail += f", with {', '.join(rest[2:])} moments"
            description += f" {tail}."
        titles.append(title)
        texts.append(f"{title}. Genres: {', '.join(genres[i])}. {description}")
    return titles, texts
