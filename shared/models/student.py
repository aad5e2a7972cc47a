"""The on-device student: a small attention-pooling recommender distilled from the teacher.

Shape of the model (``d <= 64``, one attention read-out, about 22k trainable scalars with the
defaults, under a tenth of the teacher's):

1. **Item input** ``x_i = text_proj(T_i) + id_proj(E_i)`` where ``T`` (PCA of the LM text
   embeddings) and ``E`` (a rank-``id_dim`` SVD copy of the teacher's item table) are
   **frozen** tables and only the two small projections are learned.
2. **Pooling**: recency position embeddings + LayerNorm, then a single attention read-out
   whose query is the most recent item (``h[:, -1]``, a static slice thanks to left padding)
   and whose keys are the whole window; the attention-weighted window (optionally through a
   value projection), a residual to the latest item and a LayerNorm (optionally a small FFN)
   give the user vector ``u``. The defaults drop the value projection and the FFN: on
   ml-100k they did not improve quality and they would break the 1/10 parameter budget.
   An empty history (a new device) has no items to pool: its ``u`` is the ``cold_user``
   buffer instead, the mean user vector of the public training histories (set after
   distillation), so a newcomer is recommended what an average user would be, about as
   good as popularity (ml-100k federated users, sampled / full HR@10 0.404 / 0.062 against
   Pop's 0.409 / 0.077), rather than whatever pooling the padding gives.
3. **Personal adapter** ``u + up(down(u))`` (rank ``adapter_rank``, ``up`` zero-initialised,
   ``up.bias`` is a per-user offset vector): identity until a device fine-tunes it.
4. **Output** ``scores_i = head_text(u) . T_i + head_id(u) . E_i``: the learned heads act on
   the *user* vector and the frozen tables supply the items, so every learned layer sees a
   batch-first input and Opacus' ``hooks`` mode computes exact per-sample gradients.

For export, :meth:`StudentModel.item_tables` folds projections and heads into an input table
``[n_items, d]``, an output table ``[n_items, d]`` and an output bias ``[n_items]``;
:class:`ExportableStudent` then scores with Gather + the pooling + one MatMul (+ Add). See
``docs/parameters.md`` for which parameters are global, personal and frozen, and why.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from shared.data.dataset import IntArray
from shared.errors import ConfigError, DataError, ModelFileError
from shared.models.base import Recommender, ScoreArray
from shared.models.epochs import STUDENT_EPOCHS
from shared.models.sequence import (
    MASKED_LOGIT,
    ItemRepresentation,
    pad_histories,
    recency_index,
    score_histories,
    svd_compress,
)
from shared.models.teacher import SASRecTeacher, TeacherNet
from shared.training.device import resolve_device
from shared.training.distill import check_temperature
from shared.training.trainer import (
    METRICS,
    TrainConfig,
    TrainHistory,
    Validation,
    count_parameters,
    limited_threads,
    seeded,
)

GROUPS = ("global", "personal", "frozen")
"""Parameter groups of the student: see ``docs/parameters.md``."""


MAX_TEACHER_RATIO = 0.1
"""The student's trainable parameters are at most this share of the teacher's."""


@dataclass(frozen=True)
class StudentConfig:
    """Architecture and distillation of the student; defaults are tuned on ml-100k.

    ``text_dim`` / ``id_dim``: width of the frozen text (PCA) and ID (teacher SVD) tables.
    ``temperature`` softens both distributions in the KL term (multiplied by T^2);
    ``alpha`` weighs KL against the ground-truth next-item cross-entropy
    (``alpha * KD + (1 - alpha) * CE``). ``batch_size`` counts teacher windows per step; each
    window yields one student example per position.

    ``patience`` (validations without improvement before stopping) is 20: distillation's
    validation curve is flat for long stretches, and with 6 the synthetic student stopped at
    epoch 30 with sampled HR@10 0.478 against 0.521 when trained on to its best epoch (92);
    on ml-100k the best epoch (14) and the result are the same either way.
    """

    dim: int = 64
    max_len: int = 50
    text_dim: int = 32
    id_dim: int = 48
    dropout: float = 0.1
    ffn: bool = False
    value_proj: bool = False
    adapter_rank: int = 4
    temperature: float = 2.0
    alpha: float = 0.7
    epochs: int = STUDENT_EPOCHS
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 5.0
    eval_every: int = 2
    patience: int = 20
    metric: str = "sampled_ndcg@10"
    seed: int = 7
    score_batch_size: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.dim <= 64:
            raise ConfigError(f"student dim must be in [1, 64] (on-device budget), got {self.dim}")
        if self.max_len < 1 or self.text_dim < 1 or self.id_dim < 1:
            raise ConfigError("student max_len, text_dim and id_dim must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"student dropout must be in [0, 1), got {self.dropout}")
        if self.adapter_rank < 1:
            raise ConfigError(f"adapter_rank must be >= 1, got {self.adapter_rank}")
        check_temperature(self.temperature)
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.score_batch_size < 1:
            raise ConfigError(f"score_batch_size must be >= 1, got {self.score_batch_size}")
        if self.metric not in METRICS:
            raise ConfigError(f"metric must be one of {', '.join(METRICS)}; got {self.metric!r}")
        self.train_config()

    def train_config(self, progress: bool = False, num_threads: int | None = None) -> TrainConfig:
        return TrainConfig.of(self, progress=progress, num_threads=num_threads)

    def trainable_parameters(self) -> int:
        """Scalars the device trains (global + personal); the frozen tables do not count.

        The probe model's initialisation draws from a seeded, restored generator, so counting
        leaves torch's global RNG as it was (a count that drew from it made whatever ran next,
        e.g. a benchmark's dropout, depend on how often pretraining had counted)."""
        with seeded(self.seed):
            probe = StudentModel(
                np.zeros((2, self.text_dim), np.float32),
                np.zeros((2, self.id_dim), np.float32),
                self,
            )
        return probe.num_parameters()

    def scaled_to(
        self, teacher_trainable: int, max_ratio: float = MAX_TEACHER_RATIO
    ) -> StudentConfig:
        """This config, narrowed until the student has at most ``max_ratio`` of the teacher's
        trainable parameters (the issue's budget: a tenth).

        The teacher's size depends on its catalog (its ID table is trainable) while the
        student's does not (its tables are frozen), so a student that fits next to a large
        catalog's teacher can be too big next to a small one. ``dim`` shrinks in steps of 8
        (``text_dim`` / ``id_dim`` with it, proportionally, to no fewer than 8 and never
        above their own width) down to 16; if even that is too big, the smallest is returned
        and the caller reports the ratio. A config that fits is returned unchanged.
        """
        if teacher_trainable < 1 or not max_ratio > 0:
            raise ConfigError("teacher_trainable must be >= 1 and max_ratio > 0")
        budget = max_ratio * teacher_trainable
        candidate = self
        # down in steps of 8, and to 16 itself when the width is not a multiple of 8
        widths = sorted({*range(self.dim, 15, -8), *([16] if self.dim >= 16 else [])})
        for dim in reversed(widths):
            shrink = dim / self.dim
            candidate = replace(
                self,
                dim=dim,
                # the floor of 8 narrows no further; it never widens a narrower table
                text_dim=min(self.text_dim, max(8, round(self.text_dim * shrink))),
                id_dim=min(self.id_dim, max(8, round(self.id_dim * shrink))),
            )
            if candidate.trainable_parameters() <= budget:
                return candidate
        return candidate


