"""Teacher (SASRec), student (distilled, on-device) and the training utilities.

Tiny synthetic data and tiny models so the whole file runs in seconds: the point is the
contracts (shapes, parameter budget and groups, determinism, export equivalence, Opacus
per-sample gradients), plus one small learning check on data with real sequential structure.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from shared.compression.prune import PruneConfig
from shared.data.dataset import RecDataset, build_dataset
from shared.errors import ConfigError, DataError, ModelFileError
from shared.eval.protocol import evaluate_split
from shared.eval.splits import ProtocolSplit, SplitConfig, split_users
from shared.models.baselines import EASE, Pop
from shared.models.sequence import (
    IGNORE_TARGET,
    PAD_ITEM,
    ItemRepresentation,
    pad_histories,
    svd_compress,
)
from shared.models.student import (
    DistilledStudent,
    ExportableStudent,
    StudentConfig,
    StudentModel,
)
from shared.models.teacher import (
    SASRecEnsemble,
    SASRecModel,
    SASRecTeacher,
    TeacherConfig,
    permute_windows,
    seen_items,
)
from shared.training.distill import distillation_loss, kd_objective, prefix_windows
from shared.training.trainer import (
    EarlyStopping,
    TrainConfig,
    TrainingDivergedError,
    Validation,
    fit_with_early_stopping,
    make_causal_windows,
    make_next_item_examples,
    next_item_loss,
    seeded,
    train_epoch,
    trim_padding,
)

N_ITEMS = 40
TEXT_DIM = 16


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def chain_dataset(n_users: int = 80, length: int = 12, seed: int = 0) -> RecDataset:
    """Users walk along a cycle of items (next = current + 1) with 10% random jumps.

    Every item is about equally popular, so Pop is near chance, while a sequential model
    that learns "next = last + 1" is nearly perfect.
    """
    rng = np.random.default_rng(seed)
    users, items, ts = [], [], []
    for u in range(n_users):
        current = int(rng.integers(N_ITEMS))
        seen: set[int] = set()
        for t in range(length):
            seen.add(current)
            users.append(f"u{u}")
            items.append(f"i{current}")
            ts.append(t)
            nxt = (current + 1) % N_ITEMS
            if rng.random() < 0.1:
                nxt = int(rng.integers(N_ITEMS))
            current = nxt
    ids = [f"i{i}" for i in range(N_ITEMS)]
    return build_dataset("chains", users, items, np.array(ts), ids, [f"item {i}" for i in ids])


def text_features(n: int = N_ITEMS, dim: int = TEXT_DIM, seed: int = 1) -> np.ndarray:
    """Random unit vectors standing in for LM text embeddings (fast, no model download)."""
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


TINY_TEACHER = TeacherConfig(
    dim=32, n_layers=1, n_heads=1, max_len=16, dropout=0.1, epochs=40, batch_size=16,
    lr=5e-3, eval_every=5, patience=3,
)  # fmt: skip
TINY_STUDENT = StudentConfig(
    dim=16, max_len=8, text_dim=8, id_dim=16, dropout=0.1, epochs=30, batch_size=16,
    lr=1e-2, eval_every=5, patience=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def split() -> ProtocolSplit:
    return split_users(chain_dataset(), SplitConfig(seed=3, public_fraction=0.5))


@pytest.fixture(scope="module")
def teacher(split: ProtocolSplit) -> SASRecTeacher:
    model = SASRecTeacher(text_features(), TINY_TEACHER)
    return model.fit(split.train_sequences(split.public_users), N_ITEMS, Validation(split))


@pytest.fixture(scope="module")
def student(split: ProtocolSplit, teacher: SASRecTeacher) -> DistilledStudent:
    model = DistilledStudent(teacher, TINY_STUDENT)
    return model.fit(split.train_sequences(split.public_users), N_ITEMS, Validation(split))


def small_student(dropout: float = 0.0) -> StudentModel:
    config = StudentConfig(dim=16, max_len=8, text_dim=8, id_dim=12, dropout=dropout)
    rng = np.random.default_rng(5)
    with seeded(0):
        return StudentModel(
            rng.normal(size=(N_ITEMS, 8)).astype(np.float32),
            rng.normal(size=(N_ITEMS, 12)).astype(np.float32),
            config,
        )


def test_module_device_is_where_the_parameters_or_buffers_are() -> None:
    from shared.models.sequence import module_device

    assert module_device(small_student()) == torch.device("cpu")
    assert module_device(nn.Identity()) == torch.device("cpu")  # nothing to move to
    holder = nn.Module()
    holder.register_buffer("b", torch.zeros(1, device="meta"))
    assert module_device(holder).type == "meta"  # a module with buffers only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_student_on_the_gpu_scores_and_sets_its_cold_user_as_on_the_cpu() -> None:
    """score_histories and set_cold_user built their batches on the CPU, so a model held on
    a GPU failed with a device mismatch."""
    from shared.models.sequence import score_histories

    histories = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6, 7, 8, 9, 10, 11, 12, 13])]
    cpu, gpu = small_student(), small_student().cuda()
    for model in (cpu, gpu):
        model.set_cold_user(histories)
    assert torch.allclose(cpu.cold_user, gpu.cold_user.cpu(), atol=1e-5)
    want = score_histories(cpu, [*histories, np.array([], dtype=np.int64)], 8, N_ITEMS)
    got = score_histories(gpu, [*histories, np.array([], dtype=np.int64)], 8, N_ITEMS)
    assert np.allclose(want, got, atol=1e-4)
    # and the simulation's per-user adapted scoring
    from simulation.pipeline import AdaptedStudent

    init = {k: v.clone() for k, v in cpu.adapter.state_dict().items()}
    adapted_cpu = AdaptedStudent(cpu, 3, 0.01, init).score(histories)
    gpu_init = {k: v.cuda() for k, v in init.items()}
    adapted_gpu = AdaptedStudent(gpu, 3, 0.01, gpu_init).score(histories)
    assert np.allclose(adapted_cpu, adapted_gpu, atol=1e-3)


# --------------------------------------------------------------------------- building blocks


def test_early_stopping_counts_validations_without_a_new_best() -> None:
    stopping = EarlyStopping(patience=2)
    # a tie is not a new best; a new best resets the count
    seen = [(stopping.update(v), stopping.exhausted) for v in (0.1, 0.3, 0.2, 0.4, 0.4, 0.3)]
    assert seen == [
        (True, False),
        (True, False),
        (False, False),
        (True, False),
        (False, False),
        (False, True),
    ]
    assert stopping.best == 0.4


def test_pad_histories_keeps_the_latest_items_left_padded() -> None:
    items, mask = pad_histories([np.array([1, 2, 3, 4]), np.array([7]), np.array([], int)], 3)
    assert items.tolist() == [[2, 3, 4], [PAD_ITEM, PAD_ITEM, 7], [PAD_ITEM] * 3]
    assert mask.tolist() == [[True] * 3, [False, False, True], [False] * 3]
    items, mask = pad_histories([np.array([5])], 4, pad_to=4)
    assert items.shape == (1, 4) and mask[0].tolist() == [False, False, False, True]
    with pytest.raises(ConfigError):
        pad_histories([np.array([1, 2])], 4, pad_to=1)


def test_next_item_examples_one_per_transition() -> None:
    ex = make_next_item_examples([np.array([3, 4, 5]), np.array([9])], max_len=2)
    assert len(ex) == 2  # the single-item sequence has no transition
    assert ex.targets.tolist() == [4, 5]
    assert ex.items.tolist() == [[PAD_ITEM, 3], [3, 4]]
    assert ex.mask.tolist() == [[False, True], [True, True]]


def test_causal_windows_cover_every_transition_once() -> None:
    seq = np.arange(1, 8)  # 6 transitions
    w = make_causal_windows([seq], max_len=4)
    targets = w.targets[w.targets != IGNORE_TARGET]
    assert sorted(targets.tolist()) == list(range(2, 8))
    for items, mask, tgt in zip(w.items, w.mask, w.targets, strict=True):
        real = mask.nonzero().squeeze(1)
        assert (tgt[real] == items[real] + 1).all()  # target = next item of the sequence


def test_trim_padding_and_prefix_windows() -> None:
    items = torch.tensor([[0, 0, 5, 6], [0, 1, 2, 3]])
    mask = items > 0
    trimmed = trim_padding(items, mask, items.clone())
    assert trimmed[0].tolist() == [[0, 5, 6], [1, 2, 3]]
    select = torch.tensor([[False, False, True, True], [False, True, False, True]])
    win, win_mask = prefix_windows(items, mask, select, max_len=2)
    assert win.tolist() == [[0, 5], [5, 6], [0, 1], [2, 3]]
    assert win_mask.tolist() == [[False, True], [True, True], [False, True], [True, True]]


def test_item_representation_table_matches_gather() -> None:
    rep = ItemRepresentation(text_features(), 8)
    ids = torch.tensor([[3, 0, 7]])
    assert torch.allclose(rep(ids)[0], rep.table()[ids[0]], atol=1e-6)
    frozen_ids = ItemRepresentation(
        text_features(), 8, id_features=np.eye(N_ITEMS, 5, dtype=np.float32)
    )
    assert not frozen_ids.ids.weight.requires_grad and not frozen_ids.text.weight.requires_grad


def test_svd_compress_preserves_dot_products_at_full_rank() -> None:
    x = np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32)
    c = svd_compress(x, 6)
    gram_x, gram_c = x @ x.T, c @ c.T
    assert np.allclose(gram_c / gram_c[0, 0], gram_x / gram_x[0, 0], atol=1e-4)
    assert svd_compress(x, 9).shape == (20, 9)


# --------------------------------------------------------------------------- distillation loss


def test_distillation_loss_is_zero_for_identical_logits_and_positive_otherwise() -> None:
    logits = torch.randn(4, 10)
    for temperature in (0.5, 1.0, 3.0):
        assert distillation_loss(logits, logits.clone(), temperature).item() == pytest.approx(
            0.0, abs=1e-6
        )
        assert distillation_loss(logits + 5.0, logits, temperature).item() == pytest.approx(
            0.0, abs=1e-5
        )  # a per-row shift is the same distribution
        assert distillation_loss(torch.randn(4, 10), logits, temperature).item() > 0
    targets = torch.tensor([1, 2, 3, 4])
    assert kd_objective(logits, logits, targets, 2.0, 1.0).item() == pytest.approx(0, abs=1e-6)
    assert kd_objective(logits, logits, targets, 2.0, 0.0).item() == pytest.approx(
        F.cross_entropy(logits, targets).item()
    )


def test_distillation_loss_scales_with_t_squared() -> None:
    """The T^2 factor: at high T the loss approaches (T^2 / 2T^2) * var, not zero."""
    s, t = torch.randn(3, 50), torch.randn(3, 50)
    assert distillation_loss(s, t, 20.0).item() > 0.1 * distillation_loss(s, t, 1.0).item()


# --------------------------------------------------------------------------- teacher


def test_teacher_scores_the_catalog(teacher: SASRecTeacher) -> None:
    histories = [np.array([1, 2, 3]), np.array([], dtype=np.int64), np.arange(30) % N_ITEMS]
    scores = teacher.score(histories)
    assert scores.shape == (3, N_ITEMS) and scores.dtype == np.float32
    assert np.isfinite(scores).all()
    assert teacher.n_items == N_ITEMS
    unseen = scores[0].copy()
    unseen[[1, 2, 3]] = -np.inf  # the protocol never recommends a history item
    assert int(np.argmax(unseen)) == 4  # learned "next = last + 1"


def test_teacher_training_reduces_loss_and_beats_pop(
    teacher: SASRecTeacher, split: ProtocolSplit
) -> None:
    losses = teacher.history.losses
    assert losses[-1] < 0.5 * losses[0]
    pop = Pop().fit(split.train_sequences(split.public_users), N_ITEMS)
    for pop_name in ("public", "federated"):
        ours = evaluate_split(teacher, split, [pop_name])[pop_name]
        base = evaluate_split(pop, split, [pop_name])[pop_name]
        assert ours["full_hr@10"] > base["full_hr@10"] + 0.3, pop_name
        assert ours["sampled_ndcg@10"] > base["sampled_ndcg@10"] + 0.3, pop_name


def test_teacher_score_is_deterministic_and_length_invariant(teacher: SASRecTeacher) -> None:
    history = [np.array([5, 9, 10, 11])]
    first = teacher.score(history)
    assert np.array_equal(first, teacher.score(history))
    items, mask = pad_histories(history, 16, pad_to=16)  # same history, longer padding
    with torch.no_grad():
        padded = teacher.model(items, mask).numpy()
    assert np.allclose(first, padded, atol=1e-5)


def test_teacher_sampled_softmax_option_trains() -> None:
    config = TeacherConfig(
        dim=16, n_layers=1, n_heads=1, max_len=8, loss="sampled", n_negatives=8, epochs=2
    )
    seqs = [np.arange(i, i + 6) % N_ITEMS for i in range(20)]
    teacher = SASRecTeacher(text_features(), config).fit(seqs, N_ITEMS)
    assert len(teacher.history.losses) == 2 and np.isfinite(teacher.history.losses).all()


def test_auto_order_keeps_sequence_on_a_sequential_world(
    teacher: SASRecTeacher, split: ProtocolSplit
) -> None:
    """The chain world is all order: 'auto' trains both readings and validation keeps
    'sequence', whose validation metric the kept model reproduces."""
    assert set(teacher.order_scores) == {"sequence", "set"}
    assert teacher.fitted_order == "sequence"
    assert teacher.order_scores["sequence"] > teacher.order_scores["set"] + 0.05
    kept = Validation(split).metric(teacher.member_scorer(0), TINY_TEACHER.metric)
    assert kept == pytest.approx(teacher.order_scores["sequence"], abs=1e-6)
    assert teacher.member_scores[0] == teacher.order_scores["sequence"]


def test_auto_order_without_validation_trains_only_sequence() -> None:
    seqs = [np.arange(i, i + 6) % N_ITEMS for i in range(20)]
    config = TeacherConfig(dim=16, n_layers=1, n_heads=1, max_len=8, epochs=1, prior=True)
    teacher = SASRecTeacher(text_features(), config).fit(seqs, N_ITEMS)
    assert teacher.fitted_order == "sequence" and list(teacher.order_scores) == ["sequence"]
    assert teacher.prior_weight == 0.0 and teacher.prior_scores == {}  # nothing to choose on


def test_ensemble_averages_member_log_probabilities() -> None:
    """Two members: the ensemble's scores are the mean of their log-softmaxes, its item table
    has the mean Gram matrix, and a one-member ensemble is its member exactly."""
    text = text_features()
    config = TeacherConfig(dim=16, n_layers=1, n_heads=1, max_len=8, members=2)
    teacher = SASRecTeacher(text, config)
    ensemble = teacher.build(N_ITEMS).eval()
    a, b = ensemble.models
    assert not torch.equal(a.positions.weight, b.positions.weight)  # seeded apart
    items, mask = pad_histories([np.array([1, 2, 3]), np.array([7])], 8)
    with torch.no_grad():
        got = ensemble(items, mask)
        want = (torch.log_softmax(a(items, mask), -1) + torch.log_softmax(b(items, mask), -1)) / 2
        assert torch.allclose(got, want, atol=1e-6)
        assert torch.allclose(ensemble.all_logits(items, mask)[:, -1], got, atol=1e-5)
        table = ensemble.item_table()
        assert table.shape == (N_ITEMS, 32)
        gram = (a.item_table() @ a.item_table().T + b.item_table() @ b.item_table().T) / 2
        assert torch.allclose(table @ table.T, gram, atol=1e-4)
        alone = SASRecEnsemble([a])
        assert torch.equal(alone(items, mask), a(items, mask))
        assert torch.equal(alone.item_table(), a.item_table())
    with pytest.raises(ConfigError, match="members"):
        TeacherConfig(members=0)
    with pytest.raises(ConfigError, match="no member 2"):
        teacher.member_scorer(2)


def test_the_item_item_prior_adds_standardised_ease_scores_of_the_window() -> None:
    """Weight w: log-softmax of the members plus w x (EASE scores of the window's items,
    centred and scaled over the catalog), after the window and after every prefix; weight 0
    is the members exactly; the table and weight travel in the state dict."""
    seqs = [np.arange(i, i + 7) % N_ITEMS for i in range(30)]
    config = TeacherConfig(dim=16, n_layers=1, n_heads=1, max_len=8, prior=True)
    teacher = SASRecTeacher(text_features(), config)
    net = teacher.build(N_ITEMS)
    assert net.prior is not None and not net.prior.active
    net.prior.fit(seqs, config.prior_l2)
    member = net.first
    histories = [np.array([4, 5, 6]), np.array([9])]
    items, mask = pad_histories(histories, 8)
    with torch.no_grad():
        assert torch.equal(net(items, mask), member(items, mask))  # weight 0: no term
        net.prior.weight.fill_(2.0)
        ease = torch.from_numpy(EASE(config.prior_l2).fit(seqs, N_ITEMS).score(histories))
        z = (ease - ease.mean(1, keepdim=True)) / ease.std(1, keepdim=True)
        want = torch.log_softmax(member(items, mask), -1) + 2.0 * z
        got = net(items, mask)
        assert torch.allclose(got, want, atol=1e-3)
        assert torch.allclose(net.all_logits(items, mask)[:, -1], got, atol=1e-4)
        prefix = net.all_logits(items, mask)[0, -2]  # after items 4, 5 only
        ease45 = torch.from_numpy(EASE(config.prior_l2).fit(seqs, N_ITEMS).score([[4, 5]]))[0]
        z45 = (ease45 - ease45.mean()) / ease45.std()
        head = torch.log_softmax(member.all_logits(items, mask)[0, -2], -1)
        assert torch.allclose(prefix, head + 2.0 * z45, atol=1e-3)
        alone = teacher.attention_scorer().score(histories)
        assert np.allclose(alone, member(items, mask).numpy(), atol=1e-6)
    state = net.state_dict()
    loaded = SASRecTeacher(text_features(), config)
    loaded.build(N_ITEMS).load_state_dict(state)
    assert loaded.prior_weight == 2.0
    assert np.array_equal(loaded.score(histories), teacher.score(histories))
    assert SASRecTeacher(text_features(), replace(config, prior=False)).build(N_ITEMS).prior is None
    for bad in ((), (-1.0,), (float("nan"),)):
        with pytest.raises(ConfigError, match="prior_weights"):
            TeacherConfig(prior_weights=bad)
    with pytest.raises(ConfigError, match="prior_l2"):
        TeacherConfig(prior_l2=0.0)


def test_the_prior_weight_is_the_one_that_validates_best(split: ProtocolSplit) -> None:
    assert not TeacherConfig().prior  # off by default (docs/parameters.md says why)
    teacher = SASRecTeacher(text_features(), replace(TINY_TEACHER, prior=True, epochs=10))
    teacher.fit(split.train_sequences(split.public_users), N_ITEMS, Validation(split))
    scores = teacher.prior_scores
    assert sorted(scores) == sorted(set(TINY_TEACHER.prior_weights))
    best = max(scores, key=lambda w: (scores[w], -w))
    assert teacher.prior_weight == best
    metric = TINY_TEACHER.metric
    assert Validation(split).metric(teacher, metric) == pytest.approx(scores[best], abs=1e-9)
    alone = Validation(split).metric(teacher.attention_scorer(), metric)
    assert alone == pytest.approx(scores[0.0], abs=1e-9)


def test_ensemble_members_train_in_the_chosen_order_and_the_student_learns_from_them(
    split: ProtocolSplit,
) -> None:
    config = replace(TINY_TEACHER, members=2, order="set", epochs=10)
    teacher = SASRecTeacher(text_features(), config).fit(
        split.train_sequences(split.public_users), N_ITEMS, Validation(split)
    )
    assert teacher.fitted_order == "set" and len(teacher.member_scores) == 2
    first, second = teacher.model.models
    assert not torch.equal(first.positions.weight, second.positions.weight)
    for i, score in enumerate(teacher.member_scores):  # each member kept at its best epoch
        got = Validation(split).metric(teacher.member_scorer(i), config.metric)
        assert got == pytest.approx(score, abs=1e-6)
    student = StudentModel.from_teacher(teacher.model, TINY_STUDENT)
    assert student.items.ids.weight.shape == (N_ITEMS, TINY_STUDENT.id_dim)


def test_each_reading_has_its_shape_and_the_fitted_teacher_scores_in_it() -> None:
    config = TeacherConfig(dim=16, n_layers=1, n_heads=1, max_len=20, set_dim=8, set_max_len=6)
    assert (config.reading("sequence").dim, config.reading("sequence").max_len) == (16, 20)
    set_config = config.reading("set")
    assert (set_config.order, set_config.dim, set_config.max_len) == ("set", 8, 6)
    with pytest.raises(ConfigError, match="set_dim 3 must be >= 1 and divisible by n_heads 2"):
        TeacherConfig(n_heads=2, set_dim=3)
    seqs = [np.arange(i, i + 9) % N_ITEMS for i in range(20)]
    teacher = SASRecTeacher(text_features(), replace(config, order="set", epochs=2))
    teacher.fit(seqs, N_ITEMS)
    assert teacher.fitted_order == "set" and teacher.fitted_config.max_len == 6
    assert teacher.model.first.positions.weight.shape == (6, 8)
    long, recent = np.arange(15), np.arange(9, 15)  # only the last 6 items are read
    scores = teacher.score([long, recent])
    assert np.allclose(scores[0], scores[1], atol=1e-5)


def test_pretraining_sizes_the_student_to_the_fitted_reading_and_caches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import time

    from simulation import pretrain as pretrain_module
    from simulation.pretrain import pretrain

    ds = chain_dataset(n_users=40, length=8)
    split = split_users(ds, SplitConfig(seed=3, public_fraction=0.5))
    teacher_cfg = replace(
        TINY_TEACHER, order="set", set_dim=16, set_max_len=8, epochs=3, prior=True
    )
    student_cfg = replace(TINY_STUDENT, dim=32, text_dim=8, id_dim=16, epochs=2)
    first = pretrain(
        ds, split, text_features(), tmp_path, teacher_config=teacher_cfg, student_config=student_cfg
    )
    member = sum(p.numel() for p in first.teacher.model.first.parameters() if p.requires_grad)
    assert first.teacher.fitted_config.dim == 16  # the set reading's width, not dim 32
    assert first.student.config == student_cfg.scaled_to(member)
    assert first.student.config.dim < student_cfg.dim  # narrowed against the small teacher
    again = pretrain(
        ds, split, text_features(), tmp_path, teacher_config=teacher_cfg, student_config=student_cfg
    )
    assert again.cached and not first.cached

    # a cached student trains what a fresh one does (its adapter was left trainable)
    def trainable(model: torch.nn.Module) -> set[str]:
        return {name for name, p in model.named_parameters() if p.requires_grad}

    assert trainable(again.student.model) == trainable(first.student.model)
    (written,) = (tmp_path / "pretrained").glob("*.pt")
    # a write removes other keys' files unused for a month (each data, config and library
    # version left one forever); a file that is only read is in use, so it stays
    month, day = time.time() - 31 * 86400, time.time() - 86400
    idle = tmp_path / "pretrained" / f"ml-100k-{'a' * 20}.pt"
    recent = tmp_path / "pretrained" / f"ml-100k-{'b' * 20}.pt"
    foreign = tmp_path / "pretrained" / "notes.pt"
    for file in (idle, recent, foreign):
        file.write_bytes(b"x")
    for file, stamp in ((idle, month), (recent, day), (foreign, month), (written, month)):
        os.utime(file, (stamp, stamp))
    assert pretrain(
        ds, split, text_features(), tmp_path, teacher_config=teacher_cfg, student_config=student_cfg
    ).cached
    # training code that changed what a config trains to says so through the cache version
    monkeypatch.setattr(pretrain_module, "PRETRAIN_CACHE_VERSION", 10**6)
    retrained = pretrain(
        ds, split, text_features(), tmp_path, teacher_config=teacher_cfg, student_config=student_cfg
    )
    assert not retrained.cached
    assert written.exists() and recent.exists() and foreign.exists() and not idle.exists()
    monkeypatch.undo()
    for path in (tmp_path / "pretrained").glob("*.pt"):
        if path != written:
            path.unlink()
    # a temp file a killed cache write left is removed by the next write (a young one is not)
    stale = tmp_path / "pretrained" / ".synthetic-0123.pt.xyz.tmp"
    young = tmp_path / "pretrained" / ".synthetic-4567.pt.xyz.tmp"
    stale.write_bytes(b"half a model")
    young.write_bytes(b"a write in progress")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert again.teacher.fitted_order == "set" and again.student.config == first.student.config
    assert again.teacher.prior_scores == first.teacher.prior_scores
    assert again.teacher.prior_weight == first.teacher.prior_weight
    histories = [split.history(int(u)) for u in split.public_users[:5]]
    assert np.array_equal(again.teacher.score(histories), first.teacher.score(histories))
    assert np.array_equal(again.student.score(histories), first.student.score(histories))
    # an empty, garbage, truncated or altered cache file (a crash, a full disk, a flipped
    # bit in a weight) or one of another layout is retrained, not fatal nor silently used
    (cached,) = (tmp_path / "pretrained").glob("*.pt")
    good = cached.read_bytes()
    header, _, payload = good.partition(b"\n")
    flipped = bytearray(good)
    flipped[len(header) + 1 + len(payload) // 2] ^= 0x10
    other_layout = io.BytesIO()
    torch.save([1, 2, 3], other_layout)
    for broken in (b"", b"not a torch file", good[: len(good) // 2], bytes(flipped)):
        cached.write_bytes(broken)
        rebuilt = pretrain(
            ds, split, text_features(), tmp_path, teacher_config=teacher_cfg,
            student_config=student_cfg,
        )  # fmt: skip
        assert not rebuilt.cached and cached.read_bytes() == good
        assert not stale.exists() and young.exists()
    for unchecked in (other_layout.getvalue(), payload):  # a file from before the digest
        cached.write_bytes(unchecked)
        loaded = pretrain(
            ds, split, text_features(), tmp_path, teacher_config=teacher_cfg,
            student_config=student_cfg,
        )  # fmt: skip
        assert loaded.cached == (unchecked == payload)
    # a cache that cannot be written costs the cache, not the trained models
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "pretrained").write_text("a file where the cache folder goes")
    kept = pretrain(
        ds, split, text_features(), blocked, teacher_config=teacher_cfg, student_config=student_cfg
    )
    assert not kept.cached
    assert np.array_equal(kept.student.score(histories), first.student.score(histories))


@pytest.mark.parametrize("library", ["torch", "numpy"])
def test_the_pretraining_cache_key_follows_the_libraries_that_train(
    monkeypatch: pytest.MonkeyPatch, library: str
) -> None:
    """The key held the data and the configs, not the libraries: after an upgrade of torch
    (every kernel of training) or numpy (the teacher prior's EASE inverse), a rerun loaded
    the models the old versions trained. Another library's upgrade keeps the key."""
    import importlib.metadata

    from simulation.pretrain import cache_key

    ds = chain_dataset(n_users=20, length=6)
    split = split_users(ds, SplitConfig(seed=3, public_fraction=0.5))

    def key() -> str:
        return cache_key(ds, split, text_features(), TINY_TEACHER, TINY_STUDENT)

    before = key()
    real = importlib.metadata.version

    def upgraded(to: str) -> None:
        monkeypatch.setattr(
            importlib.metadata, "version", lambda name: "99.0" if name == to else real(name)
        )

    upgraded("flwr")
    assert key() == before
    upgraded(library)
    assert key() != before


def test_pretraining_leaves_the_global_rng_as_it_found_it(tmp_path: Path) -> None:
    """Fresh or from the cache, pretraining draws only from seeded, restored generators: what
    runs after it (a benchmark's dropout under DP-SGD) repeats whether the cache was hit."""
    from simulation.pretrain import pretrain

    ds = chain_dataset(n_users=40, length=8)
    split = split_users(ds, SplitConfig(seed=3, public_fraction=0.5))
    teacher_cfg = replace(TINY_TEACHER, order="sequence", epochs=2)
    student_cfg = replace(TINY_STUDENT, epochs=2)
    for cached in (False, True):
        torch.manual_seed(0)
        before = torch.random.get_rng_state()
        run = pretrain(
            ds, split, text_features(), tmp_path, teacher_config=teacher_cfg,
            student_config=student_cfg,
        )  # fmt: skip
        assert run.cached == cached
        assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    student_cfg.trainable_parameters()
    assert torch.equal(torch.random.get_rng_state(), before)


def test_a_cached_student_sized_by_other_code_is_retrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key holds the configured student; the sized one is derived on load. A cache whose
    tables another sizing rule made (e.g. before scaled_to stopped widening thin tables) is
    retrained, not loaded under a config that misdescribes them."""
    from simulation.pretrain import pretrain

    ds = chain_dataset(n_users=40, length=8)
    split = split_users(ds, SplitConfig(seed=3, public_fraction=0.5))
    teacher_cfg = replace(TINY_TEACHER, order="sequence", epochs=2)
    student_cfg = replace(TINY_STUDENT, epochs=2)

    def run() -> bool:
        return pretrain(
            ds, split, text_features(), tmp_path, teacher_config=teacher_cfg,
            student_config=student_cfg,
        ).cached  # fmt: skip

    assert not run() and run()
    sized = StudentConfig.scaled_to
    monkeypatch.setattr(
        StudentConfig,
        "scaled_to",
        lambda self, *args: replace(sized(self, *args), text_dim=self.text_dim - 2),
    )
    assert not run() and run()


def test_benchmark_cache_dir_is_expanded_and_never_blank(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A blank --cache-dir cached into the current folder and ``~`` (``--cache-dir=~/x``,
    which the shell leaves alone) made a folder named ``~`` there."""
    import argparse

    from simulation.pretrain import add_pretrain_arguments

    monkeypatch.setenv("HOME", str(tmp_path))
    parser = argparse.ArgumentParser()
    add_pretrain_arguments(parser, "synthetic")
    assert parser.parse_args(["--cache-dir", "~/c"]).cache_dir == str(tmp_path / "c")
    for blank in ("", "  "):
        with pytest.raises(SystemExit):
            parser.parse_args(["--cache-dir", blank])


def test_set_order_trains_and_sees_no_order() -> None:
    """Trained on shuffled histories, the 'set' teacher scores a history the same whatever
    its order much more than the 'sequence' teacher does on the chain world."""
    rng = np.random.default_rng(4)
    seqs = [(int(rng.integers(N_ITEMS)) + np.arange(10)) % N_ITEMS for _ in range(60)]
    gaps = {}
    for order in ("sequence", "set"):
        config = TeacherConfig(
            dim=16, n_layers=1, n_heads=1, max_len=12, dropout=0.0, epochs=15, lr=5e-3,
            order=order,
        )  # fmt: skip
        teacher = SASRecTeacher(text_features(), config).fit(seqs, N_ITEMS)
        assert teacher.fitted_order == order
        history = np.array([3, 4, 5, 6])
        forward, backward = teacher.score([history, history[::-1].copy()])
        gaps[order] = float(np.abs(forward - backward).mean())
    assert gaps["set"] < 0.5 * gaps["sequence"]


def test_permute_windows_shuffles_each_history_and_keeps_padding() -> None:
    windows = make_causal_windows([np.array([1, 2, 3, 4, 5]), np.array([7, 8])], max_len=6)
    gen = torch.Generator().manual_seed(0)
    changed = False
    for _ in range(5):
        items, mask, targets = permute_windows(windows.items, windows.mask, windows.targets, gen)
        assert torch.equal(mask, windows.mask)
        for row in range(len(items)):
            length = int(mask[row].sum())
            inputs, nexts = items[row, -length:], targets[row, -length:]
            history = torch.cat([inputs, nexts[-1:]])
            original = torch.cat([windows.items[row, -length:], windows.targets[row, -1:]])
            assert sorted(history.tolist()) == sorted(original.tolist())
            assert torch.equal(nexts[:-1], inputs[1:])  # still next-item targets
            assert torch.equal(items[row, :-length], windows.items[row, :-length])
            assert (targets[row, :-length] == IGNORE_TARGET).all()
            changed |= not torch.equal(history, original)
    assert changed
    assert torch.equal(windows.items[0, -4:], torch.tensor([1, 2, 3, 4]))  # input untouched


def test_seen_items_marks_the_prefix_of_each_position() -> None:
    items = torch.tensor([[0, 2, 1], [0, 0, 3]])  # row 1: two padding slots holding item 0
    mask = torch.tensor([[True, True, True], [False, False, True]])
    seen = seen_items(items, mask, 4)
    assert seen[0].tolist() == [
        [True, False, False, False],
        [True, False, True, False],
        [True, True, True, False],
    ]
    assert seen[1].tolist() == [[False] * 4, [False] * 4, [False, False, False, True]]


def test_loss_excluding_seen_items_is_the_masked_cross_entropy() -> None:
    config = TeacherConfig(dim=16, n_layers=1, n_heads=1, max_len=4, dropout=0.0)
    with seeded(0):
        model = SASRecModel(text_features(), config).eval()
    items = torch.tensor([[0, 5, 6, 7], [3, 4, 9, 2]])
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    targets = torch.tensor([[IGNORE_TARGET, 6, 7, 8], [4, 9, 2, 1]])
    with torch.no_grad():
        logits = model.all_logits(items, mask)
        got = model.loss(items, mask, targets, exclude_seen=True)
        plain = model.loss(items, mask, targets)
    expected = []
    for b in range(2):
        for j in range(4):
            if targets[b, j] == IGNORE_TARGET:
                continue
            row = logits[b, j].clone()
            row[items[b, : j + 1][mask[b, : j + 1]]] = float("-inf")
            expected.append(F.cross_entropy(row[None], targets[b, j][None]))
    want = torch.stack(expected).mean()
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert float(plain) > float(got)  # seen items took mass


def test_teacher_rejects_bad_configs_and_data() -> None:
    with pytest.raises(ConfigError):
        TeacherConfig(dim=30, n_heads=4)
    with pytest.raises(ConfigError):
        TeacherConfig(loss="nope")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="order"):
        TeacherConfig(order="random")  # type: ignore[arg-type]
    with pytest.raises(DataError):
        SASRecTeacher(text_features(n=5)).fit([np.array([0, 1])], N_ITEMS)
    with pytest.raises(ConfigError):
        SASRecTeacher(text_features()).score([np.array([1])])  # not fitted


