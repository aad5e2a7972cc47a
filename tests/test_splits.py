"""Protocol splits: seeded populations, leave-one-out by time, cold-start items."""

import re

import numpy as np
import pytest

from shared.data.dataset import build_dataset
from shared.errors import ConfigError
from shared.eval.splits import SplitConfig, split_cold_items, split_users
from tests.conftest import make_dataset


def test_populations_partition_users_and_are_seeded():
    ds = make_dataset(n_users=100)
    a = split_users(ds, SplitConfig(seed=1))
    b = split_users(ds, SplitConfig(seed=1))
    c = split_users(ds, SplitConfig(seed=2))
    everyone = np.concatenate([a.cold_users, a.public_users, a.federated_users])
    assert sorted(everyone.tolist()) == list(range(100))
    assert len(a.cold_users) == 10
    assert len(a.public_users) == 18  # 20% of the remaining 90
    assert np.array_equal(a.cold_users, b.cold_users)
    assert not np.array_equal(a.cold_users, c.cold_users)


def test_leave_one_out_by_time_with_stable_ties():
    # user "a": timestamps tie at 5; file order must decide.
    ds = build_dataset(
        "t",
        ["a"] * 4,
        ["x", "y", "z", "w"],
        np.array([1, 5, 5, 2]),
        ["x", "y", "z", "w"],
        ["x", "y", "z", "w"],
    )
    sp = split_users(ds, SplitConfig(cold_user_fraction=0.0, public_fraction=0.0))
    # order by time: x(1) w(2) y(5) z(5)  -> test z, valid y, train x w
    assert ds.item_ids[sp.test[0]] == "z"
    assert ds.item_ids[sp.valid[0]] == "y"
    assert [ds.item_ids[i] for i in sp.train[0]] == ["x", "w"]
    assert [ds.item_ids[i] for i in sp.history(0, "test")] == ["x", "w", "y"]
    assert [ds.item_ids[i] for i in sp.history(0, "valid")] == ["x", "w"]


def test_cold_users_have_no_training_data_and_no_target():
    ds = make_dataset(n_users=50)
    sp = split_users(ds)
    for u in sp.cold_users:
        assert len(sp.train[u]) == 0
        assert sp.test[u] == -1
    assert all(len(s) > 0 for s in sp.train_sequences())


def test_short_users_train_only():
    ds = build_dataset(
        "t",
        ["a", "a", "b", "b", "b"],
        ["x", "y", "x", "y", "z"],
        np.arange(5),
        ["x", "y", "z"],
        ["x", "y", "z"],
    )
    sp = split_users(ds, SplitConfig(cold_user_fraction=0.0, public_fraction=0.0))
    assert sp.test[0] == -1 and len(sp.train[0]) == 2
    assert list(sp.evaluable(np.array([0, 1]))) == [1]


@pytest.mark.parametrize(
    "bad",
    [{"cold_user_fraction": 1.0}, {"public_fraction": -0.1}, {"cold_item_min_interactions": 0}],
)
def test_bad_split_config_is_refused(bad):
    with pytest.raises(ConfigError):
        SplitConfig(**bad)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"seed": 1.5}, "seed must be an integer"),
        ({"seed": True}, "seed must be an integer"),
        ({"cold_user_fraction": "0.1"}, "cold-user-fraction must be a finite number, got '0.1'"),
        ({"public_fraction": float("nan")}, "public-fraction must be a finite number"),
        ({"cold_item_fraction": True}, "cold-item-fraction must be a finite number, got True"),
        ({"cold_item_min_interactions": 2.5}, "cold-item-min-interactions must be an integer"),
        ({"cold_item_min_interactions": True}, "cold-item-min-interactions must be an integer"),
    ],
)
def test_a_split_config_value_of_the_wrong_type_is_refused_naming_its_key(bad, message):
    """A float seed crashed later in numpy, a text fraction raised a bare TypeError and a
    fractional interaction threshold was accepted."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        SplitConfig(**bad)
    assert SplitConfig(seed=np.int64(3), cold_user_fraction=np.float32(0.5)).seed == 3


@pytest.mark.parametrize(
    ("n_users", "fractions", "message"),
    [
        (
            1,
            {"cold_user_fraction": 0.6},
            "the split makes all 1 users cold (cold-user-fraction 0.6, public-fraction 0.2)",
        ),
        (
            3,
            {"cold_user_fraction": 0.0, "public_fraction": 0.9},
            "the split leaves no federated user: of the 3 users, 0 are cold and the other 3 "
            "public (cold-user-fraction 0.0, public-fraction 0.9)",
        ),
        (
            4,
            {"cold_user_fraction": 0.4, "public_fraction": 0.8},
            "of the 4 users, 2 are cold and the other 2 public",
        ),
    ],
)
def test_fractions_that_leave_no_federated_user_are_refused(n_users, fractions, message):
    """Rounding on few users could make every user cold, or every other user public; the
    empty population's figures were then reported as 0.0."""
    ds = make_dataset(n_users=n_users)
    with pytest.raises(ConfigError, match=re.escape(message)):
        split_users(ds, SplitConfig(**fractions))
    assert len(split_users(make_dataset(n_users=3), SplitConfig()).federated_users) == 2


def test_cold_items_removed_from_every_training_input():
    ds = make_dataset(n_users=60, n_items=40)
    cold = split_cold_items(ds, SplitConfig(cold_item_fraction=0.2, cold_item_min_interactions=5))
    assert len(cold.held_out) > 0
    counts = np.bincount(np.concatenate(ds.sequences), minlength=ds.n_items)
    assert (counts[cold.held_out] >= 5).all()
    remaining = np.concatenate(cold.dataset.sequences)
    assert not np.isin(remaining, cold.held_out).any()
    assert cold.dataset.n_items == ds.n_items


def test_fewshot_cases_read_cold_users_first_k_and_pseudo_cold_the_public_train_only():
    from shared.eval.protocol import fewshot_cases, pseudo_cold_cases

    ds = make_dataset(n_users=60, length=8)  # 10 interactions a user
    sp = split_users(ds)
    for k in (1, 3):
        cold = fewshot_cases(sp, k)
        assert [c.user for c in cold] == [int(u) for u in sp.cold_users]
        for c in cold:
            seq = sp.full_sequences[c.user]
            assert c.history.tolist() == seq[:k].tolist() and c.target == seq[k]
            assert c.seen.tolist() == seq[: k + 1].tolist()  # negatives avoid support + query
        public = pseudo_cold_cases(sp, k)
        assert [c.user for c in public] == [int(u) for u in sp.public_users]
        for c in public:
            train = sp.train[c.user]
            assert c.history.tolist() == train[:k].tolist() and c.target == train[k]
    # a public user's held-out items are never a pseudo-cold query: at K = len(train) - 1
    # the query is the last training item, and past it there is no case
    k = len(sp.train[int(sp.public_users[0])]) - 1
    last = {c.user: c.target for c in pseudo_cold_cases(sp, k)}
    assert all(last[int(u)] == sp.train[int(u)][-1] for u in sp.public_users)
    assert pseudo_cold_cases(sp, k + 1) == []