class PersonalAdapter(nn.Module):
    """``u + up(down(u))``: a rank-r residual adapter whose ``up.bias`` is a user offset.

    ``up`` starts at zero, so a fresh adapter is exactly the identity and a device that never
    adapts scores like the global model. Built from ``nn.Linear`` only (Opacus-compatible,
    though personal parameters never leave the device and need no DP).

    ``down`` starts as a random projection drawn from ``seed``, the same at every reset and in
    every process, and a reset draws nothing from torch's global generator. A projection drawn
    from that generator made each process start, and so fit, differently: with the fit's
    dropout seeded too (:func:`shared.federated.local_training.fit_personal`), an evaluation of
    a fixed model repeats and a device fits the adapter the evaluation measured.
    """

    def __init__(self, dim: int, rank: int, seed: int = 0) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim)
        self.seed = seed
        # the draw a fresh adapter used to take from torch's global generator, still taken
        # (and discarded) so that the layers built after it start as they always did: a
        # student pretrained from the same seed is unchanged
        nn.init.normal_(torch.empty_like(self.down.weight))
        self.reset()

    def reset(self) -> None:
        """Back to the identity (a new user)."""
        generator = torch.Generator().manual_seed(self.seed)
        std = 1.0 / math.sqrt(self.down.in_features)
        with torch.no_grad():
            start = torch.randn(self.down.weight.shape, generator=generator) * std
            self.down.weight.copy_(start)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = u + self.up(self.down(u))
        return out


