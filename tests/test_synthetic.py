"""Tests for the embedded synthetic world (``shared.data.synthetic``).

They check the properties later stages rely on: determinism, valid chronological sequences,
MovieLens-like popularity skew, taste drift, item releases, a sane ground truth, and item
text that really describes the latent item factors.
"""

from __future__ import annotations

import dataclasses
import doctest
import re

import numpy as np
import pytest

import shared.data.synthetic as synthetic
from shared.data.synthetic import (
    FACTOR_AXES,
    GENRES,
    START_EPOCH,
    SyntheticConfig,
    SyntheticWorld,
    generate_world,
)
from shared.errors import ConfigError

SMALL = SyntheticConfig(
    seed=7, n_users=150, n_items=240, mean_interactions=20.0, max_interactions=120
)


@pytest.fixture(scope="module")
def small() -> SyntheticWorld:
    return generate_world(SMALL)


@pytest.fixture(scope="module")
def default_world() -> SyntheticWorld:
    return generate_world()


def _item_counts(world: SyntheticWorld) -> np.ndarray:
    return np.bincount(np.concatenate(world.dataset.sequences), minlength=world.n_items)


# --- determinism -------------------------------------------------------------------------


def test_same_seed_gives_identical_world(small: SyntheticWorld) -> None:
    again = generate_world(SMALL)
    assert again.dataset.fingerprint() == small.dataset.fingerprint()
    for a, b in zip(again.dataset.sequences, small.dataset.sequences, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(again.dataset.timestamps, small.dataset.timestamps, strict=True):
        np.testing.assert_array_equal(a, b)
    assert again.dataset.item_text == small.dataset.item_text
    assert again.dataset.item_titles == small.dataset.item_titles
    np.testing.assert_array_equal(again.item_factors, small.item_factors)
    np.testing.assert_array_equal(again.initial_tastes, small.initial_tastes)


def test_different_seed_gives_different_world(small: SyntheticWorld) -> None:
    other = generate_world(dataclasses.replace(SMALL, seed=8))
    assert other.dataset.fingerprint() != small.dataset.fingerprint()
    assert other.dataset.item_text != small.dataset.item_text
    assert not np.array_equal(other.item_factors, small.item_factors)


def test_generation_does_not_touch_global_rng() -> None:
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    generate_world(
        SyntheticConfig(n_users=10, n_items=30, mean_interactions=5.0, max_interactions=20)
    )
    assert np.random.random() == expected


# --- dataset shape and validity ----------------------------------------------------------


def test_sequences_are_chronological_and_valid(small: SyntheticWorld) -> None:
    ds = small.dataset
    cfg = small.config
    assert ds.name == "synthetic"
    assert ds.n_users == cfg.n_users and ds.n_items == cfg.n_items
    assert ds.user_ids[0] == "u0001" and ds.item_ids[0] == "i0001"
    assert ds.user_ids == sorted(ds.user_ids) and ds.item_ids == sorted(ds.item_ids)
    assert len(ds.item_titles) == len(ds.item_categories) == ds.n_items
    np.testing.assert_array_equal(small.sequence_lengths, [len(s) for s in ds.sequences])
    for seq, ts in zip(ds.sequences, ds.timestamps, strict=True):
        assert cfg.min_interactions <= len(seq) <= cfg.max_length
        assert len(seq) == len(ts)
        assert seq.min() >= 0 and seq.max() < ds.n_items
        assert len(np.unique(seq)) == len(seq), "an item is consumed at most once per user"
        assert np.all(np.diff(ts) > 0), "timestamps strictly increase within a user"
        assert ts[0] >= START_EPOCH
        assert ts[-1] <= START_EPOCH + cfg.horizon_days * 86_400 + len(seq)


def test_sequence_lengths_vary(default_world: SyntheticWorld) -> None:
    lengths = default_world.sequence_lengths
    assert lengths.min() == default_world.config.min_interactions
    assert lengths.max() > 4 * np.median(lengths), "lognormal lengths have a long right tail"
    assert abs(lengths.mean() - default_world.config.mean_interactions) < 5


def test_text_format_and_categories(small: SyntheticWorld) -> None:
    ds = small.dataset
    allowed = set(GENRES[: small.config.n_categories])
    for i, text in enumerate(ds.item_text):
        cats = ds.item_categories[i]
        assert 1 <= len(cats) <= 2 and set(cats) <= allowed
        assert cats[0] == GENRES[small.item_category[i]]
        assert text.startswith(f"{ds.item_titles[i]}. Genres: {', '.join(cats)}. ")
        assert re.search(r"\(\d{4}\)$", ds.item_titles[i])
    assert len(set(ds.item_titles)) > 0.8 * ds.n_items, "titles are mostly distinct"


def test_factor_vocabulary_words_are_unique() -> None:
    words = [w for axis in FACTOR_AXES for pole in axis for w in pole]
    assert len(words) == len(set(words))
    assert len(GENRES) == len(set(GENRES))


# --- popularity, releases, drift ---------------------------------------------------------


def test_popularity_skew_with_long_tail(default_world: SyntheticWorld) -> None:
    counts = np.sort(_item_counts(default_world))[::-1]
    total = counts.sum()
    top = counts[: len(counts) // 10].sum() / total
    bottom_half = counts[len(counts) // 2 :].sum() / total
    assert top > 0.3, f"top 10% of items get only {top:.2f} of interactions"
    assert bottom_half < 0.2, f"bottom half of items get {bottom_half:.2f} of interactions"
    assert counts[0] > 10 * np.median(counts)


def test_new_items_appear_only_after_release(default_world: SyntheticWorld) -> None:
    ds = default_world.dataset
    release = default_world.item_release
    late = release > START_EPOCH
    assert late.sum() == default_world.config.n_new_items
    for seq, ts in zip(ds.sequences, ds.timestamps, strict=True):
        assert np.all(ts >= release[seq])
    consumed_late = _item_counts(default_world)[late]
    assert (consumed_late > 0).mean() > 0.9, "released items do get consumed"


def _early_late_similarity(world: SyntheticWorld, min_len: int = 40) -> float:
    """Mean cosine between the average latent factors of a user's first and last quarter."""
    sims = []
    v = world.item_factors
    for seq in world.dataset.sequences:
        if len(seq) < min_len:
            continue
        q = len(seq) // 4
        a, b = v[seq[:q]].mean(0), v[seq[-q:]].mean(0)
        sims.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert len(sims) >= 20
    return float(np.mean(sims))


def test_drift_moves_tastes_and_behaviour() -> None:
    base = SyntheticConfig(
        seed=3, n_users=300, n_items=400, mean_interactions=50.0, max_interactions=200
    )
    drifting = generate_world(dataclasses.replace(base, drift=0.05))
    static = generate_world(dataclasses.replace(base, drift=0.0))
    # latent tastes: static users never move, drifting ones rotate toward the second interest
    for u in range(10):
        assert static.user_taste(u, 0) @ static.user_taste(u) == pytest.approx(1.0)
        end = drifting.user_taste(u)
        assert np.linalg.norm(end) == pytest.approx(1.0)
        assert drifting.user_taste(u, 0) @ end < 0.95
    # behaviour: early and late picks are less alike when tastes drift
    sim_drift = _early_late_similarity(drifting)
    sim_static = _early_late_similarity(static)
    assert sim_drift < sim_static - 0.2, (sim_drift, sim_static)


# --- ground truth ------------------------------------------------------------------------


def test_true_preference_range_and_types(small: SyntheticWorld) -> None:
    p = small.true_preference(0, 5)
    assert isinstance(p, float) and 0.0 <= p <= 1.0
    items = np.arange(small.n_items)
    arr = small.true_preference(3, items, t=0)
    assert arr.shape == (small.n_items,)
    assert np.all((arr >= 0.0) & (arr <= 1.0))
    assert arr.std() > 0.05, "preferences discriminate between items"
    matrix = small.preference_matrix()
    assert matrix.shape == (small.n_users, small.n_items)
    assert np.all((matrix >= 0.0) & (matrix <= 1.0))
    users = np.array([0, 4, 9])
    np.testing.assert_allclose(small.preference_matrix(users), matrix[users])
    np.testing.assert_allclose(matrix[4], small.true_preference(4, items))
    with pytest.raises(IndexError):
        small.true_preference(small.n_users, 0)
    with pytest.raises(IndexError):
        small.true_preference(0, small.n_items)


def test_picked_items_are_preferred(small: SyntheticWorld) -> None:
    rng = np.random.default_rng(0)
    picked, random_ = [], []
    for u, seq in enumerate(small.dataset.sequences):
        for t, item in enumerate(seq):
            picked.append(small.true_preference(u, int(item), t))
            random_.append(small.true_preference(u, int(rng.integers(small.n_items)), t))
    assert np.mean(picked) > np.mean(random_) + 0.2, (np.mean(picked), np.mean(random_))
    # the end-of-sequence state still favours what the user consumed
    end_picked = np.mean(
        [small.true_preference(u, s).mean() for u, s in enumerate(small.dataset.sequences)]
    )
    assert end_picked > small.preference_matrix().mean()


def test_sample_click_is_bernoulli_of_true_preference(small: SyntheticWorld) -> None:
    p = small.true_preference(2, 11)
    clicks = [small.sample_click(2, 11, np.random.default_rng(s)) for s in range(2000)]
    assert all(isinstance(c, bool) for c in clicks)
    assert abs(np.mean(clicks) - p) < 0.04
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert [small.sample_click(1, i, rng_a) for i in range(30)] == [
        small.sample_click(1, i, rng_b) for i in range(30)
    ]


# --- text carries the latent signal ------------------------------------------------------


def _bag_of_words(texts: list[str]) -> np.ndarray:
    tokens = [re.findall(r"[a-z][a-z'-]*", t.lower()) for t in texts]
    vocab = {w: j for j, w in enumerate(sorted({w for ts in tokens for w in ts}))}
    x = np.zeros((len(texts), len(vocab)))
    for r, ts in enumerate(tokens):
        for w in ts:
            x[r, vocab[w]] += 1.0
    return x


def test_text_predicts_latent_item_factors(default_world: SyntheticWorld) -> None:
    x = _bag_of_words(default_world.dataset.item_text)
    y = default_world.item_factors
    perm = np.random.default_rng(0).permutation(len(x))
    n_train = int(0.7 * len(x))
    train, test = perm[:n_train], perm[n_train:]
    x_mean, y_mean = x[train].mean(0), y[train].mean(0)
    xc = x[train] - x_mean
    weights = np.linalg.solve(xc.T @ xc + 10.0 * np.eye(x.shape[1]), xc.T @ (y[train] - y_mean))
    pred = (x[test] - x_mean) @ weights + y_mean
    r2 = 1.0 - ((y[test] - pred) ** 2).sum() / ((y[test] - y_mean) ** 2).sum()
    assert r2 > 0.3, f"held-out R^2 of text -> factors is only {r2:.3f}"


# --- config validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", -1),
        ("seed", 1.5),
        ("n_users", 0),
        ("n_users", True),
        ("n_items", 1),
        ("n_factors", 0),
        ("n_factors", len(FACTOR_AXES) + 1),
        ("n_categories", len(GENRES) + 1),
        ("mean_interactions", 0.0),
        ("mean_interactions", float("nan")),
        ("length_sigma", -0.1),
        ("min_interactions", 0),
        ("popularity_skew", -1.0),
        ("drift", float("inf")),
        ("new_item_fraction", 1.0),
        ("new_item_fraction", -0.1),
        ("temperature", 0.0),
        ("text_noise", 1.5),
        ("n_descriptors", 1),
        ("horizon_days", 0),
        ("temperature", "hot"),
    ],
)
def test_bad_config_raises(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        SyntheticConfig(**{field: value})  # type: ignore[arg-type]


def test_contradictory_config_raises() -> None:
    with pytest.raises(ConfigError, match="min_interactions"):
        SyntheticConfig(min_interactions=50, max_interactions=10)
    with pytest.raises(ConfigError, match="released at launch"):
        SyntheticConfig(n_items=100, new_item_fraction=0.5, max_interactions=80)
    # a catalog too small for the default lengths names the flag and the size that works
    with pytest.raises(ConfigError, match=r"give at least 12 items \(--synthetic-items\)"):
        SyntheticConfig(n_items=11)


def test_a_world_too_large_to_generate_is_refused_by_its_config() -> None:
    """The world's size also comes from a file (a model's provenance, which ``fedrec evaluate
    model`` regenerates the world from): the generator's own config bounds users x items,
    not only the simulation's settings."""
    from shared.data.registry import load_dataset

    with pytest.raises(ConfigError, match="users x items must be at most"):
        SyntheticConfig(n_users=100_000, n_items=20_000)
    with pytest.raises(ConfigError, match="users x items"):  # as evaluate's loading reads it
        load_dataset("synthetic", synthetic_users=100_000, synthetic_items=20_000)
    SyntheticConfig(n_items=12)
    with pytest.raises(ConfigError):
        generate_world("default")  # type: ignore[arg-type]


def test_default_config_values() -> None:
    cfg = SyntheticConfig()
    assert (cfg.seed, cfg.n_users, cfg.n_items, cfg.n_factors) == (42, 1000, 600, 8)
    assert cfg.n_launch_items + cfg.n_new_items == cfg.n_items
    assert cfg.max_interactions is None and cfg.max_length == cfg.n_launch_items // 2
    assert SyntheticConfig(n_items=40).max_length == 16
    assert cfg.as_dict()["n_categories"] == cfg.n_categories


def test_module_docstring_example_runs() -> None:
    result = doctest.testmod(synthetic, verbose=False)
    assert result.attempted > 0 and result.failed == 0