# --------------------------------------------------------------------------- student


def test_student_parameter_budget_against_the_default_teacher() -> None:
    """Default configs on an ml-100k-sized catalog with 384-d MiniLM text embeddings."""
    n_items = 1682
    text = text_features(n_items, 384)
    teacher = SASRecModel(text, TeacherConfig())
    teacher_trainable = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
    student = StudentModel.from_teacher(teacher, StudentConfig())
    assert student.config.dim <= 64
    assert student.num_parameters() <= teacher_trainable / 10
    attention_layers = [m for m in student.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert not attention_layers  # one hand-written read-out attention, no stacks


def test_student_config_refuses_wide_models() -> None:
    with pytest.raises(ConfigError):
        StudentConfig(dim=128)
    with pytest.raises(ConfigError):
        StudentConfig(alpha=1.5)


def test_parameter_groups_are_disjoint_and_cover_everything() -> None:
    model = small_student()
    groups = model.named_parameter_groups()
    names = [set(g) for g in groups.values()]
    assert all(names)  # no empty group
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert set().union(*names) == {n for n, _ in model.named_parameters()}
    ids = {id(p) for p in model.parameters()}
    assert {id(p) for p in model.global_parameters()} | {
        id(p) for p in model.personal_parameters()
    } | {id(p) for p in model.frozen_parameters()} == ids
    assert set(groups["frozen"]) == {"items.text.weight", "items.ids.weight"}
    assert all(n.startswith("adapter.") for n in groups["personal"])
    assert not any(p.requires_grad for p in model.frozen_parameters())
    model.set_trainable(["personal"])
    assert all(p.requires_grad for p in model.personal_parameters())
    assert not any(p.requires_grad for p in model.global_parameters())
    with pytest.raises(ConfigError):
        model.set_trainable(["frozen"])


def test_the_parameter_counts_docs_parameters_md_gives_are_the_models() -> None:
    """docs/parameters.md sizes each parameter group of the default student on ml-100k
    (1,682 items) and the teacher it is measured against; a change of `StudentConfig`,
    `TeacherConfig` or the architecture would leave those figures stale without this."""
    import re

    n_items, config = 1682, StudentConfig()
    model = StudentModel(
        np.zeros((n_items, config.text_dim), np.float32),
        np.zeros((n_items, config.id_dim), np.float32),
        config,
    )
    shapes = dict(model.named_parameters())
    counts = {
        group: sum(shapes[name].numel() for name in names)
        for group, names in model.named_parameter_groups().items()
    }
    text = (Path(__file__).resolve().parents[1] / "docs" / "parameters.md").read_text()
    table = dict(
        re.findall(r"^\| \*\*(global|personal|frozen)\*\* \|[^|]*\| ([\d,]+) \|", text, re.M)
    )
    assert {group: int(n.replace(",", "")) for group, n in table.items()} == counts
    teacher = SASRecModel(np.zeros((n_items, 384), np.float32), TeacherConfig())
    trainable = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
    own = counts["global"] + counts["personal"]
    share = f"{100 * own / trainable:.1f}%"
    claim = f"(global + personal, {own:,} scalars) is {share} of the teacher's {trainable:,}"
    assert claim in " ".join(text.split())


def test_global_state_round_trip() -> None:
    a, b = small_student(), small_student()
    with torch.no_grad():
        for p in a.global_parameters():
            p.add_(1.0)
    b.load_global_state_dict(a.global_state_dict())
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        if a.parameter_group(name) == "global":
            assert torch.equal(pa, pb)
    with pytest.raises(ModelFileError):
        b.load_global_state_dict({"nope": torch.zeros(1)})


def test_student_forward_shapes_and_fresh_adapter_is_identity() -> None:
    model = small_student().eval()
    items, mask = pad_histories([np.array([1, 2, 3]), np.array([4])], 8)
    scores = model(items, mask)
    assert scores.shape == (2, N_ITEMS) and scores.dtype == torch.float32
    u = model.encode(items, mask)
    with torch.no_grad():
        model.adapter.up.bias.fill_(0.5)
    assert torch.allclose(model.encode(items, mask), u + 0.5, atol=1e-6)
    model.adapter.reset()
    assert torch.allclose(model.encode(items, mask), u, atol=1e-6)
    assert torch.allclose(model(items, mask, gather_first=False), scores, atol=1e-5)


def test_student_score_is_deterministic_in_eval_mode(student: DistilledStudent) -> None:
    histories = [np.array([3, 4, 5]), np.array([10]), np.array([], dtype=np.int64)]
    first = student.score(histories)
    assert np.array_equal(first, student.score(histories))
    assert first.shape == (3, N_ITEMS) and np.isfinite(first).all()
    model = student.model
    items, mask = pad_histories(histories, TINY_STUDENT.max_len)
    model.train()
    with torch.no_grad():
        noisy = model(items, mask)  # dropout on: differs from eval
    model.eval()
    assert not torch.allclose(noisy, torch.from_numpy(first))


def test_exportable_student_matches_and_handles_any_length(student: DistilledStudent) -> None:
    model = student.model.eval()
    export = ExportableStudent(model).eval()
    assert export.output_table.shape == (N_ITEMS, TINY_STUDENT.dim)
    for length in (3, TINY_STUDENT.max_len):
        items, mask = pad_histories([np.array([1, 2, 3]), np.array([7])], 8, pad_to=length)
        with torch.no_grad():
            assert torch.allclose(export(items, mask), model(items, mask), atol=1e-4)
    with torch.no_grad():  # padding to a longer window changes nothing
        short = export(*pad_histories([np.array([1, 2, 3])], 8, pad_to=3))
        long = export(*pad_histories([np.array([1, 2, 3])], 8, pad_to=8))
    assert torch.allclose(short, long, atol=1e-5)


def test_an_empty_history_scores_from_the_mean_public_user(
    student: DistilledStudent, split: ProtocolSplit, tmp_path: Path
) -> None:
    """A new device has no history. Its user vector is the mean pre-adapter user vector of
    the public training histories, whoever else is in the batch, and the int8 on-device
    model agrees (before, the padding id, a real item, was pooled as if watched)."""
    from shared.compression.artifact import publish_student
    from shared.ondevice.runtime import OnDeviceModel

    model = student.model.eval()
    public = split.train_sequences(split.public_users)
    windows = [h[-TINY_STUDENT.max_len :] for h in public]
    with torch.no_grad():
        items, mask = pad_histories(windows, TINY_STUDENT.max_len)
        pooled = model.pool(model.items(items), mask)
        cold = model.adapter(pooled.mean(dim=0, keepdim=True))
        tables = model.item_tables()
        expected = cold @ tables.output.T + tables.bias
    assert torch.allclose(model.cold_user, pooled.mean(dim=0), atol=1e-5)
    empty = np.array([], dtype=np.int64)
    alone = student.score([empty])
    beside_a_long_one = student.score([empty, np.arange(TINY_STUDENT.max_len)])[:1]
    np.testing.assert_allclose(alone, expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(alone, beside_a_long_one, atol=1e-5)
    ids = [f"i{i}" for i in range(N_ITEMS)]
    publish_student(model, ids, tmp_path / "m.onnx", version="1")
    device = OnDeviceModel(tmp_path / "m.onnx", expected_n_items=N_ITEMS)
    on_device = device.score([empty])[0]
    assert np.corrcoef(on_device, alone[0])[0, 1] > 0.99  # int8 rounding only
    assert np.argmax(on_device) == np.argmax(alone[0])


def test_distilled_student_learns_and_beats_pop(
    student: DistilledStudent, teacher: SASRecTeacher, split: ProtocolSplit
) -> None:
    losses = student.history.losses
    assert losses[-1] < losses[0]
    pop = Pop().fit(split.train_sequences(split.public_users), N_ITEMS)
    ours = evaluate_split(student, split)
    base = evaluate_split(pop, split)
    for name in ("public", "federated"):
        assert ours[name]["full_hr@10"] > base[name]["full_hr@10"] + 0.3, name
    assert student.model.num_parameters() < sum(
        p.numel() for p in teacher.model.parameters() if p.requires_grad
    )
    # the frozen tables stayed frozen through distillation
    assert not any(p.requires_grad for p in student.model.frozen_parameters())
    assert not any(p.requires_grad for p in student.model.personal_parameters())


def test_student_needs_a_teacher() -> None:
    with pytest.raises(ConfigError):
        DistilledStudent(None).fit([np.array([1, 2])], N_ITEMS)


def test_train_epoch_with_next_item_examples_reduces_loss() -> None:
    """The client-side loop: per-transition examples, plain CE, global parameters only."""
    model = small_student()
    model.set_trainable(["global"])
    seqs = [np.arange(i, i + 10) % N_ITEMS for i in range(N_ITEMS)]
    ex = make_next_item_examples(seqs, 8)
    with seeded(0) as gen:
        loader = DataLoader(ex.dataset(), batch_size=32, shuffle=True, generator=gen)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = [train_epoch(model, loader, opt, next_item_loss, 5.0) for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0]


def test_seeded_restores_the_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    with seeded(5):
        torch.rand(3)
    assert torch.equal(torch.rand(1), expected)


def test_train_config_validation() -> None:
    with pytest.raises(ConfigError):
        TrainConfig(metric="auc")
    with pytest.raises(ConfigError):
        TrainConfig(lr=0)


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_rates_and_temperatures_are_refused_before_training(value: float) -> None:
    """An infinite learning rate or weight decay passed, and training failed after its first
    epoch ('parameter ... is not finite; lower the learning rate', also for the decay); a NaN
    decay was AdamW's bare ValueError; an infinite temperature made every distillation loss
    NaN ('loss is nan; lower the learning rate')."""
    for name in ("lr", "weight_decay"):
        with pytest.raises(ConfigError, match=f"{name} must be a finite number"):
            TrainConfig(**{name: value})
        with pytest.raises(ConfigError, match=f"{name} must be a finite number"):
            replace(TINY_TEACHER, **{name: value})
        with pytest.raises(ConfigError, match=f"{name} must be a finite number"):
            replace(TINY_STUDENT, **{name: value})
    with pytest.raises(ConfigError, match="temperature must be a finite number"):
        replace(TINY_STUDENT, temperature=value)
    logits = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match="temperature must be a finite number"):
        distillation_loss(logits, logits, value)
    TrainConfig(grad_clip=math.inf)  # no clipping: a valid choice


# --------------------------------------------------------------------------- Opacus


def test_opacus_dp_sgd_step_on_the_student() -> None:
    """A real DP-SGD step: per-sample grads for every trainable (global) parameter, exact in
    hooks mode, parameters updated, frozen and personal ones untouched."""
    opacus = pytest.importorskip("opacus")
    model = small_student(dropout=0.0)
    model.set_trainable(["global"])
    seqs = [np.arange(i, i + 3 + i % 6) % N_ITEMS for i in range(24)]
    ex = make_next_item_examples(seqs, 8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.named_parameter_groups()["global"])

    with seeded(0) as gen:
        loader = DataLoader(ex.dataset(), batch_size=16, shuffle=True, generator=gen)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        engine = opacus.PrivacyEngine()
        private, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
        )
        items, mask, targets = next(iter(loader))
        private.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(private(items, mask), targets)
        loss.backward()
        batch = len(targets)
        named = dict(model.named_parameters())
        samples: dict[str, torch.Tensor] = {}
        for name in trainable:
            gs = getattr(named[name], "grad_sample", None)
            assert gs is not None, name
            assert gs.shape == (batch, *named[name].shape), name
            samples[name] = gs
        for p in model.frozen_parameters():
            assert getattr(p, "grad_sample", None) is None and p.grad is None

        # hooks-mode per-sample gradient == autograd gradient of that example alone
        probe = small_student(dropout=0.0)
        probe.load_state_dict(model.state_dict())
        probe.set_trainable(["global"])
        probe_loss = F.cross_entropy(probe(items[:1], mask[:1]), targets[:1])
        grads = torch.autograd.grad(
            probe_loss, [dict(probe.named_parameters())[n] for n in trainable]
        )
        for name, g in zip(trainable, grads, strict=True):
            assert torch.allclose(samples[name][0], g, atol=1e-5), name

        optimizer.step()
    after = dict(model.named_parameters())
    for name, p in after.items():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (name in trainable), name