@dataclass(frozen=True)
class ItemTables:
    """Folded item tables for export: scores = pool(input[items]) @ output.T + bias."""

    input: torch.Tensor
    output: torch.Tensor
    bias: torch.Tensor


class StudentModel(nn.Module):
    """``forward(items [B, L], mask [B, L]) -> scores [B, n_items]`` (see module docstring)."""

    cold_user: torch.Tensor

    def __init__(
        self,
        text_features: npt.NDArray[np.float32] | torch.Tensor,
        id_features: npt.NDArray[np.float32] | torch.Tensor,
        config: StudentConfig = StudentConfig(),
    ) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.items = ItemRepresentation(text_features, d, id_features=id_features)
        self.positions = nn.Embedding(config.max_len, d)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.norm_in = nn.LayerNorm(d)
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d) if config.value_proj else None
        self.norm_out = nn.LayerNorm(d)
        self.ffn = (
            nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d)) if config.ffn else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.adapter = PersonalAdapter(d, config.adapter_rank, seed=config.seed)
        self.register_buffer("cold_user", torch.zeros(d))
        self.head_text = nn.Linear(d, self.items.text.weight.shape[1])
        self.head_id = nn.Linear(d, self.items.ids.weight.shape[1], bias=False)

    @classmethod
    def from_teacher(
        cls, teacher: TeacherNet, config: StudentConfig = StudentConfig()
    ) -> StudentModel:
        """Frozen tables from the teacher: PCA of its LM text features, SVD of its item table.

        The SVD copy preserves the teacher's item-item geometry (dot products) as well as any
        ``id_dim``-dimensional table can, so matching the teacher reduces to learning a small
        user encoder; nothing per-item has to be learned (or sent, or noised) later.
        """
        with torch.no_grad():
            text = svd_compress(teacher.items.text.weight, config.text_dim, center=True)
            ids = svd_compress(teacher.item_table(), config.id_dim)
        return cls(text, ids, config)

    @property
    def n_items(self) -> int:
        return self.items.n_items

    # ------------------------------------------------------------------ forward

    def encode_embedded(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """User vector ``[B, d]`` from item input vectors ``x [B, L, d]`` and ``mask [B, L]``.

        Simple ops only (Gather-free, no data-dependent control flow): the same code runs in
        training, in scoring and in the exported on-device graph.
        """
        out: torch.Tensor = self.adapter(self.pool(x, mask))
        return out

    def pool(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The user vector before the personal adapter (``cold_user`` for an empty window)."""
        b, length = mask.shape
        h = self.norm_in(x + self.positions(recency_index(b, length, x.device)))
        h = self.drop(h)
        last = h[:, -1]
        att = torch.matmul(self.key(h), self.query(last).unsqueeze(-1)).squeeze(-1)
        att = (att / math.sqrt(h.shape[-1])).masked_fill(~mask, MASKED_LOGIT)
        weights = torch.softmax(att, dim=-1).unsqueeze(-1)
        values = self.value(h) if self.value is not None else h
        u = self.norm_out((weights * values).sum(dim=1) + last)
        if self.ffn is not None:
            u = u + self.drop(self.ffn(u))
        return torch.where(mask.any(dim=1, keepdim=True), u, self.cold_user.to(u.dtype))

    @torch.no_grad()
    def set_cold_user(self, histories: Sequence[IntArray], batch_size: int = 256) -> None:
        """Make ``cold_user`` (the user vector of an empty history) the mean pre-adapter user
        vector of ``histories`` (the non-empty ones, cut to ``max_len``)."""
        windows = [np.asarray(h[-self.config.max_len :]) for h in histories if len(h)]
        if not windows:
            raise DataError("the cold-start user vector needs at least one non-empty history")
        was_training = self.training
        self.eval()
        total = torch.zeros_like(self.cold_user)
        try:
            for start in range(0, len(windows), batch_size):
                items, mask = pad_histories(
                    windows[start : start + batch_size], self.config.max_len
                )
                items, mask = items.to(total.device), mask.to(total.device)
                total += self.pool(self.items(items), mask).sum(dim=0)
        finally:
            self.train(was_training)
        self.cold_user.copy_(total / len(windows))

    def encode(
        self, items: torch.Tensor, mask: torch.Tensor, *, gather_first: bool = True
    ) -> torch.Tensor:
        """User vector ``[B, d]`` from a left-padded window of item ids.

        ``gather_first=True`` gathers the frozen features of the window and then projects
        them: every learned layer sees a batch-first input, as Opacus' per-sample gradient
        hooks require. ``False`` projects the whole catalog once and gathers from that table:
        the same values and gradients, much cheaper when ``B * L`` exceeds ``n_items`` (server
        distillation), but **not** valid under Opacus.
        """
        x = self.items(items) if gather_first else F.embedding(items, self.items.table())
        return self.encode_embedded(x, mask)

    def forward(
        self, items: torch.Tensor, mask: torch.Tensor, *, gather_first: bool = True
    ) -> torch.Tensor:
        """Scores ``[B, n_items]`` (higher is better) from ``items``/``mask`` ``[B, L]``.

        See :meth:`encode` for ``gather_first`` (keep the default under Opacus).
        """
        u = self.encode(items, mask, gather_first=gather_first)
        text_scores = self.head_text(u) @ self.items.text.weight.T
        id_scores = self.head_id(u) @ self.items.ids.weight.T
        out: torch.Tensor = text_scores + id_scores
        return out

    @torch.no_grad()
    def item_tables(self) -> ItemTables:
        """Fold projections and heads into ``input``/``output`` ``[n, d]`` and ``bias [n]``.

        ``head_text(u) . T_i + head_id(u) . E_i = u . (T W_t + E W_e)_i + (T b_t)_i``.
        Recompute after every change of the global parameters (e.g. each federated round).
        """
        text, ids = self.items.text.weight, self.items.ids.weight
        output = text @ self.head_text.weight + ids @ self.head_id.weight
        bias = text @ self.head_text.bias
        return ItemTables(self.items.table().detach().clone(), output.clone(), bias.clone())

    # ------------------------------------------------------------------ parameter groups

    def parameter_group(self, name: str) -> str:
        """The group ('global', 'personal' or 'frozen') of the parameter called ``name``."""
        if name.startswith("adapter."):
            return "personal"
        if name in ("items.text.weight", "items.ids.weight"):
            return "frozen"
        return "global"

    def named_parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """``{'global': {...}, 'personal': {...}, 'frozen': {...}}`` by parameter name."""
        groups: dict[str, dict[str, nn.Parameter]] = {g: {} for g in GROUPS}
        for name, p in self.named_parameters():
            groups[self.parameter_group(name)][name] = p
        return groups

    def global_parameters(self) -> Iterator[nn.Parameter]:
        """Aggregated by the federation (SecAgg+), trained with DP-SGD on devices."""
        yield from self.named_parameter_groups()["global"].values()

    def personal_parameters(self) -> Iterator[nn.Parameter]:
        """Never leave the device; few-shot adaptation to one user."""
        yield from self.named_parameter_groups()["personal"].values()

    def frozen_parameters(self) -> Iterator[nn.Parameter]:
        """Fixed on the device: the LM text table and the teacher-derived ID table."""
        yield from self.named_parameter_groups()["frozen"].values()

    def set_trainable(self, groups: Iterable[str]) -> None:
        """``requires_grad=True`` exactly for the parameters of ``groups``.

        'frozen' is refused: frozen tables are frozen everywhere (server included), which is
        what keeps the student's trainable size small and its updates free of per-item rows.
        """
        chosen = set(groups)
        unknown = chosen - {"global", "personal"}
        if unknown:
            raise ConfigError(
                f"cannot train groups {sorted(unknown)}; choose from 'global', 'personal'"
            )
        for name, p in self.named_parameters():
            p.requires_grad_(self.parameter_group(name) in chosen)

    def global_state_dict(self) -> dict[str, torch.Tensor]:
        """The global parameters (what a client sends / the server aggregates), detached."""
        return {k: v.detach().clone() for k, v in self.named_parameter_groups()["global"].items()}

    def load_global_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite the global parameters (e.g. with the aggregated model of a round)."""
        params = self.named_parameter_groups()["global"]
        if set(state) != set(params):
            missing, extra = set(params) - set(state), set(state) - set(params)
            raise ModelFileError(
                f"global state mismatch: missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        with torch.no_grad():
            for name, value in state.items():
                if params[name].shape != value.shape:
                    raise ModelFileError(
                        f"{name}: shape {tuple(value.shape)} != {tuple(params[name].shape)}"
                    )
                params[name].copy_(value)

    def num_parameters(self, groups: Iterable[str] = ("global", "personal")) -> int:
        """Scalars in ``groups`` (default: everything trainable anywhere, i.e. not frozen)."""
        named = self.named_parameter_groups()
        return count_parameters(p for g in groups for p in named[g].values())


class ExportableStudent(nn.Module):
    """The on-device scoring graph: Gather + pooling + one MatMul (+ bias).

    Holds folded copies of the item tables (buffers) and shares the pooling modules with the
    student; call it in eval mode. ``forward(items [B, L], mask [B, L]) -> [B, n_items]``
    equals ``student(items, mask)`` up to float rounding, for any ``L <= max_len``.
    """

    input_table: torch.Tensor
    output_table: torch.Tensor
    output_bias: torch.Tensor

    def __init__(self, student: StudentModel) -> None:
        super().__init__()
        self.student = student
        tables = student.item_tables()
        self.register_buffer("input_table", tables.input)
        self.register_buffer("output_table", tables.output)
        self.register_buffer("output_bias", tables.bias)

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = F.embedding(items, self.input_table)
        u = self.student.encode_embedded(x, mask)
        out: torch.Tensor = u @ self.output_table.T + self.output_bias
        return out


def load_student_state(model: StudentModel, state: dict[str, torch.Tensor]) -> bool:
    """Load ``state`` into ``model``; False when it predates the ``cold_user`` buffer (then
    left at zeros: set it with :meth:`StudentModel.set_cold_user`). Any other difference
    raises ``RuntimeError``, as ``load_state_dict`` does."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"cold_user"}:
        raise RuntimeError(
            f"student state mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    return not missing


class DistilledStudent(Recommender):
    """The student as a :class:`Recommender`, distilled from a fitted :class:`SASRecTeacher`.

    ``fit(sequences, n_items, validation=None)`` builds the frozen tables from the teacher and
    trains the global parameters with ``alpha * KD + (1 - alpha) * CE`` on ``sequences``
    (public users on the server); ``score`` uses the last ``max_len`` items of a history.
    Wrap an already trained :class:`StudentModel` with :meth:`from_model` to score it.

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) is where ``fit`` distils and
    validates, and where the fitted model stays (scoring follows it). The model is built on
    the CPU from its seed and then moved, as the teacher's members are
    (:class:`~shared.models.teacher.SASRecTeacher`); the teacher may be on another device.
    """

    name = "student"

    def __init__(
        self,
        teacher: SASRecTeacher | None,
        config: StudentConfig = StudentConfig(),
        *,
        progress: bool = False,
        num_threads: int | None = None,
        device: str = "cpu",
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.config = config
        self.progress = progress
        self.num_threads = num_threads
        self.device = resolve_device(device)
        self._model: StudentModel | None = None
        self.history = TrainHistory()

    @classmethod
    def from_model(cls, model: StudentModel) -> DistilledStudent:
        out = cls(None, model.config)
        out._model = model
        out._n_items = model.n_items
        return out

    @property
    def model(self) -> StudentModel:
        if self._model is None:
            raise ConfigError("the student is not fitted yet; call fit() first")
        return self._model

    def fit(
        self,
        sequences: Sequence[IntArray],
        n_items: int,
        validation: Validation | None = None,
    ) -> DistilledStudent:
        from shared.training.distill import distill  # local: distill imports this module

        if self.teacher is None:
            raise ConfigError("the student learns from a teacher; pass a fitted SASRecTeacher")
        teacher_model = self.teacher.model
        if teacher_model.n_items != n_items:
            raise DataError(f"the teacher knows {teacher_model.n_items} items, data has {n_items}")
        with limited_threads(self.num_threads), seeded(self.config.seed):
            self._model = StudentModel.from_teacher(teacher_model, self.config)
        self._model.to(self.device)  # before distill seeds: a GPU's generator once CUDA is up
        self._n_items = n_items
        self._model.set_trainable(["global"])
        self.history = distill(
            self._model,
            teacher_model,
            sequences,
            self.config,
            teacher_max_len=self.teacher.fitted_config.max_len,
            validation=validation,
            scorer=self,
            progress=self.progress,
            num_threads=self.num_threads,
        )
        with limited_threads(self.num_threads):
            self._model.set_cold_user(sequences)
        return self

    def score(self, histories: Sequence[IntArray]) -> ScoreArray:
        with limited_threads(self.num_threads):
            return score_histories(
                self.model,
                histories,
                self.config.max_len,
                self._n_items,
                self.config.score_batch_size,
            )
