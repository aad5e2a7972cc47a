"""Baselines on hand-checkable data, and the protocol evaluation around them."""

import os
import subprocess
import sys

import numpy as np
import pytest

from shared.errors import ConfigError, DataError
from shared.eval.protocol import (
    EvalCase,
    EvalConfig,
    case_ranks,
    evaluate_fewshot,
    evaluate_split,
    export_recs,
    rank_cases,
    sample_negatives,
)
from shared.eval.splits import SplitConfig, split_users
from shared.models.baselines import EASE, ItemKNN, Pop, TextOnly
from tests.conftest import make_dataset


def seqs(*rows):
    return [np.array(r, dtype=np.int64) for r in rows]


def test_pop_counts_each_user_once_per_item():
    m = Pop().fit(seqs([0, 1, 1], [1, 2]), 4)
    assert m.score(seqs([3])).tolist() == [[1.0, 2.0, 1.0, 0.0]]


def test_itemknn_cosine_by_hand():
    # users: {0,1}, {0,1}, {0,2}: cos(0,1)=2/sqrt(3*2), cos(0,2)=1/sqrt(3), cos(1,2)=0
    m = ItemKNN(neighbors=None).fit(seqs([0, 1], [0, 1], [0, 2]), 3)
    s = m.similarity
    assert s[0, 1] == pytest.approx(2 / np.sqrt(6), rel=1e-5)
    assert s[0, 2] == pytest.approx(1 / np.sqrt(3), rel=1e-5)
    assert s[1, 2] == 0 and s[0, 0] == 0
    assert m.score(seqs([1]))[0].tolist() == pytest.approx([2 / np.sqrt(6), 0, 0], rel=1e-5)


def test_itemknn_keeps_top_neighbors_only():
    m = ItemKNN(neighbors=1).fit(seqs([0, 1], [0, 1], [0, 2], [1, 2, 3]), 4)
    assert (np.count_nonzero(m.similarity, axis=0) <= 1).all()


def test_itemknn_neighbour_ties_keep_the_lowest_item_ids():
    # item 0 is seen by six users, each of whom saw one other item (1..6): items 1..6 all have
    # cosine 1/sqrt(6) with item 0. With 5 neighbours one of the six must go: the highest id,
    # not whichever numpy's argpartition left past the cut (it dropped item 5), which depends
    # on its selection algorithm and so on the numpy build and the CPU
    m = ItemKNN(neighbors=5).fit(seqs(*([0, j] for j in range(1, 7))), 7)
    assert np.flatnonzero(m.similarity[:, 0]).tolist() == [1, 2, 3, 4, 5]
    assert m.similarity[1:6, 0] == pytest.approx([1 / np.sqrt(6)] * 5, rel=1e-5)


def test_ease_matches_closed_form_and_zero_diagonal():
    train = seqs([0, 1], [1, 2], [0, 2, 3])
    m = EASE(l2=2.0).fit(train, 4)
    x = np.zeros((3, 4))
    for u, s in enumerate(train):
        x[u, s] = 1
    g = x.T @ x + 2.0 * np.eye(4)
    p = np.linalg.inv(g)
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0)
    np.testing.assert_allclose(m.weights, b, atol=1e-5)
    assert np.all(np.diag(m.weights) == 0)


def test_text_only_prefers_similar_items():
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1]], dtype=np.float32)
    m = TextOnly(emb).fit([], 3)
    s = m.score(seqs([0]))[0]
    assert s[1] > s[2]
    with pytest.raises(DataError):
        TextOnly(emb).fit([], 5)


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ConfigError):
        EASE(l2=0)
    with pytest.raises(ConfigError):
        ItemKNN(neighbors=0)
    from shared.eval.baseline_benchmark import BaselineConfig

    with pytest.raises(ConfigError, match="ease-l2 must be a finite number > 0"):
        BaselineConfig(ease_l2=float("inf"))  # it scored every item 0, silently
    with pytest.raises(ConfigError, match="shots must be distinct"):
        BaselineConfig(shots=(1, 1, 3))


