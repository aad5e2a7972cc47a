"""The server-side teacher: a SASRec-style causal self-attention recommender.

Why this model: on MovieLens the order of recent items carries signal that item-item models
like EASE cannot use, and SASRec (Kang & McAuley 2018) is the standard strong sequential
baseline. Two changes make it fit this project:

* the item representation is the projected language-model text embedding **plus** an ID
  embedding (:class:`shared.models.sequence.ItemRepresentation`), so items with few public
  interactions still get a sensible vector, and the student can inherit text knowledge;
* positions are numbered by recency (distance from the window's latest item), so a history
  is scored with the position ids its last position was trained with, in a window of any
  length. An earlier position of a training window is numbered from the window's end, not
  from itself, so its prediction is not exactly what scoring that prefix alone gives (the
  causal mask hides which items follow, not how many): on a synthetic world the two agree
  on 0.997 of their top 10, the same next-item HR@10.

The teacher only ever sees the **public** users' train data (on the server), is trained with
a full softmax over the catalog at every position (or a sampled softmax, an option for large
catalogs), and is selected by early stopping on the public users' validation item. Whether it
reads a history in time order or as a set (:mod:`shared.models.history_order`) is chosen the
same way: where order carries little signal, shuffled histories give a few hundred public
users many more training contexts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from shared.data.dataset import IntArray
from shared.errors import ConfigError, DataError
from shared.models.base import Recommender, ScoreArray, Scorer, check_histories
from shared.models.baselines import EASE
from shared.models.ensemble import DEFAULT_MEMBERS
from shared.models.epochs import TEACHER_EPOCHS
from shared.models.history_order import DEFAULT_ORDER, ORDERS, Order, Reading
from shared.models.item_factors import DEFAULT_ID_INIT, ID_INITS, IdInit, cooccurrence_factors
from shared.models.item_prior import DEFAULT_PRIOR, PRIOR_MAX_ITEMS, PRIOR_WEIGHTS
from shared.models.sequence import (
    IGNORE_TARGET,
    MASKED_LOGIT,
    ItemRepresentation,
    causal_attention_mask,
    module_device,
    recency_index,
    score_histories,
)
from shared.training.device import resolve_device, to_device
from shared.training.trainer import (
    METRICS,
    Batch,
    CausalWindows,
    TrainConfig,
    TrainHistory,
    Validation,
    count_parameters,
    fit_with_early_stopping,
    limited_threads,
    make_causal_windows,
    make_loader,
    seeded,
    train_epoch,
    trim_padding,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherConfig:
    """Architecture and training of the teacher; defaults are tuned on ml-100k public users.

    ``loss='full'`` is a softmax over the whole catalog (cheap for thousands of items);
    ``'sampled'`` scores the target against ``n_negatives`` uniformly drawn items shared by
    the batch (for catalogs too big for a full softmax). ``batch_size`` counts windows of up
    to ``max_len`` items, each trained at every position.

    ``id_init``: ``'cooccurrence'`` starts the ID table from the public users' co-occurrence
    factors (:func:`shared.models.item_factors.cooccurrence_factors`, rows of unit mean
    square); ``'random'`` from ``N(0, 0.02^2)``. With a few hundred public users a random
    table is learned from too few transitions: the co-occurrence start raised federated-user
    full HR@10 from 0.153 to 0.171 on ml-100k (``bench/results/pretrain-ml-100k.json``) and,
    when it was introduced, from 0.131 to 0.2 on the synthetic world (an ad-hoc comparison;
    the committed synthetic results are later runs: 0.250 to 0.267 over three worlds).

    ``order``: how a training history is read. ``'sequence'``: in time order, next item after
    each prefix (SASRec). ``'set'``: every epoch each training window is put in a random
    order, and the items already in the prefix are excluded from the softmax (no dataset here
    repeats an item, and the protocol never recommends a seen one): the model learns which
    item completes a *set* of interests, each history giving a fresh sample of subsets per
    epoch. ``'auto'`` (default) trains both and keeps the one with the better validation
    metric (``'sequence'`` without validation data). On ml-100k validation picks
    ``'sequence'`` by a wide margin (order carries signal there); on the synthetic world,
    whose users' tastes drift slowly and whose 180 public users give few transitions, it picks
    ``'set'`` (``bench/results/pretrain-*.json``). ``'auto'`` trains the first member twice.

    The set reading has its own shape, ``set_dim`` x ``set_max_len`` (32 x 50): a set is the
    user's *current* interests, so it is cut from the last 50 items (where tastes drift, an
    old item in an unordered window speaks as loudly as the newest), and a narrower model
    fits a few hundred public users' sets with less variance. On the default synthetic world
    (seed 42, where the shape was chosen) it raised the set teacher's federated-user HR@10
    from 0.568 / 0.242 (64 x 200) to 0.613 / 0.267 sampled / full, and the int8 student
    distilled from it from 0.582 / 0.237 to 0.614 / 0.274. On two fresh worlds (seeds 7 and
    3) the teacher gained on full ranking (0.236 -> 0.261, 0.233 -> 0.250) and not on sampled
    (0.601 -> 0.621, 0.589 -> 0.571), while the student gained on both (0.529 / 0.194 ->
    0.625 / 0.253, 0.567 / 0.229 -> 0.599 / 0.243). On ml-100k validation still keeps the
    sequence reading (``bench/results/pretrain-*.json``). Pooled over six fresh worlds
    (``bench/results/synthetic-worlds.json``) this teacher ties EASE fitted to the same public
    users (-0.005 / +0.001, intervals about +-0.013): on a world whose tastes are low-rank by
    construction, 180 public users give EASE's closed form all a model can use. A popularity
    prior (the output bias started at 3 x centred log public count, ad hoc) gained +0.016
    sampled over those worlds, still a tie, and nothing on ml-100k, so it was not adopted.

    ``prior`` (off by default; ``teacher-prior=true``): the teacher's next-item
    log-probabilities get an item-item term added: EASE weights (Steck 2019, ``prior_l2``)
    fitted to the same training sequences, summed over the items in the window, standardised
    over the catalog and scaled by a weight that the public users' validation chooses from
    ``prior_weights`` (0, i.e. no term, included; without validation data none is added).
    Self-attention over a few hundred public users and a closed form over their
    co-occurrences err differently. Pooled over the six fresh synthetic worlds
    (``bench/results/synthetic-worlds-teacher-prior.json``, federated users, sampled / full
    HR@10) the teacher with it beats EASE fitted to the same public users by +0.017 [+0.006,
    +0.028] / +0.018 [+0.008, +0.028] where its attention part alone ties it, and the int8
    student distilled from it reaches 0.618 / 0.266 (0.613 / 0.253 from the teacher without).
    On ml-100k (``pretrain-ml-100k-teacher-prior.json``) it lifts the teacher from 0.682 /
    0.171 to 0.694 / 0.174 and leaves the student at 0.669 / 0.163: the student's dot-product
    scores cannot hold an item-item term, and its gap to the teacher (-0.025 sampled) would
    exceed the 0.02 the student is held to. So it stays off by default. Catalogs of more than
    ``PRIOR_MAX_ITEMS`` items go without (an ``n x n`` table). Server side only: the student
    learns the term through distillation; nothing item-item ships to a device.

    ``members``: the teacher can be an ensemble of independently seeded copies, each
    early-stopped on its own, whose next-item log-probabilities are averaged (only the first
    chooses the order). Measured on the synthetic world's federated users, three members of
    a 64 x 200 set teacher added +0.011 / +0.018 HR@10 (paired 95% intervals [-0.006, 0.029]
    / [0.000, 0.035]), three of the 32 x 50 one nothing (0.611 / 0.264 against 0.613 /
    0.267), so the default is one; ``--teacher-members`` of the benchmarks sets it. Members cost
    pretraining time only (the teacher never leaves the server); the student's parameter
    budget is set against one member (:func:`simulation.pretrain.pretrain`).

    Defaults (d = 64, 2 layers, 2 heads, dropout 0.3, full softmax, AdamW 1e-3, early stopping
    on the public users' validation sampled NDCG@10) reach their best epoch around 20 on the
    170 public users of ml-100k: about 40 s on two idle CPU cores.

    Keep ``patience`` short on ml-100k: past epoch 20 the sequence teacher over-fits the 170
    public users while their validation sampled NDCG@10 stays flat (0.43 to 0.455 from
    epoch 12 to 70), so a longer wait keeps a late, worse epoch. Run without stopping
    (``bench/teacher_curve.py``, ``bench/results/teacher-curve-ml-100k.json``), sampled NDCG
    picks epoch 62, whose federated-user test is 0.632 / 0.118 HR@10, against 0.682 / 0.171
    where patience 5 stops (epoch 20). The public users' validation NLL and full NDCG@10 see
    the over-fitting (best at epochs 22 and 18: 0.677 / 0.162, 0.675 / 0.168), so they are
    safer criteria but no better ones at this patience; the synthetic set teacher does not
    over-fit within 120 epochs (``teacher-curve-synthetic.json``: every criterion keeps
    0.594 to 0.618 / 0.247 to 0.267).
    """

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 200
    set_dim: int = 32
    set_max_len: int = 50
    dropout: float = 0.3
    id_init: IdInit = DEFAULT_ID_INIT
    order: Order = DEFAULT_ORDER
    members: int = DEFAULT_MEMBERS
    prior: bool = DEFAULT_PRIOR
    prior_weights: tuple[float, ...] = PRIOR_WEIGHTS
    prior_l2: float = 250.0
    loss: Literal["full", "sampled"] = "full"
    n_negatives: int = 256
    epochs: int = TEACHER_EPOCHS
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 5.0
    eval_every: int = 2
    patience: int = 5
    metric: str = "sampled_ndcg@10"
    seed: int = 42
    score_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.dim < 1 or self.n_layers < 1 or self.n_heads < 1:
            raise ConfigError("teacher dim, n_layers and n_heads must be >= 1")
        if self.dim % self.n_heads:
            raise ConfigError(f"teacher dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.max_len < 2 or self.set_max_len < 2:
            raise ConfigError(
                f"teacher max_len and set_max_len must be >= 2, got {self.max_len} and "
                f"{self.set_max_len}"
            )
        if self.set_dim < 1 or self.set_dim % self.n_heads:
            raise ConfigError(
                f"teacher set_dim {self.set_dim} must be >= 1 and divisible by n_heads "
                f"{self.n_heads}"
            )
        if self.members < 1:
            raise ConfigError(f"teacher members must be >= 1, got {self.members}")
        weights = self.prior_weights
        if not weights or not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ConfigError(
                f"teacher prior_weights must be finite, >= 0 and at least one, got {weights!r}"
            )
        if not (math.isfinite(self.prior_l2) and self.prior_l2 > 0):
            raise ConfigError(f"teacher prior_l2 must be > 0, got {self.prior_l2!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"teacher dropout must be in [0, 1), got {self.dropout}")
        if self.id_init not in ID_INITS:
            raise ConfigError(
                f"teacher id_init must be {' or '.join(map(repr, ID_INITS))}, got {self.id_init!r}"
            )
        if self.order not in ORDERS:
            raise ConfigError(
                f"teacher order must be one of {', '.join(map(repr, ORDERS))}, got {self.order!r}"
            )
        if self.loss not in ("full", "sampled"):
            raise ConfigError(f"teacher loss must be 'full' or 'sampled', got {self.loss!r}")
        if self.n_negatives < 1:
            raise ConfigError(f"n_negatives must be >= 1, got {self.n_negatives}")
        if self.score_batch_size < 1:
            raise ConfigError(f"score_batch_size must be >= 1, got {self.score_batch_size}")
        if self.metric not in METRICS:
            raise ConfigError(f"metric must be one of {', '.join(METRICS)}; got {self.metric!r}")
        self.train_config()  # validates the training fields

    def train_config(self, progress: bool = False, num_threads: int | None = None) -> TrainConfig:
        return TrainConfig.of(self, progress=progress, num_threads=num_threads)

    def reading(self, order: Reading) -> TeacherConfig:
        """This config for one reading: its ``order``, and for ``'set'`` the set shape
        (``set_dim``, ``set_max_len``) as ``dim`` / ``max_len``."""
        if order == "set":
            return replace(self, order="set", dim=self.set_dim, max_len=self.set_max_len)
        return replace(self, order="sequence")

    def readings(self, with_validation: bool) -> tuple[Reading, ...]:
        """The readings ``fit`` trains: the configured one, or for ``'auto'`` both (only
        ``'sequence'`` when nothing validates the choice)."""
        if self.order != "auto":
            return (self.order,)
        return ("sequence", "set") if with_validation else ("sequence",)


class CausalSelfAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: masked multi-head self-attention, then a GELU FFN."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """``x [B, L, d]``, ``attn_mask [B, 1, L, L]`` (True = may attend)."""
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).split(d, dim=-1)
        heads = [
            t.view(b, length, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v)
        ]
        att = F.scaled_dot_product_attention(
            heads[0],
            heads[1],
            heads[2],
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        x = x + self.drop(self.out(att.transpose(1, 2).reshape(b, length, d)))
        out: torch.Tensor = x + self.drop(self.ffn(self.norm_ffn(x)))
        return out


class SASRecModel(nn.Module):
    """Causal self-attention over the last ``max_len`` items; scores = hidden @ item table."""

    def __init__(self, text_features: npt.NDArray[np.float32], config: TeacherConfig) -> None:
        super().__init__()
        self.config = config
        self.items = ItemRepresentation(text_features, config.dim)
        self.positions = nn.Embedding(config.max_len, config.dim)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(config.dim, config.n_heads, config.dropout)
            for _ in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(config.dim)

    @property
    def n_items(self) -> int:
        return self.items.n_items

    def hidden(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Contextual state at every position, ``[B, L, d]``; position ``j`` sees items <= j."""
        b, length = items.shape
        if length > self.config.max_len:
            raise ConfigError(f"window of {length} items exceeds max_len {self.config.max_len}")
        x = self.items(items) * math.sqrt(self.config.dim)
        x = x + self.positions(recency_index(b, length, items.device))
        x = self.drop(x) * mask.unsqueeze(-1)
        attn_mask = causal_attention_mask(mask)
        for block in self.blocks:
            x = block(x, attn_mask)
        out: torch.Tensor = self.norm(x)
        return out

    def item_table(self) -> torch.Tensor:
        """Output item representations ``[n_items, d]`` (tied with the input ones)."""
        return self.items.table()

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Next-item logits after the last position, ``[B, n_items]``."""
        return self.hidden(items, mask)[:, -1] @ self.item_table().T

    def all_logits(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Next-item logits at every position, ``[B, L, n_items]`` (for distillation)."""
        return self.hidden(items, mask) @ self.item_table().T

    def loss(
        self,
        items: torch.Tensor,
        mask: torch.Tensor,
        targets: torch.Tensor,
        *,
        exclude_seen: bool = False,
    ) -> torch.Tensor:
        """Mean next-item cross-entropy over all positions with a target.

        ``exclude_seen``: the items at or before a position are not candidates for its target
        (they get no probability mass, as a user who never repeats an item would choose).
        """
        h = self.hidden(items, mask)
        has_target = targets != IGNORE_TARGET
        seen = seen_items(items, mask, self.n_items)[has_target] if exclude_seen else None
        h, y = h[has_target], targets[has_target]
        if seen is not None:  # a target the history repeats stays a candidate (as in
            # next_item_cross_entropy): masked, its loss was ~1e9 with no gradient
            seen[torch.arange(len(y), device=seen.device), y] = False
        table = self.item_table()
        if self.config.loss == "full":
            logits = h @ table.T
            if seen is not None:
                logits = logits.masked_fill(seen, MASKED_LOGIT)
            return F.cross_entropy(logits, y)
        negatives = torch.randint(0, self.n_items, (self.config.n_negatives,), device=h.device)
        pos = (h * table[y]).sum(-1, keepdim=True)
        neg = h @ table[negatives].T
        neg = neg.masked_fill(negatives.unsqueeze(0) == y.unsqueeze(1), float("-inf"))
        if seen is not None:
            neg = neg.masked_fill(seen[:, negatives], float("-inf"))
        logits = torch.cat([pos, neg], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(y), dtype=torch.long, device=h.device))