# --------------------------------------------------------------------------- real data (slow)


@pytest.mark.slow
def test_ml100k_teacher_beats_public_ease_and_student_tracks_it(ml100k_dir: object) -> None:
    """The bench's acceptance check with the default configs (minutes on 2 CPU cores)."""
    from shared.data.registry import load_dataset
    from shared.models.baselines import EASE
    from shared.text.encoder import encode_items

    dataset = load_dataset("ml-100k", str(ml100k_dir), download=False)
    try:
        text = encode_items(dataset.item_text)
    except ConfigError as err:  # the bundled MiniLM package is missing
        pytest.skip(str(err))
    torch.set_num_threads(2)
    split = split_users(dataset, SplitConfig(seed=42))
    public = split.train_sequences(split.public_users)
    ease = EASE(250.0).fit(public, dataset.n_items)
    teacher = SASRecTeacher(text, TeacherConfig()).fit(public, dataset.n_items, Validation(split))
    student = DistilledStudent(teacher, StudentConfig()).fit(
        public, dataset.n_items, Validation(split)
    )
    base, ours, small = (evaluate_split(m, split) for m in (ease, teacher, student))
    for pop_name in ("public", "federated"):
        for metric in ("sampled_hr@10", "full_hr@10"):
            assert ours[pop_name][metric] > base[pop_name][metric], (pop_name, metric)
            assert small[pop_name][metric] >= ours[pop_name][metric] - 0.02, (pop_name, metric)