@pytest.mark.parametrize(
    "build",
    [
        lambda: EASE(l2=float("nan")),  # NaN <= 0 is False: every weight NaN, every HR 0
        lambda: EASE(l2=float("inf")),
        lambda: ItemKNN(shrink=float("nan")),  # every similarity NaN
        lambda: ItemKNN(shrink=-1.0),  # a denominator of ~1e-12: similarities of 1e12
        lambda: ItemKNN(neighbors=2.5),  # a TypeError deep in numpy's argpartition
    ],
)
def test_baselines_refuse_hyperparameters_that_score_silently_wrong(build):
    """The classes are used directly (the teacher's prior, the bandit harness, the benches),
    not only through the validated configs: a bad value is refused by name, not turned into
    NaN scores that the protocol counts as misses."""
    with pytest.raises(ConfigError, match=r"EASE l2|ItemKNN"):
        build()


def test_evaluate_cli_takes_snake_case_keys_and_refuses_one_file_for_two_outputs(tmp_path):
    from typer.testing import CliRunner

    from fedrec.cli import app

    base = ["evaluate", "baselines", "--no-text", "--no-cold-items"]
    same = tmp_path / "out"
    result = CliRunner().invoke(app, [*base, "--export", str(same), "-o", str(same)])
    assert "--export and --output both name" in str(result.exception)
    assert not same.exists()
    result = CliRunner().invoke(app, [*base, "--run-config", "public_fraction=2"])
    assert "public-fraction" in str(result.exception)  # read as the setting, then checked
    result = CliRunner().invoke(app, [*base, "--run-config", "nonsense=1"])
    assert "unknown --run-config keys: nonsense; valid: " in str(result.exception)
    assert "ease-l2" in str(result.exception)


def test_negative_sampling_is_seeded_and_avoids_seen_items():
    seen = np.array([0, 5, 7])
    a = sample_negatives(seen, 50, 20, seed=3, user=1)
    b = sample_negatives(seen, 50, 20, seed=3, user=1)
    assert np.array_equal(a, b) and len(np.unique(a)) == 20
    assert not np.isin(a, seen).any()
    assert len(sample_negatives(seen, 10, 99, seed=3, user=1)) == 7  # pool smaller than n


class Constant:
    n_items = 30

    def score(self, histories):
        return np.ones((len(histories), self.n_items), dtype=np.float32)


def test_constant_model_scores_zero_under_the_protocol():
    sp = split_users(make_dataset())
    res = evaluate_split(Constant(), sp, ("public", "federated"))
    for pop in res.values():
        assert pop["sampled_hr@10"] == 0 and pop["full_hr@10"] == 0


def test_ease_beats_pop_on_structured_data():
    ds = make_dataset(n_users=120, n_items=30)
    sp = split_users(ds)
    ease = EASE(l2=10).fit(sp.train_sequences(), ds.n_items)
    pop = Pop().fit(sp.train_sequences(), ds.n_items)
    e = evaluate_split(ease, sp, ("all",))["all"]
    p = evaluate_split(pop, sp, ("all",))["all"]
    assert e["full_ndcg@10"] > p["full_ndcg@10"]
    fs = evaluate_fewshot(ease, sp, (1, 3))
    assert fs["k=1"]["users"] == len(sp.cold_users)


def test_full_ranking_excludes_history():
    class Oracle:
        n_items = 5

        def score(self, histories):
            s = np.zeros((len(histories), 5), dtype=np.float32)
            s[:, 4] = 1.0  # the target
            s[:, 0] = 2.0  # a history item scored highest: must be excluded
            return s

    case = EvalCase(0, np.array([0]), 4, np.array([0]), np.array([0, 4]))
    m = rank_cases(Oracle(), [case], EvalConfig(k=3, n_negatives=3))
    assert m["full_hr@3"] == 1.0 and m["full_ndcg@3"] == 1.0


def test_fewer_negatives_than_k_is_refused_naming_both():
    """With n-negatives < k the target always ranks inside the top k: sampled HR@k was 1."""
    with pytest.raises(ConfigError, match=r"n-negatives \(3\) must be >= k \(10\)"):
        EvalConfig(n_negatives=3)
    assert EvalConfig(k=5, n_negatives=5).n_negatives == 5


