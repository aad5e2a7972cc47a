"""The server-side teacher: a SASRec-style causal self-attention recommender.

Why this model: on MovieLens the order of recent items carries signal that item-item models
like EASE cannot use, and SASRec (Kang & McAuley 2018) is the standard strong sequential
baseline. Two changes make it fit this project:

* the item representation is the projected language-model text embedding **plus** an ID
  embedding (:class:`shared.models.sequence.ItemRepresentation`), so items with few public
  interactions still get a sensible vector, and the student can inherit text knowledge;
* positions are numbered by recency (distance from the latest item), so a history scored in
  a window of any length gets the same position ids it was trained with.

The teacher only ever sees the **public** users' train data (on the server), is trained with
a full softmax over the catalog at every position (or a sampled softmax, an option for large
catalogs), and is selected by early stopping on the public users' validation item. Whether it
reads a history in time order or as a set (:mod:`shared.models.history_order`) is chosen the
same way: where order carries little signal, shuffled histories give a few hundred public
users many more training contexts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from shared.data.dataset import IntArray
from shared.errors import ConfigError, DataError
from shared.models.base import Recommender, ScoreArray
from shared.models.history_order import DEFAULT_ORDER, ORDERS, Order
from shared.models.item_factors import DEFAULT_ID_INIT, ID_INITS, IdInit, cooccurrence_factors
from shared.models.sequence import (
    IGNORE_TARGET,
    MASKED_LOGIT,
    ItemRepresentation,
    causal_attention_mask,
    recency_index,
    score_histories,
)
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
    full HR@10 from 0.153 to 0.171 on ml-100k and from 0.131 to 0.2 on the synthetic world
    (``bench/results/pretrain-*.json``).

    ``order``: how a training history is read. ``'sequence'``: in time order, next item after
    each prefix (SASRec). ``'set'``: every epoch each training window is put in a random
    order, and the items already in the prefix are excluded from the softmax (no dataset here
    repeats an item, and the protocol never recommends a seen one): the model learns which
    item completes a *set* of interests, each history giving a fresh sample of subsets per
    epoch. ``'auto'`` (default) trains both and keeps the one with the better validation
    metric (``'sequence'`` without validation data). On ml-100k validation picks
    ``'sequence'`` by a wide margin (order carries signal there); on the synthetic world,
    whose users' tastes drift slowly and whose 180 public users give few transitions, it picks
    ``'set'`` (``bench/results/pretrain-*.json``). ``'auto'`` doubles the training time.

    Defaults (d = 64, 2 layers, 2 heads, dropout 0.3, full softmax, AdamW 1e-3, early stopping
    on the public users' validation sampled NDCG@10) reach their best epoch around 20 on the
    170 public users of ml-100k: about 40 s on two idle CPU cores.
    """

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 200
    dropout: float = 0.3
    id_init: IdInit = DEFAULT_ID_INIT
    order: Order = DEFAULT_ORDER
    loss: Literal["full", "sampled"] = "full"
    n_negatives: int = 256
    epochs: int = 200
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
        if self.max_len < 2:
            raise ConfigError(f"teacher max_len must be >= 2, got {self.max_len}")
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
    items, mask, targets = trim_padding(*batch)
    assert isinstance(model, SASRecModel)
    return model.loss(items, mask, targets)


def _set_loss(generator: torch.Generator) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """The ``'set'`` order's loss: shuffled windows, seen items out of the softmax."""

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        items, mask, targets = permute_windows(batch[0], batch[1], batch[2], generator)
        items, mask, targets = trim_padding(items, mask, targets)
        assert isinstance(model, SASRecModel)
        return model.loss(items, mask, targets, exclude_seen=True)

    return loss