def test_student_config_narrows_to_a_tenth_of_the_teacher() -> None:
    from shared.models.student import MAX_TEACHER_RATIO

    cfg = StudentConfig()
    full = cfg.trainable_parameters()
    assert cfg.scaled_to(20 * full) == cfg  # fits already: unchanged
    small = cfg.scaled_to(7 * full)
    assert small.dim < cfg.dim and small.dim % 8 == 0
    assert small.trainable_parameters() <= MAX_TEACHER_RATIO * 7 * full
    assert cfg.scaled_to(10).dim == 16  # nothing fits: the narrowest, for the caller to report
    built = StudentModel(
        np.zeros((5, small.text_dim), np.float32), np.zeros((5, small.id_dim), np.float32), small
    )
    assert built.num_parameters() == small.trainable_parameters()
    # tables narrower than the floor of 8 are never widened: a fitting config is unchanged,
    # a narrowed one keeps them as they are
    thin = StudentConfig(dim=32, text_dim=4, id_dim=6)
    assert thin.scaled_to(20 * thin.trainable_parameters()) == thin
    narrowed = thin.scaled_to(10)
    assert (narrowed.dim, narrowed.text_dim, narrowed.id_dim) == (16, 4, 6)


@pytest.mark.parametrize(
    ("config", "names"),
    [
        (PruneConfig(sparsity=0.5), {"query.weight", "key.weight"}),
        (
            PruneConfig(sparsity=0.5, scope="per_layer", include_embeddings=True),
            {"query.weight", "key.weight", "positions.weight", "input_table", "output_table"},
        ),
    ],
)
def test_pruning_acts_on_what_the_exported_graph_executes(
    config: PruneConfig, names: set[str]
) -> None:
    """The heads and projections are folded into the item tables at export and the adapter
    is the identity: pruning them (as before) counted zeros the file never held."""
    from shared.compression.artifact import prune_export_graph

    model = small_student().eval()
    export = ExportableStudent(model).eval()
    items, mask = pad_histories([np.array([1, 2, 3]), np.array([4])], 8)
    with torch.no_grad():
        before = export(items, mask)
    report = prune_export_graph(export, config)
    assert {layer.name for layer in report.layers} == names
    assert report.overall == pytest.approx(0.5, abs=0.01)
    executed = [model.query.weight, model.key.weight]
    if config.include_embeddings:
        executed += [model.positions.weight, export.input_table, export.output_table]
    zeros = sum(int((t == 0).sum()) for t in executed)
    assert zeros / sum(t.numel() for t in executed) == pytest.approx(0.5, abs=0.01)
    with torch.no_grad():
        assert not torch.allclose(export(items, mask), before)  # the graph did change
    assert float(model.head_text.weight.abs().min()) > 0  # folded away: left alone