def test_case_ranks_are_per_case_and_agree_with_the_summary():
    class Fixed:
        n_items = 6

        def score(self, histories):
            return np.tile(np.arange(6, dtype=np.float32), (len(histories), 1))  # item 5 best

    h = np.array([0])
    cases = [
        EvalCase(0, h, 5, h, np.array([0, 5])),  # best item: rank 0
        EvalCase(1, h, 1, h, np.array([0, 1])),  # items 2..5 above it: full rank 4
    ]
    ranks = case_ranks(Fixed(), cases, EvalConfig(k=3, n_negatives=4))
    assert ranks.full.tolist() == [0.0, 4.0]
    assert ranks.sampled.tolist() == [0.0, 4.0]  # the 4 unseen items are all the negatives
    summary = rank_cases(Fixed(), cases, EvalConfig(k=3, n_negatives=4))
    assert summary["full_hr@3"] == 0.5 and summary["sampled_hr@3"] == 0.5


def test_export_recs_ranks_ties_against_the_model_like_the_metrics(tmp_path):
    """Tied items share the rank of the last of them, so 'rank <= k' read from recs.csv is
    the metric's hit (ties count against the model), whatever order the file lists them in."""
    ds = make_dataset(n_users=4, n_items=8)
    scores = np.array([3, 2, 2, 2, 1, 0, 9, np.nan], dtype=np.float64)

    class Tied:
        n_items = 8

        def score(self, histories):
            return np.tile(scores, (len(histories), 1))

    history = np.array([6])  # the best-scored item is in the history: never listed
    out = tmp_path / "recs.csv"
    assert export_recs(Tied(), ds, {0: history}, out, top_n=5) == 5
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    ranks = {ds.item_ids.index(item): int(rank) for _, item, rank in rows}
    # the NaN-scored item 7 counts as above every other (a NaN never helps the model)
    assert ranks == {0: 2, 1: 5, 2: 5, 3: 5, 4: 6}
    for target in range(8):  # the metric's rank of every candidate as the test item
        if target == 6:
            continue
        case = EvalCase(0, history, target, history, np.array([6, target]))
        full = case_ranks(Tied(), [case], EvalConfig(k=3, n_negatives=4)).full[0]
        if target in ranks:
            assert full + 1 == ranks[target]
        else:  # not listed: ranked after the top 5 (item 5), or a miss (item 7, NaN)
            assert full + 1 > 6 or not np.isfinite(full)
    assert [p.name for p in tmp_path.iterdir()] == ["recs.csv"]  # no temporary file left