def _standardize(scores: torch.Tensor) -> torch.Tensor:
    """Scores centred and scaled to unit deviation over the catalog (last axis); a row with
    no spread (nothing in the window) becomes zeros."""
    centred = scores - scores.mean(-1, keepdim=True)
    return centred / (centred.std(-1, keepdim=True) + 1e-6)


class ItemItemPrior(nn.Module):
    """The teacher's item-item term: EASE weights summed over the items of a window,
    standardised over the catalog, times ``weight`` (a buffer; 0 = no term).

    ``all_logits`` gives the term after every prefix of the window (what distillation needs),
    ``forward`` after the whole window; padding contributes nothing.
    """

    item_weights: torch.Tensor
    weight: torch.Tensor

    def __init__(self, n_items: int) -> None:
        super().__init__()
        self.register_buffer("item_weights", torch.zeros(n_items, n_items))
        self.register_buffer("weight", torch.zeros(()))

    def fit(self, sequences: Sequence[IntArray], l2: float) -> ItemItemPrior:
        """EASE weights of ``sequences`` (the teacher's own training data)."""
        n_items = self.item_weights.shape[0]
        weights = EASE(l2).fit(sequences, n_items).weights
        with torch.no_grad():
            self.item_weights.copy_(torch.from_numpy(weights))
        return self

    @property
    def active(self) -> bool:
        return float(self.weight) != 0.0

    def _rows(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.item_weights[items] * mask.unsqueeze(-1).to(self.item_weights.dtype)

    def all_logits(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, L, n_items]``: the term after each prefix of the window."""
        return self.weight * _standardize(self._rows(items, mask).cumsum(dim=1))

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, n_items]``: the term after the whole window."""
        return self.weight * _standardize(self._rows(items, mask).sum(dim=1))


class SASRecEnsemble(nn.Module):
    """Members of one architecture whose next-item log-probabilities are averaged, plus the
    optional item-item prior.

    The same interface as :class:`SASRecModel` for what uses a trained teacher (scoring,
    distillation, the student's table copy): logits are the mean log-softmax (plus the
    prior's term when its weight is not 0), and the item table is the members' tables side
    by side, scaled so that its Gram matrix is the mean of theirs. A one-member ensemble
    without an active prior scores exactly like its member.
    """

    def __init__(self, members: Sequence[SASRecModel], prior: ItemItemPrior | None = None) -> None:
        super().__init__()
        if not members:
            raise ConfigError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.prior = prior
        self.config: TeacherConfig = members[0].config

    @property
    def models(self) -> list[SASRecModel]:
        return [cast(SASRecModel, m) for m in self.members]

    @property
    def first(self) -> SASRecModel:
        return self.models[0]

    @property
    def n_items(self) -> int:
        return self.first.n_items

    @property
    def items(self) -> ItemRepresentation:
        """The first member's item representation (its frozen text features are shared)."""
        return self.first.items

    def _combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        if len(logits) == 1:
            return logits[0]
        return torch.stack([F.log_softmax(x, dim=-1) for x in logits]).mean(0)

    def _active_prior(self) -> ItemItemPrior | None:
        return self.prior if self.prior is not None and self.prior.active else None

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Next-item scores after the last position, ``[B, n_items]``."""
        scores = self._combine([m(items, mask) for m in self.models])
        prior = self._active_prior()
        return scores if prior is None else F.log_softmax(scores, -1) + prior(items, mask)

    def all_logits(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Next-item scores at every position, ``[B, L, n_items]`` (for distillation)."""
        scores = self._combine([m.all_logits(items, mask) for m in self.models])
        prior = self._active_prior()
        if prior is None:
            return scores
        return F.log_softmax(scores, -1) + prior.all_logits(items, mask)

    def item_table(self) -> torch.Tensor:
        """``[n_items, d * members]``: ``T T^T`` is the mean of the members' ``T_m T_m^T``."""
        tables = [m.item_table() for m in self.models]
        return torch.cat(tables, dim=1) / math.sqrt(len(tables))


def seen_items(items: torch.Tensor, mask: torch.Tensor, n_items: int) -> torch.Tensor:
    """``[B, L, n_items]`` bool: item ``i`` is at or before position ``j`` of row ``b``."""
    b, length = items.shape
    marks = torch.zeros((b, length, n_items), dtype=torch.uint8, device=items.device)
    marks.scatter_(2, items.unsqueeze(-1), mask.unsqueeze(-1).to(torch.uint8))
    return marks.cummax(dim=1).values > 0


def permute_windows(
    items: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal windows whose histories are put in a random order, one draw per row.

    A left-padded row holds ``l`` inputs and, shifted by one, ``l`` targets, i.e. ``l + 1``
    items of one history; they are shuffled and re-cut into inputs and next-item targets.
    Padding stays where it is. Inputs are not modified.
    """
    items, targets = items.clone(), targets.clone()
    lengths = mask.sum(dim=1).tolist()
    for row, length in enumerate(lengths):
        if length == 0:
            continue
        history = torch.cat([items[row, -length:], targets[row, -1:]])
        history = history[torch.randperm(length + 1, generator=generator)]
        items[row, -length:] = history[:-1]
        targets[row, -length:] = history[1:]
    return items, mask, targets


def _sequence_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The ``'sequence'`` order's loss. The padding is trimmed on the CPU, where the loader
    made the batch (no device round trip for a shape), then the batch moves to the model."""
    items, mask, targets = to_device(trim_padding(*batch), module_device(model))
    assert isinstance(model, SASRecModel)
    return model.loss(items, mask, targets)


def _set_loss(generator: torch.Generator) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """The ``'set'`` order's loss: shuffled windows, seen items out of the softmax. The
    windows are shuffled and trimmed on the CPU, where the loader made them (``generator``
    is a CPU generator, and a row-by-row shuffle would be a kernel launch per row on a
    GPU), then moved to the model's device."""

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        items, mask, targets = permute_windows(batch[0], batch[1], batch[2], generator)
        items, mask, targets = to_device(trim_padding(items, mask, targets), module_device(model))
        assert isinstance(model, SASRecModel)
        return model.loss(items, mask, targets, exclude_seen=True)

    return loss


class SASRecTeacher(Recommender):
    """The teacher as a :class:`Recommender`: ``fit`` on sequences, ``score`` histories.

    ``text_embeddings`` (n_items x t, e.g. ``shared.text.encoder.encode_items``) are frozen.
    ``fit`` accepts an optional :class:`~shared.training.trainer.Validation` for early
    stopping; without one it trains for ``config.epochs`` epochs.

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``:
    :func:`~shared.training.device.resolve_device`) is where ``fit`` trains and validates,
    and where the fitted model stays (scoring follows it). Members are initialised on the
    CPU from their seed and then moved, so a model starts from the same weights on any
    device, and a CPU run is exactly what it was before the setting existed; the data is
    batched and shuffled on the CPU too. A GPU's kernels round differently, so its weights
    match a CPU run's closely, not bit for bit.
    """

    name = "teacher"

    def __init__(
        self,
        text_embeddings: npt.NDArray[np.float32],
        config: TeacherConfig = TeacherConfig(),
        *,
        progress: bool = False,
        num_threads: int | None = None,
        device: str = "cpu",
    ) -> None:
        super().__init__()
        self.text_embeddings = np.asarray(text_embeddings, dtype=np.float32)
        if self.text_embeddings.ndim != 2:
            raise ConfigError(f"text embeddings must be 2-D, got {self.text_embeddings.shape}")
        self.config = config
        self.progress = progress
        self.num_threads = num_threads
        self.device = resolve_device(device)
        self._model: SASRecEnsemble | None = None
        self.history = TrainHistory()
        self.order_scores: dict[str, float] = {}
        self.member_scores: list[float] = []
        self.prior_scores: dict[float, float] = {}

    @property
    def model(self) -> SASRecEnsemble:
        if self._model is None:
            raise ConfigError("the teacher is not fitted yet; call fit() first")
        return self._model

    def _check_items(self, n_items: int) -> None:
        if n_items != self.text_embeddings.shape[0]:
            raise DataError(
                f"text embeddings cover {self.text_embeddings.shape[0]} items, data has {n_items}"
            )

    def _member_seed(self, index: int) -> int:
        """Member ``index`` is built from this seed and shuffled from the next one."""
        return self.config.seed + 2 * index

    def build_member(
        self, n_items: int, index: int = 0, order: Reading | None = None
    ) -> SASRecModel:
        """A fresh (seeded) member ``index`` for ``n_items`` items in the shape of reading
        ``order`` (default: the configured one, ``'sequence'`` for ``'auto'``), untrained."""
        self._check_items(n_items)
        config = self.config.reading(order or self.config.readings(with_validation=False)[0])
        with seeded(self._member_seed(index)):
            return SASRecModel(self.text_embeddings, config)

    def build(self, n_items: int, order: Reading | None = None) -> SASRecEnsemble:
        """Create the fresh (seeded) ensemble for ``n_items`` items in the shape of reading
        ``order`` without training it (e.g. to load a saved state into), on the CPU whatever
        ``device`` is (a saved teacher loads without a GPU; ``.to()`` moves it)."""
        members = [self.build_member(n_items, i, order) for i in range(self.config.members)]
        self._model = SASRecEnsemble(members, self._new_prior(n_items)).eval()
        self._n_items = n_items
        return self._model

    def _new_prior(self, n_items: int) -> ItemItemPrior | None:
        """An empty prior when the config asks for one and the catalog allows it."""
        if not self.config.prior or self.config.prior_weights == (0.0,):
            return None
        if n_items > PRIOR_MAX_ITEMS:
            log.warning(
                "teacher: no item-item prior for %d items (more than %d)", n_items, PRIOR_MAX_ITEMS
            )
            return None
        return ItemItemPrior(n_items)

    @property
    def fitted_order(self) -> Reading | None:
        """The reading the fitted (or built) teacher uses; ``None`` before either."""
        return None if self._model is None else cast(Reading, self._model.config.order)

    @property
    def fitted_config(self) -> TeacherConfig:
        """The config of the reading the fitted teacher uses (its ``order``, ``dim`` and
        ``max_len`` are those of that reading)."""
        return self.model.config

    def fit(
        self,
        sequences: Sequence[IntArray],
        n_items: int,
        validation: Validation | None = None,
    ) -> SASRecTeacher:
        """Train every member on ``sequences`` (all transitions, causal windows).

        With ``order='auto'`` and ``validation``, the first member is trained once per reading
        from the same seeds and the better reading on validation is kept (``order_scores`` has
        both metrics, ``fitted_order`` the choice); the other members use that reading.
        ``member_scores`` are the members' best validation metrics. Then the item-item prior
        is fitted to ``sequences`` and its weight chosen on validation (``prior_scores`` has
        the metric of every weight tried; without validation the weight stays 0).
        """
        self._check_items(n_items)
        check_histories(sequences, n_items, "training sequence")
        self._n_items = n_items
        readings = self.config.readings(validation is not None)
        if not any(len(seq) >= 2 for seq in sequences):
            raise DataError("no training sequence has two or more items")
        factors: dict[int, torch.Tensor] = {}  # the same ID-table start per width
        if self.config.id_init == "cooccurrence":
            for dim in {self.config.reading(r).dim for r in readings}:
                with limited_threads(self.num_threads):
                    factors[dim] = torch.as_tensor(
                        cooccurrence_factors(sequences, n_items, dim), dtype=torch.float32
                    )

        windows: dict[int, CausalWindows] = {}  # per window length

        def train(index: int, reading: Reading) -> tuple[SASRecModel, TrainHistory]:
            config = self.config.reading(reading)
            if config.max_len not in windows:
                windows[config.max_len] = make_causal_windows(sequences, config.max_len)
            return self._fit_member(
                index, config, windows[config.max_len], n_items, factors.get(config.dim), validation
            )

        runs = {reading: train(0, reading) for reading in readings}
        self.order_scores = {order: history.best_metric for order, (_, history) in runs.items()}
        chosen = max(runs, key=lambda order: runs[order][1].best_metric)
        trained = [runs[chosen]] + [train(i, chosen) for i in range(1, self.config.members)]
        self.history = trained[0][1]
        self.member_scores = [history.best_metric for _, history in trained]
        prior = self._new_prior(n_items)
        ensemble = SASRecEnsemble([model for model, _ in trained], prior)
        self._model = ensemble.to(self.device).eval()  # the prior's buffers too
        self.prior_scores = {}
        if prior is not None and validation is not None:
            with limited_threads(self.num_threads):
                prior.fit(sequences, self.config.prior_l2)
            self.prior_scores = self._choose_prior_weight(prior, validation)
        return self

    def _choose_prior_weight(
        self, prior: ItemItemPrior, validation: Validation
    ) -> dict[float, float]:
        """Set the prior's weight to the one of ``prior_weights`` that validates best (the
        smallest among equals); the metric of each."""
        scores: dict[float, float] = {}
        for weight in sorted(set(self.config.prior_weights)):
            prior.weight.fill_(weight)
            scores[weight] = validation.metric(self, self.config.metric)
        best = max(scores, key=lambda w: (scores[w], -w))
        prior.weight.fill_(best)
        log.info("teacher: item-item prior weight %s (validation %s)", best, scores)
        return scores

    def _fit_member(
        self,
        index: int,
        config: TeacherConfig,
        windows: CausalWindows,
        n_items: int,
        ids: torch.Tensor | None,
        validation: Validation | None,
    ) -> tuple[SASRecModel, TrainHistory]:
        """Train member ``index`` of the reading ``config`` on ``windows``, its ID table
        started from ``ids`` (else at random); the member at its best validation, and its
        history."""
        train_config = config.train_config(self.progress, self.num_threads)
        with limited_threads(self.num_threads):
            model = self.build_member(n_items, index, cast(Reading, config.order))
            if ids is not None:
                with torch.no_grad():
                    model.items.ids.weight.copy_(ids)
            # moved before seeding: a GPU's generator (dropout, sampled negatives) is
            # seeded only once CUDA is initialised
            model.to(self.device)
            with seeded(self._member_seed(index) + 1) as gen:
                loader = make_loader(
                    windows.dataset(), config.batch_size, gen, lengths=windows.mask.sum(1)
                )
                optimizer = torch.optim.AdamW(
                    [p for p in model.parameters() if p.requires_grad],
                    lr=config.lr,
                    weight_decay=config.weight_decay,
                )

                loss_fn = _sequence_loss if config.order == "sequence" else _set_loss(gen)

                def run_epoch(epoch: int) -> float:
                    return train_epoch(model, loader, optimizer, loss_fn, config.grad_clip)

                def validate() -> float:
                    assert validation is not None
                    return validation.metric(_NetScorer(self, model), config.metric)

                name = f"teacher ({config.order})"
                history = fit_with_early_stopping(
                    model,
                    run_epoch,
                    validate if validation is not None else None,
                    train_config,
                    desc=name if config.members == 1 else f"{name} {index + 1}/{config.members}",
                )
        return model, history

    def score(self, histories: Sequence[IntArray]) -> ScoreArray:
        """Next-item scores from the last ``max_len`` items (of the fitted reading) of each
        history."""
        return self._score(self.model, histories)

    @property
    def prior_weight(self) -> float:
        """The fitted (or loaded) item-item prior's weight; 0 without one."""
        prior = self.model.prior
        return 0.0 if prior is None else float(prior.weight)

    def attention_scorer(self) -> Scorer:
        """The self-attention members without the item-item prior, as a :class:`Scorer` (to
        measure what the prior adds)."""
        return _NetScorer(self, SASRecEnsemble(self.model.models).eval())

    def member_scorer(self, index: int) -> Scorer:
        """Member ``index`` alone, as a :class:`Scorer` (to measure what the ensemble adds)."""
        models = self.model.models
        if not 0 <= index < len(models):
            raise ConfigError(f"the teacher has {len(models)} members; no member {index}")
        return _NetScorer(self, models[index])

    def _score(
        self, net: SASRecModel | SASRecEnsemble, histories: Sequence[IntArray]
    ) -> ScoreArray:
        with limited_threads(self.num_threads):
            return score_histories(
                net,
                histories,
                net.config.max_len,
                self._n_items,
                self.config.score_batch_size,
            )

    def num_trainable_parameters(self) -> int:
        return count_parameters(p for p in self.model.parameters() if p.requires_grad)


class _NetScorer:
    """One member (or the members without the prior), scored as its teacher would."""

    def __init__(self, teacher: SASRecTeacher, net: SASRecModel | SASRecEnsemble) -> None:
        self.teacher = teacher
        self.net = net

    @property
    def n_items(self) -> int:
        return self.net.n_items

    def score(self, histories: Sequence[IntArray]) -> ScoreArray:
        return self.teacher._score(self.net, histories)


TeacherNet = SASRecModel | SASRecEnsemble
"""A trained teacher network: one model or an ensemble (the same scoring interface)."""