def test_a_loss_that_diverges_after_a_good_epoch_keeps_the_best_epoch() -> None:
    model = torch.nn.Linear(2, 1)
    scores = {1: 0.1, 2: 0.5, 3: 0.3}

    def run_epoch(epoch: int) -> float:
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        if epoch == 4:
            raise TrainingDivergedError("loss is nan; lower the learning rate")
        return 1.0

    def validate() -> float:
        return scores[int(model.weight[0, 0].item())]

    config = TrainConfig(epochs=10, patience=5)
    history = fit_with_early_stopping(model, run_epoch, validate, config, desc="teacher")
    assert history.diverged and history.best_epoch == 2 and len(history.losses) == 3
    assert model.weight[0, 0].item() == 2.0  # the best epoch's weights, not the last ones
    with pytest.raises(TrainingDivergedError, match="student, epoch 4: loss is nan"):
        fit_with_early_stopping(model, run_epoch, None, config, desc="student")


def test_a_target_the_history_repeats_stays_a_candidate_of_the_set_reading() -> None:
    """With exclude_seen, the seen-item mask also hid a repeated target: its loss was ~1e9,
    with no gradient (next_item_cross_entropy, the student's, keeps it)."""
    from shared.models.teacher import SASRecModel

    torch.manual_seed(0)
    config = TeacherConfig(dim=8, n_heads=1, n_layers=1, max_len=4, order="set")
    model = SASRecModel(np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32), config)
    items, mask = torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool)
    fresh = model.loss(items, mask, torch.tensor([[2, 3, 4]]), exclude_seen=True)
    repeat = model.loss(items, mask, torch.tensor([[2, 3, 1]]), exclude_seen=True)  # 1 again
    assert float(repeat) < 10 * float(fresh)
    repeat.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())