def test_export_recs_writes_utf8_whatever_the_locale(tmp_path):
    """recs.csv is UTF-8 (what the loaders read) under a C / ASCII locale too: written in the
    locale's encoding, a non-ASCII item id (a generic dataset's "映画") was a
    UnicodeEncodeError traceback there, and another locale's bytes elsewhere."""
    out = tmp_path / "recs.csv"
    script = (
        "import numpy as np, sys\n"
        "from shared.data.dataset import build_dataset\n"
        "from shared.eval.protocol import export_recs\n"
        # the ids as escapes: the command line itself is decoded with the locale's codec
        "ids = ['\\u6620\\u753b', '\\xe9', '\\U0001f363']\n"
        "ds = build_dataset('toy', ['u1', 'u1'], ids[:2], np.array([1, 2]), ids, ['a', 'b', 'c'])\n"
        "class S:\n"
        "    n_items = 3\n"
        "    def score(self, hs):\n"
        "        return np.tile(np.array([1.0, 3.0, 2.0]), (len(hs), 1))\n"
        "print(export_recs(S(), ds, {0: np.array([0])}, sys.argv[1]))\n"
    )
    env = {**os.environ, "PYTHONUTF8": "0", "LC_ALL": "C", "LANG": "C"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes().decode("utf-8").splitlines() == ["user,item,rank", "u1,é,1", "u1,🍣,2"]


def test_export_recs_leaves_out_non_finite_scores_so_recs_agree_with_the_metric(tmp_path):
    """A non-finite test score is a miss, but on a small catalog its last rank was <= 10, so
    HR@10 recomputed from recs.csv was 1 where the metric says 0."""
    ds = make_dataset(n_users=6, n_items=6)
    sp = split_users(ds, SplitConfig(cold_user_fraction=0.0))

    class Broken:
        n_items = 6

        def score(self, histories):
            scores = np.full((len(histories), 6), np.nan)
            scores[:, 0] = np.inf  # infinite is no better than NaN
            return scores

    users = sp.evaluable(sp.population("all"))
    out = tmp_path / "recs.csv"
    assert export_recs(Broken(), ds, {int(u): sp.history(int(u)) for u in users}, out) == 0
    listed = {tuple(line.split(",")[:2]) for line in out.read_text().splitlines()[1:]}
    hits = [(ds.user_ids[u], ds.item_ids[sp.target(int(u))]) in listed for u in users]
    metric = evaluate_split(Broken(), sp, ("all",))["all"]["full_hr@10"]
    assert float(np.mean(hits)) == metric == 0.0


def test_recs_are_scored_in_the_evaluations_batch_size(tmp_path, monkeypatch):
    """export_split_recs called export_recs without a batch size, so the export always
    scored 512 users at a time whatever batch-size the evaluation was given."""
    import shared.eval.protocol
    from shared.eval.baseline_benchmark import BaselineConfig, run_baseline_benchmark
    from shared.eval.model_evaluation import evaluate_model

    ds = make_dataset(n_users=12)
    seen: list[int] = []
    export = shared.eval.protocol.export_recs

    def recording(*args, batch_size=512, **kwargs):
        seen.append(batch_size)
        return export(*args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(shared.eval.protocol, "export_recs", recording)
    config = EvalConfig(batch_size=3)
    model = Pop().fit(split_users(ds).train_sequences(), ds.n_items)
    evaluate_model(model, "pop", ds, eval_config=config, shots=(), export_path=tmp_path / "a")
    run_baseline_benchmark(
        ds,
        eval_config=config,
        baseline_config=BaselineConfig(cold_items=False),
        export_path=tmp_path / "b",
    )
    assert seen == [3] * (1 + 1 + 4)  # evaluate_model's recs.csv; the benchmark's, and per K


def test_the_fewshot_figures_can_be_recomputed_from_their_export(tmp_path):
    """PROTOCOL.md: anyone can recompute the full-ranking figures from the export. The
    few-shot ones (cold users, history and exclusion = the support set) had no export: one
    file per K now sits next to recs.csv, whose "query listed with rank <= 10" gives the
    reported few-shot full HR@10 (ItemKNN from one item: many ties)."""
    import csv

    from shared.eval.baseline_benchmark import BaselineConfig, run_baseline_benchmark

    ds = make_dataset(n_users=60, n_items=150, length=8)
    split_config = SplitConfig(cold_user_fraction=0.3)
    split = split_users(ds, split_config)
    out = tmp_path / "recs.csv"
    report = run_baseline_benchmark(
        ds,
        split_config,
        baseline_config=BaselineConfig(shots=(1, 3, 5), cold_items=False),
        export_path=out,
        export_model="itemknn",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "recs-fewshot-k1.csv",
        "recs-fewshot-k3.csv",
        "recs-fewshot-k5.csv",
        "recs.csv",
    ]
    figures = []
    for k in (1, 3, 5):
        with open(tmp_path / f"recs-fewshot-k{k}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        listed = {(r["user"], r["item"]): int(r["rank"]) for r in rows}
        hits = []
        for u in split.cold_users:
            seq = split.full_sequences[int(u)]  # by time: the first K support, then the query
            user = ds.user_ids[int(u)]
            assert not {(user, ds.item_ids[int(i)]) for i in seq[:k]} & set(listed)
            hits.append(listed.get((user, ds.item_ids[int(seq[k])]), 999) <= 10)
        assert len({r["user"] for r in rows}) == len(hits)  # each counted cold user, no other
        assert len(rows) == 100 * len(hits)
        figure = report["results"]["itemknn"]["fewshot"][f"k={k}"]
        assert figure["users"] == len(hits)
        assert sum(hits) / len(hits) == pytest.approx(figure["full_hr@10"], abs=1e-12)
        figures.append(figure["full_hr@10"])
    assert 0 < max(figures) < 1  # not trivially all hits or all misses
    # without cold users there are no few-shot figures, and no few-shot files
    alone = tmp_path / "alone"
    run_baseline_benchmark(
        ds,
        SplitConfig(cold_user_fraction=0.0),
        baseline_config=BaselineConfig(cold_items=False),
        export_path=alone / "recs.csv",
    )
    assert [p.name for p in alone.iterdir()] == ["recs.csv"]


def test_two_exports_to_one_file_do_not_write_into_each_other(tmp_path):
    """Both wrote the fixed temporary 'recs.csv.tmp': the second export truncated the first's
    and renamed it into place, the first then wrote its rows into the published file and
    failed to rename a temporary file that was gone."""
    ds = make_dataset(n_users=4, n_items=8)
    out = tmp_path / "recs.csv"

    class Scores:
        n_items = 8

        def __init__(self, best, inner=None):
            self.best, self.inner = best, inner

        def score(self, histories):
            if self.inner is not None:  # another export to the same file, meanwhile
                export_recs(self.inner, ds, {1: np.array([0])}, out, top_n=2)
                self.inner = None
            scores = np.zeros((len(histories), 8))
            scores[:, self.best] = 1.0
            return scores

    assert export_recs(Scores(5, inner=Scores(6)), ds, {0: np.array([0])}, out, top_n=2) == 2
    rows = [line.split(",") for line in out.read_text().splitlines()]
    assert rows[0] == ["user", "item", "rank"] and len(rows) == 3  # the last export's, whole
    assert {user for user, _, _ in rows[1:]} == {ds.user_ids[0]}
    assert rows[1][1] == ds.item_ids[5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recs.csv"]


def test_an_export_removes_only_its_own_files_stale_temps(tmp_path):
    """The stale-temp pattern held the file name as a glob: exporting to 'recs[1].csv'
    deleted 'recs1.csv''s temporary file, which '[1]' matches."""
    import os
    import time

    ds = make_dataset(n_users=4, n_items=8)
    other = tmp_path / ".recs1.csv.abc.tmp"
    own = tmp_path / ".recs[1].csv.abc.tmp"
    for path in (other, own):
        path.write_text("")
        os.utime(path, (time.time() - 3600,) * 2)
    export_recs(Pop().fit([np.array([1, 2])], 8), ds, {0: np.array([0])}, tmp_path / "recs[1].csv")
    assert other.exists() and not own.exists()


def test_export_recs_refuses_a_folder_before_any_work(tmp_path):
    ds = make_dataset(n_users=4, n_items=8)

    class Never:
        n_items = 8

        def score(self, histories):
            raise AssertionError("scored although the output cannot be written")

    with pytest.raises(ConfigError, match="is a folder"):
        export_recs(Never(), ds, {0: np.array([1])}, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no stray temporary file beside it either


def test_export_recs_writes_raw_ids_without_history(tmp_path):
    ds = make_dataset()
    sp = split_users(ds, SplitConfig(cold_user_fraction=0.0))
    model = EASE(l2=10).fit(sp.train_sequences(), ds.n_items)
    hist = {0: sp.history(0), 1: sp.history(1)}
    out = tmp_path / "recs.csv"
    n = export_recs(model, ds, hist, out, top_n=5)
    lines = out.read_text().splitlines()
    assert lines[0] == "user,item,rank" and n == 10 and len(lines) == 11
    for line in lines[1:]:
        user, item, rank = line.split(",")
        u = ds.user_ids.index(user)
        assert ds.item_ids.index(item) not in set(hist[u].tolist())
        assert 1 <= int(rank) <= ds.n_items  # tied items share a rank, which may pass 5


def test_summary_rows_mark_a_group_without_users_as_no_result():
    """A shot count above every user's history, say, has no cases: its 0.0 in the report is
    no score, so the table row carries None (printed n/a), while a real 0.0 stays 0.0."""
    from shared.eval.baseline_benchmark import summary_rows

    def metrics(users: int, hr: float) -> dict[str, float]:
        return {
            "users": users,
            "sampled_hr@10": hr,
            "sampled_ndcg@10": hr / 2,
            "full_hr@10": hr,
            "full_ndcg@10": hr / 2,
        }

    report = {
        "results": {
            "ease": {
                "loo": {"all": metrics(5, 0.4)},
                "fewshot": {"k=1": metrics(5, 0.2), "k=400": metrics(0, 0.0)},
                "cold_items": {
                    "public": {**metrics(3, 0.0), "held_out_items": 3},
                    "all": {**metrics(7, 0.5), "held_out_items": 3},
                },
            }
        }
    }
    rows = {(section, group): (hr, ndcg) for _, section, group, hr, ndcg in summary_rows(report)}
    assert rows[("loo/full", "all")] == (0.4, 0.2)
    assert rows[("fewshot/full", "k=400")] == (None, None)
    assert rows[("fewshot/sampled", "k=400")] == (None, None)
    assert rows[("cold-items/sampled", "public")] == (0.0, 0.0)
    assert rows[("cold-items/sampled", "all")] == (0.5, 0.25)


def test_the_cold_item_run_reports_each_population_and_counts_cases_apart_from_users():
    """It reported one figure pooled over public and federated users, whose "users" was the
    number of held-out-item interactions (9,909 on ml-100k, from 849 users)."""
    from shared.data.synthetic import SyntheticConfig, generate_world
    from shared.eval.baseline_benchmark import BaselineConfig, run_baseline_benchmark

    dataset = generate_world(SyntheticConfig(seed=5, n_users=120, n_items=60)).dataset
    report = run_baseline_benchmark(dataset, SplitConfig(), baseline_config=BaselineConfig())
    cold = report["results"]["pop"]["cold_items"]
    assert set(cold) == {"public", "federated", "all"}
    assert cold["all"]["cases"] == cold["public"]["cases"] + cold["federated"]["cases"]
    assert cold["all"]["users"] == cold["public"]["users"] + cold["federated"]["users"]
    assert 0 < cold["all"]["users"] < cold["all"]["cases"]  # several held-out items per user
    # the pooled figure is the case-weighted mean of the two populations'
    pooled = sum(cold[p]["sampled_hr@10"] * cold[p]["cases"] for p in ("public", "federated"))
    assert cold["all"]["sampled_hr@10"] == pytest.approx(pooled / cold["all"]["cases"])


@pytest.mark.parametrize("history", [[2, -1], [2, 5], [1.5, 2.0], [[1, 2]]])
def test_a_history_of_ids_outside_the_catalog_is_refused_not_wrapped(history):
    """history_matrix marked item -1 as the catalog's last item (numpy's negative index),
    so ItemKNN, EASE and TextOnly silently scored another history; an id past the catalog
    was an IndexError, a float id was cut to an int and a 2-D history read as one."""
    ds = make_dataset(n_users=30, n_items=5, length=4, seed=0)
    for model in (ItemKNN(), EASE(), TextOnly(np.eye(5, dtype=np.float32))):
        model.fit(ds.sequences, 5)
        with pytest.raises(DataError, match=r"history #1 .*catalog|history #1 .*integer"):
            model.score([np.array([0]), np.array(history)])
    assert model.score([np.array([]), [0, 4]]).shape == (2, 5)  # empty and list histories


def test_a_full_disk_during_the_export_names_the_file_for_a_one_line_error(
    tmp_path, monkeypatch, capsys
):
    """A write or fsync that failed for lack of space raised an OSError naming no file, which
    `fedrec` shows as a traceback (a fault of its own) instead of 'error: No space left on
    device: recs.csv; free space ...'; the atomic writes name their file, the export did not."""
    import errno
    import os

    import fedrec.app
    import shared.eval.protocol
    from fedrec import cli

    ds = make_dataset(n_users=4, n_items=8)

    class Flat:
        n_items = 8

        def score(self, histories):
            return np.zeros((len(histories), 8))

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shared.eval.protocol.os, "fsync", full)
    out = tmp_path / "recs.csv"
    with pytest.raises(OSError) as caught:
        export_recs(Flat(), ds, {0: np.array([1])}, out)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(out)
    assert list(tmp_path.iterdir()) == []  # no temporary file left

    def command(**kwargs):
        export_recs(Flat(), ds, {0: np.array([1])}, out)

    monkeypatch.setattr(fedrec.app, "app", command)  # the tree cli.main() runs
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    assert f"No space left on device: {out}; free space" in capsys.readouterr().err