class SASRecTeacher(Recommender):
    """The teacher as a :class:`Recommender`: ``fit`` on sequences, ``score`` histories.

    ``text_embeddings`` (n_items x t, e.g. ``shared.text.encoder.encode_items``) are frozen.
    ``fit`` accepts an optional :class:`~shared.training.trainer.Validation` for early
    stopping; without one it trains for ``config.epochs`` epochs.
    """

    name = "teacher"

    def __init__(
        self,
        text_embeddings: npt.NDArray[np.float32],
        config: TeacherConfig = TeacherConfig(),
        *,
        progress: bool = False,
        num_threads: int | None = None,
    ) -> None:
        super().__init__()
        self.text_embeddings = np.asarray(text_embeddings, dtype=np.float32)
        if self.text_embeddings.ndim != 2:
            raise ConfigError(f"text embeddings must be 2-D, got {self.text_embeddings.shape}")
        self.config = config
        self.progress = progress
        self.num_threads = num_threads
        self._model: SASRecModel | None = None
        self.history = TrainHistory()
        self.fitted_order: Order | None = None
        self.order_scores: dict[str, float] = {}

    @property
    def model(self) -> SASRecModel:
        if self._model is None:
            raise ConfigError("the teacher is not fitted yet; call fit() first")
        return self._model

    def build(self, n_items: int) -> SASRecModel:
        """Create a fresh (seeded) model for ``n_items`` items without training it."""
        if n_items != self.text_embeddings.shape[0]:
            raise DataError(
                f"text embeddings cover {self.text_embeddings.shape[0]} items, data has {n_items}"
            )
        with seeded(self.config.seed):
            self._model = SASRecModel(self.text_embeddings, self.config)
        self._n_items = n_items
        return self._model

    def fit(
        self,
        sequences: Sequence[IntArray],
        n_items: int,
        validation: Validation | None = None,
    ) -> SASRecTeacher:
        """Train on ``sequences`` (all transitions, causal windows of ``max_len``).

        With ``order='auto'`` and ``validation``, one model per order is trained from the same
        seeds and the better one on validation is kept (``order_scores`` has both metrics,
        ``fitted_order`` the choice).
        """
        if self.config.order != "auto":
            orders: tuple[Order, ...] = (self.config.order,)
        else:
            orders = ("sequence", "set") if validation is not None else ("sequence",)
        windows = make_causal_windows(sequences, self.config.max_len)
        if len(windows) == 0:
            raise DataError("no training sequence has two or more items")
        ids = None
        if self.config.id_init == "cooccurrence":  # the same start for every order
            with limited_threads(self.num_threads):
                factors = cooccurrence_factors(sequences, n_items, self.config.dim)
            ids = torch.as_tensor(factors, dtype=torch.float32)
        runs = {
            order: self._fit_order(order, windows, n_items, ids, validation) for order in orders
        }
        self.order_scores = {order: history.best_metric for order, (_, history) in runs.items()}
        chosen = max(runs, key=lambda order: runs[order][1].best_metric)
        self._model, self.history = runs[chosen]
        self.fitted_order = chosen
        return self

    def _fit_order(
        self,
        order: Order,
        windows: CausalWindows,
        n_items: int,
        ids: torch.Tensor | None,
        validation: Validation | None,
    ) -> tuple[SASRecModel, TrainHistory]:
        """One training run reading the histories in ``order``, the ID table started from
        ``ids`` (else at random); the model at its best validation, and its history."""
        config = self.config
        train_config = config.train_config(self.progress, self.num_threads)
        with limited_threads(self.num_threads):
            model = self.build(n_items)
            if ids is not None:
                with torch.no_grad():
                    model.items.ids.weight.copy_(ids)
            with seeded(config.seed + 1) as gen:
                loader = make_loader(
                    windows.dataset(), config.batch_size, gen, lengths=windows.mask.sum(1)
                )
                optimizer = torch.optim.AdamW(
                    [p for p in model.parameters() if p.requires_grad],
                    lr=config.lr,
                    weight_decay=config.weight_decay,
                )

                loss_fn = _sequence_loss if order == "sequence" else _set_loss(gen)

                def run_epoch(epoch: int) -> float:
                    return train_epoch(model, loader, optimizer, loss_fn, config.grad_clip)

                def validate() -> float:
                    assert validation is not None
                    return validation.metric(self, config.metric)

                history = fit_with_early_stopping(
                    model,
                    run_epoch,
                    validate if validation is not None else None,
                    train_config,
                    desc=f"teacher ({order})",
                )
        return model, history

    def score(self, histories: Sequence[IntArray]) -> ScoreArray:
        """Next-item logits from the last ``max_len`` items of each history."""
        with limited_threads(self.num_threads):
            return score_histories(
                self.model,
                histories,
                self.config.max_len,
                self._n_items,
                self.config.score_batch_size,
            )

    def num_trainable_parameters(self) -> int:
        return count_parameters(p for p in self.model.parameters() if p.requires_grad)