def test_validation_draws_its_negatives_from_the_splits_seed() -> None:
    """Every run selected its pretrained models on seed 42's negatives, whatever its seed,
    while its figures are reported on its own seed's."""
    from shared.eval.protocol import EvalConfig
    from tests.conftest import make_dataset

    ds = make_dataset(n_users=300, n_items=300, length=20, seed=1)
    split = split_users(ds, SplitConfig(seed=7, public_fraction=0.5))
    order = np.random.default_rng(0).random(300)

    class Scores:
        n_items = 300

        def score(self, histories: Any) -> np.ndarray:
            return np.tile(order, (len(histories), 1))  # one fixed, arbitrary order

    mine = evaluate_split(Scores(), split, ("public",), "valid", EvalConfig(seed=7))
    other = evaluate_split(Scores(), split, ("public",), "valid", EvalConfig(seed=42))
    assert mine != other  # the seed matters here
    assert Validation(split).evaluate(Scores()) == mine


def test_a_model_that_scores_nan_or_infinity_is_diverged_not_a_best_epoch(
    split: ProtocolSplit,
) -> None:
    """Weights that blew up score NaN or infinity, which the protocol counts as misses: the
    validation metric was a finite 0.0, taken as the first best epoch, and when the next
    epoch's loss was NaN training 'kept its best epoch', the broken weights, with a warning
    only. A NaN weight after the last epoch of an unvalidated run was returned as trained."""
    model = torch.nn.Linear(2, 1)
    order = np.arange(N_ITEMS, dtype=np.float32)

    class WeightScores:
        n_items = N_ITEMS

        def score(self, histories: Any) -> np.ndarray:
            with np.errstate(invalid="ignore", over="ignore"):  # 0 * inf, 39 * 1e38
                row = order * float(model.weight.detach()[0, 0])
            return np.tile(row, (len(histories), 1))

    with pytest.raises(TrainingDivergedError, match="NaN or infinit"):
        with torch.no_grad():
            model.weight.fill_(float("inf"))
        Validation(split).metric(WeightScores(), "sampled_ndcg@10")

    def run_epoch(epoch: int) -> float:
        if epoch == 2:
            raise TrainingDivergedError("loss is nan; lower the learning rate")
        with torch.no_grad():
            model.weight.fill_(1e38)  # finite, but its scores overflow
        return 1.0

    def validate() -> float:
        return Validation(split).metric(WeightScores(), "sampled_ndcg@10")

    config = TrainConfig(epochs=3, patience=5)
    with pytest.raises(TrainingDivergedError, match=r"teacher, epoch 1: .*NaN or infinit"):
        fit_with_early_stopping(model, run_epoch, validate, config, desc="teacher")

    def nan_epoch(epoch: int) -> float:
        with torch.no_grad():
            model.weight.fill_(float("nan"))
        return 1.0

    with pytest.raises(TrainingDivergedError, match=r"student, epoch 1: .*weight is not finite"):
        fit_with_early_stopping(model, nan_epoch, None, config, desc="student")


def test_histories_and_training_data_outside_the_catalog_are_refused_clearly(
    teacher: SASRecTeacher, student: DistilledStudent
) -> None:
    """Scoring a history with an unknown id failed with torch's 'index out of range in
    self' (negative ids too), and fitting on one with an IndexError from numpy or
    cross-entropy ('Target -1 is out of bounds'): no word of which history or what to do."""
    for model in (teacher, student):
        for bad in ([1, N_ITEMS], [-1, 2]):
            with pytest.raises(DataError, match=rf"history #1 .*outside \[0, {N_ITEMS}\)"):
                model.score([np.array([1, 2]), np.array(bad)])
    good = [np.arange(5), np.arange(5, 10)]
    for bad in ([1, N_ITEMS], [3, -1]):
        sequences = [*good, np.array(bad)]
        with pytest.raises(DataError, match=r"training sequence #2 .*outside"):
            SASRecTeacher(text_features(), TINY_TEACHER).fit(sequences, N_ITEMS)
        with pytest.raises(DataError, match=r"distillation sequence #2 .*outside"):
            DistilledStudent(teacher, TINY_STUDENT).fit(sequences, N_ITEMS)


# --------------------------------------------------------------------------- pretraining device


def test_pretraining_refuses_a_device_it_cannot_use(tmp_path: Path) -> None:
    """Pretraining always trained on the CPU whatever ``device`` said. Now it trains where
    ``device`` says, so a GPU this machine lacks is refused at once, naming the fix."""
    from simulation.pretrain import pretrain

    for bad in ("tpu", "gpu", "cuda:x"):
        with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
            SASRecTeacher(text_features(), TINY_TEACHER, device=bad)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert SASRecTeacher(text_features(), TINY_TEACHER, device="auto").device.type == auto
    assert DistilledStudent(None, TINY_STUDENT, device="auto").device.type == auto
    if torch.cuda.is_available():
        return
    fix = "torch sees no GPU .*; use device=auto or device=cpu"
    with pytest.raises(ConfigError, match=f"device 'cuda' asked for CUDA but {fix}"):
        SASRecTeacher(text_features(), TINY_TEACHER, device="cuda")
    with pytest.raises(ConfigError, match=f"device 'cuda:0' asked for CUDA but {fix}"):
        DistilledStudent(None, TINY_STUDENT, device="cuda:0")
    ds = chain_dataset(n_users=20, length=6)
    split = split_users(ds, SplitConfig(seed=3, public_fraction=0.5))
    with pytest.raises(ConfigError, match=fix):
        pretrain(
            ds, split, text_features(), tmp_path, teacher_config=TINY_TEACHER,
            student_config=TINY_STUDENT, device="cuda",
        )  # fmt: skip
    assert not any(tmp_path.iterdir())  # refused before any training or caching


class _RecordingTeacherNet(SASRecModel):
    """A teacher member that records where its loss inputs are (and computes nothing)."""

    seen: list[tuple[torch.device, tuple[int, ...]]]

    def loss(
        self,
        items: torch.Tensor,
        mask: torch.Tensor,
        targets: torch.Tensor,
        *,
        exclude_seen: bool = False,
    ) -> torch.Tensor:
        self.seen.append((items.device, tuple(items.shape)))
        assert mask.device == targets.device == items.device
        return torch.zeros((), device=items.device)


def _padded_batch() -> tuple[torch.Tensor, ...]:
    windows = make_causal_windows([np.arange(1, 6), np.arange(7, 10)], 8)  # 3 padding columns
    return windows.items, windows.mask, windows.targets


def test_teacher_batches_move_to_the_models_device() -> None:
    """The loader makes batches on the CPU; the teacher's losses moved none of them, so a
    model on a GPU got CPU inputs. The batch is trimmed (and shuffled, for 'set') on the
    CPU and handed to the model where its parameters are (a ``meta`` model stands for a GPU
    here: it holds no data, so it only shows where the inputs went)."""
    from shared.models.teacher import _sequence_loss, _set_loss

    model = _RecordingTeacherNet(text_features(), replace(TINY_TEACHER, max_len=8))
    model.seen = []
    model.to("meta")
    batch = _padded_batch()
    assert _sequence_loss(model, batch).device.type == "meta"
    assert _set_loss(torch.Generator().manual_seed(0))(model, batch).device.type == "meta"
    assert model.seen == [(torch.device("meta"), (2, 4))] * 2  # trimmed to 4 inputs, not 8
    assert all(t.device.type == "cpu" for t in batch)  # the loader's batch is left alone


class _RecordingTeacher(nn.Module):
    """Stands in for a teacher net: records where its windows are, returns zero logits."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1, device=device))
        self.seen: list[torch.device] = []

    def all_logits(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.seen.append(items.device)
        assert mask.device == items.device
        return torch.zeros((*items.shape, N_ITEMS), device=self.anchor.device)


class _RecordingStudent(nn.Module):
    """Stands in for a student: records where its prefixes are, returns zero logits."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1, device=device))
        self.seen: list[tuple[torch.device, tuple[int, ...]]] = []

    def forward(self, items: torch.Tensor, mask: torch.Tensor, gather_first: bool) -> torch.Tensor:
        self.seen.append((items.device, tuple(items.shape)))
        assert mask.device == items.device
        return torch.zeros((items.shape[0], N_ITEMS), device=self.anchor.device) + self.anchor


@pytest.mark.parametrize("teacher_on", ["cpu", "meta"])
def test_distillation_batches_move_to_each_models_device(teacher_on: str) -> None:
    """Distillation ran its CPU batches through the models wherever these were. The teacher
    now gets the window where it is, the student its prefixes where it is, and the loss is
    computed on the student's device (``meta`` standing in for a GPU)."""
    from shared.training.distill import kd_batch_loss

    teacher, student = _RecordingTeacher(teacher_on), _RecordingStudent("meta")
    config = replace(TINY_STUDENT, max_len=4, alpha=0.5)
    loss = kd_batch_loss(teacher, config)(student, _padded_batch())  # type: ignore[arg-type]
    assert loss.device.type == "meta"
    assert teacher.seen == [torch.device(teacher_on)]
    assert student.seen == [(torch.device("meta"), (6, 4))]  # 4 + 2 positions, max_len 4


def test_distillation_loss_is_unchanged_on_the_cpu(student: DistilledStudent) -> None:
    """The teacher's logits at the positions with a target are gathered by index (no mask
    on a device): exactly the values and order of the boolean selection it replaced."""
    from shared.training.distill import kd_batch_loss

    assert student.teacher is not None
    teacher = student.teacher.model
    config = replace(student.config, alpha=0.5)
    items, mask, targets = trim_padding(*_padded_batch())
    select = targets != IGNORE_TARGET
    with torch.no_grad():
        student_items, student_mask = trim_padding(*prefix_windows(items, mask, select, 8))
        want = kd_objective(
            student.model(student_items, student_mask, gather_first=False),
            teacher.all_logits(items, mask)[select],
            targets[select],
            config.temperature,
            config.alpha,
        )
        got = kd_batch_loss(teacher, config)(student.model, _padded_batch())
    assert torch.equal(got, want)


def test_a_cpu_pretraining_keeps_its_cache_key(tmp_path: Path) -> None:
    """Existing caches were all trained on the CPU: a CPU run's key is still the one
    computed before the device was part of it (the formula below), so they are still hit;
    a GPU run's models differ in their last bits, so it gets a key of its own."""
    import hashlib
    import json
    from dataclasses import asdict

    from shared.io import versions_key
    from simulation.pretrain import (
        PRETRAIN_CACHE_VERSION,
        PRETRAIN_LIBRARIES,
        cache_key,
        pretrain,
    )

    ds = chain_dataset(n_users=40, length=8)
    split = split_users(ds, SplitConfig(seed=3, public_fraction=0.5))
    teacher_cfg = replace(TINY_TEACHER, order="sequence", epochs=2)
    student_cfg = replace(TINY_STUDENT, epochs=2)
    h = hashlib.sha256(f"pretrain-v{PRETRAIN_CACHE_VERSION}".encode())
    h.update(versions_key(PRETRAIN_LIBRARIES))
    h.update(ds.fingerprint().encode())
    for part in (split.config, teacher_cfg, student_cfg):
        h.update(json.dumps(asdict(part), sort_keys=True).encode())
    h.update(np.ascontiguousarray(text_features()).tobytes())
    before = h.hexdigest()[:20]
    key = cache_key(ds, split, text_features(), teacher_cfg, student_cfg)
    assert key == before
    assert cache_key(ds, split, text_features(), teacher_cfg, student_cfg, None, "cpu") == key
    gpu = cache_key(ds, split, text_features(), teacher_cfg, student_cfg, None, "cuda")
    assert gpu != key
    kwargs: dict[str, Any] = {"teacher_config": teacher_cfg, "student_config": student_cfg}
    first = pretrain(ds, split, text_features(), tmp_path, **kwargs, device="cpu")
    assert [p.name for p in (tmp_path / "pretrained").glob("*.pt")] == [f"chains-{key}.pt"]
    if not torch.cuda.is_available():  # auto is the CPU here: the same cache
        again = pretrain(ds, split, text_features(), tmp_path, **kwargs, device="auto")
        assert again.cached and not first.cached


def test_pretraining_on_a_gpu_hands_its_cached_memory_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch keeps the GPU memory a pretraining freed reserved for the process, where a
    simulation's clients, in other processes on Ray's GPU shares, could not use it: a
    pretraining on CUDA empties torch's cache once done, one on the CPU leaves it alone.
    No GPU here: this machine is made to look like one with a GPU, and the CUDA run is a
    cache hit (the CPU run's file under the CUDA key), which builds its models on the CPU."""
    import shutil

    from simulation.pretrain import cache_key, pretrain

    emptied: list[str] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append("emptied"))
    ds = chain_dataset(n_users=40, length=8)
    split = split_users(ds, SplitConfig(seed=3, public_fraction=0.5))
    configs = (replace(TINY_TEACHER, order="sequence", epochs=1), replace(TINY_STUDENT, epochs=1))
    kwargs: dict[str, Any] = {"teacher_config": configs[0], "student_config": configs[1]}
    cpu = pretrain(ds, split, text_features(), tmp_path, **kwargs, device="cpu")
    assert not cpu.cached and emptied == []
    assert pretrain(ds, split, text_features(), tmp_path, **kwargs, device="cpu").cached
    assert emptied == []  # nor after a cache hit
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    (cpu_file,) = (tmp_path / "pretrained").glob("*.pt")
    gpu_key = cache_key(ds, split, text_features(), *configs, None, "cuda")
    shutil.copy(cpu_file, cpu_file.with_name(f"{ds.name}-{gpu_key}.pt"))
    gpu = pretrain(ds, split, text_features(), tmp_path, **kwargs, device="cuda")
    assert gpu.cached and emptied == ["emptied"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_pretraining_on_the_gpu_matches_the_cpu_and_caches_cpu_tensors(tmp_path: Path) -> None:
    """A tiny pretraining on CUDA trains there, comes back (and is cached) on the CPU, under
    a key of its own, and ends close to the CPU run's weights. No dropout and the full
    softmax: those draw from the device's generator, which differs from the CPU's. One
    validation, after the last epoch, so both runs keep the same epoch."""
    from shared.models.sequence import module_device
    from simulation.pretrain import pretrain

    ds = chain_dataset(n_users=40, length=8)
    split = split_users(ds, SplitConfig(seed=3, public_fraction=0.5))
    kwargs: dict[str, Any] = {
        "teacher_config": replace(
            TINY_TEACHER, order="sequence", dropout=0.0, epochs=2, eval_every=2
        ),
        "student_config": replace(TINY_STUDENT, dropout=0.0, epochs=2, eval_every=2),
    }
    cpu = pretrain(ds, split, text_features(), tmp_path / "cpu", **kwargs, device="cpu")
    torch.cuda.reset_peak_memory_stats()
    gpu = pretrain(ds, split, text_features(), tmp_path / "gpu", **kwargs, device="cuda")
    assert torch.cuda.max_memory_allocated() > 0  # it trained there
    (cpu_file,) = (tmp_path / "cpu" / "pretrained").glob("*.pt")
    (gpu_file,) = (tmp_path / "gpu" / "pretrained").glob("*.pt")
    assert cpu_file.name != gpu_file.name  # a GPU run's key is its own
    for run in (gpu.teacher.model, gpu.student.model):
        assert module_device(run).type == "cpu"  # handed back as a cache hit gives them
    payload = gpu_file.read_bytes().partition(b"\n")[2]
    saved = torch.load(io.BytesIO(payload), weights_only=True)  # no map_location
    for part in ("teacher", "student"):
        assert all(t.device.type == "cpu" for t in saved[part].values())
    pairs = ((cpu.teacher.model, gpu.teacher.model), (cpu.student.model, gpu.student.model))
    for want, got in pairs:  # close, not equal: a GPU's kernels round differently
        for name, value in want.state_dict().items():
            assert torch.allclose(value, got.state_dict()[name], atol=1e-2, rtol=1e-2), name
    histories = [split.history(int(u)) for u in split.public_users[:8]]
    for cpu_model, gpu_model in ((cpu.teacher, gpu.teacher), (cpu.student, gpu.student)):
        want_scores, got_scores = cpu_model.score(histories), gpu_model.score(histories)
        assert np.allclose(want_scores, got_scores, atol=2e-2, rtol=1e-2)
    # the GPU's cache loads where there is none (map_location is the CPU's)
    again = pretrain(ds, split, text_features(), tmp_path / "gpu", **kwargs, device="cuda")
    assert again.cached
